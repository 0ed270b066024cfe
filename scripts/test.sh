#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy with warnings as errors,
# all tests (unit, integration, property, concurrency, allocation, doc),
# and rustdoc with warnings as errors.
# It installs what the tests need: redis-server and nats-server (Debian's
# packages; the tests start their own servers on free ports, never a
# shared one),
# Debian's chromium and playwright-core (npm, pinned in
# tests/browser/package-lock.json) for the dashboard's browser test,
# python3 for the Python examples of the events API, curl as a TLS client,
# ca-certificates for the system roots https webhooks are checked against.
# cargo-nextest is used when present.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installs Debian packages that provide the given commands, when missing.
need() {
    local missing=()
    local pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need redis-server:redis-server redis-cli:redis-tools nats-server:nats-server chromium:chromium ss:iproute2 python3:python3 curl:curl update-ca-certificates:ca-certificates
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "the browser test needs Node.js 20 or later with npm" >&2
    exit 1
fi

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

step "cargo doc (-D warnings: broken and private links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "tidegate-resilience with its optional TSC clock (feature quanta)"
cargo clippy -p tidegate-resilience --all-targets --features quanta -- -D warnings
cargo test -p tidegate-resilience --features quanta --lib

step "demo runs"
cargo run --quiet -- demo --quick >/dev/null

step "the Python examples (publisher, push subscriber, pull worker) against tidegate serve"
cargo build --quiet --bin tidegate
python3 examples/python/run_examples.py target/debug/tidegate

step "browser test: the dashboard in headless Chromium"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
cargo build --quiet --bin tidegate
TIDEGATE_BIN="$PWD/target/debug/tidegate" node tests/browser/dashboard.mjs

printf '\nall checks passed\n'
