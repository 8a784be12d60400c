//! Events as clients see them: the client event format, redaction, and history visibility.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, RoomVersionId, UserId, canonical_json::redact_content_in_place, serde::Raw,
};
use serde::Deserialize;
use serde_json::{Map, Value as JsonValue, value::RawValue};

use super::Hub;
use crate::{
    error::{Error, Result},
    store::{EventRow, now_ms},
};

/// Whose view an event is formatted for: the sender's own device also gets its transaction id.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
}

/// What `/search` looks for.
pub struct SearchQuery<'a> {
    /// Lowercased words, each a prefix.
    pub terms: &'a [String],
    /// The fields to look in (`content.body`, `content.name`, `content.topic`).
    pub keys: &'a [&'static str],
    /// Best matches first, else newest first.
    pub by_rank: bool,
    pub offset: i64,
    pub limit: i64,
}

/// Events as clients see them: the client format, redacted content, relations left to `Relations`.
pub struct Events {
    hub: Hub,
}

impl Events {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// The event `event_id` of `room_id` as `user_id` may see it: 404 when it is not in the
    /// room or hidden from them.
    pub async fn visible_in_room(&self, room_id: &str, event_id: &str, user_id: &str) -> Result<EventRow> {
        let s = self.hub.services();
        let not_found = || Error::NotFound("Event not found".to_owned());
        let row = s.store.event(event_id).await?.filter(|e| e.room_id == room_id).ok_or_else(not_found)?;
        s.sync.visible_events(room_id, user_id, vec![row]).await?.into_iter().next().ok_or_else(not_found)
    }

    /// Full-text search in the rooms of `user_id`: events with their rank, higher is better.
    pub async fn search(&self, user_id: &UserId, query: &SearchQuery<'_>) -> Result<Vec<(EventRow, f64)>> {
        let s = self.hub.services();
        let rows = s
            .store
            .search_events(user_id.as_str(), query.terms, query.keys, query.by_rank, query.offset, query.limit)
            .await?;
        // FTS5's bm25 is "lower is better"; clients expect "higher is better".
        let sign = if s.store.backend() == crate::store::Backend::Sqlite { -1.0 } else { 1.0 };
        Ok(rows.into_iter().map(|(row, rank)| (row, sign * rank)).collect())
    }

    /// The client format of a stored event: content (pruned if redacted), unsigned data
    /// (`age`, `transaction_id`, `prev_content`, `redacted_because`), as a JSON value.
    pub async fn client_event(&self, row: &EventRow, viewer: Viewer<'_>, with_room_id: bool) -> Result<JsonValue> {
        let raw = self.client_event_json(row, viewer, with_room_id, None).await?;
        serde_json::from_str(raw.get()).map_err(|e| Error::internal(format!("formatted event is not JSON: {e}")))
    }

    /// [`Events::client_event`] as a ruma `Raw` of any event type.
    pub async fn raw_client_event<T>(&self, row: &EventRow, viewer: Viewer<'_>, with_room_id: bool) -> Result<Raw<T>> {
        Ok(Raw::from_json(self.client_event_json(row, viewer, with_room_id, None).await?))
    }

    /// The client format of a stored event, written straight into a JSON string; `relations`
    /// is the bundled `m.relations` object, if any.
    ///
    /// Formatting events is most of the work of a sync. The stored PDU is not parsed into a
    /// tree: its members are borrowed as raw JSON text and copied, so an event costs one scan
    /// and one string instead of an allocation per JSON node (a quarter of the initial sync's
    /// CPU went to building and dropping those trees).
    pub(super) async fn client_event_json(
        &self,
        row: &EventRow,
        viewer: Viewer<'_>,
        with_room_id: bool,
        relations: Option<&RawValue>,
    ) -> Result<Box<RawValue>> {
        let s = self.hub.services();
        let pdu: PduParts<'_> = serde_json::from_str(&row.json)
            .map_err(|e| Error::internal(format!("stored event {} is not a PDU: {e}", row.event_id)))?;
        let mut out = String::with_capacity(row.json.len() + 160);
        out.push('{');
        member(&mut out, "type", pdu.event_type.get());
        member(&mut out, "sender", pdu.sender.get());
        member(&mut out, "origin_server_ts", pdu.origin_server_ts.get());
        if let Some(state_key) = pdu.state_key {
            member(&mut out, "state_key", state_key.get());
        }
        if let Some(redacts) = pdu.redacts
            && pdu.event_type.get() == "\"m.room.redaction\""
        {
            // Only a redaction redacts; on any other event the key is not shown to clients.
            member(&mut out, "redacts", redacts.get());
        }
        let mut redacted_because = None;
        if let Some(redaction_id) = &row.redacted_by {
            let content = self.redacted(row, pdu.content).await?;
            member(&mut out, "content", &content);
            if let Some(redaction) = s.store.event(redaction_id).await? {
                redacted_because =
                    Some(Box::pin(self.client_event_json(&redaction, viewer, with_room_id, None)).await?);
            }
        } else {
            member(&mut out, "content", pdu.content.map_or("{}", RawValue::get));
        }
        member(&mut out, "event_id", &json_string(&row.event_id));
        if with_room_id {
            member(&mut out, "room_id", &json_string(&row.room_id));
        }

        out.push_str("\"unsigned\":{");
        member(&mut out, "age", &(now_ms() - row.origin_server_ts).max(0).to_string());
        if row.txn_user.as_deref() == Some(viewer.user_id)
            && row.txn_device.as_deref() == Some(viewer.device_id)
            && let Some(txn_id) = &row.txn_id
        {
            member(&mut out, "transaction_id", &json_string(txn_id));
        }
        if row.state_key.is_some()
            && let Some(prev_id) = &row.prev_state_event_id
        {
            member(&mut out, "replaces_state", &json_string(prev_id));
            if let Some(prev) = s.store.event(prev_id).await? {
                let prev_pdu: PduParts<'_> = serde_json::from_str(&prev.json)
                    .map_err(|e| Error::internal(format!("stored event {} is not a PDU: {e}", prev.event_id)))?;
                if prev.redacted_by.is_some() {
                    let content = self.redacted(&prev, prev_pdu.content).await?;
                    member(&mut out, "prev_content", &content);
                } else {
                    member(&mut out, "prev_content", prev_pdu.content.map_or("{}", RawValue::get));
                }
            }
        }
        if let Some(because) = &redacted_because {
            member(&mut out, "redacted_because", because.get());
        }
        if let Some(relations) = relations {
            member(&mut out, "m.relations", relations.get());
        }
        out.pop(); // the last member's comma
        out.push_str("}}");
        RawValue::from_string(out).map_err(|e| Error::internal(format!("formatted event is not JSON: {e}")))
    }

    /// The content a redacted event keeps, as JSON text.
    async fn redacted(&self, row: &EventRow, content: Option<&RawValue>) -> Result<String> {
        let s = self.hub.services();
        let version = s.rooms.version(&row.room_id).await?;
        let content: JsonValue = match content {
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or_else(|_| JsonValue::Object(Map::new())),
            None => JsonValue::Object(Map::new()),
        };
        let pruned = redacted_content(&row.event_type, content, &version)?;
        serde_json::to_string(&pruned).map_err(|e| Error::internal(e.to_string()))
    }
}

/// The members of a stored PDU a client event copies, borrowed as raw JSON text.
#[derive(Deserialize)]
struct PduParts<'a> {
    #[serde(rename = "type", borrow)]
    event_type: &'a RawValue,
    #[serde(borrow)]
    sender: &'a RawValue,
    #[serde(borrow)]
    origin_server_ts: &'a RawValue,
    #[serde(default, borrow)]
    state_key: Option<&'a RawValue>,
    #[serde(default, borrow)]
    redacts: Option<&'a RawValue>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

/// Appends `"key":value,` (`value` is JSON text; `key` needs no escaping).
fn member(out: &mut String, key: &str, value: &str) {
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
    out.push_str(value);
    out.push(',');
}

/// A string as JSON text (quoted and escaped).
fn json_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Serializes any JSON as a ruma `Raw<T>`.
pub fn to_raw<T>(json: &JsonValue) -> Result<Raw<T>> {
    let raw = serde_json::value::to_raw_value(json).map_err(|e| Error::internal(e.to_string()))?;
    Ok(Raw::from_json(raw))
}

/// The content a redacted event keeps under its room version's redaction rules.
pub fn redacted_content(event_type: &str, content: JsonValue, version: &RoomVersionId) -> Result<JsonValue> {
    let rules = version.rules().ok_or_else(|| Error::internal(format!("unsupported room version {version}")))?;
    let CanonicalJsonValue::Object(mut object) =
        CanonicalJsonValue::try_from(content).unwrap_or(CanonicalJsonValue::Object(CanonicalJsonObject::new()))
    else {
        return Ok(JsonValue::Object(Map::new()));
    };
    redact_content_in_place(&mut object, &rules.redaction, event_type);
    serde_json::to_value(&object).map_err(|e| Error::internal(e.to_string()))
}
