#!/usr/bin/env bash
# The on-GPU proof, in one script, for a machine with an NVIDIA GPU, the NVIDIA
# driver and a PyTorch install (whose nvidia/*/lib folders provide the CUDA
# runtime libraries), but no cargo: carry in the CUDA build made by
# deploy/cuda-build.sh (target/cuda/release/gradcast, stripped, ~61 MB).
#
#   OUT=/some/folder deploy/gpu-proof.sh
#
# 1. A mixed cluster on 127.0.0.1: coordinator + 1 CUDA node + 1 CPU node,
#    resnet20, batch 128, --balance (shares follow measured speed), ~316 steps
#    on synthetic data; prints how the samples were shared.
# 2. The engine bench on the GPU and on the CPU, and the same models in the
#    installed PyTorch on the GPU, side by side (JSON lines).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${GRADCAST_BIN:-target/cuda/release/gradcast}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
libs=$("$PY" - <<'PY'
import glob, os, torch
base = os.path.dirname(os.path.dirname(torch.__file__))
dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(base, "nvidia", "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
"$BIN" --version

echo "== mixed cluster: coordinator + CUDA node + CPU node (resnet20, --balance)"
"$BIN" synthetic --out "$OUT/data" --train-per-file 2000 --test 1000 >/dev/null
"$BIN" coordinator --listen 127.0.0.1:0 --nodes 2 --join-timeout 180 --model resnet20 --epochs 4 --batch-size 128 --balance \
  --data "$OUT/data" --history "$OUT/history.json" --progress plain >"$OUT/coordinator.out" 2>"$OUT/coordinator.err" &
coord=$!
for _ in $(seq 100); do grep -q 'listening on' "$OUT/coordinator.out" 2>/dev/null && break; sleep 0.2; done
addr=$(sed -n 's/^listening on //p' "$OUT/coordinator.out")
"$BIN" node --coordinator "http://$addr" --device cuda >"$OUT/node-cuda.log" 2>&1 &
"$BIN" node --coordinator "http://$addr" --device cpu --threads "${CPU_THREADS:-8}" >"$OUT/node-cpu.log" 2>&1 &
wait "$coord"
grep -E 'epoch [0-9]+/[0-9]+(:| node)' "$OUT/coordinator.err" | sed 's/.*INFO [a-z:_]*: //' | tee "$OUT/cluster.txt"
grep 'final val_accuracy' "$OUT/coordinator.out"
wait

echo "== engine bench (gradcast on GPU and CPU, PyTorch on GPU), batch 128"
for model in resnet20 simple-cnn complex-cnn; do
  "$BIN" bench --model "$model" --batch-size 128 --device cuda --steps 20 --warmup 3 | tee -a "$OUT/bench.jsonl"
  "$BIN" bench --model "$model" --batch-size 128 --threads "${CPU_THREADS:-8}" --steps 5 | tee -a "$OUT/bench.jsonl"
  "$PY" bench/pytorch_reference.py --model "$model" --batch-size 128 --device cuda --steps 20 --warmup 3 | tee -a "$OUT/bench.jsonl"
  "$PY" bench/pytorch_reference.py --model "$model" --batch-size 128 --device cuda --steps 20 --warmup 3 --channels-last | tee -a "$OUT/bench.jsonl"
done
echo "results in $OUT"
