//! Rooms across two real Obmin processes federating over TLS on loopback: joins and invites
//! both ways (make_join / send_join, invite v2, make_leave / send_leave), messages both ways
//! through the persistent send queue and `/send`, identical state after changes, forged
//! events refused, and a stopped peer catching up in order after its restart.

use std::time::{Duration, Instant};

use conformance::{
    Backend, Server, User, backend_tests,
    client::{bodies, state_event_id},
    enc,
    federated::{JoinedPair, federating, federation_get, federation_post, send_transaction},
    wait::eventually,
};
use federation::{
    SigningKey,
    pdu::{NewEvent, sign_new_event},
};
use ruma::{EventId, MilliSecondsSinceUnixEpoch, RoomId, RoomVersionId, ServerName, UserId};
use serde_json::{Value, json};

async fn join_public_room_and_talk_both_ways(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat", "name": "Across"})).await;
    a.send_text(&alice, &room_id, "before bob").await.assert_ok();

    // Bob joins A's room from B: make_join / send_join through A.
    let joined = b.join_via(&bob, &room_id, &a.server_name).await;
    assert_eq!(joined.assert_ok()["room_id"], room_id.as_str());
    // B now has the room's state: the name, Alice's and Bob's memberships.
    let name =
        b.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room_id)), Some(&bob.access_token)).await;
    assert_eq!(name.assert_ok()["name"], "Across");
    // A learnt the join through send_join.
    eventually("bob's join on A", || async {
        let resp = a
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id)), Some(&alice.access_token))
            .await;
        resp.assert_ok()["joined"].get(&bob.user_id).is_some()
    })
    .await;

    // Messages both ways.
    a.send_text(&alice, &room_id, "hello from A").await.assert_ok();
    let seen = b
        .wait_for_timeline(&bob, &room_id, "alice's message", |events| {
            bodies(events).contains(&"hello from A".to_owned())
        })
        .await;
    let from_a = seen.iter().find(|e| e["content"]["body"] == "hello from A").unwrap();
    assert_eq!(from_a["sender"], alice.user_id.as_str());
    b.send_text(&bob, &room_id, "hello from B").await.assert_ok();
    a.wait_for_timeline(&alice, &room_id, "bob's message", |events| {
        bodies(events).contains(&"hello from B".to_owned())
    })
    .await;

    // A name and topic change on A, then the same state on both servers.
    a.put_state(&alice, &room_id, "m.room.topic", "", json!({"topic": "federated"})).await.assert_ok();
    a.put_state(&alice, &room_id, "m.room.name", "", json!({"name": "Renamed"})).await.assert_ok();
    eventually("the same state on both servers", || async {
        a.room_state(&alice, &room_id).await == b.room_state(&bob, &room_id).await
    })
    .await;

    // Bob leaves from B: A sees it.
    b.membership(&bob, &room_id, "leave", None).await.assert_ok();
    eventually("bob's leave on A", || async {
        let resp = a
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id)), Some(&alice.access_token))
            .await;
        resp.assert_ok()["joined"].get(&bob.user_id).is_none()
    })
    .await;
}

async fn invites_both_ways_power_levels_and_kick(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let carol = b.register("carol", "password-carol-1").await;

    // Alice (A) invites Bob (B) to a private room; Bob sees the invite and joins.
    let room_id = a
        .create_room(&alice, json!({"preset": "private_chat", "name": "Private across", "invite": [bob.user_id]}))
        .await;
    eventually("the invite in bob's sync", || async {
        let body = b.sync(&bob, None, 0, None).await;
        body["rooms"]["invite"].get(&room_id).is_some()
    })
    .await;
    // The invite shows what A told B about the room.
    let body = b.sync(&bob, None, 0, None).await;
    let invite_state = body["rooms"]["invite"][&room_id]["invite_state"]["events"].as_array().unwrap().clone();
    assert!(
        invite_state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Private across"),
        "{invite_state:?}"
    );
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str()));
    // Without an invite Carol cannot join the private room.
    let refused = b.join_via(&carol, &room_id, &a.server_name).await;
    assert_eq!(refused.status.as_u16(), 403, "{}", refused.body);
    b.join(&bob, &room_id).await.assert_ok();

    // Alice raises Bob to 50 and Bob may then set the topic; both servers agree on the state.
    let pl = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room_id)),
            Some(&alice.access_token),
        )
        .await;
    let mut pl = pl.assert_ok().clone();
    pl["users"][&bob.user_id] = json!(50);
    pl["users"][&carol.user_id] = json!(0);
    a.put_state(&alice, &room_id, "m.room.power_levels", "", pl).await.assert_ok();
    eventually("the power levels on B", || async {
        let resp = b
            .get(
                &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room_id)),
                Some(&bob.access_token),
            )
            .await;
        resp.assert_ok()["users"][&bob.user_id] == 50
    })
    .await;
    b.put_state(&bob, &room_id, "m.room.topic", "", json!({"topic": "set by bob"})).await.assert_ok();
    eventually("bob's topic on A", || async {
        let resp = a
            .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room_id)), Some(&alice.access_token))
            .await;
        resp.status == 200 && resp.body["topic"] == "set by bob"
    })
    .await;

    // Alice kicks Bob: B learns it through /send (A sends membership changes to the target's
    // server too).
    a.post(
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room_id)),
        Some(&alice.access_token),
        json!({"user_id": bob.user_id, "reason": "bye"}),
    )
    .await
    .assert_ok();
    eventually("the kick on B", || async {
        let body = b.sync(&bob, None, 0, Some(json!({"room": {"include_leave": true}}))).await;
        body["rooms"]["leave"].get(&room_id).is_some()
    })
    .await;
    // Bob is out, B has no member left: the same state as A up to then.
    let on_a = a.room_state(&alice, &room_id).await;
    let kick = state_event_id(&on_a, "m.room.member", &bob.user_id);
    let on_b = b
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(&kick)), Some(&bob.access_token))
        .await;
    assert_eq!(on_b.assert_ok()["content"]["membership"], "leave");

    // The other way: Carol (B) creates a room and invites Alice (A), who joins through B and
    // talks.
    let room2 = b.create_room(&carol, json!({"preset": "private_chat", "invite": [alice.user_id]})).await;
    eventually("the invite in alice's sync", || async {
        let body = a.sync(&alice, None, 0, None).await;
        body["rooms"]["invite"].get(&room2).is_some()
    })
    .await;
    a.join(&alice, &room2).await.assert_ok();
    a.send_text(&alice, &room2, "thanks carol").await.assert_ok();
    b.wait_for_timeline(&carol, &room2, "alice's message", |events| {
        bodies(events).contains(&"thanks carol".to_owned())
    })
    .await;

    // An invite rejected from the invitee's server goes through make_leave / send_leave.
    let room3 = a.create_room(&alice, json!({"preset": "private_chat", "invite": [carol.user_id]})).await;
    eventually("the invite in carol's sync", || async {
        let body = b.sync(&carol, None, 0, None).await;
        body["rooms"]["invite"].get(&room3).is_some()
    })
    .await;
    b.membership(&carol, &room3, "leave", None).await.assert_ok();
    let member = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room3), enc(&carol.user_id)),
            Some(&alice.access_token),
        )
        .await;
    assert_eq!(member.assert_ok()["membership"], "leave");
}

async fn forged_events_are_refused(backend: Backend) {
    let JoinedPair { a, b, alice, bob, room_id } = JoinedPair::start(backend).await;

    // A message from Bob built by hand on the room's current state, as B would build it.
    let state = a.room_state(&alice, &room_id).await;
    let id_of = |t: &str, k: &str| EventId::parse(state_event_id(&state, t, k)).unwrap();
    let member = id_of("m.room.member", &bob.user_id);
    let event = |body: &str| NewEvent {
        room_id: Some(RoomId::parse(&room_id).unwrap()),
        sender: UserId::parse(&bob.user_id).unwrap(),
        event_type: "m.room.message".into(),
        state_key: None,
        content: json!({"msgtype": "m.text", "body": body}),
        redacts: None,
        prev_events: vec![member.clone()],
        auth_events: vec![id_of("m.room.power_levels", ""), member.clone()],
        depth: 100,
        origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
    };
    let b_name = ServerName::parse(&b.server_name).unwrap();
    let real = b.signing_key();
    let forger = SigningKey::parse(&format!(
        "ed25519 {} AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        real.key_id().trim_start_matches("ed25519:")
    ))
    .unwrap();
    let (forged_id, forged) = sign_new_event(event("forged"), &RoomVersionId::V12, &b_name, &forger).unwrap();
    let (genuine_id, genuine) = sign_new_event(event("genuine"), &RoomVersionId::V12, &b_name, &real).unwrap();

    // The transaction itself is properly signed by B; the forged PDU inside is refused.
    let (status, body) = send_transaction(&a, &b, "forged-1", vec![serde_json::to_value(&forged).unwrap()]).await;
    assert_eq!(status, 200, "{body}");
    let result = &body["pdus"][forged_id.as_str()];
    assert!(result["error"].is_string(), "the forged event is refused: {body}");
    let fetched = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(forged_id.as_str())),
            Some(&alice.access_token),
        )
        .await;
    fetched.assert_error(404, "M_NOT_FOUND");

    // The same event with B's real signature is taken in and reaches Alice.
    let (status, body) = send_transaction(&a, &b, "genuine-1", vec![serde_json::to_value(&genuine).unwrap()]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["pdus"][genuine_id.as_str()].get("error").is_none(), "{body}");
    let fetched = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room_id), enc(genuine_id.as_str())),
            Some(&alice.access_token),
        )
        .await;
    assert_eq!(fetched.assert_ok()["content"]["body"], "genuine");
    // A retried transaction id gets the first answer again.
    let (status, again) = send_transaction(&a, &b, "forged-1", vec![]).await;
    assert_eq!(status, 200);
    assert!(again["pdus"][forged_id.as_str()]["error"].is_string(), "{again}");

    // An event its auth events do not allow (Bob may not change power levels) is refused.
    let mut bad = event("x");
    bad.event_type = "m.room.power_levels".into();
    bad.state_key = Some(String::new());
    bad.content = json!({"users": {(bob.user_id.as_str()): 100}});
    let (bad_id, bad) = sign_new_event(bad, &RoomVersionId::V12, &b_name, &real).unwrap();
    let (_, body) = send_transaction(&a, &b, "unauthorized-1", vec![serde_json::to_value(&bad).unwrap()]).await;
    assert!(body["pdus"][bad_id.as_str()]["error"].is_string(), "{body}");
    let pl = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room_id)),
            Some(&alice.access_token),
        )
        .await;
    assert!(pl.assert_ok()["users"].get(&bob.user_id).is_none());
}

async fn stopped_peer_catches_up_in_order(backend: Backend) {
    let JoinedPair { a, mut b, alice, bob, room_id } = JoinedPair::start(backend).await;
    a.send_text(&alice, &room_id, "m-before").await.assert_ok();
    b.wait_for_timeline(&bob, &room_id, "the first message", |e| bodies(e).contains(&"m-before".to_owned())).await;

    // B goes away; Alice keeps talking; A queues everything for B.
    let since = b.sync(&bob, None, 0, None).await["next_batch"].as_str().map(str::to_owned);
    assert!(b.terminate().await, "clean shutdown");
    let sent: Vec<String> = (0..60).map(|i| format!("m-{i:02}")).collect();
    for body in &sent {
        a.send_text(&alice, &room_id, body).await.assert_ok();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // B comes back on the same data and port and receives all of it, in order.
    b.restart().await;
    let seen = b
        .wait_for_timeline_since(&bob, &room_id, since, "every queued message", |events| {
            bodies(events).iter().filter(|b| b.starts_with("m-") && *b != "m-before").count() >= sent.len()
        })
        .await;
    let got: Vec<String> = bodies(&seen).into_iter().filter(|b| b.starts_with("m-") && b != "m-before").collect();
    assert_eq!(got, sent, "all messages, once each, in order");
}

/// B is killed (SIGKILL) while A's transactions are arriving, and restarted: every message
/// A acknowledged to Alice reaches B once, in order, whatever B had taken in of the
/// transaction it was in the middle of.
async fn a_peer_killed_mid_transaction_loses_nothing(backend: Backend) {
    let JoinedPair { a, mut b, alice, bob, room_id } = JoinedPair::start(backend).await;
    a.send_text(&alice, &room_id, "m-before").await.assert_ok();
    b.wait_for_timeline(&bob, &room_id, "the first message", |e| bodies(e).contains(&"m-before".to_owned())).await;
    let since = b.sync(&bob, None, 0, None).await["next_batch"].as_str().map(str::to_owned);

    let sent: Vec<String> = (0..80).map(|i| format!("m-{i:02}")).collect();
    let sender = {
        let (http, base, token, room, sent) =
            (a.http.clone(), a.base_url.clone(), alice.access_token.clone(), room_id.clone(), sent.clone());
        tokio::spawn(async move {
            for body in sent {
                let url = format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{body}", enc(&room));
                let response =
                    http.put(url).bearer_auth(&token).json(&json!({"msgtype": "m.text", "body": body})).send().await;
                assert!(response.is_ok_and(|r| r.status().is_success()), "A acknowledged {body}");
            }
        })
    };
    // Kill B once it has taken in some of the stream, then bring it back.
    b.wait_for_timeline_since(&bob, &room_id, since.clone(), "the first messages", |e| {
        bodies(e).iter().filter(|b| b.starts_with("m-") && *b != "m-before").count() >= 5
    })
    .await;
    b.kill();
    sender.await.unwrap();
    b.restart().await;
    let seen = b
        .wait_for_timeline_since(&bob, &room_id, since, "every message", |events| {
            bodies(events).iter().filter(|b| b.starts_with("m-") && *b != "m-before").count() >= sent.len()
        })
        .await;
    let got: Vec<String> = bodies(&seen).into_iter().filter(|b| b.starts_with("m-") && b != "m-before").collect();
    assert_eq!(got, sent, "all messages, once each, in order");
}

async fn concurrent_state_changes_converge(backend: Backend) {
    let a = federating(backend).await;
    let mut b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a
        .create_room(
            &alice,
            json!({"preset": "public_chat", "power_level_content_override": {"users": {(bob.user_id.as_str()): 50}}}),
        )
        .await;
    b.join_via(&bob, &room_id, &a.server_name).await.assert_ok();

    // While B is down Alice sets the topic; right after B is back Bob sets it too, before
    // A's retry brings Alice's: two branches, each server receiving the other's change last.
    assert!(b.terminate().await, "clean shutdown");
    a.put_state(&alice, &room_id, "m.room.topic", "", json!({"topic": "alice's"})).await.assert_ok();
    b.restart().await;
    b.put_state(&bob, &room_id, "m.room.topic", "", json!({"topic": "bob's"})).await.assert_ok();
    // Without state resolution each server would keep the change it received last.
    eventually("the same state on both servers", || async {
        let on_a = a.room_state(&alice, &room_id).await;
        let on_b = b.room_state(&bob, &room_id).await;
        on_a == on_b
    })
    .await;
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room_id));
    let on_a = a.get(&path, Some(&alice.access_token)).await.assert_ok()["topic"].clone();
    let on_b = b.get(&path, Some(&bob.access_token)).await.assert_ok()["topic"].clone();
    assert_eq!(on_a, on_b);
    // Both messages of the graph still reach both timelines afterwards.
    b.send_text(&bob, &room_id, "after the merge").await.assert_ok();
    a.wait_for_timeline(&alice, &room_id, "a message after the merge", |events| {
        bodies(events).contains(&"after the merge".to_owned())
    })
    .await;
}

/// `/get_missing_events`, which a server (Synapse among them) asks before it accepts an event
/// whose `prev_events` it lacks: the events between what it has and the new one, oldest first.
async fn missing_events_are_served(backend: Backend) {
    let JoinedPair { a, b, alice, room_id, .. } = JoinedPair::start(backend).await;
    let c = federating(backend).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let sent = a.send_text(&alice, &room_id, &format!("gap-{i}")).await;
        ids.push(sent.assert_ok()["event_id"].as_str().unwrap().to_owned());
    }
    let path = format!("/_matrix/federation/v1/get_missing_events/{}", enc(&room_id));
    let ask = |earliest: &str, latest: &str, limit: u64| json!({"earliest_events": [earliest], "latest_events": [latest], "limit": limit});
    let got = |body: &Value| -> Vec<String> {
        body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["content"]["body"].as_str().unwrap_or("").to_owned())
            .collect()
    };

    // Everything after the earliest and before the latest, oldest first.
    let (status, body) = federation_post(&a, &b, &path, &ask(&ids[0], &ids[4], 10)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(got(&body), ["gap-1", "gap-2", "gap-3"], "{body}");
    // A limit keeps the events nearest the latest.
    let (status, body) = federation_post(&a, &b, &path, &ask(&ids[0], &ids[4], 2)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(got(&body), ["gap-2", "gap-3"], "{body}");
    // min_depth leaves out what lies below it.
    let depth_of_2 = federation_get(&a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&ids[2]))).await.1["pdus"]
        [0]["depth"]
        .as_u64()
        .unwrap();
    let mut request = ask(&ids[0], &ids[4], 10);
    request["min_depth"] = json!(depth_of_2);
    let (status, body) = federation_post(&a, &b, &path, &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(got(&body), ["gap-2", "gap-3"], "{body}");
    // Unknown latest events give nothing; a server without users in the room may not ask.
    let (status, body) = federation_post(&a, &b, &path, &ask(&ids[0], "$unknown", 10)).await;
    assert_eq!((status, got(&body).len()), (200, 0), "{body}");
    let (status, body) = federation_post(&a, &c, &path, &ask(&ids[0], &ids[4], 10)).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
}

/// An event whose gap to what we hold is longer than one `get_missing_events` answer (as when
/// Synapse catches a peer up after a long outage with only the newest event of each room): the
/// receiving server asks again until the gap is closed, and shows every event in order.
async fn a_long_gap_is_filled_in_several_requests(backend: Backend) {
    let JoinedPair { a, b, alice, bob, room_id } = JoinedPair::start(backend).await;
    let c = federating(backend).await;
    let carol = c.register("carol", "password-carol-1").await;
    c.join_via(&carol, &room_id, &a.server_name).await.assert_ok();
    eventually("carol's join on B", || async {
        let resp = b
            .get(
                &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room_id), enc(&carol.user_id)),
                Some(&bob.access_token),
            )
            .await;
        resp.status == 200 && resp.body["membership"] == "join"
    })
    .await;

    // 45 messages of Carol's, built by hand on C's key, reach A only: B hears nothing of them.
    let state = a.room_state(&alice, &room_id).await;
    let id_of = |t: &str, k: &str| EventId::parse(state_event_id(&state, t, k)).unwrap();
    let auth_events = vec![id_of("m.room.power_levels", ""), id_of("m.room.member", &carol.user_id)];
    let newest = a
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room_id)), Some(&alice.access_token))
        .await;
    let mut prev = EventId::parse(newest.assert_ok()["chunk"][0]["event_id"].as_str().unwrap()).unwrap();
    let (c_name, c_key) = (ServerName::parse(&c.server_name).unwrap(), c.signing_key());
    let sent: Vec<String> = (0..45).map(|i| format!("gap-{i:02}")).collect();
    let mut pdus = Vec::new();
    for (i, body) in sent.iter().enumerate() {
        let event = NewEvent {
            room_id: Some(RoomId::parse(&room_id).unwrap()),
            sender: UserId::parse(&carol.user_id).unwrap(),
            event_type: "m.room.message".into(),
            state_key: None,
            content: json!({"msgtype": "m.text", "body": body}),
            redacts: None,
            prev_events: vec![prev.clone()],
            auth_events: auth_events.clone(),
            depth: 1000 + i as u64,
            origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
        };
        let (id, pdu) = sign_new_event(event, &RoomVersionId::V12, &c_name, &c_key).unwrap();
        pdus.push(serde_json::to_value(&pdu).unwrap());
        prev = id;
    }
    let (status, body) = send_transaction(&a, &c, "gap-all", pdus.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["pdus"].as_object().unwrap().values().all(|r| r.get("error").is_none()), "{body}");

    // B gets only the newest, relayed by A; the 44 before it are more than one answer holds.
    let (status, body) = send_transaction(&b, &a, "gap-newest", vec![pdus.last().unwrap().clone()]).await;
    assert_eq!(status, 200, "{body}");
    let resp = b
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&room_id)), Some(&bob.access_token))
        .await;
    let mut chunk: Vec<Value> = resp.assert_ok()["chunk"].as_array().unwrap().clone();
    chunk.reverse();
    let got: Vec<String> = bodies(&chunk).into_iter().filter(|b| b.starts_with("gap-")).collect();
    assert_eq!(got, sent, "every event of the gap, in order");
}

async fn history_before_the_join_and_server_acls(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let c = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat", "name": "History"})).await;
    let old: Vec<String> = (0..5).map(|i| format!("old-{i}")).collect();
    let mut old_ids = Vec::new();
    for body in &old {
        old_ids.push(a.send_text(&alice, &room_id, body).await.assert_ok()["event_id"].as_str().unwrap().to_owned());
    }
    b.join_via(&bob, &room_id, &a.server_name).await.assert_ok();

    // Bob reads what was said before he joined, in order, from B (backfilled at the join).
    let resp = b
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room_id)), Some(&bob.access_token))
        .await;
    let mut chunk: Vec<Value> = resp.assert_ok()["chunk"].as_array().unwrap().clone();
    chunk.reverse();
    let got: Vec<String> = bodies(&chunk).into_iter().filter(|b| b.starts_with("old-")).collect();
    assert_eq!(got, old, "history before the join: {chunk:?}");
    // And the state is the room's: the name, both members joined.
    let name =
        b.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room_id)), Some(&bob.access_token)).await;
    assert_eq!(name.assert_ok()["name"], "History");

    // The history endpoints, for a server with a user in the room.
    let (status, body) = federation_get(&a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&old_ids[2]))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pdus"][0]["content"]["body"], "old-2");
    let (status, body) = federation_get(
        &a,
        &b,
        &format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room_id), enc(&old_ids[2])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["pdu_ids"].as_array().unwrap().len() >= 5, "{body}");
    assert!(!body["auth_chain_ids"].as_array().unwrap().is_empty(), "{body}");
    let (status, body) =
        federation_get(&a, &b, &format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room_id), enc(&old_ids[2])))
            .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["auth_chain"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"), "{body}");
    let (status, body) = federation_get(
        &a,
        &b,
        &format!("/_matrix/federation/v1/backfill/{}?v={}&limit=3", enc(&room_id), enc(&old_ids[4])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let pdus: Vec<&str> =
        body["pdus"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(pdus, ["old-4", "old-3", "old-2"], "{body}");
    // A server without users in the room may not read it.
    let (status, body) = federation_get(&a, &c, &format!("/_matrix/federation/v1/event/{}", enc(&old_ids[2]))).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");

    // A server ACL denying B: B's requests and events are refused from then on.
    a.put_state(
        &alice,
        &room_id,
        "m.room.server_acl",
        "",
        json!({"allow": ["*"], "deny": ["localhost"], "allow_ip_literals": false}),
    )
    .await
    .assert_ok();
    let (status, body) = federation_get(&a, &b, &format!("/_matrix/federation/v1/event/{}", enc(&old_ids[2]))).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    let denied = b.send_text(&bob, &room_id, "denied").await;
    denied.assert_ok();
    a.send_text(&alice, &room_id, "still talking").await.assert_ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = a
        .wait_for_timeline(&alice, &room_id, "alice's own message", |events| {
            bodies(events).contains(&"still talking".to_owned())
        })
        .await;
    assert!(!bodies(&seen).contains(&"denied".to_owned()), "an ACL-denied server's event was taken: {seen:?}");
}

/// Syncs until an ephemeral event of `kind` in the room satisfies `done` (or panics after 40 s).
async fn wait_for_ephemeral(server: &Server, user: &User, room_id: &str, kind: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut since: Option<String> = None;
    loop {
        let body = server.sync(user, since.as_deref(), 1000, None).await;
        since = body["next_batch"].as_str().map(str::to_owned);
        let found = body["rooms"]["join"][room_id]["ephemeral"]["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["type"] == kind && done(e)));
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "no {kind} on {}", server.server_name);
    }
}

async fn typing_receipts_and_presence_across_servers(backend: Backend) {
    let JoinedPair { a, b, alice, bob, room_id } = JoinedPair::start(backend).await;

    // Bob types on B; Alice sees it on A.
    b.put(
        &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc(&bob.user_id)),
        Some(&bob.access_token),
        json!({"typing": true, "timeout": 20000}),
    )
    .await
    .assert_ok();
    wait_for_ephemeral(&a, &alice, &room_id, "m.typing", |e| {
        e["content"]["user_ids"].as_array().is_some_and(|u| u.iter().any(|u| u == bob.user_id.as_str()))
    })
    .await;

    // Bob's message, read by Alice on A: B shows Alice's receipt.
    let event_id = b.send_text(&bob, &room_id, "read me").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    a.wait_for_timeline(&alice, &room_id, "bob's message", |e| bodies(e).contains(&"read me".to_owned())).await;
    a.post(
        &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room_id), enc(&event_id)),
        Some(&alice.access_token),
        json!({}),
    )
    .await
    .assert_ok();
    wait_for_ephemeral(&b, &bob, &room_id, "m.receipt", |e| {
        e["content"][&event_id]["m.read"].get(&alice.user_id).is_some()
    })
    .await;

    // Bob's presence with a status message reaches A.
    b.put(
        &format!("/_matrix/client/v3/presence/{}/status", enc(&bob.user_id)),
        Some(&bob.access_token),
        json!({"presence": "unavailable", "status_msg": "at lunch"}),
    )
    .await
    .assert_ok();
    eventually("bob's presence on A", || async {
        let resp = a
            .get(&format!("/_matrix/client/v3/presence/{}/status", enc(&bob.user_id)), Some(&alice.access_token))
            .await;
        resp.status == 200 && resp.body["presence"] == "unavailable" && resp.body["status_msg"] == "at lunch"
    })
    .await;
}

async fn to_device_and_device_lists_across_servers(backend: Backend) {
    let JoinedPair { a, b, alice, bob, .. } = JoinedPair::start(backend).await;
    let since = a.sync(&alice, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    // Bob uploads device keys on B: A's sync lists him in device_lists.changed.
    let (device, _) = super::federation::device_and_one_time_keys(&bob);
    b.post("/_matrix/client/v3/keys/upload", Some(&bob.access_token), json!({"device_keys": device})).await.assert_ok();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut token = since;
    loop {
        let body = a.sync(&alice, Some(&token), 1000, None).await;
        token = body["next_batch"].as_str().unwrap().to_owned();
        if body["device_lists"]["changed"].as_array().is_some_and(|c| c.iter().any(|u| u == bob.user_id.as_str())) {
            break;
        }
        assert!(Instant::now() < deadline, "bob's device change never reached A");
    }

    // Alice sends a to-device message to Bob's device on B.
    a.put(
        "/_matrix/client/v3/sendToDevice/m.test.ping/txn-1",
        Some(&alice.access_token),
        json!({"messages": {(bob.user_id.as_str()): {(bob.device_id.as_str()): {"hello": "bob"}}}}),
    )
    .await
    .assert_ok();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut since: Option<String> = None;
    loop {
        let body = b.sync(&bob, since.as_deref(), 1000, None).await;
        since = body["next_batch"].as_str().map(str::to_owned);
        let events = body["to_device"]["events"].as_array().cloned().unwrap_or_default();
        if let Some(event) = events.iter().find(|e| e["type"] == "m.test.ping") {
            assert_eq!(event["sender"], alice.user_id.as_str());
            assert_eq!(event["content"]["hello"], "bob");
            break;
        }
        assert!(Instant::now() < deadline, "the to-device message never reached B");
    }
}

backend_tests!(
    to_device_and_device_lists_across_servers,
    typing_receipts_and_presence_across_servers,
    history_before_the_join_and_server_acls,
    concurrent_state_changes_converge,
    join_public_room_and_talk_both_ways,
    invites_both_ways_power_levels_and_kick,
    forged_events_are_refused,
    stopped_peer_catches_up_in_order,
    messages_backfill_older_history_on_demand,
    missing_events_are_served,
    a_long_gap_is_filled_in_several_requests,
    a_peer_killed_mid_transaction_loses_nothing
);

/// `/messages` past the 50 events fetched at the join: the older history comes from the
/// room's server on demand (`/backfill`), in order, down to the room's creation; syncs never
/// show it as new.
async fn messages_backfill_older_history_on_demand(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat", "name": "Long history"})).await;
    let old: Vec<String> = (0..130).map(|i| format!("old-{i}")).collect();
    for body in &old {
        a.send_text(&alice, &room_id, body).await.assert_ok();
    }
    b.join_via(&bob, &room_id, &a.server_name).await.assert_ok();
    let since = b.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    // Bob pages back from the newest event until the room's beginning.
    let mut seen: Vec<Value> = Vec::new();
    let mut from: Option<String> = None;
    let mut ended = false;
    for _ in 0..20 {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=40", enc(&room_id));
        if let Some(from) = &from {
            path.push_str(&format!("&from={}", enc(from)));
        }
        let page = b.get(&path, Some(&bob.access_token)).await;
        let body = page.assert_ok();
        seen.extend(body["chunk"].as_array().unwrap().iter().cloned());
        match body["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "pagination ended");
    seen.reverse();
    let got: Vec<String> = bodies(&seen).into_iter().filter(|b| b.starts_with("old-")).collect();
    assert_eq!(got, old, "the whole history, oldest first, no gaps or repeats");
    // The state the join brought (the create event among it) keeps its place at the join in
    // the stream, so it is not first; but pagination reached the room's beginning.
    assert!(seen.iter().any(|e| e["type"] == "m.room.create"), "down to the room's creation");
    let ids: std::collections::HashSet<&str> = seen.iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(ids.len(), seen.len(), "no event twice");

    // Fetching old history is not news: a sync from before it shows none of it.
    let body = b.sync(&bob, Some(&since), 0, None).await;
    let events = body["rooms"]["join"][room_id.as_str()]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    assert!(
        bodies(&events).iter().all(|b| !b.starts_with("old-")),
        "backfilled events in an incremental sync: {events:?}"
    );
    // Events arriving afterwards still reach Bob as usual.
    a.send_text(&alice, &room_id, "new after backfill").await.assert_ok();
    b.wait_for_timeline_since(&bob, &room_id, Some(since), "the new message", |events| {
        bodies(events).contains(&"new after backfill".to_owned())
    })
    .await;
}
