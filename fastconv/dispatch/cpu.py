"""Algorithm rules of the ``cpu`` backend (``fastconv.kernels.cpu``).

Rules, in order, for the conv ops (``G`` groups, ``Cg = C / G``, ``Kg = K / G``):

1. ``direct`` for depthwise and small-group layers (``G > 1`` and ``Cg * R * S <= 64``): a GEMM
   would multiply matrices too thin to block; loops over the taps need no workspace.
   1b. ``direct`` also for the forward and input gradient of other grouped stride-1 layers
   whose reduction per output (``Cg R S``, or ``Kg R S`` for the input gradient) is at most
   144 (16 channels per group at 3x3), or 576 when the op has few outputs per group (at
   most 16 filters forward, 8 input channels for the input gradient): the padded-plane
   passes beat im2col's thin GEMMs and the grouped Winograd 1.3-3x; and for their weight
   gradient with at least 2 filters and a
   ``Cg R S`` of 16 to 100 per group: im2col rows of one group at a time and its GEMM,
   issued from the worker threads (1.5-4x faster than im2col over the whole layer).
2. ``gemm1x1`` for 1x1 unpadded layers: the input already is the GEMM operand (strided: the
   pixels the stride reads, copied once; its input gradient put back on them). Measured, 8 x
   256 -> 512, stride 2, float32, 2 threads, against im2col (ms, five alternating rounds,
   forward / input grad / weight grad): 28x28 1.3-1.7 / 1.5-1.8 / 1.7-1.9 against 1.7-1.8 /
   1.5-2.1 / 1.8-2.5; 56x56 6.0-9.7 / 7.1-10.4 / 7.1-11.2 against 7.6-12.1 / 7.3-10.8 /
   7.9-10.8.
3. ``direct`` for 3x3 stride-1 ungrouped layers with fewer than 8 channels in or out
   (cifar's first layer): im2col's GEMM would be thin (a reduction of 27, or 3 columns); the
   direct kernels sum all nine taps of a filter in one pass over a zero-padded plane. Their
   weight gradient is im2col of a few rows at a time with GEMMs small enough to stay
   single-threaded in BLAS, issued from Numba's workers: a BLAS-threaded GEMM left
   OpenBLAS's threads spinning beside Numba's and slowed the next kernels 1.8x.
4. ``winograd`` for 3x3 stride-1 undilated layers with at least 8 channels in and out per
   group: F(4x4, 3x3) does 4x fewer multiplies than a direct 3x3, F(2x2, 3x3) 2.25x.
   Up to 128 x 128 channels (``Cg * Kg``) on an output plane of at least 28x28 (32x32 with
   fewer than 16 channels per group on a side) the kernel is fused and cache-blocked
   (``kernels/cpu_winograd``: blocks of tile rows of one image transformed, multiplied and
   inverse-transformed in a per-thread buffer; block GEMMs in pieces BLAS keeps
   single-threaded), with the tile that covers the output with the fewest transform points.
   With fewer channels the tile transforms dominate. Past 128 x 128 the pieces get thin, and
   the ``batched`` layout (whole images transformed, BLAS-threaded GEMMs over all their tiles)
   is taken where a cost model of its GEMM columns, tile transforms and filter transform
   undercuts im2col's multiply-adds by half (see _batched_tile): 14x14 x 512 at batch 8 with
   F(4x4), not on 7x7 planes. Small planes (10x10 to 20x20, at least 4 images of 14x14) with
   64 x 64 to 256 x 256 channels run fused F(2x2) instead, all three ops (faster than im2col or
   the batched layout, and no BLAS threads left spinning beside the next op; see
   WINOGRAD_SMALL_PLANE); on hosts without AVX-512 only up to 192 x 192, batched above (the
   tile by the same cost model, else F(2x2); see WINOGRAD_SMALL_FUSED_MAX_AVX2). Planes wider
   than the transforms' scratch rows hold (about 2000 columns with F(4x4), 1000 with F(2x2);
   see ``cpu_workspace.winograd_row_fits``) take im2col.
5. ``im2col`` otherwise; ``layout="per_image"`` when an image's output plane is large enough
   for one GEMM per image, else ``"wide"`` (images side by side in one GEMM); for stride-1
   one-group layers with kernels of 5x5 and up on such small planes, ``"kernel_rows"`` (see
   KERNEL_ROWS_MIN_SIDE).
6. ``direct`` when not even one row of an im2col chunk fits ``workspace_bytes`` (the sizes
   come from ``kernels/cpu_workspace``, the same functions the kernels plan their chunks
   with); Winograd and the 1x1 GEMMs step aside for im2col when they do not fit.

The input gradient of a layer is a correlation of ``grad_output`` with the rotated kernel, so
rule 4 tiles the ``H x W`` input plane for it.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from .._types import Algo, ConvGeometry
from ..kernels import cpu_workspace
from ..kernels.cpu_workspace import (fits, gemm1x1_bytes, group_gemms, im2col_bytes,
                                     kernel_rows_bytes, kernel_rows_runs, winograd_applies,
                                     winograd_bytes, winograd_row_fits)

# Cg * R * S at or below which grouped layers use direct loops.
DIRECT_MAX_REDUCTION = 64
# Reduction per output (Cg R S forward, Kg R S input gradient) up to which grouped stride-1
# layers run their forward and input gradient direct (rule 1b). Measured, float32, 2 threads,
# N=8, direct against the algorithm the rules took before (ms, four alternating rounds):
# 28x28 x 256, 32 groups (8 per group) forward 2.5 / im2col 7.0-8.8, input grad 2.0-2.6 /
# 6.2-8.8; 16 groups (16 per group) 8.0-10.2 / 11.0-16.0 and 5.1-9.5 / 11.0-15.8; 56x56 x 128,
# 8 groups, 5.3-12.4 / Winograd 10.9-14.3 and 5.0-8.6 / 7.1-8.8; 28x28 x 64 5x5, 16 groups,
# 1.0-1.2 / 3.4-5.3 and 1.0-1.7 / 3.0-4.4. At 32 per group (288) the forward ties im2col on
# 28x28 and the input gradient loses to Winograd on 56x56, so the bound stays at 144.
DIRECT_GROUPED_MAX_REDUCTION = 144
# Beyond it, up to DIRECT_THIN_MAX_REDUCTION, an op whose outputs per group are few (filters
# forward, input channels for the input gradient; at most DIRECT_THIN_OUTPUTS) still runs
# direct: the GEMMs of im2col and Winograd are that thin. Measured, float32, 2 threads, N=8,
# 3x3, 8 groups, alternating, the suite's pause before each (median ms; direct against the
# fused Winograd F(4x4), im2col). Forward, Cg -> Kg per group at 28x28: 32 -> 8 3.6 against
# 4.6, 8.7; 64 -> 8 3.9 against 8.0, 17.8; 32 -> 16 4.0 against 4.9, 14.8; 32 -> 8 at 56x56
# 5.6 against 9.8, 45.7. Input gradient (its outputs Cg): Kg 32 -> Cg 8 at 28x28 3.8 against
# 4.5, 3.9 (2.2 against 5.7, 5.0 in another run); 64 -> 8 3.8 against 7.6, 5.6; 32 -> 8 at
# 56x56 5.7 against 10.0, 11.9. Not the input gradient at 16 outputs (32 -> 16 at 28x28: 6.1
# against Winograd's 3.7).
DIRECT_THIN_OUTPUTS = {"forward": 16, "input_grad": 8}
DIRECT_THIN_MAX_REDUCTION = 576
# The same for their weight gradient, per-group GEMMs (``Cg R S``): up to 100 it was 1.5-4x
# faster than im2col and the fused Winograd (see ``cpu_workspace.GEMM_MIN_FILTERS``); at 144
# (16 per group, 3x3) it tied them alone (28x28 x 256: 6.5-10.9 against im2col 9.4-16.1;
# 56x56 x 128: 13.7-15.2 against Winograd 13.5-16.3) and lost inside fwd+bwd (56x56: 28.9
# against 19.9 ms), its GEMMs cut to 4 output rows.
DIRECT_WGRAD_MAX = 100
# Channels per group (in and out) from which Winograd's GEMMs outweigh its transforms.
WINOGRAD_MIN_CHANNELS = 8
# Channels (in or out) below which an ungrouped 3x3 stride-1 layer runs direct (rule 3).
THIN_3X3_CHANNELS = 8
# Pixels of the tiled plane from which the fused Winograd beats im2col (see rule 4). Measured,
# float32, 2 threads, SkylakeX OpenBLAS, forward and weight gradient, im2col against fused
# F(4x4) (ms): 28x28 x 64, N=8: 3.9 / 3.1 and 4.2 / 3.3; 28x28 x 128: 11.2 / 7.1 and 13.5 /
# 7.6; with fewer channels (median ms, forward / input grad / weight grad, alternating, the
# suite's pause before each): 28x28 x 32, N=8: 0.95 / 1.02 / 1.22 against 2.24 / 2.13 /
# 2.45; x 48: 1.59 / 1.64 / 2.11 against 3.34 / 3.28 / 4.07; x 16: 0.57 / 0.50 / 0.55
# against 0.73 / 1.11 / 0.78; the three in sequence at N=1 and 2 (16 and 32 channels) tie;
# grouped, 32 x 32 per group (8 x 256 x 28 x 28): 7.0 / 6.7 / 12.2 against 12.6 / 14.7 /
# 13.7. With fewer than 16 channels per group on one side from 32x32 only (8 in, 32 out per
# group, 28x28, input gradient: 5.7 against im2col's 5.0).
WINOGRAD_MIN_PIXELS = 784
WINOGRAD_MIN_PIXELS_THIN = 1024
WINOGRAD_THIN_CHANNELS = 16
# Largest Cg * Kg for the fused layout. Its block GEMMs run in the workers, cut into pieces
# that BLAS keeps single-threaded (``cpu_workspace.BLAS_SERIAL_MACS``): threaded by OpenBLAS
# inside the workers they collapsed (r3x3_14, 256 x 256 channels, F(2x2): 56-1180 ms against
# im2col's 68-76 ms). Past 128 x 128 the pieces get thin (19 filter rows at 256 x 256) and
# the batched layout does better (28x28 x 256, N=8, weight gradient: 25.9 fused against 21.0
# batched F(4x4), 26.3 im2col; 56x56 x 128 forward: fused 14.9, batched 21.3, im2col 28.1).
WINOGRAD_MAX_CHANNEL_PRODUCT = 128 * 128
# The batched layout (layers past WINOGRAD_MAX_CHANNEL_PRODUCT), its cost per (filter,
# channel) pair in GEMM multiply-adds: the GEMM columns, each weighted for its share of the
# tile transforms (F(4x4)'s: 1.3, heavier than F(2x2)'s per column), plus the filter
# transform per transformed element (U for 256 x 256 filters: 0.25-0.4 ms for F(2x2), 0.4-0.7
# ms for F(4x4), serial, about 0.25 ns per element, the time of ~40 multiply-adds of an SGEMM
# at 300 GFLOP/s on 2 cores). Taken when that undercuts im2col's multiply-adds by the gain
# factor. Measured, float32, 2 threads, OpenBLAS's SkylakeX kernels, against im2col in
# alternating calls in one process (time ratio forward / input grad / weight grad; the cost
# ratio in brackets): 28x28 x 256, N=8, F(4x4) 0.56 / 0.62 / 0.56 (0.40); N=2 0.74 / 0.76 /
# 0.75 (0.47); 14x14 x 256 (r3x3_14), N=8, F(2x2) 0.90 / 0.82 / 0.92 and 0.87 / 0.76 / 0.88
# (0.553; F(4x4) there: 0.99-1.1, its 4x4 tiles cover 16x16); not taken on 28x28 x 256 at
# N=1 (0.567; F(4x4) 1.19 / 1.20 / 0.95), on 7x7 x 512 (0.91; F(2x2) 1.76), where a row of 4
# tiles carries a fifth for padding, nor on 14x14 x 256 at N=4 (0.60; F(2x2) 0.80-1.15).
# Session 18 (AMD EPYC Zen 3, AVX2): the layout went channels last and lost its padding tiles
# (the costs above counted one per row of tiles), and F(4x4)'s transforms got cheaper per
# column: weight 1.1 (was 1.3), gain 0.5 (was 0.56; the same decisions on the layers above but
# 28x28 x 256 at N=1). Forward / input grad / weight grad, median ms, the suite's protocol,
# against im2col and fused F(4x4): 28x28 x 256, N=1: batched F(4x4) 5.33 / 4.46 / 4.34, im2col
# 6.90 / 5.82 / 6.03, fused 7.06 / 6.93 / 8.63 (cost ratio 0.48). 14x14 x 256, N=8, the three
# ops in sequence: batched F(4x4) 26.0, batched F(2x2) 29.1, fused F(2x2) 35.8, PyTorch 35.4
# (`bench/layouts.py --case r3x3_14 --sequence`).
WINOGRAD_FILTER_COST = 40
WINOGRAD_TRANSFORM_WEIGHT = {2: 1.0, 4: 1.1}
WINOGRAD_BATCHED_GAIN = 0.5
# From 64 x 64 to 256 x 256 channels, small planes (pixels in this range, at least
# WINOGRAD_SMALL_MIN_PIXELS over the batch) run the fused layout with F(2x2) after all, all
# three ops: below 128 x 128 its tile transforms cost less than im2col's packing of nine
# columns per pixel; past it its thin block GEMMs cost less than the batched layout's
# threaded GEMMs and whole-batch transforms, and no BLAS thread pool is left spinning beside
# the next op's workers (a fused forward and input gradient after a batched weight gradient
# were slower than all three batched). Measured, float32, 2 threads, alternating with the
# other choices and PyTorch, the suite's pause before each (median ms). Forward / input grad,
# fused F(2x2) against batched F(2x2), im2col: 14x14 x 256, N=8: 4.5 / 6.0 against 6.7 / 7.1,
# 8.7 / 8.7; N=16: 10.5 / 10.4 against 14.5 / 14.1, 18.7 / 18.5; N=4: 2.7 / 2.8 against 3.9
# / 3.4, 3.9 / 5.5; 14x14 x 192: 3.9 / 3.7 against 4.5 / 5.4, 6.6 / 6.3; 14x14 x 128, N=8:
# 2.6 / 2.4 against 3.1 / 4.1, 4.2 / 4.0. Forward, input and weight gradient in sequence, all
# fused against all batched, all im2col (PyTorch): 14x14 x 256, N=8: 17.5 and 20.5 against
# 20.6 and 27.6, 24.6 (18.5 and 20.6); N=16: 45.1 against 50.5, 53.3 (43.8); N=4: 13.2
# against 14.6, 13.4 (11.2); 14x14 x 192: 10.5 against 13.0, 15.9 (11.8); 14x14 x 128, N=8:
# 5.2 against 8.4, 8.6 (5.3); N=16: 11.5 against 16.1, 22.6 (13.0); 12x12 x 128: 4.4 against
# 9.0, 7.6 (4.4); 14x14 x 96: 3.2 against 4.8, 6.1 (3.8); 14x14 x 64: 2.6 against 2.9, 2.8
# (1.9). Not at 512 x 512 channels (14x14, N=8: 104 against 88 batched), N=2 (forward 2.6
# against 2.4 batched), 7x7 (8 x 256 forward: 2.4 / 3.7 against im2col's 2.9 / 3.0) or 28x28
# (forward batched F(4x4) 18.6 / 20.8 against 23.7 / 22.1).
WINOGRAD_SMALL_PLANE = (100, 400)
WINOGRAD_SMALL_MIN_PIXELS = 784
WINOGRAD_SMALL_CHANNEL_PRODUCT = (64 * 64, 256 * 256)
# The measurements above ran on an AVX-512 host (OpenBLAS's SkylakeX kernels). On a host
# without AVX-512 (AMD EPYC Zen 3, OpenBLAS's Haswell kernels; session 16) the fused layout's
# thin block GEMMs ran at 54-59% of NumPy's SGEMM on the same shapes, and in that window the
# batched F(2x2) layout wins above this channel product. Forward, input and weight gradient
# in sequence, fused F(2x2) against batched F(2x2), im2col (PyTorch), same protocol: 14x14 x
# 256, N=8: 55.0 / 47.4 / 55.7 (50.1), again 47.4 / 38.1 (44.0); N=16: 102.5 / 89.7 / 105.1
# (92.9); N=4: 29.9 / 25.8 / 28.1 (25.4); 12x12 x 256, N=8: 37.7 / 34.2 / 37.7 (35.8); 14x14
# x 192: 24.1 / 22.6 (27.9); 14x14 x 128: 12.3 / 14.6 / 17.8 (13.7); 14x14 x 64: 5.2 / 5.2 /
# 5.4 (3.3).
WINOGRAD_SMALL_FUSED_MAX_AVX2 = 192 * 192


@functools.lru_cache(maxsize=None)
def host_avx512() -> bool:
    """Whether this CPU has AVX-512 (LLVM's view of the host, as the cpu kernels get it);
    True where llvmlite cannot tell, the host the rules were first measured on."""
    try:
        return cpu_workspace.host_avx512()
    except Exception:  # noqa: BLE001  (no llvmlite, or no feature list on this platform)
        return True


# Output pixels per image from which one GEMM per image beats one GEMM over the whole chunk
# (measured: 32x32 outputs per image, 9.5 against 10.4 ms; 14x14, 16.3 against 14.8 ms).
PER_IMAGE_MIN_PIXELS = 1024

# Smallest kernel side of the ``kernel_rows`` im2col layout (stride 1, one group, planes below
# PER_IMAGE_MIN_PIXELS): the im2col of a 1 x S kernel over every padded row, one GEMM with the
# R kernel rows' weights stacked, the R products summed with a shift of one row each. An R-th
# of im2col's copies for a GEMM of R*K rows. Measured (session 14, float32, 2 threads, N=8,
# medians of 10 alternating rounds after the suite's pause, im2col wide against kernel_rows,
# ms): 28x28 32 -> 64 5x5 forward 5.12 / 3.74, input gradient 4.71 / 3.97; 14x14 64 -> 64 7x7
# 4.29 / 3.51 and 4.11 / 3.51; 28x28 64 -> 128 5x5 13.7 / 11.1 and 13.4 / 13.2. Not on larger
# planes (56x56 32 -> 64 5x5: per_image forward 11.6 / 11.0, input gradient 10.2 / 11.5: the
# R products no longer stay in cache) nor on 3x3 (Winograd's, or 28x28 x 128 forward 4.8 /
# 8.6 against Winograd). The weight gradient (one GEMM per image and kernel row on strided
# views of the kernel-row im2col): 28x28 5x5 5.40 / 3.87, 14x14 7x7 5.93 / 4.45, 28x28 64 ->
# 128 5x5 12.4 / 10.6; 56x56 5x5 15.2 / 15.2.
KERNEL_ROWS_MIN_SIDE = 5

# Preferred scratch per chunk: the packed operands stay in the caches between packing and GEMM.
CHUNK_BYTES = 16 * 2**20


def _winograd_tile(op: str, geom: ConvGeometry) -> Optional[tuple[int, str]]:
    """The Winograd output tile size (2 or 4) and layout (``"fused"`` or ``"batched"``) for
    this op, or None if Winograd does not apply or would not save time.

    The input gradient is a correlation of ``grad_output`` (``K`` channels) producing the
    ``C``-channel ``H x W`` input, so the channel roles and the tiled plane change."""
    if not winograd_applies(geom):
        return None
    if min(geom.C, geom.K) // geom.groups < WINOGRAD_MIN_CHANNELS:
        return None
    rows, cols = (geom.H, geom.W) if op == "input_grad" else (geom.P, geom.Q)
    channels = (geom.C // geom.groups) * (geom.K // geom.groups)
    if (WINOGRAD_SMALL_CHANNEL_PRODUCT[0] <= channels <= WINOGRAD_SMALL_CHANNEL_PRODUCT[1]
            and WINOGRAD_SMALL_PLANE[0] <= rows * cols <= WINOGRAD_SMALL_PLANE[1]
            and geom.N * rows * cols >= WINOGRAD_SMALL_MIN_PIXELS
            and winograd_row_fits(2, cols)):
        if host_avx512() or channels <= WINOGRAD_SMALL_FUSED_MAX_AVX2:
            return 2, "fused"
        return _batched_tile(geom.N, rows, cols) or 2, "batched"
    if channels > WINOGRAD_MAX_CHANNEL_PRODUCT:
        m = _batched_tile(geom.N, rows, cols)
        return None if m is None or not winograd_row_fits(m, cols) else (m, "batched")
    thin = min(geom.C, geom.K) // geom.groups < WINOGRAD_THIN_CHANNELS
    if rows * cols < (WINOGRAD_MIN_PIXELS_THIN if thin else WINOGRAD_MIN_PIXELS):
        return None
    cost = {m: (m + 2) ** 2 * -(-rows // m) * -(-cols // m) for m in (4, 2)}
    m = min(cost, key=cost.get)
    return (m, "fused") if cost[m] < 9 * rows * cols and winograd_row_fits(m, cols) else None


def _batched_tile(N: int, rows: int, cols: int) -> Optional[int]:
    """The tile of the batched layout, by its cost per (filter, channel) pair in GEMM
    multiply-adds: ``A*A`` transform points times the GEMM columns (tiles, weighted by
    ``WINOGRAD_TRANSFORM_WEIGHT``) plus the filter
    transform (``WINOGRAD_FILTER_COST`` per transformed filter element); None unless it
    undercuts im2col's ``9 N P Q`` by ``WINOGRAD_BATCHED_GAIN``."""
    cost = {m: (m + 2) ** 2 * (N * -(-rows // m) * -(-cols // m)
                               * WINOGRAD_TRANSFORM_WEIGHT[m] + WINOGRAD_FILTER_COST)
            for m in (4, 2)}
    m = min(cost, key=cost.get)
    return m if cost[m] < WINOGRAD_BATCHED_GAIN * 9 * N * rows * cols else None


def _grouped_direct(op: str, geom: ConvGeometry) -> bool:
    """Whether a grouped stride-1 layer runs direct (rule 1b): the op's reduction per output
    (``Cg R S`` forward, ``Kg R S`` input gradient) is at most ``DIRECT_GROUPED_MAX_REDUCTION``,
    or ``DIRECT_THIN_MAX_REDUCTION`` with few outputs per group (``DIRECT_THIN_OUTPUTS``);
    the weight gradient when its per-group GEMMs apply (``cpu_workspace.group_gemms``) up to
    ``DIRECT_WGRAD_MAX``."""
    if geom.groups == 1 or geom.stride != (1, 1) or geom.R * geom.S == 1:
        return False
    Cg, Kg, RS = geom.C // geom.groups, geom.K // geom.groups, geom.R * geom.S
    if op == "weight_grad":
        return group_gemms(geom) and Cg * RS <= DIRECT_WGRAD_MAX
    ins, outs = (Cg, Kg) if op == "forward" else (Kg, Cg)
    return (ins * RS <= DIRECT_GROUPED_MAX_REDUCTION
            or (outs <= DIRECT_THIN_OUTPUTS[op] and ins * RS <= DIRECT_THIN_MAX_REDUCTION))


# How the direct weight gradient of a grouped layer runs when ``group_gemms`` holds.
GROUP_GEMMS = "one im2col GEMM per group from the worker threads (single-threaded in BLAS)"


def _kernel_rows(op: str, geom: ConvGeometry) -> bool:
    """Whether ``op`` takes im2col's ``kernel_rows`` layout: every op of the layer can run it
    (stride 1, one group, no padding past the kernel's extent: ``kernel_rows_runs`` of the
    input gradient, the narrowest), both kernel sides at least KERNEL_ROWS_MIN_SIDE, and a
    plane (``P x Q``; ``H x W`` for the input gradient) below PER_IMAGE_MIN_PIXELS."""
    plane = geom.H * geom.W if op == "input_grad" else geom.P * geom.Q
    return (kernel_rows_runs(geom, "input_grad")
            and min(geom.R, geom.S) >= KERNEL_ROWS_MIN_SIDE and plane < PER_IMAGE_MIN_PIXELS)


def _thin_3x3(geom: ConvGeometry) -> bool:
    """Whether a 3x3 stride-1 ungrouped layer has too few channels on one side for im2col:
    its GEMM is ``(K, 9 C) @ (9 C, pixels)``, thin in ``K`` or in ``9 C`` (and the input
    gradient's the other way round). The direct kernels fuse the nine taps of a 3x3 filter
    in one pass over a padded plane; measured on cifar3x3 (C = 3), 2 cores: see README."""
    return ((geom.R, geom.S, geom.stride, geom.groups) == (3, 3, (1, 1), 1)
            and min(geom.C, geom.K) < THIN_3X3_CHANNELS)


def _workspace_params(workspace_bytes: int) -> tuple:
    return (("workspace_bytes", workspace_bytes),
            ("chunk_bytes", min(CHUNK_BYTES, workspace_bytes)))


def _conv_rule(op: str, geom: ConvGeometry, itemsize: int, workspace_bytes: int) -> Algo:
    G = geom.groups
    Cg = geom.C // G
    if G > 1 and Cg * geom.R * geom.S <= DIRECT_MAX_REDUCTION:
        kind = "depthwise" if Cg == 1 else f"grouped ({Cg} channels per group)"
        how = (GROUP_GEMMS if op == "weight_grad" and group_gemms(geom) else
               f"direct loops over the {geom.R}x{geom.S} taps, a GEMM would be too thin")
        return Algo("direct", _workspace_params(workspace_bytes), f"{kind} layer: {how}")
    if _grouped_direct(op, geom):
        how = GROUP_GEMMS if op == "weight_grad" else "direct passes over zero-padded planes"
        return Algo("direct", _workspace_params(workspace_bytes),
                    f"grouped layer ({Cg} channels, {geom.K // G} filters per group), stride 1: "
                    f"{how} beat a whole-layer GEMM this thin")
    if ((geom.R, geom.S, geom.padding) == (1, 1, (0, 0, 0, 0))
            and fits(gemm1x1_bytes(op, geom, itemsize), workspace_bytes)):
        how = ("on the input as it lies" if geom.stride == (1, 1) else
               "on the pixels the stride reads, copied out once")
        return Algo("gemm1x1", _workspace_params(workspace_bytes),
                    f"1x1 unpadded conv is a GEMM per image {how} (BLAS)")
    if _thin_3x3(geom):
        how = ("small im2col GEMMs issued from the worker threads (single-threaded in BLAS)"
               if op == "weight_grad" else
               "direct passes of all nine taps over zero-padded planes")
        return Algo("direct", _workspace_params(workspace_bytes),
                    f"3x3 stride-1 layer with {min(geom.C, geom.K)} channels on one side: an "
                    f"im2col GEMM would be too thin; {how}")
    wino = _winograd_tile(op, geom)
    if wino is not None and fits(winograd_bytes(op, geom, *wino, itemsize), workspace_bytes):
        m, layout = wino
        how = ("blocks of tile rows transformed, multiplied (BLAS per block) and inverse-"
               "transformed in per-thread buffers" if layout == "fused" else
               "whole images transformed in parallel, one BLAS-threaded GEMM per transform "
               "point over all their tiles (GEMMs too big to run inside the workers, or "
               "without AVX-512 too slow there in the pieces BLAS keeps serial)")
        return Algo("winograd", (("tile", m), ("layout", layout))
                    + _workspace_params(workspace_bytes),
                    f"3x3 stride-1 layer: {layout} Winograd F({m}x{m}, 3x3), "
                    f"{9 * m * m / (m + 2) ** 2:.2f}x fewer multiplies than direct; {how}")
    if _kernel_rows(op, geom) and fits(kernel_rows_bytes(op, geom, itemsize), workspace_bytes):
        return Algo("im2col", (("layout", "kernel_rows"),) + _workspace_params(workspace_bytes),
                    f"stride-1 {geom.R}x{geom.S} layer on a small plane: im2col of the kernel's "
                    f"rows ({geom.R}x fewer copies), one GEMM with the {geom.R} kernel rows' "
                    f"weights stacked, their products summed a row apart")
    layout = "per_image" if geom.P * geom.Q >= PER_IMAGE_MIN_PIXELS else "wide"
    if not fits(im2col_bytes(op, geom, layout, itemsize), workspace_bytes):
        return Algo("direct", _workspace_params(workspace_bytes),
                    f"one row of im2col needs more than the workspace bound of "
                    f"{workspace_bytes} bytes: direct row loops need none")
    how = "one GEMM per image" if layout == "per_image" else "images side by side in one GEMM"
    return Algo("im2col", (("layout", layout),) + _workspace_params(workspace_bytes),
                f"general conv: im2col in chunks, BLAS GEMM with {how}")


# Longest float32 row whose sum runs in float32: the vectorised sum's rounding error grows
# with C / 32 (about 4e-7 relative at 2048 columns, 3e-6 at 10^4), float64 costs 15-30 %.
HINGE_NATIVE_SUM_MAX_C = 2048


def _hinge_rule(dtype: np.dtype, scores_shape: Optional[tuple[int, int]]) -> Algo:
    """The fused hinge pass; its row sums run in float32 for short float32 rows."""
    C = scores_shape[1] if scores_shape is not None else HINGE_NATIVE_SUM_MAX_C + 1
    native = np.dtype(dtype) == np.float64 or C <= HINGE_NATIVE_SUM_MAX_C
    where = (f"row sums in {np.dtype(dtype).name}" if native
             else f"row sums in float64 (C > {HINGE_NATIVE_SUM_MAX_C})")
    return Algo("fused", (("accumulate", "native" if native else "float64"),),
                f"one parallel pass per row computes the loss and its gradient; {where}")


def choose(op: str, geom: Optional[ConvGeometry], dtype: np.dtype, *, precision: str,
           workspace_bytes: int, scores_shape: Optional[tuple[int, int]] = None) -> Algo:
    """The cpu algorithm for ``op`` on this geometry (``precision`` does not apply on the CPU;
    it always computes in the input's dtype)."""
    if op == "hinge":
        return _hinge_rule(dtype, scores_shape)
    if op == "bias_grad":
        return Algo("reduce", (), "grad_output summed over N, P, Q per filter, in parallel over "
                                  "K, fixed order, float64 accumulators")
    return _conv_rule(op, geom, np.dtype(dtype).itemsize, workspace_bytes)
