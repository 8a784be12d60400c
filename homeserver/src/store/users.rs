//! Accounts.

use sqlx::Row;

use super::{NewDevice, Store, devices::insert_device_with_token};

/// One row of `users`.
#[derive(Debug, Clone)]
pub struct UserRow {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub deactivated: bool,
    pub created_ts: i64,
}

/// Everything written when an account is created, in one transaction.
#[derive(Debug)]
pub struct NewAccount<'a> {
    pub user_id: &'a str,
    pub localpart: &'a str,
    pub password_hash: Option<&'a str>,
    pub is_admin: bool,
    pub now: i64,
    /// The first device and its access token, unless login is inhibited.
    pub device: Option<NewDevice<'a>>,
    /// A registration token to spend; creation fails if it is no longer valid.
    pub registration_token: Option<&'a str>,
    /// The first display name (clients show the localpart otherwise; Synapse sets it too).
    pub display_name: Option<&'a str>,
}

/// Why an account could not be created.
#[derive(Debug, PartialEq, Eq)]
pub enum CreateAccountOutcome {
    Created,
    UserInUse,
    RegistrationTokenInvalid,
}

impl Store {
    pub async fn user(&self, user_id: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT user_id, password_hash, is_admin, deactivated, created_ts FROM users WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| user_row(&r)).transpose()
    }

    pub async fn localpart_exists(&self, localpart: &str) -> Result<bool, sqlx::Error> {
        let row =
            sqlx::query("SELECT 1 FROM users WHERE localpart = $1").bind(localpart).fetch_optional(&self.pool).await?;
        Ok(row.is_some())
    }

    /// All accounts, oldest first.
    pub async fn users(&self) -> Result<Vec<UserRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT user_id, password_hash, is_admin, deactivated, created_ts FROM users ORDER BY created_ts, user_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(user_row).collect()
    }

    /// Creates the account, its first device and token, and spends the registration token,
    /// all or nothing.
    pub async fn create_account(&self, new: NewAccount<'_>) -> Result<CreateAccountOutcome, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (user_id, localpart, password_hash, is_admin, deactivated, created_ts)
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT DO NOTHING",
        )
        .bind(new.user_id)
        .bind(new.localpart)
        .bind(new.password_hash)
        .bind(i64::from(new.is_admin))
        .bind(new.now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Ok(CreateAccountOutcome::UserInUse);
        }
        if let Some(name) = new.display_name {
            let value = serde_json::Value::from(name).to_string();
            sqlx::query("INSERT INTO profile_fields (user_id, field, value) VALUES ($1, 'displayname', $2)")
                .bind(new.user_id)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(token) = new.registration_token {
            let spent = sqlx::query(
                "UPDATE registration_tokens SET completed = completed + 1
                 WHERE token = $1
                   AND (uses_allowed IS NULL OR completed < uses_allowed)
                   AND (expiry_ts IS NULL OR expiry_ts > $2)",
            )
            .bind(token)
            .bind(new.now)
            .execute(&mut *tx)
            .await?;
            if spent.rows_affected() == 0 {
                return Ok(CreateAccountOutcome::RegistrationTokenInvalid);
            }
        }
        if let Some(device) = &new.device {
            insert_device_with_token(&mut tx, new.user_id, device, new.now).await?;
        }
        tx.commit().await?;
        Ok(CreateAccountOutcome::Created)
    }

    /// Replaces the password hash. With `keep_device`, every other device is logged out;
    /// with `logout_all`, every device is.
    pub async fn set_password(
        &self,
        user_id: &str,
        password_hash: &str,
        logout: LogoutDevices<'_>,
    ) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let updated = sqlx::query("UPDATE users SET password_hash = $1 WHERE user_id = $2 AND deactivated = 0")
            .bind(password_hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        match logout {
            LogoutDevices::None => {}
            LogoutDevices::AllExcept(device_id) => {
                sqlx::query("DELETE FROM devices WHERE user_id = $1 AND device_id <> $2")
                    .bind(user_id)
                    .bind(device_id)
                    .execute(&mut *tx)
                    .await?;
            }
            LogoutDevices::All => {
                sqlx::query("DELETE FROM devices WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Deactivates the account: no password, no devices, no profile. The row stays so the
    /// user id is never handed out again.
    pub async fn deactivate_user(&self, user_id: &str) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = $1 AND deactivated = 0",
        )
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        for sql in [
            "DELETE FROM devices WHERE user_id = $1",
            "DELETE FROM profile_fields WHERE user_id = $1",
            "DELETE FROM uiaa_sessions WHERE user_id = $1",
        ] {
            sqlx::query(sql).bind(user_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(updated.rows_affected() == 1)
    }
}

/// Which devices a password change logs out.
#[derive(Debug, Clone, Copy)]
pub enum LogoutDevices<'a> {
    None,
    AllExcept(&'a str),
    All,
}

fn user_row(r: &sqlx::any::AnyRow) -> Result<UserRow, sqlx::Error> {
    Ok(UserRow {
        user_id: r.try_get("user_id")?,
        password_hash: r.try_get("password_hash")?,
        is_admin: r.try_get::<i64, _>("is_admin")? != 0,
        deactivated: r.try_get::<i64, _>("deactivated")? != 0,
        created_ts: r.try_get("created_ts")?,
    })
}
