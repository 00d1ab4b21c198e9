# Helpers shared by smoke.sh and swarm-smoke.sh (sourced, not run).

# Prints N free TCP ports on 127.0.0.1.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
}

# Prints how many series Prometheus on 127.0.0.1:$prom_port returns for a query.
query() { curl -sf "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" \
  | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["data"]["result"]))'; }

# Nodes Prometheus scraped in the last 10 minutes.
nodes_seen_query='count by (instance) (count_over_time(gradcast_node_tasks_total{job="gradcast-node"}[10m]))'

# Writes the smoke tests' synthetic data set (2000 training samples) into $1/data.
smoke_data() {
  "$BIN" synthetic --out "$1/data" --train-per-file 400 --test 200 >/dev/null
  chmod -R a+rX "$1/data"
}
