//! Redactions that must not happen: only an `m.room.redaction` redacts, and only when its
//! sender may redact the event (their own, the `redact` power level, or, for one received
//! from another server, an event of a user of that same server). Both from local clients and
//! from a hostile server; the allowed cases still work.

use conformance::{
    Backend, Server, ServerOptions, User, backend_tests, enc,
    hostile::{Draft, HostileServer},
};
use serde_json::{Value, json};

async fn event(server: &Server, user: &User, room_id: &str, event_id: &str) -> Value {
    let resp = server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id), enc(event_id)), Some(&user.access_token))
        .await;
    resp.assert_ok().clone()
}

#[track_caller]
fn assert_intact(event: &Value, body: &str) {
    assert_eq!(event["content"]["body"], body, "the event was redacted: {event}");
    assert!(event["unsigned"].get("redacted_because").is_none(), "{event}");
}

#[track_caller]
fn assert_redacted(event: &Value) {
    assert!(event["content"].as_object().is_some_and(|c| c.is_empty()), "the event is not redacted: {event}");
    assert!(event["unsigned"]["redacted_because"].is_object(), "{event}");
}

async fn send(
    server: &Server,
    user: &User,
    room_id: &str,
    kind: &str,
    txn: &str,
    content: Value,
) -> conformance::Response {
    server
        .put(&format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(room_id)), Some(&user.access_token), content)
        .await
}

async fn redact(server: &Server, user: &User, room_id: &str, event_id: &str, txn: &str) -> conformance::Response {
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/redact/{}/{txn}", enc(room_id), enc(event_id)),
            Some(&user.access_token),
            json!({"reason": "test"}),
        )
        .await
}

async fn search_hits(server: &Server, user: &User, term: &str) -> usize {
    let resp = server
        .post(
            "/_matrix/client/v3/search",
            Some(&user.access_token),
            json!({"search_categories": {"room_events": {"search_term": term}}}),
        )
        .await;
    resp.assert_ok()["search_categories"]["room_events"]["results"].as_array().map_or(0, Vec::len)
}

/// The reproduction: a plain member's message carrying `redacts` redacts nothing, for
/// anybody; a plain member's redaction of someone else's event is refused.
async fn a_plain_members_redacts_field_redacts_nothing(backend: Backend) {
    let a = Server::start(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = a.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    a.join(&bob, &room_id).await.assert_ok();
    let victim =
        a.send_text(&alice, &room_id, "victim words").await.assert_ok()["event_id"].as_str().unwrap().to_owned();

    let sent =
        send(&a, &bob, &room_id, "m.room.message", "t1", json!({"msgtype": "m.text", "body": "x", "redacts": victim}))
            .await;
    sent.assert_ok();
    for viewer in [&alice, &bob] {
        assert_intact(&event(&a, viewer, &room_id, &victim).await, "victim words");
    }
    let body = a.sync(&alice, None, 0, Some(json!({"room": {"timeline": {"limit": 50}}}))).await;
    let timeline = body["rooms"]["join"][&room_id]["timeline"]["events"].as_array().unwrap();
    let seen = timeline.iter().find(|e| e["event_id"] == victim.as_str()).expect("the victim in the timeline");
    assert_intact(seen, "victim words");
    assert_eq!(search_hits(&a, &alice, "victim").await, 1, "the victim is still searchable");

    // A plain member's /redact of someone else's event is refused, and changes nothing.
    redact(&a, &bob, &room_id, &victim, "r1").await.assert_error(403, "M_FORBIDDEN");
    assert_intact(&event(&a, &alice, &room_id, &victim).await, "victim words");

    // The allowed cases: one's own event; anyone's with the redact power level.
    let own = a.send_text(&bob, &room_id, "bob's own").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    redact(&a, &bob, &room_id, &own, "r2").await.assert_ok();
    assert_redacted(&event(&a, &alice, &room_id, &own).await);
    let other = a.send_text(&bob, &room_id, "bob's other").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    redact(&a, &alice, &room_id, &other, "r3").await.assert_ok();
    assert_redacted(&event(&a, &bob, &room_id, &other).await);
    assert_eq!(search_hits(&a, &alice, "other").await, 0, "a redacted event is not searchable");
}

/// Redactions received from a hostile server: of another server's user's event (not applied),
/// `redacts` on events of other types (nothing), of its own users' events (applied).
async fn received_redactions_apply_only_when_allowed(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let h = HostileServer::start().await;
    let (mallory, mallory2) = (h.user("mallory"), h.user("mallory2"));
    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    h.join(&a, &room_id, "mallory2").await.expect("mallory2 joins");
    let victim =
        a.send_text(&alice, &room_id, "victim words").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    h.wait_for_pdu("alice's message", |p| p["content"]["body"] == "victim words").await;

    // A plain member of another server redacting alice's message: not applied.
    let (_, redaction) =
        h.build(&room_id, Draft::new(&mallory, "m.room.redaction", json!({"redacts": victim, "reason": "mine now"})));
    let _ = h.send_pdu(&a, &redaction).await;
    assert_intact(&event(&a, &alice, &room_id, &victim).await, "victim words");
    // `redacts` on a message, in the content or on top: nothing.
    let (_, message) = h.build(
        &room_id,
        Draft::new(&mallory, "m.room.message", json!({"msgtype": "m.text", "body": "x", "redacts": victim}))
            .top_level("redacts", json!(victim)),
    );
    h.send_pdu(&a, &message).await.expect("a message is taken");
    assert_intact(&event(&a, &alice, &room_id, &victim).await, "victim words");
    assert_eq!(search_hits(&a, &alice, "victim").await, 1, "the victim is still searchable");

    // Allowed: a user's own event; another user of the same server (the spec leaves that to
    // the server); alice, with the power level, redacting mallory's.
    let (own, pdu) = h.build(&room_id, Draft::message(&mallory, "mallory's own"));
    h.send_pdu(&a, &pdu).await.expect("taken");
    let (_, pdu) = h.build(&room_id, Draft::new(&mallory, "m.room.redaction", json!({"redacts": own})));
    h.send_pdu(&a, &pdu).await.expect("taken");
    assert_redacted(&event(&a, &alice, &room_id, &own).await);
    let (same_server, pdu) = h.build(&room_id, Draft::message(&mallory2, "mallory2's"));
    h.send_pdu(&a, &pdu).await.expect("taken");
    let (_, pdu) = h.build(&room_id, Draft::new(&mallory, "m.room.redaction", json!({"redacts": same_server})));
    h.send_pdu(&a, &pdu).await.expect("taken");
    assert_redacted(&event(&a, &alice, &room_id, &same_server).await);
    let (theirs, pdu) = h.build(&room_id, Draft::message(&mallory, "moderated"));
    h.send_pdu(&a, &pdu).await.expect("taken");
    redact(&a, &alice, &room_id, &theirs, "r1").await.assert_ok();
    assert_redacted(&event(&a, &alice, &room_id, &theirs).await);
    h.wait_for_pdu("alice's redaction", |p| {
        p["type"] == "m.room.redaction" && p["content"]["redacts"] == theirs.as_str()
    })
    .await;
}

/// A received redaction that arrives before the event it redacts (on a branch of its own) is
/// kept aside; when the event arrives, the redaction takes effect if its sender may make it
/// (the same user) and stays without effect, unseen, if not (another server's user's event).
async fn a_redaction_arriving_before_its_target_applies_when_allowed(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let h = HostileServer::start().await;
    let h2 = HostileServer::start_named("127.0.0.1").await;
    let mallory = h.user("mallory");
    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    h2.join(&a, &room_id, "eve").await.expect("eve joins");
    let heads = h.room(&room_id).extremities.clone();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();

    // Mallory's own message and its redaction, both on the same prev events: the redaction
    // is sent first.
    let (target, target_pdu) = h.build(&room_id, Draft::message(&mallory, "said then unsaid").prev_events(&heads));
    let (redaction, redaction_pdu) =
        h.build(&room_id, Draft::new(&mallory, "m.room.redaction", json!({"redacts": target})).prev_events(&heads));
    let _ = h.send_pdu(&a, &redaction_pdu).await;
    h.send_pdu(&a, &target_pdu).await.expect("the target is taken");
    assert_redacted(&event(&a, &alice, &room_id, &target).await);
    let shown = event(&a, &alice, &room_id, &redaction).await;
    assert_eq!(shown["content"]["redacts"], target.as_str(), "the redaction is on the timeline: {shown}");

    // Mallory redacting Eve's message (another server's user) before it arrives: never
    // applied, never shown.
    let (eves, eves_pdu) = h2.build(&room_id, Draft::message(&h2.user("eve"), "eve's words"));
    let (refused, refused_pdu) =
        h.build(&room_id, Draft::new(&mallory, "m.room.redaction", json!({"redacts": eves})).prev_events(&heads));
    let _ = h.send_pdu(&a, &refused_pdu).await;
    h2.send_pdu(&a, &eves_pdu).await.expect("eve's message is taken");
    assert_intact(&event(&a, &alice, &room_id, &eves).await, "eve's words");
    let resp = a
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&refused)), Some(&alice.access_token))
        .await;
    assert_eq!(resp.status, 404, "the refused redaction is not shown: {}", resp.body);
}

backend_tests!(
    a_plain_members_redacts_field_redacts_nothing,
    received_redactions_apply_only_when_allowed,
    a_redaction_arriving_before_its_target_applies_when_allowed
);
