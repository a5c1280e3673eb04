//! Quotas per principal and the live usage they are checked against.
//!
//! Over quota a client is slowed or told when to retry, never disconnected:
//! publishes wait for their token bucket (the stream stops being read, so
//! QUIC flow control holds the producer back), and a connection,
//! subscription or queue prefetch over its quota is refused with
//! `limit_exceeded` and `retry_after_ms`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::protocol::{ErrorCode, WireError};

/// Limits on one principal, summed over all its connections. `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Records published per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_msgs_per_s: Option<u64>,
    /// Record bytes published per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_bytes_per_s: Option<u64>,
    /// Open connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// Open subscriptions (stream, queue and feed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<u32>,
    /// Queue deliveries held unacknowledged at once (the sum of the
    /// principal's queue prefetch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_in_flight: Option<u32>,
}

impl Quotas {
    /// The quota names, as `--quota NAME=VALUE` takes them.
    pub const NAMES: [&str; 5] = [
        "publish_msgs_per_s",
        "publish_bytes_per_s",
        "connections",
        "subscriptions",
        "queue_in_flight",
    ];

    /// True if publishing is rate limited at all.
    pub fn limits_publish(&self) -> bool {
        self.publish_msgs_per_s.is_some() || self.publish_bytes_per_s.is_some()
    }

    /// These quotas, with `defaults` where none is set.
    pub fn or(self, defaults: Quotas) -> Quotas {
        Quotas {
            publish_msgs_per_s: self.publish_msgs_per_s.or(defaults.publish_msgs_per_s),
            publish_bytes_per_s: self.publish_bytes_per_s.or(defaults.publish_bytes_per_s),
            connections: self.connections.or(defaults.connections),
            subscriptions: self.subscriptions.or(defaults.subscriptions),
            queue_in_flight: self.queue_in_flight.or(defaults.queue_in_flight),
        }
    }

    /// Sets one quota by name; `none` (or 0) removes it.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let v: Option<u64> =
            match value {
                "none" | "0" => None,
                v => Some(v.parse().map_err(|_| {
                    format!("quota {name}: '{v}' is not a whole number (or 'none')")
                })?),
            };
        let small = |v: Option<u64>| -> Result<Option<u32>, String> {
            v.map(|v| u32::try_from(v).map_err(|_| format!("quota {name}: {v} is too large")))
                .transpose()
        };
        match name {
            "publish_msgs_per_s" => self.publish_msgs_per_s = v,
            "publish_bytes_per_s" => self.publish_bytes_per_s = v,
            "connections" => self.connections = small(v)?,
            "subscriptions" => self.subscriptions = small(v)?,
            "queue_in_flight" => self.queue_in_flight = small(v)?,
            other => {
                return Err(format!(
                    "unknown quota '{other}' (quotas: {})",
                    Quotas::NAMES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// What one principal uses now, across all its connections.
#[derive(Debug, Default)]
pub struct Usage {
    connections: AtomicU32,
    subscriptions: AtomicU32,
    in_flight: AtomicU32,
    bucket: Mutex<Option<Bucket>>,
    /// Publish batches that had to wait for the rate quota.
    pub throttled: AtomicU64,
    /// Connections, subscriptions and prefetch refused by a quota.
    pub refused: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    msgs: f64,
    bytes: f64,
    at: Instant,
}

/// Which counter a [`Held`] gives back when dropped.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Connections,
    Subscriptions,
    InFlight,
}

/// A share of a counted quota (a connection, a subscription, prefetch),
/// given back when dropped.
#[derive(Debug)]
pub struct Held {
    usage: Arc<Usage>,
    counter: Counter,
    n: u32,
}

impl Held {
    /// How much is held (for prefetch: the deliveries granted).
    pub fn amount(&self) -> u32 {
        self.n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.usage
            .counter(self.counter)
            .fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// How long a client refused by a counted quota should wait before retrying.
const RETRY_AFTER_MS: u64 = 1_000;

impl Usage {
    fn counter(&self, c: Counter) -> &AtomicU32 {
        match c {
            Counter::Connections => &self.connections,
            Counter::Subscriptions => &self.subscriptions,
            Counter::InFlight => &self.in_flight,
        }
    }

    /// How long a publish of `msgs` records and `bytes` bytes must wait to
    /// stay within the rate quotas (`None`: no wait). Takes the budget
    /// either way: a batch larger than a second's budget goes through after
    /// waiting for it, so nothing is ever refused for size.
    pub fn publish_delay(&self, q: &Quotas, msgs: u64, bytes: u64) -> Option<Duration> {
        if !q.limits_publish() {
            return None;
        }
        let now = Instant::now();
        let mut b = self.bucket.lock().expect("bucket lock");
        let b = b.get_or_insert_with(|| Bucket {
            msgs: q.publish_msgs_per_s.unwrap_or(0) as f64,
            bytes: q.publish_bytes_per_s.unwrap_or(0) as f64,
            at: now,
        });
        let dt = now.duration_since(b.at).as_secs_f64();
        b.at = now;
        let mut wait: f64 = 0.0;
        // Each bucket holds at most one second's budget: the largest burst.
        let mut take = |tokens: &mut f64, rate: Option<u64>, n: u64| {
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let rate = rate as f64;
                *tokens = (*tokens + dt * rate).min(rate) - n as f64;
                if *tokens < 0.0 {
                    wait = wait.max(-*tokens / rate);
                }
            }
        };
        take(&mut b.msgs, q.publish_msgs_per_s, msgs);
        take(&mut b.bytes, q.publish_bytes_per_s, bytes);
        if wait > 0.0 {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            Some(Duration::from_secs_f64(wait))
        } else {
            None
        }
    }

    fn take(
        self: &Arc<Self>,
        counter: Counter,
        limit: Option<u32>,
        want: u32,
        what: &str,
        principal: &str,
    ) -> Result<Held, WireError> {
        let c = self.counter(counter);
        let got = match limit {
            None => {
                c.fetch_add(want, Ordering::Relaxed);
                want
            }
            Some(limit) => {
                let mut cur = c.load(Ordering::Relaxed);
                loop {
                    let n = want.min(limit.saturating_sub(cur));
                    if n == 0 {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(WireError::new(
                            ErrorCode::LimitExceeded,
                            format!(
                                "principal '{principal}' is at its quota of {limit} {what}; \
                                 close one or ask for a higher quota; retry_after_ms={RETRY_AFTER_MS}"
                            ),
                        ));
                    }
                    match c.compare_exchange_weak(
                        cur,
                        cur + n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break n,
                        Err(now) => cur = now,
                    }
                }
            }
        };
        Ok(Held {
            usage: self.clone(),
            counter,
            n: got,
        })
    }

    /// Counts a new connection against the quota.
    pub fn connect(self: &Arc<Self>, q: &Quotas, principal: &str) -> Result<Held, WireError> {
        self.take(
            Counter::Connections,
            q.connections,
            1,
            "connections",
            principal,
        )
    }

    /// Counts a new subscription against the quota.
    pub fn subscribe(self: &Arc<Self>, q: &Quotas, principal: &str) -> Result<Held, WireError> {
        self.take(
            Counter::Subscriptions,
            q.subscriptions,
            1,
            "subscriptions",
            principal,
        )
    }

    /// Reserves up to `want` queue deliveries in flight; the prefetch a
    /// queue subscription gets is what [`Held::amount`] says.
    pub fn prefetch(
        self: &Arc<Self>,
        q: &Quotas,
        want: u32,
        principal: &str,
    ) -> Result<Held, WireError> {
        self.take(
            Counter::InFlight,
            q.queue_in_flight,
            want.max(1),
            "queue deliveries in flight",
            principal,
        )
    }

    /// Open connections, subscriptions and reserved prefetch, for `whoami`.
    pub fn snapshot(&self) -> (u32, u32, u32) {
        (
            self.connections.load(Ordering::Relaxed),
            self.subscriptions.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_quotas_refuse_with_retry_after_and_free_on_drop() {
        let u = Arc::new(Usage::default());
        let q = Quotas {
            connections: Some(2),
            queue_in_flight: Some(10),
            ..Quotas::default()
        };
        let a = u.connect(&q, "p").unwrap();
        let _b = u.connect(&q, "p").unwrap();
        let e = u.connect(&q, "p").unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitExceeded);
        assert!(e.message.contains("retry_after_ms="), "{}", e.message);
        drop(a);
        assert!(u.connect(&q, "p").is_ok());
        // Prefetch is clamped to what is left, then refused.
        let p1 = u.prefetch(&q, 8, "p").unwrap();
        let p2 = u.prefetch(&q, 8, "p").unwrap();
        assert_eq!((p1.amount(), p2.amount()), (8, 2));
        assert!(u.prefetch(&q, 1, "p").is_err());
        assert_eq!(u.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn publish_rate_allows_a_second_of_burst_then_asks_to_wait() {
        let u = Usage::default();
        let q = Quotas {
            publish_msgs_per_s: Some(1_000),
            ..Quotas::default()
        };
        assert_eq!(u.publish_delay(&q, 1_000, 0), None);
        let wait = u.publish_delay(&q, 500, 0).expect("over the rate");
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert_eq!(u.publish_delay(&Quotas::default(), 1 << 40, 1 << 40), None);
    }

    #[test]
    fn quotas_set_by_name() {
        let mut q = Quotas::default();
        q.set("publish_msgs_per_s", "5000").unwrap();
        q.set("connections", "4").unwrap();
        assert_eq!(q.publish_msgs_per_s, Some(5000));
        q.set("connections", "none").unwrap();
        assert_eq!(q.connections, None);
        assert!(q.set("bogus", "1").is_err());
        assert!(q.set("connections", "x").is_err());
    }
}
