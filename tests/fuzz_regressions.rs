//! Every input kept in `fuzz/regressions/<target>/` (crashes the fuzzers
//! found, and inputs written by hand for bugs found otherwise) replayed
//! through the same entry points as the fuzz targets, in the normal suite.

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name() != ".keep")
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read(e.path()).unwrap())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn replay(target: &str, f: impl Fn(&[u8])) {
    for (name, data) in inputs(target) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&data)));
        assert!(r.is_ok(), "fuzz/regressions/{target}/{name} fails again");
    }
}

#[test]
fn frame_regressions() {
    replay("frame", switchyard::fuzzing::frames);
}

#[test]
fn record_regressions() {
    replay("record", switchyard::fuzzing::record);
}

#[test]
fn journal_regressions() {
    replay("journal", switchyard::fuzzing::journal);
}

#[test]
fn admin_regressions() {
    replay("admin", switchyard::fuzzing::admin);
}

#[test]
fn route_headers_regressions() {
    replay("route_headers", |data| {
        let u = Unstructured::new(data);
        if let Ok((rec, add)) = <(Vec<u8>, Vec<(String, Vec<u8>)>)>::arbitrary_take_rest(u) {
            switchyard::fuzzing::route_headers(&rec, add);
        }
    });
}

/// A route plugin that adds a header whose name is longer than the record
/// format's 16-bit length: refused as an invalid decision. Before, the
/// length was truncated and the stored record could not be parsed.
#[test]
fn a_decision_adding_an_oversized_header_is_refused_not_stored_corrupt() {
    let rec = switchyard::protocol::Record::new("x").to_raw();
    let add = vec![("h".repeat(70_000), b"v".to_vec())];
    switchyard::fuzzing::route_headers(rec.as_bytes(), add.clone());
    let e = switchyard::broker::with_headers(&rec, add).unwrap_err();
    assert!(e.contains("header name length"), "{e}");
}
