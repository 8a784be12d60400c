//! Rate limits (`[rate_limits]`, Synapse's classes): an attacker who floods a class is
//! refused with 429 `M_LIMIT_EXCEEDED`, `retry_after_ms` and `Retry-After`, while other
//! users are still served; exempt users are not limited; a spoofed `X-Forwarded-For` does not
//! escape the per-address limit behind a trusted proxy.
//!
//! No timing: every class a test looks at refills at 0.001 per second (one action in 1000 s),
//! so its burst is all there is for the length of the test; every other class is generous.

use conformance::{Backend, Response, Server, ServerOptions, User, backend_tests, enc};
use reqwest::Method;
use serde_json::{Value, json};

backend_tests!(
    message_floods_are_refused_while_others_are_served,
    room_creation_and_joins_are_limited,
    joins_through_other_servers_are_limited,
    invites_are_limited_per_issuer_room_and_invitee,
    media_presence_and_key_requests_are_limited,
    password_guesses_are_limited_per_account,
    registration_token_guesses_are_limited,
    a_spoofed_forwarded_for_does_not_escape_the_address_limit
);

/// Every class's environment prefix.
const CLASSES: &[&str] = &[
    "MESSAGE",
    "ROOM_CREATION",
    "JOINS_LOCAL",
    "JOINS_REMOTE",
    "JOINS_PER_ROOM",
    "INVITES_PER_ROOM",
    "INVITES_PER_USER",
    "INVITES_PER_ISSUER",
    "MEDIA_CREATE",
    "LOGIN_ADDRESS",
    "LOGIN_ACCOUNT",
    "LOGIN_FAILED_ATTEMPTS",
    "REGISTRATION",
    "REGISTRATION_TOKEN_VALIDITY",
    "KEY_REQUESTS",
    "PRESENCE_PER_USER",
];

/// Rate limits on, every class generous but those in `tight`: (class, burst), which refill
/// at 0.001 per second.
fn limited(backend: Backend, tight: &[(&str, u32)]) -> ServerOptions {
    let mut options = ServerOptions::new(backend).env("OBMIN_RATE_LIMITS_ENABLED", "true");
    for class in CLASSES {
        let (per_second, burst) = match tight.iter().find(|(c, _)| c == class) {
            Some((_, burst)) => ("0.001".to_owned(), burst.to_string()),
            None => ("1000".to_owned(), "100000".to_owned()),
        };
        options = options
            .env(&format!("OBMIN_RATE_LIMITS_{class}_PER_SECOND"), &per_second)
            .env(&format!("OBMIN_RATE_LIMITS_{class}_BURST_COUNT"), &burst);
    }
    options
}

/// A 429 `M_LIMIT_EXCEEDED` that says when to come back, in the body and the header.
#[track_caller]
fn assert_limited(resp: &Response) {
    resp.assert_error(429, "M_LIMIT_EXCEEDED");
    let retry = resp.body["retry_after_ms"].as_u64().unwrap_or_else(|| panic!("retry_after_ms in {}", resp.body));
    // One action refills in 1000 s.
    assert!(retry > 100_000, "retry_after_ms = {retry}");
    let header = resp.headers.get("retry-after").expect("a Retry-After header").to_str().unwrap();
    assert!(header.parse::<u64>().is_ok_and(|s| s > 100), "Retry-After: {header}");
}

async fn send(server: &Server, user: &User, room: &str, txn: &str) -> Response {
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
            Some(&user.access_token),
            json!({"msgtype": "m.text", "body": txn}),
        )
        .await
}

async fn message_floods_are_refused_while_others_are_served(backend: Backend) {
    let server =
        limited(backend, &[("MESSAGE", 3)]).env("OBMIN_RATE_LIMITS_EXEMPT_USERS", "@bot:localhost").start().await;
    let mallory = server.register("mallory", "mallory-pass").await;
    let alice = server.register("alice", "alice-pass").await;
    let bot = server.register("bot", "bot-pass").await;
    let room = server.create_room(&alice, json!({"preset": "public_chat"})).await;
    for user in [&mallory, &bot] {
        server.join(user, &room).await.assert_ok();
    }

    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(send(&server, &mallory, &room, &format!("m{i}")).await.assert_ok()["event_id"].clone());
    }
    assert_limited(&send(&server, &mallory, &room, "m3").await);
    // A retry of a send that went through is answered with its event, not refused.
    assert_eq!(send(&server, &mallory, &room, "m1").await.assert_ok()["event_id"], sent[1]);
    // State events, redactions and profile changes are messages too.
    let state = server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room)),
            Some(&mallory.access_token),
            json!({"topic": "spam"}),
        )
        .await;
    assert_limited(&state);
    let redact = server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/redact/{}/r0", enc(&room), enc(sent[0].as_str().unwrap())),
            Some(&mallory.access_token),
            json!({}),
        )
        .await;
    assert_limited(&redact);
    let profile = server
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&mallory.user_id)),
            Some(&mallory.access_token),
            json!({"displayname": "spam"}),
        )
        .await;
    assert_limited(&profile);

    // Everybody else is served (to their own limit), and the exempt bot is never limited.
    for i in 0..3 {
        send(&server, &alice, &room, &format!("a{i}")).await.assert_ok();
    }
    for i in 0..20 {
        send(&server, &bot, &room, &format!("b{i}")).await.assert_ok();
    }
    // Nothing of mallory's refused sends reached the room.
    let messages = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(&room)), Some(&alice.access_token))
        .await;
    let bodies: Vec<&str> = messages.assert_ok()["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["sender"] == mallory.user_id.as_str())
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert!(!bodies.contains(&"m3"));
}

async fn room_creation_and_joins_are_limited(backend: Backend) {
    let server = limited(backend, &[("ROOM_CREATION", 2), ("JOINS_LOCAL", 2), ("JOINS_PER_ROOM", 2)]).start().await;
    let owner = server.register("owner", "owner-pass").await;
    let owner2 = server.register("owner2", "owner-pass").await;
    let mallory = server.register("mallory", "mallory-pass").await;

    let public = json!({"preset": "public_chat"});
    let r1 = server.create_room(&owner, public.clone()).await;
    let r2 = server.create_room(&owner, public.clone()).await;
    let third = server.post("/_matrix/client/v3/createRoom", Some(&owner.access_token), public.clone()).await;
    assert_limited(&third);
    let r3 = server.create_room(&owner2, public.clone()).await;
    let r4 = server.create_room(&owner2, public.clone()).await;

    // Joins per user.
    server.join(&mallory, &r1).await.assert_ok();
    server.join(&mallory, &r2).await.assert_ok();
    assert_limited(&server.join(&mallory, &r3).await);
    // Joining a room one is in already is not a join.
    server.join(&mallory, &r1).await.assert_ok();

    // Joins per room: two newcomers fill r3, a third waits, r4 still takes joins.
    let mut users = Vec::new();
    for name in ["bob", "carol", "dave"] {
        users.push(server.register(name, "pass-word").await);
    }
    server.join(&users[0], &r3).await.assert_ok();
    server.join(&users[1], &r3).await.assert_ok();
    assert_limited(&server.join(&users[2], &r3).await);
    server.join(&users[2], &r4).await.assert_ok();
    // The refused join left no membership behind.
    let members =
        server.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&r3)), Some(&owner2.access_token)).await;
    assert!(members.assert_ok()["joined"].get(users[2].user_id.as_str()).is_none());
}

/// Joins a room of `remote` through it.
async fn join_via(here: &Server, remote: &Server, user: &User, room: &str) -> Response {
    here.post(
        &format!("/_matrix/client/v3/join/{}?via={}", enc(room), enc(&remote.server_name)),
        Some(&user.access_token),
        json!({}),
    )
    .await
}

async fn joins_through_other_servers_are_limited(backend: Backend) {
    let remote = limited(backend, &[]).federating().start().await;
    let here = limited(backend, &[("JOINS_REMOTE", 1)]).federating().start().await;
    let owner = remote.register("owner", "owner-pass").await;
    let r1 = remote.create_room(&owner, json!({"preset": "public_chat"})).await;
    let r2 = remote.create_room(&owner, json!({"preset": "public_chat"})).await;
    let mallory = here.register("mallory", "mallory-pass").await;
    let alice = here.register("alice", "alice-pass").await;
    join_via(&here, &remote, &mallory, &r1).await.assert_ok();
    assert_limited(&join_via(&here, &remote, &mallory, &r2).await);
    join_via(&here, &remote, &alice, &r2).await.assert_ok();
    // The refused join never reached the other server.
    let members =
        remote.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&r2)), Some(&owner.access_token)).await;
    let joined = members.assert_ok()["joined"].clone();
    assert!(joined.get(alice.user_id.as_str()).is_some(), "{joined}");
    assert!(joined.get(mallory.user_id.as_str()).is_none(), "{joined}");
}

async fn invite(server: &Server, by: &User, room: &str, who: &User) -> Response {
    server.membership(by, room, "invite", Some(&who.user_id)).await
}

async fn invites_are_limited_per_issuer_room_and_invitee(backend: Backend) {
    let server =
        limited(backend, &[("INVITES_PER_ISSUER", 2), ("INVITES_PER_ROOM", 2), ("INVITES_PER_USER", 1)]).start().await;
    let mut users = Vec::new();
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        users.push(server.register(name, "pass-word").await);
    }
    let [alice, bob, carol, dave, erin] = &users[..] else { unreachable!() };
    let a1 = server.create_room(alice, json!({"preset": "public_chat"})).await;
    let a2 = server.create_room(alice, json!({"preset": "public_chat"})).await;
    let e1 = server.create_room(erin, json!({"preset": "private_chat"})).await;
    server.join(erin, &a1).await.assert_ok();

    invite(&server, alice, &a1, bob).await.assert_ok();
    // bob has had his one invite: not another, from anybody, into any room.
    assert_limited(&invite(&server, alice, &a2, bob).await);
    assert_limited(&invite(&server, erin, &e1, bob).await);
    invite(&server, alice, &a1, carol).await.assert_ok();
    // alice has used her two, and a1 has had its two.
    assert_limited(&invite(&server, alice, &a2, dave).await);
    assert_limited(&invite(&server, erin, &a1, dave).await);
    // erin, her room and dave are fresh: served. (The refused invites counted nowhere.)
    invite(&server, erin, &e1, dave).await.assert_ok();
    let sync = server.sync(dave, None, 0, None).await;
    let invited: Vec<&String> = sync["rooms"]["invite"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
    assert_eq!(invited, vec![&e1], "dave is invited to erin's room only");
}

async fn media_presence_and_key_requests_are_limited(backend: Backend) {
    let server = limited(backend, &[("MEDIA_CREATE", 2), ("PRESENCE_PER_USER", 1), ("KEY_REQUESTS", 2)]).start().await;
    let mallory = server.register("mallory", "mallory-pass").await;
    let alice = server.register("alice", "alice-pass").await;

    let upload = |user: &User| {
        let req = server
            .http
            .post(server.url("/_matrix/media/v3/upload?filename=a.txt"))
            .bearer_auth(&user.access_token)
            .header("content-type", "text/plain")
            .body("hello");
        async move { Server::read(req.send().await.expect("upload")).await }
    };
    upload(&mallory).await.assert_ok();
    server.post("/_matrix/media/v1/create", Some(&mallory.access_token), json!({})).await.assert_ok();
    assert_limited(&upload(&mallory).await);
    assert_limited(&server.post("/_matrix/media/v1/create", Some(&mallory.access_token), json!({})).await);
    upload(&alice).await.assert_ok();

    presence(&server, &mallory, "online").await.assert_ok();
    assert_limited(&presence(&server, &mallory, "unavailable").await);
    presence(&server, &alice, "online").await.assert_ok();

    key_request(&server, &mallory, &alice, "k0").await.assert_ok();
    key_request(&server, &mallory, &alice, "k1").await.assert_ok();
    assert_limited(&key_request(&server, &mallory, &alice, "k2").await);
    // Requests to one's own devices are not limited; other senders are served.
    for i in 0..5 {
        key_request(&server, &mallory, &mallory, &format!("own{i}")).await.assert_ok();
    }
    key_request(&server, &alice, &mallory, "a0").await.assert_ok();
}

async fn presence(server: &Server, user: &User, state: &str) -> Response {
    server
        .put(
            &format!("/_matrix/client/v3/presence/{}/status", enc(&user.user_id)),
            Some(&user.access_token),
            json!({"presence": state}),
        )
        .await
}

/// A room key request from `from` to every device of `to`.
async fn key_request(server: &Server, from: &User, to: &User, txn: &str) -> Response {
    let body = json!({"messages": {to.user_id.clone(): {"*": {
        "action": "request", "request_id": txn, "requesting_device_id": from.device_id,
        "body": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!r:localhost", "session_id": txn}
    }}}});
    server
        .request(
            Method::PUT,
            &format!("/_matrix/client/v3/sendToDevice/m.room_key_request/{txn}"),
            Some(&from.access_token),
            Some(body),
        )
        .await
}

async fn password_guesses_are_limited_per_account(backend: Backend) {
    let server = limited(backend, &[("LOGIN_FAILED_ATTEMPTS", 3)]).start().await;
    let alice = server.register("alice", "alice-pass").await;
    let bob = server.register("bob", "bob-pass").await;
    let carol = server.register("carol", "carol-pass").await;

    for guess in ["a", "b", "c"] {
        server.login("alice", guess).await.assert_error(403, "M_FORBIDDEN");
    }
    // Refused before the password is looked at: even the right one.
    assert_limited(&server.login("alice", "x").await);
    assert_limited(&server.login("alice", "alice-pass").await);
    // Other accounts are served.
    server.login("bob", "bob-pass").await.assert_ok();
    // alice's own session still works.
    server.get("/_matrix/client/v3/account/whoami", Some(&alice.access_token)).await.assert_ok();

    // The password stage of user-interactive auth counts the same way: a stolen token
    // does not open a way to guess carol's password.
    let path = "/_matrix/client/v3/account/password";
    let first = server.post(path, Some(&carol.access_token), json!({"new_password": "new-pass"})).await;
    let session = first.body["session"].as_str().expect("a UIA session").to_owned();
    let attempt = |password: &str| {
        server.post(
            path,
            Some(&carol.access_token),
            json!({"new_password": "new-pass", "auth": {"type": "m.login.password", "session": session,
                   "identifier": {"type": "m.id.user", "user": "carol"}, "password": password}}),
        )
    };
    for guess in ["a", "b", "c"] {
        let wrong = attempt(guess).await;
        assert_eq!(wrong.status, 401, "{}", wrong.body);
        assert_eq!(wrong.body["errcode"], "M_FORBIDDEN");
    }
    assert_limited(&attempt("carol-pass").await);
    // bob's account is not touched by any of this.
    server.login("bob", "bob-pass").await.assert_ok();
    let _ = bob;
}

async fn registration_token_guesses_are_limited(backend: Backend) {
    let server =
        limited(backend, &[("REGISTRATION_TOKEN_VALIDITY", 3)]).env("OBMIN_REGISTRATION", "token").start().await;
    let out = server.cli(&["registration-token", "create", "--token", "letmein"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
    for guess in ["a", "b"] {
        assert_eq!(server.get(&format!("{validity}?token={guess}"), None).await.assert_ok()["valid"], false);
    }
    // The registration's token stage counts too.
    let register = "/_matrix/client/v3/register";
    let first = server.post(register, None, json!({"username": "mallory", "password": "pass-word"})).await;
    let session = first.body["session"].as_str().expect("a UIA session").to_owned();
    let with_token = |token: &str| {
        json!({"username": "mallory", "password": "pass-word",
               "auth": {"type": "m.login.registration_token", "token": token, "session": session}})
    };
    let wrong = server.post(register, None, with_token("c")).await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    // Out of guesses, even the right token is refused from this address.
    assert_limited(&server.get(&format!("{validity}?token=letmein"), None).await);
    assert_limited(&server.post(register, None, with_token("letmein")).await);
    let check: Value = server.get("/_matrix/client/v3/register/available?username=mallory", None).await.body;
    assert_eq!(check["available"], true, "mallory was not registered: {check}");
}

async fn a_spoofed_forwarded_for_does_not_escape_the_address_limit(backend: Backend) {
    // The test client connects from 127.0.0.1, which plays the trusted reverse proxy; first
    // named in `trusted_proxies`, then as "every peer is a proxy" (`trust_x_forwarded_for`).
    for trust in [("OBMIN_TRUSTED_PROXIES", "127.0.0.1"), ("OBMIN_TRUST_X_FORWARDED_FOR", "true")] {
        let server = limited(backend, &[("LOGIN_ADDRESS", 2)]).env(trust.0, trust.1).start().await;
        let login = |forwarded: &str| {
            let req = server
                .http
                .post(server.url("/_matrix/client/v3/login"))
                .header("x-forwarded-for", forwarded)
                .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "nobody"},
                              "password": "guess"}));
            async move { Server::read(req.send().await.expect("login")).await }
        };
        // The attacker at 203.0.113.7 writes a new left-most address into every request;
        // the proxy appends the real one.
        for i in 0..2 {
            login(&format!("198.51.100.{i}, 203.0.113.7")).await.assert_error(403, "M_FORBIDDEN");
        }
        assert_limited(&login("198.51.100.99, 203.0.113.7").await);
        assert_limited(&login("203.0.113.7").await);
        // Another client behind the same proxy is served.
        login("203.0.113.8").await.assert_error(403, "M_FORBIDDEN");
    }
}
