//! Other servers' media, fetched over federation for local clients the first time one asks
//! and kept in content storage. The answer is read as it streams ([`super::multipart`]) and
//! written to disk while hashed, cut off at `media.max_upload_bytes`: a server answering
//! with an endless body costs us at most that much. A `Location` answer is followed once.
//! Clients asking for the same media at once wait for one fetch.

use std::{io, str::FromStr, sync::Arc, time::Duration};

use bytes::Bytes;
use federation::client::ClientError;
use futures_util::{Stream, StreamExt};
use http::header;
use ruma::{ServerName, api::federation::authenticated_media::get_content, http_headers::ContentDisposition};

use super::{
    Media, check_filename, clean_content_type, io_error,
    multipart::{self, MultipartReader},
    shared,
    single_flight::unshare,
    storage::{ReceiveError, Received, receive},
};
use crate::{
    error::{Error, Result},
    store::{RemoteMediaRow, now_ms},
};

/// The longest a client's download waits for the origin (the spec's `timeout_ms` cap).
const MAX_WAIT: Duration = Duration::from_secs(60);

fn not_found(reason: impl std::fmt::Display) -> Error {
    Error::NotFound(format!("Media not found: {reason}"))
}

impl Media {
    /// Our copy of `origin`'s media, fetched now if we have none (one fetch for all who ask
    /// at once).
    pub(super) async fn remote_media(
        &self,
        origin: &ServerName,
        media_id: &str,
        timeout: Duration,
    ) -> Result<RemoteMediaRow> {
        let s = self.hub.services();
        if let Some(row) = s.store.remote_media(origin.as_str(), media_id).await? {
            return Ok(row);
        }
        let key = (origin.to_string(), media_id.to_owned());
        let fetched = self
            .remote
            .run(key, || async {
                // A fetch that ended between our look and now has stored it.
                if let Some(row) = s.store.remote_media(origin.as_str(), media_id).await.map_err(shared)? {
                    return Ok(row);
                }
                self.fetch_remote_media(origin, media_id, timeout).await.map_err(Arc::new)
            })
            .await;
        fetched.map_err(unshare)
    }

    /// Downloads `origin`'s media over federation into content storage and records it.
    async fn fetch_remote_media(
        &self,
        origin: &ServerName,
        media_id: &str,
        timeout: Duration,
    ) -> Result<RemoteMediaRow> {
        let s = self.hub.services();
        if origin == s.settings.server_name {
            return Err(Error::internal("a federation media request to ourselves"));
        }
        let mut request = get_content::v1::Request::new(media_id.to_owned());
        request.timeout_ms = timeout.min(MAX_WAIT);
        let response =
            s.fed.client.send_streamed(&s.signing_key, origin, request).await.map_err(|e| origin_error(origin, &e))?;
        let content_type = header_text(&response.headers, header::CONTENT_TYPE);
        let boundary = multipart::boundary(content_type.as_deref().unwrap_or_default())
            .ok_or_else(|| not_found(format!("{origin} did not answer with multipart/mixed")))?;
        let mut reader = MultipartReader::new(io_stream(response.body), &boundary);
        let unreadable = |e: multipart::MultipartError| {
            tracing::info!(%origin, media_id, error = %e, "unreadable media answer");
            not_found(format!("{origin} sent an answer we cannot read"))
        };
        // The metadata part (empty JSON today): skipped, within a bound.
        reader.next_part().await.map_err(unreadable)?.ok_or_else(|| not_found(format!("{origin} sent no file")))?;
        let file =
            reader.next_part().await.map_err(unreadable)?.ok_or_else(|| not_found(format!("{origin} sent no file")))?;
        let (received, content_type, disposition) = match file.location {
            Some(location) => {
                let answer =
                    s.fed.client.get_streamed(origin, &location).await.map_err(|e| origin_error(origin, &e))?;
                let content_type = header_text(&answer.headers, header::CONTENT_TYPE);
                let disposition = header_text(&answer.headers, header::CONTENT_DISPOSITION);
                (self.receive_remote(origin, io_stream(answer.body)).await?, content_type, disposition)
            }
            None => {
                (self.receive_remote(origin, reader.into_body()).await?, file.content_type, file.content_disposition)
            }
        };
        let filename = disposition.and_then(|d| ContentDisposition::from_str(&d).ok()).and_then(|d| d.filename);
        let filename = if check_filename(&filename).is_ok() { filename } else { None };
        let _guard = self.content_lock.lock().await;
        let sha256 = received.sha256.clone();
        let size = i64::try_from(received.size).unwrap_or(i64::MAX);
        self.storage.commit(received.file, &sha256).await.map_err(io_error)?;
        let row = RemoteMediaRow { content_type: clean_content_type(content_type), filename, sha256, size };
        s.store.insert_remote_media(origin.as_str(), media_id, &row, now_ms()).await?;
        Ok(row)
    }

    /// Writes a remote file to a temporary file while hashing it, within the upload limit.
    async fn receive_remote<S>(&self, origin: &ServerName, body: S) -> Result<Received>
    where
        S: Stream<Item = io::Result<Bytes>> + Unpin,
    {
        let limit = self.max_upload_bytes();
        receive(&self.storage, body, limit).await.map_err(|e| match e {
            ReceiveError::TooLarge => Error::RemoteTooLarge { limit },
            ReceiveError::Io(e) => {
                tracing::info!(%origin, error = %e, "remote media answer broke off");
                not_found(format!("{origin} sent an answer we cannot read"))
            }
        })
    }
}

fn io_stream(
    body: futures_util::stream::BoxStream<'static, Result<Bytes, ClientError>>,
) -> impl Stream<Item = io::Result<Bytes>> + Unpin + 'static {
    body.map(|chunk| chunk.map_err(io::Error::other))
}

fn header_text(headers: &http::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The spec's download answers have no "origin unreachable": that is content we cannot find
/// (404), as when the origin says it has none. The cause is logged, not sent.
fn origin_error(origin: &ServerName, e: &ClientError) -> Error {
    tracing::info!(%origin, error = %e, "remote media fetch failed");
    match e.status() {
        Some(403) => Error::Forbidden(format!("{origin} refused to send this media")),
        _ => not_found(format!("{origin} did not send it")),
    }
}
