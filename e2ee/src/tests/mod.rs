//! Machine-level tests: several `OlmMachine`s talking through a minimal in-memory stand-in for
//! the homeserver's key and to-device endpoints (just enough routing to exercise the
//! machines; the real server is exercised by the conformance suite).

mod flows;

use std::collections::BTreeMap;

use ruma::{OneTimeKeyAlgorithm, OwnedUserId, UInt, UserId};
use serde_json::{Value, json};

use crate::{
    OlmMachine, OutgoingRequest, Request, SyncChanges, ToDeviceEvent,
    types::{json_of, raw},
};

#[derive(Default)]
pub(crate) struct FakeServer {
    device_keys: BTreeMap<String, BTreeMap<String, Value>>,
    pub one_time_keys: BTreeMap<(String, String), BTreeMap<String, Value>>,
    pub fallback_keys: BTreeMap<(String, String), BTreeMap<String, Value>>,
    inbox: BTreeMap<(String, String), Vec<Value>>,
    changed: Vec<OwnedUserId>,
}

impl FakeServer {
    /// Answers one request from `machine` the way the homeserver would.
    pub fn answer(&mut self, machine: &OlmMachine, request: &OutgoingRequest) -> Value {
        let me = (machine.user_id().to_string(), machine.device_id().to_string());
        let body = request.body();
        match &request.request {
            Request::KeysUpload(_) => {
                if let Some(keys) = body.get("device_keys") {
                    self.device_keys.entry(me.0.clone()).or_default().insert(me.1.clone(), keys.clone());
                    self.changed.push(machine.user_id().to_owned());
                }
                if let Some(otks) = body["one_time_keys"].as_object() {
                    let slot = self.one_time_keys.entry(me.clone()).or_default();
                    slot.extend(otks.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                if let Some(fallback) = body["fallback_keys"].as_object() {
                    let slot = self.fallback_keys.entry(me.clone()).or_default();
                    slot.clear();
                    slot.extend(fallback.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                json!({"one_time_key_counts": {"signed_curve25519": self.otk_count(&me)}})
            }
            Request::KeysQuery(query) => {
                let mut device_keys = json!({});
                for user in query.device_keys.keys() {
                    device_keys[user.as_str()] =
                        json!(self.device_keys.get(user.as_str()).cloned().unwrap_or_default());
                }
                json!({"device_keys": device_keys, "failures": {}})
            }
            Request::KeysClaim(claim) => {
                let mut out = json!({});
                for (user, devices) in &claim.one_time_keys {
                    for device in devices.keys() {
                        let slot = (user.to_string(), device.to_string());
                        let key = self.one_time_keys.get_mut(&slot).and_then(|keys| keys.pop_first()).or_else(|| {
                            self.fallback_keys
                                .get(&slot)
                                .and_then(|k| k.first_key_value().map(|(a, b)| (a.clone(), b.clone())))
                        });
                        if let Some((id, key)) = key {
                            out[user.as_str()][device.as_str()] = json!({ id: key });
                        }
                    }
                }
                json!({"one_time_keys": out, "failures": {}})
            }
            Request::ToDevice(to_device) => {
                for (user, devices) in &to_device.messages {
                    for (device, content) in devices {
                        let device = device.to_string();
                        let event = json!({"type": to_device.event_type.to_string(), "sender": me.0, "content": json_of(content)});
                        let targets: Vec<String> = if device == "*" {
                            self.device_keys.get(user.as_str()).map(|d| d.keys().cloned().collect()).unwrap_or_default()
                        } else {
                            vec![device]
                        };
                        for target in targets {
                            self.inbox.entry((user.to_string(), target)).or_default().push(event.clone());
                        }
                    }
                }
                json!({})
            }
            Request::SignatureUpload(_) | Request::BackupKeys(_) => json!({}),
        }
    }

    fn otk_count(&self, slot: &(String, String)) -> usize {
        self.one_time_keys.get(slot).map_or(0, BTreeMap::len)
    }

    /// Sends everything `machine` wants sent, until it has nothing more.
    pub fn flush(&mut self, machine: &mut OlmMachine) {
        for _ in 0..5 {
            let requests = machine.outgoing_requests().unwrap();
            if requests.is_empty() {
                return;
            }
            for request in requests {
                let response = self.answer(machine, &request);
                machine.mark_request_as_sent(&request.request_id, &response).unwrap();
            }
        }
    }

    /// Sends a request made outside `outgoing_requests` (claims, room key shares).
    pub fn send(&mut self, machine: &mut OlmMachine, request: &OutgoingRequest) {
        let response = self.answer(machine, request);
        machine.mark_request_as_sent(&request.request_id, &response).unwrap();
    }

    /// A `/sync` for `machine`: its to-device inbox, device list changes, key counts.
    pub fn sync(&mut self, machine: &mut OlmMachine) -> Vec<ToDeviceEvent> {
        let me = (machine.user_id().to_string(), machine.device_id().to_string());
        let changes = SyncChanges {
            to_device_events: self.inbox.remove(&me).unwrap_or_default().iter().map(raw).collect(),
            changed: self.changed.clone(),
            left: vec![],
            one_time_keys_counts: BTreeMap::from([(
                OneTimeKeyAlgorithm::SignedCurve25519,
                UInt::try_from(self.otk_count(&me)).expect("a small count"),
            )]),
            unused_fallback_key_types: Some(vec![OneTimeKeyAlgorithm::SignedCurve25519]),
        };
        let out = machine.receive_sync_changes(changes).unwrap();
        self.flush(machine);
        out
    }

    pub fn remove_device(&mut self, user: &UserId, device: &str) {
        if let Some(devices) = self.device_keys.get_mut(user.as_str()) {
            devices.remove(device);
        }
        self.changed.push(user.to_owned());
    }
}
