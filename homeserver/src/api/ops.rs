//! Operations endpoints: `/health` and `/metrics`.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse};

use crate::service::Services;

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

pub async fn metrics(State(services): State<Arc<Services>>) -> impl IntoResponse {
    let (open, idle) = services.store.pool_stats();
    services.metrics.db_connections.set(i64::from(open));
    services.metrics.db_connections_idle.set(i64::try_from(idle).unwrap_or(i64::MAX));
    (
        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        services.metrics.render(),
    )
}
