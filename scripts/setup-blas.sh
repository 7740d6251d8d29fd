#!/usr/bin/env bash
# Installs the OpenBLAS that loraforge's CPU training multiplies with (README "CPU
# speed: OpenBLAS"): the one the scipy-openblas32 wheel ships (0.3.34, every x86-64 kernel
# set, Zen 4 and Sapphire Rapids included), unpacked into a folder of its own; no Python
# environment is needed to use it. Prints the library's path on its last line, for
# LORAFORGE_BLAS. Idempotent.
#   LORAFORGE_BLAS_DIR  where it goes (default ~/.cache/loraforge/blas)
set -euo pipefail
DIR=${LORAFORGE_BLAS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loraforge/blas}
LIB=$DIR/scipy_openblas32/lib/libscipy_openblas.so
if [ ! -f "$LIB" ]; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$DIR" \
    "scipy-openblas32==0.3.34.481.3" >&2
fi
[ -f "$LIB" ] || { echo "setup-blas: $LIB is missing after the install" >&2; exit 1; }
echo "$LIB"
