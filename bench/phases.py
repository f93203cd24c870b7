"""Where the time of a cpu conv goes: per case and op, every phase of the algorithm that ran.

Used by ``python bench/run.py --profile`` (and ``bench/conv2d.py --profile``; the module is
not named ``profile``, which would shadow the standard library). For each case of
the conv suite and each op (forward, input gradient, weight gradient, bias gradient) it runs
the algorithm fastconv chose and times its phases one by one:

* phases that are separate calls from the Python drivers (im2col packing, BLAS GEMMs, col2im
  scatter, layout copies, bias add, filter transforms, reductions) are timed by wrapping the
  kernel module's own functions for the duration of the profile (``instrument``); the library
  path is not changed and costs nothing when not profiled;
* the fused Winograd kernel runs its phases inside one parallel loop, so it is run again with
  one phase at a time (its ``phases`` mask: input transform, GEMMs, output transform);
* ``other`` is the total minus the phases: Python, allocation, waiting between thread pools
  and, for the fused kernel, the interplay of its phases.

Each phase gets its rate (GFLOP/s for GEMMs, GB/s for memory passes: bytes read + written,
estimated from the operands) and its own limit measured in the same run: NumPy's SGEMM on
operands of the same shapes for a GEMM, a NumPy copy of the same number of bytes for a memory
pass. Times are medians of ``repeats`` runs.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

import common

OPS = ("forward", "input_grad", "weight_grad", "bias_grad")


class _Phases:
    """Accumulates, per phase name, seconds and work (flops or bytes) over one op call, and
    remembers one example of each GEMM's operand shapes for its SGEMM limit."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.work: dict[str, float] = defaultdict(float)
        self.kind: dict[str, str] = {}
        self.gemms: dict[str, list] = defaultdict(list)

    def add(self, name: str, seconds: float, work: float, kind: str) -> None:
        self.seconds[name] += seconds
        self.work[name] += work
        self.kind[name] = kind


def _timed(phases: _Phases, name: str, fn: Callable, work: Callable[..., float],
           kind: str) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        phases.add(name, time.perf_counter() - start, work(*args, **kwargs), kind)
        return out
    return wrapper


class _TimedNumpy:
    """Stands in for ``np`` inside a kernel module: ``matmul`` is timed as the GEMM phase."""

    def __init__(self, phases: _Phases) -> None:
        self._phases = phases

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def matmul(self, a, b, out=None, **kwargs):
        start = time.perf_counter()
        res = np.matmul(a, b, out=out, **kwargs)
        seconds = time.perf_counter() - start
        a, b = np.asarray(a), np.asarray(b)
        flops = 2.0 * a.shape[-1] * res.size
        self._phases.add("GEMM (BLAS)", seconds, flops, "flop")
        self._phases.gemms["GEMM (BLAS)"].append((a.shape, b.shape, a.dtype, seconds))
        return res


def _nbytes(*arrays) -> float:
    return float(sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)))


@contextlib.contextmanager
def instrument(phases: _Phases):
    """Wrap the cpu kernel modules' phase functions with timers; restore them afterwards."""
    from fastconv.kernels import cpu_conv, cpu_depthwise, cpu_winograd

    def col_bytes(*a):            # the packed matrix is written once and read back
        return 2.0 * a[1].nbytes

    patches = [
        (cpu_conv, "np", _TimedNumpy(phases)),
        (cpu_conv, "im2col", _timed(phases, "im2col packing", cpu_conv.im2col, col_bytes,
                                    "byte")),
        (cpu_conv, "col2im", _timed(phases, "col2im scatter", cpu_conv.col2im,
                                    lambda *a: 2.0 * a[0].nbytes, "byte")),
        (cpu_conv, "split_phases", _timed(phases, "stride-2 phase planes",
                                          cpu_conv.split_phases,
                                          lambda *a: 2.0 * a[1].nbytes, "byte")),
        (cpu_conv, "merge_phases", _timed(phases, "stride-2 phase planes",
                                          cpu_conv.merge_phases,
                                          lambda *a: 2.0 * a[1].nbytes, "byte")),
        (cpu_conv, "wide_to_rows", _timed(phases, "layout copies", cpu_conv.wide_to_rows,
                                          lambda *a: 2.0 * a[0].nbytes, "byte")),
        (cpu_conv, "rows_to_wide", _timed(phases, "layout copies", cpu_conv.rows_to_wide,
                                          lambda *a: 2.0 * a[1].nbytes, "byte")),
        (cpu_conv, "add_bias", _timed(phases, "bias add", cpu_conv.add_bias,
                                      lambda *a: 2.0 * a[0].nbytes, "byte")),
        (cpu_conv, "bias_grad", _timed(phases, "reduction", cpu_conv.bias_grad,
                                       lambda *a: _nbytes(*a), "byte")),
        (cpu_winograd, "filter_transform",
         _timed(phases, "filter transform", cpu_winograd.filter_transform,
                lambda w, m, *a: w.nbytes * (1 + (m + 2) ** 2 / 9), "byte")),
        (cpu_winograd, "filter_transform_adjoint",
         _timed(phases, "filter transform", cpu_winograd.filter_transform_adjoint,
                lambda dU, *a: dU.nbytes * (1 + 9 / dU.shape[0]), "byte")),
    ]
    for name in ("to_grid", "from_grid"):     # strided 1x1: the pixels on the output grid
        if hasattr(cpu_conv, name):
            patches.append((cpu_conv, name, _timed(phases, "layout copies",
                                                   getattr(cpu_conv, name),
                                                   lambda *a: _nbytes(*a[:2]), "byte")))
    # The unfused Winograd of earlier versions (separate transform passes and batched
    # matmuls), so that this profiler also shows the code it replaced.
    for name, label, arg in (("input_transform", "input transform", 1),
                             ("output_transform", "output transform", 0),
                             ("grad_output_transform", "grad_output transform", 1)):
        if hasattr(cpu_winograd, name) and not hasattr(cpu_winograd, "fused_conv"):
            patches.append((cpu_winograd, name, _timed(
                phases, label, getattr(cpu_winograd, name),
                lambda *a, i=arg: 2.0 * a[i].nbytes, "byte")))
    if not hasattr(cpu_winograd, "fused_conv"):
        patches.append((cpu_winograd, "np", _TimedNumpy(phases)))
    for name in ("_forward", "_input_grad", "_weight_grad", "_direct_s1", "_forward_s1",
                 "_input_grad_s1",
                 "_depthwise_same3x3",
                 "_weight_grad_s1", "_weight_grad_s1_flat", "_weight_grad_s1_gemm",
                 "_forward_s2", "_input_grad_s2", "_weight_grad_s2"):
        if not hasattr(cpu_depthwise, name):     # the kernels of other versions
            continue
        patches.append((cpu_depthwise, name,
                        _timed(phases, "direct loops", getattr(cpu_depthwise, name),
                               lambda *a: _nbytes(*a), "byte")))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, new in patches:
            setattr(mod, name, new)
        yield phases
    finally:
        for mod, name, old in saved:
            setattr(mod, name, old)


# --------------------------------------------------------------------------------------------
# Winograd: one fused kernel, timed phase by phase through its mask
# --------------------------------------------------------------------------------------------
def _winograd_phase_calls(op: str, geom, algo, x, w, gy) -> dict[str, Callable]:
    from fastconv.kernels import cpu_winograd as cw

    def run(mask):
        if op == "forward":
            pt, pl = geom.padding[0], geom.padding[2]
            return lambda: cw.winograd_conv(x, w, None, (geom.P, geom.Q), (-pt, -pl),
                                            geom.groups, algo, mask)
        if op == "input_grad":
            pt, pl = geom.padding[0], geom.padding[2]
            return lambda: cw.winograd_conv(gy, w, None, (geom.H, geom.W), (pt - 2, pl - 2),
                                            geom.groups, algo, mask, rotate=True)
        return lambda: cw.weight_grad(x, gy, geom, algo, mask)

    out_name = "grad_output transform" if op == "weight_grad" else "output transform"
    return {"input transform": run(cw.PHASE_INPUT), _gemm_label(algo): run(cw.PHASE_GEMM),
            out_name: run(cw.PHASE_OUTPUT), "_none": run(0)}


def _gemm_label(algo) -> str:
    """The GEMM phase of the fused layout (per block, in the workers) or the batched one."""
    if algo.get("layout", "fused") == "batched":
        return "GEMMs (BLAS-threaded np.matmul per chunk)"
    return "GEMMs (np.dot per block)"


def _winograd_dims(op: str, geom, algo) -> tuple[int, int, int, int, int]:
    """``A*A``, the tiled plane's ``rows * cols``, the tiles ``T`` of the batch, and the
    channels in and out of the op's correlation."""
    from fastconv.kernels import cpu_winograd as cw

    m = int(algo.get("tile", 4))
    A2 = (m + 2) ** 2
    rows, cols = (geom.H, geom.W) if op == "input_grad" else (geom.P, geom.Q)
    th, tw = cw.tile_grid(rows, cols, m)
    T = geom.N * th * tw
    cin, cout = (geom.K, geom.C) if op == "input_grad" else (geom.C, geom.K)
    return A2, rows * cols, T, cin, cout


def _winograd_work(op: str, geom, algo, itemsize: int) -> dict[str, tuple[float, str]]:
    """Flops of the GEMMs and bytes of the transforms."""
    A2, plane, T, cin, cout = _winograd_dims(op, geom, algo)
    flops = 2.0 * A2 * T * cout * (cin // geom.groups)
    in_bytes = geom.N * cin * (geom.P * geom.Q if op == "input_grad" else geom.H * geom.W)
    out_bytes = geom.N * cout * plane
    if op == "weight_grad":
        out_bytes = geom.N * geom.K * geom.P * geom.Q
        return {"input transform": ((in_bytes + A2 * cin * T) * itemsize, "byte"),
                _gemm_label(algo): (flops, "flop"),
                "grad_output transform": ((out_bytes + A2 * geom.K * T) * itemsize, "byte")}
    return {"input transform": ((in_bytes + A2 * cin * T) * itemsize, "byte"),
            _gemm_label(algo): (flops, "flop"),
            "output transform": ((A2 * cout * T + out_bytes) * itemsize, "byte")}


def _winograd_gemm_limit(op: str, geom, algo, dtype, repeats: int) -> float:
    """NumPy SGEMM on the same GEMMs done as one batched matmul: ``(A*A, G, Kg, Cg) @
    (A*A, G, Cg, T)`` with T the tiles of the whole batch; returns seconds."""
    A2, _, T, cin, cout = _winograd_dims(op, geom, algo)
    G = geom.groups
    rng = np.random.default_rng(0)
    a = rng.standard_normal((A2, G, cout // G, cin // G)).astype(dtype)
    if op == "weight_grad":
        b = rng.standard_normal((A2, G, T, cin // G)).astype(dtype)
        d = rng.standard_normal((A2, G, cout // G, T)).astype(dtype)
        out = np.matmul(d, b)
        return _median_seconds(lambda: np.matmul(d, b, out=out), repeats)
    b = rng.standard_normal((A2, G, cin // G, T)).astype(dtype)
    out = np.matmul(a, b)
    return _median_seconds(lambda: np.matmul(a, b, out=out), repeats)


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------
def _median_seconds(fn: Callable, repeats: int) -> float:
    fn()
    fn()      # a second warm-up: thread pools that slept, first-touch page faults
    return float(np.median([common.wall_timer(fn) for _ in range(max(1, repeats))]))


def _excess_seconds(fn: Callable, base: Callable, repeats: int) -> float:
    """Median over alternating pairs of ``time(fn) - time(base)``: ``fn`` is ``base`` plus one
    phase. Paired samples (not two medians taken a second apart) keep the difference from
    following the machine's drifts, which on a shared VM are larger than a small phase."""
    for f in (fn, base, fn, base):   # warm-up: thread pools that slept, first-touch faults
        f()
    diffs = []
    for _ in range(max(3, 2 * repeats)):
        b = common.wall_timer(base)
        diffs.append(common.wall_timer(fn) - b)
    return max(0.0, float(np.median(diffs)))


def copy_seconds(nbytes: float, repeats: int) -> float:
    """Time of a NumPy copy moving ``nbytes`` (half read, half written)."""
    n = max(1, int(nbytes / 2 / 4))
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    return _median_seconds(lambda: np.copyto(dst, src), repeats)


def gemm_limit_seconds(shapes: list, repeats: int) -> float:
    """Time of NumPy's matmul on each recorded operand shape (same count and order)."""
    rng = np.random.default_rng(0)
    total = 0.0
    cache: dict = {}
    for a_shape, b_shape, dtype, _ in shapes:
        key = (a_shape, b_shape, np.dtype(dtype).str)
        if key not in cache:
            a = rng.standard_normal(a_shape).astype(dtype)
            b = rng.standard_normal(b_shape).astype(dtype)
            out = np.matmul(a, b)
            cache[key] = _median_seconds(lambda: np.matmul(a, b, out=out), repeats)
        total += cache[key]
    return total


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def _op_call(op: str, case, x, w, b, gy) -> Callable:
    import fastconv

    kw = dict(case.kwargs, backend="cpu")
    return {
        "forward": lambda: fastconv.conv2d(x, w, b, **kw),
        "input_grad": lambda: fastconv.conv2d_input_grad(x.shape, w, gy, **kw),
        "weight_grad": lambda: fastconv.conv2d_weight_grad(x, w.shape, gy, **kw),
        "bias_grad": lambda: fastconv.conv2d_bias_grad(gy, backend="cpu"),
    }[op]


def profile_case(case, op: str, repeats: int = 5) -> dict[str, Any]:
    """Phases of one op of one case: ``{"case", "op", "algo", "total_ms", "phases": [...]}``
    with, per phase, ms, share of the total, rate, unit, limit rate and fraction of it."""
    import fastconv
    from fastconv._args import conv_geometry
    from fastconv.dispatch import cpu as rules

    x, w, b, gy = case.arrays(np.float32)
    call = _op_call(op, case, x, w, b, gy)
    geom = conv_geometry(x.shape, w.shape, case.stride, case.pad, 1, case.groups)
    if op == "bias_grad":
        algo = rules.choose("bias_grad", geom, np.float32, precision="fp32",
                            workspace_bytes=0)
    else:
        fn = {"forward": fastconv.conv2d, "input_grad": fastconv.conv2d_input_grad,
              "weight_grad": fastconv.conv2d_weight_grad}[op]
        args = {"forward": (x, w, b), "input_grad": (x.shape, w, gy),
                "weight_grad": (x, w.shape, gy)}[op]
        algo = fastconv.explain(fn, *args, **case.kwargs, backend="cpu").algo
    call()
    total = _median_seconds(call, repeats)
    rows = []
    timed_total = None           # the median of the calls timed phase by phase
    from fastconv.kernels import cpu_winograd

    if algo.name == "winograd" and hasattr(cpu_winograd, "fused_conv"):
        calls = _winograd_phase_calls(op, geom, algo, x, w, gy)
        base = calls.pop("_none")        # filter transform, buffers: no phase of the mask
        work = _winograd_work(op, geom, algo, 4)
        # the filter transform from whole calls (a masked call leaves the weight gradient's
        # dU unwritten: its adjoint then ran on garbage, denormals included)
        fts, ft_work = [], 0.0
        for _ in range(max(1, repeats)):
            phases = _Phases()
            with instrument(phases):
                call()
            fts.append(phases.seconds.get("filter transform", 0.0))
            ft_work = phases.work.get("filter transform", 0.0)
        ft = float(np.median(fts))
        for name, fn in calls.items():
            with np.errstate(all="ignore"):   # a phase alone leaves garbage in the sums
                sec = _excess_seconds(fn, base, repeats)
            amount, kind = work[name]
            limit = (_winograd_gemm_limit(op, geom, algo, np.float32, repeats)
                     if kind == "flop" else copy_seconds(amount, repeats))
            rows.append(_row(name, sec, amount, kind, limit, total))
        if ft:
            rows.insert(0, _row("filter transform", ft, ft_work, "byte",
                                copy_seconds(ft_work, repeats), total))
    else:
        samples: list[_Phases] = []
        walls = []
        for _ in range(max(1, repeats)):
            phases = _Phases()
            with instrument(phases):
                walls.append(common.wall_timer(call))
            samples.append(phases)
        # "other" from the very calls whose phases were timed: phases from these calls
        # against a total from others could add up to more than it (a negative "other")
        timed_total = float(np.median(walls))
        for name in samples[0].seconds:
            sec = float(np.median([s.seconds[name] for s in samples]))
            amount, kind = samples[0].work[name], samples[0].kind[name]
            if kind == "flop":
                limit = gemm_limit_seconds(samples[0].gemms[name], repeats)
            else:
                limit = copy_seconds(amount, repeats)
            rows.append(_row(name, sec, amount, kind, limit, timed_total))
    other = (timed_total or total) - sum(r["ms"] for r in rows) / 1e3
    rows.append({"phase": "other (Python, waits, overlap)", "ms": other * 1e3,
                 "share": other / (timed_total or total) if total > 0 else float("nan")})
    algo_desc = algo.name + (f" F({algo.get('tile')}x{algo.get('tile')})"
                             if algo.name == "winograd" else "")
    return {"case": case.name, "op": op, "algo": algo_desc, "total_ms": total * 1e3,
            "timed_total_ms": None if timed_total is None else timed_total * 1e3,
            "phases": rows}


def _row(name: str, sec: float, amount: float, kind: str, limit_sec: float,
         total: float) -> dict[str, Any]:
    rate = (common.gflops if kind == "flop" else common.gbps)(amount, sec)
    limit = (common.gflops if kind == "flop" else common.gbps)(amount, limit_sec)
    return {"phase": name, "ms": sec * 1e3, "share": sec / total if total > 0 else None,
            "rate": rate, "unit": "GFLOP/s" if kind == "flop" else "GB/s",
            "limit": limit, "limit_of": "SGEMM same shapes" if kind == "flop" else "copy",
            "of_limit": rate / limit if limit and limit > 0 else None}


def format_profile(p: dict[str, Any]) -> str:
    """A small table for one profiled op."""
    head = f"\n{p['case']} {p['op']}: {p['algo']}, total {p['total_ms']:.2f} ms"
    if p.get("timed_total_ms") is not None:
        head += (f" ({p['timed_total_ms']:.2f} ms in the calls timed phase by phase, from "
                 "which the shares)")
    rows = [{"phase": r["phase"], "ms": r["ms"],
             "share": f"{100 * r['share']:.0f}%" if r.get("share") is not None else "-",
             "rate": (f"{common.fmt(r['rate'])} {r['unit']}" if "rate" in r else "-"),
             "limit": (f"{common.fmt(r['limit'])} ({r['limit_of']})" if "limit" in r
                       else "-"),
             "of limit": (f"{100 * r['of_limit']:.0f}%" if r.get("of_limit") else "-")}
            for r in p["phases"]]
    return head + "\n" + common.format_table(rows, ["phase", "ms", "share", "rate", "limit",
                                                    "of limit"])


def run_profile(cases, repeats: int, quiet: bool = False) -> list[dict[str, Any]]:
    """Profile every op of every case; prints each table as it is done."""
    out = []
    progress = common.Progress(len(cases) * len(OPS), "profile ", enabled=not quiet)
    for case in cases:
        for op in OPS:
            progress.step(f"{case.name} {op}")
            p = profile_case(case, op, repeats)
            out.append(p)
            print(format_profile(p), flush=True)
    progress.done()
    return out
