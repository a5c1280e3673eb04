//! Headers the router reads: priority, delay, time to live and message id.
//!
//! These are ordinary record headers, so every client library can set them
//! and they are stored with the record: a delay, a priority or an id
//! survives a restart because the record does.

use super::error::{ErrorCode, WireError};
use super::record::for_each_header;

/// Priority 0 (lowest) to 9 (highest), as ASCII digits.
pub const PRIORITY: &str = "priority";
/// Delay in milliseconds from the append time before queue delivery.
pub const DELAY_MS: &str = "x-delay-ms";
/// Earliest queue delivery time, ms since the Unix epoch.
pub const DELIVER_AT: &str = "x-deliver-at";
/// Time to live in milliseconds from the append time.
pub const TTL_MS: &str = "x-ttl-ms";
/// Producer-chosen id; a second record with the same id within the topic's
/// dedup window is not stored again.
pub const MESSAGE_ID: &str = "x-message-id";
/// Longest message id accepted.
pub const MAX_MESSAGE_ID: usize = 256;

/// What the router-read headers of one record say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy<'a> {
    /// From [`PRIORITY`].
    pub priority: Option<u8>,
    /// From [`DELAY_MS`].
    pub delay_ms: Option<u64>,
    /// From [`DELIVER_AT`].
    pub deliver_at: Option<u64>,
    /// From [`TTL_MS`].
    pub ttl_ms: Option<u64>,
    /// From [`MESSAGE_ID`].
    pub message_id: Option<&'a [u8]>,
}

fn number<T: std::str::FromStr>(v: &[u8]) -> Option<T> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

impl<'a> Policy<'a> {
    /// Reads the headers of an encoded record, checking their values.
    pub fn parse(record: &'a [u8]) -> Result<Self, WireError> {
        Policy::read(record, true)
    }

    /// Like [`Policy::parse`] for stored records: a malformed value (say,
    /// one a route plugin added) is ignored, the other headers still count.
    pub fn parse_stored(record: &'a [u8]) -> Self {
        Policy::read(record, false).unwrap_or_default()
    }

    fn read(record: &'a [u8], strict: bool) -> Result<Self, WireError> {
        let mut p = Policy::default();
        let mut err = None;
        for_each_header(record, |name, v| {
            if err.is_some() || !(name == PRIORITY || name.starts_with("x-")) {
                return;
            }
            let bad = |code, what: &str| {
                if !strict {
                    return None;
                }
                Some(WireError::new(
                    code,
                    format!(
                        "header {name}: {what}, got '{}'",
                        String::from_utf8_lossy(&v[..v.len().min(40)])
                    ),
                ))
            };
            match name {
                PRIORITY => match number::<u8>(v) {
                    Some(n) if n <= 9 => p.priority = Some(n),
                    _ => err = bad(ErrorCode::InvalidPriority, "priority must be 0 to 9"),
                },
                DELAY_MS => match number(v) {
                    Some(n) => p.delay_ms = Some(n),
                    None => err = bad(ErrorCode::InvalidDelay, "expected milliseconds"),
                },
                DELIVER_AT => match number(v) {
                    Some(n) => p.deliver_at = Some(n),
                    None => err = bad(ErrorCode::InvalidDelay, "expected ms since the epoch"),
                },
                TTL_MS => match number(v) {
                    Some(n) => p.ttl_ms = Some(n),
                    None => err = bad(ErrorCode::InvalidArgument, "expected milliseconds"),
                },
                MESSAGE_ID => {
                    if v.is_empty() || v.len() > MAX_MESSAGE_ID {
                        err = bad(ErrorCode::InvalidArgument, "id must be 1 to 256 bytes");
                    } else {
                        p.message_id = Some(v);
                    }
                }
                _ => {}
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(p),
        }
    }

    /// When a queue may first deliver the record appended at `ts`.
    pub fn visible_at(&self, ts: u64) -> u64 {
        let by_delay = self.delay_ms.map_or(ts, |d| ts.saturating_add(d));
        by_delay.max(self.deliver_at.unwrap_or(0))
    }

    /// True if any header asks for a delivery time after `ts`.
    pub fn is_delayed(&self, ts: u64) -> bool {
        self.visible_at(ts) > ts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    #[test]
    fn reads_and_checks_policy_headers() {
        let r = Record::new("x")
            .with_header(PRIORITY, "7")
            .with_header(DELAY_MS, "1500")
            .with_header(TTL_MS, "60000")
            .with_header(MESSAGE_ID, "order-1")
            .to_raw();
        let p = Policy::parse(r.as_bytes()).unwrap();
        assert_eq!(p.priority, Some(7));
        assert_eq!(p.visible_at(1000), 2500);
        assert_eq!(p.ttl_ms, Some(60000));
        assert_eq!(p.message_id, Some(&b"order-1"[..]));

        let bad = Record::new("x").with_header(PRIORITY, "10").to_raw();
        let e = Policy::parse(bad.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPriority);
        let bad = Record::new("x").with_header(DELAY_MS, "soon").to_raw();
        assert_eq!(
            Policy::parse(bad.as_bytes()).unwrap_err().code,
            ErrorCode::InvalidDelay
        );
        let plain = Record::new("x").with_header("other", "1").to_raw();
        assert_eq!(Policy::parse(plain.as_bytes()).unwrap(), Policy::default());
    }
}
