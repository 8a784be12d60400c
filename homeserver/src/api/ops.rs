//! Operations endpoints: `/health` and `/metrics`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse};

use subtle::ConstantTimeEq;

use crate::{error::Error, service::Services};

/// 200 when the database answers, 503 otherwise (for load balancers and orchestrators).
pub async fn health(State(services): State<Arc<Services>>) -> impl IntoResponse {
    match services.store.ping().await {
        Ok(()) => (StatusCode::OK, "OK"),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    }
}

/// `/metrics` on the Client-Server listener: only with the configured bearer token (see
/// `metrics.bearer_token`); not served there otherwise.
pub async fn metrics_with_token(
    State(services): State<Arc<Services>>,
    headers: http::HeaderMap,
) -> Result<axum::response::Response, Error> {
    let Some(expected) = services.settings.metrics_bearer_token.as_deref() else {
        return Err(Error::UnrecognizedEndpoint);
    };
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compared in constant time: the token guards the whole endpoint.
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(if given.is_empty() { Error::MissingToken } else { Error::UnknownToken });
    }
    Ok(metrics(State(services)).await.into_response())
}

/// `/metrics` in Prometheus' text format (on the metrics listener, or behind the token).
pub async fn metrics(State(services): State<Arc<Services>>) -> impl IntoResponse {
    let (open, idle) = services.store.pool_stats();
    services.metrics.db_connections.set(i64::from(open));
    services.metrics.db_connections_idle.set(i64::try_from(idle).unwrap_or(i64::MAX));
    (
        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        services.metrics.render(),
    )
}
