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

    async fn apply_sync(&self, session: &Session, response: sync::Response) -> Result<()> {
        let me = session.user_id.as_str();
        let mut updates = Vec::new();
        let mut changed_items = Vec::new();
        let mut rooms_changed = false;

        // Encryption first: room keys in to-device messages must be in before the timeline
        // is decrypted.
        let (to_device, decrypted) = self.sync_crypto(session, &response).await?;
        let got_room_keys = to_device.iter().any(|e| {
            matches!(e, ToDeviceEvent::Decrypted { event, .. }
                if matches!(event["type"].as_str(), Some("m.room_key" | "m.forwarded_room_key")))
        });

        let mut tx = self.store()?.begin().await?;

        // Global account data: m.direct says which rooms are direct chats.
        for event in &response.account_data.events {
            let event: Value = raw_json(event);
            if event["type"] == "m.direct"
                && let Some(map) = event["content"].as_object()
            {
                for room in map.values().filter_map(Value::as_array).flatten().filter_map(Value::as_str) {
                    Store::upsert_room_if_missing(&mut tx, room).await?;
                    Store::set_room_direct(&mut tx, room, true).await?;
                }
                rooms_changed = true;
            }
        }

        for (room_id, room) in &response.rooms.invite {
            Store::upsert_room(&mut tx, room_id.as_str(), Membership::Invited, None).await?;
            for event in &room.invite_state.events {
                let event = raw_json(event);
                self.apply_state(&mut tx, room_id, &event).await?;
                if event["type"] == "m.room.member" && event["state_key"] == me {
                    Store::upsert_room(&mut tx, room_id.as_str(), Membership::Invited, event["sender"].as_str())
                        .await?;
                    if event["content"]["is_direct"] == true {
                        Store::set_room_direct(&mut tx, room_id.as_str(), true).await?;
                    }
                }
            }
            rooms_changed = true;
        }

        for (room_id, room) in &response.rooms.join {
            Store::upsert_room(&mut tx, room_id.as_str(), Membership::Joined, None).await?;
            if let Some(prev_batch) = &room.timeline.prev_batch {
                Store::set_prev_batch_if_new(&mut tx, room_id.as_str(), prev_batch).await?;
            }
            let State::Before(state) = &room.state else { unreachable!("we never ask for state_after") };
            for event in &state.events {
                self.apply_state(&mut tx, room_id, &raw_json(event)).await?;
            }
            for (index, event) in room.timeline.events.iter().enumerate() {
                let event = raw_json(event);
                if event.get("state_key").is_some() {
                    self.apply_state(&mut tx, room_id, &event).await?;
                }
                let decrypted = decrypted.get(&(room_id.clone(), index));
                if let Some(key) = self.apply_timeline_event(&mut tx, session, room_id, &event, decrypted).await? {
                    changed_items.push(key);
                }
            }
            for event in &room.ephemeral.events {
                let event = raw_json(event);
                match event["type"].as_str() {
                    Some("m.typing") => {
                        let user_ids = event["content"]["user_ids"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .filter(|u| *u != me)
                            .filter_map(|u| u.try_into().ok())
                            .collect();
                        updates.push(Update::Typing { room_id: room_id.clone(), user_ids });
                    }
                    Some("m.receipt") => {
                        changed_items.extend(self.apply_receipts(&mut tx, me, room_id, &event["content"]).await?);
                    }
                    _ => {}
                }
            }
            rooms_changed = true;
        }

        for room_id in response.rooms.leave.keys() {
            Store::upsert_room(&mut tx, room_id.as_str(), Membership::Left, None).await?;
            rooms_changed = true;
        }

        for event in &response.presence.events {
            let event: Value = raw_json(event);
            let (Some(sender), content) = (event["sender"].as_str(), &event["content"]) else { continue };
            let Ok(user_id) = sender.try_into() else { continue };
            let presence = PresenceInfo {
                presence: match content["presence"].as_str() {
                    Some("online") => Presence::Online,
                    Some("unavailable") => Presence::Unavailable,
                    _ => Presence::Offline,
                },
                status_msg: content["status_msg"].as_str().map(str::to_owned),
                last_active_ts: content["last_active_ago"].as_u64().map(|ago| now_ms().saturating_sub(ago)),
                currently_active: content["currently_active"].as_bool().unwrap_or(false),
            };
            Store::set_presence(&mut tx, sender, &presence).await?;
            updates.push(Update::Presence { user_id, presence });
        }

        Store::set_sync_token(&mut tx, &response.next_batch).await?;
        tx.commit().await?;

        if got_room_keys {
            changed_items.extend(self.retry_decryption().await?);
        }
        for key in changed_items {
            if let Some(item) = self.store()?.item(&key).await? {
                self.emit(Update::Timeline { item });
            }
        }
        if rooms_changed {
            self.emit(Update::RoomsChanged);
        }
        for update in updates {
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
            to_device_events: response.to_device.events.iter().map(raw_json).collect(),
            changed: response.device_lists.changed.clone(),
            left: response.device_lists.left.clone(),
            one_time_keys_counts: response
                .device_one_time_keys_count
                .iter()
                .map(|(algorithm, count)| (algorithm.to_string(), u64::from(*count)))
                .collect(),
            unused_fallback_key_types: response
                .device_unused_fallback_key_types
                .as_ref()
                .map(|types| types.iter().map(ToString::to_string).collect()),
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

/// An event as JSON (ruma's `Raw` keeps the original text; the `e2ee` crate and our cache
/// work on JSON values).
pub(crate) fn raw_json<T>(raw: &Raw<T>) -> Value {
    raw.deserialize_as_unchecked().unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

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
