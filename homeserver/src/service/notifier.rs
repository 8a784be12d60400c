//! Who must wake up when a write becomes visible, and what it changed.
//!
//! Every write that takes a stream position says what it changed ([`Change`]): a room
//! (its timeline, receipts, the presence or devices of its members) or one user (account
//! data, to-device messages, their own memberships). Once the position becomes visible the
//! change goes into a bounded in-memory log and wakes only the long-polling syncs that
//! registered for its scope. A woken sync asks the log what changed for it between its token
//! and now, and reads only those parts from the database, so a message in one room costs
//! nothing to the syncs of users elsewhere and little to the members of the room.
//!
//! The log forgets old entries; a sync whose token is older than what the log remembers
//! (or a change with [`Scope::Everyone`]) is answered by reading everything, as before the
//! log existed. So the log is only ever a shortcut, never the source of truth.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use ruma::{OwnedRoomId, OwnedUserId};
use tokio::sync::Notify;

/// Entries the change log keeps (about 100 bytes each).
const LOG_CAPACITY: usize = 20_000;

bitflags::bitflags! {
    /// The parts of a sync response a change touches.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Sections: u8 {
        /// Room events (messages, state, memberships of anyone).
        const TIMELINE = 1;
        const RECEIPTS = 1 << 1;
        const ACCOUNT_DATA = 1 << 2;
        const TO_DEVICE = 1 << 3;
        /// Device keys of a user who shares the room (or of the user).
        const DEVICE_LISTS = 1 << 4;
        const PRESENCE = 1 << 5;
        /// The user's own membership somewhere changed: the set of rooms may differ.
        const MEMBERSHIP = 1 << 6;
    }
}

/// Whose syncs a change concerns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The members of a room (joined or invited).
    Room(OwnedRoomId),
    /// One user, on all their devices.
    User(OwnedUserId),
    /// Everybody: for changes that do not say what they touched.
    Everyone,
}

/// What one write changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub scope: Scope,
    pub sections: Sections,
}

impl Change {
    pub fn room(room_id: OwnedRoomId, sections: Sections) -> Self {
        Self { scope: Scope::Room(room_id), sections }
    }

    pub fn user(user_id: OwnedUserId, sections: Sections) -> Self {
        Self { scope: Scope::User(user_id), sections }
    }

    pub fn everyone() -> Self {
        Self { scope: Scope::Everyone, sections: Sections::all() }
    }
}

/// What changed for one sync between two positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relevance {
    /// The log cannot tell (too old a token, or an unscoped change): read everything.
    pub everything: bool,
    /// Sections changed for the user themselves.
    pub user: Sections,
    /// Sections changed per room the sync watches.
    pub rooms: HashMap<OwnedRoomId, Sections>,
    /// The last position in the window where the user's own memberships changed.
    pub membership_changed_at: Option<i64>,
}

impl Relevance {
    pub fn everything() -> Self {
        Self { everything: true, ..Self::default() }
    }

    pub fn is_empty(&self) -> bool {
        !self.everything && self.user.is_empty() && self.rooms.is_empty()
    }

    /// Whether `section` changed anywhere (for the user or in any watched room).
    pub fn any(&self, section: Sections) -> bool {
        self.everything || self.user.contains(section) || self.rooms.values().any(|s| s.contains(section))
    }

    /// What changed in one room.
    pub fn room(&self, room_id: &OwnedRoomId) -> Sections {
        if self.everything { Sections::all() } else { self.rooms.get(room_id).copied().unwrap_or_default() }
    }
}

struct Inner {
    log: VecDeque<(i64, Change)>,
    /// Changes at or below this position may have left the log.
    floor: i64,
    waiters: HashMap<Scope, HashMap<u64, Arc<Notify>>>,
    all: HashMap<u64, Arc<Notify>>,
    next_waiter: u64,
}

/// The change log and the registry of waiting syncs.
pub struct Notifier {
    inner: Mutex<Inner>,
}

impl Notifier {
    /// A notifier that knows nothing before `position`.
    pub fn new(position: i64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                log: VecDeque::new(),
                floor: position,
                waiters: HashMap::new(),
                all: HashMap::new(),
                next_waiter: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records changes that just became visible (in position order) and then wakes their
    /// waiters: a woken sync asks [`Notifier::relevance`] what changed, so the log must hold
    /// the change before anyone is woken. The wake-ups happen after the log's lock is
    /// released, so a waiter that looks at the log as soon as it is woken never blocks on it.
    pub fn publish(&self, changes: impl IntoIterator<Item = (i64, Change)>) {
        let to_wake = {
            let mut inner = self.lock();
            let mut to_wake = Vec::new();
            for (position, change) in changes {
                inner.waiters_of(&change.scope, &mut to_wake);
                inner.log.push_back((position, change));
            }
            while inner.log.len() > LOG_CAPACITY {
                if let Some((position, _)) = inner.log.pop_front() {
                    inner.floor = inner.floor.max(position);
                }
            }
            to_wake
        };
        to_wake.iter().for_each(|n| n.notify_one());
    }

    /// Wakes the waiters of `scope` without logging anything (typing, which keeps its own
    /// positions in memory).
    pub fn wake(&self, scope: &Scope) {
        let mut to_wake = Vec::new();
        self.lock().waiters_of(scope, &mut to_wake);
        to_wake.iter().for_each(|n| n.notify_one());
    }

    /// What changed in `(from, to]` for a sync that watches `user` and `rooms`.
    pub fn relevance(
        &self,
        from: i64,
        to: i64,
        user: &OwnedUserId,
        watches_room: impl Fn(&OwnedRoomId) -> bool,
    ) -> Relevance {
        let inner = self.lock();
        if from < inner.floor {
            return Relevance::everything();
        }
        let start = inner.log.partition_point(|(p, _)| *p <= from);
        let mut out = Relevance::default();
        for (position, change) in inner.log.range(start..) {
            if *position > to {
                break;
            }
            match &change.scope {
                Scope::Everyone => return Relevance::everything(),
                Scope::User(u) if u == user => {
                    out.user |= change.sections;
                    if change.sections.contains(Sections::MEMBERSHIP) {
                        out.membership_changed_at = Some(*position);
                    }
                }
                Scope::Room(r) if watches_room(r) => *out.rooms.entry(r.clone()).or_default() |= change.sections,
                _ => {}
            }
        }
        out
    }

    /// Registers a waiter for `scopes` (and for changes to everyone). Dropping the guard
    /// unregisters it.
    pub fn register(self: &Arc<Self>, scopes: Vec<Scope>) -> Waiter {
        let notify = Arc::new(Notify::new());
        let mut inner = self.lock();
        let id = inner.next_waiter;
        inner.next_waiter += 1;
        for scope in &scopes {
            inner.waiters.entry(scope.clone()).or_default().insert(id, notify.clone());
        }
        inner.all.insert(id, notify.clone());
        Waiter { notifier: self.clone(), id, scopes, notify }
    }

    fn unregister(&self, id: u64, scopes: &[Scope]) {
        let mut inner = self.lock();
        for scope in scopes {
            if let Some(waiters) = inner.waiters.get_mut(scope) {
                waiters.remove(&id);
                if waiters.is_empty() {
                    inner.waiters.remove(scope);
                }
            }
        }
        inner.all.remove(&id);
    }

    /// Waiters registered now (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.lock().all.len()
    }
}

impl Inner {
    /// Adds the waiters a change of `scope` concerns to `out`.
    fn waiters_of(&self, scope: &Scope, out: &mut Vec<Arc<Notify>>) {
        match scope {
            Scope::Everyone => out.extend(self.all.values().cloned()),
            scope => {
                if let Some(waiters) = self.waiters.get(scope) {
                    out.extend(waiters.values().cloned());
                }
            }
        }
    }
}

/// A registered long-poll. A wake-up that happens between registering and waiting is kept
/// (Notify stores one permit), so nothing that commits in between is missed.
pub struct Waiter {
    notifier: Arc<Notifier>,
    id: u64,
    scopes: Vec<Scope>,
    notify: Arc<Notify>,
}

impl Waiter {
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.notifier.unregister(self.id, &self.scopes);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use ruma::{owned_room_id, owned_user_id};

    use super::*;

    #[test]
    fn relevance_filters_by_scope_and_window() {
        let n = Notifier::new(10);
        let me = owned_user_id!("@me:x");
        let mine = owned_room_id!("!mine:x");
        let other = owned_room_id!("!other:x");
        n.publish([
            (11, Change::room(other.clone(), Sections::TIMELINE)),
            (12, Change::room(mine.clone(), Sections::RECEIPTS)),
            (13, Change::user(owned_user_id!("@you:x"), Sections::ACCOUNT_DATA)),
            (14, Change::user(me.clone(), Sections::TO_DEVICE)),
        ]);
        let rooms: HashSet<_> = [mine.clone()].into();
        let r = n.relevance(10, 14, &me, |r| rooms.contains(r));
        assert!(!r.everything);
        assert_eq!(r.room(&mine), Sections::RECEIPTS);
        assert_eq!(r.room(&other), Sections::empty());
        assert_eq!(r.user, Sections::TO_DEVICE);
        assert!(n.relevance(12, 13, &me, |r| rooms.contains(r)).is_empty(), "nothing for me in (12, 13]");
        assert!(n.relevance(9, 14, &me, |r| rooms.contains(r)).everything, "older than the log");
        assert_eq!(r.membership_changed_at, None);
        n.publish([
            (15, Change::user(me.clone(), Sections::MEMBERSHIP)),
            (16, Change::user(owned_user_id!("@you:x"), Sections::MEMBERSHIP)),
        ]);
        assert_eq!(n.relevance(10, 16, &me, |r| rooms.contains(r)).membership_changed_at, Some(15));
        n.publish([(17, Change::everyone())]);
        assert!(n.relevance(16, 17, &me, |r| rooms.contains(r)).everything);
    }

    #[test]
    fn the_log_is_bounded_and_raises_its_floor() {
        let n = Notifier::new(0);
        let me = owned_user_id!("@me:x");
        n.publish((1..=(LOG_CAPACITY as i64 + 5)).map(|p| (p, Change::user(me.clone(), Sections::ACCOUNT_DATA))));
        assert!(n.relevance(3, 10, &me, |_| false).everything);
        assert_eq!(n.relevance(100, 101, &me, |_| false).user, Sections::ACCOUNT_DATA);
    }

    #[tokio::test]
    async fn only_waiters_of_the_scope_wake() {
        let n = Arc::new(Notifier::new(0));
        let room = owned_room_id!("!r:x");
        let in_room = n.register(vec![Scope::Room(room.clone())]);
        let elsewhere = n.register(vec![Scope::Room(owned_room_id!("!s:x"))]);
        n.publish([(1, Change::room(room, Sections::TIMELINE))]);
        tokio::time::timeout(std::time::Duration::from_secs(1), in_room.woken()).await.expect("woken");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), elsewhere.woken()).await.is_err(),
            "a change in another room does not wake"
        );
        n.publish([(2, Change::everyone())]);
        tokio::time::timeout(std::time::Duration::from_secs(1), elsewhere.woken()).await.expect("everyone wakes");
        drop(in_room);
        drop(elsewhere);
        assert_eq!(n.waiting(), 0);
    }
}
