#!/usr/bin/env bash
# Whole-system proxy benchmark: wrk against one loopback upstream directly,
# through tidegate (retry, circuit breaker and bulkhead on), through
# tidegate's edge route (the same plus an API key, its tier's per-minute
# limit and a per-key GCRA route limit, none of them reached), through the
# same edge route on a second tidegate whose counts live in a local
# redis-server (`shared`: two Redis round trips per request), through
# nginx (same number of workers, upstream keep-alive) and through `floor`,
# a bare hyper forwarder (crates/tidegate/examples/hyper_floor.rs: hyper's
# server and pooled client, the gateway's allocator and worker model,
# nothing else), which is as fast as any hyper-based proxy can be here;
# side by side in one run.
#
# gRPC unary calls too (GRPC=0 leaves them out): h2load against a tonic
# upstream (crates/gateway/examples/grpc_upstream.rs) directly, through
# tidegate (an `http2` upstream) and through nginx (`grpc_pass`), the
# same number of connections, STREAMS (10) streams in flight on each.
#
# HTTPS too (TLS=0 leaves it out): a third tidegate with `[gateway.tls]`
# and nginx with `ssl`, the same self-signed ECDSA P-256 certificate
# (openssl), in front of the same upstream: keep-alive requests
# (`tls-tidegate`, `tls-nginx`) and a new connection, so a new TLS
# handshake, for every request (`Connection: close`: `hs-tidegate`,
# `hs-nginx`).
#
# Every row also counts the CPU the proxy (with its worker processes)
# spent per request: utime + stime from /proc, before and after the run,
# over the requests wrk completed. On a shared machine that is steadier
# than requests/s, and requests per proxy CPU-second against nginx is the
# figure to win. With one worker (and PIN=1, the default then) every proxy
# runs on CPU 1 and wrk, the upstreams and Redis on CPU 0, so a proxy's
# CPU is its own.
#
# With access logs on in both (LOGS=0 leaves it out): `log-tidegate`
# writes its access lines (info) to a file, `log-nginx` its `access_log`.
#
# HAProxy and Caddy too (OTHERS=0 leaves them out): `haproxy` (nbthread =
# workers, `http-reuse always`) and `caddy` (`reverse_proxy`, GOMAXPROCS =
# workers), both without access logs, in front of the same upstream.
#
# Rounds alternate direct / tidegate / edge / shared / nginx / floor so that machine noise
# hits all alike; the table shows each one's median over the rounds, and
# the ratios are computed from those medians.
#
#   ./scripts/bench-proxy.sh                 # defaults below
#   WORKERS=2 CONNECTIONS=100 DURATION=15 ROUNDS=5 ./scripts/bench-proxy.sh
#
# Installs nginx, wrk and redis-server from Debian's packages when they are
# missing (root).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKERS=${WORKERS:-1}          # nginx worker_processes = tidegate --workers
CONNECTIONS=${CONNECTIONS:-50} # wrk connections
THREADS=${THREADS:-1}          # wrk threads
DURATION=${DURATION:-10}       # seconds per measurement
ROUNDS=${ROUNDS:-3}
GRPC=${GRPC:-1}                # also measure gRPC unary calls
TLS=${TLS:-1}                  # also measure HTTPS
LOGS=${LOGS:-1}                # also measure both with access logs on
OTHERS=${OTHERS:-1}            # also measure HAProxy and Caddy
if [ "$WORKERS" = 1 ] && [ "$(nproc)" -ge 2 ]; then PIN=${PIN:-1}; else PIN=${PIN:-0}; fi
ON_LOAD=()
ON_PROXY=()
if [ "$PIN" = 1 ]; then ON_LOAD=(taskset -c 0) ON_PROXY=(taskset -c 1); fi
STREAMS=${STREAMS:-10}         # h2load streams in flight per connection

. scripts/bench-common.sh
need_tools nginx wrk python3 redis-server openssl
# h2load and nghttp come in Debian's nghttp2-client.
command -v h2load >/dev/null || need_tools nghttp2-client
if [ "$OTHERS" = 1 ]; then need_tools haproxy caddy; fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet -p tidegate --bin tidegate --example hyper_floor
cargo build --release --quiet -p tidegate-gateway --example grpc_upstream
GRPC_UPSTREAM=target/release/examples/grpc_upstream
TIDEGATE=target/release/tidegate
FLOOR=target/release/examples/hyper_floor

UPSTREAM_PORT=$(free_port)
NGINX_PORT=$(free_port)
TIDEGATE_PORT=$(free_port)
ADMIN_PORT=$(free_port)
SHARED_PORT=$(free_port)
SHARED_ADMIN_PORT=$(free_port)
REDIS_PORT=$(free_port)
FLOOR_PORT=$(free_port)
GRPC_UPSTREAM_PORT=$(free_port)
NGINX_GRPC_PORT=$(free_port)
TLS_PORT=$(free_port)
LOG_PORT=$(free_port)
LOG_ADMIN_PORT=$(free_port)
NGINX_LOG_PORT=$(free_port)
TLS_ADMIN_PORT=$(free_port)
NGINX_TLS_PORT=$(free_port)
HAPROXY_PORT=$(free_port)
CADDY_PORT=$(free_port)

nginx_conf() { # name workers server-block
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<EOF
worker_processes $2;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/$1/body;
    proxy_temp_path $WORK/$1/proxy;
    fastcgi_temp_path $WORK/$1/fastcgi;
    uwsgi_temp_path $WORK/$1/uwsgi;
    scgi_temp_path $WORK/$1/scgi;
    $3
}
EOF
    local pin=("${ON_PROXY[@]}")
    [ "$1" = upstream ] && pin=("${ON_LOAD[@]}")
    "${pin[@]}" "$NGINX" -c "$WORK/$1/nginx.conf" -e "$WORK/$1/error.log" &
    PIDS+=($!)
    printf -v "NGINX_PID_$1" %s $!
}

# The self-signed certificate both HTTPS proxies serve.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$WORK/tls.key" -out "$WORK/tls.pem" -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1" 2>/dev/null

# The upstream: nginx answering from memory, one worker, identical for all.
nginx_conf upstream 1 "server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { default_type text/plain; return 200 \"hello from the upstream\n\"; }
    }"

# nginx as the proxy, with a keep-alive pool to the upstream.
nginx_conf proxy "$WORKERS" "upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

# nginx with its access log on, to a file (the default format).
nginx_conf logproxy "$WORKERS" "upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$NGINX_LOG_PORT;
        access_log $WORK/logproxy/access.log;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

# nginx over TLS (1.2 and 1.3, its default session cache and tickets).
nginx_conf tlsproxy "$WORKERS" "upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT ssl;
        ssl_certificate $WORK/tls.pem;
        ssl_certificate_key $WORK/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

# nginx in front of the gRPC upstream: HTTP/2 both ways, kept alive.
# nginx sends one call at a time on an upstream connection (it does not
# multiplex), so its pool holds as many as there are calls in flight.
nginx_conf grpcproxy "$WORKERS" "upstream grpc_app {
        server 127.0.0.1:$GRPC_UPSTREAM_PORT;
        keepalive 1024;
    }
    server {
        listen 127.0.0.1:$NGINX_GRPC_PORT http2;
        location / { grpc_pass grpc://grpc_app; }
    }"
"${ON_LOAD[@]}" "$GRPC_UPSTREAM" "127.0.0.1:$GRPC_UPSTREAM_PORT" 2>"$WORK/grpc_upstream.log" &
PIDS+=($!)

tidegate_config "$TIDEGATE_PORT" "$ADMIN_PORT" "$UPSTREAM_PORT" >"$WORK/tidegate.toml"
cat >>"$WORK/tidegate.toml" <<EOF

[[upstreams]]
name = "grpc"
endpoints = ["http://127.0.0.1:$GRPC_UPSTREAM_PORT"]
protocol = "http2"

[[routes]]
name = "grpc"
path_prefix = "/bench.Echo"
upstream = "grpc"

[[routes]]
name = "edge"
path_prefix = "/edge"
upstream = "app"
require_api_key = true
rate_limit = { algorithm = "gcra", limit = 1000000000, per = "1s", key = "api_key" }

[[rate_limit.tiers]]
name = "bench"
requests_per_minute = 4000000000

[[api_keys]]
id = "bench"
key_sha256 = "$(printf %s bench-key | sha256sum | cut -d' ' -f1)"
tier = "bench"
EOF
# The second tidegate: the same routes, counts in Redis. A decision may
# take a second rather than the default 50 ms: a stall of the shared VM
# longer than that would open the store's breaker, answer 503s (the
# failure mode is closed) and end the run.
"${ON_LOAD[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
PIDS+=($!)
sed -e "s/127.0.0.1:$TIDEGATE_PORT/127.0.0.1:$SHARED_PORT/" \
    -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$SHARED_ADMIN_PORT/" \
    -e "s|^\[\[rate_limit.tiers\]\]|[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:$REDIS_PORT\"\nfailure_mode = \"closed\"\ntimeout = \"1s\"\n[[rate_limit.tiers]]|" \
    "$WORK/tidegate.toml" >"$WORK/shared.toml"
grep -q 'store = "redis"' "$WORK/shared.toml"
wait_port "$REDIS_PORT"
TIDEGATE_LOG=warn "${ON_PROXY[@]}" "$TIDEGATE" serve --config "$WORK/shared.toml" --workers "$WORKERS" \
    2>"$WORK/shared.log" &
PIDS+=($!)
SHARED_PID=$!

# The third tidegate: the plain one's first route, over TLS.
tidegate_config "$TLS_PORT" "$TLS_ADMIN_PORT" "$UPSTREAM_PORT" >"$WORK/tls.toml"
cat >>"$WORK/tls.toml" <<EOF
[gateway.tls]
cert = "$WORK/tls.pem"
key = "$WORK/tls.key"
EOF
TIDEGATE_LOG=warn "${ON_PROXY[@]}" "$TIDEGATE" serve --config "$WORK/tls.toml" --workers "$WORKERS" \
    2>"$WORK/tls.log" &
PIDS+=($!)
TLS_PID=$!

# The fourth: the plain one's first route with its access lines on (info),
# written to a file.
tidegate_config "$LOG_PORT" "$LOG_ADMIN_PORT" "$UPSTREAM_PORT" >"$WORK/log.toml"
TIDEGATE_LOG=info "${ON_PROXY[@]}" "$TIDEGATE" serve --config "$WORK/log.toml" --workers "$WORKERS" \
    2>"$WORK/access.log" &
PIDS+=($!)
LOG_PID=$!

# Access logs are off for nginx, so tidegate logs warnings only.
TIDEGATE_LOG=warn "${ON_PROXY[@]}" "$TIDEGATE" serve --config "$WORK/tidegate.toml" --workers "$WORKERS" \
    2>"$WORK/tidegate.log" &
TIDEGATE_PID=$!
PIDS+=("$TIDEGATE_PID")

"${ON_PROXY[@]}" "$FLOOR" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UPSTREAM_PORT" "$WORKERS" &
PIDS+=($!)
FLOOR_PID=$!

if [ "$OTHERS" = 1 ]; then
    # HAProxy: one process, `nbthread` threads, idle upstream connections
    # shared by every client connection, no logs.
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend proxy
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend app
backend app
    server upstream 127.0.0.1:$UPSTREAM_PORT
EOF
    "${ON_PROXY[@]}" haproxy -db -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.log" &
    PIDS+=($!)
    HAPROXY_PID=$!
    # Caddy: `reverse_proxy` (pooled upstream connections), no access log.
    cat >"$WORK/Caddyfile" <<EOF
{
    admin off
    auto_https off
}
http://127.0.0.1:$CADDY_PORT {
    reverse_proxy 127.0.0.1:$UPSTREAM_PORT
}
EOF
    HOME=$WORK GOMAXPROCS=$WORKERS "${ON_PROXY[@]}" caddy run --config "$WORK/Caddyfile" \
        --adapter caddyfile 2>"$WORK/caddy.log" &
    PIDS+=($!)
    CADDY_PID=$!
fi

wait_port "$UPSTREAM_PORT"
wait_port "$NGINX_PORT"
wait_port "$FLOOR_PORT"
wait_port "$TIDEGATE_PORT"
wait_port "$SHARED_PORT"
wait_port "$GRPC_UPSTREAM_PORT"
wait_port "$NGINX_GRPC_PORT"
wait_port "$TLS_PORT"
wait_port "$LOG_PORT"
wait_port "$NGINX_LOG_PORT"
wait_port "$NGINX_TLS_PORT"
if [ "$OTHERS" = 1 ]; then
    wait_port "$HAPROXY_PORT"
    wait_port "$CADDY_PORT"
fi

# One gRPC request message, framed: uncompressed, 5 bytes.
printf '\x00\x00\x00\x00\x05hello' >"$WORK/grpc.msg"
GRPC_PATH=/bench.Echo/Unary
# The call succeeds, with grpc-status 0, on every path measured.
for port in "$GRPC_UPSTREAM_PORT" "$TIDEGATE_PORT" "$NGINX_GRPC_PORT"; do
    if ! nghttp -v -H ':method: POST' -H 'content-type: application/grpc' -H 'te: trailers' \
        -d "$WORK/grpc.msg" "http://127.0.0.1:$port$GRPC_PATH" 2>&1 | grep -q 'grpc-status: 0'; then
        echo "the gRPC call through port $port did not succeed" >&2
        exit 1
    fi
done

# One h2load run of gRPC unary calls (URL, seconds); prints
# "requests_per_second mean_ms spread_ms" (h2load gives the mean and the
# standard deviation of request times, not percentiles: the mean, and the
# mean + 2 sd).
measure_grpc() {
    "${ON_LOAD[@]}" h2load -c"$CONNECTIONS" -m"$STREAMS" -t"$THREADS" -D"$2" -d "$WORK/grpc.msg" \
        -H 'content-type: application/grpc' -H 'te: trailers' "$1" >"$WORK/h2load.out" 2>&1
    python3 - "$WORK/h2load.out" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
if not done or int(done.group(3)) or int(done.group(4)):
    sys.exit("h2load: failed requests\n" + text)
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text).group(1))
row = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)\s+(\S+)", text)
def ms(v):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
mean, sd = ms(row.group(1)), ms(row.group(2))
print(f"{rps:.0f} {mean:.3f} {mean + 2 * sd:.3f}")
EOF
}

# CPU time (utime + stime, clock ticks) of process $1 and its descendants.
cpu_ticks() {
    python3 - "$1" <<'EOF'
import os, sys
parents, ticks = {}, {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    fields = stat[stat.rindex(")") + 2:].split()
    parents[int(pid)] = int(fields[1])
    ticks[int(pid)] = int(fields[11]) + int(fields[12])
tree, grown = {int(sys.argv[1])}, True
while grown:
    more = {p for p, parent in parents.items() if parent in tree} - tree
    tree |= more
    grown = bool(more)
print(sum(ticks.get(p, 0) for p in tree))
EOF
}

# One wrk run (URL, seconds, the proxy's pid, extra wrk arguments); prints
# "requests_per_second p50_ms p99_ms cpu_us_per_request".
measure() {
    local before after
    before=$(cpu_ticks "$3")
    "${ON_LOAD[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${2}s" --latency "${@:4}" "$1" >"$WORK/wrk.out"
    after=$(cpu_ticks "$3")
    if grep -q "Non-2xx" "$WORK/wrk.out"; then
        echo "non-2xx answers from $1:" >&2
        cat "$WORK/wrk.out" >&2
        exit 1
    fi
    python3 - "$WORK/wrk.out" "$((after - before))" "$(getconf CLK_TCK)" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
def ms(label):
    value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
done = int(re.search(r"(\d+) requests in", text).group(1))
errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
if errors and int(errors.group(1)) + int(errors.group(4)):
    sys.exit("wrk: connect errors or timeouts\n" + text)
cpu_us = int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / max(done, 1)
print(f"{rps:.0f} {ms('50'):.3f} {ms('99'):.3f} {cpu_us:.1f}")
EOF
}

# Peak resident memory of tidegate, sampled while it is under load.
RSS_PEAK=$WORK/rss_peak
echo 0 >"$RSS_PEAK"
sample_rss() {
    local peak=0 rss
    while kill -0 "$TIDEGATE_PID" 2>/dev/null; do
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$TIDEGATE_PID/status" 2>/dev/null || echo 0)
        [ "${rss:-0}" -gt "$peak" ] && peak=$rss && echo "$peak" >"$RSS_PEAK"
        sleep 0.2
    done
}
sample_rss &
PIDS+=($!)

DIRECT="http://127.0.0.1:$UPSTREAM_PORT/"
VIA_TIDEGATE="http://127.0.0.1:$TIDEGATE_PORT/"
VIA_NGINX="http://127.0.0.1:$NGINX_PORT/"
VIA_EDGE="http://127.0.0.1:$TIDEGATE_PORT/edge"
VIA_SHARED="http://127.0.0.1:$SHARED_PORT/edge"
VIA_FLOOR="http://127.0.0.1:$FLOOR_PORT/"
VIA_HAPROXY="http://127.0.0.1:$HAPROXY_PORT/"
VIA_CADDY="http://127.0.0.1:$CADDY_PORT/"
KEY=(-H "X-API-Key: bench-key")

GRPC_DIRECT="http://127.0.0.1:$GRPC_UPSTREAM_PORT$GRPC_PATH"
GRPC_TIDEGATE="http://127.0.0.1:$TIDEGATE_PORT$GRPC_PATH"
GRPC_NGINX="http://127.0.0.1:$NGINX_GRPC_PORT$GRPC_PATH"
VIA_TLS_TIDEGATE="https://127.0.0.1:$TLS_PORT/"
VIA_LOG_TIDEGATE="http://127.0.0.1:$LOG_PORT/"
VIA_LOG_NGINX="http://127.0.0.1:$NGINX_LOG_PORT/"
VIA_TLS_NGINX="https://127.0.0.1:$NGINX_TLS_PORT/"
CLOSE=(-H "Connection: close")
TARGETS=(direct tidegate edge shared nginx floor)
if [ "$OTHERS" = 1 ]; then TARGETS+=(haproxy caddy); fi
if [ "$LOGS" = 1 ]; then TARGETS+=(log-tidegate log-nginx); fi
if [ "$TLS" = 1 ]; then TARGETS+=(tls-tidegate tls-nginx hs-tidegate hs-nginx); fi
if [ "$GRPC" = 1 ]; then TARGETS+=(grpc-direct grpc-tidegate grpc-nginx); fi

echo "warming up (connection pools, page cache, CPU frequency)"
measure "$DIRECT" 2 "$NGINX_PID_upstream" >/dev/null
measure "$VIA_TIDEGATE" 2 "$TIDEGATE_PID" >/dev/null
measure "$VIA_NGINX" 2 "$NGINX_PID_proxy" >/dev/null
measure "$VIA_FLOOR" 2 "$FLOOR_PID" >/dev/null
if [ "$OTHERS" = 1 ]; then
    measure "$VIA_HAPROXY" 2 "$HAPROXY_PID" >/dev/null
    measure "$VIA_CADDY" 2 "$CADDY_PID" >/dev/null
fi
if [ "$LOGS" = 1 ]; then
    measure "$VIA_LOG_TIDEGATE" 2 "$LOG_PID" >/dev/null
    measure "$VIA_LOG_NGINX" 2 "$NGINX_PID_logproxy" >/dev/null
fi
if [ "$TLS" = 1 ]; then
    measure "$VIA_TLS_TIDEGATE" 2 "$TLS_PID" >/dev/null
    measure "$VIA_TLS_NGINX" 2 "$NGINX_PID_tlsproxy" >/dev/null
fi
if [ "$GRPC" = 1 ]; then
    for url in "$GRPC_DIRECT" "$GRPC_TIDEGATE" "$GRPC_NGINX"; do measure_grpc "$url" 2 >/dev/null; done
fi
measure "$VIA_EDGE" 2 "$TIDEGATE_PID" "${KEY[@]}" >/dev/null
measure "$VIA_SHARED" 2 "$SHARED_PID" "${KEY[@]}" >/dev/null

: >"$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
    for target in "${TARGETS[@]}"; do
        extra=()
        case $target in
            grpc-*)
                case $target in
                    grpc-direct) url=$GRPC_DIRECT ;;
                    grpc-tidegate) url=$GRPC_TIDEGATE ;;
                    grpc-nginx) url=$GRPC_NGINX ;;
                esac
                result=$(measure_grpc "$url" "$DURATION")
                echo "round $round  $target  $result"
                echo "$target $result" >>"$WORK/results"
                continue ;;
            direct) url=$DIRECT pid=$NGINX_PID_upstream ;;
            tidegate) url=$VIA_TIDEGATE pid=$TIDEGATE_PID ;;
            edge) url=$VIA_EDGE pid=$TIDEGATE_PID extra=("${KEY[@]}") ;;
            shared) url=$VIA_SHARED pid=$SHARED_PID extra=("${KEY[@]}") ;;
            nginx) url=$VIA_NGINX pid=$NGINX_PID_proxy ;;
            floor) url=$VIA_FLOOR pid=$FLOOR_PID ;;
            haproxy) url=$VIA_HAPROXY pid=$HAPROXY_PID ;;
            caddy) url=$VIA_CADDY pid=$CADDY_PID ;;
            log-tidegate) url=$VIA_LOG_TIDEGATE pid=$LOG_PID ;;
            log-nginx) url=$VIA_LOG_NGINX pid=$NGINX_PID_logproxy ;;
            tls-tidegate) url=$VIA_TLS_TIDEGATE pid=$TLS_PID ;;
            tls-nginx) url=$VIA_TLS_NGINX pid=$NGINX_PID_tlsproxy ;;
            hs-tidegate) url=$VIA_TLS_TIDEGATE pid=$TLS_PID extra=("${CLOSE[@]}") ;;
            hs-nginx) url=$VIA_TLS_NGINX pid=$NGINX_PID_tlsproxy extra=("${CLOSE[@]}") ;;
        esac
        result=$(measure "$url" "$DURATION" "$pid" "${extra[@]}")
        echo "round $round  $target  $result"
        echo "$target $result" >>"$WORK/results"
    done
done

python3 - "$WORK/results" "$(cat "$RSS_PEAK")" "$WORKERS" "$CONNECTIONS" "$DURATION" "$ROUNDS" "$STREAMS" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
rss_kib, workers, conns, duration, rounds, _streams = sys.argv[2:]
median = {}
cpu = {}
targets = ("direct", "tidegate", "edge", "shared", "nginx", "floor", "haproxy", "caddy",
           "log-tidegate", "log-nginx", "tls-tidegate", "tls-nginx", "hs-tidegate", "hs-nginx",
           "grpc-direct", "grpc-tidegate", "grpc-nginx")
for target in targets:
    runs = [r for r in rows if r[0] == target]
    if not runs:
        continue
    median[target] = [statistics.median(float(r[i]) for r in runs) for i in (1, 2, 3)]
    if len(runs[0]) > 4:
        cpu[target] = statistics.median(float(r[4]) for r in runs)
print()
print(f"{workers} worker(s) per proxy, wrk {conns} connections, {rounds} rounds of {duration} s; medians")
print(f"{'':13} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'CPU us/req':>11}")
for target, (rps, p50, p99) in median.items():
    used = f"{cpu[target]:>11.1f}" if target in cpu else f"{'':>11}"
    print(f"{target:13} {rps:>10.0f} {p50:>9.3f} {p99:>9.3f} {used}")
t, n = median["tidegate"], median["nginx"]
print()
e = median["edge"]
print(f"tidegate/nginx: requests/s {t[0] / n[0]:.2f}x, p50 {t[1] / n[1]:.2f}x, p99 {t[2] / n[2]:.2f}x, CPU per request {cpu['tidegate'] / cpu['nginx']:.2f}x")
print(f"requests per proxy CPU-second, tidegate/nginx: {cpu['nginx'] / cpu['tidegate']:.2f}x (access logs off)", end="")
if "log-tidegate" in cpu:
    print(f", {cpu['log-nginx'] / cpu['log-tidegate']:.2f}x (access logs on; the lines cost tidegate {cpu['log-tidegate'] - cpu['tidegate']:.1f} us, nginx {cpu['log-nginx'] - cpu['nginx']:.1f} us)")
else:
    print()
if "tls-tidegate" in median:
    for kind, label in (("tls", "HTTPS keep-alive"), ("hs", "HTTPS, a new handshake a request")):
        a, b = median[f"{kind}-tidegate"], median[f"{kind}-nginx"]
        ratio = cpu[f"{kind}-tidegate"] / cpu[f"{kind}-nginx"]
        print(f"{label}: tidegate/nginx requests/s {a[0] / b[0]:.2f}x, p99 {a[2] / b[2]:.2f}x, CPU per request {ratio:.2f}x")
print(f"edge/tidegate (API key + tier + route limit on): requests/s {e[0] / t[0]:.2f}x, p50 {e[1] / t[1]:.2f}x, p99 {e[2] / t[2]:.2f}x")
r = median["shared"]
print(f"shared/edge (the same limits counted in Redis): requests/s {r[0] / e[0]:.2f}x, p50 {r[1] / e[1]:.2f}x, p99 {r[2] / e[2]:.2f}x, p99 +{r[2] - e[2]:.3f} ms")
f = median["floor"]
print(f"floor/nginx (bare hyper, the ceiling of a hyper proxy): requests/s {f[0] / n[0]:.2f}x, p50 {f[1] / n[1]:.2f}x, p99 {f[2] / n[2]:.2f}x")
print(f"tidegate/floor (the cost of tidegate's own work): requests/s {t[0] / f[0]:.2f}x, p50 {t[1] / f[1]:.2f}x, p99 {t[2] / f[2]:.2f}x")
for other in ("haproxy", "caddy"):
    if other in cpu:
        print(f"requests per proxy CPU-second, {other}/nginx: {cpu['nginx'] / cpu[other]:.2f}x; tidegate/{other}: {cpu[other] / cpu['tidegate']:.2f}x")
if "grpc-tidegate" in median:
    g, gn, gd = median["grpc-tidegate"], median["grpc-nginx"], median["grpc-direct"]
    print(f"gRPC unary (h2load, {sys.argv[7]} streams a connection; latency columns: mean, mean + 2 sd):")
    print(f"  tidegate/nginx requests/s {g[0] / gn[0]:.2f}x, mean {g[1] / gn[1]:.2f}x")
    print(f"  tidegate/direct requests/s {g[0] / gd[0]:.2f}x, nginx/direct {gn[0] / gd[0]:.2f}x")
print(f"tidegate peak RSS under load: {int(rss_kib) / 1024:.1f} MiB")
EOF
