"""Winograd F(m x m, 3 x 3) convolution for 3x3, stride-1, undilated layers (m = 2 or 4).

An output tile of ``m x m`` pixels is computed from an ``A x A`` input tile (``A = m + 2``) as
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    Y = AT [ (G g G^T) (.) (BT d BT^T) ] AT^T            (.) elementwise

so the ``m * m * 9`` multiplies of a direct tile become ``A * A`` (F(2x2): 2.25x fewer, F(4x4):
4x fewer). Summed over channels, each of the ``A * A`` transform points is one GEMM::

    M[xi] (K, T) = U[xi] (K, C) @ V[xi] (C, T)        xi = a * A + b, T = tiles

Fused and cache-blocked (as in NNPACK, oneDNN and Jia et al., PPoPP 2018): the tiles are
cut into blocks of ``rb`` tile rows of one image; each worker of one parallel loop transforms
a block into its own ``V (A*A, C, rb * tw)``, multiplies it into ``M (A*A, K, rb * tw)``
with ``A*A`` ``np.dot`` calls (BLAS, from the worker's thread) and transforms ``M`` straight
into the output, so V and M stay in the core's L2 (:data:`BLOCK_BYTES`) and there is one
thread pool. Each transform is one vectorised loop over the tiles of a run of channels (or
filters) that computes whole tiles with the explicit formulas of ``BT``, ``AT`` and ``AT^T``
(see "The tile transforms" below). Groups split ``C`` and ``K`` into ``G`` GEMMs per
transform point. Only real tiles are multiplied: ``V`` and ``M`` hold no padding tiles.

Batched (for many channels on small planes, where a block's GEMMs are too thin): per chunk of
whole images, channels last: ``V (A*A, tiles, C)``, BLAS-threaded GEMMs
``M[xi] = V[xi] U[xi]^T`` over all the chunk's tiles, and transforms that run along the
channels of one tile at a time (the same tile formulas, channels in the place of tiles; see
"The batched layout, channels last" below).

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

from .cpu_workspace import (BLAS_SERIAL_MACS, DEFAULT_CHUNK_BYTES, WINOGRAD_PLANE, scratch,
                            winograd_batched_bytes, winograd_temp_elems, winograd_tile_bytes,
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


# ---------------------------------------------------------------------------------------------
# Numba kernels. The work is cut into blocks of ``rb`` tile rows of one image. One parallel
# loop runs over workers; worker ``w`` takes blocks ``w, w + nw, ...`` and, for each, transforms
# the block's input into its own buffer ``V (A*A, C, rb * tw)`` (small enough to stay in its
# core's L2), multiplies it with ``np.dot`` (BLAS, called from the worker's thread), and
# transforms the product straight into the output: every byte of V and M is written and read
# while still in cache, and there is one thread pool.
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
# Preferred bytes of the batched layout's V and M per chunk of images. Measured, float32, 2
# threads, against im2col in alternating calls (time ratio forward / input grad / weight
# grad): 14x14 x 256, N=8, F(2x2), chunks of 8 images (14.6 MB) 1.06 / 0.88 / 0.92, of 2
# (3.6 MB) 0.90 / 0.82 / 0.92; 28x28 x 256, N=8, F(4x4), chunks of 3 (12.3 MB) 0.58 / 0.64 /
# 0.60, of 2 0.56 / 0.62 / 0.56, of 1 0.58 / 0.70 / 0.75 (sessions 11-12, the layout then
# channels first). Session 21, r3x3_14 (8 images of 14x14 x 256, F(4x4): 1.2 MB an image),
# the three ops one after the other, 2 threads, three runs of 9-15 alternating rounds, medians
# (ms, forward / input grad / weight grad): chunks of 6 + 2 images (9 MB) 7.82 / 8.27 / 9.21,
# 8.35 / 8.91 / 9.83, 6.75 / 7.44 / 7.92; one chunk of 8 (12 MB) 8.01 / 8.61 / 8.09, 7.69 /
# 8.10 / 7.90, 6.68 / 7.06 / 6.97: a later chunk's weight gradient is a second product added
# into dU, and its GEMMs are thin. 12 MB: 2 images of 28x28 x 256 (with F(4x4), the input
# channels last and a worker's scratch), 8 of 14x14 x 256.
BATCHED_BYTES = 12 * 2**20


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


# ---------------------------------------------------------------------------------------------
# The tile transforms. Each one runs over a scratch of planes laid ``PLANE`` elements apart
# (``cpu_workspace.WINOGRAD_PLANE``, a compile-time constant): one loop over tiles reads a
# whole tile from the planes, transforms it in registers (the explicit formulas below) and
# writes every transform point to its own plane. Because the planes lie at constant distances
# from each other, LLVM checks the loop's reads against its writes for overlap as two groups
# and vectorises it over the tiles; with distances known only at run time (the rows of V or M,
# or planes sized to the block) it needed one check per pair of rows, gave up at its limit of
# 8 and left such loops scalar, which is why the transforms used to be passes of four rows at
# a time. A run of several channels (or filters) and tile rows is one flat loop over their
# tiles, ``tw`` a tile row.
#
# Planes of one block: the input (or grad_output) rows are copied into a band, row phase
# ``hp`` (row ``t*m + hp`` of the run) after row phase, then split by column phase ``wp``:
# plane ``hp*m + wp`` holds ``x[t*m + hp, j*m + wp]`` of tile ``(t, j)`` at ``t*tw + j``
# (runs of channels one after another, ``R`` tile rows each). An input tile also reads the
# first two columns of the tile after it: the band's rows carry one more tile (``tw + 1`` a
# row: the image's next pixels or zeros), and :func:`_split_tiles` copies those columns of
# the next tile into ``2*m`` neighbour planes at the tile's own index, so that no padding
# tile is transformed or multiplied (session 18: padding tiles were 1/8 of r3x3_14's GEMMs
# with F(2x2)). grad_output tiles do not overlap: their band has no extra tile.
# ---------------------------------------------------------------------------------------------
PLANE = WINOGRAD_PLANE
_P = np.uint64(WINOGRAD_PLANE)
_1 = np.uint64(1)


@njit(cache=True, inline="always")
def _bt4(d, two, four, five):
    """``BT d`` of F(4x4, 3x3) for six values (rows of BT: 4 0 -5 0 1 0 / 0 -4 -4 1 1 0 /
    0 4 -4 -1 1 0 / 0 -2 -1 2 1 0 / 0 2 -1 -2 1 0 / 0 4 0 -5 0 1)."""
    d0, d1, d2, d3, d4, d5 = d
    e42 = d4 - d2
    e31 = d3 - d1
    return (four * d0 - five * d2 + d4, (d3 + d4) - four * (d1 + d2),
            (d4 - d3) + four * (d1 - d2), e42 + two * e31, e42 - two * e31,
            four * d1 - five * d3 + d5)


@njit(cache=True, inline="always")
def _bt2(d):
    """``BT d`` of F(2x2, 3x3) (rows 1 0 -1 0 / 0 1 1 0 / 0 -1 1 0 / 0 1 0 -1)."""
    d0, d1, d2, d3 = d
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(cache=True, inline="always")
def _at4(d, two, four, eight):
    """``AT d`` of F(4x4, 3x3) (rows 1 1 1 1 1 0 / 0 1 -1 2 -2 0 / 0 1 1 4 4 0 /
    0 1 -1 8 -8 1)."""
    d0, d1, d2, d3, d4, d5 = d
    s12, e12, s34, e34 = d1 + d2, d1 - d2, d3 + d4, d3 - d4
    return d0 + s12 + s34, e12 + two * e34, s12 + four * s34, e12 + eight * e34 + d5


@njit(cache=True, inline="always")
def _at2(d):
    """``AT d`` of F(2x2, 3x3) (rows 1 1 1 0 / 0 1 -1 -1)."""
    d0, d1, d2, d3 = d
    return d0 + d1 + d2, d1 - d2 - d3


@njit(cache=True, inline="always")
def _att4(d, two, four, eight):
    """``AT^T d`` of F(4x4, 3x3): the adjoint of :func:`_at4`."""
    d0, d1, d2, d3 = d
    s02, s13 = d0 + d2, d1 + d3
    f02, f13 = d0 + four * d2, two * d1 + eight * d3
    return d0, s02 + s13, s02 - s13, f02 + f13, f02 - f13, d3


@njit(cache=True, inline="always")
def _att2(d):
    """``AT^T d`` of F(2x2, 3x3)."""
    d0, d1 = d
    return d0, d0 + d1, d0 - d1, -d1


@njit(cache=True, inline="always")
def _row6(S, b, nb, u):
    """Columns 0..5 of a 6x6 input tile's row: 0..3 from its four column-phase planes (``b``:
    the row phase's first plane, plus a tile row for rows 4 and 5), 4 and 5 from the two
    neighbour planes of that row phase (``nb``, likewise)."""
    return (S[b + u], S[b + _P + u], S[b + _P + _P + u], S[b + _P + _P + _P + u],
            S[nb + u], S[nb + _P + u])


@njit(cache=True, inline="always")
def _row4(S, b, nb, u):
    """Columns 0..3 of a 4x4 input tile's row: its two column-phase planes and the two
    neighbour planes."""
    return S[b + u], S[b + _P + u], S[nb + u], S[nb + _P + u]


@njit(cache=True, inline="always")
def _put6(T, o, c):
    """Six transform points ``c`` to planes ``o``, ``o + 6``, ... (apart by 6 planes)."""
    s = np.uint64(6 * PLANE)
    T[o] = c[0]
    T[o + s] = c[1]
    T[o + s + s] = c[2]
    T[o + np.uint64(18 * PLANE)] = c[3]
    T[o + np.uint64(24 * PLANE)] = c[4]
    T[o + np.uint64(30 * PLANE)] = c[5]


@njit(cache=True, inline="always")
def _put4(T, o, c, apart):
    """Four values ``c`` to planes ``o``, ``o + apart``, ``o + 2*apart``, ``o + 3*apart``."""
    s = np.uint64(apart * PLANE)
    T[o] = c[0]
    T[o + s] = c[1]
    T[o + s + s] = c[2]
    T[o + s + s + s] = c[3]


@njit(cache=True)
def _input_tiles(S, T, n, down, m):
    """``T[(a*A + b)*PLANE + u] = (BT d BT^T)[a, b]`` for the input tile ``d`` of tiles
    ``u < n`` of the planes ``S`` (:func:`_split_tiles`): columns ``>= m`` of a tile's row are
    its neighbour planes, rows ``i >= m`` row phase ``i - m`` ``down`` elements further (the
    next tile row, ``tw`` tiles on, in a block's planes; the window's second set of planes in
    the batched layout's, :func:`_cl_points`)."""
    v = np.uint64(down)
    q2 = np.uint64(2 * PLANE)
    if m == 4:
        dt = S.dtype.type
        two, four, five = dt(2), dt(4), dt(5)
        p4 = np.uint64(4 * PLANE)
        p8 = p4 + p4
        nb = np.uint64(16 * PLANE)
        for u in range(np.uint64(n)):
            r0 = _bt4(_row6(S, np.uint64(0), nb, u), two, four, five)
            r1 = _bt4(_row6(S, p4, nb + q2, u), two, four, five)
            r2 = _bt4(_row6(S, p8, nb + q2 + q2, u), two, four, five)
            r3 = _bt4(_row6(S, p8 + p4, nb + q2 + q2 + q2, u), two, four, five)
            r4 = _bt4(_row6(S, v, nb + v, u), two, four, five)
            r5 = _bt4(_row6(S, p4 + v, nb + q2 + v, u), two, four, five)
            # column b of the row pass gives the points (a, b): planes a*6 + b
            _put6(T, u, _bt4((r0[0], r1[0], r2[0], r3[0], r4[0], r5[0]), two, four, five))
            _put6(T, u + _P, _bt4((r0[1], r1[1], r2[1], r3[1], r4[1], r5[1]), two, four,
                                  five))
            _put6(T, u + _P + _P, _bt4((r0[2], r1[2], r2[2], r3[2], r4[2], r5[2]), two,
                                       four, five))
            _put6(T, u + np.uint64(3 * PLANE), _bt4((r0[3], r1[3], r2[3], r3[3], r4[3],
                                                     r5[3]), two, four, five))
            _put6(T, u + p4, _bt4((r0[4], r1[4], r2[4], r3[4], r4[4], r5[4]), two, four,
                                  five))
            _put6(T, u + np.uint64(5 * PLANE), _bt4((r0[5], r1[5], r2[5], r3[5], r4[5],
                                                     r5[5]), two, four, five))
    else:
        nb = np.uint64(4 * PLANE)
        for u in range(np.uint64(n)):
            r0 = _bt2(_row4(S, np.uint64(0), nb, u))
            r1 = _bt2(_row4(S, q2, nb + q2, u))
            r2 = _bt2(_row4(S, v, nb + v, u))
            r3 = _bt2(_row4(S, q2 + v, nb + q2 + v, u))
            _put4(T, u, _bt2((r0[0], r1[0], r2[0], r3[0])), 4)
            _put4(T, u + _P, _bt2((r0[1], r1[1], r2[1], r3[1])), 4)
            _put4(T, u + _P + _P, _bt2((r0[2], r1[2], r2[2], r3[2])), 4)
            _put4(T, u + np.uint64(3 * PLANE), _bt2((r0[3], r1[3], r2[3], r3[3])), 4)


@njit(cache=True, inline="always")
def _col6(T, b, u):
    """Column ``b`` (rows 0..5) of a 6x6 tile of transform points: planes ``i*6 + b``."""
    s = np.uint64(6 * PLANE)
    o = np.uint64(b * PLANE) + u
    return (T[o], T[o + s], T[o + s + s], T[o + np.uint64(18 * PLANE)],
            T[o + np.uint64(24 * PLANE)], T[o + np.uint64(30 * PLANE)])


@njit(cache=True, inline="always")
def _get4(T, o, apart):
    """Four values from planes ``o``, ``o + apart``, ``o + 2*apart``, ``o + 3*apart``."""
    s = np.uint64(apart * PLANE)
    return T[o], T[o + s], T[o + s + s], T[o + s + s + s]


@njit(cache=True)
def _output_tiles(T, O, n, m):
    """``O[(a*m + v)*PLANE + u] = (AT M AT^T)[a, v]`` for the tile of transform points
    ``M[i, b] = T[(i*A + b)*PLANE + u]``, ``u < n``."""
    if m == 4:
        dt = T.dtype.type
        two, four, eight = dt(2), dt(4), dt(8)
        p4 = np.uint64(4 * PLANE)
        for u in range(np.uint64(n)):
            c0 = _at4(_col6(T, 0, u), two, four, eight)
            c1 = _at4(_col6(T, 1, u), two, four, eight)
            c2 = _at4(_col6(T, 2, u), two, four, eight)
            c3 = _at4(_col6(T, 3, u), two, four, eight)
            c4 = _at4(_col6(T, 4, u), two, four, eight)
            c5 = _at4(_col6(T, 5, u), two, four, eight)
            _put4(O, u, _at4((c0[0], c1[0], c2[0], c3[0], c4[0], c5[0]), two, four, eight), 1)
            _put4(O, u + p4, _at4((c0[1], c1[1], c2[1], c3[1], c4[1], c5[1]), two, four,
                                  eight), 1)
            _put4(O, u + p4 + p4, _at4((c0[2], c1[2], c2[2], c3[2], c4[2], c5[2]), two,
                                       four, eight), 1)
            _put4(O, u + np.uint64(12 * PLANE), _at4((c0[3], c1[3], c2[3], c3[3], c4[3],
                                                       c5[3]), two, four, eight), 1)
    else:
        for u in range(np.uint64(n)):
            c0 = _at2(_get4(T, u, 4))
            c1 = _at2(_get4(T, u + _P, 4))
            c2 = _at2(_get4(T, u + _P + _P, 4))
            c3 = _at2(_get4(T, u + np.uint64(3 * PLANE), 4))
            o0 = _at2((c0[0], c1[0], c2[0], c3[0]))
            o1 = _at2((c0[1], c1[1], c2[1], c3[1]))
            _put4(O, u, (o0[0], o0[1], o1[0], o1[1]), 1)


@njit(cache=True)
def _grad_output_tiles(D, T, n, m):
    """``T[(a*A + b)*PLANE + f] = (AT^T d AT)[a, b]`` for the ``m x m`` tile ``d[u, v] =
    D[(u*m + v)*PLANE + f]``, ``f < n``: the adjoint of :func:`_output_tiles`."""
    if m == 4:
        dt = D.dtype.type
        two, four, eight = dt(2), dt(4), dt(8)
        p4 = np.uint64(4 * PLANE)
        for f in range(np.uint64(n)):
            h0 = _att4(_get4(D, f, 1), two, four, eight)
            h1 = _att4(_get4(D, f + p4, 1), two, four, eight)
            h2 = _att4(_get4(D, f + p4 + p4, 1), two, four, eight)
            h3 = _att4(_get4(D, f + np.uint64(12 * PLANE), 1), two, four, eight)
            _put6(T, f, _att4((h0[0], h1[0], h2[0], h3[0]), two, four, eight))
            _put6(T, f + _P, _att4((h0[1], h1[1], h2[1], h3[1]), two, four, eight))
            _put6(T, f + _P + _P, _att4((h0[2], h1[2], h2[2], h3[2]), two, four, eight))
            _put6(T, f + np.uint64(3 * PLANE), _att4((h0[3], h1[3], h2[3], h3[3]), two, four,
                                                     eight))
            _put6(T, f + p4, _att4((h0[4], h1[4], h2[4], h3[4]), two, four, eight))
            _put6(T, f + np.uint64(5 * PLANE), _att4((h0[5], h1[5], h2[5], h3[5]), two, four,
                                                     eight))
    else:
        p2 = np.uint64(2 * PLANE)
        for f in range(np.uint64(n)):
            h0 = _att2((D[f], D[f + _P]))
            h1 = _att2((D[f + p2], D[f + p2 + _P]))
            _put4(T, f, _att2((h0[0], h1[0])), 4)
            _put4(T, f + _P, _att2((h0[1], h1[1])), 4)
            _put4(T, f + _P + _P, _att2((h0[2], h1[2])), 4)
            _put4(T, f + np.uint64(3 * PLANE), _att2((h0[3], h1[3])), 4)


@njit(cache=True)
def _split_planes(band, S, F, m):
    """``S[(hp*m + wp)*PLANE + f] = band[(hp*F + f)*m + wp]`` for ``f < F``: the band's rows
    of each row phase split by column phase in one flat pass (an interleaved group of reads,
    which LLVM vectorises)."""
    for hp in range(m):
        s0 = np.uint64(hp * F * m)
        b0 = np.uint64(hp * m * PLANE)
        if m == 4:
            for f in range(np.uint64(F)):
                s = s0 + np.uint64(4) * f
                S[b0 + f] = band[s]
                S[b0 + _P + f] = band[s + _1]
                S[b0 + _P + _P + f] = band[s + np.uint64(2)]
                S[b0 + np.uint64(3 * PLANE) + f] = band[s + np.uint64(3)]
        else:
            for f in range(np.uint64(F)):
                s = s0 + np.uint64(2) * f
                S[b0 + f] = band[s]
                S[b0 + _P + f] = band[s + _1]


@njit(cache=True)
def _split_tiles(band, S, rows, tw, m):
    """The band's input tiles split into compact planes (no padding tile): for tile ``f = row
    * tw + j``, ``S[(hp*m + wp)*PLANE + f]`` is column phase ``wp`` of band tile ``row*(tw +
    1) + j`` of row phase ``hp``, and the neighbour planes ``S[(m*m + hp*2 + wp)*PLANE + f]``
    (``wp < 2``) column phase ``wp`` of the band tile after it: the tile's columns ``m`` and
    ``m + 1``, so that the transform reads every column of a tile at the tile's own index."""
    vw = tw + 1
    Fb = rows * vw
    for hp in range(m):
        b0 = np.uint64(hp * m * PLANE)
        n0 = np.uint64((m * m + hp * 2) * PLANE)
        for row in range(rows):
            s0 = np.uint64((hp * Fb + row * vw) * m)
            f0 = np.uint64(row * tw)
            if m == 4:
                for j in range(np.uint64(tw)):
                    s = s0 + np.uint64(4) * j
                    f = f0 + j
                    S[b0 + f] = band[s]
                    S[b0 + _P + f] = band[s + _1]
                    S[b0 + _P + _P + f] = band[s + np.uint64(2)]
                    S[b0 + np.uint64(3 * PLANE) + f] = band[s + np.uint64(3)]
                    S[n0 + f] = band[s + np.uint64(4)]
                    S[n0 + _P + f] = band[s + np.uint64(5)]
            else:
                for j in range(np.uint64(tw)):
                    s = s0 + np.uint64(2) * j
                    f = f0 + j
                    S[b0 + f] = band[s]
                    S[b0 + _P + f] = band[s + _1]
                    S[n0 + f] = band[s + np.uint64(2)]
                    S[n0 + _P + f] = band[s + np.uint64(3)]


@njit(cache=True, inline="always")
def _scratch(tmp, m):
    """A worker's transform scratch: ``m*m + 2*m`` planes (input tiles and their neighbour
    planes, grad_output tiles, or the output's pixels), ``A*A`` planes (transform points) and
    the band (``m*m`` planes' worth)."""
    a = (m * m + 2 * m) * PLANE
    b = a + (m + 2) * (m + 2) * PLANE
    return tmp[:a], tmp[a:b], tmp[b:b + a]


# ``_block_points``'s transform, and a zero offset, as NumPy scalars: Numba compiles a callee
# once per distinct argument type, and a literal (``True``, ``0``) is a type of its own.
INPUT_TILES, GRAD_OUTPUT_TILES = np.bool_(False), np.bool_(True)
I0 = np.int64(0)


@njit(cache=True)
def _block_points(x, V, tmp, n, t0, tc, tw, m, off_h, off_w, grad_output):
    """The transform points of a block's tiles: ``V[a*A + b, c*L + t*tw + j]`` for tile
    ``(t0 + t, j)`` of image ``n``'s channel ``c`` (``L = tc*tw``: the block's tiles).

    Input tiles (``INPUT_TILES``): ``(BT d BT^T)[a, b]`` for the ``A x A`` tile ``d`` of rows
    ``(t0 + t)*m + off_h + [0, A)``, columns ``j*m + off_w + [0, A)`` of ``x``, zero outside;
    each run of tile rows carries one more tile row in the planes (the tiles' last two rows).
    grad_output tiles (``GRAD_OUTPUT_TILES``, offsets 0): ``(AT^T d AT)[a, b]`` for the
    ``m x m`` tile ``d`` of ``x = dy (N, K, P, Q)``, zero beyond ``P x Q``: the adjoint of
    :func:`_block_output`. Runs of channels and tile rows share one transform loop."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    A2 = (m + 2) * (m + 2)
    # input tiles overlap the next tile's first two columns and rows: the band's tile rows
    # carry one more tile, and each run one more tile row; grad_output tiles do not overlap
    extra = 0 if grad_output else 1
    vw = tw + extra
    Wb = vw * m
    S, T, band = _scratch(tmp, m)
    xf = x.reshape(x.size)
    zero = x.dtype.type(0)
    b_lo = max(0, -off_w)
    b_hi = max(b_lo, min(Wb, W - off_w))
    nv = np.uint64(b_hi - b_lo)
    tr = min(tc, (PLANE - 1) // vw - extra)
    for ts in range(0, tc, tr):
        trc = min(tr, tc - ts)
        R = trc + extra
        F1 = R * tw                 # a channel's tiles in the planes (and T)
        cb = max(1, (PLANE - 1) // (R * vw))
        for c0 in range(0, C, cb):
            cbb = min(cb, C - c0)
            F = cbb * F1
            Fb = cbb * R * vw       # tiles of a row phase in the band
            # the runs' image rows, row phase after row phase, zero-padded to vw*m columns:
            # the band zeroed in one pass, then only the rows' valid spans copied (zeroing
            # each short row's ends was half of a 14x14 plane's transform)
            band[:Fb * m * m] = zero
            for cc in range(cbb):
                x0 = np.uint64((n * C + c0 + cc) * H) * np.uint64(W)
                for r in range(R * m):
                    h = (t0 + ts) * m + off_h + r
                    if h < 0 or h >= H:
                        continue
                    tp = r // m
                    hp = r - tp * m
                    o = np.uint64(hp * Fb * m + (cc * R + tp) * Wb + b_lo)
                    src = x0 + np.uint64(h * W + b_lo + off_w)
                    for e in range(nv):
                        band[o + e] = xf[src + e]
            if grad_output:
                _split_planes(band, S, F, m)        # Fb == F: no padding tiles
                _grad_output_tiles(S, T, F, m)
            else:
                _split_tiles(band, S, cbb * R, tw, m)
                _input_tiles(S, T, F - tw, tw, m)   # not the last channel's extra tile row
            for cc in range(cbb):
                v0 = (c0 + cc) * tc * tw + ts * tw
                for xi in range(A2):
                    dst = V[xi, v0:v0 + trc * tw]
                    src = T[xi * PLANE + cc * F1:]
                    for e in range(trc * tw):
                        dst[e] = src[e]


@njit(cache=True)
def _block_output(M, y, bias, tmp, n, t0, tc, tw, m):
    """``y[n, k, tile] = AT M[:, k*tc*tw + tile] AT^T + bias[k]`` for the block's tiles,
    clipped to ``y``'s ``P x Q``; runs of filters and tile rows at a time."""
    K, P, Q = y.shape[1], y.shape[2], y.shape[3]
    A2 = (m + 2) * (m + 2)
    O, T, band = _scratch(tmp, m)
    O2 = O[:m * m * PLANE].reshape(m * m, PLANE)
    yf = y.reshape(y.size)
    tr = min(tc, PLANE // tw)
    for ts in range(0, tc, tr):
        trc = min(tr, tc - ts)
        Lr = trc * tw
        kb = max(1, PLANE // Lr)
        for k0 in range(0, K, kb):
            kbb = min(kb, K - k0)
            for xi in range(A2):
                for kk in range(kbb):
                    s0 = (k0 + kk) * tc * tw + ts * tw
                    src = M[xi, s0:s0 + Lr]
                    dst = T[xi * PLANE + kk * Lr:]
                    for e in range(Lr):
                        dst[e] = src[e]
            _output_tiles(T, O, kbb * Lr, m)
            for kk in range(kbb):
                k = k0 + kk
                b_k = bias[k]
                y0 = np.uint64((n * K + k) * P) * np.uint64(Q)
                for a in range(m):
                    # row a of every tile row, interleaved in one long pass, then copied out
                    _interleave_row(band, np.uint64(0), m * Lr, O2[a * m:(a + 1) * m],
                                    kk * Lr, m, b_k)
                    for t in range(trc):
                        p = (t0 + ts + t) * m + a
                        if p >= P:
                            break
                        dst = yf[y0 + np.uint64(p * Q):]
                        src = band[t * tw * m:]
                        for q in range(Q):
                            dst[q] = src[q]


@njit(parallel=True, cache=True)
def fused_conv(x, U, bias, y, rb, m, off_h, off_w, nw, vbuf, mbuf, tbuf, mo, to, phases):
    """``y (N, K, P, Q)``: 3x3 stride-1 correlation of ``x (N, C, H, W)`` with the
    transformed filters ``U (A*A, G, Kg, Cg)`` plus ``bias``, read at offsets
    ``(off_h, off_w)``; blocks of ``rb`` tile rows on ``nw`` workers (buffers ``*buf[w]``)."""
    N, C = x.shape[0], x.shape[1]
    K, P, Q = y.shape[1], y.shape[2], y.shape[3]
    G, Kg, Cg = U.shape[1], U.shape[2], U.shape[3]
    A = m + 2
    A2 = A * A
    th, tw = (P + m - 1) // m, (Q + m - 1) // m
    per_image = (th + rb - 1) // rb
    nblocks = N * per_image
    for w in prange(nw):
        tmp = tbuf[w, to:]
        for blk in range(w, nblocks, nw):
            n = blk // per_image
            t0 = (blk - n * per_image) * rb
            tc = min(rb, th - t0)
            L = tc * tw
            V, M = vbuf[w, :A2 * C * L], mbuf[w, mo:mo + A2 * K * L]
            if phases & 1:
                _block_points(x, V.reshape(A2, C * L), tmp, n, t0, tc, tw, m, off_h, off_w,
                              INPUT_TILES)
            if phases & 2:
                V3, M3 = V.reshape(A2, C, L), M.reshape(A2, K, L)
                kp = max(1, (BLAS_SERIAL_MACS - 1) // (Cg * L))  # pieces BLAS keeps serial
                for xi in range(A2):
                    for g in range(G):
                        for k0 in range(0, Kg, kp):
                            k1 = min(Kg, k0 + kp)
                            np.dot(U[xi, g, k0:k1], V3[xi, g * Cg:(g + 1) * Cg],
                                   M3[xi, g * Kg + k0:g * Kg + k1])
            if phases & 4:
                _block_output(M.reshape(A2, K * L), y, bias, tmp, n, t0, tc, tw, m)


@njit(parallel=True, cache=True)
def fused_weight_grad(x, dy, part, rb, m, off_h, off_w, n0, nc, nw, vbuf, mbuf, tbuf, mo, to,
                      gbuf, phases):
    """``part[i] (A*A, G, Kg, Cg)``: the transformed weight gradient of image ``n0 + i``
    (``i < nc``), ``sum over its tiles of Mg[xi] V[xi]^T``, summed block after block in tile
    order; worker ``w`` takes images ``w, w + nw, ...`` (``gbuf[w]``: one block's product)."""
    C, K = x.shape[1], dy.shape[1]
    P, Q = dy.shape[2], dy.shape[3]
    G, Kg, Cg = part.shape[2], part.shape[3], part.shape[4]
    A = m + 2
    A2 = A * A
    th, tw = (P + m - 1) // m, (Q + m - 1) // m
    for w in prange(nw):
        tmp, prod = tbuf[w, to:], gbuf[w]
        for i in range(w, nc, nw):
            n = n0 + i
            for t0 in range(0, th, rb):
                tc = min(rb, th - t0)
                L = tc * tw
                V, Mg = vbuf[w, :A2 * C * L], mbuf[w, mo:mo + A2 * K * L]
                if phases & 1:
                    _block_points(x, V.reshape(A2, C * L), tmp, n, t0, tc, tw, m, off_h,
                                  off_w, INPUT_TILES)
                if phases & 4:
                    _block_points(dy, Mg.reshape(A2, K * L), tmp, n, t0, tc, tw, m, I0, I0,
                                  GRAD_OUTPUT_TILES)
                if phases & 2:
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


# ---------------------------------------------------------------------------------------------
# The batched layout, channels last. The transforms of small planes run along channels: a
# worker gathers a tile's A x A window (every channel of a run of channels, each pixel a
# plane apart in NCHW) into planes of its scratch laid out as the fused layout's tile planes
# (input: the row phases' column-phase and neighbour planes, the last two rows a second set
# ``_cl_second(m)`` further), and runs the same tile transforms with channels in
# place of tiles; the transform points then go to ``V[xi, tile, channels]`` in contiguous
# runs. The output transform likewise takes ``M[xi, tile, filters]`` into planes and scatters
# the tile's ``m x m`` pixels of each filter into ``y``.
# ---------------------------------------------------------------------------------------------
# Channels per pass of the channels-last transforms (at most PLANE).
CL_CHANNELS = 128


@njit(cache=True, inline="always")
def _cl_second(m):
    """Offset of the second set of input planes (a tile's rows ``m`` and ``m + 1``)."""
    return np.uint64((m * m + 2 * m) * PLANE)


@njit(cache=True, inline="always")
def _cl_input_plane(i, l, m):
    """The plane of a tile's pixel ``(i, l)`` in the input transform's layout (see
    :func:`_split_tiles` and :func:`_input_tiles`)."""
    base = _cl_second(m) if i >= m else np.uint64(0)
    hp = i - m if i >= m else i
    p = hp * m + l if l < m else m * m + hp * 2 + l - m
    return base + np.uint64(p * PLANE)


@njit(parallel=True, cache=True)
def _cl_points(x, V, m, th, tw, off_h, off_w, tbuf, grad_output):
    """The transform points of every tile of ``x (N, C, H, W)``, channels last: ``V[a*A + b,
    (n*th + t)*tw + j, c]`` for channel ``c`` of tile ``(t, j)`` of image ``n``; rows of tiles
    on ``tbuf.shape[0]`` workers, ``CL_CHANNELS`` channels at a time.

    Input tiles (``INPUT_TILES``): ``(BT d BT^T)[a, b]`` for the ``A x A`` window ``d`` of rows
    ``t*m + off_h + [0, A)``, columns ``j*m + off_w + [0, A)`` of ``x``, zero outside.
    grad_output tiles (``GRAD_OUTPUT_TILES``, offsets 0): ``(AT^T d AT)[a, b]`` for the
    ``m x m`` tile ``d`` of ``x = dy (N, K, P, Q)``, zero beyond ``P x Q``: the adjoint of
    :func:`_cl_output`. A window's pixel is gathered across channels (a plane apart) straight
    into its plane of the worker's scratch."""
    N, C, H, W = x.shape
    A = m + 2
    A2 = A * A
    side = m if grad_output else A
    nw = tbuf.shape[0]
    second = _cl_second(m)
    xf = x.reshape(x.size)
    HW = np.uint64(H * W)
    zero = x.dtype.type(0)
    for w in prange(nw):
        D = tbuf[w]
        T = D[m * m * PLANE:] if grad_output else D[second + second:]
        for task in range(w, N * th, nw):
            n = task // th
            t = task - n * th
            for j in range(tw):
                tile = task * tw + j
                for c0 in range(0, C, CL_CHANNELS):
                    cb = min(CL_CHANNELS, C - c0)
                    base = np.uint64(n * C + c0) * HW
                    for i in range(side):
                        h = t * m + off_h + i
                        for l in range(side):
                            q = j * m + off_w + l
                            o = (np.uint64((i * m + l) * PLANE) if grad_output
                                 else _cl_input_plane(i, l, m))
                            dst = D[o:o + np.uint64(cb)]
                            if h < 0 or h >= H or q < 0 or q >= W:
                                dst[:] = zero
                                continue
                            src = base + np.uint64(h * W + q)
                            for c in range(np.uint64(cb)):
                                dst[c] = xf[src + c * HW]
                    if grad_output:
                        _grad_output_tiles(D, T, cb, m)
                    else:
                        _input_tiles(D, T, cb, np.int64(second), m)   # one signature
                    for xi in range(A2):
                        dst = V[xi, tile, c0:c0 + cb]
                        src = T[xi * PLANE:]
                        for c in range(cb):
                            dst[c] = src[c]


@njit(parallel=True, cache=True)
def _cl_output(M, y, bias, m, th, tw, tbuf):
    """``y[n, k, t*m + a, j*m + v] = (AT M[:, tile, k] AT^T)[a, v] + bias[k]`` for tile
    ``tile = (n*th + t)*tw + j``, clipped to ``y``'s ``P x Q``."""
    N, K, P, Q = y.shape
    A2 = (m + 2) * (m + 2)
    nw = tbuf.shape[0]
    yf = y.reshape(y.size)
    PQ = np.uint64(P * Q)
    for w in prange(nw):
        O = tbuf[w]
        T = O[m * m * PLANE:]
        for task in range(w, N * th, nw):
            n = task // th
            t = task - n * th
            for j in range(tw):
                tile = task * tw + j
                for k0 in range(0, K, CL_CHANNELS):
                    kb = min(CL_CHANNELS, K - k0)
                    for xi in range(A2):
                        src = M[xi, tile, k0:k0 + kb]
                        dst = T[xi * PLANE:]
                        for k in range(kb):
                            dst[k] = src[k]
                    _output_tiles(T, O, kb, m)
                    for a in range(m):
                        p = t * m + a
                        if p >= P:
                            break
                        for v in range(m):
                            q = j * m + v
                            if q >= Q:
                                break
                            o = O[(a * m + v) * PLANE:]
                            d = np.uint64((n * K + k0) * P * Q + p * Q + q)
                            for k in range(np.uint64(kb)):
                                yf[d + k * PQ] = o[k] + bias[k0 + k]


@njit(cache=True, inline="always")
def _gather_taps(w, wt, k0, n, Kg, Cg, rotate):
    """``wt[r*3 + s, e]`` = tap ``(r, s)`` of filter ``k0 + e`` of the flat ``w (K*Cg*9,)``:
    the block's filters tap-major in L1, so the transform loops run along filters. With
    ``rotate`` the filters are those of the input gradient, ``(G, Cg, Kg)`` in order (channels
    and filters swapped in each group, taps rotated by 180 degrees), read from ``w`` itself."""
    if rotate:
        # filter k0 + e is (g, c, k) of the rotated order, k fastest: stepped, not divided
        g = k0 // (Cg * Kg)
        c = (k0 - g * Cg * Kg) // Kg
        k = k0 - (g * Cg + c) * Kg
        for e in range(n):
            src = ((g * Kg + k) * Cg + c) * 9
            for rs in range(9):
                wt[rs, e] = w[src + 8 - rs]
            k += 1
            if k == Kg:
                k = 0
                c += 1
                if c == Cg:
                    c = 0
                    g += 1
    else:
        for e in range(n):
            for rs in range(9):
                wt[rs, e] = w[(k0 + e) * 9 + rs]


@njit(parallel=True, cache=True)
def _filter_transform(w, G, U, Kg, Cg, rotate, nw):
    """``U[a*A + b, kc] = sum_{r, s} G[a, r] wt[r*3 + s, kc] G[b, s]`` (``wt``: see
    :func:`_gather_taps`), separably and blocks of filters at a time, filters innermost so the
    loops vectorise; ``nw`` workers take contiguous runs of blocks (each element's bits do not
    depend on which). Parallel: 256 x 256 filters took 0.3-1.0 ms serially, 5-20% of a
    14 x 14 layer's op; the loop is over a few hundred blocks."""
    KC = U.shape[1]
    nblk = (KC + BLOCK - 1) // BLOCK
    for wk in prange(nw):
        _filter_blocks(w, G, U, Kg, Cg, rotate, wk * nblk // nw, (wk + 1) * nblk // nw)


@njit(cache=True, inline="always")
def _filter_blocks(w, G, U, Kg, Cg, rotate, b0, b1):
    """Blocks ``b0 .. b1`` of :func:`_filter_transform`."""
    A, KC = G.shape[0], U.shape[1]
    wt = np.empty((9, BLOCK), dtype=U.dtype)
    half = np.empty((A * 3, BLOCK), dtype=U.dtype)          # (G w)[a, s]
    for blk in range(b0, b1):
        k0 = blk * BLOCK
        n = min(KC, k0 + BLOCK) - k0
        _gather_taps(w, wt, k0, n, Kg, Cg, rotate)
        for a in range(A):
            g0, g1, g2 = G[a, 0], G[a, 1], G[a, 2]
            for s in range(3):
                h, w0, w1, w2 = half[a * 3 + s], wt[s], wt[3 + s], wt[6 + s]
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
def _filter_transform_adjoint(dU, G, gw, nw):
    """``gw[kc, r*3 + s] = sum_{a, b} G[a, r] dU[a*A + b, kc] G[b, s]``, blocks of filters
    at a time (written back filter-major from an L1 block); ``nw`` workers take contiguous
    runs of blocks, as in :func:`_filter_transform`."""
    KC = gw.shape[0]
    nblk = (KC + BLOCK - 1) // BLOCK
    for wk in prange(nw):
        _adjoint_blocks(dU, G, gw, wk * nblk // nw, (wk + 1) * nblk // nw)


@njit(cache=True, inline="always")
def _adjoint_blocks(dU, G, gw, b0, b1):
    """Blocks ``b0 .. b1`` of :func:`_filter_transform_adjoint`: ``(G^T dU)[r, b]``, each
    from the ``A`` rows of column ``b`` of the block's ``dU`` tiles in one pass; then each
    tap ``(G^T dU G)[r, s]`` from ``A`` of those in one pass, written filter-major. Each sum
    runs over the points in order (``a``, then ``b``), terms of zero coefficients included
    (the bits of the point-by-point accumulation this replaced, for finite values; it skipped
    the zero coefficients of the second product, so an infinite ``dU`` gave no NaN there).
    Against accumulating into the half products point by point (256 x 256 filters, F(4x4),
    float32, session 21): 1 thread 1.1-1.5 -> 0.9-1.1 ms, 2 threads 0.59-0.64 -> 0.46-0.48."""
    A, KC = G.shape[0], gw.shape[0]
    half = np.empty((3 * A, BLOCK), dtype=gw.dtype)       # (G^T dU)[r, b]
    gwf = gw.reshape(gw.size)
    cols = np.ascontiguousarray(G.T)                       # G's columns, read as scalars
    for blk in range(b0, b1):
        k0 = blk * BLOCK
        n = min(KC, k0 + BLOCK) - k0
        for b in range(A):
            for r in range(3):
                if A == 6:
                    _points6(dU, b, k0, n, cols[r], half[r * A + b])
                else:
                    _points4(dU, b, k0, n, cols[r], half[r * A + b])
        for r in range(3):
            for s in range(3):
                o = np.uint64(k0 * 9 + r * 3 + s)
                if A == 6:
                    _taps6(half, r * A, n, cols[s], gwf, o)
                else:
                    _taps4(half, r * A, n, cols[s], gwf, o)


# The adjoint's loops as functions of their own, not inlined: each is compiled once (per
# dtype) instead of once per call site (inlined at six, the adjoint took 22 s of the cold
# compile of both dtypes, 2.9 s a dtype before them; 4.8 s a dtype as they are).
@njit(cache=True)
def _points6(dU, b, k0, n, c, h):
    """``h[e] = sum_a c[a] dU[a*6 + b, k0 + e]`` in order of ``a``."""
    g0, g1, g2, g3, g4, g5 = c[0], c[1], c[2], c[3], c[4], c[5]
    x0, x1, x2 = dU[b, k0:k0 + n], dU[6 + b, k0:k0 + n], dU[12 + b, k0:k0 + n]
    x3, x4, x5 = dU[18 + b, k0:k0 + n], dU[24 + b, k0:k0 + n], dU[30 + b, k0:k0 + n]
    for e in range(n):
        h[e] = g0 * x0[e] + g1 * x1[e] + g2 * x2[e] + g3 * x3[e] + g4 * x4[e] + g5 * x5[e]


@njit(cache=True)
def _points4(dU, b, k0, n, c, h):
    """``h[e] = sum_a c[a] dU[a*4 + b, k0 + e]`` in order of ``a``."""
    g0, g1, g2, g3 = c[0], c[1], c[2], c[3]
    x0, x1, x2, x3 = dU[b, k0:k0 + n], dU[4 + b, k0:k0 + n], dU[8 + b, k0:k0 + n], \
        dU[12 + b, k0:k0 + n]
    for e in range(n):
        h[e] = g0 * x0[e] + g1 * x1[e] + g2 * x2[e] + g3 * x3[e]


@njit(cache=True)
def _taps6(half, r0, n, c, gwf, o):
    """``gwf[o + 9 e] = sum_b half[r0 + b, e] c[b]`` in order of ``b``."""
    g0, g1, g2, g3, g4, g5 = c[0], c[1], c[2], c[3], c[4], c[5]
    y0, y1, y2, y3, y4, y5 = (half[r0], half[r0 + 1], half[r0 + 2], half[r0 + 3],
                              half[r0 + 4], half[r0 + 5])
    for e in range(np.uint64(n)):
        gwf[o + np.uint64(9) * e] = (y0[e] * g0 + y1[e] * g1 + y2[e] * g2 + y3[e] * g3
                                     + y4[e] * g4 + y5[e] * g5)


@njit(cache=True)
def _taps4(half, r0, n, c, gwf, o):
    """``gwf[o + 9 e] = sum_b half[r0 + b, e] c[b]`` in order of ``b``."""
    g0, g1, g2, g3 = c[0], c[1], c[2], c[3]
    y0, y1, y2, y3 = half[r0], half[r0 + 1], half[r0 + 2], half[r0 + 3]
    for e in range(np.uint64(n)):
        gwf[o + np.uint64(9) * e] = y0[e] * g0 + y1[e] * g1 + y2[e] * g2 + y3[e] * g3


def _filter_workers(filters: int) -> int:
    """Workers of the filter transforms: one per thread, at most one per four blocks (a
    small layer's transform is a few microseconds, less than waking a thread)."""
    return max(1, min(numba.get_num_threads(), filters // (4 * BLOCK)))


def filter_transform(weight: np.ndarray, m: int, groups: int, rotate: bool,
                     bound: Optional[int] = None) -> np.ndarray:
    """``U (A*A, groups, Kg, Cg) = G w G^T`` per filter of ``weight (K, Cg, 3, 3)`` in its
    dtype (the rounding of G's 1/6, 1/12, 1/24 is far below the algorithm's own error); with
    ``rotate``, of the input gradient's kernel (``weight`` rotated by 180 degrees, channels
    and filters swapped in each group; see :func:`_gather_taps`), ``(A*A, groups, Cg, Kg)``.
    With ``bound``, ``U`` is scratch (the caller's op must not return it)."""
    K, Cg = weight.shape[:2]
    Kg = K // groups
    A = m + 2
    # scratch: 4 MB at 256 x 256, F(2x2); a fresh array is new pages whenever glibc has handed
    # the heap's top back (no difference measured in a process where it had not)
    U = (np.empty((A * A, K * Cg), dtype=weight.dtype) if bound is None
         else scratch((A * A, K * Cg), weight.dtype, bound))
    w = np.ascontiguousarray(weight).reshape(-1)
    _filter_transform(w, np.array(_G[m], dtype=weight.dtype), U, Kg, Cg, np.bool_(rotate),
                      _filter_workers(K * Cg))
    return U.reshape((A * A, groups) + ((Cg, Kg) if rotate else (Kg, Cg)))


def filter_transform_adjoint(dU: np.ndarray, m: int) -> np.ndarray:
    """``gw (K*Cg, 3, 3)`` in ``dU``'s dtype from ``dU (A*A, ...)``: the adjoint of
    :func:`filter_transform`."""
    A = m + 2
    KC = dU[0].size
    gw = np.empty((KC, 9), dtype=dU.dtype)
    _filter_transform_adjoint(dU.reshape(A * A, KC), np.array(_G[m], dtype=dU.dtype), gw,
                              _filter_workers(KC))
    return gw.reshape(KC, 3, 3)


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
    a worker needs ``rb`` rows' worth of workspace and its transform scratch).

    ``rb`` depends on the geometry and the bound only, so results do not depend on the thread
    count; ``algo``'s ``chunk_bytes`` (tests: 1) can make blocks smaller than
    :data:`BLOCK_BYTES`."""
    fixed, per_row = winograd_tile_bytes(m, tw, C + K, filter_elems, weight_grad, itemsize)
    temps = winograd_temp_elems(m) * itemsize
    free = workspace_bound(algo) - fixed
    rows_fit = max(1, (free - temps) // per_row)
    want = min(BLOCK_BYTES, int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES)))
    rb = max(1, min(th, rows_fit, want // per_row))
    threads = numba.get_num_threads() if threads is None else threads
    blocks = N * -(-th // rb)
    nw = max(1, min(threads, free // (rb * per_row + temps), N if weight_grad else blocks))
    group = 1
    if weight_grad:   # each worker needs a partial sum and a product; fixed holds one pair
        filt = filter_elems * (m + 2) ** 2 * itemsize
        spare = free - nw * (rb * per_row + temps)
        nw = max(1, min(nw, 1 + spare // (2 * filt)))
        group = nw
    return Plan(rb, nw, group)


def _buffers(C: int, K: int, tw: int, m: int, p: Plan, dtype, bound: int) -> tuple:
    """One row per worker holding its ``V (A*A * C * L)``, ``M (A*A * K * L)`` for
    ``L = rb * tw`` and its transform scratch (:func:`_scratch`), with the offsets of ``M``
    and of the scratch in the row."""
    A2, L = (m + 2) ** 2, p.rb * tw
    mo, to = A2 * C * L, A2 * (C + K) * L
    return scratch((p.nw, to + winograd_temp_elems(m)), dtype, bound), mo, to


def batched_images(N: int, th: int, tw: int, m: int, C: int, K: int, filter_elems: int,
                   weight_grad: bool, itemsize: int, algo) -> int:
    """Images per chunk of the batched layout: whole images' buffers (``winograd_batched_bytes``)
    under the workspace bound and, where possible, under ``algo``'s ``chunk_bytes``; from the
    geometry and the bound only, never the thread count (so the weight gradient's sum order is
    fixed)."""
    fixed = winograd_tile_bytes(m, tw, C + K, filter_elems, weight_grad, itemsize)[0]
    # and one worker's transform scratch per image (more workers only where the bound allows)
    per_image = (winograd_batched_bytes(m, th, tw, C, K, itemsize)
                 + winograd_temp_elems(m) * itemsize)
    fit = (workspace_bound(algo) - fixed) // per_image
    want = min(BATCHED_BYTES, int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES))) // per_image
    return max(1, min(N, fit, want))


def _batched_setup(x_shape, K, th, tw, m, filter_elems, weight_grad, dtype, algo):
    """Images per chunk ``nc``, workers and one flat scratch for a chunk's ``V``, ``M`` and
    the workers' transform scratch."""
    N, C = x_shape[:2]
    itemsize = np.dtype(dtype).itemsize
    nc = batched_images(N, th, tw, m, C, K, filter_elems, weight_grad, itemsize, algo)
    A2, T = (m + 2) ** 2, nc * th * tw
    sizes = {"V": A2 * T * C, "M": A2 * T * K}
    bound, temp = workspace_bound(algo), winograd_temp_elems(m)
    room = (bound // itemsize - sum(sizes.values())) // temp
    nw = max(1, min(numba.get_num_threads(), nc * th, room))
    sizes["tmp"] = nw * temp
    buf = scratch((sum(sizes.values()),), dtype, bound)
    views, o = {}, 0
    for name, size in sizes.items():
        views[name] = buf[o:o + size]
        o += size
    views["tmp"] = views["tmp"].reshape(nw, -1)
    return nc, views


def _chunk(flat: np.ndarray, shape: tuple) -> np.ndarray:
    """The leading ``prod(shape)`` elements of a flat scratch, shaped (C-contiguous)."""
    return flat[:int(np.prod(shape))].reshape(shape)


def batched_conv(x: np.ndarray, U: np.ndarray, b: np.ndarray, y: np.ndarray, m: int,
                 offsets: tuple[int, int], algo, phases: int = ALL_PHASES) -> None:
    """``winograd_conv`` for layers whose blocks' GEMMs are too big for BLAS to run inside
    the workers (see ``layout`` in the dispatch rules), channels last: per chunk of ``nc``
    whole images, the parallel input transform writes ``V (A*A, nc*T, C)`` (``T = th*tw``
    tiles an image),
    ``A*A`` BLAS-threaded GEMMs (``np.matmul``, from this thread) give
    ``M[xi] (nc*T, K) = V[xi] U[xi]^T``, and the parallel output transform writes ``y``.
    Every transform loop runs along channels (hundreds of them in these layers) instead of
    along the few tiles of a small plane."""
    N, C = x.shape[:2]
    K, P, Q = y.shape[1:]
    G, Kg, Cg = U.shape[1:]
    th, tw = tile_grid(P, Q, m)
    A2 = (m + 2) ** 2
    nc, bufs = _batched_setup(x.shape, K, th, tw, m, U[0].size, False, x.dtype, algo)
    for n0 in range(0, N, nc):
        k = min(nc, N - n0)
        T = k * th * tw
        V, M = _chunk(bufs["V"], (A2, T, C)), _chunk(bufs["M"], (A2, T, K))
        if phases & PHASE_INPUT:
            _cl_points(x[n0:n0 + k], V, m, th, tw, *offsets, bufs["tmp"], INPUT_TILES)
        if phases & PHASE_GEMM:
            for g in range(G):
                np.matmul(V[:, :, g * Cg:(g + 1) * Cg], U[:, g].transpose(0, 2, 1),
                          out=M[:, :, g * Kg:(g + 1) * Kg])
        if phases & PHASE_OUTPUT:
            _cl_output(M, y[n0:n0 + k], b, m, th, tw, bufs["tmp"])


def winograd_conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
                  out_hw: tuple[int, int], offsets: tuple[int, int], groups: int,
                  algo, phases: int = ALL_PHASES, rotate: bool = False) -> np.ndarray:
    """3x3 stride-1 correlation of ``x (N, C, H, W)`` with ``weight (K, C/G, 3, 3)``:
    ``y[n, k, p, q] = sum w[k, c, r, s] x[n, g*Cg + c, p + off_h + r, q + off_w + s]`` (zero
    outside ``x``) for an output of ``out_hw = (P, Q)``; returns ``(N, K, P, Q)``. With
    ``rotate``, ``x`` is a ``grad_output`` and the kernel the input gradient's: ``weight``
    rotated by 180 degrees, channels and filters swapped in each group (``(N, G*Cg, P, Q)``).
    ``phases`` other than ALL_PHASES (benchmark only) skip phases and leave ``y`` partial."""
    N, C = x.shape[:2]
    K = weight.shape[1] * groups if rotate else weight.shape[0]
    P, Q = out_hw
    m = int(algo.get("tile", 4))
    th, tw = tile_grid(P, Q, m)
    U = filter_transform(weight.astype(x.dtype, copy=False), m, groups, rotate,
                         workspace_bound(algo))
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    b = bias if bias is not None else np.zeros(K, dtype=x.dtype)
    if algo.get("layout", "fused") == "batched":
        batched_conv(x, U, b, y, m, offsets, algo, phases)
        return y
    p = plan(N, th, tw, m, C, K, weight.shape[0] * weight.shape[1], False, x.dtype.itemsize,
             algo)
    wbuf, mo, to = _buffers(C, K, tw, m, p, x.dtype, workspace_bound(algo))
    fused_conv(x, U, b, y, p.rb, m, *offsets, p.nw, wbuf, wbuf, wbuf, mo, to, phases)
    return y


def forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
            algo) -> np.ndarray:
    """Conv forward ``(N, K, P, Q)`` of a 3x3 stride-1 undilated layer, any padding."""
    pt, pl = geom.padding[0], geom.padding[2]
    return winograd_conv(x, weight, bias, (geom.P, geom.Q), (-pt, -pl), geom.groups, algo)


def input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient ``(N, C, H, W)``: ``grad_output`` correlated with the rotated kernel
    (lecture notes 7.5), the forward path with offsets ``pt - 2``, ``pl - 2``."""
    pt, pl = geom.padding[0], geom.padding[2]
    return winograd_conv(grad_output, weight, None, (geom.H, geom.W), (pt - 2, pl - 2),
                         geom.groups, algo, rotate=True)


def batched_weight_grad(x: np.ndarray, grad_output: np.ndarray, dU: np.ndarray, m: int,
                        offsets: tuple[int, int], algo, phases: int = ALL_PHASES) -> None:
    """``dU (A*A, G, Kg, Cg)`` in the batched layout, channels last: per chunk of whole
    images, the parallel transforms write ``V (A*A, nc*T, C)`` and ``Mg (A*A, nc*T, K)``, and
    one BLAS GEMM per transform point and group, ``Mg[xi]^T V[xi]``, sums over the chunk's
    tiles; the chunks' sums are added in image order."""
    N, C = x.shape[:2]
    K, P, Q = grad_output.shape[1:]
    A2, G, Kg, Cg = dU.shape
    th, tw = tile_grid(P, Q, m)
    nc, bufs = _batched_setup(x.shape, K, th, tw, m, G * Kg * Cg, True, x.dtype, algo)
    # a later chunk's product, one transform point at a time: small enough to stay in cache
    # (a whole second dU, 16 MB at 512 x 512 channels, was fresh pages every call)
    prod = np.empty((Kg, Cg), dtype=x.dtype)
    for n0 in range(0, N, nc):
        k = min(nc, N - n0)
        T = k * th * tw
        V, Mg = _chunk(bufs["V"], (A2, T, C)), _chunk(bufs["M"], (A2, T, K))
        if phases & PHASE_INPUT:
            _cl_points(x[n0:n0 + k], V, m, th, tw, *offsets, bufs["tmp"], INPUT_TILES)
        if phases & PHASE_OUTPUT:
            _cl_points(grad_output[n0:n0 + k], Mg, m, th, tw, I0, I0, bufs["tmp"],
                       GRAD_OUTPUT_TILES)
        if phases & PHASE_GEMM:
            for g in range(G):
                Mk = Mg[:, :, g * Kg:(g + 1) * Kg].transpose(0, 2, 1)
                Vg = V[:, :, g * Cg:(g + 1) * Cg]
                if n0 == 0:
                    np.matmul(Mk, Vg, out=dU[:, g])
                    continue
                for xi in range(A2):
                    np.matmul(Mk[xi], Vg[xi], out=prod)
                    dU[xi, g] += prod


def weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo,
                phases: int = ALL_PHASES) -> np.ndarray:
    """Weight gradient ``(K, C/G, 3, 3)`` by the adjoint of the forward transforms: per image,
    the blocks' products summed in tile order; the images' sums added in image order (in the
    batched layout, per chunk of images, one GEMM over the chunk's tiles)."""
    C, K, G = geom.C, geom.K, geom.groups
    m = int(algo.get("tile", 4))
    offsets = (-geom.padding[0], -geom.padding[2])
    # scratch, like the filters' transform (np.zeros can be fresh zeroed pages every call)
    dU = scratch(((m + 2) ** 2, G, K // G, C // G), x.dtype, workspace_bound(algo))
    if algo.get("layout", "fused") == "batched":
        batched_weight_grad(x, grad_output, dU, m, offsets, algo, phases)  # writes all of dU
    else:
        dU[...] = 0
        _fused_weight_grad(x, grad_output, dU, geom, m, offsets, algo, phases)
    gw = filter_transform_adjoint(dU, m)
    return gw.reshape(geom.weight_shape)


def _fused_weight_grad(x, grad_output, dU, geom, m, offsets, algo, phases) -> None:
    """``dU`` from the fused loop: images' transformed gradients, ``group`` at a time."""
    N, C, K, G = geom.N, geom.C, geom.K, geom.groups
    A2 = (m + 2) ** 2
    th, tw = tile_grid(geom.P, geom.Q, m)
    p = plan(N, th, tw, m, C, K, K * (C // G), True, x.dtype.itemsize, algo)
    bound = workspace_bound(algo)
    wbuf, mo, to = _buffers(C, K, tw, m, p, x.dtype, bound)
    part = scratch((p.group, A2, G, K // G, C // G), x.dtype, bound)
    gbuf = scratch((p.nw, K // G, C // G), x.dtype, bound)
    for n0 in range(0, N, p.group):
        nc = min(p.group, N - n0)
        fused_weight_grad(x, grad_output, part, p.rb, m, *offsets, n0, nc, p.nw, wbuf, wbuf,
                          wbuf, mo, to, gbuf, phases)
        for i in range(nc):
            dU += part[i]
