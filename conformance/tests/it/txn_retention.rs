//! Idempotency records are kept for `transactions.retention_secs`, then forgotten: within
//! the window a retried request gets the first answer (tested where each endpoint is), after
//! it the same transaction id is a new request, so the tables do not grow forever.

use std::time::Duration;

use conformance::{Backend, ServerOptions, backend_tests, enc};
use serde_json::json;

backend_tests!(transaction_ids_are_forgotten_after_their_window);

async fn transaction_ids_are_forgotten_after_their_window(backend: Backend) {
    let server = ServerOptions::new(backend)
        .env("OBMIN_TRANSACTIONS_RETENTION_SECS", "1")
        .env("OBMIN_TRANSACTIONS_PRUNE_INTERVAL_SECS", "1")
        .start()
        .await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({})).await;
    let send_path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room));
    let message = json!({"msgtype": "m.text", "body": "once"});
    let first =
        server.put(&send_path, Some(&alice.access_token), message.clone()).await.assert_ok()["event_id"].clone();
    let to_device_path = "/_matrix/client/v3/sendToDevice/m.test/d1";
    let to_device = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"n": 1}}}});
    server.put(to_device_path, Some(&alice.access_token), to_device.clone()).await.assert_ok();

    // Retries: answered with the first result until the window has passed and a pass of
    // the pruner has run, then a new request. Generous bounded polling, no wall-clock
    // assertion.
    let mut event_ids = vec![first];
    let mut to_device_sends = 1;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let id =
            server.put(&send_path, Some(&alice.access_token), message.clone()).await.assert_ok()["event_id"].clone();
        if !event_ids.contains(&id) {
            event_ids.push(id);
        }
        server.put(to_device_path, Some(&alice.access_token), to_device.clone()).await.assert_ok();
        to_device_sends += 1;
        let sync = server.sync(&bob, None, 0, None).await;
        let delivered = sync["to_device"]["events"].as_array().map_or(0, Vec::len);
        if event_ids.len() > 1 && delivered > 1 {
            assert!(delivered <= to_device_sends);
            return;
        }
    }
    panic!("transaction ids were never forgotten: {} event ids", event_ids.len());
}
