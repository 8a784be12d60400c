//! `/user_directory/search`.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::user_directory::search_users;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::Services,
};

/// `POST /_matrix/client/v3/user_directory/search`
pub async fn search(
    State(services): State<Arc<Services>>,
    req: Ruma<search_users::v3::Request>,
) -> Result<RumaResponse<search_users::v3::Response>> {
    let user = req.user()?;
    let limit = i64::try_from(u64::from(req.body.limit)).unwrap_or(10).clamp(1, 100);
    let found = services.profile.search_directory(&user.user_id, req.body.search_term.trim(), limit).await?;
    Ok(RumaResponse(search_users::v3::Response::new(found.users, found.limited)))
}
