"""The ``cpu`` backend: Numba kernels plus NumPy's BLAS ``matmul``, behind the backend contract.

Each entry point maps the ``Algo`` chosen by ``fastconv/dispatch/cpu.py`` to a kernel family:

============  =====================================================  ========================
``algo.name`` what                                                   module
============  =====================================================  ========================
gemm1x1       1x1 unpadded: plain GEMMs on the (subsampled) input    ``cpu_conv``
im2col        packed patches (chunked) times the weights by BLAS      ``cpu_conv``
winograd      F(4x4, 3x3) or F(2x2, 3x3) for 3x3 stride-1 layers     ``cpu_winograd``
direct        loops over taps; depthwise, small groups, no workspace  ``cpu_depthwise``
reduce        bias gradient                                          ``cpu_conv``
============  =====================================================  ========================

Threads. fastconv never sets Numba's threading layer: it is process-wide, and the user's own
parallel Numba code runs on it too. The layer wanted here is ``tbb``: thread-safe (parallel
launches from several Python threads at once, fastconv's or the user's), and its idle workers
do not keep spinning the way libgomp's do after each parallel loop (spinning OpenMP workers
starved OpenBLAS's threads in the GEMM that follows: on 2 cores a 1 ms GEMM took 4 to 15 ms
right after a Numba kernel). Numba's default choice already prefers ``tbb`` when it can load
``libtbb.so.12``; the ``tbb`` wheel (a dependency of fastconv) puts that library in
``<prefix>/lib``, where the dynamic loader does not look, so Numba would report it "disabled".
Importing this module therefore only *loads* that library (``RTLD_GLOBAL``), and only while
Numba's pool has not started and the user has not asked for another layer; the choice stays
Numba's, and ``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER`` still win.

Whatever layer ends up running: calls are serialised by one lock only when it is
``workqueue``, the one layer that aborts on concurrent launches. ``fork`` waits for the cpu
calls in flight in other threads to return (see :class:`_CallGate`), and the child starts
with fresh locks: a forked child never hangs on a lock a parent's thread held.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time
from typing import Optional

import numba
import numpy as np
from numba.np.ufunc import parallel as _numba_parallel

_TBB_LIBRARY = "libtbb.so.12"
# The layers whose choice may fall on tbb (Numba's names; "default" tries tbb first).
_LAYERS_WANTING_TBB = ("default", "safe", "threadsafe", "tbb")


def _tbb_candidates() -> list[str]:
    """Where the ``tbb`` wheel may have put ``libtbb.so.12``: the environment's ``lib``
    (virtual environment and base installation), and the files the distribution lists."""
    paths = [os.path.join(prefix, "lib", _TBB_LIBRARY)
             for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, sys.exec_prefix))]
    try:
        from importlib import metadata

        for f in metadata.distribution("tbb").files or ():
            if f.name == _TBB_LIBRARY:
                paths.append(str(f.locate()))
    except Exception:  # noqa: BLE001  (no tbb distribution, or unreadable metadata)
        pass
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def _make_tbb_loadable() -> Optional[str]:
    """Load ``libtbb.so.12`` globally so that Numba's default layer choice can find it; the
    path loaded, or None when not needed (pool started, another layer asked for) or absent."""
    if _numba_parallel._is_initialized:
        return None
    if str(numba.config.THREADING_LAYER).lower() not in _LAYERS_WANTING_TBB:
        return None
    for path in _tbb_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
        except OSError:
            continue
    return None


TBB_LOADED = _make_tbb_loadable()

from . import cpu_jit  # noqa: E402,F401  (one line on stderr when a process first compiles)
from . import cpu_conv, cpu_depthwise, cpu_winograd, cpu_workspace  # noqa: E402
from .cpu_hinge import hinge_loss_rows as _hinge_loss_rows  # noqa: E402

_LAYER: list[Optional[str]] = [None]     # Numba's layer, once its pool has started


class _CallGate:
    """Who may be inside the backend: many calls at once (one at a time on ``workqueue``),
    and none while the process forks.

    ``fork`` copies only the forking thread; locks held by other threads stay held forever in
    the child. Before a fork the gate waits for the calls in flight to return and lets no new
    one in (a call is bounded in time), so that no lock of ours, Numba's pool or OpenBLAS's
    (held inside a GEMM) is mid-use when the child is copied; the child gets a fresh gate.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.serial = threading.RLock()       # the workqueue lock
        self.inside = 0                       # calls in flight
        self.closing = False                  # a fork is waiting: no new call may enter
        self.owners: dict[int, int] = {}      # thread id -> nested calls (re-entrancy)
        self.callers: set[int] = set()        # every thread id that has made a call

    def enter(self) -> None:
        me = threading.get_ident()
        with self.cond:
            while self.closing and me not in self.owners:
                self.cond.wait()
            self.inside += 1
            self.owners[me] = self.owners.get(me, 0) + 1
            self.callers.add(me)

    def leave(self) -> None:
        me = threading.get_ident()
        with self.cond:
            self.inside -= 1
            self.owners[me] -= 1
            if not self.owners[me]:
                del self.owners[me]
            if not self.inside:
                self.cond.notify_all()

    def before_fork(self) -> None:
        """Hold the gate closed across ``fork``: wait until the only calls in flight are the
        forking thread's own (a fork from inside a call cannot wait for itself)."""
        self.cond.acquire()
        self.closing = True
        mine = self.owners.get(threading.get_ident(), 0)
        while self.inside > mine:
            self.cond.wait()

    def other_callers_alive(self) -> bool:
        """Whether a live thread other than this one has made a call (and so may hold TBB's
        per-thread state, which keeps Numba's prepare-fork handler from stopping TBB)."""
        alive = {t.ident for t in threading.enumerate()}
        return bool((self.callers & alive) - {threading.get_ident()})

    def after_fork_in_parent(self) -> None:
        self.closing = False
        self.cond.notify_all()
        self.cond.release()


_GATE = _CallGate()


# How long a fork waits for Numba's tbb workers to go to sleep (see _wait_for_idle_workers).
FORK_SETTLE_SECONDS = 0.1
# Thread states of /proc/<pid>/task/<tid>/stat in which a thread holds no lock it is using:
# blocked (S), stopped (T, t), dead (Z, X), idle kernel thread (I). R and D may be mid-update.
_SETTLED_STATES = frozenset("STtZXI")


def _thread_states(me: int) -> Optional[dict[int, str]]:
    """State letter of every thread of this process that is not a Python thread; None where
    /proc cannot tell."""
    python = {t.native_id for t in threading.enumerate()} | {me}
    states = {}
    try:
        names = os.listdir("/proc/self/task")
    except OSError:
        return None
    for name in names:
        if not name.isdigit() or int(name) in python:
            continue
        try:
            with open(f"/proc/self/task/{name}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:            # the thread has just exited
            continue
        except OSError:
            return None
        states[int(name)] = chr(stat[stat.rindex(b")") + 2])   # comm may hold spaces
    return states


def _wait_for_idle_workers(seconds: float) -> None:
    """Wait (at most ``seconds``) until every non-Python thread is blocked, twice in a row.

    Under the ``tbb`` layer, Numba's prepare-fork handler can shut TBB's workers down only
    when no other thread has used TBB; otherwise (another Python thread made a parallel call
    before) the workers stay and are copied into the child as they are. A worker that was
    between its last task and its sleep at that instant holds TBB's sleep-list lock, and the
    child's first parallel call waits on that lock forever (seen as one hung child in a few
    hundred forks). Workers take that lock only while running, so once every worker is
    blocked none holds it. The gate has already stopped fastconv's own calls. /proc does not
    say which threads are TBB's, so all non-Python threads are waited for: a thread that
    keeps running (OpenBLAS's workers spin for about 100 ms after a GEMM; a busy native
    thread of another library) only costs the timeout. Called only when that case can arise
    (another live thread has made a cpu call), so a single-threaded program forks at once.
    """
    me = threading.get_native_id()
    settled_passes, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        states = _thread_states(me)
        if states is None:
            return
        settled_passes = settled_passes + 1 if set(states.values()) <= _SETTLED_STATES else 0
        if settled_passes == 2:
            return
        time.sleep(0.0005)


def _before_fork() -> None:
    _GATE.before_fork()
    if _layer() == "tbb" and _GATE.other_callers_alive():
        _wait_for_idle_workers(FORK_SETTLE_SECONDS)


def _after_fork_in_parent() -> None:
    _GATE.after_fork_in_parent()


def _after_fork_in_child() -> None:
    """A fresh gate: the parent's may be held by threads that do not exist in the child."""
    global _GATE
    _GATE = _CallGate()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _layer() -> Optional[str]:
    """Numba's threading layer once its pool has started (None before), asked once."""
    if _LAYER[0] is None and _numba_parallel._is_initialized:
        _LAYER[0] = numba.threading_layer()
    return _LAYER[0]


def _must_serialise() -> bool:
    """Whether calls must hold the serial lock: until the layer is known, and on
    ``workqueue``."""
    layer = _layer()
    return layer is None or layer == "workqueue"


def _serialised(fn):
    """Run ``fn`` inside the call gate, holding its serial lock when the threading layer
    needs it (see the module docstring)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        gate = _GATE
        gate.enter()
        try:
            if not _must_serialise():
                with cpu_workspace.lease():
                    return fn(*args, **kwargs)
            with gate.serial, cpu_workspace.lease():
                return fn(*args, **kwargs)
        finally:
            gate.leave()
    return wrapper


_FORWARD = {
    "gemm1x1": cpu_conv.forward_gemm1x1,
    "im2col": cpu_conv.forward_im2col,
    "winograd": cpu_winograd.forward,
    "direct": cpu_depthwise.forward,
}
_INPUT_GRAD = {
    "gemm1x1": cpu_conv.input_grad_gemm1x1,
    "im2col": cpu_conv.input_grad_col2im,
    "winograd": cpu_winograd.input_grad,
    "direct": cpu_depthwise.input_grad,
}
_WEIGHT_GRAD = {
    "gemm1x1": cpu_conv.weight_grad_gemm1x1,
    "im2col": cpu_conv.weight_grad_im2col,
    "winograd": cpu_winograd.weight_grad,
    "direct": cpu_depthwise.weight_grad,
}
ALGORITHMS = tuple(_FORWARD)


@_serialised
def conv2d_forward(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], geom,
                   algo) -> np.ndarray:
    """Conv forward: x ``(N, C, H, W)``, weight ``(K, C/G, R, S)``, bias ``(K,)`` or None;
    returns ``(N, K, P, Q)`` in the input's dtype."""
    return _FORWARD[algo.name](x, weight, bias, geom, algo)


@_serialised
def conv2d_input_grad(weight: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Input gradient ``(N, C, H, W)`` from weight ``(K, C/G, R, S)`` and grad_output
    ``(N, K, P, Q)``."""
    return _INPUT_GRAD[algo.name](weight, grad_output, geom, algo)


@_serialised
def conv2d_weight_grad(x: np.ndarray, grad_output: np.ndarray, geom, algo) -> np.ndarray:
    """Weight gradient ``(K, C/G, R, S)`` from x ``(N, C, H, W)`` and grad_output
    ``(N, K, P, Q)``; reduced over the batch in a fixed order."""
    return _WEIGHT_GRAD[algo.name](x, grad_output, geom, algo)


@_serialised
def conv2d_bias_grad(grad_output: np.ndarray, algo) -> np.ndarray:
    """Bias gradient ``(K,)``: grad_output ``(N, K, P, Q)`` summed over N, P, Q."""
    return cpu_conv.bias_grad_reduce(grad_output, algo)


hinge_loss_rows = _serialised(_hinge_loss_rows)
