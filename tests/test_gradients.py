"""Gradients checked three independent ways: central finite differences in float64, the adjoint
identity (reverse mode against forward mode, no differences), and the lecture notes' worked
examples (7.5: an impulse through a conv gives the rotated kernel, and the backward pass is a
correlation with it; 7.2: the chain rule through a small network)."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv

from conftest import CASES, central_difference, to_backend, to_host

FD_CASES = [c for c in CASES if c.name in ("stride2", "dilation2", "groups2", "depthwise_x2",
                                           "mixed", "same_s2", "1x1_s2", "wino3x3_valid")]


def _d(backend):
    return lambda a: to_backend(a, backend)


@pytest.mark.parametrize("case", FD_CASES, ids=[c.name for c in FD_CASES])
def test_finite_differences(backend, case):
    """d/dtheta of L = sum(conv(x, w, b) * U) at random coordinates of x, w and b."""
    d = _d(backend)
    x, w, b = case.arrays(np.float64, seed=21)
    u = np.random.default_rng(22).standard_normal(
        fastconv.conv2d(x, w, b, **case.kwargs, backend="reference").shape)
    loss = lambda: float((to_host(fastconv.conv2d(d(x), d(w), d(b), **case.kwargs,  # noqa: E731
                                                  backend=backend)) * u).sum())
    grads = {
        "x": to_host(fastconv.conv2d_input_grad(x.shape, d(w), d(u), **case.kwargs,
                                                backend=backend)),
        "w": to_host(fastconv.conv2d_weight_grad(d(x), w.shape, d(u), **case.kwargs,
                                                 backend=backend)),
        "b": to_host(fastconv.conv2d_bias_grad(d(u), backend=backend)),
    }
    rng = np.random.default_rng(23)
    for name, arr in (("x", x), ("w", w), ("b", b)):
        for flat in rng.choice(arr.size, size=min(arr.size, 12), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            fd = central_difference(loss, arr, idx)
            assert abs(fd - grads[name][idx]) <= 1e-6 * max(1.0, abs(fd)), (name, idx)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adjoint_identity(backend, case):
    """<conv(v), u> == <v, input_grad(u)> and <conv_x(w), u> == <w, weight_grad(x, u)>: the
    input and weight gradients are the exact transposes (adjoints) of the linear maps."""
    d = _d(backend)
    x, w, _ = case.arrays(np.float64, seed=31)
    y = to_host(fastconv.conv2d(d(x), d(w), **case.kwargs, backend=backend))
    u = np.random.default_rng(32).standard_normal(y.shape)
    gx = to_host(fastconv.conv2d_input_grad(x.shape, d(w), d(u), **case.kwargs,
                                            backend=backend))
    gw = to_host(fastconv.conv2d_weight_grad(d(x), w.shape, d(u), **case.kwargs,
                                             backend=backend))
    lhs = float((y * u).sum())
    assert lhs == pytest.approx(float((x * gx).sum()), rel=1e-11, abs=1e-11)
    assert lhs == pytest.approx(float((w * gw).sum()), rel=1e-11, abs=1e-11)


KERNEL_7_5 = np.arange(1.0, 10.0).reshape(3, 3)  # a..i of the notes as 1..9


def test_impulse_gives_rotated_kernel(backend):
    """Notes 7.5: the kernel applied to an image holding a single 1 shows the kernel rotated by
    180 degrees (i h g / f e d / c b a) around the impulse."""
    d = _d(backend)
    image = np.zeros((1, 1, 5, 5))
    image[0, 0, 2, 2] = 1.0
    out = to_host(fastconv.conv2d(d(image), d(KERNEL_7_5[None, None]), padding=1,
                                  backend=backend))[0, 0]
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = KERNEL_7_5[::-1, ::-1]
    np.testing.assert_array_equal(out, expected)


def test_backward_is_correlation_with_rotated_kernel(backend):
    """Notes 7.5: grad_I(x, y) = sum_{dx, dy} grad_O(x + dx, y + dy) k(-dx, -dy), i.e. the input
    gradient is the output gradient correlated with the rotated kernel."""
    d = _d(backend)
    gy = np.random.default_rng(41).standard_normal((1, 1, 6, 7))
    gx = to_host(fastconv.conv2d_input_grad((1, 1, 6, 7), d(KERNEL_7_5[None, None]), d(gy),
                                            padding=1, backend=backend))[0, 0]
    rotated = fastconv.conv2d(gy, KERNEL_7_5[::-1, ::-1][None, None].copy(), padding=1,
                              backend="reference")[0, 0]
    np.testing.assert_allclose(gx, rotated, rtol=1e-12, atol=1e-12)
    k = lambda dx, dy: KERNEL_7_5[1 + dx, 1 + dy]  # noqa: E731  k centred at (0, 0)
    g = np.pad(gy[0, 0], 1)
    for x in range(6):
        for y in range(7):
            want = sum(g[1 + x + dx, 1 + y + dy] * k(-dx, -dy)
                       for dx in (-1, 0, 1) for dy in (-1, 0, 1))
            assert gx[x, y] == pytest.approx(want, rel=1e-12, abs=1e-12)


class _TwoLayerNet:
    """Notes 7.2 in convolutional form: conv -> ReLU -> conv -> hinge loss."""

    def __init__(self, backend, rng):
        self.backend, self.d = backend, _d(backend)
        self.x = rng.standard_normal((3, 2, 6, 6))
        self.w1 = rng.standard_normal((4, 2, 3, 3)) * 0.5
        self.b1 = rng.standard_normal(4) * 0.1
        self.w2 = rng.standard_normal((5, 4, 4, 4)) * 0.3  # 6x6, stride 2 -> 2x2
        self.labels = np.array([0, 3, 4])

    def forward(self):
        d, be = self.d, self.backend
        self.a = to_host(fastconv.conv2d(d(self.x), d(self.w1), d(self.b1), padding=1,
                                         backend=be))
        self.h = np.maximum(self.a, 0.0)
        s = to_host(fastconv.conv2d(d(self.h), d(self.w2), stride=2, backend=be))  # (3,5,2,2)
        self.scores = s.sum(axis=(2, 3))
        return float(to_host(fastconv.hinge_loss(d(self.scores), d(self.labels), backend=be)))

    def backward(self):
        """Reverse mode: from the loss back to every parameter, one op at a time."""
        d, be = self.d, self.backend
        gs = to_host(fastconv.hinge_loss_grad(d(self.scores), d(self.labels), backend=be))
        gs4 = np.broadcast_to(gs[:, :, None, None], (3, 5, 2, 2)).copy()
        gw2 = fastconv.conv2d_weight_grad(d(self.h), self.w2.shape, d(gs4), stride=2,
                                          backend=be)
        gh = to_host(fastconv.conv2d_input_grad(self.h.shape, d(self.w2), d(gs4), stride=2,
                                                backend=be))
        ga = gh * (self.a > 0)
        gw1 = fastconv.conv2d_weight_grad(d(self.x), self.w1.shape, d(ga), padding=1, backend=be)
        gb1 = fastconv.conv2d_bias_grad(d(ga), backend=be)
        gx = fastconv.conv2d_input_grad(self.x.shape, d(self.w1), d(ga), padding=1, backend=be)
        return {"w2": to_host(gw2), "w1": to_host(gw1), "b1": to_host(gb1), "x": to_host(gx)}


def test_chain_rule_two_layer_network(backend):
    """Notes 7.2/7.4: the reverse-mode gradient of the whole chain equals finite differences."""
    net = _TwoLayerNet(backend, np.random.default_rng(51))
    net.forward()
    grads = net.backward()
    assert any(np.any(g != 0) for g in grads.values())
    rng = np.random.default_rng(52)
    for name, g in grads.items():
        arr = getattr(net, name)
        for flat in rng.choice(arr.size, size=min(arr.size, 8), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            fd = central_difference(net.forward, arr, idx)
            assert abs(fd - g[idx]) <= 1e-6 * max(1.0, abs(fd)), (name, idx, fd, g[idx])
