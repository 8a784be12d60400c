//! Federation between two real Obmin processes over TLS on loopback: keys, the notary, X-Matrix
//! signed requests in both directions (remote profiles), and forged requests refused.

use conformance::{
    Backend, Server, ServerOptions, backend_tests, enc,
    federated::{SignedAs, federating, federation_request},
    federation_http,
};
use federation::{SigningKey, keys::verify_key_document, xmatrix};
use ruma::{ServerName, api::federation::discovery::ServerSigningKeys, serde::Raw};
use serde_json::{Value, json};

/// GET on a federation listener, optionally signed as `origin` with `key`.
async fn fed_get(server: &Server, path: &str, signed_as: Option<(&str, &SigningKey)>) -> (u16, Value) {
    let signed_as = signed_as.map(|(origin, key)| SignedAs::new(origin, key));
    federation_request(server, reqwest::Method::GET, path, None, signed_as).await
}

async fn version_and_key_server(backend: Backend) {
    let a = federating(backend).await;
    let (status, body) = fed_get(&a, "/_matrix/federation/v1/version", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["server"]["name"], "Obmin");

    let (status, body) = fed_get(&a, "/_matrix/key/v2/server", None).await;
    assert_eq!(status, 200, "{body}");
    let raw: Raw<ServerSigningKeys> = serde_json::from_value(body.clone()).unwrap();
    // Signed by the key it publishes, for the server's own name, valid for a while.
    let verified = verify_key_document(&ServerName::parse(&a.server_name).unwrap(), &raw).expect("self-signed");
    let key = a.signing_key();
    assert_eq!(verified.verify_keys.get(&key.key_id()), Some(&key.public_key_base64()));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(verified.valid_until_ts > now + 3_600_000, "{body}");

    // Unknown federation endpoints are Matrix errors on this listener too.
    let (status, body) = fed_get(&a, "/_matrix/federation/v1/nope", None).await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")));
}

async fn remote_profiles_and_notary(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    a.put(
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
        Some(&alice.access_token),
        json!({"displayname": "Alice of A"}),
    )
    .await
    .assert_ok();
    let bob = b.register("bob", "password-bob-1").await;
    assert!(alice.user_id.ends_with(&format!(":{}", a.server_name)));

    // B asks A (signed); A fetches B's key from B to check the signature.
    let resp = b.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), Some(&bob.access_token)).await;
    assert_eq!(resp.assert_ok()["displayname"], "Alice of A");
    let resp = b
        .get(&format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)), Some(&bob.access_token))
        .await;
    assert_eq!(resp.assert_ok()["displayname"], "Alice of A");
    // And the other way round.
    let resp = a.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), Some(&alice.access_token)).await;
    resp.assert_ok();
    // A remote user who does not exist.
    let ghost = format!("@ghost:{}", a.server_name);
    b.get(&format!("/_matrix/client/v3/profile/{}", enc(&ghost)), Some(&bob.access_token))
        .await
        .assert_error(404, "M_NOT_FOUND");

    // A, as a notary, vouches for B's keys: B's own signature and A's beside it.
    let (status, body) = fed_get(&a, &format!("/_matrix/key/v2/query/{}", enc(&b.server_name)), None).await;
    assert_eq!(status, 200, "{body}");
    let docs = body["server_keys"].as_array().expect("server_keys");
    assert_eq!(docs.len(), 1, "{body}");
    let raw: Raw<ServerSigningKeys> = serde_json::from_value(docs[0].clone()).unwrap();
    let verified = verify_key_document(&ServerName::parse(&b.server_name).unwrap(), &raw).unwrap();
    assert_eq!(verified.verify_keys.get(&b.signing_key().key_id()), Some(&b.signing_key().public_key_base64()));
    assert!(docs[0]["signatures"][&a.server_name].is_object(), "notary signature: {body}");
    // The batch form, for B and for A itself.
    let url = format!("{}/_matrix/key/v2/query", a.federation_url.as_ref().unwrap());
    let body: Value = federation_http()
        .post(url)
        .json(&json!({"server_keys": {&b.server_name: {}, &a.server_name: {}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> =
        body["server_keys"].as_array().unwrap().iter().map(|d| d["server_name"].as_str().unwrap()).collect();
    assert!(names.contains(&b.server_name.as_str()) && names.contains(&a.server_name.as_str()), "{body}");
}

async fn forged_requests_are_refused(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let path = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&alice.user_id));

    // No signature at all.
    let (status, body) = fed_get(&a, &path, None).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    // Claims to be B but signed with another key under B's key id: A fetches B's real key.
    let real = b.signing_key();
    let forged = SigningKey::parse(&format!(
        "ed25519 {} AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        real.key_id().trim_start_matches("ed25519:")
    ))
    .unwrap();
    let (status, body) = fed_get(&a, &path, Some((&b.server_name, &forged))).await;
    assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{body}");
    // Signed with B's real key: accepted.
    let (status, body) = fed_get(&a, &path, Some((&b.server_name, &real))).await;
    assert_eq!(status, 200, "{body}");
    // A request signed for another destination is refused.
    let url = format!("{}{path}", a.federation_url.as_ref().unwrap());
    let mut request = http::Request::get(&url).body(Vec::new()).unwrap();
    xmatrix::sign_request(
        &mut request,
        &ServerName::parse(&b.server_name).unwrap(),
        &ServerName::parse("elsewhere.example").unwrap(),
        &real,
    )
    .unwrap();
    let response = federation_http().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    // A server that does not exist cannot be asked for its key.
    let stranger = SigningKey::parse("ed25519 a_x AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
    let (status, _) = fed_get(&a, &path, Some(("localhost:1", &stranger))).await;
    assert_eq!(status, 401);
}

async fn private_targets_are_refused_by_default(backend: Backend) {
    let a = federating(backend).await;
    // B keeps the defaults: no loopback targets, certificates checked.
    let b = ServerOptions::new(backend)
        .federating()
        .env("OBMIN_FEDERATION_ALLOW_PRIVATE_TARGETS", "false")
        .env("OBMIN_FEDERATION_VERIFY_CERTIFICATES", "true")
        .start()
        .await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let url = b.url(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)));
    let response = b.http.get(url).bearer_auth(&bob.access_token).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(body["errcode"].is_string(), "{body}");
    // The reason is logged; the client learns nothing about our network or the target's.
    let error = body["error"].as_str().unwrap();
    assert!(!error.contains("127.0.0.1") && !error.contains("not allowed"), "{body}");
    // The log is copied from the process's stderr by a thread: give it time.
    let mut logged = false;
    for _ in 0..100 {
        if b.log().contains("not allowed as federation targets") {
            logged = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(logged, "the reason is in the server's log");
}

/// Device keys (signed by a fresh device key) and one-time keys for `user`.
pub(crate) fn device_and_one_time_keys(user: &conformance::User) -> (Value, Value) {
    use ruma::{
        CanonicalJsonValue,
        serde::Base64,
        signatures::{Ed25519KeyPair, sign_json},
    };
    let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), user.device_id.clone()).unwrap();
    let public = Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(pair.public_key().to_vec()).encode();
    let sign = |value: Value| {
        let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(value).unwrap() else { panic!() };
        sign_json(&user.user_id, &pair, &mut object).unwrap();
        serde_json::to_value(object).unwrap()
    };
    let device = sign(json!({
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", user.device_id): "curve25519publickeyplaceholderAAAAAAAAAAAA",
            format!("ed25519:{}", user.device_id): public,
        },
    }));
    let mut otks = serde_json::Map::new();
    for i in 0..2 {
        otks.insert(format!("signed_curve25519:AAAA{i:02}"), sign(json!({"key": format!("otk{i:02}")})));
    }
    (device, Value::Object(otks))
}

async fn keys_query_and_claim_across_servers(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let (device, otks) = device_and_one_time_keys(&bob);
    b.post(
        "/_matrix/client/v3/keys/upload",
        Some(&bob.access_token),
        json!({"device_keys": device, "one_time_keys": otks}),
    )
    .await
    .assert_ok();

    // Alice on A queries Bob's device keys on B, and a server that is down at the same time.
    let down = format!("@carol:localhost:{}", conformance::free_port());
    let query = a
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&alice.access_token),
            json!({"device_keys": {&bob.user_id: [], &down: []}}),
        )
        .await;
    let body = query.assert_ok();
    let got = &body["device_keys"][&bob.user_id][&bob.device_id];
    assert_eq!(got["keys"], device["keys"], "{body}");
    assert_eq!(got["signatures"], device["signatures"]);
    let down_server = down.split_once(':').unwrap().1;
    assert!(body["failures"][down_server].is_object(), "{body}");

    // Claims go to B and hand out each one-time key once.
    let claim = json!({"one_time_keys": {&bob.user_id: {(bob.device_id.as_str()): "signed_curve25519"}}});
    let mut seen = Vec::new();
    for _ in 0..3 {
        let resp = a.post("/_matrix/client/v3/keys/claim", Some(&alice.access_token), claim.clone()).await;
        let keys = resp.assert_ok()["one_time_keys"][&bob.user_id][&bob.device_id].clone();
        if let Some(map) = keys.as_object() {
            seen.extend(map.keys().cloned());
        }
    }
    seen.sort();
    assert_eq!(seen, vec!["signed_curve25519:AAAA00", "signed_curve25519:AAAA01"]);
}

async fn aliases_and_user_devices_across_servers(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"room_alias_name": "lobby"})).await;
    let alias = format!("#lobby:{}", a.server_name);

    // B resolves A's alias by asking A.
    let resp = b.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias)), Some(&bob.access_token)).await;
    let body = resp.assert_ok();
    assert_eq!(body["room_id"], room_id.as_str());
    assert_eq!(body["servers"], json!([a.server_name]));
    let missing = format!("#nothing:{}", a.server_name);
    b.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&missing)), Some(&bob.access_token))
        .await
        .assert_error(404, "M_NOT_FOUND");

    // A's user devices, asked as B (signed with B's key).
    let (device, _) = device_and_one_time_keys(&alice);
    a.post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), json!({"device_keys": device}))
        .await
        .assert_ok();
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc(&alice.user_id));
    let (status, body) = fed_get(&a, &path, Some((&b.server_name, &b.signing_key()))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user_id"], alice.user_id.as_str());
    assert_eq!(body["devices"][0]["device_id"], alice.device_id.as_str(), "{body}");
    assert_eq!(body["devices"][0]["keys"]["keys"], device["keys"]);
    assert!(body["stream_id"].as_u64().is_some(), "{body}");
    let (status, _) = fed_get(&a, &path, None).await;
    assert_eq!(status, 401);

    // A's public rooms, listed for B's user.
    let public =
        a.create_room(&alice, json!({"visibility": "public", "name": "Town square", "preset": "public_chat"})).await;
    let resp =
        b.get(&format!("/_matrix/client/v3/publicRooms?server={}", enc(&a.server_name)), Some(&bob.access_token)).await;
    let body = resp.assert_ok();
    let rooms: Vec<&str> = body["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
    assert_eq!(rooms, vec![public.as_str()], "{body}");
    assert_eq!(body["chunk"][0]["name"], "Town square");
    // The filtered form, straight to A's federation listener as B.
    let url = format!("{}/_matrix/federation/v1/publicRooms", a.federation_url.as_ref().unwrap());
    let mut request = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(br#"{"filter":{"generic_search_term":"nomatch"}}"#.to_vec())
        .unwrap();
    xmatrix::sign_request(
        &mut request,
        &ServerName::parse(&b.server_name).unwrap(),
        &ServerName::parse(&a.server_name).unwrap(),
        &b.signing_key(),
    )
    .unwrap();
    let response = federation_http().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["chunk"], json!([]), "{body}");
}

async fn media_download_over_federation(backend: Backend) {
    let a = federating(backend).await;
    let b = federating(backend).await;
    let alice = a.register("alice", "password-alice-1").await;
    let file: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let resp = a
        .http
        .post(a.url("/_matrix/media/v3/upload?filename=data.bin"))
        .bearer_auth(&alice.access_token)
        .header("content-type", "application/octet-stream")
        .body(file.clone())
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let mxc = body["content_uri"].as_str().expect("content_uri").to_owned();
    let media_id = mxc.rsplit('/').next().unwrap();

    let url = format!("{}/_matrix/federation/v1/media/download/{media_id}", a.federation_url.as_ref().unwrap());
    let mut request = http::Request::get(&url).body(Vec::new()).unwrap();
    xmatrix::sign_request(
        &mut request,
        &ServerName::parse(&b.server_name).unwrap(),
        &ServerName::parse(&a.server_name).unwrap(),
        &b.signing_key(),
    )
    .unwrap();
    let response = federation_http().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    let boundary = content_type.split("boundary=").nth(1).expect("multipart boundary").to_owned();
    let bytes = response.bytes().await.unwrap();
    // JSON part, then the file, then the closing boundary.
    let head = format!("--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n");
    assert!(bytes.starts_with(head.as_bytes()));
    let start = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let second = head.len() + bytes[head.len()..].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(second > start);
    let tail = format!("\r\n--{boundary}--\r\n");
    assert!(bytes.ends_with(tail.as_bytes()));
    assert_eq!(&bytes[second..bytes.len() - tail.len()], file.as_slice());

    // A thumbnail of an image, the same way.
    let mut png = Vec::new();
    image::DynamicImage::new_rgb8(200, 100)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let resp = a
        .http
        .post(a.url("/_matrix/media/v3/upload"))
        .bearer_auth(&alice.access_token)
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let image_id = body["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let url = format!(
        "{}/_matrix/federation/v1/media/thumbnail/{image_id}?width=50&height=50&method=scale",
        a.federation_url.as_ref().unwrap()
    );
    let mut request = http::Request::get(&url).body(Vec::new()).unwrap();
    xmatrix::sign_request(
        &mut request,
        &ServerName::parse(&b.server_name).unwrap(),
        &ServerName::parse(&a.server_name).unwrap(),
        &b.signing_key(),
    )
    .unwrap();
    let response = federation_http().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("multipart/mixed; boundary="));
    let bytes = response.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("Content-Type: image/png\r\n"), "the thumbnail part is a PNG");

    // Unsigned: refused; unknown media: 404.
    let (status, _) = fed_get(&a, &format!("/_matrix/federation/v1/media/download/{media_id}"), None).await;
    assert_eq!(status, 401);
    let (status, body) =
        fed_get(&a, "/_matrix/federation/v1/media/download/nothingHere", Some((&b.server_name, &b.signing_key())))
            .await;
    assert_eq!((status, body["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{body}");
}

backend_tests!(
    media_download_over_federation,
    aliases_and_user_devices_across_servers,
    keys_query_and_claim_across_servers,
    version_and_key_server,
    remote_profiles_and_notary,
    forged_requests_are_refused,
    private_targets_are_refused_by_default
);
