use conformance::{Backend, Server, backend_tests};
use serde_json::json;

backend_tests!(
    display_name_and_avatar,
    custom_fields_and_deletion,
    only_the_owner_may_change_a_profile,
    profile_limits_and_bad_values
);

async fn display_name_and_avatar(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    let base = "/_matrix/client/v3/profile/@alice:localhost";

    // A new account is named after its localpart until it says otherwise.
    assert_eq!(server.get(&format!("{base}/displayname"), None).await.assert_ok()["displayname"], "alice");
    server.put(&format!("{base}/displayname"), token, json!({"displayname": "Alice Liddell"})).await.assert_ok();
    server.put(&format!("{base}/avatar_url"), token, json!({"avatar_url": "mxc://localhost/abcdef"})).await.assert_ok();

    assert_eq!(server.get(&format!("{base}/displayname"), None).await.assert_ok()["displayname"], "Alice Liddell");
    assert_eq!(
        server.get(&format!("{base}/avatar_url"), None).await.assert_ok()["avatar_url"],
        "mxc://localhost/abcdef"
    );
    let whole = server.get(base, None).await;
    assert_eq!(whole.assert_ok(), &json!({"displayname": "Alice Liddell", "avatar_url": "mxc://localhost/abcdef"}));
    // The legacy r0 paths answer too.
    let legacy = server.get("/_matrix/client/r0/profile/@alice:localhost/displayname", None).await;
    assert_eq!(legacy.assert_ok()["displayname"], "Alice Liddell");

    server.get("/_matrix/client/v3/profile/@nobody:localhost", None).await.assert_error(404, "M_NOT_FOUND");
}

async fn custom_fields_and_deletion(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    let base = "/_matrix/client/v3/profile/@alice:localhost";
    server.put(&format!("{base}/m.tz"), token, json!({"m.tz": "Europe/Kyiv"})).await.assert_ok();
    server
        .put(&format!("{base}/org.obmin.avatar_color"), token, json!({"org.obmin.avatar_color": "#3b82f6"}))
        .await
        .assert_ok();
    let whole = server.get(base, None).await;
    assert_eq!(whole.assert_ok()["org.obmin.avatar_color"], "#3b82f6");
    assert_eq!(whole.body["m.tz"], "Europe/Kyiv");

    server.delete(&format!("{base}/m.tz"), token, None).await.assert_ok();
    server.get(&format!("{base}/m.tz"), None).await.assert_error(404, "M_NOT_FOUND");
    // Setting the display name to "" clears it, as older clients do.
    server.put(&format!("{base}/displayname"), token, json!({"displayname": "A"})).await.assert_ok();
    server.put(&format!("{base}/displayname"), token, json!({"displayname": ""})).await.assert_ok();
    let whole = server.get(base, None).await;
    assert!(whole.assert_ok().get("displayname").is_none(), "{}", whole.body);
}

async fn only_the_owner_may_change_a_profile(backend: Backend) {
    let server = Server::start(backend).await;
    server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let path = "/_matrix/client/v3/profile/@alice:localhost/displayname";
    server.put(path, Some(&bob.access_token), json!({"displayname": "Mallory"})).await.assert_error(403, "M_FORBIDDEN");
    server.delete(path, Some(&bob.access_token), None).await.assert_error(403, "M_FORBIDDEN");
    server.put(path, None, json!({"displayname": "Mallory"})).await.assert_error(401, "M_MISSING_TOKEN");
    // Alice's name is still the one she was given at registration.
    assert_eq!(server.get(path, None).await.assert_ok()["displayname"], "alice");
}

async fn profile_limits_and_bad_values(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    let base = "/_matrix/client/v3/profile/@alice:localhost";
    let resp =
        server.put(&format!("{base}/avatar_url"), token, json!({"avatar_url": "https://evil.example/x.png"})).await;
    assert_eq!(resp.status, 400, "{}", resp.body);
    server
        .put(&format!("{base}/displayname"), token, json!({"displayname": "x".repeat(300)}))
        .await
        .assert_error(400, "M_INVALID_PARAM");
    // A whole profile is at most 64 KiB.
    let chunk = "y".repeat(40_000);
    server.put(&format!("{base}/org.example.a"), token, json!({"org.example.a": chunk})).await.assert_ok();
    server
        .put(&format!("{base}/org.example.b"), token, json!({"org.example.b": chunk}))
        .await
        .assert_error(400, "M_PROFILE_TOO_LARGE");
}
