#!/bin/bash
# Sequential write (with fsync) and cold sequential read of a 1 GiB file on tidefs over an
# s3s-fs server on 127.0.0.1, three runs each, with dd; extra arguments go to `tidefs mount`
# (e.g. --max-readahead 12, --buffer-size 300 --cache-dir DIR). Prints the mount's peak RSS
# after the writes. The quick check behind the readahead and write-buffer figures in
# docs/design.md. Needs root (drop_caches), s3s-fs (scripts/install-deps.sh) and a built
# target/release/tidefs. Everything is in a temporary directory removed at the end; the
# server is stopped by PID.
set -euo pipefail
. "$(dirname "$0")/s3s_volume.sh"
mount_tidefs "$@"
for i in 1 2 3; do
    echo -n "write $i: "; dd if=/dev/zero of="$T/mnt/f$i" bs=1M count=1024 conv=fsync 2>&1 | tail -1
done
echo "peak RSS of the mount while writing: $(awk '/VmHWM/ {print $2, $3}' "/proc/$MP/status")"
for i in 1 2 3; do
    "$B" umount "$T/mnt"; sleep 1; sync; echo 3 > /proc/sys/vm/drop_caches
    mount_tidefs "$@"
    echo -n "cold read $i: "; dd if="$T/mnt/f$i" of=/dev/null bs=1M 2>&1 | tail -1
done
