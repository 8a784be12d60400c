//! Rooms: creation, membership, state, aliases and the public directory.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        directory::{get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility},
        membership::{
            ban_user, forget_room, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias,
            joined_members, joined_rooms, kick_user, leave_room, unban_user,
        },
        room::{Visibility, aliases, create_room, upgrade_room},
        state::{get_state_event_for_key, get_state_events, send_state_event},
    },
    events::room::member::MembershipState,
};
use serde_json::Value as JsonValue;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        events::{Viewer, to_raw},
        fed::DirectoryQuery,
        rate_limit::{Class, Key},
        rooms::{MembershipChange, NewRoomRequest, Preset},
        timeline::EventDraft,
    },
};

fn json_of<T>(raw: &ruma::serde::Raw<T>) -> Result<JsonValue> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::BadJson(e.to_string()))
}

fn object_of<T>(raw: &ruma::serde::Raw<T>) -> Result<serde_json::Map<String, JsonValue>> {
    match json_of(raw)? {
        JsonValue::Object(map) => Ok(map),
        _ => Err(Error::BadJson("expected a JSON object".to_owned())),
    }
}

/// `POST /_matrix/client/v3/createRoom`
pub async fn create(
    State(services): State<Arc<Services>>,
    req: Ruma<create_room::v3::Request>,
) -> Result<RumaResponse<create_room::v3::Response>> {
    let user = req.user()?.clone();
    services.rate_limits.check_user(Class::RoomCreation, &user.user_id)?;
    let body = req.body;
    let preset = body.preset.as_ref().map(|p| match p.as_str() {
        "public_chat" => Ok(Preset::PublicChat),
        "trusted_private_chat" => Ok(Preset::TrustedPrivateChat),
        "private_chat" => Ok(Preset::PrivateChat),
        other => Err(Error::BadJson(format!("Unknown preset {other}"))),
    });
    let preset = preset.transpose()?;
    let mut initial_state = Vec::new();
    for raw in &body.initial_state {
        let event = json_of(raw)?;
        let kind =
            event["type"].as_str().ok_or_else(|| Error::BadJson("initial_state event without type".to_owned()))?;
        let key = event["state_key"].as_str().unwrap_or_default();
        let content = event.get("content").cloned().unwrap_or_else(|| JsonValue::Object(Default::default()));
        initial_state.push((kind.to_owned(), key.to_owned(), content));
    }
    let request = NewRoomRequest {
        preset,
        public: body.visibility == Visibility::Public,
        name: body.name,
        topic: body.topic,
        invite: body.invite,
        is_direct: body.is_direct,
        room_alias_name: body.room_alias_name,
        room_version: body.room_version,
        creation_content: body.creation_content.as_ref().map(object_of).transpose()?,
        initial_state,
        power_level_content_override: body.power_level_content_override.as_ref().map(object_of).transpose()?,
    };
    let room_id = services.rooms.create(&user.user_id, request).await?;
    Ok(RumaResponse(create_room::v3::Response::new(room_id)))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/upgrade`
pub async fn upgrade(
    State(services): State<Arc<Services>>,
    req: Ruma<upgrade_room::v3::Request>,
) -> Result<RumaResponse<upgrade_room::v3::Response>> {
    let user = req.user()?.clone();
    let b = req.body;
    let new_room = services.rooms.upgrade(&b.room_id, &user.user_id, b.new_version, b.additional_creators).await?;
    Ok(RumaResponse(upgrade_room::v3::Response::new(new_room)))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/join`
pub async fn join_by_id(
    State(services): State<Arc<Services>>,
    req: Ruma<join_room_by_id::v3::Request>,
) -> Result<RumaResponse<join_room_by_id::v3::Response>> {
    let user = req.user()?.clone();
    let room_id = req.body.room_id;
    services.limit_join(&user.user_id, &room_id).await?;
    let join = MembershipChange::new(&room_id, &user.user_id, &user.user_id, MembershipState::Join);
    services.rooms.change_membership(MembershipChange { reason: req.body.reason.as_deref(), ..join }).await?;
    Ok(RumaResponse(join_room_by_id::v3::Response::new(room_id)))
}

/// `POST /_matrix/client/v3/join/{roomIdOrAlias}`
pub async fn join_by_id_or_alias(
    State(services): State<Arc<Services>>,
    req: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<RumaResponse<join_room_by_id_or_alias::v3::Response>> {
    let user = req.user()?.clone();
    let (room_id, mut via) = services.rooms.resolve_with_servers(req.body.room_id_or_alias.as_str()).await?;
    via.extend(req.body.via.iter().cloned());
    services.limit_join(&user.user_id, &room_id).await?;
    let join = MembershipChange::new(&room_id, &user.user_id, &user.user_id, MembershipState::Join);
    services
        .rooms
        .change_membership(MembershipChange { reason: req.body.reason.as_deref(), via: &via, ..join })
        .await?;
    Ok(RumaResponse(join_room_by_id_or_alias::v3::Response::new(room_id)))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/invite`
pub async fn invite(
    State(services): State<Arc<Services>>,
    req: Ruma<invite_user::v3::Request>,
) -> Result<RumaResponse<invite_user::v3::Response>> {
    let user = req.user()?.clone();
    let invite_user::v3::InvitationRecipient::UserId(invitee) = &req.body.recipient else {
        return Err(Error::Forbidden("Third-party invites are not supported".to_owned()));
    };
    services.rate_limits.check(
        Some(&user.user_id),
        &[
            (Class::InvitesPerIssuer, Key::Id(user.user_id.as_str())),
            (Class::InvitesPerRoom, Key::Id(req.body.room_id.as_str())),
            (Class::InvitesPerUser, Key::Id(invitee.user_id.as_str())),
        ],
    )?;
    let invite = MembershipChange::new(&req.body.room_id, &user.user_id, &invitee.user_id, MembershipState::Invite);
    services.rooms.change_membership(MembershipChange { reason: invitee.reason.as_deref(), ..invite }).await?;
    Ok(RumaResponse(invite_user::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/leave`
pub async fn leave(
    State(services): State<Arc<Services>>,
    req: Ruma<leave_room::v3::Request>,
) -> Result<RumaResponse<leave_room::v3::Response>> {
    let user = req.user()?.clone();
    let leave = MembershipChange::new(&req.body.room_id, &user.user_id, &user.user_id, MembershipState::Leave);
    services.rooms.change_membership(MembershipChange { reason: req.body.reason.as_deref(), ..leave }).await?;
    Ok(RumaResponse(leave_room::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/kick`
pub async fn kick(
    State(services): State<Arc<Services>>,
    req: Ruma<kick_user::v3::Request>,
) -> Result<RumaResponse<kick_user::v3::Response>> {
    let user = req.user()?.clone();
    let change = MembershipChange::new(&req.body.room_id, &user.user_id, &req.body.user_id, MembershipState::Leave);
    services.rooms.kick_or_ban(MembershipChange { reason: req.body.reason.as_deref(), ..change }).await?;
    Ok(RumaResponse(kick_user::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/ban`
pub async fn ban(
    State(services): State<Arc<Services>>,
    req: Ruma<ban_user::v3::Request>,
) -> Result<RumaResponse<ban_user::v3::Response>> {
    let user = req.user()?.clone();
    let change = MembershipChange::new(&req.body.room_id, &user.user_id, &req.body.user_id, MembershipState::Ban);
    services.rooms.kick_or_ban(MembershipChange { reason: req.body.reason.as_deref(), ..change }).await?;
    Ok(RumaResponse(ban_user::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/unban`
pub async fn unban(
    State(services): State<Arc<Services>>,
    req: Ruma<unban_user::v3::Request>,
) -> Result<RumaResponse<unban_user::v3::Response>> {
    let user = req.user()?.clone();
    let change = MembershipChange::new(&req.body.room_id, &user.user_id, &req.body.user_id, MembershipState::Leave);
    services.rooms.unban(MembershipChange { reason: req.body.reason.as_deref(), ..change }).await?;
    Ok(RumaResponse(unban_user::v3::Response::new()))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/forget`
pub async fn forget(
    State(services): State<Arc<Services>>,
    req: Ruma<forget_room::v3::Request>,
) -> Result<RumaResponse<forget_room::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.forget(&req.body.room_id, &user.user_id).await?;
    Ok(RumaResponse(forget_room::v3::Response::new()))
}

/// `GET /_matrix/client/v3/joined_rooms`
pub async fn joined(
    State(services): State<Arc<Services>>,
    req: Ruma<joined_rooms::v3::Request>,
) -> Result<RumaResponse<joined_rooms::v3::Response>> {
    let user = req.user()?;
    let rooms = services.rooms.joined_by(&user.user_id).await?;
    Ok(RumaResponse(joined_rooms::v3::Response::new(rooms)))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn state(
    State(services): State<Arc<Services>>,
    req: Ruma<get_state_events::v3::Request>,
) -> Result<RumaResponse<get_state_events::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.require_state_reader(&req.body.room_id, &user.user_id).await?;
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let mut events = Vec::new();
    for row in services.state.current_events(&req.body.room_id).await? {
        events.push(services.events.raw_client_event(&row, viewer, true).await?);
    }
    Ok(RumaResponse(get_state_events::v3::Response::new(events)))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn state_event(
    State(services): State<Arc<Services>>,
    req: Ruma<get_state_event_for_key::v3::Request>,
) -> Result<RumaResponse<get_state_event_for_key::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.require_state_reader(&req.body.room_id, &user.user_id).await?;
    let row = services
        .state
        .current_event(&req.body.room_id, &req.body.event_type.to_string(), &req.body.state_key)
        .await?
        .ok_or_else(|| Error::NotFound("Event not found".to_owned()))?;
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let event = services.events.client_event(&row, viewer, true).await?;
    let value = match req.body.format {
        get_state_event_for_key::v3::StateEventFormat::Event => event,
        _ => event["content"].clone(),
    };
    let raw = serde_json::value::to_raw_value(&value).map_err(|e| Error::internal(e.to_string()))?;
    Ok(RumaResponse(get_state_event_for_key::v3::Response::new(raw)))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn send_state(
    State(services): State<Arc<Services>>,
    req: Ruma<send_state_event::v3::Request>,
) -> Result<RumaResponse<send_state_event::v3::Response>> {
    let user = req.user()?.clone();
    services.rate_limits.check_user(Class::Message, &user.user_id)?;
    let content = json_of(&req.body.body)?;
    if !content.is_object() {
        return Err(Error::BadJson("State event content must be an object".to_owned()));
    }
    let kind = req.body.event_type.to_string();
    crate::service::event_content::check_state_content(&kind, &content)?;
    if kind == "m.room.canonical_alias" {
        services.rooms.check_canonical_alias(&req.body.room_id, &content).await?;
    }
    let event_id = services
        .timeline
        .append(&req.body.room_id, &user.user_id, EventDraft::state(&kind, &req.body.state_key, content), None)
        .await?;
    Ok(RumaResponse(send_state_event::v3::Response::new(event_id)))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn members(
    State(services): State<Arc<Services>>,
    req: Ruma<get_member_events::v3::Request>,
) -> Result<RumaResponse<get_member_events::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.require_state_reader(&req.body.room_id, &user.user_id).await?;
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let membership = req.body.membership.as_ref().map(|m| m.to_string());
    let not_membership = req.body.not_membership.as_ref().map(|m| m.to_string());
    let mut chunk = Vec::new();
    for row in services.state.current_events(&req.body.room_id).await? {
        if row.event_type != "m.room.member" {
            continue;
        }
        let event = services.events.client_event(&row, viewer, true).await?;
        let m = event["content"]["membership"].as_str().unwrap_or_default().to_owned();
        if membership.as_ref().is_some_and(|x| *x != m) || not_membership.as_ref().is_some_and(|x| *x == m) {
            continue;
        }
        chunk.push(to_raw(&event)?);
    }
    Ok(RumaResponse(get_member_events::v3::Response::new(chunk)))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub async fn joined_members_list(
    State(services): State<Arc<Services>>,
    req: Ruma<joined_members::v3::Request>,
) -> Result<RumaResponse<joined_members::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.require_state_reader(&req.body.room_id, &user.user_id).await?;
    let joined = services.rooms.joined_member_profiles(&req.body.room_id).await?;
    Ok(RumaResponse(joined_members::v3::Response::new(joined)))
}

/// `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn alias_create(
    State(services): State<Arc<Services>>,
    req: Ruma<create_alias::v3::Request>,
) -> Result<RumaResponse<create_alias::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.create_alias(&req.body.room_alias, &req.body.room_id, &user.user_id).await?;
    Ok(RumaResponse(create_alias::v3::Response::new()))
}

/// `GET /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn alias_get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_alias::v3::Request>,
) -> Result<RumaResponse<get_alias::v3::Response>> {
    let alias = &req.body.room_alias;
    if alias.server_name() != services.settings.server_name {
        // Another server's alias: ask that server, for signed-in users only (anyone else
        // could make us contact any server).
        req.signed_in_user(&services).await?;
        let (room_id, servers) = services.rooms.remote_alias(alias).await?;
        return Ok(RumaResponse(get_alias::v3::Response::new(room_id, servers)));
    }
    let room_id = services.rooms.alias_target(alias).await?;
    Ok(RumaResponse(get_alias::v3::Response::new(room_id, vec![services.settings.server_name.clone()])))
}

/// `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn alias_delete(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_alias::v3::Request>,
) -> Result<RumaResponse<delete_alias::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.delete_alias(&req.body.room_alias, &user.user_id).await?;
    Ok(RumaResponse(delete_alias::v3::Response::new()))
}

/// `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn visibility_get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_visibility::v3::Request>,
) -> Result<RumaResponse<get_room_visibility::v3::Response>> {
    let published = services.rooms.is_published(&req.body.room_id).await?;
    let visibility = if published { Visibility::Public } else { Visibility::Private };
    Ok(RumaResponse(get_room_visibility::v3::Response::new(visibility)))
}

/// `PUT /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn visibility_set(
    State(services): State<Arc<Services>>,
    req: Ruma<set_room_visibility::v3::Request>,
) -> Result<RumaResponse<set_room_visibility::v3::Response>> {
    let user = req.user()?.clone();
    services.rooms.set_published(&req.body.room_id, &user.user_id, req.body.visibility == Visibility::Public).await?;
    Ok(RumaResponse(set_room_visibility::v3::Response::new()))
}

/// `GET /_matrix/client/v3/publicRooms`
pub async fn public_rooms(
    State(services): State<Arc<Services>>,
    req: Ruma<get_public_rooms::v3::Request>,
) -> Result<RumaResponse<get_public_rooms::v3::Response>> {
    let query = DirectoryRequest {
        server: req.body.server.clone(),
        limit: req.body.limit,
        since: req.body.since.clone(),
        search: None,
    };
    let page = directory_page(&services, &req, query).await?;
    let mut response = get_public_rooms::v3::Response::new(page.chunk);
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = page.total_room_count_estimate;
    Ok(RumaResponse(response))
}

/// `POST /_matrix/client/v3/publicRooms`
/// `POST /publicRooms`: the directory filtered by `generic_search_term` (matched against
/// names, topics and canonical aliases).
pub async fn public_rooms_filtered(
    State(services): State<Arc<Services>>,
    req: Ruma<get_public_rooms_filtered::v3::Request>,
) -> Result<RumaResponse<get_public_rooms_filtered::v3::Response>> {
    let query = DirectoryRequest {
        server: req.body.server.clone(),
        limit: req.body.limit,
        since: req.body.since.clone(),
        search: req.body.filter.generic_search_term.clone().filter(|t| !t.trim().is_empty()),
    };
    let page = directory_page(&services, &req, query).await?;
    let mut response = get_public_rooms_filtered::v3::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = page.total_room_count_estimate;
    Ok(RumaResponse(response))
}

/// What a client asked of a room directory, ours or another server's.
struct DirectoryRequest {
    server: Option<ruma::OwnedServerName>,
    limit: Option<ruma::UInt>,
    since: Option<String>,
    search: Option<String>,
}

/// A page of our directory, or of another server's: for signed-in users only (anyone else
/// could make us contact any server), and reused from a moment ago when someone asked the
/// same.
async fn directory_page<T>(
    services: &Services,
    req: &Ruma<T>,
    query: DirectoryRequest,
) -> Result<ruma::api::federation::directory::get_public_rooms::v1::Response> {
    if let Some(server) = query.server.filter(|s| *s != services.settings.server_name) {
        req.signed_in_user(services).await?;
        let query = DirectoryQuery { server, limit: query.limit, since: query.since, search: query.search };
        return services.rooms.remote_directory_page(query).await;
    }
    let page = services.rooms.public_rooms_page(query.search.as_deref(), query.limit, query.since.as_deref()).await?;
    let mut response = ruma::api::federation::directory::get_public_rooms::v1::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = Some(page.total);
    Ok(response)
}

/// `GET /_matrix/client/v3/rooms/{roomId}/aliases`
/// `GET /rooms/{room}/aliases`: this server's aliases of the room.
pub async fn room_aliases(
    State(services): State<Arc<Services>>,
    req: Ruma<aliases::v3::Request>,
) -> Result<RumaResponse<aliases::v3::Response>> {
    let user = req.user()?;
    let aliases = services.rooms.local_aliases(&req.body.room_id, &user.user_id).await?;
    Ok(RumaResponse(aliases::v3::Response::new(aliases)))
}
