//! Presence rows.

use sqlx::Row;

use super::Store;

#[derive(Debug, Clone)]
pub struct PresenceRow {
    pub user_id: String,
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active_ts: i64,
    pub stream_id: i64,
}

fn presence_row(r: &sqlx::any::AnyRow) -> Result<PresenceRow, sqlx::Error> {
    Ok(PresenceRow {
        user_id: r.try_get("user_id")?,
        state: r.try_get("state")?,
        status_msg: r.try_get("status_msg")?,
        last_active_ts: r.try_get("last_active_ts")?,
        stream_id: r.try_get("stream_id")?,
    })
}

impl Store {
    pub async fn presence(&self, user_id: &str) -> Result<Option<PresenceRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT user_id, state, status_msg, last_active_ts, stream_id FROM presence WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(presence_row).transpose()
    }

    pub async fn set_presence(&self, row: &PresenceRow) -> Result<(), sqlx::Error> {
        self.execute_write(sqlx::query(
            "INSERT INTO presence (user_id, state, status_msg, last_active_ts, stream_id) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id) DO UPDATE SET state = $2, status_msg = $3, last_active_ts = $4, stream_id = $5",
        )
        .bind(&row.user_id)
        .bind(&row.state)
        .bind(&row.status_msg)
        .bind(row.last_active_ts)
        .bind(row.stream_id)
        )
        .await?;
        Ok(())
    }

    /// Records activity without announcing it (no new stream position).
    pub async fn touch_presence(&self, user_id: &str, now: i64) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("UPDATE presence SET last_active_ts = $1 WHERE user_id = $2").bind(now).bind(user_id),
        )
        .await?;
        Ok(())
    }

    /// Presence changed in `(from, to]` of users who share a joined room with `user_id`
    /// (and the user's own).
    /// Every presence change in `(from, to]`, oldest first.
    pub async fn presence_changes_between(&self, from: i64, to: i64) -> Result<Vec<PresenceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT user_id, state, status_msg, last_active_ts, stream_id FROM presence
             WHERE stream_id > $1 AND stream_id <= $2 ORDER BY stream_id",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(presence_row).collect()
    }

    pub async fn presence_changes_for(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<PresenceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT user_id, state, status_msg, last_active_ts, stream_id FROM presence
             WHERE stream_id > $2 AND stream_id <= $3 AND (user_id = $1 OR user_id IN (
                SELECT other.state_key FROM room_current_state mine
                JOIN room_current_state other ON other.room_id = mine.room_id
                WHERE mine.type = 'm.room.member' AND mine.state_key = $1 AND mine.membership = 'join'
                  AND other.type = 'm.room.member' AND other.membership = 'join'))
             ORDER BY stream_id",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(presence_row).collect()
    }

    /// The current presence of users who came to share a joined room with `user_id` in
    /// `(from, to]`: members who joined one of the user's rooms, and everyone in a room the
    /// user joined. Their presence may not have changed for hours, yet the user's client has
    /// never seen it.
    pub async fn presence_of_new_room_peers(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<PresenceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT user_id, state, status_msg, last_active_ts, stream_id FROM presence
             WHERE user_id <> $1 AND user_id IN (
                SELECT cur.state_key FROM events e
                JOIN room_current_state mine ON mine.room_id = e.room_id
                JOIN room_current_state cur ON cur.room_id = e.room_id AND cur.state_key = e.state_key
                WHERE e.type = 'm.room.member' AND e.stream_ordering > $2 AND e.stream_ordering <= $3
                  AND mine.type = 'm.room.member' AND mine.state_key = $1 AND mine.membership = 'join'
                  AND cur.type = 'm.room.member' AND cur.membership = 'join'
                UNION
                SELECT other.state_key FROM events e
                JOIN room_current_state other ON other.room_id = e.room_id
                WHERE e.type = 'm.room.member' AND e.state_key = $1
                  AND e.stream_ordering > $2 AND e.stream_ordering <= $3
                  AND other.type = 'm.room.member' AND other.membership = 'join')
             ORDER BY stream_id",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(presence_row).collect()
    }

    /// Do two users share a joined room?
    pub async fn share_a_room(&self, a: &str, b: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(
            "SELECT 1 FROM room_current_state x JOIN room_current_state y ON x.room_id = y.room_id
             WHERE x.type = 'm.room.member' AND x.state_key = $1 AND x.membership = 'join'
               AND y.type = 'm.room.member' AND y.state_key = $2 AND y.membership = 'join' LIMIT 1",
        )
        .bind(a)
        .bind(b)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Users marked online or unavailable whose last activity is before `before`.
    pub async fn present_users_idle_since(&self, before: i64) -> Result<Vec<PresenceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT user_id, state, status_msg, last_active_ts, stream_id FROM presence
             WHERE state <> 'offline' AND last_active_ts < $1",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(presence_row).collect()
    }
}

impl Store {
    /// Membership changes of other users in `(from, to]` in rooms `user_id` is joined to:
    /// (member, new membership), oldest first.
    pub async fn membership_changes_in_my_rooms(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT e.state_key, e.json FROM events e
             JOIN room_current_state mine ON mine.room_id = e.room_id
             WHERE mine.type = 'm.room.member' AND mine.state_key = $1 AND mine.membership = 'join'
               AND e.type = 'm.room.member' AND e.stream_ordering > $2 AND e.stream_ordering <= $3
             ORDER BY e.stream_ordering",
        )
        .bind(user_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("json")?;
                Ok((r.try_get("state_key")?, super::rooms::membership_in(&json)))
            })
            .collect()
    }
}
