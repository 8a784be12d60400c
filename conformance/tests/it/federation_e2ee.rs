//! End-to-end encryption across two real Obmin servers federating over TLS on loopback, with
//! the team's own client stack (`obmin-client`, on the `e2ee` crate) on each side: device keys
//! queried and one-time keys claimed over federation, the Megolm room key delivered as an Olm
//! to-device message from one server to the other, messages decrypted both ways, and an
//! encrypted file uploaded on one server downloaded (federated authenticated media) and
//! decrypted through the other. And `m.signing_key_update`: cross-signing keys uploaded on one
//! server reach the other, which keeps them.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use conformance::{Backend, Server, ServerOptions, backend_tests, enc, federation_http, wait::eventually_some};
use federation::{SigningKey, xmatrix};
use obmin_client::ItemContent;
use ruma::ServerName;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    desktop_core::{App, direct_chat},
    e2ee::Signer,
};

backend_tests!(encrypted_messages_and_files_across_servers, signing_key_updates_reach_the_other_server);

async fn encrypted_messages_and_files_across_servers(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let b = ServerOptions::new(backend).federating().start().await;
    let alice = App::register(&a, "alice").await;
    let bob = App::register(&b, "bob").await;
    assert!(alice.user_id().as_str().ends_with(&a.server_name));
    assert!(bob.user_id().as_str().ends_with(&b.server_name));

    // An encrypted direct chat created on A; Bob accepts the invite, joining over federation.
    let room = direct_chat(&alice, &bob).await;
    let encryption = a
        .get(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.encryption/", enc(room.as_str())),
            a.login("alice", "secret-pass").await.body["access_token"].as_str(),
        )
        .await;
    assert_eq!(encryption.assert_ok()["algorithm"], "m.megolm.v1.aes-sha2");

    // Alice's client queries Bob's device keys and claims a one-time key through A, which
    // asks B over federation; the room key goes to Bob's device as an Olm to-device message
    // relayed A -> B. Bob's client decrypts.
    alice.client.send_text(&room, "secret from A").await.unwrap();
    let at_bob = bob.wait_for_text(&room, "secret from A").await;
    assert_eq!(at_bob.sender, alice.user_id());
    assert!(at_bob.encrypted, "decrypted by Bob's client, not sent in the clear");
    // The other way: Bob's client shares its own Megolm session with Alice's device.
    bob.client.send_text(&room, "secret reply from B").await.unwrap();
    let at_alice = alice.wait_for_text(&room, "secret reply from B").await;
    assert_eq!(at_alice.sender, bob.user_id());
    assert!(at_alice.encrypted);

    // What the servers relayed was ciphertext: neither stored the plaintext.
    let bob_token = b.login("bob", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let messages = b
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(room.as_str())), Some(&bob_token))
        .await;
    let chunk = messages.assert_ok()["chunk"].as_array().unwrap().clone();
    let encrypted: Vec<_> = chunk.iter().filter(|e| e["type"] == "m.room.encrypted").collect();
    assert!(encrypted.len() >= 2, "both messages are m.room.encrypted on B: {chunk:?}");
    assert!(encrypted.iter().all(|e| e["content"]["algorithm"] == "m.megolm.v1.aes-sha2"));
    assert!(!messages.body.to_string().contains("secret from A"));

    // The keys really came over federation: B answers a query for Alice (a user of A) with
    // her device, signed by her, fetched from A.
    let query =
        b.post("/_matrix/client/v3/keys/query", Some(&bob_token), json!({"device_keys": {alice.user_id(): []}})).await;
    let alice_device = alice.client.session().unwrap().device_id;
    let devices = &query.assert_ok()["device_keys"][alice.user_id().as_str()];
    assert!(devices.get(alice_device.as_str()).is_some(), "Alice's device through B: {}", query.body);
    assert!(query.body["failures"].as_object().is_none_or(|f| f.is_empty()), "no failures: {}", query.body);

    // An encrypted file: uploaded to A by Alice's client, downloaded by Bob's client through
    // B (which fetches it from A over federation) and decrypted.
    let len = 1024 * 1024 + 33;
    let source = alice.dir.path().join("plan.bin");
    let data: Vec<u8> = (0..len as u64).map(|p| (p.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    std::fs::File::create(&source).unwrap().write_all(&data).unwrap();
    alice.client.send_file(&room, &source, None).await.unwrap();
    let received = eventually_some("the file at Bob", || async {
        let items = bob.client.timeline(&room, 50).await.unwrap();
        items.into_iter().find(|i| matches!(i.content, ItemContent::File { .. }))
    })
    .await;
    let ItemContent::File { name, attachment, .. } = received.content else { unreachable!() };
    assert_eq!(name, "plan.bin");
    assert!(attachment.encrypted_file.is_some(), "sent as an encrypted attachment");
    let (origin, media_id) = attachment.url.parts().unwrap();
    assert_eq!(origin.as_str(), a.server_name, "the file lives on A");
    let dest = bob.dir.path().join("plan-downloaded.bin");
    bob.client.download_file(&attachment, &dest, None).await.unwrap();
    assert_eq!(
        Sha256::digest(std::fs::read(&dest).unwrap()),
        Sha256::digest(&data),
        "decrypted file equals the original"
    );

    // B serves what it fetched as ciphertext, and again from its own copy.
    let stored = b
        .http
        .get(b.url(&format!("/_matrix/client/v1/media/download/{origin}/{media_id}")))
        .bearer_auth(&bob_token)
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    let stored = stored.bytes().await.unwrap();
    assert_eq!(stored.len(), len);
    assert_ne!(Sha256::digest(&stored), Sha256::digest(&data));
    // The operator may forget fetched remote media; it is fetched again when next wanted.
    let purge = b.cli(&["media", "purge-remote"], None);
    assert!(String::from_utf8_lossy(&purge.stdout).contains("purged 1 remote media"), "{purge:?}");
    let again = fetch_media(&b, &bob_token, &format!("/_matrix/client/v1/media/download/{origin}/{media_id}")).await;
    assert_eq!(Sha256::digest(&again), Sha256::digest(&stored));
    // Unknown remote media is a Matrix 404, not a 500.
    let missing = b.get(&format!("/_matrix/client/v1/media/download/{origin}/NoSuchMediaHere"), Some(&bob_token)).await;
    missing.assert_error(404, "M_NOT_FOUND");
}

/// `PUT /send` of EDUs to `target`, signed by `origin` with its real key; the status.
async fn send_edus(target: &Server, origin: &Server, txn_id: &str, edus: Vec<Value>) -> u16 {
    let url = format!("{}/_matrix/federation/v1/send/{txn_id}", target.federation_url.as_ref().unwrap());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let body = json!({"origin": origin.server_name, "origin_server_ts": now, "pdus": [], "edus": edus});
    let mut request = http::Request::put(&url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    let key = std::fs::read_to_string(origin.dir.path().join("data/signing.key")).unwrap();
    xmatrix::sign_request(
        &mut request,
        &ServerName::parse(&origin.server_name).unwrap(),
        &ServerName::parse(&target.server_name).unwrap(),
        &SigningKey::parse(&key).unwrap(),
    )
    .unwrap();
    federation_http().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap().status().as_u16()
}

/// Syncs from `since` until the user appears in `device_lists.changed` (or panics after 40 s).
async fn wait_for_device_list_change(server: &Server, user: &conformance::User, since: &str, changed: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut since = since.to_owned();
    loop {
        let body = server.sync(user, Some(&since), 1000, None).await;
        let listed = body["device_lists"]["changed"].as_array().into_iter().flatten().any(|u| u == changed);
        if listed {
            return;
        }
        since = body["next_batch"].as_str().unwrap().to_owned();
        assert!(Instant::now() < deadline, "{changed} never listed in device_lists.changed on {}", server.server_name);
    }
}

async fn signing_key_updates_reach_the_other_server(backend: Backend) {
    let mut a = ServerOptions::new(backend).federating().start().await;
    let b = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let bob = b.register("bob", "password-bob-1").await;
    let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
    b.post(
        &format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), enc(&a.server_name)),
        Some(&bob.access_token),
        json!({}),
    )
    .await
    .assert_ok();
    let since = b.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();

    // Alice sets up cross-signing on A.
    let master = Signer::cross_signing();
    let self_signing = Signer::cross_signing();
    let master_key = json!({"user_id": alice.user_id, "usage": ["master"],
        "keys": {(format!("ed25519:{}", master.public)): master.public}});
    let ssk = json!({"user_id": alice.user_id, "usage": ["self_signing"],
        "keys": {(format!("ed25519:{}", self_signing.public)): self_signing.public}});
    let ssk_key = master.sign(&alice.user_id, ssk.clone());
    a.post(
        "/_matrix/client/v3/keys/device_signing/upload",
        Some(&alice.access_token),
        json!({"master_key": master_key, "self_signing_key": ssk_key}),
    )
    .await
    .assert_ok();

    // The EDU reaches B: Bob's sync lists Alice as changed.
    wait_for_device_list_change(&b, &bob, &since, &alice.user_id).await;
    let query = json!({"device_keys": {(alice.user_id.as_str()): []}});
    let answer = b.post("/_matrix/client/v3/keys/query", Some(&bob.access_token), query.clone()).await;
    assert_eq!(answer.assert_ok()["master_keys"][&alice.user_id], master_key);

    // Refused EDUs: a self-signing key its master key did not sign, and keys of a user of
    // another server than the sender.
    let stranger = Signer::cross_signing();
    let unsigned = json!({"user_id": alice.user_id, "usage": ["self_signing"],
        "keys": {(format!("ed25519:{}", stranger.public)): stranger.public}});
    let bob_master = json!({"user_id": bob.user_id, "usage": ["master"],
        "keys": {(format!("ed25519:{}", stranger.public)): stranger.public}});
    let edus = vec![
        json!({"edu_type": "m.signing_key_update", "content": {"user_id": alice.user_id, "self_signing_key": unsigned}}),
        json!({"edu_type": "m.signing_key_update", "content": {"user_id": bob.user_id, "master_key": bob_master}}),
    ];
    assert_eq!(
        send_edus(&b, &a, "forged-signing-keys", edus).await,
        200,
        "EDUs are best effort: the transaction is accepted"
    );

    // B kept what the genuine EDU brought: with A gone, B still answers Alice's keys.
    a.kill();
    let answer = b.post("/_matrix/client/v3/keys/query", Some(&bob.access_token), query).await;
    let body = answer.assert_ok();
    assert!(body["failures"].get(&a.server_name).is_some(), "A is unreachable: {body}");
    assert_eq!(body["master_keys"][&alice.user_id], master_key);
    assert_eq!(body["self_signing_keys"][&alice.user_id], ssk_key, "the genuine self-signing key, not the forged one");
    let own = b
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob.access_token),
            json!({"device_keys": {(bob.user_id.as_str()): []}}),
        )
        .await;
    assert!(own.assert_ok()["master_keys"].get(&bob.user_id).is_none(), "A cannot set keys of B's users: {}", own.body);
}

/// GETs a download with the token; the body (asserting 200).
async fn fetch_media(server: &Server, token: &str, path: &str) -> Vec<u8> {
    let response = server.http.get(server.url(path)).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap().to_vec()
}
