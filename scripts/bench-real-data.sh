#!/usr/bin/env bash
# loraforge against HuggingFace PEFT on variable-length chat, each with its default batching,
# in one run: PEFT as transformers' Trainer batches (shuffled, batches of 4 padded to their
# longest), loraforge as `loraforge train` does (examples packed into rows of --max-seq-len
# 1024, batches of 4 rows), and loraforge with --no-packing (PEFT's padding) to show what the
# packing itself is worth. One epoch each over the same tokens (scripts/peft_chat_epoch.py make:
# the chat file tokenized once with transformers' chat template, the reply scored), alternating
# PEFT, loraforge, loraforge unpacked per round. Reports trained (scored) tokens per second of
# the training loop (model loading excluded on both sides) and peak RSS.
#
#   scripts/bench-real-data.sh path/to/loraforge [OUTDIR]
#   env: EXAMPLES (96) ROUNDS (1) THREADS (2) NOPACK (1: also run --no-packing)
# Use the shipped binary (`cargo build --release -p loraforge`), with nothing else running.
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge [OUTDIR]}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=${BENCH:-$HERE/../../shared/bench}
CACHE=${CACHE:-$HOME/.cache/loraforge-bench}
PY=${PY:-$CACHE/venv/bin/python}
HF=${SMOLLM2_HF_DIR:-$CACHE/models/smollm2-135m-instruct-hf}
EXAMPLES=${EXAMPLES:-96} ROUNDS=${ROUNDS:-1} THREADS=${THREADS:-2} NOPACK=${NOPACK:-1}
mkdir -p "$OUT"

"$PY" "$HERE/peft_chat_epoch.py" make --model "$HF" --out "$OUT" --examples "$EXAMPLES"

peft() {
  /usr/bin/time -v -o "$OUT/peft-$1.time" "$PY" "$HERE/peft_chat_epoch.py" train --model "$HF" \
    --data "$OUT/tokenized.jsonl" --out "$OUT/peft-$1" --threads "$THREADS" --bench "$BENCH" \
    >"$OUT/peft-$1.log" 2>&1 || { tail "$OUT/peft-$1.log"; exit 1; }
  grep '^RESULT ' "$OUT/peft-$1.log" | sed 's/^RESULT //' >"$OUT/peft-$1.json"
}

ours() { # $1 = name, then extra flags
  local name=$1; shift
  /usr/bin/time -v -o "$OUT/$name.time" "$BIN" train --model "$HF" --data "$OUT/tokenized.jsonl" \
    --out "$OUT/$name" --epochs 1 --batch-size 4 --lr 2e-4 --threads "$THREADS" \
    --metrics-jsonl "$OUT/$name.jsonl" "$@" >"$OUT/$name.log" 2>&1 || { tail "$OUT/$name.log"; exit 1; }
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: PEFT"; peft "$r"
  echo "== round $r: loraforge (packing)"; ours "loraforge-$r"
  if [ "$NOPACK" = 1 ]; then echo "== round $r: loraforge --no-packing"; ours "nopack-$r" --no-packing; fi
done

"$PY" - "$OUT" "$ROUNDS" "$NOPACK" <<'PY'
import json, re, statistics, sys
out, rounds, nopack = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rows = [json.loads(l) for l in open(f"{out}/tokenized.jsonl")]
trained = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
def rss(name):
    t = open(f"{out}/{name}.time").read()
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
def ours(name):
    steps = [json.loads(l) for l in open(f"{out}/{name}.jsonl") if '"loss"' in l]
    return {"seconds": steps[-1]["elapsed_seconds"], "steps": len(steps), "rss": rss(name)}
res = {"peft": [], "loraforge": [], "nopack": []}
for r in range(1, rounds + 1):
    p = json.load(open(f"{out}/peft-{r}.json"))
    assert p["trained_tokens"] == trained, (p["trained_tokens"], trained)
    res["peft"].append({"seconds": p["seconds"], "steps": p["steps"], "rss": rss(f"peft-{r}"),
                        "padded": p["padded_tokens"], "real": p["real_tokens"]})
    res["loraforge"].append(ours(f"loraforge-{r}"))
    if nopack:
        res["nopack"].append(ours(f"nopack-{r}"))
print(f"\n{len(rows)} conversations, {sum(len(r['input_ids']) for r in rows)} tokens, {trained} trained")
base = statistics.median(x["seconds"] for x in res["peft"])
for k, label in [("peft", "PEFT (padded batches)"), ("loraforge", "loraforge train (packed)"),
                 ("nopack", "loraforge train --no-packing")]:
    if not res[k]:
        continue
    s = statistics.median(x["seconds"] for x in res[k])
    m = max(x["rss"] for x in res[k])
    extra = f", {res[k][0]['padded']} padded tokens" if k == "peft" else ""
    print(f"{label:32s} {res[k][0]['steps']:3d} steps  {s:8.1f} s  {trained / s:7.1f} trained tok/s"
          f"  ({base / s:.2f}x PEFT)  peak RSS {m:.0f} MiB{extra}")
PY
