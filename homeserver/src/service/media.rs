//! The media repository: uploads (plain, asynchronous and resumable), downloads, thumbnails,
//! limits, quota and retention. Files are handled by [`storage`], images by [`thumbnail`];
//! rows by `store::media`.

pub mod multipart;
pub mod remote;
pub mod single_flight;
pub mod storage;
pub mod thumbnail;

use std::{
    collections::HashSet,
    io,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use ruma::{OwnedMxcUri, ServerName, UserId};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use self::{
    single_flight::{Shared, SingleFlight, unshare},
    storage::{MediaStorage, ReceiveError, receive},
    thumbnail::Method,
};
use super::Hub;
use crate::{
    error::{Error, Result},
    store::{Completion, MediaRow, NewMedia, RemoteMediaRow, ThumbnailRow, now_ms},
};

/// Media ids (and temporary names) are drawn from this alphabet.
pub const MEDIA_ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Most unfinished uploads (`/create` or resumable) one user may have open at once.
const MAX_PENDING_PER_USER: i64 = 100;
/// How often a resumable upload makes its progress durable while receiving.
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// A download is recorded as an access at most this often (for retention), not on every read.
const ACCESS_GRANULARITY_MS: i64 = 3_600_000;

/// The media repository: its files, its locks and its work in flight.
pub struct Media {
    hub: Hub,
    pub storage: MediaStorage,
    /// Serialises "rename into content storage + write the row" against "delete the row +
    /// remove the unreferenced file", so deduplicated content is never removed under a new row.
    content_lock: tokio::sync::Mutex<()>,
    /// Resumable uploads currently receiving a PATCH (one writer per upload).
    busy: Arc<Mutex<HashSet<String>>>,
    /// Thumbnails being made, by (media id, configured size): one generation per thumbnail.
    thumbnails: SingleFlight<(String, u32, u32, Method), Shared<ThumbnailRow>>,
    /// Thumbnail generations at once (`media.thumbnail_concurrency`): each decodes up to
    /// 64 MiB of image on a blocking thread.
    thumbnail_permits: Arc<tokio::sync::Semaphore>,
    /// Generations running now, and the most there were at once (a metric).
    generating: Arc<AtomicI64>,
    generating_peak: Arc<AtomicI64>,
    /// Other servers' media being fetched, by (origin, media id): one fetch per file.
    remote: SingleFlight<(String, String), Shared<RemoteMediaRow>>,
}

impl Media {
    pub fn new(hub: Hub, root: PathBuf, thumbnail_concurrency: usize) -> Self {
        Self {
            hub,
            storage: MediaStorage::new(root),
            content_lock: tokio::sync::Mutex::new(()),
            busy: Arc::new(Mutex::new(HashSet::new())),
            thumbnails: SingleFlight::default(),
            thumbnail_permits: Arc::new(tokio::sync::Semaphore::new(thumbnail_concurrency.max(1))),
            generating: Arc::new(AtomicI64::new(0)),
            generating_peak: Arc::new(AtomicI64::new(0)),
            remote: SingleFlight::default(),
        }
    }
}

/// Counts a running thumbnail generation for as long as it lives (it moves into the
/// blocking task, so it ends when the work does, even if the request went away).
struct Generating(Arc<AtomicI64>);

impl Drop for Generating {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What an upload says about itself.
#[derive(Debug, Clone, Default)]
pub struct UploadMeta {
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// The `Content-Length` if the client sent one.
    pub content_length: Option<u64>,
}

/// Which media a download asks for, and on which endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Download<'a> {
    pub server_name: &'a str,
    pub media_id: &'a str,
    /// How long to wait for the content of a reservation (or of a remote fetch).
    pub timeout: Duration,
    /// False on the legacy unauthenticated endpoints, which serve only our media from
    /// before `media.unauthenticated_cutoff_ms`.
    pub authenticated: bool,
}

/// A thumbnail asked for: of which media, the size wanted and how to fit it.
#[derive(Debug, Clone, Copy)]
pub struct ThumbnailRequest<'a> {
    pub media: Download<'a>,
    pub width: u64,
    pub height: u64,
    pub method: Method,
}

/// A `/create` reservation: its URI, and until when content may be uploaded to it.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub content_uri: OwnedMxcUri,
    pub expires_at_ms: i64,
}

/// Content ready to be streamed.
#[derive(Debug, Clone)]
pub struct MediaContent {
    pub path: PathBuf,
    pub size: u64,
    pub content_type: String,
    pub filename: Option<String>,
    pub sha256: String,
}

/// The state of a resumable upload.
#[derive(Debug, Clone)]
pub struct ResumableStatus {
    pub content_uri: OwnedMxcUri,
    pub offset: u64,
    pub length: u64,
    pub complete: bool,
}

/// A resumable upload's announcement.
#[derive(Debug, Clone)]
pub struct NewResumable {
    pub length: u64,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// The whole file's sha256, hex; checked when the last byte arrives.
    pub sha256: Option<String>,
}

fn new_media_id() -> String {
    crate::service::credentials::random_string(MEDIA_ID_ALPHABET, 24)
}

fn io_error(e: io::Error) -> Error {
    Error::internal(format!("media storage: {e}"))
}

/// An error for every caller of a [`SingleFlight`] run.
fn shared(e: impl Into<Error>) -> Arc<Error> {
    Arc::new(e.into())
}

/// A content type we store: a `type/subtype` without control characters, else none.
fn clean_content_type(content_type: Option<String>) -> Option<String> {
    content_type.filter(|ct| {
        ct.len() <= 255 && ct.contains('/') && ct.chars().all(|c| !c.is_control()) && !ct.trim().is_empty()
    })
}

fn check_filename(filename: &Option<String>) -> Result<()> {
    if let Some(name) = filename
        && (name.len() > 1024 || name.chars().any(char::is_control))
    {
        return Err(Error::InvalidParam("The filename is too long or has control characters".to_owned()));
    }
    Ok(())
}

pub(crate) fn check_media_id(media_id: &str) -> Result<()> {
    if media_id.is_empty()
        || media_id.len() > 255
        || !media_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::NotFound("Media not found".to_owned()));
    }
    Ok(())
}

impl Media {
    pub fn max_upload_bytes(&self) -> u64 {
        let s = self.hub.services();
        s.settings.media.max_upload_bytes
    }

    /// Deletes leftovers of uploads a killed process never finished. Call once at start.
    pub async fn prepare(&self) -> Result<()> {
        let removed = self.storage.prepare().await.map_err(io_error)?;
        if removed > 0 {
            tracing::info!(removed, "deleted unfinished uploads left by the last run");
        }
        Ok(())
    }

    fn mxc(&self, media_id: &str) -> OwnedMxcUri {
        let s = self.hub.services();
        OwnedMxcUri::from(format!("mxc://{}/{media_id}", s.settings.server_name))
    }

    /// The most bytes this user may still upload: (limit, whether it is the quota).
    async fn upload_allowance(&self, user_id: &UserId) -> Result<(u64, bool)> {
        let s = self.hub.services();
        let max = self.max_upload_bytes();
        let quota = s.settings.media.quota_bytes_per_user;
        if quota == 0 {
            return Ok((max, false));
        }
        let used = u64::try_from(s.store.user_media_bytes(user_id.as_str()).await?).unwrap_or(0);
        let left = quota.saturating_sub(used);
        Ok(if left < max { (left, true) } else { (max, false) })
    }

    fn quota_error(&self) -> Error {
        let s = self.hub.services();
        Error::Forbidden(format!(
            "This upload would exceed your media quota of {} bytes",
            s.settings.media.quota_bytes_per_user
        ))
    }

    /// Checks an announced size against the limit and the quota, before any byte is read.
    async fn check_announced(&self, user_id: &UserId, length: Option<u64>) -> Result<(u64, bool)> {
        let (allowance, is_quota) = self.upload_allowance(user_id).await?;
        if let Some(length) = length {
            if length > self.max_upload_bytes() {
                return Err(Error::TooLarge { limit: usize::try_from(self.max_upload_bytes()).unwrap_or(usize::MAX) });
            }
            if length > allowance {
                return Err(self.quota_error());
            }
        }
        Ok((allowance, is_quota))
    }

    /// Receives a body into a temporary file within the allowance.
    async fn receive_body<S>(&self, body: S, allowance: u64, is_quota: bool) -> Result<storage::Received>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        match receive(&self.storage, body, allowance).await {
            Ok(received) => Ok(received),
            Err(ReceiveError::TooLarge) if is_quota => Err(self.quota_error()),
            Err(ReceiveError::TooLarge) => {
                Err(Error::TooLarge { limit: usize::try_from(self.max_upload_bytes()).unwrap_or(usize::MAX) })
            }
            Err(ReceiveError::Io(e)) => Err(Error::Unknown(format!("The upload did not complete: {e}"))),
        }
    }

    /// `POST /upload`: streams the body to disk and returns the new mxc URI.
    pub async fn upload<S>(&self, user_id: &UserId, meta: UploadMeta, body: S) -> Result<OwnedMxcUri>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        check_filename(&meta.filename)?;
        let (allowance, is_quota) = self.check_announced(user_id, meta.content_length).await?;
        let received = self.receive_body(body, allowance, is_quota).await?;
        let media_id = new_media_id();
        let content_type = clean_content_type(meta.content_type);
        let _guard = self.content_lock.lock().await;
        let size = i64::try_from(received.size).unwrap_or(i64::MAX);
        let sha256 = received.sha256.clone();
        self.storage.commit(received.file, &sha256).await.map_err(io_error)?;
        let media = NewMedia {
            media_id: &media_id,
            user_id: user_id.as_str(),
            content_type: content_type.as_deref(),
            filename: meta.filename.as_deref(),
            sha256: Some(&sha256),
            size,
            upload_length: None,
            expected_sha256: None,
            now: now_ms(),
        };
        if !self.insert_within_quota(&media, size).await? {
            // Other uploads of the user finished first and took what was left.
            self.remove_if_unreferenced(&sha256).await?;
            return Err(self.quota_error());
        }
        Ok(self.mxc(&media_id))
    }

    /// Inserts a media row if `counted` more bytes fit in the user's quota (the check and
    /// the insert in one step); false if they do not.
    async fn insert_within_quota(&self, media: &NewMedia<'_>, counted: i64) -> Result<bool> {
        let s = self.hub.services();
        let quota = s.settings.media.quota_bytes_per_user;
        if quota == 0 {
            s.store.insert_media(media).await?;
            return Ok(true);
        }
        Ok(s.store.insert_media_within_quota(media, counted, i64::try_from(quota).unwrap_or(i64::MAX)).await?)
    }

    fn quota_bytes(&self) -> Option<i64> {
        let s = self.hub.services();
        let quota = s.settings.media.quota_bytes_per_user;
        (quota > 0).then(|| i64::try_from(quota).unwrap_or(i64::MAX))
    }

    /// `/create`: a reservation for content uploaded later with `PUT`.
    pub async fn create_reservation(&self, user_id: &UserId) -> Result<Reservation> {
        let s = self.hub.services();
        let media_id = self.reserve(user_id, None).await?;
        let row = s.store.media(&media_id).await?.ok_or_else(|| Error::internal("reservation vanished"))?;
        Ok(Reservation { content_uri: self.mxc(&media_id), expires_at_ms: self.reservation_expiry(row.created_ts) })
    }

    /// `POST /create`: reserves an mxc URI for content to come.
    pub async fn reserve(&self, user_id: &UserId, resumable: Option<&NewResumable>) -> Result<String> {
        let s = self.hub.services();
        if s.store.pending_media_count(user_id.as_str()).await? >= MAX_PENDING_PER_USER {
            return Err(Error::LimitExceeded { retry_after: Duration::from_secs(60) });
        }
        let media_id = new_media_id();
        let upload_length = resumable.map(|r| i64::try_from(r.length).unwrap_or(i64::MAX));
        let media = NewMedia {
            media_id: &media_id,
            user_id: user_id.as_str(),
            content_type: resumable.and_then(|r| r.content_type.as_deref()),
            filename: resumable.and_then(|r| r.filename.as_deref()),
            sha256: None,
            size: 0,
            upload_length,
            expected_sha256: resumable.and_then(|r| r.sha256.as_deref()),
            now: now_ms(),
        };
        // A resumable upload's announced length counts from now on (a `/create` reservation
        // has no length: its content is checked when it arrives).
        if !self.insert_within_quota(&media, upload_length.unwrap_or(0)).await? {
            return Err(self.quota_error());
        }
        Ok(media_id)
    }

    /// When an unused reservation expires.
    pub fn reservation_expiry(&self, created_ts: i64) -> i64 {
        created_ts.saturating_add(self.pending_lifetime_ms())
    }

    fn pending_lifetime_ms(&self) -> i64 {
        let s = self.hub.services();
        i64::try_from(s.settings.media.pending_upload_hours).unwrap_or(24).saturating_mul(3_600_000)
    }

    /// A local reservation of `user_id` that has no content yet.
    async fn own_reservation(&self, user_id: &UserId, server_name: &str, media_id: &str) -> Result<MediaRow> {
        let s = self.hub.services();
        if server_name != s.settings.server_name.as_str() {
            return Err(Error::NotFound("Media not found".to_owned()));
        }
        check_media_id(media_id)?;
        let row = s.store.media(media_id).await?.ok_or_else(|| Error::NotFound("Media not found".to_owned()))?;
        if row.user_id != user_id.as_str() {
            return Err(Error::Forbidden("This media was reserved by another user".to_owned()));
        }
        if row.sha256.is_some() {
            return Err(Error::CannotOverwriteMedia("This media already has content".to_owned()));
        }
        Ok(row)
    }

    /// `PUT /upload/{server}/{id}`: the content of a reservation.
    pub async fn upload_reserved<S>(
        &self,
        user_id: &UserId,
        server_name: &str,
        media_id: &str,
        meta: UploadMeta,
        body: S,
    ) -> Result<()>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        let s = self.hub.services();
        check_filename(&meta.filename)?;
        let row = self.own_reservation(user_id, server_name, media_id).await?;
        if row.upload_length.is_some() {
            return Err(Error::Forbidden("This media is being uploaded with the resumable protocol".to_owned()));
        }
        let (allowance, is_quota) = self.check_announced(user_id, meta.content_length).await?;
        let received = self.receive_body(body, allowance, is_quota).await?;
        let _guard = self.content_lock.lock().await;
        let sha256 = received.sha256.clone();
        let size = received.size;
        self.storage.commit(received.file, &sha256).await.map_err(io_error)?;
        let completion = s
            .store
            .complete_media(
                media_id,
                &sha256,
                i64::try_from(size).unwrap_or(i64::MAX),
                clean_content_type(meta.content_type).as_deref(),
                meta.filename.as_deref(),
                now_ms(),
                self.quota_bytes(),
            )
            .await?;
        match completion {
            Completion::Done => Ok(()),
            // A concurrent PUT won, or other uploads took the rest of the quota; our copy of
            // the file may be unreferenced now.
            Completion::Taken => {
                self.remove_if_unreferenced(&sha256).await?;
                Err(Error::CannotOverwriteMedia("This media already has content".to_owned()))
            }
            Completion::OverQuota => {
                self.remove_if_unreferenced(&sha256).await?;
                Err(self.quota_error())
            }
        }
    }

    async fn remove_if_unreferenced(&self, sha256: &str) -> Result<()> {
        let s = self.hub.services();
        if !s.store.media_content_referenced(sha256).await? {
            self.storage.remove_content(sha256).await.map_err(io_error)?;
        }
        Ok(())
    }

    /// Content for a client's download: our own media, or another server's (on the
    /// authenticated endpoints only, as the spec's media freeze asks), fetched once from its
    /// origin over federation and served from our copy afterwards.
    pub async fn content_for_download(&self, download: Download<'_>) -> Result<MediaContent> {
        let s = self.hub.services();
        let Download { server_name, media_id, timeout, authenticated } = download;
        if server_name == s.settings.server_name.as_str() {
            return Ok(self.local_for_download(download).await?.1);
        }
        if !authenticated {
            return Err(Error::NotFound(
                "Media not found (use the authenticated /_matrix/client/v1/media endpoints)".to_owned(),
            ));
        }
        check_media_id(media_id)?;
        let origin = ServerName::parse(server_name).map_err(|_| Error::NotFound("Media not found".to_owned()))?;
        let row = self.remote_media(&origin, media_id, timeout).await?;
        Ok(MediaContent {
            path: self.storage.content_path(&row.sha256),
            size: u64::try_from(row.size).unwrap_or(0),
            content_type: row.content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
            filename: row.filename,
            sha256: row.sha256,
        })
    }

    /// Finished local media for a download, waiting up to `timeout` for a reservation's
    /// content. `authenticated` is false for the legacy endpoints, which only serve media
    /// from before the configured cut-off.
    pub async fn local_for_download(&self, download: Download<'_>) -> Result<(MediaRow, MediaContent)> {
        let s = self.hub.services();
        let Download { server_name, media_id, timeout, authenticated } = download;
        if server_name != s.settings.server_name.as_str() {
            // Remote media arrives with federation.
            return Err(Error::NotFound("Media not found".to_owned()));
        }
        check_media_id(media_id)?;
        let deadline = tokio::time::Instant::now() + timeout.min(Duration::from_secs(60));
        loop {
            let row = s.store.media(media_id).await?.ok_or_else(|| Error::NotFound("Media not found".to_owned()))?;
            if !authenticated && row.created_ts >= s.settings.media.unauthenticated_cutoff_ms {
                return Err(Error::NotFound(
                    "Media not found (use the authenticated /_matrix/client/v1/media endpoints)".to_owned(),
                ));
            }
            if let Some(sha256) = row.sha256.clone() {
                let now = now_ms();
                if row.last_access_ts.is_none_or(|t| now - t > ACCESS_GRANULARITY_MS)
                    && let Err(e) = s.store.touch_media(media_id, now).await
                {
                    tracing::warn!(error = %e, "cannot record a media access");
                }
                let content = MediaContent {
                    path: self.storage.content_path(&sha256),
                    size: u64::try_from(row.size).unwrap_or(0),
                    content_type: row.content_type.clone().unwrap_or_else(|| "application/octet-stream".to_owned()),
                    filename: row.filename.clone(),
                    sha256,
                };
                return Ok((row, content));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotYetUploaded("The content of this media has not been uploaded yet".to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A thumbnail: the configured size that answers the request ([`thumbnail::choose`]),
    /// made once when first asked for (concurrent requests for it wait for that one
    /// generation) and kept.
    pub async fn thumbnail(&self, request: ThumbnailRequest<'_>) -> Result<MediaContent> {
        let s = self.hub.services();
        let ThumbnailRequest { media, width, height, method } = request;
        if width == 0 || height == 0 {
            return Err(Error::Unknown("Thumbnail width and height must be positive".to_owned()));
        }
        let size = thumbnail::choose(&s.settings.media.thumbnail_sizes, width, height, method)
            .ok_or_else(|| Error::NotFound("This server makes no thumbnails".to_owned()))?;
        let (width, height, method) = (size.width, size.height, Method::from(size.method));
        let (row, original) = self.local_for_download(media).await?;
        let key = (row.media_id.clone(), width, height, method);
        let made =
            self.thumbnails.run(key, || self.kept_or_new_thumbnail(&row, &original, width, height, method)).await;
        let made = made.map_err(unshare)?;
        Ok(MediaContent {
            path: self.storage.content_path(&made.sha256),
            size: u64::try_from(made.size).unwrap_or(0),
            content_type: made.content_type,
            filename: Some(format!("thumbnail-{width}x{height}")),
            sha256: made.sha256,
        })
    }

    /// The kept thumbnail of this size, or a new one, made when a generation permit is free.
    async fn kept_or_new_thumbnail(
        &self,
        row: &MediaRow,
        original: &MediaContent,
        width: u32,
        height: u32,
        method: Method,
    ) -> Shared<ThumbnailRow> {
        let s = self.hub.services();
        let (w, h) = (i64::from(width), i64::from(height));
        if let Some(kept) = s.store.media_thumbnail(&row.media_id, w, h, method.as_str()).await.map_err(shared)? {
            return Ok(kept);
        }
        if original.size > thumbnail::MAX_SOURCE_BYTES {
            return Err(Arc::new(Error::Unknown("This media is too large to thumbnail".to_owned())));
        }
        let permit =
            self.thumbnail_permits.clone().acquire_owned().await.map_err(|e| shared(Error::internal(e.to_string())))?;
        let now = self.generating.fetch_add(1, Ordering::SeqCst) + 1;
        let running = Generating(self.generating.clone());
        let peak = self.generating_peak.fetch_max(now, Ordering::SeqCst).max(now);
        s.metrics.media_thumbnail_generations_peak.set(peak);
        s.metrics.media_thumbnails_generated.inc();
        let path = original.path.clone();
        let generated = tokio::task::spawn_blocking(move || {
            // Held until the decoding ends, even if every request waiting for it went away.
            let _permit = permit;
            let _running = running;
            thumbnail::generate(path, width, height, method)
        })
        .await
        .map_err(|e| shared(Error::internal(format!("thumbnail task failed: {e}"))))?;
        let generated = match generated {
            Ok(t) => t,
            Err(thumbnail::ThumbnailError::Unsupported(reason)) => return Err(shared(Error::Unknown(reason))),
            Err(thumbnail::ThumbnailError::Internal(reason)) => return Err(shared(Error::internal(reason))),
        };
        let _guard = self.content_lock.lock().await;
        let sha256 = self.storage.store_bytes(&generated.bytes).await.map_err(|e| shared(io_error(e)))?;
        let made = ThumbnailRow {
            content_type: generated.content_type.to_owned(),
            sha256,
            size: i64::try_from(generated.bytes.len()).unwrap_or(i64::MAX),
        };
        s.store.insert_media_thumbnail(&row.media_id, w, h, method.as_str(), &made).await.map_err(shared)?;
        Ok(made)
    }

    /// Deletes one piece of media with its thumbnails (and their files once unreferenced);
    /// false if there was none.
    pub async fn delete(&self, media_id: &str) -> Result<bool> {
        let s = self.hub.services();
        let _guard = self.content_lock.lock().await;
        let Some(hashes) = s.store.delete_media(media_id).await? else {
            return Ok(false);
        };
        for sha256 in hashes {
            self.remove_if_unreferenced(&sha256).await?;
        }
        let _ = tokio::fs::remove_file(self.storage.partial_path(media_id)).await;
        Ok(true)
    }

    /// `homeserver media purge-remote`: forgets other servers' media fetched before
    /// `before_ts` (fetched again when next downloaded) and removes files nothing else
    /// names. Returns how many were forgotten.
    pub async fn purge_remote(&self, before_ts: i64) -> Result<usize> {
        let s = self.hub.services();
        let _guard = self.content_lock.lock().await;
        let hashes = s.store.delete_remote_media(before_ts).await?;
        let mut unique = hashes.clone();
        unique.sort();
        unique.dedup();
        for sha256 in unique {
            self.remove_if_unreferenced(&sha256).await?;
        }
        Ok(hashes.len())
    }

    /// Retention: forgets stale unfinished uploads and (if configured) local media nobody
    /// downloaded for `local_retention_days`. Returns how many were deleted.
    pub async fn expire(&self) -> Result<usize> {
        let s = self.hub.services();
        let now = now_ms();
        let mut ids = s.store.stale_pending_media(now - self.pending_lifetime_ms()).await?;
        let days = s.settings.media.local_retention_days;
        if days > 0 {
            let cutoff = now.saturating_sub(i64::try_from(days).unwrap_or(i64::MAX).saturating_mul(86_400_000));
            ids.extend(s.store.unused_media(cutoff).await?);
        }
        let mut deleted = 0;
        for id in ids {
            if self.delete(&id).await? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    // ---- Resumable uploads (the Obmin extension, docs/media.md) ----

    /// Announces a resumable upload of `length` bytes; returns its media id.
    pub async fn create_resumable(&self, user_id: &UserId, upload: NewResumable) -> Result<String> {
        check_filename(&upload.filename)?;
        if let Some(sha) = &upload.sha256
            && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(Error::InvalidParam("sha256 must be 64 hexadecimal digits".to_owned()));
        }
        self.check_announced(user_id, Some(upload.length)).await?;
        let upload = NewResumable {
            content_type: clean_content_type(upload.content_type),
            sha256: upload.sha256.map(|s| s.to_ascii_lowercase()),
            ..upload
        };
        let media_id = self.reserve(user_id, Some(&upload)).await?;
        let path = self.storage.partial_path(&media_id);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io_error)?;
        }
        tokio::fs::File::create(&path).await.map_err(io_error)?;
        Ok(media_id)
    }

    fn status_of(&self, row: &MediaRow) -> ResumableStatus {
        let length = u64::try_from(row.upload_length.unwrap_or(row.size)).unwrap_or(0);
        ResumableStatus {
            content_uri: self.mxc(&row.media_id),
            offset: if row.sha256.is_some() { length } else { u64::try_from(row.upload_offset).unwrap_or(0) },
            length,
            complete: row.sha256.is_some(),
        }
    }

    /// Where a resumable upload stands (only its uploader may ask).
    pub async fn resumable_status(
        &self,
        user_id: &UserId,
        server_name: &str,
        media_id: &str,
    ) -> Result<ResumableStatus> {
        let s = self.hub.services();
        if server_name != s.settings.server_name.as_str() {
            return Err(Error::NotFound("Upload not found".to_owned()));
        }
        check_media_id(media_id)?;
        let row = s.store.media(media_id).await?.ok_or_else(|| Error::NotFound("Upload not found".to_owned()))?;
        if row.user_id != user_id.as_str() || row.upload_length.is_none() {
            return Err(Error::NotFound("Upload not found".to_owned()));
        }
        Ok(self.status_of(&row))
    }

    /// Appends bytes at `offset` (which must be where the upload stands). Whatever arrives
    /// is kept even if the request breaks off; the last byte completes the media.
    pub async fn append_resumable<S>(
        &self,
        user_id: &UserId,
        server_name: &str,
        media_id: &str,
        offset: u64,
        body: S,
    ) -> Result<ResumableStatus>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin + Send + 'static,
    {
        let s = self.hub.services();
        let row = match self.own_reservation(user_id, server_name, media_id).await {
            Err(Error::CannotOverwriteMedia(m)) => return Err(Error::Conflict(m)),
            // Someone else's upload does not exist for this user (as in the status request).
            Err(Error::Forbidden(_)) => return Err(Error::NotFound("Upload not found".to_owned())),
            other => other?,
        };
        let Some(length) = row.upload_length.and_then(|l| u64::try_from(l).ok()) else {
            return Err(Error::NotFound("Upload not found".to_owned()));
        };
        let current = u64::try_from(row.upload_offset).unwrap_or(0);
        if offset != current {
            return Err(Error::Conflict(format!("Upload-Offset is {offset}, but the upload stands at {current}")));
        }
        {
            let mut busy = self.busy.lock().expect("busy set");
            if !busy.insert(media_id.to_owned()) {
                return Err(Error::Conflict("Another request is appending to this upload".to_owned()));
            }
        }
        // Receive in a task of its own: if the client goes away and the request future is
        // dropped, the task still sees the body end and makes what arrived durable.
        let services = s.clone();
        let media_id = media_id.to_owned();
        let task = tokio::spawn(async move {
            let result = services.media.append_resumable_inner(&media_id, current, length, body).await;
            services.media.busy.lock().expect("busy set").remove(&media_id);
            result
        });
        let (new_offset, hasher) = task.await.map_err(|e| Error::internal(format!("upload task failed: {e}")))??;
        if new_offset < length {
            let mut status = self.status_of(&row);
            status.offset = new_offset;
            return Ok(status);
        }
        self.finish_resumable(&row, length, hasher).await
    }

    /// Writes the body at `start`; returns the new durable offset, and the hash of the whole
    /// file when the upload went from 0 to the end in this one request.
    async fn append_resumable_inner<S>(
        &self,
        media_id: &str,
        start: u64,
        length: u64,
        mut body: S,
    ) -> Result<(u64, Option<Sha256>)>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        let s = self.hub.services();
        let path = self.storage.partial_path(media_id);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(io_error)?;
        // Bytes past the last checkpoint (a crash mid-request) are not trusted: cut them off.
        file.set_len(start).await.map_err(io_error)?;
        file.seek(io::SeekFrom::Start(start)).await.map_err(io_error)?;
        let mut writer = tokio::io::BufWriter::with_capacity(4 * storage::BLOCK, file);
        let mut hasher = (start == 0).then(Sha256::new);
        let mut offset = start;
        let mut checkpointed = start;
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(Error::Unknown(format!("The upload broke off: {e}")));
                    break;
                }
            };
            let room = usize::try_from(length - offset).unwrap_or(usize::MAX);
            let part = &chunk[..chunk.len().min(room)];
            writer.write_all(part).await.map_err(io_error)?;
            if let Some(h) = hasher.as_mut() {
                h.update(part);
            }
            offset += part.len() as u64;
            if part.len() < chunk.len() {
                failure = Some(Error::InvalidParam(format!("The upload is longer than its announced {length} bytes")));
                break;
            }
            if offset - checkpointed >= CHECKPOINT_BYTES {
                writer.flush().await.map_err(io_error)?;
                writer.get_ref().sync_data().await.map_err(io_error)?;
                s.store.set_upload_offset(media_id, i64::try_from(offset).unwrap_or(i64::MAX), now_ms()).await?;
                checkpointed = offset;
            }
        }
        writer.flush().await.map_err(io_error)?;
        writer.get_ref().sync_data().await.map_err(io_error)?;
        if offset != checkpointed {
            s.store.set_upload_offset(media_id, i64::try_from(offset).unwrap_or(i64::MAX), now_ms()).await?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((offset, hasher)),
        }
    }

    async fn finish_resumable(&self, row: &MediaRow, length: u64, hasher: Option<Sha256>) -> Result<ResumableStatus> {
        let s = self.hub.services();
        let path = self.storage.partial_path(&row.media_id);
        let sha256 = match hasher {
            Some(h) => hex::encode(h.finalize()),
            None => storage::hash_file(&path).await.map_err(io_error)?,
        };
        if let Some(expected) = &row.expected_sha256
            && *expected != sha256
        {
            // Start over: the received bytes are not the announced file.
            tokio::fs::File::create(&path).await.map_err(io_error)?;
            s.store.set_upload_offset(&row.media_id, 0, now_ms()).await?;
            return Err(Error::InvalidParam(format!(
                "The uploaded bytes have sha256 {sha256}, not the announced {expected}; the upload was reset to offset 0"
            )));
        }
        // No quota check: the announced length was reserved in the quota when the upload
        // was announced.
        let _guard = self.content_lock.lock().await;
        self.storage.commit_path(&path, &sha256).await.map_err(io_error)?;
        let length_i64 = i64::try_from(length).unwrap_or(i64::MAX);
        if s.store.complete_media(&row.media_id, &sha256, length_i64, None, None, now_ms(), None).await?
            != Completion::Done
        {
            self.remove_if_unreferenced(&sha256).await?;
            return Err(Error::Conflict("This media already has content".to_owned()));
        }
        let mut status = self.status_of(row);
        status.offset = length;
        status.complete = true;
        Ok(status)
    }
}
