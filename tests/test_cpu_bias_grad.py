"""The cpu bias gradient: its scratch does not grow with the plane (issue 8, item 6).

It used to allocate ``P * Q`` float64 accumulators per thread: ``(1, 2, 8192, 8192)`` with a
16 MiB workspace bound grew the process by 1 GiB. Measured here as the growth of the peak RSS
of a fresh process around one call on a 4096 x 4096 plane (128 MiB of float32 input, which the
old kernel doubled).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv

SCRIPT = textwrap.dedent("""
    import resource
    import numpy as np
    import fastconv

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB

    fastconv.conv2d_bias_grad(np.ones((2, 2, 5, 7), np.float32), backend="cpu")   # compile
    grad_output = np.ones((1, 2, 4096, 4096), np.float32)                          # 128 MiB
    before = peak()
    out = fastconv.conv2d_bias_grad(grad_output, backend="cpu")
    print(peak() - before, out[0], out[1])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_bias_grad_peak_memory_stays_under_the_bound():
    env = dict(os.environ, FASTCONV_WORKSPACE_MB="16", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    growth, k0, k1 = done.stdout.split()
    assert float(k0) == float(k1) == 4096 * 4096          # exact: integers below 2**24
    assert int(growth) < 16 * 2**20, f"peak RSS grew by {int(growth) / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 4, 7, 9), (1, 3, 16, 16), (2, 2, 33, 31)])
def test_bias_grad_fixed_order(dtype, shape):
    # The documented order: element j of every plane into partial sum j % 256 (images in
    # order), then the partial sums combined pairwise; checked exactly against that order.
    from fastconv.kernels.cpu_conv import BIAS_GRAD_LANES as L

    rng = np.random.default_rng(sum(shape))
    g = rng.standard_normal(shape).astype(dtype)
    N, K, P, Q = shape
    want = np.empty(K)
    for k in range(K):
        acc = np.zeros(L)
        for n in range(N):
            plane = g[n, k].reshape(-1).astype(np.float64)
            for j0 in range(0, plane.size, L):
                blk = plane[j0:j0 + L]
                acc[:blk.size] += blk
        w = L
        while w > 1:
            w //= 2
            acc[:w] += acc[w:2 * w]
        want[k] = acc[0]
    got = fastconv.conv2d_bias_grad(g, backend="cpu")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want.astype(dtype))
