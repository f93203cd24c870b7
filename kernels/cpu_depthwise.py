"""Direct-loop cpu conv kernels for depthwise and grouped layers (any geometry, no workspace).

With few input channels per group (``C / groups`` of 1 for depthwise) a GEMM has nothing to
multiply; each output plane is instead a sum of ``Cg * R * S`` shifted, scaled input rows.
The loops run over whole rows with flat unsigned indices (no negative-index checks), so for
stride 1 they vectorise. Being workspace-free, these
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
    xf, yf = x.reshape(x.size), y.reshape(y.size)
    usw = np.uint64(sw)
    for task in prange(N * K):
        n = task // K
        k = task - n * K
        c0 = (k // Kg) * Cg
        out = np.uint64(task * P * Q)
        for e in range(np.uint64(P * Q)):
            yf[out + e] = bias[k]
        for cl in range(Cg):
            plane = np.uint64((n * C + c0 + cl) * H * W)
            for r in range(R):
                for s in range(S):
                    wv = weight[k, cl, r, s]
                    q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                    for p in range(P):
                        h = p * sh - pt + r * dh
                        if 0 <= h < H:
                            dst = out + np.uint64(p * Q + q_lo)
                            src = plane + np.uint64(h * W + q_lo * sw + s * dw - pl)
                            for q in range(np.uint64(q_hi - q_lo)):
                                yf[dst + q] += wv * xf[src + q * usw]


@njit(parallel=True, cache=True)
def _input_grad(weight, grad_output, gx, sh, sw, pt, pl, dh, dw):
    N, C, H, W = gx.shape
    K, Cg, R, S = weight.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    gf, dyf = gx.reshape(gx.size), grad_output.reshape(grad_output.size)
    usw = np.uint64(sw)
    for task in prange(N * C):
        n = task // C
        c = task - n * C
        g = c // Cg
        cl = c - g * Cg
        plane = np.uint64(task * H * W)
        for e in range(np.uint64(H * W)):
            gf[plane + e] = 0
        for kl in range(Kg):
            k = g * Kg + kl
            out = np.uint64((n * K + k) * P * Q)
            for r in range(R):
                for s in range(S):
                    wv = weight[k, cl, r, s]
                    q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                    for p in range(P):
                        h = p * sh - pt + r * dh
                        if 0 <= h < H:
                            src = out + np.uint64(p * Q + q_lo)
                            dst = plane + np.uint64(h * W + q_lo * sw + s * dw - pl)
                            for q in range(np.uint64(q_hi - q_lo)):
                                gf[dst + q * usw] += wv * dyf[src + q]


@njit(parallel=True, cache=True)
def _weight_grad(x, grad_output, gw, sh, sw, pt, pl, dh, dw):
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    xf, dyf = x.reshape(x.size), grad_output.reshape(grad_output.size)
    usw = np.uint64(sw)
    for task in prange(K * Cg):
        k = task // Cg
        cl = task - k * Cg
        c = (k // Kg) * Cg + cl
        lanes = np.empty(Q)     # one float64 accumulator per q: vectorises, fixed order
        for r in range(R):
            for s in range(S):
                q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                lanes[:] = 0
                for n in range(N):
                    out = np.uint64((n * K + k) * P * Q)
                    plane = np.uint64((n * C + c) * H * W)
                    for p in range(P):
                        h = p * sh - pt + r * dh
                        if 0 <= h < H:
                            src_dy = out + np.uint64(p * Q + q_lo)
                            src_x = plane + np.uint64(h * W + q_lo * sw + s * dw - pl)
                            for q in range(np.uint64(q_hi - q_lo)):
                                lanes[q] += dyf[src_dy + q] * xf[src_x + q * usw]
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
