//! `/user_directory/search`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{UserId, api::client::user_directory::search_users};
use serde_json::Value as JsonValue;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::Services,
};

pub async fn search(
    State(services): State<Arc<Services>>,
    req: Ruma<search_users::v3::Request>,
) -> Result<RumaResponse<search_users::v3::Response>> {
    let user = req.user()?.clone();
    let limit = i64::try_from(u64::from(req.body.limit)).unwrap_or(10).clamp(1, 100);
    let term = req.body.search_term.trim();
    let rows = services
        .store
        .search_users(user.user_id.as_str(), term, services.settings.user_directory.search_all_users, limit + 1)
        .await?;
    let limited = i64::try_from(rows.len()).unwrap_or(0) > limit;
    let mut results = Vec::new();
    for (user_id, displayname, avatar) in rows.into_iter().take(usize::try_from(limit).unwrap_or(10)) {
        let Ok(id) = UserId::parse(user_id) else { continue };
        let mut entry = search_users::v3::User::new(id);
        // Profile values are stored as JSON.
        entry.display_name = displayname
            .and_then(|d| serde_json::from_str::<JsonValue>(&d).ok())
            .and_then(|v| v.as_str().map(str::to_owned));
        entry.avatar_url =
            avatar.and_then(|a| serde_json::from_str::<JsonValue>(&a).ok()).and_then(|v| v.as_str().map(Into::into));
        results.push(entry);
    }
    Ok(RumaResponse(search_users::v3::Response::new(results, limited)))
}
