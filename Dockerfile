# qcowfs in a container, installed by the same script as `make install`/CI.
#
#   docker build -t qcowfs .                      # runtime only
#   docker build -t qcowfs-test --build-arg INSTALL_ARGS=--test .
#
# FUSE needs the device and CAP_SYS_ADMIN; mount in the foreground and share
# the mount with the host through a shared bind mount:
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN \
#       --security-opt apparmor=unconfined \
#       -v /var/lib/images:/images \
#       --mount type=bind,source=/mnt/img,target=/mnt/img,bind-propagation=rshared \
#       qcowfs mount --foreground -o ro,allow_other /images/disk.qcow2 /mnt/img
FROM debian:12

# scripts/install.sh --test adds what the test suite needs.
ARG INSTALL_ARGS=

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/qcowfs
COPY . .
RUN scripts/install.sh $INSTALL_ARGS \
 && rm -rf /var/lib/apt/lists/* /root/.cache/pip \
 && ln -sf /opt/qcowfs/.venv/bin/qcowfs /usr/local/bin/qcowfs

ENTRYPOINT ["/usr/local/bin/qcowfs"]
CMD ["--help"]
