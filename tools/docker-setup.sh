#!/usr/bin/env bash
# Makes a working Docker engine for tools/docker-test.sh (run by tools/test.sh), as root:
#  1. installs Debian's docker.io and debootstrap (tools/install-deps.sh --docker);
#  2. starts dockerd with the vfs storage driver when no daemon answers (overlayfs inside a
#     container or VM often does not work; vfs always does, at the cost of disk and copy time);
#  3. makes sure the Dockerfile's base images debian:bookworm and debian:bookworm-slim exist:
#     `docker pull` first (short timeout), and where no registry answers, a minbase Debian 12
#     made by debootstrap from Debian's archive, `docker import`ed under both tags, so the
#     Dockerfile itself stays conventional.
# Exits 0 when `docker info` answers and both base images are present; prints why otherwise.
# DOCKER_SETUP_NO_INSTALL=1 skips step 1 (the packages are known to be there).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "docker-setup: $*"; }

if [ "${DOCKER_SETUP_NO_INSTALL:-0}" != 1 ]; then
  "$root/tools/install-deps.sh" --docker
fi

if ! timeout 20 docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { log "no dockerd on the PATH"; exit 1; }
  daemon_log=/var/log/expertmesh-dockerd.log
  log "starting dockerd (storage driver vfs), log in $daemon_log"
  # setsid: the daemon outlives this script and the test that called it.
  setsid dockerd --storage-driver vfs >"$daemon_log" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && break
    sleep 1
  done
  timeout 20 docker info >/dev/null 2>&1 || { log "dockerd did not come up:"; tail -20 "$daemon_log"; exit 1; }
fi
log "docker engine $(docker version --format '{{.Server.Version}}') ($(docker info --format '{{.Driver}}'))"

need=()
for tag in debian:bookworm debian:bookworm-slim; do
  docker image inspect "$tag" >/dev/null 2>&1 && continue
  if timeout "${DOCKER_PULL_TIMEOUT:-60}" docker pull -q "$tag" >/dev/null 2>&1; then
    log "pulled $tag"
  else
    need+=("$tag")
  fi
done
if ((${#need[@]})); then
  log "no registry gave ${need[*]}: building a minbase Debian 12 with debootstrap"
  rootfs=$(mktemp -d /var/tmp/em-bookworm.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  # mktemp -d makes the directory 0700, and tar carries "."'s mode into the image as the mode
  # of "/": every non-root user (the image runs as 10001) would find no executable at all.
  chmod 0755 "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
    >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  # What the official images drop too: package lists and caches.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  # The environment the official images set (docker import sets none, not even PATH).
  image=$(tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["bash"]' - "${need[0]}")
  for tag in "${need[@]:1}"; do docker tag "$image" "$tag"; done
  log "imported ${need[*]} from debootstrap"
fi
