//! Measures the two ways to encrypt the desktop cache (`client.db`) on the operations that
//! matter to the user: opening the cache, opening a room's timeline, and applying a sync
//! batch. Three variants over the real schema (`migrations/`) and the store's own queries:
//!
//! * `plain`: no encryption (the cache before this change);
//! * `sqlcipher`: page-level encryption (SQLCipher, raw 256-bit key; what the client uses);
//! * `aead`: per-field XChaCha20-Poly1305 of the secret columns (`content`, `raw`), the rest
//!   (room, user and event ids, timestamps) left in the clear.
//!
//! `cargo run -p obmin-client --example cache_bench [ROOMS] [MESSAGES_PER_ROOM]` (defaults 20
//! and 2000): prints medians in milliseconds. It writes to a temporary directory only.
//! Dependencies are built with optimisations in the dev profile, so a debug build measures the
//! cryptography and SQLite at speed.

use std::{
    path::Path,
    str::FromStr,
    time::{Duration, Instant},
};

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use rand::RngCore;
use sqlx::{
    Row,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Plain,
    SqlCipher,
    Aead,
}

const KEY: [u8; 32] = [0x42; 32];
const TIMELINE_WINDOW: u32 = 200;
const BATCH_ROOMS: usize = 5;
const BATCH_EVENTS_PER_ROOM: usize = 10;
const RUNS: usize = 15;

struct Cache {
    pool: SqlitePool,
    variant: Variant,
    aead: XChaCha20Poly1305,
}

impl Cache {
    async fn open(path: &Path, variant: Variant) -> Cache {
        let mut options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        if variant == Variant::SqlCipher {
            options = options.pragma("key", format!("\"x'{}'\"", hex(&KEY)));
        }
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await.unwrap();
        sqlx::migrate!("./migrations").run(&pool).await.unwrap();
        Cache { pool, variant, aead: XChaCha20Poly1305::new(&KEY.into()) }
    }

    /// The stored form of a secret column.
    fn seal(&self, column: &str, row: &str, value: String) -> Vec<u8> {
        if self.variant != Variant::Aead {
            return value.into_bytes();
        }
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let aad = [column.as_bytes(), row.as_bytes()].concat();
        let mut sealed = nonce.to_vec();
        sealed.extend(self.aead.encrypt(&XNonce::from(nonce), Payload { msg: value.as_bytes(), aad: &aad }).unwrap());
        sealed
    }

    fn open_value(&self, column: &str, row: &str, stored: Vec<u8>) -> String {
        if self.variant != Variant::Aead {
            return String::from_utf8(stored).unwrap();
        }
        let (nonce, ciphertext) = stored.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().unwrap();
        let aad = [column.as_bytes(), row.as_bytes()].concat();
        String::from_utf8(self.aead.decrypt(&XNonce::from(nonce), Payload { msg: ciphertext, aad: &aad }).unwrap())
            .unwrap()
    }

    /// One sync batch: `rooms` rooms with `per_room` new messages each, in one transaction
    /// (as `sync::process` writes a `/sync` response), plus the sync token.
    async fn apply_batch(&self, batch: usize, rooms: usize, per_room: usize) {
        let mut tx = self.pool.begin().await.unwrap();
        for room in 0..rooms {
            let room_id = format!("!room{room}:localhost");
            sqlx::query(
                "INSERT INTO rooms (room_id, membership) VALUES (?, 'join')
                 ON CONFLICT (room_id) DO UPDATE SET membership = excluded.membership",
            )
            .bind(&room_id)
            .execute(&mut *tx)
            .await
            .unwrap();
            for n in 0..per_room {
                let event_id = format!("$b{batch}r{room}n{n}");
                let body = format!("message {n} of batch {batch}: {}", "lorem ipsum dolor sit amet ".repeat(6));
                let content = serde_json::json!({"kind": "text", "body": body}).to_string();
                let raw = serde_json::json!({"type": "m.room.encrypted", "content": {"ciphertext": "A".repeat(400)}});
                let (content, raw) = (
                    self.seal("content", &event_id, content),
                    (n % 10 == 0).then(|| self.seal("raw", &event_id, raw.to_string())),
                );
                sqlx::query(
                    "INSERT INTO timeline (room_id, item_key, event_id, sender, ts, content, encrypted, send_state, raw)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(&room_id)
                .bind(&event_id)
                .bind(&event_id)
                .bind(format!("@user{}:localhost", n % 7))
                .bind(1_700_000_000_000i64 + n as i64)
                .bind(content)
                .bind(true)
                .bind(None::<String>)
                .bind(raw)
                .execute(&mut *tx)
                .await
                .unwrap();
            }
        }
        sqlx::query("UPDATE session SET sync_token = ? WHERE id = 1")
            .bind(format!("s{batch}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// The store's timeline query (`Store::timeline`), with the content opened.
    async fn timeline(&self, room: usize) -> usize {
        let rows = sqlx::query(
            "SELECT * FROM (SELECT t.item_key, t.room_id, t.event_id, t.sender, t.ts, t.content, t.encrypted,
                     t.send_state, COALESCE(m.display_name, u.display_name), t.seq
                 FROM timeline t
                 LEFT JOIN members m ON m.room_id = t.room_id AND m.user_id = t.sender
                 LEFT JOIN users u ON u.user_id = t.sender
                 WHERE t.room_id = ? ORDER BY t.seq DESC LIMIT ?) ORDER BY seq",
        )
        .bind(format!("!room{room}:localhost"))
        .bind(TIMELINE_WINDOW)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut bytes = 0;
        for row in &rows {
            let key: String = row.get(0);
            let content = self.open_value("content", &key, row.get::<Vec<u8>, _>(5));
            let parsed: serde_json::Value = serde_json::from_str(&content).unwrap();
            bytes += parsed["body"].as_str().unwrap().len();
        }
        bytes
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rooms: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(20);
    let per_room: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();
    println!("cache of {rooms} rooms x {per_room} messages; timeline window {TIMELINE_WINDOW}; medians of {RUNS} runs");
    println!(
        "{:<10} {:>9} {:>10} {:>14} {:>14} {:>16}",
        "variant", "size MiB", "open ms", "timeline cold", "timeline warm", "sync batch ms"
    );
    for variant in [Variant::Plain, Variant::SqlCipher, Variant::Aead] {
        let path = dir.path().join(format!("{variant:?}.db"));
        let cache = Cache::open(&path, variant).await;
        sqlx::query("INSERT INTO session (id, server_url, user_id, device_id, access_token) VALUES (1, 'h', '@me:localhost', 'D', 't')")
            .execute(&cache.pool)
            .await
            .unwrap();
        // Fill: the history, written in large transactions.
        for chunk in 0..per_room / 100 {
            cache.apply_batch(100_000 + chunk, rooms, 100).await;
        }
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&cache.pool).await.unwrap();
        cache.pool.close().await;
        let size = std::fs::metadata(&path).unwrap().len() as f64 / (1024.0 * 1024.0);

        let (mut open, mut cold, mut warm, mut batch) = (vec![], vec![], vec![], vec![]);
        for run in 0..RUNS {
            // Open: a fresh pool (the key is set on each connection) and the first query.
            let started = Instant::now();
            let cache = Cache::open(&path, variant).await;
            sqlx::query("SELECT count(*) FROM session").fetch_one(&cache.pool).await.unwrap();
            open.push(started.elapsed());
            // Cold: the first look at a room after opening (pages read and decrypted).
            let room = run % rooms;
            let started = Instant::now();
            assert!(cache.timeline(room).await > 0);
            cold.push(started.elapsed());
            let started = Instant::now();
            cache.timeline(room).await;
            warm.push(started.elapsed());
            let started = Instant::now();
            cache.apply_batch(run, BATCH_ROOMS, BATCH_EVENTS_PER_ROOM).await;
            batch.push(started.elapsed());
            cache.pool.close().await;
        }
        println!(
            "{:<10} {:>9.1} {:>10.2} {:>14.2} {:>14.2} {:>16.2}",
            format!("{variant:?}").to_lowercase(),
            size,
            median(open),
            median(cold),
            median(warm),
            median(batch)
        );
    }
    println!(
        "sync batch: {BATCH_ROOMS} rooms x {BATCH_EVENTS_PER_ROOM} messages in one transaction (synchronous = FULL)"
    );
}
