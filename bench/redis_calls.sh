#!/usr/bin/env bash
# Latency of tidefs's Redis operations on a fresh redis-server on 127.0.0.1, one client
# (redis-benchmark -c 1): a lookup as a function (FCALL, Redis 7+) and as a script (EVALSHA,
# which re-runs the library's definitions at every call), a plain GET for scale, and a
# listing of 100 entries. These are the figures docs/design.md quotes. The server is stopped
# by PID and its directory removed at the end.
#
#     bench/redis_calls.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
bin=${TIDEFS_BIN:-target/release/tidefs}
[[ -x $bin ]] || cargo build --release --bin tidefs
tmp=$(mktemp -d /tmp/tidefs-calls.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    --logfile redis.log &
pid=$!
trap 'kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf -- "$tmp"' EXIT
for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
"$bin" format "redis://127.0.0.1:$port/1" calls --bucket "$tmp/objects" >/dev/null
cli=(redis-cli -p "$port" -n 1)
fn=$(redis-cli -p "$port" FUNCTION LIST | grep -o 'tidefs_[0-9a-f]*' | head -1)
script=$(sed -e 's/@TRASH_INO@/9223372032828243968/' -e 's/^-- @ENTRY@$/return dispatch(ARGV)/' \
    meta/src/redis.lua)
sha=$("${cli[@]}" SCRIPT LOAD "$script")
# Arguments after the operation: now (s, ns), the trash hour, then the operation's own.
for i in $(seq 100); do
    "${cli[@]}" FCALL "$fn" 0 mknod 0 0 x 1 "f$i" 1 420 0 0 0 0 "" 0 >/dev/null
done
measure() {
    local rps
    rps=$(redis-benchmark -p "$port" --dbnum 1 -n "$n" -c 1 "${@:2}" 2>&1 | tr '\r' '\n' |
        grep -o 'throughput summary: [0-9.]*' | grep -o '[0-9.]*$')
    printf '| %s | %.0f | %.0f |\n' "$1" "$rps" "$(echo "1000000 / $rps" | bc -l)"
}
echo "| call | per second | us each |"
echo "|---|---:|---:|"
measure "GET of an inode" GET i1
measure "lookup as a function (FCALL)" FCALL "$fn" 0 lookup 0 0 x 1 f1
measure "lookup as a script (EVALSHA)" EVALSHA "$sha" 0 lookup 0 0 x 1 f1
measure "listing of 100 entries (FCALL)" FCALL "$fn" 0 readdir 0 0 x 1 0 1000
