#!/usr/bin/env bash
# One command for a GPU machine holding this tree: the GPU tests, then the GPU benchmark in its
# quick form. Installs nothing from the network (it needs numpy, numba, cupy, pytest,
# hypothesis and, for the cuDNN comparison, a CUDA build of torch already installed).
# Logs go to $OUT when it is set (else to ./device_check_out): device_check.log (everything),
# gpu_tests.log, gpu_bench.log and gpu_bench.json. Budget: under 5 minutes.
#
#   bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
PY="${PYTHON:-python}"
started=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    || echo "nvidia-smi not available"
"$PY" - <<'EOF'
import sys
try:
    import cupy
except ImportError as exc:
    sys.exit(f"CuPy is not installed ({exc}): nothing to check on this machine")
dev = cupy.cuda.Device()
print(f"cupy {cupy.__version__}, device {dev.id}: sm_{dev.compute_capability}, "
      f"{dev.attributes['MultiProcessorCount']} SMs")
try:
    import torch
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"cudnn {torch.backends.cudnn.version()}")
except ImportError:
    print("torch not installed: the benchmark times fastconv alone")
EOF
[ $? -eq 0 ] || exit 2

# fastconv from this tree, without touching the network.
if ! "$PY" -c "import fastconv.kernels.cuda" 2>/dev/null; then
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -q -e . || exit 2
fi

echo "== GPU tests (pytest -m gpu)"
timeout 200 "$PY" -m pytest -m gpu -q --maxfail=25 -p no:cacheprovider tests 2>&1 \
    | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== GPU benchmark (bench/gpu.py --quick)"
timeout $((285 - ($(date +%s) - started))) "$PY" bench/gpu.py --quick \
    --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - started )) s: tests rc=$tests_rc, benchmark rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
