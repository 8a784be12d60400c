//! Push rules, unread and highlight counts, `/notifications`.

use conformance::{Backend, Server, backend_tests, enc};
use serde_json::json;

backend_tests!(push_rule_crud, unread_counts_and_notifications, room_mentions_highlight_only_for_permitted_senders);

async fn push_rule_crud(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    let all = server.get("/_matrix/client/v3/pushrules/", token).await;
    assert!(all.assert_ok()["global"]["override"].as_array().unwrap().iter().any(|r| r["rule_id"] == ".m.rule.master"));

    let path = "/_matrix/client/v3/pushrules/global/content/cake";
    server.put(path, token, json!({"pattern": "cake*", "actions": ["notify"]})).await.assert_ok();
    let rule = server.get(path, token).await;
    assert_eq!(rule.assert_ok()["pattern"], "cake*");
    assert_eq!(rule.body["enabled"], true);
    server.put(&format!("{path}/enabled"), token, json!({"enabled": false})).await.assert_ok();
    assert_eq!(server.get(&format!("{path}/enabled"), token).await.assert_ok()["enabled"], false);
    server.put(&format!("{path}/actions"), token, json!({"actions": []})).await.assert_ok();
    assert_eq!(server.get(&format!("{path}/actions"), token).await.assert_ok()["actions"], json!([]));
    // The change reaches the client's sync as account data.
    let sync = server.sync(&alice, None, 0, None).await;
    let rules = sync["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.push_rules")
        .cloned()
        .expect("push rules");
    assert!(rules["content"]["global"]["content"].as_array().unwrap().iter().any(|r| r["rule_id"] == "cake"));
    server.delete(path, token, None).await.assert_ok();
    server.get(path, token).await.assert_error(404, "M_NOT_FOUND");
    // Server default rules cannot be deleted, nor can rules be inserted with a `.` id.
    server
        .delete("/_matrix/client/v3/pushrules/global/override/.m.rule.master", token, None)
        .await
        .assert_error(403, "M_FORBIDDEN");
    server
        .put("/_matrix/client/v3/pushrules/global/override/.mine", token, json!({"actions": [], "conditions": []}))
        .await
        .assert_error(400, "M_INVALID_PARAM");
    server
        .put(
            "/_matrix/client/v3/pushrules/global/content/x?before=nonexistent",
            token,
            json!({"pattern": "x", "actions": []}),
        )
        .await
        .assert_error(404, "M_NOT_FOUND");
}

async fn unread_counts_and_notifications(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    server
        .put(
            "/_matrix/client/v3/profile/@bob:localhost/displayname",
            Some(&bob.access_token),
            json!({"displayname": "Bobby"}),
        )
        .await
        .assert_ok();
    let room = server.create_room(&alice, json!({"preset": "public_chat", "name": "Group"})).await;
    server.join(&bob, &room).await.assert_ok();
    // A third member makes it a group (one-to-one rooms notify for every message).
    let carol = server.register("carol", "carol-pass").await;
    server.join(&carol, &room).await.assert_ok();

    server.send_text(&alice, &room, "hello everyone").await.assert_ok();
    // An intentional mention (m.mentions), as current clients send them.
    let mention = server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/mention-1", enc(&room)),
            Some(&alice.access_token),
            json!({"msgtype": "m.text", "body": "Bobby, look at this", "m.mentions": {"user_ids": ["@bob:localhost"]}}),
        )
        .await
        .assert_ok()["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    server.send_text(&bob, &room, "my own message").await.assert_ok();

    let sync = server.sync(&bob, None, 0, None).await;
    let counts = &sync["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 2, "{counts}");
    assert_eq!(counts["highlight_count"], 1, "{counts}");

    let notes = server.get("/_matrix/client/v3/notifications", Some(&bob.access_token)).await;
    let list = notes.assert_ok()["notifications"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["event"]["event_id"], mention.as_str());
    assert_eq!(list[0]["read"], false);
    let highlights = server.get("/_matrix/client/v3/notifications?only=highlight", Some(&bob.access_token)).await;
    assert_eq!(highlights.assert_ok()["notifications"].as_array().unwrap().len(), 1);

    // Reading the mention clears the counts.
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&mention)),
            Some(&bob.access_token),
            json!({}),
        )
        .await
        .assert_ok();
    let sync = server.sync(&bob, None, 0, None).await;
    let counts = &sync["rooms"]["join"][&room]["unread_notifications"];
    assert!(counts["notification_count"] == 0 || counts["notification_count"].is_null(), "{counts}");
    let notes = server.get("/_matrix/client/v3/notifications", Some(&bob.access_token)).await;
    assert_eq!(notes.assert_ok()["notifications"][0]["read"], true);
}

/// `@room` (`.m.rule.is_room_mention`, `m.mentions.room`) highlights only when the sender's
/// power level reaches the room's `notifications.room` (50 by default). The legacy
/// body-matching `.m.rule.roomnotif` is no longer a default rule (MSC4210, which ruma's
/// defaults follow): a bare "@room" in the body only notifies.
async fn room_mentions_highlight_only_for_permitted_senders(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    server.join(&carol, &room).await.assert_ok();
    let send = |user: &conformance::User, txn: &str, content: serde_json::Value| {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
        let token = user.access_token.clone();
        let server = &server;
        async move { server.put(&path, Some(&token), content).await.assert_ok()["event_id"].as_str().unwrap().to_owned() }
    };
    let highlights = |user: &conformance::User| {
        let token = user.access_token.clone();
        let server = &server;
        async move {
            server.get("/_matrix/client/v3/notifications?only=highlight", Some(&token)).await.assert_ok()["notifications"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["event"]["event_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let mention = json!({"msgtype": "m.text", "body": "@room lunch!", "m.mentions": {"room": true}});
    let legacy = json!({"msgtype": "m.text", "body": "@room lunch, said the old client"});

    // Bob (power 0) may not notify the room: his @room notifies Carol, without a highlight.
    let bob_mention = send(&bob, "b1", mention.clone()).await;
    let bob_legacy = send(&bob, "b2", legacy.clone()).await;
    assert!(highlights(&carol).await.is_empty());
    let all = server.get("/_matrix/client/v3/notifications", Some(&carol.access_token)).await;
    let notified: Vec<_> =
        all.assert_ok()["notifications"].as_array().unwrap().iter().map(|n| n["event"]["event_id"].clone()).collect();
    assert!(notified.contains(&json!(bob_mention)) && notified.contains(&json!(bob_legacy)), "{notified:?}");

    // Alice (the creator) may: her mention highlights for Carol and Bob.
    let alice_mention = send(&alice, "a1", mention.clone()).await;
    send(&alice, "a2", legacy.clone()).await;
    assert_eq!(highlights(&carol).await, vec![alice_mention.clone()]);
    assert_eq!(highlights(&bob).await, vec![alice_mention.clone()]);

    // Once the room lets everybody notify it, Bob's @room highlights too.
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room));
    let mut levels = server.get(&path, Some(&alice.access_token)).await.assert_ok().clone();
    levels["notifications"] = json!({"room": 0});
    server.put(&path, Some(&alice.access_token), levels).await.assert_ok();
    let bob_later = send(&bob, "b3", mention).await;
    assert_eq!(highlights(&carol).await[0], bob_later);
}
