//! Shape checks of the content of well-known state events a client sends: a field of the wrong
//! type is refused with 400 `M_BAD_JSON` (as Synapse does) instead of being stored, where
//! other clients, and the auth rules for power levels, would choke on it later. Server ACLs
//! are left out on purpose: malformed ones arrive over federation anyway and are read the way
//! Synapse reads them (`service/server_acl.rs`).

use ruma::events::{
    StateEventContent,
    room::{
        avatar::RoomAvatarEventContent, encryption::RoomEncryptionEventContent,
        guest_access::RoomGuestAccessEventContent, history_visibility::RoomHistoryVisibilityEventContent,
        join_rules::RoomJoinRulesEventContent, member::RoomMemberEventContent, name::RoomNameEventContent,
        pinned_events::RoomPinnedEventsEventContent, power_levels::RoomPowerLevelsEventContent,
        tombstone::RoomTombstoneEventContent, topic::RoomTopicEventContent,
    },
};
use serde::de::DeserializeOwned;
use serde_json::Value as JsonValue;

use crate::error::{Error, Result};

/// Refuses content of a known state event type that ruma's type for it cannot read.
pub fn check_state_content(event_type: &str, content: &JsonValue) -> Result<()> {
    match event_type {
        "m.room.name" => parse::<RoomNameEventContent>(event_type, content),
        "m.room.topic" => parse::<RoomTopicEventContent>(event_type, content),
        "m.room.avatar" => parse::<RoomAvatarEventContent>(event_type, content),
        "m.room.power_levels" => parse::<RoomPowerLevelsEventContent>(event_type, content),
        "m.room.join_rules" => parse::<RoomJoinRulesEventContent>(event_type, content),
        "m.room.history_visibility" => parse::<RoomHistoryVisibilityEventContent>(event_type, content),
        "m.room.guest_access" => parse::<RoomGuestAccessEventContent>(event_type, content),
        "m.room.encryption" => parse::<RoomEncryptionEventContent>(event_type, content),
        "m.room.member" => parse::<RoomMemberEventContent>(event_type, content),
        "m.room.tombstone" => parse::<RoomTombstoneEventContent>(event_type, content),
        "m.room.pinned_events" => parse::<RoomPinnedEventsEventContent>(event_type, content),
        _ => Ok(()),
    }
}

fn parse<C: StateEventContent + DeserializeOwned>(event_type: &str, content: &JsonValue) -> Result<()> {
    serde_json::from_value::<C>(content.clone())
        .map(|_| ())
        .map_err(|e| Error::BadJson(format!("The content of {event_type} has the wrong shape: {e}")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::check_state_content;

    #[test]
    fn wrongly_typed_fields_are_refused() {
        assert!(check_state_content("m.room.name", &json!({"name": "Lobby"})).is_ok());
        assert!(check_state_content("m.room.name", &json!({"name": 5})).is_err());
        assert!(check_state_content("m.room.topic", &json!({"topic": ["x"]})).is_err());
        assert!(check_state_content("m.room.power_levels", &json!({"users_default": "x"})).is_err());
        assert!(check_state_content("m.room.power_levels", &json!({"users": {"@a:x": 100}})).is_ok());
        assert!(check_state_content("m.room.join_rules", &json!({})).is_err());
        assert!(check_state_content("org.example.custom", &json!({"anything": 5})).is_ok());
    }
}
