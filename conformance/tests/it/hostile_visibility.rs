//! What another server may read of a room (`/event`, `/backfill`, `/get_missing_events`,
//! `/state`, `/state_ids`, `/event_auth`): the spec's history visibility rules per event, for
//! the users of the asking server. An event it may not see is refused (`/event`, and the state
//! and auth chain at it) or served pruned (`/backfill`, `/get_missing_events`); redacted events
//! are served pruned; soft-failed events are not served.

use conformance::{
    Backend, Server, User, backend_tests, enc,
    federated::federating,
    hostile::{Draft, HostileServer},
};
use reqwest::Method;
use ruma::RoomVersionId;
use serde_json::{Value, json};

async fn room_with_visibility(server: &Server, user: &User, visibility: &str) -> String {
    server
        .create_room(
            user,
            json!({
                "preset": "public_chat",
                "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": visibility}}],
            }),
        )
        .await
}

async fn set_visibility(server: &Server, user: &User, room_id: &str, visibility: &str) {
    server
        .put_state(user, room_id, "m.room.history_visibility", "", json!({"history_visibility": visibility}))
        .await
        .assert_ok();
}

/// `/event` as the hostile server: the status and the event (or the error).
async fn fed_event(h: &HostileServer, server: &Server, event_id: &str) -> (u16, Value) {
    let (status, body) = h.get(server, &format!("/_matrix/federation/v1/event/{}", enc(event_id))).await;
    if status == 200 { (status, body["pdus"][0].clone()) } else { (status, body) }
}

#[track_caller]
fn assert_refused((status, body): &(u16, Value), what: &str) {
    assert!(*status == 403 || *status == 404, "{what}: answered {status}: {body}");
    assert!(body["errcode"].is_string(), "{what}: not a Matrix error: {body}");
}

#[track_caller]
fn assert_full(event: &Value, body: &str) {
    assert_eq!(event["content"]["body"], body, "expected the whole event: {event}");
}

#[track_caller]
fn assert_pruned(event: &Value) {
    assert!(event["content"].get("body").is_none(), "expected the event pruned: {event}");
    assert!(event["signatures"].is_object(), "still a signed PDU: {event}");
}

/// `/backfill` from `from` as the hostile server: event id -> PDU.
async fn backfill(h: &HostileServer, server: &Server, room_id: &str, from: &str) -> (u16, Vec<Value>) {
    let (status, body) =
        h.get(server, &format!("/_matrix/federation/v1/backfill/{}?v={}&limit=50", enc(room_id), enc(from))).await;
    (status, body["pdus"].as_array().cloned().unwrap_or_default())
}

async fn missing_events(h: &HostileServer, server: &Server, room_id: &str, latest: &str) -> (u16, Vec<Value>) {
    let (status, body) = h
        .request(
            server,
            Method::POST,
            &format!("/_matrix/federation/v1/get_missing_events/{}", enc(room_id)),
            Some(json!({"earliest_events": [], "latest_events": [latest], "limit": 50, "min_depth": 0})),
        )
        .await;
    (status, body["events"].as_array().cloned().unwrap_or_default())
}

fn find<'a>(events: &'a [Value], body: &str) -> &'a Value {
    events.iter().find(|e| e["content"]["body"] == body).unwrap_or_else(|| panic!("{body} is not among {events:?}"))
}

/// The PDU of `id` among `events` (by its id, which survives pruning; rooms here are of
/// version 12, the default).
fn by_id<'a>(events: &'a [Value], id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| conformance::hostile::event_id(e, &RoomVersionId::V12) == id)
        .unwrap_or_else(|| panic!("{id} is not among {events:?}"))
}

async fn reads_at(h: &HostileServer, server: &Server, room_id: &str, event_id: &str) -> Vec<(&'static str, u16)> {
    let room = enc(room_id);
    let id = enc(event_id);
    let mut out = Vec::new();
    for (what, path) in [
        ("state_ids", format!("/_matrix/federation/v1/state_ids/{room}?event_id={id}")),
        ("state", format!("/_matrix/federation/v1/state/{room}?event_id={id}")),
        ("event_auth", format!("/_matrix/federation/v1/event_auth/{room}/{id}")),
    ] {
        out.push((what, h.get(server, &path).await.0));
    }
    out
}

/// A server whose users never were in the room reads nothing of it; under `world_readable`
/// it reads everything.
async fn a_server_never_in_the_room(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let shared = room_with_visibility(&a, &alice, "shared").await;
    let secret = a.say(&alice, &shared, "secret").await;
    let later = a.say(&alice, &shared, "later").await;
    assert_refused(&fed_event(&h, &a, &secret).await, "/event");
    let (status, pdus) = backfill(&h, &a, &shared, &later).await;
    assert!(status == 403 && pdus.is_empty(), "/backfill answered {status}: {pdus:?}");
    let (status, events) = missing_events(&h, &a, &shared, &later).await;
    assert!(status == 403 && events.is_empty(), "/get_missing_events answered {status}: {events:?}");
    for (what, status) in reads_at(&h, &a, &shared, &secret).await {
        assert_eq!(status, 403, "{what}");
    }

    let open = room_with_visibility(&a, &alice, "world_readable").await;
    let public = a.say(&alice, &open, "for everyone").await;
    let (status, event) = fed_event(&h, &a, &public).await;
    assert_eq!(status, 200, "{event}");
    assert_full(&event, "for everyone");
    let (status, pdus) = backfill(&h, &a, &open, &public).await;
    assert_eq!(status, 200);
    assert_full(find(&pdus, "for everyone"), "for everyone");
    for (what, status) in reads_at(&h, &a, &open, &public).await {
        assert_eq!(status, 200, "{what}");
    }
}

/// `shared`: a server whose user joined sees the history from before the join and until the
/// user left, not after; events redacted here are served pruned.
async fn a_server_whose_user_left(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    let room_id = room_with_visibility(&a, &alice, "shared").await;
    let before = a.say(&alice, &room_id, "before the join").await;
    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    let during = a.say(&alice, &room_id, "while mallory is here").await;
    let redacted = a.say(&alice, &room_id, "said and taken back").await;
    a.put(
        &format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room_id), enc(&redacted)),
        Some(&alice.access_token),
        json!({}),
    )
    .await
    .assert_ok();
    h.wait_for_pdu("the redaction", |p| p["type"] == "m.room.redaction").await;
    let (_, leave) = h.build(&room_id, Draft::member(&mallory, &mallory, "leave"));
    h.send_pdu(&a, &leave).await.expect("the leave is taken");
    let after = a.say(&alice, &room_id, "after mallory left").await;
    let newest = a.say(&alice, &room_id, "newest").await;

    let (status, event) = fed_event(&h, &a, &before).await;
    assert_eq!(status, 200, "{event}");
    assert_full(&event, "before the join");
    let (status, event) = fed_event(&h, &a, &during).await;
    assert_eq!(status, 200, "{event}");
    assert_full(&event, "while mallory is here");
    let (status, event) = fed_event(&h, &a, &redacted).await;
    assert_eq!(status, 200, "{event}");
    assert_pruned(&event);
    assert_refused(&fed_event(&h, &a, &after).await, "/event after the leave");

    let (status, pdus) = backfill(&h, &a, &room_id, &newest).await;
    assert_eq!(status, 200);
    assert_pruned(by_id(&pdus, &after));
    assert_pruned(by_id(&pdus, &newest));
    assert_pruned(by_id(&pdus, &redacted));
    assert_full(by_id(&pdus, &during), "while mallory is here");
    assert_full(by_id(&pdus, &before), "before the join");
    let (status, events) = missing_events(&h, &a, &room_id, &newest).await;
    assert_eq!(status, 200);
    assert_pruned(by_id(&events, &after));

    for (what, status) in reads_at(&h, &a, &room_id, &after).await {
        assert_eq!(status, 403, "{what} at an event after the leave");
    }
    for (what, status) in reads_at(&h, &a, &room_id, &during).await {
        assert_eq!(status, 200, "{what} at an event while joined");
    }
}

/// `invited`: a server whose user is invited sees from the invite on; `joined`: only from the
/// join on; under `shared` an invite alone shows nothing either.
async fn invited_and_joined_visibility(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    let room_id = room_with_visibility(&a, &alice, "invited").await;
    let m0 = a.say(&alice, &room_id, "before the invite").await;
    a.membership(&alice, &room_id, "invite", Some(&mallory)).await.assert_ok();
    let m1 = a.say(&alice, &room_id, "after the invite").await;
    assert_refused(&fed_event(&h, &a, &m0).await, "/event before the invite");
    let (status, event) = fed_event(&h, &a, &m1).await;
    assert_eq!(status, 200, "{event}");
    assert_full(&event, "after the invite");
    let (status, pdus) = backfill(&h, &a, &room_id, &m1).await;
    assert_eq!(status, 200);
    assert_pruned(by_id(&pdus, &m0));
    assert_full(by_id(&pdus, &m1), "after the invite");

    set_visibility(&a, &alice, &room_id, "joined").await;
    let m2 = a.say(&alice, &room_id, "joined only").await;
    assert_refused(&fed_event(&h, &a, &m2).await, "/event under joined while invited");
    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    let m3 = a.say(&alice, &room_id, "after the join").await;
    let (status, event) = fed_event(&h, &a, &m3).await;
    assert_eq!(status, 200, "{event}");
    assert_full(&event, "after the join");
    assert_refused(&fed_event(&h, &a, &m2).await, "/event under joined from before the join");

    // `shared` with a user only invited: nothing.
    let h2 = HostileServer::start().await;
    let shared = room_with_visibility(&a, &alice, "shared").await;
    a.membership(&alice, &shared, "invite", Some(&h2.user("eve"))).await.assert_ok();
    let s1 = a.say(&alice, &shared, "shared after the invite").await;
    assert_refused(&fed_event(&h2, &a, &s1).await, "/event under shared while only invited");
}

/// An event the current state does not allow (soft-failed) is never served as accepted.
async fn soft_failed_events_are_not_served(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    let room_id = room_with_visibility(&a, &alice, "shared").await;
    let join = h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    let view = h.room(&room_id);
    let power_levels = view.state_id("m.room.power_levels", "").unwrap();
    a.membership(&alice, &room_id, "kick", Some(&mallory)).await.assert_ok();
    // Mallory speaks as if the kick had not happened: allowed by its own auth events.
    let (late, pdu) = h.build(
        &room_id,
        Draft::message(&mallory, "after the kick").prev_events(&[&join]).auth_events(&[&power_levels, &join]),
    );
    h.send_pdu(&a, &pdu).await.expect("taken (soft-failed)");
    assert_refused(&fed_event(&h, &a, &late).await, "/event of a soft-failed event");
    let resp = a
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&late)), Some(&alice.access_token))
        .await;
    assert_eq!(resp.status, 404, "not on the timeline: {}", resp.body);
    let (status, _) = h.get(&a, &format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room_id), enc(&late))).await;
    assert!(status == 403 || status == 404, "/event_auth of a soft-failed event: {status}");
}

backend_tests!(
    a_server_never_in_the_room,
    a_server_whose_user_left,
    invited_and_joined_visibility,
    soft_failed_events_are_not_served
);
