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
///
/// No recursion: a remote server chooses how deep an auth graph is, deeper than any call
/// stack. The descendants are found by walking down from the conflicted events along the
/// reversed auth edges among their ancestors, each event once, so the work is bounded by the
/// size of those ancestors' auth chains (which the caller already holds in `events`).
fn conflicted_subgraph(
    conflicted: &StateMap<Vec<OwnedEventId>>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> HashSet<OwnedEventId> {
    let conflicted: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
    // Ancestors of conflicted events, and the conflicted events themselves.
    let mut ancestors = auth_chain(conflicted.iter(), events);
    ancestors.extend(conflicted.iter().cloned());
    // Every path from an ancestor down to a conflicted event stays among the ancestors, so
    // the reversed edges between them are all the walk needs.
    let mut children: HashMap<&OwnedEventId, Vec<&OwnedEventId>> = HashMap::new();
    for id in &ancestors {
        for parent in events.get(id).into_iter().flat_map(|e| e.auth_events.iter()) {
            if ancestors.contains(parent) {
                children.entry(parent).or_default().push(id);
            }
        }
    }
    let mut subgraph: HashSet<OwnedEventId> = HashSet::new();
    let mut stack: Vec<&OwnedEventId> = conflicted.iter().collect();
    while let Some(id) = stack.pop() {
        if subgraph.insert(id.clone()) {
            stack.extend(children.get(id).into_iter().flatten().copied());
        }
    }
    subgraph
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `n` events, each with the one before as its only auth event.
    fn chain(n: usize) -> (Vec<OwnedEventId>, HashMap<OwnedEventId, Pdu>) {
        let ids: Vec<OwnedEventId> = (0..n).map(|i| EventId::parse(format!("$e{i}")).unwrap()).collect();
        let mut events = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let auth: Vec<&str> = if i == 0 { vec![] } else { vec![ids[i - 1].as_str()] };
            let json = serde_json::json!({
                "room_id": "!r:example.org", "sender": "@a:example.org", "origin_server_ts": i, "type": "m.room.topic",
                "state_key": "", "content": {"topic": i.to_string()}, "prev_events": auth, "auth_events": auth, "depth": i + 1,
            });
            events.insert(id.clone(), Pdu::from_json(id.clone(), &json.to_string()).unwrap());
        }
        (ids, events)
    }

    #[test]
    fn the_conflicted_subgraph_of_a_deep_auth_graph_needs_no_deep_stack() {
        // Deeper than any call stack: a remote auth graph must not be walked by recursion.
        let (ids, events) = chain(200_000);
        let mut conflicted: StateMap<Vec<OwnedEventId>> = StateMap::new();
        conflicted.insert(
            (ruma::events::StateEventType::RoomTopic, String::new()),
            vec![ids[10].clone(), ids[ids.len() - 1].clone()],
        );
        let subgraph = conflicted_subgraph(&conflicted, &events);
        // Everything between the two conflicted events, both included; nothing before.
        assert_eq!(subgraph.len(), ids.len() - 10);
        assert!(subgraph.contains(&ids[10]) && subgraph.contains(&ids[500]) && !subgraph.contains(&ids[9]));
    }
}
