"""Slow, obviously-correct loop implementations: the oracle's oracle.

Written straight from the definitions, with explicit bounds checks instead of padded copies,
and the gradients in scatter form (each output pixel hands its gradient back to every input
pixel and weight it touched), so they share no idea with the reference's correlation form.
"""
from __future__ import annotations

import numpy as np


def _taps(geom):
    """Yield ``(n, k, c_in, c, p, q, r, s, i, j)`` for every multiply of the forward pass that
    lands inside the (unpadded) input: ``y[n,k,p,q] += w[k,c,r,s] * x[n,c_in,i,j]``."""
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    pt, _, pl, _ = geom.padding
    Kg, Cg = geom.K // geom.groups, geom.C // geom.groups
    for n in range(geom.N):
        for k in range(geom.K):
            g = k // Kg
            for p in range(geom.P):
                for q in range(geom.Q):
                    for c in range(Cg):
                        for r in range(geom.R):
                            for s in range(geom.S):
                                i, j = p * sh + r * dh - pt, q * sw + s * dw - pl
                                if 0 <= i < geom.H and 0 <= j < geom.W:
                                    yield n, k, g * Cg + c, c, p, q, r, s, i, j


def conv2d(x, w, b, geom):
    y = np.zeros(geom.output_shape)
    for n, k, ci, c, p, q, r, s, i, j in _taps(geom):
        y[n, k, p, q] += w[k, c, r, s] * x[n, ci, i, j]
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return y


def conv2d_input_grad(w, gy, geom):
    gx = np.zeros(geom.input_shape)
    for n, k, ci, c, p, q, r, s, i, j in _taps(geom):
        gx[n, ci, i, j] += gy[n, k, p, q] * w[k, c, r, s]
    return gx


def conv2d_weight_grad(x, gy, geom):
    gw = np.zeros(geom.weight_shape)
    for n, k, ci, c, p, q, r, s, i, j in _taps(geom):
        gw[k, c, r, s] += gy[n, k, p, q] * x[n, ci, i, j]
    return gw


def hinge_rows(scores, labels, margin, p, weight):
    """Per-row losses and d l_i / d s_i, one element at a time."""
    N, C = scores.shape
    losses, grad = np.zeros(N), np.zeros((N, C))
    for i in range(N):
        y = labels[i]
        wy = 1.0 if weight is None else float(weight[y])
        for j in range(C):
            if j == y:
                continue
            m = float(scores[i, j]) - float(scores[i, y]) + margin
            if m > 0:
                losses[i] += wy * m ** p
                d = wy * (1.0 if p == 1 else 2.0 * m)
                grad[i, j] += d
                grad[i, y] -= d
    return losses, grad
