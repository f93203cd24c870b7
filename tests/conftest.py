"""Shared test fixtures: the backend fixture, the conv case list, tolerances and array moves.

Every backend is tested against the float64 NumPy reference on the same explicit case list.
GPU backends carry the ``gpu`` mark and skip where no GPU is present.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import fastconv
from fastconv import dispatch


def pytest_configure(config):
    """Under compute-sanitizer (``FASTCONV_TEST_CUDA_MALLOC=1``, see bench/device_check.sh):
    every CuPy array gets its own cudaMalloc, so a kernel's access past an array's end falls
    outside any allocation and is reported; CuPy's memory pool would hide it in a larger one."""
    if os.environ.get("FASTCONV_TEST_CUDA_MALLOC") == "1":
        import cupy

        cupy.cuda.set_allocator(None)


TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-11}
DTYPES = (np.float32, np.float64)


@dataclass(frozen=True)
class ConvCase:
    """One convolution configuration of the shared case list."""

    name: str
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    bias: bool = True

    @property
    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self) -> tuple:
        return (self.K, self.C // self.groups, self.R, self.S)

    def arrays(self, dtype, seed: int = 0):
        """Fresh seeded random ``x, weight, bias`` (bias None when the case has none)."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.x_shape).astype(dtype)
        w = rng.standard_normal(self.w_shape).astype(dtype)
        b = rng.standard_normal(self.K).astype(dtype) if self.bias else None
        return x, w, b


CASES = [
    ConvCase("basic3x3", 2, 3, 7, 6, 4, 3, 3, padding=1),
    ConvCase("nonsquare", 2, 3, 9, 5, 4, 3, 2),
    ConvCase("stride2", 2, 4, 9, 10, 6, 3, 3, stride=2, padding=1),
    ConvCase("stride3", 1, 2, 11, 8, 3, 3, 3, stride=3),
    ConvCase("stride_2x1", 2, 3, 8, 7, 2, 2, 3, stride=(2, 1), padding=(1, 0)),
    ConvCase("dilation2", 2, 3, 10, 9, 4, 3, 3, dilation=2, padding=2),
    ConvCase("groups2", 2, 4, 8, 8, 6, 3, 3, padding=1, groups=2),
    ConvCase("depthwise", 2, 5, 8, 7, 5, 3, 3, padding=1, groups=5),
    ConvCase("depthwise_x2", 2, 3, 7, 7, 6, 3, 3, stride=2, padding=1, groups=3),
    ConvCase("asym_pad", 2, 3, 6, 7, 4, 3, 3, padding=((1, 2), (0, 3))),
    ConvCase("same_s2", 2, 3, 9, 8, 4, 3, 3, stride=2, padding="same"),
    ConvCase("same_even4x4", 1, 2, 7, 6, 3, 4, 4, padding="same", bias=False),
    ConvCase("valid", 2, 3, 8, 8, 4, 3, 3, padding="valid"),
    ConvCase("batch1_c1", 1, 1, 6, 6, 2, 3, 3, padding=1),
    ConvCase("1x1", 2, 8, 5, 5, 4, 1, 1),
    ConvCase("1x1_s2", 2, 6, 7, 6, 5, 1, 1, stride=2),
    ConvCase("whole_image", 2, 3, 5, 4, 3, 5, 4),
    ConvCase("stem7x7s2", 1, 3, 16, 16, 4, 7, 7, stride=2, padding=3),
    ConvCase("mixed", 2, 4, 9, 11, 6, 2, 3, stride=(2, 1), padding=((0, 1), (2, 1)),
             dilation=(1, 2), groups=2),
    ConvCase("wino3x3", 2, 16, 10, 13, 8, 3, 3, padding=1),
    ConvCase("wino3x3_valid", 1, 8, 9, 7, 12, 3, 3),
]
CASE_IDS = [c.name for c in CASES]


def rel_err(out: Any, ref: Any) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``||out||`` when ``ref`` is all zeros)."""
    out = np.asarray(to_host(out), dtype=np.float64)
    ref = np.asarray(to_host(ref), dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(out)), "output holds NaN or inf"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def assert_close(out: Any, ref: Any, dtype=None, factor: float = 1.0) -> None:
    """Relative error under the dtype's tolerance (1e-5 float32, 1e-11 float64)."""
    dt = np.dtype(dtype if dtype is not None else to_host(ref).dtype)
    err = rel_err(out, ref)
    assert err < TOLERANCE[dt] * factor, f"relative error {err:.3g} >= {TOLERANCE[dt] * factor}"


def central_difference(f, a: np.ndarray, index, eps: float = 1e-6) -> float:
    """``(f() - f())/(2 eps)`` with ``a[index]`` moved by ``+-eps`` in place (then restored)."""
    old = a[index]
    a[index] = old + eps
    hi = f()
    a[index] = old - eps
    lo = f()
    a[index] = old
    return (hi - lo) / (2 * eps)


def to_host(a: Any) -> Any:
    """A NumPy copy of a NumPy or CuPy array (other values pass through)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a


def to_backend(a: Any, backend: str) -> Any:
    """Move a NumPy array to the array kind that ``backend`` takes."""
    if a is None or backend != "cuda" or not isinstance(a, np.ndarray):
        return a
    import cupy

    return cupy.asarray(a)


def _backend_param(name: str):
    marks = [pytest.mark.gpu] if name == "cuda" else []
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[_backend_param(n) for n in dispatch.BACKENDS])
def backend(request) -> str:
    """Every backend in turn; those that cannot run here are skipped, saying why."""
    name = request.param
    ok, why = dispatch.availability(name)
    if not ok:
        if name == "cpu":
            pytest.fail(f"the cpu backend must run wherever fastconv is installed: {why}")
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> ConvCase:
    return request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(autouse=True)
def _fresh_dispatch_state(monkeypatch):
    """No test leaks a process-wide backend or precision choice into the next."""
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    monkeypatch.delenv("FASTCONV_PRECISION", raising=False)
    yield
    fastconv.set_backend(None)
    dispatch._state["precision"] = None
