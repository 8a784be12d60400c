//! Server-side `/search` over unencrypted messages, on SQLite FTS5 and PostgreSQL full-text.

use conformance::{Backend, Server, backend_tests, enc};
use serde_json::json;

backend_tests!(search_finds_messages_in_joined_rooms);

async fn search_finds_messages_in_joined_rooms(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat", "name": "Quarterly planning"})).await;
    let private = server.create_room(&bob, json!({})).await;
    server.send_text(&alice, &room, "The budget review is on Friday").await.assert_ok();
    server.send_text(&alice, &room, "Lunch at noon?").await.assert_ok();
    let gone = server.send_text(&alice, &room, "budget leak, delete me").await.assert_ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.send_text(&bob, &private, "secret budget of bob").await.assert_ok();
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&gone)),
            Some(&alice.access_token),
            json!({}),
        )
        .await
        .assert_ok();

    let search = |term: &str, extra: serde_json::Value| {
        let server = &server;
        let token = alice.access_token.clone();
        let mut criteria = json!({"search_term": term});
        if let Some(map) = extra.as_object() {
            for (k, v) in map {
                criteria[k] = v.clone();
            }
        }
        async move {
            server
                .post(
                    "/_matrix/client/v3/search",
                    Some(&token),
                    json!({"search_categories": {"room_events": criteria}}),
                )
                .await
        }
    };
    let resp = search("BUDGET", json!({})).await;
    let results = resp.assert_ok()["search_categories"]["room_events"]["results"].as_array().unwrap().clone();
    let bodies: Vec<&str> = results.iter().map(|r| r["result"]["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, vec!["The budget review is on Friday"], "only alice's rooms, redacted text is gone");
    assert!(results[0]["rank"].is_number());
    // Prefixes match, and room names are searched too.
    let resp = search("plan", json!({"keys": ["content.name"]})).await;
    let results = resp.assert_ok()["search_categories"]["room_events"]["results"].as_array().unwrap().clone();
    assert_eq!(results[0]["result"]["content"]["name"], "Quarterly planning");
    // FTS syntax in the search term is just text.
    let resp = search("\"budget OR * NEAR(", json!({"order_by": "recent"})).await;
    resp.assert_ok();
    server
        .post(
            "/_matrix/client/v3/search",
            Some(&alice.access_token),
            json!({"search_categories": {"room_events": {"search_term": "   "}}}),
        )
        .await
        .assert_error(400, "M_INVALID_PARAM");
}
