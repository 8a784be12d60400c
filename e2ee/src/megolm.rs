//! Megolm room sessions: our outbound session per room (rotated by the room's settings and
//! whenever someone who had the key may no longer read on), inbound sessions from
//! `m.room_key`, and replay protection for decryption.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vodozemac::megolm::{GroupSession, InboundGroupSession as VInbound, MegolmMessage, SessionConfig, SessionKey};

use crate::{
    error::{Error, MegolmError, Result},
    types::{MEGOLM_V1, now_ms},
};

/// The room's `m.room.encryption` settings that govern rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionSettings {
    pub rotation_period_ms: u64,
    pub rotation_period_msgs: u64,
}

impl Default for EncryptionSettings {
    /// The spec's defaults: a week or 100 messages.
    fn default() -> Self {
        Self { rotation_period_ms: 604_800_000, rotation_period_msgs: 100 }
    }
}

impl EncryptionSettings {
    /// From an `m.room.encryption` state event's content (missing fields take the defaults).
    pub fn from_state_content(content: &Value) -> Self {
        let default = Self::default();
        Self {
            rotation_period_ms: content
                .get("rotation_period_ms")
                .and_then(Value::as_u64)
                .unwrap_or(default.rotation_period_ms),
            rotation_period_msgs: content
                .get("rotation_period_msgs")
                .and_then(Value::as_u64)
                .unwrap_or(default.rotation_period_msgs),
        }
    }
}

/// A recipient of our room key: the device and the curve25519 key it had then.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Recipient {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub curve25519: String,
}

impl Recipient {
    pub(crate) fn of(device: &crate::devices::Device) -> Self {
        Self {
            user_id: device.user_id.clone(),
            device_id: device.device_id.clone(),
            curve25519: device.curve25519.clone(),
        }
    }
}

pub(crate) struct OutboundSession {
    pub inner: GroupSession,
    pub room_id: OwnedRoomId,
    pub created_ms: u64,
    pub message_count: u64,
    pub settings: EncryptionSettings,
    /// Devices the key was sent to (acknowledged by the server).
    pub shared_with: BTreeSet<Recipient>,
    /// Devices told `m.room_key.withheld` (no Olm session could be made with them).
    pub withheld: BTreeSet<Recipient>,
}

impl OutboundSession {
    pub fn new(room_id: OwnedRoomId, settings: EncryptionSettings) -> Self {
        Self {
            inner: GroupSession::new(SessionConfig::version_1()),
            room_id,
            created_ms: now_ms(),
            message_count: 0,
            settings,
            shared_with: BTreeSet::new(),
            withheld: BTreeSet::new(),
        }
    }

    pub fn session_id(&self) -> String {
        self.inner.session_id()
    }

    /// Too old or too many messages for the room's rotation settings.
    pub fn expired(&self) -> bool {
        self.message_count >= self.settings.rotation_period_msgs
            || now_ms().saturating_sub(self.created_ms) >= self.settings.rotation_period_ms
    }

    /// The `m.room_key` content for this session at its current index.
    pub fn room_key_content(&self) -> Value {
        json!({
            "algorithm": MEGOLM_V1,
            "room_id": self.room_id,
            "session_id": self.session_id(),
            "session_key": self.inner.session_key().to_base64(),
        })
    }
}

/// Metadata persisted with an outbound session's pickle.
#[derive(Serialize, Deserialize)]
pub(crate) struct OutboundMeta {
    pub room_id: OwnedRoomId,
    pub created_ms: u64,
    pub message_count: u64,
    pub settings: EncryptionSettings,
    pub shared_with: BTreeSet<Recipient>,
    #[serde(default)]
    pub withheld: BTreeSet<Recipient>,
}

pub(crate) struct InboundSession {
    pub inner: VInbound,
    pub room_id: OwnedRoomId,
    /// The curve25519 key of the device whose Olm session delivered the key.
    pub sender_key: String,
    /// The ed25519 key that device claimed in the Olm payload.
    pub signing_key: String,
    /// Uploaded to the key backup already.
    pub backed_up: bool,
}

impl InboundSession {
    pub fn from_room_key(room_id: OwnedRoomId, session_key: &str, sender_key: &str, signing_key: &str) -> Result<Self> {
        let key = SessionKey::from_base64(session_key).map_err(|e| Error::invalid("m.room_key session_key", e))?;
        Ok(Self {
            inner: VInbound::new(&key, SessionConfig::version_1()),
            room_id,
            sender_key: sender_key.to_owned(),
            signing_key: signing_key.to_owned(),
            backed_up: false,
        })
    }
}

impl InboundSession {
    /// From an exported session key (key backup, key export).
    pub fn import(room_id: OwnedRoomId, exported_key: &str, sender_key: &str, signing_key: &str) -> Result<Self> {
        let key = vodozemac::megolm::ExportedSessionKey::from_base64(exported_key)
            .map_err(|e| Error::invalid("exported session key", e))?;
        Ok(Self {
            inner: VInbound::import(&key, SessionConfig::version_1()),
            room_id,
            sender_key: sender_key.to_owned(),
            signing_key: signing_key.to_owned(),
            backed_up: false,
        })
    }
}

/// Metadata persisted with an inbound session's pickle.
#[derive(Serialize, Deserialize)]
pub(crate) struct InboundMeta {
    pub room_id: OwnedRoomId,
    pub sender_key: String,
    pub signing_key: String,
    pub backed_up: bool,
}

/// Which event used each (session, message index): the same index in a different event is a
/// replay (the spec's "message index + event id / timestamp" check).
#[derive(Default)]
pub(crate) struct ReplayGuard {
    pub seen: HashMap<(String, u32), (String, u64)>,
    pub changed: BTreeSet<(String, u32)>,
}

impl ReplayGuard {
    pub fn check(&mut self, session_id: &str, index: u32, event_id: &str, ts: u64) -> Result<()> {
        let key = (session_id.to_owned(), index);
        match self.seen.get(&key) {
            Some((seen_id, seen_ts)) if seen_id != event_id || *seen_ts != ts => {
                Err(MegolmError::Replay { session_id: session_id.to_owned(), index }.into())
            }
            Some(_) => Ok(()),
            None => {
                self.seen.insert(key.clone(), (event_id.to_owned(), ts));
                self.changed.insert(key);
                Ok(())
            }
        }
    }
}

/// Who an inbound session came from.
#[derive(Debug, Clone)]
pub(crate) struct InboundInfo {
    pub session_id: String,
    pub sender_key: String,
    pub signing_key: String,
}

#[derive(Default)]
pub(crate) struct GroupSessions {
    pub outbound: BTreeMap<OwnedRoomId, OutboundSession>,
    /// Inbound sessions by (room, session id).
    pub inbound: BTreeMap<(OwnedRoomId, String), InboundSession>,
    pub replay: ReplayGuard,
    /// `m.room_key.withheld` notices: (room, session id) -> (sending user, code, reason).
    pub withheld: HashMap<(OwnedRoomId, String), (OwnedUserId, String, String)>,
    pub changed_outbound: BTreeSet<OwnedRoomId>,
    pub changed_inbound: BTreeSet<(OwnedRoomId, String)>,
}

impl GroupSessions {
    /// Adds an inbound session unless we already have one that knows an earlier index.
    pub fn add_inbound(&mut self, session: InboundSession) -> bool {
        let key = (session.room_id.clone(), session.inner.session_id());
        if let Some(existing) = self.inbound.get(&key)
            && existing.inner.first_known_index() <= session.inner.first_known_index()
        {
            return false;
        }
        self.changed_inbound.insert(key.clone());
        self.inbound.insert(key, session);
        true
    }

    /// Encrypts with the room's outbound session.
    pub fn encrypt(
        &mut self,
        room_id: &OwnedRoomId,
        our_curve: &str,
        our_device: &str,
        event_type: &str,
        content: Value,
    ) -> Result<Value> {
        let session =
            self.outbound.get_mut(room_id).ok_or_else(|| MegolmError::MissingOutboundSession(room_id.to_string()))?;
        let payload = json!({ "type": event_type, "content": content, "room_id": room_id });
        let message = session.inner.encrypt(serde_json::to_vec(&payload)?);
        session.message_count += 1;
        self.changed_outbound.insert(room_id.clone());
        Ok(json!({
            "algorithm": MEGOLM_V1,
            "ciphertext": message.to_base64(),
            "session_id": session.session_id(),
            // Deprecated by the spec but still read by older clients.
            "sender_key": our_curve,
            "device_id": our_device,
        }))
    }

    /// Decrypts a Megolm event's content: (plaintext payload, message index, session facts).
    pub fn decrypt(&mut self, room_id: &OwnedRoomId, content: &Value) -> Result<(Value, u32, InboundInfo)> {
        let session_id = content
            .get("session_id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::malformed("Megolm content", "no session_id"))?;
        let ciphertext = content
            .get("ciphertext")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::malformed("Megolm content", "no ciphertext"))?;
        let message = MegolmMessage::from_base64(ciphertext).map_err(|e| Error::invalid("Megolm ciphertext", e))?;
        let key = (room_id.clone(), session_id.to_owned());
        let session = self.inbound.get_mut(&key).ok_or_else(|| MegolmError::UnknownSession {
            room_id: room_id.to_string(),
            session_id: session_id.to_owned(),
        })?;
        let decrypted = session.inner.decrypt(&message).map_err(MegolmError::Decryption)?;
        let payload: Value = serde_json::from_slice(&decrypted.plaintext)?;
        let info = InboundInfo {
            session_id: session_id.to_owned(),
            sender_key: session.sender_key.clone(),
            signing_key: session.signing_key.clone(),
        };
        Ok((payload, decrypted.message_index, info))
    }
}

#[cfg(test)]
mod tests {
    use ruma::room_id;

    use super::*;

    #[test]
    fn round_trip_and_replay_detection() {
        let room = room_id!("!r:localhost").to_owned();
        let mut ours = GroupSessions::default();
        let outbound = OutboundSession::new(room.clone(), EncryptionSettings::default());
        let key = outbound.room_key_content();
        ours.outbound.insert(room.clone(), outbound);

        let mut theirs = GroupSessions::default();
        let inbound =
            InboundSession::from_room_key(room.clone(), key["session_key"].as_str().unwrap(), "curve", "ed").unwrap();
        assert!(theirs.add_inbound(inbound));

        let c0 = ours.encrypt(&room, "curve", "DEV", "m.room.message", json!({"body": "zero"})).unwrap();
        let c1 = ours.encrypt(&room, "curve", "DEV", "m.room.message", json!({"body": "one"})).unwrap();
        let (p1, i1, _) = theirs.decrypt(&room, &c1).unwrap();
        assert_eq!((p1["content"]["body"].as_str(), i1), (Some("one"), 1));
        let (p0, i0, _) = theirs.decrypt(&room, &c0).unwrap();
        assert_eq!((p0["room_id"].as_str(), i0), (Some("!r:localhost"), 0));

        theirs.replay.check("s", 1, "$a", 5).unwrap();
        theirs.replay.check("s", 1, "$a", 5).unwrap();
        assert!(matches!(theirs.replay.check("s", 1, "$b", 5), Err(Error::Megolm(MegolmError::Replay { .. }))));
        assert!(matches!(theirs.replay.check("s", 1, "$a", 6), Err(Error::Megolm(MegolmError::Replay { .. }))));

        // Another room's session id is not usable in this room.
        let other = room_id!("!other:localhost").to_owned();
        assert!(matches!(theirs.decrypt(&other, &c0), Err(Error::Megolm(MegolmError::UnknownSession { .. }))));
    }

    #[test]
    fn rotation_by_message_count() {
        let room = room_id!("!r:localhost").to_owned();
        let mut s =
            OutboundSession::new(room, EncryptionSettings { rotation_period_ms: u64::MAX, rotation_period_msgs: 2 });
        assert!(!s.expired());
        s.message_count = 2;
        assert!(s.expired());
        let s = OutboundSession::new(
            room_id!("!r:localhost").to_owned(),
            EncryptionSettings { rotation_period_ms: 0, rotation_period_msgs: 100 },
        );
        assert!(s.expired());
    }

    #[test]
    fn settings_from_state() {
        let s = EncryptionSettings::from_state_content(&json!({"algorithm": MEGOLM_V1, "rotation_period_msgs": 5}));
        assert_eq!(s, EncryptionSettings { rotation_period_ms: 604_800_000, rotation_period_msgs: 5 });
    }
}
