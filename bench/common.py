"""Shared benchmark harness: timing, rates, tables, JSON output, progress, environment report.

Every suite in ``bench/`` (CPU conv, hinge, GPU) uses these helpers so that their numbers are
measured and printed the same way. Benchmarks are never imported by tests.

Timing protocol (`measure`): every candidate is warmed up first, then the candidates run in
turns (A, B, C, A, B, C, ...) so that slow drifts of a shared machine (other jobs, clock
changes) hit all of them alike; the reported time is the median of the repeats. Only ratios
measured in the same call are meant to be compared.

The clock is pluggable: `wall_timer` (``time.perf_counter`` around a call) for CPU work; a GPU
suite passes its own ``timer(fn) -> seconds`` (for example one built on CUDA events).

The suites are scripts run as ``python bench/<name>.py``; Python then puts ``bench/`` on the
path, so they import this module as ``import common`` / ``from common import measure``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

Timer = Callable[[Callable[[], Any]], float]

# Environment variables that change BLAS or thread behaviour; reported with every run.
REPORTED_ENV = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "FASTCONV_BACKEND",
    "FASTCONV_WORKSPACE_MB",
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def wall_timer(fn: Callable[[], Any]) -> float:
    """Run ``fn()`` once and return the elapsed wall-clock time in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Timing:
    """Repeated timings of one candidate, in seconds.

    Attributes
    ----------
    name : str
        The candidate's label.
    samples : list of float
        One entry per timed repeat (warm-up runs excluded).
    """

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median of the samples in seconds (``nan`` when there are none)."""
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def ms(self) -> float:
        """Median in milliseconds."""
        return self.median * 1e3

    @property
    def spread(self) -> float:
        """Relative spread ``(p75 - p25) / median`` of the samples, a noise indicator."""
        if len(self.samples) < 4:
            return math.nan
        q = np.percentile(self.samples, [25, 75])
        return float((q[1] - q[0]) / self.median)


def measure(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    min_time: float = 0.0,
    max_time: float = math.inf,
    timer: Timer = wall_timer,
    settle: float = 0.0,
) -> dict[str, Timing]:
    """Time several candidates interleaved and return their timings.

    Parameters
    ----------
    candidates : mapping of str to callable
        Label -> zero-argument callable doing one complete operation. Dict order is the order
        within each round.
    repeats : int
        Timed rounds (each round runs every candidate once).
    warmup : int
        Untimed calls per candidate before the first round (JIT compile, caches, page faults).
    min_time : float
        Keep adding rounds beyond ``repeats`` until this many seconds of samples exist for the
        slowest candidate (useful for very short calls).
    max_time : float
        Stop adding rounds once this many seconds have been spent timing, after at least
        ``min(3, repeats)`` rounds.
    timer : callable
        ``timer(fn) -> seconds`` runs ``fn`` once and measures it; `wall_timer` by default.
    settle : float
        If positive, before each timed call: sleep this long, then make one untimed call of
        the same candidate. On a CPU the thread pools of the previous candidate (PyTorch's
        OpenMP, OpenBLAS) keep spinning for up to ~0.1 s after it returns and would steal the
        cores from the next one, while a pool that has gone to sleep is slow to wake. Users
        call one library back to back, so each timed call follows a call of its own kind on
        cores the other candidates have left.

    Returns
    -------
    dict of str to Timing
        Same keys and order as ``candidates``.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in candidates}
    started = time.perf_counter()
    rounds = 0
    while True:
        for name, fn in candidates.items():
            if settle:
                time.sleep(settle)
                fn()  # untimed: wakes this candidate's own pools, as in back-to-back use
            timings[name].samples.append(timer(fn))
        rounds += 1
        slowest = max(sum(t.samples) for t in timings.values())
        elapsed = time.perf_counter() - started
        if rounds >= min(3, repeats) and elapsed >= max_time:
            break
        if rounds >= repeats and slowest >= min_time:
            break
    return timings


def ratio_range(baseline: Timing, timing: Timing) -> tuple[float, float]:
    """Run-to-run range of the speedup ``baseline / timing``: from the slow quartile of
    ``timing`` against the fast quartile of ``baseline``, to the reverse (interpolated
    quartiles with 2 or 3 samples; ``nan`` with fewer than 2)."""
    if len(baseline.samples) < 2 or len(timing.samples) < 2:
        return math.nan, math.nan
    b25, b75 = np.percentile(baseline.samples, [25, 75])
    t25, t75 = np.percentile(timing.samples, [25, 75])
    return float(b25 / t75), float(b75 / t25)


def verdict(value: float, target: float, lo: float, hi: float, at_least: bool = True) -> str:
    """``met`` / ``NOT met`` for ``value`` against ``target``, or ``noisy, rerun`` when the
    run-to-run range ``[lo, hi]`` of the value straddles the target (the spread is larger
    than the distance to the target)."""
    if math.isfinite(lo) and math.isfinite(hi) and lo < target < hi:
        return "noisy, rerun"
    ok = value >= target if at_least else value <= target
    return "met" if ok else "NOT met"


# --------------------------------------------------------------------------------------------
# Rates and summaries
# --------------------------------------------------------------------------------------------
def gflops(flops: float, seconds: float) -> float:
    """Arithmetic rate in GFLOP/s (``nan`` for a non-positive time)."""
    return flops / seconds / 1e9 if seconds > 0 else math.nan


def gbps(nbytes: float, seconds: float) -> float:
    """Memory rate in GB/s (10^9 bytes per second; ``nan`` for a non-positive time)."""
    return nbytes / seconds / 1e9 if seconds > 0 else math.nan


def speedup(baseline_seconds: float, seconds: float) -> float:
    """How many times faster than the baseline (``baseline / time``; ``nan`` if unknown)."""
    if not (seconds > 0) or not (baseline_seconds > 0):
        return math.nan
    return baseline_seconds / seconds


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the finite positive values (``nan`` when there are none)."""
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    if not vals:
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def rel_error(out: Any, ref: Any) -> float:
    """Relative error ``||out - ref|| / ||ref||`` in float64 (``inf`` when NaN appears).

    Both arguments must be NumPy-convertible (move GPU arrays to the host first).
    """
    out64 = np.asarray(out, dtype=np.float64)
    ref64 = np.asarray(ref, dtype=np.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"shape mismatch: out {out64.shape} vs ref {ref64.shape}")
    if not np.all(np.isfinite(out64)):
        return math.inf
    denom = float(np.linalg.norm(ref64))
    diff = float(np.linalg.norm(out64 - ref64))
    return diff / denom if denom > 0 else diff


def tolerance(dtype: Any) -> float:
    """The project's relative-error bound for a dtype: 1e-5 (float32), 1e-11 (float64)."""
    return 1e-11 if np.dtype(dtype) == np.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# Output: tables, JSON, progress
# --------------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """Format one table cell: about 3 significant digits for floats, ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        mag = abs(value)
        if mag >= 100:
            return f"{value:.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        if mag >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Render rows (dicts) as a plain-text table with the given columns, in order.

    Missing keys print as ``-``; the first column is left-aligned, the rest right-aligned.
    """
    cells = [[fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(w) if i == 0 else v.rjust(w)
                 for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                title: str | None = None) -> None:
    """Print `format_table` to stdout, optionally under a title line."""
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns))
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    """Turn NumPy scalars, tuples and non-finite floats into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` (NaN/inf become ``null``)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(dict(payload)), fh, indent=2)
        fh.write("\n")


class Progress:
    """A one-line progress indication on stderr: ``[3/12] label``.

    On a terminal the line is rewritten in place; otherwise (logs, CI) one line per step is
    written. Nothing goes to stdout, so tables and JSON stay clean.

    Parameters
    ----------
    total : int
        Number of steps expected.
    prefix : str
        Printed before the counter (e.g. the suite name).
    enabled : bool
        ``False`` silences it (``--quiet``).
    """

    def __init__(self, total: int, prefix: str = "", enabled: bool = True) -> None:
        self.total = total
        self.prefix = prefix
        self.enabled = enabled
        self.count = 0
        self._tty = sys.stderr.isatty()
        self._started = time.perf_counter()

    def step(self, label: str) -> None:
        """Announce the start of the next step."""
        self.count += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._started
        msg = f"{self.prefix}[{self.count}/{self.total}] {label} ({elapsed:.0f}s)"
        if self._tty:
            sys.stderr.write("\r\033[K" + msg)
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        """Finish the progress line (clears it on a terminal)."""
        if self.enabled and self._tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Threads and environment
# --------------------------------------------------------------------------------------------
def set_threads(threads: int | None) -> int:
    """Use the same number of threads in Numba, PyTorch (if imported) and NumPy's BLAS.

    Parameters
    ----------
    threads : int or None
        Thread count; ``None`` keeps Numba's default (all cores) and applies it to the others.

    Returns
    -------
    int
        The thread count now in effect.

    Notes
    -----
    The BLAS limit is applied through ``threadpoolctl`` when installed (it stays in effect for
    the process); without it the BLAS keeps its own setting, which `environment` reports.
    """
    import numba

    # set_num_threads starts Numba's thread pool; fastconv's cpu backend must be imported first
    # so that Numba's default choice can find the tbb layer (it loads the tbb wheel's library).
    # Started here first, the pool would be OpenMP's, whose spinning workers starve OpenBLAS:
    # small convs then ran 30x slower (0.3 ms -> 11 ms).
    import fastconv.kernels.cpu  # noqa: F401

    n = int(threads) if threads else numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return n
    # Kept alive on purpose: the limit must hold for the whole benchmark.
    global _BLAS_LIMIT
    _BLAS_LIMIT = threadpool_limits(limits=n, user_api="blas")
    return n


_BLAS_LIMIT: Any = None


def import_torch() -> Any | None:
    """Import PyTorch if installed, else return ``None`` (benchmarks then skip its columns)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def setup(args: argparse.Namespace) -> tuple[Any | None, int]:
    """Prepare a run from the common options: import PyTorch (unless ``--no-torch``), then
    apply ``--threads`` to Numba, PyTorch and BLAS alike.

    Returns
    -------
    (torch module or None, thread count in effect)
    """
    torch = None if getattr(args, "no_torch", False) else import_torch()
    return torch, set_threads(getattr(args, "threads", None))


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or `platform.processor()` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numba_threading_layer() -> str:
    """The layer Numba's parallel loops run on: the one in use once a parallel loop ran, else
    the configured choice (``default`` lets Numba pick at the first launch)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel launch yet in this process
        return f"{numba.config.THREADING_LAYER} (not started)"


def blas_info() -> list[dict[str, Any]]:
    """NumPy's BLAS libraries as ``threadpoolctl`` sees them (empty list without it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{k: info.get(k) for k in keys}
            for info in threadpool_info() if info.get("user_api") == "blas"]


def environment() -> dict[str, Any]:
    """Describe the machine and software a benchmark ran on.

    Returns
    -------
    dict
        ``python``, ``numpy``, ``numba``, ``torch`` (or ``None``), ``fastconv_backends``,
        ``cpu`` model, ``cores``, ``numba_threads``, ``numba_threading_layer``,
        ``torch_threads``, ``blas`` (list from
        threadpoolctl: library, version, threads, architecture) and ``env`` (the variables in
        `REPORTED_ENV` that are set, e.g. ``OPENBLAS_CORETYPE``).
    """
    import numba

    # First: probing the cpu backend imports its kernels, which may pick Numba's layer.
    try:
        import fastconv

        backends = list(fastconv.available_backends())
    except (ImportError, AttributeError):
        backends = None
    torch = sys.modules.get("torch")
    info: dict[str, Any] = {
        "fastconv_backends": backends,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": getattr(torch, "__version__", None),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _numba_threading_layer(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "blas": blas_info(),
        "env": {k: os.environ[k] for k in REPORTED_ENV if k in os.environ},
    }
    return info


def format_environment(info: Mapping[str, Any]) -> str:
    """A few human-readable lines summarising `environment`'s dict."""
    blas = ", ".join(
        f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, "
        f"{b.get('num_threads')} threads)" for b in info.get("blas", [])) or "unknown"
    env = " ".join(f"{k}={v}" for k, v in info.get("env", {}).items()) or "(none set)"
    return "\n".join([
        f"cpu: {info['cpu']} ({info['cores']} cores)",
        f"python {info['python']}, numpy {info['numpy']}, numba {info['numba']}, "
        f"torch {info['torch'] or 'not installed'}",
        f"threads: numba {info['numba_threads']} ({info['numba_threading_layer']} layer), "
        f"torch {info['torch_threads'] or '-'}",
        f"blas: {blas}",
        f"env: {env}",
        f"fastconv backends: {info.get('fastconv_backends')}",
    ])


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on a file-only backend, or exit with a clear message (called
    before any timing, so a missing package does not cost a whole run)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or drop --plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """The machine's measured float32 GEMM rate: NumPy's BLAS on ``n x n`` matrices, best of
    ``repeats`` (the limit the plot draws for GEMM-bound layers)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    best = min(wall_timer(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return gflops(2.0 * n ** 3, best)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every suite shares.

    ``--quick`` (small subset, fewer repeats), ``--json PATH``, ``--threads N``,
    ``--backend NAME`` (fastconv backend to time; default: what fastconv chooses),
    ``--repeats N`` (override), ``--no-torch`` and ``--quiet`` (no progress on stderr).
    """
    parser.add_argument("--quick", action="store_true",
                        help="run a small subset with fewer repeats (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for Numba, PyTorch and BLAS (default: all cores)")
    parser.add_argument("--backend", default=None,
                        help="fastconv backend to time (default: fastconv's own choice)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per case (default depends on --quick)")
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return parser


def suite_main(run: Callable, description: str, argv: Sequence[str] | None = None,
               add_args: Callable | None = None) -> int:
    """Command-line entry of one CPU suite: parse the common options (and the suite's own),
    print the environment, run the suite, write ``--json``; exit status 1 if a check failed.

    ``run(args, torch, threads)`` returns ``{"results": [rows with "check"], ...}``.
    """
    parser = add_common_args(argparse.ArgumentParser(description=description))
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    torch, threads = setup(args)
    env = environment()
    print(format_environment(env))
    result = run(args, torch, threads)
    if args.json:
        write_json(args.json, {"environment": env, **result})
    return 0 if all(r["check"] == "ok" for r in result["results"]) else 1
