//! Typing notifications: in memory, with a timeout, announced through the typing stream.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

/// Longest a client may claim to be typing without renewing it.
pub const MAX_TYPING: Duration = Duration::from_secs(120);

#[derive(Default)]
struct RoomTyping {
    users: HashMap<OwnedUserId, Instant>,
    /// Typing-stream position of the last change in this room.
    changed_at: u64,
}

/// Who is typing where.
#[derive(Default)]
pub struct Typing {
    rooms: Mutex<HashMap<OwnedRoomId, RoomTyping>>,
}

impl Typing {
    /// Records a change; `bump` returns the new typing position. Returns whether anything
    /// changed.
    pub fn set(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        timeout: Option<Duration>,
        bump: impl FnOnce() -> u64,
    ) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let room = rooms.entry(room_id.to_owned()).or_default();
        let changed = match timeout {
            Some(t) => room.users.insert(user_id.to_owned(), Instant::now() + t.min(MAX_TYPING)).is_none(),
            None => room.users.remove(user_id).is_some(),
        };
        if changed {
            room.changed_at = bump();
        }
        changed
    }

    /// Drops expired entries; `bump` is called once, with the rooms concerned, if any expired.
    pub fn expire(&self, bump: impl FnOnce(&[OwnedRoomId]) -> u64) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut touched = Vec::new();
        for (room_id, room) in rooms.iter_mut() {
            let before = room.users.len();
            room.users.retain(|_, until| *until > now);
            if room.users.len() != before {
                touched.push(room_id.clone());
            }
        }
        rooms.retain(|_, room| !room.users.is_empty() || room.changed_at > 0);
        if !touched.is_empty() {
            let position = bump(&touched);
            for room_id in touched {
                if let Some(room) = rooms.get_mut(&room_id) {
                    room.changed_at = position;
                }
            }
        }
    }

    /// Whether typing in `room_id` changed after typing position `since`.
    pub fn changed_after(&self, room_id: &RoomId, since: u64) -> bool {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.get(room_id).is_some_and(|room| room.changed_at > since)
    }

    /// The users typing in `room_id` if that changed after typing position `since`.
    pub fn changed_since(&self, room_id: &RoomId, since: u64) -> Option<Vec<OwnedUserId>> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let room = rooms.get(room_id)?;
        if room.changed_at <= since {
            return None;
        }
        let now = Instant::now();
        let mut users: Vec<_> = room.users.iter().filter(|(_, until)| **until > now).map(|(u, _)| u.clone()).collect();
        users.sort();
        Some(users)
    }
}
