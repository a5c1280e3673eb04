//! Delivers only messages whose JSON payload matches a rule on one field.
//!
//! Configuration:
//! - `field`: dotted path into the payload object (`order.status`);
//! - one rule: `equals=VALUE`, `one-of=A,B,C`, `min=N` and/or `max=N`
//!   (numbers), or `exists=true`;
//! - `on-missing`: `skip` (default) or `deliver` for messages without the
//!   field or whose payload is not JSON.

use switchyard_plugin::prelude::*;

fn lookup<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, part| v.get(part))
}

fn as_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The filter hook.
pub fn filter(_sub: &Subscriber, m: &Message) -> bool {
    let field = host::config("field").unwrap_or_default();
    let deliver_missing = host::config("on-missing").as_deref() == Some("deliver");
    let payload = m.payload();
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&payload) else {
        return deliver_missing;
    };
    let Some(value) = lookup(&doc, &field) else {
        return deliver_missing;
    };
    if let Some(expected) = host::config("equals") {
        return as_text(value) == expected;
    }
    if let Some(list) = host::config("one-of") {
        let text = as_text(value);
        return list.split(',').any(|c| c.trim() == text);
    }
    let min = host::config("min").and_then(|s| s.parse::<f64>().ok());
    let max = host::config("max").and_then(|s| s.parse::<f64>().ok());
    if min.is_some() || max.is_some() {
        let Some(n) = value.as_f64() else {
            return false;
        };
        return min.is_none_or(|lo| n >= lo) && max.is_none_or(|hi| n <= hi);
    }
    true // `exists`, or no rule: the field is present
}

/// Deploy-time check: a rule is configured.
fn self_test() -> Result<(), String> {
    if host::config("field").is_none() {
        return Err(
            "set --config field=PATH and a rule (equals, one-of, min, max or exists)".into(),
        );
    }
    Ok(())
}

switchyard_plugin::export_filter!(filter, self_test = self_test);

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_plugin::testing;

    fn sees(payload: &str) -> bool {
        filter(
            &Subscriber::default(),
            &TestMessage::new(payload).as_message(),
        )
    }

    #[test]
    fn equals_matches_strings_and_numbers() {
        testing::reset();
        testing::set_config("field", "order.status");
        testing::set_config("equals", "paid");
        assert!(sees(r#"{"order": {"status": "paid"}}"#));
        assert!(!sees(r#"{"order": {"status": "open"}}"#));
        assert!(!sees(r#"{"order": {}}"#));
        assert!(!sees("not json"));
    }

    #[test]
    fn ranges_and_lists() {
        testing::reset();
        testing::set_config("field", "total");
        testing::set_config("min", "100");
        assert!(sees(r#"{"total": 150}"#));
        assert!(!sees(r#"{"total": 99.5}"#));
        testing::reset();
        testing::set_config("field", "region");
        testing::set_config("one-of", "eu, us");
        assert!(sees(r#"{"region": "us"}"#));
        assert!(!sees(r#"{"region": "apac"}"#));
    }

    #[test]
    fn missing_fields_follow_on_missing() {
        testing::reset();
        testing::set_config("field", "x");
        testing::set_config("equals", "1");
        testing::set_config("on-missing", "deliver");
        assert!(sees("{}"));
        assert!(sees("garbage"));
    }

    #[test]
    fn self_test_requires_a_field() {
        testing::reset();
        assert!(self_test().is_err());
        testing::set_config("field", "x");
        assert_eq!(self_test(), Ok(()));
    }
}
