//! The media repository over HTTP: uploads (`/_matrix/media/v3/upload`, asynchronous
//! `/_matrix/media/v1/create` + `PUT`), authenticated downloads and thumbnails
//! (`/_matrix/client/v1/media/...`), the legacy unauthenticated ones for old media, the
//! config, and the Obmin resumable-upload extension (`/_obmin/media/v1/upload`, see
//! docs/media.md).
//!
//! Uploads do not go through the [`Ruma<T>`] extractor: it reads the whole body into memory
//! (up to `max_request_bytes`) before ruma parses it, and ruma's upload request types hold
//! the file as a `Vec<u8>`. Upload handlers authenticate with the same code
//! ([`authenticate_parts`]) and stream the body to disk themselves, enforcing
//! `media.max_upload_bytes` as they go. Downloads do use `Ruma<T>` (their requests have no
//! body) but answer with a streamed body of their own instead of ruma's `Vec<u8>` response.

use std::{io, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{FromRequestParts, Path, Query, Request, State},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use ruma::{
    MilliSecondsSinceUnixEpoch, ServerName, UInt,
    api::client::{authenticated_media, media},
    http_headers::{ContentDisposition, ContentDispositionType},
};
use serde::Deserialize;
use serde_json::json;

use crate::{
    api::ruma::{Ruma, RumaResponse, authenticate_parts},
    error::{Error, Result},
    service::{
        Services,
        media::{
            Download, MediaContent, NewResumable, ResumableStatus, ThumbnailRequest, UploadMeta, thumbnail::Method,
        },
    },
};

/// Types a browser may show inline: they cannot run script in our origin. Everything else
/// is sent as an attachment (Synapse's list).
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// Even content shown inline may not run anything or load anything.
const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
     style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

#[derive(Debug, Deserialize)]
struct UploadQuery {
    filename: Option<String>,
}

/// The pieces of an upload request a handler needs before streaming its body.
fn upload_meta(parts: &http::request::Parts) -> Result<UploadMeta> {
    let query = Query::<UploadQuery>::try_from_uri(&parts.uri)
        .map_err(|e| Error::InvalidParam(format!("Invalid query: {}", e.body_text())))?;
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok(UploadMeta { content_type, filename: query.0.filename, content_length: content_length(&parts.headers)? })
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| Error::InvalidParam("Invalid Content-Length".to_owned()))
        })
        .transpose()
}

/// The request body as a stream of byte chunks, for the service.
fn body_stream(body: Body) -> impl futures_util::Stream<Item = io::Result<bytes::Bytes>> + Unpin + Send + 'static {
    body.into_data_stream().map(|chunk| chunk.map_err(io::Error::other))
}

/// `POST /_matrix/media/v3/upload` (streamed; see the module comment).
pub async fn upload(State(services): State<Arc<Services>>, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let (user, _) = authenticate_parts(&parts, &services).await?;
    services.rate_limits.check_user(crate::service::rate_limit::Class::MediaCreate, &user.user_id)?;
    let meta = upload_meta(&parts)?;
    let content_uri = services.media.upload(&user.user_id, meta, body_stream(body)).await?;
    Ok(RumaResponse(media::create_content::v3::Response::new(content_uri)).into_response())
}

/// `POST /_matrix/media/v1/create`: an mxc URI for content uploaded later with `PUT`.
pub async fn create(
    State(services): State<Arc<Services>>,
    req: Ruma<media::create_mxc_uri::v1::Request>,
) -> Result<RumaResponse<media::create_mxc_uri::v1::Response>> {
    let user = req.user()?;
    services.rate_limits.check_user(crate::service::rate_limit::Class::MediaCreate, &user.user_id)?;
    let reservation = services.media.create_reservation(&user.user_id).await?;
    let mut response = media::create_mxc_uri::v1::Response::new(reservation.content_uri);
    let expiry = UInt::try_from(reservation.expires_at_ms).unwrap_or(UInt::MAX);
    response.unused_expires_at = Some(MilliSecondsSinceUnixEpoch(expiry));
    Ok(RumaResponse(response))
}

/// `PUT /_matrix/media/v3/upload/{server_name}/{media_id}` (streamed).
pub async fn upload_reserved(State(services): State<Arc<Services>>, req: Request) -> Result<Response> {
    let (mut parts, body) = req.into_parts();
    let (user, _) = authenticate_parts(&parts, &services).await?;
    let Path((server_name, media_id)) = Path::<(String, String)>::from_request_parts(&mut parts, &services)
        .await
        .map_err(|e| Error::InvalidParam(format!("Invalid path: {}", e.body_text())))?;
    let meta = upload_meta(&parts)?;
    services.media.upload_reserved(&user.user_id, &server_name, &media_id, meta, body_stream(body)).await?;
    // ruma's response type for this endpoint (`{}`) has no public constructor.
    Ok(axum::Json(json!({})).into_response())
}

fn upload_size(services: &Services) -> UInt {
    UInt::try_from(services.media.max_upload_bytes()).unwrap_or(UInt::MAX)
}

/// `GET /_matrix/client/v1/media/config`
pub async fn config(
    State(services): State<Arc<Services>>,
    _req: Ruma<authenticated_media::get_media_config::v1::Request>,
) -> Result<RumaResponse<authenticated_media::get_media_config::v1::Response>> {
    Ok(RumaResponse(authenticated_media::get_media_config::v1::Response::new(upload_size(&services))))
}

/// `GET /_matrix/media/v3/config`
#[allow(deprecated)]
pub async fn config_legacy(
    State(services): State<Arc<Services>>,
    _req: Ruma<media::get_media_config::v3::Request>,
) -> Result<RumaResponse<media::get_media_config::v3::Response>> {
    Ok(RumaResponse(media::get_media_config::v3::Response::new(upload_size(&services))))
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`
pub async fn download(
    State(services): State<Arc<Services>>,
    headers: HeaderMap,
    req: Ruma<authenticated_media::get_content::v1::Request>,
) -> Result<Response> {
    let r = req.body;
    let content = services
        .media
        .content_for_download(asked(&r.server_name, &r.media_id, r.timeout_ms, Endpoint::Authenticated))
        .await?;
    media_response(content, None, &headers).await
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{filename}`
pub async fn download_as(
    State(services): State<Arc<Services>>,
    headers: HeaderMap,
    req: Ruma<authenticated_media::get_content_as_filename::v1::Request>,
) -> Result<Response> {
    let r = req.body;
    let content = services
        .media
        .content_for_download(asked(&r.server_name, &r.media_id, r.timeout_ms, Endpoint::Authenticated))
        .await?;
    media_response(content, Some(r.filename), &headers).await
}

/// `GET /_matrix/media/v3/download/{serverName}/{mediaId}`
#[allow(deprecated)]
pub async fn download_legacy(
    State(services): State<Arc<Services>>,
    headers: HeaderMap,
    req: Ruma<media::get_content::v3::Request>,
) -> Result<Response> {
    let r = req.body;
    let content =
        services.media.content_for_download(asked(&r.server_name, &r.media_id, r.timeout_ms, Endpoint::Legacy)).await?;
    media_response(content, None, &headers).await
}

/// `GET /_matrix/media/v3/download/{serverName}/{mediaId}/{filename}`
#[allow(deprecated)]
pub async fn download_as_legacy(
    State(services): State<Arc<Services>>,
    headers: HeaderMap,
    req: Ruma<media::get_content_as_filename::v3::Request>,
) -> Result<Response> {
    let r = req.body;
    let content =
        services.media.content_for_download(asked(&r.server_name, &r.media_id, r.timeout_ms, Endpoint::Legacy)).await?;
    media_response(content, Some(r.filename), &headers).await
}

pub(crate) fn method(m: Option<ruma::media::Method>) -> Result<Method> {
    match m {
        None | Some(ruma::media::Method::Scale) => Ok(Method::Scale),
        Some(ruma::media::Method::Crop) => Ok(Method::Crop),
        Some(other) => Err(Error::InvalidParam(format!("Unknown thumbnail method {}", other.as_str()))),
    }
}

/// Which endpoint a download came in on (the legacy ones serve less).
#[derive(Clone, Copy)]
enum Endpoint {
    Authenticated,
    Legacy,
}

fn asked<'a>(server_name: &'a ServerName, media_id: &'a str, timeout: Duration, endpoint: Endpoint) -> Download<'a> {
    Download {
        server_name: server_name.as_str(),
        media_id,
        timeout,
        authenticated: matches!(endpoint, Endpoint::Authenticated),
    }
}

/// The size and method a thumbnail request asks for.
struct ThumbnailAsked {
    width: UInt,
    height: UInt,
    method: Option<ruma::media::Method>,
}

async fn thumbnail_response(
    services: &Services,
    headers: &HeaderMap,
    media: Download<'_>,
    asked: ThumbnailAsked,
) -> Result<Response> {
    let request = ThumbnailRequest {
        media,
        width: asked.width.into(),
        height: asked.height.into(),
        method: method(asked.method)?,
    };
    let content = services.media.thumbnail(request).await?;
    media_response(content, None, headers).await
}

/// `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
pub async fn thumbnail(
    State(services): State<Arc<Services>>,
    headers: HeaderMap,
    req: Ruma<authenticated_media::get_content_thumbnail::v1::Request>,
) -> Result<Response> {
    let r = req.body;
    let media = asked(&r.server_name, &r.media_id, r.timeout_ms, Endpoint::Authenticated);
    thumbnail_response(
        &services,
        &headers,
        media,
        ThumbnailAsked { width: r.width, height: r.height, method: r.method },
    )
    .await
}

/// `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}`
#[allow(deprecated)]
pub async fn thumbnail_legacy(
    State(services): State<Arc<Services>>,
    headers: HeaderMap,
    req: Ruma<media::get_content_thumbnail::v3::Request>,
) -> Result<Response> {
    let r = req.body;
    let media = asked(&r.server_name, &r.media_id, r.timeout_ms, Endpoint::Legacy);
    thumbnail_response(
        &services,
        &headers,
        media,
        ThumbnailAsked { width: r.width, height: r.height, method: r.method },
    )
    .await
}

/// A single byte range from a `Range` header: `Some(Ok((first, last)))`, `Some(Err(()))`
/// when it cannot be satisfied, `None` to ignore the header (malformed or several ranges:
/// the whole content is sent, as RFC 9110 allows).
fn parse_range(value: &str, size: u64) -> Option<std::result::Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let suffix: u64 = last.parse().ok()?;
        if suffix == 0 || size == 0 {
            return Some(Err(()));
        }
        return Some(Ok((size - suffix.min(size), size - 1)));
    }
    let first: u64 = first.parse().ok()?;
    let last = if last.is_empty() { u64::MAX } else { last.parse().ok()? };
    if last < first {
        return None;
    }
    if first >= size {
        return Some(Err(()));
    }
    Some(Ok((first, last.min(size - 1))))
}

/// Streams stored content with safe headers, honouring a `Range` request.
async fn media_response(content: MediaContent, filename: Option<String>, request: &HeaderMap) -> Result<Response> {
    let size = content.size;
    let etag = format!("\"{}\"", content.sha256);
    let if_range_matches =
        request.get(header::IF_RANGE).is_none_or(|v| v.to_str().map(|v| v.trim() == etag).unwrap_or(false));
    let range = request
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_matches)
        .and_then(|v| parse_range(v, size));
    let (status, start, len) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Ok((first, last))) => (StatusCode::PARTIAL_CONTENT, first, last - first + 1),
        Some(Err(())) => {
            let mut response = (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_TYPE, "application/json")],
                json!({"errcode": "M_UNKNOWN", "error": "The requested range is not satisfiable"}).to_string(),
            )
                .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(|e| Error::internal(e.to_string()))?,
            );
            return Ok(response);
        }
    };
    let stream = crate::service::media::storage::read_range(&content.path, start, len).await.map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            tracing::error!(sha256 = %content.sha256, "a media file is missing from storage");
        }
        Error::internal(format!("cannot open media: {e}"))
    })?;
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    let content_type = HeaderValue::from_str(&content.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    let essence = content.content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let disposition_type = if INLINE_TYPES.contains(&essence.as_str()) {
        ContentDispositionType::Inline
    } else {
        ContentDispositionType::Attachment
    };
    let disposition = ContentDisposition::new(disposition_type.clone()).with_filename(filename.or(content.filename));
    let disposition = HeaderValue::from_str(&disposition.to_string())
        .unwrap_or_else(|_| HeaderValue::from_str(disposition_type.as_str()).expect("a token is a header value"));
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CONTENT_DISPOSITION, disposition);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {start}-{}/{size}", start + len - 1);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&range).map_err(|e| Error::internal(e.to_string()))?);
    }
    Ok(response)
}

// ---- Resumable uploads: the Obmin extension (docs/media.md) ----

/// Announcement of a resumable upload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateResumable {
    length: u64,
    content_type: Option<String>,
    filename: Option<String>,
    sha256: Option<String>,
}

fn status_response(services: &Services, status: ResumableStatus) -> Response {
    let (server, media_id) = status.content_uri.parts().map(|(s, m)| (s.to_string(), m.to_owned())).unwrap_or_default();
    let upload_url = format!("/_obmin/media/v1/upload/{server}/{media_id}");
    let _ = services;
    let mut response = axum::Json(json!({
        "content_uri": status.content_uri,
        "upload_url": upload_url,
        "offset": status.offset,
        "length": status.length,
        "complete": status.complete,
    }))
    .into_response();
    let h = response.headers_mut();
    h.insert("upload-offset", HeaderValue::from(status.offset));
    h.insert("upload-length", HeaderValue::from(status.length));
    if let Ok(v) = HeaderValue::from_str(&upload_url) {
        h.insert(header::LOCATION, v);
    }
    response
}

/// `POST /_obmin/media/v1/upload`: announce a resumable upload.
pub async fn resumable_create(State(services): State<Arc<Services>>, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let (user, _) = authenticate_parts(&parts, &services).await?;
    services.rate_limits.check_user(crate::service::rate_limit::Class::MediaCreate, &user.user_id)?;
    use http_body_util::BodyExt;
    let bytes = http_body_util::Limited::new(body, 65_536)
        .collect()
        .await
        .map_err(|_| Error::TooLarge { limit: 65_536 })?
        .to_bytes();
    let announced: CreateResumable = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Error::BadJson(format!("The request body has the wrong shape: {e}")),
        _ => Error::NotJson(format!("The request body is not valid JSON: {e}")),
    })?;
    let media_id = services
        .media
        .create_resumable(
            &user.user_id,
            NewResumable {
                length: announced.length,
                content_type: announced.content_type,
                filename: announced.filename,
                sha256: announced.sha256,
            },
        )
        .await?;
    let status =
        services.media.resumable_status(&user.user_id, services.settings.server_name.as_str(), &media_id).await?;
    Ok(status_response(&services, status))
}

async fn resumable_path(parts: &mut http::request::Parts, services: &Arc<Services>) -> Result<(String, String)> {
    let Path(path) = Path::<(String, String)>::from_request_parts(parts, services)
        .await
        .map_err(|e| Error::InvalidParam(format!("Invalid path: {}", e.body_text())))?;
    Ok(path)
}

/// `GET` / `HEAD /_obmin/media/v1/upload/{server_name}/{media_id}`: where the upload stands.
pub async fn resumable_status(State(services): State<Arc<Services>>, req: Request) -> Result<Response> {
    let (mut parts, _) = req.into_parts();
    let (user, _) = authenticate_parts(&parts, &services).await?;
    let (server_name, media_id) = resumable_path(&mut parts, &services).await?;
    let status = services.media.resumable_status(&user.user_id, &server_name, &media_id).await?;
    Ok(status_response(&services, status))
}

/// `PATCH /_obmin/media/v1/upload/{server_name}/{media_id}` with `Upload-Offset`: append.
pub async fn resumable_append(State(services): State<Arc<Services>>, req: Request) -> Result<Response> {
    let (mut parts, body) = req.into_parts();
    let (user, _) = authenticate_parts(&parts, &services).await?;
    let (server_name, media_id) = resumable_path(&mut parts, &services).await?;
    let offset = parts
        .headers
        .get("upload-offset")
        .ok_or_else(|| Error::MissingParam("The Upload-Offset header is required".to_owned()))?
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| Error::InvalidParam("Upload-Offset must be a whole number".to_owned()))?;
    if let Some(len) = content_length(&parts.headers)? {
        let status = services.media.resumable_status(&user.user_id, &server_name, &media_id).await?;
        if status.complete {
            return Err(Error::Conflict("This upload is already complete".to_owned()));
        }
        if offset.saturating_add(len) > status.length {
            return Err(Error::InvalidParam(format!(
                "The upload is longer than its announced {} bytes",
                status.length
            )));
        }
    }
    let status =
        services.media.append_resumable(&user.user_id, &server_name, &media_id, offset, body_stream(body)).await?;
    Ok(status_response(&services, status))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Some(Ok((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("lines=1-2", 100), None);
        assert_eq!(parse_range("bytes=9-1", 100), None);
    }
}
