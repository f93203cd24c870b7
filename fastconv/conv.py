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


# ---------------------------------------------------------------------------------------------
# Transposed convolution: the input gradient of a convolution, as an op of its own
# ---------------------------------------------------------------------------------------------
def _crop_or_pad(a: Any, top: int, left: int, hw: Sequence[int]) -> Any:
    """``b[..., i, j] = a[..., i + top, j + left]`` where that lies inside ``a``, else 0;
    ``b`` has shape ``a.shape[:-2] + hw``."""
    xp = _args.array_module(_args.array_kind(a))
    out = xp.zeros(tuple(a.shape[:-2]) + tuple(hw), dtype=a.dtype)
    H, W = a.shape[-2:]
    i0, i1 = max(top, 0), min(top + hw[0], H)
    j0, j1 = max(left, 0), min(left + hw[1], W)
    if i1 > i0 and j1 > j0:
        out[..., i0 - top:i1 - top, j0 - left:j1 - left] = a[..., i0:i1, j0:j1]
    return out


def _transpose_setup(x_shape: Sequence[int], w_shape: Sequence[int], grad_output: Any,
                     stride, padding, output_padding, groups, dilation):
    """The geometry of a transposed conv and, when given, ``grad_output`` checked against it
    and batched; also the padding spec of the underlying convolution."""
    tg = _args.conv_transpose_geometry(x_shape, w_shape, stride, padding, output_padding,
                                       dilation, groups)
    pt, pb, pl, pr = tg.padding
    conv_padding = ((pt, pb), (pl, pr)) if tg.direct else 0
    if grad_output is not None:
        want = (x_shape[0], tg.out_channels) + tg.out_hw
        got = tuple(grad_output.shape)
        if (got if len(got) == 4 else (1,) + got) != want:
            raise ValueError(f"grad_output has shape {got}, but this transposed convolution's "
                             f"output is {want} (N, C_out, H_out, W_out)")
        grad_output = grad_output if grad_output.ndim == 4 else grad_output[None]
        if not tg.direct:  # the gradient of the crop: back onto every reachable pixel
            grad_output = _crop_or_pad(grad_output, -pt, -pl, tg.full_hw)
    return tg, conv_padding, grad_output


def conv_transpose2d(x: Any, weight: Any, bias: Any = None, stride: Pair = 1,
                     padding: Any = 0, output_padding: Pair = 0, groups: int = 1,
                     dilation: Pair = 1, *, backend: Optional[str] = None) -> Any:
    """Transposed 2-D convolution, as ``torch.nn.functional.conv_transpose2d`` (same argument
    order: ``groups`` before ``dilation``).

    It is the input gradient of the convolution that maps its output back to ``x``: computed by
    ``conv2d_input_grad`` (plus the bias).

    Parameters
    ----------
    x : array, shape (N, C_in, H, W) or (C_in, H, W)
    weight : array, shape (C_in, C_out/groups, R, S)
    bias : array, shape (C_out,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int) or ((top, bottom), (left, right))
        Removed from the output's borders.
    output_padding : int or (int, int)
        Extra rows/columns at the bottom/right, each smaller than the stride or the dilation.
    groups : int
    backend : {"reference", "cpu", "cuda"}, optional

    Returns
    -------
    array, shape (N, C_out, H_out, W_out) (or unbatched), with
    ``H_out = (H - 1) * sh - top - bottom + dh * (R - 1) + output_padding_h + 1``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.ones((2, 8, 14, 14), np.float32)
    >>> w = np.ones((8, 3, 3, 3), np.float32)
    >>> fastconv.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).shape
    (2, 3, 28, 28)
    """
    kind = _args.common_kind({"x": x, "weight": weight, "bias": bias})
    _args._check_ndim(x, "x", (3, 4), "(N, C_in, H, W) or (C_in, H, W)")
    _args._check_ndim(weight, "weight", (4,), "(C_in, C_out/groups, R, S)")
    _args._float_dtype({"x": x, "weight": weight, "bias": bias})
    x4 = x if x.ndim == 4 else x[None]
    tg, conv_padding, _ = _transpose_setup(x4.shape, weight.shape, None, stride, padding,
                                           output_padding, groups, dilation)
    if bias is not None and tuple(bias.shape) != (tg.out_channels,):
        raise ValueError(f"bias must have shape ({tg.out_channels},), got {tuple(bias.shape)}")
    hw = tg.out_hw if tg.direct else tg.full_hw
    y = conv2d_input_grad((x4.shape[0], tg.out_channels) + hw, weight, x4, tg.stride,
                          conv_padding, tg.dilation, tg.groups, backend=backend)
    if not tg.direct:
        y = _crop_or_pad(y, tg.padding[0], tg.padding[2], tg.out_hw)
    if bias is not None:
        y += _args.array_module(kind).asarray(bias)[None, :, None, None]
    return y if x.ndim == 4 else y[0]


def conv_transpose2d_input_grad(input_shape: Sequence[int], weight: Any, grad_output: Any,
                                stride: Pair = 1, padding: Any = 0, output_padding: Pair = 0,
                                groups: int = 1, dilation: Pair = 1, *,
                                backend: Optional[str] = None) -> Any:
    """Gradient of a loss with respect to the input of ``conv_transpose2d``: a convolution of
    ``grad_output`` by ``weight``.

    Parameters
    ----------
    input_shape : (N, C_in, H, W) or (C_in, H, W)
    weight : array, shape (C_in, C_out/groups, R, S)
    grad_output : array, shape (N, C_out, H_out, W_out) (or unbatched)

    Returns
    -------
    array, shape ``input_shape``

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> w = np.ones((8, 3, 3, 3), np.float32)
    >>> gy = np.ones((2, 3, 28, 28), np.float32)
    >>> fastconv.conv_transpose2d_input_grad((2, 8, 14, 14), w, gy, stride=2, padding=1,
    ...                                      output_padding=1).shape
    (2, 8, 14, 14)
    """
    shape, batched = _args._batched_shape(input_shape, "input_shape")
    _args._check_ndim(weight, "weight", (4,), "(C_in, C_out/groups, R, S)")
    _args._check_ndim(grad_output, "grad_output", (4,) if batched else (3,),
                      "(N, C_out, H_out, W_out)" if batched else "unbatched (C_out, H_out, W_out)")
    tg, conv_padding, g = _transpose_setup(shape, weight.shape, grad_output, stride, padding,
                                           output_padding, groups, dilation)
    gx = conv2d(g, weight, None, tg.stride, conv_padding, tg.dilation, tg.groups,
                backend=backend)
    return gx if batched else gx[0]


def conv_transpose2d_weight_grad(x: Any, weight_shape: Sequence[int], grad_output: Any,
                                 stride: Pair = 1, padding: Any = 0, output_padding: Pair = 0,
                                 groups: int = 1, dilation: Pair = 1, *,
                                 backend: Optional[str] = None) -> Any:
    """Gradient of a loss with respect to the weight of ``conv_transpose2d``.

    Parameters
    ----------
    x : array, shape (N, C_in, H, W) or (C_in, H, W)
    weight_shape : (C_in, C_out/groups, R, S)
    grad_output : array, shape (N, C_out, H_out, W_out) (or unbatched)

    Returns
    -------
    array, shape (C_in, C_out/groups, R, S). The bias gradient is ``conv2d_bias_grad``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.ones((2, 8, 14, 14), np.float32)
    >>> gy = np.ones((2, 3, 28, 28), np.float32)
    >>> fastconv.conv_transpose2d_weight_grad(x, (8, 3, 3, 3), gy, stride=2, padding=1,
    ...                                       output_padding=1).shape
    (8, 3, 3, 3)
    """
    _args._check_ndim(x, "x", (3, 4), "(N, C_in, H, W) or (C_in, H, W)")
    _args._check_ndim(grad_output, "grad_output", (x.ndim,),
                      "(N, C_out, H_out, W_out)" if x.ndim == 4 else "(C_out, H_out, W_out)")
    if not isinstance(weight_shape, (tuple, list)) or len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be (C_in, C_out/groups, R, S), "
                         f"got {weight_shape!r}")
    w_shape = tuple(_args._int(v, "weight_shape") for v in weight_shape)
    x4 = x if x.ndim == 4 else x[None]
    tg, conv_padding, g = _transpose_setup(x4.shape, w_shape, grad_output, stride, padding,
                                           output_padding, groups, dilation)
    return conv2d_weight_grad(g, w_shape, x4, tg.stride, conv_padding, tg.dilation, tg.groups,
                              backend=backend)
