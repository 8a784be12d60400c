//! Stream positions and waking long-polling syncs.
//!
//! Events, account data and receipts take their positions from one server-wide sequence.
//! Writers in different rooms run in parallel, so position 11 may commit before position 10;
//! a reader must never skip 10. Positions are therefore handed out here and only become
//! visible to readers once every smaller position has finished (committed or failed): the
//! visible position is the highest one below which nothing is in flight.
//!
//! Positions become visible only up to what is durably *reserved* (see
//! [`Store::reserve_stream_positions`](crate::store::Store::reserve_stream_positions)): a
//! background task keeps the reservation a block ahead of the allocations, and a restarted
//! server counts on from above it. A power cut that loses the last commits (SQLite with
//! `synchronous = normal`) can then never make the server hand out again a position that
//! clients already hold.
//!
//! Typing notifications are in memory and have their own counter. A sync token carries
//! `s<stream>_<typing>_<to-device>`: the last component is how far this device's to-device
//! queue was delivered (a batch may stop short of `stream`), so the next sync deletes exactly
//! what was delivered.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{Arc, Mutex},
};

use ruma::RoomId;
use tokio::sync::watch;

use super::notifier::{Change, Notifier, Scope};

/// Positions a sync has seen up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Positions {
    pub stream: i64,
    pub typing: u64,
    /// Per device, only in sync tokens: to-device messages up to here were delivered.
    pub to_device: i64,
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}_{}_{}", self.stream, self.typing, self.to_device)
    }
}

impl Positions {
    /// Parses a sync or pagination token: `s<stream>[_<typing>[_<to-device>]]`.
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.strip_prefix('s')?;
        let mut parts = rest.split('_');
        let stream = parts.next()?.parse().ok().filter(|s: &i64| *s >= 0)?;
        let typing = match parts.next() {
            Some(t) => t.parse().ok()?,
            None => 0,
        };
        let to_device = match parts.next() {
            Some(t) => t.parse().ok().filter(|t: &i64| *t >= 0 && *t <= stream)?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self { stream, typing, to_device })
    }

    /// A `/messages` token: like [`Positions::parse`], but the position may be negative
    /// (`s-<n>`): history backfilled from other servers sits before everything else.
    pub fn parse_pagination(token: &str) -> Option<Self> {
        match token.strip_prefix("s-") {
            Some(rest) => Self::parse(&format!("s{rest}")).filter(|p| p.stream > 0).map(|p| Self {
                stream: -p.stream,
                typing: p.typing,
                to_device: 0,
            }),
            None => Self::parse(token),
        }
    }

    /// A pagination token for a position in the room stream.
    pub fn at(stream: i64) -> Self {
        Self { stream, typing: 0, to_device: 0 }
    }
}

struct Allocation {
    next: i64,
    in_flight: BTreeSet<i64>,
    /// Highest position whose write committed; a failed write's position never becomes
    /// visible, so no token points past what is stored.
    max_committed: i64,
    /// What committed writes changed, until their positions become visible.
    pending: BTreeMap<i64, Vec<Change>>,
    /// The visible position last published.
    visible: i64,
    /// Positions up to here are durably reserved; none above becomes visible.
    reserved: i64,
    /// A larger reservation was asked for and not yet made.
    reservation_wanted: bool,
}

/// Positions reserved at a time. A restart skips what was reserved and unused: at most this
/// many positions, a gap readers step over.
pub const RESERVATION_BLOCK: i64 = 100_000;
/// A new reservation is asked for when fewer than this many reserved positions are left, so
/// that visibility never waits for it in practice.
const RESERVATION_LOW_WATER: i64 = RESERVATION_BLOCK / 2;

/// Hands out stream positions and publishes what readers may see.
pub struct Streams {
    allocation: Mutex<Allocation>,
    positions: watch::Sender<Positions>,
    notifier: Arc<Notifier>,
    /// Wakes the task that makes reservations (see [`Streams::reservation_wanted`]).
    reserve: tokio::sync::Notify,
}

impl Streams {
    /// Starts after `max_persisted`, the highest position in the database (and reserved).
    /// Nothing becomes visible until [`Streams::reserved`] reports a reservation.
    pub fn new(max_persisted: i64) -> Arc<Self> {
        let (positions, _) = watch::channel(Positions { stream: max_persisted, typing: 0, to_device: 0 });
        Arc::new(Self {
            allocation: Mutex::new(Allocation {
                next: max_persisted + 1,
                in_flight: BTreeSet::new(),
                max_committed: max_persisted,
                pending: BTreeMap::new(),
                visible: max_persisted,
                reserved: max_persisted,
                reservation_wanted: true,
            }),
            positions,
            notifier: Arc::new(Notifier::new(max_persisted)),
            reserve: tokio::sync::Notify::new(),
        })
    }

    /// Waits until a reservation is wanted and returns the position to reserve up to. The
    /// caller stores it durably and then reports it with [`Streams::reserved`].
    pub async fn reservation_wanted(&self) -> i64 {
        loop {
            let notified = self.reserve.notified();
            {
                let a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
                if a.reservation_wanted {
                    return a.next + RESERVATION_BLOCK;
                }
            }
            notified.await;
        }
    }

    /// Positions up to `upto` are durably reserved: those committed may become visible.
    pub fn reserved(&self, upto: i64) {
        let mut a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
        a.reserved = a.reserved.max(upto);
        a.reservation_wanted = a.next + RESERVATION_LOW_WATER > a.reserved;
        self.advance(a);
    }

    /// The change log and the registry of waiting syncs.
    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.notifier
    }

    /// Reserves the next position. Dropping the guard (after the commit, or on failure)
    /// releases it.
    pub fn allocate(self: &Arc<Self>) -> StreamGuard {
        let mut a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
        let position = a.next;
        a.next += 1;
        a.in_flight.insert(position);
        if !a.reservation_wanted && a.next + RESERVATION_LOW_WATER > a.reserved {
            a.reservation_wanted = true;
            self.reserve.notify_one();
        }
        StreamGuard { streams: self.clone(), position, changes: None }
    }

    fn finish(&self, position: i64, changes: Option<Vec<Change>>) {
        let mut a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
        a.in_flight.remove(&position);
        if let Some(changes) = changes {
            a.max_committed = a.max_committed.max(position);
            a.pending.insert(position, changes);
        }
        self.advance(a);
    }

    /// Raises the visible position as far as the finished, committed and reserved positions
    /// allow, and publishes what became visible.
    fn advance(&self, mut a: std::sync::MutexGuard<'_, Allocation>) {
        let below_in_flight = match a.in_flight.first() {
            Some(first) => first - 1,
            None => a.next - 1,
        };
        let visible = below_in_flight.min(a.max_committed).min(a.reserved);
        if visible <= a.visible {
            return;
        }
        a.visible = visible;
        let later = a.pending.split_off(&(visible + 1));
        let now_visible = std::mem::replace(&mut a.pending, later);
        // The position is raised before anyone is woken. A sync woken by a change reads
        // `current()` and then the changes up to it: woken before the raise, it would read
        // the old position, find nothing new and wait again with its wake-up spent, until its
        // timeout (messages delivered up to 30 s late when the waker's thread ran first).
        self.positions.send_if_modified(|p| {
            if visible > p.stream {
                p.stream = visible;
                true
            } else {
                false
            }
        });
        // Published under the allocation lock, so the log stays in position order.
        self.notifier
            .publish(now_visible.into_iter().flat_map(|(p, changes)| changes.into_iter().map(move |c| (p, c))));
    }

    /// Marks a change in typing notifications in `rooms`: the typing position is raised
    /// before the rooms' syncs are woken (see [`Streams::finish`]). Callers hold the typing
    /// state's lock while calling this, so a woken sync that asks whether a room's typing
    /// changed waits for the change to be recorded.
    pub fn bump_typing<'a>(&self, rooms: impl IntoIterator<Item = &'a RoomId>) -> u64 {
        let mut now = 0;
        self.positions.send_modify(|p| {
            p.typing += 1;
            now = p.typing;
        });
        for room in rooms {
            self.notifier.wake(&Scope::Room(room.to_owned()));
        }
        now
    }

    pub fn current(&self) -> Positions {
        *self.positions.borrow()
    }

    /// A receiver that wakes whenever a position moves.
    pub fn subscribe(&self) -> watch::Receiver<Positions> {
        self.positions.subscribe()
    }
}

/// A reserved stream position. Call [`StreamGuard::commit_with`] once the write that uses it
/// is committed; dropping it uncommitted (the write failed) leaves a gap readers skip.
pub struct StreamGuard {
    streams: Arc<Streams>,
    position: i64,
    changes: Option<Vec<Change>>,
}

impl StreamGuard {
    pub fn position(&self) -> i64 {
        self.position
    }

    /// The write is committed and changed `changes`: readers may see this position (once
    /// everything below it is finished too), and the syncs those changes concern wake up.
    pub fn commit_with(mut self, changes: Vec<Change>) {
        self.changes = Some(changes);
    }

    /// The write is committed, without saying what it changed: every sync wakes and reads
    /// everything. Prefer [`StreamGuard::commit_with`].
    pub fn commit(self) {
        self.commit_with(vec![Change::everyone()]);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.finish(self.position, self.changes.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::notifier::Sections;

    /// Streams starting after `start` with a reservation made.
    fn reserved_streams(start: i64) -> Arc<Streams> {
        let streams = Streams::new(start);
        streams.reserved(start + RESERVATION_BLOCK);
        streams
    }

    #[tokio::test]
    async fn nothing_past_the_reservation_becomes_visible() {
        let streams = Streams::new(10);
        assert_eq!(streams.reservation_wanted().await, 11 + RESERVATION_BLOCK, "a reservation is wanted at start");
        let a = streams.allocate();
        a.commit();
        assert_eq!(streams.current().stream, 10, "11 is not reserved yet");
        streams.reserved(11 + RESERVATION_BLOCK);
        assert_eq!(streams.current().stream, 11, "reserved: 11 becomes visible");
        // Allocations approaching the end of the reservation ask for the next one ahead of
        // time, and until it is made positions past the reservation stay hidden.
        let mut last = 11;
        let upto = 11 + RESERVATION_BLOCK;
        while last < upto + 5 {
            let g = streams.allocate();
            last = g.position();
            g.commit();
        }
        assert_eq!(streams.current().stream, upto, "positions past the reservation are hidden");
        let wanted = tokio::time::timeout(std::time::Duration::from_secs(5), streams.reservation_wanted())
            .await
            .expect("a new reservation was asked for");
        assert!(wanted > last, "the new reservation covers what was allocated");
        streams.reserved(wanted);
        assert_eq!(streams.current().stream, last);
    }

    #[test]
    fn pagination_tokens_may_be_negative_sync_tokens_not() {
        let before_everything = Positions::at(-42);
        assert_eq!(before_everything.to_string(), "s-42_0_0");
        assert_eq!(Positions::parse_pagination("s-42_0_0"), Some(before_everything));
        assert_eq!(Positions::parse_pagination("s17_0_0"), Some(Positions::at(17)));
        assert_eq!(Positions::parse("s-42_0_0"), None, "a sync token is never negative");
        assert_eq!(Positions::parse_pagination("s-0_0_0"), None);
        assert_eq!(Positions::parse_pagination("s--1"), None);
    }

    #[test]
    fn positions_become_visible_in_order() {
        let streams = reserved_streams(10);
        let a = streams.allocate();
        let b = streams.allocate();
        assert_eq!((a.position(), b.position()), (11, 12));
        b.commit();
        assert_eq!(streams.current().stream, 10, "12 is hidden while 11 is in flight");
        a.commit();
        assert_eq!(streams.current().stream, 12);
    }

    #[test]
    fn failed_writes_never_become_visible() {
        let streams = reserved_streams(10);
        let a = streams.allocate();
        drop(a);
        assert_eq!(streams.current().stream, 10, "nothing was stored at 11");
        let b = streams.allocate();
        b.commit();
        assert_eq!(streams.current().stream, 12);
    }

    #[test]
    fn changes_are_published_when_their_position_becomes_visible() {
        use ruma::owned_user_id;

        let streams = reserved_streams(10);
        let me = owned_user_id!("@me:x");
        let a = streams.allocate();
        let b = streams.allocate();
        b.commit_with(vec![Change::user(me.clone(), Sections::ACCOUNT_DATA)]);
        assert!(streams.notifier().relevance(10, 12, &me, |_| false).is_empty(), "12 is not visible yet");
        a.commit_with(vec![Change::user(me.clone(), Sections::TO_DEVICE)]);
        assert_eq!(
            streams.notifier().relevance(10, 12, &me, |_| false).user,
            Sections::ACCOUNT_DATA | Sections::TO_DEVICE
        );
        assert_eq!(streams.notifier().relevance(11, 12, &me, |_| false).user, Sections::ACCOUNT_DATA);
    }

    /// What a long-polling sync does when it wakes: read the visible position, then ask the
    /// change log what changed up to it. A waker that does exactly that at the moment it is
    /// woken forces the interleaving that lost wake-ups: a sync woken before the position it
    /// was woken for became visible found nothing new and went back to sleep with its one
    /// wake-up spent, until its timeout (30 s late).
    struct WokenSync {
        streams: Arc<Streams>,
        user: ruma::OwnedUserId,
        seen: Mutex<Vec<(i64, Sections)>>,
    }

    impl std::task::Wake for WokenSync {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            let visible = self.streams.current().stream;
            // Only look at the log once the position is visible (as a sync reads `(since,
            // current]`): a woken sync that sees an old position reads nothing new.
            let sections = if visible > 10 {
                self.streams.notifier().relevance(10, visible, &self.user, |_| false).user
            } else {
                Sections::empty()
            };
            self.seen.lock().unwrap().push((visible, sections));
        }
    }

    #[test]
    fn a_woken_sync_sees_the_change_that_woke_it() {
        use std::{
            future::Future,
            task::{Context, Poll, Waker},
        };

        use ruma::owned_user_id;

        let streams = reserved_streams(10);
        let me = owned_user_id!("@me:x");
        let sync = Arc::new(WokenSync { streams: streams.clone(), user: me.clone(), seen: Mutex::new(Vec::new()) });
        let waiter = streams.notifier().register(vec![Scope::User(me.clone())]);
        let waker = Waker::from(sync.clone());
        let mut cx = Context::from_waker(&waker);
        let mut woken = std::pin::pin!(waiter.woken());
        assert_eq!(woken.as_mut().poll(&mut cx), Poll::Pending, "nothing happened yet");

        streams.allocate().commit_with(vec![Change::user(me.clone(), Sections::TO_DEVICE)]);

        let seen = sync.seen.lock().unwrap().clone();
        assert_eq!(seen, vec![(11, Sections::TO_DEVICE)], "the sync was woken before it could see position 11");
        assert_eq!(woken.as_mut().poll(&mut cx), Poll::Ready(()));
    }

    #[test]
    fn tokens_round_trip() {
        let p = Positions { stream: 42, typing: 7, to_device: 40 };
        assert_eq!(Positions::parse(&p.to_string()), Some(p));
        assert_eq!(Positions::parse("s5"), Some(Positions::at(5)));
        for bad in ["", "s", "x5", "s-1", "s1_2_3_4", "s1_x", "s5_0_6"] {
            assert_eq!(Positions::parse(bad), None, "{bad}");
        }
    }
}
