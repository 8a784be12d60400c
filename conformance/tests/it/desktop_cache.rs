//! The desktop client's local cache (`client.db`: the access token, decrypted messages, the
//! outbox) at rest, against the real homeserver: after a session with encrypted messages and
//! a queued one, no message body and no access token can be found in any file of the data
//! directory (the database, its `-wal` and `-shm`, anything else), while the app runs and
//! after it quits; the cache opens with the key derived from the crypto store's and not
//! without it, nor with another device's; a plaintext cache of an earlier version (with
//! rows only in its write-ahead log and a message still queued) is encrypted at the first
//! start and nothing of it stays readable.

use std::path::{Path, PathBuf};

use ::e2ee::store::{Store as CryptoStore, StoreKey};
use conformance::{Backend, Server, backend_tests};
use obmin_client::{Client, Error, ItemContent, SendState};
use sqlx::{
    Row,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions},
};

use crate::desktop_core::{App, direct_chat, stop_server};

backend_tests!(
    nothing_secret_is_readable_in_the_data_directory,
    the_cache_opens_with_its_key_and_not_with_another,
    a_plaintext_cache_of_an_earlier_version_is_encrypted_at_the_first_start,
);

/// The label the client derives the cache key under from the crypto store's key. Pinned
/// here on purpose: a change would make every existing cache unreadable.
const CACHE_KEY_PURPOSE: &str = "obmin-client cache (SQLCipher)";
const SQLITE_HEADER: &[u8] = b"SQLite format 3\0";

/// The cache key of the data directory of a [`Client::open`] app (its crypto store is
/// sealed by `crypto.key`), derived as the client does.
pub(crate) async fn cache_key(dir: &Path) -> StoreKey {
    let key: [u8; 32] = std::fs::read(dir.join("crypto.key")).unwrap().try_into().unwrap();
    let store = CryptoStore::open(&dir.join("crypto.db"), StoreKey::from_bytes(key)).await.unwrap();
    let derived = store.derive_key(CACHE_KEY_PURPOSE);
    store.close().await;
    derived
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the cache file at `path` with `key` (None: as plain SQLite) and reads its schema,
/// which is where a wrong key shows.
pub(crate) async fn open_cache(path: &Path, key: Option<&StoreKey>) -> Result<SqlitePool, sqlx::Error> {
    let mut options = SqliteConnectOptions::new().filename(path);
    if let Some(key) = key {
        options = options.pragma("key", format!("\"x'{}'\"", hex(key.as_bytes())));
    }
    let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
    sqlx::query("SELECT count(*) FROM sqlite_master").fetch_one(&pool).await?;
    Ok(pool)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// No file under `dir` holds any of `secrets`, and the cache is not a plain SQLite file.
fn assert_nothing_readable(dir: &Path, secrets: &[&str], when: &str) {
    let files = files(dir);
    assert!(files.iter().any(|f| f.ends_with("client.db")), "{when}: there is a cache: {files:?}");
    for file in &files {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            // A log removed as the last connection closed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", file.display()),
        };
        for secret in secrets {
            assert!(!contains(&bytes, secret.as_bytes()), "{when}: {secret:?} is readable in {}", file.display());
        }
    }
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else { continue };
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(!bytes.starts_with(SQLITE_HEADER) || name.starts_with("crypto.db"), "{when}: {name} is plain SQLite");
        assert!(!name.contains(".plaintext") && !name.ends_with(".new"), "{when}: a migration leftover: {name}");
    }
}

fn text_in(items: &[obmin_client::TimelineItem], body: &str) -> bool {
    items.iter().any(|i| matches!(&i.content, ItemContent::Text { body: b } if b == body))
}

async fn nothing_secret_is_readable_in_the_data_directory(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;
    alice.client.send_text(&room, "alice-secret-first").await.unwrap();
    bob.wait_for_text(&room, "alice-secret-first").await;
    bob.client.send_text(&room, "bob-secret-answer").await.unwrap();
    alice.wait_for_text(&room, "bob-secret-answer").await;
    // A message queued in the outbox (its plaintext waits there for the server).
    stop_server(&mut server);
    let queued = alice.client.send_text(&room, "alice-secret-queued").await.unwrap();
    alice.wait_for_state(&room, &queued.key, SendState::Sending).await;

    // The token, as the cache holds it: it opens with the key derived from the crypto store.
    let cache =
        open_cache(&alice.dir.path().join("client.db"), Some(&cache_key(alice.dir.path()).await)).await.unwrap();
    let token: String = sqlx::query("SELECT access_token FROM session").fetch_one(&cache).await.unwrap().get(0);
    assert!(token.len() >= 16, "a real token: {token:?}");
    let (outbox,): (String,) = sqlx::query_as("SELECT content FROM outbox").fetch_one(&cache).await.unwrap();
    assert!(outbox.contains("alice-secret-queued"), "the outbox holds the message: {outbox}");
    cache.close().await;

    let secrets = ["alice-secret-first", "bob-secret-answer", "alice-secret-queued", token.as_str()];
    // While the apps run (the write-ahead log holds the newest pages) and after they quit.
    assert_nothing_readable(alice.dir.path(), &secrets, "alice running");
    assert_nothing_readable(bob.dir.path(), &secrets[..2], "bob running");
    alice.client.stop().await;
    bob.client.stop().await;
    let (alice_dir, bob_dir) = (alice.dir, bob.dir);
    drop((alice.client, bob.client));
    assert_nothing_readable(alice_dir.path(), &secrets, "alice quit");
    assert_nothing_readable(bob_dir.path(), &secrets[..2], "bob quit");
}

async fn the_cache_opens_with_its_key_and_not_with_another(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;
    alice.client.send_text(&room, "kept in the cache").await.unwrap();
    bob.wait_for_text(&room, "kept in the cache").await;
    let session = alice.client.session();
    alice.client.stop().await;
    bob.client.stop().await;
    let (alice_dir, bob_dir) = (alice.dir, bob.dir);
    drop((alice.client, bob.client));
    let cache_path = alice_dir.path().join("client.db");

    // Not as plain SQLite, not with a wrong key; with the derived one it reads.
    assert!(open_cache(&cache_path, None).await.is_err(), "the cache opened without a key");
    assert!(open_cache(&cache_path, Some(&StoreKey::random())).await.is_err(), "the cache opened with a wrong key");
    let cache = open_cache(&cache_path, Some(&cache_key(alice_dir.path()).await)).await.unwrap();
    let bodies: Vec<String> =
        sqlx::query("SELECT content FROM timeline").fetch_all(&cache).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(bodies.iter().any(|c| c.contains("kept in the cache")), "{bodies:?}");
    cache.close().await;

    // The app starts again: the session and the history come back from the cache.
    let restored = Client::open(alice_dir.path()).await.unwrap();
    assert_eq!(restored.session(), session);
    assert!(text_in(&restored.timeline(&room, 100).await.unwrap(), "kept in the cache"));
    drop(restored);

    // Alice's cache next to Bob's crypto store (another device's key): refused, untouched.
    let mixed = tempfile::tempdir().unwrap();
    for (from, name) in [(alice_dir.path(), "client.db"), (bob_dir.path(), "crypto.db"), (bob_dir.path(), "crypto.key")]
    {
        std::fs::copy(from.join(name), mixed.path().join(name)).unwrap();
    }
    let before = std::fs::read(mixed.path().join("client.db")).unwrap();
    let refused = Client::open(mixed.path()).await;
    assert!(
        matches!(refused, Err(Error::Store(_))),
        "opened with another device's key: {:?}",
        refused.map(|c| c.session())
    );
    assert_eq!(std::fs::read(mixed.path().join("client.db")).unwrap(), before, "the refused cache is unchanged");
}

async fn a_plaintext_cache_of_an_earlier_version_is_encrypted_at_the_first_start(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;
    alice.client.send_text(&room, "old-version-message").await.unwrap();
    bob.wait_for_text(&room, "old-version-message").await;
    bob.client.send_text(&room, "old-version-answer").await.unwrap();
    alice.wait_for_text(&room, "old-version-answer").await;
    stop_server(&mut server);
    let queued = alice.client.send_text(&room, "old-version-queued").await.unwrap();
    alice.wait_for_state(&room, &queued.key, SendState::Sending).await;
    let session = alice.client.session();
    alice.client.stop().await;
    let dir = alice.dir;
    drop(alice.client);

    // The cache as an earlier version left it: the same tables, in plain SQLite, in WAL mode,
    // with a row only in the write-ahead log (the app was killed before a checkpoint).
    let cache_path = dir.path().join("client.db");
    let legacy_dir = tempfile::tempdir().unwrap();
    let legacy = legacy_dir.path().join("legacy.db");
    // (An empty file is an empty database; the connections here may not create files.)
    std::fs::File::create(&legacy).unwrap();
    if std::fs::read(&cache_path).unwrap().starts_with(SQLITE_HEADER) {
        // (A build whose cache is plaintext already: a copy of it is what we need.)
        let cache = open_cache(&cache_path, None).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM INTO '{}'", legacy.display()))).execute(&cache).await.unwrap();
        cache.close().await;
    } else {
        let cache = open_cache(&cache_path, Some(&cache_key(dir.path()).await)).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("ATTACH DATABASE '{}' AS plaintext KEY ''", legacy.display())))
            .execute(&cache)
            .await
            .unwrap();
        sqlx::query("SELECT sqlcipher_export('plaintext')").execute(&cache).await.unwrap();
        cache.close().await;
    }
    let plain = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(&legacy).journal_mode(SqliteJournalMode::Wal))
        .await
        .unwrap();
    sqlx::query("PRAGMA wal_autocheckpoint = 0").execute(&plain).await.unwrap();
    sqlx::query(
        "INSERT INTO timeline (room_id, item_key, event_id, sender, ts, content, encrypted)
         VALUES (?, '$only-in-the-wal', '$only-in-the-wal', '@bob:localhost', 1, ?, 1)",
    )
    .bind(room.as_str())
    .bind(r#"{"kind":"text","body":"old-version-in-the-wal"}"#)
    .execute(&plain)
    .await
    .unwrap();
    for suffix in ["-wal", "-shm", ""] {
        let _ = std::fs::remove_file(dir.path().join(format!("client.db{suffix}")));
    }
    for suffix in ["", "-wal", "-shm"] {
        std::fs::copy(
            legacy_dir.path().join(format!("legacy.db{suffix}")),
            dir.path().join(format!("client.db{suffix}")),
        )
        .unwrap();
    }
    plain.close().await;
    drop(legacy_dir);
    // The set-up is what it claims: plaintext in the database and only in its log.
    let planted = |suffix: &str| std::fs::read(dir.path().join(format!("client.db{suffix}"))).unwrap();
    assert!(planted("").starts_with(SQLITE_HEADER));
    assert!(contains(&planted(""), b"old-version-message"));
    assert!(contains(&planted("-wal"), b"old-version-in-the-wal"));
    assert!(!contains(&planted(""), b"old-version-in-the-wal"));

    // The new version starts: the cache is encrypted, nothing of it was lost.
    server.restart().await;
    let client = Client::open(dir.path()).await.unwrap();
    assert_eq!(client.session(), session);
    let items = client.timeline(&room, 100).await.unwrap();
    for body in ["old-version-message", "old-version-answer", "old-version-queued", "old-version-in-the-wal"] {
        assert!(text_in(&items, body), "{body} survived the migration: {items:?}");
    }
    let secrets = ["old-version-message", "old-version-answer", "old-version-queued", "old-version-in-the-wal"];
    assert_nothing_readable(dir.path(), &secrets, "after the migration");

    // The queued message is still queued, and goes out.
    client.start().unwrap();
    let alice = App { client, dir };
    alice.wait_for_state(&room, &queued.key, SendState::Sent).await;
    bob.wait_for_text(&room, "old-version-queued").await;
    alice.client.stop().await;
    let dir = alice.dir;
    drop(alice.client);
    assert_nothing_readable(dir.path(), &secrets, "after the migration and a session");
}
