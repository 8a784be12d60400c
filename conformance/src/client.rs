//! Client-API steps most tests take (send, set state, read state, wait for the timeline),
//! written once so the paths and the unwrapping of answers live in one place.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Response, Server, User, enc};

/// One current state event as a client reads it: what `/rooms/{id}/state` lists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateEntry {
    pub kind: String,
    pub state_key: String,
    pub event_id: String,
}

impl Server {
    /// Sends a text message; returns its event id (the send must succeed).
    pub async fn say(&self, user: &User, room_id: &str, body: &str) -> String {
        event_id_of(self.send_text(user, room_id, body).await.assert_ok())
    }

    /// `PUT /rooms/{id}/state/{kind}/{state_key}`; returns the answer.
    pub async fn put_state(&self, user: &User, room_id: &str, kind: &str, state_key: &str, content: Value) -> Response {
        self.put(
            &format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room_id), enc(state_key)),
            Some(&user.access_token),
            content,
        )
        .await
    }

    /// `POST /rooms/{id}/{action}` for a membership action (`invite`, `kick`, `ban`, `unban`
    /// with a target; `leave`, `forget` without); returns the answer.
    pub async fn membership(&self, by: &User, room_id: &str, action: &str, target: Option<&str>) -> Response {
        let body = match target {
            Some(user_id) => json!({"user_id": user_id}),
            None => json!({}),
        };
        self.post(&format!("/_matrix/client/v3/rooms/{}/{action}", enc(room_id)), Some(&by.access_token), body).await
    }

    /// The room's current state as `user` reads it, sorted.
    pub async fn room_state(&self, user: &User, room_id: &str) -> Vec<StateEntry> {
        let resp =
            self.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room_id)), Some(&user.access_token)).await;
        let mut out: Vec<StateEntry> = resp
            .assert_ok()
            .as_array()
            .expect("state array")
            .iter()
            .map(|e| StateEntry {
                kind: e["type"].as_str().expect("type").to_owned(),
                state_key: e["state_key"].as_str().expect("state_key").to_owned(),
                event_id: e["event_id"].as_str().expect("event_id").to_owned(),
            })
            .collect();
        out.sort();
        out
    }

    /// Syncs (from `since`, or from the start) until `done` holds for the room's timeline
    /// events seen so far (or panics after [`crate::wait::PATIENCE`]); returns them.
    pub async fn wait_for_timeline_since(
        &self,
        user: &User,
        room_id: &str,
        since: Option<String>,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + crate::wait::PATIENCE;
        let mut since = since;
        let mut seen: Vec<Value> = Vec::new();
        let filter = json!({"room": {"timeline": {"limit": 200}}});
        loop {
            let body = self.sync(user, since.as_deref(), 1000, Some(filter.clone())).await;
            since = body["next_batch"].as_str().map(str::to_owned);
            if let Some(events) = body["rooms"]["join"][room_id]["timeline"]["events"].as_array() {
                seen.extend(events.iter().cloned());
            }
            if done(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "{what} never arrived on {}; saw {seen:?}", self.server_name);
            // A long poll already waits; this only keeps an answering-at-once server from spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`Server::wait_for_timeline_since`] from the start.
    pub async fn wait_for_timeline(
        &self,
        user: &User,
        room_id: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.wait_for_timeline_since(user, room_id, None, what, done).await
    }
}

/// The `event_id` of a successful send or state answer.
#[track_caller]
pub fn event_id_of(body: &Value) -> String {
    body["event_id"].as_str().expect("event_id in the answer").to_owned()
}

/// The bodies of the `m.room.message` events among `events`, in order.
pub fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// The event id of the current state event (`kind`, `state_key`) in `state` (which must hold it).
#[track_caller]
pub fn state_event_id(state: &[StateEntry], kind: &str, state_key: &str) -> String {
    state
        .iter()
        .find(|e| e.kind == kind && e.state_key == state_key)
        .unwrap_or_else(|| panic!("no {kind}/{state_key} in the state"))
        .event_id
        .clone()
}
