"""Public convolution ops: validate, dispatch, run. PyTorch semantics (cross-correlation, NCHW).

Shapes: input ``x (N, C, H, W)`` (or unbatched ``(C, H, W)``), ``weight (K, C/groups, R, S)``,
``bias (K,)``, output ``(N, K, P, Q)``. ``stride`` and ``dilation`` are an int or a pair;
``padding`` is an int, a pair, ``((top, bottom), (left, right))``, ``"valid"`` or ``"same"``.
NumPy arrays in give NumPy arrays out, CuPy in give CuPy out, in the input's dtype.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from . import _args, dispatch

Pair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[Any], str]


def conv2d(x: Any, weight: Any, bias: Any = None, stride: Pair = 1, padding: Padding = 0,
           dilation: Pair = 1, groups: int = 1, *, backend: Optional[str] = None) -> Any:
    """2-D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
    weight : array, shape (K, C/groups, R, S)
    bias : array, shape (K,), optional
    stride, padding, dilation, groups : see the module docstring.
    backend : {"reference", "cpu", "cuda"}, optional
        Overrides the automatic choice for this call.

    Returns
    -------
    array, shape (N, K, P, Q) (or (K, P, Q) for an unbatched input)
    """
    call = _args.conv_forward_args(x, weight, bias, stride, padding, dilation, groups)
    p = dispatch.plan("forward", call.kind, call.dtype, call.geom, backend=backend)
    a = call.arrays
    return call.unbatch(p.module.conv2d_forward(a["x"], a["weight"], a["bias"], call.geom, p.algo))


def conv2d_input_grad(input_shape: Sequence[int], weight: Any, grad_output: Any,
                      stride: Pair = 1, padding: Padding = 0, dilation: Pair = 1,
                      groups: int = 1, *, backend: Optional[str] = None) -> Any:
    """Gradient of a loss with respect to the conv input, as ``torch.nn.grad.conv2d_input``.

    Parameters
    ----------
    input_shape : (N, C, H, W) or (C, H, W)
    weight : array, shape (K, C/groups, R, S)
    grad_output : array, shape (N, K, P, Q) (or (K, P, Q))

    Returns
    -------
    array, shape ``input_shape``
    """
    call = _args.conv_input_grad_args(input_shape, weight, grad_output, stride, padding,
                                      dilation, groups)
    p = dispatch.plan("input_grad", call.kind, call.dtype, call.geom, backend=backend)
    a = call.arrays
    return call.unbatch(
        p.module.conv2d_input_grad(a["weight"], a["grad_output"], call.geom, p.algo))


def conv2d_weight_grad(x: Any, weight_shape: Sequence[int], grad_output: Any, stride: Pair = 1,
                       padding: Padding = 0, dilation: Pair = 1, groups: int = 1, *,
                       backend: Optional[str] = None) -> Any:
    """Gradient of a loss with respect to the weight, as ``torch.nn.grad.conv2d_weight``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
    weight_shape : (K, C/groups, R, S)
    grad_output : array, shape (N, K, P, Q) (or (K, P, Q))

    Returns
    -------
    array, shape (K, C/groups, R, S)
    """
    call = _args.conv_weight_grad_args(x, weight_shape, grad_output, stride, padding, dilation,
                                       groups)
    p = dispatch.plan("weight_grad", call.kind, call.dtype, call.geom, backend=backend)
    a = call.arrays
    return p.module.conv2d_weight_grad(a["x"], a["grad_output"], call.geom, p.algo)


def conv2d_bias_grad(grad_output: Any, *, backend: Optional[str] = None) -> Any:
    """Gradient of a loss with respect to the bias: ``grad_output`` summed over N, P, Q.

    Parameters
    ----------
    grad_output : array, shape (N, K, P, Q) or (K, P, Q)

    Returns
    -------
    array, shape (K,)
    """
    call = _args.conv_bias_grad_args(grad_output)
    p = dispatch.plan("bias_grad", call.kind, call.dtype, call.geom, backend=backend)
    return p.module.conv2d_bias_grad(call.arrays["grad_output"], p.algo)
