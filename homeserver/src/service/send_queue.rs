//! Delivery of our rooms' events to other servers.
//!
//! The queue itself is the `federation_outbox` table: the append that stores an event also
//! queues it for every other server in the room, in the same transaction. This module only
//! drains it: one delivery task per destination sends the oldest queued events as a
//! transaction (`PUT /_matrix/federation/v1/send/{txnId}`, at most 50 PDUs), deletes them once
//! the destination accepted the transaction and goes on until nothing is left. A failed
//! destination waits with exponential backoff; at start every destination with queued events
//! is caught up. Memory stays bounded whatever the queue holds: a batch at a time, and a
//! small entry per destination.
//!
//! A destination that stays unreachable is given up on after `federation.give_up_after_secs`
//! (counted from its first failure, across restarts): its backlog is cut to what it needs to
//! catch up when it returns (see `Store::outbox_trim`), again at every later failure, and it
//! is retried hourly, or at once when it contacts us. So a server that is gone for good costs
//! a row per room, not every event since it left.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedTransactionId, ServerName,
    api::federation::transactions::send_transaction_message, serde::Raw,
};
use serde_json::value::RawValue as RawJsonValue;

use super::{Hub, Services};
use crate::error::{Error, Result};

/// PDUs per transaction (the spec's limit).
const BATCH: i64 = 50;
/// First retry delay after a failure; doubles with every further failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the dispatcher looks again without being woken.
const IDLE_RECHECK: Duration = Duration::from_secs(60);
/// Retry delay for a destination given up on.
const GIVEN_UP_RETRY: Duration = Duration::from_secs(3600);

struct Backoff {
    failures: u32,
    next_try: Instant,
}

/// Delivery to other servers: what is queued for whom, the delivery tasks' bookkeeping.
pub struct SendQueue {
    hub: Hub,
    wake: tokio::sync::Notify,
    /// Destinations with new work since the dispatcher last looked.
    woken: Mutex<HashSet<String>>,
    /// Destinations with a delivery task running.
    busy: Mutex<HashSet<String>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// Destinations failing now, since when (ms; mirrored in the database).
    failing_since: Mutex<HashMap<String, i64>>,
}

impl SendQueue {
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            wake: tokio::sync::Notify::new(),
            woken: Mutex::default(),
            busy: Mutex::default(),
            backoff: Mutex::default(),
            failing_since: Mutex::default(),
        }
    }

    /// Queues an EDU (`{"edu_type": ..., "content": ...}`) for the other servers in a room.
    pub async fn queue_edu(&self, room_id: &ruma::RoomId, edu: serde_json::Value) -> Result<()> {
        let s = self.hub.services();
        let mut destinations: Vec<String> = s
            .store
            .room_members(room_id.as_str(), &MembershipState::Join)
            .await?
            .iter()
            .filter_map(|m| ruma::UserId::parse(m.as_str()).ok())
            .map(|m| m.server_name().to_string())
            .filter(|server| server != s.settings.server_name.as_str())
            .collect();
        destinations.sort();
        destinations.dedup();
        if destinations.is_empty() {
            return Ok(());
        }
        // A position of its own keeps the EDU in order with the room's events.
        let position = s.streams.allocate();
        s.store.enqueue_edu(&destinations, position.position(), &edu.to_string()).await?;
        position.commit_with(Vec::new());
        self.wake(&destinations);
        Ok(())
    }

    /// New events were queued for these destinations (after the commit).
    pub fn wake(&self, destinations: &[String]) {
        self.woken.lock().unwrap_or_else(|e| e.into_inner()).extend(destinations.iter().cloned());
        self.wake.notify_one();
    }

    /// `server` just talked to us: it is up, so retry it now rather than after its backoff.
    pub fn peer_is_up(&self, server: &ServerName) {
        let was_waiting = self.backoff.lock().unwrap_or_else(|e| e.into_inner()).remove(server.as_str()).is_some();
        if was_waiting {
            self.wake(&[server.to_string()]);
        }
    }
}

/// The dispatcher: runs for the life of the server.
impl SendQueue {
    /// Records a failed delivery to `destination`; past the give-up bound, cuts its backlog.
    /// Returns whether it is given up on.
    async fn failed(&self, destination: &str) -> bool {
        let services = self.hub.services();
        let now = crate::store::now_ms();
        let (since, new) = {
            let mut failing = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
            match failing.get(destination) {
                Some(since) => (*since, false),
                None => {
                    failing.insert(destination.to_owned(), now);
                    (now, true)
                }
            }
        };
        if new && let Err(e) = services.store.destination_failing(destination, now).await {
            tracing::warn!(%destination, error = %e, "cannot record a failing federation destination");
        }
        let give_up_ms = i64::try_from(services.settings.federation.give_up_after.as_millis()).unwrap_or(i64::MAX);
        if now.saturating_sub(since) < give_up_ms {
            return false;
        }
        match services.store.outbox_trim(destination).await {
            Ok(dropped) if dropped > 0 => {
                services.metrics.federation_dropped.inc_by(dropped);
                tracing::warn!(%destination, dropped, "destination given up on: its backlog was cut");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%destination, error = %e, "cannot cut a dead destination's backlog"),
        }
        true
    }

    /// `destination` accepted a delivery: it is no longer failing.
    async fn recovered(&self, destination: &str) {
        let services = self.hub.services();
        let was_failing = self.failing_since.lock().unwrap_or_else(|e| e.into_inner()).remove(destination).is_some();
        if was_failing && let Err(e) = services.store.destination_recovered(destination).await {
            tracing::warn!(%destination, error = %e, "cannot record a recovered federation destination");
        }
    }

    fn update_gauges(&self) {
        let services = self.hub.services();
        let now = crate::store::now_ms();
        let give_up_ms = i64::try_from(services.settings.federation.give_up_after.as_millis()).unwrap_or(i64::MAX);
        let failing = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        let given_up = failing.values().filter(|since| now.saturating_sub(**since) >= give_up_ms).count();
        services.metrics.federation_destinations_failing.set(i64::try_from(failing.len()).unwrap_or(i64::MAX));
        services.metrics.federation_destinations_given_up.set(i64::try_from(given_up).unwrap_or(i64::MAX));
    }
}

pub async fn run(services: Arc<Services>) {
    // Catch up every destination that still has queued events (after a restart).
    match services.store.outbox_destinations().await {
        Ok(destinations) => services.send_queue.wake(&destinations),
        Err(e) => tracing::warn!(error = %e, "cannot read the federation send queue"),
    }
    match services.store.failing_destinations().await {
        Ok(failing) => services.send_queue.failing_since.lock().unwrap_or_else(|e| e.into_inner()).extend(failing),
        Err(e) => tracing::warn!(error = %e, "cannot read the failing federation destinations"),
    }
    services.send_queue.update_gauges();
    let queue = &services.send_queue;
    loop {
        let now = Instant::now();
        let ready: Vec<String> = {
            let backoff = queue.backoff.lock().unwrap_or_else(|e| e.into_inner());
            let mut woken = queue.woken.lock().unwrap_or_else(|e| e.into_inner());
            // Destinations whose backoff ended are tried again.
            woken.extend(backoff.iter().filter(|(_, b)| b.next_try <= now).map(|(d, _)| d.clone()));
            let busy = queue.busy.lock().unwrap_or_else(|e| e.into_inner());
            // A busy destination keeps its mark: its task may have read the queue before the
            // new events were committed, so it is looked at again once the task ends. One
            // still backing off is dropped: it is retried when its backoff ends.
            let ready: Vec<String> = woken
                .iter()
                .filter(|d| !busy.contains(*d) && backoff.get(*d).is_none_or(|b| b.next_try <= now))
                .cloned()
                .collect();
            woken.retain(|d| busy.contains(d));
            ready
        };
        for destination in ready {
            queue.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(destination.clone());
            let services = services.clone();
            tokio::spawn(async move {
                let result = services.send_queue.deliver(&destination).await;
                let queue = &services.send_queue;
                match result {
                    Ok(()) => {
                        queue.backoff.lock().unwrap_or_else(|e| e.into_inner()).remove(&destination);
                        queue.recovered(&destination).await;
                    }
                    Err(e) => {
                        let given_up = queue.failed(&destination).await;
                        let mut backoff = queue.backoff.lock().unwrap_or_else(|e| e.into_inner());
                        let failures = backoff.get(&destination).map_or(0, |b| b.failures) + 1;
                        let delay = if given_up {
                            GIVEN_UP_RETRY
                        } else {
                            FIRST_BACKOFF.saturating_mul(1 << (failures - 1).min(16)).min(MAX_BACKOFF)
                        };
                        tracing::info!(%destination, error = %e, retry_in = ?delay, given_up, "federation delivery failed");
                        backoff.insert(destination.clone(), Backoff { failures, next_try: Instant::now() + delay });
                    }
                }
                queue.update_gauges();
                queue.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&destination);
                queue.wake.notify_one();
            });
        }
        let next_retry = {
            let backoff = queue.backoff.lock().unwrap_or_else(|e| e.into_inner());
            backoff.values().map(|b| b.next_try).filter(|t| *t > now).min()
        };
        let wait =
            next_retry.map(|t| t.saturating_duration_since(Instant::now())).unwrap_or(IDLE_RECHECK).min(IDLE_RECHECK);
        tokio::select! {
            () = queue.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

impl SendQueue {
    /// Sends everything queued for `destination`, a batch per transaction, oldest first.
    async fn deliver(&self, destination: &str) -> Result<()> {
        let services = self.hub.services();
        let server = ServerName::parse(destination).map_err(|e| Error::internal(format!("queued destination: {e}")))?;
        loop {
            let batch = services.store.outbox_batch(destination, BATCH).await?;
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                return Ok(());
            };
            // The same events give the same transaction id, so a retry after a lost answer is
            // recognised by the destination.
            let txn_id = OwnedTransactionId::from(format!("obmin{}-{}", first.stream_ordering, last.stream_ordering));
            let upto = last.stream_ordering;
            let mut pdus = Vec::new();
            let mut edus = Vec::new();
            for row in &batch {
                if let Some(json) = &row.pdu_json {
                    let id = row.event_id.as_deref().unwrap_or_default();
                    pdus.push(
                        RawJsonValue::from_string(json.clone())
                            .map_err(|e| Error::internal(format!("stored event {id}: {e}")))?,
                    );
                } else if let Some(json) = &row.edu_json {
                    edus.push(Raw::from_json(
                        RawJsonValue::from_string(json.clone())
                            .map_err(|e| Error::internal(format!("queued EDU: {e}")))?,
                    ));
                }
            }
            let mut request = send_transaction_message::v1::Request::new(
                txn_id,
                services.settings.server_name.clone(),
                MilliSecondsSinceUnixEpoch::now(),
            );
            request.pdus = pdus;
            request.edus = edus;
            let response = services.fed.send(&server, request).await?;
            for (event_id, result) in &response.pdus {
                if let Err(reason) = result {
                    // The destination refused one event; resending would not change its mind.
                    tracing::info!(%destination, %event_id, %reason, "destination refused an event");
                }
            }
            services.store.outbox_delivered(destination, upto).await?;
            tracing::debug!(%destination, events = batch.len(), "federation transaction delivered");
        }
    }
}
