//! Push rules (ruma's evaluation and defaults) and what they decide for each new event.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    CanonicalJsonObject, OwnedUserId, RoomId, UInt, UserId,
    events::room::power_levels::RoomPowerLevels,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};
use serde_json::Value as JsonValue;

use super::{
    Services,
    notifier::{Change, Sections},
};
use crate::error::{Error, Result};

/// Users' rule sets, cached: every event in a room is evaluated for every member.
#[derive(Default)]
pub struct PushRuleCache {
    rules: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
}

impl Services {
    /// The user's push rules: their stored set, or the server defaults.
    pub async fn push_rules(&self, user_id: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(rules) = self.push_rule_cache.rules.lock().unwrap_or_else(|e| e.into_inner()).get(user_id) {
            return Ok(rules.clone());
        }
        let stored = self.store.account_data(user_id.as_str(), "", "m.push_rules").await?;
        let rules = stored
            .and_then(|text| serde_json::from_str::<JsonValue>(&text).ok())
            .and_then(|v| serde_json::from_value::<Ruleset>(v["global"].clone()).ok())
            .unwrap_or_else(|| Ruleset::server_default(user_id));
        let rules = Arc::new(rules);
        self.push_rule_cache.rules.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id.to_owned(), rules.clone());
        Ok(rules)
    }

    /// Stores a changed rule set (account data `m.push_rules`, which syncs to clients).
    pub async fn save_push_rules(&self, user_id: &UserId, rules: Ruleset) -> Result<()> {
        let content = serde_json::json!({"global": rules}).to_string();
        let position = self.streams.allocate();
        self.store.set_account_data(user_id.as_str(), "", "m.push_rules", &content, position.position()).await?;
        position.commit_with(vec![Change::user(user_id.to_owned(), Sections::ACCOUNT_DATA)]);
        self.push_rule_cache
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user_id.to_owned(), Arc::new(rules));
        Ok(())
    }

    /// Evaluates a new event against the push rules of every other joined local member:
    /// (user, highlight, actions JSON) for those it notifies.
    pub async fn push_actions_for(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        pdu: &CanonicalJsonObject,
    ) -> Result<Vec<(String, bool, String)>> {
        let members = match self.room_cache.with(room_id, |c| c.joined.clone()) {
            Some(members) => members,
            None => {
                // Filled under the room lock of the append that asks (see room_cache).
                let members = Arc::new(self.store.joined_members_with_names(room_id.as_str()).await?);
                self.room_cache.with(room_id, |c| c.joined = Some(members.clone()));
                members
            }
        };
        let member_count = UInt::new(members.len() as u64).unwrap_or_default();
        let raw: Raw<JsonValue> =
            Raw::from_json(serde_json::value::to_raw_value(pdu).map_err(|e| Error::internal(e.to_string()))?);
        if !members.iter().any(|(m, _)| m != sender.as_str()) {
            return Ok(Vec::new());
        }
        // Without the power levels ruma's `sender_notification_permission` never holds, so
        // `@room` would never highlight.
        let power_levels = self.push_power_levels(room_id).await?;
        let mut out = Vec::new();
        for (member, display_name) in members.iter() {
            let Ok(user) = UserId::parse(member.as_str()) else { continue };
            if user == sender || user.server_name() != self.settings.server_name {
                continue;
            }
            let rules = self.push_rules(&user).await?;
            let name = display_name.clone().unwrap_or_else(|| user.localpart().to_owned());
            let mut ctx = PushConditionRoomCtx::new(room_id.to_owned(), member_count, user.clone(), name);
            ctx.power_levels = power_levels.clone();
            let actions = rules.get_actions(&raw, &ctx).await;
            if actions.iter().any(Action::should_notify) {
                let highlight = actions.iter().any(Action::is_highlight);
                let json = serde_json::to_string(actions).map_err(|e| Error::internal(e.to_string()))?;
                out.push((member.clone(), highlight, json));
            }
        }
        Ok(out)
    }
}

impl Services {
    /// The room's current power levels as the push rules see them: who may notify the whole
    /// room (`notifications.room`), with the room version's creator privileges.
    /// Read through the room cache: only called from the append path, under the room lock.
    async fn push_power_levels(&self, room_id: &RoomId) -> Result<Option<PushConditionPowerLevelsCtx>> {
        let version = self.rooms.version(room_id.as_str()).await?;
        let Ok(rules) = federation::pdu::room_version_rules(&version) else { return Ok(None) };
        let Some(create) = self.room_cache.state_event(room_id, "m.room.create", "").await? else {
            return Ok(None);
        };
        // The creators as the authorization rules see them (content.creator before v11, the
        // sender since, plus the additional creators from v12).
        let creators = super::rooms::creators_of(&create, &version)?;
        let row = self.room_cache.state_event(room_id, "m.room.power_levels", "").await?;
        // Authorized content always parses; if not, nobody may notify the room.
        let Ok(source) = super::rooms::power_levels_source(row.as_deref()) else { return Ok(None) };
        Ok(Some(RoomPowerLevels::new(source, &rules.authorization, creators).into()))
    }
}

#[cfg(test)]
mod tests {
    use ruma::{room_id, user_id};

    use super::*;

    #[tokio::test]
    async fn user_mentions_highlight() {
        let bob = user_id!("@bob:localhost");
        let rules = Ruleset::server_default(bob);
        let event = serde_json::json!({
            "type": "m.room.message", "sender": "@alice:localhost", "room_id": "!r:localhost",
            "content": {"msgtype": "m.text", "body": "hi", "m.mentions": {"user_ids": ["@bob:localhost"]}},
        });
        let raw: Raw<JsonValue> = Raw::from_json(serde_json::value::to_raw_value(&event).unwrap());
        let ctx = PushConditionRoomCtx::new(
            room_id!("!r:localhost").to_owned(),
            UInt::new(3).unwrap(),
            bob.to_owned(),
            "Bob".into(),
        );
        let actions = rules.get_actions(&raw, &ctx).await;
        assert!(actions.iter().any(Action::is_highlight), "{actions:?}");
    }
}
