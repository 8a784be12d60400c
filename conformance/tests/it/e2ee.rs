//! End-to-end encryption on the server: keys, claims, to-device, device lists, cross-signing
//! and key backup. Keys are real ed25519 keys and signatures made here.

use conformance::{Backend, Server, User, backend_tests, enc};
use ruma::{
    CanonicalJsonValue,
    serde::Base64,
    signatures::{Ed25519KeyPair, sign_json},
};
use serde_json::{Value, json};

backend_tests!(
    device_keys_are_checked_and_queried,
    one_time_keys_are_claimed_exactly_once,
    fallback_keys_and_counts_in_sync,
    to_device_messages_are_delivered_once,
    device_list_changes_reach_room_members,
    cross_signing_and_signatures,
    key_backup_versions_and_keys
);

pub(crate) struct Signer {
    pair: Ed25519KeyPair,
    pub(crate) public: String,
}

impl Signer {
    /// A device's key: its key id is `ed25519:<device id>`.
    fn new(version: &str) -> Self {
        let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.to_owned()).unwrap();
        let public = Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(pair.public_key().to_vec()).encode();
        Self { pair, public }
    }

    /// A cross-signing key: its key id is `ed25519:<public key>`.
    pub(crate) fn cross_signing() -> Self {
        let der = Ed25519KeyPair::generate();
        let probe = Ed25519KeyPair::from_der(&der, String::new()).unwrap();
        let public = Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(probe.public_key().to_vec()).encode();
        Self { pair: Ed25519KeyPair::from_der(&der, public.clone()).unwrap(), public }
    }

    pub(crate) fn sign(&self, entity: &str, value: Value) -> Value {
        let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(value).unwrap() else { panic!() };
        sign_json(entity, &self.pair, &mut object).unwrap();
        serde_json::to_value(object).unwrap()
    }
}

fn device_keys(user: &User, signer: &Signer) -> Value {
    let unsigned = json!({
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{}", user.device_id): "curve25519publickeyplaceholderAAAAAAAAAAAA",
            format!("ed25519:{}", user.device_id): signer.public,
        },
    });
    signer.sign(&user.user_id, unsigned)
}

async fn device_keys_are_checked_and_queried(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let signer = Signer::new(&alice.device_id);
    let keys = device_keys(&alice, &signer);

    // A tampered key (the curve25519 key changed after signing) is refused.
    let mut tampered = keys.clone();
    tampered["keys"][format!("curve25519:{}", alice.device_id)] = json!("somebodyelseskeyAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let resp = server
        .post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), json!({"device_keys": tampered}))
        .await;
    resp.assert_error(400, "M_INVALID_PARAM");
    // Keys for another device or user are refused.
    let mut other = keys.clone();
    other["device_id"] = json!("OTHER");
    server
        .post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), json!({"device_keys": other}))
        .await
        .assert_error(400, "M_INVALID_PARAM");

    server
        .post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), json!({"device_keys": keys}))
        .await
        .assert_ok();
    let query = server
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob.access_token),
            json!({"device_keys": {"@alice:localhost": []}}),
        )
        .await;
    let got = &query.assert_ok()["device_keys"]["@alice:localhost"][&alice.device_id];
    assert_eq!(got["keys"], keys["keys"]);
    assert_eq!(got["signatures"], keys["signatures"]);
    let only = server
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob.access_token),
            json!({"device_keys": {"@alice:localhost": ["NOPE"]}}),
        )
        .await;
    assert_eq!(only.assert_ok()["device_keys"]["@alice:localhost"], json!({}));
}

async fn one_time_keys_are_claimed_exactly_once(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let signer = Signer::new(&alice.device_id);
    let mut otks = serde_json::Map::new();
    for i in 0..50 {
        let key = signer.sign(&alice.user_id, json!({"key": format!("otk{i:02}")}));
        otks.insert(format!("signed_curve25519:AAAA{i:02}"), key);
    }
    let up =
        server.post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), json!({"one_time_keys": otks})).await;
    assert_eq!(up.assert_ok()["one_time_key_counts"]["signed_curve25519"], 50);
    // Same id, different key: refused.
    let clash = json!({"signed_curve25519:AAAA00": signer.sign(&alice.user_id, json!({"key": "different"}))});
    server
        .post("/_matrix/client/v3/keys/upload", Some(&alice.access_token), json!({"one_time_keys": clash}))
        .await
        .assert_error(400, "M_INVALID_PARAM");

    // 60 concurrent claims for 50 keys: 50 distinct keys, then nothing (no fallback key).
    let body = json!({"one_time_keys": {"@alice:localhost": {(alice.device_id.as_str()): "signed_curve25519"}}});
    let claims = (0..60).map(|_| server.post("/_matrix/client/v3/keys/claim", Some(&bob.access_token), body.clone()));
    let results = futures_util::future::join_all(claims).await;
    let mut claimed = Vec::new();
    for r in results {
        let keys = r.assert_ok()["one_time_keys"]["@alice:localhost"][&alice.device_id].clone();
        if let Some(map) = keys.as_object() {
            claimed.extend(map.keys().cloned());
        }
    }
    claimed.sort();
    let before = claimed.len();
    claimed.dedup();
    assert_eq!(before, claimed.len(), "a one-time key was handed out twice");
    assert_eq!(claimed.len(), 50, "every claim got a key while keys were left");
    let sync = server.sync(&alice, None, 0, None).await;
    assert!(
        sync["device_one_time_keys_count"]["signed_curve25519"].is_null()
            || sync["device_one_time_keys_count"]["signed_curve25519"] == 0
    );
}

async fn fallback_keys_and_counts_in_sync(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let signer = Signer::new(&alice.device_id);
    let fallback =
        json!({"signed_curve25519:FB1": signer.sign(&alice.user_id, json!({"key": "fallback", "fallback": true}))});
    let otk = json!({"signed_curve25519:K1": signer.sign(&alice.user_id, json!({"key": "one"}))});
    server
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.access_token),
            json!({"one_time_keys": otk, "fallback_keys": fallback}),
        )
        .await
        .assert_ok();
    let sync = server.sync(&alice, None, 0, None).await;
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 1);
    assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    let body = json!({"one_time_keys": {"@alice:localhost": {(alice.device_id.as_str()): "signed_curve25519"}}});
    let first = server.post("/_matrix/client/v3/keys/claim", Some(&bob.access_token), body.clone()).await;
    assert!(
        first.assert_ok()["one_time_keys"]["@alice:localhost"][&alice.device_id]["signed_curve25519:K1"].is_object()
    );
    // Out of one-time keys: the fallback key, again and again.
    for _ in 0..2 {
        let again = server.post("/_matrix/client/v3/keys/claim", Some(&bob.access_token), body.clone()).await;
        assert!(
            again.assert_ok()["one_time_keys"]["@alice:localhost"][&alice.device_id]["signed_curve25519:FB1"]
                .is_object()
        );
    }
    let sync = server.sync(&alice, None, 0, None).await;
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
}

async fn to_device_messages_are_delivered_once(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let phone = server.login("bob", "bob-pass").await;
    let phone = User {
        access_token: phone.body["access_token"].as_str().unwrap().to_owned(),
        device_id: phone.body["device_id"].as_str().unwrap().to_owned(),
        ..bob.clone()
    };
    let since = server.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    let path = "/_matrix/client/v3/sendToDevice/m.test/txn1";
    let body = json!({"messages": {"@bob:localhost": {(bob.device_id.as_str()): {"n": 1}}}});
    server.put(path, Some(&alice.access_token), body.clone()).await.assert_ok();
    server.put(path, Some(&alice.access_token), body).await.assert_ok(); // retried: not queued twice
    server
        .put(
            "/_matrix/client/v3/sendToDevice/m.test/txn2",
            Some(&alice.access_token),
            json!({"messages": {"@bob:localhost": {"*": {"n": 2}}}}),
        )
        .await
        .assert_ok();

    let first = server.sync(&bob, Some(&since), 0, None).await;
    let events = first["to_device"]["events"].as_array().cloned().unwrap_or_default();
    let ns: Vec<i64> = events.iter().map(|e| e["content"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, vec![1, 2], "{events:?}");
    assert_eq!(events[0]["sender"], "@alice:localhost");
    assert_eq!(events[0]["type"], "m.test");
    // Retrying the same sync (a lost response) delivers them again...
    let retry = server.sync(&bob, Some(&since), 0, None).await;
    assert_eq!(retry["to_device"]["events"].as_array().map(|e| e.len()), Some(2));
    // ...moving on acknowledges and deletes them.
    let next = retry["next_batch"].as_str().unwrap().to_owned();
    let after = server.sync(&bob, Some(&next), 0, None).await;
    assert!(after["to_device"]["events"].as_array().is_none_or(|e| e.is_empty()), "{after}");
    // The `*` message also went to bob's phone, and only that one.
    let phone_sync = server.sync(&phone, None, 0, None).await;
    let ns: Vec<i64> = phone_sync["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, vec![2]);
}

async fn device_list_changes_reach_room_members(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    let bob_since = server.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    let carol_since = server.sync(&carol, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    let signer = Signer::new(&alice.device_id);
    server
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.access_token),
            json!({"device_keys": device_keys(&alice, &signer)}),
        )
        .await
        .assert_ok();
    let bob_sync = server.sync(&bob, Some(&bob_since), 0, None).await;
    assert!(bob_sync["device_lists"]["changed"].as_array().unwrap().contains(&json!("@alice:localhost")), "{bob_sync}");
    let carol_sync = server.sync(&carol, Some(&carol_since), 0, None).await;
    assert!(!carol_sync["device_lists"]["changed"].as_array().is_some_and(|c| c.contains(&json!("@alice:localhost"))));

    // Carol joins: bob must re-query her; then bob leaves and alice sees him go.
    let alice_since = server.sync(&alice, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    server.join(&carol, &room).await.assert_ok();
    server.membership(&bob, &room, "leave", None).await.assert_ok();
    let alice_sync = server.sync(&alice, Some(&alice_since), 0, None).await;
    assert!(
        alice_sync["device_lists"]["changed"].as_array().unwrap().contains(&json!("@carol:localhost")),
        "{alice_sync}"
    );
    assert!(alice_sync["device_lists"]["left"].as_array().unwrap().contains(&json!("@bob:localhost")), "{alice_sync}");
    let changes = server
        .get(
            &format!(
                "/_matrix/client/v3/keys/changes?from={}&to={}",
                enc(&bob_since),
                enc(alice_sync["next_batch"].as_str().unwrap())
            ),
            Some(&alice.access_token),
        )
        .await;
    assert!(changes.assert_ok()["changed"].as_array().unwrap().contains(&json!("@alice:localhost")));
}

async fn cross_signing_and_signatures(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let device = Signer::new(&alice.device_id);
    server
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&alice.access_token),
            json!({"device_keys": device_keys(&alice, &device)}),
        )
        .await
        .assert_ok();

    let master = Signer::cross_signing();
    let master_id = format!("ed25519:{}", master.public);
    let self_signing = Signer::cross_signing();
    let master_key =
        json!({"user_id": "@alice:localhost", "usage": ["master"], "keys": {(master_id.as_str()): master.public}});
    let ssk_key = master.sign(
        "@alice:localhost",
        json!({"user_id": "@alice:localhost", "usage": ["self_signing"], "keys": {(format!("ed25519:{}", self_signing.public)): self_signing.public}}),
    );
    // The self-signing key must be signed by the master key.
    let unsigned_ssk = json!({"user_id": "@alice:localhost", "usage": ["self_signing"], "keys": {(format!("ed25519:{}", self_signing.public)): self_signing.public}});
    server
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.access_token),
            json!({"master_key": master_key, "self_signing_key": unsigned_ssk}),
        )
        .await
        .assert_error(400, "M_INVALID_PARAM");
    // First upload: no re-authentication needed.
    server
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice.access_token),
            json!({"master_key": master_key, "self_signing_key": ssk_key}),
        )
        .await
        .assert_ok();
    // Replacing the master key needs the password.
    let other_master = Signer::cross_signing();
    let replace = json!({"master_key": {"user_id": "@alice:localhost", "usage": ["master"], "keys": {(format!("ed25519:{}", other_master.public)): other_master.public}}});
    let challenge =
        server.post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice.access_token), replace).await;
    assert_eq!(challenge.status, 401);

    // Sign the device with the self-signing key and upload the signature.
    let mut signed_device = device_keys(&alice, &device);
    signed_device.as_object_mut().unwrap().remove("signatures");
    let signed_device = self_signing.sign("@alice:localhost", signed_device);
    let resp = server
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice.access_token),
            json!({"@alice:localhost": {(alice.device_id.as_str()): signed_device}}),
        )
        .await;
    assert!(resp.assert_ok()["failures"].as_object().is_none_or(|f| f.is_empty()), "{}", resp.body);
    // A bad signature is reported as a failure.
    let forged = Signer::new("forged").sign(
        "@alice:localhost",
        json!({"user_id": "@alice:localhost", "device_id": alice.device_id, "keys": signed_device["keys"]}),
    );
    let resp = server
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice.access_token),
            json!({"@alice:localhost": {(alice.device_id.as_str()): forged}}),
        )
        .await;
    assert!(resp.assert_ok()["failures"]["@alice:localhost"][&alice.device_id].is_object(), "{}", resp.body);

    let query = server
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob.access_token),
            json!({"device_keys": {"@alice:localhost": []}}),
        )
        .await;
    let body = query.assert_ok();
    assert_eq!(body["master_keys"]["@alice:localhost"]["keys"][&master_id], master.public.as_str());
    assert!(body["self_signing_keys"]["@alice:localhost"].is_object());
    assert!(body["user_signing_keys"].get("@alice:localhost").is_none(), "only alice sees her user-signing key");
    let sigs = &body["device_keys"]["@alice:localhost"][&alice.device_id]["signatures"]["@alice:localhost"];
    assert!(sigs[format!("ed25519:{}", self_signing.public)].is_string(), "{sigs}");
    assert!(sigs[format!("ed25519:{}", alice.device_id)].is_string(), "{sigs}");
}

async fn key_backup_versions_and_keys(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    server.get("/_matrix/client/v3/room_keys/version", token).await.assert_error(404, "M_NOT_FOUND");
    let algorithm =
        json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abcdefg"}});
    let created = server.post("/_matrix/client/v3/room_keys/version", token, algorithm.clone()).await;
    let version = created.assert_ok()["version"].as_str().unwrap().to_owned();
    let info = server.get("/_matrix/client/v3/room_keys/version", token).await;
    assert_eq!(info.assert_ok()["version"], version.as_str());
    assert_eq!(info.body["count"], 0);
    let etag0 = info.body["etag"].as_str().unwrap().to_owned();

    let data = |index: u64, verified: bool| {
        json!({"first_message_index": index, "forwarded_count": 0, "is_verified": verified,
               "session_data": {"ephemeral": "e", "ciphertext": format!("c{index}"), "mac": "m"}})
    };
    let path = format!("/_matrix/client/v3/room_keys/keys/{}/sess1?version={version}", enc("!room:localhost"));
    let put = server.put(&path, token, data(5, false)).await;
    assert_eq!(put.assert_ok()["count"], 1);
    assert_ne!(put.body["etag"], etag0.as_str());
    // A worse copy (higher first index) does not replace a better one; a better one does.
    server.put(&path, token, data(9, false)).await.assert_ok();
    assert_eq!(server.get(&path, token).await.assert_ok()["first_message_index"], 5);
    server.put(&path, token, data(7, true)).await.assert_ok();
    assert_eq!(server.get(&path, token).await.assert_ok()["first_message_index"], 7);

    let all = server
        .put(
            &format!("/_matrix/client/v3/room_keys/keys?version={version}"),
            token,
            json!({"rooms": {"!other:localhost": {"sessions": {"s2": data(0, false)}}}}),
        )
        .await;
    assert_eq!(all.assert_ok()["count"], 2);
    let room = server
        .get(&format!("/_matrix/client/v3/room_keys/keys/{}?version={version}", enc("!other:localhost")), token)
        .await;
    assert!(room.assert_ok()["sessions"]["s2"].is_object());

    // Room level: put and delete; session level: delete; all: read back.
    let room_path = format!("/_matrix/client/v3/room_keys/keys/{}?version={version}", enc("!third:localhost"));
    let put = server.put(&room_path, token, json!({"sessions": {"s3": data(2, false), "s4": data(3, false)}})).await;
    assert_eq!(put.assert_ok()["count"], 4);
    let session_path = format!("/_matrix/client/v3/room_keys/keys/{}/s4?version={version}", enc("!third:localhost"));
    assert_eq!(server.delete(&session_path, token, None).await.assert_ok()["count"], 3);
    server.get(&session_path, token).await.assert_error(404, "M_NOT_FOUND");
    let everything = server.get(&format!("/_matrix/client/v3/room_keys/keys?version={version}"), token).await;
    let rooms = everything.assert_ok()["rooms"].as_object().unwrap().clone();
    assert_eq!(rooms.len(), 3);
    assert!(rooms["!third:localhost"]["sessions"]["s3"].is_object());
    assert_eq!(server.delete(&room_path, token, None).await.assert_ok()["count"], 2);
    // The auth data of a version can change, its algorithm cannot.
    let update = json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "newkey"}, "version": version});
    server.put(&format!("/_matrix/client/v3/room_keys/version/{version}"), token, update).await.assert_ok();
    let info = server.get(&format!("/_matrix/client/v3/room_keys/version/{version}"), token).await;
    assert_eq!(info.assert_ok()["auth_data"]["public_key"], "newkey");
    let bad = json!({"algorithm": "m.other", "auth_data": {}, "version": version});
    server
        .put(&format!("/_matrix/client/v3/room_keys/version/{version}"), token, bad)
        .await
        .assert_error(400, "M_INVALID_PARAM");

    // Writing to an old version is refused once a new one exists.
    let newer = server.post("/_matrix/client/v3/room_keys/version", token, algorithm).await.assert_ok()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    server.put(&path, token, data(1, true)).await.assert_error(403, "M_WRONG_ROOM_KEYS_VERSION");
    server.delete(&format!("/_matrix/client/v3/room_keys/keys?version={version}"), token, None).await.assert_ok();
    server.delete(&format!("/_matrix/client/v3/room_keys/version/{newer}"), token, None).await.assert_ok();
    server.get(&format!("/_matrix/client/v3/room_keys/version/{newer}"), token).await.assert_error(404, "M_NOT_FOUND");
}
