//! Delivery of push notifications to push gateways (HTTP pushers), in the background.
//!
//! The persistent queue is `event_push_actions` itself: every notification the push rules
//! decided is stored with the event, and each pusher keeps a cursor (`last_stream_ordering`)
//! of how far it has been delivered. A worker wakes whenever the stream position moves,
//! finds pushers with notifications past their cursor and sends them in order, one task per
//! pusher, advancing the cursor after each accepted notification. A failing gateway is
//! retried with exponential backoff from where it stopped, also after a restart; nothing
//! here ever runs in the sender's request.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{HttpConnector, dns::Name},
    },
    rt::TokioExecutor,
};

use ruma::{
    OwnedEventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, UInt,
    api::push_gateway::send_event_notification::v1::{
        Device, Notification, NotificationCounts, NotificationPriority, PusherData, Request as NotifyRequest,
        Response as NotifyResponse,
    },
    api::{
        IncomingResponseExt, OutgoingRequestExt,
        client::push::{Pusher, PusherKind},
    },
    events::TimelineEventType,
    push::{Action, HttpPusherData, PushFormat, Tweak},
};
use serde_json::Value as JsonValue;

use super::{Services, pushers::NOTIFY_PATH};
use crate::{
    config::PushSettings,
    error::{Error, Result},
    store::{PendingPush, PusherRow},
};

/// First wait after a failed delivery; doubles with every further failure.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// A gateway failing this long loses the notification it is stuck on (as Synapse does),
/// so one dead gateway does not hold a queue forever.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// One request to a gateway may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest gateway answer read (it is a short JSON object).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Notifications read from the database at a time for one pusher.
const BATCH: i64 = 50;
/// How often the worker looks for work even without a wake-up (retries are due, say).
const IDLE_RECHECK: Duration = Duration::from_secs(30);

type PusherKey = (String, String, String);

fn key_of(row: &PusherRow) -> PusherKey {
    (row.user_id.clone(), row.app_id.clone(), row.pushkey.clone())
}

/// A pusher that is failing: when it started and when to try again.
#[derive(Clone, Copy)]
struct Backoff {
    failing_since: Instant,
    delay: Duration,
    next_try: Instant,
}

/// The HTTP client and the in-memory delivery state shared by the worker and its tasks.
pub struct PushGateway {
    client: Option<Client<HttpsConnector<HttpConnector<FilteringResolver>>, Full<Bytes>>>,
    busy: Mutex<HashSet<PusherKey>>,
    backoff: Mutex<HashMap<PusherKey, Backoff>>,
    /// Woken when a delivery task ends, so the worker looks again.
    done: tokio::sync::Notify,
}

/// How one delivery attempt ended.
enum Outcome {
    Delivered,
    /// The gateway said this pushkey is dead: the pusher is removed.
    Rejected,
    /// Worth trying again later (network error, 5xx, 429).
    Retry(String),
    /// This notification can never be delivered (refused address, 4xx): skip it.
    Drop(String),
}

impl PushGateway {
    pub fn new(push: &PushSettings) -> Self {
        let mut http = HttpConnector::new_with_resolver(FilteringResolver { push: Arc::new(push.clone()) });
        // The TLS layer wraps this connector, so https URLs must get through it.
        http.enforce_http(false);
        http.set_connect_timeout(Some(REQUEST_TIMEOUT));
        // rustls with ring, the crypto provider the rest of the binary already uses, and
        // the Mozilla roots compiled in. (This fails only if ring offered no safe protocol
        // version; push delivery is then off, and says so.)
        let client = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        {
            Ok(builder) => Some(
                Client::builder(TokioExecutor::new())
                    .build(builder.https_or_http().enable_http1().wrap_connector(http)),
            ),
            Err(e) => {
                tracing::error!(error = %e, "no TLS for push gateways: push delivery is off");
                None
            }
        };
        Self { client, busy: Mutex::default(), backoff: Mutex::default(), done: tokio::sync::Notify::new() }
    }
}

/// Resolves gateway host names and keeps only the addresses the configuration allows, so
/// a name cannot point the server into its own network. (IP literals never reach a
/// resolver; [`deliver_one`] checks those.)
#[derive(Clone)]
struct FilteringResolver {
    push: Arc<PushSettings>,
}

impl tower::Service<Name> for FilteringResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let push = self.push.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs.into_iter().filter(|a| push.gateway_address_allowed(a.ip())).collect();
            if allowed.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{} resolves only to addresses push delivery may not use", name.as_str()),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// The background worker: runs until the process ends.
pub async fn run(services: Arc<Services>) {
    let mut positions = services.streams.subscribe();
    loop {
        let visible = positions.borrow_and_update().stream;
        if let Err(e) = start_deliveries(&services, visible).await {
            tracing::warn!(error = %e, "cannot look for push notifications to deliver");
        }
        let next_retry = {
            let backoff = services.push.gateway.backoff.lock().unwrap_or_else(|e| e.into_inner());
            backoff.values().map(|b| b.next_try).min()
        };
        let wait =
            next_retry.map(|t| t.saturating_duration_since(Instant::now())).unwrap_or(IDLE_RECHECK).min(IDLE_RECHECK);
        tokio::select! {
            changed = positions.changed() => if changed.is_err() { return },
            () = services.push.gateway.done.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Spawns a delivery task for every HTTP pusher with work that is neither busy nor waiting.
async fn start_deliveries(services: &Arc<Services>, visible: i64) -> Result<()> {
    let pushers = services.store.pushers_with_pending("http", visible).await?;
    let gateway = &services.push.gateway;
    let now = Instant::now();
    for row in pushers {
        let key = key_of(&row);
        if gateway.backoff.lock().unwrap_or_else(|e| e.into_inner()).get(&key).is_some_and(|b| b.next_try > now) {
            continue;
        }
        if !gateway.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
            continue;
        }
        let services = services.clone();
        tokio::spawn(async move {
            if let Err(e) = deliver_pending(&services, &row, visible).await {
                tracing::warn!(error = %e, app_id = %row.app_id, "push delivery stopped");
                record_failure(&services, &key);
            }
            services.push.gateway.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            services.push.gateway.done.notify_one();
        });
    }
    Ok(())
}

fn record_failure(services: &Services, key: &PusherKey) -> Backoff {
    let now = Instant::now();
    let mut backoff = services.push.gateway.backoff.lock().unwrap_or_else(|e| e.into_inner());
    let entry = backoff
        .entry(key.clone())
        .and_modify(|b| b.delay = (b.delay * 2).min(MAX_BACKOFF))
        .or_insert(Backoff { failing_since: now, delay: INITIAL_BACKOFF, next_try: now });
    entry.next_try = now + entry.delay;
    *entry
}

/// Sends one pusher's notifications up to `up_to`, in order, until done or a failure.
async fn deliver_pending(services: &Services, listed: &PusherRow, up_to: i64) -> Result<()> {
    // Read again now that this task owns the pusher: the listed row may predate the
    // cursor a previous task just advanced (and the pusher may be gone).
    let Some(row) = services.store.pusher(&listed.user_id, &listed.app_id, &listed.pushkey).await? else {
        return Ok(());
    };
    let row = &row;
    let pusher: Pusher = serde_json::from_str(&row.pusher_json).map_err(|e| Error::internal(e.to_string()))?;
    let PusherKind::Http(data) = &pusher.kind else { return Ok(()) };
    let key = key_of(row);
    let mut cursor = row.last_stream_ordering;
    loop {
        let batch = services.store.pending_pushes(&row.user_id, cursor, up_to, BATCH).await?;
        if batch.is_empty() {
            return Ok(());
        }
        for push in batch {
            let outcome = match deliver_one(services, row, data, &push).await {
                Ok(outcome) => outcome,
                Err(e) => Outcome::Retry(e.to_string()),
            };
            match outcome {
                Outcome::Delivered => {
                    services.push.gateway.backoff.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                }
                Outcome::Rejected => {
                    tracing::info!(app_id = %row.app_id, user_id = %row.user_id, "push gateway rejected a pushkey; removing the pusher");
                    services.store.delete_pusher(&row.user_id, &row.app_id, &row.pushkey).await?;
                    services.push.gateway.backoff.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    return Ok(());
                }
                Outcome::Drop(reason) => {
                    tracing::warn!(app_id = %row.app_id, event_id = %push.event_id, %reason, "push notification dropped");
                }
                Outcome::Retry(reason) => {
                    let backoff = record_failure(services, &key);
                    if backoff.failing_since.elapsed() < GIVE_UP_AFTER {
                        tracing::info!(app_id = %row.app_id, %reason, retry_in = ?backoff.delay, "push gateway failed; will retry");
                        return Ok(());
                    }
                    tracing::warn!(app_id = %row.app_id, event_id = %push.event_id, %reason, "push gateway failing for a day; notification dropped");
                }
            }
            cursor = push.stream_ordering;
            services.store.advance_pusher(&row.user_id, &row.app_id, &row.pushkey, cursor).await?;
        }
    }
}

/// Builds the notification for one event and POSTs it to the gateway.
async fn deliver_one(
    services: &Services,
    row: &PusherRow,
    data: &HttpPusherData,
    push: &PendingPush,
) -> Result<Outcome> {
    let Ok(url) = url::Url::parse(&data.url) else {
        return Ok(Outcome::Drop(format!("bad gateway URL {}", data.url)));
    };
    if url.path() != NOTIFY_PATH {
        return Ok(Outcome::Drop(format!("gateway URL {} is not a notify endpoint", data.url)));
    }
    let literal: Option<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if literal.is_some_and(|ip| !services.settings.push.gateway_address_allowed(ip)) {
        return Ok(Outcome::Drop(format!("gateway address of {} is refused by push.gateway_ip_range_*", data.url)));
    }
    let actions: Vec<Action> = serde_json::from_str(&push.actions).unwrap_or_default();
    if !actions.iter().any(Action::should_notify) {
        return Ok(Outcome::Delivered);
    }
    let notification = build_notification(services, row, data, push, &actions).await?;
    let request = NotifyRequest::new(notification)
        .try_into_http_request::<Vec<u8>>(url.origin().ascii_serialization().as_str(), (), ())
        .map_err(|e| Error::internal(format!("push request: {e}")))?;
    let mut request = request.map(|body| Full::new(Bytes::from(body)));
    // The pusher's URL as given (query string and all), not only its origin.
    *request.uri_mut() = match url.as_str().parse() {
        Ok(uri) => uri,
        Err(e) => return Ok(Outcome::Drop(format!("gateway URL {}: {e}", data.url))),
    };
    let Some(client) = &services.push.gateway.client else {
        return Ok(Outcome::Retry("push delivery has no TLS client".to_owned()));
    };
    let exchange = async {
        // One limit for every request to another server (see `federation.max_outbound_requests`).
        let _permit = services.fed.outbound.acquire().await.map_err(|e| e.to_string())?;
        let response = client.request(request).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Ok(Outcome::Retry(e)),
        Err(_) => return Ok(Outcome::Retry("the gateway did not answer in time".to_owned())),
    };
    if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS || status.as_u16() == 408 {
        return Ok(Outcome::Retry(format!("gateway answered {status}")));
    }
    if !status.is_success() {
        return Ok(Outcome::Drop(format!("gateway answered {status}")));
    }
    let mut http_response = http::Response::new(body.as_ref());
    *http_response.status_mut() = status;
    match NotifyResponse::try_from_http_response(http_response) {
        Ok(parsed) if parsed.rejected.iter().any(|k| k == &row.pushkey) => Ok(Outcome::Rejected),
        Ok(_) => Ok(Outcome::Delivered),
        // A 2xx we cannot read still means the gateway took it.
        Err(_) => Ok(Outcome::Delivered),
    }
}

/// The Push Gateway API's notification: the whole event, or with `event_id_only` just its
/// id, room and the counts.
async fn build_notification(
    services: &Services,
    row: &PusherRow,
    data: &HttpPusherData,
    push: &PendingPush,
    actions: &[Action],
) -> Result<Notification> {
    let tweaks: Vec<Tweak> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SetTweak(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    let mut device = Device::new(row.app_id.clone(), row.pushkey.clone());
    device.pushkey_ts = ruma::SecondsSinceUnixEpoch::from_system_time(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(row.created_ts).unwrap_or(0)),
    );
    let mut gateway_data = PusherData::from(data.clone());
    // The URL is for us, not for the gateway.
    gateway_data.data.remove("url");
    device.data = gateway_data;
    device.tweaks = tweaks.clone();

    let unread = services.store.total_unread(&row.user_id).await?;
    let mut notification = Notification::new(vec![device]);
    notification.counts = NotificationCounts::new(UInt::new(unread.max(0) as u64).unwrap_or_default(), UInt::MIN);
    notification.event_id = OwnedEventId::try_from(push.event_id.as_str()).ok();
    notification.room_id = OwnedRoomId::try_from(push.room_id.as_str()).ok();

    let event = services.store.event(&push.event_id).await?;
    let event_json: Option<JsonValue> = event.as_ref().and_then(|e| serde_json::from_str(&e.json).ok());
    let event_type = event.as_ref().map(|e| e.event_type.clone()).unwrap_or_default();
    let loud = tweaks
        .iter()
        .any(|t| matches!(t, Tweak::Sound(_)) || matches!(t, Tweak::Highlight(ruma::push::HighlightTweakValue::Yes)));
    notification.prio =
        if loud || event_type == "m.room.encrypted" { NotificationPriority::High } else { NotificationPriority::Low };
    if data.format == Some(PushFormat::EventIdOnly) {
        return Ok(notification);
    }
    let Some(event) = event else { return Ok(notification) };
    notification.event_type = Some(TimelineEventType::from(event.event_type.as_str()));
    notification.sender = OwnedUserId::try_from(event.sender.as_str()).ok();
    notification.user_is_target = event.state_key.as_deref() == Some(row.user_id.as_str());
    if event.redacted_by.is_none()
        && let Some(content) = event_json.as_ref().and_then(|v| v.get("content"))
    {
        notification.content = serde_json::value::to_raw_value(content).ok();
    }
    let state = |event_type: &'static str, state_key: String| {
        let room_id = push.room_id.clone();
        async move {
            services
                .store
                .current_state_event(&room_id, event_type, &state_key)
                .await
                .ok()
                .flatten()
                .and_then(|row| serde_json::from_str::<JsonValue>(&row.json).ok())
        }
    };
    notification.sender_display_name = state("m.room.member", event.sender.clone())
        .await
        .and_then(|v| v["content"]["displayname"].as_str().map(str::to_owned));
    notification.room_name =
        state("m.room.name", String::new()).await.and_then(|v| v["content"]["name"].as_str().map(str::to_owned));
    notification.room_alias = state("m.room.canonical_alias", String::new())
        .await
        .and_then(|v| v["content"]["alias"].as_str().and_then(|a| OwnedRoomAliasId::try_from(a).ok()));
    Ok(notification)
}
