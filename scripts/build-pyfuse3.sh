#!/bin/sh
# Build pyfuse3 with our patch into a venv (called by install.sh).
#   scripts/build-pyfuse3.sh VENV          build and install unless already there
#   scripts/build-pyfuse3.sh --check VENV  exit 0 if VENV has this patched build
#
# Why: pyfuse3 registers neither FUSE_FALLOCATE nor FUSE_LSEEK, so the kernel
# answers fallocate(2) with EOPNOTSUPP (a loop device over disk.raw then
# passes no discard on) and SEEK_DATA/SEEK_HOLE as if the whole file were
# data. patches/pyfuse3-fallocate-lseek.patch adds both operations in
# pyfuse3's own style (written to be offered upstream), and share_session(),
# which lets several processes serve one read-only mount (its header says how).
#
# The release sdist ships Cython's generated C; it is deleted so that Cython
# regenerates it from the patched .pyx/.pxi (otherwise the patch would not
# reach the compiled module). The installed version carries the patch's hash
# as a local version label (3.5.0+qcowfs.HASH), so a changed patch rebuilds
# and an unchanged one is kept: idempotent.
set -eu
cd "$(dirname "$0")/.."

PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PATCH=$PWD/patches/pyfuse3-fallocate-lseek.patch

check=0
if [ "${1:-}" = --check ]; then check=1; shift; fi
VENV=${1:?usage: build-pyfuse3.sh [--check] VENV}
PY=$VENV/bin/python

hash=$(sha256sum "$PATCH" | cut -c1-12)
want="$PYFUSE3_VERSION+qcowfs.$hash"

# The patched build is there: its version names this patch, and both the
# Python API and the compiled handlers (proof the C was regenerated) exist.
installed() {
    "$PY" - "$want" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import pyfuse3
ok = (version("pyfuse3") == sys.argv[1] and hasattr(pyfuse3.Operations, "lseek")
      and hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3, "fuse_lseek_async")
      and hasattr(pyfuse3, "fuse_fallocate_async") and hasattr(pyfuse3, "share_session"))
sys.exit(0 if ok else 1)
EOF
}

if installed; then exit 0; fi
if [ "$check" = 1 ]; then exit 1; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install.sh: building pyfuse3 $want (release sdist + patches/$(basename "$PATCH"))" >&2
# A current pip (a new venv has Debian's); only pyfuse3 itself as source: its
# build tools (Cython, setuptools) come as wheels, not compiled here.
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip download -q --no-binary pyfuse3 --no-deps -d "$work" "pyfuse3==$PYFUSE3_VERSION"
sdist=$work/pyfuse3-$PYFUSE3_VERSION.tar.gz
echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet -
tar -xzf "$sdist" -C "$work"
src=$work/pyfuse3-$PYFUSE3_VERSION
patch -s -p1 -d "$src" < "$PATCH"
rm -f "$src/src/pyfuse3/__init__.c"
# setuptools_scm takes the version from here (the local label marks our build).
SETUPTOOLS_SCM_PRETEND_VERSION=$want "$PY" -m pip install -q --force-reinstall "$src"
if ! installed; then
    echo "install.sh: the patched pyfuse3 did not install as $want" >&2
    exit 1
fi
