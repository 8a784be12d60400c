use conformance::{Backend, Server, backend_tests};

backend_tests!(health_and_metrics, state_survives_restart_and_kill, sigterm_shuts_down_cleanly);

async fn health_and_metrics(backend: Backend) {
    let server = Server::start(backend).await;
    let resp = server.http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "OK");

    server.register("alice", "secret-pass").await;
    server.get("/_matrix/client/v3/nothing-here", None).await;
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("obmin_http_requests_total{")
            && l.contains("endpoint=\"/_matrix/client/v3/register\"")
            && l.contains("status=\"200\"")),
        "{text}"
    );
    assert!(text.contains("status=\"401\""), "the UIA round trip is counted: {text}");
    assert!(text.contains("endpoint=\"unmatched\""), "{text}");
    assert!(text.contains("obmin_http_request_duration_seconds_bucket"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("obmin_db_pool_connections ")), "{text}");
    assert!(text.lines().any(|l| l == "obmin_sync_open 0"), "{text}");
    // A long-polling sync shows in the gauge while it waits.
    let alice = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let first =
        server.get("/_matrix/client/v3/sync", Some(&alice)).await.body["next_batch"].as_str().unwrap().to_owned();
    let poll = tokio::spawn(
        server
            .http
            .get(server.url(&format!("/_matrix/client/v3/sync?timeout=3000&since={first}")))
            .bearer_auth(alice)
            .send(),
    );
    let mut seen_open = false;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l == "obmin_sync_open 1") {
            seen_open = true;
            break;
        }
    }
    assert!(seen_open, "the waiting sync was never counted");
    assert_eq!(poll.await.unwrap().unwrap().status(), 200);
}

async fn state_survives_restart_and_kill(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let key_before = std::fs::read_to_string(server.dir.path().join("data/signing.key")).unwrap();

    server.restart().await;
    server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await.assert_ok();
    server.login("alice", "secret-pass").await.assert_ok();

    // A write that was answered survives kill -9.
    server
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            Some(&alice.access_token),
            serde_json::json!({"displayname": "Alice"}),
        )
        .await
        .assert_ok();
    server.kill();
    server.restart().await;
    let name = server.get("/_matrix/client/v3/profile/@alice:localhost/displayname", None).await;
    assert_eq!(name.assert_ok()["displayname"], "Alice");
    let key_after = std::fs::read_to_string(server.dir.path().join("data/signing.key")).unwrap();
    assert_eq!(key_before, key_after, "the signing key is created once and reused");
    assert!(key_after.starts_with("ed25519 "), "{key_after}");
}

async fn sigterm_shuts_down_cleanly(backend: Backend) {
    let mut server = Server::start(backend).await;
    server.register("alice", "secret-pass").await;
    assert!(server.terminate().await, "exit status 0 after SIGTERM");
    assert!(server.log().contains("homeserver stopped"), "{}", server.log());
}
