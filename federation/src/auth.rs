//! Authorization of events against room state: the spec's auth rules, as ruma implements
//! them.

use std::collections::HashMap;

use ruma::{
    OwnedEventId,
    events::StateEventType,
    room_version_rules::AuthorizationRules,
    state_res::{self, Event},
};

use crate::pdu::Pdu;

/// Which state events (type, state key) authorize `event` (the spec's auth events selection).
pub fn auth_types(event: &Pdu, rules: &AuthorizationRules) -> Result<Vec<(StateEventType, String)>, String> {
    state_res::auth_types_for_event(event.event_type(), event.sender(), event.state_key(), event.content(), rules)
}

/// Checks `event` against its own auth events (state-independent rules) and against `state`,
/// the room state before it (state-dependent rules). `events` must hold the auth events.
pub fn authorize(
    rules: &AuthorizationRules,
    event: &Pdu,
    events: &HashMap<OwnedEventId, Pdu>,
    state: &HashMap<(StateEventType, String), Pdu>,
) -> Result<(), String> {
    state_res::check_state_independent_auth_rules(rules, event, |id| events.get(id))?;
    state_res::check_state_dependent_auth_rules(rules, event, |kind, key| state.get(&(kind.clone(), key.to_owned())))
}

/// Checks `event` against its own auth events alone (the first of the spec's checks on
/// receipt of a PDU): the auth events both select the rules' inputs and stand for the state.
/// `auth_events` may also hold the room's create event (room version 12 consults it without
/// listing it).
pub fn authorize_by_auth_events(
    rules: &AuthorizationRules,
    event: &Pdu,
    auth_events: &HashMap<OwnedEventId, Pdu>,
) -> Result<(), String> {
    let state: HashMap<(StateEventType, String), Pdu> = auth_events
        .values()
        .filter_map(|e| e.state_key.clone().map(|k| ((e.kind.to_string().into(), k), e.clone())))
        .collect();
    authorize(rules, event, auth_events, &state)
}
