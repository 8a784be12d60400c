//! The crate's errors, one enum per family, so a caller matches on what went wrong
//! (`Err(Error::Megolm(MegolmError::Withheld { .. }))`) instead of reading messages.
//!
//! [`Error`] is the family; each family enum names its failures. Failures caused by another
//! library's error keep it as their `source()`. The `Display` of every variant is the message
//! the crate gave before the families existed (logs and the desktop's error texts read it).

use std::borrow::Cow;

use thiserror::Error;

/// A boxed error from outside the crate (an OS keyring, a file system), kept as a source.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Error)]
pub enum Error {
    /// Input that is not the shape the spec gives it.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// Signatures and cross-signing.
    #[error(transparent)]
    Signing(#[from] SigningError),
    /// A device's published keys.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Olm: to-device encryption with one device.
    #[error(transparent)]
    Olm(#[from] OlmError),
    /// Megolm: room messages.
    #[error(transparent)]
    Megolm(#[from] MegolmError),
    /// The local encrypted store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SAS verification.
    #[error(transparent)]
    Verification(#[from] VerificationError),
    /// Server-side key backup.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// Key export files.
    #[error(transparent)]
    KeyExport(#[from] KeyExportError),
    /// Encrypted attachments.
    #[error(transparent)]
    Attachment(#[from] AttachmentError),
    /// The request/response bookkeeping of the machine.
    #[error(transparent)]
    Request(#[from] RequestError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Input that is not the JSON shape the spec gives it: `what` names the input.
#[derive(Debug, Error)]
pub enum Malformed {
    /// A field is missing or has the wrong shape.
    #[error("malformed {what}: {reason}")]
    Shape { what: &'static str, reason: Cow<'static, str> },
    /// A part could not be parsed; the parser's error is the source.
    #[error("malformed {what}: {source}")]
    Invalid {
        what: &'static str,
        #[source]
        source: BoxedError,
    },
}

/// Signatures (`signatures` of signed JSON) and cross-signing.
#[derive(Debug, Error)]
pub enum SigningError {
    #[error("signature check failed: no signature by {entity} with {key_id}")]
    Missing { entity: String, key_id: String },
    #[error("signature check failed: {entity}/{key_id}: undecodable signature: {source}")]
    Undecodable {
        entity: String,
        key_id: String,
        #[source]
        source: vodozemac::SignatureError,
    },
    #[error("signature check failed: {entity}/{key_id}: {source}")]
    Invalid {
        entity: String,
        key_id: String,
        #[source]
        source: vodozemac::SignatureError,
    },
    /// Signing needs this device's private cross-signing keys, and it has none.
    #[error("signature check failed: no cross-signing keys")]
    NoCrossSigningKeys,
    #[error("signature check failed: unknown device {device_id}")]
    UnknownDevice { device_id: String },
    #[error("signature check failed: {user_id} {device_id} is not verified")]
    NotVerified { user_id: String, device_id: String },
    #[error("signature check failed: {user_id}'s verified device is not signed by their self-signing key")]
    NotSignedBySelfSigningKey {
        user_id: String,
        #[source]
        source: Box<Error>,
    },
    #[error("signature check failed: {user_id} has no master key")]
    NoMasterKey { user_id: String },
}

/// A device's published keys.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A device's identity keys differ from the ones we already knew for it.
    #[error("the identity keys of {user_id}/{device_id} changed; refusing the new keys")]
    IdentityKeysChanged { user_id: String, device_id: String },
}

/// Olm sessions and to-device messages.
#[derive(Debug, Error)]
pub enum OlmError {
    /// No Olm session with this device: claim a one-time key first.
    #[error("no Olm session with {user_id}/{device_id}")]
    MissingSession { user_id: String, device_id: String },
    /// A session could not be started from a claimed one-time key.
    #[error("Olm decryption failed: {0}")]
    SessionCreation(#[source] vodozemac::olm::SessionCreationError),
    /// Encrypting with a session failed.
    #[error("Olm decryption failed: {0}")]
    Encryption(#[source] vodozemac::olm::EncryptionError),
    #[error("Olm decryption failed: the message has no ciphertext for this device")]
    NoCiphertextForUs,
    /// The message's session exists but does not decrypt it (again): a duplicate.
    #[error("Olm decryption failed: a pre-key message its session cannot decrypt again (duplicate?)")]
    DuplicatePreKeyMessage,
    /// No session decrypts the pre-key message and it does not start a new one.
    #[error("Olm decryption failed: no session and the pre-key message did not start one: {0}")]
    PreKeyRejected(#[source] vodozemac::olm::SessionCreationError),
    /// No session decrypts a normal message (a wedged session).
    #[error("Olm decryption failed: no session with the sender decrypts this message")]
    NoSessionDecrypts,
    /// A decrypted payload failed the spec's sender/recipient/keys checks.
    #[error("Olm payload check failed: {0}")]
    Payload(PayloadCheck),
}

/// Which check of a decrypted Olm payload (or of a forwarded room key in it) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PayloadCheck {
    #[error("`sender` is not the user who sent the event")]
    Sender,
    #[error("`recipient` is not us")]
    Recipient,
    #[error("`recipient_keys.ed25519` is not our key")]
    RecipientKey,
    #[error("no `type` or `content`")]
    NoTypeOrContent,
    #[error("no `keys.ed25519`")]
    NoSenderKey,
    #[error("`keys.ed25519` is not the sending device's key")]
    SenderKey,
    #[error("a forwarded room key from a device that is not ours")]
    ForwardedByStranger,
    #[error("a forwarded room key from a device we have not verified")]
    ForwardedByUnverifiedDevice,
    #[error("a forwarded room key we did not ask for")]
    ForwardedUnrequested,
}

/// Megolm sessions and room messages.
#[derive(Debug, Error)]
pub enum MegolmError {
    /// A Megolm message for a session we do not have (yet).
    #[error("unknown Megolm session {session_id} in {room_id}")]
    UnknownSession { room_id: String, session_id: String },
    /// The sender told us it will not share this session's key with us (`m.room_key.withheld`).
    #[error("the room key was withheld: {code}: {reason}")]
    Withheld { code: String, reason: String },
    /// Megolm decryption failed (bad MAC, index before the first known one, ...).
    #[error("Megolm decryption failed: {0}")]
    Decryption(#[source] vodozemac::megolm::DecryptionError),
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
}

/// The local encrypted store.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Deriving the store key from a passphrase failed (Argon2).
    #[error("store: {0}")]
    KeyDerivation(argon2::Error),
    #[error("store: sealing failed: {0}")]
    Seal(chacha20poly1305::Error),
    /// The store was sealed with another key: a wrong passphrase, or not the key it was created
    /// with. Nothing in the store was changed.
    #[error("the store does not open with this key (wrong passphrase?)")]
    WrongKey,
    /// A passphrase was given for a store sealed with a key kept elsewhere (the OS keyring).
    /// Nothing in the store was changed.
    #[error("the store is sealed with a key from the keyring, not with a passphrase")]
    NotAPassphraseStore,
    /// A stored record could not be decrypted (wrong key) or decoded.
    #[error("store record could not be decrypted or decoded: {0}")]
    Corrupt(CorruptRecord),
    /// Where the store key is kept (the OS keyring, a key file) failed.
    #[error("store: {0}")]
    KeyStorage(#[source] BoxedError),
}

/// Why a stored record is unusable.
#[derive(Debug, Error)]
pub enum CorruptRecord {
    #[error("record too short")]
    TooShort,
    #[error("a {kind} record does not open with this key")]
    DoesNotOpen { kind: String },
    #[error("{kind}: {source}")]
    Undecodable {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cross-signing key: {0}")]
    CrossSigningSeed(#[source] vodozemac::KeyError),
}

/// SAS verification: the flow was (or is to be) cancelled with this code.
#[derive(Debug, Error)]
pub enum VerificationError {
    #[error("verification cancelled: {code}: {reason}")]
    Cancelled { code: &'static str, reason: String },
}

/// Server-side key backup (wrong recovery key, bad backup data).
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("key backup: empty passphrase or no PBKDF2 rounds")]
    EmptyPassphrase,
    #[error("key backup: {0}")]
    Pbkdf2(hmac::digest::InvalidLength),
    #[error("key backup: recovery key is not base58: {0}")]
    RecoveryKeyNotBase58(#[source] bs58::decode::Error),
    #[error("key backup: not a recovery key (wrong length or prefix)")]
    NotARecoveryKey,
    #[error("key backup: recovery key parity check failed (typo?)")]
    RecoveryKeyParity,
    #[error("key backup: {0}")]
    Encryption(#[source] vodozemac::pk_encryption::Error),
    #[error("key backup: unsupported backup algorithm")]
    UnsupportedAlgorithm,
    /// The recovery key (or passphrase) is not the backup's.
    #[error("key backup: this recovery key does not belong to the backup")]
    WrongKey,
    #[error("key backup: session_data has no {0}")]
    MissingSessionData(&'static str),
    #[error("key backup: {0}")]
    Message(#[source] vodozemac::pk_encryption::MessageDecodeError),
    #[error("key backup: {0}")]
    Decryption(#[source] vodozemac::pk_encryption::Error),
    #[error("key backup: not a Megolm session")]
    NotMegolm,
    #[error("key backup: no session_key")]
    NoSessionKey,
    #[error("key backup: the session key does not match its session id")]
    SessionIdMismatch,
}

/// Key export files (the spec's `MEGOLM SESSION DATA`).
#[derive(Debug, Error)]
pub enum KeyExportError {
    #[error("malformed key export: {0}")]
    Format(&'static str),
    #[error("malformed key export: not base64")]
    NotBase64(#[source] base64::DecodeError),
    /// The MAC does not match: the passphrase is wrong or the file was changed.
    #[error("malformed key export: wrong passphrase or altered file")]
    WrongPassphrase,
    /// One exported session is unusable (it is skipped, the others are imported).
    #[error("malformed exported session: {0}")]
    Session(&'static str),
}

/// Encrypted attachments.
#[derive(Debug, Error)]
pub enum AttachmentError {
    #[error("attachment: finish() before the whole file was read")]
    NotFinished,
    #[error("attachment: hash mismatch: the file was altered")]
    HashMismatch,
    #[error("attachment: unsupported version {0}")]
    UnsupportedVersion(String),
    #[error("attachment: no sha256 hash")]
    NoHash,
    #[error("attachment: {0}")]
    Io(#[source] std::io::Error),
}

/// The machine's request bookkeeping.
#[derive(Debug, Error)]
pub enum RequestError {
    /// A response for a request id we never sent (or already marked as sent).
    #[error("unknown request id {0}")]
    UnknownRequest(String),
    /// The answer given is for another kind of request (nothing was changed).
    #[error("request {request_id} is a {expected} request, not a {got} one")]
    WrongResponse { request_id: String, expected: &'static str, got: &'static str },
}

impl Error {
    /// A missing field or wrong shape of `what`.
    pub(crate) fn malformed(what: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Malformed::Shape { what, reason: reason.into() }.into()
    }

    /// `what` did not parse; `source` says why.
    pub(crate) fn invalid(what: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Malformed::Invalid { what, source: Box::new(source) }.into()
    }

    /// A failure of where the store key is kept (for [`crate::store::KeyringHook`] implementors).
    pub fn key_storage(source: impl Into<BoxedError>) -> Self {
        StoreError::KeyStorage(source.into()).into()
    }

    pub(crate) fn cancel(code: &'static str, reason: impl Into<String>) -> Self {
        VerificationError::Cancelled { code, reason: reason.into() }.into()
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::invalid("JSON", e)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e).into()
    }
}

impl From<PayloadCheck> for Error {
    fn from(check: PayloadCheck) -> Self {
        OlmError::Payload(check).into()
    }
}
