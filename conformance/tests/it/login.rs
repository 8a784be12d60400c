use conformance::{Backend, Server, ServerOptions, backend_tests};
use serde_json::json;

backend_tests!(
    login_flows_offer_password,
    login_by_localpart_or_user_id,
    wrong_credentials_are_forbidden,
    login_with_existing_device_replaces_its_token,
    legacy_user_field_and_unknown_login_type,
    logout_ends_the_session,
    logout_all_ends_every_session,
    login_is_rate_limited
);

const LOGIN: &str = "/_matrix/client/v3/login";

async fn login_flows_offer_password(backend: Backend) {
    let server = Server::start(backend).await;
    let resp = server.get(LOGIN, None).await;
    assert_eq!(resp.assert_ok()["flows"], json!([{"type": "m.login.password"}]));
}

async fn login_by_localpart_or_user_id(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("alice", "secret-pass").await;
    for who in ["alice", "@alice:localhost", "ALICE", "@Alice:localhost"] {
        let resp = server.login(who, "secret-pass").await;
        let body = resp.assert_ok();
        assert_eq!(body["user_id"], "@alice:localhost", "login as {who}");
        assert!(body["well_known"]["m.homeserver"]["base_url"].is_string(), "{body}");
        let token = body["access_token"].as_str().unwrap();
        let me = server.get("/_matrix/client/v3/account/whoami", Some(token)).await;
        assert_eq!(me.assert_ok()["device_id"], body["device_id"]);
    }
    // Four logins, four devices (plus the registration one).
    let token = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let devices = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert_eq!(devices.assert_ok()["devices"].as_array().unwrap().len(), 6);
}

async fn wrong_credentials_are_forbidden(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("alice", "secret-pass").await;
    server.login("alice", "wrong").await.assert_error(403, "M_FORBIDDEN");
    server.login("nobody", "secret-pass").await.assert_error(403, "M_FORBIDDEN");
    server.login("@alice:elsewhere.example", "secret-pass").await.assert_error(403, "M_FORBIDDEN");
    server.login("not a valid id!", "secret-pass").await.assert_error(403, "M_FORBIDDEN");
    server.login("alice", &"x".repeat(5000)).await.assert_error(403, "M_FORBIDDEN");
}

async fn login_with_existing_device_replaces_its_token(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let resp = server
        .post(
            LOGIN,
            None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                   "password": "secret-pass", "device_id": alice.device_id, "initial_device_display_name": "ignored"}),
        )
        .await;
    let body = resp.assert_ok();
    assert_eq!(body["device_id"], alice.device_id.as_str());
    let new_token = body["access_token"].as_str().unwrap();
    assert_ne!(new_token, alice.access_token);
    server
        .get("/_matrix/client/v3/account/whoami", Some(&alice.access_token))
        .await
        .assert_error(401, "M_UNKNOWN_TOKEN");
    server.get("/_matrix/client/v3/account/whoami", Some(new_token)).await.assert_ok();
    let devices = server.get("/_matrix/client/v3/devices", Some(new_token)).await;
    assert_eq!(devices.assert_ok()["devices"].as_array().unwrap().len(), 1);
}

async fn legacy_user_field_and_unknown_login_type(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("alice", "secret-pass").await;
    let resp =
        server.post(LOGIN, None, json!({"type": "m.login.password", "user": "alice", "password": "secret-pass"})).await;
    assert_eq!(resp.assert_ok()["user_id"], "@alice:localhost");
    server.post(LOGIN, None, json!({"type": "m.login.token", "token": "abc"})).await.assert_error(400, "M_UNKNOWN");
    server
        .post(LOGIN, None, json!({"type": "m.login.password", "password": "x"}))
        .await
        .assert_error(400, "M_MISSING_PARAM");
}

async fn logout_ends_the_session(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let second = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    server.post("/_matrix/client/v3/logout", Some(&alice.access_token), json!({})).await.assert_ok();
    server
        .get("/_matrix/client/v3/account/whoami", Some(&alice.access_token))
        .await
        .assert_error(401, "M_UNKNOWN_TOKEN");
    // The device went with the session; the other session lives on.
    let devices = server.get("/_matrix/client/v3/devices", Some(&second)).await;
    let ids: Vec<_> =
        devices.assert_ok()["devices"].as_array().unwrap().iter().map(|d| d["device_id"].clone()).collect();
    assert!(!ids.contains(&json!(alice.device_id)), "{ids:?}");
    assert_eq!(ids.len(), 1);
}

async fn logout_all_ends_every_session(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let second = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    server.post("/_matrix/client/v3/logout/all", Some(&second), json!({})).await.assert_ok();
    for token in [&alice.access_token, &second] {
        server.get("/_matrix/client/v3/account/whoami", Some(token)).await.assert_error(401, "M_UNKNOWN_TOKEN");
    }
    server.login("alice", "secret-pass").await.assert_ok();
}

async fn login_is_rate_limited(backend: Backend) {
    let server = ServerOptions::new(backend)
        .env("OBMIN_RATE_LIMITS_ENABLED", "true")
        .env("OBMIN_RATE_LIMITS_LOGIN_PER_SECOND", "0.01")
        .env("OBMIN_RATE_LIMITS_LOGIN_BURST", "3")
        .start()
        .await;
    for _ in 0..3 {
        server.login("nobody", "x").await.assert_error(403, "M_FORBIDDEN");
    }
    let limited = server.login("nobody", "x").await;
    limited.assert_error(429, "M_LIMIT_EXCEEDED");
    let retry = limited.body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry > 1000 && retry <= 100_000, "retry_after_ms = {retry}");
}
