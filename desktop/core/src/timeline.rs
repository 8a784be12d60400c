//! Timelines: turning events into [`TimelineItem`]s, reading a room's history from the
//! local cache (works offline), and fetching older history from the server
//! (back-pagination with `/messages`).

use ruma::{
    RoomId,
    api::{Direction, client::message::get_message_events},
};
use serde_json::Value;

use crate::{
    Attachment, Client, Error, ItemContent, Result, SendState, TimelineItem,
    http::REQUEST_TIMEOUT,
    store::{NewItem, Store},
    sync::{now_ms, raw_json},
};

/// What an event shows, given its decryption if it was encrypted (`None` there: the key has
/// not arrived, the item says so and is retried later).
pub(crate) fn event_content(event: &Value, decrypted: Option<&Value>) -> Option<ItemContent> {
    match (event["type"] == "m.room.encrypted", decrypted) {
        (true, Some(plain)) => item_content(plain),
        (true, None) => Some(ItemContent::Undecryptable { reason: "waiting for the key".into() }),
        (false, _) => item_content(event),
    }
}

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
        self.store()?.timeline(room_id.as_str(), limit).await
    }

    /// Fetches up to `limit` events older than the oldest we hold from the server into the
    /// cache (decrypted where we have the keys; the others wait for them like any
    /// undecryptable item), then read them with [`Client::timeline`] and a larger limit.
    /// Returns whether older history remains on the server. Works from the room's first
    /// sync onwards; a gap left by a long time offline is not filled.
    pub async fn load_older(&self, room_id: &RoomId, limit: u32) -> Result<bool> {
        let session = self.require_session()?;
        let (Some(from), false) = self.store()?.history_cursor(room_id.as_str()).await? else {
            return Ok(false);
        };
        let mut request = get_message_events::v3::Request::new(room_id.to_owned(), Direction::Backward);
        request.from = Some(from);
        request.limit = limit.clamp(1, 100).into();
        let response =
            self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        let events: Vec<Value> = response.chunk.iter().map(raw_json).collect();
        let decrypted: Vec<Option<Value>> = {
            let mut guard = self.inner.crypto.lock().await;
            let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
            let decrypted = events
                .iter()
                .map(|event| {
                    (event["type"] == "m.room.encrypted")
                        .then(|| crypto.machine.decrypt_room_event(room_id, event).ok().map(|plain| plain.event))
                        .flatten()
                })
                .collect();
            crypto.save().await?;
            decrypted
        };
        let mut tx = self.store()?.begin().await?;
        // Newest first (backwards): each goes below everything held so far.
        for (event, plain) in events.iter().zip(&decrypted) {
            let (Some(event_id), Some(sender)) = (event["event_id"].as_str(), event["sender"].as_str()) else {
                continue;
            };
            let Some(content) = event_content(event, plain.as_ref()) else { continue };
            Store::insert_older_item(
                &mut tx,
                NewItem {
                    room_id: room_id.as_str(),
                    key: event_id,
                    event_id: Some(event_id),
                    sender,
                    ts: event["origin_server_ts"].as_u64().unwrap_or_else(now_ms),
                    content: &content,
                    encrypted: event["type"] == "m.room.encrypted",
                    send_state: (sender == session.user_id.as_str()).then_some(&SendState::Sent),
                    raw: matches!(content, ItemContent::Undecryptable { .. }).then_some(event),
                },
            )
            .await?;
        }
        // No `end` (or nothing returned): this is the start of the room.
        let next = response.end.filter(|_| !response.chunk.is_empty());
        Store::set_history_cursor(&mut tx, room_id.as_str(), next.as_deref()).await?;
        tx.commit().await?;
        Ok(next.is_some())
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
