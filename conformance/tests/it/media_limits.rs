//! The media repository under abuse: thumbnails only in the configured sizes (however many
//! sizes are asked for), one generation for identical concurrent requests and a bounded
//! number at once, announced resumable uploads counted in the quota, and a quota that
//! concurrent uploads cannot overrun together.

use std::time::{Duration, Instant};

use bytes::Bytes;
use conformance::{Backend, Server, ServerOptions, backend_tests};
use serde_json::json;

use super::media::{
    cli_stdout, create_resumable, download_bytes, encode, files_under, media_dir, patch, raw_upload, upload_ok,
};

backend_tests!(
    thumbnails_only_in_configured_sizes,
    thumbnail_generation_is_merged_and_bounded,
    pending_resumable_uploads_count_in_the_quota,
    concurrent_uploads_cannot_overrun_the_quota,
);

/// Opens `/metrics` on servers where it needs a bearer token; ignored where it is public.
pub(crate) const METRICS_TOKEN: &str = "media-limits-metrics-token";

pub(crate) async fn metric(server: &Server, name: &str) -> f64 {
    let text = server
        .http
        .get(server.url("/metrics"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// A PNG of `width` x `height` whose pixels depend on `seed` (distinct seeds, distinct files).
fn png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x.wrapping_mul(seed + 3) % 256) as u8, (y.wrapping_add(seed) % 256) as u8, ((x ^ y) % 256) as u8])
    });
    encode(&image::DynamicImage::ImageRgb8(image), image::ImageFormat::Png)
}

fn thumbnail_path(media_id: &str, width: u32, height: u32, method: &str) -> String {
    format!("/_matrix/client/v1/media/thumbnail/localhost/{media_id}?width={width}&height={height}&method={method}")
}

/// A client asking for a new thumbnail size with every request (30 sizes, both methods)
/// makes the server produce and keep at most one thumbnail per configured size; each answer
/// is the smallest configured size that covers the request (or the largest there is).
async fn thumbnails_only_in_configured_sizes(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = server.register("alice", "secret-pass").await;
    let token = alice.access_token.as_str();
    let id = upload_ok(&server, &alice, png(1000, 800, 1), "image/png").await;
    let stored_before = files_under(&media_dir(&server)).len();

    // The attack: many distinct sizes.
    for i in 0..30u32 {
        let method = if i % 2 == 0 { "crop" } else { "scale" };
        let (w, h) = (10 + i * 23, 12 + i * 19);
        let (status, _, body) = download_bytes(&server, &thumbnail_path(&id, w, h, method), token, None).await;
        assert_eq!(status, 200, "{w}x{h} {method}: {}", String::from_utf8_lossy(&body));
    }
    let made = files_under(&media_dir(&server)).len() - stored_before;
    assert!(made <= 5, "30 thumbnail requests of distinct sizes made {made} thumbnails; 5 sizes are configured");
    // (request, expected dimensions) with Synapse's default sizes: crop 32x32 and 96x96,
    // scale 320x240, 640x480 and 800x600.
    let expectations = [
        ((20, 20, "crop"), (32, 32)),
        ((33, 33, "crop"), (96, 96)),
        ((96, 96, "crop"), (96, 96)),
        ((500, 500, "crop"), (96, 96)),
        ((100, 100, "scale"), (300, 240)),
        ((321, 100, "scale"), (600, 480)),
        ((700, 500, "scale"), (750, 600)),
        ((1600, 1600, "scale"), (750, 600)),
    ];
    for ((w, h, method), expected) in expectations {
        let (status, headers, body) = download_bytes(&server, &thumbnail_path(&id, w, h, method), token, None).await;
        assert_eq!(status, 200, "{w}x{h} {method}: {}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], "image/png");
        let decoded = image::load_from_memory(&body).expect("a thumbnail");
        assert_eq!((decoded.width(), decoded.height()), expected, "{w}x{h} {method}");
    }

    // Another configuration: only what the operator lists.
    let server =
        ServerOptions::new(backend).env("OBMIN_MEDIA_THUMBNAIL_SIZES", "64x64-crop, 400x300-scale").start().await;
    let bob = server.register("bob", "secret-pass").await;
    let id = upload_ok(&server, &bob, png(1000, 800, 2), "image/png").await;
    for ((w, h, method), expected) in
        [((10, 10, "crop"), (64, 64)), ((200, 200, "crop"), (64, 64)), ((50, 50, "scale"), (375, 300))]
    {
        let (status, _, body) =
            download_bytes(&server, &thumbnail_path(&id, w, h, method), &bob.access_token, None).await;
        assert_eq!(status, 200, "{w}x{h} {method}");
        let decoded = image::load_from_memory(&body).expect("a thumbnail");
        assert_eq!((decoded.width(), decoded.height()), expected, "{w}x{h} {method}");
    }
}

/// Identical concurrent requests for a thumbnail not made yet cause one generation, every
/// requester getting its result; distinct ones run at most `thumbnail_concurrency` at once.
async fn thumbnail_generation_is_merged_and_bounded(backend: Backend) {
    let server = ServerOptions::new(backend)
        .env("OBMIN_METRICS_BEARER_TOKEN", METRICS_TOKEN)
        .env("OBMIN_MEDIA_THUMBNAIL_CONCURRENCY", "1")
        .start()
        .await;
    let alice = server.register("alice", "secret-pass").await;
    let token = alice.access_token.clone();
    // Large enough that decoding and scaling take a while, so the requests overlap.
    let big = upload_ok(&server, &alice, png(3000, 2400, 3), "image/png").await;
    let requests = 8;
    let mut tasks = Vec::new();
    for _ in 0..requests {
        let (http, url, token) =
            (server.http.clone(), server.url(&thumbnail_path(&big, 640, 480, "scale")), token.clone());
        tasks.push(tokio::spawn(async move {
            let resp = http.get(url).bearer_auth(token).send().await.expect("thumbnail");
            (resp.status().as_u16(), resp.bytes().await.expect("body"))
        }));
    }
    let mut bodies: Vec<Bytes> = Vec::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every requester gets the same thumbnail");
    let generated = metric(&server, "obmin_media_thumbnails_generated_total").await;
    assert_eq!(generated, 1.0, "{requests} identical concurrent requests generated {generated} thumbnails");

    // Distinct thumbnails requested at once: one generation at a time (the configured bound).
    let ids = [
        upload_ok(&server, &alice, png(2000, 1600, 4), "image/png").await,
        upload_ok(&server, &alice, png(2000, 1600, 5), "image/png").await,
        upload_ok(&server, &alice, png(2000, 1600, 6), "image/png").await,
    ];
    let mut tasks = Vec::new();
    for id in &ids {
        let (http, url, token) =
            (server.http.clone(), server.url(&thumbnail_path(id, 320, 240, "scale")), token.clone());
        tasks.push(tokio::spawn(
            async move { http.get(url).bearer_auth(token).send().await.expect("thumbnail").status() },
        ));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(metric(&server, "obmin_media_thumbnails_generated_total").await, 4.0);
    let peak = metric(&server, "obmin_media_thumbnail_generations_peak").await;
    assert_eq!(peak, 1.0, "{peak} thumbnails were generated at once; the bound is 1");
}

/// An announced resumable upload holds its length of the quota from the announcement on:
/// a user cannot announce several uploads that each fit alone and then fill them all.
async fn pending_resumable_uploads_count_in_the_quota(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_MEDIA_QUOTA_BYTES_PER_USER", "3000000").start().await;
    let alice = server.register("alice", "secret-pass").await;
    let first = create_resumable(&server, &alice, json!({"length": 2_000_000})).await;
    // Two announced megabytes count: another 2 MB announcement, or a 1.5 MB upload, no longer fits.
    server
        .post("/_obmin/media/v1/upload", Some(&alice.access_token), json!({"length": 2_000_000}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    // (Announced in Content-Length and refused before the body is read: sent over a raw
    // connection, as a client library may see the connection close while it still sends.)
    let (status, body, _) = raw_upload(&server, &alice.access_token, Some(1_500_000), 0).await;
    assert_eq!((status, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
    // What is left does fit.
    upload_ok(&server, &alice, vec![2u8; 1_000_000], "application/octet-stream").await;
    // The announced upload completes within its reservation.
    let url = first["upload_url"].as_str().unwrap();
    let done = patch(&server, &alice, url, 0, reqwest::Body::from(vec![3u8; 2_000_000])).await.unwrap();
    assert_eq!(done.assert_ok()["complete"], true, "{}", done.body);
    let usage = cli_stdout(&server, &["media", "usage"]);
    assert!(usage.lines().any(|l| l.starts_with("@alice:localhost") && l.ends_with(" 3000000")), "{usage}");
    // Forgetting an unfinished upload gives its reservation back.
    let bob = server.register("bob", "secret-pass").await;
    let reserved = create_resumable(&server, &bob, json!({"length": 3_000_000})).await;
    let id = reserved["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    server
        .post("/_obmin/media/v1/upload", Some(&bob.access_token), json!({"length": 1}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert!(cli_stdout(&server, &["media", "delete", &format!("mxc://localhost/{id}")]).contains("deleted"));
    create_resumable(&server, &bob, json!({"length": 3_000_000})).await;
}

/// Six uploads of 1 MiB at once against a 3 MiB quota, each past the server's first look at
/// the quota before any finishes: exactly three are stored, the others are refused.
async fn concurrent_uploads_cannot_overrun_the_quota(backend: Backend) {
    const MIB: usize = 1024 * 1024;
    let server =
        ServerOptions::new(backend).env("OBMIN_MEDIA_QUOTA_BYTES_PER_USER", &(3 * MIB).to_string()).start().await;
    let alice = server.register("alice", "secret-pass").await;
    let uploads = 6;
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..uploads {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let request = server
            .http
            .post(server.url(&format!("/_matrix/media/v3/upload?filename=part{i}.bin")))
            .bearer_auth(&alice.access_token)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body));
        tx.send(Ok(Bytes::from(vec![i as u8; 64 * 1024]))).await.unwrap();
        senders.push(tx);
        tasks.push(tokio::spawn(async move { Server::read(request.send().await.expect("upload")).await }));
    }
    // Every upload is being received (each has its temporary file): all of them are past the
    // quota check made before reading.
    let tmp = media_dir(&server).join("tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_under(&tmp).len() < uploads {
        assert!(Instant::now() < deadline, "the uploads never all started: {:?}", files_under(&tmp));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, tx) in senders.into_iter().enumerate() {
        tx.send(Ok(Bytes::from(vec![i as u8; MIB - 64 * 1024]))).await.unwrap();
    }
    let mut stored = 0;
    for task in tasks {
        let response = task.await.unwrap();
        match response.status.as_u16() {
            200 => stored += 1,
            _ => response.assert_error(403, "M_FORBIDDEN"),
        }
    }
    assert_eq!(stored, 3, "{stored} uploads of 1 MiB were stored against a 3 MiB quota");
    let usage = cli_stdout(&server, &["media", "usage"]);
    assert!(
        usage.lines().any(|l| l.starts_with("@alice:localhost") && l.ends_with(&format!(" {}", 3 * MIB))),
        "{usage}"
    );
}
