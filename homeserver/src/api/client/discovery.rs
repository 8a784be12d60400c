//! Server discovery: `/versions`, `/.well-known/matrix/*`, `/capabilities`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, extract::State, response::IntoResponse};
use ruma::{
    RoomVersionId,
    api::client::discovery::{
        discover_homeserver,
        get_capabilities::{
            self,
            v3::{
                Capabilities, ChangePasswordCapability, ProfileFieldsCapability, RoomVersionStability,
                RoomVersionsCapability,
            },
        },
        get_supported_versions,
    },
};

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
};

/// Spec versions whose endpoints we implement or answer with a proper Matrix error.
const SUPPORTED_VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16",
];

/// `GET /_matrix/client/versions`
pub async fn versions(
    _req: Ruma<get_supported_versions::Request>,
) -> Result<RumaResponse<get_supported_versions::Response>> {
    let mut response =
        get_supported_versions::Response::new(SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect());
    // Clients (matrix-rust-sdk, Element X) look for this flag before using sliding sync.
    response.unstable_features = BTreeMap::from([("org.matrix.simplified_msc3575".to_owned(), true)]);
    Ok(RumaResponse(response))
}

/// `GET /.well-known/matrix/client`
pub async fn well_known_client(
    State(services): State<Arc<Services>>,
    _req: Ruma<discover_homeserver::Request>,
) -> Result<RumaResponse<discover_homeserver::Response>> {
    Ok(RumaResponse(discover_homeserver::Response::new(discover_homeserver::HomeserverInfo::new(
        services.settings.public_baseurl.trim_end_matches('/').to_owned(),
    ))))
}

/// `/.well-known/matrix/server`: delegation for federation, served only when the operator
/// configured `well_known_server` (otherwise other servers fall back to port 8448).
pub async fn well_known_server(State(services): State<Arc<Services>>) -> Result<impl IntoResponse> {
    match &services.settings.well_known_server {
        Some(server) => Ok(Json(serde_json::json!({ "m.server": server }))),
        None => Err(Error::NotFound("No server delegation is configured".to_owned())),
    }
}

#[allow(deprecated)] // m.set_displayname / m.set_avatar_url: still read by older clients
/// `GET /_matrix/client/v3/capabilities`
pub async fn capabilities(
    _req: Ruma<get_capabilities::v3::Request>,
) -> Result<RumaResponse<get_capabilities::v3::Response>> {
    let mut capabilities = Capabilities::new();
    capabilities.change_password = ChangePasswordCapability::new(true);
    let available = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12]
        .into_iter()
        .map(|v| (v, RoomVersionStability::Stable))
        .collect();
    capabilities.room_versions = RoomVersionsCapability::new(RoomVersionId::V12, available);
    capabilities.set_displayname =
        ruma::api::client::discovery::get_capabilities::v3::SetDisplayNameCapability::new(true);
    capabilities.set_avatar_url = ruma::api::client::discovery::get_capabilities::v3::SetAvatarUrlCapability::new(true);
    capabilities.profile_fields = Some(ProfileFieldsCapability::new(true));
    Ok(RumaResponse(get_capabilities::v3::Response::new(capabilities)))
}
