//! Property tests over the parsers of what other servers send: PDUs and canonical JSON,
//! event ids and signatures of received events, key documents, the X-Matrix header,
//! `.well-known` answers and identifiers. Whatever arrives, they return an error or a
//! value, never panic; what they accept holds what the callers rely on.

use proptest::prelude::*;
use ruma::{
    CanonicalJsonValue, EventId, OwnedServerName, RoomAliasId, RoomId, RoomVersionId, ServerName, UserId, serde::Raw,
    signatures::PublicKeyMap,
};
use serde_json::{Map, Value as JsonValue, json};

use crate::{
    SigningKey,
    discovery::parse_well_known,
    keys::verify_key_document,
    pdu::{Pdu, event_id_of, room_id_from_create_event, signing_keys_needed, verify_received},
    xmatrix::{parse_header, verify_request},
};

/// Few enough cases that the suite stays fast, enough to find what a fuzzer finds first.
fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// Keys of PDUs and the objects in them, mixed with arbitrary ones, so generated objects
/// often have the right names with the wrong values.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "type", "sender", "room_id", "content", "state_key", "prev_events", "auth_events", "depth",
            "origin_server_ts", "redacts", "hashes", "signatures", "sha256", "unsigned", "event_id", "membership",
            "server_name", "verify_keys", "old_verify_keys", "valid_until_ts", "key", "expired_ts", "m.server",
            "ed25519:a", "room_version", "creator", "additional_creators",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// Strings that look like what goes in those fields, and arbitrary ones.
fn string_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "@alice:example.org",
            "!room:example.org",
            "$event",
            "$aGVsbG8",
            "m.room.member",
            "m.room.create",
            "m.room.redaction",
            "join",
            "example.org",
            "example.org:8448",
            "[::1]:80",
            "",
            "ed25519:a",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = JsonValue> {
    let leaf = prop_oneof![
        Just(JsonValue::Null),
        any::<bool>().prop_map(JsonValue::from),
        any::<i64>().prop_map(JsonValue::from),
        any::<u64>().prop_map(JsonValue::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(JsonValue::Number)),
        string_value().prop_map(JsonValue::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(JsonValue::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|pairs| JsonValue::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A PDU-shaped object: every usual field, each either plausible or arbitrary.
fn pdu_like() -> impl Strategy<Value = JsonValue> {
    (
        prop::option::of(json_value()),
        prop::option::of(string_value()),
        prop::option::of(string_value()),
        json_value(),
        prop::option::of(string_value()),
        prop::option::of(prop_oneof![Just(json!(["$a", "$b"])), json_value()]),
        prop::option::of(prop_oneof![any::<u64>().prop_map(JsonValue::from), json_value()]),
        prop::option::of(json_value()),
    )
        .prop_map(|(kind, sender, room_id, content, state_key, events, depth, extra)| {
            let mut object = Map::new();
            object.insert("type".into(), kind.unwrap_or_else(|| json!("m.room.message")));
            if let Some(sender) = sender {
                object.insert("sender".into(), sender.into());
            }
            if let Some(room_id) = room_id {
                object.insert("room_id".into(), room_id.into());
            }
            object.insert("content".into(), content);
            if let Some(state_key) = state_key {
                object.insert("state_key".into(), state_key.into());
            }
            if let Some(events) = events {
                object.insert("prev_events".into(), events.clone());
                object.insert("auth_events".into(), events);
            }
            if let Some(depth) = depth {
                object.insert("depth".into(), depth);
            }
            object.insert("origin_server_ts".into(), json!(1));
            if let Some(extra) = extra {
                object.insert("signatures".into(), extra.clone());
                object.insert("hashes".into(), extra);
            }
            JsonValue::Object(object)
        })
}

fn versions() -> [RoomVersionId; 5] {
    [RoomVersionId::V1, RoomVersionId::V3, RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stored_pdus_parse_or_fail(text in any::<String>(), value in pdu_like()) {
        let id = EventId::parse("$id").unwrap();
        let _ = Pdu::from_json(id.clone(), &text);
        if let Ok(pdu) = Pdu::from_json(id.clone(), &value.to_string()) {
            prop_assert_eq!(pdu.event_id, id);
        }
    }

    #[test]
    fn received_events_get_an_id_or_an_error(value in pdu_like()) {
        let Ok(CanonicalJsonValue::Object(object)) = CanonicalJsonValue::try_from(value) else {
            return Ok(());
        };
        for version in versions() {
            if let Ok(id) = event_id_of(&object, &version) {
                prop_assert!(id.as_str().starts_with('$'));
            }
            let _ = signing_keys_needed(&object, &version);
            // No keys: nothing verifies, and nothing panics on the way.
            prop_assert!(verify_received(object.clone(), &version, &PublicKeyMap::new()).is_err());
        }
    }

    #[test]
    fn any_json_is_canonical_or_refused(value in json_value()) {
        if let Ok(canonical) = CanonicalJsonValue::try_from(value.clone()) {
            // Canonical JSON is JSON: it reads back as the same value.
            let text = canonical.to_string();
            prop_assert_eq!(serde_json::from_str::<JsonValue>(&text).unwrap(), value);
        }
    }

    #[test]
    fn room_ids_from_any_event_id(text in any::<String>()) {
        if let Ok(id) = EventId::parse(&text) {
            for version in versions() {
                let _ = room_id_from_create_event(&version, &id);
            }
        }
    }

    #[test]
    fn key_documents_verify_or_are_refused(value in json_value(), server in string_value()) {
        let Ok(server) = ServerName::parse(&server) else { return Ok(()) };
        let raw: Raw<ruma::api::federation::discovery::ServerSigningKeys> =
            Raw::from_json(serde_json::value::to_raw_value(&value).unwrap());
        // Unsigned junk never verifies.
        prop_assert!(verify_key_document(&server, &raw).is_err());
    }

    #[test]
    fn well_known_answers_give_a_server_name_or_nothing(
        body in prop::collection::vec(any::<u8>(), 0..256),
        server in string_value(),
    ) {
        let _ = parse_well_known(&body);
        let answer = json!({"m.server": server}).to_string();
        if let Some(name) = parse_well_known(answer.as_bytes()) {
            prop_assert_eq!(name.as_str(), server.as_str());
        }
    }

    #[test]
    fn x_matrix_headers_parse_or_fail(
        origin in string_value(),
        destination in string_value(),
        key_id in string_value(),
        sig in string_value(),
        noise in any::<String>(),
        raw in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let candidates = [
            format!("X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{key_id}\",sig=\"{sig}\""),
            format!("X-Matrix origin={origin},key={key_id},sig={sig}{noise}"),
            format!("X-Matrix {noise}"),
            noise.clone(),
        ];
        let mut values: Vec<http::HeaderValue> =
            candidates.iter().filter_map(|c| http::HeaderValue::from_str(c).ok()).collect();
        values.extend(http::HeaderValue::from_bytes(&raw).ok());
        let this_server = ServerName::parse("b.example").unwrap();
        let key = SigningKey::parse("ed25519 a_test nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap();
        for value in values {
            let mut request = http::Request::builder()
                .method("PUT")
                .uri("https://b.example/_matrix/federation/v1/send/1")
                .body(noise.as_bytes().to_vec())
                .unwrap();
            request.headers_mut().insert(http::header::AUTHORIZATION, value);
            if let Ok(header) = parse_header(request.headers()) {
                // A header nobody signed never verifies, whatever it claims.
                prop_assert!(verify_request(&header, &request, &this_server, &key.public_key_base64()).is_err());
                prop_assert!(verify_request(&header, &request, &this_server, &sig).is_err());
            }
        }
    }

    #[test]
    fn identifiers_parse_to_themselves_or_fail(text in string_value(), server in string_value()) {
        for candidate in [text.clone(), format!("@{text}:{server}"), format!("!{text}:{server}"), format!("#{text}:{server}")] {
            if let Ok(user) = UserId::parse(&candidate) {
                prop_assert_eq!(user.as_str(), candidate.as_str());
                prop_assert!(candidate.ends_with(user.server_name().as_str()));
            }
            if let Ok(room) = RoomId::parse(&candidate) {
                prop_assert_eq!(room.as_str(), candidate.as_str());
            }
            if let Ok(alias) = RoomAliasId::parse(&candidate) {
                prop_assert_eq!(alias.as_str(), candidate.as_str());
                prop_assert!(candidate.ends_with(alias.server_name().as_str()));
            }
            if let Ok(id) = EventId::parse(&candidate) {
                prop_assert_eq!(id.as_str(), candidate.as_str());
            }
        }
        if let Ok(name) = ServerName::parse(&server) {
            let owned: OwnedServerName = name.to_owned();
            prop_assert_eq!(owned.as_str(), server.as_str());
            // Whatever port it names is a valid port.
            let _ = owned.port();
        }
    }

    #[test]
    fn signing_key_files_parse_or_fail(text in any::<String>(), seed in string_value()) {
        let _ = SigningKey::parse(&text);
        let _ = SigningKey::parse(&format!("ed25519 a_1 {seed}"));
    }
}
