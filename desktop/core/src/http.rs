//! HTTP to the homeserver: ruma's client-side request and response types over reqwest with
//! rustls on ring, and Matrix error answers mapped to [`Error`].

use std::{borrow::Cow, collections::BTreeMap, sync::Arc, time::Duration};

use ruma::api::{
    IncomingResponseExt, OutgoingRequest, OutgoingRequestExt, SupportedVersions,
    auth_scheme::{
        AccessToken, AccessTokenOptional, AppserviceTokenOptional, AuthScheme, NoAccessToken, NoAuthentication,
        SendAccessToken,
    },
    path_builder::{PathBuilder, SinglePath, VersionHistory},
};
use serde_json::Value;

use crate::{Error, Result};

/// How long an ordinary request may take; `/sync` long-polls get their timeout added.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// ruma's requests need their authentication and path inputs in a form that depends on the
/// endpoint's auth scheme and path builder; these two small traits let one generic
/// [`Http::send`] serve every endpoint.
pub(crate) trait AuthInput: AuthScheme {
    fn input(token: Option<&str>) -> Self::Input<'_>;
}

impl AuthInput for NoAuthentication {
    fn input(_: Option<&str>) -> Self::Input<'_> {}
}

macro_rules! token_auth {
    ($($scheme:ty),*) => {$(
        impl AuthInput for $scheme {
            fn input(token: Option<&str>) -> Self::Input<'_> {
                // Always: endpoints where the token is optional (profiles) answer with what we may see.
                token.map_or(SendAccessToken::None, SendAccessToken::Always)
            }
        }
    )*};
}
token_auth!(AccessToken, AccessTokenOptional, AppserviceTokenOptional, NoAccessToken);

pub(crate) trait PathInput: PathBuilder {
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathInput for VersionHistory {
    fn input(versions: &SupportedVersions) -> Self::Input<'_> {
        Cow::Borrowed(versions)
    }
}

impl PathInput for SinglePath {
    fn input(_: &SupportedVersions) -> Self::Input<'_> {}
}

pub(crate) struct Http {
    client: reqwest::Client,
    /// The spec versions we speak (our homeserver serves them all); picks ruma's paths.
    versions: SupportedVersions,
}

impl Http {
    pub(crate) fn new() -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Store(format!("TLS setup: {e}")))?
            .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Store(format!("HTTP client setup: {e}")))?;
        let versions = SupportedVersions::from_parts(&["v1.16".to_owned()], &BTreeMap::new());
        Ok(Self { client, versions })
    }

    /// Sends a ruma request; `timeout` bounds the whole exchange.
    pub(crate) async fn send<R>(
        &self,
        base_url: &str,
        token: Option<&str>,
        request: R,
        timeout: Duration,
    ) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest,
        R::Authentication: AuthInput,
        R::PathBuilder: PathInput,
    {
        let request = request
            .try_into_http_request::<Vec<u8>>(
                base_url.trim_end_matches('/'),
                <R::Authentication as AuthInput>::input(token),
                <R::PathBuilder as PathInput>::input(&self.versions),
            )
            .map_err(|e| Error::InvalidInput(format!("cannot build the request: {e}")))?;
        let mut request = reqwest::Request::try_from(request)
            .map_err(|e| Error::InvalidServerUrl { url: format!("{base_url} ({e})") })?;
        *request.timeout_mut() = Some(timeout);
        let response = self.client.execute(request).await.map_err(|e| network_error(base_url, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|e| network_error(base_url, &e))?;
        if !status.is_success() {
            return Err(matrix_error(base_url, status.as_u16(), &body));
        }
        let mut http_response = http::Response::new(body.as_ref());
        *http_response.status_mut() = status;
        *http_response.headers_mut() = headers;
        R::IncomingResponse::try_from_http_response(http_response)
            .map_err(|e| Error::NotAMatrixServer { url: format!("{base_url} (unexpected answer: {e})") })
    }

    /// A JSON request by method and path, for what ruma has no type for: the `e2ee` crate's
    /// requests (it hands us method, path and body) and the Obmin media extension.
    pub(crate) async fn json(
        &self,
        base_url: &str,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", base_url.trim_end_matches('/')))
            .bearer_auth(token)
            .timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| network_error(base_url, &e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| network_error(base_url, &e))?;
        if !status.is_success() {
            return Err(matrix_error(base_url, status.as_u16(), &bytes));
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// The first round of user-interactive auth: POSTs `body` without auth and returns the
    /// `session` of the 401 answer (None if the server gave none).
    pub(crate) async fn uia_session(&self, base_url: &str, path: &str, body: &Value) -> Result<Option<String>> {
        let response = self
            .client
            .post(format!("{}{path}", base_url.trim_end_matches('/')))
            .json(body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| network_error(base_url, &e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| network_error(base_url, &e))?;
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == 401 && json["flows"].is_array() {
            return Ok(json["session"].as_str().map(str::to_owned));
        }
        Err(matrix_error(base_url, status, &bytes))
    }

    /// A POST that may need user-interactive auth: sent as it is, and if the server answers
    /// 401 with auth flows that allow a password, sent again with `m.login.password` for
    /// `user_id` (the server's `session` kept). [`Error::PasswordNeeded`] when it asks for a
    /// password and there is none, or it refused the one given.
    pub(crate) async fn post_with_password_auth(
        &self,
        base_url: &str,
        token: &str,
        path: &str,
        body: &Value,
        user_id: &str,
        password: Option<&str>,
    ) -> Result<Value> {
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        let mut body = body.clone();
        for attempt in 0..2 {
            let response = self
                .client
                .post(&url)
                .bearer_auth(token)
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(|e| network_error(base_url, &e))?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await.map_err(|e| network_error(base_url, &e))?;
            let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if (200..300).contains(&status) {
                return Ok(json);
            }
            if status != 401 || !json["flows"].is_array() {
                return Err(matrix_error(base_url, status, &bytes));
            }
            let password_flow = json["flows"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|flow| flow["stages"].as_array().is_some_and(|s| s.len() == 1 && s[0] == "m.login.password"));
            match password {
                Some(password) if attempt == 0 && password_flow => {
                    body["auth"] = serde_json::json!({
                        "type": "m.login.password",
                        "identifier": { "type": "m.id.user", "user": user_id },
                        "password": password,
                        "session": json["session"],
                    });
                }
                _ => return Err(Error::PasswordNeeded),
            }
        }
        Err(Error::PasswordNeeded)
    }

    /// The underlying client, for streamed uploads and downloads.
    pub(crate) fn raw(&self) -> &reqwest::Client {
        &self.client
    }
}

/// A transport failure: nobody answered (unreachable) or the exchange broke off (dropped).
pub(crate) fn network_error(base_url: &str, error: &reqwest::Error) -> Error {
    tracing::debug!(%error, "request failed");
    if error.is_connect() {
        Error::ServerUnreachable { url: base_url.to_owned() }
    } else if error.is_builder() {
        Error::InvalidServerUrl { url: base_url.to_owned() }
    } else {
        Error::NetworkDropped
    }
}

/// A non-2xx answer: a Matrix error if the body is one, else "not a Matrix server".
pub(crate) fn matrix_error(base_url: &str, status: u16, body: &[u8]) -> Error {
    match serde_json::from_slice::<Value>(body) {
        Ok(json) if json["errcode"].is_string() => Error::from_matrix(status, &json),
        _ if status >= 500 => Error::Server { status, errcode: "M_UNKNOWN".into(), message: format!("HTTP {status}") },
        _ => Error::NotAMatrixServer { url: base_url.to_owned() },
    }
}
