//! End-to-end encryption, server side: storing and relaying device keys, one-time and
//! fallback keys, cross-signing keys and signatures, to-device messages and key backups.
//! The server checks what it can (signatures by the keys it is given) and never holds a
//! private key.

use ruma::events::room::member::MembershipState;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, ServerName, UserId,
    api::federation::transactions::edu::{Edu, SigningKeyUpdateContent},
    encryption::CrossSigningKey,
    serde::{Base64, Raw},
    signatures::verify_json,
};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    Hub,
    cache::Cache,
    notifier::{Change, Sections},
};
use crate::{
    error::{Error, Result},
    store::{NewToDevice, ToDeviceRow},
};

/// Most to-device messages queued for one device; beyond it senders get 429.
pub const MAX_TO_DEVICE_QUEUE: i64 = 10_000;
/// Most to-device messages in one sync response.
pub const TO_DEVICE_PER_SYNC: i64 = 100;

fn canonical(value: &JsonValue) -> Result<CanonicalJsonObject> {
    match CanonicalJsonValue::try_from(value.clone()) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        Ok(_) => Err(Error::BadJson("Expected a JSON object".to_owned())),
        Err(e) => Err(Error::BadJson(format!("Not canonical JSON: {e}"))),
    }
}

/// Checks that `object` carries a valid signature of `signer` by the ed25519 key `key_id`
/// whose public half is `public_key` (unpadded base64).
pub fn check_signature(object: &JsonValue, signer: &str, key_id: &str, public_key: &str) -> Result<()> {
    let key = Base64::parse(public_key).map_err(|_| Error::InvalidParam(format!("{key_id} is not a base64 key")))?;
    let mut set = BTreeMap::new();
    set.insert(key_id.to_owned(), key);
    let mut map = BTreeMap::new();
    map.insert(signer.to_owned(), set);
    // ruma's verify_json wants keys for every entity that signed the object; only this
    // signer's signature is checked here, so the others (e.g. the owner's own signatures on
    // a master key that another user signs) are left out of the copy that is verified.
    let mut only_signer = object.clone();
    if let Some(signatures) = only_signer.get_mut("signatures").and_then(JsonValue::as_object_mut) {
        signatures.retain(|entity, _| entity == signer);
    }
    verify_json(&map, &canonical(&only_signer)?)
        .map_err(|e| Error::InvalidSignature(format!("Signature by {key_id} does not verify: {e}")))
}

/// Merges the `signatures` of `from` into `into`.
fn merge_signatures(into: &mut JsonValue, from: &JsonValue) {
    if let Some(sigs) = from["signatures"].as_object() {
        for (signer, keys) in sigs {
            if let Some(keys) = keys.as_object() {
                for (key_id, sig) in keys {
                    into["signatures"][signer][key_id] = sig.clone();
                }
            }
        }
    }
}

/// The only key of a cross-signing key object (`keys: {"ed25519:<pub>": "<pub>"}`).
fn single_key(key: &JsonValue) -> Option<(String, String)> {
    let keys = key["keys"].as_object()?;
    let (id, value) = keys.iter().next()?;
    Some((id.clone(), value.as_str()?.to_owned()))
}

/// One device's one-time key counts and unused fallback key algorithms, which every sync
/// response carries.
#[derive(Debug, Default)]
pub struct KeyCounts {
    pub one_time: Vec<(String, i64)>,
    pub unused_fallback: Vec<String>,
}

/// [`KeyCounts`] per device, read once and kept until keys are uploaded or claimed.
pub type KeyCountCache = Cache<(String, String), Arc<KeyCounts>>;

/// Devices whose counts are kept.
pub const MAX_CACHED_KEY_COUNTS: usize = 100_000;

/// End-to-end encryption keys and to-device messages of users and their devices.
pub struct Keys {
    hub: Hub,
    /// One-time and fallback key counts per device, as every sync reports them.
    counts: KeyCountCache,
}

impl Keys {
    pub fn new(hub: Hub) -> Self {
        Self { hub, counts: KeyCountCache::new(MAX_CACHED_KEY_COUNTS) }
    }

    /// The key counts of a device for a sync response.
    pub async fn counts(&self, user_id: &str, device_id: &str) -> Result<Arc<KeyCounts>> {
        let s = self.hub.services();
        let key = (user_id.to_owned(), device_id.to_owned());
        if let Some(hit) = self.counts.get(&key) {
            return Ok(hit);
        }
        let generation = self.counts.generation();
        let counts = Arc::new(KeyCounts {
            one_time: s.store.one_time_key_counts(user_id, device_id).await?,
            unused_fallback: s.store.unused_fallback_algorithms(user_id, device_id).await?,
        });
        self.counts.insert_if_unchanged(key, counts.clone(), generation);
        Ok(counts)
    }

    /// Positions a device-list change of `user_id` in the stream (syncs of users who share a
    /// room with them will list them in `device_lists.changed`).
    pub async fn announce_device_change(&self, user_id: &str) -> Result<()> {
        let s = self.hub.services();
        let changes = s.rooms.changes_of_user_and_rooms(user_id, Sections::DEVICE_LISTS).await?;
        let position = s.streams.allocate();
        s.store.record_device_list_change(user_id, position.position()).await?;
        position.commit_with(changes);
        Ok(())
    }

    /// Forgets the keys and queued messages of removed devices and announces the change.
    pub async fn devices_removed(&self, user_id: &str, device_ids: &[String]) -> Result<()> {
        let s = self.hub.services();
        for device_id in device_ids {
            s.store.delete_device_e2ee(user_id, device_id).await?;
            s.sliding_sync.forget_device(user_id, device_id);
            self.counts.forget(&(user_id.to_owned(), device_id.to_owned()));
        }
        if !device_ids.is_empty() {
            self.announce_device_change(user_id).await?;
            for device_id in device_ids {
                self.federate_device_change(user_id, device_id, None).await?;
            }
        }
        Ok(())
    }

    /// `POST /keys/upload`.
    pub async fn upload(
        &self,
        user_id: &UserId,
        device_id: &str,
        device_keys: Option<JsonValue>,
        one_time_keys: Vec<(String, JsonValue)>,
        fallback_keys: Vec<(String, JsonValue)>,
    ) -> Result<BTreeMap<String, i64>> {
        let s = self.hub.services();
        if let Some(keys) = device_keys {
            if keys["user_id"] != user_id.as_str() || keys["device_id"] != device_id {
                return Err(Error::InvalidParam("device_keys must be for this user and device".to_owned()));
            }
            let key_id = format!("ed25519:{device_id}");
            let public = keys["keys"][&key_id]
                .as_str()
                .ok_or_else(|| Error::InvalidParam(format!("device_keys has no {key_id} key")))?;
            check_signature(&keys, user_id.as_str(), &key_id, public)?;
            // Keep signatures other parties added (cross-signing) if the keys are unchanged.
            let mut stored = keys.clone();
            if let Some(old) = s.store.device_keys(user_id.as_str(), device_id).await? {
                let old: JsonValue = serde_json::from_str(&old).unwrap_or_default();
                if old["keys"] == keys["keys"] {
                    merge_signatures(&mut stored, &old);
                    merge_signatures(&mut stored, &keys);
                }
            }
            let changes = s.rooms.changes_of_user_and_rooms(user_id.as_str(), Sections::DEVICE_LISTS).await?;
            let position = s.streams.allocate();
            s.store.set_device_keys(user_id.as_str(), device_id, &stored.to_string(), position.position()).await?;
            position.commit_with(changes);
            self.federate_device_change(user_id.as_str(), device_id, Some(&stored)).await?;
        }
        let mut otks = Vec::new();
        for (key_id, key) in one_time_keys {
            let algorithm = key_id.split(':').next().unwrap_or_default().to_owned();
            otks.push((key_id, algorithm, key.to_string()));
        }
        if !otks.is_empty() && !s.store.add_one_time_keys(user_id.as_str(), device_id, &otks).await? {
            return Err(Error::InvalidParam(
                "A one-time key with this id was already uploaded with different content".to_owned(),
            ));
        }
        for (key_id, key) in fallback_keys {
            let algorithm = key_id.split(':').next().unwrap_or_default().to_owned();
            s.store.set_fallback_key(user_id.as_str(), device_id, &algorithm, &key_id, &key.to_string()).await?;
        }
        self.counts.forget(&(user_id.to_string(), device_id.to_owned()));
        Ok(self.counts(user_id.as_str(), device_id).await?.one_time.iter().cloned().collect())
    }

    /// Device keys of a user as `/keys/query` shows them (with the device display name).
    pub async fn query_device_keys(&self, user_id: &str, only: &[String]) -> Result<BTreeMap<String, JsonValue>> {
        let s = self.hub.services();
        let mut out = BTreeMap::new();
        for (device_id, json, display_name) in s.store.all_device_keys(user_id).await? {
            if !only.is_empty() && !only.contains(&device_id) {
                continue;
            }
            let mut keys: JsonValue = serde_json::from_str(&json).unwrap_or_default();
            if let Some(name) = display_name {
                keys["unsigned"] = json!({"device_display_name": name});
            }
            out.insert(device_id, keys);
        }
        Ok(out)
    }

    /// A cross-signing key, as stored.
    /// What anyone may learn of a local user's keys, for `/keys/query` from clients and from
    /// other servers alike: the requested devices' keys (all when `only` is empty), and the
    /// master and self-signing keys. The user-signing key is for its owner alone.
    pub async fn public_keys_of(&self, user_id: &str, only: &[String]) -> Result<PublicKeys> {
        Ok(PublicKeys {
            devices: self.query_device_keys(user_id, only).await?,
            master: self.cross_signing_key(user_id, "master").await?,
            self_signing: self.cross_signing_key(user_id, "self_signing").await?,
        })
    }

    pub async fn cross_signing_key(&self, user_id: &str, key_type: &str) -> Result<Option<JsonValue>> {
        let s = self.hub.services();
        Ok(s.store.cross_signing_key(user_id, key_type).await?.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// `POST /keys/claim`: one key per (user, device, algorithm), each handed out once.
    pub async fn claim(
        &self,
        wanted: Vec<(String, String, String)>,
    ) -> Result<BTreeMap<String, BTreeMap<String, Map<String, JsonValue>>>> {
        let s = self.hub.services();
        let mut out: BTreeMap<String, BTreeMap<String, Map<String, JsonValue>>> = BTreeMap::new();
        for (user_id, device_id, algorithm) in wanted {
            let claimed = s.store.claim_one_time_key(&user_id, &device_id, &algorithm).await?;
            self.counts.forget(&(user_id.clone(), device_id.clone()));
            if let Some((key_id, json)) = claimed {
                let key: JsonValue = serde_json::from_str(&json).unwrap_or_default();
                out.entry(user_id).or_default().entry(device_id).or_default().insert(key_id, key);
            }
        }
        Ok(out)
    }

    /// `POST /keys/device_signing/upload` (after UIA where needed).
    pub async fn upload_cross_signing(
        &self,
        user_id: &UserId,
        master: Option<JsonValue>,
        self_signing: Option<JsonValue>,
        user_signing: Option<JsonValue>,
    ) -> Result<()> {
        let s = self.hub.services();
        let owner = |key: &JsonValue, usage: &str| check_cross_signing_key(key, user_id, usage);
        let uploaded_master = master.is_some();
        let master = match master {
            Some(key) => {
                owner(&key, "master")?;
                Some(key)
            }
            None => self.cross_signing_key(user_id.as_str(), "master").await?,
        };
        let master_key = master.as_ref().and_then(single_key);
        for (key, usage) in [(&self_signing, "self_signing"), (&user_signing, "user_signing")] {
            if let Some(key) = key {
                owner(key, usage)?;
                let (master_id, master_public) =
                    master_key.clone().ok_or_else(|| Error::InvalidParam("Upload a master key first".to_owned()))?;
                check_signature(key, user_id.as_str(), &master_id, &master_public)?;
            }
        }
        if let Some(key) = &master {
            s.store.set_cross_signing_key(user_id.as_str(), "master", &key.to_string()).await?;
        }
        if let Some(key) = &self_signing {
            s.store.set_cross_signing_key(user_id.as_str(), "self_signing", &key.to_string()).await?;
        }
        if let Some(key) = &user_signing {
            s.store.set_cross_signing_key(user_id.as_str(), "user_signing", &key.to_string()).await?;
        }
        self.announce_device_change(user_id.as_str()).await?;
        // The user-signing key is for its owner alone: only the other two go to other servers.
        if uploaded_master || self_signing.is_some() {
            let master = if uploaded_master { master.as_ref() } else { None };
            self.federate_signing_key_update(user_id, master, self_signing.as_ref()).await?;
        }
        Ok(())
    }

    /// `POST /keys/signatures/upload`: signatures of our own devices and master key (by our
    /// self-signing or master key), or of other users' master keys (by our user-signing
    /// key). Returns failures by user and key id.
    pub async fn upload_signatures(
        &self,
        signer: &UserId,
        signed: Vec<(String, String, JsonValue)>,
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
        let mut failures: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for (user_id, key_id, object) in signed {
            let result = self.apply_signature(signer, &user_id, &key_id, &object).await;
            match result {
                Ok(()) => {
                    changed.insert(user_id);
                }
                Err(e) => {
                    failures.entry(user_id).or_default().insert(key_id, e.to_string());
                }
            }
        }
        for user in changed {
            self.announce_device_change(&user).await?;
        }
        Ok(failures)
    }

    async fn apply_signature(
        &self,
        signer: &UserId,
        target_user: &str,
        key_id: &str,
        object: &JsonValue,
    ) -> Result<()> {
        let s = self.hub.services();
        let signatures = object["signatures"][signer.as_str()].as_object().cloned().unwrap_or_default();
        if signatures.is_empty() {
            return Err(Error::InvalidParam("No signature by you".to_owned()));
        }
        if target_user == signer.as_str() {
            // One of our devices (signed by our self-signing key) or our master key (signed by
            // one of our devices).
            if let Some(json) = s.store.device_keys(target_user, key_id).await? {
                let mut stored: JsonValue = serde_json::from_str(&json).unwrap_or_default();
                let self_signing = self
                    .cross_signing_key(signer.as_str(), "self_signing")
                    .await?
                    .and_then(|k| single_key(&k))
                    .ok_or_else(|| Error::InvalidParam("You have no self-signing key".to_owned()))?;
                check_signature(object, signer.as_str(), &self_signing.0, &self_signing.1)?;
                if object["keys"] != stored["keys"] {
                    return Err(Error::InvalidParam("The signed device keys differ from the stored ones".to_owned()));
                }
                merge_signatures(&mut stored, object);
                s.store.replace_device_keys(target_user, key_id, &stored.to_string()).await?;
                return Ok(());
            }
            let mut master = self
                .cross_signing_key(signer.as_str(), "master")
                .await?
                .ok_or_else(|| Error::NotFound("Unknown key".to_owned()))?;
            if single_key(&master).map(|k| k.1) != Some(key_id.to_owned()) {
                return Err(Error::NotFound("Unknown key".to_owned()));
            }
            // Signed by one of our devices.
            let mut verified = false;
            for (sig_key_id, _) in &signatures {
                let Some(device_id) = sig_key_id.strip_prefix("ed25519:") else { continue };
                if let Some(json) = s.store.device_keys(signer.as_str(), device_id).await? {
                    let device: JsonValue = serde_json::from_str(&json).unwrap_or_default();
                    if let Some(public) = device["keys"][sig_key_id.as_str()].as_str() {
                        check_signature(object, signer.as_str(), sig_key_id, public)?;
                        verified = true;
                    }
                }
            }
            if !verified {
                return Err(Error::InvalidSignature("No signature by a known device".to_owned()));
            }
            merge_signatures(&mut master, object);
            s.store.set_cross_signing_key(signer.as_str(), "master", &master.to_string()).await?;
            return Ok(());
        }
        // Another user's master key, signed by our user-signing key.
        let mut master = self
            .cross_signing_key(target_user, "master")
            .await?
            .ok_or_else(|| Error::NotFound("Unknown key".to_owned()))?;
        if single_key(&master).map(|k| k.1) != Some(key_id.to_owned()) {
            return Err(Error::NotFound("Unknown key".to_owned()));
        }
        let user_signing = self
            .cross_signing_key(signer.as_str(), "user_signing")
            .await?
            .and_then(|k| single_key(&k))
            .ok_or_else(|| Error::InvalidParam("You have no user-signing key".to_owned()))?;
        check_signature(object, signer.as_str(), &user_signing.0, &user_signing.1)?;
        merge_signatures(&mut master, object);
        s.store.set_cross_signing_key(target_user, "master", &master.to_string()).await?;
        Ok(())
    }

    /// `PUT /sendToDevice/{type}/{txnId}`: queues messages for local devices (`*` = all of a
    /// user's devices). A retried transaction is accepted and not queued again.
    pub async fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &str,
        txn_id: &str,
        event_type: &str,
        messages: Vec<(String, String, JsonValue)>,
    ) -> Result<()> {
        let s = self.hub.services();
        let mut queued = Vec::new();
        // Other servers' users: one `m.direct_to_device` EDU per server.
        let mut remote: BTreeMap<String, serde_json::Map<String, JsonValue>> = BTreeMap::new();
        for (user_id, device, content) in messages {
            let Ok(user) = UserId::parse(user_id.as_str()) else { continue };
            if user.server_name() != s.settings.server_name {
                let users = remote.entry(user.server_name().to_string()).or_default();
                let devices = users.entry(user_id.clone()).or_insert_with(|| JsonValue::Object(Default::default()));
                devices[device.as_str()] = content;
                continue;
            }
            let devices: Vec<String> = if device == "*" {
                s.store.devices(&user_id).await?.into_iter().map(|d| d.device_id).collect()
            } else {
                vec![device]
            };
            for device_id in devices {
                if s.store.pending_to_device_count(&user_id, &device_id).await? >= MAX_TO_DEVICE_QUEUE {
                    return Err(Error::LimitExceeded { retry_after: std::time::Duration::from_secs(10) });
                }
                queued.push((user_id.clone(), device_id, content.to_string()));
            }
        }
        let rows: Vec<NewToDevice> =
            queued.iter().map(|(u, d, c)| NewToDevice { user_id: u, device_id: d, content: c.clone() }).collect();
        let recipients: std::collections::BTreeSet<&str> = queued.iter().map(|(u, _, _)| u.as_str()).collect();
        let changes = recipients
            .into_iter()
            .filter_map(|u| ruma::OwnedUserId::try_from(u).ok())
            .map(|u| Change::user(u, Sections::TO_DEVICE))
            .collect();
        let position = s.streams.allocate();
        let fresh = s
            .store
            .queue_to_device(sender.as_str(), sender_device, txn_id, event_type, &rows, position.position())
            .await?;
        if fresh {
            for (server, messages) in remote {
                let edu = serde_json::json!({"edu_type": "m.direct_to_device", "content": {
                    "sender": sender, "type": event_type,
                    // Unique per sender device and endpoint, as the transaction id is.
                    "message_id": format!("{sender_device}:{event_type}:{txn_id}"), "messages": messages,
                }});
                s.store.enqueue_edu(std::slice::from_ref(&server), position.position(), &edu.to_string()).await?;
                s.send_queue.wake(&[server]);
            }
        }
        position.commit_with(changes);
        Ok(())
    }

    /// Tells the servers that share a room with a local user that one of their devices
    /// changed (`m.device_list_update`; `keys` is `None` for a deleted device).
    pub async fn federate_device_change(&self, user_id: &str, device_id: &str, keys: Option<&JsonValue>) -> Result<()> {
        let s = self.hub.services();
        let servers = self.servers_sharing_a_room_with(user_id).await?;
        if servers.is_empty() {
            return Ok(());
        }
        let position = s.streams.allocate();
        let mut content = serde_json::json!({
            "user_id": user_id, "device_id": device_id, "stream_id": position.position(), "prev_id": [],
            "deleted": keys.is_none(),
        });
        if let Some(keys) = keys {
            content["keys"] = keys.clone();
        }
        let destinations: Vec<String> = servers.into_iter().collect();
        let edu = serde_json::json!({"edu_type": "m.device_list_update", "content": content});
        s.store.enqueue_edu(&destinations, position.position(), &edu.to_string()).await?;
        position.commit_with(Vec::new());
        s.send_queue.wake(&destinations);
        Ok(())
    }

    /// The other servers with a member joined to a room that `user_id` is joined to.
    async fn servers_sharing_a_room_with(&self, user_id: &str) -> Result<Vec<String>> {
        let s = self.hub.services();
        let mut servers = BTreeSet::new();
        for (room_id, membership) in s.rooms.of_user(user_id).await?.iter() {
            if *membership != MembershipState::Join {
                continue;
            }
            for member in s.store.room_members(room_id, &MembershipState::Join).await? {
                if let Ok(member) = UserId::parse(member.as_str())
                    && member.server_name() != s.settings.server_name
                {
                    servers.insert(member.server_name().to_string());
                }
            }
        }
        Ok(servers.into_iter().collect())
    }

    /// Tells the servers that share a room with a local user about their new master and / or
    /// self-signing key (`m.signing_key_update`).
    async fn federate_signing_key_update(
        &self,
        user_id: &UserId,
        master: Option<&JsonValue>,
        self_signing: Option<&JsonValue>,
    ) -> Result<()> {
        let s = self.hub.services();
        let destinations = self.servers_sharing_a_room_with(user_id.as_str()).await?;
        if destinations.is_empty() {
            return Ok(());
        }
        let raw = |key: Option<&JsonValue>| -> Result<Option<Raw<CrossSigningKey>>> {
            key.map(|k| {
                Raw::new(k)
                    .map(|raw| raw.cast_unchecked::<CrossSigningKey>())
                    .map_err(|e| Error::internal(e.to_string()))
            })
            .transpose()
        };
        let mut content = SigningKeyUpdateContent::new(user_id.to_owned());
        content.master_key = raw(master)?;
        content.self_signing_key = raw(self_signing)?;
        let edu = Edu::SigningKeyUpdate(content);
        let edu = serde_json::to_string(&edu).map_err(|e| Error::internal(e.to_string()))?;
        let position = s.streams.allocate();
        s.store.enqueue_edu(&destinations, position.position(), &edu).await?;
        position.commit_with(Vec::new());
        s.send_queue.wake(&destinations);
        Ok(())
    }

    /// An `m.signing_key_update` EDU from `origin`: the new master and / or self-signing key
    /// of one of its users, checked like a local upload (owner, usage, one key, the
    /// self-signing key signed by the master key) and stored, so `/keys/query` answers them
    /// even while that server is unreachable; local users who share a room with the user see
    /// them in `device_lists.changed`.
    pub async fn receive_signing_key_update(&self, origin: &ServerName, content: &JsonValue) -> Result<()> {
        let s = self.hub.services();
        let user = UserId::parse(content["user_id"].as_str().unwrap_or_default())
            .map_err(|e| Error::BadJson(format!("m.signing_key_update: {e}")))?;
        if user.server_name() != origin {
            return Err(Error::Forbidden(format!("{user} is not a user of {origin}")));
        }
        // Keys of users nobody here shares a room with are not kept.
        if s.rooms.of_user(user.as_str()).await?.iter().all(|(_, membership)| *membership != MembershipState::Join) {
            return Ok(());
        }
        let master = content.get("master_key").filter(|k| !k.is_null());
        let self_signing = content.get("self_signing_key").filter(|k| !k.is_null());
        if let Some(key) = master {
            check_cross_signing_key(key, &user, "master")?;
        }
        if let Some(key) = self_signing {
            check_cross_signing_key(key, &user, "self_signing")?;
            let signer = match master {
                Some(key) => Some(key.clone()),
                None => self.cross_signing_key(user.as_str(), "master").await?,
            };
            let (master_id, master_public) = signer
                .as_ref()
                .and_then(single_key)
                .ok_or_else(|| Error::InvalidParam(format!("No master key of {user} to check its self-signing key")))?;
            check_signature(key, user.as_str(), &master_id, &master_public)?;
        }
        if master.is_none() && self_signing.is_none() {
            return Ok(());
        }
        if let Some(key) = master {
            s.store.set_cross_signing_key(user.as_str(), "master", &key.to_string()).await?;
        }
        if let Some(key) = self_signing {
            s.store.set_cross_signing_key(user.as_str(), "self_signing", &key.to_string()).await?;
        }
        self.announce_device_change(user.as_str()).await
    }

    /// `GET /keys/changes`: the users whose devices changed between two stream positions,
    /// among those `user` shares a room with.
    pub async fn device_list_changes(&self, user: &UserId, from: i64, to: i64) -> Result<Vec<ruma::OwnedUserId>> {
        let changed = self.hub.services().store.device_list_changes_for(user.as_str(), from, to).await?;
        Ok(changed.into_iter().filter_map(|u| UserId::parse(u).ok()).collect())
    }

    /// To-device messages for a sync: acknowledges those before `since` and returns the next.
    pub async fn to_device_for_sync(
        &self,
        user_id: &str,
        device_id: &str,
        since: Option<i64>,
        upto: i64,
    ) -> Result<Vec<ToDeviceRow>> {
        let s = self.hub.services();
        if let Some(since) = since {
            s.store.ack_to_device(user_id, device_id, since).await?;
        }
        Ok(s.store.to_device_messages(user_id, device_id, upto, TO_DEVICE_PER_SYNC).await?)
    }
}

/// Checks that a cross-signing key belongs to `user_id`, has this `usage` and holds exactly
/// one key.
fn check_cross_signing_key(key: &JsonValue, user_id: &UserId, usage: &str) -> Result<()> {
    if key["user_id"] != user_id.as_str() {
        return Err(Error::InvalidParam(format!("The {usage} key must belong to {user_id}")));
    }
    if !key["usage"].as_array().is_some_and(|u| u.iter().any(|x| x == usage)) {
        return Err(Error::InvalidParam(format!("The {usage} key must have usage {usage}")));
    }
    if single_key(key).is_none() {
        return Err(Error::InvalidParam(format!("The {usage} key must hold exactly one key")));
    }
    Ok(())
}

/// A local user's keys as others see them (see [`Keys::public_keys_of`]).
pub struct PublicKeys {
    pub devices: BTreeMap<String, JsonValue>,
    pub master: Option<JsonValue>,
    pub self_signing: Option<JsonValue>,
}
