"""The one place that decides which backend and which algorithm run a call, and why.

Backend, in order of precedence: the per-call ``backend=`` argument, ``set_backend(name)``,
the ``FASTCONV_BACKEND`` environment variable, then the arrays' kind (NumPy arrays go to the
best available CPU backend, ``cpu`` before ``reference``; CuPy arrays go to ``cuda``).
Algorithm: each backend's rules in ``fastconv/dispatch/<backend>.py`` (``choose(...)``).
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import _empty
from .._types import Algo, ConvGeometry

BACKENDS = ("reference", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32")
DEFAULT_WORKSPACE_MB = 256

# name -> (module holding the kernels, array kind it takes)
_MODULES = {
    "reference": ("fastconv.reference", "numpy"),
    "cpu": ("fastconv.kernels.cpu", "numpy"),
    "cuda": ("fastconv.kernels.cuda", "cupy"),
}
_AUTO = {"numpy": ("cpu", "reference"), "cupy": ("cuda",)}

_state: dict[str, Optional[str]] = {"backend": None, "precision": None}
_availability: dict[str, tuple[bool, str]] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------
def _probe(name: str) -> tuple[bool, str]:
    if name == "reference":
        return True, "plain NumPy, always available"
    if name == "cpu":
        try:
            importlib.import_module(_MODULES["cpu"][0])
        except Exception as exc:  # ImportError, or Numba failing against this NumPy
            return False, f"the Numba kernels cannot be imported ({exc})"
        return True, "Numba kernels"
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:
        return False, f"CuPy cannot be imported ({exc}); install fastconv[cuda12] or [cuda13]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no usable CUDA driver/GPU ({exc})"
    if count < 1:
        return False, "CuPy sees no CUDA GPU"
    return True, f"CUDA C++ kernels on {count} GPU(s)"


def availability(name: str) -> tuple[bool, str]:
    """``(available, why)`` for a backend name; probed once per process."""
    _check_name(name)
    if name not in _availability:
        _availability[name] = _probe(name)
    return _availability[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, e.g. ``['reference', 'cpu']``."""
    return [name for name in BACKENDS if availability(name)[0]]


def _check_name(name: Any) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------
# Process-wide settings
# ---------------------------------------------------------------------------------------------
def set_backend(name: Optional[str]) -> None:
    """Make ``name`` the backend for every call in this process (``None``: automatic again).

    A per-call ``backend=`` still wins. Raises ``ValueError`` for an unknown name and
    ``BackendUnavailableError`` for one that cannot run here.
    """
    if name is not None:
        _require(name)
    _state["backend"] = name


def get_backend() -> str:
    """The process-wide backend choice in force: a name, or ``"auto"`` (by array kind)."""
    if _state["backend"] is not None:
        return _state["backend"]
    return os.environ.get("FASTCONV_BACKEND") or "auto"


def set_precision(precision: str) -> None:
    """Choose the arithmetic of the CUDA conv kernels: ``"fp32"`` (strict, the default) or
    ``"tf32"`` (tensor cores, about 1e-3 relative error). ``FASTCONV_PRECISION`` sets the same.
    The CPU backends always compute in the input's precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _state["precision"] = precision


def get_precision() -> str:
    """The conv precision in force: ``"fp32"`` unless set to ``"tf32"``."""
    prec = _state["precision"] or os.environ.get("FASTCONV_PRECISION") or "fp32"
    if prec not in PRECISIONS:
        raise ValueError(f"FASTCONV_PRECISION must be one of {PRECISIONS}, got {prec!r}")
    return prec


def workspace_bytes() -> int:
    """The largest scratch buffer an algorithm may allocate (``FASTCONV_WORKSPACE_MB``)."""
    raw = os.environ.get("FASTCONV_WORKSPACE_MB", "")
    try:
        mb = float(raw) if raw else DEFAULT_WORKSPACE_MB
    except ValueError:
        raise ValueError(f"FASTCONV_WORKSPACE_MB must be a number, got {raw!r}") from None
    if not math.isfinite(mb) or mb <= 0:
        raise ValueError(f"FASTCONV_WORKSPACE_MB must be a positive finite number of MiB, "
                         f"got {raw!r}")
    return int(mb * 2**20)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------
def _require(name: str) -> None:
    ok, why = availability(name)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why}")


def select_backend(kind: str, backend: Optional[str] = None) -> tuple[str, str]:
    """Pick the backend for arrays of ``kind`` (``"numpy"``/``"cupy"``); returns
    ``(name, reason)``. Raises when the choice cannot take arrays of this kind."""
    if backend is not None:
        name, why = backend, f"backend={backend!r} passed to the call"
    elif _state["backend"] is not None:
        name, why = _state["backend"], f"set_backend({_state['backend']!r})"
    elif os.environ.get("FASTCONV_BACKEND"):
        name = os.environ["FASTCONV_BACKEND"]
        why = f"FASTCONV_BACKEND={name}"
    else:
        for name in _AUTO[kind]:
            if availability(name)[0]:
                what = "NumPy" if kind == "numpy" else "CuPy"
                return name, f"{what} arrays go to the best available backend, {name!r}"
        _require(_AUTO[kind][-1])
    _check_name(name)
    takes = _MODULES[name][1]
    if takes != kind:
        what = {"numpy": "NumPy", "cupy": "CuPy"}
        raise TypeError(f"backend {name!r} ({why}) takes {what[takes]} arrays, but the "
                        f"arguments are {what[kind]} arrays")
    _require(name)
    return name, why


@functools.lru_cache(maxsize=None)
def backend_module(name: str):
    """The module implementing backend ``name`` (imported on first use)."""
    return importlib.import_module(_MODULES[name][0])


def choose_algorithm(name: str, op: str, geom: Optional[ConvGeometry], dtype: np.dtype,
                     scores_shape: Optional[tuple[int, int]] = None) -> Algo:
    """Ask backend ``name``'s rules which algorithm runs ``op`` on this shape."""
    if _is_empty(op, geom):
        return Algo("empty", (), "nothing to compute (N = 0 or C = 0 or an empty grad_output): "
                    "the result is the bias broadcast, zeros or empty, the same on every backend")
    # The cuda rules read the current device (multiprocessors, compute capability), so the
    # device is part of the cache key: two different GPUs in one process get their own choice.
    device = importlib.import_module("cupy").cuda.Device().id if name == "cuda" else None
    return _choose(name, op, geom, np.dtype(dtype), get_precision(), workspace_bytes(),
                   scores_shape, device)


def _is_empty(op: str, geom: Optional[ConvGeometry]) -> bool:
    if geom is None:
        return False
    if op == "bias_grad":  # its geometry is grad_output's: (N, K, P, Q) as (N, C, H, W)
        return 0 in geom.input_shape
    return _empty.is_empty(geom)


@functools.lru_cache(maxsize=4096)
def _choose(name: str, op: str, geom: Optional[ConvGeometry], dtype: np.dtype, precision: str,
            workspace: int, scores_shape: Optional[tuple[int, int]],
            device: Optional[int]) -> Algo:
    # The rules are pure functions of these arguments (and of the device), so a call repeated
    # with the same shapes (every training step) skips them: the per-call host overhead
    # matters for small GPU calls.
    rules = importlib.import_module(f"fastconv.dispatch.{name}")
    return rules.choose(op, geom, dtype, precision=precision, workspace_bytes=workspace,
                        scores_shape=scores_shape)


@dataclass(frozen=True)
class Plan:
    """Which backend and algorithm run one call, and why."""

    op: str
    backend: str
    backend_reason: str
    algo: Algo

    @property
    def module(self):
        # The "empty" algorithm is one module for every backend (fastconv/_empty.py).
        return _empty if self.algo.name == "empty" else backend_module(self.backend)

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.algo.params)
        return (f"{self.op}: backend {self.backend!r} ({self.backend_reason}); algorithm "
                f"{self.algo.name!r}{f' [{params}]' if params else ''} ({self.algo.reason})")


def plan(op: str, kind: str, dtype: np.dtype, geom: Optional[ConvGeometry] = None, *,
         backend: Optional[str] = None,
         scores_shape: Optional[tuple[int, int]] = None) -> Plan:
    """Backend and algorithm for ``op`` (``"forward"``, ``"input_grad"``, ``"weight_grad"``,
    ``"bias_grad"`` or ``"hinge"``) on arrays of ``kind``."""
    name, why = select_backend(kind, backend)
    algo = choose_algorithm(name, op, geom, dtype, scores_shape)
    return Plan(op, name, why, algo)
