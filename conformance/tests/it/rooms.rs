//! Rooms: creation, membership and power levels, state, aliases and the directory.

use conformance::{Backend, Server, backend_tests, enc};
use serde_json::json;

backend_tests!(
    create_room_with_presets_and_versions,
    membership_lifecycle_and_forbidden_actions,
    power_levels_guard_state_and_moderation,
    aliases_and_public_directory,
    state_endpoints,
    room_upgrade,
    identical_rooms_created_at_once_get_distinct_ids
);

async fn create_room_with_presets_and_versions(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());

    // The default is room version 12, whose room id is the create event's hash.
    let room = server.create_room(&alice, json!({"name": "Team", "topic": "Plans"})).await;
    assert!(room.starts_with('!') && !room.contains(':'), "{room}");
    let create = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(&room)), token).await;
    assert_eq!(create.assert_ok()["room_version"], "12");
    let name = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)), token).await;
    assert_eq!(name.assert_ok()["name"], "Team");
    let rules = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.join_rules/", enc(&room)), token).await;
    assert_eq!(rules.assert_ok()["join_rule"], "invite");

    for version in ["10", "11"] {
        let room = server.create_room(&alice, json!({"room_version": version, "preset": "public_chat"})).await;
        assert!(room.ends_with(":localhost"), "{room}");
        let rules =
            server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.join_rules/", enc(&room)), token).await;
        assert_eq!(rules.assert_ok()["join_rule"], "public");
        let pl =
            server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room)), token).await;
        assert_eq!(pl.assert_ok()["users"]["@alice:localhost"], 100);
    }
    server
        .post("/_matrix/client/v3/createRoom", token, json!({"room_version": "1"}))
        .await
        .assert_error(400, "M_UNSUPPORTED_ROOM_VERSION");
    server
        .post("/_matrix/client/v3/createRoom", token, json!({"preset": "no_such_preset"}))
        .await
        .assert_error(400, "M_BAD_JSON");
    // initial_state and power level overrides are applied.
    let room = server
        .create_room(
            &alice,
            json!({
                "initial_state": [{"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}],
                "power_level_content_override": {"events_default": 50},
            }),
        )
        .await;
    let hv =
        server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/", enc(&room)), token).await;
    assert_eq!(hv.assert_ok()["history_visibility"], "joined");
    let pl = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room)), token).await;
    assert_eq!(pl.assert_ok()["events_default"], 50);
    let joined = server.get("/_matrix/client/v3/joined_rooms", token).await;
    assert_eq!(joined.assert_ok()["joined_rooms"].as_array().unwrap().len(), 4);
}

async fn membership_lifecycle_and_forbidden_actions(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;
    let room = server.create_room(&alice, json!({"preset": "private_chat"})).await;
    let r = enc(&room);

    // Invite only: bob cannot join uninvited, nor send.
    server.join(&bob, &room).await.assert_error(403, "M_FORBIDDEN");
    server.send_text(&bob, &room, "hi").await.assert_error(403, "M_FORBIDDEN");
    server.join(&bob, "!nowhere:localhost").await.assert_error(404, "M_NOT_FOUND");

    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            Some(&alice.access_token),
            json!({"user_id": "@bob:localhost"}),
        )
        .await
        .assert_ok();
    // A non-member cannot invite.
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            Some(&carol.access_token),
            json!({"user_id": "@carol:localhost"}),
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    server.join(&bob, &room).await.assert_ok();
    server.send_text(&bob, &room, "hello").await.assert_ok();
    let members = server.get(&format!("/_matrix/client/v3/rooms/{r}/joined_members"), Some(&bob.access_token)).await;
    assert_eq!(members.assert_ok()["joined"].as_object().unwrap().len(), 2);

    // Bob (power 0) cannot kick alice; alice kicks bob, then bans him; banned bob cannot rejoin.
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/kick"),
            Some(&bob.access_token),
            json!({"user_id": "@alice:localhost"}),
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/kick"),
            Some(&alice.access_token),
            json!({"user_id": "@bob:localhost", "reason": "bye"}),
        )
        .await
        .assert_ok();
    server.send_text(&bob, &room, "still here?").await.assert_error(403, "M_FORBIDDEN");
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/ban"),
            Some(&alice.access_token),
            json!({"user_id": "@bob:localhost"}),
        )
        .await
        .assert_ok();
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            Some(&alice.access_token),
            json!({"user_id": "@bob:localhost"}),
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/unban"),
            Some(&alice.access_token),
            json!({"user_id": "@bob:localhost"}),
        )
        .await
        .assert_ok();
    let member = server
        .get(&format!("/_matrix/client/v3/rooms/{r}/state/m.room.member/@bob:localhost"), Some(&alice.access_token))
        .await;
    assert_eq!(member.assert_ok()["membership"], "leave");

    // Leaving: alice leaves, and can no longer read the state.
    server.post(&format!("/_matrix/client/v3/rooms/{r}/leave"), Some(&alice.access_token), json!({})).await.assert_ok();
    server
        .get(&format!("/_matrix/client/v3/rooms/{r}/state"), Some(&alice.access_token))
        .await
        .assert_error(403, "M_FORBIDDEN");
    let joined = server.get("/_matrix/client/v3/joined_rooms", Some(&alice.access_token)).await;
    assert_eq!(joined.assert_ok()["joined_rooms"], json!([]));
}

async fn power_levels_guard_state_and_moderation(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let r = enc(&room);
    server.join(&bob, &room).await.assert_ok();
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
            Some(&bob.access_token),
            json!({"name": "Bob's"}),
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
            Some(&alice.access_token),
            json!({"name": "Alice's"}),
        )
        .await
        .assert_ok();
    // Alice raises bob to moderator; now he may rename.
    let pl_path = format!("/_matrix/client/v3/rooms/{r}/state/m.room.power_levels/");
    let mut pl = server.get(&pl_path, Some(&alice.access_token)).await.assert_ok().clone();
    pl["users"]["@bob:localhost"] = json!(50);
    server.put(&pl_path, Some(&alice.access_token), pl).await.assert_ok();
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
            Some(&bob.access_token),
            json!({"name": "Bob's"}),
        )
        .await
        .assert_ok();
    // Bad content for a state event is refused without touching the state.
    server
        .put(&pl_path, Some(&bob.access_token), json!({"users": {"@bob:localhost": 100}}))
        .await
        .assert_error(403, "M_FORBIDDEN");
}

async fn aliases_and_public_directory(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server
        .create_room(
            &alice,
            json!({"preset": "public_chat", "visibility": "public", "room_alias_name": "lobby", "name": "Lobby"}),
        )
        .await;
    server
        .post("/_matrix/client/v3/createRoom", Some(&alice.access_token), json!({"room_alias_name": "lobby"}))
        .await
        .assert_error(400, "M_ROOM_IN_USE");
    let resolved = server.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#lobby:localhost")), None).await;
    assert_eq!(resolved.assert_ok()["room_id"], room.as_str());
    let canonical = server
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.canonical_alias/", enc(&room)),
            Some(&alice.access_token),
        )
        .await;
    assert_eq!(canonical.assert_ok()["alias"], "#lobby:localhost");
    // Join by alias.
    server.join(&bob, "#lobby:localhost").await.assert_ok();

    let public = server.get("/_matrix/client/v3/publicRooms", None).await;
    let chunk = public.assert_ok()["chunk"].as_array().unwrap().clone();
    assert_eq!(chunk.len(), 1);
    assert_eq!(chunk[0]["name"], "Lobby");
    assert_eq!(chunk[0]["num_joined_members"], 2);
    let vis = server.get(&format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)), None).await;
    assert_eq!(vis.assert_ok()["visibility"], "public");
    server
        .put(
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)),
            Some(&bob.access_token),
            json!({"visibility": "private"}),
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .put(
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)),
            Some(&alice.access_token),
            json!({"visibility": "private"}),
        )
        .await
        .assert_ok();
    assert_eq!(server.get("/_matrix/client/v3/publicRooms", None).await.assert_ok()["chunk"], json!([]));

    // A second alias, a canonical alias that does not point here, and deletion rights.
    let alias2 = enc("#hall:localhost");
    server
        .put(&format!("/_matrix/client/v3/directory/room/{alias2}"), Some(&bob.access_token), json!({"room_id": room}))
        .await
        .assert_ok();
    server
        .put(
            &format!("/_matrix/client/v3/directory/room/{alias2}"),
            Some(&alice.access_token),
            json!({"room_id": room}),
        )
        .await
        .assert_error(409, "M_UNKNOWN");
    server
        .put_state(&alice, &room, "m.room.canonical_alias", "", json!({"alias": "#elsewhere:localhost"}))
        .await
        .assert_error(400, "M_BAD_ALIAS");
    server
        .delete(&format!("/_matrix/client/v3/directory/room/{alias2}"), Some(&bob.access_token), None)
        .await
        .assert_ok();
    server.get(&format!("/_matrix/client/v3/directory/room/{alias2}"), None).await.assert_error(404, "M_NOT_FOUND");
}

async fn state_endpoints(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"name": "S"})).await;
    let r = enc(&room);
    let state = server.get(&format!("/_matrix/client/v3/rooms/{r}/state"), Some(&alice.access_token)).await;
    let types: Vec<String> =
        state.assert_ok().as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    for t in [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} in {types:?}");
    }
    let event = server
        .get(&format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/?format=event"), Some(&alice.access_token))
        .await;
    assert_eq!(event.assert_ok()["content"]["name"], "S");
    assert!(event.body["event_id"].as_str().unwrap().starts_with('$'));
    server
        .get(&format!("/_matrix/client/v3/rooms/{r}/state/m.room.topic/"), Some(&alice.access_token))
        .await
        .assert_error(404, "M_NOT_FOUND");
    server
        .get(&format!("/_matrix/client/v3/rooms/{r}/state"), Some(&bob.access_token))
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .put(&format!("/_matrix/client/v3/rooms/{r}/state/m.room.topic/"), Some(&alice.access_token), json!([1, 2]))
        .await
        .assert_error(400, "M_BAD_JSON");
    let members = server.get(&format!("/_matrix/client/v3/rooms/{r}/members"), Some(&alice.access_token)).await;
    assert_eq!(members.assert_ok()["chunk"].as_array().unwrap().len(), 1);
}

async fn room_upgrade(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let old = server
        .create_room(
            &alice,
            json!({"room_version": "10", "preset": "public_chat", "name": "Old hall", "room_alias_name": "hall"}),
        )
        .await;
    server.join(&bob, &old).await.assert_ok();
    let o = enc(&old);
    server
        .post(&format!("/_matrix/client/v3/rooms/{o}/upgrade"), Some(&bob.access_token), json!({"new_version": "12"}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .post(&format!("/_matrix/client/v3/rooms/{o}/upgrade"), Some(&alice.access_token), json!({"new_version": "99"}))
        .await
        .assert_error(400, "M_UNSUPPORTED_ROOM_VERSION");
    let resp = server
        .post(&format!("/_matrix/client/v3/rooms/{o}/upgrade"), Some(&alice.access_token), json!({"new_version": "12"}))
        .await;
    let new = resp.assert_ok()["replacement_room"].as_str().unwrap().to_owned();
    let n = enc(&new);
    let tombstone =
        server.get(&format!("/_matrix/client/v3/rooms/{o}/state/m.room.tombstone/"), Some(&bob.access_token)).await;
    assert_eq!(tombstone.assert_ok()["replacement_room"], new.as_str());
    let create =
        server.get(&format!("/_matrix/client/v3/rooms/{n}/state/m.room.create/"), Some(&alice.access_token)).await;
    assert_eq!(create.assert_ok()["predecessor"]["room_id"], old.as_str());
    assert_eq!(create.body["room_version"], "12");
    let name = server.get(&format!("/_matrix/client/v3/rooms/{n}/state/m.room.name/"), Some(&alice.access_token)).await;
    assert_eq!(name.assert_ok()["name"], "Old hall");
    let alias = server.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#hall:localhost")), None).await;
    assert_eq!(alias.assert_ok()["room_id"], new.as_str());
    // The old room is locked for ordinary members; bob follows to the new room.
    server.send_text(&bob, &old, "hello?").await.assert_error(403, "M_FORBIDDEN");
    server.join(&bob, &new).await.assert_ok();
    server.send_text(&bob, &new, "hello!").await.assert_ok();
}

/// A version 12 room id is the hash of its create event, so the same user creating rooms with
/// the same content at the same moment must still get distinct rooms (this once answered 500).
async fn identical_rooms_created_at_once_get_distinct_ids(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    let creates = (0..24).map(|_| server.post("/_matrix/client/v3/createRoom", token, json!({})));
    let mut rooms = Vec::new();
    for response in futures_util::future::join_all(creates).await {
        rooms.push(response.assert_ok()["room_id"].as_str().expect("room_id").to_owned());
    }
    let joined = server.get("/_matrix/client/v3/joined_rooms", token).await;
    let mut listed: Vec<String> = joined.assert_ok()["joined_rooms"]
        .as_array()
        .expect("joined_rooms")
        .iter()
        .map(|r| r.as_str().unwrap_or_default().to_owned())
        .collect();
    rooms.sort();
    rooms.dedup();
    listed.sort();
    assert_eq!(rooms.len(), 24, "distinct room ids");
    assert_eq!(listed, rooms);
}
