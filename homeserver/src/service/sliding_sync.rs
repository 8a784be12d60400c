//! Simplified sliding sync (MSC4186, `org.matrix.simplified_msc3575`): lists of the user's
//! rooms sorted by recency with ranges, room subscriptions, per-room `required_state` and
//! `timeline_limit`, and the extensions (to-device, e2ee, account data, receipts, typing).
//!
//! It reads the same stream positions as `/sync`. What a connection has already been sent
//! (which rooms, up to which position) lives in memory per (user, device, `conn_id`) and is
//! named by the `pos` token; a `pos` the server does not know (e.g. after a restart)
//! answers `M_UNKNOWN_POS`, and the client starts the connection afresh, as the MSC says.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Mutex,
    time::Duration,
};

use js_option::JsOption;
use ruma::{
    OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    api::client::sync::sync_events::{
        DeviceLists,
        v5::{Request, Response, request, response},
    },
    events::StateEventType,
};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    Hub,
    events::{Viewer, to_raw},
    notifier::{Scope, Waiter},
    streams::Positions,
    sync::{MAX_SYNC_TIMEOUT, OpenSync, account_data_event, membership_of},
};
use crate::{
    error::{Error, Result},
    store::EventRow,
};

/// Most events a room's timeline may ask for.
const MAX_TIMELINE_LIMIT: u64 = 100;
/// Most lists, subscriptions and `required_state` entries in one request.
const MAX_ENTRIES: usize = 100;
/// Connections remembered per device; the least recently used goes first.
const MAX_CONNECTIONS_PER_DEVICE: usize = 16;
/// `pos` tokens kept per connection: the latest and the one before it, so a client that
/// lost a response can repeat its request.
const SNAPSHOTS_KEPT: usize = 2;

/// What a connection has been sent, as of one `pos`.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    positions: Positions,
    /// Rooms sent, and the stream position their timeline was sent up to.
    rooms: HashMap<OwnedRoomId, i64>,
    list_counts: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Connection {
    next_seq: u64,
    last_used: u64,
    snapshots: VecDeque<(String, Snapshot)>,
}

/// The sliding sync connections of every device, in memory.
#[derive(Default)]
pub struct SlidingSyncConnections {
    conns: Mutex<HashMap<(String, String, String), Connection>>,
    clock: std::sync::atomic::AtomicU64,
}

impl SlidingSyncConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), Connection>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot `pos` names, or a fresh one without `pos`.
    fn snapshot(&self, key: &(String, String, String), pos: Option<&str>) -> Result<Option<Snapshot>> {
        let Some(pos) = pos else { return Ok(None) };
        let conns = self.lock();
        conns
            .get(key)
            .and_then(|c| c.snapshots.iter().find(|(p, _)| p == pos))
            .map(|(_, s)| Some(s.clone()))
            .ok_or_else(|| Error::UnknownPos("Unknown or expired pos; start a new connection".to_owned()))
    }

    /// Stores the snapshot a response leads to; returns its `pos`.
    fn save(&self, key: (String, String, String), snapshot: Snapshot) -> String {
        let now = self.clock.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut conns = self.lock();
        let device_conns = conns.keys().filter(|k| k.0 == key.0 && k.1 == key.1 && **k != key).count();
        if device_conns >= MAX_CONNECTIONS_PER_DEVICE
            && let Some(oldest) = conns
                .iter()
                .filter(|(k, _)| k.0 == key.0 && k.1 == key.1 && **k != key)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
        {
            conns.remove(&oldest);
        }
        let conn = conns.entry(key).or_default();
        conn.next_seq += 1;
        conn.last_used = now;
        let pos = format!("{}.{}", conn.next_seq, snapshot.positions);
        conn.snapshots.push_back((pos.clone(), snapshot));
        while conn.snapshots.len() > SNAPSHOTS_KEPT {
            conn.snapshots.pop_front();
        }
        pos
    }

    /// Forgets a device's connections (logout, device deletion).
    pub fn forget_device(&self, user_id: &str, device_id: &str) {
        self.lock().retain(|k, _| !(k.0 == user_id && k.1 == device_id));
    }
}

/// What to send of one room: the union of the lists and subscriptions that include it.
#[derive(Debug, Clone, Default)]
struct RoomConfig {
    required_state: Vec<(StateEventType, String)>,
    timeline_limit: u64,
}

impl RoomConfig {
    fn merge(&mut self, required_state: &[(StateEventType, String)], timeline_limit: UInt) {
        for entry in required_state {
            if !self.required_state.contains(entry) {
                self.required_state.push(entry.clone());
            }
        }
        self.timeline_limit = self.timeline_limit.max(u64::from(timeline_limit).min(MAX_TIMELINE_LIMIT));
    }

    /// Does `required_state` ask for this state event? `*` matches any type or key, `$ME`
    /// the user's own key, `$LAZY` (members) the senders in the timeline.
    fn wants(&self, row: &EventRow, user_id: &str, lazy: &HashSet<&str>) -> bool {
        let Some(key) = row.state_key.as_deref() else { return false };
        self.required_state.iter().any(|(kind, wanted)| {
            let type_ok = kind.to_string() == "*" || kind.to_string() == row.event_type;
            let key_ok = match wanted.as_str() {
                "*" => true,
                "$ME" => key == user_id,
                "$LAZY" => row.event_type == "m.room.member" && (lazy.contains(key) || key == user_id),
                other => other == key,
            };
            type_ok && key_ok
        })
    }
}

/// A room of the user with what the lists sort and filter on.
struct Candidate {
    room_id: OwnedRoomId,
    membership: MembershipState,
    bump: i64,
    /// In the user's `m.direct` account data.
    is_dm: bool,
}

/// Sliding sync (MSC4186) with the connections of every device.
pub struct SlidingSync {
    hub: Hub,
    connections: SlidingSyncConnections,
}

impl SlidingSync {
    pub fn new(hub: Hub) -> Self {
        Self { hub, connections: SlidingSyncConnections::default() }
    }

    /// Forgets a device's connections (the device was deleted or logged out).
    pub fn forget_device(&self, user_id: &str, device_id: &str) {
        self.connections.forget_device(user_id, device_id);
    }

    /// `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.
    pub async fn run(&self, user_id: &UserId, device_id: &str, req: Request) -> Result<Response> {
        let s = self.hub.services();
        validate(&req)?;
        let key = (user_id.to_string(), device_id.to_owned(), req.conn_id.clone().unwrap_or_default());
        let previous = self.connections.snapshot(&key, req.pos.as_deref())?;
        let deadline = tokio::time::Instant::now() + req.timeout.unwrap_or(Duration::ZERO).min(MAX_SYNC_TIMEOUT);
        let _open = OpenSync::new(&s.metrics.open_syncs);
        s.presence.on_sync(user_id, req.set_presence.as_str()).await?;
        loop {
            // Registered before the positions are read, so nothing committed from here on
            // is missed; again on every pass, as the user's rooms may have changed.
            let waiter = self.watch(user_id).await?;
            let upto = s.streams.current();
            let (mut response, snapshot, news) = self.once(user_id, device_id, &req, previous.as_ref(), upto).await?;
            let waiting = previous.is_some() && !news && tokio::time::Instant::now() < deadline;
            if !waiting || tokio::time::timeout_at(deadline, waiter.woken()).await.is_err() {
                response.pos = self.connections.save(key, snapshot);
                response.txn_id = req.txn_id.clone();
                return Ok(response);
            }
        }
    }

    /// The `/sync` notifier's wake-up for this user and their joined and invited rooms.
    async fn watch(&self, user_id: &UserId) -> Result<Waiter> {
        let s = self.hub.services();
        let mut scopes: Vec<Scope> = s
            .rooms
            .of_user(user_id.as_str())
            .await?
            .iter()
            .filter(|(_, m)| *m == MembershipState::Join || *m == MembershipState::Invite)
            .filter_map(|(room, _)| OwnedRoomId::try_from(room.as_str()).ok())
            .map(Scope::Room)
            .collect();
        scopes.push(Scope::User(user_id.to_owned()));
        Ok(s.streams.notifier().register(scopes))
    }

    /// One pass: the response, the snapshot it leads to, and whether it carries news.
    async fn once(
        &self,
        user_id: &UserId,
        device_id: &str,
        req: &Request,
        previous: Option<&Snapshot>,
        upto: Positions,
    ) -> Result<(Response, Snapshot, bool)> {
        let s = self.hub.services();
        let viewer = Viewer { user_id: user_id.as_str(), device_id };
        let since = previous.map(|p| p.positions).unwrap_or_default();
        let mut response = Response::new(String::new());
        let mut snapshot = Snapshot {
            positions: upto,
            rooms: previous.map(|p| p.rooms.clone()).unwrap_or_default(),
            list_counts: BTreeMap::new(),
        };

        // The user's rooms, newest first.
        let memberships = s.rooms.of_user(user_id.as_str()).await?;
        let ids: Vec<&str> = memberships.iter().map(|(r, _)| r.as_str()).collect();
        let bumps = s.store.latest_room_positions(&ids).await?;
        let direct = self.direct_rooms(user_id).await?;
        let mut candidates: Vec<Candidate> = memberships
            .iter()
            .filter(|(_, m)| *m == MembershipState::Join || *m == MembershipState::Invite)
            .filter_map(|(room, m)| {
                Some(Candidate {
                    room_id: RoomId::parse(room.as_str()).ok()?,
                    membership: m.clone(),
                    bump: bumps.get(room).copied().unwrap_or(0),
                    is_dm: direct.contains(room),
                })
            })
            .collect();
        candidates.sort_by(|a, b| b.bump.cmp(&a.bump).then_with(|| a.room_id.cmp(&b.room_id)));

        // Which rooms to send, with what.
        let mut configs: BTreeMap<OwnedRoomId, RoomConfig> = BTreeMap::new();
        for (name, list) in &req.lists {
            let mut matching = Vec::new();
            for candidate in &candidates {
                if self.list_filter_allows(list.filters.as_ref(), candidate).await? {
                    matching.push(candidate);
                }
            }
            let count = matching.len() as u64;
            let mut out = response::List::default();
            out.count = UInt::new(count).unwrap_or_default();
            response.lists.insert(name.clone(), out);
            snapshot.list_counts.insert(name.clone(), count);
            for (start, end) in &list.ranges {
                let (start, end) = (u64::from(*start) as usize, u64::from(*end) as usize);
                for candidate in matching.iter().skip(start).take(end.saturating_sub(start).saturating_add(1)) {
                    configs
                        .entry(candidate.room_id.clone())
                        .or_default()
                        .merge(&list.room_details.required_state, list.room_details.timeline_limit);
                }
            }
        }
        for (room_id, subscription) in &req.room_subscriptions {
            // Only rooms the user is in (or invited to); others are ignored, not an error.
            if candidates.iter().any(|c| &c.room_id == room_id) {
                configs
                    .entry(room_id.clone())
                    .or_default()
                    .merge(&subscription.required_state, subscription.timeline_limit);
            }
        }

        for (room_id, config) in &configs {
            let Some(candidate) = candidates.iter().find(|c| &c.room_id == room_id) else { continue };
            let sent = snapshot.rooms.get(room_id).copied();
            let room = if candidate.membership == MembershipState::Invite {
                self.invite(candidate, user_id, sent).await?
            } else {
                self.joined(candidate, config, user_id, viewer, sent, upto).await?
            };
            if let Some(room) = room {
                response.rooms.insert(room_id.clone(), room);
            }
            snapshot.rooms.insert(room_id.clone(), upto.stream);
        }
        // Rooms the connection knew that the user left: the leave, then they are forgotten.
        for (room_id, membership) in memberships.iter() {
            let Ok(room) = RoomId::parse(room_id.as_str()) else { continue };
            if (*membership == MembershipState::Leave || *membership == MembershipState::Ban)
                && let Some(sent) = snapshot.rooms.remove(&room)
                && let Some(left) = self.left(&room, user_id, viewer, sent).await?
            {
                response.rooms.insert(room, left);
            }
        }

        let known: Vec<OwnedRoomId> = snapshot.rooms.keys().cloned().collect();
        // Receipts and typing only of rooms the user is in: an invitee sees the invite, not
        // who reads or types there (nor, through receipts, the ids of the room's events).
        let joined: Vec<OwnedRoomId> = known
            .iter()
            .filter(|room| memberships.iter().any(|(id, m)| id == room.as_str() && *m == MembershipState::Join))
            .cloned()
            .collect();
        let rooms = ExtensionRooms { known: &known, joined: &joined };
        let news = self
            .extensions(
                &mut response,
                &req.extensions,
                ExtensionsAt { user_id, device_id, previous, since, upto },
                rooms,
            )
            .await?;
        let counts_changed = previous.is_none_or(|p| p.list_counts != snapshot.list_counts);
        let news = news || counts_changed || !response.rooms.is_empty();
        Ok((response, snapshot, news))
    }

    /// Rooms marked as direct chats in the user's `m.direct` account data.
    async fn direct_rooms(&self, user_id: &UserId) -> Result<HashSet<String>> {
        let s = self.hub.services();
        let stored = s.store.account_data(user_id.as_str(), "", "m.direct").await?;
        let value: JsonValue = stored.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        Ok(value
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(JsonValue::as_array)
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect())
    }

    async fn list_filter_allows(&self, filters: Option<&request::ListFilters>, candidate: &Candidate) -> Result<bool> {
        let s = self.hub.services();
        let Some(filters) = filters else { return Ok(true) };
        let room = candidate.room_id.as_str();
        if filters.is_invite.is_some_and(|want| want != (candidate.membership == MembershipState::Invite)) {
            return Ok(false);
        }
        if filters.is_dm.is_some_and(|want| want != candidate.is_dm) {
            return Ok(false);
        }
        if let Some(want) = filters.is_encrypted {
            let encrypted = s.store.current_state_event(room, "m.room.encryption", "").await?.is_some();
            if want != encrypted {
                return Ok(false);
            }
        }
        if !filters.room_types.is_empty() || !filters.not_room_types.is_empty() {
            let create = s.store.current_state_event(room, "m.room.create", "").await?;
            let kind: Option<String> = create
                .and_then(|r| serde_json::from_str::<JsonValue>(&r.json).ok())
                .and_then(|v| v["content"]["type"].as_str().map(str::to_owned));
            let matches = |t: &ruma::directory::RoomTypeFilter| match t {
                ruma::directory::RoomTypeFilter::Default => kind.is_none(),
                other => other.as_str() == kind.as_deref(),
            };
            if !filters.room_types.is_empty() && !filters.room_types.iter().any(matches) {
                return Ok(false);
            }
            if filters.not_room_types.iter().any(matches) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// An invite: its stripped state, when new to the connection or changed since.
    async fn invite(
        &self,
        candidate: &Candidate,
        user_id: &UserId,
        sent: Option<i64>,
    ) -> Result<Option<response::Room>> {
        let s = self.hub.services();
        if sent.is_some_and(|s| s >= candidate.bump) {
            return Ok(None);
        }
        let state = s.sync.invite_state(candidate.room_id.as_str(), user_id.as_str()).await?;
        let mut room = response::Room::new();
        room.initial = Some(true);
        room.name = state.iter().find_map(|e| {
            let v: JsonValue = serde_json::from_str(e.json().get()).ok()?;
            if v["type"] == "m.room.name" { v["content"]["name"].as_str().map(str::to_owned) } else { None }
        });
        room.invite_state = Some(state);
        room.bump_stamp = UInt::new(candidate.bump.max(0) as u64);
        Ok(Some(room))
    }

    /// A joined room: everything for a room new to the connection, else what changed since
    /// it was last sent (`None` if nothing).
    async fn joined(
        &self,
        candidate: &Candidate,
        config: &RoomConfig,
        user_id: &UserId,
        viewer: Viewer<'_>,
        sent: Option<i64>,
        upto: Positions,
    ) -> Result<Option<response::Room>> {
        let s = self.hub.services();
        let room_id = candidate.room_id.as_str();
        let initial = sent.is_none();
        let from = sent.unwrap_or(0);
        let own_receipt = match sent {
            Some(from) => {
                s.store.receipts_since(room_id, from, upto.stream).await?.iter().any(|r| r.user_id == user_id.as_str())
            }
            None => false,
        };
        // One more than asked, to know whether the timeline is limited.
        let fetch = i64::try_from(config.timeline_limit.max(1) + 1).unwrap_or(i64::MAX);
        let mut rows = s.store.room_events(room_id, from, upto.stream, fetch, true).await?;
        if !initial && rows.is_empty() && !own_receipt {
            return Ok(None);
        }
        let limited = rows.len() as u64 > config.timeline_limit;
        rows.truncate(usize::try_from(config.timeline_limit).unwrap_or(usize::MAX));
        rows.reverse();
        let rows = s.sync.visible_events(room_id, user_id.as_str(), rows).await?;

        let mut room = response::Room::new();
        room.initial = initial.then_some(true);
        room.is_dm = (initial && candidate.is_dm).then_some(true);
        room.limited = limited;
        room.bump_stamp = UInt::new(candidate.bump.max(0) as u64);
        room.prev_batch = rows.first().map(|r| Positions::at(r.stream_ordering - 1).to_string());
        if !initial {
            room.num_live = UInt::new(rows.len() as u64);
        }
        let lazy: HashSet<&str> = rows.iter().map(|r| r.sender.as_str()).collect();
        let state_rows: Vec<EventRow> = if initial {
            s.sync.state_at(room_id, upto.stream).await?
        } else {
            let mut changed: Vec<EventRow> = s
                .store
                .state_events_after(room_id, from)
                .await?
                .into_iter()
                .filter(|r| r.stream_ordering <= upto.stream)
                .collect();
            // Members of new timeline senders the client may not have yet.
            for sender in &lazy {
                if config.required_state.iter().any(|(t, k)| t == &StateEventType::RoomMember && k == "$LAZY")
                    && !changed
                        .iter()
                        .any(|r| r.event_type == "m.room.member" && r.state_key.as_deref() == Some(*sender))
                    && let Some(row) = s.store.current_state_event(room_id, "m.room.member", sender).await?
                {
                    changed.push(row);
                }
            }
            changed
        };
        let wanted: Vec<&EventRow> = state_rows.iter().filter(|r| config.wants(r, user_id.as_str(), &lazy)).collect();
        for row in &wanted {
            room.required_state.push(s.events.raw_client_event(row, viewer, false).await?);
        }
        room.timeline = s.relations.raw_client_events(&rows, viewer, false).await?;

        // Name, avatar and member counts: for a new room, or when they changed.
        let touched = |kind: &str| initial || state_rows.iter().any(|r| r.event_type == kind);
        if touched("m.room.name") {
            room.name =
                self.state_content(room_id, "m.room.name").await?.and_then(|c| c["name"].as_str().map(str::to_owned));
        }
        if touched("m.room.avatar") {
            room.avatar = match self
                .state_content(room_id, "m.room.avatar")
                .await?
                .and_then(|c| c["url"].as_str().map(str::to_owned))
            {
                Some(url) => JsOption::Some(OwnedMxcUri::from(url)),
                None if initial => JsOption::Undefined,
                None => JsOption::Null,
            };
        }
        if touched("m.room.member") {
            let joined = s.store.room_members(room_id, &MembershipState::Join).await?;
            let invited = s.store.room_members(room_id, &MembershipState::Invite).await?;
            room.joined_count = UInt::new(joined.len() as u64);
            room.invited_count = UInt::new(invited.len() as u64);
            let mut heroes: Vec<OwnedUserId> = joined
                .iter()
                .chain(invited.iter())
                .filter(|u| u.as_str() != user_id.as_str())
                .filter_map(|u| UserId::parse(u.as_str()).ok())
                .collect();
            heroes.sort();
            heroes.truncate(5);
            let mut out = Vec::new();
            for hero in heroes {
                let row = s.store.current_state_event(room_id, "m.room.member", hero.as_str()).await?;
                let content: JsonValue = row
                    .and_then(|r| serde_json::from_str::<JsonValue>(&r.json).ok())
                    .map(|v| v["content"].clone())
                    .unwrap_or_default();
                let mut h = response::Hero::new(hero);
                h.name = content["displayname"].as_str().map(str::to_owned);
                h.avatar = content["avatar_url"].as_str().map(OwnedMxcUri::from);
                out.push(h);
            }
            room.heroes = Some(out);
        }
        let (notifications, highlights) =
            s.sync.unread_counts(user_id.as_str(), &candidate.room_id, upto.stream).await?;
        room.unread_notifications.notification_count = UInt::new(notifications.max(0) as u64);
        room.unread_notifications.highlight_count = UInt::new(highlights.max(0) as u64);
        Ok(Some(room))
    }

    /// A room the user left or was removed from since it was last sent: the timeline up to
    /// the leave.
    async fn left(
        &self,
        room: &RoomId,
        user_id: &UserId,
        viewer: Viewer<'_>,
        sent: i64,
    ) -> Result<Option<response::Room>> {
        let s = self.hub.services();
        let history = s.store.membership_history(room.as_str(), user_id.as_str()).await?;
        let Some(left_at) = history.last().map(|(pos, _)| *pos) else { return Ok(None) };
        if left_at <= sent {
            return Ok(None);
        }
        let mut rows = s.store.room_events(room.as_str(), sent, left_at, 11, true).await?;
        let limited = rows.len() > 10;
        rows.truncate(10);
        rows.reverse();
        let rows = s.sync.visible_events(room.as_str(), user_id.as_str(), rows).await?;
        let mut out = response::Room::new();
        out.limited = limited;
        out.num_live = UInt::new(rows.len() as u64);
        out.timeline = s.relations.raw_client_events(&rows, viewer, false).await?;
        if let Some(row) = s.store.current_state_event(room.as_str(), "m.room.member", user_id.as_str()).await?
            && membership_of(&row).is_some()
        {
            out.required_state.push(s.events.raw_client_event(&row, viewer, false).await?);
        }
        Ok(Some(out))
    }

    async fn state_content(&self, room_id: &str, kind: &str) -> Result<Option<JsonValue>> {
        let s = self.hub.services();
        Ok(s.store
            .current_state_event(room_id, kind, "")
            .await?
            .and_then(|r| serde_json::from_str::<JsonValue>(&r.json).ok())
            .map(|v| v["content"].clone()))
    }

    /// Fills the extensions that are enabled; true if they carry news.
    async fn extensions(
        &self,
        response: &mut Response,
        ext: &request::Extensions,
        at: ExtensionsAt<'_>,
        rooms: ExtensionRooms<'_>,
    ) -> Result<bool> {
        let s = self.hub.services();
        let ExtensionsAt { user_id, device_id, previous, since, upto } = at;
        let known = rooms.known;
        let mut news = false;
        let user = user_id.as_str();
        if ext.to_device.enabled == Some(true) {
            let acked = match ext.to_device.since.as_deref() {
                Some(token) => Some(
                    token
                        .parse::<i64>()
                        .ok()
                        .filter(|t| *t >= 0)
                        .ok_or_else(|| Error::InvalidParam("Invalid to_device since token".to_owned()))?,
                ),
                None => None,
            };
            let messages = s.keys.to_device_for_sync(user, device_id, acked, upto.stream).await?;
            let full = i64::try_from(messages.len()).unwrap_or(i64::MAX) >= super::keys::TO_DEVICE_PER_SYNC;
            let next = if full { messages.last().map(|m| m.stream_id).unwrap_or(upto.stream) } else { upto.stream };
            let mut out = response::ToDevice::default();
            out.next_batch = next.to_string();
            for m in &messages {
                let content: JsonValue = serde_json::from_str(&m.content).unwrap_or_default();
                out.events.push(to_raw(&json!({"sender": m.sender, "type": m.event_type, "content": content}))?);
            }
            news |= !out.events.is_empty();
            response.extensions.to_device = Some(out);
        }
        if ext.e2ee.enabled == Some(true) {
            let e2ee = &mut response.extensions.e2ee;
            if previous.is_some() {
                let (changed, left) = s.sync.device_list_delta(user, since.stream, upto.stream).await?;
                let mut lists = DeviceLists::new();
                lists.changed = changed;
                lists.left = left;
                news |= !lists.is_empty();
                e2ee.device_lists = lists;
            }
            for (algorithm, count) in s.store.one_time_key_counts(user, device_id).await? {
                e2ee.device_one_time_keys_count
                    .insert(algorithm.as_str().into(), UInt::new(count.max(0) as u64).unwrap_or_default());
            }
            e2ee.device_unused_fallback_key_types = Some(
                s.store.unused_fallback_algorithms(user, device_id).await?.iter().map(|a| a.as_str().into()).collect(),
            );
        }
        if ext.account_data.enabled == Some(true) {
            for row in s.store.account_data_since(user, since.stream, upto.stream).await? {
                let event = account_data_event(&row.data_type, &row.content);
                if row.room_id.is_empty() {
                    response.extensions.account_data.global.push(to_raw(&event)?);
                } else if let Ok(room) = RoomId::parse(row.room_id.as_str())
                    && known.contains(&room)
                {
                    response.extensions.account_data.rooms.entry(room).or_default().push(to_raw(&event)?);
                }
            }
            // Clients read their push rules here; until changed the defaults stand in.
            if previous.is_none() && s.store.account_data(user, "", "m.push_rules").await?.is_none() {
                let rules = s.push.rules(user_id).await?;
                let event = json!({"type": "m.push_rules", "content": {"global": *rules}});
                response.extensions.account_data.global.push(to_raw(&event)?);
            }
            news |= !response.extensions.account_data.is_empty();
        }
        if ext.receipts.enabled == Some(true) {
            for room in rooms.joined {
                // A room new to the connection gets every receipt, others what is new.
                let from = match previous.and_then(|p| p.rooms.get(room)) {
                    Some(_) => since.stream,
                    None => 0,
                };
                let mut content: Map<String, JsonValue> = Map::new();
                for r in s.store.receipts_since(room.as_str(), from, upto.stream).await? {
                    if r.receipt_type == "m.read.private" && r.user_id != user {
                        continue;
                    }
                    let mut receipt = Map::new();
                    receipt.insert("ts".into(), json!(r.ts));
                    if !r.thread_id.is_empty() {
                        receipt.insert("thread_id".into(), json!(r.thread_id));
                    }
                    let by_event = content.entry(r.event_id).or_insert_with(|| json!({}));
                    by_event[&r.receipt_type][&r.user_id] = JsonValue::Object(receipt);
                }
                if !content.is_empty() {
                    let event = json!({"type": "m.receipt", "content": content});
                    response.extensions.receipts.rooms.insert(room.clone(), to_raw(&event)?);
                }
            }
            news |= !response.extensions.receipts.is_empty();
        }
        if ext.typing.enabled == Some(true) {
            for room in rooms.joined {
                let since_typing = if previous.is_some_and(|p| p.rooms.contains_key(room)) { since.typing } else { 0 };
                if let Some(users) = s.typing.changed_since(room, since_typing) {
                    let event = json!({"type": "m.typing", "content": {"user_ids": users}});
                    response.extensions.typing.rooms.insert(room.clone(), to_raw(&event)?);
                }
            }
            news |= !response.extensions.typing.is_empty();
        }
        Ok(news)
    }
}

/// Whose extensions are filled, and the positions they cover.
#[derive(Clone, Copy)]
struct ExtensionsAt<'a> {
    user_id: &'a UserId,
    device_id: &'a str,
    /// The connection's snapshot the request continues, if any.
    previous: Option<&'a Snapshot>,
    since: Positions,
    upto: Positions,
}

/// The rooms a connection's extensions cover.
#[derive(Clone, Copy)]
struct ExtensionRooms<'a> {
    /// Every room the connection has sent (room account data).
    known: &'a [OwnedRoomId],
    /// Those the user is joined to (receipts, typing).
    joined: &'a [OwnedRoomId],
}

/// Bad requests get Matrix errors, not a half answer.
fn validate(req: &Request) -> Result<()> {
    if req.lists.len() > MAX_ENTRIES || req.room_subscriptions.len() > MAX_ENTRIES {
        return Err(Error::InvalidParam(format!("At most {MAX_ENTRIES} lists and room subscriptions")));
    }
    for (name, list) in &req.lists {
        if list.ranges.len() > MAX_ENTRIES || list.room_details.required_state.len() > MAX_ENTRIES {
            return Err(Error::InvalidParam(format!("List {name} has too many ranges or required_state entries")));
        }
        if let Some((start, end)) = list.ranges.iter().find(|(s, e)| s > e) {
            return Err(Error::InvalidParam(format!("List {name}: range [{start}, {end}] ends before it starts")));
        }
    }
    if req.room_subscriptions.values().any(|s| s.required_state.len() > MAX_ENTRIES) {
        return Err(Error::InvalidParam("Too many required_state entries".to_owned()));
    }
    if req.pos.as_deref().is_some_and(|p| p.split_once('.').and_then(|(_, t)| Positions::parse(t)).is_none()) {
        return Err(Error::UnknownPos("Malformed pos".to_owned()));
    }
    Ok(())
}
