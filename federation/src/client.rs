//! The outbound federation client: discovery, TLS (rustls on ring), X-Matrix signing, ruma
//! request and response types, bounded response bodies, and refusal of private targets.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    OwnedServerName, ServerName,
    api::{
        OutgoingRequest, OutgoingRequestExt,
        auth_scheme::{AuthScheme, NoAuthentication},
        error::FromHttpResponseError,
        federation::authentication::{ServerSignatures, XMatrixSigningInput},
        path_builder::SinglePath,
    },
};

use crate::{
    SigningKey,
    discovery::{Destination, Discovery, is_private},
};

/// Largest response body read from another server (a `send_join` answer for a big room is
/// tens of megabytes).
pub const MAX_RESPONSE_BYTES: usize = 128 * 1024 * 1024;

/// Largest answer each kind of request may bring, by path, first match wins; enforced while
/// the body streams in, so a server answering a profile query with a gigabyte costs us at
/// most the cap. Only the answers that carry a room's whole state may be large.
const RESPONSE_CAPS: &[(&str, usize)] = &[
    ("/send_join/", MAX_RESPONSE_BYTES),
    ("/state/", MAX_RESPONSE_BYTES),
    ("/state_ids/", MAX_RESPONSE_BYTES),
    ("/event_auth/", MAX_RESPONSE_BYTES),
    // Media answers read whole through `send` (the media repository itself downloads through
    // `send_streamed`, under its own limit, `media.max_upload_bytes`).
    ("/media/", MAX_RESPONSE_BYTES),
    // At most 100 events of at most 64 KiB.
    ("/backfill/", 16 * 1024 * 1024),
    ("/get_missing_events/", 16 * 1024 * 1024),
    ("/user/keys/", 4 * 1024 * 1024),
    ("/user/devices/", 4 * 1024 * 1024),
    ("/hierarchy/", 4 * 1024 * 1024),
    ("/publicRooms", 1024 * 1024),
    ("/send/", 1024 * 1024),
    ("/invite/", 1024 * 1024),
    ("/key/v2/query", 1024 * 1024),
    // One event of at most 64 KiB, in its envelope.
    ("/event/", 256 * 1024),
    ("/query/", 64 * 1024),
    ("/make_", 64 * 1024),
    ("/key/v2/server", 64 * 1024),
    ("/.well-known/matrix/server", 64 * 1024),
];

/// The cap for anything not named above.
const DEFAULT_RESPONSE_CAP: usize = 1024 * 1024;

/// The largest answer accepted for a request to `path`.
pub fn response_cap(path: &str) -> usize {
    RESPONSE_CAPS.iter().find(|(part, _)| path.contains(part)).map_or(DEFAULT_RESPONSE_CAP, |(_, cap)| *cap)
}

/// Requests to other servers (federation and push gateways together) in flight at once, by
/// default.
pub const DEFAULT_MAX_OUTBOUND: usize = 256;

/// The operator's switches for outbound federation.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Check the destination's certificate against the Mozilla roots (webpki-roots). Only
    /// switch off on loopback test setups and private networks with self-signed certificates.
    pub verify_certificates: bool,
    /// Allow destinations on loopback and private addresses.
    pub allow_private_targets: bool,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Requests in flight at once. Shared with every other outbound client of the process
    /// (push gateways), so that no kind of traffic can open connections without bound.
    pub outbound: Arc<tokio::sync::Semaphore>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            verify_certificates: true,
            allow_private_targets: false,
            timeout: Duration::from_secs(60),
            outbound: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_OUTBOUND)),
        }
    }
}

/// Why an outbound request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the federation client: {0}")]
    Setup(String),
    #[error("{0} resolves only to loopback or private addresses, which are not allowed as federation targets")]
    PrivateTarget(String),
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("cannot reach {server}: {reason}")]
    Transport { server: OwnedServerName, reason: String },
    #[error("{server} answered {status}: {body}")]
    Status { server: OwnedServerName, status: u16, body: String },
    #[error("{server} sent a response we cannot read: {reason}")]
    Response { server: OwnedServerName, reason: String },
}

impl ClientError {
    /// The HTTP status the remote server answered, if it answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How each ruma authentication scheme is filled in for an outgoing request.
pub trait OutboundAuth: AuthScheme {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a SigningKey) -> Self::Input<'a>;
}

impl OutboundAuth for NoAuthentication {
    fn input<'a>(_: &ServerName, _: &ServerName, _: &'a SigningKey) -> Self::Input<'a> {}
}

impl OutboundAuth for ServerSignatures {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a SigningKey) -> Self::Input<'a> {
        XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key.pair())
    }
}

/// Sends federation requests on behalf of `origin`.
pub struct FederationClient {
    http: reqwest::Client,
    discovery: Discovery,
    origin: OwnedServerName,
    options: ClientOptions,
}

impl FederationClient {
    pub fn new(origin: OwnedServerName, options: ClientOptions) -> Result<Self, ClientError> {
        Self::with_discovery(origin, options, Discovery::new())
    }

    pub fn with_discovery(
        origin: OwnedServerName,
        options: ClientOptions,
        discovery: Discovery,
    ) -> Result<Self, ClientError> {
        let tls = tls_config(options.verify_certificates)?;
        let resolver = GuardedResolver {
            overrides: discovery.connect_overrides.clone(),
            allow_private: options.allow_private_targets,
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(resolver)
            .timeout(options.timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Obmin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Self { http, discovery, origin, options })
    }

    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    /// Where requests for `server` go.
    pub async fn destination(&self, server: &ServerName) -> Destination {
        self.discovery.resolve(server, |host| self.fetch_well_known(host)).await
    }

    /// Sends `request` to `destination`, signed with `key` when the endpoint requires it, and
    /// parses the answer with ruma.
    pub async fn send<R>(
        &self,
        key: &SigningKey,
        destination: &ServerName,
        request: R,
    ) -> Result<R::IncomingResponse, ClientError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: OutboundAuth,
    {
        let (dest, http_request) = self.prepare(key, destination, request).await?;
        let (status, headers, body) = self.execute(destination, &dest, http_request).await?;
        let mut builder = http::Response::builder().status(status);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let response = builder.body(body.as_slice()).map_err(|e| ClientError::Request(e.to_string()))?;
        <R::IncomingResponse as ruma::api::IncomingResponseExt>::try_from_http_response(response).map_err(|e| match e {
            FromHttpResponseError::Server(_) => ClientError::Status {
                server: destination.to_owned(),
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            },
            other => ClientError::Response { server: destination.to_owned(), reason: other.to_string() },
        })
    }

    /// Resolves `destination`, checks it may be contacted, and builds the (signed when the
    /// endpoint requires it) HTTP request: the part `send` and `send_streamed` share.
    async fn prepare<R>(
        &self,
        key: &SigningKey,
        destination: &ServerName,
        request: R,
    ) -> Result<(Destination, http::Request<Vec<u8>>), ClientError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: OutboundAuth,
    {
        let dest = self.destination(destination).await;
        self.check_literal(&dest)?;
        let auth = <R::Authentication as OutboundAuth>::input(&self.origin, destination, key);
        let http_request = request
            .try_into_http_request::<Vec<u8>>(&dest.base_url(), auth, ())
            .map_err(|e| ClientError::Request(e.to_string()))?;
        Ok((dest, http_request))
    }

    /// Like [`Self::send`], but the answer's body is not read: it is handed over as a
    /// stream for the caller to read within its own limit (media, which may be larger than
    /// anything held in memory). A status other than 2xx is an error, as in `send`.
    pub async fn send_streamed<R>(
        &self,
        key: &SigningKey,
        destination: &ServerName,
        request: R,
    ) -> Result<StreamedResponse, ClientError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: OutboundAuth,
    {
        let (dest, http_request) = self.prepare(key, destination, request).await?;
        let mut request = reqwest::Request::try_from(http_request).map_err(|e| ClientError::Request(e.to_string()))?;
        let host = http::HeaderValue::from_str(&dest.host_header).map_err(|e| ClientError::Request(e.to_string()))?;
        request.headers_mut().insert(http::header::HOST, host);
        let permit = self.outbound_permit(destination).await?;
        let response = match self.http.execute(request).await {
            Ok(r) => r,
            Err(e) => {
                self.discovery.forget(destination);
                return Err(ClientError::Transport { server: destination.to_owned(), reason: error_chain(&e) });
            }
        };
        streamed(destination, response, permit).await
    }

    /// One of the process's outbound request slots, held by a streamed answer until its body
    /// is dropped.
    async fn outbound_permit(&self, server: &ServerName) -> Result<tokio::sync::OwnedSemaphorePermit, ClientError> {
        self.options
            .outbound
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ClientError::Transport { server: server.to_owned(), reason: e.to_string() })
    }

    /// A plain `GET` of `url` (where another server's media answer pointed with `Location`),
    /// with the same guards as federation requests (no private targets unless allowed, the
    /// timeout, no redirects), the body handed over as a stream. `server` names the server
    /// that pointed there, for errors.
    pub async fn get_streamed(&self, server: &ServerName, url: &str) -> Result<StreamedResponse, ClientError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| ClientError::Request(format!("{url}: {e}")))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(ClientError::Request(format!("{url}: only http and https URLs are fetched")));
        }
        let host = parsed.host_str().ok_or_else(|| ClientError::Request(format!("{url}: no host")))?;
        let dest = Destination {
            tls_host: host.to_owned(),
            port: parsed.port_or_known_default().unwrap_or(443),
            host_header: host.to_owned(),
            connect_host: None,
        };
        self.check_literal(&dest)?;
        let permit = self.outbound_permit(server).await?;
        let response = self
            .http
            .get(parsed)
            .send()
            .await
            .map_err(|e| ClientError::Transport { server: server.to_owned(), reason: error_chain(&e) })?;
        streamed(server, response, permit).await
    }

    async fn execute(
        &self,
        server: &ServerName,
        dest: &Destination,
        http_request: http::Request<Vec<u8>>,
    ) -> Result<(u16, http::HeaderMap, Vec<u8>), ClientError> {
        let cap = response_cap(http_request.uri().path());
        let mut request = reqwest::Request::try_from(http_request).map_err(|e| ClientError::Request(e.to_string()))?;
        let host = http::HeaderValue::from_str(&dest.host_header).map_err(|e| ClientError::Request(e.to_string()))?;
        request.headers_mut().insert(http::header::HOST, host);
        let transport = |reason: String| ClientError::Transport { server: server.to_owned(), reason };
        // Held until the whole answer is read.
        let _permit = self.options.outbound.acquire().await.map_err(|e| transport(e.to_string()))?;
        let mut response = match self.http.execute(request).await {
            Ok(r) => r,
            Err(e) => {
                // The next attempt discovers again (the delegation or SRV target may have moved).
                self.discovery.forget(server);
                return Err(transport(error_chain(&e)));
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(error_chain(&e)))? {
            if body.len() + chunk.len() > cap {
                return Err(ClientError::Response {
                    server: server.to_owned(),
                    reason: format!("the answer is larger than {cap} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, headers, body))
    }

    /// IP-literal destinations never pass through the DNS resolver: check them here.
    fn check_literal(&self, dest: &Destination) -> Result<(), ClientError> {
        let literal = dest.tls_host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>()
            && !self.options.allow_private_targets
            && is_private(ip)
        {
            return Err(ClientError::PrivateTarget(dest.tls_host.clone()));
        }
        Ok(())
    }

    async fn fetch_well_known(&self, host: String) -> Option<Vec<u8>> {
        let dest = Destination { tls_host: host.clone(), port: 443, host_header: host.clone(), connect_host: None };
        self.check_literal(&dest).ok()?;
        let request = http::Request::get(format!("https://{host}/.well-known/matrix/server")).body(Vec::new()).ok()?;
        let server = ServerName::parse(&host).ok()?;
        match self.execute(&server, &dest, request).await {
            Ok((200, _, body)) => Some(body),
            Ok((status, ..)) => {
                tracing::debug!(%host, status, "no well-known delegation");
                None
            }
            Err(e) => {
                tracing::debug!(%host, error = %e, "no well-known delegation");
                None
            }
        }
    }
}

/// An answer whose body is read as it arrives.
pub struct StreamedResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, ClientError>>,
}

/// A 2xx answer as a [`StreamedResponse`]; any other status is [`ClientError::Status`] with
/// the beginning of its body.
async fn streamed(
    server: &ServerName,
    response: reqwest::Response,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<StreamedResponse, ClientError> {
    use futures_util::StreamExt;
    let status = response.status().as_u16();
    if !response.status().is_success() {
        let mut response = response;
        let mut body = Vec::new();
        while body.len() < 512
            && let Ok(Some(chunk)) = response.chunk().await
        {
            body.extend_from_slice(&chunk);
        }
        body.truncate(512);
        return Err(ClientError::Status {
            server: server.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let headers = response.headers().clone();
    let owner = server.to_owned();
    let body = response
        .bytes_stream()
        .map(move |chunk| {
            // The slot is given back when the body is dropped.
            let _held = &permit;
            chunk.map_err(|e| ClientError::Transport { server: owner.clone(), reason: error_chain(&e) })
        })
        .boxed();
    Ok(StreamedResponse { status, headers, body })
}

/// reqwest's errors hide the cause (refused connection, bad certificate) in their sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A DNS resolver that sends SRV-discovered names to their targets and, unless allowed,
/// drops loopback and private addresses (refusing the name when nothing public is left).
struct GuardedResolver {
    overrides: Arc<Mutex<HashMap<String, String>>>,
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = self
            .overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name.as_str())
            .cloned()
            .unwrap_or_else(|| name.as_str().to_owned());
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| allow_private || !is_private(addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(ClientError::PrivateTarget(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The rustls configuration: the Mozilla roots, or (when the operator switched verification
/// off) any certificate, with the handshake signatures still checked.
pub fn tls_config(verify_certificates: bool) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let config = if verify_certificates {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    };
    Ok(config)
}

/// Accepts any certificate chain (the operator's explicit choice); still verifies that the
/// peer holds the certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    #[test]
    fn each_kind_of_answer_has_its_cap() {
        assert_eq!(response_cap("/_matrix/federation/v2/send_join/!r:x/$e"), MAX_RESPONSE_BYTES);
        assert_eq!(response_cap("/_matrix/federation/v1/query/profile"), 64 * 1024);
        assert_eq!(response_cap("/_matrix/federation/v1/query/directory"), 64 * 1024);
        assert_eq!(response_cap("/_matrix/key/v2/server"), 64 * 1024);
        assert_eq!(response_cap("/_matrix/federation/v1/make_join/!r:x/@u:x"), 64 * 1024);
        assert_eq!(response_cap("/_matrix/federation/v1/event/$e"), 256 * 1024);
        assert_eq!(response_cap("/_matrix/federation/v1/publicRooms"), 1024 * 1024);
        assert_eq!(response_cap("/_matrix/federation/v1/something/new"), DEFAULT_RESPONSE_CAP);
    }
}

#[cfg(test)]
mod tests {
    use ruma::{api::federation::discovery::get_server_version, server_name};

    use super::*;

    fn key() -> SigningKey {
        SigningKey::parse("ed25519 a_test nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap()
    }

    #[tokio::test]
    async fn private_targets_are_refused_by_default() {
        let client = FederationClient::with_discovery(
            server_name!("a.example").to_owned(),
            ClientOptions::default(),
            Discovery::without_srv(),
        )
        .unwrap();
        for target in [server_name!("127.0.0.1:8448"), server_name!("localhost:8448"), server_name!("[::1]")] {
            let err = client.send(&key(), target, get_server_version::v1::Request::new()).await.unwrap_err();
            assert!(
                matches!(err, ClientError::PrivateTarget(_)) || err.to_string().contains("not allowed"),
                "{target}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn allowed_private_targets_are_tried() {
        let options = ClientOptions { allow_private_targets: true, verify_certificates: false, ..Default::default() };
        let client =
            FederationClient::with_discovery(server_name!("a.example").to_owned(), options, Discovery::without_srv())
                .unwrap();
        // Nothing listens on port 1: a transport error, not a refusal.
        let err =
            client.send(&key(), server_name!("127.0.0.1:1"), get_server_version::v1::Request::new()).await.unwrap_err();
        assert!(matches!(err, ClientError::Transport { .. }), "{err}");
    }
}
