//! Malformed paths and bodies thrown at every client endpoint: each answer is a success or a
//! Matrix error (`errcode` and `error`) with a 4xx status, never a 5xx (the harness panics on
//! one) and never a dead server. Bodies that are not JSON at all are refused as such by every
//! endpoint that takes JSON.

use conformance::{Backend, Server, User, backend_tests, enc};
use reqwest::Method;
use serde_json::{Value, json};

backend_tests!(malformed_paths_and_bodies_get_matrix_errors);

/// Every client route, with `{name}` placeholders for its path parameters. The endpoints
/// that end the session (logout, deactivate) are left out: they would end the test's too.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/_matrix/client/versions"),
    ("GET", "/.well-known/matrix/client"),
    ("GET", "/_matrix/client/v3/capabilities"),
    ("POST", "/_matrix/client/v3/register"),
    ("GET", "/_matrix/client/v3/register/available?username={user}"),
    ("GET", "/_matrix/client/v1/register/m.login.registration_token/validity?token={key}"),
    ("GET", "/_matrix/client/v3/login"),
    ("POST", "/_matrix/client/v3/login"),
    ("GET", "/_matrix/client/v3/account/whoami"),
    ("POST", "/_matrix/client/v3/account/password"),
    ("GET", "/_matrix/client/v3/devices"),
    ("GET", "/_matrix/client/v3/devices/{device}"),
    ("PUT", "/_matrix/client/v3/devices/{device}"),
    ("DELETE", "/_matrix/client/v3/devices/{device}"),
    ("POST", "/_matrix/client/v3/delete_devices"),
    ("GET", "/_matrix/client/v3/profile/{user}"),
    ("GET", "/_matrix/client/v3/profile/{user}/{key}"),
    ("PUT", "/_matrix/client/v3/profile/{user}/{key}"),
    ("DELETE", "/_matrix/client/v3/profile/{user}/{key}"),
    ("POST", "/_matrix/client/v3/createRoom"),
    ("POST", "/_matrix/client/v3/rooms/{room}/upgrade"),
    ("POST", "/_matrix/client/v3/rooms/{room}/join"),
    ("POST", "/_matrix/client/v3/join/{room}?server_name={server}"),
    ("POST", "/_matrix/client/v3/rooms/{room}/invite"),
    ("POST", "/_matrix/client/v3/rooms/{room}/leave"),
    ("POST", "/_matrix/client/v3/rooms/{room}/kick"),
    ("POST", "/_matrix/client/v3/rooms/{room}/ban"),
    ("POST", "/_matrix/client/v3/rooms/{room}/unban"),
    ("POST", "/_matrix/client/v3/rooms/{room}/forget"),
    ("GET", "/_matrix/client/v3/joined_rooms"),
    ("GET", "/_matrix/client/v3/rooms/{room}/members?at={key}&membership={key}"),
    ("GET", "/_matrix/client/v3/rooms/{room}/joined_members"),
    ("GET", "/_matrix/client/v3/rooms/{room}/state"),
    ("GET", "/_matrix/client/v3/rooms/{room}/state/{type}/{key}?format={key}"),
    ("PUT", "/_matrix/client/v3/rooms/{room}/state/{type}/{key}"),
    ("PUT", "/_matrix/client/v3/directory/room/{alias}"),
    ("GET", "/_matrix/client/v3/directory/room/{alias}"),
    ("DELETE", "/_matrix/client/v3/directory/room/{alias}"),
    ("GET", "/_matrix/client/v3/directory/list/room/{room}"),
    ("PUT", "/_matrix/client/v3/directory/list/room/{room}"),
    ("GET", "/_matrix/client/v3/publicRooms?limit={key}&since={key}"),
    ("POST", "/_matrix/client/v3/publicRooms"),
    ("PUT", "/_matrix/client/v3/rooms/{room}/send/{type}/{txn}"),
    ("GET", "/_matrix/client/v3/rooms/{room}/messages?dir=b&from={key}&to={key}&limit={key}&filter={key}"),
    ("PUT", "/_matrix/client/v3/rooms/{room}/redact/{event}/{txn}"),
    ("GET", "/_matrix/client/v3/rooms/{room}/event/{event}"),
    ("GET", "/_matrix/client/v3/rooms/{room}/context/{event}?limit={key}&filter={key}"),
    ("PUT", "/_matrix/client/v3/rooms/{room}/typing/{user}"),
    ("POST", "/_matrix/client/v3/rooms/{room}/receipt/{type}/{event}"),
    ("POST", "/_matrix/client/v3/rooms/{room}/read_markers"),
    ("GET", "/_matrix/client/v3/sync?since={key}&filter={key}&timeout=0&set_presence={key}"),
    ("POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos={key}&timeout=0"),
    ("POST", "/_matrix/client/v3/user/{user}/filter"),
    ("GET", "/_matrix/client/v3/user/{user}/filter/{key}"),
    ("GET", "/_matrix/client/v3/user/{user}/account_data/{type}"),
    ("PUT", "/_matrix/client/v3/user/{user}/account_data/{type}"),
    ("GET", "/_matrix/client/v3/user/{user}/rooms/{room}/account_data/{type}"),
    ("PUT", "/_matrix/client/v3/user/{user}/rooms/{room}/account_data/{type}"),
    ("GET", "/_matrix/client/v3/user/{user}/rooms/{room}/tags"),
    ("PUT", "/_matrix/client/v3/user/{user}/rooms/{room}/tags/{key}"),
    ("DELETE", "/_matrix/client/v3/user/{user}/rooms/{room}/tags/{key}"),
    ("GET", "/_matrix/client/v3/pushrules/"),
    ("GET", "/_matrix/client/v3/pushrules/global/{key}/{type}"),
    ("PUT", "/_matrix/client/v3/pushrules/global/{key}/{type}?before={key}&after={key}"),
    ("DELETE", "/_matrix/client/v3/pushrules/global/{key}/{type}"),
    ("GET", "/_matrix/client/v3/pushrules/global/{key}/{type}/enabled"),
    ("PUT", "/_matrix/client/v3/pushrules/global/{key}/{type}/enabled"),
    ("GET", "/_matrix/client/v3/pushrules/global/{key}/{type}/actions"),
    ("PUT", "/_matrix/client/v3/pushrules/global/{key}/{type}/actions"),
    ("GET", "/_matrix/client/v3/notifications?from={key}&limit={key}&only={key}"),
    ("GET", "/_matrix/client/v3/pushers"),
    ("POST", "/_matrix/client/v3/pushers/set"),
    ("GET", "/_matrix/client/v1/rooms/{room}/relations/{event}?from={key}&to={key}&limit={key}&dir={key}"),
    ("GET", "/_matrix/client/v1/rooms/{room}/relations/{event}/{type}"),
    ("GET", "/_matrix/client/v1/rooms/{room}/relations/{event}/{type}/{type}"),
    ("GET", "/_matrix/client/v1/rooms/{room}/threads?from={key}&limit={key}&include={key}"),
    ("POST", "/_matrix/client/v3/user_directory/search"),
    ("GET", "/_matrix/client/v3/voip/turnServer"),
    ("POST", "/_matrix/client/v3/search?next_batch={key}"),
    ("PUT", "/_matrix/client/v3/presence/{user}/status"),
    ("GET", "/_matrix/client/v3/presence/{user}/status"),
    ("POST", "/_matrix/client/v3/keys/upload"),
    ("POST", "/_matrix/client/v3/keys/query"),
    ("POST", "/_matrix/client/v3/keys/claim"),
    ("GET", "/_matrix/client/v3/keys/changes?from={key}&to={key}"),
    ("POST", "/_matrix/client/v3/keys/device_signing/upload"),
    ("POST", "/_matrix/client/v3/keys/signatures/upload"),
    ("PUT", "/_matrix/client/v3/sendToDevice/{type}/{txn}"),
    ("POST", "/_matrix/client/v3/room_keys/version"),
    ("GET", "/_matrix/client/v3/room_keys/version"),
    ("GET", "/_matrix/client/v3/room_keys/version/{key}"),
    ("PUT", "/_matrix/client/v3/room_keys/version/{key}"),
    ("DELETE", "/_matrix/client/v3/room_keys/version/{key}"),
    ("PUT", "/_matrix/client/v3/room_keys/keys?version={key}"),
    ("GET", "/_matrix/client/v3/room_keys/keys?version={key}"),
    ("DELETE", "/_matrix/client/v3/room_keys/keys?version={key}"),
    ("PUT", "/_matrix/client/v3/room_keys/keys/{room}?version={key}"),
    ("GET", "/_matrix/client/v3/room_keys/keys/{room}?version={key}"),
    ("PUT", "/_matrix/client/v3/room_keys/keys/{room}/{key}?version={key}"),
    ("GET", "/_matrix/client/v3/room_keys/keys/{room}/{key}?version={key}"),
    ("DELETE", "/_matrix/client/v3/room_keys/keys/{room}/{key}?version={key}"),
    ("POST", "/_matrix/media/v3/upload?filename={key}"),
    ("PUT", "/_matrix/media/v3/upload/{server}/{media}"),
    ("POST", "/_matrix/media/v1/create"),
    ("GET", "/_matrix/client/v1/media/config"),
    ("GET", "/_matrix/client/v1/media/download/{server}/{media}?timeout_ms={key}"),
    ("GET", "/_matrix/client/v1/media/download/{server}/{media}/{key}"),
    ("GET", "/_matrix/client/v1/media/thumbnail/{server}/{media}?width={key}&height={key}&method={key}"),
    ("GET", "/_matrix/media/v3/download/{server}/{media}"),
    ("GET", "/_matrix/media/v3/thumbnail/{server}/{media}?width=32&height=32"),
    ("POST", "/_obmin/media/v1/upload"),
    ("GET", "/_obmin/media/v1/upload/{server}/{media}"),
    ("PATCH", "/_obmin/media/v1/upload/{server}/{media}"),
];

/// Path and query values no endpoint should choke on.
fn bad_segments() -> Vec<String> {
    vec![
        String::new(),
        "x".to_owned(),
        "!".to_owned(),
        "@".to_owned(),
        "#".to_owned(),
        "$".to_owned(),
        "!room:".to_owned(),
        "@user:bad..name".to_owned(),
        "@user:[::1".to_owned(),
        "#alias:".to_owned(),
        "$event:exa mple.org".to_owned(),
        "../../etc/passwd".to_owned(),
        "-1".to_owned(),
        "99999999999999999999999".to_owned(),
        "s-1_x_y_z".to_owned(),
        "s9223372036854775807_9223372036854775807_9223372036854775807".to_owned(),
        "{\"room\": {\"timeline\": {\"limit\": -5}}}".to_owned(),
        "{\"room\": 5".to_owned(),
        "\u{1F4A5}\u{200B}\u{FEFF}".to_owned(),
        "a".repeat(4096),
    ]
}

/// Bodies that are not JSON at all (`M_NOT_JSON` wherever JSON is read) and JSON of every
/// wrong shape.
fn bad_bodies() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let not_json = vec![
        b"{".to_vec(),
        b"{\"a\":}".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        b"[1, 2".to_vec(),
        b"{\"a\": 1} trailing".to_vec(),
        format!("{}{}", "[".repeat(5000), "]".repeat(4999)).into_bytes(),
    ];
    let wrong_shape = vec![
        b"".to_vec(),
        b"[]".to_vec(),
        b"\"string\"".to_vec(),
        b"null".to_vec(),
        b"1e999".to_vec(),
        b"{\"room_id\": 5, \"user_id\": {\"x\": []}, \"messages\": \"x\", \"content\": [null]}".to_vec(),
        b"{\"a\": \"\\ud800\"}".to_vec(),
        // Valid JSON, deeper than any parser's recursion limit.
        format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        format!("{{\"content\": {}{}}}", "{\"a\":".repeat(3000), "}".repeat(3000)).into_bytes(),
        format!("{{\"depth\": {}}}", "9".repeat(400)).into_bytes(),
        serde_json::to_vec(&json!({"limit": -1, "filter": {"limit": 1e300}, "timeout": -5, "visibility": 7})).unwrap(),
    ];
    (not_json, wrong_shape)
}

/// Fills every placeholder with `value`.
fn fill(route: &str, value: &str) -> String {
    let mut out = route.to_owned();
    for name in ["room", "event", "user", "alias", "type", "key", "txn", "device", "server", "media"] {
        out = out.replace(&format!("{{{name}}}"), &enc(value));
    }
    out
}

/// Fills the placeholders with real, well-formed values of the test's user and room.
fn fill_valid(route: &str, user: &User, room: &str, event: &str) -> String {
    route
        .replace("{room}", &enc(room))
        .replace("{event}", &enc(event))
        .replace("{user}", &enc(&user.user_id))
        .replace("{alias}", &enc("#malformed:localhost"))
        .replace("{type}", "m.room.message")
        .replace("{key}", "x")
        .replace("{txn}", "malformed-txn")
        .replace("{device}", &enc(&user.device_id))
        .replace("{server}", "localhost")
        .replace("{media}", "AAAAAAAAAAAAAAAAAAAAAAAA")
}

/// Takes a JSON body (as opposed to none, or raw bytes like media uploads).
fn takes_json(method: &str, route: &str) -> bool {
    matches!(method, "POST" | "PUT") && !route.starts_with("/_matrix/media/v3/upload") && !route.contains("/_obmin/")
}

/// Whether `value` names another server (as a server name or after a `:`), which the server
/// may then try to reach: 502 `M_UNKNOWN` is its honest answer when that server is not there
/// (as Synapse's), not a failure of ours.
fn names_another_server(value: &str) -> bool {
    let parses = |s: &str| ruma::ServerName::parse(s).is_ok_and(|n| n.as_str() != "localhost");
    parses(value) || value.split_once(':').is_some_and(|(_, server)| parses(server))
}

/// A request without the harness's panic on 5xx (a 502 about another server is allowed).
async fn send(server: &Server, method: Method, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut request = server.http.request(method, server.url(path)).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// What went wrong, collected so one run lists every endpoint that answers badly.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// A success, or a Matrix error (`M_*` errcode and a message) with a 4xx status (or the
    /// 401 of user-interactive auth); a 502 only about another server (`remote`).
    fn check(&mut self, what: &str, status: u16, body: &Value, remote: bool) {
        let unreachable = remote && status == 502 && body["errcode"] == "M_UNKNOWN";
        if status >= 500 && !unreachable {
            self.0.push(format!("{what}: {status} {body}"));
        } else if status >= 400 {
            let uia = status == 401 && body["flows"].is_array();
            let matrix = body["errcode"].as_str().is_some_and(|e| e.starts_with("M_")) && body["error"].is_string();
            if !uia && !matrix {
                self.0.push(format!("{what}: a {status} without Matrix error JSON: {body}"));
            }
        }
    }
}

async fn malformed_paths_and_bodies_get_matrix_errors(backend: Backend) {
    let server = Server::start(backend).await;
    let user = server.register("prober", "prober-pass").await;
    let room = server.create_room(&user, json!({"preset": "private_chat"})).await;
    let event = server.send_text(&user, &room, "hello").await.assert_ok()["event_id"].as_str().unwrap().to_owned();
    // Leaving and forgetting may succeed whatever the body: they get a room of their own.
    let spare = server.create_room(&user, json!({"preset": "private_chat"})).await;
    let token = Some(user.access_token.as_str());
    let (not_json, wrong_shape) = bad_bodies();
    let mut requests = 0;
    let mut problems = Problems::default();

    for (method, route) in ROUTES {
        let method_of = || Method::from_bytes(method.as_bytes()).unwrap();
        // Malformed path and query values, with an empty object as the body.
        for value in bad_segments() {
            let path = fill(route, &value);
            let body = if takes_json(method, route) { b"{}".to_vec() } else { Vec::new() };
            let (status, answer) = send(&server, method_of(), &path, token, body).await;
            problems.check(&format!("{method} {path}"), status, &answer, names_another_server(&value));
            requests += 1;
        }
        if !matches!(*method, "POST" | "PUT" | "PATCH") {
            continue;
        }
        // Malformed bodies on well-formed paths.
        let target = if route.ends_with("/leave") || route.ends_with("/forget") { &spare } else { &room };
        let path = fill_valid(route, &user, target, &event);
        // An endpoint without a body answers the same whatever is sent; one that reads JSON
        // must say that what it got is not JSON.
        let (baseline, answer) = send(&server, method_of(), &path, token, b"{}".to_vec()).await;
        problems.check(&format!("{method} {path} with {{}}"), baseline, &answer, false);
        for body in &not_json {
            let (status, answer) = send(&server, method_of(), &path, token, body.clone()).await;
            let what = format!("{method} {path} with {:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
            problems.check(&what, status, &answer, false);
            if takes_json(method, route) && answer["errcode"] != "M_NOT_JSON" && status != baseline {
                problems.0.push(format!("{what}: not JSON must be M_NOT_JSON, got {status} {answer}"));
            }
            requests += 1;
        }
        for body in &wrong_shape {
            let (status, answer) = send(&server, method_of(), &path, token, body.clone()).await;
            let what = format!("{method} {path} with {:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
            problems.check(&what, status, &answer, false);
            requests += 1;
        }
    }
    assert!(requests > 2000, "{requests} requests");

    // Without a token, with a garbage one, and on unknown paths: the same.
    for (method, route) in ROUTES.iter().step_by(3) {
        let path = fill_valid(route, &user, &room, &event);
        for token in [None, Some("obm_not_a_token"), Some("a b c")] {
            let (status, answer) =
                send(&server, Method::from_bytes(method.as_bytes()).unwrap(), &path, token, Vec::new()).await;
            problems.check(&format!("{method} {path} with token {token:?}"), status, &answer, false);
        }
    }
    for path in
        ["/_matrix/client/v3/rooms", "/_matrix/client/v3/rooms//send//", "/_matrix/client/v99/sync", "/_matrix/%FF"]
    {
        let (status, answer) = send(&server, Method::GET, path, token, Vec::new()).await;
        problems.check(path, status, &answer, false);
        if !(400..500).contains(&status) {
            problems.0.push(format!("{path}: {status} {answer}"));
        }
    }
    assert!(problems.0.is_empty(), "{} bad answers:\n{}", problems.0.len(), problems.0.join("\n"));

    // Still serving, and the room is intact.
    server.get("/_matrix/client/versions", None).await.assert_ok();
    let sync = server.sync(&user, None, 0, None).await;
    assert!(sync["rooms"]["join"].get(&room).is_some(), "{sync}");
}
