"""The multiclass hinge loss on every backend: the notes' worked example, options, reductions,
the fused path and finite differences."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv

import loops
from conftest import assert_close, to_backend, to_host

NOTES_SCORES = np.array([-3.0, 1.0, 0.5, -1.0, -0.4])  # lecture notes 7.1, y = 2


def _d(backend):
    return lambda a: to_backend(a, backend)


def test_lecture_notes_example(backend, dtype):
    """s = (-3, 1, 0.5, -1, -0.4), y = 2: margins (-2.5, 1.5, -, -0.5, 0.1), L = 1.5 + 0.1."""
    d = _d(backend)
    s = NOTES_SCORES.astype(dtype)
    loss = fastconv.hinge_loss(d(s[None]), d(np.array([2])), backend=backend)
    assert float(to_host(loss)) == pytest.approx(1.6, rel=1e-6)
    unbatched = fastconv.hinge_loss(d(s), 2, reduction="none", backend=backend)
    assert np.shape(to_host(unbatched)) == ()
    assert float(to_host(unbatched)) == pytest.approx(1.6, rel=1e-6)
    grad = to_host(fastconv.hinge_loss_grad(d(s), 2, backend=backend))
    np.testing.assert_allclose(grad, [0, 1, -2, 0, 1])


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_loops(backend, dtype, p, weighted, reduction):
    rng = np.random.default_rng(61)
    N, C = 37, 11
    scores = rng.standard_normal((N, C)).astype(dtype)
    labels = rng.integers(0, C, N)
    weight = rng.uniform(0.5, 2.0, C).astype(dtype) if weighted else None
    margin = 0.7
    losses, grad = loops.hinge_rows(scores.astype(np.float64), labels, margin, p,
                                    None if weight is None else weight.astype(np.float64))
    if reduction == "none":
        grad_loss = rng.standard_normal(N).astype(dtype)
        want_loss, want_grad = losses, grad * grad_loss[:, None]
    else:
        grad_loss = 0.5
        scale = grad_loss / (N if reduction == "mean" else 1)
        want_loss = losses.mean() if reduction == "mean" else losses.sum()
        want_grad = grad * scale
    d = _d(backend)
    kw = dict(margin=margin, p=p, weight=d(weight), reduction=reduction, backend=backend)
    loss = fastconv.hinge_loss(d(scores), d(labels), **kw)
    g = fastconv.hinge_loss_grad(d(scores), d(labels), grad_loss=d(grad_loss), **kw)
    fused_loss, fused_grad = fastconv.hinge_loss_and_grad(d(scores), d(labels),
                                                          grad_loss=d(grad_loss), **kw)
    assert to_host(loss).dtype == dtype and to_host(g).dtype == dtype
    assert_close(loss, want_loss, dtype)
    assert_close(g, want_grad, dtype)
    np.testing.assert_array_equal(to_host(fused_loss), to_host(loss))
    np.testing.assert_array_equal(to_host(fused_grad), to_host(g))


@pytest.mark.parametrize("p", [1, 2])
def test_finite_differences(backend, p):
    """Scores kept at least 0.05 away from every kink, so the loss is smooth around them."""
    rng = np.random.default_rng(71)
    N, C, margin = 6, 5, 1.0
    labels = rng.integers(0, C, N)
    scores = rng.standard_normal((N, C))
    for _ in range(100):
        m = scores - scores[np.arange(N), labels][:, None] + margin
        near = np.abs(m) < 0.05
        near[np.arange(N), labels] = False
        if not near.any():
            break
        scores[near] += 0.1
    weight = rng.uniform(0.5, 2.0, C)
    d = _d(backend)
    kw = dict(p=p, weight=d(weight), backend=backend)
    grad = to_host(fastconv.hinge_loss_grad(d(scores), d(labels), **kw))
    eps = 1e-6
    for i in range(N):
        for j in range(C):
            hi, lo = scores.copy(), scores.copy()
            hi[i, j] += eps
            lo[i, j] -= eps
            fd = (float(to_host(fastconv.hinge_loss(d(hi), d(labels), **kw)))
                  - float(to_host(fastconv.hinge_loss(d(lo), d(labels), **kw)))) / (2 * eps)
            assert grad[i, j] == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_kink_uses_zero_subgradient(backend):
    """At s_j - s_y + margin == 0 the term is inactive, as in PyTorch."""
    d = _d(backend)
    scores = np.array([[0.0, 1.0, 2.0]])  # y = 2: margins 0 - 2 + 2 = 0 (kink), 1
    g = to_host(fastconv.hinge_loss_grad(d(scores), d(np.array([2])), margin=2.0,
                                         backend=backend))
    np.testing.assert_array_equal(g, [[0.0, 1.0, -1.0]])


def test_single_class_has_zero_loss(backend):
    d = _d(backend)
    loss, g = fastconv.hinge_loss_and_grad(d(np.ones((4, 1))), d(np.zeros(4, dtype=np.int64)),
                                           backend=backend)
    assert float(to_host(loss)) == 0.0
    assert not np.any(to_host(g))


def test_non_contiguous_scores(backend):
    rng = np.random.default_rng(81)
    scores = rng.standard_normal((9, 14))[:, ::2]
    labels = rng.integers(0, 7, 9)
    d = _d(backend)
    got = fastconv.hinge_loss_and_grad(d(scores), d(labels), backend=backend)
    want = fastconv.hinge_loss_and_grad(np.ascontiguousarray(scores), labels,
                                        backend="reference")
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
