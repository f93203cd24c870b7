"""Every kind of bad input raises a clear error naming the argument, before any kernel runs."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv

X = np.zeros((2, 4, 8, 8), np.float32)
W = np.zeros((6, 2, 3, 3), np.float32)
GY = np.zeros((2, 6, 6, 6), np.float32)
S = np.zeros((3, 5), np.float32)
Y = np.array([0, 4, 2])


class FakeCupyArray:
    """Stands in for a CuPy array: fastconv tells array kinds apart by their module."""

    __module__ = "cupy._core.core"
    ndim, shape, dtype = 4, (6, 2, 3, 3), np.dtype(np.float32)


CONV_ERRORS = [
    (dict(x=np.zeros((4, 8, 8, 1, 1), np.float32)), ValueError, "x must be"),
    (dict(x=np.zeros((8, 8), np.float32)), ValueError, "x must be"),
    (dict(w=np.zeros((6, 2, 3), np.float32)), ValueError, "weight must be"),
    (dict(groups=3), ValueError, "C=4 are not divisible by groups=3"),
    (dict(w=np.zeros((6, 4, 3, 3), np.float32), groups=2), ValueError, "C/groups"),
    (dict(w=np.zeros((5, 2, 3, 3), np.float32), groups=2), ValueError, "K=5 filters"),
    (dict(groups=0), ValueError, "groups must be positive"),
    (dict(groups=2.0), TypeError, "groups must be an int"),
    (dict(stride=0), ValueError, "stride must be positive"),
    (dict(stride=(1, -2)), ValueError, "stride must be positive"),
    (dict(stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
    (dict(stride=1.5), TypeError, "stride must be an int"),
    (dict(dilation=0), ValueError, "dilation must be positive"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding=((1, -1), (0, 0))), ValueError, "padding must be >= 0"),
    (dict(padding="full"), ValueError, "'valid' or 'same'"),
    (dict(w=np.zeros((6, 2, 11, 3), np.float32)), ValueError, "11x3 is larger than the pad"),
    (dict(w=np.zeros((6, 2, 5, 3), np.float32), dilation=3), ValueError, "larger than the pad"),
    (dict(b=np.zeros(5, np.float32)), ValueError, "bias must have shape \\(6,\\)"),
    (dict(x=X.astype(np.int32)), TypeError, "x has dtype int32"),
    (dict(x=X.astype(np.float16), w=W.astype(np.float16)), TypeError, "float16"),
    (dict(w=W.astype(np.float64)), TypeError, "share one dtype"),
    (dict(x=X.tolist()), TypeError, "x must be a NumPy or CuPy array, got builtins.list"),
    (dict(w=W.tolist()), TypeError, "weight must be a NumPy or CuPy array"),
    (dict(b=np.float32(1.0)), TypeError, "bias must be a NumPy or CuPy array.*numpy.asarray"),
    (dict(stride=10**30), ValueError, "stride must be at most 2\\*\\*31 - 1"),
    (dict(dilation=(1, 2**31)), ValueError, "dilation must be at most"),
    (dict(padding=10**30), ValueError, "padding must be at most"),
    (dict(w=np.zeros((0, 2, 3, 3), np.float32)), ValueError, "K=0 filters"),
    (dict(w=np.zeros((6, 2, 0, 3), np.float32)), ValueError, "non-empty R x S"),
    (dict(x=np.zeros((2, 4, 0, 8), np.float32)), ValueError, "non-empty H x W"),
    (dict(w=FakeCupyArray()), TypeError, "mix NumPy and CuPy"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("bad,exc,msg", CONV_ERRORS, ids=[m for _, _, m in CONV_ERRORS])
def test_conv2d_errors(bad, exc, msg):
    args = dict(x=X, w=W, b=None, stride=1, padding=1, dilation=1, groups=2, backend=None)
    args.update(bad)
    with pytest.raises(exc, match=msg):
        fastconv.conv2d(args["x"], args["w"], args["b"], args["stride"], args["padding"],
                        args["dilation"], args["groups"], backend=args["backend"])


def test_input_grad_errors():
    with pytest.raises(ValueError, match="grad_output has shape"):
        fastconv.conv2d_input_grad(X.shape, W, GY[:, :, :5], groups=2)
    with pytest.raises(ValueError, match="input_shape must be"):
        fastconv.conv2d_input_grad((8, 8), W, GY, groups=2)
    with pytest.raises(ValueError, match="grad_output must be"):
        fastconv.conv2d_input_grad(X.shape, W, GY[0], groups=2)
    with pytest.raises(TypeError, match="share one dtype"):
        fastconv.conv2d_input_grad(X.shape, W, GY.astype(np.float64), groups=2)


def test_weight_grad_errors():
    with pytest.raises(ValueError, match="grad_output has shape"):
        fastconv.conv2d_weight_grad(X, W.shape, GY, padding=1, groups=2)
    with pytest.raises(ValueError, match="weight_shape must be"):
        fastconv.conv2d_weight_grad(X, (6, 2, 3), GY, groups=2)
    with pytest.raises(ValueError, match="C/groups"):
        fastconv.conv2d_weight_grad(X, (6, 3, 3, 3), GY, groups=2)


def test_bias_grad_errors():
    with pytest.raises(ValueError, match="grad_output must be"):
        fastconv.conv2d_bias_grad(np.zeros((6, 6), np.float32))
    with pytest.raises(TypeError, match="dtype int64"):
        fastconv.conv2d_bias_grad(np.zeros((2, 6, 3, 3), np.int64))


HINGE_ERRORS = [
    (dict(scores=np.zeros((2, 3, 4), np.float32)), ValueError, "scores must be"),
    (dict(scores=S.astype(np.int64)), TypeError, "scores has dtype int64"),
    (dict(labels=np.array([0, 5, 1])), ValueError, "labels must lie in \\[0, 5\\)"),
    (dict(labels=np.array([0, -1, 1])), ValueError, "found -1"),
    (dict(labels=np.array([0.0, 1.0, 2.0])), TypeError, "labels must be integers"),
    (dict(labels=np.array([0, 1])), ValueError, "labels must have shape \\(3,\\)"),
    (dict(p=3), ValueError, "p must be 1 or 2"),
    (dict(p=True), ValueError, "p must be 1 or 2"),
    (dict(margin=float("nan")), ValueError, "margin must be a finite"),
    (dict(margin="1"), ValueError, "margin must be a finite"),
    (dict(margin=1e39), ValueError, "margin=1e\\+39 overflows the scores' dtype float32"),
    (dict(scores=S.tolist()), TypeError, "scores must be a NumPy or CuPy array"),
    (dict(labels=[0, 4, 2]), TypeError, "labels must be a NumPy or CuPy array"),
    (dict(labels=np.array([0, 2**63 + 5, 1], np.uint64)), ValueError, "found 9223372036854775813"),
    # the range check reads labels as unsigned integers of their own size and byte order
    (dict(labels=np.array([0, -3, 1], np.int8)), ValueError, "found -3"),
    (dict(labels=np.array([0, -128, 1], np.int8)), ValueError, "found -128"),
    (dict(labels=np.array([0, 1, -2], ">i4")), ValueError, "found -2"),
    (dict(labels=np.array([0, 1, 300], ">u2")), ValueError, "found 300"),
    (dict(labels=np.array([2, 0, -1, 5, 1], np.int16)[::2]), ValueError, "found -1"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(weight=np.ones(4, np.float32)), ValueError, "weight must have shape \\(5,\\)"),
    (dict(weight=np.ones(5, np.float64)), TypeError, "share one dtype"),
    (dict(grad_loss=np.ones(3, np.float32)), TypeError, "grad_loss must be a scalar"),
    (dict(reduction="none", grad_loss=np.ones(4, np.float32)), ValueError, "grad_loss must be"),
    (dict(backend="cuda"), TypeError, "backend 'cuda' .* takes CuPy arrays"),
]


@pytest.mark.parametrize("bad,exc,msg", HINGE_ERRORS, ids=[m for _, _, m in HINGE_ERRORS])
def test_hinge_errors(bad, exc, msg):
    args = dict(scores=S, labels=Y, margin=1.0, p=1, weight=None, reduction="mean",
                grad_loss=1.0, backend=None)
    args.update(bad)
    backend = args.pop("backend")
    with pytest.raises(exc, match=msg):
        fastconv.hinge_loss_grad(*args.values(), backend=backend)


def test_unbatched_scores_need_scalar_label():
    with pytest.raises(ValueError, match="labels must have shape \\(\\)"):
        fastconv.hinge_loss(S[0], np.array([1]))


def test_torch_tensor_named_with_hint():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="x must be a NumPy or CuPy array.*fastconv.torch"):
        fastconv.conv2d(torch.zeros(2, 4, 8, 8), W, groups=2)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "0", "-3", "lots"])
def test_workspace_variable_named(monkeypatch, raw):
    monkeypatch.setenv("FASTCONV_WORKSPACE_MB", raw)
    with pytest.raises(ValueError, match="FASTCONV_WORKSPACE_MB must be"):
        fastconv.conv2d(X, W, groups=2)
