//! The account itself: whoami, password change, deactivation.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::account::{ThirdPartyIdRemovalStatus, change_password, deactivate, whoami};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::Result,
    service::{Services, uiaa::UiaaAction},
};

/// `GET /_matrix/client/v3/account/whoami`
pub async fn whoami(req: Ruma<whoami::v3::Request>) -> Result<RumaResponse<whoami::v3::Response>> {
    let user = req.user()?;
    let mut response = whoami::v3::Response::new(user.user_id.clone(), false);
    response.device_id = Some(user.device_id.clone());
    Ok(RumaResponse(response))
}

/// `POST /_matrix/client/v3/account/password`
pub async fn change_password(
    State(services): State<Arc<Services>>,
    req: Ruma<change_password::v3::Request>,
) -> Result<RumaResponse<change_password::v3::Response>> {
    let user = req.user()?;
    let uiaa = services.uiaa.check(UiaaAction::ChangePassword, Some(&user.user_id), req.body.auth.as_ref()).await?;
    services.accounts.change_password(user, req.body.new_password.clone(), req.body.logout_devices).await?;
    services.uiaa.finish(uiaa).await;
    Ok(RumaResponse(change_password::v3::Response::new()))
}

/// `POST /_matrix/client/v3/account/deactivate`
pub async fn deactivate(
    State(services): State<Arc<Services>>,
    req: Ruma<deactivate::v3::Request>,
) -> Result<RumaResponse<deactivate::v3::Response>> {
    let user = req.user()?;
    let uiaa = services.uiaa.check(UiaaAction::Deactivate, Some(&user.user_id), req.body.auth.as_ref()).await?;
    services.accounts.deactivate(&user.user_id).await?;
    services.uiaa.finish(uiaa).await;
    Ok(RumaResponse(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport)))
}
