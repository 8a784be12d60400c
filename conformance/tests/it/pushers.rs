//! Pushers (`/pushers`, `/pushers/set`) and delivery to a push gateway: a tiny gateway runs
//! inside the test on loopback and records what the homeserver POSTs to it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use conformance::{Backend, Server, ServerOptions, User, backend_tests};
use serde_json::{Value, json};
use tokio::sync::mpsc;

backend_tests!(
    pusher_crud_and_validation,
    pushers_go_with_their_device,
    gateway_gets_notifications,
    gateway_failures_are_retried,
    private_gateways_are_refused_by_default,
);

/// How the test gateway answers.
#[derive(Clone, Copy)]
enum Mode {
    Accept,
    /// Fail with 500 this many times, then accept.
    FailFirst(usize),
    /// Reject every pushkey it is given.
    Reject,
}

struct Gateway {
    url: String,
    received: mpsc::UnboundedReceiver<Value>,
    _task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    async fn start(mode: Mode) -> Gateway {
        struct GatewayState {
            mode: Mode,
            calls: AtomicUsize,
            tx: mpsc::UnboundedSender<Value>,
        }
        async fn notify(State(state): State<Arc<GatewayState>>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
            let call = state.calls.fetch_add(1, Ordering::SeqCst);
            let _ = state.tx.send(body.clone());
            match state.mode {
                Mode::FailFirst(n) if call < n => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({}))),
                Mode::Reject => {
                    let keys: Vec<Value> = body["notification"]["devices"]
                        .as_array()
                        .map(|d| d.iter().map(|d| d["pushkey"].clone()).collect())
                        .unwrap_or_default();
                    (StatusCode::OK, Json(json!({"rejected": keys})))
                }
                _ => (StatusCode::OK, Json(json!({"rejected": []}))),
            }
        }
        let (tx, received) = mpsc::unbounded_channel();
        let state = Arc::new(GatewayState { mode, calls: AtomicUsize::new(0), tx });
        let app = Router::new().route("/_matrix/push/v1/notify", post(notify)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/_matrix/push/v1/notify", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Gateway { url, received, _task: task }
    }

    async fn next(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(20), self.received.recv())
            .await
            .expect("the gateway got a notification in time")
            .expect("gateway open")
    }

    /// Asserts nothing more arrives for a while.
    async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(extra)) = tokio::time::timeout(wait, self.received.recv()).await {
            panic!("unexpected notification: {extra}");
        }
    }
}

fn http_pusher(url: &str, pushkey: &str) -> Value {
    json!({
        "kind": "http", "app_id": "org.example.app", "pushkey": pushkey,
        "app_display_name": "Example", "device_display_name": "Phone", "lang": "en",
        "data": {"url": url, "custom": "kept"},
    })
}

async fn set_pusher(server: &Server, user: &User, body: Value) -> conformance::Response {
    server.post("/_matrix/client/v3/pushers/set", Some(&user.access_token), body).await
}

async fn pushers(server: &Server, user: &User) -> Vec<Value> {
    server.get("/_matrix/client/v3/pushers", Some(&user.access_token)).await.assert_ok()["pushers"]
        .as_array()
        .unwrap()
        .clone()
}

/// A server whose push delivery may reach the test gateway on loopback.
async fn server_allowing_loopback(backend: Backend) -> Server {
    ServerOptions::new(backend).env("OBMIN_PUSH_GATEWAY_IP_RANGE_ALLOWLIST", "127.0.0.1/32").start().await
}

async fn pusher_crud_and_validation(backend: Backend) {
    let server = server_allowing_loopback(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    assert!(pushers(&server, &alice).await.is_empty());

    set_pusher(&server, &alice, http_pusher(url, "key-1")).await.assert_ok();
    let list = pushers(&server, &alice).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["pushkey"], "key-1");
    assert_eq!(list[0]["kind"], "http");
    assert_eq!(list[0]["data"]["url"], url);
    assert_eq!(list[0]["data"]["custom"], "kept");
    assert_eq!(list[0]["app_display_name"], "Example");

    // Same app id and pushkey again: an update, not a second pusher.
    let mut changed = http_pusher(url, "key-1");
    changed["device_display_name"] = json!("Tablet");
    changed["data"]["format"] = json!("event_id_only");
    set_pusher(&server, &alice, changed).await.assert_ok();
    let list = pushers(&server, &alice).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["device_display_name"], "Tablet");
    assert_eq!(list[0]["data"]["format"], "event_id_only");

    // An email pusher next to it.
    let email = json!({
        "kind": "email", "app_id": "m.email", "pushkey": "alice@example.org",
        "app_display_name": "Email", "device_display_name": "alice@example.org", "lang": "en", "data": {},
    });
    set_pusher(&server, &alice, email).await.assert_ok();
    assert_eq!(pushers(&server, &alice).await.len(), 2);

    // Bob takes the same pushkey: with `append` both keep it, without it Alice loses it.
    let mut appended = http_pusher(url, "key-1");
    appended["append"] = json!(true);
    set_pusher(&server, &bob, appended).await.assert_ok();
    assert_eq!(pushers(&server, &alice).await.len(), 2);
    set_pusher(&server, &bob, http_pusher(url, "key-1")).await.assert_ok();
    let alice_left = pushers(&server, &alice).await;
    assert_eq!(alice_left.len(), 1);
    assert_eq!(alice_left[0]["kind"], "email");
    assert_eq!(pushers(&server, &bob).await.len(), 1);

    // Deletion with `kind: null`; deleting one that does not exist is not an error.
    let delete = json!({"kind": null, "app_id": "m.email", "pushkey": "alice@example.org"});
    set_pusher(&server, &alice, delete.clone()).await.assert_ok();
    assert!(pushers(&server, &alice).await.is_empty());
    set_pusher(&server, &alice, delete).await.assert_ok();
    // Alice cannot delete Bob's pusher.
    set_pusher(&server, &alice, json!({"kind": null, "app_id": "org.example.app", "pushkey": "key-1"}))
        .await
        .assert_ok();
    assert_eq!(pushers(&server, &bob).await.len(), 1);

    // Bad input.
    let wrong_path = http_pusher("https://push.example.org/notify", "k");
    set_pusher(&server, &alice, wrong_path).await.assert_error(400, "M_INVALID_PARAM");
    let not_http = http_pusher("ftp://push.example.org/_matrix/push/v1/notify", "k");
    set_pusher(&server, &alice, not_http).await.assert_error(400, "M_INVALID_PARAM");
    let not_url = http_pusher("not a url", "k");
    set_pusher(&server, &alice, not_url).await.assert_error(400, "M_INVALID_PARAM");
    let mut no_url = http_pusher(url, "k");
    no_url["data"] = json!({});
    set_pusher(&server, &alice, no_url).await.assert_error(400, "M_BAD_JSON");
    let mut long_app = http_pusher(url, "k");
    long_app["app_id"] = json!("a".repeat(65));
    set_pusher(&server, &alice, long_app).await.assert_error(400, "M_INVALID_PARAM");
    set_pusher(&server, &alice, http_pusher(url, &"k".repeat(513))).await.assert_error(400, "M_INVALID_PARAM");
    let mut odd_kind = http_pusher(url, "k");
    odd_kind["kind"] = json!("carrier-pigeon");
    set_pusher(&server, &alice, odd_kind).await.assert_error(400, "M_INVALID_PARAM");
    let mut bad_email = http_pusher(url, "not-an-address");
    bad_email["kind"] = json!("email");
    set_pusher(&server, &alice, bad_email).await.assert_error(400, "M_INVALID_PARAM");
    let mut missing = http_pusher(url, "k");
    missing.as_object_mut().unwrap().remove("lang");
    set_pusher(&server, &alice, missing).await.assert_error(400, "M_BAD_JSON");
    server
        .request_raw(reqwest::Method::POST, "/_matrix/client/v3/pushers/set", Some(&alice.access_token), b"{".to_vec())
        .await
        .assert_error(400, "M_NOT_JSON");
    assert!(pushers(&server, &alice).await.is_empty());

    // No token, no pushers.
    server.get("/_matrix/client/v3/pushers", None).await.assert_error(401, "M_MISSING_TOKEN");
    server
        .post("/_matrix/client/v3/pushers/set", None, http_pusher(url, "k"))
        .await
        .assert_error(401, "M_MISSING_TOKEN");
}

async fn pushers_go_with_their_device(backend: Backend) {
    let server = server_allowing_loopback(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    set_pusher(&server, &alice, http_pusher(url, "from-first-device")).await.assert_ok();

    // A second session with its own pusher; logging it out removes only that one.
    let second = server.login("alice", "alice-pass").await;
    let second_token = second.assert_ok()["access_token"].as_str().unwrap().to_owned();
    server
        .post("/_matrix/client/v3/pushers/set", Some(&second_token), http_pusher(url, "from-second-device"))
        .await
        .assert_ok();
    assert_eq!(pushers(&server, &alice).await.len(), 2);
    server.post("/_matrix/client/v3/logout", Some(&second_token), json!({})).await.assert_ok();
    let left = pushers(&server, &alice).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["pushkey"], "from-first-device");

    // Deactivation removes every pusher: nothing reaches Bob's gateway afterwards, even
    // for a room he is still a member of.
    let mut gateway = Gateway::start(Mode::Accept).await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    set_pusher(&server, &bob, http_pusher(&gateway.url, "bobs")).await.assert_ok();
    server.send_text(&alice, &room, "before").await.assert_ok();
    assert_eq!(gateway.next().await["notification"]["content"]["body"], "before");
    let path = "/_matrix/client/v3/account/deactivate";
    let first = server.post(path, Some(&bob.access_token), json!({})).await;
    assert_eq!(first.status, 401);
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"},
                      "password": "bob-pass", "session": first.body["session"]});
    server.post(path, Some(&bob.access_token), json!({"auth": auth})).await.assert_ok();
    server.send_text(&alice, &room, "after").await.assert_ok();
    gateway.assert_quiet(Duration::from_secs(2)).await;
    server.get("/_matrix/client/v3/pushers", Some(&bob.access_token)).await.assert_error(401, "M_UNKNOWN_TOKEN");
}

async fn gateway_gets_notifications(backend: Backend) {
    let mut gateway = Gateway::start(Mode::Accept).await;
    let mut slim_gateway = Gateway::start(Mode::Accept).await;
    let server = server_allowing_loopback(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    server
        .put(
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            Some(&alice.access_token),
            json!({"displayname": "Alice A."}),
        )
        .await
        .assert_ok();
    let room = server.create_room(&alice, json!({"name": "Cakes", "preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    set_pusher(&server, &bob, http_pusher(&gateway.url, "bobs-phone")).await.assert_ok();
    let mut slim = http_pusher(&slim_gateway.url, "bobs-watch");
    slim["data"]["format"] = json!("event_id_only");
    slim["app_id"] = json!("org.example.watch");
    set_pusher(&server, &bob, slim).await.assert_ok();

    let sent = server.send_text(&alice, &room, "fresh cake in the kitchen").await;
    let event_id = sent.assert_ok()["event_id"].as_str().unwrap().to_owned();
    let body = gateway.next().await;
    let n = &body["notification"];
    assert_eq!(n["event_id"], event_id.as_str(), "{body}");
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], "@alice:localhost");
    assert_eq!(n["sender_display_name"], "Alice A.");
    assert_eq!(n["room_name"], "Cakes");
    assert_eq!(n["content"]["body"], "fresh cake in the kitchen");
    assert_eq!(n["counts"]["unread"], 1);
    let device = &n["devices"][0];
    assert_eq!(device["app_id"], "org.example.app");
    assert_eq!(device["pushkey"], "bobs-phone");
    assert_eq!(device["data"]["custom"], "kept");
    assert!(device["data"].get("url").is_none(), "the gateway URL is not echoed: {body}");
    assert!(device["pushkey_ts"].is_u64(), "{body}");
    // A room with two members: the default rules ring (.m.rule.room_one_to_one).
    assert_eq!(device["tweaks"]["sound"], "default", "{body}");

    let slim_body = slim_gateway.next().await;
    let n = &slim_body["notification"];
    assert_eq!(n["event_id"], event_id.as_str());
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["devices"][0]["pushkey"], "bobs-watch");
    for absent in ["content", "sender", "type", "room_name", "sender_display_name"] {
        assert!(n.get(absent).is_none(), "event_id_only has no {absent}: {slim_body}");
    }

    // The counts go up with the next message; Bob's own messages are not pushed to him.
    server.send_text(&bob, &room, "on my way").await.assert_ok();
    server.send_text(&alice, &room, "hurry").await.assert_ok();
    let body = gateway.next().await;
    assert_eq!(body["notification"]["content"]["body"], "hurry");
    assert_eq!(body["notification"]["counts"]["unread"], 2);
    assert_eq!(slim_gateway.next().await["notification"]["counts"]["unread"], 2);
    gateway.assert_quiet(Duration::from_millis(500)).await;

    // A gateway that rejects the pushkey loses the pusher.
    let mut rejecting = Gateway::start(Mode::Reject).await;
    let mut dead = http_pusher(&rejecting.url, "dead-key");
    dead["app_id"] = json!("org.example.dead");
    set_pusher(&server, &bob, dead).await.assert_ok();
    server.send_text(&alice, &room, "anyone?").await.assert_ok();
    rejecting.next().await;
    let mut gone = false;
    for _ in 0..50 {
        if pushers(&server, &bob).await.iter().all(|p| p["pushkey"] != "dead-key") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a rejected pushkey's pusher is removed");
    assert_eq!(pushers(&server, &bob).await.len(), 2);
}

async fn gateway_failures_are_retried(backend: Backend) {
    let mut gateway = Gateway::start(Mode::FailFirst(2)).await;
    let mut server = server_allowing_loopback(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    set_pusher(&server, &bob, http_pusher(&gateway.url, "bobs-phone")).await.assert_ok();

    // The send is answered at once, whatever the gateway does.
    let started = std::time::Instant::now();
    let first = server.send_text(&alice, &room, "one").await.assert_ok()["event_id"].clone();
    assert!(started.elapsed() < Duration::from_secs(2));
    // The first attempt fails; the server is killed before it retries. The queue is the
    // database, so after a restart the same notification is tried again (failing once
    // more, then accepted after a backoff), once it is accepted never again.
    assert_eq!(gateway.next().await["notification"]["event_id"], first);
    server.kill();
    server.restart().await;
    assert_eq!(gateway.next().await["notification"]["event_id"], first);
    assert_eq!(gateway.next().await["notification"]["event_id"], first);
    gateway.assert_quiet(Duration::from_millis(500)).await;

    // Later notifications arrive in order, once each.
    let second = server.send_text(&alice, &room, "two").await.assert_ok()["event_id"].clone();
    let third = server.send_text(&alice, &room, "three").await.assert_ok()["event_id"].clone();
    assert_eq!(gateway.next().await["notification"]["event_id"], second);
    assert_eq!(gateway.next().await["notification"]["event_id"], third);
    gateway.assert_quiet(Duration::from_millis(500)).await;
}

async fn private_gateways_are_refused_by_default(backend: Backend) {
    let mut gateway = Gateway::start(Mode::Accept).await;
    let server = Server::start(backend).await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    // A literal loopback address is refused when the pusher is set...
    set_pusher(&server, &bob, http_pusher(&gateway.url, "k")).await.assert_error(400, "M_INVALID_PARAM");
    let v6 = http_pusher("http://[::1]:9/_matrix/push/v1/notify", "k");
    set_pusher(&server, &bob, v6).await.assert_error(400, "M_INVALID_PARAM");
    // ...and a name that resolves to it is refused when a notification is sent.
    let by_name = gateway.url.replace("127.0.0.1", "localhost");
    set_pusher(&server, &bob, http_pusher(&by_name, "k")).await.assert_ok();
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    server.join(&bob, &room).await.assert_ok();
    server.send_text(&alice, &room, "hello").await.assert_ok();
    gateway.assert_quiet(Duration::from_secs(3)).await;
}
