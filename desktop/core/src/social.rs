//! People: typing notifications, read receipts, presence, profiles (display name, avatar,
//! avatar colour as a custom profile field) and the user directory.

use std::{path::Path, time::Duration};

use ruma::{
    OwnedEventId, RoomId, UserId,
    api::client::{
        presence::set_presence,
        profile::{ProfileFieldValue, get_profile},
        receipt::create_receipt::{self, v3::ReceiptType},
        typing::create_typing_event::{self, v3::Typing},
        user_directory::search_users,
    },
    presence::PresenceState,
};

use crate::{
    AVATAR_COLOUR_FIELD, Client, Error, Presence, Profile, Result, Update, UserSearchResult, UserSummary,
    http::REQUEST_TIMEOUT, store::Store,
};

/// How long a "typing" notice lasts unless renewed.
const TYPING_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Tells the room we are (or stopped) typing. Call with `true` on keystrokes (at most
    /// every few seconds) and `false` when the message is sent or the field is cleared.
    pub async fn set_typing(&self, room_id: &RoomId, typing: bool) -> Result<()> {
        let session = self.require_session()?;
        let state =
            if typing { Typing::Yes(create_typing_event::v3::TypingInfo::new(TYPING_TIMEOUT)) } else { Typing::No };
        let request = create_typing_event::v3::Request::new(session.user_id.clone(), room_id.to_owned(), state);
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        Ok(())
    }

    /// Marks the room read up to its newest message: the unread count drops to zero and the
    /// sender sees ✓✓ (a public `m.read` receipt).
    pub async fn mark_read(&self, room_id: &RoomId) -> Result<()> {
        self.mark_read_as(room_id, ReceiptType::Read).await
    }

    /// Like [`Client::mark_read`] with a private receipt (`m.read.private`): our other
    /// devices and the server's unread counts move on, but nobody else learns we read it
    /// (the sender sees no ✓✓).
    pub async fn mark_read_privately(&self, room_id: &RoomId) -> Result<()> {
        self.mark_read_as(room_id, ReceiptType::ReadPrivate).await
    }

    async fn mark_read_as(&self, room_id: &RoomId, receipt: ReceiptType) -> Result<()> {
        let session = self.require_session()?;
        let Some(event_id) = self.store()?.mark_room_read(room_id.as_str()).await? else { return Ok(()) };
        self.emit(Update::RoomsChanged);
        let event_id = OwnedEventId::try_from(event_id).map_err(|e| Error::Store(e.to_string()))?;
        let request = create_receipt::v3::Request::new(room_id.to_owned(), receipt, event_id);
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        Ok(())
    }

    /// Sets our presence (and status message). The sync loop keeps reporting it.
    pub async fn set_presence(&self, presence: Presence, status_msg: Option<&str>) -> Result<()> {
        let session = self.require_session()?;
        let state = match presence {
            Presence::Online => PresenceState::Online,
            Presence::Unavailable => PresenceState::Unavailable,
            Presence::Offline => PresenceState::Offline,
            Presence::Unknown => return Err(Error::InvalidInput("Choose online, away or offline.".into())),
        };
        *self.inner.presence.lock().expect("presence lock") = state.clone();
        let mut request = set_presence::v3::Request::new(session.user_id.clone(), state);
        request.status_msg = status_msg.map(str::to_owned);
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        Ok(())
    }

    /// Our own profile, fresh from the server.
    pub async fn profile(&self) -> Result<Profile> {
        let session = self.require_session()?;
        let user = self.user(&session.user_id).await?;
        Ok(Profile {
            user_id: user.user_id,
            display_name: user.display_name,
            avatar_url: user.avatar_url,
            avatar_colour: user.avatar_colour,
        })
    }

    /// Someone's profile and presence: fetched from the server and cached; from the cache
    /// when offline.
    pub async fn user(&self, user_id: &UserId) -> Result<UserSummary> {
        let session = self.require_session()?;
        let request = get_profile::v3::Request::new(user_id.to_owned());
        match self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await {
            Ok(response) => {
                let field = |name: &str| response.data.get(name).and_then(|v| v.as_str()).map(str::to_owned);
                let mut tx = self.store()?.begin().await?;
                Store::set_user_profile(
                    &mut tx,
                    user_id.as_str(),
                    field("displayname").as_deref(),
                    field("avatar_url").as_deref(),
                    field(AVATAR_COLOUR_FIELD).as_deref(),
                )
                .await?;
                tx.commit().await?;
            }
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e),
        }
        self.cached_user(user_id.as_str(), None).await
    }

    pub async fn set_display_name(&self, name: &str) -> Result<()> {
        self.set_profile_field(ProfileFieldValue::DisplayName(name.to_owned())).await?;
        self.profile_changed().await
    }

    /// Uploads an image file and makes it our avatar.
    pub async fn set_avatar(&self, path: &Path) -> Result<()> {
        let url = self.upload_plain(path).await?;
        self.set_profile_field(ProfileFieldValue::AvatarUrl(url)).await?;
        self.profile_changed().await
    }

    /// Sets our avatar colour (any CSS colour, e.g. `#3b82f6`), shown behind our initials.
    pub async fn set_avatar_colour(&self, colour: &str) -> Result<()> {
        let value = ProfileFieldValue::new(AVATAR_COLOUR_FIELD, serde_json::Value::String(colour.to_owned()))
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        self.set_profile_field(value).await?;
        self.profile_changed().await
    }

    async fn profile_changed(&self) -> Result<()> {
        let session = self.require_session()?;
        let user = self.user(&session.user_id).await?;
        self.emit(Update::Profile { user });
        Ok(())
    }

    /// Searches the user directory (people we share a room with, or everyone if the server
    /// allows) by name or id.
    pub async fn search_users(&self, term: &str) -> Result<Vec<UserSearchResult>> {
        let session = self.require_session()?;
        let mut request = search_users::v3::Request::new(term.to_owned());
        request.limit = 20u32.into();
        let response =
            self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        Ok(response
            .results
            .into_iter()
            .map(|u| UserSearchResult { user_id: u.user_id, display_name: u.display_name, avatar_url: u.avatar_url })
            .collect())
    }
}
