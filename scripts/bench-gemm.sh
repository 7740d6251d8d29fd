#!/usr/bin/env bash
# candle's f32 matmul (through gemm, what loraforge trains with) against torch.matmul (what
# PEFT trains with) at the shapes of a SmolLM2-135M training step, alternately, 2 threads
# each: `x·Wᵀ` for the forward pass and `g·W` for the input gradient, 1,024 rows. Prints
# GFLOP/s per shape and engine, and each shape's ratio. Timing only; no test runs this.
#
#   scripts/bench-gemm.sh path/to/loraforge-bench
#   env: ROUNDS (2) REPS (10) ROWS (1024) THREADS (2) PY (the baseline's venv python)
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge-bench}
PY=${PY:-$HOME/.cache/loraforge-bench/venv/bin/python}
ROUNDS=${ROUNDS:-2} REPS=${REPS:-10} ROWS=${ROWS:-1024} THREADS=${THREADS:-2}
SHAPES=576x576,576x192,576x1536,1536x576,576x49152
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
  "$BIN" gemm --rows "$ROWS" --shapes "$SHAPES" --reps "$REPS" --threads "$THREADS" >>"$OUT"
done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
key = lambda r: (r["op"], r["in"], r["out"])
print(f"{'op':<5} {'in x out':>11} {'torch GFLOP/s':>14} {'candle GFLOP/s':>15} {'candle/torch':>13}")
for k in dict.fromkeys(key(r) for r in runs):
    t = statistics.median(r["gflops"] for r in runs if key(r) == k and r["engine"] == "torch")
    c = statistics.median(r["gflops"] for r in runs if key(r) == k and r["engine"] == "candle")
    print(f"{k[0]:<5} {f'{k[1]}x{k[2]}':>11} {t:>14.1f} {c:>15.1f} {c / t:>13.2f}")
PY
rm -f "$OUT"
