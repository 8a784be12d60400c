//! The bridge between axum and ruma: [`Ruma<T>`] parses any ruma request type (and
//! authenticates it as its metadata says), [`RumaResponse<T>`] sends any ruma response.

use std::{
    any::TypeId,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    body::Body,
    extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request, rejection::PathRejection},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use ruma::{
    OwnedServerName,
    api::{
        IncomingRequest, IncomingRequestExt, OutgoingResponse, OutgoingResponseExt,
        auth_scheme::{AccessToken, AccessTokenOptional, extract_bearer_or_query_token},
        error::{DeserializationError, FromHttpRequestError},
        federation::authentication::ServerSignatures,
    },
};

use crate::{
    config::Settings,
    error::Error,
    service::{Services, auth::AuthedUser},
};

/// Marks a route whose last path parameter (an empty state key) is not in the URL.
#[derive(Debug, Clone, Copy)]
pub struct EmptyStateKey;

/// A parsed ruma request, the authenticated user (when the endpoint takes a token) or
/// server (when it takes an X-Matrix signature), and the client's address.
pub struct Ruma<T> {
    pub body: T,
    pub user: Option<AuthedUser>,
    /// The verified origin of a federation request.
    pub origin: Option<OwnedServerName>,
    pub client_ip: IpAddr,
    /// The access token sent to an endpoint that does not take one (see
    /// [`Ruma::signed_in_user`]).
    unchecked_token: Option<String>,
}

impl<T> Ruma<T> {
    /// The authenticated user; only `None` for endpoints without (required) authentication.
    pub fn user(&self) -> Result<&AuthedUser, Error> {
        self.user.as_ref().ok_or(Error::MissingToken)
    }

    /// The signed-in user of a request to an endpoint that anyone may call, for the part of
    /// it only signed-in users get (asking other servers on their behalf): its token checked
    /// now, 401 without one.
    pub async fn signed_in_user(&self, services: &Services) -> Result<AuthedUser, Error> {
        if let Some(user) = &self.user {
            return Ok(user.clone());
        }
        let token = self.unchecked_token.as_deref().ok_or(Error::MissingToken)?;
        services.auth.authenticate(token, self.client_ip).await
    }
}

impl<T> FromRequest<Arc<Services>> for Ruma<T>
where
    T: IncomingRequest + Send + 'static,
{
    type Rejection = Error;

    async fn from_request(req: Request, services: &Arc<Services>) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let client_ip = client_ip(&parts, &services.settings);

        let mut path_args: Vec<String> =
            match <Path<Vec<String>> as FromRequestParts<Arc<Services>>>::from_request_parts(&mut parts, services).await
            {
                Ok(Path(args)) => args,
                Err(PathRejection::MissingPathParams(_)) => Vec::new(),
                Err(e) => return Err(Error::InvalidParam(format!("Invalid path parameter: {}", e.body_text()))),
            };

        if parts.extensions.get::<EmptyStateKey>().is_some() {
            path_args.push(String::new());
        }

        // Authenticate before reading the body: an unauthenticated client should not make
        // us buffer megabytes.
        let scheme = TypeId::of::<T::Authentication>();
        let mut unchecked_token = None;
        let user = if scheme == TypeId::of::<AccessToken>() || scheme == TypeId::of::<AccessTokenOptional>() {
            let head = http::Request::from_parts(parts.clone(), ());
            let token = extract_bearer_or_query_token(&head).map_err(|_| Error::MissingToken)?;
            match token {
                Some(token) => Some(services.auth.authenticate(&token, client_ip).await?),
                None if scheme == TypeId::of::<AccessToken>() => return Err(Error::MissingToken),
                None => None,
            }
        } else {
            // Kept unchecked: most such endpoints never need it.
            let head = http::Request::from_parts(parts.clone(), ());
            unchecked_token = extract_bearer_or_query_token(&head).ok().flatten();
            None
        };

        let limit = services.settings.max_request_bytes;
        let mut bytes = read_body(body, limit).await?;
        // An empty body where every field is optional (`POST /join/{room}`, `/leave`, ...)
        // is an empty object: matrix-nio and other clients send nothing at all, and Synapse
        // takes it so. Endpoints with required fields still say which one is missing.
        if bytes.is_empty() && matches!(parts.method, http::Method::POST | http::Method::PUT) {
            bytes = axum::body::Bytes::from_static(b"{}");
        }
        // PostgreSQL cannot store U+0000 in text, SQLite truncates at it in places, and no
        // Matrix identifier or message needs it: refuse it at the door, the same on both.
        if contains_escaped_nul(&bytes) {
            return Err(Error::BadJson("U+0000 is not allowed in requests".to_owned()));
        }
        if parts.uri.path().contains("%00") || parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(Error::InvalidParam("U+0000 is not allowed in requests".to_owned()));
        }
        let http_req = http::Request::from_parts(parts, bytes.as_ref());
        // The X-Matrix signature covers method, URI and body: check it on the raw request
        // before parsing anything.
        let origin = if scheme == TypeId::of::<ServerSignatures>() {
            Some(services.fed.verify_request(&http_req).await?)
        } else {
            None
        };
        let path_refs: Vec<&str> = path_args.iter().map(String::as_str).collect();
        // ruma's deserializers can panic on some malformed bodies (for example a login body
        // without `type` indexes a missing key); a bad request must never become a 500.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| T::try_from_http_request(http_req, &path_refs)));
        let body = match parsed {
            Ok(result) => result.map_err(|e| request_error(e, &bytes))?,
            Err(_) => return Err(Error::BadJson("The request body has the wrong shape".to_owned())),
        };
        Ok(Ruma { body, user, origin, client_ip, unchecked_token })
    }
}

/// Authenticates a request by its access token (header or `access_token` query) without
/// touching its body: for handlers that stream their body and so cannot use [`Ruma<T>`].
pub async fn authenticate_parts(
    parts: &http::request::Parts,
    services: &Services,
) -> Result<(AuthedUser, IpAddr), Error> {
    let client_ip = client_ip(parts, &services.settings);
    let head = http::Request::from_parts(parts.clone(), ());
    let token = extract_bearer_or_query_token(&head).map_err(|_| Error::MissingToken)?.ok_or(Error::MissingToken)?;
    Ok((services.auth.authenticate(&token, client_ip).await?, client_ip))
}

/// A JSON `\u0000` escape anywhere in the body (a raw NUL is not JSON at all and fails
/// parsing anyway).
fn contains_escaped_nul(body: &[u8]) -> bool {
    body.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Error> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Error::TooLarge { limit }),
        Err(e) => Err(Error::BadJson(format!("Cannot read the request body: {e}"))),
    }
}

/// The client's address: the socket peer, or, when that peer is a trusted reverse proxy,
/// the right-most `X-Forwarded-For` address that is not a trusted proxy. Everything left of
/// that is whatever the client chose to send and is never believed.
pub fn client_ip(parts: &http::request::Parts, settings: &Settings) -> IpAddr {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let forwarded = parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    forwarded_client(peer, forwarded, settings.trust_x_forwarded_for, &settings.trusted_proxies)
}

/// [`client_ip`] on its parts. `trust_any_peer` (`trust_x_forwarded_for`) makes every
/// socket peer a trusted proxy; `proxies` are the trusted proxies (`trusted_proxies`).
/// Several header lines are one list, in order.
fn forwarded_client<'a>(
    peer: IpAddr,
    headers: impl DoubleEndedIterator<Item = &'a str>,
    trust_any_peer: bool,
    proxies: &[ipnet::IpNet],
) -> IpAddr {
    let trusted = |ip: &IpAddr| proxies.iter().any(|net| net.contains(ip));
    let peer = peer.to_canonical();
    if !(trust_any_peer || trusted(&peer)) {
        return peer;
    }
    let mut client = peer;
    for entry in headers.rev().flat_map(|h| h.rsplit(',')) {
        let entry = entry.trim();
        // A proxy may write `1.2.3.4:5678` or `[2001:db8::1]:80`.
        let parsed = entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()));
        // Something unreadable left of a trusted hop: the last trusted hop is the best we know.
        let Some(ip) = parsed.map(|ip| ip.to_canonical()) else { return client };
        client = ip;
        if !trusted(&ip) {
            return ip;
        }
    }
    client
}

/// Maps ruma's parse failures to the errcodes the spec asks for: syntax errors are
/// `M_NOT_JSON`, well-formed JSON of the wrong shape is `M_BAD_JSON`.
fn request_error(e: FromHttpRequestError, body: &[u8]) -> Error {
    match e {
        FromHttpRequestError::MethodMismatch { .. } => Error::MethodNotAllowed,
        FromHttpRequestError::Deserialization(e) => match e {
            DeserializationError::Json(json) => {
                use serde_json::error::Category;
                match json.classify() {
                    Category::Syntax | Category::Eof | Category::Io => {
                        Error::NotJson(format!("The request body is not valid JSON: {json}"))
                    }
                    // serde stops at the first mismatch, so `[1, 2` is reported as "wrong
                    // type"; only a body that parses as JSON is merely the wrong shape.
                    Category::Data if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() => {
                        Error::NotJson("The request body is not valid JSON".to_owned())
                    }
                    Category::Data => Error::BadJson(format!("The request body has the wrong shape: {json}")),
                }
            }
            DeserializationError::Utf8(_) => Error::NotJson("The request body is not UTF-8".to_owned()),
            DeserializationError::Ident(id) => Error::InvalidParam(format!("Invalid identifier: {id}")),
            DeserializationError::Query(q) => Error::InvalidParam(format!("Invalid query parameter: {q}")),
            other => Error::BadJson(other.to_string()),
        },
        other => Error::BadJson(other.to_string()),
    }
}

/// Any ruma response, serialized by ruma.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<Vec<u8>>() {
            Ok(response) => response.map(Body::from).into_response(),
            Err(e) => Error::internal(format!("cannot serialize a response: {e}")).into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn client(peer: &str, headers: &[&str], any: bool, proxies: &[&str]) -> String {
        forwarded_client(peer.parse().unwrap(), headers.iter().copied(), any, &nets(proxies)).to_string()
    }

    #[test]
    fn a_spoofed_left_most_entry_is_not_believed() {
        // The client sent `X-Forwarded-For: 6.6.6.6`; our proxy 10.0.0.1 appended the real
        // address.
        assert_eq!(client("10.0.0.1", &["6.6.6.6, 203.0.113.7"], false, &["10.0.0.0/8"]), "203.0.113.7");
        assert_eq!(client("10.0.0.1", &["6.6.6.6, 203.0.113.7"], true, &[]), "203.0.113.7");
        // Two trusted proxies in a row: skip both.
        assert_eq!(client("10.0.0.1", &["6.6.6.6, 203.0.113.7, 10.0.0.2"], false, &["10.0.0.0/8"]), "203.0.113.7");
        // As separate header lines.
        assert_eq!(client("10.0.0.1", &["6.6.6.6", "203.0.113.7"], false, &["10.0.0.0/8"]), "203.0.113.7");
        // A spoofed entry that claims to be a trusted proxy does not hide the real hop.
        assert_eq!(client("10.0.0.1", &["10.9.9.9, 203.0.113.7"], false, &["10.0.0.0/8"]), "203.0.113.7");
    }

    #[test]
    fn untrusted_peers_are_their_own_address() {
        assert_eq!(client("198.51.100.4", &["6.6.6.6"], false, &["10.0.0.0/8"]), "198.51.100.4");
        assert_eq!(client("198.51.100.4", &["6.6.6.6"], false, &[]), "198.51.100.4");
        assert_eq!(client("::ffff:198.51.100.4", &[], false, &[]), "198.51.100.4");
    }

    #[test]
    fn odd_headers_fall_back_to_the_last_trusted_hop() {
        assert_eq!(client("10.0.0.1", &[], false, &["10.0.0.0/8"]), "10.0.0.1");
        assert_eq!(client("10.0.0.1", &["junk"], false, &["10.0.0.0/8"]), "10.0.0.1");
        assert_eq!(client("10.0.0.1", &["203.0.113.7, junk"], false, &["10.0.0.0/8"]), "10.0.0.1");
        assert_eq!(client("10.0.0.1", &["junk, 10.0.0.2"], false, &["10.0.0.0/8"]), "10.0.0.2");
        assert_eq!(client("10.0.0.1", &["203.0.113.7:4711"], false, &["10.0.0.0/8"]), "203.0.113.7");
        assert_eq!(client("10.0.0.1", &["[2001:db8::7]:80"], false, &["10.0.0.0/8"]), "2001:db8::7");
        // Only trusted proxies in the list: the left-most of them.
        assert_eq!(client("10.0.0.1", &["10.0.0.3, 10.0.0.2"], false, &["10.0.0.0/8"]), "10.0.0.3");
    }
}
