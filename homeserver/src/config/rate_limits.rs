//! The `[rate_limits]` section: Synapse's rate-limit classes (`rc_message`, `rc_joins`, ...)
//! under the same names, each a token bucket of `per_second` and `burst_count`, with
//! Synapse's defaults.
//!
//! A class given only in part keeps the default of the fields it leaves out (as Synapse
//! does): the file's and the environment's values are laid over the defaults before they
//! are read ([`fill_defaults`]). The section's earlier shape (`login` and `register` as plain
//! buckets, `burst` for `burst_count`) is still read ([`upgrade_legacy`]).

use ruma::UserId;
use serde::{Deserialize, Serialize};

use super::{ConfigError, err, options::section};

section! {
    /// A token bucket: `burst_count` actions at once, then `per_second` on average.
    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RateLimit {
        pub per_second: f64,
        pub burst_count: u32,
    }
}

const fn limit(per_second: f64, burst_count: u32) -> RateLimit {
    RateLimit { per_second, burst_count }
}

section! {
    /// Synapse's rate-limit classes (`rc_message`, `rc_joins`, ...) under the same names, with
    /// Synapse's defaults. Each is a token bucket: `burst_count` actions at once, then
    /// `per_second` on average. Over a limit: 429 `M_LIMIT_EXCEEDED` with `retry_after_ms` and
    /// a `Retry-After` header, and nothing is counted. A class given in part keeps the default
    /// of what it leaves out. Addresses count per IPv4 address and per IPv6 /64; each class
    /// keeps at most 100000 buckets (drained ones are dropped; past that, new keys share one
    /// bucket).
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct RateLimitsConfig {
        /// Switch rate limiting off entirely: only for benchmarks and tests.
        pub enabled: bool,
        /// Users no limit applies to (bots, bridges' senders), as full user ids, e.g.
        /// `["@bot:example.org"]`. Login and password guesses against their accounts stay
        /// limited.
        pub exempt_users: Vec<String>,
        /// Events a user sends (messages, state events, redactions) and profile changes, per
        /// user (`rc_message`). A retry of a send that went through is answered, never refused.
        pub message: RateLimit,
        /// Rooms a user creates (`rc_room_creation`).
        pub room_creation: RateLimit,
        /// Joins by a user: to rooms this server is in (`local`), through another server
        /// (`remote`) (`rc_joins`). Joining a room one is already in does not count.
        pub joins: JoinRateLimits,
        /// Joins by this server's users to one room (`rc_joins_per_room`).
        pub joins_per_room: RateLimit,
        /// Invites into one room, to one user, by one user; an invite counts in all three
        /// (`rc_invites`).
        pub invites: InviteRateLimits,
        /// Media a user uploads or reserves: upload, `/create`, resumable uploads
        /// (`rc_media_create`).
        pub media_create: RateLimit,
        /// Logins: every attempt per client address and per account; failed attempts per
        /// account (refused before the password is checked), failed password stages of
        /// user-interactive auth included (`rc_login`). Earlier shape, still read:
        /// `[rate_limits.login]` with `per_second` / `burst`, now `address`.
        pub login: LoginRateLimits,
        /// Registrations (counted once user-interactive auth is complete) and username checks,
        /// per client address (`rc_registration`). Earlier name, still read:
        /// `[rate_limits.register]`.
        pub registration: RateLimit,
        /// Registration tokens tried per client address, through the validity check or the
        /// registration's token stage (`rc_registration_token_validity`).
        pub registration_token_validity: RateLimit,
        /// Room key requests (`m.room_key_request` to-device messages to other users), per
        /// sending device (`rc_key_requests`).
        pub key_requests: RateLimit,
        /// Presence changes a user makes with `PUT /presence`; syncs only refresh it
        /// (`rc_presence`).
        pub presence: PresenceRateLimits,
    }
}

section! {
    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct JoinRateLimits {
        pub local: RateLimit,
        pub remote: RateLimit,
    }
}

section! {
    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct InviteRateLimits {
        pub per_room: RateLimit,
        pub per_user: RateLimit,
        pub per_issuer: RateLimit,
    }
}

section! {
    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct LoginRateLimits {
        pub address: RateLimit,
        pub account: RateLimit,
        pub failed_attempts: RateLimit,
    }
}

section! {
    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PresenceRateLimits {
        pub per_user: RateLimit,
    }
}

// Synapse's defaults (synapse/config/ratelimiting.py).
impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            exempt_users: Vec::new(),
            message: limit(0.2, 10),
            room_creation: limit(0.016, 10),
            joins: JoinRateLimits::default(),
            joins_per_room: limit(1.0, 10),
            invites: InviteRateLimits::default(),
            media_create: limit(10.0, 50),
            login: LoginRateLimits::default(),
            registration: limit(0.17, 3),
            registration_token_validity: limit(0.1, 5),
            key_requests: limit(20.0, 100),
            presence: PresenceRateLimits::default(),
        }
    }
}

impl Default for JoinRateLimits {
    fn default() -> Self {
        Self { local: limit(0.1, 10), remote: limit(0.01, 10) }
    }
}

impl Default for InviteRateLimits {
    fn default() -> Self {
        Self { per_room: limit(0.3, 10), per_user: limit(0.003, 5), per_issuer: limit(0.3, 10) }
    }
}

impl Default for LoginRateLimits {
    fn default() -> Self {
        Self { address: limit(0.003, 5), account: limit(0.003, 5), failed_attempts: limit(0.17, 3) }
    }
}

impl Default for PresenceRateLimits {
    fn default() -> Self {
        Self { per_user: limit(0.1, 1) }
    }
}

impl RateLimitsConfig {
    /// Every class with its option name.
    pub fn classes(&self) -> [(&'static str, RateLimit); 16] {
        [
            ("rate_limits.message", self.message),
            ("rate_limits.room_creation", self.room_creation),
            ("rate_limits.joins.local", self.joins.local),
            ("rate_limits.joins.remote", self.joins.remote),
            ("rate_limits.joins_per_room", self.joins_per_room),
            ("rate_limits.invites.per_room", self.invites.per_room),
            ("rate_limits.invites.per_user", self.invites.per_user),
            ("rate_limits.invites.per_issuer", self.invites.per_issuer),
            ("rate_limits.media_create", self.media_create),
            ("rate_limits.login.address", self.login.address),
            ("rate_limits.login.account", self.login.account),
            ("rate_limits.login.failed_attempts", self.login.failed_attempts),
            ("rate_limits.registration", self.registration),
            ("rate_limits.registration_token_validity", self.registration_token_validity),
            ("rate_limits.key_requests", self.key_requests),
            ("rate_limits.presence.per_user", self.presence.per_user),
        ]
    }

    /// Checks every bucket and the exempt users.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, limit) in self.classes() {
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
                return Err(err(format!("{key}.per_second"), "must be a positive number"));
            }
            if limit.burst_count == 0 {
                return Err(err(format!("{key}.burst_count"), "must be at least 1"));
            }
        }
        if let Some(bad) = self.exempt_users.iter().find(|u| UserId::parse(u.as_str()).is_err()) {
            return Err(err("rate_limits.exempt_users", format!("`{bad}` is not a user id like @bot:example.org")));
        }
        Ok(())
    }
}

/// Reads the section's earlier shape: `login` and `register` were single buckets, and a
/// bucket's size was `burst`.
pub(super) fn upgrade_legacy(table: &mut toml::Table) {
    let Some(toml::Value::Table(section)) = table.get_mut("rate_limits") else { return };
    if let Some(old) = section.remove("register") {
        section.entry("registration").or_insert(old);
    }
    if let Some(toml::Value::Table(login)) = section.get_mut("login") {
        let flat: Vec<String> = ["per_second", "burst", "burst_count"]
            .into_iter()
            .filter(|k| login.contains_key(*k))
            .map(String::from)
            .collect();
        if !flat.is_empty() {
            let mut address = toml::Table::new();
            for key in flat {
                if let Some(value) = login.remove(&key) {
                    address.insert(key, value);
                }
            }
            if let toml::Value::Table(existing) =
                login.entry("address").or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                for (k, v) in address {
                    existing.entry(k).or_insert(v);
                }
            }
        }
    }
    rename_burst(section);
}

fn rename_burst(table: &mut toml::Table) {
    if let Some(value) = table.remove("burst") {
        table.entry("burst_count").or_insert(value);
    }
    for (_, value) in table.iter_mut() {
        if let toml::Value::Table(inner) = value {
            rename_burst(inner);
        }
    }
}

/// Lays the section as given over the defaults, so a class given in part keeps the
/// default of what it leaves out.
pub(super) fn fill_defaults(table: &mut toml::Table) {
    let Some(toml::Value::Table(given)) = table.get_mut("rate_limits") else { return };
    let Ok(toml::Value::Table(mut merged)) = toml::Value::try_from(RateLimitsConfig::default()) else { return };
    overlay(&mut merged, std::mem::take(given));
    *given = merged;
}

fn overlay(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => overlay(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> RateLimitsConfig {
        let mut table: toml::Table = toml::from_str(text).unwrap();
        upgrade_legacy(&mut table);
        fill_defaults(&mut table);
        RateLimitsConfig::deserialize(table.remove("rate_limits").unwrap()).unwrap()
    }

    #[test]
    fn a_class_given_in_part_keeps_the_other_default() {
        let c = read("[rate_limits.message]\nper_second = 5.0\n[rate_limits.invites.per_user]\nburst_count = 2\n");
        assert_eq!(c.message, limit(5.0, 10));
        assert_eq!(c.invites.per_user, limit(0.003, 2));
        assert_eq!(c.invites.per_room, limit(0.3, 10));
        assert!(c.enabled);
    }

    #[test]
    fn the_earlier_shape_is_still_read() {
        let c = read(
            "[rate_limits.login]\nper_second = 0.2\nburst = 7\n[rate_limits.register]\nper_second = 0.5\nburst = 4\n",
        );
        assert_eq!(c.login.address, limit(0.2, 7));
        assert_eq!(c.login.account, limit(0.003, 5));
        assert_eq!(c.registration, limit(0.5, 4));
    }

    #[test]
    fn bad_buckets_and_exempt_users_are_refused() {
        let mut c = RateLimitsConfig::default();
        c.joins.remote.per_second = 0.0;
        assert_eq!(c.validate().unwrap_err().key, "rate_limits.joins.remote.per_second");
        let mut c = RateLimitsConfig { exempt_users: vec!["bot".to_owned()], ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "rate_limits.exempt_users");
        c.exempt_users = vec!["@bot:example.org".to_owned()];
        c.validate().unwrap();
    }
}
