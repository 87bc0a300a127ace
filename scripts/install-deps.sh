#!/usr/bin/env bash
# Installs what building and testing tidefs needs on Debian, if missing (run as root):
# fuse3 (fusermount3 for unprivileged mounts), libacl1-dev (pjdfstest links libacl),
# python3 (a lock test probes with it), redis-server (the Redis engine's tests start their own
# instances on 127.0.0.1), /dev/fuse usable by every user, and s3s-fs (the S3 server the tests
# run on 127.0.0.1).
set -euo pipefail
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
dpkg -s libacl1-dev >/dev/null 2>&1 || need+=(libacl1-dev)
command -v python3 >/dev/null || need+=(python3)
command -v runuser >/dev/null || need+=(util-linux)
command -v redis-server >/dev/null || need+=(redis-server)
if ((${#need[@]})); then
    echo "install-deps: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    # The package starts a system-wide server where it can; the tests start their own, and
    # none may stay running.
    if [[ " ${need[*]} " == *" redis-server "* ]]; then
        service redis-server stop >/dev/null 2>&1 || true
    fi
fi
if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || mknod -m 0666 /dev/fuse c 10 229
fi
# Stock Debian makes /dev/fuse 0666 so users can mount (fusermount3); some containers make it
# 0600. The tests mount as an unprivileged user too.
chmod 0666 /dev/fuse

export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v s3s-fs >/dev/null; then
    echo "install-deps: installing s3s-fs (the S3 test server) with cargo" >&2
    cargo install s3s-fs --version 0.14.1 --features binary --locked >&2
fi
