#!/usr/bin/env bash
# Stable Diffusion LoRA training, the shipped `loraforge train` against diffusers + PEFT + PyTorch
# on the same CPU, in one run: both train the same SD folder's UNet in float32 with LoRA r 4
# (alpha 4) on to_q, to_k, to_v, to_out.0 at batch 1, AdamW lr 1e-4, weight decay 1e-2, no
# clipping, MSE on epsilon at a random timestep. PyTorch (scripts/sd_step_pytorch.py) steps the
# UNet on random latents (1, 4, RES/8, RES/8) and a random context (1, 77, 768);
# `loraforge train --task text_to_image` trains on IMAGES random captioned RES x RES images,
# whose latents and caption states it computes once before its first step, as it does for
# users, so a step of each is the same UNet forward, backward and optimizer step. The engines
# run alternately (PyTorch, loraforge, per round), each under /usr/bin/time -v; prints the
# median step seconds after 1 warm-up step (loraforge's from its --metrics-jsonl clock), peak
# RSS, and loraforge's ratios to PyTorch.
#
#   scripts/bench-sd-vs-pytorch.sh path/to/loraforge SD_DIR [OUTDIR]
#   env: RES (256) STEPS (3) ROUNDS (1) THREADS (2) IMAGES (2)
#        BEFORE=path/to/an-older/loraforge: it trains too, after loraforge in each round
#
# SD_DIR is a diffusers Stable Diffusion 1.x folder (unet/, vae/, text_encoder/, tokenizer/,
# scheduler/): a real SD 1.5, or the random-weight SD 1.5-shaped one that
# `scripts/make_sd15_shaped.py --full SD_DIR` writes (time and memory do not depend on the
# weights' values). Build the binary with `cargo build --release -p loraforge`. Needs
# ~/.cache/loraforge/venv with torch, peft (scripts/setup-python.sh) and diffusers
# (`pip install diffusers==0.42.1`, which setup-python.sh does not install). At RES 512
# loraforge peaks near 11 GiB (see BENCHMARKS.md); check `free -g` first.
# `loraforge-bench sd` (crates/trainer/src/bin/loraforge-bench.rs) times the same UNet step
# split into forward and backward, for profiling.
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge SD_DIR [OUTDIR]}
SD=${2:?usage: $0 path/to/loraforge SD_DIR [OUTDIR]}
OUT=${3:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HOME/.cache/loraforge/venv/bin/python}
RES=${RES:-256} STEPS=${STEPS:-3} ROUNDS=${ROUNDS:-1} THREADS=${THREADS:-2} IMAGES=${IMAGES:-2}
for d in unet vae text_encoder tokenizer scheduler; do
  [ -d "$SD/$d" ] || { echo "$SD/$d: missing (scripts/make_sd15_shaped.py --full writes a whole folder)" >&2; exit 1; }
done
mkdir -p "$OUT"
echo "== $(date -u)  RES $RES  STEPS $STEPS  ROUNDS $ROUNDS  THREADS $THREADS  IMAGES $IMAGES  OUT $OUT"
free -m | sed 's/^/  /'

# Random RGB images with captions, as flat pairs (k.png + k.txt) in a zip.
"$PY" - "$OUT/images.zip" "$RES" "$IMAGES" <<'PY'
import io, sys, zipfile
import numpy as np
from PIL import Image
path, res, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
with zipfile.ZipFile(path, "w") as z:
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(buf, "PNG")
        z.writestr(f"{k}.png", buf.getvalue())
        z.writestr(f"{k}.txt", f"a photo of random noise number {k}")
PY

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: PyTorch"
  /usr/bin/time -v -o "$OUT/pytorch-$r.time" "$PY" "$HERE/sd_step_pytorch.py" --unet "$SD/unet" --res "$RES" \
    --steps "$STEPS" --threads "$THREADS" >"$OUT/pytorch-$r.jsonl" 2>"$OUT/pytorch-$r.log" \
    || { tail "$OUT/pytorch-$r.log"; exit 1; }
  grep '"step"' "$OUT/pytorch-$r.jsonl" | sed 's/^/  /'
  for eng in loraforge ${BEFORE:+before}; do
    bin=$BIN; [ "$eng" = before ] && bin=$BEFORE
    echo "== round $r: $eng ($bin train)"
    rm -rf "$OUT/$eng-$r"
    /usr/bin/time -v -o "$OUT/$eng-$r.time" "$bin" train --task text_to_image --model "$SD" \
      --data "$OUT/images.zip" --resolution "$RES" --out "$OUT/$eng-$r" --batch-size 1 --rank 4 \
      --alpha 4 --target-modules to_q,to_k,to_v,to_out.0 --lr 1e-4 --scheduler constant \
      --weight-decay 1e-2 --max-grad-norm 0 --max-steps "$STEPS" --threads "$THREADS" \
      --metrics-jsonl "$OUT/$eng-$r.jsonl" >"$OUT/$eng-$r.log" 2>&1 \
      || { tail "$OUT/$eng-$r.log"; exit 1; }
    sed 's/^/  /' "$OUT/$eng-$r.jsonl"
  done
done

"$PY" - "$OUT" "$ROUNDS" "${BEFORE:+1}" <<'PY'
import json, re, statistics, sys
out, rounds, before = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def rss_mib(path):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read()).group(1)) / 1024
res = {}
for eng in ("pytorch", "loraforge") + (("before",) if before else ()):
    steps, fwd, bwd, rss = [], [], [], []
    for r in range(1, rounds + 1):
        s = [json.loads(l) for l in open(f"{out}/{eng}-{r}.jsonl") if '"step"' in l]
        if eng == "pytorch":
            s = [x for x in s if x.get("event") == "step"][1:]  # step 1 is warm-up
            steps += [x["step_s"] for x in s]
            fwd += [x["forward_s"] for x in s]
            bwd += [x["backward_s"] for x in s]
        else:  # loraforge train's clock: a step's time is its elapsed_seconds less the one before
            t = [x["elapsed_seconds"] for x in s]
            s = t[1:]
            steps += [b - a for a, b in zip(t, t[1:])]
        if not s:
            sys.exit(f"{eng}: no steps after the warm-up; run with STEPS >= 2")
        rss.append(rss_mib(f"{out}/{eng}-{r}.time"))
    res[eng] = {"step_s": statistics.median(steps), "peak_rss_mib": max(rss), "n": len(steps)}
    if fwd:
        res[eng].update(forward_s=statistics.median(fwd), backward_s=statistics.median(bwd))
p, o = res["pytorch"], res["loraforge"]
for name, x in (("PyTorch", p), ("loraforge", o)) + ((("before", res["before"]),) if before else ()):
    split = f" (forward {x['forward_s']:.2f} + backward {x['backward_s']:.2f})" if "forward_s" in x else ""
    print(f"{name:>9}: median step {x['step_s']:.2f} s{split} over {x['n']} step(s)   "
          f"peak RSS {x['peak_rss_mib']:.0f} MiB")
print(f"ratios loraforge / PyTorch: step time {o['step_s'] / p['step_s']:.2f}x   "
      f"peak RSS {o['peak_rss_mib'] / p['peak_rss_mib']:.2f}x")
if before:
    b = res["before"]
    print(f"the build before / PyTorch: step time {b['step_s'] / p['step_s']:.2f}x   peak RSS "
          f"{b['peak_rss_mib'] / p['peak_rss_mib']:.2f}x   (this build: {b['step_s'] / o['step_s']:.2f}x "
          f"as fast as the one before)")
print("SUMMARY " + json.dumps({**res, "time_ratio": o["step_s"] / p["step_s"],
                               "rss_ratio": o["peak_rss_mib"] / p["peak_rss_mib"]}))
PY
