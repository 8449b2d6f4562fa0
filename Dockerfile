# qcowfs in a container, installed by the same script as `make install`/CI.
#
#   docker build -t qcowfs .                      # runtime only
#   docker build -t qcowfs-test --build-arg INSTALL_ARGS=--test .
#   scripts/container-check.sh                    # podman, on a local debootstrap base
#
# Two stages: `build` has the compiler and headers pyfuse3 needs and builds
# the venv; the final image gets the venv and the sources, and only what they
# need to run (python3, fuse3), no gcc, no -dev packages.
#
# FUSE needs the device and CAP_SYS_ADMIN; mount in the foreground and share
# the mount with the host through a shared bind mount:
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN \
#       --security-opt apparmor=unconfined \
#       -v /var/lib/images:/images \
#       --mount type=bind,source=/mnt/img,target=/mnt/img,bind-propagation=rshared \
#       qcowfs mount --foreground -o ro,allow_other /images/disk.qcow2 /mnt/img
FROM debian:12 AS build

# scripts/install.sh --test adds what the test suite needs.
ARG INSTALL_ARGS=

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/qcowfs
COPY . .
RUN scripts/install.sh $INSTALL_ARGS \
 && rm -rf /var/lib/apt/lists/* /root/.cache/pip build \
 && find .venv -name __pycache__ -prune -exec rm -rf {} +

FROM debian:12

# Run-time only: the venv's python is Debian's /usr/bin/python3; pyfuse3 needs
# libfuse3 (fuse3 brings it, and fusermount3). A --test image gets what the
# tests need too (install.sh --test: qemu-utils... and the build tools).
ARG INSTALL_ARGS=
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 fuse3 \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/qcowfs /opt/qcowfs
RUN ln -s /opt/qcowfs/.venv/bin/qcowfs /usr/local/bin/qcowfs \
 && if [ -n "$INSTALL_ARGS" ]; then /opt/qcowfs/scripts/install.sh $INSTALL_ARGS \
      && rm -rf /var/lib/apt/lists/*; fi \
 && qcowfs --version

ENTRYPOINT ["/usr/local/bin/qcowfs"]
CMD ["--help"]
