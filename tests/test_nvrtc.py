"""Every CUDA kernel compiles with NVRTC for sm_80 and sm_90, without a GPU.

Each ``.cu`` file is compiled once per architecture with every template instantiation the
launchers can request (``all_kernel_names`` of ``cuda_conv``, ``cuda_hinge`` and
``cuda_winograd``), from the same pasted source (``cuda_build.load_source``) and with the same
options that reach NVRTC at run time: ``cuda_build.NVRTC_OPTIONS``, what CuPy appends
(``CUPY_ADDED_OPTIONS``) and the architecture. Compiling to ``sm_XY`` produces machine code,
so the PTX assembler runs too.
Needs ``cuda-bindings`` and the ``nvidia-cuda-nvrtc`` wheel (no driver); skipped without them.

ptxas is asked to warn on register spills and on any local-memory use (`GATE_OPTIONS`), and the
compile log must hold no warning: every instantiation is spill-free with no stack frame, for
both architectures. ``bench/sass_report.py`` (run by ``tests/test_sass_report.py``) reports the
numbers behind this gate.
"""
from __future__ import annotations

import os
import re

import pytest

from fastconv.kernels import cuda_build, cuda_conv, cuda_hinge, cuda_winograd

if os.environ.get("CI"):
    # CI installs NVRTC (the test extra): there a missing compiler fails instead of skipping.
    from cuda.bindings import nvrtc
else:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc",
                                reason="cuda-bindings (NVRTC) not installed")

ARCHS = ("sm_80", "sm_90")
# Spills and local memory become log warnings, which the test rejects.
GATE_OPTIONS = ("-Xptxas=--warn-on-spills", "-Xptxas=--warn-on-local-memory-usage")
NAMES = {**cuda_conv.all_kernel_names(), **cuda_hinge.all_kernel_names(),
         **cuda_winograd.all_kernel_names()}


def _ok(result):
    """Unpack a cuda-bindings ``(status, *values)`` tuple, failing on a non-success status."""
    status, *values = result
    assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"NVRTC call failed: {status}"
    return values[0] if len(values) == 1 else values


def _log(prog) -> str:
    size = _ok(nvrtc.nvrtcGetProgramLogSize(prog))
    buf = b" " * size
    _ok(nvrtc.nvrtcGetProgramLog(prog, buf))
    return buf.decode(errors="replace").rstrip("\x00 \n")


def test_every_kernel_source_is_covered():
    """Each .cu file of the package has instantiations in the compile list."""
    sources = {p.name for p in cuda_build.KERNEL_DIR.glob("*.cu")}
    assert sources == set(NAMES), f"kernel files {sources} vs compiled {set(NAMES)}"
    assert all(NAMES[s] for s in NAMES)


def test_sources_are_self_contained():
    """Local headers are pasted in, so NVRTC needs no include path and CuPy's cache key
    covers the headers."""
    for source in NAMES:
        text = cuda_build.load_source(source)
        assert not re.search(r'^\s*#\s*include\s+"', text, re.MULTILINE)
        assert "namespace fc" in text


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(NAMES))
def test_compiles(source: str, arch: str):
    names = NAMES[source]
    prog = _ok(nvrtc.nvrtcCreateProgram(cuda_build.load_source(source).encode(),
                                        source.encode(), 0, [], []))
    try:
        for name in names:
            _ok(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        options = cuda_build.NVRTC_OPTIONS + cuda_build.CUPY_ADDED_OPTIONS + (
            f"--gpu-architecture={arch}",) + GATE_OPTIONS
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        log = _log(prog)
        assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{source} for {arch}:\n{log}"
        assert "warning" not in log.lower(), f"{source} for {arch} warns:\n{log}"
        for name in names:  # what cupy.RawModule.get_function looks up
            lowered = _ok(nvrtc.nvrtcGetLoweredName(prog, name.encode()))
            assert lowered, name
        cubin_size = _ok(nvrtc.nvrtcGetCUBINSize(prog))
        assert cubin_size > 0
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
