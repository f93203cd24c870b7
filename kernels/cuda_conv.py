"""Launchers of the convolution kernels (``conv2d.cu``, ``depthwise.cu``).

Plain Python, no CuPy: each function turns a geometry, a tile choice and the arrays into a
`Launch` (kernel instantiation, grid, block, shared memory, argument tuple), which
``cuda_build.launch`` runs on the GPU and the tests inspect (or run in a host emulation)
without one. Arrays are passed through untouched, so the same functions serve CuPy arrays on
the GPU and NumPy arrays in tests.

``geom`` is any object with the fields of ``fastconv._types.ConvGeometry`` (``N, C, H, W, K,
R, S, P, Q, stride, padding, dilation, groups``); this module never imports ``fastconv``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .cuda_build import NULL, Launch

FPROP, DGRAD, WGRAD = 0, 1, 2
MODE_OF_OP = {"forward": FPROP, "input_grad": DGRAD, "weight_grad": WGRAD}

# GEMM row and reduction indices are 32-bit in the kernels; the batch is split so that they
# stay below this (the margin covers a tile past the last row).
ROW_LIMIT = 2**31 - 2**16
# Grid y and z extents are limited to this by CUDA.
GRID_YZ_LIMIT = 65535
# Static/dynamic shared memory a block may use without opting in to more.
SMEM_LIMIT = 48 * 1024


@dataclass(frozen=True)
class SimtTile:
    """Block tile of ``conv_simt``: BM x BN outputs, BK reduction steps, TM x TN per thread."""

    bm: int
    bn: int
    bk: int
    tm: int
    tn: int

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)


@dataclass(frozen=True)
class Tf32Tile:
    """Block tile of ``conv_tf32`` (``layout`` "nchw": operands gathered from the NCHW tensors)
    or ``conv_tf32_nhwc`` (``layout`` "nhwc": forward only, over the channels-last TF32 copies
    of the pre-pass): BM x BN outputs, BK reduction steps, a WARPS_M x WARPS_N grid of warps."""

    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    layout: str = "nchw"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


@dataclass(frozen=True)
class DepthwiseTile:
    """Tile of ``depthwise_fprop`` (TP x TQ outputs) and ``depthwise_dgrad`` (TP x TQ
    grad_input elements), RPT rows per thread."""

    tp: int
    tq: int
    rpt: int

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.tq, self.tp // self.rpt, 1)


# The instantiations the launchers may request (tests/test_nvrtc.py compiles all of them).
SIMT_TILES: dict[str, tuple[SimtTile, ...]] = {
    "float32": (SimtTile(128, 128, 8, 8, 8), SimtTile(128, 64, 8, 8, 8),
                SimtTile(128, 32, 8, 8, 4), SimtTile(64, 64, 8, 4, 4),
                SimtTile(64, 32, 8, 4, 4), SimtTile(32, 32, 8, 4, 4)),
    "float64": (SimtTile(64, 64, 8, 4, 4), SimtTile(64, 32, 8, 4, 2),
                SimtTile(32, 32, 8, 2, 2)),
}
# (dtype, mode, tile) combinations never requested (none at present: the 128x128 input
# gradient spilled while its stride checks divided per element; see PixelGather in conv2d.cu).
SIMT_EXCLUDED: frozenset = frozenset()
# conv_tf32 keeps a cp.async ring of tf32_stages(tile) stages in at most 48 KiB of static shared
# memory: BK = 8 with four stages for these 64-wide tiles. Every loader's column step
# (threads / BK) is a multiple of 16 (fragment order). They are the fallbacks of the TF32 path:
# its 128-wide tiles are conv_tf32_nhwc's (TF32_NHWC_TILES) for all three ops (the input
# gradient as forward convolutions of grad_output, the weight gradient as a forward convolution
# with roles swapped), whose pre-pass workspace the rules may not have.
TF32_TILES: tuple[Tf32Tile, ...] = (Tf32Tile(64, 64, 8, 2, 2), Tf32Tile(64, 32, 8, 2, 2))
CONV_STAGES = 4  # depth of the cp.async ring (conv2d.cu); TF32 tiles may take fewer
# conv_tf32_nhwc (forward): BK = 16 (four 16-byte chunks of channels a row), the ring as deep as
# 48 KiB of static shared memory allows (`nhwc_stages`: three for 128x128, four for 128x64).
TF32_NHWC_TILES: tuple[Tf32Tile, ...] = (Tf32Tile(128, 128, 16, 2, 4, "nhwc"),
                                         Tf32Tile(128, 64, 16, 2, 2, "nhwc"))
# The channels-last pre-pass of conv_tf32_nhwc (a memory-bound copy, no main loop).
NHWC_COPY_KERNEL = "fc::nhwc_tf32_copy"
NHWC_COPY_BLOCK = (32, 8, 1)


def tf32_tiles(mode: int) -> tuple[Tf32Tile, ...]:
    """The TF32 tiles `pick_tile` chooses from for a mode's own GEMM: for the forward the
    channels-last tiles first, then the ``conv_tf32`` ones (the gradients reach conv_tf32_nhwc
    through forward geometries: cuda_dgrad's phases, `wgrad_forward_geometry`)."""
    return (TF32_NHWC_TILES + TF32_TILES) if mode == FPROP else TF32_TILES


def nhwc_stages(tile: Tf32Tile) -> int:
    """Stages of the ``conv_tf32_nhwc`` ring (``nhwc_stages`` in conv2d.cu): four, or as many
    as fit in 48 KiB with BM + BN rows of 16 floats a stage."""
    return min(CONV_STAGES, SMEM_LIMIT // (64 * (tile.bm + tile.bn)))


def tf32_stages(tile: Tf32Tile) -> int:
    """Stages of the cp.async ring of a ``conv_tf32`` tile (``tf32_stages`` in conv2d.cu): four,
    or as many as fit in 48 KiB with rows of BM + 4 and BN + 4 floats."""
    return min(CONV_STAGES, SMEM_LIMIT // (tile.bk * (tile.bm + tile.bn + 8) * 4))


DEPTHWISE_TILES: dict[str, DepthwiseTile] = {"float32": DepthwiseTile(16, 32, 2),
                                             "float64": DepthwiseTile(16, 32, 2)}
DEPTHWISE_THREADS = 256  # block size of depthwise_wgrad
DEPTHWISE_STAGES = 2  # cp.async ring of depthwise_fprop / depthwise_dgrad (depthwise.cu)
# Work items (output tiles; grad_input tiles) a depthwise_fprop / depthwise_dgrad block takes
# in turn, so that the ring rotates: grid = ceil(items / this). Not tuned on a GPU.
DEPTHWISE_ITEMS_PER_BLOCK = 4


# The 1x1 forward and input gradient with unit stride and no padding read their A operand (x or
# grad_output) in 16-byte vectors of consecutive pixels (PlaneRows in conv2d.cu) when
# `vector_a_ok` holds; instantiated for these dtypes, modes and every tile of SIMT_TILES whose
# loader splits into whole vectors (`vector_a_tile`).
VECTOR_A_DTYPES = ("float32",)
VECTOR_A_MODES = (FPROP, DGRAD)


def vector_a_tile(dtype: Any, tile: SimtTile) -> bool:
    """Whether the vector A loader splits ``tile`` evenly (``PlaneRows``: BM divisible by
    ``threads / BK`` vectors of 16 bytes)."""
    vec = 16 // np.dtype(dtype).itemsize
    return tile.bm % ((tile.threads // tile.bk) * vec) == 0


def _address(a: Any) -> int:
    """Data address of a CuPy or NumPy array (or anything with one of the array interfaces)."""
    iface = getattr(a, "__cuda_array_interface__", None) or getattr(a, "__array_interface__")
    return int(iface["data"][0])


def vector_a_shape_ok(mode: int, dtype: Any, geom: Any, tile: SimtTile | Tf32Tile) -> bool:
    """The shape conditions of the vector A loader: a SIMT tile of an instantiated dtype and
    mode, 1x1 filters, unit stride, no padding, and a pixel plane that is a multiple of 16
    bytes' worth of elements (the dispatch rules name the kernel from these)."""
    if geom.R != 1 or geom.S != 1:  # the common case, answered first (one call per launch)
        return False
    dtype = np.dtype(dtype)
    if (not isinstance(tile, SimtTile) or dtype.name not in VECTOR_A_DTYPES
            or mode not in VECTOR_A_MODES or not vector_a_tile(dtype, tile)):
        return False
    return (tuple(geom.stride) == (1, 1) and not any(geom.padding)
            and (geom.H * geom.W) % (16 // dtype.itemsize) == 0)


def vector_a_ok(mode: int, a: Any, geom: Any, tile: SimtTile | Tf32Tile) -> bool:
    """Whether a launch may use the vector A loader: `vector_a_shape_ok` and ``a`` (x or
    grad_output, C-contiguous) 16-byte aligned."""
    return vector_a_shape_ok(mode, a.dtype, geom, tile) and _address(a) % 16 == 0


def resident_blocks(tile: SimtTile | Tf32Tile, mode: int) -> int:
    """Blocks per SM the kernel's ``__launch_bounds__`` make room for (``simt_min_blocks`` and
    the ``conv_tf32`` launch bounds in conv2d.cu): ``512 / threads`` (at most 128 registers per
    thread), except ``256 / threads`` (at least 1) for SIMT tiles with 8x8 register blocking (64
    accumulators: 128x128 with 256 threads, 128x64 with 128) and at most 3 for
    ``conv_tf32_nhwc`` (its 48 KiB ring: three blocks per SM on an A100); the same for every
    ``mode``. The compiled kernels are checked to allow at least this many
    (tests/test_sass_report.py)."""
    if isinstance(tile, Tf32Tile) and tile.layout == "nhwc":
        # 512 / threads by registers; the 48 KiB ring allows three per SM on an A100
        return min(max(1, 512 // tile.threads), 3)
    if isinstance(tile, Tf32Tile):
        return max(1, 512 // tile.threads)
    if tile.tm * tile.tn >= 64:
        return max(1, 256 // tile.threads)
    return max(1, 512 // tile.threads)


def c_type(dtype: Any) -> str:
    """The C++ element type of a float dtype."""
    name = np.dtype(dtype).name
    if name not in SIMT_TILES:
        raise TypeError(f"the CUDA kernels take float32 or float64, got {name}")
    return "float" if name == "float32" else "double"


def simt_tiles(dtype: Any, mode: int) -> tuple[SimtTile, ...]:
    """The ``conv_simt`` tiles the rules may choose for a dtype and mode."""
    name = np.dtype(dtype).name
    return tuple(t for t in SIMT_TILES[name] if (name, mode, t) not in SIMT_EXCLUDED)


def simt_kernel_name(dtype: Any, mode: int, tile: SimtTile, vector_a: bool = False) -> str:
    """Name expression of a ``conv_simt`` instantiation (``vector_a``: the 16-byte A loader,
    template argument AV = elements per 16 bytes)."""
    t = tile
    av = f", {16 // np.dtype(dtype).itemsize}" if vector_a else ""
    return (f"fc::conv_simt<{c_type(dtype)}, {mode}, {t.bm}, {t.bn}, {t.bk}, {t.tm}, {t.tn}"
            f"{av}>")


def vector_a_kernels() -> list[tuple[str, int, SimtTile]]:
    """(dtype, mode, tile) of every instantiation with the vector A loader."""
    return [(dt, mode, t) for dt in VECTOR_A_DTYPES for mode in VECTOR_A_MODES
            for t in simt_tiles(dt, mode) if vector_a_tile(dt, t)]


def tf32_kernel_name(mode: int, tile: Tf32Tile) -> str:
    """Name expression of a ``conv_tf32`` instantiation, or of ``conv_tf32_nhwc`` for an
    "nhwc" tile (forward only)."""
    t = tile
    if t.layout == "nhwc":
        if mode != FPROP:
            raise ValueError("conv_tf32_nhwc computes the forward pass only")
        return f"fc::conv_tf32_nhwc<{t.bm}, {t.bn}, {t.bk}, {t.warps_m}, {t.warps_n}>"
    return f"fc::conv_tf32<{mode}, {t.bm}, {t.bn}, {t.bk}, {t.warps_m}, {t.warps_n}>"


def depthwise_kernel_names(dtype: Any) -> dict[str, str]:
    """Name expressions of the three depthwise kernels for one dtype."""
    t, ct = DEPTHWISE_TILES[np.dtype(dtype).name], c_type(dtype)
    return {"forward": f"fc::depthwise_fprop<{ct}, {t.tp}, {t.tq}, {t.rpt}>",
            "input_grad": f"fc::depthwise_dgrad<{ct}, {t.tp}, {t.tq}, {t.rpt}>",
            "weight_grad": f"fc::depthwise_wgrad<{ct}, {DEPTHWISE_THREADS}>"}


def all_kernel_names() -> dict[str, list[str]]:
    """Every instantiation these launchers can request, per source file."""
    conv = [simt_kernel_name(dt, mode, tile) for dt in SIMT_TILES
            for mode in (FPROP, DGRAD, WGRAD) for tile in simt_tiles(dt, mode)]
    conv += [simt_kernel_name(dt, mode, tile, True) for dt, mode, tile in vector_a_kernels()]
    conv += [tf32_kernel_name(mode, tile) for tile in TF32_TILES for mode in (FPROP, DGRAD, WGRAD)]
    conv += [tf32_kernel_name(FPROP, tile) for tile in TF32_NHWC_TILES] + [NHWC_COPY_KERNEL]
    dw = [name for dt in DEPTHWISE_TILES for name in depthwise_kernel_names(dt).values()]
    return {"conv2d.cu": conv, "depthwise.cu": dw}


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def gemm_shape(geom: Any, mode: int) -> tuple[int, int, int]:
    """``(M, N_gemm, reduction)`` of one group's GEMM (see the table in conv2d.cu)."""
    cg, kg, rs = geom.C // geom.groups, geom.K // geom.groups, geom.R * geom.S
    if mode == FPROP:
        return geom.N * geom.P * geom.Q, kg, cg * rs
    if mode == DGRAD:
        return geom.N * geom.H * geom.W, cg, kg * rs
    if mode == WGRAD:
        return kg, cg * rs, geom.N * geom.P * geom.Q
    raise ValueError(f"unknown conv mode {mode!r}")


def rows_per_image(geom: Any, mode: int) -> int:
    """GEMM rows (FPROP, DGRAD) or reduction steps (WGRAD) contributed by one image."""
    return geom.H * geom.W if mode == DGRAD else geom.P * geom.Q


def batch_chunks(N: int, per_image: int, limit: int | None = None) -> list[tuple[int, int]]:
    """Split ``range(N)`` into ``[n0, n1)`` chunks of at most ``limit // per_image`` images
    (``limit`` defaults to `ROW_LIMIT`).

    Raises
    ------
    ValueError
        If a single image already has ``limit`` rows or more.
    """
    limit = ROW_LIMIT if limit is None else limit
    if per_image > limit:
        raise ValueError(f"one image has {per_image} pixels; the CUDA kernels index at most "
                         f"{limit} per launch")
    step = max(1, limit // max(per_image, 1))
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def with_batch(geom: Any, n: int) -> Any:
    """``geom`` for a batch of ``n`` images (same everything else)."""
    return geom if geom.N == n else dataclasses.replace(geom, N=n)


def split_reduction(reduction: int, splits: int, bk: int) -> tuple[int, int]:
    """``(slices, k_split)``: a GEMM reduction cut into slices of ``k_split`` steps (a multiple
    of ``bk``), at most ``splits`` of them, none empty."""
    splits = max(1, min(splits, -(-reduction // bk)))
    k_split = -(-reduction // splits)
    k_split = -(-k_split // bk) * bk
    return -(-reduction // k_split), k_split


def fast_divisor(d: int) -> tuple[int, int]:
    """``(mul, shift)`` with ``n // d == (n * mul) >> shift`` for every ``0 <= n < 2**31``.

    Granlund & Montgomery's round-up method: ``shift = 31 + ceil(log2 d)``,
    ``mul = ceil(2**shift / d)``, which is below ``2**32`` (``FastDiv`` in conv2d.cu).
    """
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor {d} outside [1, 2**31)")
    shift = 31 + (d - 1).bit_length()
    return -(-(1 << shift) // d), shift


def divisor_args(geom: Any, mode: int) -> tuple:
    """The 14 scalars after ``k_split``: ``(mul, shift)`` of R*S, S, P*Q, the row and the plane
    of the GEMM-row pixel space (row: W for DGRAD, else Q; plane: H*W for DGRAD, else P*Q;
    WGRAD uses the row only), sh and sw."""
    plane = geom.H * geom.W if mode == DGRAD else geom.P * geom.Q
    row = geom.W if mode == DGRAD else geom.Q
    out = []
    for d in (geom.R * geom.S, geom.S, geom.P * geom.Q, row, max(plane, 1), geom.stride[0],
              geom.stride[1]):
        mul, shift = fast_divisor(d)
        out += [np.uint32(mul), np.int32(shift)]
    return tuple(out)


@lru_cache(maxsize=1024)
def shape_args(geom: Any, k_split: int) -> tuple:
    """The 17 int32 scalars after the pointers of every conv kernel, in kernel order."""
    pt, _, pl, _ = geom.padding
    vals = (geom.N, geom.C, geom.H, geom.W, geom.K, geom.R, geom.S, geom.P, geom.Q,
            geom.stride[0], geom.stride[1], pt, pl, geom.dilation[0], geom.dilation[1],
            geom.groups, k_split)
    if any(abs(v) > 2**31 - 1 for v in vals):
        raise ValueError(f"a conv dimension exceeds 32 bits: {vals}")
    return tuple(np.int32(v) for v in vals)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------
def implicit_gemm_launch(mode: int, a: Any, b: Any, bias: Any, out: Any, geom: Any,
                         tile: SimtTile | Tf32Tile, splits: int = 1) -> Launch:
    """One launch of ``conv_simt`` (a `SimtTile`) or ``conv_tf32`` (a `Tf32Tile`).

    A 1x1 forward or input gradient whose ``a`` qualifies (`vector_a_ok`: unit stride, no
    padding, whole 16-byte vectors per plane, ``a`` 16-byte aligned) gets the ``conv_simt``
    instantiation with 16-byte A copies; anything else the general gather.

    Parameters
    ----------
    mode : FPROP, DGRAD or WGRAD
    a, b : arrays
        FPROP: ``x (N, C, H, W)``, ``weight (K, C/groups, R, S)``; DGRAD: ``grad_output
        (N, K, P, Q)``, ``weight``; WGRAD: ``grad_output``, ``x``.
    bias : array (K,) or None
        FPROP only.
    out : array
        FPROP ``y (N, K, P, Q)``; DGRAD ``grad_input (N, C, H, W)``; WGRAD ``grad_weight``;
        with more than one reduction slice, a workspace of ``slices`` such results (the
        caller sums them; FPROP's bias is in slice 0).
    geom : ConvGeometry
        Of this launch (its ``N`` is the images in ``a``).
    tile : SimtTile or Tf32Tile
    splits : int
        Requested reduction slices (see `split_reduction`).

    Returns
    -------
    Launch
    """
    vec = vector_a_ok(mode, a, geom, tile)
    name, grid, scalars = _gemm_plan(mode, geom, tile, splits, np.dtype(a.dtype), ROW_LIMIT,
                                     vec)
    args = (a, b, NULL if bias is None else bias, out) + scalars
    return Launch("conv2d.cu", name, grid, (tile.threads, 1, 1), 0, args)


@lru_cache(maxsize=1024)
def _gemm_plan(mode: int, geom: Any, tile: SimtTile | Tf32Tile, splits: int, dtype: np.dtype,
               row_limit: int, vector_a: bool = False) -> tuple[str, tuple[int, int, int], tuple]:
    """Kernel name, grid and scalar arguments of `implicit_gemm_launch` (memoised: repeated
    calls on one shape cost a dictionary lookup)."""
    M, NG, KG = gemm_shape(geom, mode)
    if max(M, KG) > row_limit:
        raise ValueError(f"GEMM of {M} rows and {KG} reduction steps: split the batch first")
    # The kernels form tap offsets with 32-bit plane and filter-row sizes (conv2d.cu, wide()).
    cg, kg, rs = geom.C // geom.groups, geom.K // geom.groups, geom.R * geom.S
    pt, pb, pl, pr = geom.padding
    padded = (geom.H + pt + pb) * (geom.W + pl + pr)  # bounds the in-plane tap offsets
    if max(padded, geom.P * geom.Q, cg * rs, kg * rs) > row_limit:
        raise ValueError(f"a plane or filter row of {geom} exceeds {row_limit} elements")
    slices, k_split = split_reduction(KG, splits, tile.bk)
    grid = (_ceil(M, tile.bm), _ceil(NG, tile.bn), geom.groups * slices)
    if grid[1] > GRID_YZ_LIMIT or grid[2] > GRID_YZ_LIMIT:
        raise ValueError(f"grid {grid} exceeds CUDA's limit of {GRID_YZ_LIMIT} in y and z")
    if isinstance(tile, Tf32Tile):
        if dtype != np.float32:
            raise TypeError("the TF32 kernel takes float32 arrays")
        if tile.layout == "nhwc":
            raise ValueError("conv_tf32_nhwc tiles launch through nhwc_forward_launch")
        name = tf32_kernel_name(mode, tile)
    else:
        name = simt_kernel_name(dtype, mode, tile, vector_a)
    return name, grid, shape_args(geom, k_split) + divisor_args(geom, mode)


# ---------------------------------------------------------------------------------------------
# TF32 forward over channels-last operands: pre-pass and conv_tf32_nhwc
# ---------------------------------------------------------------------------------------------
def padded_channels(cg: int) -> int:
    """Channels per group in the channels-last buffers: ``cg`` rounded up to a multiple of 4."""
    return -(-cg // 4) * 4


def nhwc_buffer_sizes(geom: Any) -> tuple[int, int]:
    """Elements of the pre-pass buffers of a forward: ``xt (N, H, W, groups, Cgp)`` and
    ``wt (K, R, S, Cgp)``."""
    cgp = padded_channels(geom.C // geom.groups)
    return geom.N * geom.H * geom.W * geom.groups * cgp, geom.K * geom.R * geom.S * cgp


def nhwc_workspace_bytes(geom: Any) -> int:
    """Bytes of the two float32 pre-pass buffers (`nhwc_buffer_sizes`)."""
    return 4 * sum(nhwc_buffer_sizes(geom))


def channels_last_launches(src: Any, dst: Any, outer: int, plane: int, groups: int, cg: int,
                           stride_b: int, stride_c: int) -> list[Launch]:
    """Launches of ``nhwc_tf32_copy`` filling ``dst`` (flat, ``outer * plane * groups * Cgp``
    float32) with the channels-last TF32 copy of ``src`` (any float32 array, read as
    ``src.flat[b * stride_b + (g * cg + c) * stride_c + i]``), in chunks of at most 65535
    ``b`` (grid z). x: ``outer = N, plane = H*W, stride_b = C*H*W, stride_c = H*W``; a weight:
    ``outer = K, plane = R*S, groups = 1, stride_b = cg*R*S, stride_c = R*S``."""
    cgp = padded_channels(cg)
    if outer * plane * groups * cgp == 0:
        return []
    if src.dtype != np.float32 or dst.dtype != np.float32:
        raise TypeError("the TF32 pre-pass takes float32 arrays")
    flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
    out = []
    for b0 in range(0, outer, GRID_YZ_LIMIT):
        b1 = min(outer, b0 + GRID_YZ_LIMIT)
        grid = (_ceil(plane, 32), groups * _ceil(cgp, 32), b1 - b0)
        args = (flat_src[b0 * stride_b:], flat_dst[b0 * plane * groups * cgp:],
                np.int32(plane), np.int32(groups), np.int32(cg), np.int32(cgp),
                np.int64(stride_b), np.int64(stride_c))
        out.append(Launch("conv2d.cu", NHWC_COPY_KERNEL, grid, NHWC_COPY_BLOCK, 0, args))
    return out


def nhwc_slices(geom: Any, splits: int) -> tuple[int, int]:
    """``(slices, k_split)`` of ``conv_tf32_nhwc``'s reduction of ``R*S*Cgp/4`` chunks of 4
    channels, cut into at most ``splits`` slices of a multiple of 4 chunks (one BK step)."""
    kc = geom.R * geom.S * padded_channels(geom.C // geom.groups) // 4
    return split_reduction(max(kc, 1), splits, 4)


def nhwc_forward_launch(xt: Any, wt: Any, bias: Any, out: Any, geom: Any, tile: Tf32Tile,
                        splits: int = 1) -> Launch:
    """One launch of ``conv_tf32_nhwc``.

    Parameters
    ----------
    xt, wt : float32 arrays
        The pre-pass buffers (`channels_last_launches`) of x, ``(N, H, W, groups, Cgp)``, and
        of the weight, ``(K, R, S, Cgp)``, flat.
    bias : array (K,) or None
    out : array
        ``y (N, K, P, Q)``, or with more than one reduction slice a workspace of ``slices``
        such results (the caller sums them; the bias is in slice 0).
    geom : ConvGeometry
        Of this launch (``N`` images in ``xt``; at most `ROW_LIMIT` output pixels).
    tile : Tf32Tile
        An "nhwc" tile.
    splits : int
        Requested reduction slices (`nhwc_slices`).
    """
    if tile.layout != "nhwc":
        raise ValueError(f"{tile} is not a conv_tf32_nhwc tile")
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    cgp = padded_channels(cg)
    gc = geom.groups * cgp
    M = geom.N * geom.P * geom.Q
    (dh, dw), (R, S) = geom.dilation, (geom.R, geom.S)
    # 32-bit in the kernel: GEMM rows, a tap's offset within an image, a filter row.
    if M > ROW_LIMIT:
        raise ValueError(f"GEMM of {M} rows: split the batch first")
    if max(((R - 1) * dh * geom.W + (S - 1) * dw + 1) * gc, R * S * cgp) > ROW_LIMIT:
        raise ValueError(f"a tap offset or filter row of {geom} exceeds {ROW_LIMIT} elements")
    slices, k_split = nhwc_slices(geom, splits)
    grid = (_ceil(M, tile.bm), _ceil(kg, tile.bn), geom.groups * slices)
    if grid[1] > GRID_YZ_LIMIT or grid[2] > GRID_YZ_LIMIT:
        raise ValueError(f"grid {grid} exceeds CUDA's limit of {GRID_YZ_LIMIT} in y and z")
    pt, _, pl, _ = geom.padding
    ints = (geom.N, geom.H, geom.W, geom.K, R, S, geom.P, geom.Q, geom.stride[0],
            geom.stride[1], pt, pl, dh, dw, geom.groups, cgp, k_split)
    divs = []
    for d in (max(cgp // 4, 1), S, max(geom.P * geom.Q, 1), max(geom.Q, 1)):
        mul, shift = fast_divisor(d)
        divs += [np.uint32(mul), np.int32(shift)]
    args = ((xt, wt, NULL if bias is None else bias, out)
            + tuple(np.int32(v) for v in ints) + tuple(divs))
    return Launch("conv2d.cu", tf32_kernel_name(FPROP, tile), grid, (tile.threads, 1, 1), 0,
                  args)


def wgrad_forward_geometry(geom: Any) -> Any:
    """The weight gradient of one group as a forward convolution with roles swapped:

        grad_weight[g*Kg + k, c, r, s] = sum_{n, p, q} grad_output[n, g*Kg + k, p, q]
            * x[n, g*Cg + c, p*sh + r*dh - pt, q*sw + s*dw - pl]

    is the correlation whose batch is the group's ``Cg`` input channels, whose input channels
    are the ``N`` images (x read as ``(C, H, W, N)``), whose ``Kg`` filters are grad_output read
    as ``(K, P, Q, N)`` (kernel size ``P x Q``), with stride ``(dh, dw)``, dilation
    ``(sh, sw)``, padding ``(pt, pl)`` and output size ``R x S``: its output ``(Cg, Kg, R, S)``
    is the group's block of grad_weight, transposed."""
    cg, kg = geom.C // geom.groups, geom.K // geom.groups
    pt, pb, pl, pr = geom.padding
    return dataclasses.replace(geom, N=cg, C=geom.N, K=kg, R=geom.P, S=geom.Q, P=geom.R,
                               Q=geom.S, stride=tuple(geom.dilation),
                               dilation=tuple(geom.stride), padding=(pt, pb, pl, pr), groups=1)


def nhwc_wgrad_workspace_bytes(geom: Any) -> int:
    """Bytes of the pre-pass buffers of the channels-last TF32 weight gradient: x as
    ``(C, H, W, Np)`` and grad_output as ``(K, P, Q, Np)``, ``Np`` the batch padded to a
    multiple of 4."""
    npad = padded_channels(geom.N)
    return 4 * npad * (geom.C * geom.H * geom.W + geom.K * geom.P * geom.Q)


def nhwc_fits(geom: Any) -> bool:
    """Whether ``nhwc_forward_launch`` accepts ``geom`` (32-bit rows, tap offsets and filter
    rows; grid limits)."""
    cgp = padded_channels(geom.C // geom.groups)
    gc = geom.groups * cgp
    (dh, dw), kg = geom.dilation, geom.K // geom.groups
    return (geom.N * geom.P * geom.Q <= ROW_LIMIT and geom.P * geom.Q <= ROW_LIMIT
            and ((geom.R - 1) * dh * geom.W + (geom.S - 1) * dw + 1) * gc <= ROW_LIMIT
            and geom.R * geom.S * cgp <= ROW_LIMIT and _ceil(kg, 64) <= GRID_YZ_LIMIT
            and geom.groups <= GRID_YZ_LIMIT)


def _depthwise_windows(geom: Any, dtype: Any) -> tuple[int, int, int, int]:
    """``(IH, IW, PH, PW)``: the input window of a ``depthwise_fprop`` tile and the grad_output
    window of a ``depthwise_dgrad`` tile (see depthwise.cu)."""
    t = DEPTHWISE_TILES[np.dtype(dtype).name]
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    ih = (t.tp - 1) * sh + (geom.R - 1) * dh + 1
    iw = (t.tq - 1) * sw + (geom.S - 1) * dw + 1
    ph = (t.tp - 1 + (geom.R - 1) * dh) // sh + 1
    pw = (t.tq - 1 + (geom.S - 1) * dw) // sw + 1
    return ih, iw, ph, pw


def depthwise_window_width(cols: int, dtype: Any, vec: bool) -> int:
    """Row length in shared memory of a depthwise window ``cols`` elements wide: ``cols``, or
    with 16-byte copies room for a shift of up to V - 1 in whole vectors of V = 16 / itemsize
    elements (``dw_window_width`` in depthwise.cu)."""
    v = 16 // np.dtype(dtype).itemsize
    return _ceil(cols + v - 1, v) * v if vec else cols


def depthwise_vector_ok(a: Any, row: int) -> bool:
    """Whether a depthwise window may be copied in 16-byte vectors from ``a`` (x for the
    forward, grad_output for the input gradient; C-contiguous): rows of ``row`` elements (W or
    Q) are whole vectors and ``a`` is 16-byte aligned, so every vector of a row is entirely
    inside or outside the plane."""
    return row % (16 // np.dtype(a.dtype).itemsize) == 0 and _address(a) % 16 == 0


def depthwise_smem_bytes(geom: Any, dtype: Any, op: str = "forward",
                         vec: bool = True) -> int:
    """Dynamic shared memory of a depthwise kernel for this geometry: for ``forward`` and
    ``input_grad``, DEPTHWISE_STAGES ring stages of a window (rows of
    `depthwise_window_width`; ``vec=True``, the larger, is what the rules check) and the R*S
    taps, each rounded up to 16 bytes (``dw_stage_elems``); ``weight_grad`` uses static shared
    memory only."""
    if op == "weight_grad":
        return 0
    ih, iw, ph, pw = _depthwise_windows(geom, dtype)
    rows, cols = (ih, iw) if op == "forward" else (ph, pw)
    size = np.dtype(dtype).itemsize
    window = rows * depthwise_window_width(cols, dtype, vec)
    v = 16 // size
    return DEPTHWISE_STAGES * _ceil(window + geom.R * geom.S, v) * v * size


def depthwise_wgrad_unroll(dtype: Any) -> int:
    """Pixels per thread per ring stage of ``depthwise_wgrad``: 16 bytes of each operand
    (``dw_wgrad_unroll`` in depthwise.cu)."""
    return 16 // np.dtype(dtype).itemsize


def depthwise_work_items(geom: Any, dtype: Any) -> tuple[int, int]:
    """``(items, tiles)``: the work items of ``depthwise_fprop`` (TP x TQ output tiles of every
    (n, k) plane) and the tiles of ``depthwise_dgrad`` (TP x TQ of every (n, c) plane)."""
    t = DEPTHWISE_TILES[np.dtype(dtype).name]
    return (geom.N * geom.K * _ceil(geom.P, t.tp) * _ceil(geom.Q, t.tq),
            geom.N * geom.C * _ceil(geom.H, t.tp) * _ceil(geom.W, t.tq))


def is_depthwise(geom: Any) -> bool:
    """One input channel per group (``groups == C``), any channel multiplier ``K / C``."""
    return geom.groups == geom.C and geom.K % geom.C == 0


def depthwise_fits(geom: Any, dtype: Any) -> bool:
    """Whether the depthwise kernels can take this geometry: both rings in SMEM_LIMIT (two
    stages each), item and tile counts below 2^30 (a block's next item index stays 32-bit),
    planes below 2^31 elements."""
    if not is_depthwise(geom):
        return False
    items, tiles = depthwise_work_items(geom, dtype)
    pixels = depthwise_wgrad_unroll(dtype) * DEPTHWISE_THREADS  # wgrad's last piece's end
    return (max(depthwise_smem_bytes(geom, dtype, op) for op in ("forward", "input_grad"))
            <= SMEM_LIMIT
            and items < 2**30 and tiles < 2**30 and geom.K * geom.R * geom.S <= 2**31 - 1
            and geom.H * geom.W <= 2**31 - 1 and geom.P * geom.Q + pixels <= 2**31 - 1)


def depthwise_divisor_args(geom: Any, dtype: Any, vec: bool = False) -> tuple:
    """The 25 scalars after ``dw`` of every depthwise kernel: ``(mul, shift)`` of C, sh, sw, Q,
    K, mult = K / C, the copies per window row of ``depthwise_fprop`` (IW, or its
    `depthwise_window_width` / V with 16-byte copies) and of ``depthwise_dgrad`` (PW likewise),
    and the tile counts ceil(Q / TQ), ceil(P / TP), ceil(W / TQ), ceil(H / TP); then ``vec``
    (16-byte window copies; see depthwise.cu)."""
    t = DEPTHWISE_TILES[np.dtype(dtype).name]
    _, iw, _, pw = _depthwise_windows(geom, dtype)
    if vec:
        v = 16 // np.dtype(dtype).itemsize
        iw, pw = (depthwise_window_width(c, dtype, True) // v for c in (iw, pw))
    out = []
    for d in (geom.C, geom.stride[0], geom.stride[1], geom.Q, geom.K, geom.K // geom.C, iw, pw,
              _ceil(geom.Q, t.tq), _ceil(geom.P, t.tp), _ceil(geom.W, t.tq),
              _ceil(geom.H, t.tp)):
        mul, shift = fast_divisor(max(d, 1))
        out += [np.uint32(mul), np.int32(shift)]
    return tuple(out) + (np.int32(vec),)


def depthwise_grid(items: int) -> tuple[int, int, int]:
    """Grid of ``depthwise_fprop`` / ``depthwise_dgrad``: DEPTHWISE_ITEMS_PER_BLOCK items
    (tiles) per block, taken grid-stride."""
    return (max(1, _ceil(items, DEPTHWISE_ITEMS_PER_BLOCK)), 1, 1)


def depthwise_forward_launch(x: Any, weight: Any, bias: Any, y: Any, geom: Any) -> Launch:
    """``depthwise_fprop``: x (N, C, H, W), weight (K, 1, R, S), bias (K,) or None -> y."""
    t = DEPTHWISE_TILES[np.dtype(x.dtype).name]
    vec = depthwise_vector_ok(x, geom.W)
    args = ((x, weight, NULL if bias is None else bias, y) + shape_args(geom, 0)[:15]
            + depthwise_divisor_args(geom, x.dtype, vec))
    return Launch("depthwise.cu", depthwise_kernel_names(x.dtype)["forward"],
                  depthwise_grid(depthwise_work_items(geom, x.dtype)[0]), t.block,
                  depthwise_smem_bytes(geom, x.dtype, "forward", vec), args)


def depthwise_input_grad_launch(weight: Any, grad_output: Any, grad_input: Any,
                                geom: Any) -> Launch:
    """``depthwise_dgrad``: TP x TQ grad_input tiles, each in K / C pieces (one per filter)."""
    t = DEPTHWISE_TILES[np.dtype(weight.dtype).name]
    vec = depthwise_vector_ok(grad_output, geom.Q)
    args = ((grad_output, weight, grad_input) + shape_args(geom, 0)[:15]
            + depthwise_divisor_args(geom, weight.dtype, vec))
    return Launch("depthwise.cu", depthwise_kernel_names(weight.dtype)["input_grad"],
                  depthwise_grid(depthwise_work_items(geom, weight.dtype)[1]), t.block,
                  depthwise_smem_bytes(geom, weight.dtype, "input_grad", vec), args)


def depthwise_weight_grad_launch(x: Any, grad_output: Any, grad_weight: Any,
                                 geom: Any) -> Launch:
    """``depthwise_wgrad``: one block per weight element (k, r, s)."""
    grid = (geom.K * geom.R * geom.S, 1, 1)
    args = ((x, grad_output, grad_weight) + shape_args(geom, 0)[:15]
            + depthwise_divisor_args(geom, x.dtype))
    return Launch("depthwise.cu", depthwise_kernel_names(x.dtype)["weight_grad"], grid,
                  (DEPTHWISE_THREADS, 1, 1), 0, args)
