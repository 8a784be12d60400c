//! Queries for sliding sync (MSC4186): room recency for sorting lists.

use std::collections::HashMap;

use sqlx::Row;

use super::Store;

impl Store {
    /// The stream position of the newest event of each room (its "bump stamp").
    pub async fn latest_room_positions(&self, rooms: &[&str]) -> Result<HashMap<String, i64>, sqlx::Error> {
        if rooms.is_empty() {
            return Ok(HashMap::new());
        }
        let placeholders: Vec<String> = (1..=rooms.len()).map(|i| format!("${i}")).collect();
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT room_id, MAX(stream_ordering) AS latest FROM events WHERE room_id IN ({}) GROUP BY room_id",
            placeholders.join(", ")
        ));
        let mut query = sqlx::query(sql);
        for room in rooms {
            query = query.bind(*room);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("room_id")?, r.try_get("latest")?))).collect()
    }
}
