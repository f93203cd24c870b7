"""The ``cuda`` backend: CuPy arrays in, CuPy arrays out, on CuPy's current stream.

The five contract functions (see docs/backends.md) bind the GPU `Executor` to the generic
implementations below, which only compose launches (``cuda_conv``, ``cuda_hinge``) and a few
array-module calls. The generic functions take the array module and the launch runner as
arguments so that the host emulation of the tests (NumPy arrays, kernels run on the CPU) drives
exactly the same code.

Algorithms (chosen in ``fastconv/dispatch/cuda.py``):
  ``implicit_gemm`` / ``implicit_gemm_tf32``  conv2d.cu, every geometry; the input gradient
      gathers grad_output at the taps of the rotated kernel; reduction slices (always for the
      weight gradient's long N*P*Q reduction, for the others when their GEMM is small) are
      summed in a fixed order. A TF32 tile with layout "nhwc" runs ``conv_tf32_nhwc`` after
      the channels-last TF32 pre-pass (``_nhwc_forward``); the TF32 weight gradient with such
      a tile is a forward convolution with roles swapped per group (``_nhwc_weight_grad``).
  ``depthwise``   depthwise.cu (groups == C).
  ``winograd``    winograd.cu (cuda_winograd), 3x3 stride-1 layers, all three conv ops (the
      weight gradient in tile-reduction slices summed in a fixed order); with the
      ``precision`` parameter "tf32" the TF32 tensor-core kernel (forward, input gradient).
  ``gemm_1x1``    1x1, stride 1, no padding, one group: batched GEMM through cuBLAS
      (``matmul``); strict FP32 unless CuPy itself was told to use TF32 (the rules avoid it then).
  ``implicit_gemm_phases``  strided input gradient split by the stride**2 input phases
      (cuda_dgrad): each phase a dense stride-1 forward correlation of grad_output with its
      sub-kernel through ``forward`` (the implicit GEMM with each phase's tile and reduction
      slices from the ``phases`` parameter, or ``gemm_1x1`` for a plain 1x1 phase), its
      compact image scattered into grad_input; phases no tap reaches are zeroed.
  ``reduce``      bias gradient: grad_output summed over P*Q, then N.
  ``hinge_rows``  hinge.cu, fused loss and gradient.
  ``label_range`` hinge.cu, the labels' extremes for the range check before it.
Imports CuPy only when a function runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from . import cuda_build, cuda_conv, cuda_dgrad, cuda_hinge, cuda_winograd
from .cuda_build import Launch
from .cuda_conv import DGRAD, FPROP, WGRAD, SimtTile, Tf32Tile


@dataclass(frozen=True)
class Executor:
    """Where launches run and how arrays are made.

    Attributes
    ----------
    xp : module
        Array module of the arrays (``cupy``; ``numpy`` in the host emulation).
    run : callable
        ``run(launch)`` executes one `Launch`.
    empty : callable
        ``empty(shape, dtype)``: a new uninitialised array.
    sm_count : int
        Multiprocessors of the device (sizes grid-stride grids).
    """

    xp: Any
    run: Callable[[Launch], None]
    empty: Callable[[tuple, Any], Any]
    sm_count: int


_EXECUTORS: dict[int, Executor] = {}


def _gpu() -> Executor:
    """The `Executor` of CuPy's current device."""
    import cupy  # noqa: PLC0415 -- lazy: importing fastconv never needs CuPy

    dev = cuda_build.current_device()
    ex = _EXECUTORS.get(dev.index)
    if ex is None:
        ex = Executor(cupy, cuda_build.launch, lambda shape, dtype: cupy.empty(shape, dtype),
                      dev.sm_count)
        _EXECUTORS[dev.index] = ex
    return ex


# ---------------------------------------------------------------------------------------------
# Contract functions
# ---------------------------------------------------------------------------------------------
def conv2d_forward(x, weight, bias, geom, algo):
    """``y (N, K, P, Q)`` from ``x (N, C, H, W)``, ``weight (K, C/groups, R, S)``, ``bias (K,)``
    or None."""
    return forward(_gpu(), x, weight, bias, geom, algo)


def conv2d_input_grad(weight, grad_output, geom, algo):
    """``grad_input (N, C, H, W)`` from ``weight`` and ``grad_output (N, K, P, Q)``."""
    return input_grad(_gpu(), weight, grad_output, geom, algo)


def conv2d_weight_grad(x, grad_output, geom, algo):
    """``grad_weight (K, C/groups, R, S)`` from ``x`` and ``grad_output``."""
    return weight_grad(_gpu(), x, grad_output, geom, algo)


def conv2d_bias_grad(grad_output, algo):
    """``grad_bias (K,)``: ``grad_output`` summed over N, P and Q."""
    return bias_grad(_gpu(), grad_output, algo)


def hinge_loss_rows(scores, labels, margin, p, class_weight, row_scale, want_grad, algo):
    """Per-row hinge losses ``(N,)`` and, if ``want_grad``, the scaled gradient ``(N, C)``."""
    return hinge_rows(_gpu(), scores, labels, margin, p, class_weight, row_scale, want_grad,
                      algo)


def label_range(labels) -> tuple[int, int]:
    """``(min, max)`` of int64 labels ``(N,)``, N >= 1: one launch and one small read-back."""
    return labels_min_max(_gpu(), labels)


# ---------------------------------------------------------------------------------------------
# Generic implementations
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _tile(algo) -> SimtTile | Tf32Tile:
    kind = Tf32Tile if algo.name == "implicit_gemm_tf32" else SimtTile
    return kind(*algo.get("tile"))


def _sliced_or_chunked(ex: Executor, out, geom, rows: int, slices: int, splits: int,
                       launch) -> None:
    """Run a GEMM launcher ``launch(n0, n1, geom, dst, splits)`` over the whole batch, in
    ``slices`` reduction slices summed in a fixed order when there is more than one, or over
    batch chunks when 32-bit row indices (``rows`` per image) need them (then without slices:
    a GEMM that large fills the device anyway)."""
    chunks = cuda_conv.batch_chunks(geom.N, rows)
    if len(chunks) == 1:  # the usual case: no views to make
        if slices == 1:
            ex.run(launch(0, geom.N, geom, out, 1))
            return
        work = ex.empty((slices,) + tuple(out.shape), out.dtype)
        ex.run(launch(0, geom.N, geom, work, splits))
        ex.xp.sum(work, axis=0, out=out)
        return
    for n0, n1 in chunks:
        ex.run(launch(n0, n1, cuda_conv.with_batch(geom, n1 - n0), out[n0:n1], 1))


def _implicit_gemm(ex: Executor, mode: int, a, b, bias, out, geom, algo) -> None:
    """FPROP or DGRAD, through `_sliced_or_chunked`."""
    tile = _tile(algo)
    splits = int(algo.get("splits", 1))
    if isinstance(tile, Tf32Tile) and tile.layout == "nhwc":
        _nhwc_forward(ex, a, b, bias, out, geom, tile, splits)
        return
    reduction = cuda_conv.gemm_shape(geom, mode)[2]
    slices, _ = cuda_conv.split_reduction(reduction, splits, tile.bk)

    def launch(n0, n1, part, dst, sp):
        return cuda_conv.implicit_gemm_launch(mode, a[n0:n1], b, bias, dst, part, tile, sp)
    _sliced_or_chunked(ex, out, geom, cuda_conv.rows_per_image(geom, mode), slices, splits,
                       launch)


def _nhwc_forward(ex: Executor, x, weight, bias, y, geom, tile: Tf32Tile, splits: int) -> None:
    """TF32 forward through ``conv_tf32_nhwc``: x and the weight copied channels-last and
    rounded to TF32 by the pre-pass (workspace ``cuda_conv.nhwc_workspace_bytes``), then the
    GEMM through `_sliced_or_chunked`."""
    cg = geom.C // geom.groups
    hw, rs = geom.H * geom.W, geom.R * geom.S
    nx, nw = cuda_conv.nhwc_buffer_sizes(geom)
    xt, wt = ex.empty((nx,), x.dtype), ex.empty((nw,), x.dtype)
    for spec in (cuda_conv.channels_last_launches(x, xt, geom.N, hw, geom.groups, cg,
                                                  geom.C * hw, hw)
                 + cuda_conv.channels_last_launches(weight, wt, geom.K, rs, 1, cg, cg * rs, rs)):
        ex.run(spec)
    slices, _ = cuda_conv.nhwc_slices(geom, splits)
    per_image = nx // geom.N

    def launch(n0, n1, part, dst, sp):
        return cuda_conv.nhwc_forward_launch(xt[n0 * per_image:n1 * per_image], wt, bias, dst,
                                             part, tile, sp)
    _sliced_or_chunked(ex, y, geom, geom.P * geom.Q, slices, splits, launch)


def forward(ex: Executor, x, weight, bias, geom, algo):
    y = ex.empty((geom.N, geom.K, geom.P, geom.Q), x.dtype)
    if y.size == 0:
        return y
    if algo.name == "gemm_1x1":
        N, K, C = geom.N, geom.K, geom.C
        ex.xp.matmul(weight.reshape(K, C), x.reshape(N, C, -1), out=y.reshape(N, K, -1))
        if bias is not None:
            y += bias.reshape(1, K, 1, 1)
    elif algo.name == "depthwise":
        ex.run(cuda_conv.depthwise_forward_launch(x, weight, bias, y, geom))
    elif algo.name == "winograd":
        cuda_winograd.run(ex, FPROP, x, weight, bias, y, geom, algo.get("m"),
                          algo.get("precision") == "tf32")
    else:
        _implicit_gemm(ex, FPROP, x, weight, bias, y, geom, algo)
    return y


def input_grad(ex: Executor, weight, grad_output, geom, algo):
    gx = ex.empty((geom.N, geom.C, geom.H, geom.W), grad_output.dtype)
    if gx.size == 0:
        return gx
    if algo.name == "gemm_1x1":
        N, K, C = geom.N, geom.K, geom.C
        ex.xp.matmul(weight.reshape(K, C).T, grad_output.reshape(N, K, -1),
                     out=gx.reshape(N, C, -1))
    elif algo.name == "depthwise":
        ex.run(cuda_conv.depthwise_input_grad_launch(weight, grad_output, gx, geom))
    elif algo.name == "winograd":
        cuda_winograd.run(ex, DGRAD, grad_output, weight, None, gx, geom, algo.get("m"),
                          algo.get("precision") == "tf32")
    elif algo.name == "implicit_gemm_phases":
        _phased_input_grad(ex, weight, grad_output, gx, geom, algo)
    else:
        _implicit_gemm(ex, DGRAD, grad_output, weight, None, gx, geom, algo)
    return gx


def _phased_input_grad(ex: Executor, weight, grad_output, gx, geom, algo) -> None:
    """Input gradient of a strided layer, one input phase at a time (see cuda_dgrad): the
    phase image from ``forward`` on grad_output with the phase's sub-kernel, run by the
    phase's forward algorithm (``implicit_gemm``, ``implicit_gemm_tf32`` with its tile and
    reduction slices, or ``gemm_1x1``), then written to ``gx[:, :, ph::sh, pw::sw]``; phases
    that no tap reaches get zeros."""
    sh, sw = geom.stride
    plans = {(ph, pw): rest for ph, pw, *rest in algo.get("phases")}
    for phase in cuda_dgrad.phases(geom):
        ph, pw = phase.index
        view = gx[:, :, ph::sh, pw::sw]
        if phase.geom is None:
            view[...] = 0
            continue
        name, tile, splits = plans[(ph, pw)]
        params = () if tile is None else (("tile", tile), ("splits", splits))
        sub_algo = dataclasses.replace(algo, name=name, params=params, reason="")
        sub_w = cuda_dgrad.sub_weight(ex.xp, weight, phase, geom.groups)
        if (sh, sw) == (1, 1) and name != "gemm_1x1":  # one phase: the whole of gx
            _implicit_gemm(ex, FPROP, grad_output, sub_w, None, gx, phase.geom, sub_algo)
        else:
            view[...] = forward(ex, grad_output, sub_w, None, phase.geom, sub_algo)


def weight_grad(ex: Executor, x, grad_output, geom, algo):
    shape = (geom.K, geom.C // geom.groups, geom.R, geom.S)
    gw = ex.empty(shape, x.dtype)
    if gw.size == 0:
        return gw
    if geom.N * geom.P * geom.Q == 0:  # an empty reduction
        gw[...] = 0
        return gw
    if algo.name == "gemm_1x1":
        N, K, C = geom.N, geom.K, geom.C
        per_image = ex.xp.matmul(grad_output.reshape(N, K, -1), x.reshape(N, C, -1).swapaxes(1, 2))
        ex.xp.sum(per_image, axis=0, out=gw.reshape(K, C))
    elif algo.name == "depthwise":
        ex.run(cuda_conv.depthwise_weight_grad_launch(x, grad_output, gw, geom))
    elif algo.name == "winograd":
        cuda_winograd.run_wgrad(ex, x, grad_output, gw, geom, algo.get("m"),
                                int(algo.get("splits", 1)))
    else:
        _weight_grad_gemm(ex, x, grad_output, gw, geom, algo)
    return gw


def _nhwc_weight_grad(ex: Executor, x, grad_output, gw, geom, tile: Tf32Tile,
                      splits: int) -> None:
    """TF32 weight gradient through ``conv_tf32_nhwc``, one group at a time as the forward
    convolution of ``cuda_conv.wgrad_forward_geometry`` (x copied as ``(C, H, W, Np)`` and
    grad_output as ``(K, P, Q, Np)`` by the pre-pass), in reduction slices over the images
    and output pixels summed in a fixed order, each group's ``(Cg, Kg, R, S)`` result
    transposed into grad_weight."""
    N, C, H, W = x.shape
    K, P, Q = geom.K, geom.P, geom.Q
    cg, kg = C // geom.groups, K // geom.groups
    npad = cuda_conv.padded_channels(N)
    xt = ex.empty((C * H * W * npad,), x.dtype)
    gt = ex.empty((K * P * Q * npad,), x.dtype)
    for spec in (cuda_conv.channels_last_launches(x, xt, C, H * W, 1, N, H * W, C * H * W)
                 + cuda_conv.channels_last_launches(grad_output, gt, K, P * Q, 1, N, P * Q,
                                                    K * P * Q)):
        ex.run(spec)
    sub = cuda_conv.wgrad_forward_geometry(geom)
    slices, _ = cuda_conv.nhwc_slices(sub, splits)
    per_x, per_g = cg * H * W * npad, kg * P * Q * npad
    for g in range(geom.groups):
        work = ex.empty((slices, cg, kg, geom.R, geom.S), gw.dtype)
        ex.run(cuda_conv.nhwc_forward_launch(xt[g * per_x:(g + 1) * per_x],
                                             gt[g * per_g:(g + 1) * per_g], None, work, sub,
                                             tile, slices))
        part = work[0] if slices == 1 else ex.xp.sum(work, axis=0)
        gw[g * kg:(g + 1) * kg] = part.transpose(1, 0, 2, 3)


def _weight_grad_gemm(ex: Executor, x, grad_output, gw, geom, algo) -> None:
    """Implicit GEMM over reduction slices (and batch chunks), partial results summed in a
    fixed order."""
    tile = _tile(algo)
    splits = int(algo.get("splits", 1))
    if isinstance(tile, Tf32Tile) and tile.layout == "nhwc":
        _nhwc_weight_grad(ex, x, grad_output, gw, geom, tile, splits)
        return
    chunks = cuda_conv.batch_chunks(geom.N, cuda_conv.rows_per_image(geom, WGRAD))
    parts = []
    for n0, n1 in chunks:
        part = cuda_conv.with_batch(geom, n1 - n0)
        slices, _ = cuda_conv.split_reduction(part.N * part.P * part.Q, splits, tile.bk)
        parts.append((n0, n1, part, slices))
    total = sum(p[3] for p in parts)
    if total == 1:
        ex.run(cuda_conv.implicit_gemm_launch(WGRAD, grad_output, x, None, gw, geom, tile))
        return
    work = ex.empty((total,) + gw.shape, gw.dtype)
    at = 0
    for n0, n1, part, slices in parts:
        ex.run(cuda_conv.implicit_gemm_launch(WGRAD, grad_output[n0:n1], x[n0:n1], None,
                                              work[at:at + slices], part, tile, splits))
        at += slices
    ex.xp.sum(work, axis=0, out=gw)


def bias_grad(ex: Executor, grad_output, algo):
    N, K = grad_output.shape[:2]
    return grad_output.reshape(N, K, -1).sum(axis=2).sum(axis=0)


def labels_min_max(ex: Executor, labels) -> tuple[int, int]:
    grid = cuda_hinge.label_range_grid(labels.shape[0], ex.sm_count)
    partial = ex.empty((2 * grid[0],), np.int64)
    ex.run(cuda_hinge.label_range_launch(labels, partial, ex.sm_count))
    pairs = (partial.get() if hasattr(partial, "get") else partial).reshape(-1, 2)
    return int(pairs[:, 0].min()), int(pairs[:, 1].max())


def hinge_rows(ex: Executor, scores, labels, margin, p, class_weight, row_scale, want_grad,
               algo):
    N, C = scores.shape
    losses = ex.empty((N,), scores.dtype)
    grad = ex.empty((N, C), scores.dtype) if want_grad else None
    if N > 0:
        group, items = algo.get("group"), algo.get("items")
        ex.run(cuda_hinge.hinge_launch(scores, labels, class_weight, row_scale, losses, grad,
                                       margin, p, group, items, ex.sm_count))
    return losses, grad
