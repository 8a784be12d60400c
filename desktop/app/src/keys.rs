//! Where the app keeps the key that seals the encryption store (`crypto.db`).
//!
//! * The OS keyring (the freedesktop Secret Service: GNOME Keyring, KWallet) when one answers
//!   on the session bus: a random key made at the first sign-in, one entry per data
//!   directory (`obmin_client::SecretServiceKeyring`). Nothing is asked.
//! * Otherwise, or when the user chose so (`--passphrase`, or
//!   `OBMIN_DESKTOP_KEY_STORAGE=passphrase`), a passphrase: the window asks for it before
//!   anything else (chosen and typed twice the first time, then to unlock at each start), and
//!   the key is derived from it with argon2id. A store once sealed with a passphrase keeps
//!   asking for it even when a keyring is there later (the core decides that from the store).
//!
//! Keys of earlier versions lived in `crypto.key` next to the store. With a keyring, the core
//! moves that key into it and removes the file. Without one, the file keeps opening its store
//! (read only, nothing asked) until that session ends; the next sign-in's store is sealed with
//! a passphrase. The app never writes a key file.

use std::{path::Path, sync::Arc};

use obmin_client::{KeyStorage, SecretServiceKeyring};

/// Whether the user asked for a passphrase rather than the keyring.
fn passphrase_chosen() -> bool {
    std::env::args().skip(1).any(|arg| arg == "--passphrase")
        || std::env::var("OBMIN_DESKTOP_KEY_STORAGE").is_ok_and(|value| value == "passphrase")
}

/// The key storage for the store in `data_dir`: the keyring when it answers, else a passphrase.
pub fn choose(data_dir: &Path) -> KeyStorage {
    if passphrase_chosen() {
        tracing::info!("the encryption keys are protected by a passphrase (chosen)");
        return KeyStorage::Passphrase;
    }
    match SecretServiceKeyring::connect(data_dir) {
        Ok(keyring) => {
            tracing::info!(account = keyring.account(), "the encryption store key is kept in the Secret Service");
            KeyStorage::Keyring(Arc::new(keyring))
        }
        Err(error) => {
            tracing::warn!(%error, "no OS keyring: the encryption keys are protected by a passphrase");
            KeyStorage::Passphrase
        }
    }
}
