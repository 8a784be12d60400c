//! Relations, threads, context, tags, forgetting rooms, the user directory and TURN.

use conformance::{Backend, Server, ServerOptions, backend_tests, enc};
use serde_json::json;

backend_tests!(
    edits_threads_and_relations,
    context_around_an_event,
    tags_and_forgetting,
    user_directory_search,
    turn_credentials
);

async fn edits_threads_and_relations(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let root = server.send_text(&alice, &room, "root").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    let r = enc(&room);
    let send = |user: &conformance::User, txn: &str, content: serde_json::Value| {
        let path = format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/{txn}");
        let token = user.access_token.clone();
        let server = &server;
        async move { server.put(&path, Some(&token), content).await.assert_ok()["event_id"].as_str().unwrap().to_owned() }
    };
    let edit = send(
        &alice,
        "e1",
        json!({"msgtype": "m.text", "body": "* root!", "m.new_content": {"msgtype": "m.text", "body": "root!"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": root}}),
    )
    .await;
    let reply1 = send(
        &bob,
        "t1",
        json!({"msgtype": "m.text", "body": "in thread", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
    )
    .await;
    let reply2 = send(
        &alice,
        "t2",
        json!({"msgtype": "m.text", "body": "me too", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
    )
    .await;
    let other =
        server.send_text(&alice, &room, "another root").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    send(
        &alice,
        "t3",
        json!({"msgtype": "m.text", "body": "solo", "m.relates_to": {"rel_type": "m.thread", "event_id": other}}),
    )
    .await;

    let all =
        server.get(&format!("/_matrix/client/v1/rooms/{r}/relations/{}", enc(&root)), Some(&bob.access_token)).await;
    let ids: Vec<&str> =
        all.assert_ok()["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![reply2.as_str(), reply1.as_str(), edit.as_str()], "newest first");
    let threads_only = server
        .get(
            &format!("/_matrix/client/v1/rooms/{r}/relations/{}/m.thread?limit=1", enc(&root)),
            Some(&bob.access_token),
        )
        .await;
    let body = threads_only.assert_ok();
    assert_eq!(body["chunk"][0]["event_id"], reply2.as_str());
    let next = body["next_batch"].as_str().expect("more to come").to_owned();
    let page2 = server
        .get(
            &format!("/_matrix/client/v1/rooms/{r}/relations/{}/m.thread?limit=1&from={}", enc(&root), enc(&next)),
            Some(&bob.access_token),
        )
        .await;
    assert_eq!(page2.assert_ok()["chunk"][0]["event_id"], reply1.as_str());
    let edits = server
        .get(
            &format!("/_matrix/client/v1/rooms/{r}/relations/{}/m.replace/m.room.message", enc(&root)),
            Some(&bob.access_token),
        )
        .await;
    assert_eq!(edits.assert_ok()["chunk"].as_array().unwrap().len(), 1);

    let threads = server.get(&format!("/_matrix/client/v1/rooms/{r}/threads"), Some(&bob.access_token)).await;
    let roots: Vec<&str> =
        threads.assert_ok()["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(roots, vec![other.as_str(), root.as_str()], "latest activity first");
    let mine = server
        .get(&format!("/_matrix/client/v1/rooms/{r}/threads?include=participated"), Some(&bob.access_token))
        .await;
    let roots: Vec<&str> =
        mine.assert_ok()["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert_eq!(roots, vec![root.as_str()]);
    server
        .get(&format!("/_matrix/client/v1/rooms/{r}/relations/{}", enc("$missing")), Some(&bob.access_token))
        .await
        .assert_error(404, "M_NOT_FOUND");
}

async fn context_around_an_event(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let room = server.create_room(&alice, json!({})).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(
            server.send_text(&alice, &room, &format!("c{i}")).await.assert_ok()["event_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let ctx = server
        .get(
            &format!("/_matrix/client/v3/rooms/{}/context/{}?limit=4", enc(&room), enc(&ids[4])),
            Some(&alice.access_token),
        )
        .await;
    let body = ctx.assert_ok();
    assert_eq!(body["event"]["content"]["body"], "c4");
    let before: Vec<&str> =
        body["events_before"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
    let after: Vec<&str> =
        body["events_after"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(before, vec!["c3", "c2"]);
    assert_eq!(after, vec!["c5", "c6"]);
    assert!(body["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
    // Paginating on from `end` continues after c6.
    let more = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=2&from={}",
                enc(&room),
                enc(body["end"].as_str().unwrap())
            ),
            Some(&alice.access_token),
        )
        .await;
    let next: Vec<&str> =
        more.assert_ok()["chunk"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(next, vec!["c7", "c8"]);
}

async fn tags_and_forgetting(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let room = server.create_room(&alice, json!({})).await;
    let tags = format!("/_matrix/client/v3/user/@alice:localhost/rooms/{}/tags", enc(&room));
    let token = Some(alice.access_token.as_str());
    server.put(&format!("{tags}/m.favourite"), token, json!({"order": 0.5})).await.assert_ok();
    server.put(&format!("{tags}/u.work"), token, json!({})).await.assert_ok();
    let got = server.get(&tags, token).await;
    assert_eq!(got.assert_ok()["tags"]["m.favourite"]["order"], 0.5);
    server.delete(&format!("{tags}/u.work"), token, None).await.assert_ok();
    let got = server.get(&tags, token).await;
    assert!(got.assert_ok()["tags"].get("u.work").is_none());
    let sync = server.sync(&alice, None, 0, None).await;
    let account_data = sync["rooms"]["join"][&room]["account_data"]["events"].as_array().cloned().unwrap_or_default();
    assert!(account_data.iter().any(|e| e["type"] == "m.tag" && e["content"]["tags"]["m.favourite"].is_object()));

    // Forgetting needs leaving first; a forgotten room disappears from sync.
    let forget = format!("/_matrix/client/v3/rooms/{}/forget", enc(&room));
    server.post(&forget, token, json!({})).await.assert_error(400, "M_UNKNOWN");
    server.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), token, json!({})).await.assert_ok();
    server.post(&forget, token, json!({})).await.assert_ok();
    let sync = server.sync(&alice, None, 0, Some(json!({"room": {"include_leave": true}}))).await;
    assert!(sync["rooms"]["leave"].get(&room).is_none(), "{sync}");
}

async fn user_directory_search(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;
    server
        .put(
            "/_matrix/client/v3/profile/@bob:localhost/displayname",
            Some(&bob.access_token),
            json!({"displayname": "Robert Tables"}),
        )
        .await
        .assert_ok();
    let search = |term: &str| {
        let server = &server;
        let token = alice.access_token.clone();
        let term = term.to_owned();
        async move {
            let resp = server
                .post("/_matrix/client/v3/user_directory/search", Some(&token), json!({"search_term": term}))
                .await;
            resp.assert_ok()["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["user_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert!(search("robert").await.is_empty(), "bob shares no room with alice yet");
    let room = server.create_room(&alice, json!({"preset": "private_chat", "invite": ["@bob:localhost"]})).await;
    server.join(&bob, &room).await.assert_ok();
    assert_eq!(search("robert").await, vec!["@bob:localhost"]);
    assert_eq!(search("BOB").await, vec!["@bob:localhost"]);
    // Carol is found once she is in a public room.
    assert!(search("carol").await.is_empty());
    let public = server.create_room(&carol, json!({"preset": "public_chat"})).await;
    let _ = public;
    assert_eq!(search("carol").await, vec!["@carol:localhost"]);
    let resp = server
        .post("/_matrix/client/v3/user_directory/search", Some(&alice.access_token), json!({"search_term": "%"}))
        .await;
    assert!(resp.assert_ok()["results"].as_array().unwrap().is_empty(), "LIKE wildcards are literal");

    let open = ServerOptions::new(backend).env("OBMIN_USER_DIRECTORY_SEARCH_ALL_USERS", "true").start().await;
    let a = open.register("alice", "secret-pass").await;
    open.register("dave", "dave-pass").await;
    let resp = open
        .post("/_matrix/client/v3/user_directory/search", Some(&a.access_token), json!({"search_term": "dav"}))
        .await;
    assert_eq!(resp.assert_ok()["results"][0]["user_id"], "@dave:localhost");
}

async fn turn_credentials(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    server.get("/_matrix/client/v3/voip/turnServer", Some(&alice.access_token)).await.assert_error(404, "M_NOT_FOUND");
    let server = ServerOptions::new(backend)
        .env("OBMIN_TURN_URIS", "turn:turn.example.org:3478?transport=udp, turns:turn.example.org:5349")
        .env("OBMIN_TURN_SHARED_SECRET", "s3cret")
        .env("OBMIN_TURN_CREDENTIAL_LIFETIME_SECS", "600")
        .start()
        .await;
    let alice = server.register("alice", "secret-pass").await;
    let resp = server.get("/_matrix/client/v3/voip/turnServer", Some(&alice.access_token)).await;
    let body = resp.assert_ok();
    assert_eq!(body["uris"].as_array().unwrap().len(), 2);
    assert_eq!(body["ttl"], 600);
    let username = body["username"].as_str().unwrap();
    assert!(username.ends_with(":@alice:localhost"), "{username}");
    assert!(body["password"].as_str().unwrap().len() >= 27);
}
