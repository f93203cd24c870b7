"""fastconv's main benchmark: the hinge loss and the conv2d suites, one after the other.

Each suite first checks fastconv against the NumPy reference, then times fastconv's chosen
backend (or ``--backend``), the reference and PyTorch when installed, interleaved in this
process with the same thread count, and prints a table. Exit status 1 if any check failed.

    python bench/run.py                 # full run (a few minutes on 2 cores)
    python bench/run.py --quick         # subset, under a minute
    python bench/run.py --json out.json --threads 2 --backend cpu
    python bench/run.py --profile       # per case and op: time of every phase, rate, limit
    python bench/run.py --plot out.png  # speedups over PyTorch and GFLOP/s at a glance
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py   # BLAS as users get it
"""
from __future__ import annotations

import argparse
import sys

import common
import conv2d
import hinge

SUITES = {"hinge": hinge, "conv2d": conv2d}


def main(argv: list[str] | None = None) -> int:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    conv2d.add_args(parser)
    parser.add_argument("--suite", choices=tuple(SUITES) + ("all",), default="all",
                        help="which suite to run (default: all)")
    args = parser.parse_args(argv)
    if args.plot:
        common.require_matplotlib()   # fail fast, before any timing
    if args.profile and args.suite == "all":
        args.suite = "conv2d"         # the profile is of the conv kernels
    torch, threads = common.setup(args)
    env = common.environment()
    print(common.format_environment(env))
    names = tuple(SUITES) if args.suite == "all" else (args.suite,)
    results = [SUITES[name].run(args, torch, threads) for name in names]
    if args.json:
        common.write_json(args.json, {"environment": env, "suites": results})
    ok = all(row["check"] == "ok" for suite in results for row in suite["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
