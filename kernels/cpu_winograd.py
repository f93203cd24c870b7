"""Winograd F(m x m, 3 x 3) convolution for 3x3, stride-1, undilated layers (m = 2 or 4).

An output tile of ``m x m`` pixels is computed from an ``A x A`` input tile (``A = m + 2``) as
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    Y = AT [ (G g G^T) (.) (BT d BT^T) ] AT^T            (.) elementwise

so the ``m * m * 9`` multiplies of a direct tile become ``A * A`` (F(2x2): 2.25x fewer, F(4x4):
4x fewer). Summed over channels, each of the ``A * A`` transform points is one GEMM::

    M[xi] (K, T) = U[xi] (K, C) @ V[xi] (C, T)        xi = a * A + b, T = tiles

Layouts: ``V (A*A, C, T)``, ``M (A*A, K, T)`` with tiles ordered ``(image, tile row, tile
column)``; rows of 8 or more tiles carry one padding tile (see :func:`row_width`). Groups
split ``C`` and ``K`` into ``G`` blocks and the GEMMs are batched over them (NumPy's BLAS).
The transforms (Numba) work on polyphase planes so that every pass is a flat loop, with the
sparse transform matrices turned into tables of shifted rows (:func:`_table`): F(2x2) and
F(4x4) share all kernels.

The same transforms give the three conv ops of these layers:

* forward: the formula above, out-of-range input pixels read as zero (any padding);
* input gradient: a 3x3 stride-1 correlation of ``grad_output`` with the 180-degree rotated,
  channel-transposed kernel, i.e. the forward pass with offsets ``pt - 2``, ``pl - 2``;
* weight gradient: the adjoint of the forward formula,
  ``dU[xi] = sum_T (A dY A^T)[xi] V[xi]^T`` and ``gw = G^T dU G``.

Accuracy (relative, float32, against the float64 reference): about 2e-7 for F(2x2) and 1.5e-6
for F(4x4), the latter because its transforms hold the points 0, +-1, +-2, whose coefficients
up to 8 amplify rounding; both within the 1e-5 bound.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from .cpu_conv import valid_range
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


def tile_grid(P: int, Q: int, m: int) -> tuple[int, int]:
    """Tile rows and columns covering a ``P x Q`` output with ``m x m`` tiles."""
    return -(-P // m), -(-Q // m)


def _table(entries: list[list[tuple[int, int, float]]], dtype) -> tuple:
    """Sparse rows of a transform for :func:`_lincomb`: output ``i`` is the sum of
    ``coef * src[row, off + e]`` over its ``(row, off, coef)`` entries. Each row is padded
    with zero terms to a multiple of four, the number of sources one pass reads."""
    Z = 4 * -(-max(len(e) for e in entries) // 4)
    rows = np.zeros((len(entries), Z), dtype=np.int64)
    offs = np.zeros((len(entries), Z), dtype=np.int64)
    coefs = np.zeros((len(entries), Z), dtype=dtype)
    count = np.array([4 * -(-len(e) // 4) for e in entries], dtype=np.int64)
    for i, terms in enumerate(entries):
        for z, (row, off, coef) in enumerate(terms):
            rows[i, z], offs[i, z], coefs[i, z] = row, off, coef
    return rows, offs, coefs, count


def input_tables(m: int, tw: int, dtype) -> tuple[tuple, tuple]:
    """Terms of the input transform ``BT d BT^T`` on the polyphase planes of
    :func:`input_transform`: along rows (output ``b * m + hp`` from plane ``hp * m + j % m``
    shifted by ``j // m`` tiles) and along columns (output ``a * A + b`` from row-pass output
    ``b * m + ii % m`` shifted by ``ii // m`` tile rows of ``tw + 1``)."""
    BT = np.array(_BT[m], dtype=np.float64)
    A = m + 2
    rows = [[(hp * m + j % m, j // m, BT[b, j]) for j in range(A) if BT[b, j]]
            for b in range(A) for hp in range(m)]
    cols = [[(b * m + ii % m, (ii // m) * (tw + 1), BT[a, ii]) for ii in range(A) if BT[a, ii]]
            for a in range(A) for b in range(A)]
    return _table(rows, dtype), _table(cols, dtype)


def output_tables(m: int, dtype) -> tuple[tuple, tuple]:
    """Terms of ``AT M AT^T``: ``Z[u*A + b] = sum_a AT[u, a] M[a*A + b]``, then
    ``Y[u*m + v] = sum_b AT[v, b] Z[u*A + b]``."""
    AT = np.array(_AT[m], dtype=np.float64)
    A = m + 2
    first = [[(a * A + b, 0, AT[u, a]) for a in range(A) if AT[u, a]]
             for u in range(m) for b in range(A)]
    second = [[(u * A + b, 0, AT[v, b]) for b in range(A) if AT[v, b]]
              for u in range(m) for v in range(m)]
    return _table(first, dtype), _table(second, dtype)


def grad_output_tables(m: int, dtype) -> tuple[tuple, tuple]:
    """Terms of ``AT^T D AT`` (the adjoint of :func:`output_tables`):
    ``Z[u*A + b] = sum_v AT[v, b] D[u*m + v]``, then
    ``Mg[a*A + b] = sum_u AT[u, a] Z[u*A + b]``."""
    AT = np.array(_AT[m], dtype=np.float64)
    A = m + 2
    first = [[(u * m + v, 0, AT[v, b]) for v in range(m) if AT[v, b]]
             for u in range(m) for b in range(A)]
    second = [[(u * A + b, 0, AT[u, a]) for u in range(m) if AT[u, a]]
              for a in range(A) for b in range(A)]
    return _table(first, dtype), _table(second, dtype)


# ---------------------------------------------------------------------------------------------
# Numba kernels. A task is one image and a block of channels (about BLOCK tiles), whose tiles
# are laid out flat, so every transform pass is one long vectorisable loop. Strided accesses
# (splitting the input into its m x m polyphase planes, merging the output back) use unsigned
# flat indices: Numba then skips its negative-index check and the loops stay tight.
# ---------------------------------------------------------------------------------------------
BLOCK = 256
# From this many tiles per tile row, V and M rows carry one padding tile per tile row (width
# tw + 1, the width of the polyphase planes): the transforms then read and write them as flat
# runs, at the price of 1 / tw more GEMM work. Below it the padding would cost more than the
# copies it saves.
PAD_MIN_TILES = 8
# From this many tiles per image, the output transform reads M in place instead of copying a
# block of channels together first.
DIRECT_MIN_TILES = 64


def row_width(tw: int) -> int:
    """Tiles per tile row in ``V`` and ``M``: ``tw``, or ``tw + 1`` with a padding tile."""
    return tw + 1 if tw >= PAD_MIN_TILES else tw


@njit(cache=True)     # a call, not Numba-level inlining: ~5% slower, 7 s less to compile
def _lincomb(dst, src, tab, i, rscale, radd, cbase, L):
    """``dst[e] = sum_z coefs[i, z] * src[rows[i, z] * rscale + radd, cbase + offs[i, z] + e]``
    for ``e < L``; four sources per pass (see :func:`_table`), so ``dst`` is written once per
    four terms."""
    rows, offs, coefs, count = tab
    for z in range(0, count[i], 4):
        o0, o1 = cbase + offs[i, z], cbase + offs[i, z + 1]
        o2, o3 = cbase + offs[i, z + 2], cbase + offs[i, z + 3]
        s0 = src[rows[i, z] * rscale + radd, o0:o0 + L]
        s1 = src[rows[i, z + 1] * rscale + radd, o1:o1 + L]
        s2 = src[rows[i, z + 2] * rscale + radd, o2:o2 + L]
        s3 = src[rows[i, z + 3] * rscale + radd, o3:o3 + L]
        c0, c1, c2, c3 = coefs[i, z], coefs[i, z + 1], coefs[i, z + 2], coefs[i, z + 3]
        if z == 0:
            for e in range(L):
                dst[e] = c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e]
        else:
            for e in range(L):
                dst[e] += c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e]


@njit(parallel=True, cache=True)
def input_transform(x, V, n0, nc, t0, tc, tw, m, off_h, off_w, row_tab, col_tab):
    """``V[a*A + b, c, tile] = (BT d BT^T)[a, b]`` for the input tile ``d`` of each tile
    ``(n, t, tj)`` with ``n`` in ``n0 .. n0 + nc``, ``t`` in ``t0 .. t0 + tc``: rows
    ``t*m + off_h + [0, A)``, columns ``tj*m + off_w + [0, A)`` of ``x``, zero outside.
    Tile ``(i, t, tj)`` of the chunk is column ``(i * tc + t) * vw + tj`` of ``V`` (see
    :func:`row_width`).

    Per channel the padded input is split into ``m x m`` polyphase planes of ``(tc + 1) x
    (tw + 1)`` (the extra row and column hold the tiles' overlap), so both 1-D transforms
    read whole planes at tile-sized shifts."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    A = m + 2
    vw = tw + 1 if tw >= PAD_MIN_TILES else tw
    Fr = (tc + 1) * (tw + 1)
    cb = max(1, BLOCK // Fr)
    nblocks = (C + cb - 1) // cb
    xf = x.reshape(x.size)
    V2 = V.reshape(A * A * C, V.shape[2])
    mm, uW = np.uint64(m), np.uint64(W)
    for task in prange(nc * nblocks):
        i = task // nblocks
        c0 = (task - i * nblocks) * cb
        cbb = min(cb, C - c0)
        F = cbb * Fr
        Lr = F + tw + 2                      # row-pass length: the column pass shifts by tw+1
        planes = np.zeros((m * m, Lr + 1), dtype=V.dtype)
        pf = planes.reshape(planes.size)
        for cc in range(cbb):
            x0 = np.uint64(((n0 + i) * C + c0 + cc) * H) * uW
            for r in range((tc + 1) * m):
                h = t0 * m + off_h + r
                if h < 0 or h >= H:
                    continue
                hp, tq = r % m, r // m
                for wp in range(m):
                    lo, hi = valid_range(tw + 1, W, m, off_w + wp)
                    d0 = np.uint64((hp * m + wp) * (Lr + 1) + cc * Fr + tq * (tw + 1) + lo)
                    s0 = x0 + np.uint64(h * W + lo * m + off_w + wp)
                    for e in range(np.uint64(hi - lo)):
                        pf[d0 + e] = xf[s0 + e * mm]
        rows = np.empty((A * m, Lr), dtype=V.dtype)
        for o in range(A * m):
            _lincomb(rows[o], planes, row_tab, o, 1, 0, 0, Lr)
        base = i * tc * vw
        if vw == tw + 1:                     # padded rows: the column pass writes V directly
            for xi in range(A * A):
                for cc in range(cbb):
                    dst = V2[xi * C + c0 + cc, base:base + tc * vw]
                    _lincomb(dst, rows, col_tab, xi, 1, 0, cc * Fr, tc * vw)
            continue
        tiles = np.empty((A * A, F), dtype=V.dtype)
        for xi in range(A * A):
            _lincomb(tiles[xi], rows, col_tab, xi, 1, 0, 0, F)
        for xi in range(A * A):
            for cc in range(cbb):
                for t in range(tc):
                    src = tiles[xi, cc * Fr + t * (tw + 1):]
                    dst = V2[xi * C + c0 + cc, base + t * tw:base + (t + 1) * tw]
                    for e in range(tw):
                        dst[e] = src[e]


@njit(parallel=True, cache=True)
def output_transform(M, y, bias, n0, nc, t0, tc, tw, m, first_tab, second_tab):
    """``y[n, k, tile] = AT M[:, k, tile] AT^T + bias[k]`` for the tiles of
    :func:`input_transform` (``M (A*A, K, T)``, same tile columns), clipped to ``y``'s
    ``P x Q``."""
    K, P, Q = y.shape[1], y.shape[2], y.shape[3]
    A = m + 2
    vw = tw + 1 if tw >= PAD_MIN_TILES else tw
    L = tc * vw
    kb = 1 if L >= DIRECT_MIN_TILES else max(1, BLOCK // L)
    nblocks = (K + kb - 1) // kb
    M2 = M.reshape(A * A * K, M.shape[2])
    yf = y.reshape(y.size)
    mm = np.uint64(m)
    for task in prange(nc * nblocks):
        i = task // nblocks
        k0 = (task - i * nblocks) * kb
        kbb = min(kb, K - k0)
        F = kbb * L
        half = np.empty((m * A, F), dtype=M.dtype)
        if kb == 1:                          # long runs: read M in place
            for o in range(m * A):
                _lincomb(half[o], M2, first_tab, o, K, k0, i * L, L)
        else:
            tiles = np.empty((A * A, F), dtype=M.dtype)
            for xi in range(A * A):
                for kk in range(kbb):
                    src = M2[xi * K + k0 + kk, i * L:]
                    dst = tiles[xi, kk * L:]
                    for e in range(L):
                        dst[e] = src[e]
            for o in range(m * A):
                _lincomb(half[o], tiles, first_tab, o, 1, 0, 0, F)
        out = np.empty((m * m, F), dtype=M.dtype)
        for o in range(m * m):
            _lincomb(out[o], half, second_tab, o, 1, 0, 0, F)
        of = out.reshape(out.size)
        for kk in range(kbb):
            k = k0 + kk
            b_k = bias[k]
            y0 = np.uint64(((n0 + i) * K + k) * P) * np.uint64(Q)
            for t in range(tc):
                for u in range(m):
                    p = (t0 + t) * m + u
                    if p >= P:
                        break
                    for v in range(m):
                        hi = valid_range(tw, Q, m, v)[1]
                        src = np.uint64((u * m + v) * F + kk * L + t * vw)
                        dst = y0 + np.uint64(p * Q + v)
                        for e in range(np.uint64(hi)):
                            yf[dst + e * mm] = of[src + e] + b_k


@njit(parallel=True, cache=True)
def grad_output_transform(dy, Mg, n0, nc, t0, tc, tw, m, first_tab, second_tab):
    """``Mg[a*A + b, k, tile] = (AT^T d AT)[a, b]`` for the ``m x m`` tile ``d`` of
    ``dy (N, K, P, Q)`` (zero beyond ``P x Q``, and zero in padding tiles, which therefore add
    nothing to the weight gradient): the adjoint of :func:`output_transform`."""
    K, P, Q = dy.shape[1], dy.shape[2], dy.shape[3]
    A = m + 2
    vw = tw + 1 if tw >= PAD_MIN_TILES else tw
    L = tc * vw
    kb = 1 if L >= DIRECT_MIN_TILES else max(1, BLOCK // L)
    nblocks = (K + kb - 1) // kb
    dyf = dy.reshape(dy.size)
    M2 = Mg.reshape(A * A * K, Mg.shape[2])
    mm = np.uint64(m)
    for task in prange(nc * nblocks):
        i = task // nblocks
        k0 = (task - i * nblocks) * kb
        kbb = min(kb, K - k0)
        F = kbb * L
        planes = np.zeros((m * m, F), dtype=Mg.dtype)     # planes[u*m + v]: pixel (u, v)
        pf = planes.reshape(planes.size)
        for kk in range(kbb):
            d0 = np.uint64(((n0 + i) * K + k0 + kk) * P) * np.uint64(Q)
            for t in range(tc):
                for u in range(m):
                    p = (t0 + t) * m + u
                    if p >= P:
                        break
                    for v in range(m):
                        hi = valid_range(tw, Q, m, v)[1]
                        dst = np.uint64((u * m + v) * F + kk * L + t * vw)
                        src = d0 + np.uint64(p * Q + v)
                        for e in range(np.uint64(hi)):
                            pf[dst + e] = dyf[src + e * mm]
        half = np.empty((m * A, F), dtype=Mg.dtype)
        for o in range(m * A):
            _lincomb(half[o], planes, first_tab, o, 1, 0, 0, F)
        if kb == 1:                          # long runs: write Mg in place
            for xi in range(A * A):
                _lincomb(M2[xi * K + k0, i * L:i * L + L], half, second_tab, xi, 1, 0, 0, L)
            continue
        tiles = np.empty((A * A, F), dtype=Mg.dtype)
        for xi in range(A * A):
            _lincomb(tiles[xi], half, second_tab, xi, 1, 0, 0, F)
        for xi in range(A * A):
            for kk in range(kbb):
                dst = M2[xi * K + k0 + kk, i * L:]
                src = tiles[xi, kk * L:]
                for e in range(L):
                    dst[e] = src[e]


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------
def _chunks(N: int, th: int, tw: int, m: int, channels: int, filter_elems: int,
            weight_grad: bool, itemsize: int, algo):
    """Chunks of tile rows under the workspace bound (sizes from ``cpu_workspace``, which
    counts ``tw + 1`` tiles per row: at least :func:`row_width`)."""
    sizes = winograd_tile_bytes(m, tw, channels, filter_elems, weight_grad, itemsize)
    preferred = int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    return list(plan_chunks(N, th, sizes, workspace_bound(algo), preferred))


@njit(parallel=True, cache=True)
def _filter_transform(w9, G, U):
    """``U[a*A + b, kc] = sum_{r, s} G[a, r] w9[r*3 + s, kc] G[b, s]``, separably and with
    ``kc`` innermost (slices indexed by the loop variable) so the loops vectorise."""
    A, KC = G.shape[0], w9.shape[1]
    for blk in prange((KC + BLOCK - 1) // BLOCK):
        k0 = blk * BLOCK
        n = min(KC, k0 + BLOCK) - k0
        w = w9[:, k0:k0 + n]
        half = np.empty((A * 3, n), dtype=U.dtype)          # (G w)[a, s]
        for a in range(A):
            g0, g1, g2 = G[a, 0], G[a, 1], G[a, 2]
            for s in range(3):
                h, w0, w1, w2 = half[a * 3 + s], w[s], w[3 + s], w[6 + s]
                for e in range(n):
                    h[e] = g0 * w0[e] + g1 * w1[e] + g2 * w2[e]
        for a in range(A):
            h0, h1, h2 = half[a * 3], half[a * 3 + 1], half[a * 3 + 2]
            for b in range(A):
                g0, g1, g2 = G[b, 0], G[b, 1], G[b, 2]
                u = U[a * A + b, k0:k0 + n]
                for e in range(n):
                    u[e] = h0[e] * g0 + h1[e] * g1 + h2[e] * g2


@njit(parallel=True, cache=True)
def _filter_transform_adjoint(dU, G, gw9):
    """``gw9[r*3 + s, kc] = sum_{a, b} G[a, r] dU[a*A + b, kc] G[b, s]``."""
    A, KC = G.shape[0], gw9.shape[1]
    for blk in prange((KC + BLOCK - 1) // BLOCK):
        k0 = blk * BLOCK
        n = min(KC, k0 + BLOCK) - k0
        half = np.zeros((3 * A, n), dtype=gw9.dtype)       # (G^T dU)[r, b]
        for a in range(A):
            g0, g1, g2 = G[a, 0], G[a, 1], G[a, 2]
            for b in range(A):
                d = dU[a * A + b, k0:k0 + n]
                h0, h1, h2 = half[b], half[A + b], half[2 * A + b]
                for e in range(n):
                    h0[e] += g0 * d[e]
                    h1[e] += g1 * d[e]
                    h2[e] += g2 * d[e]
        for r in range(3):
            for s in range(3):
                out = gw9[r * 3 + s, k0:k0 + n]
                out[:] = 0
                for b in range(A):
                    g = G[b, s]
                    if g != 0:
                        h = half[r * A + b]
                        for e in range(n):
                            out[e] += h[e] * g


def filter_transform(weight: np.ndarray, G: np.ndarray, groups: int, dtype) -> np.ndarray:
    """``U (A*A, groups, Kg, Cg) = G w G^T`` per filter, in ``dtype`` (the rounding of G's
    1/6, 1/12, 1/24 is far below the algorithm's own error)."""
    K, Cg = weight.shape[:2]
    A = G.shape[0]
    U = np.empty((A * A, K * Cg), dtype=dtype)
    w9 = np.ascontiguousarray(weight.reshape(K * Cg, 9).T)
    _filter_transform(w9, G.astype(dtype), U)
    return U.reshape(A * A, groups, K // groups, Cg)


def filter_transform_adjoint(dU: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``gw (K*Cg, 3, 3)`` in ``dU``'s dtype from ``dU (A*A, ...)``: the adjoint of
    :func:`filter_transform`."""
    A = G.shape[0]
    KC = dU[0].size
    gw9 = np.empty((9, KC), dtype=dU.dtype)
    _filter_transform_adjoint(dU.reshape(A * A, KC), G.astype(dU.dtype), gw9)
    return gw9.T.reshape(KC, 3, 3)


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
    Gm = np.array(_G[m], dtype=np.float64)
    A2 = (m + 2) ** 2
    th, tw = tile_grid(P, Q, m)
    U = filter_transform(weight, Gm, groups, x.dtype)
    in_tabs, out_tabs = input_tables(m, tw, x.dtype), output_tables(m, x.dtype)
    chunks = _chunks(N, th, tw, m, C + K, weight.shape[0] * weight.shape[1], False,
                     x.dtype.itemsize, algo)
    vw = row_width(tw)
    J = max(c.nc * c.rc for c in chunks) * vw
    bound = workspace_bound(algo)
    v_buf = scratch((A2 * C * J,), x.dtype, bound)
    m_buf = scratch((A2 * K * J,), x.dtype, bound)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    b = bias if bias is not None else np.zeros(K, dtype=x.dtype)
    for ch in chunks:
        T = ch.nc * ch.rc * vw
        V = v_buf[:A2 * C * T].reshape(A2, C, T)
        M = m_buf[:A2 * K * T].reshape(A2, K, T)
        input_transform(x, V, ch.n0, ch.nc, ch.r0, ch.rc, tw, m, *offsets, *in_tabs)
        np.matmul(U, V.reshape(A2, groups, C // groups, T),
                  out=M.reshape(A2, groups, K // groups, T))
        output_transform(M, y, b, ch.n0, ch.nc, ch.r0, ch.rc, tw, m, *out_tabs)
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
    Gm = np.array(_G[m], dtype=np.float64)
    A2 = (m + 2) ** 2
    th, tw = tile_grid(geom.P, geom.Q, m)
    in_tabs, grad_tabs = input_tables(m, tw, x.dtype), grad_output_tables(m, x.dtype)
    chunks = _chunks(N, th, tw, m, C + K, K * (C // G), True, x.dtype.itemsize, algo)
    vw = row_width(tw)
    J = max(c.nc * c.rc for c in chunks) * vw
    bound = workspace_bound(algo)
    v_buf = scratch((A2 * C * J,), x.dtype, bound)
    m_buf = scratch((A2 * K * J,), x.dtype, bound)
    dU = np.zeros((A2, G, K // G, C // G), dtype=x.dtype)
    part = scratch(dU.shape, x.dtype, bound) if len(chunks) > 1 else dU
    offsets = (-geom.padding[0], -geom.padding[2])
    for ch in chunks:
        T = ch.nc * ch.rc * vw
        V = v_buf[:A2 * C * T].reshape(A2, G, C // G, T)
        Mg = m_buf[:A2 * K * T].reshape(A2, K, T)
        input_transform(x, V.reshape(A2, C, T), ch.n0, ch.nc, ch.r0, ch.rc, tw, m, *offsets,
                        *in_tabs)
        grad_output_transform(grad_output, Mg, ch.n0, ch.nc, ch.r0, ch.rc, tw, m, *grad_tabs)
        np.matmul(Mg.reshape(A2, G, K // G, T), V.transpose(0, 1, 3, 2), out=part)
        if part is not dU:
            dU += part
    gw = filter_transform_adjoint(dU, Gm)
    return gw.reshape(geom.weight_shape).astype(x.dtype)
