"""PyTorch adapter: fastconv's kernels behind ``torch.nn.Conv2d``/``MultiMarginLoss`` drop-ins.

Import it explicitly (``import fastconv.torch``); ``import fastconv`` never imports PyTorch.

- ``Conv2d`` *is* a ``torch.nn.Conv2d`` (same constructor, parameter names, shapes and
  initialisation, so ``load_state_dict`` works both ways and ``isinstance`` checks pass) whose
  forward and backward run fastconv ops through a ``torch.autograd.Function``.
- ``conv2d`` has the signature of ``torch.nn.functional.conv2d``.
- ``multi_margin_loss`` / ``MultiMarginLoss`` match ``torch.nn.functional.multi_margin_loss`` /
  ``torch.nn.MultiMarginLoss`` exactly: fastconv's hinge loss divided by the number of classes.

Tensors cross over without copies: CPU tensors as NumPy views (``Tensor.numpy()`` /
``torch.from_numpy``), so the Numba backend runs them; CUDA tensors through DLPack as CuPy
arrays, with CuPy's current stream set to PyTorch's current stream for the duration of the
call, so the kernels are ordered with the surrounding PyTorch work and no synchronisation is
needed. Double backward raises PyTorch's error for functions marked once-differentiable.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _args
from .conv import conv2d as _conv2d
from .conv import conv2d_bias_grad, conv2d_input_grad, conv2d_weight_grad
from .hinge import hinge_loss_and_grad

__all__ = ["Conv2d", "conv2d", "MultiMarginLoss", "multi_margin_loss", "replace_conv2d"]

Pair = Union[int, Sequence[int]]


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

    def array(self, t: Optional[torch.Tensor], name: str) -> Any:
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

    def tensor(self, a: Any) -> torch.Tensor:
        """A tensor viewing the NumPy or CuPy array ``a`` (a NumPy scalar becomes 0-d)."""
        if self.cuda:
            return torch.from_dlpack(a)
        a = np.asarray(a)
        if any(s < 0 for s in a.strides):  # torch.from_numpy rejects negative strides
            a = a.copy()
        return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------
class _Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, weight, bias); backward through fastconv's gradient ops."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Any, padding: Any, dilation: Any, groups: int) -> torch.Tensor:
        with _Bridge(x.device) as bridge:
            y = _conv2d(bridge.array(x, "input"), bridge.array(weight, "weight"),
                        bridge.array(bias, "bias"), stride, padding, dilation, groups)
            out = bridge.tensor(y)
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        with _Bridge(x.device) as bridge:
            g = bridge.array(grad_output, "grad_output")
            if need_x:
                grad_x = bridge.tensor(conv2d_input_grad(
                    tuple(x.shape), bridge.array(weight, "weight"), g, *ctx.conv))
            if need_w:
                grad_w = bridge.tensor(conv2d_weight_grad(
                    bridge.array(x, "input"), tuple(weight.shape), g, *ctx.conv))
            if need_b and ctx.has_bias:
                grad_b = bridge.tensor(conv2d_bias_grad(g))
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: Pair = 1, padding: Any = 0, dilation: Pair = 1,
           groups: int = 1) -> torch.Tensor:
    """``torch.nn.functional.conv2d`` computed by fastconv, differentiable once.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W) or unbatched (C, H, W)
    weight : Tensor, shape (K, C/groups, R, S)
    bias : Tensor, shape (K,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int), ((top, bottom), (left, right)), "valid" or "same"
        ``"same"`` also works with a stride (output ``ceil(H / stride)``, extra pad at the
        bottom/right), where PyTorch raises.
    groups : int

    Returns
    -------
    Tensor, shape (N, K, P, Q) (or (K, P, Q)), on the input's device, in its dtype.
    """
    return _Conv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups)


def _mode_padding(module: torch.nn.Conv2d, hw: Sequence[int]) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` for ``F.pad`` from the module's padding spec."""
    top, bottom, left, right = _args.normalize_padding(
        module.padding, tuple(hw), module.kernel_size, module.stride, module.dilation)
    return (left, right, top, bottom)


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward and backward run fastconv's kernels.

    Constructor, parameters (``weight (K, C/groups, R, S)``, ``bias (K,)``), initialisation and
    ``state_dict`` are those of ``torch.nn.Conv2d``, which it subclasses. Padding modes other
    than ``"zeros"`` pad with ``torch.nn.functional.pad`` first (PyTorch differentiates it),
    as ``torch.nn.Conv2d`` itself does.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, _mode_padding(self, input.shape[-2:]), mode=self.padding_mode)
            padding = 0
        return conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                      self.groups)

    @classmethod
    def from_torch(cls, module: torch.nn.Conv2d) -> "Conv2d":
        """A fastconv ``Conv2d`` configured like ``module`` and sharing its parameters (the
        same ``Parameter`` objects, so an optimiser built on the old model keeps working)."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                  module.padding, module.dilation, module.groups, module.bias is not None,
                  module.padding_mode, device="meta", dtype=module.weight.dtype)
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new


def replace_conv2d(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``torch.nn.Conv2d`` inside ``model`` for fastconv's, in place.

    Parameters are shared, not copied. Returns ``model`` (or the replacement, when ``model``
    itself is a ``torch.nn.Conv2d``).
    """
    if type(model) is torch.nn.Conv2d:
        return Conv2d.from_torch(model)
    for name, child in model.named_children():
        setattr(model, name, replace_conv2d(child))
    return model


# ---------------------------------------------------------------------------------------------
# Multi-margin (hinge) loss
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


def _margin_shapes(input: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
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


class _MultiMarginFunction(torch.autograd.Function):
    """Loss and gradient from one fused fastconv pass; backward only scales the gradient."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, p: int, margin: float,
                weight: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
        N, C = _margin_shapes(input, target)
        with _Bridge(input.device) as bridge:
            scores = bridge.array(input, "input").reshape(N, C)
            labels = bridge.array(target, "target").reshape(N)
            w = bridge.array(weight, "weight")
            w = None if w is None else w.reshape(C)
            # grad_loss = 1/C folds PyTorch's division by the class count into the pass.
            loss, grad = hinge_loss_and_grad(scores, labels, margin, p, w, reduction,
                                             grad_loss=1.0 / C)
            loss = bridge.tensor(loss / C)
            grad = bridge.tensor(grad)
        if reduction == "none" and target.dim() == 0:
            loss = loss.reshape(())
        ctx.grad = grad
        ctx.input_shape = input.shape
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad = ctx.grad * grad_output.reshape(-1, 1)
        return grad.reshape(ctx.input_shape), None, None, None, None, None


def multi_margin_loss(input: torch.Tensor, target: torch.Tensor, p: int = 1,
                      margin: float = 1.0, weight: Optional[torch.Tensor] = None,
                      size_average: Optional[bool] = None, reduce: Optional[bool] = None,
                      reduction: str = "mean") -> torch.Tensor:
    """``torch.nn.functional.multi_margin_loss`` computed by fastconv.

    ``loss_i = sum_{j != y_i} w[y_i] * max(0, margin - x[y_i] + x[j]) ** p / C``.

    Parameters
    ----------
    input : Tensor, shape (N, C), (C,) or 0-d
        The scores.
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
    return _MultiMarginFunction.apply(input, target, p, margin, weight, reduction)


class MultiMarginLoss(torch.nn.MultiMarginLoss):
    """``torch.nn.MultiMarginLoss`` (same constructor and ``weight`` buffer) computed by
    fastconv in one fused pass."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return multi_margin_loss(input, target, p=self.p, margin=self.margin,
                                 weight=self.weight, reduction=self.reduction)
