//! Other servers in our rooms: whether they (and we) are in a room, what a room's server ACL
//! lets them do (`service::server_acl`), what they may see of its history
//! (`service::server_visibility`), and the history, state and auth chains we serve them
//! (this module). One domain, because every federation read asks all of these in turn; the
//! receiver (`service::inbound`) and the joins (`service::remote_rooms`) ask it too.

use ruma::events::room::member::MembershipState;
use std::collections::HashSet;

use ruma::{EventId, OwnedEventId, RoomId, ServerName, UserId};
use serde_json::value::RawValue as RawJsonValue;

use super::{
    Hub,
    remote_rooms::{auth_event_ids, event_ids_in, raw},
    server_visibility::served_pdu,
};
use crate::{
    error::{Error, Result},
    store::EventRow,
};

/// What other servers may do in our rooms, and what we serve them.
pub struct Servers {
    pub(super) hub: Hub,
}

impl Servers {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// Whether a local user is joined to the room (then we are "in" it and take its events).
    pub async fn we_are_in(&self, room_id: &RoomId) -> Result<bool> {
        let s = self.hub.services();
        let members = s.store.room_members(room_id.as_str(), &MembershipState::Join).await?;
        Ok(members
            .iter()
            .filter_map(|m| ruma::UserId::parse(m.as_str()).ok())
            .any(|m| m.server_name() == s.settings.server_name))
    }

    /// Whether a user of `server` is joined to the room now.
    pub async fn joined(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        let s = self.hub.services();
        let members = s.store.room_members(room_id.as_str(), &MembershipState::Join).await?;
        Ok(members.iter().any(|m| UserId::parse(m.as_str()).is_ok_and(|u| u.server_name() == server)))
    }
}

/// Most events one backfill request returns.
pub const MAX_BACKFILL: usize = 100;

impl Servers {
    // ---- history and state for other servers ----

    /// One event for `origin` (`/event`): a timeline event it may see (see
    /// [`Servers::may_see`]), pruned if it was redacted here; or an accepted outlier
    /// (the auth chain a join brought) for a server with a user joined now. Soft-failed
    /// events are never served.
    pub async fn event(&self, event_id: &EventId, origin: &ServerName) -> Result<Box<RawJsonValue>> {
        let s = self.hub.services();
        if let Some(row) = s.store.event(event_id.as_str()).await? {
            let room_id = RoomId::parse(row.room_id.as_str()).map_err(|e| Error::internal(e.to_string()))?;
            self.require_may_read(&room_id, origin).await?;
            if self.may_see(&room_id, origin, std::slice::from_ref(&row)).await?.first() != Some(&true) {
                return Err(Error::Forbidden("Your server may not see that event".to_owned()));
            }
            let version = s.rooms.version(room_id.as_str()).await?;
            return served_pdu(&row.json, row.redacted_by.is_some(), &version);
        }
        let rows = s.store.accepted_outliers(&[event_id.to_string()]).await?;
        let (_, room_id, json) = rows.into_iter().next().ok_or_else(|| Error::NotFound("Unknown event".to_owned()))?;
        let room_id = RoomId::parse(room_id).map_err(|e| Error::internal(e.to_string()))?;
        self.require_may_read(&room_id, origin).await?;
        if !self.joined(&room_id, origin).await? {
            return Err(Error::Forbidden("Your server may not see that event".to_owned()));
        }
        raw(&json)
    }

    /// The room's state before `event_id` (from the state model) and the auth chain of that
    /// state; 404 for an event whose state we do not know.
    pub async fn state_before(&self, room_id: &RoomId, event_id: &EventId) -> Result<(Vec<String>, Vec<String>)> {
        let s = self.hub.services();
        let state = s
            .state
            .ids_before_event(room_id, event_id)
            .await?
            .ok_or_else(|| Error::NotFound("The state at that event is not known here".to_owned()))?;
        let state_ids: Vec<String> = state.values().cloned().collect();
        let chain = self.auth_chain_ids(room_id, &state_ids).await?;
        Ok((state_ids, chain))
    }

    /// Every event reachable from `ids` through `auth_events` (without `ids` themselves), and
    /// the room's create event, which room version 12 no longer lists as an auth event.
    pub async fn auth_chain_ids(&self, room_id: &RoomId, ids: &[String]) -> Result<Vec<String>> {
        let s = self.hub.services();
        let mut seen: HashSet<String> = HashSet::new();
        let mut chain = Vec::new();
        let mut frontier: Vec<String> = Vec::new();
        for (_, _, json) in s.store.any_events_json(ids).await? {
            frontier.extend(auth_event_ids(&json));
        }
        while !frontier.is_empty() {
            let batch: Vec<String> = frontier.drain(..).filter(|id| seen.insert(id.clone())).collect();
            for (id, _, json) in s.store.any_events_json(&batch).await? {
                frontier.extend(auth_event_ids(&json));
                chain.push(id);
            }
        }
        if let Some(create) = s.store.current_state_event(room_id.as_str(), "m.room.create", "").await?
            && !chain.contains(&create.event_id)
            && !ids.contains(&create.event_id)
        {
            chain.push(create.event_id);
        }
        Ok(chain)
    }

    /// Events by id as another server gets them (`/state`, `/event_auth`): timeline events
    /// (pruned if redacted here) and accepted outliers; soft-failed events are left out.
    pub async fn events(&self, room_id: &RoomId, ids: &[String]) -> Result<Vec<Box<RawJsonValue>>> {
        let s = self.hub.services();
        let version = s.rooms.version(room_id.as_str()).await?;
        let rows = s.store.events_by_id(ids).await?;
        let mut out = Vec::with_capacity(ids.len());
        for row in rows.iter().filter(|row| row.room_id == room_id.as_str()) {
            out.push(served_pdu(&row.json, row.redacted_by.is_some(), &version)?);
        }
        let on_timeline: HashSet<&str> = rows.iter().map(|row| row.event_id.as_str()).collect();
        let rest: Vec<String> = ids.iter().filter(|id| !on_timeline.contains(id.as_str())).cloned().collect();
        for (_, room, json) in s.store.accepted_outliers(&rest).await? {
            if room == room_id.as_str() {
                out.push(raw(&json)?);
            }
        }
        Ok(out)
    }

    /// `/backfill` for `origin`: up to `limit` events of the room at and before the newest of
    /// `from`, newest first; those `origin` may not see, and those redacted here, pruned.
    pub async fn backfill(
        &self,
        room_id: &RoomId,
        origin: &ServerName,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Vec<Box<RawJsonValue>>> {
        let s = self.hub.services();
        let ids: Vec<String> = from.iter().map(|id| id.to_string()).collect();
        let newest = s
            .store
            .events_by_id(&ids)
            .await?
            .iter()
            .filter(|row| row.room_id == room_id.as_str())
            .map(|row| row.stream_ordering)
            .max();
        let Some(newest) = newest else { return Ok(Vec::new()) };
        let limit = i64::try_from(limit.min(MAX_BACKFILL)).unwrap_or(1);
        let rows = s.store.room_events(room_id.as_str(), i64::MIN, newest, limit, true).await?;
        self.serve_rows(room_id, origin, &rows).await
    }

    /// `/get_missing_events` for `origin`: events of the room's timeline reached by walking
    /// `prev_events` back from `latest` (breadth first, without `latest` itself) and stopping
    /// at `earliest`, at most `limit` of them (capped like backfill) and none below
    /// `min_depth`, oldest first; pruned like backfill. Outliers (soft-failed events among
    /// them) are not part of the walk. A server fills a gap in its copy of the room with
    /// these before it accepts an event.
    pub async fn missing_events(
        &self,
        room_id: &RoomId,
        origin: &ServerName,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: u64,
    ) -> Result<Vec<Box<RawJsonValue>>> {
        let s = self.hub.services();
        let limit = limit.min(MAX_BACKFILL);
        let mut seen: HashSet<String> = earliest.iter().chain(latest).map(|id| id.to_string()).collect();
        let latest: Vec<String> = latest.iter().map(|id| id.to_string()).collect();
        let in_room = |rows: Vec<EventRow>| -> Vec<EventRow> {
            rows.into_iter().filter(|row| row.room_id == room_id.as_str()).collect()
        };
        let mut front = in_room(s.store.events_by_id(&latest).await?);
        let mut found: Vec<EventRow> = Vec::new();
        while !front.is_empty() && found.len() < limit {
            let next: Vec<String> = front
                .iter()
                .flat_map(|row| event_ids_in(&row.json, "prev_events"))
                .filter(|id| seen.insert(id.clone()))
                .collect();
            front = in_room(s.store.events_by_id(&next).await?);
            front.truncate(limit - found.len());
            found.extend(front.iter().filter(|row| u64::try_from(row.depth).unwrap_or(0) >= min_depth).cloned());
        }
        // Oldest first, the order the asking server takes them in.
        found.sort_by_key(|row| row.depth);
        self.serve_rows(room_id, origin, &found).await
    }

    /// Timeline events as `origin` gets them in a walk of history: pruned where it may not
    /// see them or they were redacted here.
    async fn serve_rows(
        &self,
        room_id: &RoomId,
        origin: &ServerName,
        rows: &[EventRow],
    ) -> Result<Vec<Box<RawJsonValue>>> {
        let s = self.hub.services();
        let version = s.rooms.version(room_id.as_str()).await?;
        let visible = self.may_see(room_id, origin, rows).await?;
        rows.iter()
            .zip(visible)
            .map(|(row, visible)| served_pdu(&row.json, !visible || row.redacted_by.is_some(), &version))
            .collect()
    }
}
