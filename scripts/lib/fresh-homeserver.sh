# Sourced by the interop scripts: builds the homeserver (debug) and starts a fresh one on a
# free loopback port with a temporary data directory, open registration and no rate limits.
# Sets $url, $pid and $tmp, stops the server and removes $tmp on exit, and prints the end of
# its log when the script fails (`fresh_homeserver_failed`).

start_fresh_homeserver() {
    cargo build -p homeserver --bins
    local bin="${CARGO_TARGET_DIR:-target}/debug/homeserver"
    tmp=$(mktemp -d /tmp/obmin-interop.XXXXXX)
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    OBMIN_LISTEN="127.0.0.1:$port" OBMIN_DATA_DIR="$tmp/data" OBMIN_SERVER_NAME=localhost OBMIN_REGISTRATION=open \
        OBMIN_RATE_LIMITS_ENABLED=false "$bin" serve >"$tmp/homeserver.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
    url="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do
        curl -fsS "$url/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "the homeserver did not start" >&2
    fresh_homeserver_failed
    return 1
}

fresh_homeserver_failed() {
    echo "--- homeserver log (last 50 lines)" >&2
    tail -n 50 "$tmp/homeserver.log" >&2
}
