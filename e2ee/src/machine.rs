//! `OlmMachine`: the sans-I/O state machine a client drives.
//!
//! The caller feeds it `/sync` results ([`OlmMachine::receive_sync_changes`]), sends the
//! requests it asks for ([`OlmMachine::outgoing_requests`]) and reports their answers
//! ([`OlmMachine::mark_request_as_sent`]). Room messages go through
//! [`OlmMachine::share_room_key`] + [`OlmMachine::encrypt_room_event`] on the way out and
//! [`OlmMachine::decrypt_room_event`] on the way in. The shape follows matrix-sdk-crypto's
//! `OlmMachine`, so a client written against one reads naturally against the other.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
};

use ruma::{DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

use crate::{
    account::Account,
    devices::{Device, DeviceStore, KeysQueryOutcome},
    error::{Error, MegolmError, OlmError, RequestError, Result},
    megolm::{EncryptionSettings, GroupSessions, InboundSession, OutboundSession, Recipient},
    olm::{self, OlmSessions},
    types::{
        IncomingResponse, MEGOLM_V1, OLM_V1, OutgoingRequest, Request, SyncChanges, ToDeviceMessages, json_of, now_ms,
    },
    verification::Verifications,
};

/// How often a wedged session with one device may be replaced (the spec asks for rate
/// limiting so two devices cannot make each other create sessions in a loop).
const WEDGED_RECOVERY_INTERVAL_MS: u64 = 60 * 60 * 1000;
/// To-device messages per `sendToDevice` request (keeps request bodies well under limits).
const MAX_TO_DEVICE_MESSAGES: usize = 250;

/// What an in-flight request was for, to process its answer.
#[derive(Debug, Clone)]
enum InFlight {
    KeysUpload,
    KeysQuery(Vec<(OwnedUserId, u64)>),
    KeysClaim { recovery: bool },
    RoomKeyShare { room_id: OwnedRoomId, session_id: String, recipients: Vec<Recipient> },
    ToDevice,
    SignatureUpload,
    BackupKeys { sessions: Vec<(OwnedRoomId, String)> },
}

impl InFlight {
    /// Which answer this request takes (see [`IncomingResponse`]).
    fn answered_by(&self) -> &'static str {
        match self {
            InFlight::KeysUpload => "keys upload",
            InFlight::KeysQuery(_) => "keys query",
            InFlight::KeysClaim { .. } => "keys claim",
            InFlight::RoomKeyShare { .. } | InFlight::ToDevice => "to-device",
            InFlight::SignatureUpload => "signature upload",
            InFlight::BackupKeys { .. } => "key backup",
        }
    }
}

struct Pending {
    request: OutgoingRequest,
    kind: InFlight,
    /// Returned by `outgoing_requests` (others were returned by the call that made them).
    from_outgoing: bool,
    seq: u64,
}

/// A to-device event after decryption.
#[derive(Debug, Clone)]
pub enum ToDeviceEvent {
    /// Olm-decrypted and checked: the event, and the keys of the device that sent it.
    Decrypted { event: Value, sender_key: String, sender_ed25519: String },
    /// Sent unencrypted (for example a verification request).
    PlainText(Value),
    /// Could not be decrypted (the error says why).
    UnableToDecrypt { event: Value, error: String },
}

/// How far we trust the device that sent a room message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderTrust {
    /// We verified the device (SAS).
    Verified,
    /// The device is in the sender's device list, not verified.
    Unverified,
    /// We do not know (yet) which device holds the session's keys.
    UnknownDevice,
}

/// A decrypted room event.
#[derive(Debug, Clone)]
pub struct DecryptedRoomEvent {
    /// The plaintext event (`type`, `content`) with the encrypted event's `event_id`,
    /// `sender`, `origin_server_ts`, `room_id` and `unsigned`.
    pub event: Value,
    pub sender_key: String,
    pub sender_ed25519: String,
    pub sender_device: Option<OwnedDeviceId>,
    pub trust: SenderTrust,
    pub message_index: u32,
}

pub struct OlmMachine {
    pub(crate) account: Account,
    pub(crate) sessions: OlmSessions,
    pub(crate) devices: DeviceStore,
    pub(crate) groups: GroupSessions,
    pub(crate) verifications: Verifications,
    pub(crate) cross_signing: Option<crate::cross_signing::PrivateCrossSigningKeys>,
    pub(crate) backup: Option<crate::backup::BackupKey>,
    pub(crate) key_requests: crate::key_sharing::KeyRequests,
    /// Requests handed out and not yet answered, by request id.
    in_flight: BTreeMap<String, Pending>,
    /// Hands out requests in the order they were made: to-device messages of one flow (a
    /// verification's `mac` then `done`) must reach the other side in that order.
    next_seq: u64,
    /// Sender curve25519 key -> sender user, for wedged sessions awaiting a new session.
    pub(crate) pending_recovery: BTreeMap<String, OwnedUserId>,
    /// Sender curve25519 key -> when we last replaced a wedged session with it.
    pub(crate) recovered_at: HashMap<String, u64>,
    /// Requests made outside `outgoing_requests` (dummies, verification) waiting to be handed out.
    queued: Vec<(OutgoingRequest, InFlight)>,
    pub(crate) account_changed: bool,
}

impl OlmMachine {
    /// A new device: fresh identity keys. Our own user's devices are tracked from the start.
    pub fn new(user_id: OwnedUserId, device_id: OwnedDeviceId) -> Self {
        Self::from_parts(Account::new(user_id, device_id))
    }

    pub(crate) fn from_parts(account: Account) -> Self {
        let mut machine = Self {
            account,
            sessions: OlmSessions::default(),
            devices: DeviceStore::default(),
            groups: GroupSessions::default(),
            verifications: Verifications::default(),
            cross_signing: None,
            backup: None,
            key_requests: Default::default(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            pending_recovery: BTreeMap::new(),
            recovered_at: HashMap::new(),
            queued: Vec::new(),
            account_changed: true,
        };
        let own = machine.account.user_id.clone();
        machine.devices.track([own]);
        machine
    }

    pub fn user_id(&self) -> &UserId {
        &self.account.user_id
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.account.device_id
    }

    /// Our curve25519 identity key (unpadded base64).
    pub fn curve25519_key(&self) -> String {
        self.account.curve25519_key().to_base64()
    }

    /// Our ed25519 fingerprint key (unpadded base64).
    pub fn ed25519_key(&self) -> String {
        self.account.ed25519_key().to_base64()
    }

    /// Our signed device keys.
    pub fn device_keys(&self) -> Result<Value> {
        self.account.device_keys()
    }

    pub fn get_device(&self, user_id: &UserId, device_id: &str) -> Option<&Device> {
        self.devices.get(user_id, device_id)
    }

    pub fn user_devices(&self, user_id: &UserId) -> Vec<&Device> {
        self.devices.user_devices(user_id).collect()
    }

    /// Starts tracking these users' device lists (room members of encrypted rooms).
    pub fn update_tracked_users(&mut self, users: impl IntoIterator<Item = OwnedUserId>) {
        self.devices.track(users);
    }

    // ----- requests -----

    fn hand_out(&mut self, request: Request, kind: InFlight, from_outgoing: bool) -> OutgoingRequest {
        let request = OutgoingRequest::new(request);
        self.track_in_flight(request.clone(), kind, from_outgoing);
        request
    }

    fn track_in_flight(&mut self, request: OutgoingRequest, kind: InFlight, from_outgoing: bool) {
        self.next_seq += 1;
        let pending = Pending { request, kind, from_outgoing, seq: self.next_seq };
        self.in_flight.insert(pending.request.request_id.clone(), pending);
    }

    /// Requests to send now: key uploads, device list queries, one-time key claims for
    /// wedged sessions, and queued to-device messages. Requests not yet marked as sent are
    /// returned again (same id), so a failed send is simply retried.
    pub fn outgoing_requests(&mut self) -> Result<Vec<OutgoingRequest>> {
        let busy = |machine: &Self, f: fn(&InFlight) -> bool| machine.in_flight.values().any(|p| f(&p.kind));
        if !busy(self, |k| matches!(k, InFlight::KeysUpload))
            && let Some(upload) = self.account.keys_for_upload()?
        {
            self.account_changed = true;
            self.hand_out(Request::keys_upload(upload)?, InFlight::KeysUpload, true);
        }
        let querying: BTreeSet<OwnedUserId> = self
            .in_flight
            .values()
            .filter_map(|p| match &p.kind {
                InFlight::KeysQuery(users) => Some(users.iter().map(|(u, _)| u.clone())),
                _ => None,
            })
            .flatten()
            .collect();
        let stale: Vec<(OwnedUserId, u64)> =
            self.devices.stale_users().into_iter().filter(|(u, _)| !querying.contains(u)).collect();
        if !stale.is_empty() {
            let users: Vec<OwnedUserId> = stale.iter().map(|(u, _)| u.clone()).collect();
            self.hand_out(Request::keys_query(users), InFlight::KeysQuery(stale), true);
        }
        if !busy(self, |k| matches!(k, InFlight::KeysClaim { recovery: true }))
            && let Some(claim) = self.recovery_claim()
        {
            self.hand_out(claim, InFlight::KeysClaim { recovery: true }, true);
        }
        for (request, kind) in std::mem::take(&mut self.queued) {
            self.track_in_flight(request, kind, true);
        }
        let mut pending: Vec<&Pending> = self.in_flight.values().filter(|p| p.from_outgoing).collect();
        pending.sort_by_key(|p| p.seq);
        Ok(pending.into_iter().map(|p| p.request.clone()).collect())
    }

    /// The answer to a request we handed out: ruma's response type for it, or the JSON body
    /// of the 2xx answer.
    pub fn mark_request_as_sent<'a>(
        &mut self,
        request_id: &str,
        response: impl Into<IncomingResponse<'a>>,
    ) -> Result<()> {
        let response = response.into();
        let pending =
            self.in_flight.get(request_id).ok_or_else(|| RequestError::UnknownRequest(request_id.to_owned()))?;
        if let Some(answers) = response.answers()
            && answers != pending.kind.answered_by()
        {
            return Err(RequestError::WrongResponse {
                request_id: request_id.to_owned(),
                expected: pending.kind.answered_by(),
                got: answers,
            }
            .into());
        }
        let pending = self.in_flight.remove(request_id).expect("looked up above");
        let response = response_json(response);
        let response = response.as_ref();
        match pending.kind {
            InFlight::KeysUpload => {
                let counts = counts_of(&response["one_time_key_counts"]);
                self.account.mark_keys_as_published(&counts);
                self.account_changed = true;
            }
            InFlight::KeysQuery(queried) => {
                let outcome = self.devices.receive_keys_query(&queried, response);
                self.after_keys_query(&outcome);
            }
            InFlight::KeysClaim { recovery } => self.receive_keys_claim(response, recovery)?,
            InFlight::RoomKeyShare { room_id, session_id, recipients } => {
                if let Some(outbound) = self.groups.outbound.get_mut(&room_id)
                    && outbound.session_id() == session_id
                {
                    outbound.shared_with.extend(recipients);
                    self.groups.changed_outbound.insert(room_id);
                }
            }
            InFlight::BackupKeys { sessions } => {
                for key in sessions {
                    if let Some(session) = self.groups.inbound.get_mut(&key) {
                        session.backed_up = true;
                        self.groups.changed_inbound.insert(key);
                    }
                }
            }
            InFlight::ToDevice | InFlight::SignatureUpload => {}
        }
        Ok(())
    }

    /// Forgets an in-flight request that failed for good (it will not be returned again; the
    /// state it would have changed stays as it was, so e.g. a key upload is rebuilt).
    pub fn discard_request(&mut self, request_id: &str) {
        self.in_flight.remove(request_id);
    }

    fn after_keys_query(&mut self, outcome: &KeysQueryOutcome) {
        let own = self.account.user_id.clone();
        if let Some(me) = self.devices.get(&own, self.account.device_id.as_str())
            && (me.ed25519 != self.ed25519_key() || me.curve25519 != self.curve25519_key())
        {
            tracing::error!("the server lists other identity keys for this very device");
        }
        if !outcome.removed_devices.is_empty() {
            tracing::debug!(
                removed = outcome.removed_devices.len(),
                "devices removed; their rooms' keys rotate at the next share"
            );
        }
    }

    // ----- sync -----

    /// Takes in the encryption parts of a `/sync` response; returns its to-device events,
    /// decrypted where they were encrypted.
    pub fn receive_sync_changes(&mut self, changes: SyncChanges) -> Result<Vec<ToDeviceEvent>> {
        let counts: BTreeMap<String, u64> = changes
            .one_time_keys_counts
            .iter()
            .map(|(algorithm, count)| (algorithm.to_string(), u64::from(*count)))
            .collect();
        let fallback: Option<Vec<String>> =
            changes.unused_fallback_key_types.map(|types| types.iter().map(ToString::to_string).collect());
        self.account.update_key_counts(&counts, fallback.as_deref());
        self.devices.mark_changed(&changes.changed);
        self.devices.stop_tracking(&changes.left);
        let mut out = Vec::with_capacity(changes.to_device_events.len());
        for event in &changes.to_device_events {
            let processed = self.receive_to_device(json_of(event));
            if let Some(verification_event) = match &processed {
                ToDeviceEvent::Decrypted { event, .. } | ToDeviceEvent::PlainText(event) => Some(event.clone()),
                ToDeviceEvent::UnableToDecrypt { .. } => None,
            } && let Some(event_type) = verification_event["type"].as_str()
                && event_type.starts_with("m.key.verification.")
            {
                self.receive_verification_event(&verification_event);
            }
            out.push(processed);
        }
        Ok(out)
    }

    fn receive_to_device(&mut self, event: Value) -> ToDeviceEvent {
        if event["type"] != "m.room.encrypted" {
            if event["type"] == "m.room_key_request" {
                self.receive_key_request(&event);
            }
            if event["type"] == "m.room_key.withheld" {
                self.receive_withheld(&event);
            }
            return ToDeviceEvent::PlainText(event);
        }
        if event["content"]["algorithm"] != OLM_V1 {
            return ToDeviceEvent::UnableToDecrypt { event, error: "not an Olm message".into() };
        }
        let devices = &self.devices;
        let result = olm::decrypt(
            &mut self.account,
            &mut self.sessions,
            |user, key| devices.by_curve_key(user, key).cloned(),
            &event,
        );
        self.account_changed = true;
        match result {
            Ok(decrypted) => {
                let mut plain = decrypted.event.clone();
                if let Err(e) = self.handle_decrypted(&decrypted) {
                    return ToDeviceEvent::UnableToDecrypt { event, error: e.to_string() };
                }
                // The outer sender is authoritative (checked against the payload already).
                plain["sender"] = event["sender"].clone();
                ToDeviceEvent::Decrypted {
                    event: plain,
                    sender_key: decrypted.sender_key,
                    sender_ed25519: decrypted.sender_ed25519,
                }
            }
            Err((error, wedged)) => {
                if let (Some(wedged), Some(sender)) =
                    (wedged, event["sender"].as_str().and_then(|s| UserId::parse(s).ok()))
                {
                    self.note_wedged(wedged.sender_key, sender);
                }
                ToDeviceEvent::UnableToDecrypt { event, error: error.to_string() }
            }
        }
    }

    fn handle_decrypted(&mut self, decrypted: &olm::DecryptedOlm) -> Result<()> {
        if decrypted.event["type"] == "m.forwarded_room_key" {
            return self.receive_forwarded_room_key(decrypted);
        }
        if decrypted.event["type"] == "m.room_key" {
            let content = &decrypted.event["content"];
            if content["algorithm"] != MEGOLM_V1 {
                return Err(Error::malformed("m.room_key", "unsupported algorithm"));
            }
            let room_id: OwnedRoomId = content["room_id"]
                .as_str()
                .and_then(|r| RoomId::parse(r).ok())
                .ok_or_else(|| Error::malformed("m.room_key", "no valid room_id"))?;
            let session_key =
                content["session_key"].as_str().ok_or_else(|| Error::malformed("m.room_key", "no session_key"))?;
            let session =
                InboundSession::from_room_key(room_id, session_key, &decrypted.sender_key, &decrypted.sender_ed25519)?;
            if content["session_id"].as_str() != Some(session.inner.session_id().as_str()) {
                return Err(Error::malformed("m.room_key", "session_id does not match the session key"));
            }
            self.groups.add_inbound(session);
        }
        Ok(())
    }

    /// Remembers an `m.room_key.withheld` notice, to explain a missing key later.
    fn receive_withheld(&mut self, event: &Value) {
        let content = &event["content"];
        let (Some(sender), Some(room_id), Some(session_id), Some(code)) = (
            event["sender"].as_str().and_then(|s| UserId::parse(s).ok()),
            content["room_id"].as_str().and_then(|r| RoomId::parse(r).ok()),
            content["session_id"].as_str(),
            content["code"].as_str(),
        ) else {
            return;
        };
        let reason = content["reason"].as_str().unwrap_or_default().to_owned();
        self.groups.withheld.insert((room_id, session_id.to_owned()), (sender, code.to_owned(), reason));
    }

    fn note_wedged(&mut self, sender_key: String, sender: OwnedUserId) {
        let recently = self
            .recovered_at
            .get(&sender_key)
            .is_some_and(|t| now_ms().saturating_sub(*t) < WEDGED_RECOVERY_INTERVAL_MS);
        if !recently {
            // We may not know the device yet: make sure its list gets (re)queried.
            self.devices.track([sender.clone()]);
            if self.devices.by_curve_key(&sender, &sender_key).is_none() {
                self.devices.mark_changed(std::slice::from_ref(&sender));
            }
            self.pending_recovery.insert(sender_key, sender);
        }
    }

    fn recovery_claim(&mut self) -> Option<Request> {
        let mut one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, OneTimeKeyAlgorithm>> = BTreeMap::new();
        for (key, user) in &self.pending_recovery {
            if let Some(device) = self.devices.by_curve_key(user, key) {
                one_time_keys
                    .entry(user.clone())
                    .or_default()
                    .insert(device.device_id.clone(), OneTimeKeyAlgorithm::SignedCurve25519);
            }
        }
        (!one_time_keys.is_empty()).then(|| Request::keys_claim(one_time_keys))
    }

    fn receive_keys_claim(&mut self, response: &Value, recovery: bool) -> Result<()> {
        let Some(users) = response["one_time_keys"].as_object() else { return Ok(()) };
        for (user, devices) in users {
            let Ok(user_id) = UserId::parse(user.as_str()) else { continue };
            let Some(devices) = devices.as_object() else { continue };
            for (device_id, keys) in devices {
                let Some(device) = self.devices.get(&user_id, device_id).cloned() else { continue };
                let Some((_, claimed)) =
                    keys.as_object().and_then(|k| k.iter().find(|(id, _)| id.starts_with("signed_curve25519:")))
                else {
                    continue;
                };
                let session = match olm::session_from_claimed_key(&self.account, &device, claimed) {
                    Ok(session) => session,
                    Err(e) => {
                        tracing::warn!(%user_id, %device_id, error = %e, "refusing a claimed one-time key");
                        continue;
                    }
                };
                self.sessions.add(&device.curve25519, session);
                if recovery && self.pending_recovery.remove(&device.curve25519).is_some() {
                    // The new session is the newest, so it is the one the dummy goes out on;
                    // the other side learns it from this pre-key message.
                    self.recovered_at.insert(device.curve25519.clone(), now_ms());
                    let content = olm::encrypt(&self.account, &mut self.sessions, &device, "m.dummy", json!({}))?;
                    self.queue_to_device("m.room.encrypted", &device, content);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn queue_to_device(&mut self, event_type: &str, device: &Device, content: Value) {
        let messages: ToDeviceMessages =
            BTreeMap::from([(device.user_id.clone(), BTreeMap::from([(device.device_id.to_string(), content)]))]);
        let request = OutgoingRequest::new(Request::to_device(event_type, messages));
        self.queued.push((request, InFlight::ToDevice));
    }

    /// Olm-encrypts a to-device event for one device (which needs an Olm session) and queues it.
    pub fn send_encrypted_to_device(
        &mut self,
        user_id: &UserId,
        device_id: &str,
        event_type: &str,
        content: Value,
    ) -> Result<()> {
        let device = self.devices.get(user_id, device_id).cloned().ok_or_else(|| OlmError::MissingSession {
            user_id: user_id.to_string(),
            device_id: device_id.to_owned(),
        })?;
        let encrypted = olm::encrypt(&self.account, &mut self.sessions, &device, event_type, content)?;
        self.queue_to_device("m.room.encrypted", &device, encrypted);
        Ok(())
    }

    // ----- rooms -----

    /// Every device of these users, except this one.
    fn devices_of(&self, users: &[OwnedUserId]) -> Vec<Device> {
        users
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .flat_map(|u| self.devices.user_devices(u))
            .filter(|d| !(d.user_id == self.account.user_id && d.device_id == self.account.device_id))
            .filter(|d| d.algorithms.is_empty() || d.algorithms.iter().any(|a| a == OLM_V1))
            .cloned()
            .collect()
    }

    /// A `/keys/claim` for every device of these users we have no Olm session with, or `None`.
    /// Send it (and mark it as sent) before `share_room_key`.
    pub fn get_missing_sessions(&mut self, users: &[OwnedUserId]) -> Option<OutgoingRequest> {
        let mut one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, OneTimeKeyAlgorithm>> = BTreeMap::new();
        for device in self.devices_of(users) {
            if !self.sessions.has_session(&device.curve25519) {
                one_time_keys
                    .entry(device.user_id.clone())
                    .or_default()
                    .insert(device.device_id.clone(), OneTimeKeyAlgorithm::SignedCurve25519);
            }
        }
        (!one_time_keys.is_empty())
            .then(|| self.hand_out(Request::keys_claim(one_time_keys), InFlight::KeysClaim { recovery: false }, false))
    }

    /// Makes sure every device of every member has the room's current Megolm key; returns the
    /// to-device requests to send. Rotates first when the session is past the room's rotation
    /// settings, or when a device that had the key is no longer among the recipients (a member
    /// left, or a device was removed).
    pub fn share_room_key(
        &mut self,
        room_id: &RoomId,
        members: &[OwnedUserId],
        settings: EncryptionSettings,
    ) -> Result<Vec<OutgoingRequest>> {
        let room_id = room_id.to_owned();
        let devices = self.devices_of(members);
        let recipients: BTreeSet<Recipient> = devices.iter().map(Recipient::of).collect();
        self.rotate_if_needed(&room_id, settings, &recipients)?;
        let outbound = &self.groups.outbound[&room_id];
        let session_id = outbound.session_id();
        let room_key = outbound.room_key_content();
        let already_withheld = outbound.withheld.clone();
        let to_share = self.not_yet_shared(&room_id, &session_id, devices);

        let mut withheld = Vec::new();
        let mut requests = Vec::new();
        for chunk in to_share.chunks(MAX_TO_DEVICE_MESSAGES) {
            let (messages, chunk_recipients) =
                self.encrypt_room_key_for(chunk, &room_key, &already_withheld, &mut withheld)?;
            if messages.is_empty() {
                continue;
            }
            let kind = InFlight::RoomKeyShare {
                room_id: room_id.clone(),
                session_id: session_id.clone(),
                recipients: chunk_recipients,
            };
            requests.push(self.hand_out(Request::to_device("m.room.encrypted", messages), kind, false));
        }
        if !withheld.is_empty() {
            requests.push(self.withheld_request(&room_id, &session_id, &withheld));
            if let Some(outbound) = self.groups.outbound.get_mut(&room_id) {
                outbound.withheld.extend(withheld);
                self.groups.changed_outbound.insert(room_id.clone());
            }
        }
        Ok(requests)
    }

    /// A new outbound session when there is none, it is past the room's rotation settings, or
    /// a device that had the key is no longer among the recipients.
    fn rotate_if_needed(
        &mut self,
        room_id: &OwnedRoomId,
        settings: EncryptionSettings,
        recipients: &BTreeSet<Recipient>,
    ) -> Result<()> {
        let rotate = match self.groups.outbound.get(room_id) {
            None => true,
            Some(s) => s.expired() || s.settings != settings || !s.shared_with.is_subset(recipients),
        };
        if rotate {
            self.create_outbound_session(room_id, settings)?;
        }
        Ok(())
    }

    /// The devices that have neither the room's current key nor a share of it in flight.
    fn not_yet_shared(
        &self,
        room_id: &OwnedRoomId,
        session_id: &str,
        devices: Vec<Device>,
    ) -> Vec<(Device, Recipient)> {
        let outbound = &self.groups.outbound[room_id];
        let pending: BTreeSet<&Recipient> = self
            .in_flight
            .values()
            .filter_map(|p| match &p.kind {
                InFlight::RoomKeyShare { session_id: s, recipients, .. } if s == session_id => Some(recipients.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        devices
            .into_iter()
            .map(|d| {
                let r = Recipient::of(&d);
                (d, r)
            })
            .filter(|(_, r)| !outbound.shared_with.contains(r) && !pending.contains(r))
            .collect()
    }

    /// The room key Olm-encrypted for each device of `chunk` that we have a session with; the
    /// others go to `withheld` (once).
    fn encrypt_room_key_for(
        &mut self,
        chunk: &[(Device, Recipient)],
        room_key: &Value,
        already_withheld: &BTreeSet<Recipient>,
        withheld: &mut Vec<Recipient>,
    ) -> Result<(ToDeviceMessages, Vec<Recipient>)> {
        let mut messages = ToDeviceMessages::new();
        let mut recipients = Vec::new();
        for (device, recipient) in chunk {
            match olm::encrypt(&self.account, &mut self.sessions, device, "m.room_key", room_key.clone()) {
                Ok(content) => {
                    messages.entry(device.user_id.clone()).or_default().insert(device.device_id.to_string(), content);
                    recipients.push(recipient.clone());
                }
                // No Olm session (no one-time key could be claimed): it cannot get the key,
                // and is told so once, so it can explain the missing key to its user.
                Err(Error::Olm(OlmError::MissingSession { .. })) => {
                    tracing::debug!(user = %device.user_id, device = %device.device_id, "no Olm session; room key withheld");
                    if !already_withheld.contains(recipient) {
                        withheld.push(recipient.clone());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok((messages, recipients))
    }

    /// `m.room_key.withheld` with code `m.no_olm` for devices we could not reach.
    fn withheld_request(
        &mut self,
        room_id: &OwnedRoomId,
        session_id: &str,
        recipients: &[Recipient],
    ) -> OutgoingRequest {
        let content = json!({
            "algorithm": MEGOLM_V1,
            "room_id": room_id,
            "session_id": session_id,
            "sender_key": self.curve25519_key(),
            "from_device": self.device_id(),
            "code": "m.no_olm",
            "reason": "Unable to establish a secure channel.",
        });
        let mut messages = ToDeviceMessages::new();
        for r in recipients {
            messages.entry(r.user_id.clone()).or_default().insert(r.device_id.to_string(), content.clone());
        }
        self.hand_out(Request::to_device("m.room_key.withheld", messages), InFlight::ToDevice, false)
    }

    fn create_outbound_session(&mut self, room_id: &OwnedRoomId, settings: EncryptionSettings) -> Result<()> {
        let outbound = OutboundSession::new(room_id.clone(), settings);
        // Our own inbound copy, so we can read our own messages (and back the key up).
        let inbound = InboundSession::from_room_key(
            room_id.clone(),
            &outbound.inner.session_key().to_base64(),
            &self.curve25519_key(),
            &self.ed25519_key(),
        )?;
        self.groups.add_inbound(inbound);
        self.groups.outbound.insert(room_id.clone(), outbound);
        self.groups.changed_outbound.insert(room_id.clone());
        Ok(())
    }

    /// Drops the room's outbound session: the next `share_room_key` starts a new one.
    pub fn discard_room_key(&mut self, room_id: &RoomId) {
        if self.groups.outbound.remove(room_id).is_some() {
            self.groups.changed_outbound.insert(room_id.to_owned());
        }
    }

    /// Encrypts a room event with the room's Megolm session: the `m.room.encrypted` content
    /// to send. Call `share_room_key` first.
    pub fn encrypt_room_event(&mut self, room_id: &RoomId, event_type: &str, content: Value) -> Result<Value> {
        let curve = self.curve25519_key();
        self.groups.encrypt(&room_id.to_owned(), &curve, self.account.device_id.as_str(), event_type, content)
    }

    /// Decrypts an `m.room.encrypted` room event (the whole event as `/sync` gives it).
    pub fn decrypt_room_event(&mut self, room_id: &RoomId, event: &Value) -> Result<DecryptedRoomEvent> {
        let content = &event["content"];
        if content["algorithm"] != MEGOLM_V1 {
            return Err(Error::malformed("room event", "not a Megolm message"));
        }
        let sender = event["sender"]
            .as_str()
            .and_then(|s| UserId::parse(s).ok())
            .ok_or_else(|| Error::malformed("room event", "no valid sender"))?;
        let event_id = event["event_id"].as_str().ok_or_else(|| Error::malformed("room event", "no event_id"))?;
        let ts =
            event["origin_server_ts"].as_u64().ok_or_else(|| Error::malformed("room event", "no origin_server_ts"))?;
        let room = room_id.to_owned();
        let (payload, index, info) = match self.groups.decrypt(&room, content) {
            Err(Error::Megolm(MegolmError::UnknownSession { room_id, session_id })) => {
                return Err(match self.groups.withheld.get(&(room.clone(), session_id.clone())) {
                    Some((by, code, reason)) if *by == sender => {
                        MegolmError::Withheld { code: code.clone(), reason: reason.clone() }
                    }
                    _ => MegolmError::UnknownSession { room_id, session_id },
                }
                .into());
            }
            other => other?,
        };
        if payload["room_id"].as_str() != Some(room_id.as_str()) {
            return Err(MegolmError::RoomMismatch {
                claimed: payload["room_id"].as_str().unwrap_or_default().to_owned(),
                actual: room_id.to_string(),
            }
            .into());
        }
        let (sender_device, trust) = self.sender_trust(&sender, &info.sender_key, &info.signing_key)?;
        // Only a message that passed every other check may claim its index: a forged one
        // must not block the genuine event.
        self.groups.replay.check(&info.session_id, index, event_id, ts)?;
        let mut decrypted = json!({
            "type": payload["type"],
            "content": payload["content"],
            "event_id": event_id,
            "sender": sender,
            "origin_server_ts": ts,
            "room_id": room_id,
        });
        if let Some(unsigned) = event.get("unsigned") {
            decrypted["unsigned"] = unsigned.clone();
        }
        Ok(DecryptedRoomEvent {
            event: decrypted,
            sender_key: info.sender_key,
            sender_ed25519: info.signing_key,
            sender_device,
            trust,
            message_index: index,
        })
    }

    /// Which device of `sender` holds the session's keys, and how far we trust it; an error
    /// when the keys belong to another user's device or to another signing key.
    fn sender_trust(
        &self,
        sender: &UserId,
        sender_key: &str,
        signing_key: &str,
    ) -> Result<(Option<OwnedDeviceId>, SenderTrust)> {
        let mismatch = |owner: &UserId| -> Error {
            MegolmError::SenderMismatch { owner: owner.to_string(), sender: sender.to_string() }.into()
        };
        Ok(match self.devices.owner_of_curve_key(sender_key) {
            Some(device) if device.user_id != sender => return Err(mismatch(&device.user_id)),
            Some(device) if device.ed25519 != signing_key => return Err(mismatch(&device.user_id)),
            Some(device) => {
                let ours = device.user_id == self.account.user_id && device.device_id == self.account.device_id;
                let trust = if ours || device.locally_verified || self.is_cross_signed_by_us(device) {
                    SenderTrust::Verified
                } else {
                    SenderTrust::Unverified
                };
                (Some(device.device_id.clone()), trust)
            }
            None if sender_key == self.curve25519_key() && sender == self.account.user_id => {
                (Some(self.account.device_id.clone()), SenderTrust::Verified)
            }
            None => (None, SenderTrust::UnknownDevice),
        })
    }

    // ----- for the other modules -----

    pub(crate) fn hand_out_signature_upload(&mut self, body: Value) -> Result<OutgoingRequest> {
        Ok(self.hand_out(Request::signature_upload(&body)?, InFlight::SignatureUpload, false))
    }

    pub(crate) fn hand_out_backup(
        &mut self,
        version: String,
        rooms: Value,
        sessions: Vec<(OwnedRoomId, String)>,
    ) -> Result<OutgoingRequest> {
        Ok(self.hand_out(Request::backup_keys(version, &rooms)?, InFlight::BackupKeys { sessions }, false))
    }

    pub(crate) fn queue_plain_to_device(
        &mut self,
        event_type: &str,
        user_id: &UserId,
        device_id: &str,
        content: Value,
    ) {
        let messages: ToDeviceMessages =
            BTreeMap::from([(user_id.to_owned(), BTreeMap::from([(device_id.to_owned(), content)]))]);
        let request = OutgoingRequest::new(Request::to_device(event_type, messages));
        self.queued.push((request, InFlight::ToDevice));
    }
}

/// A typed answer as the JSON the server sent: the device store checks signatures over that
/// JSON (`Raw` keeps it as received), and a JSON answer is read leniently as it always was.
fn response_json(response: IncomingResponse<'_>) -> Cow<'_, Value> {
    Cow::Owned(match response {
        IncomingResponse::Json(body) => return Cow::Borrowed(body),
        IncomingResponse::KeysUpload(r) => json!({ "one_time_key_counts": r.one_time_key_counts }),
        IncomingResponse::KeysQuery(r) => json!({
            "failures": r.failures,
            "device_keys": r.device_keys,
            "master_keys": r.master_keys,
            "self_signing_keys": r.self_signing_keys,
            "user_signing_keys": r.user_signing_keys,
        }),
        IncomingResponse::KeysClaim(r) => json!({ "failures": r.failures, "one_time_keys": r.one_time_keys }),
        IncomingResponse::ToDevice(_) | IncomingResponse::SignatureUpload(_) | IncomingResponse::BackupKeys(_) => {
            json!({})
        }
    })
}

fn counts_of(value: &Value) -> BTreeMap<String, u64> {
    value
        .as_object()
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
        .unwrap_or_default()
}
