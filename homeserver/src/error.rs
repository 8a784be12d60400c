//! The one error type of the homeserver, and how it becomes Matrix error JSON.
//!
//! Services return [`Error`]; the API layer turns it into `{"errcode", "error"}` with the
//! status the spec gives that errcode. Storage and other internal failures are logged with
//! their cause and answered with a generic 500 `M_UNKNOWN`, never with their details.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use ruma::api::{
    OutgoingResponseExt,
    client::uiaa::{UiaaInfo, UiaaResponse},
    error::{
        Error as RumaError, ErrorBody, ErrorKind, LimitExceededErrorData, RetryAfter, StandardErrorBody,
        UnknownTokenErrorData,
    },
};

/// Everything that can go wrong while answering a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotJson(String),
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    MissingParam(String),
    #[error("Unrecognized request")]
    UnrecognizedEndpoint,
    #[error("Method not allowed")]
    MethodNotAllowed,
    #[error("Request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Another server's media is larger than we accept (502 `M_TOO_LARGE`, as Synapse answers).
    #[error("The remote file is larger than {limit} bytes")]
    RemoteTooLarge { limit: u64 },
    #[error("Missing access token")]
    MissingToken,
    #[error("Unknown or expired access token")]
    UnknownToken,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidUsername(String),
    #[error("User ID already taken")]
    UserInUse,
    #[error("This account has been deactivated")]
    UserDeactivated,
    #[error("Guest access is not allowed on this server")]
    GuestAccessForbidden,
    #[error("{0}")]
    WeakPassword(String),
    #[error("Too many requests")]
    LimitExceeded { retry_after: Duration },
    #[error("{0}")]
    ProfileTooLarge(String),
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    UnsupportedRoomVersion(String),
    /// Another server asks us to take part in a room of a version we do not support.
    #[error("Room version {0} is not supported by this server")]
    IncompatibleRoomVersion(ruma::RoomVersionId),
    #[error("The room alias is already taken")]
    RoomInUse,
    #[error("{0}")]
    BadAlias(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidSignature(String),
    /// A federation request whose X-Matrix signature is missing or does not verify (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Another server could not be reached or gave an unusable answer (502).
    #[error("{0}")]
    RemoteUnavailable(String),
    /// A key backup write to a version that is not the current one (carries the current).
    #[error("Wrong backup version; the current one is {0}")]
    WrongRoomKeysVersion(String),
    /// Asynchronous upload to an mxc:// URI that already has content (409).
    #[error("{0}")]
    CannotOverwriteMedia(String),
    /// Media reserved with `/create` whose content has not arrived yet (504, as the spec says).
    #[error("{0}")]
    NotYetUploaded(String),
    /// A sliding sync `pos` this server does not know (expired, or from before a restart):
    /// the client starts the connection again (MSC4186).
    #[error("{0}")]
    UnknownPos(String),
    /// User-interactive authentication is required (or a stage failed): a 401 carrying the
    /// flows, the session and, optionally, why the last attempt failed.
    #[error("User-interactive authentication required")]
    Uiaa(Box<UiaaInfo>),
    /// The database failed; details are logged, not sent.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Any other internal failure; details are logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request took longer than the listener allows (503; `http.request_timeout_secs`).
    #[error("The request took too long to answer")]
    Timeout,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The Matrix errcode and HTTP status for this error.
    fn kind_and_status(&self) -> (ErrorKind, StatusCode) {
        use StatusCode as S;
        match self {
            Error::NotJson(_) => (ErrorKind::NotJson, S::BAD_REQUEST),
            Error::BadJson(_) => (ErrorKind::BadJson, S::BAD_REQUEST),
            Error::InvalidParam(_) => (ErrorKind::InvalidParam, S::BAD_REQUEST),
            Error::MissingParam(_) => (ErrorKind::MissingParam, S::BAD_REQUEST),
            Error::UnrecognizedEndpoint => (ErrorKind::Unrecognized, S::NOT_FOUND),
            Error::MethodNotAllowed => (ErrorKind::Unrecognized, S::METHOD_NOT_ALLOWED),
            Error::TooLarge { .. } => (ErrorKind::TooLarge, S::PAYLOAD_TOO_LARGE),
            Error::RemoteTooLarge { .. } => (ErrorKind::TooLarge, S::BAD_GATEWAY),
            Error::MissingToken => (ErrorKind::MissingToken, S::UNAUTHORIZED),
            Error::UnknownToken => (ErrorKind::UnknownToken(UnknownTokenErrorData::new()), S::UNAUTHORIZED),
            Error::Forbidden(_) => (ErrorKind::Forbidden, S::FORBIDDEN),
            Error::NotFound(_) => (ErrorKind::NotFound, S::NOT_FOUND),
            Error::InvalidUsername(_) => (ErrorKind::InvalidUsername, S::BAD_REQUEST),
            Error::UserInUse => (ErrorKind::UserInUse, S::BAD_REQUEST),
            Error::UserDeactivated => (ErrorKind::UserDeactivated, S::FORBIDDEN),
            Error::GuestAccessForbidden => (ErrorKind::GuestAccessForbidden, S::FORBIDDEN),
            Error::WeakPassword(_) => (ErrorKind::WeakPassword, S::BAD_REQUEST),
            Error::LimitExceeded { retry_after } => {
                let mut data = LimitExceededErrorData::new();
                data.retry_after = Some(RetryAfter::Delay(*retry_after));
                (ErrorKind::LimitExceeded(data), S::TOO_MANY_REQUESTS)
            }
            Error::ProfileTooLarge(_) => (ErrorKind::ProfileTooLarge, S::BAD_REQUEST),
            Error::Unknown(_) => (ErrorKind::Unknown, S::BAD_REQUEST),
            Error::UnsupportedRoomVersion(_) => (ErrorKind::UnsupportedRoomVersion, S::BAD_REQUEST),
            Error::IncompatibleRoomVersion(version) => (
                ErrorKind::IncompatibleRoomVersion(ruma::api::error::IncompatibleRoomVersionErrorData::new(
                    version.clone(),
                )),
                S::BAD_REQUEST,
            ),
            Error::RoomInUse => (ErrorKind::RoomInUse, S::BAD_REQUEST),
            Error::BadAlias(_) => (ErrorKind::BadAlias, S::BAD_REQUEST),
            Error::Conflict(_) => (ErrorKind::Unknown, S::CONFLICT),
            Error::InvalidSignature(_) => (ErrorKind::InvalidParam, S::BAD_REQUEST),
            Error::Unauthorized(_) => (ErrorKind::Unauthorized, S::UNAUTHORIZED),
            Error::RemoteUnavailable(_) => (ErrorKind::Unknown, S::BAD_GATEWAY),
            Error::WrongRoomKeysVersion(current) => (
                ErrorKind::WrongRoomKeysVersion(ruma::api::error::WrongRoomKeysVersionErrorData::new(current.clone())),
                S::FORBIDDEN,
            ),
            Error::CannotOverwriteMedia(_) => (ErrorKind::CannotOverwriteMedia, S::CONFLICT),
            Error::NotYetUploaded(_) => (ErrorKind::NotYetUploaded, S::GATEWAY_TIMEOUT),
            Error::Timeout => (ErrorKind::Unknown, S::SERVICE_UNAVAILABLE),
            Error::UnknownPos(_) => (ErrorKind::UnknownPos, S::BAD_REQUEST),
            Error::Uiaa(_) => (ErrorKind::Forbidden, S::UNAUTHORIZED),
            Error::Database(_) | Error::Internal(_) => (ErrorKind::Unknown, S::INTERNAL_SERVER_ERROR),
        }
    }

    /// The standard error body (errcode + message) for this error.
    pub fn to_standard_body(&self) -> StandardErrorBody {
        let (kind, _) = self.kind_and_status();
        StandardErrorBody::new(kind, self.public_message())
    }

    fn public_message(&self) -> String {
        match self {
            Error::Database(_) | Error::Internal(_) => "Internal server error".to_owned(),
            // The detail (addresses, TLS and connection errors) is logged, not sent: it says
            // things about our network that a client has no business knowing.
            Error::RemoteUnavailable(_) => "Another server could not be reached or gave an unusable answer".to_owned(),
            other => other.to_string(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (kind, status) = self.kind_and_status();
        // 504 M_NOT_YET_UPLOADED is the spec's answer to a normal situation, not a failure.
        if status.is_server_error() && !matches!(self, Error::NotYetUploaded(_)) {
            tracing::error!(error = %self, "request failed");
        }
        let outgoing = match self {
            Error::Uiaa(info) => UiaaResponse::AuthResponse(*info),
            other => {
                let message = other.public_message();
                UiaaResponse::MatrixError(RumaError::new(
                    status,
                    ErrorBody::Standard(StandardErrorBody::new(kind, message)),
                ))
            }
        };
        match outgoing.try_into_http_response::<Vec<u8>>() {
            Ok(response) => response.map(axum::body::Body::from).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an error response");
                (StatusCode::INTERNAL_SERVER_ERROR, "{\"errcode\":\"M_UNKNOWN\",\"error\":\"Internal server error\"}")
                    .into_response()
            }
        }
    }
}
