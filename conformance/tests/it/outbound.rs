//! What anyone can make this server ask of other servers, and what it accepts back: lookups
//! of remote profiles, aliases and room directories only for signed-in users, kept briefly
//! and asked once; each kind of answer capped while it streams in; the notary contacting only
//! a few origins per request and honouring the key-fetch backoff; remote keys trusted for at
//! most 7 days after we fetched them. A hostile server (conformance::hostile) counts what it
//! is asked.

use conformance::{
    Backend, ServerOptions, backend_tests, enc,
    hostile::{Endpoint, HostileServer, Reply},
};
use reqwest::Method;
use serde_json::{Value, json};

/// Days, in milliseconds.
const DAY_MS: i64 = 24 * 3600 * 1000;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Without an access token, no lookup reaches another server; with one, the first lookup
/// does and the next one (within a minute) is answered from what the first brought.
async fn remote_lookups_need_sign_in_and_are_asked_once(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    let room_on_h = format!("!room:{}", h.server_name());
    h.on(Endpoint::Query, {
        let room_on_h = room_on_h.clone();
        move |req| match req.args.first().map(String::as_str) {
            Some("profile") => Reply::ok(json!({"displayname": "Mallory", "avatar_url": "mxc://h/x"})),
            Some("directory") => Reply::ok(json!({"room_id": room_on_h, "servers": ["elsewhere.example"]})),
            _ => Reply::error(404, "M_NOT_FOUND", "no"),
        }
    });
    h.on(Endpoint::PublicRooms, |_| Reply::ok(json!({"chunk": [], "total_room_count_estimate": 0})));

    let mallory = h.user("mallory");
    let alias = format!("#lobby:{}", h.server_name());
    let lookups = [
        format!("/_matrix/client/v3/profile/{}", enc(&mallory)),
        format!("/_matrix/client/v3/profile/{}/displayname", enc(&mallory)),
        format!("/_matrix/client/v3/directory/room/{}", enc(&alias)),
        format!("/_matrix/client/v3/publicRooms?server={}", enc(h.server_name().as_str())),
    ];
    for path in &lookups {
        a.get(path, None).await.assert_error(401, "M_MISSING_TOKEN");
    }
    assert!(h.requests(Endpoint::Query).is_empty(), "an anonymous lookup reached the other server");
    assert!(h.requests(Endpoint::PublicRooms).is_empty(), "an anonymous directory lookup reached the other server");

    let profile = a.get(&lookups[0], Some(&alice.access_token)).await;
    assert_eq!(profile.assert_ok()["displayname"], "Mallory");
    let name = a.get(&lookups[1], Some(&alice.access_token)).await;
    assert_eq!(name.assert_ok()["displayname"], "Mallory");
    let room = a.get(&lookups[2], Some(&alice.access_token)).await;
    assert_eq!(room.assert_ok()["room_id"], Value::String(room_on_h.clone()));
    a.get(&lookups[3], Some(&alice.access_token)).await.assert_ok();
    let asked = h.requests(Endpoint::Query).len();
    assert_eq!(asked, 3, "one query each for the profile, the field and the alias");
    assert_eq!(h.requests(Endpoint::PublicRooms).len(), 1);

    // The same lookups again, a hundred times between them: answered from the first answers.
    for round in 0..25 {
        for path in &lookups {
            let answer = a.get(path, Some(&alice.access_token)).await;
            assert_eq!(answer.status, 200, "round {round}, {path}: {}", answer.body);
        }
    }
    assert_eq!(h.requests(Endpoint::Query).len(), asked, "kept lookups were asked again");
    assert_eq!(h.requests(Endpoint::PublicRooms).len(), 1, "a kept directory page was asked again");

    // Our own users' profiles stay readable by anyone.
    a.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await.assert_ok();
}

/// A profile answer far larger than any profile is cut off while it streams in: the client
/// gets a 502 that says nothing of the other server's internals.
async fn an_oversized_profile_answer_is_refused(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "password-alice-1").await;
    let h = HostileServer::start().await;
    h.on(Endpoint::Query, |_| Reply::ok(json!({"displayname": "x".repeat(200 * 1024)})));
    // Read raw: the plain helpers take any 5xx for a failure of ours.
    let url = a.url(&format!("/_matrix/client/v3/profile/{}", enc(&h.user("mallory"))));
    let answer = a.http.get(url).bearer_auth(&alice.access_token).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 502);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(!error.contains("bytes") && !error.contains(h.server_name().as_str()), "internal detail in {error}");
    assert_eq!(h.requests(Endpoint::Query).len(), 1);
}

/// A notary request about many servers contacts at most a few of their origins, and asking
/// again at once about a server whose keys it just fetched does not fetch them again.
async fn the_notary_bounds_what_it_fetches(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let origins: Vec<HostileServer> = futures_util::future::join_all((0..12).map(|_| HostileServer::start())).await;
    // Later than any key document is valid: nothing cached is fresh enough.
    let far = now_ms() + 60 * DAY_MS;
    let query: serde_json::Map<String, Value> = origins
        .iter()
        .map(|h| (h.server_name().to_string(), json!({"ed25519:hostile": {"minimum_valid_until_ts": far}})))
        .collect();
    let asker = HostileServer::start().await;
    let (status, answer) =
        asker.request(&a, Method::POST, "/_matrix/key/v2/query", Some(json!({"server_keys": query}))).await;
    assert_eq!(status, 200, "{answer}");
    let contacted = origins.iter().filter(|h| !h.requests(Endpoint::Keys).is_empty()).count();
    assert!((1..=8).contains(&contacted), "one notary request contacted {contacted} origins");
    let keys = answer["server_keys"].as_array().map_or(0, Vec::len);
    assert_eq!(keys, contacted, "the answer holds the documents it fetched: {answer}");

    // Again for one it just fetched: within the backoff, answered from what it holds.
    let fetched = origins.iter().find(|h| !h.requests(Endpoint::Keys).is_empty()).unwrap();
    let one =
        json!({"server_keys": {fetched.server_name().as_str(): {"ed25519:hostile": {"minimum_valid_until_ts": far}}}});
    let (status, answer) = asker.request(&a, Method::POST, "/_matrix/key/v2/query", Some(one)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["server_keys"].as_array().map_or(0, Vec::len), 1, "{answer}");
    assert_eq!(fetched.requests(Endpoint::Keys).len(), 1, "the notary fetched the same keys again at once");
}

/// A key document that claims to be valid for a century is trusted for 7 days after we
/// fetched it: past that, the origin is asked again before its signatures count.
async fn remote_keys_are_trusted_for_seven_days_after_fetch(backend: Backend) {
    let mut a = ServerOptions::new(backend).federating().start().await;
    let h = HostileServer::start().await;
    let (status, answer) =
        h.get(&a, &format!("/_matrix/federation/v1/query/profile?user_id={}", enc("@nobody:x"))).await;
    assert!(status < 500, "{answer}");
    assert_eq!(h.requests(Endpoint::Keys).len(), 1, "the first signed request fetches the keys");

    let name = h.server_name().to_string().replace('\'', "''");
    let century = now_ms() + 36_500 * DAY_MS;
    let fetched = now_ms() - 8 * DAY_MS;
    a.run_sql(&format!(
        "UPDATE server_keys SET valid_until_ts = {century}, fetched_ts = {fetched} WHERE server_name = '{name}'"
    ))
    .await;
    // A restart forgets the in-memory fetch backoff, not the cached keys.
    a.restart().await;
    let (status, answer) =
        h.get(&a, &format!("/_matrix/federation/v1/query/profile?user_id={}", enc("@nobody:x"))).await;
    assert!(status < 500, "{answer}");
    assert_eq!(h.requests(Endpoint::Keys).len(), 2, "a key fetched 8 days ago was trusted without asking again");
}

backend_tests!(
    remote_lookups_need_sign_in_and_are_asked_once,
    an_oversized_profile_answer_is_refused,
    the_notary_bounds_what_it_fetches,
    remote_keys_are_trusted_for_seven_days_after_fetch,
);
