#!/usr/bin/env bash
# A network of simulated hosts on this machine: one network namespace per
# host, each joined by a veth pair to a bridge that lives in a namespace of its
# own, every host's link shaped with tc (rate, one-way delay, loss) in both
# directions. Needs root and iproute2. It only ever addresses the hosts it
# created (10.77.0.0/24 inside its own namespaces) and removes all of them when
# done, interrupted or killed by a signal.
#
#   deploy/netsim.sh run --nodes N [--rate 1gbit] [--delay 0] [--loss 0%]
#                        [--node-args "ARGS"] [--aggregators K] [--logs DIR]
#                        -- COORDINATOR-ARGS...
#       creates the coordinator's host (10.77.0.1) and N node hosts
#       (10.77.0.11, .12, ...), runs `gradcast coordinator --listen
#       10.77.0.1:50051 COORDINATOR-ARGS` on the first and `gradcast node
#       --coordinator http://10.77.0.1:50051 --no-shared-memory ARGS` on the
#       others, prints the coordinator's output, removes everything and exits
#       with the coordinator's status. Node logs go to DIR/node-I.log.
#       --aggregators K (K <= N) also runs `gradcast aggregator` on node
#       hosts 1..K (port 50061, beside the node) and hands them to the
#       coordinator (--aggregators); their logs go to DIR/aggregator-I.log.
#   deploy/netsim.sh up --nodes N [--rate ..] [--delay ..] [--loss ..]
#   deploy/netsim.sh exec HOST -- COMMAND...   HOST: coordinator, node1, node2, ...
#   deploy/netsim.sh down
#   deploy/netsim.sh check     exit 0 if namespaces can be made here, else say why (exit 3)
#
# NETSIM_PREFIX (default gcsim) names the namespaces, so that two simulations
# can run side by side; GRADCAST_BIN (default target/release/gradcast) is the
# binary. The rate is each host's own link (both directions); the delay is
# added on each direction of each link, so a node-to-coordinator round trip
# crosses four delays. Delay and loss need the kernel's netem queueing
# discipline; where it is missing only the rate can be shaped (and asking for
# a delay is an error that says so).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${NETSIM_PREFIX:-gcsim}
bin=${GRADCAST_BIN:-target/release/gradcast}
subnet=10.77.0
port=50051

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

ns_of() { # host name -> namespace
    case "$1" in
        coordinator) echo "$prefix-c" ;;
        node[0-9]*) echo "$prefix-n${1#node}" ;;
        *) echo "unknown host $1 (coordinator, node1, node2, ...)" >&2; return 2 ;;
    esac
}

check() {
    [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)"; return 3; }
    command -v ip >/dev/null && command -v tc >/dev/null || { echo "needs iproute2 (ip, tc)"; return 3; }
    local probe="$prefix-probe$$"
    if ! ip netns add "$probe" 2>/dev/null; then
        echo "cannot create network namespaces here"
        return 3
    fi
    local ok=0
    ip -n "$probe" link add vprobe type veth peer name vprobe2 2>/dev/null || ok=1
    ip -n "$probe" link add bprobe type bridge 2>/dev/null || ok=1
    ip netns del "$probe"
    [ "$ok" = 0 ] || { echo "cannot create veth pairs or bridges in a namespace here"; return 3; }
}

down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-(c|br|n[0-9]+)$" || true); do
        # Anything still running in a host is ended before its namespace goes.
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}

burst_of() { # rate -> tbf burst: 1 ms at the rate, at least 128 KiB (a GSO packet is up to 64 KiB)
    python3 - "$1" <<'EOF'
import re, sys
m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", sys.argv[1].lower())
if not m:
    sys.exit(f"cannot read rate {sys.argv[1]!r} (e.g. 100mbit, 1gbit, 10gbit)")
bits = float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]
print(max(128 * 1024, int(bits / 8 / 1000)))
EOF
}

has_netem() { # can this kernel delay or drop packets (sch_netem)?
    local probe="$prefix-netem$$" ok=0
    ip netns add "$probe"
    ip netns exec "$probe" tc qdisc add dev lo root netem delay 1ms 2>/dev/null || ok=1
    ip netns del "$probe"
    return "$ok"
}

shaping_only_rate() { # delay loss -> true when neither asks for anything
    [[ "$1" =~ ^0+(\.0*)?(ms|us|s)?$ ]] && [[ "$2" =~ ^0+(\.0*)?%?$ ]]
}

shape() { # ns dev rate delay loss
    local ns=$1 dev=$2 rate=$3 delay=$4 loss=$5 burst
    burst=$(burst_of "$rate")
    if shaping_only_rate "$delay" "$loss"; then
        ip netns exec "$ns" tc qdisc add dev "$dev" root handle 10: tbf rate "$rate" burst "$burst" latency 200ms
    else
        ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" loss "$loss" limit 1000000
        ip netns exec "$ns" tc qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$rate" burst "$burst" latency 200ms
    fi
}

add_host() { # host-ns address rate delay loss index
    local ns=$1 addr=$2 rate=$3 delay=$4 loss=$5 i=$6 br="$prefix-br"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$br" link add "h$i" type veth peer name eth0 netns "$ns"
    ip -n "$br" link set "h$i" master br0 up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    shape "$ns" eth0 "$rate" "$delay" "$loss"  # host -> bridge
    shape "$br" "h$i" "$rate" "$delay" "$loss" # bridge -> host
}

up() { # nodes rate delay loss
    local nodes=$1 rate=$2 delay=$3 loss=$4 i
    local why
    burst_of "$rate" >/dev/null || return 2
    why=$(check) || { echo "netsim: $why" >&2; return 3; }
    if ! shaping_only_rate "$delay" "$loss" && ! has_netem; then
        echo "netsim: this kernel has no netem queueing discipline (sch_netem), so it cannot add delay or loss;" \
            "use --delay 0 --loss 0 (rate shaping with tbf still works) or a kernel with netem" >&2
        return 3
    fi
    down
    ip netns add "$prefix-br"
    ip -n "$prefix-br" link add br0 type bridge
    ip -n "$prefix-br" link set br0 up
    add_host "$prefix-c" "$subnet.1" "$rate" "$delay" "$loss" 0
    for i in $(seq "$nodes"); do
        add_host "$prefix-n$i" "$subnet.$((10 + i))" "$rate" "$delay" "$loss" "$i"
    done
}

parse_link() { # sets nodes rate delay loss node_args logs, leaves the rest in rest[]
    nodes=1 rate=1gbit delay=0 loss=0% node_args="" logs="" aggregators=0
    rest=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes="$2"; shift 2 ;;
            --rate) rate="$2"; shift 2 ;;
            --delay) delay="$2"; shift 2 ;;
            --loss) loss="$2"; shift 2 ;;
            --node-args) node_args="$2"; shift 2 ;;
            --logs) logs="$2"; shift 2 ;;
            --aggregators) aggregators="$2"; shift 2 ;;
            --) shift; rest=("$@"); break ;;
            *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "--nodes must be a positive number" >&2; exit 2; }
    [[ "$aggregators" =~ ^[0-9]+$ ]] && [ "$aggregators" -le "$nodes" ] ||
        { echo "--aggregators must be a number from 0 to --nodes" >&2; exit 2; }
}

run() {
    parse_link "$@"
    [ -x "$bin" ] || { echo "no $bin: cargo build --release first (or set GRADCAST_BIN)" >&2; exit 1; }
    own_logs=""
    if [ -z "$logs" ]; then logs=$(mktemp -d); own_logs=$logs; fi
    mkdir -p "$logs"
    agg_pids=()
    # Processes outlive a deleted namespace: the aggregators (which never
    # end by themselves) are stopped before the network goes.
    trap '[ ${#agg_pids[@]} = 0 ] || kill "${agg_pids[@]}" 2>/dev/null || true; down; [ -z "$own_logs" ] || rm -rf "$own_logs"' EXIT
    trap 'exit 130' INT TERM
    up "$nodes" "$rate" "$delay" "$loss"
    local i status=0 urls=()
    for i in $(seq "$aggregators"); do
        ip netns exec "$prefix-n$i" "$bin" aggregator --listen "$subnet.$((10 + i)):50061" \
            >"$logs/aggregator-$i.log" 2>&1 &
        agg_pids+=($!)
        urls+=("http://$subnet.$((10 + i)):50061")
    done
    if [ "$aggregators" -gt 0 ]; then
        rest+=(--aggregators "$(IFS=,; echo "${urls[*]}")")
    fi
    ip netns exec "$prefix-c" "$bin" coordinator --listen "$subnet.1:$port" "${rest[@]}" &
    local coordinator=$!
    for i in $(seq "$nodes"); do
        # shellcheck disable=SC2086 # node_args is a list of words
        ip netns exec "$prefix-n$i" "$bin" node --coordinator "http://$subnet.1:$port" \
            --no-shared-memory $node_args >"$logs/node-$i.log" 2>&1 &
    done
    wait "$coordinator" || status=$?
    if [ "$status" != 0 ]; then
        for i in $(seq "$nodes"); do
            echo "--- node $i (last lines)" >&2
            tail -n 5 "$logs/node-$i.log" >&2 || true
        done
    fi
    return "$status"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    run) run "$@" ;;
    up)
        parse_link "$@"
        trap down EXIT # a half-made network is removed
        up "$nodes" "$rate" "$delay" "$loss"
        trap - EXIT
        ;;
    down) down ;;
    exec)
        host=${1:?host}; shift
        [ "${1:-}" = "--" ] && shift
        ns=$(ns_of "$host")
        exec ip netns exec "$ns" "$@"
        ;;
    check) why=$(check) || { echo "$why"; exit 3; } ;;
    -h|--help|"") usage ;;
    *) echo "unknown command $cmd" >&2; usage >&2; exit 2 ;;
esac
