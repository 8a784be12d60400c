//! Appending events to rooms: build the PDU, authorize it against the room state, persist it,
//! wake the syncs. Appends to one room are serialized by a per-room lock; different rooms
//! proceed in parallel.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use federation::{
    auth,
    pdu::{NewEvent, Pdu, room_id_from_create_event, room_version_rules, sign_new_event},
};
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UInt, UserId,
    api::Direction, events::StateEventType,
};
use serde_json::Value as JsonValue;

use super::{
    Hub,
    notifier::{Change, Sections},
    redactions::RedactionVerdict,
    state::StatePlan,
};
use crate::{
    error::{Error, Result},
    store::{
        AppendEvent, AppendOutcome, CurrentGroup, EventRow, EventStateGroups, GroupBase, GroupRef, NewRoom,
        NewStateGroup, StateFromOutlier,
    },
};

/// Most prev_events a new event points at.
const MAX_PREV_EVENTS: usize = 10;
/// Largest PDU the spec allows.
pub const MAX_PDU_BYTES: usize = 65_536;
/// The largest depth we give an event. The spec bounds depth by its integer range (at most
/// 2^63 - 1), but canonical JSON, which every event is signed in, allows integers up to
/// 2^53 - 1 only: one received event at that depth would make max(prev depths) + 1
/// unsignable and every later event of ours in the room impossible. So our events' depth
/// stops growing there; depth only orders events loosely (the spec's tie-breaks and
/// `get_missing_events`' `min_depth`), and a run of events at the same depth stays valid.
pub const MAX_DEPTH: i64 = 9_007_199_254_740_991;

/// An event a local user wants to add to a room.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub event_type: String,
    pub state_key: Option<String>,
    pub content: JsonValue,
    pub redacts: Option<OwnedEventId>,
}

impl EventDraft {
    pub fn state(event_type: &str, state_key: &str, content: JsonValue) -> Self {
        Self { event_type: event_type.to_owned(), state_key: Some(state_key.to_owned()), content, redacts: None }
    }

    pub fn message(event_type: &str, content: JsonValue) -> Self {
        Self { event_type: event_type.to_owned(), state_key: None, content, redacts: None }
    }
}

/// A client transaction, for idempotent sends. The spec scopes transaction ids to the device
/// and the endpoint: the same id in another room, for another event type or another
/// redacted event is another request.
#[derive(Debug, Clone, Copy)]
pub struct Txn<'a> {
    pub device_id: &'a str,
    /// The endpoint path without the transaction id, e.g. `send/{room}/{type}` or
    /// `redact/{room}/{event}`.
    pub scope: &'a str,
    pub txn_id: &'a str,
}

/// Per-room append locks.
#[derive(Default)]
pub struct RoomLocks {
    locks: Mutex<RoomLockMap>,
}

#[derive(Default)]
struct RoomLockMap {
    by_room: HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>,
    /// Past this many entries the map drops the locks nobody holds or waits for.
    prune_at: usize,
}

/// Room locks kept at least until this many rooms were touched.
const ROOM_LOCKS_KEPT: usize = 1024;

impl RoomLocks {
    fn get(&self, room_id: &RoomId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.by_room.len() >= locks.prune_at.max(ROOM_LOCKS_KEPT) {
            // A lock only the map refers to is neither held nor awaited (both need a clone,
            // taken under this same mutex), so dropping it is safe; without this the map
            // grew by one entry per room ever written to. Pruning again only once the map
            // doubles keeps the cost per call constant.
            locks.by_room.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.prune_at = locks.by_room.len() * 2;
        }
        locks.by_room.entry(room_id.to_owned()).or_default().clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|e| e.into_inner()).by_room.len()
    }
}

#[cfg(test)]
mod room_lock_tests {
    use super::*;

    #[test]
    fn unused_room_locks_are_dropped_and_held_ones_kept() {
        let locks = RoomLocks::default();
        let kept_room: OwnedRoomId = "!kept:localhost".try_into().unwrap();
        let held = locks.get(&kept_room);
        for i in 0..10_000 {
            let room: OwnedRoomId = format!("!room{i}:localhost").try_into().unwrap();
            drop(locks.get(&room));
        }
        assert!(locks.len() <= 2 * ROOM_LOCKS_KEPT, "the map holds {} locks", locks.len());
        // The held lock survived every prune: the same mutex comes back.
        assert!(Arc::ptr_eq(&held, &locks.get(&kept_room)));
    }
}

/// A new room's first event: the create event, whose id may name the room.
pub struct CreateRoom<'a> {
    pub version: &'a RoomVersionId,
    pub published: bool,
    /// For room versions before 12, the room id chosen by the caller.
    pub room_id: Option<OwnedRoomId>,
}

/// Building, authorizing and appending events. Appends to one room are serialized by the
/// room's lock (`locks`); different rooms proceed in parallel.
pub struct Timeline {
    hub: Hub,
    locks: RoomLocks,
}

impl Timeline {
    pub fn new(hub: Hub) -> Self {
        Self { hub, locks: RoomLocks::default() }
    }

    /// A room's events between the positions `from` and `to` (bounds as
    /// `store::room_events` takes them), at most `limit`, newest first going backward.
    pub async fn page(&self, room_id: &str, from: i64, to: i64, limit: i64, dir: Direction) -> Result<Vec<EventRow>> {
        let s = self.hub.services();
        Ok(s.store.room_events(room_id, from, to, limit, dir == Direction::Backward).await?)
    }

    /// Creates a room with its `m.room.create` event and returns the room id.
    pub async fn append_create(
        &self,
        sender: &UserId,
        create: CreateRoom<'_>,
        content: JsonValue,
    ) -> Result<OwnedRoomId> {
        let s = self.hub.services();
        // From room version 12 the room id is the create event's hash, so the same user
        // creating two rooms with the same content in the same millisecond would get the same
        // room twice (seen under concurrent createRoom: a UNIQUE violation answered as a 500).
        // Under the room's lock, a room id already taken moves the timestamp on by 1 ms.
        let mut origin_server_ts = now_ts();
        let (event_id, room_id, json, pdu, _guard) = loop {
            let new = NewEvent {
                room_id: create.room_id.clone(),
                sender: sender.to_owned(),
                event_type: "m.room.create".to_owned(),
                state_key: Some(String::new()),
                content: content.clone(),
                redacts: None,
                prev_events: Vec::new(),
                auth_events: Vec::new(),
                depth: 1,
                origin_server_ts,
            };
            let (event_id, object) = sign_new_event(new, create.version, &s.settings.server_name, &s.signing_key)
                .map_err(|e| Error::BadJson(e.to_string()))?;
            let room_id = match room_id_from_create_event(create.version, &event_id)
                .map_err(|e| Error::internal(e.to_string()))?
            {
                Some(id) => id,
                None => create
                    .room_id
                    .clone()
                    .ok_or_else(|| Error::internal("a room id is needed for this room version"))?,
            };
            let json = serde_json::to_string(&object).map_err(|e| Error::internal(e.to_string()))?;
            let pdu = Pdu::from_json(event_id.clone(), &json).map_err(|e| Error::internal(e.to_string()))?;
            let rules = room_version_rules(create.version).map_err(|e| Error::internal(e.to_string()))?;
            auth::authorize(&rules.authorization, &pdu, &HashMap::new(), &HashMap::new()).map_err(Error::Forbidden)?;
            let guard = self.locks.get(&room_id).lock_owned().await;
            if s.store.room(room_id.as_str()).await?.is_none() {
                break (event_id, room_id, json, pdu, guard);
            }
            if create.room_id.is_some() {
                return Err(Error::internal("a newly generated room id is already taken"));
            }
            origin_server_ts = MilliSecondsSinceUnixEpoch(origin_server_ts.0 + ruma::UInt::from(1u32));
        };
        let position = s.streams.allocate();
        // The state before the create event is empty; after it, the create event.
        let state = EventStateGroups {
            before: GroupRef::New(NewStateGroup { prev: None, chain_len: 0, entries: Vec::new() }),
            after: Some(NewStateGroup {
                prev: Some(GroupBase::Before),
                chain_len: 1,
                entries: vec![("m.room.create".to_owned(), String::new(), event_id.to_string())],
            }),
            current: CurrentGroup::EventAfter,
            prev_state: None,
        };
        let outcome = s
            .store
            .append_event(AppendEvent {
                stream_ordering: position.position(),
                event_id: event_id.as_str(),
                room_id: room_id.as_str(),
                depth: 1,
                event_type: "m.room.create",
                state_key: Some(""),
                sender: sender.as_str(),
                origin_server_ts: i64::try_from(u64::from(pdu.origin_server_ts.get())).unwrap_or(i64::MAX),
                json: &json,
                prev_events: &[],
                membership: None,
                txn: None,
                redacts: None,
                relates_to: None,
                push_actions: &[],
                search_text: None,
                destinations: &[],
                resolved_state: None,
                state: Some(&state),
                promotes_outlier: false,
                state_from_outliers: &[],
                new_room: Some(NewRoom {
                    room_version: create.version.as_str(),
                    creator: sender.as_str(),
                    published: create.published,
                }),
            })
            .await?;
        let current_group = match outcome {
            AppendOutcome::Appended { current_group, groups, .. } => {
                if let Some((before, after)) = groups {
                    s.state.remember_chain_len(before, 0);
                    s.state.remember_chain_len(after, 1);
                }
                current_group
            }
            AppendOutcome::DuplicateTransaction(_) => None,
        };
        s.room_cache.with(&room_id, |c| {
            c.version = Some(create.version.clone());
            c.extremities = Some(Vec::new());
            c.current_group = Some(current_group);
            c.appended(
                EventRow {
                    stream_ordering: position.position(),
                    event_id: event_id.to_string(),
                    room_id: room_id.to_string(),
                    depth: 1,
                    event_type: "m.room.create".to_owned(),
                    state_key: Some(String::new()),
                    sender: sender.to_string(),
                    origin_server_ts: i64::try_from(u64::from(pdu.origin_server_ts.get())).unwrap_or(i64::MAX),
                    json: json.clone(),
                    prev_state_event_id: None,
                    redacted_by: None,
                    txn_user: None,
                    txn_device: None,
                    txn_id: None,
                },
                &[],
                Vec::new(),
            )
        });
        position.commit_with(vec![Change::room(room_id.clone(), Sections::TIMELINE)]);
        Ok(room_id)
    }

    /// Builds, authorizes and appends an event; with a transaction, a retry returns the
    /// event stored the first time instead of a second copy. Other servers in the room get
    /// it through the send queue.
    pub async fn append(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        draft: EventDraft,
        txn: Option<Txn<'_>>,
    ) -> Result<OwnedEventId> {
        let s = self.hub.services();
        if let Some(t) = txn
            && let Some(existing) = s.store.event_id_for_txn(sender.as_str(), t.device_id, t.scope, t.txn_id).await?
        {
            return EventId::parse(existing).map_err(|e| Error::internal(e.to_string()));
        }
        let lock = self.locks.get(room_id);
        let _guard = lock.lock().await;
        let built = self.build(room_id, sender, draft).await?;
        let destinations = self.destinations_for(room_id, &built.pdu, None).await?;
        self.persist(room_id, built, txn, &destinations).await
    }

    /// Builds and signs an event from the current state and extremities and authorizes it.
    /// Call under the room lock.
    pub(crate) async fn build(&self, room_id: &RoomId, sender: &UserId, draft: EventDraft) -> Result<BuiltEvent> {
        let s = self.hub.services();
        let version = s.rooms.version(room_id.as_str()).await?;
        let rules = room_version_rules(&version).map_err(|e| Error::internal(e.to_string()))?;
        let extremities = s.room_cache.extremities(room_id).await?;
        let depth = extremities.iter().map(|(_, d)| *d).max().unwrap_or(0).saturating_add(1).min(MAX_DEPTH);
        let prev_events: Vec<OwnedEventId> = extremities
            .iter()
            .rev()
            .take(MAX_PREV_EVENTS)
            .filter_map(|(id, _)| EventId::parse(id.as_str()).ok())
            .collect();

        // Work out the auth events from the current state with a draft of the event.
        let draft_pdu = Pdu {
            event_id: EventId::parse("$draft").expect("valid"),
            room_id: Some(room_id.to_owned()),
            sender: sender.to_owned(),
            origin_server_ts: now_ts(),
            kind: draft.event_type.as_str().into(),
            content: serde_json::value::to_raw_value(&draft.content).map_err(|e| Error::BadJson(e.to_string()))?,
            state_key: draft.state_key.clone(),
            prev_events: Vec::new(),
            auth_events: Vec::new(),
            redacts: draft.redacts.clone(),
            depth: UInt::MIN,
            rejected: false,
        };
        let current = self.current_auth_state(room_id, &draft_pdu, &rules).await?;

        let new = NewEvent {
            room_id: Some(room_id.to_owned()),
            sender: sender.to_owned(),
            event_type: draft.event_type.clone(),
            state_key: draft.state_key.clone(),
            content: draft.content,
            redacts: draft.redacts.clone(),
            prev_events: prev_events.clone(),
            auth_events: current.auth_events,
            depth: u64::try_from(depth).unwrap_or(u64::MAX),
            origin_server_ts: now_ts(),
        };
        let (event_id, object) =
            sign_new_event(new, &version, &s.settings.server_name, &s.signing_key).map_err(|e| match e {
                federation::pdu::PduError::TooLarge => Error::TooLarge { limit: MAX_PDU_BYTES },
                other => Error::BadJson(other.to_string()),
            })?;
        let json = serde_json::to_string(&object).map_err(|e| Error::internal(e.to_string()))?;
        if json.len() > MAX_PDU_BYTES {
            return Err(Error::TooLarge { limit: MAX_PDU_BYTES });
        }
        let pdu = Pdu::from_json(event_id.clone(), &json).map_err(|e| Error::internal(e.to_string()))?;
        auth::authorize(&rules.authorization, &pdu, &current.events, &current.state).map_err(Error::Forbidden)?;
        match s.redactions.verdict(room_id, &pdu, &rules).await? {
            RedactionVerdict::Refused(reason) => return Err(Error::Forbidden(reason)),
            RedactionVerdict::TargetUnknown(target) => {
                return Err(Error::Forbidden(format!("{target} is not an event we hold")));
            }
            RedactionVerdict::NotARedaction | RedactionVerdict::Apply(_) => {}
        }
        // The state before the event: the current state, unless there are more forward
        // extremities than an event may name (then the state of those it names).
        let before = if prev_events.len() == extremities.len() {
            s.state.current_state_before(room_id).await?
        } else {
            match s.state.before_prevs(room_id, &version, &prev_events).await? {
                Some(before) => {
                    let ids = s.state.ids_of_before(&before).await?;
                    s.state
                        .authorize_against(room_id, &rules, &pdu, &current.events, &ids)
                        .await?
                        .map_err(Error::Forbidden)?;
                    before
                }
                None => s.state.current_state_before(room_id).await?,
            }
        };
        let state = s.state.plan(room_id, &version, &pdu, before).await?;
        Ok(BuiltEvent { state: Some(state), ..BuiltEvent::new(event_id, object, json, pdu) })
    }

    /// The current state events that would authorize `pdu` (its auth types, plus the create
    /// event, which is always consulted). Call under the room lock.
    pub(crate) async fn current_auth_state(
        &self,
        room_id: &RoomId,
        pdu: &Pdu,
        rules: &ruma::room_version_rules::RoomVersionRules,
    ) -> Result<AuthState> {
        let s = self.hub.services();
        let auth_types = auth::auth_types(pdu, &rules.authorization).map_err(Error::BadJson)?;
        let mut out = AuthState::default();
        let mut wanted: Vec<(StateEventType, String, bool)> =
            auth_types.into_iter().map(|(kind, key)| (kind, key, true)).collect();
        wanted.push((StateEventType::RoomCreate, String::new(), false));
        for (kind, key, is_auth) in wanted {
            if out.state.contains_key(&(kind.clone(), key.clone())) {
                continue;
            }
            if let Some(row) = s.room_cache.state_event(room_id, &kind.to_string(), &key).await? {
                let id = EventId::parse(row.event_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
                let state_pdu = Pdu::from_json(id.clone(), &row.json).map_err(|e| Error::internal(e.to_string()))?;
                if is_auth {
                    out.auth_events.push(id.clone());
                }
                out.events.insert(id, state_pdu.clone());
                out.state.insert((kind, key), state_pdu);
            }
        }
        if !rules.authorization.room_create_event_id_as_room_id {
            // Before v12 the create event is itself an auth event.
            if let Some(create) = out.state.get(&(StateEventType::RoomCreate, String::new()))
                && !out.auth_events.contains(&create.event_id)
            {
                out.auth_events.push(create.event_id.clone());
            }
        }
        Ok(out)
    }

    /// The other servers an event must reach: those of the room's joined members, and for a
    /// membership event the target's server (an invitee, a kicked member), minus ourselves
    /// and `except` (the server the event came from). Call under the room lock.
    pub(crate) async fn destinations_for(
        &self,
        room_id: &RoomId,
        pdu: &Pdu,
        except: Option<&ruma::ServerName>,
    ) -> Result<Vec<String>> {
        let s = self.hub.services();
        let members = s.room_cache.joined_members(room_id).await?;
        let mut servers: std::collections::BTreeSet<String> = members
            .iter()
            .filter_map(|(user, _)| UserId::parse(user.as_str()).ok())
            .map(|user| user.server_name().to_string())
            .collect();
        if pdu.kind == ruma::events::TimelineEventType::RoomMember
            && let Some(target) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok())
        {
            servers.insert(target.server_name().to_string());
        }
        servers.remove(s.settings.server_name.as_str());
        if let Some(except) = except {
            servers.remove(except.as_str());
        }
        Ok(servers.into_iter().collect())
    }

    /// Persists a built or received event, updates the room cache, queues it for
    /// `destinations` and wakes the syncs. Call under the room lock.
    pub(crate) async fn persist(
        &self,
        room_id: &RoomId,
        built: BuiltEvent,
        txn: Option<Txn<'_>>,
        destinations: &[String],
    ) -> Result<OwnedEventId> {
        let s = self.hub.services();
        let BuiltEvent { event_id, object, json, pdu, state, promotes_outlier } = built;
        let state = match state {
            Some(state) => Some(state),
            None => self.default_state_plan(room_id, &pdu).await?,
        };
        let resolved_state = state.as_ref().and_then(|s| s.changes.clone());
        let event_type = pdu.kind.to_string();
        let sender = pdu.sender.clone();
        let depth = i64::try_from(u64::from(pdu.depth)).unwrap_or(i64::MAX);
        let membership = (event_type == "m.room.member").then(|| pdu_membership(&pdu)).flatten();
        let prev_ids: Vec<String> = pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let relates_to = relation_of(&pdu);
        let push_actions = s.push.actions_for(room_id, &sender, &object).await?;
        let search_text = searchable_text(&event_type, &pdu);
        let origin_server_ts = i64::try_from(u64::from(pdu.origin_server_ts.get())).unwrap_or(i64::MAX);
        // Only an allowed redaction marks its target (the callers refuse or soft-fail the
        // others before they get here; this is the last word for the store and the cache).
        let redacts = if pdu.kind == ruma::events::TimelineEventType::RoomRedaction {
            let rules = room_version_rules(&s.rooms.version(room_id.as_str()).await?)
                .map_err(|e| Error::internal(e.to_string()))?;
            match s.redactions.verdict(room_id, &pdu, &rules).await? {
                RedactionVerdict::Apply(target) => Some(target),
                _ => None,
            }
        } else {
            None
        };
        let entering = match &resolved_state {
            Some(changes) => self.outliers_entering_state(changes, &event_id).await?,
            None => Vec::new(),
        };
        let entering_kinds: Vec<String> = entering.iter().map(|(pdu, _)| pdu.kind.to_string()).collect();
        let entering_positions: Vec<_> = entering.iter().map(|_| s.streams.allocate()).collect();
        let entering_rows: Vec<StateFromOutlier<'_>> = entering
            .iter()
            .zip(&entering_positions)
            .zip(&entering_kinds)
            .map(|(((pdu, json), position), kind)| StateFromOutlier {
                stream_ordering: position.position(),
                event_id: pdu.event_id.as_str(),
                depth: i64::try_from(u64::from(pdu.depth)).unwrap_or(i64::MAX),
                event_type: kind.as_str(),
                state_key: pdu.state_key.as_deref().unwrap_or_default(),
                sender: pdu.sender.as_str(),
                origin_server_ts: i64::try_from(u64::from(pdu.origin_server_ts.get())).unwrap_or(i64::MAX),
                json: json.as_str(),
            })
            .collect();
        let position = s.streams.allocate();
        let outcome = s
            .store
            .append_event(AppendEvent {
                stream_ordering: position.position(),
                event_id: event_id.as_str(),
                room_id: room_id.as_str(),
                depth,
                event_type: &event_type,
                state_key: pdu.state_key.as_deref(),
                sender: sender.as_str(),
                origin_server_ts,
                json: &json,
                prev_events: &prev_ids,
                membership: membership.as_deref(),
                txn: txn.map(|t| (sender.as_str(), t.device_id, t.scope, t.txn_id)),
                redacts: redacts.as_ref().map(|r| r.as_str()),
                new_room: None,
                relates_to: relates_to.as_ref().map(|(t, r)| (t.as_str(), r.as_str())),
                push_actions: &push_actions,
                search_text: search_text.as_ref().map(|(k, v)| (*k, v.as_str())),
                destinations,
                resolved_state: resolved_state.as_deref(),
                state: state.as_ref().map(|s| &s.groups),
                promotes_outlier,
                state_from_outliers: &entering_rows,
            })
            .await?;
        drop(entering_rows);
        for entered in entering_positions {
            // Committed with the event (or dropped as gaps when nothing was written).
            if matches!(outcome, AppendOutcome::Appended { .. }) {
                entered.commit_with(Vec::new());
            }
        }
        if let AppendOutcome::Appended { prev_state, groups, current_group, redacted_by } = &outcome {
            // Committed: the cache learns the event before the syncs can see its position.
            let (txn_user, txn_device, txn_id) = match txn {
                Some(t) => (Some(sender.to_string()), Some(t.device_id.to_owned()), Some(t.txn_id.to_owned())),
                None => (None, None, None),
            };
            let row = EventRow {
                stream_ordering: position.position(),
                event_id: event_id.to_string(),
                room_id: room_id.to_string(),
                depth,
                event_type: event_type.clone(),
                state_key: pdu.state_key.clone(),
                sender: sender.to_string(),
                origin_server_ts,
                json,
                prev_state_event_id: prev_state.clone(),
                redacted_by: redacted_by.clone(),
                txn_user,
                txn_device,
                txn_id,
            };
            let notified = push_actions.iter().map(|(user, highlight, _)| (user.clone(), *highlight)).collect();
            if let (Some((before, after)), Some(plan)) = (groups, &state) {
                // Groups never change: their chain lengths are known for good.
                if let GroupRef::New(group) = &plan.groups.before {
                    s.state.remember_chain_len(*before, group.chain_len);
                }
                if let Some(group) = &plan.groups.after {
                    s.state.remember_chain_len(*after, if group.prev.is_some() { group.chain_len } else { 0 });
                }
            }
            let current_group = *current_group;
            let unknown_state = state.is_none() && pdu.state_key.is_some();
            s.room_cache.with(room_id, |c| {
                c.appended(row, &prev_ids, notified);
                if let Some(target) = &redacts {
                    c.redacted(target.as_str(), event_id.as_str());
                }
                if let Some(group) = current_group {
                    c.current_group = Some(Some(group));
                } else if unknown_state {
                    // Written outside the state model: the room has no current group now.
                    c.current_group = Some(None);
                }
            });
            if let Some(resolved) = &resolved_state {
                // State resolution changed more than this event's key: the cached state and
                // members are read again.
                s.room_cache.invalidate(room_id);
                for (kind, key, _, _) in resolved {
                    if kind == "m.room.member" {
                        s.rooms.forget_user(key);
                    }
                }
            }
        }
        let mut changes = vec![Change::room(room_id.to_owned(), Sections::TIMELINE)];
        if event_type == "m.room.member" {
            // Room-mates re-query the devices of a member who joins; the member's own syncs
            // must pick up the room (an invite, a join, a kick).
            changes[0].sections |= Sections::DEVICE_LISTS;
            if let Some(target) = pdu.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok()) {
                s.rooms.forget_user(target.as_str());
                changes.push(Change::user(target, Sections::MEMBERSHIP));
            }
        }
        // Memberships state resolution changed: those users' syncs must look again too.
        for (kind, key, _, _) in resolved_state.iter().flatten() {
            if kind == "m.room.member"
                && let Ok(user) = OwnedUserId::try_from(key.as_str())
                && !changes.iter().any(|c| matches!(&c.scope, super::notifier::Scope::User(u) if *u == user))
            {
                changes[0].sections |= Sections::DEVICE_LISTS;
                changes.push(Change::user(user, Sections::MEMBERSHIP));
            }
        }
        if matches!(outcome, AppendOutcome::Appended { .. }) {
            position.commit_with(changes);
            if !destinations.is_empty() {
                s.send_queue.wake(destinations);
            }
        } else {
            // A retried transaction wrote nothing: the position stays a gap. Committing it
            // would let syncs hand out a position no row holds, which a restarted server
            // (counting on from the highest stored position) would hand out again, and a
            // client holding it would never see the event given it.
            drop(position);
        }
        match outcome {
            AppendOutcome::Appended { .. } => Ok(event_id),
            AppendOutcome::DuplicateTransaction(existing) => {
                EventId::parse(existing).map_err(|e| Error::internal(e.to_string()))
            }
        }
    }

    /// The events of `changes` (current-state entries state resolution chose) that we hold
    /// only as outliers, oldest first, with their JSON: they join the timeline with the event.
    async fn outliers_entering_state(
        &self,
        changes: &[crate::store::CurrentStateEntry],
        event_id: &EventId,
    ) -> Result<Vec<(Pdu, String)>> {
        let s = self.hub.services();
        let ids: Vec<String> =
            changes.iter().map(|(_, _, id, _)| id.clone()).filter(|id| id.as_str() != event_id.as_str()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let on_timeline: std::collections::HashSet<String> =
            s.store.events_by_id(&ids).await?.into_iter().map(|row| row.event_id).collect();
        let outliers: Vec<String> = ids.into_iter().filter(|id| !on_timeline.contains(id)).collect();
        let mut out = Vec::new();
        for stored in s.store.pdus_for_auth(&outliers).await? {
            let id = EventId::parse(stored.event_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
            let pdu = Pdu::from_json(id, &stored.json).map_err(|e| Error::internal(e.to_string()))?;
            out.push((pdu, stored.json));
        }
        out.sort_by_key(|(pdu, _)| (pdu.depth, pdu.origin_server_ts));
        Ok(out)
    }

    /// The state plan of an event built elsewhere (a template another server filled in, an
    /// invite, an event built before a network round trip): from the state after its
    /// `prev_events`, or `None` (stored outside the state model) when we know none of them,
    /// as in a room we are not in. Call under the room lock.
    async fn default_state_plan(&self, room_id: &RoomId, pdu: &Pdu) -> Result<Option<StatePlan>> {
        let s = self.hub.services();
        let extremities = s.room_cache.extremities(room_id).await?;
        let version = s.rooms.version(room_id.as_str()).await?;
        let extends_heads = !extremities.is_empty()
            && extremities.len() == pdu.prev_events.len()
            && extremities.iter().all(|(id, _)| pdu.prev_events.iter().any(|p| p.as_str() == id));
        let before = if extends_heads {
            s.state.current_state_before(room_id).await?
        } else {
            match s.state.before_prevs(room_id, &version, &pdu.prev_events).await? {
                Some(before) => before,
                None => return Ok(None),
            }
        };
        Ok(Some(s.state.plan(room_id, &version, pdu, before).await?))
    }

    /// The per-room append lock, for the federation paths that write a room.
    pub(crate) fn room_lock(&self, room_id: &RoomId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.get(room_id)
    }
}

/// A signed event ready to persist.
pub(crate) struct BuiltEvent {
    pub event_id: OwnedEventId,
    pub object: ruma::CanonicalJsonObject,
    pub json: String,
    pub pdu: Pdu,
    /// Its state groups and what it does to the current state; `None` to let
    /// [`Timeline::persist`] work it out (or store it outside the state model).
    pub state: Option<StatePlan>,
    /// It was held as an outlier until now.
    pub promotes_outlier: bool,
}

impl BuiltEvent {
    /// A signed event whose state [`Timeline::persist`] works out.
    pub fn new(event_id: OwnedEventId, object: ruma::CanonicalJsonObject, json: String, pdu: Pdu) -> Self {
        Self { event_id, object, json, pdu, state: None, promotes_outlier: false }
    }
}

/// Current state events that authorize an event.
#[derive(Default)]
pub(crate) struct AuthState {
    pub auth_events: Vec<OwnedEventId>,
    pub events: HashMap<OwnedEventId, Pdu>,
    pub state: HashMap<(StateEventType, String), Pdu>,
}

/// `m.relates_to` (target event, rel_type) of an event, for the relations index. Replies
/// (`m.in_reply_to`) are not relations in this sense.
fn relation_of(pdu: &Pdu) -> Option<(String, String)> {
    let content: JsonValue = serde_json::from_str(pdu.content.get()).ok()?;
    let relation = content.get("m.relates_to")?;
    let target = relation.get("event_id")?.as_str()?;
    let rel_type = relation.get("rel_type")?.as_str()?;
    Some((target.to_owned(), rel_type.to_owned()))
}

/// The text `/search` looks in: message bodies, room names and topics (never encrypted
/// content, which the server cannot read).
fn searchable_text(event_type: &str, pdu: &Pdu) -> Option<(&'static str, String)> {
    let (key, field) = match event_type {
        "m.room.message" => ("content.body", "body"),
        "m.room.name" => ("content.name", "name"),
        "m.room.topic" => ("content.topic", "topic"),
        _ => return None,
    };
    let content: JsonValue = serde_json::from_str(pdu.content.get()).ok()?;
    let text = content.get(field)?.as_str()?;
    (!text.trim().is_empty()).then(|| (key, text.to_owned()))
}

fn pdu_membership(pdu: &Pdu) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: String,
    }
    serde_json::from_str::<Membership>(pdu.content.get()).ok().map(|m| m.membership)
}

fn now_ts() -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch::now()
}
