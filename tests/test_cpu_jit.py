"""The cpu backend's first-use notice (kernels/cpu_jit.py): one line on stderr when a process
compiles fastconv kernels, none when they load from Numba's cache or for other code."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from fastconv.kernels import cpu_jit

SCRIPT = textwrap.dedent("""
    import numba, numpy as np
    import fastconv
    @numba.njit
    def user_code(a):
        return a.sum()
    user_code(np.ones(3))                       # someone else's compile: no message
    gy = np.ones((2, 3, 4, 4), dtype=np.float32)
    for _ in range(2):
        fastconv.conv2d_bias_grad(gy, backend="cpu")
        fastconv.conv2d_bias_grad(gy.astype(np.float64), backend="cpu")
""")


def _run(cache_dir: str) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def test_one_line_on_first_compile_and_none_from_the_cache(tmp_path):
    first = _run(str(tmp_path))
    assert first.count(cpu_jit.MESSAGE) == 1, first
    assert _run(str(tmp_path)).count(cpu_jit.MESSAGE) == 0
