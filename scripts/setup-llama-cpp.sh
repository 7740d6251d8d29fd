#!/usr/bin/env bash
# Installs llama-cpp-python into the test venv: llama.cpp itself, built from its PyPI
# source package (CMake; no network beyond the registry). The wheel is cached outside the
# clone, so the build (about 10 minutes on 2 cores) happens once per machine. It is built
# for AVX2/FMA/F16C, not for this exact CPU, so a cached wheel still runs on another x86
# host. The tests use it to load our LoRA GGUF beside the SmolLM2 GGUF
# (scripts/llama-cpp-check.py). Prints the venv's path on its last line.
#   LORAFORGE_VENV  the venv (default ~/.cache/loraforge/venv; scripts/setup-python.sh)
set -euo pipefail
VENV=${LORAFORGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/venv}
WHEELS=${WHEELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/wheels}
VERSION=0.3.36
mkdir -p "$WHEELS"
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  whl=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$WHEELS" "llama-cpp-python==$VERSION" >&2
    whl=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "$whl" >&2
fi
echo "$VENV"
