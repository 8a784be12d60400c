//! Relations (`/relations`), threads (`/threads`) and `/context`.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::{
    Direction,
    client::{
        context::get_context,
        relations::{
            get_relating_events, get_relating_events_with_rel_type, get_relating_events_with_rel_type_and_event_type,
        },
        threads::get_threads,
    },
};
use serde_json::json;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        aggregations::{RelationsQuery, ThreadsQuery},
        auth::AuthedUser,
        events::Viewer,
        streams::Positions,
        sync::event_filter_from_json,
    },
    store::EventRow,
};

async fn raw_chunk<T>(services: &Services, user: &AuthedUser, rows: &[EventRow]) -> Result<Vec<ruma::serde::Raw<T>>> {
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    services.relations.raw_client_events(rows, viewer, true).await
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}`
pub async fn relating(
    State(services): State<Arc<Services>>,
    req: Ruma<get_relating_events::v1::Request>,
) -> Result<RumaResponse<get_relating_events::v1::Response>> {
    let user = req.user()?.clone();
    let b = req.body;
    let page = services
        .relations
        .page(
            &user.user_id,
            RelationsQuery {
                room_id: b.room_id.as_str(),
                target: b.event_id.as_str(),
                rel_type: None,
                event_type: None,
                from: b.from.as_deref(),
                to: b.to.as_deref(),
                dir: b.dir,
                limit: b.limit,
            },
        )
        .await?;
    let mut response = get_relating_events::v1::Response::new(raw_chunk(&services, &user, &page.chunk).await?);
    response.next_batch = page.next_batch;
    Ok(RumaResponse(response))
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}`
pub async fn relating_with_type(
    State(services): State<Arc<Services>>,
    req: Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> Result<RumaResponse<get_relating_events_with_rel_type::v1::Response>> {
    let user = req.user()?.clone();
    let b = req.body;
    let rel_type = b.rel_type.to_string();
    let page = services
        .relations
        .page(
            &user.user_id,
            RelationsQuery {
                room_id: b.room_id.as_str(),
                target: b.event_id.as_str(),
                rel_type: Some(&rel_type),
                event_type: None,
                from: b.from.as_deref(),
                to: b.to.as_deref(),
                dir: b.dir,
                limit: b.limit,
            },
        )
        .await?;
    let mut response =
        get_relating_events_with_rel_type::v1::Response::new(raw_chunk(&services, &user, &page.chunk).await?);
    response.next_batch = page.next_batch;
    Ok(RumaResponse(response))
}

pub async fn relating_with_type_and_event_type(
    State(services): State<Arc<Services>>,
    req: Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> Result<RumaResponse<get_relating_events_with_rel_type_and_event_type::v1::Response>> {
    let user = req.user()?.clone();
    let b = req.body;
    let rel_type = b.rel_type.to_string();
    let event_type = b.event_type.to_string();
    let page = services
        .relations
        .page(
            &user.user_id,
            RelationsQuery {
                room_id: b.room_id.as_str(),
                target: b.event_id.as_str(),
                rel_type: Some(&rel_type),
                event_type: Some(&event_type),
                from: b.from.as_deref(),
                to: b.to.as_deref(),
                dir: b.dir,
                limit: b.limit,
            },
        )
        .await?;
    let mut response = get_relating_events_with_rel_type_and_event_type::v1::Response::new(
        raw_chunk(&services, &user, &page.chunk).await?,
    );
    response.next_batch = page.next_batch;
    Ok(RumaResponse(response))
}

/// `GET /_matrix/client/v1/rooms/{roomId}/threads`
pub async fn threads(
    State(services): State<Arc<Services>>,
    req: Ruma<get_threads::v1::Request>,
) -> Result<RumaResponse<get_threads::v1::Response>> {
    let user = req.user()?.clone();
    let participated = matches!(req.body.include, get_threads::v1::IncludeThreads::Participated);
    let query = ThreadsQuery { from: req.body.from.as_deref(), limit: req.body.limit, participated };
    let (shown, next_batch) = services.relations.threads(&req.body.room_id, &user, query).await?;
    let mut response = get_threads::v1::Response::new(raw_chunk(&services, &user, &shown).await?);
    response.next_batch = next_batch;
    Ok(RumaResponse(response))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
pub async fn context(
    State(services): State<Arc<Services>>,
    req: Ruma<get_context::v3::Request>,
) -> Result<RumaResponse<get_context::v3::Response>> {
    let user = req.user()?.clone();
    let room_id = req.body.room_id.as_str();
    let row = services.events.visible_in_room(room_id, req.body.event_id.as_str(), user.user_id.as_str()).await?;
    let center = row.stream_ordering;
    let filter_json = serde_json::to_value(&req.body.filter).map_err(|e| Error::internal(e.to_string()))?;
    let filter = event_filter_from_json(&json!({"room": {"timeline": filter_json, "state": filter_json}}));
    let limit = i64::try_from(u64::from(req.body.limit)).unwrap_or(10).clamp(0, 100);
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let before = services.timeline.page(room_id, 0, center - 1, before_n, Direction::Backward).await?;
    let now = services.streams.current().stream;
    let after = services.timeline.page(room_id, center, now, after_n, Direction::Forward).await?;
    let start = before.last().map(|r| r.stream_ordering - 1).unwrap_or(center - 1);
    let end = after.last().map(|r| r.stream_ordering).unwrap_or(center);
    let before: Vec<EventRow> = services
        .sync
        .visible_events(room_id, user.user_id.as_str(), before)
        .await?
        .into_iter()
        .filter(|r| filter.allows_event(r))
        .collect();
    let after: Vec<EventRow> = services
        .sync
        .visible_events(room_id, user.user_id.as_str(), after)
        .await?
        .into_iter()
        .filter(|r| filter.allows_event(r))
        .collect();

    let mut state_rows = services.sync.state_at(room_id, center).await?;
    if filter.lazy_load_members {
        let mut senders: Vec<String> =
            before.iter().chain(after.iter()).chain(std::iter::once(&row)).map(|r| r.sender.clone()).collect();
        senders.push(user.user_id.to_string());
        state_rows
            .retain(|r| r.event_type != "m.room.member" || r.state_key.as_ref().is_some_and(|k| senders.contains(k)));
    }
    let mut response = get_context::v3::Response::new();
    response.start = Some(Positions::at(start).to_string());
    response.end = Some(Positions::at(end).to_string());
    response.event = Some(raw_chunk(&services, &user, std::slice::from_ref(&row)).await?.remove(0));
    response.events_before = raw_chunk(&services, &user, &before).await?;
    response.events_after = raw_chunk(&services, &user, &after).await?;
    response.state = raw_chunk(&services, &user, &state_rows).await?;
    Ok(RumaResponse(response))
}
