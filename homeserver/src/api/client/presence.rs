//! `/presence/{userId}/status`.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    api::client::presence::{get_presence, set_presence},
    presence::PresenceState,
};
use std::time::Duration;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::Services,
};

/// `PUT /_matrix/client/v3/presence/{userId}/status`
pub async fn set(
    State(services): State<Arc<Services>>,
    req: Ruma<set_presence::v3::Request>,
) -> Result<RumaResponse<set_presence::v3::Response>> {
    let user = req.user()?.clone();
    services
        .presence
        .set(&user.user_id, &req.body.user_id, req.body.presence.as_str(), req.body.status_msg.clone())
        .await?;
    Ok(RumaResponse(set_presence::v3::Response::new()))
}

/// `GET /_matrix/client/v3/presence/{userId}/status`
pub async fn get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_presence::v3::Request>,
) -> Result<RumaResponse<get_presence::v3::Response>> {
    let user = req.user()?.clone();
    let content = services.presence.get(&user.user_id, &req.body.user_id).await?;
    let state = PresenceState::from(content["presence"].as_str().unwrap_or("offline"));
    let mut response = get_presence::v3::Response::new(state);
    response.status_msg = content["status_msg"].as_str().map(str::to_owned);
    response.currently_active = content["currently_active"].as_bool();
    response.last_active_ago = content["last_active_ago"].as_u64().map(Duration::from_millis);
    Ok(RumaResponse(response))
}
