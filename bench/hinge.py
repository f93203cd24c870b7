"""Hinge loss + gradient benchmark (CPU): fastconv vs the NumPy reference, PyTorch and a copy.

For each case (``scores (N, C)`` float32, random labels) the fused
``fastconv.hinge_loss_and_grad`` (loss and gradient in one pass) is first checked against the
reference backend (and PyTorch's ``MultiMarginLoss``, which divides by C), then timed
interleaved with:

- the ``reference`` backend (same call);
- ``torch.nn.MultiMarginLoss`` forward + backward on the same data, when PyTorch imports;
- ``scores.copy()``: a plain memory copy of the scores, the bandwidth yardstick. The fused pass
  moves the same bytes (scores read once, gradient written once), so ``x copy`` near 1 means
  it runs at memory speed.

GB/s counts ``2 * N * C * itemsize`` bytes (scores read, gradient written) for every
candidate. Usage::

    python bench/hinge.py [--quick] [--json PATH] [--threads N] [--backend NAME]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import common

# Untimed pause before each timed call: lets the previous candidate's thread pools go idle.
SETTLE_S = 0.15

# Targets of issue 3 (CPU, 2 threads): loss + gradient at least 10x PyTorch, and no slower
# than twice a plain copy of the scores.
TARGET_VS_TORCH = 10.0
TARGET_VS_COPY = 2.0


@dataclass(frozen=True)
class HingeCase:
    """One benchmark shape: ``N`` rows of ``C`` class scores."""

    name: str
    N: int
    C: int

    @property
    def label(self) -> str:
        return f"{self.N}x{self.C}"


CASES = [HingeCase("hinge_1000", 16384, 1000), HingeCase("hinge_10", 262144, 10)]


def make_data(case: HingeCase, dtype: Any = np.float32, seed: int = 0):
    """Random ``scores (N, C)`` of ``dtype`` and ``labels (N,)`` int64."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((case.N, case.C), dtype=np.float32).astype(dtype, copy=False)
    labels = rng.integers(0, case.C, case.N, dtype=np.int64)
    return scores, labels


def torch_candidate(torch: Any, scores: np.ndarray, labels: np.ndarray):
    """``(run, result)``: MultiMarginLoss forward + backward, and its loss/grad scaled by C.

    PyTorch averages over N and divides by C; fastconv's "mean" only divides by N, so PyTorch's
    numbers times C are fastconv's.
    """
    s = torch.from_numpy(scores).requires_grad_(True)
    t = torch.from_numpy(labels)
    criterion = torch.nn.MultiMarginLoss()

    def run():
        loss = criterion(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad

    def result():
        loss, grad = run()
        C = scores.shape[1]
        return float(loss.detach()) * C, grad.numpy() * C

    return run, result


def check(fast: Callable, reference: Callable, torch_result: Callable | None,
          dtype: Any) -> dict[str, Any]:
    """Relative errors of the fused call against the reference (and, for information,
    PyTorch); ``check`` is ``"ok"`` when both are within the dtype's bound."""
    loss, grad = fast()
    ref_loss, ref_grad = reference()
    errors: dict[str, Any] = {"err_loss": common.rel_error(loss, ref_loss),
                              "err_grad": common.rel_error(grad, ref_grad)}
    ok = max(errors.values()) < common.tolerance(dtype)
    errors["check"] = "ok" if ok else "FAIL"
    if torch_result is not None:
        t_loss, t_grad = torch_result()
        errors["err_torch"] = max(common.rel_error(loss, t_loss),
                                  common.rel_error(grad, t_grad))
    return errors


def bench_case(case: HingeCase, *, backend: str | None, torch: Any, repeats: int,
               max_time: float, warmup: int = 1) -> dict[str, Any]:
    """Check and time one case; returns one table row (times in ms)."""
    import fastconv

    dtype = np.float32
    scores, labels = make_data(case, dtype)
    plan = fastconv.explain(fastconv.hinge_loss_and_grad, scores, labels, backend=backend)

    def fast():
        return fastconv.hinge_loss_and_grad(scores, labels, backend=plan.backend)

    def reference():
        return fastconv.hinge_loss_and_grad(scores, labels, backend="reference")

    torch_run, torch_result = (torch_candidate(torch, scores, labels) if torch is not None
                               else (None, None))
    row: dict[str, Any] = {"case": case.name, "shape": case.label, "backend": plan.backend,
                           "algo": plan.algo.name}
    row.update(check(fast, reference, torch_result, dtype))
    if row["check"] != "ok":
        return row  # a wrong result is not timed
    candidates: dict[str, Callable] = {"fastconv": fast, "copy": scores.copy}
    if plan.backend != "reference":
        candidates["reference"] = reference
    if torch_run is not None:
        candidates["torch"] = torch_run
    timings = common.measure(candidates, repeats=repeats, warmup=warmup, min_time=0.2,
                             max_time=max_time, settle=SETTLE_S)
    secs = {name: t.median for name, t in timings.items()}
    secs.setdefault("reference", secs["fastconv"])
    nbytes = 2 * scores.nbytes
    row.update({
        "ms": secs["fastconv"] * 1e3,
        "GB/s": common.gbps(nbytes, secs["fastconv"]),
        "spread": timings["fastconv"].spread,
        "copy_ms": secs["copy"] * 1e3,
        "copy_GB/s": common.gbps(nbytes, secs["copy"]),
        "x_copy": secs["fastconv"] / secs["copy"],
        "ref_ms": secs["reference"] * 1e3,
        "vs_ref": common.speedup(secs["reference"], secs["fastconv"]),
        "torch_ms": secs["torch"] * 1e3 if "torch" in secs else None,
        "vs_torch": common.speedup(secs["torch"], secs["fastconv"]) if "torch" in secs else None,
    })
    c_lo, c_hi = common.ratio_range(timings["copy"], timings["fastconv"])
    row["x_copy_lo"], row["x_copy_hi"] = 1 / c_hi, 1 / c_lo
    if "torch" in timings:
        row["vs_torch_lo"], row["vs_torch_hi"] = common.ratio_range(timings["torch"],
                                                                    timings["fastconv"])
    return row


COLUMNS = ["case", "shape", "backend", "ms", "GB/s", "copy_ms", "x_copy", "ref_ms", "vs_ref",
           "torch_ms", "vs_torch", "err_loss", "err_grad", "err_torch", "check"]


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """One line per case on the issue's targets (>= 10x PyTorch, <= 2x a copy)."""
    lines = []
    for row in rows:
        if row["check"] != "ok":
            lines.append(f"{row['case']}: result off the reference "
                         f"(loss {row['err_loss']:.2e}, grad {row['err_grad']:.2e}), not timed")
            continue
        parts = [f"{row['x_copy']:.2f}x copy time (range {row['x_copy_lo']:.2f}-"
                 f"{row['x_copy_hi']:.2f}, target <= {TARGET_VS_COPY:g}): "
                 + common.verdict(row["x_copy"], TARGET_VS_COPY, row["x_copy_lo"],
                                  row["x_copy_hi"], at_least=False)]
        if row.get("vs_torch") is not None:
            parts.append(f"{row['vs_torch']:.1f}x PyTorch (range {row['vs_torch_lo']:.1f}-"
                         f"{row['vs_torch_hi']:.1f}, target >= {TARGET_VS_TORCH:g}): "
                         + common.verdict(row["vs_torch"], TARGET_VS_TORCH,
                                          row["vs_torch_lo"], row["vs_torch_hi"]))
        lines.append(f"{row['case']}: {'; '.join(parts)}")
    return lines


def run(args: argparse.Namespace, torch: Any, threads: int) -> dict[str, Any]:
    """Run the hinge suite (after `common.setup`); prints the table, returns the results."""
    repeats = args.repeats or (5 if args.quick else 20)
    max_time = 5.0 if args.quick else 30.0
    progress = common.Progress(len(CASES), "hinge ", enabled=not args.quiet)
    rows = []
    for case in CASES:
        progress.step(f"{case.name} {case.label}")
        rows.append(bench_case(case, backend=args.backend, torch=torch, repeats=repeats,
                               max_time=max_time, warmup=1 if args.quick else 3))
    progress.done()
    common.print_table(rows, COLUMNS, title=f"hinge loss + gradient, float32, {threads} threads "
                                            "(ms: median; vs_*: speedup of fastconv)")
    for line in verdict(rows):
        print(line)
    return {"suite": "hinge", "threads": threads, "results": rows}


def main(argv: list[str] | None = None) -> int:
    return common.suite_main(run, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
