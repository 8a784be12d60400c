//! Bad input of every kind gets the right Matrix error, never a 500 (the harness panics on
//! any 5xx) and never a crash.

use conformance::{Backend, Server, ServerOptions, backend_tests};
use reqwest::Method;
use serde_json::json;

backend_tests!(
    unknown_endpoint_is_unrecognized,
    wrong_method_is_405_unrecognized,
    malformed_json_is_not_json,
    wrong_field_types_are_bad_json,
    oversized_body_is_too_large,
    missing_and_unknown_tokens,
    bad_identifiers_in_paths,
    garbage_never_breaks_the_server,
    nul_characters_are_refused
);

async fn unknown_endpoint_is_unrecognized(backend: Backend) {
    let server = Server::start(backend).await;
    server.get("/_matrix/client/v3/no/such/thing", None).await.assert_error(404, "M_UNRECOGNIZED");
    server.get("/", None).await.assert_error(404, "M_UNRECOGNIZED");
}

async fn wrong_method_is_405_unrecognized(backend: Backend) {
    let server = Server::start(backend).await;
    server.request(Method::DELETE, "/_matrix/client/versions", None, None).await.assert_error(405, "M_UNRECOGNIZED");
    server
        .request(Method::PUT, "/_matrix/client/v3/login", None, Some(json!({})))
        .await
        .assert_error(405, "M_UNRECOGNIZED");
}

async fn malformed_json_is_not_json(backend: Backend) {
    let server = Server::start(backend).await;
    for body in [&b"{not json"[..], b"{\"type\": \"m.login.password\",", b"\xff\xfe", b"[1, 2"] {
        server
            .request_raw(Method::POST, "/_matrix/client/v3/login", None, body.to_vec())
            .await
            .assert_error(400, "M_NOT_JSON");
    }
}

async fn wrong_field_types_are_bad_json(backend: Backend) {
    let server = Server::start(backend).await;
    server
        .post("/_matrix/client/v3/login", None, json!({"type": "m.login.password", "identifier": 5, "password": "x"}))
        .await
        .assert_error(400, "M_BAD_JSON");
    server
        .post("/_matrix/client/v3/register", None, json!({"username": ["alice"], "password": "x"}))
        .await
        .assert_error(400, "M_BAD_JSON");
    let alice = server.register("alice", "secret-pass").await;
    server
        .put("/_matrix/client/v3/devices/ABC", Some(&alice.access_token), json!({"display_name": {"a": 1}}))
        .await
        .assert_error(400, "M_BAD_JSON");
}

async fn oversized_body_is_too_large(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_MAX_REQUEST_BYTES", "65536").start().await;
    let big = json!({"username": "alice", "password": "x".repeat(70_000)});
    server.post("/_matrix/client/v3/register", None, big).await.assert_error(413, "M_TOO_LARGE");
    // The server is still fine afterwards.
    server.get("/_matrix/client/versions", None).await.assert_ok();
}

async fn missing_and_unknown_tokens(backend: Backend) {
    let server = Server::start(backend).await;
    server.get("/_matrix/client/v3/account/whoami", None).await.assert_error(401, "M_MISSING_TOKEN");
    server.get("/_matrix/client/v3/account/whoami", Some("obm_nope")).await.assert_error(401, "M_UNKNOWN_TOKEN");
    let resp = server
        .http
        .get(server.url("/_matrix/client/v3/account/whoami"))
        .header("Authorization", "Basic YWxpY2U6c2VjcmV0")
        .send()
        .await
        .unwrap();
    Server::read(resp).await.assert_error(401, "M_MISSING_TOKEN");
    // The deprecated query parameter still works.
    let alice = server.register("alice", "secret-pass").await;
    let resp =
        server.get(&format!("/_matrix/client/v3/account/whoami?access_token={}", alice.access_token), None).await;
    assert_eq!(resp.assert_ok()["user_id"], "@alice:localhost");
}

async fn bad_identifiers_in_paths(backend: Backend) {
    let server = Server::start(backend).await;
    server.get("/_matrix/client/v3/profile/not-a-user-id", None).await.assert_error(400, "M_INVALID_PARAM");
    server.get("/_matrix/client/v3/profile/%40%3A", None).await.assert_error(400, "M_INVALID_PARAM");
}

async fn garbage_never_breaks_the_server(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"string\"".to_vec(),
        b"12345678901234567890123456789".to_vec(),
        b"{\"auth\": {\"type\": \"m.login.password\"}}".to_vec(),
        b"{\"auth\": {\"session\": 5}}".to_vec(),
        b"{\"auth\": {\"type\": \"m.login.dummy\", \"session\": \"nope\"}}".to_vec(),
        "{\"displayname\": \"\u{0}\u{ffff}\"}".as_bytes().to_vec(),
        br#"{"display_name": "nul \u0000 inside", "displayname": "\u0000"}"#.to_vec(),
        br#"{"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "a\u0000"}, "password": "x"}"#
            .to_vec(),
        vec![b'{'; 10_000],
    ];
    let paths = [
        (Method::POST, "/_matrix/client/v3/register"),
        (Method::POST, "/_matrix/client/v3/login"),
        (Method::POST, "/_matrix/client/v3/account/password"),
        (Method::POST, "/_matrix/client/v3/account/deactivate"),
        (Method::POST, "/_matrix/client/v3/delete_devices"),
        (Method::PUT, "/_matrix/client/v3/devices/X"),
        (Method::DELETE, "/_matrix/client/v3/devices/X"),
        (Method::PUT, "/_matrix/client/v3/profile/@alice:localhost/displayname"),
        (Method::PUT, "/_matrix/client/v3/profile/@alice:localhost/avatar_url"),
    ];
    for (method, path) in paths {
        for body in &bodies {
            let resp = server.request_raw(method.clone(), path, Some(&alice.access_token), body.clone()).await;
            assert!(resp.status.is_client_error() || resp.status.is_success(), "{method} {path}: {}", resp.status);
            if resp.status == 401 && resp.body["flows"].is_array() {
                // A user-interactive-authentication challenge, not an error.
            } else if resp.status.is_client_error() {
                assert!(resp.body["errcode"].as_str().is_some_and(|c| c.starts_with("M_")), "{}", resp.body);
            }
        }
    }
    // Still alive, still answering, alice's session still valid.
    server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await.assert_ok();
}

async fn nul_characters_are_refused(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let path = format!("/_matrix/client/v3/devices/{}", alice.device_id);
    server
        .request_raw(Method::PUT, &path, Some(&alice.access_token), br#"{"display_name": "a\u0000b"}"#.to_vec())
        .await
        .assert_error(400, "M_BAD_JSON");
    server
        .get("/_matrix/client/v3/devices/A%00B", Some(&alice.access_token))
        .await
        .assert_error(400, "M_INVALID_PARAM");
    server.get("/_matrix/client/v3/register/available?username=a%00", None).await.assert_error(400, "M_INVALID_PARAM");
    server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await.assert_ok();
}
