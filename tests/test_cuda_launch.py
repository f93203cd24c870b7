"""Launch geometry, argument preparation and algorithm rules of the cuda backend, without a GPU.

The launchers are plain Python: these tests check grids, blocks, shared memory, the kernel
instantiation and every argument's type and value, and the dispatch rules that pick them.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.dispatch import cuda as rules
from fastconv.kernels import cuda_build, cuda_conv, cuda_hinge
from fastconv.kernels.cuda_conv import DGRAD, FPROP, WGRAD, SimtTile, Tf32Tile

from conftest import CASES


def _geom(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1):
    return conv_geometry(x_shape, w_shape, stride, padding, dilation, groups)


def _arrays(geom, dtype=np.float32):
    x = np.zeros((geom.N, geom.C, geom.H, geom.W), dtype)
    w = np.zeros((geom.K, geom.C // geom.groups, geom.R, geom.S), dtype)
    y = np.zeros((geom.N, geom.K, geom.P, geom.Q), dtype)
    return x, w, np.zeros(geom.K, dtype), y


R3 = _geom((8, 64, 56, 56), (64, 64, 3, 3), padding=1)
MIXED = _geom((2, 4, 9, 11), (6, 2, 2, 3), stride=(2, 1), padding=((0, 1), (2, 1)),
              dilation=(1, 2), groups=2)


# ---------------------------------------------------------------------------------------------
# Tiles and instantiations
# ---------------------------------------------------------------------------------------------
def _simt_ok(t: SimtTile, vec: int) -> bool:
    """The static_asserts of conv2d.cu, mirrored: every tile loader divides evenly."""
    nt = t.threads
    return (t.tm % vec == 0 and t.tn % vec == 0 and nt % t.bk == 0 and nt <= 1024
            and t.bm % (nt // t.bk) == 0 and t.bn % (nt // t.bk) == 0
            and t.bm % t.tm == 0 and t.bn % t.tn == 0)


def test_simt_tiles_satisfy_kernel_constraints():
    for dtype, tiles in cuda_conv.SIMT_TILES.items():
        vec = 4 if dtype == "float32" else 2
        for t in tiles:
            assert _simt_ok(t, vec), (dtype, t)
            # two stages of both tiles stay under the static shared-memory limit
            item = np.dtype(dtype).itemsize
            assert 2 * t.bk * (t.bm + t.bn + 2 * vec) * item <= cuda_conv.SMEM_LIMIT


def test_tf32_tiles_satisfy_kernel_constraints():
    """The static_asserts of conv_tf32 and its loaders (fragment-order layout: every loader's
    column step a multiple of 16), and a ring of at least two stages in 48 KiB."""
    for t in cuda_conv.TF32_TILES:
        nt = t.threads
        assert (t.bm // t.warps_m) % 16 == 0 and (t.bn // t.warps_n) % 16 == 0, t
        assert t.bk % 8 == 0 and nt % t.bk == 0 and (nt // t.bk) % 16 == 0, t
        assert t.bm % (nt // t.bk) == 0 and t.bn % (nt // t.bk) == 0
        stages = cuda_conv.tf32_stages(t)
        assert 2 <= stages <= cuda_conv.CONV_STAGES, t
        assert stages * t.bk * (t.bm + t.bn + 8) * 4 <= cuda_conv.SMEM_LIMIT


def test_tf32_stages():
    assert cuda_conv.tf32_stages(Tf32Tile(128, 128, 8, 2, 4)) == 4
    assert cuda_conv.tf32_stages(Tf32Tile(128, 64, 16, 4, 2)) == 3   # 3 x 12800 B
    assert cuda_conv.tf32_stages(Tf32Tile(128, 128, 16, 2, 4)) == 2  # 3 x 16896 B > 48 KiB


def test_nhwc_tiles_satisfy_kernel_constraints():
    """The static_asserts of conv_tf32_nhwc and its loaders: BK = 16, warp tiles of whole
    16 x 16 mma pairs, rows split evenly over threads / 4 per pass, at least three stages in
    48 KiB of static shared memory; forward only."""
    for t in cuda_conv.TF32_NHWC_TILES:
        assert t.layout == "nhwc" and t.bk == 16, t
        assert (t.bm // t.warps_m) % 16 == 0 and (t.bn // t.warps_n) % 16 == 0, t
        rows = t.threads // 4
        assert t.bm % rows == 0 and t.bn % rows == 0, t
        stages = cuda_conv.nhwc_stages(t)
        assert 3 <= stages <= cuda_conv.CONV_STAGES, t
        assert stages * (t.bm + t.bn) * 16 * 4 <= cuda_conv.SMEM_LIMIT, t
        with pytest.raises(ValueError, match="forward"):
            cuda_conv.tf32_kernel_name(DGRAD, t)
    assert [cuda_conv.nhwc_stages(t) for t in cuda_conv.TF32_NHWC_TILES] == [3, 4]
    assert cuda_conv.tf32_tiles(FPROP)[:2] == cuda_conv.TF32_NHWC_TILES
    for mode in (DGRAD, WGRAD):
        assert all(t.layout == "nchw" for t in cuda_conv.tf32_tiles(mode))
    assert all(t.bm < 128 for t in cuda_conv.tf32_tiles(DGRAD))
    assert all(t.layout == "nhwc" or t.bm < 128 for t in cuda_conv.tf32_tiles(FPROP))


def test_nhwc_launch_geometry_and_workspace():
    """Pre-pass launches (grid over pixels, groups x channel blocks, images; chunks of 65535
    images), buffer sizes, and the conv_tf32_nhwc launch (grid, block, scalar arguments, slices
    over the R*S*Cgp/4 chunk reduction)."""
    geom = conv_geometry((3, 10, 9, 7), (12, 5, 3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2), 2)
    cgp = cuda_conv.padded_channels(5)
    assert cgp == 8 and cuda_conv.padded_channels(8) == 8 and cuda_conv.padded_channels(1) == 4
    nx, nw = cuda_conv.nhwc_buffer_sizes(geom)
    assert (nx, nw) == (3 * 9 * 7 * 2 * 8, 12 * 3 * 2 * 8)
    assert cuda_conv.nhwc_workspace_bytes(geom) == 4 * (nx + nw)
    x = np.zeros((3, 10, 9, 7), np.float32)
    xt = np.zeros(nx, np.float32)
    (spec,) = cuda_conv.channels_last_launches(x, xt, 3, 63, 2, 5, 630, 63)
    assert spec.kernel == cuda_conv.NHWC_COPY_KERNEL and spec.block == (32, 8, 1)
    assert spec.grid == (2, 2, 3)  # ceil(63 / 32) pixel blocks, 2 groups x 1 channel block
    assert [int(a) for a in spec.args[2:]] == [63, 2, 5, 8, 630, 63]
    big = np.zeros(70000 * 2, np.float32)
    specs = cuda_conv.channels_last_launches(big, np.zeros(70000 * 4, np.float32), 70000, 1, 1,
                                             2, 2, 1)
    assert [s.grid[2] for s in specs] == [65535, 70000 - 65535]
    assert specs[1].args[1].size == (70000 - 65535) * 4 and specs[1].args[0].size == 2 * 4465
    wt = np.zeros(nw, np.float32)
    y = np.zeros((3, 12, geom.P, geom.Q), np.float32)
    tile = cuda_conv.TF32_NHWC_TILES[1]
    spec = cuda_conv.nhwc_forward_launch(xt, wt, None, y, geom, tile)
    M = 3 * geom.P * geom.Q
    assert spec.kernel == "fc::conv_tf32_nhwc<128, 64, 16, 2, 2>"
    assert spec.grid == (-(-M // 128), 1, 2) and spec.block == (128, 1, 1)
    ints = [int(a) for a in spec.args[4:21]]
    assert ints == [3, 9, 7, 12, 3, 2, geom.P, geom.Q, 2, 1, 1, 2, 1, 2, 2, 8, 3 * 2 * 2]
    slices, k_split = cuda_conv.nhwc_slices(geom, 2)  # 12 chunks -> 2 slices of 8 and 4
    assert (slices, k_split) == (2, 8)
    work = np.zeros((2,) + y.shape, np.float32)
    spec = cuda_conv.nhwc_forward_launch(xt, wt, None, work, geom, tile, 2)
    assert spec.grid[2] == 4 and int(spec.args[20]) == 8
    with pytest.raises(ValueError, match="nhwc_forward_launch"):
        cuda_conv.implicit_gemm_launch(FPROP, x, np.zeros((12, 5, 3, 2), np.float32), None, y,
                                       geom, tile)


def test_kernel_names_cover_every_tile_mode_and_dtype():
    names = cuda_conv.all_kernel_names()["conv2d.cu"]
    n_simt = sum(len(cuda_conv.simt_tiles(dt, mode)) for dt in cuda_conv.SIMT_TILES
                 for mode in (FPROP, DGRAD, WGRAD))
    assert n_simt == 3 * sum(len(t) for t in cuda_conv.SIMT_TILES.values()) - len(
        cuda_conv.SIMT_EXCLUDED)
    n_vec = len(cuda_conv.vector_a_kernels())
    assert n_vec == 10  # FP32 forward and input gradient, every tile but 64x64 (256 threads)
    n_tf32 = 3 * len(cuda_conv.TF32_TILES)
    n_nhwc = len(cuda_conv.TF32_NHWC_TILES) + 1  # and the pre-pass
    assert len(names) == len(set(names)) == n_simt + n_vec + n_tf32 + n_nhwc
    for dt, mode, tile in cuda_conv.SIMT_EXCLUDED:
        assert cuda_conv.simt_kernel_name(dt, mode, tile) not in names
    assert "fc::conv_simt<float, 0, 128, 64, 8, 8, 8>" in names
    assert "fc::conv_simt<float, 1, 128, 128, 8, 8, 8>" in names
    assert "fc::conv_simt<double, 2, 64, 64, 8, 4, 4>" in names
    # the 128-wide conv_tf32 tiles are retired (conv_tf32_nhwc)
    assert "fc::conv_tf32<1, 128, 64, 16, 4, 2>" not in names
    assert "fc::conv_tf32<0, 128, 128, 16, 2, 4>" not in names
    assert "fc::conv_tf32<2, 128, 64, 16, 4, 2>" not in names
    assert "fc::conv_tf32<1, 64, 64, 8, 2, 2>" in names
    assert "fc::conv_tf32_nhwc<128, 128, 16, 2, 4>" in names
    assert "fc::conv_tf32_nhwc<128, 64, 16, 2, 2>" in names
    assert cuda_conv.NHWC_COPY_KERNEL in names
    dw = cuda_conv.all_kernel_names()["depthwise.cu"]
    assert "fc::depthwise_fprop<float, 16, 32, 2>" in dw
    assert "fc::depthwise_dgrad<double, 16, 32, 2>" in dw


def test_c_type_rejects_other_dtypes():
    assert cuda_conv.c_type(np.float32) == "float" and cuda_conv.c_type("float64") == "double"
    with pytest.raises(TypeError):
        cuda_conv.c_type(np.float16)


# ---------------------------------------------------------------------------------------------
# Conv geometry
# ---------------------------------------------------------------------------------------------
def test_gemm_shape_per_mode():
    g = MIXED  # Cg = 2, Kg = 3, R*S = 6
    assert cuda_conv.gemm_shape(g, FPROP) == (g.N * g.P * g.Q, 3, 12)
    assert cuda_conv.gemm_shape(g, DGRAD) == (g.N * g.H * g.W, 2, 18)
    assert cuda_conv.gemm_shape(g, WGRAD) == (3, 12, g.N * g.P * g.Q)
    with pytest.raises(ValueError):
        cuda_conv.gemm_shape(g, 7)


def test_shape_args_order_and_types():
    args = cuda_conv.shape_args(MIXED, 40)
    assert all(type(a) is np.int32 for a in args)
    g = MIXED
    assert [int(a) for a in args] == [g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q, 2, 1, 0, 2,
                                      1, 2, 2, 40]


def test_forward_launch():
    x, w, b, y = _arrays(R3)
    tile = SimtTile(128, 64, 8, 8, 8)
    spec = cuda_conv.implicit_gemm_launch(FPROP, x, w, b, y, R3, tile)
    assert spec.source == "conv2d.cu"
    assert spec.kernel == "fc::conv_simt<float, 0, 128, 64, 8, 8, 8>"
    assert spec.grid == (math.ceil(8 * 56 * 56 / 128), 1, 1)
    assert spec.block == (128, 1, 1) and spec.shared_mem == 0
    assert spec.args[0] is x and spec.args[1] is w and spec.args[2] is b and spec.args[3] is y
    assert len(spec.args) == 4 + 17 + 14
    assert int(spec.args[4 + 16]) == 64 * 9  # k_split: the whole reduction
    assert spec.args[4 + 17:] == cuda_conv.divisor_args(R3, FPROP)


def test_forward_launch_without_bias_passes_null():
    x, w, _, y = _arrays(R3)
    spec = cuda_conv.implicit_gemm_launch(FPROP, x, w, None, y, R3, SimtTile(64, 64, 8, 4, 4))
    assert spec.args[2] is cuda_build.NULL and spec.args[2].dtype == np.uint64
    assert int(spec.args[2]) == 0


def test_input_grad_launch_grid_spans_input_pixels_and_channels():
    g = _geom((2, 10, 9, 7), (12, 5, 3, 3), stride=2, groups=2)
    x, w, _, y = _arrays(g)
    spec = cuda_conv.implicit_gemm_launch(DGRAD, y, w, None, x, g, SimtTile(32, 32, 8, 4, 4))
    assert spec.grid == (math.ceil(2 * 9 * 7 / 32), 1, 2)
    assert spec.kernel == "fc::conv_simt<float, 1, 32, 32, 8, 4, 4>"
    assert spec.block == (64, 1, 1)


def test_weight_grad_launch_slices_the_reduction():
    x, w, _, y = _arrays(R3)
    tile = SimtTile(64, 64, 8, 4, 4)
    reduction = 8 * 56 * 56
    slices, k_split = cuda_conv.split_reduction(reduction, 30, tile.bk)
    work = np.zeros((slices,) + w.shape, np.float32)
    spec = cuda_conv.implicit_gemm_launch(WGRAD, y, x, None, work, R3, tile, splits=30)
    assert spec.grid == (1, 9, slices)
    assert int(spec.args[4 + 16]) == k_split and k_split % tile.bk == 0
    assert (slices - 1) * k_split < reduction <= slices * k_split


def test_tf32_launch_needs_float32():
    x, w, b, y = _arrays(R3)
    spec = cuda_conv.implicit_gemm_launch(FPROP, x, w, b, y, R3, Tf32Tile(128, 64, 16, 4, 2))
    assert spec.kernel == "fc::conv_tf32<0, 128, 64, 16, 4, 2>" and spec.block == (256, 1, 1)
    x64, w64, b64, y64 = _arrays(R3, np.float64)
    with pytest.raises(TypeError):
        cuda_conv.implicit_gemm_launch(FPROP, x64, w64, b64, y64, R3, Tf32Tile(128, 64, 16, 4, 2))


def test_launch_refuses_rows_past_32_bits():
    g = _geom((70000, 1, 200, 200), (1, 1, 1, 1))
    x = np.zeros((1, 1, 1, 1), np.float32)  # never read: the geometry check comes first
    with pytest.raises(ValueError, match="split the batch"):
        cuda_conv.implicit_gemm_launch(FPROP, x, x, None, x, g, SimtTile(64, 64, 8, 4, 4))


def test_vector_a_loader_only_where_it_applies():
    """1x1, unit stride, no padding, planes of whole 16-byte vectors and a 16-byte aligned
    operand: the forward and input gradient get the 16-byte A loader; anything else the
    general gather (the emulation runs both, tests/test_cuda_emulated.py)."""
    g = _geom((2, 16, 8, 6), (24, 16, 1, 1))  # plane 48
    x, w, b, y = _arrays(g)
    tile = SimtTile(128, 64, 8, 8, 8)
    name = cuda_conv.implicit_gemm_launch(FPROP, x, w, b, y, g, tile).kernel
    assert name == "fc::conv_simt<float, 0, 128, 64, 8, 8, 8, 4>"
    name = cuda_conv.implicit_gemm_launch(DGRAD, y, w, None, x, g, tile).kernel
    assert name == "fc::conv_simt<float, 1, 128, 64, 8, 8, 8, 4>"
    assert name in cuda_conv.all_kernel_names()["conv2d.cu"]
    # misaligned by one element: the same geometry, the general kernel
    buf = np.zeros(x.size + 4, np.float32)
    off = (-buf.ctypes.data % 16) // 4 + 1
    xm = buf[off:off + x.size].reshape(x.shape)
    name = cuda_conv.implicit_gemm_launch(FPROP, xm, w, b, y, g, tile).kernel
    assert name == "fc::conv_simt<float, 0, 128, 64, 8, 8, 8>"
    # not 1x1, strided, padded, a plane of 7 x 6, the weight gradient, a 64x64 tile, FP64
    others = [(_geom((2, 16, 8, 6), (24, 16, 3, 3), padding=1), FPROP, tile),
              (_geom((2, 16, 8, 8), (24, 16, 1, 1), stride=2), FPROP, tile),
              (_geom((2, 16, 8, 6), (24, 16, 1, 1), padding=1), FPROP, tile),
              (_geom((2, 16, 7, 6), (24, 16, 1, 1)), FPROP, tile),
              (g, WGRAD, tile), (g, FPROP, SimtTile(64, 64, 8, 4, 4))]
    for geom, mode, t in others:
        xa, wa, ba, ya = _arrays(geom)
        a, bb, out = {FPROP: (xa, wa, ya), WGRAD: (ya, xa, wa)}[mode]
        assert not cuda_conv.vector_a_ok(mode, a, geom, t), (geom, mode, t)
        assert cuda_conv.implicit_gemm_launch(mode, a, bb, None, out, geom, t).kernel.count(
            ",") == 6
    x64, w64, b64, y64 = _arrays(g, np.float64)
    assert not cuda_conv.vector_a_ok(FPROP, x64, g, tile)


def test_launch_refuses_planes_past_32_bits():
    """Tap offsets use 32-bit plane sizes: one 50000 x 50000 plane is refused even where the
    strided output keeps the GEMM rows small."""
    g = _geom((1, 1, 50000, 50000), (1, 1, 1, 1), stride=1000)
    x = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="plane or filter row"):
        cuda_conv.implicit_gemm_launch(FPROP, x, x, None, x, g, SimtTile(64, 64, 8, 4, 4))


@given(st.integers(1, 2**31 - 1), st.data())
def test_fast_divisor_divides_every_31bit_dividend(d, data):
    mul, shift = cuda_conv.fast_divisor(d)
    assert 0 < mul < 2**32 and 31 <= shift <= 62
    edges = [0, 1, d - 1, d, d + 1, 2**31 - 1, (2**31 - 1) // d * d, (2**31 - 1) // d * d - 1]
    for n in edges + [data.draw(st.integers(0, 2**31 - 1)) for _ in range(20)]:
        if 0 <= n < 2**31:
            assert (n * mul) >> shift == n // d, (n, d)


def test_fast_divisor_small_divisors_exhaustively_near_multiples():
    for d in range(1, 600):
        mul, shift = cuda_conv.fast_divisor(d)
        for k in (0, 1, 2, 1000, (2**31 - 1) // d):
            for n in (k * d - 1, k * d, k * d + d - 1):
                if 0 <= n < 2**31:
                    assert (n * mul) >> shift == n // d
    with pytest.raises(ValueError):
        cuda_conv.fast_divisor(0)


def test_divisor_args_order_and_types():
    args = cuda_conv.divisor_args(MIXED, DGRAD)
    assert len(args) == 14
    assert all(type(a) is np.uint32 for a in args[0::2])
    assert all(type(a) is np.int32 for a in args[1::2])
    g = MIXED
    divisors = (g.R * g.S, g.S, g.P * g.Q, g.W, g.H * g.W, 2, 1)  # DGRAD rows are (H, W)
    assert [cuda_conv.fast_divisor(d) for d in divisors] == [
        (int(args[i]), int(args[i + 1])) for i in range(0, 14, 2)]
    assert cuda_conv.divisor_args(MIXED, FPROP)[8] == cuda_conv.fast_divisor(g.P * g.Q)[0]
    assert cuda_conv.divisor_args(MIXED, FPROP)[6] == cuda_conv.fast_divisor(g.Q)[0]


@given(st.integers(1, 10**6), st.integers(1, 10**5))
def test_batch_chunks_cover_the_batch_within_the_limit(N, per_image):
    limit = 10**7
    chunks = cuda_conv.batch_chunks(N, per_image, limit)
    assert chunks[0][0] == 0 and chunks[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all((n1 - n0) * per_image <= limit and n1 > n0 for n0, n1 in chunks)


def test_batch_chunks_refuse_a_giant_image():
    with pytest.raises(ValueError):
        cuda_conv.batch_chunks(2, 100, limit=50)


@given(st.integers(1, 10**7), st.integers(1, 4096), st.sampled_from([8, 16]))
def test_split_reduction_covers_the_reduction_without_empty_slices(reduction, splits, bk):
    slices, k_split = cuda_conv.split_reduction(reduction, splits, bk)
    assert 1 <= slices <= splits and k_split % bk == 0
    assert (slices - 1) * k_split < reduction <= slices * k_split


def test_rows_per_image():
    assert cuda_conv.rows_per_image(MIXED, FPROP) == MIXED.P * MIXED.Q
    assert cuda_conv.rows_per_image(MIXED, DGRAD) == MIXED.H * MIXED.W
    assert cuda_conv.rows_per_image(MIXED, WGRAD) == MIXED.P * MIXED.Q


def test_with_batch_keeps_everything_else():
    part = cuda_conv.with_batch(MIXED, 1)
    assert part.N == 1 and part.stride == MIXED.stride and part.padding == MIXED.padding
    assert cuda_conv.with_batch(MIXED, MIXED.N) is MIXED


# ---------------------------------------------------------------------------------------------
# Depthwise
# ---------------------------------------------------------------------------------------------
def test_depthwise_launches():
    g = _geom((3, 8, 30, 70), (16, 1, 3, 5), stride=(1, 2), padding=2, dilation=(2, 1),
              groups=8)
    x, w, b, y = _arrays(g)
    per_block = cuda_conv.DEPTHWISE_ITEMS_PER_BLOCK
    items = 3 * 16 * math.ceil(g.P / 16) * math.ceil(g.Q / 32)
    tiles = 3 * 8 * math.ceil(30 / 16) * math.ceil(70 / 32)
    assert cuda_conv.depthwise_work_items(g, np.float32) == (items, tiles)
    spec = cuda_conv.depthwise_forward_launch(x, w, b, y, g)
    assert spec.kernel == "fc::depthwise_fprop<float, 16, 32, 2>"
    assert spec.grid == (math.ceil(items / per_block), 1, 1) and spec.grid[0] < items
    assert spec.block == (32, 8, 1)
    ih, iw = 15 * 1 + 2 * 2 + 1, 31 * 2 + 4 * 1 + 1
    # two stages, each the window and the 15 taps rounded up to 16 bytes
    assert spec.shared_mem == 2 * math.ceil((ih * iw + 15) / 4) * 4 * 4 == 10848
    assert len(spec.args) == 4 + 15 + 25
    divs = spec.args[4 + 15:]
    assert divs[24] == 0  # W = 70: rows are not whole 16-byte vectors, element copies
    ph, pw = (15 + 2 * 2) // 1 + 1, (31 + 4 * 1) // 2 + 1
    assert [(int(divs[i]), int(divs[i + 1])) for i in range(0, 24, 2)] == [
        cuda_conv.fast_divisor(d) for d in (g.C, 1, 2, g.Q, g.K, 2, iw, pw, math.ceil(g.Q / 32),
                                            math.ceil(g.P / 16), math.ceil(70 / 32),
                                            math.ceil(30 / 16))]
    spec = cuda_conv.depthwise_input_grad_launch(w, y, x, g)
    assert spec.kernel == "fc::depthwise_dgrad<float, 16, 32, 2>" and spec.args[:3] == (y, w, x)
    assert spec.grid == (math.ceil(tiles / per_block), 1, 1) and spec.block == (32, 8, 1)
    assert spec.shared_mem == 2 * math.ceil((ph * pw + 15) / 4) * 4 * 4 == 3008
    assert spec.args[3 + 15:] == divs
    spec = cuda_conv.depthwise_weight_grad_launch(x, y, w, g)
    assert spec.grid == (16 * 15, 1, 1) and spec.block == (cuda_conv.DEPTHWISE_THREADS, 1, 1)
    assert spec.shared_mem == 0 and spec.args[-1] == 0  # its ring is static
    # double: 16-byte rounding is two elements; W = 70 and Q = 35 as 16-byte vectors of two:
    # the forward copies vectors from an aligned x (its window rows widened to
    # ceil((IW + 1) / 2) * 2), never from x 8 bytes off; Q = 35 is odd
    x, w, b, y = _arrays(g, np.float64)
    for off in (0, 8):
        xa, ya = _at(x, off), _at(y, off)
        spec = cuda_conv.depthwise_forward_launch(xa, w, b, ya, g)
        width = math.ceil((iw + 1) / 2) * 2 if off == 0 else iw
        assert spec.shared_mem == 2 * math.ceil((ih * width + 15) / 2) * 2 * 8
        assert spec.args[-1] == (off == 0)
        assert spec.args[4 + 15 + 12:4 + 15 + 14] == tuple(
            np.array(cuda_conv.fast_divisor(width // 2 if off == 0 else iw)).astype(object))
        spec = cuda_conv.depthwise_input_grad_launch(w, ya, xa, g)
        assert spec.args[-1] == 0
    assert cuda_conv.depthwise_wgrad_unroll(np.float64) == 2
    assert cuda_conv.depthwise_wgrad_unroll(np.float32) == 4


def _at(a, offset):
    """A C-contiguous copy of ``a`` ``offset`` bytes past a 16-byte aligned address."""
    buf = np.empty(a.nbytes + 32, np.uint8)
    first = -buf.ctypes.data % 16 + offset
    out = buf[first:first + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_depthwise_vector_windows():
    """16-byte window copies where rows are whole vectors and the operand is aligned: the
    forward reads x (rows of W), the input gradient grad_output (rows of Q)."""
    g = _geom((2, 3, 36, 44), (6, 1, 3, 3), stride=2, padding=1, groups=3)  # Q = 22
    x, w, b, y = _arrays(g)
    for off, vec in ((0, True), (4, False), (8, False)):
        assert cuda_conv.depthwise_vector_ok(_at(x, off), g.W) == vec
    assert not cuda_conv.depthwise_vector_ok(_at(y, 0), g.Q)  # 22 floats: not whole vectors
    assert cuda_conv.depthwise_vector_ok(_at(y.astype(np.float64), 0), g.Q)
    ih, iw, ph, pw = 15 * 2 + 2 + 1, 31 * 2 + 2 + 1, (15 + 2) // 2 + 1, (31 + 2) // 2 + 1
    def ring(n):  # two stages of n floats, each rounded up to 16 bytes
        return 2 * math.ceil(n / 4) * 4 * 4

    spec = cuda_conv.depthwise_forward_launch(_at(x, 0), w, b, y, g)
    assert spec.shared_mem == ring(ih * 68 + 9)  # rows of ceil((65 + 3) / 4) * 4
    assert cuda_conv.depthwise_smem_bytes(g, np.float32, "forward") == spec.shared_mem
    assert cuda_conv.depthwise_smem_bytes(g, np.float32, "forward", False) == ring(ih * iw + 9)
    spec = cuda_conv.depthwise_input_grad_launch(w, y, x, g)
    assert spec.args[-1] == 0 and spec.shared_mem == ring(ph * pw + 9)
    assert cuda_conv.depthwise_smem_bytes(g, np.float32, "input_grad") == ring(ph * 20 + 9)
    assert [cuda_conv.depthwise_window_width(c, np.float32, True) for c in (1, 4, 5, 17)] == [
        4, 8, 8, 20]
    assert [cuda_conv.depthwise_window_width(c, np.float64, True) for c in (1, 2, 3)] == [
        2, 4, 4]


def test_depthwise_fits():
    assert cuda_conv.depthwise_fits(_geom((1, 4, 9, 9), (8, 1, 3, 3), groups=4), np.float32)
    assert not cuda_conv.depthwise_fits(_geom((1, 4, 9, 9), (8, 2, 3, 3), groups=2),
                                        np.float32)
    big = _geom((1, 2, 400, 400), (2, 1, 31, 31), stride=3, dilation=3, groups=2)
    assert cuda_conv.depthwise_smem_bytes(big, np.float64) > cuda_conv.SMEM_LIMIT
    assert not cuda_conv.depthwise_fits(big, np.float64)
    # 31x31 (large-kernel nets): one stage of the double window (30.5 KiB) fitted, two do not;
    # float fits with two stages; with stride 1 both rings hold windows of the same size
    lk = _geom((1, 2, 64, 64), (2, 1, 31, 31), padding=15, groups=2)
    assert cuda_conv.depthwise_smem_bytes(lk, np.float64) == 2 * (46 * 64 + 961 + 1) * 8
    assert cuda_conv.depthwise_smem_bytes(lk, np.float64, vec=False) == 2 * (
        46 * 62 + 961 + 1) * 8
    assert cuda_conv.depthwise_smem_bytes(lk, np.float64, vec=False) // 2 <= cuda_conv.SMEM_LIMIT
    assert not cuda_conv.depthwise_fits(lk, np.float64)
    assert cuda_conv.depthwise_fits(lk, np.float32)
    assert (cuda_conv.depthwise_smem_bytes(lk, np.float32, "input_grad")
            == cuda_conv.depthwise_smem_bytes(lk, np.float32) == 2 * 4092 * 4)
    # with stride 2 the input-gradient window (11 x 19, rows of 24 for vector copies) is a
    # fraction of the forward's (37 x 69, rows of 72); each stage holds the 49 taps too,
    # rounded up to 16 bytes
    s2 = _geom((1, 2, 64, 64), (2, 1, 7, 7), stride=2, padding=3, groups=2)
    assert cuda_conv.depthwise_smem_bytes(s2, np.float32, "input_grad", False) == 2 * 260 * 4
    assert cuda_conv.depthwise_smem_bytes(s2, np.float32, "input_grad") == 2 * 316 * 4
    assert cuda_conv.depthwise_smem_bytes(s2, np.float32, vec=False) == 2 * 2604 * 4
    assert cuda_conv.depthwise_smem_bytes(s2, np.float32) == 2 * 2716 * 4
    # item counts stay below 2^30 (a block's next item index is 32-bit)
    many = _geom((2**14, 2**12, 16, 32), (2**12, 1, 1, 1), groups=2**12)
    assert cuda_conv.depthwise_work_items(many, np.float32)[0] == 2**26
    assert cuda_conv.depthwise_fits(many, np.float32)
    more = _geom((2**14, 2**16, 16, 32), (2**16, 1, 1, 1), groups=2**16)
    assert cuda_conv.depthwise_work_items(more, np.float32)[0] == 2**30
    assert not cuda_conv.depthwise_fits(more, np.float32)


# ---------------------------------------------------------------------------------------------
# Hinge
# ---------------------------------------------------------------------------------------------
@given(st.integers(1, 5000))
def test_hinge_row_layout_is_instantiated_and_holds_the_row(C):
    group, items = cuda_hinge.row_layout(C)
    assert (group, items) in cuda_hinge.LAYOUTS
    assert group * items >= min(C, 1024)
    if group < 32:
        assert group == 1 or C > (group // 2) * items  # the fewest lanes


@pytest.mark.parametrize("N", [1, 255, 256, 257, 10**6])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_label_range_grid_gives_every_block_a_label(N, sm_count):
    blocks = cuda_hinge.label_range_grid(N, sm_count)[0]
    assert 1 <= blocks <= 2 * sm_count and (blocks - 1) * cuda_hinge.THREADS < N
    labels = np.zeros(N, np.int64)
    launch = cuda_hinge.label_range_launch(labels, np.empty(2 * blocks, np.int64), sm_count)
    assert launch.kernel == cuda_hinge.RANGE_KERNEL and launch.grid == (blocks, 1, 1)
    assert launch.args[1] == N and launch.args[1].dtype == np.int64


def test_label_range_launch_refuses_bad_buffers():
    with pytest.raises(TypeError, match="int64"):
        cuda_hinge.label_range_launch(np.zeros(5, np.int32), np.empty(2, np.int64), 4)
    with pytest.raises(ValueError, match="partial must have shape"):
        cuda_hinge.label_range_launch(np.zeros(5, np.int64), np.empty(4, np.int64), 4)
    with pytest.raises(ValueError, match="at least one label"):
        cuda_hinge.label_range_grid(0, 4)


def test_hinge_row_layout_examples():
    assert cuda_hinge.row_layout(3) == (1, 4)
    assert cuda_hinge.row_layout(10) == (4, 4)
    assert cuda_hinge.row_layout(100) == (32, 4)
    assert cuda_hinge.row_layout(1000) == (32, 32)
    assert cuda_hinge.row_layout(5000) == (32, 32)


def test_hinge_launch_arguments():
    N, C = 1000, 10
    scores = np.zeros((N, C), np.float32)
    labels = np.zeros(N, np.int64)
    cw = np.ones(C, np.float32)
    rs = np.ones(1, np.float32)
    losses = np.zeros(N, np.float32)
    spec = cuda_hinge.hinge_launch(scores, labels, cw, rs, losses, None, 0.5, 2, 4, 4, 132)
    assert spec.kernel == "fc::hinge_rows<float, 4, 4>"
    assert spec.grid == (math.ceil(N / 64), 1, 1) and spec.block == (256, 1, 1)
    a = spec.args
    assert a[0] is scores and a[1] is labels and a[2] is cw and a[3] is rs and a[9] is losses
    assert type(a[4]) is np.int32 and int(a[4]) == 0          # row_scale broadcast
    assert type(a[5]) is np.float32 and float(a[5]) == 0.5    # margin in the scores' dtype
    assert type(a[6]) is np.int32 and int(a[6]) == 2
    assert type(a[7]) is np.int64 and int(a[7]) == N
    assert type(a[8]) is np.int32 and int(a[8]) == C
    assert a[10] is cuda_build.NULL
    spec = cuda_hinge.hinge_launch(scores.astype(np.float64), labels, cw, np.ones(N), losses,
                                   scores, 1.0, 1, 4, 4, 132)
    assert type(spec.args[5]) is np.float64 and int(spec.args[4]) == 1 and spec.args[10] is scores
    with pytest.raises(ValueError):
        cuda_hinge.hinge_launch(scores, labels, cw, rs, losses, None, 1.0, 1, 8, 8, 132)


def test_hinge_grid_is_capped_per_sm():
    assert cuda_hinge.hinge_grid(10**7, 32, 132) == (4 * 132, 1, 1)
    assert cuda_hinge.hinge_grid(10**7, 32, 132, 2) == (2 * 132, 1, 1)
    assert cuda_hinge.blocks_per_sm("float64", 32, 32) == 2
    assert cuda_hinge.blocks_per_sm("float32", 32, 16) == 4
    assert cuda_hinge.hinge_grid(5, 32, 132) == (1, 1, 1)
    assert cuda_hinge.hinge_grid(0, 1, 132) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Dispatch rules
# ---------------------------------------------------------------------------------------------
def _choose(op, geom, dtype=np.float32, precision="fp32", workspace=256 * 2**20):
    return rules.choose(op, geom, np.dtype(dtype), precision=precision,
                        workspace_bytes=workspace)


@pytest.fixture
def device(monkeypatch):
    """Pretend a device is present (SM count, capability) for the rules."""
    def set_device(sm_count=132, capability=(9, 0)):
        info = cuda_build.DeviceInfo(0, sm_count, capability)
        monkeypatch.setattr(cuda_build, "device_info_or_none", lambda: info)
    set_device()
    return set_device


def _gemm_spec(mode, a, b, out, geom, tile, splits):
    """The launch of an implicit-GEMM algorithm's main kernel (``conv_tf32_nhwc`` over zero
    pre-pass buffers for a channels-last tile)."""
    if isinstance(tile, Tf32Tile) and tile.layout == "nhwc":
        xt, wt = (np.zeros(n, np.float32) for n in cuda_conv.nhwc_buffer_sizes(geom))
        return cuda_conv.nhwc_forward_launch(xt, wt, None, out, geom, tile, splits)
    return cuda_conv.implicit_gemm_launch(mode, a, b, None, out, geom, tile, splits)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_rules_pick_instantiated_kernels_whose_launch_matches(case, precision, device):
    for dtype in (np.float32, np.float64):
        x, w, b = case.arrays(dtype)
        geom = _geom(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
        y = np.zeros((geom.N, geom.K, geom.P, geom.Q), dtype)
        for op in ("forward", "input_grad", "weight_grad"):
            algo = _choose(op, geom, dtype, precision)
            assert algo.reason
            if algo.name == "gemm_1x1":
                assert geom.R == geom.S == 1
                assert not (precision == "tf32" and dtype == np.float32)
                continue
            if algo.name == "depthwise":
                assert algo.get("kernel") == cuda_conv.depthwise_kernel_names(dtype)[op]
                continue
            if algo.name == "implicit_gemm_phases":  # every TF32 input gradient, strided FP32
                assert precision == "tf32" or geom.stride != (1, 1)
                names = cuda_conv.all_kernel_names()["conv2d.cu"] + ["cupy.matmul"]
                assert set(algo.get("kernels")) <= set(names)
                continue
            tf32 = algo.name == "implicit_gemm_tf32"
            assert tf32 == (precision == "tf32" and dtype == np.float32)
            tile = (Tf32Tile if tf32 else SimtTile)(*algo.get("tile"))
            mode = cuda_conv.MODE_OF_OP[op]
            a_src, b_src = {FPROP: (x, w), DGRAD: (y, w), WGRAD: (y, x)}[mode]
            spec = _gemm_spec(mode, a_src, b_src, y, geom, tile, algo.get("splits", 1))
            assert spec.kernel == algo.get("kernel")
            assert spec.kernel in cuda_conv.all_kernel_names()["conv2d.cu"]
            assert algo.get("precision") == ("tf32" if tf32 else
                                              "fp64" if dtype == np.float64 else "fp32")


# The GEMM shape of R3, dilated: the strict float32 R3 itself goes to Winograd (rules and tests
# in tests/test_cuda_winograd.py), these tests are about the implicit GEMM's rules.
R3_DIL = _geom((8, 64, 56, 56), (64, 64, 3, 3), padding=2, dilation=2)


def test_rules_strict_by_default_tf32_only_on_request(device):
    assert _choose("forward", R3_DIL).name == "implicit_gemm"
    tf32 = _choose("forward", R3_DIL, precision="tf32")  # (R3 itself: TF32 Winograd)
    assert tf32.name == "implicit_gemm_tf32" and "opt-in" in tf32.reason
    f64 = _choose("forward", R3, np.float64, precision="tf32")
    assert f64.name == "implicit_gemm" and "float64" in f64.reason


def test_rules_tf32_channels_last_and_its_workspace(device):
    """TF32 on a large layer: the forward and the weight gradient run conv_tf32_nhwc, the input
    gradient its phases through it; the pre-pass buffers count in ``workspace_bytes``; with a
    bound they do not fit, the 64-wide conv_tf32 tiles, and the reason says why."""
    pre = cuda_conv.nhwc_workspace_bytes(R3_DIL)
    fwd = _choose("forward", R3_DIL, precision="tf32")
    assert fwd.get("kernel").startswith("fc::conv_tf32_nhwc<128, ")
    assert fwd.get("workspace_bytes") >= pre and "pre-pass" in fwd.reason
    dgrad = _choose("input_grad", R3_DIL, precision="tf32")
    assert dgrad.name == "implicit_gemm_phases" and len(dgrad.get("phases")) == 1
    assert all(k.startswith("fc::conv_tf32_nhwc<") for k in dgrad.get("kernels"))
    wgrad = _choose("weight_grad", R3_DIL, precision="tf32")
    assert wgrad.get("kernel").startswith("fc::conv_tf32_nhwc<")
    assert wgrad.get("tile")[-1] == "nhwc" and wgrad.get("splits") > 1
    assert wgrad.get("workspace_bytes") >= cuda_conv.nhwc_wgrad_workspace_bytes(R3_DIL)
    small = pre - 1
    for op in ("forward", "weight_grad"):
        algo = _choose(op, R3_DIL, precision="tf32", workspace=small)
        assert algo.get("kernel").startswith("fc::conv_tf32<") and algo.get("tile")[0] == 64
        assert "workspace" in algo.reason and algo.get("workspace_bytes") <= small
    algo = _choose("input_grad", R3_DIL, precision="tf32", workspace=small)
    assert algo.name == "implicit_gemm_phases" and algo.get("workspace_bytes") <= small
    assert all(k.startswith("fc::conv_tf32<0, 64, ") for k in algo.get("kernels"))


def test_rules_tf32_falls_back_loudly_before_sm80(device):
    device(capability=(7, 5))
    algo = _choose("forward", R3_DIL, precision="tf32")
    assert algo.name == "implicit_gemm" and "sm_75" in algo.reason


def test_rules_1x1_uses_cublas_unless_cupy_tf32(device, monkeypatch):
    g = _geom((8, 256, 56, 56), (64, 256, 1, 1))
    assert _choose("forward", g).name == "gemm_1x1"
    assert _choose("forward", g, precision="tf32").name == "implicit_gemm_tf32"
    monkeypatch.setenv("CUPY_TF32", "1")
    assert _choose("forward", g).name == "implicit_gemm"  # strict must stay strict
    strided = _geom((8, 256, 56, 56), (64, 256, 1, 1), stride=2)
    monkeypatch.delenv("CUPY_TF32")
    assert _choose("forward", strided).name == "implicit_gemm"


def test_rules_depthwise(device):
    g = _geom((8, 144, 28, 28), (144, 1, 3, 3), padding=1, groups=144)
    for op in ("forward", "input_grad", "weight_grad"):
        assert _choose(op, g).name == "depthwise"
    big = _geom((1, 2, 400, 400), (2, 1, 31, 31), stride=3, dilation=3, groups=2)
    assert _choose("forward", big, np.float64).name == "implicit_gemm"
    why = _choose("forward", g).reason
    assert "two-stage cp.async" in why
    assert f"{cuda_conv.depthwise_smem_bytes(g, np.float32)} B" in why


def test_rules_tile_model():
    """Large problems get the largest tile; narrow or small ones smaller tiles."""
    tiles = cuda_conv.SIMT_TILES["float32"]
    assert rules.pick_tile(10**6, 512, 1, tiles, 132) == SimtTile(128, 128, 8, 8, 8)
    assert rules.pick_tile(200704, 64, 1, tiles, 132) == SimtTile(128, 64, 8, 8, 8)
    assert rules.pick_tile(524288, 32, 1, tiles, 132) == SimtTile(128, 32, 8, 8, 4)
    assert rules.pick_tile(84, 4, 1, tiles, 132) == SimtTile(32, 32, 8, 4, 4)


def test_rules_name_the_vector_a_kernel_for_grouped_1x1(device):
    """Grouped 1x1 layers (plain ones go to cuBLAS) get the 16-byte A loader in the forward and
    input gradient, and the plan's kernel is the one an aligned launch runs."""
    g = _geom((8, 64, 28, 28), (128, 16, 1, 1), groups=4)
    x, w, b, y = _arrays(g)
    for op, mode, a, bb, out in (("forward", FPROP, x, w, y), ("input_grad", DGRAD, y, w, x)):
        algo = _choose(op, g)
        assert algo.name == "implicit_gemm" and "16-byte vectors" in algo.reason
        tile = SimtTile(*algo.get("tile"))
        spec = cuda_conv.implicit_gemm_launch(mode, a, bb, None, out, g, tile,
                                              algo.get("splits", 1))
        assert spec.kernel == algo.get("kernel") and spec.kernel.count(",") == 7
    assert "16-byte" not in _choose("weight_grad", g).reason
    assert "16-byte" not in _choose("forward", _geom((8, 64, 28, 28), (128, 16, 3, 3),
                                                     padding=1, groups=4)).reason


def test_phase_plan_names_the_vector_a_kernel_its_launch_runs(device):
    """A grouped 1x1 stride-2 input gradient: its one reached phase is a grouped 1x1 unit-stride
    forward conv, which gets the 16-byte A loader; the plan names the kernel the launch runs."""
    from fastconv.kernels import cuda_dgrad  # noqa: PLC0415

    g = _geom((8, 64, 28, 28), (128, 16, 1, 1), stride=2, groups=4)
    algo, _ = rules.phased_dgrad_plan(g, np.dtype(np.float32), False, 2**30, 132)
    (ph, pw, name, tile, splits), = algo.get("phases")
    sub = cuda_dgrad.phases(g)[ph * 2 + pw].geom
    gy = np.zeros(g.output_shape, np.float32)
    w = np.zeros(sub.weight_shape, np.float32)
    out = np.zeros(sub.output_shape, np.float32)
    spec = cuda_conv.implicit_gemm_launch(FPROP, gy, w, None, out, sub, SimtTile(*tile), splits)
    assert spec.kernel.count(",") == 7 and algo.get("kernels") == (spec.kernel,)


def test_rules_wave_quantisation():
    """Blocks per SM come in waves of the tile's resident count; a partial wave is slower per
    block (rules.PARTIAL_WAVE_EFFICIENCY)."""
    eff = rules.PARTIAL_WAVE_EFFICIENCY
    assert rules.wave_units(196, 132, 2) == 2          # r3x3s2_28 at 128x128: B = 2, one wave
    assert rules.wave_units(264, 132, 2) == 2
    assert rules.wave_units(100, 132, 2) == pytest.approx(1 / eff)   # one block on an SM
    assert rules.wave_units(265, 132, 2) == pytest.approx(2 + 1 / eff)
    assert rules.wave_units(265, 132, 1) == 3
    assert cuda_conv.resident_blocks(SimtTile(128, 128, 8, 8, 8), FPROP) == 1
    assert cuda_conv.resident_blocks(SimtTile(128, 64, 8, 8, 8), FPROP) == 2  # 128 threads
    assert cuda_conv.resident_blocks(SimtTile(128, 32, 8, 8, 4), FPROP) == 4
    assert cuda_conv.resident_blocks(SimtTile(32, 32, 8, 4, 4), FPROP) == 8
    for mode in (FPROP, DGRAD, WGRAD):  # conv_tf32: 512 / threads in every mode
        assert cuda_conv.resident_blocks(Tf32Tile(64, 64, 8, 2, 2), mode) == 4
    assert cuda_conv.resident_blocks(Tf32Tile(128, 128, 16, 2, 4, "nhwc"), FPROP) == 2
    assert cuda_conv.resident_blocks(Tf32Tile(128, 64, 16, 2, 2, "nhwc"), FPROP) == 3  # smem


def test_rules_weight_grad_slices_within_workspace(device):
    algo = _choose("weight_grad", R3_DIL)
    slices = algo.get("splits")
    assert slices > 1 and algo.get("workspace_bytes") == slices * 64 * 64 * 9 * 4
    small = _choose("weight_grad", R3_DIL, workspace=3 * 64 * 64 * 9 * 4)
    assert small.get("splits") <= 3 and small.get("workspace_bytes") <= 3 * 64 * 64 * 9 * 4
    none = _choose("weight_grad", R3_DIL, workspace=1)
    assert none.get("splits") == 1 and none.get("workspace_bytes") == 0


def test_rules_slice_small_forward_gemms(device):
    """A GEMM with too few tiles for the device gets reduction slices; big ones do not."""
    small = _geom((64, 512, 7, 7), (512, 512, 3, 3), padding=2, dilation=2)  # 100 128x128 tiles
    algo = _choose("forward", small)
    assert algo.get("splits") > 1 and "slices" in algo.reason
    out_bytes = 64 * 512 * 7 * 7 * 4
    assert algo.get("workspace_bytes") == algo.get("splits") * out_bytes
    assert _choose("forward", small, workspace=out_bytes).get("splits") == 1
    grad = _choose("input_grad", small)
    assert grad.get("workspace_bytes") == (0 if grad.get("splits") == 1
                                           else grad.get("splits") * out_bytes)
    assert _choose("forward", R3_DIL).get("splits") == 1               # 1568 tiles
    strided = _geom((64, 128, 28, 28), (256, 128, 3, 3), stride=2, padding=1)
    assert _choose("forward", strided).get("splits") == 1  # short reduction: traffic wins
    tile = SimtTile(128, 128, 8, 8, 8)
    assert rules.gemm_splits(100, 4608, tile, 132, 1, 6_422_528, 2**28) > 1
    assert rules.gemm_splits(100, 4608, tile, 132, 65535, 6_422_528, 2**28) == 1  # grid z
    assert rules.gemm_splits(1000, 4608, tile, 132, 1, 6_422_528, 2**28) == 1


def test_rules_bias_grad_and_hinge(device):
    assert _choose("bias_grad", R3).name == "reduce"
    algo = rules.choose("hinge", None, np.dtype(np.float32), precision="fp32",
                        workspace_bytes=0, scores_shape=(65536, 1000))
    assert algo.name == "hinge_rows" and (algo.get("group"), algo.get("items")) == (32, 32)
    assert algo.get("kernel") == "fc::hinge_rows<float, 32, 32>"
    algo = rules.choose("hinge", None, np.dtype(np.float64), precision="tf32",
                        workspace_bytes=0, scores_shape=(1048576, 10))
    assert (algo.get("group"), algo.get("items")) == (4, 4) and algo.get("precision") == "fp64"


def test_rules_without_a_device_assume_a_typical_one(monkeypatch):
    monkeypatch.setattr(cuda_build, "device_info_or_none", lambda: None)
    algo = _choose("forward", R3_DIL, precision="tf32")
    assert algo.name == "implicit_gemm_tf32"
    assert isinstance(algo, Algo)


def test_importing_the_backend_needs_no_cupy():
    """fastconv and its cuda modules import without CuPy; nothing imports it eagerly."""
    code = ("import sys; import fastconv, fastconv.kernels.cuda, fastconv.dispatch.cuda; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
