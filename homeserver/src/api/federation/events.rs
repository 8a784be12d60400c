//! Events and state for other servers: `/event`, `/state`, `/state_ids`, `/event_auth`,
//! `/backfill` and `/get_missing_events`, for servers not denied by the room's server ACL with
//! a user in the room (or a `world_readable` room), each event by the history visibility rules
//! for that server (`service::server_visibility`): the state and auth chain at an event only
//! when it may see the event, history walks with what it may not see pruned.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch,
    api::federation::{
        authorization::get_event_authorization,
        backfill::get_backfill,
        event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
    },
};

use super::rooms::origin;
use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
};

fn parse_ids(ids: Vec<String>) -> Result<Vec<ruma::OwnedEventId>> {
    ids.into_iter().map(|id| EventId::parse(id).map_err(|e| Error::internal(e.to_string()))).collect()
}

/// `GET /_matrix/federation/v1/event/{eventId}`
pub async fn event(
    State(services): State<Arc<Services>>,
    req: Ruma<get_event::v1::Request>,
) -> Result<RumaResponse<get_event::v1::Response>> {
    let origin = origin(&req)?;
    let pdu = services.servers.event(&req.body.event_id, &origin).await?;
    Ok(RumaResponse(get_event::v1::Response::new(
        services.settings.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
        pdu,
    )))
}

/// `GET /_matrix/federation/v1/state/{roomId}`
pub async fn state(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_state::v1::Request>,
) -> Result<RumaResponse<get_room_state::v1::Response>> {
    let origin = origin(&req)?;
    let room_id = &req.body.room_id;
    services.servers.require_may_read(room_id, &origin).await?;
    services.servers.require_may_see(room_id, req.body.event_id.as_str(), &origin).await?;
    let (state, chain) = services.servers.state_before(room_id, &req.body.event_id).await?;
    Ok(RumaResponse(get_room_state::v1::Response::new(
        services.servers.events(room_id, &chain).await?,
        services.servers.events(room_id, &state).await?,
    )))
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}`
pub async fn state_ids(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_state_ids::v1::Request>,
) -> Result<RumaResponse<get_room_state_ids::v1::Response>> {
    let origin = origin(&req)?;
    services.servers.require_may_read(&req.body.room_id, &origin).await?;
    services.servers.require_may_see(&req.body.room_id, req.body.event_id.as_str(), &origin).await?;
    let (state, chain) = services.servers.state_before(&req.body.room_id, &req.body.event_id).await?;
    Ok(RumaResponse(get_room_state_ids::v1::Response::new(parse_ids(chain)?, parse_ids(state)?)))
}

pub async fn event_auth(
    State(services): State<Arc<Services>>,
    req: Ruma<get_event_authorization::v1::Request>,
) -> Result<RumaResponse<get_event_authorization::v1::Response>> {
    let origin = origin(&req)?;
    services.servers.require_may_read(&req.body.room_id, &origin).await?;
    let room_id = &req.body.room_id;
    let id = req.body.event_id.to_string();
    // A timeline event the server may see, or an accepted outlier for a server joined now;
    // never a soft-failed event.
    if services.store.event(&id).await?.is_some() {
        services.servers.require_may_see(room_id, &id, &origin).await?;
    } else {
        let found = services.store.accepted_outliers(std::slice::from_ref(&id)).await?;
        if !found.iter().any(|(_, room, _)| room == room_id.as_str()) {
            return Err(Error::NotFound("Unknown event".to_owned()));
        }
        if !services.servers.joined(room_id, &origin).await? {
            return Err(Error::Forbidden("Your server may not see that event".to_owned()));
        }
    }
    let chain = services.servers.auth_chain_ids(room_id, &[id]).await?;
    Ok(RumaResponse(get_event_authorization::v1::Response::new(services.servers.events(room_id, &chain).await?)))
}

/// `GET /_matrix/federation/v1/backfill/{roomId}`
pub async fn backfill(
    State(services): State<Arc<Services>>,
    req: Ruma<get_backfill::v1::Request>,
) -> Result<RumaResponse<get_backfill::v1::Response>> {
    let origin = origin(&req)?;
    services.servers.require_may_read(&req.body.room_id, &origin).await?;
    let limit = usize::try_from(u64::from(req.body.limit)).unwrap_or(usize::MAX);
    let pdus = services.servers.backfill(&req.body.room_id, &origin, &req.body.v, limit).await?;
    Ok(RumaResponse(get_backfill::v1::Response::new(
        services.settings.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
        pdus,
    )))
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`
pub async fn missing_events(
    State(services): State<Arc<Services>>,
    req: Ruma<get_missing_events::v1::Request>,
) -> Result<RumaResponse<get_missing_events::v1::Response>> {
    let origin = origin(&req)?;
    services.servers.require_may_read(&req.body.room_id, &origin).await?;
    let limit = usize::try_from(u64::from(req.body.limit)).unwrap_or(usize::MAX);
    let events = services
        .servers
        .missing_events(
            &req.body.room_id,
            &origin,
            &req.body.earliest_events,
            &req.body.latest_events,
            limit,
            u64::from(req.body.min_depth),
        )
        .await?;
    Ok(RumaResponse(get_missing_events::v1::Response::new(events)))
}
