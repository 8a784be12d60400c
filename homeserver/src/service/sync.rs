//! `/sync` (v3): initial, incremental and long-polling, and the history visibility rules
//! shared with `/messages`.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use futures_util::{StreamExt, TryStreamExt};
use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    api::client::sync::sync_events::v3::{
        InviteState, InvitedRoom, JoinedRoom, LeftRoom, Response, RoomSummary, State, StateEvents, Timeline,
    },
};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    Hub,
    cache::Cache,
    events::{Viewer, to_raw},
    notifier::Change,
    notifier::{Relevance, Scope, Sections, Waiter},
    streams::Positions,
};
use crate::{
    error::{Error, Result},
    store::{EventRow, ReceiptRow, now_ms},
};

/// Joined rooms read concurrently by one initial (or full-state) sync.
const ROOMS_READ_AT_ONCE: usize = 8;

/// Longest a client may long-poll.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// What of the rooms a sync (or `/messages`) should return: the parts of the Matrix filter
/// this server applies.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub limit: usize,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub lazy_load_members: bool,
    pub include_leave: bool,
    /// The fields of each room event the client wants (`event_fields`), all when `None`.
    pub event_fields: Option<Vec<String>>,
}

impl Default for EventFilter {
    fn default() -> Self {
        Self {
            limit: 10,
            types: None,
            not_types: Vec::new(),
            senders: None,
            not_senders: Vec::new(),
            rooms: None,
            not_rooms: Vec::new(),
            lazy_load_members: false,
            include_leave: false,
            event_fields: None,
        }
    }
}

/// `*` at the end of a filter type is a prefix wildcard.
fn type_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

impl EventFilter {
    pub fn allows_event(&self, row: &EventRow) -> bool {
        if self.types.as_ref().is_some_and(|t| !t.iter().any(|p| type_matches(p, &row.event_type))) {
            return false;
        }
        if self.not_types.iter().any(|p| type_matches(p, &row.event_type)) {
            return false;
        }
        if self.senders.as_ref().is_some_and(|s| !s.contains(&row.sender)) || self.not_senders.contains(&row.sender) {
            return false;
        }
        true
    }

    pub fn allows_room(&self, room_id: &str) -> bool {
        self.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room_id))
            && !self.not_rooms.iter().any(|x| x == room_id)
    }
}

/// A `/sync` request, parsed.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub since: Option<Positions>,
    pub filter: EventFilter,
    pub full_state: bool,
    pub timeout: Duration,
    /// `online`, `unavailable` or `offline` (do not mark the user online).
    pub set_presence: String,
}

/// The key of a state event.
type StateKey = (String, String);

/// `/sync`: what changed for a user since a position, with the caches syncs read over and over.
pub struct Sync {
    hub: Hub,
    /// Unread counts per (user, room), see `unread_counts`.
    unread: Cache<(String, OwnedRoomId), UnreadCounts>,
    /// Stored filters, parsed, by (user, filter id): a filter never changes once stored, and
    /// clients send its id with every `/sync`.
    filters: Cache<(String, i64), EventFilter>,
}

impl Sync {
    pub fn new(hub: Hub) -> Self {
        Self { hub, unread: Cache::new(100_000), filters: Cache::new(10_000) }
    }

    /// Records a receipt (`m.read`, `m.read.private`) or the `m.fully_read` marker.
    pub(crate) async fn set_receipt(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        kind: &str,
        event_id: &ruma::EventId,
        thread: &str,
    ) -> Result<()> {
        let s = self.hub.services();
        let event = s.store.event(event_id.as_str()).await?;
        if event.as_ref().is_none_or(|e| e.room_id != room_id.as_str()) {
            return Err(Error::NotFound("Event not found".to_owned()));
        }
        let position = s.streams.allocate();
        if kind == "m.fully_read" {
            let content = json!({"event_id": event_id}).to_string();
            s.store
                .set_account_data(user_id.as_str(), room_id.as_str(), "m.fully_read", &content, position.position())
                .await?;
        } else {
            s.store
                .set_receipt(&ReceiptRow {
                    room_id: room_id.to_string(),
                    receipt_type: kind.to_owned(),
                    user_id: user_id.to_string(),
                    thread_id: thread.to_owned(),
                    event_id: event_id.to_string(),
                    ts: now_ms(),
                    stream_id: position.position(),
                })
                .await?;
        }
        let change = if kind == "m.fully_read" {
            Change::user(user_id.to_owned(), Sections::ACCOUNT_DATA)
        } else {
            Change::room(room_id.to_owned(), Sections::RECEIPTS)
        };
        position.commit_with(vec![change]);
        if kind != "m.fully_read" {
            self.forget_unread(user_id, room_id);
        }
        Ok(())
    }

    /// Stores a filter; its id.
    pub async fn create_filter(&self, user_id: &UserId, json: &str) -> Result<i64> {
        Ok(self.hub.services().store.create_filter(user_id.as_str(), json).await?)
    }

    /// A stored filter as the client gave it.
    pub async fn filter_json(&self, user_id: &UserId, filter_id: i64) -> Result<Option<String>> {
        Ok(self.hub.services().store.filter(user_id.as_str(), filter_id).await?)
    }

    /// Answers a sync: at once if there is anything new (or it is an initial sync),
    /// otherwise when something arrives or the timeout passes.
    pub async fn run(&self, user_id: &UserId, device_id: &str, mut req: SyncRequest) -> Result<Response> {
        let s = self.hub.services();
        if let Some(since) = req.since.as_mut()
            && since.typing > s.streams.current().typing
        {
            // Typing positions live in memory and restart with the server.
            since.typing = 0;
        }
        let deadline = tokio::time::Instant::now() + req.timeout.min(MAX_SYNC_TIMEOUT);
        let _open = OpenSync::new(&s.metrics.open_syncs);
        s.presence.on_sync(user_id, &req.set_presence).await?;
        let me = user_id.to_owned();
        // Registered before the first look at the positions, so nothing committed from
        // here on is missed.
        let mut watch = self.watch(&me).await?;
        loop {
            let upto = s.streams.current();
            let relevance = match req.since {
                Some(since) if !req.full_state => {
                    let relevance =
                        s.streams.notifier().relevance(since.stream, upto.stream, &me, |r| watch.rooms.contains_key(r));
                    let typing = since.typing < upto.typing
                        && watch.rooms.keys().any(|room| s.typing.changed_after(room, since.typing));
                    // A to-device batch cut short last time: the rest is waiting.
                    let to_device_left = since.to_device < since.stream;
                    if relevance.is_empty() && !typing && !to_device_left {
                        if tokio::time::timeout_at(deadline, watch.waiter.woken()).await.is_err() {
                            return self.once(user_id, device_id, &req, upto, &relevance, &watch).await;
                        }
                        continue;
                    }
                    relevance
                }
                _ => Relevance::everything(),
            };
            if relevance.membership_changed_at.is_some_and(|at| at > watch.covers) {
                // Rooms were joined or left since the watch was registered: watch the new set,
                // and look again, so that what committed in a new room before the new
                // registration is read rather than waited for.
                watch = self.watch(&me).await?;
                continue;
            }
            let response = self.once(user_id, device_id, &req, upto, &relevance, &watch).await?;
            let nothing_new = req.since.is_some() && is_empty(&response);
            if !nothing_new || tokio::time::Instant::now() >= deadline {
                return Ok(response);
            }
            if tokio::time::timeout_at(deadline, watch.waiter.woken()).await.is_err() {
                // Timed out: answer with the (empty) response and the same position.
                return Ok(response);
            }
        }
    }

    /// Registers a sync's interest in the user and their joined and invited rooms.
    async fn watch(&self, user_id: &OwnedUserId) -> Result<Watch> {
        let s = self.hub.services();
        // Memberships visible now are in the rooms read below.
        let covers = s.streams.current().stream;
        let mut rooms = HashMap::new();
        for (room_id, membership) in s.rooms.of_user(user_id.as_str()).await?.iter() {
            if (*membership == MembershipState::Join || *membership == MembershipState::Invite)
                && let Ok(room_id) = OwnedRoomId::try_from(room_id.as_str())
            {
                rooms.insert(room_id, membership.clone());
            }
        }
        let mut scopes: Vec<Scope> = rooms.keys().cloned().map(Scope::Room).collect();
        scopes.push(Scope::User(user_id.clone()));
        let waiter = s.streams.notifier().register(scopes);
        Ok(Watch { rooms, waiter, covers })
    }

    async fn once(
        &self,
        user_id: &UserId,
        device_id: &str,
        req: &SyncRequest,
        upto: Positions,
        relevance: &Relevance,
        watch: &Watch,
    ) -> Result<Response> {
        let s = self.hub.services();
        let viewer = Viewer { user_id: user_id.as_str(), device_id };
        let since = req.since.unwrap_or_default();
        let mut response = Response::new(String::new());
        // Everything is read for an initial sync, after the user joined or left rooms, or
        // when the change log cannot tell what changed; otherwise only what changed.
        let read_all = relevance.everything || relevance.user.contains(Sections::MEMBERSHIP);

        // To-device: what the last response delivered is acknowledged (deleted) now. With no
        // new message for the user and the last batch complete there is nothing to read (the
        // acknowledgement waits for the next read, which covers it).
        let to_device = if relevance.any(Sections::TO_DEVICE) || since.to_device < since.stream {
            s.keys.to_device_for_sync(user_id.as_str(), device_id, req.since.map(|s| s.to_device), upto.stream).await?
        } else {
            Vec::new()
        };
        let delivered_to = if i64::try_from(to_device.len()).unwrap_or(i64::MAX) >= super::keys::TO_DEVICE_PER_SYNC {
            to_device.last().map(|m| m.stream_id).unwrap_or(upto.stream)
        } else {
            upto.stream
        };
        response.next_batch = Positions { to_device: delivered_to, ..upto }.to_string();
        for m in &to_device {
            let content: JsonValue = serde_json::from_str(&m.content).unwrap_or_default();
            response
                .to_device
                .events
                .push(to_raw(&json!({"sender": m.sender, "type": m.event_type, "content": content}))?);
        }

        // Device lists and key counts for end-to-end encryption.
        if req.since.is_some() && (read_all || relevance.any(Sections::DEVICE_LISTS)) {
            let (changed, left) = self.device_list_delta(user_id.as_str(), since.stream, upto.stream).await?;
            response.device_lists.changed = changed;
            response.device_lists.left = left;
        }
        let key_counts = s.keys.counts(user_id.as_str(), device_id).await?;
        for (algorithm, count) in &key_counts.one_time {
            response
                .device_one_time_keys_count
                .insert(algorithm.as_str().into(), UInt::new((*count).max(0) as u64).unwrap_or_default());
        }
        response.device_unused_fallback_key_types =
            Some(key_counts.unused_fallback.iter().map(|a| a.as_str().into()).collect());

        if !read_all {
            // Only rooms where something happened; the user's memberships did not change.
            for (room, membership) in &watch.rooms {
                let sections = relevance.room(room);
                let typing = s.typing.changed_after(room, since.typing);
                if *membership != MembershipState::Join
                    || (sections.is_empty() && !typing)
                    || !req.filter.allows_room(room.as_str())
                {
                    continue;
                }
                if let Some(joined) = self
                    .joined_room(room, user_id, viewer, SyncWindow { req, since, upto }, RoomRead::Changed(sections))
                    .await?
                {
                    response.rooms.join.insert(room.clone(), joined);
                }
            }
        }

        // Membership changes in the window, per room, oldest first.
        let mut changed: HashMap<String, Vec<EventRow>> = HashMap::new();
        if req.since.is_some() && read_all {
            for row in s.store.membership_changes(user_id.as_str(), since.stream, upto.stream).await? {
                changed.entry(row.room_id.clone()).or_default().push(row);
            }
        }

        let forgotten = if read_all { s.store.forgotten_rooms(user_id.as_str()).await? } else { Vec::new() };
        let all_rooms = if read_all { s.store.rooms_for_user(user_id.as_str()).await? } else { Vec::new() };
        let mut joined_reads = Vec::new();
        for (room_id, membership) in all_rooms {
            if !req.filter.allows_room(&room_id)
                || (forgotten.contains(&room_id)
                    && membership != MembershipState::Join
                    && membership != MembershipState::Invite)
            {
                continue;
            }
            let Ok(room) = RoomId::parse(room_id.as_str()) else { continue };
            let window_changes = changed.get(&room_id);
            match membership.as_str() {
                "join" => {
                    let newly_joined = match window_changes {
                        Some(rows) => {
                            let before = self.membership_at(&room_id, user_id.as_str(), since.stream).await?;
                            before != Some(MembershipState::Join)
                                && rows.iter().any(|r| membership_of(r) == Some(MembershipState::Join))
                        }
                        None => false,
                    };
                    let full = req.since.is_none() || req.full_state || newly_joined;
                    let read = if full { RoomRead::Full } else { RoomRead::Incremental };
                    joined_reads.push(async move {
                        let joined =
                            self.joined_room(&room, user_id, viewer, SyncWindow { req, since, upto }, read).await?;
                        Ok::<_, Error>((room, joined))
                    });
                }
                "invite" if req.since.is_none() || window_changes.is_some() => {
                    let mut invited = InvitedRoom::new();
                    invited.invite_state = InviteState::from(self.invite_state(&room_id, user_id.as_str()).await?);
                    response.rooms.invite.insert(room.clone(), invited);
                }
                "leave" | "ban"
                    if (req.since.is_some() && window_changes.is_some())
                        || (req.since.is_none() && req.filter.include_leave) =>
                {
                    let left = self.left_room(&room, user_id, viewer, req, since).await?;
                    response.rooms.leave.insert(room.clone(), left);
                }
                _ => {}
            }
        }

        // The joined rooms are read a few at a time: each room is a dozen small queries, each a
        // round trip to a database connection's thread (SQLite) or the server (PostgreSQL);
        // overlapping rooms keeps the CPU busy instead of waiting on one round trip at a time.
        let mut joined_reads = futures_util::stream::iter(joined_reads).buffered(ROOMS_READ_AT_ONCE);
        while let Some((room, joined)) = joined_reads.try_next().await? {
            if let Some(joined) = joined {
                response.rooms.join.insert(room, joined);
            }
        }

        // Clients read their push rules from account data; until a user changes them the
        // server defaults stand in, on the initial sync.
        if req.since.is_none() && s.store.account_data(user_id.as_str(), "", "m.push_rules").await?.is_none() {
            let rules = s.push.rules(user_id).await?;
            response.account_data.events.push(to_raw(&json!({"type": "m.push_rules", "content": {"global": *rules}}))?);
        }

        // A member event marks its room's device lists as changed: someone may have come to
        // share a room with the user, whose presence the user has then never seen.
        let new_peers = read_all || relevance.any(Sections::DEVICE_LISTS);
        if new_peers || relevance.any(Sections::PRESENCE) {
            for event in s.presence.events(user_id, since.stream, upto.stream, new_peers).await? {
                response.presence.events.push(to_raw(&event)?);
            }
        }

        let account_data = if read_all || relevance.any(Sections::ACCOUNT_DATA) {
            s.store.account_data_since(user_id.as_str(), since.stream, upto.stream).await?
        } else {
            Vec::new()
        };
        for row in account_data {
            let event = account_data_event(&row.data_type, &row.content);
            if row.room_id.is_empty() {
                response.account_data.events.push(to_raw(&event)?);
            } else if let Ok(room) = RoomId::parse(row.room_id.as_str())
                && let Some(joined) = response.rooms.join.get_mut(&room)
            {
                joined.account_data.events.push(to_raw(&event)?);
            } else if let Ok(room) = RoomId::parse(row.room_id.as_str())
                && s.rooms.membership(room.as_str(), user_id.as_str()).await? == Some(MembershipState::Join)
            {
                let mut joined = JoinedRoom::new();
                joined.account_data.events.push(to_raw(&event)?);
                response.rooms.join.insert(room, joined);
            }
        }
        Ok(response)
    }

    async fn joined_room(
        &self,
        room: &RoomId,
        user_id: &UserId,
        viewer: Viewer<'_>,
        window: SyncWindow<'_>,
        read: RoomRead,
    ) -> Result<Option<JoinedRoom>> {
        let s = self.hub.services();
        let SyncWindow { req, since, upto } = window;
        let room_id = room.as_str();
        let full = matches!(read, RoomRead::Full);
        let sections = match read {
            RoomRead::Changed(sections) => sections,
            _ => Sections::all(),
        };
        let from = if full { 0 } else { since.stream };
        let (rows, limited) = if !sections.contains(Sections::TIMELINE) {
            (Vec::new(), false)
        } else if let RoomRead::Changed(_) = read {
            // Joined before the window and still joined: every event in it is visible.
            let limit = req.filter.limit.max(1);
            let cached = s.room_cache.with(room, |c| c.recent_events(from, upto.stream, limit + 1));
            let mut rows = match cached {
                Some(rows) => rows,
                None => {
                    s.store
                        .room_events(room_id, from, upto.stream, i64::try_from(limit + 1).unwrap_or(i64::MAX), true)
                        .await?
                }
            };
            let limited = rows.len() > limit;
            rows.truncate(limit);
            rows.reverse();
            (rows, limited)
        } else {
            self.timeline_rows(room_id, user_id.as_str(), from, upto.stream, req.filter.limit).await?
        };
        let timeline_start = rows.first().map(|r| r.stream_ordering - 1).unwrap_or(upto.stream);

        let mut joined = JoinedRoom::new();
        // State before the timeline: everything for a full sync, else what changed between
        // `since` and the start of a gapped timeline.
        let state_rows = if full {
            self.state_at(room_id, timeline_start).await?
        } else if limited {
            let changed: HashSet<StateKey> = s
                .store
                .state_events_after(room_id, since.stream)
                .await?
                .into_iter()
                .filter(|r| r.stream_ordering <= timeline_start)
                .filter_map(|r| r.state_key.map(|k| (r.event_type, k)))
                .collect();
            self.state_at(room_id, timeline_start)
                .await?
                .into_iter()
                .filter(|r| changed.contains(&(r.event_type.clone(), r.state_key.clone().unwrap_or_default())))
                .collect()
        } else {
            Vec::new()
        };
        let senders: HashSet<&str> = rows.iter().map(|r| r.sender.as_str()).collect();
        let mut state_events = Vec::new();
        for row in &state_rows {
            let member_key = row.state_key.as_deref().unwrap_or_default();
            if req.filter.lazy_load_members
                && row.event_type == "m.room.member"
                && member_key != user_id.as_str()
                && !senders.contains(member_key)
            {
                continue;
            }
            state_events.push(s.events.raw_client_event(row, viewer, false).await?);
        }
        let timeline_rows: Vec<&EventRow> = rows.iter().filter(|r| req.filter.allows_event(r)).collect();
        let timeline_events = s.relations.raw_client_events_of(&timeline_rows, viewer, false).await?;

        let mut ephemeral = Vec::new();
        if let Some(users) = s.typing.changed_since(room, since.typing) {
            ephemeral.push(to_raw(&json!({"type": "m.typing", "content": {"user_ids": users}}))?);
        }
        let receipts = if sections.contains(Sections::RECEIPTS) {
            s.store.receipts_since(room_id, if full { 0 } else { since.stream }, upto.stream).await?
        } else {
            Vec::new()
        };
        let mut receipt_content: Map<String, JsonValue> = Map::new();
        for r in receipts {
            if r.receipt_type == "m.read.private" && r.user_id != user_id.as_str() {
                continue;
            }
            let mut receipt = Map::new();
            receipt.insert("ts".into(), json!(r.ts));
            if !r.thread_id.is_empty() {
                receipt.insert("thread_id".into(), json!(r.thread_id));
            }
            let by_event = receipt_content.entry(r.event_id).or_insert_with(|| json!({}));
            by_event[&r.receipt_type][&r.user_id] = JsonValue::Object(receipt);
        }
        if !receipt_content.is_empty() {
            ephemeral.push(to_raw(&json!({"type": "m.receipt", "content": receipt_content}))?);
        }

        if !full && timeline_events.is_empty() && state_events.is_empty() && ephemeral.is_empty() {
            return Ok(None);
        }
        joined.timeline = Timeline::new();
        joined.timeline.limited = limited;
        joined.timeline.prev_batch = Some(Positions::at(timeline_start).to_string());
        joined.timeline.events = timeline_events;
        let mut state = StateEvents::new();
        state.events = state_events;
        joined.state = State::Before(state);
        joined.ephemeral.events = ephemeral;
        let (notifications, highlights) = self.unread_counts(user_id.as_str(), room, upto.stream).await?;
        joined.unread_notifications.notification_count = UInt::new(notifications.max(0) as u64);
        joined.unread_notifications.highlight_count = UInt::new(highlights.max(0) as u64);
        if full || !state_rows.is_empty() || rows.iter().any(|r| r.event_type == "m.room.member") {
            joined.summary = self.room_summary(room_id, user_id.as_str()).await?;
        }
        Ok(Some(joined))
    }

    async fn left_room(
        &self,
        room: &RoomId,
        user_id: &UserId,
        viewer: Viewer<'_>,
        req: &SyncRequest,
        since: Positions,
    ) -> Result<LeftRoom> {
        let s = self.hub.services();
        let room_id = room.as_str();
        // The timeline runs up to the user's leave, nothing after it.
        let history = s.store.membership_history(room_id, user_id.as_str()).await?;
        let left_at = history.last().map(|(pos, _)| *pos).unwrap_or(since.stream);
        let from = if req.since.is_some() { since.stream } else { 0 };
        let (rows, limited) = self.timeline_rows(room_id, user_id.as_str(), from, left_at, req.filter.limit).await?;
        let mut left = LeftRoom::new();
        left.timeline.limited = limited;
        left.timeline.prev_batch = rows.first().map(|r| Positions::at(r.stream_ordering - 1).to_string());
        for row in &rows {
            left.timeline.events.push(s.events.raw_client_event(row, viewer, false).await?);
        }
        Ok(left)
    }

    /// The newest `limit` events of a room in `(from, to]`, oldest first and visible to the
    /// user, and whether older ones were left out.
    async fn timeline_rows(
        &self,
        room_id: &str,
        user_id: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<(Vec<EventRow>, bool)> {
        let s = self.hub.services();
        let limit = limit.max(1);
        let mut rows =
            s.store.room_events(room_id, from, to, i64::try_from(limit + 1).unwrap_or(i64::MAX), true).await?;
        let limited = rows.len() > limit;
        rows.truncate(limit);
        rows.reverse();
        Ok((self.visible_events(room_id, user_id, rows).await?, limited))
    }

    /// Stripped state shown with an invite.
    pub(super) async fn invite_state(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Vec<ruma::serde::Raw<ruma::events::AnyStrippedStateEvent>>> {
        let s = self.hub.services();
        let mut out = Vec::new();
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (kind, key) in [
            ("m.room.create", ""),
            ("m.room.join_rules", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.topic", ""),
            ("m.room.canonical_alias", ""),
            ("m.room.encryption", ""),
            ("m.room.member", user_id),
        ] {
            if let Some(row) = s.store.current_state_event(room_id, kind, key).await? {
                let pdu: JsonValue = serde_json::from_str(&row.json).unwrap_or_default();
                out.push(to_raw(&json!({
                    "type": row.event_type, "state_key": key, "sender": row.sender, "content": pdu["content"],
                }))?);
                seen.push((kind, key));
            }
        }
        // An invite from another server: what that server showed of the room.
        if let Some(remote) = s.store.remote_invite_state(room_id, user_id).await? {
            let events: Vec<JsonValue> = serde_json::from_str(&remote).unwrap_or_default();
            for event in events {
                let (kind, key) =
                    (event["type"].as_str().unwrap_or_default(), event["state_key"].as_str().unwrap_or_default());
                if !seen.iter().any(|(k, s)| *k == kind && *s == key) {
                    out.push(to_raw(&event)?);
                }
            }
        }
        Ok(out)
    }

    async fn room_summary(&self, room_id: &str, user_id: &str) -> Result<RoomSummary> {
        let s = self.hub.services();
        let joined = s.store.room_members(room_id, &MembershipState::Join).await?;
        let invited = s.store.room_members(room_id, &MembershipState::Invite).await?;
        let mut summary = RoomSummary::new();
        summary.joined_member_count = UInt::new(joined.len() as u64);
        summary.invited_member_count = UInt::new(invited.len() as u64);
        let mut heroes: Vec<OwnedUserId> = joined
            .iter()
            .chain(invited.iter())
            .filter(|u| u.as_str() != user_id)
            .filter_map(|u| UserId::parse(u.as_str()).ok())
            .collect();
        heroes.sort();
        heroes.truncate(5);
        summary.heroes = heroes;
        Ok(summary)
    }

    /// Users whose devices to re-query (changed keys, or newly sharing a room) and users
    /// who no longer share any room, for an incremental sync.
    pub(super) async fn device_list_delta(
        &self,
        user_id: &str,
        from: i64,
        to: i64,
    ) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
        let s = self.hub.services();
        let mut changed: std::collections::BTreeSet<String> =
            s.store.device_list_changes_for(user_id, from, to).await?.into_iter().collect();
        let mut left = std::collections::BTreeSet::new();
        for (member, membership) in s.store.membership_changes_in_my_rooms(user_id, from, to).await? {
            if member == user_id {
                continue;
            }
            if membership == "join" {
                changed.insert(member);
            } else if !s.store.share_a_room(user_id, &member).await? {
                left.insert(member);
            }
        }
        // Rooms the user left: the members there may no longer share a room with them.
        for row in s.store.membership_changes(user_id, from, to).await? {
            if membership_of(&row) != Some(MembershipState::Join) {
                for member in s.store.room_members(&row.room_id, &MembershipState::Join).await? {
                    if member != user_id && !s.store.share_a_room(user_id, &member).await? {
                        left.insert(member);
                    }
                }
            } else {
                for member in s.store.room_members(&row.room_id, &MembershipState::Join).await? {
                    if member != user_id {
                        changed.insert(member);
                    }
                }
            }
        }
        let parse =
            |set: std::collections::BTreeSet<String>| set.into_iter().filter_map(|u| UserId::parse(u).ok()).collect();
        let left: Vec<OwnedUserId> = parse(left.into_iter().filter(|u| !changed.contains(u)).collect());
        Ok((parse(changed), left))
    }

    /// (notifications, highlights) of a user in a room up to position `upto`: from the
    /// count cached at an earlier position plus what the room cache says arrived since, or
    /// from the database. A read receipt of the user forgets the cached count.
    pub(super) async fn unread_counts(&self, user_id: &str, room: &RoomId, upto: i64) -> Result<(i64, i64)> {
        let s = self.hub.services();
        let key = (user_id.to_owned(), room.to_owned());
        let generation = self.unread.generation();
        if let Some(hit) = self.unread.get(&key) {
            if hit.upto == upto {
                return Ok((hit.notifications, hit.highlights));
            }
            if hit.upto < upto
                && let Some((n, h)) = s.room_cache.with(room, |c| c.notifications_between(user_id, hit.upto, upto))
            {
                let counts =
                    UnreadCounts { notifications: hit.notifications + n, highlights: hit.highlights + h, upto };
                self.unread.insert_if_unchanged(key, counts, generation);
                return Ok((counts.notifications, counts.highlights));
            }
        }
        let (notifications, highlights) = s.store.unread_counts(user_id, room.as_str(), upto).await?;
        self.unread.insert_if_unchanged(key, UnreadCounts { notifications, highlights, upto }, generation);
        Ok((notifications, highlights))
    }

    /// Drops a cached unread count: the user's read receipt moved.
    pub fn forget_unread(&self, user_id: &UserId, room_id: &RoomId) {
        self.unread.forget(&(user_id.to_string(), room_id.to_owned()));
    }

    /// The user's membership as of position `at`.
    async fn membership_at(&self, room_id: &str, user_id: &str, at: i64) -> Result<Option<MembershipState>> {
        let s = self.hub.services();
        let history = s.store.membership_history(room_id, user_id).await?;
        Ok(history.into_iter().rev().find(|(pos, _)| *pos <= at).map(|(_, m)| m))
    }

    /// The room state as of position `at`: the state after the room's newest event at or
    /// before it, from the state model (see `service::state`; across a fork that is the state
    /// on that event's branch, not a mix made by the stream order).
    pub async fn state_at(&self, room_id: &str, at: i64) -> Result<Vec<EventRow>> {
        let s = self.hub.services();
        if let Some((group, is_current)) = s.store.state_group_at(room_id, at).await? {
            // Mostly the current state (nothing changed since `at`): one read of it.
            let mut rows = if is_current {
                s.store.current_state(room_id).await?
            } else {
                let ids: Vec<String> = s.state.ids_of_group(group).await?.values().cloned().collect();
                s.store.events_by_id(&ids).await?
            };
            rows.sort_by_key(|r| r.stream_ordering);
            return Ok(rows);
        }
        self.state_at_by_stream_order(room_id, at).await
    }

    /// For rooms without state groups (only invited to over federation): the current state
    /// with every later state change rolled back.
    async fn state_at_by_stream_order(&self, room_id: &str, at: i64) -> Result<Vec<EventRow>> {
        let s = self.hub.services();
        let current = s.store.current_state(room_id).await?;
        let mut by_key: BTreeMap<StateKey, Option<String>> = BTreeMap::new();
        let mut rows: HashMap<String, EventRow> = HashMap::new();
        for row in current {
            by_key.insert(
                (row.event_type.clone(), row.state_key.clone().unwrap_or_default()),
                Some(row.event_id.clone()),
            );
            rows.insert(row.event_id.clone(), row);
        }
        for later in s.store.state_events_after(room_id, at).await? {
            let key = (later.event_type.clone(), later.state_key.clone().unwrap_or_default());
            by_key.insert(key, later.prev_state_event_id.clone());
        }
        let mut out = Vec::new();
        for event_id in by_key.into_values().flatten() {
            match rows.remove(&event_id) {
                Some(row) => out.push(row),
                None => {
                    if let Some(row) = s.store.event(&event_id).await? {
                        out.push(row);
                    }
                }
            }
        }
        out.sort_by_key(|r| r.stream_ordering);
        Ok(out)
    }

    /// Keeps the events `user_id` may see under the room's history visibility (the spec's
    /// rules: world_readable; joined at the event; shared and joined at some later point;
    /// invited at the event under `invited`).
    pub async fn visible_events(&self, room_id: &str, user_id: &str, rows: Vec<EventRow>) -> Result<Vec<EventRow>> {
        let s = self.hub.services();
        if rows.is_empty() {
            return Ok(rows);
        }
        let memberships = s.store.membership_history(room_id, user_id).await?;
        let visibility = s.store.state_history(room_id, "m.room.history_visibility").await?;
        Ok(rows
            .into_iter()
            .filter(|row| {
                // Users always see changes to their own membership (an invite, a kick).
                if row.event_type == "m.room.member" && row.state_key.as_deref() == Some(user_id) {
                    return true;
                }
                let member_at = memberships.iter().rev().find(|(pos, _)| *pos <= row.stream_ordering).map(|(_, m)| m);
                let history = visibility
                    .iter()
                    .rev()
                    .find(|(pos, _)| *pos < row.stream_ordering)
                    // History backfilled from other servers (negative positions) predates
                    // the state we hold: the earliest setting we know applies to it.
                    .or_else(|| visibility.first().filter(|_| row.stream_ordering < 0))
                    .and_then(|(_, c)| c["history_visibility"].as_str())
                    .unwrap_or("shared");
                match history {
                    "world_readable" => true,
                    _ if member_at == Some(&MembershipState::Join) => true,
                    "shared" => {
                        memberships.iter().any(|(pos, m)| *pos >= row.stream_ordering && *m == MembershipState::Join)
                    }
                    "invited" => member_at == Some(&MembershipState::Invite),
                    _ => false,
                }
            })
            .collect())
    }

    /// Parses a filter given inline (JSON) or by id.
    pub async fn resolve_filter(&self, user_id: &str, filter: Option<&str>) -> Result<EventFilter> {
        let s = self.hub.services();
        let Some(filter) = filter else { return Ok(EventFilter::default()) };
        let parse = |json: &str| -> Result<EventFilter> {
            let value: JsonValue =
                serde_json::from_str(json).map_err(|e| Error::NotJson(format!("Invalid filter: {e}")))?;
            Ok(event_filter_from_json(&value))
        };
        if filter.trim_start().starts_with('{') {
            return parse(filter);
        }
        let id: i64 = filter.parse().map_err(|_| Error::InvalidParam("Unknown filter".to_owned()))?;
        let key = (user_id.to_owned(), id);
        if let Some(cached) = self.filters.get(&key) {
            return Ok(cached);
        }
        let generation = self.filters.generation();
        let json = s.store.filter(user_id, id).await?.ok_or_else(|| Error::NotFound("Unknown filter".to_owned()))?;
        let parsed = parse(&json)?;
        self.filters.insert_if_unchanged(key, parsed.clone(), generation);
        Ok(parsed)
    }
}

/// The parts of a Matrix filter definition that apply to room timelines.
pub fn event_filter_from_json(filter: &JsonValue) -> EventFilter {
    let strings = |v: &JsonValue| -> Option<Vec<String>> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
    };
    let room = &filter["room"];
    let timeline = &room["timeline"];
    EventFilter {
        limit: timeline["limit"].as_u64().map(|l| l.clamp(1, 100) as usize).unwrap_or(10),
        types: strings(&timeline["types"]),
        not_types: strings(&timeline["not_types"]).unwrap_or_default(),
        senders: strings(&timeline["senders"]),
        not_senders: strings(&timeline["not_senders"]).unwrap_or_default(),
        rooms: strings(&room["rooms"]),
        not_rooms: strings(&room["not_rooms"]).unwrap_or_default(),
        lazy_load_members: room["state"]["lazy_load_members"].as_bool().unwrap_or(false),
        include_leave: room["include_leave"].as_bool().unwrap_or(false),
        event_fields: strings(&filter["event_fields"]),
    }
}

/// A long-polling sync's registration: the rooms it watches (joined or invited, with the
/// membership) and its wake-up.
/// The request a sync answers and the positions it covers.
#[derive(Clone, Copy)]
struct SyncWindow<'a> {
    req: &'a SyncRequest,
    since: Positions,
    upto: Positions,
}

struct Watch {
    rooms: HashMap<OwnedRoomId, MembershipState>,
    waiter: Waiter,
    /// The user's memberships up to this position are in `rooms`.
    covers: i64,
}

/// A user's unread counts in a room as of a stream position.
#[derive(Debug, Clone, Copy)]
pub struct UnreadCounts {
    notifications: i64,
    highlights: i64,
    upto: i64,
}

/// How much of a joined room a sync reads.
#[derive(Debug, Clone, Copy)]
enum RoomRead {
    /// Everything: initial sync, full state, or the user just joined.
    Full,
    /// The window since the token, with the user's membership possibly changed in it.
    Incremental,
    /// The window since the token, only the parts that changed; the user was joined all
    /// along.
    Changed(Sections),
}

pub(super) fn membership_of(row: &EventRow) -> Option<MembershipState> {
    serde_json::from_str::<JsonValue>(&row.json)
        .ok()
        .and_then(|v| v["content"]["membership"].as_str().map(MembershipState::from))
}

pub(super) fn account_data_event(data_type: &str, content: &str) -> JsonValue {
    json!({"type": data_type, "content": serde_json::from_str::<JsonValue>(content).unwrap_or_default()})
}

fn is_empty(r: &Response) -> bool {
    r.rooms.join.is_empty()
        && r.rooms.invite.is_empty()
        && r.rooms.leave.is_empty()
        && r.rooms.knock.is_empty()
        && r.account_data.events.is_empty()
        && r.presence.events.is_empty()
        && r.to_device.events.is_empty()
        && r.device_lists.changed.is_empty()
        && r.device_lists.left.is_empty()
}

/// Counts a sync in the `obmin_sync_open` gauge for as long as it lives.
pub(super) struct OpenSync<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> OpenSync<'a> {
    pub(super) fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenSync<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
