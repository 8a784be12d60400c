//! Configuration: a TOML file, then environment overrides, then validation.
//!
//! Every option is declared once, below, as a field of a section struct (see [`options`]):
//! its doc comment documents it, the struct's `Default` gives its default, and its
//! environment variable is derived from its key. `config/homeserver.toml` (printed by
//! `homeserver config example`) and `docs/configuration.md` (`homeserver config reference`)
//! are generated from these declarations ([`docs`]); a test fails when the checked-in copies
//! drift. A bad value is reported with the option's name and the reason; nothing here panics.
//!
//! To add an option: add the field with a doc comment and its default, validate it in
//! `Settings::validate` if it needs it, then regenerate the two files (see [`docs`]).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ruma::{OwnedServerName, ServerName};
use serde::{Deserialize, Serialize};

pub mod docs;
pub mod options;
mod rate_limits;
mod transactions;
use options::{OptionType, section, value_types};
pub use rate_limits::{
    InviteRateLimits, JoinRateLimits, LoginRateLimits, PresenceRateLimits, RateLimit, RateLimitsConfig,
};
pub use transactions::TransactionsConfig;

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

value_types!(String: RegistrationMode, LogFormat, SqliteSynchronous);

section! {
    /// The whole configuration, as read from the file (all fields optional there).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Config {
        /// The server name: the part after `:` in user ids (`@alice:example.org`). It cannot
        /// be changed once accounts exist.
        pub server_name: String,
        /// Address of the Client-Server API listener.
        pub listen: String,
        /// Base URL clients use to reach this server, announced in
        /// `/.well-known/matrix/client` and in login responses. Unset:
        /// `http://localhost:<port>/` for `localhost`, otherwise `https://<server_name>/`.
        #[example = r#""https://matrix.example.org/""#]
        pub public_baseurl: Option<String>,
        /// Directory for the SQLite database, the server's ed25519 signing key (`signing.key`,
        /// Synapse's format) and uploaded media (`media/`). Created on first start.
        pub data_dir: PathBuf,
        /// Database: `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
        /// Unset: `sqlite://<data_dir>/homeserver.db`. Migrations run at every start.
        #[example = r#""postgres://obmin:secret@127.0.0.1:5432/obmin""#]
        pub database_url: Option<String>,
        /// Who may create accounts: `"open"` (anyone), `"token"` (with a registration token,
        /// see `homeserver registration-token create`) or `"disabled"` (only
        /// `homeserver user create`). Unset: `"open"` for `localhost` with no config file,
        /// `"disabled"` otherwise.
        #[example = r#""token""#]
        pub registration: Option<RegistrationMode>,
        /// Largest JSON request body accepted, in bytes (larger: 413 `M_TOO_LARGE`).
        pub max_request_bytes: u64,
        /// Treat every socket peer as a trusted reverse proxy (the proxy is the only way in):
        /// the client is the right-most `X-Forwarded-For` address that is not in
        /// `trusted_proxies`.
        pub trust_x_forwarded_for: bool,
        /// Reverse proxies (addresses or CIDR ranges, e.g. `["10.0.0.5", "fd00::/8"]`) whose
        /// `X-Forwarded-For` is believed. The client's address (for rate limits and "last
        /// seen") is the connection's peer, unless that peer is a trusted proxy: then it is
        /// the right-most `X-Forwarded-For` address that is not a trusted proxy (what the
        /// client itself wrote, left of that, is never believed).
        pub trusted_proxies: Vec<String>,
        /// Served as `{"m.server": ...}` at `/.well-known/matrix/server`, to delegate
        /// federation to another host or port, e.g. `matrix.example.org:443`. Unset: that
        /// endpoint answers 404.
        #[example = r#""matrix.example.org:443""#]
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
}

section! {
    /// Delivery of push notifications to the push gateways (e.g. Sygnal) that clients register
    /// with `POST /pushers/set`.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PushConfig {
        /// Address ranges a push gateway may not be reached at: a user could otherwise make the
        /// server send requests into its own private network. The default is the server's one
        /// private-address list (also what federation refuses unless
        /// `federation.allow_private_targets`): loopback, private, link-local and reserved
        /// ranges, and the IPv6 ranges that carry IPv4 addresses (NAT64, 6to4).
        pub gateway_ip_range_denylist: Vec<String>,
        /// Ranges allowed even though the denylist covers them, e.g. `["10.0.5.7/32"]` for a
        /// gateway on the local network (tests use `["127.0.0.1/32"]`).
        pub gateway_ip_range_allowlist: Vec<String>,
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            gateway_ip_range_denylist: federation::discovery::PRIVATE_RANGES.iter().map(|s| (*s).to_owned()).collect(),
            gateway_ip_range_allowlist: Vec::new(),
        }
    }
}

section! {
    /// Federation: the TLS listener other servers reach and the outbound client's switches.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct FederationConfig {
        /// Address of the TLS listener other servers reach (Server-Server API and key server),
        /// e.g. `"0.0.0.0:8448"`. Empty: no listener, and other servers cannot reach this one.
        pub listen: String,
        /// PEM certificate chain for that listener (for example from Let's Encrypt for the
        /// server name, or for the host that `/.well-known/matrix/server` delegates to).
        pub tls_cert: String,
        /// PEM private key for that listener.
        pub tls_key: String,
        /// Check other servers' TLS certificates against the public web roots. Only switch
        /// this off for loopback tests or a private network with self-signed certificates.
        pub verify_certificates: bool,
        /// Allow federation requests to loopback and private addresses (10/8, 192.168/16,
        /// ...). Off, a server name that resolves there is refused, so nobody can make this
        /// server probe the internal network.
        pub allow_private_targets: bool,
        /// Seconds an incoming transaction (`/send`) waits for its events that need others
        /// fetched first (missing prev or auth events; worked on in the background, queued in
        /// the database) before it is answered; events still being worked on then are reported
        /// as taken. At most 60. Fixed by the spec, not options: 50 PDUs and 100 EDUs per
        /// transaction, 20 prev_events and 10 auth_events per event; one transaction at a time
        /// per server (a second meanwhile waits up to 15 s, then gets 429).
        pub inbound_wait_secs: u64,
        /// Requests to other servers in flight at once, federation and push gateways
        /// together; more wait for their turn.
        pub max_outbound_requests: u32,
        /// A server our deliveries have failed to reach for this long (seconds; restarts do
        /// not reset the clock) is given up on: its queue is cut to the newest event of each
        /// room plus the to-device and device-list messages, typing, presence and receipts for
        /// it are dropped, and it is retried hourly or as soon as it contacts us. It fetches
        /// the gap itself when it returns. The metrics count such servers and what was dropped.
        pub give_up_after_secs: u64,
    }
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

section! {
    /// User search (`/user_directory/search`).
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct UserDirectoryConfig {
        /// Let user search find every user of the server. Otherwise it finds users who share a
        /// room with the searcher or are in a public room.
        pub search_all_users: bool,
    }
}

section! {
    /// TURN for voice and video calls, with coturn's `use-auth-secret`: clients get
    /// time-limited credentials from `/voip/turnServer`.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct TurnConfig {
        /// `turn:` / `turns:` URIs handed to clients. Empty: no TURN server (that endpoint then
        /// answers 404 `M_NOT_FOUND`).
        pub uris: Vec<String>,
        /// coturn's `static-auth-secret`.
        pub shared_secret: String,
        /// Lifetime of the credentials, in seconds.
        pub credential_lifetime_secs: u64,
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self { uris: Vec::new(), shared_secret: String::new(), credential_lifetime_secs: 86_400 }
    }
}

section! {
    /// The media repository: uploads, downloads, thumbnails (`docs/media.md`).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct MediaConfig {
        /// Largest file one upload may carry, in bytes (clients see it as `m.upload.size`).
        /// Bigger uploads get 413 `M_TOO_LARGE`, before the body is read when `Content-Length`
        /// says so, and as soon as a streamed body passes the limit otherwise. Also the largest
        /// file fetched from another server: its answer is cut off there (502 `M_TOO_LARGE`).
        pub max_upload_bytes: u64,
        /// Total bytes of media one user may store, counting the announced length of
        /// unfinished resumable uploads; an upload that would pass it is refused with 403
        /// `M_FORBIDDEN` (checked atomically: concurrent uploads cannot pass it together).
        /// 0: unlimited.
        pub quota_bytes_per_user: u64,
        /// Media uploaded before this moment (milliseconds since the Unix epoch) stays
        /// downloadable without an access token through the legacy
        /// `/_matrix/media/v3/download` and `/thumbnail` endpoints, as Synapse does for media
        /// from before authenticated media; newer media answers 404 there and is served by
        /// `/_matrix/client/v1/media/...` only. 0: none.
        pub unauthenticated_cutoff_ms: i64,
        /// Delete local media (and its thumbnails) that nobody downloaded for this many days,
        /// checked hourly. 0: keep forever.
        pub local_retention_days: u64,
        /// Forget an asynchronous (`POST /create`) or resumable upload that made no progress
        /// for this many hours, with its partial data.
        pub pending_upload_hours: u64,
        /// The only thumbnails made, as Synapse's `thumbnail_sizes` (the default is its
        /// default). A request is answered with the smallest size of its method (`crop` fills
        /// the box, `scale` fits in it) that covers the requested width and height, else the
        /// largest; each is made once per image, when first asked for, and kept. Edges 1 to
        /// 4096 pixels; an empty list means no thumbnails. In the environment:
        /// `32x32-crop,96x96-crop,320x240-scale,...`.
        pub thumbnail_sizes: Vec<ThumbnailSize>,
        /// Thumbnails generated at once (each decodes an image of up to 64 MiB on a blocking
        /// thread); further requests wait their turn, and identical requests share one
        /// generation.
        pub thumbnail_concurrency: usize,
    }
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

section! {
    /// Prometheus metrics (`/metrics`). Never public by default: the numbers say who is busy
    /// and how the server is built.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct MetricsConfig {
        /// A listener of their own for the metrics, which Prometheus alone can reach (plain
        /// HTTP; `/health` is there too), e.g. `"127.0.0.1:9108"`. Empty: none.
        pub listen: String,
        /// Or serve `/metrics` on the Client-Server listener to requests carrying this token
        /// (`Authorization: Bearer ...`; at least 16 characters). Empty: not served there.
        pub bearer_token: String,
    }
}

section! {
    /// Limits of both listeners (Client-Server and federation), against clients that hold
    /// connections open without finishing their requests (slowloris) or open very many.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct HttpConfig {
        /// Seconds a client has to send a request's headers, from the connection's start or
        /// the end of the previous response (so also how long a kept-alive connection may sit
        /// idle).
        pub header_timeout_secs: u64,
        /// Seconds a request body may go without sending data.
        pub body_timeout_secs: u64,
        /// Seconds a request may take to be answered (503 `M_UNKNOWN` after it); media uploads
        /// are bounded by the body timeout instead. Must exceed the longest sync long-poll
        /// (60 s).
        pub request_timeout_secs: u64,
        /// Connections open at once, per listener; more are closed as soon as they are
        /// accepted.
        pub max_connections: u32,
        /// Connections open at once from one address (0: no limit). Raise it, or exempt the
        /// address, if many people reach the server through one NAT or proxy address.
        pub max_connections_per_address: u32,
        /// Addresses (CIDR ranges) the per-address limit does not apply to: a reverse proxy in
        /// front of the server, and this machine.
        pub connection_limit_exempt: Vec<String>,
    }
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

section! {
    /// Presence: online / unavailable / offline, status messages and last activity.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PresenceConfig {
        /// Share presence with users who share a room. Switch off to save the work and keep
        /// activity private.
        pub enabled: bool,
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

section! {
    /// The database connections (the database itself is `database_url`).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct DatabaseConfig {
        /// Most connections the read pool opens. Unset: 4 on SQLite (plus one writer), 16 on
        /// PostgreSQL. SQLite reads run on the homeserver's own cores, so more connections add
        /// no throughput, only page caches that each start cold (measured: an initial sync
        /// 20 % slower and peak memory 26 MiB higher with 16).
        #[example = "16"]
        pub max_connections: Option<u32>,
        /// SQLite only. `"normal"`: a commit survives a killed homeserver process, but an
        /// operating system crash or power cut may lose the last moments. `"full"`: every
        /// commit is fsynced and survives those too, at a cost per write.
        pub sqlite_synchronous: SqliteSynchronous,
    }
}

section! {
    /// Logging.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct LogConfig {
        /// What to log: a tracing filter such as `"info"` or
        /// `"homeserver=debug,tower_http=info"`.
        pub filter: String,
        /// `"pretty"` for people, `"json"` for log collectors.
        pub format: LogFormat,
    }
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

/// Every environment variable read, with its option and value kind, in the order applied
/// (see [`options::env_overrides`]).
pub fn env_overrides() -> Vec<(String, String, options::EnvKind)> {
    options::env_overrides(ROOT)
}

/// The declarations of every option.
pub const ROOT: &options::Section = match Config::SHAPE {
    options::Shape::Section(section) => section,
    // Checked when compiling: `Config` is declared with `section!`.
    options::Shape::Value(_) => panic!("Config is not a section"),
};

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
        for (name, key, kind) in env_overrides() {
            if let Some(raw) = env(&name) {
                let value = options::parse_env(&name, &raw, kind)?;
                set_path(&mut table, &key, value);
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
    fn every_earlier_environment_name_is_still_read_as_before() {
        // The hand-written table the names now derive from, as it was: each name must still
        // set the same option, parsed the same way.
        use options::EnvKind::{Bool, Float, Integer, List, String};
        let earlier = [
            ("OBMIN_SERVER_NAME", "server_name", String),
            ("OBMIN_LISTEN", "listen", String),
            ("OBMIN_PUBLIC_BASEURL", "public_baseurl", String),
            ("OBMIN_DATA_DIR", "data_dir", String),
            ("OBMIN_DATABASE_URL", "database_url", String),
            ("OBMIN_REGISTRATION", "registration", String),
            ("OBMIN_MAX_REQUEST_BYTES", "max_request_bytes", Integer),
            ("OBMIN_TRUST_X_FORWARDED_FOR", "trust_x_forwarded_for", Bool),
            ("OBMIN_TRUSTED_PROXIES", "trusted_proxies", List),
            ("OBMIN_WELL_KNOWN_SERVER", "well_known_server", String),
            ("OBMIN_HTTP_HEADER_TIMEOUT_SECS", "http.header_timeout_secs", Integer),
            ("OBMIN_HTTP_BODY_TIMEOUT_SECS", "http.body_timeout_secs", Integer),
            ("OBMIN_HTTP_REQUEST_TIMEOUT_SECS", "http.request_timeout_secs", Integer),
            ("OBMIN_HTTP_MAX_CONNECTIONS", "http.max_connections", Integer),
            ("OBMIN_HTTP_MAX_CONNECTIONS_PER_ADDRESS", "http.max_connections_per_address", Integer),
            ("OBMIN_HTTP_CONNECTION_LIMIT_EXEMPT", "http.connection_limit_exempt", List),
            ("OBMIN_METRICS_LISTEN", "metrics.listen", String),
            ("OBMIN_METRICS_BEARER_TOKEN", "metrics.bearer_token", String),
            ("OBMIN_DATABASE_MAX_CONNECTIONS", "database.max_connections", Integer),
            ("OBMIN_DATABASE_SQLITE_SYNCHRONOUS", "database.sqlite_synchronous", String),
            ("OBMIN_LOG", "log.filter", String),
            ("OBMIN_LOG_FORMAT", "log.format", String),
            ("OBMIN_PRESENCE_ENABLED", "presence.enabled", Bool),
            ("OBMIN_USER_DIRECTORY_SEARCH_ALL_USERS", "user_directory.search_all_users", Bool),
            ("OBMIN_TURN_URIS", "turn.uris", List),
            ("OBMIN_TURN_SHARED_SECRET", "turn.shared_secret", String),
            ("OBMIN_TURN_CREDENTIAL_LIFETIME_SECS", "turn.credential_lifetime_secs", Integer),
            ("OBMIN_MEDIA_MAX_UPLOAD_BYTES", "media.max_upload_bytes", Integer),
            ("OBMIN_MEDIA_QUOTA_BYTES_PER_USER", "media.quota_bytes_per_user", Integer),
            ("OBMIN_MEDIA_UNAUTHENTICATED_CUTOFF_MS", "media.unauthenticated_cutoff_ms", Integer),
            ("OBMIN_MEDIA_LOCAL_RETENTION_DAYS", "media.local_retention_days", Integer),
            ("OBMIN_MEDIA_PENDING_UPLOAD_HOURS", "media.pending_upload_hours", Integer),
            ("OBMIN_MEDIA_THUMBNAIL_SIZES", "media.thumbnail_sizes", List),
            ("OBMIN_MEDIA_THUMBNAIL_CONCURRENCY", "media.thumbnail_concurrency", Integer),
            ("OBMIN_PUSH_GATEWAY_IP_RANGE_DENYLIST", "push.gateway_ip_range_denylist", List),
            ("OBMIN_PUSH_GATEWAY_IP_RANGE_ALLOWLIST", "push.gateway_ip_range_allowlist", List),
            ("OBMIN_FEDERATION_LISTEN", "federation.listen", String),
            ("OBMIN_TLS_CERT", "federation.tls_cert", String),
            ("OBMIN_TLS_KEY", "federation.tls_key", String),
            ("OBMIN_FEDERATION_VERIFY_CERTIFICATES", "federation.verify_certificates", Bool),
            ("OBMIN_FEDERATION_ALLOW_PRIVATE_TARGETS", "federation.allow_private_targets", Bool),
            ("OBMIN_FEDERATION_INBOUND_WAIT_SECS", "federation.inbound_wait_secs", Integer),
            ("OBMIN_FEDERATION_MAX_OUTBOUND_REQUESTS", "federation.max_outbound_requests", Integer),
            ("OBMIN_FEDERATION_GIVE_UP_AFTER_SECS", "federation.give_up_after_secs", Integer),
            ("OBMIN_RATE_LIMITS_ENABLED", "rate_limits.enabled", Bool),
            ("OBMIN_RATE_LIMITS_EXEMPT_USERS", "rate_limits.exempt_users", List),
            ("OBMIN_RATE_LIMITS_MESSAGE_PER_SECOND", "rate_limits.message.per_second", Float),
            ("OBMIN_RATE_LIMITS_MESSAGE_BURST_COUNT", "rate_limits.message.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_ROOM_CREATION_PER_SECOND", "rate_limits.room_creation.per_second", Float),
            ("OBMIN_RATE_LIMITS_ROOM_CREATION_BURST_COUNT", "rate_limits.room_creation.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_JOINS_LOCAL_PER_SECOND", "rate_limits.joins.local.per_second", Float),
            ("OBMIN_RATE_LIMITS_JOINS_LOCAL_BURST_COUNT", "rate_limits.joins.local.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_JOINS_REMOTE_PER_SECOND", "rate_limits.joins.remote.per_second", Float),
            ("OBMIN_RATE_LIMITS_JOINS_REMOTE_BURST_COUNT", "rate_limits.joins.remote.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_JOINS_PER_ROOM_PER_SECOND", "rate_limits.joins_per_room.per_second", Float),
            ("OBMIN_RATE_LIMITS_JOINS_PER_ROOM_BURST_COUNT", "rate_limits.joins_per_room.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_INVITES_PER_ROOM_PER_SECOND", "rate_limits.invites.per_room.per_second", Float),
            ("OBMIN_RATE_LIMITS_INVITES_PER_ROOM_BURST_COUNT", "rate_limits.invites.per_room.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_INVITES_PER_USER_PER_SECOND", "rate_limits.invites.per_user.per_second", Float),
            ("OBMIN_RATE_LIMITS_INVITES_PER_USER_BURST_COUNT", "rate_limits.invites.per_user.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_INVITES_PER_ISSUER_PER_SECOND", "rate_limits.invites.per_issuer.per_second", Float),
            ("OBMIN_RATE_LIMITS_INVITES_PER_ISSUER_BURST_COUNT", "rate_limits.invites.per_issuer.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_MEDIA_CREATE_PER_SECOND", "rate_limits.media_create.per_second", Float),
            ("OBMIN_RATE_LIMITS_MEDIA_CREATE_BURST_COUNT", "rate_limits.media_create.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_LOGIN_ADDRESS_PER_SECOND", "rate_limits.login.address.per_second", Float),
            ("OBMIN_RATE_LIMITS_LOGIN_ADDRESS_BURST_COUNT", "rate_limits.login.address.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_LOGIN_ACCOUNT_PER_SECOND", "rate_limits.login.account.per_second", Float),
            ("OBMIN_RATE_LIMITS_LOGIN_ACCOUNT_BURST_COUNT", "rate_limits.login.account.burst_count", Integer),
            (
                "OBMIN_RATE_LIMITS_LOGIN_FAILED_ATTEMPTS_PER_SECOND",
                "rate_limits.login.failed_attempts.per_second",
                Float,
            ),
            (
                "OBMIN_RATE_LIMITS_LOGIN_FAILED_ATTEMPTS_BURST_COUNT",
                "rate_limits.login.failed_attempts.burst_count",
                Integer,
            ),
            ("OBMIN_RATE_LIMITS_REGISTRATION_PER_SECOND", "rate_limits.registration.per_second", Float),
            ("OBMIN_RATE_LIMITS_REGISTRATION_BURST_COUNT", "rate_limits.registration.burst_count", Integer),
            (
                "OBMIN_RATE_LIMITS_REGISTRATION_TOKEN_VALIDITY_PER_SECOND",
                "rate_limits.registration_token_validity.per_second",
                Float,
            ),
            (
                "OBMIN_RATE_LIMITS_REGISTRATION_TOKEN_VALIDITY_BURST_COUNT",
                "rate_limits.registration_token_validity.burst_count",
                Integer,
            ),
            ("OBMIN_RATE_LIMITS_KEY_REQUESTS_PER_SECOND", "rate_limits.key_requests.per_second", Float),
            ("OBMIN_RATE_LIMITS_KEY_REQUESTS_BURST_COUNT", "rate_limits.key_requests.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_PRESENCE_PER_USER_PER_SECOND", "rate_limits.presence.per_user.per_second", Float),
            ("OBMIN_RATE_LIMITS_PRESENCE_PER_USER_BURST_COUNT", "rate_limits.presence.per_user.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_LOGIN_PER_SECOND", "rate_limits.login.address.per_second", Float),
            ("OBMIN_RATE_LIMITS_LOGIN_BURST", "rate_limits.login.address.burst_count", Integer),
            ("OBMIN_RATE_LIMITS_REGISTER_PER_SECOND", "rate_limits.registration.per_second", Float),
            ("OBMIN_RATE_LIMITS_REGISTER_BURST", "rate_limits.registration.burst_count", Integer),
            ("OBMIN_TRANSACTIONS_RETENTION_SECS", "transactions.retention_secs", Integer),
            ("OBMIN_TRANSACTIONS_PRUNE_INTERVAL_SECS", "transactions.prune_interval_secs", Integer),
        ];
        let now = env_overrides();
        for (name, key, kind) in earlier {
            assert!(
                now.iter().any(|(n, k, v)| n == name && k == key && *v == kind),
                "{name} no longer sets {key} as {kind:?}"
            );
        }
    }

    #[test]
    fn environment_names_follow_the_rule_and_are_unique() {
        let now = env_overrides();
        let mut names: Vec<&str> = now.iter().map(|(n, _, _)| n.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "two options share an environment variable");
        for (alias, key) in options::ENV_ALIASES {
            assert!(options::leaves(ROOT).iter().any(|l| l.key == *key), "{alias} names no option ({key})");
            assert_ne!(*alias, options::env_name(key), "{alias} is the rule's own name: not an alias");
        }
        // The rule's name and the older one both work; set together, the older one wins.
        assert_eq!(load(&[("OBMIN_LOG_FILTER", "warn")]).unwrap().log.filter, "warn");
        assert_eq!(load(&[("OBMIN_LOG", "debug")]).unwrap().log.filter, "debug");
        assert_eq!(load(&[("OBMIN_LOG_FILTER", "warn"), ("OBMIN_LOG", "debug")]).unwrap().log.filter, "debug");
        let s = load(&[("OBMIN_RATE_LIMITS_LOGIN_ADDRESS_BURST_COUNT", "9")]).unwrap();
        assert_eq!(s.rate_limits.login.address.burst_count, 9);
        let s = load(&[("OBMIN_MEDIA_THUMBNAIL_SIZES", "32x32-crop, 640x480-scale")]).unwrap();
        assert_eq!(s.media.thumbnail_sizes.len(), 2);
    }
}
