#!/usr/bin/env bash
# The chaos soak, long form: fixed-rate GET/POST load through the gateway
# (release build) to three endpoints while one is killed and restarted every
# 6 s, one hangs for a second and one answers a burst of 503s. Prints
# requests sent, answered by status, unanswered, late answers, POSTs
# delivered twice, GETs delivered beyond their attempts, and the time from
# an endpoint's return to its first traffic; fails if any promise broke.
#
#   scripts/chaos.sh [SECONDS]     # default 300
#
# ./scripts/test.sh runs the same soak for 30 s (debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-300}"
TIDEGATE_CHAOS_SECONDS="$seconds" cargo test --release -p tidegate-gateway --test chaos -- --nocapture
