#!/usr/bin/env bash
# tidegate-client against a bare hyper-util client, same loopback server,
# one run. A third row is the bare client sending the headers tidegate-client
# adds (correlation ID, traceparent, deadline, user agent), so the cost of
# their bytes shows apart from the client's own work. Rounds rotate the
# three so that machine noise hits all alike; prints median requests/s and
# the median per-round ratios (with ~95 % intervals: more rounds, narrower),
# for one call at a time and for 32 calls in flight. Target: ratio >= 0.95.
#
#   ./scripts/bench-client.sh
#   ROUNDS=25 ./scripts/bench-client.sh
#   ROUNDS=100 ./scripts/bench-client.sh   # ~6 min, intervals ~±0.5 %
#   IN_FLIGHT=128 ./scripts/bench-client.sh # another concurrency (default 32)
#   NO_TIMEOUT=1 NO_DEADLINE=1 ./scripts/bench-client.sh # without the timer
set -euo pipefail
cd "$(dirname "$0")/.."
RATIO=1 ROUNDS=${ROUNDS:-15} IN_FLIGHT=${IN_FLIGHT:-32} cargo bench -p tidegate-client --bench client 2>/dev/null
