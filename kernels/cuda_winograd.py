"""Launcher of the fused Winograd kernels (``winograd.cu``): 3x3, stride-1, undilated layers.

Plain Python, no CuPy: the functions turn a geometry and the arrays into `Launch` objects
(``cuda_build.launch`` runs them on the GPU, the tests inspect them or run them in the host
emulation), and `run` composes them for one conv op given an executor (``kernels.cuda``'s
``Executor``: array module, launch runner, allocator). ``geom`` is any object with the fields of
``fastconv._types.ConvGeometry``; this module never imports ``fastconv``.

One op is two launches: ``winograd_filter`` transforms the weight into the workspace
``U (groups, A*A, Cig, Cogp)`` (A = m + 2; ``Cig`` reduction channels and ``Cog`` output
channels per group, the latter padded with zero filters to ``Cogp``, a multiple of 4, for
16-byte loads), then ``winograd_conv`` runs the fused input transform, transform-point
GEMMs, inverse transform and bias. The input gradient is the same kernel on ``grad_output``
with the rotated, channel-transposed filter and padding ``2 - pt``, ``2 - pl``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .cuda_build import NULL, Launch
from . import cuda_conv
from .cuda_conv import (DGRAD, FPROP, GRID_YZ_LIMIT, SMEM_LIMIT, WGRAD, batch_chunks,
                        split_reduction, with_batch)

SOURCE = "winograd.cu"
FILTER_THREADS = 256  # block size of winograd_filter
STAGES = 3            # depth of the kernels' cp.async ring (WINO_STAGES in winograd.cu)
TF32_STAGES = 2       # depth of winograd_conv_tf32's ring (WINO_TF32_STAGES)
ITEMSIZE = 4          # float32 only: float64 keeps the direct kernels


@dataclass(frozen=True)
class WinogradTile:
    """Block tile of ``winograd_conv`` and ``winograd_wgrad`` (template parameters
    ``<M, CHUNK, TY, TX, TM, TN>``): each of the ``(m+2)**2`` transform points has ``TY x TX``
    threads of ``TM x TN`` accumulators, so a block computes ``rows x cols`` per point and
    consumes its reduction ``chunk`` steps at a time.

    ``winograd_conv``: rows are output tiles (BT), columns output channels (BK), the chunk
    counts input channels (BC). ``winograd_wgrad``: rows are input channels (BC), columns
    filters (BK), the chunk counts tiles (BR).
    """

    m: int
    chunk: int
    ty: int
    tx: int
    tm: int
    tn: int

    @property
    def alpha(self) -> int:
        """Side ``A = m + 2`` of an input patch (and of the transform-point grid)."""
        return self.m + 2

    @property
    def threads(self) -> int:
        return self.alpha ** 2 * self.ty * self.tx

    @property
    def rows(self) -> int:
        return self.ty * self.tm

    @property
    def cols(self) -> int:
        return self.tx * self.tn

    @property
    def smem_bytes(self) -> int:
        """Static shared memory of either kernel: `STAGES` ring stages of the chunk's two
        operand tiles, or the epilogue's staging of 4*TX columns, whichever is larger."""
        aa = self.alpha ** 2
        return ITEMSIZE * max(STAGES * aa * self.chunk * (self.rows + self.cols),
                              aa * 4 * self.tx * self.rows)


@dataclass(frozen=True)
class WinogradTf32Tile:
    """Block tile of ``winograd_conv_tf32`` (template parameters ``<M, BT, BK, WARPS>``):
    ``rows`` (BT) output tiles by ``cols`` (BK) output channels per transform point, the
    points shared out among ``warps`` warps, chunks of 8 input channels (one mma k-step)."""

    m: int
    rows: int
    cols: int
    warps: int
    chunk: int = 8

    @property
    def alpha(self) -> int:
        return self.m + 2

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        """`TF32_STAGES` ring stages of the padded operand tiles (rows of BT + 8 and BK + 8
        floats), or the epilogue's staging of the whole block, whichever is larger."""
        aa = self.alpha ** 2
        return ITEMSIZE * max(TF32_STAGES * aa * self.chunk * (self.rows + self.cols + 16),
                              aa * self.rows * self.cols)


# The instantiations the launcher may request (tests/test_nvrtc.py compiles all of them).
# The chunks are as long as three ring stages allow within 48 KiB of static shared memory:
# 4 channels (tiles) for F(2x2), 48 KiB; 2 for F(4x4), 40.5 KiB (its epilogue needs 36 KiB).
# Registers and spills: tests/test_cuda_winograd.py::test_no_spills and bench/sass_report.py.
TILES: dict[int, WinogradTile] = {2: WinogradTile(2, 4, 4, 4, 8, 8),
                                  4: WinogradTile(4, 2, 2, 4, 8, 8)}
TILE_SIZES = tuple(TILES)
WGRAD_TILES: dict[int, WinogradTile] = {2: WinogradTile(2, 4, 4, 4, 8, 8),
                                        4: WinogradTile(4, 2, 2, 4, 8, 8)}
# TF32 (forward and input gradient): F(2x2) only. Two ring stages of 8-channel chunks of a
# 16 x 16 block tile take 48 KiB; F(4x4)'s 36 points would need 72 KiB, beyond static shared
# memory (and its TF32 error, 2.3e-3 to 3.4e-3 in bench/winograd_error.py's model, is 5 to 7
# times F(2x2)'s).
TF32_TILES: dict[int, WinogradTf32Tile] = {2: WinogradTf32Tile(2, 16, 16, 4)}
# Documented relative error bound (||out - ref|| / ||ref||, float32 against the float64
# reference) per output tile size, checked by tests/test_cuda_winograd.py in the host emulation.
# F(4x4) keeps it for reductions of up to 1024 channels (the dispatch rules' limit; measured
# figures in winograd.cu's header).
ERROR_BOUND: dict[int, float] = {2: 1e-5, 4: 1e-5}
# The same for the TF32 variant (operands rounded to 10-bit mantissas): F(2x2) measured 3.3e-4
# to 5.1e-4 in the host emulation on the shared case list, MULTI and 256/512-channel sums
# (direct TF32: about 3e-4); the bound leaves 4x margin and stays under 5e-3.
TF32_ERROR_BOUND: dict[int, float] = {2: 2e-3}


def conv_kernel_name(tile: WinogradTile | WinogradTf32Tile) -> str:
    """Name expression of a ``winograd_conv`` (or ``winograd_conv_tf32``) instantiation."""
    t = tile
    if isinstance(t, WinogradTf32Tile):
        return f"fc::winograd_conv_tf32<{t.m}, {t.rows}, {t.cols}, {t.warps}>"
    return f"fc::winograd_conv<{t.m}, {t.chunk}, {t.ty}, {t.tx}, {t.tm}, {t.tn}>"


def wgrad_kernel_name(tile: WinogradTile) -> str:
    """Name expression of a ``winograd_wgrad`` instantiation."""
    t = tile
    return f"fc::winograd_wgrad<{t.m}, {t.chunk}, {t.ty}, {t.tx}, {t.tm}, {t.tn}>"


def filter_kernel_name(m: int, mode: int, tf32: bool = False) -> str:
    """Name expression of the ``winograd_filter`` instantiation for F(m x m), a mode, and
    whether it rounds U to TF32 (for ``winograd_conv_tf32``)."""
    return f"fc::winograd_filter<{m}, {mode}, {int(tf32)}>"


def all_kernel_names() -> dict[str, list[str]]:
    """Every instantiation this launcher can request, per source file."""
    names = [conv_kernel_name(t) for t in TILES.values()]
    names += [filter_kernel_name(m, mode) for m in TILES for mode in (FPROP, DGRAD)]
    names += [conv_kernel_name(t) for t in TF32_TILES.values()]
    names += [filter_kernel_name(m, mode, True) for m in TF32_TILES for mode in (FPROP, DGRAD)]
    names += [wgrad_kernel_name(t) for t in WGRAD_TILES.values()]
    return {SOURCE: names}


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def applies(geom: Any) -> bool:
    """3x3, stride 1, undilated: the layers these kernels compute (any padding, any groups)."""
    return (geom.R == 3 and geom.S == 3 and tuple(geom.stride) == (1, 1)
            and tuple(geom.dilation) == (1, 1))


@dataclass(frozen=True)
class Plane:
    """What ``winograd_conv`` sees for one op: ``in (N, ci, hi, wi)`` -> ``out (N, co, ho,
    wo)`` with ``out[y, x] = sum in[y - ph + r, x - pw + s] * f[r, s]``."""

    ci: int
    hi: int
    wi: int
    co: int
    ho: int
    wo: int
    ph: int
    pw: int


def plane(geom: Any, mode: int) -> Plane:
    """The kernel's view of ``geom`` for FPROP (x -> y) or DGRAD (grad_output -> grad_input);
    WGRAD tiles the output plane as FPROP does."""
    pt, _, pl, _ = geom.padding
    if mode in (FPROP, WGRAD):
        return Plane(geom.C, geom.H, geom.W, geom.K, geom.P, geom.Q, pt, pl)
    if mode == DGRAD:
        return Plane(geom.K, geom.P, geom.Q, geom.C, geom.H, geom.W, 2 - pt, 2 - pl)
    raise ValueError(f"Winograd computes FPROP ({FPROP}), DGRAD ({DGRAD}) and WGRAD ({WGRAD}), "
                     f"not mode {mode!r}")


def tile_grid(ho: int, wo: int, m: int) -> tuple[int, int]:
    """Tile rows and columns covering an ``ho x wo`` output with ``m x m`` tiles."""
    return -(-ho // m), -(-wo // m)


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


def u_shape(geom: Any, mode: int, m: int) -> tuple[int, int, int, int]:
    """Shape ``(groups, (m+2)**2, Cig, Cogp)`` of the transformed filter of a mode."""
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    cig, cog = (cg, kg) if mode == FPROP else (kg, cg)
    return geom.groups, (m + 2) ** 2, cig, _pad4(cog)


def workspace_bytes(geom: Any, mode: int, m: int) -> int:
    """Bytes of the transformed filter ``U`` (`u_shape`)."""
    return int(np.prod(u_shape(geom, mode, m))) * ITEMSIZE


def multiply_ratio(geom: Any, mode: int, m: int) -> float:
    """Direct multiplies over Winograd multiplies for this op: ``9 * ho * wo`` over
    ``(m+2)**2`` per tile, tiles rounded up (partial tiles cost as much as full ones)."""
    p = plane(geom, mode)
    th, tw = tile_grid(p.ho, p.wo, m)
    return 9.0 * p.ho * p.wo / ((m + 2) ** 2 * th * tw)


def fits(geom: Any, mode: int, tile: WinogradTile | WinogradTf32Tile) -> bool:
    """Whether one launch of ``tile`` can take this geometry (grid limits, 32-bit counts)."""
    p = plane(geom, mode)
    th, tw = tile_grid(p.ho, p.wo, tile.m)
    return (geom.groups <= GRID_YZ_LIMIT
            and -(-(p.co // geom.groups) // tile.cols) <= GRID_YZ_LIMIT
            and 0 < th * tw <= cuda_conv.ROW_LIMIT
            and int(np.prod(u_shape(geom, mode, tile.m))) < 2**31
            and max(p.ci, p.co, p.hi, p.wi, p.ho, p.wo) < 2**31
            and tile.smem_bytes <= SMEM_LIMIT)


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------
def filter_launch(weight: Any, u: Any, geom: Any, m: int, mode: int,
                  tf32: bool = False) -> Launch:
    """``winograd_filter``: ``weight (K, C/groups, 3, 3)`` -> ``u`` of shape `u_shape`
    (rounded to TF32 with ``tf32``)."""
    groups, _, cig, cogp = u_shape(geom, mode, m)
    grid = (max(1, -(-(cig * cogp) // FILTER_THREADS)), groups, 1)
    if groups > GRID_YZ_LIMIT:
        raise ValueError(f"grid {grid} exceeds CUDA's limit of {GRID_YZ_LIMIT} in y and z")
    mul, shift = cuda_conv.fast_divisor(cogp)
    args = (weight, u, np.int32(geom.K), np.int32(geom.C // geom.groups),
            np.int32(geom.groups), np.uint32(mul), np.int32(shift))
    return Launch(SOURCE, filter_kernel_name(m, mode, tf32), grid, (FILTER_THREADS, 1, 1), 0,
                  args)


def conv_launch(mode: int, src: Any, u: Any, bias: Any, out: Any, geom: Any,
                tile: WinogradTile | WinogradTf32Tile) -> Launch:
    """``winograd_conv`` for one batch (``geom.N`` images).

    Parameters
    ----------
    mode : FPROP or DGRAD
    src : array
        FPROP: ``x (N, C, H, W)``; DGRAD: ``grad_output (N, K, P, Q)``.
    u : array
        The transformed filter of `filter_launch` for the same mode.
    bias : array (K,) or None
        FPROP only.
    out : array
        FPROP: ``y (N, K, P, Q)``; DGRAD: ``grad_input (N, C, H, W)``.
    geom : ConvGeometry
    tile : WinogradTile or WinogradTf32Tile
        The strict FP32 kernel or the TF32 one (whose ``u`` must be TF32-rounded).

    Returns
    -------
    Launch
    """
    p = plane(geom, mode)
    th, tw = tile_grid(p.ho, p.wo, tile.m)
    tiles = geom.N * th * tw
    if tiles > cuda_conv.ROW_LIMIT:
        raise ValueError(f"{tiles} Winograd tiles in one launch: split the batch first")
    grid = (-(-tiles // tile.rows), -(-(p.co // geom.groups) // tile.cols), geom.groups)
    if grid[1] > GRID_YZ_LIMIT or grid[2] > GRID_YZ_LIMIT:
        raise ValueError(f"grid {grid} exceeds CUDA's limit of {GRID_YZ_LIMIT} in y and z")
    scalars = tuple(np.int32(v) for v in (geom.N, p.ci, p.hi, p.wi, p.co, p.ho, p.wo, p.ph,
                                          p.pw, geom.groups))
    args = (src, u, NULL if bias is None else bias, out) + scalars
    return Launch(SOURCE, conv_kernel_name(tile), grid, (tile.threads, 1, 1), 0, args)


def run(ex: Any, mode: int, src: Any, weight: Any, bias: Any, out: Any, geom: Any,
        m: int, tf32: bool = False) -> None:
    """One Winograd op: the filter transform into a workspace, then the fused kernel over
    batch chunks that keep tile indices 32-bit.

    Parameters
    ----------
    ex : Executor
        ``run(launch)`` and ``empty(shape, dtype)`` of ``fastconv.kernels.cuda``.
    mode : FPROP or DGRAD
    src, weight, bias, out : arrays
        As in `conv_launch`; ``weight (K, C/groups, 3, 3)``.
    geom : ConvGeometry
    m : 2 or 4
        Output tile side of F(m x m, 3 x 3).
    tf32 : bool
        The TF32 tensor-core kernel (`TF32_TILES`: m = 2) instead of strict FP32.
    """
    tile = TF32_TILES[m] if tf32 else TILES[m]
    u = ex.empty(u_shape(geom, mode, m), weight.dtype)
    ex.run(filter_launch(weight, u, geom, m, mode, tf32))
    p = plane(geom, mode)
    th, tw = tile_grid(p.ho, p.wo, m)
    for n0, n1 in batch_chunks(geom.N, th * tw):
        part = with_batch(geom, n1 - n0)
        ex.run(conv_launch(mode, src[n0:n1], u, bias, out[n0:n1], part, tile))


# ---------------------------------------------------------------------------------------------
# Weight gradient
# ---------------------------------------------------------------------------------------------
def tiles_per_image(geom: Any, m: int) -> int:
    """Output tiles of one image: the weight gradient's reduction is over ``N`` times this."""
    th, tw = tile_grid(geom.P, geom.Q, m)
    return th * tw


def wgrad_fits(geom: Any, tile: WinogradTile) -> bool:
    """Whether ``winograd_wgrad`` can take this geometry (grid limits, 32-bit counts)."""
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    return (-(-kg // tile.cols) <= GRID_YZ_LIMIT and geom.groups <= GRID_YZ_LIMIT
            and 0 < tiles_per_image(geom, tile.m) <= cuda_conv.ROW_LIMIT
            and max(geom.C, geom.K, geom.H, geom.W, geom.P, geom.Q) < 2**31
            and cg * geom.K * 9 < 2**31 and tile.smem_bytes <= SMEM_LIMIT)


def wgrad_launch(x: Any, grad_output: Any, out: Any, geom: Any, tile: WinogradTile,
                 splits: int = 1) -> Launch:
    """``winograd_wgrad`` for one batch: the ``N * tiles_per_image`` tile reduction cut into
    at most ``splits`` slices of whole ``chunk``-tile steps (`split_reduction`).

    Parameters
    ----------
    x : array (N, C, H, W)
    grad_output : array (N, K, P, Q)
    out : array
        ``grad_weight (K, C/groups, 3, 3)`` for one slice, else a workspace of ``slices`` of
        them (the caller sums them).
    geom : ConvGeometry
    tile : WinogradTile
    splits : int

    Returns
    -------
    Launch
    """
    tiles = geom.N * tiles_per_image(geom, tile.m)
    if tiles > cuda_conv.ROW_LIMIT:
        raise ValueError(f"{tiles} Winograd tiles in one launch: split the batch first")
    slices, t_split = split_reduction(tiles, splits, tile.chunk)
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    grid = (-(-cg // tile.rows), -(-kg // tile.cols), geom.groups * slices)
    if grid[1] > GRID_YZ_LIMIT or grid[2] > GRID_YZ_LIMIT:
        raise ValueError(f"grid {grid} exceeds CUDA's limit of {GRID_YZ_LIMIT} in y and z")
    pt, _, pl, _ = geom.padding
    scalars = tuple(np.int32(v) for v in (geom.N, geom.C, geom.H, geom.W, geom.K, geom.P,
                                          geom.Q, pt, pl, geom.groups, t_split))
    th, tw = tile_grid(geom.P, geom.Q, tile.m)
    divisors = ()
    for d in (th * tw, tw):  # the tile index -> (image, tile row, tile column) FastDivs
        mul, shift = cuda_conv.fast_divisor(d)
        divisors += (np.uint32(mul), np.int32(shift))
    return Launch(SOURCE, wgrad_kernel_name(tile), grid, (tile.threads, 1, 1), 0,
                  (x, grad_output, out) + scalars + divisors)


def run_wgrad(ex: Any, x: Any, grad_output: Any, grad_weight: Any, geom: Any, m: int,
              splits: int) -> None:
    """The Winograd weight gradient: slices (and batch chunks) of the tile reduction, their
    partial results summed in a fixed order."""
    tile = WGRAD_TILES[m]
    parts = []
    for n0, n1 in batch_chunks(geom.N, tiles_per_image(geom, m)):
        part = with_batch(geom, n1 - n0)
        slices, _ = split_reduction(part.N * tiles_per_image(geom, m), splits, tile.chunk)
        parts.append((n0, n1, part, slices))
    total = sum(p[3] for p in parts)
    if total == 1:
        ex.run(wgrad_launch(x, grad_output, grad_weight, geom, tile))
        return
    work = ex.empty((total,) + tuple(grad_weight.shape), grad_weight.dtype)
    at = 0
    for n0, n1, part, slices in parts:
        ex.run(wgrad_launch(x[n0:n1], grad_output[n0:n1], work[at:at + slices], part, tile,
                            splits))
        at += slices
    ex.xp.sum(work, axis=0, out=grad_weight)
