//! Prometheus metrics, served at `GET /metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route template (`/_matrix/client/v3/profile/{user_id}`), never the raw path, so
    /// the number of series stays bounded.
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub method: String,
    pub endpoint: String,
}

type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily,
    pub requests_in_flight: Gauge,
    pub db_connections: Gauge,
    pub db_connections_idle: Gauge,
    /// `/sync` requests being answered or long-polling right now.
    pub open_syncs: Gauge,
    /// Destinations our deliveries are failing to reach now.
    pub federation_destinations_failing: Gauge,
    /// Of those, the ones given up on (`federation.give_up_after_secs`).
    pub federation_destinations_given_up: Gauge,
    /// Queued events and EDUs dropped for destinations given up on.
    pub federation_dropped: Counter,
    /// Thumbnails generated (not served from the kept ones).
    pub media_thumbnails_generated: Counter,
    /// The most thumbnail generations that ran at once (bounded by `media.thumbnail_concurrency`).
    pub media_thumbnail_generations_peak: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("obmin");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let requests_in_flight = Gauge::default();
        let db_connections = Gauge::default();
        let db_connections_idle = Gauge::default();
        let open_syncs = Gauge::default();
        let federation_destinations_failing = Gauge::default();
        let federation_destinations_given_up = Gauge::default();
        let federation_dropped = Counter::default();
        let media_thumbnails_generated = Counter::default();
        let media_thumbnail_generations_peak = Gauge::default();
        registry.register("http_requests", "HTTP requests answered, by endpoint and status", requests.clone());
        registry.register("http_request_duration_seconds", "Time to answer, by endpoint", request_duration.clone());
        registry.register("http_requests_in_flight", "Requests being answered now", requests_in_flight.clone());
        registry.register("db_pool_connections", "Open database connections", db_connections.clone());
        registry.register("db_pool_idle_connections", "Idle database connections", db_connections_idle.clone());
        registry.register("sync_open", "Syncs being answered or long-polling now", open_syncs.clone());
        registry.register(
            "federation_destinations_failing",
            "Servers our deliveries are failing to reach",
            federation_destinations_failing.clone(),
        );
        registry.register(
            "federation_destinations_given_up",
            "Servers failing for longer than federation.give_up_after_secs: backlog cut, retried hourly",
            federation_destinations_given_up.clone(),
        );
        registry.register(
            "federation_dropped_items",
            "Queued events and EDUs dropped for servers given up on",
            federation_dropped.clone(),
        );
        registry.register("media_thumbnails_generated", "Thumbnails generated", media_thumbnails_generated.clone());
        registry.register(
            "media_thumbnail_generations_peak",
            "Most thumbnail generations running at once",
            media_thumbnail_generations_peak.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            requests_in_flight,
            db_connections,
            db_connections_idle,
            open_syncs,
            federation_destinations_failing,
            federation_destinations_given_up,
            federation_dropped,
            media_thumbnails_generated,
            media_thumbnail_generations_peak,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
