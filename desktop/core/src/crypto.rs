//! Glue to the `e2ee` crate: opens its encrypted store, sends the requests its `OlmMachine`
//! asks for, and encrypts / decrypts room events. The machine is sans-I/O; this module is
//! the I/O.

use std::{path::PathBuf, sync::Arc};

use e2ee::{
    EncryptionSettings, IncomingResponse, OlmMachine, OutgoingRequest, Request,
    store::{KeyKind, KeyringHook, Store as CryptoStore, StoreKey},
};
use ruma::{OwnedUserId, RoomId};
use serde::Serialize;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::{
    Client, Error, Result,
    http::{AuthInput, PathInput, REQUEST_TIMEOUT},
    session::Session,
    store::{CACHE_KEY_PURPOSE, Store},
};

pub(crate) const STORE_FILE: &str = "crypto.db";
/// The key file of earlier versions (and of [`KeyStorage::KeyFile`]).
pub(crate) const KEY_FILE: &str = "crypto.key";
/// The shortest passphrase [`Client::unlock`] accepts when one is chosen.
pub const MIN_PASSPHRASE_CHARS: usize = 8;

/// Where the key that seals the encryption store (`crypto.db`) comes from.
#[derive(Clone)]
pub enum KeyStorage {
    /// The OS keyring (e.g. [`crate::SecretServiceKeyring`]): a random key made at the first
    /// sign-in and kept there. A `crypto.key` left by an earlier version moves into it (and
    /// the file is removed).
    Keyring(Arc<dyn KeyringHook + Send + Sync>),
    /// A passphrase the user types, through argon2id (salt in the store): encryption stays
    /// locked until [`Client::unlock`]. A store sealed by a `crypto.key` of an earlier version
    /// keeps opening with that file (no keyring to move it into) until its session ends; the
    /// next sign-in's store is sealed with the passphrase.
    Passphrase,
    /// A random key in `<data_dir>/crypto.key` (user-only file): [`Client::open`], for tests
    /// and tools. The desktop app does not use it.
    KeyFile,
}

impl std::fmt::Debug for KeyStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyStorage::Keyring(_) => "Keyring",
            KeyStorage::Passphrase => "Passphrase",
            KeyStorage::KeyFile => "KeyFile",
        })
    }
}

/// Whether the encryption store can be opened now, or what the user must do first
/// ([`Client::key_state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    /// Nothing to ask.
    Ready,
    /// A passphrase is needed: `new` when none protects this data directory yet (choose one,
    /// typed twice), else the one chosen before (unlock).
    NeedsPassphrase { new: bool },
    /// The signed-in session's keys are sealed with a key in the OS keyring, which cannot be
    /// reached now (no D-Bus session or no Secret Service). Start Obmin where the keyring
    /// runs, or sign out (the keys of this device go) and sign in with a passphrase.
    KeyringUnavailable,
}

pub(crate) struct Crypto {
    pub machine: OlmMachine,
    store: CryptoStore,
}

impl Crypto {
    /// Writes what changed in the machine to its store.
    pub(crate) async fn save(&mut self) -> Result<()> {
        self.store.save(&mut self.machine).await?;
        Ok(())
    }

    pub(crate) async fn close(mut self) {
        if let Err(e) = self.save().await {
            tracing::warn!(%e, "saving the crypto store on close");
        }
        self.store.close().await;
    }
}

/// The crypto store's key in a file only the user can read ([`KeyStorage::KeyFile`], and
/// the legacy file that [`KeyStorage::Keyring`] migrates).
struct KeyFile(PathBuf);

impl KeyringHook for KeyFile {
    fn load(&self) -> e2ee::Result<Option<[u8; 32]>> {
        match std::fs::read(&self.0) {
            Ok(bytes) => Ok(Some(
                bytes.try_into().map_err(|_| e2ee::Error::key_storage(format!("{} is not a key", self.0.display())))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e2ee::Error::key_storage(e)),
        }
    }

    fn save(&self, key: &[u8; 32]) -> e2ee::Result<()> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.0)
            .map_err(e2ee::Error::key_storage)?;
        file.write_all(key).and_then(|_| file.sync_all()).map_err(e2ee::Error::key_storage)
    }

    fn delete(&self) -> e2ee::Result<()> {
        match std::fs::remove_file(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e2ee::Error::key_storage(e)),
            _ => Ok(()),
        }
    }
}

fn keyring_error(error: e2ee::Error) -> Error {
    Error::Keyring(error.to_string())
}

/// The store key from the keyring, made and saved on first use. A legacy `crypto.key` moves
/// into the keyring first: saved there, read back to be sure the keyring kept it, and only
/// then removed (a failure leaves the file, so nothing is lost). Blocking: keyring calls may
/// wait for the user to unlock the keyring.
fn key_from_keyring(keyring: &dyn KeyringHook, legacy: &KeyFile) -> Result<StoreKey> {
    if let Some(key) = legacy.load()? {
        // The file sealed this store: it wins over anything the keyring holds for the same
        // data directory (that can only be a key saved by an interrupted migration).
        keyring.save(&key).map_err(keyring_error)?;
        if keyring.load().map_err(keyring_error)? != Some(key) {
            return Err(Error::Keyring(format!(
                "the keyring did not keep the key; it stays in {}",
                legacy.0.display()
            )));
        }
        legacy.delete()?;
        tracing::info!(file = %legacy.0.display(), "moved the encryption store key into the OS keyring");
        return Ok(StoreKey::from_bytes(key));
    }
    match keyring.load().map_err(keyring_error)? {
        Some(key) => Ok(StoreKey::from_bytes(key)),
        None => {
            let key = StoreKey::random();
            keyring.save(key.as_bytes()).map_err(keyring_error)?;
            Ok(key)
        }
    }
}

impl Client {
    fn crypto_store_path(&self) -> PathBuf {
        self.inner.data_dir.join(STORE_FILE)
    }

    fn legacy_key_file(&self) -> KeyFile {
        KeyFile(self.inner.data_dir.join(KEY_FILE))
    }

    /// Whether the encryption store can be opened now, or which passphrase to ask for. The
    /// app asks before it shows anything else: the sign-in screen (a new session's store is
    /// sealed at once) or the restored session.
    pub async fn key_state(&self) -> Result<KeyState> {
        if !matches!(self.inner.key_storage, KeyStorage::Passphrase)
            || self.inner.passphrase.lock().expect("passphrase lock").is_some()
        {
            return Ok(KeyState::Ready);
        }
        if !self.has_saved_session() {
            // The next sign-in makes a new store: it gets the passphrase chosen now.
            return Ok(KeyState::NeedsPassphrase { new: true });
        }
        Ok(match CryptoStore::key_kind(&self.crypto_store_path()).await? {
            Some(KeyKind::Passphrase) => KeyState::NeedsPassphrase { new: false },
            None => KeyState::NeedsPassphrase { new: true },
            Some(KeyKind::Kept) if self.legacy_key_file().0.exists() => KeyState::Ready,
            Some(KeyKind::Kept) => KeyState::KeyringUnavailable,
        })
    }

    /// Gives the passphrase ([`KeyStorage::Passphrase`]) and opens the encryption store of
    /// the signed-in session with it. When [`KeyState::NeedsPassphrase`] says `new`, this
    /// sets it (at least [`MIN_PASSPHRASE_CHARS`] characters; the app has it typed twice);
    /// else a wrong one is refused with [`Error::WrongPassphrase`] and nothing changes, so
    /// the user can simply try again. Nothing to do with any other key storage.
    pub async fn unlock(&self, passphrase: &str) -> Result<()> {
        let mut guard = self.inner.crypto.lock().await;
        match self.key_state().await? {
            KeyState::Ready => return Ok(()),
            KeyState::KeyringUnavailable => return Err(Error::KeyringUnavailable),
            KeyState::NeedsPassphrase { new: true } => {
                if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
                    return Err(Error::InvalidInput(format!(
                        "Choose a passphrase of at least {MIN_PASSPHRASE_CHARS} characters."
                    )));
                }
            }
            KeyState::NeedsPassphrase { new: false } => {}
        }
        if passphrase.is_empty() {
            return Err(Error::WrongPassphrase);
        }
        let store = match self.has_saved_session() && guard.is_none() {
            true => Some(match CryptoStore::open_with_passphrase(&self.crypto_store_path(), passphrase).await {
                Err(e2ee::Error::Store(e2ee::StoreError::WrongKey)) => return Err(Error::WrongPassphrase),
                Err(e2ee::Error::Store(e2ee::StoreError::NotAPassphraseStore)) => {
                    return Err(Error::KeyringUnavailable);
                }
                other => other?,
            }),
            false => None,
        };
        *self.inner.passphrase.lock().expect("passphrase lock") = Some(Zeroizing::new(passphrase.to_owned()));
        if let Some(store) = store {
            self.restore(&mut guard, store).await?;
        }
        Ok(())
    }

    /// [`Error::Locked`] when a new session could not seal its encryption store now.
    pub(crate) fn require_unlocked(&self) -> Result<()> {
        if matches!(self.inner.key_storage, KeyStorage::Passphrase)
            && self.inner.passphrase.lock().expect("passphrase lock").is_none()
        {
            return Err(Error::Locked);
        }
        Ok(())
    }

    /// Opens the crypto store with the key from wherever [`KeyStorage`] says.
    async fn open_crypto_store(&self) -> Result<CryptoStore> {
        let path = self.crypto_store_path();
        match &self.inner.key_storage {
            KeyStorage::Keyring(keyring) => {
                // Off the async threads: the Secret Service may show an unlock prompt.
                let (keyring, legacy) = (keyring.clone(), self.legacy_key_file());
                let key = tokio::task::spawn_blocking(move || key_from_keyring(keyring.as_ref(), &legacy))
                    .await
                    .map_err(|e| Error::Keyring(e.to_string()))??;
                Ok(CryptoStore::open(&path, key).await?)
            }
            KeyStorage::KeyFile => Ok(CryptoStore::open_with_keyring(&path, &self.legacy_key_file()).await?),
            KeyStorage::Passphrase => {
                let passphrase = self.inner.passphrase.lock().expect("passphrase lock").clone();
                if let Some(passphrase) = passphrase {
                    return match CryptoStore::open_with_passphrase(&path, &passphrase).await {
                        Err(e2ee::Error::Store(e2ee::StoreError::WrongKey)) => Err(Error::WrongPassphrase),
                        other => Ok(other?),
                    };
                }
                // A store of an earlier version, sealed by its key file: read, never written.
                match self.legacy_key_file().load()? {
                    Some(key) if CryptoStore::key_kind(&path).await? == Some(KeyKind::Kept) => {
                        Ok(CryptoStore::open(&path, StoreKey::from_bytes(key)).await?)
                    }
                    _ => Err(Error::Locked),
                }
            }
        }
    }

    /// The session's machine from the store (a new one when the store has none or another
    /// device's).
    async fn load_machine(&self, store: CryptoStore) -> Result<Crypto> {
        let session = self.require_session()?;
        let machine = match store.load().await? {
            Some(machine)
                if machine.user_id() == session.user_id && machine.device_id().as_str() == session.device_id =>
            {
                machine
            }
            _ => OlmMachine::new(session.user_id.clone(), session.device_id.as_str().into()),
        };
        let mut crypto = Crypto { machine, store };
        crypto.save().await?;
        Ok(crypto)
    }

    /// Opens the saved session: its encryption store with the key from wherever
    /// [`KeyStorage`] says, then the cache sealed with the key derived from it (a plaintext
    /// cache of an earlier version is encrypted now), then the session kept in the cache.
    pub(crate) async fn open_saved(&self) -> Result<()> {
        let mut guard = self.inner.crypto.lock().await;
        if guard.is_some() {
            return Ok(());
        }
        let store = self.open_crypto_store().await?;
        self.restore(&mut guard, store).await
    }

    /// The rest of [`Client::open_saved`] once the encryption store is open. A data directory
    /// whose cache holds no session (a sign-in interrupted before it saved one) is cleared:
    /// signed out.
    async fn restore(&self, guard: &mut Option<Crypto>, store: CryptoStore) -> Result<()> {
        let cache = match Store::open(&self.cache_path(), &store.derive_key(CACHE_KEY_PURPOSE)).await {
            Ok(cache) => cache,
            Err(e) => {
                store.close().await;
                return Err(e);
            }
        };
        let Some(session) = cache.load_session().await? else {
            cache.close().await;
            store.close().await;
            tracing::warn!("the local cache holds no session; signed out");
            return self.remove_local_data().await;
        };
        *self.inner.store.write().expect("store lock") = Some(cache);
        *self.inner.session.write().expect("session lock") = Some(session);
        *guard = Some(self.load_machine(store).await?);
        Ok(())
    }

    /// Makes the encryption store and the cache of a new session (after
    /// [`Client::remove_local_data`]) and saves `session` in the cache.
    pub(crate) async fn create_session_data(&self, guard: &mut Option<Crypto>, session: &Session) -> Result<()> {
        let store = self.open_crypto_store().await?;
        let cache = Store::open(&self.cache_path(), &store.derive_key(CACHE_KEY_PURPOSE)).await?;
        cache.save_session(session).await?;
        *self.inner.store.write().expect("store lock") = Some(cache);
        *self.inner.session.write().expect("session lock") = Some(session.clone());
        *guard = Some(self.load_machine(store).await?);
        Ok(())
    }

    /// Whether the encryption state is open (false while locked, or signed out).
    pub(crate) fn crypto_is_open(&self) -> bool {
        // Held by someone means open: only an open state is worked on.
        self.inner.crypto.try_lock().map(|guard| guard.is_some()).unwrap_or(true)
    }

    /// Closes and removes what a session keeps on disk: the cache, the crypto store (a new
    /// session gets a new device and new keys) and its key. The crypto state must be closed
    /// already (the caller holds its lock).
    pub(crate) async fn remove_local_data(&self) -> Result<()> {
        *self.inner.session.write().expect("session lock") = None;
        let cache = self.inner.store.write().expect("store lock").take();
        if let Some(cache) = cache {
            cache.close().await;
        }
        Store::remove(&self.cache_path())?;
        self.remove_crypto_store().await
    }

    /// Removes the crypto store and its key: the keyring entry, or a legacy key file. A
    /// keyring that cannot forget is only logged: the key it keeps opens nothing any more.
    async fn remove_crypto_store(&self) -> Result<()> {
        for suffix in ["", "-wal", "-shm"] {
            match std::fs::remove_file(self.inner.data_dir.join(format!("{STORE_FILE}{suffix}"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        self.legacy_key_file().delete()?;
        if let KeyStorage::Keyring(keyring) = &self.inner.key_storage {
            let keyring = keyring.clone();
            match tokio::task::spawn_blocking(move || keyring.delete()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%e, "the keyring did not forget the old store key"),
                Err(e) => tracing::warn!(%e, "the keyring did not forget the old store key"),
            }
        }
        Ok(())
    }

    /// Sends one request the machine asked for (ruma's request type) and tells it the answer.
    pub(crate) async fn send_crypto_request(
        &self,
        session: &Session,
        crypto: &mut Crypto,
        request: &OutgoingRequest,
    ) -> Result<()> {
        let id = request.request_id.as_str();
        let sent = match &request.request {
            Request::KeysUpload(r) => self.send_typed(session, crypto, id, r.clone()).await,
            Request::KeysQuery(r) => self.send_typed(session, crypto, id, r.clone()).await,
            Request::KeysClaim(r) => self.send_typed(session, crypto, id, r.clone()).await,
            Request::ToDevice(r) => self.send_typed(session, crypto, id, r.clone()).await,
            Request::SignatureUpload(r) => self.send_typed(session, crypto, id, r.clone()).await,
            Request::BackupKeys(r) => self.send_typed(session, crypto, id, r.clone()).await,
        };
        if let Err(e) = &sent
            && !e.is_transient()
        {
            // A refusal will not get better by repeating it; anything transient is simply
            // asked for again by the machine next time.
            tracing::warn!(%e, path = %request.path(), "crypto request refused");
            crypto.machine.discard_request(id);
        }
        sent
    }

    async fn send_typed<R>(&self, session: &Session, crypto: &mut Crypto, request_id: &str, request: R) -> Result<()>
    where
        R: ruma::api::OutgoingRequest,
        R::Authentication: AuthInput,
        R::PathBuilder: PathInput,
        for<'a> IncomingResponse<'a>: From<&'a R::IncomingResponse>,
    {
        let response =
            self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        crypto.machine.mark_request_as_sent(request_id, &response)?;
        Ok(())
    }

    /// Sends everything the machine wants sent (key uploads, device queries, to-device
    /// messages) until it wants nothing more, then saves it.
    pub(crate) async fn flush_crypto(&self, session: &Session, crypto: &mut Crypto) -> Result<()> {
        for _ in 0..8 {
            let requests = crypto.machine.outgoing_requests()?;
            if requests.is_empty() {
                break;
            }
            for request in &requests {
                self.send_crypto_request(session, crypto, request).await?;
            }
        }
        // Room keys made or received since the last flush go to the backup (if it is on).
        self.backup_room_keys(session, crypto).await;
        crypto.save().await
    }

    /// Encrypts `content` for the room's members: makes sure we know their devices, have Olm
    /// sessions with them and shared our Megolm key, then returns the `m.room.encrypted`
    /// content.
    pub(crate) async fn encrypt_for_room(
        &self,
        session: &Session,
        room_id: &RoomId,
        encryption: &Value,
        event_type: &str,
        content: Value,
    ) -> Result<Value> {
        self.refresh_members(session, room_id).await?;
        let members: Vec<OwnedUserId> = self
            .store()?
            .members(room_id.as_str(), &["join", "invite"])
            .await?
            .into_iter()
            .filter_map(|(user, _)| user.try_into().ok())
            .collect();
        let mut guard = self.inner.crypto.lock().await;
        let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
        crypto.machine.update_tracked_users(members.iter().cloned());
        self.flush_crypto(session, crypto).await?;
        if let Some(claim) = crypto.machine.get_missing_sessions(&members) {
            self.send_crypto_request(session, crypto, &claim).await?;
        }
        let shares =
            crypto.machine.share_room_key(room_id, &members, EncryptionSettings::from_state_content(encryption))?;
        for request in &shares {
            if let Err(e) = self.send_crypto_request(session, crypto, request).await {
                // Not repeated by the machine: drop it so the next share makes it again.
                crypto.machine.discard_request(&request.request_id);
                return Err(e);
            }
        }
        let encrypted = crypto.machine.encrypt_room_event(room_id, event_type, content)?;
        crypto.save().await?;
        Ok(encrypted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A keyring that answers `save` but keeps nothing (or fails outright).
    struct Keyring {
        kept: Mutex<Option<[u8; 32]>>,
        keeps: bool,
        fails: bool,
    }

    impl Keyring {
        fn new(keeps: bool, fails: bool) -> Self {
            Self { kept: Mutex::new(None), keeps, fails }
        }
    }

    impl KeyringHook for Keyring {
        fn load(&self) -> e2ee::Result<Option<[u8; 32]>> {
            Ok(*self.kept.lock().unwrap())
        }
        fn save(&self, key: &[u8; 32]) -> e2ee::Result<()> {
            if self.fails {
                return Err(e2ee::Error::key_storage("the keyring is locked"));
            }
            if self.keeps {
                *self.kept.lock().unwrap() = Some(*key);
            }
            Ok(())
        }
        fn delete(&self) -> e2ee::Result<()> {
            *self.kept.lock().unwrap() = None;
            Ok(())
        }
    }

    fn legacy_file(dir: &std::path::Path, key: &[u8; 32]) -> KeyFile {
        let file = KeyFile(dir.join(KEY_FILE));
        file.save(key).unwrap();
        file
    }

    #[test]
    fn a_legacy_key_moves_into_the_keyring_only_once_it_is_kept_there() {
        let dir = std::env::temp_dir().join(format!("obmin-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = [7u8; 32];

        // The keyring takes it: same key, file gone; the next call finds it in the keyring.
        let keyring = Keyring::new(true, false);
        let file = legacy_file(&dir, &key);
        assert_eq!(key_from_keyring(&keyring, &file).unwrap().as_bytes(), &key);
        assert!(!file.0.exists());
        assert_eq!(key_from_keyring(&keyring, &file).unwrap().as_bytes(), &key);

        // A keyring that does not keep it, or refuses: the file stays, nothing is lost.
        for keyring in [Keyring::new(false, false), Keyring::new(true, true)] {
            let file = legacy_file(&dir, &key);
            assert!(matches!(key_from_keyring(&keyring, &file), Err(Error::Keyring(_))));
            assert_eq!(file.load().unwrap(), Some(key), "the key file is still there");
        }

        // A key the keyring held for this directory (an interrupted move) yields to the file
        // that sealed the store.
        let keyring = Keyring::new(true, false);
        keyring.save(&[9u8; 32]).unwrap();
        let file = legacy_file(&dir, &key);
        assert_eq!(key_from_keyring(&keyring, &file).unwrap().as_bytes(), &key);
        assert_eq!(keyring.load().unwrap(), Some(key));

        // No file and an empty keyring: a new random key, saved there.
        let keyring = Keyring::new(true, false);
        let made = key_from_keyring(&keyring, &file).unwrap();
        assert_eq!(keyring.load().unwrap().as_ref(), Some(made.as_bytes()));
        assert!(!file.0.exists(), "no key file is written");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
