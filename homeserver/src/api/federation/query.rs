//! Federation queries: other servers asking about our users.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    RoomId, UInt,
    api::federation::{
        device::get_devices,
        directory::{get_public_rooms, get_public_rooms_filtered},
        query::{get_profile_information, get_room_information},
    },
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, events::to_raw},
};

/// `GET /_matrix/federation/v1/query/profile`
pub async fn profile(
    State(services): State<Arc<Services>>,
    req: Ruma<get_profile_information::v1::Request>,
) -> Result<RumaResponse<get_profile_information::v1::Response>> {
    let user_id = &req.body.user_id;
    if user_id.server_name() != services.settings.server_name {
        return Err(Error::InvalidParam("That user is not on this server".to_owned()));
    }
    let mut response = get_profile_information::v1::Response::new();
    match &req.body.field {
        Some(field) => {
            let value = services.profile.field(user_id, field.as_str()).await?;
            response.data.set(field.as_str().to_owned(), value);
        }
        None => {
            for (field, value) in services.profile.get(user_id).await? {
                response.data.set(field, value);
            }
        }
    }
    Ok(RumaResponse(response))
}

/// `GET /_matrix/federation/v1/query/directory`
///
/// Resolves one of our room aliases for another server.
pub async fn directory(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_information::v1::Request>,
) -> Result<RumaResponse<get_room_information::v1::Response>> {
    let alias = &req.body.room_alias;
    if alias.server_name() != services.settings.server_name {
        return Err(Error::NotFound("That alias is not on this server".to_owned()));
    }
    let (room_id, _) =
        services.store.alias(alias.as_str()).await?.ok_or_else(|| Error::NotFound("Unknown room alias".to_owned()))?;
    let room_id = RoomId::parse(room_id).map_err(|e| Error::internal(e.to_string()))?;
    // Rooms live only on this server until rooms federate, so we are the one server to ask.
    Ok(RumaResponse(get_room_information::v1::Response::new(room_id, vec![services.settings.server_name.clone()])))
}

/// A local user's devices with their keys and names, and the cross-signing keys others may
/// see (`GET /_matrix/federation/v1/user/devices/{userId}`).
pub async fn user_devices(
    State(services): State<Arc<Services>>,
    req: Ruma<get_devices::v1::Request>,
) -> Result<RumaResponse<get_devices::v1::Response>> {
    let user_id = &req.body.user_id;
    if user_id.server_name() != services.settings.server_name {
        return Err(Error::NotFound("That user is not on this server".to_owned()));
    }
    // The stream position orders this answer against later device list updates.
    let stream_id = UInt::new(services.streams.current().stream.max(0) as u64).unwrap_or_default();
    let mut response = get_devices::v1::Response::new(user_id.clone(), stream_id);
    let keys = services.keys.query_device_keys(user_id.as_str(), &[]).await?;
    for device in services.devices.list(user_id.as_str()).await? {
        // Devices that never uploaded keys cannot take part in encryption: not listed.
        if let Some(value) = keys.get(&device.device_id) {
            let mut entry = get_devices::v1::UserDevice::new(device.device_id.as_str().into(), to_raw(value)?);
            entry.device_display_name = device.display_name.clone();
            response.devices.push(entry);
        }
    }
    if let Some(master) = services.keys.cross_signing_key(user_id.as_str(), "master").await? {
        response.master_key = Some(to_raw(&master)?);
    }
    if let Some(key) = services.keys.cross_signing_key(user_id.as_str(), "self_signing").await? {
        response.self_signing_key = Some(to_raw(&key)?);
    }
    Ok(RumaResponse(response))
}

/// `GET /_matrix/federation/v1/publicRooms`
///
/// Our public room directory, for another server's users.
pub async fn public_rooms(
    State(services): State<Arc<Services>>,
    req: Ruma<get_public_rooms::v1::Request>,
) -> Result<RumaResponse<get_public_rooms::v1::Response>> {
    let page = services.rooms.public_rooms_page(None, req.body.limit, req.body.since.as_deref()).await?;
    let mut response = get_public_rooms::v1::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = Some(page.total);
    Ok(RumaResponse(response))
}

/// `POST /_matrix/federation/v1/publicRooms`
///
/// The same, filtered by a search term.
pub async fn public_rooms_filtered(
    State(services): State<Arc<Services>>,
    req: Ruma<get_public_rooms_filtered::v1::Request>,
) -> Result<RumaResponse<get_public_rooms_filtered::v1::Response>> {
    let search = req.body.filter.generic_search_term.as_deref();
    let page = services.rooms.public_rooms_page(search, req.body.limit, req.body.since.as_deref()).await?;
    let mut response = get_public_rooms_filtered::v1::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = Some(page.total);
    Ok(RumaResponse(response))
}
