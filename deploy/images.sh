#!/usr/bin/env bash
# Builds the smoke tests' images on this machine without a registry: a
# debootstrapped Debian base, gradcast:smoke from a host-built binary and
# gradcast-prometheus:smoke from the host's Prometheus binary (installed from
# Debian's packages if missing). Used by smoke.sh and swarm-smoke.sh.
#
#   deploy/images.sh [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-${GRADCAST_BIN:-target/release/gradcast}}
[ -x "$BIN" ] || cargo build --release --bin gradcast
BASE=${BASE_IMAGE:-gradcast/debian:bookworm}
BASE_TAG=$BASE deploy/base-images.sh
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/gradcast" "$ctx/prometheus"
cp "$BIN" "$ctx/gradcast/gradcast"
DOCKER_BUILDKIT=0 docker build -q -f deploy/Dockerfile --target prebuilt --build-arg BASE_IMAGE="$BASE" \
  -t gradcast:smoke "$ctx/gradcast" >/dev/null
if ! command -v prometheus >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
cp "$(command -v prometheus)" "$ctx/prometheus/prometheus"
DOCKER_BUILDKIT=0 docker build -q -f deploy/prometheus.Dockerfile --build-arg BASE_IMAGE="$BASE" \
  -t gradcast-prometheus:smoke "$ctx/prometheus" >/dev/null
docker run --rm gradcast:smoke --version
