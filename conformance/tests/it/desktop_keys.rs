//! Where the desktop client keeps the key that seals its encryption store (`crypto.db`), as
//! the app uses it against the real homeserver: a passphrase (argon2id; a wrong one refused
//! without harm), the OS keyring through a real Secret Service on D-Bus (gnome-keyring, which
//! `scripts/with-secret-service` starts), the move of an earlier version's `crypto.key` into
//! the keyring, and that file kept working (never written) when there is no keyring.
//!
//! The Secret Service tests need a D-Bus session: without `DBUS_SESSION_BUS_ADDRESS` they
//! are skipped with a message, unless `OBMIN_REQUIRE_SECRET_SERVICE` is set (CI sets it
//! through `scripts/with-secret-service`): then they fail.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use ::e2ee::store::{KeyKind, Store as CryptoStore, StoreKey};
use conformance::{Backend, Server, backend_tests};
use obmin_client::{Client, Error, KEYRING_SERVICE, KeyState, KeyringHook, SecretServiceKeyring};
use serde_json::json;
use tempfile::TempDir;

use crate::desktop_core::{App, direct_chat};

backend_tests!(
    a_passphrase_seals_the_store_and_a_wrong_one_is_refused,
    a_legacy_key_file_keeps_working_without_a_keyring_and_is_never_written,
    the_store_key_lives_in_the_secret_service,
    a_legacy_key_file_moves_into_the_secret_service,
);

const PASSWORD: &str = "secret-pass";
const PASSPHRASE: &str = "correct horse battery staple";

/// Whether a D-Bus session is there for the Secret Service tests (see the module docs).
fn secret_service_session(test: &str) -> bool {
    if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("OBMIN_REQUIRE_SECRET_SERVICE").is_none(),
        "{test}: OBMIN_REQUIRE_SECRET_SERVICE is set but there is no D-Bus session"
    );
    eprintln!(
        "SKIPPED {test}: no D-Bus session (DBUS_SESSION_BUS_ADDRESS is unset); \
         run it under scripts/with-secret-service"
    );
    false
}

/// The device's identity keys as the server has them: (ed25519, curve25519), asked by a
/// bystander (`observer`: a token of another user, so the client's own device list stays as
/// it is).
async fn server_identity(server: &Server, observer: &str, client: &Client) -> (String, String) {
    let session = client.session().unwrap();
    let user = session.user_id.as_str();
    let answer =
        server.post("/_matrix/client/v3/keys/query", Some(observer), json!({ "device_keys": { user: [] } })).await;
    let device = &answer.assert_ok()["device_keys"][user][&session.device_id];
    let key = |algorithm: &str| {
        device["keys"][format!("{algorithm}:{}", session.device_id)]
            .as_str()
            .unwrap_or_else(|| panic!("the server has no {algorithm} key of the device: {device}"))
            .to_owned()
    };
    (key("ed25519"), key("curve25519"))
}

/// The identity keys in the store file, opened with `key` the way the app would.
async fn store_identity(dir: &Path, key: StoreKey) -> (String, String) {
    let store = CryptoStore::open(&dir.join("crypto.db"), key).await.expect("the store opens with the key");
    identity_of(store).await
}

async fn identity_of(store: CryptoStore) -> (String, String) {
    let machine = store.load().await.unwrap().expect("a machine in the store");
    store.close().await;
    (machine.ed25519_key(), machine.curve25519_key())
}

/// Bob and the client in `dir` (signed in as alice) exchange one message each way.
async fn messages_flow(alice: &App, bob: &App, room: &ruma::RoomId, tag: &str) {
    let to_bob = format!("alice to bob, {tag}");
    alice.client.send_text(room, &to_bob).await.unwrap();
    assert!(bob.wait_for_text(room, &to_bob).await.encrypted);
    let to_alice = format!("bob to alice, {tag}");
    bob.client.send_text(room, &to_alice).await.unwrap();
    assert!(alice.wait_for_text(room, &to_alice).await.encrypted);
}

/// Stops and drops a client (the app quits), keeping its data directory.
async fn quit(app: App) -> TempDir {
    app.client.stop().await;
    app.dir
}

async fn a_passphrase_seals_the_store_and_a_wrong_one_is_refused(backend: Backend) {
    let server = Server::start(backend).await;
    let observer = server.register("observer", PASSWORD).await.access_token;
    let bob = App::register(&server, "bob").await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::open_with_passphrase(dir.path()).await.unwrap();

    // First start: a passphrase to choose, and nothing signs in before it is given.
    assert_eq!(client.key_state().await.unwrap(), KeyState::NeedsPassphrase { new: true });
    assert_eq!(client.register(&server.base_url, "alice", PASSWORD, "Alice", None).await, Err(Error::Locked));
    assert!(matches!(client.unlock("short").await, Err(Error::InvalidInput(_))));
    client.unlock(PASSPHRASE).await.unwrap();
    assert_eq!(client.key_state().await.unwrap(), KeyState::Ready);
    client.register(&server.base_url, "alice", PASSWORD, "Alice", None).await.unwrap();
    client.start().unwrap();
    let alice = App { client, dir };
    let room = direct_chat(&alice, &bob).await;
    messages_flow(&alice, &bob, &room, "before the restart").await;
    let identity = server_identity(&server, &observer, &alice.client).await;
    let session = alice.client.session();
    let dir = quit(alice).await;

    // On disk: the store, sealed by the passphrase (salt in the file), and no key file.
    assert!(!dir.path().join("crypto.key").exists(), "no key file next to the store");
    let store_path = dir.path().join("crypto.db");
    assert_eq!(CryptoStore::key_kind(&store_path).await.unwrap(), Some(KeyKind::Passphrase));
    let store = CryptoStore::open_with_passphrase(&store_path, PASSPHRASE).await.unwrap();
    assert_eq!(identity_of(store).await, identity, "the store holds the identity the server knows");

    // On disk: the cache, sealed with a key derived from the passphrase's: no message and
    // not even who is signed in can be read from any file.
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let path = file.unwrap().path();
        // (A log may go as the last connection closes.)
        let Ok(bytes) = std::fs::read(&path) else { continue };
        for secret in ["before the restart", "@alice:localhost"] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} in {}", path.display());
        }
    }

    // A restart: a session is there, but locked until the passphrase is given (who is signed
    // in is in the sealed cache: not known before).
    let client = Client::open_with_passphrase(dir.path()).await.unwrap();
    assert_eq!(client.session(), None);
    assert_eq!(client.key_state().await.unwrap(), KeyState::NeedsPassphrase { new: false });
    assert_eq!(client.start(), Err(Error::Locked));
    // A wrong passphrase is refused with its own error, and changes nothing: still locked,
    // and the right one opens the same store afterwards.
    let wrong = client.unlock("correct horse battery stable").await;
    assert_eq!(wrong, Err(Error::WrongPassphrase));
    assert_eq!(wrong.unwrap_err().to_string(), "Wrong passphrase. Your encryption keys are unchanged; try again.");
    assert_eq!(client.unlock("").await, Err(Error::WrongPassphrase));
    assert_eq!(client.key_state().await.unwrap(), KeyState::NeedsPassphrase { new: false });
    assert_eq!(client.start(), Err(Error::Locked));
    assert_eq!(CryptoStore::key_kind(&store_path).await.unwrap(), Some(KeyKind::Passphrase));
    // A keyring offered later does not take over a store sealed by a passphrase.
    let keyring = Arc::new(MemoryKeyring::default());
    let with_keyring = Client::open_with_keyring(dir.path(), keyring.clone()).await.unwrap();
    assert_eq!(with_keyring.key_state().await.unwrap(), KeyState::NeedsPassphrase { new: false });
    assert!(keyring.0.lock().unwrap().is_none(), "nothing went into the keyring");
    drop(with_keyring);

    client.unlock(PASSPHRASE).await.unwrap();
    assert_eq!(client.key_state().await.unwrap(), KeyState::Ready);
    assert_eq!(client.session(), session);
    client.start().unwrap();
    let alice = App { client, dir };
    // The same device with the same keys: old sessions decrypt and new messages flow.
    messages_flow(&alice, &bob, &room, "after the restart").await;
    assert_eq!(server_identity(&server, &observer, &alice.client).await, identity);
    let dir = quit(alice).await;
    let store = CryptoStore::open_with_passphrase(&store_path, PASSPHRASE).await.unwrap();
    assert_eq!(identity_of(store).await, identity, "the device kept its identity keys");
    assert!(!dir.path().join("crypto.key").exists());
}

/// A keyring in memory: for a store whose keyring cannot be reached later.
#[derive(Default)]
struct MemoryKeyring(Mutex<Option<[u8; 32]>>);

impl KeyringHook for MemoryKeyring {
    fn load(&self) -> ::e2ee::Result<Option<[u8; 32]>> {
        Ok(*self.0.lock().unwrap())
    }
    fn save(&self, key: &[u8; 32]) -> ::e2ee::Result<()> {
        *self.0.lock().unwrap() = Some(*key);
        Ok(())
    }
    fn delete(&self) -> ::e2ee::Result<()> {
        *self.0.lock().unwrap() = None;
        Ok(())
    }
}

async fn a_legacy_key_file_keeps_working_without_a_keyring_and_is_never_written(backend: Backend) {
    let server = Server::start(backend).await;
    let observer = server.register("observer", PASSWORD).await.access_token;
    // An earlier version: the key in crypto.key.
    let legacy = App::register(&server, "carol").await;
    let identity = server_identity(&server, &observer, &legacy.client).await;
    let dir = quit(legacy).await;
    let key_file = dir.path().join("crypto.key");
    let legacy_key = std::fs::read(&key_file).expect("the earlier version's key file");

    // No keyring now: the file keeps opening its store, nothing is asked and nothing written.
    let client = Client::open_with_passphrase(dir.path()).await.unwrap();
    assert_eq!(client.key_state().await.unwrap(), KeyState::Ready);
    client.start().unwrap();
    client.sync_once().await.unwrap();
    assert_eq!(server_identity(&server, &observer, &client).await, identity);
    assert_eq!(std::fs::read(&key_file).unwrap(), legacy_key);

    // Signing out removes the store and its key file; the next sign-in needs a passphrase,
    // and its store is sealed with it.
    client.logout().await.unwrap();
    assert!(!key_file.exists(), "the key file went with its store");
    assert_eq!(client.key_state().await.unwrap(), KeyState::NeedsPassphrase { new: true });
    assert_eq!(client.login(&server.base_url, "carol", PASSWORD).await, Err(Error::Locked));
    client.unlock(PASSPHRASE).await.unwrap();
    client.login(&server.base_url, "carol", PASSWORD).await.unwrap();
    client.start().unwrap();
    client.sync_once().await.unwrap();
    assert!(!key_file.exists(), "no key file is written");
    let store_path = dir.path().join("crypto.db");
    assert_eq!(CryptoStore::key_kind(&store_path).await.unwrap(), Some(KeyKind::Passphrase));
    client.stop().await;
    drop(client);

    // A store whose key is in a keyring that is gone now: said so (not taken for a wrong
    // passphrase), nothing is written, and signing out starts afresh.
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(MemoryKeyring::default());
    let client = Client::open_with_keyring(dir.path(), keyring.clone()).await.unwrap();
    client.register(&server.base_url, "dave", PASSWORD, "Dave", None).await.unwrap();
    client.stop().await;
    drop(client);
    assert!(keyring.0.lock().unwrap().is_some(), "the key went into the keyring");
    assert!(!dir.path().join("crypto.key").exists());
    let client = Client::open_with_passphrase(dir.path()).await.unwrap();
    assert_eq!(client.key_state().await.unwrap(), KeyState::KeyringUnavailable);
    assert_eq!(client.unlock(PASSPHRASE).await, Err(Error::KeyringUnavailable));
    assert_eq!(client.start(), Err(Error::Locked));
    assert_eq!(client.open_encryption().await, Err(Error::KeyringUnavailable));
    let store_path = dir.path().join("crypto.db");
    assert_eq!(CryptoStore::key_kind(&store_path).await.unwrap(), Some(KeyKind::Kept), "no salt was added");
    client.logout().await.unwrap();
    assert_eq!(client.key_state().await.unwrap(), KeyState::NeedsPassphrase { new: true });
}

/// The secret the Secret Service holds for a data directory, read the way any Secret Service
/// client would (not through the app's code).
async fn secret_of(account: &str) -> Option<Vec<u8>> {
    use secret_service::{EncryptionType, SecretService};
    let service = SecretService::connect(EncryptionType::Dh).await.expect("the Secret Service answers");
    let found = service
        .search_items(HashMap::from([("service", KEYRING_SERVICE), ("account", account)]))
        .await
        .expect("search the Secret Service");
    let items: Vec<_> = found.unlocked.into_iter().chain(found.locked).collect();
    assert!(items.len() <= 1, "one entry per data directory, not {}", items.len());
    let item = items.into_iter().next()?;
    item.ensure_unlocked().await.unwrap();
    let attributes = item.get_attributes().await.unwrap();
    assert_eq!(attributes.get("service").map(String::as_str), Some(KEYRING_SERVICE));
    Some(item.get_secret().await.unwrap())
}

/// No file in `dir` contains `key`.
fn assert_not_on_disk(dir: &Path, key: &[u8]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(key.len()).any(|w| w == key), "the key is in {}", path.display());
        }
    }
}

async fn the_store_key_lives_in_the_secret_service(backend: Backend) {
    if !secret_service_session("the_store_key_lives_in_the_secret_service") {
        return;
    }
    let server = Server::start(backend).await;
    let observer = server.register("observer", PASSWORD).await.access_token;
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(SecretServiceKeyring::connect(dir.path()).expect("the Secret Service answers"));
    let account = keyring.account().to_owned();
    assert_eq!(Path::new(&account), std::fs::canonicalize(dir.path()).unwrap(), "one entry per data directory");
    assert_eq!(secret_of(&account).await, None);

    let client = Client::open_with_keyring(dir.path(), keyring.clone()).await.unwrap();
    assert_eq!(client.key_state().await.unwrap(), KeyState::Ready, "nothing to ask");
    client.register(&server.base_url, "erin", PASSWORD, "Erin", None).await.unwrap();
    client.start().unwrap();
    client.sync_once().await.unwrap();
    let identity = server_identity(&server, &observer, &client).await;
    let session = client.session();
    let dir = quit(App { client, dir }).await;

    // The key is in the Secret Service, and nowhere in the data directory.
    let key: [u8; 32] = secret_of(&account).await.expect("the key is in the keyring").try_into().expect("32 bytes");
    assert!(!dir.path().join("crypto.key").exists(), "no key file");
    assert_not_on_disk(dir.path(), &key);
    assert_eq!(store_identity(dir.path(), StoreKey::from_bytes(key)).await, identity, "that key seals the store");
    // Another data directory (another account) has an entry of its own, empty so far.
    let other = tempfile::tempdir().unwrap();
    assert_eq!(SecretServiceKeyring::connect(other.path()).unwrap().load().unwrap(), None);

    // A restart: nothing asked, the same device and keys.
    let client = Client::open_with_keyring(dir.path(), keyring.clone()).await.unwrap();
    assert_eq!(client.session(), session);
    assert_eq!(client.key_state().await.unwrap(), KeyState::Ready);
    client.start().unwrap();
    client.sync_once().await.unwrap();
    assert_eq!(server_identity(&server, &observer, &client).await, identity);
    assert_eq!(secret_of(&account).await.as_deref(), Some(&key[..]), "the same key, not a new one");

    // Signing out removes the store and its key from the keyring.
    client.logout().await.unwrap();
    assert_eq!(secret_of(&account).await, None, "the keyring forgot the key");
    assert!(!dir.path().join("crypto.db").exists());
}

async fn a_legacy_key_file_moves_into_the_secret_service(backend: Backend) {
    if !secret_service_session("a_legacy_key_file_moves_into_the_secret_service") {
        return;
    }
    let server = Server::start(backend).await;
    let observer = server.register("observer", PASSWORD).await.access_token;
    // An earlier version: the key in crypto.key.
    let legacy = App::register(&server, "frank").await;
    let identity = server_identity(&server, &observer, &legacy.client).await;
    let dir = quit(legacy).await;
    let key_file = dir.path().join("crypto.key");
    let legacy_key = std::fs::read(&key_file).expect("the earlier version's key file");

    // This version with the keyring: the key moves there and the file goes.
    let keyring = Arc::new(SecretServiceKeyring::connect(dir.path()).unwrap());
    let client = Client::open_with_keyring(dir.path(), keyring.clone()).await.unwrap();
    assert!(!key_file.exists(), "the key file is removed once the keyring holds the key");
    assert_eq!(secret_of(keyring.account()).await, Some(legacy_key.clone()), "the same key, moved");
    assert_eq!(client.key_state().await.unwrap(), KeyState::Ready);
    client.start().unwrap();
    client.sync_once().await.unwrap();
    assert_eq!(server_identity(&server, &observer, &client).await, identity, "the same device keys");
    client.stop().await;
    drop(client);
    let key: [u8; 32] = legacy_key.try_into().unwrap();
    assert_eq!(store_identity(dir.path(), StoreKey::from_bytes(key)).await, identity);

    // And the next start finds it there.
    let client = Client::open_with_keyring(dir.path(), keyring.clone()).await.unwrap();
    client.sync_once().await.unwrap();
    assert!(!key_file.exists());
    client.logout().await.unwrap();
    assert_eq!(secret_of(keyring.account()).await, None);
}
