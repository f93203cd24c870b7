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

    ``y[n, k, p, q] = bias[k] + sum_{c, r, s} weight[k, c, r, s] *
    xpad[n, g*C/groups + c, p*sh + r*dh, q*sw + s*dw]`` with ``g`` the group of filter ``k``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
        float32 or float64, NumPy (runs on the ``cpu`` backend) or CuPy (``cuda``).
        Non-contiguous arrays are copied once. ``N = 0`` gives an empty output.
    weight : array, shape (K, C/groups, R, S)
    bias : array, shape (K,), optional
    stride : int or (sh, sw), default 1
    padding : int, (ph, pw), ((top, bottom), (left, right)), "valid" or "same", default 0
        Zero padding. ``"same"`` gives ``P = ceil(H / sh)`` for any stride, the odd extra row
        or column at the bottom/right (TensorFlow's rule; PyTorch's for stride 1).
    dilation : int or (dh, dw), default 1
        Spacing between kernel taps.
    groups : int, default 1
        ``C`` and ``K`` are split into ``groups`` independent convolutions; ``groups = C``
        is a depthwise convolution.
    backend : {"reference", "cpu", "cuda"}, optional
        Overrides the automatic choice for this call (see ``fastconv.set_backend``).

    Returns
    -------
    array, shape (N, K, P, Q) (or (K, P, Q) for an unbatched input)
        ``P = (H + top + bottom - dh*(R-1) - 1) // sh + 1``, likewise ``Q``; the input's
        dtype and array kind.

    Raises
    ------
    ValueError, TypeError
        Before any kernel runs, naming the argument: wrong ndim, channel or group mismatch,
        non-positive stride or dilation, negative padding, a kernel larger than the padded
        input, wrong bias shape, unsupported or mixed dtypes, NumPy mixed with CuPy.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.ones((8, 64, 56, 56), np.float32)
    >>> w = np.ones((128, 64, 3, 3), np.float32)
    >>> fastconv.conv2d(x, w, stride=2, padding="same").shape
    (8, 128, 28, 28)
    >>> print(fastconv.explain(fastconv.conv2d, x, w, padding=1))  # doctest: +SKIP
    """
    call = _args.conv_forward_args(x, weight, bias, stride, padding, dilation, groups)
    p = dispatch.plan("forward", call.kind, call.dtype, call.geom, backend=backend)
    a = call.arrays
    return call.unbatch(p.module.conv2d_forward(a["x"], a["weight"], a["bias"], call.geom, p.algo))


def conv2d_input_grad(input_shape: Sequence[int], weight: Any, grad_output: Any,
                      stride: Pair = 1, padding: Padding = 0, dilation: Pair = 1,
                      groups: int = 1, *, backend: Optional[str] = None) -> Any:
    """Gradient of a loss with respect to the conv input, as ``torch.nn.grad.conv2d_input``.

    A correlation of the stride-dilated ``grad_output`` with the 180-degree rotated kernel
    (a transposed convolution).

    Parameters
    ----------
    input_shape : (N, C, H, W) or (C, H, W)
    weight : array, shape (K, C/groups, R, S)
    grad_output : array, shape (N, K, P, Q) (or (K, P, Q))
    stride, padding, dilation, groups
        Those of the forward convolution (see ``conv2d``).

    Returns
    -------
    array, shape ``input_shape``

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> w = np.ones((4, 3, 3, 3), np.float32)
    >>> gy = np.ones((2, 4, 4, 4), np.float32)
    >>> fastconv.conv2d_input_grad((2, 3, 8, 8), w, gy, stride=2, padding=1).shape
    (2, 3, 8, 8)
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

    ``gw[k, c, r, s] = sum_{n, p, q} grad_output[n, k, p, q] *
    xpad[n, g*C/groups + c, p*sh + r*dh, q*sw + s*dw]``.

    Parameters
    ----------
    x : array, shape (N, C, H, W) or (C, H, W)
    weight_shape : (K, C/groups, R, S)
    grad_output : array, shape (N, K, P, Q) (or (K, P, Q))
    stride, padding, dilation, groups
        Those of the forward convolution (see ``conv2d``).

    Returns
    -------
    array, shape (K, C/groups, R, S)

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.ones((2, 3, 8, 8), np.float32)
    >>> gy = np.ones((2, 4, 8, 8), np.float32)
    >>> fastconv.conv2d_weight_grad(x, (4, 3, 3, 3), gy, padding=1).shape
    (4, 3, 3, 3)
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

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.conv2d_bias_grad(np.ones((2, 4, 3, 3), np.float32))
    array([18., 18., 18., 18.], dtype=float32)
    """
    call = _args.conv_bias_grad_args(grad_output)
    p = dispatch.plan("bias_grad", call.kind, call.dtype, call.geom, backend=backend)
    return p.module.conv2d_bias_grad(call.arrays["grad_output"], p.algo)
