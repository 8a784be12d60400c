//! Pushers: where a user's push notifications go (`/pushers`, `/pushers/set`). Delivery to
//! push gateways is in [`super::push_gateway`].

use ruma::api::client::push::{Pusher, PusherIds, PusherKind};

use super::{auth::AuthedUser, push::Push};
use crate::{
    error::{Error, Result},
    store::{NewPusher, now_ms},
};

/// The spec's limits on the identifiers.
const MAX_APP_ID_BYTES: usize = 64;
const MAX_PUSHKEY_BYTES: usize = 512;
/// The only path a push gateway serves notifications on (Push Gateway API v1).
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

impl Push {
    /// `GET /pushers`.
    pub async fn pushers(&self, user: &AuthedUser) -> Result<Vec<Pusher>> {
        let s = self.hub.services();
        let rows = s.store.pushers(user.user_id.as_str()).await?;
        rows.iter()
            .map(|row| {
                serde_json::from_str::<Pusher>(&row.pusher_json)
                    .map_err(|e| Error::internal(format!("stored pusher {}: {e}", row.app_id)))
            })
            .collect()
    }

    /// `POST /pushers/set` with a pusher: adds or replaces it. It belongs to the caller's
    /// device and is deleted with it.
    pub async fn set_pusher(&self, user: &AuthedUser, pusher: &Pusher, append: bool) -> Result<()> {
        let s = self.hub.services();
        check_ids(&pusher.ids)?;
        let kind = match &pusher.kind {
            PusherKind::Http(data) => {
                self.check_gateway_url(&data.url)?;
                "http"
            }
            PusherKind::Email(_) => {
                // The pushkey of an email pusher is the address mail goes to.
                if !pusher.ids.pushkey.contains('@') {
                    return Err(Error::InvalidParam("An email pusher's pushkey is an email address".to_owned()));
                }
                "email"
            }
            _ => return Err(Error::InvalidParam("`kind` must be \"http\" or \"email\"".to_owned())),
        };
        let json = serde_json::to_string(pusher).map_err(|e| Error::internal(e.to_string()))?;
        s.store
            .set_pusher(
                NewPusher {
                    user_id: user.user_id.as_str(),
                    device_id: user.device_id.as_str(),
                    app_id: &pusher.ids.app_id,
                    pushkey: &pusher.ids.pushkey,
                    kind,
                    pusher_json: &json,
                    now: now_ms(),
                    // Nothing from before the pusher existed is pushed.
                    start_after: s.streams.current().stream,
                },
                append,
            )
            .await?;
        Ok(())
    }

    /// `POST /pushers/set` with `kind: null`: deletes the pusher (no error if there is none).
    pub async fn delete_pusher(&self, user: &AuthedUser, ids: &PusherIds) -> Result<()> {
        let s = self.hub.services();
        check_ids(ids)?;
        s.store.delete_pusher(user.user_id.as_str(), &ids.app_id, &ids.pushkey).await?;
        Ok(())
    }

    /// An HTTP pusher's `data.url`: an http(s) URL of a gateway's notify endpoint, and not
    /// a literal address the configuration refuses (names are checked when they resolve).
    fn check_gateway_url(&self, url: &str) -> Result<()> {
        let s = self.hub.services();
        let parsed = url::Url::parse(url).map_err(|e| Error::InvalidParam(format!("`data.url` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::InvalidParam("`data.url` must be an http or https URL".to_owned()));
        }
        if parsed.path() != NOTIFY_PATH {
            return Err(Error::InvalidParam(format!("`data.url` must have the path {NOTIFY_PATH}")));
        }
        let literal = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => None,
            None => return Err(Error::InvalidParam("`data.url` has no host".to_owned())),
        };
        if literal.is_some_and(|ip| !s.settings.push.gateway_address_allowed(ip)) {
            return Err(Error::InvalidParam("This server may not send notifications to that address".to_owned()));
        }
        Ok(())
    }
}

fn check_ids(ids: &PusherIds) -> Result<()> {
    if ids.app_id.is_empty() || ids.app_id.len() > MAX_APP_ID_BYTES {
        return Err(Error::InvalidParam(format!("`app_id` must be 1 to {MAX_APP_ID_BYTES} bytes")));
    }
    if ids.pushkey.is_empty() || ids.pushkey.len() > MAX_PUSHKEY_BYTES {
        return Err(Error::InvalidParam(format!("`pushkey` must be 1 to {MAX_PUSHKEY_BYTES} bytes")));
    }
    Ok(())
}
