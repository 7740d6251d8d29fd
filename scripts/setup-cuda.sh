#!/usr/bin/env bash
# A CUDA 13.0 toolkit from NVIDIA's PyPI wheels, for building `--features cuda` on a
# machine without a system toolkit (CI; these machines have no GPU). It prints the
# environment a build needs as `export NAME=value` lines:
#
#   eval "$(bash scripts/setup-cuda.sh)"
#   cargo build --release --features cuda
#
# The toolkit goes into a cache folder outside the clone (LORAFORGE_CUDA_DIR, default
# ~/.cache/loraforge/cuda-13.0) and is reused. A machine with a system toolkit (nvcc on
# PATH, CUDA_HOME set) does not need this script.
#
# Why 13.0 and not the newest wheels: cudarc 0.19.10 (candle 0.11.1's) knows CUDA up to
# 13.4, and PTX from a newer compiler cannot be loaded by an older driver; 13.0 runs on
# every CUDA 13 driver (>= 580). The wheels are pinned as one release, since an nvcc
# from one release with the nvvm or crt of another fails.
#
# libcuda belongs to the driver, which a build machine lacks: the link uses a stub
# generated from cuda.h's declarations (lib/stubs, as NVIDIA's own toolkit ships one),
# with the driver's soname, so the binary loads the real driver on a GPU machine. The
# stub is on the link path only, never on LD_LIBRARY_PATH.
set -euo pipefail

cache=${XDG_CACHE_HOME:-$HOME/.cache}
dir=${LORAFORGE_CUDA_DIR:-$cache/loraforge/cuda-13.0}
# A GPU to ask would say; with none, build for Ampere (sm_80). Candle's kernels are PTX,
# which the driver compiles for newer GPUs (Hopper, sm_90) when it loads them.
cap=${CUDA_COMPUTE_CAP:-80}
python=${PYTHON:-python3}

wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)
stamp="$dir/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${wheels[*]}" ]; then
  rm -rf "$dir"
  "$python" -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "${wheels[@]}" >&2
  cu=$(echo "$dir"/venv/lib/python3*/site-packages/nvidia/cu13)
  [ -x "$cu/bin/nvcc" ] || { echo "setup-cuda: no nvcc in $cu" >&2; exit 1; }
  # nvcc looks for headers under targets/<arch>/include; the wheels put them in include.
  mkdir -p "$cu/targets/x86_64-linux"
  ln -sfn ../../include "$cu/targets/x86_64-linux/include"
  # The linker wants unversioned names (-lcublas); the wheels ship only versioned ones.
  for so in "$cu"/lib/lib*.so.*; do
    base=$(basename "$so")
    ln -sfn "$base" "$cu/lib/${base%%.so.*}.so"
  done
  # The driver stub: every cu* function cuda.h declares (after its _v2 renames), empty.
  mkdir -p "$cu/lib/stubs"
  echo '#include <cuda.h>' | gcc -E -P -I "$cu/include" - \
    | grep -oE '\bCUresult +(CUDAAPI +)?cu[A-Za-z0-9_]+ *\(' \
    | sed -E 's/.*(cu[A-Za-z0-9_]+) *\($/\1/' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$cu/lib/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$cu/lib/stubs/libcuda.c"
  ln -sfn "$cu" "$dir/root"
  echo "${wheels[*]}" > "$stamp"
fi

root="$dir/root"
echo "export CUDA_HOME=$root"
echo "export PATH=$root/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=$cap"
echo "export CUDARC_CUDA_VERSION=13000"
echo "export LD_LIBRARY_PATH=$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
