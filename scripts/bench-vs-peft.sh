#!/usr/bin/env bash
# loraforge against HuggingFace PEFT + PyTorch on the same CPU, in one run: PEFT's baseline
# (../shared/bench/peft_causal_lm.py) dumps its token batches and initial adapter, then the
# two engines train alternately (PEFT, loraforge, PEFT, loraforge, ...) on those batches from
# that adapter with the same recipe (file order, constant lr 2e-4, no weight decay, no
# clipping, dropout 0, PEFT's fixed-length rows as they are: --no-packing). Alternating
# spreads the VM's drift over both engines; the ratios compare medians from the same run.
# Prints tokens/s, peak RSS, their ratios and both loss curves; exits 1 if any step's loss
# differs by 1% or more.
#
#   scripts/bench-vs-peft.sh path/to/loraforge [OUTDIR]
#   env: STEPS (20) SEQ (256) BATCH (4) TARGETS (all | qv) ROUNDS (2) THREADS (2)
#        LORAFORGE_BLAS (the BLAS loraforge multiplies with; scripts/setup-blas.sh)
#        GEMM_TOO=1: each round also trains loraforge on candle's gemm (LORAFORGE_BLAS=off),
#        the engine without a BLAS, third in turn
#        BEFORE=path/to/another/loraforge: each round also trains that build (the one
#        before a change), last in turn, so a change is measured against PEFT and its
#        predecessor in one run
# The binary is what users run: `cargo build --release -p loraforge` and pass
# target/release/loraforge (`loraforge train` is what is timed). Run nothing else
# meanwhile: wait until `pgrep -x rustc` is empty and nothing else trains.
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge [OUTDIR]}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$HERE/../../shared/bench}
CACHE=${CACHE:-$HOME/.cache/loraforge-bench}
PY=${PY:-$CACHE/venv/bin/python}
HF=${SMOLLM2_HF_DIR:-$CACHE/models/smollm2-135m-instruct-hf}
STEPS=${STEPS:-20} SEQ=${SEQ:-256} BATCH=${BATCH:-4} TARGETS=${TARGETS:-all} ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
mkdir -p "$OUT"

peft() { # $1 = round
  local extra=()
  [ "$1" = 1 ] && extra=(--save-init --dump-data "$OUT/batches.safetensors")
  /usr/bin/time -v -o "$OUT/peft-$1.time" "$PY" "$BENCH/peft_causal_lm.py" --model "$HF" --targets "$TARGETS" \
    --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --threads "$THREADS" --json --out "$OUT/peft" "${extra[@]}" \
    >"$OUT/peft-$1.log" 2>&1
  grep -E "tokens/s|RSS" "$OUT/peft-$1.log" | sed "s/^/  PEFT $1: /"
}

ours() { # $1 = tag; env RUN_BIN: the binary, $BIN unless set
  /usr/bin/time -v -o "$OUT/loraforge-$1.time" "${RUN_BIN:-$BIN}" train --model "$HF" --data "$OUT/batches.jsonl" \
    --init-adapter "$OUT/peft-init" --out "$OUT/loraforge-$1" --batch-size "$BATCH" --max-seq-len "$SEQ" \
    --max-steps "$STEPS" --lr 2e-4 --scheduler constant --weight-decay 0 --max-grad-norm 0 --dropout 0 \
    --no-shuffle --no-packing --threads "$THREADS" --metrics-jsonl "$OUT/loraforge-$1.jsonl" \
    >"$OUT/loraforge-$1.log" 2>&1 || { tail "$OUT/loraforge-$1.log"; exit 1; }
  grep -E "Maximum resident" "$OUT/loraforge-$1.time" | sed "s/^\s*/  loraforge $1: /"
  grep -E "^matrix products" "$OUT/loraforge-$1.log" | sed "s/^/  loraforge $1: /" || true
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: PEFT"
  peft "$r"
  if [ "$r" = 1 ]; then
    "$PY" - "$OUT/batches.safetensors" "$OUT/batches.jsonl" <<'PY'
import json, sys
from safetensors.numpy import load_file
ids = load_file(sys.argv[1])["input_ids"]
with open(sys.argv[2], "w") as f:
    for row in ids:
        f.write(json.dumps({"input_ids": [int(x) for x in row]}) + "\n")
PY
  fi
  echo "== round $r: loraforge"
  ours "$r"
  if [ "${GEMM_TOO:-0}" = 1 ]; then
    echo "== round $r: loraforge on candle's gemm"
    LORAFORGE_BLAS=off ours "gemm-$r"
  fi
  if [ -n "${BEFORE:-}" ]; then
    echo "== round $r: loraforge, the build before ($BEFORE)"
    RUN_BIN="$BEFORE" ours "before-$r"
  fi
done

"$PY" - "$OUT" "$ROUNDS" "$BATCH" "$SEQ" <<'PY'
import json, re, statistics, sys
out, rounds, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rss_mib(path):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read()).group(1)) / 1024
import os
def run(tag):
    o = [json.loads(l) for l in open(f"{out}/loraforge-{tag}.jsonl")]
    el = [0.0] + [m["elapsed_seconds"] for m in o]
    # The first 2 steps are warm-up, as in the baseline's own median.
    steps = [el[i + 1] - el[i] for i in range(len(o))][2:]
    return {"tps": batch * seq / statistics.median(steps), "rss": rss_mib(f"{out}/loraforge-{tag}.time"),
            "losses": [m["loss"] for m in o]}
peft, ours, gemm, before = [], [], [], []
for r in range(1, rounds + 1):
    p = json.loads([l for l in open(f"{out}/peft-{r}.log") if l.startswith("RESULT ")][0][7:])
    peft.append({"tps": p["train_tokens_per_s"], "rss": rss_mib(f"{out}/peft-{r}.time"),
                 "rss_self": p["peak_rss_process_mib"], "losses": p["losses"]})
    ours.append(run(r))
    if os.path.exists(f"{out}/loraforge-gemm-{r}.jsonl"):
        gemm.append(run(f"gemm-{r}"))
    if os.path.exists(f"{out}/loraforge-before-{r}.jsonl"):
        before.append(run(f"before-{r}"))
worst = 0.0
print(f"{'step':>4} {'PEFT':>8} {'loraforge':>10} {'rel diff':>9}")
for i, (p, o) in enumerate(zip(peft[0]["losses"], ours[0]["losses"])):
    d = abs(o - p) / p
    print(f"{i + 1:>4} {p:>8.4f} {o:>10.4f} {d:>9.3%}")
for pr, orr in zip(peft * 3, ours + gemm + before):
    if len(pr["losses"]) != len(orr["losses"]):
        worst = float("inf")
    for p, o in zip(pr["losses"], orr["losses"]):
        worst = max(worst, abs(o - p) / p)
for r in range(rounds):
    print(f"round {r + 1}: tokens/s PEFT {peft[r]['tps']:.1f} loraforge {ours[r]['tps']:.1f}   "
          f"peak RSS PEFT {peft[r]['rss']:.0f} MiB (self-reported {peft[r]['rss_self']:.0f}) loraforge {ours[r]['rss']:.0f} MiB")
pt, ot = statistics.median(x["tps"] for x in peft), statistics.median(x["tps"] for x in ours)
prs, ors = max(x["rss"] for x in peft), max(x["rss"] for x in ours)
print(f"worst per-step loss difference over {rounds} round(s): {worst:.3%} (bar: 1%)")
print(f"tokens/s  PEFT {pt:.1f}  loraforge {ot:.1f}  ratio {ot / pt:.2f}")
if gemm:
    gt = statistics.median(x["tps"] for x in gemm)
    print(f"tokens/s  loraforge on candle's gemm {gt:.1f}  ratio to PEFT {gt / pt:.2f}  "
          f"(loraforge as configured: {ot / gt:.2f}x gemm)  peak RSS {max(x['rss'] for x in gemm):.0f} MiB")
if before:
    bt = statistics.median(x["tps"] for x in before)
    for r, b in enumerate(before):
        print(f"round {r + 1}: tokens/s the build before {b['tps']:.1f}, peak RSS {b['rss']:.0f} MiB")
    print(f"tokens/s  the build before {bt:.1f}  ratio to PEFT {bt / pt:.2f}  "
          f"(this build: {ot / bt:.2f}x the one before)  peak RSS {max(x['rss'] for x in before):.0f} MiB")
print(f"peak RSS  PEFT {prs:.0f} MiB  loraforge {ors:.0f} MiB  ratio {ors / prs:.2f}")
print("SUMMARY " + json.dumps({"peft_tps": pt, "loraforge_tps": ot, "tps_ratio": ot / pt,
      "peft_rss_mib": prs, "loraforge_rss_mib": ors, "rss_ratio": ors / prs, "worst_loss_diff": worst}))
sys.exit(0 if worst < 0.01 else 1)
PY
