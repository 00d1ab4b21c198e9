#!/usr/bin/env bash
# The cluster side by side with its own engine and with PyTorch DDP, on this
# host, in one go.
#
#   bench/cluster.sh [--data path/to/cifar-10-binary.tar.gz] [--models "simple-cnn resnet20"]
#                    [--batches "32 128"] [--samples 6400] [--rounds 1]
#
# For each model and global batch it measures training samples/s of
#   engine   `gradcast bench --threads 2` (one process, no cluster)
#   run 1x2  `gradcast run --nodes 1 --threads-per-node 2` (one epoch of --samples real samples)
#   run 2x1  `gradcast run --nodes 2 --threads-per-node 1`
#   pt 1x2   PyTorch, one process, 2 threads (bench/ddp_reference.py --ranks 1)
#   ddp 2x1  PyTorch DDP over gloo, 2 ranks x 1 thread, Adam, channels_last
# (the cluster rates come from the coordinator's epoch line) and prints a table
# with the ratios, followed by each run's step split (send + compute + transfer
# + update, mean ms per step, from the coordinator). With --rounds N every
# measurement is repeated N times, alternating, and the best is kept.
# Needs bench/.venv (bench/setup-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

data=${GRADCAST_DATA:-../shared/data/cifar-10-binary.tar.gz}
models="simple-cnn resnet20"
batches="32 128"
samples=6400
rounds=1
while [ $# -gt 0 ]; do
    case "$1" in
        --data) data="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --batches) batches="$2"; shift 2 ;;
        --samples) samples="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-bench/.venv/bin/python}"
[ -x "$python" ] || { echo "no $python: run bench/setup-venv.sh first (or set PYTHON)" >&2; exit 1; }
[ -e "$data" ] || { echo "no data at $data; pass --data path/to/cifar-10-binary.tar.gz" >&2; exit 1; }
cargo build --release -q --bin gradcast
gradcast=target/release/gradcast
variant=$(bench/cpu-variant.sh)
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $(nproc) cores, $variant, load:$(uptime | sed 's/.*load average: //')"

best() { # best of the numbers on stdin
    sort -g | tail -n 1
}

engine() { # model batch
    "$gradcast" bench --model "$1" --batch-size "$2" --threads 2 --mode train --steps 12 --warmup 3 \
        | grep '"mode":"train"' | sed -E 's/.*"img_per_s":([0-9.]+).*/\1/'
}

splits=$(mktemp)
trap 'rm -f "$splits"' EXIT
cluster() { # model batch nodes threads
    local out
    out=$("$gradcast" run --nodes "$3" --threads-per-node "$4" --model "$1" --batch-size "$2" \
        --epochs 1 --data "$data" --train-limit "$samples" --test-limit 100 --progress plain 2>&1)
    echo "$1 b$2 $3x$4: $(echo "$out" | grep -o 'step time: .*' | sed 's/step time: //')" >>"$splits"
    echo "$out" | grep -E 'epoch 1/1: ' | sed -E 's/.* ([0-9.]+) samples\/s\).*/\1/'
}

pytorch() { # model batch ranks threads
    "$python" bench/ddp_reference.py --model "$1" --batch-size "$2" --ranks "$3" \
        --threads-per-rank "$4" --samples "$samples" --channels-last \
        | sed -E 's/.*"samples_per_s":([0-9.]+).*/\1/'
}

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

printf '\n| model | batch | engine | run 1x2 | run 2x1 | PyTorch 1x2 | DDP 2x1 | 1x2/engine | 2x1/engine | 2x1/DDP |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for m in $models; do
    for b in $batches; do
        e=() r12=() r21=() p12=() d21=()
        for _ in $(seq "$rounds"); do
            e+=("$(engine "$m" "$b")")
            r12+=("$(cluster "$m" "$b" 1 2)")
            r21+=("$(cluster "$m" "$b" 2 1)")
            p12+=("$(pytorch "$m" "$b" 1 2)")
            d21+=("$(pytorch "$m" "$b" 2 1)")
        done
        E=$(printf '%s\n' "${e[@]}" | best | xargs printf '%.1f')
        R12=$(printf '%s\n' "${r12[@]}" | best)
        R21=$(printf '%s\n' "${r21[@]}" | best)
        P12=$(printf '%s\n' "${p12[@]}" | best)
        D21=$(printf '%s\n' "${d21[@]}" | best)
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$m" "$b" "$E" "$R12" "$R21" "$P12" "$D21" \
            "$(ratio "$R12" "$E")" "$(ratio "$R21" "$E")" "$(ratio "$R21" "$D21")"
    done
done
printf '\nStep split of each cluster run (mean ms per step):\n'
cat "$splits"
