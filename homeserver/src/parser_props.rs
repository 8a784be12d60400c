//! Property tests over the homeserver's own parsers of what clients send: sync and
//! pagination tokens, filters, media ids, local alias names. Whatever arrives, they answer
//! with a value or a refusal, never a panic; what they accept holds what the callers rely on.
//! (The HTTP side, malformed bodies and paths against every endpoint, is in the conformance
//! suite's `malformed` module; the federation parsers have their own properties in
//! `federation::parser_props`.)

use std::path::Path;

use proptest::prelude::*;
use serde_json::{Map, Value as JsonValue};

use crate::{
    service::{
        media::{check_media_id, storage::MediaStorage},
        rooms::alias_on,
        streams::Positions,
        sync::event_filter_from_json,
    },
    store::EventRow,
};

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// Sync and pagination tokens: well-formed, nearly well-formed and arbitrary.
fn token() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just(String::new()),
        Just("-".to_owned()),
        Just("+1".to_owned()),
        any::<String>(),
    ];
    prop_oneof![
        (prop::sample::select(vec!["s", "s-", "", "t", "S"]), prop::collection::vec(part, 0..5))
            .prop_map(|(prefix, parts)| format!("{prefix}{}", parts.join("_"))),
        any::<String>(),
    ]
}

/// Filter keys and arbitrary ones, so generated filters often have the right names.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "room", "timeline", "state", "limit", "types", "not_types", "senders", "not_senders", "rooms",
            "not_rooms", "lazy_load_members", "include_leave", "contains_url", "event_fields", "account_data",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = JsonValue> {
    let leaf = prop_oneof![
        Just(JsonValue::Null),
        any::<bool>().prop_map(JsonValue::from),
        any::<i64>().prop_map(JsonValue::from),
        any::<u64>().prop_map(JsonValue::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(JsonValue::Number)),
        prop_oneof![Just("*".to_owned()), Just("m.room.*".to_owned()), any::<String>()].prop_map(JsonValue::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(JsonValue::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|pairs| JsonValue::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn row(event_type: String, sender: String) -> EventRow {
    EventRow {
        stream_ordering: 1,
        event_id: "$e".to_owned(),
        room_id: "!r:localhost".to_owned(),
        depth: 1,
        event_type,
        state_key: None,
        sender,
        origin_server_ts: 0,
        json: "{}".to_owned(),
        prev_state_event_id: None,
        redacted_by: None,
        txn_user: None,
        txn_device: None,
        txn_id: None,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tokens_parse_or_are_refused(text in token()) {
        if let Some(p) = Positions::parse(&text) {
            prop_assert!(p.stream >= 0 && p.to_device >= 0 && p.to_device <= p.stream);
        }
        let _ = Positions::parse_pagination(&text);
    }

    #[test]
    fn sync_tokens_round_trip(
        (stream, to_device) in (0..i64::MAX).prop_flat_map(|s| (Just(s), 0..=s)),
        typing in any::<u64>(),
    ) {
        let p = Positions { stream, typing, to_device };
        prop_assert_eq!(Positions::parse(&p.to_string()), Some(p));
    }

    #[test]
    fn pagination_tokens_round_trip(stream in (i64::MIN + 1)..i64::MAX) {
        let parsed = Positions::parse_pagination(&Positions::at(stream).to_string());
        prop_assert_eq!(parsed.map(|p| p.stream), Some(stream));
    }

    #[test]
    fn filters_parse_whatever_they_hold(
        value in json_value(),
        timeline in json_value(),
        event_type in any::<String>(),
        sender in any::<String>(),
    ) {
        for filter in [value.clone(), serde_json::json!({"room": {"timeline": timeline, "state": value}})] {
            let parsed = event_filter_from_json(&filter);
            // The limit is always one the server can honour.
            prop_assert!((1..=100).contains(&parsed.limit));
            let _ = parsed.allows_event(&row(event_type.clone(), sender.clone()));
            let _ = parsed.allows_room(&event_type);
        }
    }

    #[test]
    fn accepted_media_ids_stay_inside_the_media_store(id in prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_./-]{0,300}",
        Just("..".to_owned()),
        Just("../x".to_owned()),
    ]) {
        if check_media_id(&id).is_ok() {
            let storage = MediaStorage::new(Path::new("/media").to_owned());
            let path = storage.partial_path(&id);
            prop_assert_eq!(path.parent(), Some(Path::new("/media/uploads")));
            prop_assert_eq!(path.file_name().and_then(|n| n.to_str()), Some(id.as_str()));
        }
    }

    #[test]
    fn local_aliases_stay_local(name in prop_oneof![any::<String>(), "[a-z:#@ ]{0,20}"]) {
        let server = ruma::ServerName::parse("example.org").unwrap();
        if let Ok(alias) = alias_on(&name, &server) {
            prop_assert_eq!(alias.server_name(), server);
            prop_assert_eq!(alias.alias(), name.as_str());
        }
    }
}
