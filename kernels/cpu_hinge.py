"""Fused multiclass hinge loss and gradient on the CPU (Numba).

Per row ``i`` with label ``y = labels[i]`` and margins ``m_j = (s_j - s_y) + margin``::

    l_i   = w[y] * sum_{j != y} max(0, m_j) ** p
    g_ij  = row_scale[i] * w[y] * p * max(0, m_j) ** (p - 1) * [m_j > 0]     (j != y)
    g_iy  = -sum_{j != y} g_ij

One pass over each row computes both: every margin is formed once, the same ``max(0, m_j)``
feeds the loss term and the gradient entry, and ``g_iy`` is the negated running sum of the
entries just written. Rows run in parallel (``prange``); each row is reduced by one thread in a
fixed order, so results are identical from run to run and for any thread count.

Algorithm (``Algo("fused", (("accumulate", ...),))``, chosen by the cpu dispatch rules):
the row sums run in the scores' dtype (``"native"``) or in float64 (``"float64"``).

Reduction order (the results are bit-identical across runs, thread counts, processes and the
Numba cache). No fastmath flag is used: LLVM may not reorder a sum, fuse a multiply-add or
assume finite values, so the machine code (whatever the vector width the compiler picks) gives
the same bits. Speed comes from an explicit order instead: a row of ``C >= SHORT_ROW`` (64)
columns is summed in ``LANES`` (64) partial sums, column ``j`` going to lane ``j % LANES`` in
increasing ``j``, and the lanes are then combined pairwise (lane ``l`` += lane ``l + w`` for
``w = 32, 16, ..., 1``); shorter rows are one running sum in column order, computed for a block
of ``SHORT_BLOCK`` rows at once (the block is transposed so that the rows are the vector lanes:
one column step adds one term to every row's own running sum). Both loops are elementwise, so
LLVM vectorises them at any width without changing a single rounding. The loss-only pass
forms every term exactly as the fused pass, so both give the same losses. For float32 the
rounding error of a lane grows with ``C / 64``, so long float32 rows need
``"float64"`` (the dispatch rules choose it above C = 2048).

Non-finite scores (the rule of the reference backend): a row holding a NaN score has a NaN
loss and an all-NaN gradient row. Infinities follow IEEE arithmetic on the formulas above,
with ``max(0, m)`` propagating NaN (an ``inf - inf`` margin gives a NaN loss) and the indicator
``[m_j > 0]`` false for a NaN margin, exactly as NumPy evaluates the reference.

Why the code looks as it does (measured with Numba 0.68, LLVM vectoriser):
- the lane loop sits directly in the row loop of the ``prange`` body: moved into a helper
  function (even one inlined by Numba) such loops stop vectorising;
- the lane count is a run-time argument: with a constant trip count LLVM unrolls the lane
  loop fully and leaves it scalar;
- ``j == y`` is masked by a select instead of splitting the row, so one branch-free loop covers
  the row;
- short rows (C = 10: a row is shorter than one vector) are vectorised across rows of a
  transposed block rather than along the row, whose running sum is a serial chain;
- the loop only ORs a NaN-margin flag (free to vectorise); rows with one are scanned again by
  a scalar loop that applies the non-finite rules. The short-row loop instead accumulates
  ``m - m`` (0, or NaN for any non-finite margin, the label's included): cheaper than a bool
  lane, but it also flags infinite margins, so a flagged row is recomputed by a scalar loop
  that forms the same terms in the same order (same bits) and the exact flag;
- short rows (measured single-thread, N = 262144, C = 10, float32: 7.1-7.7 ms before, 4.4-4.6
  ms after, a copy of the scores 1.4 ms): per-task ``np.empty`` of the scratch cost about 1 ms
  when tasks were single 256-row blocks, so a task now runs ``SHORT_BLOCKS_PER_TASK`` blocks
  through one allocation; int64 labels halve the vector lanes of the label test (int32 lanes
  saved about 1 ms); blocks of 32 rows measured as fast as 64 and faster than 256. Column
  selects in vector lanes instead of the per-row gathers of the label score measured slower;
- the block is transposed in and its gradient out by 8 x 8 register transposes
  (``cpu_simd.transpose8``, LLVM shuffles built with ``numba.extending.intrinsic``: Numba's own
  loops over a row of 10 stayed scalar, about 1.2 ms each way for 262144 x 10 on one thread);
  a row of ``C`` columns is covered by 8-column tiles at ``0, 8, ...`` and one at ``C - 8``,
  8-row tiles likewise (overlapping tiles write the same values twice); blocks with fewer than
  8 rows or columns take plain loops. The column pass stores each gradient entry in a
  transposed scratch as it forms it, the labels' entries go in last, and the scratch is
  transposed into the gradient. Session 24 (262144 x 10, float32, 1 thread, alternating in
  one process): 4.35-4.57 -> 2.73-2.86 ms; before, a second pass in row layout formed every
  entry again (2.0 ms of the 4.4);
- the column pass is an intrinsic (``_column_pass8``) that runs 8 rows (one vector) down all
  ``C`` columns with the three running sums in registers. As a Numba loop over the block's
  rows, one column a pass, it loaded and stored every sum at every column (two columns a pass
  had too many arrays for LLVM's run-time alias checks and stayed scalar). Session 26, same
  setting: 2.67-2.68 -> 2.41-2.47 ms (C = 30: 8.2-9.3 -> 7.4-8.3 ms). Not kept: the transposes
  fused into it (8 x 8 tiles transposed in registers and the entries transposed back straight
  into the gradient, the last tile's columns seen before left out of the sums): 3.16-3.27 ms,
  the sixteen columns of math for C = 10 and the registers spilled;
- every loop spells out the same expression for a term (``m``, ``h``, ``slope``, the entry),
  on which the bits of a row depend: one helper for all of them (inlined by Numba; the same
  bits, session 14) made the short rows 3-4% slower (262144 x 10, 1 thread, three rounds:
  2.92-3.44 -> 3.01-3.54 ms) and the long rows' loss-only pass 25% slower (16384 x 1000, 1
  thread: 3.46-3.55 -> 4.30-4.53 ms). The tests hold them equal instead (the same bits as a
  plain loop, the non-finite recomputation).

This module is compute only: it imports nothing from ``fastconv`` and trusts its inputs.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_simd import LANES as VECTOR, Vectors, transpose8

ALGORITHM = "fused"
ACCUMULATORS = ("native", "float64")

# Partial sums per long row (a power of two), and the row length from which they are used.
LANES = 64
SHORT_ROW = 64
# Rows per parallel task: the lane buffers are allocated once per task.
ROWS_PER_TASK = 64
# Rows of a short-row block (transposed so that rows are the vector lanes; at least 8, the
# lanes ``_column_pass8`` reads and writes even in a shorter last block), and blocks per
# parallel task (the task's scratch is allocated once for all of them).
SHORT_BLOCK = 32
SHORT_BLOCKS_PER_TASK = 64


@intrinsic
def _column_pass8(typingctx, st, gt, step, C, sy, coef, yb, r0, margin, p, loss, gsum, chk):
    """The column pass of ``_hinge_short_rows`` for the 8 rows (vector lanes) ``r0 .. r0 + 7``
    of a transposed block, their running sums in registers across the ``C`` columns.

    ``st`` / ``gt``: the block's scores / gradient entries, flat (column ``j`` of row ``r`` at
    ``j * step + r``); per row (at ``r0``): ``sy`` the label score, ``coef`` the gradient
    coefficient, ``yb`` the label (int32); ``loss``, ``gsum`` (the accumulator's dtype) and
    ``chk`` receive the rows' sums of the loss terms, the gradient entries and ``m - m``. Each
    sum runs from zero in column order with every term spelled as the plain loop of the module
    docstring (LLVM instructions without fast-math flags: no reordering, no fused
    multiply-add): the same bits as that loop. Writes lanes ``r0 .. r0 + 7`` whole, so a call
    on overlapping lanes writes the same values again.
    """
    floats = (st, gt, sy, coef, loss, gsum, chk)
    if not (all(isinstance(a, types.Array) and a.ndim == 1
                and a.dtype in (types.float32, types.float64) for a in floats)
            and isinstance(yb, types.Array) and yb.ndim == 1 and yb.dtype == types.int32
            and st.dtype == gt.dtype == sy.dtype == coef.dtype == chk.dtype == margin
            and loss.dtype == gsum.dtype and loss.dtype.bitwidth >= sy.dtype.bitwidth):
        return None
    sig = types.void(st, gt, types.intp, types.intp, sy, coef, yb, types.intp, margin,
                     types.intp, loss, gsum, chk)

    def codegen(context, builder, signature, args):
        b = builder
        vec = Vectors(context, b, signature, args, (0, 1, 4, 5, 12))   # st gt sy coef chk
        acc = Vectors(context, b, signature, args, (10, 11))           # loss gsum
        ints = Vectors(context, b, signature, args, (6,))              # yb
        (d_st, d_gt, d_sy, d_coef, d_chk), (d_loss, d_gsum) = vec.data, acc.data
        step, ncols, r0, margin, p = args[2], args[3], args[7], args[8], args[9]
        zero = ir.Constant(vec.vty, None)
        one = vec.splat(ir.Constant(vec.vty.element, 1.0))
        sy_v, coef_v, margin_v = vec.load(d_sy, r0), vec.load(d_coef, r0), vec.splat(margin)
        yb_v = ints.load(ints.data[0], r0)
        p_is_one = b.icmp_signed("==", p, ir.Constant(p.type, 1))
        sums = [cgutils.alloca_once_value(b, ir.Constant(t, None))
                for t in (acc.vty, acc.vty, vec.vty)]            # loss, gsum, chk

        def widen(x):
            return x if acc.vty == vec.vty else b.fpext(x, acc.vty)

        with cgutils.for_range(b, ncols) as loop:
            off = b.add(b.mul(loop.index, step), r0)
            jj = ints.splat(b.trunc(loop.index, ints.vty.element))
            m = b.fadd(b.fsub(vec.load(d_st, off), sy_v), margin_v)
            active = b.and_(b.fcmp_ordered(">", m, zero), b.icmp_signed("!=", jj, yb_v))
            h = b.select(active, m, zero)
            slope = b.select(p_is_one, one, h)
            e = b.fmul(coef_v, b.select(active, slope, zero))
            vec.store(e, d_gt, off)
            for slot, term in zip(sums, (widen(b.fmul(h, slope)), widen(e), b.fsub(m, m))):
                b.store(b.fadd(b.load(slot), term), slot)
        for slot, (vectors, data) in zip(sums, ((acc, d_loss), (acc, d_gsum), (vec, d_chk))):
            vectors.store(b.load(slot), data, r0)
        return context.get_dummy_value()
    return sig, codegen


@njit(cache=True)
def _transpose_tiles(src, s0, s_step, rows, cols, dst, d0, d_step):
    """``dst[d0 + j * d_step + i] = src[s0 + i * s_step + j]`` for ``i < rows``, ``j < cols``
    (both at least 8), by 8 x 8 tiles at ``0, 8, ...`` and one at ``rows - 8`` (``cols - 8``):
    the last tiles overlap the others and write the same values again."""
    for it in range((rows + 7) // 8):
        i = min(8 * it, rows - 8)
        for jt in range((cols + 7) // 8):
            j = min(8 * jt, cols - 8)
            transpose8(src, s0 + i * s_step + j, s_step, dst, d0 + j * d_step + i, d_step)


@njit(cache=True)
def _nonfinite_row(s, y, p, acc_zero, nan, grad_row, want_grad):
    """The non-finite rules of the module docstring for a row with a NaN margin or label
    score: ``(nan_score, loss, grad_sum)``; writes NaN into ``grad_row`` where they say so."""
    sy = s[y]
    nan_score = sy != sy
    for j in range(s.shape[0]):
        nan_score |= s[j] != s[j]
    if nan_score:
        if want_grad:
            grad_row[:] = nan
        return True, acc_zero + nan, acc_zero + nan
    # inf - inf margins: max(0, NaN) is NaN, so is the loss; for p = 2 so are their gradient
    # entries 2 h and the label's; [NaN > 0] is 0 for p = 1
    grad_nan = False
    if want_grad and p == 2:
        for j in range(s.shape[0]):
            if j != y and s[j] - sy != s[j] - sy:
                grad_row[j] = nan
                grad_nan = True
    return False, acc_zero + nan, (acc_zero + nan) if grad_nan else acc_zero


@njit(cache=True)
def _short_row_again(s, y, margin, p, coef, acc_zero, grad_row, want_grad):
    """One short row recomputed by a scalar loop exactly as the block loop of
    ``_hinge_short_rows`` (same terms, same order, same bits): ``(loss, grad_sum, bad)``, with
    ``bad`` the exact flag (a NaN margin ``j != y``, or a NaN label score); with ``want_grad``
    writes the row's gradient entries (the label's left for the caller)."""
    dtype = s.dtype.type
    zero = dtype(0)
    one = dtype(1)
    sy = s[y]
    loss = acc_zero
    grad_sum = acc_zero
    bad = sy != sy
    for j in range(s.shape[0]):
        m = (s[j] - sy) + margin
        other = j != y
        active = (m > zero) & other
        h = m if active else zero
        slope = one if p == 1 else h
        loss += h * slope
        g = coef * (slope if active else zero)
        if want_grad:
            grad_row[j] = g
        grad_sum += g
        bad |= (m != m) & other
    return loss, grad_sum, bad


@njit(parallel=True, cache=True)
def _hinge_short_rows(scores, labels, margin, p, class_weight, row_scale, want_grad, acc_zero,
                      block, losses, grad):
    """``_hinge_rows`` for rows of ``C < SHORT_ROW`` columns: blocks of ``block`` rows,
    transposed, one running sum per row in column order (the same bits as a plain loop); the
    gradient entries are formed transposed and the block is transposed back into ``grad``.

    A parallel task runs ``SHORT_BLOCKS_PER_TASK`` blocks through scratch allocated once.
    """
    N, C = scores.shape
    dtype = scores.dtype.type
    zero = dtype(0)
    nan = dtype(np.nan)
    rs_step = 1 if row_scale.shape[0] == N else 0
    nblocks = (N + block - 1) // block
    ntasks = (nblocks + SHORT_BLOCKS_PER_TASK - 1) // SHORT_BLOCKS_PER_TASK
    flat_scores = scores.reshape(N * C)
    flat_grad = grad.reshape(grad.size)
    for task in prange(ntasks):
        # Zeroed once: a block of fewer than 8 rows reads spare lanes (see below).
        st = np.zeros((C, block), dtype=scores.dtype)       # a block's scores, transposed
        gt = np.empty((C, block), dtype=scores.dtype)       # its gradient entries, transposed
        flat_st = st.reshape(C * block)
        flat_gt = gt.reshape(C * block)
        sy = np.zeros(block, dtype=scores.dtype)
        wy = np.empty(block, dtype=scores.dtype)            # class_weight[y]
        coef = np.zeros(block, dtype=scores.dtype)
        yb = np.zeros(block, dtype=np.int32)                # labels < C < 64: 8 lanes, not 4
        loss = np.empty(block, dtype=type(acc_zero))
        gsum = np.empty(block, dtype=type(acc_zero))
        chk = np.empty(block, dtype=scores.dtype)           # NaN iff a margin is not finite
        for b in range(task * SHORT_BLOCKS_PER_TASK,
                       min(nblocks, (task + 1) * SHORT_BLOCKS_PER_TASK)):
            i0 = b * block
            R = min(block, N - i0)
            sb = scores[i0:i0 + R]
            lb = labels[i0:i0 + R]
            for r in range(R):                              # elementwise: vectorised
                yb[r] = lb[r]
            for r in range(R):
                y = yb[r]
                sy[r] = sb[r, y]
                w = class_weight[y]
                wy[r] = w
                coef[r] = row_scale[(i0 + r) * rs_step] * w * dtype(p)
            tiles = R >= 8 and C >= 8                       # 8 x 8 register transposes
            if tiles:
                _transpose_tiles(flat_scores, i0 * C, C, R, C, flat_st, 0, block)
            else:
                for j in range(C):
                    sj = st[j]
                    for r in range(R):
                        sj[r] = sb[r, j]
            # Eight rows (the vector lanes) at a time, their sums in registers across the
            # columns; the last group overlaps the one before (it writes the same values),
            # and a block of fewer than 8 rows computes the scratch's spare lanes unread.
            for v in range((R + VECTOR - 1) // VECTOR):
                r0 = max(0, min(VECTOR * v, R - VECTOR))
                _column_pass8(flat_st, flat_gt, block, C, sy, coef, yb, r0, margin, p, loss,
                              gsum, chk)
            if want_grad:
                for r in range(R):
                    gt[yb[r], r] = dtype(-gsum[r])
                if tiles:
                    _transpose_tiles(flat_gt, 0, block, C, R, flat_grad, i0 * C, C)
                else:
                    gb = grad[i0:i0 + R]
                    for r in range(R):
                        gr = gb[r]
                        for j in range(C):
                            gr[j] = gt[j, r]
            lo = losses[i0:i0 + R]
            for r in range(R):
                lo[r] = dtype(wy[r] * loss[r])
            rare = False
            for r in range(R):
                rare |= chk[r] != zero
            if not rare:
                continue
            # Rows with a non-finite margin (rare): the scalar loop again, with the exact flag
            # of the non-finite rules (chk also flags infinite margins, which follow IEEE).
            for r in range(R):
                if chk[r] == zero:
                    continue
                i = i0 + r
                y = yb[r]
                lr, gr, bad = _short_row_again(scores[i], y, margin, p, coef[r], acc_zero,
                                               grad[i], want_grad)
                if bad:
                    nan_score, lr, gr = _nonfinite_row(scores[i], y, p, acc_zero, nan, grad[i],
                                                       want_grad)
                    if nan_score:
                        losses[i] = nan
                        continue
                if want_grad:
                    grad[i, y] = dtype(-gr)
                losses[i] = dtype(wy[r] * lr)


@njit(parallel=True, cache=True)
def _hinge_rows(scores, labels, margin, p, class_weight, row_scale, want_grad, acc_zero,
                lanes, losses, grad):
    """Fill ``losses (N,)`` and, with ``want_grad``, ``grad (N, C)``; parallel over blocks of
    rows, each row reduced in the fixed order of the module docstring.

    ``margin`` has the scores' dtype; ``row_scale`` is ``(1,)`` (broadcast) or ``(N,)``;
    ``acc_zero`` is a zero of the accumulator type (Numba compiles one version per type);
    ``lanes`` is :data:`LANES` (an argument so that the lane loop is not unrolled); without
    ``want_grad``, ``grad`` is an unused ``(N, 0)`` array.
    """
    N, C = scores.shape
    dtype = scores.dtype.type
    zero = dtype(0)
    one = dtype(1)
    nan = dtype(np.nan)
    # A (1,)-shaped row_scale broadcasts: a step of 0 reads its only entry for every row.
    rs_step = 1 if row_scale.shape[0] == N else 0
    ntasks = (N + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(ntasks):
        lacc = np.full(lanes, acc_zero)      # loss partial sums
        gacc = np.full(lanes, acc_zero)      # partial sums of the row's gradient entries
        for i in range(task * ROWS_PER_TASK, min(N, (task + 1) * ROWS_PER_TASK)):
            s = scores[i]
            y = labels[i]
            sy = s[y]
            wy = class_weight[y]
            coef = row_scale[i * rs_step] * wy * dtype(p)  # d(total)/d(m_j) = coef * h**(p-1)
            any_nan = False                      # a NaN margin (j != y)
            lacc[:] = acc_zero                   # column j into lane j % lanes, in order
            gacc[:] = acc_zero
            for j0 in range(0, C, lanes):
                n = min(lanes, C - j0)
                sb = s[j0:j0 + n]
                yl = y - j0
                if want_grad:
                    gb = grad[i, j0:j0 + n]
                    for ll in range(n):
                        m = (sb[ll] - sy) + margin
                        other = ll != yl
                        active = (m > zero) & other
                        h = m if active else zero
                        slope = one if p == 1 else h
                        lacc[ll] += h * slope
                        gj = coef * (slope if active else zero)
                        gacc[ll] += gj
                        gb[ll] = gj
                        any_nan |= (m != m) & other
                else:
                    for ll in range(n):
                        m = (sb[ll] - sy) + margin
                        other = ll != yl
                        h = m if (m > zero) & other else zero
                        lacc[ll] += h * (one if p == 1 else h)
                        any_nan |= (m != m) & other
            w = lanes
            while w > 1:                         # lane l += lane l + w, w = lanes/2 .. 1
                w //= 2
                lhi = lacc[w:w + w]
                ghi = gacc[w:w + w]
                for ll in range(w):
                    lacc[ll] += lhi[ll]
                    gacc[ll] += ghi[ll]
            loss = lacc[0]
            grad_sum = gacc[0]
            if any_nan or sy != sy:              # rare: the non-finite rules (docstring)
                nan_score, loss, grad_sum = _nonfinite_row(s, y, p, acc_zero, nan, grad[i],
                                                           want_grad)
                if nan_score:
                    losses[i] = nan
                    continue
            if want_grad:
                grad[i, y] = dtype(-grad_sum)
            losses[i] = dtype(wy * loss)

def hinge_loss_rows(
    scores: np.ndarray,
    labels: np.ndarray,
    margin: float,
    p: int,
    class_weight: np.ndarray,
    row_scale: np.ndarray,
    want_grad: bool,
    algo: object,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-row multiclass hinge losses and, optionally, their gradient, in one fused pass.

    Parameters
    ----------
    scores : ndarray, (N, C), float32 or float64, C-contiguous
    labels : ndarray, (N,), int64, values in ``[0, C)``
    margin : float
    p : int
        1 or 2.
    class_weight : ndarray, (C,), scores' dtype
        Weight of each class; row ``i`` is weighted by ``class_weight[labels[i]]``.
    row_scale : ndarray, (1,) or (N,), scores' dtype
        d(total loss)/d(l_i); ``(1,)`` broadcasts to every row.
    want_grad : bool
        Also compute the gradient.
    algo : Algo
        ``Algo("fused", (("accumulate", "native" | "float64"),))``: the type the row
        sums run in (see the module docstring); without the param, float64 (always accurate).

    Returns
    -------
    losses : ndarray, (N,), scores' dtype
        ``l_i = sum_{j != y_i} w[y_i] * max(0, s_ij - s_iy_i + margin) ** p``.
    grad : ndarray, (N, C), scores' dtype, or None
        ``row_scale[i] * d l_i / d s_i`` when ``want_grad``; subgradient 0 at a kink.
        A row with a NaN score has a NaN loss and an all-NaN gradient row.
    """
    N, C = scores.shape
    dtype = scores.dtype
    acc_zero = dtype.type(0) if algo.get("accumulate") == "native" else np.float64(0)
    losses = np.empty(N, dtype=dtype)
    # The gradient-free pass never touches grad; an empty (N, 0) stand-in keeps one signature.
    grad = np.empty((N, C) if want_grad else (N, 0), dtype=dtype)
    # The margin in the scores' dtype rounds m_j exactly as a NumPy expression on the scores.
    if C < SHORT_ROW:
        _hinge_short_rows(scores, labels, dtype.type(margin), int(p), class_weight, row_scale,
                          bool(want_grad), acc_zero, SHORT_BLOCK, losses, grad)
    else:
        _hinge_rows(scores, labels, dtype.type(margin), int(p), class_weight, row_scale,
                    bool(want_grad), acc_zero, LANES, losses, grad)
    return losses, (grad if want_grad else None)
