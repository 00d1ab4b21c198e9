#!/usr/bin/env bash
# The agreement check with its noise measured: trains MODEL's first epochs
# with the study's recipe several times on each engine, one seed per run
# (gradcast: 2 nodes x 1 thread, --seed S, as bench/seed-table.sh but for
# --epochs; PyTorch: bench/pytorch_reference.py --train MODEL --seed S), and
# writes docs/seed-table/seeds/README.md: per epoch, each engine's mean test
# accuracy and its spread over the seeds, and the difference of the means
# with its standard error. One run against one run differs by several
# points by chance alone in the first epochs; the difference of the means,
# against its standard error, is what tells a wrong BatchNorm or dropout
# from seed noise.
#
# Histories: docs/seed-table/seeds/ENGINE-MODEL-seedS.json. A run whose
# history already holds the epochs is not run again, so an interrupted
# script continues with the next run when started again.
#
# usage: bench/agreement-seeds.sh MODEL [--seeds "1 2 3"] [--epochs 3]
#                                 [--engines "gradcast pytorch"]
#                                 [--data path/to/cifar-10-binary.tar.gz]
# Needs bench/.venv (bench/setup-venv.sh) for the PyTorch runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${1:-}
[ -n "$MODEL" ] && [ "$MODEL" != "--help" ] && [ "$MODEL" != "-h" ] || {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}
shift
DATA=${GRADCAST_DATA:-$ROOT/../shared/data/cifar-10-binary.tar.gz}
SEEDS="1 2 3" EPOCHS=3 ENGINES="gradcast pytorch"
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --engines) ENGINES=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$MODEL" in
  simple-cnn) SCHEDULE=constant ;;
  complex-cnn) SCHEDULE=step-decay ;;
  resnet20 | resnet20-dropout | resnet50-dropout) SCHEDULE=resnet-keras ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
[ -e "$DATA" ] || { echo "no data at $DATA; pass --data path/to/cifar-10-binary.tar.gz" >&2; exit 2; }
BIN=${GRADCAST_BIN:-$ROOT/target/release/gradcast}
PY=$ROOT/bench/.venv/bin/python
OUT=$ROOT/docs/seed-table/seeds
mkdir -p "$OUT"

# Epochs a history file holds (0 if none).
epochs_in() {
  python3 -c 'import json,sys
try: print(len(json.load(open(sys.argv[1]))["val_accuracy"]))
except Exception: print(0)' "$1"
}

for seed in $SEEDS; do
  for engine in $ENGINES; do
    history=$OUT/$engine-$MODEL-seed$seed.json
    if [ "$(epochs_in "$history")" -ge "$EPOCHS" ]; then
      echo "# $engine $MODEL seed $seed: done ($history)"
      continue
    fi
    echo "# $engine $MODEL seed $seed: $EPOCHS epochs"
    tmp=$history.tmp
    rm -f "$tmp"
    case "$engine" in
      gradcast)
        [ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --bin gradcast)
        "$BIN" run --nodes 2 --threads-per-node 1 --model "$MODEL" --epochs "$EPOCHS" \
          --batch-size 32 --lr-schedule "$SCHEDULE" --seed "$seed" --data "$DATA" \
          --history "$tmp" --progress plain 2>&1 | grep -E "val_accuracy|ERROR|error" || true
        ;;
      pytorch)
        [ -x "$PY" ] || { echo "no $PY: run bench/setup-venv.sh first" >&2; exit 2; }
        OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} "$PY" "$ROOT/bench/pytorch_reference.py" \
          --train "$MODEL" --epochs "$EPOCHS" --threads 2 --seed "$seed" --data "$DATA" \
          --history "$tmp" 2>&1 | grep -E "val_acc|Error|error" || true
        ;;
      *) echo "unknown engine $engine" >&2; exit 2 ;;
    esac
    if [ "$(epochs_in "$tmp")" -ge "$EPOCHS" ]; then
      mv "$tmp" "$history"
    else
      echo "$engine $MODEL seed $seed did not finish $EPOCHS epochs" >&2
      exit 1
    fi
  done
done
python3 "$ROOT/bench/agreement_seeds.py" "$OUT"
cat "$OUT/README.md"
