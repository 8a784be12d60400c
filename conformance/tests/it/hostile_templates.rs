//! Membership templates from a hostile server (make_join / make_leave answers): we sign only
//! the membership our user asked for, in the room asked for, in a room version we can serve,
//! built from an allow-list of fields. Anything else is refused with nothing signed, sent
//! or stored.

use conformance::{
    Backend, Server, User, backend_tests, enc,
    federated::federating,
    hostile::{Draft, Endpoint, HostileServer, Reply},
};
use ruma::RoomVersionId;
use serde_json::{Value, json};

/// A client request whose answer may be a 502 (the remote server misbehaved), which the
/// plain helpers treat as a server failure.
async fn raw_post(server: &Server, user: &User, path: &str) -> (u16, Value) {
    let resp =
        server.http.post(server.url(path)).bearer_auth(&user.access_token).json(&json!({})).send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn join_through(server: &Server, user: &User, room_id: &str, via: &str) -> (u16, Value) {
    raw_post(server, user, &format!("/_matrix/client/v3/join/{}?via={}", enc(room_id), enc(via))).await
}

async fn joined_rooms(server: &Server, user: &User) -> Vec<String> {
    let resp = server.get("/_matrix/client/v3/joined_rooms", Some(&user.access_token)).await;
    resp.assert_ok()["joined_rooms"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect()
}

/// A join template as the resident server would hand it out, for `user` in `room_id`.
fn template(room: &conformance::hostile::RoomView, sender: &str, state_key: &str, membership: &str) -> Value {
    let auth: Vec<String> =
        ["m.room.power_levels", "m.room.join_rules"].iter().filter_map(|kind| room.state_id(kind, "")).collect();
    json!({
        "room_id": room.room_id,
        "sender": sender,
        "type": "m.room.member",
        "state_key": state_key,
        "content": {"membership": membership},
        "prev_events": room.extremities,
        "auth_events": auth,
        "depth": room.depth + 1,
        "origin_server_ts": 1,
    })
}

/// Refused joins: nothing reaches the hostile server's send_join and our user is in no room.
async fn crafted_join_templates_are_refused(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = a.register("bob", "password-bob-1").await;
    let h = HostileServer::start().await;
    let room_id = h.create_room(&RoomVersionId::V12, "mallory");
    let other_room = h.create_room(&RoomVersionId::V12, "mallory");
    let view = h.room(&room_id);
    let other_view = h.room(&other_room);

    let cases: Vec<(&str, Value, &str)> = vec![
        ("a join of another local user", template(&view, &bob.user_id, &bob.user_id, "join"), "12"),
        ("a join in another room", template(&other_view, &alice.user_id, &alice.user_id, "join"), "12"),
        ("a kick of another local user", template(&view, &alice.user_id, &bob.user_id, "leave"), "12"),
        ("a ban of another local user", template(&view, &alice.user_id, &bob.user_id, "ban"), "12"),
        ("a leave instead of a join", template(&view, &alice.user_id, &alice.user_id, "leave"), "12"),
        (
            "a message instead of a membership",
            {
                let mut t = template(&view, &alice.user_id, &alice.user_id, "join");
                t["type"] = json!("m.room.message");
                t
            },
            "12",
        ),
        ("an unknown room version", template(&view, &alice.user_id, &alice.user_id, "join"), "org.example.hostile"),
        ("a room version we cannot sign", template(&view, &alice.user_id, &alice.user_id, "join"), "1"),
    ];
    for (what, event, version) in cases {
        let answer = json!({"room_version": version, "event": event});
        h.on(Endpoint::MakeJoin, move |_| Reply::ok(answer.clone()));
        let (status, body) = join_through(&a, &alice, &room_id, &h.name).await;
        assert!((400..=502).contains(&status) && status != 500, "{what}: the join answered {status}: {body}");
        assert!(body["errcode"].is_string(), "{what}: a Matrix error: {body}");
        assert!(h.requests(Endpoint::SendJoin).is_empty(), "{what}: something was signed and sent");
        assert!(joined_rooms(&a, &alice).await.is_empty(), "{what}: alice is in a room");
        assert!(joined_rooms(&a, &bob).await.is_empty(), "{what}: bob is in a room");
        for room in [&room_id, &other_room] {
            let state =
                a.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room)), Some(&alice.access_token)).await;
            assert!(state.status == 403 || state.status == 404, "{what}: the room was stored: {}", state.body);
        }
    }

    // Unknown top-level keys are not copied into what we sign, and the honest template of
    // the same room still works.
    let mut honest = template(&view, &alice.user_id, &alice.user_id, "join");
    honest["redacts"] = json!("$victim");
    honest["hashes"] = json!({"sha256": "forged"});
    honest["unsigned"] = json!({"age": 1});
    honest["org.example.extra"] = json!("kept?");
    let answer = json!({"room_version": "12", "event": honest});
    h.on(Endpoint::MakeJoin, move |_| Reply::ok(answer.clone()));
    let (status, body) = join_through(&a, &alice, &room_id, &h.name).await;
    assert_eq!(status, 200, "the honest join: {body}");
    let sent = h.requests(Endpoint::SendJoin);
    assert_eq!(sent.len(), 1);
    let join = &sent[0].body;
    for key in ["redacts", "org.example.extra", "unsigned"] {
        assert!(join.get(key).is_none(), "{key} was copied from the template: {join}");
    }
    assert_eq!(join["sender"], alice.user_id.as_str());
    assert_eq!(join["state_key"], alice.user_id.as_str());
    assert_eq!(join["content"]["membership"], "join");
    assert_eq!(joined_rooms(&a, &alice).await, vec![room_id.clone()]);
}

/// Rejecting an invite goes through the inviting server's make_leave: a template that is not
/// our user's own leave in that room is refused, nothing sent, the invite kept.
async fn crafted_leave_templates_are_refused(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = a.register("bob", "password-bob-1").await;
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    let room_id = h.create_room(&RoomVersionId::V12, "mallory");
    let (status, body) = h.invite(&a, &room_id, &mallory, &alice.user_id).await;
    assert_eq!(status, 200, "{body}");
    let invited = |body: &Value| body["rooms"]["invite"].get(&room_id).is_some();
    assert!(invited(&a.sync(&alice, None, 0, None).await), "alice sees the invite");
    let view = h.room(&room_id);

    let cases: Vec<(&str, Value, &str)> = vec![
        ("a leave of another local user", template(&view, &bob.user_id, &bob.user_id, "leave"), "12"),
        ("a kick of another local user", template(&view, &alice.user_id, &bob.user_id, "leave"), "12"),
        ("a join instead of a leave", template(&view, &alice.user_id, &alice.user_id, "join"), "12"),
        ("a ban of our own user", template(&view, &alice.user_id, &alice.user_id, "ban"), "12"),
        ("an unknown room version", template(&view, &alice.user_id, &alice.user_id, "leave"), "org.example.hostile"),
    ];
    for (what, event, version) in cases {
        let answer = json!({"room_version": version, "event": event});
        h.on(Endpoint::MakeLeave, move |_| Reply::ok(answer.clone()));
        let (status, body) = raw_post(&a, &alice, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room_id))).await;
        assert!((400..=502).contains(&status) && status != 500, "{what}: the leave answered {status}: {body}");
        assert!(h.requests(Endpoint::SendLeave).is_empty(), "{what}: something was signed and sent");
        assert!(invited(&a.sync(&alice, None, 0, None).await), "{what}: the invite is gone");
    }

    // The honest leave works.
    h.reset(Endpoint::MakeLeave);
    let (status, body) = raw_post(&a, &alice, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room_id))).await;
    assert_eq!(status, 200, "{body}");
    let sent = h.requests(Endpoint::SendLeave);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body["state_key"], alice.user_id.as_str());
    assert_eq!(sent[0].body["content"]["membership"], "leave");
    assert!(!invited(&a.sync(&alice, None, 0, None).await), "the invite is gone after the leave");
}

/// Our invite comes back co-signed by the invitee's server with what the event id does not
/// cover changed (a reason, an extra top-level key): we keep our own event and take only
/// that server's signature.
async fn a_co_signed_invite_changes_nothing_but_signatures(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    let room_id = a
        .create_room(
            &alice,
            json!({
                "preset": "public_chat",
                "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "invited"}}],
            }),
        )
        .await;
    let cosign = h.cosigner();
    h.on(Endpoint::Invite, move |req| {
        let mut event = req.body["event"].clone();
        event["content"]["reason"] = json!("tampered");
        event["org.example.injected"] = json!(true);
        let version = RoomVersionId::try_from(req.body["room_version"].as_str().unwrap()).unwrap();
        Reply::ok(json!({"event": cosign(&version, event)}))
    });
    let invited = a
        .post(
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room_id)),
            Some(&alice.access_token),
            json!({"user_id": mallory, "reason": "welcome"}),
        )
        .await;
    invited.assert_ok();
    let member = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room_id), enc(&mallory)),
            Some(&alice.access_token),
        )
        .await;
    assert_eq!(member.assert_ok()["reason"], "welcome", "{}", member.body);
    let state = a.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room_id)), Some(&alice.access_token)).await;
    let invite_id = state.assert_ok().as_array().unwrap().iter().find(|e| e["state_key"] == mallory.as_str()).unwrap()
        ["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = h.get(&a, &format!("/_matrix/federation/v1/event/{}", enc(&invite_id))).await;
    assert_eq!(status, 200, "{body}");
    let stored = &body["pdus"][0];
    assert!(stored.get("org.example.injected").is_none(), "a key the invitee's server added was kept: {stored}");
    assert_eq!(stored["content"]["reason"], "welcome", "{stored}");
    assert!(stored["signatures"][&h.name].is_object(), "the invitee's signature is kept: {stored}");
}

/// `/invite` of `event` (built by `h`) as `h` would send it.
async fn send_invite(h: &HostileServer, server: &Server, room_id: &str, event_id: &str, event: Value) -> (u16, Value) {
    let body = json!({"room_version": "12", "event": event, "invite_room_state": []});
    h.request(
        server,
        reqwest::Method::PUT,
        &format!("/_matrix/federation/v2/invite/{}/{}", enc(room_id), enc(event_id)),
        Some(body),
    )
    .await
}

fn is_invited(sync: &Value, room_id: &str) -> bool {
    sync["rooms"]["invite"].get(room_id).is_some()
}

/// Invites through `/invite` into a room every local user has left (so we are not in it and
/// its state is what we knew when we left): an invite its own auth events do not allow (of a
/// user banned there), or one citing a membership of the invitee older than the ban we know,
/// is refused and changes nothing; an allowed invite still arrives.
async fn invites_into_a_room_we_left_are_checked(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = a.register("bob", "password-bob-1").await;
    let carol = a.register("carol", "password-carol-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    a.join(&bob, &room_id).await.assert_ok();
    a.join(&carol, &room_id).await.assert_ok();
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    let room = enc(&room_id);
    a.post(
        &format!("/_matrix/client/v3/rooms/{room}/ban"),
        Some(&alice.access_token),
        json!({"user_id": carol.user_id}),
    )
    .await
    .assert_ok();
    a.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob.access_token), json!({})).await.assert_ok();
    a.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&alice.access_token), json!({})).await.assert_ok();
    let alice_id = alice.user_id.clone();
    h.wait_for_pdu("alice's leave", move |p| p["type"] == "m.room.member" && p["state_key"] == alice_id.as_str()).await;
    let view = h.room(&room_id);
    let carols_join = view
        .events
        .iter()
        .find(|(_, e)| e["state_key"] == carol.user_id.as_str() && e["content"]["membership"] == "join")
        .map(|(id, _)| id.clone())
        .expect("carol's join");
    let carol_since = a.sync(&carol, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    // Carol is banned: the invite's own auth events (the ban among them) do not allow it.
    let (invite_id, invite) = h.build(&room_id, Draft::member(&mallory, &carol.user_id, "invite"));
    let (status, body) = send_invite(&h, &a, &room_id, &invite_id, invite).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "an invite of a banned user: {body}");
    // The same invite citing Carol's join from before the ban we know.
    let power_levels = view.state_id("m.room.power_levels", "").unwrap();
    let mallorys_join = view.state_id("m.room.member", &mallory).unwrap();
    let (invite_id, invite) = h.build(
        &room_id,
        Draft::member(&mallory, &carol.user_id, "invite").auth_events(&[&power_levels, &mallorys_join, &carols_join]),
    );
    let (status, body) = send_invite(&h, &a, &room_id, &invite_id, invite).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "an invite citing an old join: {body}");
    let sync = a.sync(&carol, Some(&carol_since), 0, None).await;
    assert!(!is_invited(&sync, &room_id), "carol got a refused invite: {sync}");
    let sync = a.sync(&carol, None, 0, None).await;
    assert!(!is_invited(&sync, &room_id), "carol got a refused invite: {sync}");

    // Bob left of his own accord: an invite back is allowed.
    let (invite_id, invite) = h.build(&room_id, Draft::member(&mallory, &bob.user_id, "invite"));
    let (status, body) = send_invite(&h, &a, &room_id, &invite_id, invite).await;
    assert_eq!(status, 200, "an allowed invite: {body}");
    assert!(is_invited(&a.sync(&bob, None, 0, None).await, &room_id), "bob sees the invite");
}

backend_tests!(
    invites_into_a_room_we_left_are_checked,
    crafted_join_templates_are_refused,
    crafted_leave_templates_are_refused,
    a_co_signed_invite_changes_nothing_but_signatures
);
