#!/usr/bin/env bash
# Peak memory of one attention forward + backward pass at SmolLM2's geometry (9 query
# heads over 3 key heads of 64, causal, rotated): the fused CPU op against the
# device-generic blocked op that GPUs run, each in its own process, and the largest
# gradient difference between the two. Not part of any test run.
#
#   scripts/bench-attention-memory.sh <loraforge-bench> [SEQ=2048] [BATCH=1]
set -euo pipefail
bench=${1:?usage: bench-attention-memory.sh <loraforge-bench> [seq] [batch]}
seq=${2:-2048}
batch=${3:-1}
run() { "$bench" attention --impl "$1" --seq "$seq" --batch "$batch"; }
fused=$(run fused)
blocked=$(run blocked)
grads=$(run both)
python3 - "$fused" "$blocked" "$grads" <<'PY'
import json, sys
f, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
g = [json.loads(l) for l in sys.argv[3].splitlines() if l.strip()]
print(f"attention fwd+bwd, seq {f['seq']}, batch {f['batch']} (peak RSS above the inputs)")
print(f"  fused   {f['pass_peak_mib']:8.1f} MiB  {f['seconds']:.2f} s")
print(f"  blocked {b['pass_peak_mib']:8.1f} MiB  {b['seconds']:.2f} s")
print(f"  blocked / fused: memory {b['pass_peak_mib'] / f['pass_peak_mib']:.2f}x, time {b['seconds'] / f['seconds']:.2f}x")
for x in g:
    print(f"  d{x['gradient']}: largest difference {x['max_abs_diff']:.3g} of {x['max_abs']:.3g} ({x['relative']:.2e} relative)")
PY
