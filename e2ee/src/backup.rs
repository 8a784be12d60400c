//! Server-side key backup, `m.megolm_backup.v1.curve25519-aes-sha2`: room keys encrypted to a
//! backup curve25519 key (libolm's PkEncryption, from vodozemac) so a new device that knows
//! the recovery key can restore them.

use ruma::{OwnedRoomId, RoomId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vodozemac::{
    Curve25519PublicKey, Curve25519SecretKey,
    pk_encryption::{Message, PkDecryption, PkEncryption},
};
use zeroize::Zeroizing;

use crate::{
    error::{BackupError, Result},
    machine::OlmMachine,
    megolm::InboundSession,
    types::{BACKUP_V1, MEGOLM_V1, OutgoingRequest},
};

/// The spec's recovery key prefix bytes.
const RECOVERY_PREFIX: [u8; 2] = [0x8b, 0x01];
/// Sessions per backup upload request.
const BACKUP_BATCH: usize = 500;
/// PBKDF2 rounds for a backup key derived from a passphrase (what Element uses today).
const PASSPHRASE_ROUNDS: u32 = 500_000;

/// The backup's private key, and the server's backup version it is used with.
#[derive(Clone, Serialize, Deserialize)]
pub struct BackupKey {
    secret: [u8; 32],
    pub version: Option<String>,
}

impl Drop for BackupKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupKey").field("version", &self.version).finish_non_exhaustive()
    }
}

impl BackupKey {
    pub fn new() -> Self {
        Self { secret: *Curve25519SecretKey::new().to_bytes(), version: None }
    }

    /// The recovery key a user writes down: base58 of prefix + key + parity, in groups of four.
    pub fn to_recovery_key(&self) -> String {
        let mut bytes = Zeroizing::new(Vec::with_capacity(35));
        bytes.extend_from_slice(&RECOVERY_PREFIX);
        bytes.extend_from_slice(&self.secret);
        let parity = bytes.iter().fold(0u8, |acc, b| acc ^ b);
        bytes.push(parity);
        let encoded = Zeroizing::new(bs58::encode(bytes.as_slice()).into_string());
        let chars: Vec<char> = encoded.chars().collect();
        chars.chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join(" ")
    }

    /// The key a passphrase gives with the backup's `auth_data` parameters (the spec's
    /// `m.pbkdf2`: PBKDF2-HMAC-SHA-512 over the passphrase with `private_key_salt`, for
    /// `private_key_iterations` rounds, 256 bits).
    pub fn from_passphrase(passphrase: &str, salt: &str, iterations: u32) -> Result<Self> {
        if iterations == 0 || passphrase.is_empty() {
            return Err(BackupError::EmptyPassphrase.into());
        }
        let mut key = Self { secret: [0u8; 32], version: None };
        pbkdf2::pbkdf2::<hmac::Hmac<sha2::Sha512>>(passphrase.as_bytes(), salt.as_bytes(), iterations, &mut key.secret)
            .map_err(BackupError::Pbkdf2)?;
        Ok(key)
    }

    /// A key for a backup from a recovery key or, failing that, a passphrase: `auth_data` is
    /// the backup's (it says whether a passphrase can derive its key).
    pub fn from_recovery_key_or_passphrase(secret: &str, auth_data: &Value) -> Result<Self> {
        match Self::from_recovery_key(secret) {
            Ok(key) => Ok(key),
            Err(recovery_error) => match (
                auth_data["private_key_salt"].as_str(),
                auth_data["private_key_iterations"].as_u64().and_then(|n| u32::try_from(n).ok()),
            ) {
                (Some(salt), Some(iterations)) => Self::from_passphrase(secret, salt, iterations),
                _ => Err(recovery_error),
            },
        }
    }

    pub fn from_recovery_key(recovery_key: &str) -> Result<Self> {
        let compact: Zeroizing<String> = Zeroizing::new(recovery_key.chars().filter(|c| !c.is_whitespace()).collect());
        let bytes =
            Zeroizing::new(bs58::decode(compact.as_str()).into_vec().map_err(BackupError::RecoveryKeyNotBase58)?);
        if bytes.len() != 35 || bytes[..2] != RECOVERY_PREFIX {
            return Err(BackupError::NotARecoveryKey.into());
        }
        if bytes.iter().fold(0u8, |acc, b| acc ^ b) != 0 {
            return Err(BackupError::RecoveryKeyParity.into());
        }
        let mut key = Self { secret: [0u8; 32], version: None };
        key.secret.copy_from_slice(&bytes[2..34]);
        Ok(key)
    }

    fn decryption(&self) -> PkDecryption {
        PkDecryption::from_key(Curve25519SecretKey::from_slice(&self.secret))
    }

    pub fn public_key(&self) -> Curve25519PublicKey {
        self.decryption().public_key()
    }
}

/// A backup key derived from a passphrase with a fresh salt. Deriving is deliberately slow
/// (PBKDF2, [`PassphraseKey::ROUNDS`]): do it off the async threads.
pub struct PassphraseKey {
    key: BackupKey,
    salt: String,
    rounds: u32,
}

impl PassphraseKey {
    /// PBKDF2 rounds for a new passphrase key (what Element uses today).
    pub const ROUNDS: u32 = PASSPHRASE_ROUNDS;

    pub fn new(passphrase: &str, rounds: u32) -> Result<Self> {
        use rand::distr::{Alphanumeric, SampleString};
        let salt = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let key = BackupKey::from_passphrase(passphrase, &salt, rounds)?;
        Ok(Self { key, salt, rounds })
    }
}

impl Default for BackupKey {
    fn default() -> Self {
        Self::new()
    }
}

impl OlmMachine {
    /// A new backup key and the body for `POST /_matrix/client/v3/room_keys/version`
    /// (`auth_data` signed by our device). Show `key.to_recovery_key()` to the user, then
    /// call [`OlmMachine::enable_backup`] with the version the server answers.
    pub fn create_backup(&self) -> Result<(BackupKey, Value)> {
        let key = BackupKey::new();
        let mut auth_data = json!({ "public_key": key.public_key().to_base64() });
        self.account.sign_json(&mut auth_data)?;
        Ok((key, json!({ "algorithm": BACKUP_V1, "auth_data": auth_data })))
    }

    /// Like [`OlmMachine::create_backup`], with a key from [`PassphraseKey::new`]: its salt
    /// and rounds go into `auth_data` so another device can derive the key again.
    pub fn create_backup_with_passphrase(&self, derived: PassphraseKey) -> Result<(BackupKey, Value)> {
        let mut auth_data = json!({
            "public_key": derived.key.public_key().to_base64(),
            "private_key_salt": derived.salt,
            "private_key_iterations": derived.rounds,
        });
        self.account.sign_json(&mut auth_data)?;
        Ok((derived.key, json!({ "algorithm": BACKUP_V1, "auth_data": auth_data })))
    }

    /// The server backup version we back up to, if backup is on.
    pub fn backup_version(&self) -> Option<&str> {
        self.backup.as_ref().and_then(|b| b.version.as_deref())
    }

    /// Stops backing up (the server's backup was replaced or deleted).
    pub fn disable_backup(&mut self) {
        if self.backup.take().is_some() {
            self.account_changed = true;
        }
    }

    /// Starts backing up to `version` with `key`. Every session is uploaded (again).
    pub fn enable_backup(&mut self, mut key: BackupKey, version: String) {
        key.version = Some(version);
        self.backup = Some(key);
        self.account_changed = true;
        for (id, session) in self.groups.inbound.iter_mut() {
            session.backed_up = false;
            self.groups.changed_inbound.insert(id.clone());
        }
    }

    /// A `PUT /room_keys/keys` with room keys not yet in the backup, or `None` when all are.
    pub fn backup_room_keys(&mut self) -> Result<Option<OutgoingRequest>> {
        let Some(backup) = &self.backup else { return Ok(None) };
        let Some(version) = backup.version.clone() else { return Ok(None) };
        let encryption = PkEncryption::from_key(backup.public_key());
        let mut rooms = json!({});
        let mut sent = Vec::new();
        for (id, session) in self.groups.inbound.iter().filter(|(_, s)| !s.backed_up).take(BACKUP_BATCH) {
            let session_key = Zeroizing::new(session.inner.export_at_first_known_index().to_base64());
            let plaintext = Zeroizing::new(serde_json::to_vec(&json!({
                "algorithm": MEGOLM_V1,
                "sender_key": session.sender_key,
                "session_key": session_key.as_str(),
                "sender_claimed_keys": { "ed25519": session.signing_key },
                "forwarding_curve25519_key_chain": [],
            }))?);
            let message = encryption.encrypt(&plaintext).map_err(BackupError::Encryption)?;
            rooms[id.0.as_str()]["sessions"][id.1.as_str()] = json!({
                "first_message_index": session.inner.first_known_index(),
                "forwarded_count": 0,
                "is_verified": false,
                "session_data": {
                    "ephemeral": message.ephemeral_key.to_base64(),
                    "ciphertext": vodozemac::base64_encode(&message.ciphertext),
                    "mac": vodozemac::base64_encode(&message.mac),
                },
            });
            sent.push(id.clone());
        }
        if sent.is_empty() {
            return Ok(None);
        }
        self.hand_out_backup(version, rooms, sent).map(Some)
    }

    /// Restores room keys from a backup: `backup_info` is `GET /room_keys/version`'s answer
    /// (checked to be for this key), `keys` is `GET /room_keys/keys?version=...`'s. Returns
    /// how many sessions were new to us. Undecryptable entries are skipped and counted out.
    pub fn restore_backup(&mut self, key: &BackupKey, backup_info: &Value, keys: &Value) -> Result<usize> {
        if backup_info["algorithm"] != BACKUP_V1 {
            return Err(BackupError::UnsupportedAlgorithm.into());
        }
        if backup_info["auth_data"]["public_key"].as_str() != Some(key.public_key().to_base64().as_str()) {
            return Err(BackupError::WrongKey.into());
        }
        let decryption = key.decryption();
        let mut imported = 0;
        let Some(rooms) = keys["rooms"].as_object() else { return Ok(0) };
        for (room_id, room) in rooms {
            let Ok(room_id) = RoomId::parse(room_id.as_str()) else { continue };
            let Some(sessions) = room["sessions"].as_object() else { continue };
            for (session_id, data) in sessions {
                match restore_one(&decryption, room_id.clone(), session_id, data) {
                    Ok(mut session) => {
                        session.backed_up = true;
                        if self.groups.add_inbound(session) {
                            imported += 1;
                        }
                    }
                    Err(e) => tracing::warn!(%room_id, %session_id, error = %e, "skipping a backed-up key"),
                }
            }
        }
        Ok(imported)
    }
}

fn restore_one(
    decryption: &PkDecryption,
    room_id: OwnedRoomId,
    session_id: &str,
    data: &Value,
) -> Result<InboundSession> {
    let field = |name: &'static str| data["session_data"][name].as_str().ok_or(BackupError::MissingSessionData(name));
    let message =
        Message::from_base64(field("ciphertext")?, field("mac")?, field("ephemeral")?).map_err(BackupError::Message)?;
    let plaintext = Zeroizing::new(decryption.decrypt(&message).map_err(BackupError::Decryption)?);
    let payload: Value = serde_json::from_slice(&plaintext)?;
    if payload["algorithm"] != MEGOLM_V1 {
        return Err(BackupError::NotMegolm.into());
    }
    let session = InboundSession::import(
        room_id,
        payload["session_key"].as_str().ok_or(BackupError::NoSessionKey)?,
        payload["sender_key"].as_str().unwrap_or_default(),
        payload["sender_claimed_keys"]["ed25519"].as_str().unwrap_or_default(),
    )?;
    if session.inner.session_id() != session_id {
        return Err(BackupError::SessionIdMismatch.into());
    }
    Ok(session)
}

#[cfg(test)]
mod tests {
    use ruma::{room_id, user_id};

    use super::*;
    use crate::EncryptionSettings;

    #[test]
    fn recovery_key_round_trip_and_typos() {
        let key = BackupKey::new();
        let text = key.to_recovery_key();
        assert!(text.starts_with("Es"), "the 0x8b01 prefix makes recovery keys start with Es: {text}");
        assert_eq!(BackupKey::from_recovery_key(&text).unwrap().public_key(), key.public_key());
        let mut typo: Vec<char> = text.chars().collect();
        let i = typo.iter().rposition(|c| *c != ' ').unwrap() - 3;
        typo[i] = if typo[i] == 'a' { 'b' } else { 'a' };
        assert!(BackupKey::from_recovery_key(&typo.into_iter().collect::<String>()).is_err());
    }

    #[test]
    fn passphrase_keys_derive_again_from_auth_data() {
        let alice = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A1".into());
        // Few rounds: the test runs unoptimised.
        let (key, body) =
            alice.create_backup_with_passphrase(PassphraseKey::new("correct horse", 1000).unwrap()).unwrap();
        assert_eq!(body["auth_data"]["private_key_iterations"], 1000);
        let auth_data = &body["auth_data"];
        let again = BackupKey::from_recovery_key_or_passphrase("correct horse", auth_data).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let wrong = BackupKey::from_recovery_key_or_passphrase("wrong horse", auth_data).unwrap();
        assert_ne!(wrong.public_key(), key.public_key());
        let by_recovery_key = BackupKey::from_recovery_key_or_passphrase(&key.to_recovery_key(), auth_data).unwrap();
        assert_eq!(by_recovery_key.public_key(), key.public_key());
        // A backup made without a passphrase takes only its recovery key.
        assert!(BackupKey::from_recovery_key_or_passphrase("correct horse", &json!({})).is_err());
    }

    #[test]
    fn pbkdf2_sha512_backup_key_known_answer() {
        // RFC-style vector for PBKDF2-HMAC-SHA-512 ("password", "salt", 1 round), first 32 bytes.
        let key = BackupKey::from_passphrase("password", "salt", 1).unwrap();
        assert_eq!(key.secret[..8], [0x86, 0x7f, 0x70, 0xcf, 0x1a, 0xde, 0x02, 0xcf]);
    }

    #[test]
    fn backup_and_restore_on_a_new_device() {
        let room = room_id!("!room:localhost");
        let mut alice = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A1".into());
        alice.share_room_key(room, &[alice.user_id().to_owned()], EncryptionSettings::default()).unwrap();
        let content = alice.encrypt_room_event(room, "m.room.message", json!({"body": "backed up"})).unwrap();

        let (key, body) = alice.create_backup().unwrap();
        crate::signing::verify_json(&body["auth_data"], "@alice:localhost", "ed25519:A1", &alice.account.ed25519_key())
            .unwrap();
        alice.enable_backup(key.clone(), "1".into());
        let request = alice.backup_room_keys().unwrap().expect("one session to back up");
        assert_eq!(request.path(), "/_matrix/client/v3/room_keys/keys?version=1");
        let rooms = request.body()["rooms"].clone();
        alice.mark_request_as_sent(&request.request_id, &json!({"count": 1, "etag": "1"})).unwrap();
        assert!(alice.backup_room_keys().unwrap().is_none());

        let mut alice2 = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A2".into());
        let restored_key = BackupKey::from_recovery_key(&key.to_recovery_key()).unwrap();
        let info = json!({"algorithm": BACKUP_V1, "auth_data": body["auth_data"], "version": "1"});
        assert!(alice2.restore_backup(&BackupKey::new(), &info, &json!({"rooms": rooms})).is_err());
        assert_eq!(alice2.restore_backup(&restored_key, &info, &json!({"rooms": rooms})).unwrap(), 1);
        let event = json!({"type": "m.room.encrypted", "sender": "@alice:localhost", "event_id": "$1", "origin_server_ts": 1, "content": content});
        assert_eq!(alice2.decrypt_room_event(room, &event).unwrap().event["content"]["body"], "backed up");
    }
}
