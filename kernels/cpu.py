"""The ``cpu`` backend: Numba kernels plus NumPy's BLAS ``matmul``, behind the backend contract.

Each entry point maps the ``Algo`` chosen by ``fastconv/dispatch/cpu.py`` to a kernel family:

============  =====================================================  ========================
``algo.name`` what                                                   module
============  =====================================================  ========================
gemm1x1       1x1 stride-1 unpadded: plain GEMMs on the input        ``cpu_conv``
im2col        packed patches (chunked) times the weights by BLAS      ``cpu_conv``
winograd      F(4x4, 3x3) or F(2x2, 3x3) for 3x3 stride-1 layers     ``cpu_winograd``
direct        loops over taps; depthwise, small groups, no workspace  ``cpu_depthwise``
reduce        bias gradient                                          ``cpu_conv``
============  =====================================================  ========================

Threads. Numba's default OpenMP layer keeps its idle workers spinning for milliseconds after
each parallel loop (libgomp's default wait policy, and it is often PyTorch's libgomp, set up
when torch was imported). Those spinning workers starve OpenBLAS's threads in the GEMM that
follows: on 2 cores a 1 ms GEMM took 4 to 15 ms right after a Numba kernel. Unless the user
chose a threading layer, or a parallel Numba loop already ran in this process, this module
selects Numba's ``workqueue`` layer, whose idle workers sleep. That layer does not support
parallel launches from two Python threads at once, so every entry point holds one lock.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Optional

import numba
import numpy as np
from numba.np.ufunc import parallel as _numba_parallel


def _prefer_sleeping_workers() -> None:
    """Select the ``workqueue`` threading layer unless a choice was made before us."""
    if os.environ.get("NUMBA_THREADING_LAYER") or _numba_parallel._is_initialized:
        return
    if str(numba.config.THREADING_LAYER).lower() == "default":
        numba.config.THREADING_LAYER = "workqueue"


_prefer_sleeping_workers()

from . import cpu_jit  # noqa: E402,F401  (one line on stderr when a process first compiles)
from . import cpu_conv, cpu_depthwise, cpu_winograd  # noqa: E402  (after the layer choice)
from .cpu_hinge import hinge_loss_rows as _hinge_loss_rows  # noqa: E402

_LOCK = threading.RLock()


def _serialised(fn):
    """Run ``fn`` holding the backend lock (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LOCK:
            return fn(*args, **kwargs)
    return wrapper


_FORWARD = {
    "gemm1x1": cpu_conv.forward_gemm1x1,
    "im2col": cpu_conv.forward_im2col,
    "winograd": cpu_winograd.forward,
    "direct": cpu_depthwise.forward,
}
_INPUT_GRAD = {
    "gemm1x1": cpu_conv.input_grad_gemm1x1,
    "im2col": cpu_conv.input_grad_col2im,
    "winograd": cpu_winograd.input_grad,
    "direct": cpu_depthwise.input_grad,
}
_WEIGHT_GRAD = {
    "gemm1x1": cpu_conv.weight_grad_gemm1x1,
    "im2col": cpu_conv.weight_grad_im2col,
    "winograd": cpu_winograd.weight_grad,
    "direct": cpu_depthwise.weight_grad,
}
ALGORITHMS = tuple(_FORWARD)


@_serialised
def conv2d_forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
                   algo) -> np.ndarray:
    """Conv forward: x ``(N, C, H, W)``, weight ``(K, C/G, R, S)``, bias ``(K,)`` or None;
    returns ``(N, K, P, Q)`` in the input's dtype."""
    return _FORWARD[algo.name](x, weight, bias, geom, algo)


@_serialised
def conv2d_input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient ``(N, C, H, W)`` from weight ``(K, C/G, R, S)`` and grad_output
    ``(N, K, P, Q)``."""
    return _INPUT_GRAD[algo.name](weight, grad_output, geom, algo)


@_serialised
def conv2d_weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Weight gradient ``(K, C/G, R, S)`` from x ``(N, C, H, W)`` and grad_output
    ``(N, K, P, Q)``; reduced over the batch in a fixed order."""
    return _WEIGHT_GRAD[algo.name](x, grad_output, geom, algo)


@_serialised
def conv2d_bias_grad(grad_output: np.ndarray, algo) -> np.ndarray:
    """Bias gradient ``(K,)``: grad_output ``(N, K, P, Q)`` summed over N, P, Q."""
    return cpu_conv.bias_grad_reduce(grad_output, algo)


hinge_loss_rows = _serialised(_hinge_loss_rows)
