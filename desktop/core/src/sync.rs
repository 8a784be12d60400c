//! The sync loop: long-polls `/sync`, feeds the encryption machine, writes rooms, members,
//! timelines, receipts and presence into the local cache in one transaction per response
//! (with the next sync token, so a crash never skips or half-applies a response), then tells
//! subscribers what changed. Reconnects with exponential backoff.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use e2ee::{SyncChanges, ToDeviceEvent};
use ruma::{
    OwnedRoomId, OwnedUserId, RoomId,
    api::client::{
        filter::{FilterDefinition, RoomEventFilter, RoomFilter},
        sync::sync_events::v3::{self as sync, State},
    },
    events::{AnyGlobalAccountDataEvent, AnySyncEphemeralRoomEvent, presence::PresenceEvent},
    serde::Raw,
};
use serde_json::Value;

use crate::{
    Client, ConnectionState, Error, ItemContent, Membership, PresenceInfo, Result, Update,
    http::REQUEST_TIMEOUT,
    session::Session,
    store::{NewItem, Store},
    timeline::{event_content, item_content},
    types::Presence,
};

/// How long one `/sync` waits on the server for something to happen.
const LONG_POLL: Duration = Duration::from_secs(30);
/// Events per room in the first sync (older history is not fetched yet).
const INITIAL_TIMELINE_LIMIT: u32 = 50;

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to 15 s.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(15);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Up to 20% jitter, so many clients do not come back in lockstep after an outage.
        delay + delay.mul_f64(rand::random::<f64>() * 0.2)
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The background sync loop (see [`Client::start`]).
pub(crate) async fn run(client: Client) {
    let mut backoff = Backoff::new();
    loop {
        // Until a sync has succeeded (at start, after an error) ask for an immediate answer:
        // that is what tells us, and the user, that we are online again.
        let timeout = if client.connection_state() == ConnectionState::Online { LONG_POLL } else { Duration::ZERO };
        match client.sync_with_timeout(timeout).await {
            Ok(()) => {
                if client.connection_state() != ConnectionState::Online {
                    // Back online: whatever waits in the outbox can go now.
                    client.inner.outbox_wake.notify_one();
                }
                client.set_connection(ConnectionState::Online);
                backoff.reset();
            }
            Err(Error::SessionExpired) | Err(Error::NotLoggedIn) => {
                if let Err(e) = client.end_session().await {
                    tracing::error!(%e, "forgetting the expired session");
                }
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::info!(%e, ?delay, "sync failed; retrying");
                if !e.is_transient() {
                    client.emit(Update::Error { message: e.to_string() });
                }
                client.set_connection(ConnectionState::Reconnecting { retry_in_ms: delay.as_millis() as u64 });
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Client {
    /// Runs one `/sync` that returns at once and applies it. The background loop of
    /// [`Client::start`] does this continuously; call it directly for a refresh without it.
    pub async fn sync_once(&self) -> Result<()> {
        self.sync_with_timeout(Duration::ZERO).await
    }

    async fn sync_with_timeout(&self, timeout: Duration) -> Result<()> {
        // One sync at a time: the machine must see every to-device message exactly once.
        let _guard = self.inner.sync_lock.lock().await;
        let session = self.require_session()?;
        {
            // Device keys go up before anyone can need them (and after every change).
            let mut crypto = self.inner.crypto.lock().await;
            let crypto = crypto.as_mut().ok_or(Error::NotLoggedIn)?;
            self.flush_crypto(&session, crypto).await?;
        }
        let since = self.store()?.sync_token().await?;
        let mut request = sync::Request::new();
        request.timeout = Some(timeout);
        request.set_presence = self.inner.presence.lock().expect("presence lock").clone();
        if since.is_none() {
            let mut filter = FilterDefinition::default();
            filter.room = RoomFilter::default();
            filter.room.timeline = RoomEventFilter::default();
            filter.room.timeline.limit = Some(INITIAL_TIMELINE_LIMIT.into());
            request.filter = Some(sync::Filter::FilterDefinition(filter));
        }
        request.since = since;
        let response = self
            .inner
            .http
            .send(&session.server_url, Some(&session.access_token), request, timeout + REQUEST_TIMEOUT)
            .await?;
        self.apply_sync(&session, response).await
    }

    /// Applies one `/sync` response: encryption first, then everything the cache keeps in one
    /// transaction with the next sync token, then tells subscribers what changed.
    async fn apply_sync(&self, session: &Session, response: sync::Response) -> Result<()> {
        // Encryption first: room keys in to-device messages must be in before the timeline
        // is decrypted.
        let (to_device, decrypted) = self.sync_crypto(session, &response).await?;
        let got_room_keys = carries_room_keys(&to_device);

        let mut effects = SyncEffects::default();
        let mut tx = self.store()?.begin().await?;
        apply_account_data(&mut tx, &response.account_data.events, &mut effects).await?;
        for (room_id, room) in &response.rooms.invite {
            self.apply_invited_room(&mut tx, session, room_id, room).await?;
            effects.rooms_changed = true;
        }
        for (room_id, room) in &response.rooms.join {
            self.apply_joined_room(&mut tx, session, room_id, room, &decrypted, &mut effects).await?;
        }
        for room_id in response.rooms.leave.keys() {
            Store::upsert_room(&mut tx, room_id.as_str(), Membership::Left, None).await?;
            effects.rooms_changed = true;
        }
        apply_presence(&mut tx, &response.presence.events, &mut effects).await?;
        Store::set_sync_token(&mut tx, &response.next_batch).await?;
        tx.commit().await?;

        if got_room_keys {
            effects.changed_items.extend(self.retry_decryption().await?);
        }
        self.emit_sync_effects(effects).await
    }

    /// An invited room: its stripped state, and who invited us (and whether as a direct chat).
    async fn apply_invited_room(
        &self,
        tx: &mut sqlx::SqliteConnection,
        session: &Session,
        room_id: &RoomId,
        room: &sync::InvitedRoom,
    ) -> Result<()> {
        let me = session.user_id.as_str();
        Store::upsert_room(tx, room_id.as_str(), Membership::Invited, None).await?;
        for event in &room.invite_state.events {
            let event = raw_json(event);
            self.apply_state(tx, room_id, &event).await?;
            if event["type"] == "m.room.member" && event["state_key"] == me {
                Store::upsert_room(tx, room_id.as_str(), Membership::Invited, event["sender"].as_str()).await?;
                if event["content"]["is_direct"] == true {
                    Store::set_room_direct(tx, room_id.as_str(), true).await?;
                }
            }
        }
        Ok(())
    }

    /// A joined room: its state, its timeline (with the events `sync_crypto` decrypted, keyed
    /// by room and timeline index) and its ephemeral events.
    async fn apply_joined_room(
        &self,
        tx: &mut sqlx::SqliteConnection,
        session: &Session,
        room_id: &OwnedRoomId,
        room: &sync::JoinedRoom,
        decrypted: &BTreeMap<(OwnedRoomId, usize), Value>,
        effects: &mut SyncEffects,
    ) -> Result<()> {
        Store::upsert_room(tx, room_id.as_str(), Membership::Joined, None).await?;
        if let Some(prev_batch) = &room.timeline.prev_batch {
            Store::set_prev_batch_if_new(tx, room_id.as_str(), prev_batch).await?;
        }
        let State::Before(state) = &room.state else { unreachable!("we never ask for state_after") };
        for event in &state.events {
            self.apply_state(tx, room_id, &raw_json(event)).await?;
        }
        for (index, event) in room.timeline.events.iter().enumerate() {
            let event = raw_json(event);
            if event.get("state_key").is_some() {
                self.apply_state(tx, room_id, &event).await?;
            }
            let decrypted = decrypted.get(&(room_id.clone(), index));
            if let Some(key) = self.apply_timeline_event(tx, session, room_id, &event, decrypted).await? {
                effects.changed_items.push(key);
            }
        }
        self.apply_ephemeral(tx, session, room_id, &room.ephemeral.events, effects).await?;
        effects.rooms_changed = true;
        Ok(())
    }

    /// A joined room's typing notices (an update, not stored) and receipts (stored).
    async fn apply_ephemeral(
        &self,
        tx: &mut sqlx::SqliteConnection,
        session: &Session,
        room_id: &OwnedRoomId,
        events: &[Raw<AnySyncEphemeralRoomEvent>],
        effects: &mut SyncEffects,
    ) -> Result<()> {
        let me = session.user_id.as_str();
        for event in events {
            let event = raw_json(event);
            match event["type"].as_str() {
                Some("m.typing") => {
                    let user_ids = typing_users(&event["content"], me);
                    effects.updates.push(Update::Typing { room_id: room_id.clone(), user_ids });
                }
                Some("m.receipt") => {
                    effects.changed_items.extend(self.apply_receipts(tx, me, room_id, &event["content"]).await?);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// After the commit: the changed timeline items, the room list, then the other updates.
    async fn emit_sync_effects(&self, effects: SyncEffects) -> Result<()> {
        for key in effects.changed_items {
            if let Some(item) = self.store()?.item(&key).await? {
                self.emit(Update::Timeline { item });
            }
        }
        if effects.rooms_changed {
            self.emit(Update::RoomsChanged);
        }
        for update in effects.updates {
            self.emit(update);
        }
        self.emit_verification_changes().await;
        Ok(())
    }

    /// Feeds the machine the sync's encryption parts, sends what it asks for, and decrypts the
    /// joined rooms' encrypted timeline events (keyed by room and index in the timeline).
    async fn sync_crypto(
        &self,
        session: &Session,
        response: &sync::Response,
    ) -> Result<(Vec<ToDeviceEvent>, BTreeMap<(OwnedRoomId, usize), Value>)> {
        let changes = SyncChanges {
            to_device_events: response.to_device.events.clone(),
            changed: response.device_lists.changed.clone(),
            left: response.device_lists.left.clone(),
            one_time_keys_counts: response.device_one_time_keys_count.clone(),
            unused_fallback_key_types: response.device_unused_fallback_key_types.clone(),
        };
        let mut guard = self.inner.crypto.lock().await;
        let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
        let to_device = crypto.machine.receive_sync_changes(changes)?;
        for event in &to_device {
            let event = match event {
                ToDeviceEvent::Decrypted { event, .. } | ToDeviceEvent::PlainText(event) => event,
                ToDeviceEvent::UnableToDecrypt { error, .. } => {
                    tracing::warn!(%error, "undecryptable to-device message");
                    continue;
                }
            };
            // Remember who each verification is with (the machine keeps only the state).
            if event["type"].as_str().is_some_and(|t| t.starts_with("m.key.verification."))
                && let (Some(txn), Some(sender)) =
                    (event["content"]["transaction_id"].as_str(), event["sender"].as_str())
                && let Ok(sender) = OwnedUserId::try_from(sender)
            {
                let device = event["content"]["from_device"].as_str().map(str::to_owned);
                // Their device keys are needed to check their MAC at the end.
                crypto.machine.update_tracked_users([sender.clone()]);
                let mut ids = self.inner.verification_ids.lock().expect("verification ids");
                let entry = ids.entry(txn.to_owned()).or_insert((sender, None));
                if entry.1.is_none() {
                    entry.1 = device;
                }
            }
        }
        let mut decrypted = BTreeMap::new();
        for (room_id, room) in &response.rooms.join {
            for (index, event) in room.timeline.events.iter().enumerate() {
                let event = raw_json(event);
                if event["type"] != "m.room.encrypted" {
                    continue;
                }
                match crypto.machine.decrypt_room_event(room_id, &event) {
                    Ok(plain) => {
                        decrypted.insert((room_id.clone(), index), plain.event);
                    }
                    Err(e) => tracing::debug!(%e, room = %room_id, "cannot decrypt (yet)"),
                }
            }
        }
        // Key uploads, key queries for changed devices, verification messages.
        if let Err(e) = self.flush_crypto(session, crypto).await {
            tracing::warn!(%e, "sending encryption requests; retried on the next sync");
            crypto.save().await?;
        }
        Ok((to_device, decrypted))
    }

    /// Room state we keep: members (with display names), name, encryption.
    async fn apply_state(&self, tx: &mut sqlx::SqliteConnection, room_id: &RoomId, event: &Value) -> Result<()> {
        let content = &event["content"];
        match (event["type"].as_str(), event["state_key"].as_str()) {
            (Some("m.room.member"), Some(user)) => {
                let membership = content["membership"].as_str().unwrap_or("leave");
                Store::set_member(tx, room_id.as_str(), user, membership, content["displayname"].as_str()).await?;
            }
            (Some("m.room.name"), Some("")) => {
                Store::set_room_name(tx, room_id.as_str(), content["name"].as_str().filter(|n| !n.is_empty())).await?;
            }
            (Some("m.room.encryption"), Some("")) if content["algorithm"].is_string() => {
                Store::set_room_encryption(tx, room_id.as_str(), content).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Stores a timeline event; returns the key of the item it added or changed.
    async fn apply_timeline_event(
        &self,
        tx: &mut sqlx::SqliteConnection,
        session: &Session,
        room_id: &RoomId,
        event: &Value,
        decrypted: Option<&Value>,
    ) -> Result<Option<String>> {
        let (Some(event_id), Some(sender)) = (event["event_id"].as_str(), event["sender"].as_str()) else {
            return Ok(None);
        };
        let ts = event["origin_server_ts"].as_u64();
        // Our own message coming back: the item exists under its transaction id.
        if sender == session.user_id.as_str()
            && let Some(txn) = event["unsigned"]["transaction_id"].as_str()
            && Store::confirm_item(tx, txn, event_id, ts).await?
        {
            return Ok(Some(txn.to_owned()));
        }
        let encrypted = event["type"] == "m.room.encrypted";
        let Some(content) = event_content(event, decrypted) else { return Ok(None) };
        let inserted = Store::insert_item(
            tx,
            NewItem {
                room_id: room_id.as_str(),
                key: event_id,
                event_id: Some(event_id),
                sender,
                ts: ts.unwrap_or_else(now_ms),
                content: &content,
                encrypted,
                send_state: (sender == session.user_id.as_str()).then_some(&crate::SendState::Sent),
                raw: matches!(content, ItemContent::Undecryptable { .. }).then_some(event),
            },
        )
        .await?;
        Ok(inserted.then(|| event_id.to_owned()))
    }

    /// `m.receipt` content: others' read receipts turn our messages ✓✓; ours move our read
    /// marker (read on another device). Returns the items that changed.
    async fn apply_receipts(
        &self,
        tx: &mut sqlx::SqliteConnection,
        me: &str,
        room_id: &RoomId,
        content: &Value,
    ) -> Result<Vec<String>> {
        let mut changed = Vec::new();
        let Some(by_event) = content.as_object() else { return Ok(changed) };
        for (event_id, types) in by_event {
            for kind in ["m.read", "m.read.private"] {
                for user in types[kind].as_object().into_iter().flat_map(|users| users.keys()) {
                    if user == me {
                        Store::set_read_up_to(tx, room_id.as_str(), event_id).await?;
                    } else if kind == "m.read" {
                        Store::set_receipt(tx, room_id.as_str(), user, event_id).await?;
                        changed.extend(Store::mark_ours_read(tx, room_id.as_str(), me, event_id).await?);
                    }
                }
            }
        }
        Ok(changed)
    }

    /// Tries again to decrypt items whose key had not arrived; returns the ones that now
    /// decrypt.
    pub(crate) async fn retry_decryption(&self) -> Result<Vec<String>> {
        let pending = self.store()?.undecrypted().await?;
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let mut fixed = Vec::new();
        let mut guard = self.inner.crypto.lock().await;
        let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
        for (key, room, event) in pending {
            let Ok(room_id) = RoomId::parse(&room) else { continue };
            if let Ok(plain) = crypto.machine.decrypt_room_event(&room_id, &event)
                && let Some(content) = item_content(&plain.event)
            {
                self.store()?.replace_content(&key, &content).await?;
                fixed.push(key);
            }
        }
        crypto.save().await?;
        Ok(fixed)
    }
}

/// What applying one sync response changed, told to subscribers after the commit.
#[derive(Default)]
struct SyncEffects {
    /// Typing and presence updates, in the order the response gave them.
    updates: Vec<Update>,
    /// Keys of the timeline items added or changed.
    changed_items: Vec<String>,
    rooms_changed: bool,
}

/// Whether Olm brought room keys (new or forwarded): undecrypted items may decrypt now.
fn carries_room_keys(to_device: &[ToDeviceEvent]) -> bool {
    to_device.iter().any(|e| {
        matches!(e, ToDeviceEvent::Decrypted { event, .. }
            if matches!(event["type"].as_str(), Some("m.room_key" | "m.forwarded_room_key")))
    })
}

/// Global account data: `m.direct` says which rooms are direct chats.
async fn apply_account_data(
    tx: &mut sqlx::SqliteConnection,
    events: &[Raw<AnyGlobalAccountDataEvent>],
    effects: &mut SyncEffects,
) -> Result<()> {
    for event in events {
        let Some(rooms) = direct_rooms(&raw_json(event)) else { continue };
        for room in rooms {
            Store::upsert_room_if_missing(tx, &room).await?;
            Store::set_room_direct(tx, &room, true).await?;
        }
        effects.rooms_changed = true;
    }
    Ok(())
}

/// The rooms of an `m.direct` event (`None` for other account data).
fn direct_rooms(event: &Value) -> Option<Vec<String>> {
    if event["type"] != "m.direct" {
        return None;
    }
    let map = event["content"].as_object()?;
    Some(map.values().filter_map(Value::as_array).flatten().filter_map(Value::as_str).map(str::to_owned).collect())
}

/// Who is typing in an `m.typing` content, without us.
fn typing_users(content: &Value, me: &str) -> Vec<OwnedUserId> {
    content["user_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|u| *u != me)
        .filter_map(|u| u.try_into().ok())
        .collect()
}

/// Presence events: stored, and told as updates.
async fn apply_presence(
    tx: &mut sqlx::SqliteConnection,
    events: &[Raw<PresenceEvent>],
    effects: &mut SyncEffects,
) -> Result<()> {
    for event in events {
        let Some((user_id, presence)) = presence_of(&raw_json(event), now_ms()) else { continue };
        Store::set_presence(tx, user_id.as_str(), &presence).await?;
        effects.updates.push(Update::Presence { user_id, presence });
    }
    Ok(())
}

/// The user and presence an `m.presence` event tells (`now` turns `last_active_ago` into a
/// time); `None` without a valid sender.
fn presence_of(event: &Value, now: u64) -> Option<(OwnedUserId, PresenceInfo)> {
    let user_id = OwnedUserId::try_from(event["sender"].as_str()?).ok()?;
    let content = &event["content"];
    let presence = PresenceInfo {
        presence: match content["presence"].as_str() {
            Some("online") => Presence::Online,
            Some("unavailable") => Presence::Unavailable,
            _ => Presence::Offline,
        },
        status_msg: content["status_msg"].as_str().map(str::to_owned),
        last_active_ts: content["last_active_ago"].as_u64().map(|ago| now.saturating_sub(ago)),
        currently_active: content["currently_active"].as_bool().unwrap_or(false),
    };
    Some((user_id, presence))
}

/// An event as JSON (ruma's `Raw` keeps the original text; the `e2ee` crate and our cache
/// work on JSON values).
pub(crate) fn raw_json<T>(raw: &Raw<T>) -> Value {
    raw.deserialize_as_unchecked().unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn direct_rooms_come_from_m_direct_only() {
        let direct =
            json!({"type": "m.direct", "content": {"@a:x": ["!1:x", "!2:x"], "@b:x": ["!3:x", 4], "@c:x": "!4:x"}});
        assert_eq!(direct_rooms(&direct), Some(vec!["!1:x".to_owned(), "!2:x".to_owned(), "!3:x".to_owned()]));
        assert_eq!(direct_rooms(&json!({"type": "m.direct", "content": []})), None, "content is not a map");
        assert_eq!(direct_rooms(&json!({"type": "m.push_rules", "content": {"@a:x": ["!1:x"]}})), None);
    }

    #[test]
    fn typing_users_leave_us_and_invalid_ids_out() {
        let content = json!({"user_ids": ["@me:x", "@a:x", "not an id", 7]});
        assert_eq!(typing_users(&content, "@me:x"), vec![OwnedUserId::try_from("@a:x").unwrap()]);
        assert!(typing_users(&json!({}), "@me:x").is_empty());
    }

    #[test]
    fn presence_is_read_with_defaults_and_needs_a_sender() {
        let event = json!({"sender": "@a:x", "type": "m.presence", "content": {
            "presence": "unavailable", "status_msg": "away", "last_active_ago": 400, "currently_active": true}});
        let (user, presence) = presence_of(&event, 1_000).unwrap();
        assert_eq!(user.as_str(), "@a:x");
        assert_eq!(presence.presence, Presence::Unavailable);
        assert_eq!(presence.status_msg.as_deref(), Some("away"));
        assert_eq!(presence.last_active_ts, Some(600));
        assert!(presence.currently_active);
        // An unknown state reads as offline; nothing else is made up.
        let (_, bare) = presence_of(&json!({"sender": "@a:x", "content": {"presence": "busy"}}), 1_000).unwrap();
        assert_eq!(bare.presence, Presence::Offline);
        assert_eq!((bare.status_msg, bare.last_active_ts, bare.currently_active), (None, None, false));
        assert!(presence_of(&json!({"sender": "nobody", "content": {}}), 0).is_none());
        assert!(presence_of(&json!({"content": {}}), 0).is_none());
    }

    #[test]
    fn only_olm_delivered_room_keys_trigger_a_decryption_retry() {
        let decrypted = |kind: &str| ToDeviceEvent::Decrypted {
            event: json!({"type": kind, "content": {}}),
            sender_key: String::new(),
            sender_ed25519: String::new(),
        };
        assert!(carries_room_keys(&[decrypted("m.dummy"), decrypted("m.room_key")]));
        assert!(carries_room_keys(&[decrypted("m.forwarded_room_key")]));
        assert!(!carries_room_keys(&[decrypted("m.dummy")]));
        // A room key in the clear is not one.
        assert!(!carries_room_keys(&[ToDeviceEvent::PlainText(json!({"type": "m.room_key", "content": {}}))]));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Backoff::FIRST && delays[0] <= Backoff::FIRST.mul_f64(1.2));
        assert!(delays[1] >= Backoff::FIRST * 2);
        assert!(delays.iter().all(|d| *d <= Backoff::MAX.mul_f64(1.2)));
        assert!(delays[7] >= Backoff::MAX);
        backoff.reset();
        assert!(backoff.next_delay() <= Backoff::FIRST.mul_f64(1.2));
    }
}
