#!/bin/sh
# One install script for make, CI and the Dockerfile.
#   scripts/install.sh          system packages to run qcowfs + the venv in .venv
#   scripts/install.sh --test   also what the tests and the benchmark need
# Idempotent: packages already present are not fetched again.
set -eu
cd "$(dirname "$0")/.."

RUN_PKGS="fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev"
TEST_PKGS="qemu-utils qemu-system-common libqcow-utils fio e2fsprogs util-linux attr systemd"

want="$RUN_PKGS"
if [ "${1:-}" = "--test" ]; then want="$want $TEST_PKGS"; fi

missing=""
for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
# python3-venv/python3-dev are only needed when python3 is Debian's own.
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: missing packages:$missing (run as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ "${1:-}" = "--test" ]; then stamp=.venv/.installed-test; fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    if [ "${1:-}" = "--test" ]; then
        .venv/bin/pip install -q -e '.[test]'
    else
        .venv/bin/pip install -q -e .
    fi
    touch "$stamp"
fi
