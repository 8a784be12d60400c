//! Errors of the client core. Every variant's `Display` is a sentence the app can show the
//! user as it is; the details (status, errcode, server text) stay in the fields for logs.

/// What went wrong, in the terms a user understands. `Clone` so it can travel in
/// [`crate::Update::Error`] to every subscriber.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No answer from the server address (wrong address, server down, no network).
    #[error("The server at {url} cannot be reached. Check the address and your connection.")]
    ServerUnreachable { url: String },
    /// The connection broke in the middle of a request.
    #[error("The network connection dropped. Obmin will retry when it is back.")]
    NetworkDropped,
    /// The address answered, but not like a Matrix homeserver.
    #[error("{url} does not look like a Matrix server.")]
    NotAMatrixServer { url: String },
    /// The server address could not be understood.
    #[error("\"{url}\" is not a valid server address (example: http://localhost:8008).")]
    InvalidServerUrl { url: String },
    #[error("Wrong user name or password.")]
    WrongPassword,
    #[error("The user name \"{0}\" is already taken.")]
    UserTaken(String),
    #[error("The user name \"{0}\" is not allowed: use lower-case letters, digits and . _ = - /")]
    InvalidUsername(String),
    #[error("This server does not allow new accounts.")]
    RegistrationDisabled,
    /// The access token is no longer valid (logged out elsewhere, account deactivated).
    #[error("You have been signed out. Please sign in again.")]
    SessionExpired,
    #[error("You are not signed in.")]
    NotLoggedIn,
    /// The server wants the account password again before this change (user-interactive
    /// auth), and none was given or it was wrong.
    #[error("Enter your password to confirm this change.")]
    PasswordNeeded,
    #[error("Too many attempts. Try again in {} seconds.", retry_after_ms.div_ceil(1000))]
    RateLimited { retry_after_ms: u64 },
    #[error("You are not allowed to do that: {message}")]
    Forbidden { message: String },
    #[error("Not found: {message}")]
    NotFound { message: String },
    /// Any other Matrix error from the server.
    #[error("The server refused: {message} ({errcode})")]
    Server { status: u16, errcode: String, message: String },
    /// The user gave something unusable (an invalid user id, an empty message, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// Encryption failed (a message could not be encrypted or a key not shared).
    #[error("Encryption failed: {0}")]
    Crypto(String),
    /// Encryption is locked: the passphrase must be given first ([`crate::Client::unlock`]).
    #[error("Enter your passphrase to unlock Obmin first.")]
    Locked,
    /// The passphrase does not open this device's encryption keys (nothing was changed).
    #[error("Wrong passphrase. Your encryption keys are unchanged; try again.")]
    WrongPassphrase,
    /// The session's keys are sealed with a key in the OS keyring, which is not reachable.
    #[error(
        "This device's encryption keys are locked in the system keyring (GNOME Keyring or KWallet), which is not available now. Start Obmin in your desktop session, or sign out to start afresh with a passphrase."
    )]
    KeyringUnavailable,
    /// The OS keyring refused or failed (locked and the unlock prompt dismissed, ...).
    #[error("The system keyring failed: {0}")]
    Keyring(String),
    /// The local database failed (disk full, file damaged).
    #[error("The local storage failed: {0}")]
    Store(String),
    /// Reading or writing a local file failed.
    #[error("File error: {0}")]
    File(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again later may succeed (the sync loop and the outbox retry these).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::ServerUnreachable { .. } | Error::NetworkDropped | Error::RateLimited { .. })
            || matches!(self, Error::Server { status, .. } if *status >= 500)
    }

    /// Maps a Matrix error answer (status and the JSON body) to a variant.
    pub(crate) fn from_matrix(status: u16, body: &serde_json::Value) -> Self {
        let errcode = body["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned();
        let message = body["error"].as_str().unwrap_or("no details").to_owned();
        match errcode.as_str() {
            "M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN" => Error::SessionExpired,
            "M_LIMIT_EXCEEDED" => {
                Error::RateLimited { retry_after_ms: body["retry_after_ms"].as_u64().unwrap_or(1000) }
            }
            "M_FORBIDDEN" => Error::Forbidden { message },
            "M_NOT_FOUND" => Error::NotFound { message },
            _ => Error::Server { status, errcode, message },
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<e2ee::Error> for Error {
    fn from(e: e2ee::Error) -> Self {
        Error::Crypto(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::File(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Store(format!("bad JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn matrix_errors_map_to_what_the_user_can_act_on() {
        assert_eq!(
            Error::from_matrix(401, &json!({"errcode": "M_UNKNOWN_TOKEN", "error": "x"})),
            Error::SessionExpired
        );
        let limited =
            Error::from_matrix(429, &json!({"errcode": "M_LIMIT_EXCEEDED", "error": "x", "retry_after_ms": 2500}));
        assert_eq!(limited, Error::RateLimited { retry_after_ms: 2500 });
        assert_eq!(limited.to_string(), "Too many attempts. Try again in 3 seconds.");
        assert!(limited.is_transient());
        let other = Error::from_matrix(400, &json!({"errcode": "M_BAD_JSON", "error": "bad"}));
        assert!(matches!(&other, Error::Server { status: 400, errcode, .. } if errcode == "M_BAD_JSON"));
        assert!(!other.is_transient());
        assert!(Error::from_matrix(502, &json!({"errcode": "M_UNKNOWN", "error": "x"})).is_transient());
    }
}
