#!/usr/bin/env bash
# The one command that runs every tidefs test: unit tests, the metadata conformance suite
# (SQLite and Redis), integration tests on real FUSE mounts and pjdfstest, on a local object
# directory, on a real S3 server (s3s-fs on 127.0.0.1) and with metadata in a real
# redis-server on 127.0.0.1. Run as root on Debian: it installs what is missing
# (scripts/install-deps.sh), and the tests mount filesystems.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh: run as root (sudo): the tests mount FUSE filesystems" >&2
    exit 2
fi
scripts/install-deps.sh
cargo build --locked --bins
cargo test --locked --workspace
scripts/pjdfstest.sh
# The trash must not change a single POSIX result (link counts above all).
TIDEFS_TRASH_DAYS=1 scripts/pjdfstest.sh
# The same mounts again with data in S3 (a real S3 server on 127.0.0.1).
TIDEFS_TEST_STORAGE=s3 cargo test --locked --test integration
TIDEFS_TEST_STORAGE=s3 scripts/pjdfstest.sh
# The same mounts again with metadata in Redis (each volume gets its own redis-server).
TIDEFS_TEST_META=redis cargo test --locked --test integration
TIDEFS_TEST_META=redis scripts/pjdfstest.sh
