#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a
# figure the shared VM's noise does not move (time does, by ±20 %), for
# comparing two builds of the request path. It runs the same config as
# bench-proxy.sh's `tidegate` target (retry, breaker, bulkhead, one
# worker) in front of an nginx upstream, lets wrk (10 connections) warm
# it up, zeroes the counts, measures SECONDS of wrk and divides.
#
#   ./scripts/bench-instructions.sh            # the release build of HEAD
#   ./scripts/bench-instructions.sh path/to/tidegate
#   TIDEGATE_LOG=info ./scripts/bench-instructions.sh   # with the access log on
#
# Installs nginx, wrk, valgrind and python3 from Debian when missing (root).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_MEASURED=${SECONDS_MEASURED:-4}

. scripts/bench-common.sh
need_tools nginx wrk valgrind python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ $# -ge 1 ]; then
    TIDEGATE=$1
else
    cargo build --release --quiet -p tidegate
    TIDEGATE=target/release/tidegate
fi

UPSTREAM_PORT=$(free_port)
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)

cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/body;
    proxy_temp_path $WORK/proxy;
    fastcgi_temp_path $WORK/fastcgi;
    uwsgi_temp_path $WORK/uwsgi;
    scgi_temp_path $WORK/scgi;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { default_type text/plain; return 200 "hello from the upstream\n"; }
    }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -e "$WORK/error.log" &
PIDS+=($!)

tidegate_config "$PROXY_PORT" "$ADMIN_PORT" "$UPSTREAM_PORT" >"$WORK/tidegate.toml"

TIDEGATE_LOG=${TIDEGATE_LOG:-warn} valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.%p" \
    "$TIDEGATE" serve --config "$WORK/tidegate.toml" --workers 1 2>"$WORK/valgrind.log" &
VALGRIND=$!
PIDS+=("$VALGRIND")
wait_port "$UPSTREAM_PORT"
wait_port "$PROXY_PORT"

URL="http://127.0.0.1:$PROXY_PORT/"
wrk -t1 -c10 -d2s "$URL" >/dev/null
callgrind_control --zero "$VALGRIND" >/dev/null 2>&1
wrk -t1 -c10 -d"${SECONDS_MEASURED}s" "$URL" >"$WORK/wrk.out"
callgrind_control --dump "$VALGRIND" >/dev/null 2>&1
requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.out")
# The dump after the zeroing is the only file with a part number.
for _ in $(seq 1 50); do
    dump=$(ls "$WORK"/callgrind.*.* 2>/dev/null | head -1 || true)
    [ -n "$dump" ] && grep -q '^totals:\|^summary:' "$dump" && break
    sleep 0.1
done
instructions=$(awk '/^(totals|summary):/ { print $2; exit }' "$dump")
echo "$requests requests, $((instructions / requests)) user-space instructions per request ($TIDEGATE)"
mkdir -p target
cp "$dump" target/bench-instructions.callgrind
echo "per function: callgrind_annotate --inclusive=yes target/bench-instructions.callgrind"
