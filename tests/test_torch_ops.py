"""fastconv's PyTorch custom ops: opcheck, double backward, export, FX, and the drop-in
details (empty batch, meta tensors, channels_last, half precision, autocast, padding specs)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastconv.torch as ft  # noqa: E402

from conftest import assert_close  # noqa: E402

ops = torch.ops.fastconv


def _rand(gen, *shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration, AOT dispatch (dynamic shapes)
# ---------------------------------------------------------------------------------------------
CONV = ([2, 1], [1, 0, 2, 1], [1, 2], 2)  # stride, [top, bottom, left, right], dilation, groups


def _conv_operands(gen):
    x, w, b = _rand(gen, 2, 4, 7, 6), _rand(gen, 6, 2, 3, 2), _rand(gen, 6)
    y = ops.conv2d(x, w, b, *CONV)
    return x, w, b, _rand(gen, *y.shape)


@pytest.mark.parametrize("op", ["conv2d", "conv2d_input_grad", "conv2d_weight_grad",
                                "multi_margin_loss", "multi_margin_loss_grad"])
def test_opcheck(op):
    gen = torch.Generator().manual_seed(0)
    x, w, b, gy = _conv_operands(gen)
    scores, target = _rand(gen, 5, 4), torch.tensor([0, 3, 1, 1, 2])
    weight = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5
    args = {
        "conv2d": (x, w, b, *CONV),
        "conv2d_input_grad": (list(x.shape), w, gy, *CONV),
        "conv2d_weight_grad": (x, list(w.shape), gy, *CONV),
        "multi_margin_loss": (scores, target, 2, 0.7, weight, "mean"),
        "multi_margin_loss_grad": (_rand(gen, 5), scores, target, 2, 0.7, weight, "none"),
    }[op]
    result = torch.library.opcheck(getattr(ops, op).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("shapes", [
    ((1, 8, 32, 32), (8, 8, 3, 3), 1),    # winograd (its weight gradient comes transposed)
    ((2, 16, 10, 10), (16, 16, 3, 3), 2),  # im2col
    ((2, 16, 8, 8), (8, 16, 1, 1), 1),     # gemm1x1
    ((2, 4, 6, 6), (4, 1, 3, 3), 1),       # depthwise direct
], ids=["winograd", "im2col", "gemm1x1", "direct"])
def test_op_outputs_are_contiguous_as_the_fakes_say(shapes):
    """torch.compile trusts the fake's strides (inductor asserts them): every algorithm's
    result must come back C-contiguous."""
    x_shape, w_shape, stride = shapes
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(x_shape, generator=gen)
    w = torch.randn(w_shape, generator=gen)
    conv = ([stride, stride], [w_shape[2] // 2] * 4, [1, 1], x_shape[1] // w_shape[1])
    y = ops.conv2d(x, w, None, *conv)
    gx = ops.conv2d_input_grad(list(x.shape), w, y, *conv)
    gw = ops.conv2d_weight_grad(x, list(w.shape), y, *conv)
    for t in (y, gx, gw):
        assert t.is_contiguous(), t.stride()
    assert torch.library.opcheck(ops.conv2d_weight_grad.default,
                                 (x, list(w.shape), y, *conv),
                                 test_utils=("test_faketensor",))["test_faketensor"] == "SUCCESS"


# ---------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(stride=2, padding=1),
    dict(stride=(1, 2), padding="same"),
    dict(padding=((1, 0), (2, 1)), dilation=(2, 1), groups=2),
    dict(padding="valid", dilation=2),
], ids=["stride2", "same_s12", "asym_dil_groups", "valid_dil2"])
def test_conv2d_gradgradcheck(kwargs):
    gen = torch.Generator().manual_seed(0)
    x = _rand(gen, 2, 4, 6, 5)
    w = _rand(gen, 2, 4 // kwargs.get("groups", 1), 3, 2)
    b = _rand(gen, 2)
    assert torch.autograd.gradgradcheck(lambda *t: ft.conv2d(*t, **kwargs), (x, w, b))


def test_grad_ops_gradgradcheck():
    """The gradient ops' own backward (third order of the conv) is checked too."""
    gen = torch.Generator().manual_seed(1)
    x, w, _, gy = _conv_operands(gen)
    assert torch.autograd.gradgradcheck(
        lambda w_, gy_: ops.conv2d_input_grad(list(x.shape), w_, gy_, *CONV), (w, gy))
    assert torch.autograd.gradgradcheck(
        lambda x_, gy_: ops.conv2d_weight_grad(x_, list(w.shape), gy_, *CONV), (x, gy))


def test_gradient_penalty_matches_torch():
    """The issue's case: conv -> sum -> grad(create_graph) -> penalty -> grad w.r.t. weight."""
    gen = torch.Generator().manual_seed(2)
    x, w = _rand(gen, 2, 3, 8, 8), _rand(gen, 5, 3, 3, 3)
    results = []
    for conv in (ft.conv2d, F.conv2d):
        y = torch.tanh(conv(x, w, None, 2, 1))
        gx, = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert gx.requires_grad
        results.append(torch.autograd.grad(gx.square().sum(), (x, w)))
    for got, want in zip(*results):
        assert_close(got.numpy(), want.numpy())


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_margin_loss_gradgradcheck(p, reduction):
    gen = torch.Generator().manual_seed(3)
    scores = _rand(gen, 4, 6)
    target = torch.tensor([5, 0, 2, 2])
    weight = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    assert torch.autograd.gradgradcheck(
        lambda s: ft.multi_margin_loss(s, target, p, 0.9, weight, reduction=reduction),
        (scores,))


def _margin_by_formula(scores, target, p, margin, weight):
    """PyTorch's multi-margin loss ("mean") from elementary ops, which PyTorch can
    differentiate twice (its own ``multi_margin_loss`` backward cannot)."""
    N, C = scores.shape
    m = scores - scores.gather(1, target[:, None]) + margin
    h = torch.clamp(m, min=0) * (torch.arange(C) != target[:, None])
    return (weight[target] * (h ** p).sum(1)).sum() / (N * C)


@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin_loss_hessian_matches_torch(p):
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    target = torch.tensor([0, 3, 1, 1, 2])
    weight = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5
    hess = [torch.autograd.functional.hessian(lambda s: fn(s, target, p, 0.8, weight), scores)
            for fn in (ft.multi_margin_loss, _margin_by_formula)]
    np.testing.assert_allclose(hess[0].numpy(), hess[1].numpy(), rtol=1e-12, atol=1e-14)
    if p == 2:
        assert hess[1].abs().sum() > 0  # the check compares something


def test_loss_weight_that_requires_grad_raises():
    scores = torch.randn(3, 4, requires_grad=True)
    weight = torch.rand(4, requires_grad=True)
    loss = ft.multi_margin_loss(scores, torch.tensor([0, 1, 2]), weight=weight)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# torch.export, torch.fx
# ---------------------------------------------------------------------------------------------
class SmallCNN(torch.nn.Module):
    """Two fastconv convs, a transposed conv and the hinge loss."""

    def __init__(self):
        super().__init__()
        self.c1 = ft.Conv2d(1, 4, 3, padding=1)
        self.c2 = ft.Conv2d(4, 6, 3, stride=2, padding="same")
        self.up = ft.ConvTranspose2d(6, 3, 3, stride=2, padding=1, output_padding=1)
        self.fc = torch.nn.Linear(3 * 8 * 8, 5)
        self.loss = ft.MultiMarginLoss()

    def forward(self, x, y):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.loss(self.fc(self.up(h).flatten(1)), y)


def _cnn_inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def test_torch_export():
    torch.manual_seed(0)
    model, (x, y) = SmallCNN(), _cnn_inputs()
    exported = torch.export.export(model, (x, y))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"fastconv.conv2d.default", "fastconv.conv2d_input_grad.default",
            "fastconv.multi_margin_loss.default"} <= targets, targets
    assert torch.equal(exported.module()(x, y), model(x, y))


def test_fx_symbolic_trace():
    torch.manual_seed(0)
    model, (x, y) = SmallCNN(), _cnn_inputs()
    traced = torch.fx.symbolic_trace(model)
    called = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert called.count(ft.conv2d) == 2 and ft.conv_transpose2d in called
    assert ft.multi_margin_loss in called
    assert torch.equal(traced(x, y), model(x, y))


# ---------------------------------------------------------------------------------------------
# Drop-in details
# ---------------------------------------------------------------------------------------------
def test_empty_batch_like_torch():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(0, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    w, b = _rand(gen, 4, 3, 3, 3), _rand(gen, 4)
    y = ft.conv2d(x, w, b, stride=2, padding=1)
    assert y.shape == F.conv2d(x, w, b, stride=2, padding=1).shape == (0, 4, 5, 4)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
    assert gw.shape == w.shape and gb.shape == b.shape
    up = ft.conv_transpose2d(x, w.transpose(0, 1).contiguous(), stride=2, output_padding=1)
    assert up.shape == F.conv_transpose2d(x, w.transpose(0, 1), stride=2,
                                          output_padding=1).shape
    with pytest.raises(ValueError, match="groups"):  # still validated when empty
        ft.conv2d(x, w, groups=2)


def test_meta_tensors():
    x, w = torch.empty(2, 3, 9, 8, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    y = ft.conv2d(x, w, stride=2, padding="same")
    assert y.device.type == "meta" and y.shape == (2, 4, 5, 4)
    up = ft.ConvTranspose2d(4, 3, 3, stride=2, device="meta")(y)
    assert up.device.type == "meta" and up.shape == (2, 3, 11, 9)
    loss = ft.multi_margin_loss(torch.empty(5, 3, device="meta"),
                                torch.zeros(5, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ValueError, match="groups"):
        ft.conv2d(x, w, groups=2)


def test_channels_last_in_channels_last_out():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 7, 6, generator=gen).to(memory_format=torch.channels_last)
    w, b = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(6, generator=gen)
    x.requires_grad_()
    y, ref = ft.conv2d(x, w, b, padding=1), F.conv2d(x, w, b, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert ref.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.detach().numpy(), ref.detach().numpy(), np.float32)
    gx, = torch.autograd.grad(y.square().sum(), x)
    rx, = torch.autograd.grad(ref.square().sum(), x)
    assert_close(gx.numpy(), rx.numpy(), np.float32)
    plain = ft.conv2d(x.contiguous(), w, b, padding=1)
    assert plain.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, 6, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=gen).to(dtype).requires_grad_()
    y = ft.conv2d(x, w, padding=1)
    assert y.dtype == dtype
    want = F.conv2d(x.float(), w.float(), padding=1)
    assert torch.equal(y, want.to(dtype))  # one rounding of the float32 result
    gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
    assert gx.dtype == gw.dtype == dtype
    scores = torch.randn(6, 5, generator=gen).to(dtype)
    target = torch.randint(0, 5, (6,), generator=gen)
    loss = ft.multi_margin_loss(scores, target)
    assert loss.dtype == dtype
    assert torch.equal(loss, F.multi_margin_loss(scores.float(), target).to(dtype))


def test_autocast_like_torch():
    gen = torch.Generator().manual_seed(9)
    x, w = torch.randn(2, 3, 6, 6, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    scores, target = torch.randn(4, 5, generator=gen), torch.tensor([0, 1, 4, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = ft.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1)
        y64 = ft.conv2d(x.double(), w.double())
        up = ft.conv_transpose2d(x, w.transpose(0, 1))
        loss = ft.multi_margin_loss(scores.bfloat16(), target)
        ref_loss = F.multi_margin_loss(scores, target)
    assert y.dtype == ref.dtype == up.dtype == torch.bfloat16
    assert y64.dtype == torch.float64  # autocast leaves float64 alone, as for F.conv2d
    assert torch.equal(y, F.conv2d(x.bfloat16().float(), w.bfloat16().float(),
                                   padding=1).bfloat16())
    assert loss.dtype == ref_loss.dtype == torch.float32


@pytest.mark.parametrize("padding", [0, 2, (1, 0), "valid", "same", ((1, 0), (2, 1))],
                         ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_module_and_functional_take_the_same_padding(padding, stride):
    gen = torch.Generator().manual_seed(10)
    module = ft.Conv2d(3, 4, 3, stride=stride, padding=padding, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=gen)
    want = ft.conv2d(x, module.weight, module.bias, stride, padding)
    assert torch.equal(module(x), want)
    assert "fastconv.Conv2d" in repr(module)
    if padding == "same" and stride == 2:
        assert want.shape[-2:] == (5, 4)
        with pytest.raises(ValueError):
            torch.nn.Conv2d(3, 4, 3, stride=2, padding="same")


def test_strided_same_with_padding_modes_matches_explicit_pad():
    gen = torch.Generator().manual_seed(11)
    module = ft.Conv2d(2, 3, 3, stride=2, padding="same", padding_mode="reflect",
                       dtype=torch.float64)
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=gen)
    want = F.conv2d(F.pad(x, (0, 1, 1, 1), mode="reflect"), module.weight, module.bias, 2)
    assert_close(module(x).detach().numpy(), want.detach().numpy())


# ---------------------------------------------------------------------------------------------
# CUDA tensors (DLPack to CuPy on PyTorch's current stream)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_ops_match_cpu_to_second_order():
    from fastconv import dispatch

    ok, why = dispatch.availability("cuda")
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs a GPU, CuPy and a CUDA build of PyTorch ({why})")
    gen = torch.Generator().manual_seed(12)
    x, w, b, gy = (t.detach() for t in _conv_operands(gen))
    up_w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    scores, target = torch.randn(5, 4, dtype=torch.float64, generator=gen), \
        torch.tensor([0, 3, 1, 1, 2])
    results, halves = [], []
    for device in ("cpu", "cuda"):
        xx, ww, bb, uw, ss = (t.to(device).requires_grad_() for t in (x, w, b, up_w, scores))
        tt = target.to(device)
        y = ft.conv2d(xx.to(memory_format=torch.channels_last), ww, bb, (2, 1),
                      ((1, 0), (2, 1)), (1, 2), 2)
        assert y.is_contiguous(memory_format=torch.channels_last)
        up = ft.conv_transpose2d(xx, uw, stride=2, padding=1, output_padding=1)
        loss = y.square().sum() + up.sin().sum() + ft.multi_margin_loss(ss, tt, p=2)
        grads = torch.autograd.grad(loss, (xx, ww, bb, uw, ss), create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        second = torch.autograd.grad(penalty, (xx, ww, uw, ss))
        empty = ft.conv2d(xx[:0], ww, bb, groups=2)
        half = ft.conv2d(xx.float().bfloat16(), ww.float().bfloat16(), groups=2)
        torch.cuda.synchronize()
        results.append([t.detach().cpu() for t in (y, up, loss, *grads, *second)])
        halves.append(half.detach().cpu())
        assert empty.shape[0] == 0 and empty.device.type == device
    for got, want in zip(results[1], results[0]):
        assert_close(got.numpy(), want.numpy(), np.float64, factor=1e3)
    assert halves[1].dtype == torch.bfloat16
    assert_close(halves[1].double().numpy(), halves[0].double().numpy(), np.float32,
                 factor=1e3)  # float32 sums rounded once to bfloat16 (8 bits)
    for op, args in (("conv2d", (x, w, b, *CONV)),
                     ("multi_margin_loss", (scores, target, 2, 0.7, None, "mean"))):
        cuda_args = tuple(a.cuda().requires_grad_(a.is_floating_point())
                          if isinstance(a, torch.Tensor) else a for a in args)
        result = torch.library.opcheck(getattr(ops, op).default, cuda_args)
        assert set(result.values()) == {"SUCCESS"}, result
