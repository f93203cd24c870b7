"""Compile (or load from Numba's cache) every kernel of the ``cpu`` backend ahead of use.

The cpu kernels are Numba functions compiled on their first call for each dtype and then
cached on disk (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the kernels). On a cold cache
the first call of each kernel family pauses for seconds (tens of seconds per family on a slow
2-core machine; ``bench/compile_time.py`` measures it). ``warmup`` pays that cost when it
suits: in a container build or a CI cache step (run as ``python -m fastconv.warmup``), or at
a program's start. Later processes on the same machine and installation load the cache in
well under a second. Numba keys its cache on the CPU model and the source files, so a cache
built on another kind of CPU, or before an upgrade, is compiled again on first use.

Every algorithm and layout the cpu dispatch rules can choose is run once per dtype on a tiny
problem (forced by name, so the host's rules do not matter), which compiles every Numba
function a call can reach. With ``jobs > 1`` each family and dtype compiles in a child
process, ``jobs`` of them at once; the wall time is then about that of the slowest one.
Numba's cache update (read the function's index, add an entry, write it back) is not atomic
across processes: two children saving different dtypes of a shared function at once could
leave an index entry naming the other one's file. The children therefore hold an exclusive
file lock around each save (a wrapper set in the child processes only, never in the caller's).

    python -m fastconv.warmup [--jobs N] [--dtype float32] [--family winograd] [--quiet]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from ._types import Algo

DTYPES = ("float32", "float64")

# Per conv family: (x shape, w shape, stride, padding, dilation, groups, algo params), each
# chosen to reach one code path of the family's kernels (see kernels/cpu_*.py).
_WIDE = (("layout", "wide"),)
CONV_PROBLEMS: dict[str, tuple] = {
    "gemm1x1": (
        ((2, 8, 6, 6), (4, 8, 1, 1), 1, 0, 1, 1, ()),
        ((2, 8, 6, 6), (4, 8, 1, 1), 2, 0, 1, 1, ()),             # strided: subsampled input
    ),
    "im2col": (
        ((2, 3, 9, 9), (4, 3, 3, 3), 1, 1, 1, 1, _WIDE),
        ((1, 3, 9, 9), (4, 3, 3, 3), 1, 1, 1, 1, (("layout", "per_image"),)),
        ((2, 4, 9, 9), (4, 4, 5, 5), 1, 2, 1, 1, (("layout", "kernel_rows"),)),
        ((1, 4, 32, 32), (4, 4, 3, 3), 2, 1, 1, 1, _WIDE),       # stride 2: phase planes
        ((2, 4, 9, 9), (6, 2, 3, 3), 2, 0, 2, 2, _WIDE),         # strided, dilated, grouped
    ),
    "winograd": tuple(
        ((2, 8, 10, 10), (8, 8, 3, 3), 1, 1, 1, 1, (("tile", m), ("layout", layout)))
        for m in (2, 4) for layout in ("fused", "batched")
    ),
    "direct": (
        ((2, 4, 8, 8), (4, 1, 3, 3), 1, 1, 1, 4, ()),             # depthwise 3x3, stride 1
        ((2, 4, 8, 8), (4, 1, 5, 5), 1, 2, 1, 4, ()),             # runs of taps
        ((2, 4, 8, 8), (4, 1, 3, 3), 1, 0, 1, 4, ()),             # output narrower than input
        ((2, 4, 8, 8), (4, 1, 3, 3), 2, 1, 1, 4, ()),             # stride 2: phase planes
        ((2, 4, 8, 8), (4, 1, 3, 3), 3, 1, 1, 4, ()),             # other strides
        ((2, 3, 8, 8), (8, 3, 3, 3), 1, 1, 1, 1, ()),             # ungrouped, 3 channels
        ((2, 32, 8, 8), (32, 8, 3, 3), 1, 1, 1, 4, ()),           # group GEMMs (weight grad)
    ),
}
FAMILIES = tuple(CONV_PROBLEMS) + ("bias_reduce", "hinge")
# Slowest to compile first, so that with several jobs the slowest family does not start last
# (``bench/compile_time.py``, both dtypes, a 2-core AMD EPYC VM: 98, 69, 23, 22, 2.4, 1.5 s).
SLOWEST_FIRST = ("direct", "winograd", "im2col", "hinge", "bias_reduce", "gemm1x1")


def _conv_family(name: str, dtype: np.dtype) -> None:
    """Run forward, input gradient and weight gradient of every problem of family ``name``
    through the cpu kernels with the algorithm forced."""
    from ._args import conv_geometry
    from .dispatch import backend_module

    cpu = backend_module("cpu")
    for xs, ws, stride, pad, dil, groups, params in CONV_PROBLEMS[name]:
        geom = conv_geometry(xs, ws, stride, pad, dil, groups)
        algo = Algo(name, params)
        x, w = np.ones(xs, dtype), np.ones(ws, dtype)
        gy = np.ones(geom.output_shape, dtype)
        cpu.conv2d_forward(x, w, np.ones(ws[0], dtype), geom, algo)
        cpu.conv2d_input_grad(w, gy, geom, algo)
        cpu.conv2d_weight_grad(x, gy, geom, algo)


def _bias_reduce(dtype: np.dtype) -> None:
    from .conv import conv2d_bias_grad

    conv2d_bias_grad(np.ones((2, 3, 4, 4), dtype), backend="cpu")


def _hinge(dtype: np.dtype) -> None:
    """Short and long rows (and, in float32, rows long enough to sum in float64)."""
    from .dispatch.cpu import HINGE_NATIVE_SUM_MAX_C
    from .hinge import hinge_loss, hinge_loss_and_grad
    from .kernels.cpu_hinge import SHORT_ROW

    for C in (SHORT_ROW - 1, SHORT_ROW, HINGE_NATIVE_SUM_MAX_C + 1):
        scores, labels = np.ones((3, C), dtype), np.zeros(3, np.int64)
        hinge_loss_and_grad(scores, labels, backend="cpu")
        hinge_loss(scores, labels, backend="cpu")


def _run_family(name: str, dtypes: Sequence[str]) -> float:
    """Seconds to compile (or load) family ``name`` in this process, for ``dtypes``."""
    start = time.perf_counter()
    for dt in dtypes:
        dtype = np.dtype(dt)
        if name in CONV_PROBLEMS:
            _conv_family(name, dtype)
        elif name == "bias_reduce":
            _bias_reduce(dtype)
        else:
            _hinge(dtype)
    return time.perf_counter() - start


def _dtype_name(dt) -> str:
    """``"float32"`` or ``"float64"`` for any spelling NumPy accepts; ValueError otherwise."""
    try:
        name = np.dtype(dt).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dt!r}; choose from {DTYPES}")
    return name


def _lock_cache_saves() -> None:
    """Make each save to Numba's cache exclusive among the warm-up's child processes (see the
    module docstring); called in those children only."""
    import fcntl

    from numba.core import caching

    save = caching.IndexDataCacheFile.save

    def locked_save(self, key, data):
        # one lock per cache directory (where the kernels' index files lie)
        where = os.path.dirname(os.path.abspath(self._index_path))
        tag = hashlib.sha1(where.encode()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), f"fastconv-warmup-{tag}.lock")
        with open(path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return save(self, key, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    caching.IndexDataCacheFile.save = locked_save


def _can_run_children() -> bool:
    """Whether the children can lock the cache saves (POSIX file locks, Numba's cache file
    class where this module expects it)."""
    try:
        import fcntl  # noqa: F401

        from numba.core import caching
    except ImportError:
        return False
    return hasattr(getattr(caching, "IndexDataCacheFile", None), "save")


def _run_child(name: str, dtype: str) -> float:
    """:func:`_run_family` for one dtype in a child process (same interpreter and
    environment), which locks its cache saves."""
    cmd = [sys.executable, "-m", "fastconv.warmup", "--quiet", "--child", "--family", name,
           "--dtype", dtype]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"warming up {name!r} failed in a child process:\n"
                           f"{res.stderr[-2000:]}")
    return time.perf_counter() - start


def warmup(dtypes: Sequence[str] = DTYPES, families: Optional[Sequence[str]] = None, *,
           jobs: int = 1) -> dict[str, float]:
    """Compile (or load from Numba's cache) the cpu kernels, so later calls do not pause.

    Parameters
    ----------
    dtypes : sequence of str or dtype
        ``"float32"`` and/or ``"float64"`` (default: both).
    families : sequence of str, optional
        Kernel families among :data:`FAMILIES` (default: all).
    jobs : int
        Child processes compiling at once, one per family and dtype (default 1: all in this
        process; also where POSIX file locks are missing).

    Returns
    -------
    dict
        Seconds per family (with ``jobs > 1``, the sum of its children's wall times, start-up
        included).

    Raises
    ------
    BackendUnavailableError
        When the cpu backend cannot run here (Numba missing).
    """
    from .dispatch import _require

    _require("cpu")
    names = tuple(FAMILIES if families is None else families)
    for name in names:
        if name not in FAMILIES:
            raise ValueError(f"unknown kernel family {name!r}; choose from {FAMILIES}")
    dtypes = tuple(_dtype_name(dt) for dt in dtypes)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1 or not _can_run_children():
        return {name: _run_family(name, dtypes) for name in names}
    tasks = [(name, dt) for name in sorted(names, key=SLOWEST_FIRST.index) for dt in dtypes]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {task: pool.submit(_run_child, *task) for task in tasks}
        return {name: sum(futures[name, dt].result() for dt in dtypes) for name in names}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastconv.warmup",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", "-j", type=int, default=1,
                        help="child processes compiling at once, one per family and dtype "
                             "(default 1: none)")
    parser.add_argument("--dtype", action="append", choices=DTYPES,
                        help="a dtype to compile for (repeatable; default: both)")
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="a kernel family (repeatable; default: all)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:                  # one of warmup's children: saves to the cache locked
        _lock_cache_saves()
    start = time.perf_counter()
    seconds = warmup(args.dtype or DTYPES, args.family, jobs=args.jobs)
    if not args.quiet:
        for name, s in seconds.items():
            print(f"{name:12s} {s:7.1f} s")
        print(f"{'total':12s} {time.perf_counter() - start:7.1f} s wall, {args.jobs} job(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
