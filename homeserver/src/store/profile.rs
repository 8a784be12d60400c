//! Profile fields (`displayname`, `avatar_url` and custom fields), values as JSON text.

use sqlx::Row;

use super::Store;

impl Store {
    /// Every field of the user's profile as (name, JSON text), sorted by name.
    pub async fn profile_fields(&self, user_id: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
        let rows = sqlx::query("SELECT field, value FROM profile_fields WHERE user_id = $1 ORDER BY field")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("field")?, r.try_get("value")?))).collect()
    }

    pub async fn profile_field(&self, user_id: &str, field: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT value FROM profile_fields WHERE user_id = $1 AND field = $2")
            .bind(user_id)
            .bind(field)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("value")).transpose()
    }

    /// Sets one field if the whole profile stays within `max_total_bytes` (the sum of
    /// field name and value lengths); returns false and changes nothing otherwise.
    pub async fn set_profile_field(
        &self,
        user_id: &str,
        field: &str,
        value_json: &str,
        max_total_bytes: usize,
    ) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let rows = sqlx::query("SELECT field, value FROM profile_fields WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
        let mut total = field.len() + value_json.len();
        for r in &rows {
            let (name, value): (String, String) = (r.try_get("field")?, r.try_get("value")?);
            if name != field {
                total += name.len() + value.len();
            }
        }
        if total > max_total_bytes {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO profile_fields (user_id, field, value) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, field) DO UPDATE SET value = $3",
        )
        .bind(user_id)
        .bind(field)
        .bind(value_json)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn delete_profile_field(&self, user_id: &str, field: &str) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("DELETE FROM profile_fields WHERE user_id = $1 AND field = $2").bind(user_id).bind(field),
        )
        .await?;
        Ok(())
    }
}
