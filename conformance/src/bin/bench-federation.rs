//! `bench-federation`: federation benchmarks between any two Matrix homeservers on loopback,
//! driven only through their client APIs (so Obmin and Synapse are measured the same way).
//!
//! ```text
//! bench-federation latency A_URL B_URL [--messages N]
//!     A user of A creates a public room, a user of B joins it over federation; then N
//!     messages, one at a time: the clock starts before the send on A's client API and stops
//!     when B's user's long-polling /sync returns the message. Prints median, p99, mean, min
//!     and max in milliseconds.
//! bench-federation join A_URL B_URL [--state-events N] [--rounds R]
//!     A user of A makes R rooms with N extra state events each; a user of B joins each over
//!     federation. Prints the time of each `POST /join` (until B answers) and until B's /sync
//!     shows the room as joined.
//! ```
//!
//! Both servers need open registration with `m.login.dummy` and rate limits lifted. Bounded:
//! at most 100,000 messages or state events, every wait times out, one request at a time;
//! refuses addresses that are not loopback.

use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::{Value, json};

const MAX_COUNT: usize = 100_000;
/// Longest wait for one message to arrive (or one request to answer).
const WAIT: Duration = Duration::from_secs(60);

type Result<T> = std::result::Result<T, String>;

struct Session {
    base: String,
    user_id: String,
    token: String,
}

impl Session {
    async fn register(http: &Client, base: &str, prefix: &str) -> Result<Session> {
        let name = format!("{prefix}{}", rand::random::<u32>());
        let body = json!({"username": name, "password": format!("pw-{name}-bench"), "auth": {"type": "m.login.dummy"}});
        let answer =
            call(http, reqwest::Method::POST, &format!("{base}/_matrix/client/v3/register"), None, Some(body)).await?;
        Ok(Session {
            base: base.to_owned(),
            user_id: answer["user_id"].as_str().ok_or("no user_id")?.to_owned(),
            token: answer["access_token"].as_str().ok_or("no access_token")?.to_owned(),
        })
    }

    fn server_name(&self) -> &str {
        self.user_id.split_once(':').map(|(_, s)| s).unwrap_or_default()
    }

    async fn request(&self, http: &Client, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        call(http, method, &format!("{}{path}", self.base), Some(&self.token), body).await
    }

    async fn create_public_room(&self, http: &Client) -> Result<String> {
        let answer = self
            .request(
                http,
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(json!({"preset": "public_chat"})),
            )
            .await?;
        Ok(answer["room_id"].as_str().ok_or("no room_id")?.to_owned())
    }

    async fn join(&self, http: &Client, room_id: &str, via: &str) -> Result<()> {
        let path = format!("/_matrix/client/v3/join/{}?server_name={}&via={}", enc(room_id), enc(via), enc(via));
        self.request(http, reqwest::Method::POST, &path, Some(json!({}))).await.map(drop)
    }

    async fn sync(&self, http: &Client, since: Option<&str>, timeout_ms: u64) -> Result<Value> {
        // Only timelines: presence, account data and state are not what is measured.
        let filter = json!({"room": {"timeline": {"limit": 50}, "state": {"lazy_load_members": true},
            "ephemeral": {"types": []}, "account_data": {"types": []}},
            "presence": {"types": []}, "account_data": {"types": []}});
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}&filter={}", enc(&filter.to_string()));
        if let Some(since) = since {
            path.push_str(&format!("&since={}", enc(since)));
        }
        self.request(http, reqwest::Method::GET, &path, None).await
    }
}

async fn call(
    http: &Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<Value> {
    let mut request = http.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(format!("{url}: {status} {body}"));
    }
    Ok(body)
}

fn enc(segment: &str) -> String {
    conformance::enc(segment)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn summary(label: &str, mut values: Vec<f64>) {
    values.sort_by(f64::total_cmp);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    println!(
        "{label}: n={} median={:.1} ms p99={:.1} ms mean={:.1} ms min={:.1} ms max={:.1} ms",
        values.len(),
        percentile(&values, 50.0),
        percentile(&values, 99.0),
        mean,
        values[0],
        values[values.len() - 1]
    );
}

/// Does this sync response carry a message with this body in the room?
fn has_message(sync: &Value, room_id: &str, body: &str) -> bool {
    sync["rooms"]["join"][room_id]["timeline"]["events"]
        .as_array()
        .is_some_and(|events| events.iter().any(|e| e["content"]["body"] == body))
}

async fn latency(http: &Client, a: &str, b: &str, messages: usize) -> Result<()> {
    let alice = Session::register(http, a, "benchsender").await?;
    let bob = Session::register(http, b, "benchreceiver").await?;
    let room_id = alice.create_public_room(http).await?;
    bob.join(http, &room_id, alice.server_name()).await?;
    // Catch up past the join, then wait until a warm-up message has arrived (the join
    // reached A, and B's key cache for A is warm).
    let mut since = bob.sync(http, None, 0).await?["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    let mut samples = Vec::with_capacity(messages);
    for i in 0..=messages {
        let body = format!("bench message {i} {}", rand::random::<u32>());
        let started = Instant::now();
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/bench{i}-{}",
            enc(&room_id),
            rand::random::<u32>()
        );
        alice.request(http, reqwest::Method::PUT, &path, Some(json!({"msgtype": "m.text", "body": body}))).await?;
        loop {
            let sync = bob.sync(http, Some(&since), 30_000).await?;
            since = sync["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
            if has_message(&sync, &room_id, &body) {
                break;
            }
            if started.elapsed() > WAIT {
                return Err(format!("message {i} did not reach {b} within {WAIT:?}"));
            }
        }
        // Message 0 is the warm-up.
        if i > 0 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    summary(&format!("latency {} -> {}", alice.server_name(), bob.server_name()), samples);
    Ok(())
}

async fn join(http: &Client, a: &str, b: &str, state_events: usize, rounds: usize) -> Result<()> {
    let alice = Session::register(http, a, "benchcreator").await?;
    let mut join_answered = Vec::new();
    let mut join_synced = Vec::new();
    let mut joiner_server = String::new();
    for round in 0..rounds {
        let room_id = alice.create_public_room(http).await?;
        let filling = Instant::now();
        for i in 0..state_events {
            let path = format!("/_matrix/client/v3/rooms/{}/state/org.obmin.bench/key{i}", enc(&room_id));
            alice.request(http, reqwest::Method::PUT, &path, Some(json!({"n": i, "pad": "x".repeat(64)}))).await?;
        }
        let state = alice
            .request(http, reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(&room_id)), None)
            .await?;
        let count = state.as_array().map(Vec::len).unwrap_or(0);
        eprintln!(
            "round {round}: {room_id} has {count} state events (filled in {:.1} s)",
            filling.elapsed().as_secs_f64()
        );
        // A fresh joiner each round: nothing about the room is cached on B.
        let bob = Session::register(http, b, "benchjoiner").await?;
        joiner_server = bob.server_name().to_owned();
        let since = bob.sync(http, None, 0).await?["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
        let started = Instant::now();
        bob.join(http, &room_id, alice.server_name()).await?;
        let answered = started.elapsed();
        let mut since = since;
        loop {
            let sync = bob.sync(http, Some(&since), 30_000).await?;
            since = sync["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
            if sync["rooms"]["join"].get(&room_id).is_some() {
                break;
            }
            if started.elapsed() > WAIT {
                return Err(format!("{room_id} never showed as joined on {b}"));
            }
        }
        let synced = started.elapsed();
        eprintln!(
            "round {round}: join answered after {:.1} ms, in /sync after {:.1} ms",
            answered.as_secs_f64() * 1000.0,
            synced.as_secs_f64() * 1000.0
        );
        join_answered.push(answered.as_secs_f64() * 1000.0);
        join_synced.push(synced.as_secs_f64() * 1000.0);
    }
    let label =
        format!("join {joiner_server} -> room on {} with {state_events} extra state events", alice.server_name());
    summary(&format!("{label}, POST /join"), join_answered);
    summary(&format!("{label}, until /sync shows it"), join_synced);
    Ok(())
}

fn loopback_url(url: &str) -> Result<String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    match parsed.host_str() {
        Some("127.0.0.1" | "localhost" | "[::1]") => Ok(url.trim_end_matches('/').to_owned()),
        _ => Err(format!("{url}: only loopback servers are benchmarked")),
    }
}

fn usage() -> String {
    "usage: bench-federation latency A_URL B_URL [--messages N]\n       bench-federation join A_URL B_URL [--state-events N] [--rounds R]".to_owned()
}

fn option(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => {
            let value: usize = args.get(i + 1).and_then(|v| v.parse().ok()).ok_or_else(usage)?;
            if value == 0 || value > MAX_COUNT {
                return Err(format!("{name} must be between 1 and {MAX_COUNT}"));
            }
            Ok(value)
        }
    }
}

async fn run(args: Vec<String>) -> Result<()> {
    let [mode, a, b, rest @ ..] = args.as_slice() else { return Err(usage()) };
    let (a, b) = (loopback_url(a)?, loopback_url(b)?);
    let http = conformance::http_client(WAIT);
    match mode.as_str() {
        "latency" => latency(&http, &a, &b, option(rest, "--messages", 200)?).await,
        "join" => {
            join(&http, &a, &b, option(rest, "--state-events", 1000)?, option(rest, "--rounds", 3)?.min(100)).await
        }
        _ => Err(usage()),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(args).await {
        eprintln!("bench-federation: {e}");
        std::process::exit(1);
    }
}
