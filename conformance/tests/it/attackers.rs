//! Hostile users against every client endpoint that reads or changes a room: a plain member,
//! former members (one who left, one who was kicked), a banned user, an invitee who never
//! joined and a user who was never in the room.
//!
//! Every refusal is checked for its exact status and errcode; afterwards the room reads back
//! unchanged to its admin, and nothing sent after an attacker lost access (every such event
//! carries the marker `SECRET`, and its event id is known) appears in anything they can read.

use conformance::{
    Backend, Server, ServerOptions, User, backend_tests, enc,
    hostile::{Draft, HostileServer},
};
use reqwest::Method;
use serde_json::{Value, json};

backend_tests!(
    outsiders_cannot_change_a_room,
    outsiders_cannot_read_what_came_after_them,
    plain_member_cannot_moderate_or_take_power,
    moderator_cannot_exceed_own_power,
    version_12_creators_hold_power_from_the_create_event,
    transaction_ids_are_scoped_per_room_and_endpoint,
    a_remote_invite_cannot_name_the_creator_of_our_room,
);

const V3: &str = "/_matrix/client/v3";
const V1: &str = "/_matrix/client/v1";
const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// One request an attacker makes and the refusal it must get.
struct Attempt {
    what: &'static str,
    method: Method,
    path: String,
    body: Option<Value>,
    status: u16,
    errcode: &'static str,
}

/// An attempt refused with `status`: 403 `M_FORBIDDEN` or 404 `M_NOT_FOUND` (others name
/// their errcode with [`Attempt::code`]).
fn attempt(what: &'static str, method: Method, path: String, body: Option<Value>, status: u16) -> Attempt {
    let errcode = match status {
        403 => "M_FORBIDDEN",
        404 => "M_NOT_FOUND",
        _ => "",
    };
    Attempt { what, method, path, body, status, errcode }
}

impl Attempt {
    fn code(mut self, errcode: &'static str) -> Self {
        self.errcode = errcode;
        self
    }
}

async fn run_attempts(server: &Server, who: &str, user: &User, attempts: &[Attempt]) {
    for a in attempts {
        let resp = server.request(a.method.clone(), &a.path, Some(&user.access_token), a.body.clone()).await;
        assert!(
            resp.status.as_u16() == a.status && resp.body["errcode"] == a.errcode && resp.body["error"].is_string(),
            "{who}: {} ({} {}) should be {} {}, got {} {}",
            a.what,
            a.method,
            a.path,
            a.status,
            a.errcode,
            resp.status,
            resp.body
        );
    }
}

fn txn() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("attack{}", N.fetch_add(1, Ordering::Relaxed))
}

async fn send(server: &Server, user: &User, room: &str, content: Value) -> String {
    let path = format!("{V3}/rooms/{}/send/m.room.message/{}", enc(room), txn());
    server.put(&path, Some(&user.access_token), content).await.assert_ok()["event_id"].as_str().unwrap().to_owned()
}

async fn put_state(server: &Server, user: &User, room: &str, kind: &str, key: &str, content: Value) -> String {
    let path = format!("{V3}/rooms/{}/state/{kind}/{}", enc(room), enc(key));
    server.put(&path, Some(&user.access_token), content).await.assert_ok()["event_id"].as_str().unwrap().to_owned()
}

async fn membership_call(server: &Server, by: &User, room: &str, action: &str, target: Option<&User>) {
    let body = match target {
        Some(t) => json!({"user_id": t.user_id}),
        None => json!({}),
    };
    server.post(&format!("{V3}/rooms/{}/{action}", enc(room)), Some(&by.access_token), body).await.assert_ok();
}

/// The room as its admin reads it: every current state event id, the newest events, the
/// joined members, the directory entry and aliases, and the typing and receipts of the
/// room in the admin's initial sync.
async fn snapshot(server: &Server, admin: &User, room: &str, alias: &str) -> Value {
    let r = enc(room);
    let token = Some(admin.access_token.as_str());
    let state = format!("{:?}", server.room_state(admin, room).await);
    let newest: Vec<Value> =
        server.get(&format!("{V3}/rooms/{r}/messages?dir=b&limit=20"), token).await.assert_ok()["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| json!([e["event_id"], e["redacted_because"], e["unsigned"]["redacted_because"]]))
            .collect();
    let joined = server.get(&format!("{V3}/rooms/{r}/joined_members"), token).await.assert_ok()["joined"].clone();
    let visibility = server.get(&format!("{V3}/directory/list/room/{r}"), None).await.assert_ok().clone();
    let alias = server.get(&format!("{V3}/directory/room/{}", enc(alias)), None).await.assert_ok().clone();
    let sync = server.sync(admin, None, 0, None).await;
    let ephemeral = sync["rooms"]["join"][room]["ephemeral"]["events"].clone();
    json!({"state": state, "newest": newest, "joined": joined, "visibility": visibility, "alias": alias,
           "ephemeral": ephemeral})
}

/// The cast of a room with a history: `admin` made it (invite only, history `shared`);
/// `member` is in it; `left` left, `kicked` was kicked (after being given moderator power,
/// which stays in the power levels), `banned` was banned, `invitee` is invited but never
/// joined, `outsider` was never in it. After they lost access the admin wrote the `SECRET`
/// events, whose ids are in `secrets`.
struct Cast {
    server: Server,
    admin: User,
    member: User,
    left: User,
    kicked: User,
    banned: User,
    invitee: User,
    outsider: User,
    room: String,
    alias: String,
    /// Sent while everybody (but the invitee and the outsider) was in the room.
    early: String,
    /// A thread root from the same time; its replies and edits after are secret.
    root: String,
    /// An event of `left`, from before they left.
    left_own: String,
    /// A message from before anybody left that only got thread replies after.
    late_root: String,
    /// A reply in the root's thread and an edit of `early`, from before anybody left.
    old_reply: String,
    old_edit: String,
    secrets: Vec<String>,
}

async fn cast(backend: Backend) -> Cast {
    let server = Server::start(backend).await;
    let admin = server.register("admin", "admin-pass").await;
    let member = server.register("member", "member-pass").await;
    let left = server.register("left", "left-pass").await;
    let kicked = server.register("kicked", "kicked-pass").await;
    let banned = server.register("banned", "banned-pass").await;
    let invitee = server.register("invitee", "invitee-pass").await;
    let outsider = server.register("outsider", "outsider-pass").await;
    let room = server
        .create_room(&admin, json!({"preset": "private_chat", "name": "Plans", "room_alias_name": "plans"}))
        .await;
    for user in [&member, &left, &kicked, &banned] {
        membership_call(&server, &admin, &room, "invite", Some(user)).await;
        server.join(user, &room).await.assert_ok();
    }
    // The kicked user is a moderator first: power that outlives their membership.
    let pl_path = format!("{V3}/rooms/{}/state/m.room.power_levels/", enc(&room));
    let mut pl = server.get(&pl_path, Some(&admin.access_token)).await.assert_ok().clone();
    pl["users"][&kicked.user_id] = json!(50);
    server.put(&pl_path, Some(&admin.access_token), pl).await.assert_ok();

    let early = send(&server, &admin, &room, json!({"msgtype": "m.text", "body": "early, for everybody"})).await;
    let root = send(&server, &admin, &room, json!({"msgtype": "m.text", "body": "thread root"})).await;
    let left_own = send(&server, &left, &room, json!({"msgtype": "m.text", "body": "mine"})).await;
    // A message everybody saw that becomes a thread root only after they left.
    let late_root = send(&server, &admin, &room, json!({"msgtype": "m.text", "body": "answered later"})).await;
    // A thread reply and an edit everybody saw: what former members' bundles must show.
    let old_reply = send(
        &server,
        &admin,
        &room,
        json!({"msgtype": "m.text", "body": "old reply", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
    )
    .await;
    let old_edit = send(
        &server,
        &admin,
        &room,
        json!({"msgtype": "m.text", "body": "* old edit", "m.new_content": {"msgtype": "m.text", "body": "old edit"},
               "m.relates_to": {"rel_type": "m.replace", "event_id": early}}),
    )
    .await;

    membership_call(&server, &left, &room, "leave", None).await;
    membership_call(&server, &admin, &room, "kick", Some(&kicked)).await;
    membership_call(&server, &admin, &room, "ban", Some(&banned)).await;
    membership_call(&server, &admin, &room, "invite", Some(&invitee)).await;

    // After: messages, a thread reply, an edit and a reference to events the former members
    // saw, a secret state event, a receipt on a secret event.
    let mut secrets = Vec::new();
    secrets.push(send(&server, &admin, &room, json!({"msgtype": "m.text", "body": "SECRET plan"})).await);
    secrets.push(
        send(
            &server,
            &admin,
            &room,
            json!({"msgtype": "m.text", "body": "SECRET reply",
                   "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
        )
        .await,
    );
    secrets.push(
        send(
            &server,
            &admin,
            &room,
            json!({"msgtype": "m.text", "body": "* SECRET edit",
                   "m.new_content": {"msgtype": "m.text", "body": "SECRET edit"},
                   "m.relates_to": {"rel_type": "m.replace", "event_id": early}}),
        )
        .await,
    );
    secrets.push(
        send(
            &server,
            &admin,
            &room,
            json!({"msgtype": "m.text", "body": "SECRET reference",
                   "m.relates_to": {"rel_type": "m.reference", "event_id": root}}),
        )
        .await,
    );
    secrets.push(put_state(&server, &admin, &room, "org.example.secret", "", json!({"plan": "SECRET state"})).await);
    secrets.push(
        send(
            &server,
            &admin,
            &room,
            json!({"msgtype": "m.text", "body": "SECRET answer",
                   "m.relates_to": {"rel_type": "m.thread", "event_id": late_root}}),
        )
        .await,
    );
    let last = secrets[0].clone();
    server
        .post(
            &format!("{V3}/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)),
            Some(&member.access_token),
            json!({}),
        )
        .await
        .assert_ok();
    Cast {
        server,
        admin,
        member,
        left,
        kicked,
        banned,
        invitee,
        outsider,
        room,
        alias: "#plans:localhost".to_owned(),
        early,
        root,
        left_own,
        late_root,
        old_reply,
        old_edit,
        secrets,
    }
}

impl Cast {
    /// Fails if `text` (anything an attacker read) shows a secret event or its content.
    #[track_caller]
    fn assert_no_secret(&self, who: &str, what: &str, text: &str) {
        assert!(!text.contains("SECRET"), "{who} read secret content through {what}: {text}");
        for id in &self.secrets {
            assert!(!text.contains(id.as_str()), "{who} learned the secret event {id} through {what}: {text}");
        }
    }
}

/// Everything that changes a room, tried by users who are not (or no longer) in it.
async fn outsiders_cannot_change_a_room(backend: Backend) {
    let c = cast(backend).await;
    let s = &c.server;
    let r = enc(&c.room);
    let before = snapshot(s, &c.admin, &c.room, &c.alias).await;
    let attackers = [("left", &c.left), ("kicked", &c.kicked), ("banned", &c.banned), ("outsider", &c.outsider)];
    for (who, user) in attackers {
        let me = enc(&user.user_id);
        let attempts = vec![
            attempt(
                "send a message",
                Method::PUT,
                format!("{V3}/rooms/{r}/send/m.room.message/{}", txn()),
                Some(json!({"msgtype": "m.text", "body": "let me in"})),
                403,
            ),
            attempt(
                "send a custom event",
                Method::PUT,
                format!("{V3}/rooms/{r}/send/org.example.custom/{}", txn()),
                Some(json!({"x": 1})),
                403,
            ),
            attempt(
                "send a reaction",
                Method::PUT,
                format!("{V3}/rooms/{r}/send/m.reaction/{}", txn()),
                Some(json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": c.early, "key": "x"}})),
                403,
            ),
            attempt(
                "rename the room",
                Method::PUT,
                format!("{V3}/rooms/{r}/state/m.room.name/"),
                Some(json!({"name": "mine"})),
                403,
            ),
            attempt(
                "send a custom state event under their own id",
                Method::PUT,
                format!("{V3}/rooms/{r}/state/org.example.state/{me}"),
                Some(json!({"x": 1})),
                403,
            ),
            attempt(
                "join by writing their own member event",
                Method::PUT,
                format!("{V3}/rooms/{r}/state/m.room.member/{me}"),
                Some(json!({"membership": "join"})),
                403,
            ),
            attempt(
                "open the room",
                Method::PUT,
                format!("{V3}/rooms/{r}/state/m.room.join_rules/"),
                Some(json!({"join_rule": "public"})),
                403,
            ),
            attempt(
                "redact the admin's event",
                Method::PUT,
                format!("{V3}/rooms/{r}/redact/{}/{}", enc(&c.early), txn()),
                Some(json!({"reason": "gone"})),
                403,
            ),
            attempt(
                "redact their own old event",
                Method::PUT,
                format!("{V3}/rooms/{r}/redact/{}/{}", enc(&c.left_own), txn()),
                Some(json!({})),
                403,
            ),
            attempt(
                "invite themselves",
                Method::POST,
                format!("{V3}/rooms/{r}/invite"),
                Some(json!({"user_id": user.user_id})),
                403,
            ),
            attempt(
                "invite somebody else",
                Method::POST,
                format!("{V3}/rooms/{r}/invite"),
                Some(json!({"user_id": c.outsider.user_id})),
                403,
            ),
            attempt(
                "kick a member",
                Method::POST,
                format!("{V3}/rooms/{r}/kick"),
                Some(json!({"user_id": c.member.user_id})),
                403,
            ),
            attempt(
                "ban a member",
                Method::POST,
                format!("{V3}/rooms/{r}/ban"),
                Some(json!({"user_id": c.member.user_id})),
                403,
            ),
            attempt(
                "unban the banned user",
                Method::POST,
                format!("{V3}/rooms/{r}/unban"),
                Some(json!({"user_id": c.banned.user_id})),
                403,
            ),
            attempt("join the invite-only room", Method::POST, format!("{V3}/join/{r}"), Some(json!({})), 403),
            attempt("join by room id", Method::POST, format!("{V3}/rooms/{r}/join"), Some(json!({})), 403),
            attempt("join by alias", Method::POST, format!("{V3}/join/{}", enc(&c.alias)), Some(json!({})), 403),
            attempt(
                "leave a room they are not in",
                Method::POST,
                format!("{V3}/rooms/{r}/leave"),
                Some(json!({})),
                403,
            ),
            attempt(
                "type",
                Method::PUT,
                format!("{V3}/rooms/{r}/typing/{me}"),
                Some(json!({"typing": true, "timeout": 30000})),
                403,
            ),
            attempt(
                "send a read receipt",
                Method::POST,
                format!("{V3}/rooms/{r}/receipt/m.read/{}", enc(&c.early)),
                Some(json!({})),
                403,
            ),
            attempt(
                "set read markers",
                Method::POST,
                format!("{V3}/rooms/{r}/read_markers"),
                Some(json!({"m.fully_read": c.early, "m.read": c.early})),
                403,
            ),
            attempt(
                "add an alias",
                Method::PUT,
                format!("{V3}/directory/room/{}", enc(&format!("#by-{}:localhost", user.localpart))),
                Some(json!({"room_id": c.room})),
                403,
            ),
            attempt(
                "publish the room in the directory",
                Method::PUT,
                format!("{V3}/directory/list/room/{r}"),
                Some(json!({"visibility": "public"})),
                403,
            ),
            attempt(
                "delete the admin's alias",
                Method::DELETE,
                format!("{V3}/directory/room/{}", enc(&c.alias)),
                None,
                403,
            ),
            attempt(
                "upgrade the room",
                Method::POST,
                format!("{V3}/rooms/{r}/upgrade"),
                Some(json!({"new_version": "11"})),
                403,
            ),
            attempt(
                "set the admin's room tags",
                Method::PUT,
                format!("{V3}/user/{}/rooms/{r}/tags/u.work", enc(&c.admin.user_id)),
                Some(json!({})),
                403,
            ),
            attempt(
                "set the admin's room account data",
                Method::PUT,
                format!("{V3}/user/{}/rooms/{r}/account_data/org.example", enc(&c.admin.user_id)),
                Some(json!({"x": 1})),
                403,
            ),
        ];
        run_attempts(s, who, user, &attempts).await;
    }
    // The invitee may join (and only that); before that, no writes either.
    let me = enc(&c.invitee.user_id);
    run_attempts(
        s,
        "invitee",
        &c.invitee,
        &[
            attempt(
                "send before joining",
                Method::PUT,
                format!("{V3}/rooms/{r}/send/m.room.message/{}", txn()),
                Some(json!({"msgtype": "m.text", "body": "hi"})),
                403,
            ),
            attempt(
                "type before joining",
                Method::PUT,
                format!("{V3}/rooms/{r}/typing/{me}"),
                Some(json!({"typing": true, "timeout": 30000})),
                403,
            ),
            attempt(
                "receipt before joining",
                Method::POST,
                format!("{V3}/rooms/{r}/receipt/m.read/{}", enc(&c.early)),
                Some(json!({})),
                403,
            ),
            attempt(
                "publish before joining",
                Method::PUT,
                format!("{V3}/directory/list/room/{r}"),
                Some(json!({"visibility": "public"})),
                403,
            ),
        ],
    )
    .await;
    // Reporting and the other optional room endpoints are not served: the client learns
    // that, nothing else.
    for path in [
        format!("{V3}/rooms/{r}/report/{}", enc(&c.early)),
        format!("{V3}/rooms/{r}/report"),
        format!("{V3}/rooms/{r}/initialSync"),
        format!("{V1}/rooms/{r}/timestamp_to_event?ts=0&dir=f"),
    ] {
        let method = if path.contains("report") { Method::POST } else { Method::GET };
        let body = (method == Method::POST).then(|| json!({"reason": "spam"}));
        s.request(method, &path, Some(&c.outsider.access_token), body).await.assert_error(404, "M_UNRECOGNIZED");
    }

    let after = snapshot(s, &c.admin, &c.room, &c.alias).await;
    assert_eq!(before, after, "the attempts changed the room");
    // Nobody got an alias, the attempted aliases included.
    for who in ["left", "kicked", "banned", "outsider"] {
        s.get(&format!("{V3}/directory/room/{}", enc(&format!("#by-{who}:localhost"))), None)
            .await
            .assert_error(404, "M_NOT_FOUND");
    }
    // The kicked moderator's power is still in the power levels (the check must be the
    // membership, not only the level): the room stays out of the public directory.
    let public = s.get(&format!("{V3}/publicRooms"), None).await;
    assert_eq!(public.assert_ok()["chunk"], json!([]));
}

/// What former members, a banned user, an invitee and an outsider can read: history up to
/// their leave at most (as history visibility `shared` allows), never what came after.
async fn outsiders_cannot_read_what_came_after_them(backend: Backend) {
    let c = cast(backend).await;
    let s = &c.server;
    let r = enc(&c.room);
    // The member is typing while the others read.
    s.put(
        &format!("{V3}/rooms/{r}/typing/{}", enc(&c.member.user_id)),
        Some(&c.member.access_token),
        json!({"typing": true, "timeout": 60000}),
    )
    .await
    .assert_ok();

    // The detector works: the member reads the secrets through the same endpoints.
    let seen = s.get(&format!("{V3}/rooms/{r}/messages?dir=b&limit=50"), Some(&c.member.access_token)).await;
    assert!(seen.assert_ok().to_string().contains("SECRET plan"));
    let root = s.get(&format!("{V3}/rooms/{r}/event/{}", enc(&c.root)), Some(&c.member.access_token)).await;
    assert!(root.assert_ok().to_string().contains(&c.secrets[1]), "the thread summary names the reply: {}", root.body);

    let formers = [("left", &c.left), ("kicked", &c.kicked), ("banned", &c.banned)];
    let strangers = [("invitee", &c.invitee), ("outsider", &c.outsider)];
    for (who, user) in strangers.iter().chain(formers.iter()) {
        let former = formers.iter().any(|(w, _)| w == who);
        let token = Some(user.access_token.as_str());
        let read = |path: String| async move { s.get(&path, token).await };

        // /messages: a former member reads up to their leave, the others nothing.
        let messages = read(format!("{V3}/rooms/{r}/messages?dir=b&limit=50")).await;
        if former {
            let text = messages.assert_ok().to_string();
            c.assert_no_secret(who, "/messages", &text);
            assert!(text.contains(&c.early), "{who} may read the history they were there for: {text}");
            let forward = read(format!("{V3}/rooms/{r}/messages?dir=f&limit=50")).await;
            c.assert_no_secret(who, "/messages forwards", &forward.assert_ok().to_string());
        } else {
            messages.assert_error(403, "M_FORBIDDEN");
        }
        // /event: the secrets are not found; the early event only by former members.
        for id in &c.secrets {
            read(format!("{V3}/rooms/{r}/event/{}", enc(id))).await.assert_error(404, "M_NOT_FOUND");
            read(format!("{V3}/rooms/{r}/context/{}", enc(id))).await.assert_error(404, "M_NOT_FOUND");
            read(format!("{V1}/rooms/{r}/relations/{}", enc(id))).await.assert_error(404, "M_NOT_FOUND");
        }
        let early = read(format!("{V3}/rooms/{r}/event/{}", enc(&c.early))).await;
        let root = read(format!("{V3}/rooms/{r}/event/{}", enc(&c.root))).await;
        let context = read(format!("{V3}/rooms/{r}/context/{}?limit=50", enc(&c.early))).await;
        let relations = read(format!("{V1}/rooms/{r}/relations/{}", enc(&c.root))).await;
        let thread = read(format!("{V1}/rooms/{r}/relations/{}/m.thread", enc(&c.root))).await;
        if former {
            for (what, resp) in [
                ("/event", &early),
                ("/event of the thread root", &root),
                ("/context", &context),
                ("/relations", &relations),
                ("/relations m.thread", &thread),
            ] {
                c.assert_no_secret(who, what, &resp.assert_ok().to_string());
            }
            // The bundles are made of what they saw: the old reply (one), the old edit.
            let thread = &root.body["unsigned"]["m.relations"]["m.thread"];
            assert_eq!(thread["latest_event"]["event_id"], c.old_reply.as_str(), "{who}: {}", root.body);
            assert_eq!(thread["count"], 1, "{who}: {}", root.body);
            let edit = &early.body["unsigned"]["m.relations"]["m.replace"];
            assert_eq!(edit["event_id"], c.old_edit.as_str(), "{who}: {}", early.body);
        } else {
            for resp in [&early, &root, &context, &relations, &thread] {
                resp.assert_error(404, "M_NOT_FOUND");
            }
        }
        let threads = read(format!("{V1}/rooms/{r}/threads")).await;
        if former {
            let text = threads.assert_ok().to_string();
            c.assert_no_secret(who, "/threads", &text);
            // Their thread, not the one that began after they left.
            assert!(text.contains(&c.root), "{who} sees the thread they took part in: {text}");
            assert!(!text.contains(&c.late_root), "{who} learns of a thread begun after they left: {text}");
        } else {
            threads.assert_error(403, "M_FORBIDDEN");
        }
        // State and members: joined members only.
        for path in [
            format!("{V3}/rooms/{r}/state"),
            format!("{V3}/rooms/{r}/state/m.room.name/"),
            format!("{V3}/rooms/{r}/state/org.example.secret/"),
            format!("{V3}/rooms/{r}/members"),
            format!("{V3}/rooms/{r}/joined_members"),
        ] {
            read(path).await.assert_error(403, "M_FORBIDDEN");
        }
        // Search finds nothing of the room.
        let search = s
            .post(
                &format!("{V3}/search"),
                token,
                json!({"search_categories": {"room_events": {"search_term": "SECRET"}}}),
            )
            .await;
        let results = &search.assert_ok()["search_categories"]["room_events"];
        assert!(results["results"].as_array().is_none_or(Vec::is_empty), "{who} found secrets: {results}");
        assert_eq!(results["count"], 0, "{who}: {results}");

        // /sync: never the room as joined; former members see their leave and what came
        // before it, the invitee the invite; no typing, receipts or secrets.
        let filter = json!({"room": {"include_leave": true}});
        let sync = s.sync(user, None, 0, Some(filter)).await;
        assert!(sync["rooms"]["join"].get(&c.room).is_none(), "{who} syncs the room as joined: {sync}");
        let text = sync.to_string();
        c.assert_no_secret(who, "/sync", &text);
        assert!(!text.contains("m.typing") && !text.contains("m.receipt"), "{who} sees ephemeral data: {text}");
        if former {
            assert!(sync["rooms"]["leave"].get(&c.room).is_some(), "{who} sees the leave: {sync}");
        } else if *who == "invitee" {
            assert!(sync["rooms"]["invite"].get(&c.room).is_some(), "{who} sees the invite: {sync}");
        }

        // Sliding sync with every extension: the invitee's invite at most.
        let body = json!({
            "lists": {"all": {"ranges": [[0, 20]], "timeline_limit": 50, "required_state": [["*", "*"]]}},
            "room_subscriptions": {(c.room.as_str()): {"timeline_limit": 50, "required_state": [["*", "*"]]}},
            "extensions": {"receipts": {"enabled": true}, "typing": {"enabled": true},
                           "account_data": {"enabled": true}},
        });
        let sliding = s.post(&format!("{SLIDING}?timeout=0"), token, body).await;
        let text = sliding.assert_ok().to_string();
        c.assert_no_secret(who, "sliding sync", &text);
        for extension in ["typing", "receipts"] {
            let rooms = &sliding.body["extensions"][extension]["rooms"];
            assert!(rooms.get(&c.room).is_none(), "{who} reads the room's {extension}: {text}");
        }
        let rooms = sliding.body["rooms"].as_object().cloned().unwrap_or_default();
        if *who == "invitee" {
            let room = rooms.get(&c.room).cloned().unwrap_or_default();
            assert!(room["timeline"].as_array().is_none_or(Vec::is_empty), "{who}: {room}");
        } else {
            assert!(!rooms.contains_key(&c.room), "{who} sees the room in sliding sync: {text}");
        }

        // Directory: the room is not listed; its visibility is public knowledge.
        let public = s.get(&format!("{V3}/publicRooms"), token).await;
        assert_eq!(public.assert_ok()["chunk"], json!([]));
    }
}

/// A joined member without power: every moderation and power change refused, the room
/// unchanged.
async fn plain_member_cannot_moderate_or_take_power(backend: Backend) {
    let c = cast(backend).await;
    let s = &c.server;
    let r = enc(&c.room);
    let before = snapshot(s, &c.admin, &c.room, &c.alias).await;
    let pl_path = format!("{V3}/rooms/{r}/state/m.room.power_levels/");
    let pl = s.get(&pl_path, Some(&c.admin.access_token)).await.assert_ok().clone();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut changed = pl.clone();
        edit(&mut changed);
        Some(changed)
    };
    let me = c.member.user_id.clone();
    let attempts = vec![
        attempt("raise their own power", Method::PUT, pl_path.clone(), with(&|p| p["users"][&me] = json!(100)), 403),
        attempt(
            "lower the admin",
            Method::PUT,
            pl_path.clone(),
            with(&|p| p["users"][&c.admin.user_id] = json!(0)),
            403,
        ),
        attempt(
            "lower the bar to send state",
            Method::PUT,
            pl_path.clone(),
            with(&|p| p["state_default"] = json!(0)),
            403,
        ),
        attempt(
            "replace the power levels with their own",
            Method::PUT,
            pl_path.clone(),
            Some(json!({"users": {(me.as_str()): 100}})),
            403,
        ),
        attempt(
            "rename the room",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.name/"),
            Some(json!({"name": "x"})),
            403,
        ),
        attempt(
            "change the topic",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.topic/"),
            Some(json!({"topic": "x"})),
            403,
        ),
        attempt(
            "open the room",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.join_rules/"),
            Some(json!({"join_rule": "public"})),
            403,
        ),
        attempt(
            "make history world readable",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.history_visibility/"),
            Some(json!({"history_visibility": "world_readable"})),
            403,
        ),
        attempt(
            "set a server ACL",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.server_acl/"),
            Some(json!({"allow": ["*"], "deny": ["localhost"]})),
            403,
        ),
        attempt(
            "turn on encryption",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.encryption/"),
            Some(json!({"algorithm": "m.megolm.v1.aes-sha2"})),
            403,
        ),
        attempt(
            "tombstone the room",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.tombstone/"),
            Some(json!({"body": "gone", "replacement_room": "!elsewhere:localhost"})),
            403,
        ),
        attempt(
            "set the canonical alias",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.canonical_alias/"),
            Some(json!({"alias": c.alias})),
            403,
        ),
        attempt(
            "write state under the admin's user id",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/org.example.state/{}", enc(&c.admin.user_id)),
            Some(json!({"x": 1})),
            403,
        ),
        attempt(
            "kick the admin through the admin's member event",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.member/{}", enc(&c.admin.user_id)),
            Some(json!({"membership": "leave"})),
            403,
        ),
        attempt(
            "redact the admin's event",
            Method::PUT,
            format!("{V3}/rooms/{r}/redact/{}/{}", enc(&c.early), txn()),
            Some(json!({})),
            403,
        ),
        attempt(
            "send a redaction through /send",
            Method::PUT,
            format!("{V3}/rooms/{r}/send/m.room.redaction/{}", txn()),
            Some(json!({"redacts": c.early})),
            400,
        )
        .code("M_BAD_JSON"),
        // State types sent as messages meet the same power levels; a member event needs its
        // state key; a create event can only begin a room.
        attempt(
            "send power levels as a message",
            Method::PUT,
            format!("{V3}/rooms/{r}/send/m.room.power_levels/{}", txn()),
            Some(json!({"users": {(me.as_str()): 100}})),
            403,
        ),
        attempt(
            "send a tombstone as a message",
            Method::PUT,
            format!("{V3}/rooms/{r}/send/m.room.tombstone/{}", txn()),
            Some(json!({"body": "gone", "replacement_room": "!elsewhere:localhost"})),
            403,
        ),
        attempt(
            "send a member event as a message",
            Method::PUT,
            format!("{V3}/rooms/{r}/send/m.room.member/{}", txn()),
            Some(json!({"membership": "join"})),
            400,
        )
        .code("M_BAD_JSON"),
        attempt(
            "send a create event",
            Method::PUT,
            format!("{V3}/rooms/{r}/send/m.room.create/{}", txn()),
            Some(json!({"room_version": "12"})),
            403,
        ),
        attempt(
            "replace the create event",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.create/"),
            Some(json!({"room_version": "12"})),
            403,
        ),
        attempt(
            "join the admin on their behalf",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.member/{}", enc(&c.admin.user_id)),
            Some(json!({"membership": "join"})),
            403,
        ),
        attempt(
            "ban themselves",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.member/{}", enc(&me)),
            Some(json!({"membership": "ban"})),
            403,
        ),
        attempt(
            "invite the banned user through their member event",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.member/{}", enc(&c.banned.user_id)),
            Some(json!({"membership": "invite"})),
            403,
        ),
        attempt(
            "unban the banned user through their member event",
            Method::PUT,
            format!("{V3}/rooms/{r}/state/m.room.member/{}", enc(&c.banned.user_id)),
            Some(json!({"membership": "leave"})),
            403,
        ),
        attempt(
            "kick the admin",
            Method::POST,
            format!("{V3}/rooms/{r}/kick"),
            Some(json!({"user_id": c.admin.user_id})),
            403,
        ),
        attempt(
            "ban the admin",
            Method::POST,
            format!("{V3}/rooms/{r}/ban"),
            Some(json!({"user_id": c.admin.user_id})),
            403,
        ),
        attempt(
            "ban an outsider",
            Method::POST,
            format!("{V3}/rooms/{r}/ban"),
            Some(json!({"user_id": c.outsider.user_id})),
            403,
        ),
        attempt(
            "unban the banned user",
            Method::POST,
            format!("{V3}/rooms/{r}/unban"),
            Some(json!({"user_id": c.banned.user_id})),
            403,
        ),
        attempt(
            "invite the banned user",
            Method::POST,
            format!("{V3}/rooms/{r}/invite"),
            Some(json!({"user_id": c.banned.user_id})),
            403,
        ),
        attempt(
            "type as the admin",
            Method::PUT,
            format!("{V3}/rooms/{r}/typing/{}", enc(&c.admin.user_id)),
            Some(json!({"typing": true, "timeout": 30000})),
            403,
        ),
        attempt(
            "delete the admin's alias",
            Method::DELETE,
            format!("{V3}/directory/room/{}", enc(&c.alias)),
            None,
            403,
        ),
        attempt(
            "publish the room",
            Method::PUT,
            format!("{V3}/directory/list/room/{r}"),
            Some(json!({"visibility": "public"})),
            403,
        ),
        attempt(
            "upgrade the room",
            Method::POST,
            format!("{V3}/rooms/{r}/upgrade"),
            Some(json!({"new_version": "11"})),
            403,
        ),
        attempt(
            "read the admin's room account data",
            Method::GET,
            format!("{V3}/user/{}/rooms/{r}/account_data/m.fully_read", enc(&c.admin.user_id)),
            None,
            403,
        ),
        attempt(
            "read the admin's tags",
            Method::GET,
            format!("{V3}/user/{}/rooms/{r}/tags", enc(&c.admin.user_id)),
            None,
            403,
        ),
        attempt("forget a room they are in", Method::POST, format!("{V3}/rooms/{r}/forget"), Some(json!({})), 400)
            .code("M_UNKNOWN"),
    ];
    run_attempts(s, "member", &c.member, &attempts).await;
    let after = snapshot(s, &c.admin, &c.room, &c.alias).await;
    assert_eq!(before, after, "the member changed the room");
    // Positive control: the same member may do what members may.
    send(s, &c.member, &c.room, json!({"msgtype": "m.text", "body": "still here"})).await;
    // A message that names an event in `redacts` (issue 13's reproduction) is only a
    // message: the admin's event stays whole, for the admin and for everybody.
    for (kind, txn) in [("m.room.message", txn()), ("org.example.custom", txn())] {
        let path = format!("{V3}/rooms/{r}/send/{kind}/{txn}");
        let body = json!({"msgtype": "m.text", "body": "x", "redacts": c.early});
        s.put(&path, Some(&c.member.access_token), body).await.assert_ok();
    }
    for reader in [&c.admin, &c.member] {
        let early = s.get(&format!("{V3}/rooms/{r}/event/{}", enc(&c.early)), Some(&reader.access_token)).await;
        assert_eq!(early.assert_ok()["content"]["body"], "early, for everybody", "{}", early.body);
        assert!(early.body["unsigned"].get("redacted_because").is_none(), "{}", early.body);
    }
}

/// A moderator (50) whose power levels let moderators edit the power levels still cannot
/// reach above their own level, touch an equal or higher user, or move a bar that is above
/// them; kicking and banning an equal or higher user fails too.
async fn moderator_cannot_exceed_own_power(backend: Backend) {
    let server = Server::start(backend).await;
    let s = &server;
    let admin = s.register("admin", "admin-pass").await;
    let moderator = s.register("moderator", "moderator-pass").await;
    let peer = s.register("peer", "peer-pass").await;
    let member = s.register("member", "member-pass").await;
    for version in ["11", "12"] {
        let room = s.create_room(&admin, json!({"preset": "public_chat", "room_version": version})).await;
        let r = enc(&room);
        for user in [&moderator, &peer, &member] {
            s.join(user, &room).await.assert_ok();
        }
        let pl_path = format!("{V3}/rooms/{r}/state/m.room.power_levels/");
        let mut pl = s.get(&pl_path, Some(&admin.access_token)).await.assert_ok().clone();
        pl["users"][&moderator.user_id] = json!(50);
        pl["users"][&peer.user_id] = json!(50);
        pl["events"]["m.room.power_levels"] = json!(50);
        s.put(&pl_path, Some(&admin.access_token), pl.clone()).await.assert_ok();
        let admin_event = send(s, &admin, &room, json!({"msgtype": "m.text", "body": "from the admin"})).await;

        let with = |edit: &dyn Fn(&mut Value)| {
            let mut changed = pl.clone();
            edit(&mut changed);
            Some(changed)
        };
        let m = moderator.user_id.clone();
        let attempts = vec![
            attempt("raise their own level", Method::PUT, pl_path.clone(), with(&|p| p["users"][&m] = json!(51)), 403),
            attempt(
                "grant a member more than their own",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["users"][&member.user_id] = json!(75)),
                403,
            ),
            attempt(
                "demote an equal",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["users"][&peer.user_id] = json!(0)),
                403,
            ),
            attempt(
                "remove an equal",
                Method::PUT,
                pl_path.clone(),
                with(&|p| {
                    p["users"].as_object_mut().unwrap().remove(&peer.user_id);
                }),
                403,
            ),
            attempt(
                "demote the admin",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["users"][&admin.user_id] = json!(0)),
                403,
            ),
            attempt(
                "raise a bar above their level",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["ban"] = json!(60)),
                403,
            ),
            attempt(
                "lower a bar that is above them",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["events"]["m.room.tombstone"] = json!(0)),
                403,
            ),
            attempt(
                "raise the users default above them",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["users_default"] = json!(60)),
                403,
            ),
            attempt(
                "lower the bar of the power levels they cannot reach",
                Method::PUT,
                pl_path.clone(),
                with(&|p| p["events"]["m.room.history_visibility"] = json!(0)),
                403,
            ),
            attempt(
                "kick the admin",
                Method::POST,
                format!("{V3}/rooms/{r}/kick"),
                Some(json!({"user_id": admin.user_id})),
                403,
            ),
            attempt(
                "ban the admin",
                Method::POST,
                format!("{V3}/rooms/{r}/ban"),
                Some(json!({"user_id": admin.user_id})),
                403,
            ),
            attempt(
                "kick an equal",
                Method::POST,
                format!("{V3}/rooms/{r}/kick"),
                Some(json!({"user_id": peer.user_id})),
                403,
            ),
            attempt(
                "ban an equal",
                Method::POST,
                format!("{V3}/rooms/{r}/ban"),
                Some(json!({"user_id": peer.user_id})),
                403,
            ),
            attempt(
                "tombstone the room",
                Method::PUT,
                format!("{V3}/rooms/{r}/state/m.room.tombstone/"),
                Some(json!({"body": "gone", "replacement_room": "!elsewhere:localhost"})),
                403,
            ),
            attempt(
                "upgrade the room",
                Method::POST,
                format!("{V3}/rooms/{r}/upgrade"),
                Some(json!({"new_version": "12"})),
                403,
            ),
        ];
        let state_before = s.room_state(&admin, &room).await;
        run_attempts(s, &format!("moderator (v{version})"), &moderator, &attempts).await;
        let state_after = s.room_state(&admin, &room).await;
        assert_eq!(state_before, state_after, "the moderator changed the state of a v{version} room");
        s.get(&format!("{V3}/rooms/{r}/event/{}", enc(&admin_event)), Some(&admin.access_token)).await.assert_ok();

        // Positive controls: what a moderator may do.
        let mut granted = pl.clone();
        granted["users"][&member.user_id] = json!(40);
        s.put(&pl_path, Some(&moderator.access_token), granted).await.assert_ok();
        s.post(&format!("{V3}/rooms/{r}/kick"), Some(&moderator.access_token), json!({"user_id": member.user_id}))
            .await
            .assert_ok();
    }
}

/// Room version 12: the creators (the create event's sender and its `additional_creators`)
/// have unlimited power, which the server's own checks (redacting others' events, the
/// directory, upgrades) must see as the auth rules do.
async fn version_12_creators_hold_power_from_the_create_event(backend: Backend) {
    let server = Server::start(backend).await;
    let s = &server;
    let alice = s.register("alice", "alice-pass").await;
    let bob = s.register("bob", "bob-pass").await;
    let carol = s.register("carol", "carol-pass").await;
    let room = s
        .create_room(
            &alice,
            json!({"preset": "public_chat", "room_version": "12",
                   "creation_content": {"additional_creators": [bob.user_id]}}),
        )
        .await;
    let r = enc(&room);
    s.join(&bob, &room).await.assert_ok();
    s.join(&carol, &room).await.assert_ok();
    let carols = send(s, &carol, &room, json!({"msgtype": "m.text", "body": "carol's"})).await;
    let alices = send(s, &alice, &room, json!({"msgtype": "m.text", "body": "alice's"})).await;

    // Carol (no power) cannot; Bob (an additional creator) can.
    s.put(&format!("{V3}/rooms/{r}/redact/{}/{}", enc(&alices), txn()), Some(&carol.access_token), json!({}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    s.put(&format!("{V3}/directory/list/room/{r}"), Some(&carol.access_token), json!({"visibility": "public"}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    s.put(&format!("{V3}/rooms/{r}/redact/{}/{}", enc(&carols), txn()), Some(&bob.access_token), json!({}))
        .await
        .assert_ok();
    let redacted = s.get(&format!("{V3}/rooms/{r}/event/{}", enc(&carols)), Some(&alice.access_token)).await;
    assert_eq!(redacted.assert_ok()["content"], json!({}), "bob's redaction applied: {}", redacted.body);
    s.put(&format!("{V3}/directory/list/room/{r}"), Some(&bob.access_token), json!({"visibility": "public"}))
        .await
        .assert_ok();
    let public = s.get(&format!("{V3}/publicRooms"), None).await;
    assert_eq!(public.assert_ok()["chunk"][0]["room_id"], room.as_str());
    // The power levels cannot hand a creator's power to anybody else.
    let pl_path = format!("{V3}/rooms/{r}/state/m.room.power_levels/");
    let mut pl = s.get(&pl_path, Some(&alice.access_token)).await.assert_ok().clone();
    pl["users"][&bob.user_id] = json!(0);
    s.put(&pl_path, Some(&alice.access_token), pl).await.assert_error(403, "M_FORBIDDEN");
    let upgraded =
        s.post(&format!("{V3}/rooms/{r}/upgrade"), Some(&bob.access_token), json!({"new_version": "12"})).await;
    upgraded.assert_ok();
}

/// Transaction ids are scoped to the device and the endpoint (the room and event type of a
/// send, the event of a redaction, the event type of a to-device message): the same id
/// elsewhere is a new request, the same id on the same path a retry.
async fn transaction_ids_are_scoped_per_room_and_endpoint(backend: Backend) {
    let server = Server::start(backend).await;
    let s = &server;
    let alice = s.register("alice", "alice-pass").await;
    let bob = s.register("bob", "bob-pass").await;
    let one = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let two = s.create_room(&alice, json!({"preset": "public_chat"})).await;
    let token = Some(alice.access_token.as_str());
    let put_send = |room: &str, kind: &str, txn: &str, body: &str| {
        let path = format!("{V3}/rooms/{}/send/{kind}/{txn}", enc(room));
        let content = json!({"msgtype": "m.text", "body": body});
        async move { s.put(&path, token, content).await.assert_ok()["event_id"].as_str().unwrap().to_owned() }
    };
    let first = put_send(&one, "m.room.message", "same", "in one").await;
    let retry = put_send(&one, "m.room.message", "same", "in one").await;
    assert_eq!(first, retry, "a retry on the same path is the same event");
    let elsewhere = put_send(&two, "m.room.message", "same", "in two").await;
    assert_ne!(first, elsewhere, "the same txn id in another room is another event");
    let in_two = s.get(&format!("{V3}/rooms/{}/event/{}", enc(&two), enc(&elsewhere)), token).await;
    assert_eq!(in_two.assert_ok()["content"]["body"], "in two");
    let other_type = put_send(&one, "org.example.other", "same", "other type").await;
    assert_ne!(first, other_type, "another event type is another endpoint path");

    // Redactions: per redacted event.
    let redact = |room: &str, event: &str, txn: &str| {
        let path = format!("{V3}/rooms/{}/redact/{}/{txn}", enc(room), enc(event));
        async move { s.put(&path, token, json!({})).await.assert_ok()["event_id"].as_str().unwrap().to_owned() }
    };
    let redaction = redact(&one, &first, "same").await;
    assert_ne!(redaction, first, "a redaction with a send's txn id is a redaction");
    assert_eq!(redaction, redact(&one, &first, "same").await, "a retried redaction is the same event");
    let second_redaction = redact(&one, &other_type, "same").await;
    assert_ne!(second_redaction, redaction, "redacting another event with the same txn id redacts it");
    let gone = s.get(&format!("{V3}/rooms/{}/event/{}", enc(&one), enc(&other_type)), token).await;
    assert_eq!(gone.assert_ok()["content"], json!({}));

    // Another device of the same user has its own transactions.
    let login = s.login("alice", "alice-pass").await;
    let other_device = login.assert_ok()["access_token"].as_str().unwrap().to_owned();
    let path = format!("{V3}/rooms/{}/send/m.room.message/same", enc(&one));
    let from_other = s.put(&path, Some(&other_device), json!({"msgtype": "m.text", "body": "in one"})).await;
    assert_ne!(from_other.assert_ok()["event_id"].as_str().unwrap(), first);

    // To-device: per event type.
    let since = s.sync(&bob, None, 0, None).await["next_batch"].as_str().unwrap().to_owned();
    let to_device = |kind: &str, n: u32| {
        let path = format!("{V3}/sendToDevice/{kind}/same");
        let body = json!({"messages": {(bob.user_id.as_str()): {(bob.device_id.as_str()): {"n": n}}}});
        async move {
            s.put(&path, token, body).await.assert_ok();
        }
    };
    to_device("org.example.a", 1).await;
    to_device("org.example.a", 1).await;
    to_device("org.example.b", 2).await;
    let sync = s.sync(&bob, Some(&since), 0, None).await;
    let mut got: Vec<(String, Value)> = sync["to_device"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["content"]["n"].clone()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![("org.example.a".to_owned(), json!(1)), ("org.example.b".to_owned(), json!(2))],
        "one message per type, the retry not repeated: {sync}"
    );
}

/// An invite from another server carries the room's stripped state, a create event among it,
/// unchecked (the server may not be able to check it). It must not make anybody a creator of
/// a room we hold: once all our users left a room, a hostile server in it invites Eve with a
/// create event of its own naming her; with the creator's (version 12: unlimited) power Eve
/// then published the room in our directory.
async fn a_remote_invite_cannot_name_the_creator_of_our_room(backend: Backend) {
    let a = ServerOptions::new(backend).federating().start().await;
    let alice = a.register("alice", "alice-pass").await;
    let eve = a.register("eve", "eve-pass").await;
    let room = a.create_room(&alice, json!({"preset": "public_chat", "name": "Alice's"})).await;
    let h = HostileServer::start_named("127.0.0.1").await;
    let mallory = h.user("mallory");
    h.join(&a, &room, "mallory").await.expect("mallory joins");
    // Alice, the creator, may publish the room (and takes it out of the directory again).
    let r = enc(&room);
    for visibility in ["public", "private"] {
        let path = format!("{V3}/directory/list/room/{r}");
        a.put(&path, Some(&alice.access_token), json!({"visibility": visibility})).await.assert_ok();
    }
    membership_call(&a, &alice, &room, "leave", None).await;

    // The invite is honest; the stripped state's create event names Eve as its sender.
    let (invite_id, invite) = h.build(&room, Draft::member(&mallory, &eve.user_id, "invite"));
    let version = ruma::RoomVersionId::V12;
    let (_, fake_create) = h.sign(
        &version,
        json!({"type": "m.room.create", "state_key": "", "sender": eve.user_id, "room_id": room,
               "content": {"room_version": "12"}, "prev_events": [], "auth_events": [], "depth": 1,
               "origin_server_ts": 1}),
    );
    let body = json!({"room_version": "12", "event": invite, "invite_room_state": [fake_create]});
    let (status, answer) = h
        .request(
            &a,
            Method::PUT,
            &format!("/_matrix/federation/v2/invite/{}/{}", enc(&room), enc(&invite_id)),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "the invite itself is valid: {answer}");
    let sync = a.sync(&eve, None, 0, None).await;
    assert!(sync["rooms"]["invite"].get(&room).is_some(), "eve has the invite: {sync}");

    // Eve holds no power in the room: she may not publish it, nor upgrade it.
    a.put(&format!("{V3}/directory/list/room/{r}"), Some(&eve.access_token), json!({"visibility": "public"}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    a.post(&format!("{V3}/rooms/{r}/upgrade"), Some(&eve.access_token), json!({"new_version": "12"}))
        .await
        .assert_error(403, "M_FORBIDDEN");
    let public = a.get(&format!("{V3}/publicRooms"), None).await;
    assert_eq!(public.assert_ok()["chunk"], json!([]), "the room was published");
}
