"""The CUDA kernels executed on the CPU through a host emulation, against the NumPy reference.

No GPU here: ``cuda_emu.h`` compiles the very sources of ``kernels/*.cu`` with the host C++
compiler (blocks run one after another, the threads of a block as OS threads with real
barriers, warp shuffles and the documented mma.sync fragment layout emulated). The launches
come from the real launchers and the real backend functions of ``fastconv.kernels.cuda`` with
NumPy arrays; every kernel argument is checked against the C++ parameter type, and outputs
start as NaN so that an element the kernels never write fails the comparison.

What this does not check: real GPU timing, memory-model subtleties beyond barriers, and the
hardware's own mma.sync layout (the emulation encodes the PTX ISA's description of it).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from fastconv import reference
from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.dispatch import cuda as rules
from fastconv.kernels import cuda as backend
from fastconv.kernels import cuda_build, cuda_conv, cuda_dgrad, cuda_hinge
from fastconv.kernels.cuda_conv import DGRAD, FPROP, WGRAD, SimtTile, Tf32Tile

from conftest import CASES, CASE_IDS, TOLERANCE, rel_err

cuda_emu = pytest.importorskip("cuda_emu")
TF32_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def ex():
    problem = cuda_emu.compiler_problem()
    if problem is not None:
        if os.environ.get("CI"):  # CI's machine has g++ 12: the emulation must run there
            pytest.fail(f"host emulation unavailable in CI: {problem}")
        pytest.skip(f"host emulation unavailable: {problem}")
    cuda_emu.build()
    return cuda_emu.executor()


@pytest.fixture(autouse=True)
def _no_device(monkeypatch):
    """The rules see the typical device they assume without a GPU."""
    monkeypatch.setattr(cuda_build, "device_info_or_none", lambda: None)


def _tol(dtype, precision="fp32"):
    return TF32_TOLERANCE if precision == "tf32" else TOLERANCE[np.dtype(dtype)]


def _problem(geom, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((geom.N, geom.C, geom.H, geom.W)).astype(dtype)
    w = rng.standard_normal((geom.K, geom.C // geom.groups, geom.R, geom.S)).astype(dtype)
    b = rng.standard_normal(geom.K).astype(dtype)
    gy = rng.standard_normal((geom.N, geom.K, geom.P, geom.Q)).astype(dtype)
    return x, w, b, gy


def _run(ex, op, geom, algo, x, w, b, gy):
    if op == "forward":
        return backend.forward(ex, x, w, b, geom, algo), reference.conv2d_forward(x, w, b, geom)
    if op == "input_grad":
        return (backend.input_grad(ex, w, gy, geom, algo),
                reference.conv2d_input_grad(w, gy, geom))
    return (backend.weight_grad(ex, x, gy, geom, algo),
            reference.conv2d_weight_grad(x, gy, geom))


OPS = ("forward", "input_grad", "weight_grad")
PRECISIONS = [pytest.param(np.float32, "fp32", id="f32"),
              pytest.param(np.float32, "tf32", id="tf32"),
              pytest.param(np.float64, "fp32", id="f64")]


# ---------------------------------------------------------------------------------------------
# The shared case list, through the rules and the backend functions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list(ex, case, dtype, precision, op):
    x, w, b = case.arrays(dtype)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    _, _, _, gy = _problem(geom, dtype, seed=1)
    algo = rules.choose(op, geom, np.dtype(dtype), precision=precision,
                        workspace_bytes=256 * 2**20)
    out, ref = _run(ex, op, geom, algo, x, w, b if case.bias else None, gy)
    assert out.dtype == dtype
    tf32 = algo.get("precision") == "tf32"  # implicit_gemm_tf32, or its input-gradient phases
    assert rel_err(out, ref) < _tol(dtype, "tf32" if tf32 else "fp32"), algo


# ---------------------------------------------------------------------------------------------
# Every instantiated tile, in every mode, on problems spanning several tiles in each direction
# ---------------------------------------------------------------------------------------------
# Pixel planes a multiple of 4 (vector stores) and not (scalar stores); partial tiles in M, N
# and the reduction; groups, stride, dilation and asymmetric padding.
TILE_GEOMS = {
    "plain": conv_geometry((2, 12, 13, 12), (40, 12, 3, 3), 1, 1, 1, 1),
    "mixed": conv_geometry((3, 12, 11, 9), (18, 6, 3, 2), (2, 1), ((1, 2), (0, 1)), (1, 2), 2),
    # Strides that do not divide the dilations: the input gradient's taps land on every
    # residue class (PixelGather's residue test in conv2d.cu).
    "residues": conv_geometry((2, 5, 14, 13), (7, 5, 3, 4), (2, 3), ((2, 1), (3, 0)), (3, 2), 1),
}
TILES = ([pytest.param(np.float32, t, id=f"f32-{t.bm}x{t.bn}")
          for t in cuda_conv.SIMT_TILES["float32"]]
         + [pytest.param(np.float64, t, id=f"f64-{t.bm}x{t.bn}")
            for t in cuda_conv.SIMT_TILES["float64"]]
         + [pytest.param(np.float32, t, id=f"tf32-{t.bm}x{t.bn}") for t in cuda_conv.TF32_TILES])


@pytest.mark.parametrize("geom_name", list(TILE_GEOMS))
@pytest.mark.parametrize("dtype,tile", TILES)
def test_every_tile(ex, dtype, tile, geom_name):
    geom = TILE_GEOMS[geom_name]
    x, w, b, gy = _problem(geom, dtype)
    name = "implicit_gemm_tf32" if isinstance(tile, Tf32Tile) else "implicit_gemm"
    tol = _tol(dtype, "tf32" if isinstance(tile, Tf32Tile) else "fp32")
    for op in OPS:
        key = (np.dtype(dtype).name, cuda_conv.MODE_OF_OP[op], tile)
        if key in cuda_conv.SIMT_EXCLUDED:
            continue  # never requested, not instantiated
        algo = Algo(name, (("tile", dataclasses.astuple(tile)), ("splits", 3)))
        out, ref = _run(ex, op, geom, algo, x, w, b, gy)
        assert rel_err(out, ref) < tol, (op, tile)


def test_weight_grad_slices_are_summed(ex):
    """Many reduction slices (more than the problem's tiles), uneven last slice."""
    geom = TILE_GEOMS["plain"]
    x, _, _, gy = _problem(geom, np.float64)
    ref = reference.conv2d_weight_grad(x, gy, geom)
    for splits in (1, 3, 13):
        algo = Algo("implicit_gemm", (("tile", (32, 32, 8, 2, 2)), ("splits", splits)))
        assert rel_err(backend.weight_grad(ex, x, gy, geom, algo), ref) < 1e-11, splits


def test_batch_chunks_for_32bit_indices(ex, monkeypatch):
    """Batches are cut so that GEMM rows stay 32-bit; here the limit is lowered to force it."""
    geom = conv_geometry((5, 6, 10, 9), (8, 6, 3, 3), 1, 1, 1, 1)
    monkeypatch.setattr(cuda_conv, "ROW_LIMIT", 2 * 90 + 7)  # two images per chunk
    assert len(cuda_conv.batch_chunks(geom.N, 90)) == 3
    x, w, b, gy = _problem(geom, np.float64)
    for tile, name in ((SimtTile(32, 32, 8, 2, 2), "implicit_gemm"),):
        for op in OPS:
            algo = Algo(name, (("tile", dataclasses.astuple(tile)), ("splits", 2)))
            out, ref = _run(ex, op, geom, algo, x, w, b, gy)
            assert rel_err(out, ref) < 1e-11, op


# ---------------------------------------------------------------------------------------------
# TF32 forward over channels-last operands: the pre-pass and conv_tf32_nhwc
# ---------------------------------------------------------------------------------------------
def _tf32_rna(a):
    """cvt.rna.tf32.f32 in NumPy (the emulation's to_tf32): 10 mantissa bits, ties away."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.mark.parametrize("groups,cg", [(1, 3), (2, 5), (3, 4), (1, 37)])
def test_nhwc_prepass_layout(ex, groups, cg):
    """x (N, C, H, W) -> (N, H, W, G, Cgp) and a weight (K, Cg, R, S) -> (K, R, S, Cgp): every
    value rounded to TF32 once, padding channels zero, every element written (NaN-poisoned
    buffers); planes and channel counts that do not fill the 32 x 32 tiles."""
    rng = np.random.default_rng(5)
    N, H, W, K, R, S = 2, 5, 9, 6 * groups, 3, 2
    C = groups * cg
    cgp = cuda_conv.padded_channels(cg)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    xt = np.full(N * H * W * groups * cgp, np.nan, np.float32)
    for spec in cuda_conv.channels_last_launches(x, xt, N, H * W, groups, cg, C * H * W, H * W):
        cuda_emu.run(spec)
    want = np.zeros((N, H, W, groups, cgp), np.float32)
    want[..., :cg] = _tf32_rna(x).reshape(N, groups, cg, H, W).transpose(0, 3, 4, 1, 2)
    np.testing.assert_array_equal(xt.reshape(want.shape), want)
    assert not np.array_equal(want[..., :cg], x.reshape(N, groups, cg, H, W)
                              .transpose(0, 3, 4, 1, 2))  # rounding changed values
    w = rng.standard_normal((K, cg, R, S)).astype(np.float32)
    wt = np.full(K * R * S * cgp, np.nan, np.float32)
    for spec in cuda_conv.channels_last_launches(w, wt, K, R * S, 1, cg, cg * R * S, R * S):
        cuda_emu.run(spec)
    want_w = np.zeros((K, R, S, cgp), np.float32)
    want_w[..., :cg] = _tf32_rna(w).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(wt.reshape(want_w.shape), want_w)


def _nhwc_algo(tile, splits=1):
    return Algo("implicit_gemm_tf32", (("tile", dataclasses.astuple(tile)), ("splits", splits)))


NHWC_TILES = [pytest.param(t, id=f"{t.bm}x{t.bn}") for t in cuda_conv.TF32_NHWC_TILES]


@pytest.mark.parametrize("tile", NHWC_TILES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list_tf32_nhwc(ex, case, tile):
    """The shared case list through conv_tf32_nhwc (the forward pass; the input gradient's
    phases run through it too, see test_cuda_dgrad): TF32 error, yet above fp32 rounding, so
    the operands really were rounded; outputs NaN-poisoned by the emulation's executor."""
    x, w, b = case.arrays(np.float32)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    rec = _Recording(ex)
    out = backend.forward(rec, x, w, b if case.bias else None, geom, _nhwc_algo(tile))
    ref = reference.conv2d_forward(x, w, b if case.bias else None, geom)
    assert 1e-5 < rel_err(out, ref) < TF32_TOLERANCE
    assert rec.kernels[-1] == cuda_conv.tf32_kernel_name(FPROP, tile)
    assert rec.kernels.count(cuda_conv.NHWC_COPY_KERNEL) == 2


# The gradients' case lists run the 128x128 tile (the 128x64 one: test_nhwc_tiles_and_slices),
# to keep the emulated suite short.
@pytest.mark.parametrize("tile", NHWC_TILES[:1])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list_tf32_nhwc_input_grad(ex, case, tile):
    """The TF32 input gradient as the rules build it (every stride: its input phases, stride 1
    one phase written in place), each phase through conv_tf32_nhwc on grad_output and the
    phase's sub-kernel, against the reference."""
    x, w, _ = case.arrays(np.float32)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    _, _, _, gy = _problem(geom, np.float32, seed=1)
    plans = tuple((*p.index, "implicit_gemm_tf32", dataclasses.astuple(tile), 1)
                  for p in cuda_dgrad.phases(geom) if p.geom is not None)
    rec = _Recording(ex)
    out = backend.input_grad(rec, w, gy, geom, Algo("implicit_gemm_phases",
                                                    (("phases", plans),)))
    ref = reference.conv2d_input_grad(w, gy, geom)
    assert 1e-5 < rel_err(out, ref) < TF32_TOLERANCE
    conv = [k for k in rec.kernels if k != cuda_conv.NHWC_COPY_KERNEL]
    assert conv == [cuda_conv.tf32_kernel_name(FPROP, tile)] * len(plans)


@pytest.mark.parametrize("tile", NHWC_TILES[:1])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list_tf32_nhwc_weight_grad(ex, case, tile):
    """The TF32 weight gradient as a forward convolution with roles swapped, per group, through
    conv_tf32_nhwc (x as (C, H, W, Np), grad_output as (K, P, Q, Np)), in three reduction
    slices summed in a fixed order, against the reference."""
    x, w, _ = case.arrays(np.float32)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    _, _, _, gy = _problem(geom, np.float32, seed=1)
    rec = _Recording(ex)
    out = backend.weight_grad(rec, x, gy, geom, _nhwc_algo(tile, 3))
    ref = reference.conv2d_weight_grad(x, gy, geom)
    assert 1e-5 < rel_err(out, ref) < TF32_TOLERANCE
    conv = [k for k in rec.kernels if k != cuda_conv.NHWC_COPY_KERNEL]
    assert conv == [cuda_conv.tf32_kernel_name(FPROP, tile)] * geom.groups


NHWC_GEOMS = {
    # several row tiles (M = 2*13*12 = 312), a column tile edge (K = 40 of 64/128), odd C
    "plain": conv_geometry((2, 13, 13, 12), (40, 13, 3, 3), 1, 1, 1, 1),
    # groups, stride, dilation, asymmetric padding; reduction of R*S*Cgp/4 = 6*2 = 12 chunks
    # (a BK step of 4 chunks spans taps), K/groups = 9
    "mixed": conv_geometry((3, 12, 11, 9), (18, 6, 3, 2), (2, 1), ((1, 2), (0, 1)), (1, 2), 2),
    # channels a multiple of 16 (whole BK steps per tap), 2x2 stride, batch 1, K = 70 (two
    # column tiles of the 128x64 tile)
    "wide": conv_geometry((1, 32, 10, 10), (70, 32, 3, 3), 2, 1, 1, 1),
}


@pytest.mark.parametrize("geom_name", list(NHWC_GEOMS))
@pytest.mark.parametrize("tile", NHWC_TILES)
def test_nhwc_tiles_and_slices(ex, tile, geom_name):
    """Every conv_tf32_nhwc tile over several row and column tiles, forward and weight gradient,
    with one and with three reduction slices (summed in a fixed order), against the
    reference."""
    geom = NHWC_GEOMS[geom_name]
    x, w, b, gy = _problem(geom, np.float32)
    ref = reference.conv2d_forward(x, w, b, geom)
    ref_w = reference.conv2d_weight_grad(x, gy, geom)
    for splits in (1, 3):
        out = backend.forward(ex, x, w, b, geom, _nhwc_algo(tile, splits))
        assert 1e-5 < rel_err(out, ref) < TF32_TOLERANCE, splits
        gw = backend.weight_grad(ex, x, gy, geom, _nhwc_algo(tile, splits))
        assert 1e-5 < rel_err(gw, ref_w) < TF32_TOLERANCE, splits


def test_nhwc_batch_chunks(ex, monkeypatch):
    """Batches cut for 32-bit GEMM rows: each chunk reads its images' part of the pre-pass
    buffer."""
    geom = conv_geometry((5, 6, 10, 9), (8, 6, 3, 3), 1, 1, 1, 1)
    monkeypatch.setattr(cuda_conv, "ROW_LIMIT", 2 * 90 + 7)  # two images per chunk
    x, w, b, _ = _problem(geom, np.float32)
    rec = _Recording(ex)
    out = backend.forward(rec, x, w, b, geom, _nhwc_algo(cuda_conv.TF32_NHWC_TILES[1], 2))
    assert rel_err(out, reference.conv2d_forward(x, w, b, geom)) < TF32_TOLERANCE
    assert len(rec.kernels) == 2 + 3


# ---------------------------------------------------------------------------------------------
# Depthwise and 1x1 paths
# ---------------------------------------------------------------------------------------------
class _Recording:
    """The executor, noting the kernel of every launch."""

    def __init__(self, ex):
        self.ex, self.kernels = ex, []

    def run(self, spec):
        self.kernels.append(spec.kernel)
        return self.ex.run(spec)

    def __getattr__(self, name):
        return getattr(self.ex, name)


def _placed(a, misalign):
    """A C-contiguous copy of ``a`` at a 16-byte aligned address, or 4 bytes past one."""
    buf = np.empty(a.size + 8, a.dtype)
    first = (-buf.ctypes.data % 16) // a.itemsize + (1 if misalign else 0)
    out = buf[first:first + a.size].reshape(a.shape)
    out[...] = a
    return out


# Planes of whole vectors (48, 64) over several tiles and images; groups; dilation (no effect
# on 1x1 filters); a reduction that ends inside a BK step.
VECTOR_GEOMS = {
    "plain": conv_geometry((3, 13, 8, 6), (20, 13, 1, 1), 1, 0, 1, 1),
    "groups": conv_geometry((2, 12, 8, 8), (18, 6, 1, 1), 1, 0, 2, 2),
}


@pytest.mark.parametrize("geom_name", list(VECTOR_GEOMS))
@pytest.mark.parametrize("tile", sorted({t for _, _, t in cuda_conv.vector_a_kernels()},
                                        key=lambda t: (-t.bm, -t.bn)),
                         ids=lambda t: f"{t.bm}x{t.bn}")
def test_vector_a_loader(ex, tile, geom_name):
    """1x1 forward and input gradient through the 16-byte A loader (aligned operands) and
    through the general gather (the same operands 4 bytes off alignment), both against the
    reference; the recorded launches show which kernel ran."""
    geom = VECTOR_GEOMS[geom_name]
    x, w, b, gy = _problem(geom, np.float32)
    algo = Algo("implicit_gemm", (("tile", dataclasses.astuple(tile)), ("splits", 1)))
    for misalign in (False, True):
        rec = _Recording(ex)
        xa, gya = _placed(x, misalign), _placed(gy, misalign)
        for op in ("forward", "input_grad"):
            out, ref = _run(rec, op, geom, algo, xa, w, b, gya)
            assert rel_err(out, ref) < TOLERANCE[np.dtype(np.float32)], (op, misalign)
        vector = [k.count(",") == 7 for k in rec.kernels]  # the AV template argument
        assert vector == [not misalign] * 2, rec.kernels


# Depthwise geometries whose every kernel rotates its cp.async ring: several output tiles per
# fprop block, several grad_input tiles (and filters) per dgrad block, several pixel pieces per
# wgrad block; tails in every direction; stride 2, dilation 2, channel multipliers 1 to 3.
DEPTHWISE_GEOMS = {
    # several 16 x 32 tiles per plane, wgrad pieces past one image (P*Q > 4 * 256)
    "multi_tile": conv_geometry((2, 3, 40, 70), (6, 1, 3, 5), (2, 1), ((2, 1), (1, 3)), (1, 2),
                                3),
    "s2_d2_x3": conv_geometry((3, 2, 37, 45), (6, 1, 3, 3), 2, 2, 2, 2),
    "s1_5x5": conv_geometry((2, 4, 20, 33), (4, 1, 5, 5), 1, 2, 1, 4),
    # strides that do not divide the dilations: dgrad's taps land on every residue class
    # (two double stages of the forward's window with stride 3 would pass 48 KiB)
    "residues": conv_geometry((2, 2, 35, 41), (4, 1, 3, 4), 2, ((2, 1), (3, 0)), 3, 2),
    # more taps (17 x 17) than threads: the tap copies loop; no bias
    "taps289": conv_geometry((2, 1, 21, 20), (1, 1, 17, 17), 1, 8, 1, 1),
}


@pytest.mark.parametrize("geom_name", list(DEPTHWISE_GEOMS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_depthwise_rings(ex, dtype, geom_name):
    """The three depthwise kernels against the reference (NaN-poisoned outputs) where each
    block works through several ring stages."""
    geom = DEPTHWISE_GEOMS[geom_name]
    assert cuda_conv.depthwise_fits(geom, dtype)
    x, w, b, gy = _problem(geom, dtype)
    items, tiles = cuda_conv.depthwise_work_items(geom, dtype)
    grids = {"forward": cuda_conv.depthwise_forward_launch(x, w, b, gy, geom).grid[0],
             "input_grad": cuda_conv.depthwise_input_grad_launch(w, gy, x, geom).grid[0]}
    assert grids["forward"] < items and grids["input_grad"] < tiles
    pieces = geom.N * -(-geom.P * geom.Q // (cuda_conv.depthwise_wgrad_unroll(dtype)
                                             * cuda_conv.DEPTHWISE_THREADS))
    assert pieces >= 2
    algo = Algo("depthwise")
    for op in OPS:
        out, ref = _run(ex, op, geom, algo, x, w, None if geom_name == "taps289" else b, gy)
        assert rel_err(out, ref) < _tol(dtype), op


# Rows of whole 16-byte vectors: the forward's x rows (W) in both dtypes, grad_output rows (Q)
# in double only ("s2"), or in both ("d2_5x5").
DEPTHWISE_VECTOR_GEOMS = {
    "s2": conv_geometry((2, 3, 36, 44), (6, 1, 3, 3), 2, 1, 1, 3),
    "d2_5x5": conv_geometry((2, 2, 20, 24), (4, 1, 5, 5), 1, 4, 2, 2),
}


@pytest.mark.parametrize("geom_name", list(DEPTHWISE_VECTOR_GEOMS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_depthwise_vector_windows(ex, dtype, geom_name):
    """The forward and input gradient with 16-byte window copies (aligned operands whose rows
    are whole vectors) and with element copies (the same operands one element off alignment),
    both against the reference; the recorded launches show which copies ran."""
    geom = DEPTHWISE_VECTOR_GEOMS[geom_name]
    x, w, b, gy = _problem(geom, dtype)
    vector = 16 // np.dtype(dtype).itemsize
    for misalign in (False, True):
        specs = []

        class Rec(_Recording):
            def run(self, spec):
                specs.append(spec)
                return self.ex.run(spec)

        xa, gya = _placed(x, misalign), _placed(gy, misalign)
        for op in ("forward", "input_grad"):
            out, ref = _run(Rec(ex), op, geom, Algo("depthwise"), xa, w, b, gya)
            assert rel_err(out, ref) < _tol(dtype), (op, misalign)
        assert [int(spec.args[-1]) for spec in specs] == [
            not misalign and geom.W % vector == 0, not misalign and geom.Q % vector == 0]


def test_1x1_gemm_path(ex):
    geom = conv_geometry((3, 7, 5, 6), (4, 7, 1, 1), 1, 0, 1, 1)
    x, w, b, gy = _problem(geom, np.float64)
    for op in OPS:
        out, ref = _run(ex, op, geom, Algo("gemm_1x1"), x, w, b, gy)
        assert rel_err(out, ref) < 1e-11, op


def test_bias_grad(ex):
    gy = np.random.default_rng(0).standard_normal((3, 5, 4, 7))
    out = backend.bias_grad(ex, gy, Algo("reduce"))
    assert rel_err(out, gy.sum(axis=(0, 2, 3))) < 1e-12


# ---------------------------------------------------------------------------------------------
# Hinge
# ---------------------------------------------------------------------------------------------
def _hinge_problem(N, C, dtype, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((N, C)).astype(dtype)
    labels = rng.integers(0, C, N).astype(np.int64)
    cw = rng.uniform(0.5, 2.0, C).astype(dtype)
    rs = rng.uniform(0.5, 2.0, N).astype(dtype)
    return scores, labels, cw, rs


@pytest.mark.parametrize("layout", cuda_hinge.LAYOUTS, ids=[f"g{g}i{i}" for g, i in
                                                          cuda_hinge.LAYOUTS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_hinge_every_layout(ex, layout, dtype):
    group, items = layout
    # fill the layout's registers, leave some lanes empty, and (for the widest) go past them
    C = max(1, group * items - 1) if (group, items) != (32, 32) else 1500
    N = 2 * 256 // group + 3  # more rows than one block pass; sm_count 2 makes it wrap
    scores, labels, cw, rs = _hinge_problem(N, C, dtype)
    algo = Algo("hinge_rows", (("group", group), ("items", items)))
    for p in (1, 2):
        for scale in (rs, rs[:1]):
            losses, grad = backend.hinge_rows(ex, scores, labels, 0.75, p, cw, scale, True, algo)
            ref_l, ref_g = reference.hinge_loss_rows(scores, labels, 0.75, p, cw,
                                                     np.broadcast_to(scale, (N,)), True)
            assert rel_err(losses, ref_l) < _tol(dtype) and rel_err(grad, ref_g) < _tol(dtype)
        only, none = backend.hinge_rows(ex, scores, labels, 0.75, p, cw, rs, False, algo)
        assert none is None and rel_err(only, ref_l) < _tol(dtype)


@pytest.mark.parametrize("N", [1, 7, 256, 257, 1300])
def test_label_range(ex, N):
    """Per-block extremes reduced on the host: one block, a partial block, more blocks than the
    grid (2 SMs: at most 4 blocks, so 1300 labels wrap) and extremes in every position."""
    rng = np.random.default_rng(N)
    for labels in (rng.integers(-2**62, 2**62, N), rng.integers(0, 10, N),
                   np.full(N, 5), np.arange(N)[::-1].copy()):
        labels = labels.astype(np.int64)
        assert backend.labels_min_max(ex, labels) == (labels.min(), labels.max())


def test_hinge_kink_takes_zero_subgradient(ex):
    scores = np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 2.0]], np.float32)
    labels = np.array([2, 1], np.int64)  # margins of row 0: -1, 0 (kink); row 1: 2, (0 kink)
    algo = rules.choose("hinge", None, np.dtype(np.float32), precision="fp32",
                        workspace_bytes=0, scores_shape=scores.shape)
    ones = np.ones(3, np.float32)
    losses, grad = backend.hinge_rows(ex, scores, labels, 1.0, 1, ones, np.ones(1, np.float32),
                                      True, algo)
    ref_l, ref_g = reference.hinge_loss_rows(scores, labels, 1.0, 1, ones, np.ones(2), True)
    np.testing.assert_array_equal(losses, ref_l)
    np.testing.assert_array_equal(grad, ref_g)


@pytest.mark.parametrize("layout", [(1, 4), (32, 4), (32, 32)], ids=["g1i4", "g32i4", "g32i32"])
def test_hinge_nan_rule(ex, layout):
    """A NaN anywhere in a row (label column, a register-held column, a re-read column past
    the registers) -> that row's loss and whole gradient row are NaN; +inf in a non-label
    column gives the reference's infinite loss and gradient (IEEE); other rows are unchanged."""
    group, items = layout
    C = {1: 3, 32: 100}[group] if items == 4 else 1500
    N = 7
    scores, labels, cw, rs = _hinge_problem(N, C, np.float32, seed=3)
    labels[:4] = [0, 1, 2, 0]
    scores[0, 0] = np.nan           # the label column
    scores[1, C - 1] = np.nan       # last column (past the registers when C = 1500)
    scores[2, 0] = np.nan           # a non-label column
    scores[3, 1] = np.inf           # +inf, non-label
    nan_rows = [0, 1, 2]
    algo = Algo("hinge_rows", (("group", group), ("items", items)))
    finite = np.ones(N, bool)
    finite[:4] = False
    for p in (1, 2):
        losses, grad = backend.hinge_rows(ex, scores, labels, 0.5, p, cw, rs, True, algo)
        only, _ = backend.hinge_rows(ex, scores, labels, 0.5, p, cw, rs, False, algo)
        assert np.isnan(losses[nan_rows]).all() and np.isnan(only[nan_rows]).all()
        assert np.isnan(grad[nan_rows]).all()
        ref_l, ref_g = reference.hinge_loss_rows(scores[3:], labels[3:], 0.5, p, cw, rs[3:],
                                                 True)
        assert losses[3] == np.inf and ref_l[0] == np.inf
        np.testing.assert_array_equal(np.isinf(grad[3]), np.isinf(ref_g[0]))
        np.testing.assert_array_equal(np.sign(grad[3]), np.sign(ref_g[0]))
        assert rel_err(losses[4:], ref_l[1:]) < _tol(np.float32)
        assert rel_err(grad[4:], ref_g[1:]) < _tol(np.float32)
        assert np.isfinite(grad[finite]).all()


def test_hinge_lecture_example(ex):
    """Lecture notes 7.1: s = (-3, 1.0, 0.5, -1.0, -0.4), y = 2 gives 1.6."""
    s = np.array([[-3.0, 1.0, 0.5, -1.0, -0.4]])
    algo = rules.choose("hinge", None, np.dtype(np.float64), precision="fp32",
                        workspace_bytes=0, scores_shape=s.shape)
    losses, _ = backend.hinge_rows(ex, s, np.array([2]), 1.0, 1, np.ones(5), np.ones(1), False,
                                   algo)
    assert losses[0] == pytest.approx(1.6, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The emulated cp.async and ldmatrix (tests/emu_selftest.cu) behave as the PTX ISA says
# ---------------------------------------------------------------------------------------------
def test_emu_cp_async_groups(ex):
    src = np.arange(1, 161, dtype=np.float32)
    out = np.full(160, 7.0, np.float32)
    cuda_emu.run(cuda_build.Launch("emu", "fc_test::cp_async_groups", (1, 1, 1), (32, 1, 1), 0,
                                   (src, out)))
    lane = np.arange(32)
    np.testing.assert_array_equal(out[:32], src[:32])                        # group 0 done
    np.testing.assert_array_equal(out[32:64], np.where(lane % 2 == 0, src[32:64], 0))  # zfill
    assert np.isnan(out[64:96]).all()                                        # still pending
    np.testing.assert_array_equal(out[96:128], src[64:96])                   # after wait 0
    assert np.isnan(out[128:160]).all()                                      # never committed


def test_emu_ldmatrix_gives_the_mma_a_fragment(ex):
    a = np.arange(128, dtype=np.float32).reshape(16, 8)
    out = np.full(128, np.nan, np.float32)
    cuda_emu.run(cuda_build.Launch("emu", "fc_test::ldmatrix_a_fragment", (1, 1, 1),
                                   (32, 1, 1), 0, (a, out)))
    frag = out.reshape(32, 4)
    for lane in range(32):  # PTX ISA, mma.m16n8k8 .tf32: a0..a3 of lane (g, t)
        g, t = lane // 4, lane % 4
        assert list(frag[lane]) == [a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4]]


# ---------------------------------------------------------------------------------------------
# The emulation's own checks can fail
# ---------------------------------------------------------------------------------------------
def test_argument_types_are_checked(ex):
    scores, labels, cw, rs = _hinge_problem(4, 10, np.float32)
    losses = np.zeros(4, np.float32)
    good = cuda_hinge.hinge_launch(scores, labels, cw, rs, losses, None, 1.0, 1, 4, 4, 2)
    cuda_emu.run(good)
    bad_labels = dataclasses.replace(good, args=(scores, labels.astype(np.int32)) + good.args[2:])
    with pytest.raises(TypeError, match="argument 1"):
        cuda_emu.run(bad_labels)
    bad_margin = dataclasses.replace(good, args=good.args[:5] + (np.float64(1.0),)
                                     + good.args[6:])
    with pytest.raises(TypeError, match="argument 5"):
        cuda_emu.run(bad_margin)
    with pytest.raises(TypeError, match="arguments"):
        cuda_emu.run(dataclasses.replace(good, args=good.args[:-1]))


def test_unwritten_outputs_fail(ex):
    """A grid one block short leaves NaN behind, which the comparison rejects."""
    geom = TILE_GEOMS["plain"]
    x, w, b, _ = _problem(geom, np.float32)
    y = np.full((geom.N, geom.K, geom.P, geom.Q), np.nan, np.float32)
    spec = cuda_conv.implicit_gemm_launch(FPROP, x, w, b, y, geom, SimtTile(64, 32, 8, 4, 4))
    short = dataclasses.replace(spec, grid=(spec.grid[0] - 1,) + spec.grid[1:])
    cuda_emu.run(short)
    assert np.isnan(y).any()
    cuda_emu.run(spec)
    assert rel_err(y, reference.conv2d_forward(x, w, b, geom)) < 1e-5


def test_modes_read_the_right_operands(ex):
    """DGRAD and WGRAD launches built by hand agree with the backend functions."""
    geom = TILE_GEOMS["mixed"]
    x, w, _, gy = _problem(geom, np.float64)
    gx = np.full(x.shape, np.nan)
    cuda_emu.run(cuda_conv.implicit_gemm_launch(DGRAD, gy, w, None, gx, geom,
                                                SimtTile(64, 64, 8, 4, 4)))
    assert rel_err(gx, reference.conv2d_input_grad(w, gy, geom)) < 1e-11
    gw = np.full(w.shape, np.nan)
    cuda_emu.run(cuda_conv.implicit_gemm_launch(WGRAD, gy, x, None, gw, geom,
                                                SimtTile(64, 64, 8, 4, 4)))
    assert rel_err(gw, reference.conv2d_weight_grad(x, gy, geom)) < 1e-11
