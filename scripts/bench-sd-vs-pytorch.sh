#!/usr/bin/env bash
# One Stable Diffusion LoRA training step, loraforge against diffusers + PEFT + PyTorch on the
# same CPU, in one run: both load the same diffusers UNet folder in float32, attach LoRA r 4
# (alpha 4) to to_q, to_k, to_v, to_out.0, and train STEPS steps at batch 1 on random inputs of
# the same shapes (latents (1, 4, RES/8, RES/8), context (1, 77, 768), a random timestep, MSE
# against a random target, AdamW lr 1e-4, weight decay 1e-2). The engines run alternately
# (PyTorch, loraforge, per round), each under /usr/bin/time -v; prints the median step seconds
# after 1 warm-up step, peak RSS, and loraforge's ratios to PyTorch.
#
#   scripts/bench-sd-vs-pytorch.sh path/to/loraforge-bench UNET_DIR [OUTDIR]
#   env: RES (256) STEPS (3) ROUNDS (1) THREADS (2) MAX_RSS_MIB (18432: loraforge stops past it)
#
# UNET_DIR is a diffusers unet/ folder (config.json + diffusion_pytorch_model.safetensors): a
# real SD 1.5 UNet, or the random-weight SD 1.5-shaped one scripts/make_sd15_shaped.py writes
# (time and memory do not depend on the weights' values). Build the binary with
# `cargo build -p loraforge-trainer --bin loraforge-bench`. Needs ~/.cache/loraforge/venv with
# torch, peft (scripts/setup-python.sh) and diffusers (`pip install diffusers==0.42.1`, which
# setup-python.sh does not install). At RES 512 loraforge peaks near 11 GiB, 1.5x PyTorch
# (see BENCHMARKS.md); check `free -g` first.
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge-bench UNET_DIR [OUTDIR]}
UNET=${2:?usage: $0 path/to/loraforge-bench UNET_DIR [OUTDIR]}
OUT=${3:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HOME/.cache/loraforge/venv/bin/python}
RES=${RES:-256} STEPS=${STEPS:-3} ROUNDS=${ROUNDS:-1} THREADS=${THREADS:-2}
MAX_RSS_MIB=${MAX_RSS_MIB:-18432}
mkdir -p "$OUT"
echo "== $(date -u)  RES $RES  STEPS $STEPS  ROUNDS $ROUNDS  THREADS $THREADS  OUT $OUT"
free -m | sed 's/^/  /'

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: PyTorch"
  /usr/bin/time -v -o "$OUT/pytorch-$r.time" "$PY" "$HERE/sd_step_pytorch.py" --unet "$UNET" --res "$RES" \
    --steps "$STEPS" --threads "$THREADS" >"$OUT/pytorch-$r.jsonl" 2>"$OUT/pytorch-$r.log" \
    || { tail "$OUT/pytorch-$r.log"; exit 1; }
  grep '"step"' "$OUT/pytorch-$r.jsonl" | sed 's/^/  /'
  echo "== round $r: loraforge"
  OMP_NUM_THREADS=$THREADS /usr/bin/time -v -o "$OUT/loraforge-$r.time" "$BIN" sd --unet "$UNET" --res "$RES" \
    --steps "$STEPS" --threads "$THREADS" --max-rss-mib "$MAX_RSS_MIB" >"$OUT/loraforge-$r.jsonl" \
    2>"$OUT/loraforge-$r.log" || { tail "$OUT/loraforge-$r.log"; exit 1; }
  grep '"step"' "$OUT/loraforge-$r.jsonl" | sed 's/^/  /'
done

"$PY" - "$OUT" "$ROUNDS" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rss_mib(path):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read()).group(1)) / 1024
res = {}
for eng in ("pytorch", "loraforge"):
    steps, fwd, bwd, rss = [], [], [], []
    for r in range(1, rounds + 1):
        s = [json.loads(l) for l in open(f"{out}/{eng}-{r}.jsonl") if '"step"' in l]
        s = [x for x in s if x.get("event") == "step"][1:]  # step 1 is warm-up
        if not s:
            sys.exit(f"{eng}: no steps after the warm-up; run with STEPS >= 2")
        steps += [x["step_s"] for x in s]
        fwd += [x["forward_s"] for x in s]
        bwd += [x["backward_s"] for x in s]
        rss.append(rss_mib(f"{out}/{eng}-{r}.time"))
    res[eng] = {"step_s": statistics.median(steps), "forward_s": statistics.median(fwd),
                "backward_s": statistics.median(bwd), "peak_rss_mib": max(rss), "n": len(steps)}
p, o = res["pytorch"], res["loraforge"]
for name, x in (("PyTorch", p), ("loraforge", o)):
    print(f"{name:>9}: median step {x['step_s']:.2f} s (forward {x['forward_s']:.2f} + backward "
          f"{x['backward_s']:.2f}) over {x['n']} step(s)   peak RSS {x['peak_rss_mib']:.0f} MiB")
print(f"ratios loraforge / PyTorch: step time {o['step_s'] / p['step_s']:.2f}x   "
      f"peak RSS {o['peak_rss_mib'] / p['peak_rss_mib']:.2f}x")
print("SUMMARY " + json.dumps({"pytorch": p, "loraforge": o, "time_ratio": o["step_s"] / p["step_s"],
                               "rss_ratio": o["peak_rss_mib"] / p["peak_rss_mib"]}))
PY
