//! Simplified sliding sync (MSC4186): lists, ranges, subscriptions, required_state,
//! timeline limits, `pos`, long-polling and the extensions.

use std::time::{Duration, Instant};

use conformance::{Backend, Server, User, backend_tests, enc};
use serde_json::{Value, json};

backend_tests!(lists_rooms_and_positions, long_poll_and_bad_requests, extensions);

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

async fn sliding(server: &Server, user: &User, pos: Option<&str>, timeout_ms: u64, body: Value) -> Value {
    let mut path = format!("{PATH}?timeout={timeout_ms}");
    if let Some(pos) = pos {
        path.push_str(&format!("&pos={}", enc(pos)));
    }
    server.post(&path, Some(&user.access_token), body).await.assert_ok().clone()
}

fn room_ids(response: &Value) -> Vec<String> {
    let mut ids: Vec<String> = response["rooms"].as_object().map(|r| r.keys().cloned().collect()).unwrap_or_default();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<&str>) -> Vec<String> {
    ids.sort();
    ids.into_iter().map(str::to_owned).collect()
}

fn state_types(room: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = room["required_state"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["type"].as_str().unwrap().to_owned(), e["state_key"].as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn lists_rooms_and_positions(backend: Backend) {
    let server = Server::start(backend).await;
    // Clients find out from /versions that sliding sync is there.
    let versions = server.get("/_matrix/client/versions", None).await;
    assert_eq!(versions.assert_ok()["unstable_features"]["org.matrix.simplified_msc3575"], true);
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let r1 = server.create_room(&alice, json!({"name": "One", "preset": "public_chat"})).await;
    let r2 = server.create_room(&alice, json!({"name": "Two", "preset": "public_chat"})).await;
    let r3 = server.create_room(&alice, json!({"name": "Three", "preset": "public_chat"})).await;
    let bobs_room = server.create_room(&bob, json!({"name": "Bob's"})).await;
    server.join(&bob, &r1).await.assert_ok();
    // Recency: r1 (Bob's join, then this message), then r3, then r2.
    server.send_text(&bob, &r1, "hello").await.assert_ok();

    let body = json!({
        "lists": {"recent": {
            "ranges": [[0, 1]], "timeline_limit": 2,
            "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"]],
        }},
        "room_subscriptions": {
            r2.clone(): {"timeline_limit": 1, "required_state": [["*", "*"]]},
            // Not Alice's room: ignored.
            bobs_room.clone(): {"timeline_limit": 1},
        },
    });
    let first = sliding(&server, &alice, None, 0, body).await;
    assert_eq!(first["lists"]["recent"]["count"], 3, "{first}");
    assert_eq!(room_ids(&first), sorted(vec![&r1, &r2, &r3]));
    let one = &first["rooms"][&r1];
    assert_eq!(one["initial"], true);
    assert_eq!(one["name"], "One");
    assert_eq!(one["timeline"].as_array().unwrap().len(), 2);
    assert_eq!(one["timeline"][1]["content"]["body"], "hello");
    assert_eq!(one["limited"], true);
    assert!(one["prev_batch"].is_string());
    assert_eq!(one["joined_count"], 2);
    assert!(one["bump_stamp"].as_u64().unwrap() > first["rooms"][&r3]["bump_stamp"].as_u64().unwrap());
    // $LAZY: the members who sent the timeline's events (and Alice herself), not all.
    assert_eq!(
        state_types(one),
        vec![
            ("m.room.member".into(), "@alice:localhost".into()),
            ("m.room.member".into(), "@bob:localhost".into()),
            ("m.room.name".into(), "".into()),
        ]
    );
    // `*`/`*`: every state event of the subscribed room.
    let two = &first["rooms"][&r2];
    let types = state_types(two);
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name", "m.room.member"] {
        assert!(types.iter().any(|(t, _)| t == kind), "{kind} in {types:?}");
    }
    assert_eq!(two["timeline"].as_array().unwrap().len(), 1);
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Nothing changed: with a pos and no timeout, no rooms.
    let body = json!({"lists": {"recent": {"ranges": [[0, 1]], "timeline_limit": 2,
        "required_state": [["m.room.member", "$ME"]]}}});
    let quiet = sliding(&server, &alice, Some(&pos), 0, body.clone()).await;
    assert!(room_ids(&quiet).is_empty(), "{quiet}");
    let pos = quiet["pos"].as_str().unwrap().to_owned();

    // A message in r2 moves it to the top: only what is new is sent.
    server.send_text(&alice, &r2, "news in two").await.assert_ok();
    let next = sliding(&server, &alice, Some(&pos), 0, body.clone()).await;
    assert_eq!(room_ids(&next), vec![r2.clone()], "{next}");
    let two = &next["rooms"][&r2];
    assert!(two.get("initial").is_none() || two["initial"] == false, "{two}");
    assert_eq!(two["timeline"].as_array().unwrap().len(), 1);
    assert_eq!(two["timeline"][0]["content"]["body"], "news in two");
    assert_eq!(two["num_live"], 1);
    let pos = next["pos"].as_str().unwrap().to_owned();

    // A new connection (`conn_id`) starts from scratch and gets every room in its range
    // whole, here with only the user's own membership ($ME) as state.
    let mut other = body.clone();
    other["conn_id"] = json!("second");
    other["lists"]["recent"]["ranges"] = json!([[0, 2]]);
    let fresh = sliding(&server, &alice, None, 0, other).await;
    assert_eq!(room_ids(&fresh), sorted(vec![&r1, &r2, &r3]));
    assert_eq!(state_types(&fresh["rooms"][&r3]), vec![("m.room.member".into(), "@alice:localhost".into())]);

    // The first connection's pos still works, and the same pos can be repeated (a
    // response lost on the way).
    let again = sliding(&server, &alice, Some(&pos), 0, body.clone()).await;
    let again2 = sliding(&server, &alice, Some(&pos), 0, body).await;
    assert_eq!(room_ids(&again), room_ids(&again2));

    // Filters: Alice marks r3 as a direct chat.
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice.user_id));
    server.put(&path, Some(&alice.access_token), json!({"@bob:localhost": [r3]})).await.assert_ok();
    let filtered = json!({"lists": {
        "dms": {"ranges": [[0, 9]], "timeline_limit": 0, "filters": {"is_dm": true}},
        "groups": {"ranges": [[0, 9]], "timeline_limit": 0, "filters": {"is_dm": false, "is_encrypted": false}},
        "invites": {"ranges": [[0, 9]], "timeline_limit": 0, "filters": {"is_invite": true}},
        "spaces": {"ranges": [[0, 9]], "timeline_limit": 0, "filters": {"room_types": ["m.space"]}},
    }});
    let lists = sliding(&server, &alice, None, 0, filtered).await;
    assert_eq!(lists["lists"]["dms"]["count"], 1, "{lists}");
    assert_eq!(lists["lists"]["groups"]["count"], 2);
    assert_eq!(lists["lists"]["invites"]["count"], 0);
    assert_eq!(lists["lists"]["spaces"]["count"], 0);
    assert_eq!(lists["rooms"][&r3]["is_dm"], true);

    // An invite: in the invite list, with its stripped state and no timeline.
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&bobs_room));
    server.post(&path, Some(&bob.access_token), json!({"user_id": alice.user_id})).await.assert_ok();
    let invites =
        json!({"lists": {"invites": {"ranges": [[0, 9]], "timeline_limit": 5, "filters": {"is_invite": true}}}});
    let invited = sliding(&server, &alice, None, 0, invites).await;
    assert_eq!(invited["lists"]["invites"]["count"], 1, "{invited}");
    let room = &invited["rooms"][&bobs_room];
    assert_eq!(room["name"], "Bob's", "{invited}");
    let stripped = room["invite_state"].as_array().unwrap();
    assert!(stripped.iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite"));
    assert!(room.get("timeline").is_none());

    // Leaving a room the connection knew sends the leave, once.
    let bob_body = json!({"lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 5}}});
    let bob_first = sliding(&server, &bob, None, 0, bob_body.clone()).await;
    assert_eq!(room_ids(&bob_first), sorted(vec![&r1, &bobs_room]));
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&r1));
    server.post(&path, Some(&bob.access_token), json!({})).await.assert_ok();
    let bob_next = sliding(&server, &bob, bob_first["pos"].as_str(), 0, bob_body.clone()).await;
    assert_eq!(room_ids(&bob_next), vec![r1.clone()], "{bob_next}");
    let timeline = bob_next["rooms"][&r1]["timeline"].as_array().unwrap();
    assert_eq!(timeline.last().unwrap()["content"]["membership"], "leave");
    assert_eq!(bob_next["lists"]["all"]["count"], 1);
    let bob_last = sliding(&server, &bob, bob_next["pos"].as_str(), 0, bob_body).await;
    assert!(room_ids(&bob_last).is_empty(), "{bob_last}");
}

async fn long_poll_and_bad_requests(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let body = json!({"lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 5}}});
    let first = sliding(&server, &alice, None, 0, body.clone()).await;
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Nothing new: the request waits for its timeout.
    let started = Instant::now();
    let idle = sliding(&server, &alice, Some(&pos), 700, body.clone()).await;
    assert!(started.elapsed() >= Duration::from_millis(600), "{:?}", started.elapsed());
    assert!(room_ids(&idle).is_empty());

    // A message wakes a waiting request long before its timeout.
    let started = Instant::now();
    let waiting = sliding(&server, &alice, Some(&pos), 20_000, body.clone());
    let send = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.send_text(&bob, &room, "wake up").await.assert_ok();
    };
    let (woken, ()) = tokio::join!(waiting, send);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(woken["rooms"][&room]["timeline"][0]["content"]["body"], "wake up", "{woken}");

    // Bad input.
    let path = format!("{PATH}?pos=1.s999999_0_0");
    server.post(&path, Some(&alice.access_token), body.clone()).await.assert_error(400, "M_UNKNOWN_POS");
    let path = format!("{PATH}?pos=garbage");
    server.post(&path, Some(&alice.access_token), body.clone()).await.assert_error(400, "M_UNKNOWN_POS");
    // Another device's pos is unknown to this one.
    let other = server.login("alice", "alice-pass").await;
    let other_token = other.assert_ok()["access_token"].as_str().unwrap().to_owned();
    let path = format!("{PATH}?pos={}", enc(&pos));
    server.post(&path, Some(&other_token), body.clone()).await.assert_error(400, "M_UNKNOWN_POS");
    let backwards = json!({"lists": {"all": {"ranges": [[5, 1]], "timeline_limit": 5}}});
    server.post(PATH, Some(&alice.access_token), backwards).await.assert_error(400, "M_INVALID_PARAM");
    let wrong_shape = json!({"lists": {"all": {"ranges": "all", "timeline_limit": 5}}});
    server.post(PATH, Some(&alice.access_token), wrong_shape).await.assert_error(400, "M_BAD_JSON");
    server
        .request_raw(reqwest::Method::POST, PATH, Some(&alice.access_token), b"{not json".to_vec())
        .await
        .assert_error(400, "M_NOT_JSON");
    server.post(PATH, None, body).await.assert_error(401, "M_MISSING_TOKEN");
}

async fn extensions(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    let body = json!({
        "lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 1}},
        "extensions": {
            "to_device": {"enabled": true}, "e2ee": {"enabled": true}, "account_data": {"enabled": true},
            "receipts": {"enabled": true}, "typing": {"enabled": true},
        },
    });
    let first = sliding(&server, &alice, None, 0, body.clone()).await;
    let ext = &first["extensions"];
    assert!(ext["to_device"]["next_batch"].is_string(), "{first}");
    assert!(ext["e2ee"]["device_unused_fallback_key_types"].is_array(), "{first}");
    // The default push rules stand in until the user changes them.
    assert!(ext["account_data"]["global"].as_array().unwrap().iter().any(|e| e["type"] == "m.push_rules"));
    let pos = first["pos"].as_str().unwrap().to_owned();
    let to_device_since = ext["to_device"]["next_batch"].as_str().unwrap().to_owned();

    // Bob joins (a device list change for Alice), reads, types, sends to her device; Alice
    // sets account data.
    server.join(&bob, &room).await.assert_ok();
    let message = server.send_text(&bob, &room, "hi").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&message));
    server.post(&path, Some(&bob.access_token), json!({})).await.assert_ok();
    let path = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id));
    server.put(&path, Some(&bob.access_token), json!({"typing": true, "timeout": 30000})).await.assert_ok();
    let path = "/_matrix/client/v3/sendToDevice/org.example.ping/txn1";
    let messages = json!({"messages": {alice.user_id.clone(): {alice.device_id.clone(): {"ping": 1}}}});
    server.put(path, Some(&bob.access_token), messages).await.assert_ok();
    let path = format!("/_matrix/client/v3/user/{}/account_data/org.example.setting", enc(&alice.user_id));
    server.put(&path, Some(&alice.access_token), json!({"on": true})).await.assert_ok();

    let mut next_body = body.clone();
    next_body["extensions"]["to_device"]["since"] = json!(to_device_since);
    let next = sliding(&server, &alice, Some(&pos), 0, next_body).await;
    let ext = &next["extensions"];
    let to_device = ext["to_device"]["events"].as_array().unwrap();
    assert_eq!(to_device.len(), 1, "{next}");
    assert_eq!(to_device[0]["type"], "org.example.ping");
    assert_eq!(to_device[0]["sender"], bob.user_id.as_str());
    assert!(ext["e2ee"]["device_lists"]["changed"].as_array().unwrap().contains(&json!(bob.user_id)), "{next}");
    let global = ext["account_data"]["global"].as_array().unwrap();
    assert!(global.iter().any(|e| e["type"] == "org.example.setting" && e["content"]["on"] == true), "{next}");
    let receipt = &ext["receipts"]["rooms"][&room];
    assert_eq!(receipt["type"], "m.receipt");
    assert!(receipt["content"][&message]["m.read"][&bob.user_id]["ts"].is_u64(), "{next}");
    let typing = &ext["typing"]["rooms"][&room];
    assert_eq!(typing["content"]["user_ids"], json!([bob.user_id]), "{next}");

    // Acknowledged to-device messages are not sent again.
    let mut last_body = body;
    last_body["extensions"]["to_device"]["since"] = ext["to_device"]["next_batch"].clone();
    let last = sliding(&server, &alice, next["pos"].as_str(), 0, last_body).await;
    assert!(last["extensions"]["to_device"]["events"].as_array().is_none_or(|e| e.is_empty()), "{last}");
    // A bad to-device token is refused.
    let bad = json!({"extensions": {"to_device": {"enabled": true, "since": "yesterday"}}});
    server.post(PATH, Some(&alice.access_token), bad).await.assert_error(400, "M_INVALID_PARAM");
}
