#!/usr/bin/env bash
# Creates the local base image the gradcast images build on, without any
# container registry: debootstrap a minimal Debian into a folder (packages come
# from Debian's own mirror) and `docker import` it.
#
#   deploy/base-images.sh            # -> image gradcast/debian:bookworm
#   BASE_TAG=my/debian:12 deploy/base-images.sh
#
# With registry access you do not need this: the Dockerfile defaults to
# debian:bookworm-slim.
set -euo pipefail
TAG=${BASE_TAG:-gradcast/debian:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG exists"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  else
    echo "debootstrap is needed (Debian package 'debootstrap')" >&2; exit 1
  fi
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE into $root (a few minutes)"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >/dev/null
# Keep the image small: no apt lists, docs or caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "created base image $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)"
