"""Backend selection, process-wide settings and explain()."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv
from fastconv import dispatch

X = np.random.default_rng(0).standard_normal((2, 4, 9, 9)).astype(np.float32)
W = np.random.default_rng(1).standard_normal((8, 4, 3, 3)).astype(np.float32)


def test_numpy_goes_to_best_cpu_backend():
    name, why = dispatch.select_backend("numpy")
    assert name == "cpu" and "NumPy arrays" in why
    assert fastconv.available_backends()[:2] == ["reference", "cpu"]


def test_per_call_beats_process_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTCONV_BACKEND", "cpu")
    assert fastconv.get_backend() == "cpu"
    assert fastconv.explain("conv2d", X, W).backend == "cpu"
    fastconv.set_backend("reference")
    assert fastconv.get_backend() == "reference"
    plan = fastconv.explain(fastconv.conv2d, X, W)
    assert plan.backend == "reference" and "set_backend" in plan.backend_reason
    plan = fastconv.explain("conv2d", X, W, backend="cpu")
    assert plan.backend == "cpu" and "passed to the call" in plan.backend_reason
    fastconv.set_backend(None)
    assert "FASTCONV_BACKEND" in fastconv.explain("conv2d", X, W).backend_reason
    monkeypatch.delenv("FASTCONV_BACKEND")
    assert fastconv.get_backend() == "auto"


def test_environment_backend_is_used_by_calls(monkeypatch):
    monkeypatch.setenv("FASTCONV_BACKEND", "reference")
    ref = fastconv.conv2d(X, W, padding=1)
    assert fastconv.explain("conv2d", X, W, padding=1).backend == "reference"
    monkeypatch.setenv("FASTCONV_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fastconv.conv2d(X, W)
    assert ref.shape == (2, 8, 9, 9)


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        fastconv.set_backend("tpu")
    monkeypatch.setitem(dispatch._availability, "cuda", (False, "CuPy sees no CUDA GPU"))
    with pytest.raises(fastconv.BackendUnavailableError, match="no CUDA GPU"):
        fastconv.set_backend("cuda")
    assert "cuda" not in fastconv.available_backends()


def test_cupy_arrays_go_to_cuda(monkeypatch):
    monkeypatch.setitem(dispatch._availability, "cuda", (True, "pretend"))
    name, why = dispatch.select_backend("cupy")
    assert name == "cuda" and "CuPy arrays" in why
    with pytest.raises(TypeError, match="takes NumPy arrays"):
        dispatch.select_backend("cupy", "cpu")


def test_precision_setting(monkeypatch):
    assert fastconv.get_precision() == "fp32"
    monkeypatch.setenv("FASTCONV_PRECISION", "tf32")
    assert fastconv.get_precision() == "tf32"
    fastconv.set_precision("fp32")
    assert fastconv.get_precision() == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        fastconv.set_precision("fp16")


def test_workspace_bound_from_environment(monkeypatch):
    assert dispatch.workspace_bytes() == 256 * 2**20
    monkeypatch.setenv("FASTCONV_WORKSPACE_MB", "1.5")
    assert dispatch.workspace_bytes() == int(1.5 * 2**20)
    monkeypatch.setenv("FASTCONV_WORKSPACE_MB", "-3")
    with pytest.raises(ValueError, match="FASTCONV_WORKSPACE_MB"):
        dispatch.workspace_bytes()


@pytest.mark.parametrize("op,args", [
    ("conv2d", (X, W)),
    ("conv2d_input_grad", (X.shape, W, np.zeros((2, 8, 7, 7), np.float32))),
    ("conv2d_weight_grad", (X, W.shape, np.zeros((2, 8, 7, 7), np.float32))),
    ("conv2d_bias_grad", (np.zeros((2, 8, 7, 7), np.float32),)),
    ("hinge_loss", (np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0]))),
])
def test_explain_every_op(backend, op, args):
    if backend == "cuda":
        pytest.skip("explain with CuPy arrays is covered by the cuda tests")
    plan = fastconv.explain(op, *args, backend=backend)
    assert plan.backend == backend
    assert plan.algo.name and plan.algo.reason
    assert backend in str(plan) and plan.algo.name in str(plan)


def test_explain_validates_like_the_op():
    with pytest.raises(ValueError, match="stride must be positive"):
        fastconv.explain("conv2d", X, W, stride=0)
    with pytest.raises(ValueError, match="explain knows the ops"):
        fastconv.explain("conv3d", X, W)
    with pytest.raises(ValueError, match="explain knows the ops"):
        fastconv.explain(X, W)              # the op forgotten: an array where its name goes
