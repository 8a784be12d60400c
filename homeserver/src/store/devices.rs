//! Devices and their access tokens.

use sqlx::{Any, Row, Transaction};

use super::Store;

/// A device to create together with its access token.
#[derive(Debug, Clone)]
pub struct NewDevice<'a> {
    pub device_id: &'a str,
    pub display_name: Option<&'a str>,
    /// SHA-256 (hex) of the new access token.
    pub token_hash: &'a str,
    pub ip: Option<&'a str>,
}

/// One row of `devices`.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

/// Who an access token belongs to.
#[derive(Debug, Clone)]
pub struct AccessTokenOwner {
    pub user_id: String,
    pub device_id: String,
    pub deactivated: bool,
    pub last_seen_ts: Option<i64>,
}

pub(super) async fn insert_device_with_token(
    tx: &mut Transaction<'static, Any>,
    user_id: &str,
    device: &NewDevice<'_>,
    now: i64,
) -> Result<(), sqlx::Error> {
    // A login with an existing device id keeps the device (and its display name) and
    // replaces its access token, as the spec says.
    sqlx::query(
        "INSERT INTO devices (user_id, device_id, display_name, last_seen_ts, last_seen_ip, created_ts)
         VALUES ($1, $2, $3, $4, $5, $4)
         ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen_ts = $4, last_seen_ip = $5",
    )
    .bind(user_id)
    .bind(device.device_id)
    .bind(device.display_name)
    .bind(now)
    .bind(device.ip)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM access_tokens WHERE user_id = $1 AND device_id = $2")
        .bind(user_id)
        .bind(device.device_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts) VALUES ($1, $2, $3, $4)")
        .bind(device.token_hash)
        .bind(user_id)
        .bind(device.device_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// Creates (or takes over) a device for a login and gives it a new access token.
    pub async fn login_device(&self, user_id: &str, device: &NewDevice<'_>, now: i64) -> Result<(), sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        insert_device_with_token(&mut tx, user_id, device, now).await?;
        tx.commit().await
    }

    pub async fn access_token_owner(&self, token_hash: &str) -> Result<Option<AccessTokenOwner>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT t.user_id, t.device_id, u.deactivated, d.last_seen_ts
             FROM access_tokens t
             JOIN users u ON u.user_id = t.user_id
             JOIN devices d ON d.user_id = t.user_id AND d.device_id = t.device_id
             WHERE t.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AccessTokenOwner {
                user_id: r.try_get("user_id")?,
                device_id: r.try_get("device_id")?,
                deactivated: r.try_get::<i64, _>("deactivated")? != 0,
                last_seen_ts: r.try_get("last_seen_ts")?,
            })
        })
        .transpose()
    }

    pub async fn touch_device(
        &self,
        user_id: &str,
        device_id: &str,
        ip: Option<&str>,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query(
                "UPDATE devices SET last_seen_ts = $1, last_seen_ip = $2 WHERE user_id = $3 AND device_id = $4",
            )
            .bind(now)
            .bind(ip)
            .bind(user_id)
            .bind(device_id),
        )
        .await?;
        Ok(())
    }

    pub async fn devices(&self, user_id: &str) -> Result<Vec<DeviceRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices
             WHERE user_id = $1 ORDER BY created_ts, device_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(device_row).collect()
    }

    pub async fn device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices
             WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user_id)
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_row).transpose()
    }

    /// Renames a device; false if it does not exist.
    pub async fn rename_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let done = self
            .execute_write(
                sqlx::query("UPDATE devices SET display_name = $1 WHERE user_id = $2 AND device_id = $3")
                    .bind(display_name)
                    .bind(user_id)
                    .bind(device_id),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes devices (and so their tokens); returns how many existed.
    pub async fn delete_devices(&self, user_id: &str, device_ids: &[&str]) -> Result<u64, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let mut deleted = 0;
        for device_id in device_ids {
            deleted += sqlx::query("DELETE FROM devices WHERE user_id = $1 AND device_id = $2")
                .bind(user_id)
                .bind(*device_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    pub async fn delete_all_devices(&self, user_id: &str) -> Result<u64, sqlx::Error> {
        let done = self.execute_write(sqlx::query("DELETE FROM devices WHERE user_id = $1").bind(user_id)).await?;
        Ok(done.rows_affected())
    }
}

fn device_row(r: &sqlx::any::AnyRow) -> Result<DeviceRow, sqlx::Error> {
    Ok(DeviceRow {
        device_id: r.try_get("device_id")?,
        display_name: r.try_get("display_name")?,
        last_seen_ts: r.try_get("last_seen_ts")?,
        last_seen_ip: r.try_get("last_seen_ip")?,
    })
}
