//! Serving HTTP connections with limits: how long a client may take to send a request's
//! headers (which is also how long a kept-alive connection may sit idle), how many
//! connections may be open at once, in all and from one address, and a graceful stop.
//!
//! `axum::serve` offers none of these (hyper's header timeout needs a timer, which it does not
//! set, so a client sending one header byte a minute held its connection for ever), so the
//! accept loop is ours and each connection is hyper's HTTP/1.1 server with the timer set.
//!
//! Each request other than a GET or HEAD runs in a task of its own, so a client that hangs
//! up (or a request that times out) never cuts a write in half: the handler finishes and
//! the room cache, stream positions and federation queue stay in step with the database.
//! Reads are dropped with their connection.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    response::{IntoResponse, Response},
    serve::Listener,
};
use http::Method;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::error::Error;

/// The connection limits of one listener.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A client must have sent a request's headers this long after the connection opened or
    /// the previous response ended, or the connection is closed.
    pub header_timeout: Duration,
    /// A request body may go this long without sending data.
    pub body_timeout: Duration,
    /// A request is answered with 503 after this long (uploads excepted: their bodies are
    /// bounded by `body_timeout`).
    pub request_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one address at most (0: no limit).
    pub max_per_address: usize,
    /// Addresses the per-address limit does not apply to (a reverse proxy, this machine).
    pub exempt: Vec<ipnet::IpNet>,
}

/// Open connections, in all and per address.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Admits connections within the limits; a [`Slot`] is held for each open one.
pub struct Admission {
    limits: ConnectionLimits,
    open: Mutex<Open>,
}

/// One admitted connection: released when dropped.
pub struct Slot {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admission {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self { limits, open: Mutex::default() })
    }

    /// A slot for a new connection from `address`, or `None` when a limit is reached.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let address = address.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.limits.max_connections {
            return None;
        }
        let limited =
            self.limits.max_per_address > 0 && !self.limits.exempt.iter().any(|range| range.contains(&address));
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        if limited && from_address >= self.limits.max_per_address {
            return None;
        }
        open.total += 1;
        *open.by_address.entry(address).or_default() += 1;
        Some(Slot { admission: self.clone(), address })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(count) = open.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and lets the
/// requests in flight finish.
pub async fn serve<L>(mut listener: L, app: Router, limits: ConnectionLimits, shutdown: impl Future<Output = ()>)
where
    L: Listener<Addr = SocketAddr>,
{
    let admission = Admission::new(limits.clone());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            connection = listener.accept() => connection,
            () = &mut shutdown => break,
        };
        let Some(slot) = admission.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many open connections");
            continue;
        };
        let app = app.clone();
        let (body_timeout, request_timeout) = (limits.body_timeout, limits.request_timeout);
        let service = TowerToHyperService::new(tower::service_fn(move |mut request: http::Request<Incoming>| {
            // What `into_make_service_with_connect_info` would add: the handlers read the
            // client's address from it.
            request.extensions_mut().insert(ConnectInfo(peer));
            let request = request.map(|body| Body::new(TimeoutBody::new(body_timeout, body)));
            answer(app.clone(), request, request_timeout)
        }));
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Runs the application for one request (see the module's note on tasks) and answers 503 if
/// it takes longer than `timeout`.
async fn answer(app: Router, request: http::Request<Body>, timeout: Duration) -> Result<Response, Infallible> {
    let is_upload = is_upload(request.uri().path());
    let detached = !matches!(*request.method(), Method::GET | Method::HEAD);
    let response = async move {
        if detached {
            // A handler panic is caught inside the application (CatchPanicLayer), so the
            // task itself never fails; a join error would mean the runtime is shutting down.
            tokio::spawn(app.oneshot(request))
                .await
                .unwrap_or_else(|_| Ok(Error::internal("request task").into_response()))
        } else {
            app.oneshot(request).await
        }
    };
    if is_upload {
        return response.await;
    }
    match tokio::time::timeout(timeout, response).await {
        Ok(response) => response,
        Err(_) => Ok(Error::Timeout.into_response()),
    }
}

/// Media uploads: their bodies may take long to arrive, each pause bounded by the body
/// timeout.
fn is_upload(path: &str) -> bool {
    (path.starts_with("/_matrix/media/") && path.contains("/upload")) || path.starts_with("/_obmin/media/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_per_address: usize, exempt: &[&str]) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            max_connections,
            max_per_address,
            exempt: exempt.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn one_address_cannot_take_every_connection() {
        let admission = Admission::new(limits(10, 2, &["127.0.0.0/8"]));
        let attacker: IpAddr = "192.0.2.7".parse().unwrap();
        let a = admission.admit(attacker).expect("first");
        let _b = admission.admit(attacker).expect("second");
        assert!(admission.admit(attacker).is_none(), "a third connection from the same address");
        // The same address written as an IPv4-mapped IPv6 address is the same address.
        assert!(admission.admit("::ffff:192.0.2.7".parse().unwrap()).is_none());
        assert!(admission.admit("192.0.2.8".parse().unwrap()).is_some(), "another address still gets in");
        drop(a);
        assert!(admission.admit(attacker).is_some(), "a closed connection frees its slot");
    }

    #[test]
    fn exempt_addresses_count_only_towards_the_total() {
        let admission = Admission::new(limits(3, 1, &["127.0.0.0/8"]));
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let slots: Vec<Slot> = (0..3).map(|_| admission.admit(proxy).expect("exempt")).collect();
        assert!(admission.admit(proxy).is_none(), "the total still applies");
        assert!(admission.admit("192.0.2.1".parse().unwrap()).is_none());
        drop(slots);
        assert!(admission.admit("192.0.2.1".parse().unwrap()).is_some());
    }

    #[test]
    fn uploads_are_recognised_by_path() {
        assert!(is_upload("/_matrix/media/v3/upload"));
        assert!(is_upload("/_matrix/media/v3/upload/example.org/abc"));
        assert!(is_upload("/_matrix/media/r0/upload"));
        assert!(is_upload("/_obmin/media/v1/upload/example.org/abc"));
        assert!(!is_upload("/_matrix/client/v3/rooms/!r:x/send/m.room.message/upload"));
        assert!(!is_upload("/_matrix/client/v1/media/download/example.org/upload"));
    }
}
