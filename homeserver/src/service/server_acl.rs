//! Server ACLs (`m.room.server_acl`): which servers may take part in a room. Checked for the
//! origin of every federation request about a room (the spec's list: `/send` per PDU and
//! room EDU, make/send join and leave, `/invite`, `/event`, `/state`, `/state_ids`,
//! `/backfill`, `/event_auth`, `/get_missing_events`).
//!
//! A malformed ACL is read field by field the way Synapse reads it, never as "allow
//! everyone": an `allow` that is not a list allows nobody (the spec's default for a missing
//! `allow`), a `deny` that is not a list denies nobody, an `allow_ip_literals` that is not a
//! boolean counts as `true` (its default), and entries that are not strings are skipped.

use ruma::{RoomId, ServerName, events::room::server_acl::RoomServerAclEventContent};
use serde_json::Value as JsonValue;

use super::servers::Servers;
use crate::error::{Error, Result};

/// The ACL a (possibly malformed) `m.room.server_acl` content stands for.
pub fn acl_from_content(content: &JsonValue) -> RoomServerAclEventContent {
    let strings = |field: &str| -> Vec<String> {
        content[field].as_array().into_iter().flatten().filter_map(|e| e.as_str().map(str::to_owned)).collect()
    };
    let allow_ip_literals = content["allow_ip_literals"].as_bool().unwrap_or(true);
    RoomServerAclEventContent::new(allow_ip_literals, strings("allow"), strings("deny"))
}

impl Servers {
    /// Refuses `server` if the room's `m.room.server_acl` denies it (403 `M_FORBIDDEN`). A
    /// room we hold no ACL for (or do not know) allows every server.
    pub async fn check_acl(&self, room_id: &RoomId, server: &ServerName) -> Result<()> {
        let s = self.hub.services();
        let Some(row) = s.store.current_state_event(room_id.as_str(), "m.room.server_acl", "").await? else {
            return Ok(());
        };
        // A stored PDU that does not parse has no content: an empty ACL allows nobody.
        let pdu: JsonValue = serde_json::from_str(&row.json).unwrap_or_default();
        if acl_from_content(&pdu["content"]).is_allowed(server) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("{server} is denied by the room's server ACL")))
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::server_name;
    use serde_json::json;

    use super::*;

    fn allows(content: JsonValue, server: &ServerName) -> bool {
        acl_from_content(&content).is_allowed(server)
    }

    #[test]
    fn malformed_fields_are_read_like_synapse() {
        let host = server_name!("evil.example:8448");
        let ip = server_name!("127.0.0.1:8448");
        assert!(allows(json!({"allow": ["*"]}), host));
        assert!(!allows(json!({"allow": "*"}), host), "a non-list allow allows nobody");
        assert!(!allows(json!({}), host), "a missing allow allows nobody");
        assert!(!allows(json!(null), host), "no content allows nobody");
        assert!(allows(json!({"allow": [5, "*"]}), host), "non-string entries are skipped");
        assert!(!allows(json!({"allow": ["*"], "deny": [5, "evil.example"]}), host));
        assert!(allows(json!({"allow": ["*"], "deny": "evil.example"}), host), "a non-list deny denies nobody");
        assert!(allows(json!({"allow": ["*"], "allow_ip_literals": "no"}), ip), "a non-boolean counts as true");
        assert!(!allows(json!({"allow": ["*"], "allow_ip_literals": false}), ip));
    }
}
