#!/usr/bin/env bash
# f32 against bf16 on the gRPC wire: the same simple-cnn run (2 nodes x 1
# thread on this host, every byte over gRPC, the study's recipe: batch 32,
# Adam 1e-3), once per wire format, and what each does to accuracy and speed.
#
#   bench/wire.sh [--data path/to/cifar-10-binary.tar.gz] [--epochs 3]
#                 [--model simple-cnn] [--seed 0] [--out docs/wire]
#
# Writes OUT/{f32,bf16}.json (Keras-style histories), OUT/curves.png (both
# curves) and OUT/README.md (val accuracy per epoch, training samples/s and
# the coordinator's split of a step, per format).
set -euo pipefail
cd "$(dirname "$0")/.."

data=${GRADCAST_DATA:-../shared/data/cifar-10-binary.tar.gz}
epochs=3
model=simple-cnn
seed=0
out=docs/wire
while [ $# -gt 0 ]; do
    case "$1" in
        --data) data="$2"; shift 2 ;;
        --epochs) epochs="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ -e "$data" ] || { echo "no data at $data; pass --data path/to/cifar-10-binary.tar.gz" >&2; exit 1; }
gradcast=${GRADCAST_BIN:-target/release/gradcast}
[ -x "$gradcast" ] || cargo build --release -q --bin gradcast
mkdir -p "$out"
variant=$("$(dirname "$0")/cpu-variant.sh")
header="$(date -u +%F), commit $(git rev-parse --short HEAD), $(nproc)-core AMD EPYC VM, $variant"

declare -A rate bytes
for wire in f32 bf16; do
    log=$(mktemp)
    "$gradcast" run --nodes 2 --threads-per-node 1 --model "$model" --epochs "$epochs" \
        --data "$data" --shm-dir off --wire "$wire" --seed "$seed" --progress plain \
        --history "$out/$wire.json" >"$log" 2>&1 || { cat "$log"; exit 1; }
    # Training samples/s of each epoch, from the coordinator's epoch lines.
    rate[$wire]=$(grep -E 'coordinator.*epoch [0-9]+/[0-9]+: loss' "$log" \
        | sed -E 's/.* ([0-9]+) samples\/s\).*/\1/' | paste -sd/ -)
    bytes[$wire]=$(grep -E 'coordinator.*step time:' "$log" | tail -n 1 | sed -E 's/.*step time: //')
    grep -E 'coordinator.*epoch [0-9]+/[0-9]+: loss' "$log"
    rm -f "$log"
done
"$gradcast" plot "$out/f32.json" "$out/bf16.json" --labels "f32,bf16" -o "$out/curves.png"

python3 - "$out" "$header" "$model" "${rate[f32]}" "${rate[bf16]}" "${bytes[f32]:-}" "${bytes[bf16]:-}" "$seed" <<'PY'
import json, sys
out, header, model, rate32, rate16, bytes32, bytes16, seed = sys.argv[1:9]
h = {w: json.load(open(f"{out}/{w}.json")) for w in ("f32", "bf16")}
n = len(h["f32"]["val_accuracy"])
lines = [
    "# f32 and bf16 on the gRPC wire",
    "",
    f"`bench/wire.sh` on {header}: {model}, 2 nodes x 1 thread on one host with",
    f"every byte over gRPC (`--shm-dir off`), batch 32, Adam 1e-3, seed {seed}, the",
    "full training set, once with `--wire f32` and once with `--wire bf16`.",
    "",
    "| epoch | val accuracy f32 | val accuracy bf16 | train accuracy f32 | train accuracy bf16 |",
    "|---:|---:|---:|---:|---:|",
]
for e in range(n):
    lines.append(
        f"| {e + 1} | {h['f32']['val_accuracy'][e]:.4f} | {h['bf16']['val_accuracy'][e]:.4f}"
        f" | {h['f32']['accuracy'][e]:.4f} | {h['bf16']['accuracy'][e]:.4f} |"
    )
lines += [
    "",
    f"Training samples/s per epoch: f32 {rate32}, bf16 {rate16}.",
]
if bytes32 and bytes16:
    lines += [
        "The coordinator's split of a step in the last epoch (mean per step):",
        f"f32 {bytes32}; bf16 {bytes16}.",
    ]
lines += ["", "![f32 and bf16 curves](curves.png)", ""]
open(f"{out}/README.md", "w").write("\n".join(lines))
print("\n".join(lines))
PY
