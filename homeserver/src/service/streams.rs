//! Stream positions and waking long-polling syncs.
//!
//! Events, account data and receipts take their positions from one server-wide sequence.
//! Writers in different rooms run in parallel, so position 11 may commit before position 10;
//! a reader must never skip 10. Positions are therefore handed out here and only become
//! visible to readers once every smaller position has finished (committed or failed): the
//! visible position is the highest one below which nothing is in flight.
//!
//! Typing notifications are in memory and have their own counter. A sync token carries both
//! (`s<stream>_<typing>`); later streams (to-device, device lists, presence) add components.

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
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}_{}", self.stream, self.typing)
    }
}

impl Positions {
    /// Parses a sync or pagination token: `s<stream>_<typing>` or `s<stream>`.
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.strip_prefix('s')?;
        let mut parts = rest.split('_');
        let stream = parts.next()?.parse().ok().filter(|s: &i64| *s >= 0)?;
        let typing = match parts.next() {
            Some(t) => t.parse().ok()?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self { stream, typing })
    }
}

struct Allocation {
    next: i64,
    in_flight: BTreeSet<i64>,
}

/// Hands out stream positions and publishes what readers may see.
pub struct Streams {
    allocation: Mutex<Allocation>,
    positions: watch::Sender<Positions>,
}

impl Streams {
    /// Starts after `max_persisted`, the highest position in the database.
    pub fn new(max_persisted: i64) -> Arc<Self> {
        let (positions, _) = watch::channel(Positions { stream: max_persisted, typing: 0 });
        Arc::new(Self {
            allocation: Mutex::new(Allocation { next: max_persisted + 1, in_flight: BTreeSet::new() }),
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
        StreamGuard { streams: self.clone(), position }
    }

    fn finish(&self, position: i64) {
        let visible = {
            let mut a = self.allocation.lock().unwrap_or_else(|e| e.into_inner());
            a.in_flight.remove(&position);
            match a.in_flight.first() {
                Some(first) => first - 1,
                None => a.next - 1,
            }
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

/// A reserved stream position.
pub struct StreamGuard {
    streams: Arc<Streams>,
    position: i64,
}

impl StreamGuard {
    pub fn position(&self) -> i64 {
        self.position
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.finish(self.position);
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
        drop(b);
        assert_eq!(streams.current().stream, 10, "12 is hidden while 11 is in flight");
        drop(a);
        assert_eq!(streams.current().stream, 12);
    }

    #[test]
    fn tokens_round_trip() {
        let p = Positions { stream: 42, typing: 7 };
        assert_eq!(Positions::parse(&p.to_string()), Some(p));
        assert_eq!(Positions::parse("s5"), Some(Positions { stream: 5, typing: 0 }));
        for bad in ["", "s", "x5", "s-1", "s1_2_3", "s1_x"] {
            assert_eq!(Positions::parse(bad), None, "{bad}");
        }
    }
}
