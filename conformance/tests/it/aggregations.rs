//! Bundled aggregations (`unsigned.m.relations`): threads, edits and references on the
//! events of `/event`, `/messages`, `/context`, `/relations` and the `/sync` timeline.

use conformance::{Backend, Server, User, backend_tests, enc};
use serde_json::{Value, json};

backend_tests!(bundled_aggregations_everywhere, bundles_follow_redactions_and_viewers);

async fn send(server: &Server, user: &User, room: &str, txn: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
    server.put(&path, Some(&user.access_token), content).await.assert_ok()["event_id"].as_str().unwrap().to_owned()
}

fn thread_reply(root: &str, body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body, "m.relates_to": {"rel_type": "m.thread", "event_id": root}})
}

fn edit(target: &str, body: &str) -> Value {
    json!({
        "msgtype": "m.text", "body": format!("* {body}"),
        "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target},
    })
}

fn reference(target: &str) -> Value {
    json!({"msgtype": "m.text", "body": "see above", "m.relates_to": {"rel_type": "m.reference", "event_id": target}})
}

async fn get_event(server: &Server, user: &User, room: &str, event_id: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(event_id));
    server.get(&path, Some(&user.access_token)).await.assert_ok().clone()
}

fn find<'a>(events: &'a Value, event_id: &str) -> &'a Value {
    events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == event_id)
        .unwrap_or_else(|| panic!("{event_id} in {events}"))
}

async fn bundled_aggregations_everywhere(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let since = server.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    let root = send(&server, &alice, &room, "root", json!({"msgtype": "m.text", "body": "root"})).await;
    let reply1 = send(&server, &bob, &room, "r1", thread_reply(&root, "first reply")).await;
    let reply2 = send(&server, &alice, &room, "r2", thread_reply(&root, "second reply")).await;
    let first_edit = send(&server, &alice, &room, "e1", edit(&root, "root, edited")).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let last_edit = send(&server, &alice, &room, "e2", edit(&root, "root, edited again")).await;
    // An "edit" by somebody else is not an edit.
    send(&server, &bob, &room, "e3", edit(&root, "bob rewrites history")).await;
    let referencing = send(&server, &bob, &room, "ref", reference(&root)).await;
    // Reactions are not bundled.
    let reaction = json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "👍"}});
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.reaction/react", enc(&room));
    server.put(&path, Some(&bob.access_token), reaction).await.assert_ok();
    // The reply in the thread is edited too: its edit is bundled where the reply is shown.
    let reply_edit = send(&server, &alice, &room, "e4", edit(&reply2, "second reply, edited")).await;

    let check_root = |event: &Value, viewer_participated: bool| {
        let relations = &event["unsigned"]["m.relations"];
        let thread = &relations["m.thread"];
        assert_eq!(thread["count"], 2, "{event}");
        assert_eq!(thread["latest_event"]["event_id"], reply2.as_str(), "{event}");
        assert_eq!(thread["latest_event"]["content"]["body"], "second reply");
        assert_eq!(thread["current_user_participated"], viewer_participated, "{event}");
        assert_eq!(relations["m.replace"]["event_id"], last_edit.as_str(), "{event}");
        assert_eq!(relations["m.replace"]["content"]["m.new_content"]["body"], "root, edited again");
        assert_eq!(relations["m.reference"]["chunk"], json!([{"event_id": referencing}]), "{event}");
        assert!(relations.get("m.annotation").is_none(), "{event}");
        // The original content is not replaced on the server (spec v1.7 and later).
        assert_eq!(event["content"]["body"], "root");
    };

    // /event
    check_root(&get_event(&server, &bob, &room, &root).await, true);
    check_root(&get_event(&server, &alice, &room, &root).await, true);
    let carol = server.register("carol", "carol-pass").await;
    server.join(&carol, &room).await.assert_ok();
    check_root(&get_event(&server, &carol, &room, &root).await, false);
    // Events without relations carry none.
    let plain = get_event(&server, &bob, &room, &first_edit).await;
    assert!(plain["unsigned"].get("m.relations").is_none(), "{plain}");

    // /messages
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room));
    let messages = server.get(&path, Some(&bob.access_token)).await.assert_ok().clone();
    check_root(find(&messages["chunk"], &root), true);
    assert_eq!(find(&messages["chunk"], &reply2)["unsigned"]["m.relations"]["m.replace"]["event_id"], reply_edit);

    // /context
    let path = format!("/_matrix/client/v3/rooms/{}/context/{}?limit=20", enc(&room), enc(&root));
    let context = server.get(&path, Some(&bob.access_token)).await.assert_ok().clone();
    check_root(&context["event"], true);
    assert_eq!(find(&context["events_after"], &reply2)["unsigned"]["m.relations"]["m.replace"]["event_id"], reply_edit);

    // /relations: the thread's replies, each with its own bundles.
    let path = format!("/_matrix/client/v1/rooms/{}/relations/{}/m.thread", enc(&room), enc(&root));
    let relations = server.get(&path, Some(&bob.access_token)).await.assert_ok().clone();
    assert_eq!(find(&relations["chunk"], &reply2)["unsigned"]["m.relations"]["m.replace"]["event_id"], reply_edit);
    assert!(find(&relations["chunk"], &reply1)["unsigned"].get("m.relations").is_none());

    // /sync timeline
    let filter = json!({"room": {"timeline": {"limit": 50}}});
    let sync = server.sync(&bob, Some(&since), 0, Some(filter)).await;
    let timeline = &sync["rooms"]["join"][&room]["timeline"]["events"];
    check_root(find(timeline, &root), true);

    // /notifications (Alice's root notified Bob) and /search.
    let notes = server.get("/_matrix/client/v3/notifications", Some(&bob.access_token)).await.assert_ok().clone();
    let note = notes["notifications"].as_array().unwrap().iter().find(|n| n["event"]["event_id"] == root.as_str());
    check_root(&note.expect("the root is a notification for Bob")["event"], true);
    let search = json!({"search_categories": {"room_events": {"search_term": "root"}}});
    let found = server.post("/_matrix/client/v3/search", Some(&bob.access_token), search).await.assert_ok().clone();
    let results = found["search_categories"]["room_events"]["results"].as_array().unwrap();
    let hit = results.iter().find(|r| r["result"]["event_id"] == root.as_str()).expect("the root is found");
    check_root(&hit["result"], true);

    // /threads lists the root with its thread summary.
    let path = format!("/_matrix/client/v1/rooms/{}/threads", enc(&room));
    let threads = server.get(&path, Some(&carol.access_token)).await.assert_ok().clone();
    check_root(find(&threads["chunk"], &root), false);
}

async fn bundles_follow_redactions_and_viewers(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let root = send(&server, &alice, &room, "root", json!({"msgtype": "m.text", "body": "root"})).await;
    let referencing = send(&server, &bob, &room, "ref", reference(&root)).await;
    let reply = send(&server, &bob, &room, "reply", thread_reply(&root, "only reply")).await;
    let edit_id = send(&server, &alice, &room, "edit", edit(&root, "edited")).await;
    let relations = &get_event(&server, &alice, &room, &root).await["unsigned"]["m.relations"];
    assert_eq!(relations["m.thread"]["count"], 1);
    assert_eq!(relations["m.replace"]["event_id"], edit_id.as_str());

    // Redacted relations no longer count.
    for (txn, id) in [("x1", &referencing), ("x2", &reply), ("x3", &edit_id)] {
        let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/{txn}", enc(&room), enc(id));
        let sender = if id == &edit_id { &alice } else { &bob };
        server.put(&path, Some(&sender.access_token), json!({})).await.assert_ok();
    }
    let event = get_event(&server, &alice, &room, &root).await;
    assert!(event["unsigned"].get("m.relations").is_none(), "{event}");

    // An edit of a redacted event is not bundled.
    let edit_again = send(&server, &alice, &room, "edit2", edit(&root, "edited once more")).await;
    assert_eq!(
        get_event(&server, &alice, &room, &root).await["unsigned"]["m.relations"]["m.replace"]["event_id"],
        edit_again
    );
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/x4", enc(&room), enc(&root));
    server.put(&path, Some(&alice.access_token), json!({})).await.assert_ok();
    let event = get_event(&server, &alice, &room, &root).await;
    assert!(event["unsigned"].get("m.relations").is_none(), "{event}");

    // Somebody outside the room sees neither the event nor its relations.
    let mallory = server.register("mallory", "mallory-pass").await;
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&root));
    let denied = server.get(&path, Some(&mallory.access_token)).await;
    assert!(denied.status == 403 || denied.status == 404, "{:?}", denied.body);
    assert!(denied.body["errcode"] == "M_FORBIDDEN" || denied.body["errcode"] == "M_NOT_FOUND");
    let path = format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(&room), enc(&root));
    let denied = server.get(&path, Some(&mallory.access_token)).await;
    assert!(denied.status == 403 || denied.status == 404, "{:?}", denied.body);
    // Bad input: a malformed event id.
    let path = format!("/_matrix/client/v3/rooms/{}/event/not-an-event-id", enc(&room));
    assert_eq!(server.get(&path, Some(&alice.access_token)).await.status, 400);
}
