#!/usr/bin/env bash
# Training memory and speed by model size, over a packed (quantized) base: llama-shaped
# GGUFs with random weights (Llama 3.2 1B / 3B, Llama 3.1 8B shapes, written by
# `loraforge-bench gguf`), each trained for 2 steps by `loraforge train` at batch 1 x 512
# tokens, LoRA r 16 on all linear layers, 2 threads. Prints peak RSS (GNU time) and
# seconds per step. And SmolLM2-135M's Q4_1 GGUF kept packed (`--base-dtype auto`)
# against dequantized (`--base-dtype f32`): peak RSS, tokens/s, and whether the losses
# are the same. Not part of any test run.
#
#   scripts/bench-model-sizes.sh <loraforge> <loraforge-bench> [SHAPES="1b 3b 8b"] [QUANTS="q4_k q8_0"]
#
# CKPT="0 1" (the default) runs each model without and with --gradient-checkpointing;
# SMOL=0 skips the SmolLM2 comparison.
#
# Models are cached under ${CACHE:-~/.cache/loraforge-bench/sizes} (1b q4_k 0.7 GB ...
# 8b q8_0 8.5 GB).
set -euo pipefail
lf=$(realpath "${1:?usage: bench-model-sizes.sh <loraforge> <loraforge-bench> [shapes] [quants]}")
bench=$(realpath "${2:?usage: bench-model-sizes.sh <loraforge> <loraforge-bench> [shapes] [quants]}")
shapes=${3:-1b 3b 8b}
quants=${4:-q4_k q8_0}
cache=${CACHE:-$HOME/.cache/loraforge-bench/sizes}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Text long enough for 512 byte-level tokens per example.
python3 - "$work/text.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = ["alpha", "beta", "gamma", "delta", "loraforge", "adapter", "train", "quantized", "memory", "the", "of", "a"]
with open(sys.argv[1], "w") as f:
    for _ in range(8):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(200))}) + "\n")
PY

# Runs `loraforge train` under GNU time; prints "peak_mib s_step1 s_step2 ... | losses | tokens/s".
train() {
  local model=$1 base=$2 batch=$3 seq=$4 steps=$5 data=$6 ckpt=${7:-0}
  local extra=()
  [ "$ckpt" = 1 ] && extra=(--gradient-checkpointing)
  rm -rf "$work/out" "$work/m.jsonl"
  /usr/bin/time -f '%M' -o "$work/rss" "$lf" train "${extra[@]}" --model "$model" --data "$data" --out "$work/out" \
    --max-steps "$steps" --batch-size "$batch" --max-seq-len "$seq" --rank 16 --alpha 32 \
    --target-modules all-linear --base-dtype "$base" --no-packing --threads 2 --metrics-jsonl "$work/m.jsonl" \
    > "$work/log" 2>&1 || { tail -20 "$work/log" >&2; return 1; }
  python3 - "$work/m.jsonl" "$(cat "$work/rss")" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "loss" in r and "elapsed_seconds" in r]
t = [r["elapsed_seconds"] for r in rows]
steps = [t[0]] + [b - a for a, b in zip(t, t[1:])]
print(f"{int(sys.argv[2]) / 1024:.0f}", " ".join(f"{s:.1f}" for s in steps),
      "|", " ".join(f"{r['loss']:.6f}" for r in rows), "|", f"{rows[-1].get('tokens_per_second', 0):.1f}")
PY
}

echo "## Llama shapes, random weights, 2 steps at batch 1 x 512, r 16 all-linear, 2 threads"
echo "| shape | base | file | checkpointing | peak RSS (MiB) | step 1 s | step 2 s |"
echo "|---|---|---|---|---|---|---|"
for shape in $shapes; do
  for q in $quants; do
    m="$cache/llama-$shape-$q.gguf"
    [ -f "$m" ] || "$bench" gguf --shape "$shape" --quant "$q" --out "$m" 2>/dev/null
    size=$(du -m "$m" | cut -f1)
    for ck in ${CKPT:-0 1}; do
      r=$(train "$m" auto 1 512 2 "$work/text.jsonl" "$ck")
      set -- $r
      echo "| $shape | $q | ${size} MiB | $([ "$ck" = 1 ] && echo yes || echo no) | $1 | $2 | $3 |"
    done
  done
done

smol="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$smol" ] || smol=$(ls "$HOME"/.cache/loraforge/models/*.gguf 2>/dev/null | head -1 || true)
if [ "${SMOL:-1}" = 1 ] && [ -f "$smol" ]; then
  echo
  echo "## SmolLM2-135M Q4_1 GGUF, chat-small, batch 4 x 256, 8 steps, r 16 all-linear"
  for base in auto f32; do
    r=$(train "$smol" "$base" 4 256 8 "$root/tests/data/chat-small.jsonl")
    echo "$base: $r"
  done
fi
