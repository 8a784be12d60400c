//! Idempotency records kept for a window, then forgotten: client transaction ids (on the
//! events they made, and in `to_device_txns`, which also holds the message ids of to-device
//! EDUs from other servers). Within `transactions.retention_secs` a retried request gets the
//! first answer; after it the same id is a new request. Without this the tables and the
//! unique index on events' transaction ids grow with every message ever sent.
//!
//! The default window is 24 hours, as Synapse keeps its transaction id table (its in-memory
//! response cache keeps 30 minutes): clients retry for longer than minutes (a laptop that
//! slept mid-send, the desktop client's persistent outbox after a restart), and a day of ids
//! is small. Received federation transactions are forgotten after a day too (`server.rs`).

use std::{sync::Arc, time::Duration};

use super::Services;
use crate::store::now_ms;

/// Events cleared per write, so one pass never holds the writer for long.
const EVENT_BATCH: i64 = 1000;

/// Runs for the life of the server: a pass at start, then every `prune_interval_secs`.
pub async fn run(services: Arc<Services>) {
    let config = &services.settings.transactions;
    let mut tick = tokio::time::interval(Duration::from_secs(config.prune_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cutoff = now_ms() - i64::try_from(config.retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if let Err(e) = prune(&services, cutoff).await {
            tracing::warn!(error = %e, "cannot forget old transaction ids");
        }
    }
}

async fn prune(services: &Services, cutoff: i64) -> Result<(), sqlx::Error> {
    let to_device = services.store.forget_to_device_txns(cutoff).await?;
    let mut events = 0;
    loop {
        let cleared = services.store.forget_event_txns(cutoff, EVENT_BATCH).await?;
        events += cleared;
        if cleared < EVENT_BATCH as u64 {
            break;
        }
        // Let other writers in between batches.
        tokio::task::yield_now().await;
    }
    if to_device + events > 0 {
        tracing::debug!(to_device, events, "forgot old transaction ids");
    }
    Ok(())
}
