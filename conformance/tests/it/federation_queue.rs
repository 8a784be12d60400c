//! The send queue against a destination that stays away: after
//! `federation.give_up_after_secs` of failures (counted across restarts) its backlog is cut to
//! the newest event of each room, the metrics say so, and when it returns it still catches up
//! on the room (the newest event, and the gap through `/get_missing_events`).

use conformance::{Backend, Server, ServerOptions, backend_tests, free_port};
use serde_json::json;

use conformance::{client::bodies, wait::eventually};

backend_tests!(a_destination_gone_for_a_day_is_given_up_on);

async fn metric(server: &Server, port: u16, name: &str) -> Option<f64> {
    let text = server.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn a_destination_gone_for_a_day_is_given_up_on(backend: Backend) {
    let port = free_port();
    let mut a = ServerOptions::new(backend)
        .federating()
        .env("OBMIN_METRICS_LISTEN", &format!("127.0.0.1:{port}"))
        .start()
        .await;
    let mut b = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    b.join_via(&bob, &room_id, &a.server_name).await.assert_ok();
    a.send_text(&alice, &room_id, "m-before").await.assert_ok();
    b.wait_for_timeline(&bob, &room_id, "the first message", |e| bodies(e).contains(&"m-before".to_owned())).await;
    let since = b.sync(&bob, None, 0, None).await["next_batch"].as_str().map(str::to_owned);

    // B goes away; Alice keeps talking; A fails to deliver and says so.
    b.kill();
    for i in 0..30 {
        a.send_text(&alice, &room_id, &format!("m-{i:02}")).await.assert_ok();
    }
    eventually("A to count B as failing", || async {
        metric(&a, port, "obmin_federation_destinations_failing").await == Some(1.0)
    })
    .await;
    assert_eq!(metric(&a, port, "obmin_federation_destinations_given_up").await, Some(0.0));
    let b_name = b.server_name.replace('\'', "''");
    let queued =
        format!("SELECT COUNT(*) FROM federation_outbox WHERE destination = '{b_name}' AND event_id IS NOT NULL");
    assert!(a.query_i64(&queued).await >= 30, "A keeps the backlog of a destination failing for a moment");

    // A day passes (staged: the failure's start moved back), across a restart of A.
    a.terminate().await;
    let day_ago = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
        - 25 * 3600 * 1000;
    a.run_sql(&format!(
        "UPDATE federation_destination_failures SET failing_since = {day_ago} WHERE destination = '{b_name}'"
    ))
    .await;
    a.restart().await;
    // Its next attempt fails and cuts the backlog to one of the 30 events.
    eventually("A to cut B's backlog", || async {
        metric(&a, port, "obmin_federation_dropped_items_total").await.is_some_and(|dropped| dropped >= 29.0)
    })
    .await;
    assert_eq!(metric(&a, port, "obmin_federation_destinations_given_up").await, Some(1.0));
    assert_eq!(a.query_i64(&queued).await, 1, "the newest event of the one room is kept");

    // B returns and talks to A: A delivers at once, and B fills the gap itself.
    b.restart().await;
    b.send_text(&bob, &room_id, "b-back").await.assert_ok();
    let seen = b
        .wait_for_timeline_since(&bob, &room_id, since, "the newest message", |e| {
            bodies(e).contains(&"m-29".to_owned())
        })
        .await;
    assert!(bodies(&seen).contains(&"m-29".to_owned()));
    eventually("A to count B as reachable again", || async {
        metric(&a, port, "obmin_federation_destinations_failing").await == Some(0.0)
    })
    .await;
}
