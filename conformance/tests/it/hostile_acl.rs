//! Server ACLs (`m.room.server_acl`) against a hostile server: every federation endpoint about
//! a room refuses a denied server, `/invite` included, and an ACL with malformed fields is read
//! the way Synapse reads it (a non-list `allow` allows nobody, non-string entries are skipped),
//! never as "allow everyone".

use conformance::{
    Backend, Server, ServerOptions, User, backend_tests, enc,
    hostile::{Draft, HostileServer},
};
use reqwest::Method;
use serde_json::{Value, json};

/// Sets the room's ACL; returns the event's id.
async fn set_acl(server: &Server, user: &User, room_id: &str, content: Value) -> String {
    let resp = server.put_state(user, room_id, "m.room.server_acl", "", content).await;
    resp.assert_ok()["event_id"].as_str().unwrap().to_owned()
}

/// After an ACL denying it, the hostile server (an IP literal) can neither invite our users
/// nor read, join, leave or send anything in the room.
async fn a_denied_server_is_refused_everywhere(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = a.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let h = HostileServer::start_named("127.0.0.1").await;
    let mallory = h.user("mallory");
    h.join(&a, &room_id, "mallory").await.expect("mallory joins before the ACL");
    let message = a.send_text(&alice, &room_id, "hello").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    set_acl(&a, &alice, &room_id, json!({"allow": ["*"], "allow_ip_literals": false})).await;

    let (status, body) = h.invite(&a, &room_id, &mallory, &bob.user_id).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "/invite: {body}");
    let sync = a.sync(&bob, None, 0, None).await;
    assert!(sync["rooms"]["invite"].get(&room_id).is_none(), "bob got the denied server's invite: {sync}");
    let membership = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room_id), enc(&bob.user_id)),
            Some(&alice.access_token),
        )
        .await;
    assert_eq!(membership.status, 404, "bob has no membership: {}", membership.body);

    let (room, id) = (enc(&room_id), enc(&message));
    let reads = [
        (Method::GET, format!("/_matrix/federation/v1/event/{id}"), None),
        (Method::GET, format!("/_matrix/federation/v1/state/{room}?event_id={id}"), None),
        (Method::GET, format!("/_matrix/federation/v1/state_ids/{room}?event_id={id}"), None),
        (Method::GET, format!("/_matrix/federation/v1/event_auth/{room}/{id}"), None),
        (Method::GET, format!("/_matrix/federation/v1/backfill/{room}?v={id}&limit=10"), None),
        (
            Method::POST,
            format!("/_matrix/federation/v1/get_missing_events/{room}"),
            Some(json!({"earliest_events": [], "latest_events": [message], "limit": 10})),
        ),
        (Method::GET, format!("/_matrix/federation/v1/make_join/{room}/{}?ver=12", enc(&h.user("eve"))), None),
        (Method::GET, format!("/_matrix/federation/v1/make_leave/{room}/{}", enc(&mallory)), None),
    ];
    for (method, path, body) in reads {
        let (status, answer) = h.request(&a, method, &path, body).await;
        assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{path}: {answer}");
    }
    let (_, pdu) = h.build(&room_id, Draft::message(&mallory, "denied"));
    assert!(h.send_pdu(&a, &pdu).await.is_err(), "a denied server's event was taken");
}

/// Malformed ACL fields: what each does to the hostile server's next message.
async fn malformed_acls_are_read_like_synapse(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let h = HostileServer::start_named("127.0.0.1").await;
    let mallory = h.user("mallory");
    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    let cases = [
        ("allow is not a list: nobody is allowed", json!({"allow": "*"}), false),
        ("allow missing: nobody is allowed", json!({"deny": []}), false),
        (
            "a non-string deny entry is skipped, the rest applies",
            json!({"allow": ["*"], "deny": [5, "127.0.0.1"]}),
            false,
        ),
        ("a non-string allow entry is skipped, the rest applies", json!({"allow": [5, "*"]}), true),
        ("a deny that is not a list is ignored", json!({"allow": ["*"], "deny": "127.0.0.1"}), true),
        (
            "allow_ip_literals that is not a boolean counts as true",
            json!({"allow": ["*"], "allow_ip_literals": "no"}),
            true,
        ),
    ];
    for (i, (what, acl, allowed)) in cases.into_iter().enumerate() {
        let acl_id = set_acl(&a, &alice, &room_id, acl).await;
        // On the ACL event: not on the cases refused before (we never took them, and the
        // hostile server, not the room's resident server, would not serve them).
        let (_, pdu) = h.build(&room_id, Draft::message(&mallory, &format!("case {i}")).prev_events(&[&acl_id]));
        let verdict = h.send_pdu(&a, &pdu).await;
        assert_eq!(verdict.is_ok(), allowed, "{what}: {verdict:?}");
    }
}

/// A PDU whose sender's server the ACL denies is refused even when an allowed server relays
/// it in its own transaction (the ACL is about who wrote the event, not who carried it).
async fn a_denied_servers_event_relayed_by_an_allowed_server_is_refused(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let relay = HostileServer::start().await;
    let denied = HostileServer::start_named("127.0.0.1").await;
    relay.join(&a, &room_id, "relay").await.expect("the relay joins");
    denied.join(&a, &room_id, "eve").await.expect("eve joins before the ACL");
    set_acl(&a, &alice, &room_id, json!({"allow": ["*"], "allow_ip_literals": false})).await;

    let (event_id, pdu) = denied.build(&room_id, Draft::message(&denied.user("eve"), "relayed past the ACL"));
    let verdict = relay.send_pdu(&a, &pdu).await;
    assert!(verdict.is_err(), "a denied server's event relayed by another server was taken");
    let resp = a
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&event_id)), Some(&alice.access_token))
        .await;
    assert_eq!(resp.status, 404, "the relayed event is not on the timeline: {}", resp.body);
    // The relay's own users are still welcome.
    let (_, own) = relay.build(&room_id, Draft::message(&relay.user("relay"), "allowed"));
    relay.send_pdu(&a, &own).await.expect("the allowed server's own event is taken");
}

backend_tests!(
    a_denied_server_is_refused_everywhere,
    malformed_acls_are_read_like_synapse,
    a_denied_servers_event_relayed_by_an_allowed_server_is_refused
);
