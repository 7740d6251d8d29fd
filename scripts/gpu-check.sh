#!/usr/bin/env bash
# One command for a lent GPU: builds with CUDA, runs the trainer's PEFT fidelity suite on
# the GPU, and measures `loraforge train` (tokens/s, peak device memory) in f32 and bf16
# beside PEFT + PyTorch when a Python with torch is at hand; prints one table.
#
#   scripts/gpu-check.sh                 # DEVICE=cuda:0, SmolLM2 when models/ has it
#   DEVICE=cpu scripts/gpu-check.sh      # the same steps, tiny, on the CPU (CI runs this)
#
# env: DEVICE (cuda:0) MODEL (models/SmolLM2-135M-Instruct.Q4_1.gguf, else the tiny
#      llama fixture) BATCH SEQ STEPS (8 1024 8 on a GPU; 2 64 4 on the CPU) RANK (16)
#      PEFT_PY (a python with torch + transformers + peft; skipped without one)
#      HF_MODEL (an HF folder of the same model, for PEFT) PROFILE (release; CI: dev)
#      SD_UNET (a diffusers unet/ folder: one SD step at 512 px) OUT (a temp folder)
# Timing is noisy on shared machines: compare the two engines' numbers from one run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
mkdir -p "$OUT"
features=()
if [[ $DEVICE == cuda* ]]; then
  features=(--features cuda)
  if ! command -v nvcc >/dev/null; then eval "$(bash scripts/setup-cuda.sh)"; fi
  # Build the kernels for the GPU at hand.
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d .)
  [ -n "$cap" ] && export CUDA_COMPUTE_CAP=$cap
  BATCH=${BATCH:-8} SEQ=${SEQ:-1024} STEPS=${STEPS:-8}
else
  BATCH=${BATCH:-2} SEQ=${SEQ:-64} STEPS=${STEPS:-4}
fi
RANK=${RANK:-16}
if [ -z "${MODEL:-}" ]; then
  MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
  [[ $DEVICE == cuda* && -f $MODEL ]] || MODEL=tests/fixtures/tiny-llama
fi
target=${CARGO_TARGET_DIR:-target}
dir=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
bin="$target/$dir/loraforge"
step() { echo "== $*" >&2; }

step "build ($PROFILE, ${features[*]:-cpu})"
cargo build --profile "$PROFILE" "${features[@]}" -p loraforge >&2

step "PEFT fidelity suite on $DEVICE"
LORAFORGE_TEST_DEVICE=$DEVICE cargo test --profile "$PROFILE" "${features[@]}" \
  -p loraforge-trainer --test fidelity -- --test-threads 1 >"$OUT/fidelity.log" 2>&1 \
  || { tail -40 "$OUT/fidelity.log"; exit 1; }
fidelity=$(grep -E "^test result" "$OUT/fidelity.log" | tail -n1)

# Training data long enough to fill SEQ tokens per row.
python3 - "$OUT/data.jsonl" "$SEQ" <<'PY'
import json, random, sys
rng = random.Random(0)
words = "the model learns what the data says and the loss goes down as it trains".split()
with open(sys.argv[1], "w") as f:
    for i in range(64):
        text = " ".join(rng.choice(words) for _ in range(int(sys.argv[2])))
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Say something {i}."},
                                         {"role": "assistant", "content": text}]}) + "\n")
PY

# Peak device memory of a command: nvidia-smi's used memory, sampled, on a GPU; the
# process's peak RSS on the CPU. Prints MiB.
peak_of() {
  local log=$1; shift
  if [[ $DEVICE == cuda* ]]; then
    local idx=${DEVICE#cuda:} base peak=0
    base=$(nvidia-smi -i "$idx" --query-gpu=memory.used --format=csv,noheader,nounits)
    "$@" >"$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
      local m
      m=$(nvidia-smi -i "$idx" --query-gpu=memory.used --format=csv,noheader,nounits)
      [ "$m" -gt "$peak" ] && peak=$m
      sleep 0.2
    done
    wait "$pid"
    echo $((peak - base))
  else
    /usr/bin/time -f "%M" -o "$log.rss" "$@" >"$log" 2>&1
    echo $(($(cat "$log.rss") / 1024))
  fi
}

# Median tokens/s over the steps after the first two.
tokens_per_s() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tps = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][2:] or [0]
print(f"{statistics.median(tps):.0f}")
PY
}

rows=()
for dtype in f32 bf16; do
  step "loraforge train: $DEVICE $dtype, batch $BATCH x $SEQ, r $RANK, all linear"
  mem=$(peak_of "$OUT/train-$dtype.log" "$bin" train --model "$MODEL" --data "$OUT/data.jsonl" \
    --out "$OUT/adapter-$dtype" --device "$DEVICE" --dtype "$dtype" --batch-size "$BATCH" \
    --max-seq-len "$SEQ" --max-steps "$STEPS" --rank "$RANK" --alpha $((2 * RANK)) \
    --target-modules all-linear --no-shuffle --metrics-jsonl "$OUT/train-$dtype.jsonl") \
    || { tail -20 "$OUT/train-$dtype.log"; exit 1; }
  rows+=("loraforge|$dtype|$(tokens_per_s "$OUT/train-$dtype.jsonl")|$mem")
done

BENCH=${BENCH:-../shared/bench}
if [ -n "${PEFT_PY:-}" ] && [ -n "${HF_MODEL:-}" ] && [ -f "$BENCH/peft_causal_lm.py" ]; then
  for dtype in f32 bf16; do
    step "PEFT + PyTorch: $dtype"
    autocast=""
    [ "$dtype" = bf16 ] && autocast=1
    dev=$([[ $DEVICE == cuda* ]] && echo cuda || echo cpu)
    mem=$(peak_of "$OUT/peft-$dtype.log" env AUTOCAST=$autocast DEV=$dev "$PEFT_PY" -c '
import os, runpy, sys, torch
sys.argv = [sys.argv[1]] + sys.argv[2:]
if os.environ["DEV"] == "cuda":
    torch.set_default_device("cuda")
ctx = torch.autocast(os.environ["DEV"], dtype=torch.bfloat16) if os.environ["AUTOCAST"] else None
if ctx: ctx.__enter__()
runpy.run_path(sys.argv[0], run_name="__main__")
' "$BENCH/peft_causal_lm.py" --model "$HF_MODEL" --targets all --batch "$BATCH" --seq "$SEQ" \
      --steps "$STEPS" --json) || { tail -20 "$OUT/peft-$dtype.log"; exit 1; }
    tps=$(grep '^RESULT ' "$OUT/peft-$dtype.log" | sed 's/^RESULT //' \
      | python3 -c 'import json,sys; print(f"{json.load(sys.stdin).get(\"tokens_per_s\", 0):.0f}")' 2>/dev/null || echo "?")
    rows+=("PEFT|$dtype|$tps|$mem")
  done
else
  rows+=("PEFT|-|skipped (set PEFT_PY and HF_MODEL)|-")
fi

if [ -n "${SD_UNET:-}" ]; then
  step "Stable Diffusion UNet, one LoRA step at 512 px"
  "$target/$dir/loraforge-bench" sd --unet "$SD_UNET" --res 512 --steps 2 >"$OUT/sd.log" 2>&1 \
    || { tail -20 "$OUT/sd.log"; exit 1; }
  sd=$(tail -n1 "$OUT/sd.log")
else
  sd="skipped (set SD_UNET to a diffusers unet/ folder)"
fi

echo
echo "gpu-check on $DEVICE ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || echo "$(nproc) CPU cores")), model $MODEL"
echo "fidelity: $fidelity"
printf '| %-9s | %-5s | %-10s | %-16s |\n' engine dtype tokens/s "peak memory MiB"
printf '|-----------|-------|------------|------------------|\n'
for r in "${rows[@]}"; do
  IFS='|' read -r e d t m <<<"$r"
  printf '| %-9s | %-5s | %-10s | %-16s |\n' "$e" "$d" "$t" "$m"
done
echo "SD UNet 512 px: $sd"
echo "(logs in $OUT)"
