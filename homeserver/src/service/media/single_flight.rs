//! Identical concurrent work done once: the first caller for a key runs it, callers arriving
//! while it runs wait for its result instead of repeating it (a thumbnail many clients ask
//! for at once, remote media many clients download at once).

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::sync::OnceCell;

use crate::error::Error;

/// A result shared by every caller of one run. [`Error`] is not `Clone`: callers get a copy
/// made by [`unshare`].
pub type Shared<T> = Result<T, Arc<Error>>;

/// The work in flight, by key.
pub struct SingleFlight<K, V> {
    running: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self { running: Mutex::new(HashMap::new()) }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// Runs `work` for `key`, or waits for the run already under way and returns its result.
    /// If the caller running it goes away (its request is dropped), one of the waiters runs
    /// it instead. The key is forgotten once a result is there: later callers run again
    /// (the work itself looks for a kept result first).
    pub async fn run<F, Fut>(&self, key: K, work: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        // Every clone and drop of a run's `Arc` happens under the map's lock (see `Leave`), so
        // its count says how many callers are there.
        let cell = self.running.lock().expect("single flight map").entry(key.clone()).or_default().clone();
        let leave = Leave { flights: self, key, cell: Some(cell) };
        leave.cell.as_ref().expect("set until dropped").get_or_init(work).await.clone()
    }

    /// Runs in flight now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.running.lock().expect("single flight map").len()
    }
}

/// Forgets the key when a caller leaves (done or dropped) and no other caller is left
/// waiting, or a result is there: so neither finished runs nor runs every caller gave up on
/// stay in the map.
struct Leave<'a, K: Eq + Hash, V> {
    flights: &'a SingleFlight<K, V>,
    key: K,
    cell: Option<Arc<OnceCell<V>>>,
}

impl<K: Eq + Hash, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        let mut running = self.flights.running.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cell) = self.cell.take() else { return };
        if !running.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            return;
        }
        let done = cell.initialized();
        drop(cell);
        // Held by the map only: no other caller waits for it.
        let alone = running.get(&self.key).is_some_and(|c| Arc::strong_count(c) == 1);
        if done || alone {
            running.remove(&self.key);
        }
    }
}

/// A caller's own copy of a shared error: the same Matrix error for what a client may see,
/// an internal error (logged, never sent) for the rest.
pub fn unshare(error: Arc<Error>) -> Error {
    match &*error {
        Error::NotFound(m) => Error::NotFound(m.clone()),
        Error::Forbidden(m) => Error::Forbidden(m.clone()),
        Error::Unknown(m) => Error::Unknown(m.clone()),
        Error::TooLarge { limit } => Error::TooLarge { limit: *limit },
        Error::RemoteTooLarge { limit } => Error::RemoteTooLarge { limit: *limit },
        Error::RemoteUnavailable(m) => Error::RemoteUnavailable(m.clone()),
        Error::NotYetUploaded(m) => Error::NotYetUploaded(m.clone()),
        Error::LimitExceeded { retry_after } => Error::LimitExceeded { retry_after: *retry_after },
        other => Error::internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights = Arc::new(SingleFlight::<&str, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (flights, runs, gate) = (flights.clone(), runs.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run("k", || async move {
                        let _ = gate.acquire().await;
                        runs.fetch_add(1, Ordering::SeqCst) + 10
                    })
                    .await
            }));
        }
        while flights.len() == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(5);
        for task in tasks {
            assert_eq!(task.await.unwrap(), 10);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);
        // Afterwards a new caller runs again.
        assert_eq!(flights.run("k", || async { 7 }).await, 7);
    }

    #[tokio::test]
    async fn a_waiter_takes_over_from_a_cancelled_caller() {
        let flights = Arc::new(SingleFlight::<&str, usize>::default());
        let first = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", std::future::pending::<usize>).await })
        };
        while flights.len() == 0 {
            tokio::task::yield_now().await;
        }
        first.abort();
        let _ = first.await;
        // Nobody waited for it: it is forgotten.
        assert_eq!(flights.len(), 0);
        assert_eq!(flights.run("k", || async { 3 }).await, 3);
        assert_eq!(flights.len(), 0);
    }
}
