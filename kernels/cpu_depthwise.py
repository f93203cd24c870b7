"""Direct-loop cpu conv kernels for depthwise and grouped layers (any geometry, no workspace).

With few input channels per group (``C / groups`` of 1 for depthwise) a GEMM has nothing to
multiply; each output plane is instead a sum of ``Cg * R * S`` shifted, scaled input rows.
The loops run over whole rows, so for stride 1 they vectorise. Being workspace-free, these
kernels are also the fallback when not even one row of an im2col chunk fits the bound.

Parallel over output planes (forward), input planes (input gradient: each thread scatters
only into the ``(n, c)`` plane it owns, so there are no atomics) and filters (weight gradient,
reduced over the batch in a fixed order with float64 accumulators).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from .cpu_conv import valid_range


@njit(parallel=True, cache=True)
def _forward(x, weight, bias, y, sh, sw, pt, pl, dh, dw):
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    P, Q = y.shape[2], y.shape[3]
    Kg = K // (C // Cg)
    for task in prange(N * K):
        n = task // K
        k = task - n * K
        c0 = (k // Kg) * Cg
        for p in range(P):
            for q in range(Q):
                y[n, k, p, q] = bias[k]
        for cl in range(Cg):
            for r in range(R):
                for s in range(S):
                    wv = weight[k, cl, r, s]
                    q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                    w0 = q_lo * sw + s * dw - pl
                    for p in range(P):
                        h = p * sh - pt + r * dh
                        if 0 <= h < H:
                            for q in range(q_lo, q_hi):
                                y[n, k, p, q] += wv * x[n, c0 + cl, h, w0 + (q - q_lo) * sw]


@njit(parallel=True, cache=True)
def _input_grad(weight, grad_output, gx, sh, sw, pt, pl, dh, dw):
    N, C, H, W = gx.shape
    K, Cg, R, S = weight.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    for task in prange(N * C):
        n = task // C
        c = task - n * C
        g = c // Cg
        cl = c - g * Cg
        for h in range(H):
            for w in range(W):
                gx[n, c, h, w] = 0
        for kl in range(Kg):
            k = g * Kg + kl
            for r in range(R):
                for s in range(S):
                    wv = weight[k, cl, r, s]
                    q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                    w0 = q_lo * sw + s * dw - pl
                    for p in range(P):
                        h = p * sh - pt + r * dh
                        if 0 <= h < H:
                            for q in range(q_lo, q_hi):
                                gx[n, c, h, w0 + (q - q_lo) * sw] += wv * grad_output[n, k, p, q]


@njit(parallel=True, cache=True)
def _weight_grad(x, grad_output, gw, sh, sw, pt, pl, dh, dw):
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    for task in prange(K * Cg):
        k = task // Cg
        cl = task - k * Cg
        c = (k // Kg) * Cg + cl
        lanes = np.empty(Q)     # one float64 accumulator per q: vectorises, fixed order
        for r in range(R):
            for s in range(S):
                q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                w0 = q_lo * sw + s * dw - pl
                lanes[:] = 0
                for n in range(N):
                    for p in range(P):
                        h = p * sh - pt + r * dh
                        if 0 <= h < H:
                            for q in range(q_lo, q_hi):
                                lanes[q] += (grad_output[n, k, p, q]
                                             * x[n, c, h, w0 + (q - q_lo) * sw])
                gw[k, cl, r, s] = lanes.sum()


def _geometry_args(geom) -> tuple[int, ...]:
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    return sh, sw, geom.padding[0], geom.padding[2], dh, dw


def forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
            algo) -> np.ndarray:
    """Direct conv forward: x ``(N, C, H, W)``, weight ``(K, C/G, R, S)``; ``(N, K, P, Q)``."""
    y = np.empty(geom.output_shape, dtype=x.dtype)
    b = bias if bias is not None else np.zeros(geom.K, dtype=x.dtype)
    _forward(x, weight, b, y, *_geometry_args(geom))
    return y


def input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Direct input gradient ``(N, C, H, W)``."""
    gx = np.empty(geom.input_shape, dtype=grad_output.dtype)
    _input_grad(weight, grad_output, gx, *_geometry_args(geom))
    return gx


def weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Direct weight gradient ``(K, C/G, R, S)``."""
    gw = np.empty(geom.weight_shape, dtype=x.dtype)
    _weight_grad(x, grad_output, gw, *_geometry_args(geom))
    return gw
