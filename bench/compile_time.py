"""Cold start of the cpu backend: Numba compile time of every kernel family, both dtypes.

Runs a fresh Python process with an empty ``NUMBA_CACHE_DIR`` that warms up every cpu kernel
family with ``fastconv.warmup.warmup`` (every algorithm and layout of the family: forward, both
gradients; the bias reduction; the hinge loss) in float32 and float64 on tiny shapes, and
reports the seconds each family took on first use, then the same in a second process that
loads the cache. Target (issue 10): all families, both dtypes, under 20 s. ``--jobs N`` also
times ``python -m fastconv.warmup --jobs N`` on another empty cache: one child process per
family and dtype, N at a time.
``--functions N`` also lists the N Numba functions that took longest to compile, from Numba's
``numba:compile`` events: how many times each was compiled (once per distinct argument types)
and its exclusive seconds (its callees' own compilations subtracted).

    python bench/compile_time.py [--json PATH] [--functions N] [--jobs N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import common

TARGET_S = 20.0

CHILD = r"""
import json, sys, time
import numpy as np
from numba.core import event
FUNCTIONS = {}       # qualified name -> [compilations, exclusive seconds]
class Compiles(event.Listener):
    def __init__(self):
        self.stack = []      # (name, start, seconds of nested compilations)
    def on_start(self, ev):
        fn = getattr((ev.data or {}).get("dispatcher"), "py_func", None)
        name = getattr(fn, "__module__", "?") + "." + getattr(fn, "__qualname__", "?")
        self.stack.append([name, time.perf_counter(), 0.0])
    def on_end(self, ev):
        name, start, nested = self.stack.pop()
        took = time.perf_counter() - start
        rec = FUNCTIONS.setdefault(name, [0, 0.0])
        rec[0] += 1
        rec[1] += took - nested
        if self.stack:
            self.stack[-1][2] += took
event.register("numba:compile", Compiles())
t0 = time.perf_counter()
from fastconv.warmup import FAMILIES, warmup
from fastconv.kernels import cpu
import_s = time.perf_counter() - t0
out = {"import": import_s}
for name in FAMILIES:              # every code path of each family, as the warm-up runs it
    out.update(warmup(families=[name]))
print(json.dumps({"families": out, "functions": FUNCTIONS}))
"""


def run_child(cache_dir: str, args: Optional[list[str]] = None) -> str:
    """stdout of ``python -c CHILD`` (or ``python ARGS``) with ``cache_dir`` as Numba's cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    res = subprocess.run([sys.executable] + (args or ["-c", CHILD]), capture_output=True,
                         text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return res.stdout


def run_families(cache_dir: str) -> dict:
    return json.loads(run_child(cache_dir).strip().splitlines()[-1])


def time_jobs(jobs: int) -> float:
    """Wall seconds of ``python -m fastconv.warmup --jobs JOBS`` on an empty cache."""
    with tempfile.TemporaryDirectory(prefix="fastconv-numba-") as cache:
        start = time.perf_counter()
        run_child(cache, ["-m", "fastconv.warmup", "--quiet", "--jobs", str(jobs)])
        return time.perf_counter() - start


def function_rows(functions: dict, top: int) -> list[dict]:
    """The ``top`` functions by exclusive compile seconds, as table rows."""
    ranked = sorted(functions.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"function": name.removeprefix("fastconv."), "compilations": n, "exclusive_s": sec}
            for name, (n, sec) in ranked]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--functions", type=int, default=0, metavar="N",
                        help="also list the N functions with the longest compile times")
    parser.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="also time the warm-up command with N jobs on an empty cache")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastconv-numba-") as cache:
        cold_run = run_families(cache)
        warm_run = run_families(cache)
    cold, warm = cold_run["families"], warm_run["families"]
    rows = [{"family": k, "cold_s": cold[k], "cached_s": warm.get(k)} for k in cold]
    total_cold = sum(v for k, v in cold.items() if k != "import")
    total_warm = sum(v for k, v in warm.items() if k != "import")
    rows.append({"family": "all kernels", "cold_s": total_cold, "cached_s": total_warm})
    common.print_table(rows, ["family", "cold_s", "cached_s"],
                       "first use of every cpu kernel family, float32 + float64 (seconds)")
    if args.functions > 0:
        common.print_table(function_rows(cold_run["functions"], args.functions),
                           ["function", "compilations", "exclusive_s"],
                           "longest Numba compilations of the cold run (numba:compile events)")
    print(f"cold compile of all families: {total_cold:.1f} s (target < {TARGET_S:g} s): "
          f"{'met' if total_cold < TARGET_S else 'NOT met'}")
    jobs_s = time_jobs(args.jobs) if args.jobs > 0 else None
    if jobs_s is not None:
        print(f"python -m fastconv.warmup --jobs {args.jobs} on an empty cache: {jobs_s:.1f} s "
              f"wall")
    if args.json:
        common.write_json(args.json, {"cold": cold, "cached": warm,
                                      "functions": cold_run["functions"],
                                      "jobs": args.jobs, "jobs_wall_s": jobs_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
