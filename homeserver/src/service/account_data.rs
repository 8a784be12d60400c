//! Account data, global and per room, and room tags (stored as `m.tag` account data).
//! Push rules are account data too but have their own domain ([`super::push`]).

use ruma::{RoomId, UserId, events::tag::TagInfo};
use serde_json::{Map, Value as JsonValue};

use super::{
    Hub,
    notifier::{Change, Sections},
};
use crate::error::{Error, Result};

/// Where a piece of account data belongs: the whole account, or one room.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Global,
    Room(&'a RoomId),
}

impl Scope<'_> {
    /// The store's room column: empty for global account data.
    fn room_key(&self) -> &str {
        match self {
            Scope::Global => "",
            Scope::Room(room_id) => room_id.as_str(),
        }
    }
}

/// Account data and tags of each user; only its owner reads or writes it.
pub struct AccountData {
    hub: Hub,
}

impl AccountData {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// Account data is private: `requester` may only touch their own (`owner`).
    fn require_self(requester: &UserId, owner: &UserId) -> Result<()> {
        if requester != owner {
            return Err(Error::Forbidden("You may only access your own account data".to_owned()));
        }
        Ok(())
    }

    /// `PUT /user/{userId}/account_data/{type}` and its per-room form.
    pub async fn put(
        &self,
        requester: &UserId,
        owner: &UserId,
        scope: Scope<'_>,
        kind: &str,
        content: &str,
    ) -> Result<()> {
        Self::require_self(requester, owner)?;
        let value: JsonValue = serde_json::from_str(content).map_err(|e| Error::BadJson(e.to_string()))?;
        if !value.is_object() {
            return Err(Error::BadJson("Account data must be a JSON object".to_owned()));
        }
        if kind == "m.fully_read" || kind == "m.push_rules" || kind == "m.tag" {
            return Err(Error::BadJson(format!("{kind} cannot be set through account data")));
        }
        let s = self.hub.services();
        let position = s.streams.allocate();
        s.store
            .set_account_data(owner.as_str(), scope.room_key(), kind, &value.to_string(), position.position())
            .await?;
        position.commit_with(vec![Change::user(owner.to_owned(), Sections::ACCOUNT_DATA)]);
        Ok(())
    }

    /// `GET /user/{userId}/account_data/{type}` and its per-room form.
    pub async fn get(&self, requester: &UserId, owner: &UserId, scope: Scope<'_>, kind: &str) -> Result<JsonValue> {
        Self::require_self(requester, owner)?;
        let text = self
            .hub
            .services()
            .store
            .account_data(owner.as_str(), scope.room_key(), kind)
            .await?
            .ok_or_else(|| Error::NotFound("Account data not found".to_owned()))?;
        serde_json::from_str(&text).map_err(|e| Error::internal(e.to_string()))
    }

    /// The tags of a room (`m.tag`), by name.
    pub async fn tags(&self, requester: &UserId, owner: &UserId, room_id: &RoomId) -> Result<Map<String, JsonValue>> {
        Self::require_self(requester, owner)?;
        let text = self.hub.services().store.account_data(owner.as_str(), room_id.as_str(), "m.tag").await?;
        let value: JsonValue = text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        Ok(value["tags"].as_object().cloned().unwrap_or_default())
    }

    /// Adds or replaces one tag of a room.
    pub async fn put_tag(
        &self,
        requester: &UserId,
        owner: &UserId,
        room_id: &RoomId,
        tag: &str,
        info: &TagInfo,
    ) -> Result<()> {
        Self::require_self(requester, owner)?;
        if tag.is_empty() || tag.len() > 255 {
            return Err(Error::InvalidParam("A tag is 1 to 255 bytes".to_owned()));
        }
        let info = serde_json::to_value(info).map_err(|e| Error::internal(e.to_string()))?;
        let mut tags = self.tags(requester, owner, room_id).await?;
        tags.insert(tag.to_owned(), info);
        self.save_tags(owner, room_id, tags).await
    }

    /// Removes one tag of a room (no error if it was not there).
    pub async fn delete_tag(&self, requester: &UserId, owner: &UserId, room_id: &RoomId, tag: &str) -> Result<()> {
        let mut tags = self.tags(requester, owner, room_id).await?;
        if tags.remove(tag).is_some() {
            self.save_tags(owner, room_id, tags).await?;
        }
        Ok(())
    }

    async fn save_tags(&self, owner: &UserId, room_id: &RoomId, tags: Map<String, JsonValue>) -> Result<()> {
        let s = self.hub.services();
        let position = s.streams.allocate();
        let content = serde_json::json!({"tags": tags}).to_string();
        s.store.set_account_data(owner.as_str(), room_id.as_str(), "m.tag", &content, position.position()).await?;
        position.commit_with(vec![Change::user(owner.to_owned(), Sections::ACCOUNT_DATA)]);
        Ok(())
    }
}
