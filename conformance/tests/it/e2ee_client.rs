//! The e2ee crate against the real homeserver: two clients, each an `OlmMachine` driven over
//! HTTP, upload keys, claim each other's one-time keys, share Megolm room keys by to-device
//! and read each other's encrypted messages; an encrypted attachment goes through the media
//! repository as a stream; key backup round-trips to a new device.

use std::io::{Read, Write};

use conformance::{Backend, Server, User, backend_tests, enc};
use e2ee::{
    EncryptionSettings, OlmMachine, OutgoingRequest, SenderTrust, SyncChanges, ToDeviceEvent,
    attachments::{DecryptingWriter, EncryptedFileJson as EncryptedFile, EncryptingReader},
};
use futures_util::StreamExt;
use reqwest::Method;
use ruma::{OwnedUserId, RoomId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

backend_tests!(
    two_clients_exchange_encrypted_messages_and_an_attachment,
    key_backup_restores_on_a_new_device,
    cross_signing_and_sas_verification_through_the_server
);

/// A client: the account on the server, its `OlmMachine`, and its sync position.
struct Client {
    user: User,
    machine: OlmMachine,
    since: Option<String>,
}

impl Client {
    async fn new(server: &Server, name: &str) -> Self {
        let user = server.register(name, "secret-pass").await;
        let machine = OlmMachine::new(user.user_id.as_str().try_into().unwrap(), user.device_id.as_str().into());
        let mut client = Self { user, machine, since: None };
        client.send_outgoing(server).await;
        client
    }

    fn user_id(&self) -> OwnedUserId {
        self.user.user_id.as_str().try_into().unwrap()
    }

    async fn send(&mut self, server: &Server, request: &OutgoingRequest) -> Value {
        let method = Method::from_bytes(request.method().as_bytes()).unwrap();
        let resp = server.request(method, &request.path(), Some(&self.user.access_token), Some(request.body())).await;
        let body = resp.assert_ok().clone();
        self.machine.mark_request_as_sent(&request.request_id, &body).unwrap();
        body
    }

    /// Sends what the machine asks for until it has nothing more.
    async fn send_outgoing(&mut self, server: &Server) {
        for _ in 0..5 {
            let requests = self.machine.outgoing_requests().unwrap();
            if requests.is_empty() {
                return;
            }
            for request in &requests {
                self.send(server, request).await;
            }
        }
        panic!("the machine keeps asking for requests");
    }

    /// One `/sync`: feeds the machine, sends its requests; returns the response and the
    /// to-device events.
    async fn sync(&mut self, server: &Server) -> (Value, Vec<ToDeviceEvent>) {
        let response = server.sync(&self.user, self.since.as_deref(), 0, None).await;
        self.since = response["next_batch"].as_str().map(str::to_owned);
        let to_device = self.machine.receive_sync_changes(SyncChanges::from_sync_response(&response)).unwrap();
        self.send_outgoing(server).await;
        (response, to_device)
    }

    /// Makes sure every member's device has our room key; returns the encrypted content.
    async fn encrypt(
        &mut self,
        server: &Server,
        room_id: &RoomId,
        members: &[OwnedUserId],
        event_type: &str,
        content: Value,
    ) -> Value {
        self.machine.update_tracked_users(members.iter().cloned());
        self.send_outgoing(server).await;
        if let Some(claim) = self.machine.get_missing_sessions(members) {
            let answer = self.send(server, &claim).await;
            assert!(answer["failures"].as_object().is_none_or(|f| f.is_empty()), "{answer}");
        }
        for request in self.machine.share_room_key(room_id, members, EncryptionSettings::default()).unwrap() {
            self.send(server, &request).await;
        }
        self.machine.encrypt_room_event(room_id, event_type, content).unwrap()
    }

    async fn send_encrypted(
        &mut self,
        server: &Server,
        room_id: &RoomId,
        members: &[OwnedUserId],
        content: Value,
    ) -> String {
        let encrypted = self.encrypt(server, room_id, members, "m.room.message", content).await;
        let txn = format!("t{}", rand_suffix());
        let resp = server
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.encrypted/{txn}", enc(room_id.as_str())),
                Some(&self.user.access_token),
                encrypted,
            )
            .await;
        resp.assert_ok()["event_id"].as_str().unwrap().to_owned()
    }

    /// Syncs and decrypts the room's new encrypted timeline events (to-device events, room
    /// keys among them, are taken in first).
    async fn read_room(&mut self, server: &Server, room_id: &RoomId) -> Vec<Value> {
        self.read_room_with_sync(server, room_id).await.0
    }

    async fn read_room_with_sync(
        &mut self,
        server: &Server,
        room_id: &RoomId,
    ) -> (Vec<Value>, Value, Vec<ToDeviceEvent>) {
        let (response, to_device) = self.sync(server).await;
        let events =
            response["rooms"]["join"][room_id.as_str()]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        let decrypted = events
            .iter()
            .filter(|e| e["type"] == "m.room.encrypted")
            .map(|e| {
                let decrypted = self.machine.decrypt_room_event(room_id, e).unwrap_or_else(|err| panic!("{err}: {e}"));
                decrypted.event
            })
            .collect();
        (decrypted, response, to_device)
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Deterministic bytes, generated as they are read (no big buffer).
struct Generated {
    position: u64,
    len: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.position).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let p = self.position + i as u64;
            *b = (p.wrapping_mul(2_654_435_761) >> 7) as u8;
        }
        self.position += n as u64;
        Ok(n)
    }
}

async fn encrypted_room(server: &Server, alice: &Client, bob: &Client) -> ruma::OwnedRoomId {
    let room = server
        .create_room(
            &alice.user,
            json!({
                "invite": [bob.user.user_id],
                "initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
            }),
        )
        .await;
    server.join(&bob.user, &room).await.assert_ok();
    room.try_into().unwrap()
}

async fn two_clients_exchange_encrypted_messages_and_an_attachment(backend: Backend) {
    let server = Server::start(backend).await;
    let mut alice = Client::new(&server, "alice").await;
    let mut bob = Client::new(&server, "bob").await;
    let room = encrypted_room(&server, &alice, &bob).await;
    alice.sync(&server).await;
    bob.sync(&server).await;
    let members = vec![alice.user_id(), bob.user_id()];

    // Alice -> Bob: the room key travels by Olm to-device, the message by Megolm.
    alice.send_encrypted(&server, &room, &members, json!({"msgtype": "m.text", "body": "hello bob"})).await;
    let (events, response, to_device) = bob.read_room_with_sync(&server, &room).await;
    assert!(
        to_device.iter().any(|e| matches!(e, ToDeviceEvent::Decrypted { event, .. } if event["type"] == "m.room_key")),
        "Bob got the room key: {to_device:?}"
    );
    // Alice claimed one of Bob's one-time keys: the count in sync dropped and Bob topped it up.
    assert!(response["device_one_time_keys_count"]["signed_curve25519"].as_u64().unwrap() < 50, "{response}");
    let counts = server.post("/_matrix/client/v3/keys/upload", Some(&bob.user.access_token), json!({})).await;
    assert_eq!(counts.assert_ok()["one_time_key_counts"]["signed_curve25519"], 50);

    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["content"]["body"], "hello bob");
    assert_eq!(events[0]["sender"], alice.user.user_id);

    // Bob -> Alice.
    bob.send_encrypted(&server, &room, &members, json!({"msgtype": "m.text", "body": "hi alice"})).await;
    let events = alice.read_room(&server, &room).await;
    let bodies: Vec<&str> = events.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(bodies.contains(&"hi alice"), "{bodies:?}");

    // An encrypted attachment: streamed through the cipher into the upload, the key and hash
    // in an encrypted m.file message, streamed back through the decryptor.
    let len = 3 * 1024 * 1024 + 17;
    let mut expected = Sha256::new();
    let mut source = Generated { position: 0, len };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = source.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        expected.update(&chunk[..n]);
    }
    let expected = expected.finalize();

    let encryptor =
        std::sync::Arc::new(std::sync::Mutex::new(Some(EncryptingReader::new(Generated { position: 0, len }))));
    let reader = encryptor.clone();
    let body = futures_util::stream::unfold(reader, |reader| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let n = reader.lock().unwrap().as_mut().unwrap().read(&mut buf).unwrap();
        if n == 0 {
            return None;
        }
        buf.truncate(n);
        Some((Ok::<_, std::io::Error>(buf), reader))
    });
    let resp = server
        .http
        .post(server.url("/_matrix/media/v3/upload?filename=secret.bin"))
        .bearer_auth(&alice.user.access_token)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let resp = Server::read(resp).await;
    let mxc = resp.assert_ok()["content_uri"].as_str().unwrap().to_owned();
    let encryptor = encryptor.lock().unwrap().take().unwrap();
    let file = encryptor.finish(mxc.as_str().into()).unwrap();
    alice
        .send_encrypted(
            &server,
            &room,
            &members,
            json!({"msgtype": "m.file", "body": "secret.bin", "file": file, "info": {"size": len, "mimetype": "application/octet-stream"}}),
        )
        .await;

    let events = bob.read_room(&server, &room).await;
    let message = events.iter().find(|e| e["content"]["msgtype"] == "m.file").expect("the file message");
    let file: EncryptedFile = serde_json::from_value(message["content"]["file"].clone()).unwrap();
    let media_id = file.url.as_str().rsplit('/').next().unwrap().to_owned();
    let resp = server
        .http
        .get(server.url(&format!("/_matrix/client/v1/media/download/localhost/{media_id}")))
        .bearer_auth(&bob.user.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Chunks go through the decryptor as they arrive: the whole file is never in memory.
    let mut decryptor = DecryptingWriter::new(HashingSink::default(), &file).unwrap();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        decryptor.write_all(&chunk.unwrap()).unwrap();
    }
    let sink = decryptor.finish().expect("the hash matches");
    let (total, digest) = (sink.len, sink.hasher.finalize());
    assert_eq!(total, len);
    assert_eq!(digest, expected);
}

/// Counts and hashes what is written to it (stands in for the destination file).
#[derive(Default)]
struct HashingSink {
    len: u64,
    hasher: Sha256,
}

impl std::io::Write for HashingSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.len += data.len() as u64;
        self.hasher.update(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn key_backup_restores_on_a_new_device(backend: Backend) {
    let server = Server::start(backend).await;
    let mut alice = Client::new(&server, "alice").await;
    let bob = Client::new(&server, "bob").await;
    let room = encrypted_room(&server, &alice, &bob).await;
    let members = vec![alice.user_id(), bob.user_id()];
    alice.sync(&server).await;
    alice.send_encrypted(&server, &room, &members, json!({"msgtype": "m.text", "body": "for later"})).await;

    let (key, body) = alice.machine.create_backup().unwrap();
    let created = server.post("/_matrix/client/v3/room_keys/version", Some(&alice.user.access_token), body).await;
    let version = created.assert_ok()["version"].as_str().unwrap().to_owned();
    let recovery_key = key.to_recovery_key();
    alice.machine.enable_backup(key, version.clone());
    let upload = alice.machine.backup_room_keys().unwrap().expect("a session to back up");
    let answer = alice.send(&server, &upload).await;
    assert_eq!(answer["count"], 1, "{answer}");
    assert!(alice.machine.backup_room_keys().unwrap().is_none());

    // A new login of Alice's: restore with the recovery key, then read the old message.
    let login = server.login("alice", "secret-pass").await;
    let login = login.assert_ok();
    let user = User {
        access_token: login["access_token"].as_str().unwrap().to_owned(),
        device_id: login["device_id"].as_str().unwrap().to_owned(),
        ..alice.user.clone()
    };
    let mut alice2 = Client {
        machine: OlmMachine::new(user.user_id.as_str().try_into().unwrap(), user.device_id.as_str().into()),
        user,
        since: None,
    };
    alice2.send_outgoing(&server).await;
    let info = server.get("/_matrix/client/v3/room_keys/version", Some(&alice2.user.access_token)).await;
    let keys = server
        .get(&format!("/_matrix/client/v3/room_keys/keys?version={version}"), Some(&alice2.user.access_token))
        .await;
    let restored_key = e2ee::backup::BackupKey::from_recovery_key(&recovery_key).unwrap();
    let imported = alice2.machine.restore_backup(&restored_key, info.assert_ok(), keys.assert_ok()).unwrap();
    assert_eq!(imported, 1);
    let events = alice2.read_room(&server, &room).await;
    let bodies: Vec<&str> = events.iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(bodies, vec!["for later"]);
}

/// Where the shared interop install keeps matrix-js-sdk (`scripts/interop` installs it there,
/// as `../shared/interop/run.sh` does): `$OBMIN_INTEROP_CACHE`, else `~/.cache/obmin-interop`.
fn js_sdk_install() -> std::path::PathBuf {
    let dir = std::env::var_os("OBMIN_INTEROP_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
        cache.join("obmin-interop")
    });
    assert!(
        dir.join("node_modules/matrix-js-sdk").is_dir(),
        "matrix-js-sdk is not installed in {}: run scripts/interop once (it installs it), or point OBMIN_INTEROP_CACHE at an install",
        dir.display()
    );
    dir
}

/// A line from the peer, with a timeout (the peer has its own backstop too).
fn expect_line(lines: &std::sync::mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line =
            lines.recv_timeout(left).unwrap_or_else(|_| panic!("the matrix-js-sdk peer did not say {prefix} in time"));
        // Anything else on its stdout is the SDK's own logging.
        let Some(said) = line.strip_prefix("PEER ") else { continue };
        assert!(said.starts_with(prefix), "expected {prefix} from the matrix-js-sdk peer, got {said}");
        return said[prefix.len()..].trim().to_owned();
    }
}

/// Interop with matrix-js-sdk's Rust crypto: it decrypts a Megolm message our crate
/// encrypted (room key shared by our Olm), we decrypt its reply, and we verify its device with
/// SAS emoji. One backend suffices:
/// this is about the two crypto implementations, not the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_js_sdk_reads_our_messages_and_we_read_its() {
    use std::io::{BufRead, BufReader, Write};

    use e2ee::verification::VerificationState;
    let install = js_sdk_install();
    let server = Server::start(Backend::Sqlite).await;
    let mut rusty = Client::new(&server, "rusty").await;
    let room: ruma::OwnedRoomId = server
        .create_room(
            &rusty.user,
            json!({"initial_state": [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}),
        )
        .await
        .try_into()
        .unwrap();

    // The peer runs from a directory that links the shared node_modules.
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(install.join("node_modules"), work.path().join("node_modules")).unwrap();
    let script = work.path().join("e2ee_peer.mjs");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/interop/e2ee_peer.mjs"), &script).unwrap();
    let mut peer = std::process::Command::new("node")
        .arg(&script)
        .args(["--url", server.base_url.trim_end_matches('/')])
        .args(["--room", room.as_str(), "--rust-user", &rusty.user.user_id, "--reply", "hello from matrix-js-sdk"])
        .current_dir(work.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node (Node.js 20+) runs the matrix-js-sdk peer");
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = peer.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready: Value = serde_json::from_str(&expect_line(&lines, "READY")).unwrap();
    let js_user: OwnedUserId = ready["user_id"].as_str().unwrap().try_into().unwrap();

    server.membership(&rusty.user, room.as_str(), "invite", Some(js_user.as_str())).await.assert_ok();
    expect_line(&lines, "JOINED");
    rusty.sync(&server).await;
    let members = vec![rusty.user_id(), js_user.clone()];
    rusty.send_encrypted(&server, &room, &members, json!({"msgtype": "m.text", "body": "hello from obmin e2ee"})).await;
    assert_eq!(expect_line(&lines, "GOT"), "hello from obmin e2ee");
    let reply_id = expect_line(&lines, "SENT");

    // Its room key comes by to-device, its message in the timeline.
    let mut reply = None;
    for _ in 0..20 {
        let (response, _) = rusty.sync(&server).await;
        let events =
            response["rooms"]["join"][room.as_str()]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        if let Some(event) = events.iter().find(|e| e["event_id"] == reply_id.as_str()) {
            assert_eq!(event["type"], "m.room.encrypted");
            let decrypted = rusty.machine.decrypt_room_event(&room, event).unwrap_or_else(|e| panic!("{e}: {event}"));
            assert_eq!(decrypted.sender_device.as_deref().map(|d| d.as_str()), ready["device_id"].as_str());
            reply = Some(decrypted.event);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let reply = reply.expect("the matrix-js-sdk reply reached us");
    assert_eq!(reply["content"]["body"], "hello from matrix-js-sdk");

    // SAS verification of its device: we request and start, it accepts; both show the same
    // emoji and confirm.
    let js_device = ready["device_id"].as_str().unwrap().to_owned();
    let txn = rusty.machine.request_verification(&js_user, &js_device);
    rusty.send_outgoing(&server).await;
    let mut their_sas = None;
    for _ in 0..40 {
        rusty.sync(&server).await;
        if rusty.machine.verification_state(&txn) == Some(VerificationState::ShowSas) {
            their_sas = Some(expect_line(&lines, "SAS"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let their_sas = their_sas.unwrap_or_else(|| panic!("no SAS; state {:?}", rusty.machine.verification_state(&txn)));
    let ours: Vec<&str> = rusty.machine.sas_emoji(&txn).unwrap().iter().map(|(_, name)| *name).collect();
    assert_eq!(their_sas, ours.join(","), "both sides show the same emoji");
    rusty.machine.confirm_verification(&txn).unwrap();
    rusty.send_outgoing(&server).await;
    for _ in 0..40 {
        rusty.sync(&server).await;
        if rusty.machine.verification_state(&txn) == Some(VerificationState::Done) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(rusty.machine.verification_state(&txn), Some(VerificationState::Done));
    assert!(rusty.machine.get_device(&js_user, &js_device).unwrap().locally_verified);
    expect_line(&lines, "VERIFIED");

    let _ = writeln!(peer.stdin.as_mut().unwrap(), "DONE");
    let status = peer.wait().unwrap();
    assert!(status.success(), "the matrix-js-sdk peer failed: {status}");
}

async fn cross_signing_and_sas_verification_through_the_server(backend: Backend) {
    use e2ee::verification::VerificationState;
    let server = Server::start(backend).await;
    let mut alice = Client::new(&server, "alice").await;
    let mut bob = Client::new(&server, "bob").await;
    let room = encrypted_room(&server, &alice, &bob).await;
    let members = vec![alice.user_id(), bob.user_id()];
    alice.sync(&server).await;
    bob.sync(&server).await;

    // Both publish cross-signing keys and sign their device with them.
    for client in [&mut alice, &mut bob] {
        let upload = client.machine.bootstrap_cross_signing().unwrap();
        server
            .post(
                "/_matrix/client/v3/keys/device_signing/upload",
                Some(&client.user.access_token),
                upload.device_signing_body,
            )
            .await
            .assert_ok();
        let answer = client.send(&server, &upload.signatures).await;
        assert!(answer["failures"].as_object().is_none_or(|f| f.is_empty()), "{answer}");
    }

    // Bob reads Alice: her device is signed by her self-signing key, but Bob has not vouched
    // for her master key yet.
    alice.send_encrypted(&server, &room, &members, json!({"msgtype": "m.text", "body": "signed"})).await;
    bob.machine.update_tracked_users(members.clone());
    bob.send_outgoing(&server).await;
    let (response, _) = bob.sync(&server).await;
    let event = response["rooms"]["join"][room.as_str()]["timeline"]["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["type"] == "m.room.encrypted").cloned())
        .expect("Alice's message");
    assert_eq!(bob.machine.decrypt_room_event(&room, &event).unwrap().trust, SenderTrust::Unverified);
    let sign = bob.machine.sign_user(alice.user.user_id.as_str().try_into().unwrap()).unwrap();
    let answer = bob.send(&server, &sign).await;
    assert!(answer["failures"].as_object().is_none_or(|f| f.is_empty()), "{answer}");
    assert_eq!(bob.machine.decrypt_room_event(&room, &event).unwrap().trust, SenderTrust::Verified);
    // The server kept Bob's signature on Alice's master key.
    let query = server
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob.user.access_token),
            json!({"device_keys": {(alice.user.user_id.as_str()): []}}),
        )
        .await;
    let signatures =
        &query.assert_ok()["master_keys"][alice.user.user_id.as_str()]["signatures"][bob.user.user_id.as_str()];
    assert!(signatures.as_object().is_some_and(|s| !s.is_empty()), "{}", query.body);

    // SAS verification of Bob's device by Alice, over the server's to-device messages.
    alice.machine.update_tracked_users(members.clone());
    alice.send_outgoing(&server).await;
    let txn = alice.machine.request_verification(&bob.user_id(), &bob.user.device_id);
    alice.send_outgoing(&server).await;
    bob.sync(&server).await;
    assert_eq!(bob.machine.incoming_verification_requests().len(), 1);
    bob.machine.accept_verification(&txn).unwrap();
    bob.send_outgoing(&server).await;
    for _ in 0..4 {
        alice.sync(&server).await;
        bob.sync(&server).await;
    }
    assert_eq!(alice.machine.verification_state(&txn), Some(VerificationState::ShowSas));
    assert_eq!(bob.machine.verification_state(&txn), Some(VerificationState::ShowSas));
    let emoji = alice.machine.sas_emoji(&txn).unwrap();
    assert_eq!(Some(emoji), bob.machine.sas_emoji(&txn));
    alice.machine.confirm_verification(&txn).unwrap();
    bob.machine.confirm_verification(&txn).unwrap();
    alice.send_outgoing(&server).await;
    bob.send_outgoing(&server).await;
    for _ in 0..2 {
        alice.sync(&server).await;
        bob.sync(&server).await;
    }
    assert_eq!(alice.machine.verification_state(&txn), Some(VerificationState::Done));
    assert_eq!(bob.machine.verification_state(&txn), Some(VerificationState::Done));
    assert!(alice.machine.get_device(&bob.user_id(), &bob.user.device_id).unwrap().locally_verified);
    assert!(bob.machine.get_device(&alice.user_id(), &alice.user.device_id).unwrap().locally_verified);
}
