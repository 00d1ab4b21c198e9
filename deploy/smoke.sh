#!/usr/bin/env bash
# End-to-end check of the container deployment on this machine, with no
# registry: builds the images locally (debootstrapped Debian base, host-built
# binary, host Prometheus binary), runs coordinator + 3 nodes + Prometheus with
# docker-compose on synthetic data, checks the final accuracy line and that
# Prometheus scraped all three nodes through Docker DNS; then runs again and
# `docker kill`s a node mid-run: training must finish with the survivors,
# every sample of every epoch still used; then runs the `sharded` profile (two
# shard aggregators, nodes exchanging gradients and weights with them) and
# checks that it trains and that Prometheus scraped both aggregators. Tears
# everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker >/dev/null || { echo "smoke: no docker" >&2; exit 1; }
COMPOSE=${COMPOSE:-docker-compose}
BIN=${GRADCAST_BIN:-target/release/gradcast}
. deploy/smoke-lib.sh

work=$(mktemp -d)
chmod 755 "$work"
project="gradcastsmoke$$"
compose() { $COMPOSE -f deploy/docker-compose.yml -p "$project" "$@"; }
cleanup() {
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; compose logs --no-color --tail 40 >&2 || true; exit 1; }

echo "== images"
deploy/images.sh "$BIN"

echo "== data"
smoke_data "$work"
read -r grpc_port prom_port < <(free_ports 2)
export GRADCAST_IMAGE=gradcast:smoke PROMETHEUS_IMAGE=gradcast-prometheus:smoke
export GRADCAST_DATA_DIR="$work/data" GRADCAST_NODES=3 GRADCAST_BATCH_SIZE=32
export GRADCAST_PORT=$grpc_port PROMETHEUS_PORT=$prom_port

# Waits for the coordinator container to exit; prints its exit code.
await_coordinator() {
  local cid
  cid=$(compose ps -q coordinator)
  timeout "${1:-600}" docker wait "$cid" || fail "coordinator still running after ${1:-600} s"
}


echo "== run 1: coordinator + 3 nodes + prometheus"
# Long enough (8 epochs, ~50 s) for DNS discovery (5 s refresh) and scrapes
# (5 s) to reach every node while it trains; checked while the run is on.
GRADCAST_EPOCHS=8 compose up -d --no-build --scale node=3 >/dev/null
nodes_seen=0
for _ in $(seq 120); do
  nodes_seen=$(query "$nodes_seen_query" || echo 0)
  [ "$nodes_seen" -ge 3 ] && break
  sleep 1
done
code=$(await_coordinator 600)
logs=$(compose logs --no-color coordinator)
[ "$code" = 0 ] || fail "coordinator exited with $code"
grep -q 'final val_accuracy: ' <<<"$logs" || fail "no final accuracy line"
echo "$(grep -o 'final val_accuracy: [0-9.]*' <<<"$logs")"
[ "$nodes_seen" -ge 3 ] || nodes_seen=$(query "$nodes_seen_query" || echo 0)
[ "$nodes_seen" -ge 3 ] || fail "Prometheus scraped $nodes_seen of 3 nodes"
# The coordinator has exited by now, so its series are stale: look back in time.
[ "$(query 'count_over_time(gradcast_steps_total{job="gradcast-coordinator"}[10m])')" -ge 1 ] \
  || fail "coordinator not scraped"
echo "prometheus scraped the coordinator and $nodes_seen nodes (Docker DNS discovery)"
compose down -v >/dev/null 2>&1

echo "== run 2: docker kill a node mid-run"
GRADCAST_EPOCHS=3 compose up -d --no-build --scale node=3 >/dev/null
for _ in $(seq 120); do
  # (Captured first: `grep -q` quitting early would break the pipe, and
  # with pipefail that is a failure.)
  started=$(compose logs --no-color coordinator)
  grep -q 'training starts' <<<"$started" && break
  sleep 1
done
sleep 3
victim=$(compose ps -q node | sed -n 1p)
docker kill "$victim" >/dev/null
echo "killed node container ${victim:0:12}"
code=$(await_coordinator 600)
logs=$(compose logs --no-color coordinator)
[ "$code" = 0 ] || fail "coordinator exited with $code after a node was killed"
grep -q 'node removed' <<<"$logs" || fail "the coordinator did not notice the lost node"
epochs=$(grep -c '(2000 samples in' <<<"$logs" || true)
[ "$epochs" = 3 ] || fail "expected 3 epochs of 2000 samples, saw $epochs"
echo "$(grep -o 'final val_accuracy: [0-9.]*' <<<"$logs") after losing a node; every epoch used all 2000 samples"
compose down -v >/dev/null 2>&1

echo "== run 3: shard aggregators (profile sharded)"
export GRADCAST_AGGREGATORS=http://aggregator-0:50061,http://aggregator-1:50061
GRADCAST_EPOCHS=6 compose --profile sharded up -d --no-build --scale node=3 >/dev/null
aggregators_seen=0
agg_query='count by (instance) (count_over_time(gradcast_aggregator_steps_total{job="gradcast-aggregator"}[10m]))'
for _ in $(seq 120); do
  aggregators_seen=$(query "$agg_query" || echo 0)
  [ "$aggregators_seen" -ge 2 ] && break
  sleep 1
done
code=$(await_coordinator 600)
logs=$(compose logs --no-color coordinator)
[ "$code" = 0 ] || fail "coordinator exited with $code with shard aggregators"
grep -q 'aggregator http://aggregator-1:50061 connected' <<<"$logs" || fail "the coordinator did not use the aggregators"
epochs=$(grep -c '(2000 samples in' <<<"$logs" || true)
[ "$epochs" = 6 ] || fail "expected 6 epochs of 2000 samples, saw $epochs"
[ "$aggregators_seen" -ge 2 ] || aggregators_seen=$(query "$agg_query" || echo 0)
[ "$aggregators_seen" -ge 2 ] || fail "Prometheus scraped $aggregators_seen of 2 aggregators"
echo "$(grep -o 'final val_accuracy: [0-9.]*' <<<"$logs") through 2 shard aggregators, both scraped by Prometheus"
echo "PASS: deploy smoke test"
