//! The data the app shows: room summaries, timeline items, profiles, and the [`Update`]s the
//! client broadcasts when any of them changes. Plain data, `serde`-serialisable so the Tauri
//! shell can hand it to the web frontend unchanged.

use ruma::{OwnedEventId, OwnedMxcUri, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};

/// The custom profile field (Matrix v1.16 extensible profiles) that holds the avatar colour.
pub const AVATAR_COLOUR_FIELD: &str = "io.obmin.avatar_colour";

/// Who is signed in, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub server_url: String,
    pub user_id: OwnedUserId,
    pub device_id: String,
}

/// The connection to the homeserver, as the sync loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    /// Not started, or signed out.
    Offline,
    /// The last sync succeeded.
    Online,
    /// The last sync failed; the next attempt is in `retry_in_ms`.
    Reconnecting { retry_in_ms: u64 },
}

/// Our membership of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Membership {
    Joined,
    Invited,
    Left,
}

/// One row of the room list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub room_id: OwnedRoomId,
    /// The room's name, else the DM peer's display name, else the room id.
    pub name: String,
    pub membership: Membership,
    /// For a direct chat: the other person.
    pub dm_peer: Option<UserSummary>,
    /// Who invited us (invites only).
    pub inviter: Option<OwnedUserId>,
    pub encrypted: bool,
    /// Messages from others after our last read receipt.
    pub unread: u64,
    pub last_message: Option<TimelineItem>,
    pub member_count: u64,
}

/// A user as the app shows them: name, avatar, colour, presence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSummary {
    pub user_id: OwnedUserId,
    pub display_name: Option<String>,
    pub avatar_url: Option<OwnedMxcUri>,
    pub avatar_colour: Option<String>,
    pub presence: PresenceInfo,
}

/// Presence states: the spec's three, and `Unknown` for someone whose presence we never
/// heard (they never set one, or their server does not share it): not the same as offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Presence {
    Online,
    Unavailable,
    Offline,
    #[default]
    Unknown,
}

/// Presence and last seen of a user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresenceInfo {
    pub presence: Presence,
    pub status_msg: Option<String>,
    /// When the user was last active, milliseconds since the Unix epoch (None if unknown).
    pub last_active_ts: Option<u64>,
    pub currently_active: bool,
}

/// Our own profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub user_id: OwnedUserId,
    pub display_name: Option<String>,
    pub avatar_url: Option<OwnedMxcUri>,
    pub avatar_colour: Option<String>,
}

/// Delivery state of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendState {
    /// In the outbox, not yet accepted by the server (kept across restarts, retried).
    Sending,
    /// The server has it (✓).
    Sent,
    /// Someone else in the room has read it (✓✓).
    Read,
    /// Given up for good (the server refused it); `error` says why.
    Failed { error: String },
}

/// What a timeline item shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ItemContent {
    Text {
        body: String,
    },
    /// A file; [`crate::Client::download_file`] fetches and decrypts it.
    File {
        name: String,
        size: Option<u64>,
        mimetype: Option<String>,
        attachment: Attachment,
    },
    /// Someone joined, left, was invited, changed name, ...
    Membership {
        user_id: OwnedUserId,
        change: String,
    },
    /// An encrypted message we have no key for (yet).
    Undecryptable {
        reason: String,
    },
    /// Anything else (shown as a small notice, or hidden).
    Other {
        event_type: String,
    },
}

/// Where an attachment lives and, if it is encrypted, how to decrypt it (the spec's
/// `EncryptedFile` JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub url: OwnedMxcUri,
    /// The `file` object of an encrypted attachment (key, iv, hashes), as JSON.
    pub encrypted_file: Option<serde_json::Value>,
}

/// One message or event in a room's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineItem {
    /// Stable id in the app: the transaction id of our own messages (from the moment they are
    /// queued), the event id of everyone else's.
    pub key: String,
    pub room_id: OwnedRoomId,
    pub event_id: Option<OwnedEventId>,
    pub sender: OwnedUserId,
    pub sender_name: Option<String>,
    /// Server timestamp (local time while still sending), ms since the Unix epoch.
    pub timestamp: u64,
    pub content: ItemContent,
    /// Was it end-to-end encrypted?
    pub encrypted: bool,
    /// Our own messages only.
    pub send_state: Option<SendState>,
}

/// Upload or download progress of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// A user found by [`crate::Client::search_users`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSearchResult {
    pub user_id: OwnedUserId,
    pub display_name: Option<String>,
    pub avatar_url: Option<OwnedMxcUri>,
}

/// A device of a user (for verification).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: String,
    pub display_name: Option<String>,
    /// We trust it: verified by emoji here, or cross-signed by its owner's master key that
    /// we trust (ours, or one we signed after verifying its owner).
    pub verified: bool,
}

/// Cross-signing and key backup of this account, for Settings → Security.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityStatus {
    /// This device holds our cross-signing keys (it set them up).
    pub cross_signing_keys_here: bool,
    /// The server has a master key for us (set up here or on another device).
    pub cross_signing_published: bool,
    /// This device carries our self-signing key's signature.
    pub device_cross_signed: bool,
    /// The server backup version this device backs its room keys up to.
    pub backup_version: Option<String>,
    /// The newest backup on the server, if any (restore from it with the recovery key).
    pub server_backup_version: Option<String>,
}

/// One emoji of a SAS verification: the symbol and its English name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SasEmoji {
    pub symbol: String,
    pub name: String,
}

/// Where a SAS verification stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerificationStatus {
    /// Someone asked to verify us: show "accept / decline".
    Requested,
    /// Waiting for the other side.
    Waiting,
    /// Both sides must compare these emoji and confirm.
    ShowEmoji(Vec<SasEmoji>),
    /// Verified.
    Done,
    /// Cancelled by either side.
    Cancelled { reason: String },
}

/// A verification in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The transaction id: pass it to the accept / confirm / cancel calls.
    pub id: String,
    pub other_user: OwnedUserId,
    pub other_device: Option<String>,
    pub status: VerificationStatus,
}

/// Something changed; [`crate::Client::subscribe`] delivers these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Update {
    /// The room list changed (a room was added, renamed, got a message, an invite, ...):
    /// call [`crate::Client::rooms`] again.
    RoomsChanged,
    /// A timeline item was added or changed (same `key`: update it in place).
    Timeline {
        item: TimelineItem,
    },
    /// Who is typing in a room now.
    Typing {
        room_id: OwnedRoomId,
        user_ids: Vec<OwnedUserId>,
    },
    /// A user's presence changed.
    Presence {
        user_id: OwnedUserId,
        presence: PresenceInfo,
    },
    /// A user's profile (name, avatar, colour) changed.
    Profile {
        user: UserSummary,
    },
    Connection {
        state: ConnectionState,
    },
    Verification {
        verification: Verification,
    },
    /// Upload progress of the file message `key` (its timeline item's key), or download
    /// progress of the attachment whose mxc URI is `key`.
    FileProgress {
        key: String,
        progress: Progress,
    },
    /// The session ended (signed out here or elsewhere).
    LoggedOut,
    /// Something failed in the background (the sync loop or the outbox).
    Error {
        message: String,
    },
}
