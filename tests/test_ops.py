"""Every backend against the float64 reference on the shared case list, all four conv ops."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv
from fastconv import reference
from fastconv._args import conv_geometry

from conftest import assert_close, to_backend, to_host


def _ref_all(case, x, w, b):
    geom = conv_geometry(x.shape, w.shape, case.stride, case.padding, case.dilation, case.groups)
    y = reference.conv2d_forward(x, w, b, geom)
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(x.dtype)
    return geom, y, gy


def test_forward(backend, case, dtype):
    x, w, b = case.arrays(dtype)
    _, ref, _ = _ref_all(case, x, w, b)
    d = lambda a: to_backend(a, backend)  # noqa: E731
    out = fastconv.conv2d(d(x), d(w), d(b), **case.kwargs, backend=backend)
    assert out.dtype == dtype
    assert_close(out, ref)


def test_input_grad(backend, case, dtype):
    x, w, b = case.arrays(dtype)
    geom, _, gy = _ref_all(case, x, w, b)
    ref = reference.conv2d_input_grad(w, gy, geom)
    out = fastconv.conv2d_input_grad(x.shape, to_backend(w, backend), to_backend(gy, backend),
                                     **case.kwargs, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref)


def test_weight_grad(backend, case, dtype):
    x, w, b = case.arrays(dtype)
    geom, _, gy = _ref_all(case, x, w, b)
    ref = reference.conv2d_weight_grad(x, gy, geom)
    out = fastconv.conv2d_weight_grad(to_backend(x, backend), w.shape, to_backend(gy, backend),
                                      **case.kwargs, backend=backend)
    assert out.shape == w.shape and out.dtype == dtype
    assert_close(out, ref)


def test_bias_grad(backend, case, dtype):
    x, w, b = case.arrays(dtype)
    _, _, gy = _ref_all(case, x, w, b)
    out = fastconv.conv2d_bias_grad(to_backend(gy, backend), backend=backend)
    assert out.shape == (case.K,) and out.dtype == dtype
    assert_close(out, gy.astype(np.float64).sum(axis=(0, 2, 3)), dtype)


def test_unbatched_input(backend, dtype):
    """A (C, H, W) input works like PyTorch: as a batch of one, without the batch axis."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6, 5)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    d = lambda a: to_backend(a, backend)  # noqa: E731
    out = fastconv.conv2d(d(x), d(w), padding=1, backend=backend)
    ref = fastconv.conv2d(x[None], w, padding=1, backend="reference")[0]
    assert out.shape == (4, 6, 5)
    assert_close(out, ref)
    gy = rng.standard_normal(out.shape).astype(dtype)
    gx = fastconv.conv2d_input_grad(x.shape, d(w), d(gy), padding=1, backend=backend)
    gw = fastconv.conv2d_weight_grad(d(x), w.shape, d(gy), padding=1, backend=backend)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert_close(gx, fastconv.conv2d_input_grad((1,) + x.shape, w, gy[None], padding=1,
                                                backend="reference")[0])
    assert_close(gw, fastconv.conv2d_weight_grad(x[None], w.shape, gy[None], padding=1,
                                                 backend="reference"))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(backend, layout):
    """Views that are not C-contiguous give the same answer as their contiguous copies."""
    rng = np.random.default_rng(4)
    if layout == "transposed":
        x = rng.standard_normal((6, 5, 3, 2)).astype(np.float32).transpose(3, 2, 1, 0)
        w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32).transpose(3, 2, 1, 0)
    else:
        x = rng.standard_normal((2, 6, 12, 10)).astype(np.float32)[:, ::2, ::2, ::2]
        w = rng.standard_normal((4, 6, 3, 6)).astype(np.float32)[:, ::2, :, ::2]
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    ref = fastconv.conv2d(np.ascontiguousarray(x), np.ascontiguousarray(w), padding=1,
                          backend="reference")
    d = lambda a: to_backend(a, backend)  # noqa: E731
    out = fastconv.conv2d(d(x), d(w), padding=1, backend=backend)
    assert_close(out, ref)
    gy = rng.standard_normal(ref.shape).astype(np.float32)[..., ::-1]
    gw = fastconv.conv2d_weight_grad(d(x), w.shape, d(gy), padding=1, backend=backend)
    assert_close(gw, fastconv.conv2d_weight_grad(np.ascontiguousarray(x), w.shape,
                                                 np.ascontiguousarray(gy), padding=1,
                                                 backend="reference"))


def test_repeatable(backend):
    """The same call twice gives bit-identical results (no order-dependent reductions)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    d = lambda a: to_backend(a, backend)  # noqa: E731
    runs = [(to_host(fastconv.conv2d(d(x), d(w), padding=1, backend=backend)),
             to_host(fastconv.conv2d_weight_grad(d(x), w.shape, d(gy), padding=1,
                                                 backend=backend)),
             to_host(fastconv.conv2d_input_grad(x.shape, d(w), d(gy), padding=1,
                                                backend=backend)))
            for _ in range(2)]
    for a, b in zip(*runs):
        assert np.array_equal(a, b)
