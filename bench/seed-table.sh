#!/usr/bin/env bash
# Trains one row of the study's table on a 2-node gradcast cluster on this
# host, with the study's recipe (batch 32, Adam 1e-3, the model's own
# learning-rate schedule, no augmentation), and keeps its results in
# docs/seed-table/:
#
#   MODEL.json                Keras-style history (one entry per epoch)
#   MODEL.png                 learning curves
#   README.md                 the table: one row per model, next to the study
#   state/MODEL.resume.safetensors
#                             the complete resume state (weights, BatchNorm
#                             statistics, Adam moments, position), when it is
#                             small enough to keep in git (< 20 MB; not
#                             complex-cnn's ~140 MB)
#
# Meant to run in the background of a busy machine: a step may then wait long
# for a core, so nodes get an hour per step (GRADCAST_STEP_TIMEOUT to change).
#
# Rerun the same command after an interruption (or on another machine with the
# committed state) and it continues where it stopped: the resume is bit-exact.
#
# usage: bench/seed-table.sh MODEL [--data path/to/cifar-10-binary.tar.gz]
#                                  [--epochs E] [--every STEPS] [--augment]
# MODEL: simple-cnn, complex-cnn, resnet20, resnet20-dropout, resnet50-dropout
# --augment: beyond the study, with gradcast's --augment (random crop of the
# 4-pixel padded image + horizontal flip); its row is MODEL-augment. A
# ResNet's augmented row runs the Keras example's 200 epochs (its schedule's
# last steps, ×0.01 after epoch 120 and beyond, are where augmented training
# gains its last points), unless --epochs says otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${1:-}
[ -n "$MODEL" ] && [ "$MODEL" != "--help" ] && [ "$MODEL" != "-h" ] || {
  sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}
shift
DATA=${GRADCAST_DATA:-$ROOT/../shared/data/cifar-10-binary.tar.gz}
case "$MODEL" in
  simple-cnn) EPOCHS=20 STUDY=71.6 SCHEDULE=constant ;;
  complex-cnn) EPOCHS=60 STUDY=90.5 SCHEDULE=step-decay ;;
  # The ResNets use the Keras CIFAR-10 ResNet example's schedule, as the study
  # does: ×0.1 after epoch 80 (0-based, as Keras counts).
  resnet20) EPOCHS=100 STUDY=66.2 SCHEDULE=resnet-keras ;;
  resnet20-dropout) EPOCHS=100 STUDY=86.1 SCHEDULE=resnet-keras ;;
  resnet50-dropout) EPOCHS=100 STUDY=87.4 SCHEDULE=resnet-keras ;;
  *) echo "unknown model $MODEL" >&2; exit 2 ;;
esac
EVERY=200
AUGMENT=()
CHOSEN_EPOCHS=
while [ $# -gt 0 ]; do
  case "$1" in
    --augment) AUGMENT=(--augment); shift ;;
    --data) DATA=$2; shift 2 ;;
    --epochs) CHOSEN_EPOCHS=$2; shift 2 ;;
    --every) EVERY=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ ${#AUGMENT[@]} -gt 0 ] && [ "$SCHEDULE" = resnet-keras ] && EPOCHS=200
EPOCHS=${CHOSEN_EPOCHS:-$EPOCHS}
NETWORK=$MODEL
[ ${#AUGMENT[@]} -gt 0 ] && MODEL=$MODEL-augment
[ -e "$DATA" ] || { echo "no data at $DATA; pass --data path/to/cifar-10-binary.tar.gz" >&2; exit 2; }

BIN=${GRADCAST_BIN:-$ROOT/target/release/gradcast}
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --bin gradcast)
OUT=$ROOT/docs/seed-table
RUN=${SEED_TABLE_RUNS:-$ROOT/runs/seed-table}/$MODEL
mkdir -p "$OUT/state" "$RUN"
KEPT=$OUT/state/$MODEL.resume.safetensors

# A fresh machine: continue from the committed state and curves.
if [ ! -f "$RUN/resume.safetensors" ] && [ -f "$KEPT" ]; then
  cp "$KEPT" "$RUN/resume.safetensors"
  [ -f "$OUT/$MODEL.json" ] && cp "$OUT/$MODEL.json" "$RUN/history.json"
  [ -f "$OUT/state/$MODEL.wall" ] && cp "$OUT/state/$MODEL.wall" "$RUN/wall"
  [ -f "$OUT/state/$MODEL.compute" ] && cp "$OUT/state/$MODEL.compute" "$RUN/compute"
  echo "continuing $MODEL from $KEPT"
fi

# Keeps docs/seed-table up to date from the run folder.
snapshot() {
  [ -f "$RUN/history.json" ] || return 0
  cp "$RUN/history.json" "$OUT/$MODEL.json.tmp" && mv "$OUT/$MODEL.json.tmp" "$OUT/$MODEL.json"
  if [ -f "$RUN/resume.safetensors" ] && [ "$(stat -c %s "$RUN/resume.safetensors")" -lt 20000000 ]; then
    cp "$RUN/resume.safetensors" "$KEPT.tmp" && mv "$KEPT.tmp" "$KEPT"
  fi
  for f in wall compute; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/state/$MODEL.$f"; done
  # Only the two newest per-epoch checkpoints are kept.
  ls -1 "$RUN"/epoch-*.safetensors 2>/dev/null | head -n -2 | xargs -r rm -f
  "$BIN" plot "$OUT/$MODEL.json" -o "$OUT/$MODEL.png" --labels "$MODEL" >/dev/null 2>&1 || true
  python3 "$ROOT/bench/seed_table_row.py" "$OUT" "$MODEL" "$STUDY" "$EPOCHS" \
    "$(cat "$RUN/wall" 2>/dev/null || echo 0)" "$(cat "$RUN/compute" 2>/dev/null || echo 0)" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
}

started=$(date +%s)
wall0=$(cat "$RUN/wall" 2>/dev/null || echo 0)
compute0=$(cat "$RUN/compute" 2>/dev/null || echo 0)
log=$RUN/log.txt
set +e
(
  "$BIN" run --nodes 2 --threads-per-node 1 --model "$NETWORK" --epochs "$EPOCHS" "${AUGMENT[@]}" \
    --batch-size 32 --lr-schedule "$SCHEDULE" --data "$DATA" --history "$RUN/history.json" \
    --checkpoint-dir "$RUN" --checkpoint-every "$EVERY" --resume --progress plain \
    --step-timeout "${GRADCAST_STEP_TIMEOUT:-3600}" 2>&1
  echo "exit $?"
) | while IFS= read -r line; do
  printf '%s\n' "$line" | tee -a "$log"
  case "$line" in
    *"epoch "*" node "*" s compute"*)
      # Node compute time of the epoch, for the compute share.
      secs=$(printf '%s\n' "$line" | sed -E 's/.* ([0-9.]+) s compute.*/\1/')
      compute0=$(python3 -c "print($compute0 + $secs)")
      echo "$compute0" > "$RUN/compute"
      # Again once the epoch's compute is counted: the row's compute share
      # then covers the epoch its accuracy is from.
      snapshot
      ;;
    *"epoch "*"step time"*)
      echo $((wall0 + $(date +%s) - started)) > "$RUN/wall"
      ;;
    *"epoch "*" node "*)
      ;;
    *"epoch "*"val_accuracy"*)
      echo $((wall0 + $(date +%s) - started)) > "$RUN/wall"
      snapshot
      ;;
  esac
done
status=$?
set -e
snapshot
grep -q "^exit 0" <(tail -n 1 "$log") && echo "$MODEL: done ($EPOCHS epochs)" || {
  echo "$MODEL: stopped; rerun the same command to continue" >&2
  exit 1
}
exit $status
