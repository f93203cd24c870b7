"""Page faults per call, and what they cost, before and after the process has held big arrays.

    python bench/faults.py [--cases dw3x3_28,cifar3x3] [--mode forward] [--repeats 20]

Run it as a fresh process. It times fastconv's cpu backend and PyTorch on each case back to
back, counting the minor page faults per call (``getrusage``), first in the process as it
starts, then again after the NumPy reference has run the same case (as in ``bench/run.py``,
where the reference runs before the timed rounds). glibc serves a large allocation from a
fresh ``mmap`` until the process frees one of that size, after which it keeps such blocks on
its heap: a library that allocates its output (and scratch) on every call pays a page fault
per 4 KiB page of it in the first state and few in the second. The suite's tables are
measured in the second state.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

import common
import conv2d as suite


def per_call(fn, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` called back to back, and its minor page faults per call."""
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return float(np.median(times)) * 1e3, faults / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="dw3x3_28,cifar3x3")
    parser.add_argument("--mode", default="forward", choices=("forward", "fwd+bwd"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch, threads = common.setup(argparse.Namespace(threads=None, no_torch=False))
    if torch is None:
        raise SystemExit("needs PyTorch")
    print(f"{args.mode}, float32, {threads} threads (ms: median of {args.repeats} calls back "
          "to back; faults: minor page faults per call)")
    print(f"{'case':<10}  {'state':<18}  {'fastconv_ms':>11}  {'faults':>7}  {'torch_ms':>8}  "
          f"{'faults':>7}")
    for case in suite.select_cases(argparse.Namespace(cases=args.cases, quick=False)):
        name = case.name
        x, w, b, gy = case.arrays()
        ours = suite.fastconv_step(case, args.mode, "cpu", x, w, b, gy)
        theirs = suite.torch_step(torch, case, args.mode, x, w, b, gy)
        ours(), theirs()                      # compile, first-touch the inputs
        for state in ("as started", "after reference"):
            if state == "after reference":
                suite.fastconv_step(case, args.mode, "reference", x, w, b, gy)()
            ms, flt = per_call(ours, args.repeats)
            tms, tflt = per_call(theirs, args.repeats)
            print(f"{name:<10}  {state:<18}  {ms:11.3f}  {flt:7.0f}  {tms:8.3f}  {tflt:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
