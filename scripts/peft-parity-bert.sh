#!/usr/bin/env bash
# loraforge against PEFT on the real all-MiniLM-L6-v2 (BERT) for sequence classification,
# in one run: PEFT's baseline (../shared/bench/peft_bert_cls.py, query,value r8, 2 labels,
# model dropout off) trains 20 steps and writes its initial adapter (LoRA + classifier
# head) and token batches; loraforge trains from that adapter on those batches (file
# order, constant lr 2e-4, no weight decay, no clipping). Prints both loss curves (they
# must agree within 1% at every step) and checks that PEFT loads loraforge's adapter with
# no missing or unexpected keys.
#
#   scripts/peft-parity-bert.sh path/to/loraforge [OUTDIR]
# Needs a venv with torch + transformers + peft (scripts/setup-python.sh; PY=... to pick
# another) and models/all-MiniLM-L6-v2 (scripts/fetch-models.sh).
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge [OUTDIR]}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$HERE/../../shared/bench}
VENV=${LORAFORGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/venv}
PY=${PY:-$VENV/bin/python}
MODEL=${MINILM_DIR:-$HERE/../models/all-MiniLM-L6-v2}
STEPS=${STEPS:-20}
BATCH=${BATCH:-16}
SEQ=${SEQ:-128}
mkdir -p "$OUT"

echo "== PEFT baseline ($STEPS steps, batch $BATCH, seq $SEQ)"
"$PY" "$BENCH/peft_bert_cls.py" --model "$MODEL" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --threads 2 \
  --no-model-dropout --json --out "$OUT/peft" --save-init --dump-data "$OUT/batches.safetensors" \
  | tee "$OUT/peft.log" | grep -E "^step|tokens/s|RSS"

# The batches as classification JSONL: real tokens only (the mask drops the padding).
"$PY" - "$OUT/batches.safetensors" "$OUT/batches.jsonl" <<'PY'
import json, sys
from safetensors.numpy import load_file
t = load_file(sys.argv[1])
with open(sys.argv[2], "w") as f:
    for ids, mask, label in zip(t["input_ids"], t["attention_mask"], t["labels"]):
        n = int(mask.sum())
        f.write(json.dumps({"input_ids": [int(x) for x in ids[:n]], "label": int(label)}) + "\n")
PY

echo "== loraforge ($STEPS steps)"
/usr/bin/time -v -o "$OUT/loraforge.time" "$BIN" train --task sequence_classification --model "$MODEL" \
  --data "$OUT/batches.jsonl" --init-adapter "$OUT/peft-init" --out "$OUT/loraforge" --no-shuffle \
  --batch-size "$BATCH" --max-seq-len "$SEQ" --max-steps "$STEPS" --lr 2e-4 --scheduler constant \
  --weight-decay 0 --max-grad-norm 0 --dropout 0 --no-model-dropout --threads 2 \
  --metrics-jsonl "$OUT/loraforge.jsonl" 2>&1 | grep -E "^step" || true

echo "== PEFT loads loraforge's adapter"
"$PY" "$BENCH/peft_load_adapter.py" --kind seq-cls --base "$MODEL" --adapter "$OUT/loraforge" | tee "$OUT/load.log"
grep -q "PEFT load check: OK" "$OUT/load.log"

"$PY" - "$OUT" "$BATCH" "$SEQ" <<'PY'
import json, re, statistics, sys
out, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
peft = json.loads([l for l in open(f"{out}/peft.log") if l.startswith("RESULT ")][0][7:])
ours = [json.loads(l) for l in open(f"{out}/loraforge.jsonl")]
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/loraforge.time").read()).group(1))
worst = 0.0
print(f"{'step':>4} {'PEFT':>8} {'loraforge':>10} {'rel diff':>9}")
for i, (p, o) in enumerate(zip(peft["losses"], ours)):
    d = abs(o["loss"] - p) / p
    worst = max(worst, d)
    print(f"{i + 1:>4} {p:>8.4f} {o['loss']:>10.4f} {d:>9.3%}")
el = [0.0] + [o["elapsed_seconds"] for o in ours]
steps = [el[i + 1] - el[i] for i in range(len(ours))][2:]
ours_eps = batch / statistics.median(steps)
print(f"worst per-step loss difference {worst:.3%} (bar: 1%; PEFT's losses are printed to 4 digits)")
print(f"examples/s  PEFT {peft['examples_per_s']:.1f}   loraforge {ours_eps:.1f}   ratio {ours_eps / peft['examples_per_s']:.2f}")
print(f"peak RSS  PEFT {peft['peak_rss_process_mib']:.0f} MiB   loraforge {rss_kb / 1024:.0f} MiB")
sys.exit(0 if worst < 0.01 and len(ours) == len(peft["losses"]) else 1)
PY
