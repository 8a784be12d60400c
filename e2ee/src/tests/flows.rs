use std::collections::BTreeMap;

use ruma::{OwnedUserId, device_id, room_id, user_id};
use serde_json::{Value, json};

use super::FakeServer;
use crate::{EncryptionSettings, Error, MegolmError, OlmMachine, RequestError, SenderTrust, ToDeviceEvent, types::raw};

fn machine(user: &str, device: &str) -> OlmMachine {
    OlmMachine::new(user.try_into().unwrap(), device.into())
}

fn room_event(content: Value, sender: &OlmMachine, event_id: &str, ts: u64) -> Value {
    json!({"type": "m.room.encrypted", "sender": sender.user_id(), "event_id": event_id, "origin_server_ts": ts, "content": content})
}

/// Alice and Bob with published keys, tracking each other, and Alice holding an Olm session
/// with Bob's device.
fn pair(server: &mut FakeServer) -> (OlmMachine, OlmMachine) {
    let mut alice = machine("@alice:localhost", "ALICE1");
    let mut bob = machine("@bob:localhost", "BOB1");
    server.flush(&mut alice);
    server.flush(&mut bob);
    alice.update_tracked_users([bob.user_id().to_owned()]);
    bob.update_tracked_users([alice.user_id().to_owned()]);
    server.flush(&mut alice);
    server.flush(&mut bob);
    (alice, bob)
}

fn members(machines: &[&OlmMachine]) -> Vec<OwnedUserId> {
    machines.iter().map(|m| m.user_id().to_owned()).collect()
}

fn share(
    server: &mut FakeServer,
    from: &mut OlmMachine,
    members: &[OwnedUserId],
    settings: EncryptionSettings,
) -> String {
    let room = room_id!("!room:localhost");
    if let Some(claim) = from.get_missing_sessions(members) {
        server.send(from, &claim);
    }
    for request in from.share_room_key(room, members, settings).unwrap() {
        server.send(from, &request);
    }
    from.encrypt_room_event(room, "m.room.message", json!({"msgtype": "m.text", "body": "probe"})).unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn megolm_message_round_trip_with_replay_protection() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let room = room_id!("!room:localhost");
    let everyone = members(&[&alice, &bob]);

    let claim = alice.get_missing_sessions(&everyone).expect("no session with Bob yet");
    server.send(&mut alice, &claim);
    assert!(alice.get_missing_sessions(&everyone).is_none());
    let shares = alice.share_room_key(room, &everyone, EncryptionSettings::default()).unwrap();
    assert_eq!(shares.len(), 1);
    for request in &shares {
        server.send(&mut alice, request);
    }
    // Shared already: nothing more to send.
    assert!(alice.share_room_key(room, &everyone, EncryptionSettings::default()).unwrap().is_empty());

    let received = server.sync(&mut bob);
    assert!(matches!(&received[..], [ToDeviceEvent::Decrypted { event, .. }] if event["type"] == "m.room_key"));

    let content =
        alice.encrypt_room_event(room, "m.room.message", json!({"msgtype": "m.text", "body": "hello bob"})).unwrap();
    assert_eq!(content["algorithm"], "m.megolm.v1.aes-sha2");
    let event = room_event(content.clone(), &alice, "$e1", 1000);
    let decrypted = bob.decrypt_room_event(room, &event).unwrap();
    assert_eq!(decrypted.event["content"]["body"], "hello bob");
    assert_eq!(decrypted.event["type"], "m.room.message");
    assert_eq!(decrypted.event["sender"], "@alice:localhost");
    assert_eq!(decrypted.sender_device.as_deref(), Some(device_id!("ALICE1")));
    assert_eq!(decrypted.trust, SenderTrust::Unverified);
    assert_eq!(decrypted.sender_ed25519, alice.ed25519_key());

    // Decrypting the same event again is fine; the same ciphertext as another event is a replay.
    bob.decrypt_room_event(room, &event).unwrap();
    let replayed = room_event(content.clone(), &alice, "$e2", 1000);
    assert!(matches!(
        bob.decrypt_room_event(room, &replayed),
        Err(Error::Megolm(MegolmError::Replay { index: 0, .. }))
    ));
    // In another room the session is unknown.
    assert!(matches!(
        bob.decrypt_room_event(room_id!("!other:localhost"), &event),
        Err(Error::Megolm(MegolmError::UnknownSession { .. }))
    ));
    // A different sender cannot claim Alice's session.
    let mut forged = event.clone();
    forged["sender"] = json!("@bob:localhost");
    forged["event_id"] = json!("$e3");
    assert!(matches!(bob.decrypt_room_event(room, &forged), Err(Error::Megolm(MegolmError::SenderMismatch { .. }))));

    // Alice reads her own message, from a device she trusts: her own.
    let own = alice.decrypt_room_event(room, &event).unwrap();
    assert_eq!(own.event["content"]["body"], "hello bob");
    assert_eq!(own.trust, SenderTrust::Verified);
}

#[test]
fn olm_payload_checks_refuse_a_forwarded_message() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let claim = alice.get_missing_sessions(&members(&[&bob])).unwrap();
    server.send(&mut alice, &claim);
    alice.send_encrypted_to_device(user_id!("@bob:localhost"), "BOB1", "m.custom", json!({"a": 1})).unwrap();
    let requests = alice.outgoing_requests().unwrap();
    let [request] = &requests[..] else { panic!("one queued to-device request: {requests:?}") };
    let crate::Request::ToDevice(to_device) = &request.request else { panic!() };
    let content = crate::types::json_of(
        &to_device.messages[user_id!("@bob:localhost")]
            [&ruma::to_device::DeviceIdOrAllDevices::DeviceId("BOB1".into())],
    );

    // Charlie relays Alice's ciphertext as his own: the payload's sender does not match.
    let relayed = json!({"type": "m.room.encrypted", "sender": "@charlie:localhost", "content": content});
    let out = bob
        .receive_sync_changes(crate::SyncChanges { to_device_events: vec![raw(&relayed)], ..Default::default() })
        .unwrap();
    assert!(matches!(&out[..], [ToDeviceEvent::UnableToDecrypt { error, .. }] if error.contains("sender")), "{out:?}");

    // Decrypting used the message up (and its one-time key); Alice's next message on the same
    // session reaches Bob normally.
    alice.discard_request(&request.request_id);
    alice.send_encrypted_to_device(user_id!("@bob:localhost"), "BOB1", "m.custom", json!({"a": 2})).unwrap();
    server.flush(&mut alice);
    let out = server.sync(&mut bob);
    assert!(matches!(&out[..], [ToDeviceEvent::Decrypted { event, .. }] if event["content"]["a"] == 2), "{out:?}");
}

#[test]
fn wedged_session_is_replaced_and_a_dummy_sent() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let claim = alice.get_missing_sessions(&members(&[&bob])).unwrap();
    server.send(&mut alice, &claim);
    alice.send_encrypted_to_device(user_id!("@bob:localhost"), "BOB1", "m.custom", json!({"n": 1})).unwrap();
    server.flush(&mut alice);
    server.sync(&mut bob);
    // Bob replies, so Alice's session has received a message and its next message is a
    // normal (not pre-key) one.
    bob.send_encrypted_to_device(user_id!("@alice:localhost"), "ALICE1", "m.custom", json!({"n": 2})).unwrap();
    server.flush(&mut bob);
    server.sync(&mut alice);

    // Bob loses his sessions (a restored backup, a corrupted store...).
    bob.sessions.by_key.clear();
    alice.send_encrypted_to_device(user_id!("@bob:localhost"), "BOB1", "m.custom", json!({"n": 3})).unwrap();
    server.flush(&mut alice);
    let out = server.sync(&mut bob);
    assert!(matches!(&out[..], [ToDeviceEvent::UnableToDecrypt { .. }]), "{out:?}");
    // `sync` flushed Bob's requests: he claimed a key of Alice's and sent her a dummy on a new session.
    let out = server.sync(&mut alice);
    assert!(matches!(&out[..], [ToDeviceEvent::Decrypted { event, .. }] if event["type"] == "m.dummy"), "{out:?}");
    // Alice now sends on the new session and Bob can read her again.
    alice.send_encrypted_to_device(user_id!("@bob:localhost"), "BOB1", "m.custom", json!({"n": 4})).unwrap();
    server.flush(&mut alice);
    let out = server.sync(&mut bob);
    assert!(matches!(&out[..], [ToDeviceEvent::Decrypted { event, .. }] if event["content"]["n"] == 4), "{out:?}");
}

#[test]
fn room_key_rotates_on_leave_device_removal_and_message_count() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let settings = EncryptionSettings::default();
    let both = members(&[&alice, &bob]);
    let first = share(&mut server, &mut alice, &both, settings);
    assert_eq!(share(&mut server, &mut alice, &both, settings), first, "no reason to rotate");

    // Bob leaves: a new session he never gets.
    let only_alice = members(&[&alice]);
    let second = share(&mut server, &mut alice, &only_alice, settings);
    assert_ne!(second, first);

    // Bob is back with a second device, then removes it.
    let mut bob2 = machine("@bob:localhost", "BOB2");
    server.flush(&mut bob2);
    server.sync(&mut alice);
    // Joining is no reason to rotate: the key is shared from its current index on, so the
    // newcomers cannot read what came before.
    let third = share(&mut server, &mut alice, &both, settings);
    assert_eq!(third, second);
    server.remove_device(user_id!("@bob:localhost"), "BOB2");
    server.sync(&mut alice);
    assert!(alice.get_device(user_id!("@bob:localhost"), "BOB2").is_none());
    let fourth = share(&mut server, &mut alice, &both, settings);
    assert_ne!(fourth, third, "a removed device must not read on");

    // One message per session.
    let tight = EncryptionSettings { rotation_period_msgs: 1, ..settings };
    let fifth = share(&mut server, &mut alice, &both, tight);
    assert_ne!(fifth, fourth, "settings changed");
    let sixth = share(&mut server, &mut alice, &both, tight);
    assert_ne!(sixth, fifth, "the probe message used up the session");

    // Bob's first device got every session shared while he was a member.
    let out = server.sync(&mut bob);
    let keys: Vec<&str> = out
        .iter()
        .filter_map(|e| match e {
            ToDeviceEvent::Decrypted { event, .. } if event["type"] == "m.room_key" => {
                event["content"]["session_id"].as_str()
            }
            _ => None,
        })
        .collect();
    assert_eq!(keys, vec![first.as_str(), second.as_str(), fourth.as_str(), fifth.as_str(), sixth.as_str()]);
}

#[test]
fn our_other_devices_get_the_room_key() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let mut alice2 = machine("@alice:localhost", "ALICE2");
    server.flush(&mut alice2);
    server.sync(&mut alice);
    assert!(alice.get_device(user_id!("@alice:localhost"), "ALICE2").is_some());
    let room = room_id!("!room:localhost");
    let everyone = members(&[&alice, &bob]);
    share(&mut server, &mut alice, &everyone, EncryptionSettings::default());
    let content = alice.encrypt_room_event(room, "m.room.message", json!({"body": "to all"})).unwrap();
    server.sync(&mut alice2);
    server.sync(&mut bob);
    let event = room_event(content, &alice, "$x", 5);
    assert_eq!(alice2.decrypt_room_event(room, &event).unwrap().event["content"]["body"], "to all");
    assert_eq!(bob.decrypt_room_event(room, &event).unwrap().event["content"]["body"], "to all");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let room = room_id!("!room:localhost");
    let garbage = [
        json!(null),
        json!([]),
        json!({"type": "m.room.encrypted"}),
        json!({"type": "m.room.encrypted", "sender": "nope", "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2"}}),
        json!({"type": "m.room.encrypted", "sender": "@a:x", "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "!!", "ciphertext": 5}}),
        json!({"type": "m.room.encrypted", "sender": "@a:x", "content": {
            "algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": alice.curve25519_key(),
            "ciphertext": {bob.curve25519_key(): {"type": 0, "body": "AAAA"}}}}),
        json!({"type": "m.room.encrypted", "sender": "@a:x", "content": {
            "algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": alice.curve25519_key(),
            "ciphertext": {bob.curve25519_key(): {"type": 7, "body": 1}}}}),
        json!({"type": "m.key.verification.start", "sender": "@a:x", "content": {"transaction_id": 1}}),
        json!({"type": "m.key.verification.key", "sender": "@a:x", "content": {"transaction_id": "t", "key": "x"}}),
    ];
    let out = bob
        .receive_sync_changes(crate::SyncChanges {
            to_device_events: garbage.iter().map(raw).collect(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.len(), garbage.len());
    for event in &garbage {
        assert!(bob.decrypt_room_event(room, event).is_err());
    }
    let bad_megolm = [
        json!({"sender": "@a:x", "event_id": "$1", "origin_server_ts": 1, "content": {"algorithm": "m.megolm.v1.aes-sha2"}}),
        json!({"sender": "@a:x", "event_id": "$1", "origin_server_ts": 1, "content": {"algorithm": "m.megolm.v1.aes-sha2", "session_id": "s", "ciphertext": "%%%"}}),
        json!({"sender": "@a:x", "content": {"algorithm": "m.megolm.v1.aes-sha2", "session_id": "s", "ciphertext": "AAAA"}}),
    ];
    for event in &bad_megolm {
        assert!(bob.decrypt_room_event(room, event).is_err());
    }
    // Bad answers to our requests do not break the machine either.
    let requests = alice.outgoing_requests().unwrap();
    for request in requests {
        alice.mark_request_as_sent(&request.request_id, &json!({"device_keys": 5, "one_time_keys": [1]})).unwrap();
    }
    assert!(matches!(
        alice.mark_request_as_sent("nope", &json!({})),
        Err(Error::Request(RequestError::UnknownRequest(_)))
    ));
}

#[test]
fn a_device_without_keys_is_told_the_key_is_withheld() {
    let mut server = FakeServer::default();
    let (mut alice, mut bob) = pair(&mut server);
    let room = room_id!("!room:localhost");
    // Bob's device has no one-time keys left and no fallback key on the server.
    server.one_time_keys.clear();
    server.fallback_keys.clear();
    let both = members(&[&alice, &bob]);
    let claim = alice.get_missing_sessions(&both).unwrap();
    server.send(&mut alice, &claim);
    let requests = alice.share_room_key(room, &both, EncryptionSettings::default()).unwrap();
    assert_eq!(requests.len(), 1);
    assert!(
        matches!(&requests[0].request, crate::Request::ToDevice(r) if r.event_type.to_string() == "m.room_key.withheld")
    );
    server.send(&mut alice, &requests[0]);
    assert!(alice.share_room_key(room, &both, EncryptionSettings::default()).unwrap().is_empty(), "told once");
    let content = alice.encrypt_room_event(room, "m.room.message", json!({"body": "secret"})).unwrap();
    server.sync(&mut bob);
    let event = room_event(content, &alice, "$w", 1);
    assert!(
        matches!(bob.decrypt_room_event(room, &event), Err(Error::Megolm(MegolmError::Withheld { code, .. })) if code == "m.no_olm")
    );
}

#[test]
fn typed_answers_are_taken_and_an_answer_to_another_request_is_refused() {
    use ruma::{
        OneTimeKeyAlgorithm, UInt,
        api::client::keys::{get_keys, upload_keys},
    };

    use crate::Request;

    let mut alice = machine("@alice:localhost", "ALICE1");
    let requests = alice.outgoing_requests().unwrap();
    let upload = requests.iter().find(|r| matches!(r.request, Request::KeysUpload(_))).expect("a key upload");
    let query = requests.iter().find(|r| matches!(r.request, Request::KeysQuery(_))).expect("our own device list");

    // A keys query answer for the upload: refused, and the upload is still waiting for its own.
    let wrong = alice.mark_request_as_sent(&upload.request_id, &get_keys::v3::Response::new());
    assert!(
        matches!(
            &wrong,
            Err(Error::Request(RequestError::WrongResponse { expected: "keys upload", got: "keys query", .. }))
        ),
        "{wrong:?}"
    );
    let Request::KeysUpload(typed) = &upload.request else { unreachable!() };
    let uploaded = UInt::try_from(typed.one_time_keys.len()).unwrap();
    let counts = BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, uploaded)]);
    alice.mark_request_as_sent(&upload.request_id, &upload_keys::v3::Response::new(counts)).unwrap();
    assert!(matches!(
        alice.mark_request_as_sent(&upload.request_id, &upload_keys::v3::Response::new(BTreeMap::new())),
        Err(Error::Request(RequestError::UnknownRequest(_)))
    ));

    // The typed keys query answer lists our device: its signed keys are checked and kept.
    let mut answer = get_keys::v3::Response::new();
    answer.device_keys = BTreeMap::from([(
        alice.user_id().to_owned(),
        BTreeMap::from([(device_id!("ALICE1").to_owned(), raw(&alice.device_keys().unwrap()))]),
    )]);
    alice.mark_request_as_sent(&query.request_id, &answer).unwrap();
    let me = alice.get_device(user_id!("@alice:localhost"), "ALICE1").expect("our device from the typed answer");
    assert_eq!(me.ed25519, alice.ed25519_key());
    assert!(
        alice.outgoing_requests().unwrap().iter().all(|r| !matches!(r.request, Request::KeysUpload(_))),
        "the server holds every key we made"
    );
}
