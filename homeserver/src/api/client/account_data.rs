//! Account data (global and per room) and push rules.

use std::sync::Arc;

use axum::extract::State;
use ruma::{
    UserId,
    api::client::{
        config::{get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data},
        tag::{create_tag, delete_tag, get_tags},
    },
};
use serde_json::Value as JsonValue;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::{
        Services,
        events::to_raw,
        notifier::{Change, Sections},
    },
};

fn require_self(requester: &UserId, target: &UserId) -> Result<()> {
    if requester != target {
        return Err(Error::Forbidden("You may only access your own account data".to_owned()));
    }
    Ok(())
}

impl Services {
    async fn put_account_data(&self, user_id: &UserId, room_id: &str, kind: &str, content: &str) -> Result<()> {
        let value: JsonValue = serde_json::from_str(content).map_err(|e| Error::BadJson(e.to_string()))?;
        if !value.is_object() {
            return Err(Error::BadJson("Account data must be a JSON object".to_owned()));
        }
        if kind == "m.fully_read" || kind == "m.push_rules" || kind == "m.tag" {
            return Err(Error::BadJson(format!("{kind} cannot be set through account data")));
        }
        let position = self.streams.allocate();
        self.store.set_account_data(user_id.as_str(), room_id, kind, &value.to_string(), position.position()).await?;
        position.commit_with(vec![Change::user(user_id.to_owned(), Sections::ACCOUNT_DATA)]);
        Ok(())
    }

    async fn get_account_data(&self, user_id: &UserId, room_id: &str, kind: &str) -> Result<JsonValue> {
        let text = self
            .store
            .account_data(user_id.as_str(), room_id, kind)
            .await?
            .ok_or_else(|| Error::NotFound("Account data not found".to_owned()))?;
        serde_json::from_str(&text).map_err(|e| Error::internal(e.to_string()))
    }
}

pub async fn set_global(
    State(services): State<Arc<Services>>,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<RumaResponse<set_global_account_data::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    services.put_account_data(&user.user_id, "", &req.body.event_type.to_string(), req.body.data.json().get()).await?;
    Ok(RumaResponse(set_global_account_data::v3::Response::new()))
}

pub async fn get_global(
    State(services): State<Arc<Services>>,
    req: Ruma<get_global_account_data::v3::Request>,
) -> Result<RumaResponse<get_global_account_data::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    let value = services.get_account_data(&user.user_id, "", &req.body.event_type.to_string()).await?;
    Ok(RumaResponse(get_global_account_data::v3::Response::new(to_raw(&value)?)))
}

pub async fn set_room(
    State(services): State<Arc<Services>>,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<RumaResponse<set_room_account_data::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    services
        .put_account_data(
            &user.user_id,
            req.body.room_id.as_str(),
            &req.body.event_type.to_string(),
            req.body.data.json().get(),
        )
        .await?;
    Ok(RumaResponse(set_room_account_data::v3::Response::new()))
}

pub async fn get_room(
    State(services): State<Arc<Services>>,
    req: Ruma<get_room_account_data::v3::Request>,
) -> Result<RumaResponse<get_room_account_data::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    let value =
        services.get_account_data(&user.user_id, req.body.room_id.as_str(), &req.body.event_type.to_string()).await?;
    Ok(RumaResponse(get_room_account_data::v3::Response::new(to_raw(&value)?)))
}

impl Services {
    async fn tags_of(&self, user_id: &UserId, room_id: &str) -> Result<serde_json::Map<String, JsonValue>> {
        let text = self.store.account_data(user_id.as_str(), room_id, "m.tag").await?;
        let value: JsonValue = text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        Ok(value["tags"].as_object().cloned().unwrap_or_default())
    }

    async fn save_tags(&self, user_id: &UserId, room_id: &str, tags: serde_json::Map<String, JsonValue>) -> Result<()> {
        let position = self.streams.allocate();
        let content = serde_json::json!({"tags": tags}).to_string();
        self.store.set_account_data(user_id.as_str(), room_id, "m.tag", &content, position.position()).await?;
        position.commit_with(vec![Change::user(user_id.to_owned(), Sections::ACCOUNT_DATA)]);
        Ok(())
    }
}

pub async fn tags(
    State(services): State<Arc<Services>>,
    req: Ruma<get_tags::v3::Request>,
) -> Result<RumaResponse<get_tags::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    let tags = services.tags_of(&user.user_id, req.body.room_id.as_str()).await?;
    let tags = serde_json::from_value(JsonValue::Object(tags)).map_err(|e| Error::internal(e.to_string()))?;
    Ok(RumaResponse(get_tags::v3::Response::new(tags)))
}

pub async fn tag_put(
    State(services): State<Arc<Services>>,
    req: Ruma<create_tag::v3::Request>,
) -> Result<RumaResponse<create_tag::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    if req.body.tag.is_empty() || req.body.tag.len() > 255 {
        return Err(Error::InvalidParam("A tag is 1 to 255 bytes".to_owned()));
    }
    let mut tags = services.tags_of(&user.user_id, req.body.room_id.as_str()).await?;
    let info = serde_json::to_value(&req.body.tag_info).map_err(|e| Error::internal(e.to_string()))?;
    tags.insert(req.body.tag.clone(), info);
    services.save_tags(&user.user_id, req.body.room_id.as_str(), tags).await?;
    Ok(RumaResponse(create_tag::v3::Response::new()))
}

pub async fn tag_delete(
    State(services): State<Arc<Services>>,
    req: Ruma<delete_tag::v3::Request>,
) -> Result<RumaResponse<delete_tag::v3::Response>> {
    let user = req.user()?.clone();
    require_self(&user.user_id, &req.body.user_id)?;
    let mut tags = services.tags_of(&user.user_id, req.body.room_id.as_str()).await?;
    if tags.remove(&req.body.tag).is_some() {
        services.save_tags(&user.user_id, req.body.room_id.as_str(), tags).await?;
    }
    Ok(RumaResponse(delete_tag::v3::Response::new()))
}
