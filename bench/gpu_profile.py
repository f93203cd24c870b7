"""Where the host time of a cuda-backend call goes: wall time per call, GPU time per call and a
cProfile of the Python side, for a tiny conv (forward and all three gradients) and the hinge
suite's shapes.

    python bench/gpu_profile.py [--calls N] [--top K] [--out PATH]

Wall time is measured over back-to-back calls; GPU time with the GPU kept busy by a spinning
kernel while the host queues the calls (``gpu.gpu_time_per_call``), so host gaps drop out; their
difference is what the host adds per call. A call that synchronises with the device (the hinge
loss reads the labels' range back before any kernel runs) cannot queue behind the spin, and its
GPU time would include the spin: those rows give the wall time alone, and the hinge loss is
also timed in its two phases (validation, kernel).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys

import numpy as np

import common
import gpu
from fastconv import _args, dispatch


def cases(fastconv, cupy) -> dict:
    """Name -> zero-argument call, on CuPy arrays made once."""
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((1, 8, 8, 8)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((8, 8, 3, 3)).astype(np.float32))
    gy = cupy.asarray(rng.standard_normal((1, 8, 8, 8)).astype(np.float32))
    out = {"tiny conv forward": lambda: fastconv.conv2d(x, w, padding=1),
           "tiny conv input grad": lambda: fastconv.conv2d_input_grad(x.shape, w, gy,
                                                                      padding=1),
           "tiny conv weight grad": lambda: fastconv.conv2d_weight_grad(x, w.shape, gy,
                                                                        padding=1),
           "tiny conv bias grad": lambda: fastconv.conv2d_bias_grad(gy)}
    for N, C in [(64, 10)] + gpu.HINGE_SUITE:
        s = cupy.asarray(rng.standard_normal((N, C)).astype(np.float32))
        y = cupy.asarray(rng.integers(0, C, N))
        out[f"hinge {N}x{C}"] = (lambda s=s, y=y: fastconv.hinge_loss_and_grad(s, y))
        # Its two phases: validating the arguments (the labels' range is read back), and the
        # kernel launch on arguments validated once.
        out[f"  validation {N}x{C}"] = (
            lambda s=s, y=y: _args.hinge_args(s, y, 1.0, 1, None, "mean", 1.0))
        call = _args.hinge_args(s, y, 1.0, 1, None, "mean", 1.0)
        plan = dispatch.plan("hinge", call.kind, call.dtype,
                             scores_shape=tuple(call.scores.shape))
        out[f"  kernel {N}x{C}"] = (
            lambda c=call, a=plan.algo, m=plan.module: m.hinge_loss_rows(
                c.scores, c.labels, c.margin, c.p, c.class_weight, c.row_scale, True, a))
    return out


def syncs(name: str) -> bool:
    """Whether the case reads back from the device (the labels' range) before it returns."""
    return name.startswith("hinge") or "validation" in name


def profile(fn, calls: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="write the cProfile listings here")
    args = parser.parse_args(argv)
    import cupy
    import fastconv

    fastconv.set_backend("cuda")
    rows, listings = [], []
    for name, fn in cases(fastconv, cupy).items():
        wall = gpu.wall_per_call(cupy, fn, args.calls)
        row = {"case": name, "wall_us": wall * 1e6}
        if not syncs(name):
            gpu_s = statistics.median(gpu.gpu_time_per_call(cupy, fn, 50) for _ in range(3))
            row.update({"gpu_us": gpu_s * 1e6,
                        "host_above_gpu_us": max(0.0, wall - gpu_s) * 1e6})
        rows.append(row)
        listings.append(f"==== {name}\n{profile(fn, args.calls, args.top)}")
        cupy.cuda.Device().synchronize()
    common.print_table(rows, ["case", "wall_us", "gpu_us", "host_above_gpu_us"],
                       "cuda backend, per call (rows without gpu_us sync with the device)")
    text = "\n".join(listings)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"profiles written to {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
