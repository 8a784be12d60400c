//! Registration tokens, as the CLI and `/register/m.login.registration_token/validity` use them.

use super::{Hub, credentials};
use crate::{
    error::{Error, Result},
    store::{RegistrationTokenRow, now_ms},
};

/// The characters the spec allows in a registration token.
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 64
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// Registration tokens: creating them and checking one before a registration uses it.
pub struct RegistrationTokens {
    hub: Hub,
}

impl RegistrationTokens {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    pub async fn create(
        &self,
        token: Option<String>,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
    ) -> Result<RegistrationTokenRow> {
        let token = token.unwrap_or_else(|| {
            credentials::random_string(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", 16)
        });
        if !valid_token(&token) {
            return Err(Error::InvalidParam("A token is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -".to_owned()));
        }
        if uses_allowed.is_some_and(|n| n < 0) {
            return Err(Error::InvalidParam("uses_allowed must not be negative".to_owned()));
        }
        let now = now_ms();
        if !self.hub.services().store.create_registration_token(&token, uses_allowed, expiry_ts, now).await? {
            return Err(Error::InvalidParam(format!("The token {token} already exists")));
        }
        Ok(RegistrationTokenRow { token, uses_allowed, completed: 0, expiry_ts, created_ts: now })
    }

    /// Could this token be used to register right now?
    pub async fn is_valid(&self, token: &str) -> Result<bool> {
        if !valid_token(token) {
            return Ok(false);
        }
        Ok(self.hub.services().store.registration_token(token).await?.is_some_and(|row| row.is_valid_at(now_ms())))
    }

    /// Every token, valid or not, for the operator's listing.
    pub async fn list(&self) -> Result<Vec<RegistrationTokenRow>> {
        Ok(self.hub.services().store.registration_tokens().await?)
    }

    /// Deletes `token`; false if there was none.
    pub async fn revoke(&self, token: &str) -> Result<bool> {
        Ok(self.hub.services().store.revoke_registration_token(token).await?)
    }
}
