//! Two (or more) real homeserver processes federating over TLS on loopback, and requests to
//! a federation listener signed the way a server signs them (X-Matrix).

use federation::{SigningKey, xmatrix};
use reqwest::Method;
use ruma::ServerName;
use serde_json::{Value, json};

use crate::{Backend, Response, Server, ServerOptions, User, enc, federation_http};

/// A server with its federation listener on (see [`ServerOptions::federating`]).
pub async fn federating(backend: Backend) -> Server {
    ServerOptions::new(backend).federating().start().await
}

impl Server {
    /// This server's signing key, read from its data directory (tests sign as this server).
    pub fn signing_key(&self) -> SigningKey {
        let text = std::fs::read_to_string(self.dir.path().join("data/signing.key")).expect("signing key file");
        SigningKey::parse(&text).expect("signing key")
    }

    /// `user` joins `room_id` by id through the server `via`.
    pub async fn join_via(&self, user: &User, room_id: &str, via: &str) -> Response {
        self.post(
            &format!("/_matrix/client/v3/join/{}?via={}", enc(room_id), enc(via)),
            Some(&user.access_token),
            json!({}),
        )
        .await
    }
}

/// Who signs a federation request: a server name and its key.
pub struct SignedAs<'a> {
    pub origin: &'a str,
    pub key: &'a SigningKey,
}

impl<'a> SignedAs<'a> {
    pub fn new(origin: &'a str, key: &'a SigningKey) -> Self {
        Self { origin, key }
    }
}

/// A request to `target`'s federation listener, signed as `signed_as` (unsigned if `None`);
/// returns the status and the JSON body (`Value::Null` if not JSON). 5xx answers are returned,
/// not panicked on: hostile tests look at them.
pub async fn federation_request(
    target: &Server,
    method: Method,
    path: &str,
    body: Option<&Value>,
    signed_as: Option<SignedAs<'_>>,
) -> (u16, Value) {
    let url = format!("{}{path}", target.federation_url.as_ref().expect("a federating server"));
    let mut builder = http::Request::builder().method(method.as_str()).uri(&url);
    let bytes = match body {
        Some(body) => {
            builder = builder.header("content-type", "application/json");
            serde_json::to_vec(body).expect("JSON body")
        }
        None => Vec::new(),
    };
    let mut request = builder.body(bytes).expect("request");
    if let Some(SignedAs { origin, key }) = signed_as {
        xmatrix::sign_request(
            &mut request,
            &ServerName::parse(origin).expect("origin name"),
            &ServerName::parse(&target.server_name).expect("target name"),
            key,
        )
        .expect("sign the request");
    }
    let request = reqwest::Request::try_from(request).expect("reqwest request");
    let response = federation_http().execute(request).await.expect("federation request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A federation request from `origin` to `target`, signed with `origin`'s real key.
pub async fn federation_request_from(
    target: &Server,
    origin: &Server,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let key = origin.signing_key();
    federation_request(target, method, path, body, Some(SignedAs::new(&origin.server_name, &key))).await
}

/// `PUT /send/{txn_id}` from `origin` to `target` with these PDUs, signed with `origin`'s key.
pub async fn send_transaction(target: &Server, origin: &Server, txn_id: &str, pdus: Vec<Value>) -> (u16, Value) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let body = json!({"origin": origin.server_name, "origin_server_ts": now, "pdus": pdus});
    federation_request_from(target, origin, Method::PUT, &format!("/_matrix/federation/v1/send/{txn_id}"), Some(&body))
        .await
}

/// `GET path` from `origin` to `target`, signed with `origin`'s key.
pub async fn federation_get(target: &Server, origin: &Server, path: &str) -> (u16, Value) {
    federation_request_from(target, origin, Method::GET, path, None).await
}

/// `POST path` with `body` from `origin` to `target`, signed with `origin`'s key.
pub async fn federation_post(target: &Server, origin: &Server, path: &str, body: &Value) -> (u16, Value) {
    federation_request_from(target, origin, Method::POST, path, Some(body)).await
}

/// Two federating servers and a public room on A that Bob of B has joined: where most
/// federation tests start.
pub struct JoinedPair {
    pub a: Server,
    pub b: Server,
    pub alice: User,
    pub bob: User,
    pub room_id: String,
}

impl JoinedPair {
    pub async fn start(backend: Backend) -> Self {
        let a = federating(backend).await;
        let b = federating(backend).await;
        let alice = a.register("alice", "password-alice-1").await;
        let bob = b.register("bob", "password-bob-1").await;
        let room_id = a.create_room(&alice, json!({"preset": "public_chat"})).await;
        b.join_via(&bob, &room_id, &a.server_name).await.assert_ok();
        Self { a, b, alice, bob, room_id }
    }
}
