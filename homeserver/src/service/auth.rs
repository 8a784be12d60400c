//! Who is making this request: access token to (user, device).

use std::net::IpAddr;

use ruma::{OwnedDeviceId, OwnedUserId};

use super::{Hub, credentials::hash_token};
use crate::{
    error::{Error, Result},
    store::now_ms,
};

/// An authenticated client.
#[derive(Debug, Clone)]
pub struct AuthedUser {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

/// How stale a device's "last seen" may get before a request refreshes it: writing on every
/// request would turn each read into a write.
const LAST_SEEN_GRANULARITY_MS: i64 = 60_000;

/// Access tokens: who a request comes from.
pub struct Auth {
    hub: Hub,
}

impl Auth {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// Resolves an access token. Unknown tokens and tokens of deactivated accounts are
    /// `M_UNKNOWN_TOKEN`.
    pub async fn authenticate(&self, token: &str, ip: IpAddr) -> Result<AuthedUser> {
        let s = self.hub.services();
        let owner = s.store.access_token_owner(&hash_token(token)).await?.ok_or(Error::UnknownToken)?;
        if owner.deactivated {
            return Err(Error::UnknownToken);
        }
        let now = now_ms();
        if owner.last_seen_ts.is_none_or(|seen| now - seen > LAST_SEEN_GRANULARITY_MS) {
            // Best effort: a failed "last seen" update must not fail the request.
            if let Err(e) = s.store.touch_device(&owner.user_id, &owner.device_id, Some(&ip.to_string()), now).await {
                tracing::warn!(error = %e, "cannot update device last-seen");
            }
        }
        let user_id = OwnedUserId::try_from(owner.user_id)
            .map_err(|e| Error::internal(format!("stored user id is invalid: {e}")))?;
        Ok(AuthedUser { user_id, device_id: owner.device_id.into() })
    }
}
