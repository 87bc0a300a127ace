#!/bin/bash
# Where the CPU of a sequential write and of a cold sequential read goes, when the S3 server
# runs on the same machine: seconds of CPU per GiB of the mount, the s3s-fs server and dd,
# and idle seconds (idle + iowait, over all CPUs), from /proc, for tidefs and (when
# `juicefs` is installed) JuiceFS over one s3s-fs server on 127.0.0.1. tidefs reads cold
# twice: with its disk cache, and with its memory cache alone (--cache-dir memory), which
# shows what filling the cache files costs.
#
# Each run first measures the server's own ceiling (`tidefs objbench`: 16 parallel 4 MiB PUTs,
# then GETs with the page cache dropped), which leaves every core to the server, and gives
# each rate as a share of it ("of ceiling"). The last column is a rough bound on that share
# for a client using that much CPU per GiB: the ceiling is about cores / server, a client
# gets at most cores / (server + client), so the bound is server / (server + mount + dd).
# Rough, because the server's CPU per GiB itself moves with the load (threads, page cache).
#
# Usage: sudo bench/cpu_budget.sh [runs] [MiB]   (default 3 runs of 1024 MiB)
# Needs root (drop_caches), s3s-fs (scripts/install-deps.sh) and a built
# target/release/tidefs. Everything is in a temporary directory removed at the end; the
# server is stopped by PID.
set -euo pipefail
RUNS=${1:-3}
MIB=${2:-1024}
. "$(dirname "$0")/s3s_volume.sh"
mkdir -p "$T/s3/jfs" "$T/jmnt"
JFS=$(command -v juicefs || true)
unmount_juicefs() { [ -z "$JFS" ] || juicefs umount "$T/jmnt" 2>/dev/null || true; }
BEFORE_CLEANUP=unmount_juicefs
if [ -n "$JFS" ]; then
    juicefs format "sqlite3://$T/jfs.db" bench --storage minio \
        --bucket "http://127.0.0.1:$PORT/jfs" --access-key ak --secret-key sk \
        --block-size 4096 --trash-days 0 >"$T/jformat" 2>&1 || { cat "$T/jformat" >&2; exit 1; }
fi

mount_juicefs() {
    juicefs mount "sqlite3://$T/jfs.db" "$T/jmnt" -d --cache-dir "$T/jcache" \
        --cache-size 2048 --log "$T/jlog" >/dev/null 2>&1
    # `-d` leaves a supervisor and the mount process, started last.
    MP=$(pgrep -n -f "juicefs mount sqlite3://$T/jfs.db")
}
# Unmounts, empties the cache and drops the page cache, so the next read is cold.
cold() {
    if [ "$1" = juicefs ]; then
        juicefs umount "$T/jmnt"; rm -rf "$T/jcache"
    else
        "$B" umount "$T/mnt"; rm -rf "$T/cache"
    fi
    sleep 1; sync; echo 3 > /proc/sys/vm/drop_caches
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
idle() { awk '/^cpu / {print $5 + $6}' /proc/stat; }
HZ=$(getconf CLK_TCK)
# measure LABEL CEILING CMD...: runs CMD (a dd) and prints a table row for mount $MP, with
# the rate as a share of CEILING (MiB/s).
measure() {
    local label=$1 top=$2 m0 s0 i0 t
    shift 2
    m0=$(ticks "$MP"); s0=$(ticks "$SP"); i0=$(idle)
    t=$( { TIMEFORMAT='%R %U %S'; time "$@" >/dev/null 2>&1; } 2>&1 )
    awk -v l="$label" -v t="$t" -v m="$(( $(ticks "$MP") - m0 ))" \
        -v s="$(( $(ticks "$SP") - s0 ))" -v i="$(( $(idle) - i0 ))" -v hz="$HZ" \
        -v mib="$MIB" -v top="$top" 'BEGIN {
        gib = mib / 1024; split(t, a, " "); m /= hz * gib; s /= hz * gib; i /= hz * gib;
        d = (a[2] + a[3]) / gib;
        rate = 1024 * gib / a[1];
        printf "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n",
            l, rate, rate / top, m, s, d, i, s / (s + m + d) }'
}

# ceiling: sets PUT and GET, the server's MiB/s for 16 parallel 4 MiB objects (GETs cold).
ceiling() {
    local out
    out=$("$B" objbench "http://127.0.0.1:$PORT/bench" --threads 16 --big-objects 64 \
        --small-objects 16 --access-key ak --secret-key sk --drop-caches)
    PUT=$(echo "$out" | awk -F'|' '/put 4 MiB/ {print $6 + 0}')
    GET=$(echo "$out" | awk -F'|' '/get 4 MiB/ {print $6 + 0}')
    if [ "${PUT:-0}" = 0 ] || [ "${GET:-0}" = 0 ]; then
        echo "could not read the ceiling from tidefs objbench:" >&2; echo "$out" >&2; exit 1
    fi
}
# drained DIR: waits (at most a minute) until the bucket directory DIR of the server holds
# less than 8 MiB, so that the deletions a removed file queued do not run into the next
# measurement.
drained() {
    for _ in $(seq 600); do
        [ "$(du -sm "$1" 2>/dev/null | cut -f1)" -lt 8 ] && return
        sleep 0.1
    done
}

echo "| run | MiB/s | of ceiling | mount | server | dd | idle | bound |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for r in $(seq "$RUNS"); do
    ceiling
    echo "| S3 ceiling $r: PUT $PUT, GET $GET | | | | | | | |"
    mount_tidefs --cache-dir "$T/cache"
    measure "tidefs write $r" "$PUT" dd if=/dev/zero of="$T/mnt/f" bs=1M count="$MIB" conv=fsync
    cold tidefs; mount_tidefs --cache-dir "$T/cache"
    measure "tidefs cold read $r" "$GET" dd if="$T/mnt/f" of=/dev/null bs=1M
    cold tidefs; mount_tidefs --cache-dir memory --cache-size 160
    measure "tidefs cold read, memory cache $r" "$GET" dd if="$T/mnt/f" of=/dev/null bs=1M
    rm "$T/mnt/f"; drained "$T/s3/bench"; "$B" umount "$T/mnt"
    if [ -n "$JFS" ]; then
        mount_juicefs
        measure "JuiceFS write $r" "$PUT" dd if=/dev/zero of="$T/jmnt/f" bs=1M count="$MIB" conv=fsync
        cold juicefs; mount_juicefs
        measure "JuiceFS cold read $r" "$GET" dd if="$T/jmnt/f" of=/dev/null bs=1M
        rm "$T/jmnt/f"; drained "$T/s3/jfs"; juicefs umount "$T/jmnt"
    fi
    sleep 2
done
