//! Signing in and out: password login, registration (user-interactive auth with
//! `m.login.dummy`), logout; the session is saved in the local store and restored by
//! [`Client::open`].

use ruma::{
    OwnedUserId,
    api::client::{
        account::register,
        profile::{ProfileFieldValue, set_profile_field},
        session::{
            login::{self, v3::LoginInfo},
            logout,
        },
        uiaa::{AuthData, Dummy, UserIdentifier},
    },
};
use serde_json::json;

use crate::{Client, Error, Result, SessionInfo, Update, http::REQUEST_TIMEOUT};

/// A signed-in session: where, who, and the access token.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub server_url: String,
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub access_token: String,
}

impl Session {
    pub(crate) fn info(&self) -> SessionInfo {
        SessionInfo {
            server_url: self.server_url.clone(),
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
        }
    }
}

/// The homeserver address as typed, made a base URL. A bare host name means `https://`:
/// plain HTTP would hand the password and the access token to anyone on the path. Only an
/// explicit `http://`, or a bare loopback address (`localhost`, `127.0.0.1`, `[::1]`: it
/// never leaves the machine), is plain HTTP. The app's default is `http://localhost:8008`.
fn normalise_server_url(url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    let invalid = || Error::InvalidServerUrl { url: url.to_owned() };
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        let as_https = reqwest::Url::parse(&format!("https://{url}")).map_err(|_| invalid())?;
        let scheme = if is_loopback(&as_https) { "http" } else { "https" };
        format!("{scheme}://{url}")
    };
    match reqwest::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => Ok(url),
        _ => Err(Error::InvalidServerUrl { url }),
    }
}

/// Whether the URL's host is this machine: `localhost` (and names under it, RFC 6761) or a
/// loopback address.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

const DEVICE_NAME: &str = "Obmin desktop";

impl Client {
    /// Signs in with a user name (or full user id) and password, replacing any saved
    /// session. Errors: [`Error::Locked`] (no passphrase given yet), [`Error::WrongPassword`], [`Error::ServerUnreachable`],
    /// [`Error::InvalidServerUrl`], ...
    pub async fn login(&self, server_url: &str, user: &str, password: &str) -> Result<SessionInfo> {
        let server_url = normalise_server_url(server_url)?;
        // The new session's encryption store is sealed at once: no session without it.
        self.require_unlocked()?;
        let identifier = UserIdentifier::Matrix(ruma::api::client::uiaa::MatrixUserIdentifier::new(user.to_owned()));
        let mut request =
            login::v3::Request::new(LoginInfo::Password(login::v3::Password::new(identifier, password.to_owned())));
        request.initial_device_display_name = Some(DEVICE_NAME.to_owned());
        let response = match self.inner.http.send(&server_url, None, request, REQUEST_TIMEOUT).await {
            // A 403 at login means the credentials were not accepted.
            Err(Error::Forbidden { .. }) => return Err(Error::WrongPassword),
            other => other?,
        };
        let info = self
            .begin_session(Session {
                server_url,
                user_id: response.user_id,
                device_id: response.device_id.to_string(),
                access_token: response.access_token,
            })
            .await?;
        self.bootstrap_cross_signing_after_sign_in(password).await;
        Ok(info)
    }

    /// Creates an account and signs in; sets the display name and, if given, the avatar
    /// colour (a custom profile field, [`crate::AVATAR_COLOUR_FIELD`]).
    pub async fn register(
        &self,
        server_url: &str,
        user: &str,
        password: &str,
        display_name: &str,
        avatar_colour: Option<&str>,
    ) -> Result<SessionInfo> {
        let server_url = normalise_server_url(server_url)?;
        self.require_unlocked()?;
        // The first round of user-interactive auth only gives us a session id; ruma models the
        // 401 as an error type, so that one exchange is plain JSON.
        let uia = self
            .inner
            .http
            .uia_session(&server_url, "/_matrix/client/v3/register", &json!({"username": user, "password": password}))
            .await
            .map_err(|e| register_error(e, user))?;
        let mut request = register::v3::Request::new();
        request.username = Some(user.to_owned());
        request.password = Some(password.to_owned());
        request.initial_device_display_name = Some(DEVICE_NAME.to_owned());
        let mut dummy = Dummy::new();
        dummy.session = uia;
        request.auth = Some(AuthData::Dummy(dummy));
        let response = self
            .inner
            .http
            .send(&server_url, None, request, REQUEST_TIMEOUT)
            .await
            .map_err(|e| register_error(e, user))?;
        let (Some(access_token), Some(device_id)) = (response.access_token, response.device_id) else {
            return Err(Error::NotAMatrixServer { url: server_url });
        };
        let info = self
            .begin_session(Session {
                server_url,
                user_id: response.user_id,
                device_id: device_id.to_string(),
                access_token,
            })
            .await?;
        self.bootstrap_cross_signing_after_sign_in(password).await;
        if !display_name.is_empty() {
            self.set_display_name(display_name).await?;
        }
        if let Some(colour) = avatar_colour {
            self.set_avatar_colour(colour).await?;
        }
        Ok(info)
    }

    /// Signs out on the server (the device and its keys go) and forgets the local session
    /// and cache. Works offline too: then only the local part happens. A saved session that
    /// cannot be opened (its key is in a keyring that is gone, or a passphrase is forgotten)
    /// is signed out locally only: its access token is sealed in the cache, so the device
    /// stays in the account's device list until it is removed from another device.
    pub async fn logout(&self) -> Result<()> {
        let session = match self.require_session() {
            Err(Error::Locked) => {
                tracing::warn!("signing out a session that is locked: locally only");
                self.stop().await;
                return self.end_session().await;
            }
            other => other?,
        };
        self.stop().await;
        match self
            .inner
            .http
            .send(&session.server_url, Some(&session.access_token), logout::v3::Request::new(), REQUEST_TIMEOUT)
            .await
        {
            Ok(_) | Err(Error::SessionExpired) => {}
            Err(e) if e.is_transient() => tracing::warn!(%e, "logged out locally only"),
            Err(e) => return Err(e),
        }
        self.end_session().await?;
        Ok(())
    }

    /// Saves a fresh session and sets up its encryption (device keys go up with the first
    /// sync's requests).
    /// Each session starts with a new cache and a new encryption store, both sealed with a
    /// new key: nothing of the previous account's stays readable.
    async fn begin_session(&self, session: Session) -> Result<SessionInfo> {
        self.stop().await;
        let mut guard = self.inner.crypto.lock().await;
        if let Some(crypto) = guard.take() {
            crypto.close().await;
        }
        self.remove_local_data().await?;
        let info = session.info();
        self.create_session_data(&mut guard, &session).await?;
        Ok(info)
    }

    /// Forgets the session locally (after logout, or when the server says the token is gone):
    /// the cache and the encryption store are removed.
    pub(crate) async fn end_session(&self) -> Result<()> {
        let mut guard = self.inner.crypto.lock().await;
        if let Some(crypto) = guard.take() {
            crypto.close().await;
        }
        self.remove_local_data().await?;
        drop(guard);
        self.set_connection(crate::ConnectionState::Offline);
        self.emit(Update::LoggedOut);
        Ok(())
    }

    /// Sets a custom profile field of ours (extensible profiles).
    pub(crate) async fn set_profile_field(&self, value: ProfileFieldValue) -> Result<()> {
        let session = self.require_session()?;
        let request = set_profile_field::v3::Request::new(session.user_id.clone(), value);
        self.inner.http.send(&session.server_url, Some(&session.access_token), request, REQUEST_TIMEOUT).await?;
        Ok(())
    }
}

fn register_error(e: Error, user: &str) -> Error {
    match e {
        Error::Server { errcode, .. } if errcode == "M_USER_IN_USE" => Error::UserTaken(user.to_owned()),
        Error::Server { errcode, .. } if errcode == "M_INVALID_USERNAME" => Error::InvalidUsername(user.to_owned()),
        Error::Forbidden { .. } => Error::RegistrationDisabled,
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_are_normalised() {
        assert_eq!(normalise_server_url("localhost:8008").unwrap(), "http://localhost:8008");
        assert_eq!(normalise_server_url("http://chat.example.org:8008").unwrap(), "http://chat.example.org:8008");
        assert_eq!(normalise_server_url(" https://chat.example.org/ ").unwrap(), "https://chat.example.org");
        assert!(matches!(normalise_server_url("ftp://x"), Err(Error::InvalidServerUrl { .. })));
        assert!(matches!(normalise_server_url("not a url"), Err(Error::InvalidServerUrl { .. })));
    }

    #[test]
    fn a_bare_host_name_means_https() {
        for (typed, url) in [
            ("chat.example.org", "https://chat.example.org"),
            ("chat.example.org:8448/", "https://chat.example.org:8448"),
            ("matrix.org", "https://matrix.org"),
            ("192.168.1.20:8008", "https://192.168.1.20:8008"),
            // Names that only look local are still somewhere else.
            ("localhost.example.org", "https://localhost.example.org"),
            ("127.0.0.1.nip.io", "https://127.0.0.1.nip.io"),
        ] {
            assert_eq!(normalise_server_url(typed).unwrap(), url, "{typed}");
        }
        // Loopback never leaves the machine: plain HTTP for a bare address.
        for (typed, url) in [
            ("localhost", "http://localhost"),
            ("LOCALHOST:8008", "http://LOCALHOST:8008"),
            ("app.localhost:8008", "http://app.localhost:8008"),
            ("127.0.0.1:8008", "http://127.0.0.1:8008"),
            ("127.9.9.9", "http://127.9.9.9"),
            ("[::1]:8008", "http://[::1]:8008"),
        ] {
            assert_eq!(normalise_server_url(typed).unwrap(), url, "{typed}");
        }
    }
}
