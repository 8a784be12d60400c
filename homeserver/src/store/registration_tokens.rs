//! Registration tokens (`m.login.registration_token`).

use sqlx::Row;

use super::Store;

#[derive(Debug, Clone)]
pub struct RegistrationTokenRow {
    pub token: String,
    pub uses_allowed: Option<i64>,
    pub completed: i64,
    pub expiry_ts: Option<i64>,
    pub created_ts: i64,
}

impl RegistrationTokenRow {
    pub fn is_valid_at(&self, now: i64) -> bool {
        self.uses_allowed.is_none_or(|allowed| self.completed < allowed)
            && self.expiry_ts.is_none_or(|expiry| expiry > now)
    }
}

impl Store {
    /// Creates a token; false if it already exists.
    pub async fn create_registration_token(
        &self,
        token: &str,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = self
            .execute_write(
                sqlx::query(
                    "INSERT INTO registration_tokens (token, uses_allowed, completed, expiry_ts, created_ts)
             VALUES ($1, $2, 0, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(token)
                .bind(uses_allowed)
                .bind(expiry_ts)
                .bind(now),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn registration_token(&self, token: &str) -> Result<Option<RegistrationTokenRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT token, uses_allowed, completed, expiry_ts, created_ts FROM registration_tokens WHERE token = $1",
        )
        .bind(token)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_row).transpose()
    }

    pub async fn registration_tokens(&self) -> Result<Vec<RegistrationTokenRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT token, uses_allowed, completed, expiry_ts, created_ts FROM registration_tokens ORDER BY created_ts, token",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_row).collect()
    }

    /// Deletes a token; false if there was none.
    pub async fn revoke_registration_token(&self, token: &str) -> Result<bool, sqlx::Error> {
        let done =
            self.execute_write(sqlx::query("DELETE FROM registration_tokens WHERE token = $1").bind(token)).await?;
        Ok(done.rows_affected() == 1)
    }
}

fn token_row(r: &sqlx::any::AnyRow) -> Result<RegistrationTokenRow, sqlx::Error> {
    Ok(RegistrationTokenRow {
        token: r.try_get("token")?,
        uses_allowed: r.try_get("uses_allowed")?,
        completed: r.try_get("completed")?,
        expiry_ts: r.try_get("expiry_ts")?,
        created_ts: r.try_get("created_ts")?,
    })
}
