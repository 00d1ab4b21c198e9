#!/usr/bin/env bash
# Runs a short real `gradcast run` (coordinator + 2 nodes on 127.0.0.1), lints
# every /metrics endpoint with promtool, lets Debian's Prometheus scrape them,
# and checks through Prometheus' HTTP API that the coordinator's and both
# nodes' series arrived. Installs the `prometheus` package if it is missing
# and we are root. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${GRADCAST_BIN:-target/release/gradcast}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "prometheus and promtool are needed (Debian package 'prometheus')" >&2; exit 1
  fi
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Three consecutive free ports for coordinator + 2 nodes, one for Prometheus.
read -r base prom < <(python3 - <<'PY'
import socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
for base in range(19150, 19900, 7):
    if all(free(base + i) for i in range(4)):
        print(base, base + 3); break
PY
)
echo "metrics ports $base..$((base + 2)), prometheus on $prom"

cat > "$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: gradcast-coordinator
    static_configs:
      - targets: ["127.0.0.1:$base"]
  - job_name: gradcast-node
    static_configs:
      - targets: ["127.0.0.1:$((base + 1))", "127.0.0.1:$((base + 2))"]
YML
promtool check config "$work/prometheus.yml" >/dev/null
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom" >"$work/prometheus.log" 2>&1 &
pids+=($!)
# Start training only once Prometheus serves, so its scrapes see the run.
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$prom/-/ready" >/dev/null && break; sleep 0.2; done

"$BIN" synthetic --out "$work/data" --train-per-file 400 --test 100 >/dev/null
"$BIN" run --nodes 2 --threads-per-node 1 --metrics-port "$base" --data "$work/data" \
  --epochs 4 --batch-size 32 >"$work/run.log" 2>&1 &
run=$!
pids+=($run)

fail() { echo "FAIL: $*" >&2; tail -20 "$work/run.log" >&2; tail -5 "$work/prometheus.log" >&2; exit 1; }

# Lint each endpoint once it has seen a step.
for port in "$base" "$((base + 1))" "$((base + 2))"; do
  for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$port/metrics" -o "$work/m.txt" && grep -q '^gradcast_[a-z_]*_bucket' "$work/m.txt"; then break; fi
    sleep 0.2
  done
  promtool check metrics <"$work/m.txt" || fail "promtool rejects the metrics on port $port"
  echo "promtool: metrics on port $port are clean ($(grep -vc '^#' "$work/m.txt") samples)"
done

query() { curl -sf "http://127.0.0.1:$prom/api/v1/query" --data-urlencode "query=$1"; }
# Series of a finished process are marked stale at its next failed scrape, so
# instant queries would miss them: look at the last sample of the past minutes.
count_series() { query "last_over_time($1[5m])${2:-}" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))'; }

ok=0
for _ in $(seq 60); do
  c=$(count_series 'gradcast_steps_total{job="gradcast-coordinator"}' || echo 0)
  n=$(count_series 'gradcast_node_tasks_total{job="gradcast-node",phase="train"}' || echo 0)
  p=$(count_series 'gradcast_node_compute_seconds_count{job="gradcast-coordinator"}' || echo 0)
  # Each node's device, as the coordinator saw it at join and as the node says.
  d=$(count_series 'gradcast_node_info{job="gradcast-coordinator",device="cpu"}' ' == 1' || echo 0)
  e=$(count_series 'gradcast_node_info{job="gradcast-node",device="cpu"}' || echo 0)
  if [ "$c" -ge 1 ] && [ "$n" -ge 2 ] && [ "$p" -ge 2 ] && [ "$d" -ge 2 ] && [ "$e" -ge 2 ]; then ok=1; break; fi
  sleep 1
done
[ "$ok" = 1 ] || fail "Prometheus did not scrape the coordinator and both nodes (coordinator=$c nodes=$n per-node=$p node-info=$d/$e)"
echo "prometheus: scraped coordinator ($c series) and $n nodes; per-node compute series: $p; nodes reporting device cpu: $d (coordinator), $e (nodes)"

wait "$run" || fail "gradcast run failed"

# Every query of the Grafana dashboard must find data (evictions excepted:
# none happened).
sleep 2
python3 - "$prom" deploy/grafana/dashboards/gradcast.json <<'PY' || fail "dashboard queries without data"
import json, re, sys, urllib.parse, urllib.request
prom, path = sys.argv[1], sys.argv[2]
missing = []
for panel in json.load(open(path))["panels"]:
    for t in panel["targets"]:
        # Gauges of finished processes are stale now: look back over 5 minutes.
        expr = re.sub(r"^max\((gradcast_[a-z_]+)\)$", r"max(max_over_time(\1[5m]))", t["expr"])
        expr = expr.replace("[1m]", "[5m]")
        if "evictions" in expr:
            continue
        url = f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result = json.load(urllib.request.urlopen(url))["data"]["result"]
        if not result:
            missing.append(f'{panel["title"]}: {t["expr"]}')
for m in missing:
    print("no data:", m, file=sys.stderr)
print(f"dashboard: all queries but {len(missing)} return data")
sys.exit(1 if missing else 0)
PY
grep -q '^final val_accuracy: ' "$work/run.log" || fail "no final accuracy line"
echo "PASS: $(grep '^final val_accuracy' "$work/run.log")"
