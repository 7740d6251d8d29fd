#!/usr/bin/env bash
# loraforge against PEFT itself on SmolLM2-135M-Instruct, in one run on one machine:
# PEFT's baseline (../shared/bench/peft_causal_lm.py) trains 20 steps and writes its
# initial adapter and token batches; loraforge trains from that adapter on those batches
# (file order, dropout 0, constant lr 2e-4, no weight decay, no clipping). Prints the
# per-step losses side by side (must agree within 1%), tokens/s and peak RSS of both.
#
#   scripts/peft-parity.sh path/to/loraforge [OUTDIR]
# Needs the baseline's venv and converted model (bash ../shared/bench/setup.sh).
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge [OUTDIR]}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$HERE/../../shared/bench}
CACHE=${CACHE:-$HOME/.cache/loraforge-bench}
PY=${PY:-$CACHE/venv/bin/python}
HF=${SMOLLM2_HF_DIR:-$CACHE/models/smollm2-135m-instruct-hf}
STEPS=${STEPS:-20}
mkdir -p "$OUT"

echo "== PEFT baseline ($STEPS steps)"
"$PY" "$BENCH/peft_causal_lm.py" --model "$HF" --targets all --batch 4 --seq 256 --steps "$STEPS" --threads 2 \
  --json --out "$OUT/peft" --save-init --dump-data "$OUT/batches.safetensors" | tee "$OUT/peft.log" | grep -E "^step|tokens/s|RSS"

"$PY" - "$OUT/batches.safetensors" "$OUT/batches.jsonl" <<'PY'
import json, sys
from safetensors.numpy import load_file
ids = load_file(sys.argv[1])["input_ids"]
with open(sys.argv[2], "w") as f:
    for row in ids:
        f.write(json.dumps({"input_ids": [int(x) for x in row]}) + "\n")
PY

echo "== loraforge ($STEPS steps)"
/usr/bin/time -v -o "$OUT/loraforge.time" "$BIN" train --model "$HF" --data "$OUT/batches.jsonl" \
  --init-adapter "$OUT/peft-init" --out "$OUT/loraforge" --no-shuffle --no-packing --batch-size 4 --max-seq-len 256 \
  --max-steps "$STEPS" --lr 2e-4 --scheduler constant --weight-decay 0 --max-grad-norm 0 --dropout 0 \
  --threads 2 --metrics-jsonl "$OUT/loraforge.jsonl" 2>&1 | grep -E "^step" || true

"$PY" - "$OUT" <<'PY'
import json, re, statistics, sys
out = sys.argv[1]
peft = json.loads([l for l in open(f"{out}/peft.log") if l.startswith("RESULT ")][0][7:])
ours = [json.loads(l) for l in open(f"{out}/loraforge.jsonl")]
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/loraforge.time").read()).group(1))
worst = 0.0
print(f"{'step':>4} {'PEFT':>8} {'loraforge':>10} {'rel diff':>9}")
for i, (p, o) in enumerate(zip(peft["losses"], ours)):
    d = abs(o["loss"] - p) / p
    worst = max(worst, d)
    print(f"{i + 1:>4} {p:>8.4f} {o['loss']:>10.4f} {d:>9.2%}")
# Per-step rate from elapsed time; the first 2 steps are warm-up, as in the baseline.
el = [0.0] + [o["elapsed_seconds"] for o in ours]
steps = [el[i + 1] - el[i] for i in range(len(ours))][2:]
tok_step = 4 * 256
ours_tps = tok_step / statistics.median(steps)
print(f"worst per-step loss difference {worst:.3%} (bar: 1%)")
print(f"tokens/s  PEFT {peft['train_tokens_per_s']:.1f}   loraforge {ours_tps:.1f}   ratio {ours_tps / peft['train_tokens_per_s']:.2f}")
print(f"peak RSS  PEFT {peft['peak_rss_process_mib']:.0f} MiB   loraforge {rss_kb / 1024:.0f} MiB")
sys.exit(0 if worst < 0.01 and len(ours) == len(peft["losses"]) else 1)
PY
