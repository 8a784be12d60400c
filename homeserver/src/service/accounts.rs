//! Accounts: registration, login, logout, password change and deactivation.

use std::net::IpAddr;

use ruma::{OwnedUserId, UserId};

use super::{
    Hub,
    auth::AuthedUser,
    credentials::{self, hash_password, hash_token, new_access_token, new_device_id, verify_password},
    rate_limit::{Class, Key},
    uiaa::UiaaAction,
};
use crate::{
    config::RegistrationMode,
    error::{Error, Result},
    store::{CreateAccountOutcome, LogoutDevices, NewAccount, NewDevice, UserRow, now_ms},
};

/// Longest device id or display name we store, to keep rows and responses bounded.
const MAX_DEVICE_FIELD_BYTES: usize = 512;

/// What a registration asks for.
#[derive(Debug, Default)]
pub struct Registration {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub auth: Option<ruma::api::client::uiaa::AuthData>,
    pub is_guest: bool,
}

/// A new login session.
#[derive(Debug)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub access_token: String,
}

/// The result of a registration: the account, and a session unless login was inhibited.
#[derive(Debug)]
pub struct Registered {
    pub user_id: OwnedUserId,
    pub session: Option<Session>,
}

/// A password login: who, with what, on which device.
#[derive(Debug)]
pub struct PasswordLogin {
    pub ip: IpAddr,
    /// `alice` or `@alice:server`.
    pub identifier: String,
    pub password: String,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
}

/// Accounts: creating them, logging in and out, passwords and deactivation.
pub struct Accounts {
    hub: Hub,
}

impl Accounts {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    /// Checks a requested localpart: the characters the spec allows for new accounts
    /// (`a-z 0-9 . _ = - / +`) and a full user id of at most 255 bytes.
    pub fn validate_new_localpart(&self, localpart: &str) -> Result<OwnedUserId> {
        let s = self.hub.services();
        if localpart.is_empty() {
            return Err(Error::InvalidUsername("The username must not be empty".to_owned()));
        }
        if !localpart.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
        {
            return Err(Error::InvalidUsername(
                "A username may only contain a-z, 0-9, '.', '_', '=', '-', '/' and '+'".to_owned(),
            ));
        }
        let user_id = format!("@{localpart}:{}", s.settings.server_name);
        if user_id.len() > 255 {
            return Err(Error::InvalidUsername("The user id would be longer than 255 bytes".to_owned()));
        }
        UserId::parse(user_id).map_err(|e| Error::InvalidUsername(format!("Invalid username: {e}")))
    }

    /// Is this localpart free for a new account? Errors say why not.
    pub async fn check_username_available(&self, localpart: &str) -> Result<OwnedUserId> {
        let user_id = self.validate_new_localpart(localpart)?;
        if self.hub.services().store.localpart_exists(localpart).await? {
            return Err(Error::UserInUse);
        }
        Ok(user_id)
    }

    /// Maps a login identifier (`alice`, `@alice:server`) to a local user id. Localparts are
    /// case-insensitive, as every account is created lower-case.
    pub fn resolve_local_user(&self, identifier: &str) -> Result<OwnedUserId> {
        let s = self.hub.services();
        let user_id = if identifier.starts_with('@') {
            let parsed =
                UserId::parse(identifier).map_err(|e| Error::InvalidUsername(format!("Invalid user id: {e}")))?;
            if parsed.server_name() != s.settings.server_name {
                return Err(Error::Forbidden("That user is not on this server".to_owned()));
            }
            format!("@{}:{}", parsed.localpart().to_lowercase(), s.settings.server_name)
        } else {
            format!("@{}:{}", identifier.to_lowercase(), s.settings.server_name)
        };
        UserId::parse(user_id).map_err(|e| Error::InvalidUsername(format!("Invalid user id: {e}")))
    }

    /// `POST /register`: validates, runs UIA, creates the account (and its first session).
    pub async fn register(&self, ip: IpAddr, req: Registration) -> Result<Registered> {
        let s = self.hub.services();
        if req.is_guest {
            return Err(Error::GuestAccessForbidden);
        }
        if s.settings.registration == RegistrationMode::Disabled {
            return Err(Error::Forbidden("Registration is disabled on this server".to_owned()));
        }
        let localpart = match &req.username {
            Some(name) => name.clone(),
            None => self.generate_localpart().await?,
        };
        let user_id = self.check_username_available(&localpart).await?;
        let password = req.password.ok_or_else(|| Error::MissingParam("A password is required".to_owned()))?;
        if password.len() > credentials::MAX_PASSWORD_BYTES {
            return Err(Error::InvalidParam("The password is too long".to_owned()));
        }
        check_device_fields(req.device_id.as_deref(), req.initial_device_display_name.as_deref())?;

        // Every registration token tried counts, here as at the validity check: tokens are
        // guessed one request at a time.
        if matches!(req.auth, Some(ruma::api::client::uiaa::AuthData::RegistrationToken(_))) {
            s.rate_limits.check_address(Class::RegistrationTokenValidity, ip)?;
        }
        let uiaa = s.uiaa.check(UiaaAction::Register, None, req.auth.as_ref()).await?;
        // Only a request that completed UIA counts against the limit, so the first round
        // trip that only asks for the flows does not use up a client's allowance.
        s.rate_limits.check_address(Class::Registration, ip)?;

        let password_hash = hash_password(&s.hashing, password).await?;
        let now = now_ms();
        let session = (!req.inhibit_login).then(|| {
            let token = new_access_token();
            (req.device_id.clone().unwrap_or_else(new_device_id), hash_token(&token), token)
        });
        let ip_text = ip.to_string();
        let outcome = s
            .store
            .create_account(NewAccount {
                user_id: user_id.as_str(),
                localpart: &localpart,
                password_hash: Some(&password_hash),
                is_admin: false,
                now,
                device: session.as_ref().map(|(device_id, token_hash, _)| NewDevice {
                    device_id,
                    display_name: req.initial_device_display_name.as_deref(),
                    token_hash,
                    ip: Some(&ip_text),
                }),
                registration_token: uiaa.registration_token.as_deref(),
                display_name: Some(&localpart),
            })
            .await?;
        match outcome {
            CreateAccountOutcome::Created => {}
            CreateAccountOutcome::UserInUse => return Err(Error::UserInUse),
            CreateAccountOutcome::RegistrationTokenInvalid => {
                return Err(Error::Forbidden("The registration token is no longer valid".to_owned()));
            }
        }
        s.uiaa.finish(uiaa).await;
        tracing::info!(%user_id, "registered a new account");
        Ok(Registered {
            user_id: user_id.clone(),
            session: session.map(|(device_id, _, access_token)| Session { user_id, device_id, access_token }),
        })
    }

    /// Creates an account from the command line (no UIA, no registration mode check).
    pub async fn create_from_cli(&self, localpart: &str, password: String, is_admin: bool) -> Result<OwnedUserId> {
        let s = self.hub.services();
        let user_id = self.check_username_available(localpart).await?;
        let password_hash = hash_password(&s.hashing, password).await?;
        let outcome = s
            .store
            .create_account(NewAccount {
                user_id: user_id.as_str(),
                localpart,
                password_hash: Some(&password_hash),
                is_admin,
                now: now_ms(),
                device: None,
                registration_token: None,
                display_name: Some(localpart),
            })
            .await?;
        match outcome {
            CreateAccountOutcome::Created => Ok(user_id),
            _ => Err(Error::UserInUse),
        }
    }

    async fn generate_localpart(&self) -> Result<String> {
        let s = self.hub.services();
        for _ in 0..10 {
            let candidate = credentials::random_string(b"abcdefghijklmnopqrstuvwxyz0123456789", 12);
            if !s.store.localpart_exists(&candidate).await? {
                return Ok(candidate);
            }
        }
        Err(Error::internal("cannot find a free generated username"))
    }

    /// `m.login.password`: checks the password and opens a session on a new or given device.
    pub async fn login_with_password(&self, login: PasswordLogin) -> Result<Session> {
        let s = self.hub.services();
        let PasswordLogin { ip, identifier, password, device_id, initial_device_display_name } = login;
        let invalid = || Error::Forbidden("Invalid username or password".to_owned());
        let user_id = match self.resolve_local_user(&identifier) {
            Ok(id) => id,
            Err(e) => {
                s.rate_limits.check_address(Class::LoginAddress, ip)?;
                return Err(if matches!(e, Error::InvalidUsername(_)) { invalid() } else { e });
            }
        };
        let user = s.store.user(user_id.as_str()).await?;
        // Every attempt counts for the address, and for the account when there is one (ids
        // that name no account get no bucket: nothing to guess there, and made-up ids must
        // not fill the table). Failed attempts are refused before the password is checked.
        let account = Key::Id(user_id.as_str());
        if user.is_some() {
            s.rate_limits.peek(None, Class::LoginFailedAttempts, account)?;
            s.rate_limits.check(None, &[(Class::LoginAddress, Key::Address(ip)), (Class::LoginAccount, account)])?;
        } else {
            s.rate_limits.check_address(Class::LoginAddress, ip)?;
        }
        check_device_fields(device_id.as_deref(), initial_device_display_name.as_deref())?;
        let stored = user.as_ref().filter(|u| !u.deactivated).and_then(|u| u.password_hash.clone());
        if !verify_password(&s.hashing, password, stored).await? {
            if user.is_some() {
                s.rate_limits.record(None, Class::LoginFailedAttempts, account);
            }
            if user.is_some_and(|u| u.deactivated) {
                return Err(Error::UserDeactivated);
            }
            return Err(invalid());
        }
        let device_id = device_id.unwrap_or_else(new_device_id);
        let access_token = new_access_token();
        let token_hash = hash_token(&access_token);
        let ip_text = ip.to_string();
        s.store
            .login_device(
                user_id.as_str(),
                &NewDevice {
                    device_id: &device_id,
                    display_name: initial_device_display_name.as_deref(),
                    token_hash: &token_hash,
                    ip: Some(&ip_text),
                },
                now_ms(),
            )
            .await?;
        Ok(Session { user_id, device_id, access_token })
    }

    /// `POST /logout`: ends this session and removes its device.
    pub async fn logout(&self, user: &AuthedUser) -> Result<()> {
        let s = self.hub.services();
        s.store.delete_devices(user.user_id.as_str(), &[user.device_id.as_str()]).await?;
        s.keys.devices_removed(user.user_id.as_str(), &[user.device_id.to_string()]).await
    }

    /// `POST /logout/all`: ends every session of the account.
    pub async fn logout_all(&self, user: &AuthedUser) -> Result<()> {
        let s = self.hub.services();
        let before = s.devices.ids(user.user_id.as_str()).await?;
        s.store.delete_all_devices(user.user_id.as_str()).await?;
        s.keys.devices_removed(user.user_id.as_str(), &before).await
    }

    /// `POST /account/password` (after UIA).
    pub async fn change_password(&self, user: &AuthedUser, new_password: String, logout_devices: bool) -> Result<()> {
        let s = self.hub.services();
        let hash = hash_password(&s.hashing, new_password).await?;
        let logout =
            if logout_devices { LogoutDevices::AllExcept(user.device_id.as_str()) } else { LogoutDevices::None };
        let before = s.devices.ids(user.user_id.as_str()).await?;
        if !s.store.set_password(user.user_id.as_str(), &hash, logout).await? {
            return Err(Error::UserDeactivated);
        }
        s.devices.forget_removed(user.user_id.as_str(), before).await
    }

    /// Sets a password from the command line, logging out every device.
    pub async fn reset_password(&self, user_id: &UserId, new_password: String) -> Result<()> {
        let s = self.hub.services();
        let hash = hash_password(&s.hashing, new_password).await?;
        match s.store.user(user_id.as_str()).await? {
            None => Err(Error::NotFound(format!("No such user: {user_id}"))),
            Some(u) if u.deactivated => Err(Error::UserDeactivated),
            Some(_) => {
                let before = s.devices.ids(user_id.as_str()).await?;
                s.store.set_password(user_id.as_str(), &hash, LogoutDevices::All).await?;
                s.devices.forget_removed(user_id.as_str(), before).await
            }
        }
    }

    /// Every account, for the operator's listing.
    pub async fn list(&self) -> Result<Vec<UserRow>> {
        Ok(self.hub.services().store.users().await?)
    }

    /// Is there an account (active or not) with this id?
    pub async fn exists(&self, user_id: &UserId) -> Result<bool> {
        Ok(self.hub.services().store.user(user_id.as_str()).await?.is_some())
    }

    /// Deactivates an account for good; false if it was already deactivated.
    pub async fn deactivate(&self, user_id: &UserId) -> Result<bool> {
        let s = self.hub.services();
        let before = s.devices.ids(user_id.as_str()).await?;
        let done = s.store.deactivate_user(user_id.as_str()).await?;
        s.devices.forget_removed(user_id.as_str(), before).await?;
        if done {
            tracing::info!(%user_id, "deactivated an account");
        }
        Ok(done)
    }
}

fn check_device_fields(device_id: Option<&str>, display_name: Option<&str>) -> Result<()> {
    if device_id.is_some_and(|id| id.is_empty() || id.len() > MAX_DEVICE_FIELD_BYTES) {
        return Err(Error::InvalidParam("device_id must be 1 to 512 bytes".to_owned()));
    }
    if display_name.is_some_and(|n| n.len() > MAX_DEVICE_FIELD_BYTES) {
        return Err(Error::InvalidParam("The device display name is longer than 512 bytes".to_owned()));
    }
    Ok(())
}
