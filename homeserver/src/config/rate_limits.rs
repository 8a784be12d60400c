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

use super::{ConfigError, EnvKind, err};

/// A token bucket: `burst_count` actions at once, then `per_second` on average.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst_count: u32,
}

const fn limit(per_second: f64, burst_count: u32) -> RateLimit {
    RateLimit { per_second, burst_count }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// Switch rate limiting off entirely (benchmarks, tests).
    pub enabled: bool,
    /// Users no limit applies to (bots, bridges' senders), as full user ids.
    pub exempt_users: Vec<String>,
    /// Events a user sends (messages, state, redactions) and profile changes (`rc_message`).
    pub message: RateLimit,
    /// Rooms a user creates (`rc_room_creation`).
    pub room_creation: RateLimit,
    /// Joins by a user, to rooms this server is in (`local`) or through another server
    /// (`remote`) (`rc_joins`).
    pub joins: JoinRateLimits,
    /// Joins to one room, by anybody (`rc_joins_per_room`).
    pub joins_per_room: RateLimit,
    /// Invites into one room, to one user, by one user (`rc_invites`).
    pub invites: InviteRateLimits,
    /// Media a user uploads or reserves (`rc_media_create`).
    pub media_create: RateLimit,
    /// Login attempts per address and per account, failed ones per account; failed password
    /// stages of user-interactive auth count as failed attempts too (`rc_login`).
    pub login: LoginRateLimits,
    /// Registrations and username checks per address (`rc_registration`).
    pub registration: RateLimit,
    /// Registration tokens tried per address, through the validity check or the registration
    /// stage (`rc_registration_token_validity`).
    pub registration_token_validity: RateLimit,
    /// Room key requests (`m.room_key_request` to-device messages to other users) per
    /// sending device (`rc_key_requests`).
    pub key_requests: RateLimit,
    /// Presence changes per user (`rc_presence`).
    pub presence: PresenceRateLimits,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinRateLimits {
    pub local: RateLimit,
    pub remote: RateLimit,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InviteRateLimits {
    pub per_room: RateLimit,
    pub per_user: RateLimit,
    pub per_issuer: RateLimit,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginRateLimits {
    pub address: RateLimit,
    pub account: RateLimit,
    pub failed_attempts: RateLimit,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceRateLimits {
    pub per_user: RateLimit,
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

/// The section's environment variables.
pub(super) const ENV_OVERRIDES: &[(&str, &str, EnvKind)] = &[
    ("OBMIN_RATE_LIMITS_ENABLED", "rate_limits.enabled", EnvKind::Bool),
    ("OBMIN_RATE_LIMITS_EXEMPT_USERS", "rate_limits.exempt_users", EnvKind::List),
    ("OBMIN_RATE_LIMITS_MESSAGE_PER_SECOND", "rate_limits.message.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_MESSAGE_BURST_COUNT", "rate_limits.message.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_ROOM_CREATION_PER_SECOND", "rate_limits.room_creation.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_ROOM_CREATION_BURST_COUNT", "rate_limits.room_creation.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_JOINS_LOCAL_PER_SECOND", "rate_limits.joins.local.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_JOINS_LOCAL_BURST_COUNT", "rate_limits.joins.local.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_JOINS_REMOTE_PER_SECOND", "rate_limits.joins.remote.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_JOINS_REMOTE_BURST_COUNT", "rate_limits.joins.remote.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_JOINS_PER_ROOM_PER_SECOND", "rate_limits.joins_per_room.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_JOINS_PER_ROOM_BURST_COUNT", "rate_limits.joins_per_room.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_INVITES_PER_ROOM_PER_SECOND", "rate_limits.invites.per_room.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_INVITES_PER_ROOM_BURST_COUNT", "rate_limits.invites.per_room.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_INVITES_PER_USER_PER_SECOND", "rate_limits.invites.per_user.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_INVITES_PER_USER_BURST_COUNT", "rate_limits.invites.per_user.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_INVITES_PER_ISSUER_PER_SECOND", "rate_limits.invites.per_issuer.per_second", EnvKind::Float),
    (
        "OBMIN_RATE_LIMITS_INVITES_PER_ISSUER_BURST_COUNT",
        "rate_limits.invites.per_issuer.burst_count",
        EnvKind::Integer,
    ),
    ("OBMIN_RATE_LIMITS_MEDIA_CREATE_PER_SECOND", "rate_limits.media_create.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_MEDIA_CREATE_BURST_COUNT", "rate_limits.media_create.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_LOGIN_ADDRESS_PER_SECOND", "rate_limits.login.address.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_LOGIN_ADDRESS_BURST_COUNT", "rate_limits.login.address.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_LOGIN_ACCOUNT_PER_SECOND", "rate_limits.login.account.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_LOGIN_ACCOUNT_BURST_COUNT", "rate_limits.login.account.burst_count", EnvKind::Integer),
    (
        "OBMIN_RATE_LIMITS_LOGIN_FAILED_ATTEMPTS_PER_SECOND",
        "rate_limits.login.failed_attempts.per_second",
        EnvKind::Float,
    ),
    (
        "OBMIN_RATE_LIMITS_LOGIN_FAILED_ATTEMPTS_BURST_COUNT",
        "rate_limits.login.failed_attempts.burst_count",
        EnvKind::Integer,
    ),
    ("OBMIN_RATE_LIMITS_REGISTRATION_PER_SECOND", "rate_limits.registration.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_REGISTRATION_BURST_COUNT", "rate_limits.registration.burst_count", EnvKind::Integer),
    (
        "OBMIN_RATE_LIMITS_REGISTRATION_TOKEN_VALIDITY_PER_SECOND",
        "rate_limits.registration_token_validity.per_second",
        EnvKind::Float,
    ),
    (
        "OBMIN_RATE_LIMITS_REGISTRATION_TOKEN_VALIDITY_BURST_COUNT",
        "rate_limits.registration_token_validity.burst_count",
        EnvKind::Integer,
    ),
    ("OBMIN_RATE_LIMITS_KEY_REQUESTS_PER_SECOND", "rate_limits.key_requests.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_KEY_REQUESTS_BURST_COUNT", "rate_limits.key_requests.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_PRESENCE_PER_USER_PER_SECOND", "rate_limits.presence.per_user.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_PRESENCE_PER_USER_BURST_COUNT", "rate_limits.presence.per_user.burst_count", EnvKind::Integer),
    // The names of the section's earlier shape.
    ("OBMIN_RATE_LIMITS_LOGIN_PER_SECOND", "rate_limits.login.address.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_LOGIN_BURST", "rate_limits.login.address.burst_count", EnvKind::Integer),
    ("OBMIN_RATE_LIMITS_REGISTER_PER_SECOND", "rate_limits.registration.per_second", EnvKind::Float),
    ("OBMIN_RATE_LIMITS_REGISTER_BURST", "rate_limits.registration.burst_count", EnvKind::Integer),
];

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
