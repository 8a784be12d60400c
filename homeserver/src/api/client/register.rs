//! Registration: `/register`, `/register/available`, registration token validity.

use std::sync::Arc;

use axum::{extract::State, response::IntoResponse};
use ruma::api::client::account::{
    check_registration_token_validity, get_username_availability,
    register::{self, RegistrationKind},
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    config::RegistrationMode,
    error::{Error, Result},
    service::{Services, accounts::Registration, rate_limit::Class},
};

/// `POST /_matrix/client/v3/register`
pub async fn register(
    State(services): State<Arc<Services>>,
    req: Ruma<register::v3::Request>,
) -> Result<axum::response::Response> {
    let ip = req.client_ip;
    let body = req.body;
    let registered = services
        .accounts
        .register(
            ip,
            Registration {
                username: body.username,
                password: body.password,
                device_id: body.device_id.map(|d| d.to_string()),
                initial_device_display_name: body.initial_device_display_name,
                inhibit_login: body.inhibit_login,
                auth: body.auth,
                is_guest: body.kind == RegistrationKind::Guest,
            },
        )
        .await?;
    let Some(session) = registered.session else {
        // With `inhibit_login` the answer is the user id alone: ruma's response type would
        // write `"device_id": null`, which clients (matrix-nio) read as a device called null.
        return Ok(axum::Json(serde_json::json!({ "user_id": registered.user_id })).into_response());
    };
    let mut response = register::v3::Response::new(registered.user_id);
    response.access_token = Some(session.access_token);
    response.device_id = Some(session.device_id.into());
    Ok(RumaResponse(response).into_response())
}

/// `GET /_matrix/client/v3/register/available`
pub async fn available(
    State(services): State<Arc<Services>>,
    req: Ruma<get_username_availability::v3::Request>,
) -> Result<RumaResponse<get_username_availability::v3::Response>> {
    services.rate_limits.check_address(Class::Registration, req.client_ip)?;
    services.accounts.check_username_available(&req.body.username).await?;
    Ok(RumaResponse(get_username_availability::v3::Response::new(true)))
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`
pub async fn token_validity(
    State(services): State<Arc<Services>>,
    req: Ruma<check_registration_token_validity::v1::Request>,
) -> Result<RumaResponse<check_registration_token_validity::v1::Response>> {
    if services.settings.registration != RegistrationMode::Token {
        return Err(Error::Forbidden("This server does not use registration tokens".to_owned()));
    }
    services.rate_limits.check_address(Class::RegistrationTokenValidity, req.client_ip)?;
    let valid = services.registration_tokens.is_valid(&req.body.token).await?;
    Ok(RumaResponse(check_registration_token_validity::v1::Response::new(valid)))
}
