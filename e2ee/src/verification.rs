//! Interactive device verification with SAS (`m.sas.v1`, emoji and decimal) over to-device
//! messages: request, ready, start, accept, key, mac, done (and cancel).
//!
//! The requester sends `start` once the other side is ready; the other side accepts with a
//! commitment to its ephemeral key, so neither side can pick its key after seeing the other's.
//! The short authentication string and the MACs come from vodozemac's SAS (curve25519 +
//! HKDF-SHA-256, `hkdf-hmac-sha256.v2`); a verified device is marked `locally_verified`.

use std::collections::BTreeMap;

use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use vodozemac::{
    Curve25519PublicKey,
    sas::{EstablishedSas, Mac, Sas},
};

use crate::{
    error::{Error, Result, VerificationError},
    machine::OlmMachine,
    signing::canonical_signable,
    types::{now_ms, random_id},
};

const SAS_V1: &str = "m.sas.v1";
const KEY_AGREEMENT: &str = "curve25519-hkdf-sha256";
const HASH: &str = "sha256";
const MAC_METHOD: &str = "hkdf-hmac-sha256.v2";

/// The spec's 64 SAS emoji with their English names, by index.
pub const SAS_EMOJI: [(&str, &str); 64] = [
    ("🐶", "Dog"),
    ("🐱", "Cat"),
    ("🦁", "Lion"),
    ("🐎", "Horse"),
    ("🦄", "Unicorn"),
    ("🐷", "Pig"),
    ("🐘", "Elephant"),
    ("🐰", "Rabbit"),
    ("🐼", "Panda"),
    ("🐓", "Rooster"),
    ("🐧", "Penguin"),
    ("🐢", "Turtle"),
    ("🐟", "Fish"),
    ("🐙", "Octopus"),
    ("🦋", "Butterfly"),
    ("🌷", "Flower"),
    ("🌳", "Tree"),
    ("🌵", "Cactus"),
    ("🍄", "Mushroom"),
    ("🌏", "Globe"),
    ("🌙", "Moon"),
    ("☁️", "Cloud"),
    ("🔥", "Fire"),
    ("🍌", "Banana"),
    ("🍎", "Apple"),
    ("🍓", "Strawberry"),
    ("🌽", "Corn"),
    ("🍕", "Pizza"),
    ("🎂", "Cake"),
    ("❤️", "Heart"),
    ("😀", "Smiley"),
    ("🤖", "Robot"),
    ("🎩", "Hat"),
    ("👓", "Glasses"),
    ("🔧", "Spanner"),
    ("🎅", "Santa"),
    ("👍", "Thumbs Up"),
    ("☂️", "Umbrella"),
    ("⌛", "Hourglass"),
    ("⏰", "Clock"),
    ("🎁", "Gift"),
    ("💡", "Light Bulb"),
    ("📕", "Book"),
    ("✏️", "Pencil"),
    ("📎", "Paperclip"),
    ("✂️", "Scissors"),
    ("🔒", "Lock"),
    ("🔑", "Key"),
    ("🔨", "Hammer"),
    ("☎️", "Telephone"),
    ("🏁", "Flag"),
    ("🚂", "Train"),
    ("🚲", "Bicycle"),
    ("✈️", "Aeroplane"),
    ("🚀", "Rocket"),
    ("🏆", "Trophy"),
    ("⚽", "Ball"),
    ("🎸", "Guitar"),
    ("🎺", "Trumpet"),
    ("🔔", "Bell"),
    ("⚓", "Anchor"),
    ("🎧", "Headphones"),
    ("📁", "Folder"),
    ("📌", "Pin"),
];

/// Where a verification stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerificationState {
    /// We asked; waiting for `ready`.
    Requested,
    /// They asked; waiting for the user to accept ([`OlmMachine::accept_verification`]).
    Incoming,
    /// Ready exchanged, SAS negotiation under way.
    Negotiating,
    /// Both keys known: show the emoji/decimals and ask the user to compare.
    ShowSas,
    /// The user confirmed; waiting for the other side's MAC or `done`.
    Confirmed,
    /// Both sides confirmed and the MACs matched: the device is verified.
    Done,
    Cancelled {
        code: String,
        reason: String,
    },
}

pub(crate) struct Verification {
    other_user: OwnedUserId,
    other_device: Option<OwnedDeviceId>,
    state: VerificationState,
    we_requested: bool,
    we_started: bool,
    sas: Option<Sas>,
    our_key: String,
    established: Option<EstablishedSas>,
    start_content: Option<Value>,
    their_commitment: Option<String>,
    their_mac: Option<Value>,
    mac_verified: bool,
    done_sent: bool,
    done_received: bool,
}

#[derive(Default)]
pub(crate) struct Verifications {
    by_txn: BTreeMap<String, Verification>,
}

impl OlmMachine {
    /// Asks one of `user_id`'s devices to verify with us; returns the transaction id.
    pub fn request_verification(&mut self, user_id: &UserId, device_id: &str) -> String {
        let txn = random_id();
        let sas = Sas::new();
        let our_key = sas.public_key().to_base64();
        self.verifications.by_txn.insert(
            txn.clone(),
            Verification {
                other_user: user_id.to_owned(),
                other_device: Some(device_id.into()),
                state: VerificationState::Requested,
                we_requested: true,
                we_started: false,
                sas: Some(sas),
                our_key,
                established: None,
                start_content: None,
                their_commitment: None,
                their_mac: None,
                mac_verified: false,
                done_sent: false,
                done_received: false,
            },
        );
        let content = json!({
            "from_device": self.device_id(),
            "methods": [SAS_V1],
            "timestamp": now_ms(),
            "transaction_id": txn,
        });
        self.queue_plain_to_device("m.key.verification.request", user_id, device_id, content);
        txn
    }

    /// Incoming requests the user has not answered: (transaction id, user, device).
    pub fn incoming_verification_requests(&self) -> Vec<(String, OwnedUserId, Option<OwnedDeviceId>)> {
        self.verifications
            .by_txn
            .iter()
            .filter(|(_, v)| v.state == VerificationState::Incoming)
            .map(|(t, v)| (t.clone(), v.other_user.clone(), v.other_device.clone()))
            .collect()
    }

    pub fn verification_state(&self, txn: &str) -> Option<VerificationState> {
        self.verifications.by_txn.get(txn).map(|v| v.state.clone())
    }

    /// The user accepts an incoming request: answer `ready`.
    pub fn accept_verification(&mut self, txn: &str) -> Result<()> {
        let v = self.verification_mut(txn)?;
        if v.state != VerificationState::Incoming {
            return Err(unexpected("accept: not an incoming request"));
        }
        v.state = VerificationState::Negotiating;
        let (user, device) = (v.other_user.clone(), v.other_device.clone().unwrap_or_else(|| "*".into()));
        let content = json!({ "from_device": self.device_id(), "methods": [SAS_V1], "transaction_id": txn });
        self.queue_plain_to_device("m.key.verification.ready", &user, device.as_str(), content);
        Ok(())
    }

    /// The seven emoji (symbol, name) to compare, once both keys are known.
    pub fn sas_emoji(&self, txn: &str) -> Option<[(&'static str, &'static str); 7]> {
        let bytes = self.sas_bytes(txn)?;
        Some(bytes.emoji_indices().map(|i| SAS_EMOJI[i as usize]))
    }

    /// The three four-digit numbers to compare (1000..=9191), once both keys are known.
    pub fn sas_decimals(&self, txn: &str) -> Option<(u16, u16, u16)> {
        Some(self.sas_bytes(txn)?.decimals())
    }

    fn sas_bytes(&self, txn: &str) -> Option<vodozemac::sas::SasBytes> {
        let v = self.verifications.by_txn.get(txn)?;
        let established = v.established.as_ref()?;
        Some(established.bytes(&self.sas_info(v, txn)))
    }

    /// The SAS info string: the starting side's identity and key first.
    fn sas_info(&self, v: &Verification, txn: &str) -> String {
        let their_key = v.established.as_ref().map(|e| e.their_public_key().to_base64()).unwrap_or_default();
        let other_device = v.other_device.as_ref().map(|d| d.as_str()).unwrap_or_default();
        let ours = (self.user_id().as_str(), self.device_id().as_str(), v.our_key.as_str());
        let theirs = (v.other_user.as_str(), other_device, their_key.as_str());
        let (starter, accepter) = if v.we_started { (ours, theirs) } else { (theirs, ours) };
        format!(
            "MATRIX_KEY_VERIFICATION_SAS|{}|{}|{}|{}|{}|{}|{txn}",
            starter.0, starter.1, starter.2, accepter.0, accepter.1, accepter.2
        )
    }

    /// The user says the emoji match: send our MAC (and finish if theirs is already here).
    pub fn confirm_verification(&mut self, txn: &str) -> Result<()> {
        let v = self.verifications.by_txn.get(txn).ok_or_else(|| unknown(txn))?;
        if v.state != VerificationState::ShowSas {
            return Err(unexpected("confirm: the SAS is not being shown"));
        }
        let established = v.established.as_ref().expect("ShowSas has an established SAS");
        let other_device = v.other_device.clone().unwrap_or_else(|| "*".into());
        let key_id = format!("ed25519:{}", self.device_id());
        let base = format!(
            "MATRIX_KEY_VERIFICATION_MAC{}{}{}{}{txn}",
            self.user_id(),
            self.device_id(),
            v.other_user,
            other_device
        );
        let key_mac = established.calculate_mac(&self.ed25519_key(), &format!("{base}{key_id}")).to_base64();
        let keys_mac = established.calculate_mac(&key_id, &format!("{base}KEY_IDS")).to_base64();
        let user = v.other_user.clone();
        let content = json!({ "transaction_id": txn, "mac": { key_id: key_mac }, "keys": keys_mac });
        self.queue_plain_to_device("m.key.verification.mac", &user, other_device.as_str(), content);
        self.verification_mut(txn)?.state = VerificationState::Confirmed;
        self.check_their_mac(txn);
        Ok(())
    }

    /// Cancels (the user said the emoji differ: `m.mismatched_sas`; or `m.user`).
    pub fn cancel_verification(&mut self, txn: &str, code: &str, reason: &str) -> Result<()> {
        let v = self.verification_mut(txn)?;
        let (user, device) = (v.other_user.clone(), v.other_device.clone().unwrap_or_else(|| "*".into()));
        v.state = VerificationState::Cancelled { code: code.to_owned(), reason: reason.to_owned() };
        let content = json!({ "transaction_id": txn, "code": code, "reason": reason });
        self.queue_plain_to_device("m.key.verification.cancel", &user, device.as_str(), content);
        Ok(())
    }

    fn verification_mut(&mut self, txn: &str) -> Result<&mut Verification> {
        self.verifications.by_txn.get_mut(txn).ok_or_else(|| unknown(txn))
    }

    /// Handles one `m.key.verification.*` to-device event (called from sync processing).
    pub(crate) fn receive_verification_event(&mut self, event: &Value) {
        let event_type = event["type"].as_str().unwrap_or_default().to_owned();
        let content = &event["content"];
        let Some(txn) = content["transaction_id"].as_str().map(str::to_owned) else { return };
        let Some(sender) = event["sender"].as_str().and_then(|s| UserId::parse(s).ok()) else { return };
        if event_type == "m.key.verification.request" {
            self.receive_request(&txn, sender, content);
            return;
        }
        let Some(v) = self.verifications.by_txn.get(&txn) else { return };
        if v.other_user != sender {
            return; // Someone else's message about this transaction: not ours to act on.
        }
        if matches!(v.state, VerificationState::Cancelled { .. } | VerificationState::Done) {
            return;
        }
        let result = match event_type.as_str() {
            "m.key.verification.ready" => self.receive_ready(&txn, content),
            "m.key.verification.start" => self.receive_start(&txn, content),
            "m.key.verification.accept" => self.receive_accept(&txn, content),
            "m.key.verification.key" => self.receive_key(&txn, content),
            "m.key.verification.mac" => {
                if let Some(v) = self.verifications.by_txn.get_mut(&txn) {
                    v.their_mac = Some(content.clone());
                }
                self.check_their_mac(&txn);
                Ok(())
            }
            "m.key.verification.done" => {
                if let Some(v) = self.verifications.by_txn.get_mut(&txn) {
                    v.done_received = true;
                    if v.done_sent && v.mac_verified {
                        v.state = VerificationState::Done;
                    }
                }
                Ok(())
            }
            "m.key.verification.cancel" => {
                if let Some(v) = self.verifications.by_txn.get_mut(&txn) {
                    v.state = VerificationState::Cancelled {
                        code: content["code"].as_str().unwrap_or("m.user").to_owned(),
                        reason: content["reason"].as_str().unwrap_or_default().to_owned(),
                    };
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(Error::Verification(VerificationError::Cancelled { code, reason })) = result {
            let _ = self.cancel_verification(&txn, code, &reason);
        }
    }

    fn receive_request(&mut self, txn: &str, sender: OwnedUserId, content: &Value) {
        // The spec's freshness window: ignore requests over 10 minutes old or 5 in the future.
        let ts = content["timestamp"].as_u64().unwrap_or(0);
        let now = now_ms();
        if ts + 10 * 60 * 1000 < now || ts > now + 5 * 60 * 1000 {
            return;
        }
        let methods = content["methods"].as_array().cloned().unwrap_or_default();
        if !methods.iter().any(|m| m == SAS_V1) || self.verifications.by_txn.contains_key(txn) {
            return;
        }
        let Some(from_device) = content["from_device"].as_str() else { return };
        let sas = Sas::new();
        let our_key = sas.public_key().to_base64();
        self.verifications.by_txn.insert(
            txn.to_owned(),
            Verification {
                other_user: sender,
                other_device: Some(from_device.into()),
                state: VerificationState::Incoming,
                we_requested: false,
                we_started: false,
                sas: Some(sas),
                our_key,
                established: None,
                start_content: None,
                their_commitment: None,
                their_mac: None,
                mac_verified: false,
                done_sent: false,
                done_received: false,
            },
        );
    }

    fn receive_ready(&mut self, txn: &str, content: &Value) -> Result<()> {
        let device_id = self.device_id().to_owned();
        let v = self.verification_mut(txn)?;
        if !v.we_requested || v.state != VerificationState::Requested {
            return Err(cancel("m.unexpected_message", "ready without our request"));
        }
        if !content["methods"].as_array().is_some_and(|m| m.iter().any(|m| m == SAS_V1)) {
            return Err(cancel("m.unknown_method", "no common verification method"));
        }
        if let Some(from) = content["from_device"].as_str() {
            v.other_device = Some(from.into());
        }
        v.state = VerificationState::Negotiating;
        v.we_started = true;
        let start = json!({
            "from_device": device_id,
            "method": SAS_V1,
            "key_agreement_protocols": [KEY_AGREEMENT],
            "hashes": [HASH],
            "message_authentication_codes": [MAC_METHOD],
            "short_authentication_string": ["decimal", "emoji"],
            "transaction_id": txn,
        });
        v.start_content = Some(start.clone());
        let (user, device) = (v.other_user.clone(), v.other_device.clone().unwrap_or_else(|| "*".into()));
        self.queue_plain_to_device("m.key.verification.start", &user, device.as_str(), start);
        Ok(())
    }

    fn receive_start(&mut self, txn: &str, content: &Value) -> Result<()> {
        let v = self.verification_mut(txn)?;
        if v.we_started || v.state != VerificationState::Negotiating {
            return Err(cancel("m.unexpected_message", "start in the wrong state"));
        }
        let offers =
            |field: &str, wanted: &str| content[field].as_array().is_some_and(|a| a.iter().any(|x| x == wanted));
        if content["method"] != SAS_V1
            || !offers("key_agreement_protocols", KEY_AGREEMENT)
            || !offers("hashes", HASH)
            || !offers("message_authentication_codes", MAC_METHOD)
            || !offers("short_authentication_string", "emoji")
        {
            return Err(cancel("m.unknown_method", "no common SAS parameters"));
        }
        // The commitment: hash of our key and the canonical start content.
        let canonical =
            canonical_signable(content).map_err(|_| cancel("m.invalid_message", "start is not canonical JSON"))?;
        let commitment = vodozemac::base64_encode(Sha256::digest(format!("{}{canonical}", v.our_key).as_bytes()));
        v.start_content = Some(content.clone());
        let accept = json!({
            "transaction_id": txn,
            "method": SAS_V1,
            "key_agreement_protocol": KEY_AGREEMENT,
            "hash": HASH,
            "message_authentication_code": MAC_METHOD,
            "short_authentication_string": ["decimal", "emoji"],
            "commitment": commitment,
        });
        let (user, device) = (v.other_user.clone(), v.other_device.clone().unwrap_or_else(|| "*".into()));
        self.queue_plain_to_device("m.key.verification.accept", &user, device.as_str(), accept);
        Ok(())
    }

    fn receive_accept(&mut self, txn: &str, content: &Value) -> Result<()> {
        let v = self.verification_mut(txn)?;
        if !v.we_started || v.their_commitment.is_some() {
            return Err(cancel("m.unexpected_message", "accept in the wrong state"));
        }
        if content["key_agreement_protocol"] != KEY_AGREEMENT
            || content["hash"] != HASH
            || content["message_authentication_code"] != MAC_METHOD
        {
            return Err(cancel("m.unknown_method", "accepted parameters we did not offer"));
        }
        let commitment = content["commitment"].as_str().ok_or_else(|| cancel("m.invalid_message", "no commitment"))?;
        v.their_commitment = Some(commitment.to_owned());
        let key = json!({ "transaction_id": txn, "key": v.our_key });
        let (user, device) = (v.other_user.clone(), v.other_device.clone().unwrap_or_else(|| "*".into()));
        self.queue_plain_to_device("m.key.verification.key", &user, device.as_str(), key);
        Ok(())
    }

    fn receive_key(&mut self, txn: &str, content: &Value) -> Result<()> {
        let v = self.verification_mut(txn)?;
        let their_key = content["key"].as_str().ok_or_else(|| cancel("m.invalid_message", "no key"))?;
        let their_public =
            Curve25519PublicKey::from_base64(their_key).map_err(|_| cancel("m.invalid_message", "bad key"))?;
        if v.established.is_some() || v.start_content.is_none() {
            return Err(cancel("m.unexpected_message", "key in the wrong state"));
        }
        if v.we_started {
            let commitment =
                v.their_commitment.as_deref().ok_or_else(|| cancel("m.unexpected_message", "key before accept"))?;
            let canonical = canonical_signable(v.start_content.as_ref().expect("checked above"))
                .map_err(|_| cancel("m.invalid_message", "start is not canonical JSON"))?;
            let expected = vodozemac::base64_encode(Sha256::digest(format!("{their_key}{canonical}").as_bytes()));
            if expected != commitment {
                return Err(cancel("m.mismatched_commitment", "the key does not match the commitment"));
            }
        }
        let sas = v.sas.take().ok_or_else(|| cancel("m.unexpected_message", "key twice"))?;
        v.established =
            Some(sas.diffie_hellman(their_public).map_err(|_| cancel("m.invalid_message", "unusable key"))?);
        v.state = VerificationState::ShowSas;
        if !v.we_started {
            // The accepting side reveals its key only now, after the starter's.
            let key = json!({ "transaction_id": txn, "key": v.our_key });
            let (user, device) = (v.other_user.clone(), v.other_device.clone().unwrap_or_else(|| "*".into()));
            self.queue_plain_to_device("m.key.verification.key", &user, device.as_str(), key);
        }
        Ok(())
    }

    /// After we confirmed and their MAC arrived: check it, mark the device verified, send done.
    fn check_their_mac(&mut self, txn: &str) {
        let Some(v) = self.verifications.by_txn.get(txn) else { return };
        if v.state != VerificationState::Confirmed || v.their_mac.is_none() || v.mac_verified {
            return;
        }
        let result = self.verify_mac(v, txn);
        match result {
            Ok(device_id) => {
                let v = self.verifications.by_txn.get_mut(txn).expect("present");
                v.mac_verified = true;
                v.done_sent = true;
                // Our side is finished once their MAC checks out; their `done` only tells
                // us they finished too.
                v.state = VerificationState::Done;
                let user = v.other_user.clone();
                if let Some(device) = self.devices.devices.get_mut(&user).and_then(|d| d.get_mut(device_id.as_str())) {
                    device.locally_verified = true;
                    self.devices.changed.insert(user.clone());
                }
                self.queue_plain_to_device(
                    "m.key.verification.done",
                    &user,
                    device_id.as_str(),
                    json!({ "transaction_id": txn }),
                );
            }
            Err(Error::Verification(VerificationError::Cancelled { code, reason })) => {
                let _ = self.cancel_verification(txn, code, &reason);
            }
            Err(_) => {}
        }
    }

    fn verify_mac(&self, v: &Verification, txn: &str) -> Result<OwnedDeviceId> {
        let mac = v.their_mac.as_ref().expect("checked by the caller");
        let established = v.established.as_ref().ok_or_else(|| cancel("m.unexpected_message", "MAC before keys"))?;
        let device_id = v.other_device.clone().ok_or_else(|| cancel("m.unexpected_message", "no device"))?;
        let device = self
            .devices
            .get(&v.other_user, device_id.as_str())
            .ok_or_else(|| cancel("m.key_mismatch", "we do not know the other device's keys (query them first)"))?;
        let base = format!(
            "MATRIX_KEY_VERIFICATION_MAC{}{}{}{}{txn}",
            v.other_user,
            device_id,
            self.user_id(),
            self.device_id()
        );
        let macs = mac["mac"].as_object().ok_or_else(|| cancel("m.invalid_message", "no mac map"))?;
        let mut key_ids: Vec<&str> = macs.keys().map(String::as_str).collect();
        key_ids.sort_unstable();
        let keys_tag = Mac::from_base64(mac["keys"].as_str().unwrap_or_default())
            .map_err(|_| cancel("m.invalid_message", "bad keys MAC"))?;
        established
            .verify_mac(&key_ids.join(","), &format!("{base}KEY_IDS"), &keys_tag)
            .map_err(|_| cancel("m.key_mismatch", "the key list MAC does not match"))?;
        let device_key_id = format!("ed25519:{device_id}");
        let mut device_checked = false;
        for (key_id, tag) in macs {
            let tag = Mac::from_base64(tag.as_str().unwrap_or_default())
                .map_err(|_| cancel("m.invalid_message", "bad MAC"))?;
            if *key_id == device_key_id {
                established
                    .verify_mac(&device.ed25519, &format!("{base}{key_id}"), &tag)
                    .map_err(|_| cancel("m.key_mismatch", "the device key MAC does not match"))?;
                device_checked = true;
            }
        }
        if !device_checked {
            return Err(cancel("m.key_mismatch", "the MAC does not cover the device key"));
        }
        Ok(device_id)
    }
}

fn cancel(code: &'static str, reason: &str) -> Error {
    Error::cancel(code, reason)
}

fn unexpected(reason: &str) -> Error {
    cancel("m.unexpected_message", reason)
}

fn unknown(txn: &str) -> Error {
    Error::cancel("m.unknown_transaction", format!("no verification {txn}"))
}

#[cfg(test)]
mod tests {
    use ruma::user_id;

    use super::*;
    use crate::{ToDeviceEvent, tests::FakeServer};

    fn pair(server: &mut FakeServer) -> (OlmMachine, OlmMachine) {
        let mut alice = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A1".into());
        let mut bob = OlmMachine::new(user_id!("@bob:localhost").to_owned(), "B1".into());
        server.flush(&mut alice);
        server.flush(&mut bob);
        alice.update_tracked_users([bob.user_id().to_owned()]);
        bob.update_tracked_users([alice.user_id().to_owned()]);
        server.flush(&mut alice);
        server.flush(&mut bob);
        (alice, bob)
    }

    #[test]
    fn emoji_table_is_complete_and_distinct() {
        let mut symbols: Vec<&str> = SAS_EMOJI.iter().map(|(s, _)| *s).collect();
        symbols.sort_unstable();
        symbols.dedup();
        assert_eq!(symbols.len(), 64);
        assert_eq!(SAS_EMOJI[0], ("🐶", "Dog"));
        assert_eq!(SAS_EMOJI[63], ("📌", "Pin"));
    }

    #[test]
    fn sas_flow_verifies_both_devices() {
        let mut server = FakeServer::default();
        let (mut alice, mut bob) = pair(&mut server);
        let txn = alice.request_verification(user_id!("@bob:localhost"), "B1");
        server.flush(&mut alice);
        let received = server.sync(&mut bob);
        assert!(matches!(&received[..], [ToDeviceEvent::PlainText(e)] if e["type"] == "m.key.verification.request"));
        assert_eq!(bob.incoming_verification_requests().len(), 1);
        bob.accept_verification(&txn).unwrap();
        server.flush(&mut bob);
        // ready -> start -> accept -> key -> key
        for _ in 0..3 {
            server.sync(&mut alice);
            server.sync(&mut bob);
        }
        assert_eq!(alice.verification_state(&txn), Some(VerificationState::ShowSas));
        assert_eq!(bob.verification_state(&txn), Some(VerificationState::ShowSas));
        assert_eq!(alice.sas_emoji(&txn), bob.sas_emoji(&txn));
        assert_eq!(alice.sas_decimals(&txn), bob.sas_decimals(&txn));
        let (a, b, c) = alice.sas_decimals(&txn).unwrap();
        assert!([a, b, c].iter().all(|n| (1000..=9191).contains(n)));

        alice.confirm_verification(&txn).unwrap();
        bob.confirm_verification(&txn).unwrap();
        server.flush(&mut alice);
        server.flush(&mut bob);
        server.sync(&mut alice);
        server.sync(&mut bob);
        server.sync(&mut alice);
        assert_eq!(alice.verification_state(&txn), Some(VerificationState::Done));
        assert_eq!(bob.verification_state(&txn), Some(VerificationState::Done));
        assert!(alice.get_device(user_id!("@bob:localhost"), "B1").unwrap().locally_verified);
        assert!(bob.get_device(user_id!("@alice:localhost"), "A1").unwrap().locally_verified);
    }

    #[test]
    fn a_swapped_key_breaks_the_commitment() {
        let mut server = FakeServer::default();
        let (mut alice, mut bob) = pair(&mut server);
        let txn = alice.request_verification(user_id!("@bob:localhost"), "B1");
        server.flush(&mut alice);
        server.sync(&mut bob);
        bob.accept_verification(&txn).unwrap();
        server.flush(&mut bob);
        server.sync(&mut alice); // ready -> start
        server.sync(&mut bob); // start -> accept
        server.sync(&mut alice); // accept -> key
        server.sync(&mut bob); // key -> key
        // A man in the middle replaces Bob's key on its way to Alice.
        let forged = json!({
            "type": "m.key.verification.key",
            "sender": "@bob:localhost",
            "content": { "transaction_id": txn, "key": Sas::new().public_key().to_base64() },
        });
        alice
            .receive_sync_changes(crate::SyncChanges {
                to_device_events: vec![crate::types::raw(&forged)],
                ..Default::default()
            })
            .unwrap();
        assert!(matches!(
            alice.verification_state(&txn),
            Some(VerificationState::Cancelled { code, .. }) if code == "m.mismatched_commitment"
        ));
    }
}
