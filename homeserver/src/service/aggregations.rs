//! Bundled aggregations: `unsigned.m.relations` on the events a client is shown (spec
//! v1.16, "Aggregations of child events"): for a thread root the latest reply, the reply
//! count and whether the viewer took part (`m.thread`); for an edited event the edit that
//! applies (`m.replace`); for a referenced event the ids referencing it (`m.reference`).
//! Annotations (reactions) are not bundled, as the spec says.

use std::collections::HashMap;

use ruma::serde::Raw;
use serde_json::{Map, Value as JsonValue, json};

use super::{Services, events::Viewer};
use crate::{error::Result, store::EventRow};

/// Most references listed in one bundle.
const MAX_REFERENCES: i64 = 100;

impl Services {
    /// Client events for `rows` (see [`Services::client_event`]), each with its bundled
    /// aggregations. One query finds which of the events have relations at all.
    pub async fn raw_client_events<T>(
        &self,
        rows: &[EventRow],
        viewer: Viewer<'_>,
        with_room_id: bool,
    ) -> Result<Vec<Raw<T>>> {
        let refs: Vec<&EventRow> = rows.iter().collect();
        self.raw_client_events_of(&refs, viewer, with_room_id).await
    }

    /// One event with its bundled aggregations (for endpoints that format events one by one).
    pub async fn raw_client_event_bundled<T>(
        &self,
        row: &EventRow,
        viewer: Viewer<'_>,
        with_room_id: bool,
    ) -> Result<Raw<T>> {
        let mut events = self.raw_client_events_of(&[row], viewer, with_room_id).await?;
        events.pop().ok_or_else(|| crate::error::Error::internal("no event formatted"))
    }

    /// [`Services::raw_client_events`] for borrowed rows.
    pub async fn raw_client_events_of<T>(
        &self,
        rows: &[&EventRow],
        viewer: Viewer<'_>,
        with_room_id: bool,
    ) -> Result<Vec<Raw<T>>> {
        let mut bundles = self.bundled_aggregations(rows, viewer, with_room_id).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let bundle = match bundles.remove(&row.event_id) {
                Some(bundle) => Some(
                    serde_json::value::to_raw_value(&bundle)
                        .map_err(|e| crate::error::Error::internal(e.to_string()))?,
                ),
                None => None,
            };
            out.push(Raw::from_json(self.client_event_json(row, viewer, with_room_id, bundle.as_deref()).await?));
        }
        Ok(out)
    }

    /// The `m.relations` object of each of `rows` that has bundled relations.
    async fn bundled_aggregations(
        &self,
        rows: &[&EventRow],
        viewer: Viewer<'_>,
        with_room_id: bool,
    ) -> Result<HashMap<String, JsonValue>> {
        let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        let counts = self.store.relation_counts(&ids).await?;
        let by_id: HashMap<&str, &EventRow> = rows.iter().map(|r| (r.event_id.as_str(), *r)).collect();
        let mut bundles: HashMap<String, Map<String, JsonValue>> = HashMap::new();
        for (target, rel_type, count) in counts {
            let Some(original) = by_id.get(target.as_str()) else { continue };
            let bundle = match rel_type.as_str() {
                "m.thread" => {
                    let Some(latest) = self.store.latest_thread_reply(&target).await? else { continue };
                    let participated = original.sender == viewer.user_id
                        || self.store.replied_in_thread(&target, viewer.user_id).await?;
                    json!({
                        "latest_event": self.client_event(&latest, viewer, with_room_id).await?,
                        "count": count,
                        "current_user_participated": participated,
                    })
                }
                // An edit of a redacted event no longer applies; state events are not edited.
                "m.replace" if original.redacted_by.is_none() && original.state_key.is_none() => {
                    let Some(edit) = self.store.latest_edit(&target, &original.sender, &original.event_type).await?
                    else {
                        continue;
                    };
                    self.client_event(&edit, viewer, with_room_id).await?
                }
                "m.reference" => {
                    let ids = self.store.references(&target, MAX_REFERENCES).await?;
                    json!({"chunk": ids.iter().map(|id| json!({"event_id": id})).collect::<Vec<_>>()})
                }
                _ => continue,
            };
            bundles.entry(target).or_default().insert(rel_type, bundle);
        }
        Ok(bundles.into_iter().map(|(id, map)| (id, JsonValue::Object(map))).collect())
    }
}
