//! `/sync` and filters.

use std::{sync::Arc, time::Duration};

use axum::extract::State;
use ruma::api::client::{
    filter::{create_filter, get_filter},
    sync::sync_events::{self, v3::Filter},
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, streams::Positions, sync::SyncRequest},
};

/// `GET /_matrix/client/v3/sync`
pub async fn sync(
    State(services): State<Arc<Services>>,
    req: Ruma<sync_events::v3::Request>,
) -> Result<RumaResponse<sync_events::v3::Response>> {
    let user = req.user()?.clone();
    let body = req.body;
    let since = match &body.since {
        Some(token) => {
            Some(Positions::parse(token).ok_or_else(|| Error::InvalidParam("Invalid since token".to_owned()))?)
        }
        None => None,
    };
    let filter_text = match &body.filter {
        Some(Filter::FilterId(id)) => Some(id.clone()),
        Some(Filter::FilterDefinition(def)) => {
            Some(serde_json::to_string(def).map_err(|e| Error::internal(e.to_string()))?)
        }
        Some(_) => None,
        None => None,
    };
    let filter = services.sync.resolve_filter(user.user_id.as_str(), filter_text.as_deref()).await?;
    let event_fields = filter.event_fields.clone();
    let request = SyncRequest {
        since,
        filter,
        full_state: body.full_state,
        timeout: body.timeout.unwrap_or(Duration::ZERO),
        set_presence: body.set_presence.to_string(),
    };
    let mut response = services.sync.run(&user.user_id, user.device_id.as_str(), request).await?;
    if let Some(fields) = event_fields {
        crate::service::event_fields::apply_to_sync(&mut response, &fields);
    }
    Ok(RumaResponse(response))
}

/// `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn filter_create(
    State(services): State<Arc<Services>>,
    req: Ruma<create_filter::v3::Request>,
) -> Result<RumaResponse<create_filter::v3::Response>> {
    let user = req.user()?.clone();
    if req.body.user_id != user.user_id {
        return Err(Error::Forbidden("You may only create filters for yourself".to_owned()));
    }
    let json = serde_json::to_string(&req.body.filter).map_err(|e| Error::internal(e.to_string()))?;
    let id = services.sync.create_filter(&user.user_id, &json).await?;
    Ok(RumaResponse(create_filter::v3::Response::new(id.to_string())))
}

/// `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn filter_get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_filter::v3::Request>,
) -> Result<RumaResponse<get_filter::v3::Response>> {
    let user = req.user()?.clone();
    if req.body.user_id != user.user_id {
        return Err(Error::Forbidden("You may only read your own filters".to_owned()));
    }
    let not_found = || Error::NotFound("Unknown filter".to_owned());
    let id: i64 = req.body.filter_id.parse().map_err(|_| not_found())?;
    let json = services.sync.filter_json(&user.user_id, id).await?.ok_or_else(not_found)?;
    let filter = serde_json::from_str(&json).map_err(|e| Error::internal(e.to_string()))?;
    Ok(RumaResponse(get_filter::v3::Response::new(filter)))
}
