"""The fused Winograd kernels (kernels/winograd.cu): host emulation, launch geometry, compiled
resources, dispatch rules, and (``gpu`` mark) the real thing through CuPy.

No GPU here: the kernel source runs through the host emulation of tests/cuda_emu.h (blocks one
after another, a block's threads as OS threads with real barriers) against the float64 NumPy
reference, with every output and the filter workspace starting as NaN so that an element the
kernels never write fails the comparison. ptxas (through NVRTC) reports registers and spills.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastconv import reference
from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.dispatch import cuda as rules
from fastconv.kernels import cuda as backend
from fastconv.kernels import cuda_build, cuda_conv, cuda_winograd
from fastconv.kernels.cuda_conv import DGRAD, FPROP
from fastconv.kernels.cuda_winograd import (ERROR_BOUND, TF32_ERROR_BOUND, TF32_TILES, TILES,
                                            WGRAD_TILES)

from conftest import CASES, rel_err
from test_cuda_emulated import _problem as _emu_problem
from test_cuda_emulated import _run  # (backend result, float64 reference) of one op

F32 = np.dtype(np.float32)
# The shared case list's 3x3, stride-1, undilated cases: the layers these kernels compute.
WINO_CASES = [c for c in CASES if c.R == 3 and c.S == 3 and c.stride == 1 and c.dilation == 1]
OPS = ("forward", "input_grad")
ALL_OPS = OPS + ("weight_grad",)


def _algo(m: int, splits: int = 3, precision: str = "fp32") -> Algo:
    return Algo("winograd", (("m", m), ("splits", splits), ("precision", precision)))


def _problem(geom, seed=0):
    """Seeded float32 ``x, weight, bias, grad_output`` (test_cuda_emulated's helper)."""
    return _emu_problem(geom, np.float32, seed)


# ---------------------------------------------------------------------------------------------
# Host emulation of winograd.cu
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emu_lib():
    """The emulation library of winograd.cu alone, built by tests/cuda_emu.py's own machinery
    (its source list and instantiation table narrowed to this file)."""
    cuda_emu = pytest.importorskip("cuda_emu")
    problem = cuda_emu.compiler_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"host emulation unavailable in CI: {problem}")
        pytest.skip(f"host emulation unavailable: {problem}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_emu, "SOURCES", (cuda_winograd.SOURCE,))
        mp.setattr(cuda_emu, "all_names", cuda_winograd.all_kernel_names)
        lib = cuda_emu.build.__wrapped__()  # not the cached library of the other .cu files
    return cuda_emu, lib


@pytest.fixture()
def emu(emu_lib, monkeypatch):
    """``cuda_emu`` running winograd.cu's kernels for the duration of a test."""
    cuda_emu, lib = emu_lib
    monkeypatch.setattr(cuda_emu, "build", lambda: lib)
    return cuda_emu


@pytest.fixture()
def ex(emu):
    return emu.executor()


@pytest.fixture(autouse=True)
def _no_device(monkeypatch):
    """The rules see the typical device they assume without a GPU."""
    monkeypatch.setattr(cuda_build, "device_info_or_none", lambda: None)


@pytest.mark.parametrize("m", cuda_winograd.TILE_SIZES)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("case", WINO_CASES, ids=[c.name for c in WINO_CASES])
def test_case_list(ex, case, op, m):
    """Every 3x3 stride-1 case of the shared list, both tile sizes, the three conv ops (the
    weight gradient in up to 3 reduction slices)."""
    x, w, b = case.arrays(np.float32)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    gy = _problem(geom, seed=1)[3]
    out, ref = _run(ex, op, geom, _algo(m), x, w, b, gy)
    assert out.dtype == np.float32
    assert rel_err(out, ref) < ERROR_BOUND[m]


# Several blocks in x (tiles), y (output channels) and z (groups); input channels that leave a
# partial last chunk; output channels that are not a multiple of 4 (padded U) nor of a block;
# a plane whose tiles overhang the output; top padding 3 (DGRAD offset 2 - 3 = -1), uneven
# left/right padding.
MULTI = conv_geometry((2, 2 * 35, 11, 10), (2 * 37, 35, 3, 3), 1, ((3, 1), (0, 2)), 1, 2)


@pytest.mark.parametrize("m", cuda_winograd.TILE_SIZES)
@pytest.mark.parametrize("op", ALL_OPS)
def test_multi_block(ex, op, m):
    x, w, b, gy = _problem(MULTI)
    if op == "weight_grad":
        grid = cuda_winograd.wgrad_launch(x, gy, None, MULTI, WGRAD_TILES[m], 3).grid
        assert grid[0] > 1 and grid[1] > 1 and grid[2] == 2 * 3, grid
    else:
        mode = FPROP if op == "forward" else DGRAD
        grid = cuda_winograd.conv_launch(mode, x if mode == FPROP else gy, None, b, None,
                                         MULTI, TILES[m]).grid
        assert grid[0] > 1 and grid[1] > 1 and grid[2] == 2, grid
    out, ref = _run(ex, op, MULTI, _algo(m), x, w, b if op == "forward" else None, gy)
    assert rel_err(out, ref) < ERROR_BOUND[m]


def _draw_problem(data, channels: int, side: int):
    """A random 3x3 stride-1 geometry (up to `channels` per group in and out, planes up to
    `side`, 0 to 3 padding per side so that DGRAD offsets 2 - pad go negative, 1 to 3 groups)
    and its seeded arrays; None when the kernel does not fit the padded input (the argument
    checks reject that)."""
    groups = data.draw(st.integers(1, 3), "groups")
    cg, kg = data.draw(st.integers(1, channels), "cg"), data.draw(st.integers(1, channels), "kg")
    n, h, w = (data.draw(st.integers(1, 2), "N"), data.draw(st.integers(1, side), "H"),
               data.draw(st.integers(1, side), "W"))
    pad = tuple(tuple(data.draw(st.integers(0, 3)) for _ in range(2)) for _ in range(2))
    if h + sum(pad[0]) < 3 or w + sum(pad[1]) < 3:
        return None
    geom = conv_geometry((n, cg * groups, h, w), (kg * groups, cg, 3, 3), 1, pad, 1, groups)
    return (geom,) + _problem(geom, seed=data.draw(st.integers(0, 99), "seed"))


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_geometries(ex, data):
    """Random problems (`_draw_problem`) and weight-gradient slices through the three ops and
    both tile sizes."""
    problem = _draw_problem(data, 11, 12)
    if problem is None:
        return
    geom, x, wt, b, gy = problem
    m = data.draw(st.sampled_from(cuda_winograd.TILE_SIZES), "m")
    splits = data.draw(st.integers(1, 4), "splits")
    for op in ALL_OPS:
        out, ref = _run(ex, op, geom, _algo(m, splits), x, wt, b, gy)
        assert rel_err(out, ref) < ERROR_BOUND[m], (op, geom)


@pytest.mark.parametrize("m", cuda_winograd.TILE_SIZES)
def test_error_bound_at_layer_depth(ex, m):
    """A 256-channel reduction (rounding grows with it) stays inside the documented bound,
    with the margin measured when the kernel was written (F(2x2) up to 7e-7, F(4x4) up to
    3.4e-6); likewise the weight gradient's sum over tiles."""
    geom = conv_geometry((1, 256, 8, 8), (32, 256, 3, 3), 1, 1, 1, 1)
    x, w, b, gy = _problem(geom, seed=3)
    for op in OPS:
        out, ref = _run(ex, op, geom, _algo(m), x, w, b, gy)
        err = rel_err(out, ref)
        assert err < ERROR_BOUND[m], (op, err)
        assert err < (1e-6 if m == 2 else 5e-6), (op, err)
    # the weight gradient sums over tiles: 1024 tiles (F(2x2)) or 256 (F(4x4)) in one slice
    geom = conv_geometry((4, 16, 32, 32), (32, 16, 3, 3), 1, 1, 1, 1)
    x, w, b, gy = _problem(geom, seed=3)
    out, ref = _run(ex, "weight_grad", geom, _algo(m, 1), x, w, b, gy)
    err = rel_err(out, ref)
    assert err < ERROR_BOUND[m] and err < (2e-6 if m == 2 else 5e-6), err  # 9.7e-7, 3.3e-6


# ---------------------------------------------------------------------------------------------
# TF32 variant (winograd_conv_tf32): forward and input gradient, F(2x2)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", WINO_CASES, ids=[c.name for c in WINO_CASES])
def test_tf32_case_list(ex, case, op):
    """The shared 3x3 stride-1 cases through the tensor-core kernel (emulated mma.sync with
    the PTX fragment layout) within the documented TF32 bound, and clearly less exact than
    the strict kernel (the operands really are rounded)."""
    x, w, b = case.arrays(np.float32)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    gy = _problem(geom, seed=1)[3]
    for m in TF32_TILES:
        out, ref = _run(ex, op, geom, _algo(m, precision="tf32"), x, w, b, gy)
        err = rel_err(out, ref)
        assert out.dtype == np.float32 and err < TF32_ERROR_BOUND[m], err
        assert err > 1e-5, err


def test_tf32_multi_block_and_depth(ex):
    """Several blocks in x, y and z with partial chunks and padded U (MULTI), and a
    256-channel reduction: the measured error (4.8e-4 to 5.1e-4 when written) stays within the
    bound with margin (the depth reduction: 256 channels forward, 32 filters for the input
    gradient); bits repeat."""
    geom = MULTI
    x, w, b, gy = _problem(geom)
    spec = cuda_winograd.conv_launch(FPROP, x, None, b, None, geom, TF32_TILES[2])
    assert spec.grid[0] > 1 and spec.grid[1] > 1 and spec.grid[2] == 2, spec.grid
    assert spec.block == (128, 1, 1) and spec.kernel == "fc::winograd_conv_tf32<2, 16, 16, 4>"
    for op in OPS:
        out, ref = _run(ex, op, geom, _algo(2, precision="tf32"), x, w,
                        b if op == "forward" else None, gy)
        assert rel_err(out, ref) < TF32_ERROR_BOUND[2], op
    deep = conv_geometry((1, 256, 4, 8), (32, 256, 3, 3), 1, 1, 1, 1)
    x, w, b, gy = _problem(deep, seed=3)
    for op in OPS:
        out, ref = _run(ex, op, deep, _algo(2, precision="tf32"), x, w, b, gy)
        assert rel_err(out, ref) < 1e-3, (op, rel_err(out, ref))
    again, _ = _run(ex, "input_grad", deep, _algo(2, precision="tf32"), x, w, b, gy)
    np.testing.assert_array_equal(out, again)


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tf32_random_geometries(ex, data):
    """Random problems (`_draw_problem`, up to 19 channels: partial 8-channel chunks and
    16-channel blocks) through the TF32 kernel's forward pass and input gradient."""
    problem = _draw_problem(data, 19, 10)
    if problem is None:
        return
    geom, x, wt, b, gy = problem
    for op in OPS:
        out, ref = _run(ex, op, geom, _algo(2, precision="tf32"), x, wt, b, gy)
        assert rel_err(out, ref) < TF32_ERROR_BOUND[2], (op, geom)


def test_tf32_filter_transform_is_rounded(ex, emu):
    """winograd_filter<M, MODE, 1> stores U rounded to TF32 (low 13 mantissa bits zero), the
    same values as the strict transform rounded to nearest."""
    geom = conv_geometry((1, 6, 5, 5), (10, 3, 3, 3), 1, 1, 1, 2)
    w = _problem(geom)[1]
    for mode in (FPROP, DGRAD):
        shape = cuda_winograd.u_shape(geom, mode, 2)
        exact, rounded = (np.full(shape, np.nan, np.float32) for _ in range(2))
        emu.run(cuda_winograd.filter_launch(w, exact, geom, 2, mode))
        emu.run(cuda_winograd.filter_launch(w, rounded, geom, 2, mode, tf32=True))
        assert not (rounded.view(np.uint32) & 0x1FFF).any()
        bits = exact.view(np.uint32)
        want = ((bits + 0x1000) & 0xFFFFE000).view(np.float32)
        np.testing.assert_array_equal(rounded, want)


@pytest.mark.parametrize("m", cuda_winograd.TILE_SIZES)
def test_weight_grad_long_reduction(ex, m):
    """The weight gradient sums over N * tiles: many chunks per slice, several slices."""
    geom = conv_geometry((6, 8, 20, 20), (8, 8, 3, 3), 1, 1, 1, 1)  # 600 / 150 tiles
    x, w, b, gy = _problem(geom, seed=4)
    ref = reference.conv2d_weight_grad(x, gy, geom)
    for splits in (1, 5):
        out = backend.weight_grad(ex, x, gy, geom, _algo(m, splits))
        assert rel_err(out, ref) < ERROR_BOUND[m], splits


def test_bit_identical_repeats(ex):
    geom = conv_geometry((1, 20, 9, 9), (12, 20, 3, 3), 1, 1, 1, 1)
    x, w, b, gy = _problem(geom)
    for m in cuda_winograd.TILE_SIZES:
        for op in ALL_OPS:
            a = _run(ex, op, geom, _algo(m), x, w, b, gy)[0]
            c = _run(ex, op, geom, _algo(m), x, w, b, gy)[0]
            np.testing.assert_array_equal(a, c)


def test_batch_chunks_for_32bit_tile_indices(ex, monkeypatch):
    """Batches are cut so that tile indices stay 32-bit; the limit is lowered to force it."""
    geom = conv_geometry((5, 6, 7, 6), (8, 6, 3, 3), 1, 1, 1, 1)  # F(2x2): 4*3 tiles/image
    monkeypatch.setattr(cuda_conv, "ROW_LIMIT", 2 * 12 + 5)  # two images per launch
    launches = []
    real_run = ex.run
    counting = dataclasses.replace(ex, run=lambda spec: (launches.append(spec), real_run(spec)))
    x, w, b, gy = _problem(geom)
    out, ref = _run(counting, "forward", geom, _algo(2), x, w, b, gy)
    assert rel_err(out, ref) < ERROR_BOUND[2]
    convs = [s for s in launches if "winograd_conv" in s.kernel]
    assert [int(s.args[4]) for s in convs] == [2, 2, 1]  # N of each launch
    launches.clear()
    out, ref = _run(counting, "weight_grad", geom, _algo(2, 2), x, w, b, gy)
    assert rel_err(out, ref) < ERROR_BOUND[2]
    assert [int(s.args[3]) for s in launches] == [2, 2, 1]
    assert [s.grid[2] for s in launches] == [2, 2, 2]  # 24 and 12 tiles, 4-tile chunks


def test_unwritten_outputs_fail(ex, emu):
    """A grid one block short leaves NaN behind, which the comparison rejects."""
    geom = MULTI
    x, w, b, _ = _problem(geom)
    u = np.full(cuda_winograd.u_shape(geom, FPROP, 2), np.nan, np.float32)
    emu.run(cuda_winograd.filter_launch(w, u, geom, 2, FPROP))
    assert not np.isnan(u).any()
    y = np.full(geom.output_shape, np.nan, np.float32)
    spec = cuda_winograd.conv_launch(FPROP, x, u, b, y, geom, TILES[2])
    emu.run(dataclasses.replace(spec, grid=(spec.grid[0] - 1,) + spec.grid[1:]))
    assert np.isnan(y).any()
    emu.run(spec)
    assert rel_err(y, reference.conv2d_forward(x, w, b, geom)) < ERROR_BOUND[2]


def test_filter_transform_matches_numpy(ex, emu):
    """U = G f G^T laid out (groups, A*A, Cig, Cogp), zero filters in the padding; DGRAD's
    filter is the rotated, channel-transposed one."""
    geom = conv_geometry((1, 6, 5, 5), (10, 3, 3, 3), 1, 1, 1, 2)  # Cg 3, Kg 5 -> padded 8
    w = _problem(geom)[1]
    G = {2: np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
         4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])}
    for m in cuda_winograd.TILE_SIZES:
        for mode in (FPROP, DGRAD):
            shape = cuda_winograd.u_shape(geom, mode, m)
            u = np.full(shape, np.nan, np.float32)
            emu.run(cuda_winograd.filter_launch(w, u, geom, m, mode))
            wg = w.astype(np.float64).reshape(2, 5, 3, 3, 3)  # (g, k, c, r, s)
            f = (wg.transpose(0, 2, 1, 3, 4) if mode == FPROP  # (g, c, k, r, s)
                 else wg[..., ::-1, ::-1])                    # (g, k, c, r, s) rotated
            want = np.einsum("ir,gcbrs,js->gijcb", G[m], f, G[m])
            want = want.reshape(2, (m + 2) ** 2, *want.shape[3:])
            cog = want.shape[3]
            assert shape[3] == -(-cog // 4) * 4
            np.testing.assert_allclose(u[..., :cog], want, rtol=1e-6, atol=1e-6)
            assert not u[..., cog:].any()


# ---------------------------------------------------------------------------------------------
# Launch geometry and instantiations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", cuda_winograd.TILE_SIZES)
def test_tiles_satisfy_kernel_constraints(m):
    """winograd.cu's static_asserts mirrored, plus CUDA's limits."""
    t = TILES[m]
    assert t.m == m and t.tm % 4 == 0 and t.tn % 4 == 0
    assert t.threads <= 1024 and t.threads % 32 == 0
    uvec = t.alpha ** 2 * t.chunk * t.cols // 4
    assert uvec % t.threads == 0 and (t.threads * 4) % (t.chunk * t.cols) == 0
    assert t.smem_bytes <= cuda_conv.SMEM_LIMIT
    wt = WGRAD_TILES[m]
    assert wt.m == m and wt.tm % 4 == 0 and wt.tn % 4 == 0
    assert wt.threads <= 1024 and wt.threads % 32 == 0
    assert wt.smem_bytes <= cuda_conv.SMEM_LIMIT
    if m in TF32_TILES:  # winograd_conv_tf32's static_asserts
        tt = TF32_TILES[m]
        assert tt.m == m and tt.alpha ** 2 % tt.warps == 0
        assert tt.rows % 16 == 0 and tt.cols % 8 == 0 and tt.chunk == 8
        assert all((ld + 8) % 32 in (8, 24) for ld in (tt.rows, tt.cols))
        assert tt.smem_bytes <= cuda_conv.SMEM_LIMIT
        uvec = tt.alpha ** 2 * tt.chunk * tt.cols // 4
        assert uvec % tt.threads == 0 and (tt.threads * 4) % (tt.chunk * tt.cols) == 0


def test_kernel_names():
    names = cuda_winograd.all_kernel_names()["winograd.cu"]
    assert "fc::winograd_conv<2, 4, 4, 4, 8, 8>" in names
    assert "fc::winograd_conv<4, 2, 2, 4, 8, 8>" in names
    assert {f"fc::winograd_filter<{m}, {mode}, 0>" for m in (2, 4) for mode in (0, 1)
            } <= set(names)
    assert {"fc::winograd_filter<2, 0, 1>", "fc::winograd_filter<2, 1, 1>",
            "fc::winograd_conv_tf32<2, 16, 16, 4>"} <= set(names)
    assert "fc::winograd_wgrad<2, 4, 4, 4, 8, 8>" in names
    assert "fc::winograd_wgrad<4, 2, 2, 4, 8, 8>" in names


def test_conv_launch_geometry_and_arguments():
    geom = conv_geometry((8, 64, 56, 56), (96, 32, 3, 3), 1, ((1, 2), (0, 1)), 1, 2)
    x, w, b, gy = _problem(conv_geometry((1, 1, 3, 3), (1, 1, 3, 3), 1, 0, 1, 1))  # stand-ins
    tile = TILES[4]
    spec = cuda_winograd.conv_launch(FPROP, x, w, b, gy, geom, tile)
    P, Q = geom.P, geom.Q  # 57, 55
    tiles = geom.N * -(-P // 4) * -(-Q // 4)
    assert spec.grid == (-(-tiles // 16), -(-48 // 32), 2)
    assert spec.block == (288, 1, 1) and spec.shared_mem == 0
    assert spec.kernel == "fc::winograd_conv<4, 2, 2, 4, 8, 8>"
    assert spec.args[:4] == (x, w, b, gy)
    assert [int(a) for a in spec.args[4:]] == [8, 64, 56, 56, 96, P, Q, 1, 0, 2]
    assert all(a.dtype == np.int32 for a in spec.args[4:])
    # the input gradient: grad_output -> grad_input, padding 2 - pt, 2 - pl, no bias
    spec = cuda_winograd.conv_launch(DGRAD, gy, w, None, x, geom, TILES[2])
    assert spec.args[2] is cuda_build.NULL
    assert [int(a) for a in spec.args[4:]] == [8, 96, P, Q, 64, 56, 56, 1, 2, 2]
    assert spec.grid == (-(-8 * 28 * 28 // 32), 1, 2) and spec.block == (256, 1, 1)


def test_filter_launch_geometry():
    geom = conv_geometry((1, 12, 5, 5), (30, 4, 3, 3), 1, 1, 1, 3)  # Cg 4, Kg 10
    w = np.zeros(geom.weight_shape, np.float32)
    spec = cuda_winograd.filter_launch(w, w, geom, 4, FPROP)
    assert cuda_winograd.u_shape(geom, FPROP, 4) == (3, 36, 4, 12)
    assert cuda_winograd.u_shape(geom, DGRAD, 4) == (3, 36, 10, 4)
    assert spec.grid == (1, 3, 1) and spec.block == (256, 1, 1)  # (c, k) pairs x groups
    assert spec.kernel == "fc::winograd_filter<4, 0, 0>"
    mul, shift = cuda_conv.fast_divisor(12)  # c = e / Cogp as a FastDiv
    assert [int(a) for a in spec.args[2:]] == [30, 4, 3, mul, shift]
    assert spec.args[5].dtype == np.uint32 and spec.args[6].dtype == np.int32
    big = conv_geometry((1, 600, 5, 5), (600, 600, 3, 3), 1, 1, 1, 1)
    assert cuda_winograd.filter_launch(w, w, big, 2, DGRAD).grid == (-(-600 * 600 // 256), 1, 1)
    assert cuda_winograd.workspace_bytes(geom, FPROP, 4) == 3 * 36 * 4 * 12 * 4


def test_launch_rejects_what_it_cannot_index(monkeypatch):
    geom = conv_geometry((4, 8, 8, 8), (8, 8, 3, 3), 1, 1, 1, 1)
    monkeypatch.setattr(cuda_conv, "ROW_LIMIT", 10)
    with pytest.raises(ValueError, match="split the batch"):
        cuda_winograd.conv_launch(FPROP, None, None, None, None, geom, TILES[2])
    with pytest.raises(ValueError, match="split the batch"):
        cuda_winograd.wgrad_launch(None, None, None, geom, WGRAD_TILES[2])
    with pytest.raises(ValueError, match="mode"):
        cuda_winograd.plane(geom, 7)


# ---------------------------------------------------------------------------------------------
# Compiled resources: ptxas through NVRTC, no spills (the kernel report's gate)
# ---------------------------------------------------------------------------------------------
def _ptxas_report(arch: str) -> dict[str, tuple[int, int, int]]:
    """``{mangled entry: (registers, stack bytes, spill store bytes)}`` from ptxas -v."""
    if os.environ.get("CI"):
        from cuda.bindings import nvrtc
    else:
        nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings not installed")
    names = cuda_winograd.all_kernel_names()["winograd.cu"]
    _, prog = nvrtc.nvrtcCreateProgram(cuda_build.load_source("winograd.cu").encode(),
                                       b"winograd.cu", 0, [], [])
    try:
        for name in names:
            nvrtc.nvrtcAddNameExpression(prog, name.encode())
        options = cuda_build.NVRTC_OPTIONS + cuda_build.CUPY_ADDED_OPTIONS + (
            f"--gpu-architecture={arch}", "--ptxas-options=-v")
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace")
        assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    report = {}
    for block in re.split(r"Compiling entry function ", log)[1:]:
        entry = re.match(r"'(\w+)'", block).group(1)
        stack = int(re.search(r"(\d+) bytes stack frame", block).group(1))
        spill = int(re.search(r"(\d+) bytes spill stores", block).group(1))
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        report[entry] = (regs, stack, spill)
    return report


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_spills(arch):
    report = _ptxas_report(arch)
    assert len(report) == len(cuda_winograd.all_kernel_names()["winograd.cu"])
    for entry, (regs, stack, spill) in report.items():
        assert spill == 0 and stack == 0, (entry, regs, stack, spill)
        # the register cap of __launch_bounds__: 2 blocks/SM up to 256 threads, else 1
        threads = next((t.threads for t in (*TILES.values(), *WGRAD_TILES.values())
                        if f"ILi{t.m}E" in entry and "filter" not in entry), 256)
        cap = 65536 // (threads * (2 if threads <= 256 else 1))
        assert regs <= min(255, cap), (entry, regs)


# ---------------------------------------------------------------------------------------------
# Dispatch rules
# ---------------------------------------------------------------------------------------------
def _choose(op, geom, dtype=F32, precision="fp32", workspace=256 * 2**20):
    return rules.choose(op, geom, np.dtype(dtype), precision=precision,
                        workspace_bytes=workspace)


R3X3_14 = conv_geometry((64, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, 1)
R3X3_56 = conv_geometry((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1, 1)


@pytest.mark.parametrize("geom", [R3X3_14, R3X3_56], ids=["r3x3_14", "r3x3_56"])
@pytest.mark.parametrize("op", OPS)
def test_rules_choose_winograd_for_3x3_stride1(geom, op):
    algo = _choose(op, geom)
    assert algo.name == "winograd" and algo.get("m") == 4
    assert algo.get("kernel") == cuda_winograd.conv_kernel_name(TILES[4])
    assert algo.get("error_bound") == ERROR_BOUND[4]
    assert "Winograd F(4x4, 3x3)" in algo.reason and "strict fp32" in algo.reason
    mode = FPROP if op == "forward" else DGRAD
    assert algo.get("workspace_bytes") == cuda_winograd.workspace_bytes(geom, mode, 4)


@pytest.mark.parametrize("geom", [R3X3_14, R3X3_56], ids=["r3x3_14", "r3x3_56"])
def test_rules_weight_grad_slices(geom):
    algo = _choose("weight_grad", geom)
    assert algo.name == "winograd" and algo.get("m") == 4
    tile = WGRAD_TILES[4]
    assert algo.get("kernel") == cuda_winograd.wgrad_kernel_name(tile)
    tiles = geom.N * cuda_winograd.tiles_per_image(geom, 4)
    slices = algo.get("splits")
    # no slice sums more than WINOGRAD_MAX_SUM tiles (the error bound); about two blocks per SM
    slices_made, t_split = cuda_conv.split_reduction(tiles, slices, tile.chunk)
    assert slices_made == slices and t_split <= rules.WINOGRAD_MAX_SUM[4]
    blocks = -(-geom.C // tile.rows) * -(-geom.K // tile.cols)
    assert blocks * slices >= rules.ASSUMED_SM_COUNT
    assert algo.get("workspace_bytes") == slices * geom.K * geom.C * 9 * 4
    assert f"in {slices} slices" in algo.reason
    # a workspace too small for the slices the error bound needs: F(2x2), then the direct kernel
    need4 = -(-tiles // rules.WINOGRAD_MAX_SUM[4])
    small = _choose("weight_grad", geom, workspace=need4 * geom.K * geom.C * 9 * 4 - 1)
    assert small.name != "winograd" or small.get("m") == 2


def test_rules_tf32_before_sm80_falls_back_to_strict_winograd(monkeypatch):
    device = cuda_build.DeviceInfo(0, 46, (7, 5))
    monkeypatch.setattr(cuda_build, "device_info_or_none", lambda: device)
    algo = _choose("forward", R3X3_14, precision="tf32")
    assert algo.name == "winograd" and "sm_75" in algo.reason and "strict fp32" in algo.reason


@pytest.mark.parametrize("geom", [R3X3_14, R3X3_56], ids=["r3x3_14", "r3x3_56"])
@pytest.mark.parametrize("op", OPS)
def test_rules_tf32_winograd(geom, op):
    """precision="tf32" on sm_80+: the F(2x2) tensor-core kernel for the forward pass and the
    input gradient, its error bound in the reason; the weight gradient keeps the TF32
    implicit GEMM."""
    algo = _choose(op, geom, precision="tf32")
    assert algo.name == "winograd" and algo.get("m") == 2 and algo.get("precision") == "tf32"
    assert algo.get("kernel") == cuda_winograd.conv_kernel_name(TF32_TILES[2])
    mode = FPROP if op == "forward" else DGRAD
    assert algo.get("filter_kernel") == cuda_winograd.filter_kernel_name(2, mode, True)
    assert algo.get("error_bound") == TF32_ERROR_BOUND[2] <= 5e-3
    assert "TF32 tensor cores" in algo.reason and f"{TF32_ERROR_BOUND[2]:g}" in algo.reason
    assert _choose("weight_grad", geom, precision="tf32").name == "implicit_gemm_tf32"
    # a plane where F(2x2) saves too little stays on the implicit GEMM
    small = conv_geometry((4, 64, 3, 3), (64, 64, 3, 3), 1, 1, 1, 1)  # 9 * 9 / (16 * 4)
    # (the TF32 input gradient: forward phases through conv_tf32_nhwc)
    assert _choose(op, small, precision="tf32").name == (
        "implicit_gemm_tf32" if op == "forward" else "implicit_gemm_phases")


def test_rules_pick_the_tile_by_multiplies():
    tiny = conv_geometry((4, 64, 2, 2), (64, 64, 3, 3), 1, 1, 1, 1)  # one 2x2 tile
    assert _choose("forward", tiny).get("m") == 2
    seven = conv_geometry((4, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1, 1)
    assert _choose("forward", seven).get("m") == 4  # 3.06x vs F(2x2)'s 1.72x
    # F(4x4)'s error grows with the channels summed: long reductions take F(2x2)
    deep = conv_geometry((4, 2048, 8, 8), (64, 2048, 3, 3), 1, 1, 1, 1)
    assert _choose("forward", deep).get("m") == 2
    assert _choose("input_grad", deep).get("m") == 4  # sums over the 64 filters
    assert _choose("forward", conv_geometry((1, 9000, 8, 8), (64, 9000, 3, 3), 1, 1, 1, 1)
                   ).name == "implicit_gemm"  # over WINOGRAD_MAX_SUM even for F(2x2)


@pytest.mark.parametrize("why,op,geom,dtype,precision,workspace", [
    ("weight gradient, float64", "weight_grad", R3X3_14, np.float64, "fp32", 2**28),
    ("weight gradient, tf32", "weight_grad", R3X3_14, F32, "tf32", 2**28),
    ("float64", "forward", R3X3_14, np.float64, "fp32", 2**28),
    ("stride 2", "forward", conv_geometry((8, 64, 56, 56), (64, 64, 3, 3), 2, 1, 1, 1), F32,
     "fp32", 2**28),
    ("dilation 2", "forward", conv_geometry((8, 64, 56, 56), (64, 64, 3, 3), 1, 2, 2, 1), F32,
     "fp32", 2**28),
    ("5x5", "forward", conv_geometry((8, 64, 56, 56), (64, 64, 5, 5), 1, 2, 1, 1), F32,
     "fp32", 2**28),
    ("few channels", "forward", conv_geometry((8, 16, 56, 56), (64, 16, 3, 3), 1, 1, 1, 1),
     F32, "fp32", 2**28),
    ("depthwise", "forward", conv_geometry((8, 64, 56, 56), (64, 1, 3, 3), 1, 1, 1, 64), F32,
     "fp32", 2**28),
    ("1x1 plane", "forward", conv_geometry((8, 64, 1, 1), (64, 64, 3, 3), 1, 1, 1, 1), F32,
     "fp32", 2**28),
    ("workspace", "forward", R3X3_14, F32, "fp32", 2**20),
])
def test_rules_keep_other_paths(why, op, geom, dtype, precision, workspace):
    assert _choose(op, geom, dtype, precision, workspace).name != "winograd", why


def test_shared_case_list_keeps_direct_kernels():
    """The shared list's small cases (under 32 channels per group) stay on the implicit GEMM
    and depthwise kernels that test_cuda_emulated.py runs."""
    for case in CASES:
        geom = conv_geometry(case.x_shape, case.w_shape, case.stride, case.padding,
                             case.dilation, case.groups)
        for op in OPS:
            assert _choose(op, geom).name != "winograd", case.name


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped without CuPy and a device)
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def cupy(monkeypatch):
    from fastconv import dispatch

    ok, why = dispatch.availability("cuda")
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    import cupy

    monkeypatch.undo()  # the rules see the real device
    real = backend._gpu()
    fake = backend.Executor(cupy, real.run,
                            lambda shape, dtype: cupy.full(shape, np.nan, dtype=dtype),
                            real.sm_count)
    monkeypatch.setattr(backend, "_gpu", lambda: fake)  # outputs start as NaN
    return cupy


GPU_GEOMS = [conv_geometry((2, 64, 14, 14), (64, 64, 3, 3), 1, 1, 1, 1),
             conv_geometry((3, 96, 23, 17), (72, 48, 3, 3), 1, ((2, 0), (1, 3)), 1, 2),
             conv_geometry((1, 40, 3, 2), (36, 40, 3, 3), 1, 1, 1, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", cuda_winograd.TILE_SIZES)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("geom", GPU_GEOMS, ids=["r3x3", "groups_pad", "tiny"])
def test_gpu_against_reference(cupy, geom, op, m):
    """The real kernels through CuPy, outputs NaN-poisoned, twice (bit-identical)."""
    x, w, b, gy = _problem(geom)
    d = cupy.asarray

    def run():
        if op == "forward":
            return backend.conv2d_forward(d(x), d(w), d(b), geom, _algo(m))
        if op == "input_grad":
            return backend.conv2d_input_grad(d(w), d(gy), geom, _algo(m))
        return backend.conv2d_weight_grad(d(x), d(gy), geom, _algo(m))

    out = cupy.asnumpy(run())
    ref = {"forward": lambda: reference.conv2d_forward(x, w, b, geom),
           "input_grad": lambda: reference.conv2d_input_grad(w, gy, geom),
           "weight_grad": lambda: reference.conv2d_weight_grad(x, gy, geom)}[op]()
    assert rel_err(out, ref) < ERROR_BOUND[m]
    np.testing.assert_array_equal(out, cupy.asnumpy(run()))


@pytest.mark.gpu
def test_gpu_public_api_takes_winograd(cupy):
    import fastconv

    x, w, b, gy = _problem(R3X3_56)
    x, w, b, gy = x[:2], w, b, gy[:2]
    d = cupy.asarray
    assert fastconv.explain(fastconv.conv2d, d(x), d(w), d(b), padding=1).algo.name \
        == "winograd"
    y = fastconv.conv2d(d(x), d(w), d(b), padding=1)
    geom = conv_geometry(x.shape, w.shape, 1, 1, 1, 1)
    assert rel_err(cupy.asnumpy(y), reference.conv2d_forward(x, w, b, geom)) < ERROR_BOUND[4]
    gx = fastconv.conv2d_input_grad(x.shape, d(w), d(gy), padding=1)
    assert rel_err(cupy.asnumpy(gx), reference.conv2d_input_grad(w, gy, geom)) \
        < ERROR_BOUND[4]
    gw = fastconv.conv2d_weight_grad(d(x), w.shape, d(gy), padding=1)
    assert fastconv.explain("conv2d_weight_grad", d(x), w.shape, d(gy), padding=1).algo.name \
        == "winograd"
    assert rel_err(cupy.asnumpy(gw), reference.conv2d_weight_grad(x, gy, geom)) \
        < ERROR_BOUND[4]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("geom", GPU_GEOMS, ids=["r3x3", "groups_pad", "tiny"])
def test_gpu_tf32_against_reference(cupy, geom, op):
    """The TF32 kernel on the real mma.sync (the host emulation follows the PTX ISA's fragment
    layout; this checks the hardware agrees), outputs NaN-poisoned, twice (bit-identical)."""
    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 tensor cores need sm_80+")
    x, w, b, gy = _problem(geom)
    d = cupy.asarray
    algo = _algo(2, precision="tf32")

    def run():
        if op == "forward":
            return backend.conv2d_forward(d(x), d(w), d(b), geom, algo)
        return backend.conv2d_input_grad(d(w), d(gy), geom, algo)

    out = cupy.asnumpy(run())
    ref = (reference.conv2d_forward(x, w, b, geom) if op == "forward"
           else reference.conv2d_input_grad(w, gy, geom))
    assert 1e-5 < rel_err(out, ref) < TF32_ERROR_BOUND[2]
    np.testing.assert_array_equal(out, cupy.asnumpy(run()))
