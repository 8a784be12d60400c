//! What other servers may send us, bounded (issue 19, federation input caps): transactions of
//! at most 50 PDUs and 100 EDUs, PDUs of at most 20 `prev_events` and 10 `auth_events`
//! (refused alone, before anything is fetched for them), `get_missing_events` answers of no
//! more than was asked for, presence and to-device messages only from servers that share a
//! room with the user concerned, one transaction at a time per origin, and `/send` answered
//! while PDUs that need events fetched are still being worked on in the background (kept
//! durably: a restart carries on with them).

use std::time::Duration;

use conformance::{
    Backend, Server, User, backend_tests, enc,
    federated::federating,
    hostile::{Draft, Endpoint, HostileServer, Reply},
};
use ruma::RoomVersionId;
use serde_json::{Value, json};

/// A public room of Alice's on `server` that `h`'s `@mallory` joined. Returns (room, Alice).
async fn room_with_mallory(server: &Server, h: &HostileServer) -> (String, User) {
    let alice = server.register("alice", "password-alice-1").await;
    let room_id = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    h.join(server, &room_id, "mallory").await.expect("mallory joins");
    (room_id, alice)
}

async fn on_timeline(server: &Server, user: &User, room_id: &str, event_id: &str) -> bool {
    server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room_id), enc(event_id)), Some(&user.access_token))
        .await
        .status
        == 200
}

/// Waits (bounded, generously) until the event is on the timeline.
async fn wait_on_timeline(server: &Server, user: &User, room_id: &str, event_id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !on_timeline(server, user, room_id, event_id).await {
        if std::time::Instant::now() >= deadline {
            let log = server.log();
            let tail: Vec<&str> =
                log.lines().filter(|l| !l.contains("\"INFO\",\"fields\":{\"message\":\"request\"")).collect();
            panic!(
                "{event_id} never reached the timeline; the server's log ends:\n{}",
                tail[tail.len().saturating_sub(40)..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn typing_edu(room_id: &str, user: &str) -> Value {
    json!({"edu_type": "m.typing", "content": {"room_id": room_id, "user_id": user, "typing": false}})
}

/// 101 EDUs (or 51 PDUs) in one transaction: the transaction is refused, 400 `M_BAD_JSON`.
/// A PDU with 21 `prev_events` or 11 `auth_events` is refused alone, before anything is
/// fetched for it; the other PDUs of its transaction are taken.
async fn oversized_transactions_and_pdus_are_refused(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_mallory(&a, &h).await;
    let mallory = h.user("mallory");

    let edus: Vec<Value> = (0..101).map(|_| typing_edu(&room_id, &mallory)).collect();
    let (status, body) = h.send(&a, Vec::new(), edus).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "101 EDUs: {body}");
    let edus: Vec<Value> = (0..100).map(|_| typing_edu(&room_id, &mallory)).collect();
    let (status, body) = h.send(&a, Vec::new(), edus).await;
    assert_eq!(status, 200, "100 EDUs are allowed: {body}");
    // What we hold: the refused events below stay in the hostile server's view only.
    let heads = h.room(&room_id).extremities.clone();
    let pdus: Vec<Value> = (0..51).map(|i| h.build(&room_id, Draft::message(&mallory, &format!("{i}"))).1).collect();
    let (status, body) = h.send(&a, pdus, Vec::new()).await;
    assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "51 PDUs: {body}");

    let made_up = |n: usize| -> Vec<String> { (0..n).map(|i| format!("$madeup{i}")).collect() };
    let prevs = made_up(21);
    let (too_many_prevs, pdu1) = h.build(
        &room_id,
        Draft::message(&mallory, "21 prev events").prev_events(&prevs.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let auths = made_up(11);
    let (too_many_auths, pdu2) = h.build(
        &room_id,
        Draft::message(&mallory, "11 auth events")
            .prev_events(&heads.iter().map(String::as_str).collect::<Vec<_>>())
            .auth_events(&auths.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let (fine, pdu3) = h.build(
        &room_id,
        Draft::message(&mallory, "fine").prev_events(&heads.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let (status, body) = h.send(&a, vec![pdu1, pdu2, pdu3], Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    let error = |id: &str| body["pdus"][id]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error(&too_many_prevs).contains("prev_events"), "{body}");
    assert!(error(&too_many_auths).contains("auth_events"), "{body}");
    assert!(body["pdus"][&fine].get("error").is_none(), "{body}");
    wait_on_timeline(&a, &alice, &room_id, &fine).await;
    // Nothing was fetched for the refused ones.
    for endpoint in [Endpoint::GetMissingEvents, Endpoint::Event, Endpoint::StateIds] {
        assert!(h.requests(endpoint).is_empty(), "{endpoint:?} was asked: {:?}", h.requests(endpoint));
    }
    assert!(!on_timeline(&a, &alice, &room_id, &too_many_prevs).await);
    assert!(!on_timeline(&a, &alice, &room_id, &too_many_auths).await);
}

/// A `get_missing_events` answer with more events than asked for (25 for 20) is not taken:
/// none of its events reaches the timeline (the state at the missing prev event is asked for
/// instead).
async fn a_missing_events_answer_longer_than_asked_is_dropped(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_mallory(&a, &h).await;
    let mallory = h.user("mallory");
    let hidden: Vec<(String, Value)> =
        (0..25).map(|i| h.build(&room_id, Draft::message(&mallory, &format!("hidden {i}")))).collect();
    let (last, pdu) = h.build(&room_id, Draft::message(&mallory, "after 25 hidden"));
    let events: Vec<Value> = hidden.iter().map(|(_, e)| e.clone()).collect();
    h.on(Endpoint::GetMissingEvents, move |_| Reply::ok(json!({"events": events})));
    let _ = h.send_pdu(&a, &pdu).await;
    // Without the missing events, the state at the missing prev event is asked for next:
    // by then whatever was taken from the answer is on the timeline.
    h.wait_for_requests(Endpoint::StateIds, 1).await;
    assert!(!h.requests(Endpoint::GetMissingEvents).is_empty(), "the missing events were asked for");
    assert!(!on_timeline(&a, &alice, &room_id, &last).await);
    for (id, _) in &hidden {
        assert!(!on_timeline(&a, &alice, &room_id, id).await, "an event of the over-long answer was taken");
    }
}

/// A `/backfill` answer with more events than asked for (the history before our join: 50)
/// is not taken: none of its events reaches the timeline; the join itself goes through.
async fn a_backfill_answer_longer_than_asked_is_dropped(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let room_id = h.create_room(&RoomVersionId::V12, "mallory");
    let mallory = h.user("mallory");
    let history: Vec<(String, Value)> =
        (0..60).map(|i| h.build(&room_id, Draft::message(&mallory, &format!("history {i}")))).collect();
    let events: Vec<Value> = history.iter().rev().map(|(_, e)| e.clone()).collect();
    let origin = h.name.clone();
    h.on(Endpoint::Backfill, move |_| Reply::ok(json!({"origin": origin, "origin_server_ts": 0, "pdus": events})));
    a.post(
        &format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), enc(&h.name)),
        Some(&alice.access_token),
        json!({}),
    )
    .await
    .assert_ok();
    assert!(!h.requests(Endpoint::Backfill).is_empty(), "the history was asked for");
    for (id, _) in &history {
        assert!(!on_timeline(&a, &alice, &room_id, id).await, "an event of the over-long answer was taken");
    }
}

/// Presence and to-device messages from a server that shares no room with the user they
/// concern (its user is only invited) are dropped; once it shares one, they are taken.
async fn presence_and_to_device_need_a_shared_room(backend: Backend) {
    let a = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    let h = HostileServer::start().await;
    let mallory = h.user("mallory");
    a.membership(&alice, &room_id, "invite", Some(&mallory)).await.assert_ok();
    let since = a.sync(&alice, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    let to_device = |id: &str| {
        json!({"edu_type": "m.direct_to_device", "content": {
            "sender": mallory, "type": "org.example.probe", "message_id": id,
            "messages": {(alice.user_id.as_str()): {"*": {"probe": id}}},
        }})
    };
    let presence = |status: &str| {
        json!({"edu_type": "m.presence", "content": {"push": [{
            "user_id": mallory, "presence": "online", "status_msg": status, "last_active_ago": 0, "currently_active": true,
        }]}})
    };
    let (status, body) = h.send(&a, Vec::new(), vec![to_device("stranger"), presence("stranger")]).await;
    assert_eq!(status, 200, "{body}");

    h.join(&a, &room_id, "mallory").await.expect("mallory joins");
    let resp = a.get(&format!("/_matrix/client/v3/presence/{}/status", enc(&mallory)), Some(&alice.access_token)).await;
    assert_ne!(resp.body["status_msg"], "stranger", "presence from a stranger was kept: {}", resp.body);
    let (status, body) = h.send(&a, Vec::new(), vec![to_device("member"), presence("member")]).await;
    assert_eq!(status, 200, "{body}");
    let sync = a.sync(&alice, Some(&since), 0, None).await;
    let probes: Vec<&str> = sync["to_device"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["probe"].as_str())
        .collect();
    assert_eq!(probes, vec!["member"], "only the room-mate's to-device message: {sync}");
    let resp = a.get(&format!("/_matrix/client/v3/presence/{}/status", enc(&mallory)), Some(&alice.access_token)).await;
    assert_eq!(resp.body["status_msg"], "member", "a room-mate's presence is kept: {}", resp.body);
}

/// One transaction at a time per origin: while one of `h`'s transactions is being worked on
/// (held up by fetching another server's key for a PDU it relays), a second one from `h`
/// waits its turn and, as the first does not end, is answered 429 `M_LIMIT_EXCEEDED`;
/// another origin is served meanwhile; afterwards `h` is served again.
async fn one_transaction_at_a_time_per_origin(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, _alice) = room_with_mallory(&a, &h).await;
    let slow = HostileServer::start_named("127.0.0.1").await;
    let other = HostileServer::start().await;
    // An event of `slow`'s, a server we never heard of: checking its signature needs its key.
    let heads = h.room(&room_id).extremities.clone();
    let (_, relayed) = slow.sign(
        &RoomVersionId::V12,
        json!({
            "room_id": room_id, "sender": slow.user("eve"), "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": "relayed"}, "prev_events": heads, "auth_events": [],
            "depth": 100, "origin_server_ts": 1,
        }),
    );
    slow.hold(Endpoint::Keys);
    let first = h.send(&a, vec![relayed], Vec::new());
    let meanwhile = async {
        slow.wait_for_requests(Endpoint::Keys, 1).await;
        let second = h.send(&a, Vec::new(), vec![typing_edu(&room_id, &h.user("mallory"))]).await;
        let other = other.send(&a, Vec::new(), Vec::new()).await;
        slow.release(Endpoint::Keys);
        (second, other)
    };
    let ((status, body), ((second, second_body), (other, other_body))) = tokio::join!(first, meanwhile);
    assert_eq!(
        (second, second_body["errcode"].as_str()),
        (429, Some("M_LIMIT_EXCEEDED")),
        "a second transaction: {second_body}"
    );
    assert_eq!(other, 200, "another origin is served meanwhile: {other_body}");
    assert_eq!(status, 200, "{body}");
    let (status, body) = h.send(&a, Vec::new(), vec![typing_edu(&room_id, &h.user("mallory"))]).await;
    assert_eq!(status, 200, "served again afterwards: {body}");
}

/// `/send` answers while a PDU's missing events are still being fetched (the peer is slow to
/// answer `get_missing_events`); the PDU reaches the timeline once they come.
async fn send_answers_before_missing_events_are_fetched(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_mallory(&a, &h).await;
    let mallory = h.user("mallory");
    let (hidden, hidden_pdu) = h.build(&room_id, Draft::message(&mallory, "not sent"));
    let (last, pdu) = h.build(&room_id, Draft::message(&mallory, "needs the one before"));
    h.on(Endpoint::GetMissingEvents, move |_| Reply::ok(json!({"events": [hidden_pdu]})));
    h.hold(Endpoint::GetMissingEvents);
    // Well before our side gives up on the held request (60 s): the answer must not wait for it.
    let answer = tokio::time::timeout(Duration::from_secs(40), h.send_pdu(&a, &pdu))
        .await
        .expect("/send waited for the missing events");
    assert!(answer.is_ok(), "{answer:?}");
    assert!(!on_timeline(&a, &alice, &room_id, &last).await, "not before its missing event");
    h.release(Endpoint::GetMissingEvents);
    wait_on_timeline(&a, &alice, &room_id, &hidden).await;
    wait_on_timeline(&a, &alice, &room_id, &last).await;
}

/// A PDU acknowledged while its missing events were still to be fetched survives a `kill -9`:
/// the restarted server carries on with it.
async fn queued_pdus_survive_a_kill(backend: Backend) {
    let mut a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_mallory(&a, &h).await;
    let mallory = h.user("mallory");
    let (hidden, hidden_pdu) = h.build(&room_id, Draft::message(&mallory, "not sent"));
    let (last, pdu) = h.build(&room_id, Draft::message(&mallory, "acknowledged, then killed"));
    h.on(Endpoint::GetMissingEvents, move |_| Reply::ok(json!({"events": [hidden_pdu]})));
    h.hold(Endpoint::GetMissingEvents);
    let answer = tokio::time::timeout(Duration::from_secs(40), h.send_pdu(&a, &pdu))
        .await
        .expect("/send waited for the missing events");
    assert!(answer.is_ok(), "{answer:?}");
    a.kill();
    h.release(Endpoint::GetMissingEvents);
    a.restart().await;
    wait_on_timeline(&a, &alice, &room_id, &hidden).await;
    wait_on_timeline(&a, &alice, &room_id, &last).await;
}

backend_tests!(
    oversized_transactions_and_pdus_are_refused,
    a_missing_events_answer_longer_than_asked_is_dropped,
    a_backfill_answer_longer_than_asked_is_dropped,
    presence_and_to_device_need_a_shared_room,
    one_transaction_at_a_time_per_origin,
    send_answers_before_missing_events_are_fetched,
    queued_pdus_survive_a_kill
);
