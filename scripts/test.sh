#!/usr/bin/env bash
# The project's test command (README "Tests"): every Rust test, then the official
# openai client against a real `loraforge serve`.
#
#   TEST_DATABASE_URL=postgres://...   also run the store and e2e suites on PostgreSQL
#   LORAFORGE_VENV=DIR                 Python venv with transformers, peft, openai
#                                      (scripts/setup-python.sh makes it)
#   LORAFORGE_REQUIRE_REAL_MODELS=1    fail, rather than skip, the SmolLM2 checks when
#                                      models/ lacks the model (scripts/fetch-models.sh)
#   LORAFORGE_TEST_BLAS=PATH           also run the BLAS-against-gemm test and the PEFT
#                                      fidelity suite with that BLAS (scripts/setup-blas.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFORGE_VENV=${LORAFORGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/venv}
cargo test --workspace -- --test-threads 1
# The path every non-CPU device takes (the device-generic ops: blocked attention, the
# chunked head loss, norms and rotation with their own backward), forced on the CPU
# against the same PEFT fixtures. (`--workspace`, not `-p`: the features of the run above,
# so no dependency is built a second time.)
LORAFORGE_GENERIC_OPS=1 cargo test --workspace --test fidelity --test resnet_fidelity --test whisper_fidelity --test whisper_asr -- --test-threads 1
# The CPU ops' matrix products by a BLAS instead of candle's gemm (README "CPU speed").
if [ -n "${LORAFORGE_TEST_BLAS:-}" ]; then
  LORAFORGE_BLAS=$LORAFORGE_TEST_BLAS LORAFORGE_REQUIRE_BLAS=1 \
    cargo test --workspace --lib -- --test-threads 1 matmul
  LORAFORGE_BLAS=$LORAFORGE_TEST_BLAS cargo test --workspace --test fidelity -- --test-threads 1
fi
VENV=$LORAFORGE_VENV bash scripts/openai-client-test.sh "${CARGO_TARGET_DIR:-target}/debug/loraforge"
