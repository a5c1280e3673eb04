//! Entry points of the fuzz targets in `fuzz/` and of their regression
//! tests (`tests/fuzz_regressions.rs`): each takes arbitrary bytes, runs
//! one decoder or validator the way the router does, and panics only if
//! that code has a bug (a panic inside it, or a result that breaks its own
//! invariant). Not part of the stable API.

use bytes::{Bytes, BytesMut};

use crate::protocol::{RawRecord, decode};

/// Decodes frames from `data` as a connection's reader does; every frame
/// that decodes must encode back to bytes that decode to the same frame.
pub fn frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = decode(&mut buf, 1 << 20) {
        let again = decode(&mut BytesMut::from(&f.to_bytes()[..]), 1 << 20);
        assert_eq!(again.ok().flatten().as_ref(), Some(&f), "frame round trip");
    }
}

/// Validates `data` as a stored or published record, reads every part of
/// it, and checks that decoding and encoding again gives the same bytes.
pub fn record(data: &[u8]) {
    let _ = crate::protocol::headers::Policy::parse(data);
    let _ = crate::protocol::headers::Policy::parse_stored(data);
    let Ok(raw) = RawRecord::new(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = raw.key();
    let _ = raw.headers().count();
    let _ = raw.payload();
    let rec = raw.to_record();
    rec.check().expect("a record that decoded encodes");
    assert_eq!(rec.to_raw().as_bytes(), raw.as_bytes(), "record round trip");
}

/// Recovers a journal from arbitrary bytes: scans its chain and replays
/// every entry into an empty in-memory database. Damage must be an error,
/// never a panic; a log value must verify or fail, never panic.
pub fn journal(data: &[u8]) {
    crate::storage::fuzz_journal(data);
}

/// Parses admin request bodies as the control stream does: a deploy, a
/// topic policy (and its validation), grants.
pub fn admin(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<crate::plugins::DeployRequest>(data) {
        let _ = crate::broker::validate_topic_name(&req.topic);
    }
    if let Ok(p) = serde_json::from_slice::<crate::storage::TopicPolicy>(data) {
        let _ = p.validate();
        let _ = p.backoff_ms(u32::MAX);
        let _ = p.backoff_ms(0);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        for g in s.split(',') {
            let _ = crate::auth::Grant::parse(g);
        }
        let _ = crate::broker::validate_topic_name(s);
    }
}

/// Applies a route decision's added headers to a record as the host does:
/// either the decision is refused, or the stored record decodes and holds
/// every header it had and every header added, in order.
pub fn route_headers(record: &[u8], add: Vec<(String, Vec<u8>)>) {
    let Ok(raw) = RawRecord::new(Bytes::copy_from_slice(record)) else {
        return;
    };
    let before = raw.headers().count();
    let Ok(out) = crate::broker::with_headers(&raw, add.clone()) else {
        return;
    };
    let stored =
        RawRecord::new(out.as_bytes().clone()).expect("an accepted decision stores a valid record");
    assert_eq!(stored.payload(), raw.payload());
    assert_eq!(stored.key(), raw.key());
    let headers: Vec<(String, Bytes)> = stored.headers().map(|(n, v)| (n.to_string(), v)).collect();
    assert_eq!(headers.len(), before + add.len());
    for ((n, v), (m, w)) in headers[before..].iter().zip(&add) {
        assert_eq!((n, &v[..]), (m, &w[..]));
    }
}
