//! Client-side end-to-end encryption for the Obmin desktop client, on vodozemac.
//!
//! Sans-I/O: [`OlmMachine`] produces the HTTP requests to send ([`OutgoingRequest`]: ruma's
//! request types, also as method, path and JSON body) and consumes `/sync` results
//! ([`SyncChanges`], ruma's types) and request answers ([`IncomingResponse`]: ruma's response
//! types, or the JSON body); the caller does HTTP. Errors come in families ([`Error`]), so a
//! caller matches on what went wrong.
//! The API is modelled on matrix-sdk-crypto's `OlmMachine`:
//!
//! * [`OlmMachine::outgoing_requests`] / [`OlmMachine::mark_request_as_sent`]
//! * [`OlmMachine::receive_sync_changes`] with [`SyncChanges`] (to-device events, device list
//!   changes, one-time key counts, unused fallback key types)
//! * [`OlmMachine::get_missing_sessions`], [`OlmMachine::share_room_key`],
//!   [`OlmMachine::encrypt_room_event`], [`OlmMachine::decrypt_room_event`]
//!
//! Attachments are encrypted as streams ([`attachments`]), state persists in an encrypted
//! SQLite store ([`store`]).

pub mod account;
pub mod attachments;
pub mod backup;
pub mod cross_signing;
pub mod devices;
pub mod error;
pub mod key_export;
mod key_sharing;
mod machine;
pub mod megolm;
mod olm;
pub mod signing;
pub mod store;
pub mod types;
pub mod verification;

pub use devices::Device;
pub use error::{
    AttachmentError, BackupError, DeviceError, Error, KeyExportError, Malformed, MegolmError, OlmError, PayloadCheck,
    RequestError, Result, SigningError, StoreError, VerificationError,
};
pub use machine::{DecryptedRoomEvent, OlmMachine, SenderTrust, ToDeviceEvent};
pub use megolm::EncryptionSettings;
pub use olm::DecryptedOlm;
pub use types::{IncomingResponse, OutgoingRequest, Request, SyncChanges};

#[cfg(test)]
mod tests;
