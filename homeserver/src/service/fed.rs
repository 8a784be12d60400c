//! Federation plumbing shared by every federation feature: this server's key document, other
//! servers' keys (cached in the database, fetched from the origin when unknown or stale),
//! the notary answer, X-Matrix verification of incoming requests, and the outbound client.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use federation::{
    client::{ClientError, ClientOptions, FederationClient, OutboundAuth},
    keys::{VerifiedKeys, notarize, own_key_document, verify_key_document},
    xmatrix,
};
use ruma::{
    CanonicalJsonObject, MilliSecondsSinceUnixEpoch, OwnedRoomAliasId, OwnedRoomId, OwnedServerName, OwnedUserId,
    ServerName, UInt,
    api::{
        OutgoingRequest,
        federation::{
            directory::get_public_rooms,
            discovery::{ServerSigningKeys, get_server_keys},
        },
        path_builder::SinglePath,
    },
    serde::Raw,
};

use super::{
    Hub,
    remote_cache::{CAPACITY, RemoteCache, TTL},
};
use crate::{
    config::FederationSettings,
    error::{Error, Result},
    store::{NewServerKeys, now_ms},
};

/// A server that just failed to give us a key is not asked again for this long (a request
/// naming an unknown key id must not make us hammer its origin).
const REFETCH_BACKOFF: Duration = Duration::from_secs(30);
/// Most servers remembered in that backoff table (bounded memory).
const BACKOFF_CAPACITY: usize = 10_000;
/// A server that could not be reached is not asked again on demand for this long.
const UNREACHABLE_BACKOFF: Duration = Duration::from_secs(30);

/// Other servers' keys are trusted for at most this long after we fetched them, whatever
/// `valid_until_ts` they claim (the spec's rule for room versions 5 and later).
const KEY_TRUST_AFTER_FETCH_MS: i64 = 7 * 24 * 3600 * 1000;

/// Until when a cached key (not marked expired) may verify signatures.
fn trusted_until(row: &crate::store::ServerKeyRow) -> i64 {
    row.valid_until_ts.min(row.fetched_ts.saturating_add(KEY_TRUST_AFTER_FETCH_MS))
}

/// A remote user's profile (or one field of it), `None` when their server does not know it.
pub type RemoteProfile = Option<std::collections::BTreeMap<String, serde_json::Value>>;

/// A page asked of a remote server's public room directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirectoryQuery {
    pub server: OwnedServerName,
    pub limit: Option<UInt>,
    pub since: Option<String>,
    pub search: Option<String>,
}

/// Other servers' answers to lookups our clients ask for, kept briefly and fetched once
/// however many ask (see [`RemoteCache`]).
pub struct RemoteLookups {
    /// By user and field (`None`: the whole profile).
    pub profiles: RemoteCache<(OwnedUserId, Option<String>), RemoteProfile>,
    /// A remote alias's room and servers, `None` when its server does not know it.
    pub aliases: RemoteCache<OwnedRoomAliasId, Option<(OwnedRoomId, Vec<OwnedServerName>)>>,
    /// A page of a remote server's public room directory, by server, limit, token and search
    /// term.
    pub directories: RemoteCache<DirectoryQuery, get_public_rooms::v1::Response>,
}

impl RemoteLookups {
    fn new() -> Self {
        Self {
            profiles: RemoteCache::new(TTL, CAPACITY),
            aliases: RemoteCache::new(TTL, CAPACITY),
            directories: RemoteCache::new(TTL, CAPACITY),
        }
    }
}

/// The outbound HTTP client and the limit on requests in flight, built before the services
/// (building the client can fail, on a bad TLS setup).
pub struct Outbound {
    pub client: FederationClient,
    /// Requests to other servers in flight at once, federation and push gateways together
    /// (`federation.max_outbound_requests`).
    pub permits: Arc<tokio::sync::Semaphore>,
}

impl Outbound {
    pub fn new(server_name: OwnedServerName, settings: &FederationSettings) -> Result<Self, ClientError> {
        let permits = Arc::new(tokio::sync::Semaphore::new(settings.max_outbound_requests));
        let options = ClientOptions {
            verify_certificates: settings.verify_certificates,
            allow_private_targets: settings.allow_private_targets,
            outbound: permits.clone(),
            ..ClientOptions::default()
        };
        Ok(Self { client: FederationClient::new(server_name, options)?, permits })
    }
}

/// Federation plumbing: requests to other servers (signed, with their reachability
/// remembered), our key document, other servers' keys and the notary, X-Matrix checks of
/// incoming requests, and our clients' lookups on other servers.
pub struct Federation {
    hub: Hub,
    pub client: FederationClient,
    /// Requests to other servers in flight at once, federation and push gateways together
    /// (`federation.max_outbound_requests`).
    pub outbound: Arc<tokio::sync::Semaphore>,
    last_fetch: Mutex<HashMap<OwnedServerName, Instant>>,
    /// Servers that could not be reached, until when requests made on demand (for a client
    /// asking about a remote profile, alias or directory) are not even tried.
    unreachable: Mutex<HashMap<OwnedServerName, Instant>>,
    pub lookups: RemoteLookups,
}

impl Federation {
    pub fn new(hub: Hub, outbound: Outbound) -> Self {
        Self {
            hub,
            client: outbound.client,
            outbound: outbound.permits,
            last_fetch: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            lookups: RemoteLookups::new(),
        }
    }

    /// Refuses at once a request made on demand to a server that could not be reached
    /// moments ago: anyone may ask us about any server, and must not be able to make us
    /// wait on (or hammer) a dead one.
    pub fn require_reachable(&self, server: &ServerName) -> Result<()> {
        let table = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(server) {
            Some(until) if *until > Instant::now() => {
                Err(Error::RemoteUnavailable(format!("{server} could not be reached moments ago")))
            }
            _ => Ok(()),
        }
    }

    /// Records how a request to `server` went (see [`Federation::require_reachable`]).
    fn record_reachability(&self, server: &ServerName, reached: bool) {
        let mut table = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        if reached {
            table.remove(server);
            return;
        }
        if table.len() >= BACKOFF_CAPACITY {
            let now = Instant::now();
            table.retain(|_, until| *until > now);
        }
        table.insert(server.to_owned(), Instant::now() + UNREACHABLE_BACKOFF);
    }

    /// `server` talked to us: it is up again.
    pub fn reached_by(&self, server: &ServerName) {
        self.unreachable.lock().unwrap_or_else(|e| e.into_inner()).remove(server);
    }

    /// Whether a fetch from `server` may go out now; records the attempt.
    fn may_fetch(&self, server: &ServerName) -> bool {
        let mut table = self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        if table.get(server).is_some_and(|at| at.elapsed() < REFETCH_BACKOFF) {
            return false;
        }
        if table.len() >= BACKOFF_CAPACITY {
            table.retain(|_, at| at.elapsed() < REFETCH_BACKOFF);
        }
        table.insert(server.to_owned(), Instant::now());
        true
    }
}

impl Federation {
    /// This server's signed key document (`GET /_matrix/key/v2/server`).
    pub fn key_document(&self) -> Result<Raw<ServerSigningKeys>> {
        let s = self.hub.services();
        own_key_document(&s.settings.server_name, &s.signing_key, MilliSecondsSinceUnixEpoch::now())
            .map_err(|e| Error::internal(e.to_string()))
    }

    /// Sends a request that one of our clients' lookups needs: refused at once while
    /// `destination` is marked unreachable (anyone may ask about any server), and a "not
    /// found" answer is `None` rather than an error, so it can be kept like any answer.
    pub async fn lookup<R>(&self, destination: &ServerName, request: R) -> Result<Option<R::IncomingResponse>>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: OutboundAuth,
    {
        self.require_reachable(destination)?;
        match self.send(destination, request).await {
            Ok(answer) => Ok(Some(answer)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a federation request (signed when the endpoint requires it).
    pub async fn send<R>(&self, destination: &ServerName, request: R) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: OutboundAuth,
    {
        let s = self.hub.services();
        if destination == s.settings.server_name {
            return Err(Error::internal("a federation request to ourselves"));
        }
        let result = self.client.send(&s.signing_key, destination, request).await;
        // Only a transport failure says the server is gone; an error answer says it is up.
        self.record_reachability(destination, !matches!(result, Err(ClientError::Transport { .. })));
        result.map_err(|e| {
            tracing::info!(%destination, error = %e, "federation request failed");
            match e.status() {
                Some(404) => Error::NotFound(format!("{destination} does not know it")),
                Some(403) => Error::Forbidden(format!("{destination} refused the request")),
                _ => Error::RemoteUnavailable(e.to_string()),
            }
        })
    }

    /// Fetches `server`'s key document from the server itself, checks it and caches it.
    pub async fn fetch_keys(&self, server: &ServerName) -> Result<VerifiedKeys> {
        let response = self.send(server, get_server_keys::v2::Request::new()).await?;
        let verified = verify_key_document(server, &response.server_key)
            .map_err(|e| Error::RemoteUnavailable(format!("{server} sent bad keys: {e}")))?;
        self.cache_keys(&verified).await?;
        Ok(verified)
    }

    async fn cache_keys(&self, keys: &VerifiedKeys) -> Result<()> {
        let s = self.hub.services();
        let key_json = serde_json::to_string(&keys.document).map_err(|e| Error::internal(e.to_string()))?;
        s.store
            .store_server_keys(NewServerKeys {
                server_name: keys.server_name.as_str(),
                valid_until_ts: keys.valid_until_ts,
                verify_keys: keys.verify_keys.iter().map(|(id, k)| (id.as_str(), k.as_str())).collect(),
                old_verify_keys: keys
                    .old_verify_keys
                    .iter()
                    .map(|(id, (k, expired))| (id.as_str(), k.as_str(), *expired))
                    .collect(),
                key_json: &key_json,
                now: now_ms(),
            })
            .await?;
        Ok(())
    }

    /// The public key (unpadded base64) `server` signs with under `key_id`, valid at
    /// `at_ms`: from the cache while it is valid, else fetched from the server.
    pub async fn public_key(&self, server: &ServerName, key_id: &str, at_ms: i64) -> Result<String> {
        let s = self.hub.services();
        if server == s.settings.server_name {
            if key_id == s.signing_key.key_id() {
                return Ok(s.signing_key.public_key_base64());
            }
            return Err(Error::Unauthorized(format!("{key_id} is not a key of this server")));
        }
        let usable = |row: &crate::store::ServerKeyRow| match row.expired_ts {
            Some(expired) => at_ms < expired,
            None => at_ms <= trusted_until(row),
        };
        let cached = s.store.server_key(server.as_str(), key_id).await?;
        if let Some(row) = &cached
            && usable(row)
        {
            return Ok(row.public_key.clone());
        }
        if self.may_fetch(server) {
            match self.fetch_keys(server).await {
                Ok(keys) => {
                    if let Some(key) = keys.verify_keys.get(key_id)
                        && at_ms <= keys.valid_until_ts
                    {
                        return Ok(key.clone());
                    }
                    if let Some((key, expired)) = keys.old_verify_keys.get(key_id)
                        && at_ms < *expired
                    {
                        return Ok(key.clone());
                    }
                }
                Err(e) => tracing::info!(%server, error = %e, "cannot fetch server keys"),
            }
        }
        Err(Error::Unauthorized(format!("no valid key {key_id} of {server} is known")))
    }

    /// Verifies the X-Matrix authorization of an incoming federation request whose body is
    /// `request`'s; returns the origin server.
    pub async fn verify_request(&self, request: &http::Request<&[u8]>) -> Result<OwnedServerName> {
        let s = self.hub.services();
        let header = xmatrix::parse_header(request.headers()).map_err(|e| Error::Unauthorized(e.to_string()))?;
        if header.origin == s.settings.server_name {
            return Err(Error::Unauthorized("requests from ourselves are not accepted".to_owned()));
        }
        let public_key = self.public_key(&header.origin, header.key.as_str(), now_ms()).await?;
        let origin = xmatrix::verify_request(&header, request, &s.settings.server_name, &public_key)
            .map_err(|e| Error::Unauthorized(e.to_string()))?;
        // It talks to us, so it is up: deliveries waiting for it go now.
        s.send_queue.peer_is_up(&origin);
        self.reached_by(&origin);
        Ok(origin)
    }

    /// The notary answer for `server`: our own document, or the origin's document (refreshed
    /// when the cached one expires before `minimum_valid_until_ms`) with our signature added.
    /// `origin_fetches` is how many origins the whole request may still make us contact;
    /// past it, cached documents only.
    pub async fn notary_keys(
        &self,
        server: &ServerName,
        minimum_valid_until_ms: i64,
        origin_fetches: &std::sync::atomic::AtomicUsize,
    ) -> Result<Vec<Raw<ServerSigningKeys>>> {
        let s = self.hub.services();
        if server == s.settings.server_name {
            return Ok(vec![self.key_document()?]);
        }
        let cached = s.store.server_keys(server.as_str()).await?;
        let fresh = cached.iter().find(|row| row.expired_ts.is_none() && trusted_until(row) >= minimum_valid_until_ms);
        let document: CanonicalJsonObject = match fresh {
            Some(row) => serde_json::from_str(&row.key_json).map_err(|e| Error::internal(e.to_string()))?,
            // The origin is asked only when the key-fetch backoff and its reachability let
            // us: anyone may ask a notary about any server.
            None if !take_one(origin_fetches) || !self.may_fetch(server) || self.require_reachable(server).is_err() => {
                match cached.first() {
                    Some(row) => serde_json::from_str(&row.key_json).map_err(|e| Error::internal(e.to_string()))?,
                    None => return Ok(Vec::new()),
                }
            }
            None => match self.fetch_keys(server).await {
                Ok(keys) => keys.document,
                // Unreachable servers are simply absent from the answer, as the spec says.
                Err(e) => {
                    tracing::info!(%server, error = %e, "notary cannot fetch keys");
                    match cached.first() {
                        Some(row) => serde_json::from_str(&row.key_json).map_err(|e| Error::internal(e.to_string()))?,
                        None => return Ok(Vec::new()),
                    }
                }
            },
        };
        let signed =
            notarize(&document, &s.settings.server_name, &s.signing_key).map_err(|e| Error::internal(e.to_string()))?;
        Ok(vec![signed])
    }
}

/// Takes one from a budget shared by the parts of one request; false when none is left.
fn take_one(budget: &std::sync::atomic::AtomicUsize) -> bool {
    use std::sync::atomic::Ordering;
    budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok()
}
