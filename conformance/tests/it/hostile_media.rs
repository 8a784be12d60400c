//! Other servers' media fetched for local clients, from a hostile origin: its multipart answer
//! is read as it streams and cut off at the size limit (an endless body costs us no more than
//! the limit), a `Location` answer is followed once, and concurrent downloads of the same
//! media make one federation request.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use conformance::{
    Backend, Server, ServerOptions, backend_tests,
    hostile::{Endpoint, HostileServer, Reply},
};
use futures_util::StreamExt;
use rand::{RngCore, SeedableRng, rngs::StdRng};

use super::{
    media::{files_under, media_dir},
    media_limits::{METRICS_TOKEN, metric},
};

backend_tests!(remote_media_is_streamed_within_the_limit, concurrent_remote_downloads_fetch_once);

const BOUNDARY: &str = "hostile-boundary-7f3a";
static ZEROS: [u8; 65536] = [0; 65536];

type Chunks = futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// The multipart framing before the file: the metadata part, then the file part's headers.
fn head(content_type: &str, filename: Option<&str>) -> Bytes {
    let mut head = format!(
        "--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{BOUNDARY}\r\nContent-Type: {content_type}\r\n"
    );
    if let Some(name) = filename {
        head.push_str(&format!("Content-Disposition: inline; filename=\"{name}\"\r\n"));
    }
    head.push_str("\r\n");
    Bytes::from(head)
}

fn tail() -> Bytes {
    Bytes::from(format!("\r\n--{BOUNDARY}--\r\n"))
}

fn multipart(body: Chunks) -> Reply {
    let content_type = format!("multipart/mixed; boundary={BOUNDARY}");
    Reply::streamed(200, &[("content-type", content_type.as_str())], body)
}

/// A whole multipart answer carrying `file`, sent in small chunks.
fn media_answer(file: Vec<u8>, content_type: &str, filename: Option<&str>) -> Reply {
    let mut parts = vec![head(content_type, filename)];
    parts.extend(file.chunks(7000).map(Bytes::copy_from_slice));
    parts.push(tail());
    multipart(futures_util::stream::iter(parts.into_iter().map(Ok)).boxed())
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

fn remote_download(h: &HostileServer, media_id: &str) -> String {
    format!("/_matrix/client/v1/media/download/{}/{media_id}", h.name)
}

/// (status, content-type, content-disposition, body)
async fn get(server: &Server, path: &str, token: &str) -> (u16, String, String, Bytes) {
    let resp = server.http.get(server.url(path)).bearer_auth(token).send().await.expect("download");
    let status = resp.status().as_u16();
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (content_type, disposition) = (header("content-type"), header("content-disposition"));
    (status, content_type, disposition, resp.bytes().await.expect("body"))
}

fn errcode(body: &Bytes) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errcode"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A remote server answering with an endless (or merely too large) body is cut off at the
/// upload limit while the body streams, not after reading it into memory; honest answers,
/// streamed in small pieces or pointing elsewhere with `Location`, arrive whole.
async fn remote_media_is_streamed_within_the_limit(backend: Backend) {
    const LIMIT: u64 = 1024 * 1024;
    let server =
        ServerOptions::new(backend).federating().env("OBMIN_MEDIA_MAX_UPLOAD_BYTES", &LIMIT.to_string()).start().await;
    let h = HostileServer::start().await;
    let alice = server.register("alice", "secret-pass").await;
    let token = alice.access_token.as_str();
    let sent = Arc::new(AtomicU64::new(0));
    let photo = random_bytes(300_000, 1);
    let elsewhere = random_bytes(200_000, 2);
    let moved_to = format!("{}/files/elsewhere", h.url);
    {
        let (sent, photo) = (sent.clone(), photo.clone());
        h.on(Endpoint::Media, move |req| match req.args.get(1).map(String::as_str).unwrap_or_default() {
            "endless" => {
                let sent = sent.clone();
                let zeros = futures_util::stream::repeat_with(move || {
                    sent.fetch_add(ZEROS.len() as u64, Ordering::SeqCst);
                    Ok(Bytes::from_static(&ZEROS))
                });
                multipart(futures_util::stream::once(async { Ok(head("application/octet-stream", None)) }).chain(zeros).boxed())
            }
            "large" => media_answer(vec![7u8; LIMIT as usize + 1], "application/octet-stream", None),
            "photo" => media_answer(photo.clone(), "image/png", Some("photo.png")),
            "moved" => {
                let body = format!(
                    "--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{BOUNDARY}\r\nLocation: {moved_to}\r\n\r\n\r\n--{BOUNDARY}--\r\n"
                );
                multipart(futures_util::stream::once(async move { Ok(Bytes::from(body)) }).boxed())
            }
            "garbage" => Reply::streamed(200, &[("content-type", "text/html")], futures_util::stream::once(async { Ok(Bytes::from_static(b"<html>no</html>")) })),
            _ => Reply::error(404, "M_NOT_FOUND", "no such media"),
        });
        let elsewhere = elsewhere.clone();
        h.on(Endpoint::Other, move |req| {
            if req.path == "/files/elsewhere" {
                let body = Bytes::from(elsewhere.clone());
                Reply::streamed(
                    200,
                    &[("content-type", "image/jpeg")],
                    futures_util::stream::once(async move { Ok(body) }),
                )
            } else {
                Reply::error(404, "M_NOT_FOUND", "nothing here")
            }
        });
    }

    // The attack: an answer without end.
    let (status, _, _, body) = get(&server, &remote_download(&h, "endless"), token).await;
    let read = sent.load(Ordering::SeqCst);
    assert!(read < 16 * LIMIT, "the server read {read} bytes of an endless answer; its limit is {LIMIT}");
    assert_eq!((status, errcode(&body).as_str()), (502, "M_TOO_LARGE"), "{}", String::from_utf8_lossy(&body));
    // One byte over the limit, in a finite answer.
    let (status, _, _, body) = get(&server, &remote_download(&h, "large"), token).await;
    assert_eq!((status, errcode(&body).as_str()), (502, "M_TOO_LARGE"), "{}", String::from_utf8_lossy(&body));
    // Nothing of them stays on disk.
    let tmp = media_dir(&server).join("tmp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !files_under(&tmp).is_empty() {
        assert!(Instant::now() < deadline, "partial downloads left behind: {:?}", files_under(&tmp));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(files_under(&media_dir(&server)).is_empty(), "{:?}", files_under(&media_dir(&server)));
    // Not multipart at all: not found, and no server error.
    let (status, _, _, body) = get(&server, &remote_download(&h, "garbage"), token).await;
    assert_eq!((status, errcode(&body).as_str()), (404, "M_NOT_FOUND"), "{}", String::from_utf8_lossy(&body));

    // An honest answer streamed in small pieces arrives whole, with its type and name.
    let (status, content_type, disposition, body) = get(&server, &remote_download(&h, "photo"), token).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.as_ref(), photo.as_slice());
    assert_eq!(content_type, "image/png");
    assert_eq!(disposition, "inline; filename=photo.png");
    // `Location`: the content is fetched from where the origin points.
    let (status, content_type, _, body) = get(&server, &remote_download(&h, "moved"), token).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.as_ref(), elsewhere.as_slice());
    assert_eq!(content_type, "image/jpeg");
    // Kept: asked again, the origin is not asked again.
    let asked = h.requests(Endpoint::Media).len();
    let (status, _, _, again) = get(&server, &remote_download(&h, "photo"), token).await;
    assert_eq!((status, again.as_ref()), (200, photo.as_slice()));
    assert_eq!(h.requests(Endpoint::Media).len(), asked);
}

/// Clients downloading the same remote media at once cause one federation request, and each
/// gets the whole file.
async fn concurrent_remote_downloads_fetch_once(backend: Backend) {
    let server =
        ServerOptions::new(backend).federating().env("OBMIN_METRICS_BEARER_TOKEN", METRICS_TOKEN).start().await;
    let h = HostileServer::start().await;
    let alice = server.register("alice", "secret-pass").await;
    let file = random_bytes(500_000, 3);
    // The answer stalls after its first bytes until the test has every download waiting.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    {
        let (file, gate) = (file.clone(), gate.clone());
        h.on(Endpoint::Media, move |_| {
            let (file, gate) = (file.clone(), gate.clone());
            let rest = futures_util::stream::once(async move {
                let _permit = gate.acquire().await;
                Ok::<_, std::io::Error>(Bytes::from(file))
            });
            multipart(
                futures_util::stream::once(async { Ok(head("application/octet-stream", None)) })
                    .chain(rest)
                    .chain(futures_util::stream::once(async { Ok(tail()) }))
                    .boxed(),
            )
        });
    }
    let downloads = 6;
    let mut tasks = Vec::new();
    for _ in 0..downloads {
        let (http, url, token) =
            (server.http.clone(), server.url(&remote_download(&h, "shared")), alice.access_token.clone());
        tasks.push(tokio::spawn(async move {
            let resp = http.get(url).bearer_auth(token).send().await.expect("download");
            (resp.status().as_u16(), resp.bytes().await.expect("body"))
        }));
    }
    // Wait until the origin was asked and every download is being answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let in_flight = metric(&server, "obmin_http_requests_in_flight").await;
        if !h.requests(Endpoint::Media).is_empty() && in_flight >= downloads as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "the downloads never all started ({in_flight} in flight)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gate.add_permits(downloads * 2);
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(body.as_ref(), file.as_slice());
    }
    let asked = h.requests(Endpoint::Media).len();
    assert_eq!(asked, 1, "{downloads} concurrent downloads of one remote file asked its origin {asked} times");
}
