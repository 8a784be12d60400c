//! The OS keyring on Linux: the crypto store's key as a secret in the freedesktop Secret
//! Service (GNOME Keyring, KWallet), over D-Bus.
//!
//! Crate choice: `secret-service` 5 speaks zbus 5, which the app already links (through
//! tauri-plugin-notification), and with `crypto-rust` negotiates an encrypted session in pure
//! Rust; it added five small crates to the lock file. The `keyring` crate 3 goes through
//! `secret-service` 4 (a second zbus major, 4), its 4.x stores through the same crate as here
//! plus a store layer; `oo7` brings the desktop portal client (ashpd) and another AES/HKDF
//! generation. None needs libdbus.
//!
//! One secret per data directory: attributes `service = org.obmin.desktop` and
//! `account = <the data directory's absolute path>`, so two data directories (two accounts)
//! never share or overwrite a key. `secret-tool lookup service org.obmin.desktop account DIR`
//! shows it.

use std::{collections::HashMap, future::Future, path::Path};

use e2ee::store::KeyringHook;
use secret_service::{Collection, EncryptionType, SecretService};

use crate::{Error, Result};

/// The `service` attribute of every secret the app keeps.
pub const KEYRING_SERVICE: &str = "org.obmin.desktop";

/// The crypto store key of one data directory in the Secret Service.
#[derive(Debug, Clone)]
pub struct SecretServiceKeyring {
    account: String,
}

impl SecretServiceKeyring {
    /// The keyring entry for the store in `data_dir` (created if missing), after checking that
    /// a Secret Service answers on the session bus and has a collection to keep secrets in.
    /// Fails with [`Error::Keyring`] when there is no D-Bus session or no Secret Service: the
    /// app then asks for a passphrase instead.
    pub fn connect(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let account = std::fs::canonicalize(data_dir)?.to_string_lossy().into_owned();
        let keyring = Self { account };
        keyring.run(|service| async move {
            // Not unlocked here: a locked keyring asks the user (its own dialog) only when the
            // key is needed.
            collection(&service).await.map(drop)
        })?;
        Ok(keyring)
    }

    /// The `account` attribute: the data directory's absolute path.
    pub fn account(&self) -> &str {
        &self.account
    }

    fn attributes(&self) -> HashMap<&str, &str> {
        HashMap::from([("service", KEYRING_SERVICE), ("account", self.account.as_str())])
    }

    /// Runs one Secret Service conversation to its end.
    ///
    /// [`KeyringHook`] is synchronous and the Secret Service API is async (zbus on tokio). The
    /// conversation runs on a thread of its own with a small current-thread runtime: that never
    /// nests a runtime in the caller's and never parks a tokio worker's tasks on D-Bus, whatever
    /// thread calls (the client calls the hook from `spawn_blocking`, since an unlock prompt
    /// can take as long as the user does).
    fn run<T, F, Fut>(&self, conversation: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(SecretService<'static>) -> Fut + Send,
        Fut: Future<Output = Result<T, secret_service::Error>>,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| Error::Keyring(format!("no runtime for D-Bus: {e}")))?;
                    runtime.block_on(async {
                        let service = SecretService::connect(EncryptionType::Dh).await.map_err(keyring_error)?;
                        conversation(service).await.map_err(keyring_error)
                    })
                })
                .join()
                .unwrap_or_else(|_| Err(Error::Keyring("the keyring thread panicked".into())))
        })
    }
}

/// The default collection ("login" in GNOME Keyring, where the desktop keeps passwords), and
/// only that: the "session" collection is forgotten at the next login, and with it the key
/// (the store could never be opened again). No default collection means no keyring to use.
async fn collection<'a>(service: &'a SecretService<'_>) -> Result<Collection<'a>, secret_service::Error> {
    service.get_default_collection().await
}

fn keyring_error(error: secret_service::Error) -> Error {
    Error::Keyring(error.to_string())
}

fn hook_error(error: Error) -> e2ee::Error {
    e2ee::Error::key_storage(error)
}

impl KeyringHook for SecretServiceKeyring {
    fn load(&self) -> e2ee::Result<Option<[u8; 32]>> {
        let secret = self
            .run(|service| async move {
                let found = service.search_items(self.attributes()).await?;
                let Some(item) = found.unlocked.into_iter().chain(found.locked).next() else {
                    return Ok(None);
                };
                // A locked keyring asks the user to unlock it (the desktop's own prompt).
                item.ensure_unlocked().await?;
                item.get_secret().await.map(Some)
            })
            .map_err(hook_error)?;
        match secret {
            None => Ok(None),
            Some(bytes) => bytes.try_into().map(Some).map_err(|bytes: Vec<u8>| {
                e2ee::Error::key_storage(format!(
                    "the keyring entry for {} holds {} bytes, not a 32-byte key",
                    self.account,
                    bytes.len()
                ))
            }),
        }
    }

    fn save(&self, key: &[u8; 32]) -> e2ee::Result<()> {
        let label = format!("Obmin encryption store key ({})", self.account);
        self.run(|service| async move {
            let collection = collection(&service).await?;
            collection.ensure_unlocked().await?;
            collection.create_item(&label, self.attributes(), key, true, "application/octet-stream").await.map(drop)
        })
        .map_err(hook_error)
    }

    fn delete(&self) -> e2ee::Result<()> {
        self.run(|service| async move {
            let found = service.search_items(self.attributes()).await?;
            for item in found.unlocked.iter().chain(&found.locked) {
                item.delete().await?;
            }
            Ok(())
        })
        .map_err(hook_error)
    }
}
