#!/bin/bash
# Sequential write (with fsync) and cold sequential read of a 1 GiB file on tidefs over an
# s3s-fs server on 127.0.0.1, three runs each, with dd; extra arguments go to `tidefs mount`
# (e.g. --max-readahead 12, --buffer-size 300 --cache-dir DIR). Prints the mount's peak RSS
# after the writes. The quick check behind the readahead and write-buffer figures in
# docs/design.md. Needs root (drop_caches), s3s-fs (scripts/install-deps.sh) and a built
# target/release/tidefs. Everything is in a temporary directory removed at the end; the
# server is stopped by PID.
set -euo pipefail
B=${TIDEFS:-$(dirname "$0")/../target/release/tidefs}
S3S=$(command -v s3s-fs || echo ~/.cargo/bin/s3s-fs)
T=$(mktemp -d /tmp/tidefs-dd.XXXX)
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$T/s3/bench" "$T/mnt"
"$S3S" --host 127.0.0.1 --port "$PORT" --access-key ak --secret-key sk "$T/s3" >/dev/null 2>&1 &
SP=$!
cleanup() {
    "$B" umount "$T/mnt" 2>/dev/null || true
    sleep 1
    kill "$SP" 2>/dev/null || true
    wait "$SP" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
sleep 0.5
"$B" format "sqlite3://$T/m.db" bench --storage s3 --bucket "http://127.0.0.1:$PORT/bench" \
    --access-key ak --secret-key sk --store-secret >/dev/null
mount_it() {
    "$B" mount "sqlite3://$T/m.db" "$T/mnt" "$@" 2>>"$T/log" >/dev/null &
    MP=$!
    for _ in $(seq 100); do mountpoint -q "$T/mnt" && return; sleep 0.1; done
    echo "mount failed: $(cat "$T/log")" >&2; exit 1
}
mount_it "$@"
for i in 1 2 3; do
    echo -n "write $i: "; dd if=/dev/zero of="$T/mnt/f$i" bs=1M count=1024 conv=fsync 2>&1 | tail -1
done
echo "peak RSS of the mount while writing: $(awk '/VmHWM/ {print $2, $3}' "/proc/$MP/status")"
for i in 1 2 3; do
    "$B" umount "$T/mnt"; sleep 1; sync; echo 3 > /proc/sys/vm/drop_caches
    mount_it "$@"
    echo -n "cold read $i: "; dd if="$T/mnt/f$i" of=/dev/null bs=1M 2>&1 | tail -1
done
