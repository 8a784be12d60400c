//! One class's token buckets, keyed by a hash of what they limit, in bounded memory.
//!
//! Written here rather than with `governor`: a failed-attempts limit must be read without
//! taking from it (refuse a password guess *before* checking it, count it only when it
//! fails), and the table must stay bounded however many addresses or ids an attacker
//! rotates through, neither of which `governor`'s keyed limiter offers.
//!
//! A bucket is a level that drains at `per_second` and may hold `burst` actions (Synapse's
//! leaky bucket). A bucket that has drained to empty is indistinguishable from a missing
//! one, so dropping it loses nothing. Keys are stored as 64-bit SipHash values under a key
//! random per process: a fixed-size entry whatever the id's length, and collisions an
//! attacker cannot aim for.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::config::RateLimit;

/// How often a full table may be swept for drained buckets while it stays full: a sweep
/// walks the whole table, and an attacker keeping it full must not make every request pay
/// for one.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

pub struct Buckets {
    per_second: f64,
    burst: f64,
    max_keys: usize,
    hasher: RandomState,
    state: Mutex<State>,
}

pub struct State {
    buckets: HashMap<u64, Bucket>,
    /// Shared by every key that arrives while the table is full of non-empty buckets:
    /// memory stays bounded and those keys are still limited, together.
    overflow: Option<Bucket>,
    last_sweep: Option<Instant>,
}

/// A bucket chosen and locked: what a check found, to take from afterwards.
pub struct Slot<'a> {
    owner: &'a Buckets,
    state: MutexGuard<'a, State>,
    key: Option<u64>,
    level: f64,
}

impl Buckets {
    pub fn new(limit: RateLimit, max_keys: usize) -> Self {
        Self {
            per_second: limit.per_second,
            burst: f64::from(limit.burst_count),
            max_keys: max_keys.max(1),
            hasher: RandomState::new(),
            state: Mutex::new(State { buckets: HashMap::new(), overflow: None, last_sweep: None }),
        }
    }

    fn drained(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.level - elapsed * self.per_second).max(0.0)
    }

    /// Locks the table and finds `key`'s bucket (or the overflow bucket when the table is
    /// full and `key` has none).
    pub fn slot(&self, key: impl Hash, now: Instant) -> Slot<'_> {
        let hash = self.hasher.hash_one(key);
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(bucket) = state.buckets.get(&hash).copied() {
            let level = self.drained(bucket, now);
            return Slot { owner: self, state, key: Some(hash), level };
        }
        if state.buckets.len() >= self.max_keys && state.last_sweep.is_none_or(|t| now - t >= SWEEP_INTERVAL) {
            self.sweep(&mut state, now);
        }
        if state.buckets.len() < self.max_keys {
            return Slot { owner: self, state, key: Some(hash), level: 0.0 };
        }
        let level = state.overflow.map_or(0.0, |b| self.drained(b, now));
        Slot { owner: self, state, key: None, level }
    }

    fn sweep(&self, state: &mut State, now: Instant) {
        state.buckets.retain(|_, bucket| self.drained(*bucket, now) > 0.0);
        state.last_sweep = Some(now);
    }

    /// Drops every drained bucket and gives the memory back.
    pub fn forget_idle(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.sweep(&mut state, now);
        state.buckets.shrink_to_fit();
        if state.overflow.is_some_and(|b| self.drained(b, now) == 0.0) {
            state.overflow = None;
        }
    }

    /// Buckets held (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).buckets.len()
    }
}

impl Slot<'_> {
    /// How long until one more action fits, if it does not fit now.
    pub fn wait(&self) -> Option<Duration> {
        let over = self.level + 1.0 - self.owner.burst;
        (over > 0.0).then(|| Duration::from_secs_f64(over / self.owner.per_second).max(Duration::from_millis(1)))
    }

    /// Counts one action (whether or not it fitted: callers check [`Slot::wait`] first).
    pub fn take(mut self, now: Instant) {
        let bucket = Bucket { level: (self.level + 1.0).min(self.owner.burst), at: now };
        match self.key {
            Some(key) => {
                self.state.buckets.insert(key, bucket);
            }
            None => self.state.overflow = Some(bucket),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: f64, burst_count: u32) -> RateLimit {
        RateLimit { per_second, burst_count }
    }

    fn try_take(b: &Buckets, key: &str, now: Instant) -> Result<(), Duration> {
        let slot = b.slot(key, now);
        if let Some(wait) = slot.wait() {
            return Err(wait);
        }
        slot.take(now);
        Ok(())
    }

    #[test]
    fn burst_then_the_rate() {
        let b = Buckets::new(limit(0.5, 3), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            try_take(&b, "a", t0).unwrap();
        }
        // One action drains in 2 s.
        assert_eq!(try_take(&b, "a", t0).unwrap_err(), Duration::from_secs(2));
        assert_eq!(try_take(&b, "a", t0 + Duration::from_millis(500)).unwrap_err(), Duration::from_millis(1500));
        // Another key has its own bucket.
        try_take(&b, "b", t0).unwrap();
        try_take(&b, "a", t0 + Duration::from_secs(2)).unwrap();
        assert!(try_take(&b, "a", t0 + Duration::from_secs(2)).is_err());
    }

    #[test]
    fn rotating_keys_cannot_grow_the_table() {
        let b = Buckets::new(limit(0.001, 2), 50);
        let t0 = Instant::now();
        for i in 0..10_000 {
            let _ = try_take(&b, &format!("attacker-{i}"), t0);
        }
        assert_eq!(b.len(), 50);
        // Keys beyond the table share one bucket: still limited, together.
        assert!(try_take(&b, "one-more", t0).is_err());
        // A key that had a bucket before the flood keeps it.
        let b = Buckets::new(limit(0.001, 2), 50);
        try_take(&b, "alice", t0).unwrap();
        for i in 0..10_000 {
            let _ = try_take(&b, &format!("attacker-{i}"), t0);
        }
        try_take(&b, "alice", t0).unwrap();
        assert!(try_take(&b, "alice", t0).is_err());
    }

    #[test]
    fn drained_buckets_are_forgotten() {
        let b = Buckets::new(limit(10.0, 5), 1000);
        let t0 = Instant::now();
        for i in 0..100 {
            try_take(&b, &format!("k{i}"), t0).unwrap();
        }
        assert_eq!(b.len(), 100);
        b.forget_idle(t0 + Duration::from_millis(50));
        assert_eq!(b.len(), 100, "not drained yet");
        b.forget_idle(t0 + Duration::from_millis(150));
        assert_eq!(b.len(), 0);
        // A full table makes room from drained buckets before it overflows.
        let b = Buckets::new(limit(10.0, 5), 10);
        for i in 0..10 {
            try_take(&b, &format!("k{i}"), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(1);
        try_take(&b, "new", later).unwrap();
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn a_peek_takes_nothing() {
        let b = Buckets::new(limit(0.001, 1), 10);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(b.slot("a", t0).wait().is_none());
        }
        b.slot("a", t0).take(t0);
        assert!(b.slot("a", t0).wait().is_some());
    }
}
