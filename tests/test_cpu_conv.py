"""Kernel-level tests of the cpu conv backend: every algorithm, forced on every shape of the
shared case list it supports, against the float64 reference; chunking under tiny workspace
bounds; run-to-run determinism; the dispatch rules (threads: tests/test_cpu_threads.py)."""
from __future__ import annotations

import numpy as np
import pytest

import fastconv
from fastconv import reference
from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.dispatch import cpu as rules
from fastconv.kernels import cpu, cpu_conv, cpu_workspace, cpu_winograd

from conftest import CASE_IDS, CASES, ConvCase, assert_close
from cpu_variants import VARIANTS, supports

EXTRA_CASES = [
    ConvCase("wino_groups2", 2, 16, 9, 11, 16, 3, 3, padding=((0, 2), (1, 2)), groups=2),
    ConvCase("wino_big_pad", 1, 8, 6, 7, 8, 3, 3, padding=((3, 1), (2, 4))),
    ConvCase("1x1_groups4", 2, 8, 5, 6, 12, 1, 1, groups=4),
    # strided 1x1: the GEMMs on the pixels the stride reads (odd sizes, unequal strides)
    ConvCase("1x1_strided", 2, 6, 9, 11, 8, 1, 1, stride=(2, 3), groups=2),
    # stride 2 along the rows (the vectorised grid copies), odd and even widths
    ConvCase("1x1_stride2_odd", 2, 4, 7, 21, 6, 1, 1, stride=2),
    ConvCase("1x1_stride2_even", 1, 3, 8, 18, 5, 1, 1, stride=(3, 2)),
    ConvCase("wide_strided", 3, 5, 12, 10, 7, 3, 2, stride=(3, 2), padding=((2, 0), (1, 1)),
             dilation=(2, 1)),
    # Winograd rows of >= 8 tiles carry a padding tile; >= 64 tiles per image are read in place
    ConvCase("wino_wide_rows", 2, 8, 10, 37, 6, 3, 3, padding=1),
    ConvCase("wino_many_tiles", 1, 5, 34, 35, 7, 3, 3, padding=((0, 2), (1, 1))),
    # im2col's flat row copies (stride 1, as many output as input columns): rows wholly in
    # the padding, a one-sided column pad, and a dilated kernel
    ConvCase("flat_rows", 2, 4, 6, 9, 5, 3, 3, padding=((4, 0), (2, 0))),
    ConvCase("flat_rows_dilated", 2, 3, 7, 8, 4, 3, 3, padding=((2, 2), (0, 4)),
             dilation=(1, 2)),
    # stride 2 through the phase planes: odd sizes, one-sided pads, a 5x5 kernel, groups
    ConvCase("phases_odd", 2, 3, 9, 11, 4, 3, 3, stride=2, padding=1),
    ConvCase("phases_one_sided", 1, 3, 8, 8, 4, 3, 3, stride=2, padding=((1, 0), (0, 2))),
    ConvCase("phases_5x5_groups", 1, 4, 12, 12, 6, 5, 5, stride=2, padding=2, groups=2),
    # the direct stride-2 kernel's phase planes: depthwise with odd widths and one-sided pads,
    # and a grouped 4x2 kernel
    ConvCase("direct_s2_depthwise", 2, 6, 11, 9, 6, 3, 3, stride=2, padding=((0, 1), (1, 0)),
             groups=6),
    ConvCase("direct_s2_4x2", 2, 8, 10, 13, 8, 4, 2, stride=2, padding=1, groups=4),
    # rows of 8 or more column pairs: split and merged 16 elements at a time, the last block
    # overlapping the one before (odd width, unequal pads)
    ConvCase("direct_s2_wide", 2, 4, 7, 37, 4, 3, 3, stride=2, padding=((1, 0), (1, 2)),
             groups=4),
    # the stride-1 direct kernels' filter pairs (two outputs a pass over a shared plane): odd
    # counts leave one alone; a 5x5 grouped kernel takes the generic taps of the pair
    ConvCase("direct_pairs_odd", 2, 3, 9, 10, 7, 3, 3, padding=1),
    ConvCase("direct_pairs_5x5", 2, 6, 9, 9, 9, 5, 5, padding=2, groups=3),
    # the generic taps in runs along a kernel row: a 7-wide row in one run (depthwise);
    # 6 = 4 + 2 with a dilated, one-sided padded kernel and filter pairs; 9 = 4 + 4 + 1; 3
    ConvCase("direct_tap_runs_7", 2, 4, 10, 12, 4, 3, 7, padding=(1, 3), groups=4),
    ConvCase("direct_tap_runs_6", 2, 6, 9, 14, 9, 2, 6, padding=((1, 0), (2, 3)),
             dilation=(2, 1), groups=3),
    ConvCase("direct_tap_runs_9", 1, 4, 5, 13, 6, 2, 9, padding=(0, 4), groups=2),
    ConvCase("direct_tap_runs_3", 2, 3, 9, 7, 3, 4, 3, padding=(2, 1), groups=3),
    # im2col's kernel rows (stride 1, one group): 5x5 and 7x7 with one-sided and uneven pads,
    # a dilated kernel whose rows are two padded rows apart, a plane narrower than the kernel
    # is wide with its pad, and "valid" (no padded row at all)
    ConvCase("kernel_rows_5x5", 3, 4, 9, 11, 6, 5, 5, padding=((2, 0), (4, 1))),
    ConvCase("kernel_rows_7x7", 2, 5, 8, 8, 3, 7, 7, padding=3),
    ConvCase("kernel_rows_dilated", 2, 3, 12, 10, 4, 5, 3, padding=((4, 8), (1, 0)),
             dilation=(2, 1)),
    ConvCase("kernel_rows_narrow", 2, 3, 6, 3, 4, 5, 5, padding=2),
    ConvCase("kernel_rows_valid", 2, 3, 9, 8, 5, 5, 5, padding="valid"),
]
ALL_CASES = CASES + EXTRA_CASES
ALL_IDS = CASE_IDS + [c.name for c in EXTRA_CASES]


def _case_geometry(case: ConvCase):
    return conv_geometry(case.x_shape, case.w_shape, case.stride, case.padding, case.dilation,
                         case.groups)


def _problem(case: ConvCase, dtype, seed: int = 0):
    x, w, b = case.arrays(dtype, seed)
    geom = _case_geometry(case)
    gy = np.random.default_rng(seed + 1).standard_normal(geom.output_shape).astype(dtype)
    return x, w, b, gy, geom


def _algo(variant: str, **extra) -> Algo:
    name, params = VARIANTS[variant]
    return Algo(name, params + tuple(extra.items()), "forced by the test")


FORCED = [pytest.param(variant, case, id=f"{variant}-{case.name}")
          for variant, (name, params) in VARIANTS.items() for case in ALL_CASES
          if supports(name, _case_geometry(case), params)]


@pytest.mark.parametrize("variant,case", FORCED)
def test_forced_algorithm_matches_reference(variant, case, dtype):
    x, w, b, gy, geom = _problem(case, dtype)
    algo = _algo(variant)
    y = cpu.conv2d_forward(x, w, b, geom, algo)
    gx = cpu.conv2d_input_grad(w, gy, geom, algo)
    gw = cpu.conv2d_weight_grad(x, gy, geom, algo)
    for out, shape in ((y, geom.output_shape), (gx, geom.input_shape), (gw, geom.weight_shape)):
        assert out.shape == shape and out.dtype == dtype
    assert_close(y, reference.conv2d_forward(x, w, b, geom))
    assert_close(gx, reference.conv2d_input_grad(w, gy, geom))
    assert_close(gw, reference.conv2d_weight_grad(x, gy, geom))


def test_every_variant_is_exercised():
    assert {v for v, *_ in (p.values for p in FORCED)} == set(VARIANTS)


def test_bias_grad_reduce(dtype):
    gy = np.random.default_rng(0).standard_normal((3, 5, 7, 9)).astype(dtype)
    out = cpu.conv2d_bias_grad(gy, Algo("reduce"))
    assert out.shape == (5,) and out.dtype == dtype
    assert_close(out, gy.astype(np.float64).sum(axis=(0, 2, 3)), dtype)


# --------------------------------------------------------------------------------------------
# Workspace bound
# --------------------------------------------------------------------------------------------
CHUNKED = [
    (ConvCase("rows_im2col", 3, 6, 20, 17, 8, 3, 3, stride=(2, 1), padding=1), "im2col_wide"),
    (ConvCase("rows_im2col_pi", 2, 4, 30, 30, 5, 5, 5, padding=2), "im2col"),
    (ConvCase("rows_winograd4", 2, 16, 24, 19, 16, 3, 3, padding=1), "winograd4"),
    (ConvCase("rows_winograd2", 2, 16, 24, 19, 16, 3, 3, padding=1), "winograd2"),
    (ConvCase("rows_winograd_wide", 2, 16, 20, 41, 16, 3, 3, padding=1), "winograd4"),
    (ConvCase("images_winograd_batched", 6, 16, 13, 11, 16, 3, 3, padding=1),
     "winograd2_batched"),
    (ConvCase("images_kernel_rows", 3, 4, 9, 8, 6, 5, 5, padding=2), "im2col_kernel_rows"),
]


def _smallest_bound(variant: str, geom, itemsize: int) -> int:
    """The least workspace bound under which every op of ``variant`` still runs: its fixed
    workspace plus one row, from the same size functions the kernels plan with."""
    name, params = VARIANTS[variant]
    p = dict(params)
    if p.get("layout") == "kernel_rows":
        sizes = [cpu_workspace.kernel_rows_bytes(op, geom, itemsize)
                 for op in ("forward", "input_grad", "weight_grad")]
    elif name == "im2col":
        sizes = [cpu_workspace.im2col_bytes(op, geom, p["layout"], itemsize)
                 for op in ("forward", "input_grad", "weight_grad")]
    else:
        sizes = [cpu_workspace.winograd_bytes(op, geom, p["tile"], p.get("layout", "fused"),
                                              itemsize)
                 for op in ("forward", "input_grad", "weight_grad")]
    return max(sum(s) for s in sizes)


@pytest.mark.parametrize("case,variant", CHUNKED, ids=[c[0].name for c in CHUNKED])
def test_chunking_under_a_tiny_workspace_bound(case, variant, dtype):
    x, w, b, gy, geom = _problem(case, dtype)
    bound = _smallest_bound(variant, geom, dtype.itemsize)
    algo = _algo(variant, workspace_bytes=bound)
    cpu_workspace.largest_scratch_bytes(reset=True)
    outs = (cpu.conv2d_forward(x, w, b, geom, algo), cpu.conv2d_input_grad(w, gy, geom, algo),
            cpu.conv2d_weight_grad(x, gy, geom, algo))
    largest = cpu_workspace.largest_scratch_bytes(reset=True)
    assert 0 < largest <= bound
    cpu.conv2d_forward(x, w, b, geom, _algo(variant))
    assert cpu_workspace.largest_scratch_bytes() > bound, "the bound did not force chunking"
    refs = (reference.conv2d_forward(x, w, b, geom), reference.conv2d_input_grad(w, gy, geom),
            reference.conv2d_weight_grad(x, gy, geom))
    for out, ref in zip(outs, refs):
        assert_close(out, ref)


def test_plan_chunks_covers_every_row_once():
    for N, rows, per_row, bound, preferred in [(5, 7, 100, 10_000, 10_000),
                                               (5, 7, 100, 350, 10_000),
                                               (3, 10, 64, 10**9, 1), (1, 1, 8, 8, 8)]:
        seen = np.zeros((N, rows), dtype=int)
        for ch in cpu_workspace.plan_chunks(N, rows, (0, per_row), bound, preferred):
            assert ch.nc * ch.rc * per_row <= max(min(bound, preferred), per_row)
            assert ch.nc == 1 or ch.rc == rows
            seen[ch.n0:ch.n0 + ch.nc, ch.r0:ch.r0 + ch.rc] += 1
        assert np.all(seen == 1)


def test_scratch_refuses_buffers_above_the_bound():
    with pytest.raises(MemoryError, match="exceeds the workspace bound"):
        cpu_workspace.scratch((1000,), np.float32, 3999)
    assert cpu_workspace.scratch((1000,), np.float32, 4000).nbytes == 4000


def test_scratch_is_reused_between_ops_and_never_returned():
    """Inside an op (a lease) scratch comes from the thread's cache and goes back to it when
    the op returns: a second op reuses it, the cache stays under its cap, and no result of an
    op is scratch (a later op would overwrite it)."""
    big = conv_geometry((4, 64, 30, 30), (64, 64, 3, 3), 1, 1, 1, 1)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(big.input_shape).astype(np.float32) for _ in range(2)]
    wb = rng.standard_normal(big.weight_shape).astype(np.float32)
    for variant in ("im2col_wide", "winograd4"):
        algo = _algo(variant)
        first = cpu.conv2d_forward(xs[0], wb, None, big, algo)
        kept = first.copy()
        held = cpu_workspace.cached_scratch_bytes()
        assert 0 < held <= cpu_workspace.SCRATCH_CACHE_BYTES
        second = cpu.conv2d_forward(xs[1], wb, None, big, algo)
        assert cpu_workspace.cached_scratch_bytes() == held       # reused, not grown
        assert np.array_equal(first, kept) and not np.shares_memory(first, second)
        assert_close(second, reference.conv2d_forward(xs[1], wb, None, big))
    with cpu_workspace.lease():
        a = cpu_workspace.scratch((2**18,), np.float32, 2**30)
        with cpu_workspace.lease():
            b_ = cpu_workspace.scratch((2**18,), np.float32, 2**30)
            assert not np.shares_memory(a, b_)
        c = cpu_workspace.scratch((2**18,), np.float32, 2**30)      # b_'s, given back
        assert not np.shares_memory(a, c)


def test_scratch_cache_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(cpu_workspace, "SCRATCH_CACHE_BYTES", 0)
    with cpu_workspace.lease():
        cpu_workspace.scratch((2**18,), np.float32, 2**30)
    with cpu_workspace.lease():
        pass
    assert cpu_workspace.cached_scratch_bytes() == 0


def test_rules_fall_back_to_direct_when_no_row_fits():
    geom = conv_geometry((2, 64, 40, 40), (64, 64, 5, 5), 1, 2, 1, 1)
    assert rules.choose("forward", geom, np.float32, precision="fp32",
                        workspace_bytes=256 * 2**20).name == "im2col"
    algo = rules.choose("forward", geom, np.float32, precision="fp32", workspace_bytes=4096)
    assert algo.name == "direct" and "workspace" in algo.reason
    wino = conv_geometry((2, 64, 40, 40), (64, 64, 3, 3), 1, 1, 1, 1)
    assert rules.choose("forward", wino, np.float32, precision="fp32",
                        workspace_bytes=4096).name == "direct"


def test_public_api_honours_the_environment_bound(monkeypatch):
    case = CHUNKED[0][0]
    x, w, b, gy, geom = _problem(case, np.float32)
    monkeypatch.setenv("FASTCONV_WORKSPACE_MB", str(20_000 / 2**20))
    plan = fastconv.explain("conv2d", x, w, b, **case.kwargs, backend="cpu")
    assert plan.algo.get("workspace_bytes") == int(20_000 / 2**20 * 2**20)
    cpu_workspace.largest_scratch_bytes(reset=True)
    y = fastconv.conv2d(x, w, b, **case.kwargs, backend="cpu")
    assert cpu_workspace.largest_scratch_bytes() <= 20_000
    assert_close(y, reference.conv2d_forward(x, w, b, geom))


# --------------------------------------------------------------------------------------------
# Dispatch rules
# --------------------------------------------------------------------------------------------
SUITE = {
    # name: (N, C, H=W, K, kernel, stride, pad, groups) -> expected forward algorithm
    "stem7x7s2": ((8, 3, 224, 64, 7, 2, 3, 1), "im2col"),
    "r3x3_56": ((8, 64, 56, 64, 3, 1, 1, 1), "winograd"),
    "r1x1_56": ((8, 256, 56, 64, 1, 1, 0, 1), "gemm1x1"),
    "r3x3_14": ((8, 256, 14, 256, 3, 1, 1, 1), "winograd"),
    "r3x3s2_28": ((8, 128, 28, 256, 3, 2, 1, 1), "im2col"),
    "cifar3x3": ((64, 3, 32, 32, 3, 1, 1, 1), "direct"),    # thin GEMMs (rule 3)
    "dw3x3_28": ((8, 144, 28, 144, 3, 1, 1, 144), "direct"),
}


@pytest.mark.parametrize("name", list(SUITE))
def test_rules_on_the_benchmark_suite(name):
    (N, C, H, K, k, s, p, g), expected = SUITE[name]
    geom = conv_geometry((N, C, H, H), (K, C // g, k, k), s, p, 1, g)
    ops = ("forward", "input_grad", "weight_grad")
    per_op = expected if isinstance(expected, tuple) else (expected,) * len(ops)
    for op, want in zip(ops, per_op):
        algo = rules.choose(op, geom, np.float32, precision="fp32", workspace_bytes=256 * 2**20)
        assert algo.name == want and algo.name in cpu.ALGORITHMS and algo.reason
    assert rules.choose("bias_grad", geom, np.float32, precision="fp32",
                        workspace_bytes=256 * 2**20).name == "reduce"


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_rules_pick_an_algorithm_that_supports_the_shape(case):
    x, w, b, gy, geom = _problem(case, np.float32)
    for op in ("forward", "input_grad", "weight_grad"):
        algo = rules.choose(op, geom, np.float32, precision="fp32", workspace_bytes=2**28)
        assert supports(algo.name, geom, algo.params), (op, algo)


def test_kernel_rows_refuses_what_it_cannot_compute():
    """Forced on a stride, groups or (input gradient) padding past the kernel, the kernel_rows
    layout raises instead of computing a wrong result."""
    algo = _algo("im2col_kernel_rows")
    for stride, pad, groups, ops in ((2, 2, 1, "fiw"), (1, 2, 2, "fiw"), (1, 5, 1, "i")):
        geom = conv_geometry((2, 4, 9, 9), (6, 4 // groups, 5, 5), stride, pad, 1, groups)
        x = np.ones(geom.input_shape, np.float32)
        w = np.ones(geom.weight_shape, np.float32)
        gy = np.ones(geom.output_shape, np.float32)
        calls = {"f": lambda: cpu.conv2d_forward(x, w, None, geom, algo),
                 "i": lambda: cpu.conv2d_input_grad(w, gy, geom, algo),
                 "w": lambda: cpu.conv2d_weight_grad(x, gy, geom, algo)}
        for op in ops:
            with pytest.raises(ValueError, match="kernel_rows"):
                calls[op]()


def test_kernel_rows_on_small_planes_with_large_kernels():
    """im2col's kernel_rows layout: all three ops of stride-1 one-group 5x5 and 7x7 layers on
    planes below PER_IMAGE_MIN_PIXELS (the layers r5x5_28 and r7x7_14 of bench/conv2d.py's
    more cases); never 3x3, a stride, groups, a large plane or padding past the kernel."""
    def layouts(x_shape, w_shape, stride=1, pad=2, groups=1):
        geom = conv_geometry(x_shape, w_shape, stride, pad, 1, groups)
        return [rules.choose(op, geom, np.float32, precision="fp32",
                             workspace_bytes=2**28).get("layout")
                for op in ("forward", "input_grad", "weight_grad")]

    rows = ["kernel_rows"] * 3
    assert layouts((8, 32, 28, 28), (64, 32, 5, 5)) == rows
    assert layouts((8, 64, 14, 14), (64, 64, 7, 7), pad=3) == rows
    assert "kernel_rows" not in layouts((8, 32, 56, 56), (64, 32, 5, 5))
    assert "kernel_rows" not in layouts((8, 32, 28, 28), (64, 32, 5, 5), stride=2)
    assert "kernel_rows" not in layouts((8, 32, 28, 28), (64, 16, 5, 5), groups=2)
    assert "kernel_rows" not in layouts((8, 32, 28, 28), (64, 32, 5, 5), pad=5)
    assert "kernel_rows" not in layouts((8, 32, 28, 28), (64, 32, 3, 3), pad=1)


def test_grouped_stride1_layers_run_direct():
    def algos(geom):
        return [rules.choose(op, geom, np.float32, precision="fp32", workspace_bytes=2**28).name
                for op in ("forward", "input_grad", "weight_grad")]

    g8 = conv_geometry((8, 256, 28, 28), (256, 8, 3, 3), 1, 1, 1, 32)     # 8 per group
    g16 = conv_geometry((8, 128, 56, 56), (128, 16, 3, 3), 1, 1, 1, 8)    # 16 per group
    g4_5x5 = conv_geometry((8, 64, 28, 28), (64, 4, 5, 5), 1, 2, 1, 16)
    assert algos(g8) == ["direct"] * 3
    assert algos(g16) == ["direct", "direct", "winograd"]
    assert algos(g4_5x5) == ["direct"] * 3
    # 32 channels per group, stride 2 and grouped 1x1 layers keep the rules after it
    g32 = conv_geometry((8, 256, 28, 28), (256, 32, 3, 3), 1, 1, 1, 8)
    g8_s2 = conv_geometry((8, 256, 28, 28), (256, 8, 3, 3), 2, 1, 1, 32)
    g_1x1 = conv_geometry((8, 256, 28, 28), (256, 128, 1, 1), 1, 0, 1, 2)
    assert algos(g32) == ["winograd"] * 3
    assert algos(g8_s2) == ["im2col"] * 3
    assert algos(g_1x1) == ["gemm1x1"] * 3
    # strided 1x1 (ResNet's downsampling shortcut): GEMMs on the subsampled pixels
    s2_1x1 = conv_geometry((8, 256, 28, 28), (512, 256, 1, 1), 2, 0, 1, 1)
    assert algos(s2_1x1) == ["gemm1x1"] * 3
    # the input gradient's reduction runs over the filters of a group; with few outputs per
    # group (8 input channels) it stays direct up to 576, the forward up to 16 filters
    wide_k = conv_geometry((8, 64, 28, 28), (256, 8, 3, 3), 1, 1, 1, 8)  # 8 in, 32 out
    assert algos(wide_k) == ["direct"] * 3
    wider_k = conv_geometry((8, 64, 28, 28), (1024, 8, 3, 3), 1, 1, 1, 8)  # 8 in, 128 out
    assert algos(wider_k)[1] != "direct"
    thin_k = conv_geometry((8, 256, 28, 28), (128, 32, 3, 3), 1, 1, 1, 8)  # 32 in, 16 out
    assert algos(thin_k)[0] == "direct"
    wide_c = conv_geometry((8, 128, 28, 28), (256, 16, 3, 3), 1, 1, 1, 8)  # 16 in, 32 out
    assert algos(wide_c)[1] != "direct"
    # the weight gradient's per-group GEMMs need 2 filters and 16 to 100 of Cg R S per group
    thin = conv_geometry((8, 64, 28, 28), (64, 1, 3, 3), 1, 1, 1, 64)       # depthwise
    wide = conv_geometry((8, 512, 28, 28), (256, 32, 3, 3), 1, 1, 1, 16)    # 288 per group
    assert algos(thin) == ["direct"] * 3
    assert algos(wide)[2] == "winograd"     # past 100 of Cg R S: the rules after it


@pytest.mark.parametrize("avx512", [True, False])
def test_winograd_tile_choice(monkeypatch, avx512):
    monkeypatch.setattr(rules, "host_avx512", lambda: avx512)
    big = conv_geometry((1, 16, 40, 40), (16, 16, 3, 3), 1, 1, 1, 1)
    algo = rules.choose("forward", big, np.float32, precision="fp32", workspace_bytes=2**28)
    assert (algo.name, algo.get("tile")) == ("winograd", 4)
    small = conv_geometry((1, 16, 24, 24), (16, 16, 3, 3), 1, 1, 1, 1)
    one_small = conv_geometry((1, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, 1)
    r3x3_14 = conv_geometry((8, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, 1)
    deep = conv_geometry((8, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1, 1)
    half_14 = conv_geometry((4, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1, 1)
    for geom in (small, one_small, deep):
        assert rules.choose("forward", geom, np.float32, precision="fp32",
                            workspace_bytes=2**28).name == "im2col"
    # a small plane fused with F(2x2) from 64 x 64 up to 256 x 256 channels (192 x 192 without
    # AVX-512, batched above), from 4 images of 14x14; past that batched where it saves enough,
    # with the tile of fewer weighted GEMM columns: F(4x4) at 8 images of 14x14 (16 tiles of 36
    # points against 49 of 16), F(2x2) at 4 (where the cost model alone would keep im2col)
    wide_14 = conv_geometry((8, 512, 14, 14), (512, 512, 3, 3), 1, 1, 1, 1)
    narrow_12 = conv_geometry((8, 64, 12, 12), (64, 64, 3, 3), 1, 1, 1, 1)
    mid_14 = conv_geometry((8, 192, 14, 14), (192, 192, 3, 3), 1, 1, 1, 1)
    small_256 = (2, "fused") if avx512 else (4, "batched")
    half_256 = (2, "fused") if avx512 else (2, "batched")
    for op in ("forward", "input_grad", "weight_grad"):
        for geom, want in ((r3x3_14, small_256), (half_14, half_256), (wide_14, (4, "batched")),
                           (narrow_12, (2, "fused")), (mid_14, (2, "fused"))):
            algo = rules.choose(op, geom, np.float32, precision="fp32", workspace_bytes=2**28)
            assert (algo.name, algo.get("tile"), algo.get("layout")) == ("winograd",) + want
    # Up to 128 x 128 channels the fused layout (its block GEMMs cut into pieces BLAS keeps
    # single-threaded), from 28x28 with 64 x 64 and more; past that whole images and
    # BLAS-threaded GEMMs (the batched layout) where they save enough.
    for shape, C, want in (((8, 64, 28, 28), 64, "fused"), ((8, 128, 56, 56), 128, "fused"),
                           ((8, 256, 28, 28), 256, "batched"), ((2, 256, 28, 28), 256,
                                                                "batched"),
                           ((1, 256, 28, 28), 256, "batched"),
                           ((4, 256, 56, 56), 256, "batched")):
        geom = conv_geometry(shape, (C, C, 3, 3), 1, 1, 1, 1)
        for op in ("forward", "input_grad", "weight_grad"):
            algo = rules.choose(op, geom, np.float32, precision="fp32", workspace_bytes=2**28)
            assert (algo.name, algo.get("tile"), algo.get("layout")) == ("winograd", 4, want)
    few = conv_geometry((1, 3, 40, 40), (16, 3, 3, 3), 1, 1, 1, 1)   # thin: direct (rule 3)
    assert rules.choose("forward", few, np.float32, precision="fp32",
                        workspace_bytes=2**28).name == "direct"


# --------------------------------------------------------------------------------------------
# Accuracy at realistic sizes, determinism, non-contiguous inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tile", cpu_winograd.TILE_SIZES)
def test_winograd_accuracy_at_layer_size(tile):
    """F(4x4) amplifies rounding most; at a ResNet-like size it stays well inside 1e-5."""
    case = ConvCase("layer", 2, 128, 28, 28, 64, 3, 3, padding=1)
    x, w, b, gy, geom = _problem(case, np.float32)
    algo = Algo("winograd", (("tile", tile),))
    assert_close(cpu.conv2d_forward(x, w, b, geom, algo),
                 reference.conv2d_forward(x, w, b, geom), factor=0.5)
    assert_close(cpu.conv2d_input_grad(w, gy, geom, algo),
                 reference.conv2d_input_grad(w, gy, geom), factor=0.5)
    assert_close(cpu.conv2d_weight_grad(x, gy, geom, algo),
                 reference.conv2d_weight_grad(x, gy, geom), factor=0.5)


DETERMINISM = [
    (ConvCase("det_im2col", 4, 6, 21, 19, 8, 3, 3, stride=2, padding=1), "im2col_rows"),
    (ConvCase("det_im2col_pi", 3, 6, 50, 50, 8, 3, 3, padding=1), "im2col"),
    (ConvCase("det_wino", 4, 16, 21, 19, 16, 3, 3, padding=1), "winograd4_rows"),
    (ConvCase("det_wino_wide", 2, 16, 36, 40, 16, 3, 3, padding=1), "winograd4"),
    (ConvCase("det_1x1", 4, 32, 21, 19, 16, 1, 1), "gemm1x1"),
    (ConvCase("det_direct", 4, 8, 21, 19, 8, 3, 3, padding=1, groups=8), "direct"),
]


@pytest.mark.parametrize("case,variant", DETERMINISM, ids=[c[0].name for c in DETERMINISM])
def test_identical_results_run_to_run(case, variant):
    x, w, b, gy, geom = _problem(case, np.float32)
    algo = _algo(variant)

    def run():
        return (cpu.conv2d_forward(x, w, b, geom, algo), cpu.conv2d_input_grad(w, gy, geom, algo),
                cpu.conv2d_weight_grad(x, gy, geom, algo), cpu.conv2d_bias_grad(gy, algo))

    first = run()
    for _ in range(3):
        for a, b_ in zip(first, run()):
            assert np.array_equal(a, b_)


def test_non_contiguous_inputs_are_handled_upstream():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 20, 13, 16)).astype(np.float32).transpose(0, 1, 3, 2)[:, ::2]
    w = rng.standard_normal((3, 3, 10, 12)).astype(np.float32).transpose(3, 2, 0, 1)
    b = rng.standard_normal(24).astype(np.float32)[::2]
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or b.flags.c_contiguous)
    y = fastconv.conv2d(x, w, b, padding=1, backend="cpu")
    assert_close(y, fastconv.conv2d(np.ascontiguousarray(x), np.ascontiguousarray(w),
                                    np.ascontiguousarray(b), padding=1, backend="reference"))
    gy = rng.standard_normal(y.shape[::-1]).astype(np.float32).T
    gx = fastconv.conv2d_input_grad(x.shape, w, gy, padding=1, backend="cpu")
    gw = fastconv.conv2d_weight_grad(x, w.shape, gy, padding=1, backend="cpu")
    assert_close(gx, fastconv.conv2d_input_grad(x.shape, w, gy, padding=1, backend="reference"))
    assert_close(gw, fastconv.conv2d_weight_grad(x, w.shape, gy, padding=1, backend="reference"))


@pytest.mark.parametrize("dilation", [1, 2])
def test_direct_3x3_pass_sums_in_tap_order(dilation, dtype):
    """The direct kernels sum the nine taps of a 3x3 filter in one pass (``_taps3x3``); a 3x4
    filter whose last column is zero takes the one-tap-per-pass loop. Adding ``0 * x`` after
    each row of taps leaves a finite sum unchanged, so both give the same bits exactly when
    the fused pass keeps the loop's order (r, then s)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 13, 15)).astype(dtype)
    w3 = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    w4 = np.concatenate([w3, np.zeros((5, 3, 3, 1), dtype)], axis=3)
    b = rng.standard_normal(5).astype(dtype)
    extra = dilation  # the fourth column reaches one dilation step further right
    g3 = conv_geometry(x.shape, w3.shape, 1, ((1, 1), (1, 1)), dilation, 1)
    g4 = conv_geometry(x.shape, w4.shape, 1, ((1, 1), (1, 1 + extra)), dilation, 1)
    assert g3.output_shape == g4.output_shape
    algo = _algo("direct")
    np.testing.assert_array_equal(cpu.conv2d_forward(x, w3, b, g3, algo),
                                  cpu.conv2d_forward(x, w4, b, g4, algo))
    gy = rng.standard_normal(g3.output_shape).astype(dtype)
    # The input gradient runs the 180-degree rotated filter: a zero first column of the
    # filter is the last tap of each row there, the same position as above.
    w4l = np.concatenate([np.zeros((5, 3, 3, 1), dtype), w3], axis=3)
    g4l = conv_geometry(x.shape, w4l.shape, 1, ((1, 1), (1 + extra, 1)), dilation, 1)
    np.testing.assert_array_equal(cpu.conv2d_input_grad(w3, gy, g3, algo),
                                  cpu.conv2d_input_grad(w4l, gy, g4l, algo))


@pytest.mark.parametrize("dilation", [1, 2])
def test_direct_outputs_per_task_do_not_change_bits(dtype, dilation):
    """The stride-1 direct kernels group outputs into tasks that share padded planes (how
    many depends on the batch and the thread count) and split the tasks among workers that
    reuse their buffers; every grouping and split gives the same bits, with one output a
    pass, two (AVX-512 hosts) or up to four by kernel rows (AVX2 hosts; ``OUTPUTS_PER_PASS``),
    including the remainders of three, two and one output, and with one output a task,
    images side by side in the passes (every output written: poisoned first)."""
    from fastconv.kernels import cpu_depthwise

    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 6, 11, 9)).astype(dtype)
    w = rng.standard_normal((10, 3, 3, 3)).astype(dtype)      # 2 groups: Cg 3, Kg 5
    b = rng.standard_normal(10).astype(dtype)
    gy = rng.standard_normal((2, 10, 11, 9)).astype(dtype)
    ys, gxs = [], []
    for per, workers, per_pass, images in (
            (1, 1, 2, 1), (1, 3, 1, 1), (2, 2, 2, 1), (3, 5, 2, 1), (3, 5, 1, 2), (8, 3, 1, 1),
            (8, 7, 2, 1), (8, 2, 4, 1), (5, 3, 4, 1), (3, 1, 4, 1), (2, 2, 4, 1), (4, 1, 4, 1),
            (1, 1, 2, 2), (1, 3, 4, 2), (1, 2, 1, 3)):
        y = np.full((2, 10, 11, 9), np.nan, dtype)
        d = dilation
        cpu_depthwise._direct_s1(x, w, b, y, d, d, d, d, per, workers, per_pass,
                                 cpu_depthwise.UPRIGHT, images)
        gx = np.full_like(x, np.nan)
        cpu_depthwise._direct_s1(gy, w, np.zeros(6, dtype), gx, d, d, d, d, per, workers,
                                 per_pass, cpu_depthwise.ROTATED, images)
        ys.append(y)
        gxs.append(gx)
    geom = conv_geometry(x.shape, w.shape, 1, dilation, dilation, 2)
    assert_close(ys[0], reference.conv2d_forward(x, w, b, geom))
    assert_close(gxs[0], reference.conv2d_input_grad(w, gy, geom))
    for y, gx in zip(ys[1:], gxs[1:]):
        np.testing.assert_array_equal(y, ys[0])
        np.testing.assert_array_equal(gx, gxs[0])


@pytest.mark.parametrize("R, padding, dilation", [
    (5, ((2, 2), (2, 2)), 1), (5, ((0, 3), (4, 1)), 1), (3, ((1, 1), (3, 0)), 2),
    (5, ((1, 1), (0, 6)), 1), (7, ((3, 3), (3, 3)), 1)])
def test_direct_images_side_by_side_same_bits(dtype, R, padding, dilation):
    """Depthwise layers on small planes run the stride-1 direct passes over several images
    side by side (``_direct_s1``'s ``images``; ``cpu_depthwise._side_by_side`` picks how
    many): any count, one that does not divide the batch or exceeds it, gives the bits of one
    image a pass, forward and input gradient, every output written (poisoned first) and equal
    to the reference; padding past the kernel's extent on the right included (the input
    gradient's planes then clip the copied columns)."""
    from fastconv.kernels import cpu_depthwise as dw

    rng = np.random.default_rng(41)
    N, C, H, W = 5, 3, 9, 7
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((C, 1, R, R)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    geom = conv_geometry(x.shape, w.shape, 1, padding, dilation, C)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    (pt, _), (pl, _) = padding
    top, left = (R - 1) * dilation - pt, (R - 1) * dilation - pl
    outs = []
    for images, workers in ((1, 1), (2, 2), (3, 1), (4, 3), (8, 2)):
        y = np.full(geom.output_shape, np.nan, dtype)
        dw._direct_s1(x, w, b, y, pt, pl, dilation, dilation, 1, workers, 1, dw.UPRIGHT,
                      images)
        gx = np.full(x.shape, np.nan, dtype)
        dw._direct_s1(gy, w, np.zeros(C, dtype), gx, top, left, dilation, dilation, 1,
                      workers, 1, dw.ROTATED, images)
        outs.append((y, gx))
    assert_close(outs[0][0], reference.conv2d_forward(x, w, b, geom))
    assert_close(outs[0][1], reference.conv2d_input_grad(w, gy, geom))
    for y, gx in outs[1:]:
        np.testing.assert_array_equal(y, outs[0][0])
        np.testing.assert_array_equal(gx, outs[0][1])
    algo = _algo("direct")
    assert dw._side_by_side("forward", geom, 1, x.itemsize, algo) == N   # rows under 64
    assert dw._side_by_side("forward", geom, 2, x.itemsize, algo) == 1   # shared planes
    np.testing.assert_array_equal(cpu.conv2d_forward(x, w, b, geom, algo), outs[0][0])
    np.testing.assert_array_equal(cpu.conv2d_input_grad(w, gy, geom, algo), outs[0][1])


@pytest.mark.parametrize("H, W, pt, pb", [(7, 9, 1, 1), (6, 2, 1, 1), (5, 1, 1, 1),
                                         (1, 1, 1, 1), (5, 6, 0, 2), (4, 5, 2, 0)])
@pytest.mark.parametrize("workers", [1, 2, 7])
def test_depthwise_same_width_kernel_bits(dtype, H, W, pt, pb, workers):
    """Depthwise 3x3 layers with one padding column each side run ``_depthwise_same3x3``
    (the plane as it lies, its edge columns computed again with zeros): every output written
    (poisoned first), the reference's values, and the same bits as the padded-plane kernels,
    forward and input gradient, with non-finite inputs too."""
    from fastconv.kernels import cpu_depthwise as dw

    rng = np.random.default_rng(31)
    N, C = 2, 5
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((C, 1, 3, 3)).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    geom = conv_geometry(x.shape, w.shape, 1, ((pt, pb), (1, 1)), 1, C)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    assert dw._same3x3(geom)

    def run(x, w):
        y = np.full(geom.output_shape, np.nan, dtype)
        dw._depthwise_same3x3(x, w, b, y, pt, dw.UPRIGHT, workers)
        gx = np.full_like(x, np.nan)
        dw._depthwise_same3x3(gy, w, np.zeros(C, dtype), gx, 2 - pt, dw.ROTATED, workers)
        y0, gx0 = np.empty_like(y), np.empty_like(x)
        dw._direct_s1(x, w, b, y0, pt, 1, 1, 1, 1, 1, 1, dw.UPRIGHT, 1)
        dw._direct_s1(gy, w, np.zeros(C, dtype), gx0, 2 - pt, 1, 1, 1, 1, 1, 1, dw.ROTATED, 1)
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(gx, gx0)
        return y, gx

    y, gx = run(x, w)
    assert_close(y, reference.conv2d_forward(x, w, b, geom))
    assert_close(gx, reference.conv2d_input_grad(w, gy, geom))
    x[1, 2, 0, -1] = np.inf
    w[3, 0, 1, 0] = np.nan
    run(x, w)


@pytest.mark.parametrize("groups, K", [(2, 4), (4, 8), (1, 3), (1, 80)])
def test_direct_weight_grad_group_gemms(dtype, groups, K):
    """The stride-1 direct weight gradient by per-group im2col GEMMs: images in tasks of
    ``IMAGES_PER_TASK`` (5 images: a full task and one of one image), output rows in blocks
    (1, 2 and all 8 rows a GEMM), each GEMM the way round chosen by ``weight_grad`` or the
    other (``trans``): every combination matches the reference, and the chosen one is what
    ``weight_grad`` returns."""
    from fastconv.kernels import cpu_depthwise

    rng = np.random.default_rng(21)
    x = rng.standard_normal((5, 8, 7, 6)).astype(dtype)
    w = rng.standard_normal((K, 8 // groups, 3, 3)).astype(dtype)
    geom = conv_geometry(x.shape, w.shape, 1, ((1, 2), (0, 1)), (1, 2), groups)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    ref = reference.conv2d_weight_grad(x, gy, geom)
    Kg, crs = K // groups, 8 // groups * 9
    tasks = -(-5 // cpu_depthwise.IMAGES_PER_TASK)
    for trans in (False, True):
        for rows in (1, 2, geom.P):
            part = np.full((tasks, groups) + ((crs, Kg) if trans else (Kg, crs)), np.nan, dtype)
            cpu_depthwise._weight_grad_s1_gemm(x, gy, part, 3, 3, 1, 0, 1, 2,
                                               cpu_depthwise.IMAGES_PER_TASK, rows, trans)
            total = part.sum(axis=0)
            total = total.transpose(0, 2, 1) if trans else total
            assert_close(total.reshape(geom.weight_shape), ref)
    algo = Algo("direct", (("workspace_bytes", 2**28), ("chunk_bytes", 2**24)))
    assert cpu_depthwise._gemm_rows(geom, np.dtype(dtype).itemsize, algo)  # the GEMM path runs
    assert_close(cpu_depthwise.weight_grad(x, gy, geom, algo), ref)


@pytest.mark.parametrize("dilation", [1, 2])
def test_direct_depthwise_weight_grad_batches_of_images(dtype, dilation):
    """The stride-1 direct weight gradient of a depthwise layer sums each tap's products over
    batches of images per position, then the batches in float64 lanes: a batch that ends
    inside the plane loop (17 images: 8 + 8 + 1) and a batch of one image match the
    reference, the kernel without padded copies (outputs as wide as the input: dilation 1
    here; batches of eight images in one pass, ``_products8``) gives the bits of the padded
    one, and one thread and two give the same bits."""
    import numba

    from fastconv.kernels import cpu_depthwise

    rng = np.random.default_rng(14)
    x = rng.standard_normal((17, 5, 13, 11)).astype(dtype)
    w = rng.standard_normal((5, 1, 3, 5)).astype(dtype)
    geom = conv_geometry(x.shape, w.shape, 1, (1, 2), dilation, 5)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    ref = reference.conv2d_weight_grad(x, gy, geom)
    assert cpu_depthwise.WGRAD_IMAGES < x.shape[0]
    for nb in (1, cpu_depthwise.WGRAD_IMAGES, x.shape[0]):
        gw = np.full(w.shape, np.nan, dtype)
        cpu_depthwise._weight_grad_s1(x, gy, gw, 1, 2, dilation, dilation, nb)
        assert_close(gw, ref)
        if geom.Q == geom.W:
            flat = np.full(w.shape, np.nan, dtype)
            cpu_depthwise._weight_grad_s1_flat(x, gy, flat, 1, 2, dilation, dilation, nb)
            np.testing.assert_array_equal(flat, gw)
    assert (geom.Q == geom.W) == (dilation == 1)
    before = numba.get_num_threads()
    try:
        outs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            outs.append(cpu.conv2d_weight_grad(x, gy, geom, _algo("direct")))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(outs[0], ref)


def test_direct_weight_grad_gemm_same_bits_for_any_thread_count(dtype):
    """The ungrouped stride-1 direct weight gradient sums fixed tasks of images (GEMMs from
    the workers) in task order: one thread and two give the same bits, and it matches the
    reference."""
    import numba

    rng = np.random.default_rng(13)
    x = rng.standard_normal((11, 3, 15, 13)).astype(dtype)      # 3 tasks of 4 images
    w = rng.standard_normal((9, 3, 3, 3)).astype(dtype)
    geom = conv_geometry(x.shape, w.shape, 1, 1, 1, 1)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    algo = _algo("direct")
    before = numba.get_num_threads()
    try:
        outs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            outs.append(cpu.conv2d_weight_grad(x, gy, geom, algo))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(outs[0], reference.conv2d_weight_grad(x, gy, geom))


@pytest.mark.parametrize("H, W, pt, pl", [(11, 9, 1, 1), (8, 8, 1, 0), (9, 12, 0, 1),
                                         (3, 2, 1, 1)])
def test_direct_stride2_3x3_pass_sums_in_tap_order(dtype, H, W, pt, pl):
    """The stride-2 direct forward adds a 3x3 filter's nine taps in one pass over the phase
    planes (``_phase_taps3x3``): the same bits as one pass per tap (``_phase_taps``),
    non-finite values and the planes' zero padding included."""
    from fastconv.kernels import cpu_depthwise as dw

    rng = np.random.default_rng(41)
    x = rng.standard_normal((1, 1, H, W)).astype(dtype)
    x[0, 0, H // 2, W // 2] = np.inf
    P, Q = (H + 2 * pt - 3) // 2 + 1, (W + 2 * pl - 3) // 2 + 1
    Hh, Wh = P + 1, Q + 1
    PS = Hh * Wh + 2
    ph = np.zeros(4 * PS, dtype)
    dw._phase_planes(x.reshape(-1), 0, H, W, ph, PS, Hh, Wh, pt, pl)
    for wk in (rng.standard_normal((3, 3)).astype(dtype),
               np.array([[1, np.nan, 0], [0, -0.0, 2], [np.inf, 1, 1]], dtype)):
        one_pass = np.full(P * Wh, 0.5, dtype)
        per_tap = one_pass.copy()
        taps = tuple(dtype.type(t) for t in dw._window3x3(wk, dw.UPRIGHT))  # not floats
        dw._phase_taps3x3(taps, one_pass, ph, PS, Wh, P * Wh)
        dw._phase_taps(wk, per_tap, ph, PS, Wh, P * Wh, dw.GATHER)
        np.testing.assert_array_equal(one_pass, per_tap)


@pytest.mark.parametrize("name", ["phases_odd", "phases_one_sided", "phases_5x5_groups"])
def test_stride2_phase_planes_give_the_same_columns(name):
    """Stride-2 im2col copies whole rows of the input's phase planes: the same columns, bit
    for bit, as the strided copies, including rows and columns in the padding."""
    case = next(c for c in EXTRA_CASES if c.name == name)
    geom = _case_geometry(case)
    hw = cpu_conv.phase_planes(geom)
    assert hw is not None
    x, _, _ = case.arrays(np.float32)
    G, Cg = geom.groups, geom.C // geom.groups
    rows_g = Cg * geom.R * geom.S
    J = geom.N * geom.P * geom.Q
    args = (0, geom.N, 0, geom.P, geom.R, geom.S, 2, 2, geom.padding[0], geom.padding[2], 1,
            1, Cg, rows_g)
    plain = np.full((G * rows_g, J), np.nan, dtype=np.float32)
    cpu_conv.im2col(x, plain, *args, np.empty((0, 0, 0, 0, 0), dtype=np.float32))
    xph = np.full((geom.N, geom.C, 4) + hw, np.nan, dtype=np.float32)
    cpu_conv.split_phases(x, xph)
    phased = np.full_like(plain, np.nan)
    cpu_conv.im2col(x, phased, *args, xph)
    assert not np.isnan(phased).any()
    assert np.array_equal(plain, phased)


@pytest.mark.parametrize("H, W", [(5, 7), (6, 14), (9, 16), (8, 17), (11, 31), (4, 34),
                                  (3, 60)])
def test_split_and_merge_phases_match_slicing(dtype, H, W):
    """The phase planes by 16-element register shuffles (the last block of a row overlapping
    the one before; rows of fewer than 8 pairs scalar) hold exactly ``x[..., a::2, b::2]``,
    zero past an odd last row or column, and merging them gives ``x`` back; every element
    written (poisoned first)."""
    rng = np.random.default_rng(H * 100 + W)
    x = rng.standard_normal((2, 3, H, W)).astype(dtype)
    Hh, Wh = -(-H // 2), -(-W // 2)
    xph = np.full((2, 3, 4, Hh, Wh), np.nan, dtype=dtype)
    cpu_conv.split_phases(x, xph)
    padded = np.zeros((2, 3, 2 * Hh, 2 * Wh), dtype=dtype)
    padded[:, :, :H, :W] = x
    for a in range(2):
        for b in range(2):
            np.testing.assert_array_equal(xph[:, :, 2 * a + b], padded[:, :, a::2, b::2])
    back = np.full_like(x, np.nan)
    cpu_conv.merge_phases(xph, back)
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("name", ["phases_odd", "phases_one_sided", "phases_5x5_groups"])
def test_stride2_phase_planes_give_the_same_input_grad(name):
    """Stride-2 col2im adds whole rows into zeroed phase planes that are merged afterwards:
    every pixel of the input gradient the same bits as with the strided adds, in two chunks
    of output rows (the planes carry the sums from one chunk to the next)."""
    case = next(c for c in EXTRA_CASES if c.name == name)
    geom = _case_geometry(case)
    hw = cpu_conv.phase_planes(geom)
    assert hw is not None
    G, Cg = geom.groups, geom.C // geom.groups
    rows = G * Cg * geom.R * geom.S
    dcol = np.random.default_rng(3).standard_normal((rows, geom.N * geom.P * geom.Q))
    dcol = dcol.astype(np.float32)
    halves = ((0, geom.P // 2), (geom.P // 2, geom.P - geom.P // 2))

    def run(gph):
        gx = np.zeros(geom.input_shape, dtype=np.float32)
        for p0, pc in halves:
            cols = dcol.reshape(rows, geom.N, geom.P, geom.Q)[:, :, p0:p0 + pc]
            cols = np.ascontiguousarray(cols).reshape(rows, -1)
            cpu_conv.col2im(cols, gx, 0, geom.N, p0, pc, geom.R, geom.S, 2, 2,
                            geom.padding[0], geom.padding[2], 1, 1, gph)
        if gph.size:
            gx = np.full(geom.input_shape, np.nan, dtype=np.float32)
            cpu_conv.merge_phases(gph, gx)
        return gx

    plain = run(np.empty((0, 0, 0, 0, 0), dtype=np.float32))
    phased = run(np.zeros((geom.N, geom.C, 4) + hw, dtype=np.float32))
    assert not np.isnan(phased).any()
    assert np.array_equal(plain, phased)


def test_host_avx512_is_llvms_view_of_the_host(monkeypatch):
    import llvmlite.binding

    assert rules.host_avx512() == bool(llvmlite.binding.get_host_cpu_features()["avx512f"])

    def no_features():
        raise RuntimeError("no feature list here")

    # where LLVM cannot tell, the rules keep the host they were first measured on
    monkeypatch.setattr(llvmlite.binding, "get_host_cpu_features", no_features)
    rules.host_avx512.cache_clear()
    try:
        assert rules.host_avx512() is True
    finally:
        monkeypatch.undo()
        rules.host_avx512.cache_clear()
