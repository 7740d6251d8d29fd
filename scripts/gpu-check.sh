#!/usr/bin/env bash
# One command for a lent GPU: builds with CUDA (or takes prebuilt binaries), runs the
# trainer's PEFT fidelity suite on the GPU, then, per model shape and dtype (f32, bf16),
# trains PEFT + PyTorch and `loraforge train` from the same initial adapter on the same
# token rows and compares them step by step (losses, tokens/s, peak device memory), runs
# one SD 1.5-shaped UNet LoRA step at 512 px in both engines, and prints one table.
#
#   scripts/gpu-check.sh                 # DEVICE=cuda:0: SmolLM2-135M and Llama-3.2-1B shapes
#   DEVICE=cpu scripts/gpu-check.sh      # the same steps, tiny, on the CPU (CI runs this)
#
# env: DEVICE (cuda:0) PROFILE (release; CI: dev) BIN_DIR (prebuilt loraforge,
#      loraforge-bench and the `fidelity` test binary: no cargo needed)
#      PY (a python with torch + transformers + peft: the reference and the random-weight
#      models; without one only loraforge runs, on the tiny fixture)
#      SHAPES (cuda: "smollm2 1b"; cpu: "tiny") BATCH SEQ (8 1024; cpu 2 64) RANK (16)
#      STEPS (20: the parity length) LARGE_STEPS (8: shapes above SmolLM2's)
#      SD (1 on cuda when PY has diffusers: SD 1.5-shaped step; 0 skips) OUT (a temp folder)
#
# A lent GPU machine downloads nothing and takes 64 MiB of files along, so the models are
# random-weight models of the real shapes, drawn there (scripts/make_llama_shaped.py,
# scripts/make_sd15_shaped.py): time and memory depend on shapes, not on weight values,
# and both engines train the same weights. Compare numbers from one run only.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cuda=
[[ $DEVICE == cuda* ]] && cuda=1
if [ -n "$cuda" ]; then
  SHAPES=${SHAPES:-smollm2 1b} BATCH=${BATCH:-8} SEQ=${SEQ:-1024}
else
  SHAPES=${SHAPES:-tiny} BATCH=${BATCH:-2} SEQ=${SEQ:-64}
fi
RANK=${RANK:-16} STEPS=${STEPS:-20} LARGE_STEPS=${LARGE_STEPS:-8}
# Each run's limit, so that one slow run cannot eat a lent GPU's whole lease.
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
step() { echo "== $* ($SECONDS s)" >&2; }
# A run that fails is reported, its log's tail shown, and the script goes on to the next
# one; it exits non-zero at the end.
failed=()
fail() {
  failed+=("$1")
  echo "gpu-check: FAILED: $1" >&2
  tail -20 "$2" >&2 || true
}

# A Python with the reference stack, if there is one.
PY=${PY:-python3}
if ! "$PY" -c 'import torch, transformers, peft' 2>/dev/null; then
  echo "gpu-check: $PY lacks torch/transformers/peft: loraforge runs alone" >&2
  PY=
fi

if [ -n "${BIN_DIR:-}" ]; then
  bin=$BIN_DIR/loraforge bench=$BIN_DIR/loraforge-bench fidelity=$BIN_DIR/fidelity
else
  features=()
  if [ -n "$cuda" ]; then
    features=(--features loraforge/cuda)
    if ! command -v nvcc >/dev/null; then eval "$(bash scripts/setup-cuda.sh)"; fi
    # Build the kernels for the GPU at hand.
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d .)
    [ -n "$cap" ] && export CUDA_COMPUTE_CAP=$cap
  fi
  step "build ($PROFILE, ${features[*]:-cpu})"
  cargo build --profile "$PROFILE" --workspace "${features[@]}" --bins >&2
  fidelity=$(cargo test --profile "$PROFILE" --workspace "${features[@]}" --test fidelity --no-run \
    --message-format json | "${PY:-python3}" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "fidelity" and m.get("executable"):
        print(m["executable"])')
  target=${CARGO_TARGET_DIR:-target}
  dir=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
  bin=$target/$dir/loraforge bench=$target/$dir/loraforge-bench
fi

step "PEFT fidelity suite on $DEVICE"
LORAFORGE_TEST_DEVICE=$DEVICE LORAFORGE_FIXTURES=$root/tests/fixtures "$fidelity" --test-threads 1 \
  >"$OUT/fidelity.log" 2>&1 \
  || { fail "fidelity suite" "$OUT/fidelity.log"; grep -E "^test .*FAILED|panicked" "$OUT/fidelity.log" >&2 || true; }
fidelity_result=$(grep -E "^test result" "$OUT/fidelity.log" | tail -n1 || true)

# Peak memory of a command in MiB: the device's (sampled) on a GPU, peak RSS on the CPU.
peak_of() {
  local log=$1; shift
  if [ -n "$cuda" ]; then
    "${PY:-python3}" scripts/gpu_peak_mem.py "${DEVICE#cuda:}" "$log.mem" -- timeout "$RUN_TIMEOUT" "$@" >"$log" 2>&1
  else
    local status=0
    /usr/bin/time -f "%M" -o "$log.mem" timeout "$RUN_TIMEOUT" "$@" >"$log" 2>&1 || status=$?
    # time(1) puts "Command exited with non-zero status N" above the number on failure.
    echo $(($(tail -n1 "$log.mem") / 1024)) >"$log.mem"
    return $status
  fi
}

rows=()
worst_f32=0
for shape in $SHAPES; do
  steps=$STEPS
  case $shape in tiny | smollm2) ;; *) steps=$LARGE_STEPS ;; esac
  if [ "$shape" = tiny ]; then
    model=tests/fixtures/tiny-llama
  elif [ -n "$PY" ]; then
    model=$OUT/model-$shape
    step "random-weight $shape-shaped model"
    "$PY" scripts/make_llama_shaped.py --shape "$shape" --tokenizer tests/fixtures/tiny-llama \
      --out "$model" --device "$([ -n "$cuda" ] && echo cuda || echo cpu)" >"$OUT/model-$shape.log" 2>&1 \
      || { fail "model $shape" "$OUT/model-$shape.log"; continue; }
  else
    echo "gpu-check: shape $shape needs PY (transformers) to draw its weights; skipped" >&2
    continue
  fi
  # Token rows (file order is batch order): a short random phrase repeated, so there is
  # something to learn; ids below the tokenizer's 400.
  "${PY:-python3}" - "$OUT/rows-$shape.jsonl" "$SEQ" $((steps * BATCH)) <<'PY'
import json, random, sys
rng = random.Random(0)
seq, n = int(sys.argv[2]), int(sys.argv[3])
with open(sys.argv[1], "w") as f:
    for _ in range(n):
        phrase = [rng.randrange(3, 400) for _ in range(rng.randrange(4, 17))]
        f.write(json.dumps({"input_ids": (phrase * (seq // len(phrase) + 1))[:seq]}) + "\n")
PY
  init=$OUT/init-$shape
  for dtype in f32 bf16; do
    peft=
    if [ -n "$PY" ]; then
      step "PEFT + PyTorch: $shape $dtype, batch $BATCH x $SEQ, $steps steps"
      peak_of "$OUT/peft-$shape-$dtype.log" "$PY" scripts/peft_train_reference.py --model "$model" \
        --data "$OUT/rows-$shape.jsonl" --init "$init" --device "$([ -n "$cuda" ] && echo cuda || echo cpu)" \
        --dtype "$dtype" --batch "$BATCH" --steps "$steps" --rank "$RANK" \
        || { fail "PEFT $shape $dtype" "$OUT/peft-$shape-$dtype.log"; continue; }
      peft=$(grep '^RESULT ' "$OUT/peft-$shape-$dtype.log" | sed 's/^RESULT //')
      echo "$peft" >"$OUT/peft-$shape-$dtype.json"
    fi
    step "loraforge train: $shape $dtype"
    init_args=()
    [ -n "$peft" ] && init_args=(--init-adapter "$init")
    peak_of "$OUT/train-$shape-$dtype.log" "$bin" train --model "$model" --data "$OUT/rows-$shape.jsonl" \
      --out "$OUT/adapter-$shape-$dtype" --device "$DEVICE" --dtype "$dtype" --batch-size "$BATCH" \
      --max-seq-len "$SEQ" --max-steps "$steps" --rank "$RANK" --alpha $((2 * RANK)) "${init_args[@]}" \
      --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --no-shuffle --no-packing \
      --lr 2e-4 --scheduler constant --weight-decay 0 --max-grad-norm 0 --dropout 0 \
      --metrics-jsonl "$OUT/train-$shape-$dtype.jsonl" \
      || { fail "loraforge $shape $dtype" "$OUT/train-$shape-$dtype.log"; continue; }
    # tokens/s (median step after the first two) and the worst per-step loss difference.
    "${PY:-python3}" - "$OUT/train-$shape-$dtype.jsonl" "${peft:-null}" >"$OUT/cmp-$shape-$dtype" <<'PY'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tps = [r["tokens_per_second"] for r in ours][2:] or [0]
peft = json.loads(sys.argv[2])
if peft:
    worst = max(abs(o["loss"] - p) / abs(p) for o, p in zip(ours, peft["losses"]))
    print(f"{statistics.median(tps):.0f} {peft['tokens_per_s']:.0f} {worst:.2e}")
else:
    print(f"{statistics.median(tps):.0f} - -")
PY
    read -r tps peft_tps worst <"$OUT/cmp-$shape-$dtype"
    rows+=("$shape|$dtype|loraforge|$tps|$(cat "$OUT/train-$shape-$dtype.log.mem")|$worst")
    [ -n "$peft" ] && rows+=("$shape|$dtype|PEFT|$peft_tps|$(cat "$OUT/peft-$shape-$dtype.log.mem")|")
    if [ "$dtype" = f32 ] && [ "$worst" != - ]; then
      worst_f32=$("${PY:-python3}" -c "print(max($worst_f32, $worst))")
    fi
  done
done

SD=${SD:-$([ -n "$cuda" ] && echo 1 || echo 0)}
sd_rows=()
if [ "$SD" = 1 ] && [ -n "$PY" ] && "$PY" -c 'import diffusers' 2>/dev/null; then
  step "SD 1.5-shaped UNet, LoRA steps at 512 px"
  "$PY" scripts/make_sd15_shaped.py "$OUT/sd15" >"$OUT/sd15.log" 2>&1 || fail "SD model" "$OUT/sd15.log"
  peak_of "$OUT/sd-loraforge.log" "$bench" sd --unet "$OUT/sd15/unet" --res 512 --steps 3 --device "$DEVICE" \
    --max-rss-mib 65536 || fail "SD loraforge" "$OUT/sd-loraforge.log"
  peak_of "$OUT/sd-peft.log" "$PY" scripts/sd_step_pytorch.py --unet "$OUT/sd15/unet" --res 512 --steps 3 \
    --device "$([ -n "$cuda" ] && echo cuda || echo cpu)" || fail "SD PEFT" "$OUT/sd-peft.log"
  for e in loraforge peft; do
    s=$(grep '"event": *"step"' "$OUT/sd-$e.log" | tail -n1 | "$PY" -c 'import json,sys; print(f"{json.load(sys.stdin)[\"step_s\"]:.3f}")' 2>/dev/null || echo failed)
    sd_rows+=("$e|$s|$(cat "$OUT/sd-$e.log.mem" 2>/dev/null || echo -)")
  done
fi

echo
name=$(nvidia-smi -i "${DEVICE#cuda:}" --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
echo "gpu-check on $DEVICE (${name:-$(nproc) CPU cores}); batch $BATCH x $SEQ, r $RANK, alpha $((2 * RANK)), 7 projections"
echo "fidelity: $fidelity_result"
printf '| %-7s | %-5s | %-9s | %-10s | %-15s | %-24s |\n' shape dtype engine tokens/s "peak memory MiB" "worst step loss vs PEFT"
printf '|---------|-------|-----------|------------|-----------------|--------------------------|\n'
for r in "${rows[@]}"; do
  IFS='|' read -r s d e t m w <<<"$r"
  printf '| %-7s | %-5s | %-9s | %-10s | %-15s | %-24s |\n' "$s" "$d" "$e" "$t" "$m" "$w"
done
for r in "${sd_rows[@]}"; do
  IFS='|' read -r e s m <<<"$r"
  echo "SD 1.5-shaped UNet, 512 px, r 4 attention LoRA: $e ${s}s/step, peak memory $m MiB"
done
[ "$SD" = 1 ] && [ ${#sd_rows[@]} -eq 0 ] && echo "SD: skipped (PY lacks diffusers)"
echo "(logs in $OUT)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: failed: ${failed[*]}" >&2
  exit 1
fi
# Parity is a check, not only a number: f32 must follow PEFT within 1% at every step.
"${PY:-python3}" -c "import sys; sys.exit(0 if $worst_f32 < 0.01 else 1)" \
  || { echo "gpu-check: f32 losses left PEFT's by $worst_f32 (bar: 1%)" >&2; exit 1; }
