"""GPU benchmark of the cuda backend against PyTorch's cuDNN, TF32 off and on in the same run.

    python bench/gpu.py [--quick] [--json PATH] [--repeats N] [--no-torch] [--quiet]
                        [--plot PATH]

Conv suite (NCHW float32; name, N, C, H=W, K, kernel, stride, pad) of issue 4, forward: strict
FP32 (fastconv ``precision="fp32"`` vs cuDNN with ``allow_tf32 = False``) and TF32
(``precision="tf32"`` vs ``allow_tf32 = True``); without ``--quick`` also forward plus all
gradients. Hinge suite: the fused loss + gradient vs ``torch.nn.functional.multi_margin_loss``
forward + backward, and its bandwidth against a plain device copy of the scores. Last, the
per-call host overhead on a tiny conv. ``--plot PATH`` saves a PNG (``plot.py``): per layer and
mode (strict fp32 forward, tf32 forward, fp32 forward + gradients), the speedup over cuDNN
with its run-to-run range, and both sides' GFLOP/s against a CuPy float32 matmul measured in
the same run.

Every result is first checked against a float64 cuDNN computation of the same data (1e-5
relative for strict FP32, 5e-3 for TF32). Times are medians of CUDA-event timings on the
default stream after warm-up, candidates interleaved (``common.measure``); only ratios measured
in the same run are meant to be compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

import common

CONV_SUITE = [  # name, N, C, H=W, K, kernel, stride, pad
    ("stem7x7s2", 64, 3, 224, 64, 7, 2, 3),
    ("r3x3_56", 64, 64, 56, 64, 3, 1, 1),
    ("r1x1_56", 64, 256, 56, 64, 1, 1, 0),
    ("r3x3_14", 64, 256, 14, 256, 3, 1, 1),
    ("r3x3s2_28", 64, 128, 28, 256, 3, 2, 1),
    ("r3x3_7", 64, 512, 7, 512, 3, 1, 1),
    ("cifar3x3", 512, 3, 32, 32, 3, 1, 1),
]
HINGE_SUITE = [(65536, 1000), (1048576, 10)]
TF32_TOLERANCE = 5e-3


def event_timer(cupy, inner: int = 1) -> Callable[[Callable[[], Any]], float]:
    """``timer(fn) -> seconds``: CUDA events around ``inner`` calls on the default stream."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()

    def timer(fn):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3 / inner

    return timer


def gpu_environment(cupy, torch) -> dict:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"gpu": name, "sm_count": dev.attributes["MultiProcessorCount"],
            "compute_capability": dev.compute_capability, "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "torch": getattr(torch, "__version__", None),
            "cudnn": torch.backends.cudnn.version() if torch is not None else None}


# ---------------------------------------------------------------------------------------------
# Conv
# ---------------------------------------------------------------------------------------------
class ConvCase:
    """Device arrays of one suite entry, shared by fastconv (CuPy) and PyTorch (DLPack)."""

    def __init__(self, spec, cupy, torch):
        self.name, N, C, H, K, k, self.stride, self.pad = spec
        rng = np.random.default_rng(0)
        host = [rng.standard_normal(s).astype(np.float32)
                for s in ((N, C, H, H), (K, C, k, k), (K,))]
        self.x, self.w, self.b = (cupy.asarray(a) for a in host)
        P = (H + 2 * self.pad - k) // self.stride + 1
        self.gy = cupy.asarray(rng.standard_normal((N, K, P, P)).astype(np.float32))
        self.flops = 2 * N * K * P * P * C * k * k
        self.torch = torch
        if torch is not None:
            self.tx, self.tw, self.tb, self.tgy = (torch.from_dlpack(a) for a in
                                                   (self.x, self.w, self.b, self.gy))

    def fastconv_forward(self, fastconv, precision):
        def run():
            fastconv.set_precision(precision)
            return fastconv.conv2d(self.x, self.w, self.b, self.stride, self.pad)
        return run

    def fastconv_train(self, fastconv, precision):
        def run():
            fastconv.set_precision(precision)
            fastconv.conv2d(self.x, self.w, self.b, self.stride, self.pad)
            fastconv.conv2d_input_grad(self.x.shape, self.w, self.gy, self.stride, self.pad)
            fastconv.conv2d_weight_grad(self.x, self.w.shape, self.gy, self.stride, self.pad)
            fastconv.conv2d_bias_grad(self.gy)
        return run

    def torch_forward(self, tf32):
        F = self.torch.nn.functional

        def run():
            self.torch.backends.cudnn.allow_tf32 = tf32
            return F.conv2d(self.tx, self.tw, self.tb, self.stride, self.pad)
        return run

    def torch_train(self, tf32):
        torch = self.torch
        x = self.tx.detach().requires_grad_(True)
        w = self.tw.detach().requires_grad_(True)
        b = self.tb.detach().requires_grad_(True)

        def run():
            torch.backends.cudnn.allow_tf32 = tf32
            x.grad = w.grad = b.grad = None
            torch.nn.functional.conv2d(x, w, b, self.stride, self.pad).backward(self.tgy)
        return run

    def check(self, fastconv, cupy) -> dict:
        """Relative errors of fastconv's strict and TF32 forward against float64."""
        if self.torch is not None:
            ref = self.torch.nn.functional.conv2d(self.tx.double(), self.tw.double(),
                                                  self.tb.double(), self.stride, self.pad)
            ref = cupy.from_dlpack(ref)
        else:
            ref = fastconv.conv2d(self.x.astype(cupy.float64), self.w.astype(cupy.float64),
                                  self.b.astype(cupy.float64), self.stride, self.pad)
        errs = {}
        for precision in ("fp32", "tf32"):
            out = self.fastconv_forward(fastconv, precision)()
            errs[precision] = common.rel_error(cupy.asnumpy(out), cupy.asnumpy(ref))
        fastconv.set_precision("fp32")
        return errs


def kernel_resources(algo) -> dict | None:
    """Registers and local-memory (spill) bytes per thread of an Algo's compiled kernel."""
    name = algo.get("kernel", "")
    if not name.startswith("fc::"):
        return None  # cuBLAS
    from fastconv.kernels import cuda_build

    source = ("hinge.cu" if "hinge" in name else "depthwise.cu" if "depthwise" in name
              else "winograd.cu" if "winograd" in name else "conv2d.cu")
    kernel = cuda_build.get_kernel(source, name)
    return {"num_regs": kernel.num_regs, "local_size_bytes": kernel.local_size_bytes}


def bench_conv(args, fastconv, cupy, torch, progress) -> list[dict]:
    rows = []
    timer = event_timer(cupy, inner=1 if args.quick else 3)
    repeats = args.repeats or (10 if args.quick else 30)
    for spec in CONV_SUITE:
        progress.step(spec[0])
        case = ConvCase(spec, cupy, torch)
        errs = case.check(fastconv, cupy)
        row = {"case": case.name, "err_fp32": errs["fp32"], "err_tf32": errs["tf32"],
               "ok": errs["fp32"] < 1e-5 and errs["tf32"] < TF32_TOLERANCE}
        for precision in ("fp32", "tf32"):
            fastconv.set_precision(precision)
            algo = fastconv.explain("conv2d", case.x, case.w, case.b, case.stride,
                                    case.pad).algo
            row[f"algo_{precision}"] = f"{algo.get('kernel')} splits={algo.get('splits', 1)}"
            row[f"regs_{precision}"] = kernel_resources(algo)
        cands = {"fc_fp32": case.fastconv_forward(fastconv, "fp32"),
                 "fc_tf32": case.fastconv_forward(fastconv, "tf32")}
        if torch is not None:
            cands.update({"cudnn_fp32": case.torch_forward(False),
                          "cudnn_tf32": case.torch_forward(True)})
        t = common.measure(cands, repeats=repeats, warmup=3, timer=timer)
        for key, timing in t.items():
            row[f"{key}_ms"] = timing.ms
        row["tflops_fp32"] = common.gflops(case.flops, t["fc_fp32"].median) / 1e3
        if torch is not None:
            row["vs_cudnn_fp32"] = common.speedup(t["cudnn_fp32"].median, t["fc_fp32"].median)
            row["vs_cudnn_tf32"] = common.speedup(t["cudnn_tf32"].median, t["fc_tf32"].median)
            for p in ("fp32", "tf32"):
                row[f"vs_cudnn_{p}_lo"], row[f"vs_cudnn_{p}_hi"] = common.ratio_range(
                    t[f"cudnn_{p}"], t[f"fc_{p}"])
        for p in ("fp32", "tf32"):
            row[f"fc_{p}_GFLOP/s"] = common.gflops(case.flops, t[f"fc_{p}"].median)
            if torch is not None:
                row[f"cudnn_{p}_GFLOP/s"] = common.gflops(case.flops, t[f"cudnn_{p}"].median)
        if not args.quick:
            cands = {"fc_train_fp32": case.fastconv_train(fastconv, "fp32")}
            if torch is not None:
                cands["cudnn_train_fp32"] = case.torch_train(False)
            t = common.measure(cands, repeats=max(5, repeats // 3), warmup=2, timer=timer)
            for key, timing in t.items():
                row[f"{key}_ms"] = timing.ms
            if torch is not None:
                row["vs_cudnn_train"] = common.speedup(t["cudnn_train_fp32"].median,
                                                       t["fc_train_fp32"].median)
                row["vs_cudnn_train_lo"], row["vs_cudnn_train_hi"] = common.ratio_range(
                    t["cudnn_train_fp32"], t["fc_train_fp32"])
                row["cudnn_train_GFLOP/s"] = common.gflops(3 * case.flops,
                                                           t["cudnn_train_fp32"].median)
            row["fc_train_GFLOP/s"] = common.gflops(3 * case.flops,
                                                    t["fc_train_fp32"].median)
        fastconv.set_precision("fp32")
        if torch is not None:
            torch.backends.cudnn.allow_tf32 = False
        rows.append(row)
        del case
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


# ---------------------------------------------------------------------------------------------
# Hinge
# ---------------------------------------------------------------------------------------------
def hinge_case(N: int, C: int, fastconv, cupy, torch, timer, repeats: int) -> dict:
    """Check, then time, the fused hinge loss + gradient on one ``(N, C)`` shape."""
    rng = np.random.default_rng(0)
    s = cupy.asarray(rng.standard_normal((N, C)).astype(np.float32))
    y = cupy.asarray(rng.integers(0, C, N))
    ref_loss, ref_grad = fastconv.hinge_loss_and_grad(
        cupy.asnumpy(s).astype(np.float64), cupy.asnumpy(y), backend="reference")
    loss, grad = fastconv.hinge_loss_and_grad(s, y)
    err = max(common.rel_error(cupy.asnumpy(grad), ref_grad),
              common.rel_error([float(loss)], [float(ref_loss)]))
    dst = cupy.empty_like(s)
    cands = {"fastconv": lambda: fastconv.hinge_loss_and_grad(s, y),
             "copy": lambda: cupy.copyto(dst, s)}
    row: dict = {"case": f"hinge {N}x{C}", "err": err, "ok": err < 1e-5}
    if torch is not None:
        ts = torch.from_dlpack(s).detach().requires_grad_(True)
        ty = torch.from_dlpack(y)

        def torch_run():
            ts.grad = None
            torch.nn.functional.multi_margin_loss(ts, ty).backward()
        cands["torch"] = torch_run
        torch_run()  # PyTorch divides by C as well: compare gradients up to that factor
        row["err_vs_torch"] = common.rel_error(cupy.asnumpy(grad) / C,
                                               cupy.asnumpy(cupy.from_dlpack(ts.grad)))
    t = common.measure(cands, repeats=repeats, warmup=3, timer=timer)
    nbytes = 2 * s.nbytes  # scores read once, gradient written once
    row.update({"fastconv_ms": t["fastconv"].ms, "copy_ms": t["copy"].ms,
                "fastconv_GBps": common.gbps(nbytes, t["fastconv"].median),
                "copy_GBps": common.gbps(nbytes, t["copy"].median),
                "of_copy_bw": t["copy"].median / t["fastconv"].median})
    if torch is not None:
        row.update({"torch_ms": t["torch"].ms,
                    "vs_torch": common.speedup(t["torch"].median, t["fastconv"].median)})
    return row


def bench_hinge(args, fastconv, cupy, torch, progress) -> list[dict]:
    rows = []
    timer = event_timer(cupy, inner=1 if args.quick else 3)
    repeats = args.repeats or (10 if args.quick else 30)
    for N, C in HINGE_SUITE:
        progress.step(f"hinge {N}x{C}")
        rows.append(hinge_case(N, C, fastconv, cupy, torch, timer, repeats))
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


# ---------------------------------------------------------------------------------------------
# Host overhead
# ---------------------------------------------------------------------------------------------
_SPIN = r"""
extern "C" __global__ void fc_bench_spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def gpu_time_per_call(cupy, fn, calls: int = 200) -> float:
    """Seconds of GPU time per call of ``fn``, host gaps excluded: a spinning kernel keeps the
    GPU busy while the host queues ``calls`` calls, which then run back to back."""
    spin = cupy.RawKernel(_SPIN, "fc_bench_spin")
    clock_hz = cupy.cuda.Device().attributes["ClockRate"] * 1e3
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    spin((1,), (1,), (np.int64(0.05 * clock_hz),))  # 50 ms, far longer than the queueing
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls


def wall_per_call(cupy, fn, calls: int, warmup: int = 20) -> float:
    """Wall seconds per call of ``fn`` over ``calls`` back-to-back calls (host-bound when the
    calls are small), after ``warmup`` calls, the device synchronised before and after."""
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cupy.cuda.Device().synchronize()
    return (time.perf_counter() - start) / calls


def bench_overhead(fastconv, cupy, torch, progress, calls: int = 2000) -> list[dict]:
    """Wall time per call of back-to-back tiny convs (host-bound) vs their GPU time."""
    progress.step("host overhead")
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((1, 8, 8, 8)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal((8, 8, 3, 3)).astype(np.float32))
    cands = {"fastconv": lambda: fastconv.conv2d(x, w, padding=1)}
    if torch is not None:
        tx, tw = torch.from_dlpack(x), torch.from_dlpack(w)
        cands["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, padding=1)
    rows = []
    for name, fn in cands.items():
        wall = wall_per_call(cupy, fn, calls, warmup=100)
        gpu = statistics.median(gpu_time_per_call(cupy, fn) for _ in range(5))
        rows.append({"case": f"tiny conv ({name})", "wall_us_per_call": wall * 1e6,
                     "gpu_us_per_call": gpu * 1e6,
                     "host_above_gpu_us": max(0.0, wall - gpu) * 1e6})
    return rows


# ---------------------------------------------------------------------------------------------
def matmul_gflops(cupy, n: int = 8192) -> float:
    """The GPU's measured float32 GEMM rate (CuPy matmul, TF32 off), the plot's limit line."""
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    out = cupy.empty_like(a)
    timer = event_timer(cupy)
    cupy.matmul(a, b, out=out)
    return common.gflops(2.0 * n ** 3, min(timer(lambda: cupy.matmul(a, b, out=out))
                                           for _ in range(5)))


def plot_rows(conv: list[dict]) -> list[dict]:
    """The conv rows reshaped for ``plot.conv_plot``: one row per layer and mode."""
    out = []
    for r in conv:
        for mode, fc, cu, ratio in (("fp32 fwd", "fc_fp32", "cudnn_fp32", "vs_cudnn_fp32"),
                                    ("tf32 fwd", "fc_tf32", "cudnn_tf32", "vs_cudnn_tf32"),
                                    ("fp32 fwd+bwd", "fc_train", "cudnn_train",
                                     "vs_cudnn_train")):
            if f"{fc}_GFLOP/s" in r:
                out.append({"case": r["case"], "mode": mode, "check": "ok" if r["ok"] else "",
                            "GFLOP/s": r[f"{fc}_GFLOP/s"],
                            "torch_GFLOP/s": r.get(f"{cu}_GFLOP/s"), "vs_torch": r.get(ratio),
                            "vs_torch_lo": r.get(f"{ratio}_lo"),
                            "vs_torch_hi": r.get(f"{ratio}_hi")})
    return out


def main(argv=None) -> int:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save a PNG of the speedups over cuDNN and the GFLOP/s")
    args = parser.parse_args(argv)
    if args.plot:
        common.require_matplotlib()   # fail fast, before any timing
    try:
        import cupy
    except ImportError:
        print("bench/gpu.py needs CuPy and a CUDA GPU (pip install fastconv[cuda12])",
              file=sys.stderr)
        return 2
    import fastconv

    torch = None if args.no_torch else common.import_torch()
    if torch is not None and not torch.cuda.is_available():
        print("PyTorch has no CUDA here: timing fastconv alone", file=sys.stderr)
        torch = None
    if torch is not None:
        torch.backends.cudnn.benchmark = True
    fastconv.set_backend("cuda")
    env = {**common.environment(), **gpu_environment(cupy, torch)}
    print(f"{env['gpu']} ({env['sm_count']} SMs, sm_{env['compute_capability']}), "
          f"CuPy {env['cupy']}, torch {env['torch']}, cuDNN {env['cudnn']}")
    progress = common.Progress(len(CONV_SUITE) + len(HINGE_SUITE) + 1, "gpu ",
                               enabled=not args.quiet)
    conv = bench_conv(args, fastconv, cupy, torch, progress)
    hinge = bench_hinge(args, fastconv, cupy, torch, progress)
    overhead = bench_overhead(fastconv, cupy, torch, progress)
    progress.done()

    cols = ["case", "ok", "fc_fp32_ms", "cudnn_fp32_ms", "vs_cudnn_fp32", "tflops_fp32",
            "fc_tf32_ms", "cudnn_tf32_ms", "vs_cudnn_tf32", "err_fp32", "err_tf32"]
    common.print_table(conv, cols, "conv2d forward, float32 (vs_cudnn = cuDNN time / ours)")
    if torch is not None:
        gm32 = common.geomean(r["vs_cudnn_fp32"] for r in conv)
        gm_tf = common.geomean(r["vs_cudnn_tf32"] for r in conv)
        print(f"geometric mean vs cuDNN: strict fp32 {gm32:.2f}x, tf32 {gm_tf:.2f}x "
              f"(targets 0.8x and 0.6x; no fp32 case below 0.5x: "
              f"min {min(r['vs_cudnn_fp32'] for r in conv):.2f}x)")
    if not args.quick:
        common.print_table(conv, ["case", "fc_train_fp32_ms", "cudnn_train_fp32_ms",
                                  "vs_cudnn_train"],
                           "forward + input, weight and bias gradients, strict fp32")
    common.print_table(hinge, ["case", "ok", "fastconv_ms", "torch_ms", "vs_torch",
                               "fastconv_GBps", "copy_GBps", "of_copy_bw", "err",
                               "err_vs_torch"],
                       "hinge loss + gradient (targets: 3x PyTorch, 70% of copy bandwidth)")
    common.print_table(overhead, ["case", "wall_us_per_call", "gpu_us_per_call",
                                  "host_above_gpu_us"],
                       "per-call overhead on a tiny conv (target: under 15 us above the GPU)")
    if args.plot:
        import plot

        limit = matmul_gflops(cupy)
        plot.conv_plot(plot_rows(conv), args.plot, limit_gflops=limit,
                       limit_label="CuPy fp32 matmul (measured)",
                       title=f"fastconv cuda vs cuDNN on {env['gpu']}", other="cuDNN")
        print(f"plot saved to {args.plot}")
    if args.json:
        common.write_json(args.json, {"environment": env, "quick": args.quick, "conv": conv,
                                      "hinge": hinge, "overhead": overhead})
    bad = [r["case"] for r in conv + hinge if not r["ok"]]
    if bad:
        print(f"WRONG RESULTS: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
