//! `/search`: full-text search over the unencrypted messages, names and topics of the rooms
//! the user is in (SQLite FTS5 or PostgreSQL full-text, see store::rooms).

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UInt,
    api::client::search::search_events::{
        self,
        v3::{OrderBy, ResultCategories, ResultRoomEvents, SearchKeys, SearchResult},
    },
};
use serde_json::json;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        events::{SearchQuery, Viewer},
        sync::event_filter_from_json,
    },
};

const PAGE: i64 = 20;

/// `POST /_matrix/client/v3/search`
pub async fn search(
    State(services): State<Arc<Services>>,
    req: Ruma<search_events::v3::Request>,
) -> Result<RumaResponse<search_events::v3::Response>> {
    let user = req.user()?.clone();
    let Some(criteria) = req.body.search_categories.room_events.as_ref() else {
        return Ok(RumaResponse(search_events::v3::Response::new(ResultCategories::new())));
    };
    let offset: i64 = match req.body.next_batch.as_deref() {
        Some(t) => t
            .parse()
            .ok()
            .filter(|o: &i64| *o >= 0)
            .ok_or_else(|| Error::InvalidParam("Invalid next_batch".to_owned()))?,
        None => 0,
    };
    let keys: Vec<&'static str> = match &criteria.keys {
        Some(keys) => keys
            .iter()
            .filter_map(|k| match k {
                SearchKeys::ContentBody => Some("content.body"),
                SearchKeys::ContentName => Some("content.name"),
                SearchKeys::ContentTopic => Some("content.topic"),
                _ => None,
            })
            .collect(),
        None => vec!["content.body", "content.name", "content.topic"],
    };
    let terms: Vec<String> = criteria.search_term.split_whitespace().take(16).map(str::to_lowercase).collect();
    if terms.is_empty() || keys.is_empty() {
        return Err(Error::InvalidParam("Nothing to search for".to_owned()));
    }
    let by_rank = !matches!(criteria.order_by, Some(OrderBy::Recent));
    let filter_json = serde_json::to_value(&criteria.filter).map_err(|e| Error::internal(e.to_string()))?;
    let filter = event_filter_from_json(
        &json!({"room": {"timeline": filter_json, "rooms": filter_json["rooms"], "not_rooms": filter_json["not_rooms"]}}),
    );
    let limit = i64::try_from(filter.limit).unwrap_or(PAGE).min(PAGE);

    let query = SearchQuery { terms: &terms, keys: &keys, by_rank, offset, limit: limit + 1 };
    let rows = services.events.search(&user.user_id, &query).await?;
    let more = i64::try_from(rows.len()).unwrap_or(0) > limit;
    let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
    let mut results = Vec::new();
    for (row, rank) in rows.into_iter().take(usize::try_from(limit).unwrap_or(20)) {
        if !filter.allows_room(&row.room_id) || !filter.allows_event(&row) {
            continue;
        }
        let room_id = row.room_id.clone();
        if services.sync.visible_events(&room_id, user.user_id.as_str(), vec![row.clone()]).await?.is_empty() {
            continue;
        }
        let mut result = SearchResult::new();
        result.rank = Some(rank);
        result.result = Some(services.relations.raw_client_event_bundled(&row, viewer, true).await?);
        results.push(result);
    }
    let mut room_events = ResultRoomEvents::new();
    room_events.count = UInt::new(results.len() as u64 + u64::try_from(offset).unwrap_or(0));
    room_events.highlights = terms;
    room_events.next_batch = more.then(|| (offset + limit).to_string());
    room_events.results = results;
    let mut categories = ResultCategories::new();
    categories.room_events = room_events;
    Ok(RumaResponse(search_events::v3::Response::new(categories)))
}
