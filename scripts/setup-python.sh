#!/usr/bin/env bash
# Makes the Python environment the tests use: transformers + peft + torch (PEFT checks of
# our adapters; pillow for transformers' image processors), scikit-learn (its digits
# images, the image-classification demo), the official openai client, schemathesis (API fuzzing) and moto's S3
# server (the scale-out test's object store). Prints the venv's path on its last line.
#   LORAFORGE_VENV  where the venv lives (default ~/.cache/loraforge/venv)
# Idempotent; the first run downloads torch (a few minutes).
set -euo pipefail
VENV=${LORAFORGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, transformers, peft, safetensors, openai, gguf, schemathesis, moto.server, PIL, sklearn' 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/pip" install -q --disable-pip-version-check torch transformers peft safetensors openai numpy gguf schemathesis "moto[server]" pillow scikit-learn
fi
echo "$VENV"
