"""``fastconv.warmup.warmup``: it reaches every Numba function the cpu backend's calls reach, so a
warmed-up process compiles (or loads) nothing more on later calls."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv
from fastconv import warmup as wu

pytestmark = pytest.mark.skipif("cpu" not in fastconv.available_backends(),
                                reason="cpu backend unavailable")

# A child process: warm up, note every fastconv Numba function's signatures, then make public
# calls the warm-up list was not written from (layers of many kinds through the real dispatch,
# seeded random geometries, the hinge variants), and report the signatures they added.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import numba
    import fastconv
    from fastconv.kernels import cpu_conv, cpu_depthwise, cpu_hinge, cpu_winograd
    from numba.core.registry import CPUDispatcher

    def signatures():
        out = {}
        for mod in (cpu_conv, cpu_depthwise, cpu_hinge, cpu_winograd):
            for name, obj in vars(mod).items():
                if isinstance(obj, CPUDispatcher):
                    out[mod.__name__ + "." + name] = {str(s) for s in obj.signatures}
        return out

    from fastconv.warmup import warmup
    warmup()
    before = signatures()

    LAYERS = [  # x shape, w shape, stride, padding, dilation, groups
        ((2, 3, 16, 16), (8, 3, 3, 3), 1, 1, 1, 1),
        ((2, 16, 12, 12), (16, 16, 3, 3), 1, 1, 1, 1),
        ((2, 64, 28, 28), (64, 64, 3, 3), 1, 1, 1, 1),
        ((4, 64, 14, 14), (64, 64, 3, 3), 1, 1, 1, 1),
        ((8, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, 1),
        ((2, 32, 16, 16), (64, 32, 1, 1), 1, 0, 1, 1),
        ((2, 32, 16, 16), (64, 32, 1, 1), 2, 0, 1, 1),
        ((2, 16, 16, 16), (32, 16, 3, 3), 2, 1, 1, 1),
        ((2, 8, 14, 14), (16, 8, 5, 5), 1, 2, 1, 1),
        ((1, 8, 36, 36), (8, 8, 5, 5), 1, 2, 1, 1),
        ((1, 3, 40, 40), (16, 3, 7, 7), 2, 3, 1, 1),
        ((2, 16, 12, 12), (16, 1, 3, 3), 1, 1, 1, 16),
        ((2, 16, 12, 12), (16, 1, 3, 3), 2, 1, 1, 16),
        ((2, 16, 12, 12), (16, 1, 5, 5), 1, 2, 1, 16),
        ((2, 16, 12, 12), (32, 1, 3, 3), 1, 0, 1, 16),
        ((2, 32, 12, 12), (32, 4, 3, 3), 1, 1, 1, 8),
        ((2, 64, 12, 12), (64, 16, 3, 3), 1, 1, 1, 4),
        ((2, 8, 11, 13), (8, 8, 3, 3), 1, 2, 2, 1),
        ((2, 8, 11, 13), (8, 4, 3, 2), 3, (1, 0), 1, 2),
        ((2, 8, 10, 10), (8, 8, 3, 3), 1, 0, 1, 1),
    ]
    rng = np.random.default_rng(0)
    for _ in range(24):
        G = int(rng.choice([1, 1, 2, 4]))
        Cg, Kg = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        R, S = int(rng.choice([1, 2, 3, 5])), int(rng.choice([1, 3, 4]))
        H, W = int(rng.integers(6, 20)), int(rng.integers(6, 20))
        pad, dil = int(rng.integers(0, 3)), int(rng.choice([1, 1, 2]))
        if min(H, W) + 2 * pad > dil * (max(R, S) - 1):
            LAYERS.append(((2, G * Cg, H, W), (G * Kg, Cg, R, S), int(rng.choice([1, 2, 3])),
                           pad, dil, G))

    for dtype in (np.float32, np.float64):
        for xs, ws, stride, pad, dil, groups in LAYERS:
            kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, backend="cpu")
            x, w = np.ones(xs, dtype), np.ones(ws, dtype)
            y = fastconv.conv2d(x, w, np.ones(ws[0], dtype), **kw)
            fastconv.conv2d_input_grad(xs, w, y, **kw)
            fastconv.conv2d_weight_grad(x, ws, y, **kw)
            fastconv.conv2d_bias_grad(y, backend="cpu")
        for N, C in ((7, 3), (300, 10), (5, 64), (9, 100), (4, 3000)):
            s, y = np.ones((N, C), dtype), np.arange(N, dtype=np.int64) % C
            for p in (1, 2):
                fastconv.hinge_loss_and_grad(s, y, p=p, weight=np.ones(C, dtype),
                                             reduction="none", backend="cpu")
                fastconv.hinge_loss(s, y, p=p, backend="cpu")
                fastconv.hinge_loss_grad(s, y, reduction="sum", backend="cpu")

    after = signatures()
    added = {k: sorted(v - before.get(k, set())) for k, v in after.items()}
    print(json.dumps({k: v for k, v in added.items() if v}))
""")


def test_warmup_reaches_every_kernel_later_calls_use():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    added = json.loads(out.stdout.strip().splitlines()[-1])
    assert added == {}, f"compiled after the warm-up: {added}"


def test_warmup_returns_seconds_per_family():
    seconds = wu.warmup([np.float32], ["bias_reduce", "gemm1x1"])
    assert list(seconds) == ["bias_reduce", "gemm1x1"]
    assert all(s >= 0 for s in seconds.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(families=["fft"]), "unknown kernel family 'fft'"),
    (dict(dtypes=["float16"], families=["bias_reduce"]), "unsupported dtype 'float16'"),
    (dict(dtypes=["nonsense"], families=["bias_reduce"]), "unsupported dtype 'nonsense'"),
    (dict(jobs=0), "jobs must be at least 1"),
])
def test_warmup_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wu.warmup(**kwargs)


# Compiles (or loads) the two families in a fresh process and prints how many fastconv
# functions Numba had to compile for it.
RELOAD = textwrap.dedent("""
    import numba.core.event as ev
    import fastconv
    compiled = []
    class Count(ev.Listener):
        def on_start(self, e):
            fn = getattr((e.data or {}).get("dispatcher"), "py_func", None)
            if getattr(fn, "__module__", "").startswith("fastconv"):
                compiled.append(fn.__qualname__)
        def on_end(self, e):
            pass
    ev.register("numba:compile", Count())
    from fastconv.warmup import warmup
    warmup(families=["bias_reduce", "gemm1x1"])
    print(len(compiled))
""")


def test_command_line_with_jobs_fills_the_cache(tmp_path):
    """Four children (two families, two dtypes) build an empty cache at once; a later process
    then loads every kernel of those families from it and compiles none."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "fastconv.warmup", "-j", "2", "--family",
                          "bias_reduce", "--family", "gemm1x1"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["bias_reduce", "gemm1x1", "total"]
    assert "2 job(s)" in lines[-1]
    again = subprocess.run([sys.executable, "-c", RELOAD], capture_output=True, text=True,
                           timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split() == ["0"]


def test_children_lock_their_cache_saves():
    """The wrapper a child installs still saves through Numba's own method."""
    script = textwrap.dedent("""
        import inspect
        from numba.core import caching
        before = caching.IndexDataCacheFile.save
        from fastconv.warmup import _lock_cache_saves
        _lock_cache_saves()
        after = caching.IndexDataCacheFile.save
        print(after is not before, inspect.getclosurevars(after).nonlocals["save"] is before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]


def test_every_family_has_problems():
    assert set(wu.FAMILIES) == set(wu.CONV_PROBLEMS) | {"bias_reduce", "hinge"}
    assert sorted(wu.SLOWEST_FIRST) == sorted(wu.FAMILIES)
