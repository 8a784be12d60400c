//! The media repository: uploads of every size (streamed, sha256-checked), thumbnails,
//! ranges, limits, quota, asynchronous and resumable uploads, the legacy cut-off, and a
//! kill during an upload.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use conformance::{Backend, Server, ServerOptions, User, backend_tests};
use futures_util::StreamExt;
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

backend_tests!(
    roundtrip_1kib_and_50mib,
    roundtrip_500mib_streamed,
    thumbnails_for_png_jpeg_webp_gif,
    range_requests_and_safe_headers,
    resumable_upload_continues_after_a_break,
    size_limit_before_and_while_reading,
    per_user_quota_and_admin_commands,
    asynchronous_upload,
    legacy_downloads_only_before_the_cutoff,
    unknown_media_and_authentication,
    kill_during_upload_leaves_nothing,
);

const CHUNK: usize = 1024 * 1024;

/// A client without the harness's 60 s timeout, for big transfers.
pub(crate) fn big_client() -> reqwest::Client {
    conformance::http_client(Duration::from_secs(900))
}

/// Deterministic pseudo-random content, chunk by chunk.
pub(crate) fn chunk(seed: u64, index: usize, total: usize) -> Bytes {
    let len = CHUNK.min(total - index * CHUNK);
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    Bytes::from(buf)
}

fn chunks(total: usize) -> usize {
    total.div_ceil(CHUNK)
}

/// The sha256 of the generated content, computed without holding it.
fn generated_sha256(seed: u64, total: usize) -> String {
    let mut hasher = Sha256::new();
    for i in 0..chunks(total) {
        hasher.update(chunk(seed, i, total));
    }
    hex::encode(hasher.finalize())
}

fn generated_stream(seed: u64, total: usize) -> reqwest::Body {
    let stream =
        futures_util::stream::iter(0..chunks(total)).map(move |i| Ok::<_, std::io::Error>(chunk(seed, i, total)));
    reqwest::Body::wrap_stream(stream)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) async fn upload(server: &Server, user: &User, body: Vec<u8>, content_type: &str) -> conformance::Response {
    let resp = server
        .http
        .post(server.url("/_matrix/media/v3/upload?filename=file.bin"))
        .bearer_auth(&user.access_token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("upload");
    Server::read(resp).await
}

/// Uploads and returns the media id.
pub(crate) async fn upload_ok(server: &Server, user: &User, body: Vec<u8>, content_type: &str) -> String {
    let resp = upload(server, user, body, content_type).await;
    media_id(resp.assert_ok()["content_uri"].as_str().expect("content_uri"))
}

pub(crate) fn media_id(mxc: &str) -> String {
    assert!(mxc.starts_with("mxc://localhost/"), "{mxc}");
    mxc.rsplit('/').next().unwrap().to_owned()
}

/// Streams a download: (status, headers, length, sha256), never holding the body.
async fn download(
    server: &Server,
    path: &str,
    token: Option<&str>,
    range: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, u64, String) {
    let mut req = big_client().get(server.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(range) = range {
        req = req.header("range", range);
    }
    let resp = req.send().await.expect("download");
    let status = resp.status().as_u16();
    assert!(status < 500, "server error {status}");
    let headers = resp.headers().clone();
    let mut stream = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("body chunk");
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (status, headers, len, hex::encode(hasher.finalize()))
}

pub(crate) async fn download_bytes(
    server: &Server,
    path: &str,
    token: &str,
    range: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = server.http.get(server.url(path)).bearer_auth(token);
    if let Some(range) = range {
        req = req.header("range", range);
    }
    let resp = req.send().await.expect("download");
    let status = resp.status().as_u16();
    assert!(status < 500, "server error {status}");
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.expect("body").to_vec())
}

pub(crate) fn dl(media_id: &str) -> String {
    format!("/_matrix/client/v1/media/download/localhost/{media_id}")
}

/// Files under `<data>/media`, except the (possibly empty) `tmp` and `uploads` directories.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

pub(crate) fn media_dir(server: &Server) -> PathBuf {
    server.dir.path().join("data").join("media")
}

pub(crate) fn cli_stdout(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args, None);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn roundtrip_1kib_and_50mib(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    for (seed, size) in [(1u64, 1024usize), (2, 50 * 1024 * 1024)] {
        let expected = generated_sha256(seed, size);
        let resp = big_client()
            .post(server.url("/_matrix/media/v3/upload"))
            .bearer_auth(&alice.access_token)
            .header("content-type", "application/octet-stream")
            .body(generated_stream(seed, size))
            .send()
            .await
            .expect("upload");
        let id = media_id(Server::read(resp).await.assert_ok()["content_uri"].as_str().unwrap());
        // Any user of the server may download it, through the authenticated endpoint.
        let (status, headers, len, sha) = download(&server, &dl(&id), Some(&bob.access_token), None).await;
        assert_eq!(status, 200);
        assert_eq!(len, size as u64);
        assert_eq!(sha, expected, "sha256 of {size} bytes");
        assert_eq!(headers["content-length"], size.to_string().as_str());
    }
    // Identical content is stored once.
    let a = upload_ok(&server, &alice, b"same bytes".to_vec(), "text/plain").await;
    let b = upload_ok(&server, &bob, b"same bytes".to_vec(), "text/plain").await;
    assert_ne!(a, b);
    let stored = files_under(&media_dir(&server));
    assert_eq!(stored.len(), 3, "two big files and one shared small one: {stored:?}");
    let small = stored.iter().find(|p| p.ends_with(sha256_hex(b"same bytes"))).expect("content-addressed file");
    assert_eq!(std::fs::read(small).unwrap(), b"same bytes");
}

async fn roundtrip_500mib_streamed(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let size = 500 * 1024 * 1024;
    let expected = generated_sha256(3, size);
    let resp = big_client()
        .post(server.url("/_matrix/media/v3/upload?filename=big.bin"))
        .bearer_auth(&alice.access_token)
        .header("content-type", "application/octet-stream")
        .header("content-length", size.to_string())
        .body(generated_stream(3, size))
        .send()
        .await
        .expect("upload");
    let id = media_id(Server::read(resp).await.assert_ok()["content_uri"].as_str().unwrap());
    let (status, headers, len, sha) = download(&server, &dl(&id), Some(&alice.access_token), None).await;
    assert_eq!(status, 200);
    assert_eq!(len, size as u64);
    assert_eq!(sha, expected);
    assert_eq!(headers["content-disposition"], "attachment; filename=big.bin");
    // Resume a download at 400 MiB.
    let from = 400 * 1024 * 1024;
    let (status, headers, len, _) =
        download(&server, &dl(&id), Some(&alice.access_token), Some(&format!("bytes={from}-"))).await;
    assert_eq!(status, 206);
    assert_eq!(len, (size - from) as u64);
    assert_eq!(headers["content-range"], format!("bytes {from}-{}/{size}", size - 1).as_str());
}

pub(crate) fn encode(image: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode test image");
    out.into_inner()
}

async fn thumbnails_for_png_jpeg_webp_gif(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = alice.access_token.as_str();
    let mut img = image::RgbaImage::new(200, 100);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgba([(x % 256) as u8, (y * 2 % 256) as u8, 128, 255]);
    }
    let rgba = image::DynamicImage::ImageRgba8(img);
    let rgb = image::DynamicImage::ImageRgb8(rgba.to_rgb8());
    let cases = [
        ("image/png", encode(&rgba, image::ImageFormat::Png), image::ImageFormat::Png),
        ("image/jpeg", encode(&rgb, image::ImageFormat::Jpeg), image::ImageFormat::Jpeg),
        ("image/webp", encode(&rgba, image::ImageFormat::WebP), image::ImageFormat::Png),
        ("image/gif", encode(&rgba, image::ImageFormat::Gif), image::ImageFormat::Png),
    ];
    for (content_type, bytes, thumb_format) in cases {
        let id = upload_ok(&server, &alice, bytes, content_type).await;
        // Answered with the smallest configured size (Synapse's defaults) that covers the
        // request: 50x50 scale is the 320x240 box (never enlarging this 200x100 image),
        // 50x50 crop the 96x96 one.
        for (w, h, method, expect) in [
            (50, 50, "scale", (200, 100)),
            (50, 50, "crop", (96, 96)),
            (32, 32, "crop", (32, 32)),
            (800, 600, "scale", (200, 100)),
        ] {
            let path =
                format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width={w}&height={h}&method={method}");
            let (status, headers, body) = download_bytes(&server, &path, token, None).await;
            assert_eq!(status, 200, "{content_type} {method} {w}x{h}: {}", String::from_utf8_lossy(&body));
            let decoded = image::load_from_memory(&body).expect("thumbnail decodes");
            assert_eq!((decoded.width(), decoded.height()), expect, "{content_type} {method} {w}x{h}");
            assert_eq!(image::guess_format(&body).unwrap(), thumb_format, "{content_type}");
            assert_eq!(headers["content-type"], thumb_format.to_mime_type());
            // Cached: the same thumbnail again.
            let (_, again, body2) = download_bytes(&server, &path, token, None).await;
            assert_eq!(again["etag"], headers["etag"]);
            assert_eq!(body, body2);
        }
    }
    // Not an image: a Matrix error, not a 500.
    let id = upload_ok(&server, &alice, b"plain text".to_vec(), "text/plain").await;
    let resp =
        server.get(&format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width=32&height=32"), Some(token)).await;
    resp.assert_error(400, "M_UNKNOWN");
    let resp =
        server.get(&format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width=0&height=32"), Some(token)).await;
    assert_eq!(resp.status, 400, "{}", resp.body);
    // Garbage claiming to be a PNG.
    let id = upload_ok(&server, &alice, b"\x89PNG\r\n\x1a\nnot really".to_vec(), "image/png").await;
    let resp =
        server.get(&format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width=32&height=32"), Some(token)).await;
    resp.assert_error(400, "M_UNKNOWN");
}

async fn range_requests_and_safe_headers(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = alice.access_token.as_str();
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let id = upload_ok(&server, &alice, content.clone(), "application/octet-stream").await;

    let (status, headers, body) = download_bytes(&server, &dl(&id), token, Some("bytes=100-199")).await;
    assert_eq!(status, 206);
    assert_eq!(body, &content[100..200]);
    assert_eq!(headers["content-range"], "bytes 100-199/10000");
    assert_eq!(headers["content-length"], "100");
    let (status, _, body) = download_bytes(&server, &dl(&id), token, Some("bytes=9990-")).await;
    assert_eq!(status, 206);
    assert_eq!(body, &content[9990..]);
    let (status, _, body) = download_bytes(&server, &dl(&id), token, Some("bytes=-5")).await;
    assert_eq!(status, 206);
    assert_eq!(body, &content[9995..]);
    let (status, headers, _) = download_bytes(&server, &dl(&id), token, Some("bytes=10000-")).await;
    assert_eq!(status, 416);
    assert_eq!(headers["content-range"], "bytes */10000");
    let (status, headers, body) = download_bytes(&server, &dl(&id), token, None).await;
    assert_eq!(status, 200);
    assert_eq!(body, content);
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-security-policy"].to_str().unwrap().starts_with("sandbox"));
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(headers["content-disposition"].to_str().unwrap().starts_with("attachment"), "{headers:?}");

    // HTML is never shown inline; images are; the filename can be overridden.
    let html = upload_ok(&server, &alice, b"<script>alert(1)</script>".to_vec(), "text/html").await;
    let (_, headers, _) = download_bytes(&server, &dl(&html), token, None).await;
    assert!(headers["content-disposition"].to_str().unwrap().starts_with("attachment"));
    let png = upload_ok(&server, &alice, b"\x89PNG".to_vec(), "image/png").await;
    let (_, headers, _) = download_bytes(&server, &format!("{}/photo.png", dl(&png)), token, None).await;
    assert_eq!(headers["content-disposition"], "inline; filename=photo.png");
    assert_eq!(headers["content-type"], "image/png");
}

pub(crate) async fn create_resumable(server: &Server, user: &User, body: Value) -> Value {
    server.post("/_obmin/media/v1/upload", Some(&user.access_token), body).await.assert_ok().clone()
}

pub(crate) async fn patch(
    server: &Server,
    user: &User,
    url: &str,
    offset: u64,
    body: reqwest::Body,
) -> Result<conformance::Response, reqwest::Error> {
    let resp = big_client()
        .patch(server.url(url))
        .bearer_auth(&user.access_token)
        .header("upload-offset", offset.to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(body)
        .send()
        .await?;
    Ok(Server::read(resp).await)
}

async fn resumable_upload_continues_after_a_break(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let size = 12 * CHUNK + 12_345;
    let expected = generated_sha256(7, size);
    let created = create_resumable(
        &server,
        &alice,
        json!({"length": size, "content_type": "application/zip", "filename": "a.zip", "sha256": expected}),
    )
    .await;
    let url = created["upload_url"].as_str().unwrap().to_owned();
    let id = media_id(created["content_uri"].as_str().unwrap());
    assert_eq!(created["offset"], 0);

    // The connection breaks after 5 chunks: the stream fails mid-body.
    let broken = futures_util::stream::iter(0..6)
        .map(move |i| if i < 5 { Ok(chunk(7, i, size)) } else { Err(std::io::Error::other("network gone")) });
    let _ = patch(&server, &alice, &url, 0, reqwest::Body::wrap_stream(broken)).await;
    // The server kept what arrived; the client asks where to continue.
    let mut offset = 0;
    for _ in 0..50 {
        let status = server.get(&url, Some(&alice.access_token)).await;
        offset = status.assert_ok()["offset"].as_u64().unwrap();
        assert_eq!(status.headers["upload-offset"], offset.to_string().as_str());
        if offset > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(offset > 0 && offset <= (5 * CHUNK) as u64, "kept {offset} bytes");
    // Not yet downloadable.
    let resp = server
        .http
        .get(server.url(&format!("{}?timeout_ms=0", dl(&id))))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 504, "M_NOT_YET_UPLOADED");
    // Wrong offset, wrong user.
    patch(&server, &alice, &url, offset + 1, reqwest::Body::from(vec![0u8; 10]))
        .await
        .unwrap()
        .assert_error(409, "M_UNKNOWN");
    assert_eq!(server.get(&url, Some(&bob.access_token)).await.status, 404);
    patch(&server, &bob, &url, offset, reqwest::Body::from(vec![0u8; 10]))
        .await
        .unwrap()
        .assert_error(404, "M_NOT_FOUND");

    // Continue from the server's offset to the end.
    let rest = offset as usize;
    let tail = futures_util::stream::iter(rest / CHUNK..chunks(size)).map(move |i| {
        let c = chunk(7, i, size);
        let skip = if i == rest / CHUNK { rest % CHUNK } else { 0 };
        Ok::<_, std::io::Error>(c.slice(skip..))
    });
    let done = patch(&server, &alice, &url, offset, reqwest::Body::wrap_stream(tail)).await.unwrap();
    assert_eq!(done.assert_ok()["complete"], true, "{}", done.body);
    assert_eq!(done.body["offset"], size);
    let (status, headers, len, sha) = download(&server, &dl(&id), Some(&bob.access_token), None).await;
    assert_eq!((status, len), (200, size as u64));
    assert_eq!(sha, expected);
    assert_eq!(headers["content-type"], "application/zip");
    assert!(files_under(&media_dir(&server).join("uploads")).is_empty());
    // Finished uploads take no more bytes.
    patch(&server, &alice, &url, size as u64, reqwest::Body::from(vec![1u8]))
        .await
        .unwrap()
        .assert_error(409, "M_UNKNOWN");

    // A checksum mismatch is refused and the upload starts over.
    let created = create_resumable(&server, &alice, json!({"length": 4, "sha256": sha256_hex(b"abcd")})).await;
    let url = created["upload_url"].as_str().unwrap().to_owned();
    patch(&server, &alice, &url, 0, reqwest::Body::from(b"abcX".to_vec()))
        .await
        .unwrap()
        .assert_error(400, "M_INVALID_PARAM");
    assert_eq!(server.get(&url, Some(&alice.access_token)).await.assert_ok()["offset"], 0);
    let ok = patch(&server, &alice, &url, 0, reqwest::Body::from(b"abcd".to_vec())).await.unwrap();
    assert_eq!(ok.assert_ok()["complete"], true);
    // More bytes than announced, and announcements over the limit.
    let created = create_resumable(&server, &alice, json!({"length": 4})).await;
    let url = created["upload_url"].as_str().unwrap().to_owned();
    patch(&server, &alice, &url, 0, reqwest::Body::from(b"abcdef".to_vec()))
        .await
        .unwrap()
        .assert_error(400, "M_INVALID_PARAM");
    server
        .post("/_obmin/media/v1/upload", Some(&alice.access_token), json!({"length": 600u64 * 1024 * 1024}))
        .await
        .assert_error(413, "M_TOO_LARGE");
    server
        .post("/_obmin/media/v1/upload", Some(&alice.access_token), json!({"size": 1}))
        .await
        .assert_error(400, "M_BAD_JSON");
    server.post("/_obmin/media/v1/upload", None, json!({"length": 1})).await.assert_error(401, "M_MISSING_TOKEN");
}

/// Sends a raw HTTP/1.1 request head (and optionally chunked body data until the server
/// answers); returns the status line's code and the JSON body of the answer.
pub(crate) async fn raw_upload(
    server: &Server,
    token: &str,
    content_length: Option<u64>,
    chunked_total: usize,
) -> (u16, Value, usize) {
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let length_header = match content_length {
        Some(n) => format!("Content-Length: {n}\r\n"),
        None => "Transfer-Encoding: chunked\r\n".to_owned(),
    };
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n{length_header}\r\n"
    );
    writer.write_all(head.as_bytes()).await.expect("write head");
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        let data = vec![b'x'; 64 * 1024];
        while sent < chunked_total {
            let frame = [format!("{:x}\r\n", data.len()).as_bytes(), &data, b"\r\n"].concat();
            if writer.write_all(&frame).await.is_err() {
                break;
            }
            sent += data.len();
        }
        sent
    });
    let mut response = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = tokio::time::timeout_at(deadline, reader.read(&mut buf)).await.expect("response in time").unwrap_or(0);
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    sender.abort();
    let sent = sender.await.unwrap_or(0);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 =
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no response: {text:?}"));
    let body =
        text.split_once("\r\n\r\n").map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null)).unwrap_or(Value::Null);
    (status, body, sent)
}

async fn size_limit_before_and_while_reading(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_MEDIA_MAX_UPLOAD_BYTES", "1048576").start().await;
    let alice = server.register("alice", "secret-pass").await;
    let config = server.get("/_matrix/client/v1/media/config", Some(&alice.access_token)).await;
    assert_eq!(config.assert_ok()["m.upload.size"], 1048576);

    // Content-Length too large: refused before a single body byte is sent.
    let (status, body, _) = raw_upload(&server, &alice.access_token, Some(10_000_000_000), 0).await;
    assert_eq!(status, 413);
    assert_eq!(body["errcode"], "M_TOO_LARGE");
    // No Content-Length: refused as soon as the stream passes the limit, long before its end.
    let total = 256 * 1024 * 1024;
    let (status, body, sent) = raw_upload(&server, &alice.access_token, None, total).await;
    assert_eq!(status, 413);
    assert_eq!(body["errcode"], "M_TOO_LARGE");
    assert!(sent < total / 2, "the server read {sent} bytes before refusing");
    // Exactly the limit is fine; one byte more is not.
    upload_ok(&server, &alice, vec![7u8; 1048576], "application/octet-stream").await;
    upload(&server, &alice, vec![7u8; 1048577], "application/octet-stream").await.assert_error(413, "M_TOO_LARGE");
    // Nothing half-written stays behind.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(files_under(&media_dir(&server).join("tmp")).is_empty());
    assert_eq!(files_under(&media_dir(&server)).len(), 1);
}

async fn per_user_quota_and_admin_commands(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_MEDIA_QUOTA_BYTES_PER_USER", "3000000").start().await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let first = upload_ok(&server, &alice, vec![1u8; 2_000_000], "application/octet-stream").await;
    // Announced over the quota, and streamed over it.
    upload(&server, &alice, vec![2u8; 1_500_000], "application/octet-stream").await.assert_error(403, "M_FORBIDDEN");
    // (Streamed without Content-Length over a raw connection: an HTTP client library that
    // is still sending when the server answers reports a broken pipe instead of the answer.)
    let (status, body, _) = raw_upload(&server, &alice.access_token, None, 8 * CHUNK).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    upload_ok(&server, &alice, vec![3u8; 1_000_000], "application/octet-stream").await;
    upload(&server, &alice, vec![4u8; 1], "application/octet-stream").await.assert_error(403, "M_FORBIDDEN");
    // Quotas are per user.
    upload_ok(&server, &bob, vec![5u8; 2_500_000], "application/octet-stream").await;

    let usage = cli_stdout(&server, &["media", "usage"]);
    assert!(usage.lines().any(|l| l.starts_with("@alice:localhost") && l.ends_with(" 3000000")), "{usage}");
    assert!(usage.lines().any(|l| l.starts_with("@bob:localhost") && l.ends_with(" 2500000")), "{usage}");
    let list = cli_stdout(&server, &["media", "list", "--user", "alice"]);
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(list.contains(&first));
    // Deleting frees quota and the file.
    assert!(cli_stdout(&server, &["media", "delete", &format!("mxc://localhost/{first}")]).contains("deleted"));
    assert_eq!(server.get(&dl(&first), Some(&alice.access_token)).await.status, 404);
    assert_eq!(files_under(&media_dir(&server)).len(), 2);
    upload_ok(&server, &alice, vec![6u8; 1_900_000], "application/octet-stream").await;
    assert!(!server.cli(&["media", "delete", "nope"], None).status.success());
    assert!(cli_stdout(&server, &["media", "purge-remote"]).contains("purged 0"));
}

async fn asynchronous_upload(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let created = server.post("/_matrix/media/v1/create", Some(&alice.access_token), json!({})).await;
    let mxc = created.assert_ok()["content_uri"].as_str().unwrap().to_owned();
    assert!(created.body["unused_expires_at"].as_u64().unwrap() > 0);
    let id = media_id(&mxc);
    // Before the content: 504 M_NOT_YET_UPLOADED (after the requested wait).
    let resp = server
        .http
        .get(server.url(&format!("{}?timeout_ms=300", dl(&id))))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errcode"], "M_NOT_YET_UPLOADED");

    let put = |token: String, bytes: Vec<u8>| {
        let server = &server;
        let id = id.clone();
        async move {
            let resp = server
                .http
                .put(server.url(&format!("/_matrix/media/v3/upload/localhost/{id}?filename=late.txt")))
                .bearer_auth(token)
                .header("content-type", "text/plain")
                .body(bytes)
                .send()
                .await
                .unwrap();
            Server::read(resp).await
        }
    };
    put(bob.access_token.clone(), b"not mine".to_vec()).await.assert_error(403, "M_FORBIDDEN");
    // A download waiting for the content gets it as soon as it arrives.
    let waiting = {
        let url = server.url(&format!("{}?timeout_ms=10000", dl(&id)));
        let token = bob.access_token.clone();
        let http = server.http.clone();
        tokio::spawn(async move { http.get(url).bearer_auth(token).send().await.unwrap().bytes().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(put(alice.access_token.clone(), b"hello later".to_vec()).await.assert_ok(), &json!({}));
    assert_eq!(&waiting.await.unwrap()[..], b"hello later");
    put(alice.access_token.clone(), b"again".to_vec()).await.assert_error(409, "M_CANNOT_OVERWRITE_MEDIA");
    let (status, headers, body) = download_bytes(&server, &dl(&id), &bob.access_token, None).await;
    assert_eq!((status, body.as_slice()), (200, &b"hello later"[..]));
    assert_eq!(headers["content-disposition"], "inline; filename=late.txt");
    // Unknown reservations.
    let resp = server
        .http
        .put(server.url("/_matrix/media/v3/upload/localhost/doesnotexist"))
        .bearer_auth(&alice.access_token)
        .body("x")
        .send()
        .await
        .unwrap();
    Server::read(resp).await.assert_error(404, "M_NOT_FOUND");
}

async fn legacy_downloads_only_before_the_cutoff(backend: Backend) {
    let mut server =
        ServerOptions::new(backend).env("OBMIN_MEDIA_UNAUTHENTICATED_CUTOFF_MS", "99999999999999").start().await;
    let alice = server.register("alice", "secret-pass").await;
    let png = encode(&image::DynamicImage::new_rgb8(64, 64), image::ImageFormat::Png);
    let old = upload_ok(&server, &alice, png.clone(), "image/png").await;
    // The cut-off moves to now: media uploaded from here on needs authentication.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    server.set_env("OBMIN_MEDIA_UNAUTHENTICATED_CUTOFF_MS", &now.to_string());
    server.restart().await;
    let alice_token =
        server.login("alice", "secret-pass").await.assert_ok()["access_token"].as_str().unwrap().to_owned();
    let new =
        upload_ok(&server, &User { access_token: alice_token.clone(), ..alice.clone() }, png.clone(), "image/png")
            .await;

    let (status, _, len, sha) =
        download(&server, &format!("/_matrix/media/v3/download/localhost/{old}"), None, None).await;
    assert_eq!((status, len), (200, png.len() as u64));
    assert_eq!(sha, sha256_hex(&png));
    let thumb =
        server.get(&format!("/_matrix/media/v3/thumbnail/localhost/{old}?width=32&height=32&method=crop"), None).await;
    assert_eq!(thumb.status, 200);
    server.get(&format!("/_matrix/media/v3/download/localhost/{new}"), None).await.assert_error(404, "M_NOT_FOUND");
    server
        .get(&format!("/_matrix/media/v3/download/localhost/{new}/x.png"), None)
        .await
        .assert_error(404, "M_NOT_FOUND");
    server
        .get(&format!("/_matrix/media/v3/thumbnail/localhost/{new}?width=32&height=32"), None)
        .await
        .assert_error(404, "M_NOT_FOUND");
    // Both are served by the authenticated endpoints.
    for id in [&old, &new] {
        let (status, _, len, _) = download(&server, &dl(id), Some(&alice_token), None).await;
        assert_eq!((status, len), (200, png.len() as u64));
    }
}

async fn unknown_media_and_authentication(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = Some(alice.access_token.as_str());
    server.get(&dl("doesnotexist"), token).await.assert_error(404, "M_NOT_FOUND");
    server.get("/_matrix/client/v1/media/download/other.example/abc", token).await.assert_error(404, "M_NOT_FOUND");
    server.get(&format!("{}/name.txt", dl("nope")), token).await.assert_error(404, "M_NOT_FOUND");
    server
        .get("/_matrix/client/v1/media/download/localhost/..%2F..%2Fetc", token)
        .await
        .assert_error(404, "M_NOT_FOUND");
    server
        .get("/_matrix/client/v1/media/thumbnail/localhost/nope?width=32&height=32", token)
        .await
        .assert_error(404, "M_NOT_FOUND");
    server.get("/_matrix/media/v3/download/localhost/nope", None).await.assert_error(404, "M_NOT_FOUND");
    let id = upload_ok(&server, &alice, b"x".to_vec(), "text/plain").await;
    server.get(&dl(&id), None).await.assert_error(401, "M_MISSING_TOKEN");
    server.get(&dl(&id), Some("bogus")).await.assert_error(401, "M_UNKNOWN_TOKEN");
    server
        .request_raw(reqwest::Method::POST, "/_matrix/media/v3/upload", None, b"x".to_vec())
        .await
        .assert_error(401, "M_MISSING_TOKEN");
    server.get("/_matrix/client/v1/media/config", None).await.assert_error(401, "M_MISSING_TOKEN");
    let legacy = server.get("/_matrix/media/v3/config", token).await;
    assert_eq!(legacy.assert_ok()["m.upload.size"], 512 * 1024 * 1024);
    let resp = server
        .http
        .post(server.url("/_matrix/media/v3/upload?filename=a%00b"))
        .bearer_auth(&alice.access_token)
        .body("x")
        .send()
        .await
        .unwrap();
    Server::read(resp).await.assert_error(400, "M_INVALID_PARAM");
}

async fn kill_during_upload_leaves_nothing(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let total = 400 * CHUNK;
    // A slow upload: 1 MiB every 20 ms.
    let slow = futures_util::stream::iter(0..chunks(total)).then(move |i| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, std::io::Error>(chunk(11, i, total))
    });
    let upload = {
        let req = big_client()
            .post(server.url("/_matrix/media/v3/upload"))
            .bearer_auth(&alice.access_token)
            .body(reqwest::Body::wrap_stream(slow));
        tokio::spawn(async move { req.send().await.map(|r| r.status()) })
    };
    let tmp = media_dir(&server).join("tmp");
    let mut seen = 0;
    for _ in 0..200 {
        seen = files_under(&tmp).iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum::<u64>();
        if seen >= 8 * CHUNK as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen >= 8 * CHUNK as u64, "the upload is being written to a temporary file ({seen} bytes)");
    server.kill();
    assert!(upload.await.unwrap().is_err(), "the killed server cannot have answered");
    assert!(!files_under(&tmp).is_empty(), "the killed process left its temporary file");
    server.restart().await;
    assert!(files_under(&tmp).is_empty(), "leftover temp files are deleted at start");
    assert!(files_under(&media_dir(&server)).is_empty(), "no content file");
    let list = cli_stdout(&server, &["media", "list"]);
    assert_eq!(list.lines().count(), 1, "only the header, no media row: {list}");
    // The server works normally afterwards.
    let token = server.login("alice", "secret-pass").await.assert_ok()["access_token"].as_str().unwrap().to_owned();
    let id =
        upload_ok(&server, &User { access_token: token.clone(), ..alice.clone() }, b"after".to_vec(), "text/plain")
            .await;
    let (_, _, body) = download_bytes(&server, &dl(&id), &token, None).await;
    assert_eq!(body, b"after");
}
