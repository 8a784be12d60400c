//! Profiles: the whole profile and single fields (`displayname`, `avatar_url`, custom).

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UserId,
    api::client::profile::{delete_profile_field, get_profile, get_profile_field, set_profile_field},
    profile::ProfileFieldValue,
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, rate_limit::Class},
};

/// `GET /_matrix/client/v3/profile/{userId}`
pub async fn get(
    State(services): State<Arc<Services>>,
    req: Ruma<get_profile::v3::Request>,
) -> Result<RumaResponse<get_profile::v3::Response>> {
    require_signed_in_for_remote(&services, &req, &req.body.user_id).await?;
    let profile = services.profile.get(&req.body.user_id).await?;
    let mut response = get_profile::v3::Response::new();
    for (field, value) in profile {
        response.data.set(field, value);
    }
    Ok(RumaResponse(response))
}

/// Anyone may read our users' profiles; another server's users' only signed-in users, or
/// anybody could make us contact any server.
async fn require_signed_in_for_remote<T>(services: &Services, req: &Ruma<T>, user_id: &UserId) -> Result<()> {
    if user_id.server_name() != services.settings.server_name {
        req.signed_in_user(services).await?;
    }
    Ok(())
}

/// `GET /_matrix/client/v3/profile/{userId}/{field}`
pub async fn get_field(
    State(services): State<Arc<Services>>,
    req: Ruma<get_profile_field::v3::Request>,
) -> Result<RumaResponse<get_profile_field::v3::Response>> {
    require_signed_in_for_remote(&services, &req, &req.body.user_id).await?;
    let field = req.body.field.as_str();
    let value = services.profile.field(&req.body.user_id, field).await?;
    let value = ProfileFieldValue::new(field, value)
        .map_err(|e| Error::internal(format!("stored profile field {field} has the wrong type: {e}")))?;
    Ok(RumaResponse(get_profile_field::v3::Response::new(value)))
}

/// `PUT /_matrix/client/v3/profile/{userId}/{field}`
pub async fn set_field(
    State(services): State<Arc<Services>>,
    req: Ruma<set_profile_field::v3::Request>,
) -> Result<RumaResponse<set_profile_field::v3::Response>> {
    let user = req.user()?;
    // Profile changes count as messages, as in Synapse: each one is an event in every room.
    services.rate_limits.check_user(Class::Message, &user.user_id)?;
    let field = req.body.value.field_name();
    let value = req.body.value.value();
    services.profile.set_field(&user.user_id, &req.body.user_id, field.as_str(), &value).await?;
    Ok(RumaResponse(set_profile_field::v3::Response::new()))
}

/// `DELETE /_matrix/client/v3/profile/{userId}/{field}`
pub async fn delete_field(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_profile_field::v3::Request>,
) -> Result<RumaResponse<delete_profile_field::v3::Response>> {
    let user = req.user()?;
    services.rate_limits.check_user(Class::Message, &user.user_id)?;
    services.profile.delete_field(&user.user_id, &req.body.user_id, req.body.field.as_str()).await?;
    Ok(RumaResponse(delete_profile_field::v3::Response::new()))
}
