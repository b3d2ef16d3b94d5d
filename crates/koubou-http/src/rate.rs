//! The optional per-client rate limit (`limits.rate_limit_per_sec`, `limits.rate_limit_burst`):
//! a token bucket per client IP, shared by every port.
//!
//! A client is its IP address as the socket sees it (IPv6 by its /64, which one host usually
//! owns whole); `X-Forwarded-For` is not trusted, so behind a proxy every client is the proxy.
//! Buckets that have refilled are the same as no bucket, so the map is pruned of them when it
//! grows; it never holds more than [`MAX_CLIENTS`] clients (past that, with every bucket still
//! draining, it starts afresh rather than grow without bound).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::StatusCode;

use crate::error::Refusal;

/// Most clients tracked at once.
pub const MAX_CLIENTS: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by client.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    burst: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The key of a client: its IPv4 address, or its IPv6 /64.
fn client(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl RateLimiter {
    /// `per_sec` requests a second on average, `burst` at once; `None` when `per_sec` is 0 (off).
    pub fn new(per_sec: u32, burst: u32) -> Option<RateLimiter> {
        (per_sec > 0).then(|| RateLimiter { per_sec, burst: burst.max(1), buckets: Mutex::new(HashMap::new()) })
    }

    /// Takes one token for `ip` at `now`, or says how long until there is one.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (f64::from(self.per_sec), f64::from(self.burst));
        let refill = |b: &Bucket| (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_CLIENTS {
            map.retain(|_, b| refill(b) < burst);
            if map.len() >= MAX_CLIENTS {
                map.clear();
            }
        }
        let b = map.entry(client(ip)).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = refill(b);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    /// [`RateLimiter::take`] now, as the 429 the guard answers with when there is no token.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.take(ip, Instant::now()).map_err(|wait| {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let message = format!(
                "more than {} requests a second from {} (limits.rate_limit_per_sec, bursts of \
                 limits.rate_limit_burst = {}); retry in {secs} s",
                self.per_sec,
                client(ip),
                self.burst
            );
            Refusal {
                retry_after_secs: Some(secs),
                ..Refusal::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "limits.rate_limit_per_sec", message)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let r = RateLimiter::new(2, 3).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            r.take(ip, t0).unwrap();
        }
        let wait = r.take(ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another client has its own bucket.
        r.take("10.0.0.2".parse().unwrap(), t0).unwrap();
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        r.take(ip, t1).unwrap();
        assert!(r.take(ip, t1).is_err());
        // Long idle refills to the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            r.take(ip, t2).unwrap();
        }
        assert!(r.take(ip, t2).is_err());
        assert!(RateLimiter::new(0, 10).is_none());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let r = RateLimiter::new(1, 1).unwrap();
        let t = Instant::now();
        r.take("2001:db8::1".parse().unwrap(), t).unwrap();
        assert!(r.take("2001:db8::ffff:2".parse().unwrap(), t).is_err());
        r.take("2001:db8:0:1::1".parse().unwrap(), t).unwrap();
        r.take("127.0.0.1".parse().unwrap(), t).unwrap();
        assert!(r.take("::ffff:127.0.0.1".parse().unwrap(), t).is_err());
    }

    #[test]
    fn the_429_names_the_limit_and_says_when() {
        let r = RateLimiter::new(1, 1).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        r.check(ip).unwrap();
        let resp = axum::response::IntoResponse::into_response(r.check(ip).unwrap_err());
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[axum::http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn full_buckets_are_pruned() {
        let r = RateLimiter::new(1000, 1).unwrap();
        let t = Instant::now();
        for i in 0..MAX_CLIENTS as u32 {
            r.take(IpAddr::from(i.to_be_bytes()), t).unwrap();
        }
        r.take("10.0.0.1".parse().unwrap(), t + Duration::from_secs(1)).unwrap();
        assert_eq!(r.buckets.lock().unwrap().len(), 1);
    }
}
