"""The cpu algorithms and layouts fastconv could run on one layer, timed against each other.

    python bench/layouts.py --case r3x3_14 [--algos winograd:4:batched,winograd:2:fused,im2col]
                            [--sequence] [--repeats 9]
    python bench/layouts.py --case 1,256,28,256,3,1,1 ...    (N,C,HW,K,kernel,stride,pad[,groups])

For checking a dispatch rule on this machine: each named algorithm is forced on the layer
(``--case``: a layer of ``bench/conv2d.py``'s suite or its held-out set, or any layer as
``N,C,HW,K,kernel,stride,pad[,groups]``), checked against the
first one, and timed per op (forward, input gradient, weight gradient) with the suite's
protocol (candidates interleaved, a pause and an untimed call before each timed call). With
``--sequence`` the three ops run one after the other as one candidate, PyTorch's forward +
backward beside them, as a training step meets them (one layout's BLAS threads still spinning
can slow the next op). An algorithm is ``name`` or ``name:tile:layout`` (Winograd) or
``name:layout`` (im2col: ``wide``, ``per_image``, ``kernel_rows``). The library's own choice is
printed first. Times: median ms.
"""
from __future__ import annotations

import argparse

import numpy as np

import common
import conv2d as suite

OPS = ("forward", "input_grad", "weight_grad")
WORKSPACE_PARAMS = ("workspace_bytes", "chunk_bytes")


def parse_algo(text: str, workspace: tuple):
    """``name``, ``name:layout`` or ``winograd:tile:layout`` -> an ``Algo`` with the
    ``workspace`` params of the library's own choice."""
    from fastconv._types import Algo

    name, *rest = text.split(":")
    if name == "winograd":
        tile = int(rest[0]) if rest else 4
        params = (("tile", tile), ("layout", rest[1] if len(rest) > 1 else "fused"))
    else:
        params = (("layout", rest[0]),) if rest else ()
    return Algo(name, params + workspace)


def _case(text: str):
    """A layer of the suite or its held-out set by name, or any layer written
    ``N,C,HW,K,kernel,stride,pad[,groups]``."""
    if text[:1].isdigit():
        return suite.ConvCase("x".join(text.split(",")), *map(int, text.split(",")))
    case, = suite.select_cases(argparse.Namespace(cases=text, quick=False))
    return case


def default_algos(case, geom) -> str:
    """The candidates worth timing on ``case`` (``geom``: its geometry) when ``--algos`` is not
    given."""
    from fastconv.kernels.cpu_workspace import winograd_applies

    if winograd_applies(geom):
        return "winograd:4:batched,winograd:2:batched,winograd:2:fused,im2col"
    algos = "im2col:kernel_rows,im2col:wide,im2col:per_image"
    return algos + ",direct" if case.groups > 1 or case.C < 8 else algos


def op_call(op: str, algo, x, w, b, gy, geom):
    """A zero-argument call of one op of the cpu backend with ``algo`` forced."""
    from fastconv.kernels import cpu

    if op == "forward":
        return lambda: cpu.conv2d_forward(x, w, b, geom, algo)
    if op == "input_grad":
        return lambda: cpu.conv2d_input_grad(w, gy, geom, algo)
    return lambda: cpu.conv2d_weight_grad(x, gy, geom, algo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--algos", default=None,
                        help="comma-separated; default: the candidates for the layer's kind "
                             "(Winograd ones only for a 3x3 stride-1 layer)")
    parser.add_argument("--sequence", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch, threads = common.setup(argparse.Namespace(threads=None, no_torch=False))
    import fastconv
    from fastconv._args import conv_geometry
    from fastconv.kernels.cpu_workspace import winograd_applies

    case = _case(args.case)
    x, w, b, gy = case.arrays()
    geom = conv_geometry(x.shape, w.shape, case.stride, case.pad, 1, case.groups)
    for op, fn, a in (("forward", fastconv.conv2d, (x, w, b)),
                      ("input_grad", fastconv.conv2d_input_grad, (x.shape, w, gy)),
                      ("weight_grad", fastconv.conv2d_weight_grad, (x, w.shape, gy))):
        chosen = fastconv.explain(fn, *a, **case.kwargs).algo
        print(f"{op}: fastconv chooses {chosen}")
    # the forced algorithms get the same workspace bound and chunk size as the library's
    workspace = tuple(kv for kv in chosen.params if kv[0] in WORKSPACE_PARAMS)
    texts = (args.algos or default_algos(case, geom)).split(",")
    for text in texts:
        if text.startswith("winograd") and not winograd_applies(geom):
            raise SystemExit(f"{text}: Winograd computes 3x3 stride-1 layers only, not "
                             f"{case.name} ({case.kernel}x{case.kernel}, stride {case.stride})")
    algos = {text: parse_algo(text, workspace) for text in texts}
    print(f"{case.name}, float32, {threads} threads (median ms)")
    for op in OPS:
        calls = {t: op_call(op, a, x, w, b, gy, geom) for t, a in algos.items()}
        outs = [f() for f in calls.values()]
        errs = [float(np.linalg.norm(o - outs[0]) / np.linalg.norm(outs[0])) for o in outs]
        if max(errs) > common.tolerance(np.float32):
            raise SystemExit(f"{op}: results differ: {dict(zip(calls, errs))}")
        if not args.sequence:
            t = common.measure(calls, repeats=args.repeats, settle=suite.SETTLE_S)
            print(op, "  ".join(f"{k} {v.median * 1e3:.2f}" for k, v in t.items()))
    if args.sequence:
        steps = {t: (lambda a=a: [op_call(op, a, x, w, b, gy, geom)() for op in OPS])
                 for t, a in algos.items()}
        if torch is not None:
            steps["torch"] = suite.torch_step(torch, case, "fwd+bwd", x, w, b, gy)
        t = common.measure(steps, repeats=args.repeats, settle=suite.SETTLE_S)
        print("sequence", "  ".join(f"{k} {v.median * 1e3:.2f}" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
