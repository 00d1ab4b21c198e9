#!/usr/bin/env bash
# Names the CPU variant this machine is, for the heading of every benchmark:
# the vendor's model name, and for AMD EPYC which Zen generation (Zen 5 has
# VP2INTERSECT, Zen 4 does not), e.g. "AMD EPYC, Zen 4 variant (no
# VP2INTERSECT)" or "Intel(R) Xeon(R) Processor (family 6 model 167), AVX-512 + AMX".
set -euo pipefail
info=/proc/cpuinfo
name=$(grep -m1 '^model name' "$info" | sed 's/.*: //')
flags=$(grep -m1 '^flags' "$info")
has() { grep -qw "$1" <<<"$flags"; }
case "$(grep -m1 '^vendor_id' "$info" | sed 's/.*: //')" in
  AuthenticAMD)
    if has avx512_vp2intersect; then echo "$name, Zen 5 variant (VP2INTERSECT)"
    else echo "$name, Zen 4 variant (no VP2INTERSECT)"; fi ;;
  *)
    isa=$(has avx512f && echo AVX-512 || { has avx2 && echo AVX2 || echo "no AVX2"; })
    has amx_tile && isa="$isa + AMX"
    echo "$name (family $(grep -m1 '^cpu family' "$info" | sed 's/.*: //') model $(grep -m1 '^model\s' "$info" | sed 's/.*: //')), $isa" ;;
esac
