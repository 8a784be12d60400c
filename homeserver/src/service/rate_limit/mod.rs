//! Rate limits: Synapse's classes (`config::RateLimitsConfig`), each a table of token
//! buckets keyed by what it limits (a user, a room, an address, a device). Over a limit a
//! request is refused with 429 `M_LIMIT_EXCEEDED`, `retry_after_ms` and `Retry-After`
//! (`Error::LimitExceeded`), and nothing is counted.
//!
//! Users in `rate_limits.exempt_users` are never limited, in any class they act in.
//! Addresses are limited per IPv4 address and per IPv6 /64 (one host usually holds a whole
//! /64, so counting its addresses one by one would limit nothing).

mod buckets;

use ruma::events::room::member::MembershipState;
use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use ruma::UserId;

use self::buckets::Buckets;
use crate::{
    config::{RateLimit, RateLimitsConfig},
    error::{Error, Result},
};

/// Buckets one class keeps at most (about 40 bytes each). Drained buckets are dropped to
/// make room; past that, new keys share one bucket until some drain.
pub const MAX_KEYS_PER_CLASS: usize = 100_000;

/// What is limited. The comment says what each class's bucket is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// User: events sent (messages, state, redactions) and profile changes.
    Message,
    /// User.
    RoomCreation,
    /// User, joining a room this server is in.
    JoinLocal,
    /// User, joining through another server.
    JoinRemote,
    /// Room.
    JoinsPerRoom,
    /// Room.
    InvitesPerRoom,
    /// Invitee.
    InvitesPerUser,
    /// Inviter.
    InvitesPerIssuer,
    /// User.
    MediaCreate,
    /// Address, every login attempt.
    LoginAddress,
    /// Account, every login attempt.
    LoginAccount,
    /// Account, failed logins and failed password stages of user-interactive auth.
    LoginFailedAttempts,
    /// Address.
    Registration,
    /// Address, every registration token tried.
    RegistrationTokenValidity,
    /// Sending device, cross-user room key requests.
    KeyRequests,
    /// User.
    Presence,
}

impl Class {
    const ALL: [Class; 16] = [
        Class::Message,
        Class::RoomCreation,
        Class::JoinLocal,
        Class::JoinRemote,
        Class::JoinsPerRoom,
        Class::InvitesPerRoom,
        Class::InvitesPerUser,
        Class::InvitesPerIssuer,
        Class::MediaCreate,
        Class::LoginAddress,
        Class::LoginAccount,
        Class::LoginFailedAttempts,
        Class::Registration,
        Class::RegistrationTokenValidity,
        Class::KeyRequests,
        Class::Presence,
    ];

    fn limit(self, c: &RateLimitsConfig) -> RateLimit {
        match self {
            Class::Message => c.message,
            Class::RoomCreation => c.room_creation,
            Class::JoinLocal => c.joins.local,
            Class::JoinRemote => c.joins.remote,
            Class::JoinsPerRoom => c.joins_per_room,
            Class::InvitesPerRoom => c.invites.per_room,
            Class::InvitesPerUser => c.invites.per_user,
            Class::InvitesPerIssuer => c.invites.per_issuer,
            Class::MediaCreate => c.media_create,
            Class::LoginAddress => c.login.address,
            Class::LoginAccount => c.login.account,
            Class::LoginFailedAttempts => c.login.failed_attempts,
            Class::Registration => c.registration,
            Class::RegistrationTokenValidity => c.registration_token_validity,
            Class::KeyRequests => c.key_requests,
            Class::Presence => c.presence.per_user,
        }
    }
}

/// What one bucket is for.
#[derive(Debug, Clone, Copy, Hash)]
pub enum Key<'a> {
    /// A client address (an IPv6 address stands for its /64).
    Address(IpAddr),
    /// A user, room or other id.
    Id(&'a str),
    /// A user's device.
    Device(&'a str, &'a str),
}

impl Key<'_> {
    /// The form the bucket is keyed by: IPv4-mapped IPv6 as IPv4, IPv6 by its /64.
    fn normalized(self) -> Self {
        match self {
            Key::Address(ip) => Key::Address(match ip.to_canonical() {
                IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
                v4 => v4,
            }),
            other => other,
        }
    }
}

pub struct RateLimits {
    /// One table per class, in [`Class::ALL`] order; none when rate limiting is off.
    classes: Option<Vec<Buckets>>,
    exempt: HashSet<String>,
}

impl RateLimits {
    pub fn new(config: &RateLimitsConfig) -> Self {
        Self::with_capacity(config, MAX_KEYS_PER_CLASS)
    }

    fn with_capacity(config: &RateLimitsConfig, max_keys: usize) -> Self {
        let classes = config
            .enabled
            .then(|| Class::ALL.iter().map(|class| Buckets::new(class.limit(config), max_keys)).collect());
        Self { classes, exempt: config.exempt_users.iter().cloned().collect() }
    }

    fn buckets(&self, class: Class) -> Option<&Buckets> {
        self.classes.as_ref().map(|all| &all[class as usize])
    }

    /// Whether `actor` is a user no limit applies to.
    fn exempt(&self, actor: Option<&UserId>) -> bool {
        actor.is_some_and(|user| self.exempt.contains(user.as_str()))
    }

    /// One action by `actor` (None: an unauthenticated client) that counts in every bucket
    /// listed: counted in all of them if each has room, else in none, and refused with the
    /// longest wait.
    pub fn check(&self, actor: Option<&UserId>, limits: &[(Class, Key<'_>)]) -> Result<()> {
        if self.classes.is_none() || self.exempt(actor) {
            return Ok(());
        }
        let now = Instant::now();
        let mut ordered: Vec<&(Class, Key<'_>)> = limits.iter().collect();
        // Tables are locked in one order, so two requests never wait on each other's.
        ordered.sort_by_key(|(class, _)| *class);
        ordered.dedup_by_key(|(class, _)| *class);
        let slots: Vec<_> = ordered
            .into_iter()
            .filter_map(|(class, key)| self.buckets(*class).map(|b| b.slot(key.normalized(), now)))
            .collect();
        if let Some(wait) = slots.iter().filter_map(|slot| slot.wait()).max() {
            return Err(limit_exceeded(wait));
        }
        for slot in slots {
            slot.take(now);
        }
        Ok(())
    }

    /// One action counted in `user`'s own bucket of `class`.
    pub fn check_user(&self, class: Class, user: &UserId) -> Result<()> {
        self.check(Some(user), &[(class, Key::Id(user.as_str()))])
    }

    /// One action by an unauthenticated client, counted in its address's bucket.
    pub fn check_address(&self, class: Class, ip: IpAddr) -> Result<()> {
        self.check(None, &[(class, Key::Address(ip))])
    }

    /// Refuses if one more action would not fit, without counting one: for attempts that
    /// count only when they fail ([`RateLimits::record`]).
    pub fn peek(&self, actor: Option<&UserId>, class: Class, key: Key<'_>) -> Result<()> {
        if self.exempt(actor) {
            return Ok(());
        }
        let Some(buckets) = self.buckets(class) else { return Ok(()) };
        match buckets.slot(key.normalized(), Instant::now()).wait() {
            Some(wait) => Err(limit_exceeded(wait)),
            None => Ok(()),
        }
    }

    /// Counts one action that already happened (a failed attempt).
    pub fn record(&self, actor: Option<&UserId>, class: Class, key: Key<'_>) {
        if self.exempt(actor) {
            return;
        }
        if let Some(buckets) = self.buckets(class) {
            let now = Instant::now();
            buckets.slot(key.normalized(), now).take(now);
        }
    }

    /// Drops drained buckets, so memory follows the clients active now.
    pub fn forget_idle(&self) {
        let now = Instant::now();
        for buckets in self.classes.iter().flatten() {
            buckets.forget_idle(now);
        }
    }
}

impl super::Services {
    /// The message limit for an event a client sends with a transaction id. A retry of a
    /// send that already went through is answered with its event, never refused: the
    /// stored event id when the limit is reached and the transaction is known.
    pub async fn limit_event_send(
        &self,
        sender: &UserId,
        device_id: &str,
        scope: &str,
        txn_id: &str,
    ) -> Result<Option<ruma::OwnedEventId>> {
        let Err(limited) = self.rate_limits.check_user(Class::Message, sender) else { return Ok(None) };
        match self.store.event_id_for_txn(sender.as_str(), device_id, scope, txn_id).await? {
            Some(id) => Ok(Some(ruma::EventId::parse(id).map_err(|e| Error::internal(e.to_string()))?)),
            None => Err(limited),
        }
    }

    /// The join limits for `user` joining `room_id`: theirs, local or remote by whether
    /// this server is in the room, and the room's. Joining a room one is in already is not
    /// a join and is not counted.
    pub async fn limit_join(&self, user: &UserId, room_id: &ruma::RoomId) -> Result<()> {
        if self.rate_limits.classes.is_none() || self.rate_limits.exempt(Some(user)) {
            return Ok(());
        }
        if self.rooms.membership(room_id.as_str(), user.as_str()).await? == Some(MembershipState::Join) {
            return Ok(());
        }
        let local = self.store.room(room_id.as_str()).await?.is_some() && self.servers.we_are_in(room_id).await?;
        let class = if local { Class::JoinLocal } else { Class::JoinRemote };
        self.rate_limits
            .check(Some(user), &[(class, Key::Id(user.as_str())), (Class::JoinsPerRoom, Key::Id(room_id.as_str()))])
    }
}

fn limit_exceeded(wait: Duration) -> Error {
    Error::LimitExceeded { retry_after: wait }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RateLimitsConfig {
        let mut c = RateLimitsConfig::default();
        c.invites.per_room = RateLimit { per_second: 0.001, burst_count: 2 };
        c.invites.per_issuer = RateLimit { per_second: 0.001, burst_count: 3 };
        c.invites.per_user = RateLimit { per_second: 0.001, burst_count: 10 };
        c.exempt_users = vec!["@bot:example.org".to_owned()];
        c
    }

    fn invite(limits: &RateLimits, issuer: &UserId, room: &str, invitee: &str) -> Result<()> {
        limits.check(
            Some(issuer),
            &[
                (Class::InvitesPerIssuer, Key::Id(issuer.as_str())),
                (Class::InvitesPerRoom, Key::Id(room)),
                (Class::InvitesPerUser, Key::Id(invitee)),
            ],
        )
    }

    #[test]
    fn a_refused_action_counts_nowhere() {
        let limits = RateLimits::new(&config());
        let alice = UserId::parse("@alice:example.org").unwrap();
        invite(&limits, &alice, "!a", "@x:e").unwrap();
        invite(&limits, &alice, "!a", "@y:e").unwrap();
        // The room's bucket is full: refused, and alice's own bucket did not pay for it.
        let Err(Error::LimitExceeded { retry_after }) = invite(&limits, &alice, "!a", "@z:e") else { panic!() };
        assert!(retry_after > Duration::from_secs(900), "{retry_after:?}");
        invite(&limits, &alice, "!b", "@z:e").unwrap();
        assert!(invite(&limits, &alice, "!c", "@w:e").is_err(), "alice's third invite fits, the fourth not");
    }

    #[test]
    fn exempt_users_are_never_limited() {
        let limits = RateLimits::new(&config());
        let bot = UserId::parse("@bot:example.org").unwrap();
        for i in 0..50 {
            invite(&limits, &bot, "!a", &format!("@u{i}:e")).unwrap();
            limits.record(Some(&bot), Class::LoginFailedAttempts, Key::Id(bot.as_str()));
        }
        limits.peek(Some(&bot), Class::LoginFailedAttempts, Key::Id(bot.as_str())).unwrap();
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let mut c = config();
        c.login.address = RateLimit { per_second: 0.001, burst_count: 2 };
        let limits = RateLimits::new(&c);
        limits.check_address(Class::LoginAddress, "2001:db8::1".parse().unwrap()).unwrap();
        limits.check_address(Class::LoginAddress, "2001:db8::ffff:2".parse().unwrap()).unwrap();
        assert!(limits.check_address(Class::LoginAddress, "2001:db8::3".parse().unwrap()).is_err());
        limits.check_address(Class::LoginAddress, "2001:db8:0:1::3".parse().unwrap()).unwrap();
        limits.check_address(Class::LoginAddress, "10.0.0.1".parse().unwrap()).unwrap();
        limits.check_address(Class::LoginAddress, "::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(limits.check_address(Class::LoginAddress, "10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn switched_off_limits_nothing() {
        let mut c = config();
        c.enabled = false;
        let limits = RateLimits::new(&c);
        let alice = UserId::parse("@alice:example.org").unwrap();
        for i in 0..50 {
            invite(&limits, &alice, "!a", &format!("@u{i}:e")).unwrap();
        }
    }

    #[test]
    fn memory_is_bounded_per_class() {
        let limits = RateLimits::with_capacity(&config(), 100);
        for i in 0..5000u32 {
            let _ = limits.check_address(Class::LoginAddress, IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(limits.buckets(Class::LoginAddress).unwrap().len(), 100);
    }
}
