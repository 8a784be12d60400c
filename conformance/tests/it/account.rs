use conformance::{Backend, Server, backend_tests};
use serde_json::json;

backend_tests!(password_change_needs_the_old_password, password_change_can_keep_devices, deactivation_is_final);

async fn password_change_needs_the_old_password(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "old-pass").await;
    let other = server.login("alice", "old-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let path = "/_matrix/client/v3/account/password";

    let first = server.post(path, Some(&alice.access_token), json!({"new_password": "new-pass"})).await;
    assert_eq!(first.status, 401);
    assert_eq!(first.body["flows"], json!([{"stages": ["m.login.password"]}]));
    let session = first.body["session"].as_str().unwrap().to_owned();

    let auth = |password: &str, user: &str| {
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
               "password": password, "session": session})
    };
    let wrong = server
        .post(path, Some(&alice.access_token), json!({"new_password": "new-pass", "auth": auth("nope", "alice")}))
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.body["errcode"], "M_FORBIDDEN");
    // Somebody else's correct password does not authorise alice's change.
    server.register("bob", "bob-pass").await;
    let bob = server
        .post(path, Some(&alice.access_token), json!({"new_password": "new-pass", "auth": auth("bob-pass", "bob")}))
        .await;
    assert_eq!(bob.status, 401);

    server
        .post(
            path,
            Some(&alice.access_token),
            json!({"new_password": "new-pass", "auth": auth("old-pass", "@alice:localhost")}),
        )
        .await
        .assert_ok();
    server.login("alice", "old-pass").await.assert_error(403, "M_FORBIDDEN");
    server.login("alice", "new-pass").await.assert_ok();
    // By default every other device is logged out; this one stays.
    server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await.assert_ok();
    server.get("/_matrix/client/v3/account/whoami", Some(&other)).await.assert_error(401, "M_UNKNOWN_TOKEN");
}

async fn password_change_can_keep_devices(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "old-pass").await;
    let other = server.login("alice", "old-pass").await.body["access_token"].as_str().unwrap().to_owned();
    server
        .post(
            "/_matrix/client/v3/account/password",
            Some(&alice.access_token),
            json!({"new_password": "new-pass", "logout_devices": false,
                   "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "old-pass"}}),
        )
        .await
        .assert_ok();
    server.get("/_matrix/client/v3/account/whoami", Some(&other)).await.assert_ok();
}

async fn deactivation_is_final(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    server
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            Some(&alice.access_token),
            json!({"displayname": "Alice"}),
        )
        .await
        .assert_ok();
    let path = "/_matrix/client/v3/account/deactivate";
    let first = server.post(path, Some(&alice.access_token), json!({})).await;
    assert_eq!(first.status, 401);
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                      "password": "secret-pass", "session": first.body["session"]});
    let done = server.post(path, Some(&alice.access_token), json!({"auth": auth})).await;
    assert_eq!(done.assert_ok()["id_server_unbind_result"], "no-support");

    server
        .get("/_matrix/client/v3/account/whoami", Some(&alice.access_token))
        .await
        .assert_error(401, "M_UNKNOWN_TOKEN");
    server.login("alice", "secret-pass").await.assert_error(403, "M_USER_DEACTIVATED");
    server.get("/_matrix/client/v3/profile/@alice:localhost", None).await.assert_error(404, "M_NOT_FOUND");
    // The user id is never handed out again.
    server
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}}),
        )
        .await
        .assert_error(400, "M_USER_IN_USE");
}
