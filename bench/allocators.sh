#!/usr/bin/env bash
# The global allocator, measured: model::BlockCache (the default) against
# mimalloc and jemalloc, each with settings that keep freed pages in the
# process (what BlockCache is for: fresh pages fault in on every step).
# Runs `gradcast bench` (training, --threads 2) for each model and batch size,
# alternating the three builds round by round, and prints the best img/s of
# each.
#
#   bench/allocators.sh [--rounds 3] [--models "simple-cnn resnet20"] [--batches "32 128"]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 models="simple-cnn resnet20" batches="32 128"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
out=target/allocators
mkdir -p "$out"
for a in blockcache mimalloc jemalloc; do
  if [ "$a" = blockcache ]; then features=(); else features=(--features "$a"); fi
  cargo build --release -q --bin gradcast "${features[@]}"
  cp target/release/gradcast "$out/gradcast-$a"
done
cargo build --release -q --bin gradcast # leave the default build in place

# Keep freed memory: mimalloc never purges, jemalloc never decays dirty or
# muzzy pages (tikv-jemallocator reads _RJEM_MALLOC_CONF).
export MIMALLOC_PURGE_DELAY=-1 MIMALLOC_ARENA_EAGER_COMMIT=1
export _RJEM_MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
results=$(mktemp)
trap 'rm -f "$results"' EXIT
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$("$(dirname "$0")/cpu-variant.sh"), $(nproc) cores" >&2
for _ in $(seq "$rounds"); do
  for m in $models; do
    for b in $batches; do
      for a in blockcache mimalloc jemalloc; do
        "$out/gradcast-$a" bench --model "$m" --batch-size "$b" --threads 2 --mode train \
          --steps 8 --warmup 2 | sed "s/^{/{\"allocator\":\"$a\",/" | tee -a "$results" >&2
      done
    done
  done
done
python3 - "$results" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    k = (r["model"], r["batch_size"], r["allocator"])
    best[k] = max(best.get(k, 0), r["img_per_s"])
print("| model | batch | BlockCache | mimalloc | jemalloc | mimalloc / BlockCache | jemalloc / BlockCache |")
print("|---|---:|---:|---:|---:|---:|---:|")
for m, b in sorted({(k[0], k[1]) for k in best}):
    bc, mi, je = (best[(m, b, a)] for a in ("blockcache", "mimalloc", "jemalloc"))
    print(f"| {m} | {b} | {bc:.0f} | {mi:.0f} | {je:.0f} | {mi / bc:.2f} | {je / bc:.2f} |")
PY
