#!/usr/bin/env bash
# Docker Swarm, exercised for real on this machine: creates a single-node
# swarm, `docker stack deploy`s deploy/docker-stack.yml (coordinator + 3 node
# replicas + Prometheus on an overlay network, the smoke test's images, no
# registry) on synthetic data, checks that Prometheus sees every node, kills
# one node task mid-run, and requires the run to finish with every sample of
# every epoch. Removes the stack and leaves the swarm afterwards. Refuses to
# touch an engine that is already part of a swarm. With SHARDED=1 the run
# goes through two shard aggregators (services aggregator-0/1).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker >/dev/null || { echo "swarm-smoke: no docker" >&2; exit 1; }
state=$(docker info --format '{{.Swarm.LocalNodeState}}')
if [ "$state" != "inactive" ]; then
  echo "SKIPPED swarm-smoke: this Docker engine is already in a swarm ($state); not touching it"
  exit 0
fi
BIN=${GRADCAST_BIN:-target/release/gradcast}
. deploy/smoke-lib.sh
EPOCHS=8
stack="gradcastswarm$$"
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  docker stack rm "$stack" >/dev/null 2>&1 || true
  # The overlay network goes once its tasks are gone.
  for _ in $(seq 30); do
    docker network ls -q --filter "label=com.docker.stack.namespace=$stack" | grep -q . || break
    sleep 1
  done
  docker swarm leave --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# (The tasks' stderr, where the logs are, comes on stderr.)
logs() { docker service logs --raw --no-trunc "${stack}_$1" 2>&1; }
fail() { echo "FAIL: $*" >&2; logs coordinator | tail -n 40 >&2 || true; exit 1; }

echo "== images"
deploy/images.sh "$BIN"

echo "== swarm"
docker swarm init --advertise-addr 127.0.0.1 >/dev/null
smoke_data "$work"
read -r grpc_port prom_port < <(free_ports 2)
export GRADCAST_IMAGE=gradcast:smoke PROMETHEUS_IMAGE=gradcast-prometheus:smoke
export GRADCAST_DATA_DIR="$work/data" GRADCAST_NODES=3 GRADCAST_BATCH_SIZE=32
export GRADCAST_EPOCHS=$EPOCHS GRADCAST_PORT=$grpc_port PROMETHEUS_PORT=$prom_port
# SHARDED=1: the same run through two shard aggregators.
if [ "${SHARDED:-0}" = 1 ]; then
  export GRADCAST_AGGREGATOR_REPLICAS=1
  export GRADCAST_AGGREGATORS=http://aggregator-0:50061,http://aggregator-1:50061
fi
docker stack deploy --resolve-image never -c deploy/docker-stack.yml "$stack" >/dev/null


echo "== run: coordinator + 3 node tasks + prometheus on an overlay network"
for _ in $(seq 180); do
  started=$(logs coordinator)
  grep -q 'training starts' <<<"$started" && break
  sleep 1
done
grep -q 'training starts' <<<"$started" || fail "training did not start"
nodes_seen=0
for _ in $(seq 60); do
  nodes_seen=$(query "$nodes_seen_query" || echo 0)
  [ "$nodes_seen" -ge 3 ] && break
  sleep 1
done
[ "$nodes_seen" -ge 3 ] || fail "Prometheus saw $nodes_seen of 3 nodes"
echo "prometheus scrapes all 3 node tasks (tasks.node DNS discovery)"
victim=$(docker ps -q --filter "label=com.docker.swarm.service.name=${stack}_node" | sed -n 1p)
[ -n "$victim" ] || fail "no node task to kill"
docker kill "$victim" >/dev/null
echo "killed node task ${victim:0:12}"

# The coordinator's task ends Complete (or Failed).
final=""
for _ in $(seq 600); do
  final=$(docker service ps "${stack}_coordinator" --format '{{.CurrentState}}' | sed -n 1p)
  case "$final" in Complete*|Failed*|Rejected*) break ;; esac
  sleep 1
done
case "$final" in Complete*) ;; *) fail "coordinator task: $final" ;; esac
out=$(logs coordinator)
grep -q 'node removed' <<<"$out" || fail "the coordinator did not notice the lost node"
epochs=$(grep -c '(2000 samples in' <<<"$out" || true)
[ "$epochs" = "$EPOCHS" ] || fail "expected $EPOCHS epochs of 2000 samples, saw $epochs"
echo "$(grep -o 'final val_accuracy: [0-9.]*' <<<"$out") after losing a node task; every epoch used all 2000 samples"
if [ "${SHARDED:-0}" = 1 ]; then
  grep -q 'aggregator http://aggregator-1:50061 connected' <<<"$out" || fail "the coordinator did not use the aggregators"
  echo "trained through 2 shard aggregators"
fi
echo "PASS: swarm smoke test"
