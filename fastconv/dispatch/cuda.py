"""Algorithm rules of the ``cuda`` backend: which kernel, which tile, which precision, and why.

Conv ops (``forward``, ``input_grad``, ``weight_grad``), in order:
1. Depthwise (``groups == C``) when its input window fits 48 KiB of shared memory:
   ``depthwise`` (direct kernels; exact FP32/FP64 whatever the precision setting).
2. 1x1, stride 1, no padding, one group, strict precision: ``gemm_1x1``, a batched GEMM through
   cuBLAS (``cupy.matmul``), strict FP32 as long as CuPy's own ``CUPY_TF32`` switch is off.
3. 3x3, stride 1, undilated, float32, at least `WINOGRAD_MIN_CHANNELS` channels in and out
   per group: ``winograd``, the fused F(4x4, 3x3) or F(2x2, 3x3) of winograd.cu
   (`winograd_rule`) for all three conv ops in strict FP32; with ``precision="tf32"`` on an
   sm_80+ device, F(2x2, 3x3) on TF32 tensor cores for the forward pass and the input
   gradient (error bound ``cuda_winograd.TF32_ERROR_BOUND``); when it saves at least
   `WINOGRAD_MIN_RATIO` of the multiplies on this plane, no transform point sums more than
   `WINOGRAD_MAX_SUM` terms (the float32 error bound), and its workspace (transformed filter;
   weight-gradient slices) fits the bound.
4. The input gradient of a strided layer (stride != 1): ``implicit_gemm_phases``, split by
   the stride**2 input phases, each a dense stride-1 forward conv of grad_output with its
   sub-kernel (``kernels/cuda_dgrad.py``) through the forward implicit GEMM (``gemm_1x1`` for
   a plain 1x1 phase under rule 2's conditions), when a time model (`phased_dgrad_rule`) says
   it beats the direct kernel, whose FMAs mostly meet the zeros of the stride-dilated
   grad_output, and its workspace fits the bound. With TF32, every input gradient (stride 1:
   one phase) takes this route whenever its workspace fits, so that it runs through the
   channels-last forward kernel ``conv_tf32_nhwc``.
5. With ``precision="tf32"`` the forward's 128-wide tiles, the input gradient's phases (rule
   4) and the weight gradient (`nhwc_wgrad_rule`: a forward convolution with roles swapped)
   run ``conv_tf32_nhwc`` over channels-last copies rounded to TF32 by a pre-pass, whose
   buffers count in the workspace; the 64-wide ``conv_tf32`` tiles remain where the pre-pass
   does not fit.
6. Otherwise the implicit GEMM of conv2d.cu: ``implicit_gemm`` (strict FP32 or FP64 FMAs) or,
   with ``precision="tf32"`` on float32 and an sm_80+ device, ``implicit_gemm_tf32`` (tensor
   cores, about 1e-3 relative error; never chosen silently). The block tile minimises a simple
   time model with wave quantisation (see `pick_tile`, `wave_units`); the weight gradient also
   splits its long N*P*Q reduction into slices so that about two blocks per multiprocessor
   run, and a forward or input-gradient GEMM with too few tiles for the device splits its
   reduction too (`gemm_splits`), within the workspace bound.
``bias_grad`` is a fixed-order reduction; ``hinge`` picks the row layout of hinge.cu.

Without a GPU (``explain`` on a machine without CuPy) the rules assume a 132-SM, sm_90 device.
"""
from __future__ import annotations

import dataclasses
import math
import os
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from .._types import Algo, ConvGeometry
from ..kernels import cuda_build, cuda_conv, cuda_dgrad, cuda_hinge, cuda_winograd
from ..kernels.cuda_conv import DGRAD, FPROP, MODE_OF_OP, WGRAD, SimtTile, Tf32Tile

ASSUMED_SM_COUNT = 132          # H100/H200 SXM, when no device can be asked
ASSUMED_CAPABILITY = (9, 0)
MIN_SLICE_TILES = 16            # a reduction slice covers at least this many BK steps
BLOCKS_PER_SM_TARGET = 2        # weight-gradient slices aim at this many blocks per SM


def choose(op: str, geom: Optional[ConvGeometry], dtype: np.dtype, *, precision: str,
           workspace_bytes: int, scores_shape: Optional[tuple[int, int]] = None) -> Algo:
    """The cuda backend's algorithm for ``op`` (see the module docstring).

    The answer depends only on the arguments, the current device's SM count and compute
    capability, and CuPy's ``CUPY_TF32`` switch; it is memoised on all of them, so repeated
    calls cost a dictionary lookup.
    """
    device = cuda_build.device_info_or_none()
    sm_count = device.sm_count if device else ASSUMED_SM_COUNT
    capability = device.capability if device else ASSUMED_CAPABILITY
    cupy_tf32 = os.environ.get("CUPY_TF32", "0") == "1"
    return _choose(op, geom, np.dtype(dtype), precision, workspace_bytes,
                   None if scores_shape is None else tuple(scores_shape), sm_count,
                   tuple(capability), cupy_tf32)


@lru_cache(maxsize=4096)
def _choose(op: str, geom: Optional[ConvGeometry], dtype: np.dtype, precision: str,
            workspace_bytes: int, scores_shape: Optional[tuple[int, int]], sm_count: int,
            capability: tuple[int, int], cupy_tf32: bool) -> Algo:
    if op == "hinge":
        return _hinge(scores_shape, dtype)
    if op == "bias_grad":
        return Algo("reduce", (("precision", _exact(dtype)),),
                    "grad_output summed over P*Q, then over N, by CuPy reductions in a fixed "
                    "order (no atomics)")
    if op not in MODE_OF_OP:
        raise ValueError(f"unknown op {op!r}")
    tf32, prec_why = _precision(precision, dtype, capability)

    if cuda_conv.depthwise_fits(geom, dtype):
        names = cuda_conv.depthwise_kernel_names(dtype)
        tile = cuda_conv.DEPTHWISE_TILES[dtype.name]
        return Algo("depthwise", (("kernel", names[op]),
                                  ("tile", dataclasses.astuple(tile)),
                                  ("precision", _exact(dtype))),
                    "depthwise conv (groups == C): direct kernels of depthwise.cu in "
                    f"{_exact(dtype)} FMAs, " + (
                        "a two-stage cp.async ring of each thread's pixels in static shared "
                        "memory" if op == "weight_grad" else
                        "a two-stage cp.async ring of windows in at most "
                        f"{cuda_conv.depthwise_smem_bytes(geom, dtype, op)} B of dynamic "
                        f"shared memory (<= {cuda_conv.SMEM_LIMIT})")
                    + ("; TF32 does not apply" if tf32 else ""))
    if _plain_1x1(geom) and not tf32 and not cupy_tf32:
        return Algo("gemm_1x1", (("kernel", "cupy.matmul"), ("precision", _exact(dtype))),
                    "1x1, stride 1, no padding, one group: a batched GEMM through cuBLAS "
                    f"(strict {_exact(dtype)})")

    winograd = winograd_rule(op, geom, dtype, tf32, prec_why, workspace_bytes, sm_count)
    if winograd is not None:
        return winograd
    phased, phase_note = None, ""
    if op == "input_grad" and (tuple(geom.stride) != (1, 1) or tf32):
        phased, phase_note = phased_dgrad_rule(geom, dtype, tf32, prec_why, workspace_bytes,
                                               sm_count, cupy_tf32)
        if phased is not None:
            return phased

    mode = MODE_OF_OP[op]
    if tf32 and mode == WGRAD:
        nhwc_wgrad, phase_note = nhwc_wgrad_rule(geom, prec_why, workspace_bytes, sm_count)
        if nhwc_wgrad is not None:
            return nhwc_wgrad
    M, NG, KG = cuda_conv.gemm_shape(geom, mode)
    tiles, nhwc_note = _tf32_or_simt_tiles(geom, dtype, mode, tf32, workspace_bytes)
    if mode == WGRAD:
        tile = pick_tile(M, NG, geom.groups, tiles, sm_count=None)
    else:
        tile = pick_tile(M, NG, geom.groups, tiles, sm_count, mode)
    nhwc = isinstance(tile, Tf32Tile) and tile.layout == "nhwc"
    pre_bytes = cuda_conv.nhwc_workspace_bytes(geom) if nhwc else 0
    vector_a = not tf32 and cuda_conv.vector_a_shape_ok(mode, dtype, geom, tile)
    name = (cuda_conv.tf32_kernel_name(mode, tile) if tf32
            else cuda_conv.simt_kernel_name(dtype, mode, tile, vector_a))
    params = [("kernel", name), ("tile", dataclasses.astuple(tile)),
              ("precision", "tf32" if tf32 else _exact(dtype))]
    blocks = math.ceil(M / tile.bm) * math.ceil(NG / tile.bn) * geom.groups
    why = (f"implicit GEMM (M={M}, N={NG}, reduction={KG}, {geom.groups} group(s)), "
           f"{tile.bm}x{tile.bn} block tile, {blocks} blocks; {prec_why}")
    if vector_a:
        why += ("; pixels copied in 16-byte vectors (the general gather if the operand is "
                "not 16-byte aligned)")
    if nhwc:
        why += (f"; x and the weight copied channels-last and rounded to TF32 once by a "
                f"pre-pass ({pre_bytes} bytes of workspace), then 16-byte cp.async copies and "
                "ldmatrix fragments (conv_tf32_nhwc)")
    why += nhwc_note
    result_bytes = dtype.itemsize * (
        geom.K * (geom.C // geom.groups) * geom.R * geom.S if mode == WGRAD
        else geom.N * geom.K * geom.P * geom.Q if op == "forward"
        else geom.N * geom.C * geom.H * geom.W)
    if mode == WGRAD:
        splits = wgrad_splits(geom, tile, blocks, sm_count, workspace_bytes, dtype.itemsize)
    else:
        splits = gemm_splits(blocks, KG, tile, sm_count, geom.groups, result_bytes,
                             workspace_bytes - pre_bytes, cuda_conv.resident_blocks(tile, mode))
    if nhwc:
        slices, _ = cuda_conv.nhwc_slices(geom, splits)
    else:
        slices, _ = cuda_conv.split_reduction(KG, splits, tile.bk)
    params += [("splits", slices),
               ("workspace_bytes", pre_bytes + (0 if slices == 1 else slices * result_bytes))]
    if slices > 1:
        why += f"; the reduction cut into {slices} slices summed in a fixed order"
    why += phase_note
    name_algo = "implicit_gemm_tf32" if tf32 else "implicit_gemm"
    return Algo(name_algo, tuple(params), why)


def _tf32_or_simt_tiles(geom: ConvGeometry, dtype: np.dtype, mode: int, tf32: bool,
                        workspace_bytes: int) -> tuple[tuple, str]:
    """``(tiles, note)``: the tiles `pick_tile` chooses from. TF32: ``cuda_conv.tf32_tiles``
    (for the forward the channels-last ``conv_tf32_nhwc`` tiles first), without the
    channels-last ones when their pre-pass buffers (``cuda_conv.nhwc_workspace_bytes``) do not
    fit ``workspace_bytes`` (``note`` then says so); else the mode's SIMT tiles."""
    if not tf32:
        return cuda_conv.simt_tiles(dtype, mode), ""
    tiles = cuda_conv.tf32_tiles(mode)
    if mode == FPROP and cuda_conv.nhwc_workspace_bytes(geom) > workspace_bytes:
        return (tuple(t for t in tiles if t.layout != "nhwc"),
                f"; the channels-last TF32 kernel's pre-pass needs "
                f"{cuda_conv.nhwc_workspace_bytes(geom)} bytes of workspace, over the bound")
    return tiles, ""


def nhwc_wgrad_rule(geom: ConvGeometry, prec_why: str, workspace_bytes: int,
                    sm_count: int) -> tuple[Optional[Algo], str]:
    """``(implicit_gemm_tf32 with a conv_tf32_nhwc tile, "")`` for a TF32 weight gradient, or
    ``(None, note)`` when its workspace does not fit the bound or the forward geometry
    (``cuda_conv.wgrad_forward_geometry``: batch Cg, N input channels, Kg filters of P x Q
    taps, output R x S) exceeds the kernel's 32-bit limits.

    Tile by `pick_tile` on that forward's ``Cg*R*S x Kg`` GEMM without the wave term; its long
    ``P*Q*Np/4``-chunk reduction cut into slices (`wgrad_splits`) summed in a fixed order.
    Workspace: the pre-pass buffers (``cuda_conv.nhwc_wgrad_workspace_bytes``), one group's
    slices and, with slices, their sum.
    """
    sub = cuda_conv.wgrad_forward_geometry(geom)
    if not cuda_conv.nhwc_fits(sub):
        return None, "; the channels-last TF32 weight gradient exceeds its 32-bit index limits"
    pre = cuda_conv.nhwc_wgrad_workspace_bytes(geom)
    group_bytes = 4 * sub.N * sub.K * sub.P * sub.Q  # one group's (Cg, Kg, R, S) result
    M, NG = sub.N * sub.P * sub.Q, sub.K
    tile = pick_tile(M, NG, geom.groups, cuda_conv.TF32_NHWC_TILES, sm_count=None)
    blocks = math.ceil(M / tile.bm) * math.ceil(NG / tile.bn) * geom.groups
    splits = wgrad_splits(geom, tile, blocks, sm_count, max(0, workspace_bytes - pre), 4)
    slices, _ = cuda_conv.nhwc_slices(sub, splits)
    ws = pre + slices * group_bytes + (group_bytes if slices > 1 else 0)
    if ws > workspace_bytes:
        return None, (f"; the channels-last TF32 weight gradient needs {ws} bytes of "
                      "workspace, over the bound")
    why = (f"weight gradient as a forward convolution with roles swapped per group (batch "
           f"Cg={sub.N}, {geom.N} images as input channels, Kg={sub.K} filters of "
           f"{sub.R}x{sub.S} grad_output taps, output {sub.P}x{sub.Q}): GEMM M={M}, N={NG}, "
           f"{tile.bm}x{tile.bn} block tile, {blocks} blocks, the reduction over images and "
           f"output pixels cut into {slices} slice(s) summed in a fixed order; x and "
           f"grad_output copied channels-last and rounded to TF32 once by a pre-pass "
           f"({pre} bytes of workspace), then conv_tf32_nhwc; {prec_why}")
    params = (("kernel", cuda_conv.tf32_kernel_name(FPROP, tile)),
              ("tile", dataclasses.astuple(tile)), ("precision", "tf32"), ("splits", slices),
              ("workspace_bytes", ws))
    return Algo("implicit_gemm_tf32", params, why), ""


def _exact(dtype: np.dtype) -> str:
    return "fp64" if dtype == np.float64 else "fp32"


def _precision(precision: str, dtype: np.dtype, capability: tuple[int, int]) -> tuple[bool, str]:
    """``(use_tf32, reason)``: TF32 only when asked for, on float32, on an sm_80+ device."""
    if precision != "tf32":
        return False, f"strict {_exact(dtype)} (precision={precision!r})"
    if dtype != np.float32:
        return False, "precision='tf32' asked, but float64 always computes in float64"
    if tuple(capability) < (8, 0):
        return False, (f"precision='tf32' asked, but this GPU (sm_{capability[0]}"
                       f"{capability[1]}) has no TF32 tensor cores: strict fp32")
    return True, "TF32 tensor cores (precision='tf32', opt-in), fp32 accumulation"


def _plain_1x1(geom: ConvGeometry) -> bool:
    return (geom.R == 1 and geom.S == 1 and tuple(geom.stride) == (1, 1)
            and not any(geom.padding) and geom.groups == 1)


# Channels per group (in and out) from which Winograd's GEMMs outweigh its transforms: the
# input transform of a (tile, channel) patch is redone for every 32 output channels and the
# inverse transform of a (tile, channel) for every input-channel sum. A guess, not measured.
WINOGRAD_MIN_CHANNELS = 32
# Direct multiplies over Winograd multiplies (partial tiles counted whole) below which the
# transforms are not worth it (F(4x4) saves 4x on planes that are multiples of 4, 3.06x on
# 7x7 and 14x14; F(2x2) 2.25x at best).
WINOGRAD_MIN_RATIO = 2.0
# The float32 error of Winograd grows with the number of terms summed per transform point
# (input channels for the forward pass, filters for the input gradient, tiles of a slice for
# the weight gradient). A float32 model of the kernel's arithmetic (sequential sums,
# standard-normal data) gives for F(4x4) 3.6e-6 at 256 terms, 6.1e-6 at 1024, 9.8e-6 at 2048,
# 1.6e-5 at 4096; for F(2x2) 5e-7, 1.4e-6 and 1.8e-6 at 4096. These limits keep the 1e-5 bound.
WINOGRAD_MAX_SUM = {4: 1024, 2: 8192}


def winograd_rule(op: str, geom: ConvGeometry, dtype: np.dtype, tf32: bool, prec_why: str,
                  workspace_bytes: int, sm_count: int) -> Optional[Algo]:
    """``winograd`` with the output tile m (4 or 2) that saves the most multiplies on this
    plane (ties to 2, the smaller error) within `WINOGRAD_MAX_SUM`, or None where it does not
    apply or pay (see the module docstring, rule 3). With ``tf32`` only the tile sizes of
    ``cuda_winograd.TF32_TILES`` (F(2x2): F(4x4)+TF32 has 5x the error and no ring that fits)
    and only the forward pass and input gradient (the TF32 weight gradient keeps the
    tensor-core implicit GEMM); float64 keeps the direct kernels."""
    if op not in MODE_OF_OP or dtype != np.float32 or not cuda_winograd.applies(geom):
        return None
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    if min(cg, kg) < WINOGRAD_MIN_CHANNELS:
        return None
    mode = MODE_OF_OP[op]
    if tf32 and mode == WGRAD:
        return None
    conv_tiles = cuda_winograd.TF32_TILES if tf32 else cuda_winograd.TILES
    best = None
    for m in sorted(conv_tiles):  # ties go to the first, F(2x2)
        ratio = cuda_winograd.multiply_ratio(geom, mode, m)
        if best is not None and ratio <= best[1]:
            continue
        if mode == WGRAD:
            splits = winograd_wgrad_splits(geom, m, sm_count, workspace_bytes)
            if splits is None or not cuda_winograd.wgrad_fits(geom, cuda_winograd.WGRAD_TILES[m]):
                continue
            ws = 0 if splits == 1 else splits * geom.K * cg * 9 * dtype.itemsize
        else:
            if (cg if mode == FPROP else kg) > WINOGRAD_MAX_SUM[m]:
                continue
            ws, splits = cuda_winograd.workspace_bytes(geom, mode, m), 1
            if ws > workspace_bytes or not cuda_winograd.fits(geom, mode, conv_tiles[m]):
                continue
        best = (m, ratio, ws, splits)
    if best is None or best[1] < WINOGRAD_MIN_RATIO:
        return None
    m, ratio, ws, splits = best
    bound = (cuda_winograd.TF32_ERROR_BOUND if tf32 else cuda_winograd.ERROR_BOUND)[m]
    head = (f"3x3 stride-1 layer, {cg} -> {kg} channels per group: fused Winograd "
            f"F({m}x{m}, 3x3), {ratio:.2f}x fewer multiplies than direct on this plane; ")
    if tf32:
        tail = (f"transform-point GEMMs on TF32 tensor cores (mma.sync m16n8k8), the "
                f"transformed input and filter rounded to TF32 once when stored; relative "
                f"error bound {bound:g} (host emulation 3e-4 to 5e-4; direct TF32 about 3e-4; "
                f"F(4x4)+TF32 not offered: 2.3e-3 to 3.4e-3); {prec_why}")
    else:
        tail = f"strict fp32 FMAs; relative error bound {bound:g}; {prec_why}"
    if mode == WGRAD:
        tile = cuda_winograd.WGRAD_TILES[m]
        tiles = geom.N * cuda_winograd.tiles_per_image(geom, m)
        params = (("kernel", cuda_winograd.wgrad_kernel_name(tile)), ("m", m),
                  ("tile", dataclasses.astuple(tile)), ("splits", splits),
                  ("precision", "fp32"), ("workspace_bytes", ws), ("error_bound", bound))
        why = (head + f"input patches and output-gradient tiles transformed in shared memory, "
               f"transform-point GEMMs over {tiles} tiles"
               + (f" in {splits} slices summed in a fixed order" if splits > 1 else "")
               + ", filter-gradient transform in the epilogue; " + tail)
        return Algo("winograd", params, why)
    tile = conv_tiles[m]
    params = (("kernel", cuda_winograd.conv_kernel_name(tile)),
              ("filter_kernel", cuda_winograd.filter_kernel_name(m, mode, tf32)), ("m", m),
              ("tile", dataclasses.astuple(tile)), ("precision", "tf32" if tf32 else "fp32"),
              ("workspace_bytes", ws), ("error_bound", bound))
    why = (head + f"filter transformed once per call ({ws} bytes), input tiles transformed in "
           "shared memory, transform-point GEMMs, inverse transform and bias in the "
           "epilogue; " + tail)
    return Algo("winograd", params, why)


def winograd_wgrad_splits(geom: ConvGeometry, m: int, sm_count: int,
                          workspace_bytes: int) -> Optional[int]:
    """Slices of the Winograd weight gradient's tile reduction: enough that about
    `BLOCKS_PER_SM_TARGET` blocks per SM run (each slice at least `MIN_SLICE_TILES` chunks),
    and at least enough that no slice sums more than `WINOGRAD_MAX_SUM` tiles; None when the
    workspace bound or the grid cannot hold those."""
    tile = cuda_winograd.WGRAD_TILES[m]
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    tiles = geom.N * cuda_winograd.tiles_per_image(geom, m)
    blocks = math.ceil(cg / tile.rows) * math.ceil(kg / tile.cols) * geom.groups
    want = math.ceil(BLOCKS_PER_SM_TARGET * sm_count / blocks)
    by_length = max(1, tiles // (MIN_SLICE_TILES * tile.chunk))
    need = math.ceil(tiles / WINOGRAD_MAX_SUM[m])
    splits = max(need, min(want, by_length))
    if splits > 1:
        limit = min(workspace_bytes // (geom.K * cg * 9 * 4),
                    cuda_conv.GRID_YZ_LIMIT // geom.groups)
        if need > limit:
            return None
        splits = min(splits, limit)
    return splits


def tile_efficiency(tile: SimtTile | Tf32Tile) -> float:
    """Relative speed of a block tile when the device is full: its arithmetic intensity
    ``BM*BN / (BM + BN)`` (operand loads per multiply-add) over that of a 128x128 tile."""
    return (tile.bm * tile.bn / (tile.bm + tile.bn)) / 64.0


# Throughput of an SM holding fewer blocks than its tile's resident count (a partial wave), as
# a fraction of a full one: fewer warps hide less latency. A modelling guess, not measured.
PARTIAL_WAVE_EFFICIENCY = 0.7


def wave_units(blocks: int, sm_count: int, resident: int) -> float:
    """Modelled time of ``blocks`` equal blocks, in units of one block's work at a full SM's
    rate, with wave quantisation: the busiest SM gets ``B = ceil(blocks / sm_count)`` blocks,
    run in waves of ``resident``; a last wave of fewer blocks runs at
    `PARTIAL_WAVE_EFFICIENCY`. E.g. 196 blocks of a 2-resident tile on 132 SMs (0.74 of a
    wave of 264): B = 2, one full wave, 2 units; 133 blocks: B = 2 as well."""
    B = math.ceil(blocks / sm_count)
    full, tail = divmod(B, resident)
    return full * resident + (tail / PARTIAL_WAVE_EFFICIENCY if tail else 0.0)


def pick_tile(M: int, NG: int, groups: int, tiles: Sequence[SimtTile | Tf32Tile],
              sm_count: Optional[int], mode: int = 0) -> SimtTile | Tf32Tile:
    """The tile with the least modelled time for an ``M x NG`` GEMM per group.

    Model: every block of a tile costs ``BM*BN / tile_efficiency`` (tiles past the matrix edge
    cost as much as full ones), and blocks run in waves (`wave_units`, with the tile's
    resident blocks per SM, ``cuda_conv.resident_blocks(tile, mode)``). With
    ``sm_count=None`` (the weight gradient, whose reduction slices fill the device) the wave
    term is dropped. Ties go to the earlier (larger) tile.
    """
    def cost(t):
        blocks = math.ceil(M / t.bm) * math.ceil(NG / t.bn) * groups
        if sm_count is None:
            units = blocks
        else:
            units = wave_units(blocks, sm_count, cuda_conv.resident_blocks(t, mode))
        return units * t.bm * t.bn / tile_efficiency(t)

    return min(tiles, key=cost)


def wgrad_splits(geom: ConvGeometry, tile: SimtTile | Tf32Tile, blocks: int, sm_count: int,
                 workspace_bytes: int, itemsize: int) -> int:
    """How many slices the weight-gradient reduction is cut into.

    Enough that about `BLOCKS_PER_SM_TARGET` blocks per SM run, no slice shorter than
    `MIN_SLICE_TILES` BK steps, the partial results within ``workspace_bytes``, and the grid's
    z extent (``groups * slices``) within CUDA's limit.
    """
    reduction = geom.N * geom.P * geom.Q
    want = math.ceil(BLOCKS_PER_SM_TARGET * sm_count / max(blocks, 1))
    by_length = max(1, reduction // (MIN_SLICE_TILES * tile.bk))
    per_slice = geom.K * (geom.C // geom.groups) * geom.R * geom.S * itemsize
    by_workspace = max(1, workspace_bytes // max(per_slice, 1))
    by_grid = max(1, cuda_conv.GRID_YZ_LIMIT // geom.groups)
    splits = max(1, min(want, by_length, by_workspace, by_grid))
    return splits if splits > 1 else 1


MAX_GEMM_SLICES = 8  # forward / input gradient: at most this many reduction slices
# Rough rates of an H100/H200-class device for the slicing model (not measured here): FP32 FMA
# throughput of one resident block (two share an SM) and memory bandwidth.
ASSUMED_BLOCK_FLOPS = 2e11
ASSUMED_BANDWIDTH = 3e12


def gemm_splits(blocks: int, reduction: int, tile: SimtTile | Tf32Tile, sm_count: int,
                groups: int, result_bytes: int, workspace_bytes: int,
                resident: Optional[int] = None) -> int:
    """Reduction slices for a forward or input-gradient GEMM whose tiles do not fill the device.

    With ``resident`` blocks per SM (``cuda_conv.resident_blocks``; default ``512 / threads``,
    the kernels' usual register cap), ``slots`` blocks run at once. Modelled time of s slices:
    ``ceil(blocks * s / slots)`` waves of blocks doing ``1/s`` of a tile's multiply-adds at
    `ASSUMED_BLOCK_FLOPS`, plus writing and reading the s partial results at
    `ASSUMED_BANDWIDTH`. Slices are used only when the model saves at
    least 15%, each keeps `MIN_SLICE_TILES` BK steps, and they fit the workspace bound.
    """
    slots = sm_count * (resident if resident is not None else max(1, 512 // tile.threads))
    if blocks >= slots:
        return 1
    tile_flops = 2.0 * tile.bm * tile.bn * reduction

    def seconds(s: int) -> float:
        waves = math.ceil(blocks * s / slots)
        extra = 2 * s * result_bytes / ASSUMED_BANDWIDTH if s > 1 else 0.0
        return waves * tile_flops / s / ASSUMED_BLOCK_FLOPS + extra

    best, best_time = 1, seconds(1)
    for s in range(2, MAX_GEMM_SLICES + 1):
        if (reduction < s * MIN_SLICE_TILES * tile.bk or s * result_bytes > workspace_bytes
                or groups * s > cuda_conv.GRID_YZ_LIMIT):
            break
        if seconds(s) < best_time:
            best, best_time = s, seconds(s)
    return best if best_time < 0.85 * seconds(1) else 1


# Fixed cost of one extra launch (kernel launch, sub-kernel copy or scatter of a phase) in the
# phase split's time model. A guess, not measured.
ASSUMED_LAUNCH_SECONDS = 4e-6


def gemm_seconds(M: int, NG: int, reduction: int, groups: int, tile: SimtTile | Tf32Tile,
                 splits: int, sm_count: int, resident: int, result_bytes: int) -> float:
    """Modelled time of one implicit-GEMM launch, the model of `gemm_splits`: waves of
    ``resident * sm_count`` blocks, each doing ``2*BM*BN*reduction/splits`` flops at
    `ASSUMED_BLOCK_FLOPS` scaled by `tile_efficiency`, plus writing and reading the partial
    results of ``splits > 1`` slices at `ASSUMED_BANDWIDTH`."""
    slices, k_split = cuda_conv.split_reduction(reduction, splits, tile.bk)
    blocks = math.ceil(M / tile.bm) * math.ceil(NG / tile.bn) * groups * slices
    waves = math.ceil(blocks / (sm_count * resident))
    flops = 2.0 * tile.bm * tile.bn * min(k_split, reduction)
    extra = 2 * slices * result_bytes / ASSUMED_BANDWIDTH if slices > 1 else 0.0
    return waves * flops / (ASSUMED_BLOCK_FLOPS * tile_efficiency(tile)) + extra


def phased_dgrad_rule(geom: ConvGeometry, dtype: np.dtype, tf32: bool, prec_why: str,
                      workspace_bytes: int, sm_count: int,
                      cupy_tf32: bool = False) -> tuple[Optional[Algo], str]:
    """``(implicit_gemm_phases, "")`` for a strided input gradient when the phase split's
    modelled time (`phased_dgrad_plan`) beats the direct DGRAD kernel's and its workspace fits
    the bound, else ``(None, note)`` with the reason for the direct kernel's explanation.

    Direct: the DGRAD implicit GEMM over the full ``K/groups*R*S`` reduction (`pick_tile`,
    `gemm_splits`, `gemm_seconds`), most of whose FMAs meet the zeros of the stride-dilated
    grad_output.
    """
    result_bytes = geom.N * geom.C * geom.H * geom.W * dtype.itemsize
    M, NG, KG = cuda_conv.gemm_shape(geom, DGRAD)
    tiles = cuda_conv.tf32_tiles(DGRAD) if tf32 else cuda_conv.simt_tiles(dtype, DGRAD)
    tile = pick_tile(M, NG, geom.groups, tiles, sm_count, DGRAD)
    resident = cuda_conv.resident_blocks(tile, DGRAD)
    blocks = math.ceil(M / tile.bm) * math.ceil(NG / tile.bn) * geom.groups
    splits = gemm_splits(blocks, KG, tile, sm_count, geom.groups, result_bytes,
                         workspace_bytes, resident)
    direct = gemm_seconds(M, NG, KG, geom.groups, tile, splits, sm_count, resident,
                          result_bytes)
    algo, phased = phased_dgrad_plan(geom, dtype, tf32, workspace_bytes, sm_count, cupy_tf32)
    fraction = algo.get("multiply_fraction")
    model = f"modelled {phased * 1e6:.1f} us against {direct * 1e6:.1f} us direct"
    if tf32:
        model += ("; with TF32 taken whenever it fits: the phases run the channels-last "
                  "forward kernel, the direct TF32 input gradient has only 64-wide tiles")
    if algo.get("workspace_bytes") > workspace_bytes:
        return None, (f"; the phase split ({fraction:.0%} of the multiplies) needs "
                      f"{algo.get('workspace_bytes')} bytes of workspace, over the bound")
    if phased >= direct and not tf32:  # TF32: the phases run the channels-last kernel
        return None, (f"; the phase split ({fraction:.0%} of the multiplies) does not pay "
                      f"here ({model})")
    return dataclasses.replace(algo, reason=f"{algo.reason} ({model}); {prec_why}"), ""


def phased_dgrad_plan(geom: ConvGeometry, dtype: np.dtype, tf32: bool, workspace_bytes: int,
                      sm_count: int, cupy_tf32: bool = False) -> tuple[Algo, float]:
    """``(algo, seconds)``: the ``implicit_gemm_phases`` plan of a strided input gradient
    and its modelled time, whether or not it pays (`phased_dgrad_rule` decides).

    Each phase of ``cuda_dgrad.phases`` that a tap reaches gets the forward implicit GEMM's
    tile (`pick_tile`) and reduction slices (`gemm_splits`) for its own GEMM (``N*Hi*Wi``
    rows, ``C/groups`` columns, ``K/groups*Rj*Sj`` reduction), or, when the sub-problem is a
    plain 1x1 conv in strict precision (rule 2's conditions), ``gemm_1x1`` (cuBLAS). Parameter
    ``phases`` holds ``(ph, pw, algorithm, tile, splits)`` per phase with a tap (``tile`` None
    for ``gemm_1x1``), ``kernels`` the kernels they run. Model: the phase GEMMs
    (`gemm_seconds`; cuBLAS as the implicit GEMM), `ASSUMED_LAUNCH_SECONDS` per extra
    launch (sub-kernel copy, scatter, slice sum, zero fill), grad_input read and written once
    more by the scatters. Workspace: the largest phase image with its sub-kernel and slices.
    """
    size = dtype.itemsize
    name_algo = "implicit_gemm_tf32" if tf32 else "implicit_gemm"
    precision = "tf32" if tf32 else _exact(dtype)
    plans, kernels = [], []
    one_phase = tuple(geom.stride) == (1, 1)
    scatter = 2 * geom.N * geom.C * geom.H * geom.W * size / ASSUMED_BANDWIDTH
    seconds = 0.0 if one_phase else scatter
    workspace = 0
    for phase in cuda_dgrad.phases(geom):
        sub = phase.geom
        if sub is None:
            seconds += ASSUMED_LAUNCH_SECONDS
            continue
        M, NG, KG = cuda_conv.gemm_shape(sub, FPROP)
        image = sub.N * sub.K * sub.P * sub.Q * size
        weight = sub.K * sub.C // sub.groups * sub.R * sub.S * size
        tiles, _ = _tf32_or_simt_tiles(sub, dtype, FPROP, tf32,
                                       max(0, workspace_bytes - image - weight))
        tile = pick_tile(M, NG, sub.groups, tiles, sm_count, FPROP)
        nhwc = isinstance(tile, Tf32Tile) and tile.layout == "nhwc"
        pre = cuda_conv.nhwc_workspace_bytes(sub) if nhwc else 0
        resident = cuda_conv.resident_blocks(tile, FPROP)
        blocks = math.ceil(M / tile.bm) * math.ceil(NG / tile.bn) * sub.groups
        splits = gemm_splits(blocks, KG, tile, sm_count, sub.groups, image,
                             max(0, workspace_bytes - image - weight - pre), resident)
        if nhwc:
            slices, _ = cuda_conv.nhwc_slices(sub, splits)
        else:
            slices, _ = cuda_conv.split_reduction(KG, splits, tile.bk)
        seconds += gemm_seconds(M, NG, KG, sub.groups, tile, slices, sm_count, resident,
                                image)
        if _plain_1x1(sub) and not tf32 and not cupy_tf32:
            # cuBLAS, modelled as no slower than the implicit GEMM's best plan
            workspace = max(workspace, image + weight)
            seconds += 2 * ASSUMED_LAUNCH_SECONDS
            kernels.append("cupy.matmul")
            plans.append((*phase.index, "gemm_1x1", None, 1))
            continue
        ws = pre + (0 if slices == 1 else slices * image)
        # stride 1: the one phase image is grad_input itself, written in place
        workspace = max(workspace, weight + ws + (0 if one_phase else image))
        seconds += ASSUMED_LAUNCH_SECONDS * (3 if slices > 1 else 2)
        kernels.append(cuda_conv.tf32_kernel_name(FPROP, tile) if tf32
                       else cuda_conv.simt_kernel_name(
                           dtype, FPROP, tile,
                           cuda_conv.vector_a_shape_ok(FPROP, dtype, sub, tile)))
        plans.append((*phase.index, name_algo, dataclasses.astuple(tile), slices))
    fraction = cuda_dgrad.multiply_fraction(geom)
    sh, sw = geom.stride
    zeroed = sh * sw - len(plans)
    if (sh, sw) == (1, 1):
        why = ("stride-1 input gradient as one forward convolution of grad_output with the "
               f"rotated, channel-swapped kernel ({', '.join(dict.fromkeys(p[2] for p in plans))}"
               ") copied into grad_input" + (" (no tap reaches it: zeroed)" if zeroed else ""))
        return Algo("implicit_gemm_phases", (("phases", tuple(plans)),
                    ("kernels", tuple(dict.fromkeys(kernels))), ("precision", precision),
                    ("workspace_bytes", workspace), ("multiply_fraction", fraction)),
                    why), seconds
    why = (f"stride {sh}x{sw} input gradient split into its {sh * sw} input phases: "
           f"{len(plans)} dense stride-1 forward convolution(s) of grad_output with the "
           f"phase sub-kernels ({', '.join(dict.fromkeys(p[2] for p in plans))}), scattered "
           "into grad_input"
           + (f", {zeroed} phase(s) no tap reaches zeroed" if zeroed else "")
           + f"; {fraction:.0%} of the direct kernel's multiplies, none on the zeros of the "
           "stride-dilated grad_output")
    params = (("phases", tuple(plans)),
              ("kernels", tuple(dict.fromkeys(kernels))), ("precision", precision),
              ("workspace_bytes", workspace), ("multiply_fraction", fraction))
    return Algo("implicit_gemm_phases", params, why), seconds


def _hinge(scores_shape: Optional[tuple[int, int]], dtype: np.dtype) -> Algo:
    N, C = scores_shape
    group, items = cuda_hinge.row_layout(C)
    kernel = cuda_hinge.kernel_name(dtype, group, items)
    if group == 32:
        layout = f"a warp per row, {items} scores per lane in registers"
    else:
        layout = f"{group} lane(s) per row, {items} scores per lane in registers"
    return Algo("hinge_rows", (("kernel", kernel), ("group", group), ("items", items),
                               ("precision", _exact(dtype))),
                f"fused loss and gradient in one pass over the scores ({N}x{C}): {layout}; "
                "fixed-order shuffle reductions (deterministic)")
