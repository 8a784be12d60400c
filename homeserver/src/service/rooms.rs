//! Rooms: creation with presets, membership changes, state, aliases and the directory.

use std::collections::HashSet;

use federation::pdu::{Pdu, room_version_rules};
use ruma::{
    EventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, RoomVersionId, UserId,
    events::room::power_levels::{
        RedactedRoomPowerLevelsEventContent, RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource,
    },
    state_res::events::RoomCreateEvent,
};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    Services,
    timeline::{CreateRoom, EventDraft},
};
use crate::{
    error::{Error, Result},
    store::{EventRow, now_ms},
};

/// Room versions we create and accept for new rooms.
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 3] = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];
/// The version of new rooms unless the client asks for another.
pub const DEFAULT_ROOM_VERSION: RoomVersionId = RoomVersionId::V12;

/// `createRoom` presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// What `createRoom` asks for.
#[derive(Debug, Default)]
pub struct NewRoomRequest {
    pub preset: Option<Preset>,
    pub public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    pub room_alias_name: Option<String>,
    pub room_version: Option<RoomVersionId>,
    pub creation_content: Option<Map<String, JsonValue>>,
    /// (type, state_key, content)
    pub initial_state: Vec<(String, String, JsonValue)>,
    pub power_level_content_override: Option<Map<String, JsonValue>>,
}

/// A membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Join,
    Invite,
    Leave,
    Ban,
}

impl Membership {
    fn as_str(self) -> &'static str {
        match self {
            Membership::Join => "join",
            Membership::Invite => "invite",
            Membership::Leave => "leave",
            Membership::Ban => "ban",
        }
    }
}

impl Services {
    /// `POST /createRoom`.
    pub async fn create_room(&self, creator: &UserId, req: NewRoomRequest) -> Result<OwnedRoomId> {
        let version = req.room_version.clone().unwrap_or(DEFAULT_ROOM_VERSION);
        if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedRoomVersion(format!("Room version {version} is not supported")));
        }
        let rules = version.rules().ok_or_else(|| Error::internal("rules for a supported version"))?;
        let preset = req.preset.unwrap_or(if req.public { Preset::PublicChat } else { Preset::PrivateChat });
        let alias = match &req.room_alias_name {
            Some(name) => {
                let alias = self.local_alias(name)?;
                if self.store.alias(alias.as_str()).await?.is_some() {
                    return Err(Error::RoomInUse);
                }
                Some(alias)
            }
            None => None,
        };

        let mut create_content = req.creation_content.clone().unwrap_or_default();
        create_content.insert("room_version".into(), JsonValue::from(version.as_str()));
        if !rules.authorization.use_room_create_sender {
            create_content.insert("creator".into(), JsonValue::from(creator.as_str()));
        }
        let room_id =
            if rules.authorization.room_create_event_id_as_room_id { None } else { Some(self.new_room_id()?) };
        let room_id = self
            .append_create_event(
                creator,
                CreateRoom { version: &version, published: req.public, room_id },
                JsonValue::Object(create_content),
            )
            .await?;

        // The creator joins.
        let member = self.member_content(creator, "join", None).await?;
        self.append_event(&room_id, creator, EventDraft::state("m.room.member", creator.as_str(), member), None)
            .await?;

        // Power levels: the spec's defaults, the preset's, then the client's override.
        let mut users = Map::new();
        if !rules.authorization.explicitly_privilege_room_creators {
            users.insert(creator.to_string(), json!(100));
        }
        if preset == Preset::TrustedPrivateChat {
            for invitee in &req.invite {
                users.insert(invitee.to_string(), json!(100));
            }
        }
        let mut power_levels = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                "m.room.server_acl": 100, "m.room.encryption": 100, "m.room.topic": 50,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": 0,
            "notifications": {"room": 50},
        });
        if let Some(overrides) = &req.power_level_content_override
            && let Some(map) = power_levels.as_object_mut()
        {
            for (k, v) in overrides {
                map.insert(k.clone(), v.clone());
            }
        }
        self.append_event(&room_id, creator, EventDraft::state("m.room.power_levels", "", power_levels), None).await?;

        if let Some(alias) = &alias {
            self.append_event(
                &room_id,
                creator,
                EventDraft::state("m.room.canonical_alias", "", json!({"alias": alias})),
                None,
            )
            .await?;
        }
        let (join_rule, guest_access) = match preset {
            Preset::PublicChat => ("public", "forbidden"),
            _ => ("invite", "can_join"),
        };
        let mut preset_state = vec![
            ("m.room.join_rules", json!({"join_rule": join_rule})),
            ("m.room.history_visibility", json!({"history_visibility": "shared"})),
            ("m.room.guest_access", json!({"guest_access": guest_access})),
        ];
        preset_state.retain(|(kind, _)| !req.initial_state.iter().any(|(t, k, _)| t == kind && k.is_empty()));
        for (kind, content) in preset_state {
            self.append_event(&room_id, creator, EventDraft::state(kind, "", content), None).await?;
        }
        for (kind, key, content) in &req.initial_state {
            if kind == "m.room.create" || kind == "m.room.member" || kind == "m.room.power_levels" {
                return Err(Error::BadJson(format!("initial_state may not contain {kind}")));
            }
            self.append_event(&room_id, creator, EventDraft::state(kind, key, content.clone()), None).await?;
        }
        if let Some(name) = &req.name {
            self.append_event(&room_id, creator, EventDraft::state("m.room.name", "", json!({"name": name})), None)
                .await?;
        }
        if let Some(topic) = &req.topic {
            self.append_event(&room_id, creator, EventDraft::state("m.room.topic", "", json!({"topic": topic})), None)
                .await?;
        }
        for invitee in &req.invite {
            self.change_membership(&room_id, creator, invitee, Membership::Invite, None, req.is_direct).await?;
        }
        if let Some(alias) = alias {
            self.store.create_alias(alias.as_str(), room_id.as_str(), creator.as_str(), now_ms()).await?;
        }
        tracing::info!(%room_id, %creator, %version, "created a room");
        Ok(room_id)
    }

    fn new_room_id(&self) -> Result<OwnedRoomId> {
        let local = super::credentials::random_string(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 18);
        RoomId::parse(format!("!{local}:{}", self.settings.server_name)).map_err(|e| Error::internal(e.to_string()))
    }

    /// `#name:server` for a local alias name.
    pub fn local_alias(&self, name: &str) -> Result<OwnedRoomAliasId> {
        alias_on(name, &self.settings.server_name)
    }

    /// Membership content with the member's profile (display name and avatar).
    pub(crate) async fn member_content(
        &self,
        user: &UserId,
        membership: &str,
        reason: Option<&str>,
    ) -> Result<JsonValue> {
        let mut content = Map::new();
        content.insert("membership".into(), JsonValue::from(membership));
        if (membership == "join" || membership == "invite")
            && let Ok(profile) = self.profile.get(user).await
        {
            for key in ["displayname", "avatar_url"] {
                if let Some(v) = profile.get(key) {
                    content.insert(key.into(), v.clone());
                }
            }
        }
        if let Some(reason) = reason {
            content.insert("reason".into(), JsonValue::from(reason));
        }
        Ok(JsonValue::Object(content))
    }

    /// Changes `target`'s membership as `sender`: join, invite, leave (also kick, unban) or
    /// ban. The auth rules decide whether it is allowed.
    pub async fn change_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: Membership,
        reason: Option<&str>,
        is_direct: bool,
    ) -> Result<ruma::OwnedEventId> {
        self.change_membership_via(room_id, sender, target, membership, reason, is_direct, &[]).await
    }

    /// [`Services::change_membership`], with servers to try when the room is on another
    /// server (a join or leave of a room this server is not in).
    #[allow(clippy::too_many_arguments)]
    pub async fn change_membership_via(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: Membership,
        reason: Option<&str>,
        is_direct: bool,
        via: &[ruma::OwnedServerName],
    ) -> Result<ruma::OwnedEventId> {
        let known = self.store.room(room_id.as_str()).await?.is_some();
        let in_room = known && self.server_in_room(room_id).await?;
        if !in_room && sender == target && matches!(membership, Membership::Join | Membership::Leave) {
            // A room on other servers only: join or leave through one of them.
            let mut servers: Vec<ruma::OwnedServerName> = via.to_vec();
            if known {
                servers.extend(self.servers_for_room(room_id, sender).await?);
            } else if let Some(server) = room_id.server_name() {
                servers.push(server.to_owned());
            }
            servers.retain(|s| *s != self.settings.server_name);
            servers.dedup();
            // With nobody else to ask, a room we know is changed here (its auth rules decide).
            if !servers.is_empty() {
                return match membership {
                    Membership::Join => self.join_remote(room_id, sender, &servers, reason).await,
                    _ => self.leave_remote(room_id, sender, &servers, reason).await,
                };
            }
        }
        if !known {
            return Err(Error::NotFound("Unknown room".to_owned()));
        }
        let mut content = self.member_content(target, membership.as_str(), reason).await?;
        if is_direct && let Some(map) = content.as_object_mut() {
            map.insert("is_direct".into(), JsonValue::Bool(true));
        }
        if target.server_name() != self.settings.server_name && membership == Membership::Invite {
            return self.invite_remote(room_id, sender, target, content).await;
        }
        self.append_event(room_id, sender, EventDraft::state("m.room.member", target.as_str(), content), None).await
    }

    /// The user's current membership in a room, if any.
    pub async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        let row = self.store.current_state_event(room_id, "m.room.member", user_id).await?;
        Ok(row.and_then(|r| {
            serde_json::from_str::<JsonValue>(&r.json)
                .ok()
                .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned))
        }))
    }

    /// Fails unless `user` is joined to the room.
    pub async fn require_joined(&self, room_id: &str, user_id: &str) -> Result<()> {
        match self.membership(room_id, user_id).await?.as_deref() {
            Some("join") => Ok(()),
            _ => Err(Error::Forbidden("You are not a member of this room".to_owned())),
        }
    }

    /// `POST /rooms/{roomId}/upgrade`: a new room of `new_version` with the old room's
    /// important state, the old room tombstoned and locked, local aliases moved.
    pub async fn upgrade_room(
        &self,
        old_room: &RoomId,
        user: &UserId,
        new_version: RoomVersionId,
        additional_creators: Vec<OwnedUserId>,
    ) -> Result<OwnedRoomId> {
        if !SUPPORTED_ROOM_VERSIONS.contains(&new_version) {
            return Err(Error::UnsupportedRoomVersion(format!("Room version {new_version} is not supported")));
        }
        self.require_joined(old_room.as_str(), user.as_str()).await?;
        if !self.can_send_state(old_room.as_str(), user, "m.room.tombstone").await? {
            return Err(Error::Forbidden("You may not upgrade this room".to_owned()));
        }
        let rules = new_version.rules().ok_or_else(|| Error::internal("rules for a supported version"))?;
        let content_of = |kind: &'static str| async move {
            Ok::<_, Error>(
                self.store
                    .current_state_event(old_room.as_str(), kind, "")
                    .await?
                    .and_then(|row| serde_json::from_str::<JsonValue>(&row.json).ok())
                    .map(|v| v["content"].clone()),
            )
        };
        let old_create = content_of("m.room.create").await?.unwrap_or_default();

        // The predecessor link; the id of the old room's last event is optional (and removed
        // from newer specs), so only the room id is given.
        let mut create = Map::new();
        create.insert("room_version".into(), JsonValue::from(new_version.as_str()));
        create.insert("predecessor".into(), json!({"room_id": old_room}));
        if let Some(kind) = old_create.get("type") {
            create.insert("type".into(), kind.clone());
        }
        if !rules.authorization.use_room_create_sender {
            create.insert("creator".into(), JsonValue::from(user.as_str()));
        }
        if rules.authorization.additional_room_creators && !additional_creators.is_empty() {
            create.insert("additional_creators".into(), json!(additional_creators));
        }
        let room_id =
            if rules.authorization.room_create_event_id_as_room_id { None } else { Some(self.new_room_id()?) };
        let new_room = self
            .append_create_event(
                user,
                CreateRoom { version: &new_version, published: false, room_id },
                JsonValue::Object(create),
            )
            .await?;
        let member = self.member_content(user, "join", None).await?;
        self.append_event(&new_room, user, EventDraft::state("m.room.member", user.as_str(), member), None).await?;

        // Power levels: copied, with the upgrader able to finish the job; creators of a
        // version-12 room must not appear in `users`.
        let mut power_levels = content_of("m.room.power_levels").await?.unwrap_or_else(|| json!({}));
        if let Some(users) = power_levels.get_mut("users").and_then(|u| u.as_object_mut()) {
            if rules.authorization.explicitly_privilege_room_creators {
                users.remove(user.as_str());
                for creator in &additional_creators {
                    users.remove(creator.as_str());
                }
            } else {
                users.insert(user.to_string(), json!(100));
            }
        } else if !rules.authorization.explicitly_privilege_room_creators {
            power_levels["users"] = json!({(user.as_str()): 100});
        }
        self.append_event(&new_room, user, EventDraft::state("m.room.power_levels", "", power_levels.clone()), None)
            .await?;
        for kind in [
            "m.room.join_rules",
            "m.room.history_visibility",
            "m.room.guest_access",
            "m.room.name",
            "m.room.topic",
            "m.room.avatar",
            "m.room.encryption",
            "m.room.server_acl",
        ] {
            if let Some(content) = content_of(kind).await? {
                self.append_event(&new_room, user, EventDraft::state(kind, "", content), None).await?;
            }
        }
        // Local aliases follow the room.
        let aliases = self.store.room_aliases(old_room.as_str()).await?;
        for alias in &aliases {
            if let Some((_, creator)) = self.store.alias(alias).await? {
                self.store.delete_alias(alias).await?;
                self.store.create_alias(alias, new_room.as_str(), &creator, crate::store::now_ms()).await?;
            }
        }
        if let Some(canonical) = content_of("m.room.canonical_alias").await? {
            self.append_event(&new_room, user, EventDraft::state("m.room.canonical_alias", "", canonical), None)
                .await?;
            self.append_event(old_room, user, EventDraft::state("m.room.canonical_alias", "", json!({})), None).await?;
        }
        if let Some(room) = self.store.room(old_room.as_str()).await?
            && room.published
        {
            self.store.set_room_published(old_room.as_str(), false).await?;
            self.store.set_room_published(new_room.as_str(), true).await?;
        }

        self.append_event(
            old_room,
            user,
            EventDraft::state(
                "m.room.tombstone",
                "",
                json!({"body": "This room has been replaced", "replacement_room": new_room}),
            ),
            None,
        )
        .await?;
        // Lock the old room: ordinary members can no longer talk or invite there.
        let mut locked = power_levels_of_old(self, old_room).await?;
        let users_default = locked["users_default"].as_i64().unwrap_or(0);
        let restricted = (users_default + 1).max(50);
        locked["events_default"] = json!(restricted.max(locked["events_default"].as_i64().unwrap_or(0)));
        locked["invite"] = json!(restricted.max(locked["invite"].as_i64().unwrap_or(0)));
        self.append_event(old_room, user, EventDraft::state("m.room.power_levels", "", locked), None).await?;
        tracing::info!(%old_room, %new_room, %new_version, "upgraded a room");
        Ok(new_room)
    }

    /// The room's creators: the sender of its current `m.room.create` event (or, before room
    /// version 11, the `creator` it names) and, from version 12, its `additional_creators`,
    /// as ruma's authorization rules read them. Only the room's own create event counts:
    /// never what another server's invite claimed about the room (`rooms.creator` once came
    /// from an invite's stripped state). Without a create event (a room we are only invited
    /// to) there are none.
    pub async fn room_creators(&self, room_id: &str) -> Result<HashSet<OwnedUserId>> {
        let Some(row) = self.store.current_state_event(room_id, "m.room.create", "").await? else {
            return Ok(HashSet::new());
        };
        let version = self.room_version(room_id).await?;
        creators_of(&row, &version)
    }

    /// The room's current power levels as ruma computes them: the `m.room.power_levels`
    /// content (pruned if it was redacted) or the spec's defaults without one, and the
    /// creators, who hold unlimited power from room version 12.
    pub async fn power_levels(&self, room_id: &str) -> Result<RoomPowerLevels> {
        if self.store.room(room_id).await?.is_none() {
            return Err(Error::NotFound("Unknown room".to_owned()));
        }
        let version = self.room_version(room_id).await?;
        let rules = room_version_rules(&version).map_err(|e| Error::internal(e.to_string()))?;
        let creators = self.room_creators(room_id).await?;
        let row = self.store.current_state_event(room_id, "m.room.power_levels", "").await?;
        Ok(RoomPowerLevels::new(power_levels_source(row.as_ref())?, &rules.authorization, creators))
    }

    /// Whether `user` may send state events of `event_type` in the room, by its power levels.
    pub async fn can_send_state(&self, room_id: &str, user: &UserId, event_type: &str) -> Result<bool> {
        Ok(self.power_levels(room_id).await?.user_can_send_state(user, event_type.into()))
    }

    /// Resolves a room id or an alias (another server's is asked over federation), with the
    /// servers the alias names as in the room.
    pub async fn resolve_room_with_servers(
        &self,
        id_or_alias: &str,
    ) -> Result<(OwnedRoomId, Vec<ruma::OwnedServerName>)> {
        if let Ok(alias) = RoomAliasId::parse(id_or_alias)
            && alias.server_name() != self.settings.server_name
        {
            return self.remote_alias(&alias).await;
        }
        Ok((self.resolve_room(id_or_alias).await?, Vec::new()))
    }

    /// Another server's alias, asked of that server (or kept from a moment ago: see
    /// `remote_cache`).
    pub async fn remote_alias(&self, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<ruma::OwnedServerName>)> {
        use ruma::api::federation::query::get_room_information::v1 as directory;
        self.fed
            .lookups
            .aliases
            .get_or_fetch(&alias.to_owned(), || async {
                let answer = self.send_lookup(alias.server_name(), directory::Request::new(alias.to_owned())).await?;
                Ok(answer.map(|a| (a.room_id, a.servers)))
            })
            .await?
            .ok_or_else(|| Error::NotFound("Unknown room alias".to_owned()))
    }

    /// A page of another server's public room directory (filtered by `search` when given),
    /// asked of that server or kept from a moment ago (see `remote_cache`).
    pub async fn remote_directory_page(
        &self,
        query: super::fed::DirectoryQuery,
    ) -> Result<ruma::api::federation::directory::get_public_rooms::v1::Response> {
        use ruma::api::federation::directory::{get_public_rooms, get_public_rooms_filtered};
        let not_found = || Error::NotFound(format!("{} has no room directory", query.server));
        self.fed
            .lookups
            .directories
            .get_or_fetch(&query, || async {
                let Some(term) = &query.search else {
                    let mut request = get_public_rooms::v1::Request::new();
                    request.limit = query.limit;
                    request.since = query.since.clone();
                    return self.send_lookup(&query.server, request).await?.ok_or_else(not_found);
                };
                let mut request = get_public_rooms_filtered::v1::Request::new();
                request.limit = query.limit;
                request.since = query.since.clone();
                request.filter.generic_search_term = Some(term.clone());
                let answer = self.send_lookup(&query.server, request).await?.ok_or_else(not_found)?;
                let mut page = get_public_rooms::v1::Response::new();
                page.chunk = answer.chunk;
                page.next_batch = answer.next_batch;
                page.prev_batch = answer.prev_batch;
                page.total_room_count_estimate = answer.total_room_count_estimate;
                Ok(page)
            })
            .await
    }

    /// Aliases on this server that point at the room, for a member of it (or anyone, when
    /// its history is world-readable).
    pub async fn local_aliases(&self, room_id: &RoomId, user: &UserId) -> Result<Vec<OwnedRoomAliasId>> {
        if self.store.room(room_id.as_str()).await?.is_none() {
            return Err(Error::NotFound("Unknown room".to_owned()));
        }
        let joined = self.membership(room_id.as_str(), user.as_str()).await?.as_deref() == Some("join");
        if !joined {
            let visibility = self.store.current_state_event(room_id.as_str(), "m.room.history_visibility", "").await?;
            let world_readable = visibility.is_some_and(|row| {
                serde_json::from_str::<JsonValue>(&row.json)
                    .is_ok_and(|v| v["content"]["history_visibility"] == "world_readable")
            });
            if !world_readable {
                return Err(Error::Forbidden("You are not a member of this room".to_owned()));
            }
        }
        let aliases = self.store.room_aliases(room_id.as_str()).await?;
        Ok(aliases.into_iter().filter_map(|a| OwnedRoomAliasId::try_from(a).ok()).collect())
    }

    /// Resolves a room id or a local alias.
    pub async fn resolve_room(&self, id_or_alias: &str) -> Result<OwnedRoomId> {
        if id_or_alias.starts_with('#') {
            let (room_id, _) =
                self.store.alias(id_or_alias).await?.ok_or_else(|| Error::NotFound("Unknown room alias".to_owned()))?;
            return RoomId::parse(room_id).map_err(|e| Error::internal(e.to_string()));
        }
        RoomId::parse(id_or_alias).map_err(|e| Error::InvalidParam(format!("Invalid room id: {e}")))
    }
}

/// `#name:server`: an alias `name` (as a client gives it to `createRoom`) on `server`. A name
/// that would put the alias on another server or is not an alias localpart is refused.
pub fn alias_on(name: &str, server: &ruma::ServerName) -> Result<OwnedRoomAliasId> {
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        return Err(Error::InvalidParam("Invalid room alias name".to_owned()));
    }
    RoomAliasId::parse(format!("#{name}:{server}")).map_err(|e| Error::InvalidParam(format!("Invalid room alias: {e}")))
}

/// The creators of a room from its create event (see [`Services::room_creators`]).
pub(crate) fn creators_of(create: &EventRow, version: &RoomVersionId) -> Result<HashSet<OwnedUserId>> {
    let rules = room_version_rules(version).map_err(|e| Error::internal(e.to_string()))?;
    let id = EventId::parse(create.event_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
    let pdu = Pdu::from_json(id, &create.json).map_err(|e| Error::internal(e.to_string()))?;
    // An authorized create event always names valid creators; if it does not, nobody holds a
    // creator's power (rather than everybody, or the server guessing).
    Ok(RoomCreateEvent::new(pdu).creators(&rules.authorization).unwrap_or_default())
}

/// What ruma builds power levels from: the stored event's content, pruned as a redaction
/// leaves it if it was redacted, or the spec's defaults when there is none.
pub(crate) fn power_levels_source(row: Option<&EventRow>) -> Result<RoomPowerLevelsSource> {
    let Some(row) = row else { return Ok(RoomPowerLevelsSource::None) };
    #[derive(serde::Deserialize)]
    struct Event<C> {
        content: C,
    }
    // Content that passed the authorization rules always reads; anything else is refused
    // (an error, never "no power levels", which would hand the creators 100 and lower every bar).
    let unreadable = |e: serde_json::Error| Error::internal(format!("unreadable power levels {}: {e}", row.event_id));
    Ok(if row.redacted_by.is_some() {
        let event: Event<RedactedRoomPowerLevelsEventContent> = serde_json::from_str(&row.json).map_err(unreadable)?;
        RoomPowerLevelsSource::Redacted(event.content)
    } else {
        let event: Event<RoomPowerLevelsEventContent> = serde_json::from_str(&row.json).map_err(unreadable)?;
        RoomPowerLevelsSource::Original(event.content)
    })
}

async fn power_levels_of_old(services: &Services, room: &RoomId) -> Result<JsonValue> {
    Ok(services
        .store
        .current_state_event(room.as_str(), "m.room.power_levels", "")
        .await?
        .and_then(|row| serde_json::from_str::<JsonValue>(&row.json).ok())
        .map(|v| v["content"].clone())
        .unwrap_or_else(|| json!({})))
}
