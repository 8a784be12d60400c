//! The command line, run as a real process against a real data directory.

use conformance::{Backend, Server, ServerOptions, backend_tests, bare_command};

backend_tests!(user_commands, migrate_is_idempotent);

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn user_commands(backend: Backend) {
    let server = ServerOptions::new(backend).env("OBMIN_REGISTRATION", "disabled").start().await;
    assert_eq!(
        stdout(&server.cli(&["user", "create", "alice", "--password", "first-pass"], None)).trim(),
        "@alice:localhost"
    );
    assert_eq!(stdout(&server.cli(&["user", "create", "bob", "--admin"], Some("bob-pass\n"))).trim(), "@bob:localhost");
    let dup = server.cli(&["user", "create", "alice", "--password", "x"], None);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already taken"), "{}", String::from_utf8_lossy(&dup.stderr));
    let bad = server.cli(&["user", "create", "Not Valid", "--password", "x"], None);
    assert!(!bad.status.success());

    let tok = server.login("alice", "first-pass").await.assert_ok()["access_token"].as_str().unwrap().to_owned();
    server.login("bob", "bob-pass").await.assert_ok();

    let list = stdout(&server.cli(&["user", "list"], None));
    assert!(list.lines().any(|l| l.starts_with("@alice:localhost") && l.contains("false")), "{list}");
    assert!(list.lines().any(|l| l.starts_with("@bob:localhost") && l.contains("true")), "{list}");

    stdout(&server.cli(&["user", "reset-password", "alice", "--password", "second-pass"], None));
    server.get("/_matrix/client/v3/account/whoami", Some(&tok)).await.assert_error(401, "M_UNKNOWN_TOKEN");
    server.login("alice", "first-pass").await.assert_error(403, "M_FORBIDDEN");
    server.login("alice", "second-pass").await.assert_ok();

    stdout(&server.cli(&["user", "deactivate", "@alice:localhost"], None));
    server.login("alice", "second-pass").await.assert_error(403, "M_USER_DEACTIVATED");
    let missing = server.cli(&["user", "deactivate", "nobody"], None);
    assert!(!missing.status.success());
}

async fn migrate_is_idempotent(backend: Backend) {
    let server = Server::start(backend).await;
    for _ in 0..2 {
        assert!(stdout(&server.cli(&["migrate"], None)).contains("up to date"));
    }
}

#[test]
fn generate_config_prints_the_documented_file() {
    let out = bare_command().arg("generate-config").output().unwrap();
    let text = stdout(&out);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("homeserver.toml");
    std::fs::write(&path, &text).unwrap();
    for key in ["server_name", "listen", "database_url", "registration", "[rate_limits.login.address]", "OBMIN_LOG"] {
        assert!(text.contains(key), "generate-config mentions {key}");
    }
    // The generated file is a valid configuration.
    let out = bare_command()
        .current_dir(dir.path())
        .args(["--config", path.to_str().unwrap(), "migrate"])
        .env("OBMIN_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    stdout(&out);
}

#[test]
fn bad_configuration_names_the_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("OBMIN_LISTEN", "not-an-address", "listen"),
        ("OBMIN_REGISTRATION", "sometimes", "sometimes"),
        ("OBMIN_SERVER_NAME", "bad name", "server_name"),
        ("OBMIN_DATABASE_URL", "mysql://x", "database_url"),
        ("OBMIN_RATE_LIMITS_LOGIN_BURST", "many", "OBMIN_RATE_LIMITS_LOGIN_BURST"),
        ("OBMIN_LOG", "[[[", "log.filter"),
    ];
    for (key, value, expected) in cases {
        let out = bare_command().current_dir(dir.path()).env(key, value).arg("migrate").output().unwrap();
        assert!(!out.status.success(), "{key}={value} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{key}={value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "server_name = \"x\"\nno_such_option = 1\n").unwrap();
    let out = bare_command().args(["--config", config.to_str().unwrap(), "migrate"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_option"));
    assert!(!dir.path().join("data").exists(), "nothing is created when the configuration is bad");
}

/// No configuration at all: the defaults (server name localhost, SQLite and the signing key
/// under ./data, open registration). Only the port is moved off 8008 so tests can run in
/// parallel with a developer's server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bare_command()
        .current_dir(dir.path())
        .env("OBMIN_LISTEN", "127.0.0.1:0")
        .env("OBMIN_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Keep reading the log after the line we want: the server must never block on it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("homeserver listening") {
                let _ = tx.send(line);
            }
        }
    });
    let line = tokio::task::spawn_blocking(move || rx.recv_timeout(std::time::Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("listening line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["server_name"], "localhost");
    assert_eq!(v["fields"]["registration"], "Open");
    let addr = v["fields"]["address"].as_str().unwrap().to_owned();
    let client = conformance::http_client(std::time::Duration::from_secs(60));
    let resp = client
        .post(format!("http://{addr}/_matrix/client/v3/register"))
        .json(&serde_json::json!({"username": "alice", "password": "pw", "auth": {"type": "m.login.dummy"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(dir.path().join("data/homeserver.db").exists());
    assert!(dir.path().join("data/signing.key").exists());
    child.kill().unwrap();
    child.wait().unwrap();
}
