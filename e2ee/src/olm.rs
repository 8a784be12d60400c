//! Olm sessions with other devices and `m.olm.v1.curve25519-aes-sha2` to-device encryption.
//!
//! Session selection follows the spec: to send, use the session we last received (and
//! decrypted) a message on, counting a session's creation as its first reception; to
//! receive, a pre-key message goes to the session it names or starts a new inbound session,
//! and a normal message is tried on every session with that device.

use std::collections::{BTreeSet, HashMap};

use ruma::UserId;
use serde_json::{Value, json};
use vodozemac::{
    Curve25519PublicKey,
    olm::{OlmMessage, Session, SessionConfig},
};

use crate::{
    account::Account,
    devices::Device,
    error::{Error, OlmError, PayloadCheck, Result},
    types::{OLM_V1, now_ms},
};

pub(crate) struct StoredSession {
    pub session: Session,
    pub created_ms: u64,
    /// When we last decrypted a message on it (its creation time until then).
    pub last_received_ms: u64,
}

#[derive(Default)]
pub(crate) struct OlmSessions {
    /// Sessions by the other device's curve25519 key.
    pub by_key: HashMap<String, Vec<StoredSession>>,
    /// (sender key, session id) changed since the last save.
    pub changed: BTreeSet<(String, String)>,
}

impl OlmSessions {
    pub fn add(&mut self, sender_key: &str, session: Session) {
        let now = now_ms();
        self.changed.insert((sender_key.to_owned(), session.session_id()));
        self.by_key.entry(sender_key.to_owned()).or_default().push(StoredSession {
            session,
            created_ms: now,
            last_received_ms: now,
        });
    }

    pub fn has_session_id(&self, sender_key: &str, session_id: &str) -> bool {
        self.by_key.get(sender_key).is_some_and(|s| s.iter().any(|s| s.session.session_id() == session_id))
    }

    pub fn has_session(&self, sender_key: &str) -> bool {
        self.by_key.get(sender_key).is_some_and(|s| !s.is_empty())
    }

    /// The session to send on (see the module comment).
    pub fn sending_session(&mut self, sender_key: &str) -> Option<&mut StoredSession> {
        self.by_key.get_mut(sender_key)?.iter_mut().max_by_key(|s| (s.last_received_ms, s.created_ms))
    }

    /// Tries existing sessions: the one a pre-key message names, or each one for a normal message.
    fn decrypt_existing(&mut self, sender_key: &str, message: &OlmMessage) -> Option<Vec<u8>> {
        let sessions = self.by_key.get_mut(sender_key)?;
        let wanted = match message {
            OlmMessage::PreKey(m) => Some(m.session_id()),
            OlmMessage::Normal(_) => None,
        };
        // Most recently used first: the likeliest to succeed.
        sessions.sort_by_key(|s| std::cmp::Reverse(s.last_received_ms));
        for stored in sessions.iter_mut() {
            if wanted.as_ref().is_some_and(|id| *id != stored.session.session_id()) {
                continue;
            }
            if let Ok(plaintext) = stored.session.decrypt(message) {
                stored.last_received_ms = now_ms().max(stored.last_received_ms);
                self.changed.insert((sender_key.to_owned(), stored.session.session_id()));
                return Some(plaintext);
            }
        }
        None
    }
}

/// Creates an outbound session from a claimed one-time (or fallback) key, after checking the
/// key's signature by the device it was claimed for.
pub(crate) fn session_from_claimed_key(account: &Account, device: &Device, claimed: &Value) -> Result<Session> {
    crate::signing::verify_json(
        claimed,
        device.user_id.as_str(),
        &format!("ed25519:{}", device.device_id),
        &device.ed25519_key()?,
    )?;
    let key = claimed
        .get("key")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::malformed("claimed one-time key", "no `key`"))?;
    let one_time_key = Curve25519PublicKey::from_base64(key).map_err(|e| Error::invalid("claimed one-time key", e))?;
    account
        .inner
        .create_outbound_session(SessionConfig::version_1(), device.curve25519_key()?, one_time_key)
        .map_err(|e| OlmError::SessionCreation(e).into())
}

/// Encrypts a to-device event for one device: the `m.room.encrypted` content to send.
pub(crate) fn encrypt(
    account: &Account,
    sessions: &mut OlmSessions,
    device: &Device,
    event_type: &str,
    content: Value,
) -> Result<Value> {
    let stored = sessions.sending_session(&device.curve25519).ok_or_else(|| OlmError::MissingSession {
        user_id: device.user_id.to_string(),
        device_id: device.device_id.to_string(),
    })?;
    // The payload binds sender and recipient identities so a message cannot be replayed to,
    // or passed off as coming from, anyone else.
    let payload = json!({
        "type": event_type,
        "content": content,
        "sender": account.user_id,
        "sender_device": account.device_id,
        "keys": { "ed25519": account.ed25519_key().to_base64() },
        "recipient": device.user_id,
        "recipient_keys": { "ed25519": device.ed25519 },
    });
    let message = stored.session.encrypt(serde_json::to_vec(&payload)?).map_err(OlmError::Encryption)?;
    let session_id = stored.session.session_id();
    sessions.changed.insert((device.curve25519.clone(), session_id));
    Ok(json!({
        "algorithm": OLM_V1,
        "sender_key": account.curve25519_key().to_base64(),
        "ciphertext": { device.curve25519.clone(): serde_json::to_value(&message)? },
    }))
}

/// A decrypted and checked Olm payload.
#[derive(Debug, Clone)]
pub struct DecryptedOlm {
    pub sender_key: String,
    /// The sender's ed25519 key as the payload claims it (checked against the device when we
    /// know it).
    pub sender_ed25519: String,
    /// The decrypted event: `type`, `content`, `sender`, ...
    pub event: Value,
}

/// Outcome of a failed decryption that calls for a new session (the spec's wedged-session
/// recovery), reported with the error.
pub(crate) struct Wedged {
    pub sender_key: String,
}

/// Decrypts an Olm `m.room.encrypted` to-device event and runs the spec's checks.
pub(crate) fn decrypt(
    account: &mut Account,
    sessions: &mut OlmSessions,
    known_sender_device: impl Fn(&UserId, &str) -> Option<Device>,
    event: &Value,
) -> std::result::Result<DecryptedOlm, (Error, Option<Wedged>)> {
    let plain = |e: Error| (e, None);
    let sender = event
        .get("sender")
        .and_then(Value::as_str)
        .ok_or_else(|| plain(Error::malformed("to-device event", "no sender")))?;
    let sender: &UserId = sender.try_into().map_err(|e| plain(Error::invalid("to-device sender", e)))?;
    let content = &event["content"];
    let sender_key = content
        .get("sender_key")
        .and_then(Value::as_str)
        .ok_or_else(|| plain(Error::malformed("Olm content", "no sender_key")))?;
    let sender_curve =
        Curve25519PublicKey::from_base64(sender_key).map_err(|e| plain(Error::invalid("sender_key", e)))?;
    let ours = account.curve25519_key().to_base64();
    let ciphertext = content
        .get("ciphertext")
        .and_then(|c| c.get(&ours))
        .ok_or_else(|| plain(OlmError::NoCiphertextForUs.into()))?;
    let message: OlmMessage =
        serde_json::from_value(ciphertext.clone()).map_err(|e| plain(Error::invalid("Olm ciphertext", e)))?;

    let plaintext = match sessions.decrypt_existing(sender_key, &message) {
        Some(plaintext) => plaintext,
        None => match &message {
            // Its session exists but did not decrypt it: a duplicate (or replayed) message, not
            // a broken session, so no new session is made.
            OlmMessage::PreKey(pre_key) if sessions.has_session_id(sender_key, &pre_key.session_id()) => {
                return Err(plain(OlmError::DuplicatePreKeyMessage.into()));
            }
            OlmMessage::PreKey(pre_key) => {
                match account.inner.create_inbound_session(SessionConfig::version_1(), sender_curve, pre_key) {
                    Ok(created) => {
                        sessions.add(sender_key, created.session);
                        created.plaintext
                    }
                    Err(e) => {
                        return Err((
                            OlmError::PreKeyRejected(e).into(),
                            Some(Wedged { sender_key: sender_key.to_owned() }),
                        ));
                    }
                }
            }
            OlmMessage::Normal(_) => {
                return Err((OlmError::NoSessionDecrypts.into(), Some(Wedged { sender_key: sender_key.to_owned() })));
            }
        },
    };

    let payload: Value = serde_json::from_slice(&plaintext).map_err(|e| plain(Error::invalid("Olm payload", e)))?;
    check_payload(account, sender, sender_key, &payload, known_sender_device).map_err(plain)?;
    let sender_ed25519 = payload["keys"]["ed25519"].as_str().unwrap_or_default().to_owned();
    Ok(DecryptedOlm { sender_key: sender_key.to_owned(), sender_ed25519, event: payload })
}

/// The spec's checks on a decrypted Olm payload.
fn check_payload(
    account: &Account,
    sender: &UserId,
    sender_key: &str,
    payload: &Value,
    known_sender_device: impl Fn(&UserId, &str) -> Option<Device>,
) -> Result<()> {
    let text = |field: &str| payload.get(field).and_then(Value::as_str);
    if text("sender") != Some(sender.as_str()) {
        return Err(PayloadCheck::Sender.into());
    }
    if text("recipient") != Some(account.user_id.as_str()) {
        return Err(PayloadCheck::Recipient.into());
    }
    if payload["recipient_keys"]["ed25519"].as_str() != Some(account.ed25519_key().to_base64().as_str()) {
        return Err(PayloadCheck::RecipientKey.into());
    }
    if text("type").is_none() || !payload.get("content").is_some_and(Value::is_object) {
        return Err(PayloadCheck::NoTypeOrContent.into());
    }
    let claimed = payload["keys"]["ed25519"].as_str().ok_or(PayloadCheck::NoSenderKey)?;
    // When we know the device behind the curve25519 key, the claimed signing key must be its.
    if let Some(device) = known_sender_device(sender, sender_key)
        && device.ed25519 != claimed
    {
        return Err(PayloadCheck::SenderKey.into());
    }
    Ok(())
}
