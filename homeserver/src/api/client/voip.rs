//! `/voip/turnServer`: time-limited TURN credentials for calls.

use std::{sync::Arc, time::Duration};

use axum::extract::State;
use base64::Engine;
use hmac::{Hmac, Mac};
use ruma::api::client::voip::get_turn_server_info;
use sha1::Sha1;

use crate::{
    api::ruma::{Ruma, RumaResponse},
    error::{Error, Result},
    service::Services,
    store::now_ms,
};

/// coturn's `use-auth-secret` scheme (the TURN REST API): the username is
/// `<expiry unix seconds>:<user id>` and the password is base64(HMAC-SHA1(secret, username)).
pub fn turn_credentials(secret: &str, user_id: &str, expires_at_secs: i64) -> Result<(String, String)> {
    let username = format!("{expires_at_secs}:{user_id}");
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).map_err(|e| Error::internal(e.to_string()))?;
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok((username, password))
}

/// `GET /_matrix/client/v3/voip/turnServer`
pub async fn turn_server(
    State(services): State<Arc<Services>>,
    req: Ruma<get_turn_server_info::v3::Request>,
) -> Result<RumaResponse<get_turn_server_info::v3::Response>> {
    let user = req.user()?.clone();
    let turn = &services.settings.turn;
    if turn.uris.is_empty() {
        return Err(Error::NotFound("No TURN server is configured on this homeserver".to_owned()));
    }
    let lifetime = turn.credential_lifetime_secs;
    let expires = now_ms() / 1000 + i64::try_from(lifetime).unwrap_or(86_400);
    let (username, password) = turn_credentials(&turn.shared_secret, user.user_id.as_str(), expires)?;
    Ok(RumaResponse(get_turn_server_info::v3::Response::new(
        username,
        password,
        turn.uris.clone(),
        Duration::from_secs(lifetime),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_match_coturn_known_answer() {
        // Computed independently: printf '%s' '1700000000:@alice:example.org' |
        //   openssl dgst -sha1 -hmac 'secret' -binary | base64
        let (user, pass) = turn_credentials("secret", "@alice:example.org", 1_700_000_000).unwrap();
        assert_eq!(user, "1700000000:@alice:example.org");
        assert_eq!(pass, KNOWN);
    }

    const KNOWN: &str = "g/l/t/tR2Emj7Ax0fkxwtp3GUrQ=";
}
