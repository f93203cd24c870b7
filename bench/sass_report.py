"""Kernel report from the compiled code: registers, shared memory, occupancy, main-loop mix.

    python bench/sass_report.py [--arch sm_80 --arch sm_90] [--source conv2d.cu] [--json PATH]
                                [--check]

No GPU needed. Every instantiation the launchers can request (``all_kernel_names`` of
``cuda_conv``, ``cuda_hinge`` and ``cuda_winograd``) is compiled by NVRTC exactly as at run time
(``cuda_build.NVRTC_OPTIONS`` + what CuPy adds + the architecture) plus ``-Xptxas=-v`` and
``-Xptxas=--warn-on-spills``; the ptxas log gives registers, static shared memory, stack frame
and spills. The cubin is disassembled with ``cuobjdump -sass`` (the ``nvidia-cuda-cuobjdump``
wheel; ``nvdisasm`` from ``nvidia-cuda-nvdisasm`` is the fallback), and the main loop of each
kernel is found in the SASS: of the loops closed by a backward branch, the one holding the most
FFMA/DFMA/HMMA instructions (the shortest of equals). In it the report counts instructions:
the arithmetic share (FFMA or DFMA of all, or instructions per HMMA), LDGSTS (cp.async; GST128
counts its 16-byte form), LDS.128, LDSM (ldmatrix), 128-bit LDG, and barriers.

Theoretical occupancy is computed for A100 (sm_80, 108 SMs, 164 KiB shared memory per SM) and
H100/H200 (sm_90, 132 SMs, 228 KiB), both 64 K registers and 64 warps per SM, from the
registers, the static shared memory and the block size the launcher uses (dynamic shared memory,
used only by ``depthwise_fprop`` and ``depthwise_dgrad`` and sized per geometry, is not
included).

``--check`` exits with status 1 on a spill, local memory, a TF32 kernel without HMMA in its
main loop, a TF32 kernel with a 128-wide tile above issue 11's target of
`TF32_TARGET_PER_HMMA` (4) main-loop instructions per HMMA, a pipelined kernel (see
`PIPELINED`, `PIPELINED_NHWC`) whose main loop has no LDGSTS, an FP32 SIMT conv kernel
with a 128x128 or 128x64 tile whose main loop is less than `FFMA_TARGET` FFMA (`FFMA_GATED`),
or a CALL (the integer-division routine) in a conv or depthwise kernel (`NO_CALLS`); the test
``tests/test_sass_report.py`` runs it so in CI. Where cuda-bindings/NVRTC or cuobjdump are
absent the report says so and exits with status 2 (the test skips, or fails under ``CI``).
Numbers depend on the NVRTC version: the ``test`` extra of pyproject.toml pins it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastconv.kernels import cuda_build, cuda_conv, cuda_hinge, cuda_winograd

ARCHS = ("sm_80", "sm_90")


@dataclass(frozen=True)
class Device:
    """What theoretical occupancy needs to know of one GPU."""

    name: str
    sms: int
    smem_per_sm: int           # bytes a block-resident set may use (max carve-out)
    smem_per_block_reserved: int = 1024
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reg_unit: int = 256        # registers are allocated per warp in units of this


DEVICES = {"sm_80": Device("A100", 108, 164 * 1024), "sm_90": Device("H100/H200", 132, 228 * 1024)}

# Kernels whose main loop must stream through cp.async (LDGSTS in the SASS); regex on the
# C++ name: every implicit-GEMM conv kernel (kernels/conv2d.cu, mainloop), the Winograd
# transform-point GEMMs (kernels/winograd.cu, wino_mainloop) and the three depthwise kernels
# (kernels/depthwise.cu, two-stage rings).
PIPELINED: tuple[str, ...] = (r"^fc::conv_(simt|tf32)<",
                              r"^fc::winograd_(conv|conv_tf32|wgrad)<",
                              r"^fc::depthwise_(fprop|dgrad|wgrad)<")
# The channels-last TF32 conv kernel streams through cp.async too (kernels/conv2d.cu).
PIPELINED_NHWC: tuple[str, ...] = (r"^fc::conv_tf32_nhwc<",)
# TF32 kernels: their main loop must contain HMMA.
TF32 = (r"^fc::conv_tf32<", r"^fc::conv_tf32_nhwc<", r"^fc::winograd_conv_tf32<")
# TF32 kernels with a 128-wide tile (128x128, 128x64), whatever their name: conv_tf32<MODE,
# 128, ...> (none instantiated since conv_tf32_nhwc took over the 128-wide tiles of all three
# ops) and conv_tf32_nhwc<128, ...>. At most TF32_TARGET_PER_HMMA main-loop instructions per
# HMMA (issue 11's static target), on sm_80 and sm_90.
TF32_WIDE = r"^fc::(?:conv_tf32<\d, |conv_tf32_nhwc<)128, "
TF32_TARGET_PER_HMMA = 4.0
# Kernels that must not call a subroutine (the 64-bit integer division routine, a CALL in the
# SASS): their divisions are FastDiv multiply-shifts.
NO_CALLS = (r"^fc::conv_", r"^fc::depthwise_", r"^fc::winograd_", r"^fc::nhwc_")
# FP32 SIMT conv kernels with a 128x128 or 128x64 tile (every mode): at least FFMA_TARGET of
# their main loop's instructions are FFMA (issue 11's static target).
FFMA_GATED = (r"^fc::conv_simt<float, \d, 128, (128|64), ",)
FFMA_TARGET = 0.75


@dataclass
class Kernel:
    """One instantiation on one architecture."""

    source: str
    name: str
    arch: str
    threads: int
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    calls: int = 0                              # CALL instructions in the whole kernel
    loop: dict = field(default_factory=dict)   # instruction counts of the main loop
    problems: list = field(default_factory=list)

    def mix(self) -> str:
        """The main loop's arithmetic share, or instructions per HMMA."""
        c = self.loop
        total = c.get("total", 0)
        if not total:
            return "no loop"
        if c.get("HMMA"):
            return f"{total / c['HMMA']:.1f}/HMMA"
        fma = c.get("FFMA", 0) + c.get("DFMA", 0)
        return f"{100 * fma / total:.0f}% {'DFMA' if c.get('DFMA') else 'FFMA'}"


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """``cuobjdump``/``nvdisasm``: from the NVIDIA wheels of this environment, else PATH."""
    # This environment's own packages first, then the ones it sees through
    # --system-site-packages (a virtual environment over a system install).
    roots = [sysconfig.get_paths()["purelib"]] + [p for p in sys.path if p.endswith("-packages")]
    for root in dict.fromkeys(roots):
        for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm"):
            cand = Path(root) / "nvidia" / sub / "bin" / name
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which(name)


def nvrtc_module():
    """``cuda.bindings.nvrtc``, or ``None`` when cuda-bindings is not installed."""
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415
    except ImportError:
        return None
    return nvrtc


def nvrtc_version(nvrtc) -> str:
    status, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def _ok(nvrtc, result):
    status, *values = result
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {status}")
    return values[0] if len(values) == 1 else values


def compile_cubin(nvrtc, source: str, names: list[str], arch: str) -> tuple[bytes, str, dict]:
    """(cubin, ptxas log, {C++ name: mangled name}) of `source` with every name in `names`."""
    prog = _ok(nvrtc, nvrtc.nvrtcCreateProgram(cuda_build.load_source(source).encode(),
                                               source.encode(), 0, [], []))
    try:
        for name in names:
            _ok(nvrtc, nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        options = cuda_build.NVRTC_OPTIONS + cuda_build.CUPY_ADDED_OPTIONS + (
            f"--gpu-architecture={arch}", "-Xptxas=-v", "-Xptxas=--warn-on-spills")
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        size = _ok(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        _ok(nvrtc, nvrtc.nvrtcGetProgramLog(prog, buf))
        log = buf.decode(errors="replace").rstrip("\x00 \n")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{source} for {arch} does not compile:\n{log}")
        lowered = {n: _ok(nvrtc, nvrtc.nvrtcGetLoweredName(prog, n.encode())).decode()
                   for n in names}
        size = _ok(nvrtc, nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        _ok(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, log, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> tuple[dict[str, dict], list[str]]:
    """Per mangled function: registers, smem, stack, spills; and the log's warning lines."""
    out: dict[str, dict] = {}
    current = None
    warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": 0, "smem": 0, "stack": 0,
                                                  "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(
                int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return out, warnings


_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """``cuobjdump -sass`` / ``nvdisasm`` text -> {mangled name: [(address, opcode, operands)]}."""
    funcs: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        if line.lstrip().startswith(".text."):
            current = funcs.setdefault(line.strip()[len(".text."):].rstrip(":"), [])
            continue
        if current is None:
            continue
        m = _INSN.search(line)
        if m:
            current.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


MATH = ("FFMA", "DFMA", "HMMA")


def classify(op: str, operands: str) -> list[str]:
    """Counter keys an instruction adds to."""
    base = op.split(".")[0]
    keys = ["total"]
    if base in ("FFMA", "DFMA", "HMMA", "LDGSTS", "LDSM", "BAR", "STS", "LDS", "LDG"):
        keys.append(base)
    if base in ("LDS", "LDG", "STS", "LDGSTS") and ".128" in op:
        keys.append(base + ".128")
    if base == "LDGDEPBAR" or base == "DEPBAR":
        keys.append(base)
    return keys


def main_loop(insns: list[tuple[int, str, str]]) -> dict[str, int]:
    """Instruction counts of the loop (backward branch) with the most FFMA/DFMA/HMMA."""
    best = None
    addr_index = {a: i for i, (a, _, _) in enumerate(insns)}
    for i, (addr, op, operands) in enumerate(insns):
        if op.split(".")[0] != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in addr_index:
            continue
        body = insns[addr_index[target]:i + 1]
        math = sum(1 for _, o, _ in body if o.split(".")[0] in MATH)
        key = (math, -len(body))
        if best is None or key > best[0]:
            best = (key, body)
    counts: dict[str, int] = {}
    if best is None:
        return counts
    for _, op, operands in best[1]:
        if op == "NOP":
            continue
        for k in classify(op, operands):
            counts[k] = counts.get(k, 0) + 1
    return counts


def subroutine_calls(insns: list[tuple[int, str, str]]) -> int:
    """CALL instructions into a subroutine (such as the integer-division routine): ptxas
    places subroutines after the kernel's last EXIT. A CALL.REL.NOINC to a nearby address
    inside the kernel body is a control-flow idiom ptxas uses for loop exits on sm_80, not a
    call, and is not counted."""
    exits = [addr for addr, op, _ in insns if op.split(".")[0] == "EXIT"]
    last_exit = max(exits) if exits else -1
    count = 0
    for _, op, operands in insns:
        if not op.startswith("CALL"):
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if m is None or int(m.group(1), 16) > last_exit:
            count += 1
    return count


def occupancy(dev: Device, threads: int, registers: int, smem: int) -> tuple[int, float]:
    """(resident blocks per SM, warps resident / max warps) in the CUDA occupancy model."""
    warps = -(-threads // 32)
    by_warps = dev.max_warps // warps
    regs_per_warp = -(-max(registers, 1) * 32 // dev.reg_unit) * dev.reg_unit
    by_regs = (dev.regs_per_sm // regs_per_warp) // warps
    by_smem = dev.smem_per_sm // (smem + dev.smem_per_block_reserved)
    blocks = max(0, min(dev.max_blocks, by_warps, by_regs, by_smem))
    return blocks, blocks * warps / dev.max_warps


# ---------------------------------------------------------------------------------------------
# The list of instantiations and their block sizes (what the launchers request)
# ---------------------------------------------------------------------------------------------
def instantiations() -> list[tuple[str, str, int]]:
    """(source, C++ name, threads per block) of every instantiation the launchers request."""
    threads: dict[str, int] = {}
    for dt, tiles in cuda_conv.SIMT_TILES.items():
        for mode in (cuda_conv.FPROP, cuda_conv.DGRAD, cuda_conv.WGRAD):
            for tile in cuda_conv.simt_tiles(dt, mode):
                threads[cuda_conv.simt_kernel_name(dt, mode, tile)] = tile.threads
    for dt, mode, tile in cuda_conv.vector_a_kernels():
        threads[cuda_conv.simt_kernel_name(dt, mode, tile, True)] = tile.threads
    for tile in cuda_conv.TF32_TILES:
        for mode in (cuda_conv.FPROP, cuda_conv.DGRAD, cuda_conv.WGRAD):
            threads[cuda_conv.tf32_kernel_name(mode, tile)] = tile.threads
    for tile in cuda_conv.TF32_NHWC_TILES:
        threads[cuda_conv.tf32_kernel_name(cuda_conv.FPROP, tile)] = tile.threads
    bx, by, bz = cuda_conv.NHWC_COPY_BLOCK
    threads[cuda_conv.NHWC_COPY_KERNEL] = bx * by * bz
    for dt, tile in cuda_conv.DEPTHWISE_TILES.items():
        names = cuda_conv.depthwise_kernel_names(dt)
        threads[names["forward"]] = tile.block[0] * tile.block[1] * tile.block[2]
        threads[names["input_grad"]] = tile.block[0] * tile.block[1] * tile.block[2]
        threads[names["weight_grad"]] = cuda_conv.DEPTHWISE_THREADS
    for name in cuda_hinge.all_kernel_names()["hinge.cu"]:
        threads[name] = cuda_hinge.THREADS
    for tile in cuda_winograd.TILES.values():
        threads[cuda_winograd.conv_kernel_name(tile)] = tile.threads
    for tile in cuda_winograd.WGRAD_TILES.values():
        threads[cuda_winograd.wgrad_kernel_name(tile)] = tile.threads
    for tile in cuda_winograd.TF32_TILES.values():
        threads[cuda_winograd.conv_kernel_name(tile)] = tile.threads
    for m in cuda_winograd.TILES:
        for mode in (cuda_conv.FPROP, cuda_conv.DGRAD):
            for tf32 in (False, True) if m in cuda_winograd.TF32_TILES else (False,):
                threads[cuda_winograd.filter_kernel_name(m, mode, tf32)] = (
                    cuda_winograd.FILTER_THREADS)
    out = []
    for source, names in {**cuda_conv.all_kernel_names(), **cuda_hinge.all_kernel_names(),
                          **cuda_winograd.all_kernel_names()}.items():
        for name in names:
            out.append((source, name, threads[name]))
    return out


def report(archs=ARCHS, sources: tuple[str, ...] | None = None) -> tuple[list[Kernel], list[str]]:
    """Compile, disassemble and analyse; returns the kernels and global problems."""
    nvrtc = nvrtc_module()
    if nvrtc is None:
        raise ToolMissing("cuda-bindings (NVRTC) is not installed: pip install -e .[test]")
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None and nvdisasm is None:
        raise ToolMissing("neither cuobjdump nor nvdisasm found: install the "
                          "nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels (test extra)")
    by_source: dict[str, list[tuple[str, int]]] = {}
    for source, name, threads in instantiations():
        if sources is None or source in sources:
            by_source.setdefault(source, []).append((name, threads))
    kernels, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for source, entries in by_source.items():
            for arch in archs:
                cubin, log, lowered = compile_cubin(nvrtc, source, [n for n, _ in entries], arch)
                path = Path(tmp) / f"{source}.{arch}.cubin"
                path.write_bytes(cubin)
                if cuobjdump is not None:
                    cmd = [cuobjdump, "-sass", str(path)]
                else:
                    cmd = [nvdisasm, "-c", str(path)]
                sass = parse_sass(subprocess.run(cmd, check=True, capture_output=True,
                                                 text=True).stdout)
                info, warnings = parse_ptxas(log)
                problems += [f"{source} {arch}: {w}" for w in warnings]
                for name, threads in entries:
                    mangled = lowered[name]
                    k = Kernel(source, name, arch, threads, **info.get(mangled, {}))
                    if mangled not in info:
                        k.problems.append("no ptxas information")
                    k.blocks_per_sm, k.occupancy = occupancy(DEVICES[arch], threads,
                                                             k.registers, k.smem)
                    k.loop = main_loop(sass.get(mangled, []))
                    k.calls = subroutine_calls(sass.get(mangled, []))
                    k.problems += check(k)
                    kernels.append(k)
    return kernels, problems


class ToolMissing(RuntimeError):
    """NVRTC or the disassembler is not installed."""


def check(k: Kernel) -> list[str]:
    """The CI gates for one kernel."""
    out = []
    if k.spill_stores or k.spill_loads:
        out.append(f"spills {k.spill_stores} B stores / {k.spill_loads} B loads")
    if k.stack:
        out.append(f"local memory: {k.stack} B stack frame")
    if k.blocks_per_sm < 1:
        out.append("does not fit on one SM")
    if any(re.search(p, k.name) for p in TF32) and not k.loop.get("HMMA"):
        out.append("TF32 kernel without HMMA in its main loop")
    if re.search(TF32_WIDE, k.name) and k.loop.get("HMMA"):
        per = k.loop.get("total", 0) / k.loop["HMMA"]
        if per > TF32_TARGET_PER_HMMA:
            out.append(f"{per:.2f} instructions per HMMA in the main loop (target "
                       f"{TF32_TARGET_PER_HMMA:g})")
    if (any(re.search(p, k.name) for p in PIPELINED + PIPELINED_NHWC)
            and not k.loop.get("LDGSTS")):
        out.append("pipelined kernel without LDGSTS in its main loop")
    if any(re.search(p, k.name) for p in FFMA_GATED):
        share = k.loop.get("FFMA", 0) / max(k.loop.get("total", 0), 1)
        if share < FFMA_TARGET:
            out.append(f"main loop {100 * share:.1f}% FFMA, under {100 * FFMA_TARGET:.0f}%")
    if any(re.search(p, k.name) for p in NO_CALLS) and k.calls:
        out.append(f"{k.calls} CALL (integer division routine?)")
    return out


def table(kernels: list[Kernel]) -> str:
    """A fixed-width table, one line per kernel and architecture."""
    head = (f"{'kernel':<52} {'arch':<5} {'thr':>4} {'reg':>4} {'smem':>6} {'blk':>3} "
            f"{'occ':>4} {'loop':>5} {'mix':>10} {'LDGSTS':>6} {'GST128':>6} {'LDS128':>6} "
            f"{'LDSM':>4} "
            f"{'LDG128':>6} {'LDG':>4} {'CALL':>4}  problems")
    lines = [head, "-" * len(head)]
    for k in kernels:
        c = k.loop
        lines.append(
            f"{k.name[4:]:<52} {k.arch:<5} {k.threads:>4} {k.registers:>4} {k.smem:>6} "
            f"{k.blocks_per_sm:>3} {100 * k.occupancy:>3.0f}% {c.get('total', 0):>5} "
            f"{k.mix():>10} {c.get('LDGSTS', 0):>6} {c.get('LDGSTS.128', 0):>6} "
            f"{c.get('LDS.128', 0):>6} "
            f"{c.get('LDSM', 0):>4} {c.get('LDG.128', 0):>6} {c.get('LDG', 0):>4} {k.calls:>4}  "
            f"{'; '.join(k.problems)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=ARCHS)
    parser.add_argument("--source", action="append")
    parser.add_argument("--json", type=Path, help="write the kernels as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed gate")
    args = parser.parse_args(argv)
    try:
        kernels, problems = report(tuple(args.arch or ARCHS),
                                   tuple(args.source) if args.source else None)
    except ToolMissing as exc:
        print(f"sass_report: {exc}; no report", file=sys.stderr)
        return 2
    nvrtc = nvrtc_module()
    print(f"NVRTC {nvrtc_version(nvrtc)}; disassembler "
          f"{find_tool('cuobjdump') or find_tool('nvdisasm')}; occupancy: "
          + ", ".join(f"{a} = {d.name} ({d.sms} SMs)" for a, d in DEVICES.items()))
    print(table(kernels))
    wide = [k for k in kernels if re.search(TF32_WIDE, k.name) and k.loop.get("HMMA")]
    if wide:
        above = [k for k in wide if k.loop["total"] / k.loop["HMMA"] > TF32_TARGET_PER_HMMA]
        worst = max(k.loop["total"] / k.loop["HMMA"] for k in wide)
        print(f"TF32 128-wide tiles: {len(above)} of {len(wide)} main loops above issue 11's "
              f"target of {TF32_TARGET_PER_HMMA:g} instructions per HMMA (gated; worst "
              f"{worst:.2f})")
    print(f"{cuda_conv.NHWC_COPY_KERNEL[4:]}: the channels-last TF32 pre-pass of "
          "conv_tf32_nhwc, a memory-bound copy without a main loop")
    for p in problems:
        print("ptxas:", p)
    if args.json:
        args.json.write_text(json.dumps({"nvrtc": nvrtc_version(nvrtc), "problems": problems,
                                         "tf32_wide": TF32_WIDE,
                                         "tf32_target_per_hmma": TF32_TARGET_PER_HMMA,
                                         "kernels": [asdict(k) for k in kernels]}, indent=1))
    failed = [k for k in kernels if k.problems]
    if args.check and (failed or problems):
        print(f"sass_report: {len(failed)} kernels fail the gates, {len(problems)} ptxas "
              "warnings", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
