"""``torch.compile(fullgraph=True)`` of a small CNN of fastconv convs and the hinge loss, in a
fresh process (compiled before anything ran eagerly, where the old adapter crashed inside
Numba's dispatcher): one graph, and training matches eager step for step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

SCRIPT = textwrap.dedent("""
    import copy, json, sys
    import torch
    from torch._inductor.compile_fx import compile_fx
    import fastconv.torch as ft

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ft.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ft.Conv2d(4, 6, 3, stride=2, padding="same"), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5))
    eager_model = copy.deepcopy(model)
    loss_fn = ft.MultiMarginLoss(p=2)

    def step_loss(m, x, y):
        return loss_fn(m(x), y)

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)  # the default backend, inductor

    compiled = torch.compile(step_loss, fullgraph=True, backend=counting_backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 5, (16,), generator=gen)
    curves = {}
    for name, m, fn in (("compiled", model, compiled), ("eager", eager_model, step_loss)):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = fn(m, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = losses
    targets = sorted({str(n.target).removesuffix(".default") for g in graphs for n in g.graph.nodes
                      if n.op == "call_function" and "fastconv" in str(n.target)})
    json.dump({"curves": curves, "graphs": len(graphs), "targets": targets}, sys.stdout)
""")


def test_compile_fullgraph_in_a_fresh_process_trains_like_eager():
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["graphs"] == 1, out  # fullgraph: one forward graph, no breaks
    assert {"fastconv.conv2d", "fastconv.multi_margin_loss"} <= set(out["targets"]), out
    compiled, eager = out["curves"]["compiled"], out["curves"]["eager"]
    assert eager[-1] < eager[0]  # it does train
    for c, e in zip(compiled, eager):
        assert abs(c - e) <= 1e-5 * abs(e), (compiled, eager)
