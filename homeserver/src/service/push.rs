//! Push rules (ruma's evaluation and defaults) and what they decide for each new event.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    CanonicalJsonObject, MilliSecondsSinceUnixEpoch, OwnedUserId, RoomId, UInt, UserId,
    api::client::push::get_notifications::v3::Notification,
    events::room::power_levels::RoomPowerLevels,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};
use serde_json::Value as JsonValue;

use super::{
    Hub,
    auth::AuthedUser,
    events::Viewer,
    notifier::{Change, Sections},
    push_gateway::PushGateway,
    streams::Positions,
};
use crate::config::PushSettings;
use crate::error::{Error, Result};

/// Users' rule sets, cached: every event in a room is evaluated for every member.
#[derive(Default)]
pub struct PushRuleCache {
    rules: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
}

/// Push: users' push rules and what they decide for each event, their pushers, and the
/// delivery to push gateways (see [`super::push_gateway`]).
pub struct Push {
    pub(super) hub: Hub,
    rule_cache: PushRuleCache,
    /// The gateway client and the delivery state of the background worker.
    pub(super) gateway: PushGateway,
}

impl Push {
    pub fn new(hub: Hub, settings: &PushSettings) -> Self {
        Self { hub, rule_cache: PushRuleCache::default(), gateway: PushGateway::new(settings) }
    }

    /// The user's push rules: their stored set, or the server defaults.
    pub async fn rules(&self, user_id: &UserId) -> Result<Arc<Ruleset>> {
        let s = self.hub.services();
        if let Some(rules) = self.rule_cache.rules.lock().unwrap_or_else(|e| e.into_inner()).get(user_id) {
            return Ok(rules.clone());
        }
        let stored = s.store.account_data(user_id.as_str(), "", "m.push_rules").await?;
        let rules = stored
            .and_then(|text| serde_json::from_str::<JsonValue>(&text).ok())
            .and_then(|v| serde_json::from_value::<Ruleset>(v["global"].clone()).ok())
            .unwrap_or_else(|| Ruleset::server_default(user_id));
        let rules = Arc::new(rules);
        self.rule_cache.rules.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id.to_owned(), rules.clone());
        Ok(rules)
    }

    /// Stores a changed rule set (account data `m.push_rules`, which syncs to clients).
    pub async fn save_rules(&self, user_id: &UserId, rules: Ruleset) -> Result<()> {
        let s = self.hub.services();
        let content = serde_json::json!({"global": rules}).to_string();
        let position = s.streams.allocate();
        s.store.set_account_data(user_id.as_str(), "", "m.push_rules", &content, position.position()).await?;
        position.commit_with(vec![Change::user(user_id.to_owned(), Sections::ACCOUNT_DATA)]);
        self.rule_cache.rules.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id.to_owned(), Arc::new(rules));
        Ok(())
    }

    /// Evaluates a new event against the push rules of every other joined local member:
    /// (user, highlight, actions JSON) for those it notifies.
    pub async fn actions_for(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        pdu: &CanonicalJsonObject,
    ) -> Result<Vec<(String, bool, String)>> {
        let s = self.hub.services();
        let members = match s.room_cache.with(room_id, |c| c.joined.clone()) {
            Some(members) => members,
            None => {
                // Filled under the room lock of the append that asks (see room_cache).
                let members = Arc::new(s.store.joined_members_with_names(room_id.as_str()).await?);
                s.room_cache.with(room_id, |c| c.joined = Some(members.clone()));
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
        let power_levels = self.power_levels(room_id).await?;
        let mut out = Vec::new();
        for (member, display_name) in members.iter() {
            let Ok(user) = UserId::parse(member.as_str()) else { continue };
            if user == sender || user.server_name() != s.settings.server_name {
                continue;
            }
            let rules = self.rules(&user).await?;
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

/// One page of `GET /notifications`.
pub struct NotificationPage {
    pub notifications: Vec<Notification>,
    /// Where the next page starts, when this one was full.
    pub next_token: Option<String>,
}

impl Push {
    /// `GET /notifications`: the events that notified `user`, newest first, before the
    /// stream position `before`.
    pub async fn notifications(
        &self,
        user: &AuthedUser,
        before: i64,
        limit: i64,
        only_highlight: bool,
    ) -> Result<NotificationPage> {
        let s = self.hub.services();
        let rows = s.store.notifications(user.user_id.as_str(), before, limit, only_highlight).await?;
        let next_token = (i64::try_from(rows.len()).unwrap_or(0) == limit)
            .then(|| rows.last().map(|(r, ..)| Positions::at(r.stream_ordering).to_string()))
            .flatten();
        let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
        let mut notifications = Vec::new();
        for (row, actions, ts, read) in rows {
            let actions: Vec<Action> = serde_json::from_str(&actions).unwrap_or_default();
            let room_id = RoomId::parse(row.room_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
            let event = s.relations.raw_client_event_bundled(&row, viewer, true).await?;
            let ts = MilliSecondsSinceUnixEpoch(UInt::new(ts.max(0) as u64).unwrap_or_default());
            notifications.push(Notification::new(actions, event, read, room_id, ts));
        }
        Ok(NotificationPage { notifications, next_token })
    }
}

impl Push {
    /// The room's current power levels as the push rules see them: who may notify the whole
    /// room (`notifications.room`), with the room version's creator privileges.
    /// Read through the room cache: only called from the append path, under the room lock.
    async fn power_levels(&self, room_id: &RoomId) -> Result<Option<PushConditionPowerLevelsCtx>> {
        let s = self.hub.services();
        let version = s.rooms.version(room_id.as_str()).await?;
        let Ok(rules) = federation::pdu::room_version_rules(&version) else { return Ok(None) };
        let Some(create) = s.room_cache.state_event(room_id, "m.room.create", "").await? else {
            return Ok(None);
        };
        // The creators as the authorization rules see them (content.creator before v11, the
        // sender since, plus the additional creators from v12).
        let creators = super::rooms::creators_of(&create, &version)?;
        let row = s.room_cache.state_event(room_id, "m.room.power_levels", "").await?;
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
