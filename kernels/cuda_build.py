"""Compiling the CUDA kernels: source loading, NVRTC options and the per-device kernel cache.

A kernel is one template instantiation of one ``.cu`` file, named by its C++ name expression
(e.g. ``"fc::hinge_rows<float, 32, 32>"``). It is compiled at first use through
``cupy.RawModule`` (NVRTC) for the current device's own architecture (CuPy chooses
``-arch=sm_XY`` from the device), kept per device in `_KERNELS`, and cached on disk by CuPy
(``~/.cupy/kernel_cache``, keyed by the source text and the options).

Local headers (``#include "x.cuh"``) are pasted into the source here, so the text NVRTC and
CuPy's cache key see is complete: editing a header changes the key. The compile test
(``tests/test_nvrtc.py``) builds every instantiation from `load_source` with `NVRTC_OPTIONS`
plus `CUPY_ADDED_OPTIONS`, exactly what reaches NVRTC at run time.

CuPy is imported lazily: importing this module never needs CuPy or a GPU.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent

# Options fastconv passes to NVRTC (through cupy.RawModule). No fast-math: the strict kernels
# must round like the reference's float arithmetic; FMA contraction is NVRTC's default.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)

# What CuPy itself appends for every NVRTC compile besides the architecture flag
# (cupy/cuda/compiler.py, ``_compile_with_cache_cuda``): single-precision denormals flush to
# zero. It affects only results below 1e-38.
CUPY_ADDED_OPTIONS: tuple[str, ...] = ("-ftz=true",)

# A null pointer kernel argument (an absent bias, no gradient wanted): 8 zero bytes.
NULL = np.uint64(0)

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def _expand(name: str, seen: set[str]) -> str:
    """The text of ``name`` with its local includes pasted in, each header at most once."""
    text = (KERNEL_DIR / name).read_text(encoding="utf-8")
    text = _PRAGMA_ONCE.sub("", text)

    def paste(match: re.Match) -> str:
        header = match.group(1)
        if header in seen:
            return f"// {header}: already pasted above"
        seen.add(header)
        return f"// ---- begin {header} ----\n{_expand(header, seen)}\n// ---- end {header} ----"

    return _INCLUDE.sub(paste, text)


@lru_cache(maxsize=None)
def load_source(name: str) -> str:
    """The complete source of kernel file ``name`` (e.g. ``"conv2d.cu"``), headers pasted in.

    Parameters
    ----------
    name : str
        File name inside the ``kernels`` package.

    Returns
    -------
    str
        Self-contained CUDA C++ that NVRTC compiles without include paths.
    """
    return _expand(name, set())


@dataclass(frozen=True)
class Launch:
    """One kernel launch, fully prepared: which instantiation, where, and with what.

    Attributes
    ----------
    source : str
        Kernel file, e.g. ``"conv2d.cu"``.
    kernel : str
        C++ name expression of the instantiation.
    grid, block : tuple of int
        Launch geometry ``(x, y, z)``.
    shared_mem : int
        Dynamic shared memory in bytes.
    args : tuple
        Kernel arguments in order: arrays (passed as device pointers), `NULL`, and NumPy
        scalars whose dtypes match the C++ parameter types (int32 -> int, int64 -> long long,
        float32 -> float, float64 -> double).
    """

    source: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    args: tuple


@dataclass(frozen=True)
class DeviceInfo:
    """What the launchers and dispatch rules need to know about a GPU.

    Attributes
    ----------
    index : int
        CUDA device ordinal.
    sm_count : int
        Number of streaming multiprocessors.
    capability : tuple of int
        Compute capability ``(major, minor)``, e.g. ``(9, 0)``.
    """

    index: int
    sm_count: int
    capability: tuple[int, int]


_KERNELS: dict[tuple[int, str, str], Any] = {}
_DEVICES: dict[int, DeviceInfo] = {}
_LOCK = threading.Lock()


def _cupy():
    import cupy  # noqa: PLC0415 -- lazy on purpose: fastconv imports without CuPy

    return cupy


def current_device() -> DeviceInfo:
    """`DeviceInfo` of CuPy's current device (queried once per device)."""
    cupy = _cupy()
    index = cupy.cuda.runtime.getDevice()
    info = _DEVICES.get(index)
    if info is None:
        attrs = cupy.cuda.Device(index).attributes
        cc = cupy.cuda.Device(index).compute_capability  # e.g. "90"
        info = DeviceInfo(index, int(attrs["MultiProcessorCount"]),
                          (int(cc[:-1]), int(cc[-1])))
        _DEVICES[index] = info
    return info


_NO_CUPY: list[bool] = []  # set once CuPy failed to import (it will not appear later)


def device_info_or_none() -> DeviceInfo | None:
    """`current_device()` where CuPy and a GPU are usable, else ``None`` (rules then assume a
    typical device)."""
    if _NO_CUPY:
        return None
    try:
        return current_device()
    except ImportError:
        _NO_CUPY.append(True)
        return None
    except Exception:  # no driver or no device: the caller falls back to defaults
        return None


def get_kernel(source: str, name: str) -> Any:
    """The compiled kernel ``name`` of ``source`` on the current device.

    Parameters
    ----------
    source : str
        Kernel file, e.g. ``"conv2d.cu"``.
    name : str
        C++ name expression of one instantiation, e.g. ``"fc::conv_simt<float, 0, ...>"``.

    Returns
    -------
    cupy.RawKernel
        Callable as ``kernel(grid, block, args, shared_mem=bytes)`` on CuPy's current stream.
    """
    cupy = _cupy()
    key = (cupy.cuda.runtime.getDevice(), source, name)
    kernel = _KERNELS.get(key)
    if kernel is None:
        with _LOCK:
            kernel = _KERNELS.get(key)
            if kernel is None:
                module = cupy.RawModule(code=load_source(source), options=NVRTC_OPTIONS,
                                        name_expressions=(name,))
                kernel = module.get_function(name)
                _KERNELS[key] = kernel
    return kernel


def launch(spec: Launch) -> None:
    """Run one `Launch` (from the launchers in ``cuda_conv``/``cuda_hinge``) on the GPU, on
    CuPy's current stream."""
    kernel = get_kernel(spec.source, spec.kernel)
    kernel(spec.grid, spec.block, spec.args, shared_mem=spec.shared_mem)
