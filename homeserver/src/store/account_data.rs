//! Account data (global and per room), filters and receipts.

use sqlx::Row;

use super::Store;

/// One account data entry.
#[derive(Debug, Clone)]
pub struct AccountDataRow {
    pub room_id: String,
    pub data_type: String,
    pub content: String,
    pub stream_id: i64,
}

/// One receipt.
#[derive(Debug, Clone)]
pub struct ReceiptRow {
    pub room_id: String,
    pub receipt_type: String,
    pub user_id: String,
    pub thread_id: String,
    pub event_id: String,
    pub ts: i64,
    pub stream_id: i64,
}

impl Store {
    /// Sets account data (`room_id` '' for global).
    pub async fn set_account_data(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
        content: &str,
        stream_id: i64,
    ) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query(
                "INSERT INTO account_data (user_id, room_id, type, content, stream_id) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, room_id, type) DO UPDATE SET content = $4, stream_id = $5",
            )
            .bind(user_id)
            .bind(room_id)
            .bind(data_type)
            .bind(content)
            .bind(stream_id),
        )
        .await?;
        Ok(())
    }

    pub async fn account_data(
        &self,
        user_id: &str,
        room_id: &str,
        data_type: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND type = $3")
            .bind(user_id)
            .bind(room_id)
            .bind(data_type)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("content")).transpose()
    }

    /// The user's account data changed in `(from, to]`, every room.
    pub async fn account_data_since(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<AccountDataRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT room_id, type, content, stream_id FROM account_data
             WHERE user_id = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AccountDataRow {
                    room_id: r.try_get("room_id")?,
                    data_type: r.try_get("type")?,
                    content: r.try_get("content")?,
                    stream_id: r.try_get("stream_id")?,
                })
            })
            .collect()
    }

    /// Stores a filter and returns its id (per user, counting up from 0).
    pub async fn create_filter(&self, user_id: &str, json: &str) -> Result<i64, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let row = sqlx::query("SELECT COALESCE(MAX(filter_id) + 1, 0) AS next FROM user_filters WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&mut *tx)
            .await?;
        let id: i64 = row.try_get("next")?;
        sqlx::query("INSERT INTO user_filters (user_id, filter_id, json) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(id)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn filter(&self, user_id: &str, filter_id: i64) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT json FROM user_filters WHERE user_id = $1 AND filter_id = $2")
            .bind(user_id)
            .bind(filter_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("json")).transpose()
    }

    /// Sets a receipt; a receipt never moves backwards is the caller's concern.
    pub async fn set_receipt(&self, receipt: &ReceiptRow) -> Result<(), sqlx::Error> {
        self.execute_write(sqlx::query(
            "INSERT INTO receipts (room_id, receipt_type, user_id, thread_id, event_id, ts, stream_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (room_id, receipt_type, user_id, thread_id) DO UPDATE SET event_id = $5, ts = $6, stream_id = $7",
        )
        .bind(&receipt.room_id)
        .bind(&receipt.receipt_type)
        .bind(&receipt.user_id)
        .bind(&receipt.thread_id)
        .bind(&receipt.event_id)
        .bind(receipt.ts)
        .bind(receipt.stream_id)
        )
        .await?;
        Ok(())
    }

    /// Receipts of a room changed in `(from, to]`.
    pub async fn receipts_since(&self, room_id: &str, from: i64, to: i64) -> Result<Vec<ReceiptRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT room_id, receipt_type, user_id, thread_id, event_id, ts, stream_id FROM receipts
             WHERE room_id = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id",
        )
        .bind(room_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReceiptRow {
                    room_id: r.try_get("room_id")?,
                    receipt_type: r.try_get("receipt_type")?,
                    user_id: r.try_get("user_id")?,
                    thread_id: r.try_get("thread_id")?,
                    event_id: r.try_get("event_id")?,
                    ts: r.try_get("ts")?,
                    stream_id: r.try_get("stream_id")?,
                })
            })
            .collect()
    }
}
