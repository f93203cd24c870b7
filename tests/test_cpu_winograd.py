"""Fused cache-blocked Winograd (kernels/cpu_winograd.py): blocks of tile rows, per-worker
buffers, results independent of the block-to-thread assignment and of the thread count."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from fastconv import reference
from fastconv._args import conv_geometry
from fastconv._types import Algo
from fastconv.kernels import cpu, cpu_winograd, cpu_workspace

from conftest import assert_close


def _problem(N, C, H, W, K, padding, groups, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    geom = conv_geometry(x.shape, w.shape, 1, padding, 1, groups)
    gy = rng.standard_normal(geom.output_shape).astype(dtype)
    return x, w, b, gy, geom


def _all_ops(x, w, b, gy, geom, algo):
    return (cpu.conv2d_forward(x, w, b, geom, algo), cpu.conv2d_input_grad(w, gy, geom, algo),
            cpu.conv2d_weight_grad(x, gy, geom, algo))


def _refs(x, w, b, gy, geom):
    return (reference.conv2d_forward(x, w, b, geom), reference.conv2d_input_grad(w, gy, geom),
            reference.conv2d_weight_grad(x, gy, geom))


@pytest.mark.parametrize("tile", cpu_winograd.TILE_SIZES)
@pytest.mark.parametrize("block_bytes", [1, 60_000, 2**30], ids=["row", "small", "image"])
def test_blocks_of_any_size_match_the_reference(tile, block_bytes, dtype):
    """One tile row per block, a few, or whole images; several blocks per worker; a plane
    whose tile grid does not divide it; groups."""
    x, w, b, gy, geom = _problem(3, 16, 23, 30, 12, ((1, 2), (0, 1)), 2, dtype)
    algo = Algo("winograd", (("tile", tile), ("chunk_bytes", block_bytes)))
    for out, ref in zip(_all_ops(x, w, b, gy, geom, algo), _refs(x, w, b, gy, geom)):
        assert_close(out, ref)


def test_plan_does_not_depend_on_the_thread_count():
    algo = Algo("winograd", (("tile", 4),))
    plans = [cpu_winograd.plan(8, 14, 14, 4, 64, 64, 4096, wg, 4, algo, threads=t)
             for wg in (False, True) for t in (1, 2, 7)]
    assert len({p.rb for p in plans}) == 1
    assert [p.nw for p in plans[:3]] == [1, 2, 7]


@pytest.mark.parametrize("tile", cpu_winograd.TILE_SIZES)
def test_same_bits_with_any_thread_count(tile):
    """Blocks go to workers round-robin; each block's result and the order of every sum are
    fixed, so 1, 2 or 3 threads give the same bits (3 workers on 2 cores: some wait)."""
    x, w, b, gy, geom = _problem(5, 16, 26, 21, 16, 1, 1, np.float32, seed=3)
    algo = Algo("winograd", (("tile", tile), ("chunk_bytes", 40_000)))
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS),
                        min(3, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(threads)
            results.append(_all_ops(x, w, b, gy, geom, algo))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert np.array_equal(a, c)


def test_block_gemms_past_blas_threading_are_cut_into_pieces():
    """128 x 128 channels, blocks of 48 tiles: each block GEMM (128 x 128 x 48) is past
    OpenBLAS's threading size, so it runs as pieces of filter rows under
    ``cpu_workspace.BLAS_SERIAL_MACS``; right result, same bits for 1 and 2 threads."""
    x, w, b, gy, geom = _problem(2, 128, 12, 60, 128, 1, 1, np.float32, seed=7)
    th, tw = cpu_winograd.tile_grid(12, 60, 4)
    assert 128 * 128 * th * tw >= cpu_workspace.BLAS_SERIAL_MACS
    algo = Algo("winograd", (("tile", 4),))
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            results.append(_all_ops(x, w, b, gy, geom, algo))
    finally:
        numba.set_num_threads(before)
    for a, c, ref in zip(*results, _refs(x, w, b, gy, geom)):
        assert np.array_equal(a, c)
        assert_close(a, ref)


def test_batched_layout_same_bits_for_any_numba_thread_count():
    """The batched layout transforms whole images in Numba's workers and runs the GEMMs
    BLAS-threaded from the caller's thread; the images per chunk come from the geometry and
    the bound alone, so 1 or 2 Numba workers give the same bits (for a given BLAS thread
    count: OpenBLAS's result for a GEMM it threads depends on how it splits the GEMM, as for
    every BLAS-based algorithm; see README). 64 x 64 channels, 4 images of 16 x 18: GEMMs of
    64 x 64 x 320, past OpenBLAS's threading threshold."""
    x, w, b, gy, geom = _problem(4, 64, 16, 18, 64, 1, 1, np.float32, seed=5)
    before = numba.get_num_threads()
    try:
        for tile in cpu_winograd.TILE_SIZES:
            algo = Algo("winograd", (("tile", tile), ("layout", "batched"),
                                     ("chunk_bytes", 2**30)))
            results = []
            for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
                numba.set_num_threads(threads)
                results.append(_all_ops(x, w, b, gy, geom, algo))
            for other in results[1:]:
                for a, c in zip(results[0], other):
                    assert np.array_equal(a, c)
            for a, ref in zip(results[0], _refs(x, w, b, gy, geom)):
                assert_close(a, ref)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("tile,layout", [(4, "fused"), (2, "fused"), (2, "batched")])
def test_wide_planes_split_into_runs_of_tile_rows(tile, layout, dtype):
    """Planes so wide that a block's tile rows do not fit one row of the transforms' scratch
    (``WINOGRAD_PLANE`` elements): the transforms run over fewer tile rows at a time (with
    F(2x2), 300 tiles per row (301 in the band): two rows of tiles per input run, three per
    output run; the batched layout transforms tile by tile, channels last, whatever the
    width)."""
    x, w, b, gy, geom = _problem(2, 8, 7, 600, 8, 1, 1, dtype, seed=11)
    th, tw = cpu_winograd.tile_grid(geom.P, geom.Q, tile)
    vw = tw + 1     # a band row's tiles: the input tiles' overlap carries one more
    plane = cpu_workspace.WINOGRAD_PLANE
    assert cpu_workspace.winograd_row_fits(tile, geom.Q)
    if tile == 2:
        assert th * vw > plane and (th + 1) * vw + 1 > plane
    algo = Algo("winograd", (("tile", tile), ("layout", layout)))
    for out, ref in zip(_all_ops(x, w, b, gy, geom, algo), _refs(x, w, b, gy, geom)):
        assert_close(out, ref)


def test_planes_wider_than_the_scratch_rows_take_im2col():
    """The transforms hold two rows of tiles in a scratch row; wider planes are not tiled."""
    from fastconv.dispatch import cpu as rules
    plane = cpu_workspace.WINOGRAD_PLANE
    widest = {m: max(c for c in range(1, 4 * plane) if cpu_workspace.winograd_row_fits(m, c))
              for m in cpu_winograd.TILE_SIZES}
    assert 2 * (-(-widest[4] // 4) + 1) + 1 <= plane < 2 * (-(-(widest[4] + 4) // 4) + 1) + 1
    for W, want in ((widest[2], "winograd"), (widest[4] + 8, "im2col")):
        geom = conv_geometry((1, 16, 40, W), (16, 16, 3, 3), 1, 1, 1, 1)
        algo = rules.choose("forward", geom, np.float32, precision="fp32",
                            workspace_bytes=256 * 2**20)
        assert algo.name == want


@pytest.mark.parametrize("kernel,stride,dilation,want", [
    (3, 1, 1, True), (3, 2, 1, False), (3, 1, 2, False), (5, 1, 1, False), (1, 1, 1, False)])
def test_winograd_applies_only_where_the_kernels_compute(kernel, stride, dilation, want):
    """One statement of the kernels' domain: the rules never choose Winograd outside it, for
    any op, and inside it the kernels give the reference's result."""
    from fastconv.dispatch import cpu as rules
    geom = conv_geometry((8, 64, 28, 28), (64, 64, kernel, kernel), stride, 1, dilation, 1)
    assert cpu_workspace.winograd_applies(geom) is want
    for op in ("forward", "input_grad", "weight_grad"):
        algo = rules.choose(op, geom, np.float32, precision="fp32", workspace_bytes=2**28)
        assert want or algo.name != "winograd", op
    if want:
        x, w, b, gy, g = _problem(2, 8, 9, 11, 8, ((2, 0), (1, 3)), 1, np.float64)
        assert cpu_workspace.winograd_applies(g)
        algo = Algo("winograd", (("tile", 4),))
        for out, ref in zip(_all_ops(x, w, b, gy, g, algo), _refs(x, w, b, gy, g)):
            assert_close(out, ref)


def test_workspace_bound_holds_with_several_workers():
    """Under a bound of a few rows, the plan shrinks blocks and workers to fit; the largest
    scratch buffer stays under the bound and the result is still right."""
    x, w, b, gy, geom = _problem(4, 16, 24, 40, 16, 1, 1, np.float32)
    sizes = [cpu_workspace.winograd_bytes(op, geom, 4, "fused", 4)
             for op in ("forward", "input_grad", "weight_grad")]
    bound = max(fixed + 3 * row for fixed, row in sizes)
    algo = Algo("winograd", (("tile", 4), ("workspace_bytes", bound)))
    cpu_workspace.largest_scratch_bytes(reset=True)
    outs = _all_ops(x, w, b, gy, geom, algo)
    assert 0 < cpu_workspace.largest_scratch_bytes(reset=True) <= bound
    for out, ref in zip(outs, _refs(x, w, b, gy, geom)):
        assert_close(out, ref)


def test_phase_mask_is_all_phases_by_default():
    """The benchmark's phase mask skips work; the library path always runs every phase."""
    x, w, b, gy, geom = _problem(1, 8, 12, 12, 8, 1, 1, np.float32)
    algo = Algo("winograd", (("tile", 4),))
    y = cpu_winograd.winograd_conv(x, w, b, (12, 12), (-1, -1), 1, algo)
    y_all = cpu_winograd.winograd_conv(x, w, b, (12, 12), (-1, -1), 1, algo,
                                       cpu_winograd.ALL_PHASES)
    assert np.array_equal(y, y_all)
    assert_close(y, reference.conv2d_forward(x, w, b, geom))


def test_same_bits_after_a_fresh_compile_and_a_cache_load(tmp_path):
    """Two processes on one empty Numba cache (the first compiles, the second loads) and this
    process give the same bits."""
    import hashlib
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import hashlib, numpy as np
        from fastconv._args import conv_geometry
        from fastconv._types import Algo
        from fastconv.kernels import cpu
        rng = np.random.default_rng(7)
        x = rng.standard_normal((2, 8, 17, 19)).astype(np.float32)
        w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
        geom = conv_geometry(x.shape, w.shape, 1, 1, 1, 1)
        gy = rng.standard_normal(geom.output_shape).astype(np.float32)
        algo = Algo("winograd", (("tile", 4),))
        outs = (cpu.conv2d_forward(x, w, None, geom, algo),
                cpu.conv2d_weight_grad(x, gy, geom, algo))
        print(hashlib.sha256(b"".join(o.tobytes() for o in outs)).hexdigest())
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    digests = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 17, 19)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    geom = conv_geometry(x.shape, w.shape, 1, 1, 1, 1)
    gy = rng.standard_normal(geom.output_shape).astype(np.float32)
    algo = Algo("winograd", (("tile", 4),))
    outs = (cpu.conv2d_forward(x, w, None, geom, algo), cpu.conv2d_weight_grad(x, gy, geom, algo))
    here = hashlib.sha256(b"".join(o.tobytes() for o in outs)).hexdigest()
    assert digests == [here, here]
