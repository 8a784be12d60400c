//! Cross-signing and key backup (the `e2ee` crate makes the keys and signatures; this is the
//! I/O and the moments they happen):
//!
//! * Cross-signing is bootstrapped at the first sign-in of an account: master, self-signing
//!   and user-signing keys go up (`/keys/device_signing/upload`, with the password for
//!   user-interactive auth where the server asks), and our device is signed by the new
//!   self-signing key. A later device of the same account finds the keys published and
//!   leaves them alone (the private keys stay on the device that made them).
//! * After an emoji verification, the other user's master key is signed with our
//!   user-signing key (or another device of ours with our self-signing key).
//! * Key backup: [`Client::enable_key_backup`] creates a server backup version and returns
//!   the recovery key (shown once); from then on every Megolm session this device makes or
//!   receives goes up with the next crypto flush. [`Client::restore_key_backup`] on a new
//!   device takes the recovery key (or the backup's passphrase), imports the keys and
//!   decrypts the history that was waiting for them.

use e2ee::{
    backup::{BackupKey, PassphraseKey},
    cross_signing::cross_signing_public_key,
    signing::verify_json,
};
use reqwest::Method;
use ruma::UserId;
use serde_json::{Value, json};

use crate::{Client, Error, Result, SecurityStatus, Update, crypto::Crypto, session::Session};

const DEVICE_SIGNING_UPLOAD: &str = "/_matrix/client/v3/keys/device_signing/upload";
const BACKUP_VERSION: &str = "/_matrix/client/v3/room_keys/version";

impl Client {
    /// Sets up cross-signing for the account unless the server already has keys for it.
    /// Returns whether it made new keys. `password` answers the server's user-interactive
    /// auth if it asks (Obmin does not for the first upload; servers may).
    pub async fn bootstrap_cross_signing(&self, password: Option<&str>) -> Result<bool> {
        let session = self.require_session()?;
        let mut guard = self.inner.crypto.lock().await;
        let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
        // Our device keys must be on the server before its signature can be.
        self.flush_crypto(&session, crypto).await?;
        let published = self.own_keys(&session).await?;
        if published["master_keys"][session.user_id.as_str()].is_object() {
            return Ok(false);
        }
        let upload = crypto.machine.bootstrap_cross_signing()?;
        if let Err(e) = self
            .inner
            .http
            .post_with_password_auth(
                &session.server_url,
                &session.access_token,
                DEVICE_SIGNING_UPLOAD,
                &upload.device_signing_body,
                session.user_id.as_str(),
                password,
            )
            .await
        {
            crypto.machine.reset_cross_signing();
            crypto.save().await?;
            return Err(e);
        }
        crypto.save().await?;
        self.send_crypto_request(&session, crypto, &upload.signatures).await?;
        crypto.save().await?;
        tracing::info!("cross-signing set up");
        Ok(true)
    }

    /// Sets up cross-signing after a sign-in with a password; a failure is logged, not
    /// returned (the sign-in itself worked, and Settings → Security can try again).
    pub(crate) async fn bootstrap_cross_signing_after_sign_in(&self, password: &str) {
        if let Err(e) = self.bootstrap_cross_signing(Some(password)).await {
            tracing::warn!(%e, "setting up cross-signing");
        }
    }

    /// `/keys/query` for our own user, straight from the server.
    async fn own_keys(&self, session: &Session) -> Result<Value> {
        let body = json!({ "device_keys": { session.user_id.as_str(): [] } });
        self.inner
            .http
            .json(
                &session.server_url,
                &session.access_token,
                Method::POST,
                "/_matrix/client/v3/keys/query",
                Some(&body),
            )
            .await
    }

    /// After an emoji verification with `user_id`'s `device_id` finished: vouch for them with
    /// our cross-signing keys and publish the signature. Failures are logged (the device
    /// stays verified on this device either way).
    pub(crate) async fn cross_sign_verified(&self, user_id: &UserId, device_id: &str) {
        let Ok(session) = self.require_session() else { return };
        let mut guard = self.inner.crypto.lock().await;
        let Some(crypto) = guard.as_mut() else { return };
        // Their current cross-signing keys, to sign the master key they publish now.
        crypto.machine.update_tracked_users([user_id.to_owned()]);
        let signed = async {
            self.flush_crypto(&session, crypto).await?;
            match crypto.machine.sign_after_verification(user_id, device_id)? {
                Some(request) => {
                    self.send_crypto_request(&session, crypto, &request).await?;
                    crypto.save().await?;
                    Ok::<bool, Error>(true)
                }
                None => Ok(false),
            }
        }
        .await;
        match signed {
            Ok(true) => tracing::info!(%user_id, device_id, "cross-signed after verification"),
            Ok(false) => tracing::info!(%user_id, device_id, "no cross-signing keys to sign with"),
            Err(e) => tracing::warn!(%e, %user_id, device_id, "cross-signing after verification"),
        }
    }

    /// Cross-signing and backup as they stand (asks the server).
    pub async fn security_status(&self) -> Result<SecurityStatus> {
        let session = self.require_session()?;
        let published = self.own_keys(&session).await?;
        let server_backup_version = match self.latest_backup(&session).await {
            Ok(info) => info["version"].as_str().map(str::to_owned),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let me = session.user_id.as_str();
        let device_cross_signed =
            cross_signing_public_key(&published["self_signing_keys"][me]).is_ok_and(|(id, key)| {
                verify_json(&published["device_keys"][me][&session.device_id], me, &id, &key).is_ok()
            });
        let guard = self.inner.crypto.lock().await;
        let crypto = guard.as_ref().ok_or(Error::NotLoggedIn)?;
        Ok(SecurityStatus {
            cross_signing_keys_here: crypto.machine.cross_signing_keys().is_some(),
            cross_signing_published: published["master_keys"][me].is_object(),
            device_cross_signed,
            backup_version: crypto.machine.backup_version().map(str::to_owned),
            server_backup_version,
        })
    }

    async fn latest_backup(&self, session: &Session) -> Result<Value> {
        self.inner.http.json(&session.server_url, &session.access_token, Method::GET, BACKUP_VERSION, None).await
    }

    /// Starts a new key backup on the server and backs up every room key this device has.
    /// Returns the recovery key: show it to the user once (it is not kept anywhere else in
    /// readable form). With a `passphrase` the key is derived from it instead, and the
    /// passphrase restores too.
    pub async fn enable_key_backup(&self, passphrase: Option<&str>) -> Result<String> {
        let session = self.require_session()?;
        let derived = match passphrase {
            Some(passphrase) if passphrase.chars().count() < 8 => {
                return Err(Error::InvalidInput("Choose a passphrase of at least 8 characters.".into()));
            }
            Some(passphrase) => {
                let passphrase = zeroize::Zeroizing::new(passphrase.to_owned());
                Some(slow(move || PassphraseKey::new(&passphrase, PassphraseKey::ROUNDS)).await?)
            }
            None => None,
        };
        let mut guard = self.inner.crypto.lock().await;
        let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
        let (key, body) = match derived {
            Some(derived) => crypto.machine.create_backup_with_passphrase(derived)?,
            None => crypto.machine.create_backup()?,
        };
        let answer = self
            .inner
            .http
            .json(&session.server_url, &session.access_token, Method::POST, BACKUP_VERSION, Some(&body))
            .await?;
        let version = answer["version"]
            .as_str()
            .ok_or_else(|| Error::NotAMatrixServer { url: session.server_url.clone() })?
            .to_owned();
        let recovery_key = key.to_recovery_key();
        crypto.machine.enable_backup(key, version);
        crypto.save().await?;
        self.backup_room_keys(&session, crypto).await;
        Ok(recovery_key)
    }

    /// Restores room keys from the server's newest backup with its recovery key or
    /// passphrase, then decrypts what was waiting for them; this device backs up to the same
    /// backup from now on. Returns how many keys were new here.
    pub async fn restore_key_backup(&self, recovery_key_or_passphrase: &str) -> Result<usize> {
        let session = self.require_session()?;
        let info = match self.latest_backup(&session).await {
            Err(Error::NotFound { .. }) => {
                return Err(Error::InvalidInput("There is no key backup to restore.".into()));
            }
            other => other?,
        };
        let version = info["version"].as_str().unwrap_or_default().to_owned();
        let wrong_key = || Error::InvalidInput("This recovery key or passphrase does not open the key backup.".into());
        let secret = zeroize::Zeroizing::new(recovery_key_or_passphrase.trim().to_owned());
        let auth_data = info["auth_data"].clone();
        let key = slow(move || BackupKey::from_recovery_key_or_passphrase(&secret, &auth_data))
            .await
            .map_err(|_| wrong_key())?;
        let keys = self
            .inner
            .http
            .json(
                &session.server_url,
                &session.access_token,
                Method::GET,
                &format!("/_matrix/client/v3/room_keys/keys?version={}", urlencoding(&version)),
                None,
            )
            .await?;
        let imported = {
            let mut guard = self.inner.crypto.lock().await;
            let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
            let imported = crypto.machine.restore_backup(&key, &info, &keys).map_err(|e| match e {
                e2ee::Error::Backup(e2ee::BackupError::WrongKey) => wrong_key(),
                e => e.into(),
            })?;
            if crypto.machine.backup_version() != Some(version.as_str()) {
                crypto.machine.enable_backup(key, version);
            }
            crypto.save().await?;
            imported
        };
        for key in self.retry_decryption().await? {
            if let Some(item) = self.store()?.item(&key).await? {
                self.emit(Update::Timeline { item });
            }
        }
        Ok(imported)
    }

    /// Uploads room keys not yet in the backup. Never fails the caller: the keys stay
    /// marked as not backed up and go with the next flush; a backup replaced or deleted on
    /// the server (by another device) turns backup off here.
    pub(crate) async fn backup_room_keys(&self, session: &Session, crypto: &mut Crypto) {
        loop {
            let request = match crypto.machine.backup_room_keys() {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%e, "preparing the key backup");
                    break;
                }
            };
            match self.send_crypto_request(session, crypto, &request).await {
                Ok(_) => {}
                Err(Error::NotFound { .. }) => {
                    tracing::warn!("the key backup is gone from the server; backup is off");
                    crypto.machine.disable_backup();
                    break;
                }
                Err(Error::Server { errcode, .. }) if errcode == "M_WRONG_ROOM_KEYS_VERSION" => {
                    tracing::warn!("a newer key backup replaced ours; backup is off until restored");
                    crypto.machine.disable_backup();
                    break;
                }
                Err(e) => {
                    crypto.machine.discard_request(&request.request_id);
                    tracing::info!(%e, "backing up room keys; retried later");
                    break;
                }
            }
        }
    }
}

/// Runs a deliberately slow key derivation (PBKDF2 over a passphrase) off the async threads.
async fn slow<T: Send + 'static>(derive: impl FnOnce() -> e2ee::Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(derive).await.map_err(|e| Error::Crypto(e.to_string()))?.map_err(Error::from)
}

/// Backup versions are numbers on Obmin, but the spec allows any string: percent-encode it
/// for the query (hand-written: one query value did not seem worth a dependency).
fn urlencoding(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
