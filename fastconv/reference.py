"""The NumPy reference backend: the test oracle, written from the mathematics.

Readable first, vectorised over everything but the ``R * S`` kernel taps. Every function
computes in float64 and returns the input's dtype, so float32 kernels are checked against a
result that is accurate to float64 rounding. It never calls another fastconv backend.

Forward (PyTorch's cross-correlation, NCHW, ``weight (K, C/groups, R, S)``)::

    y[n, k, p, q] = sum_{c, r, s} w[k, c, r, s] * xpad[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw]

with ``g = k // (K / groups)`` and ``Cg = C / groups``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ._types import Algo, ConvGeometry


def _pad(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    pt, pb, pl, pr = geom.padding
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def _window(xpad: np.ndarray, r: int, s: int, geom: ConvGeometry) -> np.ndarray:
    """The input pixels that kernel tap ``(r, s)`` meets at every output position:
    ``xpad[:, :, p*sh + r*dh, q*sw + s*dw]`` for all ``p, q``, shape ``(N, C, P, Q)``."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    top, left = r * dh, s * dw
    return xpad[:, :, top:top + sh * (geom.P - 1) + 1:sh, left:left + sw * (geom.Q - 1) + 1:sw]


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """``(N, G*X, P, Q) -> (N, G, X, P, Q)``."""
    n, gx = a.shape[:2]
    return a.reshape(n, groups, gx // groups, *a.shape[2:])


def conv2d_forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
                   geom: ConvGeometry, algo: Optional[Algo] = None) -> np.ndarray:
    """Convolution forward. x ``(N, C, H, W)``, weight ``(K, C/G, R, S)``, bias ``(K,)`` or
    None; returns ``(N, K, P, Q)``."""
    G = geom.groups
    xpad = _pad(x.astype(np.float64), geom)
    w = weight.astype(np.float64).reshape(G, geom.K // G, geom.C // G, geom.R, geom.S)
    y = np.zeros((geom.N, G, geom.K // G, geom.P, geom.Q))
    for r in range(geom.R):
        for s in range(geom.S):
            win = _grouped(_window(xpad, r, s, geom), G)          # (N, G, Cg, P, Q)
            y += np.einsum("ngcpq,gkc->ngkpq", win, w[:, :, :, r, s])
    y = y.reshape(geom.output_shape)
    if bias is not None:
        y += bias.astype(np.float64)[None, :, None, None]
    return y.astype(x.dtype)


def _dilate(grad_output: np.ndarray, stride: tuple[int, int]) -> np.ndarray:
    """Insert ``stride - 1`` zeros between neighbouring output-gradient pixels."""
    sh, sw = stride
    n, k, p, q = grad_output.shape
    out = np.zeros((n, k, (p - 1) * sh + 1, (q - 1) * sw + 1), dtype=grad_output.dtype)
    out[:, :, ::sh, ::sw] = grad_output
    return out


def conv2d_input_grad(weight: np.ndarray, grad_output: np.ndarray, geom: ConvGeometry,
                      algo: Optional[Algo] = None) -> np.ndarray:
    """Gradient of the loss with respect to the input, ``(N, C, H, W)``.

    As the lecture notes show (7.5), the backward pass of a convolution is a correlation: the
    output gradient, stride-dilated and padded by the dilated kernel extent minus one, is
    correlated (a forward conv with stride 1) with the 180-degree rotated kernel whose input and
    output channels are swapped within each group. That yields the gradient of the padded input,
    whose interior is the answer.
    """
    G, K, Cg = geom.groups, geom.K, geom.C // geom.groups
    (dh, dw), (pt, pb, pl, pr) = geom.dilation, geom.padding
    gy = _dilate(grad_output.astype(np.float64), geom.stride)
    Hp, Wp = geom.H + pt + pb, geom.W + pl + pr
    ext_r, ext_s = dh * (geom.R - 1), dw * (geom.S - 1)
    # Rows of the padded input that no output window reaches (the remainder of the floor in
    # P's formula) get zero gradient: pad the bottom/right far enough to cover them.
    pad = (ext_r, Hp - gy.shape[2], ext_s, Wp - gy.shape[3])
    w = weight.astype(np.float64).reshape(G, K // G, Cg, geom.R, geom.S)
    w_rot = w[..., ::-1, ::-1].transpose(0, 2, 1, 3, 4).reshape(geom.C, K // G, geom.R, geom.S)
    corr = ConvGeometry(geom.N, K, gy.shape[2], gy.shape[3], geom.C, geom.R, geom.S, Hp, Wp,
                        (1, 1), pad, geom.dilation, G)
    grad_padded = conv2d_forward(gy, w_rot, None, corr)
    return grad_padded[:, :, pt:pt + geom.H, pl:pl + geom.W].astype(grad_output.dtype)


def conv2d_weight_grad(x: np.ndarray, grad_output: np.ndarray, geom: ConvGeometry,
                       algo: Optional[Algo] = None) -> np.ndarray:
    """Gradient with respect to the weight, ``(K, C/G, R, S)``:
    ``gw[k, c, r, s] = sum_{n, p, q} gy[n, k, p, q] * xpad[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw]``.
    """
    G = geom.groups
    xpad = _pad(x.astype(np.float64), geom)
    gy = _grouped(grad_output.astype(np.float64), G)                  # (N, G, Kg, P, Q)
    gw = np.zeros((G, geom.K // G, geom.C // G, geom.R, geom.S))
    for r in range(geom.R):
        for s in range(geom.S):
            win = _grouped(_window(xpad, r, s, geom), G)              # (N, G, Cg, P, Q)
            gw[:, :, :, r, s] = np.einsum("ngkpq,ngcpq->gkc", gy, win)
    return gw.reshape(geom.weight_shape).astype(x.dtype)


def conv2d_bias_grad(grad_output: np.ndarray, algo: Optional[Algo] = None) -> np.ndarray:
    """Gradient with respect to the bias, ``(K,)``: the sum of ``grad_output`` over N, P, Q."""
    return grad_output.astype(np.float64).sum(axis=(0, 2, 3)).astype(grad_output.dtype)


def hinge_loss_rows(scores: np.ndarray, labels: np.ndarray, margin: float, p: int,
                    class_weight: np.ndarray, row_scale: np.ndarray, want_grad: bool,
                    algo: Optional[Algo] = None):
    """Per-row multiclass hinge loss and, if ``want_grad``, its row-scaled gradient.

    ``l_i = w[y_i] * sum_{j != y_i} max(0, s_ij - s_{i y_i} + margin) ** p``; scores
    ``(N, C)``, labels ``(N,)``; returns ``(losses (N,), grad (N, C) or None)``. At the kink
    the subgradient 0 is taken. A row with a NaN score has a NaN loss and a NaN gradient row
    (the rule of every backend); infinities follow IEEE arithmetic.
    """
    s = scores.astype(np.float64)
    nan_rows = np.isnan(s).any(axis=1)
    rows = np.arange(s.shape[0])
    with np.errstate(invalid="ignore"):                                 # inf - inf is NaN
        m = s - s[rows, labels][:, None] + margin                       # margins (N, C)
    m[rows, labels] = 0.0                                               # j == y_i does not count
    h = np.maximum(m, 0.0)
    wy = class_weight.astype(np.float64)[labels]                        # (N,)
    losses = wy * (h if p == 1 else h * h).sum(axis=1)
    losses[nan_rows] = np.nan
    if not want_grad:
        return losses.astype(scores.dtype), None
    d = (m > 0).astype(np.float64) if p == 1 else 2.0 * h               # d l_i / d s_ij, j != y
    d[rows, labels] = -d.sum(axis=1)
    grad = d * (wy * row_scale.astype(np.float64))[:, None]
    grad[nan_rows] = np.nan
    return losses.astype(scores.dtype), grad.astype(scores.dtype)
