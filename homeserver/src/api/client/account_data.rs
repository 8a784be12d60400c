//! Account data (global and per room) and room tags.

use std::sync::Arc;

use axum::extract::State;
use ruma::api::client::{
    config::{get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data},
    tag::{create_tag, delete_tag, get_tags},
};
use serde_json::Value as JsonValue;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{Services, account_data::Scope, events::to_raw},
};

/// `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn set_global(
    State(services): State<Arc<Services>>,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<RumaResponse<set_global_account_data::v3::Response>> {
    let user = req.user()?;
    let body = &req.body;
    services
        .account_data
        .put(&user.user_id, &body.user_id, Scope::Global, &body.event_type.to_string(), body.data.json().get())
        .await?;
    Ok(RumaResponse(set_global_account_data::v3::Response::new()))
}

/// `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_global(
    State(services): State<Arc<Services>>,
    req: Ruma<get_global_account_data::v3::Request>,
) -> Result<RumaResponse<get_global_account_data::v3::Response>> {
    let user = req.user()?;
    let body = &req.body;
    let value =
        services.account_data.get(&user.user_id, &body.user_id, Scope::Global, &body.event_type.to_string()).await?;
    Ok(RumaResponse(get_global_account_data::v3::Response::new(to_raw(&value)?)))
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn set_room(
    State(services): State<Arc<Services>>,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<RumaResponse<set_room_account_data::v3::Response>> {
    let user = req.user()?;
    let body = &req.body;
    services
        .account_data
        .put(
            &user.user_id,
            &body.user_id,
            Scope::Room(&body.room_id),
            &body.event_type.to_string(),
            body.data.json().get(),
        )
        .await?;
    Ok(RumaResponse(set_room_account_data::v3::Response::new()))
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_account_data::v3::Request>,
) -> Result<RumaResponse<get_room_account_data::v3::Response>> {
    let user = req.user()?;
    let body = &req.body;
    let value = services
        .account_data
        .get(&user.user_id, &body.user_id, Scope::Room(&body.room_id), &body.event_type.to_string())
        .await?;
    Ok(RumaResponse(get_room_account_data::v3::Response::new(to_raw(&value)?)))
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
pub async fn tags(
    State(services): State<Arc<Services>>,
    req: Ruma<get_tags::v3::Request>,
) -> Result<RumaResponse<get_tags::v3::Response>> {
    let user = req.user()?;
    let tags = services.account_data.tags(&user.user_id, &req.body.user_id, &req.body.room_id).await?;
    let tags = serde_json::from_value(JsonValue::Object(tags)).map_err(|e| Error::internal(e.to_string()))?;
    Ok(RumaResponse(get_tags::v3::Response::new(tags)))
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn tag_put(
    State(services): State<Arc<Services>>,
    req: Ruma<create_tag::v3::Request>,
) -> Result<RumaResponse<create_tag::v3::Response>> {
    let user = req.user()?;
    let body = &req.body;
    services.account_data.put_tag(&user.user_id, &body.user_id, &body.room_id, &body.tag, &body.tag_info).await?;
    Ok(RumaResponse(create_tag::v3::Response::new()))
}

/// `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn tag_delete(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_tag::v3::Request>,
) -> Result<RumaResponse<delete_tag::v3::Response>> {
    let user = req.user()?;
    let body = &req.body;
    services.account_data.delete_tag(&user.user_id, &body.user_id, &body.room_id, &body.tag).await?;
    Ok(RumaResponse(delete_tag::v3::Response::new()))
}
