use conformance::{Backend, Server, ServerOptions, backend_tests};
use serde_json::json;

backend_tests!(
    open_registration_uses_dummy_stage,
    usernames_are_validated,
    taken_usernames_are_refused,
    username_availability,
    guests_are_refused,
    disabled_registration_is_forbidden,
    token_registration,
    registration_token_uses_run_out,
    inhibit_login_gives_no_session,
    generated_username_and_given_device,
    password_is_required,
    uia_sessions_are_bound_and_checked
);

const REGISTER: &str = "/_matrix/client/v3/register";

async fn open_registration_uses_dummy_stage(backend: Backend) {
    let server = Server::start(backend).await;
    let first = server.post(REGISTER, None, json!({"username": "alice", "password": "secret-pass"})).await;
    assert_eq!(first.status, 401);
    assert_eq!(first.body["flows"], json!([{"stages": ["m.login.dummy"]}]));
    let alice = server.register("alice", "secret-pass").await;
    assert_eq!(alice.user_id, "@alice:localhost");
    let me = server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await;
    assert_eq!(me.assert_ok()["user_id"], "@alice:localhost");
    assert_eq!(me.body["device_id"], alice.device_id.as_str());
    assert_ne!(me.body["is_guest"], true);
}

async fn usernames_are_validated(backend: Backend) {
    let server = Server::start(backend).await;
    let too_long = "a".repeat(250);
    for bad in ["Alice", "al ice", "ali:ce", "ålice", "", too_long.as_str()] {
        server
            .post(REGISTER, None, json!({"username": bad, "password": "secret-pass"}))
            .await
            .assert_error(400, "M_INVALID_USERNAME");
    }
    // All the characters the spec allows.
    server.register("a.b_c=d-e/f+g9", "secret-pass").await;
}

async fn taken_usernames_are_refused(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("alice", "secret-pass").await;
    server
        .post(REGISTER, None, json!({"username": "alice", "password": "other-pass"}))
        .await
        .assert_error(400, "M_USER_IN_USE");
}

async fn username_availability(backend: Backend) {
    let server = Server::start(backend).await;
    let resp = server.get("/_matrix/client/v3/register/available?username=alice", None).await;
    assert_eq!(resp.assert_ok()["available"], true);
    server.register("alice", "secret-pass").await;
    server.get("/_matrix/client/v3/register/available?username=alice", None).await.assert_error(400, "M_USER_IN_USE");
    server
        .get("/_matrix/client/v3/register/available?username=Not%20Valid", None)
        .await
        .assert_error(400, "M_INVALID_USERNAME");
    server.get("/_matrix/client/v3/register/available", None).await.assert_error(400, "M_INVALID_PARAM");
}

async fn guests_are_refused(backend: Backend) {
    let server = Server::start(backend).await;
    server.post(&format!("{REGISTER}?kind=guest"), None, json!({})).await.assert_error(403, "M_GUEST_ACCESS_FORBIDDEN");
}

async fn disabled_registration_is_forbidden(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_REGISTRATION", "disabled").start().await;
    server
        .post(REGISTER, None, json!({"username": "alice", "password": "secret-pass"}))
        .await
        .assert_error(403, "M_FORBIDDEN");
}

async fn token_registration(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_REGISTRATION", "token").start().await;
    let out = server.cli(&["registration-token", "create", "--token", "letmein"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "letmein");

    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
    assert_eq!(server.get(&format!("{validity}?token=letmein"), None).await.assert_ok()["valid"], true);
    assert_eq!(server.get(&format!("{validity}?token=wrong"), None).await.assert_ok()["valid"], false);

    let first = server.post(REGISTER, None, json!({"username": "alice", "password": "secret-pass"})).await;
    assert_eq!(first.status, 401);
    assert_eq!(first.body["flows"], json!([{"stages": ["m.login.registration_token"]}]));
    let session = first.body["session"].as_str().unwrap().to_owned();

    // A dummy stage is not offered here, and a wrong token is refused with an auth error.
    let dummy = server
        .post(REGISTER, None, json!({"username": "alice", "password": "secret-pass", "auth": {"type": "m.login.dummy", "session": session}}))
        .await;
    assert_eq!(dummy.status, 401);
    let wrong = server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": "secret-pass",
                   "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}}),
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.body["errcode"], "M_FORBIDDEN");
    assert_eq!(wrong.body["session"], session.as_str());

    let ok = server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": "secret-pass",
                   "auth": {"type": "m.login.registration_token", "token": "letmein", "session": session}}),
        )
        .await;
    assert_eq!(ok.assert_ok()["user_id"], "@alice:localhost");
}

async fn registration_token_uses_run_out(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_REGISTRATION", "token").start().await;
    let out = server.cli(&["registration-token", "create", "--token", "once", "--uses-allowed", "1"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let register = |name: &'static str| {
        let server = &server;
        async move {
            server
                .post(
                    REGISTER,
                    None,
                    json!({"username": name, "password": "secret-pass",
                           "auth": {"type": "m.login.registration_token", "token": "once"}}),
                )
                .await
        }
    };
    register("alice").await.assert_ok();
    let second = register("bob").await;
    assert_eq!(second.status, 401, "{}", second.body);
    assert_eq!(second.body["errcode"], "M_FORBIDDEN");
    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity?token=once";
    assert_eq!(server.get(validity, None).await.assert_ok()["valid"], false);
    let list = server.cli(&["registration-token", "list"], None);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.lines().any(|l| l.starts_with("once") && l.ends_with("false")), "{text}");
    let revoke = server.cli(&["registration-token", "revoke", "once"], None);
    assert!(revoke.status.success());
    let revoke = server.cli(&["registration-token", "revoke", "once"], None);
    assert!(!revoke.status.success(), "revoking a missing token fails");
}

async fn inhibit_login_gives_no_session(backend: Backend) {
    let server = Server::start(backend).await;
    let resp = server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": "secret-pass", "inhibit_login": true, "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    let body = resp.assert_ok();
    assert_eq!(body["user_id"], "@alice:localhost");
    assert!(body.get("access_token").is_none(), "{body}");
    server.login("alice", "secret-pass").await.assert_ok();
}

async fn generated_username_and_given_device(backend: Backend) {
    let server = Server::start(backend).await;
    let resp = server
        .post(
            REGISTER,
            None,
            json!({"password": "secret-pass", "device_id": "MYDEVICE", "initial_device_display_name": "Laptop",
                   "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    let body = resp.assert_ok();
    assert!(body["user_id"].as_str().unwrap().ends_with(":localhost"));
    assert_eq!(body["device_id"], "MYDEVICE");
    let token = body["access_token"].as_str().unwrap();
    let device = server.get("/_matrix/client/v3/devices/MYDEVICE", Some(token)).await;
    assert_eq!(device.assert_ok()["display_name"], "Laptop");
}

async fn password_is_required(backend: Backend) {
    let server = Server::start(backend).await;
    server
        .post(REGISTER, None, json!({"username": "alice", "auth": {"type": "m.login.dummy"}}))
        .await
        .assert_error(400, "M_MISSING_PARAM");
}

async fn uia_sessions_are_bound_and_checked(backend: Backend) {
    let server = Server::start(backend).await;
    server
        .post(
            REGISTER,
            None,
            json!({"username": "alice", "password": "p", "auth": {"type": "m.login.dummy", "session": "made-up"}}),
        )
        .await
        .assert_error(400, "M_INVALID_PARAM");
    // A registration session cannot authorise deactivating somebody's account.
    let bob = server.register("bob", "bob-pass").await;
    let first = server.post(REGISTER, None, json!({"username": "carol", "password": "p"})).await;
    let session = first.body["session"].as_str().unwrap();
    server
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&bob.access_token),
            json!({"auth": {"type": "m.login.dummy", "session": session}}),
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    server.get("/_matrix/client/v3/account/whoami", Some(&bob.access_token)).await.assert_ok();
}
