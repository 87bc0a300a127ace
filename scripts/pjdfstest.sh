#!/usr/bin/env bash
# Runs pjdfstest against a fresh tidefs volume (SQLite metadata, local object directory)
# mounted in a temporary directory, then unmounts and deletes everything. Run as root.
# Prints "pjdfstest: N passed, N failed, N skipped" and fails if any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TIDEFS_BIN:-target/debug/tidefs}
[[ -x $bin ]] || cargo build --locked --bin tidefs
tmp=$(mktemp -d /tmp/tidefs-pjd.XXXXXX)
chmod 755 "$tmp"
pid=""
cleanup() {
    if grep -q " $tmp/mnt " /proc/self/mountinfo 2>/dev/null; then
        "$bin" umount "$tmp/mnt" 2>/dev/null || umount -l "$tmp/mnt" 2>/dev/null || true
    fi
    if [[ -n $pid ]]; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf -- "$tmp"
}
trap cleanup EXIT
mkdir "$tmp/mnt"
"$bin" format "sqlite3://$tmp/meta.db" pjdfstest --bucket "$tmp/objects" >/dev/null
"$bin" mount "sqlite3://$tmp/meta.db" "$tmp/mnt" 2>"$tmp/mount.log" >/dev/null &
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
