//! Pushers and the cursor of their delivery over `event_push_actions`.

use sqlx::Row;

use super::Store;

/// A stored pusher.
#[derive(Debug, Clone)]
pub struct PusherRow {
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
    pub kind: String,
    /// ruma's `Pusher` as JSON.
    pub pusher_json: String,
    pub created_ts: i64,
    pub last_stream_ordering: i64,
}

/// A pusher to store.
pub struct NewPusher<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub app_id: &'a str,
    pub pushkey: &'a str,
    pub kind: &'a str,
    pub pusher_json: &'a str,
    pub now: i64,
    /// Only notifications after this position are delivered to a new pusher.
    pub start_after: i64,
}

/// One notification waiting for a pusher: the event it is about and what the rules decided.
#[derive(Debug, Clone)]
pub struct PendingPush {
    pub event_id: String,
    pub room_id: String,
    pub stream_ordering: i64,
    pub actions: String,
}

const COLUMNS: &str = "user_id, app_id, pushkey, kind, pusher_json, created_ts, last_stream_ordering";

impl Store {
    /// Adds or replaces a pusher. Without `append`, the same app id and pushkey is taken
    /// away from every other user, as the spec says.
    pub async fn set_pusher(&self, new: NewPusher<'_>, append: bool) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        if !append {
            sqlx::query("DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3")
                .bind(new.app_id)
                .bind(new.pushkey)
                .bind(new.user_id)
                .execute(&mut *tx)
                .await?;
        }
        // An update keeps the delivery cursor: notifications already sent are not sent again.
        let updated = sqlx::query(
            "UPDATE pushers SET device_id = $1, kind = $2, pusher_json = $3
             WHERE user_id = $4 AND app_id = $5 AND pushkey = $6",
        )
        .bind(new.device_id)
        .bind(new.kind)
        .bind(new.pusher_json)
        .bind(new.user_id)
        .bind(new.app_id)
        .bind(new.pushkey)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            sqlx::query(
                "INSERT INTO pushers (user_id, app_id, pushkey, device_id, kind, pusher_json, created_ts, last_stream_ordering)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(new.user_id)
            .bind(new.app_id)
            .bind(new.pushkey)
            .bind(new.device_id)
            .bind(new.kind)
            .bind(new.pusher_json)
            .bind(new.now)
            .bind(new.start_after)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Deletes one of the user's pushers; false if there was none.
    pub async fn delete_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool, sqlx::Error> {
        let done = self
            .execute_write(
                sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
                    .bind(user_id)
                    .bind(app_id)
                    .bind(pushkey),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn pushers(&self, user_id: &str) -> Result<Vec<PusherRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM pushers WHERE user_id = $1 ORDER BY created_ts, app_id, pushkey"
        ));
        let rows = sqlx::query(sql).bind(user_id).fetch_all(&self.pool).await?;
        rows.iter().map(pusher_row).collect()
    }

    pub async fn pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<Option<PusherRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3"
        ));
        let row = sqlx::query(sql).bind(user_id).bind(app_id).bind(pushkey).fetch_optional(&self.pool).await?;
        row.as_ref().map(pusher_row).transpose()
    }

    /// Pushers of `kind` that have notifications after their cursor and at most `up_to`.
    pub async fn pushers_with_pending(&self, kind: &str, up_to: i64) -> Result<Vec<PusherRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM pushers p WHERE p.kind = $1 AND EXISTS (
                SELECT 1 FROM event_push_actions a WHERE a.user_id = p.user_id
                AND a.stream_ordering > p.last_stream_ordering AND a.stream_ordering <= $2)"
        ));
        let rows = sqlx::query(sql).bind(kind).bind(up_to).fetch_all(&self.pool).await?;
        rows.iter().map(pusher_row).collect()
    }

    /// The user's notifications after `after` and at most `up_to`, oldest first.
    pub async fn pending_pushes(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<PendingPush>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT event_id, room_id, stream_ordering, actions FROM event_push_actions
             WHERE user_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3
             ORDER BY stream_ordering LIMIT $4",
        )
        .bind(user_id)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingPush {
                    event_id: r.try_get("event_id")?,
                    room_id: r.try_get("room_id")?,
                    stream_ordering: r.try_get("stream_ordering")?,
                    actions: r.try_get("actions")?,
                })
            })
            .collect()
    }

    /// Moves a pusher's delivery cursor forward (never back).
    pub async fn advance_pusher(
        &self,
        user_id: &str,
        app_id: &str,
        pushkey: &str,
        position: i64,
    ) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query(
                "UPDATE pushers SET last_stream_ordering = $1
             WHERE user_id = $2 AND app_id = $3 AND pushkey = $4 AND last_stream_ordering < $1",
            )
            .bind(position)
            .bind(user_id)
            .bind(app_id)
            .bind(pushkey),
        )
        .await?;
        Ok(())
    }

    /// Unread notifications of a user in all rooms (after each room's read receipt): the
    /// badge count a push gateway shows.
    pub async fn total_unread(&self, user_id: &str) -> Result<i64, sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM event_push_actions a
             WHERE a.user_id = $1 AND a.stream_ordering > COALESCE((
                SELECT MAX(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
                WHERE r.room_id = a.room_id AND r.user_id = $1 AND r.receipt_type IN ('m.read', 'm.read.private')), 0)",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        row.try_get("n")
    }
}

fn pusher_row(r: &sqlx::any::AnyRow) -> Result<PusherRow, sqlx::Error> {
    Ok(PusherRow {
        user_id: r.try_get("user_id")?,
        app_id: r.try_get("app_id")?,
        pushkey: r.try_get("pushkey")?,
        kind: r.try_get("kind")?,
        pusher_json: r.try_get("pusher_json")?,
        created_ts: r.try_get("created_ts")?,
        last_stream_ordering: r.try_get("last_stream_ordering")?,
    })
}
