"""GEMM-based cpu conv kernels: 1x1 GEMMs and im2col/col2im with NumPy's BLAS ``matmul``.

Layouts (``G`` groups, ``Kg = K / G``, ``Cg = C / G``, ``CgRS = Cg * R * S``):

* ``col`` is the im2col matrix of one chunk (see ``cpu_workspace``), shape
  ``(G, rows_g, J)`` with ``J = nc * rc * Q`` columns ordered ``(image, output row, q)`` and row
  ``(cl * R + r) * S + s`` of group ``g`` holding ``xpad[n, g*Cg + cl, p*sh + r*dh, q*sw + s*dw]``.
  In the forward pass ``rows_g = CgRS + 1`` when there is a bias: a row of ones that meets the
  bias as an extra weight column, so the GEMM adds the bias for free.
* ``wide`` matrices ``(K, J)`` hold a ``(N, K, P*Q)`` tensor's chunk with the images side by
  side; ``per_image`` GEMMs write straight into the ``(N, K, P, Q)`` result instead.

All Numba kernels run in parallel over independent outputs (rows of ``col``, or ``(n, c)``
planes of the input gradient), so there are no atomics and results do not depend on thread
timing. The weight gradient is summed over chunks in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from .cpu_simd import deinterleave16, interleave16
from .cpu_workspace import (DEFAULT_CHUNK_BYTES, im2col_bytes, kernel_rows_bytes,
                            kernel_rows_runs, plan_chunks, scratch, workspace_bound)

# Partial sums of the bias gradient per filter (a power of two): 2 KiB of float64 per thread.
BIAS_GRAD_LANES = 256


# ---------------------------------------------------------------------------------------------
# Numba kernels
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def valid_range(Q: int, W: int, sw: int, off: int) -> tuple[int, int]:
    """The ``q`` range with ``0 <= q * sw + off < W``, clipped to ``[0, Q)``."""
    q_lo = max(0, -(off // sw))
    q_hi = min(Q, (W - 1 - off) // sw + 1)
    return q_lo, max(q_lo, q_hi)


@njit(cache=True, inline="always")
def _im2col_rows_flat(xf, cf, plane, H, W, dst, h0, pc, q_lo, q_hi, off):
    """``cf[dst + pp*W + q] = xf[plane + (h0 + pp)*W + q + off]`` for ``pp < pc``, ``q < W``,
    zero where the row ``h0 + pp`` or the column ``q + off`` is outside the plane (valid
    columns ``[q_lo, q_hi)``): stride 1 with as many output as input columns, so a run of
    valid rows is one flat copy (source and destination rows have the same stride), and the
    columns that copy wrongly took from the neighbouring row are zeroed after it. ResNet's
    14x14 rows made the row-by-row copies a quarter of the forward (14 elements a loop)."""
    uW = np.uint64(W)
    pp_lo = min(pc, max(0, -h0))
    pp_hi = max(pp_lo, min(pc, H - h0))
    for pp in range(pc):
        if pp < pp_lo or pp >= pp_hi:
            d = dst + np.uint64(pp) * uW
            for q in range(uW):
                cf[d + q] = 0
    if pp_hi == pp_lo:
        return
    if q_hi > q_lo:
        n = (pp_hi - pp_lo - 1) * W + q_hi - q_lo
        d = dst + np.uint64(pp_lo * W + q_lo)
        src = np.uint64(plane + (h0 + pp_lo) * W + q_lo + off)
        for t in range(np.uint64(n)):
            cf[d + t] = xf[src + t]
    for pp in range(pp_lo, pp_hi):
        d = dst + np.uint64(pp) * uW
        for q in range(np.uint64(q_lo)):
            cf[d + q] = 0
        for q in range(np.uint64(max(q_lo, q_hi)), uW):
            cf[d + q] = 0


@njit(cache=True, inline="always")
def _split_row(xf, s0, pf, e0, o0, half):
    """``pf[e0 + v] = xf[s0 + 2v]``, ``pf[o0 + v] = xf[s0 + 2v + 1]`` for ``v < half``: by 16
    elements through registers (the last block overlapping the one before, writing the same
    values again), scalar below 8 pairs."""
    if half < 8:
        for v in range(half):
            pf[e0 + v] = xf[s0 + 2 * v]
            pf[o0 + v] = xf[s0 + 2 * v + 1]
        return
    for b in range((half + 7) // 8):
        v = min(8 * b, half - 8)
        deinterleave16(xf, s0 + 2 * v, pf, e0 + v, pf, o0 + v)


@njit(cache=True, inline="always")
def _merge_row(pf, e0, o0, gf, d0, half):
    """``gf[d0 + 2v] = pf[e0 + v]``, ``gf[d0 + 2v + 1] = pf[o0 + v]`` for ``v < half`` (the
    inverse of :func:`_split_row`)."""
    if half < 8:
        for v in range(half):
            gf[d0 + 2 * v] = pf[e0 + v]
            gf[d0 + 2 * v + 1] = pf[o0 + v]
        return
    for b in range((half + 7) // 8):
        v = min(8 * b, half - 8)
        interleave16(pf, e0 + v, pf, o0 + v, gf, d0 + 2 * v)


@njit(parallel=True, cache=True)
def split_phases(x, xph):
    """``xph[n, c, 2a + b, u, v] = x[n, c, 2u + a, 2v + b]`` (zero past ``x``'s last row or
    column): the four stride-2 phases of each plane, so that a stride-2 layer's im2col
    copies whole rows of one phase (see :func:`im2col`). Both C-contiguous; flat offsets (a
    view per row cost as much as its 16-element shuffles)."""
    N, C, H, W = x.shape
    Hh, Wh = xph.shape[3], xph.shape[4]
    half = W // 2
    xf = x.reshape(x.size)
    pf = xph.reshape(xph.size)
    pp = Hh * Wh
    for task in prange(N * C):
        for a in range(2):
            for u in range(Hh):
                h = 2 * u + a
                e0 = (task * 4 + 2 * a) * pp + u * Wh
                o0 = e0 + pp
                if h >= H:
                    pf[e0:e0 + Wh] = 0
                    pf[o0:o0 + Wh] = 0
                    continue
                s0 = (task * H + h) * W
                _split_row(xf, s0, pf, e0, o0, half)
                if W % 2:
                    pf[e0 + Wh - 1] = xf[s0 + W - 1]
                    pf[o0 + Wh - 1] = 0


@njit(parallel=True, cache=True)
def im2col(x, col, n0, nc, p0, pc, R, S, sh, sw, pt, pl, dh, dw, Cg, rows_g, xph):
    """Fill ``col (G * rows_g, nc * pc * Q)`` from ``x (N, C, H, W)`` for images
    ``n0 .. n0 + nc`` and output rows ``p0 .. p0 + pc``; zero padding reads as 0.

    ``xph``: the stride-2 phase planes of ``x`` (:func:`split_phases`) when
    :func:`phase_planes` allows them, else an empty array. Tap ``(r, s)`` then reads phase
    ``((r - pt) % 2, (s - pl) % 2)`` at a stride-1 offset, a whole run of rows as one flat
    copy; strided gathers of one output row at a time were a third of r3x3s2_28's forward.

    Flat unsigned indices: Numba then skips its negative-index check, which would otherwise
    keep the strided copies from vectorising."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    J = col.shape[1]
    Q = J // (nc * pc)
    RS = R * S
    xf = x.reshape(x.size)
    xphf = xph.reshape(xph.size)
    cf = col.reshape(col.size)
    usw = np.uint64(sw)
    for task in prange(C * RS):
        c = task // RS
        rs = task - c * RS
        r = rs // S
        s = rs - r * S
        g = c // Cg
        row = np.uint64((g * rows_g + (c - g * Cg) * RS + rs) * J)
        # whole runs of rows (one call site: each inlined copy is compiled again)
        flat = True
        if xph.shape[0] > 0:
            sv, Hs, Ws = xphf, xph.shape[3], xph.shape[4]
            ph = ((r - pt) % 2) * 2 + (s - pl) % 2
            base, step = ((n0 * C + c) * 4 + ph) * Hs * Ws, C * 4 * Hs * Ws
            h0, off = p0 + (r - pt) // 2, (s - pl) // 2
        else:
            sv, Hs, Ws = xf, H, W
            base, step = (n0 * C + c) * H * W, C * H * W
            h0, off = p0 - pt + r * dh, s * dw - pl
            flat = sh == 1 and sw == 1 and Q == W
        if flat:
            q_lo, q_hi = valid_range(Q, Ws, 1, off)
            for i in range(nc):
                _im2col_rows_flat(sv, cf, base + i * step, Hs, Ws,
                                  row + np.uint64(i * pc * Q), h0, pc, q_lo, q_hi, off)
            continue
        q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
        w0 = q_lo * sw + s * dw - pl
        for i in range(nc):
            for pp in range(pc):
                dst = row + np.uint64((i * pc + pp) * Q)
                h = (p0 + pp) * sh - pt + r * dh
                if h < 0 or h >= H:
                    for q in range(np.uint64(Q)):
                        cf[dst + q] = 0
                    continue
                src = np.uint64((((n0 + i) * C + c) * H + h) * W + w0)
                for q in range(np.uint64(q_lo)):
                    cf[dst + q] = 0
                for q in range(np.uint64(q_hi - q_lo)):
                    cf[dst + np.uint64(q_lo) + q] = xf[src + q * usw]
                for q in range(np.uint64(q_hi), np.uint64(Q)):
                    cf[dst + q] = 0


@njit(cache=True, inline="always")
def _col2im_rows_flat(df, gf, plane, H, W, src, h0, pc, q_lo, q_hi, off):
    """The adjoint of :func:`_im2col_rows_flat`: ``gf[plane + (h0 + pp)*W + q + off] +=
    df[src + pp*W + q]`` over the valid rows and columns. The entries of ``df`` at invalid
    columns of the valid rows are zeroed first (``df`` is the caller's scratch), so a run of
    valid rows is one flat add in which those entries add an exact zero to the neighbouring
    row's pixel; each pixel still receives the same values in the same order."""
    uW = np.uint64(W)
    pp_lo = min(pc, max(0, -h0))
    pp_hi = max(pp_lo, min(pc, H - h0))
    if pp_hi == pp_lo or q_hi <= q_lo:
        return
    for pp in range(pp_lo, pp_hi):
        d = src + np.uint64(pp) * uW
        for q in range(np.uint64(q_lo)):
            df[d + q] = 0
        for q in range(np.uint64(q_hi), uW):
            df[d + q] = 0
    n = (pp_hi - pp_lo - 1) * W + q_hi - q_lo
    s0 = src + np.uint64(pp_lo * W + q_lo)
    g0 = plane + np.uint64((h0 + pp_lo) * W + q_lo + off)
    for t in range(np.uint64(n)):
        gf[g0 + t] += df[s0 + t]


@njit(parallel=True, cache=True)
def merge_phases(gph, gx):
    """``gx[n, c, 2u + a, 2v + b] = gph[n, c, 2a + b, u, v]``: the stride-2 phase planes put
    back together (the inverse of :func:`split_phases`, for the input gradient)."""
    N, C, H, W = gx.shape
    Hh, Wh = gph.shape[3], gph.shape[4]
    half = W // 2
    pf = gph.reshape(gph.size)
    gf = gx.reshape(gx.size)
    pp = Hh * Wh
    for task in prange(N * C):
        for h in range(H):
            a, u = h % 2, h // 2
            e0 = (task * 4 + 2 * a) * pp + u * Wh
            d0 = (task * H + h) * W
            _merge_row(pf, e0, e0 + pp, gf, d0, half)
            if W % 2:
                gf[d0 + W - 1] = pf[e0 + half]


@njit(parallel=True, cache=True)
def col2im(dcol, gx, n0, nc, p0, pc, R, S, sh, sw, pt, pl, dh, dw, gph):
    """Add ``dcol (C * R * S, nc * pc * Q)`` back onto ``gx (N, C, H, W)``: the adjoint of
    :func:`im2col`. One thread owns each ``(n, c)`` plane, so no two threads add to one pixel.

    ``gph``: with stride 2 where :func:`phase_planes` allows, zeroed phase planes
    ``(N, C, 4, Hh, Wh)`` that take the sums instead of ``gx`` (tap ``(r, s)`` adds to phase
    ``((r - pt) % 2, (s - pl) % 2)`` at a stride-1 offset, a run of rows as one flat add;
    :func:`merge_phases` writes ``gx`` after the last chunk), else an empty array. Each pixel
    gets the same values in the same order either way; the strided adds of one row at a time
    were half of the stem's input gradient."""
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    J = dcol.shape[1]
    Q = J // (nc * pc)
    df = dcol.reshape(dcol.size)
    gf = gx.reshape(gx.size)
    gphf = gph.reshape(gph.size)
    usw = np.uint64(sw)
    for task in prange(nc * C):
        i = task // C
        c = task - i * C
        plane = np.uint64(((n0 + i) * C + c) * H * W)
        for r in range(R):
            for s in range(S):
                row = np.uint64(((c * R + r) * S + s) * J)
                # whole runs of rows (one call site: each inlined copy is compiled again)
                flat = True
                if gph.shape[0] > 0:
                    tgt, Hd, Wd = gphf, gph.shape[3], gph.shape[4]
                    ph = ((r - pt) % 2) * 2 + (s - pl) % 2
                    base = (((n0 + i) * C + c) * 4 + ph) * Hd * Wd
                    h0, off = p0 + (r - pt) // 2, (s - pl) // 2
                else:
                    tgt, Hd, Wd, base = gf, H, W, ((n0 + i) * C + c) * H * W
                    h0, off = p0 - pt + r * dh, s * dw - pl
                    flat = sh == 1 and sw == 1 and Q == W
                if flat:
                    q_lo, q_hi = valid_range(Q, Wd, 1, off)
                    _col2im_rows_flat(df, tgt, np.uint64(base), Hd, Wd,
                                      row + np.uint64(i * pc * Q), h0, pc, q_lo, q_hi, off)
                    continue
                q_lo, q_hi = valid_range(Q, W, sw, s * dw - pl)
                w0 = q_lo * sw + s * dw - pl
                for pp in range(pc):
                    h = (p0 + pp) * sh - pt + r * dh
                    if h < 0 or h >= H:
                        continue
                    src = row + np.uint64((i * pc + pp) * Q + q_lo)
                    dst = plane + np.uint64(h * W + w0)
                    for q in range(np.uint64(q_hi - q_lo)):
                        gf[dst + q * usw] += df[src + q]


# The helpers below index slices with the bare loop variable: computed indices would make
# Numba check each for being negative, and the loops would not vectorise.
@njit(parallel=True, cache=True)
def wide_to_rows(wide, y3, n0, nc, j0, L):
    """``y3[n0 + i, k, j0 : j0 + L] = wide[k, i * L : (i + 1) * L]`` for ``i < nc``."""
    K = wide.shape[0]
    for task in prange(nc * K):
        i = task // K
        k = task - i * K
        dst, src = y3[n0 + i, k, j0:j0 + L], wide[k, i * L:(i + 1) * L]
        for j in range(L):
            dst[j] = src[j]


@njit(parallel=True, cache=True)
def rows_to_wide(y3, wide, n0, nc, j0, L):
    """The inverse of :func:`wide_to_rows`: gather a chunk of ``y3 (N, K, PQ)`` side by side."""
    K = wide.shape[0]
    for task in prange(nc * K):
        i = task // K
        k = task - i * K
        dst, src = wide[k, i * L:(i + 1) * L], y3[n0 + i, k, j0:j0 + L]
        for j in range(L):
            dst[j] = src[j]


@njit(parallel=True, cache=True)
def add_bias(y3, bias):
    """``y3 (N, K, PQ) += bias[k]``."""
    N, K, L = y3.shape
    for task in prange(N * K):
        b = bias[task % K]
        row = y3[task // K, task % K]
        for j in range(L):
            row[j] += b


@njit(parallel=True, cache=True)
def sum_kernel_rows(z, y3, bias, n0, nc, R, step, span):
    """``y3[n0 + i, k, f] = sum_r z[r*K + k, i*span + r*step + f]`` (``r`` in order, then
    ``+ bias[k]`` when ``bias`` is not empty) for ``i < nc``, ``f < P*Q``: the products of
    the ``R`` kernel rows (:func:`forward_kernel_rows`), each shifted down by its row."""
    K, L = y3.shape[1], y3.shape[2]
    for task in prange(nc * K):
        i = task // K
        k = task - i * K
        dst = y3[n0 + i, k]
        src = z[k, i * span:i * span + L]
        for f in range(L):
            dst[f] = src[f]
        for r in range(1, R):
            o = i * span + r * step
            src = z[r * K + k, o:o + L]
            for f in range(L):
                dst[f] += src[f]
        if bias.shape[0]:
            b = bias[k]
            for f in range(L):
                dst[f] += b


@njit(parallel=True, cache=True)
def bias_grad(grad_output, out, lanes):
    """``out[k] = sum_{n, p, q} grad_output[n, k, p, q]`` (float64), one thread per ``k``.

    Fixed order, whatever the thread count: plane element ``j`` of every image goes to
    float64 partial sum ``j % lanes`` (images in order, then ``j`` in order), and the partial
    sums are combined pairwise (sum ``l`` += sum ``l + w``, ``w = lanes/2 .. 1``; ``lanes`` a
    power of two). The loop over a run of ``lanes`` elements is elementwise, so it vectorises
    without reordering a sum; the scratch is ``lanes`` float64 per thread, whatever ``P * Q``."""
    N, K, P, Q = grad_output.shape
    PQ = P * Q
    g3 = grad_output.reshape(N, K, PQ)
    for k in prange(K):
        acc = np.zeros(lanes)
        for n in range(N):
            row = g3[n, k]
            for j0 in range(0, PQ, lanes):
                blk = row[j0:j0 + min(lanes, PQ - j0)]
                for e in range(blk.shape[0]):
                    acc[e] += blk[e]
        w = lanes
        while w > 1:
            w //= 2
            hi = acc[w:w + w]
            for e in range(w):
                acc[e] += hi[e]
        out[k] = acc[0]


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------
def _im2col_args(geom, chunk):
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    pt, pl = geom.padding[0], geom.padding[2]
    return (chunk.n0, chunk.nc, chunk.r0, chunk.rc, geom.R, geom.S, sh, sw, pt, pl, dh, dw)


def _chunks(op: str, geom, algo, layout: str, itemsize: int, extra_fixed: int = 0):
    preferred = int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    fixed, per_row = im2col_bytes(op, geom, layout, itemsize)
    return list(plan_chunks(geom.N, geom.P, (fixed + extra_fixed, per_row),
                            workspace_bound(algo), preferred))


# The input gradient adds into phase planes (and merges them) only when that pays: a 3x3
# kernel on planes whose phase rows are shorter than this runs the short-row merge at 8 GB/s.
# Measured, float32, 2 threads, input gradient, strided adds against phase planes (ms):
# 28x28 x 128 -> 256 (r3x3s2_28) 4.35 / 5.40; 56x56 x 64 -> 128, 3x3, 6.7 / 6.5 (24.8 / 7.7
# in a first run whose strided adds were slowed by something else); 56x56 x 32 -> 64, 5x5,
# 4.6 / 3.5; the stem (224x224 x 3 -> 64, 7x7) 15.8 / 11.0.
PHASE_MERGE_MIN_WIDTH = 16


def phase_planes(geom) -> Optional[tuple[int, int]]:
    """``(Hh, Wh)``, the size of the stride-2 phase planes im2col can copy whole rows from:
    stride (2, 2), no dilation, a kernel at least 2x2 (so that its taps read all four
    phases), and as many output columns as a phase has (``Q == Wh``, as with "same"
    padding); else None."""
    if geom.stride != (2, 2) or geom.dilation != (1, 1) or min(geom.R, geom.S) < 2:
        return None     # a 1-wide kernel reads one or two of the four phases: gather those
    Hh, Wh = -(-geom.H // 2), -(-geom.W // 2)
    return (Hh, Wh) if geom.Q == Wh else None


def _phases_for(op: str, x: Optional[np.ndarray], geom, algo, layout: str,
                dtype=None) -> tuple[np.ndarray, list]:
    """The phase planes (or an empty array) and the im2col chunks planned with them: for the
    forward and weight gradient, ``x`` split into them; for the input gradient (``x`` None),
    zeroed planes that col2im adds into. They hold a copy of the input, so they are used only
    when that copy, the fixed workspace and one output row fit the bound."""
    dtype = np.dtype(x.dtype if x is not None else dtype)
    hw = phase_planes(geom)
    if x is None and hw is not None and hw[1] < PHASE_MERGE_MIN_WIDTH and geom.R * geom.S <= 9:
        hw = None
    bound = workspace_bound(algo)
    fixed, per_row = im2col_bytes(op, geom, layout, dtype.itemsize)
    if hw is not None:
        nbytes = geom.N * geom.C * 4 * hw[0] * hw[1] * dtype.itemsize
        if fixed + nbytes + per_row <= bound:
            planes = scratch((geom.N, geom.C, 4) + hw, dtype, bound)
            if x is None:
                planes[...] = 0
            else:
                split_phases(x, planes)
            return planes, _chunks(op, geom, algo, layout, dtype.itemsize, nbytes)
    return (np.empty((0, 0, 0, 0, 0), dtype=dtype),
            _chunks(op, geom, algo, layout, dtype.itemsize))


def _flat_views(chunks, Q: int, per_col: dict[str, int], dtype, bound: int) -> dict:
    """One flat scratch buffer per name, sized for the largest chunk (``per_col`` elements per
    column of the wide layout); chunks take views of it, so pages are touched once per call."""
    J = max(c.nc * c.rc for c in chunks) * Q
    return {name: scratch((n * J,), dtype, bound) for name, n in per_col.items() if n}


def forward_im2col(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
                   algo) -> np.ndarray:
    """Conv forward by im2col + GEMM. x ``(N, C, H, W)``, weight ``(K, C/G, R, S)``, bias
    ``(K,)`` or None; returns ``(N, K, P, Q)``. ``algo`` param ``layout``: ``"per_image"`` (one
    GEMM per image, written in place), ``"wide"`` (one GEMM per chunk, then scattered) or
    ``"kernel_rows"`` (stride 1, one group: :func:`forward_kernel_rows`)."""
    if algo.get("layout") == "kernel_rows":
        return forward_kernel_rows(x, weight, bias, geom, algo)
    G, K, P, Q = geom.groups, geom.K, geom.P, geom.Q
    Kg, Cg = K // G, geom.C // G
    CgRS = Cg * geom.R * geom.S
    rows_g = CgRS + (bias is not None)
    wmat = weight.reshape(G, Kg, CgRS)
    if bias is not None:
        wmat = np.concatenate([wmat, bias.reshape(G, Kg, 1)], axis=2)
    layout = algo.get("layout", "per_image")
    wide = layout == "wide"
    xph, chunks = _phases_for("forward", x, geom, algo, layout)
    bufs = _flat_views(chunks, Q, {"col": G * rows_g, "out": K if wide else 0}, x.dtype,
                       workspace_bound(algo))
    y = np.empty(geom.output_shape, dtype=x.dtype)
    y3 = y.reshape(geom.N, K, P * Q)
    for ch in chunks:
        L = ch.rc * Q
        J = ch.nc * L
        col = bufs["col"][:G * rows_g * J].reshape(G, rows_g, J)
        im2col(x, col.reshape(G * rows_g, J), *_im2col_args(geom, ch), Cg, rows_g, xph)
        if bias is not None:
            col[:, CgRS, :] = 1
        if wide and ch.nc > 1:
            out = bufs["out"][:K * J].reshape(G, Kg, J)
            np.matmul(wmat, col, out=out)
            wide_to_rows(out.reshape(K, J), y3, ch.n0, ch.nc, ch.r0 * Q, L)
            continue
        for i in range(ch.nc):
            dst = y3[ch.n0 + i, :, ch.r0 * Q:ch.r0 * Q + L].reshape(G, Kg, L)
            np.matmul(wmat, col[:, :, i * L:(i + 1) * L], out=dst)
    return y


def input_grad_col2im(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient ``(N, C, H, W)`` as col2im of ``W^T dY``: the GEMM gives the gradient of
    every im2col entry, and col2im adds each back onto the pixel it was copied from."""
    if algo.get("layout") == "kernel_rows":
        return input_grad_kernel_rows(weight, grad_output, geom, algo)
    G, K, P, Q = geom.groups, geom.K, geom.P, geom.Q
    Kg, CgRS = K // G, (geom.C // G) * geom.R * geom.S
    w_t = weight.reshape(G, Kg, CgRS).transpose(0, 2, 1)
    layout = algo.get("layout", "per_image")
    wide = layout == "wide"
    dtype = grad_output.dtype
    gph, chunks = _phases_for("input_grad", None, geom, algo, layout, dtype)
    bufs = _flat_views(chunks, Q, {"dcol": G * CgRS, "dyw": K if wide else 0}, dtype,
                       workspace_bound(algo))
    gx = (np.zeros if gph.size == 0 else np.empty)(geom.input_shape, dtype=dtype)
    dy3 = grad_output.reshape(geom.N, K, P * Q)
    for ch in chunks:
        L = ch.rc * Q
        J = ch.nc * L
        dcol = bufs["dcol"][:G * CgRS * J].reshape(G, CgRS, J)
        if wide and ch.nc > 1:
            dyw = bufs["dyw"][:K * J].reshape(K, J)
            rows_to_wide(dy3, dyw, ch.n0, ch.nc, ch.r0 * Q, L)
            np.matmul(w_t, dyw.reshape(G, Kg, J), out=dcol)
        else:
            for i in range(ch.nc):
                src = dy3[ch.n0 + i, :, ch.r0 * Q:ch.r0 * Q + L].reshape(G, Kg, L)
                np.matmul(w_t, src, out=dcol[:, :, i * L:(i + 1) * L])
        col2im(dcol.reshape(G * CgRS, J), gx, *_im2col_args(geom, ch), gph)
    if gph.size:
        merge_phases(gph, gx)
    return gx


def weight_grad_im2col(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Weight gradient ``(K, C/G, R, S)`` as ``dY @ col^T`` per chunk, chunks summed in order.
    Chunks put images side by side, so each GEMM's inner dimension spans the whole chunk.
    ``layout="kernel_rows"``: :func:`weight_grad_kernel_rows`."""
    if algo.get("layout") == "kernel_rows":
        return weight_grad_kernel_rows(x, grad_output, geom, algo)
    G, K, P, Q = geom.groups, geom.K, geom.P, geom.Q
    Kg, Cg = K // G, geom.C // G
    CgRS = Cg * geom.R * geom.S
    bound = workspace_bound(algo)
    xph, chunks = _phases_for("weight_grad", x, geom, algo, "wide")
    bufs = _flat_views(chunks, Q, {"col": G * CgRS, "dyw": K}, x.dtype, bound)
    gw = np.zeros((G, Kg, CgRS), dtype=x.dtype)
    part = scratch((G, Kg, CgRS), x.dtype, bound) if len(chunks) > 1 else gw
    dy3 = grad_output.reshape(geom.N, K, P * Q)
    for ch in chunks:
        L = ch.rc * Q
        J = ch.nc * L
        col = bufs["col"][:G * CgRS * J].reshape(G, CgRS, J)
        im2col(x, col.reshape(G * CgRS, J), *_im2col_args(geom, ch), Cg, CgRS, xph)
        if ch.nc == 1:
            dyw = dy3[ch.n0, :, ch.r0 * Q:ch.r0 * Q + L]
        else:
            dyw = bufs["dyw"][:K * J].reshape(K, J)
            rows_to_wide(dy3, dyw, ch.n0, ch.nc, ch.r0 * Q, L)
        np.matmul(dyw.reshape(G, Kg, J), col.transpose(0, 2, 1), out=part)
        if part is not gw:
            gw += part
    return gw.reshape(geom.weight_shape)


def _kernel_rows_conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray],
                      P: int, Q: int, pt: int, pl: int, dh: int, dw: int, sizes: tuple[int, int],
                      algo) -> np.ndarray:
    """Stride-1 one-group conv ``(N, C, H, W) -> (N, K, P, Q)`` by kernel rows: the im2col of
    a ``1 x S`` kernel over every padded row (``C*S`` rows, ``Hp = P + (R-1)*dh`` padded rows
    of ``Q`` columns per image: an R-th of im2col's copies), one GEMM with the ``R`` kernel
    rows' weights stacked (``R*K`` rows), and the row sums of :func:`sum_kernel_rows` (kernel
    row ``r`` reads the product ``r*dh`` rows further down). ``sizes``: its workspace, fixed
    and per image (``cpu_workspace.kernel_rows_bytes``), planned in chunks of whole images."""
    N, C = x.shape[0], x.shape[1]
    K, R, S = weight.shape[0], weight.shape[2], weight.shape[3]
    Hp = P + (R - 1) * dh
    span = Hp * Q
    wmat = np.ascontiguousarray(weight.transpose(2, 0, 1, 3)).reshape(R * K, C * S)
    bound = workspace_bound(algo)
    chunks = list(plan_chunks(N, 1, sizes, bound,
                              int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES))))
    most = max(c.nc for c in chunks) * span
    colf, zf = scratch((C * S * most,), x.dtype, bound), scratch((R * K * most,), x.dtype, bound)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    y3 = y.reshape(N, K, P * Q)
    b = bias if bias is not None else np.empty(0, dtype=x.dtype)
    for ch in chunks:
        J = ch.nc * span
        col = colf[:C * S * J].reshape(C * S, J)
        _kernel_rows_im2col(x, col, ch.n0, ch.nc, Hp, S, pt, pl, dw)
        z = zf[:R * K * J].reshape(R * K, J)
        np.matmul(wmat, col, out=z)
        sum_kernel_rows(z, y3, b, ch.n0, ch.nc, R, dh * Q, span)
    return y


def _check_kernel_rows(geom, op: str) -> None:
    """Raise unless the kernel_rows layout computes ``op`` of this layer
    (``cpu_workspace.kernel_rows_runs``)."""
    if not kernel_rows_runs(geom, op):
        raise ValueError(f"im2col's kernel_rows layout does not run this {op}: stride "
                         f"{geom.stride}, groups {geom.groups}, padding {geom.padding}")


def _kernel_rows_im2col(x: np.ndarray, col: np.ndarray, n0: int, nc: int, Hp: int, S: int,
                        pt: int, pl: int, dw: int) -> None:
    """``col (C*S, nc*Hp*Q)``: the im2col of a ``1 x S`` kernel (dilation ``dw``) over the
    ``Hp`` padded rows of images ``n0 .. n0 + nc`` (rows ``-pt .. Hp - 1 - pt``)."""
    C = x.shape[1]
    im2col(x, col, n0, nc, 0, Hp, 1, S, 1, 1, pt, pl, 1, dw, C, C * S,
           np.empty((0, 0, 0, 0, 0), dtype=x.dtype))


def forward_kernel_rows(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
                        algo) -> np.ndarray:
    """Conv forward, stride 1, one group, by kernel rows (:func:`_kernel_rows_conv`)."""
    _check_kernel_rows(geom, "forward")
    return _kernel_rows_conv(x, weight, bias, geom.P, geom.Q, geom.padding[0], geom.padding[2],
                             *geom.dilation, kernel_rows_bytes("forward", geom, x.itemsize), algo)


def input_grad_kernel_rows(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient, stride 1, one group: the forward of ``grad_output`` with the rotated,
    transposed kernel ``(C, K, R, S)`` and padding ``(R-1)*dh - pt`` rows and ``(S-1)*dw - pl``
    columns (a correlation with the rotated kernel, lecture notes 7.5), by kernel rows."""
    _check_kernel_rows(geom, "input_grad")
    (dh, dw), pt, pl = geom.dilation, geom.padding[0], geom.padding[2]
    w_t = weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    return _kernel_rows_conv(grad_output, w_t, None, geom.H, geom.W, (geom.R - 1) * dh - pt,
                             (geom.S - 1) * dw - pl, dh, dw,
                             kernel_rows_bytes("input_grad", geom, grad_output.itemsize), algo)


def weight_grad_kernel_rows(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Weight gradient ``(K, C, R, S)``, stride 1, one group, by kernel rows: the kernel-row
    im2col of a chunk of images (as the forward's), then for each kernel row ``r`` one GEMM
    per image, ``dY_n (K, P*Q) @ col_n^T`` with ``col_n`` read ``r*dh`` padded rows down (a
    strided view, no copy), the images' products added in order. Only the columns of real
    output pixels are multiplied, so an infinite pixel reaches exactly the taps that read it."""
    _check_kernel_rows(geom, "weight_grad")
    N, C, K, R, S = geom.N, geom.C, geom.K, geom.R, geom.S
    P, Q, (dh, dw) = geom.P, geom.Q, geom.dilation
    Hp, L = P + (R - 1) * dh, P * Q
    span = Hp * Q
    bound = workspace_bound(algo)
    chunks = list(plan_chunks(N, 1, kernel_rows_bytes("weight_grad", geom, x.itemsize), bound,
                              int(algo.get("chunk_bytes", DEFAULT_CHUNK_BYTES))))
    most = max(c.nc for c in chunks)
    colf = scratch((C * S * most * span,), x.dtype, bound)
    prod = scratch((most, K, C * S), x.dtype, bound)
    gw = np.zeros((R, K, C * S), dtype=x.dtype)
    dy3 = grad_output.reshape(N, K, L)
    for ch in chunks:
        col = colf[:C * S * ch.nc * span].reshape(C * S, ch.nc * span)
        _kernel_rows_im2col(x, col, ch.n0, ch.nc, Hp, S, geom.padding[0], geom.padding[2], dw)
        per_image = col.reshape(C * S, ch.nc, span)
        for r in range(R):
            o = r * dh * Q
            np.matmul(dy3[ch.n0:ch.n0 + ch.nc], per_image[:, :, o:o + L].transpose(1, 2, 0),
                      out=prod[:ch.nc])
            for i in range(ch.nc):
                gw[r] += prod[i]
    return np.ascontiguousarray(gw.reshape(R, K, C, S).transpose(1, 2, 0, 3))


# ---------------------------------------------------------------------------------------------
# 1x1, no padding: the conv is a GEMM on the input as it lies in memory (stride 1), or on its
# subsampled pixels (a strided 1x1 layer reads only every ``sh``-th row and ``sw``-th column)
# ---------------------------------------------------------------------------------------------
def _split(a: np.ndarray, G: int) -> np.ndarray:
    """``(N, G * X, H, W) -> (N, G, X, H * W)`` as a view."""
    N, GX, H, W = a.shape
    return a.reshape(N, G, GX // G, H * W)


def _strided(geom) -> bool:
    return geom.stride != (1, 1)


def _grid_scratch(geom, dtype, algo) -> np.ndarray:
    """A scratch ``(N, C, P, Q)``: the input's channels on the output grid."""
    return scratch(geom.input_shape[:2] + geom.output_shape[2:], dtype, workspace_bound(algo))


@njit(cache=True)
def to_grid(x, xs, sh, sw):
    """``xs[n, c, p, q] = x[n, c, p*sh, q*sw]``, both C-contiguous. Stride 2 along the rows
    reads with a constant stride, which LLVM vectorises: 0.14-0.23 ms on 8 x 256 x 28 x 28
    against 0.23-0.36 for NumPy's strided copy of ``x[:, :, ::2, ::2]``. One thread (so is
    the inverse): two ran no faster here, and a parallel loop costs about 2 s more of cold
    compile per dtype."""
    N, C, H, W = x.shape
    P, Q = xs.shape[2], xs.shape[3]
    xf = x.reshape(x.size)
    sf = xs.reshape(xs.size)
    for t in range(N * C):
        for p in range(P):
            s0 = np.uint64((t * H + p * sh) * W)
            d0 = np.uint64((t * P + p) * Q)
            if sw == 2:
                for q in range(np.uint64(Q)):
                    sf[d0 + q] = xf[s0 + np.uint64(2) * q]
            else:
                for q in range(Q):
                    sf[d0 + q] = xf[s0 + q * sw]


@njit(cache=True)
def from_grid(gs, gx, sh, sw):
    """``gx[n, c, p*sh, q*sw] = gs[n, c, p, q]``, zero at every other pixel of ``gx``: the
    inverse of :func:`to_grid` for the input gradient, each row written once (no zero-filled
    array first), both C-contiguous. 0.34 ms for 8 x 256 x 28 x 28 (two threads 0.18-0.32)."""
    N, C, H, W = gx.shape
    P, Q = gs.shape[2], gs.shape[3]
    gf = gx.reshape(gx.size)
    sf = gs.reshape(gs.size)
    zero = gx.dtype.type(0)
    for t in range(N * C):
        for h in range(H):
            d0 = np.uint64((t * H + h) * W)
            p = h // sh
            if h - p * sh != 0 or p >= P:
                for w in range(np.uint64(W)):
                    gf[d0 + w] = zero
                continue
            s0 = np.uint64((t * P + p) * Q)
            if sw == 2:
                pairs = np.uint64(min(Q, W // 2))
                for q in range(pairs):              # an interleaved pair of stores
                    gf[d0 + np.uint64(2) * q] = sf[s0 + q]
                    gf[d0 + np.uint64(2) * q + np.uint64(1)] = zero
                if W % 2 == 1:
                    gf[d0 + np.uint64(W - 1)] = sf[s0 + np.uint64(Q - 1)]
            else:
                for w in range(W):
                    q = w // sw
                    gf[d0 + np.uint64(w)] = sf[s0 + np.uint64(q)] if w - q * sw == 0 else zero


def _subsampled(x: np.ndarray, geom, algo) -> np.ndarray:
    """``x[:, :, ::sh, ::sw]``, the pixels a strided 1x1 unpadded layer reads, as a contiguous
    scratch ``(N, C, P, Q)`` (:func:`to_grid`); ``x`` itself at stride 1."""
    if not _strided(geom):
        return x
    xs = _grid_scratch(geom, x.dtype, algo)
    to_grid(np.ascontiguousarray(x), xs, *geom.stride)
    return xs


def forward_gemm1x1(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
                    algo) -> np.ndarray:
    """1x1 unpadded conv: ``y[n] = W @ x[n]`` per group (on the subsampled pixels when
    strided); no workspace at stride 1."""
    G = geom.groups
    y = np.empty(geom.output_shape, dtype=x.dtype)
    np.matmul(weight.reshape(G, geom.K // G, geom.C // G), _split(_subsampled(x, geom, algo), G),
              out=_split(y, G))
    if bias is not None:
        add_bias(y.reshape(geom.N, geom.K, geom.P * geom.Q), bias)
    return y


def input_grad_gemm1x1(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """1x1 unpadded conv input gradient: ``gx[n] = W^T @ dY[n]`` per group; when strided,
    computed on the output grid and put on the pixels it was read from (zero elsewhere)."""
    G = geom.groups
    dtype = grad_output.dtype
    w_t = weight.reshape(G, geom.K // G, geom.C // G).transpose(0, 2, 1)
    if not _strided(geom):
        gx = np.empty(geom.input_shape, dtype=dtype)
        np.matmul(w_t, _split(grad_output, G), out=_split(gx, G))
        return gx
    gxs = _grid_scratch(geom, dtype, algo)
    np.matmul(w_t, _split(grad_output, G), out=_split(gxs, G))
    gx = np.empty(geom.input_shape, dtype=dtype)
    from_grid(gxs, gx, *geom.stride)
    return gx


def weight_grad_gemm1x1(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """1x1 unpadded conv weight gradient: ``sum_n dY[n] @ x[n]^T`` (subsampled when strided),
    in image order."""
    G = geom.groups
    gw = np.zeros((G, geom.K // G, geom.C // G), dtype=x.dtype)
    part = scratch(gw.shape, x.dtype, workspace_bound(algo))
    xs, dys = _split(_subsampled(x, geom, algo), G), _split(grad_output, G)
    for n in range(geom.N):
        np.matmul(dys[n], xs[n].transpose(0, 2, 1), out=part)
        gw += part
    return gw.reshape(geom.weight_shape)


def bias_grad_reduce(grad_output: np.ndarray, algo) -> np.ndarray:
    """Bias gradient ``(K,)``: ``grad_output`` summed over N, P, Q in a fixed order (see
    :func:`bias_grad`); its scratch, :data:`BIAS_GRAD_LANES` float64 per thread, does not grow
    with the plane and stays far below any workspace bound."""
    out = np.empty(grad_output.shape[1], dtype=np.float64)
    bias_grad(grad_output, out, BIAS_GRAD_LANES)
    return out.astype(grad_output.dtype)
