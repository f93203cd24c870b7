"""Algorithm rules of the ``reference`` backend: there is one algorithm per op."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._types import Algo, ConvGeometry

_REASONS = {
    "forward": "sum over the R*S kernel taps of strided input windows times the weights",
    "input_grad": "correlation of the stride-dilated, padded grad_output with the 180-degree "
                  "rotated kernel (lecture notes 7.5)",
    "weight_grad": "sum over the R*S kernel taps of input windows times grad_output",
    "bias_grad": "sum of grad_output over N, P and Q",
    "hinge": "vectorised per-row margins, loss and subgradient",
}


def choose(op: str, geom: Optional[ConvGeometry], dtype: np.dtype, *, precision: str,
           workspace_bytes: int, scores_shape: Optional[tuple[int, int]] = None) -> Algo:
    """The reference has a single, readable algorithm per op, computed in float64."""
    return Algo("reference", (), f"NumPy oracle in float64: {_REASONS[op]}")
