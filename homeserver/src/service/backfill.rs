//! History older than what we hold of a room joined through another server, fetched on
//! demand: when a local client paginates `/messages` past the earliest event we have, the
//! events before it come from a server in the room (`/backfill`), each checked like any
//! received event (signatures, content hash, authorized by its own auth events), and are
//! stored before everything else in the room's stream.

use ruma::events::room::member::MembershipState;
use std::collections::{HashMap, HashSet};

use federation::{
    auth,
    pdu::{Pdu, room_version_rules},
};
use ruma::{EventId, OwnedServerName, RoomId, UserId, api::federation::backfill::get_backfill, events::StateEventType};

use super::inbound::Receiver;
use crate::{error::Result, store::BackfilledEvent};

/// Most events asked for in one `/backfill`.
const MAX_BACKFILL: usize = 100;
/// Most servers tried for one page.
const SERVERS_TRIED: usize = 3;
/// Events at the start of a room's stream searched for a gap.
const EXTREMITY_SCAN: i64 = 2_000;

impl Receiver {
    /// Fetches up to `limit` events from before the gap in the room's history we hold (see
    /// [`Services::backward_extremity`]) and stores those that verify and are authorized;
    /// returns how many were stored (0 when there is no gap, when no other server is in the
    /// room, or none answers).
    pub async fn backfill_older(&self, room_id: &RoomId, limit: usize) -> Result<usize> {
        let s = self.hub.services();
        let Some(from) = self.backward_extremity(room_id).await? else { return Ok(0) };
        let version = s.rooms.version(room_id.as_str()).await?;
        let rules = room_version_rules(&version).map_err(|e| crate::error::Error::internal(e.to_string()))?;
        let limit = ruma::UInt::try_from(limit.clamp(1, MAX_BACKFILL) as u64 + 1).unwrap_or_default();

        // The event's sender's server first (it had the event), then the others in the room.
        let mut servers: Vec<OwnedServerName> = Vec::new();
        let senders = std::iter::once(from.sender.to_string())
            .chain(s.store.room_members(room_id.as_str(), &MembershipState::Join).await?);
        for user in senders {
            if let Ok(user) = UserId::parse(user.as_str())
                && user.server_name() != s.settings.server_name
                && !servers.iter().any(|s| s == user.server_name())
            {
                servers.push(user.server_name().to_owned());
            }
        }
        for server in servers.into_iter().take(SERVERS_TRIED) {
            let request = get_backfill::v1::Request::new(room_id.to_owned(), vec![from.event_id.clone()], limit);
            let response = match s.fed.send(&server, request).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(%room_id, %server, error = %e, "backfill failed");
                    continue;
                }
            };
            if response.pdus.len() as u64 > u64::from(limit) {
                // An honest server answers with at most what was asked for.
                tracing::info!(%room_id, %server, events = response.pdus.len(), "dropped a backfill answer longer than asked");
                continue;
            }
            let mut verified = Vec::new();
            for raw in &response.pdus {
                match self.verify_pdu(raw, &version).await {
                    Ok(event) if event.pdu.room_id.as_deref() == Some(room_id) => verified.push(event),
                    Ok(_) => {}
                    Err(e) => tracing::info!(%room_id, error = %e, "dropped a backfilled event"),
                }
            }
            // Oldest first, so that an event whose auth events arrived in the same batch
            // finds them already checked.
            verified.sort_by_key(|e| (e.pdu.depth, e.pdu.origin_server_ts));
            let batch: HashMap<_, _> = verified.iter().map(|e| (e.event_id.clone(), e.pdu.clone())).collect();
            let create = s.room_cache.state_event(room_id, "m.room.create", "").await?;
            let mut accepted: Vec<BackfilledEvent> = Vec::new();
            for event in &verified {
                let pdu = &event.pdu;
                if pdu.auth_events.iter().any(|id| !accepted.iter().any(|a| a.event_id == id.as_str())) {
                    self.fetch_missing_auth_events(&server, room_id, &version, pdu).await;
                }
                let mut auth_events = self.auth_events_of(pdu).await?;
                for id in &pdu.auth_events {
                    if let Some(p) = batch.get(id)
                        && accepted.iter().any(|a| a.event_id == id.as_str())
                    {
                        auth_events.entry(id.clone()).or_insert_with(|| p.clone());
                    }
                }
                if rules.authorization.room_create_event_id_as_room_id
                    && let Some(create) = &create
                    && let Ok(id) = EventId::parse(create.event_id.as_str())
                    && let Ok(create) = Pdu::from_json(id.clone(), &create.json)
                {
                    auth_events.insert(id, create);
                }
                let auth_state: HashMap<(StateEventType, String), Pdu> = auth_events
                    .values()
                    .filter_map(|e| e.state_key.clone().map(|k| ((e.kind.to_string().into(), k), e.clone())))
                    .collect();
                if let Err(reason) = auth::authorize(&rules.authorization, pdu, &auth_events, &auth_state) {
                    tracing::info!(event_id = %event.event_id, %reason, "refused a backfilled event");
                    continue;
                }
                accepted.push(BackfilledEvent {
                    event_id: event.event_id.to_string(),
                    depth: i64::try_from(u64::from(pdu.depth)).unwrap_or(i64::MAX),
                    event_type: pdu.kind.to_string(),
                    state_key: pdu.state_key.clone(),
                    sender: pdu.sender.to_string(),
                    origin_server_ts: i64::try_from(u64::from(pdu.origin_server_ts.0)).unwrap_or(0),
                    json: event.json.clone(),
                });
            }
            accepted.reverse();
            let stored = s.store.insert_backfilled_events(room_id.as_str(), &accepted).await?;
            tracing::info!(%room_id, %server, stored, "backfilled older history");
            return Ok(stored);
        }
        Ok(0)
    }

    /// Where the room's history we hold has a gap behind it: the event earliest in our
    /// stream order of which some `prev_events` are not among our timeline events. Only the
    /// start of the room's stream is looked at (the state a join brought, the history
    /// fetched with it, and what was backfilled since), which is where such events are.
    async fn backward_extremity(&self, room_id: &RoomId) -> Result<Option<Pdu>> {
        let s = self.hub.services();
        let rows = s.store.room_events(room_id.as_str(), i64::MIN, i64::MAX, EXTREMITY_SCAN, false).await?;
        let held: HashSet<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        for row in &rows {
            let Ok(id) = EventId::parse(row.event_id.as_str()) else { continue };
            let Ok(pdu) = Pdu::from_json(id, &row.json) else { continue };
            let unknown: Vec<String> =
                pdu.prev_events.iter().filter(|p| !held.contains(p.as_str())).map(|p| p.to_string()).collect();
            if unknown.is_empty() {
                continue;
            }
            let found = s.store.events_by_id(&unknown).await?;
            if found.len() < unknown.len() {
                return Ok(Some(pdu));
            }
        }
        Ok(None)
    }
}
