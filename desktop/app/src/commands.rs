//! The Tauri commands the frontend calls. Each is a thin call into obmin-client: parse the
//! arguments into ruma ids, call the core, hand back the core's own serde types.

use std::path::{Path, PathBuf};

use obmin_client::{
    Attachment, Client, DeviceInfo, KeyState, KeyStorage, OwnedRoomId, OwnedUserId, Progress, RoomSummary,
    SecurityStatus, SessionInfo, TimelineItem, Update, UserSearchResult,
};
use serde::Serialize;
use tauri::{AppHandle, Emitter, Manager, State, ipc::Request};

use crate::error::{CommandError, CommandResult};

/// How many items of a room the chat view loads from the cache when it opens.
const TIMELINE_WINDOW: u32 = 200;

/// What the app keeps: the one client of this data directory.
pub struct AppState {
    pub client: Client,
}

/// Who is signed in, for the sidebar header and the profile settings.
#[derive(Debug, Serialize)]
pub struct Me {
    #[serde(flatten)]
    pub session: SessionInfo,
    pub display_name: Option<String>,
    pub avatar_colour: Option<String>,
    pub avatar_url: Option<String>,
}

fn room_id(raw: &str) -> CommandResult<OwnedRoomId> {
    OwnedRoomId::try_from(raw).map_err(|_| CommandError::invalid_input(format!("\"{raw}\" is not a room id.")))
}

fn user_id(raw: &str) -> CommandResult<OwnedUserId> {
    OwnedUserId::try_from(raw.trim())
        .map_err(|_| CommandError::invalid_input(format!("\"{raw}\" is not a user id (example: @alice:localhost).")))
}

async fn me(client: &Client, session: SessionInfo) -> CommandResult<Me> {
    // The profile is fresh from the server when online, from the cache when not.
    let profile = client.profile().await?;
    Ok(Me {
        session,
        display_name: profile.display_name,
        avatar_colour: profile.avatar_colour,
        avatar_url: profile.avatar_url.map(|url| url.to_string()),
    })
}

/// After a login or registration: start syncing and sending.
async fn signed_in(client: &Client, session: SessionInfo) -> CommandResult<Me> {
    client.start()?;
    me(client, session).await
}

/// What the window must ask before anything else: nothing, or a passphrase to choose or to
/// unlock with; `storage` says where the key is kept ("keyring" or "passphrase").
#[derive(Debug, Serialize)]
pub struct KeyInfo {
    #[serde(flatten)]
    pub state: KeyState,
    pub storage: &'static str,
    pub min_chars: usize,
}

#[tauri::command]
pub async fn key_state(state: State<'_, AppState>) -> CommandResult<KeyInfo> {
    let storage = match state.client.key_storage() {
        KeyStorage::Keyring(_) => "keyring",
        KeyStorage::Passphrase => "passphrase",
        KeyStorage::KeyFile => "file",
    };
    Ok(KeyInfo { state: state.client.key_state().await?, storage, min_chars: obmin_client::MIN_PASSPHRASE_CHARS })
}

/// Sets (first time) or checks the passphrase and opens the encryption store with it.
#[tauri::command]
pub async fn unlock(state: State<'_, AppState>, passphrase: String) -> CommandResult<()> {
    let passphrase = zeroize::Zeroizing::new(passphrase);
    Ok(state.client.unlock(&passphrase).await?)
}

/// The saved session, if there is one (the sync loop is already running then). Opens its
/// encryption first (the keyring may have failed when the app started): `locked`,
/// `keyring_unavailable` or `keyring` errors send the window back to the unlock screen.
#[tauri::command]
pub async fn restore_session(state: State<'_, AppState>) -> CommandResult<Option<Me>> {
    // The session itself is in the encrypted cache: known once encryption is open.
    state.client.open_encryption().await?;
    match state.client.session() {
        Some(session) => Ok(Some(signed_in(&state.client, session).await?)),
        None => Ok(None),
    }
}

#[tauri::command]
pub async fn login(
    state: State<'_, AppState>,
    server: String,
    username: String,
    password: String,
) -> CommandResult<Me> {
    let session = state.client.login(&server, &username, &password).await?;
    signed_in(&state.client, session).await
}

#[tauri::command]
pub async fn register(
    state: State<'_, AppState>,
    server: String,
    username: String,
    password: String,
    display_name: Option<String>,
    avatar_colour: Option<String>,
) -> CommandResult<Me> {
    let session = state
        .client
        .register(&server, &username, &password, display_name.as_deref().unwrap_or(""), avatar_colour.as_deref())
        .await?;
    signed_in(&state.client, session).await
}

#[tauri::command]
pub async fn logout(state: State<'_, AppState>) -> CommandResult<()> {
    Ok(state.client.logout().await?)
}

#[tauri::command]
pub async fn rooms(state: State<'_, AppState>) -> CommandResult<Vec<RoomSummary>> {
    Ok(state.client.rooms().await?)
}

#[tauri::command]
pub async fn timeline(state: State<'_, AppState>, room_id: String) -> CommandResult<Vec<TimelineItem>> {
    Ok(state.client.timeline(&self::room_id(&room_id)?, TIMELINE_WINDOW).await?)
}

/// Older history: what the page has (`have` items) plus a page more, and whether there is
/// more still.
#[derive(Debug, Serialize)]
pub struct History {
    pub items: Vec<TimelineItem>,
    pub more: bool,
}

/// Items per back-pagination step.
const HISTORY_PAGE: u32 = 50;

/// The page scrolled to the top of a room's history: a page more from the cache, fetched
/// from the server first (`/messages`) when the cache has no more.
#[tauri::command]
pub async fn load_older(state: State<'_, AppState>, room_id: String, have: u32) -> CommandResult<History> {
    let room_id = self::room_id(&room_id)?;
    let want = have.saturating_add(HISTORY_PAGE);
    let mut items = state.client.timeline(&room_id, want).await?;
    let mut server_has_more = false;
    if (items.len() as u32) < want {
        server_has_more = state.client.load_older(&room_id, HISTORY_PAGE).await?;
        items = state.client.timeline(&room_id, want).await?;
    }
    let more = server_has_more || items.len() as u32 >= want;
    Ok(History { items, more })
}

#[tauri::command]
pub async fn send_text(state: State<'_, AppState>, room_id: String, body: String) -> CommandResult<TimelineItem> {
    Ok(state.client.send_text(&self::room_id(&room_id)?, &body).await?)
}

#[tauri::command]
pub async fn create_direct(state: State<'_, AppState>, user_id: String) -> CommandResult<OwnedRoomId> {
    Ok(state.client.create_dm(&self::user_id(&user_id)?).await?)
}

#[tauri::command]
pub async fn create_group(
    state: State<'_, AppState>,
    name: Option<String>,
    user_ids: Vec<String>,
) -> CommandResult<OwnedRoomId> {
    let invitees = user_ids.iter().map(|raw| user_id(raw)).collect::<CommandResult<Vec<_>>>()?;
    Ok(state.client.create_group(name.as_deref().unwrap_or(""), &invitees).await?)
}

#[tauri::command]
pub async fn join_room(state: State<'_, AppState>, room_id: String) -> CommandResult<()> {
    Ok(state.client.accept_invite(&self::room_id(&room_id)?).await?)
}

/// Declines an invitation or leaves a joined room.
#[tauri::command]
pub async fn leave_room(state: State<'_, AppState>, room_id: String) -> CommandResult<()> {
    let room_id = self::room_id(&room_id)?;
    let invited = matches!(
        state.client.room(&room_id).await?,
        Some(RoomSummary { membership: obmin_client::Membership::Invited, .. })
    );
    if invited { Ok(state.client.decline_invite(&room_id).await?) } else { Ok(state.client.leave(&room_id).await?) }
}

#[tauri::command]
pub async fn set_typing(state: State<'_, AppState>, room_id: String, typing: bool) -> CommandResult<()> {
    Ok(state.client.set_typing(&self::room_id(&room_id)?, typing).await?)
}

/// Marks the room read up to its newest message: a public receipt (the sender sees ✓✓), or
/// a private one when the user turned read receipts off (unread counts still follow).
#[tauri::command]
pub async fn mark_read(state: State<'_, AppState>, room_id: String, private: Option<bool>) -> CommandResult<()> {
    let room_id = self::room_id(&room_id)?;
    if private.unwrap_or(false) {
        Ok(state.client.mark_read_privately(&room_id).await?)
    } else {
        Ok(state.client.mark_read(&room_id).await?)
    }
}

/// Online while the window is in use, Unavailable when it has been in the background a while
/// (the frontend decides when); others see it as status and "last seen".
#[tauri::command]
pub async fn set_presence(state: State<'_, AppState>, presence: obmin_client::Presence) -> CommandResult<()> {
    Ok(state.client.set_presence(presence, None).await?)
}

#[tauri::command]
pub async fn search_users(state: State<'_, AppState>, term: String) -> CommandResult<Vec<UserSearchResult>> {
    Ok(state.client.search_users(&term).await?)
}

/// Saves the display name and avatar colour; returns the updated [`Me`].
#[tauri::command]
pub async fn set_profile(
    state: State<'_, AppState>,
    display_name: Option<String>,
    avatar_colour: Option<String>,
) -> CommandResult<Me> {
    let client = &state.client;
    let session = client.session().ok_or(obmin_client::Error::NotLoggedIn)?;
    let current = client.profile().await?;
    if let Some(name) = display_name.filter(|name| current.display_name.as_ref() != Some(name)) {
        client.set_display_name(&name).await?;
    }
    if let Some(colour) = avatar_colour.filter(|colour| current.avatar_colour.as_ref() != Some(colour)) {
        client.set_avatar_colour(&colour).await?;
    }
    me(client, session).await
}

/// A raw-body command's header, percent-decoded (the frontend encodes non-ASCII names).
fn header(request: &Request<'_>, name: &str) -> CommandResult<String> {
    let raw = request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| CommandError::invalid_input(format!("missing {name}")))?;
    percent_decode(raw).ok_or_else(|| CommandError::invalid_input(format!("bad {name}")))
}

/// Decodes `%XX` escapes (what JavaScript's encodeURIComponent produces). Hand-written:
/// eight lines do not justify another dependency.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn raw_body<'a>(request: &'a Request<'_>) -> CommandResult<&'a [u8]> {
    match request.body() {
        tauri::ipc::InvokeBody::Raw(bytes) => Ok(bytes.as_slice()),
        tauri::ipc::InvokeBody::Json(_) => Err(CommandError::invalid_input("expected the file's bytes")),
    }
}

/// A file the page handed over, written to a private staging directory under its own name
/// (the core sends files from a path and names the message after the file name).
struct Staged {
    dir: PathBuf,
    path: PathBuf,
}

impl Staged {
    async fn write(client_dir: &Path, name: &str, bytes: &[u8]) -> CommandResult<Staged> {
        // Only the last path component of what the page says, never "..".
        let name = Path::new(name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n != "..")
            .unwrap_or_else(|| "file".into());
        let dir = client_dir.join("outgoing").join(format!("{:016x}", rand_u64()));
        tokio::fs::create_dir_all(&dir).await.map_err(file_error)?;
        let path = dir.join(name);
        tokio::fs::write(&path, bytes).await.map_err(file_error)?;
        Ok(Staged { dir, path })
    }

    async fn remove(self) {
        let _ = tokio::fs::remove_dir_all(&self.dir).await;
    }
}

/// A random-enough id for a staging directory (no cryptographic need; hashing the time and
/// an address keeps the shell free of a rand dependency).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn file_error(error: std::io::Error) -> CommandError {
    CommandError::from(obmin_client::Error::File(error.to_string()))
}

/// Where staged uploads and downloaded avatars live: the app's cache directory.
fn cache_dir(app: &AppHandle) -> CommandResult<PathBuf> {
    Ok(app.path().app_cache_dir()?)
}

/// Sends a file into a room. The body is the file's bytes; headers `x-room-id` and
/// `x-file-name`. Progress goes to the window as `file_progress` updates under the key
/// `upload:<room>`; returns the queued timeline item once the upload is complete.
#[tauri::command]
pub async fn send_file(
    app: AppHandle,
    state: State<'_, AppState>,
    request: Request<'_>,
) -> CommandResult<TimelineItem> {
    let room_id = self::room_id(&header(&request, "x-room-id")?)?;
    let name = header(&request, "x-file-name")?;
    let staged = Staged::write(&cache_dir(&app)?, &name, raw_body(&request)?).await?;
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let key = format!("upload:{room_id}");
    let forwarder = {
        let app = app.clone();
        tauri::async_runtime::spawn(async move {
            while let Some(progress) = progress_rx.recv().await {
                let _ = app.emit(crate::updates::EVENT, Update::FileProgress { key: key.clone(), progress });
            }
        })
    };
    let result = state.client.send_file(&room_id, &staged.path, Some(progress_tx)).await;
    let _ = forwarder.await;
    staged.remove().await;
    Ok(result?)
}

/// Downloads (and decrypts) an attachment into the Downloads folder; returns the path.
#[tauri::command]
pub async fn save_file(
    app: AppHandle,
    state: State<'_, AppState>,
    attachment: Attachment,
    name: String,
) -> CommandResult<String> {
    let dir = app.path().download_dir().or_else(|_| app.path().home_dir())?;
    let name = Path::new(&name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    // Never overwrite: "report.bin", "report (1).bin", ...
    let mut dest = dir.join(&name);
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem.to_owned(), format!(".{ext}")),
        _ => (name.clone(), String::new()),
    };
    let mut n = 1;
    while dest.exists() {
        dest = dir.join(format!("{stem} ({n}){ext}"));
        n += 1;
    }
    state.client.download_file(&attachment, &dest, None).await?;
    Ok(dest.display().to_string())
}

/// Makes the bytes in the body (an image; header `x-file-name`) our avatar.
#[tauri::command]
pub async fn set_avatar(app: AppHandle, state: State<'_, AppState>, request: Request<'_>) -> CommandResult<()> {
    let name = header(&request, "x-file-name").unwrap_or_else(|_| "avatar".into());
    let staged = Staged::write(&cache_dir(&app)?, &name, raw_body(&request)?).await?;
    let result = state.client.set_avatar(&staged.path).await;
    staged.remove().await;
    Ok(result?)
}

/// Our own devices, with whether we verified them.
#[tauri::command]
pub async fn devices(state: State<'_, AppState>) -> CommandResult<Vec<DeviceInfo>> {
    let session = state.client.session().ok_or(obmin_client::Error::NotLoggedIn)?;
    Ok(state.client.user_devices(&session.user_id).await?)
}

/// Starts emoji verification with a device; progress arrives as `verification` updates.
#[tauri::command]
pub async fn verify_device(state: State<'_, AppState>, user_id: String, device_id: String) -> CommandResult<String> {
    Ok(state.client.start_verification(&self::user_id(&user_id)?, &device_id).await?)
}

/// Starts emoji verification with another person: with their first device we have not
/// verified (a person on one device is the usual case).
#[tauri::command]
pub async fn verify_user(state: State<'_, AppState>, user_id: String) -> CommandResult<String> {
    let user_id = self::user_id(&user_id)?;
    let devices = state.client.user_devices(&user_id).await?;
    let device = devices.iter().find(|d| !d.verified).ok_or_else(|| {
        CommandError::invalid_input(if devices.is_empty() {
            format!("{user_id} has no devices to verify.")
        } else {
            format!("You already verified all devices of {user_id}.")
        })
    })?;
    Ok(state.client.start_verification(&user_id, &device.device_id).await?)
}

/// Whether we verified every device of a person (and they have at least one).
#[tauri::command]
pub async fn user_verified(state: State<'_, AppState>, user_id: String) -> CommandResult<bool> {
    let devices = state.client.user_devices(&self::user_id(&user_id)?).await?;
    Ok(!devices.is_empty() && devices.iter().all(|d| d.verified))
}

#[tauri::command]
pub async fn verification_accept(state: State<'_, AppState>, flow_id: String) -> CommandResult<()> {
    Ok(state.client.accept_verification(&flow_id).await?)
}

/// The emoji match.
#[tauri::command]
pub async fn verification_confirm(state: State<'_, AppState>, flow_id: String) -> CommandResult<()> {
    Ok(state.client.confirm_verification(&flow_id).await?)
}

/// The emoji do not match: cancel, telling the other side why.
#[tauri::command]
pub async fn verification_mismatch(state: State<'_, AppState>, flow_id: String) -> CommandResult<()> {
    Ok(state.client.cancel_verification(&flow_id, true).await?)
}

#[tauri::command]
pub async fn verification_cancel(state: State<'_, AppState>, flow_id: String) -> CommandResult<()> {
    Ok(state.client.cancel_verification(&flow_id, false).await?)
}

/// Cross-signing and key backup, for Settings → Security.
#[tauri::command]
pub async fn security_status(state: State<'_, AppState>) -> CommandResult<SecurityStatus> {
    Ok(state.client.security_status().await?)
}

/// Sets up cross-signing when the first sign-in could not (the password answers the
/// server's re-authentication, if it asks). Returns whether new keys were made.
#[tauri::command]
pub async fn set_up_cross_signing(state: State<'_, AppState>, password: Option<String>) -> CommandResult<bool> {
    Ok(state.client.bootstrap_cross_signing(password.as_deref().filter(|p| !p.is_empty())).await?)
}

/// Starts a key backup; returns the recovery key, which the page shows once.
#[tauri::command]
pub async fn enable_key_backup(state: State<'_, AppState>, passphrase: Option<String>) -> CommandResult<String> {
    Ok(state.client.enable_key_backup(passphrase.as_deref().filter(|p| !p.is_empty())).await?)
}

/// Restores room keys from the backup with its recovery key or passphrase.
#[tauri::command]
pub async fn restore_key_backup(state: State<'_, AppState>, secret: String) -> CommandResult<usize> {
    Ok(state.client.restore_key_backup(&secret).await?)
}

/// An avatar picture (an `mxc://` URI from a profile) as a `data:` URL the page can show.
/// Downloaded once into the cache directory; avatars are small and unencrypted.
#[tauri::command]
pub async fn avatar_image(app: AppHandle, state: State<'_, AppState>, url: String) -> CommandResult<String> {
    use base64::Engine;
    let Some(media) = url.strip_prefix("mxc://").filter(|m| m.split('/').count() == 2) else {
        return Err(CommandError::invalid_input(format!("\"{url}\" is not an mxc:// URI.")));
    };
    let dir = cache_dir(&app)?.join("avatars");
    tokio::fs::create_dir_all(&dir).await.map_err(file_error)?;
    // The media id is the server's opaque token: keep only safe characters for the name.
    let file_name: String =
        media.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    let path = dir.join(file_name);
    if !path.exists() {
        let attachment = Attachment { url: url.as_str().into(), encrypted_file: None };
        state.client.download_file(&attachment, &path, None).await?;
    }
    let bytes = tokio::fs::read(&path).await.map_err(file_error)?;
    Ok(format!("data:{};base64,{}", image_type(&bytes), base64::engine::general_purpose::STANDARD.encode(&bytes)))
}

/// The image type from the file's first bytes (the server's content type is not kept with
/// the cached file, and a data URL needs one).
fn image_type(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        _ => "application/octet-stream",
    }
}
