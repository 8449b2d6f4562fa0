#!/bin/sh
# One install script for make, CI and the Dockerfile.
#   scripts/install.sh            system packages to run qcowfs + the venv in .venv
#   scripts/install.sh --test     also what the tests and the benchmark need
#   scripts/install.sh --system [--prefix DIR]
#                                 also the system entry point DIR/bin/qcowfs (default
#                                 /usr/local), a symlink to .venv/bin/qcowfs: `qcowfs` by
#                                 name for every user, and what mount(8) needs for
#                                 `mount -t fuse.qcowfs` (mount.fuse3 runs `qcowfs` from
#                                 the default PATH, which has /usr/local/bin); the manual
#                                 page DIR/share/man/man1/qcowfs.1 (`man qcowfs`) and the
#                                 bash completion DIR/share/bash-completion/completions/qcowfs
#                                 (with man-db and bash-completion, installed if missing)
#   scripts/install.sh --uninstall [--prefix DIR]
#                                 remove what --system installed (if it is ours)
#   scripts/install.sh --venv-status
#                                 say whether .venv is current or would be rebuilt; change nothing
# Idempotent: packages already present are not fetched again, a venv that is
# up to date is kept.
#
# The venv is built on Debian's /usr/bin/python3 (PYTHON=... to choose another),
# never on whatever python3 comes first on PATH: a python under /root (pyenv,
# mode 0700) would make qcowfs unusable for every other user and for systemd
# units with User=. A venv made from another python is rebuilt.
set -eu
cd "$(dirname "$0")/.."
REPO=$PWD

test_deps=0 system=0 uninstall=0 status=0 prefix=/usr/local
while [ $# -gt 0 ]; do
    case "$1" in
        --test) test_deps=1 ;;
        --system) system=1 ;;
        --uninstall) uninstall=1 ;;
        --venv-status) status=1 ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) prefix=${1#--prefix=} ;;
        *) echo "install.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done
entry="$prefix/bin/qcowfs"
# The manual page and the completion: copies of man/qcowfs.1 and completion/qcowfs.bash
# (made from the parser by scripts/generate.py; `make man`).
manpage="$prefix/share/man/man1/qcowfs.1"
completion="$prefix/share/bash-completion/completions/qcowfs"

if [ "$uninstall" = 1 ]; then
    if [ -L "$entry" ] && [ "$(readlink "$entry")" = "$REPO/.venv/bin/qcowfs" ]; then
        rm -f "$entry"
        echo "removed $entry"
    fi
    for f in "$manpage:man/qcowfs.1" "$completion:completion/qcowfs.bash"; do
        if [ -f "${f%%:*}" ] && cmp -s "${f%%:*}" "${f#*:}"; then
            rm -f "${f%%:*}"
            echo "removed ${f%%:*}"
        fi
    done
    exit 0
fi

PY=${PYTHON:-/usr/bin/python3}

# Why .venv cannot stay, or nothing. .venv/bin/python is a symlink to the
# python the venv was made from, and pyvenv.cfg's `home` is that python's
# directory: another python than $PY means rebuild.
venv_stale() {
    [ -e .venv/pyvenv.cfg ] || { [ -e .venv ] && echo "no .venv/pyvenv.cfg"; return 0; }
    want_py=$(readlink -f "$PY")
    have_py=$(readlink -f .venv/bin/python 2>/dev/null || true)
    home=$(sed -n 's/^home *= *//p' .venv/pyvenv.cfg)
    home=$(readlink -f "$home" 2>/dev/null || echo "$home")
    if [ "$have_py" != "$want_py" ] || { [ "$home" != "$(dirname "$want_py")" ] &&
                                         [ "$home" != "$(readlink -f "$(dirname "$PY")")" ]; }; then
        echo "made from ${have_py:-$home}, not $want_py"
    fi
}

if [ "$status" = 1 ]; then
    why=$(venv_stale)
    if [ -n "$why" ]; then echo "rebuild: $why"; elif [ -x .venv/bin/python ]; then echo current; else echo missing; fi
    exit 0
fi

RUN_PKGS="fuse3 libfuse3-dev pkg-config gcc patch python3 python3-venv python3-dev"
TEST_PKGS="qemu-utils qemu-system-common libqcow-utils fio e2fsprogs util-linux attr systemd libnbd-bin fdisk fuse2fs"

# `man qcowfs` and completion by TAB need these (minimal Debian images lack them).
SYSTEM_PKGS="man-db bash-completion"

want="$RUN_PKGS"
if [ "$test_deps" = 1 ]; then want="$want $TEST_PKGS"; fi
if [ "$system" = 1 ]; then want="$want $SYSTEM_PKGS"; fi

missing=""
for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: missing packages:$missing (run as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x "$PY" ]; then
    echo "install.sh: $PY not found (PYTHON=... names another python)" >&2
    exit 1
fi
why=$(venv_stale)
if [ -n "$why" ]; then
    echo "install.sh: .venv was $why: rebuilding it" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    rm -rf .venv
    "$PY" -m venv .venv
fi
# pyfuse3 and trio with our patches first (see scripts/build-patched.sh),
# so that pip finds them already installed and keeps them.
sh scripts/build-patched.sh .venv
# Up to date: the stamp of this kind of install (or of the test install,
# which includes it) is newer than pyproject.toml and this script.
fresh() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ] && [ ! scripts/install.sh -nt "$1" ]; }
# The editable install puts the repository on sys.path with a plain .pth line
# (setuptools' "compat" mode): the default mode's import hook imports pathlib
# and its finder at every start of python, some 8 ms of every command
# (docs/speed.md). A setuptools without that mode gets the default one.
editable() {
    .venv/bin/pip install -q "$@" --config-settings editable_mode=compat 2>/dev/null ||
        .venv/bin/pip install -q "$@"
}
if [ "$test_deps" = 1 ]; then
    fresh .venv/.installed-test || {
        .venv/bin/pip install -q --upgrade pip
        editable -e '.[test]'
        touch .venv/.installed-test
    }
else
    fresh .venv/.installed || fresh .venv/.installed-test || {
        .venv/bin/pip install -q --upgrade pip
        editable -e .
        touch .venv/.installed
    }
fi
# The package's bytecode, as pip writes it for a normal install: an editable
# one leaves it to the first import, which never writes it where
# PYTHONDONTWRITEBYTECODE=1 is set (CI's environment, the development
# machine's), so every command and every mount compiled each module changed
# since, again (up to 1.5 MiB of a daemon's peak memory for one module, and
# time). Fresh files are only looked at.
.venv/bin/python -m compileall -q qcowfs >/dev/null

if [ "$system" = 1 ]; then
    if [ -e "$entry" ] && [ ! -L "$entry" ]; then
        echo "install.sh: $entry exists and is not a symlink: remove it first" >&2
        exit 1
    fi
    if ! mkdir -p "$prefix/bin" 2>/dev/null || ! ln -sfn "$REPO/.venv/bin/qcowfs" "$entry" 2>/dev/null; then
        echo "install.sh: cannot write $entry (run as root)" >&2
        exit 1
    fi
    echo "installed $entry -> $REPO/.venv/bin/qcowfs"
    if ! install -D -m 0644 man/qcowfs.1 "$manpage" ||
       ! install -D -m 0644 completion/qcowfs.bash "$completion"; then
        echo "install.sh: cannot write $manpage or $completion (run as root)" >&2
        exit 1
    fi
    echo "installed $manpage (man qcowfs) and $completion"
fi
