"""PyTorch adapter: fastconv's kernels as PyTorch custom ops, behind drop-ins for
``torch.nn.Conv2d``, ``ConvTranspose2d`` and ``MultiMarginLoss``.

Import it explicitly (``import fastconv.torch``); ``import fastconv`` never imports PyTorch.

The ops (``torch.library.custom_op``, namespace ``fastconv``), each with a fake (meta)
implementation for ``torch.compile``/``torch.export`` and an autograd formula:

==========================================  ==================================================
``fastconv::conv2d``                        ``(input, weight, bias, stride, padding, dilation,
                                            groups)``; ``padding`` is ``[top, bottom, left,
                                            right]``, the input batched ``(N, C, H, W)``
``fastconv::conv2d_input_grad``             ``(input_size, weight, grad_output, ...)``
``fastconv::conv2d_weight_grad``            ``(input, weight_size, grad_output, ...)``
``fastconv::multi_margin_loss``             ``(input (N, C), target (N,), p, margin, weight,
                                            reduction)``: PyTorch's loss (divided by C)
``fastconv::multi_margin_loss_grad``        ``(grad_output, input, target, p, margin, weight,
                                            reduction)``
==========================================  ==================================================

Every backward is built from these ops, so it is differentiable again (double backward,
gradient penalties, ``gradgradcheck``): the derivatives of the input gradient are a forward
convolution and a weight gradient, those of the weight gradient a forward convolution and an
input gradient; the hinge loss's second derivative is 0 for ``p=1`` and a masked difference
for ``p=2``. A hinge ``weight`` that requires grad raises (PyTorch's loss has no weight
gradient either).

The Python functions (``conv2d``, ``conv_transpose2d``, ``multi_margin_loss``) accept what
PyTorch's do and normalise it before the ops: unbatched input, every padding spec (including
``"same"`` with a stride, and per-side padding), ``N = 0``, channels_last (the output is
channels_last when the input or the weight is), float16/bfloat16 (computed in float32,
returned in the input's dtype: native half kernels are later work) and autocast (as
``torch.nn.functional.conv2d``: the conv runs in autocast's dtype, the loss in float32).
They are leaves for ``torch.fx.symbolic_trace``.

Tensors cross over without copies: CPU tensors as NumPy views (``Tensor.numpy()`` /
``torch.from_numpy``), so the Numba backend runs them; CUDA tensors through DLPack as CuPy
arrays, with CuPy's current stream set to PyTorch's current stream for the duration of the
call, so the kernels are ordered with the surrounding PyTorch work and no synchronisation is
needed.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fastconv.torch needs PyTorch, which is not installed: `pip install torch` (or "
        "`pip install 'fastconv[torch]'`); the rest of fastconv works without it") from exc
import torch.nn.functional as F
from torch import Tensor

from . import _args
from .conv import conv2d as _np_conv2d
from .conv import conv2d_input_grad as _np_conv2d_input_grad
from .conv import conv2d_weight_grad as _np_conv2d_weight_grad
from .hinge import hinge_loss as _np_hinge_loss
from .hinge import hinge_loss_grad as _np_hinge_loss_grad

__all__ = ["Conv2d", "conv2d", "ConvTranspose2d", "conv_transpose2d", "MultiMarginLoss",
           "multi_margin_loss", "replace_conv2d"]

Pair = Union[int, Sequence[int]]
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Zero-copy tensor <-> array bridge
# ---------------------------------------------------------------------------------------------
class _Bridge(contextlib.ExitStack):
    """Converts tensors on one device to arrays of fastconv's kinds and back, without copies.

    Entered around one op: for a CUDA device it makes that device current for CuPy and wraps
    PyTorch's current stream as CuPy's current stream, so both libraries order their work on
    the same stream (DLPack's exchange then needs no event either way).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.cuda = device.type == "cuda"
        if device.type not in ("cpu", "cuda"):
            raise TypeError(f"fastconv runs CPU and CUDA tensors, not {device.type!r} ones")

    def __enter__(self) -> "_Bridge":
        super().__enter__()
        if self.cuda:
            import cupy  # only CUDA tensors need it

            index = self.device.index
            stream = torch.cuda.current_stream(self.device)
            self.enter_context(cupy.cuda.Device(index))
            self.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, index))
        return self

    def array(self, t: Optional[Tensor], name: str) -> Any:
        """A NumPy (CPU) or CuPy (CUDA) view of ``t``; ``None`` stays ``None``."""
        if t is None:
            return None
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, expected {self.device} like the input")
        t = t.detach()
        if self.cuda:
            import cupy

            return cupy.from_dlpack(t)
        return t.numpy()

    def tensor(self, a: Any) -> Tensor:
        """A contiguous tensor holding the NumPy or CuPy array ``a`` (a view when ``a`` is
        C-contiguous, which the fake implementations promise; a NumPy scalar becomes 0-d)."""
        if self.cuda:
            return torch.from_dlpack(a).contiguous()
        a = np.asarray(a)
        if not a.flags.c_contiguous:  # also negative strides, which from_numpy rejects
            a = np.ascontiguousarray(a)  # (ndim >= 1 here: 0-d arrays are contiguous)
        return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes shared by the ops and their fake implementations
# ---------------------------------------------------------------------------------------------
def _spec(padding: Sequence[int]) -> tuple:
    """The op's ``[top, bottom, left, right]`` as fastconv's per-side padding spec."""
    t, b, l, r = padding
    return ((t, b), (l, r))


def _is_concrete(*shapes: Sequence[Any]) -> bool:
    return all(type(v) is int for s in shapes for v in s)


def _conv_output_shape(x_shape, w_shape, stride, padding, dilation, groups) -> tuple:
    """``(N, K, P, Q)``, validated by fastconv's own rules when the shapes are concrete
    (an empty batch is validated as a batch of one)."""
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    if _is_concrete(x_shape, w_shape):
        g = _args.conv_geometry((max(int(N), 1), C, H, W), tuple(w_shape), tuple(stride),
                                _spec(padding), tuple(dilation), groups)
        return (N, K, g.P, g.Q)
    P = (H + padding[0] + padding[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + padding[2] + padding[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return (N, K, P, Q)


def _check_grad_output(grad_output: Tensor, want: Sequence[Any]) -> None:
    if tuple(grad_output.shape) != tuple(want):
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)}, but this "
                         f"convolution's output is {tuple(want)} (N, K, P, Q)")


def _check_dtypes(**named: Optional[Tensor]) -> torch.dtype:
    """The one float32/float64 dtype of the given tensors (the ops' contract)."""
    dtypes = {n: t.dtype for n, t in named.items() if t is not None}
    for name, dt in dtypes.items():
        if dt not in (torch.float32, torch.float64):
            raise TypeError(f"{name} has dtype {dt}; fastconv's ops take float32 and float64 "
                            f"(fastconv.torch.conv2d computes float16/bfloat16 in float32)")
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"arguments must share one dtype, got {desc}")
    return next(iter(dtypes.values()))


# ---------------------------------------------------------------------------------------------
# Convolution ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastconv::conv2d", mutates_args=())
def _conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """y (N, K, P, Q) = conv2d(input (N, C, H, W), weight (K, C/groups, R, S)) + bias (K,)."""
    dtype = _check_dtypes(input=input, weight=weight, bias=bias)
    shape = _conv_output_shape(input.shape, weight.shape, stride, padding, dilation, groups)
    if input.shape[0] == 0:
        return torch.empty(shape, dtype=dtype, device=input.device)
    with _Bridge(input.device) as bridge:
        y = _np_conv2d(bridge.array(input, "input"), bridge.array(weight, "weight"),
                       bridge.array(bias, "bias"), tuple(stride), _spec(padding),
                       tuple(dilation), groups)
        return bridge.tensor(y)


@_conv2d_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups):
    dtype = _check_dtypes(input=input, weight=weight, bias=bias)
    shape = _conv_output_shape(input.shape, weight.shape, stride, padding, dilation, groups)
    return input.new_empty(shape, dtype=dtype)


@torch.library.custom_op("fastconv::conv2d_input_grad", mutates_args=())
def _conv2d_input_grad_op(input_size: Sequence[int], weight: Tensor, grad_output: Tensor,
                          stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], groups: int) -> Tensor:
    """grad_input (N, C, H, W) of ``fastconv::conv2d`` from grad_output (N, K, P, Q)."""
    dtype = _check_dtypes(weight=weight, grad_output=grad_output)
    _check_grad_output(grad_output, _conv_output_shape(input_size, weight.shape, stride,
                                                       padding, dilation, groups))
    if input_size[0] == 0:
        return torch.zeros(tuple(input_size), dtype=dtype, device=weight.device)
    with _Bridge(weight.device) as bridge:
        gx = _np_conv2d_input_grad(tuple(input_size), bridge.array(weight, "weight"),
                                   bridge.array(grad_output, "grad_output"), tuple(stride),
                                   _spec(padding), tuple(dilation), groups)
        return bridge.tensor(gx)


@_conv2d_input_grad_op.register_fake
def _(input_size, weight, grad_output, stride, padding, dilation, groups):
    dtype = _check_dtypes(weight=weight, grad_output=grad_output)
    _check_grad_output(grad_output, _conv_output_shape(input_size, weight.shape, stride,
                                                       padding, dilation, groups))
    return weight.new_empty(tuple(input_size), dtype=dtype)


@torch.library.custom_op("fastconv::conv2d_weight_grad", mutates_args=())
def _conv2d_weight_grad_op(input: Tensor, weight_size: Sequence[int], grad_output: Tensor,
                           stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int], groups: int) -> Tensor:
    """grad_weight (K, C/groups, R, S) of ``fastconv::conv2d`` (zeros for an empty batch)."""
    dtype = _check_dtypes(input=input, grad_output=grad_output)
    _check_grad_output(grad_output, _conv_output_shape(input.shape, weight_size, stride,
                                                       padding, dilation, groups))
    if input.shape[0] == 0:
        return torch.zeros(tuple(weight_size), dtype=dtype, device=input.device)
    with _Bridge(input.device) as bridge:
        gw = _np_conv2d_weight_grad(bridge.array(input, "input"), tuple(weight_size),
                                    bridge.array(grad_output, "grad_output"), tuple(stride),
                                    _spec(padding), tuple(dilation), groups)
        return bridge.tensor(gw)


@_conv2d_weight_grad_op.register_fake
def _(input, weight_size, grad_output, stride, padding, dilation, groups):
    dtype = _check_dtypes(input=input, grad_output=grad_output)
    _check_grad_output(grad_output, _conv_output_shape(input.shape, weight_size, stride,
                                                       padding, dilation, groups))
    return input.new_empty(tuple(weight_size), dtype=dtype)


_ops = torch.ops.fastconv


def _conv_setup(ctx, inputs, output) -> None:
    x, w, b, *conv = inputs
    ctx.save_for_backward(x, w)
    ctx.conv, ctx.has_bias = conv, b is not None


def _conv_backward(ctx, grad):
    x, w = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _ops.conv2d_input_grad(list(x.shape), w, grad, *ctx.conv)
    if ctx.needs_input_grad[1]:
        gw = _ops.conv2d_weight_grad(x, list(w.shape), grad, *ctx.conv)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum((0, 2, 3))
    return gx, gw, gb, None, None, None, None


def _input_grad_setup(ctx, inputs, output) -> None:
    _, w, gy, *conv = inputs
    ctx.save_for_backward(w, gy)
    ctx.conv = conv


def _input_grad_backward(ctx, grad):
    # gx = A(w)^T gy, linear in both: <gx, v> = <gy, conv2d(v, w)>.
    w, gy = ctx.saved_tensors
    gw = ggy = None
    if ctx.needs_input_grad[1]:
        gw = _ops.conv2d_weight_grad(grad, list(w.shape), gy, *ctx.conv)
    if ctx.needs_input_grad[2]:
        ggy = _ops.conv2d(grad, w, None, *ctx.conv)
    return None, gw, ggy, None, None, None, None


def _weight_grad_setup(ctx, inputs, output) -> None:
    x, _, gy, *conv = inputs
    ctx.save_for_backward(x, gy)
    ctx.conv = conv


def _weight_grad_backward(ctx, grad):
    # gw = B(x)^T gy: <gw, v> = <gy, conv2d(x, v)>.
    x, gy = ctx.saved_tensors
    gx = ggy = None
    if ctx.needs_input_grad[0]:
        gx = _ops.conv2d_input_grad(list(x.shape), grad, gy, *ctx.conv)
    if ctx.needs_input_grad[2]:
        ggy = _ops.conv2d(x, grad, None, *ctx.conv)
    return gx, None, ggy, None, None, None, None


_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)
_conv2d_input_grad_op.register_autograd(_input_grad_backward, setup_context=_input_grad_setup)
_conv2d_weight_grad_op.register_autograd(_weight_grad_backward,
                                         setup_context=_weight_grad_setup)


# ---------------------------------------------------------------------------------------------
# What the Python functions do before the ops: padding specs, dtypes, layouts
# ---------------------------------------------------------------------------------------------
def _pads(padding: Any, hw: Sequence[Any], rs: Sequence[int], stride: tuple[int, int],
          dilation: tuple[int, int]) -> list:
    """``[top, bottom, left, right]`` from any padding spec (``hw`` may be symbolic sizes
    under ``torch.compile``; only ``"same"`` reads them)."""
    return list(_args.normalize_padding(padding, tuple(hw), tuple(rs), stride, dilation))


def _autocast(device_type: str, tensors: Sequence[Optional[Tensor]],
              to: Optional[torch.dtype]) -> list:
    """Under autocast for ``device_type``, cast floating tensors other than float64 to ``to``
    (autocast's own dtype when ``to`` is None), as autocast does for PyTorch's ops."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return list(tensors)
    to = torch.get_autocast_dtype(device_type) if to is None else to
    return [t.to(to) if t is not None and t.is_floating_point() and t.dtype != torch.float64
            else t for t in tensors]


def _compute_dtype(tensors: Sequence[Optional[Tensor]]) -> tuple[list, torch.dtype]:
    """float16/bfloat16 tensors go to float32 (all of one dtype, as PyTorch requires);
    returns the tensors and the dtype the result is returned in."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"input, weight and bias must share one dtype, got "
                        f"{sorted(str(d) for d in dtypes)}")
    dtype = dtypes.pop()
    if dtype in _HALF:
        tensors = [None if t is None else t.float() for t in tensors]
    return list(tensors), dtype


def _layout_like(out: Tensor, *inputs: Tensor) -> Tensor:
    """channels_last out when an input is channels_last (and not also plain contiguous), as
    PyTorch's convolutions do."""
    for t in inputs:
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                memory_format=torch.channels_last):
            return out.contiguous(memory_format=torch.channels_last)
    return out


def _batched(input: Tensor, name: str = "input") -> tuple[Tensor, bool]:
    if input.dim() not in (3, 4):
        raise ValueError(f"{name} must be (N, C, H, W) or (C, H, W), "
                         f"got shape {tuple(input.shape)}")
    return (input, True) if input.dim() == 4 else (input.unsqueeze(0), False)


# ---------------------------------------------------------------------------------------------
# Convolution: functional and module
# ---------------------------------------------------------------------------------------------
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Pair = 1,
           padding: Any = 0, dilation: Pair = 1, groups: int = 1) -> Tensor:
    """``torch.nn.functional.conv2d`` computed by fastconv, differentiable to any order.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W) or unbatched (C, H, W); N may be 0
    weight : Tensor, shape (K, C/groups, R, S)
    bias : Tensor, shape (K,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int), ((top, bottom), (left, right)), "valid" or "same"
        ``"same"`` also works with a stride (output ``ceil(H / stride)``, extra pad at the
        bottom/right), where PyTorch raises.
    groups : int

    Returns
    -------
    Tensor, shape (N, K, P, Q) (or (K, P, Q)), on the input's device, in its dtype
    (float16/bfloat16 are computed in float32); channels_last when the input or the weight
    is. Under autocast the inputs are cast as for ``torch.nn.functional.conv2d``.
    """
    x, batched = _batched(input)
    if weight.dim() != 4:
        raise ValueError(f"weight must be (K, C/groups, R, S), got shape {tuple(weight.shape)}")
    x, weight, bias = _autocast(x.device.type, (x, weight, bias), None)
    (x, w, b), dtype = _compute_dtype((x, weight, bias))
    st, dl = _args.pair(stride, "stride"), _args.pair(dilation, "dilation")
    pads = _pads(padding, x.shape[-2:], w.shape[-2:], st, dl)
    y = _ops.conv2d(x, w, b, list(st), pads, list(dl), _args._int(groups, "groups"))
    y = _layout_like(y.to(dtype), input, weight)
    return y if batched else y.squeeze(0)


def _torch_padding(padding: Any, stride: Any) -> tuple[Any, bool]:
    """The padding to hand ``torch.nn.Conv2d.__init__`` (which refuses per-side padding and
    ``"same"`` with a stride), and whether fastconv keeps its own spec."""
    nested = isinstance(padding, (tuple, list)) and any(
        isinstance(p, (tuple, list)) for p in padding)
    strided_same = isinstance(padding, str) and padding == "same" and \
        _args.pair(stride, "stride") != (1, 1)
    return (0, True) if nested or strided_same else (padding, False)


def _mode_padding(module: torch.nn.Conv2d, hw: Sequence[int]) -> tuple:
    """``(left, right, top, bottom)`` for ``F.pad`` from the module's padding spec."""
    top, bottom, left, right = _pads(module.padding, hw, module.kernel_size, module.stride,
                                     module.dilation)
    return (left, right, top, bottom)


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward and backward run fastconv's ops.

    Constructor, parameters (``weight (K, C/groups, R, S)``, ``bias (K,)``), initialisation and
    ``state_dict`` are those of ``torch.nn.Conv2d``, which it subclasses; ``padding`` accepts
    everything ``fastconv.torch.conv2d`` does (also ``"same"`` with a stride and
    ``((top, bottom), (left, right))``). Padding modes other than ``"zeros"`` pad with
    ``torch.nn.functional.pad`` first, as ``torch.nn.Conv2d`` itself does. Its repr reads
    ``fastconv.Conv2d(...)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair,
                 stride: Pair = 1, padding: Any = 0, dilation: Pair = 1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", device: Any = None,
                 dtype: Any = None) -> None:
        torch_padding, own = _torch_padding(padding, stride)
        super().__init__(in_channels, out_channels, kernel_size, stride, torch_padding,
                         dilation, groups, bias, padding_mode, device, dtype)
        if own:
            _pads(padding, (1, 1), self.kernel_size, self.stride, self.dilation)  # validate
            self.padding = padding if isinstance(padding, str) else tuple(
                tuple(p) for p in padding)

    def _get_name(self) -> str:
        return "fastconv.Conv2d"

    def forward(self, input: Tensor) -> Tensor:
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, _mode_padding(self, input.shape[-2:]), mode=self.padding_mode)
            padding = 0
        return conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                      self.groups)


# ---------------------------------------------------------------------------------------------
# Transposed convolution: the input-gradient op with output_padding
# ---------------------------------------------------------------------------------------------
def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     stride: Pair = 1, padding: Any = 0, output_padding: Pair = 0,
                     groups: int = 1, dilation: Pair = 1) -> Tensor:
    """``torch.nn.functional.conv_transpose2d`` computed by fastconv (``groups`` before
    ``dilation``, as there), differentiable to any order.

    Parameters
    ----------
    input : Tensor, shape (N, C_in, H, W) or unbatched (C_in, H, W)
    weight : Tensor, shape (C_in, C_out/groups, R, S)
    bias : Tensor, shape (C_out,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int) or ((top, bottom), (left, right))
    output_padding : int or (int, int), each smaller than the stride or the dilation
    groups : int

    Returns
    -------
    Tensor, shape (N, C_out, H_out, W_out) with
    ``H_out = (H - 1) * sh - top - bottom + dh * (R - 1) + output_padding_h + 1``; dtypes,
    layouts and autocast as for ``conv2d``.
    """
    x, batched = _batched(input)
    if weight.dim() != 4:
        raise ValueError(f"weight must be (C_in, C_out/groups, R, S), "
                         f"got shape {tuple(weight.shape)}")
    x, weight, bias = _autocast(x.device.type, (x, weight, bias), None)
    (x, w, b), dtype = _compute_dtype((x, weight, bias))
    tg = _args.conv_transpose_geometry(x.shape, w.shape, stride, padding, output_padding,
                                       dilation, groups)
    conv = (list(tg.stride), list(tg.padding) if tg.direct else [0, 0, 0, 0],
            list(tg.dilation), tg.groups)
    hw = tg.out_hw if tg.direct else tg.full_hw
    y = _ops.conv2d_input_grad([x.shape[0], tg.out_channels, *hw], w, x, *conv)
    if not tg.direct:  # crop the padding, zeros beyond what any tap reaches
        (Hf, Wf), (Ho, Wo), (pt, _, pl, _) = tg.full_hw, tg.out_hw, tg.padding
        y = F.pad(y, (-pl, Wo - Wf + pl, -pt, Ho - Hf + pt))
    if b is not None:
        if tuple(b.shape) != (tg.out_channels,):
            raise ValueError(f"bias must have shape ({tg.out_channels},), "
                             f"got {tuple(b.shape)}")
        y = y + b[:, None, None]
    y = _layout_like(y.to(dtype), input, weight)
    return y if batched else y.squeeze(0)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` (same constructor, parameters ``weight (C_in, C_out/groups,
    R, S)`` and ``bias (C_out,)``, initialisation and ``state_dict``) computed by fastconv.

    ``forward(input, output_size=None)`` as PyTorch's, ``output_size`` picking the
    output_padding. Its repr reads ``fastconv.ConvTranspose2d(...)``.
    """

    def _get_name(self) -> str:
        return "fastconv.ConvTranspose2d"

    def forward(self, input: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only 'zeros' padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                output_padding, self.groups, self.dilation)


# ---------------------------------------------------------------------------------------------
# Swapping PyTorch's convolutions in an existing model
# ---------------------------------------------------------------------------------------------
_SWAP = {torch.nn.Conv2d: Conv2d, torch.nn.ConvTranspose2d: ConvTranspose2d}


def _skip_reason(module: torch.nn.Module) -> Optional[str]:
    """Why ``module`` (some kind of PyTorch convolution) is not swapped, or None to swap."""
    from torch.nn.utils import parametrize

    if isinstance(module, (Conv2d, ConvTranspose2d)):
        return None
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and \
            module.has_uninitialized_params():
        return ("lazy module not initialised yet: run one forward pass first, then call "
                "replace_conv2d")
    if parametrize.is_parametrized(module):
        return ("parametrized (torch.nn.utils.parametrize): call replace_conv2d before "
                "registering the parametrization")
    if type(module) not in _SWAP:
        base = "Conv2d" if isinstance(module, torch.nn.Conv2d) else "ConvTranspose2d"
        return (f"a subclass ({type(module).__module__}.{type(module).__qualname__}) whose "
                f"forward may differ from torch.nn.{base}'s")
    if module.weight.dtype not in (torch.float32, torch.float64, *_HALF):
        return f"weight dtype {module.weight.dtype} is not a float dtype fastconv computes"
    return None


def replace_conv2d(model: torch.nn.Module) -> list[str]:
    """Make every ``torch.nn.Conv2d`` / ``torch.nn.ConvTranspose2d`` in ``model`` (``model``
    itself included) compute with fastconv, in place.

    The swap changes each module's class to fastconv's subclass and nothing else: parameters
    and buffers stay the same objects (an optimiser built before keeps training them), forward
    and backward hooks, ``spectral_norm``/``weight_norm`` hooks and the module's place in the
    model stay as they were. Modules that are not swapped are named in one ``UserWarning``
    with the reason: subclasses of PyTorch's convolutions (their forward may differ),
    parametrized modules and lazy modules not yet initialised.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of str
        The qualified names (as in ``model.named_modules()``; ``""`` for ``model`` itself) of
        the modules swapped.
    """
    replaced, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) or \
                isinstance(module, (Conv2d, ConvTranspose2d)):
            continue
        why = _skip_reason(module)
        if why is None:
            module.__class__ = _SWAP[type(module)]
            replaced.append(name)
        else:
            skipped.append(f"{name or '<model>'} ({type(module).__name__}): {why}")
    if skipped:
        warnings.warn("replace_conv2d left these modules to PyTorch: " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    return replaced


# ---------------------------------------------------------------------------------------------
# Multi-margin (hinge) loss ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastconv::multi_margin_loss", mutates_args=())
def _margin_op(input: Tensor, target: Tensor, p: int, margin: float, weight: Optional[Tensor],
               reduction: str) -> Tensor:
    """PyTorch's multi-margin loss of input (N, C), target (N,): 0-d, or (N,) for "none"."""
    C = input.shape[1]
    with _Bridge(input.device) as bridge:
        loss = _np_hinge_loss(bridge.array(input, "input"), bridge.array(target, "target"),
                              margin, p, bridge.array(weight, "weight"), reduction)
        return bridge.tensor(loss / C)


@_margin_op.register_fake
def _(input, target, p, margin, weight, reduction):
    if reduction not in _args.REDUCTIONS:
        raise ValueError(f"reduction must be one of {_args.REDUCTIONS}, got {reduction!r}")
    return input.new_empty((input.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("fastconv::multi_margin_loss_grad", mutates_args=())
def _margin_grad_op(grad_output: Tensor, input: Tensor, target: Tensor, p: int, margin: float,
                    weight: Optional[Tensor], reduction: str) -> Tensor:
    """d(loss)/d(input) times grad_output (0-d, or (N,) for "none"): shape (N, C)."""
    C = input.shape[1]
    with _Bridge(input.device) as bridge:
        g = bridge.array(grad_output, "grad_output")
        grad = _np_hinge_loss_grad(bridge.array(input, "input"),
                                   bridge.array(target, "target"), margin, p,
                                   bridge.array(weight, "weight"), reduction, g / C)
        return bridge.tensor(grad)


@_margin_grad_op.register_fake
def _(grad_output, input, target, p, margin, weight, reduction):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _margin_setup(ctx, inputs, output) -> None:
    input, target, p, margin, weight, reduction = inputs
    ctx.save_for_backward(input, target, weight)
    ctx.args = (p, margin, reduction)


def _margin_backward(ctx, grad):
    input, target, weight = ctx.saved_tensors
    p, margin, reduction = ctx.args
    if ctx.needs_input_grad[4]:
        raise RuntimeError("fastconv.torch.multi_margin_loss is not differentiable with "
                           "respect to weight (neither is PyTorch's); detach it")
    gs = None
    if ctx.needs_input_grad[0]:
        gs = _ops.multi_margin_loss_grad(grad, input, target, p, margin, weight, reduction)
    return gs, None, None, None, None, None


def _margin_grad_setup(ctx, inputs, output) -> None:
    grad_output, input, target, p, margin, weight, reduction = inputs
    ctx.save_for_backward(grad_output, input, target, weight)
    ctx.args = (p, margin, reduction)


def _margin_hvp(grad_output, input, target, p, margin, weight, reduction, v):
    """The second derivative of the loss, times ``grad_output``, applied to ``v (N, C)``.

    0 for ``p=1`` (piecewise linear). For ``p=2`` the gradient row ``i`` is
    ``2 c_i h_ij`` for ``j != y_i`` (minus their sum at ``y_i``), ``h = max(0, s_j - s_y +
    margin)``, ``c_i = w[y_i] * grad_output_i / C`` (``/ N`` more for "mean"); its derivative
    along ``v`` is ``2 c_i [h_ij > 0] (v_ij - v_iy)``, minus their sum at ``y_i``.
    """
    if p == 1:
        return torch.zeros_like(input)
    N, C = input.shape
    t = target.unsqueeze(1)
    active = (input - input.gather(1, t) + margin) > 0
    active = active & (torch.arange(C, device=input.device) != t)
    scale = grad_output / (C * N if reduction == "mean" else C)
    scale = scale.reshape(-1, 1) * 2
    if weight is not None:
        scale = scale * weight[target].unsqueeze(1)
    d = torch.where(active, scale * (v - v.gather(1, t)), torch.zeros_like(v))
    return d.scatter_add(1, t, -d.sum(1, keepdim=True))


def _margin_grad_backward(ctx, grad):
    grad_output, input, target, weight = ctx.saved_tensors
    p, margin, reduction = ctx.args
    if ctx.needs_input_grad[5]:
        raise RuntimeError("fastconv.torch.multi_margin_loss is not differentiable with "
                           "respect to weight (neither is PyTorch's); detach it")
    ggo = gs = None
    if ctx.needs_input_grad[0]:  # linear in grad_output: per-row (or total) dot products
        unit = _ops.multi_margin_loss_grad(torch.ones_like(grad_output), input, target, p,
                                           margin, weight, reduction)
        ggo = (unit * grad).sum(1) if reduction == "none" else (unit * grad).sum()
    if ctx.needs_input_grad[1]:
        gs = _margin_hvp(grad_output, input, target, p, margin, weight, reduction, grad)
    return ggo, gs, None, None, None, None, None


_margin_op.register_autograd(_margin_backward, setup_context=_margin_setup)
_margin_grad_op.register_autograd(_margin_grad_backward, setup_context=_margin_grad_setup)


# ---------------------------------------------------------------------------------------------
# Multi-margin loss: functional and module
# ---------------------------------------------------------------------------------------------
def _legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """PyTorch's mapping of the deprecated ``size_average``/``reduce`` flags, with its
    warning."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "none" if not reduce else ("mean" if size_average else "sum")
    warnings.warn(f"size_average and reduce args will be deprecated, please use "
                  f"reduction='{reduction}' instead.", stacklevel=3)
    return reduction


def _margin_shapes(input: Tensor, target: Tensor) -> tuple[int, int]:
    """``(N, C)`` as PyTorch reads them: ``(N, C)``, ``(C,)`` (N = 1) or 0-d (N = C = 1)."""
    if input.dim() > 2 or input.numel() == 0:
        raise ValueError(f"input must be a non-empty (N, C), (C,) or 0-d tensor, "
                         f"got shape {tuple(input.shape)}")
    N = input.shape[0] if input.dim() == 2 else 1
    C = input.shape[-1] if input.dim() >= 1 else 1
    if target.dim() > 1 or target.numel() != N:
        raise ValueError(f"target must hold {N} class index(es) (shape ({N},) or ()), "
                         f"got shape {tuple(target.shape)}")
    return N, C


def multi_margin_loss(input: Tensor, target: Tensor, p: int = 1, margin: float = 1.0,
                      weight: Optional[Tensor] = None, size_average: Optional[bool] = None,
                      reduce: Optional[bool] = None, reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.multi_margin_loss`` computed by fastconv, differentiable to any
    order with respect to ``input``.

    ``loss_i = sum_{j != y_i} w[y_i] * max(0, margin - x[y_i] + x[j]) ** p / C``.

    Parameters
    ----------
    input : Tensor, shape (N, C), (C,) or 0-d
        The scores. float16/bfloat16 are computed in float32 and returned in their dtype
        (under autocast: float32, as PyTorch's loss).
    target : int64 Tensor, shape (N,) or ()
        The labels, in ``[0, C)``.
    p : {1, 2}
    margin : float
    weight : Tensor, shape (C,), optional
    size_average, reduce : deprecated, as in PyTorch (they override ``reduction``).
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    Tensor: 0-d for "mean"/"sum"; for "none" shaped like ``target`` ((N,) or ()).
    """
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    N, C = _margin_shapes(input, target)
    scores, weight = _autocast(input.device.type, (input, weight), torch.float32)
    (scores, w), dtype = _compute_dtype((scores, weight))
    loss = _ops.multi_margin_loss(scores.reshape(N, C), target.reshape(N), int(p),
                                  float(margin), None if w is None else w.reshape(C),
                                  reduction)
    if reduction == "none" and target.dim() == 0:
        loss = loss.reshape(())
    return loss.to(dtype)


class MultiMarginLoss(torch.nn.MultiMarginLoss):
    """``torch.nn.MultiMarginLoss`` (same constructor and ``weight`` buffer) computed by
    fastconv."""

    def _get_name(self) -> str:
        return "fastconv.MultiMarginLoss"

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return multi_margin_loss(input, target, p=self.p, margin=self.margin,
                                 weight=self.weight, reduction=self.reduction)


# torch.fx.symbolic_trace records calls of these as single nodes instead of tracing into them.
torch.fx.wrap("conv2d")
torch.fx.wrap("conv_transpose2d")
torch.fx.wrap("multi_margin_loss")
