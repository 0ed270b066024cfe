#!/usr/bin/env bash
# User-space instructions, code lines and locked operations per proxied
# request, counted by callgrind: figures the shared VM's noise does not
# move (time does, by ±20 %), for comparing two builds of the request
# path. The code lines are the 64-byte lines of machine code a request
# runs (scripts/code-lines.py): each costs about 1.3 ns here, as the
# kernel's work between requests evicts them. The locked operations
# (scripts/locked-ops.py) are the atomic read-modify-writes it runs:
# about 5 ns each here. It runs the same config as bench-proxy.sh's
# `tidegate` target (retry, breaker, bulkhead, one worker) in front of an
# nginx upstream, lets wrk (10 connections) warm it up, zeroes the
# counts, measures SECONDS of wrk and divides.
#
#   ./scripts/bench-instructions.sh            # the release build of HEAD
#   ./scripts/bench-instructions.sh path/to/tidegate
#   TIDEGATE_LOG=info ./scripts/bench-instructions.sh   # with the access log on
#   AGAINST_NGINX=1 ./scripts/bench-instructions.sh   # and nginx as the proxy, alike
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

TIDEGATE_LOG=${TIDEGATE_LOG:-warn} valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$WORK/tidegate.%p" \
    "$TIDEGATE" serve --config "$WORK/tidegate.toml" --workers 1 2>"$WORK/valgrind.log" &
VALGRIND=$!
PIDS+=("$VALGRIND")
wait_port "$UPSTREAM_PORT"
wait_port "$PROXY_PORT"

# measure NAME PID PORT BINARY: warms the proxy up, counts SECONDS of wrk,
# prints the figures and keeps the dump as
# target/bench-instructions.NAME.callgrind.
measure() {
    local url="http://127.0.0.1:$3/" requests dump instructions
    wrk -t1 -c10 -d2s "$url" >/dev/null
    callgrind_control --zero "$2" >/dev/null 2>&1
    wrk -t1 -c10 -d"${SECONDS_MEASURED}s" "$url" >"$WORK/wrk.out"
    callgrind_control --dump "$2" >/dev/null 2>&1
    requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.out")
    # The dump after the zeroing is the only file with a part number.
    for _ in $(seq 1 50); do
        dump=$(ls "$WORK/$1".*.* 2>/dev/null | head -1 || true)
        [ -n "$dump" ] && grep -q '^totals:\|^summary:' "$dump" && break
        sleep 0.1
    done
    instructions=$(awk '/^(totals|summary):/ { print $2; exit }' "$dump")
    echo "$1: $requests requests, $((instructions / requests)) user-space instructions per request"
    echo "$1: $(python3 scripts/code-lines.py "$dump" "$requests")"
    echo "$1: $(python3 scripts/locked-ops.py "$dump" "$requests" "$4")"
    mkdir -p target
    cp "$dump" "target/bench-instructions.$1.callgrind"
}

measure tidegate "$VALGRIND" "$PROXY_PORT" "$TIDEGATE"
echo "  ($TIDEGATE; per function: callgrind_annotate --inclusive=yes target/bench-instructions.tidegate.callgrind,"
echo "   scripts/code-lines.py target/bench-instructions.tidegate.callgrind REQUESTS 30,"
echo "   scripts/locked-ops.py target/bench-instructions.tidegate.callgrind REQUESTS $TIDEGATE 30)"

if [ "${AGAINST_NGINX:-0}" = 1 ]; then
    # nginx as the proxy, one worker in the foreground under callgrind,
    # with a keep-alive pool to the same upstream.
    NGINX_PORT=$(free_port)
    mkdir -p "$WORK/proxy"
    cat >"$WORK/proxy/nginx.conf" <<EOF
master_process off;
worker_processes 1;
daemon off;
pid $WORK/proxy/nginx.pid;
error_log $WORK/proxy/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/proxy/body;
    proxy_temp_path $WORK/proxy/proxy;
    fastcgi_temp_path $WORK/proxy/fastcgi;
    uwsgi_temp_path $WORK/proxy/uwsgi;
    scgi_temp_path $WORK/proxy/scgi;
    upstream app { server 127.0.0.1:$UPSTREAM_PORT; keepalive 256; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$WORK/nginx.%p" \
        "$NGINX" -c "$WORK/proxy/nginx.conf" -e "$WORK/proxy/error.log" 2>"$WORK/valgrind-nginx.log" &
    NGINX_VALGRIND=$!
    PIDS+=("$NGINX_VALGRIND")
    wait_port "$NGINX_PORT"
    measure nginx "$NGINX_VALGRIND" "$NGINX_PORT" "$NGINX"
fi
