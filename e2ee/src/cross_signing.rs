//! Cross-signing keys: checking other users' published keys (here) and bootstrapping our own
//! (master, self-signing, user-signing) with signatures over our devices.

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use vodozemac::{Ed25519PublicKey, Ed25519SecretKey};

use crate::{
    devices::Device,
    error::{CorruptRecord, Error, Result, SigningError, StoreError},
    machine::OlmMachine,
    signing::{sign_json, verify_json},
    types::OutgoingRequest,
};

/// The single ed25519 key of a cross-signing key object, and its key id.
pub fn cross_signing_public_key(key: &Value) -> Result<(String, Ed25519PublicKey)> {
    let keys =
        key.get("keys").and_then(Value::as_object).ok_or_else(|| Error::malformed("cross-signing key", "no keys"))?;
    let (key_id, public) = match keys.iter().next() {
        Some((id, Value::String(public))) if keys.len() == 1 => (id.clone(), public.clone()),
        _ => return Err(Error::malformed("cross-signing key", "must hold exactly one key")),
    };
    let public_key = Ed25519PublicKey::from_base64(&public).map_err(|e| Error::invalid("cross-signing key", e))?;
    Ok((key_id, public_key))
}

/// Checks that `key` (a self-signing or user-signing key) belongs to `user_id` and carries a
/// valid signature by the user's master key.
pub fn verify_signed_by_master(user_id: &UserId, master: &Value, key: &Value) -> Result<()> {
    for k in [master, key] {
        if k.get("user_id").and_then(Value::as_str) != Some(user_id.as_str()) {
            return Err(Error::malformed("cross-signing key", "user_id does not match"));
        }
    }
    let (master_id, master_key) = cross_signing_public_key(master)?;
    verify_json(key, user_id.as_str(), &master_id, &master_key)
}

/// Our private cross-signing keys (unpadded base64 seeds), kept in the store.
#[derive(Clone, Serialize, Deserialize)]
pub struct PrivateCrossSigningKeys {
    master: String,
    self_signing: String,
    user_signing: String,
}

impl Drop for PrivateCrossSigningKeys {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.master.zeroize();
        self.self_signing.zeroize();
        self.user_signing.zeroize();
    }
}

impl PrivateCrossSigningKeys {
    fn key(seed: &str) -> Result<Ed25519SecretKey> {
        Ed25519SecretKey::from_base64(seed)
            .map_err(|e| Error::from(StoreError::Corrupt(CorruptRecord::CrossSigningSeed(e))))
    }

    fn generate() -> Self {
        Self {
            master: Ed25519SecretKey::new().to_base64(),
            self_signing: Ed25519SecretKey::new().to_base64(),
            user_signing: Ed25519SecretKey::new().to_base64(),
        }
    }

    pub fn master_public(&self) -> Result<Ed25519PublicKey> {
        Ok(Self::key(&self.master)?.public_key())
    }

    pub fn self_signing_public(&self) -> Result<Ed25519PublicKey> {
        Ok(Self::key(&self.self_signing)?.public_key())
    }

    pub fn user_signing_public(&self) -> Result<Ed25519PublicKey> {
        Ok(Self::key(&self.user_signing)?.public_key())
    }
}

/// The public key object for one cross-signing key.
fn key_object(user_id: &UserId, usage: &str, public: &Ed25519PublicKey) -> Value {
    let public = public.to_base64();
    json!({ "user_id": user_id, "usage": [usage], "keys": { format!("ed25519:{public}"): public } })
}

/// What to upload after [`OlmMachine::bootstrap_cross_signing`].
#[derive(Debug, Clone)]
pub struct CrossSigningUpload {
    /// Body for `POST /_matrix/client/v3/keys/device_signing/upload`; the server asks for
    /// user-interactive auth: add an `auth` field and resend as it says.
    pub device_signing_body: Value,
    /// Our device signed by the new self-signing key (`/keys/signatures/upload`); send it
    /// after the upload above succeeded.
    pub signatures: OutgoingRequest,
}

impl OlmMachine {
    /// Our cross-signing keys (private halves), if we made or imported them.
    pub fn cross_signing_keys(&self) -> Option<&PrivateCrossSigningKeys> {
        self.cross_signing.as_ref()
    }

    /// Creates master, self-signing and user-signing keys: the master signs the other two,
    /// our device signs the master (so other devices of ours can trust it), and the
    /// self-signing key signs our device.
    pub fn bootstrap_cross_signing(&mut self) -> Result<CrossSigningUpload> {
        let keys = PrivateCrossSigningKeys::generate();
        let user_id = self.account.user_id.clone();
        let master_key = PrivateCrossSigningKeys::key(&keys.master)?;
        let master_public = master_key.public_key();
        let master_id = format!("ed25519:{}", master_public.to_base64());

        let mut master = key_object(&user_id, "master", &master_public);
        self.account.sign_json(&mut master)?;
        let mut self_signing = key_object(&user_id, "self_signing", &keys.self_signing_public()?);
        sign_json(&master_key, user_id.as_str(), &master_id, &mut self_signing)?;
        let mut user_signing = key_object(&user_id, "user_signing", &keys.user_signing_public()?);
        sign_json(&master_key, user_id.as_str(), &master_id, &mut user_signing)?;

        self.cross_signing = Some(keys);
        self.account_changed = true;
        // Our own published keys as others will see them, so trust checks work before the
        // next `/keys/query`.
        self.devices.cross_signing.insert(
            user_id.clone(),
            crate::devices::CrossSigningKeys {
                master: Some(master.clone()),
                self_signing: Some(self_signing.clone()),
                user_signing: Some(user_signing.clone()),
            },
        );
        self.devices.changed.insert(user_id.clone());
        let device_id = self.account.device_id.to_string();
        let signatures = self.sign_own_device(&device_id)?;
        Ok(CrossSigningUpload {
            device_signing_body: json!({
                "master_key": master,
                "self_signing_key": self_signing,
                "user_signing_key": user_signing,
            }),
            signatures,
        })
    }

    /// Signs one of our devices with our self-signing key: the `/keys/signatures/upload`
    /// request to send.
    pub fn sign_own_device(&mut self, device_id: &str) -> Result<OutgoingRequest> {
        let keys = self.cross_signing.clone().ok_or(SigningError::NoCrossSigningKeys)?;
        let ssk = PrivateCrossSigningKeys::key(&keys.self_signing)?;
        let user_id = self.account.user_id.clone();
        let mut device_keys = if device_id == self.account.device_id.as_str() {
            self.account.device_keys()?
        } else {
            self.devices
                .get(&user_id, device_id)
                .map(|d| d.keys_json.clone())
                .ok_or_else(|| SigningError::UnknownDevice { device_id: device_id.to_owned() })?
        };
        sign_json(&ssk, user_id.as_str(), &format!("ed25519:{}", ssk.public_key().to_base64()), &mut device_keys)?;
        if let Some(device) = self.devices.devices.get_mut(&user_id).and_then(|d| d.get_mut(device_id)) {
            device.keys_json = device_keys.clone();
            self.devices.changed.insert(user_id.clone());
        }
        self.hand_out_signature_upload(json!({ user_id.as_str(): { device_id: device_keys } }))
    }

    /// Forgets cross-signing keys we made but could not publish (the next bootstrap makes
    /// new ones).
    pub fn reset_cross_signing(&mut self) {
        if self.cross_signing.take().is_some() {
            let own = self.account.user_id.clone();
            self.devices.cross_signing.remove(&own);
            self.devices.changed.insert(own);
            self.account_changed = true;
        }
    }

    /// After an emoji verification of `device_id` of `user_id`: signs the user's master key
    /// with our user-signing key, but only if the verified device carries the signature of
    /// the user's self-signing key (signed by that master key), so what we vouch for is
    /// bound to what we compared. Another device of ours is signed with our self-signing
    /// key instead. `Ok(None)`: nothing to sign (no cross-signing keys on either side).
    pub fn sign_after_verification(&mut self, user_id: &UserId, device_id: &str) -> Result<Option<OutgoingRequest>> {
        let device = self
            .devices
            .get(user_id, device_id)
            .filter(|d| d.locally_verified)
            .ok_or_else(|| SigningError::NotVerified { user_id: user_id.to_string(), device_id: device_id.to_owned() })?
            .clone();
        if self.cross_signing.is_none() {
            return Ok(None);
        }
        if user_id == self.account.user_id {
            return self.sign_own_device(device_id).map(Some);
        }
        let Some(keys) = self.devices.cross_signing.get(user_id) else { return Ok(None) };
        let Some(ssk) = &keys.self_signing else { return Ok(None) };
        let (ssk_id, ssk_public) = cross_signing_public_key(ssk)?;
        verify_json(&device.keys_json, user_id.as_str(), &ssk_id, &ssk_public).map_err(|e| {
            SigningError::NotSignedBySelfSigningKey { user_id: user_id.to_string(), source: Box::new(e) }
        })?;
        self.sign_user(user_id).map(Some)
    }

    /// Signs another user's master key with our user-signing key (after verifying them):
    /// the `/keys/signatures/upload` request to send.
    pub fn sign_user(&mut self, user_id: &UserId) -> Result<OutgoingRequest> {
        let keys = self.cross_signing.clone().ok_or(SigningError::NoCrossSigningKeys)?;
        let usk = PrivateCrossSigningKeys::key(&keys.user_signing)?;
        let mut master = self
            .devices
            .cross_signing
            .get(user_id)
            .and_then(|k| k.master.clone())
            .ok_or_else(|| SigningError::NoMasterKey { user_id: user_id.to_string() })?;
        let (_, master_public) = cross_signing_public_key(&master)?;
        let own: OwnedUserId = self.account.user_id.clone();
        let usk_id = format!("ed25519:{}", usk.public_key().to_base64());
        sign_json(&usk, own.as_str(), &usk_id, &mut master)?;
        if let Some(k) = self.devices.cross_signing.get_mut(user_id) {
            k.master = Some(master.clone());
            self.devices.changed.insert(user_id.to_owned());
        }
        // Upload the key with only our new signature: the server merges it into what it has,
        // and a server that checks every signature present could not check the owner's
        // device signature against our keys.
        let mut upload = master;
        let ours = upload["signatures"][own.as_str()][&usk_id].clone();
        upload["signatures"] = json!({ own.as_str(): { usk_id: ours } });
        self.hand_out_signature_upload(json!({ user_id.as_str(): { master_public.to_base64(): upload } }))
    }

    /// Whether we trust `device`: verified by emoji on this device, or cross-signed by a
    /// master key we trust (ours, or one our user-signing key signed).
    pub fn is_device_verified(&self, device: &Device) -> bool {
        device.locally_verified || self.is_cross_signed_by_us(device)
    }

    /// A user's published master key as we last saw it (`/keys/query`, or ours after
    /// [`OlmMachine::bootstrap_cross_signing`]).
    pub fn master_key_of(&self, user_id: &UserId) -> Option<&Value> {
        self.devices.cross_signing.get(user_id).and_then(|k| k.master.as_ref())
    }

    /// The device's keys carry its owner's self-signing signature, and we trust the owner's
    /// master key: it is ours, or our user-signing key signed it.
    pub(crate) fn is_cross_signed_by_us(&self, device: &Device) -> bool {
        let Some(ours) = &self.cross_signing else { return false };
        let Some(keys) = self.devices.cross_signing.get(&device.user_id) else { return false };
        let (Some(master), Some(ssk)) = (&keys.master, &keys.self_signing) else { return false };
        let Ok((ssk_id, ssk_public)) = cross_signing_public_key(ssk) else { return false };
        if verify_json(&device.keys_json, device.user_id.as_str(), &ssk_id, &ssk_public).is_err() {
            return false;
        }
        let Ok((_, master_public)) = cross_signing_public_key(master) else { return false };
        if device.user_id == self.account.user_id {
            return ours.master_public().is_ok_and(|k| k == master_public);
        }
        let Ok(usk) = ours.user_signing_public() else { return false };
        verify_json(master, self.account.user_id.as_str(), &format!("ed25519:{}", usk.to_base64()), &usk).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use ruma::user_id;

    use super::*;

    #[test]
    fn bootstrap_signs_the_chain_and_our_device() {
        let mut alice = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A1".into());
        let upload = alice.bootstrap_cross_signing().unwrap();
        let body = &upload.device_signing_body;
        let user = user_id!("@alice:localhost");
        verify_signed_by_master(user, &body["master_key"], &body["self_signing_key"]).unwrap();
        verify_signed_by_master(user, &body["master_key"], &body["user_signing_key"]).unwrap();
        verify_json(&body["master_key"], user.as_str(), "ed25519:A1", &alice.account.ed25519_key()).unwrap();
        assert_eq!(body["master_key"]["usage"], json!(["master"]));

        let signed = &upload.signatures.body()["@alice:localhost"]["A1"];
        let (ssk_id, ssk) = cross_signing_public_key(&body["self_signing_key"]).unwrap();
        verify_json(signed, user.as_str(), &ssk_id, &ssk).unwrap();
        let device = Device::from_signed_keys(user, "A1", signed).unwrap();
        assert!(alice.is_cross_signed_by_us(&device));

        // A forged self-signing key (not signed by the master) is refused.
        let mut forged = body["self_signing_key"].clone();
        forged["signatures"] = json!({});
        assert!(verify_signed_by_master(user, &body["master_key"], &forged).is_err());
    }

    #[test]
    fn signing_another_users_master_makes_their_devices_trusted() {
        let mut alice = OlmMachine::new(user_id!("@alice:localhost").to_owned(), "A1".into());
        let mut bob = OlmMachine::new(user_id!("@bob:localhost").to_owned(), "B1".into());
        alice.bootstrap_cross_signing().unwrap();
        let bob_upload = bob.bootstrap_cross_signing().unwrap();
        let bob_user = user_id!("@bob:localhost");
        let bob_device = bob_upload.signatures.body()["@bob:localhost"]["B1"].clone();
        let response = json!({
            "device_keys": { "@bob:localhost": { "B1": bob_device } },
            "master_keys": { "@bob:localhost": bob_upload.device_signing_body["master_key"] },
            "self_signing_keys": { "@bob:localhost": bob_upload.device_signing_body["self_signing_key"] },
        });
        alice.devices.track([bob_user.to_owned()]);
        let stale = alice.devices.stale_users();
        alice.devices.receive_keys_query(&stale, &response);
        let device = alice.get_device(bob_user, "B1").unwrap().clone();
        assert!(!alice.is_cross_signed_by_us(&device));
        let request = alice.sign_user(bob_user).unwrap();
        assert!(request.body()["@bob:localhost"].is_object());
        assert!(alice.is_cross_signed_by_us(&device));
    }
}
