//! Stream positions and waking long-polling syncs.
//!
//! Events, account data and receipts take their positions from one server-wide sequence.
//! Writers in different rooms run in parallel, so position 11 may commit before position 10;
//! a reader must never skip 10. Positions are therefore handed out here and only become
//! visible to readers once every smaller position has finished (committed or failed): the
//! visible position is the highest one below which nothing is in flight.
//!
//! Typing notifications are in memory and have their own counter. A sync token carries
//! `s<stream>_<typing>_<to-device>`: the last component is how far this device's to-device
//! queue was delivered (a batch may stop short of `stream`), so the next sync deletes exactly
//! what was delivered.

use std::{
    collections::BTreeSet,
    fmt,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

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
}

/// Hands out stream positions and publishes what readers may see.
pub struct Streams {
    allocation: Mutex<Allocation>,
    positions: watch::Sender<Positions>,
}

impl Streams {
    /// Starts after `max_persisted`, the highest position in the database.
    pub fn new(max_persisted: i64) -> Arc<Self> {
        let (positions, _) = watch::channel(Positions { stream: max_persisted, typing: 0, to_device: 0 });
        Arc::new(Self {
            allocation: Mutex::new(Allocation {
                next: max_persisted + 1,
                in_flight: BTreeSet::new(),
                max_committed: max_persisted,
            }),
            positions,
        })
    }

    /// Reserves the next position. Dropping the guard (after the commit, or on failure)
    /// releases it.
    pub fn allocate(self: &Arc<Self>) -> StreamGuard {
        let mut a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
        let position = a.next;
        a.next += 1;
        a.in_flight.insert(position);
        StreamGuard { streams: self.clone(), position, committed: false }
    }

    fn finish(&self, position: i64, committed: bool) {
        let visible = {
            let mut a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
            a.in_flight.remove(&position);
            if committed {
                a.max_committed = a.max_committed.max(position);
            }
            let below_in_flight = match a.in_flight.first() {
                Some(first) => first - 1,
                None => a.next - 1,
            };
            below_in_flight.min(a.max_committed)
        };
        self.positions.send_if_modified(|p| {
            if visible > p.stream {
                p.stream = visible;
                true
            } else {
                false
            }
        });
    }

    /// Marks a change in typing notifications.
    pub fn bump_typing(&self) -> u64 {
        let mut now = 0;
        self.positions.send_modify(|p| {
            p.typing += 1;
            now = p.typing;
        });
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

/// A reserved stream position. Call [`StreamGuard::commit`] once the write that uses it is
/// committed; dropping it uncommitted (the write failed) leaves a gap readers skip.
pub struct StreamGuard {
    streams: Arc<Streams>,
    position: i64,
    committed: bool,
}

impl StreamGuard {
    pub fn position(&self) -> i64 {
        self.position
    }

    /// The write is committed: readers may see this position (once everything below it
    /// is finished too).
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.finish(self.position, self.committed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_become_visible_in_order() {
        let streams = Streams::new(10);
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
        let streams = Streams::new(10);
        let a = streams.allocate();
        drop(a);
        assert_eq!(streams.current().stream, 10, "nothing was stored at 11");
        let b = streams.allocate();
        b.commit();
        assert_eq!(streams.current().stream, 12);
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
