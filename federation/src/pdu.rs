//! Persistent data units: building, hashing and signing new events, and reading stored ones
//! back in the shape ruma's authorization rules and state resolution work on.
//!
//! Every event Obmin creates goes through [`sign_new_event`]: content hash, server
//! signature, reference-hash event id, exactly as another server will verify it.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedServerName, OwnedUserId, RoomId, RoomVersionId, ServerName, UInt, UserId,
    events::TimelineEventType,
    room_version_rules::{EventIdFormatVersion, RoomIdFormatVersion, RoomVersionRules},
    signatures::{
        PublicKeyMap, Verified, hash_and_sign_event, reference_hash, required_server_signatures_to_verify_event,
        sign_event, verify_event,
    },
};
use serde::Deserialize;
use serde_json::{Value as JsonValue, value::RawValue as RawJsonValue};

use crate::SigningKey;

/// Why an event could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("room version {0} is not supported")]
    UnsupportedRoomVersion(RoomVersionId),
    #[error("event is not valid JSON for a PDU: {0}")]
    Json(String),
    #[error("cannot sign or hash the event: {0}")]
    Signing(String),
    #[error("the event is larger than 65536 bytes")]
    TooLarge,
    #[error("the event's signatures do not verify: {0}")]
    BadSignature(String),
    #[error("the membership template is not the event asked for: {0}")]
    BadTemplate(String),
}

/// The rules of a room version we can read and write.
pub fn room_version_rules(version: &RoomVersionId) -> Result<RoomVersionRules, PduError> {
    version.rules().ok_or_else(|| PduError::UnsupportedRoomVersion(version.clone()))
}

/// An event to be created by this server.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// `None` only for the `m.room.create` event of a room version whose room id is derived
    /// from that event (version 12 and later).
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub event_type: String,
    pub state_key: Option<String>,
    pub content: JsonValue,
    pub redacts: Option<OwnedEventId>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: u64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
}

/// Builds the PDU JSON, adds the content hash and this server's signature, and computes the
/// event id from the reference hash.
pub fn sign_new_event(
    event: NewEvent,
    version: &RoomVersionId,
    origin: &ServerName,
    key: &SigningKey,
) -> Result<(OwnedEventId, CanonicalJsonObject), PduError> {
    let rules = room_version_rules(version)?;
    let mut object = serde_json::Map::new();
    object.insert("auth_events".into(), JsonValue::from(ids(&event.auth_events)));
    object.insert("prev_events".into(), JsonValue::from(ids(&event.prev_events)));
    let mut content = event.content;
    if let Some(redacts) = &event.redacts {
        // Room version 11 moved `redacts` into the content; older versions keep it on top.
        if rules.redaction.content_field_redacts {
            if let Some(map) = content.as_object_mut() {
                map.insert("redacts".into(), JsonValue::from(redacts.as_str()));
            }
        } else {
            object.insert("redacts".into(), JsonValue::from(redacts.as_str()));
        }
    }
    object.insert("content".into(), content);
    object.insert("depth".into(), JsonValue::from(event.depth));
    object.insert("origin_server_ts".into(), JsonValue::from(u64::from(event.origin_server_ts.get())));
    if let Some(room_id) = &event.room_id {
        object.insert("room_id".into(), JsonValue::from(room_id.as_str()));
    }
    object.insert("sender".into(), JsonValue::from(event.sender.as_str()));
    if let Some(state_key) = &event.state_key {
        object.insert("state_key".into(), JsonValue::from(state_key.as_str()));
    }
    object.insert("type".into(), JsonValue::from(event.event_type));

    let CanonicalJsonValue::Object(mut object) =
        CanonicalJsonValue::try_from(JsonValue::Object(object)).map_err(|e| PduError::Json(e.to_string()))?
    else {
        return Err(PduError::Json("not an object".into()));
    };
    hash_and_sign_event(origin.as_str(), key.pair(), &mut object, &rules.redaction).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => PduError::TooLarge,
        other => PduError::Signing(other.to_string()),
    })?;
    let hash = reference_hash(&object, &rules).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => PduError::TooLarge,
        other => PduError::Signing(other.to_string()),
    })?;
    let event_id = EventId::parse(format!("${hash}")).map_err(|e| PduError::Signing(e.to_string()))?;
    Ok((event_id, object))
}

/// The room id a version-12 room gets from its create event's id (`$hash` -> `!hash`); for
/// older versions the caller chooses the room id.
pub fn room_id_from_create_event(
    version: &RoomVersionId,
    create_event_id: &EventId,
) -> Result<Option<OwnedRoomId>, PduError> {
    let rules = room_version_rules(version)?;
    match rules.room_id_format {
        RoomIdFormatVersion::V2 => {
            let hash = create_event_id.as_str().trim_start_matches('$');
            RoomId::parse(format!("!{hash}")).map(Some).map_err(|e| PduError::Json(e.to_string()))
        }
        _ => Ok(None),
    }
}

/// The id of an event received from another server: the reference hash (room version 3 and
/// later) or the `event_id` field it carries (versions 1 and 2).
pub fn event_id_of(object: &CanonicalJsonObject, version: &RoomVersionId) -> Result<OwnedEventId, PduError> {
    let rules = room_version_rules(version)?;
    if rules.event_id_format == EventIdFormatVersion::V1 {
        return match object.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => EventId::parse(id).map_err(|e| PduError::Json(e.to_string())),
            _ => Err(PduError::Json("event_id is missing".into())),
        };
    }
    let hash = reference_hash(object, &rules).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => PduError::TooLarge,
        other => PduError::Json(other.to_string()),
    })?;
    EventId::parse(format!("${hash}")).map_err(|e| PduError::Json(e.to_string()))
}

/// The signing keys needed to verify an event: (server, key ids it signed with). Fetch
/// these, then call [`verify_received`].
pub fn signing_keys_needed(
    object: &CanonicalJsonObject,
    version: &RoomVersionId,
) -> Result<Vec<(OwnedServerName, Vec<String>)>, PduError> {
    let rules = room_version_rules(version)?;
    let servers = required_server_signatures_to_verify_event(object, &rules.signatures)
        .map_err(|e| PduError::BadSignature(e.to_string()))?;
    let signatures = match object.get("signatures") {
        Some(CanonicalJsonValue::Object(map)) => map,
        _ => return Err(PduError::BadSignature("the event is not signed".into())),
    };
    Ok(servers
        .into_iter()
        .map(|server| {
            let key_ids = match signatures.get(server.as_str()) {
                Some(CanonicalJsonValue::Object(keys)) => {
                    keys.keys().filter(|id| id.starts_with("ed25519:")).cloned().collect()
                }
                _ => Vec::new(),
            };
            (server, key_ids)
        })
        .collect())
}

/// Checks a received event's signatures (with `keys`, from [`signing_keys_needed`]) and its
/// content hash. An event whose content does not match its hash is redacted, as the spec
/// says. Returns the event id and the event as it is to be stored (without `unsigned`).
pub fn verify_received(
    mut object: CanonicalJsonObject,
    version: &RoomVersionId,
    keys: &PublicKeyMap,
) -> Result<(OwnedEventId, CanonicalJsonObject), PduError> {
    let rules = room_version_rules(version)?;
    object.remove("unsigned");
    let verified = verify_event(keys, &object, &rules).map_err(|e| PduError::BadSignature(e.to_string()))?;
    if verified == Verified::Signatures {
        object =
            ruma::canonical_json::redact(object, &rules.redaction, None).map_err(|e| PduError::Json(e.to_string()))?;
    }
    let event_id = event_id_of(&object, version)?;
    Ok((event_id, object))
}

/// The membership event one of our users asked another server to prepare (make_join /
/// make_leave): the only event a template may be turned into.
#[derive(Debug, Clone, Copy)]
pub struct MembershipRequest<'a> {
    pub room_id: &'a RoomId,
    pub user_id: &'a UserId,
    /// `join` or `leave`.
    pub membership: &'a str,
}

/// Most `prev_events` and `auth_events` a template may name (the limits Synapse enforces on
/// every event).
const MAX_TEMPLATE_PREV_EVENTS: usize = 20;
const MAX_TEMPLATE_AUTH_EVENTS: usize = 10;
/// The greatest depth (and integer) canonical JSON allows: 2^53 - 1.
const MAX_DEPTH: u64 = (1 << 53) - 1;

/// Completes and signs an event from a template another server prepared (the answer to
/// make_join / make_leave). The template must be exactly the membership `request` asked for:
/// an `m.room.member` event of that user about themselves, in that room, with that
/// membership; anything else is refused (we would be signing a join, leave or kick "by" one of
/// our users that they never asked for). The event is then built from an allow-list: the
/// template's `prev_events`, `auth_events` and `depth`, `content` (ours, which may carry our
/// user's profile, plus the template's `join_authorised_via_users_server` for a restricted
/// join), the timestamp now; no other key of the template is copied. The content hash, our
/// signature and the event id are computed as for our own events.
pub fn sign_membership_template(
    template: &RawJsonValue,
    request: MembershipRequest<'_>,
    mut content: JsonValue,
    version: &RoomVersionId,
    origin: &ServerName,
    key: &SigningKey,
) -> Result<(OwnedEventId, CanonicalJsonObject), PduError> {
    let rules = room_version_rules(version)?;
    if rules.event_id_format == EventIdFormatVersion::V1 {
        // Versions 1 and 2 carry a chosen event id, not a hash.
        return Err(PduError::UnsupportedRoomVersion(version.clone()));
    }
    let template: serde_json::Map<String, JsonValue> =
        serde_json::from_str(template.get()).map_err(|e| PduError::BadTemplate(e.to_string()))?;
    let field = |name: &str| template.get(name).and_then(JsonValue::as_str);
    let expect = |name: &str, found: Option<&str>, wanted: &str| {
        if found == Some(wanted) {
            Ok(())
        } else {
            Err(PduError::BadTemplate(format!("{name} is {found:?}, not {wanted}")))
        }
    };
    expect("type", field("type"), "m.room.member")?;
    expect("room_id", field("room_id"), request.room_id.as_str())?;
    expect("sender", field("sender"), request.user_id.as_str())?;
    expect("state_key", field("state_key"), request.user_id.as_str())?;
    let template_content = template.get("content").and_then(JsonValue::as_object);
    expect(
        "content.membership",
        template_content.and_then(|c| c.get("membership")).and_then(JsonValue::as_str),
        request.membership,
    )?;
    let depth = template
        .get("depth")
        .and_then(JsonValue::as_u64)
        .filter(|d| (1..=MAX_DEPTH).contains(d))
        .ok_or_else(|| PduError::BadTemplate("depth is not an integer from 1 to 2^53 - 1".into()))?;
    let prev_events = event_id_list(template.get("prev_events"), "prev_events", 1, MAX_TEMPLATE_PREV_EVENTS)?;
    let auth_events = event_id_list(template.get("auth_events"), "auth_events", 0, MAX_TEMPLATE_AUTH_EVENTS)?;
    if request.membership == "join"
        && rules.authorization.restricted_join_rule
        && let Some(authoriser) = template_content.and_then(|c| c.get("join_authorised_via_users_server"))
    {
        // A restricted join names the resident user who vouches for it.
        let authoriser = authoriser
            .as_str()
            .and_then(|u| UserId::parse(u).ok())
            .ok_or_else(|| PduError::BadTemplate("join_authorised_via_users_server is not a user id".into()))?;
        if let Some(map) = content.as_object_mut() {
            map.insert("join_authorised_via_users_server".into(), JsonValue::from(authoriser.as_str()));
        }
    }
    let mut object = serde_json::Map::new();
    object.insert("room_id".into(), JsonValue::from(request.room_id.as_str()));
    object.insert("sender".into(), JsonValue::from(request.user_id.as_str()));
    object.insert("type".into(), JsonValue::from("m.room.member"));
    object.insert("state_key".into(), JsonValue::from(request.user_id.as_str()));
    object.insert("content".into(), content);
    object.insert("depth".into(), JsonValue::from(depth));
    object.insert("prev_events".into(), JsonValue::from(ids(&prev_events)));
    object.insert("auth_events".into(), JsonValue::from(ids(&auth_events)));
    object.insert("origin_server_ts".into(), JsonValue::from(u64::from(MilliSecondsSinceUnixEpoch::now().get())));
    let CanonicalJsonValue::Object(mut object) =
        CanonicalJsonValue::try_from(JsonValue::Object(object)).map_err(|e| PduError::Json(e.to_string()))?
    else {
        return Err(PduError::Json("not an object".into()));
    };
    hash_and_sign_event(origin.as_str(), key.pair(), &mut object, &rules.redaction)
        .map_err(|e| PduError::Signing(e.to_string()))?;
    let event_id = event_id_of(&object, version)?;
    Ok((event_id, object))
}

/// A template's list of event ids, with its length bounded.
fn event_id_list(value: Option<&JsonValue>, name: &str, min: usize, max: usize) -> Result<Vec<OwnedEventId>, PduError> {
    let list =
        value.and_then(JsonValue::as_array).ok_or_else(|| PduError::BadTemplate(format!("{name} is not a list")))?;
    if list.len() < min || list.len() > max {
        return Err(PduError::BadTemplate(format!("{name} has {} entries, not {min} to {max}", list.len())));
    }
    list.iter()
        .map(|id| {
            id.as_str()
                .and_then(|id| EventId::parse(id).ok())
                .ok_or_else(|| PduError::BadTemplate(format!("{name} holds something that is not an event id")))
        })
        .collect()
}

/// Our own event as another server handed it back with its signature added (an invite the
/// invitee's server co-signed, a restricted join the resident server co-signed): the event is
/// ours, field for field; only `server`'s signatures are taken from `answer`. Refused when
/// the answer is not the same event (its id differs).
pub fn add_signatures_of(
    ours: &CanonicalJsonObject,
    answer: &RawJsonValue,
    server: &ServerName,
    version: &RoomVersionId,
) -> Result<CanonicalJsonObject, PduError> {
    let answer: CanonicalJsonObject = serde_json::from_str(answer.get()).map_err(|e| PduError::Json(e.to_string()))?;
    if event_id_of(&answer, version)? != event_id_of(ours, version)? {
        return Err(PduError::Json("the answer is not the same event".into()));
    }
    let mut merged = ours.clone();
    let theirs = match answer.get("signatures") {
        Some(CanonicalJsonValue::Object(map)) => map.get(server.as_str()).cloned(),
        _ => None,
    };
    if let Some(theirs) = theirs
        && let Some(CanonicalJsonValue::Object(signatures)) = merged.get_mut("signatures")
    {
        signatures.insert(server.to_string(), theirs);
    }
    Ok(merged)
}

/// Adds this server's signature to an event another server built (an invite to one of our
/// users), leaving its hashes alone.
pub fn cosign_event(
    object: &mut CanonicalJsonObject,
    version: &RoomVersionId,
    origin: &ServerName,
    key: &SigningKey,
) -> Result<(), PduError> {
    let rules = room_version_rules(version)?;
    sign_event(origin.as_str(), key.pair(), object, &rules.redaction).map_err(|e| PduError::Signing(e.to_string()))
}

fn ids(ids: &[OwnedEventId]) -> Vec<JsonValue> {
    ids.iter().map(|id| JsonValue::from(id.as_str())).collect()
}

/// A stored PDU, parsed for authorization and state resolution.
#[derive(Debug, Clone, Deserialize)]
pub struct Pdu {
    #[serde(skip_deserializing, default = "placeholder_event_id")]
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    pub state_key: Option<String>,
    #[serde(default, deserialize_with = "event_references")]
    pub prev_events: Vec<OwnedEventId>,
    #[serde(default, deserialize_with = "event_references")]
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: UInt,
    #[serde(skip)]
    pub rejected: bool,
}

/// `prev_events` / `auth_events`: plain ids (room version 3 and later) or `[id, hashes]`
/// pairs (versions 1 and 2).
fn event_references<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<OwnedEventId>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Reference {
        Id(OwnedEventId),
        Pair(OwnedEventId, serde::de::IgnoredAny),
    }
    let references = Vec::<Reference>::deserialize(deserializer)?;
    Ok(references
        .into_iter()
        .map(|r| match r {
            Reference::Id(id) | Reference::Pair(id, _) => id,
        })
        .collect())
}

fn placeholder_event_id() -> OwnedEventId {
    // Replaced right after deserializing: the id is not part of the JSON (room v3+).
    EventId::parse("$placeholder").expect("valid placeholder")
}

impl Pdu {
    /// Parses a stored PDU; `event_id` is what it was stored under. `redacts` is kept only on
    /// an `m.room.redaction` (a message event): on any other event it is just data.
    pub fn from_json(event_id: OwnedEventId, json: &str) -> Result<Self, PduError> {
        let mut pdu: Pdu = serde_json::from_str(json).map_err(|e| PduError::Json(e.to_string()))?;
        pdu.event_id = event_id;
        if pdu.kind != TimelineEventType::RoomRedaction || pdu.state_key.is_some() {
            pdu.redacts = None;
        }
        Ok(pdu)
    }

    /// The event this one redacts under the room version's rules: only a non-state
    /// `m.room.redaction` redacts, naming its target at the top level before room version 11
    /// and in its content from version 11. Whether the redaction may take effect is the
    /// caller's question.
    pub fn redaction_target(&self, rules: &RoomVersionRules) -> Option<OwnedEventId> {
        if self.kind != TimelineEventType::RoomRedaction || self.state_key.is_some() {
            return None;
        }
        if rules.redaction.content_field_redacts {
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            serde_json::from_str::<Redacts>(self.content.get()).ok().and_then(|r| r.redacts)
        } else {
            self.redacts.clone()
        }
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawJsonValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.rejected
    }
}

#[cfg(test)]
mod tests {
    use ruma::{
        server_name,
        signatures::{Verified, verify_event},
        user_id,
    };
    use std::collections::BTreeMap;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::parse("ed25519 a_test nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap()
    }

    fn create_event(version: RoomVersionId) -> NewEvent {
        NewEvent {
            room_id: None,
            sender: user_id!("@alice:example.org").to_owned(),
            event_type: "m.room.create".into(),
            state_key: Some(String::new()),
            content: serde_json::json!({"room_version": version.as_str()}),
            redacts: None,
            prev_events: vec![],
            auth_events: vec![],
            depth: 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch(UInt::new(1_700_000_000_000).unwrap()),
        }
    }

    #[test]
    fn signed_events_verify_and_ids_are_reference_hashes() {
        for version in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            let key = key();
            let (event_id, object) =
                sign_new_event(create_event(version.clone()), &version, server_name!("example.org"), &key).unwrap();
            let rules = version.rules().unwrap();
            // Anyone holding our public key can verify the hashes and signature.
            let public =
                ruma::serde::Base64::<ruma::serde::base64::Standard, Vec<u8>>::parse(key.public_key_base64()).unwrap();
            let mut keys = BTreeMap::new();
            keys.insert(key.key_id(), ruma::serde::Base64::new(public.as_bytes().to_vec()));
            let mut servers = BTreeMap::new();
            servers.insert("example.org".to_owned(), keys);
            assert_eq!(verify_event(&servers, &object, &rules).unwrap(), Verified::All);
            assert_eq!(event_id.as_str(), format!("${}", reference_hash(&object, &rules).unwrap()));
            // Version 12 derives the room id from the create event.
            let room_id = room_id_from_create_event(&version, &event_id).unwrap();
            assert_eq!(room_id.is_some(), version == RoomVersionId::V12);
        }
    }

    #[test]
    fn tampered_content_fails_verification() {
        let version = RoomVersionId::V12;
        let key = key();
        let (_, mut object) =
            sign_new_event(create_event(version.clone()), &version, server_name!("example.org"), &key).unwrap();
        object.insert("content".into(), CanonicalJsonValue::Object(Default::default()));
        let public =
            ruma::serde::Base64::<ruma::serde::base64::Standard, Vec<u8>>::parse(key.public_key_base64()).unwrap();
        let mut keys = BTreeMap::new();
        keys.insert(key.key_id(), ruma::serde::Base64::new(public.as_bytes().to_vec()));
        let mut servers = BTreeMap::new();
        servers.insert("example.org".to_owned(), keys);
        let rules = version.rules().unwrap();
        // A create event's content survives redaction, so the signature itself breaks; for
        // other events the content hash would. Either way it is not fully verified.
        assert!(!matches!(verify_event(&servers, &object, &rules), Ok(Verified::All)));
    }

    fn template(room: &str, sender: &str, state_key: &str, membership: &str) -> Box<RawJsonValue> {
        serde_json::value::to_raw_value(&serde_json::json!({
            "room_id": room, "sender": sender, "type": "m.room.member", "state_key": state_key,
            "content": {"membership": membership, "join_authorised_via_users_server": "@res:example.org"},
            "prev_events": ["$prev"], "auth_events": ["$auth"], "depth": 7, "origin_server_ts": 1,
            "redacts": "$victim", "unsigned": {"x": 1}, "hashes": {"sha256": "x"}, "org.example": true,
        }))
        .unwrap()
    }

    #[test]
    fn membership_templates_are_checked_and_rebuilt_from_an_allow_list() {
        let room = ruma::room_id!("!room:example.org");
        let user = user_id!("@alice:here.example");
        let here = server_name!("here.example");
        let request = MembershipRequest { room_id: room, user_id: user, membership: "join" };
        let content = serde_json::json!({"membership": "join", "displayname": "Alice"});
        let version = RoomVersionId::V12;
        let (_, signed) = sign_membership_template(
            &template(room.as_str(), user.as_str(), user.as_str(), "join"),
            request,
            content.clone(),
            &version,
            here,
            &key(),
        )
        .unwrap();
        let mut keys: Vec<&str> = signed.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "auth_events",
                "content",
                "depth",
                "hashes",
                "origin_server_ts",
                "prev_events",
                "room_id",
                "sender",
                "signatures",
                "state_key",
                "type"
            ]
        );
        let CanonicalJsonValue::Object(content_out) = &signed["content"] else { panic!() };
        assert_eq!(content_out["displayname"], CanonicalJsonValue::String("Alice".into()));
        assert_eq!(
            content_out["join_authorised_via_users_server"],
            CanonicalJsonValue::String("@res:example.org".into())
        );

        let refused = |t: Box<RawJsonValue>, request: MembershipRequest<'_>, version: &RoomVersionId| {
            sign_membership_template(&t, request, content.clone(), version, here, &key()).is_err()
        };
        let bob = "@bob:here.example";
        assert!(refused(template(room.as_str(), bob, bob, "join"), request, &version), "another user");
        assert!(refused(template("!other:example.org", user.as_str(), user.as_str(), "join"), request, &version));
        assert!(refused(template(room.as_str(), user.as_str(), bob, "leave"), request, &version), "a kick");
        assert!(refused(template(room.as_str(), user.as_str(), bob, "ban"), request, &version), "a ban");
        assert!(refused(template(room.as_str(), user.as_str(), user.as_str(), "leave"), request, &version));
        let leave = MembershipRequest { membership: "leave", ..request };
        assert!(refused(template(room.as_str(), user.as_str(), user.as_str(), "join"), leave, &version));
        assert!(!refused(template(room.as_str(), user.as_str(), user.as_str(), "leave"), leave, &version));
        assert!(refused(template(room.as_str(), user.as_str(), user.as_str(), "join"), request, &RoomVersionId::V1));
        let mut deep: JsonValue =
            serde_json::from_str(template(room.as_str(), user.as_str(), user.as_str(), "join").get()).unwrap();
        deep["depth"] = serde_json::json!(1u64 << 53);
        assert!(refused(serde_json::value::to_raw_value(&deep).unwrap(), request, &version), "a depth past 2^53 - 1");
    }

    #[test]
    fn only_redactions_redact() {
        let rules = RoomVersionId::V12.rules().unwrap();
        let v10 = RoomVersionId::V10.rules().unwrap();
        let parse = |json: JsonValue| Pdu::from_json(EventId::parse("$e").unwrap(), &json.to_string()).unwrap();
        let base = |kind: &str| {
            serde_json::json!({
                "room_id": "!r:example.org", "sender": "@a:example.org", "origin_server_ts": 1, "type": kind,
                "content": {"body": "x", "redacts": "$in_content"}, "redacts": "$on_top", "prev_events": [], "auth_events": [], "depth": 1,
            })
        };
        let message = parse(base("m.room.message"));
        assert!(message.redacts.is_none() && message.redaction_target(&rules).is_none());
        let redaction = parse(base("m.room.redaction"));
        assert_eq!(redaction.redaction_target(&rules).unwrap().as_str(), "$in_content");
        assert_eq!(redaction.redaction_target(&v10).unwrap().as_str(), "$on_top");
        let mut state = base("m.room.redaction");
        state["state_key"] = serde_json::json!("");
        assert!(parse(state).redaction_target(&rules).is_none(), "a state event does not redact");
    }

    #[test]
    fn stored_events_parse_back() {
        let version = RoomVersionId::V11;
        let (event_id, object) =
            sign_new_event(create_event(version.clone()), &version, server_name!("example.org"), &key()).unwrap();
        let json = serde_json::to_string(&object).unwrap();
        let pdu = Pdu::from_json(event_id.clone(), &json).unwrap();
        assert_eq!(pdu.event_id, event_id);
        assert_eq!(pdu.kind, TimelineEventType::RoomCreate);
        assert_eq!(pdu.state_key.as_deref(), Some(""));
    }
}
