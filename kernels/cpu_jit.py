"""First-use notice of the cpu backend: one line on stderr when a process starts compiling.

Numba compiles the cpu kernels on their first call for each dtype and caches the machine code
(``NUMBA_CACHE_DIR``, else ``__pycache__`` next to the kernels); a cold start then pauses for
several seconds. So that the pause is not taken for a hang, the first compilation of a fastconv
kernel in a process writes one line to stderr. It listens to Numba's ``numba:compile`` event,
which fires on a cache miss only (a cache load is silent); the listener only observes, it
changes nothing in Numba, and it ignores compilations of other packages' functions.
"""
from __future__ import annotations

import sys
import threading

from numba.core import event

_PACKAGE = __name__.rpartition(".")[0]          # "fastconv.kernels"
_LOCK = threading.Lock()
_state = {"announced": False}

MESSAGE = ("fastconv: compiling the cpu kernels for this machine (first use; seconds to a "
           "minute per kernel family and dtype, then cached; `python -m fastconv.warmup` "
           "compiles them all ahead)")


class _FirstCompile(event.Listener):
    """Writes :data:`MESSAGE` once per process, at the start of the first fastconv compile."""

    def on_start(self, ev: event.Event) -> None:
        dispatcher = (ev.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if not module.startswith(_PACKAGE):
            return
        with _LOCK:
            if _state["announced"]:
                return
            _state["announced"] = True
        print(MESSAGE, file=sys.stderr, flush=True)

    def on_end(self, ev: event.Event) -> None:
        pass


_LISTENER = _FirstCompile()
event.register("numba:compile", _LISTENER)
