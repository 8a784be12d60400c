//! Starting and stopping the homeserver.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use federation::SigningKey;
use tokio::net::TcpListener;

use crate::{
    api,
    config::Settings,
    service::Services,
    store::{Store, StoreOptions},
};

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot open the database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    SigningKey(#[from] federation::SigningKeyError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot prepare the media directory: {0}")]
    Media(String),
    #[error("federation TLS: {0}")]
    Tls(String),
    #[error("federation: {0}")]
    Federation(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// Opens the database (creating the data directory for SQLite) and applies migrations.
pub async fn open_store(settings: &Settings) -> Result<Store, StartError> {
    std::fs::create_dir_all(&settings.data_dir)
        .map_err(|source| StartError::DataDir { path: settings.data_dir.display().to_string(), source })?;
    let store = Store::connect(
        &settings.database_url,
        &StoreOptions {
            max_connections: settings.database.max_connections,
            sqlite_synchronous: settings.database.sqlite_synchronous,
        },
    )
    .await?;
    store.migrate().await?;
    // Rooms from before the state model get their state groups once (see the migration).
    let rooms = store.build_pending_state_groups().await?;
    if rooms > 0 {
        tracing::info!(rooms, "computed the state groups of rooms stored before them");
    }
    Ok(store)
}

/// Builds the services: database, signing key and the rest.
pub async fn build_services(settings: Settings) -> Result<Arc<Services>, StartError> {
    let store = open_store(&settings).await?;
    let signing_key = SigningKey::load_or_generate(&settings.signing_key_path())?;
    let max_position = store.max_stream_position().await?;
    let outbound = crate::service::fed::Outbound::new(settings.server_name.clone(), &settings.federation)
        .map_err(|e| StartError::Federation(e.to_string()))?;
    Ok(Services::new(settings, store, signing_key, max_position, outbound))
}

/// Serves until SIGTERM or Ctrl-C, then lets in-flight requests finish and closes the
/// database cleanly.
pub async fn serve(settings: Settings) -> Result<(), StartError> {
    let listen = settings.listen;
    let services = build_services(settings).await?;
    // Only the serving process may clear the media temp directory (a CLI command running
    // next to it must not delete uploads in flight).
    services.media.prepare().await.map_err(|e| StartError::Media(e.to_string()))?;
    let listener = TcpListener::bind(listen).await.map_err(|source| StartError::Listen { addr: listen, source })?;
    // The bound address, not the configured one: with port 0 the OS picks it (tests do).
    let bound = listener.local_addr().map_err(|source| StartError::Listen { addr: listen, source })?;
    // The federation listener: its own TLS socket and router, stopped by the same signal.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let federation_server = match &services.settings.federation.listener {
        Some(fed) => {
            let config = crate::tls::server_config(&fed.tls_cert, &fed.tls_key).map_err(StartError::Tls)?;
            let listener = crate::tls::TlsListener::bind(fed.listen, config)
                .await
                .map_err(|source| StartError::Listen { addr: fed.listen, source })?;
            let bound = axum::serve::Listener::local_addr(&listener)
                .map_err(|source| StartError::Listen { addr: fed.listen, source })?;
            tracing::info!(address = %bound, "federation listening (TLS)");
            let app = api::federation_router(services.clone());
            let limits = services.settings.http.clone();
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::listener::serve(listener, app, limits, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })))
        }
        None => None,
    };

    // The metrics listener: plain HTTP, meant for an address only Prometheus reaches.
    let metrics_server = match services.settings.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
            tracing::info!(address = %addr, "metrics listening");
            let app = api::metrics_router(services.clone());
            let limits = services.settings.http.clone();
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::listener::serve(listener, app, limits, async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })))
        }
        None => None,
    };

    tracing::info!(
        server_name = %services.settings.server_name,
        address = %bound,
        registration = ?services.settings.registration,
        database = if services.store.backend() == crate::store::Backend::Sqlite { "sqlite" } else { "postgres" },
        key_id = %services.signing_key.key_id(),
        "homeserver listening"
    );

    let reservations = tokio::spawn(reserve_positions(services.clone()));
    let housekeeping = tokio::spawn(housekeeping(services.clone()));
    let typing_expiry = tokio::spawn(expire_typing(services.clone()));
    let presence_expiry = tokio::spawn(expire_presence(services.clone()));
    let media_expiry = tokio::spawn(expire_media(services.clone()));
    let push_delivery = tokio::spawn(crate::service::push_gateway::run(services.clone()));
    let federation_delivery = tokio::spawn(crate::service::send_queue::run(services.clone()));
    // Received events acknowledged before a restart and not yet worked on.
    let receiver = services.clone();
    tokio::spawn(async move { receiver.receiver.resume_queue().await });
    let txn_retention = tokio::spawn(crate::service::txn_retention::run(services.clone()));
    let app = api::router(services.clone());
    crate::listener::serve(listener, app, services.settings.http.clone(), async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    })
    .await;
    for (name, listener) in [("federation", federation_server), ("metrics", metrics_server)] {
        if let Some(listener) = listener
            && let Err(e) = listener.await
        {
            tracing::warn!(error = %e, listener = name, "listener stopped with an error");
        }
    }
    housekeeping.abort();
    reservations.abort();
    typing_expiry.abort();
    presence_expiry.abort();
    media_expiry.abort();
    push_delivery.abort();
    federation_delivery.abort();
    txn_retention.abort();
    services.store.close().await;
    tracing::info!("homeserver stopped");
    Ok(())
}

/// Keeps stream positions durably reserved ahead of the allocations: nothing becomes visible
/// to clients past the reservation (see `service::streams`).
async fn reserve_positions(services: Arc<Services>) {
    loop {
        let upto = services.streams.reservation_wanted().await;
        match services.store.reserve_stream_positions(upto).await {
            Ok(()) => services.streams.reserved(upto),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reserve stream positions; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Periodic clean-up: expired UIA sessions, idle rate-limit buckets.
async fn housekeeping(services: Arc<Services>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        services.rate_limits.forget_idle();
        let cutoff = crate::store::now_ms() - crate::service::uiaa::SESSION_LIFETIME_MS;
        if let Err(e) = services.store.expire_uiaa_sessions(cutoff).await {
            tracing::warn!(error = %e, "cannot expire UIA sessions");
        }
        // Other servers retry a transaction for minutes, not days.
        let cutoff = crate::store::now_ms() - RECEIVED_TXN_LIFETIME_MS;
        if let Err(e) = services.store.forget_received_txns(cutoff).await {
            tracing::warn!(error = %e, "cannot forget old federation transaction ids");
        }
    }
}

/// How long a received federation transaction id is remembered.
const RECEIVED_TXN_LIFETIME_MS: i64 = 24 * 3600 * 1000;

/// Ends typing notifications whose timeout passed, so syncs see them stop.
async fn expire_typing(services: Arc<Services>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        services.typing.expire(|rooms| services.streams.bump_typing(rooms.iter().map(|r| &**r)));
    }
}

/// Marks users offline who stopped syncing.
async fn expire_presence(services: Arc<Services>) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tick.tick().await;
        if let Err(e) = services.presence.expire().await {
            tracing::warn!(error = %e, "cannot expire presence");
        }
    }
}

/// Media retention: stale unfinished uploads and, if configured, unused local media.
async fn expire_media(services: Arc<Services>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match services.media.expire().await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "media retention deleted media"),
            Err(e) => tracing::warn!(error = %e, "cannot apply media retention"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
