"""The PyTorch adapter against PyTorch itself: conv module and functional, multi-margin loss,
gradcheck, double backward, state dicts, replace_conv2d (hooks, identity, warnings), a swapped
model's training curve, and the CUDA path where present (``gpu`` mark)."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastconv.torch as ft  # noqa: E402
from fastconv import dispatch  # noqa: E402
from fastconv._args import normalize_padding, pair  # noqa: E402

from conftest import CASES, CASE_IDS, assert_close  # noqa: E402

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _torch_padding(padding, stride):
    """The padding as torch.nn.functional.conv2d takes it, or None when it cannot."""
    if isinstance(padding, str):
        return padding if padding == "valid" or stride == 1 else None
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        return None
    return padding


def _torch_conv(x, w, b, case):
    """PyTorch's own result for a case, padding explicitly where F.conv2d cannot."""
    padding = _torch_padding(case.padding, case.stride)
    if padding is None:
        top, bottom, left, right = normalize_padding(
            case.padding, x.shape[-2:], (case.R, case.S), pair(case.stride, "stride"),
            pair(case.dilation, "dilation"))
        x, padding = F.pad(x, (left, right, top, bottom)), 0
    return F.conv2d(x, w, b, case.stride, padding, case.dilation, case.groups)


def _leaves(case, dtype, seed=0):
    x, w, b = case.arrays(dtype, seed)
    return [None if a is None else torch.tensor(a, requires_grad=True) for a in (x, w, b)]


def _grads(out, inputs, gy):
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, gy))
    return [None if t is None else next(grads) for t in inputs]


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_functional_conv2d_matches_torch(case, dtype):
    dtype = np.dtype(dtype)
    ours_in, ref_in = _leaves(case, dtype), _leaves(case, dtype)
    out = ft.conv2d(*ours_in, **case.kwargs)
    ref = _torch_conv(*ref_in, case)
    assert out.dtype == TORCH_DTYPE[dtype] and out.shape == ref.shape
    assert_close(out.detach().numpy(), ref.detach().numpy(), dtype)
    gy = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    for got, want in zip(_grads(out, ours_in, gy), _grads(ref, ref_in, gy)):
        if want is not None:
            assert_close(got.numpy(), want.numpy(), dtype)


def test_functional_conv2d_unbatched_same_valid():
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    for padding in ("same", "valid", 1, (2, 0)):
        out = ft.conv2d(x, w, padding=padding, dilation=(2, 1))
        ref = F.conv2d(x, w, padding=padding, dilation=(2, 1))
        assert out.shape == ref.shape and out.dim() == 3
        assert_close(out.detach().numpy(), ref.detach().numpy())
        gx, gw = torch.autograd.grad(out.sum(), (x, w))
        rx, rw = torch.autograd.grad(ref.sum(), (x, w))
        assert_close(gx.numpy(), rx.numpy())
        assert_close(gw.numpy(), rw.numpy())


def test_strided_same_padding_extends_torch():
    """PyTorch refuses padding="same" with a stride; fastconv gives ceil(H / stride)."""
    x, w = torch.randn(1, 2, 9, 8), torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, stride=2, padding="same")
    out = ft.conv2d(x, w, stride=2, padding="same")
    assert tuple(out.shape) == (1, 3, 5, 4)
    assert_close(out.numpy(), F.conv2d(F.pad(x, (0, 1, 1, 1)), w, stride=2).numpy())


@pytest.mark.parametrize("kwargs", [
    dict(stride=2, padding=1),
    dict(padding=((1, 0), (2, 1)), dilation=(2, 1), groups=2),
    dict(stride=(1, 2), padding="same"),
], ids=["stride2", "asym_groups", "same_s12"])
def test_conv2d_gradcheck(kwargs):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 4 // kwargs.get("groups", 1), 3, 2, dtype=torch.float64, generator=gen,
                    requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ft.conv2d(*t, **kwargs), (x, w, b))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_matches_torch_and_state_dicts_swap(mode):
    torch.manual_seed(5)
    ref = torch.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                          groups=2, padding_mode=mode, dtype=torch.float64)
    torch.manual_seed(5)
    ours = ft.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                     padding_mode=mode, dtype=torch.float64)
    assert isinstance(ours, torch.nn.Conv2d)
    # Same constructor, same random draws: the initialisation is PyTorch's, bit for bit.
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    out, want = ours(x), ref(x)
    assert_close(out.detach().numpy(), want.detach().numpy())
    gy = torch.randn_like(want)
    got = torch.autograd.grad(out, (x, ours.weight, ours.bias), gy)
    exp = torch.autograd.grad(want, (x, ref.weight, ref.bias), gy)
    for g, e in zip(got, exp):
        assert_close(g.numpy(), e.numpy())
    assert torch.autograd.gradcheck(ours, (x[:1, :, :5, :4].detach().requires_grad_(),))


def test_state_dict_loads_both_ways():
    ref = torch.nn.Conv2d(3, 5, 3, padding="same", bias=True)
    ours = ft.Conv2d(3, 5, 3, padding="same")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert_close(ours(x).detach().numpy(), ref(x).detach().numpy())
    with torch.no_grad():
        ours.weight.mul_(-2)
    ref.load_state_dict(ours.state_dict())
    assert_close(ref(x).detach().numpy(), ours(x).detach().numpy())
    nobias = ft.Conv2d(3, 5, 1, bias=False)
    assert set(nobias.state_dict()) == set(torch.nn.Conv2d(3, 5, 1, bias=False).state_dict())


def test_double_backward_matches_torch():
    """Once silently wrong (once_differentiable): the gradient of a gradient penalty."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for conv in (ft.conv2d, F.conv2d):
        gx, = torch.autograd.grad(conv(x, w).square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, w)))
    for got, want in zip(*results):
        assert_close(got.numpy(), want.numpy())


def test_conv2d_rejects_what_fastconv_cannot_run():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(TypeError, match="dtype"):
        ft.conv2d(x.double(), w)
    with pytest.raises(TypeError, match="dtype"):
        ft.conv2d(x.int(), w.int())
    with pytest.raises(ValueError, match="groups"):
        ft.conv2d(x, w, groups=2)
    with pytest.raises(ValueError, match="stride"):
        ft.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="input must be"):
        ft.conv2d(x[0, 0], w)


# ---------------------------------------------------------------------------------------------
# Multi-margin loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_multi_margin_loss_matches_torch(reduction, p, weighted, dtype):
    gen = torch.Generator().manual_seed(p)
    scores = torch.randn(7, 5, dtype=dtype, generator=gen, requires_grad=True)
    target = torch.randint(0, 5, (7,), generator=gen)
    weight = torch.rand(5, dtype=dtype, generator=gen) + 0.5 if weighted else None
    kw = dict(p=p, margin=0.8, weight=weight, reduction=reduction)
    out = ft.multi_margin_loss(scores, target, **kw)
    ref = F.multi_margin_loss(scores, target, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert_close(out.detach().numpy(), ref.detach().numpy(), np_dtype)
    gy = torch.rand(ref.shape, dtype=dtype, generator=gen) + 0.5
    got, = torch.autograd.grad(out, scores, gy)
    want, = torch.autograd.grad(ref, scores, gy)
    assert_close(got.numpy(), want.numpy(), np_dtype)


@pytest.mark.parametrize("shapes", [((5,), ()), ((5,), (1,)), ((1, 5), ()), ((), ()),
                                    ((), (1,))], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_margin_loss_unbatched_and_0d(shapes, reduction):
    in_shape, t_shape = shapes
    scores = torch.randn(in_shape, dtype=torch.float64, requires_grad=True)
    target = torch.full(t_shape, 3 if in_shape else 0, dtype=torch.long)
    out = ft.multi_margin_loss(scores, target, reduction=reduction)
    ref = F.multi_margin_loss(scores, target, reduction=reduction)
    assert out.shape == ref.shape
    assert_close(out.detach().numpy(), ref.detach().numpy())
    got, = torch.autograd.grad(out.sum(), scores)
    want, = torch.autograd.grad(ref.sum(), scores)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-15)


def test_multi_margin_loss_module_and_legacy_flags():
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    ref = torch.nn.MultiMarginLoss(p=2, margin=0.5, weight=weight, reduction="sum")
    ours = ft.MultiMarginLoss(p=2, margin=0.5, weight=weight, reduction="sum")
    assert isinstance(ours, torch.nn.MultiMarginLoss)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    scores, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 1])
    assert_close(ours(scores, target).numpy(), ref(scores, target).numpy())
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        kw = dict(size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning, match="deprecated") as ours_warned:
            got = ft.multi_margin_loss(scores, target, **kw)
        with pytest.warns(UserWarning, match="deprecated") as torch_warned:
            want = F.multi_margin_loss(scores, target, **kw)
        assert str(ours_warned[0].message) == str(torch_warned[0].message)
        assert_close(got.numpy(), want.numpy())


def test_multi_margin_loss_gradcheck_and_errors():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.tensor([5, 0, 2, 2])
    weight = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    for p in (1, 2):
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda s: ft.multi_margin_loss(s, target, p, 0.9, weight, reduction=reduction),
                (scores,))
    with pytest.raises(ValueError, match="target"):
        ft.multi_margin_loss(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        ft.multi_margin_loss(scores, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="p must be"):
        ft.multi_margin_loss(scores, target, p=3)


# ---------------------------------------------------------------------------------------------
# A whole model
# ---------------------------------------------------------------------------------------------
def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5))


def _train(model, loss_fn, x, y, steps=6):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_swapped_model_trains_to_the_same_loss_curve():
    torch.manual_seed(0)
    model = _model()
    swapped = copy.deepcopy(model)
    assert ft.replace_conv2d(swapped) == ["0", "2"]
    assert sum(isinstance(m, ft.Conv2d) for m in swapped.modules()) == 2
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    want = _train(model, torch.nn.MultiMarginLoss(), x, y)
    got = _train(swapped, ft.MultiMarginLoss(), x, y)
    assert want[-1] < 0.8 * want[0]  # it does train
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for p, q in zip(swapped.parameters(), model.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_replace_keeps_identity_hooks_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(3, 2, 3, stride=2))
    conv, up = model[0], model[2]
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(("fwd", type(m).__name__)))
    conv.register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", type(m).__name__)))
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    before = model(x)
    assert ft.replace_conv2d(model) == ["0", "2"]
    assert model[0] is conv and model[2] is up  # the same modules, now computing with fastconv
    assert isinstance(conv, ft.Conv2d) and isinstance(up, ft.ConvTranspose2d)
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert repr(conv).startswith("fastconv.Conv2d(2, 3") and "fastconv.ConvTranspose2d" in \
        repr(model)
    seen.clear()
    after = model(x)
    assert_close(after.detach().numpy(), before.detach().numpy(), np.float32)
    after.square().sum().backward()
    assert seen == [("fwd", "Conv2d"), ("bwd", "Conv2d")]
    old = conv.weight.detach().clone()
    opt.step()  # the optimiser built before the swap trains the swapped model
    assert not torch.equal(conv.weight, old)
    assert ft.replace_conv2d(model) == []  # nothing left to swap, no warning


def test_replace_root_module_and_spectral_norm():
    torch.manual_seed(1)
    conv = torch.nn.utils.spectral_norm(torch.nn.Conv2d(2, 4, 3, padding=1))
    ref = copy.deepcopy(conv)
    assert ft.replace_conv2d(conv) == [""]
    assert isinstance(conv, ft.Conv2d)
    x = torch.randn(1, 2, 5, 5)
    conv.eval(), ref.eval()
    assert_close(conv(x).detach().numpy(), ref(x).detach().numpy(), np.float32)


def test_replace_warns_naming_what_it_skipped():
    class MyConv(torch.nn.Conv2d):
        pass

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), MyConv(2, 2, 3),
                                torch.nn.LazyConv2d(2, 3), torch.nn.Conv2d(2, 2, 1))
    torch.nn.utils.parametrize.register_parametrization(model[3], "weight",
                                                         torch.nn.Identity())
    with pytest.warns(UserWarning) as record:
        assert ft.replace_conv2d(model) == ["0"]
    message = str(record[0].message)
    assert "1 (MyConv): a subclass" in message
    assert "2 (LazyConv2d): lazy module" in message
    assert "3 (ParametrizedConv2d): parametrized" in message
    assert type(model[1]) is MyConv and type(model[2]) is torch.nn.LazyConv2d


# ---------------------------------------------------------------------------------------------
# CUDA tensors (DLPack to CuPy on PyTorch's current stream)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_tensors_on_a_side_stream_match_cpu():
    ok, why = dispatch.availability("cuda")
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs a GPU, CuPy and a CUDA build of PyTorch ({why})")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 9, 8, generator=gen)
    w, b = torch.randn(6, 3, 3, 3, generator=gen), torch.randn(6, generator=gen)
    s, t = torch.randn(4, 6, generator=gen), torch.tensor([0, 5, 2, 1])
    leaves = [a.clone().requires_grad_() for a in (x, w, b, s)]
    cuda_leaves = [a.cuda().requires_grad_() for a in (x, w, b, s)]
    results = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the copies to the GPU ran on the default
    for (xx, ww, bb, ss), tt, stream in ((leaves, t, None), (cuda_leaves, t.cuda(), side)):
        # The CUDA run goes on a side stream: the adapter must follow PyTorch's current one.
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            y = ft.conv2d(xx, ww, bb, stride=2, padding="same")
            loss = y.square().mean() + ft.multi_margin_loss(ss, tt, p=2)
            grads = torch.autograd.grad(loss, (xx, ww, bb, ss))
        torch.cuda.synchronize()
        results.append([y.detach().cpu(), *(g.cpu() for g in grads)])
    for got, want in zip(results[1], results[0]):
        assert_close(got.numpy(), want.numpy(), np.float32, factor=10)
