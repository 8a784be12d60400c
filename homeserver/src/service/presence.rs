//! Presence: online / unavailable / offline, a status message and last activity, seen by
//! users who share a room. Can be switched off in the configuration.

use ruma::UserId;
use serde_json::{Value as JsonValue, json};

use super::Services;
use crate::{
    error::{Error, Result},
    store::{PresenceRow, now_ms},
};

/// Without a sync or other activity for this long a user is shown offline (a long-polling
/// client syncs at least every 30 seconds).
pub const OFFLINE_AFTER_MS: i64 = 90_000;
/// "Currently active" means active within this window.
const CURRENTLY_ACTIVE_MS: i64 = 60_000;

/// The presence states.
pub fn valid_state(state: &str) -> bool {
    matches!(state, "online" | "unavailable" | "offline")
}

impl Services {
    /// `PUT /presence/{userId}/status`.
    pub async fn set_presence(&self, user: &UserId, state: &str, status_msg: Option<String>) -> Result<()> {
        if !valid_state(state) {
            return Err(Error::InvalidParam(format!("Unknown presence state {state}")));
        }
        if !self.settings.presence.enabled {
            return Ok(());
        }
        let position = self.streams.allocate();
        self.store
            .set_presence(&PresenceRow {
                user_id: user.to_string(),
                state: state.to_owned(),
                status_msg,
                last_active_ts: now_ms(),
                stream_id: position.position(),
            })
            .await?;
        position.commit();
        Ok(())
    }

    /// `GET /presence/{userId}/status`: the user's own, or that of somebody sharing a room.
    pub async fn get_presence(&self, requester: &UserId, target: &UserId) -> Result<JsonValue> {
        if requester != target && !self.store.share_a_room(requester.as_str(), target.as_str()).await? {
            return Err(Error::Forbidden("You do not share a room with this user".to_owned()));
        }
        if self.store.user(target.as_str()).await?.is_none() {
            return Err(Error::NotFound("Unknown user".to_owned()));
        }
        let row = if self.settings.presence.enabled { self.store.presence(target.as_str()).await? } else { None };
        Ok(match row {
            Some(row) => presence_content(&row),
            None => json!({"presence": "offline"}),
        })
    }

    /// A sync counts as activity: it brings an offline user online (as `set_presence`
    /// asks, default online) and keeps an online one there.
    pub async fn presence_on_sync(&self, user: &UserId, set_presence: &str) -> Result<()> {
        if !self.settings.presence.enabled || set_presence == "offline" {
            return Ok(());
        }
        let now = now_ms();
        match self.store.presence(user.as_str()).await? {
            Some(row) if row.state != "offline" => {
                if now - row.last_active_ts > 10_000 {
                    self.store.touch_presence(user.as_str(), now).await?;
                }
            }
            previous => {
                let position = self.streams.allocate();
                self.store
                    .set_presence(&PresenceRow {
                        user_id: user.to_string(),
                        state: set_presence.to_owned(),
                        status_msg: previous.and_then(|p| p.status_msg),
                        last_active_ts: now,
                        stream_id: position.position(),
                    })
                    .await?;
                position.commit();
            }
        }
        Ok(())
    }

    /// Marks users offline who stopped syncing.
    pub async fn expire_presence(&self) -> Result<()> {
        if !self.settings.presence.enabled {
            return Ok(());
        }
        for mut row in self.store.present_users_idle_since(now_ms() - OFFLINE_AFTER_MS).await? {
            let position = self.streams.allocate();
            row.state = "offline".to_owned();
            row.stream_id = position.position();
            self.store.set_presence(&row).await?;
            position.commit();
        }
        Ok(())
    }

    /// `m.presence` events for a sync.
    pub async fn presence_events(&self, user: &UserId, from: i64, to: i64) -> Result<Vec<JsonValue>> {
        if !self.settings.presence.enabled {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for row in self.store.presence_changes_for(user.as_str(), from, to).await? {
            let mut content = presence_content(&row);
            if let Ok(target) = UserId::parse(row.user_id.as_str())
                && let Ok(profile) = self.profile(&target).await
            {
                for key in ["displayname", "avatar_url"] {
                    if let Some(v) = profile.get(key) {
                        content[key] = v.clone();
                    }
                }
            }
            out.push(json!({"type": "m.presence", "sender": row.user_id, "content": content}));
        }
        Ok(out)
    }
}

fn presence_content(row: &PresenceRow) -> JsonValue {
    let ago = (now_ms() - row.last_active_ts).max(0);
    let mut content = json!({
        "presence": row.state,
        "last_active_ago": ago,
        "currently_active": row.state == "online" && ago < CURRENTLY_ACTIVE_MS,
    });
    if let Some(msg) = &row.status_msg {
        content["status_msg"] = JsonValue::from(msg.as_str());
    }
    content
}
