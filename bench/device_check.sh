#!/usr/bin/env bash
# One command for a GPU machine holding this tree: the GPU tests, then the GPU benchmark.
# Installs nothing from the network. It needs numpy, numba, cupy, pytest, hypothesis and, for
# the cuDNN comparison, a CUDA build of torch already installed; wheels carried in .whl/ (say a
# numba that works with the machine's numpy) are installed into /tmp/site first.
# Logs go to $OUT when it is set (else to ./device_check_out): device_check.log (everything),
# gpu_tests.log, gpu_tests.xml, gpu_bench.log, gpu_bench.json, gpu_bench.png and, with
# FC_PROFILE=1, gpu_profile.txt (bench/gpu_profile.py: host time per call and its cProfile);
# with FC_SANITIZE, sanitize.log: those GPU tests under compute-sanitizer's memcheck, each
# array in its own allocation (FASTCONV_TEST_CUDA_MALLOC=1), for up to FC_SANITIZE_S seconds.
#
#   [FC_BUDGET=300] [FC_BENCH=quick|full|none] [FC_TESTS="tests"] [FC_PROFILE=0|1] \
#       [FC_SANITIZE="pytest selection"] bash bench/device_check.sh
#
# FC_BUDGET bounds the whole script in seconds; the tests get what the benchmark leaves them
# (FC_BENCH_S, default 90 for quick and 200 for full). Tests run on pytest-xdist workers where
# it is installed (NVRTC compiles dominate the first run: they are CPU-bound and parallel), with
# a per-test timeout where pytest-timeout is.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
PY="${PYTHON:-python3}"
BUDGET="${FC_BUDGET:-300}"
BENCH="${FC_BENCH:-quick}"
TESTS="${FC_TESTS:-tests}"
case "$BENCH" in
    quick) BENCH_S="${FC_BENCH_S:-90}" ;;
    full) BENCH_S="${FC_BENCH_S:-200}" ;;
    *) BENCH_S=0 ;;
esac
PROFILE_S=0; [ "${FC_PROFILE:-0}" = 1 ] && PROFILE_S=60
SANITIZE_S=0; [ -n "${FC_SANITIZE:-}" ] && SANITIZE_S="${FC_SANITIZE_S:-70}"
started=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - started) )); }

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader || echo "nvidia-smi not available"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF'
import sys
try:
    import cupy
except ImportError as exc:
    sys.exit(f"CuPy is not installed ({exc}): nothing to check on this machine")
import numpy
dev = cupy.cuda.Device()
print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, cupy {cupy.__version__}, "
      f"device {dev.id}: sm_{dev.compute_capability}, "
      f"{dev.attributes['MultiProcessorCount']} SMs")
try:
    import numba
    print(f"numba {numba.__version__} from {numba.__file__}")
except Exception as exc:  # noqa: BLE001 - report whatever stops Numba importing
    print(f"numba does not import: {exc!r}")
try:
    import torch
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"cudnn {torch.backends.cudnn.version()}")
except ImportError:
    print("torch not installed: the benchmark times fastconv alone")
EOF
[ $? -eq 0 ] || exit 2

# fastconv from this tree, without touching the network: an editable install, else a copy
# laid out as the installed package (kernels/ becomes fastconv/kernels).
if ! "$PY" -c "import fastconv.kernels.cuda" 2>/dev/null; then
    if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation -q -e .; then
        rm -rf /tmp/fcsrc && mkdir -p /tmp/fcsrc && cp -r fastconv /tmp/fcsrc/ \
            && cp -r kernels /tmp/fcsrc/fastconv/kernels || exit 2
        export PYTHONPATH="/tmp/fcsrc:$PYTHONPATH"
    fi
fi
"$PY" -c "import fastconv; print('fastconv from', fastconv.__file__,
    fastconv.available_backends())" || exit 2

echo "== GPU tests (pytest -m gpu $TESTS)"
opts=()
"$PY" -c "import xdist" 2>/dev/null && opts+=(-n "${FC_WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout=150)
# shellcheck disable=SC2086  # TESTS is a list of paths or node ids
timeout $(( $(left) - BENCH_S - PROFILE_S - SANITIZE_S )) \
    "$PY" -m pytest -m gpu -q "${opts[@]}" --tb=short -rfE --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" $TESTS 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

if [ "$SANITIZE_S" -gt 0 ]; then
    echo "== compute-sanitizer memcheck: $FC_SANITIZE"
    # shellcheck disable=SC2086
    FASTCONV_TEST_CUDA_MALLOC=1 timeout "$SANITIZE_S" compute-sanitizer --tool memcheck \
        --print-limit 20 --error-exitcode 3 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        $FC_SANITIZE 2>&1 | tee "$OUT/sanitize.log" | tail -40
    echo "compute-sanitizer rc=${PIPESTATUS[0]} (3: memcheck errors; 124: time limit)"
fi

if [ "$PROFILE_S" -gt 0 ]; then
    echo "== host profile (bench/gpu_profile.py)"
    timeout "$PROFILE_S" "$PY" bench/gpu_profile.py --out "$OUT/gpu_profile.txt" 2>&1
fi

bench_rc=0
if [ "$BENCH" != none ]; then
    flag=(); [ "$BENCH" = quick ] && flag=(--quick)
    echo "== GPU benchmark (bench/gpu.py ${flag[*]}), $(left) s left"
    timeout "$(left)" "$PY" bench/gpu.py "${flag[@]}" --json "$OUT/gpu_bench.json" \
        --plot "$OUT/gpu_bench.png" 2>&1 | tee "$OUT/gpu_bench.log"
    bench_rc=${PIPESTATUS[0]}
fi

echo "== done in $(( $(date +%s) - started )) s: tests rc=$tests_rc, benchmark rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
