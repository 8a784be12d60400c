//! Waiting for a condition in tests: poll with a generous bound, never assert on durations.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// How long any condition may take before the test fails. Generous on purpose: a loaded CI
/// machine is slow, and a wait that ends early costs nothing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls until `check` holds (or panics after [`PATIENCE`], naming `what`).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls until `check` gives a value (or panics after [`PATIENCE`], naming `what`).
pub async fn eventually_some<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
