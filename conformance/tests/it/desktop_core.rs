//! The desktop client core (`obmin-client`) against the real homeserver: each user is a
//! `Client` with its own data directory and its background sync loop and outbox running, as
//! in the app. Sessions and their restore, history offline, reconnecting, the outbox across
//! an outage and an app restart (exactly one copy arrives), encrypted direct chats and groups
//! both ways, typing, receipts (also private ones), presence (also never reported), profiles,
//! user search, an encrypted file with progress and one whose upload a proxy cuts midway,
//! SAS emoji verification between two clients with cross-signing after it, cross-signing
//! set up at the first sign-in, a new device restoring old history from the key backup,
//! and back-pagination.

use std::{io::Write, time::Duration};

use conformance::{Backend, Server, backend_tests, enc, free_port, wait::eventually_some};
use obmin_client::{
    Client, ConnectionState, Error, ItemContent, Membership, Presence, SendState, TimelineItem, Update,
    VerificationStatus,
};
use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde_json::json;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

backend_tests!(
    register_login_and_restore_a_session,
    history_is_readable_offline_and_the_sync_loop_reconnects,
    the_outbox_delivers_exactly_once_across_an_outage_and_a_restart,
    encrypted_direct_chats_and_groups_both_ways,
    typing_receipts_presence_profiles_and_search,
    an_encrypted_file_round_trips_with_progress,
    sas_emoji_verification_between_two_clients,
    cross_signing_is_bootstrapped_at_the_first_sign_in,
    a_new_device_restores_old_history_from_the_key_backup,
    an_upload_cut_midway_continues_from_the_servers_offset,
    private_read_receipts_and_unknown_presence,
    older_history_loads_page_by_page,
);

/// A signed-in app: the client and its data directory (kept alive with it).
pub(crate) struct App {
    pub(crate) client: Client,
    pub(crate) dir: TempDir,
}

impl App {
    /// Registers `name` through the client and starts its background work.
    pub(crate) async fn register(server: &Server, name: &str) -> App {
        Self::register_at(&server.base_url, name).await
    }

    /// Like [`App::register`], talking to the server at `url` (e.g. through a proxy).
    pub(crate) async fn register_at(url: &str, name: &str) -> App {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::open(dir.path()).await.unwrap();
        client.register(url, name, "secret-pass", &format!("{name} display"), Some("#123456")).await.unwrap();
        client.start().unwrap();
        App { client, dir }
    }

    pub(crate) fn user_id(&self) -> OwnedUserId {
        self.client.session().unwrap().user_id
    }

    /// Waits until the room is in our list with this membership.
    pub(crate) async fn wait_for_room(&self, room_id: &RoomId, membership: Membership) {
        eventually_some(&format!("{room_id} {membership:?} for {}", self.user_id()), || async {
            let room = self.client.room(room_id).await.unwrap()?;
            (room.membership == membership).then_some(())
        })
        .await
    }

    /// Waits until a text with this body is in the room's timeline; returns the item.
    pub(crate) async fn wait_for_text(&self, room_id: &RoomId, body: &str) -> TimelineItem {
        eventually_some(&format!("\"{body}\" at {}", self.user_id()), || async {
            self.client.timeline(room_id, 100).await.unwrap().into_iter().find(|item| text(item) == Some(body))
        })
        .await
    }

    /// Waits until our item `key` has reached this send state.
    pub(crate) async fn wait_for_state(&self, room_id: &RoomId, key: &str, state: SendState) {
        eventually_some(&format!("{key} {state:?}"), || async {
            let items = self.client.timeline(room_id, 100).await.unwrap();
            items.iter().any(|i| i.key == key && i.send_state.as_ref() == Some(&state)).then_some(())
        })
        .await
    }
}

fn text(item: &TimelineItem) -> Option<&str> {
    match &item.content {
        ItemContent::Text { body } => Some(body),
        _ => None,
    }
}

/// Alice opens a direct chat with Bob, Bob sees the invite and accepts.
pub(crate) async fn direct_chat(alice: &App, bob: &App) -> OwnedRoomId {
    let room = alice.client.create_dm(&bob.user_id()).await.unwrap();
    bob.wait_for_room(&room, Membership::Invited).await;
    let invite = bob.client.room(&room).await.unwrap().unwrap();
    assert_eq!(invite.inviter.as_ref(), Some(&alice.user_id()));
    bob.client.accept_invite(&room).await.unwrap();
    alice.wait_for_room(&room, Membership::Joined).await;
    eventually_some("Bob's join reaching Alice", || async {
        let members = alice.client.members(&room).await.unwrap();
        members.iter().any(|m| m.user_id == bob.user_id()).then_some(())
    })
    .await;
    room
}

/// Takes the server away (SIGKILL: like a crash or a cut cable; a graceful stop would wait
/// for the clients' long-polls) so that `restart` brings it back on the same address.
pub(crate) fn stop_server(server: &mut Server) {
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    server.set_env("OBMIN_LISTEN", &addr);
    server.kill();
}

async fn register_login_and_restore_a_session(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let session = alice.client.session().unwrap();
    assert_eq!(session.user_id.as_str(), "@alice:localhost");
    assert_eq!(session.server_url, server.base_url);
    let profile = alice.client.profile().await.unwrap();
    assert_eq!(profile.display_name.as_deref(), Some("alice display"));
    assert_eq!(profile.avatar_colour.as_deref(), Some("#123456"));
    // The colour is a custom profile field anyone can read.
    let public = server.get(&format!("/_matrix/client/v3/profile/{}", enc(session.user_id.as_str())), None).await;
    assert_eq!(public.assert_ok()["io.obmin.avatar_colour"], "#123456");

    // The app restarts: the session comes back from the data directory and still works.
    alice.client.stop().await;
    let restored = Client::open(alice.dir.path()).await.unwrap();
    assert_eq!(restored.session(), Some(session.clone()));
    restored.sync_once().await.unwrap();

    // Errors a user can act on.
    let other = tempfile::tempdir().unwrap();
    let fresh = Client::open(other.path()).await.unwrap();
    assert_eq!(fresh.session(), None);
    let wrong = fresh.login(&server.base_url, "alice", "not-the-password").await.unwrap_err();
    assert_eq!(wrong, Error::WrongPassword);
    assert_eq!(wrong.to_string(), "Wrong user name or password.");
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    assert!(matches!(fresh.login(&unreachable, "alice", "secret-pass").await, Err(Error::ServerUnreachable { .. })));
    assert!(matches!(fresh.login("not a url at all", "a", "b").await, Err(Error::InvalidServerUrl { .. })));
    assert_eq!(
        fresh.register(&server.base_url, "alice", "another-pass", "Alice 2", None).await,
        Err(Error::UserTaken("alice".into()))
    );
    assert_eq!(fresh.sync_once().await, Err(Error::NotLoggedIn));

    // A second device by password login (the address without a scheme works too).
    let login = fresh.login(server.base_url.trim_start_matches("http://"), "alice", "secret-pass").await.unwrap();
    assert_eq!(login.user_id, session.user_id);
    assert_ne!(login.device_id, session.device_id);

    // Logout ends the session on the server and locally, also for the next start.
    let mut updates = restored.subscribe();
    restored.logout().await.unwrap();
    assert_eq!(restored.session(), None);
    assert_eq!(updates.recv().await, Ok(Update::LoggedOut));
    assert_eq!(Client::open(alice.dir.path()).await.unwrap().session(), None);
    let devices = server.login("alice", "secret-pass").await;
    let token = devices.assert_ok()["access_token"].as_str().unwrap().to_owned();
    let list = server.get("/_matrix/client/v3/devices", Some(&token)).await;
    let ids: Vec<&str> =
        list.assert_ok()["devices"].as_array().unwrap().iter().filter_map(|d| d["device_id"].as_str()).collect();
    assert!(!ids.contains(&session.device_id.as_str()), "the logged-out device is gone: {ids:?}");
}

async fn history_is_readable_offline_and_the_sync_loop_reconnects(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;
    alice.client.send_text(&room, "history to keep").await.unwrap();
    bob.wait_for_text(&room, "history to keep").await;
    assert_eq!(bob.client.connection_state(), ConnectionState::Online);

    stop_server(&mut server);
    eventually_some("Bob's client noticing the outage", || async {
        matches!(bob.client.connection_state(), ConnectionState::Reconnecting { .. }).then_some(())
    })
    .await;
    // Offline: the room list and the history come from the local cache.
    let rooms = bob.client.rooms().await.unwrap();
    let summary = rooms.iter().find(|r| r.room_id == room).expect("the room offline");
    assert_eq!(summary.dm_peer.as_ref().map(|p| p.user_id.clone()), Some(alice.user_id()));
    assert_eq!(summary.last_message.as_ref().and_then(text), Some("history to keep"));
    assert!(summary.encrypted);
    // Also after the app restarts while offline.
    bob.client.stop().await;
    let reopened = Client::open(bob.dir.path()).await.unwrap();
    let items = reopened.timeline(&room, 50).await.unwrap();
    let item = items.iter().find(|i| text(i) == Some("history to keep")).expect("history offline after restart");
    assert!(item.encrypted);
    assert_eq!(item.sender, alice.user_id());
    let mut updates = reopened.subscribe();
    reopened.start().unwrap();

    // The server comes back: the loop reconnects by itself and picks up what it missed.
    server.restart().await;
    eventually_some("reconnected", || async { (reopened.connection_state() == ConnectionState::Online).then_some(()) })
        .await;
    let mut states = Vec::new();
    while let Ok(update) = updates.try_recv() {
        if let Update::Connection { state } = update {
            states.push(state);
        }
    }
    assert!(states.contains(&ConnectionState::Online), "{states:?}");
    let after = alice.client.send_text(&room, "after the outage").await.unwrap();
    alice.wait_for_state(&room, &after.key, SendState::Sent).await;
    let bob_again = App { client: reopened, dir: bob.dir };
    bob_again.wait_for_text(&room, "after the outage").await;
}

async fn the_outbox_delivers_exactly_once_across_an_outage_and_a_restart(backend: Backend) {
    let mut server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;
    alice.client.send_text(&room, "warm-up").await.unwrap();
    bob.wait_for_text(&room, "warm-up").await;

    // Sent while the server is down: queued, shown as sending.
    stop_server(&mut server);
    let queued = alice.client.send_text(&room, "sent while down").await.unwrap();
    assert_eq!(queued.send_state, Some(SendState::Sending));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice.wait_for_state(&room, &queued.key, SendState::Sending).await;

    // The app quits and starts again while the server is still down: the message is still
    // queued (it lives in the store, not in memory).
    alice.client.stop().await;
    let alice = App { client: Client::open(alice.dir.path()).await.unwrap(), dir: alice.dir };
    alice.wait_for_state(&room, &queued.key, SendState::Sending).await;
    alice.client.start().unwrap();

    server.restart().await;
    alice.wait_for_state(&room, &queued.key, SendState::Sent).await;
    bob.wait_for_text(&room, "sent while down").await;

    // A retry after a lost answer: the server got the message but the app never heard back
    // (simulated by sending the queued transaction id ourselves first, with the app's token,
    // on the path the app uses: the room is encrypted, and transaction ids are scoped to the
    // endpoint, event type included). Our stand-in is not real ciphertext: Bob cannot read it.
    alice.client.stop().await;
    let second = alice.client.send_text(&room, "answer lost").await.unwrap();
    let key = crate::desktop_cache::cache_key(alice.dir.path()).await;
    let db = crate::desktop_cache::open_cache(&alice.dir.path().join("client.db"), Some(&key)).await.unwrap();
    let (token,): (String,) = sqlx::query_as("SELECT access_token FROM session").fetch_one(&db).await.unwrap();
    let (txn,): (String,) = sqlx::query_as("SELECT txn_id FROM outbox").fetch_one(&db).await.unwrap();
    assert_eq!(txn, second.key, "the outbox is keyed by the item's transaction id");
    db.close().await;
    let first = server
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.encrypted/{txn}", enc(room.as_str())),
            Some(&token),
            json!({"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AAAA", "device_id": "LOST",
                   "sender_key": "AAAA", "session_id": "AAAA"}),
        )
        .await;
    let first_event = first.assert_ok()["event_id"].as_str().unwrap().to_owned();
    alice.client.start().unwrap();
    alice.wait_for_state(&room, &second.key, SendState::Sent).await;
    let mine = alice.client.timeline(&room, 100).await.unwrap();
    let sent = mine.iter().find(|i| i.key == second.key).unwrap();
    assert_eq!(sent.event_id.as_ref().map(|e| e.as_str()), Some(first_event.as_str()), "the retry got the same event");

    // A marker after both: once Bob has it, he has everything before it. One copy each.
    alice.client.send_text(&room, "marker").await.unwrap();
    bob.wait_for_text(&room, "marker").await;
    let bobs = bob.client.timeline(&room, 100).await.unwrap();
    assert_eq!(
        bobs.iter().filter(|i| text(i) == Some("sent while down")).count(),
        1,
        "exactly one \"sent while down\""
    );
    // The retry made no second event: Bob has the first one only.
    assert_eq!(
        bobs.iter().filter(|i| i.event_id.as_ref().map(|e| e.as_str()) == Some(first_event.as_str())).count(),
        1
    );
    assert_eq!(bobs.iter().filter(|i| text(i) == Some("answer lost")).count(), 0, "no second \"answer lost\"");
    // Alice's own view has no duplicates from the sync echo either.
    let mine = alice.client.timeline(&room, 100).await.unwrap();
    assert_eq!(mine.iter().filter(|i| text(i) == Some("sent while down")).count(), 1);
}

async fn encrypted_direct_chats_and_groups_both_ways(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let carol = App::register(&server, "carol").await;

    let dm = direct_chat(&alice, &bob).await;
    alice.client.send_text(&dm, "hi bob, secretly").await.unwrap();
    let got = bob.wait_for_text(&dm, "hi bob, secretly").await;
    assert!(got.encrypted);
    assert_eq!(got.sender, alice.user_id());
    bob.client.send_text(&dm, "hi alice, secretly").await.unwrap();
    let got = alice.wait_for_text(&dm, "hi alice, secretly").await;
    assert!(got.encrypted);
    // The server only ever saw ciphertext.
    let login = server.login("bob", "secret-pass").await;
    let token = login.assert_ok()["access_token"].as_str().unwrap().to_owned();
    let messages = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(dm.as_str())), Some(&token))
        .await;
    let chunk = messages.assert_ok()["chunk"].as_array().unwrap().clone();
    assert!(chunk.iter().all(|e| e["type"] != "m.room.message"), "no plaintext on the server: {chunk:?}");
    assert!(chunk.iter().filter(|e| e["type"] == "m.room.encrypted").count() >= 2);

    // The DM shows as Bob's chat with Alice.
    let summary = bob.client.room(&dm).await.unwrap().unwrap();
    assert_eq!(summary.dm_peer.map(|p| p.user_id), Some(alice.user_id()));
    assert!(summary.encrypted);

    // A group: all three read each other.
    let group = alice.client.create_group("Team", &[bob.user_id(), carol.user_id()]).await.unwrap();
    for member in [&bob, &carol] {
        member.wait_for_room(&group, Membership::Invited).await;
        member.client.accept_invite(&group).await.unwrap();
    }
    eventually_some("everyone joined", || async {
        let members = alice.client.members(&group).await.unwrap();
        (members.len() == 3).then_some(())
    })
    .await;
    carol.client.send_text(&group, "hello team").await.unwrap();
    alice.wait_for_text(&group, "hello team").await;
    bob.wait_for_text(&group, "hello team").await;
    alice.client.send_text(&group, "hello carol and bob").await.unwrap();
    carol.wait_for_text(&group, "hello carol and bob").await;
    bob.wait_for_text(&group, "hello carol and bob").await;
    assert_eq!(carol.client.room(&group).await.unwrap().unwrap().name, "Team");

    // Declining an invite takes it off the list.
    let other = alice.client.create_group("Not for Carol", &[carol.user_id()]).await.unwrap();
    carol.wait_for_room(&other, Membership::Invited).await;
    carol.client.decline_invite(&other).await.unwrap();
    assert!(carol.client.rooms().await.unwrap().iter().all(|r| r.room_id != other));
}

async fn typing_receipts_presence_profiles_and_search(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;

    // Typing.
    let mut bob_updates = bob.client.subscribe();
    alice.client.set_typing(&room, true).await.unwrap();
    let typing = eventually_some("Alice typing at Bob", || {
        let mut found = None;
        while let Ok(update) = bob_updates.try_recv() {
            if let Update::Typing { room_id, user_ids } = update
                && room_id == room
                && !user_ids.is_empty()
            {
                found = Some(user_ids);
            }
        }
        async move { found }
    })
    .await;
    assert_eq!(typing, vec![alice.user_id()]);

    // Delivered (✓) and read (✓✓), unread counts.
    let sent = alice.client.send_text(&room, "read me").await.unwrap();
    alice.wait_for_state(&room, &sent.key, SendState::Sent).await;
    bob.wait_for_text(&room, "read me").await;
    let unread = bob.client.room(&room).await.unwrap().unwrap().unread;
    assert_eq!(unread, 1);
    bob.client.mark_read(&room).await.unwrap();
    assert_eq!(bob.client.room(&room).await.unwrap().unwrap().unread, 0);
    alice.wait_for_state(&room, &sent.key, SendState::Read).await;

    // Presence and last seen.
    bob.client.set_presence(Presence::Unavailable, Some("in a meeting")).await.unwrap();
    let peer = eventually_some("Bob's presence at Alice", || async {
        let summary = alice.client.room(&room).await.unwrap()?;
        let peer = summary.dm_peer?;
        (peer.presence.presence == Presence::Unavailable).then_some(peer)
    })
    .await;
    assert_eq!(peer.presence.status_msg.as_deref(), Some("in a meeting"));
    let last_seen = peer.presence.last_active_ts.expect("last seen");
    assert!(last_seen > 1_700_000_000_000);

    // Profile: name, colour, avatar image.
    alice.client.set_display_name("Alice Anders").await.unwrap();
    alice.client.set_avatar_colour("#ff8800").await.unwrap();
    let avatar = alice.dir.path().join("me.png");
    let mut png = Vec::new();
    image::DynamicImage::new_rgb8(8, 8).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    std::fs::write(&avatar, &png).unwrap();
    alice.client.set_avatar(&avatar).await.unwrap();
    let profile = alice.client.profile().await.unwrap();
    assert_eq!(profile.display_name.as_deref(), Some("Alice Anders"));
    assert_eq!(profile.avatar_colour.as_deref(), Some("#ff8800"));
    let avatar_url = profile.avatar_url.expect("an avatar");
    let seen_by_bob = bob.client.user(&alice.user_id()).await.unwrap();
    assert_eq!(seen_by_bob.avatar_colour.as_deref(), Some("#ff8800"));
    assert_eq!(seen_by_bob.avatar_url, Some(avatar_url.clone()));
    let (server_name, media_id) = avatar_url.parts().unwrap();
    let download = server
        .http
        .get(server.url(&format!("/_matrix/client/v1/media/download/{server_name}/{media_id}")))
        .bearer_auth(server.login("bob", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(download.bytes().await.unwrap().as_ref(), png.as_slice(), "the avatar is the uploaded image");

    // User search finds her by her new name.
    let found = eventually_some("Alice in the directory", || async {
        let results = bob.client.search_users("Anders").await.unwrap();
        results.into_iter().find(|u| u.user_id == alice.user_id())
    })
    .await;
    assert_eq!(found.display_name.as_deref(), Some("Alice Anders"));
}

async fn an_encrypted_file_round_trips_with_progress(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;

    let len = 3 * 1024 * 1024 + 17;
    let source = alice.dir.path().join("report.bin");
    let mut file = std::fs::File::create(&source).unwrap();
    let data: Vec<u8> = (0..len as u64).map(|p| (p.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    file.write_all(&data).unwrap();
    drop(file);
    let expected = Sha256::digest(&data);

    let mut alice_updates = alice.client.subscribe();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let item = alice.client.send_file(&room, &source, Some(tx)).await.unwrap();
    // The app hears it too, under the key the message's item has.
    let mut reported = Vec::new();
    while let Ok(update) = alice_updates.try_recv() {
        if let Update::FileProgress { key, progress } = update {
            assert_eq!(key, item.key);
            reported.push(progress);
        }
    }
    let mut progress = Vec::new();
    while let Ok(p) = rx.try_recv() {
        progress.push(p);
    }
    assert!(progress.len() >= 3, "progress in steps: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0].done < w[1].done));
    assert_eq!(progress.last().map(|p| (p.done, p.total)), Some((len as u64, len as u64)));
    assert_eq!(reported, progress);
    alice.wait_for_state(&room, &item.key, SendState::Sent).await;

    let received = eventually_some("the file at Bob", || async {
        let items = bob.client.timeline(&room, 50).await.unwrap();
        items.into_iter().find(|i| matches!(i.content, ItemContent::File { .. }))
    })
    .await;
    let ItemContent::File { name, size, attachment, .. } = received.content else { unreachable!() };
    assert_eq!(name, "report.bin");
    assert_eq!(size, Some(len as u64));
    assert!(attachment.encrypted_file.is_some(), "sent as an encrypted attachment");

    // What the server stores is ciphertext.
    let (server_name, media_id) = attachment.url.parts().unwrap();
    let token = server.login("bob", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let stored = server
        .http
        .get(server.url(&format!("/_matrix/client/v1/media/download/{server_name}/{media_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored.len(), len);
    assert_ne!(Sha256::digest(&stored), expected);

    let dest = bob.dir.path().join("downloaded.bin");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    bob.client.download_file(&attachment, &dest, Some(tx)).await.unwrap();
    assert_eq!(Sha256::digest(std::fs::read(&dest).unwrap()), expected, "decrypted file equals the original");
    let mut last = None;
    while let Ok(p) = rx.try_recv() {
        last = Some(p.done);
    }
    assert_eq!(last, Some(len as u64));

    // A tampered description (wrong hash) fails and leaves no file behind.
    let mut tampered = attachment.clone();
    tampered.encrypted_file.as_mut().unwrap()["hashes"]["sha256"] =
        json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let bad = bob.dir.path().join("tampered.bin");
    assert!(matches!(bob.client.download_file(&tampered, &bad, None).await, Err(Error::Crypto(_))));
    assert!(!bad.exists());
}

async fn sas_emoji_verification_between_two_clients(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let _room = direct_chat(&alice, &bob).await;

    let devices = alice.client.user_devices(&bob.user_id()).await.unwrap();
    let bob_device = bob.client.session().unwrap().device_id;
    assert_eq!(devices.iter().map(|d| d.device_id.clone()).collect::<Vec<_>>(), vec![bob_device.clone()]);
    assert!(!devices[0].verified);

    let mut bob_updates = bob.client.subscribe();
    let id = alice.client.start_verification(&bob.user_id(), &bob_device).await.unwrap();
    let request = eventually_some("the request at Bob", || async {
        let all = bob.client.verifications().await;
        all.into_iter().find(|v| v.id == id && v.status == VerificationStatus::Requested)
    })
    .await;
    assert_eq!(request.other_user, alice.user_id());
    eventually_some("Bob's app told about the request", || {
        let mut announced = None;
        while let Ok(update) = bob_updates.try_recv() {
            if matches!(&update, Update::Verification { verification } if verification.id == id) {
                announced = Some(());
            }
        }
        async move { announced }
    })
    .await;
    bob.client.accept_verification(&id).await.unwrap();

    let emoji = |app: &App| {
        let (client, id) = (app.client.clone(), id.clone());
        async move {
            eventually_some("the emoji", || async {
                client.verifications().await.into_iter().find_map(|v| match v.status {
                    VerificationStatus::ShowEmoji(emoji) if v.id == id => Some(emoji),
                    _ => None,
                })
            })
            .await
        }
    };
    let (alice_emoji, bob_emoji) = (emoji(&alice).await, emoji(&bob).await);
    assert_eq!(alice_emoji.len(), 7);
    assert_eq!(alice_emoji, bob_emoji, "both sides show the same emoji");
    alice.client.confirm_verification(&id).await.unwrap();
    bob.client.confirm_verification(&id).await.unwrap();
    for app in [&alice, &bob] {
        eventually_some("verification done", || async {
            let all = app.client.verifications().await;
            all.iter().any(|v| v.id == id && v.status == VerificationStatus::Done).then_some(())
        })
        .await;
    }
    let devices = alice.client.user_devices(&bob.user_id()).await.unwrap();
    assert!(devices[0].verified, "Bob's device is verified at Alice");
    let alice_device = alice.client.session().unwrap().device_id;
    let devices = bob.client.user_devices(&alice.user_id()).await.unwrap();
    assert!(devices.iter().any(|d| d.device_id == alice_device && d.verified));

    // Each vouched for the other with cross-signing: Alice's user-signing key signed Bob's
    // master key, as the server publishes it.
    let alice_token = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let (alice_id, bob_id) = (alice.user_id().to_string(), bob.user_id().to_string());
    eventually_some("Alice's signature on Bob's master key", || async {
        let keys = keys_query(&server, &alice_token, &[&alice_id, &bob_id]).await;
        let (usk_id, _) = only_key(&keys["user_signing_keys"][&alice_id]);
        keys["master_keys"][&bob_id]["signatures"][&alice_id][&usk_id].is_string().then_some(())
    })
    .await;
}

/// `POST /keys/query` for `users`, as the owner of `token`.
async fn keys_query(server: &Server, token: &str, users: &[&str]) -> serde_json::Value {
    let wanted: serde_json::Map<String, serde_json::Value> =
        users.iter().map(|u| ((*u).to_owned(), json!([]))).collect();
    server
        .post("/_matrix/client/v3/keys/query", Some(token), json!({ "device_keys": wanted }))
        .await
        .assert_ok()
        .clone()
}

/// The key id and the key of a cross-signing key object (it holds exactly one).
fn only_key(key: &serde_json::Value) -> (String, String) {
    let keys = key["keys"].as_object().unwrap_or_else(|| panic!("a key object: {key}"));
    assert_eq!(keys.len(), 1, "{key}");
    let (id, public) = keys.iter().next().unwrap();
    (id.clone(), public.as_str().unwrap().to_owned())
}

async fn cross_signing_is_bootstrapped_at_the_first_sign_in(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let alice_id = alice.user_id().to_string();
    let device = alice.client.session().unwrap().device_id;

    // What anyone sees: Bob's /keys/query of Alice shows her master and self-signing keys,
    // the self-signing key signed by the master key, and her device signed by the
    // self-signing key.
    let bob = server.register("bob", "secret-pass").await;
    let keys = keys_query(&server, &bob.access_token, &[&alice_id]).await;
    let (master_id, _) = only_key(&keys["master_keys"][&alice_id]);
    let (ssk_id, ssk) = only_key(&keys["self_signing_keys"][&alice_id]);
    assert_eq!(keys["master_keys"][&alice_id]["usage"], json!(["master"]));
    assert!(keys["self_signing_keys"][&alice_id]["signatures"][&alice_id][&master_id].is_string());
    assert!(keys["user_signing_keys"].get(&alice_id).is_none(), "the user-signing key is only for its owner");
    let device_keys = &keys["device_keys"][&alice_id][&device];
    assert!(
        device_keys["signatures"][&alice_id][&ssk_id].is_string(),
        "the device is signed by the self-signing key {ssk}: {device_keys}"
    );
    // Alice herself sees her user-signing key.
    let alice_token = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let own = keys_query(&server, &alice_token, &[&alice_id]).await;
    only_key(&own["user_signing_keys"][&alice_id]);

    let status = alice.client.security_status().await.unwrap();
    assert!(
        status.cross_signing_keys_here && status.cross_signing_published && status.device_cross_signed,
        "{status:?}"
    );

    // A later device finds the keys published and leaves them alone (no new master key).
    let dir = tempfile::tempdir().unwrap();
    let second = Client::open(dir.path()).await.unwrap();
    second.login(&server.base_url, "alice", "secret-pass").await.unwrap();
    let status = second.security_status().await.unwrap();
    assert!(
        !status.cross_signing_keys_here && status.cross_signing_published && !status.device_cross_signed,
        "{status:?}"
    );
    assert!(!second.bootstrap_cross_signing(Some("secret-pass")).await.unwrap());
    let again = keys_query(&server, &bob.access_token, &[&alice_id]).await;
    assert_eq!(again["master_keys"][&alice_id]["keys"], keys["master_keys"][&alice_id]["keys"]);
}

async fn a_new_device_restores_old_history_from_the_key_backup(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;

    let status = alice.client.security_status().await.unwrap();
    assert_eq!((status.backup_version, status.server_backup_version), (None, None));
    let recovery_key = alice.client.enable_key_backup(None).await.unwrap();
    assert!(recovery_key.starts_with("Es"), "{recovery_key}");
    let status = alice.client.security_status().await.unwrap();
    assert!(status.backup_version.is_some());
    assert_eq!(status.backup_version, status.server_backup_version);

    // Alice's own key and the one Bob shares with her both go to the backup.
    alice.client.send_text(&room, "sent before the new device").await.unwrap();
    bob.wait_for_text(&room, "sent before the new device").await;
    bob.client.send_text(&room, "Bob's old reply").await.unwrap();
    alice.wait_for_text(&room, "Bob's old reply").await;
    let alice_token = server.login("alice", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let version = status.backup_version.unwrap();
    eventually_some("two room keys in the backup", || async {
        let keys =
            server.get(&format!("/_matrix/client/v3/room_keys/keys?version={version}"), Some(&alice_token)).await;
        let sessions = keys.assert_ok()["rooms"][room.as_str()]["sessions"].as_object().map_or(0, |s| s.len());
        (sessions >= 2).then_some(())
    })
    .await;

    // A new device: the old messages arrive but cannot be decrypted (it did not exist when
    // their keys were shared) ...
    let new_dir = tempfile::tempdir().unwrap();
    let new_device = Client::open(new_dir.path()).await.unwrap();
    new_device.login(&server.base_url, "alice", "secret-pass").await.unwrap();
    new_device.start().unwrap();
    let waiting = eventually_some("the old messages, still encrypted, at the new device", || async {
        let items = new_device.timeline(&room, 100).await.unwrap();
        let waiting = items.iter().filter(|i| matches!(i.content, ItemContent::Undecryptable { .. })).count();
        (waiting >= 2).then_some(waiting)
    })
    .await;
    assert!(waiting >= 2);
    // ... a wrong key is refused with a sentence the user understands ...
    let other_key = e2ee::backup::BackupKey::new().to_recovery_key();
    let wrong = new_device.restore_key_backup(&other_key).await.unwrap_err();
    assert!(matches!(wrong, Error::InvalidInput(_)), "{wrong:?}");
    assert!(matches!(new_device.restore_key_backup("not even a key").await, Err(Error::InvalidInput(_))));
    // ... and the recovery key opens the history.
    let mut updates = new_device.subscribe();
    let restored = new_device.restore_key_backup(&recovery_key).await.unwrap();
    assert!(restored >= 2, "{restored} keys restored");
    let items = new_device.timeline(&room, 100).await.unwrap();
    let bodies: Vec<&str> = items.iter().filter_map(text).collect();
    assert!(bodies.contains(&"sent before the new device") && bodies.contains(&"Bob's old reply"), "{items:?}");
    let mut announced = 0;
    while let Ok(update) = updates.try_recv() {
        if matches!(update, Update::Timeline { item } if text(&item).is_some()) {
            announced += 1;
        }
    }
    assert!(announced >= 2, "the app is told about the decrypted items");

    // A backup with a passphrase: the new device starts one, a third device restores from
    // it with the passphrase alone (the restored keys went into the new backup too).
    new_device.enable_key_backup(Some("orange staple battery")).await.unwrap();
    assert!(matches!(new_device.enable_key_backup(Some("short")).await, Err(Error::InvalidInput(_))));
    let third_dir = tempfile::tempdir().unwrap();
    let third = Client::open(third_dir.path()).await.unwrap();
    third.login(&server.base_url, "alice", "secret-pass").await.unwrap();
    third.sync_once().await.unwrap();
    assert!(matches!(third.restore_key_backup("purple staple battery").await, Err(Error::InvalidInput(_))));
    // (The new device uploads the keys it restored with its next crypto flush.)
    eventually_some("the restored keys in the passphrase backup", || async {
        third.restore_key_backup("orange staple battery").await.unwrap();
        let items = third.timeline(&room, 100).await.unwrap();
        items.iter().any(|i| text(i) == Some("sent before the new device")).then_some(())
    })
    .await;
    new_device.stop().await;
}

/// A TCP proxy in front of the server that passes everything through, notes the
/// `Upload-Offset` of every resumable-upload `PATCH`, and once cuts the connection carrying
/// them once `cut_after` bytes went up on such connections (as a dropped Wi-Fi would: in
/// the middle of a request body).
struct CuttingProxy {
    url: String,
    patch_offsets: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    /// Bytes of requests on connections that carried a `PATCH`, in total.
    patch_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    async fn start(server: &Server, cut_after: u64) -> CuttingProxy {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64},
        };
        let upstream = server.base_url.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let patch_offsets = Arc::new(Mutex::new(Vec::new()));
        let patch_bytes = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let (offsets, bytes, done) = (patch_offsets.clone(), patch_bytes.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, offsets, bytes, done) = (upstream.clone(), offsets.clone(), bytes.clone(), done.clone());
                tokio::spawn(async move {
                    let _ = proxy_connection(client, &upstream, cut_after, &offsets, &bytes, &done).await;
                });
            }
        });
        CuttingProxy { url, patch_offsets, patch_bytes, cut }
    }
}

async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: &str,
    cut_after: u64,
    offsets: &std::sync::Mutex<Vec<u64>>,
    bytes: &std::sync::atomic::AtomicU64,
    cut: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = tokio::net::TcpStream::connect(upstream).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers = tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
    let mut buffer = vec![0u8; 64 * 1024];
    let mut carries_patches = false;
    loop {
        let n = client_read.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        let lower = chunk.to_ascii_lowercase();
        if let Some(at) = find(&lower, b"patch /_obmin/media/v1/upload/") {
            carries_patches = true;
            if let Some(header) = find(&lower[at..], b"\r\nupload-offset: ") {
                let digits: String =
                    lower[at + header + 17..].iter().take_while(|b| b.is_ascii_digit()).map(|b| *b as char).collect();
                offsets.lock().unwrap().push(digits.parse().unwrap());
            }
        }
        if carries_patches {
            let total = bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if total > cut_after && !cut.swap(true, Ordering::SeqCst) {
                // Both directions go: the client sees its request break off.
                answers.abort();
                return Ok(());
            }
        }
        server_write.write_all(chunk).await?;
    }
    let _ = answers.await;
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn an_upload_cut_midway_continues_from_the_servers_offset(backend: Backend) {
    const CHUNK: u64 = 1024 * 1024; // the core's PATCH size
    let server = Server::start(backend).await;
    // Alice's app reaches the server only through the proxy; it cuts the upload once, half
    // way into its second PATCH.
    let proxy = CuttingProxy::start(&server, CHUNK + CHUNK / 2).await;
    let alice = App::register_at(&proxy.url, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;

    let len = 4 * CHUNK + 12_345;
    let data: Vec<u8> = (0..len).map(|p| (p.wrapping_mul(2_654_435_761) >> 9) as u8).collect();
    let source = alice.dir.path().join("Quarterly Report.PDF");
    std::fs::write(&source, &data).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let item = alice.client.send_file(&room, &source, Some(tx)).await.unwrap();
    assert!(proxy.cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy cut the upload");

    // The client asked where the server got to and went on from that byte: the PATCH after
    // the cut starts mid-chunk at what the server kept, never from 0 again, and not much
    // more than the file went through the proxy.
    let offsets = proxy.patch_offsets.lock().unwrap().clone();
    assert_eq!(offsets[..2], [0, CHUNK], "{offsets:?}");
    let resumed = offsets[2];
    assert!(resumed > CHUNK && resumed < 2 * CHUNK && resumed % CHUNK != 0, "resumed at {resumed}: {offsets:?}");
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "never back to an earlier byte: {offsets:?}");
    let through = proxy.patch_bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(through < len + CHUNK, "{through} bytes sent for a {len}-byte file");
    let mut progress = Vec::new();
    while let Ok(p) = rx.try_recv() {
        progress.push(p.done);
    }
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "progress only grows: {progress:?}");
    assert_eq!(progress.last(), Some(&len));
    alice.wait_for_state(&room, &item.key, SendState::Sent).await;

    // Bob gets the file with its real type and the right bytes.
    let received = eventually_some("the file at Bob", || async {
        let items = bob.client.timeline(&room, 50).await.unwrap();
        items.into_iter().find(|i| matches!(i.content, ItemContent::File { .. }))
    })
    .await;
    let ItemContent::File { name, size, mimetype, attachment } = received.content else { unreachable!() };
    assert_eq!(
        (name.as_str(), size, mimetype.as_deref()),
        ("Quarterly Report.PDF", Some(len), Some("application/pdf"))
    );
    let dest = bob.dir.path().join("report.pdf");
    bob.client.download_file(&attachment, &dest, None).await.unwrap();
    assert_eq!(Sha256::digest(std::fs::read(&dest).unwrap()), Sha256::digest(&data), "the same bytes arrived");
}

async fn private_read_receipts_and_unknown_presence(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    let bob = App::register(&server, "bob").await;
    let room = direct_chat(&alice, &bob).await;

    // Bob reads privately: his unread count drops, Alice's message stays at ✓ (sent).
    let first = alice.client.send_text(&room, "read this quietly").await.unwrap();
    let first_event = bob.wait_for_text(&room, "read this quietly").await.event_id.expect("an event id").to_string();
    eventually_some("the message unread at Bob", || async {
        (bob.client.room(&room).await.unwrap()?.unread > 0).then_some(())
    })
    .await;
    bob.client.mark_read_privately(&room).await.unwrap();
    assert_eq!(bob.client.room(&room).await.unwrap().unwrap().unread, 0);
    // Bob answers after his receipt: once Alice has the answer, she would have the receipt.
    bob.client.send_text(&room, "noted").await.unwrap();
    alice.wait_for_text(&room, "noted").await;
    let items = alice.client.timeline(&room, 100).await.unwrap();
    let state = items.iter().find(|i| i.key == first.key).and_then(|i| i.send_state.clone());
    assert_eq!(state, Some(SendState::Sent), "a private receipt shows no ✓✓");
    // The server has it, for Bob alone.
    let bob_token = server.login("bob", "secret-pass").await.body["access_token"].as_str().unwrap().to_owned();
    let sync = server.get("/_matrix/client/v3/sync", Some(&bob_token)).await;
    let ephemeral = sync.assert_ok()["rooms"]["join"][room.as_str()]["ephemeral"]["events"].clone();
    let bob_id = bob.user_id().to_string();
    let private = ephemeral
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.receipt")
        .any(|e| e["content"][&first_event]["m.read.private"][&bob_id].is_object());
    assert!(private, "Bob's private receipt is on the server: {ephemeral}");

    // A public receipt afterwards turns ✓✓ as before.
    let second = alice.client.send_text(&room, "and this one openly").await.unwrap();
    bob.wait_for_text(&room, "and this one openly").await;
    bob.client.mark_read(&room).await.unwrap();
    alice.wait_for_state(&room, &second.key, SendState::Read).await;

    // Someone who never set a presence shows as unknown, not offline.
    let carol = server.register("carol", "secret-pass").await;
    let carol = alice.client.user(&OwnedUserId::try_from(carol.user_id.as_str()).unwrap()).await.unwrap();
    assert_eq!(carol.presence.presence, Presence::Unknown);
    assert_eq!(carol.presence.last_active_ts, None);
}

async fn older_history_loads_page_by_page(backend: Backend) {
    let server = Server::start(backend).await;
    let alice = App::register(&server, "alice").await;
    // Carol (a plain HTTP user) writes a long history before Alice joins.
    let carol = server.register("carol", "secret-pass").await;
    let room = server.create_room(&carol, json!({"name": "Archive", "invite": [alice.user_id()]})).await;
    for i in 0..75 {
        server.send_text(&carol, &room, &format!("old {i:02}")).await.assert_ok();
    }
    let room = OwnedRoomId::try_from(room).unwrap();
    alice.wait_for_room(&room, Membership::Invited).await;
    alice.client.accept_invite(&room).await.unwrap();
    alice.wait_for_text(&room, "old 74").await;
    let texts_of = |items: Vec<TimelineItem>| items.iter().filter_map(text).map(str::to_owned).collect::<Vec<_>>();
    let first = texts_of(alice.client.timeline(&room, 500).await.unwrap());
    assert!(!first.contains(&"old 00".to_owned()), "the join's sync brings only the newest: {first:?}");
    let unread = alice.client.room(&room).await.unwrap().unwrap().unread;

    let mut pages = 0;
    while alice.client.load_older(&room, 20).await.unwrap() {
        pages += 1;
        assert!(pages < 20, "back-pagination does not end");
    }
    assert!(pages >= 2, "{pages} pages");
    let expected: Vec<String> = (0..75).map(|i| format!("old {i:02}")).collect();
    assert_eq!(texts_of(alice.client.timeline(&room, 500).await.unwrap()), expected, "all of it, in order, once");
    assert!(!alice.client.load_older(&room, 20).await.unwrap(), "nothing before the room's start");
    assert_eq!(alice.client.room(&room).await.unwrap().unwrap().unread, unread, "old history is not unread");

    // New messages still go after the old ones, and the history survives a restart.
    server.send_text(&carol, room.as_str(), "new after paging").await.assert_ok();
    alice.wait_for_text(&room, "new after paging").await;
    alice.client.stop().await;
    let reopened = Client::open(alice.dir.path()).await.unwrap();
    let after = texts_of(reopened.timeline(&room, 500).await.unwrap());
    assert_eq!(after.first().map(String::as_str), Some("old 00"));
    assert_eq!(after.last().map(String::as_str), Some("new after paging"));
}
