#!/usr/bin/env bash
# DPO: `loraforge train --method dpo` against the torch + PEFT reference
# (scripts/dpo_reference.py, TRL's sigmoid loss written out) on SmolLM2, in one run, from
# the same fresh PEFT adapter on the same pairs (file order, constant lr, clipping at 1).
# The two alternate for ROUNDS rounds; prints each run's seconds per step (the training
# loop only: model loading excluded on both sides), peak RSS (the whole process) and the
# step losses' largest relative difference.
#
#   scripts/bench-dpo-vs-torch.sh path/to/loraforge [OUTDIR]
#   env: MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf) DATA (tests/data/preference.jsonl)
#        STEPS (10) BATCH (4 pairs) LR (2e-4) ROUNDS (2) THREADS (2) VENV (~/.cache/loraforge/venv)
# Run nothing else meanwhile.
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge [OUTDIR]}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-$HERE/../models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-$HERE/../tests/data/preference.jsonl}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/venv}
STEPS=${STEPS:-10} BATCH=${BATCH:-4} LR=${LR:-2e-4} ROUNDS=${ROUNDS:-2} THREADS=${THREADS:-2}
mkdir -p "$OUT"
rss() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"; }
for r in $(seq 1 "$ROUNDS"); do
  start=(--adapter "$OUT/init")
  [ "$r" = 1 ] && start=(--adapter-out "$OUT/init")
  /usr/bin/time -v -o "$OUT/torch-$r.time" "$VENV/bin/python" "$HERE/dpo_reference.py" --base "$MODEL" \
    --data "$DATA" "${start[@]}" --out "$OUT/torch-$r.json" --steps "$STEPS" --batch "$BATCH" --lr "$LR" \
    --threads "$THREADS" >"$OUT/torch-$r.log" 2>&1 || { tail "$OUT/torch-$r.log"; exit 1; }
  /usr/bin/time -v -o "$OUT/loraforge-$r.time" "$BIN" train --method dpo --model "$MODEL" --data "$DATA" \
    --init-adapter "$OUT/init" --out "$OUT/loraforge-$r" --max-steps "$STEPS" --batch-size "$BATCH" \
    --lr "$LR" --scheduler constant --no-shuffle --max-grad-norm 1 --threads "$THREADS" \
    --metrics-jsonl "$OUT/loraforge-$r.jsonl" >"$OUT/loraforge-$r.log" 2>&1 || { tail "$OUT/loraforge-$r.log"; exit 1; }
  "$VENV/bin/python" - "$OUT" "$r" "$(rss "$OUT/torch-$r.time")" "$(rss "$OUT/loraforge-$r.time")" <<'PY'
import json, sys
out, r, rss_t, rss_l = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = json.load(open(f"{out}/torch-{r}.json"))
ours = [json.loads(l) for l in open(f"{out}/loraforge-{r}.jsonl")]
# The first step carries one-off costs on both sides; steps 2.. are the steady state.
ours_sps = (ours[-1]["elapsed_seconds"] - ours[0]["elapsed_seconds"]) / max(1, len(ours) - 1)
diff = max(abs(a["loss"] - b) / b for a, b in zip(ours, t["losses"]))
print(f"round {r}: torch+PEFT {t['seconds_per_step']:.3f} s/step, peak RSS {rss_t / 1024:.0f} MiB; "
      f"loraforge {ours_sps:.3f} s/step, peak RSS {rss_l / 1024:.0f} MiB; "
      f"speed x{t['seconds_per_step'] / ours_sps:.2f}, memory x{rss_t / rss_l:.2f}; "
      f"largest step-loss difference {diff:.2e}")
PY
done
echo "(runs in $OUT)"
