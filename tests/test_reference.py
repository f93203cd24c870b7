"""The reference (and every CPU backend) against slow loops; property-based over random
valid configurations with hypothesis."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastconv
from fastconv._args import conv_geometry

import loops
from conftest import CASES, assert_close

SMALL = [c for c in CASES if c.N * c.K * c.C * c.H * c.W * c.R * c.S // c.groups < 60000]


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_reference_matches_loops(case):
    x, w, b = case.arrays(np.float64, seed=11)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation,
                         case.groups)
    gy = np.random.default_rng(12).standard_normal(geom.output_shape)
    kw = dict(case.kwargs, backend="reference")
    assert_close(fastconv.conv2d(x, w, b, **kw), loops.conv2d(x, w, b, geom))
    assert_close(fastconv.conv2d_input_grad(x.shape, w, gy, **kw),
                 loops.conv2d_input_grad(w, gy, geom))
    assert_close(fastconv.conv2d_weight_grad(x, w.shape, gy, **kw),
                 loops.conv2d_weight_grad(x, gy, geom))


def _padding():
    side = st.integers(0, 2)
    return st.one_of(st.integers(0, 2), st.tuples(side, side),
                     st.tuples(st.tuples(side, side), st.tuples(side, side)),
                     st.sampled_from(["valid", "same"]))


@st.composite
def configs(draw):
    """A random valid small convolution: shapes, options and a seed."""
    groups = draw(st.integers(1, 3))
    C = groups * draw(st.integers(1, 2))
    K = groups * draw(st.integers(1, 2))
    R, S = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(_padding())
    H = draw(st.integers(dilation[0] * (R - 1) + 1, 7))
    W = draw(st.integers(dilation[1] * (S - 1) + 1, 7))
    N = draw(st.integers(1, 2))
    return dict(N=N, C=C, H=H, W=W, K=K, R=R, S=S, stride=stride, padding=padding,
                dilation=dilation, groups=groups, seed=draw(st.integers(0, 2**16)))


def _check_against_loops(cfg, backend, dtype):
    rng = np.random.default_rng(cfg["seed"])
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"]))
    w = rng.standard_normal((cfg["K"], cfg["C"] // cfg["groups"], cfg["R"], cfg["S"]))
    b = rng.standard_normal(cfg["K"])
    opts = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    geom = conv_geometry(x.shape, w.shape, **opts)
    gy = rng.standard_normal(geom.output_shape)
    xd, wd, bd, gyd = (a.astype(dtype) for a in (x, w, b, gy))
    kw = dict(opts, backend=backend)
    # The loops see the same rounded inputs, in float64.
    xr, wr, br, gyr = (a.astype(np.float64) for a in (xd, wd, bd, gyd))
    assert_close(fastconv.conv2d(xd, wd, bd, **kw), loops.conv2d(xr, wr, br, geom), dtype)
    assert_close(fastconv.conv2d_input_grad(x.shape, wd, gyd, **kw),
                 loops.conv2d_input_grad(wr, gyr, geom), dtype)
    assert_close(fastconv.conv2d_weight_grad(xd, w.shape, gyd, **kw),
                 loops.conv2d_weight_grad(xr, gyr, geom), dtype)
    assert_close(fastconv.conv2d_bias_grad(gyd, backend=backend), gyr.sum(axis=(0, 2, 3)),
                 dtype)


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_random_configs_match_loops(backend_name, dtype, cfg):
    _check_against_loops(cfg, backend_name, dtype)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 6), C=st.integers(1, 7), p=st.sampled_from([1, 2]),
       margin=st.floats(0.0, 2.0), weighted=st.booleans(), seed=st.integers(0, 2**16),
       backend_name=st.sampled_from(["reference", "cpu"]))
def test_random_hinge_matches_loops(N, C, p, margin, weighted, seed, backend_name):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((N, C))
    labels = rng.integers(0, C, N)
    weight = rng.uniform(0.5, 2.0, C) if weighted else None
    losses, grad = loops.hinge_rows(scores, labels, margin, p, weight)
    kw = dict(margin=margin, p=p, weight=weight, backend=backend_name)
    assert_close(fastconv.hinge_loss(scores, labels, reduction="none", **kw), losses)
    loss, g = fastconv.hinge_loss_and_grad(scores, labels, reduction="sum", **kw)
    assert_close(np.asarray(loss), losses.sum())
    assert_close(g, grad)
