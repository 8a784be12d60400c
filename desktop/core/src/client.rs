//! [`Client`]: the handle the app holds. The state it shares between its methods and its
//! background tasks lives in [`Inner`]; the methods are spread over the modules by concept
//! (session, rooms, timeline, media, social, verification).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex as StdMutex, RwLock},
};

use tokio::{
    sync::{Mutex, Notify, broadcast, watch},
    task::JoinHandle,
};

use zeroize::Zeroizing;

use crate::{
    ConnectionState, KeyStorage, Result, SessionInfo, Update, crypto::Crypto, http::Http, session::Session,
    store::Store,
};

/// The client core for one account in one data directory. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) data_dir: PathBuf,
    /// The local cache, encrypted with a key derived from the crypto store's: open while the
    /// session is (None when signed out, and while the key is locked).
    pub(crate) store: RwLock<Option<Store>>,
    pub(crate) http: Http,
    /// The signed-in session (None when signed out, and while the key is locked: the session
    /// lives in the encrypted cache).
    pub(crate) session: RwLock<Option<Session>>,
    /// The encryption state of the session; locked for a whole encrypt / decrypt / key
    /// exchange so the machine and its store stay consistent.
    pub(crate) crypto: Mutex<Option<Crypto>>,
    /// Where the crypto store's key comes from.
    pub(crate) key_storage: KeyStorage,
    /// The passphrase, once given ([`KeyStorage::Passphrase`]): kept (wiped on drop) so that
    /// a new sign-in seals its new store without asking again.
    pub(crate) passphrase: StdMutex<Option<Zeroizing<String>>>,
    pub(crate) updates: broadcast::Sender<Update>,
    pub(crate) connection: watch::Sender<ConnectionState>,
    /// Wakes the outbox task when something was queued or the connection came back.
    pub(crate) outbox_wake: Notify,
    /// Held for a whole `/sync` round trip and its processing (one sync at a time).
    pub(crate) sync_lock: Mutex<()>,
    /// The presence the sync loop reports (set by [`Client::set_presence`]).
    pub(crate) presence: StdMutex<ruma::presence::PresenceState>,
    /// Transaction ids of the SAS verifications we know of, and the status last reported.
    pub(crate) verification_ids: StdMutex<std::collections::BTreeMap<String, (ruma::OwnedUserId, Option<String>)>>,
    pub(crate) verification_seen: StdMutex<std::collections::BTreeMap<String, crate::VerificationStatus>>,
    /// The sync loop and the outbox task, while started.
    pub(crate) tasks: StdMutex<Vec<JoinHandle<()>>>,
}

impl Client {
    /// Opens the client in `data_dir` (created if missing) and restores the saved session, if
    /// any: after this, [`Client::session`] says whether the user is signed in, and the cached
    /// rooms and timelines are readable without a network.
    ///
    /// The end-to-end encryption store is sealed with a random key kept in
    /// `<data_dir>/crypto.key` (readable by the user only): for tests and tools. An app opens
    /// with [`Client::open_with_keyring`] or [`Client::open_with_passphrase`].
    pub async fn open(data_dir: impl AsRef<Path>) -> Result<Client> {
        Self::open_with(data_dir, KeyStorage::KeyFile).await
    }

    /// Like [`Client::open`], with the crypto store's key kept by `keyring` (the OS keyring,
    /// [`crate::SecretServiceKeyring`]).
    pub async fn open_with_keyring(
        data_dir: impl AsRef<Path>,
        keyring: Arc<dyn e2ee::store::KeyringHook + Send + Sync>,
    ) -> Result<Client> {
        Self::open_with(data_dir, KeyStorage::Keyring(keyring)).await
    }

    /// Like [`Client::open`], with the crypto store sealed by a passphrase: see
    /// [`Client::key_state`] and [`Client::unlock`].
    pub async fn open_with_passphrase(data_dir: impl AsRef<Path>) -> Result<Client> {
        Self::open_with(data_dir, KeyStorage::Passphrase).await
    }

    /// Opens with the crypto store's key from `key_storage`. A store that was sealed with a
    /// passphrase stays so: then the passphrase is asked for whatever `key_storage` says (the
    /// user chose it; a keyring that appeared since does not change that).
    pub async fn open_with(data_dir: impl AsRef<Path>, key_storage: KeyStorage) -> Result<Client> {
        let data_dir = data_dir.as_ref();
        std::fs::create_dir_all(data_dir)?;
        let key_storage = match e2ee::store::Store::key_kind(&data_dir.join(crate::crypto::STORE_FILE)).await? {
            Some(e2ee::store::KeyKind::Passphrase) => KeyStorage::Passphrase,
            _ => key_storage,
        };
        let (updates, _) = broadcast::channel(1024);
        let client = Client {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                store: RwLock::new(None),
                http: Http::new()?,
                session: RwLock::new(None),
                crypto: Mutex::new(None),
                key_storage,
                passphrase: StdMutex::new(None),
                updates,
                connection: watch::channel(ConnectionState::Offline).0,
                outbox_wake: Notify::new(),
                sync_lock: Mutex::new(()),
                presence: StdMutex::new(ruma::presence::PresenceState::Online),
                verification_ids: StdMutex::default(),
                verification_seen: StdMutex::default(),
                tasks: StdMutex::new(Vec::new()),
            }),
        };
        if !client.has_saved_session() {
            // A cache without an encryption store opens with no key: a signed-out plaintext
            // cache of an earlier version (its deleted rows may linger in free pages), or the
            // rest of an interrupted sign-out. Nothing to keep.
            Store::remove(&client.cache_path())?;
        } else if client.key_state().await? == crate::KeyState::Ready {
            // A keyring that fails now (dismissed unlock prompt, keyring gone) must not keep
            // the app from starting: [`Client::open_encryption`] tries again and says why.
            match client.open_saved().await {
                Err(crate::Error::Keyring(e)) => tracing::warn!(%e, "the keyring failed; encryption is not open yet"),
                other => other?,
            }
        }
        Ok(client)
    }

    /// Which key storage this client uses (a passphrase store overrides the one asked for).
    pub fn key_storage(&self) -> &KeyStorage {
        &self.inner.key_storage
    }

    /// Opens the saved session (its encrypted cache and encryption store) if it is not open
    /// yet (e.g. the keyring failed when the client opened): [`crate::Error::Locked`] while a
    /// passphrase is needed, [`crate::Error::Keyring`] when the keyring fails again. Nothing
    /// to do when signed out. After it, [`Client::session`] says who is signed in.
    pub async fn open_encryption(&self) -> Result<()> {
        if !self.has_saved_session() || self.crypto_is_open() {
            return Ok(());
        }
        match self.key_state().await? {
            crate::KeyState::Ready => self.open_saved().await,
            crate::KeyState::NeedsPassphrase { .. } => Err(crate::Error::Locked),
            crate::KeyState::KeyringUnavailable => Err(crate::Error::KeyringUnavailable),
        }
    }

    /// Who is signed in, if anyone. None also while a saved session is locked (the session is
    /// in the encrypted cache): after [`Client::unlock`] or [`Client::open_encryption`] it is
    /// known.
    pub fn session(&self) -> Option<SessionInfo> {
        self.inner.session.read().expect("session lock").as_ref().map(Session::info)
    }

    /// Updates from now on: timeline items, room list changes, typing, presence, connection
    /// state, verification, errors. A receiver that falls more than 1024 updates behind gets
    /// `Lagged` and should re-read [`Client::rooms`] and the open timeline.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.inner.updates.subscribe()
    }

    /// The connection state now (changes are also sent as [`Update::Connection`]).
    pub fn connection_state(&self) -> ConnectionState {
        *self.inner.connection.borrow()
    }

    /// Starts the background work: the sync loop (long-polling `/sync`, reconnecting with
    /// exponential backoff) and the outbox (sending queued messages). Needs a session.
    /// Calling it again while running does nothing.
    pub fn start(&self) -> Result<()> {
        self.require_session()?;
        // Without its encryption state the sync would lose room keys and leave messages
        // undecrypted: unlock first.
        if !self.crypto_is_open() {
            return Err(crate::Error::Locked);
        }
        let mut tasks = self.inner.tasks.lock().expect("tasks lock");
        if !tasks.is_empty() {
            return Ok(());
        }
        tasks.push(tokio::spawn(crate::sync::run(self.clone())));
        tasks.push(tokio::spawn(crate::outbox::run(self.clone())));
        Ok(())
    }

    /// Stops the background work and closes the cache and the encryption store: call it
    /// before the process exits. (SQLCipher frees its state in an `atexit` handler: a cache
    /// connection still closing on its worker thread then would touch freed memory.)
    pub async fn close(&self) {
        self.stop().await;
        if let Some(crypto) = self.inner.crypto.lock().await.take() {
            crypto.close().await;
        }
        let cache = self.inner.store.write().expect("store lock").take();
        if let Some(cache) = cache {
            cache.close().await;
        }
        *self.inner.session.write().expect("session lock") = None;
    }

    /// Stops the background work (what is queued stays queued for the next start).
    pub async fn stop(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        self.set_connection(ConnectionState::Offline);
    }

    pub(crate) fn emit(&self, update: Update) {
        // No subscriber is fine: the app may not listen yet.
        let _ = self.inner.updates.send(update);
    }

    pub(crate) fn set_connection(&self, state: ConnectionState) {
        let changed = self.inner.connection.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
        if changed {
            self.emit(Update::Connection { state });
        }
    }

    /// The open cache, or why not ([`Client::not_open`]).
    pub(crate) fn store(&self) -> Result<Store> {
        let store = self.inner.store.read().expect("store lock").clone();
        store.ok_or_else(|| self.not_open())
    }

    /// Why the session is not there: [`crate::Error::Locked`] while a saved one waits for its
    /// key (it is inside the encrypted cache), else [`crate::Error::NotLoggedIn`].
    pub(crate) fn not_open(&self) -> crate::Error {
        if self.inner.data_dir.join(crate::crypto::STORE_FILE).exists() {
            crate::Error::Locked
        } else {
            crate::Error::NotLoggedIn
        }
    }

    /// The cache file.
    pub(crate) fn cache_path(&self) -> PathBuf {
        self.inner.data_dir.join(crate::store::CACHE_FILE)
    }

    /// Whether the data directory holds a session, open or not. Its encryption store is made
    /// first and removed last, and holds the key to the cache, so it says.
    pub(crate) fn has_saved_session(&self) -> bool {
        self.session().is_some() || self.inner.data_dir.join(crate::crypto::STORE_FILE).exists()
    }

    /// The session, or why not ([`Client::not_open`]).
    pub(crate) fn require_session(&self) -> Result<Session> {
        let session = self.inner.session.read().expect("session lock").clone();
        session.ok_or_else(|| self.not_open())
    }
}

impl Drop for Inner {
    /// A client dropped without [`Client::close`] (a test's end, an error path) still closes
    /// its cache before the drop returns, so no connection is left closing while the process
    /// exits (see [`Client::close`]). On a thread of its own with its own runtime: a drop may
    /// happen inside an async context, where blocking on the pool is not allowed. Bounded: a
    /// connection held elsewhere is given up after a few seconds.
    fn drop(&mut self) {
        let Some(cache) = self.store.get_mut().ok().and_then(Option::take) else { return };
        let closing = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_time().build() else { return };
            runtime.block_on(async {
                if tokio::time::timeout(std::time::Duration::from_secs(5), cache.close()).await.is_err() {
                    tracing::warn!("the local cache did not close in time");
                }
            });
        });
        let _ = closing.join();
    }
}
