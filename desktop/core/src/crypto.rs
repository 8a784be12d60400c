//! Glue to the `e2ee` crate: opens its encrypted store, sends the requests its `OlmMachine`
//! asks for, and encrypts / decrypts room events. The machine is sans-I/O; this module is
//! the I/O.

use std::path::{Path, PathBuf};

use e2ee::{
    EncryptionSettings, OlmMachine, OutgoingRequest,
    store::{KeyringHook, Store as CryptoStore},
};
use ruma::{OwnedUserId, RoomId};
use serde_json::Value;

use crate::{Client, Error, Result, session::Session};

const STORE_FILE: &str = "crypto.db";
const KEY_FILE: &str = "crypto.key";

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

/// Removes the crypto store (a new session gets a new device and new keys).
pub(crate) fn remove_store(data_dir: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        match std::fs::remove_file(data_dir.join(format!("{STORE_FILE}{suffix}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// The crypto store's key in a file only the user can read: the fallback when the app gives
/// no OS keyring. (The store's own format stays the same either way.)
struct KeyFile(PathBuf);

impl KeyringHook for KeyFile {
    fn load(&self) -> e2ee::Result<Option<[u8; 32]>> {
        match std::fs::read(&self.0) {
            Ok(bytes) => Ok(Some(
                bytes.try_into().map_err(|_| e2ee::Error::Store(format!("{} is not a key", self.0.display())))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e2ee::Error::Store(e.to_string())),
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
            .map_err(|e| e2ee::Error::Store(e.to_string()))?;
        file.write_all(key).and_then(|_| file.sync_all()).map_err(|e| e2ee::Error::Store(e.to_string()))
    }
}

impl Client {
    /// Opens (or creates) the encryption state of the current session.
    pub(crate) async fn open_crypto(&self) -> Result<()> {
        let session = self.require_session()?;
        let mut guard = self.inner.crypto.lock().await;
        if guard.is_some() {
            return Ok(());
        }
        let path = self.inner.data_dir.join(STORE_FILE);
        let store = match &self.inner.keyring {
            Some(keyring) => CryptoStore::open_with_keyring(&path, keyring.as_ref()).await?,
            None => CryptoStore::open_with_keyring(&path, &KeyFile(self.inner.data_dir.join(KEY_FILE))).await?,
        };
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
        *guard = Some(crypto);
        Ok(())
    }

    /// Sends one request the machine asked for and tells it the answer.
    pub(crate) async fn send_crypto_request(
        &self,
        session: &Session,
        crypto: &mut Crypto,
        request: &OutgoingRequest,
    ) -> Result<Value> {
        let method = reqwest::Method::from_bytes(request.method().as_bytes()).expect("e2ee methods are valid");
        let answer = self
            .inner
            .http
            .json(&session.server_url, &session.access_token, method, &request.path(), Some(&request.body()))
            .await;
        match answer {
            Ok(answer) => {
                crypto.machine.mark_request_as_sent(&request.request_id, &answer)?;
                Ok(answer)
            }
            Err(e) => {
                // A refusal will not get better by repeating it; anything transient is
                // simply asked for again by the machine next time.
                if !e.is_transient() {
                    tracing::warn!(%e, path = %request.path(), "crypto request refused");
                    crypto.machine.discard_request(&request.request_id);
                }
                Err(e)
            }
        }
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
            .inner
            .store
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
