#!/bin/sh
# Build our patched dependencies into a venv (called by install.sh).
#   scripts/build-patched.sh VENV          build and install each one unless already there
#   scripts/build-patched.sh --check VENV  exit 0 if VENV has every patched build
#
# Each is its release sdist (checked against the hash pinned here) with one
# patch of patches/, written in the project's own style to be offered
# upstream; the patch's header says what it changes and why:
#
# - pyfuse3 (patches/pyfuse3-fallocate-lseek.patch): pyfuse3 registers
#   neither FUSE_FALLOCATE nor FUSE_LSEEK, so the kernel answers fallocate(2)
#   with EOPNOTSUPP (a loop device over disk.raw then passes no discard on)
#   and SEEK_DATA/SEEK_HOLE as if the whole file were data; and
#   share_session(), which lets several processes serve one read-only mount.
#   Its sdist ships Cython's generated C, which is deleted so that Cython
#   regenerates it from the patched .pyx/.pxi (otherwise the patch would not
#   reach the compiled module).
# - trio (patches/trio-lazy-tls.patch): TLS and DTLS are imported on first
#   use, so a process that never speaks TLS (every process serving a mount)
#   does not map OpenSSL.
#
# The installed version carries the patch's hash as a local version label
# (VERSION+qcowfs.HASH), so a changed patch rebuilds and an unchanged one is
# kept: idempotent. pyproject.toml pins pyfuse3 to this version (its patch
# adds API that qcowfs uses); trio stays a lower bound there, as a stock trio
# only costs memory, and pip keeps the patched one as satisfying it.
set -eu
cd "$(dirname "$0")/.."

check=0
if [ "${1:-}" = --check ]; then check=1; shift; fi
VENV=${1:?usage: build-patched.sh [--check] VENV}
PY=$VENV/bin/python

# The patched build of $name is there: its version names this patch, and
# the patch's own additions are visible (for pyfuse3: the compiled handlers,
# proof the C was regenerated; for trio: no ssl after `import trio`).
installed() {
    "$PY" - "$name" "$want" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
name, want = sys.argv[1:]
if version(name) != want:
    sys.exit(1)
if name == "pyfuse3":
    import pyfuse3
    ok = (hasattr(pyfuse3.Operations, "lseek") and hasattr(pyfuse3.Operations, "fallocate")
          and hasattr(pyfuse3, "fuse_lseek_async") and hasattr(pyfuse3, "fuse_fallocate_async")
          and hasattr(pyfuse3, "share_session"))
else:
    import trio
    ok = "ssl" not in sys.modules and trio.SSLStream.__module__ == "trio"
sys.exit(0 if ok else 1)
EOF
}

# build NAME VERSION SHA256 PATCH: the release sdist, patched, installed as
# VERSION+qcowfs.HASH (or only checked, with --check).
build() {
    name=$1 version=$2 sha256=$3 patch=$PWD/patches/$4
    hash=$(sha256sum "$patch" | cut -c1-12)
    want="$version+qcowfs.$hash"
    if installed; then return 0; fi
    if [ "$check" = 1 ]; then
        echo "build-patched.sh: $VENV has no $name $want" >&2
        return 1
    fi
    work=$(mktemp -d)
    echo "install.sh: building $name $want (release sdist + patches/$(basename "$patch"))" >&2
    # A current pip (a new venv has Debian's); only the package itself as
    # source: its build tools (Cython, setuptools) come as wheels.
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip download -q --no-binary "$name" --no-deps -d "$work" "$name==$version"
    sdist=$work/$name-$version.tar.gz
    echo "$sha256  $sdist" | sha256sum -c --quiet -
    tar -xzf "$sdist" -C "$work"
    src=$work/$name-$version
    patch -s -p1 -d "$src" < "$patch"
    case $name in
        pyfuse3)
            rm -f "$src/src/pyfuse3/__init__.c"
            # setuptools_scm takes the version from here.
            # (--no-deps: its one dependency, trio, is the patched build above.)
            SETUPTOOLS_SCM_PRETEND_VERSION=$want "$PY" -m pip install -q --force-reinstall --no-deps "$src" ;;
        trio)
            # setuptools reads the version from trio._version.
            # (Its dependencies come as wheels, if missing.)
            printf '__version__ = "%s"\n' "$want" > "$src/src/trio/_version.py"
            "$PY" -m pip install -q "$src" ;;
    esac
    rm -rf "$work"
    if ! installed; then
        echo "install.sh: the patched $name did not install as $want" >&2
        return 1
    fi
}

# trio first: pyfuse3 imports it.
build trio 0.35.0 7efb295c78a0ecd1235c5759e620b5da564ca80d2efcb0055423588547248b96 trio-lazy-tls.patch
build pyfuse3 3.5.0 88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24 pyfuse3-fallocate-lseek.patch
