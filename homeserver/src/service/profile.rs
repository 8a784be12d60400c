//! Profiles: display name, avatar and custom fields (Matrix v1.16 extensible profiles).

use ruma::events::room::member::MembershipState;
use std::collections::BTreeMap;

use ruma::{UserId, api::client::user_directory::search_users};
use serde_json::Value as JsonValue;

use super::Hub;
use crate::error::{Error, Result};

/// The spec's limit on a whole profile (MSC4133): 64 KiB.
pub const MAX_PROFILE_BYTES: usize = 65_536;
/// Longest field name the spec allows.
const MAX_FIELD_NAME_BYTES: usize = 255;

/// Profiles: local users' fields, remote users' asked of their server, and the member
/// events that follow a change of name or avatar.
pub struct Profiles {
    hub: Hub,
}

impl Profiles {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// Makes sure `user_id` is a local, existing, active user; profiles of others are not found.
    async fn require_local_owner(&self, user_id: &UserId) -> Result<()> {
        let s = self.hub.services();
        if user_id.server_name() != s.settings.server_name {
            // Remote profiles arrive with federation (issue 6).
            return Err(Error::NotFound("Profile not found".to_owned()));
        }
        match s.store.user(user_id.as_str()).await? {
            Some(u) if !u.deactivated => Ok(()),
            _ => Err(Error::NotFound("Profile not found".to_owned())),
        }
    }

    pub async fn get(&self, user_id: &UserId) -> Result<BTreeMap<String, JsonValue>> {
        let s = self.hub.services();
        if user_id.server_name() != s.settings.server_name {
            return self.remote(user_id, None).await;
        }
        self.require_local_owner(user_id).await?;
        let mut profile = BTreeMap::new();
        for (field, value) in s.store.profile_fields(user_id.as_str()).await? {
            match serde_json::from_str(&value) {
                Ok(v) => {
                    profile.insert(field, v);
                }
                Err(e) => tracing::error!(%user_id, field, error = %e, "stored profile field is not JSON"),
            }
        }
        Ok(profile)
    }

    pub async fn field(&self, user_id: &UserId, field: &str) -> Result<JsonValue> {
        let s = self.hub.services();
        if user_id.server_name() != s.settings.server_name {
            return self
                .remote(user_id, Some(field))
                .await?
                .remove(field)
                .ok_or_else(|| Error::NotFound("Profile field not set".to_owned()));
        }
        self.require_local_owner(user_id).await?;
        let value = s
            .store
            .profile_field(user_id.as_str(), field)
            .await?
            .ok_or_else(|| Error::NotFound("Profile field not set".to_owned()))?;
        serde_json::from_str(&value).map_err(|e| Error::internal(format!("stored profile field is not JSON: {e}")))
    }

    /// A remote user's profile (or one field of it), asked of their server (or kept from a
    /// moment ago: see `remote_cache`).
    async fn remote(&self, user_id: &UserId, field: Option<&str>) -> Result<BTreeMap<String, JsonValue>> {
        let s = self.hub.services();
        use ruma::api::federation::query::get_profile_information::v1 as query;
        let key = (user_id.to_owned(), field.map(str::to_owned));
        let profile = s
            .fed
            .lookups
            .profiles
            .get_or_fetch(&key, || async {
                let mut request = query::Request::new(user_id.to_owned());
                request.field = field.map(Into::into);
                let Some(response) = s.fed.lookup(user_id.server_name(), request).await? else {
                    return Ok(None);
                };
                let value = serde_json::to_value(&response.data).map_err(|e| Error::internal(e.to_string()))?;
                let JsonValue::Object(map) = value else {
                    return Err(Error::RemoteUnavailable("the remote profile is not an object".to_owned()));
                };
                Ok(Some(map.into_iter().collect()))
            })
            .await?;
        profile.ok_or_else(|| Error::NotFound("Profile not found".to_owned()))
    }

    /// Sets a field of the requester's own profile.
    pub async fn set_field(&self, requester: &UserId, target: &UserId, field: &str, value: &JsonValue) -> Result<()> {
        let s = self.hub.services();
        if requester != target {
            return Err(Error::Forbidden("You may only change your own profile".to_owned()));
        }
        check_field_name(field)?;
        match field {
            "displayname" if !value.is_string() && !value.is_null() => {
                return Err(Error::BadJson("displayname must be a string".to_owned()));
            }
            "displayname" if value.as_str().is_some_and(|s| s.len() > 256) => {
                return Err(Error::InvalidParam("displayname is longer than 256 bytes".to_owned()));
            }
            "avatar_url"
                if !value.as_str().is_some_and(|s| s.is_empty() || s.starts_with("mxc://")) && !value.is_null() =>
            {
                return Err(Error::InvalidParam("avatar_url must be an mxc:// URI".to_owned()));
            }
            _ => {}
        }
        self.require_local_owner(target).await?;
        // Clients clear a field by setting it to null or "", as they did before DELETE existed.
        if value.is_null() || value.as_str() == Some("") {
            s.store.delete_profile_field(target.as_str(), field).await?;
        } else {
            let json = serde_json::to_string(value).map_err(|e| Error::internal(e.to_string()))?;
            if !s.store.set_profile_field(target.as_str(), field, &json, MAX_PROFILE_BYTES).await? {
                return Err(Error::ProfileTooLarge("The profile would be larger than 64 KiB".to_owned()));
            }
        }
        self.changed(target, field).await;
        Ok(())
    }

    /// After a change of the display name or avatar: a new `m.room.member` join event in
    /// each room the user is in, carrying the new profile, as the spec asks (clients show
    /// names from the member events, not from `/profile`). The profile change itself is
    /// committed already; a room where the event cannot be sent is logged and skipped.
    async fn changed(&self, user: &UserId, field: &str) {
        let s = self.hub.services();
        if field != "displayname" && field != "avatar_url" {
            return;
        }
        let rooms = match s.rooms.of_user(user.as_str()).await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::warn!(%user, error = %e, "cannot list the rooms to update the profile in");
                return;
            }
        };
        for (room_id, membership) in rooms.iter() {
            if *membership != MembershipState::Join {
                continue;
            }
            let Ok(room_id) = ruma::RoomId::parse(room_id) else { continue };
            let update = async {
                let content = s.rooms.member_content(user, &MembershipState::Join, None).await?;
                let draft = super::timeline::EventDraft::state("m.room.member", user.as_str(), content);
                s.timeline.append(&room_id, user, draft, None).await
            };
            if let Err(e) = update.await {
                tracing::warn!(%user, %room_id, error = %e, "cannot update the member event with the new profile");
            }
        }
    }

    pub async fn delete_field(&self, requester: &UserId, target: &UserId, field: &str) -> Result<()> {
        let s = self.hub.services();
        if requester != target {
            return Err(Error::Forbidden("You may only change your own profile".to_owned()));
        }
        check_field_name(field)?;
        self.require_local_owner(target).await?;
        s.store.delete_profile_field(target.as_str(), field).await?;
        self.changed(target, field).await;
        Ok(())
    }
}

/// One page of a user directory search.
pub struct DirectorySearch {
    pub users: Vec<search_users::v3::User>,
    /// More users matched than were returned.
    pub limited: bool,
}

impl Profiles {
    /// `POST /user_directory/search`: users whose id or display name contains `term`, up to
    /// `limit` of them (those sharing a room with `searcher`, or everyone if configured so).
    pub async fn search_directory(&self, searcher: &UserId, term: &str, limit: i64) -> Result<DirectorySearch> {
        let s = self.hub.services();
        let rows = s
            .store
            .search_users(searcher.as_str(), term, s.settings.user_directory.search_all_users, limit + 1)
            .await?;
        let limited = i64::try_from(rows.len()).unwrap_or(0) > limit;
        let mut users = Vec::new();
        for (user_id, displayname, avatar) in rows.into_iter().take(usize::try_from(limit).unwrap_or(10)) {
            let Ok(id) = UserId::parse(user_id) else { continue };
            let mut entry = search_users::v3::User::new(id);
            // Profile values are stored as JSON.
            entry.display_name = displayname
                .and_then(|d| serde_json::from_str::<JsonValue>(&d).ok())
                .and_then(|v| v.as_str().map(str::to_owned));
            entry.avatar_url = avatar
                .and_then(|a| serde_json::from_str::<JsonValue>(&a).ok())
                .and_then(|v| v.as_str().map(Into::into));
            users.push(entry);
        }
        Ok(DirectorySearch { users, limited })
    }
}

fn check_field_name(field: &str) -> Result<()> {
    if field.is_empty() || field.len() > MAX_FIELD_NAME_BYTES {
        return Err(Error::InvalidParam("A profile field name must be 1 to 255 bytes".to_owned()));
    }
    Ok(())
}
