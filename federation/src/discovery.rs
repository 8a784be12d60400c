//! Server discovery: where to send requests for a server name, as the spec's "Resolving
//! server names" says: IP literals, explicit ports, `/.well-known/matrix/server` delegation,
//! SRV `_matrix-fed._tcp` (then the deprecated `_matrix._tcp`), else port 8448.
//!
//! The outcome names the TLS host (SNI, certificate and URL host), the port, the `Host`
//! header and, after an SRV lookup, the host to actually connect to. Results are cached in
//! memory (well-known answers for a day, failures for ten minutes), bounded in size.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{TokioResolver, proto::rr::RData};
use ruma::{OwnedServerName, ServerName};
use serde::Deserialize;

/// The default federation port.
pub const DEFAULT_PORT: u16 = 8448;
/// How long a discovery result is reused.
const CACHE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a server without (valid) well-known is remembered as such.
const NEGATIVE_TTL: Duration = Duration::from_secs(600);
/// Most server names remembered; past it the cache starts over (bounded memory).
const CACHE_CAPACITY: usize = 10_000;
/// Largest well-known document read.
const MAX_WELL_KNOWN_BYTES: usize = 64 * 1024;

/// Where and how to reach a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The host for the URL, TLS server name and certificate: a hostname or an IP literal
    /// (IPv6 in brackets).
    pub tls_host: String,
    pub port: u16,
    /// The `Host` header to send.
    pub host_header: String,
    /// The host to resolve and connect to (an SRV target), when it is not `tls_host`.
    pub connect_host: Option<String>,
}

impl Destination {
    /// `https://host:port`, the base URL for requests to this destination.
    pub fn base_url(&self) -> String {
        format!("https://{}:{}", self.tls_host, self.port)
    }
}

/// Resolves server names; shared by the outbound client, which asks it where to connect.
pub struct Discovery {
    cache: Mutex<HashMap<OwnedServerName, (Destination, Instant)>>,
    /// tls_host -> SRV target host, read by the client's DNS resolver.
    pub(crate) connect_overrides: Arc<Mutex<HashMap<String, String>>>,
    srv: Option<TokioResolver>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new()
    }
}

impl Discovery {
    pub fn new() -> Self {
        // Without a usable /etc/resolv.conf there is no SRV lookup; A/AAAA still go through
        // the system resolver, so loopback and /etc/hosts setups keep working.
        let srv = TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| tracing::warn!(error = %e, "no DNS resolver for SRV lookups"))
            .ok();
        Self { cache: Mutex::new(HashMap::new()), connect_overrides: Arc::default(), srv }
    }

    /// Discovery that never asks DNS for SRV records (tests, and setups without DNS).
    pub fn without_srv() -> Self {
        Self { cache: Mutex::new(HashMap::new()), connect_overrides: Arc::default(), srv: None }
    }

    /// Forgets what is known about `server` (after its connection failed, say).
    pub fn forget(&self, server: &ServerName) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(server);
    }

    /// Where to send requests for `server`. `fetch_well_known` performs
    /// `GET https://<host>/.well-known/matrix/server` and returns the body (any failure is
    /// `None`): the client does it, with its TLS settings.
    pub async fn resolve<F, Fut>(&self, server: &ServerName, fetch_well_known: F) -> Destination
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Option<Vec<u8>>>,
    {
        if let Some((dest, at)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(server)
            && at.elapsed() < CACHE_TTL
        {
            return dest.clone();
        }
        let (dest, ttl) = self.discover(server, fetch_well_known).await;
        if let Some(target) = &dest.connect_host {
            self.connect_overrides
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(dest.tls_host.clone(), target.clone());
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        // Store with an age that makes it expire after `ttl`.
        let stamp = Instant::now().checked_sub(CACHE_TTL.saturating_sub(ttl)).unwrap_or_else(Instant::now);
        cache.insert(server.to_owned(), (dest.clone(), stamp));
        dest
    }

    async fn discover<F, Fut>(&self, server: &ServerName, fetch_well_known: F) -> (Destination, Duration)
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Option<Vec<u8>>>,
    {
        let host = server.host();
        // 1. and 2.: an IP literal, or any explicit port: no delegation, no SRV.
        if server.is_ip_literal() || server.port().is_some() {
            let dest = Destination {
                tls_host: host.to_owned(),
                port: server.port().unwrap_or(DEFAULT_PORT),
                host_header: server.to_string(),
                connect_host: None,
            };
            return (dest, CACHE_TTL);
        }
        // 3.: well-known delegation.
        if let Some(body) = fetch_well_known(host.to_owned()).await
            && let Some(delegated) = parse_well_known(&body)
        {
            let delegated_server: &ServerName = &delegated;
            let d_host = delegated_server.host().to_owned();
            if delegated_server.is_ip_literal() || delegated_server.port().is_some() {
                let dest = Destination {
                    tls_host: d_host,
                    port: delegated_server.port().unwrap_or(DEFAULT_PORT),
                    host_header: delegated_server.to_string(),
                    connect_host: None,
                };
                return (dest, CACHE_TTL);
            }
            let dest = self.srv_or_default(&d_host).await;
            return (dest, CACHE_TTL);
        }
        // 4. to 6.: SRV records of the server name itself, else port 8448.
        (self.srv_or_default(host).await, NEGATIVE_TTL)
    }

    async fn srv_or_default(&self, host: &str) -> Destination {
        for prefix in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Some((target, port)) = self.srv_lookup(&format!("{prefix}.{host}.")).await {
                let connect_host = (target != host).then_some(target);
                return Destination { tls_host: host.to_owned(), port, host_header: host.to_owned(), connect_host };
            }
        }
        Destination { tls_host: host.to_owned(), port: DEFAULT_PORT, host_header: host.to_owned(), connect_host: None }
    }

    /// The best SRV target (lowest priority, then highest weight), if any.
    async fn srv_lookup(&self, name: &str) -> Option<(String, u16)> {
        let resolver = self.srv.as_ref()?;
        let lookup = resolver.srv_lookup(name).await.ok()?;
        let mut best: Option<(u16, u16, String, u16)> = None;
        for record in lookup.answers() {
            if let RData::SRV(srv) = &record.data {
                let target = srv.target.to_ascii().trim_end_matches('.').to_owned();
                if target.is_empty() {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some((p, w, ..)) => srv.priority < *p || (srv.priority == *p && srv.weight > *w),
                };
                if better {
                    best = Some((srv.priority, srv.weight, target, srv.port));
                }
            }
        }
        best.map(|(_, _, target, port)| (target, port))
    }
}

/// `{"m.server": "host[:port]"}`, validated as a server name.
pub(crate) fn parse_well_known(body: &[u8]) -> Option<OwnedServerName> {
    #[derive(Deserialize)]
    struct WellKnown {
        #[serde(rename = "m.server")]
        server: String,
    }
    if body.len() > MAX_WELL_KNOWN_BYTES {
        return None;
    }
    let parsed: WellKnown = serde_json::from_slice(body).ok()?;
    ServerName::parse(&parsed.server).ok()
}

/// Address ranges no outbound request may reach unless the operator allows it: loopback,
/// private, shared and link-local ranges, multicast, reserved, documentation and benchmark
/// ranges, and the IPv6 ranges that carry IPv4 addresses inside them (NAT64 `64:ff9b::/96`,
/// 6to4 `2002::/16`), which could otherwise reach a private IPv4 address. The one list for
/// federation, push gateways and any later outbound feature: a remote party (a server name, a
/// pusher URL) must not make the server probe the operator's own network. IPv4-mapped IPv6
/// addresses (`::ffff:10.0.0.1`) are judged as the IPv4 address they carry.
pub const PRIVATE_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "100::/64",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// [`PRIVATE_RANGES`], parsed once.
static PRIVATE_NETS: std::sync::LazyLock<Vec<ipnet::IpNet>> = std::sync::LazyLock::new(|| {
    PRIVATE_RANGES.iter().map(|r| r.parse().expect("PRIVATE_RANGES holds valid CIDR ranges")).collect()
});

/// Whether `ip` is in one of the [`PRIVATE_RANGES`].
pub fn is_private(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    PRIVATE_NETS.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use ruma::server_name;

    use super::*;

    async fn no_well_known(_: String) -> Option<Vec<u8>> {
        None
    }

    #[tokio::test]
    async fn literals_and_ports_skip_delegation() {
        let d = Discovery::without_srv();
        let dest = d.resolve(server_name!("1.2.3.4"), no_well_known).await;
        assert_eq!((dest.tls_host.as_str(), dest.port, dest.host_header.as_str()), ("1.2.3.4", 8448, "1.2.3.4"));
        let dest = d.resolve(server_name!("[::1]:9000"), no_well_known).await;
        assert_eq!((dest.tls_host.as_str(), dest.port, dest.host_header.as_str()), ("[::1]", 9000, "[::1]:9000"));
        assert_eq!(dest.base_url(), "https://[::1]:9000");
        let dest = d.resolve(server_name!("localhost:1234"), |_| async { panic!("no well-known with a port") }).await;
        assert_eq!(
            (dest.tls_host.as_str(), dest.port, dest.host_header.as_str()),
            ("localhost", 1234, "localhost:1234")
        );
    }

    #[tokio::test]
    async fn well_known_delegates() {
        let d = Discovery::without_srv();
        let dest = d
            .resolve(server_name!("example.invalid"), |host| async move {
                assert_eq!(host, "example.invalid");
                Some(br#"{"m.server": "matrix.example.invalid:443"}"#.to_vec())
            })
            .await;
        assert_eq!(
            dest,
            Destination {
                tls_host: "matrix.example.invalid".into(),
                port: 443,
                host_header: "matrix.example.invalid:443".into(),
                connect_host: None
            }
        );
        // A delegation to an IP literal without port gets 8448.
        let dest =
            d.resolve(server_name!("other.invalid"), |_| async { Some(br#"{"m.server": "10.0.0.1"}"#.to_vec()) }).await;
        assert_eq!((dest.tls_host.as_str(), dest.port), ("10.0.0.1", 8448));
    }

    #[tokio::test]
    async fn no_delegation_and_no_srv_means_port_8448() {
        let d = Discovery::without_srv();
        // `.invalid` never resolves (RFC 6761), so there is no SRV record either.
        let dest = d.resolve(server_name!("nothing.invalid"), |_| async { Some(b"not json".to_vec()) }).await;
        assert_eq!((dest.tls_host.as_str(), dest.port, dest.connect_host), ("nothing.invalid", 8448, None));
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "fec0::1",
            "192.0.0.8",
            "255.255.255.255",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "172.32.0.1", "::ffff:1.1.1.1"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
