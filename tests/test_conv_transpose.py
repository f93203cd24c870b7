"""Transposed convolution: ``fastconv.conv_transpose2d`` and its gradients (NumPy/CuPy), the
framework-free ``ConvTranspose2d`` layer, and the ``fastconv.torch`` drop-ins, against a loop
oracle written from the definition and against PyTorch, gradients included."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import fastconv
from fastconv.layers import ConvTranspose2d as LayerConvTranspose2d

from conftest import assert_close, to_backend, to_host


@dataclass(frozen=True)
class TCase:
    name: str
    N: int
    Cin: int
    Cout: int
    H: int
    W: int
    R: int
    S: int
    stride: Any = 1
    padding: Any = 0
    output_padding: Any = 0
    groups: int = 1
    dilation: Any = 1

    @property
    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding,
                    output_padding=self.output_padding, groups=self.groups,
                    dilation=self.dilation)

    def arrays(self, dtype, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.N, self.Cin, self.H, self.W)).astype(dtype)
        w = rng.standard_normal((self.Cin, self.Cout // self.groups, self.R, self.S))
        return x, w.astype(dtype), rng.standard_normal(self.Cout).astype(dtype)


CASES = [
    TCase("basic", 2, 3, 4, 5, 4, 3, 3),
    TCase("stride2_op1", 2, 3, 2, 4, 5, 3, 3, stride=2, padding=1, output_padding=1),
    TCase("anisotropic", 1, 2, 3, 4, 3, 3, 2, stride=(2, 3), padding=(1, 0),
          output_padding=(1, 2)),
    TCase("groups_dilation", 2, 4, 6, 4, 4, 3, 3, stride=2, padding=1, output_padding=1,
          groups=2, dilation=2),
    TCase("depthwise", 2, 4, 4, 5, 5, 3, 3, stride=2, padding=1, output_padding=1, groups=4),
    TCase("op_ge_stride", 1, 2, 3, 4, 5, 3, 3, padding=1, output_padding=2, dilation=3),
    TCase("op_ge_stride_s2", 2, 2, 2, 3, 4, 2, 3, stride=(2, 1), padding=(0, 2),
          output_padding=(2, 1), dilation=(3, 2)),
    TCase("per_side_pad", 2, 3, 2, 4, 5, 3, 3, stride=2, padding=((1, 2), (0, 1)),
          output_padding=1),
]
IDS = [c.name for c in CASES]
TORCH_CASES = [c for c in CASES if not isinstance(c.padding[0] if isinstance(
    c.padding, tuple) else c.padding, tuple)]


def loop_conv_transpose(x, w, b, case: TCase) -> np.ndarray:
    """Scatter form, straight from the definition: input pixel (i, j) through tap (r, s) lands
    on output (i*sh + r*dh - top, j*sw + s*dw - left), kept when inside the output."""
    sh, sw = fastconv._args.pair(case.stride, "stride")
    dh, dw = fastconv._args.pair(case.dilation, "dilation")
    oh, ow = fastconv._args.pair(case.output_padding, "output_padding", minimum=0)
    top, bottom, left, right = fastconv._args.normalize_padding(case.padding, (1, 1), (1, 1),
                                                                (1, 1), (1, 1))
    N, Cin, H, W = x.shape
    Cog = w.shape[1]
    Ho = (H - 1) * sh - top - bottom + dh * (case.R - 1) + oh + 1
    Wo = (W - 1) * sw - left - right + dw * (case.S - 1) + ow + 1
    y = np.zeros((N, Cog * case.groups, Ho, Wo))
    cig = Cin // case.groups
    for n in range(N):
        for ci in range(Cin):
            for co in range(Cog):
                k = ci // cig * Cog + co
                for i in range(H):
                    for j in range(W):
                        for r in range(case.R):
                            for s in range(case.S):
                                o, q = i * sh + r * dh - top, j * sw + s * dw - left
                                if 0 <= o < Ho and 0 <= q < Wo:
                                    y[n, k, o, q] += x[n, ci, i, j] * w[ci, co, r, s]
    return y + np.asarray(b, np.float64)[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# NumPy / CuPy ops
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_loop_oracle(case, backend, dtype):
    x, w, b = case.arrays(dtype)
    y = fastconv.conv_transpose2d(*(to_backend(a, backend) for a in (x, w, b)),
                                  **case.kwargs, backend=backend)
    assert y.dtype == dtype and type(y) is type(to_backend(x, backend))
    assert_close(y, loop_conv_transpose(x, w, b, case), dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_are_the_adjoints(case, backend):
    """<T(x, w), g> = <x, input_grad(g)> = <w, weight_grad(x, g)> (T is linear in each)."""
    x, w, _ = case.arrays(np.float64)
    y = loop_conv_transpose(x, w, np.zeros(case.Cout), case)
    g = np.random.default_rng(1).standard_normal(y.shape)
    xb, wb, gb = (to_backend(a, backend) for a in (x, w, g))
    gx = to_host(fastconv.conv_transpose2d_input_grad(x.shape, wb, gb, **case.kwargs,
                                                      backend=backend))
    gw = to_host(fastconv.conv_transpose2d_weight_grad(xb, w.shape, gb, **case.kwargs,
                                                       backend=backend))
    assert gx.shape == x.shape and gw.shape == w.shape
    want = float(np.vdot(y, g))
    assert abs(float(np.vdot(x, gx)) - want) <= 1e-11 * np.linalg.norm(y) * np.linalg.norm(g)
    assert abs(float(np.vdot(w, gw)) - want) <= 1e-11 * np.linalg.norm(y) * np.linalg.norm(g)


def test_unbatched_and_errors():
    case = CASES[1]
    x, w, b = case.arrays(np.float32)
    y = fastconv.conv_transpose2d(x[0], w, b, **case.kwargs)
    assert_close(y, fastconv.conv_transpose2d(x, w, b, **case.kwargs)[0], np.float32)
    gx = fastconv.conv_transpose2d_input_grad(x[0].shape, w, y, **case.kwargs)
    assert gx.shape == x[0].shape
    with pytest.raises(ValueError, match="output_padding"):
        fastconv.conv_transpose2d(x, w, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="output_padding"):
        fastconv.conv_transpose2d(x, w, output_padding=-1)
    with pytest.raises(ValueError, match="C_in"):
        fastconv.conv_transpose2d(x[:, :2], w)
    with pytest.raises(ValueError, match="bias"):
        fastconv.conv_transpose2d(x, w, b[:1])
    with pytest.raises(ValueError, match="padding"):
        fastconv.conv_transpose2d(x, w, padding="same")
    with pytest.raises(ValueError, match="no output"):
        fastconv.conv_transpose2d(x[:, :, :1, :1], w, padding=2)
    with pytest.raises(ValueError, match="grad_output"):
        fastconv.conv_transpose2d_input_grad(x.shape, w, y[:, :, 1:], **case.kwargs)
    with pytest.raises(TypeError, match="dtype"):
        fastconv.conv_transpose2d(x, w.astype(np.float64))


def test_layer_forward_backward_and_init():
    case = CASES[3]
    layer = LayerConvTranspose2d(case.Cin, case.Cout, (case.R, case.S), **case.kwargs,
                                 dtype=np.float64, seed=0)
    assert layer.weight.shape == (case.Cin, case.Cout // case.groups, case.R, case.S)
    bound = 1 / np.sqrt(case.Cout // case.groups * case.R * case.S)  # PyTorch's fan-in
    assert np.abs(layer.weight).max() <= bound and np.abs(layer.weight).max() > 0.8 * bound
    x, _, _ = case.arrays(np.float64)
    y = layer(x)
    assert_close(y, loop_conv_transpose(x, layer.weight, layer.bias, case))
    g = np.random.default_rng(2).standard_normal(y.shape)
    gx = layer.backward(g)
    assert_close(gx, fastconv.conv_transpose2d_input_grad(x.shape, layer.weight, g,
                                                          **case.kwargs))
    assert_close(layer.grad_weight, fastconv.conv_transpose2d_weight_grad(
        x, layer.weight.shape, g, **case.kwargs))
    assert_close(layer.grad_bias, g.sum(axis=(0, 2, 3)))
    assert layer.backward(g, input_grad=False) is None
    assert "ConvTranspose2d(4, 6" in repr(layer)


# ---------------------------------------------------------------------------------------------
# Against PyTorch, and the torch drop-ins
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.name for c in TORCH_CASES])
def test_matches_torch_with_gradients(case):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import fastconv.torch as ft

    x, w, b = case.arrays(np.float64)
    g = np.random.default_rng(3).standard_normal(loop_conv_transpose(x, w, b, case).shape)
    ours = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ref = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    y = ft.conv_transpose2d(*ours, **case.kwargs)
    want = F.conv_transpose2d(*ref, **case.kwargs)
    assert_close(y.detach().numpy(), want.detach().numpy())
    # The NumPy op and its gradients against PyTorch's autograd.
    assert_close(fastconv.conv_transpose2d(x, w, b, **case.kwargs), want.detach().numpy())
    got = torch.autograd.grad(y, ours, torch.tensor(g))
    exp = torch.autograd.grad(want, ref, torch.tensor(g))
    for a, e in zip(got, exp):
        assert_close(a.numpy(), e.numpy())
    assert_close(fastconv.conv_transpose2d_input_grad(x.shape, w, g, **case.kwargs),
                 exp[0].numpy())
    assert_close(fastconv.conv_transpose2d_weight_grad(x, w.shape, g, **case.kwargs),
                 exp[1].numpy())


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]],
                         ids=["anisotropic", "groups_dilation", "op_ge_stride"])
def test_torch_gradcheck_and_gradgradcheck(case):
    torch = pytest.importorskip("torch")
    import fastconv.torch as ft

    x, w, b = case.arrays(np.float64)
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (x[:1, :, :3, :3], w, b))
    fn = lambda *t: ft.conv_transpose2d(*t, **case.kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_torch_module_drop_in():
    torch = pytest.importorskip("torch")
    import fastconv.torch as ft

    kw = dict(stride=(2, 1), padding=(1, 2), output_padding=(1, 0), groups=2, bias=True,
              dilation=(1, 2), dtype=torch.float64)
    torch.manual_seed(3)
    ref = torch.nn.ConvTranspose2d(4, 6, (3, 2), **kw)
    torch.manual_seed(3)
    ours = ft.ConvTranspose2d(4, 6, (3, 2), **kw)
    assert isinstance(ours, torch.nn.ConvTranspose2d)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert repr(ours).startswith("fastconv.ConvTranspose2d(4, 6")
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    for output_size in (None, (10, 2), (9, 2)):
        out, want = ours(x, output_size=output_size), ref(x, output_size=output_size)
        assert out.shape == want.shape
        assert_close(out.detach().numpy(), want.detach().numpy())
        gy = torch.randn_like(want)
        got = torch.autograd.grad(out, (x, ours.weight, ours.bias), gy)
        exp = torch.autograd.grad(want, (x, ref.weight, ref.bias), gy)
        for g, e in zip(got, exp):
            assert_close(g.numpy(), e.numpy())
    unbatched = ours(x[0])
    assert_close(unbatched.detach().numpy(), ref(x[0]).detach().numpy())
