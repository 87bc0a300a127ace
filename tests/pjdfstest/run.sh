#!/usr/bin/env bash
# Run the pjdfstest POSIX compliance suite (Rust rewrite, crates.io
# `pjdfstest` 0.2.x) against a directory, normally on a FUSE mount.
#
# Usage: run.sh TARGET_DIR [SECONDARY_DIR]
#
#   TARGET_DIR     directory on the filesystem under test. The tests run in a
#                  fresh 0777 subdirectory of it, which is removed afterwards.
#   SECONDARY_DIR  directory on a *different* filesystem (for the EXDEV tests).
#                  Default: a fresh mktemp -d under /tmp (or /dev/shm if /tmp
#                  is on the same filesystem as TARGET_DIR), removed afterwards.
#
# Must run as root: many tests need root, and the dummy users/groups
# (nobody:nogroup, tests:tests) are created here if missing.
#
# Environment:
#   PJDFSTEST_CONFIG   config file   (default: pjdfstest.toml next to this script)
#   PJDFSTEST_LOG      full log file (default: /tmp/pjdfstest.<date>.<pid>.log)
#   PJDFSTEST_FILTER   space-separated test-name substrings to run (default: all)
#   PJDFSTEST_TIMEOUT  seconds before the whole run is killed (default: 1800)
#   PJDFSTEST_VERSION  version cargo installs if pjdfstest is missing (default: =0.2.2)
#
# Prints the failing tests, then exactly one line:
#   pjdfstest: N passed, N failed, N skipped
# and exits non-zero if any test failed or the suite did not complete.
set -euo pipefail

usage() { echo "usage: $0 TARGET_DIR [SECONDARY_DIR]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
case "$1" in -h|--help) usage ;; esac

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=${PJDFSTEST_CONFIG:-$script_dir/pjdfstest.toml}
log=${PJDFSTEST_LOG:-/tmp/pjdfstest.$(date +%Y%m%d-%H%M%S).$$.log}
timeout_s=${PJDFSTEST_TIMEOUT:-1800}
version=${PJDFSTEST_VERSION:-=0.2.2}

target=$1
[[ -d $target ]] || { echo "run.sh: $target: not a directory" >&2; exit 2; }
target=$(cd "$target" && pwd -P)
[[ -f $config ]] || { echo "run.sh: $config: config not found" >&2; exit 2; }
config=$(cd "$(dirname "$config")" && pwd -P)/$(basename "$config")

if [[ $(id -u) -ne 0 ]]; then
    echo "run.sh: must run as root" >&2
    exit 2
fi

# --- dummy users/groups (idempotent) ---------------------------------------
ensure_group() { getent group "$1" >/dev/null || groupadd "$@"; }
ensure_user() {
    local user=$1 group=$2
    if ! getent passwd "$user" >/dev/null; then
        useradd -r -g "$group" -d /nonexistent -M -s /usr/sbin/nologin \
            -c "pjdfstest dummy user" "$user"
    fi
    # pjdfstest requires the user's primary gid to be the paired group's gid.
    if [[ $(id -g "$user") != $(getent group "$group" | cut -d: -f3) ]]; then
        echo "run.sh: primary group of $user is not $group (fix it or edit $config)" >&2
        exit 2
    fi
}
if getent group 65534 >/dev/null; then ensure_group nogroup; else ensure_group nogroup -g 65534; fi
if ! getent passwd nobody >/dev/null && ! getent passwd 65534 >/dev/null; then
    useradd -u 65534 -g nogroup -d /nonexistent -M -s /usr/sbin/nologin nobody
fi
ensure_user nobody nogroup
ensure_group tests
ensure_user tests tests

# --- pjdfstest binary ---------------------------------------------------------
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v pjdfstest >/dev/null; then
    echo "run.sh: installing pjdfstest $version with cargo (one job)..." >&2
    # The exacl dependency links against libacl.so (Debian: libacl1-dev).
    if command -v dpkg >/dev/null && ! dpkg -s libacl1-dev >/dev/null 2>&1; then
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libacl1-dev >&2
    fi
    export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
    nice -n 19 cargo install pjdfstest --version "$version" --locked >&2 ||
        nice -n 19 cargo install pjdfstest --version "$version" >&2
fi

# --- directories ------------------------------------------------------------
workdir=""
secondary_tmp=""
cleanup() {
    [[ -n $workdir ]] && rm -rf -- "$workdir"
    [[ -n $secondary_tmp ]] && rm -rf -- "$secondary_tmp"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

workdir=$(mktemp -d "$target/pjdfstest.XXXXXX")
chmod 0777 "$workdir"
# The unprivileged dummy users must be able to reach the work directory.
if ! runuser -u nobody -- test -x "$workdir"; then
    echo "run.sh: $target not searchable by nobody; chmod a+x $target" >&2
    chmod a+x "$target"
    runuser -u nobody -- test -x "$workdir" || {
        echo "run.sh: a parent of $target is not searchable by other users" >&2
        exit 2
    }
fi

if [[ $# -ge 2 ]]; then
    secondary=$2
    [[ -d $secondary ]] || { echo "run.sh: $secondary: not a directory" >&2; exit 2; }
    secondary=$(cd "$secondary" && pwd -P)
else
    secondary_tmp=$(mktemp -d /tmp/pjdfstest-secondary.XXXXXX)
    if [[ $(stat -c %d "$secondary_tmp") == "$(stat -c %d "$workdir")" && -d /dev/shm ]]; then
        rmdir "$secondary_tmp"
        secondary_tmp=$(mktemp -d /dev/shm/pjdfstest-secondary.XXXXXX)
    fi
    secondary=$secondary_tmp
fi
case "$secondary/" in "$target"/*)
    echo "run.sh: secondary dir $secondary must not be inside $target" >&2; exit 2 ;;
esac
if [[ $(stat -c %d "$secondary") == "$(stat -c %d "$workdir")" ]]; then
    echo "run.sh: warning: $secondary is on the same filesystem as $target; the EXDEV tests will fail" >&2
fi

# --- run ----------------------------------------------------------------------
read -r -a filter <<<"${PJDFSTEST_FILTER:-}"
echo "run.sh: pjdfstest $(pjdfstest --version | awk '{print $2}') on $workdir" \
     "(secondary $secondary, config $config), log: $log" >&2
start=$(date +%s)
rc=0
{
    echo "# $(date -Is) pjdfstest -c $config -p $workdir -s $secondary ${filter[*]}"
    NO_COLOR=1 timeout -k 10 "$timeout_s" \
        pjdfstest -c "$config" -p "$workdir" -s "$secondary" "${filter[@]}" 2>&1 || rc=$?
    echo "# exit status $rc, $(( $(date +%s) - start ))s"
} | sed -u 's/\x1b\[[0-9;]*m//g' >"$log"
rc=$(sed -n 's/^# exit status \([0-9]*\),.*/\1/p' "$log")
elapsed=$(( $(date +%s) - start ))

# Failing tests, with their panic messages (indented lines after them).
awk '/ (FAILED|PASSED UNEXPECTEDLY)$/ {p=1; print; next} /^[^ \t]/ {p=0} p && /^\t/ {print}' "$log"

# "Summary: F failed, S skipped, P passed, E expected failures, T total"
summary=$(grep -E '^Summary: [0-9]+ failed, [0-9]+ skipped, [0-9]+ passed' "$log" | tail -n1 || true)
if [[ -z $summary ]]; then
    [[ $rc == 124 ]] && echo "run.sh: pjdfstest timed out after ${timeout_s}s" >&2
    echo "run.sh: pjdfstest did not complete (exit status $rc); see $log" >&2
    tail -n 20 "$log" >&2
    echo "pjdfstest: 0 passed, 1 failed, 0 skipped"
    exit 1
fi
read -r failed skipped passed expected < <(sed -E \
    's/^Summary: ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed, ([0-9]+) expected.*/\1 \2 \3 \4/' <<<"$summary")
echo "run.sh: ${elapsed}s, $expected expected failure(s), log: $log" >&2
echo "pjdfstest: $passed passed, $failed failed, $skipped skipped"
if [[ $failed -ne 0 || $rc -ne 0 ]]; then
    exit 1
fi
