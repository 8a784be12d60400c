//! The local cache (`client.db`, SQLite via sqlx): session, rooms, members, timelines,
//! outbox, users, receipts. All SQL of the client lives here. Runtime-checked queries (no
//! `query!` macros) so the crate builds without a database at compile time.
//!
//! The file is encrypted page by page with SQLCipher (AES-256-CBC with a random IV and
//! HMAC-SHA512 on every page, the write-ahead log included) under a raw 256-bit key derived
//! from the crypto store's key ([`CACHE_KEY_PURPOSE`]): nothing in it, nor in its `-wal` and
//! `-shm` files, is readable without that key. A plaintext cache of an earlier version is
//! copied into an encrypted one on the first open with the key, then overwritten and
//! removed ([`migrate_plaintext`]). Why SQLCipher and not per-row AEAD: `README.md`.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use e2ee::store::StoreKey;
use sqlx::{
    Connection, Row,
    sqlite::{
        SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
        SqliteSynchronous,
    },
};

use crate::{
    ItemContent, Membership, PresenceInfo, Result, SendState, TimelineItem, UserSummary, session::Session, types,
};

/// The cache's file name in the data directory.
pub(crate) const CACHE_FILE: &str = "client.db";
/// The label the cache key is derived under from the crypto store's key.
pub(crate) const CACHE_KEY_PURPOSE: &str = "obmin-client cache (SQLCipher)";
/// What every plaintext SQLite file starts with; an encrypted one starts with random salt.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";
/// The files SQLite keeps next to a database.
const COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];

#[derive(Clone)]
pub(crate) struct Store {
    pool: SqlitePool,
}

/// A room row.
#[derive(Debug, Clone)]
pub(crate) struct RoomRow {
    pub room_id: String,
    pub membership: Membership,
    pub name: Option<String>,
    pub is_direct: bool,
    pub inviter: Option<String>,
    pub encryption: Option<serde_json::Value>,
    pub read_seq: i64,
}

/// A queued message.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub txn_id: String,
    pub room_id: String,
    pub event_type: String,
    pub content: serde_json::Value,
}

/// A timeline row to insert.
pub(crate) struct NewItem<'a> {
    pub room_id: &'a str,
    pub key: &'a str,
    pub event_id: Option<&'a str>,
    pub sender: &'a str,
    pub ts: u64,
    pub content: &'a ItemContent,
    pub encrypted: bool,
    pub send_state: Option<&'a SendState>,
    pub raw: Option<&'a serde_json::Value>,
}

fn membership_str(m: Membership) -> &'static str {
    match m {
        Membership::Joined => "join",
        Membership::Invited => "invite",
        Membership::Left => "leave",
    }
}

pub(crate) fn parse_membership(s: &str) -> Membership {
    match s {
        "join" => Membership::Joined,
        "invite" => Membership::Invited,
        _ => Membership::Left,
    }
}

impl Store {
    /// Opens (creating if needed) the cache at `path`, encrypted with `key`. A plaintext cache
    /// of an earlier version there is migrated first. A cache sealed with another key is
    /// refused ([`crate::Error::Store`]) and left as it is.
    pub(crate) async fn open(path: &Path, key: &StoreKey) -> Result<Self> {
        migrate_plaintext(path, key).await?;
        let pool =
            SqlitePoolOptions::new().max_connections(4).connect_with(options(path, key)).await.map_err(key_error)?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Closes every connection (waits for those in use): the files can then be removed.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    /// Removes the cache at `path` with its companion files and any migration leftovers.
    /// Close it first. A plaintext cache (of an earlier version) is overwritten first, not
    /// only unlinked; an encrypted one is unreadable without its key and is just removed.
    pub(crate) fn remove(path: &Path) -> Result<()> {
        if is_plaintext(path)? {
            for file in family(path) {
                scrub(&file)?;
            }
        }
        for file in family(path).into_iter().chain(family(&sibling(path, ".new"))) {
            remove_if_exists(&file)?;
        }
        // A plaintext cache that was being migrated is overwritten, not only unlinked.
        for file in family(&sibling(path, ".plaintext")) {
            scrub(&file)?;
        }
        Ok(())
    }

    // ---- session ----

    pub(crate) async fn load_session(&self) -> Result<Option<Session>> {
        let row = sqlx::query("SELECT server_url, user_id, device_id, access_token FROM session WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let user_id: String = r.get(1);
            Ok(Session {
                server_url: r.get(0),
                user_id: user_id.try_into().map_err(|_| crate::Error::Store("bad user id in session".into()))?,
                device_id: r.get(2),
                access_token: r.get(3),
            })
        })
        .transpose()
    }

    /// Saves the session of a new cache (each session starts with a new cache file and key).
    pub(crate) async fn save_session(&self, session: &Session) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO session (id, server_url, user_id, device_id, access_token) VALUES (1, ?, ?, ?, ?)")
            .bind(&session.server_url)
            .bind(session.user_id.as_str())
            .bind(&session.device_id)
            .bind(&session.access_token)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn sync_token(&self) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT sync_token FROM session WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .and_then(|r| r.get(0)))
    }

    pub(crate) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin().await?)
    }

    pub(crate) async fn set_sync_token(tx: &mut sqlx::SqliteConnection, token: &str) -> Result<()> {
        sqlx::query("UPDATE session SET sync_token = ? WHERE id = 1").bind(token).execute(tx).await?;
        Ok(())
    }

    // ---- rooms ----

    pub(crate) async fn upsert_room(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        membership: Membership,
        inviter: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO rooms (room_id, membership, inviter) VALUES (?, ?, ?)
             ON CONFLICT (room_id) DO UPDATE SET membership = excluded.membership,
                 inviter = COALESCE(excluded.inviter, rooms.inviter)",
        )
        .bind(room_id)
        .bind(membership_str(membership))
        .bind(inviter)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// A room we heard of (e.g. in `m.direct`) before its membership: remembered as left
    /// until sync says more.
    pub(crate) async fn upsert_room_if_missing(tx: &mut sqlx::SqliteConnection, room_id: &str) -> Result<()> {
        sqlx::query("INSERT INTO rooms (room_id, membership) VALUES (?, 'leave') ON CONFLICT DO NOTHING")
            .bind(room_id)
            .execute(tx)
            .await?;
        Ok(())
    }

    pub(crate) async fn set_room_name(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        name: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE rooms SET name = ? WHERE room_id = ?").bind(name).bind(room_id).execute(tx).await?;
        Ok(())
    }

    pub(crate) async fn set_room_direct(tx: &mut sqlx::SqliteConnection, room_id: &str, direct: bool) -> Result<()> {
        sqlx::query("UPDATE rooms SET is_direct = ? WHERE room_id = ?").bind(direct).bind(room_id).execute(tx).await?;
        Ok(())
    }

    pub(crate) async fn set_room_encryption(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        content: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query("UPDATE rooms SET encryption = ? WHERE room_id = ?")
            .bind(content.to_string())
            .bind(room_id)
            .execute(tx)
            .await?;
        Ok(())
    }

    pub(crate) async fn rooms(&self) -> Result<Vec<RoomRow>> {
        let rows = sqlx::query(
            "SELECT room_id, membership, name, is_direct, inviter, encryption, read_seq FROM rooms
             WHERE membership != 'leave'",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(room_row).collect())
    }

    pub(crate) async fn room(&self, room_id: &str) -> Result<Option<RoomRow>> {
        let row = sqlx::query(
            "SELECT room_id, membership, name, is_direct, inviter, encryption, read_seq FROM rooms WHERE room_id = ?",
        )
        .bind(room_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(room_row))
    }

    /// Marks the room read up to its newest item; returns that item's event id.
    pub(crate) async fn mark_room_read(&self, room_id: &str) -> Result<Option<String>> {
        let mut tx = self.pool.begin().await?;
        let newest = sqlx::query(
            "SELECT seq, event_id FROM timeline WHERE room_id = ? AND event_id IS NOT NULL ORDER BY seq DESC LIMIT 1",
        )
        .bind(room_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(newest) = newest else { return Ok(None) };
        let seq: i64 = newest.get(0);
        sqlx::query("UPDATE rooms SET read_seq = MAX(read_seq, ?) WHERE room_id = ?")
            .bind(seq)
            .bind(room_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(newest.get(1))
    }

    /// Our read marker moved to `event_id` (from our own receipt in sync, another device).
    pub(crate) async fn set_read_up_to(tx: &mut sqlx::SqliteConnection, room_id: &str, event_id: &str) -> Result<()> {
        sqlx::query(
            "UPDATE rooms SET read_seq = MAX(read_seq, COALESCE((SELECT seq FROM timeline WHERE event_id = ?), 0))
             WHERE room_id = ?",
        )
        .bind(event_id)
        .bind(room_id)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Messages (text and files) from others after our read marker.
    pub(crate) async fn unread_count(&self, room_id: &str, me: &str, read_seq: i64) -> Result<u64> {
        let count: i64 = sqlx::query(
            "SELECT COUNT(*) FROM timeline WHERE room_id = ? AND sender != ? AND seq > ?
             AND (json_extract(content, '$.kind') IN ('text', 'file', 'undecryptable'))",
        )
        .bind(room_id)
        .bind(me)
        .bind(read_seq)
        .fetch_one(&self.pool)
        .await?
        .get(0);
        Ok(count as u64)
    }

    // ---- members ----

    pub(crate) async fn set_member(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        user_id: &str,
        membership: &str,
        display_name: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO members (room_id, user_id, membership, display_name) VALUES (?, ?, ?, ?)
             ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
                 display_name = COALESCE(excluded.display_name, members.display_name)",
        )
        .bind(room_id)
        .bind(user_id)
        .bind(membership)
        .bind(display_name)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Members with the given memberships (e.g. `["join", "invite"]`), with display names.
    pub(crate) async fn members(&self, room_id: &str, memberships: &[&str]) -> Result<Vec<(String, Option<String>)>> {
        let rows =
            sqlx::query("SELECT user_id, membership, display_name FROM members WHERE room_id = ? ORDER BY user_id")
                .bind(room_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .filter(|r| memberships.contains(&r.get::<String, _>(1).as_str()))
            .map(|r| (r.get(0), r.get(2)))
            .collect())
    }

    // ---- timeline ----

    /// Inserts an item unless one with its key or event id exists; returns whether it did.
    pub(crate) async fn insert_item(tx: &mut sqlx::SqliteConnection, item: NewItem<'_>) -> Result<bool> {
        Self::insert_timeline_row(
            tx,
            item,
            "INSERT INTO timeline (room_id, item_key, event_id, sender, ts, content, encrypted, send_state, raw)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .await
    }

    /// Inserts an item older than every item we hold (back-pagination): it takes a `seq`
    /// below all others (negative), so history stays in order and, being below every read
    /// marker, never counts as unread. Returns whether it was new.
    pub(crate) async fn insert_older_item(tx: &mut sqlx::SqliteConnection, item: NewItem<'_>) -> Result<bool> {
        Self::insert_timeline_row(
            tx,
            item,
            "INSERT INTO timeline (seq, room_id, item_key, event_id, sender, ts, content, encrypted, send_state, raw)
             VALUES ((SELECT min(coalesce(min(seq), 0), 0) - 1 FROM timeline), ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .await
    }

    /// Runs one of the two insert statements above, which take the item's columns in the same order.
    async fn insert_timeline_row(
        tx: &mut sqlx::SqliteConnection,
        item: NewItem<'_>,
        sql: &'static str,
    ) -> Result<bool> {
        let done = sqlx::query(sql)
            .bind(item.room_id)
            .bind(item.key)
            .bind(item.event_id)
            .bind(item.sender)
            .bind(item.ts as i64)
            .bind(serde_json::to_string(item.content)?)
            .bind(item.encrypted)
            .bind(item.send_state.map(serde_json::to_string).transpose()?)
            .bind(item.raw.map(|r| r.to_string()))
            .execute(tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Remembers where older history of a room continues, if this is the first we hear of
    /// the room's timeline (later tokens would point into a gap, which we do not fill).
    pub(crate) async fn set_prev_batch_if_new(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        token: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE rooms SET prev_batch = ? WHERE room_id = ? AND prev_batch IS NULL AND history_complete = 0
                 AND NOT EXISTS (SELECT 1 FROM timeline WHERE room_id = ? AND event_id IS NOT NULL)",
        )
        .bind(token)
        .bind(room_id)
        .bind(room_id)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Where older history continues: the token, and whether we already reached the start.
    pub(crate) async fn history_cursor(&self, room_id: &str) -> Result<(Option<String>, bool)> {
        let row = sqlx::query("SELECT prev_batch, history_complete FROM rooms WHERE room_id = ?")
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))).unwrap_or((None, false)))
    }

    /// After a back-pagination: the next token, or None when the room's start is reached.
    pub(crate) async fn set_history_cursor(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        next: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE rooms SET prev_batch = ?, history_complete = ? WHERE room_id = ?")
            .bind(next)
            .bind(next.is_none())
            .bind(room_id)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Our message `key` reached the server as `event_id`. Returns false if there is no such
    /// item (the echo of a message sent by another device of ours).
    pub(crate) async fn confirm_item(
        tx: &mut sqlx::SqliteConnection,
        key: &str,
        event_id: &str,
        ts: Option<u64>,
    ) -> Result<bool> {
        // The sync echo may have inserted the event under its own id first: keep ours.
        sqlx::query("DELETE FROM timeline WHERE event_id = ? AND item_key != ?")
            .bind(event_id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let sent = serde_json::to_string(&SendState::Sent)?;
        let done = sqlx::query(
            "UPDATE timeline SET event_id = ?, ts = COALESCE(?, ts),
                 send_state = CASE WHEN send_state LIKE '%Read%' THEN send_state ELSE ? END
             WHERE item_key = ?",
        )
        .bind(event_id)
        .bind(ts.map(|t| t as i64))
        .bind(sent)
        .bind(key)
        .execute(tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Someone other than us read up to `event_id`: our `Sent` messages up to there become
    /// `Read`. Returns the keys that changed.
    pub(crate) async fn mark_ours_read(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        me: &str,
        event_id: &str,
    ) -> Result<Vec<String>> {
        let read = serde_json::to_string(&SendState::Read)?;
        let sent = serde_json::to_string(&SendState::Sent)?;
        let rows = sqlx::query(
            "UPDATE timeline SET send_state = ? WHERE room_id = ? AND sender = ? AND send_state = ?
                 AND seq <= (SELECT seq FROM timeline WHERE event_id = ?)
             RETURNING item_key",
        )
        .bind(read)
        .bind(room_id)
        .bind(me)
        .bind(sent)
        .bind(event_id)
        .fetch_all(tx)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(crate) async fn set_receipt(
        tx: &mut sqlx::SqliteConnection,
        room_id: &str,
        user_id: &str,
        event_id: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO receipts (room_id, user_id, event_id) VALUES (?, ?, ?)
             ON CONFLICT (room_id, user_id) DO UPDATE SET event_id = excluded.event_id",
        )
        .bind(room_id)
        .bind(user_id)
        .bind(event_id)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// The newest `limit` items of a room, oldest first.
    pub(crate) async fn timeline(&self, room_id: &str, limit: u32) -> Result<Vec<TimelineItem>> {
        let rows = sqlx::query(
            "SELECT * FROM (SELECT t.item_key, t.room_id, t.event_id, t.sender, t.ts, t.content, t.encrypted,
                     t.send_state, COALESCE(m.display_name, u.display_name), t.seq
                 FROM timeline t
                 LEFT JOIN members m ON m.room_id = t.room_id AND m.user_id = t.sender
                 LEFT JOIN users u ON u.user_id = t.sender
                 WHERE t.room_id = ? ORDER BY t.seq DESC LIMIT ?) ORDER BY seq",
        )
        .bind(room_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(item_row).collect()
    }

    pub(crate) async fn item(&self, key: &str) -> Result<Option<TimelineItem>> {
        let row = sqlx::query(
            "SELECT t.item_key, t.room_id, t.event_id, t.sender, t.ts, t.content, t.encrypted,
                 t.send_state, COALESCE(m.display_name, u.display_name), t.seq
             FROM timeline t
             LEFT JOIN members m ON m.room_id = t.room_id AND m.user_id = t.sender
             LEFT JOIN users u ON u.user_id = t.sender
             WHERE t.item_key = ?",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(item_row).transpose()
    }

    /// Items we could not decrypt yet (to retry when keys arrive): key, room, raw event.
    pub(crate) async fn undecrypted(&self) -> Result<Vec<(String, String, serde_json::Value)>> {
        let rows = sqlx::query(
            "SELECT item_key, room_id, raw FROM timeline
             WHERE json_extract(content, '$.kind') = 'undecryptable' AND raw IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r.get(0), r.get(1), serde_json::from_str(&r.get::<String, _>(2)).ok()?)))
            .collect())
    }

    pub(crate) async fn replace_content(&self, key: &str, content: &ItemContent) -> Result<()> {
        sqlx::query("UPDATE timeline SET content = ?, raw = NULL WHERE item_key = ?")
            .bind(serde_json::to_string(content)?)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- outbox ----

    /// Queues a message and its timeline item in one transaction (both or neither).
    pub(crate) async fn enqueue(&self, row: &OutboxRow, item: NewItem<'_>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO outbox (txn_id, room_id, event_type, content, queued_ts) VALUES (?, ?, ?, ?, ?)")
            .bind(&row.txn_id)
            .bind(&row.room_id)
            .bind(&row.event_type)
            .bind(row.content.to_string())
            .bind(item.ts as i64)
            .execute(&mut *tx)
            .await?;
        Self::insert_item(&mut tx, item).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Queued messages, oldest first.
    pub(crate) async fn outbox(&self) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query("SELECT txn_id, room_id, event_type, content FROM outbox ORDER BY queued_ts, txn_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    txn_id: r.get(0),
                    room_id: r.get(1),
                    event_type: r.get(2),
                    content: serde_json::from_str(&r.get::<String, _>(3))?,
                })
            })
            .collect()
    }

    /// The server accepted `txn_id` as `event_id`: out of the outbox, item marked sent.
    pub(crate) async fn outbox_done(&self, txn_id: &str, event_id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM outbox WHERE txn_id = ?").bind(txn_id).execute(&mut *tx).await?;
        Self::confirm_item(&mut tx, txn_id, event_id, None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The server refused `txn_id` for good.
    pub(crate) async fn outbox_failed(&self, txn_id: &str, error: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM outbox WHERE txn_id = ?").bind(txn_id).execute(&mut *tx).await?;
        sqlx::query("UPDATE timeline SET send_state = ? WHERE item_key = ?")
            .bind(serde_json::to_string(&SendState::Failed { error: error.to_owned() })?)
            .bind(txn_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- users ----

    pub(crate) async fn set_user_profile(
        tx: &mut sqlx::SqliteConnection,
        user_id: &str,
        display_name: Option<&str>,
        avatar_url: Option<&str>,
        avatar_colour: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO users (user_id, display_name, avatar_url, avatar_colour) VALUES (?, ?, ?, ?)
             ON CONFLICT (user_id) DO UPDATE SET display_name = excluded.display_name,
                 avatar_url = excluded.avatar_url,
                 avatar_colour = COALESCE(excluded.avatar_colour, users.avatar_colour)",
        )
        .bind(user_id)
        .bind(display_name)
        .bind(avatar_url)
        .bind(avatar_colour)
        .execute(tx)
        .await?;
        Ok(())
    }

    pub(crate) async fn set_presence(tx: &mut sqlx::SqliteConnection, user_id: &str, p: &PresenceInfo) -> Result<()> {
        let presence = match p.presence {
            types::Presence::Online => "online",
            types::Presence::Unavailable => "unavailable",
            types::Presence::Offline => "offline",
            types::Presence::Unknown => "unknown",
        };
        sqlx::query(
            "INSERT INTO users (user_id, presence, status_msg, last_active_ts, currently_active) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (user_id) DO UPDATE SET presence = excluded.presence, status_msg = excluded.status_msg,
                 last_active_ts = excluded.last_active_ts, currently_active = excluded.currently_active",
        )
        .bind(user_id)
        .bind(presence)
        .bind(&p.status_msg)
        .bind(p.last_active_ts.map(|t| t as i64))
        .bind(p.currently_active)
        .execute(tx)
        .await?;
        Ok(())
    }

    pub(crate) async fn user(&self, user_id: &str) -> Result<Option<UserSummary>> {
        let row = sqlx::query(
            "SELECT user_id, display_name, avatar_url, avatar_colour, presence, status_msg, last_active_ts,
                 currently_active FROM users WHERE user_id = ?",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|r| {
            let presence = match r.get::<Option<String>, _>(4).as_deref() {
                Some("online") => types::Presence::Online,
                Some("unavailable") => types::Presence::Unavailable,
                Some("offline") => types::Presence::Offline,
                _ => types::Presence::Unknown,
            };
            Some(UserSummary {
                user_id: r.get::<String, _>(0).try_into().ok()?,
                display_name: r.get(1),
                avatar_url: r.get::<Option<String>, _>(2).map(Into::into),
                avatar_colour: r.get(3),
                presence: PresenceInfo {
                    presence,
                    status_msg: r.get(5),
                    last_active_ts: r.get::<Option<i64>, _>(6).map(|t| t as u64),
                    currently_active: r.get(7),
                },
            })
        }))
    }
}

fn room_row(r: &SqliteRow) -> RoomRow {
    RoomRow {
        room_id: r.get(0),
        membership: parse_membership(&r.get::<String, _>(1)),
        name: r.get(2),
        is_direct: r.get(3),
        inviter: r.get(4),
        encryption: r.get::<Option<String>, _>(5).and_then(|s| serde_json::from_str(&s).ok()),
        read_seq: r.get(6),
    }
}

fn item_row(r: &SqliteRow) -> Result<TimelineItem> {
    let bad = |what: &str| crate::Error::Store(format!("bad {what} in the timeline cache"));
    Ok(TimelineItem {
        key: r.get(0),
        room_id: r.get::<String, _>(1).try_into().map_err(|_| bad("room id"))?,
        event_id: r.get::<Option<String>, _>(2).map(|e| e.try_into()).transpose().map_err(|_| bad("event id"))?,
        sender: r.get::<String, _>(3).try_into().map_err(|_| bad("sender"))?,
        timestamp: r.get::<i64, _>(4) as u64,
        content: serde_json::from_str(&r.get::<String, _>(5))?,
        encrypted: r.get(6),
        send_state: r.get::<Option<String>, _>(7).map(|s| serde_json::from_str(&s)).transpose()?,
        sender_name: r.get(8),
    })
}

/// The connection options of the cache at `path` under `key`. SQLCipher takes the key as the
/// first statement on every connection (sqlx sends `key` before any other pragma); a raw
/// 64-hex-digit key is used as it is, without SQLCipher's own PBKDF2 (it is a random or
/// argon2id-derived key already).
fn options(path: &Path, key: &StoreKey) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .pragma("key", format!("\"x'{}'\"", hex(key.as_bytes()).as_str()))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // A committed outbox row must survive a crash of the app: that is the promise
        // "queued means it will be sent".
        .synchronous(SqliteSynchronous::Full)
        // Temporary tables and indices (sorting) stay in memory, never in plaintext files.
        .pragma("temp_store", "MEMORY")
        .busy_timeout(std::time::Duration::from_secs(10))
}

fn hex(bytes: &[u8]) -> zeroize::Zeroizing<String> {
    use std::fmt::Write as _;
    let mut out = zeroize::Zeroizing::new(String::with_capacity(bytes.len() * 2));
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// SQLite says "file is not a database" (SQLITE_NOTADB) when the key does not decrypt the
/// first page: say that in words.
fn key_error(error: sqlx::Error) -> crate::Error {
    match &error {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("26") => {
            crate::Error::Store("the local cache does not open with this device's key".into())
        }
        _ => error.into(),
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A database file and the companion files SQLite may keep next to it.
fn family(path: &Path) -> Vec<PathBuf> {
    std::iter::once(path.to_owned()).chain(COMPANIONS.iter().map(|suffix| sibling(path, suffix))).collect()
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Whether the file at `path` is a plaintext SQLite database (else encrypted, or empty).
fn is_plaintext(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut header = [0u8; 16];
    match std::fs::File::open(path) {
        Ok(mut file) => Ok(file.read_exact(&mut header).is_ok() && &header == SQLITE_HEADER),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Overwrites the file with zeros, syncs, and removes it: the plaintext is gone from the file
/// system's view of its blocks, not only unlinked (a copy-on-write file system or an SSD's
/// remapping may still keep old blocks; full-disk encryption covers those).
fn scrub(path: &Path) -> Result<()> {
    let mut file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut left = file.metadata()?.len();
    let zeros = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    drop(file);
    remove_if_exists(path)
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Renames `from` (with its companion files) to `to`, if it is there.
fn rename_family(from: &Path, to: &Path) -> Result<()> {
    for (from, to) in family(from).into_iter().zip(family(to)) {
        match std::fs::rename(&from, &to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// A file name as an SQLite URI path (`file:` URIs take %-escapes; SQLite is built with URI
/// file names on).
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &byte in path.as_os_str().as_bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Moves a plaintext cache of an earlier version at `path` into an encrypted one, and
/// leaves nothing of the plaintext behind. Crash-safe at every step; the steps:
///
/// 1. the plaintext database and its `-wal` / `-shm` move aside to `client.db.plaintext*`
///    (so no stale plaintext log can ever pair with the new file);
/// 2. SQLCipher copies it, read only, into `client.db.new`, encrypted with `key`
///    (`sqlcipher_export`: every table and row, the outbox included), which is synced;
/// 3. `client.db.new` becomes `client.db` (an atomic rename);
/// 4. the plaintext files are overwritten with zeros and removed ([`scrub`]).
///
/// A start after a crash picks up where it stopped: before 3, `client.db` is missing and the
/// copy starts over from the plaintext set; after 3, only the scrubbing is left.
pub(crate) async fn migrate_plaintext(path: &Path, key: &StoreKey) -> Result<()> {
    let plaintext = sibling(path, ".plaintext");
    let fresh = sibling(path, ".new");
    if plaintext.exists() && path.exists() && !is_plaintext(path)? {
        // Interrupted after step 3.
        for file in family(&plaintext) {
            scrub(&file)?;
        }
        return Ok(());
    }
    if !plaintext.exists() {
        if !is_plaintext(path)? {
            return Ok(());
        }
        // Step 1: the database first, then its logs (a crash in between is finished below).
        std::fs::rename(path, &plaintext)?;
        sync_dir(path)?;
    }
    // Step 1 (again, after a crash): any log under the old name belongs to the plaintext set,
    // since `client.db` itself does not exist until step 3.
    rename_family(path, &plaintext)?;
    sync_dir(path)?;
    tracing::info!(file = %path.display(), "encrypting the local cache of an earlier version");

    // Step 2.
    for file in family(&fresh) {
        remove_if_exists(&file)?;
    }
    let mut conn =
        SqliteConnection::connect_with(&options(&fresh, key).journal_mode(SqliteJournalMode::Delete)).await?;
    // An empty key attaches the file as plain SQLite; `mode=ro` leaves it (and its log)
    // exactly as it is until it is scrubbed.
    let attach =
        format!("ATTACH DATABASE 'file:{}?mode=ro' AS plaintext KEY ''", uri_path(&plaintext).replace('\'', "''"));
    sqlx::query(sqlx::AssertSqlSafe(attach)).execute(&mut conn).await?;
    sqlx::query("SELECT sqlcipher_export('main', 'plaintext')").execute(&mut conn).await?;
    sqlx::query("DETACH DATABASE plaintext").execute(&mut conn).await?;
    conn.close().await?;
    std::fs::File::open(&fresh)?.sync_all()?;

    // Step 3.
    std::fs::rename(&fresh, path)?;
    sync_dir(path)?;

    // Step 4.
    for file in family(&plaintext) {
        scrub(&file)?;
    }
    sync_dir(path)?;
    Ok(())
}
