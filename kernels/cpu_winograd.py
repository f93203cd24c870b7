"""Winograd F(m x m, 3 x 3) convolution for 3x3, stride-1, undilated layers (m = 2 or 4).

An output tile of ``m x m`` pixels is computed from an ``A x A`` input tile (``A = m + 2``) as
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    Y = AT [ (G g G^T) (.) (BT d BT^T) ] AT^T            (.) elementwise

so the ``m * m * 9`` multiplies of a direct tile become ``A * A`` (F(2x2): 2.25x fewer, F(4x4):
4x fewer). Summed over channels, each of the ``A * A`` transform points is one GEMM::

    M[xi] (K, T) = U[xi] (K, C) @ V[xi] (C, T)        xi = a * A + b, T = tiles

Fused and cache-blocked (as in NNPACK, oneDNN and Jia et al., PPoPP 2018): the tiles are
cut into blocks of ``rb`` tile rows of one image; each worker of one parallel loop transforms
a block into its own ``V (A*A, C, rb * (tw + 1))``, multiplies it into ``M (A*A, K, ...)``
with ``A*A`` ``np.dot`` calls (BLAS, from the worker's thread) and transforms ``M`` straight
into the output, so V and M stay in the core's L2 (:data:`BLOCK_BYTES`) and there is one
thread pool. Rows of tiles carry one padding tile (:func:`row_width`) so that the
transforms, which work on polyphase planes with the sparse transform matrices turned into
tables of shifted rows (:func:`_table`), are flat loops; F(2x2) and F(4x4) share all kernels.
Groups split ``C`` and ``K`` into ``G`` GEMMs per transform point.

Determinism: ``rb`` depends on the geometry and the workspace bound only, a block's result
on its data only, and the weight gradient sums the blocks of an image in tile order and the
images in image order; so results are the same bits for any thread count and any assignment
of blocks to threads. No ``fastmath`` anywhere.

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

from typing import NamedTuple, Optional

import numba
import numpy as np
from numba import njit, prange

from .cpu_workspace import (BLAS_SERIAL_MACS, DEFAULT_CHUNK_BYTES, WINOGRAD_TEMP_CHANNELS,
                            scratch, winograd_tile_bytes, workspace_bound)

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
# Numba kernels. The work is cut into blocks of ``rb`` tile rows of one image. One parallel
# loop runs over workers; worker ``w`` takes blocks ``w, w + nw, ...`` and, for each, transforms
# the block's input into its own buffer ``V (A*A, C, rb * vw)`` (small enough to stay in its
# core's L2), multiplies it with ``np.dot`` (BLAS, called from the worker's thread), and
# transforms the product straight into the output: every byte of V and M is written and read
# while still in cache, and there is one thread pool. Rows of tiles carry one padding tile
# (width ``vw = tw + 1``, the width of the polyphase planes), so every transform pass is one
# flat loop; the padding tiles are computed and never stored.
#
# A block's result depends only on its data and on ``rb`` (chosen from the geometry and the
# workspace bound, never from the thread count), and sums run in a fixed order, so results are
# the same bits whatever the number of threads or which thread ran a block.
#
# ``phases`` (a bit mask, see PHASE_*) lets the benchmark time each phase on its own; the
# library always passes ALL_PHASES.
# ---------------------------------------------------------------------------------------------
# Filters per task of the (parallel) filter transforms.
BLOCK = 256
PHASE_INPUT = 1       # input transform (forward, input gradient, weight gradient)
PHASE_GEMM = 2        # the A*A GEMMs of each block
PHASE_OUTPUT = 4      # output transform (forward) or grad_output transform (weight gradient)
ALL_PHASES = PHASE_INPUT | PHASE_GEMM | PHASE_OUTPUT
# Preferred bytes of a worker's V and M. Measured on r3x3_56 forward, 2 threads, on a busy
# machine (interleaved, one process): 0.77 MB blocks 132-148 ms, 1.6 MB 96-120 ms, 2 MB 96 ms,
# 4 MB (whole images) 907 ms; the prototype used 98 tiles (1.8 MB). V and M then
# overflow the 1 MiB L2 a little but the GEMMs get 7 rows of tiles (105 columns).
BLOCK_BYTES = 2 * 2**20


def row_width(tw: int) -> int:
    """Tiles per tile row in the transformed blocks: ``tw`` plus one padding tile."""
    return tw + 1


# Numba compiles a callee once per distinct argument type, and a literal constant is a type
# of its own. _lincomb's calls keep two forms on purpose: one row (literal ``1, 0, 0``: the
# weight gradient measured 10-20% slower without that specialisation) and ``nrep`` strided
# rows; the base column is passed as ``I0`` (int64) rather than a literal 0, which had cost two
# more compilations per dtype.
I0 = np.int64(0)


@njit(cache=True)     # a call, not Numba-level inlining: ~5% slower, 7 s less to compile
def _lincomb(dst, src, tab, i, cbase, L, nrep, dstride, sstride):
    """``dst[r*dstride + e] = sum_z coefs[i, z] * src[rows[i, z], cbase + r*sstride + offs[i, z]
    + e]`` for ``e < L``, ``r < nrep``; four sources per pass (see :func:`_table`), so ``dst``
    is written once per four terms."""
    rows, offs, coefs, count = tab
    for r in range(nrep):
        d = dst[r * dstride:r * dstride + L]
        base = cbase + r * sstride
        for z in range(0, count[i], 4):
            o0, o1 = base + offs[i, z], base + offs[i, z + 1]
            o2, o3 = base + offs[i, z + 2], base + offs[i, z + 3]
            s0 = src[rows[i, z], o0:o0 + L]
            s1 = src[rows[i, z + 1], o1:o1 + L]
            s2 = src[rows[i, z + 2], o2:o2 + L]
            s3 = src[rows[i, z + 3], o3:o3 + L]
            c0, c1, c2, c3 = coefs[i, z], coefs[i, z + 1], coefs[i, z + 2], coefs[i, z + 3]
            if z == 0:
                for e in range(L):
                    d[e] = c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e]
            else:
                for e in range(L):
                    d[e] += c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e]


@njit(cache=True)
def _block_input(x, V, tmp, E, n, t0, tc, tw, m, off_h, off_w, row_tab, col_tab, ldv, coff):
    """``V[a*A + b, c*ldv + coff + t*vw + j] = (BT d BT^T)[a, b]`` for the input tile
    ``d`` of tile ``(t0 + t, j)`` of image ``n``: rows ``(t0 + t)*m + off_h + [0, A)``, columns
    ``j*m + off_w + [0, A)`` of ``x``, zero outside (``ldv``: a channel's stride in ``V``, ``L =
    tc * vw`` in a worker's own block, more where several images share ``V``). For a run of
    channels at a time (``E`` elements per plane in ``tmp``), the tile rows' input is split
    into ``m x m`` polyphase planes of ``(tc + 1) x vw`` per channel, so the row pass and the
    column pass read whole planes at tile-sized shifts, as flat loops."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    A = m + 2
    vw = tw + 1
    Fr = (tc + 1) * vw
    L = tc * vw
    cb = max(1, E // Fr)
    planes = tmp[:m * m * (E + 1)].reshape(m * m, E + 1)
    rows = tmp[m * m * (E + 1):m * m * (E + 1) + A * m * E].reshape(A * m, E)
    # One channel's input rows, row phases apart (row r = tq*m + hp at hp*(tc + 1) + tq) and
    # zero-padded to the block's vw*m columns (column b is x's b + off_w): in the row pass's
    # memory, unused until all channels of the run are split.
    Wb = vw * m
    band = tmp[m * m * (E + 1):m * m * (E + 1) + Fr * m * m]
    b_lo, b_hi = max(0, -off_w), max(max(0, -off_w), min(Wb, W - off_w))
    xf = x.reshape(x.size)
    uW = np.uint64(W)
    zero = x.dtype.type(0)
    for c0 in range(0, C, cb):
        cbb = min(cb, C - c0)
        for cc in range(cbb):
            x0 = np.uint64((n * C + c0 + cc) * H) * uW
            for r in range((tc + 1) * m):
                h = t0 * m + off_h + r
                brow = band[((r % m) * (tc + 1) + r // m) * Wb:((r % m) * (tc + 1) + r // m + 1)
                            * Wb]
                if h < 0 or h >= H:
                    brow[:] = zero
                    continue
                brow[:b_lo] = zero
                brow[b_hi:] = zero
                src = xf[x0 + np.uint64(h * W + b_lo + off_w):]
                dst = brow[b_lo:]
                for e in range(b_hi - b_lo):
                    dst[e] = src[e]
            # the polyphase split: one flat pass per row phase over its whole band
            for hp in range(m):
                _deinterleave_row(planes[hp * m:(hp + 1) * m, cc * Fr:], band,
                                  np.uint64(hp * Fr * m), Fr * m, m)
        for o in range(A * m):
            _lincomb(rows[o], planes, row_tab, o, I0, cbb * Fr, 1, 0, 0)
        for xi in range(A * A):
            _lincomb(V[xi, c0 * ldv + coff:], rows, col_tab, xi, I0, L, cbb, ldv, Fr)


@njit(cache=True, inline="always")
def _interleave_row(yf, d0, Q, planes, s0, m, b_k):
    """Output from the ``m`` planes of tile rows: ``yf[d0 + j*m + v] = planes[v, s0 + j] +
    b_k`` for ``j*m + v < Q``. The tile sizes are spelt out so that the stores run along the
    row (LLVM vectorises the interleaved group) rather than ``m`` strided loops of ``Q / m``
    elements (the strided loops were half of the output transform)."""
    full = np.uint64(Q // m)
    s = np.uint64(s0)
    if m == 4:
        a0, a1, a2, a3 = planes[0, s:], planes[1, s:], planes[2, s:], planes[3, s:]
        for j in range(full):
            d = d0 + np.uint64(4) * j
            yf[d] = a0[j] + b_k
            yf[d + np.uint64(1)] = a1[j] + b_k
            yf[d + np.uint64(2)] = a2[j] + b_k
            yf[d + np.uint64(3)] = a3[j] + b_k
    else:
        a0, a1 = planes[0, s:], planes[1, s:]
        for j in range(full):
            d = d0 + np.uint64(2) * j
            yf[d] = a0[j] + b_k
            yf[d + np.uint64(1)] = a1[j] + b_k
    um = np.uint64(m)
    for q in range(full * um, np.uint64(Q)):
        yf[d0 + q] = planes[q % um, s + q // um] + b_k


@njit(cache=True, inline="always")
def _deinterleave_row(planes, src, s0, Q, m):
    """The adjoint copy: ``planes[v, j] = src[s0 + j*m + v]`` for ``j*m + v < Q``, reading
    along the row."""
    full = np.uint64(Q // m)
    if m == 4:
        a0, a1, a2, a3 = planes[0], planes[1], planes[2], planes[3]
        for j in range(full):
            s = s0 + np.uint64(4) * j
            a0[j] = src[s]
            a1[j] = src[s + np.uint64(1)]
            a2[j] = src[s + np.uint64(2)]
            a3[j] = src[s + np.uint64(3)]
    else:
        a0, a1 = planes[0], planes[1]
        for j in range(full):
            s = s0 + np.uint64(2) * j
            a0[j] = src[s]
            a1[j] = src[s + np.uint64(1)]
    um = np.uint64(m)
    for q in range(full * um, np.uint64(Q)):
        planes[q % um, q // um] = src[s0 + q]


@njit(cache=True)
def _block_output(M, y, bias, tmp, E, n, t0, tc, tw, m, first_tab, second_tab, ldm, coff):
    """``y[n, k, tile] = AT M[:, k*ldm + coff + tile] AT^T + bias[k]`` for the block's tiles,
    clipped to ``y``'s ``P x Q``, for a run of filters at a time (``E`` elements per pass
    row; ``ldm``: a filter's stride in ``M``, ``L`` in a worker's own block)."""
    K, P, Q = y.shape[1], y.shape[2], y.shape[3]
    A = m + 2
    vw = tw + 1
    L = tc * vw
    kb = max(1, E // L)
    half = tmp[:m * A * E].reshape(m * A, E)
    out = tmp[m * A * E:(m * A + m * m) * E].reshape(m * m, E)
    yf = y.reshape(y.size)
    for k0 in range(0, K, kb):
        kbb = min(kb, K - k0)
        for o in range(m * A):
            if ldm == L:      # the run's filters are contiguous: one long pass
                _lincomb(half[o], M, first_tab, o, k0 * L, kbb * L, 1, 0, 0)
            else:
                _lincomb(half[o], M, first_tab, o, k0 * ldm + coff, L, kbb, L, ldm)
        for o in range(m * m):
            _lincomb(out[o], half, second_tab, o, I0, kbb * L, 1, 0, 0)
        band = tmp[:m * L]      # half's memory: free once the second pass has read it
        for kk in range(kbb):
            k = k0 + kk
            b_k = bias[k]
            y0 = np.uint64((n * K + k) * P) * np.uint64(Q)
            for u in range(m):
                # row u of every tile row of the block, interleaved in one long pass (rows of
                # ``tc * vw`` tiles: per-row passes of ``Q / m`` tiles were too short to
                # vectorise), then copied out row by row
                _interleave_row(band, np.uint64(0), m * L, out[u * m:(u + 1) * m], kk * L, m,
                                b_k)
                for t in range(tc):
                    p = (t0 + t) * m + u
                    if p >= P:
                        break
                    dst = yf[y0 + np.uint64(p * Q):]
                    src = band[t * vw * m:]
                    for q in range(Q):
                        dst[q] = src[q]


@njit(cache=True)
def _block_grad_output(dy, Mg, tmp, E, n, t0, tc, tw, m, first_tab, second_tab, ldm, coff):
    """``Mg[a*A + b, k*ldm + coff + tile] = (AT^T d AT)[a, b]`` for the ``m x m`` tile ``d`` of
    ``dy (N, K, P, Q)`` (zero beyond ``P x Q`` and in the padding tiles, which therefore add
    nothing to the weight gradient): the adjoint of :func:`_block_output`."""
    K, P, Q = dy.shape[1], dy.shape[2], dy.shape[3]
    A = m + 2
    vw = tw + 1
    L = tc * vw
    kb = max(1, E // L)
    planes = tmp[:m * m * E].reshape(m * m, E)
    half = tmp[m * m * E:(m * m + m * A) * E].reshape(m * A, E)
    dyf = dy.reshape(dy.size)
    zero = dy.dtype.type(0)
    band = tmp[m * m * E:m * m * E + m * L]    # half's memory: free until the first pass
    for k0 in range(0, K, kb):
        kbb = min(kb, K - k0)
        for kk in range(kbb):
            d0 = np.uint64((n * K + k0 + kk) * P) * np.uint64(Q)
            for u in range(m):
                # row u of every tile row of the block, copied in (zero beyond P x Q and in
                # the padding tile) and split into the m planes in one long pass
                for t in range(tc):
                    p = (t0 + t) * m + u
                    brow = band[t * vw * m:(t + 1) * vw * m]
                    if p >= P:
                        brow[:] = zero
                        continue
                    src = dyf[d0 + np.uint64(p * Q):]
                    for q in range(Q):
                        brow[q] = src[q]
                    brow[Q:] = zero
                _deinterleave_row(planes[u * m:(u + 1) * m, kk * L:], band, np.uint64(0),
                                  m * L, m)
        for o in range(m * A):
            _lincomb(half[o], planes, first_tab, o, I0, kbb * L, 1, 0, 0)
        for xi in range(A * A):
            if ldm == L:
                _lincomb(Mg[xi, k0 * L:], half, second_tab, xi, I0, kbb * L, 1, 0, 0)
            else:
                _lincomb(Mg[xi, k0 * ldm + coff:], half, second_tab, xi, I0, L, kbb, ldm, L)


@njit(parallel=True, cache=True)
def fused_conv(x, U, bias, y, rb, m, off_h, off_w, nw, vbuf, mbuf, tbuf, E,
               row_tab, col_tab, first_tab, second_tab, phases, shared):
    """``y (N, K, P, Q)``: 3x3 stride-1 correlation of ``x (N, C, H, W)`` with the
    transformed filters ``U (A*A, G, Kg, Cg)`` plus ``bias``, read at offsets
    ``(off_h, off_w)``; blocks of ``rb`` tile rows on ``nw`` workers (buffers ``*buf[w]``).

    ``shared``: the transforms only (``rb`` = whole images), into one ``V (A*A, C, N*L)`` in
    ``vbuf[0]`` and out of one ``M (A*A, K, N*L)`` in ``mbuf[0]``, image ``n`` in columns
    ``[n*L, (n+1)*L)``; the caller multiplies in between (see :func:`batched_conv`)."""
    N, C = x.shape[0], x.shape[1]
    K, P, Q = y.shape[1], y.shape[2], y.shape[3]
    G, Kg, Cg = U.shape[1], U.shape[2], U.shape[3]
    A = m + 2
    A2 = A * A
    th, tw = (P + m - 1) // m, (Q + m - 1) // m
    vw = tw + 1
    per_image = (th + rb - 1) // rb
    nblocks = N * per_image
    for w in prange(nw):
        tmp = tbuf[w]
        for blk in range(w, nblocks, nw):
            n = blk // per_image
            t0 = (blk - n * per_image) * rb
            tc = min(rb, th - t0)
            L = tc * vw
            if shared:
                V, M, ld, coff = vbuf[0], mbuf[0], N * L, n * L
            else:
                V, M, ld, coff = vbuf[w, :A2 * C * L], mbuf[w, :A2 * K * L], L, 0
            if phases & 1:
                _block_input(x, V.reshape(A2, C * ld), tmp, E, n, t0, tc, tw, m, off_h,
                             off_w, row_tab, col_tab, ld, coff)
            if phases & 2 and not shared:
                V3, M3 = V.reshape(A2, C, L), M.reshape(A2, K, L)
                kp = max(1, (BLAS_SERIAL_MACS - 1) // (Cg * L))  # pieces BLAS keeps serial
                for xi in range(A2):
                    for g in range(G):
                        for k0 in range(0, Kg, kp):
                            k1 = min(Kg, k0 + kp)
                            np.dot(U[xi, g, k0:k1], V3[xi, g * Cg:(g + 1) * Cg],
                                   M3[xi, g * Kg + k0:g * Kg + k1])
            if phases & 4:
                _block_output(M.reshape(A2, K * ld), y, bias, tmp, E, n, t0, tc, tw, m,
                              first_tab, second_tab, ld, coff)


@njit(parallel=True, cache=True)
def fused_weight_grad(x, dy, part, rb, m, off_h, off_w, n0, nc, nw, vbuf, mbuf, tbuf, E,
                      gbuf, row_tab, col_tab, first_tab, second_tab, phases, shared):
    """``part[i] (A*A, G, Kg, Cg)``: the transformed weight gradient of image ``n0 + i``
    (``i < nc``), ``sum over its tiles of Mg[xi] V[xi]^T``, summed block after block in tile
    order; worker ``w`` takes images ``w, w + nw, ...`` (``gbuf[w]``: one block's product).

    ``shared``: the transforms only (``rb`` = whole images) into one ``V (A*A, C, nc*L)``
    (``vbuf[0]``) and ``Mg (A*A, K, nc*L)`` (``mbuf[0]``), image ``n0 + i`` in columns
    ``[i*L, (i+1)*L)``; the caller multiplies (see :func:`batched_weight_grad`)."""
    C, K = x.shape[1], dy.shape[1]
    P, Q = dy.shape[2], dy.shape[3]
    G, Kg, Cg = part.shape[2], part.shape[3], part.shape[4]
    A = m + 2
    A2 = A * A
    th, tw = (P + m - 1) // m, (Q + m - 1) // m
    vw = tw + 1
    for w in prange(nw):
        tmp, prod = tbuf[w], gbuf[w]
        for i in range(w, nc, nw):
            n = n0 + i
            for t0 in range(0, th, rb):
                tc = min(rb, th - t0)
                L = tc * vw
                if shared:
                    V, Mg, ld, coff = vbuf[0], mbuf[0], nc * L, i * L
                else:
                    V, Mg, ld, coff = vbuf[w, :A2 * C * L], mbuf[w, :A2 * K * L], L, 0
                if phases & 1:
                    _block_input(x, V.reshape(A2, C * ld), tmp, E, n, t0, tc, tw, m, off_h,
                                 off_w, row_tab, col_tab, ld, coff)
                if phases & 4:
                    _block_grad_output(dy, Mg.reshape(A2, K * ld), tmp, E, n, t0, tc, tw, m,
                                       first_tab, second_tab, ld, coff)
                if phases & 2 and not shared:
                    V3, M3 = V.reshape(A2, C, L), Mg.reshape(A2, K, L)
                    kp = max(1, (BLAS_SERIAL_MACS - 1) // (Cg * L))
                    for xi in range(A2):
                        for g in range(G):
                            dst = part[i, xi, g]
                            Vt = V3[xi, g * Cg:(g + 1) * Cg].T
                            for k0 in range(0, Kg, kp):
                                k1 = min(Kg, k0 + kp)
                                Mk = M3[xi, g * Kg + k0:g * Kg + k1]
                                if t0 == 0:
                                    np.dot(Mk, Vt, dst[k0:k1])
                                else:
                                    np.dot(Mk, Vt, prod[k0:k1])
                            if t0 > 0:
                                for a in range(Kg):
                                    for b in range(Cg):
                                        dst[a, b] += prod[a, b]


@njit(cache=True)     # serial: little work (K * C * 9 inputs); parallel loops compile slowly
def _filter_transform(w9, G, U):
    """``U[a*A + b, kc] = sum_{r, s} G[a, r] w9[r*3 + s, kc] G[b, s]``, separably and with
    ``kc`` innermost (slices indexed by the loop variable) so the loops vectorise."""
    A, KC = G.shape[0], w9.shape[1]
    for blk in range((KC + BLOCK - 1) // BLOCK):
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


@njit(cache=True)
def _filter_transform_adjoint(dU, G, gw9):
    """``gw9[r*3 + s, kc] = sum_{a, b} G[a, r] dU[a*A + b, kc] G[b, s]``."""
    A, KC = G.shape[0], gw9.shape[1]
    for blk in range((KC + BLOCK - 1) // BLOCK):
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


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------
class Plan(NamedTuple):
    """Blocks of ``rb`` tile rows, ``nw`` workers; for the weight gradient, images reduced
    ``group`` at a time (one partial sum each)."""

    rb: int
    nw: int
    group: int


def plan(N: int, th: int, tw: int, m: int, C: int, K: int, filter_elems: int,
         weight_grad: bool, itemsize: int, algo, threads: Optional[int] = None) -> Plan:
    """Block size and worker count under the workspace bound (sizes from ``cpu_workspace``:
    a worker's buffers for ``rb`` tile rows fit in ``rb`` rows' worth of workspace).

    ``rb`` depends on the geometry and the bound only, so results do not depend on the thread
    count; ``algo``'s ``chunk_bytes`` (tests: 1) can make blocks smaller than
    :data:`BLOCK_BYTES`."""
    fixed, per_row = winograd_tile_bytes(m, tw, C + K, filter_elems, weight_grad, itemsize)
    rows_fit = max(1, (workspace_bound(algo) - fixed) // per_row)
    want = min(BLOCK_BYTES, int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES)))
    vm_row = (m + 2) ** 2 * (C + K) * row_width(tw) * itemsize
    rb = max(1, min(th, rows_fit, want // vm_row))
    threads = numba.get_num_threads() if threads is None else threads
    blocks = N * -(-th // rb)
    nw = max(1, min(threads, rows_fit // rb, N if weight_grad else blocks))
    group = 1
    if weight_grad:   # each worker needs a partial sum and a product; fixed holds one pair
        filt = filter_elems * (m + 2) ** 2 * itemsize
        spare = workspace_bound(algo) - fixed - nw * rb * per_row
        nw = max(1, min(nw, 1 + spare // (2 * filt)))
        group = nw
    return Plan(rb, nw, group)


# Elements per row of the transforms' passes: runs of channels (or filters) of a block are
# transformed together so that each pass is one loop of about this length.
PASS_ELEMS = 1024


def _temps(tw: int, m: int, p: Plan, dtype, bound: int) -> tuple:
    """Per-worker transform temporaries, which hold passes of ``E`` elements (the input
    transform's planes and row pass, then the output transform's two passes, in the same
    memory); with ``E`` below the per-row allowance of ``cpu_workspace``
    (``WINOGRAD_TEMP_CHANNELS * A*A * vw`` elements)."""
    A = m + 2
    L = p.rb * row_width(tw)
    rows = m * m + A * m
    allowance = (WINOGRAD_TEMP_CHANNELS * A * A * L - m * m) // rows
    E = max((p.rb + 1) * row_width(tw), min(PASS_ELEMS, allowance))
    tbuf = scratch((p.nw, rows * E + m * m), dtype, bound)
    tbuf[:] = 0      # the planes' last column is read (into padding tiles): keep it finite
    return tbuf, E


def _buffers(C: int, K: int, tw: int, m: int, p: Plan, dtype, bound: int) -> tuple:
    """Per-worker buffers ``V (A*A * C * L)``, ``M (A*A * K * L)`` for ``L = rb * vw`` and the
    transforms' temporaries (:func:`_temps`)."""
    A2, L = (m + 2) ** 2, p.rb * row_width(tw)
    vbuf = scratch((p.nw, A2 * C * L), dtype, bound)
    mbuf = scratch((p.nw, A2 * K * L), dtype, bound)
    return (vbuf, mbuf) + _temps(tw, m, p, dtype, bound)


def batched_images(N: int, th: int, tw: int, m: int, C: int, K: int, filter_elems: int,
                   weight_grad: bool, itemsize: int, algo) -> int:
    """Images per chunk of the batched layout: whole images' ``V`` and ``M`` under the
    workspace bound and, where possible, under ``algo``'s ``chunk_bytes``; from the geometry
    and the bound only, never the thread count (so the weight gradient's sum order is fixed).
    """
    fixed, per_row = winograd_tile_bytes(m, tw, C + K, filter_elems, weight_grad, itemsize)
    per_image = th * per_row
    fit = (workspace_bound(algo) - fixed) // per_image
    want = int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES)) // per_image
    return max(1, min(N, fit, want))


def _batched_setup(N, C, K, th, tw, m, filter_elems, weight_grad, dtype, algo):
    """Images per chunk ``nc``, workers, the shared ``V``/``M`` rows and temporaries."""
    nc = batched_images(N, th, tw, m, C, K, filter_elems, weight_grad,
                        np.dtype(dtype).itemsize, algo)
    p = Plan(th, max(1, min(numba.get_num_threads(), nc)), 1)
    bound = workspace_bound(algo)
    A2, L = (m + 2) ** 2, th * row_width(tw)
    vbuf = scratch((1, A2 * C * nc * L), dtype, bound)
    mbuf = scratch((1, A2 * K * nc * L), dtype, bound)
    return nc, p, vbuf, mbuf, _temps(tw, m, p, dtype, bound)


def batched_conv(x: np.ndarray, U: np.ndarray, b: np.ndarray, y: np.ndarray, m: int,
                 offsets: tuple[int, int], algo, phases: int = ALL_PHASES) -> None:
    """``winograd_conv`` for layers whose blocks' GEMMs are too big for BLAS to run inside
    the workers (see ``layout`` in the dispatch rules): per chunk of ``nc`` whole images, the
    parallel input transform writes one ``V (A*A, C, nc*L)``, ``A*A`` BLAS-threaded GEMMs
    (``np.matmul``, from this thread) give ``M (A*A, K, nc*L)``, and the parallel output
    transform writes ``y``. Each GEMM has all the chunk's tiles as columns, so the filters
    ``U[xi]`` are read once per chunk rather than once per block."""
    N, C = x.shape[:2]
    K, P, Q = y.shape[1:]
    G, Kg, Cg = U.shape[1:]
    th, tw = tile_grid(P, Q, m)
    A2, L = (m + 2) ** 2, th * row_width(tw)
    nc, p, vbuf, mbuf, (tbuf, E) = _batched_setup(N, C, K, th, tw, m, U[0].size, False,
                                                  x.dtype, algo)
    tabs = input_tables(m, tw, x.dtype) + output_tables(m, x.dtype)
    for n0 in range(0, N, nc):
        k = min(nc, N - n0)
        xs, ys = x[n0:n0 + k], y[n0:n0 + k]
        V, M = vbuf[:, :A2 * C * k * L], mbuf[:, :A2 * K * k * L]
        fused_conv(xs, U, b, ys, th, m, *offsets, p.nw, V, M, tbuf, E, *tabs,
                   phases & PHASE_INPUT, True)
        if phases & PHASE_GEMM:
            V3, M3 = V.reshape(A2, C, k * L), M.reshape(A2, K, k * L)
            for g in range(G):
                np.matmul(U[:, g], V3[:, g * Cg:(g + 1) * Cg], out=M3[:, g * Kg:(g + 1) * Kg])
        fused_conv(xs, U, b, ys, th, m, *offsets, p.nw, V, M, tbuf, E, *tabs,
                   phases & PHASE_OUTPUT, True)


def winograd_conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
                  out_hw: tuple[int, int], offsets: tuple[int, int], groups: int,
                  algo, phases: int = ALL_PHASES) -> np.ndarray:
    """3x3 stride-1 correlation of ``x (N, C, H, W)`` with ``weight (K, C/G, 3, 3)``:
    ``y[n, k, p, q] = sum w[k, c, r, s] x[n, g*Cg + c, p + off_h + r, q + off_w + s]`` (zero
    outside ``x``) for an output of ``out_hw = (P, Q)``; returns ``(N, K, P, Q)``.
    ``phases`` other than ALL_PHASES (benchmark only) skip phases and leave ``y`` partial."""
    N, C = x.shape[:2]
    K = weight.shape[0]
    P, Q = out_hw
    m = int(algo.get("tile", 4))
    th, tw = tile_grid(P, Q, m)
    U = filter_transform(weight, np.array(_G[m], dtype=np.float64), groups, x.dtype)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    b = bias if bias is not None else np.zeros(K, dtype=x.dtype)
    if algo.get("layout", "fused") == "batched":
        batched_conv(x, U, b, y, m, offsets, algo, phases)
        return y
    p = plan(N, th, tw, m, C, K, weight.shape[0] * weight.shape[1], False, x.dtype.itemsize,
             algo)
    bufs = _buffers(C, K, tw, m, p, x.dtype, workspace_bound(algo))
    fused_conv(x, U, b, y, p.rb, m, *offsets, p.nw, *bufs, *input_tables(m, tw, x.dtype),
               *output_tables(m, x.dtype), phases, False)
    return y


def forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
            algo) -> np.ndarray:
    """Conv forward ``(N, K, P, Q)`` of a 3x3 stride-1 undilated layer, any padding."""
    pt, pl = geom.padding[0], geom.padding[2]
    return winograd_conv(x, weight, bias, (geom.P, geom.Q), (-pt, -pl), geom.groups, algo)


def rotated_weight(weight: np.ndarray, geom) -> np.ndarray:
    """The kernel of the input gradient ``(C, K/G, 3, 3)``: rotated by 180 degrees, input and
    output channels swapped within each group."""
    G, K, Cg = geom.groups, geom.K, geom.C // geom.groups
    return (weight.reshape(G, K // G, Cg, 3, 3)[..., ::-1, ::-1]
            .transpose(0, 2, 1, 3, 4).reshape(geom.C, K // G, 3, 3))


def input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient ``(N, C, H, W)``: ``grad_output`` correlated with the rotated kernel
    (lecture notes 7.5), the forward path with offsets ``pt - 2``, ``pl - 2``."""
    pt, pl = geom.padding[0], geom.padding[2]
    return winograd_conv(grad_output, rotated_weight(weight, geom), None, (geom.H, geom.W),
                         (pt - 2, pl - 2), geom.groups, algo)


def batched_weight_grad(x: np.ndarray, grad_output: np.ndarray, dU: np.ndarray, m: int,
                        offsets: tuple[int, int], algo, phases: int = ALL_PHASES) -> None:
    """``dU (A*A, G, Kg, Cg)`` in the batched layout: per chunk of whole images, the parallel
    transforms write ``V (A*A, C, nc*L)`` and ``Mg (A*A, K, nc*L)``, and one BLAS GEMM per
    transform point and group, ``Mg[xi] V[xi]^T``, sums over the chunk's tiles; the chunks'
    sums are added in image order."""
    N, C = x.shape[:2]
    K, P, Q = grad_output.shape[1:]
    A2, G, Kg, Cg = dU.shape
    th, tw = tile_grid(P, Q, m)
    L = th * row_width(tw)
    nc, p, vbuf, mbuf, (tbuf, E) = _batched_setup(N, C, K, th, tw, m, G * Kg * Cg, True,
                                                  x.dtype, algo)
    tabs = input_tables(m, tw, x.dtype) + grad_output_tables(m, x.dtype)
    part = dU.reshape((1,) + dU.shape)          # typing only: not written in this layout
    gbuf = np.empty((p.nw, 1, 1), dtype=x.dtype)
    prod = np.empty_like(dU) if N > nc else dU
    for n0 in range(0, N, nc):
        k = min(nc, N - n0)
        V, Mg = vbuf[:, :A2 * C * k * L], mbuf[:, :A2 * K * k * L]
        fused_weight_grad(x, grad_output, part, th, m, *offsets, n0, k, p.nw, V, Mg, tbuf, E,
                          gbuf, *tabs, phases & (PHASE_INPUT | PHASE_OUTPUT), True)
        if phases & PHASE_GEMM:
            V3, M3 = V.reshape(A2, C, k * L), Mg.reshape(A2, K, k * L)
            dst = dU if n0 == 0 else prod
            for g in range(G):
                np.matmul(M3[:, g * Kg:(g + 1) * Kg],
                          V3[:, g * Cg:(g + 1) * Cg].transpose(0, 2, 1), out=dst[:, g])
            if n0 > 0:
                dU += prod


def weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo,
                phases: int = ALL_PHASES) -> np.ndarray:
    """Weight gradient ``(K, C/G, 3, 3)`` by the adjoint of the forward transforms: per image,
    the blocks' products summed in tile order; the images' sums added in image order (in the
    batched layout, per chunk of images, one GEMM over the chunk's tiles)."""
    C, K, G = geom.C, geom.K, geom.groups
    m = int(algo.get("tile", 4))
    offsets = (-geom.padding[0], -geom.padding[2])
    dU = np.zeros(((m + 2) ** 2, G, K // G, C // G), dtype=x.dtype)
    if algo.get("layout", "fused") == "batched":
        batched_weight_grad(x, grad_output, dU, m, offsets, algo, phases)
    else:
        _fused_weight_grad(x, grad_output, dU, geom, m, offsets, algo, phases)
    gw = filter_transform_adjoint(dU, np.array(_G[m], dtype=np.float64))
    return gw.reshape(geom.weight_shape).astype(x.dtype)


def _fused_weight_grad(x, grad_output, dU, geom, m, offsets, algo, phases) -> None:
    """``dU`` from the fused loop: images' transformed gradients, ``group`` at a time."""
    N, C, K, G = geom.N, geom.C, geom.K, geom.groups
    A2 = (m + 2) ** 2
    th, tw = tile_grid(geom.P, geom.Q, m)
    p = plan(N, th, tw, m, C, K, K * (C // G), True, x.dtype.itemsize, algo)
    bound = workspace_bound(algo)
    vbuf, mbuf, tbuf, E = _buffers(C, K, tw, m, p, x.dtype, bound)
    part = scratch((p.group, A2, G, K // G, C // G), x.dtype, bound)
    gbuf = scratch((p.nw, K // G, C // G), x.dtype, bound)
    tabs = input_tables(m, tw, x.dtype) + grad_output_tables(m, x.dtype)
    for n0 in range(0, N, p.group):
        nc = min(p.group, N - n0)
        fused_weight_grad(x, grad_output, part, p.rb, m, *offsets, n0, nc, p.nw, vbuf, mbuf,
                          tbuf, E, gbuf, *tabs, phases, False)
        for i in range(nc):
            dU += part[i]
