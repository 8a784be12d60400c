//! The Matrix Server-Server protocol pieces Obmin needs, independent of the homeserver.
//!
//! The server's ed25519 signing key, building and signing PDUs (content hash, signature,
//! reference-hash event ids), the authorization rules (ruma's state-res), key documents
//! (`/_matrix/key/v2/*`), X-Matrix request signing and verification, server discovery and
//! the outbound client. The homeserver wires these in; nothing here knows about storage.

pub mod auth;
pub mod client;
pub mod discovery;
pub mod keys;
pub mod pdu;
pub mod signing_key;
pub mod state;
pub mod xmatrix;

#[cfg(test)]
mod parser_props;

pub use signing_key::{SigningKey, SigningKeyError};
