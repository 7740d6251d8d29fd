#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no cargo and no network
# (a lent machine that takes a folder of files along): the CUDA builds of `loraforge`,
# `loraforge-bench` and the `fidelity` test binary, stripped and xz-compressed (about
# 35 MB), and the diffusers wheel for the SD step. On that machine, from a checkout:
#
#   bash scripts/gpu-pack.sh [DIR]             # here: builds, writes DIR (default .gpu/)
#   bash scripts/gpu-run-packed.sh [DIR]       # there: unpacks and runs gpu-check.sh
#
# env: CUDA_COMPUTE_CAP (90: H100/H200), CARGO_TARGET_DIR (~/.cache/loraforge/target-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu}
eval "$(bash scripts/setup-cuda.sh)"
export CUDA_COMPUTE_CAP=${GPU_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/target-cuda}
cargo build --workspace --features loraforge/cuda --bins >&2
fidelity=$(cargo test --workspace --features loraforge/cuda --test fidelity --no-run --message-format json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "fidelity" and m.get("executable"):
        print(m["executable"])')
mkdir -p "$dir/bin" "$dir/whl"
pack() { strip -o "$dir/bin/$2" "$1" && xz -T0 -3 -f "$dir/bin/$2"; }
pack "$CARGO_TARGET_DIR/debug/loraforge" loraforge
pack "$CARGO_TARGET_DIR/debug/loraforge-bench" loraforge-bench
pack "$fidelity" fidelity
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d "$dir/whl" diffusers==0.42.1 importlib_metadata==10.2.0
du -sh "$dir"
