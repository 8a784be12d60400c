//! Client-server behaviour that third-party clients rely on (issue 14), found by driving the
//! server with matrix-nio (`scripts/interop-nio`): empty request bodies where every field is
//! optional, and profile changes reaching the member events of the user's rooms.

use conformance::{Backend, Server, backend_tests, enc};
use reqwest::Method;
use serde_json::{Value, json};

backend_tests!(
    empty_bodies_where_every_field_is_optional,
    profile_changes_reach_the_member_events,
    bad_input_gets_the_right_error,
    room_aliases_and_the_filtered_directory,
    event_fields_trim_the_events_of_a_sync
);

/// `POST /join/{room}` and `/rooms/{room}/leave` with no body at all (matrix-nio sends
/// them so) work like `{}`; an endpoint with required fields still says what is missing.
async fn empty_bodies_where_every_field_is_optional(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "password-alice-1").await;
    let bob = server.register("bob", "password-bob-1").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let room = enc(&room_id);

    let joined = server
        .request_raw(Method::POST, &format!("/_matrix/client/v3/join/{room}"), Some(&bob.access_token), Vec::new())
        .await;
    assert_eq!(joined.assert_ok()["room_id"], Value::String(room_id.clone()));
    let left = server
        .request_raw(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{room}/leave"),
            Some(&bob.access_token),
            Vec::new(),
        )
        .await;
    left.assert_ok();
    let membership = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{}", enc(&bob.user_id)),
            Some(&alice.access_token),
        )
        .await;
    assert_eq!(membership.assert_ok()["membership"], "leave");

    // Required fields: a clear 400, not a parse error about an empty body.
    let login = server.request_raw(Method::POST, "/_matrix/client/v3/login", None, Vec::new()).await;
    assert_eq!(login.status, 400, "{}", login.body);
    assert!(login.body["errcode"].is_string(), "{}", login.body);
}

async fn member_content(server: &Server, token: &str, room_id: &str, user_id: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room_id), enc(user_id));
    server.get(&path, Some(token)).await.assert_ok().clone()
}

/// A new account has its localpart as display name; changing (or clearing) the display name
/// or avatar sends a new member event into every room the user is in.
async fn profile_changes_reach_the_member_events(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "password-alice-1").await;
    let bob = server.register("bob", "password-bob-1").await;
    let token = alice.access_token.as_str();
    let rooms = [
        server.create_room(&alice, json!({"preset": "public_chat"})).await,
        server.create_room(&alice, json!({"preset": "private_chat"})).await,
    ];
    server.join(&bob, &rooms[0]).await.assert_ok();
    for room in &rooms {
        assert_eq!(member_content(&server, token, room, &alice.user_id).await["displayname"], "alice");
    }

    let profile = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
    server.put(&format!("{profile}/displayname"), Some(token), json!({"displayname": "Alice L."})).await.assert_ok();
    server
        .put(&format!("{profile}/avatar_url"), Some(token), json!({"avatar_url": "mxc://localhost/face"}))
        .await
        .assert_ok();
    for room in &rooms {
        let content = member_content(&server, token, room, &alice.user_id).await;
        assert_eq!((content["membership"].as_str(), content["displayname"].as_str()), (Some("join"), Some("Alice L.")));
        assert_eq!(content["avatar_url"], "mxc://localhost/face", "{content}");
    }
    // Bob, in the first room, sees the change in his sync as a member event.
    let sync = server.sync(&bob, None, 0, None).await;
    let events = sync["rooms"]["join"][&rooms[0]]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let state = sync["rooms"]["join"][&rooms[0]]["state"]["events"].as_array().cloned().unwrap_or_default();
    assert!(
        events.iter().chain(state.iter()).any(|e| e["type"] == "m.room.member"
            && e["state_key"] == Value::String(alice.user_id.clone())
            && e["content"]["displayname"] == "Alice L."),
        "{sync}"
    );

    server.delete(&format!("{profile}/displayname"), Some(token), None).await.assert_ok();
    let content = member_content(&server, token, &rooms[1], &alice.user_id).await;
    assert!(content.get("displayname").is_none(), "a cleared name stays in the room: {content}");
    assert_eq!(content["avatar_url"], "mxc://localhost/face");
}

/// Answers to bad input that clients understand: no `"device_id": null` after
/// `inhibit_login`, 413 `M_TOO_LARGE` for an event over 64 KiB, 400 `M_BAD_JSON` for a state
/// event whose fields have the wrong types and for a body that is not an object.
async fn bad_input_gets_the_right_error(backend: Backend) {
    let server = Server::start(backend).await;
    let body = json!({"username": "quiet", "password": "password-quiet-1", "auth": {"type": "m.login.dummy"}, "inhibit_login": true});
    let registered = server.post("/_matrix/client/v3/register", None, body).await;
    let answer = registered.assert_ok().as_object().unwrap().clone();
    assert_eq!(answer.get("user_id"), Some(&json!("@quiet:localhost")));
    assert!(!answer.contains_key("device_id") && !answer.contains_key("access_token"), "{answer:?}");

    let alice = server.register("alice", "password-alice-1").await;
    let token = Some(alice.access_token.as_str());
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let room = enc(&room_id);
    let big = json!({"msgtype": "m.text", "body": "x".repeat(70_000)});
    server
        .put(&format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/big"), token, big)
        .await
        .assert_error(413, "M_TOO_LARGE");

    for (kind, content) in [
        ("m.room.name", json!({"name": 5})),
        ("m.room.topic", json!({"topic": {"text": 1}})),
        ("m.room.power_levels", json!({"users_default": "x"})),
        ("m.room.join_rules", json!({"join_rule": 3})),
    ] {
        let answer = server.put(&format!("/_matrix/client/v3/rooms/{room}/state/{kind}/"), token, content).await;
        answer.assert_error(400, "M_BAD_JSON");
    }
    let name = server.get(&format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"), token).await;
    assert_eq!(name.status, 404, "no name was stored: {}", name.body);

    let not_object = server.request_raw(Method::POST, "/_matrix/client/v3/createRoom", token, b"[1, 2]".to_vec()).await;
    not_object.assert_error(400, "M_BAD_JSON");
}

/// `GET /rooms/{room}/aliases` for members, `POST /publicRooms` with a search term.
async fn room_aliases_and_the_filtered_directory(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "password-alice-1").await;
    let eve = server.register("eve", "password-eve-1").await;
    let token = Some(alice.access_token.as_str());
    let garden = server
        .create_room(&alice, json!({"preset": "public_chat", "visibility": "public", "name": "Rose garden", "room_alias_name": "garden"}))
        .await;
    server.create_room(&alice, json!({"preset": "public_chat", "visibility": "public", "name": "Kitchen"})).await;

    let aliases = server.get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&garden)), token).await;
    assert_eq!(aliases.assert_ok()["aliases"], json!(["#garden:localhost"]));
    server
        .get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&garden)), Some(&eve.access_token))
        .await
        .assert_error(403, "M_FORBIDDEN");

    let found = server
        .post(
            "/_matrix/client/v3/publicRooms",
            Some(&eve.access_token),
            json!({"filter": {"generic_search_term": "rose"}}),
        )
        .await;
    let rooms: Vec<&str> =
        found.assert_ok()["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
    assert_eq!(rooms, vec![garden.as_str()]);
    let all = server.post("/_matrix/client/v3/publicRooms", Some(&eve.access_token), json!({"limit": 10})).await;
    assert_eq!(all.assert_ok()["chunk"].as_array().unwrap().len(), 2);
    let none = server
        .post(
            "/_matrix/client/v3/publicRooms",
            Some(&eve.access_token),
            json!({"filter": {"generic_search_term": "zzz"}}),
        )
        .await;
    assert_eq!(none.assert_ok()["chunk"], json!([]));
}

/// A filter's `event_fields` leaves only the listed fields in the sync's room events.
async fn event_fields_trim_the_events_of_a_sync(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "password-alice-1").await;
    let room_id = server.create_room(&alice, json!({"preset": "private_chat", "name": "Fields"})).await;
    server.send_text(&alice, &room_id, "only the body").await.assert_ok();
    let filter = json!({"event_fields": ["type", "content.body"], "room": {"timeline": {"limit": 50}}});
    let sync = server.sync(&alice, None, 0, Some(filter)).await;
    let room = &sync["rooms"]["join"][&room_id];
    let timeline = room["timeline"]["events"].as_array().unwrap();
    let message = timeline.iter().find(|e| e["type"] == "m.room.message").expect("the message");
    assert_eq!(message, &json!({"type": "m.room.message", "content": {"body": "only the body"}}));
    let all = timeline.iter().chain(room["state"]["events"].as_array().into_iter().flatten());
    for event in all {
        let keys: Vec<&String> = event.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| *k == "type" || *k == "content"), "{event}");
    }
}
