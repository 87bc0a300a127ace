#!/usr/bin/env bash
# Runs pjdfstest against a fresh tidefs volume (SQLite metadata, or with TIDEFS_TEST_META=redis
# a redis-server started on 127.0.0.1 for the run; objects in a local directory, or with
# TIDEFS_TEST_STORAGE=s3 in an s3s-fs server started on 127.0.0.1 for the run) mounted
# in a temporary directory, then unmounts, stops the server and deletes everything. As root.
# TIDEFS_TRASH_DAYS=N formats the volume with a trash, which must change no result.
# Prints "pjdfstest: N passed, N failed, N skipped" and fails if any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TIDEFS_BIN:-target/debug/tidefs}
[[ -x $bin ]] || cargo build --locked --bin tidefs
tmp=$(mktemp -d /tmp/tidefs-pjd.XXXXXX)
chmod 755 "$tmp"
pid=""
s3pid=""
redispid=""
cleanup() {
    if grep -q " $tmp/mnt " /proc/self/mountinfo 2>/dev/null; then
        "$bin" umount "$tmp/mnt" 2>/dev/null || umount -l "$tmp/mnt" 2>/dev/null || true
    fi
    if [[ -n $pid ]]; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    [[ -n $s3pid ]] && kill "$s3pid" 2>/dev/null
    if [[ -n $redispid ]]; then
        kill "$redispid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$redispid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -rf -- "$tmp"
}
trap cleanup EXIT
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
mkdir "$tmp/mnt"
store=(--bucket "$tmp/objects")
keys=()
if [[ ${TIDEFS_TEST_STORAGE:-} == s3 ]]; then
    export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
    port=$(free_port)
    mkdir -p "$tmp/s3/pjdfstest"
    s3s-fs --host 127.0.0.1 --port "$port" --access-key pjd-ak --secret-key pjd-sk "$tmp/s3" \
        >"$tmp/s3.log" 2>&1 &
    s3pid=$!
    for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    keys=(--access-key pjd-ak --secret-key pjd-sk)
    store=(--storage s3 --bucket "http://127.0.0.1:$port/pjdfstest" "${keys[@]}")
fi
meta="sqlite3://$tmp/meta.db"
if [[ ${TIDEFS_TEST_META:-} == redis ]]; then
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
        --logfile redis.log &
    redispid=$!
    for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$rport") 2>/dev/null && break; sleep 0.05; done
    meta="redis://127.0.0.1:$rport/1"
fi
"$bin" format "$meta" pjdfstest "${store[@]}" \
    --trash-days "${TIDEFS_TRASH_DAYS:-0}" >/dev/null
"$bin" mount "$meta" "$tmp/mnt" ${keys[@]+"${keys[@]}"} 2>"$tmp/mount.log" >/dev/null &
pid=$!
for _ in $(seq 200); do
    grep -qE " $tmp/mnt .* - fuse(\.tidefs)? tidefs:" /proc/self/mountinfo && break
    kill -0 "$pid" 2>/dev/null || { cat "$tmp/mount.log" >&2; exit 1; }
    sleep 0.05
done
rc=0
PJDFSTEST_LOG="$tmp/pjdfstest.log" tests/pjdfstest/run.sh "$tmp/mnt" || rc=$?
"$bin" umount "$tmp/mnt"
wait "$pid" || { echo "pjdfstest.sh: the mount exited with an error" >&2; cat "$tmp/mount.log" >&2; rc=1; }
pid=""
exit $rc
