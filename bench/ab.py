#!/usr/bin/env python3
"""A/B of two tidefs builds under dbench, for changes too small to show through suites.py.

dbench's MB/s swings 10-30% between runs on a shared 2-core machine, and much of the swing
comes from the S3 server, not the filesystem: s3s-fs keeps each object in a file of its own,
and on the host's ext4 its CPU per PUT varies from run to run (see bench/RESULTS-s3.md).
This script takes that out: the server keeps its data on tmpfs (`--server-dir`, /dev/shm by
default), each run gets a fresh SQLite volume and bucket, the builds alternate (the order
rotates every round), and besides dbench's own figures it reports what costs CPU:

* ops: dbench operations done in the run (its MB/s follows them);
* mount CPU-s and µs of mount CPU per operation (the fairest figure while the mount is the
  bottleneck, as it is under dbench here);
* server CPU-s and PUTs (from the mount's /stats): fewer objects cost both sides less.

    sudo bench/ab.py A_BINARY B_BINARY [--rounds 3] [--seconds 30] [--clients 4]
                     [--server-dir DIR] [--mount-args "--threads 8"]

Needs root, dbench (Debian) and s3s-fs (cargo install s3s-fs --features binary). Everything
it starts is stopped by PID and everything it writes is deleted.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the shared helpers of the main benchmark)

OP_LINE = re.compile(r"^\s*([A-Z][A-Za-z_]+)\s+(\d+)\s+[\d.]+\s+[\d.]+\s*$")


def cpu_seconds(pid):
    """User plus system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5), counted from the state (field 3) here.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fmt(value):
    """A figure as the tables show it: whole above 1,000, one decimal below."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.1f}"


def one_run(binary, args, server, label, round_no):
    """Figures of one dbench run on a fresh volume mounted by `binary`."""
    tmp = tempfile.mkdtemp(prefix="tidefs-ab-")
    mnt, cache = os.path.join(tmp, "mnt"), os.path.join(tmp, "cache")
    os.makedirs(mnt)
    url = f"sqlite3://{tmp}/meta.db"
    metrics = f"127.0.0.1:{compare.free_port()}"
    proc = None
    try:
        compare.run([binary, "format", url, "bench-ab", "--storage", "s3", "--bucket",
                     server.bucket(f"{label}-{round_no}"), "--access-key", compare.S3_KEYS[0],
                     "--secret-key", compare.S3_KEYS[1], "--store-secret"])
        proc = subprocess.Popen(
            [binary, "mount", url, mnt, "--cache-dir", cache, "--cache-size", "1024",
             "--metrics", metrics, *shlex.split(args.mount_args)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        compare.wait_mounted(mnt, proc)
        work = os.path.join(mnt, "dbench")
        os.makedirs(work)
        out = compare.run(["dbench", "-D", work, "-t", str(args.seconds),
                           str(args.clients)]).stdout
        ops = sum(int(m.group(2)) for m in map(OP_LINE.match, out.splitlines()) if m)
        mbs = float(re.search(r"Throughput ([0-9.]+) MB/sec", out).group(1))
        with urllib.request.urlopen(f"http://{metrics}/stats", timeout=10) as r:
            puts = json.load(r)["object_store"]["put"]["requests"]
        mount_cpu = cpu_seconds(proc.pid)
        return {"MB/s": mbs, "ops": ops, "mount CPU-s": mount_cpu,
                "mount µs/op": mount_cpu / max(ops, 1) * 1e6,
                "server CPU-s": cpu_seconds(server.proc.pid), "PUTs": puts}
    finally:
        if proc is not None:
            subprocess.run([binary, "umount", mnt], capture_output=True)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="the first tidefs binary (the baseline)")
    ap.add_argument("b", help="the second tidefs binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=30, help="dbench run time")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--server-dir", default="/dev/shm",
                    help="where the S3 server keeps its objects (a new directory inside)")
    ap.add_argument("--mount-args", default="", help="extra `tidefs mount` options for both")
    ap.add_argument("--s3s-fs", default=shutil.which("s3s-fs")
                    or os.path.expanduser("~/.cargo/bin/s3s-fs"))
    args = ap.parse_args()
    builds = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    runs = {"A": [], "B": []}
    for round_no in range(args.rounds):
        order = ["A", "B"] if round_no % 2 == 0 else ["B", "A"]
        for label in order:
            # A server of its own per run: its CPU is the run's alone, its files go with it.
            root = tempfile.mkdtemp(prefix="tidefs-ab-s3-", dir=args.server_dir)
            server = compare.S3Server(os.path.join(root, "data"), args.s3s_fs)
            try:
                figures = one_run(builds[label], args, server, label.lower(), round_no)
            finally:
                server.stop()
                shutil.rmtree(root, ignore_errors=True)
            runs[label].append(figures)
            print(f"round {round_no + 1} {label}: " + ", ".join(
                f"{k} {fmt(v)}" for k, v in figures.items()), flush=True)
    print(f"\nmedians of {args.rounds} rounds (A = {args.a}, B = {args.b}):\n")
    print("| figure | A | B | B / A |\n|---|---:|---:|---:|")
    for key in runs["A"][0]:
        a = statistics.median(r[key] for r in runs["A"])
        b = statistics.median(r[key] for r in runs["B"])
        print(f"| {key} | {fmt(a)} | {fmt(b)} | {b / a if a else float('nan'):.3f} |")


if __name__ == "__main__":
    main()
