#!/usr/bin/env bash
# Names the CPU variant this machine is, for the heading of every benchmark:
# the vendor's model name, and for AMD EPYC which Zen generation (Zen 5 has
# VP2INTERSECT, Zen 4 does not; an EPYC without AVX-512 is named by its
# family and model), e.g. "AMD EPYC, Zen 4 variant (no VP2INTERSECT)", "AMD
# EPYC (family 23 model 1: Zen 1), AVX2 only" or "Intel(R) Xeon(R) Processor
# (family 6 model 167), AVX-512 + AMX".
set -euo pipefail
info=/proc/cpuinfo
name=$(grep -m1 '^model name' "$info" | sed 's/.*: //')
flags=$(grep -m1 '^flags' "$info")
has() { grep -qw "$1" <<<"$flags"; }
case "$(grep -m1 '^vendor_id' "$info" | sed 's/.*: //')" in
  AuthenticAMD)
    family=$(grep -m1 '^cpu family' "$info" | sed 's/.*: //')
    model=$(grep -m1 '^model\s' "$info" | sed 's/.*: //')
    if ! has avx512f; then
      # Family 23 is Zen 1 / Zen+ / Zen 2 (models below 0x30 Zen 1 and Zen+).
      gen=""
      [ "$family" = 23 ] && { [ "$model" -lt 48 ] && gen=": Zen 1" || gen=": Zen 2"; }
      echo "$name (family $family model $model$gen), AVX2 only"
    elif has avx512_vp2intersect; then echo "$name, Zen 5 variant (VP2INTERSECT)"
    else echo "$name, Zen 4 variant (no VP2INTERSECT)"; fi ;;
  *)
    isa=$(has avx512f && echo AVX-512 || { has avx2 && echo AVX2 || echo "no AVX2"; })
    has amx_tile && isa="$isa + AMX"
    echo "$name (family $(grep -m1 '^cpu family' "$info" | sed 's/.*: //') model $(grep -m1 '^model\s' "$info" | sed 's/.*: //')), $isa" ;;
esac
