//! Relations (`/relations`), threads (`/threads`) and `/context`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UInt,
    api::{
        Direction,
        client::{
            context::get_context,
            relations::{
                get_relating_events, get_relating_events_with_rel_type,
                get_relating_events_with_rel_type_and_event_type,
            },
            threads::get_threads,
        },
    },
};
use serde_json::json;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, auth::AuthedUser, events::Viewer, streams::Positions, sync::event_filter_from_json},
    store::EventRow,
};

/// One page of relations.
struct RelationsPage {
    chunk: Vec<EventRow>,
    next_batch: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn relations_page(
    services: &Services,
    user: &AuthedUser,
    room_id: &str,
    target: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    dir: Direction,
    limit: Option<UInt>,
) -> Result<RelationsPage> {
    let parent = services.store.event(target).await?.filter(|e| e.room_id == room_id);
    let parent = parent.ok_or_else(|| Error::NotFound("Event not found".to_owned()))?;
    if services.sync.visible_events(room_id, user.user_id.as_str(), vec![parent]).await?.is_empty() {
        return Err(Error::NotFound("Event not found".to_owned()));
    }
    let parse = |t: &str| {
        Positions::parse(t).map(|p| p.stream).ok_or_else(|| Error::InvalidParam(format!("Invalid token {t}")))
    };
    let limit = limit.map(|l| i64::try_from(u64::from(l)).unwrap_or(50)).unwrap_or(50).clamp(1, 100);
    let backwards = dir == Direction::Backward;
    let now = services.streams.current().stream;
    let (low, high) = match (backwards, from.map(parse).transpose()?, to.map(parse).transpose()?) {
        (true, f, t) => (t.unwrap_or(0), f.unwrap_or(now)),
        (false, f, t) => (f.unwrap_or(0), t.unwrap_or(now).min(now)),
    };
    let rows = services.store.relations(target, rel_type, event_type, low, high, limit, backwards).await?;
    let full = i64::try_from(rows.len()).unwrap_or(0) == limit;
    let next_batch = match rows.last() {
        Some(last) if full => {
            Some(Positions::at(if backwards { last.stream_ordering - 1 } else { last.stream_ordering }).to_string())
        }
        _ => None,
    };
    let chunk = services.sync.visible_events(room_id, user.user_id.as_str(), rows).await?;
    Ok(RelationsPage { chunk, next_batch })
}

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
    let page = relations_page(
        &services,
        &user,
        b.room_id.as_str(),
        b.event_id.as_str(),
        None,
        None,
        b.from.as_deref(),
        b.to.as_deref(),
        b.dir,
        b.limit,
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
    let page = relations_page(
        &services,
        &user,
        b.room_id.as_str(),
        b.event_id.as_str(),
        Some(&rel_type),
        None,
        b.from.as_deref(),
        b.to.as_deref(),
        b.dir,
        b.limit,
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
    let page = relations_page(
        &services,
        &user,
        b.room_id.as_str(),
        b.event_id.as_str(),
        Some(&rel_type),
        Some(&event_type),
        b.from.as_deref(),
        b.to.as_deref(),
        b.dir,
        b.limit,
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
    let room_id = req.body.room_id.as_str();
    if services.store.membership_history(room_id, user.user_id.as_str()).await?.iter().all(|(_, m)| m != "join") {
        return Err(Error::Forbidden("You are not a member of this room".to_owned()));
    }
    let before = match req.body.from.as_deref() {
        Some(t) => Positions::parse(t).ok_or_else(|| Error::InvalidParam(format!("Invalid token {t}")))?.stream,
        None => i64::MAX,
    };
    let limit = req.body.limit.map(|l| i64::try_from(u64::from(l)).unwrap_or(50)).unwrap_or(50).clamp(1, 100);
    let participant = match req.body.include {
        get_threads::v1::IncludeThreads::Participated => Some(user.user_id.as_str()),
        _ => None,
    };
    let roots = services.store.thread_roots(room_id, participant, before, limit).await?;
    let next_batch = (i64::try_from(roots.len()).unwrap_or(0) == limit)
        .then(|| roots.last().map(|(_, latest)| Positions::at(*latest).to_string()))
        .flatten();
    let mut rows = Vec::new();
    for (root, _) in roots {
        if let Some(row) = services.store.event(&root).await? {
            rows.push(row);
        }
    }
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let mut shown = Vec::new();
    for row in services.sync.visible_events(room_id, user.user_id.as_str(), rows).await? {
        // A root the viewer saw is a thread to them only if they may see one of its replies.
        if services.relations.sees_a_thread_reply(&row, viewer).await? {
            shown.push(row);
        }
    }
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
    let not_found = || Error::NotFound("Event not found".to_owned());
    let row = services
        .store
        .event(req.body.event_id.as_str())
        .await?
        .filter(|e| e.room_id == room_id)
        .ok_or_else(not_found)?;
    let center = row.stream_ordering;
    if services.sync.visible_events(room_id, user.user_id.as_str(), vec![row.clone()]).await?.is_empty() {
        return Err(not_found());
    }
    let filter_json = serde_json::to_value(&req.body.filter).map_err(|e| Error::internal(e.to_string()))?;
    let filter = event_filter_from_json(&json!({"room": {"timeline": filter_json, "state": filter_json}}));
    let limit = i64::try_from(u64::from(req.body.limit)).unwrap_or(10).clamp(0, 100);
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let before = services.store.room_events(room_id, 0, center - 1, before_n, true).await?;
    let after = services.store.room_events(room_id, center, services.streams.current().stream, after_n, false).await?;
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
