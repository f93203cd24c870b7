"""The fused Numba hinge kernel (``fastconv.kernels.cpu_hinge``) called directly.

Checked against the plain per-element loop of tests/loops.py in float64, for every option of the
backend contract: p, margin, class weights, broadcast and per-row ``row_scale``, loss only or
loss + gradient, both accumulators, float32 and float64, short and long rows. The public ops
are tested on every backend elsewhere (tests/test_hinge.py); this file pins down the kernel
itself, including determinism across thread counts and the accuracy of long rows.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv._types import Algo
from fastconv.kernels.cpu_hinge import (ACCUMULATORS, ALGORITHM, SHORT_BLOCK,
                                      SHORT_BLOCKS_PER_TASK, hinge_loss_rows)

import loops

TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-11}
DTYPES = (np.float32, np.float64)


def _algo(accumulate: str) -> Algo:
    return Algo(ALGORITHM, (("accumulate", accumulate),), "test")


def loop_hinge(scores, labels, margin, p, class_weight, row_scale):
    """Losses (N,) and row-scaled gradient (N, C) from the shared loop oracle, in float64."""
    losses, grad = loops.hinge_rows(scores.astype(np.float64), labels, margin, p,
                                    class_weight.astype(np.float64))
    scale = np.broadcast_to(row_scale.astype(np.float64), (scores.shape[0],))
    return losses, grad * scale[:, None]


def rel_error(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def make_problem(N, C, dtype, *, weighted, per_row_scale, seed=0):
    """Random scores, labels, class weights and row scales of one dtype."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((N, C)).astype(dtype)
    labels = rng.integers(0, C, N).astype(np.int64)
    class_weight = (rng.uniform(0.5, 2.0, C) if weighted else np.ones(C)).astype(dtype)
    row_scale = (rng.uniform(-1.0, 1.0, N) if per_row_scale else np.array([0.25])).astype(dtype)
    return scores, labels, class_weight, row_scale


def check(scores, labels, margin, p, class_weight, row_scale, accumulate):
    """Run the kernel with and without the gradient and compare both to the loop."""
    dtype = scores.dtype
    want_losses, want_grad = loop_hinge(scores, labels, margin, p, class_weight, row_scale)
    losses, grad = hinge_loss_rows(scores, labels, margin, p, class_weight, row_scale, True,
                                   _algo(accumulate))
    losses_only, no_grad = hinge_loss_rows(scores, labels, margin, p, class_weight, row_scale,
                                           False, _algo(accumulate))
    assert no_grad is None
    for got in (losses, grad, losses_only):
        assert got.dtype == dtype
        assert np.all(np.isfinite(got))
    assert losses.shape == want_losses.shape and grad.shape == want_grad.shape
    assert rel_error(losses, want_losses) < TOLERANCE[dtype]
    assert rel_error(losses_only, want_losses) < TOLERANCE[dtype]
    assert rel_error(grad, want_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ACCUMULATORS)
def test_lecture_notes_example(dtype, accumulate):
    # Notes 7.1: s = (-3, 1.0, 0.5, -1.0, -0.4), y = 2: margins 1.5 and 0.1 are active.
    scores = np.array([[-3.0, 1.0, 0.5, -1.0, -0.4]], dtype=dtype)
    ones = np.ones(5, dtype=dtype)
    losses, grad = hinge_loss_rows(scores, np.array([2]), 1.0, 1, ones,
                                   np.ones(1, dtype=dtype), True, _algo(accumulate))
    np.testing.assert_allclose(losses, [1.6], rtol=TOLERANCE[np.dtype(dtype)])
    np.testing.assert_array_equal(grad, [[0.0, 1.0, -2.0, 0.0, 1.0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ACCUMULATORS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("per_row_scale", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (33, 10), (9, 45), (4, 300)])
def test_matches_loop(dtype, accumulate, p, weighted, per_row_scale, shape):
    scores, labels, class_weight, row_scale = make_problem(
        *shape, dtype, weighted=weighted, per_row_scale=per_row_scale)
    check(scores, labels, 1.0, p, class_weight, row_scale, accumulate)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.0, 0.3, 2.5, -0.5])
@pytest.mark.parametrize("p", [1, 2])
def test_margins(dtype, margin, p):
    scores, labels, class_weight, row_scale = make_problem(
        16, 12, dtype, weighted=True, per_row_scale=True, seed=3)
    check(scores, labels, margin, p, class_weight, row_scale, "native")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
def test_kink_and_label_column(dtype, p):
    # Row 0: s_0 - s_1 + 1 == 0 exactly (a kink: subgradient 0). Row 1: only the label's own
    # column would be "active" (its margin is the margin itself), and it must not count.
    scores = np.array([[0.0, 1.0, -5.0], [0.0, 0.0, 0.0]], dtype=dtype)
    labels = np.array([1, 2])
    ones = np.ones(3, dtype=dtype)
    losses, grad = hinge_loss_rows(scores, labels, 1.0, p, ones, np.ones(1, dtype=dtype),
                                   True, _algo("native"))
    np.testing.assert_array_equal(losses, [0.0, 2.0])
    np.testing.assert_array_equal(grad[0], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(grad[1], [p, p, -2 * p])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ACCUMULATORS)
def test_labels_at_row_ends(dtype, accumulate):
    # The label's column is masked inside the vectorised loop; check it in the vector body,
    # at both ends and in the scalar remainder of rows of 41 columns.
    N, C = 41, 41
    scores, _, class_weight, row_scale = make_problem(N, C, dtype, weighted=True,
                                                      per_row_scale=True, seed=5)
    labels = np.arange(N, dtype=np.int64) % C
    for p in (1, 2):
        check(scores, labels, 0.7, p, class_weight, row_scale, accumulate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_across_runs_and_threads(dtype):
    scores, labels, class_weight, row_scale = make_problem(
        2000, 301, dtype, weighted=True, per_row_scale=True, seed=7)
    args = (scores, labels, 1.0, 2, class_weight, row_scale, True, _algo("native"))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one_thread = hinge_loss_rows(*args)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        first, second = hinge_loss_rows(*args), hinge_loss_rows(*args)
    finally:
        numba.set_num_threads(before)
    for got in (first, second):
        np.testing.assert_array_equal(got[0], one_thread[0])
        np.testing.assert_array_equal(got[1], one_thread[1])


def test_float64_accumulator_keeps_long_float32_rows_accurate():
    # Equal margins are the worst case for a float32 running sum (the rounding error grows
    # with C / 32); the float64 accumulator must stay within float32 rounding of the truth.
    N, C = 2, 200_000
    scores = np.full((N, C), 0.1, dtype=np.float32)
    labels = np.array([0, C - 1])
    scores[np.arange(N), labels] = 0.0
    ones = np.ones(C, dtype=np.float32)
    losses, grad = hinge_loss_rows(scores, labels, 1.0, 1, ones, np.ones(1, dtype=np.float32),
                                   True, _algo("float64"))
    exact = (C - 1) * np.float64(np.float32(0.1) + np.float32(1.0))  # m_j in float32
    np.testing.assert_allclose(losses, [exact, exact], rtol=1e-6)
    assert grad[0, 0] == grad[1, C - 1] == -(C - 1)


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 12), C=st.integers(1, 70), p=st.sampled_from([1, 2]),
       margin=st.floats(-1.0, 3.0), dtype=st.sampled_from(DTYPES),
       accumulate=st.sampled_from(ACCUMULATORS), weighted=st.booleans(),
       per_row_scale=st.booleans(), seed=st.integers(0, 2**16))
def test_random_problems_match_loop(N, C, p, margin, dtype, accumulate, weighted,
                                    per_row_scale, seed):
    scores, labels, class_weight, row_scale = make_problem(
        N, C, dtype, weighted=weighted, per_row_scale=per_row_scale, seed=seed)
    check(scores, labels, margin, p, class_weight, row_scale, accumulate)


@pytest.mark.parametrize("dtype, C, accumulate", [
    (np.float32, 10, "native"), (np.float32, 2048, "native"), (np.float32, 2049, "float64"),
    (np.float64, 100_000, "native")])
def test_cpu_rule_picks_the_accumulator(dtype, C, accumulate):
    # Short float32 rows sum in float32 (fast); long ones need float64 (see the test above).
    from fastconv.dispatch import cpu as cpu_rules

    algo = cpu_rules.choose("hinge", None, np.dtype(dtype), precision="fp32",
                            workspace_bytes=2**28, scores_shape=(3, C))
    assert algo.name == ALGORITHM
    assert algo.get("accumulate") == accumulate


def ieee_hinge(scores, labels, margin, p, class_weight, row_scale):
    """The rule for non-finite scores, evaluated with NumPy in float64: the reference's
    formulas (``max(0, m)`` keeps NaN, ``[m > 0]`` is false for NaN), then every row holding a
    NaN score gets a NaN loss and an all-NaN gradient row."""
    s = scores.astype(np.float64)
    N, C = s.shape
    rows = np.arange(N)
    with np.errstate(invalid="ignore", over="ignore"):
        m = s - s[rows, labels][:, None] + margin
        m[rows, labels] = 0.0
        h = np.maximum(m, 0.0)
        wy = class_weight.astype(np.float64)[labels]
        losses = wy * (h if p == 1 else h * h).sum(axis=1)
        d = (m > 0).astype(np.float64) if p == 1 else 2.0 * h
        d[rows, labels] = -d.sum(axis=1)
        scale = np.broadcast_to(row_scale.astype(np.float64), (N,))
        grad = d * (wy * scale)[:, None]
    bad = np.isnan(s).any(axis=1)
    losses[bad] = np.nan
    grad[bad] = np.nan
    return losses, grad


def assert_same_non_finite(got, want, dtype):
    """Same NaN and +-inf positions; the finite entries within the dtype's tolerance."""
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert rel_error(got[finite], want[finite]) < TOLERANCE[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ACCUMULATORS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("C", [1, 2, 11, 64, 150])     # short rows and the lane path
def test_nan_and_inf_scores_follow_the_rule(dtype, accumulate, p, C):
    N = 12
    scores, labels, class_weight, row_scale = make_problem(
        N, C, dtype, weighted=True, per_row_scale=True, seed=11)
    labels[:] = np.arange(N) % C
    other = (labels + 1) % C                      # a column that is not the label (if C > 1)
    last = np.full(N, C - 1)
    scores[0, labels[0]] = np.nan                 # NaN in the label column
    scores[1, other[1]] = np.nan                  # NaN elsewhere
    scores[2, last[2]] = np.nan                   # NaN in the last column (lane tail)
    scores[3, other[3]] = np.inf                  # +inf elsewhere: inf loss
    scores[4, labels[4]] = np.inf                 # +inf label: every margin -inf, loss 0
    scores[5, labels[5]] = -np.inf                # -inf label: every margin +inf
    scores[6, labels[6]] = np.inf                 # inf - inf margins: NaN loss
    scores[6, other[6]] = np.inf
    scores[7, other[7]] = -np.inf                 # -inf elsewhere: that margin -inf
    scores[8, :] = np.nan                         # a whole row of NaN
    scores[9, other[9]] = np.inf                  # +inf and NaN: NaN wins
    scores[9, last[9]] = np.nan
    want_losses, want_grad = ieee_hinge(scores, labels, 0.5, p, class_weight, row_scale)
    with np.errstate(invalid="ignore", over="ignore"):
        losses, grad = hinge_loss_rows(scores, labels, 0.5, p, class_weight, row_scale, True,
                                       _algo(accumulate))
        losses_only, _ = hinge_loss_rows(scores, labels, 0.5, p, class_weight, row_scale,
                                         False, _algo(accumulate))
    assert_same_non_finite(losses, want_losses, dtype)
    assert_same_non_finite(grad, want_grad, dtype)
    np.testing.assert_array_equal(losses_only, losses)
    for i in (0, 1, 2, 8, 9):                     # the rule itself, row by row
        assert np.isnan(losses[i]) and np.isnan(grad[i]).all()
    assert np.isfinite(losses[10:]).all() and np.isfinite(grad[10:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ACCUMULATORS)
@pytest.mark.parametrize("C", [10, 63, 64, 65, 200, 3001])
def test_loss_only_and_fused_agree_bitwise(dtype, accumulate, C):
    # Both passes form every term and sum them in the same fixed order (issue 8, item 1).
    scores, labels, class_weight, row_scale = make_problem(
        37, C, dtype, weighted=True, per_row_scale=True, seed=C)
    for p in (1, 2):
        args = (scores, labels, 0.7, p, class_weight, row_scale)
        fused, _ = hinge_loss_rows(*args, True, _algo(accumulate))
        alone, _ = hinge_loss_rows(*args, False, _algo(accumulate))
        np.testing.assert_array_equal(fused, alone)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
def test_short_rows_non_finite_across_blocks_and_tasks(dtype, p):
    """Short rows with non-finite scores spread over several blocks and parallel tasks (and a
    partial last block): the rule holds row by row, and a row whose only non-finite score is
    a -inf margin (taken through the scalar recompute) has the same bits as the same row with
    a large finite negative score instead (taken through the block loop)."""
    N = 2 * SHORT_BLOCK * SHORT_BLOCKS_PER_TASK + 37
    C = 10
    scores, labels, class_weight, row_scale = make_problem(
        N, C, dtype, weighted=True, per_row_scale=True, seed=5)
    rng = np.random.default_rng(6)
    rows = rng.choice(N, N // 30, replace=False)
    cols = rng.integers(0, C, rows.size)
    scores[rows, cols] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype), rows.size)
    want_losses, want_grad = ieee_hinge(scores, labels, 0.5, p, class_weight, row_scale)
    with np.errstate(invalid="ignore", over="ignore"):
        losses, grad = hinge_loss_rows(scores, labels, 0.5, p, class_weight, row_scale, True,
                                       _algo("native"))
    assert_same_non_finite(losses, want_losses, dtype)
    assert_same_non_finite(grad, want_grad, dtype)
    clean = np.isfinite(scores).all(axis=1)
    minus_inf = scores.copy()
    finite = scores.copy()
    for i in np.flatnonzero(clean)[::7]:           # -inf (recompute) against -1e30 (block loop)
        j = (labels[i] + 1) % C
        minus_inf[i, j] = -np.inf
        finite[i, j] = dtype(-1e30)
    got = hinge_loss_rows(minus_inf, labels, 0.5, p, class_weight, row_scale, True,
                          _algo("native"))
    ref = hinge_loss_rows(finite, labels, 0.5, p, class_weight, row_scale, True,
                          _algo("native"))
    for a, b in zip(got, ref):
        assert a[clean].tobytes() == b[clean].tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose8_moves_one_tile_exactly(dtype):
    """The register transpose of the short-row blocks: the 8 x 8 tile at any start and row
    steps lands transposed, and nothing else in the destination is written."""
    from fastconv.kernels.cpu_simd import transpose8

    @numba.njit
    def call(src, s0, ss, dst, d0, ds):
        transpose8(src, s0, ss, dst, d0, ds)

    rng = np.random.default_rng(8)
    src = rng.standard_normal(400).astype(dtype)
    for s0, ss, d0, ds in [(0, 8, 0, 8), (3, 10, 5, 12), (17, 41, 1, 9), (0, 10, 40, 32)]:
        dst = np.full(400, np.nan, dtype=dtype)
        call(src, s0, ss, dst, d0, ds)
        tile = np.array([[src[s0 + i * ss + c] for c in range(8)] for i in range(8)])
        got = np.array([[dst[d0 + c * ds + i] for i in range(8)] for c in range(8)])
        assert got.tobytes() == tile.T.tobytes()
        assert np.count_nonzero(~np.isnan(dst)) == 64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", ACCUMULATORS)
@pytest.mark.parametrize("C", [3, 8, 9, 10, 17, 63])
@pytest.mark.parametrize("N", [5, 8, 37, 2 * SHORT_BLOCK * SHORT_BLOCKS_PER_TASK + 13])
def test_short_rows_same_bits_as_row_loop(dtype, accumulate, C, N):
    """Short rows through the blocks (8 x 8 register transposes in and out where a block has
    8 rows and columns, overlapping tiles at its edges; plain loops otherwise): every loss and
    gradient entry has the bits of the scalar row loop ``_short_row_again``, which sums in
    column order, and every entry of the gradient is written."""
    from fastconv.kernels.cpu_hinge import _short_row_again

    scores, labels, class_weight, row_scale = make_problem(
        N, C, dtype, weighted=True, per_row_scale=True, seed=N + C)
    acc_zero = dtype(0) if accumulate == "native" else np.float64(0)
    for p in (1, 2):
        losses, grad = hinge_loss_rows(scores, labels, 0.3, p, class_weight, row_scale, True,
                                       _algo(accumulate))
        want_grad = np.full((N, C), np.nan, dtype=dtype)
        want_losses = np.empty(N, dtype=dtype)
        for i in range(N):
            y = labels[i]
            coef = row_scale[i] * class_weight[y] * dtype(p)
            loss, grad_sum, _ = _short_row_again(scores[i], y, dtype(0.3), p, coef, acc_zero,
                                                 want_grad[i], True)
            want_grad[i, y] = dtype(-grad_sum)
            acc = type(acc_zero)             # the kernel's product w[y] * loss, then rounded
            want_losses[i] = dtype(acc(class_weight[y]) * acc(loss))
        assert losses.tobytes() == want_losses.tobytes()
        assert grad.tobytes() == want_grad.tobytes()
