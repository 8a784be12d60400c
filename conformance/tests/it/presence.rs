use conformance::{Backend, Server, ServerOptions, backend_tests, enc};
use serde_json::json;

backend_tests!(
    presence_is_shared_with_room_members,
    presence_can_be_switched_off,
    presence_of_a_new_room_mate_arrives_with_the_join,
    presence_after_a_long_gap_is_the_room_mates_only
);

async fn presence_is_shared_with_room_members(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let since = server.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    let path = format!("/_matrix/client/v3/presence/{}/status", enc("@alice:localhost"));
    server
        .put(&path, Some(&alice.access_token), json!({"presence": "online", "status_msg": "at lunch"}))
        .await
        .assert_ok();
    server.put(&path, Some(&bob.access_token), json!({"presence": "online"})).await.assert_error(403, "M_FORBIDDEN");
    server
        .put(&path, Some(&alice.access_token), json!({"presence": "sleeping"}))
        .await
        .assert_error(400, "M_INVALID_PARAM");

    let seen = server.get(&path, Some(&bob.access_token)).await;
    assert_eq!(seen.assert_ok()["presence"], "online");
    assert_eq!(seen.body["status_msg"], "at lunch");
    assert!(seen.body["last_active_ago"].is_u64());
    // Carol shares no room with alice.
    server.get(&path, Some(&carol.access_token)).await.assert_error(403, "M_FORBIDDEN");

    let sync = server.sync(&bob, Some(&since), 0, None).await;
    let events = sync["presence"]["events"].as_array().cloned().unwrap_or_default();
    let alice_presence =
        events.iter().find(|e| e["sender"] == "@alice:localhost").expect("alice's presence in bob's sync");
    assert_eq!(alice_presence["content"]["presence"], "online");
    assert_eq!(alice_presence["content"]["status_msg"], "at lunch");
    let carol_sync = server.sync(&carol, None, 0, None).await;
    let carol_events = carol_sync["presence"]["events"].as_array().cloned().unwrap_or_default();
    assert!(!carol_events.iter().any(|e| e["sender"] == "@alice:localhost"), "{carol_events:?}");

    // Syncing marks a user online.
    server.sync(&carol, None, 0, None).await;
    let carol_state = server
        .get(&format!("/_matrix/client/v3/presence/{}/status", enc("@carol:localhost")), Some(&carol.access_token))
        .await;
    assert_eq!(carol_state.assert_ok()["presence"], "online");
    let offline_sync = server.get("/_matrix/client/v3/sync?set_presence=offline", Some(&bob.access_token)).await;
    offline_sync.assert_ok();
}

async fn presence_can_be_switched_off(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_PRESENCE_ENABLED", "false").start().await;
    let alice = server.register("alice", "secret-pass").await;
    let path = format!("/_matrix/client/v3/presence/{}/status", enc("@alice:localhost"));
    server.put(&path, Some(&alice.access_token), json!({"presence": "online", "status_msg": "hi"})).await.assert_ok();
    let state = server.get(&path, Some(&alice.access_token)).await;
    assert_eq!(state.assert_ok()["presence"], "offline");
    assert!(state.body.get("status_msg").is_none());
    let sync = server.sync(&alice, None, 0, None).await;
    assert!(sync["presence"]["events"].as_array().is_none_or(|e| e.is_empty()));
}

/// Someone who comes to share a room with you (a new direct chat) has a presence that may not
/// have changed for hours; the next sync must still carry it, on both sides of the join.
async fn presence_of_a_new_room_mate_arrives_with_the_join(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    for (user, token, status) in
        [("@alice:localhost", &alice.access_token, "writing"), ("@bob:localhost", &bob.access_token, "reading")]
    {
        server
            .put(
                &format!("/_matrix/client/v3/presence/{}/status", enc(user)),
                Some(token),
                json!({"presence": "online", "status_msg": status}),
            )
            .await
            .assert_ok();
    }
    let alice_since = server.sync(&alice, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    let bob_since = server.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    // Presence set before they share a room is not shown to each other.
    let first = server.sync(&bob, Some(&bob_since), 0, None).await;
    assert!(
        !first["presence"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .any(|e| e["sender"] == "@alice:localhost"),
        "{first}"
    );

    let room = server.create_room(&bob, json!({"invite": ["@alice:localhost"], "is_direct": true})).await;
    let bob_since = server.sync(&bob, Some(&bob_since), 0, None).await["next_batch"].as_str().unwrap().to_owned();
    server.join(&alice, &room).await.assert_ok();

    let presence_of = |sync: &serde_json::Value, user: &str| {
        sync["presence"]["events"].as_array().cloned().unwrap_or_default().into_iter().find(|e| e["sender"] == user)
    };
    // The joining side sees the member who was there.
    let sync = server.sync(&alice, Some(&alice_since), 0, None).await;
    let bob_presence =
        presence_of(&sync, "@bob:localhost").unwrap_or_else(|| panic!("bob's presence in alice's sync: {sync}"));
    assert_eq!(bob_presence["content"]["presence"], "online");
    assert_eq!(bob_presence["content"]["status_msg"], "reading");
    // The member who was there sees the one who joined.
    let sync = server.sync(&bob, Some(&bob_since), 0, None).await;
    let alice_presence =
        presence_of(&sync, "@alice:localhost").unwrap_or_else(|| panic!("alice's presence in bob's sync: {sync}"));
    assert_eq!(alice_presence["content"]["status_msg"], "writing");
}

/// A sync after many other events (past the window the server reads in full) still gets the
/// presence of its room-mates, and only theirs.
async fn presence_after_a_long_gap_is_the_room_mates_only(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let elsewhere = server.create_room(&carol, json!({})).await;
    let since = server.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    // Well over a hundred stream positions before the presence changes.
    for i in 0..120 {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/gap{i}", enc(&elsewhere));
        server.put(&path, Some(&carol.access_token), json!({"msgtype": "m.text", "body": "x"})).await.assert_ok();
    }
    for (user, name) in [(&alice, "alice"), (&carol, "carol")] {
        let path = format!("/_matrix/client/v3/presence/{}/status", enc(&format!("@{name}:localhost")));
        server
            .put(&path, Some(&user.access_token), json!({"presence": "unavailable", "status_msg": name}))
            .await
            .assert_ok();
    }

    let sync = server.sync(&bob, Some(&since), 0, None).await;
    let events = sync["presence"]["events"].as_array().cloned().unwrap_or_default();
    let alice_presence = events.iter().find(|e| e["sender"] == "@alice:localhost").expect("alice's presence");
    assert_eq!(alice_presence["content"]["presence"], "unavailable");
    assert_eq!(alice_presence["content"]["status_msg"], "alice");
    assert!(!events.iter().any(|e| e["sender"] == "@carol:localhost"), "carol shares no room with bob: {events:?}");
}
