//! Other devices' keys, learnt from `/keys/query`, and which users' lists are out of date.
//!
//! A device is accepted only with a valid self-signature, and once known its identity keys
//! may not change: a server (or anyone in the middle) swapping keys under a known device id
//! is exactly the attack the signatures exist to stop, so such an update is refused and the
//! old keys are kept.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey};

use crate::{
    error::{DeviceError, Error, Result},
    signing::verify_json,
};

/// Another device (or one of our own others), as its self-signed device keys describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub curve25519: String,
    pub ed25519: String,
    pub algorithms: Vec<String>,
    pub display_name: Option<String>,
    /// The signed device keys as received (cross-signing signatures live in there).
    pub keys_json: Value,
    /// We verified this device ourselves (SAS).
    #[serde(default)]
    pub locally_verified: bool,
}

impl Device {
    /// Checks a `device_keys` entry from `/keys/query` (or `/keys/upload`) and its self-signature.
    pub fn from_signed_keys(user_id: &UserId, device_id: &str, keys: &Value) -> Result<Self> {
        let field = |name: &str| keys.get(name).and_then(Value::as_str).map(str::to_owned);
        if field("user_id").as_deref() != Some(user_id.as_str()) {
            return Err(Error::malformed("device keys", "user_id does not match the entry it is under"));
        }
        if field("device_id").as_deref() != Some(device_id) {
            return Err(Error::malformed("device keys", "device_id does not match the entry it is under"));
        }
        let key = |algorithm: &str| {
            keys.get("keys")
                .and_then(|k| k.get(format!("{algorithm}:{device_id}")))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| Error::malformed("device keys", format!("no {algorithm} key")))
        };
        let ed25519 = key("ed25519")?;
        let curve25519 = key("curve25519")?;
        let signing_key = Ed25519PublicKey::from_base64(&ed25519).map_err(|e| Error::invalid("ed25519 key", e))?;
        Curve25519PublicKey::from_base64(&curve25519).map_err(|e| Error::invalid("curve25519 key", e))?;
        verify_json(keys, user_id.as_str(), &format!("ed25519:{device_id}"), &signing_key)?;
        Ok(Self {
            user_id: user_id.to_owned(),
            device_id: device_id.into(),
            curve25519,
            ed25519,
            algorithms: keys
                .get("algorithms")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            display_name: keys
                .get("unsigned")
                .and_then(|u| u.get("device_display_name"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            keys_json: keys.clone(),
            locally_verified: false,
        })
    }

    pub fn curve25519_key(&self) -> Result<Curve25519PublicKey> {
        Curve25519PublicKey::from_base64(&self.curve25519).map_err(|e| Error::invalid("curve25519 key", e))
    }

    pub fn ed25519_key(&self) -> Result<Ed25519PublicKey> {
        Ed25519PublicKey::from_base64(&self.ed25519).map_err(|e| Error::invalid("ed25519 key", e))
    }
}

/// A user's published cross-signing keys (checked: the self-signing and user-signing keys
/// carry the master key's signature).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CrossSigningKeys {
    pub master: Option<Value>,
    pub self_signing: Option<Value>,
    pub user_signing: Option<Value>,
}

/// What a `/keys/query` response changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeysQueryOutcome {
    pub new_devices: Vec<(OwnedUserId, OwnedDeviceId)>,
    pub removed_devices: Vec<(OwnedUserId, OwnedDeviceId)>,
    /// Entries refused: bad signatures, mismatched ids, changed identity keys.
    pub rejected: Vec<(OwnedUserId, String, String)>,
}

/// How long a user whose server failed a query waits before being asked again.
const QUERY_RETRY_MS: u64 = 60_000;

#[derive(Debug, Default)]
pub struct DeviceStore {
    pub(crate) devices: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Device>>,
    /// Tracked users and a counter bumped whenever their list goes stale; a query clears the
    /// staleness only if the counter is still the one it was sent with.
    pub(crate) tracked: BTreeMap<OwnedUserId, u64>,
    pub(crate) fresh: BTreeMap<OwnedUserId, u64>,
    /// Users a query did not answer for (their server failed): (counter, when). They are not
    /// asked again for a while unless their list changes, so a failing server does not turn
    /// every `outgoing_requests` into a new query.
    pub(crate) failed: BTreeMap<OwnedUserId, (u64, u64)>,
    pub(crate) cross_signing: BTreeMap<OwnedUserId, CrossSigningKeys>,
    /// Users whose records changed since the last save.
    pub(crate) changed: BTreeSet<OwnedUserId>,
}

impl DeviceStore {
    pub fn get(&self, user_id: &UserId, device_id: &str) -> Option<&Device> {
        self.devices.get(user_id).and_then(|d| d.get(device_id))
    }

    pub fn user_devices(&self, user_id: &UserId) -> impl Iterator<Item = &Device> {
        self.devices.get(user_id).into_iter().flat_map(|d| d.values())
    }

    pub fn by_curve_key(&self, user_id: &UserId, curve25519: &str) -> Option<&Device> {
        self.user_devices(user_id).find(|d| d.curve25519 == curve25519)
    }

    /// Any user's device with this curve25519 key.
    pub fn owner_of_curve_key(&self, curve25519: &str) -> Option<&Device> {
        self.devices.values().flat_map(|d| d.values()).find(|d| d.curve25519 == curve25519)
    }

    pub fn is_tracked(&self, user_id: &UserId) -> bool {
        self.tracked.contains_key(user_id)
    }

    /// Starts tracking users (their device lists get queried) and marks them stale.
    pub fn track(&mut self, users: impl IntoIterator<Item = OwnedUserId>) {
        for user in users {
            if !self.tracked.contains_key(&user) {
                self.tracked.insert(user.clone(), 1);
                self.changed.insert(user);
            }
        }
    }

    /// `device_lists.changed`: tracked users' lists are stale.
    pub fn mark_changed(&mut self, users: &[OwnedUserId]) {
        for user in users {
            if let Some(counter) = self.tracked.get_mut(user) {
                *counter += 1;
                self.changed.insert(user.clone());
            }
        }
    }

    /// `device_lists.left`: we share no room with them any more; forget their devices.
    pub fn stop_tracking(&mut self, users: &[OwnedUserId]) {
        for user in users {
            self.tracked.remove(user);
            self.fresh.remove(user);
            self.devices.remove(user);
            self.cross_signing.remove(user);
            self.changed.insert(user.clone());
        }
    }

    /// Tracked users whose device lists need a query, with the counter to clear.
    pub fn stale_users(&self) -> Vec<(OwnedUserId, u64)> {
        let now = crate::types::now_ms();
        self.tracked
            .iter()
            .filter(|(user, counter)| self.fresh.get(*user) != Some(counter))
            .filter(|(user, counter)| {
                !self.failed.get(*user).is_some_and(|(c, at)| c == *counter && now.saturating_sub(*at) < QUERY_RETRY_MS)
            })
            .map(|(u, c)| (u.clone(), *c))
            .collect()
    }

    /// Takes in a `/keys/query` response for `queried` (users with the counters sent).
    pub fn receive_keys_query(&mut self, queried: &[(OwnedUserId, u64)], response: &Value) -> KeysQueryOutcome {
        let mut outcome = KeysQueryOutcome::default();
        let failed_servers: BTreeSet<&str> = response
            .get("failures")
            .and_then(Value::as_object)
            .map(|f| f.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for (user_id, counter) in queried {
            let listed = response.get("device_keys").and_then(|d| d.get(user_id.as_str())).and_then(Value::as_object);
            let Some(listed) = listed.filter(|_| !failed_servers.contains(user_id.server_name().as_str())) else {
                // Not answered for this user: the list stays stale, asked again later.
                self.failed.insert(user_id.clone(), (*counter, crate::types::now_ms()));
                continue;
            };
            self.failed.remove(user_id);
            let known = self.devices.entry(user_id.clone()).or_default();
            let mut seen = BTreeSet::new();
            for (device_id, keys) in listed {
                seen.insert(device_id.clone());
                let device = match Device::from_signed_keys(user_id, device_id, keys) {
                    Ok(device) => device,
                    Err(e) => {
                        tracing::warn!(%user_id, %device_id, error = %e, "refusing device keys");
                        outcome.rejected.push((user_id.clone(), device_id.clone(), e.to_string()));
                        continue;
                    }
                };
                match known.get_mut(device_id.as_str()) {
                    Some(old) if old.ed25519 != device.ed25519 || old.curve25519 != device.curve25519 => {
                        let e = DeviceError::IdentityKeysChanged {
                            user_id: user_id.to_string(),
                            device_id: device_id.clone(),
                        };
                        tracing::warn!(%user_id, %device_id, "{e}");
                        outcome.rejected.push((user_id.clone(), device_id.clone(), e.to_string()));
                    }
                    Some(old) => {
                        // Same identity: take the new display name and signatures.
                        let verified = old.locally_verified;
                        *old = Device { locally_verified: verified, ..device };
                    }
                    None => {
                        outcome.new_devices.push((user_id.clone(), device.device_id.clone()));
                        known.insert(device.device_id.clone(), device);
                    }
                }
            }
            let removed: Vec<OwnedDeviceId> = known.keys().filter(|d| !seen.contains(d.as_str())).cloned().collect();
            for device_id in removed {
                known.remove(&device_id);
                outcome.removed_devices.push((user_id.clone(), device_id));
            }
            self.receive_cross_signing(user_id, response);
            self.fresh.insert(user_id.clone(), *counter);
            self.changed.insert(user_id.clone());
        }
        outcome
    }

    fn receive_cross_signing(&mut self, user_id: &UserId, response: &Value) {
        let key_of = |section: &str| response.get(section).and_then(|s| s.get(user_id.as_str())).cloned();
        let Some(master) = key_of("master_keys") else {
            self.cross_signing.remove(user_id);
            return;
        };
        let checked = |key: Option<Value>| -> Option<Value> {
            let key = key?;
            match crate::cross_signing::verify_signed_by_master(user_id, &master, &key) {
                Ok(()) => Some(key),
                Err(e) => {
                    tracing::warn!(%user_id, error = %e, "refusing a cross-signing key not signed by the master key");
                    None
                }
            }
        };
        let keys = CrossSigningKeys {
            self_signing: checked(key_of("self_signing_keys")),
            user_signing: checked(key_of("user_signing_keys")),
            master: Some(master),
        };
        self.cross_signing.insert(user_id.to_owned(), keys);
    }
}

#[cfg(test)]
mod tests {
    use ruma::{device_id, user_id};
    use serde_json::json;

    use super::*;
    use crate::account::Account;

    fn keys_of(account: &Account) -> Value {
        account.device_keys().unwrap()
    }

    #[test]
    fn query_adds_verifies_refuses_changes_and_removes() {
        let bob = user_id!("@bob:localhost");
        let a1 = Account::new(bob.to_owned(), device_id!("B1").to_owned());
        let a2 = Account::new(bob.to_owned(), device_id!("B2").to_owned());
        let mut store = DeviceStore::default();
        store.track([bob.to_owned()]);
        let stale = store.stale_users();
        assert_eq!(stale.len(), 1);

        let mut forged = keys_of(&a2);
        forged["keys"]["curve25519:B2"] = json!(a1.curve25519_key().to_base64());
        let response = json!({"device_keys": {"@bob:localhost": {"B1": keys_of(&a1), "B2": forged}}});
        let outcome = store.receive_keys_query(&stale, &response);
        assert_eq!(outcome.new_devices, vec![(bob.to_owned(), device_id!("B1").to_owned())]);
        assert_eq!(outcome.rejected.len(), 1, "a bad self-signature is refused");
        assert!(store.stale_users().is_empty());

        // Another account claiming B1's device id: identity keys changed, refused.
        let impostor = Account::new(bob.to_owned(), device_id!("B1").to_owned());
        store.mark_changed(&[bob.to_owned()]);
        let stale = store.stale_users();
        let response = json!({"device_keys": {"@bob:localhost": {"B1": keys_of(&impostor), "B2": keys_of(&a2)}}});
        let outcome = store.receive_keys_query(&stale, &response);
        assert_eq!(outcome.rejected.len(), 1);
        assert_eq!(store.get(bob, "B1").unwrap().ed25519, a1.ed25519_key().to_base64());
        assert!(store.get(bob, "B2").is_some());

        // B1 deleted.
        store.mark_changed(&[bob.to_owned()]);
        let stale = store.stale_users();
        let response = json!({"device_keys": {"@bob:localhost": {"B2": keys_of(&a2)}}});
        let outcome = store.receive_keys_query(&stale, &response);
        assert_eq!(outcome.removed_devices, vec![(bob.to_owned(), device_id!("B1").to_owned())]);

        store.stop_tracking(&[bob.to_owned()]);
        assert!(store.get(bob, "B2").is_none());
        assert!(store.stale_users().is_empty());
    }

    #[test]
    fn an_unanswered_user_is_not_asked_again_at_once() {
        let remote = user_id!("@carol:remote.example");
        let mut store = DeviceStore::default();
        store.track([remote.to_owned()]);
        let stale = store.stale_users();
        store.receive_keys_query(&stale, &json!({"device_keys": {}, "failures": {"remote.example": {}}}));
        assert!(store.stale_users().is_empty(), "backing off");
        // A new change to the list asks again.
        store.mark_changed(&[remote.to_owned()]);
        assert_eq!(store.stale_users().len(), 1);
    }

    #[test]
    fn a_change_during_a_query_keeps_the_user_stale() {
        let bob = user_id!("@bob:localhost");
        let mut store = DeviceStore::default();
        store.track([bob.to_owned()]);
        let stale = store.stale_users();
        store.mark_changed(&[bob.to_owned()]);
        store.receive_keys_query(&stale, &json!({"device_keys": {"@bob:localhost": {}}}));
        assert_eq!(store.stale_users().len(), 1);
    }
}
