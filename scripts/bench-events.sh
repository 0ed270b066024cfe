#!/usr/bin/env bash
# The events half's speed on this machine.
#  1. The store (crates/events/benches/events.rs): appends/s with 1 and 64
#     publishers (1 KiB events, every commit synced), append latency,
#     publish-to-delivery latency, deliveries/s, beside one synced SQLite
#     transaction per append measured in the same run.
#  2. The gateway end to end (crates/tidegate/benches/events_e2e.rs), with
#     `tidegate serve` as its own process: events published over HTTP per
#     second (64 connections) and the gateway's CPU per event; publish to
#     push delivery at a steady 1 000 events/s; the gateway's RSS.
#  3. Both stores side by side (crates/nats/benches/stores.rs): appends/s
#     with 64 publishers and delivery p99 on SQLite and on NATS JetStream
#     (a private nats-server), and the ratio.
#
#   ./scripts/bench-events.sh                    # 20 000 events a store phase
#   EVENTS=100000 ./scripts/bench-events.sh
#   RATE=1000 SECONDS_RATE=10 SECONDS_LOAD=5 ./scripts/bench-events.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p tidegate-events --bench events
cargo bench -p tidegate --bench events_e2e
cargo bench -p tidegate-nats --bench stores
