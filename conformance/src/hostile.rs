//! A hostile federating server inside the test process: its own ed25519 key and key document,
//! a TLS listener on a loopback port (named `localhost:<port>`, or an IP literal), answers to
//! every federation request that the test dictates, and validly signed events and
//! transactions of whatever shape the test wants to try on a real homeserver.
//!
//! What it does by itself, so tests only write what matters to them:
//! - serves `/_matrix/key/v2/server` (the homeserver fetches it to check our signatures) and
//!   `/_matrix/federation/v1/version`;
//! - takes every `/send` transaction (answering success) and keeps its PDUs and EDUs, so a test
//!   can wait for what the homeserver sent;
//! - co-signs invites (`/invite` v2), as an honest server would;
//! - keeps a [`RoomView`] of each room it joined ([`HostileServer::join`]) or created
//!   ([`HostileServer::create_room`]), updated with what it builds and receives, from which
//!   [`HostileServer::build`] fills in `prev_events`, `auth_events` and `depth`, and from which
//!   the rooms it created answer `make_join`, `send_join`, `make_leave`, `send_leave`,
//!   `/event`, `/state_ids`, `/state`, `/backfill`, `/get_missing_events` and `/event_auth`.
//!
//! Any endpoint's answer can be replaced with [`HostileServer::on`]; every request received is
//! logged ([`HostileServer::requests`]). Events are built from a [`Draft`] where every field
//! may be set by hand (any sender of this server, any `prev_events`, `auth_events`, `depth`,
//! extra top-level keys) and are hashed and signed with this server's key.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::IntoResponse,
};
use federation::{SigningKey, pdu::Pdu, xmatrix};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, RoomVersionId, ServerName,
    signatures::{hash_and_sign_event, reference_hash},
};
use serde_json::{Map, Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{Server, enc, federation_http};

/// The federation endpoints a test may answer itself (see [`HostileServer::on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Send,
    MakeJoin,
    SendJoin,
    MakeLeave,
    SendLeave,
    Invite,
    Event,
    State,
    StateIds,
    Backfill,
    GetMissingEvents,
    EventAuth,
    /// `/query/{kind}` (profile, directory).
    Query,
    /// `/publicRooms`.
    PublicRooms,
    /// `/_matrix/key/v2/server` (answered with the server's own key document by default).
    Keys,
    /// `/_matrix/federation/v1/media/...`: `args` are `["download", media_id]` or
    /// `["thumbnail", media_id]`.
    Media,
    /// Anything else (keys of users, any path outside the federation API, ...).
    Other,
}

/// A request the hostile server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub endpoint: Endpoint,
    pub method: Method,
    /// The whole path, e.g. for a URL outside the federation API that an answer pointed to.
    pub path: String,
    /// The decoded path segments after the endpoint's name, e.g. `[room_id, user_id]` for
    /// `make_join`.
    pub args: Vec<String>,
    /// Query parameters (a repeated one, like `ver` or `v`, has several values).
    pub query: Vec<(String, String)>,
    pub body: Value,
    /// The origin named in the X-Matrix header (not verified: we trust nobody, but we also
    /// have nothing to protect).
    pub origin: Option<String>,
}

impl Request {
    /// Every value of a query parameter.
    pub fn query_all(&self, name: &str) -> Vec<String> {
        self.query.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }
}

/// An answer: status and JSON body, or (see [`Reply::streamed`]) any headers and a body
/// streamed as the test produces it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub streamed: Option<StreamedBody>,
}

/// A body that is not JSON, streamed chunk by chunk (it may be slow, or endless), with the
/// headers that go with it. Taken by the one response it answers.
#[derive(Clone)]
pub struct StreamedBody {
    headers: Vec<(String, String)>,
    body: Arc<Mutex<Option<axum::body::Body>>>,
}

impl std::fmt::Debug for StreamedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedBody").field("headers", &self.headers).finish_non_exhaustive()
    }
}

impl Reply {
    pub fn ok(body: Value) -> Self {
        Self { status: 200, body, streamed: None }
    }

    /// A Matrix error.
    pub fn error(status: u16, errcode: &str, message: &str) -> Self {
        Self { status, body: json!({"errcode": errcode, "error": message}), streamed: None }
    }

    /// An answer with these headers whose body is `body`, sent as it yields chunks (a
    /// multipart media answer, an endless one, one that stalls until the test releases it).
    pub fn streamed<S>(status: u16, headers: &[(&str, &str)], body: S) -> Self
    where
        S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let streamed = StreamedBody {
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            body: Arc::new(Mutex::new(Some(axum::body::Body::from_stream(body)))),
        };
        Self { status, body: Value::Null, streamed: Some(streamed) }
    }

    fn not_found() -> Self {
        Self::error(404, "M_NOT_FOUND", "The hostile server does not know that")
    }
}

type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// An event to build: the fields a test cares about, everything else filled in from the
/// room's [`RoomView`] unless set here.
#[derive(Debug, Clone)]
pub struct Draft {
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub prev_events: Option<Vec<String>>,
    pub auth_events: Option<Vec<String>>,
    pub depth: Option<u64>,
    pub origin_server_ts: Option<u64>,
    /// Extra top-level keys, e.g. `redacts` on an event of any type.
    pub extra: Map<String, Value>,
}

impl Draft {
    pub fn new(sender: &str, kind: &str, content: Value) -> Self {
        Self {
            sender: sender.to_owned(),
            kind: kind.to_owned(),
            state_key: None,
            content,
            prev_events: None,
            auth_events: None,
            depth: None,
            origin_server_ts: None,
            extra: Map::new(),
        }
    }

    /// An `m.room.message` text.
    pub fn message(sender: &str, body: &str) -> Self {
        Self::new(sender, "m.room.message", json!({"msgtype": "m.text", "body": body}))
    }

    pub fn state(sender: &str, kind: &str, state_key: &str, content: Value) -> Self {
        Self { state_key: Some(state_key.to_owned()), ..Self::new(sender, kind, content) }
    }

    /// An `m.room.member` event of `sender` about `target`.
    pub fn member(sender: &str, target: &str, membership: &str) -> Self {
        Self::state(sender, "m.room.member", target, json!({"membership": membership}))
    }

    pub fn prev_events(mut self, ids: &[&str]) -> Self {
        self.prev_events = Some(ids.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    pub fn auth_events(mut self, ids: &[&str]) -> Self {
        self.auth_events = Some(ids.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    pub fn depth(mut self, depth: u64) -> Self {
        self.depth = Some(depth);
        self
    }

    pub fn top_level(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }
}

/// What the hostile server knows of a room: every event it saw, the state (the latest event
/// for each key wins: the harness does not resolve state), the forward extremities and the
/// greatest depth.
#[derive(Debug, Clone)]
pub struct RoomView {
    pub room_id: String,
    pub version: RoomVersionId,
    pub events: HashMap<String, Value>,
    /// (type, state key) -> event id.
    pub state: BTreeMap<(String, String), String>,
    pub extremities: Vec<String>,
    pub depth: u64,
    /// Events in the order this server learnt them.
    pub order: Vec<String>,
}

impl RoomView {
    fn new(room_id: &str, version: RoomVersionId) -> Self {
        Self {
            room_id: room_id.to_owned(),
            version,
            events: HashMap::new(),
            state: BTreeMap::new(),
            extremities: Vec::new(),
            depth: 0,
            order: Vec::new(),
        }
    }

    /// The current state event id for (type, state key).
    pub fn state_id(&self, kind: &str, state_key: &str) -> Option<String> {
        self.state.get(&(kind.to_owned(), state_key.to_owned())).cloned()
    }

    /// Records an event as part of the room's graph (and state, for a state event).
    fn add(&mut self, id: &str, pdu: &Value, in_state: bool) {
        if in_state && let (Some(kind), Some(key)) = (pdu["type"].as_str(), pdu["state_key"].as_str()) {
            self.state.insert((kind.to_owned(), key.to_owned()), id.to_owned());
        }
        if self.events.contains_key(id) {
            return;
        }
        self.events.insert(id.to_owned(), pdu.clone());
        self.order.push(id.to_owned());
        let prev: Vec<&str> = pdu["prev_events"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        self.extremities.retain(|e| !prev.contains(&e.as_str()));
        self.extremities.push(id.to_owned());
        self.depth = self.depth.max(pdu["depth"].as_u64().unwrap_or(0));
    }

    /// The auth events an event needs under the spec's selection, from the current state.
    fn auth_events_for(&self, draft: &Draft) -> Vec<String> {
        let Some(rules) = self.version.rules() else { return Vec::new() };
        let pdu = json!({
            "room_id": self.room_id, "sender": draft.sender, "type": draft.kind, "state_key": draft.state_key,
            "content": draft.content, "origin_server_ts": 0, "depth": 0, "prev_events": [], "auth_events": [],
        });
        let Ok(pdu) = Pdu::from_json(EventId::parse("$draft").expect("valid id"), &pdu.to_string()) else {
            return Vec::new();
        };
        let mut wanted = federation::auth::auth_types(&pdu, &rules.authorization).unwrap_or_default();
        if !rules.authorization.room_create_event_id_as_room_id {
            wanted.push((ruma::events::StateEventType::RoomCreate, String::new()));
        }
        let mut ids: Vec<String> = Vec::new();
        for (kind, key) in wanted {
            if let Some(id) = self.state_id(&kind.to_string(), &key)
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }

    /// The auth chain of `ids` (without them), as PDUs.
    pub fn auth_chain(&self, ids: &[String]) -> Vec<Value> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut stack: Vec<String> = ids
            .iter()
            .filter_map(|id| self.events.get(id))
            .flat_map(|e| e["auth_events"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let mut out = Vec::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(event) = self.events.get(&id) {
                stack.extend(
                    event["auth_events"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)),
                );
                out.push(event.clone());
            }
        }
        if let Some(create) = self.state_id("m.room.create", "")
            && !seen.contains(&create)
            && !ids.contains(&create)
            && let Some(event) = self.events.get(&create)
        {
            // Room version 12 no longer lists the create event as an auth event.
            out.push(event.clone());
        }
        out
    }

    /// The current state as PDUs.
    pub fn state_events(&self) -> Vec<Value> {
        self.state.values().filter_map(|id| self.events.get(id).cloned()).collect()
    }
}

struct Inner {
    name: String,
    key: SigningKey,
    handlers: Mutex<HashMap<Endpoint, Handler>>,
    requests: Mutex<Vec<Request>>,
    /// PDUs and EDUs received through `/send`, in order.
    pdus: Mutex<Vec<Value>>,
    edus: Mutex<Vec<Value>>,
    rooms: Mutex<HashMap<String, RoomView>>,
    /// Rooms this server created: it answers for them as their resident server.
    hosted: Mutex<HashSet<String>>,
    /// Endpoints whose answers wait until released (see [`HostileServer::hold`]).
    holds: Mutex<HashMap<Endpoint, Arc<tokio::sync::Semaphore>>>,
}

/// The hostile server. Stops listening when dropped.
pub struct HostileServer {
    /// The server name, `<host>:<port>`.
    pub name: String,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The room versions a hostile join offers to support.
const VERSIONS: [&str; 10] = ["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"];

impl HostileServer {
    /// A hostile server named `localhost:<port>`.
    pub async fn start() -> Self {
        Self::start_named("localhost").await
    }

    /// A hostile server named `<host>:<port>`; `host` is `localhost` or a loopback IP literal
    /// such as `127.0.0.1` (to be told apart from `localhost:<port>` servers by a server ACL).
    pub async fn start_named(host: &str) -> Self {
        crate::install_crypto_provider();
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = tcp.local_addr().expect("local address");
        let name = format!("{host}:{}", addr.port());
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        let key = SigningKey::parse(&format!(
            "ed25519 hostile {}",
            ruma::serde::Base64::<ruma::serde::base64::Standard, Vec<u8>>::new(seed.to_vec()).encode()
        ))
        .expect("a fresh signing key");
        let inner = Arc::new(Inner {
            name: name.clone(),
            key,
            handlers: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            pdus: Mutex::new(Vec::new()),
            edus: Mutex::new(Vec::new()),
            rooms: Mutex::new(HashMap::new()),
            hosted: Mutex::new(HashSet::new()),
            holds: Mutex::new(HashMap::new()),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let listener = TlsIncoming::new(tcp, addr, tls_server_config());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { name, url: format!("https://127.0.0.1:{}", addr.port()), inner, task }
    }

    /// `@localpart:<this server>`.
    pub fn user(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.name)
    }

    pub fn key(&self) -> &SigningKey {
        &self.inner.key
    }

    pub fn server_name(&self) -> &ServerName {
        <&ServerName>::try_from(self.name.as_str()).expect("valid server name")
    }

    /// Answers `endpoint` with `handler` from now on (replacing the built-in answer).
    pub fn on(&self, endpoint: Endpoint, handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) {
        self.inner.handlers.lock().unwrap().insert(endpoint, Arc::new(handler));
    }

    /// Requests to `endpoint` wait (logged, unanswered) until [`HostileServer::release`]:
    /// a peer that is slow exactly where the test wants it, for as long as it wants.
    pub fn hold(&self, endpoint: Endpoint) {
        self.inner.holds.lock().unwrap().insert(endpoint, Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// Answers the held requests to `endpoint` and every later one at once.
    pub fn release(&self, endpoint: Endpoint) {
        if let Some(gate) = self.inner.holds.lock().unwrap().remove(&endpoint) {
            gate.close();
        }
    }

    /// Waits (bounded) until `endpoint` has received at least `n` requests.
    pub async fn wait_for_requests(&self, endpoint: Endpoint, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.requests(endpoint).len() < n {
            assert!(Instant::now() < deadline, "no {n} requests to {endpoint:?} within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Gives `endpoint` its built-in answer again.
    pub fn reset(&self, endpoint: Endpoint) {
        self.inner.handlers.lock().unwrap().remove(&endpoint);
    }

    /// Every request received for `endpoint` so far.
    pub fn requests(&self, endpoint: Endpoint) -> Vec<Request> {
        self.inner.requests.lock().unwrap().iter().filter(|r| r.endpoint == endpoint).cloned().collect()
    }

    /// Every PDU received through `/send` so far.
    pub fn received_pdus(&self) -> Vec<Value> {
        self.inner.pdus.lock().unwrap().clone()
    }

    /// Every EDU received through `/send` so far.
    pub fn received_edus(&self) -> Vec<Value> {
        self.inner.edus.lock().unwrap().clone()
    }

    /// Waits (up to 40 s) for a PDU received through `/send` that satisfies `check`.
    pub async fn wait_for_pdu(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(pdu) = self.received_pdus().into_iter().find(|p| check(p)) {
                return pdu;
            }
            assert!(Instant::now() < deadline, "{what} never reached the hostile server {}", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What this server knows of a room.
    pub fn room(&self, room_id: &str) -> RoomView {
        self.inner.rooms.lock().unwrap().get(room_id).cloned().unwrap_or_else(|| panic!("no view of {room_id}"))
    }

    // ---- events ----

    /// Hashes and signs any event JSON with this server's key; returns its id (the reference
    /// hash) and the signed event. Nothing is checked: that is the point.
    pub fn sign(&self, version: &RoomVersionId, event: Value) -> (String, Value) {
        sign_with(&self.inner.name, &self.inner.key, version, event)
    }

    /// Adds this server's signature to another server's event (what an invitee's server does),
    /// as a function a handler set with [`HostileServer::on`] can keep.
    pub fn cosigner(&self) -> impl Fn(&RoomVersionId, Value) -> Value + Send + Sync + 'static {
        let inner = self.inner.clone();
        move |version, event| {
            let rules = version.rules().expect("a known room version");
            let mut object: CanonicalJsonObject = serde_json::from_value(event).expect("an event object");
            ruma::signatures::sign_event(&inner.name, inner.key.pair(), &mut object, &rules.redaction)
                .expect("co-sign");
            serde_json::to_value(&object).expect("JSON")
        }
    }

    /// Builds and signs an event in a room this server has a view of: fields the draft leaves
    /// unset come from the view (`prev_events`: the extremities; `auth_events`: the spec's
    /// selection from the current state; `depth`: one more than the greatest). The event is
    /// added to the view; nothing is sent.
    pub fn build(&self, room_id: &str, draft: Draft) -> (String, Value) {
        let mut rooms = self.inner.rooms.lock().unwrap();
        let view = rooms.get_mut(room_id).unwrap_or_else(|| panic!("no view of {room_id}"));
        let (id, pdu) = build_in(&self.inner, view, draft);
        view.add(&id, &pdu, true);
        (id, pdu)
    }

    // ---- requests to a real server ----

    /// A federation request to `server`, signed with X-Matrix by this server. Returns the
    /// status and the JSON body (`Null` if not JSON).
    pub async fn request(&self, server: &Server, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let base = server.federation_url.as_ref().expect("the server federates");
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("JSON")).unwrap_or_default();
        let mut request = http::Request::builder().method(method).uri(format!("{base}{path}"));
        if !bytes.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let mut request = request.body(bytes).expect("request");
        let destination = ServerName::parse(&server.server_name).expect("server name");
        xmatrix::sign_request(&mut request, self.server_name(), &destination, &self.inner.key).expect("sign");
        let response = federation_http()
            .execute(reqwest::Request::try_from(request).expect("reqwest request"))
            .await
            .expect("federation request");
        let status = response.status().as_u16();
        let body =
            response.bytes().await.map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null)).unwrap_or_default();
        assert!(status < 500, "{} answered {status} to {path}: {body}", server.server_name);
        (status, body)
    }

    pub async fn get(&self, server: &Server, path: &str) -> (u16, Value) {
        self.request(server, Method::GET, path, None).await
    }

    /// A `/send` transaction with these PDUs and EDUs; returns the status and answer.
    pub async fn send(&self, server: &Server, pdus: Vec<Value>, edus: Vec<Value>) -> (u16, Value) {
        let txn = format!("hostile-{}", random_suffix());
        let body = json!({
            "origin": self.name,
            "origin_server_ts": now_ms(),
            "pdus": pdus,
            "edus": edus,
        });
        self.request(server, Method::PUT, &format!("/_matrix/federation/v1/send/{txn}"), Some(body)).await
    }

    /// Sends one PDU through `/send` and returns the server's verdict on it: `Ok(())`, or the
    /// error the server reported for it.
    pub async fn send_pdu(&self, server: &Server, pdu: &Value) -> Result<(), String> {
        let id = event_id(pdu, &self.version_of(pdu));
        let (status, body) = self.send(server, vec![pdu.clone()], Vec::new()).await;
        assert_eq!(status, 200, "/send answered {status}: {body}");
        match body["pdus"][&id]["error"].as_str() {
            Some(error) => Err(error.to_owned()),
            None => Ok(()),
        }
    }

    fn version_of(&self, pdu: &Value) -> RoomVersionId {
        let room = pdu["room_id"].as_str().unwrap_or_default();
        self.inner.rooms.lock().unwrap().get(room).map(|v| v.version.clone()).unwrap_or(RoomVersionId::V12)
    }

    /// Joins `localpart` of this server to a room of `server` (make_join, then send_join v2)
    /// and keeps a view of the room from the answer. Returns the join event id, or the status
    /// and body of the refused step.
    pub async fn join(&self, server: &Server, room_id: &str, localpart: &str) -> Result<String, (u16, Value)> {
        let user = self.user(localpart);
        let ver: String = VERSIONS.iter().map(|v| format!("ver={v}")).collect::<Vec<_>>().join("&");
        let (status, answer) =
            self.get(server, &format!("/_matrix/federation/v1/make_join/{}/{}?{ver}", enc(room_id), enc(&user))).await;
        if status != 200 {
            return Err((status, answer));
        }
        let version = RoomVersionId::try_from(answer["room_version"].as_str().unwrap_or("1")).expect("room version");
        let mut template = answer["event"].clone();
        template["origin_server_ts"] = json!(now_ms());
        let (join_id, join) = self.sign(&version, template);
        let (status, state) = self
            .request(
                server,
                Method::PUT,
                &format!("/_matrix/federation/v2/send_join/{}/{}", enc(room_id), enc(&join_id)),
                Some(join.clone()),
            )
            .await;
        if status != 200 {
            return Err((status, state));
        }
        let mut rooms = self.inner.rooms.lock().unwrap();
        let view = rooms.entry(room_id.to_owned()).or_insert_with(|| RoomView::new(room_id, version.clone()));
        let mut known: Vec<(u64, String, Value, bool)> = Vec::new();
        for (events, in_state) in [(&state["auth_chain"], false), (&state["state"], true)] {
            for event in events.as_array().into_iter().flatten() {
                known.push((event["depth"].as_u64().unwrap_or(0), event_id(event, &version), event.clone(), in_state));
            }
        }
        known.sort_by_key(|(depth, ..)| *depth);
        for (_, id, event, in_state) in &known {
            view.add(id, event, *in_state);
        }
        // The join is the one extremity the next event builds on.
        view.add(&join_id, &join, true);
        view.extremities = vec![join_id.clone()];
        Ok(join_id)
    }

    /// Invites `target` (a user of `server`) to a room this server has a view of, as `sender`
    /// (`invite` v2, with the create event and join rules as the room's stripped state).
    /// Returns the status and answer (the co-signed invite when accepted).
    pub async fn invite(&self, server: &Server, room_id: &str, sender: &str, target: &str) -> (u16, Value) {
        let (id, event) = self.build(room_id, Draft::member(sender, target, "invite"));
        let view = self.room(room_id);
        let stripped: Vec<Value> = ["m.room.create", "m.room.join_rules", "m.room.name"]
            .iter()
            .filter_map(|kind| view.state_id(kind, "").and_then(|id| view.events.get(&id).cloned()))
            .collect();
        let body = json!({"room_version": view.version.as_str(), "event": event, "invite_room_state": stripped});
        self.request(
            server,
            Method::PUT,
            &format!("/_matrix/federation/v2/invite/{}/{}", enc(room_id), enc(&id)),
            Some(body),
        )
        .await
    }

    /// Creates a room on this server, as its resident server: the create event, the
    /// creator's join, power levels (the creator 100 before version 12), public join rules and
    /// `shared` history.
    /// Answers joins and reads of the room from then on. Returns the room id.
    pub fn create_room(&self, version: &RoomVersionId, creator_localpart: &str) -> String {
        let creator = self.user(creator_localpart);
        let rules = version.rules().expect("a known room version");
        let mut create = json!({
            "type": "m.room.create", "state_key": "", "sender": creator, "content": {"room_version": version.as_str()},
            "prev_events": [], "auth_events": [], "depth": 1, "origin_server_ts": now_ms(),
        });
        if !rules.authorization.use_room_create_sender {
            create["content"]["creator"] = json!(creator);
        }
        if !rules.authorization.room_create_event_id_as_room_id {
            create["room_id"] = json!(format!("!{}:{}", random_suffix(), self.name));
        }
        let (create_id, create, room_id) = loop {
            let (create_id, signed) = self.sign(version, create.clone());
            let room_id = match signed["room_id"].as_str() {
                Some(id) => id.to_owned(),
                // Room version 12: the room id is the create event's.
                None => format!("!{}", create_id.trim_start_matches('$')),
            };
            if !self.inner.rooms.lock().unwrap().contains_key(&room_id) {
                break (create_id, signed, room_id);
            }
            // Two rooms made in the same millisecond would be one room (version 12).
            create["origin_server_ts"] = json!(create["origin_server_ts"].as_u64().unwrap_or(0) + 1);
        };
        let mut view = RoomView::new(&room_id, version.clone());
        view.add(&create_id, &create, true);
        self.inner.rooms.lock().unwrap().insert(room_id.clone(), view);
        self.inner.hosted.lock().unwrap().insert(room_id.clone());
        self.build(&room_id, Draft::member(&creator, &creator, "join"));
        // From room version 12 creators have every power and may not be listed.
        let users = if rules.authorization.explicitly_privilege_room_creators {
            json!({})
        } else {
            json!({(creator.as_str()): 100})
        };
        self.build(&room_id, Draft::state(&creator, "m.room.power_levels", "", json!({"users": users})));
        self.build(&room_id, Draft::state(&creator, "m.room.join_rules", "", json!({"join_rule": "public"})));
        self.build(
            &room_id,
            Draft::state(&creator, "m.room.history_visibility", "", json!({"history_visibility": "shared"})),
        );
        room_id
    }
}

/// Builds, hashes and signs `draft` in `view` (not recorded).
fn build_in(inner: &Inner, view: &RoomView, draft: Draft) -> (String, Value) {
    let auth_events = draft.auth_events.clone().unwrap_or_else(|| view.auth_events_for(&draft));
    let prev_events = draft.prev_events.clone().unwrap_or_else(|| view.extremities.clone());
    let mut event = json!({
        "room_id": view.room_id,
        "sender": draft.sender,
        "type": draft.kind,
        "content": draft.content,
        "prev_events": prev_events,
        "auth_events": auth_events,
        "depth": draft.depth.unwrap_or(view.depth + 1),
        "origin_server_ts": draft.origin_server_ts.unwrap_or_else(now_ms),
    });
    if let Some(key) = &draft.state_key {
        event["state_key"] = json!(key);
    }
    for (k, v) in draft.extra {
        event[k] = v;
    }
    sign_with(&inner.name, &inner.key, &view.version, event)
}

fn sign_with(name: &str, key: &SigningKey, version: &RoomVersionId, event: Value) -> (String, Value) {
    let rules = version.rules().expect("a known room version");
    let CanonicalJsonValue::Object(mut object) = CanonicalJsonValue::try_from(event).expect("canonical JSON") else {
        panic!("an event is an object");
    };
    object.remove("hashes");
    object.remove("signatures");
    object.remove("unsigned");
    hash_and_sign_event(name, key.pair(), &mut object, &rules.redaction).expect("hash and sign");
    let id = format!("${}", reference_hash(&object, &rules).expect("reference hash"));
    (id, serde_json::to_value(&object).expect("JSON"))
}

/// The id of an event (room version 3 and later: its reference hash).
pub fn event_id(pdu: &Value, version: &RoomVersionId) -> String {
    let object: CanonicalJsonObject = serde_json::from_value(pdu.clone()).expect("an event object");
    federation::pdu::event_id_of(&object, version).expect("event id").to_string()
}

fn now_ms() -> u64 {
    u64::from(MilliSecondsSinceUnixEpoch::now().get())
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..12).map(|_| (b'a' + rng.random_range(0..26u8)) as char).collect()
}

// ---- serving ----

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let path = uri.path();
    if path == "/_matrix/federation/v1/version" {
        return json_response(200, json!({"server": {"name": "hostile", "version": "0"}}));
    }
    let (endpoint, args) = parse_path(path);
    let query = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, true), decode(v, true))
        })
        .collect();
    let origin = xmatrix::parse_header(&headers).ok().map(|h| h.origin.to_string());
    let request = Request {
        endpoint,
        method,
        path: path.to_owned(),
        args,
        query,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        origin,
    };
    inner.requests.lock().unwrap().push(request.clone());
    wait_if_held(&inner, endpoint).await;
    let handler = inner.handlers.lock().unwrap().get(&endpoint).cloned();
    let reply = match handler {
        Some(handler) => handler(&request),
        None => built_in(&inner, &request),
    };
    if let Some(streamed) = reply.streamed {
        return streamed_response(reply.status, streamed);
    }
    json_response(reply.status, reply.body)
}

fn streamed_response(status: u16, streamed: StreamedBody) -> axum::response::Response {
    let body = streamed.body.lock().unwrap().take().unwrap_or_default();
    let mut response = axum::response::Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in streamed.headers {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::try_from(name), axum::http::HeaderValue::try_from(value))
        {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// Waits while `endpoint` is held.
async fn wait_if_held(inner: &Inner, endpoint: Endpoint) {
    let gate = inner.holds.lock().unwrap().get(&endpoint).cloned();
    if let Some(gate) = gate {
        // Closed on release: the wait ends with an error, which is the signal.
        let _ = gate.acquire().await;
    }
}

fn json_response(status: u16, body: Value) -> axum::response::Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

/// The endpoint a path names and its decoded arguments.
fn parse_path(path: &str) -> (Endpoint, Vec<String>) {
    if path.starts_with("/_matrix/key/v2/server") {
        return (Endpoint::Keys, Vec::new());
    }
    let Some(rest) = path.strip_prefix("/_matrix/federation/") else { return (Endpoint::Other, Vec::new()) };
    let mut segments = rest.split('/');
    let _version = segments.next();
    let name = segments.next().unwrap_or_default();
    let args: Vec<String> = segments.map(|s| decode(s, false)).collect();
    let endpoint = match name {
        "send" => Endpoint::Send,
        "make_join" => Endpoint::MakeJoin,
        "send_join" => Endpoint::SendJoin,
        "make_leave" => Endpoint::MakeLeave,
        "send_leave" => Endpoint::SendLeave,
        "invite" => Endpoint::Invite,
        "event" => Endpoint::Event,
        "state" => Endpoint::State,
        "state_ids" => Endpoint::StateIds,
        "backfill" => Endpoint::Backfill,
        "get_missing_events" => Endpoint::GetMissingEvents,
        "event_auth" => Endpoint::EventAuth,
        "query" => Endpoint::Query,
        "publicRooms" => Endpoint::PublicRooms,
        "media" => Endpoint::Media,
        _ => Endpoint::Other,
    };
    (endpoint, args)
}

/// Percent-decodes a path segment or query part (`+` is a space only in queries).
fn decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if let (Some(Some(hi)), Some(Some(lo))) =
                (bytes.get(i + 1).map(|b| hex(*b)), bytes.get(i + 2).map(|b| hex(*b))) =>
            {
                out.push(hi * 16 + lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answers the hostile server gives unless the test says otherwise.
fn built_in(inner: &Inner, req: &Request) -> Reply {
    match req.endpoint {
        Endpoint::Send => {
            let mut results = Map::new();
            for pdu in req.body["pdus"].as_array().into_iter().flatten() {
                let room = pdu["room_id"].as_str().unwrap_or_default().to_owned();
                let mut rooms = inner.rooms.lock().unwrap();
                let version = rooms.get(&room).map(|v| v.version.clone()).unwrap_or(RoomVersionId::V12);
                let id = event_id(pdu, &version);
                if let Some(view) = rooms.get_mut(&room) {
                    view.add(&id, pdu, true);
                }
                results.insert(id, json!({}));
                inner.pdus.lock().unwrap().push(pdu.clone());
            }
            inner.edus.lock().unwrap().extend(req.body["edus"].as_array().cloned().unwrap_or_default());
            Reply::ok(json!({"pdus": results}))
        }
        Endpoint::Invite => {
            // Co-sign the invite, as the invitee's server does.
            let version = RoomVersionId::try_from(req.body["room_version"].as_str().unwrap_or("12")).expect("version");
            let Ok(mut object) = serde_json::from_value::<CanonicalJsonObject>(req.body["event"].clone()) else {
                return Reply::error(400, "M_BAD_JSON", "no event");
            };
            let rules = version.rules().expect("known version");
            ruma::signatures::sign_event(&inner.name, inner.key.pair(), &mut object, &rules.redaction)
                .expect("co-sign");
            Reply::ok(json!({"event": object}))
        }
        Endpoint::Keys => {
            let doc = federation::keys::own_key_document(
                <&ServerName>::try_from(inner.name.as_str()).expect("name"),
                &inner.key,
                MilliSecondsSinceUnixEpoch::now(),
            )
            .expect("key document");
            Reply::ok(serde_json::from_str(doc.json().get()).expect("JSON"))
        }
        _ => hosted(inner, req).unwrap_or_else(Reply::not_found),
    }
}

/// Answers for the rooms this server created, as their resident server.
fn hosted(inner: &Inner, req: &Request) -> Option<Reply> {
    let hosted = inner.hosted.lock().unwrap().clone();
    let mut rooms = inner.rooms.lock().unwrap();
    let room_of_event = |id: &str| {
        rooms.iter().find(|(room, view)| hosted.contains(*room) && view.events.contains_key(id)).map(|(r, _)| r.clone())
    };
    let room_id = match req.endpoint {
        Endpoint::Event => room_of_event(req.args.first()?)?,
        _ => req.args.first().cloned().filter(|r| hosted.contains(r))?,
    };
    let view = rooms.get_mut(&room_id)?;
    match req.endpoint {
        Endpoint::MakeJoin | Endpoint::MakeLeave => {
            let user = req.args.get(1)?.clone();
            let membership = if req.endpoint == Endpoint::MakeJoin { "join" } else { "leave" };
            let draft = Draft::member(&user, &user, membership);
            let mut template = json!({
                "room_id": room_id, "sender": user, "type": "m.room.member", "state_key": user,
                "content": {"membership": membership},
                "prev_events": view.extremities, "auth_events": view.auth_events_for(&draft),
                "depth": view.depth + 1, "origin_server_ts": now_ms(),
            });
            if let Some(map) = template.as_object_mut() {
                map.retain(|_, v| !v.is_null());
            }
            Some(Reply::ok(json!({"room_version": view.version.as_str(), "event": template})))
        }
        Endpoint::SendJoin | Endpoint::SendLeave => {
            let id = event_id(&req.body, &view.version);
            let state = view.state_events();
            let state_ids: Vec<String> = view.state.values().cloned().collect();
            let auth_chain = view.auth_chain(&state_ids);
            view.add(&id, &req.body, true);
            Some(Reply::ok(if req.endpoint == Endpoint::SendJoin {
                json!({"origin": inner.name, "state": state, "auth_chain": auth_chain, "members_omitted": false})
            } else {
                json!({})
            }))
        }
        Endpoint::Event => {
            let event = view.events.get(req.args.first()?)?.clone();
            Some(Reply::ok(json!({"origin": inner.name, "origin_server_ts": now_ms(), "pdus": [event]})))
        }
        Endpoint::StateIds | Endpoint::State => {
            let ids: Vec<String> = view.state.values().cloned().collect();
            let chain = view.auth_chain(&ids);
            Some(Reply::ok(if req.endpoint == Endpoint::StateIds {
                let chain_ids: Vec<String> = chain.iter().map(|e| event_id(e, &view.version)).collect();
                json!({"pdu_ids": ids, "auth_chain_ids": chain_ids})
            } else {
                json!({"pdus": view.state_events(), "auth_chain": chain})
            }))
        }
        Endpoint::EventAuth => {
            let chain = view.auth_chain(&[req.args.get(1)?.clone()]);
            Some(Reply::ok(json!({"auth_chain": chain})))
        }
        Endpoint::Backfill => {
            let limit: usize = req.query_all("limit").first().and_then(|l| l.parse().ok()).unwrap_or(10);
            let from = req.query_all("v");
            let start = view.order.iter().rposition(|id| from.contains(id))?;
            let pdus: Vec<Value> =
                view.order[..=start].iter().rev().take(limit).filter_map(|id| view.events.get(id).cloned()).collect();
            Some(Reply::ok(json!({"origin": inner.name, "origin_server_ts": now_ms(), "pdus": pdus})))
        }
        Endpoint::GetMissingEvents => {
            let earliest: HashSet<String> = string_list(&req.body["earliest_events"]).into_iter().collect();
            let latest = string_list(&req.body["latest_events"]);
            let limit = req.body["limit"].as_u64().unwrap_or(10) as usize;
            let mut seen: HashSet<String> = earliest.iter().chain(&latest).cloned().collect();
            let mut front: Vec<String> = latest;
            let mut found: Vec<Value> = Vec::new();
            while !front.is_empty() && found.len() < limit {
                let next: Vec<String> = front
                    .iter()
                    .filter_map(|id| view.events.get(id))
                    .flat_map(|e| string_list(&e["prev_events"]))
                    .filter(|id| seen.insert(id.clone()))
                    .collect();
                found.extend(next.iter().filter_map(|id| view.events.get(id).cloned()).take(limit - found.len()));
                front = next;
            }
            found.sort_by_key(|e| e["depth"].as_u64().unwrap_or(0));
            Some(Reply::ok(json!({"events": found})))
        }
        _ => None,
    }
}

fn string_list(value: &Value) -> Vec<String> {
    value.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
}

// ---- TLS ----

fn tls_server_config() -> Arc<rustls::ServerConfig> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("a certificate");
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("certificate and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// TLS connections for axum: handshakes run in their own tasks.
struct TlsIncoming {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        // Stops listening: the port closes with the hostile server.
        self.acceptor_task.abort();
    }
}

impl TlsIncoming {
    fn new(tcp: TcpListener, local: SocketAddr, config: Arc<rustls::ServerConfig>) -> Self {
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let acceptor_task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else { continue };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Self { ready, local, acceptor_task }
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
