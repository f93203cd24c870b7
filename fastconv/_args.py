"""Argument normalisation and validation for the public ops: the only place errors are raised.

Every public function calls one ``*_args`` function here before anything is computed. Each
returns the arrays made C-contiguous and batched, the normalised ``ConvGeometry`` and the
array kind (``"numpy"`` or ``"cupy"``), so backends can trust what they receive.
"""
from __future__ import annotations

import functools
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._types import ConvGeometry

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
REDUCTIONS = ("mean", "sum", "none")
# Strides, dilations and paddings beyond this cannot index anything a kernel can hold (the
# kernels use 64-bit offsets, but no tensor of 2**31 rows fits in memory either).
MAX_OPTION = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Array kinds
# ---------------------------------------------------------------------------------------------
def array_kind(a: Any, name: str = "argument") -> str:
    """Return ``"numpy"`` or ``"cupy"`` for an array, without importing CuPy.

    Anything else (a list, a NumPy scalar, a torch tensor, ...) is a ``TypeError`` naming the
    argument ``name``.
    """
    if isinstance(a, np.ndarray):
        return "numpy"
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    hint = ""
    if module == "torch":
        hint = "; for torch tensors use fastconv.torch (or pass tensor.numpy())"
    elif isinstance(a, (list, tuple, numbers.Number, np.generic)):
        hint = "; wrap it with numpy.asarray(...)"
    raise TypeError(f"{name} must be a NumPy or CuPy array, got "
                    f"{type(a).__module__}.{type(a).__name__}{hint}")


def common_kind(named: dict[str, Any]) -> str:
    """The array kind shared by all non-None arrays in ``named``; mixing kinds is an error."""
    kinds = {name: array_kind(a, name) for name, a in named.items() if a is not None}
    found = set(kinds.values())
    if len(found) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"arguments mix NumPy and CuPy arrays ({desc}); move them to one device")
    return found.pop()


def array_module(kind: str):
    """The NumPy-like module for an array kind."""
    if kind == "numpy":
        return np
    import cupy  # only reached with CuPy arrays, so CuPy is installed

    return cupy


def _float_dtype(named: dict[str, Any]) -> np.dtype:
    """The common float dtype of the arrays in ``named`` (float32 or float64, all equal)."""
    dtypes = {n: np.dtype(a.dtype) for n, a in named.items() if a is not None}
    for name, dt in dtypes.items():
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {dt}; fastconv supports float32 and float64")
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"arguments must share one dtype, got {desc}")
    return next(iter(dtypes.values()))


def _contiguous(xp, a):
    return None if a is None else xp.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------
# Scalars, pairs and padding
# ---------------------------------------------------------------------------------------------
def _int(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r}")
    return int(v)


def pair(v: Any, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise an int or a pair of ints to ``(h, w)``, each in ``[minimum, MAX_OPTION]``."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        out = (_int(v[0], name), _int(v[1], name))
    else:
        i = _int(v, name)
        out = (i, i)
    if min(out) < minimum:
        word = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {word}, got {v!r}")
    if max(out) > MAX_OPTION:
        raise ValueError(f"{name} must be at most 2**31 - 1, got {v!r}")
    return out


def normalize_padding(padding: Any, hw: tuple[int, int], rs: tuple[int, int],
                      stride: tuple[int, int],
                      dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Normalise a padding spec to ``(top, bottom, left, right)``.

    Accepts an int, a pair ``(ph, pw)``, ``((top, bottom), (left, right))``, ``"valid"`` or
    ``"same"``. ``"same"`` gives an output of ``ceil(H / stride)`` for any stride, with the odd
    extra pad at the bottom/right (TensorFlow's rule; PyTorch's for stride 1).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            pads = []
            for size, k, s, d in zip(hw, rs, stride, dilation):
                total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        raise ValueError(f"padding must be an int, a pair, ((top, bottom), (left, right)), "
                         f"'valid' or 'same'; got the string {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
            isinstance(p, (tuple, list)) for p in padding):
        (t, b), (l, r) = (pair(p, "padding", minimum=0) for p in padding)
        return (t, b, l, r)
    ph, pw = pair(padding, "padding", minimum=0)
    return (ph, ph, pw, pw)


def conv_geometry(x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any,
                  dilation: Any, groups: Any) -> ConvGeometry:
    """Validate a convolution's shapes and options and return its ``ConvGeometry``.

    ``x_shape`` is ``(N, C, H, W)`` and ``w_shape`` is ``(K, C // groups, R, S)``.
    """
    args = (tuple(x_shape), tuple(w_shape), stride, padding, dilation, groups)
    if all(_plain(v) for v in args[2:]):
        return _cached_geometry(*args)
    return _geometry(*args)


def _plain(v: Any) -> bool:
    """Whether an option value may key the geometry cache: ints, strings and tuples of them.
    Bools, floats and lists are validated afresh every time (``True == 1`` and ``1.0 == 1``
    as dict keys, but both must still be rejected)."""
    t = type(v)
    return t is int or t is str or (t is tuple and all(_plain(i) for i in v))


def _geometry(x_shape, w_shape, stride, padding, dilation, groups) -> ConvGeometry:
    N, C, H, W = (int(v) for v in x_shape)
    K, Cg, R, S = (int(v) for v in w_shape)
    groups = _int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    if C % groups:
        raise ValueError(f"input channels C={C} are not divisible by groups={groups}")
    if K % groups:
        raise ValueError(f"weight has K={K} filters, not divisible by groups={groups}")
    if Cg * groups != C:
        raise ValueError(f"weight expects C/groups={Cg} input channels per group, but the input "
                         f"has C={C} channels and groups={groups} (C/groups={C // groups})")
    # N = 0 (an empty batch) and C = 0 (a sum over no channels) have well-defined results;
    # the dispatch gives them to the "empty" algorithm. No filter, no kernel tap or no pixel
    # leaves nothing to convolve: PyTorch refuses those too.
    if K < 1:
        raise ValueError(f"weight has K={K} filters; a convolution needs at least one "
                         f"(weight {tuple(w_shape)})")
    if min(R, S) < 1:
        raise ValueError(f"weight must have a non-empty R x S kernel, got {tuple(w_shape)}")
    if min(H, W) < 1:
        raise ValueError(f"input must have non-empty H x W planes, got {tuple(x_shape)}")
    sh_sw = pair(stride, "stride")
    dh_dw = pair(dilation, "dilation")
    pads = normalize_padding(padding, (H, W), (R, S), sh_sw, dh_dw)
    Hp, Wp = H + pads[0] + pads[1], W + pads[2] + pads[3]
    eff_r, eff_s = dh_dw[0] * (R - 1) + 1, dh_dw[1] * (S - 1) + 1
    if eff_r > Hp or eff_s > Wp:
        raise ValueError(f"the (dilated) kernel {eff_r}x{eff_s} is larger than the padded input "
                         f"{Hp}x{Wp}")
    P = (Hp - eff_r) // sh_sw[0] + 1
    Q = (Wp - eff_s) // sh_sw[1] + 1
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, sh_sw, pads, dh_dw, groups)


# Training repeats the same few geometries every step; only valid ones are cached (an invalid
# call raises before anything is stored), so every error is still raised on every call.
_cached_geometry = functools.lru_cache(maxsize=1024)(_geometry)


# ---------------------------------------------------------------------------------------------
# Convolution calls
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvCall:
    """A validated convolution call: batched contiguous arrays plus geometry."""

    kind: str
    dtype: np.dtype
    geom: ConvGeometry
    batched: bool
    arrays: dict

    def unbatch(self, out):
        """Drop the batch axis again when the user gave an unbatched ``(C, H, W)`` tensor."""
        return out if self.batched else out[0]


def _check_ndim(a: Any, name: str, ndims: tuple[int, ...], what: str) -> None:
    if a.ndim not in ndims:
        raise ValueError(f"{name} must be {what}, got shape {tuple(a.shape)}")


def _batched_shape(shape: Any, name: str) -> tuple[tuple[int, ...], bool]:
    if not isinstance(shape, (tuple, list)) or len(shape) not in (3, 4):
        raise ValueError(f"{name} must be (N, C, H, W) or (C, H, W), got {shape!r}")
    shape = tuple(_int(v, name) for v in shape)
    return (shape if len(shape) == 4 else (1,) + shape), len(shape) == 4


def _finish(kind: str, named: dict, geom: ConvGeometry, batched: bool) -> ConvCall:
    dtype = _float_dtype(named)
    xp = array_module(kind)
    arrays = {}
    for name, a in named.items():
        if a is not None and a.ndim == 3 and name in ("x", "grad_output"):
            a = a[None]
        arrays[name] = _contiguous(xp, a)
    return ConvCall(kind, dtype, geom, batched, arrays)


def _check_grad_output(grad_output: Any, geom: ConvGeometry) -> None:
    got = tuple(grad_output.shape) if grad_output.ndim == 4 else (1,) + tuple(grad_output.shape)
    if got != geom.output_shape:
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)}, but this "
                         f"convolution's output is {geom.output_shape} (N, K, P, Q)")


def conv_forward_args(x, weight, bias, stride, padding, dilation, groups) -> ConvCall:
    """Validate ``conv2d`` arguments: x ``(N, C, H, W)`` or ``(C, H, W)``, weight
    ``(K, C/groups, R, S)``, bias ``(K,)`` or None."""
    kind = common_kind({"x": x, "weight": weight, "bias": bias})
    _check_ndim(x, "x", (3, 4), "(N, C, H, W) or (C, H, W)")
    _check_ndim(weight, "weight", (4,), "(K, C/groups, R, S)")
    batched = x.ndim == 4
    x_shape = x.shape if batched else (1,) + tuple(x.shape)
    geom = conv_geometry(x_shape, weight.shape, stride, padding, dilation, groups)
    if bias is not None and tuple(bias.shape) != (geom.K,):
        raise ValueError(f"bias must have shape ({geom.K},), got {tuple(bias.shape)}")
    return _finish(kind, {"x": x, "weight": weight, "bias": bias}, geom, batched)


def conv_input_grad_args(input_shape, weight, grad_output, stride, padding, dilation,
                         groups) -> ConvCall:
    """Validate ``conv2d_input_grad`` arguments."""
    kind = common_kind({"weight": weight, "grad_output": grad_output})
    shape, batched = _batched_shape(input_shape, "input_shape")
    _check_ndim(weight, "weight", (4,), "(K, C/groups, R, S)")
    _check_ndim(grad_output, "grad_output", (4,) if batched else (3,),
                "(N, K, P, Q)" if batched else "(K, P, Q) for an unbatched input_shape")
    geom = conv_geometry(shape, weight.shape, stride, padding, dilation, groups)
    _check_grad_output(grad_output, geom)
    return _finish(kind, {"weight": weight, "grad_output": grad_output}, geom, batched)


def conv_weight_grad_args(x, weight_shape, grad_output, stride, padding, dilation,
                          groups) -> ConvCall:
    """Validate ``conv2d_weight_grad`` arguments."""
    kind = common_kind({"x": x, "grad_output": grad_output})
    _check_ndim(x, "x", (3, 4), "(N, C, H, W) or (C, H, W)")
    batched = x.ndim == 4
    _check_ndim(grad_output, "grad_output", (x.ndim,),
                "(N, K, P, Q)" if batched else "(K, P, Q) for an unbatched x")
    if not isinstance(weight_shape, (tuple, list)) or len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be (K, C/groups, R, S), got {weight_shape!r}")
    w_shape = tuple(_int(v, "weight_shape") for v in weight_shape)
    x_shape = x.shape if batched else (1,) + tuple(x.shape)
    geom = conv_geometry(x_shape, w_shape, stride, padding, dilation, groups)
    _check_grad_output(grad_output, geom)
    return _finish(kind, {"x": x, "grad_output": grad_output}, geom, batched)


def conv_bias_grad_args(grad_output) -> ConvCall:
    """Validate ``conv2d_bias_grad``: grad_output ``(N, K, P, Q)`` or ``(K, P, Q)``.

    The geometry is that of a 1x1 convolution with ``C = K``, ``H = P`` and ``W = Q``: all the
    bias gradient depends on.
    """
    kind = common_kind({"grad_output": grad_output})
    _check_ndim(grad_output, "grad_output", (3, 4), "(N, K, P, Q) or (K, P, Q)")
    N, K, P, Q = grad_output.shape if grad_output.ndim == 4 else (1,) + tuple(grad_output.shape)
    geom = ConvGeometry(N, K, P, Q, K, 1, 1, P, Q)
    return _finish(kind, {"grad_output": grad_output}, geom, True)


# ---------------------------------------------------------------------------------------------
# Hinge loss calls
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HingeCall:
    """A validated hinge-loss call. ``scores`` is ``(N, C)``; ``row_scale`` is ``(1,)`` or
    ``(N,)``: d(returned loss)/d(l_i) times the upstream gradient."""

    kind: str
    dtype: np.dtype
    batched: bool
    reduction: str
    scores: Any
    labels: Any
    margin: float
    p: int
    class_weight: Any
    row_scale: Any


def _labels(labels: Any, kind: str, N: int, C: int, batched: bool):
    xp = array_module(kind)
    if isinstance(labels, numbers.Integral) and not isinstance(labels, (bool, np.bool_)):
        labels = xp.asarray(labels)
    elif (label_kind := array_kind(labels, "labels")) != kind:
        raise TypeError(f"labels is a {label_kind} array but scores is {kind}; "
                        f"move them to one device")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    want = (N,) if batched else ()
    if tuple(labels.shape) != want:
        raise ValueError(f"labels must have shape {want} to match scores, "
                         f"got {tuple(labels.shape)}")
    labels = labels.reshape(N)
    # The range is checked in the labels' own dtype: a uint64 label of 2**63 + 5 cast to int64
    # first would be reported as a negative number. Every other integer dtype fits int64.
    if kind == "numpy":
        # One pass: read as unsigned integers of the same size, a negative label lies above
        # every class count (min and max were two passes, 84 against 43 us for 262144 labels).
        unsigned = np.dtype(f"{labels.dtype.byteorder}u{labels.dtype.itemsize}")
        if int(labels.view(unsigned).max()) < C:
            return np.ascontiguousarray(labels, dtype=np.int64)
        lo, hi = int(labels.min()), int(labels.max())
    elif labels.dtype != np.uint64:
        # One small kernel and one read-back of its per-block extremes: CuPy's min, max, stack
        # and tolist took about 270 us of host time per call on an H200 (bench/gpu_profile.py).
        from .kernels import cuda as cuda_kernels  # noqa: PLC0415 -- only with CuPy arrays

        labels = xp.ascontiguousarray(labels, dtype=np.int64)
        lo, hi = cuda_kernels.label_range(labels)
    else:  # one device-to-host sync, not two
        lo, hi = (int(v) for v in xp.stack((labels.min(), labels.max())).tolist())
    if lo < 0 or hi >= C:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, {C}) for {C} classes; found {bad}")
    return xp.ascontiguousarray(labels, dtype=np.int64)


def _row_scale(grad_loss: Any, reduction: str, N: int, batched: bool, kind: str, dtype):
    xp = array_module(kind)
    if reduction == "none" and getattr(grad_loss, "ndim", 0) > 0:
        gl = grad_loss
        if (gl_kind := array_kind(gl, "grad_loss")) != kind:
            raise TypeError(f"grad_loss is a {gl_kind} array but scores is {kind}")
        want = (N,) if batched else ()
        if tuple(gl.shape) != want:
            raise ValueError(f"grad_loss must be a scalar or have shape {want} for "
                             f"reduction='none', got {tuple(gl.shape)}")
        return xp.ascontiguousarray(gl.reshape(N), dtype=dtype)
    if not isinstance(grad_loss, numbers.Real) and not (
            hasattr(grad_loss, "shape") and tuple(grad_loss.shape) == ()):
        raise TypeError(f"grad_loss must be a scalar for reduction={reduction!r}, "
                        f"got {type(grad_loss).__name__}")
    scale = float(grad_loss) / (N if reduction == "mean" else 1)
    return _filled(xp, kind, 1, scale, dtype)


# Small CuPy arrays of one value (default class weights, the scalar row scale), one per device,
# length, value and dtype; the oldest goes first beyond _FILLED_MAX. Each CuPy fill cost 25-30 us
# of host time per call on an H200 (bench/gpu_profile.py); NumPy's cost nothing to make.
_FILLED: dict[tuple, Any] = {}
_FILLED_MAX = 64
_FILLED_MAX_LENGTH = 4096
_FILLED_LOCK = threading.Lock()


def _filled(xp, kind: str, n: int, value: float, dtype) -> Any:
    """A read-only-by-convention ``(n,)`` array of ``value``: new for NumPy (and long CuPy
    ones), else made once per device and kept. A kept array is complete before it is handed
    out (its stream is synchronised once), so a kernel on any stream may read it."""
    if kind == "numpy" or n > _FILLED_MAX_LENGTH:
        return xp.full((n,), value, dtype=dtype)
    key = (xp.cuda.runtime.getDevice(), n, value, np.dtype(dtype).str)
    arr = _FILLED.get(key)
    if arr is None:
        arr = xp.full((n,), value, dtype=dtype)
        xp.cuda.get_current_stream().synchronize()
        with _FILLED_LOCK:
            while len(_FILLED) >= _FILLED_MAX:
                del _FILLED[next(iter(_FILLED))]
            _FILLED[key] = arr
    return arr


def hinge_args(scores, labels, margin, p, weight, reduction, grad_loss) -> HingeCall:
    """Validate hinge-loss arguments: scores ``(N, C)`` or ``(C,)``, labels ``(N,)`` or a
    0-d / int label, weight ``(C,)`` or None."""
    kind = common_kind({"scores": scores, "weight": weight})
    _check_ndim(scores, "scores", (1, 2), "(N, C) or (C,)")
    batched = scores.ndim == 2
    N, C = scores.shape if batched else (1, scores.shape[0])
    if N < 1 or C < 1:
        raise ValueError(f"scores must not be empty, got shape {tuple(scores.shape)}")
    dtype = _float_dtype({"scores": scores, "weight": weight})
    if isinstance(p, (bool, np.bool_)) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if not isinstance(margin, numbers.Real) or not math.isfinite(float(margin)):
        raise ValueError(f"margin must be a finite real number, got {margin!r}")
    if abs(float(margin)) > float(np.finfo(dtype).max):
        raise ValueError(f"margin={margin!r} overflows the scores' dtype {dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None and tuple(weight.shape) != (C,):
        raise ValueError(f"weight must have shape ({C},) (one per class), "
                         f"got {tuple(weight.shape)}")
    xp = array_module(kind)
    lab = _labels(labels, kind, N, C, batched)
    cw = _filled(xp, kind, C, 1.0, dtype) if weight is None else xp.ascontiguousarray(weight)
    rs = _row_scale(grad_loss, reduction, N, batched, kind, dtype)
    return HingeCall(kind, dtype, batched, reduction, xp.ascontiguousarray(scores.reshape(N, C)),
                     lab, float(margin), int(p), cw, rs)


# ---------------------------------------------------------------------------------------------
# Transposed convolution
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransposeGeometry:
    """A validated transposed convolution of an input ``(N, C_in, H, W)`` by a weight
    ``(C_in, C_out/groups, R, S)``, viewed as the input gradient of the convolution from the
    output ``(N, C_out, H_out, W_out)`` back to ``(N, C_in, H, W)``.

    When ``output_padding < stride`` on both axes (``direct``) the transposed convolution *is*
    ``conv2d_input_grad`` of that convolution with ``padding``; otherwise (possible when the
    dilation exceeds the stride) it is the input gradient of the unpadded convolution from
    ``full_hw`` (every row/column some tap reaches), cropped at ``(top, left)`` to
    ``out_hw`` with zeros beyond ``full_hw``.
    """

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    output_padding: tuple[int, int]
    out_channels: int
    out_hw: tuple[int, int]
    full_hw: tuple[int, int]

    @property
    def direct(self) -> bool:
        """Whether ``conv2d_input_grad`` with ``padding`` gives the output as it is."""
        return all(o < s for o, s in zip(self.output_padding, self.stride))


def output_padding_pair(output_padding: Any, stride: tuple[int, int],
                        dilation: tuple[int, int]) -> tuple[int, int]:
    """Validate ``output_padding`` of a transposed convolution: an int or a pair of ints,
    each ``>= 0`` and smaller than the stride or the dilation of its axis (PyTorch's rule)."""
    op = pair(output_padding, "output_padding", minimum=0)
    for o, s, d, axis in zip(op, stride, dilation, ("height", "width")):
        if o >= max(s, d):
            raise ValueError(f"output_padding must be smaller than the stride or the dilation "
                             f"of its axis; got {o} on the {axis} with stride {s} and "
                             f"dilation {d}")
    return op


def conv_transpose_geometry(x_shape: Sequence[int], w_shape: Sequence[int], stride: Any,
                            padding: Any, output_padding: Any, dilation: Any,
                            groups: Any) -> TransposeGeometry:
    """Validate a transposed convolution: ``x_shape (N, C_in, H, W)``, ``w_shape
    (C_in, C_out/groups, R, S)``; ``padding`` an int, a pair or ``((top, bottom), (left,
    right))`` (strings are refused: they have no meaning for the transposed op)."""
    _, C, H, W = x_shape
    Cin, Cout_g, R, S = (int(v) for v in w_shape)
    groups = _int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    if Cin != C:
        raise ValueError(f"weight is (C_in={Cin}, C_out/groups, R, S) but the input has "
                         f"C={C} channels")
    if Cin % groups:
        raise ValueError(f"input channels C={C} are not divisible by groups={groups}")
    if min(Cout_g, R, S) < 1:
        raise ValueError(f"weight must not be empty, got shape {tuple(w_shape)}")
    st = pair(stride, "stride")
    dl = pair(dilation, "dilation")
    if isinstance(padding, str):
        raise ValueError(f"padding of a transposed convolution must be an int, a pair or "
                         f"((top, bottom), (left, right)), got {padding!r}")
    pads = normalize_padding(padding, (1, 1), (R, S), st, dl)
    op = output_padding_pair(output_padding, st, dl)
    full = ((H - 1) * st[0] + dl[0] * (R - 1) + 1, (W - 1) * st[1] + dl[1] * (S - 1) + 1)
    out = (full[0] - pads[0] - pads[1] + op[0], full[1] - pads[2] - pads[3] + op[1])
    if min(out) < 1:
        raise ValueError(f"the padding {pads} (top, bottom, left, right) leaves no output: "
                         f"the output would be {out[0]}x{out[1]}")
    return TransposeGeometry(st, pads, dl, groups, op, Cout_g * groups, out, full)
