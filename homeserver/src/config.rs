//! Configuration: a TOML file, then environment overrides, then validation.
//!
//! Every option has a default that works with no file at all, a documented place in
//! `config/homeserver.toml` (also printed by `homeserver generate-config`) and an
//! environment variable (see [`ENV_OVERRIDES`]). A bad value is reported with the option's
//! name and the reason; nothing here panics.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ruma::{OwnedServerName, ServerName};
use serde::{Deserialize, Serialize};

mod rate_limits;
mod transactions;
pub use rate_limits::{
    InviteRateLimits, JoinRateLimits, LoginRateLimits, PresenceRateLimits, RateLimit, RateLimitsConfig,
};
pub use transactions::TransactionsConfig;

/// The documented example configuration, printed by `generate-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../config/homeserver.toml");

/// Longest `federation.inbound_wait_secs`: well inside the time a sending server waits for
/// an answer.
const MAX_INBOUND_WAIT_SECS: u64 = 60;

/// Who may create accounts through the Client-Server API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    /// Anybody who can reach the server (`m.login.dummy`).
    Open,
    /// Only with a registration token (`m.login.registration_token`).
    Token,
    /// Nobody; accounts are made with `homeserver user create`.
    Disabled,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// SQLite's `synchronous` setting: what a commit waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// Commits survive a killed process; an OS crash or power cut may lose the last ones.
    Normal,
    /// Every commit is fsynced: also survives an OS crash or power cut, at a cost per write.
    Full,
}

/// The whole configuration, as read from the file (all fields optional there).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name: the part after `:` in user ids. Cannot change once users exist.
    pub server_name: String,
    /// Address the Client-Server API listens on.
    pub listen: String,
    /// Base URL clients use to reach this server (for `/.well-known/matrix/client`).
    pub public_baseurl: Option<String>,
    /// Directory for the SQLite database and the signing key.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; default: `sqlite://<data_dir>/homeserver.db`.
    pub database_url: Option<String>,
    /// `open`, `token` or `disabled`; default: `open` for `localhost` without a config
    /// file, `disabled` otherwise.
    pub registration: Option<RegistrationMode>,
    /// Maximum size of a JSON request body in bytes.
    pub max_request_bytes: u64,
    /// Treat every socket peer as a trusted reverse proxy: take the client address from
    /// `X-Forwarded-For` (its right-most address that is not in `trusted_proxies`).
    pub trust_x_forwarded_for: bool,
    /// Reverse proxies (addresses or CIDR ranges) whose `X-Forwarded-For` is believed: the
    /// client is the right-most address in it that is not one of them.
    pub trusted_proxies: Vec<String>,
    /// `m.server` delegation served at `/.well-known/matrix/server`, e.g. `matrix.example.org:443`.
    pub well_known_server: Option<String>,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub database: DatabaseConfig,
    pub log: LogConfig,
    pub rate_limits: RateLimitsConfig,
    pub transactions: TransactionsConfig,
    pub presence: PresenceConfig,
    pub user_directory: UserDirectoryConfig,
    pub turn: TurnConfig,
    pub media: MediaConfig,
    pub push: PushConfig,
    pub federation: FederationConfig,
}

/// Delivery of push notifications to push gateways (HTTP pushers).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Addresses (CIDR ranges) a push gateway may not resolve to: the server must not be
    /// turned into a way to reach its own private network.
    pub gateway_ip_range_denylist: Vec<String>,
    /// Ranges allowed even when the denylist covers them (a gateway on the local network).
    pub gateway_ip_range_allowlist: Vec<String>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            gateway_ip_range_denylist: federation::discovery::PRIVATE_RANGES.iter().map(|s| (*s).to_owned()).collect(),
            gateway_ip_range_allowlist: Vec::new(),
        }
    }
}

/// Federation: the TLS listener other servers reach and the outbound client's switches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Address of the TLS federation listener (Server-Server API and key server), e.g.
    /// `0.0.0.0:8448`. Empty: no listener (this server cannot be reached by others).
    pub listen: String,
    /// PEM certificate chain for the federation listener.
    pub tls_cert: String,
    /// PEM private key for the federation listener.
    pub tls_key: String,
    /// Check other servers' TLS certificates. Only switch off for loopback tests or a
    /// private network with self-signed certificates.
    pub verify_certificates: bool,
    /// Allow federation requests to loopback and private addresses.
    pub allow_private_targets: bool,
    /// Seconds an incoming `/send` waits for its PDUs that need events fetched first (worked
    /// on in the background) before it answers; those still being worked on are reported
    /// as taken.
    pub inbound_wait_secs: u64,
    /// Requests to other servers in flight at once: federation and push gateways together.
    pub max_outbound_requests: u32,
    /// After this long failing, a destination's backlog is cut to what it needs to catch up
    /// and it is retried hourly (seconds).
    pub give_up_after_secs: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        // Secure unless the operator explicitly says otherwise.
        Self {
            listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            verify_certificates: true,
            allow_private_targets: false,
            inbound_wait_secs: 10,
            max_outbound_requests: federation::client::DEFAULT_MAX_OUTBOUND as u32,
            give_up_after_secs: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserDirectoryConfig {
    /// Let searches find every user of the server, not only those sharing a room or in a
    /// public room.
    pub search_all_users: bool,
}

/// A TURN server (coturn with `use-auth-secret`) for calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// `turn:` / `turns:` URIs handed to clients; empty means no TURN server.
    pub uris: Vec<String>,
    /// coturn's `static-auth-secret`.
    pub shared_secret: String,
    /// How long the credentials are valid, in seconds.
    pub credential_lifetime_secs: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self { uris: Vec::new(), shared_secret: String::new(), credential_lifetime_secs: 86_400 }
    }
}

/// The media repository: uploads, downloads, thumbnails.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Largest file one upload may carry, in bytes (`m.upload.size`).
    pub max_upload_bytes: u64,
    /// Total bytes of media one user may have stored; 0: unlimited.
    pub quota_bytes_per_user: u64,
    /// Media uploaded before this time (milliseconds since the Unix epoch) stays
    /// downloadable through the legacy unauthenticated `/_matrix/media/v3/download` and
    /// `/thumbnail` endpoints; newer media needs the authenticated ones. 0: none.
    pub unauthenticated_cutoff_ms: i64,
    /// Delete local media nobody downloaded for this many days; 0: keep forever.
    pub local_retention_days: u64,
    /// Forget an unfinished resumable or asynchronous upload after this many hours without
    /// progress.
    pub pending_upload_hours: u64,
    /// The only thumbnails made (Synapse's `thumbnail_sizes`); a request gets the smallest of
    /// its method that covers the requested size, else the largest.
    pub thumbnail_sizes: Vec<ThumbnailSize>,
    /// Thumbnails generated at once; further requests wait their turn.
    pub thumbnail_concurrency: usize,
}

/// One configured thumbnail: `{ width = 32, height = 32, method = "crop" }`, or in the
/// environment `32x32-crop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ThumbnailSizeRepr")]
pub struct ThumbnailSize {
    pub width: u32,
    pub height: u32,
    pub method: ThumbnailMethod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThumbnailMethod {
    Crop,
    Scale,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ThumbnailSizeRepr {
    Table { width: u32, height: u32, method: ThumbnailMethod },
    Text(String),
}

impl TryFrom<ThumbnailSizeRepr> for ThumbnailSize {
    type Error = String;

    fn try_from(repr: ThumbnailSizeRepr) -> Result<Self, String> {
        match repr {
            ThumbnailSizeRepr::Table { width, height, method } => Ok(Self { width, height, method }),
            ThumbnailSizeRepr::Text(text) => {
                let bad = || format!("`{text}` is not a size like 32x32-crop or 640x480-scale");
                let (size, method) = text.trim().split_once('-').ok_or_else(bad)?;
                let (width, height) = size.split_once('x').ok_or_else(bad)?;
                let method = match method {
                    "crop" => ThumbnailMethod::Crop,
                    "scale" => ThumbnailMethod::Scale,
                    _ => return Err(bad()),
                };
                Ok(Self {
                    width: width.parse().map_err(|_| bad())?,
                    height: height.parse().map_err(|_| bad())?,
                    method,
                })
            }
        }
    }
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 512 * 1024 * 1024,
            quota_bytes_per_user: 0,
            unauthenticated_cutoff_ms: 0,
            local_retention_days: 0,
            pending_upload_hours: 24,
            // Synapse's defaults.
            thumbnail_sizes: [(32, 32, ThumbnailMethod::Crop), (96, 96, ThumbnailMethod::Crop)]
                .into_iter()
                .chain([(320, 240), (640, 480), (800, 600)].map(|(w, h)| (w, h, ThumbnailMethod::Scale)))
                .map(|(width, height, method)| ThumbnailSize { width, height, method })
                .collect(),
            thumbnail_concurrency: 4,
        }
    }
}

/// Where Prometheus reads `/metrics`. Never public by default: the numbers say who is busy
/// and how the server is built.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// A listener of its own for `/metrics` (and `/health`), plain HTTP, e.g.
    /// `127.0.0.1:9108`. Empty: none.
    pub listen: String,
    /// Serve `/metrics` on the Client-Server listener too, to requests that carry this token
    /// (`Authorization: Bearer ...`). Empty: not served there.
    pub bearer_token: String,
}

/// Limits of the HTTP listeners (client and federation), against clients that hold
/// connections open without finishing their requests (slowloris) or open too many.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Seconds a client has to send a request's headers, counted from the connection's
    /// start or from the end of the previous response (so also the idle timeout of a
    /// kept-alive connection).
    pub header_timeout_secs: u64,
    /// Seconds a request body may go without sending any data.
    pub body_timeout_secs: u64,
    /// Seconds a request may take to be answered, uploads aside (their bodies are bounded by
    /// the body timeout). Long-polling syncs return well before it.
    pub request_timeout_secs: u64,
    /// Connections open at once, per listener.
    pub max_connections: u32,
    /// Connections open at once from one address (0: no limit).
    pub max_connections_per_address: u32,
    /// Addresses (CIDR ranges) the per-address limit does not apply to: a reverse proxy in
    /// front of the server, this machine.
    pub connection_limit_exempt: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout_secs: 30,
            body_timeout_secs: 30,
            request_timeout_secs: 120,
            max_connections: 8192,
            max_connections_per_address: 256,
            connection_limit_exempt: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Track and share online / offline state and status messages.
    pub enabled: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Maximum connections in the read pool. Unset: 4 on SQLite, 16 on PostgreSQL. SQLite
    /// reads run on the homeserver's own cores, so more connections add no throughput, only
    /// page caches that each start cold (measured: an initial sync 20 % slower and peak
    /// memory 26 MiB higher with 16).
    pub max_connections: Option<u32>,
    /// SQLite only: `normal` or `full`.
    pub sqlite_synchronous: SqliteSynchronous,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `homeserver=debug,tower_http=info`.
    pub filter: String,
    /// `pretty` or `json`.
    pub format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".to_owned(),
            listen: "127.0.0.1:8008".to_owned(),
            public_baseurl: None,
            data_dir: PathBuf::from("./data"),
            database_url: None,
            registration: None,
            max_request_bytes: 8 * 1024 * 1024,
            trust_x_forwarded_for: false,
            trusted_proxies: Vec::new(),
            well_known_server: None,
            http: HttpConfig::default(),
            metrics: MetricsConfig::default(),
            database: DatabaseConfig::default(),
            log: LogConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            transactions: TransactionsConfig::default(),
            presence: PresenceConfig::default(),
            user_directory: UserDirectoryConfig::default(),
            turn: TurnConfig::default(),
            media: MediaConfig::default(),
            push: PushConfig::default(),
            federation: FederationConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { max_connections: None, sqlite_synchronous: SqliteSynchronous::Normal }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".to_owned(), format: LogFormat::Pretty }
    }
}

/// What kind of value an environment variable carries, so `OBMIN_X=5` is parsed right.
#[derive(Clone, Copy)]
enum EnvKind {
    String,
    Integer,
    Float,
    Bool,
    /// Comma-separated strings.
    List,
}

/// Every option and the environment variable that overrides it.
const ENV_OVERRIDES: &[(&str, &str, EnvKind)] = &[
    ("OBMIN_SERVER_NAME", "server_name", EnvKind::String),
    ("OBMIN_LISTEN", "listen", EnvKind::String),
    ("OBMIN_PUBLIC_BASEURL", "public_baseurl", EnvKind::String),
    ("OBMIN_DATA_DIR", "data_dir", EnvKind::String),
    ("OBMIN_DATABASE_URL", "database_url", EnvKind::String),
    ("OBMIN_REGISTRATION", "registration", EnvKind::String),
    ("OBMIN_MAX_REQUEST_BYTES", "max_request_bytes", EnvKind::Integer),
    ("OBMIN_TRUST_X_FORWARDED_FOR", "trust_x_forwarded_for", EnvKind::Bool),
    ("OBMIN_TRUSTED_PROXIES", "trusted_proxies", EnvKind::List),
    ("OBMIN_WELL_KNOWN_SERVER", "well_known_server", EnvKind::String),
    ("OBMIN_HTTP_HEADER_TIMEOUT_SECS", "http.header_timeout_secs", EnvKind::Integer),
    ("OBMIN_HTTP_BODY_TIMEOUT_SECS", "http.body_timeout_secs", EnvKind::Integer),
    ("OBMIN_HTTP_REQUEST_TIMEOUT_SECS", "http.request_timeout_secs", EnvKind::Integer),
    ("OBMIN_HTTP_MAX_CONNECTIONS", "http.max_connections", EnvKind::Integer),
    ("OBMIN_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "http.max_connections_per_address", EnvKind::Integer),
    ("OBMIN_HTTP_CONNECTION_LIMIT_EXEMPT", "http.connection_limit_exempt", EnvKind::List),
    ("OBMIN_METRICS_LISTEN", "metrics.listen", EnvKind::String),
    ("OBMIN_METRICS_BEARER_TOKEN", "metrics.bearer_token", EnvKind::String),
    ("OBMIN_DATABASE_MAX_CONNECTIONS", "database.max_connections", EnvKind::Integer),
    ("OBMIN_DATABASE_SQLITE_SYNCHRONOUS", "database.sqlite_synchronous", EnvKind::String),
    ("OBMIN_LOG", "log.filter", EnvKind::String),
    ("OBMIN_LOG_FORMAT", "log.format", EnvKind::String),
    ("OBMIN_PRESENCE_ENABLED", "presence.enabled", EnvKind::Bool),
    ("OBMIN_USER_DIRECTORY_SEARCH_ALL_USERS", "user_directory.search_all_users", EnvKind::Bool),
    ("OBMIN_TURN_URIS", "turn.uris", EnvKind::List),
    ("OBMIN_TURN_SHARED_SECRET", "turn.shared_secret", EnvKind::String),
    ("OBMIN_TURN_CREDENTIAL_LIFETIME_SECS", "turn.credential_lifetime_secs", EnvKind::Integer),
    ("OBMIN_MEDIA_MAX_UPLOAD_BYTES", "media.max_upload_bytes", EnvKind::Integer),
    ("OBMIN_MEDIA_QUOTA_BYTES_PER_USER", "media.quota_bytes_per_user", EnvKind::Integer),
    ("OBMIN_MEDIA_UNAUTHENTICATED_CUTOFF_MS", "media.unauthenticated_cutoff_ms", EnvKind::Integer),
    ("OBMIN_MEDIA_LOCAL_RETENTION_DAYS", "media.local_retention_days", EnvKind::Integer),
    ("OBMIN_MEDIA_PENDING_UPLOAD_HOURS", "media.pending_upload_hours", EnvKind::Integer),
    ("OBMIN_MEDIA_THUMBNAIL_SIZES", "media.thumbnail_sizes", EnvKind::List),
    ("OBMIN_MEDIA_THUMBNAIL_CONCURRENCY", "media.thumbnail_concurrency", EnvKind::Integer),
    ("OBMIN_PUSH_GATEWAY_IP_RANGE_DENYLIST", "push.gateway_ip_range_denylist", EnvKind::List),
    ("OBMIN_PUSH_GATEWAY_IP_RANGE_ALLOWLIST", "push.gateway_ip_range_allowlist", EnvKind::List),
    ("OBMIN_FEDERATION_LISTEN", "federation.listen", EnvKind::String),
    ("OBMIN_TLS_CERT", "federation.tls_cert", EnvKind::String),
    ("OBMIN_TLS_KEY", "federation.tls_key", EnvKind::String),
    ("OBMIN_FEDERATION_VERIFY_CERTIFICATES", "federation.verify_certificates", EnvKind::Bool),
    ("OBMIN_FEDERATION_ALLOW_PRIVATE_TARGETS", "federation.allow_private_targets", EnvKind::Bool),
    ("OBMIN_FEDERATION_INBOUND_WAIT_SECS", "federation.inbound_wait_secs", EnvKind::Integer),
    ("OBMIN_FEDERATION_MAX_OUTBOUND_REQUESTS", "federation.max_outbound_requests", EnvKind::Integer),
    ("OBMIN_FEDERATION_GIVE_UP_AFTER_SECS", "federation.give_up_after_secs", EnvKind::Integer),
];

/// A configuration problem, naming the option (or file) and the reason.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: `{}`: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), reason: reason.into() }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server_name: OwnedServerName,
    pub listen: SocketAddr,
    pub public_baseurl: String,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub registration: RegistrationMode,
    pub max_request_bytes: usize,
    pub trust_x_forwarded_for: bool,
    /// `trusted_proxies`, parsed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub well_known_server: Option<String>,
    pub http: crate::listener::ConnectionLimits,
    /// The metrics listener's address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// The token that opens `/metrics` on the client listener, if any.
    pub metrics_bearer_token: Option<String>,
    pub database: DatabaseConfig,
    pub log: LogConfig,
    pub rate_limits: RateLimitsConfig,
    pub transactions: TransactionsConfig,
    pub presence: PresenceConfig,
    pub user_directory: UserDirectoryConfig,
    pub turn: TurnConfig,
    pub media: MediaConfig,
    pub push: PushSettings,
    pub federation: FederationSettings,
}

/// [`PushConfig`] with its ranges parsed.
#[derive(Debug, Clone, Default)]
pub struct PushSettings {
    pub gateway_ip_range_denylist: Vec<ipnet::IpNet>,
    pub gateway_ip_range_allowlist: Vec<ipnet::IpNet>,
}

impl PushSettings {
    /// May a push gateway be reached at this address?
    pub fn gateway_address_allowed(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 address in IPv6 clothing (::ffff:127.0.0.1) is judged as IPv4.
        let ip = ip.to_canonical();
        self.gateway_ip_range_allowlist.iter().any(|net| net.contains(&ip))
            || !self.gateway_ip_range_denylist.iter().any(|net| net.contains(&ip))
    }
}

fn parse_ranges(key: &str, ranges: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    ranges
        .iter()
        .map(|r| {
            r.parse::<ipnet::IpNet>()
                .or_else(|_| r.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| err(key, format!("`{r}` is not an address range like 10.0.0.0/8")))
        })
        .collect()
}

/// The listeners' limits, checked.
fn validate_http(http: &HttpConfig) -> Result<crate::listener::ConnectionLimits, ConfigError> {
    use std::time::Duration;
    for (key, secs) in [
        ("http.header_timeout_secs", http.header_timeout_secs),
        ("http.body_timeout_secs", http.body_timeout_secs),
        ("http.request_timeout_secs", http.request_timeout_secs),
    ] {
        if secs == 0 || secs > 86_400 {
            return Err(err(key, "must be between 1 and 86400"));
        }
    }
    // A long-polling sync must be answered before the request times out.
    let request_timeout = Duration::from_secs(http.request_timeout_secs);
    if request_timeout <= crate::service::sync::MAX_SYNC_TIMEOUT {
        return Err(err(
            "http.request_timeout_secs",
            format!(
                "must be more than {} (the longest sync long-poll)",
                crate::service::sync::MAX_SYNC_TIMEOUT.as_secs()
            ),
        ));
    }
    if http.max_connections == 0 {
        return Err(err("http.max_connections", "must be at least 1"));
    }
    Ok(crate::listener::ConnectionLimits {
        header_timeout: Duration::from_secs(http.header_timeout_secs),
        body_timeout: Duration::from_secs(http.body_timeout_secs),
        request_timeout,
        max_connections: http.max_connections as usize,
        max_per_address: http.max_connections_per_address as usize,
        exempt: parse_ranges("http.connection_limit_exempt", &http.connection_limit_exempt)?,
    })
}

/// Validated federation settings.
#[derive(Debug, Clone)]
pub struct FederationSettings {
    /// The TLS listener: address, certificate and key files.
    pub listener: Option<FederationListener>,
    pub verify_certificates: bool,
    pub allow_private_targets: bool,
    /// How long an incoming `/send` waits for PDUs worked on in the background.
    pub inbound_wait: std::time::Duration,
    pub max_outbound_requests: usize,
    pub give_up_after: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct FederationListener {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
}

impl Settings {
    /// Reads the file (if any), applies the process environment and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, |name| std::env::var(name).ok())
    }

    /// Like [`Settings::load`], with the environment given as a lookup function.
    pub fn load_with_env(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
                toml::from_str::<toml::Table>(&text)
                    .map_err(|e| err(path.display().to_string(), e.message().to_owned()))?
            }
            None => toml::Table::new(),
        };
        rate_limits::upgrade_legacy(&mut table);
        for (name, key, kind) in
            ENV_OVERRIDES.iter().chain(rate_limits::ENV_OVERRIDES).chain(transactions::ENV_OVERRIDES)
        {
            if let Some(raw) = env(name) {
                let value = parse_env(&raw, *kind).map_err(|reason| err(*name, reason))?;
                set_path(&mut table, key, value);
            }
        }
        rate_limits::fill_defaults(&mut table);
        let config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| config_deserialize_error(&e))?;
        Self::validate(config, file.is_some())
    }

    fn validate(config: Config, has_file: bool) -> Result<Self, ConfigError> {
        let server_name = ServerName::parse(&config.server_name)
            .map_err(|e| err("server_name", format!("`{}` is not a server name: {e}", config.server_name)))?;
        let listen: SocketAddr = config
            .listen
            .parse()
            .map_err(|_| err("listen", format!("`{}` is not an address like 127.0.0.1:8008", config.listen)))?;
        let public_baseurl = match config.public_baseurl {
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(err("public_baseurl", "must start with http:// or https://"));
                }
                if url.ends_with('/') { url } else { format!("{url}/") }
            }
            None if server_name.as_str() == "localhost" => format!("http://localhost:{}/", listen.port()),
            None => format!("https://{server_name}/"),
        };
        let database_url = match config.database_url {
            Some(url) => {
                if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(err("database_url", "must start with sqlite:// or postgres://"));
                }
                url
            }
            None => format!("sqlite://{}", config.data_dir.join("homeserver.db").display()),
        };
        let registration = config.registration.unwrap_or(if !has_file && server_name.as_str() == "localhost" {
            RegistrationMode::Open
        } else {
            RegistrationMode::Disabled
        });
        if config.max_request_bytes < 65_536 {
            return Err(err("max_request_bytes", "must be at least 65536 (a Matrix event may be 64 KiB)"));
        }
        let max_request_bytes = usize::try_from(config.max_request_bytes)
            .map_err(|_| err("max_request_bytes", "too large for this machine"))?;
        if !config.turn.uris.is_empty() && config.turn.shared_secret.is_empty() {
            return Err(err("turn.shared_secret", "is required when turn.uris is set"));
        }
        if let Some(uri) = config
            .turn
            .uris
            .iter()
            .find(|u| !(u.starts_with("turn:") || u.starts_with("turns:") || u.starts_with("stun:")))
        {
            return Err(err("turn.uris", format!("`{uri}` is not a turn:, turns: or stun: URI")));
        }
        if config.database.max_connections == Some(0) {
            return Err(err("database.max_connections", "must be at least 1"));
        }
        tracing_subscriber::EnvFilter::try_new(&config.log.filter).map_err(|e| err("log.filter", e.to_string()))?;
        config.rate_limits.validate()?;
        config.transactions.validate()?;
        let trusted_proxies = parse_ranges("trusted_proxies", &config.trusted_proxies)?;
        if config.media.max_upload_bytes == 0 {
            return Err(err("media.max_upload_bytes", "must be at least 1"));
        }
        if i64::try_from(config.media.max_upload_bytes).is_err() {
            return Err(err("media.max_upload_bytes", "too large"));
        }
        if i64::try_from(config.media.quota_bytes_per_user).is_err() {
            return Err(err("media.quota_bytes_per_user", "too large"));
        }
        if config.media.unauthenticated_cutoff_ms < 0 {
            return Err(err("media.unauthenticated_cutoff_ms", "must not be negative"));
        }
        if config.media.local_retention_days > 365_000 {
            return Err(err("media.local_retention_days", "must be at most 365000"));
        }
        if config.media.pending_upload_hours == 0 || config.media.pending_upload_hours > 24 * 365 {
            return Err(err("media.pending_upload_hours", "must be between 1 and 8760"));
        }
        if let Some(size) = config
            .media
            .thumbnail_sizes
            .iter()
            .find(|s| !(1..=4096).contains(&s.width.max(s.height)) || s.width.min(s.height) == 0)
        {
            return Err(err(
                "media.thumbnail_sizes",
                format!("{}x{}: each edge must be 1 to 4096 pixels", size.width, size.height),
            ));
        }
        if config.media.thumbnail_concurrency == 0 || config.media.thumbnail_concurrency > 1024 {
            return Err(err("media.thumbnail_concurrency", "must be between 1 and 1024"));
        }
        let push = PushSettings {
            gateway_ip_range_denylist: parse_ranges(
                "push.gateway_ip_range_denylist",
                &config.push.gateway_ip_range_denylist,
            )?,
            gateway_ip_range_allowlist: parse_ranges(
                "push.gateway_ip_range_allowlist",
                &config.push.gateway_ip_range_allowlist,
            )?,
        };
        let federation = validate_federation(&config.federation)?;
        let http = validate_http(&config.http)?;
        let metrics_listen = match config.metrics.listen.trim() {
            "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|_| err("metrics.listen", format!("`{addr}` is not an address like 127.0.0.1:9108")))?,
            ),
        };
        let metrics_bearer_token = match config.metrics.bearer_token.as_str() {
            "" => None,
            token if token.len() < 16 => return Err(err("metrics.bearer_token", "must be at least 16 characters")),
            token => Some(token.to_owned()),
        };
        Ok(Self {
            server_name: server_name.to_owned(),
            listen,
            public_baseurl,
            data_dir: config.data_dir,
            database_url,
            registration,
            max_request_bytes,
            trust_x_forwarded_for: config.trust_x_forwarded_for,
            trusted_proxies,
            well_known_server: config.well_known_server,
            http,
            metrics_listen,
            metrics_bearer_token,
            database: config.database,
            log: config.log,
            rate_limits: config.rate_limits,
            transactions: config.transactions,
            presence: config.presence,
            user_directory: config.user_directory,
            turn: config.turn,
            media: config.media,
            push,
            federation,
        })
    }

    /// The media repository's directory: content-addressed files, temporary and
    /// resumable uploads.
    pub fn media_dir(&self) -> PathBuf {
        self.data_dir.join("media")
    }

    /// Where the server's ed25519 signing key lives.
    pub fn signing_key_path(&self) -> PathBuf {
        self.data_dir.join("signing.key")
    }
}

fn validate_federation(config: &FederationConfig) -> Result<FederationSettings, ConfigError> {
    let listener = if config.listen.trim().is_empty() {
        None
    } else {
        let listen = config.listen.parse().map_err(|_| {
            err("federation.listen", format!("`{}` is not an address like 0.0.0.0:8448", config.listen))
        })?;
        if config.tls_cert.is_empty() || config.tls_key.is_empty() {
            return Err(err("federation.tls_cert", "the federation listener needs tls_cert and tls_key"));
        }
        Some(FederationListener {
            listen,
            tls_cert: PathBuf::from(&config.tls_cert),
            tls_key: PathBuf::from(&config.tls_key),
        })
    };
    if config.max_outbound_requests == 0 {
        return Err(err("federation.max_outbound_requests", "must be at least 1"));
    }
    Ok(FederationSettings {
        listener,
        verify_certificates: config.verify_certificates,
        allow_private_targets: config.allow_private_targets,
        inbound_wait: std::time::Duration::from_secs(config.inbound_wait_secs.min(MAX_INBOUND_WAIT_SECS)),
        max_outbound_requests: config.max_outbound_requests as usize,
        give_up_after: std::time::Duration::from_secs(config.give_up_after_secs),
    })
}

fn parse_env(raw: &str, kind: EnvKind) -> Result<toml::Value, String> {
    Ok(match kind {
        EnvKind::String => toml::Value::String(raw.to_owned()),
        EnvKind::Integer => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| format!("`{raw}` is not a whole number"))?)
        }
        EnvKind::Float => toml::Value::Float(raw.trim().parse().map_err(|_| format!("`{raw}` is not a number"))?),
        EnvKind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        EnvKind::Bool => toml::Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(format!("`{raw}` is not true or false")),
        }),
    })
}

fn set_path(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts = dotted.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return;
        }
        let entry = current.entry(part.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("just made a table");
    }
}

/// serde's messages already name the field for unknown keys and bad variants; prefix them so
/// the operator sees which setting is wrong.
fn config_deserialize_error(e: &toml::de::Error) -> ConfigError {
    let message = e.message().to_owned();
    let key = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field"))
        .unwrap_or("configuration")
        .to_owned();
    err(key, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::load_with_env(None, |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_serve_localhost_openly() {
        let s = load(&[]).unwrap();
        assert_eq!(s.server_name.as_str(), "localhost");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8008");
        assert_eq!(s.registration, RegistrationMode::Open);
        assert_eq!(s.database_url, "sqlite://./data/homeserver.db");
    }

    #[test]
    fn a_real_server_name_closes_registration_by_default() {
        let s = load(&[("OBMIN_SERVER_NAME", "example.org")]).unwrap();
        assert_eq!(s.registration, RegistrationMode::Disabled);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(&[("OBMIN_LISTEN", "nope")]).unwrap_err();
        assert_eq!(e.key, "listen");
        let e = load(&[("OBMIN_REGISTRATION", "sometimes")]).unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
        let e = load(&[("OBMIN_RATE_LIMITS_LOGIN_BURST", "x")]).unwrap_err();
        assert_eq!(e.key, "OBMIN_RATE_LIMITS_LOGIN_BURST");
        let e = load(&[("OBMIN_SERVER_NAME", "bad name!")]).unwrap_err();
        assert_eq!(e.key, "server_name");
    }

    #[test]
    fn push_gateways_on_private_addresses_are_refused_unless_allowed() {
        let s = load(&[]).unwrap();
        for ip in ["127.0.0.1", "10.1.2.3", "192.168.0.9", "::1", "::ffff:127.0.0.1", "fd00::1"] {
            assert!(!s.push.gateway_address_allowed(ip.parse().unwrap()), "{ip}");
        }
        assert!(s.push.gateway_address_allowed("93.184.216.34".parse().unwrap()));
        let s = load(&[("OBMIN_PUSH_GATEWAY_IP_RANGE_ALLOWLIST", "127.0.0.1/32")]).unwrap();
        assert!(s.push.gateway_address_allowed("127.0.0.1".parse().unwrap()));
        assert!(!s.push.gateway_address_allowed("127.0.0.2".parse().unwrap()));
        let e = load(&[("OBMIN_PUSH_GATEWAY_IP_RANGE_DENYLIST", "nonsense")]).unwrap_err();
        assert_eq!(e.key, "push.gateway_ip_range_denylist");
    }

    #[test]
    fn federation_is_secure_by_default_and_needs_tls_files() {
        let s = load(&[]).unwrap();
        assert!(s.federation.listener.is_none());
        assert!(s.federation.verify_certificates);
        assert!(!s.federation.allow_private_targets);
        let e = load(&[("OBMIN_FEDERATION_LISTEN", "127.0.0.1:8448")]).unwrap_err();
        assert_eq!(e.key, "federation.tls_cert");
        let s = load(&[
            ("OBMIN_FEDERATION_LISTEN", "127.0.0.1:8448"),
            ("OBMIN_TLS_CERT", "/c.pem"),
            ("OBMIN_TLS_KEY", "/k.pem"),
            ("OBMIN_FEDERATION_VERIFY_CERTIFICATES", "false"),
            ("OBMIN_FEDERATION_ALLOW_PRIVATE_TARGETS", "true"),
        ])
        .unwrap();
        assert_eq!(s.federation.listener.unwrap().listen.port(), 8448);
        assert!(!s.federation.verify_certificates);
        assert!(s.federation.allow_private_targets);
    }

    #[test]
    fn example_config_is_complete_and_valid() {
        // Every key of the default config must be documented, and the documented file must parse.
        let parsed: Config = toml::from_str(EXAMPLE_CONFIG).expect("example config parses");
        let documented = toml::Value::try_from(&parsed).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let key = format!("{prefix}{k}");
                    keys(v, &format!("{key}."), out);
                    out.push(key);
                }
            }
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        keys(&documented, "", &mut a);
        keys(&defaults, "", &mut b);
        for key in b {
            assert!(a.contains(&key), "config/homeserver.toml does not document `{key}`");
        }
        for (_, key, _) in ENV_OVERRIDES.iter().chain(rate_limits::ENV_OVERRIDES).chain(transactions::ENV_OVERRIDES) {
            assert!(EXAMPLE_CONFIG.contains(key.rsplit('.').next().unwrap()), "{key} undocumented");
        }
        // The documented push denylist is the one private-address list, range for range.
        assert_eq!(parsed.push.gateway_ip_range_denylist, federation::discovery::PRIVATE_RANGES);
    }
}
