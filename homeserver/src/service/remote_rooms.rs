//! Membership across servers: joining, leaving and inviting through another server
//! (make_join / send_join v2, make_leave / send_leave v2, invite v2), in both directions.

use ruma::events::room::member::MembershipState;
use std::collections::{HashMap, HashSet};

use federation::{
    auth,
    pdu::{MembershipRequest, Pdu, add_signatures_of, cosign_event, room_version_rules, sign_membership_template},
};
use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, OwnedServerName, OwnedUserId, RoomId, RoomVersionId, ServerName,
    UserId,
    api::federation::backfill::get_backfill,
    api::federation::membership::{
        RawStrippedState, create_invite, create_join_event, create_leave_event, prepare_join_event, prepare_leave_event,
    },
    events::StateEventType,
};
use serde_json::{Value as JsonValue, value::RawValue as RawJsonValue};

use super::{
    Hub,
    notifier::{Change, Sections},
    received::VerifiedEvent,
    timeline::{BuiltEvent, EventDraft},
};
use crate::{
    error::{Error, Result},
    store::{AppendEvent, JoinedRoom, now_ms},
};

/// Room versions we can join on another server: we sign events with hash-based ids (v3+).
pub const JOINABLE_ROOM_VERSIONS: [RoomVersionId; 10] = [
    RoomVersionId::V3,
    RoomVersionId::V4,
    RoomVersionId::V5,
    RoomVersionId::V6,
    RoomVersionId::V7,
    RoomVersionId::V8,
    RoomVersionId::V9,
    RoomVersionId::V10,
    RoomVersionId::V11,
    RoomVersionId::V12,
];

/// Events of history fetched with a join.
const JOIN_HISTORY: u64 = 50;

/// The state and auth chain answered to a send_join.
pub struct JoinState {
    pub state: Vec<Box<RawJsonValue>>,
    pub auth_chain: Vec<Box<RawJsonValue>>,
}

/// A membership we ask another server to let one of our users make.
#[derive(Clone, Copy)]
enum Outward {
    Join,
    Leave,
}

impl Outward {
    fn as_str(self) -> &'static str {
        match self {
            Outward::Join => "join",
            Outward::Leave => "leave",
        }
    }
}

/// A join or leave of `user` asked of `server`.
#[derive(Clone, Copy)]
struct Asked<'a> {
    room_id: &'a RoomId,
    user: &'a UserId,
    server: &'a ServerName,
    membership: Outward,
    reason: Option<&'a str>,
}

/// Our signed membership event, from a template.
struct Signed {
    version: RoomVersionId,
    event_id: OwnedEventId,
    object: CanonicalJsonObject,
}

pub(super) fn raw(json: &str) -> Result<Box<RawJsonValue>> {
    RawJsonValue::from_string(json.to_owned()).map_err(|e| Error::internal(e.to_string()))
}

fn raw_object(object: &CanonicalJsonObject) -> Result<Box<RawJsonValue>> {
    serde_json::value::to_raw_value(object).map_err(|e| Error::internal(e.to_string()))
}

/// A template to hand out (make_join / make_leave): our built event without hashes and
/// signatures.
fn template_of(mut object: CanonicalJsonObject) -> Result<Box<RawJsonValue>> {
    object.remove("hashes");
    object.remove("signatures");
    raw_object(&object)
}

/// Membership across servers: our users joining, leaving and inviting in other servers'
/// rooms, and other servers' users doing so in ours.
pub struct RemoteRooms {
    hub: Hub,
}

impl RemoteRooms {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

impl RemoteRooms {
    // ---- our users in other servers' rooms ----

    /// Joins `user` to a room this server is not in, through one of `servers`.
    pub async fn join(
        &self,
        room_id: &RoomId,
        user: &UserId,
        servers: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<OwnedEventId> {
        self.through_any(room_id, user, servers, Outward::Join, reason).await
    }

    /// Rejects an invite (or leaves a room this server is no longer in) through the
    /// inviting server.
    pub async fn leave(
        &self,
        room_id: &RoomId,
        user: &UserId,
        servers: &[OwnedServerName],
        reason: Option<&str>,
    ) -> Result<OwnedEventId> {
        self.through_any(room_id, user, servers, Outward::Leave, reason).await
    }

    /// Makes the membership through the first of `servers` (other than us) that lets us.
    async fn through_any(
        &self,
        room_id: &RoomId,
        user: &UserId,
        servers: &[OwnedServerName],
        membership: Outward,
        reason: Option<&str>,
    ) -> Result<OwnedEventId> {
        let s = self.hub.services();
        let mut last_error = Error::NotFound(format!("No server to {} the room through", membership.as_str()));
        for server in servers.iter().filter(|server| **server != s.settings.server_name) {
            let asked = Asked { room_id, user, server, membership, reason };
            let result = match membership {
                Outward::Join => self.join_through(asked).await,
                Outward::Leave => self.leave_through(asked).await,
            };
            match result {
                Ok(id) => return Ok(id),
                Err(e) => {
                    tracing::info!(%room_id, %server, membership = membership.as_str(), error = %e, "cannot make the membership through this server");
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }

    async fn join_through(&self, asked: Asked<'_>) -> Result<OwnedEventId> {
        let s = self.hub.services();
        let Asked { room_id, user, server, .. } = asked;
        let mut request = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
        request.ver = JOINABLE_ROOM_VERSIONS.to_vec();
        let template = s.fed.send(server, request).await?;
        let Signed { version, event_id, object } =
            self.sign_template(asked, template.room_version, &template.event).await?;
        let response = s
            .fed
            .send(
                server,
                create_join_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw_object(&object)?),
            )
            .await?;
        let state = response.room_state;
        // A restricted join comes back signed by the resident server too: its signature is
        // all we take from the answer, the event stays ours.
        let join_raw = match &state.event {
            Some(event) => raw_object(
                &add_signatures_of(&object, event, server, &version)
                    .map_err(|e| Error::RemoteUnavailable(format!("{server} changed our join event: {e}")))?,
            )?,
            None => raw_object(&object)?,
        };
        let join = s.receiver.verify_pdu(&join_raw, &version).await?;
        if join.event_id != event_id {
            return Err(Error::RemoteUnavailable(format!("{server} changed our join event")));
        }
        let history = self.fetch_history(server, room_id, &version, &join.pdu).await;
        self.persist_join(room_id, &version, join, &state.state, &state.auth_chain, history).await?;
        tracing::info!(%room_id, %user, %server, "joined a room on another server");
        Ok(event_id)
    }

    /// The room's recent history before our join (`/backfill` from the server we joined
    /// through), so the joining user sees what was said before. Best effort: events that do
    /// not verify are left out, and a failed request leaves no history.
    async fn fetch_history(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        version: &RoomVersionId,
        join: &Pdu,
    ) -> Vec<VerifiedEvent> {
        let s = self.hub.services();
        let limit = ruma::UInt::try_from(JOIN_HISTORY).unwrap_or_default();
        let request = get_backfill::v1::Request::new(room_id.to_owned(), join.prev_events.clone(), limit);
        let response = match s.fed.send(server, request).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%room_id, %server, error = %e, "no history before the join");
                return Vec::new();
            }
        };
        if response.pdus.len() as u64 > JOIN_HISTORY {
            // An honest server answers with at most what was asked for.
            tracing::info!(%room_id, %server, events = response.pdus.len(), "dropped a backfill answer longer than asked");
            return Vec::new();
        }
        let mut events = Vec::new();
        for raw in &response.pdus {
            match s.receiver.verify_pdu(raw, version).await {
                Ok(event) if event.pdu.room_id.as_deref() == Some(room_id) => events.push(event),
                Ok(_) => {}
                Err(e) => tracing::info!(%room_id, error = %e, "dropped a backfilled event"),
            }
        }
        events
    }

    /// Checks the state and auth chain of a send_join answer (and the history before the
    /// join) and stores the room.
    async fn persist_join(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        join: VerifiedEvent,
        state: &[Box<RawJsonValue>],
        auth_chain: &[Box<RawJsonValue>],
        history: Vec<VerifiedEvent>,
    ) -> Result<()> {
        let s = self.hub.services();
        let rules = room_version_rules(version).map_err(|e| Error::internal(e.to_string()))?;
        // Every event must verify; bad ones are dropped (and then cannot authorize anything).
        let mut events: HashMap<OwnedEventId, VerifiedEvent> = HashMap::new();
        let mut state_ids = Vec::new();
        for (raw, is_state) in auth_chain.iter().map(|r| (r, false)).chain(state.iter().map(|r| (r, true))) {
            match s.receiver.verify_pdu(raw, version).await {
                Ok(event) => {
                    if is_state {
                        state_ids.push(event.event_id.clone());
                    }
                    events.insert(event.event_id.clone(), event);
                }
                Err(e) => tracing::info!(%room_id, error = %e, "dropped an event of the joined room's state"),
            }
        }
        let history_ids: HashSet<OwnedEventId> = history.iter().map(|e| e.event_id.clone()).collect();
        for event in history {
            events.entry(event.event_id.clone()).or_insert(event);
        }
        let pdus: HashMap<OwnedEventId, Pdu> = events.iter().map(|(id, e)| (id.clone(), e.pdu.clone())).collect();
        let create = pdus
            .values()
            .find(|p| p.kind == ruma::events::TimelineEventType::RoomCreate && p.state_key.as_deref() == Some(""))
            .cloned()
            .ok_or_else(|| Error::RemoteUnavailable("the joined room's state has no create event".to_owned()))?;
        // Each event must be authorized by its own auth events (oldest first, so an event
        // whose auth events were refused is refused too).
        let mut order: Vec<&Pdu> = pdus.values().collect();
        order.sort_by_key(|p| (p.depth, p.origin_server_ts));
        let mut authorized: HashSet<OwnedEventId> = HashSet::new();
        for pdu in order {
            let auth_events: HashMap<OwnedEventId, Pdu> = pdu
                .auth_events
                .iter()
                .chain(std::iter::once(&create.event_id))
                .filter(|id| authorized.contains(*id) || **id == create.event_id)
                .filter_map(|id| pdus.get(id).map(|p| (id.clone(), p.clone())))
                .collect();
            let auth_state: HashMap<(StateEventType, String), Pdu> = auth_events
                .values()
                .filter_map(|e| e.state_key.clone().map(|k| ((e.kind.to_string().into(), k), e.clone())))
                .collect();
            match auth::authorize(&rules.authorization, pdu, &auth_events, &auth_state) {
                Ok(()) => {
                    authorized.insert(pdu.event_id.clone());
                }
                Err(reason) => tracing::info!(event_id = %pdu.event_id, %reason, "refused an event of the joined room"),
            }
        }
        // The join must be allowed by the state it joins.
        let mut state_map: HashMap<(StateEventType, String), Pdu> = HashMap::new();
        for id in state_ids.iter().filter(|id| authorized.contains(*id)) {
            let pdu = &pdus[id];
            if let Some(key) = &pdu.state_key {
                state_map.insert((pdu.kind.to_string().into(), key.clone()), pdu.clone());
            }
        }
        let mut all = pdus.clone();
        all.insert(join.event_id.clone(), join.pdu.clone());
        auth::authorize(&rules.authorization, &join.pdu, &all, &state_map)
            .map_err(|reason| Error::Forbidden(format!("the join is not allowed by the room's state: {reason}")))?;

        // Store: the state and the history as timeline events (oldest first), the rest of
        // the auth chain as outliers, then the join, after which the current state is exactly
        // the state the join was authorized by (whatever order the history came in).
        let mut timeline_ids: HashSet<OwnedEventId> = state_map.values().map(|p| p.event_id.clone()).collect();
        timeline_ids.extend(history_ids.into_iter().filter(|id| authorized.contains(id)));
        timeline_ids.remove(&join.event_id);
        let mut state_events: Vec<&VerifiedEvent> = timeline_ids.iter().map(|id| &events[id]).collect();
        state_events.sort_by_key(|e| (e.pdu.depth, e.pdu.origin_server_ts));
        let mut resolved: Vec<crate::store::CurrentStateEntry> = state_map
            .iter()
            .map(|((kind, key), p)| (kind.to_string(), key.clone(), p.event_id.to_string(), membership_of(p)))
            .collect();
        resolved.retain(|(kind, key, _, _)| !(kind == "m.room.member" && key == join.pdu.sender.as_str()));
        resolved.push((
            "m.room.member".to_owned(),
            join.pdu.sender.to_string(),
            join.event_id.to_string(),
            Some("join".to_owned()),
        ));
        let in_state: HashSet<&OwnedEventId> = state_events.iter().map(|e| &e.event_id).collect();
        let outliers: Vec<(String, String)> = events
            .values()
            .filter(|e| authorized.contains(&e.event_id) && !in_state.contains(&e.event_id))
            .map(|e| (e.event_id.to_string(), e.json.clone()))
            .collect();
        // The join's state: the state it was authorized by before it, itself after it. The
        // state and history stored before it keep no state of their own (it is not known).
        let join_state = super::state::join_state_groups(&state_map, &join.pdu);
        let lock = s.timeline.room_lock(room_id);
        let _guard = lock.lock().await;
        let positions: Vec<_> = (0..=state_events.len()).map(|_| s.streams.allocate()).collect();
        let owned: Vec<OwnedAppend> = state_events.iter().map(|e| OwnedAppend::of(&e.pdu, &e.json)).collect();
        let join_owned = OwnedAppend::of(&join.pdu, &join.json);
        let appends: Vec<AppendEvent<'_>> =
            owned.iter().zip(&positions).map(|(o, p)| o.as_append(room_id, p.position())).collect();
        let join_position = positions.last().map(|p| p.position()).unwrap_or_default();
        s.store
            .persist_joined_room(
                JoinedRoom {
                    room_id: room_id.as_str(),
                    room_version: version.as_str(),
                    creator: create.sender.as_str(),
                    outliers: &outliers,
                    state: appends,
                    join: AppendEvent {
                        resolved_state: Some(&resolved),
                        state: Some(&join_state),
                        ..join_owned.as_append(room_id, join_position)
                    },
                },
                now_ms(),
            )
            .await?;
        // Written around the append path: the caches forget the room and its members.
        s.room_cache.invalidate(room_id);
        let mut changes = vec![Change::room(room_id.to_owned(), Sections::TIMELINE | Sections::DEVICE_LISTS)];
        for e in state_events.iter().map(|e| &e.pdu).chain(std::iter::once(&join.pdu)) {
            if e.kind == ruma::events::TimelineEventType::RoomMember
                && let Some(user) = e.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok())
                && user.server_name() == s.settings.server_name
            {
                s.rooms.forget_user(user.as_str());
                s.sync.forget_unread(&user, room_id);
                changes.push(Change::user(user, Sections::MEMBERSHIP));
            }
        }
        let mut positions = positions;
        let last = positions.pop();
        for position in positions {
            position.commit_with(Vec::new());
        }
        if let Some(last) = last {
            last.commit_with(changes);
        }
        Ok(())
    }

    async fn leave_through(&self, asked: Asked<'_>) -> Result<OwnedEventId> {
        let s = self.hub.services();
        let Asked { room_id, user, server, .. } = asked;
        let template =
            s.fed.send(server, prepare_leave_event::v1::Request::new(room_id.to_owned(), user.to_owned())).await?;
        let Signed { event_id, object, .. } = self.sign_template(asked, template.room_version, &template.event).await?;
        s.fed
            .send(
                server,
                create_leave_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw_object(&object)?),
            )
            .await?;
        // We are not in the room, so we cannot authorize it ourselves; the resident server did.
        let json = serde_json::to_string(&object).map_err(|e| Error::internal(e.to_string()))?;
        let pdu = Pdu::from_json(event_id.clone(), &json).map_err(|e| Error::internal(e.to_string()))?;
        let lock = s.timeline.room_lock(room_id);
        let _guard = lock.lock().await;
        s.timeline.persist(room_id, BuiltEvent::new(event_id.clone(), object, json, pdu), None, &[]).await?;
        Ok(event_id)
    }

    /// Our membership event made from another server's make_join / make_leave template: the
    /// room version checked, our content put in, signed by us.
    async fn sign_template(
        &self,
        asked: Asked<'_>,
        version: Option<RoomVersionId>,
        template: &RawJsonValue,
    ) -> Result<Signed> {
        let s = self.hub.services();
        let Asked { room_id, user, server, membership, reason } = asked;
        let version = version.unwrap_or(RoomVersionId::V1);
        if !JOINABLE_ROOM_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedRoomVersion(match membership {
                Outward::Join => format!("Room version {version} cannot be joined"),
                Outward::Leave => format!("Room version {version} cannot be left through {server}"),
            }));
        }
        let content = s.rooms.member_content(user, &MembershipState::from(membership.as_str()), reason).await?;
        let request = MembershipRequest { room_id, user_id: user, membership: membership.as_str() };
        let (event_id, object) =
            sign_membership_template(template, request, content, &version, &s.settings.server_name, &s.signing_key)
                .map_err(|e| {
                    Error::RemoteUnavailable(format!("{server} sent a bad {} template: {e}", membership.as_str()))
                })?;
        Ok(Signed { version, event_id, object })
    }

    /// Invites a user of another server: their server co-signs the invite, then it is
    /// appended and sent to the room's other servers.
    pub async fn invite(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        content: JsonValue,
    ) -> Result<OwnedEventId> {
        let s = self.hub.services();
        let version = s.rooms.version(room_id.as_str()).await?;
        let built = {
            let lock = s.timeline.room_lock(room_id);
            let _guard = lock.lock().await;
            s.timeline.build(room_id, sender, EventDraft::state("m.room.member", target.as_str(), content)).await?
        };
        let invite_room_state = self.stripped_state_pdus(room_id, sender).await?;
        let request = create_invite::v2::Request::new(
            room_id.to_owned(),
            built.event_id.clone(),
            version.clone(),
            raw_object(&built.object)?,
            invite_room_state,
        );
        let response = s.fed.send(target.server_name(), request).await?;
        // The answer is our event with the invitee's server's signature added. Only that
        // signature is taken: the event id is a hash of the redacted event, so an answer with
        // the same id could still differ in what redaction drops (a reason, extra keys).
        let object = add_signatures_of(&built.object, &response.event, target.server_name(), &version)
            .map_err(|e| Error::RemoteUnavailable(format!("the invited user's server changed the invite: {e}")))?;
        let json = serde_json::to_string(&object).map_err(|e| Error::internal(e.to_string()))?;
        let lock = s.timeline.room_lock(room_id);
        let _guard = lock.lock().await;
        // The invitee's server has the event from the invite request already; it still gets
        // it through /send when it is in the room, because there the invite is part of the
        // room's graph that the next events build on (Synapse keeps an invite it co-signed as an
        // outlier and would otherwise find a gap before them).
        let except = if self.server_has_joined_member(room_id, target.server_name()).await? {
            None
        } else {
            Some(target.server_name())
        };
        let destinations = s.timeline.destinations_for(room_id, &built.pdu, except).await?;
        // The room may have moved on while we waited: the state plan is made again now.
        s.timeline.persist(room_id, BuiltEvent { json, object, state: None, ..built }, None, &destinations).await
    }

    /// Whether a user of `server` is joined to the room.
    async fn server_has_joined_member(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        let s = self.hub.services();
        let members = s.room_cache.joined_members(room_id).await?;
        Ok(members.iter().any(|(user, _)| UserId::parse(user.as_str()).is_ok_and(|u| u.server_name() == server)))
    }

    /// The state an invitee's server is shown, as full PDUs (Matrix 1.16).
    async fn stripped_state_pdus(&self, room_id: &RoomId, sender: &UserId) -> Result<Vec<RawStrippedState>> {
        let s = self.hub.services();
        let mut out = Vec::new();
        for (kind, key) in [
            ("m.room.create", ""),
            ("m.room.join_rules", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.topic", ""),
            ("m.room.canonical_alias", ""),
            ("m.room.encryption", ""),
            ("m.room.member", sender.as_str()),
        ] {
            if let Some(row) = s.store.current_state_event(room_id.as_str(), kind, key).await? {
                out.push(RawStrippedState::Pdu(raw(&row.json)?));
            }
        }
        Ok(out)
    }

    // ---- other servers' users in our rooms ----

    /// The template for make_join / make_leave: the membership event as we would build it
    /// now. Building it also authorizes it, so a join the room does not allow is refused here.
    pub async fn membership_template(
        &self,
        room_id: &RoomId,
        user: &UserId,
        origin: &ServerName,
        membership: &str,
    ) -> Result<(RoomVersionId, Box<RawJsonValue>)> {
        let s = self.hub.services();
        if user.server_name() != origin {
            return Err(Error::Forbidden("The user is not on the asking server".to_owned()));
        }
        if s.store.room(room_id.as_str()).await?.is_none() || !s.servers.we_are_in(room_id).await? {
            return Err(Error::NotFound("This server is not in that room".to_owned()));
        }
        s.servers.check_acl(room_id, origin).await?;
        let version = s.rooms.version(room_id.as_str()).await?;
        let lock = s.timeline.room_lock(room_id);
        let _guard = lock.lock().await;
        let content = serde_json::json!({"membership": membership});
        let built = s.timeline.build(room_id, user, EventDraft::state("m.room.member", user.as_str(), content)).await?;
        Ok((version, template_of(built.object)?))
    }

    /// send_join / send_leave: checks the signed membership event from `origin`, appends it
    /// and passes it on to the room's other servers.
    pub async fn take_membership(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
        raw: &RawJsonValue,
        origin: &ServerName,
        membership: &str,
    ) -> Result<()> {
        let s = self.hub.services();
        if !s.servers.we_are_in(room_id).await? {
            return Err(Error::NotFound("This server is not in that room".to_owned()));
        }
        s.servers.check_acl(room_id, origin).await?;
        let version = s.rooms.version(room_id.as_str()).await?;
        let event = s.receiver.verify_pdu(raw, &version).await?;
        let pdu = &event.pdu;
        let content: JsonValue = serde_json::from_str(pdu.content.get()).unwrap_or_default();
        if event.event_id != event_id
            || pdu.room_id.as_deref() != Some(room_id)
            || pdu.kind != ruma::events::TimelineEventType::RoomMember
            || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
            || pdu.sender.server_name() != origin
            || content["membership"] != membership
        {
            return Err(Error::BadJson(format!("not a {membership} event of a user of {origin} for this room")));
        }
        match s.receiver.accept(room_id, event, origin, true).await? {
            super::received::Accepted::SoftFailed => {
                Err(Error::Forbidden("The event is not allowed by the room's current state".to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// The room's state before `except` (the join, just appended) and the auth chain of both,
    /// for send_join.
    pub async fn state_and_auth_chain(&self, room_id: &RoomId, except: &EventId) -> Result<JoinState> {
        let s = self.hub.services();
        let mut state = Vec::new();
        match s.state.ids_before_event(room_id, except).await? {
            Some(before) => {
                let ids: Vec<String> = before.values().cloned().collect();
                state.extend(s.store.any_events_json(&ids).await?.into_iter().map(|(_, _, json)| json));
            }
            None => {
                for row in s.store.current_state(room_id.as_str()).await? {
                    if row.event_id != except.as_str() {
                        state.push(row.json);
                    }
                }
            }
        }
        let mut seen: HashSet<String> = HashSet::new();
        let mut frontier: Vec<String> = Vec::new();
        for json in &state {
            frontier.extend(auth_event_ids(json));
        }
        // The join's own auth events too (an invite it replaced is in no state any more).
        for (_, _, json) in s.store.any_events_json(&[except.to_string()]).await? {
            frontier.extend(auth_event_ids(&json));
        }
        let mut auth_chain = Vec::new();
        while !frontier.is_empty() {
            let batch: Vec<String> = frontier.drain(..).filter(|id| seen.insert(id.clone())).collect();
            for (_, _, json) in s.store.any_events_json(&batch).await? {
                frontier.extend(auth_event_ids(&json));
                auth_chain.push(raw(&json)?);
            }
        }
        Ok(JoinState { state: state.iter().map(|json| raw(json)).collect::<Result<_>>()?, auth_chain })
    }

    /// An invite from another server for one of our users: checked, co-signed and stored so
    /// the user's syncs show it. Returns the co-signed event.
    pub async fn take_invite(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
        version: &RoomVersionId,
        raw: &RawJsonValue,
        invite_room_state: &[RawStrippedState],
        origin: &ServerName,
    ) -> Result<Box<RawJsonValue>> {
        let s = self.hub.services();
        if version.rules().is_none() {
            return Err(Error::IncompatibleRoomVersion(version.clone()));
        }
        // Invites are among the requests a room's server ACL governs.
        s.servers.check_acl(room_id, origin).await?;
        let known = s.store.room(room_id.as_str()).await?;
        if let Some(room) = &known
            && room.room_version != version.as_str()
        {
            return Err(Error::BadJson(format!("{room_id} is a room of version {}", room.room_version)));
        }
        let event = s.receiver.verify_pdu(raw, version).await?;
        let pdu = &event.pdu;
        let content: JsonValue = serde_json::from_str(pdu.content.get()).unwrap_or_default();
        let target = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok());
        let Some(target) = target.filter(|t| t.server_name() == s.settings.server_name) else {
            return Err(Error::BadJson("the invite is not for a user of this server".to_owned()));
        };
        if event.event_id != event_id
            || pdu.room_id.as_deref() != Some(room_id)
            || pdu.kind != ruma::events::TimelineEventType::RoomMember
            || content["membership"] != "invite"
            || pdu.sender.server_name() != origin
        {
            return Err(Error::BadJson("not an invite from that server for this room".to_owned()));
        }
        if s.store.user(target.as_str()).await?.is_none() {
            return Err(Error::NotFound("No such user".to_owned()));
        }
        let mut object = event.object.clone();
        cosign_event(&mut object, version, &s.settings.server_name, &s.signing_key)
            .map_err(|e| Error::internal(e.to_string()))?;
        let json = serde_json::to_string(&object).map_err(|e| Error::internal(e.to_string()))?;
        if s.servers.we_are_in(room_id).await? {
            // We are in the room: the invite is checked like any other event (the inviting
            // server sends it through /send too; whichever comes first is kept).
            let verified = VerifiedEvent { json, object: object.clone(), ..event };
            if s.receiver.accept(room_id, verified, origin, false).await? == super::received::Accepted::SoftFailed {
                return Err(Error::Forbidden("The invite is not allowed by the room's current state".to_owned()));
            }
        } else {
            if known.is_some() {
                // A room we were in: what we know of it still counts.
                s.receiver.check_invite_into_left_room(room_id, version, &event, origin).await?;
            }
            let creator = invite_room_state
                .iter()
                .filter_map(|s| match s {
                    RawStrippedState::Pdu(raw) => serde_json::from_str::<JsonValue>(raw.get()).ok(),
                    _ => None,
                })
                .find(|e| e["type"] == "m.room.create")
                .and_then(|e| e["sender"].as_str().map(str::to_owned))
                .unwrap_or_else(|| pdu.sender.to_string());
            if known.is_none() {
                // Only a room we do not know yet takes the inviting server's word for its
                // creator; a known room's row is not the inviting server's to change.
                s.store.upsert_remote_room(room_id.as_str(), version.as_str(), &creator, now_ms()).await?;
            }
            // What the inviting server showed of the room (name, topic, ...), for the invite in
            // the user's syncs: stripped to type, state key, sender and content.
            let stripped: Vec<JsonValue> = invite_room_state
                .iter()
                .filter_map(|s| match s {
                    RawStrippedState::Pdu(raw) => serde_json::from_str::<JsonValue>(raw.get()).ok(),
                    #[allow(deprecated)]
                    RawStrippedState::Stripped(raw) => serde_json::from_str::<JsonValue>(raw.json().get()).ok(),
                    _ => None,
                })
                .filter(|e| e["type"].is_string() && e["state_key"].is_string())
                .map(|e| {
                    serde_json::json!({
                        "type": e["type"], "state_key": e["state_key"], "sender": e["sender"], "content": e["content"],
                    })
                })
                .collect();
            let stripped = serde_json::to_string(&stripped).map_err(|e| Error::internal(e.to_string()))?;
            s.store.set_remote_invite_state(room_id.as_str(), target.as_str(), &stripped).await?;
            s.room_cache.invalidate(room_id);
            let lock = s.timeline.room_lock(room_id);
            let _guard = lock.lock().await;
            if s.store.any_events_json(&[event_id.to_string()]).await?.is_empty() {
                let built = BuiltEvent::new(event.event_id, object.clone(), json, event.pdu);
                s.timeline.persist(room_id, built, None, &[]).await?;
            }
        }
        tracing::info!(%room_id, %target, %origin, "received an invite from another server");
        raw_object(&object)
    }

    /// Servers that may know a room we are invited to or were in: the inviter's, the
    /// senders of the room's state, the room id's (before v12).
    pub async fn servers_for(&self, room_id: &RoomId, user: &UserId) -> Result<Vec<OwnedServerName>> {
        let s = self.hub.services();
        let mut servers = Vec::new();
        if let Some(row) = s.store.current_state_event(room_id.as_str(), "m.room.member", user.as_str()).await?
            && let Ok(sender) = UserId::parse(row.sender.as_str())
        {
            servers.push(sender.server_name().to_owned());
        }
        for member in s.store.room_members(room_id.as_str(), &MembershipState::Join).await? {
            if let Ok(member) = UserId::parse(member.as_str())
                && !servers.iter().any(|s| s == member.server_name())
            {
                servers.push(member.server_name().to_owned());
            }
        }
        if let Some(server) = room_id.server_name()
            && !servers.iter().any(|s| s == server)
        {
            servers.push(server.to_owned());
        }
        Ok(servers)
    }
}

fn membership_of(pdu: &Pdu) -> Option<String> {
    (pdu.kind == ruma::events::TimelineEventType::RoomMember)
        .then(|| serde_json::from_str::<JsonValue>(pdu.content.get()).ok())
        .flatten()
        .and_then(|c| c["membership"].as_str().map(str::to_owned))
}

pub(super) fn auth_event_ids(json: &str) -> Vec<String> {
    event_ids_in(json, "auth_events")
}

/// The ids listed in an event's `field` (`auth_events`, `prev_events`), in either the
/// current format or room versions 1 and 2's `[id, hashes]` pairs.
pub(super) fn event_ids_in(json: &str, field: &str) -> Vec<String> {
    let value: JsonValue = serde_json::from_str(json).unwrap_or_default();
    value[field]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().or_else(|| id.get(0).and_then(|i| i.as_str())))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The parts of an [`AppendEvent`] for an event from another server, owned.
struct OwnedAppend {
    event_id: String,
    depth: i64,
    event_type: String,
    state_key: Option<String>,
    sender: String,
    origin_server_ts: i64,
    json: String,
    prev_events: Vec<String>,
    membership: Option<String>,
}

impl OwnedAppend {
    fn of(pdu: &Pdu, json: &str) -> Self {
        let membership = membership_of(pdu);
        Self {
            event_id: pdu.event_id.to_string(),
            depth: i64::try_from(u64::from(pdu.depth)).unwrap_or(i64::MAX),
            event_type: pdu.kind.to_string(),
            state_key: pdu.state_key.clone(),
            sender: pdu.sender.to_string(),
            origin_server_ts: i64::try_from(u64::from(pdu.origin_server_ts.get())).unwrap_or(i64::MAX),
            json: json.to_owned(),
            prev_events: pdu.prev_events.iter().map(|id| id.to_string()).collect(),
            membership,
        }
    }

    fn as_append<'a>(&'a self, room_id: &'a RoomId, stream_ordering: i64) -> AppendEvent<'a> {
        AppendEvent {
            stream_ordering,
            event_id: &self.event_id,
            room_id: room_id.as_str(),
            depth: self.depth,
            event_type: &self.event_type,
            state_key: self.state_key.as_deref(),
            sender: &self.sender,
            origin_server_ts: self.origin_server_ts,
            json: &self.json,
            prev_events: &self.prev_events,
            membership: self.membership.as_deref(),
            txn: None,
            redacts: None,
            new_room: None,
            relates_to: None,
            push_actions: &[],
            search_text: None,
            destinations: &[],
            resolved_state: None,
            state: None,
            promotes_outlier: false,
            state_from_outliers: &[],
        }
    }
}
