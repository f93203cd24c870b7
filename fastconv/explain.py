"""``fastconv.explain``: which backend and algorithm a call would use, and why."""
from __future__ import annotations

from typing import Any, Callable, Union

from . import _args, conv, dispatch, hinge


def _conv_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return "forward", _args.conv_forward_args(x, weight, bias, stride, padding, dilation, groups)


def _conv_input(input_shape, weight, grad_output, stride=1, padding=0, dilation=1, groups=1):
    return "input_grad", _args.conv_input_grad_args(input_shape, weight, grad_output, stride,
                                                    padding, dilation, groups)


def _conv_weight(x, weight_shape, grad_output, stride=1, padding=0, dilation=1, groups=1):
    return "weight_grad", _args.conv_weight_grad_args(x, weight_shape, grad_output, stride,
                                                      padding, dilation, groups)


def _conv_bias(grad_output):
    return "bias_grad", _args.conv_bias_grad_args(grad_output)


def _hinge(scores, labels, margin=1.0, p=1, weight=None, reduction="mean", grad_loss=1.0):
    return "hinge", _args.hinge_args(scores, labels, margin, p, weight, reduction, grad_loss)


_PARSERS: dict[str, Callable] = {
    "conv2d": _conv_forward,
    "conv2d_input_grad": _conv_input,
    "conv2d_weight_grad": _conv_weight,
    "conv2d_bias_grad": _conv_bias,
    "hinge_loss": _hinge,
    "hinge_loss_grad": _hinge,
    "hinge_loss_and_grad": _hinge,
}
_FUNCTIONS = {conv.conv2d: "conv2d", conv.conv2d_input_grad: "conv2d_input_grad",
              conv.conv2d_weight_grad: "conv2d_weight_grad",
              conv.conv2d_bias_grad: "conv2d_bias_grad", hinge.hinge_loss: "hinge_loss",
              hinge.hinge_loss_grad: "hinge_loss_grad",
              hinge.hinge_loss_and_grad: "hinge_loss_and_grad"}


def explain(op: Union[str, Callable], *args: Any, backend: Any = None,
            **kwargs: Any) -> dispatch.Plan:
    """Say which backend and algorithm ``op(*args, **kwargs)`` would run, and why.

    Nothing is computed: the arguments are validated exactly as the op would, then the dispatch
    rules are asked.

    Parameters
    ----------
    op : a public op (``fastconv.conv2d``, ...) or its name (``"conv2d"``, ...)
    *args, **kwargs : the arguments the op would get, ``backend=`` included.

    Returns
    -------
    dispatch.Plan
        ``.backend``, ``.backend_reason``, ``.algo`` (``.name``, ``.params``, ``.reason``);
        ``str(plan)`` reads as one sentence.

    Examples
    --------
    >>> print(fastconv.explain("conv2d", x, w, stride=2))  # doctest: +SKIP
    """
    name = _FUNCTIONS.get(op, op) if callable(op) else op
    if not isinstance(name, str) or name not in _PARSERS:   # an array passed as the op, say
        raise ValueError(f"explain knows the ops {sorted(_PARSERS)}, got {op!r}")
    kind, call = _PARSERS[name](*args, **kwargs)
    geom = getattr(call, "geom", None)
    shape = tuple(call.scores.shape) if kind == "hinge" else None
    return dispatch.plan(kind, call.kind, call.dtype, geom, backend=backend, scores_shape=shape)
