"""The strided input gradient split by input phases (kernels/cuda_dgrad.py, the
``implicit_gemm_phases`` algorithm of the cuda backend).

Part 1 checks the geometry alone, without any GPU code: the phases' sub-problems, run through
the NumPy reference's forward convolution and scattered, must give the reference input
gradient in float64. Part 2 checks the rule. Part 3 runs the backend's phase split through
the host emulation of the CUDA kernels (tests/cuda_emu.h), outputs NaN-poisoned.
"""
from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from fastconv import reference
from fastconv._args import conv_geometry
from fastconv.dispatch import cuda as rules
from fastconv.kernels import cuda as backend
from fastconv.kernels import cuda_build, cuda_conv, cuda_dgrad
from fastconv.kernels.cuda_conv import DGRAD, FPROP, SimtTile, Tf32Tile

from conftest import CASES, TOLERANCE, rel_err

TF32_TOLERANCE = 5e-3


def _forward_any_padding(x: np.ndarray, weight: np.ndarray, geom) -> np.ndarray:
    """The reference forward conv for a geometry whose padding may be negative or past the
    kernel extent: the window rows ``[-pt, -pt + need)`` of ``x`` (zeros outside it) cut out
    explicitly, then ``reference.conv2d_forward`` without padding."""
    (dh, dw), (pt, _, pl, _) = geom.dilation, geom.padding
    need_h = (geom.P - 1) * geom.stride[0] + (geom.R - 1) * dh + 1
    need_w = (geom.Q - 1) * geom.stride[1] + (geom.S - 1) * dw + 1
    top, left = max(pt, 0), max(pl, 0)
    crop_h, crop_w = max(-pt, 0), max(-pl, 0)
    bottom = max(0, crop_h + need_h - geom.H - top)
    right = max(0, crop_w + need_w - geom.W - left)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    window = padded[:, :, crop_h:crop_h + need_h, crop_w:crop_w + need_w]
    flat = dataclasses.replace(geom, H=need_h, W=need_w, padding=(0, 0, 0, 0))
    return reference.conv2d_forward(window, weight, None, flat)


def _phase_split_numpy(weight: np.ndarray, grad_output: np.ndarray, geom) -> np.ndarray:
    """The phase split with the NumPy reference as the forward kernel."""
    sh, sw = geom.stride
    gx = np.full(geom.input_shape, np.nan)
    for phase in cuda_dgrad.phases(geom):
        view = gx[:, :, phase.rows.phase::sh, phase.cols.phase::sw]
        if phase.geom is None:
            view[...] = 0
        else:
            sub_w = cuda_dgrad.sub_weight(np, weight, phase, geom.groups)
            assert sub_w.flags.c_contiguous and sub_w.shape == phase.geom.weight_shape
            view[...] = _forward_any_padding(grad_output, sub_w, phase.geom)
    return gx


def _check_geometry(geom, seed=0) -> None:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(geom.weight_shape)
    gy = rng.standard_normal(geom.output_shape)
    out = _phase_split_numpy(w, gy, geom)
    ref = reference.conv2d_input_grad(w, gy, geom)
    assert rel_err(out, ref) < 1e-12, geom


# ---------------------------------------------------------------------------------------------
# 1. Geometry, against the reference in float64 (no GPU code)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2, 3, 4, (2, 3), (4, 1)])
@pytest.mark.parametrize("dilation", [1, 2, 3, (3, 2)])
@pytest.mark.parametrize("kernel", [(1, 1), (2, 3), (3, 3), (5, 2)])
def test_phases_reproduce_input_grad(stride, dilation, kernel):
    """Every padding from 0 to R (per side, asymmetric), two plane sizes (so that P and Q cut
    off the last input rows for some strides), groups 1."""
    R, S = kernel
    checked = 0
    for (H, W), pt, pb in itertools.product(((11, 9), (8, 13)), range(R + 1), (0, R)):
        pl, pr = min(pt, S), min(pb, S)
        try:
            geom = conv_geometry((2, 3, H, W), (4, 3, R, S), stride, ((pt, pb), (pl, pr)),
                                 dilation, 1)
        except ValueError:  # kernel larger than the padded input
            continue
        _check_geometry(geom, seed=checked)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("groups,C,K", [(2, 4, 6), (3, 3, 6), (4, 4, 4)],
                         ids=["groups2", "depthwise_x2", "depthwise"])
@pytest.mark.parametrize("stride,dilation,padding", [(2, 1, 1), (3, 2, 2), ((2, 3), (1, 2), 0),
                                                     (4, 3, 3)])
def test_phases_with_groups(groups, C, K, stride, dilation, padding):
    geom = conv_geometry((2, C, 13, 12), (K, C // groups, 3, 3), stride, padding, dilation,
                         groups)
    _check_geometry(geom)


def test_kernel_smaller_than_stride_leaves_zero_phases():
    """1x1 stride 2: only phase (0, 0) has a tap; 2x1 stride 3, padding 1: row phases 0 and
    2 (taps 1 and 0), column phase 2."""
    geom = conv_geometry((2, 3, 7, 6), (5, 3, 1, 1), 2, 0, 1, 1)
    live = [p.index for p in cuda_dgrad.phases(geom) if p.geom is not None]
    assert live == [(0, 0)]
    _check_geometry(geom)
    geom = conv_geometry((1, 2, 10, 7), (3, 2, 2, 1), 3, 1, 1, 1)
    live = [p.index for p in cuda_dgrad.phases(geom) if p.geom is not None]
    assert sorted({ph for ph, _ in live}) == [0, 2] and {pw for _, pw in live} == {2}
    _check_geometry(geom)


def test_sub_problem_padding_outside_the_usual_range():
    """Padding past the kernel gives a negative sub-problem padding; a dilated kernel with a
    stride gives one of a full sub-kernel extent; both stay exact."""
    geom = conv_geometry((1, 2, 9, 9), (3, 2, 1, 1), 2, 1, 1, 1)  # 1x1, padding 1, stride 2
    (phase,) = [p for p in cuda_dgrad.phases(geom) if p.geom is not None]
    assert phase.index == (1, 1) and phase.geom.padding[0] == -1 and phase.geom.padding[2] == -1
    _check_geometry(geom)
    geom = conv_geometry((1, 2, 12, 12), (3, 2, 3, 3), 2, 0, 3, 1)  # dilation 3, stride 2
    extents = [(p.geom.padding[0], (p.geom.R - 1) * p.geom.dilation[0])
               for p in cuda_dgrad.phases(geom) if p.geom is not None]
    assert any(pad > extent for pad, extent in extents)
    _check_geometry(geom)


def test_phase_taps_and_multiply_fraction():
    """3x3 stride 2 padding 1: taps {1} for even rows, {0, 2} for odd ones; a quarter of the
    direct multiplies on an even plane (none on structural zeros)."""
    geom = conv_geometry((1, 1, 8, 8), (1, 1, 3, 3), 2, 1, 1, 1)
    rows = {p.rows.phase: list(p.rows.taps) for p in cuda_dgrad.phases(geom)}
    assert rows == {0: [1], 1: [0, 2]}
    assert cuda_dgrad.multiply_fraction(geom) == 0.25
    assert len(cuda_dgrad.phases(geom)) == 4
    dilated = conv_geometry((1, 1, 12, 12), (1, 1, 3, 3), 2, 2, 2, 1)  # g = gcd(2, 2) = 2
    rows = {p.rows.phase: list(p.rows.taps) for p in cuda_dgrad.phases(dilated)}
    assert rows == {0: [0, 1, 2], 1: []}
    assert cuda_dgrad.multiply_fraction(dilated) == 0.25


def test_sub_weight_layout():
    """Entry [g*Cg + c, k, j, l] is weight[g*Kg + k, c, first + (Rj-1-j)*step, ...]."""
    geom = conv_geometry((1, 4, 9, 9), (6, 2, 5, 4), 2, 1, 1, 2)
    w = np.arange(np.prod(geom.weight_shape), dtype=np.float64).reshape(geom.weight_shape)
    for phase in cuda_dgrad.phases(geom):
        if phase.geom is None:
            continue
        sub = cuda_dgrad.sub_weight(np, w, phase, 2)
        rows, cols = list(phase.rows.taps)[::-1], list(phase.cols.taps)[::-1]
        for g, c, k, j, l in itertools.product(range(2), range(2), range(3), range(len(rows)),
                                               range(len(cols))):
            assert sub[g * 2 + c, k, j, l] == w[g * 3 + k, c, rows[j], cols[l]]


# ---------------------------------------------------------------------------------------------
# 2. The rule
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def assumed_device(monkeypatch):
    monkeypatch.setattr(cuda_build, "device_info_or_none", lambda: None)


def _choose(geom, dtype=np.float32, precision="fp32", workspace=256 * 2**20):
    return rules.choose("input_grad", geom, np.dtype(dtype), precision=precision,
                        workspace_bytes=workspace)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_rule_splits_large_strided_input_grads(assumed_device, precision):
    geom = conv_geometry((64, 128, 28, 28), (256, 128, 3, 3), 2, 1, 1, 1)  # r3x3s2_28
    algo = _choose(geom, precision=precision)
    assert algo.name == "implicit_gemm_phases"
    assert "4 input phases" in algo.reason and "modelled" in algo.reason
    assert algo.get("multiply_fraction") == 0.25
    fprop = "implicit_gemm_tf32" if precision == "tf32" else "implicit_gemm"
    assert algo.get("precision") == precision
    plans = algo.get("phases")
    assert [(ph, pw) for ph, pw, *_ in plans] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    kernels = set()
    for ph, pw, name, tile, splits in plans:
        if (ph, pw) == (0, 0) and precision == "fp32":  # tap (1, 1) alone: a plain 1x1 conv
            assert name == "gemm_1x1" and tile is None
            kernels.add("cupy.matmul")
            continue
        assert name == fprop
        sub_geom = cuda_dgrad.phases(geom)[ph * 2 + pw].geom
        tile = (Tf32Tile if precision == "tf32" else SimtTile)(*tile)
        gy = np.zeros(geom.output_shape, np.float32)
        w = np.zeros(sub_geom.weight_shape, np.float32)
        out = np.zeros(sub_geom.output_shape, np.float32)
        if getattr(tile, "layout", "") == "nhwc":
            xt, wt = (np.zeros(n, np.float32) for n in cuda_conv.nhwc_buffer_sizes(sub_geom))
            spec = cuda_conv.nhwc_forward_launch(xt, wt, None, out, sub_geom, tile, splits)
        else:
            spec = cuda_conv.implicit_gemm_launch(FPROP, gy, w, None, out, sub_geom, tile,
                                                  splits)
        assert spec.kernel in cuda_conv.all_kernel_names()["conv2d.cu"]
        kernels.add(spec.kernel)
    assert kernels == set(algo.get("kernels"))



@pytest.mark.parametrize("dtype,precision,name", [(np.float32, "fp32", "gemm_1x1"),
                                                  (np.float64, "fp32", "gemm_1x1"),
                                                  (np.float32, "tf32", "implicit_gemm_tf32")])
def test_rule_plain_1x1_phase_uses_cublas(assumed_device, dtype, precision, name):
    """1x1 stride 2 (a ResNet projection): one live phase, a plain 1x1 conv of grad_output,
    which strict precision runs as rule 2's batched GEMM; three phases zeroed."""
    geom = conv_geometry((64, 256, 56, 56), (512, 256, 1, 1), 2, 0, 1, 1)
    algo = _choose(geom, dtype, precision)
    assert algo.name == "implicit_gemm_phases" and "3 phase(s) no tap reaches" in algo.reason
    ((ph, pw, got, tile, _),) = algo.get("phases")
    assert (ph, pw, got) == (0, 0, name) and (tile is None) == (name == "gemm_1x1")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("CUPY_TF32", "1")  # CuPy's matmul would run TF32: keep the implicit GEMM
    try:
        strict = _choose(geom, dtype, precision)
    finally:
        monkey.undo()
    assert "gemm_1x1" not in {p[2] for p in strict.get("phases")}

def test_rule_keeps_direct_kernel_where_the_split_does_not_pay(assumed_device):
    tiny = conv_geometry((2, 4, 9, 10), (6, 4, 3, 3), 2, 1, 1, 1)
    algo = _choose(tiny)
    assert algo.name == "implicit_gemm" and "does not pay" in algo.reason
    plain = conv_geometry((64, 128, 28, 28), (256, 128, 3, 3), 1, 1, 1, 1)
    assert "phase" not in rules.choose("input_grad", plain, np.dtype(np.float32),
                                       precision="tf32", workspace_bytes=2**28).reason
    big = conv_geometry((64, 128, 28, 28), (256, 128, 3, 3), 2, 1, 1, 1)
    starved = _choose(big, workspace=1024)
    assert starved.name == "implicit_gemm" and "over the bound" in starved.reason
    depthwise = conv_geometry((64, 128, 28, 28), (128, 1, 3, 3), 2, 1, 1, 128)
    assert _choose(depthwise).name == "depthwise"
    for op in ("forward", "weight_grad"):
        assert rules.choose(op, big, np.dtype(np.float32), precision="fp32",
                            workspace_bytes=2**28).name != "implicit_gemm_phases"


def test_rule_workspace_within_bound(assumed_device):
    big = conv_geometry((64, 128, 28, 28), (256, 128, 3, 3), 2, 1, 1, 1)
    algo = _choose(big)
    image = 64 * 128 * 14 * 14 * 4
    assert image <= algo.get("workspace_bytes") <= 256 * 2**20
    tight = _choose(big, workspace=algo.get("workspace_bytes"))
    assert tight.name == "implicit_gemm_phases"
    assert tight.get("workspace_bytes") <= algo.get("workspace_bytes")


# ---------------------------------------------------------------------------------------------
# 3. The backend's phase split, in the host emulation of the CUDA kernels
# ---------------------------------------------------------------------------------------------
cuda_emu = pytest.importorskip("cuda_emu")


@pytest.fixture(scope="module")
def ex():
    problem = cuda_emu.compiler_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"host emulation unavailable in CI: {problem}")
        pytest.skip(f"host emulation unavailable: {problem}")
    cuda_emu.build()
    return cuda_emu.executor()


PRECISIONS = [pytest.param(np.float32, "fp32", id="f32"),
              pytest.param(np.float32, "tf32", id="tf32"),
              pytest.param(np.float64, "fp32", id="f64")]


def _plan(geom, dtype, precision, sm_count=2, capability=rules.ASSUMED_CAPABILITY):
    """The plan the rule would run, whether or not it pays on this small shape."""
    tf32, _ = rules._precision(precision, np.dtype(dtype), capability)
    algo, _ = rules.phased_dgrad_plan(geom, np.dtype(dtype), tf32, 2**28, sm_count)
    return algo


def _emulated(ex, geom, dtype, precision, seed=1):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(geom.weight_shape).astype(dtype)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    algo = _plan(geom, dtype, precision)
    out = backend.input_grad(ex, w, gy, geom, algo)
    ref = reference.conv2d_input_grad(w, gy, geom)
    assert out.dtype == dtype and not np.isnan(out).any()
    tol = TF32_TOLERANCE if precision == "tf32" else TOLERANCE[np.dtype(dtype)]
    assert rel_err(out, ref) < tol, (geom, algo)


STRIDED_CASES = [c for c in CASES if c.stride != 1]


@pytest.mark.parametrize("dtype,precision", PRECISIONS)
@pytest.mark.parametrize("case", STRIDED_CASES, ids=[c.name for c in STRIDED_CASES])
def test_emulated_case_list(ex, case, dtype, precision):
    x, w, _ = case.arrays(dtype)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    _emulated(ex, geom, dtype, precision)


AWKWARD = {
    "1x1_s2_pad1": ((2, 3, 7, 6), (5, 3, 1, 1), 2, 1, 1, 1),           # negative sub padding
    "s3_dil2": ((2, 4, 13, 11), (6, 4, 3, 3), 3, ((2, 0), (1, 3)), 2, 1),
    "s2_dil3": ((1, 3, 12, 12), (4, 3, 3, 3), 2, 0, 3, 1),               # pad past extent
    "s4_2x3_cut": ((2, 2, 14, 11), (3, 2, 2, 3), 4, 0, 1, 1),            # kernel < stride
    "groups2_s2x3": ((2, 4, 11, 13), (6, 2, 3, 3), (2, 3), (1, 2), (1, 2), 2),
    "dw_like_s2": ((2, 3, 9, 9), (6, 1, 3, 3), 2, 1, 1, 3),
    "wide_tiles": ((3, 40, 10, 10), (36, 40, 3, 3), 2, 1, 1, 1),         # several tiles
}


@pytest.mark.parametrize("dtype,precision", PRECISIONS)
@pytest.mark.parametrize("name", list(AWKWARD))
def test_emulated_awkward(ex, name, dtype, precision):
    _emulated(ex, conv_geometry(*AWKWARD[name]), dtype, precision)


def test_emulated_reduction_slices_and_zero_phases(ex):
    """Phases run with several reduction slices; phases without a tap are written as zeros
    (the output starts NaN)."""
    geom = conv_geometry((2, 8, 9, 9), (24, 8, 3, 1), 2, 0, 1, 1)  # column phase 1: no tap
    assert any(p.geom is None for p in cuda_dgrad.phases(geom))
    algo = _plan(geom, np.float64, "fp32")
    tile = (32, 32, 8, 2, 2)
    sliced = tuple((ph, pw, "implicit_gemm", tile, 3) for ph, pw, *_ in algo.get("phases"))
    algo = dataclasses.replace(algo, params=(("phases", sliced),) + algo.params[1:])
    rng = np.random.default_rng(5)
    w, gy = rng.standard_normal(geom.weight_shape), rng.standard_normal(geom.output_shape)
    out = backend.input_grad(ex, w, gy, geom, algo)
    assert (out[:, :, :, 1::2] == 0).all()
    assert rel_err(out, reference.conv2d_input_grad(w, gy, geom)) < 1e-12



@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_emulated_gemm_1x1_phase(ex, dtype):
    """A plain 1x1 phase runs through the backend's batched-GEMM path."""
    geom = conv_geometry((2, 6, 9, 8), (5, 6, 1, 1), 2, 0, 1, 1)
    algo = _plan(geom, dtype, "fp32")
    assert [p[2] for p in algo.get("phases")] == ["gemm_1x1"]
    rng = np.random.default_rng(2)
    w = rng.standard_normal(geom.weight_shape).astype(dtype)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    out = backend.input_grad(ex, w, gy, geom, algo)
    assert rel_err(out, reference.conv2d_input_grad(w, gy, geom)) < TOLERANCE[np.dtype(dtype)]

def test_emulated_matches_direct_kernel(ex):
    """The phase split and the direct DGRAD kernel agree (float64) on a strided case; a rerun
    gives the same bits."""
    geom = conv_geometry(*AWKWARD["s3_dil2"])
    rng = np.random.default_rng(7)
    w, gy = rng.standard_normal(geom.weight_shape), rng.standard_normal(geom.output_shape)
    direct = np.full(geom.input_shape, np.nan)
    ex.run(cuda_conv.implicit_gemm_launch(DGRAD, gy, w, None, direct, geom,
                                          SimtTile(32, 32, 8, 2, 2)))
    phased = backend.input_grad(ex, w, gy, geom, _plan(geom, np.float64, "fp32"))
    assert rel_err(phased, direct) < 1e-12
    again = backend.input_grad(ex, w, gy, geom, _plan(geom, np.float64, "fp32"))
    np.testing.assert_array_equal(phased, again)  # fixed order: the same bits every run


def test_emulated_phases_in_batch_chunks(ex, monkeypatch):
    """A phase GEMM too tall for 32-bit rows runs in batch chunks (the limit lowered here)."""
    geom = conv_geometry((5, 3, 10, 9), (4, 3, 3, 3), 2, 1, 1, 1)
    monkeypatch.setattr(cuda_conv, "ROW_LIMIT", 2 * 5 * 5 + 7)  # two 5x5 phase images a chunk
    rng = np.random.default_rng(3)
    w, gy = rng.standard_normal(geom.weight_shape), rng.standard_normal(geom.output_shape)
    out = backend.input_grad(ex, w, gy, geom, _plan(geom, np.float64, "fp32"))
    assert rel_err(out, reference.conv2d_input_grad(w, gy, geom)) < 1e-12


# ---------------------------------------------------------------------------------------------
# 4. On a GPU (skipped without CuPy and a device)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", PRECISIONS)
@pytest.mark.parametrize("name", list(AWKWARD) + ["r3x3s2_n4"])
def test_gpu_phase_split(name, dtype, precision):
    from fastconv import dispatch

    ok, why = dispatch.availability("cuda")
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    import cupy

    real = backend._gpu()
    poisoned = backend.Executor(cupy, real.run,
                                lambda shape, dt: cupy.full(shape, np.nan, dtype=dt),
                                real.sm_count)
    args = AWKWARD.get(name, ((4, 128, 28, 28), (256, 128, 3, 3), 2, 1, 1, 1))
    geom = conv_geometry(*args)
    rng = np.random.default_rng(11)
    w = rng.standard_normal(geom.weight_shape).astype(dtype)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    algo = _plan(geom, dtype, precision, real.sm_count,
                 cuda_build.current_device().capability)
    out = backend.input_grad(poisoned, cupy.asarray(w), cupy.asarray(gy), geom, algo)
    tol = TF32_TOLERANCE if precision == "tf32" else TOLERANCE[np.dtype(dtype)]
    assert rel_err(cupy.asnumpy(out), reference.conv2d_input_grad(w, gy, geom)) < tol
