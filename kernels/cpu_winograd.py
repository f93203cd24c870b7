"""Winograd F(m x m, 3 x 3) convolution for 3x3, stride-1, undilated layers (m = 2 or 4).

An output tile of ``m x m`` pixels is computed from an ``A x A`` input tile (``A = m + 2``) as
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    Y = AT [ (G g G^T) (.) (BT d BT^T) ] AT^T            (.) elementwise

so the ``m * m * 9`` multiplies of a direct tile become ``A * A`` (F(2x2): 2.25x fewer, F(4x4):
4x fewer). Summed over channels, each of the ``A * A`` transform points is one GEMM::

    M[xi] (K, T) = U[xi] (K, C) @ V[xi] (C, T)        xi = a * A + b, T = tiles

Layouts: ``V (A*A, C, T)``, ``M (A*A, K, T)`` with tiles ordered ``(image, tile row, tile
column)``. Groups split ``C`` and ``K`` into ``G`` blocks and the GEMMs are batched over them.

The same transforms give the three conv ops of these layers:

* forward: the formula above, out-of-range input pixels read as zero (any padding);
* input gradient: a 3x3 stride-1 correlation of ``grad_output`` with the 180-degree rotated,
  channel-transposed kernel, i.e. the forward pass with offsets ``pt - 2``, ``pl - 2``;
* weight gradient: the adjoint of the forward formula,
  ``dU[xi] = sum_T (A dY A^T)[xi] V[xi]^T`` and ``gw = G^T dU G``.

Accuracy (relative, float32, against the float64 reference): about 2e-7 for F(2x2) and 1.5e-6
for F(4x4), the latter because its transforms hold the points 0, +-1, +-2, whose coefficients
up to 8 amplify rounding; both within the 1e-5 bound. The filter transform is done in float64.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from .cpu_workspace import (DEFAULT_CHUNK_BYTES, plan_chunks, scratch, winograd_tile_bytes,
                            workspace_bound)

_BT = {
    2: [[1, 0, -1, 0],
        [0, 1, 1, 0],
        [0, -1, 1, 0],
        [0, 1, 0, -1]],
    4: [[4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1]],
}
_G = {
    2: [[1, 0, 0],
        [1 / 2, 1 / 2, 1 / 2],
        [1 / 2, -1 / 2, 1 / 2],
        [0, 0, 1]],
    4: [[1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1]],
}
_AT = {
    2: [[1, 1, 1, 0],
        [0, 1, -1, -1]],
    4: [[1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1]],
}
TILE_SIZES = (2, 4)


def transforms(m: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(BT (A, A), G (A, 3), AT (m, A))`` of F(m x m, 3 x 3); ``G`` stays float64."""
    return (np.array(_BT[m], dtype=dtype), np.array(_G[m], dtype=np.float64),
            np.array(_AT[m], dtype=dtype))


def tile_grid(P: int, Q: int, m: int) -> tuple[int, int]:
    """Tile rows and columns covering a ``P x Q`` output with ``m x m`` tiles."""
    return -(-P // m), -(-Q // m)


# ---------------------------------------------------------------------------------------------
# Numba kernels: one thread per (image, channel) plane; every inner loop runs over the
# contiguous tiles of that plane, so it vectorises.
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _apply_rows(T, src, dst, A, L):
    """``dst[i, b, l] = sum_j T[b, j] * src[i, j, l]`` for ``src``, ``dst`` of shape
    ``(I, J * L)`` / ``(I, B * L)`` flattened per ``i``: a 1-D transform along the second axis."""
    for i in range(src.shape[0]):
        for b in range(T.shape[0]):
            o = b * L
            for l in range(L):
                dst[i, o + l] = 0
            for j in range(A):
                coef = T[b, j]
                if coef != 0:
                    s = j * L
                    for l in range(L):
                        dst[i, o + l] += coef * src[i, s + l]


@njit(parallel=True, cache=True)
def input_transform(x, BT, V, n0, nc, t0, tc, tw, m, off_h, off_w):
    """``V[a*A + b, c, tile] = (BT d BT^T)[a, b]`` for the input tile ``d`` of each tile
    ``(n, t, tj)`` with ``n`` in ``n0 .. n0 + nc``, ``t`` in ``t0 .. t0 + tc``: rows
    ``t*m + off_h + [0, A)``, columns ``tj*m + off_w + [0, A)`` of ``x``, zero outside."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    A = BT.shape[0]
    L = tc * tw
    for task in prange(nc * C):
        i = task // C
        c = task - i * C
        n = n0 + i
        # patches[ii, j * L + l]: pixel (ii, j) of tile l, gathered once with zero fill
        patches = np.zeros((A, A * L), dtype=V.dtype)
        for t in range(tc):
            for ii in range(A):
                h = (t0 + t) * m + off_h + ii
                if h < 0 or h >= H:
                    continue
                for tj in range(tw):
                    for j in range(A):
                        w = tj * m + off_w + j
                        if 0 <= w < W:
                            patches[ii, j * L + t * tw + tj] = x[n, c, h, w]
        rows = np.empty((A, A * L), dtype=V.dtype)
        _apply_rows(BT, patches, rows, A, L)          # rows[ii, b, l] = (d BT^T)[ii, b]
        base = i * L
        for a in range(A):
            for b in range(A):
                xi = a * A + b
                for l in range(L):
                    V[xi, c, base + l] = 0
                for ii in range(A):
                    coef = BT[a, ii]
                    if coef != 0:
                        for l in range(L):
                            V[xi, c, base + l] += coef * rows[ii, b * L + l]


@njit(parallel=True, cache=True)
def output_transform(M, AT, bias, y, n0, nc, t0, tc, tw, m):
    """``y[n, k, tile] = AT M[:, k, tile] AT^T + bias[k]`` for the tiles of
    :func:`input_transform`, clipped to ``y``'s ``P x Q``; ``bias (K,)``."""
    K, P, Q = y.shape[1], y.shape[2], y.shape[3]
    A = AT.shape[1]
    L = tc * tw
    for task in prange(nc * K):
        i = task // K
        k = task - i * K
        base = i * L
        # cols[u, b, l] = sum_a AT[u, a] M[a*A + b, k, l]
        cols = np.zeros((m, A * L), dtype=M.dtype)
        for u in range(m):
            for a in range(A):
                coef = AT[u, a]
                if coef != 0:
                    for b in range(A):
                        o = b * L
                        for l in range(L):
                            cols[u, o + l] += coef * M[a * A + b, k, base + l]
        out = np.empty((m, m * L), dtype=M.dtype)   # out[u, v, l]
        _apply_rows(AT, cols, out, A, L)
        b_k = bias[k]
        for t in range(tc):
            for u in range(m):
                p = (t0 + t) * m + u
                if p >= P:
                    break
                for q in range(Q):
                    tj = q // m
                    y[n0 + i, k, p, q] = out[u, (q - tj * m) * L + t * tw + tj] + b_k


@njit(parallel=True, cache=True)
def grad_output_transform(dy, AT, Mg, n0, nc, t0, tc, tw, m):
    """``Mg[a*A + b, k, tile] = (AT^T e AT)[a, b]`` for the ``m x m`` tile ``e`` of
    ``dy (N, K, P, Q)`` (zero beyond ``P x Q``): the adjoint of :func:`output_transform`."""
    K, P, Q = dy.shape[1], dy.shape[2], dy.shape[3]
    A = AT.shape[1]
    L = tc * tw
    ATt = np.ascontiguousarray(AT.T)
    for task in prange(nc * K):
        i = task // K
        k = task - i * K
        patches = np.zeros((m, m * L), dtype=Mg.dtype)   # patches[u, v, l]
        for t in range(tc):
            for u in range(m):
                p = (t0 + t) * m + u
                if p >= P:
                    break
                for q in range(Q):
                    tj = q // m
                    patches[u, (q - tj * m) * L + t * tw + tj] = dy[n0 + i, k, p, q]
        rows = np.empty((m, A * L), dtype=Mg.dtype)      # rows[u, b, l]
        _apply_rows(ATt, patches, rows, m, L)
        base = i * L
        for a in range(A):
            for b in range(A):
                xi = a * A + b
                for l in range(L):
                    Mg[xi, k, base + l] = 0
                for u in range(m):
                    coef = AT[u, a]
                    if coef != 0:
                        for l in range(L):
                            Mg[xi, k, base + l] += coef * rows[u, b * L + l]


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------
def _chunks(N: int, th: int, tw: int, m: int, channels: int, filter_elems: int,
            weight_grad: bool, itemsize: int, algo):
    """Chunks of tile rows under the workspace bound (sizes from ``cpu_workspace``)."""
    sizes = winograd_tile_bytes(m, tw, channels, filter_elems, weight_grad, itemsize)
    preferred = int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    return list(plan_chunks(N, th, sizes, workspace_bound(algo), preferred))


def filter_transform(weight: np.ndarray, G: np.ndarray, groups: int, dtype) -> np.ndarray:
    """``U (A*A, groups, Kg, Cg) = G w G^T`` per filter, computed in float64."""
    K, Cg = weight.shape[:2]
    A = G.shape[0]
    u = np.einsum("ar,kcrs,bs->abkc", G, weight.astype(np.float64), G, optimize=True)
    return np.ascontiguousarray(u.reshape(A * A, groups, K // groups, Cg), dtype=dtype)


def winograd_conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
                  out_hw: tuple[int, int], offsets: tuple[int, int], groups: int,
                  algo) -> np.ndarray:
    """3x3 stride-1 correlation of ``x (N, C, H, W)`` with ``weight (K, C/G, 3, 3)``:
    ``y[n, k, p, q] = sum w[k, c, r, s] x[n, g*Cg + c, p + off_h + r, q + off_w + s]`` (zero
    outside ``x``) for an output of ``out_hw = (P, Q)``; returns ``(N, K, P, Q)``."""
    N, C = x.shape[:2]
    K = weight.shape[0]
    P, Q = out_hw
    m = int(algo.get("tile", 4))
    BT, Gm, AT = transforms(m, x.dtype)
    A2 = (m + 2) ** 2
    th, tw = tile_grid(P, Q, m)
    U = filter_transform(weight, Gm, groups, x.dtype)
    chunks = _chunks(N, th, tw, m, C + K, weight.shape[0] * weight.shape[1], False, x.dtype.itemsize, algo)
    J = max(c.nc * c.rc for c in chunks) * tw
    bound = workspace_bound(algo)
    v_buf = scratch((A2 * C * J,), x.dtype, bound)
    m_buf = scratch((A2 * K * J,), x.dtype, bound)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    b = bias if bias is not None else np.zeros(K, dtype=x.dtype)
    for ch in chunks:
        T = ch.nc * ch.rc * tw
        V = v_buf[:A2 * C * T].reshape(A2, C, T)
        M = m_buf[:A2 * K * T].reshape(A2, K, T)
        input_transform(x, BT, V, ch.n0, ch.nc, ch.r0, ch.rc, tw, m, *offsets)
        np.matmul(U, V.reshape(A2, groups, C // groups, T),
                  out=M.reshape(A2, groups, K // groups, T))
        output_transform(M, AT, b, y, ch.n0, ch.nc, ch.r0, ch.rc, tw, m)
    return y


def forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
            algo) -> np.ndarray:
    """Conv forward ``(N, K, P, Q)`` of a 3x3 stride-1 undilated layer, any padding."""
    pt, pl = geom.padding[0], geom.padding[2]
    return winograd_conv(x, weight, bias, (geom.P, geom.Q), (-pt, -pl), geom.groups, algo)


def input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient ``(N, C, H, W)``: ``grad_output`` correlated with the rotated kernel
    (lecture notes 7.5), whose input and output channels swap within each group."""
    G, K, Cg = geom.groups, geom.K, geom.C // geom.groups
    w_rot = (weight.reshape(G, K // G, Cg, 3, 3)[..., ::-1, ::-1]
             .transpose(0, 2, 1, 3, 4).reshape(geom.C, K // G, 3, 3))
    pt, pl = geom.padding[0], geom.padding[2]
    return winograd_conv(grad_output, w_rot, None, (geom.H, geom.W), (pt - 2, pl - 2), G, algo)


def weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Weight gradient ``(K, C/G, 3, 3)`` by the adjoint of the forward transforms; the GEMMs
    reduce over the tiles of a chunk, chunks are summed in order."""
    N, C, K, G = geom.N, geom.C, geom.K, geom.groups
    m = int(algo.get("tile", 4))
    BT, Gm, AT = transforms(m, x.dtype)
    A, A2 = m + 2, (m + 2) ** 2
    th, tw = tile_grid(geom.P, geom.Q, m)
    chunks = _chunks(N, th, tw, m, C + K, K * (C // G), True, x.dtype.itemsize, algo)
    J = max(c.nc * c.rc for c in chunks) * tw
    bound = workspace_bound(algo)
    v_buf = scratch((A2 * C * J,), x.dtype, bound)
    m_buf = scratch((A2 * K * J,), x.dtype, bound)
    dU = np.zeros((A2, G, K // G, C // G), dtype=x.dtype)
    part = scratch(dU.shape, x.dtype, bound) if len(chunks) > 1 else dU
    offsets = (-geom.padding[0], -geom.padding[2])
    for ch in chunks:
        T = ch.nc * ch.rc * tw
        V = v_buf[:A2 * C * T].reshape(A2, G, C // G, T)
        Mg = m_buf[:A2 * K * T].reshape(A2, K, T)
        input_transform(x, BT, V.reshape(A2, C, T), ch.n0, ch.nc, ch.r0, ch.rc, tw, m,
                        *offsets)
        grad_output_transform(grad_output, AT, Mg, ch.n0, ch.nc, ch.r0, ch.rc, tw, m)
        np.matmul(Mg.reshape(A2, G, K // G, T), V.transpose(0, 1, 3, 2), out=part)
        if part is not dU:
            dU += part
    # gw[k, c, r, s] = sum_{a, b} G[a, r] dU[a, b, k, c] G[b, s], in float64
    dU64 = dU.astype(np.float64).reshape(A, A, K, C // G)
    gw = np.einsum("ar,abkc,bs->kcrs", Gm, dU64, Gm, optimize=True)
    return gw.astype(x.dtype)
