#!/bin/sh
# Build the Dockerfile with podman on a local Debian 12 base made with
# debootstrap (no container registry needed), then, inside the image, run
# `qcowfs --version`, check that no compiler or headers are left, and mount a
# sample image read-only and read it (as far as the host allows FUSE in a
# container). Run by hand, as root; not part of `make test`.
#
#   scripts/container-check.sh          # WORK=/var/tmp/qcowfs-container-check by default
#   KEEP=1 scripts/container-check.sh   # keep the built images afterwards
#
# The Debian mirror is the host's own (the first URIs:/deb line of its apt
# sources), MIRROR=... to choose another. Exit 0 when everything that could be
# tried worked; the last lines say what was tried.
set -eu
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/qcowfs-container-check}
BASE=docker.io/library/debian:12   # what `FROM debian:12` resolves to, made locally
IMAGE=localhost/qcowfs:check

say() { printf '== %s\n' "$*"; }
fail() { printf 'container-check: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, podman with /dev/fuse)"
missing=""
for p in podman debootstrap qemu-utils runc; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

host_mirror() {
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *\([^ ]*\).*/\1/p'
      cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
          sed -n 's/^deb  *\(\[[^]]*\] *\)\{0,1\}\([^ ]*\) .*/\2/p'; } | grep -v security | head -1
}
MIRROR=${MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || fail "no Debian mirror found in the host's apt sources (MIRROR=...)"
mkdir -p "$WORK"

if podman image exists "$BASE"; then
    say "base image $BASE already there"
else
    say "debootstrap bookworm (minbase) from the host's mirror"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        fail "debootstrap failed, see $WORK/debootstrap.log"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    say "podman import -> $BASE"
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# How this host lets podman run a container at all: as it comes, or (hosts
# with hybrid cgroups, where crun refuses, and limits a container may not
# raise) with runc and modest ulimits.
OPTS=""
for try in "" "--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"; do
    # shellcheck disable=SC2086
    if podman run --rm --network=none $try "$BASE" true >"$WORK/probe.log" 2>&1; then
        OPTS=$try
        break
    fi
    OPTS=none
done
[ "$OPTS" != none ] || fail "podman cannot run a container here: $(tail -1 "$WORK/probe.log")"
say "podman runs containers here${OPTS:+ with $OPTS}"

# A host whose pip trusts an extra CA (PIP_CERT, or cert= in /etc/pip.conf:
# a TLS-inspecting proxy) lends it to the build's RUN steps, not to the image.
BUILD_VOLS=""
ca=${PIP_CERT:-$(sed -n 's/^ *cert *= *//p' /etc/pip.conf 2>/dev/null | head -1)}
if [ -n "$ca" ] && [ -f "$ca" ]; then
    printf '[global]\ncert = /etc/ssl/host-pip-ca.crt\n' >"$WORK/pip.conf"
    BUILD_VOLS="-v $ca:/etc/ssl/host-pip-ca.crt:ro -v $WORK/pip.conf:/etc/pip.conf:ro"
    say "the build uses the host's pip CA bundle ($ca)"
fi

say "podman build (multi-stage) -> $IMAGE"
start=$(date +%s)
# shellcheck disable=SC2086
podman build $OPTS $BUILD_VOLS --pull=never --layers=false --network=host -t "$IMAGE" . >"$WORK/build.log" 2>&1 ||
    fail "podman build failed, see $WORK/build.log (last line: $(tail -1 "$WORK/build.log"))"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built in $(( $(date +%s) - start ))s, $(( size / 1000000 )) MB"

say "qcowfs --version in the image"
# shellcheck disable=SC2086
version=$(podman run $OPTS --rm --network=none "$IMAGE" --version)
echo "$version"

say "no compiler or headers in the final image"
# shellcheck disable=SC2086
podman run $OPTS --rm --network=none --entrypoint sh "$IMAGE" -c \
    'for x in gcc cc x86_64-linux-gnu-gcc; do command -v $x && exit 1; done;
     [ ! -e /usr/include/fuse3 ] && [ ! -e /usr/include/python3.11/Python.h ]' ||
    fail "the final image has a compiler or headers"

say "read-only mount of a sample image inside the container"
rm -rf "$WORK/images"
mkdir -p "$WORK/images"
qemu-img create -q -f qcow2 "$WORK/images/sample.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' "$WORK/images/sample.qcow2" >/dev/null
mount_result="not tried"
if [ ! -c /dev/fuse ]; then
    mount_result="skipped: the host has no /dev/fuse"
# shellcheck disable=SC2086
elif out=$(podman run $OPTS --rm --network=none --device /dev/fuse --cap-add SYS_ADMIN \
        --security-opt apparmor=unconfined --security-opt label=disable \
        -v "$WORK/images:/images:ro" --entrypoint sh "$IMAGE" -c '
            set -e
            mkdir -p /mnt/img
            qcowfs mount -o ro /images/sample.qcow2 /mnt/img
            ls /mnt/img
            head -c 1048576 /mnt/img/disk.raw | od -A n -t x1 | head -1
            qcowfs umount /mnt/img' 2>&1); then
    echo "$out"
    case "$out" in
        *"5a 5a 5a 5a"*) mount_result="ok (disk.raw read back)" ;;
        *) fail "the mount inside the container read the wrong bytes: $out" ;;
    esac
else
    mount_result="failed here: $(echo "$out" | tail -1)"
fi
echo "$mount_result"

if [ -z "${KEEP:-}" ]; then
    podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
fi
say "result: $version; image $(( size / 1000000 )) MB, no compiler/headers; read-only mount: $mount_result"
case "$mount_result" in ok*|skipped*) exit 0 ;; *) exit 1 ;; esac
