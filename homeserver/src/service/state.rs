//! The room state model: the state before and after every event, kept as state groups
//! (`store::state`), state resolution v2 wherever branches of the room's graph meet (whatever
//! the event that joins them), and the state at an event for `/state_ids`, the authorization of
//! received events and syncs.
//!
//! The append path keeps its cost for the common case: an event whose `prev_events` are the
//! room's forward extremities has the current state before it, a group the room cache knows,
//! so a message stores one integer and a state event one small delta.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use federation::{auth, pdu::Pdu, state::resolve_states};
use ruma::{EventId, OwnedEventId, RoomId, RoomVersionId, events::StateEventType, state_res::StateMap};

use super::Hub;
use crate::{
    error::{Error, Result},
    store::{
        CurrentGroup, CurrentStateEntry, EventRow, EventStateGroups, GroupBase, GroupRef, MAX_DELTA_CHAIN,
        NewStateGroup, StateIds,
    },
};

/// State entries kept in memory over all cached groups (a few MiB); past this the cache
/// starts over. Groups never change, so a cached one is never stale.
const CACHED_STATE_ENTRIES: usize = 50_000;
/// Chain lengths kept (a pair of integers each).
const CACHED_CHAIN_LENGTHS: usize = 100_000;

/// State groups read so far.
#[derive(Default)]
pub struct StateCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    maps: HashMap<i64, Arc<StateIds>>,
    entries: usize,
    chain_lens: HashMap<i64, i64>,
}

impl StateCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map(&self, group: i64) -> Option<Arc<StateIds>> {
        self.lock().maps.get(&group).cloned()
    }

    fn insert_map(&self, group: i64, ids: Arc<StateIds>) {
        let mut inner = self.lock();
        if inner.entries + ids.len() > CACHED_STATE_ENTRIES {
            inner.maps.clear();
            inner.entries = 0;
        }
        inner.entries += ids.len();
        inner.maps.insert(group, ids);
    }

    fn chain_len(&self, group: i64) -> Option<i64> {
        self.lock().chain_lens.get(&group).copied()
    }

    pub(crate) fn insert_chain_len(&self, group: i64, len: i64) {
        let mut inner = self.lock();
        if inner.chain_lens.len() >= CACHED_CHAIN_LENGTHS {
            inner.chain_lens.clear();
        }
        inner.chain_lens.insert(group, len);
    }
}

/// The state before an event, as the append path needs it.
#[derive(Debug, Clone)]
pub(crate) struct StateBefore {
    pub group: GroupRef,
    /// Deltas between an existing group and its snapshot (0 for a new snapshot).
    pub chain_len: i64,
    /// The state itself, once read.
    pub ids: Option<Arc<StateIds>>,
    /// It is the room's current state.
    pub is_current: bool,
}

/// How an event's state is stored and what it does to the room's current state.
#[derive(Debug, Clone)]
pub(crate) struct StatePlan {
    pub groups: EventStateGroups,
    /// Where state resolution decided the current state: the entries that change (instead
    /// of the event's own key).
    pub changes: Option<Vec<CurrentStateEntry>>,
}

/// The room state model: state groups, the state before and after events, resolution.
pub struct State {
    hub: Hub,
    /// State groups read so far.
    cache: StateCache,
}

impl State {
    pub fn new(hub: Hub) -> Self {
        Self { hub, cache: StateCache::default() }
    }

    /// The room's current state events.
    pub async fn current_events(&self, room_id: &RoomId) -> Result<Vec<EventRow>> {
        Ok(self.hub.services().store.current_state(room_id.as_str()).await?)
    }

    /// One current state event.
    pub async fn current_event(&self, room_id: &RoomId, kind: &str, state_key: &str) -> Result<Option<EventRow>> {
        Ok(self.hub.services().store.current_state_event(room_id.as_str(), kind, state_key).await?)
    }

    /// Records a group's chain length, known for good once the group is written.
    pub(crate) fn remember_chain_len(&self, group: i64, len: i64) {
        self.cache.insert_chain_len(group, len);
    }

    /// The state of a group, read through the cache.
    pub(crate) async fn ids_of_group(&self, group: i64) -> Result<Arc<StateIds>> {
        let s = self.hub.services();
        if let Some(hit) = self.cache.map(group) {
            return Ok(hit);
        }
        let (ids, chain_len) = s.store.state_group_entries(group).await?;
        let ids = Arc::new(ids);
        self.cache.insert_map(group, ids.clone());
        self.cache.insert_chain_len(group, chain_len);
        Ok(ids)
    }

    async fn group_chain_len(&self, group: i64) -> Result<i64> {
        let s = self.hub.services();
        if let Some(hit) = self.cache.chain_len(group) {
            return Ok(hit);
        }
        let len = s.store.state_group_chain_len(group).await?.unwrap_or(MAX_DELTA_CHAIN);
        self.cache.insert_chain_len(group, len);
        Ok(len)
    }

    /// The room's current state group, through the room cache (append path, under the lock).
    pub(crate) async fn current_group(&self, room_id: &RoomId) -> Result<Option<i64>> {
        let s = self.hub.services();
        if let Some(hit) = s.room_cache.with(room_id, |c| c.current_group) {
            return Ok(hit);
        }
        let group = s.store.current_state_group(room_id.as_str()).await?;
        s.room_cache.with(room_id, |c| c.current_group = Some(group));
        Ok(group)
    }

    /// The current state as the state before a new event (one whose `prev_events` are all the
    /// room's forward extremities). Call under the room lock.
    pub(crate) async fn current_state_before(&self, room_id: &RoomId) -> Result<StateBefore> {
        let s = self.hub.services();
        match self.current_group(room_id).await? {
            Some(group) => Ok(StateBefore {
                group: GroupRef::Existing(group),
                chain_len: self.group_chain_len(group).await?,
                ids: None,
                is_current: true,
            }),
            None => {
                // A room whose current state was written outside the model (one we were
                // invited to over federation): a snapshot of it starts the room's groups.
                let ids = s.store.current_state_ids(room_id.as_str()).await?;
                Ok(StateBefore {
                    group: GroupRef::New(snapshot(&ids)),
                    chain_len: 0,
                    ids: Some(Arc::new(ids)),
                    is_current: true,
                })
            }
        }
    }

    /// The state before an event with these `prev_events`: the state after the one prev
    /// event, or what state resolution makes of the states after each. Prev events whose
    /// state is not known are left out; `None` if none is known. Call under the room lock.
    pub(crate) async fn before_prevs(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        prevs: &[OwnedEventId],
    ) -> Result<Option<StateBefore>> {
        let s = self.hub.services();
        let ids: Vec<String> = prevs.iter().map(|id| id.to_string()).collect();
        let known = s.store.event_state_groups(&ids).await?;
        let mut groups: Vec<i64> = known.values().map(|(_, after)| *after).collect();
        groups.sort_unstable();
        groups.dedup();
        let current = self.current_group(room_id).await?;
        match groups.as_slice() {
            [] => Ok(None),
            [group] => Ok(Some(StateBefore {
                group: GroupRef::Existing(*group),
                chain_len: self.group_chain_len(*group).await?,
                ids: None,
                is_current: current == Some(*group),
            })),
            _ => {
                let mut maps = Vec::with_capacity(groups.len());
                for group in &groups {
                    maps.push(self.ids_of_group(*group).await?);
                }
                let refs: Vec<&StateIds> = maps.iter().map(|m| m.as_ref()).collect();
                let (resolved, _) = self.resolve_maps(room_id, version, &refs, &[]).await?;
                let is_current = match current {
                    Some(current) => *self.ids_of_group(current).await? == resolved,
                    None => false,
                };
                // The resolution may simply be one of the states (a branch that saw the other).
                if let Some(i) = maps.iter().position(|m| **m == resolved) {
                    let group = groups[i];
                    return Ok(Some(StateBefore {
                        group: GroupRef::Existing(group),
                        chain_len: self.group_chain_len(group).await?,
                        ids: Some(maps[i].clone()),
                        is_current,
                    }));
                }
                let (group, chain_len) = self.group_for_state(room_id, &resolved).await?;
                Ok(Some(StateBefore { group, chain_len, ids: Some(Arc::new(resolved)), is_current }))
            }
        }
    }

    /// A group holding `ids`: the room's current group when it is that state; else a delta
    /// of what differs from the current group when a delta can say it (no key of it dropped,
    /// its chain not too long); else a snapshot. What another server's states cost us in
    /// rows stays what differs from ours. Any group works as a base (groups never change), so
    /// a current group read outside the room lock is good enough.
    pub(crate) async fn group_for_state(&self, room_id: &RoomId, ids: &StateIds) -> Result<(GroupRef, i64)> {
        if let Some(current) = self.current_group(room_id).await? {
            let current_ids = self.ids_of_group(current).await?;
            let chain_len = self.group_chain_len(current).await?;
            if *current_ids == *ids {
                return Ok((GroupRef::Existing(current), chain_len));
            }
            if chain_len < MAX_DELTA_CHAIN && current_ids.keys().all(|key| ids.contains_key(key)) {
                let entries = ids
                    .iter()
                    .filter(|(key, id)| current_ids.get(*key) != Some(*id))
                    .map(|((t, k), id)| (t.clone(), k.clone(), id.clone()))
                    .collect();
                let group = NewStateGroup { prev: Some(GroupBase::Id(current)), chain_len: chain_len + 1, entries };
                return Ok((GroupRef::New(group), chain_len + 1));
            }
        }
        Ok((GroupRef::New(snapshot(ids)), 0))
    }

    /// The state of a [`StateBefore`], read if it was not yet.
    pub(crate) async fn ids_of_before(&self, before: &StateBefore) -> Result<Arc<StateIds>> {
        match (&before.ids, &before.group) {
            (Some(ids), _) => Ok(ids.clone()),
            (None, GroupRef::Existing(group)) => self.ids_of_group(*group).await,
            (None, GroupRef::New(group)) if group.prev.is_none() => {
                Ok(Arc::new(group.entries.iter().map(|(t, k, id)| ((t.clone(), k.clone()), id.clone())).collect()))
            }
            (None, GroupRef::New(_)) => Err(Error::internal("a new delta group without its state")),
        }
    }

    /// The group after a state event: a delta of one entry on the state before it, or a
    /// snapshot once the chain of deltas is long enough.
    pub(crate) async fn after_group(&self, before: &StateBefore, pdu: &Pdu) -> Result<Option<NewStateGroup>> {
        let Some(state_key) = &pdu.state_key else { return Ok(None) };
        let entry = (pdu.kind.to_string(), state_key.clone(), pdu.event_id.to_string());
        if before.chain_len + 1 > MAX_DELTA_CHAIN {
            let mut ids = (*self.ids_of_before(before).await?).clone();
            ids.insert((entry.0, entry.1), entry.2);
            return Ok(Some(snapshot(&ids)));
        }
        let prev = match &before.group {
            GroupRef::Existing(id) => GroupBase::Id(*id),
            GroupRef::New(_) => GroupBase::Before,
        };
        Ok(Some(NewStateGroup { prev: Some(prev), chain_len: before.chain_len + 1, entries: vec![entry] }))
    }

    /// For a state event, the event its (type, state key) held before it.
    pub(crate) async fn prev_state_of(
        &self,
        room_id: &RoomId,
        before: &StateBefore,
        pdu: &Pdu,
    ) -> Result<Option<String>> {
        let s = self.hub.services();
        let Some(state_key) = &pdu.state_key else { return Ok(None) };
        if before.is_current && before.ids.is_none() {
            // The room cache holds the current state, key by key.
            let row = s.room_cache.state_event(room_id, &pdu.kind.to_string(), state_key).await?;
            return Ok(row.map(|r| r.event_id.clone()));
        }
        let ids = self.ids_of_before(before).await?;
        Ok(ids.get(&(pdu.kind.to_string(), state_key.clone())).cloned())
    }

    /// How an accepted event is stored with its state, and what it makes of the room's
    /// current state: the state resolution of the room's forward extremities once the event
    /// is one of them. Call under the room lock.
    pub(crate) async fn plan(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        pdu: &Pdu,
        before: StateBefore,
    ) -> Result<StatePlan> {
        let s = self.hub.services();
        let after = self.after_group(&before, pdu).await?;
        let prev_state = self.prev_state_of(room_id, &before, pdu).await?;
        let extremities = s.room_cache.extremities(room_id).await?;
        let remaining: Vec<String> = extremities
            .iter()
            .map(|(id, _)| id.clone())
            .filter(|id| !pdu.prev_events.iter().any(|p| p.as_str() == id))
            .collect();
        let is_state = pdu.state_key.is_some();
        if remaining.is_empty() && before.is_current {
            // The event extends the room's one head: its state after is the current state.
            let current = if is_state || matches!(before.group, GroupRef::New(_)) {
                CurrentGroup::EventAfter
            } else {
                CurrentGroup::Unchanged
            };
            return Ok(StatePlan {
                groups: EventStateGroups { before: before.group, after, current, prev_state },
                changes: None,
            });
        }
        let before_ids = self.ids_of_before(&before).await?;
        let mut after_ids = (*before_ids).clone();
        if let Some(key) = &pdu.state_key {
            after_ids.insert((pdu.kind.to_string(), key.clone()), pdu.event_id.to_string());
        }
        let current_ids = s.store.current_state_ids(room_id.as_str()).await?;
        let (new_ids, mut events, current) = if remaining.is_empty() {
            (after_ids, HashMap::new(), CurrentGroup::EventAfter)
        } else {
            // Other branches stay open: the current state is what state resolution makes of
            // the state after this event and the states after the other forward extremities.
            let known = s.store.event_state_groups(&remaining).await?;
            let mut maps: Vec<Arc<StateIds>> = vec![Arc::new(after_ids.clone())];
            for id in &remaining {
                match known.get(id) {
                    Some((_, group)) => maps.push(self.ids_of_group(*group).await?),
                    // A head whose state is not known (history from before the model): the
                    // current state stands for it.
                    None => maps.push(Arc::new(current_ids.clone())),
                }
            }
            let refs: Vec<&StateIds> = maps.iter().map(|m| m.as_ref()).collect();
            let (resolved, events) = self.resolve_maps(room_id, version, &refs, &[pdu]).await?;
            let current = if resolved == after_ids {
                CurrentGroup::EventAfter
            } else if resolved == current_ids {
                CurrentGroup::Unchanged
            } else {
                CurrentGroup::Group(self.group_for_state(room_id, &resolved).await?.0)
            };
            (resolved, events, current)
        };
        let changed: Vec<((String, String), String)> = new_ids
            .iter()
            .filter(|(key, id)| current_ids.get(*key) != Some(*id))
            .map(|(key, id)| (key.clone(), id.clone()))
            .collect();
        if current_ids.keys().any(|key| !new_ids.contains_key(key)) {
            tracing::warn!(%room_id, event_id = %pdu.event_id, "the resolved state lacks keys of the current state");
        }
        // Memberships of the member events that change, for `room_current_state`.
        events.insert(pdu.event_id.clone(), pdu.clone());
        let unknown: Vec<String> = changed
            .iter()
            .filter(|((kind, _), id)| {
                kind == "m.room.member" && EventId::parse(id.as_str()).is_ok_and(|id| !events.contains_key(&id))
            })
            .map(|(_, id)| id.clone())
            .collect();
        for stored in s.store.pdus_for_auth(&unknown).await? {
            if let Ok(id) = EventId::parse(stored.event_id.as_str())
                && let Ok(event) = Pdu::from_json(id.clone(), &stored.json)
            {
                events.insert(id, event);
            }
        }
        let changes = changed
            .into_iter()
            .map(|((kind, key), id)| {
                let membership =
                    EventId::parse(id.as_str()).ok().and_then(|id| events.get(&id)).and_then(membership_of);
                (kind, key, id, membership)
            })
            .collect::<Vec<_>>();
        if !changes.is_empty() {
            tracing::info!(%room_id, event_id = %pdu.event_id, changed = changes.len(), "state resolution changed the current state");
        }
        Ok(StatePlan {
            groups: EventStateGroups { before: before.group, after, current, prev_state },
            changes: Some(changes),
        })
    }

    /// Resolves room states (state resolution v2). `extra` are events not stored yet that
    /// the states may name. Returns the resolved state and the events that were read.
    pub(crate) async fn resolve_maps(
        &self,
        room_id: &RoomId,
        version: &RoomVersionId,
        states: &[&StateIds],
        extra: &[&Pdu],
    ) -> Result<(StateIds, HashMap<OwnedEventId, Pdu>)> {
        let s = self.hub.services();
        let mut events: HashMap<OwnedEventId, Pdu> =
            extra.iter().map(|pdu| (pdu.event_id.clone(), (*pdu).clone())).collect();
        let mut frontier: Vec<String> = states.iter().flat_map(|s| s.values().cloned()).collect();
        frontier.extend(extra.iter().flat_map(|p| p.auth_events.iter().map(|a| a.to_string())));
        let mut seen: HashSet<String> = HashSet::new();
        while !frontier.is_empty() {
            let batch: Vec<String> = frontier
                .drain(..)
                .filter(|id| seen.insert(id.clone()))
                .filter(|id| EventId::parse(id.as_str()).is_ok_and(|id| !events.contains_key(&id)))
                .collect();
            for stored in s.store.pdus_for_auth(&batch).await? {
                if stored.room_id != room_id.as_str() {
                    continue;
                }
                let Ok(id) = EventId::parse(stored.event_id.as_str()) else { continue };
                let Ok(mut event) = Pdu::from_json(id.clone(), &stored.json) else { continue };
                event.rejected = stored.rejected;
                frontier.extend(event.auth_events.iter().map(|a| a.to_string()));
                events.insert(id, event);
            }
        }
        let maps: Vec<StateMap<OwnedEventId>> = states
            .iter()
            .map(|state| {
                state
                    .iter()
                    .filter_map(|((kind, key), id)| {
                        EventId::parse(id.as_str())
                            .ok()
                            .map(|id| ((StateEventType::from(kind.as_str()), key.clone()), id))
                    })
                    .collect()
            })
            .collect();
        let resolved = resolve_states(version, &maps, &events)
            .map_err(|e| Error::internal(format!("state resolution in {room_id}: {e}")))?;
        let resolved =
            resolved.into_iter().map(|((kind, key), id)| ((kind.to_string(), key), id.to_string())).collect();
        Ok((resolved, events))
    }

    /// Authorizes `pdu` against a full room state (the state before it): the spec's auth
    /// rules with the auth events its type selects from that state. `auth_events` are the
    /// event's own auth events. `Ok(Err(reason))` when it is not allowed.
    pub(crate) async fn authorize_against(
        &self,
        room_id: &RoomId,
        rules: &ruma::room_version_rules::RoomVersionRules,
        pdu: &Pdu,
        auth_events: &HashMap<OwnedEventId, Pdu>,
        state: &StateIds,
    ) -> Result<std::result::Result<(), String>> {
        let s = self.hub.services();
        let mut wanted = match auth::auth_types(pdu, &rules.authorization) {
            Ok(types) => types,
            Err(reason) => return Ok(Err(reason)),
        };
        wanted.push((StateEventType::RoomCreate, String::new()));
        let ids: Vec<String> =
            wanted.iter().filter_map(|(kind, key)| state.get(&(kind.to_string(), key.clone())).cloned()).collect();
        let mut events = auth_events.clone();
        let mut by_key: HashMap<(StateEventType, String), Pdu> = HashMap::new();
        for stored in s.store.pdus_for_auth(&ids).await? {
            if stored.room_id != room_id.as_str() || stored.rejected {
                continue;
            }
            let Ok(id) = EventId::parse(stored.event_id.as_str()) else { continue };
            let Ok(event) = Pdu::from_json(id.clone(), &stored.json) else { continue };
            if let Some(key) = &event.state_key {
                by_key.insert((event.kind.to_string().into(), key.clone()), event.clone());
            }
            events.insert(id, event);
        }
        Ok(auth::authorize(&rules.authorization, pdu, &events, &by_key))
    }

    /// The state before an event (`/state`, `/state_ids`, history visibility for other
    /// servers): `None` when it is not known (history that came with a join or by backfill,
    /// events of rooms we are not in).
    pub async fn ids_before_event(&self, room_id: &RoomId, event_id: &EventId) -> Result<Option<Arc<StateIds>>> {
        let s = self.hub.services();
        let Some(row) = s.store.event(event_id.as_str()).await?.filter(|row| row.room_id == room_id.as_str()) else {
            return Ok(None);
        };
        let groups = s.store.event_state_groups(std::slice::from_ref(&row.event_id)).await?;
        match groups.get(&row.event_id) {
            Some((before, _)) => Ok(Some(self.ids_of_group(*before).await?)),
            None => Ok(None),
        }
    }

    /// The state after an event, when known.
    pub async fn ids_after_event(&self, room_id: &RoomId, event_id: &EventId) -> Result<Option<Arc<StateIds>>> {
        let s = self.hub.services();
        let Some(row) = s.store.event(event_id.as_str()).await?.filter(|row| row.room_id == room_id.as_str()) else {
            return Ok(None);
        };
        let groups = s.store.event_state_groups(std::slice::from_ref(&row.event_id)).await?;
        match groups.get(&row.event_id) {
            Some((_, after)) => Ok(Some(self.ids_of_group(*after).await?)),
            None => Ok(None),
        }
    }
}

/// A snapshot group of a whole state.
pub(crate) fn snapshot(ids: &StateIds) -> NewStateGroup {
    NewStateGroup {
        prev: None,
        chain_len: 0,
        entries: ids.iter().map(|((t, k), id)| (t.clone(), k.clone(), id.clone())).collect(),
    }
}

/// The membership of an `m.room.member` event.
pub(crate) fn membership_of(pdu: &Pdu) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: String,
    }
    (pdu.kind == ruma::events::TimelineEventType::RoomMember)
        .then(|| serde_json::from_str::<Membership>(pdu.content.get()).ok().map(|m| m.membership))
        .flatten()
}

/// The groups of a join through another server: before it, the state it was authorized by
/// (from the resident server's answer); after it, that state with the join.
pub(crate) fn join_state_groups(state: &HashMap<(StateEventType, String), Pdu>, join: &Pdu) -> EventStateGroups {
    let ids: StateIds =
        state.iter().map(|((kind, key), pdu)| ((kind.to_string(), key.clone()), pdu.event_id.to_string())).collect();
    let key = join.state_key.clone().unwrap_or_default();
    let prev_state = ids.get(&(join.kind.to_string(), key.clone())).cloned();
    EventStateGroups {
        before: GroupRef::New(snapshot(&ids)),
        after: Some(NewStateGroup {
            prev: Some(GroupBase::Before),
            chain_len: 1,
            entries: vec![(join.kind.to_string(), key, join.event_id.to_string())],
        }),
        current: CurrentGroup::EventAfter,
        prev_state,
    }
}
