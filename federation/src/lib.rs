//! The Matrix Server-Server protocol pieces Obmin needs, independent of the homeserver.
//!
//! Today: the server's ed25519 signing key, building and signing PDUs (content hash,
//! signature, reference-hash event ids), and the authorization rules (ruma's state-res).
//! Request signing (X-Matrix), key fetching, discovery and the send queue land here with the
//! federation issue; the homeserver only wires them in.

pub mod auth;
pub mod pdu;
pub mod signing_key;

pub use signing_key::{SigningKey, SigningKeyError};
