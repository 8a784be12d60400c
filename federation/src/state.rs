//! State resolution where branches of a room's graph meet: ruma's implementation of the
//! spec's algorithm (version 2, with the conflicted state subgraph of room version 12), fed
//! from a map of the events involved.

use std::collections::{HashMap, HashSet};

use ruma::{
    EventId, OwnedEventId, RoomVersionId,
    state_res::{self, StateMap, utils::event_id_set::EventIdSet},
};

use crate::pdu::{Pdu, PduError, room_version_rules};

/// Why states could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Version(#[from] PduError),
    #[error("this room version does not use state resolution v2")]
    NotV2,
    #[error("state resolution failed: {0}")]
    Resolution(String),
}

/// Resolves `states` (each a fork's full state, by (type, state key)) into one. `events` must
/// hold every event of the states and their auth chains (missing ones are left out of the
/// chains, which only weakens the ordering, never the authorization checks).
pub fn resolve_states(
    version: &RoomVersionId,
    states: &[StateMap<OwnedEventId>],
    events: &HashMap<OwnedEventId, Pdu>,
) -> Result<StateMap<OwnedEventId>, StateError> {
    let rules = room_version_rules(version)?;
    let state_res_rules = rules.state_res.v2_rules().ok_or(StateError::NotV2)?;
    let auth_chains: Vec<EventIdSet<OwnedEventId>> =
        states.iter().map(|state| auth_chain(state.values(), events).into_iter().collect()).collect();
    state_res::resolve(
        &rules.authorization,
        state_res_rules,
        states,
        auth_chains,
        |id: &EventId| events.get(id).cloned(),
        |conflicted: &StateMap<Vec<OwnedEventId>>| Some(conflicted_subgraph(conflicted, events).into_iter().collect()),
    )
    .map_err(|e| StateError::Resolution(e.to_string()))
}

/// Every event reachable from `starts` through `auth_events` (not the starts themselves).
pub fn auth_chain<'a>(
    starts: impl IntoIterator<Item = &'a OwnedEventId>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> HashSet<OwnedEventId> {
    let mut chain = HashSet::new();
    let mut stack: Vec<OwnedEventId> =
        starts.into_iter().filter_map(|id| events.get(id)).flat_map(|e| e.auth_events.iter().cloned()).collect();
    while let Some(id) = stack.pop() {
        if chain.insert(id.clone())
            && let Some(event) = events.get(&id)
        {
            stack.extend(event.auth_events.iter().cloned());
        }
    }
    chain
}

/// Room version 12's conflicted state subgraph: the events (through `auth_events`) that are
/// both descendants of a conflicted event and ancestors of one, the conflicted events
/// included.
fn conflicted_subgraph(
    conflicted: &StateMap<Vec<OwnedEventId>>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> HashSet<OwnedEventId> {
    let conflicted: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
    // Ancestors of conflicted events, and the conflicted events themselves.
    let mut candidates = auth_chain(conflicted.iter(), events);
    candidates.extend(conflicted.iter().cloned());
    // Of those, the ones that descend from a conflicted event (have one in their chain).
    let mut memo: HashMap<OwnedEventId, bool> = HashMap::new();
    candidates
        .into_iter()
        .filter(|id| conflicted.contains(id) || descends_from(id, &conflicted, events, &mut memo))
        .collect()
}

fn descends_from(
    id: &OwnedEventId,
    targets: &HashSet<OwnedEventId>,
    events: &HashMap<OwnedEventId, Pdu>,
    memo: &mut HashMap<OwnedEventId, bool>,
) -> bool {
    if let Some(known) = memo.get(id) {
        return *known;
    }
    // Mark first: auth graphs are acyclic, but a malicious one must not recurse forever.
    memo.insert(id.clone(), false);
    let found = events.get(id).is_some_and(|event| {
        event.auth_events.iter().any(|parent| targets.contains(parent) || descends_from(parent, targets, events, memo))
    });
    memo.insert(id.clone(), found);
    found
}
