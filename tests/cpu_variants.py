"""The forced cpu algorithm variants the kernel tests run, and which shapes each can run.

Shared by ``tests/test_cpu_conv.py``, ``tests/test_edge_values.py`` and the worker process of
``tests/test_determinism.py`` (which imports it from this folder). Imports nothing from the
tests, so a plain ``python`` process can use it.
"""
from __future__ import annotations

from fastconv.kernels import cpu_workspace

# Every code path of the backend: (algorithm name, params); chunk_bytes=1 forces one row (of
# output pixels or of Winograd tiles) per chunk, the most chunked a computation can get.
VARIANTS = {
    "gemm1x1": ("gemm1x1", ()),
    "im2col": ("im2col", (("layout", "per_image"),)),
    "im2col_wide": ("im2col", (("layout", "wide"),)),
    "im2col_rows": ("im2col", (("layout", "wide"), ("chunk_bytes", 1))),
    "im2col_kernel_rows": ("im2col", (("layout", "kernel_rows"),)),
    "im2col_kernel_rows_images": ("im2col", (("layout", "kernel_rows"), ("chunk_bytes", 1))),
    "winograd2": ("winograd", (("tile", 2),)),
    "winograd4": ("winograd", (("tile", 4),)),
    "winograd4_rows": ("winograd", (("tile", 4), ("chunk_bytes", 1))),
    "winograd2_batched": ("winograd", (("tile", 2), ("layout", "batched"))),
    "winograd4_batched_images": ("winograd", (("tile", 4), ("layout", "batched"),
                                              ("chunk_bytes", 1))),
    "direct": ("direct", ()),
    "direct_rows": ("direct", (("workspace_bytes", 1),)),   # no room for padded planes
}


def supports(algo_name: str, geom, params: tuple = ()) -> bool:
    """Whether the forced algorithm ``algo_name`` with ``params`` can run every op of the
    layer ``geom`` (the kernels' own domain statements, as the dispatch rules ask them)."""
    if dict(params).get("layout") == "kernel_rows":     # all three ops run it
        return cpu_workspace.kernel_rows_runs(geom, "input_grad")
    if algo_name == "gemm1x1":
        return (geom.R, geom.S, geom.padding) == (1, 1, (0, 0, 0, 0))
    if algo_name == "winograd":
        return cpu_workspace.winograd_applies(geom)
    return True
