#!/usr/bin/env python3
"""Runs a command and writes the peak GPU memory it used, in MiB, to a file.

  python scripts/gpu_peak_mem.py GPU_INDEX OUT_FILE -- command args...

The device's used memory (NVML, through nvidia-ml-py; nvidia-smi when that is missing) is
sampled every few milliseconds while the command runs, and the peak minus the reading
before it started is written. It measures any engine the same way (candle's allocator and
PyTorch's caching one alike), CUDA context included. Exits with the command's status.
"""
import subprocess
import sys
import time


def reader(index):
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20, 0.002
    except Exception:  # no NVML binding: the slower CLI
        def smi():
            out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            return float(out.stdout.strip() or 0)
        return smi, 0.05


def main():
    index, out_file = int(sys.argv[1]), sys.argv[2]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    used, every = reader(index)
    base = used()
    peak = base
    p = subprocess.Popen(cmd)
    while p.poll() is None:
        peak = max(peak, used())
        time.sleep(every)
    with open(out_file, "w") as f:
        f.write(f"{peak - base:.0f}\n")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
