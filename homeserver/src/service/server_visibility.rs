//! What another server may read of a room's history, by the spec's history visibility rules
//! (client-server API, "Room History Visibility", server behaviour): a server may see an event
//! when one of its users could, by the visibility setting at the event (`world_readable`,
//! `shared`, `invited`, `joined`) and that user's membership at it. Every federation read
//! (`/event`, `/backfill`, `/get_missing_events`, `/state`, `/state_ids`, `/event_auth`) asks
//! [`Servers::may_see`]; an event it may not see is refused, or served pruned where
//! the endpoint walks history (`/backfill`, `/get_missing_events`).
//!
//! The state at an event comes from the state model (`service::state`): the visibility
//! setting in the state before the event, the asking server's users' memberships in the state
//! after it. Events whose state is not known (history that came with a join or by backfill)
//! fall back to the stream order, like the client side's `visible_events`; [`server_sees`] is
//! the rule itself and does not care where that state comes from.

use ruma::{CanonicalJsonObject, RoomId, RoomVersionId, ServerName, UserId, canonical_json::redact};
use serde_json::value::RawValue as RawJsonValue;

use super::servers::Servers;
use crate::{
    error::{Error, Result},
    store::EventRow,
};

/// The spec's rule for one event: whether a server may see it, given the history visibility
/// at the event, the memberships its users had at the event, and whether one of them joined
/// at some point after it.
pub fn server_sees(visibility: &str, memberships_at_event: &[&str], joined_later: bool) -> bool {
    match visibility {
        "world_readable" => true,
        _ if memberships_at_event.contains(&"join") => true,
        "shared" => joined_later,
        "invited" => memberships_at_event.contains(&"invite"),
        // `joined`, and values the spec does not know: members only.
        _ => false,
    }
}

impl Servers {
    /// Whether `origin` may ask about the room at all: we are in it, its server ACL does not
    /// deny `origin`, and one of `origin`'s users has a membership in it (any: what they
    /// may see is decided per event) or the room is `world_readable` now.
    pub async fn require_may_read(&self, room_id: &RoomId, origin: &ServerName) -> Result<()> {
        let s = self.hub.services();
        if s.store.room(room_id.as_str()).await?.is_none() || !self.we_are_in(room_id).await? {
            return Err(Error::NotFound("This server is not in that room".to_owned()));
        }
        self.check_acl(room_id, origin).await?;
        let members = s.store.current_state(room_id.as_str()).await?;
        let known = members.iter().any(|row| {
            row.event_type == "m.room.member"
                && row
                    .state_key
                    .as_deref()
                    .and_then(|k| UserId::parse(k).ok())
                    .is_some_and(|u| u.server_name() == origin)
        });
        let world_readable = members.iter().any(|row| {
            row.event_type == "m.room.history_visibility"
                && serde_json::from_str::<serde_json::Value>(&row.json)
                    .is_ok_and(|v| v["content"]["history_visibility"] == "world_readable")
        });
        if known || world_readable {
            Ok(())
        } else {
            Err(Error::Forbidden("No user of your server is in that room".to_owned()))
        }
    }

    /// For each of `rows` (timeline events of `room_id`), whether `server` may see it.
    pub async fn may_see(&self, room_id: &RoomId, server: &ServerName, rows: &[EventRow]) -> Result<Vec<bool>> {
        let s = self.hub.services();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let visibility = s.store.state_history(room_id.as_str(), "m.room.history_visibility").await?;
        let memberships: Vec<(i64, String, String)> = s
            .store
            .member_events_of_server(room_id.as_str(), server.as_str())
            .await?
            .into_iter()
            .filter(|(_, user, _)| UserId::parse(user.as_str()).is_ok_and(|u| u.server_name() == server))
            .collect();
        let mut users: Vec<&str> = memberships.iter().map(|(_, user, _)| user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        // From the state model where the state at the event is known: the setting before it,
        // the server's users' memberships after it (their own membership event included).
        let ids: Vec<String> = rows.iter().map(|row| row.event_id.clone()).collect();
        let groups = s.store.event_state_groups(&ids).await?;
        let mut by_group: std::collections::HashMap<(i64, i64), (String, Vec<String>)> =
            std::collections::HashMap::new();
        for (before, after) in groups.values() {
            if let std::collections::hash_map::Entry::Vacant(slot) = by_group.entry((*before, *after)) {
                slot.insert(self.visibility_in_state(*before, *after, server).await?);
            }
        }
        Ok(rows
            .iter()
            .map(|row| {
                let at = row.stream_ordering;
                let joined_later = memberships.iter().any(|(pos, _, membership)| *pos >= at && membership == "join");
                if let Some((setting, at_event)) = groups.get(&row.event_id).and_then(|g| by_group.get(g)) {
                    let at_event: Vec<&str> = at_event.iter().map(String::as_str).collect();
                    return server_sees(setting, &at_event, joined_later);
                }
                let setting = visibility
                    .iter()
                    .rev()
                    .find(|(pos, _)| *pos < at)
                    // History backfilled from other servers (negative positions) predates the
                    // state we hold: the earliest setting we know applies to it.
                    .or_else(|| visibility.first().filter(|_| at < 0))
                    .and_then(|(_, content)| content["history_visibility"].as_str())
                    .unwrap_or("shared");
                let at_event: Vec<&str> = users
                    .iter()
                    .filter_map(|user| {
                        memberships
                            .iter()
                            .rev()
                            .find(|(pos, u, _)| u == user && *pos <= at)
                            .map(|(_, _, membership)| membership.as_str())
                    })
                    .collect();
                server_sees(setting, &at_event, joined_later)
            })
            .collect())
    }

    /// The history visibility in the state `before` an event and the memberships of
    /// `server`'s users in the state `after` it.
    async fn visibility_in_state(&self, before: i64, after: i64, server: &ServerName) -> Result<(String, Vec<String>)> {
        let s = self.hub.services();
        let before = s.state.ids_of_group(before).await?;
        let after = s.state.ids_of_group(after).await?;
        let mut ids: Vec<String> = after
            .iter()
            .filter(|((kind, key), _)| {
                kind == "m.room.member" && UserId::parse(key.as_str()).is_ok_and(|u| u.server_name() == server)
            })
            .map(|(_, id)| id.clone())
            .collect();
        let setting_id = before.get(&("m.room.history_visibility".to_owned(), String::new())).cloned();
        ids.extend(setting_id.clone());
        let mut setting = "shared".to_owned();
        let mut memberships = Vec::new();
        for stored in s.store.pdus_for_auth(&ids).await? {
            let content =
                serde_json::from_str::<serde_json::Value>(&stored.json).unwrap_or_default()["content"].clone();
            if Some(&stored.event_id) == setting_id.as_ref() {
                if let Some(value) = content["history_visibility"].as_str() {
                    setting = value.to_owned();
                }
            } else if let Some(membership) = content["membership"].as_str() {
                memberships.push(membership.to_owned());
            }
        }
        Ok((setting, memberships))
    }

    /// Fails unless `event_id` is an event of the room's timeline that `origin` may see (the
    /// state and auth chain at an event are as private as the event).
    pub async fn require_may_see(&self, room_id: &RoomId, event_id: &str, origin: &ServerName) -> Result<()> {
        let s = self.hub.services();
        let row = s
            .store
            .event(event_id)
            .await?
            .filter(|row| row.room_id == room_id.as_str())
            .ok_or_else(|| Error::NotFound("Unknown event".to_owned()))?;
        if self.may_see(room_id, origin, std::slice::from_ref(&row)).await?.first() == Some(&true) {
            Ok(())
        } else {
            Err(Error::Forbidden("Your server may not see that event".to_owned()))
        }
    }
}

/// A stored PDU as another server gets it: pruned by the room version's redaction rules when
/// `prune` (an event it may not see, or one redacted here), else as stored.
pub fn served_pdu(json: &str, prune: bool, version: &RoomVersionId) -> Result<Box<RawJsonValue>> {
    if !prune {
        return RawJsonValue::from_string(json.to_owned()).map_err(|e| Error::internal(e.to_string()));
    }
    let rules = version.rules().ok_or_else(|| Error::internal(format!("unsupported room version {version}")))?;
    let object: CanonicalJsonObject =
        serde_json::from_str(json).map_err(|e| Error::internal(format!("stored event: {e}")))?;
    let pruned = redact(object, &rules.redaction, None).map_err(|e| Error::internal(e.to_string()))?;
    serde_json::value::to_raw_value(&pruned).map_err(|e| Error::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::server_sees;

    #[test]
    fn the_specs_rules() {
        assert!(server_sees("world_readable", &[], false));
        assert!(server_sees("joined", &["join"], false));
        assert!(!server_sees("joined", &["invite"], true));
        assert!(server_sees("invited", &["invite"], false));
        assert!(!server_sees("invited", &["leave"], true));
        assert!(server_sees("shared", &[], true));
        assert!(!server_sees("shared", &["invite"], false));
        assert!(!server_sees("shared", &["leave", "ban"], false));
        assert!(!server_sees("org.example.unknown", &["invite"], true));
        // Several users: one of them is enough.
        assert!(server_sees("joined", &["leave", "join"], false));
    }
}
