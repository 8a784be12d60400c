//! End-to-end test of the real desktop app window: a real homeserver, the real app binary
//! under WebDriver (tauri-driver + WebKitWebDriver on Xvfb), and a second user on the real
//! client core (obmin-client) who must receive and decrypt what the window sends.
//!
//! Needs a display and a driver, so it is `#[ignore]`d in the normal test run;
//! `scripts/ui-test` builds everything, starts Xvfb and tauri-driver and runs it with:
//!
//! * `OBMIN_WEBDRIVER_URL`: the tauri-driver address (required),
//! * `OBMIN_DESKTOP_BIN`: the app binary (default: `obmin-desktop` next to `homeserver`),
//! * `OBMIN_UI_ARTIFACTS`: where screenshots go (default: `target/ui-artifacts`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use conformance::{Backend, Server};
use obmin_client::{Client, ItemContent, Membership, OwnedRoomId, SendState, TimelineItem, Update, VerificationStatus};
use obmin_desktop_ui_tests::Session;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const PASSWORD: &str = "correct horse battery staple";
/// The passphrase that seals the app's encryption keys (scripts/ui-test runs the app without
/// a D-Bus session, so there is no OS keyring and the window asks for one).
const PASSPHRASE: &str = "a long passphrase for the keys";
/// WebDriver's Enter key.
const ENTER: &str = "\u{E007}";

fn app_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OBMIN_DESKTOP_BIN") {
        return PathBuf::from(path);
    }
    let homeserver = conformance::homeserver_bin();
    homeserver.with_file_name("obmin-desktop")
}

fn artifacts_dir() -> PathBuf {
    std::env::var_os("OBMIN_UI_ARTIFACTS").map(PathBuf::from).unwrap_or_else(|| {
        conformance::homeserver_bin().parent().and_then(Path::parent).expect("target dir").join("ui-artifacts")
    })
}

/// The peer: a second person on the client core, in their own data directory.
struct Peer {
    client: Client,
    updates: tokio::sync::broadcast::Receiver<Update>,
    dir: tempfile::TempDir,
}

impl Peer {
    async fn register(server: &Server, name: &str) -> Peer {
        let dir = tempfile::tempdir().expect("temp dir");
        let client = Client::open(dir.path()).await.expect("open the peer's client");
        let updates = client.subscribe();
        client
            .register(&server.base_url, name, PASSWORD, "Bob Peer", Some("#1f5fbf"))
            .await
            .expect("register the peer");
        client.start().expect("start the peer's sync");
        Peer { client, updates, dir }
    }

    /// Waits for an update that `pick` accepts.
    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Update) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(remaining, self.updates.recv()).await {
                Ok(Ok(update)) => {
                    if let Some(found) = pick(&update) {
                        return found;
                    }
                }
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(error)) => panic!("peer updates ended while waiting for {what}: {error}"),
                Err(_) => panic!("the peer did not see {what} within {WAIT:?}"),
            }
        }
    }

    /// Waits until the peer has an invitation, and accepts it.
    async fn accept_first_invite(&mut self) -> OwnedRoomId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let rooms = self.client.rooms().await.expect("peer rooms");
            if let Some(room) = rooms.iter().find(|r| r.membership == Membership::Invited) {
                self.client.accept_invite(&room.room_id).await.expect("peer accepts the invite");
                return room.room_id.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "the peer got no invitation from the app");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for a message from `sender` in `room` and returns it.
    async fn wait_for_message(&mut self, room: &OwnedRoomId, sender: &str, what: &str) -> TimelineItem {
        // It may have arrived already (before we listened): look in the cache first.
        let matching = |item: &TimelineItem| {
            item.room_id == *room
                && item.sender.as_str() == sender
                && matches!(item.content, ItemContent::Text { .. } | ItemContent::File { .. })
        };
        if let Some(item) =
            self.client.timeline(room, 50).await.expect("peer timeline").into_iter().find(|i| matching(i))
        {
            return item;
        }
        self.wait_for(what, |update| match update {
            Update::Timeline { item } if matching(item) => Some(item.clone()),
            _ => None,
        })
        .await
    }
}

/// Text of everything matching `css`, joined by newlines (via the page, one round trip).
async fn texts(app: &Session, css: &str) -> String {
    let value = app
        .execute(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent).join('\\n');",
            vec![json!(css)],
        )
        .await
        .expect("read texts");
    value.as_str().unwrap_or_default().to_owned()
}

async fn wait_text(app: &Session, css: &str, needle: &str) -> Result<String, String> {
    let script = "const t = [...document.querySelectorAll(arguments[0])].map(e => e.textContent).join('\\n');\
                  return t.includes(arguments[1]) ? t : null;";
    match app.wait_until(&format!("`{needle}` in `{css}`"), script, vec![json!(css), json!(needle)], WAIT).await {
        Ok(found) => Ok(found.as_str().unwrap_or_default().to_owned()),
        Err(e) => Err(format!("{e}; the window shows `{}`", texts(app, css).await)),
    }
}

async fn shot(app: &Session, name: &str) {
    let path = artifacts_dir().join(format!("{name}.png"));
    // WebKit paints after the DOM is ready: on a loaded machine the first screenshot of a
    // new screen can still be blank (seen in CI with the login form already in the DOM), so
    // take it again for up to five seconds before calling the window blank.
    let mut size = 0;
    for _ in 0..20 {
        app.screenshot(&path).await.unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size > 5_000 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("screenshot {name} is only {size} bytes: is the window blank?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Xvfb, tauri-driver and WebKitWebDriver: run scripts/ui-test"]
async fn desktop_app_end_to_end() {
    conformance::install_crypto_provider();
    let driver = std::env::var("OBMIN_WEBDRIVER_URL").expect("OBMIN_WEBDRIVER_URL (scripts/ui-test sets it)");
    let mut server = Server::start(Backend::Sqlite).await;
    let mut bob = Peer::register(&server, "bob").await;
    let bob_id = bob.client.session().expect("bob's session").user_id.to_string();

    let app_data = tempfile::tempdir().expect("app data dir");
    let args = ["--data-dir".into(), app_data.path().display().to_string()];
    let app = Session::start(&driver, &app_binary(), &args).await.expect("start the app under WebDriver");
    let mut result = run(&app, &mut server, &mut bob, &bob_id).await;
    if result.is_err() {
        let _ = app.screenshot(&artifacts_dir().join("failure.png")).await;
    }
    let _ = app.quit().await;
    if result.is_ok() {
        // The app starts again on the same data directory: locked until the passphrase.
        let app = Session::start(&driver, &app_binary(), &args).await.expect("restart the app under WebDriver");
        result = unlock_after_restart(&app).await;
        if result.is_err() {
            let _ = app.screenshot(&artifacts_dir().join("failure.png")).await;
        }
        let _ = app.quit().await;
    }
    if let Err(message) = result {
        panic!("{message}\n--- homeserver log tail ---\n{}", tail(&server.log(), 40));
    }
}

/// The id of the focused element.
async fn focused(app: &Session) -> Result<Value, String> {
    app.execute("return document.activeElement.id", vec![]).await.map_err(|e| e.to_string())
}

/// First start without an OS keyring: the window asks to choose a passphrase (typed twice)
/// before anything else.
async fn choose_passphrase(app: &Session) -> Result<(), String> {
    let err = |e: obmin_desktop_ui_tests::Error| e.to_string();
    app.wait_for("#unlock-form", WAIT).await.map_err(err)?;
    wait_text(app, "#unlock-title", "Protect your encryption keys").await?;
    wait_text(app, "#unlock-intro", "No system keyring").await?;
    assert_eq!(focused(app).await?, json!("unlock-passphrase"), "focus starts in the passphrase field");
    app.wait_for("#unlock-confirm", WAIT).await.map_err(err)?;
    app.fill("#unlock-passphrase", PASSPHRASE).await.map_err(err)?;
    app.fill("#unlock-confirm", &format!("{PASSPHRASE} typo{ENTER}")).await.map_err(err)?;
    wait_text(app, "#unlock-error", "The two passphrases differ").await?;
    shot(app, "passphrase").await;
    // Enter in the field submits the form.
    app.fill("#unlock-confirm", &format!("{PASSPHRASE}{ENTER}")).await.map_err(err)?;
    Ok(())
}

/// The restarted app: the unlock screen refuses a wrong passphrase, takes the right one and
/// shows the signed-in window with the conversation from the local cache.
async fn unlock_after_restart(app: &Session) -> Result<(), String> {
    let err = |e: obmin_desktop_ui_tests::Error| e.to_string();
    app.wait_for("#unlock-form", WAIT).await.map_err(err)?;
    wait_text(app, "#unlock-title", "Unlock Obmin").await?;
    let confirm_shown = app.find("#unlock-confirm").await.map_err(err)?.ok_or("no confirm field")?;
    assert!(!app.displayed(&confirm_shown).await.map_err(err)?, "unlocking asks for the passphrase once");
    assert_eq!(focused(app).await?, json!("unlock-passphrase"));
    app.fill("#unlock-passphrase", &format!("not the passphrase{ENTER}")).await.map_err(err)?;
    wait_text(app, "#unlock-error", "Wrong passphrase").await?;
    app.fill("#unlock-passphrase", PASSPHRASE).await.map_err(err)?;
    app.click_on("#unlock-submit").await.map_err(err)?;
    app.wait_for("#screen-main", WAIT).await.map_err(err)?;
    wait_text(app, "#me-name", "Alice Desktop").await?;
    wait_text(app, "#room-list", "Bob Peer").await?;
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The scenario. Errors are strings so the caller can screenshot before failing.
///
/// One long function on purpose: it is a single user's journey through the window, read top to
/// bottom as a script (each `// ---` section is one screen); the steps share one app session
/// and the state each step leaves behind.
async fn run(app: &Session, server: &mut Server, bob: &mut Peer, bob_id: &str) -> Result<(), String> {
    let err = |e: obmin_desktop_ui_tests::Error| e.to_string();

    // --- No OS keyring: a passphrase for the encryption keys comes first.
    choose_passphrase(app).await?;

    // --- Login screen: defaults, and the two errors people meet first.
    app.wait_for("#login-form", WAIT).await.map_err(err)?;
    let default_server =
        app.execute("return document.getElementById('login-server').value", vec![]).await.map_err(err)?;
    assert_eq!(default_server, json!("http://localhost:8008"), "the server address defaults to localhost");
    shot(app, "login").await;

    app.fill("#login-server", "http://127.0.0.1:9").await.map_err(err)?;
    app.fill("#login-username", "alice").await.map_err(err)?;
    app.fill("#login-password", "whatever").await.map_err(err)?;
    app.click_on("#login-submit").await.map_err(err)?;
    let unreachable = wait_text(app, "#login-error", "cannot be reached").await?;
    assert!(unreachable.contains("127.0.0.1:9"), "the error names the address: {unreachable}");

    app.fill("#login-server", &server.base_url).await.map_err(err)?;
    app.fill("#login-username", "bob").await.map_err(err)?;
    app.fill("#login-password", "not the password").await.map_err(err)?;
    app.click_on("#login-submit").await.map_err(err)?;
    wait_text(app, "#login-error", "Wrong user name or password").await?;

    // --- Registration with a display name and an avatar colour.
    app.click_on("#go-register").await.map_err(err)?;
    app.fill("#register-server", &server.base_url).await.map_err(err)?;
    app.fill("#register-username", "alice").await.map_err(err)?;
    app.fill("#register-display-name", "Alice Desktop").await.map_err(err)?;
    app.fill("#register-password", PASSWORD).await.map_err(err)?;
    // The label, not the radio inside it: the radio is transparent (the swatch shows instead).
    app.click_on("#register-colour label:nth-of-type(3)").await.map_err(err)?;
    app.click_on("#register-submit").await.map_err(err)?;
    app.wait_for("#screen-main", WAIT).await.map_err(err)?;
    wait_text(app, "#me-name", "Alice Desktop").await?;
    let colour =
        app.execute("return document.getElementById('me-avatar').style.backgroundColor", vec![]).await.map_err(err)?;
    assert_eq!(colour, json!("rgb(106, 63, 181)"), "the avatar shows the chosen colour (violet, #6a3fb5)");
    let alice_id = texts(app, "#me-id").await;
    assert!(alice_id.starts_with("@alice:"), "signed in as alice: {alice_id}");

    // --- A direct chat with bob, who accepts on the client core.
    app.click_on("#new-chat").await.map_err(err)?;
    app.fill("#new-chat-users", bob_id).await.map_err(err)?;
    app.click_on("#new-chat-submit").await.map_err(err)?;
    app.wait_for("#chat-view", WAIT).await.map_err(err)?;
    let room = bob.accept_first_invite().await;
    // The window shows bob joining (a membership notice) before alice writes, as a person
    // would see it; the room key then goes to bob's device with the first message.
    let joined = "return [...document.querySelectorAll('#timeline .notice')]\
                  .some(n => n.textContent.includes('joined') && (n.textContent.includes(arguments[0]) || n.textContent.includes('Bob Peer')));";
    app.wait_until("bob's join in the timeline", joined, vec![json!(bob_id)], WAIT).await.map_err(err)?;

    // --- Alice writes in the window; bob's client receives and decrypts it.
    let hello = "Hello Bob, this is the desktop app 👋";
    // WebKitWebDriver types only characters of the Basic Multilingual Plane (the 👋 came out
    // dropped), so the words are typed and the emoji is added the way a paste would: into the
    // field's value, announced with an input event.
    let typed = hello.trim_end_matches('👋');
    app.fill("#composer-input", typed).await.map_err(err)?;
    app.execute(
        "const input = document.getElementById('composer-input');\
         input.value += arguments[0];\
         input.dispatchEvent(new Event('input', { bubbles: true }));\
         return input.value;",
        vec![json!("👋")],
    )
    .await
    .map_err(err)
    .and_then(|value| if value == json!(hello) { Ok(()) } else { Err(format!("the composer holds {value}")) })?;
    app.click_on("#send").await.map_err(err)?;
    app.wait_for(".msg.out[data-status='sent'], .msg.out[data-status='read']", WAIT).await.map_err(err)?;
    let received = bob.wait_for_message(&room, &alice_id, "alice's message").await;
    assert!(received.encrypted, "the message travelled end-to-end encrypted");
    assert_eq!(received.content, ItemContent::Text { body: hello.to_owned() }, "bob decrypted alice's words");

    // --- Bob reads it (✓✓ in the window), types, and replies.
    bob.client.mark_read(&room).await.map_err(|e| e.to_string())?;
    app.wait_for(".msg.out[data-status='read']", WAIT).await.map_err(err)?;
    bob.client.set_typing(&room, true).await.map_err(|e| e.to_string())?;
    wait_text(app, "#typing-indicator", "is typing").await?;
    let reply = "Hi Alice! Loud and clear.";
    let sent = bob.client.send_text(&room, reply).await.map_err(|e| e.to_string())?;
    assert_eq!(sent.send_state, Some(SendState::Sending));
    wait_text(app, ".msg.in .bubble", reply).await?;

    // --- Alice attaches a file (through the page's file input); bob downloads and decrypts it.
    let file_bytes: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let script = "const input = document.getElementById('file-input');\
                  const data = new Uint8Array(arguments[0]);\
                  const transfer = new DataTransfer();\
                  transfer.items.add(new File([data], 'report.bin', { type: 'application/octet-stream' }));\
                  input.files = transfer.files;\
                  input.dispatchEvent(new Event('change'));\
                  return input.files.length === 0;";
    let cleared = app.execute(script, vec![json!(file_bytes)]).await.map_err(err)?;
    assert_eq!(cleared, Value::Bool(true), "the app took the file from the input");
    wait_text(app, ".msg.out .file-name", "report.bin").await?;
    app.wait_for(".msg.out.file[data-status='sent'], .msg.out.file[data-status='read']", WAIT).await.map_err(err)?;
    let file_item = bob
        .wait_for("alice's file", |update| match update {
            Update::Timeline { item } if matches!(&item.content, ItemContent::File { name, .. } if name == "report.bin") => {
                Some(item.clone())
            }
            _ => None,
        })
        .await;
    let ItemContent::File { attachment, size, .. } = &file_item.content else { unreachable!() };
    assert_eq!(*size, Some(file_bytes.len() as u64));
    assert!(attachment.encrypted_file.is_some(), "the file was encrypted");
    let dest = bob.dir.path().join("report.bin");
    bob.client.download_file(attachment, &dest, None).await.map_err(|e| e.to_string())?;
    assert_eq!(std::fs::read(&dest).map_err(|e| e.to_string())?, file_bytes, "bob decrypted the same bytes");

    // --- The light theme for the screenshots: the page's preferences live in WebKit's
    // storage, which outlives the app's --data-dir, so a previous run may have left dark.
    app.click_on("#open-settings").await.map_err(err)?;
    app.click_on("#tab-appearance").await.map_err(err)?;
    app.click_on("#theme-light").await.map_err(err)?;
    let theme = app.execute("return document.documentElement.dataset.theme", vec![]).await.map_err(err)?;
    assert_eq!(theme, json!("light"));
    app.click_on("#tab-profile").await.map_err(err)?;
    app.click_on("#settings-back").await.map_err(err)?;
    app.wait_for("#screen-main", WAIT).await.map_err(err)?;

    // --- Emoji verification with bob, started from the chat header; bob accepts on the core.
    verify_by_emoji(app, bob).await?;

    // --- Screenshots: main chat light, settings, main chat dark.
    app.execute("document.activeElement.blur(); return true;", vec![]).await.map_err(err)?;
    shot(app, "main-light").await;
    app.click_on("#open-settings").await.map_err(err)?;
    app.wait_for("#screen-settings", WAIT).await.map_err(err)?;
    let name = app.execute("return document.getElementById('profile-name').value", vec![]).await.map_err(err)?;
    assert_eq!(name, json!("Alice Desktop"), "the profile shows our display name");
    shot(app, "settings").await;
    app.click_on("#tab-appearance").await.map_err(err)?;
    app.click_on("#theme-dark").await.map_err(err)?;
    let theme = app.execute("return document.documentElement.dataset.theme", vec![]).await.map_err(err)?;
    assert_eq!(theme, json!("dark"));
    app.click_on("#settings-back").await.map_err(err)?;
    app.wait_for("#screen-main", WAIT).await.map_err(err)?;
    app.execute("document.activeElement.blur(); return true;", vec![]).await.map_err(err)?;
    shot(app, "main-dark").await;

    // --- The network drops: the window says so, and recovers when the server is back.
    let address = server.base_url.trim_start_matches("http://").to_owned();
    server.kill();
    wait_text(app, "#connection-banner", "Reconnecting").await?;
    server.set_env("OBMIN_LISTEN", &address); // the same address the app knows
    server.restart().await;
    app.wait_until(
        "the connection banner to go away",
        "return document.getElementById('connection-banner').hidden;",
        vec![],
        Duration::from_secs(90),
    )
    .await
    .map_err(err)?;
    Ok(())
}

/// The window and bob verify each other by emoji: the test reads the emoji the window shows
/// and compares them with bob's, both confirm, and the window shows bob as verified.
async fn verify_by_emoji(app: &Session, bob: &mut Peer) -> Result<(), String> {
    let err = |e: obmin_desktop_ui_tests::Error| e.to_string();
    app.wait_for("#chat-verify:not([hidden])", WAIT).await.map_err(err)?;
    app.click_on("#chat-verify").await.map_err(err)?;
    let id = bob
        .wait_for("the verification request", |update| match update {
            Update::Verification { verification } if verification.status == VerificationStatus::Requested => {
                Some(verification.id.clone())
            }
            _ => None,
        })
        .await;
    bob.client.accept_verification(&id).await.map_err(|e| e.to_string())?;

    let shown = app
        .wait_until(
            "seven emoji in the verification dialog",
            "const d = document.getElementById('verification');\
             const e = [...d.querySelectorAll('#verification-emoji li')];\
             return d.open && e.length === 7 ? e.map(li => li.querySelector('.emoji').textContent + ' ' + li.lastChild.textContent) : null;",
            vec![],
            WAIT,
        )
        .await
        .map_err(err)?;
    let shown: Vec<String> = serde_json::from_value(shown).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let bobs: Vec<String> = loop {
        let found = bob.client.verifications().await.into_iter().find_map(|v| match v.status {
            VerificationStatus::ShowEmoji(emoji) if v.id == id => Some(emoji),
            _ => None,
        });
        if let Some(emoji) = found {
            break emoji.into_iter().map(|e| format!("{} {}", e.symbol, e.name)).collect();
        }
        if tokio::time::Instant::now() > deadline {
            return Err("bob never showed the emoji".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(shown, bobs, "the window shows the same emoji, in the same order, as bob's client");
    let focused = app.execute("return document.activeElement.id", vec![]).await.map_err(err)?;
    assert_eq!(focused, json!("verification-match"), "focus is on the next step");
    shot(app, "verification").await;

    app.click_on("#verification-match").await.map_err(err)?;
    bob.client.confirm_verification(&id).await.map_err(|e| e.to_string())?;
    wait_text(app, "#verification-status", "Verified").await?;
    bob.wait_for("the verification to finish", |update| match update {
        Update::Verification { verification }
            if verification.id == id && verification.status == VerificationStatus::Done =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    app.click_on("#verification-close").await.map_err(err)?;
    app.wait_for("#chat-verified:not([hidden])", WAIT).await.map_err(err)?;
    let verify_hidden =
        app.execute("return document.getElementById('chat-verify').hidden", vec![]).await.map_err(err)?;
    assert_eq!(verify_hidden, json!(true), "no Verify button once bob is verified");
    Ok(())
}
