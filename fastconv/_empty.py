"""The ``empty`` algorithm: convolutions with an empty batch (``N = 0``) or no input channels
(``C = 0``), the same on every backend.

Nothing is left to compute, but the results are still defined: an empty batch gives an empty
output ``(0, K, P, Q)`` and zero weight and bias gradients (PyTorch's answer); no input channels
make every output a sum over nothing, so the output is the bias broadcast to ``(N, K, P, Q)``
(zeros without bias), the input gradient is the empty ``(N, 0, H, W)`` and the weight gradient
the empty ``(K, 0, R, S)``. ``fastconv.dispatch`` sends such calls here for every backend,
so all backends agree by construction and no kernel sees an empty array. The functions follow
the backend contract (``docs/backends.md``) and work on NumPy and CuPy arrays alike.
"""
from __future__ import annotations

from typing import Any, Optional

from ._args import array_kind, array_module
from ._types import Algo, ConvGeometry


def _xp(a: Any):
    """NumPy or CuPy, whichever ``a`` belongs to (CuPy is imported only for CuPy arrays)."""
    return array_module(array_kind(a))


def is_empty(geom: ConvGeometry) -> bool:
    """Whether a convolution has nothing to compute: no images or no input channels."""
    return geom.N == 0 or geom.C == 0


def conv2d_forward(x: Any, weight: Any, bias: Optional[Any], geom: ConvGeometry,
                   algo: Optional[Algo] = None) -> Any:
    """``(N, K, P, Q)``: the bias broadcast (a sum over no channels), or zeros."""
    xp = _xp(x)
    y = xp.zeros(geom.output_shape, dtype=x.dtype)
    if bias is not None and y.size:
        y += bias[None, :, None, None]
    return y


def conv2d_input_grad(weight: Any, grad_output: Any, geom: ConvGeometry,
                      algo: Optional[Algo] = None) -> Any:
    """``(N, C, H, W)`` zeros (an empty array: N or C is 0)."""
    return _xp(grad_output).zeros(geom.input_shape, dtype=grad_output.dtype)


def conv2d_weight_grad(x: Any, grad_output: Any, geom: ConvGeometry,
                       algo: Optional[Algo] = None) -> Any:
    """``(K, C/groups, R, S)`` zeros: a sum over no images, or an empty array when C is 0."""
    return _xp(x).zeros(geom.weight_shape, dtype=x.dtype)


def conv2d_bias_grad(grad_output: Any, algo: Optional[Algo] = None) -> Any:
    """``(K,)`` zeros: ``grad_output`` has no element to sum."""
    return _xp(grad_output).zeros(grad_output.shape[1], dtype=grad_output.dtype)
