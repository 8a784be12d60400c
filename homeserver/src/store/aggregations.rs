//! The relations behind bundled aggregations (`unsigned.m.relations`): threads, edits and
//! references of the events a client is shown. Redacted relation events do not count.

use sqlx::Row;

use super::{
    EventRow, Store,
    rooms::{event_row, prefixed_columns},
};

/// The relation types the spec bundles (annotations are not bundled).
const BUNDLED: &str = "'m.thread', 'm.replace', 'm.reference'";

impl Store {
    /// For the given events: (target event id, rel_type, how many) of the relations that
    /// point at them.
    pub async fn relation_counts(&self, targets: &[&str]) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=targets.len()).map(|i| format!("${i}")).collect();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT r.relates_to_id, r.rel_type, COUNT(*) AS n FROM event_relations r
             JOIN events e ON e.event_id = r.event_id
             WHERE r.relates_to_id IN ({}) AND r.rel_type IN ({BUNDLED}) AND e.redacted_by IS NULL
             GROUP BY r.relates_to_id, r.rel_type",
            placeholders.join(", ")
        ));
        let mut query = sqlx::query(sql);
        for target in targets {
            query = query.bind(*target);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("relates_to_id")?, r.try_get("rel_type")?, r.try_get("n")?))).collect()
    }

    /// The newest (by stream position) thread reply to `root`.
    pub async fn latest_thread_reply(&self, root: &str) -> Result<Option<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM event_relations r JOIN events e ON e.event_id = r.event_id
             WHERE r.relates_to_id = $1 AND r.rel_type = 'm.thread' AND e.redacted_by IS NULL
             ORDER BY r.stream_ordering DESC LIMIT 1",
            prefixed_columns("e")
        ));
        let row = sqlx::query(sql).bind(root).fetch_optional(&self.pool).await?;
        row.as_ref().map(event_row).transpose()
    }

    /// Whether `user` wrote a reply in the thread of `root`.
    pub async fn replied_in_thread(&self, root: &str, user: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM event_relations r JOIN events e ON e.event_id = r.event_id
             WHERE r.relates_to_id = $1 AND r.rel_type = 'm.thread' AND r.sender = $2 AND e.redacted_by IS NULL",
        )
        .bind(root)
        .bind(user)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// The edit of `target` that applies: by the original sender, of the original's type,
    /// newest by `origin_server_ts`, ties broken by the greater event id (as the spec says).
    pub async fn latest_edit(
        &self,
        target: &str,
        sender: &str,
        event_type: &str,
    ) -> Result<Option<EventRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM event_relations r JOIN events e ON e.event_id = r.event_id
             WHERE r.relates_to_id = $1 AND r.rel_type = 'm.replace' AND r.sender = $2 AND r.event_type = $3
               AND e.redacted_by IS NULL
             ORDER BY e.origin_server_ts DESC, e.event_id DESC LIMIT 1",
            prefixed_columns("e")
        ));
        let row = sqlx::query(sql).bind(target).bind(sender).bind(event_type).fetch_optional(&self.pool).await?;
        row.as_ref().map(event_row).transpose()
    }

    /// Ids of the events referencing `target` (`m.reference`), oldest first, at most `limit`.
    pub async fn references(&self, target: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT r.event_id FROM event_relations r JOIN events e ON e.event_id = r.event_id
             WHERE r.relates_to_id = $1 AND r.rel_type = 'm.reference' AND e.redacted_by IS NULL
             ORDER BY r.stream_ordering LIMIT $2",
        )
        .bind(target)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("event_id")).collect()
    }
}
