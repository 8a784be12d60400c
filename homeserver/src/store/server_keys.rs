//! Other servers' signing keys (federation): the cache behind X-Matrix and event signature
//! checks, and what our notary endpoint serves.

use sqlx::Row;

use super::Store;

/// One cached key of another server.
#[derive(Debug, Clone)]
pub struct ServerKeyRow {
    pub server_name: String,
    pub key_id: String,
    pub public_key: String,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
    pub key_json: String,
    /// When we fetched it.
    pub fetched_ts: i64,
}

/// A verified key document to cache: current keys and old keys with their expiry.
pub struct NewServerKeys<'a> {
    pub server_name: &'a str,
    pub valid_until_ts: i64,
    pub verify_keys: Vec<(&'a str, &'a str)>,
    pub old_verify_keys: Vec<(&'a str, &'a str, i64)>,
    pub key_json: &'a str,
    pub now: i64,
}

impl Store {
    /// Stores a verified key document; a later document replaces what an older one said.
    pub async fn store_server_keys(&self, keys: NewServerKeys<'_>) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let rows = keys
            .verify_keys
            .iter()
            .map(|(id, key)| (*id, *key, None))
            .chain(keys.old_verify_keys.iter().map(|(id, key, expired)| (*id, *key, Some(*expired))));
        for (key_id, public_key, expired_ts) in rows {
            sqlx::query(
                "INSERT INTO server_keys (server_name, key_id, public_key, valid_until_ts, expired_ts, key_json, fetched_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (server_name, key_id) DO UPDATE SET public_key = $3, valid_until_ts = $4,
                     expired_ts = $5, key_json = $6, fetched_ts = $7",
            )
            .bind(keys.server_name)
            .bind(key_id)
            .bind(public_key)
            .bind(keys.valid_until_ts)
            .bind(expired_ts)
            .bind(keys.key_json)
            .bind(keys.now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    pub async fn server_key(&self, server_name: &str, key_id: &str) -> Result<Option<ServerKeyRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT server_name, key_id, public_key, valid_until_ts, expired_ts, key_json, fetched_ts FROM server_keys
             WHERE server_name = $1 AND key_id = $2",
        )
        .bind(server_name)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| server_key_row(&r)).transpose()
    }

    /// Every cached key of a server (the newest document first).
    pub async fn server_keys(&self, server_name: &str) -> Result<Vec<ServerKeyRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT server_name, key_id, public_key, valid_until_ts, expired_ts, key_json, fetched_ts FROM server_keys
             WHERE server_name = $1 ORDER BY fetched_ts DESC, key_id",
        )
        .bind(server_name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(server_key_row).collect()
    }
}

fn server_key_row(r: &sqlx::any::AnyRow) -> Result<ServerKeyRow, sqlx::Error> {
    Ok(ServerKeyRow {
        server_name: r.try_get("server_name")?,
        key_id: r.try_get("key_id")?,
        public_key: r.try_get("public_key")?,
        valid_until_ts: r.try_get("valid_until_ts")?,
        expired_ts: r.try_get("expired_ts")?,
        key_json: r.try_get("key_json")?,
        fetched_ts: r.try_get("fetched_ts")?,
    })
}
