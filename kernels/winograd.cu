// winograd.cu -- fused Winograd F(m x m, 3 x 3) convolution (m = 2 or 4) for 3x3, stride-1,
// undilated layers: forward, input gradient and weight gradient, strict FP32; forward and input
// gradient of F(2x2) also on TF32 tensor cores (winograd_conv_tf32).
//
// Algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). An
// output tile of m x m pixels comes from an A x A input patch d (A = m + 2):
//     Y = AT [ U (.) V ] AT^T,   U = G f G^T (filter),   V = BT d BT^T (input)   (.) elementwise
// and summed over the input channels each of the A*A transform points xi is one GEMM:
//     M[xi](tiles, out channels) = sum_c V[xi](tiles, c) * U[xi](c, out channels)
// F(2x2): 16 multiplies per 4 outputs instead of 36 (2.25x fewer); F(4x4): 36 per 16 (4x).
//
// Layout and the two ops (one kernel, different arguments):
//   winograd_conv computes  out[n, g*Cog + k, y, x] = bias[g*Cog + k]
//       + sum_{c < Cig, r, s < 3} in[n, g*Cig + c, y - ph + r, x - pw + s] * f_{g,c,k}[r, s]
//   with in (N, Ci, Hi, Wi), out (N, Co, Ho, Wo), C-contiguous float; Cig = Ci / groups,
//   Cog = Co / groups; pixels outside `in` read as zero.
//     FPROP: in = x (N, C, H, W), out = y (N, K, P, Q), (ph, pw) = (pt, pl),
//            f_{g,c,k}[r, s] = weight[g*Kg + k, c, r, s].
//     DGRAD: in = grad_output (N, K, P, Q), out = grad_input (N, C, H, W),
//            (ph, pw) = (2 - pt, 2 - pl), f_{g,k,c}[r, s] = weight[g*Kg + k, c, 2 - r, 2 - s]
//            (the input gradient of a stride-1 layer is a correlation with the 180-degree
//            rotated, channel-transposed kernel; lecture notes 7.5), no bias.
//   winograd_filter<M, MODE, ROUND> writes U once per call (rounded to TF32 for the TF32
//   kernel when ROUND) into a workspace laid out
//     u[g][xi][c][k]   (groups, A*A, Cig, Cogp), k contiguous, Cogp = Cog rounded up to a
//   multiple of 4 (zero filters in the padding), so that a block's filter tile is read with
//   coalesced, 16-byte aligned vector loads.
//
// Launch geometry (kernels/cuda_winograd.py computes it)
//   winograd_filter: grid (ceil(Cig*Cogp / 256), groups, 1), block (256, 1, 1); one thread
//     per (c, k) of group blockIdx.y, k fastest (c = e / Cogp by FastDiv: no division routine).
//   winograd_conv<M, BC, TY, TX, TM, TN>: block tile of BT = TY*TM output tiles (tiles
//     ordered (image, tile row, tile column)) by BK = TX*TN output channels of one group;
//     grid (ceil(N*ceil(Ho/M)*ceil(Wo/M) / BT), ceil(Cog / BK), groups), block (NT, 1, 1) with
//     NT = A*A*TY*TX: thread (xi, ty, tx) owns a TM x TN register block of the transform
//     point xi's GEMM, tiles ((i/4)*TY + ty)*4 + i%4, channels ((j/4)*TX + tx)*4 + j%4
//     (16-byte shared-memory reads).
//   Main loop (wino_mainloop, on fc::cp_async_ring in fc_common.cuh) over the input channels in
//   chunks of BC: a WINO_STAGES (3) deep ring of shared-memory stages filled by cp.async, one
//   barrier per chunk. Each thread copies its (tile, channel) patches element by element (4-byte
//   cp.async, zero-filled outside the image) straight to the places of their transformed values,
//   and its 16-byte vectors of the U tile; once its own copies of a chunk have landed it
//   transforms its patches in place (V = BT d BT^T), the barrier publishes the stage, the slot
//   freed by the previous chunk is refilled two chunks ahead, and the block multiplies. The global
//   loads never wait on the arithmetic and no register holds data in flight. F(4x4) (2*16 patches
//   of 6x6 per chunk for 288 threads) shares each patch among 6 lanes of a warp instead
//   (WinoLoader's SPLIT: a column each, then a row each after a __syncwarp), so that the
//   transforms do not all fall to one warp; winograd_wgrad does the same with its input patches
//   (F(2x2) and F(4x4)).
//   Epilogue in TN/4 passes of 4*TX channels: M goes to shared memory (reusing the ring),
//   then each thread inverse-transforms whole tiles (Y = AT M AT^T), adds the bias and writes
//   the m x m pixels that lie inside the output (wino_store).
//   winograd_conv_tf32<M, BT, BK, WARPS>: same grid for its BT x BK block tile, block
//     (32*WARPS, 1, 1); chunks of 8 channels (one mma k-step) in a 2-stage ring; see the
//     comment above the kernel.
//   winograd_wgrad<M, BR, TY, TX, TM, TN>: grid (ceil(Cg / (TY*TM)), ceil(Kg / (TX*TN)),
//     groups * slices), block (A*A*TY*TX, 1, 1), the same ring over chunks of BR tiles; see
//     the comment above the kernel.
//   Static shared memory: the ring, or the epilogue's staging if larger, at most 48 KiB
//   (launcher tiles: winograd_conv and winograd_wgrad F(2x2) 48 KiB with BC = BR = 4,
//   F(4x4) 40.5 KiB with BC = BR = 2; winograd_conv_tf32 F(2x2) 48 KiB). The 48 KiB static
//   limit is why the chunks are short: three stages of the SIMT kernels' previous chunks
//   (8 and 4) would need 96 and 81 KiB (dynamic shared memory with an opt-in the launcher
//   does not make). Arguments: in, u, bias (or null), out, then N, Ci, Hi, Wi, Co, Ho, Wo, ph,
//   pw, groups (int32). Offsets are 64-bit; tile indices are 32-bit (the launcher splits the
//   batch to keep N * tiles per image below 2^31).
//
// Numerics: every product is one FP32 fused multiply-add, channels summed in ascending order
// in each thread (results repeat bit for bit). Error against the float64 reference (relative
// Frobenius norm, standard-normal data, measured in the host emulation): F(2x2) 2e-7 to 7e-7,
// F(4x4) 6e-7 to 3.4e-6, growing with the reduction length (256- and 512-channel sums: 3.4e-6
// forward, 1.3e-6 input gradient over 32 channels). A float32 NumPy model of the same
// arithmetic agrees (F(2x2) 5.0e-7, F(4x4) 3.6e-6 at 256 channels) and extends it: F(4x4)
// 6.1e-6 at 1024 channels, 9.8e-6 at 2048, 1.6e-5 at 4096; F(2x2) 1.8e-6 at 4096. F(4x4)'s
// points +-2 bring coefficients up to 8 into AT and 1/24 into G; computing the filter
// transform in float64 did not help (3.35e-6), so it stays in float32. Documented bound:
// 1e-5 (the library's float32 tolerance; cuda_winograd.ERROR_BOUND) for F(2x2) on sums of up
// to 8192 terms and F(4x4) on up to 1024, the longest the dispatch rules give them;
// checked by tests/test_cuda_winograd.py. The weight gradient sums over tiles instead of
// channels, with the same growth (emulation, one slice: F(4x4) 3.3e-6 over 256 tiles, 8.9e-6
// over 2048; F(2x2) 9.7e-7 over 1024, 2.7e-6 over 8192); the dispatch rules cut its reduction
// into slices of at most 1024 (F(4x4)) or 8192 (F(2x2)) tiles. float64 never takes this path
// (the direct kernels keep it).
// F(6x6, 3x3) (points 0, +-1, +-2, +-1/2, Cook-Toom matrices; bench/winograd_error.py, a
// float32 model with sequential channel sums that reproduces the emulated F(4x4) 3.40e-6 at
// 256 channels): 4.2e-6 at 64 channels, 6.9e-6 at 256, 1.18e-5 at 1024 (over the 1e-5 bound
// where F(4x4) keeps it), and fewer multiplies than F(4x4) only on large planes (56x56: 4.4x
// vs 4x; 14x14 and 7x7: none), with 64 transform points per tile to stage; so it is not
// provided.
// TF32 (winograd_conv_tf32, F(2x2) only): V and U rounded to TF32 (10-bit mantissa) once,
// products accumulated in fp32 by mma.sync. Host emulation against the float64 reference:
// 3.3e-4 to 5.1e-4 on the shared case list, MULTI and 256/512-channel sums (direct TF32
// implicit GEMM: about 3e-4); documented bound 2e-3 (cuda_winograd.TF32_ERROR_BOUND). The
// model (bench/winograd_error.py --tf32, and other shapes) puts F(4x4)+TF32 at 2.3e-3 to
// 3.4e-3 (its +-2 points amplify the operand rounding; F(6x6)+TF32 6.2e-3 to 6.6e-3): within
// 5e-3 but not offered, also because two 8-channel stages of its 36 points do not fit 48 KiB.
//
// Versions: 1: strict FP32 SIMT transform-point GEMMs; forward and input gradient
// (winograd_conv), weight gradient (winograd_wgrad). 2 (this file): both main loops stream
// their operands through a cp.async ring (wino_mainloop); the filter transform indexes with
// FastDiv; TF32 tensor-core F(2x2) forward / input gradient (winograd_conv_tf32). Not done:
// F(6x6, 3x3) (see Numerics), TF32 F(4x4), TF32 weight gradient (the implicit GEMM keeps it).
//
// Verification status (version 2, no GPU available): compiled by NVRTC 13.5 for sm_80 and
// sm_90 (tests/test_nvrtc.py); ptxas through NVRTC (tests/test_cuda_winograd.py::test_no_spills)
// reports 0 bytes of stack and spills for every instantiation on both; bench/sass_report.py
// --check passes: LDGSTS in the main loop of winograd_conv, winograd_conv_tf32 and
// winograd_wgrad, HMMA in winograd_conv_tf32's, no CALL in any Winograd kernel. Registers
// (sm_80 / sm_90): winograd_conv F(2x2) 128 / 128 (its cap: two 256-thread blocks per SM),
// F(4x4) 126 / 126; winograd_wgrad F(2x2) 128 / 128, F(4x4) 127 / 126; winograd_conv_tf32 98;
// winograd_filter 32. Executed through the host emulation of tests/cuda_emu.h (cp.async with
// poisoned pending destinations, commit/wait groups, the mma fragment layout of the PTX ISA)
// against the NumPy reference (tests/test_cuda_winograd.py). Never run on a GPU: speed is
// unmeasured.

#include "fc_common.cuh"

namespace fc {

// The 1-D transforms of F(m, 3): input (BT, A -> A), filter (G, 3 -> A), output (AT, A -> m),
// written out so that no multiply by 0 or 1 is executed. `d` and `o` are read and written
// with strides SD and SO, so the same code does the rows and the columns of a 2-D transform.
template <int M> struct Wino;

template <> struct Wino<2> {
    static constexpr int A = 4;
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void input(const T* d, T* o) {
        o[0 * SO] = d[0 * SD] - d[2 * SD];
        o[1 * SO] = d[1 * SD] + d[2 * SD];
        o[2 * SO] = d[2 * SD] - d[1 * SD];
        o[3 * SO] = d[1 * SD] - d[3 * SD];
    }
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void filter(const T* g, T* o) {
        const T even = T(0.5) * (g[0] + g[2 * SD]), odd = T(0.5) * g[1 * SD];
        o[0 * SO] = g[0];
        o[1 * SO] = even + odd;
        o[2 * SO] = even - odd;
        o[3 * SO] = g[2 * SD];
    }
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void output(const T* m, T* o) {
        o[0 * SO] = m[0] + m[1 * SD] + m[2 * SD];
        o[1 * SO] = m[1 * SD] - m[2 * SD] - m[3 * SD];
    }
    // Adjoints for the weight gradient: AT^T (m -> A) and G^T (A -> 3).
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void output_t(const T* y, T* o) {
        const T y0 = y[0], y1 = y[SD];
        o[0 * SO] = y0;
        o[1 * SO] = y0 + y1;
        o[2 * SO] = y0 - y1;
        o[3 * SO] = -y1;
    }
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void filter_t(const T* u, T* o) {
        const T s = T(0.5) * (u[SD] + u[2 * SD]);
        o[0 * SO] = u[0] + s;
        o[1 * SO] = T(0.5) * (u[SD] - u[2 * SD]);
        o[2 * SO] = s + u[3 * SD];
    }
};

template <> struct Wino<4> {
    static constexpr int A = 6;
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void input(const T* d, T* o) {
        const T d0 = d[0], d1 = d[SD], d2 = d[2 * SD], d3 = d[3 * SD], d4 = d[4 * SD],
                d5 = d[5 * SD];
        const T a = d4 - T(4) * d2, b = d3 - T(4) * d1;  // rows 1, 2: a -+ b
        const T c = d4 - d2, e = T(2) * (d3 - d1);       // rows 3, 4: c +- e
        o[0 * SO] = T(4) * d0 - T(5) * d2 + d4;
        o[1 * SO] = a + b;
        o[2 * SO] = a - b;
        o[3 * SO] = c + e;
        o[4 * SO] = c - e;
        o[5 * SO] = T(4) * d1 - T(5) * d3 + d5;
    }
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void filter(const T* g, T* o) {
        const T g0 = g[0], g1 = g[SD], g2 = g[2 * SD];
        const T a = T(-1.0 / 6.0) * (g0 + g2), b = T(1.0 / 6.0) * g1;
        const T c = T(1.0 / 24.0) * g0 + T(1.0 / 6.0) * g2, e = T(1.0 / 12.0) * g1;
        o[0 * SO] = T(0.25) * g0;
        o[1 * SO] = a - b;
        o[2 * SO] = a + b;
        o[3 * SO] = c + e;
        o[4 * SO] = c - e;
        o[5 * SO] = g2;
    }
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void output(const T* m, T* o) {
        const T m1 = m[SD], m2 = m[2 * SD], m3 = m[3 * SD], m4 = m[4 * SD];
        const T s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
        o[0 * SO] = m[0] + s12 + s34;
        o[1 * SO] = d12 + T(2) * d34;
        o[2 * SO] = s12 + T(4) * s34;
        o[3 * SO] = d12 + T(8) * d34 + m[5 * SD];
    }
    // Adjoints for the weight gradient: AT^T (m -> A) and G^T (A -> 3).
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void output_t(const T* y, T* o) {
        const T y0 = y[0], y1 = y[SD], y2 = y[2 * SD], y3 = y[3 * SD];
        const T e1 = y0 + y2, o1 = y1 + y3;              // points +-1
        const T e2 = y0 + T(4) * y2, o2 = T(2) * y1 + T(8) * y3;  // points +-2
        o[0 * SO] = y0;
        o[1 * SO] = e1 + o1;
        o[2 * SO] = e1 - o1;
        o[3 * SO] = e2 + o2;
        o[4 * SO] = e2 - o2;
        o[5 * SO] = y3;
    }
    template <int SD, int SO, typename T>
    __device__ __forceinline__ static void filter_t(const T* u, T* o) {
        const T u1 = u[SD], u2 = u[2 * SD], u3 = u[3 * SD], u4 = u[4 * SD];
        const T s12 = T(1.0 / 6.0) * (u1 + u2), s34 = u3 + u4;
        o[0 * SO] = T(0.25) * u[0] - s12 + T(1.0 / 24.0) * s34;
        o[1 * SO] = T(1.0 / 6.0) * (u2 - u1) + T(1.0 / 12.0) * (u3 - u4);
        o[2 * SO] = T(1.0 / 6.0) * s34 - s12 + u[5 * SD];
    }
};

// The 2-D transforms, columns then rows, on row-major arrays: V = BT d BT^T (A x A -> A x A),
// U = G f G^T (3 x 3 -> A x A), Y = AT M AT^T (A x A -> m x m) and the weight gradient's
// adjoints dM = AT^T dy AT (m x m -> A x A), dg = G^T dU G (A x A -> 3 x 3).
template <int M>
struct Wino2D {
    static constexpr int A = M + 2;
    __device__ __forceinline__ static void input(const float* d, float* v) {
        float t[A * A];
#pragma unroll
        for (int b = 0; b < A; ++b) Wino<M>::template input<A, A>(d + b, t + b);
#pragma unroll
        for (int a = 0; a < A; ++a) Wino<M>::template input<1, 1>(t + A * a, v + A * a);
    }
    __device__ __forceinline__ static void filter(const float* f, float* u) {
        float t[A * 3];
#pragma unroll
        for (int s = 0; s < 3; ++s) Wino<M>::template filter<3, 3>(f + s, t + s);
#pragma unroll
        for (int i = 0; i < A; ++i) Wino<M>::template filter<1, 1>(t + 3 * i, u + A * i);
    }
    __device__ __forceinline__ static void output(const float* m, float* y) {
        float t[M * A];
#pragma unroll
        for (int b = 0; b < A; ++b) Wino<M>::template output<A, A>(m + b, t + b);
#pragma unroll
        for (int a = 0; a < M; ++a) Wino<M>::template output<1, 1>(t + A * a, y + M * a);
    }
    __device__ __forceinline__ static void output_t(const float* dy, float* dm) {
        float t[A * M];
#pragma unroll
        for (int b = 0; b < M; ++b) Wino<M>::template output_t<M, M>(dy + b, t + b);
#pragma unroll
        for (int a = 0; a < A; ++a) Wino<M>::template output_t<1, 1>(t + M * a, dm + A * a);
    }
    __device__ __forceinline__ static void filter_t(const float* du, float* dg) {
        float t[3 * A];
#pragma unroll
        for (int b = 0; b < A; ++b) Wino<M>::template filter_t<A, A>(du + b, t + b);
#pragma unroll
        for (int r = 0; r < 3; ++r) Wino<M>::template filter_t<1, 1>(t + A * r, dg + 3 * r);
    }
};

// One transform point's register-blocked GEMM step over R reduction rows: acc[i][j] +=
// a_r[row i] * b_r[column j] with rows of `as` (stride LA) and `bs` (stride LB) in shared
// memory; row i is ((i/4)*TY + ty)*4 + i%4, column j ((j/4)*TX + tx)*4 + j%4 (16-byte reads).
template <int R, int TY, int TX, int TM, int TN, int LA, int LB>
__device__ __forceinline__ void point_gemm(float (&acc)[TM][TN], const float* as, const float* bs,
                                           int ty, int tx) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM / 4; ++i) load16(&a[i * 4], as + r * LA + (i * TY + ty) * 4);
#pragma unroll
        for (int j = 0; j < TN / 4; ++j) load16(&b[j * 4], bs + r * LB + (j * TX + tx) * 4);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fmadd(a[i], b[j], acc[i][j]);
    }
}

// Epilogue pass p: the accumulator columns j = p*4 + v (v < 4) of point xi go to
// ms[(xi*4*TX + tx*4 + v) * ROWS + row i] (16-byte stores along the rows).
template <int TY, int TX, int TM, int TN, int ROWS>
__device__ __forceinline__ void stage_pass(float* ms, const float (&acc)[TM][TN], int p, int xi,
                                           int ty, int tx) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        float* dst = ms + (xi * 4 * TX + tx * 4 + v) * ROWS + ty * 4;
#pragma unroll
        for (int i = 0; i < TM; i += 4) {
            *reinterpret_cast<float4*>(dst + (i / 4) * TY * 4) =
                make_float4(acc[i][p * 4 + v], acc[i + 1][p * 4 + v], acc[i + 2][p * 4 + v],
                            acc[i + 3][p * 4 + v]);
        }
    }
}

enum WinogradMode { WINO_FPROP = 0, WINO_DGRAD = 1 };

// ---------------------------------------------------------------------------------------------
// Filter transform: u[g][xi][c][k] = (G f_{g,c,k} G^T)[xi], once per call; ROUND = 1 (for
// winograd_conv_tf32) rounds U to TF32 (cvt.rna) as it is stored, so the GEMM reads ready
// tensor-core operands. Grid (ceil(Cig*Cogp / 256), groups): one thread per (c, k) of group
// blockIdx.y; c and k come from a FastDiv by Cogp (the launcher's (mul, shift)), so no
// integer-division routine runs.
// ---------------------------------------------------------------------------------------------
template <int M, int MODE, int ROUND>
__global__ void __launch_bounds__(256)
winograd_filter(const float* __restrict__ weight, float* __restrict__ u, int K, int Cg,
                int groups, unsigned mul_cogp, int shift_cogp) {
    constexpr int A = M + 2;
    const FastDiv by_cogp{mul_cogp, shift_cogp};
    const int Kg = K / groups;
    const int cig = MODE == WINO_FPROP ? Cg : Kg;  // reduction channels per group
    const int cog = MODE == WINO_FPROP ? Kg : Cg;  // output channels per group
    const int cogp = (cog + 3) / 4 * 4;            // k padded to whole 16-byte vectors
    const int per_group = cig * cogp;              // < 2^31 (the launcher checks U's size)
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = blockIdx.y;
    if (e >= per_group) return;
    const int c = by_cogp(e), k = e - c * cogp;
    float* dst = u + (long long)g * A * A * per_group + e;
    if (k >= cog) {  // padding: zero filters
#pragma unroll
        for (int xi = 0; xi < A * A; ++xi) dst[(long long)xi * per_group] = 0.0f;
        return;
    }
    // f[r][s] of this (c, k) pair, read from weight (K, Cg, 3, 3).
    float f[9];
    if (MODE == WINO_FPROP) {
        const float* src = weight + ((long long)(g * Kg + k) * Cg + c) * 9;
#pragma unroll
        for (int i = 0; i < 9; ++i) f[i] = src[i];
    } else {
        const float* src = weight + ((long long)(g * Kg + c) * Cg + k) * 9;
#pragma unroll
        for (int i = 0; i < 9; ++i) f[i] = src[8 - i];  // 180-degree rotation
    }
    float v[A * A];
    Wino2D<M>::filter(f, v);
#pragma unroll
    for (int xi = 0; xi < A * A; ++xi)
        dst[(long long)xi * per_group] = ROUND ? to_tf32(v[xi]) : v[xi];
}

// Depth of the cp.async shared-memory ring of winograd_conv and winograd_wgrad.
constexpr int WINO_STAGES = 3;

// ---------------------------------------------------------------------------------------------
// The pipelined main loop of both kernels: fc::cp_async_ring (fc_common.cuh), a STAGES-deep
// ring of shared-memory stages, each holding one chunk of both GEMM operands; stage s starts
// at smem + s * STAGE floats. `fetch(chunk, stage)` issues the copies of a chunk: the raw data
// a thread will transform (input patches, output-gradient tiles) land at the positions of their
// transformed values, so that `transform(stage)` (the ring's per-step hook, run by the thread
// that copied them right after its own copies are known complete, before the barrier)
// rewrites them in place; `compute(stage)` multiplies.
// ---------------------------------------------------------------------------------------------
template <int STAGES, int STAGE, class Fetch, class Transform, class Compute>
__device__ __forceinline__ void wino_mainloop(float* smem, int steps, Fetch&& fetch,
                                              Transform&& transform, Compute&& compute) {
    cp_async_ring<STAGES>(
        steps, [&](int chunk, int slot) { fetch(chunk, smem + slot * STAGE); },
        [&](int slot) { transform(smem + slot * STAGE); },
        [&](int slot) { compute(smem + slot * STAGE); });
}

// Copies one chunk of BC input channels of winograd_conv's operands into a ring stage
// [V: xi][c][tile] [U: xi][c][k] (rows of LDV and LDU floats; the TF32 kernel pads them so
// that its fragment reads hit 32 distinct banks): this thread's (tile, channel) patches, pair
// tid + NT*j being tile (pair % BT) and channel (pair / BT) of every chunk, element by element
// (4-byte cp.async, zero-filled outside the image and past the channels) at their V positions,
// and its 16-byte vectors of the U tile. `transform` turns its own patches of a landed stage
// into V = BT d BT^T in place (rounded to TF32 when ROUND). Everything that does not change
// from chunk to chunk (patch origins, which elements of a patch lie inside the image, the U
// vector's (xi, c, k) position) is decoded once in `init`.
//
// SPLIT: each patch is copied and transformed by A threads of one warp instead of one thread
// (lanes slot*A + part, slot < 32/A): thread `part` copies column `part`, transforms it once
// its own copies have landed, and after a __syncwarp transforms row `part` (the same
// operations in the same order as Wino2D::input). For F(4x4), whose 2*16 patches per chunk
// would otherwise all fall to one warp of nine, with 6x6 transforms.
template <int M, int BC, int BT, int BK, int NT, int LDV = BT, int LDU = BK, bool ROUND = false,
          bool SPLIT = false>
struct WinoLoader {
    static constexpr int A = M + 2, AA = A * A, V = 4;
    static constexpr int SV = AA * BC * LDV, SU = AA * BC * LDU;  // floats of V and U per stage
    static constexpr int PATCHES = BT * BC;
    static constexpr int PW = 32 / A, NW = NT / 32;  // SPLIT: patches per warp, warps
    static constexpr int SLOTS = SPLIT ? NW * PW : NT;  // patches per round of the block
    static constexpr int PPT = (PATCHES + SLOTS - 1) / SLOTS;
    static_assert(NT % 32 == 0, "WinoLoader: whole warps");
    // U tile [xi][c][k] in 16-byte vectors: thread tid takes vectors tid + NT*j, which all
    // share (c, k) and step xi by XI_STEP.
    static constexpr int UVEC = AA * BC * BK / V, UPT = UVEC / NT, XI_STEP = NT * V / (BC * BK);
    static_assert(BK % V == 0 && UVEC % NT == 0 && (NT * V) % (BC * BK) == 0,
                  "WinoLoader: the U tile does not split evenly into 16-byte vectors");
    static_assert(LDV >= BT && LDU >= BK && LDU % V == 0, "WinoLoader: row strides");

    long long poff[PPT];   // offset of (n, channel g*Cig + c, py, px) in `in` (may be
                           // negative)
    unsigned long long pin[PPT];  // bit a*A + b: patch element (a, b) inside the image (SPLIT:
                                  // bit a: element (a, part)); 0 for tiles past the end (zero
                                  // patches) and unused pairs
    const float* up;       // U vector of chunk 0 (xi0, c, k)
    long long ustep;       // distance between the xi of consecutive vectors of this thread
    int uc, tid;
    bool kvalid;           // this thread's k vector lies inside the (padded) output channels

    // Patch (pair) of round j of this thread, and whether there is one; SPLIT: column `part`.
    __device__ __forceinline__ int pair_of(int j) const {
        return SPLIT ? (tid / 32 + NW * j) * PW + tid % 32 / A : tid + NT * j;
    }
    __device__ __forceinline__ bool has_pair(int j) const {
        return (!SPLIT || tid % 32 / A < PW) && pair_of(j) < PATCHES;
    }
    __device__ __forceinline__ int part() const { return tid % 32 % A; }

    __device__ __forceinline__ void init(int tid_, int g, int t0, int k0, int Ci, int Hi,
                                         int Wi, int cig, int cogp, int tiles, int tiles_img,
                                         int tiles_w, int ph, int pw, const float* u) {
        tid = tid_;
        const long long in_plane = (long long)Hi * Wi;
#pragma unroll
        for (int j = 0; j < PPT; ++j) {
            const int pair = pair_of(j);
            const int t = t0 + pair % BT;
            poff[j] = 0;
            pin[j] = 0;
            if (has_pair(j) && t < tiles) {
                const int n = t / tiles_img, r = t - n * tiles_img;
                const int th = r / tiles_w, tw = r - th * tiles_w;
                const int py = th * M - ph, px = tw * M - pw;
                poff[j] = ((long long)n * Ci + (long long)g * cig + pair / BT) * in_plane
                          + (long long)py * Wi + px;
#pragma unroll
                for (int a = 0; a < A; ++a) {
                    if constexpr (SPLIT) {
                        if ((unsigned)(py + a) < (unsigned)Hi
                            && (unsigned)(px + part()) < (unsigned)Wi)
                            pin[j] |= 1ull << a;
                    } else {
#pragma unroll
                        for (int b = 0; b < A; ++b)
                            if ((unsigned)(py + a) < (unsigned)Hi
                                && (unsigned)(px + b) < (unsigned)Wi)
                                pin[j] |= 1ull << (a * A + b);
                    }
                }
            }
        }
        const int e = tid * V;  // first element of this thread's first vector
        const int kk = e % BK, cc = (e / BK) % BC, xi = e / (BK * BC);
        uc = cc;
        ustep = (long long)XI_STEP * cig * cogp;
        up = u + (((long long)g * AA + xi) * cig + cc) * cogp + k0 + kk;
        kvalid = k0 + kk < cogp;
    }

    // Where patch `pair` (channel pair / BT, tile pair % BT) starts in a stage.
    __device__ __forceinline__ static int place(int pair) {
        return LDV == BT ? pair : (pair / BT) * LDV + pair % BT;
    }

    // Issue the copies of chunk c0 into the stage at `st` (V, then U).
    __device__ __forceinline__ void fetch(const float* __restrict__ in, int c0, int cig,
                                          long long in_plane, int Wi, int cogp, float* st) const {
#pragma unroll
        for (int j = 0; j < PPT; ++j) {
            const int pair = pair_of(j);
            if (!has_pair(j)) continue;
            // Outside the image (or past the channels) nothing is read and zeros land: the
            // address is then never dereferenced (cp.async with src-size 0).
            const unsigned long long live = c0 + pair / BT < cig ? pin[j] : 0ull;
            const float* src = in + poff[j] + (long long)c0 * in_plane;
            float* dst = st + place(pair);  // (c, tile) = (pair / BT, pair % BT)
            if constexpr (SPLIT) {  // column part()
#pragma unroll
                for (int a = 0; a < A; ++a) {
                    cp_async_n<4>(dst + (a * A + part()) * BC * LDV,
                                  src + (long long)a * Wi + part(), (int)((live >> a) & 1u) * 4);
                }
            } else {
#pragma unroll
                for (int a = 0; a < A; ++a) {
                    const float* row = src + (long long)a * Wi;
#pragma unroll
                    for (int b = 0; b < A; ++b) {
                        const int q = a * A + b;
                        const int bytes = q >= 2 ? (int)(live >> (q - 2)) & 4
                                                 : (int)(live << (2 - q)) & 4;
                        cp_async_n<4>(dst + q * BC * LDV, row + b, bytes);
                    }
                }
            }
        }
        const int bytes = kvalid && c0 + uc < cig ? 16 : 0;
        const float* src = up + (long long)c0 * cogp;
        const int udst = LDU == BK ? tid * V  // (xi, c, k) of vector tid
                                   : (tid * V / BK) * LDU + tid * V % BK;
#pragma unroll
        for (int j = 0; j < UPT; ++j) {  // vector tid + NT*j: (xi + j*XI_STEP, c, k)
            cp_async_n<16>(st + SV + udst + j * XI_STEP * BC * LDU, src + j * ustep, bytes);
        }
    }

    // V = BT d BT^T of this thread's patches of a landed stage, in place.
    __device__ __forceinline__ void transform(float* st) const {
        constexpr int S = BC * LDV;  // distance between transform points in a stage
#pragma unroll
        for (int j = 0; j < PPT; ++j) {
            float* p = st + place(pair_of(j));
            if constexpr (SPLIT) {  // every lane of the warp reaches the __syncwarp
                float d[A], o[A];
                if (has_pair(j)) {  // column part(): its own copies
#pragma unroll
                    for (int a = 0; a < A; ++a) d[a] = p[(a * A + part()) * S];
                    Wino<M>::template input<1, 1>(d, o);
#pragma unroll
                    for (int a = 0; a < A; ++a) p[(a * A + part()) * S] = o[a];
                }
                __syncwarp();
                if (has_pair(j)) {  // row part(): the columns of the other lanes
#pragma unroll
                    for (int b = 0; b < A; ++b) d[b] = p[(part() * A + b) * S];
                    Wino<M>::template input<1, 1>(d, o);
#pragma unroll
                    for (int b = 0; b < A; ++b)
                        p[(part() * A + b) * S] = ROUND ? to_tf32(o[b]) : o[b];
                }
            } else if (has_pair(j)) {
                float d[AA], v[AA];
#pragma unroll
                for (int q = 0; q < AA; ++q) d[q] = p[q * S];
                Wino2D<M>::input(d, v);
#pragma unroll
                for (int q = 0; q < AA; ++q) p[q * S] = ROUND ? to_tf32(v[q]) : v[q];
            }
        }
    }
};

// Epilogue of winograd_conv and winograd_conv_tf32: the transform-point results of KP output
// channels kb.. (within the group) staged as ms[(xi*KP + k)*BT + tile] are inverse-transformed
// (Y = AT M AT^T) tile by tile, the bias added, and the m x m pixels that lie inside the output
// written.
template <int M, int BT, int KP, int NT>
__device__ __forceinline__ void wino_store(const float* ms, float* __restrict__ out,
                                           const float* __restrict__ bias, int tid, int t0,
                                           int kb, int g, int cog, int Co, int Ho, int Wo,
                                           int tiles, int tiles_img, int tiles_w) {
    constexpr int AA = (M + 2) * (M + 2);
    const long long out_plane = (long long)Ho * Wo;
    for (int e = tid; e < KP * BT; e += NT) {
        const int tl = e % BT, kq = e / BT;
        const int t = t0 + tl, k = kb + kq;
        if (t >= tiles || k >= cog) continue;
        float mv[AA], y[M * M];
#pragma unroll
        for (int q = 0; q < AA; ++q) mv[q] = ms[(q * KP + kq) * BT + tl];
        Wino2D<M>::output(mv, y);
        const float bk = bias != nullptr ? bias[g * cog + k] : 0.0f;
        const int n = t / tiles_img, r = t - n * tiles_img;
        const int th = r / tiles_w, tw = r - th * tiles_w;
        float* dst = out + ((long long)n * Co + (long long)g * cog + k) * out_plane;
#pragma unroll
        for (int a = 0; a < M; ++a) {
            const int oy = th * M + a;
#pragma unroll
            for (int b = 0; b < M; ++b) {
                const int ox = tw * M + b;
                if (oy < Ho && ox < Wo) dst[(long long)oy * Wo + ox] = y[a * M + b] + bk;
            }
        }
    }
}

// What winograd_conv and winograd_conv_tf32 derive from their arguments and the block index:
// group g, channels per group (cig in, cog out, cogp = cog padded to whole 16-byte vectors as
// U's k axis is), the tile grid, the block's first tile t0 and output channel k0.
#define WINO_CONV_BLOCK(M, BT, BK)                                                           \
    const int g = blockIdx.z;                                                                \
    const int cig = Ci / groups, cog = Co / groups, cogp = (cog + 3) / 4 * 4;                \
    const int tiles_w = (Wo + (M) - 1) / (M), tiles_img = ((Ho + (M) - 1) / (M)) * tiles_w;  \
    const int tiles = N * tiles_img;                                                         \
    const int t0 = blockIdx.x * (BT), k0 = blockIdx.y * (BK);                                \
    const long long in_plane = (long long)Hi * Wi

// ---------------------------------------------------------------------------------------------
// Fused kernel: input transform into shared memory, transform-point GEMMs, inverse transform
// and bias in the epilogue.
// ---------------------------------------------------------------------------------------------
template <int M, int BC, int TY, int TX, int TM, int TN>
__global__ void __launch_bounds__((M + 2) * (M + 2) * TY * TX,
                                  (M + 2) * (M + 2) * TY * TX <= 256 ? 2 : 1)
winograd_conv(const float* __restrict__ in, const float* __restrict__ u,
              const float* __restrict__ bias, float* __restrict__ out, int N, int Ci, int Hi,
              int Wi, int Co, int Ho, int Wo, int ph, int pw, int groups) {
    constexpr int A = M + 2, AA = A * A, V = 4;
    constexpr int BT = TY * TM, BK = TX * TN, NT = AA * TY * TX;
    constexpr int KP = TX * V;                  // output channels per epilogue pass
    using Loader = WinoLoader<M, BC, BT, BK, NT, BT, BK, false, M == 4>;
    constexpr int STAGE = Loader::SV + Loader::SU, SMO = AA * KP * BT;
    constexpr int SMEM = WINO_STAGES * STAGE > SMO ? WINO_STAGES * STAGE : SMO;
    static_assert(TM % V == 0 && TN % V == 0, "winograd_conv: TM and TN must be multiples of 4");
    __shared__ __align__(16) float smem[SMEM];  // ring stages [V: xi][c][tile] [U: xi][c][k]
    float* const Ms = smem;                     // epilogue: [xi][k][tile]

    const int tid = threadIdx.x;
    WINO_CONV_BLOCK(M, BT, BK);
    Loader ld;
    ld.init(tid, g, t0, k0, Ci, Hi, Wi, cig, cogp, tiles, tiles_img, tiles_w, ph, pw, u);

    const int xi = tid / (TY * TX);
    const int ty = tid % TY, tx = (tid / TY) % TX;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    wino_mainloop<WINO_STAGES, STAGE>(
        smem, (cig + BC - 1) / BC,
        [&](int step, float* st) { ld.fetch(in, step * BC, cig, in_plane, Wi, cogp, st); },
        [&](float* st) { ld.transform(st); },
        [&](const float* st) {
            point_gemm<BC, TY, TX, TM, TN, BT, BK>(acc, st + xi * BC * BT,
                                                   st + Loader::SV + xi * BC * BK, ty, tx);
        });

    // Epilogue, pass p: channels k0 + p*KP + (tx*V + v) for the registers j = p*V + v.
#pragma unroll
    for (int p = 0; p < TN / V; ++p) {
        __syncthreads();  // the main loop (or the previous pass) is done with shared memory
        stage_pass<TY, TX, TM, TN, BT>(Ms, acc, p, xi, ty, tx);
        __syncthreads();
        wino_store<M, BT, KP, NT>(Ms, out, bias, tid, t0, k0 + p * KP, g, cog, Co, Ho, Wo,
                                  tiles, tiles_img, tiles_w);
    }
}

// Depth of winograd_conv_tf32's cp.async ring.
constexpr int WINO_TF32_STAGES = 2;

// ---------------------------------------------------------------------------------------------
// TF32 tensor-core variant of winograd_conv (same arguments, same launch grid): the
// transform-point GEMMs run on mma.sync.m16n8k8 (TF32 operands, fp32 accumulation), chunks of
// BC = 8 channels (one k-step). V is rounded to TF32 (cvt.rna) by the thread that transforms
// it, as it is stored to shared memory; U comes rounded from winograd_filter<M, MODE, 1>.
// Block tile BT tiles x BK output channels per point, WARPS warps, warp w owning the points
// w*AA/WARPS .. (w+1)*AA/WARPS - 1, each as (BT/16) x (BK/8) mma tiles. The stage rows are
// padded to LDV = BT + 8 and LDU = BK + 8 floats: fragment element (row t, column g) of lane
// 4g + t then sits in bank (t*LD + g) % 32, all 32 distinct.
// ---------------------------------------------------------------------------------------------
template <int M, int BT, int BK, int WARPS>
__global__ void __launch_bounds__(32 * WARPS)
winograd_conv_tf32(const float* __restrict__ in, const float* __restrict__ u,
                   const float* __restrict__ bias, float* __restrict__ out, int N, int Ci,
                   int Hi, int Wi, int Co, int Ho, int Wo, int ph, int pw, int groups) {
    constexpr int A = M + 2, AA = A * A, BC = 8, NT = 32 * WARPS;
    constexpr int LDV = BT + 8, LDU = BK + 8;
    constexpr int PPW = AA / WARPS, MT = BT / 16, NTL = BK / 8;
    static_assert(AA % WARPS == 0 && BT % 16 == 0 && BK % 8 == 0,
                  "winograd_conv_tf32: whole points per warp, whole mma tiles per point");
    static_assert(LDV % 32 == 8 || LDV % 32 == 24, "winograd_conv_tf32: LDV bank layout");
    static_assert(LDU % 32 == 8 || LDU % 32 == 24, "winograd_conv_tf32: LDU bank layout");
    using Loader = WinoLoader<M, BC, BT, BK, NT, LDV, LDU, true>;
    constexpr int STAGE = Loader::SV + Loader::SU, SMO = AA * BK * BT;
    constexpr int SMEM = WINO_TF32_STAGES * STAGE > SMO ? WINO_TF32_STAGES * STAGE : SMO;
    __shared__ __align__(16) float smem[SMEM];  // ring stages [V: xi][c][LDV] [U: xi][c][LDU]
    float* const Ms = smem;                     // epilogue: [xi][k][tile]

    const int tid = threadIdx.x;
    WINO_CONV_BLOCK(M, BT, BK);
    Loader ld;
    ld.init(tid, g, t0, k0, Ci, Hi, Wi, cig, cogp, tiles, tiles_img, tiles_w, ph, pw, u);

    const int warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
    float acc[PPW][MT][NTL][4];
#pragma unroll
    for (int p = 0; p < PPW; ++p)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NTL; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[p][i][j][v] = 0.0f;

    wino_mainloop<WINO_TF32_STAGES, STAGE>(
        smem, (cig + BC - 1) / BC,
        [&](int step, float* st) { ld.fetch(in, step * BC, cig, in_plane, Wi, cogp, st); },
        [&](float* st) { ld.transform(st); },
        [&](const float* st) {
#pragma unroll
            for (int p = 0; p < PPW; ++p) {
                const int xi = warp * PPW + p;
                const float* vs = st + xi * BC * LDV + tq * LDV + gq;  // A = V[xi] (tile, c)
                const float* us = st + Loader::SV + xi * BC * LDU + tq * LDU + gq;  // B = U[xi]
                unsigned a[MT][4], b[NTL][2];
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    a[i][0] = __float_as_uint(vs[i * 16]);
                    a[i][1] = __float_as_uint(vs[i * 16 + 8]);
                    a[i][2] = __float_as_uint(vs[4 * LDV + i * 16]);
                    a[i][3] = __float_as_uint(vs[4 * LDV + i * 16 + 8]);
                }
#pragma unroll
                for (int j = 0; j < NTL; ++j) {
                    b[j][0] = __float_as_uint(us[j * 8]);
                    b[j][1] = __float_as_uint(us[4 * LDU + j * 8]);
                }
#pragma unroll
                for (int i = 0; i < MT; ++i)
#pragma unroll
                    for (int j = 0; j < NTL; ++j) mma_tf32_16x8x8(acc[p][i][j], a[i], b[j]);
            }
        });

    // Epilogue: M (tile, k) of every point to shared memory, then wino_store in one pass.
    __syncthreads();  // the main loop is done with shared memory
#pragma unroll
    for (int p = 0; p < PPW; ++p) {
        const int xi = warp * PPW + p;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NTL; ++j) {
                const int t = i * 16 + gq, k = j * 8 + 2 * tq;
                float* ms = Ms + (xi * BK + k) * BT + t;
                ms[0] = acc[p][i][j][0];
                ms[BT] = acc[p][i][j][1];
                ms[8] = acc[p][i][j][2];
                ms[BT + 8] = acc[p][i][j][3];
            }
    }
    __syncthreads();
    wino_store<M, BT, BK, NT>(Ms, out, bias, tid, t0, k0, g, cog, Co, Ho, Wo, tiles, tiles_img,
                              tiles_w);
}


// ---------------------------------------------------------------------------------------------
// Weight gradient: the adjoint of the forward formula. With dM = AT^T dy AT (the output
// gradient of a tile taken to the transform points) and V = BT d BT^T (the input patch),
//     dU[xi](c, k) = sum_tiles V[xi](tile, c) * dM[xi](tile, k),    grad_weight = G^T dU G.
// Block: BC = TY*TM channels by BK = TX*TN filters of one group, over the tiles
// [slice * t_split, (slice + 1) * t_split) in chunks of BR tiles; thread (xi, ty, tx) owns a
// TM x TN block of dU[xi]. Each slice writes its partial grad_weight at out + slice * K*Cg*9
// (the launcher sums the slices in a fixed order).
// Main loop: wino_mainloop over ring stages [V: xi][tile][c] [W: xi][tile][k]. Input patch
// (tile tb + pair / BC, channel c0 + pair % BC) lands element by element at its V positions;
// output-gradient tile (tile tb + pair / BK, filter k0 + pair % BK) lands in the first M*M
// transform points of its W column and is expanded to dM in place. The threads that copy
// (and transform) output-gradient tiles are those after the input patches' (pair index
// rotated by XP), so the transforms spread over the block.
// ---------------------------------------------------------------------------------------------
template <int M, int BR, int TY, int TX, int TM, int TN>
__global__ void __launch_bounds__((M + 2) * (M + 2) * TY * TX,
                                  (M + 2) * (M + 2) * TY * TX <= 256 ? 2 : 1)
winograd_wgrad(const float* __restrict__ x, const float* __restrict__ grad_output,
               float* __restrict__ out, int N, int C, int H, int W, int K, int P, int Q,
               int pt, int pl, int groups, int t_split, unsigned mul_img, int shift_img,
               unsigned mul_w, int shift_w) {
    constexpr int A = M + 2, AA = A * A, V = 4;
    constexpr int BC = TY * TM, BK = TX * TN, NT = AA * TY * TX;
    // Each input patch is copied and transformed by A lanes of one warp (column pass,
    // __syncwarp, row pass; see WinoLoader's SPLIT), PW patches per warp, in XPT rounds.
    constexpr int PW = 32 / A, NW = NT / 32;
    constexpr int XP = BR * BC;                             // input patches per chunk
    constexpr int XPT = (XP + NW * PW - 1) / (NW * PW);
    constexpr int XBUSY = (XP + PW - 1) / PW * 32 < NT ? (XP + PW - 1) / PW * 32 : NT;
    constexpr int YP = BR * BK, YPT = (YP + NT - 1) / NT;  // output-gradient tiles per chunk
    constexpr int KP = TX * V;                              // filters per epilogue pass
    constexpr int SV = AA * BR * BC, SW = AA * BR * BK, SMO = AA * KP * BC;
    constexpr int STAGE = SV + SW;
    constexpr int SMEM = WINO_STAGES * STAGE > SMO ? WINO_STAGES * STAGE : SMO;
    static_assert(TM % V == 0 && TN % V == 0, "winograd_wgrad: TM and TN must be multiples of 4");
    __shared__ __align__(16) float smem[SMEM];  // ring stages [V: xi][tile][c] [W: xi][tile][k]
    float* const Ms = smem;                     // epilogue: [xi][k][c]

    const int tid = threadIdx.x;
    const int ytid = (tid + NT - XBUSY) % NT;  // pair index of the output-gradient tiles
    const int xpart = tid % 32 % A;              // this lane's column and row of its patches
    // Input patch (pair) of round j of this thread, and whether there is one.
    const auto xpair = [&](int j) { return (tid / 32 + NW * j) * PW + tid % 32 / A; };
    const auto xhas = [&](int j) { return tid % 32 / A < PW && xpair(j) < XP; };
    const int g = blockIdx.z % groups, slice = blockIdx.z / groups;
    const int Cg = C / groups, Kg = K / groups;
    const int c0 = blockIdx.x * BC, k0 = blockIdx.y * BK;
    const int tiles_w = (Q + M - 1) / M, tiles_img = ((P + M - 1) / M) * tiles_w;
    const FastDiv by_img{mul_img, shift_img}, by_w{mul_w, shift_w};  // tiles_img, tiles_w
    const int t_begin = slice * t_split;
    const int t_end = min(N * tiles_img, t_begin + t_split);
    const long long xplane = (long long)H * W, yplane = (long long)P * Q;

    const int xi = tid / (TY * TX);
    const int ty = tid % TY, tx = (tid / TY) % TX;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    // A thread's patches keep their channel (filter) and place in the chunk from chunk to
    // chunk: their channel planes of image 0 are found once (clamped to a real channel; `xok`,
    // `yok` bit j: the channel exists).
    const float* xsrc[XPT];
    const float* ysrc[YPT];
    unsigned xok = 0, yok = 0;
#pragma unroll
    for (int j = 0; j < XPT; ++j) {
        const int c = c0 + xpair(j) % BC;
        xsrc[j] = x + ((long long)g * Cg + min(c, Cg - 1)) * xplane;
        if (c < Cg) xok |= 1u << j;
    }
#pragma unroll
    for (int j = 0; j < YPT; ++j) {
        const int k = k0 + (ytid + NT * j) % BK;
        ysrc[j] = grad_output + ((long long)g * Kg + min(k, Kg - 1)) * yplane;
        if (k < Kg) yok |= 1u << j;
    }
    // An output-gradient element outside the plane: F(2x2) passes a valid address for it (at
    // its 128-register cap the bare address kept more registers live and ptxas spilled on
    // sm_90); F(4x4) has registers to spare and saves the select.
    constexpr bool SELECT = M == 2;
    const auto fetch = [&](int step, float* st) {
        const int tb = t_begin + step * BR;
#pragma unroll
        for (int j = 0; j < XPT; ++j) {
            const int pair = xpair(j);
            if (!xhas(j)) continue;
            const int t = tb + pair / BC;
            const bool ok = t < t_end && ((xok >> j) & 1u);
            int y0 = -A, x0 = 0;  // a tile past the end: every row outside the plane
            long long off = 0;    // of (n, y0, x0) from the channel plane xsrc[j]
            if (ok) {
                const int n = by_img(t), r = t - n * tiles_img, th = by_w(r);
                y0 = th * M - pt;
                x0 = (r - th * tiles_w) * M - pl;
                off = (long long)n * C * xplane + (long long)y0 * W + x0;
            }
            const float* src = xsrc[j] + off;
            float* dst = st + pair;  // (tile, c) = (pair / BC, pair % BC)
#pragma unroll
            for (int a = 0; a < A; ++a) {
                const float* row = src + (long long)a * W;
                const bool oky = (unsigned)(y0 + a) < (unsigned)H;
                const bool inside = oky && (unsigned)(x0 + xpart) < (unsigned)W;  // column xpart
                cp_async_n<4>(dst + (a * A + xpart) * BR * BC, row + xpart, inside ? 4 : 0);
            }
        }
#pragma unroll
        for (int j = 0; j < YPT; ++j) {
            const int pair = ytid + NT * j;
            if (YP % NT != 0 && pair >= YP) continue;
            const int t = tb + pair / BK;
            const bool ok = t < t_end && ((yok >> j) & 1u);
            int y0 = P, x0 = 0;  // a tile past the end: every row outside the plane
            long long off = 0;   // of (n, y0, x0) from the filter plane ysrc[j]
            if (ok) {
                const int n = by_img(t), r = t - n * tiles_img, th = by_w(r);
                y0 = th * M;
                x0 = (r - th * tiles_w) * M;
                off = (long long)n * K * yplane + (long long)y0 * Q + x0;
            }
            const float* src = ysrc[j] + off;
            float* dst = st + SV + pair;  // (tile, k) = (pair / BK, pair % BK)
#pragma unroll
            for (int a = 0; a < M; ++a) {
                const float* row = src + (long long)a * Q;
                const bool oky = y0 + a < P;
#pragma unroll
                for (int b = 0; b < M; ++b) {
                    const bool inside = oky && x0 + b < Q;
                    float* const to = dst + (a * M + b) * BR * BK;
                    if constexpr (SELECT)
                        cp_async<4>(to, inside ? row + b : grad_output, inside);
                    else
                        cp_async_n<4>(to, row + b, inside ? 4 : 0);
                }
            }
        }
    };
    const auto transform = [&](float* st) {
#pragma unroll
        for (int j = 0; j < XPT; ++j) {
            constexpr int S = BR * BC;  // distance between transform points
            float* p = st + xpair(j);
            float d[A], o[A];  // every lane of the warp reaches the __syncwarp
            if (xhas(j)) {     // column xpart: its own copies
#pragma unroll
                for (int a = 0; a < A; ++a) d[a] = p[(a * A + xpart) * S];
                Wino<M>::template input<1, 1>(d, o);
#pragma unroll
                for (int a = 0; a < A; ++a) p[(a * A + xpart) * S] = o[a];
            }
            __syncwarp();
            if (xhas(j)) {  // row xpart: the columns of the other lanes
#pragma unroll
                for (int b = 0; b < A; ++b) d[b] = p[(xpart * A + b) * S];
                Wino<M>::template input<1, 1>(d, o);
#pragma unroll
                for (int b = 0; b < A; ++b) p[(xpart * A + b) * S] = o[b];
            }
        }
#pragma unroll
        for (int j = 0; j < YPT; ++j) {
            const int pair = ytid + NT * j;
            if (YP % NT != 0 && pair >= YP) continue;
            float* p = st + SV + pair;
            float dy[M * M], v[AA];
#pragma unroll
            for (int q = 0; q < M * M; ++q) dy[q] = p[q * BR * BK];
            Wino2D<M>::output_t(dy, v);
#pragma unroll
            for (int q = 0; q < AA; ++q) p[q * BR * BK] = v[q];
        }
    };
    wino_mainloop<WINO_STAGES, STAGE>(
        smem, (t_end - t_begin + BR - 1) / BR, fetch, transform, [&](const float* st) {
            point_gemm<BR, TY, TX, TM, TN, BC, BK>(acc, st + xi * BR * BC,
                                                   st + SV + xi * BR * BK, ty, tx);
        });

    // Epilogue, pass p: filters k0 + p*KP + (tx*V + v) for the registers j = p*V + v.
    float* const dst0 = out + (long long)slice * K * Cg * 9;
#pragma unroll
    for (int p = 0; p < TN / V; ++p) {
        __syncthreads();  // the main loop (or the previous pass) is done with shared memory
        stage_pass<TY, TX, TM, TN, BC>(Ms, acc, p, xi, ty, tx);
        __syncthreads();
        for (int e = tid; e < KP * BC; e += NT) {
            const int cl = e % BC, kq = e / BC;
            const int c = c0 + cl, k = k0 + p * KP + kq;
            if (c >= Cg || k >= Kg) continue;
            float mv[AA], gw[9];
#pragma unroll
            for (int q = 0; q < AA; ++q) mv[q] = Ms[(q * KP + kq) * BC + cl];
            Wino2D<M>::filter_t(mv, gw);
            float* dst = dst0 + ((long long)(g * Kg + k) * Cg + c) * 9;
#pragma unroll
            for (int q = 0; q < 9; ++q) dst[q] = gw[q];
        }
    }
}

}  // namespace fc
