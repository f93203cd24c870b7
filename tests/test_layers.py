"""The framework-free layers: initialisation, padding modes, gradients, loss, SGD, devices.

Gradients are checked against finite differences in float64 (independent of the fold and of
the ops' own gradients), the padding modes also against ``np.pad`` and, when installed,
PyTorch.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import fastconv
from fastconv import dispatch
from fastconv.layers import (SGD, Conv2d, Flatten, Linear, MultiClassHingeLoss, ReLU,
                             Sequential, fold_padding_grad, pad_input)

from conftest import CASES, assert_close, central_difference, rel_err

MODES = ["zeros", "reflect", "replicate", "circular"]
NP_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _numeric_grad(f, a: np.ndarray, eps: float) -> np.ndarray:
    """Central differences of the scalar ``f()`` w.r.t. every element of ``a`` (in place)."""
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        grad[i] = central_difference(f, a, i, eps)
    return grad


def _assert_exact_linear_grads(layer, x: np.ndarray, u: np.ndarray) -> None:
    """For ``loss = sum(layer(x) * u)``, linear in x, weight and bias, central differences are
    exact up to rounding: backward's gradients must match them to 1e-12."""
    def loss() -> float:
        return float(np.sum(layer.forward(x) * u))

    layer.forward(x)
    gx = layer.backward(u)
    assert rel_err(gx, _numeric_grad(loss, x, 1.0)) < 1e-12
    assert rel_err(layer.grad_weight, _numeric_grad(loss, layer.weight, 1.0)) < 1e-12
    assert rel_err(layer.grad_bias, _numeric_grad(loss, layer.bias, 1.0)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------
def test_conv2d_init_is_kaiming_uniform_like_torch():
    layer = Conv2d(32, 64, (3, 5), groups=2, seed=3)
    fan_in = 32 // 2 * 3 * 5
    bound = 1 / math.sqrt(fan_in)
    w, b = layer.weight, layer.bias
    assert w.shape == (64, 16, 3, 5) and w.dtype == np.float32
    assert b.shape == (64,) and b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # U(-b, b) has standard deviation b/sqrt(3); 15360 samples pin it to about 1%.
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.03
    assert abs(w.mean()) < 0.03 * bound
    assert np.abs(w).max() > 0.99 * bound
    again = Conv2d(32, 64, (3, 5), groups=2, seed=3)
    np.testing.assert_array_equal(again.weight, w)
    assert not np.array_equal(Conv2d(32, 64, (3, 5), groups=2, seed=4).weight, w)


def test_init_bound_equals_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 255, 3, groups=3)
    ours = Conv2d(6, 255, 3, groups=3, seed=0)
    # Same distribution: the extremes of 4590 uniform samples lie within 0.2% of the bound.
    for a, t in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
        assert np.abs(a).max() == pytest.approx(t.detach().abs().max().item(), rel=0.02)
    lin, tlin = Linear(40, 300, seed=0), torch.nn.Linear(40, 300)
    assert np.abs(lin.weight).max() == pytest.approx(tlin.weight.detach().abs().max().item(),
                                                     rel=0.02)


def test_linear_init_and_options():
    layer = Linear(20, 7, dtype=np.float64, seed=1)
    assert layer.weight.shape == (7, 20) and layer.weight.dtype == np.float64
    assert np.abs(layer.weight).max() <= 1 / math.sqrt(20)
    assert Linear(20, 7, bias=False).parameters()[0].shape == (7, 20)
    assert len(Linear(20, 7, bias=False).parameters()) == 1
    with pytest.raises(TypeError, match="float32 or float64"):
        Linear(2, 3, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Conv2d with zero padding: the shared case list
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES[:10], ids=[c.name for c in CASES[:10]])
def test_conv2d_layer_matches_reference(case):
    x, w, b = case.arrays(np.float64)
    layer = Conv2d(case.C, case.K, (case.R, case.S), case.stride, case.padding, case.dilation,
                   case.groups, bias=case.bias, dtype=np.float64)
    layer.weight[...] = w
    if case.bias:
        layer.bias[...] = b
    y = layer.forward(x)
    assert_close(y, fastconv.conv2d(x, w, b, **case.kwargs, backend="reference"))
    gy = _rng(1).standard_normal(y.shape)
    gx = layer.backward(gy)
    kw = dict(**case.kwargs, backend="reference")
    assert_close(gx, fastconv.conv2d_input_grad(x.shape, w, gy, **kw))
    assert_close(layer.grad_weight, fastconv.conv2d_weight_grad(x, w.shape, gy, **kw))
    if case.bias:
        assert_close(layer.grad_bias, gy.sum(axis=(0, 2, 3)))
    assert [g is not None for g in layer.gradients()] == [True] * len(layer.parameters())


def test_conv2d_unbatched_and_float32():
    layer = Conv2d(3, 4, 3, padding="same", padding_mode="reflect", seed=0)
    x = _rng().standard_normal((3, 6, 5)).astype(np.float32)
    batched = layer(x[None])
    y = layer(x)
    assert y.shape == (4, 6, 5) and y.dtype == np.float32
    assert_close(y, batched[0])
    gx = layer.backward(np.ones_like(y))
    assert gx.shape == x.shape and gx.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Padding modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", [1, ((2, 1), (0, 3)), "same"], ids=["p1", "asym", "same"])
def test_padding_mode_forward_equals_np_pad(mode, padding):
    layer = Conv2d(2, 3, (3, 2), stride=(2, 1), padding=padding, padding_mode=mode,
                   dtype=np.float64, seed=0)
    x = _rng().standard_normal((2, 2, 7, 6))
    t, b_, l, r = fastconv._args.normalize_padding(padding, (7, 6), (3, 2), (2, 1), (1, 1))
    xpad = np.pad(x, ((0, 0), (0, 0), (t, b_), (l, r)), mode=NP_MODE[mode])
    ref = fastconv.conv2d(xpad, layer.weight, layer.bias, stride=(2, 1), backend="reference")
    assert_close(layer(x), ref)


@pytest.mark.parametrize("mode", MODES)
def test_padding_mode_gradients_equal_finite_differences(mode):
    """The fold of the padded gradient, checked element by element (no shared code path)."""
    layer = Conv2d(2, 3, 3, stride=(1, 2), padding=((2, 1), (1, 2)), dilation=(1, 2),
                   padding_mode=mode, dtype=np.float64, seed=1)
    x = _rng(2).standard_normal((1, 2, 5, 4))
    u = _rng(3).standard_normal(layer(x).shape)
    _assert_exact_linear_grads(layer, x, u)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_fold_is_the_adjoint_of_pad(mode):
    pads = (2, 3, 3, 1)
    x = _rng(4).standard_normal((2, 3, 4, 5))
    padded = pad_input(x, pads, mode)
    g = _rng(5).standard_normal(padded.shape)
    folded = fold_padding_grad(g, pads, mode)
    assert folded.shape == x.shape
    assert np.vdot(padded, g) == pytest.approx(np.vdot(x, folded), rel=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_padding_modes_match_torch(mode):
    torch = pytest.importorskip("torch")
    ref = torch.nn.Conv2d(3, 4, (3, 2), stride=1, padding="same", dilation=(2, 1),
                          padding_mode=mode, dtype=torch.float64)
    ours = Conv2d(3, 4, (3, 2), padding="same", dilation=(2, 1), padding_mode=mode,
                  dtype=np.float64)
    ours.weight[...] = ref.weight.detach().numpy()
    ours.bias[...] = ref.bias.detach().numpy()
    x = _rng(6).standard_normal((2, 3, 6, 5))
    tx = torch.tensor(x, requires_grad=True)
    ty = ref(tx)
    gy = _rng(7).standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(gy))
    assert_close(ours(x), ty.detach().numpy())
    assert_close(ours.backward(gy), tx.grad.numpy())
    assert_close(ours.grad_weight, ref.weight.grad.numpy())
    assert_close(ours.grad_bias, ref.bias.grad.numpy())


def test_padding_mode_errors():
    with pytest.raises(ValueError, match="padding_mode"):
        Conv2d(1, 1, 3, padding_mode="mirror")
    x = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="reflect"):
        Conv2d(1, 1, 3, padding=3, padding_mode="reflect")(x)
    with pytest.raises(ValueError, match="circular"):
        Conv2d(1, 1, 3, padding=4, padding_mode="circular")(x)
    assert Conv2d(1, 1, 3, padding=5, padding_mode="replicate")(x).shape == (1, 1, 11, 11)
    with pytest.raises(ValueError, match="groups"):
        Conv2d(3, 4, 3, groups=2)
    with pytest.raises(RuntimeError, match="before forward"):
        Conv2d(1, 1, 3).backward(np.zeros((1, 1, 1, 1), np.float32))


# ---------------------------------------------------------------------------------------------
# Hinge loss layer
# ---------------------------------------------------------------------------------------------
def test_hinge_layer_lecture_example():
    """Lecture notes 7.1: s = (-3, 1.0, 0.5, -1.0, -0.4), y = 2 gives 1.6."""
    loss = MultiClassHingeLoss()
    scores = np.array([[-3.0, 1.0, 0.5, -1.0, -0.4]])
    assert float(loss(scores, np.array([2]))) == pytest.approx(1.6)
    # Classes 1 and 4 violate the margin; the true class collects minus their count.
    np.testing.assert_allclose(loss.backward(), [[0.0, 1.0, -2.0, 0.0, 1.0]])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p", [1, 2])
def test_hinge_layer_matches_ops(reduction, p):
    rng = _rng(8)
    scores = rng.standard_normal((6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 6)
    weight = rng.uniform(0.5, 2, 4).astype(np.float32)
    layer = MultiClassHingeLoss(margin=0.7, p=p, weight=weight, reduction=reduction)
    out = layer(scores, labels)
    kw = dict(margin=0.7, p=p, weight=weight, reduction=reduction, backend="reference")
    assert_close(out, fastconv.hinge_loss(scores, labels, **kw))
    assert_close(layer.backward(), fastconv.hinge_loss_grad(scores, labels, **kw))
    grad_loss = rng.standard_normal(6).astype(np.float32) if reduction == "none" else 0.3
    got = layer.backward(grad_loss)
    assert got.dtype == np.float32
    assert_close(got, fastconv.hinge_loss_grad(scores, labels, grad_loss=grad_loss, **kw))


def test_hinge_layer_errors_and_unbatched():
    layer = MultiClassHingeLoss(reduction="none")
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward()
    scores = _rng(9).standard_normal((3, 5))
    layer(scores, np.array([0, 4, 2]))
    with pytest.raises(ValueError, match="grad_loss"):
        layer.backward(np.ones(2))
    mean = MultiClassHingeLoss()
    mean(scores, np.array([0, 4, 2]))
    with pytest.raises(ValueError, match="scalar"):
        mean.backward(np.ones(3))
    assert mean.backward(np.float64(2.0)).shape == (3, 5)
    single = MultiClassHingeLoss(reduction="none")
    assert single(scores[1], 4).shape == ()
    assert single.backward(np.array(2.0)).shape == (5,)


# ---------------------------------------------------------------------------------------------
# ReLU, Linear, and a whole chain
# ---------------------------------------------------------------------------------------------
def test_relu_forward_backward():
    x = np.array([[-1.0, 0.0, 2.0], [3.0, -0.5, 0.0]], np.float32)
    relu = ReLU()
    np.testing.assert_array_equal(relu(x), [[0, 0, 2], [3, 0, 0]])
    g = relu.backward(np.full_like(x, 5))
    np.testing.assert_array_equal(g, [[0, 0, 5], [5, 0, 0]])
    assert g.dtype == np.float32 and relu.parameters() == []


def test_linear_gradients_equal_finite_differences():
    layer = Linear(5, 3, dtype=np.float64, seed=2)
    x = _rng(10).standard_normal((4, 5))
    u = _rng(11).standard_normal((4, 3))
    _assert_exact_linear_grads(layer, x, u)


def _small_net(dtype=np.float64, mode: str = "zeros") -> Sequential:
    return Sequential(Conv2d(1, 3, 3, padding=1, padding_mode=mode, dtype=dtype, seed=0),
                      ReLU(),
                      Conv2d(3, 4, 3, stride=2, padding=1, dtype=dtype, seed=1),
                      ReLU(), Flatten(), Linear(4 * 3 * 3, 5, dtype=dtype, seed=2))


def test_chain_gradient_equals_finite_differences():
    """conv -> ReLU -> conv -> ReLU -> linear -> hinge, in the spirit of the notes' 7.2."""
    net, loss = _small_net(mode="reflect"), MultiClassHingeLoss(p=2)
    x = _rng(12).standard_normal((3, 1, 6, 6))
    labels = np.array([0, 3, 1])

    def f() -> float:
        return float(loss(net(x), labels))

    f()
    gx = net.backward(loss.backward())
    grads = [g.copy() for g in net.gradients()]
    # Away from ReLU and hinge kinks the chain is smooth: eps 1e-6 gives ~1e-9 accuracy.
    assert rel_err(gx, _numeric_grad(f, x, 1e-6)) < 1e-6
    for p, g in zip(net.parameters(), grads):
        assert rel_err(g, _numeric_grad(f, p, 1e-6)) < 1e-6
    # Training needs no gradient for the data: the first layer then skips it.
    f()
    assert net.backward(loss.backward(), input_grad=False) is None
    for g, again in zip(grads, net.gradients()):
        np.testing.assert_array_equal(g, again)


# ---------------------------------------------------------------------------------------------
# SGD and training
# ---------------------------------------------------------------------------------------------
def test_sgd_plain_and_momentum_steps():
    layer = Linear(2, 2, dtype=np.float64, seed=0)
    w0 = layer.weight.copy()
    g1, g2 = np.full((2, 2), 1.0), np.full((2, 2), 3.0)
    opt = SGD([layer], lr=0.1, momentum=0.9, weight_decay=0.01)
    layer.grad_weight, layer.grad_bias = g1, None  # bias has no gradient yet: left alone
    b0 = layer.bias.copy()
    opt.step()
    d1 = g1 + 0.01 * w0
    w1 = w0 - 0.1 * d1
    np.testing.assert_allclose(layer.weight, w1, rtol=1e-15)
    np.testing.assert_array_equal(layer.bias, b0)
    layer.grad_weight = g2
    opt.step()
    buf = 0.9 * d1 + (g2 + 0.01 * w1)
    np.testing.assert_allclose(layer.weight, w1 - 0.1 * buf, rtol=1e-15)
    with pytest.raises(ValueError, match="lr"):
        SGD([layer], lr=0.0)


def test_sgd_matches_torch_optimizer():
    torch = pytest.importorskip("torch")
    layer = Linear(3, 2, dtype=np.float64, seed=0)
    tw = torch.tensor(layer.weight.copy(), requires_grad=True)
    opt, topt = SGD([layer], lr=0.05, momentum=0.8), torch.optim.SGD([tw], lr=0.05, momentum=0.8)
    for step in range(3):
        g = _rng(step).standard_normal((2, 3))
        layer.grad_weight, layer.grad_bias = g, np.zeros(2)
        tw.grad = torch.tensor(g)
        opt.step()
        topt.step()
    np.testing.assert_allclose(layer.weight, tw.detach().numpy(), rtol=1e-14)


def test_network_trains():
    """Linearly separable blobs: the hinge loss falls and the net classifies them."""
    rng = _rng(13)
    labels = rng.integers(0, 5, 60)
    centres = rng.standard_normal((5, 1, 5, 5)) * 2
    x = (centres[labels] + 0.3 * rng.standard_normal((60, 1, 5, 5))).astype(np.float32)
    net, loss = _small_net(np.float32), MultiClassHingeLoss()
    opt = SGD([net], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        losses.append(float(loss(net(x), labels)))
        net.backward(loss.backward())
        opt.step()
    assert losses[-1] < 0.2 * losses[0]
    assert np.mean(net(x).argmax(axis=1) == labels) > 0.9


def test_digits_demo_reaches_95_percent(monkeypatch):
    """bench/train_digits.py's fastconv run: two epochs already pass 95% test accuracy."""
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import train_digits as demo

    args = demo.parse_args(["--epochs", "2", "--quiet"])
    data = demo.load_digits(args.seed, args.dtype)
    plan = demo.batches(len(data[0]), args.batch_size, args.epochs, args.seed)
    run = demo.fastconv_run(data, plan, args, demo.build_model(args.dtype, args.seed),
                            demo.ProgressBar("fastconv", args.epochs, enabled=False))
    assert run.losses[1] < 0.2 * run.losses[0]
    assert run.accuracies[-1] >= 0.95


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def test_to_cpu_keeps_numpy_and_bad_device_raises():
    layer = Conv2d(2, 3, 3, seed=0)
    w = layer.weight
    assert layer.to("cpu") is layer and layer.weight is w
    with pytest.raises(ValueError, match="device"):
        layer.to("tpu")


def test_to_cuda_without_gpu_says_why():
    if dispatch.availability("cuda")[0]:
        pytest.skip("a GPU is present: the gpu-marked test covers the move")
    with pytest.raises(fastconv.BackendUnavailableError, match="cuda"):
        Conv2d(2, 3, 3).to("cuda")
    with pytest.raises(fastconv.BackendUnavailableError):
        Linear(2, 3, device="cuda")


@pytest.mark.gpu
def test_network_on_cuda_matches_cpu():
    ok, why = dispatch.availability("cuda")
    if not ok:
        pytest.skip(f"no GPU: {why}")
    import cupy

    x = _rng(14).standard_normal((4, 1, 6, 6)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    results = []
    for device in ("cpu", "cuda"):
        net, loss = _small_net(np.float32, mode="circular").to(device), MultiClassHingeLoss()
        xd, ld = (x, labels) if device == "cpu" else (cupy.asarray(x), cupy.asarray(labels))
        value = loss(net(xd), ld)
        gx = net.backward(loss.backward())
        assert type(gx).__module__.split(".")[0] == ("numpy" if device == "cpu" else "cupy")
        results.append([value, gx, *net.gradients()])
        net.to("cpu")
        assert isinstance(net.parameters()[0], np.ndarray)
    for a, b in zip(*results):
        assert_close(a, b, np.float32, factor=10)
