//! Room key requests between our own devices (`m.room_key_request` /
//! `m.forwarded_room_key`): a new device asks our other devices for a key it missed.
//!
//! Keys are only ever forwarded to our own devices that we verified (SAS, or cross-signed by
//! our self-signing key), and a forwarded key is only accepted from such a device and only
//! for a request we made: anything else would let a server-controlled device collect keys, or
//! plant sessions.

use std::collections::BTreeMap;

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{Value, json};

use crate::{
    devices::Device,
    error::{Error, MegolmError, PayloadCheck, Result},
    machine::OlmMachine,
    megolm::InboundSession,
    olm,
    types::{MEGOLM_V1, random_id},
};

/// Our open requests: (room, session id) -> request id.
#[derive(Default)]
pub(crate) struct KeyRequests {
    pub outgoing: BTreeMap<(OwnedRoomId, String), String>,
}

impl OlmMachine {
    /// Asks our other devices for a Megolm session we cannot decrypt with
    /// ([`MegolmError::UnknownSession`](crate::error::MegolmError::UnknownSession)). Returns the request id, or `None` if we asked already.
    /// The request goes out with the next `outgoing_requests()`.
    pub fn request_room_key(&mut self, room_id: &RoomId, session_id: &str) -> Option<String> {
        let key = (room_id.to_owned(), session_id.to_owned());
        if self.key_requests.outgoing.contains_key(&key) {
            return None;
        }
        let request_id = random_id();
        let content = json!({
            "action": "request",
            "body": { "algorithm": MEGOLM_V1, "room_id": room_id, "session_id": session_id },
            "request_id": request_id,
            "requesting_device_id": self.device_id(),
        });
        let own = self.user_id().to_owned();
        self.queue_plain_to_device("m.room_key_request", &own, "*", content);
        self.key_requests.outgoing.insert(key, request_id.clone());
        Some(request_id)
    }

    /// One of our devices we trust: verified by us, or signed by our self-signing key.
    fn is_trusted_own_device(&self, device: &Device) -> bool {
        device.user_id == self.account.user_id
            && device.device_id != self.account.device_id
            && (device.locally_verified || self.is_cross_signed_by_us(device))
    }

    /// An `m.room_key_request` (plain to-device): answer it when it comes from one of our own
    /// trusted devices and we have the session.
    pub(crate) fn receive_key_request(&mut self, event: &Value) {
        let content = &event["content"];
        if content["action"] != "request" || event["sender"].as_str() != Some(self.user_id().as_str()) {
            return;
        }
        let Some(device_id) = content["requesting_device_id"].as_str() else { return };
        let own: &UserId = &self.account.user_id.clone();
        let Some(device) = self.devices.get(own, device_id).cloned() else { return };
        if !self.is_trusted_own_device(&device) {
            tracing::info!(%device_id, "ignoring a room key request from an unverified device");
            return;
        }
        let body = &content["body"];
        let (Some(room_id), Some(session_id)) =
            (body["room_id"].as_str().and_then(|r| RoomId::parse(r).ok()), body["session_id"].as_str())
        else {
            return;
        };
        if let Err(e) = self.forward_room_key(&device, &room_id, session_id) {
            tracing::info!(%device_id, error = %e, "not forwarding a room key");
        }
    }

    fn forward_room_key(&mut self, device: &Device, room_id: &RoomId, session_id: &str) -> Result<()> {
        let session = self.groups.inbound.get(&(room_id.to_owned(), session_id.to_owned())).ok_or_else(|| {
            MegolmError::UnknownSession { room_id: room_id.to_string(), session_id: session_id.to_owned() }
        })?;
        let content = json!({
            "algorithm": MEGOLM_V1,
            "room_id": room_id,
            "session_id": session_id,
            "session_key": session.inner.export_at_first_known_index().to_base64(),
            "sender_key": session.sender_key,
            "sender_claimed_ed25519_key": session.signing_key,
            "forwarding_curve25519_key_chain": [],
        });
        let encrypted = olm::encrypt(&self.account, &mut self.sessions, device, "m.forwarded_room_key", content)?;
        self.queue_to_device("m.room.encrypted", device, encrypted);
        Ok(())
    }

    /// An Olm-decrypted `m.forwarded_room_key`: accepted from a trusted own device, for a
    /// request of ours.
    pub(crate) fn receive_forwarded_room_key(&mut self, decrypted: &olm::DecryptedOlm) -> Result<()> {
        let own = self.account.user_id.clone();
        let from =
            self.devices.by_curve_key(&own, &decrypted.sender_key).cloned().ok_or(PayloadCheck::ForwardedByStranger)?;
        if !self.is_trusted_own_device(&from) {
            return Err(PayloadCheck::ForwardedByUnverifiedDevice.into());
        }
        let content = &decrypted.event["content"];
        if content["algorithm"] != MEGOLM_V1 {
            return Err(Error::malformed("m.forwarded_room_key", "unsupported algorithm"));
        }
        let room_id: OwnedRoomId = content["room_id"]
            .as_str()
            .and_then(|r| RoomId::parse(r).ok())
            .ok_or_else(|| Error::malformed("m.forwarded_room_key", "no valid room_id"))?;
        let session_id = content["session_id"].as_str().unwrap_or_default().to_owned();
        if self.key_requests.outgoing.remove(&(room_id.clone(), session_id.clone())).is_none() {
            return Err(PayloadCheck::ForwardedUnrequested.into());
        }
        let text = |field: &str| {
            content[field].as_str().ok_or_else(|| Error::malformed("m.forwarded_room_key", format!("no {field}")))
        };
        let session = InboundSession::import(
            room_id,
            text("session_key")?,
            text("sender_key")?,
            text("sender_claimed_ed25519_key")?,
        )?;
        if session.inner.session_id() != session_id {
            return Err(Error::malformed("m.forwarded_room_key", "session_id does not match the key"));
        }
        self.groups.add_inbound(session);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ruma::{room_id, user_id};

    use super::*;
    use crate::{EncryptionSettings, ToDeviceEvent, tests::FakeServer};

    #[test]
    fn a_new_device_gets_a_missed_key_from_a_verified_own_device_only() {
        let mut server = FakeServer::default();
        let alice_id = user_id!("@alice:localhost");
        let room = room_id!("!room:localhost");
        let mut alice1 = OlmMachine::new(alice_id.to_owned(), "A1".into());
        server.flush(&mut alice1);
        alice1.share_room_key(room, &[alice_id.to_owned()], EncryptionSettings::default()).unwrap();
        let content = alice1.encrypt_room_event(room, "m.room.message", json!({"body": "before A2"})).unwrap();
        let event = json!({"type": "m.room.encrypted", "sender": alice_id, "event_id": "$1", "origin_server_ts": 1, "content": content});

        let mut alice2 = OlmMachine::new(alice_id.to_owned(), "A2".into());
        server.flush(&mut alice2);
        server.sync(&mut alice1);
        server.sync(&mut alice2);
        assert!(matches!(
            alice2.decrypt_room_event(room, &event),
            Err(Error::Megolm(MegolmError::UnknownSession { .. }))
        ));
        let session_id = event["content"]["session_id"].as_str().unwrap();

        // A1 has not verified A2: the request is ignored.
        assert!(alice2.request_room_key(room, session_id).is_some());
        assert!(alice2.request_room_key(room, session_id).is_none(), "asked once");
        server.flush(&mut alice2);
        let claim = alice1.get_missing_sessions(&[alice_id.to_owned()]).unwrap();
        server.send(&mut alice1, &claim);
        server.sync(&mut alice1);
        let out = server.sync(&mut alice2);
        assert!(!out.iter().any(|e| matches!(e, ToDeviceEvent::Decrypted { .. })), "{out:?}");
        assert!(alice2.decrypt_room_event(room, &event).is_err());

        // Once verified (both ways), the key is forwarded and A2 reads the message.
        alice1.devices.devices.get_mut(alice_id).unwrap().get_mut("A2").unwrap().locally_verified = true;
        alice2.devices.devices.get_mut(alice_id).unwrap().get_mut("A1").unwrap().locally_verified = true;
        alice2.key_requests.outgoing.clear();
        alice2.request_room_key(room, session_id).unwrap();
        server.flush(&mut alice2);
        server.sync(&mut alice1);
        let out = server.sync(&mut alice2);
        assert!(
            out.iter().any(
                |e| matches!(e, ToDeviceEvent::Decrypted { event, .. } if event["type"] == "m.forwarded_room_key")
            ),
            "{out:?}"
        );
        assert_eq!(alice2.decrypt_room_event(room, &event).unwrap().event["content"]["body"], "before A2");
    }
}
