//! A small read-through cache for values only this process changes, safe against reads
//! that race with invalidations.
//!
//! A reader takes [`Cache::generation`] before it reads the database and offers the value
//! with [`Cache::insert_if_unchanged`]; a writer calls [`Cache::forget`] after its commit.
//! Every `forget` bumps the generation, so a value read before a concurrent write committed
//! is never stored after that write forgot the key.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

pub struct Cache<K, V> {
    generation: AtomicU64,
    map: Mutex<HashMap<K, V>>,
    /// Entries kept; past this the cache starts over (cheap, and it bounds memory).
    capacity: usize,
}

impl<K: Hash + Eq, V: Clone> Cache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { generation: AtomicU64::new(0), map: Mutex::new(HashMap::new()), capacity }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.map().get(key).cloned()
    }

    /// Take this before reading the value from the database.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Stores a value read since `generation`, unless something was forgotten meanwhile.
    pub fn insert_if_unchanged(&self, key: K, value: V, generation: u64) {
        let mut map = self.map();
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(key, value);
    }

    /// Drops a key after a committed change to it.
    pub fn forget(&self, key: &K) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_with_a_forget_is_not_kept() {
        let cache: Cache<&str, i32> = Cache::new(10);
        let generation = cache.generation();
        cache.forget(&"k");
        cache.insert_if_unchanged("k", 1, generation);
        assert_eq!(cache.get(&"k"), None);
        let generation = cache.generation();
        cache.insert_if_unchanged("k", 2, generation);
        assert_eq!(cache.get(&"k"), Some(2));
    }

    #[test]
    fn capacity_bounds_the_map() {
        let cache: Cache<i32, i32> = Cache::new(2);
        for i in 0..5 {
            cache.insert_if_unchanged(i, i, cache.generation());
        }
        assert!(cache.map().len() <= 2);
    }
}
