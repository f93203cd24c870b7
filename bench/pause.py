"""fastconv's cpu calls back to back against after a pause, as the suite times them.

    python bench/pause.py [--cases cifar3x3,dw3x3_28,r3x3_56] [--pause 0.15] [--repeats 15]
                          [--probe]

``bench/conv2d.py`` and ``bench/hinge.py`` precede every timed call with a pause (their
``SETTLE_S``) and one untimed call, so that no library runs beside another's spinning thread
pool. This script times the same forward call both ways, in one process, and says under which
Numba threading layer (run it again with ``NUMBA_THREADING_LAYER=omp`` to compare layers). A
large ratio means the suite's table understates fastconv for calls made back to back.
``--probe`` first times a compute-only Numba loop both ways (how many cores a parallel loop
gets) and, on Linux, says for each timed call after the pause where the worker thread ran its
iterations: on another CPU, on the calling thread's CPU, or not at all.
"""
from __future__ import annotations

import argparse

import numpy as np

import common
import conv2d as suite


def time_call(fn, pause: float, repeats: int) -> float:
    """Median seconds of ``fn``: back to back (``pause`` 0), or each timed call after a
    ``pause`` and one untimed call (the suites' protocol, `common.measure`'s ``settle``)."""
    return common.measure({"fn": fn}, repeats=repeats, settle=pause)["fn"].median


def _libc_ids():
    """``(sched_getcpu, gettid)`` of the C library as ctypes functions Numba can call, or None
    where there are none (not glibc 2.30+ on Linux)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        getcpu, gettid = libc.sched_getcpu, libc.gettid
    except (AttributeError, OSError):
        return None
    for fn in (getcpu, gettid):
        fn.restype, fn.argtypes = ctypes.c_int, []
    return getcpu, gettid


def _probe_loop(ids):
    """A Numba parallel loop that only computes: ``out[i]`` = a chain of ``n`` square roots;
    with a non-empty ``where`` it also records, per iteration, the CPU it ended on and its
    thread's id (``ids``; without them, zeros)."""
    from numba import njit, prange

    @njit
    def _zero():
        return 0

    getcpu, gettid = ids if ids else (_zero, _zero)

    @njit(parallel=True)
    def spin(out, n, where):
        for i in prange(out.shape[0]):
            s = 0.0
            for k in range(n):
                s += np.sqrt(k + 1.0)
            out[i] = s
            if where.shape[0]:
                where[i, 0] = getcpu()
                where[i, 1] = gettid()

    return spin


def placement(where: np.ndarray, main_tid: int) -> str:
    """Where the worker threads ran one call's iterations (``where``: CPU, thread id per
    iteration): none, on the calling thread's CPU, or on another CPU."""
    mine = where[:, 1] == main_tid
    if mine.all():
        return "worker took no iteration"
    if set(where[~mine, 0]) <= set(where[mine, 0]):
        return "worker on the caller's CPU"
    return "worker on another CPU"


def probe(pause: float, repeats: int) -> tuple[list[dict], list[dict]]:
    """Rows of the compute-only loop: ms on one thread and on all, and their ratio (the
    cores a parallel loop gets), back to back and after ``pause``; and rows of where the
    worker threads ran the timed calls after the pause (Linux with glibc 2.30+ only)."""
    import time

    import numba

    threads = numba.get_num_threads()
    ids = _libc_ids()
    spin = _probe_loop(ids)
    out = np.zeros(8 * threads)
    where = np.zeros((len(out) if ids else 0, 2), dtype=np.int64)
    n = 2_000_000 // len(out)       # about 4 ms of square roots on one thread (this VM)
    spin(out, 10, where)
    rows = []
    for label, p in (("back to back", 0.0), (f"after {pause} s", pause)):
        numba.set_num_threads(1)
        one = time_call(lambda: spin(out, n, where), p, repeats)
        numba.set_num_threads(threads)
        every = time_call(lambda: spin(out, n, where), p, repeats)
        rows.append({"probe": label, "one_thread_ms": one * 1e3,
                     f"{threads}_threads_ms": every * 1e3, "cores": one / every})
    places: dict[str, list[float]] = {}
    if ids:
        main_tid = ids[1]()
        for _ in range(2 * repeats):       # the suite's protocol, each call classified
            time.sleep(pause)
            spin(out, n, where)
            start = time.perf_counter()
            spin(out, n, where)
            took = time.perf_counter() - start
            places.setdefault(placement(where, main_tid), []).append(took)
    total = sum(len(v) for v in places.values())
    where_rows = [{"timed call after the pause": k, "calls": f"{len(v)} of {total}",
                   "median_ms": float(np.median(v)) * 1e3} for k, v in sorted(places.items())]
    return rows, where_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="cifar3x3,dw3x3_28,r3x3_56")
    parser.add_argument("--pause", type=float, default=suite.SETTLE_S)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--probe", action="store_true",
                        help="first measure how many cores a compute-only loop gets")
    args = parser.parse_args(argv)
    import numba

    import fastconv

    if args.probe:
        rows, where_rows = probe(args.pause, args.repeats)
        print(f"compute-only Numba loop, layer {numba.threading_layer()}")
        common.print_table(rows, list(rows[0]))
        if where_rows:
            print("where its worker thread ran (CPU at the end of each iteration)")
            common.print_table(where_rows, list(where_rows[0]))

    names = args.cases.split(",")
    rows = []
    for case in (c for c in suite.CASES if c.name in names):
        x, w, b, _ = case.arrays(np.float32)

        def fn(x=x, w=w, b=b, case=case):
            return fastconv.conv2d(x, w, b, backend="cpu", **case.kwargs)

        back = time_call(fn, 0.0, args.repeats)
        after = time_call(fn, args.pause, args.repeats)
        rows.append({"case": case.name, "back_to_back_ms": back * 1e3,
                     "after_pause_ms": after * 1e3, "ratio": after / back})
    print(f"forward, float32, {numba.get_num_threads()} threads, layer "
          f"{numba.threading_layer()}, pause {args.pause} s + one untimed call")
    common.print_table(rows, ["case", "back_to_back_ms", "after_pause_ms", "ratio"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
