#!/usr/bin/env bash
# The f32 matrix products of a SmolLM2-135M training step (`x·Wᵀ` for the forward pass and
# `g·W` for the input gradient, 1,024 rows, 2 threads each), by every candidate, in turns:
# torch.matmul (what PEFT trains with), candle's gemm 0.19, and each BLAS library found
# (through the function loraforge's ops call: single-threaded BLAS calls split over
# rayon's pool). Prints GFLOP/s per shape and engine, each engine's ratio to torch, and
# its largest relative error against gemm. Timing only; no test runs this.
#
#   scripts/bench-gemm.sh path/to/loraforge-bench
#   env: ROUNDS (2) REPS (10) ROWS (1024) THREADS (2) PY (the baseline's venv python)
#        SHAPES (INxOUT,...; SmolLM2's by default; an SD 1.5 UNet's 3x3 convolutions at
#        512 px as im2col products: ROWS=4096 SHAPES=2880x320, ROWS=1024 SHAPES=5760x640)
#        BLAS_LIBS (comma-separated; default: the scipy-openblas32 OpenBLAS of
#        scripts/setup-blas.sh, Debian's OpenBLAS and BLIS where installed)
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge-bench}
PY=${PY:-$HOME/.cache/loraforge-bench/venv/bin/python}
ROUNDS=${ROUNDS:-2} REPS=${REPS:-10} ROWS=${ROWS:-1024} THREADS=${THREADS:-2}
SHAPES=${SHAPES:-576x576,576x192,576x1536,1536x576,576x49152}
if [ -z "${BLAS_LIBS:-}" ]; then
  libs=("$(bash "$(dirname "$0")/setup-blas.sh" | tail -n1 || true)")
  for l in /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
           /usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4; do
    if [ -f "$l" ]; then libs+=("$l"); fi
  done
  BLAS_LIBS=$(IFS=,; echo "${libs[*]}")
fi
echo "BLAS libraries: $BLAS_LIBS"
OUT=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
  "$PY" - "$ROWS" "$SHAPES" "$REPS" "$THREADS" >>"$OUT" <<'PY'
import json, sys, time, torch
rows, shapes, reps, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
for shape in shapes.split(","):
    i, o = map(int, shape.split("x"))
    x, g, w = torch.randn(rows, i), torch.randn(rows, o), torch.randn(o, i)
    for name, a, b in (("x.Wt", x, w.t()), ("g.W", g, w)):
        a @ b
        secs = []
        for _ in range(reps):
            t = time.perf_counter(); a @ b; secs.append(time.perf_counter() - t)
        med = sorted(secs)[len(secs) // 2]
        print(json.dumps({"engine": "torch", "op": name, "rows": rows, "in": i, "out": o,
                          "seconds": med, "gflops": 2 * rows * i * o / med / 1e9}))
PY
  # A library that refuses this CPU (old kernels) is reported, and the rest still run.
  # Each process alternates candle's gemm with one library (gemm alone first).
  "$BIN" gemm --rows "$ROWS" --shapes "$SHAPES" --reps "$REPS" --threads "$THREADS" >>"$OUT"
  for lib in ${BLAS_LIBS//,/ }; do
    if ! "$BIN" gemm --rows "$ROWS" --shapes "$SHAPES" --reps "$REPS" --threads "$THREADS" \
         --blas "$lib" >>"$OUT"; then
      echo "skipped: $lib" >&2
    fi
  done
done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
key = lambda r: (r["op"], r["in"], r["out"])
engines = list(dict.fromkeys(r["engine"] for r in runs if r["engine"] != "torch"))
for e in engines:
    about = next(r.get("about", e) for r in runs if r["engine"] == e)
    print(f"{e}: {about}")
print(f"{'op':<5} {'in x out':>11} {'torch':>8} " + " ".join(f"{e[-24:]:>26}" for e in engines))
for k in dict.fromkeys(key(r) for r in runs):
    med = lambda e: statistics.median(r["gflops"] for r in runs if key(r) == k and r["engine"] == e)
    t = med("torch")
    cells = []
    for e in engines:
        g = med(e)
        err = max((r.get("rel_err_vs_gemm", 0) for r in runs if key(r) == k and r["engine"] == e), default=0)
        cells.append(f"{g:6.1f} ({g / t:4.2f}x, {err:7.1e})")
    print(f"{k[0]:<5} {f'{k[1]}x{k[2]}':>11} {t:>8.1f} " + " ".join(f"{c:>26}" for c in cells))
print("GFLOP/s (ratio to torch, relative error against candle's gemm)")
PY
rm -f "$OUT"
