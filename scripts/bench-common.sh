# Shared by the whole-system benchmark scripts (sourced, not run):
# installing what they need, a work directory and the processes they start,
# both cleaned up on exit, and port helpers.

# Installs the Debian packages named (each provides the command of the same
# name) when their command is missing; needs root for that.
need_tools() {
    local missing=() tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# WORK: a fresh directory; PIDS: processes to stop. Both go on exit.
WORK=$(mktemp -d /tmp/tidegate-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 30 s for something to listen on port $1.
wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

# The measured gateway's config (listen port, admin port, upstream port):
# one upstream with retry, circuit breaker and bulkhead on, one route to it.
tidegate_config() {
    cat <<EOF
[gateway]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"

[[upstreams]]
name = "app"
endpoints = ["http://127.0.0.1:$3"]
[upstreams.policy]
timeout = "10s"
[upstreams.policy.retry]
max_attempts = 3
[upstreams.policy.circuit_breaker]
consecutive_failures = 5
[upstreams.policy.bulkhead]
max_concurrent = 1000
max_queued = 1000

[[routes]]
name = "all"
path_prefix = "/"
upstream = "app"
EOF
}
