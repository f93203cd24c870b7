"""Edge inputs every backend must agree on: empty batches and channel-less inputs, NaN scores in
the hinge loss, and non-finite values through the convolutions."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv

from conftest import to_backend, to_host


# ---------------------------------------------------------------------------------------------
# Empty batch (N = 0) and no input channels (C = 0)
# ---------------------------------------------------------------------------------------------
def _conv_all(backend, x, w, b, gy, **kw):
    """Forward, input grad, weight grad and bias grad, as NumPy arrays."""
    x, w, b, gy = (to_backend(a, backend) for a in (x, w, b, gy))
    y = fastconv.conv2d(x, w, b, backend=backend, **kw)
    gx = fastconv.conv2d_input_grad(x.shape, w, gy, backend=backend, **kw)
    gw = fastconv.conv2d_weight_grad(x, w.shape, gy, backend=backend, **kw)
    gb = fastconv.conv2d_bias_grad(gy, backend=backend)
    return tuple(to_host(a) for a in (y, gx, gw, gb))


@pytest.mark.parametrize("groups", [1, 2])
def test_empty_batch(backend, dtype, groups):
    x = np.zeros((0, 4, 9, 8), dtype)
    w = np.ones((6, 4 // groups, 3, 3), dtype)
    b = np.arange(6, dtype=dtype)
    gy = np.zeros((0, 6, 5, 4), dtype)
    y, gx, gw, gb = _conv_all(backend, x, w, b, gy, stride=2, padding=1, groups=groups)
    assert y.shape == (0, 6, 5, 4) and y.dtype == dtype
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and not gw.any()
    assert gb.shape == (6,) and not gb.any()
    plan = fastconv.explain(fastconv.conv2d, to_backend(x, backend), to_backend(w, backend),
                            stride=2, padding=1, groups=groups, backend=backend)
    assert plan.algo.name == "empty"


@pytest.mark.parametrize("groups", [1, 2])
def test_no_input_channels_is_a_sum_over_nothing(backend, dtype, groups):
    x = np.zeros((2, 0, 8, 8), dtype)
    w = np.zeros((6, 0, 3, 3), dtype)
    b = np.arange(1, 7, dtype=dtype)
    gy = np.ones((2, 6, 8, 8), dtype)
    y, gx, gw, gb = _conv_all(backend, x, w, b, gy, padding=1, groups=groups)
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], (2, 6, 8, 8)))
    assert gx.shape == (2, 0, 8, 8) and gw.shape == (6, 0, 3, 3)
    np.testing.assert_array_equal(gb, np.full(6, 128, dtype))
    y0 = to_host(fastconv.conv2d(to_backend(x, backend), to_backend(w, backend),
                                 padding=1, groups=groups, backend=backend))
    assert y0.shape == (2, 6, 8, 8) and not y0.any()


def test_empty_batch_matches_torch():
    torch = pytest.importorskip("torch")
    x, w, b = np.zeros((0, 3, 7, 7), np.float32), np.ones((5, 3, 3, 3), np.float32), None
    y = fastconv.conv2d(x, w, b, stride=2)
    ty = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2)
    assert y.shape == tuple(ty.shape)


# ---------------------------------------------------------------------------------------------
# Hinge loss: the NaN rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("where", ["label", "other"])
def test_hinge_nan_row_is_nan(backend, dtype, p, where):
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((6, 40)).astype(dtype)
    labels = np.array([3, 0, 39, 7, 7, 12])
    scores[2, 39 if where == "label" else 5] = np.nan
    scores[4, 0 if where == "other" else 7] = np.nan
    s, y = to_backend(scores, backend), to_backend(labels, backend)
    losses, grad = (to_host(a) for a in fastconv.hinge_loss_and_grad(
        s, y, p=p, reduction="none", backend=backend))
    loss_only = to_host(fastconv.hinge_loss(s, y, p=p, reduction="none", backend=backend))
    nan_rows = np.isnan(scores).any(axis=1)
    assert np.isnan(losses[nan_rows]).all() and np.isnan(grad[nan_rows]).all()
    assert np.isfinite(losses[~nan_rows]).all() and np.isfinite(grad[~nan_rows]).all()
    np.testing.assert_array_equal(loss_only, losses)
    ref_l, ref_g = fastconv.hinge_loss_and_grad(scores[~nan_rows], labels[~nan_rows], p=p,
                                                reduction="none", backend="reference")
    np.testing.assert_allclose(losses[~nan_rows], ref_l, rtol=1e-5)
    np.testing.assert_allclose(grad[~nan_rows], ref_g, rtol=1e-5)
    assert np.isnan(to_host(fastconv.hinge_loss(s, y, p=p, backend=backend)))


def test_hinge_infinite_score_follows_ieee(backend):
    scores = np.array([[0.0, np.inf, 1.0], [np.inf, 0.0, 1.0]], np.float64)
    labels = np.array([0, 0])
    losses, grad = (to_host(a) for a in fastconv.hinge_loss_and_grad(
        to_backend(scores, backend), to_backend(labels, backend), reduction="none",
        backend=backend))
    # Row 0: a wrong class at +inf gives an infinite loss; row 1: the true class at +inf
    # beats every margin, loss 0 and a zero gradient.
    assert losses[0] == np.inf and losses[1] == 0.0
    np.testing.assert_array_equal(grad[0], [-2.0, 1.0, 1.0])
    np.testing.assert_array_equal(grad[1], [0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Non-finite values through the convolutions
# ---------------------------------------------------------------------------------------------
def _cpu_variants():
    """Every cpu code path (algorithm, params) and the test case list's shapes it supports,
    as the cpu kernel tests force them."""
    from test_cpu_conv import ALL_CASES, _algo, _case_geometry
    from cpu_variants import VARIANTS, supports

    for variant, (name, params) in VARIANTS.items():
        case = next(c for c in ALL_CASES if supports(name, _case_geometry(c), params)
                    and c.C // c.groups >= 2)
        yield pytest.param(variant, case, _algo, _case_geometry, id=f"{variant}-{case.name}")


@pytest.mark.parametrize("variant,case,make_algo,geometry", list(_cpu_variants()))
def test_finite_inputs_give_finite_outputs(variant, case, make_algo, geometry, dtype):
    """Large but finite inputs whose exact results are finite stay finite on every algorithm
    (Winograd's transforms add and scale, so they are the ones that could overflow)."""
    from fastconv.kernels import cpu

    big = np.sqrt(np.finfo(dtype).max) / 1e3
    x, w, b = case.arrays(dtype, seed=7)
    x, w = x * dtype.type(big / 10), w / dtype.type(10)
    geom = geometry(case)
    gy = np.random.default_rng(8).standard_normal(geom.output_shape).astype(dtype)
    algo = make_algo(variant)
    outs = [cpu.conv2d_forward(x, w, b, geom, algo),
            cpu.conv2d_input_grad(w, gy * dtype.type(big / 10), geom, algo),
            cpu.conv2d_weight_grad(x, gy, geom, algo)]
    for out in outs:
        assert np.isfinite(out).all(), variant


@pytest.mark.parametrize("variant", [v.values[0] for v in _cpu_variants()])
def test_inf_pixel(variant):
    """An infinite input pixel makes the outputs whose windows cover it non-finite. Direct,
    im2col and GEMM paths touch no other output; Winograd spreads it over every output of the
    tiles whose input tiles hold it (NaN from inf - inf in the transforms): documented in the
    README beside ``explain``."""
    from test_cpu_conv import _algo

    from fastconv._args import conv_geometry
    from fastconv.kernels import cpu

    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    x[0, 2, 7, 9] = np.inf
    if variant.startswith("gemm1x1"):
        w, pad, expect = np.ones((4, 8, 1, 1), np.float32), 0, (slice(7, 8), slice(9, 10))
    else:
        w, pad, expect = np.ones((4, 8, 3, 3), np.float32), 1, (slice(6, 9), slice(8, 11))
    geom = conv_geometry(x.shape, w.shape, 1, pad, 1, 1)
    y = cpu.conv2d_forward(x, w, None, geom, _algo(variant))
    bad = ~np.isfinite(y[0, 0])
    window = np.zeros((16, 16), bool)
    window[expect] = True
    assert bad[window].all()
    if not variant.startswith("winograd"):
        np.testing.assert_array_equal(bad, window)


@pytest.mark.parametrize("variant", [v.values[0] for v in _cpu_variants()
                                     if not v.values[0].startswith("winograd")])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_inf_pixel_weight_grad(variant, groups):
    """An infinite pixel at the start of a row reaches only the weight gradient's taps that
    read it: the others stay finite and match the reference (the stride-1 direct kernels run
    over rows padded past the last column, where a zero times the next row's infinite pixel
    once made every tap NaN). Two paddings: outputs as wide as the input, and one narrower
    (a one-sided column pad), which the direct kernels compute on padded copies."""
    from test_cpu_conv import _algo

    from fastconv import reference
    from fastconv._args import conv_geometry
    from fastconv.kernels import cpu

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 9, 7)).astype(np.float32)
    x[1, 3, 4, 0] = np.inf
    if variant.startswith("gemm1x1"):
        w_shape, pads = (8, 8 // groups, 1, 1), [0]
    else:
        w_shape, pads = (8, 8 // groups, 3, 3), [1, ((1, 1), (0, 1))]
    for pad in pads:
        geom = conv_geometry(x.shape, w_shape, 1, pad, 1, groups)
        gy = rng.standard_normal(geom.output_shape).astype(np.float32)
        try:
            gw = cpu.conv2d_weight_grad(x, gy, geom, _algo(variant))
        except ValueError:
            pytest.skip(f"{variant} does not run groups={groups}")
        ref = reference.conv2d_weight_grad(x.astype(np.float64), gy.astype(np.float64), geom)
        np.testing.assert_array_equal(np.isfinite(gw), np.isfinite(ref))
        assert not np.isfinite(ref).all() and np.isfinite(ref).any()
        finite = np.isfinite(ref)
        np.testing.assert_allclose(gw[finite], ref[finite], rtol=1e-5, atol=1e-5)
