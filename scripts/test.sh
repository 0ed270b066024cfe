#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy with warnings as errors, and
# all tests (unit, integration, property, concurrency, allocation, doc).
# It installs what the tests need; today that is only the Rust toolchain
# (cargo-nextest is used when present). Later suites add their packages here.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --lib --bins --tests --no-fail-fast
fi

step "doc tests"
cargo test --workspace --doc

step "demo runs"
cargo run --quiet -- demo --quick >/dev/null

printf '\nall checks passed\n'
