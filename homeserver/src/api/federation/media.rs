//! Authenticated media over federation: other servers download our users' files and
//! thumbnails for their users (`/_matrix/federation/v1/media/download/{mediaId}` and
//! `/thumbnail/{mediaId}`).
//!
//! The answer is `multipart/mixed`: a JSON part (metadata, empty today) and the file itself,
//! streamed from storage. No crate writes multipart bodies for axum without buffering, and
//! the framing is three short strings, so it is written here.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::{HeaderValue, header};
use ruma::api::federation::authenticated_media::{get_content, get_content_thumbnail};

use crate::{
    api::ruma::Ruma,
    error::{Error, Result},
    service::{
        Services,
        media::{Download, MediaContent, ThumbnailRequest},
    },
};

/// `GET /_matrix/federation/v1/media/download/{mediaId}`
pub async fn download(State(services): State<Arc<Services>>, req: Ruma<get_content::v1::Request>) -> Result<Response> {
    let server_name = services.settings.server_name.clone();
    let (_, content) =
        services.media.local_for_download(ours(&server_name, &req.body.media_id, req.body.timeout_ms)).await?;
    multipart(content).await
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
pub async fn thumbnail(
    State(services): State<Arc<Services>>,
    req: Ruma<get_content_thumbnail::v1::Request>,
) -> Result<Response> {
    let r = req.body;
    let method = crate::api::client::media::method(r.method)?;
    let server_name = services.settings.server_name.clone();
    let media = ours(&server_name, &r.media_id, r.timeout_ms);
    let content = services
        .media
        .thumbnail(ThumbnailRequest { media, width: r.width.into(), height: r.height.into(), method })
        .await?;
    multipart(content).await
}

/// Our own media, asked for by another server (always over an authenticated endpoint).
fn ours<'a>(server_name: &'a ruma::ServerName, media_id: &'a str, timeout: std::time::Duration) -> Download<'a> {
    Download { server_name: server_name.as_str(), media_id, timeout, authenticated: true }
}

/// The spec's answer shape: a JSON metadata part, then the content, streamed.
async fn multipart(content: MediaContent) -> Result<Response> {
    let file = crate::service::media::storage::read_range(&content.path, 0, content.size)
        .await
        .map_err(|e| Error::internal(format!("cannot open media: {e}")))?;
    // A boundary that cannot occur by chance in the file (random, 32 hex digits).
    let boundary = format!("obmin{:032x}", rand::random::<u128>());
    let mut head = format!(
        "--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\nContent-Type: {}\r\n",
        content.content_type.replace(['\r', '\n'], "")
    );
    if let Some(name) = &content.filename {
        let disposition =
            ruma::http_headers::ContentDisposition::new(ruma::http_headers::ContentDispositionType::Attachment)
                .with_filename(Some(name.clone()));
        head.push_str(&format!("Content-Disposition: {disposition}\r\n"));
    }
    head.push_str("\r\n");
    let tail = format!("\r\n--{boundary}--\r\n");
    let body = stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) })
        .chain(file)
        .chain(stream::once(async move { Ok(Bytes::from(tail)) }));
    let mut response = Body::from_stream(body).into_response();
    let content_type = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}"))
        .map_err(|e| Error::internal(e.to_string()))?;
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    Ok(response)
}
