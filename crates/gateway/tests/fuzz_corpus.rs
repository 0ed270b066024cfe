//! Every fuzz target's corpus (`fuzz/corpus/<target>/`) run through the
//! target's own check as a plain test, so what the fuzzer found stays fixed.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(unreachable_pub, dead_code)]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn run(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "{target}: only {} corpus files",
        files.len()
    );
    for file in files {
        let data = std::fs::read(&file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            panic!("{target}: {} fails its check", file.display());
        }
    }
}

#[test]
fn config_parser() {
    run("config_parser", checks::config_parser);
}

#[test]
fn header_sanitizing() {
    run("header_sanitizing", checks::header_sanitizing);
}

#[test]
fn path_normalization() {
    run("path_normalization", checks::path_normalization);
}

#[test]
fn correlation_id() {
    run("correlation_id", checks::correlation_id);
}

#[test]
fn rate_limit_key() {
    run("rate_limit_key", checks::rate_limit_key);
}

#[test]
fn upstream_response() {
    run("upstream_response", checks::upstream_response);
}

#[test]
fn client_requests() {
    run("client_requests", checks::client_requests);
}
