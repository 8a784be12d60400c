//! Algorithm names and the request shapes this crate hands to the caller.
//!
//! Requests are plain serde values plus the method and path to use: the caller owns HTTP
//! (sans-I/O), and a JSON body works with any HTTP client and with the ruma request types.

use std::collections::BTreeMap;

use ruma::{OwnedDeviceId, OwnedUserId};
use serde_json::{Value, json};

use crate::account::KeysUpload;

pub const OLM_V1: &str = "m.olm.v1.curve25519-aes-sha2";
pub const MEGOLM_V1: &str = "m.megolm.v1.aes-sha2";
pub const SIGNED_CURVE25519: &str = "signed_curve25519";
pub const BACKUP_V1: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

/// Milliseconds since the Unix epoch (the unit of Matrix timestamps).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A fresh random id for requests and transactions (URL-safe characters only).
pub(crate) fn random_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..24).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// One HTTP request for the caller to send; report the answer with
/// [`OlmMachine::mark_request_as_sent`](crate::OlmMachine::mark_request_as_sent).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingRequest {
    /// Identifies the request in `mark_request_as_sent`; also the to-device transaction id.
    pub request_id: String,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `POST /_matrix/client/v3/keys/upload`
    KeysUpload(KeysUpload),
    /// `POST /_matrix/client/v3/keys/query`
    KeysQuery { users: Vec<OwnedUserId> },
    /// `POST /_matrix/client/v3/keys/claim`
    KeysClaim { one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, String>> },
    /// `PUT /_matrix/client/v3/sendToDevice/{event_type}/{request_id}`
    ToDevice { event_type: String, messages: BTreeMap<OwnedUserId, BTreeMap<String, Value>> },
    /// `POST /_matrix/client/v3/keys/signatures/upload`
    SignatureUpload(Value),
    /// `PUT /_matrix/client/v3/room_keys/keys?version={version}`
    BackupKeys { version: String, rooms: Value },
}

impl OutgoingRequest {
    pub(crate) fn new(request: Request) -> Self {
        Self { request_id: random_id(), request }
    }

    pub fn method(&self) -> &'static str {
        match self.request {
            Request::ToDevice { .. } | Request::BackupKeys { .. } => "PUT",
            _ => "POST",
        }
    }

    /// Path and query, relative to the homeserver's base URL.
    pub fn path(&self) -> String {
        match &self.request {
            Request::KeysUpload(_) => "/_matrix/client/v3/keys/upload".to_owned(),
            Request::KeysQuery { .. } => "/_matrix/client/v3/keys/query".to_owned(),
            Request::KeysClaim { .. } => "/_matrix/client/v3/keys/claim".to_owned(),
            // Event types are namespaced identifiers and request ids are alphanumeric: neither
            // needs percent-encoding.
            Request::ToDevice { event_type, .. } => {
                format!("/_matrix/client/v3/sendToDevice/{event_type}/{}", self.request_id)
            }
            Request::SignatureUpload(_) => "/_matrix/client/v3/keys/signatures/upload".to_owned(),
            Request::BackupKeys { version, .. } => format!("/_matrix/client/v3/room_keys/keys?version={version}"),
        }
    }

    pub fn body(&self) -> Value {
        match &self.request {
            Request::KeysUpload(upload) => {
                let mut body = json!({});
                if let Some(keys) = &upload.device_keys {
                    body["device_keys"] = keys.clone();
                }
                if !upload.one_time_keys.is_empty() {
                    body["one_time_keys"] = json!(upload.one_time_keys);
                }
                if !upload.fallback_keys.is_empty() {
                    body["fallback_keys"] = json!(upload.fallback_keys);
                }
                body
            }
            Request::KeysQuery { users } => {
                let device_keys: BTreeMap<&OwnedUserId, Vec<String>> = users.iter().map(|u| (u, Vec::new())).collect();
                json!({ "device_keys": device_keys, "timeout": 10_000 })
            }
            Request::KeysClaim { one_time_keys } => json!({ "one_time_keys": one_time_keys, "timeout": 10_000 }),
            Request::ToDevice { messages, .. } => json!({ "messages": messages }),
            Request::SignatureUpload(body) => body.clone(),
            Request::BackupKeys { rooms, .. } => json!({ "rooms": rooms }),
        }
    }
}

/// What `/sync` says that concerns encryption.
#[derive(Debug, Clone, Default)]
pub struct SyncChanges {
    /// `to_device.events`, as received.
    pub to_device_events: Vec<Value>,
    /// `device_lists.changed`
    pub changed: Vec<OwnedUserId>,
    /// `device_lists.left`
    pub left: Vec<OwnedUserId>,
    /// `device_one_time_keys_count`
    pub one_time_keys_counts: BTreeMap<String, u64>,
    /// `device_unused_fallback_key_types`; `None` when the server omits it.
    pub unused_fallback_key_types: Option<Vec<String>>,
}

impl SyncChanges {
    /// Picks the encryption-related parts out of a `/sync` response body.
    pub fn from_sync_response(sync: &Value) -> Self {
        let users = |v: &Value| -> Vec<OwnedUserId> {
            v.as_array()
                .map(|a| a.iter().filter_map(|u| u.as_str()).filter_map(|u| u.try_into().ok()).collect())
                .unwrap_or_default()
        };
        Self {
            to_device_events: sync["to_device"]["events"].as_array().cloned().unwrap_or_default(),
            changed: users(&sync["device_lists"]["changed"]),
            left: users(&sync["device_lists"]["left"]),
            one_time_keys_counts: sync["device_one_time_keys_count"]
                .as_object()
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
                .unwrap_or_default(),
            unused_fallback_key_types: sync
                .get("device_unused_fallback_key_types")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::{device_id, user_id};

    use super::*;

    #[test]
    fn requests_have_the_spec_paths_and_bodies() {
        let query = OutgoingRequest::new(Request::KeysQuery { users: vec![user_id!("@a:x").to_owned()] });
        assert_eq!((query.method(), query.path().as_str()), ("POST", "/_matrix/client/v3/keys/query"));
        assert_eq!(query.body()["device_keys"], json!({"@a:x": []}));

        let one_time_keys = BTreeMap::from([(
            user_id!("@a:x").to_owned(),
            BTreeMap::from([(device_id!("D").to_owned(), SIGNED_CURVE25519.to_owned())]),
        )]);
        let claim = OutgoingRequest::new(Request::KeysClaim { one_time_keys });
        assert_eq!(claim.body()["one_time_keys"], json!({"@a:x": {"D": "signed_curve25519"}}));

        let messages =
            BTreeMap::from([(user_id!("@a:x").to_owned(), BTreeMap::from([("D".to_owned(), json!({"k": 1}))]))]);
        let to_device = OutgoingRequest::new(Request::ToDevice { event_type: "m.room.encrypted".into(), messages });
        assert_eq!(to_device.method(), "PUT");
        assert_eq!(
            to_device.path(),
            format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{}", to_device.request_id)
        );
        assert!(to_device.request_id.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(to_device.body(), json!({"messages": {"@a:x": {"D": {"k": 1}}}}));

        let upload = OutgoingRequest::new(Request::KeysUpload(KeysUpload::default()));
        assert_eq!(upload.body(), json!({}), "empty parts are left out");
    }

    #[test]
    fn sync_changes_from_a_sync_body() {
        let sync = json!({
            "next_batch": "s1",
            "to_device": {"events": [{"type": "m.dummy", "sender": "@a:x", "content": {}}]},
            "device_lists": {"changed": ["@a:x", "not a user id"], "left": ["@b:x"]},
            "device_one_time_keys_count": {"signed_curve25519": 7},
            "device_unused_fallback_key_types": ["signed_curve25519"],
        });
        let changes = SyncChanges::from_sync_response(&sync);
        assert_eq!(changes.to_device_events.len(), 1);
        assert_eq!(changes.changed, vec![user_id!("@a:x").to_owned()]);
        assert_eq!(changes.left, vec![user_id!("@b:x").to_owned()]);
        assert_eq!(changes.one_time_keys_counts["signed_curve25519"], 7);
        assert_eq!(changes.unused_fallback_key_types, Some(vec!["signed_curve25519".to_owned()]));
        // A server that does not report fallback keys: None, not "none left".
        assert_eq!(SyncChanges::from_sync_response(&json!({})).unused_fallback_key_types, None);
    }
}
