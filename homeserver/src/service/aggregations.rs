//! Bundled aggregations: `unsigned.m.relations` on the events a client is shown (spec
//! v1.16, "Aggregations of child events"): for a thread root the latest reply, the reply
//! count and whether the viewer took part (`m.thread`); for an edited event the edit that
//! applies (`m.replace`); for a referenced event the ids referencing it (`m.reference`).
//! Annotations (reactions) are not bundled, as the spec says.

use std::collections::{HashMap, HashSet};

use ruma::{RoomId, UInt, UserId, api::Direction, serde::Raw};
use serde_json::{Map, Value as JsonValue, json};

use super::{Hub, events::Viewer};
use super::{auth::AuthedUser, streams::Positions};
use crate::{
    error::{Error, Result},
    store::{EventRow, RelationsOf},
};

/// Most references listed in one bundle.
const MAX_REFERENCES: i64 = 100;
/// Most relations read to find the newest one a viewer may see when the newest of all is
/// hidden from them (a former member reading a thread that went on after they left).
const MAX_HIDDEN_SCAN: i64 = 1000;

/// Which relations `/relations` lists.
pub struct RelationsQuery<'a> {
    pub room_id: &'a str,
    /// The event the relations point at.
    pub target: &'a str,
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    /// Pagination tokens.
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub dir: Direction,
    pub limit: Option<UInt>,
}

/// One page of relations.
pub struct RelationsPage {
    pub chunk: Vec<EventRow>,
    pub next_batch: Option<String>,
}

/// Which threads `/threads` lists.
pub struct ThreadsQuery<'a> {
    /// A pagination token.
    pub from: Option<&'a str>,
    pub limit: Option<UInt>,
    /// Only threads the viewer took part in.
    pub participated: bool,
}

/// Relations: bundled aggregations and the events related to another.
pub struct Relations {
    hub: Hub,
}

impl Relations {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// A page of the events relating to `query.target` that `user_id` may see.
    pub async fn page(&self, user_id: &UserId, query: RelationsQuery<'_>) -> Result<RelationsPage> {
        let s = self.hub.services();
        let RelationsQuery { room_id, target, rel_type, event_type, from, to, dir, limit } = query;
        let parent = s.store.event(target).await?.filter(|e| e.room_id == room_id);
        let parent = parent.ok_or_else(|| Error::NotFound("Event not found".to_owned()))?;
        if s.sync.visible_events(room_id, user_id.as_str(), vec![parent]).await?.is_empty() {
            return Err(Error::NotFound("Event not found".to_owned()));
        }
        let parse = |t: &str| {
            Positions::parse(t).map(|p| p.stream).ok_or_else(|| Error::InvalidParam(format!("Invalid token {t}")))
        };
        let limit = limit.map(|l| i64::try_from(u64::from(l)).unwrap_or(50)).unwrap_or(50).clamp(1, 100);
        let backwards = dir == Direction::Backward;
        let now = s.streams.current().stream;
        let (low, high) = match (backwards, from.map(parse).transpose()?, to.map(parse).transpose()?) {
            (true, f, t) => (t.unwrap_or(0), f.unwrap_or(now)),
            (false, f, t) => (f.unwrap_or(0), t.unwrap_or(now).min(now)),
        };
        let rows = s.store.relations(RelationsOf { target, rel_type, event_type }, low, high, limit, backwards).await?;
        let full = i64::try_from(rows.len()).unwrap_or(0) == limit;
        let next_batch = match rows.last() {
            Some(last) if full => {
                Some(Positions::at(if backwards { last.stream_ordering - 1 } else { last.stream_ordering }).to_string())
            }
            _ => None,
        };
        let chunk = s.sync.visible_events(room_id, user_id.as_str(), rows).await?;
        Ok(RelationsPage { chunk, next_batch })
    }

    /// `/threads`: the thread roots of a room the viewer may see, newest activity first, with
    /// the next page's token. Members and former members may list them.
    pub async fn threads(
        &self,
        room_id: &RoomId,
        user: &AuthedUser,
        query: ThreadsQuery<'_>,
    ) -> Result<(Vec<EventRow>, Option<String>)> {
        let s = self.hub.services();
        s.rooms.require_ever_joined(room_id, &user.user_id).await?;
        let viewer = Viewer { user_id: user.user_id.as_str(), device_id: user.device_id.as_str() };
        let before = match query.from {
            Some(t) => Positions::parse(t).ok_or_else(|| Error::InvalidParam(format!("Invalid token {t}")))?.stream,
            None => i64::MAX,
        };
        let limit = query.limit.map(|l| i64::try_from(u64::from(l)).unwrap_or(50)).unwrap_or(50).clamp(1, 100);
        let participant = query.participated.then_some(viewer.user_id);
        let roots = s.store.thread_roots(room_id.as_str(), participant, before, limit).await?;
        let next_batch = (i64::try_from(roots.len()).unwrap_or(0) == limit)
            .then(|| roots.last().map(|(_, latest)| Positions::at(*latest).to_string()))
            .flatten();
        let mut rows = Vec::new();
        for (root, _) in roots {
            if let Some(row) = s.store.event(&root).await? {
                rows.push(row);
            }
        }
        let mut shown = Vec::new();
        for row in s.sync.visible_events(room_id.as_str(), viewer.user_id, rows).await? {
            // A root the viewer saw is a thread to them only if they may see one of its replies.
            if self.sees_a_thread_reply(&row, viewer).await? {
                shown.push(row);
            }
        }
        Ok((shown, next_batch))
    }

    /// Client events for `rows` (see [`Events::client_event`](super::events::Events::client_event)), each with its bundled
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

    /// [`Relations::raw_client_events`] for borrowed rows.
    pub async fn raw_client_events_of<T>(
        &self,
        rows: &[&EventRow],
        viewer: Viewer<'_>,
        with_room_id: bool,
    ) -> Result<Vec<Raw<T>>> {
        let s = self.hub.services();
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
            out.push(Raw::from_json(s.events.client_event_json(row, viewer, with_room_id, bundle.as_deref()).await?));
        }
        Ok(out)
    }

    /// The `m.relations` object of each of `rows` that has bundled relations, made only of
    /// relations the viewer may see: a former member reading old history must not learn of
    /// the replies, edits and references written after they left (nor their content).
    async fn bundled_aggregations(
        &self,
        rows: &[&EventRow],
        viewer: Viewer<'_>,
        with_room_id: bool,
    ) -> Result<HashMap<String, JsonValue>> {
        let s = self.hub.services();
        let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        let counts = s.store.relation_counts(&ids).await?;
        let by_id: HashMap<&str, &EventRow> = rows.iter().map(|r| (r.event_id.as_str(), *r)).collect();

        // The newest candidates first, as the store has them; then one visibility check per
        // room for all of them.
        let mut candidates: Vec<(String, String, i64, Vec<EventRow>)> = Vec::new();
        for (target, rel_type, count) in counts {
            let Some(original) = by_id.get(target.as_str()) else { continue };
            let rows = match rel_type.as_str() {
                "m.thread" => s.store.latest_thread_reply(&target).await?.into_iter().collect(),
                // An edit of a redacted event no longer applies; state events are not edited.
                "m.replace" if original.redacted_by.is_none() && original.state_key.is_none() => {
                    s.store.latest_edit(&target, &original.sender, &original.event_type).await?.into_iter().collect()
                }
                "m.reference" => s
                    .store
                    .relations(
                        RelationsOf { target: &target, rel_type: Some("m.reference"), event_type: None },
                        i64::MIN,
                        i64::MAX,
                        MAX_REFERENCES,
                        false,
                    )
                    .await?
                    .into_iter()
                    .filter(|r| r.redacted_by.is_none())
                    .collect(),
                _ => continue,
            };
            candidates.push((target, rel_type, count, rows));
        }
        let mut by_room: HashMap<String, Vec<EventRow>> = HashMap::new();
        for (_, _, _, rows) in &candidates {
            for row in rows {
                by_room.entry(row.room_id.clone()).or_default().push(row.clone());
            }
        }
        let mut visible: HashSet<String> = HashSet::new();
        for (room_id, rows) in by_room {
            visible
                .extend(s.sync.visible_events(&room_id, viewer.user_id, rows).await?.into_iter().map(|r| r.event_id));
        }

        let mut bundles: HashMap<String, Map<String, JsonValue>> = HashMap::new();
        for (target, rel_type, count, rows) in candidates {
            let Some(original) = by_id.get(target.as_str()) else { continue };
            let bundle = match rel_type.as_str() {
                "m.thread" => {
                    let latest = rows.into_iter().next().filter(|r| visible.contains(&r.event_id));
                    let (latest, count, participated) = match latest {
                        Some(latest) => {
                            let participated = original.sender == viewer.user_id
                                || s.store.replied_in_thread(&target, viewer.user_id).await?;
                            (latest, count, participated)
                        }
                        // The newest reply is hidden from the viewer: the summary is made of
                        // the replies they may see, or there is none.
                        None => {
                            let replies = self.visible_relations(original, "m.thread", viewer).await?;
                            let Some(latest) = replies.first().cloned() else { continue };
                            let participated =
                                original.sender == viewer.user_id || replies.iter().any(|r| r.sender == viewer.user_id);
                            (latest, i64::try_from(replies.len()).unwrap_or(i64::MAX), participated)
                        }
                    };
                    json!({
                        "latest_event": s.events.client_event(&latest, viewer, with_room_id).await?,
                        "count": count,
                        "current_user_participated": participated,
                    })
                }
                "m.replace" => {
                    let edit = match rows.into_iter().next().filter(|r| visible.contains(&r.event_id)) {
                        Some(edit) => edit,
                        // The edit that applies now is hidden: the newest the viewer may see.
                        None => {
                            let mut edits: Vec<EventRow> = self
                                .visible_relations(original, "m.replace", viewer)
                                .await?
                                .into_iter()
                                .filter(|r| r.sender == original.sender && r.event_type == original.event_type)
                                .collect();
                            edits.sort_by(|a, b| {
                                (a.origin_server_ts, &a.event_id).cmp(&(b.origin_server_ts, &b.event_id))
                            });
                            let Some(edit) = edits.pop() else { continue };
                            edit
                        }
                    };
                    s.events.client_event(&edit, viewer, with_room_id).await?
                }
                "m.reference" => {
                    let ids: Vec<&str> =
                        rows.iter().map(|r| r.event_id.as_str()).filter(|id| visible.contains(*id)).collect();
                    if ids.is_empty() {
                        continue;
                    }
                    json!({"chunk": ids.iter().map(|id| json!({"event_id": id})).collect::<Vec<_>>()})
                }
                _ => continue,
            };
            bundles.entry(target).or_default().insert(rel_type, bundle);
        }
        Ok(bundles.into_iter().map(|(id, map)| (id, JsonValue::Object(map))).collect())
    }

    /// Whether the viewer may see at least one reply in the thread of `root`: a root from
    /// before a former member left that was only answered after is no thread of theirs.
    pub async fn sees_a_thread_reply(&self, root: &EventRow, viewer: Viewer<'_>) -> Result<bool> {
        let s = self.hub.services();
        let Some(latest) = s.store.latest_thread_reply(&root.event_id).await? else { return Ok(false) };
        if !s.sync.visible_events(&root.room_id, viewer.user_id, vec![latest]).await?.is_empty() {
            return Ok(true);
        }
        Ok(!self.visible_relations(root, "m.thread", viewer).await?.is_empty())
    }

    /// The unredacted relations of `rel_type` to `original` that the viewer may see, newest
    /// first (at most [`MAX_HIDDEN_SCAN`] are looked at).
    async fn visible_relations(
        &self,
        original: &EventRow,
        rel_type: &str,
        viewer: Viewer<'_>,
    ) -> Result<Vec<EventRow>> {
        let s = self.hub.services();
        let rows: Vec<EventRow> = s
            .store
            .relations(
                RelationsOf { target: &original.event_id, rel_type: Some(rel_type), event_type: None },
                i64::MIN,
                i64::MAX,
                MAX_HIDDEN_SCAN,
                true,
            )
            .await?
            .into_iter()
            .filter(|r| r.redacted_by.is_none())
            .collect();
        s.sync.visible_events(&original.room_id, viewer.user_id, rows).await
    }
}
