//! Federation queries: other servers asking about our users.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::federation::query::get_profile_information;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
};

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
            let value = services.profile_field(user_id, field.as_str()).await?;
            response.data.set(field.as_str().to_owned(), value);
        }
        None => {
            for (field, value) in services.profile(user_id).await? {
                response.data.set(field, value);
            }
        }
    }
    Ok(RumaResponse(response))
}
