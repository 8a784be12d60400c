use conformance::{Backend, Server, ServerOptions, backend_tests};

backend_tests!(
    versions_lists_spec_versions,
    well_known_client_points_at_base_url,
    well_known_server_is_404_unless_configured,
    capabilities_describe_the_server
);

async fn versions_lists_spec_versions(backend: Backend) {
    let server = Server::start(backend).await;
    let resp = server.get("/_matrix/client/versions", None).await;
    let versions = resp.assert_ok()["versions"].as_array().expect("versions").clone();
    assert!(versions.iter().any(|v| v == "v1.16"), "{versions:?}");
    assert!(versions.iter().any(|v| v == "v1.1"), "{versions:?}");
    // CORS, so browser clients such as Element Web can talk to us.
    let resp = server
        .http
        .request(reqwest::Method::OPTIONS, server.url("/_matrix/client/versions"))
        .header("Origin", "https://app.element.io")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
}

async fn well_known_client_points_at_base_url(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_PUBLIC_BASEURL", "https://matrix.example.org").start().await;
    let resp = server.get("/.well-known/matrix/client", None).await;
    assert_eq!(resp.assert_ok()["m.homeserver"]["base_url"], "https://matrix.example.org");
}

async fn well_known_server_is_404_unless_configured(backend: Backend) {
    let server = Server::start(backend).await;
    server.get("/.well-known/matrix/server", None).await.assert_error(404, "M_NOT_FOUND");
    let server = ServerOptions::new(backend).env("OBMIN_WELL_KNOWN_SERVER", "matrix.example.org:443").start().await;
    let resp = server.get("/.well-known/matrix/server", None).await;
    assert_eq!(resp.assert_ok()["m.server"], "matrix.example.org:443");
}

async fn capabilities_describe_the_server(backend: Backend) {
    let server = Server::start(backend).await;
    server.get("/_matrix/client/v3/capabilities", None).await.assert_error(401, "M_MISSING_TOKEN");
    let alice = server.register("alice", "secret-pass").await;
    let resp = server.get("/_matrix/client/v3/capabilities", Some(&alice.access_token)).await;
    let caps = &resp.assert_ok()["capabilities"];
    // Absent means enabled (the spec's default), so only an explicit `false` is wrong.
    assert_ne!(caps["m.change_password"]["enabled"], false);
    assert_eq!(caps["m.profile_fields"]["enabled"], true);
    assert_eq!(caps["m.room_versions"]["default"], "12");
    assert_eq!(caps["m.room_versions"]["available"]["11"], "stable");
}
