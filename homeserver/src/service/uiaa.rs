//! User-interactive authentication (UIA): which stages an action needs, and checking them.
//!
//! Sessions live in the database so a multi-step flow survives a restart and works across
//! several homeserver processes. A session is bound to one action and, for actions on an
//! existing account, to that account.

use ruma::{
    UserId,
    api::{
        client::uiaa::{AuthData, AuthFlow, AuthType, UiaaInfo, UserIdentifier},
        error::{ErrorKind, StandardErrorBody},
    },
};

use super::{
    Hub, credentials,
    rate_limit::{Class, Key},
};
use crate::{
    config::RegistrationMode,
    error::{Error, Result},
    store::now_ms,
};

/// How long a UIA session may take from its first request to its last.
pub const SESSION_LIFETIME_MS: i64 = 15 * 60 * 1000;

/// What a UIA session authorises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UiaaAction {
    Register,
    ChangePassword,
    Deactivate,
    DeleteDevices,
    UploadCrossSigningKeys,
}

impl UiaaAction {
    fn as_str(self) -> &'static str {
        match self {
            UiaaAction::Register => "register",
            UiaaAction::ChangePassword => "change_password",
            UiaaAction::Deactivate => "deactivate",
            UiaaAction::DeleteDevices => "delete_devices",
            UiaaAction::UploadCrossSigningKeys => "upload_cross_signing_keys",
        }
    }
}

/// What a session has established so far.
struct Progress {
    /// The stages passed, as their type names.
    completed: Vec<String>,
    registration_token: Option<String>,
}

/// A completed UIA: the session to delete once the action is committed, and what the
/// stages established.
#[derive(Debug)]
pub struct UiaaCompleted {
    pub session_id: String,
    pub registration_token: Option<String>,
}

/// User-interactive authentication: the flows each action needs and the sessions that
/// track them.
pub struct Uiaa {
    hub: Hub,
}

impl Uiaa {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }

    fn flows(&self, action: UiaaAction) -> Vec<AuthFlow> {
        let s = self.hub.services();
        match action {
            UiaaAction::Register => match s.settings.registration {
                RegistrationMode::Token => vec![AuthFlow::new(vec![AuthType::RegistrationToken])],
                _ => vec![AuthFlow::new(vec![AuthType::Dummy])],
            },
            _ => vec![AuthFlow::new(vec![AuthType::Password])],
        }
    }

    /// Runs one round of UIA for `action` by `user` (None while registering).
    ///
    /// Returns `Err(Error::Uiaa(..))` (a 401 with flows and session) until a flow is
    /// complete, then the completed session.
    pub async fn check(
        &self,
        action: UiaaAction,
        user: Option<&UserId>,
        auth: Option<&AuthData>,
    ) -> Result<UiaaCompleted> {
        let s = self.hub.services();
        let now = now_ms();
        let flows = self.flows(action);
        let user_str = user.map(|u| u.as_str());

        let session_id = match auth.and_then(|a| a.session()) {
            Some(id) => id.to_owned(),
            None => {
                let id = credentials::random_string(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 24);
                s.store.create_uiaa_session(&id, action.as_str(), user_str, now).await?;
                id
            }
        };
        let session = s
            .store
            .uiaa_session(&session_id, now - SESSION_LIFETIME_MS)
            .await?
            .ok_or_else(|| Error::InvalidParam("Unknown or expired UIA session".to_owned()))?;
        if session.action != action.as_str() || session.user_id.as_deref() != user_str {
            return Err(Error::Forbidden("This UIA session was started for another request".to_owned()));
        }

        let mut progress =
            Progress { completed: session.completed.clone(), registration_token: session.registration_token.clone() };
        let mut auth_error = None;
        if let Some(auth) = auth {
            let offered = auth.auth_type().is_some_and(|t| flows.iter().any(|f| f.stages.contains(&t)));
            auth_error = self.apply_stage(auth, offered, user, now, &mut progress).await?;
            progress.completed.dedup();
            s.store
                .update_uiaa_session(&session_id, &progress.completed, progress.registration_token.as_deref())
                .await?;
        }
        let Progress { completed, registration_token } = progress;

        let done = flows.iter().any(|flow| flow.stages.iter().all(|stage| completed.contains(&stage.to_string())));
        if done {
            return Ok(UiaaCompleted { session_id, registration_token });
        }
        let mut info = UiaaInfo::new(flows);
        info.completed = completed.iter().map(|s| AuthType::from(s.as_str())).collect();
        info.session = Some(session_id);
        info.params = serde_json::value::to_raw_value(&serde_json::json!({})).ok();
        info.auth_error = auth_error.map(Box::new);
        Err(Error::Uiaa(Box::new(info)))
    }

    /// Checks one stage the client offered and records it in `progress` when it passes;
    /// the error to show the client when it does not.
    async fn apply_stage(
        &self,
        auth: &AuthData,
        offered: bool,
        user: Option<&UserId>,
        now: i64,
        progress: &mut Progress,
    ) -> Result<Option<StandardErrorBody>> {
        let s = self.hub.services();
        let refused = |kind, message: &str| Ok(Some(StandardErrorBody::new(kind, message.to_owned())));
        match (auth, offered) {
            (_, false) => refused(ErrorKind::Unrecognized, "This authentication stage is not offered here"),
            (AuthData::Dummy(_), true) => {
                progress.completed.push(AuthType::Dummy.to_string());
                Ok(None)
            }
            (AuthData::RegistrationToken(t), true) => {
                let valid = s.store.registration_token(&t.token).await?.is_some_and(|row| row.is_valid_at(now));
                if !valid {
                    return refused(ErrorKind::Forbidden, "Invalid registration token");
                }
                progress.completed.push(AuthType::RegistrationToken.to_string());
                progress.registration_token = Some(t.token.clone());
                Ok(None)
            }
            (AuthData::Password(p), true) => {
                let Some(user) = user else {
                    return Err(Error::internal("password stage offered without a user"));
                };
                // Failed password stages count with failed logins (`rc_login.failed_attempts`):
                // a stolen access token must not open a way to guess the password.
                let account = Key::Id(user.as_str());
                s.rate_limits.peek(None, Class::LoginFailedAttempts, account)?;
                if !self.password_stage_matches(user, &p.identifier, &p.password).await? {
                    s.rate_limits.record(None, Class::LoginFailedAttempts, account);
                    return refused(ErrorKind::Forbidden, "Invalid password");
                }
                progress.completed.push(AuthType::Password.to_string());
                Ok(None)
            }
            (_, true) => refused(ErrorKind::Unrecognized, "Unsupported authentication stage"),
        }
    }

    /// Forgets a session once the action it authorised is committed.
    pub async fn finish(&self, completed: UiaaCompleted) {
        let s = self.hub.services();
        if let Err(e) = s.store.delete_uiaa_session(&completed.session_id).await {
            tracing::warn!(error = %e, "cannot delete a finished UIA session");
        }
    }

    async fn password_stage_matches(&self, user: &UserId, identifier: &UserIdentifier, password: &str) -> Result<bool> {
        let s = self.hub.services();
        let UserIdentifier::Matrix(id) = identifier else {
            return Ok(false);
        };
        if s.accounts.resolve_local_user(&id.user).ok().as_deref() != Some(user) {
            return Ok(false);
        }
        let stored = s.store.user(user.as_str()).await?.filter(|u| !u.deactivated).and_then(|u| u.password_hash);
        credentials::verify_password(&s.hashing, password.to_owned(), stored).await
    }
}
