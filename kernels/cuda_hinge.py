"""Launcher of the fused hinge-loss kernel (``hinge.cu``).

Plain Python, no CuPy: `hinge_launch` prepares a `Launch` that ``cuda_build.launch`` runs on the
GPU and the tests inspect (or run in a host emulation) without one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .cuda_build import NULL, Launch
from .cuda_conv import c_type

THREADS = 256
GROUPS = (1, 2, 4, 8, 16, 32)          # lanes per row
SMALL_ITEMS = 4                        # registers per lane when GROUP < 32
WARP_ITEMS = (4, 8, 16, 32)            # registers per lane when a warp owns a row
# Every (GROUP, ITEMS) instantiation the launcher may request.
LAYOUTS = tuple((g, SMALL_ITEMS) for g in GROUPS[:-1]) + tuple((32, i) for i in WARP_ITEMS)


def row_layout(C: int) -> tuple[int, int]:
    """``(GROUP, ITEMS)`` for rows of ``C`` classes: the fewest lanes that hold a row in at
    most 4 registers each, up to a warp; then a warp with up to 32 registers per lane (rows
    longer than 1024 keep their first 1024 scores in registers and re-read the rest).

    Examples: C=3 -> (1, 4); C=10 -> (4, 4); C=100 -> (32, 4); C=1000 -> (32, 32).
    """
    for group in GROUPS[:-1]:
        if C <= group * SMALL_ITEMS:
            return group, SMALL_ITEMS
    for items in WARP_ITEMS:
        if C <= 32 * items:
            return 32, items
    return 32, WARP_ITEMS[-1]


RANGE_KERNEL = "fc::label_range"      # per-block extremes of the labels (hinge.cu)


def kernel_name(dtype: Any, group: int, items: int) -> str:
    """Name expression of a ``hinge_rows`` instantiation."""
    return f"fc::hinge_rows<{c_type(dtype)}, {group}, {items}>"


def all_kernel_names() -> dict[str, list[str]]:
    """Every instantiation `hinge_launch` can request."""
    return {"hinge.cu": [kernel_name(dt, g, i) for dt in ("float32", "float64")
                         for g, i in LAYOUTS] + [RANGE_KERNEL]}


def blocks_per_sm(dtype: Any, group: int, items: int) -> int:
    """Resident blocks per SM of ``hinge_rows<T, group, items>``: the minimum its
    ``__launch_bounds__`` asks of the register allocator (``hinge_min_blocks`` in hinge.cu):
    4 while a lane holds at most 16 words (4 bytes) of scores, else 2. The compiled register
    counts are checked against it in tests/test_sass_report.py."""
    words = items * np.dtype(dtype).itemsize // 4
    return 4 if words <= 16 else 2


def hinge_grid(N: int, group: int, sm_count: int, resident: int = 4) -> tuple[int, int, int]:
    """Enough blocks to cover the rows once, at most ``resident`` (`blocks_per_sm`) per SM
    (grid-stride beyond)."""
    rows_per_block = THREADS // group
    return (max(1, min(-(-N // rows_per_block), resident * sm_count)), 1, 1)


def hinge_launch(scores: Any, labels: Any, class_weight: Any, row_scale: Any, losses: Any,
                 grad: Any, margin: float, p: int, group: int, items: int,
                 sm_count: int) -> Launch:
    """One launch of ``hinge_rows`` over all rows.

    Parameters
    ----------
    scores : array (N, C)
    labels : int64 array (N,)
    class_weight : array (C,)
    row_scale : array (1,) or (N,)
    losses : array (N,), written
    grad : array (N, C) or None
        Written when given; ``None`` skips the gradient phase.
    margin : float
    p : {1, 2}
    group, items : int
        Row layout, normally `row_layout(C)` (the dispatch rules pass it in ``Algo.params``).
    sm_count : int
        Multiprocessors of the device, to size the grid.
    """
    N, C = scores.shape
    dtype = np.dtype(scores.dtype)
    if (group, items) not in LAYOUTS:
        raise ValueError(f"no hinge_rows instantiation for GROUP={group}, ITEMS={items}")
    if C > 2**31 - 1:
        raise ValueError(f"{C} classes exceed the kernel's 32-bit column index")
    args = (scores, labels, class_weight, row_scale,
            np.int32(0 if row_scale.shape[0] == 1 else 1), dtype.type(margin), np.int32(p),
            np.int64(N), np.int32(C), losses, NULL if grad is None else grad)
    grid = hinge_grid(N, group, sm_count, blocks_per_sm(dtype, group, items))
    return Launch("hinge.cu", kernel_name(dtype, group, items), grid, (THREADS, 1, 1), 0, args)


def label_range_grid(N: int, sm_count: int) -> tuple[int, int, int]:
    """Blocks of ``label_range``: at most 2 per SM and at most one per 256 labels, so that
    every block sees at least one label (its partial extremes are then real labels)."""
    if N < 1:
        raise ValueError("label_range needs at least one label")
    return (max(1, min(-(-N // THREADS), 2 * sm_count)), 1, 1)


def label_range_launch(labels: Any, partial: Any, sm_count: int) -> Launch:
    """One launch of ``label_range``.

    Parameters
    ----------
    labels : int64 array (N,), N >= 1
    partial : int64 array (2 * blocks,), written: ``(min, max)`` of each block's labels;
        ``blocks`` is ``label_range_grid(N, sm_count)[0]``.
    sm_count : int
    """
    N = labels.shape[0]
    grid = label_range_grid(N, sm_count)
    if np.dtype(labels.dtype) != np.int64 or np.dtype(partial.dtype) != np.int64:
        raise TypeError("label_range takes int64 labels and an int64 partial buffer")
    if tuple(partial.shape) != (2 * grid[0],):
        raise ValueError(f"partial must have shape ({2 * grid[0]},), got {partial.shape}")
    return Launch("hinge.cu", RANGE_KERNEL, grid, (THREADS, 1, 1), 0,
                  (labels, np.int64(N), partial))
