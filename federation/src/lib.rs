//! The Matrix Server-Server protocol pieces Obmin needs, independent of the homeserver.
//!
//! Today this holds the server's ed25519 signing key. Event hashing and signing, request
//! signing (X-Matrix), key fetching, discovery and the send queue land here with the
//! federation issue; the homeserver only wires them in.

pub mod signing_key;

pub use signing_key::{SigningKey, SigningKeyError};
