//! Incoming `/send` transactions, bounded and answered quickly (issue 19, federation input
//! caps). One transaction at a time per origin, as the spec has senders send them: a second
//! one meanwhile waits its turn, up to [`TURN_WAIT`], and is then answered 429. Each PDU is checked at once (size of its
//! references, signatures, the room's ACL); one whose `prev_events` and auth events we all
//! hold, in a room with nothing queued, is taken in at once; the others need events fetched
//! from other servers, which can take minutes, so they are queued per room in the database
//! (`federation_inbound_pdus`, durable with the transaction's record) and worked through in
//! order by a background task per room. `/send` waits for them up to
//! `federation.inbound_wait_secs` (so the usual answer still says what became of each PDU)
//! and then answers; a restart carries on with what is left.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, ServerName};
use serde_json::value::RawValue as RawJsonValue;
use tokio::sync::{Semaphore, oneshot};

use super::{
    Hub,
    received::{Accepted, room_id_of},
};
use crate::{
    error::{Error, Result},
    store::{InboundPdu, now_ms},
};

/// Most PDUs waiting in one room's queue: beyond, a PDU that needs events fetched is refused
/// (its sender may send it again later), so no server can fill our disk through one room.
pub const MAX_QUEUED_PER_ROOM: i64 = 1000;
/// How long a transaction waits while another of its origin is worked on, before 429.
pub const TURN_WAIT: Duration = Duration::from_secs(15);
/// Rooms whose queues are worked on at once (each works one PDU at a time, in order).
const ROOM_WORKERS: usize = 4;

/// What became of a queued PDU: taken in (or known), or why not.
pub type Verdict = std::result::Result<(), String>;

/// A PDU of a transaction, checked.
pub enum Received {
    /// Decided now.
    Done(OwnedEventId, Accepted),
    /// Queued; the verdict comes when the room's worker gets to it.
    Queued(OwnedEventId, oneshot::Receiver<Verdict>),
}

/// The federation receiver: `/send` transactions (this module), the PDUs and EDUs in them
/// (`service::received`), and history fetched on demand (`service::backfill`). Its state is
/// the bookkeeping of the inbound queue in memory; the queue itself is a table.
pub struct Receiver {
    pub(super) hub: Hub,
    /// Origins with a transaction being worked on.
    origins: Mutex<HashSet<OwnedServerName>>,
    /// Told whenever an origin's turn ends.
    turn_over: tokio::sync::Notify,
    /// Rooms whose queue a worker is going through.
    rooms: Mutex<HashSet<OwnedRoomId>>,
    /// The `/send` requests waiting for a queued PDU's verdict, by event id.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Verdict>>>>,
    workers: Arc<Semaphore>,
}

impl Receiver {
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            origins: Mutex::default(),
            turn_over: tokio::sync::Notify::new(),
            rooms: Mutex::default(),
            waiters: Mutex::default(),
            workers: Arc::new(Semaphore::new(ROOM_WORKERS)),
        }
    }
}

/// An origin's turn: while held, its other transactions are refused.
pub struct OriginTurn<'a> {
    receiver: &'a Receiver,
    origin: OwnedServerName,
}

impl Drop for OriginTurn<'_> {
    fn drop(&mut self) {
        self.receiver.origins.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.origin);
        self.receiver.turn_over.notify_waiters();
    }
}

impl Receiver {
    /// The origin's turn, waiting up to `wait` while another transaction of it is worked
    /// on; `None` if it does not come.
    pub async fn turn(&self, origin: &ServerName, wait: Duration) -> Option<OriginTurn<'_>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Listening before looking, so that a turn ending in between is not missed.
            let over = self.turn_over.notified();
            tokio::pin!(over);
            over.as_mut().enable();
            if self.origins.lock().unwrap_or_else(|e| e.into_inner()).insert(origin.to_owned()) {
                return Some(OriginTurn { receiver: self, origin: origin.to_owned() });
            }
            if tokio::time::timeout_at(deadline, over).await.is_err() {
                return None;
            }
        }
    }

    fn room_busy(&self, room_id: &RoomId) -> bool {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).contains(room_id)
    }

    /// Marks the room as having a worker; false if it had one already.
    fn start_room(&self, room_id: &RoomId) -> bool {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).insert(room_id.to_owned())
    }

    fn stop_room(&self, room_id: &RoomId) {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(room_id);
    }

    fn wait_for(&self, event_id: &str) -> oneshot::Receiver<Verdict> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).entry(event_id.to_owned()).or_default().push(tx);
        rx
    }

    fn decided(&self, event_id: &str, verdict: &Verdict) {
        let waiting = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(event_id);
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(verdict.clone());
        }
    }
}

impl Receiver {
    /// One PDU of a `/send` transaction from `origin` (see the module).
    pub async fn take_pdu(&self, origin: &ServerName, raw: &RawJsonValue) -> Result<Received> {
        let s = self.hub.services();
        let room_id = room_id_of(raw)?;
        if !s.servers.we_are_in(&room_id).await? {
            return Err(Error::Forbidden(format!("this server is not in {room_id}")));
        }
        s.servers.check_acl(&room_id, origin).await?;
        let version = s.rooms.version(room_id.as_str()).await?;
        let event = self.verify_pdu(raw, &version).await?;
        if event.pdu.room_id.as_deref() != Some(&*room_id) {
            return Err(Error::BadJson("room_id mismatch".to_owned()));
        }
        let id = event.event_id.clone();
        // An auth event we hold as an outlier is not "known" here: arriving as a PDU, it
        // goes onto the timeline and into the state like any other.
        if let Some(known) = super::received::known_outcome(&id, &s.store.event_status(id.as_str()).await?)? {
            return Ok(Received::Done(id, known));
        }
        if !self.room_busy(&room_id) && !self.needs_fetching(&event.pdu).await? {
            let accepted = self.accept(&room_id, event, origin, false).await?;
            return Ok(Received::Done(id, accepted));
        }
        if s.store.inbound_pdus_waiting(room_id.as_str()).await? >= MAX_QUEUED_PER_ROOM {
            return Err(Error::LimitExceeded { retry_after: Duration::from_secs(60) });
        }
        let waiter = self.wait_for(id.as_str());
        s.store.queue_inbound_pdus(&[(room_id.as_str(), origin.as_str(), id.as_str(), raw.get())], now_ms()).await?;
        self.work_room_queue(&room_id);
        Ok(Received::Queued(id, waiter))
    }

    /// Whether taking in `pdu` needs events fetched first: prev events that have no place in
    /// the room's graph, or auth events we do not hold.
    async fn needs_fetching(&self, pdu: &federation::pdu::Pdu) -> Result<bool> {
        let s = self.hub.services();
        let prevs: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
        if s.store.events_in_graph(&prevs).await?.len() != prevs.len() {
            return Ok(true);
        }
        let auths: Vec<String> = pdu.auth_events.iter().map(|id| id.to_string()).collect();
        let held: HashSet<String> = s.store.pdus_for_auth(&auths).await?.into_iter().map(|p| p.event_id).collect();
        Ok(auths.iter().any(|id| !held.contains(id)))
    }

    /// Starts the room's worker unless it runs.
    fn work_room_queue(&self, room_id: &RoomId) {
        if self.start_room(room_id) {
            let s = self.hub.services();
            let room_id = room_id.to_owned();
            tokio::spawn(async move { s.receiver.work_room(room_id).await });
        }
    }

    /// Carries on with the PDUs queued before a restart.
    pub async fn resume_queue(&self) {
        let s = self.hub.services();
        match s.store.rooms_with_inbound_pdus().await {
            Ok(rooms) => {
                for room in rooms {
                    if let Ok(room_id) = RoomId::parse(room.as_str()) {
                        self.work_room_queue(&room_id);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the queue of received events"),
        }
    }

    /// Works through the room's queue in order, then stops.
    async fn work_room(&self, room_id: OwnedRoomId) {
        let s = self.hub.services();
        loop {
            let next = match s.store.next_inbound_pdu(room_id.as_str()).await {
                Ok(next) => next,
                Err(e) => {
                    // Left for the next PDU queued in the room, or the next start.
                    tracing::warn!(%room_id, error = %e, "cannot read the room's queue of received events");
                    self.stop_room(&room_id);
                    return;
                }
            };
            let Some(item) = next else {
                self.stop_room(&room_id);
                // A PDU queued between the read and the stop found the worker still running.
                if matches!(s.store.next_inbound_pdu(room_id.as_str()).await, Ok(Some(_))) && self.start_room(&room_id)
                {
                    continue;
                }
                return;
            };
            let verdict = {
                let _turn = self.workers.acquire().await;
                self.work_queued(&item).await
            };
            if let Err(reason) = &verdict {
                tracing::info!(%room_id, event_id = %item.event_id, origin = %item.origin, %reason, "refused a received event");
            }
            if let Err(e) = s.store.drop_inbound_pdu(item.id).await {
                tracing::warn!(%room_id, error = %e, "cannot take a worked event off the queue");
                self.stop_room(&room_id);
                return;
            }
            self.decided(&item.event_id, &verdict);
        }
    }

    /// One queued PDU: its missing prev events and auth events fetched from its origin, then
    /// taken in like any received event.
    async fn work_queued(&self, item: &InboundPdu) -> Verdict {
        let s = self.hub.services();
        let fail = |e: Error| e.to_string();
        let origin = ServerName::parse(item.origin.as_str()).map_err(|e| e.to_string())?;
        let room_id = RoomId::parse(item.room_id.as_str()).map_err(|e| e.to_string())?;
        let raw = RawJsonValue::from_string(item.pdu.clone()).map_err(|e| e.to_string())?;
        let version = s.rooms.version(room_id.as_str()).await.map_err(fail)?;
        // Checked again from the start: the keys are cached by now, and nothing stored is
        // trusted more than what came over the network.
        let event = self.verify_pdu(&raw, &version).await.map_err(fail)?;
        let id = event.event_id.clone();
        let status = s.store.event_status(id.as_str()).await.map_err(|e| e.to_string())?;
        if super::received::known_outcome(&id, &status).map_err(fail)?.is_some() {
            return Ok(());
        }
        self.fetch_missing_prev_events(&origin, &room_id, &version, &event.pdu).await;
        self.fetch_missing_auth_events(&origin, &room_id, &version, &event.pdu).await;
        self.accept(&room_id, event, &origin, false).await.map(|_| ()).map_err(fail)
    }
}
