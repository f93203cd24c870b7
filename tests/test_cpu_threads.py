"""The cpu backend and threads: Numba's threading layer is left to Numba and the user
(issue 10, "Threads"), concurrent calls work, and forked children do not hang (issue 8, item 2).

Every check runs in a fresh process (the layer is chosen once per process, at the first
parallel launch), through the public API.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    import numba
    import fastconv
    import fastconv.kernels.cpu as cpu

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 20, 20)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    scores = rng.standard_normal((300, 40)).astype(np.float32)
    labels = rng.integers(0, 40, 300)

    def conv():
        return fastconv.conv2d(x, w, padding=1, backend="cpu")

    def hinge():
        return fastconv.hinge_loss_and_grad(scores, labels, backend="cpu")[1]
""")


def run_script(body: str, layer: str | None = None, timeout: float = 300,
               helpers: str = "") -> str:
    """Run PRELUDE + helpers + body in a fresh interpreter; return its stdout, failing on a
    non-zero exit (with its stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    script = PRELUDE + textwrap.dedent(helpers) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def test_layer_is_left_to_numba_and_concurrent_user_code_works():
    # The user's own parallel Numba function, called from two Python threads while two more
    # threads call fastconv: every result correct, no abort (exit 134 under workqueue).
    out = run_script("""
        from numba import njit, prange

        @njit(parallel=True)
        def user_sum(a):
            out = np.empty(a.shape[0])
            for i in prange(a.shape[0]):
                out[i] = a[i].sum()
            return out

        a = np.arange(64 * 1000, dtype=np.float64).reshape(64, 1000)
        want_user = a.sum(axis=1)
        want_conv, want_hinge = conv(), hinge()
        assert numba.config.THREADING_LAYER == "default", numba.config.THREADING_LAYER
        layer = numba.threading_layer()
        print("layer", layer)
        if layer == "workqueue":          # neither tbb nor OpenMP loadable: Numba's own limit
            print("skip: only the workqueue layer is available")
            sys.exit(0)
        bad = []
        def user():
            for _ in range(200):
                if not np.array_equal(user_sum(a), want_user):
                    bad.append("user")
        def ours():
            for _ in range(20):
                if not np.array_equal(conv(), want_conv):
                    bad.append("conv")
                if not np.array_equal(hinge(), want_hinge):
                    bad.append("hinge")
        threads = [threading.Thread(target=f) for f in (user, user, ours, ours)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not bad, bad
        print("ok")
    """)
    if "skip:" in out:
        pytest.skip(out.strip().splitlines()[-1])
    assert out.strip().endswith("ok"), out


def test_tbb_is_the_layer_when_installed():
    from importlib import metadata

    try:
        metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        pytest.skip("the tbb wheel is not installed")
    out = run_script("""
        conv()
        print(numba.threading_layer(), cpu.TBB_LOADED)
    """)
    assert out.split()[0] == "tbb", out


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_a_layer_the_user_chose_is_kept(layer):
    # Chosen through the environment; under workqueue, fastconv's own calls from several
    # threads are serialised by its lock, so they still work.
    out = run_script("""
        want = conv()
        layer = numba.threading_layer()
        bad = []
        def work():
            for _ in range(20):
                if not np.array_equal(conv(), want):
                    bad.append(1)
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not bad
        print(layer, cpu.TBB_LOADED)
    """, layer=layer)
    got, loaded = out.split()
    if layer == "omp" and got != "omp":
        pytest.skip("no OpenMP layer in this Numba build")
    assert got == layer and loaded == "None", out


FORK_CHILD = """
    def child_runs_a_conv():
        # Exit 0 if a cpu conv in the child gives the parent's result, 1 otherwise.
        try:
            ok = np.array_equal(conv(), want) and np.array_equal(hinge(), want_h)
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)

    def wait(pid, seconds=20.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"

    def fork_a_child():
        pid = os.fork()
        if pid == 0:
            child_runs_a_conv()
        return wait(pid)
"""


@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_fork_while_another_thread_is_inside_a_cpu_call(layer):
    out = run_script("""
        want, want_h = conv(), hinge()
        stop = threading.Event()
        def busy():                   # back-to-back cpu calls: almost always inside one
            while not stop.is_set():
                conv()
        t = threading.Thread(target=busy)
        t.start()
        codes = []
        for _ in range(20):           # a child hung in about 1 fork in 200 before the settle wait
            time.sleep(0.02)
            codes.append(fork_a_child())
        stop.set()
        t.join()
        # A fork in the middle of one long call of another thread (a bigger conv).
        xl = rng.standard_normal((8, 64, 56, 56)).astype(np.float32)
        wl = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
        started = threading.Event()
        def long_call():
            started.set()
            fastconv.conv2d_weight_grad(xl, wl.shape, xl, padding=1, backend="cpu")
        h = threading.Thread(target=long_call)
        h.start()
        started.wait()
        time.sleep(0.01)
        codes.append(fork_a_child())
        h.join()
        # multiprocessing's fork start method, as DataLoader-style workers use it.
        import multiprocessing as mp
        t = threading.Thread(target=busy)          # again busy while the pool forks
        stop.clear()
        t.start()
        with mp.get_context("fork").Pool(2) as pool:
            res = [pool.apply_async(conv) for _ in range(4)]
            codes += [0 if np.array_equal(r.get(timeout=60), want) else 1 for r in res]
        stop.set()
        t.join()
        print(codes)
        assert codes == [0] * len(codes), codes
    """, layer=layer, helpers=FORK_CHILD)
    assert "hung" not in out


def test_fork_waits_for_workers_only_when_another_thread_has_called():
    # The settle wait before a fork (kernels/cpu.py, _wait_for_idle_workers) is needed only
    # when another live thread holds TBB's per-thread state, i.e. has made a cpu call.
    out = run_script("""
        gate = lambda: cpu._GATE
        conv()
        assert not gate().other_callers_alive()      # only this thread has called
        go, done = threading.Event(), threading.Event()
        def other():
            conv()
            go.set()
            done.wait()
        t = threading.Thread(target=other)
        t.start()
        go.wait()
        assert gate().other_callers_alive()
        done.set()
        t.join()
        assert not gate().other_callers_alive()      # that thread is gone
        print("ok")
    """)
    assert out.strip().endswith("ok"), out


def test_thread_states_and_bounded_settle_wait():
    import threading
    import time

    from fastconv.kernels import cpu

    states = cpu._thread_states(threading.get_native_id())
    if states is None:
        pytest.skip("no /proc/self/task here")
    assert all(len(v) == 1 and v.isalpha() for v in states.values()), states
    t0 = time.monotonic()
    cpu._wait_for_idle_workers(0.05)
    assert time.monotonic() - t0 < 5.0        # bounded by its timeout (slack for a busy CI)
