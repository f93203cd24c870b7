"""Direct-loop cpu conv kernels for depthwise and grouped layers (any geometry).

With few input channels per group (``C / groups`` of 1 for depthwise) a GEMM has nothing to
multiply; each output plane is instead a sum of ``Cg * R * S`` shifted, scaled input rows.
The row loops use flat unsigned indices (no negative-index checks), so they vectorise, and
need no workspace: they are also the fallback when not even one row of an im2col chunk fits
the bound. For stride 1, zero-padded copies of one plane per thread (when they fit the bound)
turn each kernel tap into a single flat loop over the plane.

Parallel over output planes (forward), input planes (input gradient: each thread scatters
only into the ``(n, c)`` plane it owns, so there are no atomics) and filters (weight gradient,
reduced over the batch in a fixed order with float64 accumulators; at stride 1 the
products of a few images are first summed per position in the data's dtype).
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np
from numba import njit, prange

from .cpu_conv import _im2col_rows_flat, _merge_row, _split_row, valid_range
from .cpu_workspace import (BLAS_SERIAL_MACS, direct_plane_bytes, group_gemms, host_avx512,
                            workspace_bound)


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


@njit(cache=True, inline="always")
def _wgrad_task(task, Cg, Kg):
    """Filter ``k``, its channel ``cl`` within the group and the input channel ``c`` of a
    weight-gradient task (one per filter and channel of its group)."""
    k = task // Cg
    cl = task - k * Cg
    return k, cl, (k // Kg) * Cg + cl


@njit(cache=True)
def _add_rows(tap, part, row, p_lo, p_hi, q_lo, q_hi):
    """``tap[q] += part[p * row + q]`` for rows ``p_lo <= p < p_hi`` in order and columns
    ``q_lo <= q < q_hi``: one batch's per-position sums of a tap into its float64 lanes."""
    lanes = tap[q_lo:q_hi]
    for p in range(p_lo, p_hi):
        # slices indexed by the bare loop variable: the loop vectorises
        a = part[p * row + q_lo:p * row + q_hi]
        for q in range(q_hi - q_lo):
            lanes[q] += a[q]


@njit(cache=True)
def _tap_sums(gw_kc, lanes):
    """``gw_kc[r, s]``: the sum, in order, of tap ``(r, s)``'s float64 lanes."""
    R, S = gw_kc.shape
    for r in range(R):
        for s in range(S):
            gw_kc[r, s] = lanes[r * S + s].sum()


@njit(cache=True)
def _products(a, d, v, first):
    """``a = d * v`` (``first``) or ``a += d * v``, elementwise over equal-length slices."""
    if first:
        for e in range(a.shape[0]):
            a[e] = d[e] * v[e]
    else:
        for e in range(a.shape[0]):
            a[e] += d[e] * v[e]


@njit(cache=True)
def _products8(a, dyf, db, ds, xf, xb, xs):
    """``a[e] = sum_{i < 8} dyf[db + i*ds + e] * xf[xb + i*xs + e]``, added in image order:
    eight images' :func:`_products` in one pass (the same expression, so the same bits), one
    store of ``a`` instead of eight loads and stores. Measured in ``_weight_grad_s1_flat``
    against the pass per image (float32, 15 alternating rounds, medians, 2 threads / 1):
    depthwise 3x3 8 x 144 x 28 x 28 0.94 -> 0.79 / 1.40 -> 1.14 ms; 5x5 8 x 240 x 14 x 14 1.79
    -> 0.97 / 2.23 -> 1.23; 7x7 8 x 96 x 28 x 28 3.11 -> 2.43 / 4.77 -> 3.65."""
    d, x = np.uint64(db), np.uint64(xb)
    ds, xs = np.uint64(ds), np.uint64(xs)
    d2, x2 = d + ds + ds, x + xs + xs
    d4, x4 = d2 + ds + ds, x2 + xs + xs
    d6, x6 = d4 + ds + ds, x4 + xs + xs
    for e in range(np.uint64(a.shape[0])):
        t = dyf[d + e] * xf[x + e] + dyf[d + ds + e] * xf[x + xs + e]
        t = t + dyf[d2 + e] * xf[x2 + e]
        t = t + dyf[d2 + ds + e] * xf[x2 + xs + e]
        t = t + dyf[d4 + e] * xf[x4 + e]
        t = t + dyf[d4 + ds + e] * xf[x4 + xs + e]
        t = t + dyf[d6 + e] * xf[x6 + e]
        a[e] = t + dyf[d6 + ds + e] * xf[x6 + xs + e]


@njit(parallel=True, cache=True)
def _weight_grad(x, grad_output, gw, sh, sw, pt, pl, dh, dw):
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    xf, dyf = x.reshape(x.size), grad_output.reshape(grad_output.size)
    usw = np.uint64(sw)
    for task in prange(K * Cg):
        k, cl, c = _wgrad_task(task, Cg, Kg)
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


# ---------------------------------------------------------------------------------------------
# Stride 1: zero-padded copies of one plane give every kernel tap the same flat offset, so
# each tap is one long loop over the whole plane (the output keeps the padded row stride;
# its extra columns are never copied out). Same summation order as the row loops above.
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _pad_plane(src, s0, H, W, dst, Hd, Wd, top, left, stride):
    """``dst[hh * stride + j] = src[s0 + (hh - top) * W + (j - left)]`` for ``j < Wd``
    inside ``H x W`` (``stride``: ``Wd``, or wider for planes side by side); the rest of
    ``dst`` is left as it is: zero, as the callers allocate it, since every plane of a call
    writes the same region (zeroing each plane again cost as much as copying it)."""
    for hh in range(max(0, top), min(Hd, H + top)):
        j_lo, j_hi = max(0, left), min(Wd, W + left)
        d = np.uint64(hh * stride)
        so = np.uint64(s0 + (hh - top) * W - left)
        for j in range(np.uint64(j_lo), np.uint64(j_hi)):
            dst[d + j] = src[so + j]


@njit(cache=True, inline="always")
def _window3x3(wk, rotated):
    """The nine taps of one 3x3 filter plane in row-major order (rotated by 180 degrees for
    the input gradient), as scalars the pass below keeps in registers."""
    if rotated:
        return (wk[2, 2], wk[2, 1], wk[2, 0], wk[1, 2], wk[1, 1], wk[1, 0],
                wk[0, 2], wk[0, 1], wk[0, 0])
    return (wk[0, 0], wk[0, 1], wk[0, 2], wk[1, 0], wk[1, 1], wk[1, 2],
            wk[2, 0], wk[2, 1], wk[2, 2])


@njit(cache=True, inline="always")
def _offsets3x3(row, col):
    """Flat offsets of a 3x3 window's columns 1, 2 and rows 1, 2. Unsigned: they keep the index
    arithmetic integer (Numba turns int64 op uint64 into float64) and free of negative-index
    checks, so the tap loops vectorise."""
    c1 = np.uint64(col)
    r1 = np.uint64(row)
    return c1, c1 + c1, r1, r1 + r1


@njit(cache=True, inline="always")
def _window_at(src, f, c1, c2, r1, r2):
    """The nine elements of the 3x3 window at flat ``f``, row-major."""
    f1 = f + r1
    f2 = f + r2
    return (src[f], src[f + c1], src[f + c2], src[f1], src[f1 + c1], src[f1 + c2],
            src[f2], src[f2 + c1], src[f2 + c2])


@njit(cache=True, inline="always")
def _sum9(a, t, v):
    """``a + t[0]*v[0] + ... + t[8]*v[8]``, added left to right (the order of nine one-tap
    passes, so every kernel that uses it gives the same bits)."""
    return ((((((((a + t[0] * v[0]) + t[1] * v[1]) + t[2] * v[2]) + t[3] * v[3])
                + t[4] * v[4]) + t[5] * v[5]) + t[6] * v[6]) + t[7] * v[7]) + t[8] * v[8]


@njit(cache=True)
def _taps3x3(acc, src, L, row, col, t):
    """``acc[f] += sum_{r,s} t[3r+s] * src[f + r*row + s*col]`` for ``f < L``: all nine taps
    of a 3x3 filter in one pass (one load and store of ``acc`` instead of nine), summed in
    the same order (r, then s) as the one-tap-per-pass loop, so the bits are the same."""
    c1, c2, r1, r2 = _offsets3x3(row, col)
    for f in range(np.uint64(L)):
        acc[f] = _sum9(acc[f], t, _window_at(src, f, c1, c2, r1, r2))


@njit(cache=True)
def _taps3x3_pair(acc, acc2, src, L, row, col, t, u):
    """:func:`_taps3x3` for two filters over the same plane, ``t`` into ``acc`` and ``u`` into
    ``acc2``: each ``src`` element is loaded once for both (the pass was bound by its loads),
    each sum in the same order as alone, so the bits are the same."""
    c1, c2, r1, r2 = _offsets3x3(row, col)
    for f in range(np.uint64(L)):
        v = _window_at(src, f, c1, c2, r1, r2)
        acc[f] = _sum9(acc[f], t, v)
        acc2[f] = _sum9(acc2[f], u, v)


# Taps per pass of the generic (not 3x3) tap loop: one load and store of the accumulator
# per run instead of per tap. A 5- or 7-wide kernel row is one run (measured against runs of
# at most four, float32, 2 threads, alternating: 8 x 240 x 14 x 14 depthwise 5x5 forward
# 0.49-0.58 -> 0.46-0.52 ms, 8 x 64 x 28 x 28 5x5 in 16 groups 0.85-0.93 -> 0.70-0.82 ms;
# against one pass per tap 1.33-1.40 ms there); other widths run in pieces of four.
TAP_RUN = 4
ROW_RUNS = (5, 7)


@njit(cache=True, inline="always")
def _tap(wk, r, s, rotated):
    """Tap ``(r, s)`` of a filter plane, rotated by 180 degrees for the input gradient."""
    R, S = wk.shape
    return wk[R - 1 - r, S - 1 - s] if rotated else wk[r, s]


@njit(cache=True)
def _tap_run(acc, src, L, off, step, t0, t1, t2, t3, t4, t5, t6, n):
    """``acc[f] += t0*src[off + f] + t1*src[off + step + f] + ...`` for ``f < L``: the first
    ``n`` (1 to 5, or 7) taps of a run along a kernel row in one pass, added left to right (the
    order and bits of one pass per tap)."""
    o0 = np.uint64(off)
    o1 = o0 + np.uint64(step)
    o2 = o1 + np.uint64(step)
    o3 = o2 + np.uint64(step)
    if n == 7:
        o4 = o3 + np.uint64(step)
        o5 = o4 + np.uint64(step)
        o6 = o5 + np.uint64(step)
        for f in range(np.uint64(L)):
            acc[f] = ((((((acc[f] + t0 * src[o0 + f]) + t1 * src[o1 + f]) + t2 * src[o2 + f]
                        ) + t3 * src[o3 + f]) + t4 * src[o4 + f]) + t5 * src[o5 + f]
                      ) + t6 * src[o6 + f]
    elif n == 5:
        o4 = o3 + np.uint64(step)
        for f in range(np.uint64(L)):
            acc[f] = ((((acc[f] + t0 * src[o0 + f]) + t1 * src[o1 + f]) + t2 * src[o2 + f]
                       ) + t3 * src[o3 + f]) + t4 * src[o4 + f]
    elif n == 4:
        for f in range(np.uint64(L)):
            acc[f] = (((acc[f] + t0 * src[o0 + f]) + t1 * src[o1 + f]) + t2 * src[o2 + f]
                      ) + t3 * src[o3 + f]
    elif n == 3:
        for f in range(np.uint64(L)):
            acc[f] = ((acc[f] + t0 * src[o0 + f]) + t1 * src[o1 + f]) + t2 * src[o2 + f]
    elif n == 2:
        for f in range(np.uint64(L)):
            acc[f] = (acc[f] + t0 * src[o0 + f]) + t1 * src[o1 + f]
    else:
        for f in range(np.uint64(L)):
            acc[f] = acc[f] + t0 * src[o0 + f]


# ``rotated`` as a NumPy bool, not a literal: Numba would compile _add_taps once per literal
# value (see cpu_winograd.I0).
UPRIGHT, ROTATED = np.bool_(False), np.bool_(True)


@njit(cache=True)
def _add_taps(acc, src, L, row, dh, dw, wk, rotated):
    """``acc[f] += sum_{r,s} wk[r, s] * src[f + r*dh*row + s*dw]`` for ``f < L``, taps in
    row-major order (``wk`` rotated by 180 degrees for the input gradient); 3x3 filters in
    one pass (:func:`_taps3x3`), the same bits as the one-tap-per-pass loop."""
    R, S = wk.shape
    if R == 3 and S == 3:
        _taps3x3(acc, src, L, dh * row, dw, _window3x3(wk, rotated))
        return
    run = S if S == ROW_RUNS[0] or S == ROW_RUNS[1] else TAP_RUN
    for r in range(R):
        for s in range(0, S, run):       # runs of taps along the kernel row
            last = S - 1
            _tap_run(acc, src, L, r * dh * row + s * dw, dw, _tap(wk, r, s, rotated),
                     _tap(wk, r, min(s + 1, last), rotated),
                     _tap(wk, r, min(s + 2, last), rotated),
                     _tap(wk, r, min(s + 3, last), rotated),
                     _tap(wk, r, min(s + 4, last), rotated),
                     _tap(wk, r, min(s + 5, last), rotated),
                     _tap(wk, r, min(s + 6, last), rotated), min(run, S - s))


@njit(cache=True)
def _add_taps_pair(acc, acc2, src, L, row, dh, dw, wk, wk2, rotated):
    """:func:`_add_taps` of two filters over one plane (``wk`` into ``acc``, ``wk2`` into
    ``acc2``), 3x3 filters in one pass for both; the same bits as two calls."""
    R, S = wk.shape
    if R == 3 and S == 3:
        _taps3x3_pair(acc, acc2, src, L, dh * row, dw, _window3x3(wk, rotated),
                      _window3x3(wk2, rotated))
        return
    _add_taps(acc, src, L, row, dh, dw, wk, rotated)
    _add_taps(acc2, src, L, row, dh, dw, wk2, rotated)


@njit(cache=True)
def _row_taps(acc, nk, src, L, off, col, t):
    """``acc[j, f] += t[3j]*src[off + f] + t[3j+1]*src[off + col + f] + t[3j+2]*src[off +
    2 col + f]`` for ``j < nk`` (3 or 4) and ``f < L``: one kernel row of ``nk`` filters, each
    window value loaded once for all of them, added left to right."""
    o0 = np.uint64(off)
    o1 = o0 + np.uint64(col)
    o2 = o1 + np.uint64(col)
    a0, a1, a2 = acc[0], acc[1], acc[2]
    if nk == 4:
        a3 = acc[3]
        for f in range(np.uint64(L)):
            v0, v1, v2 = src[o0 + f], src[o1 + f], src[o2 + f]
            a0[f] = ((a0[f] + t[0] * v0) + t[1] * v1) + t[2] * v2
            a1[f] = ((a1[f] + t[3] * v0) + t[4] * v1) + t[5] * v2
            a2[f] = ((a2[f] + t[6] * v0) + t[7] * v1) + t[8] * v2
            a3[f] = ((a3[f] + t[9] * v0) + t[10] * v1) + t[11] * v2
    else:
        for f in range(np.uint64(L)):
            v0, v1, v2 = src[o0 + f], src[o1 + f], src[o2 + f]
            a0[f] = ((a0[f] + t[0] * v0) + t[1] * v1) + t[2] * v2
            a1[f] = ((a1[f] + t[3] * v0) + t[4] * v1) + t[5] * v2
            a2[f] = ((a2[f] + t[6] * v0) + t[7] * v1) + t[8] * v2


@njit(cache=True, inline="always")
def _filter_of(weight, k, cl, j, along_k):
    """Output ``j`` of a group: filter ``k + j`` at channel ``cl`` (forward), or filter ``k``
    at channel ``cl + j`` (input gradient)."""
    return weight[k + j, cl] if along_k else weight[k, cl + j]


@njit(cache=True)
def _add_taps_group(acc, nk, src, L, row, dh, dw, weight, k, cl, along_k, rotated, per_pass):
    """``acc[j] +=`` the taps of output ``j < nk`` (:func:`_filter_of`) over the plane ``src``,
    ``per_pass`` outputs a pass (see ``OUTPUTS_PER_PASS``); the same bits for any grouping."""
    R, S = weight.shape[2], weight.shape[3]
    if per_pass == 4 and nk >= 3 and R == 3 and S == 3:
        f0 = _filter_of(weight, k, cl, 0, along_k)
        f1 = _filter_of(weight, k, cl, 1, along_k)
        f2 = _filter_of(weight, k, cl, 2, along_k)
        f3 = _filter_of(weight, k, cl, min(3, nk - 1), along_k)
        for r in range(3):
            t = (_tap(f0, r, 0, rotated), _tap(f0, r, 1, rotated), _tap(f0, r, 2, rotated),
                 _tap(f1, r, 0, rotated), _tap(f1, r, 1, rotated), _tap(f1, r, 2, rotated),
                 _tap(f2, r, 0, rotated), _tap(f2, r, 1, rotated), _tap(f2, r, 2, rotated),
                 _tap(f3, r, 0, rotated), _tap(f3, r, 1, rotated), _tap(f3, r, 2, rotated))
            _row_taps(acc, nk, src, L, r * dh * row, dw, t)
    elif per_pass == 2 and nk == 2:
        _add_taps_pair(acc[0], acc[1], src, L, row, dh, dw,
                       _filter_of(weight, k, cl, 0, along_k),
                       _filter_of(weight, k, cl, 1, along_k), rotated)
    else:
        for j in range(nk):
            _add_taps(acc[j], src, L, row, dh, dw, _filter_of(weight, k, cl, j, along_k),
                      rotated)


@njit(cache=True)
def _copy_rows(acc, row, out):
    """``out[p, q] = acc[p * row + q]``: a plane computed with a padded row stride."""
    for p in range(out.shape[0]):
        dst, src = out[p], acc[p * row:p * row + out.shape[1]]
        for q in range(out.shape[1]):
            dst[q] = src[q]


@njit(cache=True, inline="always")
def _pad_images(sf, n0, cnt, I, i, Hs, Ws, dst, Hp, Wp, Wall, top, left):
    """Input plane ``i`` of images ``n0 .. n0 + cnt`` zero-padded side by side in ``dst``,
    image ``m`` in columns ``m*Wp .. (m+1)*Wp`` of rows ``Wall`` long."""
    for m in range(cnt):
        _pad_plane(sf, ((n0 + m) * I + i) * Hs * Ws, Hs, Ws, dst[m * Wp:], Hp, Wp, top, left,
                   Wall)


@njit(parallel=True, cache=True)
def _direct_s1(src, weight, bias, out, top, left, dh, dw, per_task, threads, per_pass,
               rotated, images):
    """``out[n, o] = bias[o] + sum_i taps(o, i) * src[n, i]`` over each group's input planes
    ``i`` (zero-padded by ``top``, ``left``), as a stride-1 correlation: the forward (``src`` =
    x, ``out`` = y, ``rotated`` False: output ``o`` is filter ``k``, input ``i`` channel
    ``c``) or the input gradient (``src`` = grad_output, ``out`` = gx, ``rotated`` True: the
    roles swap and the kernel turns by 180 degrees; ``bias`` zeros).

    Tasks of ``per_task`` outputs of one group and one image: the group's input planes are
    zero-padded once per task and shared by its outputs (with one output per task, only one
    padded plane is held at a time), ``per_pass`` outputs a pass over a plane (1, 2 or 4:
    see ``OUTPUTS_PER_PASS``). Each of ``threads`` workers takes a contiguous run of tasks
    with its own buffers (allocated, and their padding zeroed, once per call); a task
    computes the same bits whichever worker runs it.

    ``images`` images side by side (the callers' :func:`_side_by_side` asks for more than one
    only with one output a task): a task's planes hold the same input plane of ``images``
    consecutive images in one row of ``images * Wp`` columns, so that every pass runs that
    many times longer (small planes spent as much time entering passes as in them). An
    output still reads only its own image's padded window (its columns end inside its image's
    ``Wp``); the columns in between, and the images a short last block leaves out, feed only
    discarded outputs. The same bits for any ``images``."""
    N, I, Hs, Ws = src.shape
    O, Ho, Wo = out.shape[1], out.shape[2], out.shape[3]
    K, Cg, R, S = weight.shape
    G = (O if rotated else I) // Cg         # C // Cg: C is out's channels for the gradient
    ins, outs = I // G, O // G
    Hp, Wp = Ho + (R - 1) * dh, Wo + (S - 1) * dw
    Wall = images * Wp
    L = Ho * Wall
    plane = Hp * Wall
    nob = (outs + per_task - 1) // per_task
    sf = src.reshape(src.size)
    ntask = (N + images - 1) // images * G * nob
    nw = max(1, min(threads, ntask))
    for wk in prange(nw):
        # the tail is read only into the discarded columns: zero keeps it finite
        sp = np.zeros((ins if per_task > 1 else 1) * plane + (S - 1) * dw, dtype=src.dtype)
        acc = np.empty((min(per_task, per_pass), L), dtype=out.dtype)
        for task in range(wk * ntask // nw, (wk + 1) * ntask // nw):
            n0 = task // (G * nob) * images
            cnt = min(images, N - n0)
            g = (task // nob) % G
            o0 = g * outs + (task % nob) * per_task
            o1 = min(o0 + per_task, (g + 1) * outs)
            i0 = g * ins
            shared = o1 - o0 > 1
            if shared:
                for il in range(ins):
                    _pad_images(sf, n0, cnt, I, i0 + il, Hs, Ws,
                                sp[il * plane:(il + 1) * plane], Hp, Wp, Wall, top, left)
            for o in range(o0, o1, acc.shape[0]):
                no = min(acc.shape[0], o1 - o)
                for j in range(no):
                    acc[j, :] = bias[o + j]
                for il in range(ins):
                    if shared:
                        plane_i = sp[il * plane:]
                    else:
                        _pad_images(sf, n0, cnt, I, i0 + il, Hs, Ws, sp, Hp, Wp, Wall, top,
                                    left)
                        plane_i = sp
                    # forward: filters o.. at channel il; input gradient: filter i0 + il at
                    # the group's channels o - g*Cg..
                    k, cl = (i0 + il, o - g * Cg) if rotated else (o, il)
                    _add_taps_group(acc, no, plane_i, L, Wall, dh, dw, weight, k, cl,
                                    not rotated, rotated, per_pass)
                for j in range(no):
                    for m in range(cnt):
                        _copy_rows(acc[j, m * Wp:], Wall, out[n0 + m, o + j])


# Depthwise 3x3, stride 1, "same" width (one column of padding each side): the plane is
# copied whole into a buffer with zero rows above and below but no padding columns, so the
# nine-tap pass runs over the output plane as it lies in ``y`` (no copy out of a padded row
# stride). Its first and last columns read a neighbouring row's end where the padding
# column would be; they are computed again with zeros there, the same expression (so every
# output has the bits of the padded-plane kernels). Measured against the padded-plane
# kernels, forward and input gradient (dw3x3_28: 8 x 144 x 28 x 28, float32, back to back,
# one process, session 20): 1 thread forward 1.06-1.29 -> 0.62-0.68 ms, input gradient
# 1.11-1.32 -> 0.65-0.76; 2 threads 0.52-0.64 -> 0.31-0.35 and 0.54-0.64 -> 0.31-0.33. The
# edge columns cost 0.12 ms of 0.46 (1 thread); gathering them into rows for one vectorised
# loop measured no faster.
@njit(cache=True, inline="always")
def _edge_window(v, at_left, at_right, zero):
    """The window ``v`` (:func:`_window_at`) of an output in the first (``at_left``) or last
    (``at_right``) column of a plane: the taps outside the row read zero."""
    return ((zero if at_left else v[0]), v[1], (zero if at_right else v[2]),
            (zero if at_left else v[3]), v[4], (zero if at_right else v[5]),
            (zero if at_left else v[6]), v[7], (zero if at_right else v[8]))


@njit(parallel=True, cache=True)
def _depthwise_same3x3(src, weight, bias, dst, top, rotated, threads):
    """``dst[n, c, h, w] = bias[c] + sum_{r,s} t[r,s] src[n, c, h - top + r, w - 1 + s]`` (zero
    outside ``src``; ``t`` = ``weight[c, 0]``, rotated by 180 degrees for the input gradient)
    for ``src (N, C, Hs, Ws)`` and ``dst (N, C, Hd, Ws)``; each of ``threads`` workers takes a
    contiguous run of planes with its own buffer. Taps and bias summed as by
    :func:`_taps3x3`, so the bits are those of the padded-plane kernels."""
    N, C, Hs, Ws = src.shape
    Hd = dst.shape[2]
    L = Hd * Ws
    sf = src.reshape(src.size)
    df = dst.reshape(dst.size)
    zero = src.dtype.type(0)
    ntask = N * C
    nw = max(1, min(threads, ntask))
    c1, c2, r1, r2 = _offsets3x3(Ws, 1)
    h_lo, h_hi = max(0, -top), min(Hs, Hd + 2 - top)     # the source rows the buffer holds
    o = np.uint64(1 + (h_lo + top) * Ws)
    for wk in prange(nw):
        # one element, then Hd + 2 rows of Ws (rows top .. top + Hs - 1 hold the plane), then
        # one: the flat window of output f starts at f, its rows Ws apart
        b = np.zeros((Hd + 2) * Ws + 2, dtype=src.dtype)
        for task in range(wk * ntask // nw, (wk + 1) * ntask // nw):
            c = task % C
            s1 = np.uint64(task) * np.uint64(Hs * Ws) + np.uint64(h_lo * Ws)
            for e in range(np.uint64((h_hi - h_lo) * Ws)):
                b[o + e] = sf[s1 + e]
            t = _window3x3(weight[c, 0], rotated)
            a = bias[c]
            out = df[np.uint64(task) * np.uint64(L):]
            for f in range(np.uint64(L)):
                out[f] = _sum9(a, t, _window_at(b, f, c1, c2, r1, r2))
            for p in range(Hd):
                f = np.uint64(p * Ws)
                v = _window_at(b, f, c1, c2, r1, r2)
                out[f] = _sum9(a, t, _edge_window(v, True, Ws == 1, zero))
                f = np.uint64(p * Ws + Ws - 1)
                v = _window_at(b, f, c1, c2, r1, r2)
                out[f] = _sum9(a, t, _edge_window(v, Ws == 1, True, zero))


def _same3x3(geom) -> bool:
    """Whether :func:`_depthwise_same3x3` applies: depthwise (one channel and one filter a
    group), 3x3, stride 1, undilated, one padding column each side."""
    return (geom.groups == geom.C == geom.K and (geom.R, geom.S) == (3, 3)
            and geom.stride == (1, 1) and geom.dilation == (1, 1)
            and geom.padding[2] == 1 and geom.Q == geom.W)


@njit(cache=True)
def _phase_planes(xf, x0, H, W, ph, PS, Hh, Wh, pt, pl):
    """``ph[(2a + b)*PS + u*Wh + v] = xpad[2u + a, 2v + b]`` for the plane of ``xf`` at
    ``x0``, zero-padded by ``pt`` rows and ``pl`` columns; positions in the padding are not
    written (zero, as the callers allocate ``ph``; every plane of a call has the same).
    Columns ``2v - pl`` (phase b = 0) and ``2v + 1 - pl`` (b = 1) are split as pairs of
    neighbours through registers (``cpu_conv._split_row``); at most one column at each end of
    a row has no partner."""
    lo0, hi0 = max(0, (pl + 1) // 2), min(Wh, (W + pl + 1) // 2)
    lo1, hi1 = max(0, pl // 2), min(Wh, (W + pl) // 2)
    lo, hi = max(lo0, lo1), max(max(lo0, lo1), min(hi0, hi1))
    for a in range(2):
        for u in range(Hh):
            h = 2 * u + a - pt
            if h < 0 or h >= H:
                continue
            d0 = (a * 2) * PS + u * Wh
            d1 = d0 + PS
            src = x0 + h * W - pl
            if lo1 < lo and lo1 < hi1:
                ph[d1 + lo1] = xf[src + 2 * lo1 + 1]
            _split_row(xf, src + 2 * lo, ph, d0 + lo, d1 + lo, hi - lo)
            if hi <= hi0 - 1 and hi0 - 1 >= lo0 and hi1 < hi0:
                ph[d0 + hi0 - 1] = xf[src + 2 * (hi0 - 1)]


# ``_phase_taps``' direction as NumPy bools (one compilation; see UPRIGHT).
GATHER, SCATTER = np.bool_(False), np.bool_(True)


@njit(cache=True)
def _phase_taps(wk, out, src, PS, Wh, L, scatter):
    """The stride-2 taps of one filter plane ``wk (R, S)`` over phase planes ``PS`` apart
    (row stride ``Wh``), tap ``(r, s)`` at phase ``(r % 2, s % 2)``, offset
    ``(r // 2, s // 2)``, in the order (r, then s): the forward gathers
    ``out[f] += w * src[o + f]``, the input gradient scatters ``out[o + f] += w * src[f]``,
    ``f < L``."""
    R, S = wk.shape
    for r in range(R):
        for s in range(S):
            wv = wk[r, s]
            o = ((r % 2) * 2 + s % 2) * PS + (r // 2) * Wh + s // 2
            if scatter:
                dst = out[o:o + L]
                for f in range(L):
                    dst[f] += wv * src[f]
            else:
                tap = src[o:o + L]
                for f in range(L):
                    out[f] += wv * tap[f]


@njit(cache=True)
def _phase_taps3x3(t, out, src, PS, Wh, L):
    """:func:`_phase_taps` (gather) of a 3x3 filter's taps ``t`` (row-major) in one pass:
    the nine reads at their phases' offsets, summed in the same order (so the same bits),
    one load and store of ``out`` instead of nine. Measured against one pass per tap
    (``_forward_s2``, float32, 2 threads, 20 alternating rounds, min / median ms): 8 x 96 x
    56 x 56 depthwise 0.88 / 0.95 -> 0.74 / 0.86; 8 x 64 x 28 x 28 in 8 groups 1.17 / 1.54 ->
    1.01 / 1.27."""
    ps, wh, one = np.uint64(PS), np.uint64(Wh), np.uint64(1)
    for f in range(np.uint64(L)):
        g = f + wh
        out[f] = _sum9(out[f], t, (src[f], src[f + ps], src[f + one],
                                   src[f + ps + ps], src[f + ps + ps + ps], src[f + ps + ps + one],
                                   src[g], src[g + ps], src[g + one]))


@njit(parallel=True, cache=True)
def _forward_s2(x, weight, bias, y, pt, pl, threads):
    """Stride 2, no dilation: per task (image, filter) the zero-padded input plane of each
    channel is split into its four phases (``ph[2a + b][u, v] = xpad[2u + a, 2v + b]``), so
    that tap ``(r, s)`` reads phase ``(r % 2, s % 2)`` at the stride-1 offset
    ``(r // 2, s // 2)``: one long unit-stride pass per tap, as in :func:`_direct_s1`, where
    the strided kernel made a strided pass per tap and output row. Taps are added in the same
    order as there. Buffers per worker; the planes' padding stays zero (every plane of a call
    writes the same region)."""
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    P, Q = y.shape[2], y.shape[3]
    Kg = K // (C // Cg)
    Hh, Wh = P + (R - 1) // 2, Q + (S - 1) // 2
    PS = Hh * Wh + (S - 1) // 2 + 1     # the flat passes read a little past the last row
    L = P * Wh
    xf = x.reshape(x.size)
    ntask = N * K
    nw = max(1, min(threads, ntask))
    for wk in prange(nw):
        ph = np.zeros(4 * PS, dtype=x.dtype)
        acc = np.empty(L, dtype=y.dtype)
        for task in range(wk * ntask // nw, (wk + 1) * ntask // nw):
            n = task // K
            k = task - n * K
            c0 = (k // Kg) * Cg
            acc[:] = bias[k]
            for cl in range(Cg):
                _phase_planes(xf, (n * C + c0 + cl) * H * W, H, W, ph, PS, Hh, Wh, pt, pl)
                if R == 3 and S == 3:
                    _phase_taps3x3(_window3x3(weight[k, cl], UPRIGHT), acc, ph, PS, Wh, L)
                else:
                    _phase_taps(weight[k, cl], acc, ph, PS, Wh, L, GATHER)
            _copy_rows(acc, Wh, y[n, k])


@njit(parallel=True, cache=True)
def _input_grad_s2(weight, grad_output, gx, pt, pl, threads):
    """Stride 2, no dilation: per task (image, channel) the padded input gradient is summed
    in its four phase planes (``acc[2a + b][u, v]`` for ``xpad[2u + a, 2v + b]``), tap
    ``(r, s)`` adding ``w[r, s] * dy`` to phase ``(r % 2, s % 2)`` at the stride-1 offset
    ``(r // 2, s // 2)`` in one unit-stride pass over ``dy`` (copied with the planes' row
    stride; its extra columns add exact zeros), then the phases are interleaved into ``gx``.
    Each pixel gets the same terms in the same order as in :func:`_input_grad`."""
    N, C, H, W = gx.shape
    K, Cg, R, S = weight.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    Hh, Wh = P + (R - 1) // 2, Q + (S - 1) // 2
    PS = Hh * Wh + (S - 1) // 2 + 1
    L = P * Wh
    ntask = N * C
    nw = max(1, min(threads, ntask))
    lo0, hi0 = max(0, (pl + 1) // 2), min(Wh, (W + pl + 1) // 2)
    lo1, hi1 = max(0, pl // 2), min(Wh, (W + pl) // 2)
    lo, hi = max(lo0, lo1), max(max(lo0, lo1), min(hi0, hi1))
    gxf = gx.reshape(gx.size)
    for wk in prange(nw):
        acc = np.empty(4 * PS, dtype=gx.dtype)
        dyp = np.zeros(L, dtype=gx.dtype)
        for task in range(wk * ntask // nw, (wk + 1) * ntask // nw):
            n = task // C
            c = task - n * C
            g = c // Cg
            cl = c - g * Cg
            acc[:] = 0
            for kl in range(Kg):
                k = g * Kg + kl
                for p in range(P):
                    row, src = dyp[p * Wh:p * Wh + Q], grad_output[n, k, p]
                    for q in range(Q):
                        row[q] = src[q]
                _phase_taps(weight[k, cl], acc, dyp, PS, Wh, L, SCATTER)
            for h in range(H):
                dst = gx[n, c, h]
                dst[:] = 0
                a, u = (h + pt) % 2, (h + pt) // 2
                if u >= Hh:
                    continue
                # phase b = 0 holds columns 2v - pl, b = 1 columns 2v + 1 - pl: interleaved
                # as pairs (register shuffles); at most one column at each end of a row has
                # no partner
                s0 = a * 2 * PS + u * Wh
                if lo1 < lo and lo1 < hi1:
                    dst[2 * lo1 + 1 - pl] = acc[s0 + PS + lo1]
                _merge_row(acc, s0 + lo, s0 + PS + lo, gxf, ((n * C + c) * H + h) * W
                           + 2 * lo - pl, hi - lo)
                if hi <= hi0 - 1 and hi0 - 1 >= lo0 and hi1 < hi0:
                    dst[2 * (hi0 - 1) - pl] = acc[s0 + hi0 - 1]


@njit(parallel=True, cache=True)
def _weight_grad_s2(x, grad_output, gw, pt, pl):
    """Stride 2, no dilation: :func:`_weight_grad` with each input plane split into its four
    phases (:func:`_phase_planes`) so that every tap reads unit-stride rows. One float64
    accumulator per (tap, q), summed over images and rows in the same order as there (the
    padding adds exact zeros), so the same bits."""
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    Hh, Wh = P + (R - 1) // 2, Q + (S - 1) // 2
    PS = Hh * Wh + (S - 1) // 2 + 1
    xf = x.reshape(x.size)
    for task in prange(K * Cg):
        k, cl, c = _wgrad_task(task, Cg, Kg)
        ph = np.zeros(4 * PS, dtype=x.dtype)
        lanes = np.zeros((R * S, Q))
        for n in range(N):
            _phase_planes(xf, (n * C + c) * H * W, H, W, ph, PS, Hh, Wh, pt, pl)
            dy = grad_output[n, k]
            for r in range(R):
                for s in range(S):
                    # lane q - q_lo takes column q, as in _weight_grad (the same lane sums)
                    q_lo = valid_range(Q, W, 2, s - pl)[0]
                    acc = lanes[r * S + s]
                    o = ((r % 2) * 2 + s % 2) * PS + (r // 2) * Wh + s // 2 + q_lo
                    for p in range(P):
                        d, t = dy[p, q_lo:], ph[o + p * Wh:o + p * Wh + Q - q_lo]
                        for q in range(Q - q_lo):
                            acc[q] += d[q] * t[q]
        _tap_sums(gw[k, cl], lanes)


# Images whose products the stride-1 direct weight gradient sums per position in the data's
# dtype before adding them into its float64 lanes. Converting every product to float64 cost
# about a fifth of the kernel (float32, 2 threads, alternating with the old kernel: depthwise
# 3x3, 8 x 144 x 28 x 28: 0.77-1.32 -> 0.65-0.89 ms; 7x7, 96 x 28 x 28: 2.6-2.9 -> 2.2-2.3);
# a float32 sum of 8 products loses little. Four images a pass (one load and store of the
# sums per four products) measured no faster; nor did the stride-2 kernel with sums per
# position (its rows are short: 0.73-1.01 -> 0.86-1.25 ms on 8 x 96 x 56 x 56, 3x3), which
# keeps one float64 lane per output column.
WGRAD_IMAGES = 8


@njit(parallel=True, cache=True)
def _weight_grad_s1(x, grad_output, gw, pt, pl, dh, dw, nb):
    """Per (filter, channel) task: ``part[tap, f]`` sums ``dy[f] * xpad[f + offset of tap]``
    (padded row stride, the data's dtype) over a batch of ``nb`` images in image order; each
    batch's sums of output column ``q`` then go into the tap's float64 lane ``q``, rows in
    order, and the lanes are summed in order at the end. A fixed order: the same bits for any
    thread count. The padded row's extra columns are computed but never summed: there ``dy``
    is zero and ``xpad`` the next row's pixels, and a zero times an infinite pixel would make
    the sum NaN."""
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    Hp, Wp = P + (R - 1) * dh, Q + (S - 1) * dw
    L = P * Wp
    xf, dyf = x.reshape(x.size), grad_output.reshape(grad_output.size)
    for task in prange(K * Cg):
        k, cl, c = _wgrad_task(task, Cg, Kg)
        xp = np.zeros(Hp * Wp + (S - 1) * dw, dtype=x.dtype)
        dyp = np.zeros(L, dtype=x.dtype)         # grad_output with x's padded row stride
        part = np.empty((R * S, L), dtype=x.dtype)
        lanes = np.zeros((R * S, Q))             # float64, fixed order: reproducible
        for n0 in range(0, N, nb):
            for n in range(n0, min(N, n0 + nb)):
                _pad_plane(xf, (n * C + c) * H * W, H, W, xp, Hp, Wp, pt, pl, Wp)
                _pad_plane(dyf, (n * K + k) * P * Q, P, Q, dyp, P, Wp, 0, 0, Wp)
                for r in range(R):
                    for s in range(S):
                        off = r * dh * Wp + s * dw
                        _products(part[r * S + s], dyp, xp[off:off + L], n == n0)
            for t in range(R * S):
                _add_rows(lanes[t], part[t], Wp, 0, P, 0, Q)
        _tap_sums(gw[k, cl], lanes)


@njit(parallel=True, cache=True)
def _weight_grad_s1_flat(x, grad_output, gw, pt, pl, dh, dw, nb):
    """:func:`_weight_grad_s1` for outputs as wide as the input (``Q == W``), without padded
    copies: ``dy`` and ``x`` planes share their row stride, so tap ``(r, s)`` is one flat
    product loop over the output rows whose input rows exist, reading ``x`` at a fixed
    offset. The columns whose input pixel lies in the padding (where the flat read wraps
    onto a neighbouring row) are computed but never summed: each tap's float64 lanes take
    only its valid columns. The sums of the padded kernel less its exact zeros: the same
    bits."""
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Kg = K // (C // Cg)
    L = P * Q
    xf, dyf = x.reshape(x.size), grad_output.reshape(grad_output.size)
    for task in prange(K * Cg):
        k, cl, c = _wgrad_task(task, Cg, Kg)
        part = np.empty((R * S, L), dtype=x.dtype)
        lanes = np.zeros((R * S, Q))             # float64, fixed order: reproducible
        for n0 in range(0, N, nb):
            eight = min(N, n0 + nb) - n0 == 8
            for n in range(n0, n0 + 1 if eight else min(N, n0 + nb)):
                x0, d0 = (n * C + c) * H * W, (n * K + k) * L
                for r in range(R):
                    p_lo, p_hi = max(0, pt - r * dh), min(P, H + pt - r * dh)
                    for s in range(S):
                        q_lo, q_hi = valid_range(Q, W, 1, s * dw - pl)
                        if p_lo >= p_hi or q_lo >= q_hi:
                            continue
                        f0, f1 = p_lo * Q + q_lo, (p_hi - 1) * Q + q_hi
                        o = x0 + f0 + (r * dh - pt) * W + s * dw - pl
                        if eight:
                            _products8(part[r * S + s, f0:f1], dyf, d0 + f0, K * L, xf, o,
                                       C * H * W)
                        else:
                            _products(part[r * S + s, f0:f1], dyf[d0 + f0:d0 + f1],
                                      xf[o:o + f1 - f0], n == n0)
            for r in range(R):
                p_lo, p_hi = max(0, pt - r * dh), min(P, H + pt - r * dh)
                for s in range(S):
                    q_lo, q_hi = valid_range(Q, W, 1, s * dw - pl)
                    _add_rows(lanes[r * S + s], part[r * S + s], Q, p_lo, p_hi, q_lo, q_hi)
        _tap_sums(gw[k, cl], lanes)


# ---------------------------------------------------------------------------------------------
# Ungrouped stride-1 weight gradient (the thin 3x3 layers): im2col of a few output rows at a
# time and a small GEMM in BLAS, issued from Numba's worker threads. Called from a worker,
# a GEMM below OpenBLAS's threading threshold runs in that thread alone, so no BLAS thread
# pool wakes up and spins beside Numba's after the call (measured on cifar3x3, 2 threads: a
# BLAS-threaded weight gradient made the next forward and input gradient 1.8x slower).
# ---------------------------------------------------------------------------------------------
# Images per task (fixed, so the sums do not depend on the thread count).
IMAGES_PER_TASK = 4


@njit(cache=True)
def _im2col_rows(x, n, c0, c1, p0, p1, col, R, S, pt, pl, dh, dw, Q):
    """``col[((c - c0)*R + r)*S + s, (p - p0)*Q + q] = x[n, c, p - pt + r*dh, q - pl + s*dw]``
    for channels ``c0 <= c < c1`` and output rows ``p0 <= p < p1`` (stride 1), zero outside
    the image."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    zero = x.dtype.type(0)
    if Q == W:      # as many output as input columns: a run of rows is one flat copy
        xf, cf = x.reshape(x.size), col.reshape(col.size)
        L = (p1 - p0) * Q
        for c in range(c0, c1):
            for r in range(R):
                for s in range(S):
                    q_lo, q_hi = valid_range(Q, W, 1, s * dw - pl)
                    _im2col_rows_flat(xf, cf, (n * C + c) * H * W, H, W,
                                      np.uint64((((c - c0) * R + r) * S + s) * L),
                                      p0 - pt + r * dh, p1 - p0, q_lo, q_hi, s * dw - pl)
        return
    for c in range(c0, c1):
        for r in range(R):
            for s in range(S):
                row = col[((c - c0) * R + r) * S + s]
                q_lo, q_hi = valid_range(Q, W, 1, s * dw - pl)
                for p in range(p0, p1):
                    h = p - pt + r * dh
                    dst = row[(p - p0) * Q:(p - p0 + 1) * Q]
                    if h < 0 or h >= H:
                        dst[:] = zero
                        continue
                    dst[:q_lo] = zero
                    dst[q_hi:] = zero
                    src = x[n, c, h, q_lo - pl + s * dw:q_hi - pl + s * dw]
                    for e in range(q_hi - q_lo):
                        dst[q_lo + e] = src[e]


@njit(parallel=True, cache=True)
def _weight_grad_s1_gemm(x, grad_output, part, R, S, pt, pl, dh, dw, per, rows, trans):
    """``part[t, g] (Kg, Cg*R*S)`` (its transpose with ``trans``): the sum over images
    ``t*per ...`` and their blocks of ``rows`` output rows, in that order, of ``dy_block (Kg,
    rows*Q) @ col_block^T`` per group (the group's channels packed, then its GEMM, group after
    group); with ``trans`` each GEMM is ``col_block @ dy_block^T`` (see ``weight_grad``)."""
    N = x.shape[0]
    G = part.shape[1]
    Kg = grad_output.shape[1] // G
    P, Q = grad_output.shape[2], grad_output.shape[3]
    Cg = x.shape[1] // G
    CgRS = Cg * R * S
    for t in prange(part.shape[0]):
        colf = np.empty(CgRS * rows * Q, dtype=x.dtype)
        dybf = np.empty(Kg * rows * Q, dtype=x.dtype)
        prod = np.empty(part.shape[2:], dtype=x.dtype)
        first = True
        for n in range(t * per, min(N, (t + 1) * per)):
            for p0 in range(0, P, rows):
                p1 = min(P, p0 + rows)
                L = (p1 - p0) * Q
                col = colf[:CgRS * L].reshape(CgRS, L)    # contiguous for BLAS
                dyb = dybf[:Kg * L].reshape(Kg, L)
                for g in range(G):
                    _im2col_rows(x, n, g * Cg, (g + 1) * Cg, p0, p1, col, R, S, pt, pl, dh,
                                 dw, Q)
                    for kl in range(Kg):
                        dyb[kl] = grad_output[n, g * Kg + kl, p0:p1].reshape(L)
                    acc = part[t, g]
                    out = acc if first else prod
                    if trans:
                        np.dot(col, dyb.T, out)
                    else:
                        np.dot(dyb, col.T, out)
                    if not first:
                        acc += prod
                first = False


def _gemm_rows(geom, itemsize: int, algo) -> int:
    """Output rows per GEMM of the stride-1 weight gradient by im2col rows (0: does not apply,
    see ``cpu_workspace.group_gemms``; grouped layers too thin keep the per-tap sums): as many
    as keep each group's GEMM single-threaded in BLAS, with two threads' buffers within the
    workspace bound."""
    if not group_gemms(geom):
        return 0
    Kg, crs = geom.K // geom.groups, (geom.C // geom.groups) * geom.R * geom.S
    rows = min(geom.P, (BLAS_SERIAL_MACS - 1) // (Kg * crs * geom.Q))
    need = 2 * ((crs + Kg) * rows * geom.Q + Kg * crs) * itemsize
    return rows if rows >= 1 and need <= workspace_bound(algo) else 0


def _geometry_args(geom) -> tuple[int, ...]:
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    return sh, sw, geom.padding[0], geom.padding[2], dh, dw


def _stride1(geom, itemsize: int, algo) -> bool:
    """Whether the padded-plane kernels apply: stride 1, and their planes fit the bound."""
    return (geom.stride == (1, 1)
            and direct_plane_bytes(geom, itemsize) <= workspace_bound(algo))


def _stride2(geom, itemsize: int, algo) -> bool:
    """Whether the phase-plane kernels apply: stride 2, no dilation, and two threads' phase
    planes and row buffer fit the bound."""
    if geom.stride != (2, 2) or geom.dilation != (1, 1):
        return False
    Hh, Wh = geom.P + (geom.R - 1) // 2, geom.Q + (geom.S - 1) // 2
    need = 2 * (4 * (Hh * Wh + geom.S) + geom.P * Wh) * itemsize
    return need <= workspace_bound(algo)


def _wide_registers() -> bool:
    """Whether Numba compiles for a host with AVX-512 (32 vector registers, not 16)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    return host_avx512()


# Outputs (filters; input channels for the input gradient) a pass of the stride-1 kernels
# accumulates over one shared padded plane. 3x3 filters: two outputs pass the nine taps
# together (``_add_taps_pair``): the pair's nine window values, eighteen taps and two sums fit
# AVX-512's 32 vector registers, not AVX2's 16; four (or three) outputs pass one kernel row at
# a time (``_row_taps``): three window values, twelve taps and four sums fit 16 registers, and
# each window load serves four outputs. Same bits either way: every sum keeps its order
# (bias, then channels, each in tap order), and a kernel row's three taps end where the next
# row's begin. Measured, cifar3x3 forward (64 x 3 -> 32, 32x32), float32, alternating:
# AVX-512 (session 10, 1 thread) pairs 1.31-1.41 ms against 1.66-1.99 single; AMD EPYC Zen 3
# AVX2 (session 15) pairs 1.79 against 1.54 single; (session 19) see README.
OUTPUTS_PER_PASS = 2 if _wide_registers() else 4

# Outputs (filters, or input channels for the input gradient) per task of the stride-1
# kernels when a group's padded planes are shared.
OUTPUTS_PER_TASK = 8


def _outputs_per_task(op: str, geom, itemsize: int, algo) -> int:
    """``OUTPUTS_PER_TASK`` when a group has several outputs and two threads' copies of its
    padded input planes (``Cg`` of them; ``Kg`` for the input gradient) fit the workspace
    bound, else 1 (one padded plane at a time). Measured on cifar3x3 (1 thread, serial CPU
    time): padding each plane once per output was a quarter of the forward's time."""
    Kg, Cg = geom.K // geom.groups, geom.C // geom.groups
    outs, ins = (Kg, Cg) if op == "forward" else (Cg, Kg)
    rows = max(geom.P, geom.H) + (geom.R - 1) * geom.dilation[0]
    cols = max(geom.Q, geom.W) + (geom.S - 1) * geom.dilation[1]
    shared = 2 * ins * rows * cols * itemsize + direct_plane_bytes(geom, itemsize)
    if outs <= 1 or shared > workspace_bound(algo):
        return 1
    # Enough tasks for the threads (a small batch); the bits do not depend on it: each output
    # element is summed by one task in the same order whatever the grouping.
    per, want = OUTPUTS_PER_TASK, 4 * numba.get_num_threads()
    while per > 1 and geom.N * geom.groups * -(-outs // per) < want:
        per //= 2
    return per


# Columns from which a pass of the stride-1 kernels no longer gains from more images side by
# side (see :func:`_direct_s1`). Measured, float32, 2 threads, back to back, 15 alternating
# rounds, medians (ms, forward / input gradient): depthwise 5x5 8 x 240 x 14 x 14 (18 padded
# columns) one image a pass 0.537 / 0.543, two 0.451 / 0.455, four 0.418 / 0.410, eight
# 0.412 / 0.405; depthwise 7x7 8 x 96 x 28 x 28 (34 columns) 0.895 / 0.900, two 0.863 /
# 0.859, four 0.858 / 0.854, eight 0.931 / 0.941.
PASS_COLUMNS = 64


def _side_by_side(op: str, geom, per_task: int, itemsize: int, algo) -> int:
    """Images side by side in the passes of :func:`_direct_s1`: enough for a padded row of
    ``PASS_COLUMNS``, with one output a task and while the planes fit the workspace bound."""
    if per_task != 1:
        return 1
    cols = (geom.Q if op == "forward" else geom.W) + (geom.S - 1) * geom.dilation[1]
    images = max(1, min(geom.N, -(-PASS_COLUMNS // cols)))
    while images > 1 and (direct_plane_bytes(geom, itemsize, images=images)
                          > workspace_bound(algo)):
        images -= 1
    return images


def forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
            algo) -> np.ndarray:
    """Direct conv forward: x ``(N, C, H, W)``, weight ``(K, C/G, R, S)``; ``(N, K, P, Q)``."""
    y = np.empty(geom.output_shape, dtype=x.dtype)
    b = bias if bias is not None else np.zeros(geom.K, dtype=x.dtype)
    if _same3x3(geom) and _stride1(geom, x.dtype.itemsize, algo):
        _depthwise_same3x3(x, weight, b, y, geom.padding[0], UPRIGHT, numba.get_num_threads())
    elif _stride1(geom, x.dtype.itemsize, algo):
        pt, pl, (dh, dw) = geom.padding[0], geom.padding[2], geom.dilation
        kb = _outputs_per_task("forward", geom, x.dtype.itemsize, algo)
        _direct_s1(x, weight, b, y, pt, pl, dh, dw, kb, numba.get_num_threads(),
                   OUTPUTS_PER_PASS, UPRIGHT, _side_by_side("forward", geom, kb,
                                                            x.dtype.itemsize, algo))
    elif _stride2(geom, x.dtype.itemsize, algo):
        _forward_s2(x, weight, b, y, geom.padding[0], geom.padding[2], numba.get_num_threads())
    else:
        _forward(x, weight, b, y, *_geometry_args(geom))
    return y


def input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Direct input gradient ``(N, C, H, W)``."""
    gx = np.empty(geom.input_shape, dtype=grad_output.dtype)
    if _same3x3(geom) and _stride1(geom, gx.dtype.itemsize, algo):
        _depthwise_same3x3(grad_output, weight, np.zeros(geom.C, dtype=gx.dtype), gx,
                           2 - geom.padding[0], ROTATED, numba.get_num_threads())
    elif _stride1(geom, gx.dtype.itemsize, algo):
        pt, pl, (dh, dw) = geom.padding[0], geom.padding[2], geom.dilation
        cb = _outputs_per_task("input_grad", geom, gx.dtype.itemsize, algo)
        # gx[h, w] = sum w[R-1-r, S-1-s] * dyp[h + r*dh, w + s*dw], dyp = dy shifted by the
        # dilated kernel extent minus the forward padding (lecture notes 7.5)
        top, left = (geom.R - 1) * dh - pt, (geom.S - 1) * dw - pl
        _direct_s1(grad_output, weight, np.zeros(geom.C, dtype=gx.dtype), gx, top, left, dh,
                   dw, cb, numba.get_num_threads(), OUTPUTS_PER_PASS, ROTATED,
                   _side_by_side("input_grad", geom, cb, gx.dtype.itemsize, algo))
    elif _stride2(geom, gx.dtype.itemsize, algo):
        _input_grad_s2(weight, grad_output, gx, geom.padding[0], geom.padding[2],
                       numba.get_num_threads())
    else:
        _input_grad(weight, grad_output, gx, *_geometry_args(geom))
    return gx


def weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Direct weight gradient ``(K, C/G, R, S)``."""
    rows = _gemm_rows(geom, x.dtype.itemsize, algo)
    if rows:
        pt, pl, (dh, dw) = geom.padding[0], geom.padding[2], geom.dilation
        tasks = -(-geom.N // IMAGES_PER_TASK)
        Kg, crs = geom.K // geom.groups, geom.C // geom.groups * geom.R * geom.S
        # The longer side of each group's small GEMM as its rows: OpenBLAS's serial SGEMM
        # on 8 x 784 @ 784 x 72 ran at 21 GFLOP/s, on 72 x 784 @ 784 x 8 at 50 (16 x 144:
        # 36 against 68; 32 x 27: 40 against 38), one thread, session 19
        trans = crs > Kg
        part = np.empty((tasks, geom.groups) + ((crs, Kg) if trans else (Kg, crs)),
                        dtype=x.dtype)
        _weight_grad_s1_gemm(x, grad_output, part, geom.R, geom.S, pt, pl, dh, dw,
                             IMAGES_PER_TASK, rows, trans)
        total = part[0].copy()
        for t in range(1, tasks):       # tasks in order: the same bits for any thread count
            total += part[t]
        if trans:
            total = np.ascontiguousarray(total.transpose(0, 2, 1))
        return total.reshape(geom.weight_shape)
    gw = np.empty(geom.weight_shape, dtype=x.dtype)
    if _stride1(geom, x.dtype.itemsize, algo):
        pt, pl, (dh, dw) = geom.padding[0], geom.padding[2], geom.dilation
        kernel = _weight_grad_s1_flat if geom.Q == geom.W else _weight_grad_s1
        kernel(x, grad_output, gw, pt, pl, dh, dw, WGRAD_IMAGES)
    elif _stride2(geom, x.dtype.itemsize, algo):
        _weight_grad_s2(x, grad_output, gw, geom.padding[0], geom.padding[2])
    else:
        _weight_grad(x, grad_output, gw, *_geometry_args(geom))
    return gw
