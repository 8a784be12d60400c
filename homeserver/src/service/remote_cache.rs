//! Answers of other servers to lookups our clients ask for (a remote profile, alias or room
//! directory), kept for a short while and fetched once however many ask at the same time.
//!
//! Anyone signed in may ask us about any server; without this, a thousand requests for the
//! same remote profile are a thousand outbound requests, each buffering its answer. A lookup
//! that fails (unreachable, bad answer) is not kept: the next asker tries again, unless the
//! server was marked unreachable (see `Federation::require_reachable`). A "not found" is an
//! answer and is kept like any other.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::OnceCell;

use crate::error::Result;

/// How long an answer is reused.
pub const TTL: Duration = Duration::from_secs(60);
/// Lookups kept per kind; past this, expired ones are dropped, and if all are fresh the cache
/// starts over (an attacker asking about many users only costs them their own hits).
pub const CAPACITY: usize = 10_000;

struct Slot<V> {
    born: Instant,
    value: OnceCell<V>,
}

pub struct RemoteCache<K, V> {
    ttl: Duration,
    capacity: usize,
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> RemoteCache<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, slots: Mutex::new(HashMap::new()) }
    }

    /// The kept answer for `key`, or the one `fetch` brings: callers arriving while a fetch
    /// for the same key is under way wait for it instead of starting their own.
    pub async fn get_or_fetch<F, Fut>(&self, key: &K, fetch: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        let slot = self.slot(key);
        slot.value.get_or_try_init(fetch).await.cloned()
    }

    fn slot(&self, key: &K) -> Arc<Slot<V>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(slot) = slots.get(key)
            && now.duration_since(slot.born) < self.ttl
        {
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            slots.retain(|_, slot| now.duration_since(slot.born) < self.ttl);
            if slots.len() >= self.capacity {
                slots.clear();
            }
        }
        let slot = Arc::new(Slot { born: now, value: OnceCell::new() });
        slots.insert(key.clone(), slot.clone());
        slot
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::error::Error;

    #[tokio::test]
    async fn concurrent_lookups_fetch_once_and_failures_are_not_kept() {
        let cache: RemoteCache<&str, u32> = RemoteCache::new(TTL, CAPACITY);
        let fetches = AtomicUsize::new(0);
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate_rx.clone();
            // Every caller is waiting on the same fetch before it finishes.
            gate.wait_for(|open| *open).await.ok();
            Ok(7)
        };
        let waiters = futures_util::future::join_all((0..10).map(|_| cache.get_or_fetch(&"a", fetch)));
        let opener = async {
            tokio::task::yield_now().await;
            gate_tx.send(true).ok();
        };
        let (answers, ()) = tokio::join!(waiters, opener);
        assert!(answers.iter().all(|a| matches!(a, Ok(7))));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        let failing: RemoteCache<&str, u32> = RemoteCache::new(TTL, CAPACITY);
        assert!(failing.get_or_fetch(&"b", || async { Err(Error::RemoteUnavailable("down".into())) }).await.is_err());
        assert_eq!(failing.get_or_fetch(&"b", || async { Ok(1) }).await.ok(), Some(1));
    }

    #[tokio::test]
    async fn the_cache_stays_bounded() {
        let cache: RemoteCache<u32, u32> = RemoteCache::new(TTL, 4);
        for key in 0..100 {
            cache.get_or_fetch(&key, || async move { Ok(key) }).await.unwrap();
        }
        assert!(cache.slots.lock().unwrap().len() <= 4);
    }
}
