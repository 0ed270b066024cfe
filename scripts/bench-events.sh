#!/usr/bin/env bash
# The event store's speed on this machine: appends/s with 1 and 64
# publishers (1 KiB events, every commit synced), append latency,
# publish-to-delivery latency, deliveries/s, beside one synced SQLite
# transaction per append measured in the same run.
#
#   ./scripts/bench-events.sh               # 20 000 events a phase
#   EVENTS=50000 ./scripts/bench-events.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p tidegate-events --bench events
