//! Exponential backoff with jitter, then dead letter.
//!
//! Configuration:
//! - `base-ms` (default 1000) doubling per attempt up to `max-ms` (default 300000);
//! - `jitter`: fraction of the delay added or removed (default 0.2). There
//!   is no random source in the sandbox, so the jitter is derived from the
//!   message key and attempt: stable for a message, spread across messages;
//! - `max-attempts` (default 5): dead-letter after this many attempts;
//! - `non-retryable`: comma-separated failure codes that dead-letter at once.

use switchyard_plugin::prelude::*;

fn spread(m: &Message, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in m
        .key()
        .unwrap_or_default()
        .iter()
        .chain(attempt.to_le_bytes().iter())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % 10_000) as f64 / 10_000.0 * 2.0 - 1.0 // in [-1, 1)
}

/// The retry hook.
pub fn on_failure(m: &Message, f: &Failure) -> RetryDecision {
    let attempt = m.attempt().max(1);
    let max_attempts = host::config_or("max-attempts", 5u32);
    let fatal = host::config("non-retryable").unwrap_or_default();
    if !f.retryable
        || fatal
            .split(',')
            .any(|c| !c.trim().is_empty() && c.trim() == f.code)
    {
        return RetryDecision::dead_letter(format!(
            "non-retryable failure {}: {}",
            f.code, f.message
        ));
    }
    if attempt >= max_attempts {
        return RetryDecision::dead_letter(format!(
            "gave up after {attempt} attempts: {}",
            f.message
        ));
    }
    let base = host::config_or("base-ms", 1000u64) as f64;
    let max = host::config_or("max-ms", 300_000u64) as f64;
    let jitter = host::config_or("jitter", 0.2f64).clamp(0.0, 1.0);
    let delay = (base * 2f64.powi(attempt as i32 - 1)).min(max);
    let delay = (delay * (1.0 + jitter * spread(m, attempt))).max(0.0);
    RetryDecision::RetryAfterMs(delay as u64)
}

switchyard_plugin::export_retry!(on_failure);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin::testing;

    fn fail(code: &str, retryable: bool) -> Failure {
        Failure {
            code: code.into(),
            message: "boom".into(),
            retryable,
        }
    }

    fn delay(attempt: u32) -> u64 {
        match on_failure(
            &TestMessage::new("").key("k").attempt(attempt).as_message(),
            &fail("e", true),
        ) {
            RetryDecision::RetryAfterMs(ms) => ms,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn delays_double_within_the_jitter_band() {
        testing::reset();
        testing::set_config("max-attempts", "10");
        for attempt in 1..6u32 {
            let nominal = 1000.0 * 2f64.powi(attempt as i32 - 1);
            let d = delay(attempt) as f64;
            assert!(
                d >= nominal * 0.8 && d <= nominal * 1.2,
                "attempt {attempt}: {d}"
            );
        }
    }

    #[test]
    fn delays_are_capped() {
        testing::reset();
        testing::set_config("max-attempts", "100");
        testing::set_config("jitter", "0");
        assert_eq!(delay(30), 300_000);
    }

    #[test]
    fn dead_letters_after_max_attempts_or_fatal_codes() {
        testing::reset();
        let m = TestMessage::new("").attempt(5);
        assert!(matches!(
            on_failure(&m.as_message(), &fail("e", true)),
            RetryDecision::DeadLetter(_)
        ));
        let m = TestMessage::new("").attempt(1);
        assert!(matches!(
            on_failure(&m.as_message(), &fail("e", false)),
            RetryDecision::DeadLetter(_)
        ));
        testing::set_config("non-retryable", "bad-input, auth");
        assert!(matches!(
            on_failure(&m.as_message(), &fail("auth", true)),
            RetryDecision::DeadLetter(_)
        ));
        assert!(matches!(
            on_failure(&m.as_message(), &fail("timeout", true)),
            RetryDecision::RetryAfterMs(_)
        ));
    }
}
