#!/usr/bin/env bash
# Everything the kernels need checked on a GPU, in one go: the device's copy-bandwidth ceiling, the
# correctness tests on the native path, the benchmark on every shape, and the tiling sweep.
# Usage: kernels/gpu_check.sh [OUTDIR]   (logs and JSON land in OUTDIR, default ./gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
python3 - <<'PY' 2>&1 | tee "$out/ceiling.log"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record(); [y.copy_(x) for _ in range(10)]; e.record(); torch.cuda.synchronize()
print(f"device-to-device copy: {2 * 10 * x.numel() / (s.elapsed_time(e) * 1e-3) / 1e9:.0f} GB/s (read + write)")
PY
python3 -m pytest -q -p no:cacheprovider --noconftest tests/kernels/test_kernels.py 2>&1 | tee "$out/pytest.log" | tail -3
python3 benchmarks/kernel_bench.py --shapes all --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
python3 benchmarks/kernel_tune.py ${TUNE_ARGS:-} --json "$out/tune.json" 2>&1 | tee "$out/tune.log" | tail -8
