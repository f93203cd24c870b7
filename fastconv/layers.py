"""Framework-free layers built on fastconv's ops: Conv2d, ConvTranspose2d, MultiClassHingeLoss,
ReLU, Linear, Flatten, Sequential and a minimal SGD.

Chainer style: a layer holds its parameters and calls the public ops (``fastconv.conv2d`` and
its gradients, ``fastconv.hinge_loss_and_grad``); its backward pass is built from ops as well,
so every backend (reference, Numba, CUDA) serves the layers without the layers knowing which.

Protocol shared by every layer:

- ``forward(x)`` returns the output and keeps what ``backward`` needs;
- ``backward(grad_output)`` returns ``grad_input`` and stores the parameter gradients
  (overwriting those of the previous step: there is no accumulation, so no ``zero_grad``);
  ``backward(grad_output, input_grad=False)`` skips ``grad_input`` and returns ``None``, which
  ``Sequential`` uses for its first layer when the input's gradient is not wanted;
- ``parameters()`` and ``gradients()`` return lists in the same order, which ``SGD`` pairs up;
- ``to("cuda")`` / ``to("cpu")`` moves the parameters between NumPy and CuPy arrays.

Arrays may be NumPy or CuPy; the layers use the module of the array they are given and never
import CuPy unless asked to move to ``"cuda"``.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from . import _args
from .conv import conv2d, conv2d_bias_grad, conv2d_input_grad, conv2d_weight_grad
from .conv import conv_transpose2d, conv_transpose2d_input_grad, conv_transpose2d_weight_grad
from .dispatch import BackendUnavailableError, availability
from .hinge import hinge_loss_and_grad

Pair = Union[int, Sequence[int]]

# PyTorch's padding modes and the np.pad / cupy.pad mode with the same semantics.
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
                 "circular": "wrap"}


# ---------------------------------------------------------------------------------------------
# Devices and arrays
# ---------------------------------------------------------------------------------------------
def _xp(a: Any):
    """The array module (numpy or cupy) of ``a``."""
    return _args.array_module(_args.array_kind(a))


def _parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> ``(kind, index)``."""
    if device == "cpu":
        return "cpu", 0
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        head, _, index = device.partition(":")
        if not index or index.isdigit():
            return "cuda", int(index or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _to_device(a: Any, device: str) -> Any:
    """Return ``a`` as a NumPy array (``"cpu"``) or a CuPy array on the given GPU."""
    if a is None:
        return None
    kind, index = _parse_device(device)
    if kind == "cpu":
        return a if isinstance(a, np.ndarray) else a.get()
    ok, why = availability("cuda")
    if not ok:
        raise BackendUnavailableError(f"cannot move to {device!r}: {why}")
    import cupy  # available: checked just above

    with cupy.cuda.Device(index):
        return cupy.asarray(a)


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
                     dtype: np.dtype) -> np.ndarray:
    """``torch.nn.init.kaiming_uniform_(w, a=sqrt(5))``: U(-b, b) with b = 1/sqrt(fan_in).

    The gain for leaky ReLU with slope a is sqrt(2 / (1 + a^2)); the bound is
    sqrt(3) * gain / sqrt(fan_in), which for a = sqrt(5) simplifies to 1/sqrt(fan_in).
    """
    a = math.sqrt(5.0)
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _bias_uniform(rng: np.random.Generator, size: int, fan_in: int,
                  dtype: np.dtype) -> np.ndarray:
    """PyTorch's bias init for conv and linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=size).astype(dtype)


def _float_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _args.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _conv_options(layer: "Layer", in_channels: int, out_channels: int, kernel_size: Pair,
                  stride: Pair, dilation: Pair, groups: int) -> None:
    """Check the channel counts against ``groups`` and store a conv layer's options."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must "
                         f"be divisible by groups={groups}")
    layer.in_channels, layer.out_channels, layer.groups = in_channels, out_channels, groups
    layer.kernel_size = _args.pair(kernel_size, "kernel_size")
    layer.stride = _args.pair(stride, "stride")
    layer.dilation = _args.pair(dilation, "dilation")


def _init_weight_bias(layer: "Layer", weight_shape: tuple[int, ...], n_bias: int, fan_in: int,
                      bias: bool, dtype: Any, seed: Optional[int], device: str) -> None:
    """Give ``layer`` PyTorch's initialisation (Kaiming-uniform ``weight``, uniform ``bias`` of
    ``n_bias`` values or None) from ``fan_in``, empty gradients, and move it to ``device``."""
    dt = _float_dtype(dtype)
    rng = np.random.default_rng(seed)
    layer.weight = _kaiming_uniform(rng, weight_shape, fan_in, dt)
    layer.bias = _bias_uniform(rng, n_bias, fan_in, dt) if bias else None
    layer.grad_weight = layer.grad_bias = None
    layer.device = "cpu"
    if device != "cpu":
        layer.to(device)


class Layer(abc.ABC):
    """Base of the layers: parameter bookkeeping and device moves.

    Subclasses list their parameter attribute names in ``_param_names``; the gradient of
    parameter ``name`` lives in ``grad_<name>``.
    """

    _param_names: tuple[str, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the output and keep what ``backward`` needs."""

    @abc.abstractmethod
    def backward(self, *args: Any, **kwargs: Any) -> Any:
        """Gradient w.r.t. the input; parameter gradients go to ``grad_<name>``."""

    def _present(self) -> list[str]:
        return [n for n in self._param_names if getattr(self, n) is not None]

    def parameters(self) -> list[Any]:
        """The parameter arrays (the objects themselves: updating them in place trains)."""
        return [getattr(self, n) for n in self._present()]

    def gradients(self) -> list[Any]:
        """The gradients from the last ``backward``, in the order of ``parameters()``
        (``None`` before the first backward)."""
        return [getattr(self, "grad_" + n, None) for n in self._present()]

    def to(self, device: str) -> "Layer":
        """Move parameters and gradients to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy).

        Returns ``self``. What ``forward`` kept for ``backward`` is dropped: run ``forward``
        again on the new device.
        """
        for name in self._param_names:
            setattr(self, name, _to_device(getattr(self, name), device))
            grad = getattr(self, "grad_" + name, None)
            setattr(self, "grad_" + name, _to_device(grad, device))
        self._clear_saved()
        self.device = device
        return self

    def _clear_saved(self) -> None:
        """Forget what forward kept for backward (overridden by layers that keep something)."""


# ---------------------------------------------------------------------------------------------
# Padding modes other than zeros
# ---------------------------------------------------------------------------------------------
def _check_pad_fits(mode: str, size: int, before: int, after: int, axis: str) -> None:
    """PyTorch's limits: reflect needs pad < size, circular needs pad <= size."""
    if mode == "reflect" and max(before, after) >= size:
        raise ValueError(f"padding_mode='reflect' needs padding smaller than the input {axis} "
                         f"({size}), got ({before}, {after})")
    if mode == "circular" and max(before, after) > size:
        raise ValueError(f"padding_mode='circular' needs padding at most the input {axis} "
                         f"({size}), got ({before}, {after})")


def _pad_source_index(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """For each position of a padded axis, the input index whose value it holds.

    Padding an ``arange`` with the mode itself gives the map, so forward (gather) and backward
    (scatter-add) share one definition of every mode.
    """
    return np.pad(np.arange(size), (before, after), mode=PADDING_MODES[mode])


def pad_input(x: Any, pads: tuple[int, int, int, int], mode: str) -> Any:
    """Pad the last two axes of ``x`` by ``pads = (top, bottom, left, right)`` in ``mode``.

    Parameters
    ----------
    x : array, shape (..., H, W)
    pads : (int, int, int, int)
    mode : {"reflect", "replicate", "circular"}

    Returns
    -------
    array, shape (..., H + top + bottom, W + left + right)
    """
    xp = _xp(x)
    top, bottom, left, right = pads
    H, W = x.shape[-2:]
    _check_pad_fits(mode, H, top, bottom, "height")
    _check_pad_fits(mode, W, left, right, "width")
    rows = xp.asarray(_pad_source_index(H, top, bottom, mode))
    cols = xp.asarray(_pad_source_index(W, left, right, mode))
    return xp.take(xp.take(x, rows, axis=-2), cols, axis=-1)


def _fold_last_axis(grad: Any, source: np.ndarray, before: int, size: int) -> Any:
    """Sum the gradient of a padded last axis onto the input positions it was copied from."""
    out = grad[..., before:before + size].copy()
    # The interior maps to itself; only the (few) padded positions need adding back.
    for i in (*range(before), *range(before + size, len(source))):
        out[..., int(source[i])] += grad[..., i]
    return out


def fold_padding_grad(grad_padded: Any, pads: tuple[int, int, int, int], mode: str) -> Any:
    """The adjoint of ``pad_input``: gradient w.r.t. the unpadded input.

    Parameters
    ----------
    grad_padded : array, shape (..., H + top + bottom, W + left + right)
    pads : (int, int, int, int)
        ``(top, bottom, left, right)`` as given to ``pad_input``.
    mode : {"reflect", "replicate", "circular"}

    Returns
    -------
    array, shape (..., H, W)
    """
    top, bottom, left, right = pads
    H = grad_padded.shape[-2] - top - bottom
    W = grad_padded.shape[-1] - left - right
    g = _fold_last_axis(grad_padded, _pad_source_index(W, left, right, mode), left, W)
    g = _fold_last_axis(g.swapaxes(-1, -2), _pad_source_index(H, top, bottom, mode), top, H)
    return g.swapaxes(-1, -2)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
class Conv2d(Layer):
    """2-D convolution layer with PyTorch's constructor, shapes and initialisation.

    Parameters
    ----------
    in_channels, out_channels : int
        ``C`` and ``K``.
    kernel_size, stride, dilation : int or (int, int)
    padding : int, pair, ((top, bottom), (left, right)), "valid" or "same"
    groups : int
    bias : bool
    padding_mode : {"zeros", "reflect", "replicate", "circular"}
        PyTorch's semantics. ``"zeros"`` is handled inside the conv kernels (no padded copy);
        the other modes pad explicitly and fold the padded gradient back in ``backward``.
    dtype : float32 or float64
    device : "cpu", "cuda" or "cuda:N"
    seed : int, optional
        Seed of the initialisation (NumPy ``default_rng``).

    Attributes
    ----------
    weight : array, shape (K, C/groups, R, S)
        Kaiming-uniform with ``a=sqrt(5)``, as ``torch.nn.Conv2d``.
    bias : array, shape (K,) or None
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)), ``fan_in = C/groups * R * S``.
    grad_weight, grad_bias : arrays set by ``backward``.
    """

    _param_names = ("weight", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair = 1,
                 padding: Any = 0, dilation: Pair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", dtype: Any = np.float32, device: str = "cpu",
                 seed: Optional[int] = None) -> None:
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {tuple(PADDING_MODES)}, "
                             f"got {padding_mode!r}")
        _conv_options(self, in_channels, out_channels, kernel_size, stride, dilation, groups)
        self.padding, self.padding_mode = padding, padding_mode
        R, S = self.kernel_size
        self._saved: Optional[tuple] = None
        _init_weight_bias(self, (out_channels, in_channels // groups, R, S), out_channels,
                          in_channels // groups * R * S, bias, dtype, seed, device)

    def _clear_saved(self) -> None:
        self._saved = None

    def _explicit_pads(self, hw: tuple[int, int]) -> tuple[int, int, int, int]:
        return _args.normalize_padding(self.padding, hw, self.kernel_size, self.stride,
                                       self.dilation)

    def _conv_kwargs(self, padding: Any) -> dict:
        return dict(stride=self.stride, padding=padding, dilation=self.dilation,
                    groups=self.groups)

    def forward(self, x: Any) -> Any:
        """Convolve ``x (N, C, H, W)`` (or ``(C, H, W)``); returns ``(N, K, P, Q)``."""
        if self.padding_mode == "zeros":
            pads, conv_in, conv_padding = None, x, self.padding
        else:
            pads = self._explicit_pads(tuple(x.shape[-2:]))
            conv_in, conv_padding = pad_input(x, pads, self.padding_mode), 0
        y = conv2d(conv_in, self.weight, self.bias, **self._conv_kwargs(conv_padding))
        self._saved = (conv_in, conv_padding, pads)
        return y

    def backward(self, grad_output: Any, input_grad: bool = True) -> Any:
        """Given ``grad_output (N, K, P, Q)``, store ``grad_weight``/``grad_bias`` and return
        ``grad_input (N, C, H, W)`` (``None`` when ``input_grad`` is false)."""
        if self._saved is None:
            raise RuntimeError("Conv2d.backward called before forward")
        conv_in, conv_padding, pads = self._saved
        kw = self._conv_kwargs(conv_padding)
        self.grad_weight = conv2d_weight_grad(conv_in, self.weight.shape, grad_output, **kw)
        if self.bias is not None:
            self.grad_bias = conv2d_bias_grad(grad_output)
        if not input_grad:
            return None
        grad_input = conv2d_input_grad(tuple(conv_in.shape), self.weight, grad_output, **kw)
        if pads is not None:
            grad_input = fold_padding_grad(grad_input, pads, self.padding_mode)
        return grad_input

    def __repr__(self) -> str:
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, padding_mode={self.padding_mode!r})")


class ConvTranspose2d(Layer):
    """Transposed 2-D convolution layer with ``torch.nn.ConvTranspose2d``'s constructor,
    shapes and initialisation (argument order included: ``groups`` before ``dilation``).

    Parameters
    ----------
    in_channels, out_channels : int
        ``C_in`` and ``C_out``.
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int) or ((top, bottom), (left, right))
    output_padding : int or (int, int)
        Each smaller than the stride or the dilation of its axis.
    groups : int
    bias : bool
    dtype, device, seed : as for ``Conv2d``.

    Attributes
    ----------
    weight : array, shape (C_in, C_out/groups, R, S)
        Kaiming-uniform with ``a=sqrt(5)`` and PyTorch's fan-in ``C_out/groups * R * S``.
    bias : array, shape (C_out,) or None
    grad_weight, grad_bias : arrays set by ``backward``.
    """

    _param_names = ("weight", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair = 1,
                 padding: Any = 0, output_padding: Pair = 0, groups: int = 1, bias: bool = True,
                 dilation: Pair = 1, dtype: Any = np.float32, device: str = "cpu",
                 seed: Optional[int] = None) -> None:
        _conv_options(self, in_channels, out_channels, kernel_size, stride, dilation, groups)
        self.output_padding = _args.output_padding_pair(output_padding, self.stride,
                                                        self.dilation)
        self.padding = padding
        R, S = self.kernel_size
        self._x = None
        # PyTorch's fan-in of a (C_in, C_out/groups, R, S) weight: C_out/groups * R * S.
        _init_weight_bias(self, (in_channels, out_channels // groups, R, S), out_channels,
                          out_channels // groups * R * S, bias, dtype, seed, device)

    def _clear_saved(self) -> None:
        self._x = None

    def _kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding,
                    output_padding=self.output_padding, groups=self.groups,
                    dilation=self.dilation)

    def forward(self, x: Any) -> Any:
        """``x (N, C_in, H, W)`` (or unbatched) -> ``(N, C_out, H_out, W_out)``."""
        y = conv_transpose2d(x, self.weight, self.bias, **self._kwargs())
        self._x = x
        return y

    def backward(self, grad_output: Any, input_grad: bool = True) -> Any:
        """Given ``grad_output (N, C_out, H_out, W_out)``, store ``grad_weight``/``grad_bias``
        and return ``grad_input (N, C_in, H, W)`` (``None`` when ``input_grad`` is false)."""
        if self._x is None:
            raise RuntimeError("ConvTranspose2d.backward called before forward")
        x, kw = self._x, self._kwargs()
        self.grad_weight = conv_transpose2d_weight_grad(x, self.weight.shape, grad_output, **kw)
        if self.bias is not None:
            self.grad_bias = conv2d_bias_grad(grad_output)
        if not input_grad:
            return None
        return conv_transpose2d_input_grad(tuple(x.shape), self.weight, grad_output, **kw)

    def __repr__(self) -> str:
        return (f"ConvTranspose2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, output_padding={self.output_padding}, "
                f"groups={self.groups}, bias={self.bias is not None}, "
                f"dilation={self.dilation})")


class Linear(Layer):
    """Fully connected layer ``y = x @ weight.T + bias``, initialised as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    dtype, device, seed : as for ``Conv2d``.

    Attributes
    ----------
    weight : array, shape (out_features, in_features)
    bias : array, shape (out_features,) or None
    """

    _param_names = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = np.float32, device: str = "cpu",
                 seed: Optional[int] = None) -> None:
        self.in_features, self.out_features = in_features, out_features
        self._x = None
        _init_weight_bias(self, (out_features, in_features), out_features, in_features, bias,
                          dtype, seed, device)

    def _clear_saved(self) -> None:
        self._x = None

    def forward(self, x: Any) -> Any:
        """``x (N, in_features)`` -> ``(N, out_features)``."""
        self._x = x
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def backward(self, grad_output: Any, input_grad: bool = True) -> Any:
        """``grad_output (N, out_features)`` -> ``grad_input (N, in_features)``."""
        if self._x is None:
            raise RuntimeError("Linear.backward called before forward")
        self.grad_weight = grad_output.T @ self._x
        if self.bias is not None:
            self.grad_bias = grad_output.sum(axis=0)
        return grad_output @ self.weight if input_grad else None


class ReLU(Layer):
    """``max(0, x)``; the gradient at 0 is 0, as in PyTorch."""

    def __init__(self) -> None:
        self._mask = None
        self.device = "cpu"

    def _clear_saved(self) -> None:
        self._mask = None

    def forward(self, x: Any) -> Any:
        self._mask = x > 0
        return x * self._mask

    def backward(self, grad_output: Any, input_grad: bool = True) -> Any:
        if self._mask is None:
            raise RuntimeError("ReLU.backward called before forward")
        return grad_output * self._mask if input_grad else None


class Flatten(Layer):
    """``(N, ...)`` -> ``(N, prod(...))``, to feed convolution features to ``Linear``."""

    def __init__(self) -> None:
        self._shape: Optional[tuple[int, ...]] = None
        self.device = "cpu"

    def forward(self, x: Any) -> Any:
        self._shape = tuple(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_output: Any, input_grad: bool = True) -> Any:
        if self._shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        return grad_output.reshape(self._shape) if input_grad else None


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers: Layer) -> None:
        self.layers = list(layers)
        self.device = "cpu"

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_output: Any, input_grad: bool = True) -> Any:
        """Backward through every layer; with ``input_grad=False`` the first layer skips its
        input gradient (training on data needs none) and ``None`` is returned."""
        for i in range(len(self.layers) - 1, -1, -1):
            grad_output = self.layers[i].backward(grad_output, input_grad=input_grad or i > 0)
        return grad_output

    def parameters(self) -> list[Any]:
        return [p for layer in self.layers for p in layer.parameters()]

    def gradients(self) -> list[Any]:
        return [g for layer in self.layers for g in layer.gradients()]

    def to(self, device: str) -> "Sequential":
        for layer in self.layers:
            layer.to(device)
        self.device = device
        return self


class MultiClassHingeLoss(Layer):
    """Multiclass hinge (SVM) loss; forward computes the loss and its gradient in one pass.

    ``l_i = sum_{j != y_i} w[y_i] * max(0, s_ij - s_{i y_i} + margin) ** p``, reduced by
    ``"mean"`` (over N, not divided by the number of classes), ``"sum"`` or ``"none"``.

    Parameters
    ----------
    margin : float
    p : {1, 2}
    weight : array, shape (C,), optional
        Per-class weight; moved to the scores' device and dtype when used.
    reduction : {"mean", "sum", "none"}
    """

    def __init__(self, margin: float = 1.0, p: int = 1, weight: Any = None,
                 reduction: str = "mean") -> None:
        self.margin, self.p, self.weight, self.reduction = margin, p, weight, reduction
        self._grad = None
        self.device = "cpu"

    def _clear_saved(self) -> None:
        self._grad = None

    def parameters(self) -> list[Any]:
        return []  # the class weight is a constant, not trained

    def gradients(self) -> list[Any]:
        return []

    def to(self, device: str) -> "MultiClassHingeLoss":
        self.weight = _to_device(self.weight, device)
        self._clear_saved()
        self.device = device
        return self

    def forward(self, scores: Any, labels: Any) -> Any:
        """Loss of ``scores (N, C)`` (or ``(C,)``) against ``labels (N,)``; a 0-d array for
        "mean"/"sum", ``(N,)`` for "none". The gradient is kept for ``backward``."""
        weight = self.weight
        if weight is not None:
            weight = _xp(scores).asarray(weight, dtype=scores.dtype)
        loss, self._grad = hinge_loss_and_grad(scores, labels, self.margin, self.p, weight,
                                               self.reduction)
        return loss

    def backward(self, grad_loss: Any = 1.0) -> Any:
        """Gradient w.r.t. the scores, times the upstream ``grad_loss`` (a scalar, or an array
        shaped like the loss for ``reduction="none"``). Costs one multiply at most."""
        if self._grad is None:
            raise RuntimeError("MultiClassHingeLoss.backward called before forward")
        if getattr(grad_loss, "ndim", 0) == 0:
            scale = float(grad_loss)  # a Python float keeps the gradient's dtype
            return self._grad if scale == 1.0 else self._grad * scale
        if self.reduction != "none":
            raise ValueError(f"grad_loss must be a scalar for reduction={self.reduction!r}, "
                             f"got shape {tuple(grad_loss.shape)}")
        want = self._grad.shape[:-1]
        if tuple(grad_loss.shape) != want:
            raise ValueError(f"grad_loss must have the loss's shape {want}, "
                             f"got {tuple(grad_loss.shape)}")
        return self._grad * grad_loss.astype(self._grad.dtype)[..., None]


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------
class SGD:
    """Stochastic gradient descent with optional momentum and weight decay (PyTorch's rule).

    ``d = g + weight_decay * p``; with momentum ``buf = momentum * buf + d`` (``buf = d`` on
    the first step) and ``d = buf``; then ``p -= lr * d``, in place.

    Parameters
    ----------
    layers : iterable of layers
        Anything with ``parameters()`` and ``gradients()``; they are asked afresh every step,
        so moving a layer to another device after building the optimiser is fine.
    lr : float
    momentum : float
    weight_decay : float
    """

    def __init__(self, layers: Iterable[Any], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0; got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}")
        self.layers = list(layers)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._buffers: dict[tuple[int, int], Any] = {}

    def step(self) -> None:
        """Update every parameter in place from its gradient of the last backward."""
        for li, layer in enumerate(self.layers):
            for pi, (p, g) in enumerate(zip(layer.parameters(), layer.gradients())):
                if g is None:
                    continue  # that layer has not run backward yet
                self._update(p, g, (li, pi))

    def _update(self, p: Any, g: Any, key: tuple[int, int]) -> None:
        d = g + self.weight_decay * p if self.weight_decay else g
        if self.momentum:
            buf = self._buffers.get(key)
            if buf is None:
                buf = d.copy()
            else:
                if _args.array_kind(buf) != _args.array_kind(p):
                    buf = _to_device(buf, "cpu" if isinstance(p, np.ndarray) else "cuda")
                buf *= self.momentum
                buf += d
            self._buffers[key] = d = buf
        p -= self.lr * d
