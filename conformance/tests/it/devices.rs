use conformance::{Backend, Server, backend_tests};
use serde_json::json;

backend_tests!(list_get_and_rename_devices, delete_device_needs_uia, delete_devices_in_bulk);

async fn list_get_and_rename_devices(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    let list = server.get("/_matrix/client/v3/devices", token).await;
    let devices = list.assert_ok()["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["device_id"], alice.device_id.as_str());
    assert!(devices[0]["last_seen_ts"].as_u64().is_some(), "{devices:?}");
    assert_eq!(devices[0]["last_seen_ip"], "127.0.0.1");

    let path = format!("/_matrix/client/v3/devices/{}", alice.device_id);
    server.put(&path, token, json!({"display_name": "Work laptop"})).await.assert_ok();
    assert_eq!(server.get(&path, token).await.assert_ok()["display_name"], "Work laptop");

    server.get("/_matrix/client/v3/devices/NOPE", token).await.assert_error(404, "M_NOT_FOUND");
    server
        .put("/_matrix/client/v3/devices/NOPE", token, json!({"display_name": "x"}))
        .await
        .assert_error(404, "M_NOT_FOUND");
    // Somebody else's device is not visible.
    let bob = server.register("bob", "bob-pass").await;
    server.get(&path, Some(&bob.access_token)).await.assert_error(404, "M_NOT_FOUND");
}

async fn delete_device_needs_uia(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let phone = server.login("alice", "secret-pass").await.body["device_id"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/devices/{phone}");
    let token = Some(alice.access_token.as_str());

    server.delete("/_matrix/client/v3/devices/NOPE", token, Some(json!({}))).await.assert_error(404, "M_NOT_FOUND");
    let first = server.delete(&path, token, Some(json!({}))).await;
    assert_eq!(first.status, 401);
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                      "password": "secret-pass", "session": first.body["session"]});
    server.delete(&path, token, Some(json!({"auth": auth}))).await.assert_ok();
    server.get(&path, token).await.assert_error(404, "M_NOT_FOUND");
}

async fn delete_devices_in_bulk(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(server.login("alice", "secret-pass").await.body["device_id"].as_str().unwrap().to_owned());
    }
    let token = Some(alice.access_token.as_str());
    let body = json!({"devices": [others[0], others[1], "UNKNOWN"],
                      "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "secret-pass"}});
    server.post("/_matrix/client/v3/delete_devices", token, body).await.assert_ok();
    let list = server.get("/_matrix/client/v3/devices", token).await;
    let mut ids: Vec<String> = list.assert_ok()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![alice.device_id.clone(), others[2].clone()];
    expected.sort();
    assert_eq!(ids, expected);
}
