#!/usr/bin/env bash
# The cheap agreement check of the study's table: trains MODEL for its first
# epochs in PyTorch (bench/pytorch_reference.py --train, the same network,
# data and recipe as bench/seed-table.sh) and puts its test accuracy per epoch
# beside gradcast's in docs/seed-table/README.md.
#
# usage: bench/pytorch-agreement.sh MODEL [--epochs 3] [--threads 2]
#                                   [--data path/to/cifar-10-binary.tar.gz]
# Needs bench/.venv (bench/setup-venv.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${1:-}
[ -n "$MODEL" ] && [ "$MODEL" != "--help" ] && [ "$MODEL" != "-h" ] || {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}
shift
DATA=${GRADCAST_DATA:-$ROOT/../shared/data/cifar-10-binary.tar.gz}
EPOCHS=3 THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -e "$DATA" ] || { echo "no data at $DATA; pass --data path/to/cifar-10-binary.tar.gz" >&2; exit 2; }
PY=$ROOT/bench/.venv/bin/python
[ -x "$PY" ] || { echo "no $PY: run bench/setup-venv.sh first" >&2; exit 2; }
OUT=$ROOT/docs/seed-table
mkdir -p "$OUT/pytorch"
# A long run that may share the machine with another (a seed-table run): the
# OpenMP threads sleep when idle instead of spinning on cores others need.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
"$PY" "$ROOT/bench/pytorch_reference.py" --train "$MODEL" --epochs "$EPOCHS" \
  --threads "$THREADS" --data "$DATA" --history "$OUT/pytorch/$MODEL.json"
python3 "$ROOT/bench/seed_table_row.py" "$OUT"
sed -n '/^## Agreement/,$p' "$OUT/README.md"
