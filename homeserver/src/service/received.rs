//! Events other servers send us: checked (signatures and content hash with the sender's
//! cached server keys, authorization by the event's own auth events, then against the
//! current state) and stored through the same per-room append path as our own events, so the
//! room cache, the send queue and the syncs see them exactly like local ones.

use std::collections::{BTreeMap, HashMap, HashSet};

use federation::{
    auth,
    pdu::{Pdu, room_version_rules, signing_keys_needed, verify_received},
    state::resolve_states,
};
use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, ServerName, UInt,
    api::federation::event::{get_event, get_missing_events},
    events::StateEventType,
    serde::Base64,
    signatures::PublicKeyMap,
    state_res::StateMap,
};
use serde_json::value::RawValue as RawJsonValue;

use super::{Services, timeline::BuiltEvent};
use crate::{
    error::{Error, Result},
    store::now_ms,
};

/// Most events asked for in one `get_missing_events` request.
const MISSING_EVENTS_LIMIT: u32 = 20;
/// Most `get_missing_events` requests to close one gap: a peer catching us up after a long
/// outage (Synapse then sends only the newest event of each room) can leave a gap larger than
/// one answer, so we ask again from the oldest events we got, up to this many times.
const MISSING_EVENTS_ROUNDS: usize = 10;

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

impl Services {
    /// Parses a received PDU and checks its signatures and content hash (a hash mismatch
    /// redacts it, as the spec says); the keys come from the key cache or their servers.
    pub async fn verify_pdu(&self, raw: &RawJsonValue, version: &RoomVersionId) -> Result<VerifiedEvent> {
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
                if let Ok(key) = self.server_public_key(&server, &key_id, at_ms).await
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

    /// Whether a local user is joined to the room (then we are "in" it and take its events).
    pub async fn server_in_room(&self, room_id: &RoomId) -> Result<bool> {
        let members = self.store.room_members(room_id.as_str(), "join").await?;
        Ok(members
            .iter()
            .filter_map(|m| ruma::UserId::parse(m.as_str()).ok())
            .any(|m| m.server_name() == self.settings.server_name))
    }

    /// One PDU of a `/send` transaction from `origin`.
    pub async fn receive_pdu(&self, origin: &ServerName, raw: &RawJsonValue) -> Result<(OwnedEventId, Accepted)> {
        let room_id = room_id_of(raw)?;
        if !self.server_in_room(&room_id).await? {
            return Err(Error::Forbidden(format!("this server is not in {room_id}")));
        }
        self.check_server_acl(&room_id, origin).await?;
        let version = self.room_version(room_id.as_str()).await?;
        let event = self.verify_pdu(raw, &version).await?;
        if event.pdu.room_id.as_deref() != Some(&*room_id) {
            return Err(Error::BadJson("room_id mismatch".to_owned()));
        }
        let id = event.event_id.clone();
        if !self.store.any_events_json(&[id.to_string()]).await?.is_empty() {
            return Ok((id, Accepted::Known));
        }
        self.fetch_missing_prev_events(origin, &room_id, &version, &event.pdu).await;
        self.fetch_missing_auth_events(origin, &room_id, &version, &event.pdu).await;
        let accepted = self.accept_remote_event(&room_id, event, origin, false).await?;
        Ok((id, accepted))
    }

    /// Fetches the events between our forward extremities and `pdu` that we do not have
    /// (`get_missing_events`, asked again from the oldest events fetched while their
    /// `prev_events` are still unknown, at most [`MISSING_EVENTS_ROUNDS`] times) and takes them
    /// in, oldest first. Best effort: what cannot be fetched leaves a gap in the graph, not a
    /// refused event.
    async fn fetch_missing_prev_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: &Pdu,
    ) {
        let ids: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let known = match self.store.any_events_json(&ids).await {
            Ok(rows) => rows.len(),
            Err(_) => return,
        };
        if known == ids.len() {
            return;
        }
        let Ok(extremities) = self.store.forward_extremities(room_id.as_str()).await else { return };
        let earliest: Vec<OwnedEventId> =
            extremities.iter().filter_map(|(id, _)| EventId::parse(id.as_str()).ok()).collect();
        let mut fetched: HashMap<OwnedEventId, VerifiedEvent> = HashMap::new();
        let mut latest = vec![pdu.event_id.clone()];
        for _ in 0..MISSING_EVENTS_ROUNDS {
            let mut request = get_missing_events::v1::Request::new(room_id.to_owned(), earliest.clone(), latest);
            request.limit = UInt::from(MISSING_EVENTS_LIMIT);
            let response = match self.send_federation(origin, request).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(%origin, %room_id, error = %e, "cannot fetch missing events");
                    break;
                }
            };
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
            let Ok(held) = self.store.any_events_json(&unknown).await else { break };
            let held: HashSet<String> = held.into_iter().map(|(id, _, _)| id).collect();
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
            if let Err(e) = self.accept_remote_event(room_id, event, origin, false).await {
                tracing::info!(%id, error = %e, "a missing event was refused");
            }
        }
    }

    /// Fetches (`/event`) the auth events of `pdu` we do not have and keeps them as outliers.
    pub(crate) async fn fetch_missing_auth_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: &Pdu,
    ) {
        let ids: Vec<String> = pdu.auth_events.iter().map(|id| id.to_string()).collect();
        let Ok(known) = self.store.any_events_json(&ids).await else { return };
        let known: HashSet<String> = known.into_iter().map(|(id, _, _)| id).collect();
        for id in pdu.auth_events.iter().filter(|id| !known.contains(id.as_str())) {
            let Ok(response) = self.send_federation(origin, get_event::v1::Request::new(id.clone())).await else {
                continue;
            };
            match self.verify_pdu(&response.pdu, version).await {
                Ok(event) if &event.event_id == id && event.pdu.room_id.as_deref() == Some(room_id) => {
                    let _ =
                        self.store.insert_outlier(id.as_str(), room_id.as_str(), &event.json, false, now_ms()).await;
                }
                Ok(_) => tracing::info!(%id, "a fetched auth event is not the one asked for"),
                Err(e) => tracing::info!(%id, error = %e, "a fetched auth event did not verify"),
            }
        }
    }

    /// The auth events of `pdu` that we hold, parsed.
    pub(crate) async fn auth_events_of(&self, pdu: &Pdu) -> Result<HashMap<OwnedEventId, Pdu>> {
        let ids: Vec<String> = pdu.auth_events.iter().map(|id| id.to_string()).collect();
        let mut out = HashMap::new();
        for (id, _, json) in self.store.any_events_json(&ids).await? {
            let id = EventId::parse(id).map_err(|e| Error::internal(e.to_string()))?;
            let event = Pdu::from_json(id.clone(), &json).map_err(|e| Error::internal(e.to_string()))?;
            out.insert(id, event);
        }
        Ok(out)
    }

    /// Authorizes a verified event from `from` and stores it: refused unless its own auth
    /// events authorize it; soft-failed (kept aside) unless the current state does too. With
    /// `broadcast` (a join or leave handed to us to pass on) it is queued for the room's other
    /// servers.
    pub(crate) async fn accept_remote_event(
        &self,
        room_id: &RoomId,
        event: VerifiedEvent,
        from: &ServerName,
        broadcast: bool,
    ) -> Result<Accepted> {
        let version = self.room_version(room_id.as_str()).await?;
        let rules = room_version_rules(&version).map_err(|e| Error::internal(e.to_string()))?;
        let lock = self.room_lock(room_id);
        let _guard = lock.lock().await;
        if !self.store.any_events_json(&[event.event_id.to_string()]).await?.is_empty() {
            return Ok(Accepted::Known);
        }
        let pdu = &event.pdu;
        // 1. Its own auth events must authorize it.
        let mut auth_events = self.auth_events_of(pdu).await?;
        if auth_events.len() != pdu.auth_events.len() {
            return Err(Error::Forbidden(format!("{}: some of its auth events are unknown", event.event_id)));
        }
        let mut auth_state: HashMap<(StateEventType, String), Pdu> = auth_events
            .values()
            .filter_map(|e| e.state_key.clone().map(|k| ((e.kind.to_string().into(), k), e.clone())))
            .collect();
        if rules.authorization.room_create_event_id_as_room_id {
            // From v12 the create event is not an auth event but is always consulted.
            if let Some(create) = self.cached_state_event(room_id, "m.room.create", "").await? {
                let id = EventId::parse(create.event_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
                let create = Pdu::from_json(id.clone(), &create.json).map_err(|e| Error::internal(e.to_string()))?;
                auth_state.insert((StateEventType::RoomCreate, String::new()), create.clone());
                auth_events.insert(id, create);
            }
        }
        auth::authorize(&rules.authorization, pdu, &auth_events, &auth_state)
            .map_err(|reason| Error::Forbidden(format!("{} is not authorized: {reason}", event.event_id)))?;
        // 2. The current state must authorize it too, or it is soft-failed.
        let current = self.current_auth_state(room_id, pdu, &rules).await?;
        let mut events = current.events;
        events.extend(auth_events);
        if let Err(reason) = auth::authorize(&rules.authorization, pdu, &events, &current.state) {
            tracing::info!(event_id = %event.event_id, %from, %reason, "soft-failed a received event");
            self.store.insert_outlier(event.event_id.as_str(), room_id.as_str(), &event.json, true, now_ms()).await?;
            return Ok(Accepted::SoftFailed);
        }
        // 3. A redaction its sender may not make is soft-failed too: never applied, and never
        // shown to clients (who would apply it themselves).
        if let super::redactions::RedactionVerdict::Refused(reason) =
            self.redaction_verdict(room_id, pdu, &rules).await?
        {
            tracing::info!(event_id = %event.event_id, %from, %reason, "soft-failed a received redaction");
            self.store.insert_outlier(event.event_id.as_str(), room_id.as_str(), &event.json, true, now_ms()).await?;
            return Ok(Accepted::SoftFailed);
        }
        let resolved_state =
            if pdu.state_key.is_some() { self.resolve_if_forked(room_id, &version, pdu).await? } else { None };
        let destinations = if broadcast { self.destinations_for(room_id, pdu, Some(from)).await? } else { Vec::new() };
        let built = BuiltEvent {
            event_id: event.event_id,
            object: event.object,
            json: event.json,
            pdu: event.pdu,
            resolved_state,
        };
        self.persist_event(room_id, built, None, &destinations).await?;
        Ok(Accepted::Appended)
    }

    /// A state event that did not see all our forward extremities joins two branches: the
    /// new current state is what state resolution makes of our current state and the state
    /// on its branch (the state as of its newest known prev event, plus itself). Returns the
    /// current-state entries that change, or `None` when the event simply extends the graph.
    /// Call under the room lock.
    async fn resolve_if_forked(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: &Pdu,
    ) -> Result<Option<Vec<crate::store::CurrentStateEntry>>> {
        let extremities = self.cached_extremities(room_id).await?;
        if extremities.iter().all(|(id, _)| pdu.prev_events.iter().any(|p| p.as_str() == id)) {
            return Ok(None);
        }
        let current_rows = self.store.current_state(room_id.as_str()).await?;
        let mut current: StateMap<OwnedEventId> = HashMap::new();
        for row in &current_rows {
            if let (Some(key), Ok(id)) = (&row.state_key, EventId::parse(row.event_id.as_str())) {
                current.insert((row.event_type.as_str().into(), key.clone()), id);
            }
        }
        // The state on the event's branch, rebuilt by undoing what came after its newest
        // known prev event in our stream.
        let prev_ids: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let at = self.store.events_by_id(&prev_ids).await?.iter().map(|row| row.stream_ordering).max();
        let Some(at) = at else { return Ok(None) };
        let mut branch = current.clone();
        for row in self.store.state_events_after(room_id.as_str(), at).await? {
            let Some(key) = row.state_key.clone() else { continue };
            let slot = (row.event_type.as_str().into(), key);
            if branch.get(&slot).is_some_and(|id| id.as_str() == row.event_id) {
                match row.prev_state_event_id.as_deref().and_then(|id| EventId::parse(id).ok()) {
                    Some(previous) => branch.insert(slot, previous),
                    None => branch.remove(&slot),
                };
            }
        }
        if let Some(key) = &pdu.state_key {
            branch.insert((pdu.kind.to_string().into(), key.clone()), pdu.event_id.clone());
        }
        // Every event of both states and their auth chains.
        let mut events: HashMap<OwnedEventId, Pdu> = HashMap::new();
        events.insert(pdu.event_id.clone(), pdu.clone());
        let mut frontier: Vec<String> = current.values().chain(branch.values()).map(|id| id.to_string()).collect();
        frontier.extend(pdu.auth_events.iter().map(|id| id.to_string()));
        while !frontier.is_empty() {
            let batch: Vec<String> = frontier
                .drain(..)
                .filter(|id| EventId::parse(id.as_str()).is_ok_and(|id| !events.contains_key(&id)))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            for (id, _, json) in self.store.any_events_json(&batch).await? {
                let id = EventId::parse(id).map_err(|e| Error::internal(e.to_string()))?;
                let event = Pdu::from_json(id.clone(), &json).map_err(|e| Error::internal(e.to_string()))?;
                frontier.extend(event.auth_events.iter().map(|a| a.to_string()));
                events.insert(id, event);
            }
        }
        let resolved = resolve_states(version, &[current.clone(), branch], &events)
            .map_err(|e| Error::internal(format!("state resolution in {room_id}: {e}")))?;
        let mut changes = Vec::new();
        for (slot, id) in &resolved {
            if current.get(slot) != Some(id) {
                let membership = events
                    .get(id)
                    .filter(|e| e.kind == ruma::events::TimelineEventType::RoomMember)
                    .and_then(|e| serde_json::from_str::<serde_json::Value>(e.content.get()).ok())
                    .and_then(|c| c["membership"].as_str().map(str::to_owned));
                changes.push((slot.0.to_string(), slot.1.clone(), id.to_string(), membership));
            }
        }
        tracing::info!(%room_id, event_id = %pdu.event_id, changed = changes.len(), "resolved the state of two branches");
        Ok(Some(changes))
    }

    /// One EDU of a `/send` transaction: typing notifications and read receipts of `origin`'s
    /// users in rooms we share with them.
    pub async fn receive_edu(&self, origin: &ServerName, edu: &serde_json::Value) -> Result<()> {
        let content = &edu["content"];
        match edu["edu_type"].as_str() {
            Some("m.typing") => {
                let room_id = RoomId::parse(content["room_id"].as_str().unwrap_or_default())
                    .map_err(|e| Error::BadJson(e.to_string()))?;
                let user = self.remote_member(origin, &room_id, content["user_id"].as_str()).await?;
                // Other servers renew typing well within 30 s, as Synapse does.
                let timeout = (content["typing"] == true).then_some(std::time::Duration::from_secs(30));
                self.typing.set(&room_id, &user, timeout, || self.streams.bump_typing([&*room_id]));
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
                        self.set_receipt(&room_id, &user, "m.read", &event_id, thread).await?;
                    }
                }
                Ok(())
            }
            Some("m.presence") => {
                for push in content["push"].as_array().into_iter().flatten() {
                    let Ok(user) = ruma::UserId::parse(push["user_id"].as_str().unwrap_or_default()) else { continue };
                    if user.server_name() != origin {
                        continue;
                    }
                    let state = push["presence"].as_str().unwrap_or("offline");
                    let status = push["status_msg"].as_str().map(str::to_owned);
                    let ago = push["last_active_ago"].as_i64().unwrap_or(0);
                    self.receive_remote_presence(&user, state, status, ago).await?;
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
                if !self.rooms_of_user(user.as_str()).await?.is_empty() {
                    self.announce_device_change(user.as_str()).await?;
                }
                Ok(())
            }
            Some("m.signing_key_update") => self.receive_signing_key_update(origin, content).await,
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
                    if target.server_name() != self.settings.server_name {
                        continue;
                    }
                    for (device, message) in devices.as_object().into_iter().flatten() {
                        messages.push((user.clone(), device.clone(), message.clone()));
                    }
                }
                // The message id makes a retried EDU a duplicate, like a client's txn id.
                self.send_to_device(&sender, &format!("federation:{origin}"), message_id, event_type, messages).await
            }
            _ => Ok(()),
        }
    }

    /// A user of `origin` joined to a room we are in.
    async fn remote_member(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user: Option<&str>,
    ) -> Result<ruma::OwnedUserId> {
        let user = ruma::UserId::parse(user.unwrap_or_default()).map_err(|e| Error::BadJson(e.to_string()))?;
        if user.server_name() != origin {
            return Err(Error::Forbidden(format!("{user} is not a user of {origin}")));
        }
        self.check_server_acl(room_id, origin).await?;
        if self.membership(room_id.as_str(), user.as_str()).await?.as_deref() != Some("join") {
            return Err(Error::Forbidden(format!("{user} is not in {room_id}")));
        }
        Ok(user)
    }
}
