//! What appends and syncs read about a room over and over, kept in memory.
//!
//! Every send reads the room version, a few current state events (to authorize the event),
//! the forward extremities and the joined members (for push rules); every sync woken by a
//! message reads the room's newest events. All of it only changes through appends, which are
//! serialized per room, so the append path keeps this cache exact: it reads through the
//! cache under the room lock and, once its write is committed, records the new event here
//! ([`RoomCache::appended`]). Anything else that writes a room's events or state must call
//! [`RoomCaches::invalidate`]. The database stays the source of truth; a cold or dropped
//! entry is simply read again.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, RoomId, RoomVersionId};

use super::Hub;
use crate::{error::Result, store::EventRow};

/// Newest events kept per room, enough for a sync woken by a burst of messages.
const RECENT_EVENTS: usize = 64;
/// Rooms kept; past this the cache starts over (cheap, and it bounds memory).
const MAX_ROOMS: usize = 10_000;

/// Joined members (user id, display name).
pub type JoinedMembers = Arc<Vec<(String, Option<String>)>>;

/// A recent event and whom it notified: (user, highlight).
struct Recent {
    row: Arc<EventRow>,
    notified: Vec<(String, bool)>,
}

/// The cached facts of one room. Fields are `None` until first read.
#[derive(Default)]
pub struct RoomCache {
    pub version: Option<RoomVersionId>,
    /// Current state events read so far, by (type, state key); `None` = no such state.
    pub state: HashMap<(String, String), Option<Arc<EventRow>>>,
    /// Forward extremities with their depths, oldest first.
    pub extremities: Option<Vec<(String, i64)>>,
    /// Joined members with their display names.
    pub joined: Option<JoinedMembers>,
    /// The state group of the current state (`Some(None)`: the room has none).
    pub current_group: Option<Option<i64>>,
    /// The newest events, oldest first, and the position after which the list is complete.
    recent: VecDeque<Recent>,
    recent_complete_after: Option<i64>,
}

impl RoomCache {
    /// Records a committed append and the users it notified (user, highlight).
    pub fn appended(&mut self, row: EventRow, prev_events: &[String], notified: Vec<(String, bool)>) {
        let row = Arc::new(row);
        if let Some(extremities) = &mut self.extremities {
            extremities.retain(|(id, _)| !prev_events.contains(id));
            extremities.push((row.event_id.clone(), row.depth));
        }
        if let Some(key) = &row.state_key {
            self.state.insert((row.event_type.clone(), key.clone()), Some(row.clone()));
            if row.event_type == "m.room.member" {
                self.joined = None;
            }
        }
        if self.recent_complete_after.is_none() {
            // Appends to a room are serialized and take increasing positions, so from here
            // on every event of the room passes through this list.
            self.recent_complete_after = Some(row.stream_ordering - 1);
        }
        self.recent.push_back(Recent { row, notified });
        while self.recent.len() > RECENT_EVENTS {
            if let Some(dropped) = self.recent.pop_front() {
                self.recent_complete_after = Some(dropped.row.stream_ordering);
            }
        }
    }

    /// Records that `target` was redacted by `redaction` (an allowed redaction, decided by
    /// the append path: a redaction event alone redacts nothing here).
    pub fn redacted(&mut self, target: &str, redaction: &str) {
        for event in self.recent.iter_mut().filter(|e| e.row.event_id == target && e.row.redacted_by.is_none()) {
            let mut redacted = (*event.row).clone();
            redacted.redacted_by = Some(redaction.to_owned());
            event.row = Arc::new(redacted);
        }
        // The redacted event may be cached as state too.
        for state in self.state.values_mut().flatten() {
            if state.event_id == target && state.redacted_by.is_none() {
                let mut redacted = (**state).clone();
                redacted.redacted_by = Some(redaction.to_owned());
                *state = Arc::new(redacted);
            }
        }
    }

    /// How many events in `(from, to]` notified `user_id` (and how many of them highlight),
    /// if the cache holds all of them.
    pub fn notifications_between(&self, user_id: &str, from: i64, to: i64) -> Option<(i64, i64)> {
        if from < self.recent_complete_after? {
            return None;
        }
        let mut counts = (0, 0);
        for event in self.recent.iter().filter(|e| e.row.stream_ordering > from && e.row.stream_ordering <= to) {
            if let Some((_, highlight)) = event.notified.iter().find(|(u, _)| u == user_id) {
                counts.0 += 1;
                counts.1 += i64::from(*highlight);
            }
        }
        Some(counts)
    }

    /// The room's events in `(from, to]`, newest first, at most `limit`, if the cache holds
    /// all of them.
    pub fn recent_events(&self, from: i64, to: i64, limit: usize) -> Option<Vec<EventRow>> {
        let complete_after = self.recent_complete_after?;
        if from < complete_after {
            return None;
        }
        Some(
            self.recent
                .iter()
                .rev()
                .filter(|e| e.row.stream_ordering > from && e.row.stream_ordering <= to)
                .take(limit)
                .map(|e| (*e.row).clone())
                .collect(),
        )
    }
}

/// The caches of all rooms.
pub struct RoomCaches {
    hub: Hub,
    rooms: Mutex<HashMap<OwnedRoomId, Arc<Mutex<RoomCache>>>>,
}

impl RoomCaches {
    pub fn new(hub: Hub) -> Self {
        Self { hub, rooms: Mutex::default() }
    }

    /// The cache of one room (created empty).
    pub fn get(&self, room_id: &RoomId) -> Arc<Mutex<RoomCache>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if rooms.len() >= MAX_ROOMS && !rooms.contains_key(room_id) {
            rooms.clear();
        }
        rooms.entry(room_id.to_owned()).or_default().clone()
    }

    /// Runs `f` on one room's cache.
    pub fn with<T>(&self, room_id: &RoomId, f: impl FnOnce(&mut RoomCache) -> T) -> T {
        let room = self.get(room_id);
        let mut cache = room.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut cache)
    }

    /// Forgets a room: for writes that bypass the append path.
    pub fn invalidate(&self, room_id: &RoomId) {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
    }
    /// A current state event, through the room cache. Only for the append path, under the
    /// room lock, which keeps the cache exact.
    pub(crate) async fn state_event(&self, room_id: &RoomId, kind: &str, key: &str) -> Result<Option<Arc<EventRow>>> {
        let s = self.hub.services();
        let cache_key = (kind.to_owned(), key.to_owned());
        if let Some(hit) = self.with(room_id, |c| c.state.get(&cache_key).cloned()) {
            return Ok(hit);
        }
        let row = s.store.current_state_event(room_id.as_str(), kind, key).await?.map(Arc::new);
        self.with(room_id, |c| c.state.insert(cache_key, row.clone()));
        Ok(row)
    }

    /// The forward extremities, through the room cache (append path only, under the lock).
    pub(crate) async fn extremities(&self, room_id: &RoomId) -> Result<Vec<(String, i64)>> {
        let s = self.hub.services();
        if let Some(hit) = self.with(room_id, |c| c.extremities.clone()) {
            return Ok(hit);
        }
        let extremities = s.store.forward_extremities(room_id.as_str()).await?;
        self.with(room_id, |c| c.extremities = Some(extremities.clone()));
        Ok(extremities)
    }

    /// The room's joined members, through the room cache (append path, under the lock).
    pub(crate) async fn joined_members(&self, room_id: &RoomId) -> Result<super::room_cache::JoinedMembers> {
        let s = self.hub.services();
        if let Some(hit) = self.with(room_id, |c| c.joined.clone()) {
            return Ok(hit);
        }
        let members = Arc::new(s.store.joined_members_with_names(room_id.as_str()).await?);
        self.with(room_id, |c| c.joined = Some(members.clone()));
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pos: i64, id: &str, kind: &str, state_key: Option<&str>, json: &str) -> EventRow {
        EventRow {
            stream_ordering: pos,
            event_id: id.into(),
            room_id: "!r:x".into(),
            depth: pos,
            event_type: kind.into(),
            state_key: state_key.map(Into::into),
            sender: "@a:x".into(),
            origin_server_ts: 0,
            json: json.into(),
            prev_state_event_id: None,
            redacted_by: None,
            txn_user: None,
            txn_device: None,
            txn_id: None,
        }
    }

    #[test]
    fn recent_events_are_served_only_when_complete() {
        let mut cache = RoomCache::default();
        assert!(cache.recent_events(0, 10, 5).is_none(), "nothing known yet");
        cache.extremities = Some(vec![("$a".into(), 1)]);
        cache.appended(row(5, "$b", "m.room.message", None, "{}"), &["$a".into()], vec![]);
        cache.appended(row(7, "$c", "m.room.message", None, "{}"), &["$b".into()], vec![("@u:x".into(), true)]);
        assert_eq!(cache.extremities, Some(vec![("$c".into(), 7)]));
        assert!(cache.recent_events(3, 7, 5).is_none(), "position 4 may hold an older event");
        let ids: Vec<_> = cache.recent_events(4, 7, 5).unwrap().into_iter().map(|e| e.event_id).collect();
        assert_eq!(ids, vec!["$c", "$b"]);
        assert_eq!(cache.recent_events(5, 6, 5).unwrap().len(), 0);
        assert_eq!(cache.notifications_between("@u:x", 4, 7), Some((1, 1)));
        assert_eq!(cache.notifications_between("@u:x", 4, 5), Some((0, 0)));
        assert_eq!(cache.notifications_between("@u:x", 3, 7), None);
        for p in 10..(10 + RECENT_EVENTS as i64) {
            cache.appended(row(p, &format!("$e{p}"), "m.room.message", None, "{}"), &[], vec![]);
        }
        assert!(cache.recent_events(5, 100, 100).is_none(), "the oldest fell out");
    }

    #[test]
    fn redactions_and_state_update_the_cache() {
        let mut cache = RoomCache::default();
        cache.appended(row(1, "$m", "m.room.message", None, "{}"), &[], vec![]);
        cache.appended(row(2, "$t", "m.room.topic", Some(""), "{}"), &[], vec![]);
        // A redaction event alone redacts nothing; the append path says when one applies.
        cache.appended(row(3, "$r", "m.room.redaction", None, r#"{"content":{"redacts":"$m"}}"#), &[], vec![]);
        assert_eq!(cache.recent_events(0, 3, 10).unwrap()[2].redacted_by, None);
        cache.redacted("$m", "$r");
        cache.redacted("$t", "$r");
        let recent = cache.recent_events(0, 3, 10).unwrap();
        assert_eq!(recent[2].redacted_by.as_deref(), Some("$r"));
        assert_eq!(
            cache.state[&("m.room.topic".to_owned(), String::new())].as_ref().unwrap().redacted_by.as_deref(),
            Some("$r")
        );
        assert!(cache.state[&("m.room.topic".to_owned(), String::new())].is_some());
    }
}
