//! Rooms: creation with presets, membership changes, state, aliases and the directory.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use federation::pdu::{Pdu, room_version_rules};
use ruma::{
    EventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, RoomVersionId, UserId,
    api::client::membership::joined_members,
    directory::{PublicRoomsChunk, PublicRoomsChunkInit},
    events::room::member::MembershipState,
    events::room::power_levels::{
        RedactedRoomPowerLevelsEventContent, RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource,
    },
    state_res::events::RoomCreateEvent,
};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    Hub, Services,
    cache::Cache,
    notifier::{Change, Sections},
    timeline::{CreateRoom, EventDraft},
};
use crate::{
    error::{Error, Result},
    store::{EventRow, now_ms},
};

/// One page of this server's public room directory.
pub struct PublicRoomsPage {
    pub chunk: Vec<PublicRoomsChunk>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total: ruma::UInt,
}

/// A membership change: `sender` sets `target`'s membership in `room_id`.
pub struct MembershipChange<'a> {
    pub room_id: &'a RoomId,
    pub sender: &'a UserId,
    pub target: &'a UserId,
    pub membership: MembershipState,
    pub reason: Option<&'a str>,
    /// An invite to a direct chat.
    pub is_direct: bool,
    /// Servers to try when the room is on other servers only.
    pub via: &'a [ruma::OwnedServerName],
}

impl<'a> MembershipChange<'a> {
    /// The change with no reason, not direct, no servers to try.
    pub fn new(room_id: &'a RoomId, sender: &'a UserId, target: &'a UserId, membership: MembershipState) -> Self {
        Self { room_id, sender, target, membership, reason: None, is_direct: false, via: &[] }
    }
}

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

/// Rooms: creation, upgrades, membership changes, aliases and the directory, and each user's
/// rooms (cached for the syncs).
pub struct Rooms {
    hub: Hub,
    /// Each user's rooms with their membership, for syncs (see `of_user`).
    user_rooms: Cache<String, Arc<Vec<(String, MembershipState)>>>,
}

impl Rooms {
    pub fn new(hub: Hub) -> Self {
        Self { hub, user_rooms: Cache::new(100_000) }
    }

    /// Fails with 404 unless the room is known here.
    pub async fn require_known(&self, room_id: &RoomId) -> Result<()> {
        let s = self.hub.services();
        match s.store.room(room_id.as_str()).await? {
            Some(_) => Ok(()),
            None => Err(Error::NotFound("Unknown room".to_owned())),
        }
    }

    /// Only joined members read a room's state, members and joined members. (The spec also
    /// lets former members read the state as it was when they left; that is not built yet.)
    pub async fn require_state_reader(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        self.require_known(room_id).await?;
        self.require_joined(room_id.as_str(), user_id.as_str()).await
    }

    /// Fails unless `user` was joined to the room at some time: members and former members
    /// may read its history (subject to history visibility).
    pub async fn require_ever_joined(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let s = self.hub.services();
        if s.store
            .membership_history(room_id.as_str(), user_id.as_str())
            .await?
            .iter()
            .any(|(_, m)| *m == MembershipState::Join)
        {
            return Ok(());
        }
        Err(Error::Forbidden("You are not a member of this room".to_owned()))
    }

    /// `POST /rooms/{room}/forget`: only once the user is out of the room.
    pub async fn forget(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let s = self.hub.services();
        match self.membership(room_id.as_str(), user_id.as_str()).await? {
            Some(MembershipState::Join | MembershipState::Invite | MembershipState::Knock) => {
                return Err(Error::Unknown("Leave the room before forgetting it".to_owned()));
            }
            None if s.store.room(room_id.as_str()).await?.is_none() => {
                return Err(Error::NotFound("Unknown room".to_owned()));
            }
            _ => {}
        }
        Ok(s.store.forget_room(user_id.as_str(), room_id.as_str()).await?)
    }

    /// The rooms `user` is joined to.
    pub async fn joined_by(&self, user_id: &UserId) -> Result<Vec<OwnedRoomId>> {
        let s = self.hub.services();
        let mut rooms = Vec::new();
        for (room_id, membership) in s.store.rooms_for_user(user_id.as_str()).await? {
            if membership == MembershipState::Join
                && let Ok(id) = OwnedRoomId::try_from(room_id)
            {
                rooms.push(id);
            }
        }
        Ok(rooms)
    }

    /// The joined members with the display name and avatar of their member events.
    pub async fn joined_member_profiles(
        &self,
        room_id: &RoomId,
    ) -> Result<BTreeMap<OwnedUserId, joined_members::v3::RoomMember>> {
        let s = self.hub.services();
        let mut joined = BTreeMap::new();
        for member in s.store.room_members(room_id.as_str(), &MembershipState::Join).await? {
            let Some(row) = s.store.current_state_event(room_id.as_str(), "m.room.member", &member).await? else {
                continue;
            };
            let pdu: JsonValue = serde_json::from_str(&row.json).unwrap_or_default();
            let mut info = joined_members::v3::RoomMember::new();
            info.display_name = pdu["content"]["displayname"].as_str().map(str::to_owned);
            info.avatar_url = pdu["content"]["avatar_url"].as_str().map(|s| s.into());
            if let Ok(id) = OwnedUserId::try_from(member) {
                joined.insert(id, info);
            }
        }
        Ok(joined)
    }

    /// A member's current member event, if any.
    pub async fn member_event(&self, room_id: &str, user_id: &str) -> Result<Option<EventRow>> {
        let s = self.hub.services();
        Ok(s.store.current_state_event(room_id, "m.room.member", user_id).await?)
    }

    /// A canonical alias must point at this room.
    pub async fn check_canonical_alias(&self, room_id: &RoomId, content: &JsonValue) -> Result<()> {
        let s = self.hub.services();
        let aliases = content["alias"]
            .as_str()
            .into_iter()
            .chain(content["alt_aliases"].as_array().into_iter().flatten().filter_map(|a| a.as_str()));
        for alias in aliases {
            match s.store.alias(alias).await? {
                Some((target, _)) if target == room_id.as_str() => {}
                _ => return Err(Error::BadAlias(format!("{alias} does not point to this room"))),
            }
        }
        Ok(())
    }

    /// `PUT /directory/room/{alias}`: a joined member adds an alias of this server.
    pub async fn create_alias(&self, alias: &RoomAliasId, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let s = self.hub.services();
        if alias.server_name() != s.settings.server_name {
            return Err(Error::InvalidParam("Aliases must be on this server".to_owned()));
        }
        self.require_joined(room_id.as_str(), user_id.as_str()).await?;
        if !s.store.create_alias(alias.as_str(), room_id.as_str(), user_id.as_str(), now_ms()).await? {
            return Err(Error::Conflict("The room alias already exists".to_owned()));
        }
        Ok(())
    }

    /// The room a local alias names.
    pub async fn alias_target(&self, alias: &RoomAliasId) -> Result<OwnedRoomId> {
        let s = self.hub.services();
        let (room_id, _) =
            s.store.alias(alias.as_str()).await?.ok_or_else(|| Error::NotFound("Unknown room alias".to_owned()))?;
        RoomId::parse(room_id).map_err(|e| Error::internal(e.to_string()))
    }

    /// `DELETE /directory/room/{alias}`.
    pub async fn delete_alias(&self, alias: &RoomAliasId, user_id: &UserId) -> Result<()> {
        let s = self.hub.services();
        let (room_id, creator) =
            s.store.alias(alias.as_str()).await?.ok_or_else(|| Error::NotFound("Unknown room alias".to_owned()))?;
        // The alias's creator and server admins may delete it; anybody else needs to be in the
        // room with the power to change its canonical alias (power levels outlive a membership:
        // a kicked moderator keeps their entry).
        let admin = s.store.user(user_id.as_str()).await?.is_some_and(|u| u.is_admin);
        if creator != user_id.as_str()
            && !admin
            && !(self.membership(&room_id, user_id.as_str()).await? == Some(MembershipState::Join)
                && self.can_send_state(&room_id, user_id, "m.room.canonical_alias").await?)
        {
            return Err(Error::Forbidden("You may not delete this alias".to_owned()));
        }
        s.store.delete_alias(alias.as_str()).await?;
        Ok(())
    }

    /// Is the room in this server's public directory?
    pub async fn is_published(&self, room_id: &RoomId) -> Result<bool> {
        let s = self.hub.services();
        let room = s.store.room(room_id.as_str()).await?.ok_or_else(|| Error::NotFound("Unknown room".to_owned()))?;
        Ok(room.published)
    }

    /// Publishes the room in (or removes it from) the directory: only a member with the power
    /// to change the canonical alias (as Synapse; power levels outlive a membership, a kicked
    /// moderator keeps their entry).
    pub async fn set_published(&self, room_id: &RoomId, user_id: &UserId, published: bool) -> Result<()> {
        let s = self.hub.services();
        s.store.room(room_id.as_str()).await?.ok_or_else(|| Error::NotFound("Unknown room".to_owned()))?;
        self.require_joined(room_id.as_str(), user_id.as_str()).await?;
        if !self.can_send_state(room_id.as_str(), user_id, "m.room.canonical_alias").await? {
            return Err(Error::Forbidden("You may not change the directory visibility of this room".to_owned()));
        }
        Ok(s.store.set_room_published(room_id.as_str(), published).await?)
    }

    /// Drops a user's cached rooms: their membership somewhere changed.
    pub fn forget_user(&self, user_id: &str) {
        self.user_rooms.forget(&user_id.to_owned());
    }

    pub async fn version(&self, room_id: &str) -> Result<RoomVersionId> {
        let s = self.hub.services();
        let parsed = RoomId::parse(room_id).ok();
        if let Some(room) = &parsed
            && let Some(version) = s.room_cache.with(room, |c| c.version.clone())
        {
            return Ok(version);
        }
        let room = s.store.room(room_id).await?.ok_or_else(|| Error::NotFound("Unknown room".to_owned()))?;
        let version = RoomVersionId::try_from(room.room_version.as_str())
            .map_err(|e| Error::internal(format!("stored room version: {e}")))?;
        if let Some(room) = &parsed {
            // A room's version never changes (an upgrade makes a new room).
            s.room_cache.with(room, |c| c.version = Some(version.clone()));
        }
        Ok(version)
    }

    /// A user's rooms with their membership (`join`, `invite`, `leave`, `ban`, ...), cached
    /// until the user's membership anywhere changes.
    pub async fn of_user(&self, user_id: &str) -> Result<Arc<Vec<(String, MembershipState)>>> {
        let s = self.hub.services();
        let key = user_id.to_owned();
        if let Some(hit) = self.user_rooms.get(&key) {
            return Ok(hit);
        }
        let generation = self.user_rooms.generation();
        let rooms = Arc::new(s.store.rooms_for_user(user_id).await?);
        self.user_rooms.insert_if_unchanged(key, rooms.clone(), generation);
        Ok(rooms)
    }
    /// `POST /createRoom`.
    pub async fn create(&self, creator: &UserId, req: NewRoomRequest) -> Result<OwnedRoomId> {
        let s = self.hub.services();
        let version = req.room_version.clone().unwrap_or(DEFAULT_ROOM_VERSION);
        if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedRoomVersion(format!("Room version {version} is not supported")));
        }
        let rules = version.rules().ok_or_else(|| Error::internal("rules for a supported version"))?;
        let preset = req.preset.unwrap_or(if req.public { Preset::PublicChat } else { Preset::PrivateChat });
        let alias = match &req.room_alias_name {
            Some(name) => {
                let alias = self.local_alias(name)?;
                if s.store.alias(alias.as_str()).await?.is_some() {
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
        let room_id = s
            .timeline
            .append_create(
                creator,
                CreateRoom { version: &version, published: req.public, room_id },
                JsonValue::Object(create_content),
            )
            .await?;

        // The creator joins.
        let member = self.member_content(creator, &MembershipState::Join, None).await?;
        s.timeline
            .append(&room_id, creator, EventDraft::state("m.room.member", creator.as_str(), member), None)
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
        s.timeline.append(&room_id, creator, EventDraft::state("m.room.power_levels", "", power_levels), None).await?;

        if let Some(alias) = &alias {
            s.timeline
                .append(
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
            s.timeline.append(&room_id, creator, EventDraft::state(kind, "", content), None).await?;
        }
        for (kind, key, content) in &req.initial_state {
            if kind == "m.room.create" || kind == "m.room.member" || kind == "m.room.power_levels" {
                return Err(Error::BadJson(format!("initial_state may not contain {kind}")));
            }
            s.timeline.append(&room_id, creator, EventDraft::state(kind, key, content.clone()), None).await?;
        }
        if let Some(name) = &req.name {
            s.timeline
                .append(&room_id, creator, EventDraft::state("m.room.name", "", json!({"name": name})), None)
                .await?;
        }
        if let Some(topic) = &req.topic {
            s.timeline
                .append(&room_id, creator, EventDraft::state("m.room.topic", "", json!({"topic": topic})), None)
                .await?;
        }
        for invitee in &req.invite {
            let invite = MembershipChange::new(&room_id, creator, invitee, MembershipState::Invite);
            self.change_membership(MembershipChange { is_direct: req.is_direct, ..invite }).await?;
        }
        if let Some(alias) = alias {
            s.store.create_alias(alias.as_str(), room_id.as_str(), creator.as_str(), now_ms()).await?;
        }
        tracing::info!(%room_id, %creator, %version, "created a room");
        Ok(room_id)
    }

    fn new_room_id(&self) -> Result<OwnedRoomId> {
        let s = self.hub.services();
        let local = super::credentials::random_string(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 18);
        RoomId::parse(format!("!{local}:{}", s.settings.server_name)).map_err(|e| Error::internal(e.to_string()))
    }

    /// `#name:server` for a local alias name.
    pub fn local_alias(&self, name: &str) -> Result<OwnedRoomAliasId> {
        let s = self.hub.services();
        alias_on(name, &s.settings.server_name)
    }

    /// Membership content with the member's profile (display name and avatar).
    pub(crate) async fn member_content(
        &self,
        user: &UserId,
        membership: &MembershipState,
        reason: Option<&str>,
    ) -> Result<JsonValue> {
        let s = self.hub.services();
        let mut content = Map::new();
        content.insert("membership".into(), JsonValue::from(membership.as_str()));
        if (*membership == MembershipState::Join || *membership == MembershipState::Invite)
            && let Ok(profile) = s.profile.get(user).await
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
    /// ban. The auth rules decide whether it is allowed. A join or leave of a room this
    /// server is not in goes through one of `via` (or the servers we know in the room).
    pub async fn change_membership(&self, change: MembershipChange<'_>) -> Result<ruma::OwnedEventId> {
        let MembershipChange { room_id, sender, target, membership, reason, is_direct, via } = change;
        let s = self.hub.services();
        let known = s.store.room(room_id.as_str()).await?.is_some();
        let in_room = known && s.servers.we_are_in(room_id).await?;
        if !in_room && sender == target && matches!(membership, MembershipState::Join | MembershipState::Leave) {
            // A room on other servers only: join or leave through one of them.
            let mut servers: Vec<ruma::OwnedServerName> = via.to_vec();
            if known {
                servers.extend(s.remote_rooms.servers_for(room_id, sender).await?);
            } else if let Some(server) = room_id.server_name() {
                servers.push(server.to_owned());
            }
            servers.retain(|server| *server != s.settings.server_name);
            servers.dedup();
            // With nobody else to ask, a room we know is changed here (its auth rules decide).
            if !servers.is_empty() {
                return match membership {
                    MembershipState::Join => s.remote_rooms.join(room_id, sender, &servers, reason).await,
                    _ => s.remote_rooms.leave(room_id, sender, &servers, reason).await,
                };
            }
        }
        if !known {
            return Err(Error::NotFound("Unknown room".to_owned()));
        }
        let mut content = self.member_content(target, &membership, reason).await?;
        if is_direct && let Some(map) = content.as_object_mut() {
            map.insert("is_direct".into(), JsonValue::Bool(true));
        }
        if target.server_name() != s.settings.server_name && membership == MembershipState::Invite {
            return s.remote_rooms.invite(room_id, sender, target, content).await;
        }
        s.timeline.append(room_id, sender, EventDraft::state("m.room.member", target.as_str(), content), None).await
    }

    /// The user's current membership in a room, if any.
    pub async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<MembershipState>> {
        let s = self.hub.services();
        let row = s.store.current_state_event(room_id, "m.room.member", user_id).await?;
        Ok(row.and_then(|r| {
            serde_json::from_str::<JsonValue>(&r.json)
                .ok()
                .and_then(|v| v["content"]["membership"].as_str().map(MembershipState::from))
        }))
    }

    /// A kick (a leave of somebody else) or a ban. Kicking somebody who is not in the room
    /// (or banned) is not a kick.
    pub async fn kick_or_ban(&self, change: MembershipChange<'_>) -> Result<()> {
        let current = self.membership(change.room_id.as_str(), change.target.as_str()).await?;
        if change.membership == MembershipState::Leave
            && !matches!(current, Some(MembershipState::Join | MembershipState::Invite | MembershipState::Knock))
            && change.sender != change.target
        {
            return Err(Error::Forbidden("The user is not in the room".to_owned()));
        }
        self.change_membership(change).await?;
        Ok(())
    }

    /// An unban: only of a banned user.
    pub async fn unban(&self, change: MembershipChange<'_>) -> Result<()> {
        if self.membership(change.room_id.as_str(), change.target.as_str()).await? != Some(MembershipState::Ban) {
            return Err(Error::Forbidden("The user is not banned".to_owned()));
        }
        self.change_membership(change).await?;
        Ok(())
    }

    /// Fails unless `user` is joined to the room.
    pub async fn require_joined(&self, room_id: &str, user_id: &str) -> Result<()> {
        match self.membership(room_id, user_id).await? {
            Some(MembershipState::Join) => Ok(()),
            _ => Err(Error::Forbidden("You are not a member of this room".to_owned())),
        }
    }

    /// `POST /rooms/{roomId}/upgrade`: a new room of `new_version` with the old room's
    /// important state, the old room tombstoned and locked, local aliases moved.
    pub async fn upgrade(
        &self,
        old_room: &RoomId,
        user: &UserId,
        new_version: RoomVersionId,
        additional_creators: Vec<OwnedUserId>,
    ) -> Result<OwnedRoomId> {
        let services = self.hub.services();
        // A reference, so that each `content_of` future below can take its own copy.
        let s = &*services;
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
                s.store
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
        let new_room = s
            .timeline
            .append_create(
                user,
                CreateRoom { version: &new_version, published: false, room_id },
                JsonValue::Object(create),
            )
            .await?;
        let member = self.member_content(user, &MembershipState::Join, None).await?;
        s.timeline.append(&new_room, user, EventDraft::state("m.room.member", user.as_str(), member), None).await?;

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
        s.timeline
            .append(&new_room, user, EventDraft::state("m.room.power_levels", "", power_levels.clone()), None)
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
                s.timeline.append(&new_room, user, EventDraft::state(kind, "", content), None).await?;
            }
        }
        // Local aliases follow the room.
        let aliases = s.store.room_aliases(old_room.as_str()).await?;
        for alias in &aliases {
            if let Some((_, creator)) = s.store.alias(alias).await? {
                s.store.delete_alias(alias).await?;
                s.store.create_alias(alias, new_room.as_str(), &creator, crate::store::now_ms()).await?;
            }
        }
        if let Some(canonical) = content_of("m.room.canonical_alias").await? {
            s.timeline
                .append(&new_room, user, EventDraft::state("m.room.canonical_alias", "", canonical), None)
                .await?;
            s.timeline.append(old_room, user, EventDraft::state("m.room.canonical_alias", "", json!({})), None).await?;
        }
        if let Some(room) = s.store.room(old_room.as_str()).await?
            && room.published
        {
            s.store.set_room_published(old_room.as_str(), false).await?;
            s.store.set_room_published(new_room.as_str(), true).await?;
        }

        s.timeline
            .append(
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
        let mut locked = power_levels_of_old(s, old_room).await?;
        let users_default = locked["users_default"].as_i64().unwrap_or(0);
        let restricted = (users_default + 1).max(50);
        locked["events_default"] = json!(restricted.max(locked["events_default"].as_i64().unwrap_or(0)));
        locked["invite"] = json!(restricted.max(locked["invite"].as_i64().unwrap_or(0)));
        s.timeline.append(old_room, user, EventDraft::state("m.room.power_levels", "", locked), None).await?;
        tracing::info!(%old_room, %new_room, %new_version, "upgraded a room");
        Ok(new_room)
    }

    /// The room's creators: the sender of its current `m.room.create` event (or, before room
    /// version 11, the `creator` it names) and, from version 12, its `additional_creators`,
    /// as ruma's authorization rules read them. Only the room's own create event counts:
    /// never what another server's invite claimed about the room (`rooms.creator` once came
    /// from an invite's stripped state). Without a create event (a room we are only invited
    /// to) there are none.
    pub async fn creators(&self, room_id: &str) -> Result<HashSet<OwnedUserId>> {
        let s = self.hub.services();
        let Some(row) = s.store.current_state_event(room_id, "m.room.create", "").await? else {
            return Ok(HashSet::new());
        };
        let version = self.version(room_id).await?;
        creators_of(&row, &version)
    }

    /// The room's current power levels as ruma computes them: the `m.room.power_levels`
    /// content (pruned if it was redacted) or the spec's defaults without one, and the
    /// creators, who hold unlimited power from room version 12.
    pub async fn power_levels(&self, room_id: &str) -> Result<RoomPowerLevels> {
        let s = self.hub.services();
        if s.store.room(room_id).await?.is_none() {
            return Err(Error::NotFound("Unknown room".to_owned()));
        }
        let version = self.version(room_id).await?;
        let rules = room_version_rules(&version).map_err(|e| Error::internal(e.to_string()))?;
        let creators = self.creators(room_id).await?;
        let row = s.store.current_state_event(room_id, "m.room.power_levels", "").await?;
        Ok(RoomPowerLevels::new(power_levels_source(row.as_ref())?, &rules.authorization, creators))
    }

    /// Whether `user` may send state events of `event_type` in the room, by its power levels.
    pub async fn can_send_state(&self, room_id: &str, user: &UserId, event_type: &str) -> Result<bool> {
        Ok(self.power_levels(room_id).await?.user_can_send_state(user, event_type.into()))
    }

    /// Resolves a room id or an alias (another server's is asked over federation), with the
    /// servers the alias names as in the room.
    pub async fn resolve_with_servers(&self, id_or_alias: &str) -> Result<(OwnedRoomId, Vec<ruma::OwnedServerName>)> {
        let s = self.hub.services();
        if let Ok(alias) = RoomAliasId::parse(id_or_alias)
            && alias.server_name() != s.settings.server_name
        {
            return self.remote_alias(&alias).await;
        }
        Ok((self.resolve(id_or_alias).await?, Vec::new()))
    }

    /// Another server's alias, asked of that server (or kept from a moment ago: see
    /// `remote_cache`).
    pub async fn remote_alias(&self, alias: &RoomAliasId) -> Result<(OwnedRoomId, Vec<ruma::OwnedServerName>)> {
        let s = self.hub.services();
        use ruma::api::federation::query::get_room_information::v1 as directory;
        s.fed
            .lookups
            .aliases
            .get_or_fetch(&alias.to_owned(), || async {
                let answer = s.fed.lookup(alias.server_name(), directory::Request::new(alias.to_owned())).await?;
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
        let s = self.hub.services();
        use ruma::api::federation::directory::{get_public_rooms, get_public_rooms_filtered};
        let not_found = || Error::NotFound(format!("{} has no room directory", query.server));
        s.fed
            .lookups
            .directories
            .get_or_fetch(&query, || async {
                let Some(term) = &query.search else {
                    let mut request = get_public_rooms::v1::Request::new();
                    request.limit = query.limit;
                    request.since = query.since.clone();
                    return s.fed.lookup(&query.server, request).await?.ok_or_else(not_found);
                };
                let mut request = get_public_rooms_filtered::v1::Request::new();
                request.limit = query.limit;
                request.since = query.since.clone();
                request.filter.generic_search_term = Some(term.clone());
                let answer = s.fed.lookup(&query.server, request).await?.ok_or_else(not_found)?;
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
        let s = self.hub.services();
        if s.store.room(room_id.as_str()).await?.is_none() {
            return Err(Error::NotFound("Unknown room".to_owned()));
        }
        let joined = self.membership(room_id.as_str(), user.as_str()).await? == Some(MembershipState::Join);
        if !joined {
            let visibility = s.store.current_state_event(room_id.as_str(), "m.room.history_visibility", "").await?;
            let world_readable = visibility.is_some_and(|row| {
                serde_json::from_str::<JsonValue>(&row.json)
                    .is_ok_and(|v| v["content"]["history_visibility"] == "world_readable")
            });
            if !world_readable {
                return Err(Error::Forbidden("You are not a member of this room".to_owned()));
            }
        }
        let aliases = s.store.room_aliases(room_id.as_str()).await?;
        Ok(aliases.into_iter().filter_map(|a| OwnedRoomAliasId::try_from(a).ok()).collect())
    }

    /// Resolves a room id or a local alias.
    pub async fn resolve(&self, id_or_alias: &str) -> Result<OwnedRoomId> {
        let s = self.hub.services();
        if id_or_alias.starts_with('#') {
            let (room_id, _) =
                s.store.alias(id_or_alias).await?.ok_or_else(|| Error::NotFound("Unknown room alias".to_owned()))?;
            return RoomId::parse(room_id).map_err(|e| Error::internal(e.to_string()));
        }
        RoomId::parse(id_or_alias).map_err(|e| Error::InvalidParam(format!("Invalid room id: {e}")))
    }
    /// A change of `user` that everyone sharing a room with them sees (presence, device
    /// keys): the user's own scope and each of their rooms.
    pub async fn changes_of_user_and_rooms(&self, user: &str, sections: Sections) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        if let Ok(user) = OwnedUserId::try_from(user) {
            changes.push(Change::user(user, sections));
        }
        for (room_id, membership) in self.of_user(user).await?.iter() {
            if (*membership == MembershipState::Join || *membership == MembershipState::Invite)
                && let Ok(room_id) = OwnedRoomId::try_from(room_id.as_str())
            {
                changes.push(Change::room(room_id, sections));
            }
        }
        Ok(changes)
    }
    /// A page of public rooms (`since` is the offset of the page's first room), for clients
    /// and for other servers.
    pub async fn public_rooms_page(
        &self,
        search: Option<&str>,
        limit: Option<ruma::UInt>,
        since: Option<&str>,
    ) -> Result<PublicRoomsPage> {
        let chunk = self.public_room_chunks(search).await?;
        let limit = limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX)).unwrap_or(usize::MAX);
        let start: usize = since.and_then(|s| s.parse().ok()).unwrap_or(0);
        let total = chunk.len();
        let page: Vec<PublicRoomsChunk> = chunk.into_iter().skip(start).take(limit).collect();
        let next_batch = (start + page.len() < total).then(|| (start + page.len()).to_string());
        let prev_batch = (start > 0).then(|| start.saturating_sub(limit).to_string());
        Ok(PublicRoomsPage {
            chunk: page,
            next_batch,
            prev_batch,
            total: ruma::UInt::new(total as u64).unwrap_or_default(),
        })
    }

    /// Public rooms on this server, filtered by a search term.
    pub async fn public_room_chunks(&self, search: Option<&str>) -> Result<Vec<PublicRoomsChunk>> {
        let services = self.hub.services();
        // A reference, so that each `state` future below can take its own copy.
        let s = &*services;
        let mut out = Vec::new();
        for room_id in s.store.published_rooms().await? {
            let Ok(id) = RoomId::parse(room_id.as_str()) else { continue };
            let state = |kind: &'static str, field: &'static str| {
                let room_id = room_id.clone();
                async move {
                    Ok::<_, Error>(s.store.current_state_event(&room_id, kind, "").await?.and_then(|row| {
                        serde_json::from_str::<JsonValue>(&row.json)
                            .ok()
                            .and_then(|v| v["content"][field].as_str().map(str::to_owned))
                    }))
                }
            };
            let name = state("m.room.name", "name").await?;
            let topic = state("m.room.topic", "topic").await?;
            let alias = state("m.room.canonical_alias", "alias").await?;
            let avatar = state("m.room.avatar", "url").await?;
            let join_rule = state("m.room.join_rules", "join_rule").await?;
            let history = state("m.room.history_visibility", "history_visibility").await?;
            if let Some(term) = search {
                let term = term.to_lowercase();
                let hit = [&name, &topic, &alias]
                    .iter()
                    .any(|f| f.as_ref().is_some_and(|v| v.to_lowercase().contains(&term)));
                if !hit {
                    continue;
                }
            }
            let joined = s.store.room_members(&room_id, &MembershipState::Join).await?.len();
            let mut chunk = PublicRoomsChunk::from(PublicRoomsChunkInit {
                num_joined_members: ruma::UInt::new(joined as u64).unwrap_or_default(),
                room_id: id,
                world_readable: history.as_deref() == Some("world_readable"),
                guest_can_join: false,
            });
            chunk.name = name;
            chunk.topic = topic;
            chunk.canonical_alias = alias.and_then(|a| a.try_into().ok());
            chunk.avatar_url = avatar.map(Into::into);
            chunk.join_rule = join_rule.as_deref().unwrap_or("public").into();
            out.push(chunk);
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.num_joined_members));
        Ok(out)
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

/// The creators of a room from its create event (see [`Rooms::creators`]).
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
