//! Presence: online / unavailable / offline, a status message and last activity, seen by
//! users who share a room. Can be switched off in the configuration.

use ruma::events::room::member::MembershipState;
use std::{collections::HashMap, sync::Mutex};

use ruma::{OwnedUserId, UserId};
use serde_json::{Value as JsonValue, json};

use super::{Hub, notifier::Sections, rate_limit::Class};
use crate::{
    error::{Error, Result},
    store::{PresenceRow, now_ms},
};

/// Without a sync or other activity for this long a user is shown offline (a long-polling
/// client syncs at least every 30 seconds).
pub const OFFLINE_AFTER_MS: i64 = 90_000;
/// "Currently active" means active within this window.
const CURRENTLY_ACTIVE_MS: i64 = 60_000;
/// How stale the stored last activity of an online user may get: syncs arrive far more often
/// than this, and each would otherwise read (and often write) the presence row.
const TOUCH_GRANULARITY_MS: i64 = 10_000;

/// When each user was last seen online and their activity stored, so that most syncs need
/// no database access for presence.
#[derive(Default)]
pub struct PresenceTouches {
    touched: Mutex<HashMap<OwnedUserId, i64>>,
}

impl PresenceTouches {
    fn recent(&self, user: &UserId, now: i64) -> bool {
        let touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched.get(user).is_some_and(|at| now - at < TOUCH_GRANULARITY_MS)
    }

    fn record(&self, user: &UserId, now: i64) {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched.len() >= 100_000 {
            touched.clear();
        }
        touched.insert(user.to_owned(), now);
    }

    fn forget(&self, user: &str) {
        if let Ok(user) = UserId::parse(user) {
            self.touched.lock().unwrap_or_else(|e| e.into_inner()).remove(&user);
        }
    }
}

/// The presence states.
pub fn valid_state(state: &str) -> bool {
    matches!(state, "online" | "unavailable" | "offline")
}

/// Presence: each user's state, who sees it, and when it lapses to offline.
pub struct Presence {
    hub: Hub,
    touches: PresenceTouches,
}

impl Presence {
    pub fn new(hub: Hub) -> Self {
        Self { hub, touches: PresenceTouches::default() }
    }

    /// `PUT /presence/{userId}/status`: `requester` sets their own presence (`target`).
    pub async fn set(
        &self,
        requester: &UserId,
        target: &UserId,
        state: &str,
        status_msg: Option<String>,
    ) -> Result<()> {
        if requester != target {
            return Err(Error::Forbidden("You may only set your own presence".to_owned()));
        }
        let user = requester;
        let s = self.hub.services();
        s.rate_limits.check_user(Class::Presence, user)?;
        if !valid_state(state) {
            return Err(Error::InvalidParam(format!("Unknown presence state {state}")));
        }
        if !s.settings.presence.enabled {
            return Ok(());
        }
        self.touches.forget(user.as_str());
        let changes = s.rooms.changes_of_user_and_rooms(user.as_str(), Sections::PRESENCE).await?;
        let position = s.streams.allocate();
        s.store
            .set_presence(&PresenceRow {
                user_id: user.to_string(),
                state: state.to_owned(),
                status_msg,
                last_active_ts: now_ms(),
                stream_id: position.position(),
            })
            .await?;
        position.commit_with(changes);
        self.federate(user.as_str()).await
    }

    /// Sends a local user's current presence (`m.presence`) to the servers sharing a room
    /// with them.
    pub async fn federate(&self, user_id: &str) -> Result<()> {
        let s = self.hub.services();
        let Ok(user) = UserId::parse(user_id) else { return Ok(()) };
        if user.server_name() != s.settings.server_name {
            return Ok(());
        }
        let Some(row) = s.store.presence(user_id).await? else { return Ok(()) };
        let mut servers = std::collections::BTreeSet::new();
        for (room_id, membership) in s.rooms.of_user(user_id).await?.iter() {
            if *membership == MembershipState::Join {
                for member in s.store.room_members(room_id, &MembershipState::Join).await? {
                    if let Ok(member) = UserId::parse(member.as_str())
                        && member.server_name() != s.settings.server_name
                    {
                        servers.insert(member.server_name().to_string());
                    }
                }
            }
        }
        if servers.is_empty() {
            return Ok(());
        }
        let mut push = json!({
            "user_id": user_id, "presence": row.state, "currently_active": row.state == "online",
            "last_active_ago": (now_ms() - row.last_active_ts).max(0),
        });
        if let Some(msg) = &row.status_msg {
            push["status_msg"] = json!(msg);
        }
        let edu = json!({"edu_type": "m.presence", "content": {"push": [push]}});
        let destinations: Vec<String> = servers.into_iter().collect();
        let position = s.streams.allocate();
        s.store.enqueue_edu(&destinations, position.position(), &edu.to_string()).await?;
        position.commit_with(Vec::new());
        s.send_queue.wake(&destinations);
        Ok(())
    }

    /// Presence of another server's user (an `m.presence` EDU from their server).
    pub async fn receive_remote(
        &self,
        user: &UserId,
        state: &str,
        status_msg: Option<String>,
        last_active_ago: i64,
    ) -> Result<()> {
        let s = self.hub.services();
        if !s.settings.presence.enabled || !valid_state(state) || s.rooms.of_user(user.as_str()).await?.is_empty() {
            return Ok(());
        }
        let changes = s.rooms.changes_of_user_and_rooms(user.as_str(), Sections::PRESENCE).await?;
        let position = s.streams.allocate();
        s.store
            .set_presence(&PresenceRow {
                user_id: user.to_string(),
                state: state.to_owned(),
                status_msg,
                last_active_ts: now_ms() - last_active_ago.max(0),
                stream_id: position.position(),
            })
            .await?;
        position.commit_with(changes);
        Ok(())
    }

    /// `GET /presence/{userId}/status`: the user's own, or that of somebody sharing a room.
    pub async fn get(&self, requester: &UserId, target: &UserId) -> Result<JsonValue> {
        let s = self.hub.services();
        if requester != target && !s.store.share_a_room(requester.as_str(), target.as_str()).await? {
            return Err(Error::Forbidden("You do not share a room with this user".to_owned()));
        }
        if target.server_name() == s.settings.server_name && s.store.user(target.as_str()).await?.is_none() {
            return Err(Error::NotFound("Unknown user".to_owned()));
        }
        let row = if s.settings.presence.enabled { s.store.presence(target.as_str()).await? } else { None };
        Ok(match row {
            Some(row) => presence_content(&row),
            None => json!({"presence": "offline"}),
        })
    }

    /// A sync counts as activity: it brings an offline user online (as `set_presence`
    /// asks, default online) and keeps an online one there.
    pub async fn on_sync(&self, user: &UserId, set_presence: &str) -> Result<()> {
        let s = self.hub.services();
        if !s.settings.presence.enabled || set_presence == "offline" {
            return Ok(());
        }
        let now = now_ms();
        if self.touches.recent(user, now) {
            return Ok(());
        }
        match s.store.presence(user.as_str()).await? {
            Some(row) if row.state != "offline" => {
                if now - row.last_active_ts > TOUCH_GRANULARITY_MS {
                    s.store.touch_presence(user.as_str(), now).await?;
                    self.touches.record(user, now);
                } else {
                    self.touches.record(user, row.last_active_ts);
                }
            }
            previous => {
                let changes = s.rooms.changes_of_user_and_rooms(user.as_str(), Sections::PRESENCE).await?;
                let position = s.streams.allocate();
                s.store
                    .set_presence(&PresenceRow {
                        user_id: user.to_string(),
                        state: set_presence.to_owned(),
                        status_msg: previous.and_then(|p| p.status_msg),
                        last_active_ts: now,
                        stream_id: position.position(),
                    })
                    .await?;
                position.commit_with(changes);
                self.touches.record(user, now);
                self.federate(user.as_str()).await?;
            }
        }
        Ok(())
    }

    /// Marks users offline who stopped syncing.
    pub async fn expire(&self) -> Result<()> {
        let s = self.hub.services();
        if !s.settings.presence.enabled {
            return Ok(());
        }
        for mut row in s.store.present_users_idle_since(now_ms() - OFFLINE_AFTER_MS).await? {
            self.touches.forget(&row.user_id);
            let changes = s.rooms.changes_of_user_and_rooms(&row.user_id, Sections::PRESENCE).await?;
            let position = s.streams.allocate();
            row.state = "offline".to_owned();
            row.stream_id = position.position();
            s.store.set_presence(&row).await?;
            position.commit_with(changes);
            self.federate(&row.user_id).await?;
        }
        Ok(())
    }

    /// `m.presence` events for a sync: changes in `(from, to]` of the user and of everyone
    /// sharing a joined room with them. Display names and avatars are not repeated here
    /// (they are optional in presence content, and clients take them from room state).
    /// Presence for a sync of `user` covering `(from, to]`: what changed, and with `new_peers`
    /// (memberships changed in the window) the current presence of users who came to share a
    /// room with `user`.
    pub async fn events(&self, user: &UserId, from: i64, to: i64, new_peers: bool) -> Result<Vec<JsonValue>> {
        let s = self.hub.services();
        if !s.settings.presence.enabled {
            return Ok(Vec::new());
        }
        let rows = if from == 0 {
            // Initial sync: the database joins presence with the user's rooms.
            s.store.presence_changes_for(user.as_str(), from, to).await?
        } else {
            let mut kept = if to - from <= PRESENCE_WINDOW_SCAN {
                // Incremental: the few changes in the window, kept if they share a room, from
                // the cached room lists.
                let my_rooms = s.rooms.of_user(user.as_str()).await?;
                let mine = joined_rooms(&my_rooms);
                let mut kept = Vec::new();
                for row in s.store.presence_changes_between(from, to).await? {
                    let shares = row.user_id == user.as_str()
                        || joined_rooms(&s.rooms.of_user(&row.user_id).await?).iter().any(|r| mine.contains(r));
                    if shares {
                        kept.push(row);
                    }
                }
                kept
            } else {
                // A wide window may hold the changes of the whole server (everyone coming
                // online at nine, a client back after an hour): read only the room-mates'
                // rows, found from the user's rooms, instead of every change. Measured with
                // 500 users coming online together: every sync read all 500 rows, 2.9 s of
                // database time in one second and sends queued behind it.
                s.store.presence_changes_for(user.as_str(), from, to).await?
            };
            if new_peers {
                for row in s.store.presence_of_new_room_peers(user.as_str(), from, to).await? {
                    if !kept.iter().any(|k| k.user_id == row.user_id) {
                        kept.push(row);
                    }
                }
            }
            kept
        };
        Ok(rows
            .iter()
            .map(|row| json!({"type": "m.presence", "sender": row.user_id, "content": presence_content(row)}))
            .collect())
    }
}

/// Up to this many stream positions between two syncs, the presence changes among them are
/// few enough to read them all and keep the room-mates' (the usual case: one sync per
/// change); beyond it the database finds the room-mates' changes (see `presence_events`).
const PRESENCE_WINDOW_SCAN: i64 = 64;

fn joined_rooms(rooms: &[(String, MembershipState)]) -> std::collections::HashSet<&str> {
    rooms.iter().filter(|(_, m)| *m == MembershipState::Join).map(|(r, _)| r.as_str()).collect()
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
