"""Cold start of the cpu backend: Numba compile time of every kernel family, both dtypes.

Runs a fresh Python process with an empty ``NUMBA_CACHE_DIR`` that calls every cpu kernel
family (forward, both gradients; the bias reduction; the hinge loss) in float32 and float64 on
tiny shapes, and reports the seconds each family took on first use, then the same in a second
process that loads the cache. Target (issue 10): all families, both dtypes, under 20 s.
``--functions N`` also lists the N Numba functions that took longest to compile, from Numba's
``numba:compile`` events: how many times each was compiled (once per distinct argument types)
and its exclusive seconds (its callees' own compilations subtracted).

    python bench/compile_time.py [--json PATH] [--functions N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

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
from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.kernels import cpu
import_s = time.perf_counter() - t0
FAMILIES = {
    "gemm1x1": ((2, 8, 6, 6), (4, 8, 1, 1), 1, 0, 1, Algo("gemm1x1")),
    "im2col": ((2, 3, 9, 9), (4, 3, 3, 3), 2, 1, 1, Algo("im2col", (("layout", "wide"),))),
    "winograd": ((1, 8, 10, 10), (8, 8, 3, 3), 1, 1, 1, Algo("winograd", (("tile", 4),))),
    "direct": ((1, 4, 8, 8), (4, 1, 3, 3), 1, 1, 4, Algo("direct")),
    "direct_strided": ((1, 4, 8, 8), (4, 1, 3, 3), 2, 1, 4, Algo("direct")),
}
out = {"import": import_s}
for name, (xs, ws, s, p, g, algo) in FAMILIES.items():
    t = time.perf_counter()
    for dt in (np.float32, np.float64):
        x, w = np.ones(xs, dt), np.ones(ws, dt)
        geom = conv_geometry(xs, ws, s, p, 1, g)
        gy = np.ones(geom.output_shape, dt)
        cpu.conv2d_forward(x, w, np.ones(ws[0], dt), geom, algo)
        cpu.conv2d_input_grad(w, gy, geom, algo)
        cpu.conv2d_weight_grad(x, gy, geom, algo)
    out[name] = time.perf_counter() - t
t = time.perf_counter()
for dt in (np.float32, np.float64):
    cpu.conv2d_bias_grad(np.ones((2, 3, 4, 4), dt), Algo("reduce"))
out["bias_reduce"] = time.perf_counter() - t
t = time.perf_counter()
import fastconv
for dt in (np.float32, np.float64):
    fastconv.hinge_loss_and_grad(np.ones((4, 5), dt), np.zeros(4, np.int64), backend="cpu")
out["hinge"] = time.perf_counter() - t
print(json.dumps({"families": out, "functions": FUNCTIONS}))
"""


def run_child(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, timeout=900)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastconv-numba-") as cache:
        cold_run = run_child(cache)
        warm_run = run_child(cache)
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
    if args.json:
        common.write_json(args.json, {"cold": cold, "cached": warm,
                                      "functions": cold_run["functions"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
