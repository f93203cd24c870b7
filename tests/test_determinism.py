"""Bit-identical cpu results across processes, the Numba cache and thread counts (issue 8,
item 1).

Numba's cached machine code is not always the code that ran in the compiling process (a
parallel loop is linked into its caller and optimised again), so any reduction whose order is
left to the compiler (``fastmath`` with ``reassoc``) may round differently once loaded from the
cache. Every cpu kernel sums in an order fixed by its source instead. Three fresh processes
run every op and every cpu algorithm on a few shapes in both dtypes:

1. with an empty ``NUMBA_CACHE_DIR``: compiles everything it uses and fills the cache;
2. with that cache: loads everything from it (checked through Numba's cache statistics);
3. with that cache and ``NUMBA_NUM_THREADS=1``;

and their outputs must hash the same. The cold compile takes a while (about half a minute on 2
idle cores), hence the ``slow`` mark; CI runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    import numpy as np
    from fastconv._args import conv_geometry
    from fastconv._types import Algo
    from fastconv.kernels import cpu, cpu_conv, cpu_depthwise, cpu_hinge, cpu_winograd

    sys.path.insert(0, sys.argv[1])    # the tests folder: the variants the kernel tests force
    from cpu_variants import VARIANTS, supports
    # (name, x shape, weight shape, stride, padding, dilation, groups)
    SHAPES = [
        ("3x3", (2, 8, 12, 13), (6, 8, 3, 3), 1, 1, 1, 1),
        ("1x1", (2, 8, 9, 10), (12, 8, 1, 1), 1, 0, 1, 1),
        ("1x1_strided", (2, 8, 9, 10), (12, 4, 1, 1), (2, 3), 0, 1, 2),
        ("strided", (2, 6, 11, 13), (4, 3, 3, 2), (2, 1), (1, 0), (1, 2), 2),
        ("depthwise", (2, 8, 10, 10), (8, 1, 3, 3), 1, 1, 1, 8),
        ("grouped_5x5", (2, 6, 9, 10), (9, 2, 5, 5), 1, 2, 1, 3),   # tap runs, group GEMMs
        ("wide_rows", (1, 5, 34, 35), (7, 5, 3, 3), 1, ((0, 2), (1, 1)), 1, 1),
    ]

    def digest(a):
        a = np.ascontiguousarray(a)
        return hashlib.sha256(a.tobytes() + str((a.dtype, a.shape)).encode()).hexdigest()[:24]

    out = {}
    for dtype in (np.float32, np.float64):
        dn = np.dtype(dtype).name
        for sname, xs, ws, stride, padding, dilation, groups in SHAPES:
            g = conv_geometry(xs, ws, stride, padding, dilation, groups)
            rng = np.random.default_rng(len(out))
            x = rng.standard_normal(xs).astype(dtype)
            w = rng.standard_normal(ws).astype(dtype)
            b = rng.standard_normal(ws[0]).astype(dtype)
            gy = rng.standard_normal(g.output_shape).astype(dtype)
            for vname, (name, params) in VARIANTS.items():
                if not supports(name, g, params):
                    continue
                algo = Algo(name, params, "forced")
                key = f"{dn}/{sname}/{vname}"
                out[key + "/forward"] = digest(cpu.conv2d_forward(x, w, b, g, algo))
                out[key + "/input_grad"] = digest(cpu.conv2d_input_grad(w, gy, g, algo))
                out[key + "/weight_grad"] = digest(cpu.conv2d_weight_grad(x, gy, g, algo))
            out[f"{dn}/{sname}/bias_grad"] = digest(cpu.conv2d_bias_grad(gy, Algo("reduce")))
        for N, C in ((37, 10), (29, 300)):           # a short row and the lane path
            rng = np.random.default_rng(C)
            s = rng.standard_normal((N, C)).astype(dtype)
            labels = rng.integers(0, C, N)
            cw = rng.uniform(0.5, 2.0, C).astype(dtype)
            rs = rng.uniform(-1, 1, N).astype(dtype)
            for acc in cpu_hinge.ACCUMULATORS:
                algo = Algo("fused", (("accumulate", acc),), "forced")
                for p in (1, 2):
                    key = f"{dn}/hinge{N}x{C}/{acc}/p{p}"
                    losses, grad = cpu.hinge_loss_rows(s, labels, 0.7, p, cw, rs, True, algo)
                    alone, _ = cpu.hinge_loss_rows(s, labels, 0.7, p, cw, rs, False, algo)
                    out[key + "/fused_loss"] = digest(losses)
                    out[key + "/fused_grad"] = digest(grad)
                    out[key + "/loss_only"] = digest(alone)
    hits = misses = 0
    for mod in (cpu_conv, cpu_depthwise, cpu_hinge, cpu_winograd):
        for obj in vars(mod).values():
            stats = getattr(obj, "stats", None)
            if stats is not None and hasattr(stats, "cache_hits"):
                hits += sum(stats.cache_hits.values())
                misses += sum(stats.cache_misses.values())
    import numba
    print(json.dumps({"digests": out, "hits": hits, "misses": misses,
                      "threads": numba.get_num_threads()}))
''')


def _run(cache_dir: str, **env_extra: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, **env_extra)
    if "NUMBA_NUM_THREADS" not in env_extra:
        env.pop("NUMBA_NUM_THREADS", None)
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", WORKER, tests], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bitwise_identical_across_cache_processes_and_threads(tmp_path):
    cache = str(tmp_path / "numba_cache")
    cold = _run(cache)
    assert cold["misses"] > 0 and cold["hits"] == 0, (cold["hits"], cold["misses"])
    warm = _run(cache)
    assert warm["hits"] > 0 and warm["misses"] == 0, (warm["hits"], warm["misses"])
    single = _run(cache, NUMBA_NUM_THREADS="1")
    assert single["threads"] == 1
    assert len(cold["digests"]) > 200
    for name, other in (("loaded from the cache", warm), ("one thread", single)):
        differ = sorted(k for k in cold["digests"] if other["digests"][k] != cold["digests"][k])
        assert not differ, f"{name}: {len(differ)} outputs differ, e.g. {differ[:5]}"
    # The fused hinge pass and the loss-only pass give the same losses.
    for key, value in cold["digests"].items():
        if key.endswith("/loss_only"):
            assert value == cold["digests"][key.replace("loss_only", "fused_loss")], key
