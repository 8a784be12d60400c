//! One error type for the crate: every failure a caller can act on has its own variant.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Input that is not the JSON shape the spec gives it.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// A signature is missing or does not verify.
    #[error("signature check failed: {0}")]
    Signature(String),
    /// A device's identity keys differ from the ones we already knew for it.
    #[error("the identity keys of {user_id}/{device_id} changed; refusing the new keys")]
    IdentityKeysChanged { user_id: String, device_id: String },
    /// An Olm message could not be decrypted by any session and did not start a new one.
    #[error("Olm decryption failed: {0}")]
    Olm(String),
    /// A decrypted Olm payload failed the spec's sender/recipient/keys checks.
    #[error("Olm payload check failed: {0}")]
    OlmPayload(String),
    /// No Olm session with this device: claim a one-time key first.
    #[error("no Olm session with {user_id}/{device_id}")]
    MissingOlmSession { user_id: String, device_id: String },
    /// A Megolm message for a session we do not have (yet).
    #[error("unknown Megolm session {session_id} in {room_id}")]
    UnknownMegolmSession { room_id: String, session_id: String },
    /// The sender told us it will not share this session's key with us (`m.room_key.withheld`).
    #[error("the room key was withheld: {code}: {reason}")]
    Withheld { code: String, reason: String },
    /// Megolm decryption failed (bad MAC, index before the first known one, ...).
    #[error("Megolm decryption failed: {0}")]
    Megolm(String),
    /// A message index was already used by a different event: a replay.
    #[error("replayed Megolm message index {index} in session {session_id}")]
    Replay { session_id: String, index: u32 },
    /// The decrypted payload claims a different room than the event was sent in.
    #[error("the decrypted event belongs to room {claimed}, not {actual}")]
    RoomMismatch { claimed: String, actual: String },
    /// The Megolm session belongs to a device of another user than the event's sender.
    #[error("the Megolm session was created by a device of {owner}, but {sender} sent the event")]
    SenderMismatch { owner: String, sender: String },
    /// No outbound Megolm session for the room: call `share_room_key` first.
    #[error("no outbound Megolm session for {0}: share the room key first")]
    MissingOutboundSession(String),
    /// The encrypted attachment's hash does not match, or its metadata is unusable.
    #[error("attachment: {0}")]
    Attachment(String),
    /// The local store failed.
    #[error("store: {0}")]
    Store(String),
    /// The store was sealed with another key: a wrong passphrase, or not the key it was created
    /// with. Nothing in the store was changed.
    #[error("the store does not open with this key (wrong passphrase?)")]
    WrongStoreKey,
    /// A passphrase was given for a store sealed with a key kept elsewhere (the OS keyring).
    /// Nothing in the store was changed.
    #[error("the store is sealed with a key from the keyring, not with a passphrase")]
    NotAPassphraseStore,
    /// A stored record could not be decrypted (wrong key) or decoded.
    #[error("store record could not be decrypted or decoded: {0}")]
    StoreCorrupt(String),
    /// SAS verification protocol error (the flow was cancelled with this code).
    #[error("verification cancelled: {code}: {reason}")]
    Verification { code: &'static str, reason: String },
    /// Key backup errors (wrong recovery key, bad backup data).
    #[error("key backup: {0}")]
    Backup(String),
    /// A response for a request id we never sent (or already marked as sent).
    #[error("unknown request id {0}")]
    UnknownRequest(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Error::Malformed { what, reason: reason.to_string() }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::malformed("JSON", e)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(e.to_string())
    }
}
