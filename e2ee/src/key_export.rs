//! Room key export files (the spec's "Key exports"): every Megolm session we hold, encrypted
//! with a passphrase, in the format Element and other clients read and write.
//!
//! PBKDF2-HMAC-SHA-512 over the passphrase gives an AES-256-CTR key and an HMAC-SHA-256 key;
//! the file is `0x01 || salt || IV || rounds || ciphertext || MAC`, base64 between the
//! `MEGOLM SESSION DATA` armour lines.

use aes::Aes256;
use base64::Engine;
use ctr::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, Mac};
use rand::RngCore;
use ruma::{OwnedRoomId, RoomId};
use serde_json::{Value, json};
use sha2::{Sha256, Sha512};
use zeroize::Zeroizing;

use crate::{
    error::{Error, KeyExportError, Result},
    machine::OlmMachine,
    megolm::InboundSession,
    types::MEGOLM_V1,
};

const HEADER: &str = "-----BEGIN MEGOLM SESSION DATA-----";
const FOOTER: &str = "-----END MEGOLM SESSION DATA-----";
/// Element's default; the spec leaves the count to the exporter.
pub const DEFAULT_ROUNDS: u32 = 500_000;
const VERSION: u8 = 1;
/// version + salt + IV + rounds, and the MAC.
const HEADER_LEN: usize = 1 + 16 + 16 + 4;
const MAC_LEN: usize = 32;

type Aes256Ctr = ctr::Ctr128BE<Aes256>;

fn derive(passphrase: &str, salt: &[u8], rounds: u32) -> Zeroizing<[u8; 64]> {
    let mut keys = Zeroizing::new([0u8; 64]);
    pbkdf2::pbkdf2::<Hmac<Sha512>>(passphrase.as_bytes(), salt, rounds, keys.as_mut())
        .expect("HMAC takes any key length");
    keys
}

/// Encrypts `plaintext` into the armoured export format.
pub fn encrypt_export(plaintext: &[u8], passphrase: &str, rounds: u32) -> String {
    let mut rng = rand::rng();
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    rng.fill_bytes(&mut salt);
    rng.fill_bytes(&mut iv);
    // The spec clears bit 63 so that other implementations' 64-bit counters never wrap.
    iv[8] &= 0x7f;
    let keys = derive(passphrase, &salt, rounds);
    let (aes_key, mac_key) = keys.split_at(32);
    let mut data = Vec::with_capacity(HEADER_LEN + plaintext.len() + MAC_LEN);
    data.push(VERSION);
    data.extend_from_slice(&salt);
    data.extend_from_slice(&iv);
    data.extend_from_slice(&rounds.to_be_bytes());
    let start = data.len();
    data.extend_from_slice(plaintext);
    let aes_key: [u8; 32] = aes_key.try_into().expect("32 bytes");
    Aes256Ctr::new(&aes_key.into(), &iv.into()).apply_keystream(&mut data[start..]);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(mac_key).expect("HMAC takes any key length");
    mac.update(&data);
    data.extend_from_slice(&mac.finalize().into_bytes());
    let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 76 + 80);
    out.push_str(HEADER);
    out.push('\n');
    for line in encoded.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(FOOTER);
    out.push('\n');
    out
}

/// Checks and decrypts an armoured export.
pub fn decrypt_export(export: &str, passphrase: &str) -> Result<Zeroizing<Vec<u8>>> {
    let bad = |why: &'static str| Error::from(KeyExportError::Format(why));
    let body = export
        .trim()
        .strip_prefix(HEADER)
        .and_then(|b| b.strip_suffix(FOOTER))
        .ok_or_else(|| bad("no MEGOLM SESSION DATA armour"))?;
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let data = lenient.decode(compact).map_err(KeyExportError::NotBase64)?;
    if data.len() < HEADER_LEN + MAC_LEN {
        return Err(bad("too short"));
    }
    if data[0] != VERSION {
        return Err(bad("unsupported version"));
    }
    let (signed, tag) = data.split_at(data.len() - MAC_LEN);
    let salt = &signed[1..17];
    let iv: [u8; 16] = signed[17..33].try_into().expect("16 bytes");
    let rounds = u32::from_be_bytes(signed[33..37].try_into().expect("4 bytes"));
    if rounds == 0 {
        return Err(bad("zero rounds"));
    }
    let keys = derive(passphrase, salt, rounds);
    let (aes_key, mac_key) = keys.split_at(32);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(mac_key).expect("HMAC takes any key length");
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| KeyExportError::WrongPassphrase)?;
    let mut plaintext = Zeroizing::new(signed[HEADER_LEN..].to_vec());
    let aes_key: [u8; 32] = aes_key.try_into().expect("32 bytes");
    Aes256Ctr::new(&aes_key.into(), &iv.into()).apply_keystream(&mut plaintext);
    Ok(plaintext)
}

impl OlmMachine {
    /// Every Megolm session we hold (or those of `rooms`), as a passphrase-encrypted export.
    pub fn export_room_keys(&self, passphrase: &str, rounds: u32, rooms: Option<&[OwnedRoomId]>) -> Result<String> {
        let sessions: Vec<Value> = self
            .groups
            .inbound
            .iter()
            .filter(|((room, _), _)| rooms.is_none_or(|r| r.contains(room)))
            .map(|((room, session_id), s)| {
                json!({
                    "algorithm": MEGOLM_V1,
                    "forwarding_curve25519_key_chain": [],
                    "room_id": room,
                    "sender_key": s.sender_key,
                    "sender_claimed_keys": { "ed25519": s.signing_key },
                    "session_id": session_id,
                    "session_key": s.inner.export_at_first_known_index().to_base64(),
                })
            })
            .collect();
        let plaintext = Zeroizing::new(serde_json::to_vec(&sessions)?);
        Ok(encrypt_export(&plaintext, passphrase, rounds))
    }

    /// Imports a key export: returns (sessions new to us, sessions in the file). Entries that
    /// do not parse are skipped.
    pub fn import_room_keys(&mut self, export: &str, passphrase: &str) -> Result<(usize, usize)> {
        let plaintext = decrypt_export(export, passphrase)?;
        let sessions: Vec<Value> = serde_json::from_slice(&plaintext)?;
        let mut imported = 0;
        for entry in &sessions {
            match import_one(entry) {
                Ok(session) => {
                    if self.groups.add_inbound(session) {
                        imported += 1;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "skipping an exported session"),
            }
        }
        Ok((imported, sessions.len()))
    }
}

fn import_one(entry: &Value) -> Result<InboundSession> {
    if entry["algorithm"] != MEGOLM_V1 {
        return Err(KeyExportError::Session("unsupported algorithm").into());
    }
    let room_id = entry["room_id"]
        .as_str()
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or(KeyExportError::Session("no valid room_id"))?;
    let session = InboundSession::import(
        room_id,
        entry["session_key"].as_str().ok_or(KeyExportError::Session("no session_key"))?,
        entry["sender_key"].as_str().unwrap_or_default(),
        entry["sender_claimed_keys"]["ed25519"].as_str().unwrap_or_default(),
    )?;
    if entry["session_id"].as_str() != Some(session.inner.session_id().as_str()) {
        return Err(KeyExportError::Session("session_id does not match the key").into());
    }
    Ok(session)
}

#[cfg(test)]
mod tests {
    use ruma::{room_id, user_id};

    use super::*;
    use crate::EncryptionSettings;

    /// PBKDF2-HMAC-SHA-512("password", "salt", 1 round, 64 bytes): the commonly published vector.
    #[test]
    fn pbkdf2_sha512_known_answer() {
        let keys = derive("password", b"salt", 1);
        let hex: String = keys.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
        );
    }

    #[test]
    fn export_and_import_between_devices() {
        let room = room_id!("!room:localhost");
        let mut alice = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A1".into());
        alice.share_room_key(room, &[alice.user_id().to_owned()], EncryptionSettings::default()).unwrap();
        let content = alice.encrypt_room_event(room, "m.room.message", json!({"body": "exported"})).unwrap();
        let export = alice.export_room_keys("hunter2", 1000, None).unwrap();
        assert!(export.starts_with(HEADER) && export.trim_end().ends_with(FOOTER));
        assert!(export.lines().all(|l| l.len() <= 76 || l.starts_with("-----")));

        let mut other = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A2".into());
        assert!(other.import_room_keys(&export, "wrong").is_err());
        let mut altered: Vec<char> = export.chars().collect();
        let i = HEADER.len() + 60;
        altered[i] = if altered[i] == 'A' { 'B' } else { 'A' };
        assert!(other.import_room_keys(&altered.into_iter().collect::<String>(), "hunter2").is_err());
        assert_eq!(other.import_room_keys(&export, "hunter2").unwrap(), (1, 1));
        assert_eq!(other.import_room_keys(&export, "hunter2").unwrap(), (0, 1), "known already");
        let event = json!({"type": "m.room.encrypted", "sender": "@alice:localhost", "event_id": "$1", "origin_server_ts": 1, "content": content});
        assert_eq!(other.decrypt_room_event(room, &event).unwrap().event["content"]["body"], "exported");
        assert!(other.import_room_keys("garbage", "x").is_err());
    }
}
