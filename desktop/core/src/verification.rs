//! SAS emoji verification of another device (`m.key.verification.*` over to-device
//! messages, run by the `e2ee` crate): start, accept, compare the emoji, confirm or cancel.
//! Progress arrives through sync as [`Update::Verification`].

use e2ee::verification::VerificationState;
use ruma::{OwnedUserId, UserId};

use crate::{Client, DeviceInfo, Error, Result, SasEmoji, Update, Verification, VerificationStatus};

impl Client {
    /// The devices of a user, with whether we verified them (asks the server for fresh keys).
    pub async fn user_devices(&self, user_id: &UserId) -> Result<Vec<DeviceInfo>> {
        let session = self.require_session()?;
        let mut guard = self.inner.crypto.lock().await;
        let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
        crypto.machine.update_tracked_users([user_id.to_owned()]);
        self.flush_crypto(&session, crypto).await?;
        Ok(crypto
            .machine
            .user_devices(user_id)
            .into_iter()
            .map(|d| DeviceInfo {
                device_id: d.device_id.to_string(),
                display_name: d.display_name.clone(),
                verified: crypto.machine.is_device_verified(d),
            })
            .collect())
    }

    /// Asks a device of `user_id` to verify with us; returns the verification id.
    pub async fn start_verification(&self, user_id: &UserId, device_id: &str) -> Result<String> {
        let session = self.require_session()?;
        let txn = {
            let mut guard = self.inner.crypto.lock().await;
            let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
            // We must know the device's keys to check its MAC at the end.
            crypto.machine.update_tracked_users([user_id.to_owned()]);
            self.flush_crypto(&session, crypto).await?;
            if crypto.machine.get_device(user_id, device_id).is_none() {
                return Err(Error::InvalidInput(format!("{user_id} has no device {device_id}.")));
            }
            let txn = crypto.machine.request_verification(user_id, device_id);
            self.flush_crypto(&session, crypto).await?;
            txn
        };
        self.inner
            .verification_ids
            .lock()
            .expect("verification ids")
            .insert(txn.clone(), (user_id.to_owned(), Some(device_id.to_owned())));
        self.emit_verification_changes().await;
        Ok(txn)
    }

    /// Verifications in progress or finished in this run of the app.
    pub async fn verifications(&self) -> Vec<Verification> {
        let known: Vec<_> = self.inner.verification_ids.lock().expect("verification ids").clone().into_iter().collect();
        let guard = self.inner.crypto.lock().await;
        let Some(crypto) = guard.as_ref() else { return Vec::new() };
        let mut all: Vec<(String, OwnedUserId, Option<String>)> =
            known.into_iter().map(|(txn, (user, device))| (txn, user, device)).collect();
        for (txn, user, device) in crypto.machine.incoming_verification_requests() {
            if !all.iter().any(|(t, ..)| *t == txn) {
                all.push((txn, user, device.map(|d| d.to_string())));
            }
        }
        all.into_iter()
            .filter_map(|(txn, other_user, other_device)| {
                let state = crypto.machine.verification_state(&txn)?;
                let status = match state {
                    VerificationState::Incoming => VerificationStatus::Requested,
                    VerificationState::Requested | VerificationState::Negotiating | VerificationState::Confirmed => {
                        VerificationStatus::Waiting
                    }
                    VerificationState::ShowSas => VerificationStatus::ShowEmoji(
                        crypto
                            .machine
                            .sas_emoji(&txn)?
                            .iter()
                            .map(|(symbol, name)| SasEmoji { symbol: (*symbol).into(), name: (*name).into() })
                            .collect(),
                    ),
                    VerificationState::Done => VerificationStatus::Done,
                    VerificationState::Cancelled { reason, .. } => VerificationStatus::Cancelled { reason },
                };
                Some(Verification { id: txn, other_user, other_device, status })
            })
            .collect()
    }

    /// Accepts a verification someone asked us for.
    pub async fn accept_verification(&self, id: &str) -> Result<()> {
        self.verification_step(|machine| machine.accept_verification(id)).await
    }

    /// The user compared the emoji and they match.
    pub async fn confirm_verification(&self, id: &str) -> Result<()> {
        self.verification_step(|machine| machine.confirm_verification(id)).await
    }

    /// Cancels (also: the emoji do not match).
    pub async fn cancel_verification(&self, id: &str, emoji_mismatch: bool) -> Result<()> {
        let (code, reason) =
            if emoji_mismatch { ("m.mismatched_sas", "The emoji did not match") } else { ("m.user", "Cancelled") };
        self.verification_step(|machine| machine.cancel_verification(id, code, reason)).await
    }

    async fn verification_step(&self, step: impl FnOnce(&mut e2ee::OlmMachine) -> e2ee::Result<()>) -> Result<()> {
        let session = self.require_session()?;
        {
            let mut guard = self.inner.crypto.lock().await;
            let crypto = guard.as_mut().ok_or(Error::NotLoggedIn)?;
            step(&mut crypto.machine).map_err(|e| Error::InvalidInput(format!("Verification: {e}")))?;
            self.flush_crypto(&session, crypto).await?;
        }
        self.emit_verification_changes().await;
        Ok(())
    }

    /// Reports every verification whose status changed since the last report.
    pub(crate) async fn emit_verification_changes(&self) {
        for verification in self.verifications().await {
            let changed = {
                let mut seen = self.inner.verification_seen.lock().expect("verification seen");
                let changed = seen.get(&verification.id) != Some(&verification.status);
                seen.insert(verification.id.clone(), verification.status.clone());
                changed
            };
            if changed {
                if verification.status == VerificationStatus::Done
                    && let Some(device) = &verification.other_device
                {
                    self.cross_sign_verified(&verification.other_user, device).await;
                }
                self.emit(Update::Verification { verification });
            }
        }
    }
}
