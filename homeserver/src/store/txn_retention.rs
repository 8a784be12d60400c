//! Forgetting idempotency records once their window has passed (`service::txn_retention`).

use super::Store;

impl Store {
    /// Forgets to-device transaction ids first seen before `cutoff`; returns how many.
    pub async fn forget_to_device_txns(&self, cutoff: i64) -> Result<u64, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let done =
            sqlx::query("DELETE FROM to_device_txns WHERE created_ts < $1").bind(cutoff).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Clears the client transaction ids of at most `batch` events sent before `cutoff`
    /// (batches keep each write short); returns how many.
    pub async fn forget_event_txns(&self, cutoff: i64, batch: i64) -> Result<u64, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE events SET txn_user = NULL, txn_device = NULL, txn_scope = NULL, txn_id = NULL
             WHERE stream_ordering IN (
                 SELECT stream_ordering FROM events
                 WHERE txn_user IS NOT NULL AND origin_server_ts < $1
                 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(batch)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}
