//! The room state per event on one server: rooms stored before the state model (a database
//! from an earlier version) get their state computed once at start and keep working, and the
//! state at an older event (`/context`) is that event's, not today's.

use conformance::{Backend, Server, User, backend_tests, enc};
use serde_json::{Value, json};

async fn set_state(server: &Server, user: &User, room_id: &str, kind: &str, content: Value) -> String {
    let resp = server
        .put(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(room_id)), Some(&user.access_token), content)
        .await;
    resp.assert_ok()["event_id"].as_str().unwrap().to_owned()
}

/// The room state `/context` shows around an event: (type, content) of the named state.
async fn context_state(server: &Server, user: &User, room_id: &str, event_id: &str, kind: &str) -> Option<Value> {
    let resp = server
        .get(
            &format!("/_matrix/client/v3/rooms/{}/context/{}?limit=0", enc(room_id), enc(event_id)),
            Some(&user.access_token),
        )
        .await;
    resp.assert_ok()["state"].as_array().unwrap().iter().find(|e| e["type"] == kind).map(|e| e["content"].clone())
}

/// Makes the database look as one written before the state model: no state groups, every
/// room waiting for them (what the migration leaves for the first start).
async fn forget_state_groups(server: &Server) {
    server
        .run_sql(
            "UPDATE events SET state_group = NULL, state_before = NULL;
             UPDATE event_outliers SET state_group = NULL, state_before = NULL;
             UPDATE rooms SET current_state_group = NULL;
             DELETE FROM state_group_entries;
             DELETE FROM state_groups;
             INSERT INTO state_groups_pending (room_id) SELECT room_id FROM rooms;",
        )
        .await;
}

async fn existing_rooms_get_their_state_at_start(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = server.register("alice", "password-alice-1").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    set_state(&server, &alice, &room_id, "m.room.topic", json!({"topic": "first"})).await;
    let early = server.say(&alice, &room_id, "under the first topic").await;
    set_state(&server, &alice, &room_id, "m.room.topic", json!({"topic": "second"})).await;
    let late = server.say(&alice, &room_id, "under the second topic").await;

    assert!(server.terminate().await, "clean shutdown");
    forget_state_groups(&server).await;
    server.restart().await;

    // The state at each older event is computed from what was stored.
    let at_early = context_state(&server, &alice, &room_id, &early, "m.room.topic").await;
    assert_eq!(at_early.unwrap()["topic"], "first");
    let at_late = context_state(&server, &alice, &room_id, &late, "m.room.topic").await;
    assert_eq!(at_late.unwrap()["topic"], "second");
    // The room keeps working: messages, state changes, and the state at events after them.
    let after = server.say(&alice, &room_id, "after the restart").await;
    set_state(&server, &alice, &room_id, "m.room.topic", json!({"topic": "third"})).await;
    let at_after = context_state(&server, &alice, &room_id, &after, "m.room.topic").await;
    assert_eq!(at_after.unwrap()["topic"], "second");
    let at_early = context_state(&server, &alice, &room_id, &early, "m.room.topic").await;
    assert_eq!(at_early.unwrap()["topic"], "first");
    let topic = server
        .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room_id)), Some(&alice.access_token))
        .await;
    assert_eq!(topic.assert_ok()["topic"], "third");
    // A second start does not compute anything again.
    server.restart().await;
    assert_eq!(server.log().matches("computed the state groups").count(), 1, "computed once");
    server.say(&alice, &room_id, "after the second restart").await;
}

backend_tests!(existing_rooms_get_their_state_at_start);
