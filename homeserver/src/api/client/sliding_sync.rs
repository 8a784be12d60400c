//! Simplified sliding sync (MSC4186): `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::sync::sync_events::v5;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::Services,
};

/// `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`
pub async fn sync(State(services): State<Arc<Services>>, req: Ruma<v5::Request>) -> Result<RumaResponse<v5::Response>> {
    let user = req.user()?.clone();
    let response = services.sliding_sync.run(&user.user_id, user.device_id.as_str(), req.body).await?;
    Ok(RumaResponse(response))
}
