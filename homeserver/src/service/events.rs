//! Events as clients see them: the client event format, redaction, and history visibility.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, RoomVersionId, canonical_json::redact_content_in_place, serde::Raw,
};
use serde_json::{Map, Value as JsonValue};

use super::Services;
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

impl Services {
    /// The client format of a stored event: content (pruned if redacted), unsigned data
    /// (`age`, `transaction_id`, `prev_content`, `redacted_because`).
    pub async fn client_event(&self, row: &EventRow, viewer: Viewer<'_>, with_room_id: bool) -> Result<JsonValue> {
        let pdu: Map<String, JsonValue> =
            serde_json::from_str(&row.json).map_err(|e| Error::internal(format!("stored event is not JSON: {e}")))?;
        let mut out = Map::new();
        let mut content = pdu.get("content").cloned().unwrap_or_else(|| JsonValue::Object(Map::new()));
        let mut unsigned = Map::new();
        if let Some(redaction_id) = &row.redacted_by {
            let version = self.room_version(&row.room_id).await?;
            content = redacted_content(&row.event_type, content, &version)?;
            if let Some(redaction) = self.store.event(redaction_id).await? {
                let because = Box::pin(self.client_event(&redaction, viewer, with_room_id)).await?;
                unsigned.insert("redacted_because".into(), because);
            }
        }
        for key in ["type", "sender", "origin_server_ts", "state_key", "redacts"] {
            if let Some(v) = pdu.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        out.insert("content".into(), content);
        out.insert("event_id".into(), JsonValue::from(row.event_id.as_str()));
        if with_room_id {
            out.insert("room_id".into(), JsonValue::from(row.room_id.as_str()));
        }
        unsigned.insert("age".into(), JsonValue::from((now_ms() - row.origin_server_ts).max(0)));
        if row.txn_user.as_deref() == Some(viewer.user_id)
            && row.txn_device.as_deref() == Some(viewer.device_id)
            && let Some(txn_id) = &row.txn_id
        {
            unsigned.insert("transaction_id".into(), JsonValue::from(txn_id.as_str()));
        }
        if row.state_key.is_some()
            && let Some(prev_id) = &row.prev_state_event_id
        {
            unsigned.insert("replaces_state".into(), JsonValue::from(prev_id.as_str()));
            if let Some(prev) = self.store.event(prev_id).await? {
                let prev_pdu: Map<String, JsonValue> = serde_json::from_str(&prev.json).unwrap_or_default();
                let mut prev_content = prev_pdu.get("content").cloned().unwrap_or_default();
                if prev.redacted_by.is_some() {
                    let version = self.room_version(&row.room_id).await?;
                    prev_content = redacted_content(&prev.event_type, prev_content, &version)?;
                }
                unsigned.insert("prev_content".into(), prev_content);
            }
        }
        out.insert("unsigned".into(), JsonValue::Object(unsigned));
        Ok(JsonValue::Object(out))
    }

    /// [`Services::client_event`] as a ruma `Raw` of any event type.
    pub async fn raw_client_event<T>(&self, row: &EventRow, viewer: Viewer<'_>, with_room_id: bool) -> Result<Raw<T>> {
        let json = self.client_event(row, viewer, with_room_id).await?;
        to_raw(&json)
    }
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
