//! Events other servers send us: checked as the spec's checks on receipt of a PDU say
//! (signatures and content hash with the sender's cached server keys; authorized by the
//! event's own auth events, then by the state before it, else rejected; then by the current
//! state, else soft-failed) and stored through the same per-room append path as our own
//! events, so the room cache, the send queue and the syncs see them exactly like local ones.
//! Auth events we lack are fetched and authorized in turn; where the event's prev events are
//! missing, the state at them is asked for and resolved with what we know.

use ruma::events::room::member::MembershipState;
use std::collections::{BTreeMap, HashMap, HashSet};

use federation::{
    auth,
    pdu::{Pdu, room_version_rules, signing_keys_needed, verify_received},
};
use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, ServerName, UInt,
    api::federation::event::{get_event, get_missing_events, get_room_state_ids},
    serde::Base64,
    signatures::PublicKeyMap,
};
use serde_json::value::RawValue as RawJsonValue;

use super::{inbound::Receiver, timeline::BuiltEvent};
use crate::{
    error::{Error, Result},
    store::{CurrentGroup, EventStateGroups, EventStatus, GroupBase, NewOutlier, NewStateGroup, StateIds, now_ms},
};

/// Most events asked for in one `get_missing_events` request.
const MISSING_EVENTS_LIMIT: u32 = 20;
/// Most `get_missing_events` requests to close one gap: a peer catching us up after a long
/// outage (Synapse then sends only the newest event of each room) can leave a gap larger than
/// one answer, so we ask again from the oldest events we got, up to this many times.
const MISSING_EVENTS_ROUNDS: usize = 10;
/// Most events fetched for the auth chain of one received event (each with `/event`).
const MAX_AUTH_EVENTS_FETCHED: usize = 100;
/// Most prev events of one received event whose state we ask for.
const MAX_PREV_STATES_FETCHED: usize = 3;
/// Most state events one `/state_ids` answer may name.
const MAX_STATE_IDS: usize = 20_000;
/// Most events fetched for the state at one prev event (those we lack, with their auth
/// chains).
const MAX_STATE_EVENTS_FETCHED: usize = 500;

/// What a stored event's status means for an event arriving again: `Some` when it is not
/// to be taken in again (already on the timeline or soft-failed; rejected is an error).
pub(crate) fn known_outcome(event_id: &EventId, status: &EventStatus) -> Result<Option<Accepted>> {
    match status {
        EventStatus::Timeline => Ok(Some(Accepted::Known)),
        EventStatus::Outlier { rejection: Some(reason), .. } => {
            Err(Error::Forbidden(format!("{event_id} was rejected: {reason}")))
        }
        EventStatus::Outlier { soft_failed: true, .. } => Ok(Some(Accepted::Known)),
        EventStatus::Outlier { .. } | EventStatus::Unknown => Ok(None),
    }
}

/// Most `prev_events` of a received event (the spec's limit): more are refused before
/// anything is fetched for them.
pub const MAX_PREV_EVENTS: usize = 20;
/// Most `auth_events` of a received event (the spec's limit).
pub const MAX_AUTH_EVENTS: usize = 10;

/// Refuses an event naming more `prev_events` or `auth_events` than the spec allows, before
/// its signatures are checked or anything it names is looked for.
fn check_references(raw: &RawJsonValue) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct References {
        #[serde(default)]
        prev_events: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        auth_events: Vec<serde::de::IgnoredAny>,
    }
    let refs: References =
        serde_json::from_str(raw.get()).map_err(|e| Error::BadJson(format!("not a valid event: {e}")))?;
    if refs.prev_events.len() > MAX_PREV_EVENTS {
        return Err(Error::BadJson(format!("more than {MAX_PREV_EVENTS} prev_events")));
    }
    if refs.auth_events.len() > MAX_AUTH_EVENTS {
        return Err(Error::BadJson(format!("more than {MAX_AUTH_EVENTS} auth_events")));
    }
    Ok(())
}

/// A received event whose signatures and hashes verified.
pub struct VerifiedEvent {
    pub event_id: OwnedEventId,
    pub object: CanonicalJsonObject,
    pub json: String,
    pub pdu: Pdu,
}

/// What became of a received event.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Stored on the timeline.
    Appended,
    /// We had it already.
    Known,
    /// Authorized by its auth events but not by the current state: kept aside, not shown.
    SoftFailed,
}

/// The room id a PDU names (the create event of a version-12 room has none).
pub fn room_id_of(raw: &RawJsonValue) -> Result<OwnedRoomId> {
    #[derive(serde::Deserialize)]
    struct RoomOf {
        room_id: OwnedRoomId,
    }
    serde_json::from_str::<RoomOf>(raw.get())
        .map(|r| r.room_id)
        .map_err(|e| Error::BadJson(format!("the event has no valid room_id: {e}")))
}

impl Receiver {
    /// Parses a received PDU and checks its signatures and content hash (a hash mismatch
    /// redacts it, as the spec says); the keys come from the key cache or their servers.
    pub async fn verify_pdu(&self, raw: &RawJsonValue, version: &RoomVersionId) -> Result<VerifiedEvent> {
        let s = self.hub.services();
        check_references(raw)?;
        let object: CanonicalJsonObject =
            serde_json::from_str(raw.get()).map_err(|e| Error::BadJson(format!("not a valid event: {e}")))?;
        let at_ms = match object.get("origin_server_ts") {
            Some(ruma::CanonicalJsonValue::Integer(ts)) => i64::from(*ts),
            _ => now_ms(),
        };
        let needed = signing_keys_needed(&object, version).map_err(|e| Error::Forbidden(e.to_string()))?;
        let mut keys = PublicKeyMap::new();
        for (server, key_ids) in needed {
            let mut set = BTreeMap::new();
            for key_id in key_ids {
                // A key we cannot get simply stays out of the map: verification then fails.
                if let Ok(key) = s.fed.public_key(&server, &key_id, at_ms).await
                    && let Ok(key) = Base64::parse(key)
                {
                    set.insert(key_id, key);
                }
            }
            keys.insert(server.to_string(), set);
        }
        let (event_id, object) = verify_received(object, version, &keys).map_err(|e| match e {
            federation::pdu::PduError::BadSignature(reason) => Error::Forbidden(format!("bad signature: {reason}")),
            other => Error::BadJson(other.to_string()),
        })?;
        let json = serde_json::to_string(&object).map_err(|e| Error::internal(e.to_string()))?;
        let pdu = Pdu::from_json(event_id.clone(), &json).map_err(|e| Error::BadJson(e.to_string()))?;
        Ok(VerifiedEvent { event_id, object, json, pdu })
    }

    /// Fetches the events between our forward extremities and `pdu` that we do not have
    /// (`get_missing_events`, asked again from the oldest events fetched while their
    /// `prev_events` are still unknown, at most [`MISSING_EVENTS_ROUNDS`] times) and takes them
    /// in, oldest first. Best effort: what cannot be fetched leaves a gap in the graph, which
    /// the state at the gap's edge (asked with `/state_ids`) bridges.
    pub(crate) async fn fetch_missing_prev_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: &Pdu,
    ) {
        let s = self.hub.services();
        let ids: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let known = match s.store.events_in_graph(&ids).await {
            Ok(held) => held.len(),
            Err(_) => return,
        };
        if known == ids.len() {
            return;
        }
        let Ok(extremities) = s.store.forward_extremities(room_id.as_str()).await else { return };
        let earliest: Vec<OwnedEventId> =
            extremities.iter().filter_map(|(id, _)| EventId::parse(id.as_str()).ok()).collect();
        let mut fetched: HashMap<OwnedEventId, VerifiedEvent> = HashMap::new();
        let mut latest = vec![pdu.event_id.clone()];
        for _ in 0..MISSING_EVENTS_ROUNDS {
            let mut request = get_missing_events::v1::Request::new(room_id.to_owned(), earliest.clone(), latest);
            request.limit = UInt::from(MISSING_EVENTS_LIMIT);
            let response = match s.fed.send(origin, request).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(%origin, %room_id, error = %e, "cannot fetch missing events");
                    break;
                }
            };
            if response.events.len() > MISSING_EVENTS_LIMIT as usize {
                // An honest server answers with at most what was asked for.
                tracing::info!(%origin, %room_id, events = response.events.len(), "dropped a get_missing_events answer longer than asked");
                break;
            }
            let before = fetched.len();
            for raw in &response.events {
                match self.verify_pdu(raw, version).await {
                    Ok(event) if event.pdu.room_id.as_deref() == Some(room_id) => {
                        fetched.insert(event.event_id.clone(), event);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::info!(%origin, error = %e, "a missing event did not verify"),
                }
            }
            if fetched.len() == before {
                break;
            }
            // The fetched events whose prev_events we neither hold nor fetched: the gap goes on
            // behind them.
            let unknown: Vec<String> = fetched
                .values()
                .flat_map(|e| e.pdu.prev_events.iter())
                .filter(|id| !fetched.contains_key(*id))
                .map(|id| id.to_string())
                .collect();
            let Ok(held) = s.store.events_in_graph(&unknown).await else { break };
            latest = fetched
                .values()
                .filter(|e| e.pdu.prev_events.iter().any(|p| !fetched.contains_key(p) && !held.contains(p.as_str())))
                .map(|e| e.event_id.clone())
                .collect();
            if latest.is_empty() {
                break;
            }
        }
        let mut events: Vec<VerifiedEvent> = fetched.into_values().collect();
        events.sort_by_key(|e| (e.pdu.depth, e.pdu.origin_server_ts));
        for event in events {
            let id = event.event_id.clone();
            self.fetch_missing_auth_events(origin, room_id, version, &event.pdu).await;
            if let Err(e) = self.accept(room_id, event, origin, false).await {
                tracing::info!(%id, error = %e, "a missing event was refused");
            }
        }
    }

    /// Fetches the auth events of `pdu` we do not have (and theirs, recursively) and keeps
    /// them as outliers, each authorized by its own auth events or kept as rejected.
    pub(crate) async fn fetch_missing_auth_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: &Pdu,
    ) {
        if let Err(e) = self.fetch_auth_chain(origin, room_id, version, &pdu.auth_events, MAX_AUTH_EVENTS_FETCHED).await
        {
            tracing::info!(%origin, event_id = %pdu.event_id, error = %e, "cannot fetch its auth events");
        }
    }

    /// Fetches (`/event`, from `origin`) the events of `ids` we do not hold and, recursively,
    /// their auth events we do not hold, at most `limit` events in all; then authorizes each
    /// by its own auth events, oldest first, and stores them as outliers: accepted, or
    /// rejected with the reason (an event whose auth event was rejected is rejected too).
    /// Events whose auth events could not all be had are not stored.
    async fn fetch_auth_chain(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        ids: &[OwnedEventId],
        limit: usize,
    ) -> Result<()> {
        let s = self.hub.services();
        let rules = room_version_rules(version).map_err(|e| Error::internal(e.to_string()))?;
        let mut fetched: HashMap<OwnedEventId, VerifiedEvent> = HashMap::new();
        let mut asked: HashSet<OwnedEventId> = HashSet::new();
        let mut queue: Vec<OwnedEventId> = self.unheld(ids).await?;
        while let Some(id) = queue.pop() {
            if fetched.len() >= limit {
                tracing::info!(%origin, %room_id, limit, "an auth chain is longer than we fetch");
                break;
            }
            if !asked.insert(id.clone()) {
                continue;
            }
            let Ok(response) = s.fed.send(origin, get_event::v1::Request::new(id.clone())).await else {
                continue;
            };
            match self.verify_pdu(&response.pdu, version).await {
                Ok(event) if event.event_id == id && event.pdu.room_id.as_deref() == Some(room_id) => {
                    let next: Vec<OwnedEventId> =
                        event.pdu.auth_events.iter().filter(|a| !asked.contains(*a)).cloned().collect();
                    queue.extend(self.unheld(&next).await?);
                    fetched.insert(id, event);
                }
                Ok(_) => tracing::info!(%id, "a fetched auth event is not the one asked for"),
                Err(e) => tracing::info!(%id, error = %e, "a fetched auth event did not verify"),
            }
        }
        if fetched.is_empty() {
            return Ok(());
        }
        // What the fetched events cite that we hold.
        let cited: Vec<String> = fetched
            .values()
            .flat_map(|e| e.pdu.auth_events.iter())
            .filter(|id| !fetched.contains_key(*id))
            .map(|id| id.to_string())
            .collect();
        let mut held: HashMap<OwnedEventId, Pdu> = HashMap::new();
        for stored in s.store.pdus_for_auth(&cited).await? {
            if stored.room_id != room_id.as_str() {
                continue;
            }
            let Ok(id) = EventId::parse(stored.event_id.as_str()) else { continue };
            let Ok(mut event) = Pdu::from_json(id.clone(), &stored.json) else { continue };
            event.rejected = stored.rejected;
            held.insert(id, event);
        }
        let create = self.create_event_pdu(room_id, &rules).await?;
        // Decide in the auth graph's order: an event once all its auth events are decided.
        let mut decided: HashMap<OwnedEventId, Option<String>> = HashMap::new();
        loop {
            let mut progress = false;
            for (id, event) in &fetched {
                if decided.contains_key(id) {
                    continue;
                }
                let mut auth_events: HashMap<OwnedEventId, Pdu> = HashMap::new();
                let mut verdict: Option<Option<String>> = None;
                let mut ready = true;
                for auth_id in &event.pdu.auth_events {
                    if let Some(decision) = decided.get(auth_id) {
                        match decision {
                            Some(_) => verdict = Some(Some(format!("its auth event {auth_id} was rejected"))),
                            None => {
                                auth_events.insert(auth_id.clone(), fetched[auth_id].pdu.clone());
                            }
                        }
                    } else if fetched.contains_key(auth_id) {
                        ready = false;
                    } else if let Some(pdu) = held.get(auth_id) {
                        if pdu.rejected {
                            verdict = Some(Some(format!("its auth event {auth_id} was rejected")));
                        }
                        auth_events.insert(auth_id.clone(), pdu.clone());
                    } else {
                        // Never had: this event cannot be decided now.
                        ready = false;
                    }
                }
                if verdict.is_none() && !ready {
                    continue;
                }
                let verdict = match verdict {
                    Some(verdict) => verdict,
                    None => {
                        if let Some(create) = &create {
                            auth_events.entry(create.event_id.clone()).or_insert_with(|| create.clone());
                        }
                        auth::authorize_by_auth_events(&rules.authorization, &event.pdu, &auth_events).err()
                    }
                };
                decided.insert(id.clone(), verdict);
                progress = true;
            }
            if !progress {
                break;
            }
        }
        let outliers: Vec<NewOutlier> = decided
            .into_iter()
            .map(|(id, rejection)| {
                if let Some(reason) = &rejection {
                    tracing::info!(event_id = %id, %origin, %reason, "rejected a fetched auth event");
                }
                NewOutlier {
                    event_id: id.to_string(),
                    json: fetched[&id].json.clone(),
                    soft_failed: false,
                    rejection,
                    state: None,
                }
            })
            .collect();
        s.store.insert_outliers(room_id.as_str(), &outliers, now_ms()).await?;
        Ok(())
    }

    /// Of `ids`, those we hold in no form.
    async fn unheld(&self, ids: &[OwnedEventId]) -> Result<Vec<OwnedEventId>> {
        let s = self.hub.services();
        let strings: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let held: HashSet<String> =
            s.store.pdus_for_auth(&strings).await?.into_iter().map(|stored| stored.event_id).collect();
        Ok(ids.iter().filter(|id| !held.contains(id.as_str())).cloned().collect())
    }

    /// The room's create event (room version 12 consults it without listing it among an
    /// event's auth events).
    async fn create_event_pdu(
        &self,
        room_id: &RoomId,
        rules: &ruma::room_version_rules::RoomVersionRules,
    ) -> Result<Option<Pdu>> {
        let s = self.hub.services();
        if !rules.authorization.room_create_event_id_as_room_id {
            return Ok(None);
        }
        let Some(create) = s.room_cache.state_event(room_id, "m.room.create", "").await? else { return Ok(None) };
        let id = EventId::parse(create.event_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
        Ok(Some(Pdu::from_json(id, &create.json).map_err(|e| Error::internal(e.to_string()))?))
    }

    /// The state after each prev event of `pdu` whose state we do not know, asked from
    /// `origin` (`/state_ids` at it, the events we lack fetched and authorized like auth
    /// chains, rejected ones left out) and stored with the prev event. At most
    /// [`MAX_PREV_STATES_FETCHED`] prev events; best effort.
    async fn fetch_prev_states(&self, origin: &ServerName, room_id: &RoomId, version: &RoomVersionId, pdu: &Pdu) {
        let s = self.hub.services();
        let ids: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let Ok(known) = s.store.event_state_groups(&ids).await else { return };
        for prev in pdu.prev_events.iter().filter(|id| !known.contains_key(id.as_str())).take(MAX_PREV_STATES_FETCHED) {
            if let Err(e) = self.fetch_state_after(origin, room_id, version, prev).await {
                tracing::info!(%origin, %room_id, %prev, error = %e, "cannot learn the state at a prev event");
            }
        }
    }

    async fn fetch_state_after(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        prev: &OwnedEventId,
    ) -> Result<()> {
        let s = self.hub.services();
        let response =
            s.fed.send(origin, get_room_state_ids::v1::Request::new(prev.clone(), room_id.to_owned())).await?;
        if response.pdu_ids.len() > MAX_STATE_IDS {
            return Err(Error::RemoteUnavailable(format!(
                "{} state events are more than we take",
                response.pdu_ids.len()
            )));
        }
        let mut wanted = response.pdu_ids.clone();
        wanted.push(prev.clone());
        self.fetch_auth_chain(origin, room_id, version, &wanted, MAX_STATE_EVENTS_FETCHED).await?;
        // The state before the prev event, from the events themselves (never from the
        // answer's word about which key each one holds).
        let strings: Vec<String> = response.pdu_ids.iter().map(|id| id.to_string()).collect();
        let mut before: StateIds = HashMap::new();
        for stored in s.store.pdus_for_auth(&strings).await? {
            if stored.room_id != room_id.as_str() || stored.rejected {
                continue;
            }
            let Ok(id) = EventId::parse(stored.event_id.as_str()) else { continue };
            let Ok(event) = Pdu::from_json(id, &stored.json) else { continue };
            let Some(key) = event.state_key.clone() else { continue };
            if before.insert((event.kind.to_string(), key), event.event_id.to_string()).is_some() {
                return Err(Error::RemoteUnavailable("two state events for one key".to_owned()));
            }
        }
        let Some(prev_stored) = s.store.pdus_for_auth(&[prev.to_string()]).await?.into_iter().next() else {
            return Err(Error::RemoteUnavailable("the prev event could not be had".to_owned()));
        };
        if prev_stored.rejected || prev_stored.room_id != room_id.as_str() {
            return Err(Error::Forbidden("the prev event was rejected".to_owned()));
        }
        let prev_pdu = Pdu::from_json(prev.clone(), &prev_stored.json).map_err(|e| Error::internal(e.to_string()))?;
        let after = prev_pdu.state_key.as_ref().map(|key| NewStateGroup {
            prev: Some(GroupBase::Before),
            chain_len: 1,
            entries: vec![(prev_pdu.kind.to_string(), key.clone(), prev.to_string())],
        });
        let prev_state =
            prev_pdu.state_key.as_ref().and_then(|key| before.get(&(prev_pdu.kind.to_string(), key.clone())).cloned());
        let (before_group, _) = s.state.group_for_state(room_id, &before).await?;
        let groups = EventStateGroups { before: before_group, after, current: CurrentGroup::Unchanged, prev_state };
        let outlier = NewOutlier {
            event_id: prev.to_string(),
            json: prev_stored.json,
            soft_failed: false,
            rejection: None,
            state: Some(groups),
        };
        s.store.insert_outliers(room_id.as_str(), &[outlier], now_ms()).await?;
        Ok(())
    }

    /// Checks an invite into a room we know but are no longer in (every local user left, so
    /// the state we hold is as of our leave and the room goes on elsewhere). Its own auth
    /// events (fetched from `origin` where we lack them) must authorize it; and a ban of the
    /// invitee that we know stands unless the invite cites a membership of theirs newer than
    /// it (one we do not hold on the timeline up to the ban), which must then be had and
    /// authorized. Auth events a server will not show us (history we may not see) leave the
    /// invite to the rest of these checks.
    pub(crate) async fn check_invite_into_left_room(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        event: &VerifiedEvent,
        origin: &ServerName,
    ) -> Result<()> {
        let s = self.hub.services();
        let rules = room_version_rules(version).map_err(|e| Error::internal(e.to_string()))?;
        let pdu = &event.pdu;
        self.fetch_missing_auth_events(origin, room_id, version, pdu).await;
        let mut auth_events = self.auth_events_of(pdu).await?;
        let all_had = auth_events.len() == pdu.auth_events.len();
        if let Some(create) = self.create_event_pdu(room_id, &rules).await? {
            auth_events.entry(create.event_id.clone()).or_insert(create);
        }
        if all_had {
            auth::authorize_by_auth_events(&rules.authorization, pdu, &auth_events)
                .map_err(|reason| Error::Forbidden(format!("the invite is not authorized: {reason}")))?;
        }
        let Some(target) = pdu.state_key.as_deref() else { return Ok(()) };
        let Some(known) = s.store.current_state_event(room_id.as_str(), "m.room.member", target).await? else {
            return Ok(());
        };
        if s.rooms.membership(room_id.as_str(), target).await? != Some(MembershipState::Ban) {
            return Ok(());
        }
        let banned = || Error::Forbidden(format!("{target} is banned from {room_id}"));
        if !all_had {
            return Err(banned());
        }
        let cited = auth_events
            .values()
            .find(|e| e.kind == ruma::events::TimelineEventType::RoomMember && e.state_key.as_deref() == Some(target));
        let Some(cited) = cited else { return Err(banned()) };
        if cited.event_id.as_str() == known.event_id {
            return Err(banned());
        }
        match s.store.event(cited.event_id.as_str()).await? {
            Some(row) if row.stream_ordering <= known.stream_ordering => Err(banned()),
            _ => Ok(()),
        }
    }

    /// The auth events of `pdu` that we hold, parsed (rejected ones marked so).
    pub(crate) async fn auth_events_of(&self, pdu: &Pdu) -> Result<HashMap<OwnedEventId, Pdu>> {
        let s = self.hub.services();
        let ids: Vec<String> = pdu.auth_events.iter().map(|id| id.to_string()).collect();
        let mut out = HashMap::new();
        for stored in s.store.pdus_for_auth(&ids).await? {
            let id = EventId::parse(stored.event_id).map_err(|e| Error::internal(e.to_string()))?;
            let mut event = Pdu::from_json(id.clone(), &stored.json).map_err(|e| Error::internal(e.to_string()))?;
            event.rejected = stored.rejected;
            out.insert(id, event);
        }
        Ok(out)
    }

    /// Keeps a soft-failed event aside with its state (later events may build on it): not on
    /// the timeline, not a forward extremity, not in the current state.
    async fn keep_soft_failed(
        &self,
        room_id: &RoomId,
        event: &VerifiedEvent,
        before: &super::state::StateBefore,
    ) -> Result<()> {
        let s = self.hub.services();
        let after = s.state.after_group(before, &event.pdu).await?;
        let prev_state = s.state.prev_state_of(room_id, before, &event.pdu).await?;
        let outlier = NewOutlier {
            event_id: event.event_id.to_string(),
            json: event.json.clone(),
            soft_failed: true,
            rejection: None,
            state: Some(EventStateGroups {
                before: before.group.clone(),
                after,
                current: CurrentGroup::Unchanged,
                prev_state,
            }),
        };
        s.store.insert_outliers(room_id.as_str(), &[outlier], now_ms()).await?;
        Ok(())
    }

    /// Keeps a refused event as rejected (never used for auth or state; an event citing it
    /// is refused too) and returns the refusal.
    async fn reject(&self, room_id: &RoomId, event: &VerifiedEvent, reason: String) -> Result<Accepted> {
        let s = self.hub.services();
        tracing::info!(event_id = %event.event_id, %reason, "rejected a received event");
        let outlier = NewOutlier {
            event_id: event.event_id.to_string(),
            json: event.json.clone(),
            soft_failed: false,
            rejection: Some(reason.clone()),
            state: None,
        };
        s.store.insert_outliers(room_id.as_str(), &[outlier], now_ms()).await?;
        Err(Error::Forbidden(format!("{} is not authorized: {reason}", event.event_id)))
    }

    /// Authorizes a verified event from `from` and stores it, as the spec's checks on
    /// receipt of a PDU say: rejected unless its own auth events authorize it, and unless the
    /// state before it (from its prev events, resolved where they are several) does;
    /// soft-failed (kept aside) unless the current state does too. With `broadcast` (a join
    /// or leave handed to us to pass on) it is queued for the room's other servers.
    pub(crate) async fn accept(
        &self,
        room_id: &RoomId,
        event: VerifiedEvent,
        from: &ServerName,
        broadcast: bool,
    ) -> Result<Accepted> {
        let s = self.hub.services();
        let event_id = event.event_id.clone();
        let accepted = self.authorize_and_store(room_id, event, from, broadcast, false).await?;
        if accepted == Accepted::Appended {
            // Redactions that arrived before it are decided now.
            s.redactions.apply_waiting_for(room_id, &event_id, from).await;
        }
        Ok(accepted)
    }

    /// [`Services::accept`] for a soft-failed event held aside, decided again
    /// (a redaction whose target has arrived).
    pub(crate) async fn accept_again(
        &self,
        room_id: &RoomId,
        event: VerifiedEvent,
        from: &ServerName,
    ) -> Result<Accepted> {
        self.authorize_and_store(room_id, event, from, false, true).await
    }

    async fn authorize_and_store(
        &self,
        room_id: &RoomId,
        event: VerifiedEvent,
        from: &ServerName,
        broadcast: bool,
        again: bool,
    ) -> Result<Accepted> {
        let s = self.hub.services();
        // The room's server ACL applies to whoever wrote the event, whichever server relayed
        // it (a denied server must not get its events in through an allowed one).
        s.servers.check_acl(room_id, event.pdu.sender.server_name()).await?;
        let version = s.rooms.version(room_id.as_str()).await?;
        let rules = room_version_rules(&version).map_err(|e| Error::internal(e.to_string()))?;
        // The network part first, outside the room lock: the state at prev events we lack.
        self.fetch_prev_states(from, room_id, &version, &event.pdu).await;
        let lock = s.timeline.room_lock(room_id);
        let _guard = lock.lock().await;
        let status = s.store.event_status(event.event_id.as_str()).await?;
        let held_aside = again && matches!(status, EventStatus::Outlier { soft_failed: true, rejection: None });
        if !held_aside && let Some(known) = known_outcome(&event.event_id, &status)? {
            return Ok(known);
        }
        let promotes_outlier = matches!(status, EventStatus::Outlier { .. });
        let pdu = &event.pdu;
        // 1. Its own auth events must authorize it.
        let mut auth_events = self.auth_events_of(pdu).await?;
        if auth_events.len() != pdu.auth_events.len() {
            return Err(Error::Forbidden(format!("{}: some of its auth events are unknown", event.event_id)));
        }
        if let Some(create) = self.create_event_pdu(room_id, &rules).await? {
            auth_events.entry(create.event_id.clone()).or_insert(create);
        }
        if let Err(reason) = auth::authorize_by_auth_events(&rules.authorization, pdu, &auth_events) {
            return self.reject(room_id, &event, reason).await;
        }
        // 2. The state before it must authorize it.
        let Some(before) = s.state.before_prevs(room_id, &version, &pdu.prev_events).await? else {
            return Err(Error::Forbidden(format!("{}: the state before it is not known", event.event_id)));
        };
        let current = s.timeline.current_auth_state(room_id, pdu, &rules).await?;
        let mut current_events = current.events;
        current_events.extend(auth_events.clone());
        if before.is_current && before.ids.is_none() {
            if let Err(reason) = auth::authorize(&rules.authorization, pdu, &current_events, &current.state) {
                return self.reject(room_id, &event, reason).await;
            }
        } else {
            let ids = s.state.ids_of_before(&before).await?;
            if let Err(reason) = s.state.authorize_against(room_id, &rules, pdu, &auth_events, &ids).await? {
                return self.reject(room_id, &event, reason).await;
            }
            // 3. The current state must authorize it too, or it is soft-failed: kept (later
            //    events may build on it) but not shown, not a forward extremity, not state.
            if let Err(reason) = auth::authorize(&rules.authorization, pdu, &current_events, &current.state) {
                tracing::info!(event_id = %event.event_id, %from, %reason, "soft-failed a received event");
                self.keep_soft_failed(room_id, &event, &before).await?;
                return Ok(Accepted::SoftFailed);
            }
        }
        // 4. A redaction its sender may not make is soft-failed too: never applied, and never
        //    shown to clients (who would apply it themselves).
        match s.redactions.verdict(room_id, pdu, &rules).await? {
            super::redactions::RedactionVerdict::Refused(reason) => {
                tracing::info!(event_id = %event.event_id, %from, %reason, "soft-failed a received redaction");
                self.keep_soft_failed(room_id, &event, &before).await?;
                return Ok(Accepted::SoftFailed);
            }
            super::redactions::RedactionVerdict::TargetUnknown(target) => {
                // Decided when the target arrives (see `service::redactions`).
                tracing::info!(event_id = %event.event_id, %from, %target, "a received redaction waits for its target");
                self.keep_soft_failed(room_id, &event, &before).await?;
                s.store.add_pending_redaction(room_id.as_str(), target.as_str(), event.event_id.as_str()).await?;
                return Ok(Accepted::SoftFailed);
            }
            _ => {}
        }
        let state = s.state.plan(room_id, &version, pdu, before).await?;
        let destinations =
            if broadcast { s.timeline.destinations_for(room_id, pdu, Some(from)).await? } else { Vec::new() };
        let built = BuiltEvent {
            state: Some(state),
            promotes_outlier,
            ..BuiltEvent::new(event.event_id, event.object, event.json, event.pdu)
        };
        s.timeline.persist(room_id, built, None, &destinations).await?;
        Ok(Accepted::Appended)
    }

    /// One EDU of a `/send` transaction: typing notifications and read receipts of `origin`'s
    /// users in rooms we share with them.
    pub async fn take_edu(&self, origin: &ServerName, edu: &serde_json::Value) -> Result<()> {
        let s = self.hub.services();
        let content = &edu["content"];
        match edu["edu_type"].as_str() {
            Some("m.typing") => {
                let room_id = RoomId::parse(content["room_id"].as_str().unwrap_or_default())
                    .map_err(|e| Error::BadJson(e.to_string()))?;
                let user = self.remote_member(origin, &room_id, content["user_id"].as_str()).await?;
                // Other servers renew typing well within 30 s, as Synapse does.
                let timeout = (content["typing"] == true).then_some(std::time::Duration::from_secs(30));
                s.typing.set(&room_id, &user, timeout, || s.streams.bump_typing([&*room_id]));
                Ok(())
            }
            Some("m.receipt") => {
                let Some(rooms) = content.as_object() else { return Ok(()) };
                for (room_id, receipts) in rooms {
                    let room_id = RoomId::parse(room_id).map_err(|e| Error::BadJson(e.to_string()))?;
                    let Some(users) = receipts["m.read"].as_object() else { continue };
                    for (user, receipt) in users {
                        let user = self.remote_member(origin, &room_id, Some(user)).await?;
                        let Some(event_id) = receipt["event_ids"][0].as_str().and_then(|id| EventId::parse(id).ok())
                        else {
                            continue;
                        };
                        let thread = receipt["data"]["thread_id"].as_str().unwrap_or_default();
                        s.sync.set_receipt(&room_id, &user, "m.read", &event_id, thread).await?;
                    }
                }
                Ok(())
            }
            Some("m.presence") => {
                for push in content["push"].as_array().into_iter().flatten() {
                    let Ok(user) = ruma::UserId::parse(push["user_id"].as_str().unwrap_or_default()) else { continue };
                    // Only of a user of the sending server who shares a room with us: presence
                    // of strangers would only fill our tables.
                    if user.server_name() != origin || !self.shares_a_room_with_us(&user).await? {
                        continue;
                    }
                    let state = push["presence"].as_str().unwrap_or("offline");
                    let status = push["status_msg"].as_str().map(str::to_owned);
                    let ago = push["last_active_ago"].as_i64().unwrap_or(0);
                    s.presence.receive_remote(&user, state, status, ago).await?;
                }
                Ok(())
            }
            Some("m.device_list_update") => {
                let user = ruma::UserId::parse(content["user_id"].as_str().unwrap_or_default())
                    .map_err(|e| Error::BadJson(e.to_string()))?;
                if user.server_name() != origin {
                    return Err(Error::Forbidden(format!("{user} is not a user of {origin}")));
                }
                // We do not keep other servers' device lists: local syncs learn that it
                // changed and query the keys again (over federation).
                if !s.rooms.of_user(user.as_str()).await?.is_empty() {
                    s.keys.announce_device_change(user.as_str()).await?;
                }
                Ok(())
            }
            Some("m.signing_key_update") => s.keys.receive_signing_key_update(origin, content).await,
            Some("m.direct_to_device") => {
                let sender = ruma::UserId::parse(content["sender"].as_str().unwrap_or_default())
                    .map_err(|e| Error::BadJson(e.to_string()))?;
                if sender.server_name() != origin {
                    return Err(Error::Forbidden(format!("{sender} is not a user of {origin}")));
                }
                let event_type = content["type"].as_str().unwrap_or_default();
                let message_id = content["message_id"].as_str().unwrap_or_default();
                let mut messages = Vec::new();
                for (user, devices) in content["messages"].as_object().into_iter().flatten() {
                    let Ok(target) = ruma::UserId::parse(user.as_str()) else { continue };
                    // Only to our users who share a room with a user of the sending server.
                    if target.server_name() != s.settings.server_name
                        || !self.server_shares_a_room_with(origin, &target).await?
                    {
                        continue;
                    }
                    for (device, message) in devices.as_object().into_iter().flatten() {
                        messages.push((user.clone(), device.clone(), message.clone()));
                    }
                }
                // The message id makes a retried EDU a duplicate, like a client's txn id.
                s.keys.send_to_device(&sender, &format!("federation:{origin}"), message_id, event_type, messages).await
            }
            _ => Ok(()),
        }
    }

    /// Whether the (remote) user is joined to a room one of our users is joined to.
    async fn shares_a_room_with_us(&self, user: &ruma::UserId) -> Result<bool> {
        let s = self.hub.services();
        for (room, membership) in s.rooms.of_user(user.as_str()).await?.iter() {
            if *membership == MembershipState::Join
                && let Ok(room_id) = RoomId::parse(room.as_str())
                && s.servers.we_are_in(&room_id).await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether a user of `server` is joined to a room our `user` is joined to or invited to.
    async fn server_shares_a_room_with(&self, server: &ServerName, user: &ruma::UserId) -> Result<bool> {
        let s = self.hub.services();
        for (room, membership) in s.rooms.of_user(user.as_str()).await?.iter() {
            if *membership != MembershipState::Join && *membership != MembershipState::Invite {
                continue;
            }
            let members = s.store.room_members(room, &MembershipState::Join).await?;
            if members.iter().filter_map(|m| ruma::UserId::parse(m.as_str()).ok()).any(|m| m.server_name() == server) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A user of `origin` joined to a room we are in.
    async fn remote_member(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: Option<&str>,
    ) -> Result<ruma::OwnedUserId> {
        let s = self.hub.services();
        let user = ruma::UserId::parse(user.unwrap_or_default()).map_err(|e| Error::BadJson(e.to_string()))?;
        if user.server_name() != origin {
            return Err(Error::Forbidden(format!("{user} is not a user of {origin}")));
        }
        s.servers.check_acl(room_id, origin).await?;
        if s.rooms.membership(room_id.as_str(), user.as_str()).await? != Some(MembershipState::Join) {
            return Err(Error::Forbidden(format!("{user} is not in {room_id}")));
        }
        Ok(user)
    }
}
