//! Per-client-address rate limits for login and registration (token buckets, `governor`).

use std::{net::IpAddr, num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::{
    config::{RateLimit, RateLimitsConfig},
    error::{Error, Result},
};

/// The actions that are limited.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Login,
    Register,
}

pub struct RateLimits {
    login: Option<DefaultKeyedRateLimiter<IpAddr>>,
    register: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

fn limiter(limit: RateLimit) -> DefaultKeyedRateLimiter<IpAddr> {
    let period = Duration::from_secs_f64(1.0 / limit.per_second);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN)).allow_burst(burst);
    RateLimiter::keyed(quota)
}

impl RateLimits {
    pub fn new(config: &RateLimitsConfig) -> Self {
        if !config.enabled {
            return Self { login: None, register: None };
        }
        Self { login: Some(limiter(config.login)), register: Some(limiter(config.register)) }
    }

    /// Takes one token for `action` from `ip`'s bucket, or says how long to wait.
    pub fn check(&self, action: Action, ip: IpAddr) -> Result<()> {
        let limiter = match action {
            Action::Login => &self.login,
            Action::Register => &self.register,
        };
        let Some(limiter) = limiter else { return Ok(()) };
        limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::LimitExceeded { retry_after: wait.max(Duration::from_millis(1)) }
        })
    }

    /// Drops buckets that are full again, so memory does not grow with every address seen.
    pub fn forget_idle(&self) {
        for limiter in [&self.login, &self.register].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}
