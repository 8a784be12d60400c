//! Persistence: a local SQLite file (sqlx, as the homeserver uses) holding the whole machine.
//!
//! Everything is sealed with keys derived from one 32-byte store key: values with
//! XChaCha20-Poly1305 (random 192-bit nonces, the row's identity as associated data so rows
//! cannot be swapped), row ids as HMAC-SHA-256 of the room/user/session ids. vodozemac's
//! pickles go inside the sealed values. The key comes from the caller (e.g. the OS keyring)
//! or from a passphrase through argon2id ([`StoreKey::from_passphrase`]).
//!
//! [`Store::save`] writes only what changed since the last save, in one transaction.

use std::{collections::BTreeMap, path::Path};

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use hmac::{Hmac, Mac};
use rand::RngCore;
use ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::Sha256;
use sqlx::{
    Row,
    sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions},
};
use vodozemac::{
    megolm::{GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle},
    olm::{Account as OlmAccount, AccountPickle, Session, SessionPickle},
};
use zeroize::Zeroizing;

use crate::{
    account::Account,
    devices::{CrossSigningKeys, Device},
    error::{CorruptRecord, Error, Result, StoreError},
    machine::OlmMachine,
    megolm::{InboundMeta, InboundSession, OutboundMeta, OutboundSession},
    olm::StoredSession,
};

/// The 32-byte key everything in the store is sealed with.
#[derive(Clone)]
pub struct StoreKey(Zeroizing<[u8; 32]>);

impl StoreKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh random key (for a caller that keeps it in the OS keyring).
    pub fn random() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(key.as_mut());
        Self(key)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// argon2id (19 MiB, 2 passes: OWASP's minimum for argon2id) over the passphrase.
    pub fn from_passphrase(passphrase: &str, salt: &[u8]) -> Result<Self> {
        let params = argon2::Params::new(19 * 1024, 2, 1, Some(32)).map_err(StoreError::KeyDerivation)?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon.hash_password_into(passphrase.as_bytes(), salt, key.as_mut()).map_err(StoreError::KeyDerivation)?;
        Ok(Self(key))
    }

    fn derive(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}

/// Where the caller keeps the store key outside the store: the OS keyring (Secret Service,
/// Keychain, Credential Manager) in the desktop client. The crate has no keyring code of its
/// own; the client implements this over the platform's API.
pub trait KeyringHook {
    /// The saved key, if there is one.
    fn load(&self) -> Result<Option<[u8; 32]>>;
    /// Saves a newly made key; called before the store is created with it.
    fn save(&self, key: &[u8; 32]) -> Result<()>;
    /// Forgets the key (its store was removed). Forgetting a key that is not there is fine.
    fn delete(&self) -> Result<()>;
}

/// How a store's key is made, as its file says (see [`Store::key_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Derived from a passphrase (the file holds the salt).
    Passphrase,
    /// A key the caller keeps (OS keyring, key file).
    Kept,
}

struct Cipher {
    aead: XChaCha20Poly1305,
    id_key: Zeroizing<[u8; 32]>,
}

impl Cipher {
    fn new(key: &StoreKey) -> Self {
        let enc = key.derive("obmin-e2ee store: values");
        Self { aead: XChaCha20Poly1305::new(&(*enc).into()), id_key: key.derive("obmin-e2ee store: ids") }
    }

    fn row_id(&self, kind: &str, id: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.id_key.as_ref()).expect("HMAC takes any key length");
        mac.update(kind.as_bytes());
        mac.update(&[0]);
        mac.update(id.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    fn seal(&self, kind: &str, row_id: &[u8], value: &impl Serialize) -> Result<Vec<u8>> {
        let plaintext = Zeroizing::new(serde_json::to_vec(value)?);
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let aad = [kind.as_bytes(), row_id].concat();
        let mut sealed = nonce.to_vec();
        let ciphertext = self
            .aead
            .encrypt(&XNonce::from(nonce), Payload { msg: &plaintext, aad: &aad })
            .map_err(StoreError::Seal)?;
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    fn open<T: DeserializeOwned>(&self, kind: &str, row_id: &[u8], sealed: &[u8]) -> Result<T> {
        if sealed.len() < 24 {
            return Err(StoreError::Corrupt(CorruptRecord::TooShort).into());
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().expect("split at 24");
        let aad = [kind.as_bytes(), row_id].concat();
        let plaintext = Zeroizing::new(
            self.aead
                .decrypt(&XNonce::from(nonce), Payload { msg: ciphertext, aad: &aad })
                .map_err(|_| StoreError::Corrupt(CorruptRecord::DoesNotOpen { kind: kind.to_owned() }))?,
        );
        serde_json::from_slice(&plaintext)
            .map_err(|source| StoreError::Corrupt(CorruptRecord::Undecodable { kind: kind.to_owned(), source }).into())
    }
}

const KEY_CHECK: &str = "obmin-e2ee store key check";

#[derive(Serialize, Deserialize)]
struct AccountRecord {
    pickle: AccountPickle,
    user_id: OwnedUserId,
    device_id: OwnedDeviceId,
    shared: bool,
    server_otk_count: Option<u64>,
    needs_fallback_key: bool,
}

#[derive(Serialize, Deserialize)]
struct SessionRecord {
    sender_key: String,
    pickle: SessionPickle,
    created_ms: u64,
    last_received_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct InboundRecord {
    pickle: InboundGroupSessionPickle,
    meta: InboundMeta,
}

#[derive(Serialize, Deserialize)]
struct OutboundRecord {
    pickle: GroupSessionPickle,
    meta: OutboundMeta,
}

#[derive(Serialize, Deserialize)]
struct UserRecord {
    user_id: OwnedUserId,
    devices: BTreeMap<OwnedDeviceId, Device>,
    tracked: Option<u64>,
    fresh: Option<u64>,
    cross_signing: Option<CrossSigningKeys>,
}

#[derive(Serialize, Deserialize)]
struct ReplayRecord {
    session_id: String,
    index: u32,
    event_id: String,
    ts: u64,
}

/// Flows in progress: open room key requests and wedged-session recoveries (small, so written
/// whole at every save).
#[derive(Serialize, Deserialize, Default)]
struct FlowsRecord {
    key_requests: Vec<(OwnedRoomId, String, String)>,
    pending_recovery: Vec<(String, OwnedUserId)>,
    recovered_at: Vec<(String, u64)>,
}

pub struct Store {
    pool: SqlitePool,
    cipher: Cipher,
    key: StoreKey,
}

impl Store {
    /// Opens (creating if needed) the store at `path` with a key the caller keeps (keyring).
    /// A store created with another key is refused with [`StoreError::WrongKey`].
    pub async fn open(path: &Path, key: StoreKey) -> Result<Self> {
        let pool = Self::pool(path).await?;
        Self::with_pool(pool, key).await
    }

    /// Opens the store with the key from `keyring`, making and saving a random key on first
    /// use. A key saved but then lost from the keyring leaves the store unopenable by design.
    /// `Sync` because the reference lives in this future: without it the future is not `Send`
    /// and cannot run on a multi-threaded runtime (the desktop app's async commands).
    pub async fn open_with_keyring(path: &Path, keyring: &(dyn KeyringHook + Sync)) -> Result<Self> {
        let key = match keyring.load()? {
            Some(bytes) => StoreKey::from_bytes(bytes),
            None => {
                let key = StoreKey::random();
                keyring.save(key.as_bytes())?;
                key
            }
        };
        Self::open(path, key).await
    }

    /// Opens the store with a passphrase: the argon2id salt is kept in the file. A wrong
    /// passphrase is refused with [`StoreError::WrongKey`], a store whose key is kept elsewhere
    /// (made by [`Store::open`] / [`Store::open_with_keyring`]) with
    /// [`StoreError::NotAPassphraseStore`]; neither changes the file.
    pub async fn open_with_passphrase(path: &Path, passphrase: &str) -> Result<Self> {
        let pool = Self::pool(path).await?;
        let salt = match Self::read_salt(&pool).await? {
            Some(salt) => salt,
            None if Self::has_key_check(&pool).await? => {
                pool.close().await;
                return Err(StoreError::NotAPassphraseStore.into());
            }
            None => {
                let mut salt = vec![0u8; 16];
                rand::rng().fill_bytes(&mut salt);
                sqlx::query("INSERT INTO plain_meta (name, value) VALUES ('kdf_salt', $1)")
                    .bind(&salt)
                    .execute(&pool)
                    .await?;
                salt
            }
        };
        // argon2 is deliberately slow: keep it off the async executor's threads.
        let passphrase = Zeroizing::new(passphrase.to_owned());
        let key = tokio_blocking(move || StoreKey::from_passphrase(&passphrase, &salt))?;
        Self::with_pool(pool, key).await
    }

    /// How the store at `path` is keyed, without opening it: `None` when there is no store
    /// there yet (or it was never opened with a key).
    pub async fn key_kind(path: &Path) -> Result<Option<KeyKind>> {
        if !path.exists() {
            return Ok(None);
        }
        let pool = Self::pool(path).await?;
        let kind = if Self::read_salt(&pool).await?.is_some() {
            Some(KeyKind::Passphrase)
        } else if Self::has_key_check(&pool).await? {
            Some(KeyKind::Kept)
        } else {
            None
        };
        pool.close().await;
        Ok(kind)
    }

    async fn read_salt(pool: &SqlitePool) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query("SELECT value FROM plain_meta WHERE name = 'kdf_salt'")
            .fetch_optional(pool)
            .await?
            .map(|r| r.get(0)))
    }

    async fn has_key_check(pool: &SqlitePool) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM plain_meta WHERE name = 'key_check'").fetch_optional(pool).await?.is_some())
    }

    async fn pool(path: &Path) -> Result<SqlitePool> {
        // `filename` takes the path as is (a URL would need escaping for spaces or `?`).
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(StoreError::Migration)?;
        Ok(pool)
    }

    async fn with_pool(pool: SqlitePool, key: StoreKey) -> Result<Self> {
        let store = Self { pool, cipher: Cipher::new(&key), key };
        // The check value sits at a fixed row (row ids depend on the key, so a wrong key
        // would otherwise just see an empty store).
        let check: Option<Vec<u8>> = sqlx::query("SELECT value FROM plain_meta WHERE name = 'key_check'")
            .fetch_optional(&store.pool)
            .await?
            .map(|r| r.get(0));
        match check {
            Some(sealed) => {
                let opened: Option<String> = store.cipher.open("key_check", b"", &sealed).ok();
                if opened.as_deref() != Some(KEY_CHECK) {
                    store.pool.close().await;
                    return Err(Error::Store(StoreError::WrongKey));
                }
            }
            None => {
                let sealed = store.cipher.seal("key_check", b"", &KEY_CHECK)?;
                sqlx::query("INSERT INTO plain_meta (name, value) VALUES ('key_check', $1)")
                    .bind(&sealed)
                    .execute(&store.pool)
                    .await?;
            }
        }
        Ok(store)
    }

    async fn get<T: DeserializeOwned>(&self, kind: &str, id: &str) -> Result<Option<T>> {
        let row_id = self.cipher.row_id(kind, id);
        let row = sqlx::query("SELECT value FROM records WHERE kind = $1 AND id = $2")
            .bind(kind)
            .bind(&row_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| self.cipher.open(kind, &row_id, &r.get::<Vec<u8>, _>(0))).transpose()
    }

    async fn all<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>> {
        let rows =
            sqlx::query("SELECT id, value FROM records WHERE kind = $1").bind(kind).fetch_all(&self.pool).await?;
        rows.iter().map(|r| self.cipher.open(kind, &r.get::<Vec<u8>, _>(0), &r.get::<Vec<u8>, _>(1))).collect()
    }

    async fn put(&self, tx: &mut sqlx::SqliteConnection, kind: &str, id: &str, value: &impl Serialize) -> Result<()> {
        let row_id = self.cipher.row_id(kind, id);
        let sealed = self.cipher.seal(kind, &row_id, value)?;
        sqlx::query("INSERT INTO records (kind, id, value) VALUES ($1, $2, $3) ON CONFLICT (kind, id) DO UPDATE SET value = excluded.value")
            .bind(kind)
            .bind(&row_id)
            .bind(&sealed)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    async fn delete(&self, tx: &mut sqlx::SqliteConnection, kind: &str, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM records WHERE kind = $1 AND id = $2")
            .bind(kind)
            .bind(self.cipher.row_id(kind, id))
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Writes what changed in `machine` since the last save, atomically; the change sets are
    /// cleared only after the commit.
    pub async fn save(&self, machine: &mut OlmMachine) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if machine.account_changed {
            self.save_account(&mut tx, machine).await?;
        }
        self.save_flows(&mut tx, machine).await?;
        self.save_olm_sessions(&mut tx, machine).await?;
        self.save_group_sessions(&mut tx, machine).await?;
        self.save_users(&mut tx, machine).await?;
        self.save_replay_marks(&mut tx, machine).await?;
        tx.commit().await?;
        machine.account_changed = false;
        machine.sessions.changed.clear();
        machine.groups.changed_inbound.clear();
        machine.groups.changed_outbound.clear();
        machine.groups.replay.changed.clear();
        machine.devices.changed.clear();
        Ok(())
    }

    /// The account with our cross-signing and backup keys.
    async fn save_account(&self, tx: &mut sqlx::SqliteConnection, machine: &OlmMachine) -> Result<()> {
        let a = &machine.account;
        let record = AccountRecord {
            pickle: a.pickle(),
            user_id: a.user_id.clone(),
            device_id: a.device_id.clone(),
            shared: a.shared,
            server_otk_count: a.server_otk_count,
            needs_fallback_key: a.needs_fallback_key,
        };
        self.put(tx, "meta", "account", &record).await?;
        self.put(tx, "meta", "cross_signing", &machine.cross_signing).await?;
        self.put(tx, "meta", "backup", &machine.backup).await
    }

    /// Key requests and wedged-session recovery in progress.
    async fn save_flows(&self, tx: &mut sqlx::SqliteConnection, machine: &OlmMachine) -> Result<()> {
        let flows = FlowsRecord {
            key_requests: machine
                .key_requests
                .outgoing
                .iter()
                .map(|((r, s), id)| (r.clone(), s.clone(), id.clone()))
                .collect(),
            pending_recovery: machine.pending_recovery.iter().map(|(k, u)| (k.clone(), u.clone())).collect(),
            recovered_at: machine.recovered_at.iter().map(|(k, t)| (k.clone(), *t)).collect(),
        };
        self.put(tx, "meta", "flows", &flows).await
    }

    async fn save_olm_sessions(&self, tx: &mut sqlx::SqliteConnection, machine: &OlmMachine) -> Result<()> {
        for (sender_key, session_id) in &machine.sessions.changed {
            let Some(stored) = machine
                .sessions
                .by_key
                .get(sender_key)
                .and_then(|s| s.iter().find(|s| s.session.session_id() == *session_id))
            else {
                continue;
            };
            let record = SessionRecord {
                sender_key: sender_key.clone(),
                pickle: stored.session.pickle(),
                created_ms: stored.created_ms,
                last_received_ms: stored.last_received_ms,
            };
            self.put(tx, "olm_session", &format!("{sender_key}|{session_id}"), &record).await?;
        }
        Ok(())
    }

    /// Changed inbound Megolm sessions, and outbound ones (a dropped one is deleted).
    async fn save_group_sessions(&self, tx: &mut sqlx::SqliteConnection, machine: &OlmMachine) -> Result<()> {
        for key in &machine.groups.changed_inbound {
            let Some(session) = machine.groups.inbound.get(key) else { continue };
            let record = InboundRecord {
                pickle: session.inner.pickle(),
                meta: InboundMeta {
                    room_id: session.room_id.clone(),
                    sender_key: session.sender_key.clone(),
                    signing_key: session.signing_key.clone(),
                    backed_up: session.backed_up,
                },
            };
            self.put(tx, "inbound_group", &format!("{}|{}", key.0, key.1), &record).await?;
        }
        for room_id in &machine.groups.changed_outbound {
            match machine.groups.outbound.get(room_id) {
                Some(session) => {
                    let record = OutboundRecord {
                        pickle: session.inner.pickle(),
                        meta: OutboundMeta {
                            room_id: session.room_id.clone(),
                            created_ms: session.created_ms,
                            message_count: session.message_count,
                            settings: session.settings,
                            shared_with: session.shared_with.clone(),
                            withheld: session.withheld.clone(),
                        },
                    };
                    self.put(tx, "outbound_group", room_id.as_str(), &record).await?;
                }
                None => self.delete(tx, "outbound_group", room_id.as_str()).await?,
            }
        }
        Ok(())
    }

    /// Changed users' devices and tracking (an untracked user without devices is deleted).
    async fn save_users(&self, tx: &mut sqlx::SqliteConnection, machine: &OlmMachine) -> Result<()> {
        for user_id in &machine.devices.changed {
            let devices = machine.devices.devices.get(user_id).cloned().unwrap_or_default();
            let tracked = machine.devices.tracked.get(user_id).copied();
            if devices.is_empty() && tracked.is_none() {
                self.delete(tx, "user", user_id.as_str()).await?;
                continue;
            }
            let record = UserRecord {
                user_id: user_id.clone(),
                devices,
                tracked,
                fresh: machine.devices.fresh.get(user_id).copied(),
                cross_signing: machine.devices.cross_signing.get(user_id).cloned(),
            };
            self.put(tx, "user", user_id.as_str(), &record).await?;
        }
        Ok(())
    }

    /// Megolm message indexes seen, for replay detection across restarts.
    async fn save_replay_marks(&self, tx: &mut sqlx::SqliteConnection, machine: &OlmMachine) -> Result<()> {
        for (session_id, index) in &machine.groups.replay.changed {
            let Some((event_id, ts)) = machine.groups.replay.seen.get(&(session_id.clone(), *index)) else { continue };
            let record =
                ReplayRecord { session_id: session_id.clone(), index: *index, event_id: event_id.clone(), ts: *ts };
            self.put(tx, "replay", &format!("{session_id}|{index}"), &record).await?;
        }
        Ok(())
    }

    /// The machine saved in this store, or `None` for a new store.
    pub async fn load(&self) -> Result<Option<OlmMachine>> {
        let Some(record) = self.get::<AccountRecord>("meta", "account").await? else { return Ok(None) };
        let account = Account {
            inner: OlmAccount::from_pickle(record.pickle),
            user_id: record.user_id,
            device_id: record.device_id,
            shared: record.shared,
            server_otk_count: record.server_otk_count,
            needs_fallback_key: record.needs_fallback_key,
        };
        let mut machine = OlmMachine::from_parts(account);
        machine.cross_signing = self.get("meta", "cross_signing").await?.flatten();
        machine.backup = self.get("meta", "backup").await?.flatten();
        let flows: FlowsRecord = self.get("meta", "flows").await?.unwrap_or_default();
        machine.key_requests.outgoing = flows.key_requests.into_iter().map(|(r, s, id)| ((r, s), id)).collect();
        machine.pending_recovery = flows.pending_recovery.into_iter().collect();
        machine.recovered_at = flows.recovered_at.into_iter().collect();
        for record in self.all::<SessionRecord>("olm_session").await? {
            machine.sessions.by_key.entry(record.sender_key).or_default().push(StoredSession {
                session: Session::from_pickle(record.pickle),
                created_ms: record.created_ms,
                last_received_ms: record.last_received_ms,
            });
        }
        for record in self.all::<InboundRecord>("inbound_group").await? {
            let session = InboundSession {
                inner: InboundGroupSession::from_pickle(record.pickle),
                room_id: record.meta.room_id,
                sender_key: record.meta.sender_key,
                signing_key: record.meta.signing_key,
                backed_up: record.meta.backed_up,
            };
            machine.groups.inbound.insert((session.room_id.clone(), session.inner.session_id()), session);
        }
        for record in self.all::<OutboundRecord>("outbound_group").await? {
            let m = record.meta;
            let room_id: OwnedRoomId = m.room_id.clone();
            machine.groups.outbound.insert(
                room_id.clone(),
                OutboundSession {
                    inner: GroupSession::from_pickle(record.pickle),
                    room_id,
                    created_ms: m.created_ms,
                    message_count: m.message_count,
                    settings: m.settings,
                    shared_with: m.shared_with,
                    withheld: m.withheld,
                },
            );
        }
        for record in self.all::<UserRecord>("user").await? {
            let user = record.user_id;
            if !record.devices.is_empty() {
                machine.devices.devices.insert(user.clone(), record.devices);
            }
            match record.tracked {
                Some(counter) => machine.devices.tracked.insert(user.clone(), counter),
                None => machine.devices.tracked.remove(&user),
            };
            if let Some(fresh) = record.fresh {
                machine.devices.fresh.insert(user.clone(), fresh);
            }
            if let Some(keys) = record.cross_signing {
                machine.devices.cross_signing.insert(user, keys);
            }
        }
        for record in self.all::<ReplayRecord>("replay").await? {
            machine.groups.replay.seen.insert((record.session_id, record.index), (record.event_id, record.ts));
        }
        machine.account_changed = false;
        machine.devices.changed.clear();
        Ok(Some(machine))
    }

    pub async fn close(self) {
        self.pool.close().await;
    }

    /// A key for another file of the same owner, derived from this store's key (HMAC-SHA-256
    /// over `purpose`, as the store's own value and id keys are): one key in the keyring, or
    /// one passphrase, opens both, and neither file's key is the other's. The desktop client
    /// seals its cache with it. Only a store that opened (the key checked) gives one.
    pub fn derive_key(&self, purpose: &str) -> StoreKey {
        StoreKey(self.key.derive(purpose))
    }
}

/// Runs CPU-heavy work off the async threads when inside a multi-threaded tokio runtime.
fn tokio_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use ruma::room_id;
    use serde_json::json;

    use super::*;
    use crate::{EncryptionSettings, MegolmError, tests::FakeServer};

    #[tokio::test]
    async fn a_reloaded_machine_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a store? with #odd name.db");
        let key = StoreKey::random();
        let mut server = FakeServer::default();
        let mut alice = OlmMachine::new("@alice:localhost".try_into().unwrap(), "ALICE1".into());
        let mut bob = OlmMachine::new("@bob:localhost".try_into().unwrap(), "BOB1".into());
        server.flush(&mut alice);
        server.flush(&mut bob);
        alice.update_tracked_users([bob.user_id().to_owned()]);
        server.flush(&mut alice);
        let room = room_id!("!room:localhost");
        let members = vec![alice.user_id().to_owned(), bob.user_id().to_owned()];
        let claim = alice.get_missing_sessions(&members).unwrap();
        server.send(&mut alice, &claim);
        for r in alice.share_room_key(room, &members, EncryptionSettings::default()).unwrap() {
            server.send(&mut alice, &r);
        }
        let first = alice.encrypt_room_event(room, "m.room.message", json!({"body": "one"})).unwrap();

        let store = Store::open(&path, key.clone()).await.unwrap();
        store.save(&mut alice).await.unwrap();
        store.close().await;
        let (identity, device_keys) = (alice.curve25519_key(), alice.device_keys().unwrap());
        drop(alice);

        let store = Store::open(&path, key.clone()).await.unwrap();
        let mut alice = store.load().await.unwrap().expect("saved machine");
        assert_eq!(alice.curve25519_key(), identity);
        assert_eq!(alice.device_keys().unwrap(), device_keys);
        // Nothing to upload again, Bob's device known and already holding the key.
        assert!(alice.outgoing_requests().unwrap().is_empty());
        assert!(alice.get_missing_sessions(&members).is_none());
        assert!(alice.share_room_key(room, &members, EncryptionSettings::default()).unwrap().is_empty());
        let second = alice.encrypt_room_event(room, "m.room.message", json!({"body": "two"})).unwrap();
        assert_eq!(first["session_id"], second["session_id"]);

        server.sync(&mut bob);
        let event = |content: &serde_json::Value, id: &str| json!({"type": "m.room.encrypted", "sender": "@alice:localhost", "event_id": id, "origin_server_ts": 1, "content": content});
        assert_eq!(bob.decrypt_room_event(room, &event(&second, "$2")).unwrap().event["content"]["body"], "two");
        assert_eq!(alice.decrypt_room_event(room, &event(&first, "$1")).unwrap().event["content"]["body"], "one");
        // Replay records and open key requests survive a restart.
        assert!(alice.request_room_key(room_id!("!elsewhere:localhost"), "missing").is_some());
        store.save(&mut alice).await.unwrap();
        store.close().await;
        let store = Store::open(&path, key).await.unwrap();
        let mut alice = store.load().await.unwrap().unwrap();
        assert!(matches!(
            alice.decrypt_room_event(room, &event(&first, "$other")),
            Err(Error::Megolm(MegolmError::Replay { .. }))
        ));
        assert!(alice.request_room_key(room_id!("!elsewhere:localhost"), "missing").is_none(), "asked already");
        store.close().await;

        // Nothing readable in the file.
        let bytes = std::fs::read(&path).unwrap();
        for needle in ["alice", "!room", "ALICE1", identity.as_str()] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} is in the store file");
        }
    }

    #[tokio::test]
    async fn wrong_key_and_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open_with_passphrase(&path, "correct horse").await.unwrap();
        let mut machine = OlmMachine::new("@a:localhost".try_into().unwrap(), "D".into());
        store.save(&mut machine).await.unwrap();
        store.close().await;
        assert_eq!(Store::key_kind(&path).await.unwrap(), Some(KeyKind::Passphrase));
        let before = std::fs::read(&path).unwrap();
        let wrong = Store::open_with_passphrase(&path, "wrong horse").await;
        assert!(matches!(wrong, Err(Error::Store(StoreError::WrongKey))), "{:?}", wrong.err());
        assert!(matches!(Store::open(&path, StoreKey::random()).await, Err(Error::Store(StoreError::WrongKey))));
        assert_eq!(std::fs::read(&path).unwrap(), before, "a wrong key changes nothing");
        let store = Store::open_with_passphrase(&path, "correct horse").await.unwrap();
        assert_eq!(store.load().await.unwrap().unwrap().ed25519_key(), machine.ed25519_key());
        store.close().await;
    }

    #[tokio::test]
    async fn a_passphrase_does_not_open_or_touch_a_store_with_a_kept_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kept.db");
        assert_eq!(Store::key_kind(&path).await.unwrap(), None);
        assert!(!path.exists(), "asking does not create a store");
        let key = StoreKey::random();
        Store::open(&path, key.clone()).await.unwrap().close().await;
        assert_eq!(Store::key_kind(&path).await.unwrap(), Some(KeyKind::Kept));
        let refused = Store::open_with_passphrase(&path, "anything").await;
        assert!(matches!(refused, Err(Error::Store(StoreError::NotAPassphraseStore))), "{:?}", refused.err());
        // No salt was written: the store still says it is keyed from outside and opens so.
        assert_eq!(Store::key_kind(&path).await.unwrap(), Some(KeyKind::Kept));
        Store::open(&path, key).await.unwrap().close().await;
    }

    #[tokio::test]
    async fn keyring_hook_makes_saves_and_reuses_the_key() {
        struct Memory(std::sync::Mutex<Option<[u8; 32]>>);
        impl KeyringHook for Memory {
            fn load(&self) -> Result<Option<[u8; 32]>> {
                Ok(*self.0.lock().unwrap())
            }
            fn save(&self, key: &[u8; 32]) -> Result<()> {
                *self.0.lock().unwrap() = Some(*key);
                Ok(())
            }
            fn delete(&self) -> Result<()> {
                *self.0.lock().unwrap() = None;
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let keyring = Memory(std::sync::Mutex::new(None));
        let store = Store::open_with_keyring(&path, &keyring).await.unwrap();
        let mut machine = OlmMachine::new("@a:localhost".try_into().unwrap(), "D".into());
        store.save(&mut machine).await.unwrap();
        store.close().await;
        assert!(keyring.0.lock().unwrap().is_some(), "the new key was saved");
        let store = Store::open_with_keyring(&path, &keyring).await.unwrap();
        assert_eq!(store.load().await.unwrap().unwrap().ed25519_key(), machine.ed25519_key());
        store.close().await;
        let lost = Memory(std::sync::Mutex::new(None));
        assert!(matches!(Store::open_with_keyring(&path, &lost).await, Err(Error::Store(StoreError::WrongKey))));
    }

    #[test]
    fn passphrase_derivation_is_deterministic_and_salted() {
        let a = StoreKey::from_passphrase("pw", b"salt-salt-salt-1").unwrap();
        let b = StoreKey::from_passphrase("pw", b"salt-salt-salt-1").unwrap();
        let c = StoreKey::from_passphrase("pw", b"salt-salt-salt-2").unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes(), c.as_bytes());
    }
}
