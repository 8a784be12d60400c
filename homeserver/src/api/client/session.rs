//! Login and logout.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::{
    session::{
        get_login_types::{
            self,
            v3::{LoginType, PasswordLoginType},
        },
        login::{
            self,
            v3::{DiscoveryInfo, HomeserverInfo, LoginInfo},
        },
        logout, logout_all,
    },
    uiaa::UserIdentifier,
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, accounts::PasswordLogin},
};

/// `GET /_matrix/client/v3/login`
pub async fn login_types(
    _req: Ruma<get_login_types::v3::Request>,
) -> Result<RumaResponse<get_login_types::v3::Response>> {
    Ok(RumaResponse(get_login_types::v3::Response::new(vec![LoginType::Password(PasswordLoginType::new())])))
}

#[allow(deprecated)] // the `user` field: older clients still send it instead of `identifier`
/// `POST /_matrix/client/v3/login`
pub async fn login(
    State(services): State<Arc<Services>>,
    req: Ruma<login::v3::Request>,
) -> Result<RumaResponse<login::v3::Response>> {
    let ip = req.client_ip;
    let body = req.body;
    let LoginInfo::Password(password) = body.login_info else {
        return Err(Error::Unknown("Only m.login.password is supported".to_owned()));
    };
    let identifier = match (&password.identifier, &password.user) {
        (Some(UserIdentifier::Matrix(id)), _) => id.user.clone(),
        (None, Some(user)) => user.clone(),
        (Some(_), _) => return Err(Error::Forbidden("Only user identifiers (m.id.user) are supported".to_owned())),
        (None, None) => return Err(Error::MissingParam("identifier is required".to_owned())),
    };
    let session = services
        .accounts
        .login_with_password(PasswordLogin {
            ip,
            identifier,
            password: password.password,
            device_id: body.device_id.map(|d| d.to_string()),
            initial_device_display_name: body.initial_device_display_name,
        })
        .await?;
    let mut response = login::v3::Response::new(session.user_id, session.access_token, session.device_id.into());
    response.well_known = Some(DiscoveryInfo::new(HomeserverInfo::new(
        services.settings.public_baseurl.trim_end_matches('/').to_owned(),
    )));
    Ok(RumaResponse(response))
}

/// `POST /_matrix/client/v3/logout`
pub async fn logout(
    State(services): State<Arc<Services>>,
    req: Ruma<logout::v3::Request>,
) -> Result<RumaResponse<logout::v3::Response>> {
    services.accounts.logout(req.user()?).await?;
    Ok(RumaResponse(logout::v3::Response::new()))
}

/// `POST /_matrix/client/v3/logout/all`
pub async fn logout_all(
    State(services): State<Arc<Services>>,
    req: Ruma<logout_all::v3::Request>,
) -> Result<RumaResponse<logout_all::v3::Response>> {
    services.accounts.logout_all(req.user()?).await?;
    Ok(RumaResponse(logout_all::v3::Response::new()))
}
