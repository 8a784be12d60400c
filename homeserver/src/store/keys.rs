//! End-to-end encryption keys, device list changes, to-device messages and key backup.

use sqlx::Row;

use super::{Backend, Store};

/// A to-device message waiting for its device.
#[derive(Debug, Clone)]
pub struct ToDeviceRow {
    pub stream_id: i64,
    pub sender: String,
    pub event_type: String,
    pub content: String,
}

/// One to-device message to queue.
#[derive(Debug, Clone)]
pub struct NewToDevice<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub content: String,
}

/// A key backup version.
#[derive(Debug, Clone)]
pub struct BackupVersionRow {
    pub version: i64,
    pub algorithm: String,
    pub etag: i64,
    pub count: i64,
}

impl Store {
    pub async fn device_keys(&self, user_id: &str, device_id: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT json FROM device_keys WHERE user_id = $1 AND device_id = $2")
            .bind(user_id)
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("json")).transpose()
    }

    /// Device keys of all of a user's current devices: (device id, json, display name).
    pub async fn all_device_keys(&self, user_id: &str) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT k.device_id, k.json, d.display_name FROM device_keys k
             JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
             WHERE k.user_id = $1 ORDER BY k.device_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("device_id")?, r.try_get("json")?, r.try_get("display_name")?))).collect()
    }

    /// Stores device keys and, if they are new or changed, records a device list change.
    pub async fn set_device_keys(
        &self,
        user_id: &str,
        device_id: &str,
        json: &str,
        stream_id: i64,
    ) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let existing = sqlx::query("SELECT json FROM device_keys WHERE user_id = $1 AND device_id = $2")
            .bind(user_id)
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await?;
        if existing.map(|r| r.try_get::<String, _>("json")).transpose()?.as_deref() == Some(json) {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO device_keys (user_id, device_id, json) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, device_id) DO UPDATE SET json = $3",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(json)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO device_list_changes (stream_id, user_id) VALUES ($1, $2)")
            .bind(stream_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records that a user's devices changed (a device was added, renamed or deleted).
    pub async fn record_device_list_change(&self, user_id: &str, stream_id: i64) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("INSERT INTO device_list_changes (stream_id, user_id) VALUES ($1, $2)")
                .bind(stream_id)
                .bind(user_id),
        )
        .await?;
        Ok(())
    }

    /// Deletes the end-to-end state of removed devices (keys and pending messages).
    pub async fn delete_device_e2ee(&self, user_id: &str, device_id: &str) -> Result<(), sqlx::Error> {
        for sql in [
            "DELETE FROM device_keys WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM fallback_keys WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM to_device_messages WHERE user_id = $1 AND device_id = $2",
        ] {
            self.execute_write(sqlx::query(sql).bind(user_id).bind(device_id)).await?;
        }
        Ok(())
    }

    /// Adds one-time keys; a key id already stored with other content is refused (false).
    pub async fn add_one_time_keys(
        &self,
        user_id: &str,
        device_id: &str,
        keys: &[(String, String, String)],
    ) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        for (key_id, algorithm, json) in keys {
            let existing =
                sqlx::query("SELECT json FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND key_id = $3")
                    .bind(user_id)
                    .bind(device_id)
                    .bind(key_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match existing {
                Some(row) if row.try_get::<String, _>("json")? == *json => continue,
                Some(_) => return Ok(false),
                None => {}
            }
            sqlx::query(
                "INSERT INTO one_time_keys (user_id, device_id, key_id, algorithm, json) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(user_id)
            .bind(device_id)
            .bind(key_id)
            .bind(algorithm)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Unclaimed one-time keys per algorithm.
    pub async fn one_time_key_counts(&self, user_id: &str, device_id: &str) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT algorithm, COUNT(*) AS n FROM one_time_keys WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm",
        )
        .bind(user_id)
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("algorithm")?, r.try_get("n")?))).collect()
    }

    /// Takes one one-time key out of the store, or failing that returns the fallback key
    /// (which stays). A key is handed out at most once, and while keys are left every claim
    /// gets one: choosing and deleting are one statement. (A SELECT then a DELETE, retried
    /// when another claim won the race, left claims empty-handed with keys still stored when
    /// 25 claims met at once.) On SQLite the statement holds the write lock throughout; on
    /// PostgreSQL `FOR UPDATE SKIP LOCKED` makes concurrent claims choose different rows.
    pub async fn claim_one_time_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
    ) -> Result<Option<(String, String)>, sqlx::Error> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 AND key_id = (
                    SELECT key_id FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                    ORDER BY key_id LIMIT 1)
                 RETURNING key_id, json"
            }
            Backend::Postgres => {
                "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 AND key_id = (
                    SELECT key_id FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                    ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING key_id, json"
            }
        };
        let claimed = sqlx::query(sql).bind(user_id).bind(device_id).bind(algorithm).fetch_optional(&self.pool).await?;
        if let Some(row) = claimed {
            return Ok(Some((row.try_get("key_id")?, row.try_get("json")?)));
        }
        let fallback = sqlx::query(
            "UPDATE fallback_keys SET used = 1 WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 RETURNING key_id, json",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(algorithm)
        .fetch_optional(&self.pool)
        .await?;
        fallback.map(|r| Ok((r.try_get("key_id")?, r.try_get("json")?))).transpose()
    }

    pub async fn set_fallback_key(
        &self,
        user_id: &str,
        device_id: &str,
        algorithm: &str,
        key_id: &str,
        json: &str,
    ) -> Result<(), sqlx::Error> {
        // Re-uploading the same key keeps its "used" mark; a new key starts unused.
        self.execute_write(sqlx::query(
            "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, json, used) VALUES ($1, $2, $3, $4, $5, 0)
             ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET key_id = $4, json = $5,
               used = CASE WHEN fallback_keys.key_id = $4 THEN fallback_keys.used ELSE 0 END",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(algorithm)
        .bind(key_id)
        .bind(json)
        )
        .await?;
        Ok(())
    }

    pub async fn unused_fallback_algorithms(&self, user_id: &str, device_id: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 AND used = 0")
                .bind(user_id)
                .bind(device_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| r.try_get("algorithm")).collect()
    }

    pub async fn cross_signing_key(&self, user_id: &str, key_type: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT json FROM cross_signing_keys WHERE user_id = $1 AND key_type = $2")
            .bind(user_id)
            .bind(key_type)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("json")).transpose()
    }

    pub async fn set_cross_signing_key(&self, user_id: &str, key_type: &str, json: &str) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query(
                "INSERT INTO cross_signing_keys (user_id, key_type, json) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, key_type) DO UPDATE SET json = $3",
            )
            .bind(user_id)
            .bind(key_type)
            .bind(json),
        )
        .await?;
        Ok(())
    }

    /// Replaces the stored JSON of device keys (after adding signatures).
    pub async fn replace_device_keys(&self, user_id: &str, device_id: &str, json: &str) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("UPDATE device_keys SET json = $1 WHERE user_id = $2 AND device_id = $3")
                .bind(json)
                .bind(user_id)
                .bind(device_id),
        )
        .await?;
        Ok(())
    }

    /// Users whose device lists changed in `(from, to]` among those sharing a room with
    /// `user_id` (and the user themselves).
    pub async fn device_list_changes_for(&self, user_id: &str, from: i64, to: i64) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT user_id FROM device_list_changes
             WHERE stream_id > $2 AND stream_id <= $3 AND (user_id = $1 OR user_id IN (
                SELECT other.state_key FROM room_current_state mine
                JOIN room_current_state other ON other.room_id = mine.room_id
                WHERE mine.type = 'm.room.member' AND mine.state_key = $1 AND mine.membership = 'join'
                  AND other.type = 'm.room.member' AND other.membership = 'join'))",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("user_id")).collect()
    }

    /// Queues to-device messages unless this transaction was already seen; false if it was.
    pub async fn queue_to_device(
        &self,
        sender: &str,
        sender_device: &str,
        txn_id: &str,
        event_type: &str,
        messages: &[NewToDevice<'_>],
        stream_id: i64,
    ) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        // Transaction ids are scoped to the endpoint, `/sendToDevice/{eventType}/{txnId}`.
        let fresh = sqlx::query(
            "INSERT INTO to_device_txns (sender, sender_device, event_type, txn_id, created_ts)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(sender)
        .bind(sender_device)
        .bind(event_type)
        .bind(txn_id)
        .bind(super::now_ms())
        .execute(&mut *tx)
        .await?;
        if fresh.rows_affected() == 0 {
            return Ok(false);
        }
        for m in messages {
            sqlx::query(
                "INSERT INTO to_device_messages (stream_id, user_id, device_id, sender, type, content) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(stream_id)
            .bind(m.user_id)
            .bind(m.device_id)
            .bind(sender)
            .bind(event_type)
            .bind(&m.content)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Messages for a device up to `to`, oldest first, at most `limit`.
    pub async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        to: i64,
        limit: i64,
    ) -> Result<Vec<ToDeviceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT stream_id, sender, type, content FROM to_device_messages
             WHERE user_id = $1 AND device_id = $2 AND stream_id <= $3 ORDER BY stream_id LIMIT $4",
        )
        .bind(user_id)
        .bind(device_id)
        .bind(to)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ToDeviceRow {
                    stream_id: r.try_get("stream_id")?,
                    sender: r.try_get("sender")?,
                    event_type: r.try_get("type")?,
                    content: r.try_get("content")?,
                })
            })
            .collect()
    }

    /// Deletes messages the device acknowledged (a sync with `since` at or past them), and
    /// remembers the position so the stream never restarts below it.
    pub async fn ack_to_device(&self, user_id: &str, device_id: &str, up_to: i64) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let done =
            sqlx::query("DELETE FROM to_device_messages WHERE user_id = $1 AND device_id = $2 AND stream_id <= $3")
                .bind(user_id)
                .bind(device_id)
                .bind(up_to)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() > 0 {
            sqlx::query("UPDATE stream_high_water SET position = $1 WHERE id = 1 AND position < $1")
                .bind(up_to)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    pub async fn pending_to_device_count(&self, user_id: &str, device_id: &str) -> Result<i64, sqlx::Error> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM to_device_messages WHERE user_id = $1 AND device_id = $2")
            .bind(user_id)
            .bind(device_id)
            .fetch_one(&self.pool)
            .await?;
        row.try_get("n")
    }

    // Key backup.

    pub async fn create_backup_version(&self, user_id: &str, algorithm: &str) -> Result<i64, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM backup_versions WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
        let version: i64 = row.try_get("v")?;
        sqlx::query(
            "INSERT INTO backup_versions (user_id, version, algorithm, etag, deleted) VALUES ($1, $2, $3, 0, 0)",
        )
        .bind(user_id)
        .bind(version)
        .bind(algorithm)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    /// A live backup version (the latest when `version` is None) with its key count.
    pub async fn backup_version(
        &self,
        user_id: &str,
        version: Option<i64>,
    ) -> Result<Option<BackupVersionRow>, sqlx::Error> {
        let row = match version {
            Some(v) => {
                sqlx::query("SELECT version, algorithm, etag FROM backup_versions WHERE user_id = $1 AND version = $2 AND deleted = 0")
                    .bind(user_id)
                    .bind(v)
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(
                    "SELECT version, algorithm, etag FROM backup_versions WHERE user_id = $1 AND deleted = 0
                     ORDER BY version DESC LIMIT 1",
                )
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get("version")?;
        let count = sqlx::query("SELECT COUNT(*) AS n FROM backup_keys WHERE user_id = $1 AND version = $2")
            .bind(user_id)
            .bind(version)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(BackupVersionRow {
            version,
            algorithm: row.try_get("algorithm")?,
            etag: row.try_get("etag")?,
            count: count.try_get("n")?,
        }))
    }

    pub async fn update_backup_version(
        &self,
        user_id: &str,
        version: i64,
        algorithm: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = self
            .execute_write(
                sqlx::query(
                    "UPDATE backup_versions SET algorithm = $1 WHERE user_id = $2 AND version = $3 AND deleted = 0",
                )
                .bind(algorithm)
                .bind(user_id)
                .bind(version),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let done =
            sqlx::query("UPDATE backup_versions SET deleted = 1 WHERE user_id = $1 AND version = $2 AND deleted = 0")
                .bind(user_id)
                .bind(version)
                .execute(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM backup_keys WHERE user_id = $1 AND version = $2")
            .bind(user_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores backed-up session keys (replacing a key only when the caller decided the new
    /// one is better) and moves the etag on.
    pub async fn put_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        keys: &[(String, String, String)],
    ) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        for (room_id, session_id, json) in keys {
            sqlx::query(
                "INSERT INTO backup_keys (user_id, version, room_id, session_id, json) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET json = $5",
            )
            .bind(user_id)
            .bind(version)
            .bind(room_id)
            .bind(session_id)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        bump_backup_etag(&mut tx, user_id, version).await?;
        tx.commit().await
    }

    /// Backed-up keys of a version, optionally of one room or one session: (room, session, json).
    pub async fn backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT room_id, session_id, json FROM backup_keys WHERE user_id = $1 AND version = $2
             AND ($3 IS NULL OR room_id = $3) AND ($4 IS NULL OR session_id = $4) ORDER BY room_id, session_id",
        )
        .bind(user_id)
        .bind(version)
        .bind(room_id)
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("room_id")?, r.try_get("session_id")?, r.try_get("json")?))).collect()
    }

    pub async fn delete_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        sqlx::query(
            "DELETE FROM backup_keys WHERE user_id = $1 AND version = $2
             AND ($3 IS NULL OR room_id = $3) AND ($4 IS NULL OR session_id = $4)",
        )
        .bind(user_id)
        .bind(version)
        .bind(room_id)
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
        bump_backup_etag(&mut tx, user_id, version).await?;
        tx.commit().await
    }
}

/// Every change to a backup's keys moves its etag, so clients notice.
async fn bump_backup_etag(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    user_id: &str,
    version: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2")
        .bind(user_id)
        .bind(version)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
