//! X-Matrix request authentication: every federation request is signed by its origin and
//! verified by its destination. ruma builds and checks the signed request object; this module
//! only ties it to our [`SigningKey`] and to keys looked up by id.

use http::HeaderValue;
use ruma::{
    OwnedServerName, ServerName,
    api::federation::authentication::{XMatrix, XMatrixSigningInput},
    serde::Base64,
    signatures::{PublicKeyMap, PublicKeySet},
};

pub use ruma::api::federation::authentication::XMatrix as Header;

use crate::SigningKey;

/// Why a request's X-Matrix authorization is refused.
#[derive(Debug, thiserror::Error)]
pub enum XMatrixError {
    #[error("missing or malformed X-Matrix Authorization header: {0}")]
    Header(String),
    #[error("the request is addressed to {0}, not to this server")]
    WrongDestination(String),
    #[error("bad request signature: {0}")]
    Signature(String),
    #[error("cannot sign the request: {0}")]
    Signing(String),
}

/// Adds `Authorization: X-Matrix ...` for `destination` to an outgoing request.
pub fn sign_request<T: AsRef<[u8]>>(
    request: &mut http::Request<T>,
    origin: &ServerName,
    destination: &ServerName,
    key: &SigningKey,
) -> Result<(), XMatrixError> {
    let input = XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key.pair());
    let header = XMatrix::sign_http_request(request, input).map_err(|e| XMatrixError::Signing(e.to_string()))?;
    request.headers_mut().insert(http::header::AUTHORIZATION, HeaderValue::from(&header));
    Ok(())
}

/// Reads the X-Matrix credentials of an incoming request (not yet verified).
pub fn parse_header(headers: &http::HeaderMap) -> Result<XMatrix, XMatrixError> {
    XMatrix::extract_from_http_headers(headers).map_err(|e| XMatrixError::Header(e.to_string()))
}

/// Checks the signature of `request` (whose body is the raw JSON received) against the
/// origin's public key `public_key` (unpadded base64) for the key id in the header.
pub fn verify_request<T: AsRef<[u8]>>(
    header: &XMatrix,
    request: &http::Request<T>,
    this_server: &ServerName,
    public_key: &str,
) -> Result<OwnedServerName, XMatrixError> {
    if header.destination.as_deref().is_some_and(|d| d != this_server) {
        return Err(XMatrixError::WrongDestination(
            header.destination.as_ref().map(ToString::to_string).unwrap_or_default(),
        ));
    }
    let mut keys = PublicKeySet::new();
    keys.insert(header.key.to_string(), Base64::parse(public_key).map_err(|e| XMatrixError::Signature(e.to_string()))?);
    let mut map = PublicKeyMap::new();
    map.insert(header.origin.to_string(), keys);
    header.verify_http_request(request, this_server, &map).map_err(|e| XMatrixError::Signature(e.to_string()))?;
    Ok(header.origin.clone())
}

#[cfg(test)]
mod tests {
    use ruma::server_name;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::parse("ed25519 a_test nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap()
    }

    fn request(body: &str) -> http::Request<Vec<u8>> {
        http::Request::builder()
            .method("PUT")
            .uri("https://b.example/_matrix/federation/v1/send/1?x=%20y")
            .body(body.as_bytes().to_vec())
            .unwrap()
    }

    #[test]
    fn signed_requests_verify_and_tampering_is_caught() {
        let key = key();
        let mut req = request(r#"{"pdus":[],"edus":[]}"#);
        sign_request(&mut req, server_name!("a.example"), server_name!("b.example"), &key).unwrap();
        let header = parse_header(req.headers()).unwrap();
        assert_eq!(header.origin.as_str(), "a.example");
        let origin = verify_request(&header, &req, server_name!("b.example"), &key.public_key_base64()).unwrap();
        assert_eq!(origin.as_str(), "a.example");

        // Another body, another destination or another key: all refused.
        let mut other = request(r#"{"pdus":[1],"edus":[]}"#);
        other.headers_mut().extend(req.headers().clone());
        assert!(verify_request(&header, &other, server_name!("b.example"), &key.public_key_base64()).is_err());
        assert!(matches!(
            verify_request(&header, &req, server_name!("c.example"), &key.public_key_base64()),
            Err(XMatrixError::WrongDestination(_))
        ));
        let stranger = SigningKey::parse("ed25519 a_test AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert!(verify_request(&header, &req, server_name!("b.example"), &stranger.public_key_base64()).is_err());
    }

    #[test]
    fn missing_or_garbage_header_is_refused() {
        let req = request("");
        assert!(parse_header(req.headers()).is_err());
        let mut req = request("");
        req.headers_mut().insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(parse_header(req.headers()).is_err());
    }
}
