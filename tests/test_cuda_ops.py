"""The cuda backend on a real GPU, against the NumPy reference (skipped without CuPy and a GPU).

Every output the backend allocates starts as NaN (the executor's ``empty`` is swapped for a
NaN fill), so an element a kernel never writes fails the comparison instead of passing on
leftovers of CuPy's memory pool. Covers the shared case list for all conv ops and dtypes, the
TF32 path (the channels-last conv_tf32_nhwc forced for all three ops), the GPU benchmark's
layer shapes at a small batch, the hinge loss, repeatability,
CuPy's current stream and what ``explain`` reports.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fastconv
from fastconv import dispatch, reference
from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.kernels import cuda_conv

from conftest import CASES, CASE_IDS, assert_close, rel_err, to_host

pytestmark = pytest.mark.gpu
TF32_TOLERANCE = 5e-3


@pytest.fixture(autouse=True)
def cupy():
    ok, why = dispatch.availability("cuda")
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    import cupy

    return cupy


@pytest.fixture(autouse=True)
def poisoned(cupy, monkeypatch):
    """Outputs of the cuda backend start poisoned (NaN; integers at their minimum)."""
    from cuda_emu import poison
    from fastconv.kernels import cuda as backend

    real = backend._gpu()
    fake = backend.Executor(cupy, real.run,
                            lambda shape, dtype: cupy.full(shape, poison(dtype), dtype=dtype),
                            real.sm_count)
    monkeypatch.setattr(backend, "_gpu", lambda: fake)


def _all_ops(case, x, w, b, gy, refs=None):
    """(name, cuda result, reference) for the four conv ops (``refs``: known references)."""
    kw = case.kwargs
    geom = conv_geometry(x.shape, w.shape, kw["stride"], kw["padding"], kw["dilation"],
                         kw["groups"])
    import cupy

    d = cupy.asarray
    outs = [
        ("forward", fastconv.conv2d(d(x), d(w), None if b is None else d(b), **kw,
                                    backend="cuda")),
        ("input_grad", fastconv.conv2d_input_grad(x.shape, d(w), d(gy), **kw, backend="cuda")),
        ("weight_grad", fastconv.conv2d_weight_grad(d(x), w.shape, d(gy), **kw,
                                                    backend="cuda")),
        ("bias_grad", fastconv.conv2d_bias_grad(d(gy), backend="cuda")),
    ]
    if refs is None:
        refs = [reference.conv2d_forward(x, w, b, geom), reference.conv2d_input_grad(w, gy, geom),
                reference.conv2d_weight_grad(x, gy, geom),
                gy.astype(np.float64).sum(axis=(0, 2, 3))]
    return [(name, out, ref) for (name, out), ref in zip(outs, refs)]


def _grad_output(case, x, w, dtype, seed=1):
    kw = case.kwargs
    geom = conv_geometry(x.shape, w.shape, kw["stride"], kw["padding"], kw["dilation"],
                         kw["groups"])
    rng = np.random.default_rng(seed)
    return rng.standard_normal((geom.N, geom.K, geom.P, geom.Q)).astype(dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list(case, dtype):
    x, w, b = case.arrays(dtype)
    gy = _grad_output(case, x, w, dtype)
    for name, out, ref in _all_ops(case, x, w, b, gy):
        assert out.dtype == dtype, name
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list_tf32(case):
    fastconv.set_precision("tf32")
    x, w, b = case.arrays(np.float32)
    gy = _grad_output(case, x, w, np.float32)
    for name, out, ref in _all_ops(case, x, w, b, gy):
        assert rel_err(out, ref) < TF32_TOLERANCE, name


def _nhwc_ops(x, w, b, gy, geom, tile, splits):
    """Forward, input gradient (its phases) and weight gradient forced through conv_tf32_nhwc
    with ``tile`` (the rules choose it for the large layers), on the poisoned GPU executor."""
    import cupy

    from fastconv.kernels import cuda as backend
    from fastconv.kernels import cuda_dgrad

    ex, d = backend._gpu(), cupy.asarray
    algo = Algo("implicit_gemm_tf32", (("tile", dataclasses.astuple(tile)), ("splits", splits)))
    plans = tuple((*p.index, "implicit_gemm_tf32", dataclasses.astuple(tile), splits)
                  for p in cuda_dgrad.phases(geom) if p.geom is not None)
    phased = Algo("implicit_gemm_phases", (("phases", plans),))
    return [backend.forward(ex, d(x), d(w), None if b is None else d(b), geom, algo),
            backend.input_grad(ex, d(w), d(gy), geom, phased),
            backend.weight_grad(ex, d(x), d(gy), geom, algo)]


@pytest.mark.parametrize("tile", cuda_conv.TF32_NHWC_TILES, ids=lambda t: f"{t.bm}x{t.bn}")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_list_tf32_nhwc(case, tile):
    """The channels-last TF32 kernel (pre-pass, 16-byte cp.async, ldmatrix, mma.sync) for the
    three conv ops on the hardware: TF32 error, above fp32 rounding; results repeat bit for
    bit."""
    x, w, b = case.arrays(np.float32)
    kw = case.kwargs
    geom = conv_geometry(x.shape, w.shape, kw["stride"], kw["padding"], kw["dilation"],
                         kw["groups"])
    gy = _grad_output(case, x, w, np.float32)
    refs = [reference.conv2d_forward(x, w, b, geom), reference.conv2d_input_grad(w, gy, geom),
            reference.conv2d_weight_grad(x, gy, geom)]
    outs = _nhwc_ops(x, w, b, gy, geom, tile, 3)
    for name, out, ref in zip(("forward", "input_grad", "weight_grad"), outs, refs):
        assert 1e-5 < rel_err(out, ref) < TF32_TOLERANCE, name
    again = _nhwc_ops(x, w, b, gy, geom, tile, 3)
    assert all(np.array_equal(to_host(a), to_host(o)) for a, o in zip(again, outs))


class Layer:
    """A layer of the GPU benchmark at a small batch (same C, H, K, kernel, stride, pad)."""

    def __init__(self, name, N, C, H, K, R, stride, pad):
        self.name, self.N, self.C, self.H, self.K, self.R = name, N, C, H, K, R
        self.kwargs = dict(stride=stride, padding=pad, dilation=1, groups=1)

    def arrays(self, dtype, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.N, self.C, self.H, self.H)).astype(dtype)
        w = rng.standard_normal((self.K, self.C, self.R, self.R)).astype(dtype)
        return x, w, rng.standard_normal(self.K).astype(dtype)


LAYERS = [Layer("stem7x7s2", 2, 3, 224, 64, 7, 2, 3), Layer("r3x3_56", 2, 64, 56, 64, 3, 1, 1),
          Layer("r1x1_56", 2, 256, 56, 64, 1, 1, 0), Layer("r3x3_14", 2, 256, 14, 256, 3, 1, 1),
          Layer("r3x3s2_28", 2, 128, 28, 256, 3, 2, 1), Layer("r3x3_7", 4, 512, 7, 512, 3, 1, 1),
          Layer("cifar3x3", 16, 3, 32, 32, 3, 1, 1)]


_LAYER_REFERENCES: dict = {}


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("layer", LAYERS, ids=[la.name for la in LAYERS])
def test_benchmark_layers(layer, precision):
    """Many blocks, full and partial tiles, long reductions, split weight gradients."""
    fastconv.set_precision(precision)
    x, w, b = layer.arrays(np.float32)
    gy = _grad_output(layer, x, w, np.float32)
    tol = TF32_TOLERANCE if precision == "tf32" else 1e-5
    results = _all_ops(layer, x, w, b, gy, _LAYER_REFERENCES.get(layer.name))
    _LAYER_REFERENCES[layer.name] = [ref for _, _, ref in results]  # same data both precisions
    for name, out, ref in results:
        assert rel_err(out, ref) < tol, name


@pytest.mark.parametrize("shape", [(1000, 10), (300, 1000), (50, 3000), (7, 1), (4097, 37)])
@pytest.mark.parametrize("p", [1, 2])
def test_hinge(cupy, shape, p, dtype):
    N, C = shape
    rng = np.random.default_rng(0)
    s = rng.standard_normal(shape).astype(dtype)
    y = rng.integers(0, C, N)
    wt = rng.uniform(0.5, 2.0, C).astype(dtype)
    for reduction in ("mean", "sum", "none"):
        grad_loss = rng.uniform(0.5, 2.0, N).astype(dtype) if reduction == "none" else 1.5
        loss, grad = fastconv.hinge_loss_and_grad(
            cupy.asarray(s), cupy.asarray(y), 0.8, p, cupy.asarray(wt), reduction,
            cupy.asarray(grad_loss) if reduction == "none" else grad_loss, backend="cuda")
        ref_loss, ref_grad = fastconv.hinge_loss_and_grad(s, y, 0.8, p, wt, reduction,
                                                          grad_loss, backend="reference")
        assert_close(loss, ref_loss, dtype)
        assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("N", [1, 257, 10**6 + 3])
def test_label_range_on_the_gpu(cupy, N):
    from fastconv.kernels import cuda as cuda_kernels

    rng = np.random.default_rng(N)
    labels = rng.integers(-2**62, 2**62, N)
    assert cuda_kernels.label_range(cupy.asarray(labels)) == (labels.min(), labels.max())


@pytest.mark.parametrize("label_dtype", [np.int8, np.uint8, np.int32, np.uint32, np.int64,
                                         np.uint64])
def test_hinge_labels_checked_in_their_dtype(cupy, label_dtype):
    s = cupy.asarray(np.random.default_rng(0).standard_normal((600, 5)).astype(np.float32))
    y = np.random.default_rng(1).integers(0, 5, 600).astype(label_dtype)
    loss = fastconv.hinge_loss(s, cupy.asarray(y), backend="cuda")
    assert_close(loss, fastconv.hinge_loss(s.get(), y, backend="reference"), np.float32)
    for bad in (5, 100) + ((-3,) if np.dtype(label_dtype).kind == "i" else ()):
        y[421] = bad
        with pytest.raises(ValueError, match=f"found {bad}$"):
            fastconv.hinge_loss(s, cupy.asarray(y), backend="cuda")
        y[421] = 0
    if label_dtype == np.uint64:  # would read as negative if cast to int64 first
        y[7] = 2**63 + 5
        with pytest.raises(ValueError, match="found 9223372036854775813"):
            fastconv.hinge_loss(s, cupy.asarray(y), backend="cuda")


def test_filled_arrays_are_kept_per_value_and_bounded(cupy):
    from fastconv import _args

    a = _args._filled(cupy, "cupy", 10, 1.0, np.float32)
    assert _args._filled(cupy, "cupy", 10, 1.0, np.float32) is a
    assert bool((a == 1).all()) and a.dtype == np.float32
    b = _args._filled(cupy, "cupy", 1, 0.25, np.float64)
    assert b is not a and float(b[0]) == 0.25
    for i in range(_args._FILLED_MAX + 5):
        _args._filled(cupy, "cupy", 1, float(i), np.float32)
    assert len(_args._FILLED) == _args._FILLED_MAX
    long = _args._filled(cupy, "cupy", _args._FILLED_MAX_LENGTH + 1, 1.0, np.float32)
    assert long is not _args._filled(cupy, "cupy", _args._FILLED_MAX_LENGTH + 1, 1.0,
                                     np.float32)
    # a mean over another batch size gets its own row scale
    s = cupy.asarray(np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    y = cupy.asarray(np.arange(9) % 4)
    for n in (9, 5, 9):
        _, grad = fastconv.hinge_loss_and_grad(s[:n], y[:n], backend="cuda")
        _, ref = fastconv.hinge_loss_and_grad(s[:n].get(), y[:n].get(), backend="reference")
        assert_close(grad, ref, np.float32)


def test_repeatable_bit_for_bit(cupy):
    """Split weight gradients and the hinge reductions repeat exactly (no atomics)."""
    layer = LAYERS[1]
    x, w, _ = (cupy.asarray(a) for a in layer.arrays(np.float32))
    gy = cupy.asarray(_grad_output(layer, to_host(x), to_host(w), np.float32))
    runs = [to_host(fastconv.conv2d_weight_grad(x, w.shape, gy, padding=1, backend="cuda"))
            for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    s = cupy.asarray(np.random.default_rng(1).standard_normal((4096, 1000)).astype(np.float32))
    y = cupy.asarray(np.random.default_rng(2).integers(0, 1000, 4096))
    h = [tuple(map(to_host, fastconv.hinge_loss_and_grad(s, y, backend="cuda")))
         for _ in range(3)]
    assert all(np.array_equal(h[0][0], r[0]) and np.array_equal(h[0][1], r[1]) for r in h[1:])


def test_runs_on_the_current_stream(cupy):
    layer = LAYERS[3]
    x, w, b = layer.arrays(np.float32)
    geom = conv_geometry(x.shape, w.shape, 1, 1, 1, 1)
    with cupy.cuda.Stream(non_blocking=True) as stream:
        y = fastconv.conv2d(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), padding=1,
                            backend="cuda")
        stream.synchronize()
    assert_close(y, reference.conv2d_forward(x, w, b, geom), np.float32)


def test_explain_reports_kernel_tile_and_precision(cupy):
    x = cupy.zeros((8, 64, 56, 56), cupy.float32)
    w = cupy.zeros((64, 64, 3, 3), cupy.float32)
    plan = fastconv.explain("conv2d", x, w, padding=1)  # 3x3 stride 1: strict-FP32 Winograd
    assert plan.backend == "cuda"
    assert plan.algo.name == "winograd" and plan.algo.get("precision") == "fp32"
    assert plan.algo.get("kernel").startswith("fc::winograd_conv<")
    plan = fastconv.explain("conv2d", x, w, padding=2, dilation=2)  # no Winograd: implicit GEMM
    assert plan.algo.get("kernel").startswith("fc::conv_simt<float, 0")
    assert len(plan.algo.get("tile")) == 5 and plan.algo.get("precision") == "fp32"
    fastconv.set_precision("tf32")
    plan = fastconv.explain("conv2d", x, w, padding=1)  # 3x3 stride 1: F(2x2) on TF32
    assert plan.algo.name == "winograd" and plan.algo.get("precision") == "tf32"
    plan = fastconv.explain("conv2d", x, w, padding=2, dilation=2)
    assert plan.algo.name == "implicit_gemm_tf32" and plan.algo.get("precision") == "tf32"
    assert plan.algo.get("kernel").startswith("fc::conv_tf32_nhwc<128, ")


def test_kernels_are_cached_per_device(cupy):
    from fastconv.kernels import cuda_build

    name = "fc::hinge_rows<float, 32, 4>"
    first = cuda_build.get_kernel("hinge.cu", name)
    assert cuda_build.get_kernel("hinge.cu", name) is first
    dev = cupy.cuda.runtime.getDevice()
    assert (dev, "hinge.cu", name) in cuda_build._KERNELS


# Depthwise layers large enough that every block of the three depthwise kernels rotates its
# cp.async ring many times: (x shape, w shape, stride, padding, dilation).
DEPTHWISE_LAYERS = {
    "mobilenet3x3": ((4, 32, 56, 56), (32, 1, 3, 3), 1, 1, 1),
    "x2_5x5s2": ((4, 64, 57, 57), (128, 1, 5, 5), 2, 2, 1),
    "dil2": ((2, 24, 30, 45), (24, 1, 3, 3), 1, 2, 2),
}


@pytest.mark.parametrize("layer", list(DEPTHWISE_LAYERS))
def test_depthwise_layers(cupy, layer, dtype):
    """The depthwise kernels against the reference, and bit-identical on a second run."""
    x_shape, w_shape, stride, padding, dilation = DEPTHWISE_LAYERS[layer]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=x_shape[1])
    geom = conv_geometry(x_shape, w_shape, stride, padding, dilation, x_shape[1])
    gy = rng.standard_normal((geom.N, geom.K, geom.P, geom.Q)).astype(dtype)
    d = cupy.asarray
    plan = fastconv.explain("conv2d", d(x), d(w), d(b), **kw, backend="cuda")
    assert plan.algo.name == "depthwise", plan.algo
    refs = (reference.conv2d_forward(x, w, b, geom), reference.conv2d_input_grad(w, gy, geom),
            reference.conv2d_weight_grad(x, gy, geom))
    for run in range(2):
        outs = (fastconv.conv2d(d(x), d(w), d(b), **kw, backend="cuda"),
                fastconv.conv2d_input_grad(x_shape, d(w), d(gy), **kw, backend="cuda"),
                fastconv.conv2d_weight_grad(d(x), w_shape, d(gy), **kw, backend="cuda"))
        outs = [to_host(o) for o in outs]
        for out, ref in zip(outs, refs):
            assert_close(out, ref, dtype)
        if run == 0:
            first = outs
    assert all(np.array_equal(a, c) for a, c in zip(first, outs))
