//! The error every command returns to the frontend: `{ "kind": ..., "message": ... }`.
//! `message` is the core's sentence for a person (obmin_client::Error's Display); `kind` lets
//! the frontend (and the UI tests) tell the cases apart without parsing text.

use serde::Serialize;

#[derive(Debug, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub kind: &'static str,
    pub message: String,
}

impl CommandError {
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self { kind: "invalid_input", message: message.into() }
    }
}

impl From<obmin_client::Error> for CommandError {
    fn from(error: obmin_client::Error) -> Self {
        use obmin_client::Error as E;
        let kind = match &error {
            E::ServerUnreachable { .. } => "server_unreachable",
            E::NetworkDropped => "network_dropped",
            E::NotAMatrixServer { .. } => "not_a_matrix_server",
            E::InvalidServerUrl { .. } => "invalid_server_url",
            E::WrongPassword => "wrong_password",
            E::UserTaken(_) => "user_taken",
            E::InvalidUsername(_) => "invalid_username",
            E::RegistrationDisabled => "registration_disabled",
            E::SessionExpired => "session_expired",
            E::NotLoggedIn => "not_logged_in",
            E::PasswordNeeded => "password_needed",
            E::RateLimited { .. } => "rate_limited",
            E::Forbidden { .. } => "forbidden",
            E::NotFound { .. } => "not_found",
            E::Server { .. } => "server",
            E::InvalidInput(_) => "invalid_input",
            E::Crypto(_) => "crypto",
            E::Locked => "locked",
            E::WrongPassphrase => "wrong_passphrase",
            E::KeyringUnavailable => "keyring_unavailable",
            E::Keyring(_) => "keyring",
            E::Store(_) => "store",
            E::File(_) => "file",
        };
        Self { kind, message: error.to_string() }
    }
}

impl From<tauri::Error> for CommandError {
    fn from(error: tauri::Error) -> Self {
        Self { kind: "app", message: error.to_string() }
    }
}

pub type CommandResult<T> = Result<T, CommandError>;
