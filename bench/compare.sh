#!/usr/bin/env bash
# gradcast vs PyTorch, side by side, on the CPU.
#
#   bench/compare.sh [--threads N] [--batch-size N] [--rounds N] [--models "simple-cnn resnet20 complex-cnn"]
#
# For each model runs gradcast's `bench` and bench/pytorch_reference.py (NCHW
# and channels_last, the faster of the two counts) one after the other in the
# same run, `--rounds` times (default 2) alternating the engines, and keeps
# each engine's best run (on a shared machine, load comes in bursts). Then
# prints a table of img/s with the ratio gradcast / PyTorch for training and
# inference. Raw JSON lines go to stderr as they come.
#
# Needs bench/.venv (bench/setup-venv.sh). Builds the bench with -j 1.
set -euo pipefail
cd "$(dirname "$0")/.."

threads=2
batch=128
rounds=2
models="simple-cnn resnet20 complex-cnn"
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --batch-size) batch="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

python="${PYTHON:-bench/.venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "no $python: run bench/setup-venv.sh first (or set PYTHON)" >&2
    exit 1
fi
cargo build --release -j 1 -q --bin gradcast
gradcast=target/release/gradcast

# Steps per model: enough for a stable median, few for the slow complex-cnn.
steps_for() {
    case "$1" in
        complex-cnn) echo "3 1" ;;
        resnet*) echo "6 2" ;;
        *) echo "8 2" ;;
    esac
}

results=$(mktemp)
trap 'rm -f "$results"' EXIT
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD), $(bench/cpu-variant.sh), load:$(uptime | sed 's/.*load average: //')" >&2
for m in $models; do
    read -r steps warmup <<<"$(steps_for "$m")"
    common=(--model "$m" --batch-size "$batch" --threads "$threads" --steps "$steps" --warmup "$warmup")
    for _ in $(seq "$rounds"); do
        "$gradcast" bench "${common[@]}" | tee -a "$results" >&2
        "$python" bench/pytorch_reference.py "${common[@]}" | tee -a "$results" >&2
        "$python" bench/pytorch_reference.py "${common[@]}" --channels-last | tee -a "$results" >&2
    done
done
echo "# done, load:$(uptime | sed 's/.*load average: //')" >&2

"$python" - "$results" "$models" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
models = sys.argv[2].split()
def get(engine, model, mode):
    c = [r for r in rows if r["engine"] == engine and r["model"] == model and r["mode"] == mode]
    return max(c, key=lambda r: r["img_per_s"]) if c else None
t = rows[0]["threads"] if rows else "?"
b = rows[0]["batch_size"] if rows else "?"
print(f"batch {b}, {t} thread(s); img/s, best of the rounds (PyTorch: faster of NCHW / channels_last)\n")
print("| model | mode | gradcast | PyTorch | PyTorch format | gradcast / PyTorch |")
print("|---|---|---:|---:|---|---:|")
for m in models:
    for mode in ("train", "eval"):
        g, p = get("gradcast", m, mode), get("pytorch", m, mode)
        if not g or not p:
            continue
        print(f"| {m} | {mode} | {g['img_per_s']:.1f} | {p['img_per_s']:.1f} | "
              f"{p['memory_format']} | {g['img_per_s'] / p['img_per_s']:.2f}x |")
print("\nPyTorch's training step includes the Adam update; gradcast's is forward + backward")
print("only (its optimizer runs on the coordinator). Seconds per step of the best runs:\n")
print("| model | gradcast fwd | gradcast bwd | PyTorch fwd | PyTorch bwd | PyTorch Adam | PyTorch fwd+bwd img/s |")
print("|---|---:|---:|---:|---:|---:|---:|")
for m in models:
    g, p = get("gradcast", m, "train"), get("pytorch", m, "train")
    if g and p:
        print(f"| {m} | {g['forward_s']:.3f} | {g['backward_s']:.3f} | {p['forward_s']:.3f} | "
              f"{p['backward_s']:.3f} | {p['optimizer_s']:.3f} | {p['fwd_bwd_img_per_s']:.1f} |")
EOF
