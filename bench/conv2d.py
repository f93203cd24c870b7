"""CPU conv2d benchmark: fastconv's backend vs the NumPy reference and PyTorch (issue 3 suite).

Two modes per layer: ``forward`` (``fastconv.conv2d``) and ``fwd+bwd`` (forward, then the input,
weight and bias gradients, as a training step needs). For every case the fastconv result is
first checked against the ``reference`` backend (relative error within the float32 bound),
then fastconv, the reference and ``torch.nn.functional.conv2d`` (forward, or forward +
``autograd.grad`` for x, w and b) are timed interleaved in this process with the same thread
count. GFLOP/s counts the direct algorithm's multiply-adds (x2), three times that for
fwd+bwd, whatever algorithm actually ran (Winograd does fewer). Usage::

    python bench/conv2d.py [--quick] [--json PATH] [--threads N] [--backend NAME]
                           [--cases NAME,...] [--mode forward|fwd+bwd|both]
                           [--profile] [--plot PATH]

``--profile`` prints, per case and op, the time of every phase of the algorithm that ran with
its rate and its own measured limit (``phases.py``) instead of the timing table. ``--plot``
saves a PNG (``plot.py``): per layer and mode, the speedup over PyTorch with its run-to-run
range, and each side's GFLOP/s against the machine's measured SGEMM rate.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import common

# Untimed pause before each timed call: lets the previous candidate's thread pools go idle.
SETTLE_S = 0.15

# Targets of issue 10 (CPU, 2 threads, OPENBLAS_CORETYPE unset), as speedups over PyTorch:
# (geometric mean at least, no case below): forward 1.1x / 0.8x; fwd+bwd 1.3x / 0.9x.
TARGETS = {"forward": (1.1, 0.8), "fwd+bwd": (1.3, 0.9)}
MODES = ("forward", "fwd+bwd")


@dataclass(frozen=True)
class ConvCase:
    """One layer of the suite: NCHW float32 input, ``K`` filters of ``kernel x kernel``."""

    name: str
    N: int
    C: int
    HW: int
    K: int
    kernel: int
    stride: int
    pad: int
    groups: int = 1

    @property
    def P(self) -> int:
        return (self.HW + 2 * self.pad - self.kernel) // self.stride + 1

    @property
    def flops(self) -> int:
        """2 x multiply-adds of the direct forward algorithm."""
        return (2 * self.N * self.K * self.P * self.P * (self.C // self.groups)
                * self.kernel * self.kernel)

    @property
    def kwargs(self) -> dict[str, int]:
        return {"stride": self.stride, "padding": self.pad, "groups": self.groups}

    def arrays(self, dtype: Any = np.float32, seed: int = 0):
        """Seeded ``x (N, C, H, W)``, ``weight (K, C/groups, R, S)``, ``bias (K,)`` and a
        ``grad_output (N, K, P, Q)``."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.N, self.C, self.HW, self.HW), dtype=np.float32)
        w = rng.standard_normal((self.K, self.C // self.groups, self.kernel, self.kernel),
                                dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(w[0].size))  # unit-scale outputs, like a real layer
        b = rng.standard_normal(self.K, dtype=np.float32)
        gy = rng.standard_normal((self.N, self.K, self.P, self.P), dtype=np.float32)
        return tuple(a.astype(dtype, copy=False) for a in (x, w, b, gy))


CASES = [
    ConvCase("stem7x7s2", 8, 3, 224, 64, 7, 2, 3),
    ConvCase("r3x3_56", 8, 64, 56, 64, 3, 1, 1),
    ConvCase("r1x1_56", 8, 256, 56, 64, 1, 1, 0),
    ConvCase("r3x3_14", 8, 256, 14, 256, 3, 1, 1),
    ConvCase("r3x3s2_28", 8, 128, 28, 256, 3, 2, 1),
    ConvCase("cifar3x3", 64, 3, 32, 32, 3, 1, 1),
    ConvCase("dw3x3_28", 8, 144, 28, 144, 3, 1, 1, groups=144),
]
# --quick: one layer per algorithm family (1x1 GEMM, 3x3, depthwise), under a minute in all.
QUICK = ("r1x1_56", "r3x3_14", "cifar3x3", "dw3x3_28")
# Layers outside the suite (not in its default run), by name or all with ``--cases more``:
# the kinds the suite lacks (larger and grouped kernels, strided 1x1 and depthwise, other
# plane sizes), to check that no kind of layer is left far behind.
MORE_CASES = [
    ConvCase("r5x5_28", 8, 32, 28, 64, 5, 1, 2),
    ConvCase("r7x7_14", 8, 64, 14, 64, 7, 1, 3),
    ConvCase("g32_3x3_28", 8, 256, 28, 256, 3, 1, 1, groups=32),
    ConvCase("g8_3x3_56", 8, 128, 56, 128, 3, 1, 1, groups=8),
    ConvCase("g16_5x5_28", 8, 64, 28, 64, 5, 1, 2, groups=16),
    ConvCase("dw5x5_14", 8, 240, 14, 240, 5, 1, 2, groups=240),
    ConvCase("dw7x7_28", 8, 96, 28, 96, 7, 1, 3, groups=96),
    ConvCase("dw3x3s2_56", 8, 96, 56, 96, 3, 2, 1, groups=96),
    ConvCase("r1x1s2_28", 8, 256, 28, 512, 1, 2, 0),
    ConvCase("r3x3_28", 8, 128, 28, 128, 3, 1, 1),
    ConvCase("r3x3_112_c16", 8, 16, 112, 32, 3, 1, 1),
]


# --------------------------------------------------------------------------------------------
# Candidates: each returns the outputs it computed, so the check uses the same calls it times
# --------------------------------------------------------------------------------------------
def fastconv_step(case: ConvCase, mode: str, backend: str, x, w, b, gy) -> Callable[[], tuple]:
    """A zero-argument call running ``mode`` through fastconv on ``backend``."""
    import fastconv

    kw = dict(case.kwargs, backend=backend)

    def forward():
        return (fastconv.conv2d(x, w, b, **kw),)

    def train_step():
        y = fastconv.conv2d(x, w, b, **kw)
        gx = fastconv.conv2d_input_grad(x.shape, w, gy, **kw)
        gw = fastconv.conv2d_weight_grad(x, w.shape, gy, **kw)
        gb = fastconv.conv2d_bias_grad(gy, backend=backend)
        return y, gx, gw, gb

    return forward if mode == "forward" else train_step


def torch_step(torch: Any, case: ConvCase, mode: str, x, w, b, gy) -> Callable[[], tuple]:
    """The same work in PyTorch: ``F.conv2d`` (+ ``autograd.grad`` for x, w and b)."""
    F = torch.nn.functional
    needs_grad = mode != "forward"
    tx, tw, tb = (torch.from_numpy(a).requires_grad_(needs_grad) for a in (x, w, b))
    tgy = torch.from_numpy(gy)

    def forward():
        with torch.no_grad():
            return (F.conv2d(tx, tw, tb, **case.kwargs),)

    def train_step():
        y = F.conv2d(tx, tw, tb, **case.kwargs)
        gx, gw, gb = torch.autograd.grad(y, (tx, tw, tb), tgy)
        return y.detach(), gx, gw, gb

    return forward if mode == "forward" else train_step


def max_rel_error(outs: tuple, refs: tuple) -> float:
    """Largest relative error over matching outputs (NumPy or torch tensors)."""
    as_np = (lambda a: a.detach().numpy() if hasattr(a, "detach") else a)
    return max(common.rel_error(as_np(o), as_np(r)) for o, r in zip(outs, refs))


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def bench_case(case: ConvCase, mode: str, *, backend: str | None, torch: Any, repeats: int,
               max_time: float, warmup: int = 1) -> dict[str, Any]:
    """Check, then time one case in one mode; returns a table row (times in ms)."""
    import fastconv

    dtype = np.float32
    x, w, b, gy = case.arrays(dtype)
    plan = fastconv.explain(fastconv.conv2d, x, w, b, **case.kwargs, backend=backend)
    fast = fastconv_step(case, mode, plan.backend, x, w, b, gy)
    reference = fastconv_step(case, mode, "reference", x, w, b, gy)
    ref_out = reference()
    err = max_rel_error(fast(), ref_out)
    row: dict[str, Any] = {"case": case.name, "mode": mode, "backend": plan.backend,
                           "algo": plan.algo.name, "err": err,
                           "check": "ok" if err < common.tolerance(dtype) else "FAIL"}
    if row["check"] != "ok":
        return row  # a wrong result is not timed
    candidates: dict[str, Callable] = {"fastconv": fast}
    if plan.backend != "reference":
        candidates["reference"] = reference
    if torch is not None:
        candidates["torch"] = torch_step(torch, case, mode, x, w, b, gy)
        row["err_torch"] = max_rel_error(candidates["torch"](), ref_out)
    timings = common.measure(candidates, repeats=repeats, warmup=warmup, max_time=max_time,
                             settle=SETTLE_S)
    secs = {name: t.median for name, t in timings.items()}
    secs.setdefault("reference", secs["fastconv"])
    flops = case.flops * (1 if mode == "forward" else 3)
    row.update({
        "ms": secs["fastconv"] * 1e3,
        "GFLOP/s": common.gflops(flops, secs["fastconv"]),
        "spread": timings["fastconv"].spread,
        "ref_ms": secs["reference"] * 1e3,
        "vs_ref": common.speedup(secs["reference"], secs["fastconv"]),
        "torch_ms": secs["torch"] * 1e3 if "torch" in secs else None,
        "torch_GFLOP/s": common.gflops(flops, secs["torch"]) if "torch" in secs else None,
        "vs_torch": common.speedup(secs["torch"], secs["fastconv"]) if "torch" in secs else None,
    })
    if "torch" in timings:
        row["vs_torch_lo"], row["vs_torch_hi"] = common.ratio_range(timings["torch"],
                                                                    timings["fastconv"])
        row["torch_spread"] = timings["torch"].spread
    return row


COLUMNS = ["case", "mode", "algo", "ms", "GFLOP/s", "spread", "ref_ms", "vs_ref", "torch_ms",
           "torch_GFLOP/s", "vs_torch", "vs_torch_lo", "vs_torch_hi", "err", "check"]


def _geomean_all(values: list[float]) -> float:
    """Geometric mean, ``nan`` if any value is missing (a range needs every case's range)."""
    return common.geomean(values) if all(math.isfinite(v) for v in values) else math.nan


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Geometric-mean speedups per mode against the issue's targets when PyTorch ran, with
    their run-to-run range (quartiles of both sides' times); ``noisy, rerun`` instead of a
    verdict when that range straddles the target."""
    lines = [f"{r['case']} {r['mode']}: result off the reference by {r['err']:.2e}, not timed"
             for r in rows if r["check"] != "ok"]
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode and r["check"] == "ok"]
        if not sel:
            continue
        line = f"{mode}: geomean {common.geomean(r['vs_ref'] for r in sel):.2f}x vs reference"
        timed = [r for r in sel if r.get("vs_torch") is not None]
        if timed:
            gm = common.geomean(r["vs_torch"] for r in timed)
            gm_lo, gm_hi = (_geomean_all([r.get(k, math.nan) for r in timed])
                            for k in ("vs_torch_lo", "vs_torch_hi"))
            worst = min(timed, key=lambda r: r["vs_torch"])
            want_gm, want_min = TARGETS[mode]
            v_gm = common.verdict(gm, want_gm, gm_lo, gm_hi)
            v_min = common.verdict(worst["vs_torch"], want_min,
                                   min(r.get("vs_torch_lo", math.nan) for r in timed),
                                   min(r.get("vs_torch_hi", math.nan) for r in timed))
            line += (f"; vs PyTorch geomean {gm:.2f}x (range {gm_lo:.2f}-{gm_hi:.2f}, target "
                     f">= {want_gm:g}): {v_gm}; worst {worst['case']} "
                     f"{worst['vs_torch']:.2f}x (range {worst.get('vs_torch_lo', math.nan):.2f}"
                     f"-{worst.get('vs_torch_hi', math.nan):.2f}, target none below "
                     f"{want_min:g}): {v_min}")
        lines.append(line)
    return lines


def select_cases(args: argparse.Namespace) -> list[ConvCase]:
    """The cases named by ``--cases`` (``more``: all of :data:`MORE_CASES`), else the
    ``--quick`` subset, else the suite."""
    if args.cases:
        known = CASES + MORE_CASES
        wanted = [c.name for c in MORE_CASES] if args.cases == "more" else args.cases.split(",")
        unknown = set(wanted) - {c.name for c in known}
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}; "
                             f"choose from {[c.name for c in known]} or 'more'")
        return [c for c in known if c.name in wanted]
    return [c for c in CASES if c.name in QUICK] if args.quick else list(CASES)


def run(args: argparse.Namespace, torch: Any, threads: int) -> dict[str, Any]:
    """Run the conv suite (after `common.setup`); prints the table, returns the results.
    With ``--profile``, prints the phase profile of every case instead."""
    cases = select_cases(args)
    if getattr(args, "plot", None):
        common.require_matplotlib()   # fail before any timing
    if getattr(args, "profile", False):
        import phases

        profiles = phases.run_profile(cases, repeats=args.repeats or (3 if args.quick else 5),
                                      quiet=args.quiet)
        return {"suite": "conv2d-profile", "threads": threads, "results": [],
                "profiles": profiles}
    modes = MODES if args.mode == "both" else (args.mode,)
    repeats = args.repeats or (3 if args.quick else 10)
    max_time = 2.0 if args.quick else 20.0
    warmup = 0 if args.quick else 1  # the check already ran every candidate once
    progress = common.Progress(len(cases) * len(modes), "conv2d ", enabled=not args.quiet)
    rows = []
    for mode in modes:
        for case in cases:
            progress.step(f"{case.name} {mode}")
            rows.append(bench_case(case, mode, backend=args.backend, torch=torch,
                                   repeats=repeats, max_time=max_time, warmup=warmup))
    progress.done()
    common.print_table(rows, COLUMNS, title=f"conv2d, NCHW float32, {threads} threads "
                                            "(ms: median; vs_*: speedup of fastconv; "
                                            "vs_torch_lo/hi: run-to-run range)")
    for line in summary(rows):
        print(line)
    result = {"suite": "conv2d", "threads": threads, "results": rows}
    if getattr(args, "plot", None):
        import plot

        result["sgemm_GFLOP/s"] = common.sgemm_gflops()
        plot.conv_plot(rows, args.plot, limit_gflops=result["sgemm_GFLOP/s"],
                       limit_label="NumPy SGEMM (measured)",
                       title=f"fastconv cpu vs PyTorch, {threads} threads")
        print(f"plot saved to {args.plot}")
    return result


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """This suite's own options (on top of `common.add_common_args`)."""
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names, or 'more' for the layers outside the "
                             "suite (default: the suite, or the --quick set)")
    parser.add_argument("--mode", choices=MODES + ("both",), default="both",
                        help="forward alone, forward + all gradients, or both (default)")
    parser.add_argument("--profile", action="store_true",
                        help="print the time of every phase of each case and op, with its "
                             "rate and measured limit, instead of the timing table")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save a PNG of the speedups over PyTorch and the GFLOP/s "
                             "(needs matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.suite_main(run, __doc__.split("\n")[0], argv, add_args)


if __name__ == "__main__":
    sys.exit(main())
