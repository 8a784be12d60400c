//! Our device's Olm account: identity keys, the signed device keys, and one-time and fallback
//! keys kept topped up from the counts the server reports in `/sync`.

use std::collections::BTreeMap;

use ruma::{OwnedDeviceId, OwnedUserId};
use serde_json::{Value, json};
use vodozemac::{
    Curve25519PublicKey, Ed25519PublicKey,
    olm::{Account as OlmAccount, AccountPickle},
};

use crate::{
    error::Result,
    signing::sign_json,
    types::{MEGOLM_V1, OLM_V1, SIGNED_CURVE25519},
};

/// The keys to upload with `/keys/upload`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeysUpload {
    /// Signed device keys, only until the server has acknowledged them once.
    pub device_keys: Option<Value>,
    /// `signed_curve25519:<id>` to signed key objects.
    pub one_time_keys: BTreeMap<String, Value>,
    pub fallback_keys: BTreeMap<String, Value>,
}

impl KeysUpload {
    pub fn is_empty(&self) -> bool {
        self.device_keys.is_none() && self.one_time_keys.is_empty() && self.fallback_keys.is_empty()
    }
}

pub struct Account {
    pub(crate) inner: OlmAccount,
    pub(crate) user_id: OwnedUserId,
    pub(crate) device_id: OwnedDeviceId,
    /// The server has our device keys (a `/keys/upload` with them succeeded).
    pub(crate) shared: bool,
    /// The server's count of our unclaimed signed_curve25519 one-time keys, from the last sync
    /// or upload response; `None` before we have heard one.
    pub(crate) server_otk_count: Option<u64>,
    /// The server told us our fallback key was used (or it never had one): make a new one.
    pub(crate) needs_fallback_key: bool,
}

impl Account {
    pub fn new(user_id: OwnedUserId, device_id: OwnedDeviceId) -> Self {
        Self {
            inner: OlmAccount::new(),
            user_id,
            device_id,
            shared: false,
            server_otk_count: None,
            needs_fallback_key: true,
        }
    }

    pub fn curve25519_key(&self) -> Curve25519PublicKey {
        self.inner.curve25519_key()
    }

    pub fn ed25519_key(&self) -> Ed25519PublicKey {
        self.inner.ed25519_key()
    }

    pub fn device_key_id(&self) -> String {
        format!("ed25519:{}", self.device_id)
    }

    /// Signs `value` with our device key (`signatures.<our user>.ed25519:<our device>`).
    pub fn sign_json(&self, value: &mut Value) -> Result<()> {
        sign_json(&self.inner, self.user_id.as_str(), &self.device_key_id(), value)
    }

    /// Our device keys, self-signed, as `/keys/upload` and `/keys/query` carry them.
    pub fn device_keys(&self) -> Result<Value> {
        let mut keys = json!({
            "user_id": self.user_id,
            "device_id": self.device_id,
            "algorithms": [OLM_V1, MEGOLM_V1],
            "keys": {
                format!("curve25519:{}", self.device_id): self.curve25519_key().to_base64(),
                format!("ed25519:{}", self.device_id): self.ed25519_key().to_base64(),
            },
        });
        self.sign_json(&mut keys)?;
        Ok(keys)
    }

    fn signed_key(&self, key: Curve25519PublicKey, fallback: bool) -> Result<Value> {
        let mut value = json!({ "key": key.to_base64() });
        if fallback {
            value["fallback"] = json!(true);
        }
        self.sign_json(&mut value)?;
        Ok(value)
    }

    /// Takes in the server's key counts from `/sync` (or a `/keys/upload` response).
    pub fn update_key_counts(&mut self, otk_counts: &BTreeMap<String, u64>, unused_fallback_types: Option<&[String]>) {
        self.server_otk_count = Some(otk_counts.get(SIGNED_CURVE25519).copied().unwrap_or(0));
        // `None`: the server does not report fallback keys, so we cannot know they were used.
        if let Some(types) = unused_fallback_types
            && !types.iter().any(|t| t == SIGNED_CURVE25519)
        {
            self.needs_fallback_key = true;
        }
    }

    /// What to upload now, generating keys as needed; `None` when the server is topped up.
    ///
    /// Half of vodozemac's capacity is published (as libolm and matrix-sdk-crypto do): the
    /// other half covers one-time keys that were claimed but whose pre-key messages have not
    /// reached us yet, so generating new keys never forgets a private key still needed.
    pub fn keys_for_upload(&mut self) -> Result<Option<KeysUpload>> {
        let mut upload = KeysUpload::default();
        if !self.shared {
            upload.device_keys = Some(self.device_keys()?);
        }
        // Before the first count we have not been told anything: an unshared account has
        // nothing on the server, a shared one waits for the next sync.
        let server_count = match self.server_otk_count {
            Some(count) => Some(count),
            None if !self.shared => Some(0),
            None => None,
        };
        if let Some(server_count) = server_count {
            let target = self.inner.max_number_of_one_time_keys() as u64;
            let unpublished = self.inner.one_time_keys().len() as u64;
            let wanted = target.saturating_sub(server_count).saturating_sub(unpublished);
            if wanted > 0 {
                self.inner.generate_one_time_keys(wanted as usize);
            }
        }
        for (key_id, key) in self.inner.one_time_keys() {
            upload
                .one_time_keys
                .insert(format!("{SIGNED_CURVE25519}:{}", key_id.to_base64()), self.signed_key(key, false)?);
        }
        if self.needs_fallback_key && self.inner.fallback_key().is_empty() {
            self.inner.generate_fallback_key();
        }
        for (key_id, key) in self.inner.fallback_key() {
            upload
                .fallback_keys
                .insert(format!("{SIGNED_CURVE25519}:{}", key_id.to_base64()), self.signed_key(key, true)?);
        }
        Ok((!upload.is_empty()).then_some(upload))
    }

    /// The upload succeeded: the keys in it are on the server.
    pub fn mark_keys_as_published(&mut self, response_counts: &BTreeMap<String, u64>) {
        self.inner.mark_keys_as_published();
        self.shared = true;
        self.needs_fallback_key = false;
        self.server_otk_count = Some(response_counts.get(SIGNED_CURVE25519).copied().unwrap_or(0));
    }

    pub(crate) fn pickle(&self) -> AccountPickle {
        self.inner.pickle()
    }
}

#[cfg(test)]
mod tests {
    use ruma::{device_id, user_id};

    use super::*;
    use crate::signing::verify_json;

    fn account() -> Account {
        Account::new(user_id!("@alice:localhost").to_owned(), device_id!("ALICEDEV").to_owned())
    }

    #[test]
    fn device_keys_are_self_signed() {
        let account = account();
        let keys = account.device_keys().unwrap();
        assert_eq!(keys["keys"]["ed25519:ALICEDEV"], account.ed25519_key().to_base64());
        assert_eq!(keys["keys"]["curve25519:ALICEDEV"], account.curve25519_key().to_base64());
        verify_json(&keys, "@alice:localhost", "ed25519:ALICEDEV", &account.ed25519_key()).unwrap();
    }

    #[test]
    fn first_upload_has_everything_then_only_top_ups() {
        let mut account = account();
        let upload = account.keys_for_upload().unwrap().unwrap();
        assert!(upload.device_keys.is_some());
        let max = account.inner.max_number_of_one_time_keys();
        assert_eq!(upload.one_time_keys.len(), max);
        assert_eq!(upload.fallback_keys.len(), 1);
        for (id, key) in &upload.one_time_keys {
            assert!(id.starts_with("signed_curve25519:"));
            verify_json(key, "@alice:localhost", "ed25519:ALICEDEV", &account.ed25519_key()).unwrap();
        }
        let fallback = upload.fallback_keys.values().next().unwrap();
        assert_eq!(fallback["fallback"], true);
        // The same keys again until the upload is acknowledged.
        assert_eq!(account.keys_for_upload().unwrap().unwrap(), upload);
        account.mark_keys_as_published(&BTreeMap::from([(SIGNED_CURVE25519.to_owned(), max as u64)]));
        assert!(account.keys_for_upload().unwrap().is_none());

        // Ten keys claimed and the fallback key still unused: top up by ten.
        account.update_key_counts(
            &BTreeMap::from([(SIGNED_CURVE25519.to_owned(), max as u64 - 10)]),
            Some(&[SIGNED_CURVE25519.to_owned()]),
        );
        let upload = account.keys_for_upload().unwrap().unwrap();
        assert!(upload.device_keys.is_none());
        assert_eq!(upload.one_time_keys.len(), 10);
        assert!(upload.fallback_keys.is_empty());
        account.mark_keys_as_published(&BTreeMap::from([(SIGNED_CURVE25519.to_owned(), max as u64)]));

        // The fallback key was used: a new one.
        account.update_key_counts(&BTreeMap::from([(SIGNED_CURVE25519.to_owned(), max as u64)]), Some(&[]));
        let upload = account.keys_for_upload().unwrap().unwrap();
        assert!(upload.one_time_keys.is_empty());
        assert_eq!(upload.fallback_keys.len(), 1);
    }
}
