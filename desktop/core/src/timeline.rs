//! Timelines: turning events into [`TimelineItem`]s, and reading a room's history from the
//! local cache (works offline).

use ruma::RoomId;
use serde_json::Value;

use crate::{Attachment, Client, ItemContent, Result, TimelineItem};

/// What a (decrypted) event shows in the timeline; `None` for events the timeline hides
/// (power levels, create, join rules, ...).
pub(crate) fn item_content(event: &Value) -> Option<ItemContent> {
    let content = &event["content"];
    match event["type"].as_str()? {
        "m.room.message" => Some(message_content(content)),
        "m.room.member" => {
            let user_id = event["state_key"].as_str()?.try_into().ok()?;
            let change = content["membership"].as_str().unwrap_or("leave").to_owned();
            Some(ItemContent::Membership { user_id, change })
        }
        _ => None,
    }
}

fn message_content(content: &Value) -> ItemContent {
    let body = content["body"].as_str().unwrap_or_default().to_owned();
    match content["msgtype"].as_str() {
        Some("m.file" | "m.image" | "m.video" | "m.audio") => {
            let (url, encrypted_file) = match content.get("file") {
                Some(file) => (file["url"].as_str(), Some(file.clone())),
                None => (content["url"].as_str(), None),
            };
            match url {
                Some(url) => ItemContent::File {
                    name: content["filename"].as_str().map(str::to_owned).unwrap_or(body),
                    size: content["info"]["size"].as_u64(),
                    mimetype: content["info"]["mimetype"].as_str().map(str::to_owned),
                    attachment: Attachment { url: url.into(), encrypted_file },
                },
                None => ItemContent::Text { body },
            }
        }
        _ => ItemContent::Text { body },
    }
}

impl Client {
    /// The newest `limit` items of a room, oldest first, from the local cache: no network,
    /// so history shows offline. Our queued messages are included with their send state.
    pub async fn timeline(&self, room_id: &RoomId, limit: u32) -> Result<Vec<TimelineItem>> {
        self.inner.store.timeline(room_id.as_str(), limit).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_files_and_members_become_items() {
        let text = json!({"type": "m.room.message", "content": {"msgtype": "m.text", "body": "hi"}});
        assert_eq!(item_content(&text), Some(ItemContent::Text { body: "hi".into() }));
        let file = json!({"type": "m.room.message", "content": {"msgtype": "m.file", "body": "a.bin",
            "info": {"size": 3, "mimetype": "application/octet-stream"}, "file": {"url": "mxc://x/y", "v": "v2"}}});
        let Some(ItemContent::File { name, size, attachment, .. }) = item_content(&file) else { panic!() };
        assert_eq!((name.as_str(), size, attachment.url.as_str()), ("a.bin", Some(3), "mxc://x/y"));
        assert!(attachment.encrypted_file.is_some());
        let member = json!({"type": "m.room.member", "state_key": "@a:x", "content": {"membership": "join"}});
        assert!(matches!(item_content(&member), Some(ItemContent::Membership { change, .. }) if change == "join"));
        assert_eq!(item_content(&json!({"type": "m.room.power_levels", "content": {}})), None);
    }
}
