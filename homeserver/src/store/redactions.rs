//! Redactions that arrived before the event they redact (`pending_redactions`): see the
//! migration `20261208001300_pending_redactions.sql` and `service::redactions`.

use sqlx::{AnyConnection, Row};

use super::Store;

/// Records that `redaction` redacts `target`, when no event `target` is stored yet.
pub(super) async fn remember_if_unheld(
    tx: &mut AnyConnection,
    room_id: &str,
    target: &str,
    redaction: &str,
) -> Result<(), sqlx::Error> {
    let held = sqlx::query("SELECT 1 AS one FROM events WHERE event_id = $1")
        .bind(target)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    if !held {
        insert(tx, room_id, target, redaction).await?;
    }
    Ok(())
}

async fn insert(tx: &mut AnyConnection, room_id: &str, target: &str, redaction: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pending_redactions (target_id, redaction_id, room_id) VALUES ($1, $2, $3)
         ON CONFLICT (target_id, redaction_id) DO NOTHING",
    )
    .bind(target)
    .bind(redaction)
    .bind(room_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// As `target` of `room_id` is stored: the earliest redaction of it already on the timeline
/// (those rows are done with). Redactions of it held soft-failed stay for
/// [`Store::pending_redactions_held_aside`].
pub(super) async fn take_pending_for_target(
    tx: &mut AnyConnection,
    room_id: &str,
    target: &str,
) -> Result<Option<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.redaction_id FROM pending_redactions p JOIN events e ON e.event_id = p.redaction_id
         WHERE p.target_id = $1 AND p.room_id = $2 AND e.room_id = $2 ORDER BY e.stream_ordering",
    )
    .bind(target)
    .bind(room_id)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<String> = rows.iter().map(|r| r.try_get("redaction_id")).collect::<Result<_, _>>()?;
    for id in &ids {
        sqlx::query("DELETE FROM pending_redactions WHERE target_id = $1 AND redaction_id = $2")
            .bind(target)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(ids.into_iter().next())
}

impl Store {
    /// Records a received redaction kept soft-failed because its target is not held yet.
    pub async fn add_pending_redaction(&self, room_id: &str, target: &str, redaction: &str) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        insert(&mut tx, room_id, target, redaction).await?;
        tx.commit().await
    }

    /// The soft-failed redactions of `target` in `room_id` that waited for it, oldest first.
    pub async fn pending_redactions_held_aside(&self, room_id: &str, target: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT p.redaction_id FROM pending_redactions p JOIN event_outliers o ON o.event_id = p.redaction_id
             WHERE p.target_id = $1 AND p.room_id = $2 ORDER BY o.received_ts",
        )
        .bind(target)
        .bind(room_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("redaction_id")).collect()
    }

    /// Forgets that `redaction` waits for `target` (decided now).
    pub async fn drop_pending_redaction(&self, target: &str, redaction: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM pending_redactions WHERE target_id = $1 AND redaction_id = $2")
            .bind(target)
            .bind(redaction)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
