//! Algorithm names, and the typed requests, answers and `/sync` parts at the machine's
//! boundary.
//!
//! Requests are ruma's request types ([`Request`]): a caller with a ruma-based HTTP client
//! sends them as they are, and reports ruma's response types back ([`IncomingResponse`]). A
//! caller that speaks plain HTTP uses [`OutgoingRequest::method`], [`OutgoingRequest::path`]
//! and [`OutgoingRequest::body`] (the same request as JSON) and reports the JSON body it got.

use std::{collections::BTreeMap, time::Duration};

use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedOneTimeKeyId, OwnedRoomId, OwnedUserId, UInt,
    api::client::{
        backup::{RoomKeyBackup, add_backup_keys},
        keys::{claim_keys, get_keys, upload_keys, upload_signatures},
        to_device::send_event_to_device,
    },
    events::{AnyToDeviceEvent, ToDeviceEventType},
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::{Value, json, value::to_raw_value};

use crate::{
    account::KeysUpload,
    error::{Error, Result},
};

pub const OLM_V1: &str = "m.olm.v1.curve25519-aes-sha2";
pub const MEGOLM_V1: &str = "m.megolm.v1.aes-sha2";
pub const SIGNED_CURVE25519: &str = "signed_curve25519";
pub const BACKUP_V1: &str = "m.megolm_backup.v1.curve25519-aes-sha2";

/// How long the server may wait on other servers for `/keys/query` and `/keys/claim`.
const KEYS_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A JSON value as ruma's `Raw` (the bytes we built or received, not re-shaped).
pub(crate) fn raw<T>(value: &Value) -> Raw<T> {
    Raw::from_json(to_raw_value(value).expect("a JSON value always serializes"))
}

/// A `Raw` as a JSON value (it holds valid JSON, so this cannot fail).
pub(crate) fn json_of<T>(raw: &Raw<T>) -> Value {
    raw.deserialize_as_unchecked().unwrap_or(Value::Null)
}

/// To-device messages as the machine builds them: user -> device -> content.
pub(crate) type ToDeviceMessages = BTreeMap<OwnedUserId, BTreeMap<String, Value>>;

/// One HTTP request for the caller to send; report the answer with
/// [`OlmMachine::mark_request_as_sent`](crate::OlmMachine::mark_request_as_sent).
#[derive(Debug, Clone)]
pub struct OutgoingRequest {
    /// Identifies the request in `mark_request_as_sent`; also the to-device transaction id.
    pub request_id: String,
    pub request: Request,
}

/// What to send: ruma's request type for each endpoint the machine uses.
#[derive(Debug, Clone)]
pub enum Request {
    /// `POST /_matrix/client/v3/keys/upload`
    KeysUpload(upload_keys::v3::Request),
    /// `POST /_matrix/client/v3/keys/query`
    KeysQuery(get_keys::v3::Request),
    /// `POST /_matrix/client/v3/keys/claim`
    KeysClaim(claim_keys::v3::Request),
    /// `PUT /_matrix/client/v3/sendToDevice/{event_type}/{txn_id}` (the txn id is the
    /// request id)
    ToDevice(send_event_to_device::v3::Request),
    /// `POST /_matrix/client/v3/keys/signatures/upload`
    SignatureUpload(upload_signatures::v3::Request),
    /// `PUT /_matrix/client/v3/room_keys/keys?version={version}`
    BackupKeys(add_backup_keys::v3::Request),
}

impl Request {
    pub(crate) fn keys_upload(upload: KeysUpload) -> Result<Self> {
        let keys = |keys: BTreeMap<String, Value>| -> Result<BTreeMap<OwnedOneTimeKeyId, _>> {
            keys.into_iter()
                .map(|(id, key)| {
                    Ok((OwnedOneTimeKeyId::try_from(id).map_err(|e| Error::invalid("key id", e))?, raw(&key)))
                })
                .collect()
        };
        let mut request = upload_keys::v3::Request::new();
        request.device_keys = upload.device_keys.as_ref().map(raw);
        request.one_time_keys = keys(upload.one_time_keys)?;
        request.fallback_keys = keys(upload.fallback_keys)?;
        Ok(Request::KeysUpload(request))
    }

    pub(crate) fn keys_query(users: impl IntoIterator<Item = OwnedUserId>) -> Self {
        let mut request = get_keys::v3::Request::new();
        request.device_keys = users.into_iter().map(|u| (u, Vec::new())).collect();
        request.timeout = Some(KEYS_TIMEOUT);
        Request::KeysQuery(request)
    }

    pub(crate) fn keys_claim(
        one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, OneTimeKeyAlgorithm>>,
    ) -> Self {
        let mut request = claim_keys::v3::Request::new(one_time_keys);
        request.timeout = Some(KEYS_TIMEOUT);
        Request::KeysClaim(request)
    }

    /// The transaction id is set to the request id by [`OutgoingRequest::new`].
    pub(crate) fn to_device(event_type: &str, messages: ToDeviceMessages) -> Self {
        let messages = messages
            .into_iter()
            .map(|(user, devices)| {
                let devices = devices
                    .into_iter()
                    .map(|(device, content)| (DeviceIdOrAllDevices::DeviceId(device.into()), raw(&content)))
                    .collect();
                (user, devices)
            })
            .collect();
        Request::ToDevice(send_event_to_device::v3::Request::new_raw(
            ToDeviceEventType::from(event_type),
            "pending".into(),
            messages,
        ))
    }

    /// `body` is `/keys/signatures/upload`'s: user -> key id or device id -> signed object.
    pub(crate) fn signature_upload(body: &Value) -> Result<Self> {
        let signed_keys: BTreeMap<OwnedUserId, upload_signatures::v3::SignedKeys> =
            serde_json::from_value(body.clone()).map_err(|e| Error::invalid("signature upload", e))?;
        Ok(Request::SignatureUpload(upload_signatures::v3::Request::new(signed_keys)))
    }

    /// `rooms` is `/room_keys/keys`'s: room -> `sessions` -> session id -> key backup data.
    pub(crate) fn backup_keys(version: String, rooms: &Value) -> Result<Self> {
        let rooms: BTreeMap<OwnedRoomId, RoomKeyBackup> =
            serde_json::from_value(rooms.clone()).map_err(|e| Error::invalid("key backup upload", e))?;
        Ok(Request::BackupKeys(add_backup_keys::v3::Request::new(version, rooms)))
    }
}

impl OutgoingRequest {
    pub(crate) fn new(mut request: Request) -> Self {
        let request_id = random_id();
        if let Request::ToDevice(to_device) = &mut request {
            to_device.txn_id = request_id.as_str().into();
        }
        Self { request_id, request }
    }

    pub fn method(&self) -> &'static str {
        match self.request {
            Request::ToDevice(_) | Request::BackupKeys(_) => "PUT",
            _ => "POST",
        }
    }

    /// Path and query, relative to the homeserver's base URL.
    pub fn path(&self) -> String {
        match &self.request {
            Request::KeysUpload(_) => "/_matrix/client/v3/keys/upload".to_owned(),
            Request::KeysQuery(_) => "/_matrix/client/v3/keys/query".to_owned(),
            Request::KeysClaim(_) => "/_matrix/client/v3/keys/claim".to_owned(),
            // Event types are namespaced identifiers and request ids are alphanumeric: neither
            // needs percent-encoding.
            Request::ToDevice(to_device) => {
                format!("/_matrix/client/v3/sendToDevice/{}/{}", to_device.event_type, self.request_id)
            }
            Request::SignatureUpload(_) => "/_matrix/client/v3/keys/signatures/upload".to_owned(),
            Request::BackupKeys(backup) => format!("/_matrix/client/v3/room_keys/keys?version={}", backup.version),
        }
    }

    /// The request body as JSON, for a caller that does not send ruma's request types.
    pub fn body(&self) -> Value {
        let with_timeout = |mut body: Value, timeout: Option<Duration>| {
            if let Some(timeout) = timeout {
                body["timeout"] = json!(timeout.as_millis() as u64);
            }
            body
        };
        match &self.request {
            Request::KeysUpload(upload) => {
                let mut body = json!({});
                if let Some(keys) = &upload.device_keys {
                    body["device_keys"] = json_of(keys);
                }
                if !upload.one_time_keys.is_empty() {
                    body["one_time_keys"] = json!(upload.one_time_keys);
                }
                if !upload.fallback_keys.is_empty() {
                    body["fallback_keys"] = json!(upload.fallback_keys);
                }
                body
            }
            Request::KeysQuery(query) => with_timeout(json!({ "device_keys": query.device_keys }), query.timeout),
            Request::KeysClaim(claim) => with_timeout(json!({ "one_time_keys": claim.one_time_keys }), claim.timeout),
            Request::ToDevice(to_device) => json!({ "messages": to_device.messages }),
            Request::SignatureUpload(upload) => json!(upload.signed_keys),
            Request::BackupKeys(backup) => json!({ "rooms": backup.rooms }),
        }
    }
}

/// The answer to an [`OutgoingRequest`]: ruma's response type for its request, or the JSON
/// body of the 2xx answer as received. JSON is read leniently, as the machine always did: a
/// part that does not parse counts as absent.
#[derive(Debug, Clone, Copy)]
pub enum IncomingResponse<'a> {
    KeysUpload(&'a upload_keys::v3::Response),
    KeysQuery(&'a get_keys::v3::Response),
    KeysClaim(&'a claim_keys::v3::Response),
    ToDevice(&'a send_event_to_device::v3::Response),
    SignatureUpload(&'a upload_signatures::v3::Response),
    BackupKeys(&'a add_backup_keys::v3::Response),
    Json(&'a Value),
}

macro_rules! incoming_response_from {
    ($($variant:ident: $response:ty),* $(,)?) => {$(
        impl<'a> From<&'a $response> for IncomingResponse<'a> {
            fn from(response: &'a $response) -> Self {
                IncomingResponse::$variant(response)
            }
        }
    )*};
}

incoming_response_from!(
    KeysUpload: upload_keys::v3::Response,
    KeysQuery: get_keys::v3::Response,
    KeysClaim: claim_keys::v3::Response,
    ToDevice: send_event_to_device::v3::Response,
    SignatureUpload: upload_signatures::v3::Response,
    BackupKeys: add_backup_keys::v3::Response,
    Json: Value,
);

impl IncomingResponse<'_> {
    /// Which request this answers (`None` for JSON, which answers whatever was asked).
    pub(crate) fn answers(&self) -> Option<&'static str> {
        Some(match self {
            IncomingResponse::KeysUpload(_) => "keys upload",
            IncomingResponse::KeysQuery(_) => "keys query",
            IncomingResponse::KeysClaim(_) => "keys claim",
            IncomingResponse::ToDevice(_) => "to-device",
            IncomingResponse::SignatureUpload(_) => "signature upload",
            IncomingResponse::BackupKeys(_) => "key backup",
            IncomingResponse::Json(_) => return None,
        })
    }
}

/// What `/sync` says that concerns encryption.
#[derive(Debug, Clone, Default)]
pub struct SyncChanges {
    /// `to_device.events`, as received.
    pub to_device_events: Vec<Raw<AnyToDeviceEvent>>,
    /// `device_lists.changed`
    pub changed: Vec<OwnedUserId>,
    /// `device_lists.left`
    pub left: Vec<OwnedUserId>,
    /// `device_one_time_keys_count`
    pub one_time_keys_counts: BTreeMap<OneTimeKeyAlgorithm, UInt>,
    /// `device_unused_fallback_key_types`; `None` when the server omits it.
    pub unused_fallback_key_types: Option<Vec<OneTimeKeyAlgorithm>>,
}

impl SyncChanges {
    /// Picks the encryption-related parts out of a `/sync` response body (JSON as received;
    /// entries that do not parse are left out).
    pub fn from_sync_response(sync: &Value) -> Self {
        let users = |v: &Value| -> Vec<OwnedUserId> {
            v.as_array()
                .map(|a| a.iter().filter_map(|u| u.as_str()).filter_map(|u| u.try_into().ok()).collect())
                .unwrap_or_default()
        };
        Self {
            to_device_events: sync["to_device"]["events"].as_array().into_iter().flatten().map(raw).collect(),
            changed: users(&sync["device_lists"]["changed"]),
            left: users(&sync["device_lists"]["left"]),
            one_time_keys_counts: sync["device_one_time_keys_count"]
                .as_object()
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.as_str().into(), UInt::new(v.as_u64()?)?))).collect())
                .unwrap_or_default(),
            unused_fallback_key_types: sync
                .get("device_unused_fallback_key_types")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|t| t.as_str().map(Into::into)).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::{device_id, user_id};

    use super::*;

    #[test]
    fn requests_have_the_spec_paths_and_bodies() {
        let query = OutgoingRequest::new(Request::keys_query([user_id!("@a:x").to_owned()]));
        assert_eq!((query.method(), query.path().as_str()), ("POST", "/_matrix/client/v3/keys/query"));
        assert_eq!(query.body(), json!({"device_keys": {"@a:x": []}, "timeout": 10_000}));

        let one_time_keys = BTreeMap::from([(
            user_id!("@a:x").to_owned(),
            BTreeMap::from([(device_id!("D").to_owned(), OneTimeKeyAlgorithm::SignedCurve25519)]),
        )]);
        let claim = OutgoingRequest::new(Request::keys_claim(one_time_keys));
        assert_eq!(claim.body(), json!({"one_time_keys": {"@a:x": {"D": "signed_curve25519"}}, "timeout": 10_000}));

        let messages =
            BTreeMap::from([(user_id!("@a:x").to_owned(), BTreeMap::from([("D".to_owned(), json!({"k": 1}))]))]);
        let to_device = OutgoingRequest::new(Request::to_device("m.room.encrypted", messages));
        assert_eq!(to_device.method(), "PUT");
        assert_eq!(
            to_device.path(),
            format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{}", to_device.request_id)
        );
        assert!(to_device.request_id.chars().all(|c| c.is_ascii_alphanumeric()));
        let Request::ToDevice(typed) = &to_device.request else { panic!() };
        assert_eq!(typed.txn_id.as_str(), to_device.request_id, "the transaction id is the request id");
        assert_eq!(to_device.body(), json!({"messages": {"@a:x": {"D": {"k": 1}}}}));

        let upload = OutgoingRequest::new(Request::keys_upload(KeysUpload::default()).unwrap());
        assert_eq!(upload.body(), json!({}), "empty parts are left out");
        let keys = KeysUpload {
            device_keys: Some(json!({"user_id": "@a:x"})),
            one_time_keys: BTreeMap::from([("signed_curve25519:AAAAAQ".to_owned(), json!({"key": "k"}))]),
            fallback_keys: BTreeMap::new(),
        };
        let upload = OutgoingRequest::new(Request::keys_upload(keys).unwrap());
        assert_eq!(
            upload.body(),
            json!({"device_keys": {"user_id": "@a:x"}, "one_time_keys": {"signed_curve25519:AAAAAQ": {"key": "k"}}})
        );

        let signatures = json!({"@a:x": {"D": {"user_id": "@a:x", "signatures": {}}}});
        let upload = OutgoingRequest::new(Request::signature_upload(&signatures).unwrap());
        assert_eq!(upload.body(), signatures);
        assert!(Request::signature_upload(&json!({"not a user": {}})).is_err());

        let rooms = json!({"!r:x": {"sessions": {"s": {"first_message_index": 0, "forwarded_count": 0,
            "is_verified": false, "session_data": {"ephemeral": "e", "ciphertext": "c", "mac": "m"}}}}});
        let backup = OutgoingRequest::new(Request::backup_keys("3".into(), &rooms).unwrap());
        assert_eq!((backup.method(), backup.path().as_str()), ("PUT", "/_matrix/client/v3/room_keys/keys?version=3"));
        assert_eq!(backup.body(), json!({ "rooms": rooms }));
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
        assert_eq!(json_of(&changes.to_device_events[0])["type"], "m.dummy");
        assert_eq!(changes.changed, vec![user_id!("@a:x").to_owned()]);
        assert_eq!(changes.left, vec![user_id!("@b:x").to_owned()]);
        assert_eq!(changes.one_time_keys_counts[&OneTimeKeyAlgorithm::SignedCurve25519], UInt::from(7u32));
        assert_eq!(changes.unused_fallback_key_types, Some(vec![OneTimeKeyAlgorithm::SignedCurve25519]));
        // A server that does not report fallback keys: None, not "none left".
        assert_eq!(SyncChanges::from_sync_response(&json!({})).unused_fallback_key_types, None);
    }
}
