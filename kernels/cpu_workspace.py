"""Scratch memory of the cpu conv kernels: chunk planning under a byte bound, and allocation.

Every algorithm that needs a workspace (im2col columns, Winograd tiles, packed gradients)
processes the batch in chunks whose scratch fits ``workspace_bytes``. The unit of work is one
*row* of one image (an output row for im2col, a row of output tiles for Winograd): a chunk is
either several whole images, or a run of rows of one image when a single image does not fit.

All scratch buffers come from :func:`scratch`, which refuses any buffer above the bound and
records the largest one handed out, so tests can check the bound is honoured. The ``*_bytes``
functions below are the one statement of what each algorithm needs, ``(fixed, per_row)``: the
kernels plan their chunks with them and the dispatch rules use them to decide what fits. This
module imports nothing but NumPy, so the rules can use it without loading Numba.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Iterator, NamedTuple

import numpy as np

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
# Measured on 2 cores (stem layer, forward and both gradients): 16 MiB chunks took 55 ms,
# 2 MiB ones 60 ms (more calls and thread wake-ups) and 64 MiB ones 79 ms (the packed data no
# longer stays in the caches between the packing pass and the GEMM).
DEFAULT_CHUNK_BYTES = 16 * 2**20
# GEMMs issued from Numba's workers must stay single-threaded in BLAS (threaded by OpenBLAS
# inside the workers they collapsed, r3x3_14: 56-1180 ms against 70): OpenBLAS (NumPy's and
# SciPy's wheels, 0.3.x; interface/gemm.c, SMP_THRESHOLD_MIN 65536 x GEMM_MULTITHREAD_THRESHOLD
# 4) runs a GEMM of fewer multiply-adds than this on the calling thread alone.
BLAS_SERIAL_MACS = 2 * 65536 * 4
# The direct weight gradient of a grouped stride-1 layer runs one GEMM per group from the
# workers (im2col rows of the group, BLAS single-threaded) from this many filters and this
# reduction (Cg R S) per group; thinner groups (depthwise) keep the per-tap sums. Measured,
# float32, 2 threads, N=8 (ms, four alternating rounds, against the per-tap sums and im2col;
# im2col's range over two such runs): 2 filters, 2 channels x 3x3 per group, 56x56: 1.2-1.9 /
# 2.3-2.8 / 2.6-6.7; 4 x 4 x 3x3, 28x28: 0.8-1.1 / 2.4-2.9 / 1.8-2.8; 4 x 4 x 5x5: 1.2-1.7 /
# 3.0-4.2 / 1.5-3.5; 8 x 8 x 3x3, 28x28 x 256: 2.1-5.5 / - / 7.9-11.7 (56x56 x 128: 5.7-7.9,
# fused Winograd 12.4-15.5).
GEMM_MIN_FILTERS = 2
GEMM_MIN_REDUCTION = 16


def group_gemms(geom) -> bool:
    """Whether the direct weight gradient runs im2col rows and a GEMM per group (workspace
    aside): stride 1, and for grouped layers at least ``GEMM_MIN_FILTERS`` filters and
    ``GEMM_MIN_REDUCTION`` of ``Cg R S`` per group. Shared by the kernel and the rules."""
    if geom.stride != (1, 1):
        return False
    Kg, CgRS = geom.K // geom.groups, geom.C // geom.groups * geom.R * geom.S
    return geom.groups == 1 or (Kg >= GEMM_MIN_FILTERS and CgRS >= GEMM_MIN_REDUCTION)


_largest = [0]

# Scratch buffers of at least this many bytes handed out inside a lease (one conv op) go back
# to the calling thread's cache when the op returns, up to SCRATCH_CACHE_BYTES in all. Fresh
# buffers every call were fresh pages every call once glibc gave the heap's top back to the
# system: r3x3_28's forward took about 1960 minor page faults per call, the batched Winograd's
# separate V and M 1250 (and twice the time).
SCRATCH_CACHE_MIN_BYTES = 256 * 2**10
SCRATCH_CACHE_BYTES = int(float(os.environ.get("FASTCONV_SCRATCH_CACHE_MB", "64")) * 2**20)


class _Cache(threading.local):
    """One thread's scratch cache: buffers free for reuse, buffers lent in open leases."""

    def __init__(self) -> None:
        self.free: list[np.ndarray] = []
        self.lent: list[np.ndarray] = []
        self.depth = 0


_CACHE = _Cache()


@contextlib.contextmanager
def lease() -> Iterator[None]:
    """Scratch handed out inside comes from this thread's cache and goes back to it on exit
    (the caller guarantees no scratch array outlives the block: results are never scratch).
    Nested leases give back only their own buffers."""
    cache = _CACHE
    mark = len(cache.lent)
    cache.depth += 1
    try:
        yield
    finally:
        cache.depth -= 1
        back = cache.lent[mark:]
        del cache.lent[mark:]
        # most recent first; what does not fit the cache is released
        keep, total = [], 0
        for buf in back[::-1] + cache.free:
            if total + buf.nbytes <= SCRATCH_CACHE_BYTES:
                keep.append(buf)
                total += buf.nbytes
        cache.free = keep


def _bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialised bytes: inside a lease the smallest cached buffer that holds
    them (or a new one, lent until the lease ends), else a new array."""
    cache = _CACHE
    if cache.depth == 0 or nbytes < SCRATCH_CACHE_MIN_BYTES or SCRATCH_CACHE_BYTES <= 0:
        return np.empty(nbytes, dtype=np.uint8)
    fits = [i for i, b in enumerate(cache.free) if b.nbytes >= nbytes]
    if fits:
        buf = cache.free.pop(min(fits, key=lambda i: cache.free[i].nbytes))
    else:
        buf = np.empty(nbytes, dtype=np.uint8)
    cache.lent.append(buf)
    return buf


def cached_scratch_bytes() -> int:
    """Bytes this thread's scratch cache holds between ops (for tests)."""
    return sum(b.nbytes for b in _CACHE.free)


class Chunk(NamedTuple):
    """Images ``n0 .. n0 + nc`` and rows ``r0 .. r0 + rc`` of each (all rows when nc > 1)."""

    n0: int
    nc: int
    r0: int
    rc: int


def scratch(shape: tuple[int, ...], dtype: np.dtype, bound: int) -> np.ndarray:
    """An uninitialised scratch buffer of ``shape``; raises if it would exceed ``bound`` bytes.
    Inside a :func:`lease` it is reused memory (see SCRATCH_CACHE_BYTES).

    Exceeding the bound is a planning bug (the dispatch rules pick an algorithm whose smallest
    chunk fits), hence an exception rather than a silent allocation.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > bound:
        raise MemoryError(f"scratch buffer of {nbytes} bytes exceeds the workspace bound of "
                          f"{bound} bytes; the chunk planner should have prevented this")
    _largest[0] = max(_largest[0], nbytes)
    dtype = np.dtype(dtype)
    return _bytes(nbytes)[:nbytes].view(dtype).reshape(shape)


def largest_scratch_bytes(reset: bool = False) -> int:
    """The largest scratch buffer handed out since the last reset (for tests)."""
    value = _largest[0]
    if reset:
        _largest[0] = 0
    return value


def workspace_bound(algo) -> int:
    """The workspace bound an ``Algo`` carries (the default when it carries none)."""
    return int(algo.get("workspace_bytes", DEFAULT_WORKSPACE_BYTES))


def im2col_bytes(op: str, geom, layout: str, itemsize: int) -> tuple[int, int]:
    """Workspace of im2col for ``op``: fixed (weights with the bias column; the weight
    gradient's partial sum) and per output row (the im2col rows, plus a packed ``(K, Q)`` row
    for the wide layout and the weight gradient)."""
    G, K, Q = geom.groups, geom.K, geom.Q
    CgRS = geom.C // G * geom.R * geom.S
    if op == "forward":
        rows, fixed = geom.C * geom.R * geom.S + G, K * (CgRS + 1)
    else:
        rows, fixed = geom.C * geom.R * geom.S, K * CgRS if op == "weight_grad" else 0
    packed = K if (layout == "wide" or op == "weight_grad") else 0
    return fixed * itemsize, (rows + packed) * Q * itemsize


def kernel_rows_runs(geom, op: str) -> bool:
    """Whether im2col's ``kernel_rows`` layout computes ``op`` of this layer: stride 1 and one
    group; for the input gradient also no padding past the kernel's extent (its correlation
    would pad ``grad_output`` by a negative amount). ``op="input_grad"`` is the narrowest, so
    it answers for every op of the layer."""
    pt, pb, pl, pr = geom.padding
    ext_h, ext_w = (geom.R - 1) * geom.dilation[0], (geom.S - 1) * geom.dilation[1]
    return (geom.stride == (1, 1) and geom.groups == 1
            and (op != "input_grad" or (max(pt, pb) <= ext_h and max(pl, pr) <= ext_w)))


def kernel_rows_bytes(op: str, geom, itemsize: int) -> tuple[int, int]:
    """Workspace of im2col's ``kernel_rows`` layout (stride 1, one group; see
    ``cpu_conv._kernel_rows_conv``) for ``op``: fixed (the stacked weights; for the weight
    gradient its ``R`` kernel rows' sums) and per image (the kernel-row im2col of its padded
    plane, and the GEMM's product of every kernel row, or for the weight gradient one image's
    product). The input gradient is the forward of ``grad_output`` with the rotated kernel:
    channels ``K -> C`` over the ``H x W`` plane."""
    ins, outs, rows, cols = ((geom.K, geom.C, geom.H, geom.W) if op == "input_grad" else
                             (geom.C, geom.K, geom.P, geom.Q))
    R, S = geom.R, geom.S
    padded = rows + (R - 1) * geom.dilation[0]
    if op == "weight_grad":
        return (R * outs * ins * S * itemsize,
                (ins * S * padded * cols + outs * ins * S) * itemsize)
    return R * outs * ins * S * itemsize, (ins * S + R * outs) * padded * cols * itemsize


def winograd_bytes(op: str, geom, m: int, layout: str, itemsize: int) -> tuple[int, int]:
    """Workspace of Winograd F(m x m, 3 x 3) for ``op`` (see :func:`winograd_tile_bytes`); the
    input gradient tiles the ``H x W`` input instead of the ``P x Q`` output. The batched
    layout's smallest chunk is a whole image (all its rows of tiles)."""
    rows, cols = (geom.H, geom.W) if op == "input_grad" else (geom.P, geom.Q)
    fixed, per_row = winograd_tile_bytes(m, -(-cols // m), geom.C + geom.K,
                                         geom.K * (geom.C // geom.groups), op == "weight_grad",
                                         itemsize)
    fixed += winograd_temp_elems(m) * itemsize              # and one worker's scratch
    if layout == "batched":
        cin, cout = (geom.K, geom.C) if op == "input_grad" else (geom.C, geom.K)
        return fixed, winograd_batched_bytes(m, -(-rows // m), -(-cols // m), cin, cout,
                                             itemsize)
    return fixed, per_row


# Row stride (elements) of the Winograd transforms' scratch planes: a compile-time constant
# (see kernels/cpu_winograd.py), 1024 + 8 because rows a multiple of 4 KiB apart fall into the
# same L1 sets (a transform pass measured 10 against 2.4 ns per tile with 512 against 520).
WINOGRAD_PLANE = 1032


def winograd_temp_elems(m: int) -> int:
    """Elements of one worker's transform scratch for F(m x m, 3 x 3), the larger of the two
    layouts': fused, ``m*m`` tile planes and ``2*m`` neighbour planes, ``(m + 2)**2``
    transform-point planes and a band of ``m*m`` planes; batched, two sets of tile and
    neighbour planes (a window's first ``m`` and last two rows) and the transform points."""
    return (2 * (m * m + 2 * m) + (m + 2) ** 2) * WINOGRAD_PLANE


def winograd_batched_bytes(m: int, th: int, tw: int, C: int, K: int, itemsize: int) -> int:
    """Bytes per image of the batched (channels-last) layout for ``th x tw`` tiles: ``V`` and
    ``M``, the ``(m + 2)**2`` transform points of every tile, of ``C`` and ``K`` channels (the
    weight gradient's transformed grad_output takes M's place)."""
    return (m + 2) ** 2 * th * tw * (C + K) * itemsize


def winograd_applies(geom) -> bool:
    """Whether the cpu Winograd kernels compute the layer ``geom``: a 3x3 kernel at stride 1,
    undilated (any padding and groups). Anywhere else they would return a wrong result, not an
    error (the backend trusts the dispatch rules, which ask this first)."""
    return (geom.R, geom.S, tuple(geom.stride), tuple(geom.dilation)) == (3, 3, (1, 1), (1, 1))


def winograd_row_fits(m: int, cols: int) -> bool:
    """Whether the transforms' planes hold two rows of tiles of a ``cols``-wide plane (plus
    each row's padding tile and one element): the widest plane they can tile."""
    return 2 * (-(-cols // m) + 1) + 1 <= WINOGRAD_PLANE


def winograd_tile_bytes(m: int, tiles_per_row: int, channels: int, filter_elems: int,
                        weight_grad: bool, itemsize: int) -> tuple[int, int]:
    """Fixed: the transformed filters (and for the weight gradient their gradient and its
    partial sum). Per row of tiles: the transformed input and output tiles of all ``channels``
    (in plus out) of the fused layout's blocks. Each worker adds its transform scratch
    (:func:`winograd_temp_elems`)."""
    A2 = (m + 2) ** 2
    fixed = A2 * filter_elems * (2 if weight_grad else 1)
    return fixed * itemsize, A2 * tiles_per_row * channels * itemsize


def gemm1x1_bytes(op: str, geom, itemsize: int) -> tuple[int, int]:
    """Workspace of the 1x1 GEMMs: the weight gradient's partial sum, and when strided the
    subsampled input (or the input gradient on the output grid)."""
    fixed = geom.K * (geom.C // geom.groups) if op == "weight_grad" else 0
    if geom.stride != (1, 1):
        fixed += geom.N * geom.C * geom.P * geom.Q
    return fixed * itemsize, 0


def direct_plane_bytes(geom, itemsize: int, threads: int = 2, images: int = 1) -> int:
    """Scratch of the stride-1 direct kernels, per thread: two zero-padded planes (of
    ``images`` images side by side) and the weight gradient's per-tap sums, a padded plane's
    worth and a row of float64 lanes for each tap (counted for two threads)."""
    rows = max(geom.P, geom.H) + (geom.R - 1) * geom.dilation[0]
    cols = max(geom.Q, geom.W) + 2 * (geom.S - 1) * geom.dilation[1]
    taps = geom.R * geom.S * cols * (rows * itemsize + 8)
    return threads * (2 * rows * cols * images * itemsize + taps)


def fits(sizes: tuple[int, int], bound: int) -> bool:
    """Whether the fixed workspace plus one row fit ``bound`` (the smallest possible chunk)."""
    return sum(sizes) <= bound


def rows_per_chunk(rows: int, bytes_per_row: int, bound: int, preferred: int) -> int:
    """How many rows fit in one chunk: up to ``preferred`` bytes, never above ``bound``.

    At least one row; the caller's dispatch rules guarantee one row fits ``bound``.
    """
    budget = min(bound, preferred)
    if bytes_per_row > bound:
        raise MemoryError(f"one row needs {bytes_per_row} bytes of workspace, above the bound "
                          f"of {bound} bytes")
    return max(1, min(rows, budget // max(bytes_per_row, 1)))


def plan_chunks(N: int, rows: int, sizes: tuple[int, int], bound: int,
                preferred: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Split ``N`` images of ``rows`` rows each into chunks of at most ``preferred`` bytes of
    per-row workspace, with ``sizes = (fixed, per_row)`` keeping the total under ``bound``.

    Whole images are grouped while one image fits; otherwise each image is cut into runs of
    rows. The order is fixed, so results accumulated over chunks are reproducible.
    """
    fixed, bytes_per_row = sizes
    bound -= fixed
    image_bytes = rows * bytes_per_row
    if image_bytes <= min(bound, preferred):
        per = max(1, min(N, min(bound, preferred) // max(image_bytes, 1)))
        for n0 in range(0, N, per):
            yield Chunk(n0, min(per, N - n0), 0, rows)
        return
    rc = rows_per_chunk(rows, bytes_per_row, bound, preferred)
    for n0 in range(N):
        for r0 in range(0, rows, rc):
            yield Chunk(n0, 1, r0, min(rc, rows - r0))


def host_avx512() -> bool:
    """Whether LLVM reports AVX-512 (``avx512f``) on this host: the vector width the cpu
    kernels are compiled for when Numba targets the host, its default. One place for the
    query that the kernels (``cpu_depthwise.PAIRS``) and the dispatch rules both make;
    llvmlite is imported here, not at the top, so that this module loads with NumPy alone."""
    import llvmlite.binding

    return bool(llvmlite.binding.get_host_cpu_features()["avx512f"])
