#!/usr/bin/env bash
# The GPU machine's side of scripts/gpu-pack.sh: unpacks the binaries, finds the CUDA 13
# libraries (a system toolkit's, or PyTorch's NVIDIA wheels'), installs the carried wheels
# into a temp folder, and runs scripts/gpu-check.sh with them. Extra env passes through
# (RUN_TIMEOUT, SHAPES, ...); RESULTS (a folder) receives the console log and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu}
results=${RESULTS:-/tmp/gpu-results}
mkdir -p "$results" /tmp/gpu-bin /tmp/gpu-check
exec > >(tee "$results/console.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
for f in "$dir"/bin/*.xz; do xz -dc "$f" >"/tmp/gpu-bin/$(basename "$f" .xz)"; done
chmod +x /tmp/gpu-bin/*
libs=$(find /usr/local /opt /usr/lib \( -name 'libcublasLt.so.13*' -o -name 'libnvrtc.so.13*' \
  -o -name 'libcurand.so.10*' -o -name 'libcudart.so.13*' -o -name 'libcublas.so.13*' \) 2>/dev/null \
  | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
ldd /tmp/gpu-bin/loraforge | grep -E "not found" && echo "gpu-run-packed: libraries missing" >&2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site "$dir"/whl/*.whl \
  && export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
BIN_DIR=/tmp/gpu-bin OUT=/tmp/gpu-check PY=${PY:-python3} DEVICE=${DEVICE:-cuda:0} \
  timeout "${BUDGET:-460}" bash scripts/gpu-check.sh
status=$?
echo "gpu-check exit $status after $SECONDS s"
(cd /tmp/gpu-check && tar czf "$results/logs.tgz" --exclude='model-*' --exclude=sd15 --exclude='*.safetensors' .)
exit $status
