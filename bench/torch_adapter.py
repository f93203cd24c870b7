"""PyTorch adapter benchmark (CPU): what the custom ops cost and what ``torch.compile`` does.

Cases, each first checked, then timed interleaved (median ms):

- ``six_convs``: one training step (forward, ``MultiMarginLoss``, backward) of a model of six
  ``fastconv.torch.Conv2d`` layers, eager and ``torch.compile(fullgraph=True)`` (inductor), and
  the same model with ``torch.nn.Conv2d`` in eager PyTorch. Check: compiled and eager fastconv
  give the same loss and gradients (relative error under the float32 tolerance).
- ``hinge``: ``fastconv.torch.multi_margin_loss`` forward + backward vs PyTorch's on
  ``scores (N, 1000)`` float32 (the backward runs its own fused pass). Check: same loss and
  gradient.

Usage::

    python bench/torch_adapter.py [--quick] [--json PATH] [--threads N]
"""
from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np

import common


def _model(torch: Any, ft: Any, fastconv_convs: bool) -> Any:
    conv = ft.Conv2d if fastconv_convs else torch.nn.Conv2d
    torch.manual_seed(0)
    layers = []
    for cin, cout, stride in ((3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2),
                              (64, 64, 1)):
        layers += [conv(cin, cout, 3, stride=stride, padding=1), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10))


def _step(torch: Any, model: Any, loss_fn: Any, x: Any, y: Any):
    def run():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return run


def _six_convs(torch: Any, ft: Any, args: Any) -> dict:
    gen = torch.Generator().manual_seed(1)
    n = 8 if args.quick else 32
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    eager = _model(torch, ft, True)
    compiled_model = copy.deepcopy(eager)
    reference = _model(torch, ft, False)
    loss_fn = ft.MultiMarginLoss()
    compiled_fwd = torch.compile(lambda m, a, b: loss_fn(m(a), b), fullgraph=True)
    steps = {
        "fastconv_eager": _step(torch, eager, loss_fn, x, y),
        # compiled: the whole forward (model + loss) is one graph; backward as AOT compiled it
        "fastconv_compiled": lambda: _compiled_step(compiled_model, compiled_fwd, x, y),
        "torch_eager": _step(torch, reference, torch.nn.MultiMarginLoss(), x, y),
    }
    l_eager, l_comp = steps["fastconv_eager"](), steps["fastconv_compiled"]()
    err = max([common.rel_error(l_comp.detach().numpy(), l_eager.detach().numpy())] + [
        common.rel_error(p.grad.numpy(), q.grad.numpy())
        for p, q in zip(compiled_model.parameters(), eager.parameters())])
    t = common.measure(steps, repeats=3 if args.quick else 10, warmup=2, settle=0.15)
    row = {"case": "six_convs", "N": n, **{f"{k}_ms": v.ms for k, v in t.items()},
           "compiled_vs_eager": common.speedup(t["fastconv_eager"].median,
                                               t["fastconv_compiled"].median),
           "err": err, "check": "ok" if err < common.tolerance(np.float32) else "FAIL"}
    return row


def _compiled_step(model: Any, compiled_fwd: Any, x: Any, y: Any):
    model.zero_grad(set_to_none=True)
    loss = compiled_fwd(model, x, y)
    loss.backward()
    return loss


def _hinge(torch: Any, ft: Any, args: Any) -> dict:
    gen = torch.Generator().manual_seed(2)
    n = 4096 if args.quick else 16384
    scores = torch.randn(n, 1000, generator=gen, requires_grad=True)
    target = torch.randint(0, 1000, (n,), generator=gen)

    def run(fn):
        def go():
            scores.grad = None
            loss = fn(scores, target)
            loss.backward()
            return loss, scores.grad
        return go

    ours, ref = run(ft.multi_margin_loss), run(torch.nn.functional.multi_margin_loss)
    (lo, go), (lr, gr) = ours(), ref()
    err = max(common.rel_error(lo.detach().numpy(), lr.detach().numpy()),
              common.rel_error(go.numpy(), gr.numpy()))
    t = common.measure({"fastconv": ours, "torch": ref}, repeats=3 if args.quick else 10,
                       warmup=1, settle=0.15)
    return {"case": "hinge", "N": n, "fastconv_ms": t["fastconv"].ms,
            "torch_ms": t["torch"].ms,
            "vs_torch": common.speedup(t["torch"].median, t["fastconv"].median),
            "err": err, "check": "ok" if err < common.tolerance(np.float32) else "FAIL"}


def run(args: Any, torch: Any, threads: int) -> dict:
    if torch is None:
        raise SystemExit("bench/torch_adapter.py needs PyTorch")
    import fastconv.torch as ft

    conv = _six_convs(torch, ft, args)
    common.print_table([conv], ["case", "N", "fastconv_eager_ms", "fastconv_compiled_ms",
                                "torch_eager_ms", "compiled_vs_eager", "err", "check"],
                       title="one training step, 6 convs, float32 (ms: median)")
    hinge = _hinge(torch, ft, args)
    common.print_table([hinge], ["case", "N", "fastconv_ms", "torch_ms", "vs_torch", "err",
                                 "check"],
                       title="multi_margin_loss forward + backward, C=1000 (ms: median)")
    return {"results": [conv, hinge]}


if __name__ == "__main__":
    sys.exit(common.suite_main(run, __doc__.splitlines()[0]))
