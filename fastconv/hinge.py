"""Public multiclass hinge (SVM) loss ops.

Per sample ``l_i = sum_{j != y_i} w[y_i] * max(0, s_ij - s_{i y_i} + margin) ** p``; the loss is
``mean`` (divided by N: the multiclass SVM loss), ``sum`` or ``none`` (shape ``(N,)``).
PyTorch's ``MultiMarginLoss`` is this divided by the number of classes C.
Shapes: ``scores (N, C)`` (or unbatched ``(C,)``), ``labels (N,)`` integers in ``[0, C)``
(or one int / a 0-d array), ``weight (C,)``.
"""
from __future__ import annotations

from typing import Any, Optional

from . import _args, dispatch


def _run(scores, labels, margin, p, weight, reduction, grad_loss, want_grad, backend):
    call = _args.hinge_args(scores, labels, margin, p, weight, reduction, grad_loss)
    plan = dispatch.plan("hinge", call.kind, call.dtype, backend=backend,
                         scores_shape=tuple(call.scores.shape))
    losses, grad = plan.module.hinge_loss_rows(call.scores, call.labels, call.margin, call.p,
                                               call.class_weight, call.row_scale, want_grad,
                                               plan.algo)
    return _reduce(call, losses), (_shape_grad(call, grad) if want_grad else None)


def _reduce(call: _args.HingeCall, losses: Any) -> Any:
    if call.reduction == "none":
        return losses if call.batched else losses[0]
    total = losses.sum(dtype=call.dtype)
    return total / losses.shape[0] if call.reduction == "mean" else total


def _shape_grad(call: _args.HingeCall, grad: Any) -> Any:
    return grad if call.batched else grad[0]


def hinge_loss(scores: Any, labels: Any, margin: float = 1.0, p: int = 1, weight: Any = None,
               reduction: str = "mean", *, backend: Optional[str] = None) -> Any:
    """Multiclass hinge loss.

    Parameters
    ----------
    scores : array, shape (N, C) or (C,)
    labels : integer array, shape (N,) (or an int for unbatched scores), values in [0, C)
    margin : float
    p : {1, 2}
    weight : array, shape (C,), optional
        Per-class weight, applied through the true class: ``w[y_i]``.
    reduction : {"mean", "sum", "none"}
    backend : {"reference", "cpu", "cuda"}, optional

    Returns
    -------
    scalar (0-d) for "mean"/"sum", array (N,) for "none".
        A row with a NaN score has a NaN loss (and a NaN gradient row); PyTorch's
        ``MultiMarginLoss`` lets a NaN in a wrong class's score drop out of the gradient.

    Examples
    --------
    The lecture notes' example: scores of one sample, true class 2.

    >>> import numpy as np, fastconv
    >>> s = np.array([-3.0, 1.0, 0.5, -1.0, -0.4])
    >>> round(float(fastconv.hinge_loss(s, 2)), 6)
    1.6
    """
    return _run(scores, labels, margin, p, weight, reduction, 1.0, False, backend)[0]


def hinge_loss_grad(scores: Any, labels: Any, margin: float = 1.0, p: int = 1,
                    weight: Any = None, reduction: str = "mean", grad_loss: Any = 1.0, *,
                    backend: Optional[str] = None) -> Any:
    """Gradient of ``hinge_loss`` with respect to ``scores``, times ``grad_loss``.

    ``grad_loss`` is the upstream gradient: a scalar, or shape (N,) for ``reduction="none"``.
    Returns an array shaped like ``scores``. At a kink the subgradient 0 is used.
    """
    return _run(scores, labels, margin, p, weight, reduction, grad_loss, True, backend)[1]


def hinge_loss_and_grad(scores: Any, labels: Any, margin: float = 1.0, p: int = 1,
                        weight: Any = None, reduction: str = "mean", grad_loss: Any = 1.0, *,
                        backend: Optional[str] = None) -> tuple[Any, Any]:
    """The loss and its gradient from one fused pass over the scores: ``(loss, grad)``.

    Same arguments as ``hinge_loss_grad``; layers use this so that the backward pass costs
    nothing beyond the forward.
    """
    return _run(scores, labels, margin, p, weight, reduction, grad_loss, True, backend)
