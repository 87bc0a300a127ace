# Sourced by bench/s3_dd.sh and bench/cpu_budget.sh. Makes a temporary directory $T with an
# s3s-fs server on 127.0.0.1:$PORT (PID $SP) and a tidefs volume formatted on its bucket
# `bench` (metadata in sqlite3://$T/m.db, binary $B). On exit it unmounts $T/mnt, stops the
# server by PID and removes $T, after calling the function named in $BEFORE_CLEANUP if set.
# `mount_tidefs [flags]` mounts the volume on $T/mnt and leaves the mount's PID in $MP.
B=${TIDEFS:-$(dirname "$0")/../target/release/tidefs}
S3S=$(command -v s3s-fs || echo ~/.cargo/bin/s3s-fs)
T=$(mktemp -d /tmp/tidefs-bench.XXXX)
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$T/s3/bench" "$T/mnt"
"$S3S" --host 127.0.0.1 --port "$PORT" --access-key ak --secret-key sk "$T/s3" >/dev/null 2>&1 &
SP=$!
cleanup() {
    [ -z "${BEFORE_CLEANUP:-}" ] || "$BEFORE_CLEANUP" || true
    "$B" umount "$T/mnt" 2>/dev/null || true
    sleep 1
    kill "$SP" 2>/dev/null || true
    wait "$SP" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
sleep 0.5
"$B" format "sqlite3://$T/m.db" bench --storage s3 --bucket "http://127.0.0.1:$PORT/bench" \
    --access-key ak --secret-key sk --store-secret --trash-days 0 >/dev/null
MP=
mount_tidefs() {
    "$B" mount "sqlite3://$T/m.db" "$T/mnt" "$@" 2>>"$T/log" >/dev/null &
    MP=$!
    for _ in $(seq 100); do mountpoint -q "$T/mnt" && return; sleep 0.1; done
    echo "tidefs mount failed: $(cat "$T/log")" >&2; exit 1
}
