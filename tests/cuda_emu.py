"""Build and drive the host emulation of the CUDA kernels (see cuda_emu.h).

`build()` compiles ``kernels/*.cu`` together with a generated table of every instantiation the
launchers can request into a shared library (cached by content hash); `run(launch)` executes a
``fastconv.kernels.cuda_build.Launch`` with NumPy arrays, after checking every argument against
the C++ parameter type of the kernel (pointer element types included). `executor()` gives the
generic functions of ``fastconv.kernels.cuda`` the same runner, so the backend's composition of
launches is exercised as on the GPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from fastconv.kernels import cuda_build, cuda_conv, cuda_hinge
from fastconv.kernels.cuda import Executor

HERE = Path(__file__).resolve().parent
SOURCES = ("conv2d.cu", "depthwise.cu", "hinge.cu")
# Test-only kernels of the emulation's own primitives (tests/emu_selftest.cu).
SELFTEST = ("fc_test::cp_async_groups", "fc_test::ldmatrix_a_fragment")
CXX_FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w")

# NumPy dtype -> C++ parameter code (see emu::Code).
_SCALAR_CODES = {np.dtype(np.int32): "i", np.dtype(np.uint32): "I", np.dtype(np.int64): "l",
                 np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
_POINTER_CODES = {np.dtype(np.float32): "F", np.dtype(np.float64): "D",
                  np.dtype(np.int64): "L"}


def compiler() -> str | None:
    """A C++17 compiler on PATH, or ``None``."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@lru_cache(maxsize=None)
def compiler_problem() -> str | None:
    """Why the host emulation cannot be built here (no compiler, no C++20 std::atomic::wait),
    or ``None`` when it can."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler on PATH"
    probe = ("#include <atomic>\n#include <thread>\nint main() { std::atomic<unsigned> a{0}; "
             "std::thread t([&] { a.store(1); a.notify_all(); }); a.wait(0); t.join(); }\n")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(probe)
        proc = subprocess.run([cxx, "-std=c++20", "-pthread", str(src), "-o",
                               str(Path(tmp) / "probe")], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"{cxx} cannot build C++20 std::atomic::wait: {proc.stderr[-300:]}"
    return None


def all_names() -> dict[str, list[str]]:
    return {**cuda_conv.all_kernel_names(), **cuda_hinge.all_kernel_names()}


def _harness() -> str:
    names = [n for src in SOURCES for n in all_names()[src]] + list(SELFTEST)
    lines = ['#include "cuda_emu.h"']
    lines += [f'#include "{cuda_build.KERNEL_DIR / src}"' for src in SOURCES]
    lines += [f'#include "{HERE / "emu_selftest.cu"}"']
    lines += ["#include <map>", "", "static const std::map<std::string, emu::Entry>& table() {",
              "    static const std::map<std::string, emu::Entry> t = {"]
    lines += [f'        {{"{n}", emu::entry(&{n})}},' for n in names]
    lines += ["    };", "    return t;", "}", "",
              'extern "C" const char* fc_emu_signature(const char* name) {',
              "    auto it = table().find(name);",
              '    return it == table().end() ? nullptr : it->second.signature.c_str();', "}", "",
              'extern "C" int fc_emu_launch(const char* name, unsigned gx, unsigned gy, '
              "unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned long smem, "
              "void** args) {",
              "    auto it = table().find(name);",
              "    if (it == table().end()) return 2;",
              "    return emu::run_grid(it->second, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, "
              "args);", "}", "",
              'extern "C" const char* fc_emu_error() { return emu::g_error.c_str(); }']
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=None)
def build() -> ctypes.CDLL:
    """Compile (or reuse) the emulation library; raises ``RuntimeError`` on a compile error."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found")
    harness = _harness()
    digest = hashlib.sha256()
    for part in [harness, (HERE / "cuda_emu.h").read_text(),
                 (HERE / "emu_selftest.cu").read_text(), " ".join(CXX_FLAGS), cxx]:
        digest.update(part.encode())
    for path in sorted(cuda_build.KERNEL_DIR.glob("*.cu*")):
        digest.update(path.read_bytes())
    cache = Path(tempfile.gettempdir()) / "fastconv_cuda_emu"
    cache.mkdir(exist_ok=True)
    lib = cache / f"emu_{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        src = cache / f"emu_{digest.hexdigest()[:16]}.cpp"
        src.write_text(harness)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *CXX_FLAGS, f"-I{HERE}", f"-I{cuda_build.KERNEL_DIR}", str(src), "-o",
               str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation build failed:\n{proc.stderr[-6000:]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.fc_emu_signature.restype = ctypes.c_char_p
    dll.fc_emu_error.restype = ctypes.c_char_p
    dll.fc_emu_launch.restype = ctypes.c_int
    dll.fc_emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
        ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p)]
    return dll


def signature(name: str) -> str:
    """The kernel's parameter codes, e.g. ``"FFFFiiii"``."""
    sig = build().fc_emu_signature(name.encode())
    if sig is None:
        raise KeyError(f"no emulated kernel {name!r}")
    return sig.decode()


def _arg_buffer(arg, code: str, index: int, name: str):
    """A ctypes buffer holding the bytes CUDA would receive for one argument."""
    if isinstance(arg, np.ndarray):
        want = _POINTER_CODES.get(arg.dtype)
        if code != want:
            raise TypeError(f"{name}: argument {index} is a {arg.dtype} array, the kernel "
                            f"takes {code!r}")
        if not arg.flags.c_contiguous:
            raise TypeError(f"{name}: argument {index} is not C-contiguous")
        return ctypes.c_void_p(arg.ctypes.data)
    if arg is cuda_build.NULL or (isinstance(arg, np.uint64) and int(arg) == 0):
        if code not in "FDL":
            raise TypeError(f"{name}: argument {index} is a null pointer, the kernel takes "
                            f"{code!r}")
        return ctypes.c_void_p(0)
    if isinstance(arg, np.generic):
        if _SCALAR_CODES.get(arg.dtype) != code:
            raise TypeError(f"{name}: argument {index} is {arg.dtype}, the kernel takes "
                            f"{code!r}")
        return ctypes.create_string_buffer(arg.tobytes(), len(arg.tobytes()))
    raise TypeError(f"{name}: argument {index} has unsupported type {type(arg).__name__}")


def run(launch: cuda_build.Launch) -> None:
    """Execute one launch on the CPU; raises on argument mismatch, bad geometry or deadlock."""
    dll = build()
    sig = signature(launch.kernel)
    if len(sig) != len(launch.args):
        raise TypeError(f"{launch.kernel}: {len(launch.args)} arguments for {len(sig)} "
                        "parameters")
    if min(launch.grid) < 1 or min(launch.block) < 1:
        raise ValueError(f"{launch.kernel}: empty grid {launch.grid} or block {launch.block}")
    if launch.grid[1] > 65535 or launch.grid[2] > 65535 or np.prod(launch.block) > 1024:
        raise ValueError(f"{launch.kernel}: grid {launch.grid} / block {launch.block} "
                         "exceed CUDA's limits")
    buffers = [_arg_buffer(a, c, i, launch.kernel) for i, (a, c) in
               enumerate(zip(launch.args, sig))]
    ptrs = (ctypes.c_void_p * len(buffers))(
        *[ctypes.cast(ctypes.pointer(b), ctypes.c_void_p) for b in buffers])
    rc = dll.fc_emu_launch(launch.kernel.encode(), *launch.grid, *launch.block,
                           launch.shared_mem, ptrs)
    if rc != 0:
        raise RuntimeError(f"{launch.kernel}: emulated launch failed: "
                           f"{dll.fc_emu_error().decode()}")


def poison(dtype) -> float | int:
    """What outputs start as, so that unwritten elements cannot pass a comparison: NaN for
    floats, the most negative value for integers (label_range's per-block extremes)."""
    dtype = np.dtype(dtype)
    return np.nan if dtype.kind == "f" else int(np.iinfo(dtype).min)


def _nan_empty(shape, dtype):
    return np.full(shape, poison(dtype), dtype=dtype)


def executor(sm_count: int = 2) -> Executor:
    """NumPy arrays, emulated kernels; a small SM count makes grid-stride loops wrap."""
    return Executor(np, run, _nan_empty, sm_count)
