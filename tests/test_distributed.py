"""Data-parallel training through PyTorch's own engine: 2 processes, gloo over loopback.

A model built from ``fastconv.torch.Conv2d`` is wrapped in ``DistributedDataParallel``; each
rank takes half of a batch. After one SGD step the parameters on both ranks must equal those
of a single-process step on the whole batch (DDP averages the ranks' gradients, and each rank's
mean loss covers an equal half, so the average is the full batch's gradient).
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import fastconv.torch as ft  # noqa: E402

WORLD = 2
LR = 0.2
TIMEOUT_S = 120


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ft.Conv2d(2, 4, 3, padding=1, dtype=torch.float64), torch.nn.ReLU(),
        ft.Conv2d(4, 3, 3, stride=2, padding_mode="circular", padding=1, dtype=torch.float64),
        torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 5, dtype=torch.float64))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(8, 2, 6, 6, dtype=torch.float64, generator=gen),
            torch.randint(0, 5, (8,), generator=gen))


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ft.multi_margin_loss(model(x), y).backward()
    opt.step()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: its half of the batch through DDP, then save the parameters."""
    torch.set_num_threads(1)  # two ranks share the machine's cores
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, y = _batch()
        _step(model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(init_file: str, out_dir: str) -> None:
    procs = mp.spawn(_worker, args=(init_file, out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")


def test_ddp_step_equals_single_process_step(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch build has no gloo distributed backend")
    _spawn(str(tmp_path / "rendezvous"), str(tmp_path))

    single = _model()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    _step(single, *_batch())
    expected = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert not torch.equal(value, before[key]), f"{key} did not change in the step"
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14,
                                       msg=f"rank {rank}: {key}")
