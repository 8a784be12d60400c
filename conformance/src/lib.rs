//! Test harness: starts the real `homeserver` binary on a free loopback port with its own
//! temporary data directory (and, for PostgreSQL, its own database), and talks to it over
//! HTTP like any client.
//!
//! The binary is `$OBMIN_HOMESERVER_BIN`, or `homeserver` next to the test executable's
//! `deps/` directory (what `cargo build -p homeserver` produces). PostgreSQL tests need
//! `$OBMIN_TEST_POSTGRES_URL`, a server URL whose user may create databases;
//! `scripts/test` starts a throwaway server and sets it.

pub mod client;
pub mod federated;
pub mod hostile;
mod ports;
pub mod wait;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

pub use ports::free_port;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The database a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Path of the homeserver binary under test.
pub fn homeserver_bin() -> PathBuf {
    if let Ok(path) = std::env::var("OBMIN_HOMESERVER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/it-<hash> -> target/<profile>/homeserver
    let candidate = exe.parent().and_then(Path::parent).map(|dir| dir.join("homeserver")).expect("target dir");
    assert!(
        candidate.exists(),
        "{} does not exist: run `cargo build -p homeserver` first (scripts/test does) or set OBMIN_HOMESERVER_BIN",
        candidate.display()
    );
    candidate
}

/// A `Command` for the binary with no `OBMIN_*` variables from the test's environment.
pub fn bare_command() -> Command {
    let mut cmd = Command::new(homeserver_bin());
    for key in std::env::vars().map(|(k, _)| k).filter(|k| k.starts_with("OBMIN_")) {
        cmd.env_remove(key);
    }
    cmd
}

/// Creates a fresh PostgreSQL database and returns its URL.
async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let base = std::env::var("OBMIN_TEST_POSTGRES_URL").expect(
        "OBMIN_TEST_POSTGRES_URL is not set: PostgreSQL tests need a server (run scripts/test, which starts one)",
    );
    let name = format!("obmin_test_{}", random_suffix());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to the test PostgreSQL server");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    conn.close().await.ok();
    let (prefix, _) = base.rsplit_once('/').expect("URL with a database path");
    format!("{prefix}/{name}")
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..12).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect()
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub backend: Backend,
    /// Extra environment variables (override the defaults below).
    pub env: Vec<(String, String)>,
    /// Contents of a config file to pass with `--config`.
    pub config_file: Option<String>,
    /// Serve federation over TLS on a loopback port, named `localhost:<port>`, with a
    /// self-signed certificate, certificate checks off and loopback targets allowed.
    pub federation: bool,
}

impl ServerOptions {
    pub fn new(backend: Backend) -> Self {
        Self { backend, env: Vec::new(), config_file: None, federation: false }
    }

    /// See [`ServerOptions::federation`].
    pub fn federating(mut self) -> Self {
        self.federation = true;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn config_file(mut self, text: &str) -> Self {
        self.config_file = Some(text.to_owned());
        self
    }

    pub async fn start(self) -> Server {
        Server::start_with(self).await
    }
}

/// A running homeserver process. Killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub base_url: String,
    pub dir: TempDir,
    pub http: reqwest::Client,
    /// The server name (`localhost` unless federating).
    pub server_name: String,
    /// `https://127.0.0.1:<port>` of the federation listener, when federating.
    pub federation_url: Option<String>,
    env: Vec<(String, String)>,
    config_path: Option<PathBuf>,
    log_path: PathBuf,
    /// Copies the process's log to `log_path`; ends when the process does.
    log_thread: Option<std::thread::JoinHandle<()>>,
}

/// A registered user with a session.
#[derive(Debug, Clone)]
pub struct User {
    pub user_id: String,
    pub localpart: String,
    pub password: String,
    pub access_token: String,
    pub device_id: String,
}

/// A response: status and JSON body (`Value::Null` if the body is not JSON).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Response {
    /// Asserts a Matrix error with this status and errcode, and that it has a message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, errcode: &str) {
        assert_eq!(self.status.as_u16(), status, "unexpected status, body: {}", self.body);
        assert_eq!(self.body["errcode"], errcode, "unexpected errcode, body: {}", self.body);
        assert!(self.body["error"].is_string(), "Matrix errors carry an `error` message: {}", self.body);
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "expected 200, body: {}", self.body);
        &self.body
    }
}

impl Server {
    /// A server on SQLite or PostgreSQL with open registration and no rate limits.
    pub async fn start(backend: Backend) -> Server {
        ServerOptions::new(backend).start().await
    }

    async fn start_with(options: ServerOptions) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut env: Vec<(String, String)> = vec![
            ("OBMIN_SERVER_NAME".into(), "localhost".into()),
            ("OBMIN_LISTEN".into(), "127.0.0.1:0".into()),
            ("OBMIN_DATA_DIR".into(), dir.path().join("data").display().to_string()),
            ("OBMIN_REGISTRATION".into(), "open".into()),
            ("OBMIN_RATE_LIMITS_ENABLED".into(), "false".into()),
            ("OBMIN_LOG".into(), "info,tower_http=warn".into()),
            ("OBMIN_LOG_FORMAT".into(), "json".into()),
        ];
        if options.backend == Backend::Postgres {
            env.push(("OBMIN_DATABASE_URL".into(), fresh_postgres_database().await));
        }
        let mut federation_url = None;
        if options.federation {
            let port = free_port();
            let (cert, key) = self_signed_certificate(dir.path());
            env.extend([
                ("OBMIN_SERVER_NAME".into(), format!("localhost:{port}")),
                ("OBMIN_FEDERATION_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("OBMIN_TLS_CERT".into(), cert),
                ("OBMIN_TLS_KEY".into(), key),
                ("OBMIN_FEDERATION_VERIFY_CERTIFICATES".into(), "false".into()),
                ("OBMIN_FEDERATION_ALLOW_PRIVATE_TARGETS".into(), "true".into()),
            ]);
            federation_url = Some(format!("https://127.0.0.1:{port}"));
        }
        env.extend(options.env);
        let server_name = env
            .iter()
            .rev()
            .find(|(k, _)| k == "OBMIN_SERVER_NAME")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "localhost".to_owned());
        let config_path = options.config_file.map(|text| {
            let path = dir.path().join("homeserver.toml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        let log_path = dir.path().join("homeserver.log");
        let mut server = Server {
            child: None,
            base_url: String::new(),
            dir,
            http: http_client(Duration::from_secs(60)),
            server_name,
            federation_url,
            env,
            config_path,
            log_path,
            log_thread: None,
        };
        server.spawn().await;
        server
    }

    /// A `Command` for the binary with this server's environment and config (for CLI tests).
    pub fn command(&self) -> Command {
        let mut cmd = bare_command();
        cmd.current_dir(self.dir.path());
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(path) = &self.config_path {
            cmd.arg("--config").arg(path);
        }
        cmd
    }

    /// Runs a CLI command against this server's data, optionally feeding standard input.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn homeserver CLI");
        if let Some(input) = stdin {
            child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("CLI output")
    }

    async fn spawn(&mut self) {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn homeserver");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel::<String>();
        let log_path = self.log_path.clone();
        // Drain the log for the whole life of the process (a full pipe would block the
        // server), copy it to a file for debugging, and report the bound address.
        let log_thread = std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).ok();
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(log) = log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["fields"]["message"] == "homeserver listening"
                    && let (Some(sender), Some(addr)) = (tx.take(), v["fields"]["address"].as_str())
                {
                    let _ = sender.send(addr.to_owned());
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("join")
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "homeserver did not start; log:\n{}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                )
            });
        self.base_url = format!("http://{addr}");
        self.child = Some(child);
        self.log_thread = Some(log_thread);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The server's database URL (its own SQLite file, or its own PostgreSQL database).
    pub fn database_url(&self) -> String {
        match self.env.iter().rev().find(|(k, _)| k == "OBMIN_DATABASE_URL") {
            Some((_, url)) => url.clone(),
            None => format!("sqlite://{}", self.dir.path().join("data").join("homeserver.db").display()),
        }
    }

    /// Runs SQL statements on the server's database behind its back (with the server stopped,
    /// to stage what a crash or a lost write leaves behind).
    pub async fn run_sql(&self, statements: &str) {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.database_url()).await.expect("connect to the database");
        sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_owned())).execute(&mut conn).await.expect("run SQL");
        conn.close().await.ok();
    }

    /// Reads one integer from the server's database behind its back (a count the API does
    /// not show, such as the length of a queue).
    pub async fn query_i64(&self, query: &str) -> i64 {
        use sqlx::{Connection, Row};
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.database_url()).await.expect("connect to the database");
        let row = sqlx::query(sqlx::AssertSqlSafe(query.to_owned())).fetch_one(&mut conn).await.expect("run SQL");
        let value: i64 = row.try_get(0).expect("an integer");
        conn.close().await.ok();
        value
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub async fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().expect("kill");
        assert!(status.success());
        let log_thread = self.log_thread.take();
        tokio::task::spawn_blocking(move || {
            let mut clean = false;
            for _ in 0..300 {
                if let Some(status) = child.try_wait().expect("wait") {
                    clean = status.success();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !clean {
                let _ = child.kill();
                let _ = child.wait();
            }
            // The log is complete once the process's stderr is closed and copied.
            if let Some(thread) = log_thread {
                let _ = thread.join();
            }
            clean
        })
        .await
        .expect("join")
    }

    /// Kills the process (SIGKILL) without any chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(thread) = self.log_thread.take() {
            let _ = thread.join();
        }
    }

    /// Sets (or replaces) an environment variable for the next start, e.g. before `restart`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the process again on the same data (a new port).
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            assert!(self.terminate().await, "clean shutdown before restart");
        }
        self.spawn().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn request(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        let mut req = self.http.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        Self::read(resp).await
    }

    /// Sends raw bytes as the body.
    pub async fn request_raw(&self, method: Method, path: &str, token: Option<&str>, body: Vec<u8>) -> Response {
        let mut req = self.http.request(method, self.url(path)).body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        Self::read(req.send().await.expect("request")).await
    }

    pub async fn read(resp: reqwest::Response) -> Response {
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_server_error() {
            panic!("server error {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Response { status, body, headers }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.request(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.request(Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.request(Method::PUT, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        self.request(Method::DELETE, path, token, body).await
    }

    /// Registers through the full UIA round trip (`m.login.dummy`).
    pub async fn register(&self, localpart: &str, password: &str) -> User {
        let first =
            self.post("/_matrix/client/v3/register", None, json!({"username": localpart, "password": password})).await;
        assert_eq!(first.status, 401, "register without auth asks for UIA: {}", first.body);
        let session = first.body["session"].as_str().expect("session").to_owned();
        let done = self
            .post(
                "/_matrix/client/v3/register",
                None,
                json!({"username": localpart, "password": password, "auth": {"type": "m.login.dummy", "session": session}}),
            )
            .await;
        let body = done.assert_ok();
        User {
            user_id: body["user_id"].as_str().expect("user_id").to_owned(),
            localpart: localpart.to_owned(),
            password: password.to_owned(),
            access_token: body["access_token"].as_str().expect("access_token").to_owned(),
            device_id: body["device_id"].as_str().expect("device_id").to_owned(),
        }
    }

    /// Logs in with a password (`m.login.password`, `m.id.user`).
    pub async fn login(&self, user: &str, password: &str) -> Response {
        self.post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}),
        )
        .await
    }
}

/// Makes ring the process-wide rustls provider. reqwest is built with rustls but without a
/// provider of its own (the workspace uses ring only, see Cargo.toml), so every client of the
/// test process needs this before it is built; [`http_client`] and the harness call it.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A plain reqwest client with this timeout (see [`install_crypto_provider`]).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder().timeout(timeout).build().expect("client")
}

/// Writes a self-signed certificate for `localhost` and 127.0.0.1 into `dir`; returns the
/// certificate and key paths.
fn self_signed_certificate(dir: &Path) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("generate a certificate");
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert.display().to_string(), key.display().to_string())
}

/// An HTTPS client for federation listeners with self-signed certificates.
pub fn federation_http() -> reqwest::Client {
    let tls = federation::client::tls_config(false).expect("TLS config");
    reqwest::Client::builder().tls_backend_preconfigured(tls).timeout(Duration::from_secs(60)).build().expect("client")
}

/// Percent-encodes a path segment (room ids, aliases, user ids).
pub fn enc(segment: &str) -> String {
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Server {
    /// Creates a room with the given `createRoom` body; returns its id.
    pub async fn create_room(&self, user: &User, body: Value) -> String {
        let resp = self.post("/_matrix/client/v3/createRoom", Some(&user.access_token), body).await;
        resp.assert_ok()["room_id"].as_str().expect("room_id").to_owned()
    }

    /// Joins a room by id or alias.
    pub async fn join(&self, user: &User, room: &str) -> Response {
        self.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&user.access_token), json!({})).await
    }

    /// Sends an `m.room.message` text with a fresh transaction id; returns the response.
    pub async fn send_text(&self, user: &User, room_id: &str, body: &str) -> Response {
        let txn = random_suffix();
        self.put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room_id)),
            Some(&user.access_token),
            json!({"msgtype": "m.text", "body": body}),
        )
        .await
    }

    /// `GET /sync` with optional since token, timeout (ms) and inline filter.
    pub async fn sync(&self, user: &User, since: Option<&str>, timeout_ms: u64, filter: Option<Value>) -> Value {
        let mut url = format!("/_matrix/client/v3/sync?timeout={timeout_ms}");
        if let Some(since) = since {
            url.push_str(&format!("&since={}", enc(since)));
        }
        if let Some(filter) = filter {
            url.push_str(&format!("&filter={}", enc(&filter.to_string())));
        }
        self.get(&url, Some(&user.access_token)).await.assert_ok().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Generates one `#[tokio::test]` per backend for each listed async test function taking a
/// [`Backend`]: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}
