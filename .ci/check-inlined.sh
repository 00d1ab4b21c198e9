#!/usr/bin/env bash
# Fails when the binary calls an f32 vector arithmetic intrinsic (add, sub,
# mul, fmadd, ... of core::arch) out of line: inlined into its caller it is
# one instruction, called it is a function call per add. It happens when a
# closure handed to a library function (array `map`, `from_fn`) is compiled
# outside the caller's `#[target_feature]` function: Winograd's transforms
# once ran ~40 % slower that way (`core::array::<impl [T; N]>::try_map`
# calling `_mm512_add_ps`) with every test passing. Loads, stores and
# conversions (which candle and gemm call out of line in places) are not
# checked.
#
#   .ci/check-inlined.sh [BINARY]   (default target/release/gradcast)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/gradcast}
command -v objdump >/dev/null || { echo "SKIPPED: no objdump (binutils) on this machine"; exit 0; }
[ -x "$bin" ] || { echo "no binary at $bin: build it first (cargo build --release)" >&2; exit 2; }
calls=$(objdump -d --no-show-raw-insn -C "$bin" | awk '
  /^[0-9a-f]+ <.*>:$/ { fn = $0 }
  /call.*<core::core_arch::x86::[a-z0-9_]+::_mm(256|512)?_(add|sub|mul|div|fmadd|fmsub|fnmadd|max|min|reduce_add)_ps>/ {
    print fn " calls " $NF
  }' | sort -u)
if [ -n "$calls" ]; then
  echo "f32 vector arithmetic called out of line (see this script's header):" >&2
  echo "$calls" >&2
  exit 1
fi
echo "ok: no f32 vector arithmetic intrinsic is called out of line in $bin"
