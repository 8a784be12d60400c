//! The room state model against a hostile server: auth chains fetched from it are authorized
//! event by event (rejections recorded and inherited), an auth event held as an outlier still
//! reaches the timeline and the state when it arrives as a PDU, a depth at canonical JSON's
//! limit does not stop local users from sending, state resolution runs wherever branches of
//! the graph meet (a message joining them, prev events we never got), and `/state_ids` at an
//! older event answers the state at that event, not the current state rolled back in stream
//! order.

use conformance::{
    Backend, Server, User, backend_tests, enc,
    federated::federating,
    hostile::{Draft, Endpoint, HostileServer, Reply},
};
use ruma::RoomVersionId;
use serde_json::{Value, json};

/// A room of Alice's on `server` that the hostile server's `@h` joined, with power level
/// `power` for `@h`. Returns (room id, Alice).
async fn room_with_hostile_member(server: &Server, h: &HostileServer, power: i64) -> (String, User) {
    let alice = server.register("alice", "password-alice-1").await;
    let hostile_user = h.user("h");
    let room_id = server
        .create_room(
            &alice,
            json!({
                "preset": "public_chat",
                // Room version 12: Alice's power comes from creating the room.
                "power_level_content_override": {"users": {(hostile_user.as_str()): power}},
            }),
        )
        .await;
    h.join(server, &room_id, "h").await.expect("the hostile server joins");
    (room_id, alice)
}

/// Serves `/event` for these events (and nothing else).
fn serve_events(h: &HostileServer, events: Vec<(String, Value)>) {
    let origin = h.name.clone();
    h.on(Endpoint::Event, move |req| {
        let wanted = req.args.first().cloned().unwrap_or_default();
        match events.iter().find(|(id, _)| *id == wanted) {
            Some((_, pdu)) => Reply::ok(json!({"origin": origin, "origin_server_ts": 0, "pdus": [pdu]})),
            None => Reply::error(404, "M_NOT_FOUND", "not served"),
        }
    });
}

/// The room's event ids as Alice sees them through `/messages` (newest 100).
async fn timeline_ids(server: &Server, user: &User, room_id: &str) -> Vec<String> {
    let resp = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room_id)), Some(&user.access_token))
        .await;
    resp.assert_ok()["chunk"].as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
}

async fn state_event(server: &Server, user: &User, room_id: &str, kind: &str, key: &str) -> conformance::Response {
    server
        .get(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room_id), enc(key)), Some(&user.access_token))
        .await
}

/// Waits until the hostile server has Alice's event (so its view builds on it).
async fn hostile_has(h: &HostileServer, event_id: &str) {
    let id = event_id.to_owned();
    let version = RoomVersionId::V12;
    h.wait_for_pdu("Alice's event", move |pdu| conformance::hostile::event_id(pdu, &version) == id).await;
}

/// Hole 4: an auth event fetched from the hostile server that its own auth events do not
/// allow (a power levels change by a member without power) is stored as rejected, and the
/// message citing it is rejected too; neither reaches the timeline or the state, and the
/// rejected event sent later as a PDU stays rejected.
async fn a_fetched_unauthorized_auth_event_is_rejected_with_its_dependents(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_hostile_member(&a, &h, 0).await;
    let hostile_user = h.user("h");
    let heads = h.room(&room_id).extremities.clone();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();

    // @h (power 0) gives itself power 100: not allowed by its own auth events.
    let (pl_id, pl) = h.build(
        &room_id,
        Draft::state(&hostile_user, "m.room.power_levels", "", json!({"users": {(hostile_user.as_str()): 100}})),
    );
    // A message citing it as its power levels, built on what Obmin has.
    let (message_id, message) =
        h.build(&room_id, Draft::message(&hostile_user, "cites a forged power level").prev_events(&heads));
    assert!(message["auth_events"].as_array().unwrap().iter().any(|id| id == pl_id.as_str()), "{message}");
    serve_events(&h, vec![(pl_id.clone(), pl.clone())]);

    let verdict = h.send_pdu(&a, &message).await;
    assert!(verdict.is_err(), "the message citing an unauthorized auth event is refused: {verdict:?}");
    assert!(h.requests(Endpoint::Event).iter().any(|r| r.args.first() == Some(&pl_id)), "the auth event was fetched");
    let timeline = timeline_ids(&a, &alice, &room_id).await;
    assert!(!timeline.contains(&message_id) && !timeline.contains(&pl_id), "{timeline:?}");
    // The rejection is kept: the power levels sent as a PDU are refused, and change nothing.
    let verdict = h.send_pdu(&a, &pl).await;
    assert!(verdict.as_ref().is_err_and(|e| e.contains("rejected")), "{verdict:?}");
    let levels = state_event(&a, &alice, &room_id, "m.room.power_levels", "").await;
    assert_eq!(levels.assert_ok()["users"][hostile_user.as_str()], json!(0));
    // And what cites it later is refused without asking again.
    let asked = h.requests(Endpoint::Event).len();
    let (_, again) = h.build(&room_id, Draft::message(&hostile_user, "again").prev_events(&heads));
    assert!(h.send_pdu(&a, &again).await.is_err());
    assert_eq!(h.requests(Endpoint::Event).len(), asked, "a rejected event is not fetched again");
    // A rejected event is never served as part of the room: not by `/event`, not in an auth
    // chain (`/event_auth` of it), not as state.
    let (status, body) = h.get(&a, &format!("/_matrix/federation/v1/event/{}", enc(&pl_id))).await;
    assert_eq!(status, 404, "/event of a rejected event: {body}");
    let (status, body) =
        h.get(&a, &format!("/_matrix/federation/v1/event_auth/{}/{}", enc(&room_id), enc(&pl_id))).await;
    assert_eq!(status, 404, "/event_auth of a rejected event: {body}");
}

/// Hole 4: an auth event fetched as an outlier (a display name change of `@h`, cited by a
/// message whose prev events skip it) later arrives as a PDU: it reaches the timeline and the
/// current state instead of being taken for known.
async fn an_outlier_arriving_as_a_pdu_reaches_the_timeline_and_state(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_hostile_member(&a, &h, 0).await;
    let hostile_user = h.user("h");
    let heads = h.room(&room_id).extremities.clone();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();

    let (rename_id, rename) = h.build(
        &room_id,
        Draft::state(
            &hostile_user,
            "m.room.member",
            &hostile_user,
            json!({"membership": "join", "displayname": "Renamed"}),
        )
        .prev_events(&heads),
    );
    let (message_id, message) =
        h.build(&room_id, Draft::message(&hostile_user, "after the rename").prev_events(&heads));
    assert!(message["auth_events"].as_array().unwrap().iter().any(|id| id == rename_id.as_str()), "{message}");
    serve_events(&h, vec![(rename_id.clone(), rename.clone())]);
    h.send_pdu(&a, &message).await.expect("the message is accepted");
    assert!(timeline_ids(&a, &alice, &room_id).await.contains(&message_id));
    assert!(!timeline_ids(&a, &alice, &room_id).await.contains(&rename_id), "only an outlier so far");

    // Now the rename itself arrives.
    h.send_pdu(&a, &rename).await.expect("the rename is accepted");
    assert!(timeline_ids(&a, &alice, &room_id).await.contains(&rename_id), "the outlier reached the timeline");
    let member = state_event(&a, &alice, &room_id, "m.room.member", &hostile_user).await;
    assert_eq!(member.assert_ok()["displayname"], "Renamed", "and the current state");
}

/// Hole 5: a validly signed event at depth 2^53 - 1 (canonical JSON's largest integer) is
/// taken in; local users can still send afterwards, at a depth that can be signed.
async fn a_depth_at_the_json_limit_does_not_brick_the_room(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_hostile_member(&a, &h, 0).await;
    const LIMIT: u64 = 9_007_199_254_740_991;
    let (_, deep) = h.build(&room_id, Draft::message(&h.user("h"), "deep").depth(LIMIT));
    h.send_pdu(&a, &deep).await.expect("a depth within the spec's bounds is accepted");
    let sent = a.send_text(&alice, &room_id, "still here").await;
    let event_id = sent.assert_ok()["event_id"].as_str().unwrap().to_owned();
    let version = RoomVersionId::V12;
    let pdu =
        h.wait_for_pdu("Alice's message", move |pdu| conformance::hostile::event_id(pdu, &version) == event_id).await;
    assert!(pdu["depth"].as_u64().is_some_and(|d| d <= LIMIT), "{pdu}");
    // And a state change too.
    a.put_state(&alice, &room_id, "m.room.topic", "", json!({"topic": "deep"})).await.assert_ok();
}

/// Hole 6: a message joins two branches whose states differ, and one branch's events never
/// reach us (`get_missing_events` fails): the state at the missing prev event comes from
/// `/state_ids`, and state resolution makes the room's state of both branches.
async fn a_message_joining_two_branches_resolves_their_states(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_hostile_member(&a, &h, 100).await;
    let hostile_user = h.user("h");
    let view = h.room(&room_id);
    let heads = view.extremities.clone();
    // The state before the hostile branch, for `/state_ids` at its first event.
    let state_before: Vec<String> = view.state.values().cloned().collect();
    let chain: Vec<String> =
        view.auth_chain(&state_before).iter().map(|e| conformance::hostile::event_id(e, &RoomVersionId::V12)).collect();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
    let (name_id, name) = h.build(
        &room_id,
        Draft::state(&hostile_user, "m.room.name", "", json!({"name": "from the other branch"})).prev_events(&heads),
    );
    // Meanwhile Alice talks on her branch.
    let alices =
        a.send_text(&alice, &room_id, "on Alice's branch").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    hostile_has(&h, &alices).await;
    let (merge_id, merge) = h
        .build(&room_id, Draft::message(&hostile_user, "joins both").prev_events(&[alices.as_str(), name_id.as_str()]));
    serve_events(&h, vec![(name_id.clone(), name.clone())]);
    let wanted = name_id.clone();
    h.on(Endpoint::StateIds, move |req| {
        if req.query.iter().any(|(k, v)| k == "event_id" && *v == wanted) {
            Reply::ok(json!({"pdu_ids": state_before, "auth_chain_ids": chain}))
        } else {
            Reply::error(404, "M_NOT_FOUND", "not served")
        }
    });

    h.send_pdu(&a, &merge).await.expect("the merge is accepted");
    assert!(timeline_ids(&a, &alice, &room_id).await.contains(&merge_id));
    let room_name = state_event(&a, &alice, &room_id, "m.room.name", "").await;
    assert_eq!(room_name.status, 200, "the branches' states were resolved: {:?}", room_name.body);
    assert_eq!(room_name.body["name"], "from the other branch");
    assert!(!h.requests(Endpoint::StateIds).is_empty(), "the state at the missing prev event was asked for");
    // The name event, which we only had as an outlier, joined the timeline with the change.
    assert!(timeline_ids(&a, &alice, &room_id).await.contains(&name_id));
    // Alice's next event builds on the resolved state.
    a.send_text(&alice, &room_id, "after the merge").await.assert_ok();
}

/// Hole 6: a state event whose prev events we cannot get does not simply overwrite the
/// current state: the state before it (asked with `/state_ids`) and ours are resolved. An
/// older topic change from the hostile branch loses to Alice's newer one, as the spec's
/// ordering says.
async fn a_state_event_with_missing_prev_events_is_resolved(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_hostile_member(&a, &h, 100).await;
    let hostile_user = h.user("h");
    let view = h.room(&room_id);
    let heads = view.extremities.clone();
    let state_before: Vec<String> = view.state.values().cloned().collect();
    let chain: Vec<String> =
        view.auth_chain(&state_before).iter().map(|e| conformance::hostile::event_id(e, &RoomVersionId::V12)).collect();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
    // A hostile branch: a message we will never get, then an older topic change on it.
    let past = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 - 60_000;
    let mut hidden = Draft::message(&hostile_user, "never delivered").prev_events(&heads);
    hidden.origin_server_ts = Some(past);
    let (hidden_id, hidden) = h.build(&room_id, hidden);
    let mut topic =
        Draft::state(&hostile_user, "m.room.topic", "", json!({"topic": "hostile's"})).prev_events(&[&hidden_id]);
    topic.origin_server_ts = Some(past + 1);
    let (topic_id, topic) = h.build(&room_id, topic);
    // Alice sets the topic on her branch, later.
    a.put_state(&alice, &room_id, "m.room.topic", "", json!({"topic": "alice's"})).await.assert_ok();
    serve_events(&h, vec![(hidden_id.clone(), hidden)]);
    let wanted = hidden_id.clone();
    h.on(Endpoint::StateIds, move |req| {
        if req.query.iter().any(|(k, v)| k == "event_id" && *v == wanted) {
            Reply::ok(json!({"pdu_ids": state_before, "auth_chain_ids": chain}))
        } else {
            Reply::error(404, "M_NOT_FOUND", "not served")
        }
    });

    h.send_pdu(&a, &topic).await.expect("the topic change is accepted");
    assert!(timeline_ids(&a, &alice, &room_id).await.contains(&topic_id));
    let current = state_event(&a, &alice, &room_id, "m.room.topic", "").await;
    assert_eq!(current.assert_ok()["topic"], "alice's", "resolved, not overwritten by the event received last");
}

/// Hole 6: `/state_ids` at an event on a branch answers the state before that event (its
/// prev events' state), not the current state rolled back in stream order, which would hold
/// Alice's topic from the other branch.
async fn state_ids_at_an_older_event_across_a_fork(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, alice) = room_with_hostile_member(&a, &h, 0).await;
    let hostile_user = h.user("h");
    let heads = h.room(&room_id).extremities.clone();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
    let hostile_member = h.room(&room_id).state_id("m.room.member", &hostile_user).unwrap();
    let topic = a.put_state(&alice, &room_id, "m.room.topic", "", json!({"topic": "alice's"})).await;
    let topic_id = topic.assert_ok()["event_id"].as_str().unwrap().to_owned();
    // A message on a branch that did not see the topic.
    let (branch_id, branch) = h.build(&room_id, Draft::message(&hostile_user, "on the branch").prev_events(&heads));
    h.send_pdu(&a, &branch).await.expect("the branch message is accepted");

    let path = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room_id), enc(&branch_id));
    let (status, body) = h.get(&a, &path).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["pdu_ids"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(!ids.contains(&topic_id.as_str()), "the topic is on the other branch: {body}");
    assert!(ids.contains(&hostile_member.as_str()), "the state after the branch's prev events: {body}");
    // At Alice's topic change: the state before it, without it.
    let path = format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room_id), enc(&topic_id));
    let (status, body) = h.get(&a, &path).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body["pdu_ids"].as_array().unwrap().iter().any(|id| id == topic_id.as_str()), "{body}");
    // The current state holds both branches: the topic stays Alice's.
    let current = state_event(&a, &alice, &room_id, "m.room.topic", "").await;
    assert_eq!(current.assert_ok()["topic"], "alice's");
}

/// A local user's membership that only state resolution changes (an invite on a branch we
/// never got, chosen when a message joins the branches) ends the user's waiting long poll
/// with the invite, as any membership change does: the user is in no room the merge touches,
/// so only a change addressed to the user can wake the sync.
async fn a_membership_changed_by_resolution_wakes_the_users_sync(backend: Backend) {
    let a = federating(backend).await;
    let h = HostileServer::start().await;
    let (room_id, _alice) = room_with_hostile_member(&a, &h, 100).await;
    let bob = a.register("bob", "password-bob-1").await;
    let hostile_user = h.user("h");
    let view = h.room(&room_id);
    let state_before: Vec<String> = view.state.values().cloned().collect();
    let chain: Vec<String> =
        view.auth_chain(&state_before).iter().map(|e| conformance::hostile::event_id(e, &RoomVersionId::V12)).collect();
    let heads = view.extremities.clone();
    let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
    // A branch we never get: a message, then @h's invite of Bob on top of it.
    let (hidden_id, hidden) = h.build(&room_id, Draft::message(&hostile_user, "never delivered").prev_events(&heads));
    let (invite_id, invite) =
        h.build(&room_id, Draft::member(&hostile_user, &bob.user_id, "invite").prev_events(&[&hidden_id]));
    let (_, merge) =
        h.build(&room_id, Draft::message(&hostile_user, "joins both").prev_events(&[heads[0], invite_id.as_str()]));
    serve_events(&h, vec![(hidden_id.clone(), hidden), (invite_id.clone(), invite)]);
    let wanted = invite_id.clone();
    let hidden_wanted = hidden_id.clone();
    h.on(Endpoint::StateIds, move |req| {
        let at = |id: &str| req.query.iter().any(|(k, v)| k == "event_id" && v == id);
        if at(&wanted) || at(&hidden_wanted) {
            Reply::ok(json!({"pdu_ids": state_before, "auth_chain_ids": chain}))
        } else {
            Reply::error(404, "M_NOT_FOUND", "not served")
        }
    });
    h.on(Endpoint::GetMissingEvents, |_| Reply::error(404, "M_NOT_FOUND", "not served"));

    let since = a.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    // Bob waits up to the longest long poll the server allows (60 s).
    let poll = {
        let url = a.url(&format!("/_matrix/client/v3/sync?timeout=60000&since={}", enc(&since)));
        tokio::spawn(a.http.get(url).bearer_auth(&bob.access_token).send())
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    h.send_pdu(&a, &merge).await.expect("the merge is accepted");
    // Woken by the change, not by the end of the long poll: a generous bound well below it.
    let resp = tokio::time::timeout(std::time::Duration::from_secs(40), poll)
        .await
        .expect("Bob's long poll was not woken by his membership changing")
        .unwrap()
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert!(body["rooms"]["invite"].get(&room_id).is_some(), "Bob sees the invite: {body}");
}

backend_tests!(
    a_membership_changed_by_resolution_wakes_the_users_sync,
    a_fetched_unauthorized_auth_event_is_rejected_with_its_dependents,
    an_outlier_arriving_as_a_pdu_reaches_the_timeline_and_state,
    a_depth_at_the_json_limit_does_not_brick_the_room,
    a_message_joining_two_branches_resolves_their_states,
    a_state_event_with_missing_prev_events_is_resolved,
    state_ids_at_an_older_event_across_a_fork
);
