//! User-interactive authentication sessions.

use sqlx::Row;

use super::Store;

#[derive(Debug, Clone)]
pub struct UiaaSessionRow {
    pub session_id: String,
    pub action: String,
    pub user_id: Option<String>,
    /// Completed stages, e.g. `["m.login.registration_token"]`.
    pub completed: Vec<String>,
    pub registration_token: Option<String>,
    pub created_ts: i64,
}

impl Store {
    pub async fn create_uiaa_session(
        &self,
        session_id: &str,
        action: &str,
        user_id: Option<&str>,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        self.execute_write(sqlx::query(
            "INSERT INTO uiaa_sessions (session_id, action, user_id, completed, created_ts) VALUES ($1, $2, $3, '[]', $4)",
        )
        .bind(session_id)
        .bind(action)
        .bind(user_id)
        .bind(now)
        )
        .await?;
        Ok(())
    }

    /// The session if it exists and was created after `not_before`.
    pub async fn uiaa_session(&self, session_id: &str, not_before: i64) -> Result<Option<UiaaSessionRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT session_id, action, user_id, completed, registration_token, created_ts
             FROM uiaa_sessions WHERE session_id = $1 AND created_ts >= $2",
        )
        .bind(session_id)
        .bind(not_before)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let completed: String = r.try_get("completed")?;
            Ok(UiaaSessionRow {
                session_id: r.try_get("session_id")?,
                action: r.try_get("action")?,
                user_id: r.try_get("user_id")?,
                completed: serde_json::from_str(&completed).unwrap_or_default(),
                registration_token: r.try_get("registration_token")?,
                created_ts: r.try_get("created_ts")?,
            })
        })
        .transpose()
    }

    pub async fn update_uiaa_session(
        &self,
        session_id: &str,
        completed: &[String],
        registration_token: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let completed = serde_json::to_string(completed).unwrap_or_else(|_| "[]".to_owned());
        self.execute_write(
            sqlx::query("UPDATE uiaa_sessions SET completed = $1, registration_token = $2 WHERE session_id = $3")
                .bind(completed)
                .bind(registration_token)
                .bind(session_id),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_uiaa_session(&self, session_id: &str) -> Result<(), sqlx::Error> {
        self.execute_write(sqlx::query("DELETE FROM uiaa_sessions WHERE session_id = $1").bind(session_id)).await?;
        Ok(())
    }

    /// Forgets sessions created before `before`.
    pub async fn expire_uiaa_sessions(&self, before: i64) -> Result<u64, sqlx::Error> {
        let done =
            self.execute_write(sqlx::query("DELETE FROM uiaa_sessions WHERE created_ts < $1").bind(before)).await?;
        Ok(done.rows_affected())
    }
}
