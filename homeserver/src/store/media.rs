//! The media repository's rows: one per mxc:// URI, and cached thumbnails. The files
//! themselves are on disk (see `service::media::storage`); rows only name their sha256.

use sqlx::{Row, any::AnyRow};

use super::Store;

/// One piece of local media (or a reservation for it while `sha256` is `None`).
#[derive(Debug, Clone)]
pub struct MediaRow {
    pub media_id: String,
    pub user_id: String,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub sha256: Option<String>,
    pub size: i64,
    pub created_ts: i64,
    pub uploaded_ts: Option<i64>,
    pub last_access_ts: Option<i64>,
    pub upload_length: Option<i64>,
    pub upload_offset: i64,
    pub expected_sha256: Option<String>,
    pub updated_ts: i64,
}

impl MediaRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            media_id: r.try_get("media_id")?,
            user_id: r.try_get("user_id")?,
            content_type: r.try_get("content_type")?,
            filename: r.try_get("filename")?,
            sha256: r.try_get("sha256")?,
            size: r.try_get("size")?,
            created_ts: r.try_get("created_ts")?,
            uploaded_ts: r.try_get("uploaded_ts")?,
            last_access_ts: r.try_get("last_access_ts")?,
            upload_length: r.try_get("upload_length")?,
            upload_offset: r.try_get("upload_offset")?,
            expected_sha256: r.try_get("expected_sha256")?,
            updated_ts: r.try_get("updated_ts")?,
        })
    }
}

const MEDIA_COLUMNS: &str = "media_id, user_id, content_type, filename, sha256, size, created_ts, uploaded_ts, \
     last_access_ts, upload_length, upload_offset, expected_sha256, updated_ts";

/// A new row: finished media (`sha256` set) or a reservation.
#[derive(Debug, Clone)]
pub struct NewMedia<'a> {
    pub media_id: &'a str,
    pub user_id: &'a str,
    pub content_type: Option<&'a str>,
    pub filename: Option<&'a str>,
    pub sha256: Option<&'a str>,
    pub size: i64,
    pub upload_length: Option<i64>,
    pub expected_sha256: Option<&'a str>,
    pub now: i64,
}

/// A cached thumbnail.
#[derive(Debug, Clone)]
pub struct ThumbnailRow {
    pub content_type: String,
    pub sha256: String,
    pub size: i64,
}

/// Our copy of another server's media.
#[derive(Debug, Clone)]
pub struct RemoteMediaRow {
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub sha256: String,
    pub size: i64,
}

/// Media per user, for `homeserver media usage`.
#[derive(Debug, Clone)]
pub struct MediaUsageRow {
    pub user_id: String,
    pub count: i64,
    pub bytes: i64,
}

/// How a reservation's completion went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Done,
    /// It already has content, or it is gone.
    Taken,
    /// The content does not fit in the user's quota.
    OverQuota,
}

/// The bytes [`Store::user_media_bytes`] counts.
const QUOTA_USED: &str = "SELECT CAST(COALESCE(SUM(CASE WHEN sha256 IS NOT NULL THEN size ELSE COALESCE(upload_length, 0) END), 0) \
     AS BIGINT) AS total FROM media WHERE user_id = $1";

fn insert_media_query<'q>(m: &NewMedia<'q>) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(
        "INSERT INTO media (media_id, user_id, content_type, filename, sha256, size, created_ts, uploaded_ts,
                            upload_length, upload_offset, expected_sha256, updated_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $7)",
    )
    .bind(m.media_id)
    .bind(m.user_id)
    .bind(m.content_type)
    .bind(m.filename)
    .bind(m.sha256)
    .bind(m.size)
    .bind(m.now)
    .bind(m.sha256.map(|_| m.now))
    .bind(m.upload_length)
    .bind(m.expected_sha256)
}

/// Whether `more` bytes fit in the user's `quota`, inside a write transaction. On PostgreSQL
/// the no-op update locks the user's row until the transaction ends: the next upload of the
/// same user waits here and then counts what this one wrote.
async fn quota_fits(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    user_id: &str,
    more: i64,
    quota: i64,
) -> Result<bool, sqlx::Error> {
    sqlx::query("UPDATE users SET deactivated = deactivated WHERE user_id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    let used: i64 = sqlx::query(QUOTA_USED).bind(user_id).fetch_one(&mut **tx).await?.try_get("total")?;
    Ok(used.saturating_add(more) <= quota)
}

impl Store {
    pub async fn insert_media(&self, m: &NewMedia<'_>) -> Result<(), sqlx::Error> {
        self.execute_write(insert_media_query(m)).await?;
        Ok(())
    }

    /// Inserts `m` if the user's counted bytes ([`Store::user_media_bytes`]) plus `counted`
    /// stay within `quota`; false (and nothing inserted) otherwise. Check and insert are one
    /// step: the user's concurrent uploads queue for it (the user's row is locked on
    /// PostgreSQL; SQLite has one writer), so two cannot both pass a check only one fits.
    pub async fn insert_media_within_quota(
        &self,
        m: &NewMedia<'_>,
        counted: i64,
        quota: i64,
    ) -> Result<bool, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        if !quota_fits(&mut tx, m.user_id, counted, quota).await? {
            return Ok(false);
        }
        insert_media_query(m).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn media(&self, media_id: &str) -> Result<Option<MediaRow>, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {MEDIA_COLUMNS} FROM media WHERE media_id = $1")))
            .bind(media_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(MediaRow::from_row).transpose()
    }

    /// Attaches content to a reservation: [`Completion::Taken`] if it already has content (or
    /// is gone), and with a `quota` (bytes) [`Completion::OverQuota`] unless the user's
    /// counted bytes plus `size` fit, checked in the same step as the write.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete_media(
        &self,
        media_id: &str,
        sha256: &str,
        size: i64,
        content_type: Option<&str>,
        filename: Option<&str>,
        now: i64,
        quota: Option<i64>,
    ) -> Result<Completion, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        if let Some(quota) = quota {
            let user = sqlx::query("SELECT user_id FROM media WHERE media_id = $1 AND sha256 IS NULL")
                .bind(media_id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(user) = user else {
                return Ok(Completion::Taken);
            };
            let user_id: String = user.try_get("user_id")?;
            if !quota_fits(&mut tx, &user_id, size, quota).await? {
                return Ok(Completion::OverQuota);
            }
        }
        let done = sqlx::query(
            "UPDATE media SET sha256 = $2, size = $3, content_type = COALESCE($4, content_type),
                    filename = COALESCE($5, filename), uploaded_ts = $6, updated_ts = $6, upload_offset = $3
             WHERE media_id = $1 AND sha256 IS NULL",
        )
        .bind(media_id)
        .bind(sha256)
        .bind(size)
        .bind(content_type)
        .bind(filename)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if done.rows_affected() == 1 { Completion::Done } else { Completion::Taken })
    }

    /// Records how many bytes of a resumable upload are durably on disk.
    pub async fn set_upload_offset(&self, media_id: &str, offset: i64, now: i64) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("UPDATE media SET upload_offset = $2, updated_ts = $3 WHERE media_id = $1 AND sha256 IS NULL")
                .bind(media_id)
                .bind(offset)
                .bind(now),
        )
        .await?;
        Ok(())
    }

    /// What the quota counts for the user: finished media, and the announced length of each
    /// unfinished resumable upload (reserved from its announcement on).
    pub async fn user_media_bytes(&self, user_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query(QUOTA_USED).bind(user_id).fetch_one(&self.pool).await?.try_get("total")
    }

    /// Reservations of the user still waiting for content.
    pub async fn pending_media_count(&self, user_id: &str) -> Result<i64, sqlx::Error> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM media WHERE user_id = $1 AND sha256 IS NULL")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        row.try_get("n")
    }

    /// Notes a download (for retention).
    pub async fn touch_media(&self, media_id: &str, now: i64) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query("UPDATE media SET last_access_ts = $2 WHERE media_id = $1").bind(media_id).bind(now),
        )
        .await?;
        Ok(())
    }

    pub async fn media_thumbnail(
        &self,
        media_id: &str,
        width: i64,
        height: i64,
        method: &str,
    ) -> Result<Option<ThumbnailRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT content_type, sha256, size FROM media_thumbnails
             WHERE media_id = $1 AND width = $2 AND height = $3 AND method = $4",
        )
        .bind(media_id)
        .bind(width)
        .bind(height)
        .bind(method)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ThumbnailRow {
                content_type: r.try_get("content_type")?,
                sha256: r.try_get("sha256")?,
                size: r.try_get("size")?,
            })
        })
        .transpose()
    }

    pub async fn insert_media_thumbnail(
        &self,
        media_id: &str,
        width: i64,
        height: i64,
        method: &str,
        thumbnail: &ThumbnailRow,
    ) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query(
                "INSERT INTO media_thumbnails (media_id, width, height, method, content_type, sha256, size)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (media_id, width, height, method) DO NOTHING",
            )
            .bind(media_id)
            .bind(width)
            .bind(height)
            .bind(method)
            .bind(&thumbnail.content_type)
            .bind(&thumbnail.sha256)
            .bind(thumbnail.size),
        )
        .await?;
        Ok(())
    }

    /// Deletes a media row and its thumbnails; returns the content hashes they named (which
    /// may now be unreferenced), or `None` if there was no such media.
    pub async fn delete_media(&self, media_id: &str) -> Result<Option<Vec<String>>, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let Some(row) =
            sqlx::query("SELECT sha256 FROM media WHERE media_id = $1").bind(media_id).fetch_optional(&mut *tx).await?
        else {
            return Ok(None);
        };
        let mut hashes: Vec<String> = row.try_get::<Option<String>, _>("sha256")?.into_iter().collect();
        for r in sqlx::query("SELECT sha256 FROM media_thumbnails WHERE media_id = $1")
            .bind(media_id)
            .fetch_all(&mut *tx)
            .await?
        {
            hashes.push(r.try_get("sha256")?);
        }
        sqlx::query("DELETE FROM media_thumbnails WHERE media_id = $1").bind(media_id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM media WHERE media_id = $1").bind(media_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(hashes))
    }

    /// Whether any media or thumbnail row still names this content.
    pub async fn media_content_referenced(&self, sha256: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM media WHERE sha256 = $1) + (SELECT COUNT(*) FROM media_thumbnails WHERE sha256 = $1)
                  + (SELECT COUNT(*) FROM remote_media WHERE sha256 = $1) AS n",
        )
        .bind(sha256)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Our copy of `origin`'s media `media_id`, if we fetched it.
    pub async fn remote_media(&self, origin: &str, media_id: &str) -> Result<Option<RemoteMediaRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT content_type, filename, sha256, size FROM remote_media WHERE origin = $1 AND media_id = $2",
        )
        .bind(origin)
        .bind(media_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(RemoteMediaRow {
                content_type: r.try_get("content_type")?,
                filename: r.try_get("filename")?,
                sha256: r.try_get("sha256")?,
                size: r.try_get("size")?,
            })
        })
        .transpose()
    }

    /// Records fetched remote media (a concurrent fetch of the same media keeps the first row).
    pub async fn insert_remote_media(
        &self,
        origin: &str,
        media_id: &str,
        media: &RemoteMediaRow,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        self.execute_write(
            sqlx::query(
                "INSERT INTO remote_media (origin, media_id, content_type, filename, sha256, size, fetched_ts)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (origin, media_id) DO NOTHING",
            )
            .bind(origin)
            .bind(media_id)
            .bind(&media.content_type)
            .bind(&media.filename)
            .bind(&media.sha256)
            .bind(media.size)
            .bind(now),
        )
        .await?;
        Ok(())
    }

    /// Forgets remote media fetched before `before_ts`; returns the content hashes they named
    /// (which may now be unreferenced).
    pub async fn delete_remote_media(&self, before_ts: i64) -> Result<Vec<String>, sqlx::Error> {
        let (_serialized, mut tx) = self.begin_write().await?;
        let rows = sqlx::query("SELECT sha256 FROM remote_media WHERE fetched_ts < $1")
            .bind(before_ts)
            .fetch_all(&mut *tx)
            .await?;
        let hashes = rows.iter().map(|r| r.try_get("sha256")).collect::<Result<Vec<String>, _>>()?;
        sqlx::query("DELETE FROM remote_media WHERE fetched_ts < $1").bind(before_ts).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(hashes)
    }

    /// Every media row, optionally of one user, oldest first.
    pub async fn list_media(&self, user_id: Option<&str>) -> Result<Vec<MediaRow>, sqlx::Error> {
        let rows = match user_id {
            Some(user) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {MEDIA_COLUMNS} FROM media WHERE user_id = $1 ORDER BY created_ts, media_id"
                )))
                .bind(user)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {MEDIA_COLUMNS} FROM media ORDER BY created_ts, media_id"
                )))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(MediaRow::from_row).collect()
    }

    /// Finished media per user.
    pub async fn media_usage(&self) -> Result<Vec<MediaUsageRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT user_id, COUNT(*) AS n, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes FROM media
             WHERE sha256 IS NOT NULL GROUP BY user_id ORDER BY user_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MediaUsageRow { user_id: r.try_get("user_id")?, count: r.try_get("n")?, bytes: r.try_get("bytes")? })
            })
            .collect()
    }

    /// Unfinished uploads without progress since `before_ts`.
    pub async fn stale_pending_media(&self, before_ts: i64) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query("SELECT media_id FROM media WHERE sha256 IS NULL AND updated_ts < $1")
            .bind(before_ts)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.try_get("media_id")).collect()
    }

    /// Finished media neither downloaded nor uploaded since `before_ts`.
    pub async fn unused_media(&self, before_ts: i64) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT media_id FROM media WHERE sha256 IS NOT NULL AND COALESCE(last_access_ts, uploaded_ts, created_ts) < $1",
        )
        .bind(before_ts)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("media_id")).collect()
    }
}
