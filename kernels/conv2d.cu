// conv2d.cu -- implicit-GEMM 2-D convolution: forward, input gradient and weight gradient.
//
// Layout
//   x (N, C, H, W), weight (K, C/groups, R, S), y and grad_output (N, K, P, Q), all
//   C-contiguous, one float type T (float or double). Cross-correlation, PyTorch semantics:
//     y[n, k, p, q] = bias[k] + sum_{c, r, s} x[n, g*Cg + c, p*sh - pt + r*dh, q*sw - pl + s*dw]
//                                            * weight[k, c, r, s]      (g = k / Kg)
//   with Cg = C / groups, Kg = K / groups. Bottom/right padding is implied by P and Q.
//
// One GEMM per group (blockIdx.z), never materialised: tiles of the virtual matrices are
// gathered from the tensors straight into shared memory (zero where the window leaves the
// image), then multiplied from shared memory with register blocking.
//   mode    GEMM M (rows)   GEMM N (cols)   reduction        A (red. x M)   B (red. x N)
//   FPROP   N*P*Q pixels    Kg filters      Cg*R*S taps      x windows      weight
//   DGRAD   N*H*W pixels    Cg channels     Kg*R*S taps      grad_output    weight
//   WGRAD   Kg filters      Cg*R*S taps     N*P*Q pixels     grad_output    x windows
// DGRAD is the correlation of the stride-dilated, padded grad_output with the 180-degree
// rotated, channel-swapped kernel (lecture notes 7.5) without building either: the tap
// (k, r, s) of input pixel (h, w) reads grad_output[n, k, (h + pt - r*dh)/sh, (w + pl - s*dw)/sw]
// when both divisions are exact and in range, which is where the zero-inserted copy would hold
// a real value.
// Reduction slices: the reduction may be cut into gridDim.z / groups slices of `k_split` steps
// (always for a long WGRAD reduction; for FPROP/DGRAD when the GEMM has too few tiles to fill
// the device). Slice z writes its own partial result at out + z * (size of the result), bias
// in slice 0 only, and the launcher sums the slices in a fixed order (no atomics, so results
// repeat bit for bit). With one slice, out is the result itself.
//
// Launch geometry (kernels/cuda_conv.py computes it)
//   grid  = (ceil(M / BM), ceil(N_gemm / BN), groups * splits), block = (threads, 1, 1)
//   conv_simt: threads = (BM/TM) * (BN/TN); each thread owns a TM x TN block of the output
//     tile, spread in 16-byte vectors so shared-memory reads are vector loads: row i of a
//     thread is m = (i / V) * (BM/TM) * V + ty * V + i % V (V = 4 floats or 2 doubles), with
//     ty fastest across a warp so the epilogue's 16-byte stores run along the pixels.
//   conv_tf32: threads = 32 * WARPS_M * WARPS_N; warp (wm, wn) owns a (BM/WARPS_M) x
//     (BN/WARPS_N) sub-tile made of 16x8 mma.sync tiles.
//   Static shared memory: two stages of (BK x (BM + PAD)) + (BK x (BN + PAD)) elements; the
//   next tile is fetched into registers while the current one is multiplied (one barrier per
//   BK step). At most 128 registers per thread (two 256-thread blocks per SM).
//   Arguments: a, b, bias (or null), out, then N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh,
//   dw, groups, k_split (int32), then (mul, shift) of the divisors R*S, S, P*Q, Q, output
//   plane, sh, sw (uint32, int32; see FastDiv).
//
// Variants (template parameters; the launcher requests only the instantiations it lists)
//   conv_simt<T, MODE, BM, BN, BK, TM, TN>: strict FP32 / FP64, one fused multiply-add per
//     product, the reduction in the order of the tiles.
//   conv_tf32<MODE, BM, BN, BK, WARPS_M, WARPS_N>: opt-in TF32 tensor cores (sm_80+): operands
//     rounded to TF32 when stored to shared memory, fp32 accumulation. About 1e-3 relative error.
//
// Index arithmetic: tensor offsets are 64-bit (a tensor may exceed 2^31 elements); GEMM row
// and reduction indices are 32-bit, which holds because the launcher splits the batch so that
// N*P*Q and N*H*W stay below 2^31.
//
// Verification status (when this was written): compiled by NVRTC for sm_80 and sm_90 in CI
// (tests/test_nvrtc.py); ptxas (nvcc 13.0) reports 77-128 registers and no spills for every
// instantiation the launcher requests, for sm_80 and sm_90 (DGRAD float 128x128 spilled on
// sm_90 and is not requested: cuda_conv.SIMT_EXCLUDED). Executed on the CPU through a host
// emulation of the CUDA execution model (tests/test_cuda_emulated.py:
// blocks, threads, barriers, warp shuffles, the mma fragment layout as the PTX ISA documents
// it) against the NumPy reference, for every tile and mode. Not yet run on a GPU: speed and
// the hardware's own mma.sync layout are unverified; bench/device_check.sh runs the GPU tests
// and benchmark.

#include "fc_common.cuh"

namespace fc {

enum Mode { FPROP = 0, DGRAD = 1, WGRAD = 2 };

// Coordinate of rows past the end: adding any kernel offset keeps it negative, so the ordinary
// bounds checks reject it.
constexpr int FAR = -(1 << 30);

// Division of 0 <= n < 2^31 by a run-time divisor d >= 1 as a multiply and a shift
// (Granlund & Montgomery, round-up method): n / d == (n * mul) >> shift with
// shift = 31 + ceil(log2 d) and mul = ceil(2^shift / d) < 2^32, computed by the launcher
// (kernels/cuda_conv.py, fast_divisor). Kernel parameters live in the constant bank, so this
// costs no registers and about three instructions instead of an integer-division sequence.
struct FastDiv {
    unsigned mul;
    int shift;

    __device__ __forceinline__ int operator()(int n) const {
        return (int)(((unsigned long long)(unsigned)n * mul) >> shift);
    }
};

struct ConvShape {
    int N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh, dw, groups;
    // Divisors of the index arithmetic: R*S, S, P*Q, Q, the output pixel plane (P*Q for FPROP,
    // H*W for DGRAD), sh and sw.
    FastDiv by_rs, by_s, by_pq, by_q, by_plane, by_sh, by_sw;
};

// The divisor parameters every conv kernel takes after k_split, in ConvShape's order.
#define FC_FASTDIV_PARAMS                                                                    \
    unsigned mul_rs, int shift_rs, unsigned mul_s, int shift_s, unsigned mul_pq,            \
        int shift_pq, unsigned mul_q, int shift_q, unsigned mul_plane, int shift_plane,     \
        unsigned mul_sh, int shift_sh, unsigned mul_sw, int shift_sw
#define FC_FASTDIVS                                                                          \
    {mul_rs, shift_rs}, {mul_s, shift_s}, {mul_pq, shift_pq}, {mul_q, shift_q},             \
        {mul_plane, shift_plane}, {mul_sh, shift_sh}, {mul_sw, shift_sw}

// GEMM sizes of one group for a mode: rows M, columns NG, reduction length KG.
template <int MODE>
__device__ __forceinline__ void gemm_dims(const ConvShape& s, int& M, int& NG, int& KG) {
    const int Cg = s.C / s.groups, Kg = s.K / s.groups, RS = s.R * s.S;
    if (MODE == FPROP) { M = s.N * s.P * s.Q; NG = Kg; KG = Cg * RS; }
    if (MODE == DGRAD) { M = s.N * s.H * s.W; NG = Cg; KG = Kg * RS; }
    if (MODE == WGRAD) { M = Kg; NG = Cg * RS; KG = s.N * s.P * s.Q; }
}

template <bool TF32, typename T>
__device__ __forceinline__ T smem_value(T v) {
    if constexpr (TF32) return to_tf32(v);
    else return v;
}

// ---------------------------------------------------------------------------------------------
// Tile loaders: gather one BK x EXTENT tile of a GEMM operand into registers (`load`, which
// then moves the loader on by BK reduction steps), and write it to shared memory laid out
// [kk][col] with row stride LD (`store`). `init` places the loader at reduction step k_begin.
// ---------------------------------------------------------------------------------------------

// A of FPROP (x windows) and DGRAD (grad_output taps). A warp reads one reduction row of
// consecutive pixels, so global reads are coalesced along W; each thread keeps the decoded
// coordinates of its PER pixels for the whole reduction.
template <typename T, int MODE, int BM, int BK, int NT>
struct PixelGather {
    static constexpr int TPR = NT / BK;   // threads per reduction row
    static constexpr int PER = BM / TPR;  // pixels per thread
    static_assert(NT % BK == 0 && BM % TPR == 0, "PixelGather: tile does not split evenly");

    const T* src;
    long long img[PER];    // offset of (n, first channel of the group) in src
    int bh[PER], bw[PER];  // FPROP: p*sh - pt, q*sw - pl; DGRAD: h + pt, w + pl
    int kk, lane, kidx;
    T v[PER];

    __device__ __forceinline__ void init(const ConvShape& s, const T* src_, int g, int m0,
                                         int k_begin, int tid) {
        src = src_;
        kk = tid / TPR;
        lane = tid % TPR;
        kidx = k_begin + kk;
        // Source tensor: x (N, C, H, W) for FPROP, grad_output (N, K, P, Q) for DGRAD. Pixel
        // space of the rows: output (P, Q) for FPROP, input (H, W) for DGRAD.
        const int chans = MODE == FPROP ? s.C : s.K;
        const int cg = chans / s.groups;
        const long long src_plane = MODE == FPROP ? (long long)s.H * s.W
                                                  : (long long)s.P * s.Q;
        const int rows_w = MODE == FPROP ? s.Q : s.W;
        const int plane = (MODE == FPROP ? s.P : s.H) * rows_w;
        const int M = s.N * plane;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int m = m0 + lane + TPR * i;
            if (m < M) {
                const int n = m / plane;
                const int rem = m - n * plane;
                const int oh = rem / rows_w;
                const int ow = rem - oh * rows_w;
                img[i] = ((long long)n * chans + (long long)g * cg) * src_plane;
                bh[i] = MODE == FPROP ? oh * s.sh - s.pt : oh + s.pt;
                bw[i] = MODE == FPROP ? ow * s.sw - s.pl : ow + s.pl;
            } else {
                img[i] = 0;
                bh[i] = FAR;
                bw[i] = FAR;
            }
        }
    }

    __device__ __forceinline__ void load(const ConvShape& s, int k_end) {
        const bool kval = kidx < k_end;
        const int c = s.by_rs(kidx);  // tap (c, r, t) of this thread's reduction row
        const int rs = kidx - c * s.R * s.S;
        const int r = s.by_s(rs);
        const int dr = r * s.dh, ds = (rs - r * s.S) * s.dw;
        if (MODE == FPROP) {
            const long long coff = (long long)c * s.H * s.W;
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int ih = bh[i] + dr, iw = bw[i] + ds;
                const bool ok = kval && (unsigned)ih < (unsigned)s.H
                                && (unsigned)iw < (unsigned)s.W;
                v[i] = ok ? src[img[i] + coff + (long long)ih * s.W + iw] : T(0);
            }
        } else {
            const long long coff = (long long)c * s.P * s.Q;
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int nh = bh[i] - dr, nw = bw[i] - ds;
                bool ok = kval && nh >= 0 && nw >= 0;
                int p = 0, q = 0;
                if (ok) {
                    p = s.by_sh(nh);
                    q = s.by_sw(nw);
                    ok = p * s.sh == nh && q * s.sw == nw && p < s.P && q < s.Q;
                }
                v[i] = ok ? src[img[i] + coff + (long long)p * s.Q + q] : T(0);
            }
        }
        kidx += BK;
    }

    template <bool TF32, int LD>
    __device__ __forceinline__ void store(T* tile) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) tile[kk * LD + lane + TPR * i] = smem_value<TF32>(v[i]);
    }
};

// B of FPROP and DGRAD: the weight, read along its contiguous (c, r, s) or (r, s) axis.
template <typename T, int MODE, int BN, int BK, int NT>
struct WeightTile {
    static constexpr int CPT = NT / BK;   // columns per pass
    static constexpr int PER = BN / CPT;  // columns per thread
    static_assert(NT % BK == 0 && BN % CPT == 0, "WeightTile: tile does not split evenly");

    const T* src;
    long long col[PER];  // FPROP: filter row offset; DGRAD: channel offset c*R*S; -1: none
    long long kbase;     // DGRAD: offset of the group's first filter, (g*Kg) * Cg*R*S
    int kk, c0, kidx;
    T v[PER];

    __device__ __forceinline__ void init(const ConvShape& s, const T* src_, int g, int n0,
                                         int k_begin, int tid) {
        src = src_;
        kk = tid % BK;
        c0 = tid / BK;
        kidx = k_begin + kk;
        const int Cg = s.C / s.groups, Kg = s.K / s.groups, RS = s.R * s.S;
        kbase = (long long)g * Kg * Cg * RS;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int j = n0 + c0 + CPT * i;
            if (MODE == FPROP) col[i] = j < Kg ? (long long)(g * Kg + j) * Cg * RS : -1;
            else col[i] = j < Cg ? (long long)j * RS : -1;
        }
    }

    __device__ __forceinline__ void load(const ConvShape& s, int k_end) {
        const bool kval = kidx < k_end;
        long long koff = kidx;  // FPROP: (c, r, s) is the contiguous tail of a filter
        if (MODE == DGRAD) {
            // (k, r, s): weight[g*Kg + k, c, r, s] = ((g*Kg + k) * Cg + c) * RS + rs
            const int RS = s.R * s.S;
            const int k = s.by_rs(kidx);
            koff = kbase + (long long)k * (s.C / s.groups) * RS + (kidx - k * RS);
        }
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            v[i] = kval && col[i] >= 0 ? src[col[i] + koff] : T(0);
        }
        kidx += BK;
    }

    template <bool TF32, int LD>
    __device__ __forceinline__ void store(T* tile) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) tile[kk * LD + c0 + CPT * i] = smem_value<TF32>(v[i]);
    }
};

// A of WGRAD: grad_output[n, g*Kg + i, p, q] for reduction index t = n*P*Q + p*Q + q.
// Consecutive threads take consecutive t, so reads run along the contiguous (p, q) axis.
template <typename T, int BM, int BK, int NT>
struct WgradOutGrad {
    static constexpr int CPT = NT / BK;
    static constexpr int PER = BM / CPT;
    static_assert(NT % BK == 0 && BM % CPT == 0, "WgradOutGrad: tile does not split evenly");

    const T* src;
    long long chan[PER];  // (g*Kg + i) * P*Q, or -1 past the last filter
    int kk, c0, t;
    T v[PER];

    __device__ __forceinline__ void init(const ConvShape& s, const T* src_, int g, int m0,
                                         int k_begin, int tid) {
        src = src_;
        kk = tid % BK;
        c0 = tid / BK;
        t = k_begin + kk;
        const int Kg = s.K / s.groups;
        const long long PQ = (long long)s.P * s.Q;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int j = m0 + c0 + CPT * i;
            chan[i] = j < Kg ? (long long)(g * Kg + j) * PQ : -1;
        }
    }

    __device__ __forceinline__ void load(const ConvShape& s, int k_end) {
        const bool kval = t < k_end;
        const int n = s.by_pq(t);
        const long long base = (long long)n * s.K * s.P * s.Q + (t - n * s.P * s.Q);
#pragma unroll
        for (int i = 0; i < PER; ++i) v[i] = kval && chan[i] >= 0 ? src[base + chan[i]] : T(0);
        t += BK;
    }

    template <bool TF32, int LD>
    __device__ __forceinline__ void store(T* tile) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) tile[kk * LD + c0 + CPT * i] = smem_value<TF32>(v[i]);
    }
};

// B of WGRAD: x windows, column j = (c, r, s) of the group's filters, decoded once per thread.
template <typename T, int BN, int BK, int NT>
struct WgradInput {
    static constexpr int CPT = NT / BK;
    static constexpr int PER = BN / CPT;
    static_assert(NT % BK == 0 && BN % CPT == 0, "WgradInput: tile does not split evenly");

    const T* src;
    long long chan[PER];   // (g*Cg + c) * H*W, or -1 past the last column
    int dr[PER], ds[PER];  // r*dh, s*dw
    int kk, c0, t;
    T v[PER];

    __device__ __forceinline__ void init(const ConvShape& s, const T* src_, int g, int n0,
                                         int k_begin, int tid) {
        src = src_;
        kk = tid % BK;
        c0 = tid / BK;
        t = k_begin + kk;
        const int Cg = s.C / s.groups, RS = s.R * s.S;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int j = n0 + c0 + CPT * i;
            if (j < Cg * RS) {
                const int c = j / RS;
                const int rs = j - c * RS;
                const int r = rs / s.S;
                chan[i] = (long long)(g * Cg + c) * s.H * s.W;
                dr[i] = r * s.dh;
                ds[i] = (rs - r * s.S) * s.dw;
            } else {
                chan[i] = -1;
                dr[i] = 0;
                ds[i] = 0;
            }
        }
    }

    __device__ __forceinline__ void load(const ConvShape& s, int k_end) {
        const bool kval = t < k_end;
        const int n = s.by_pq(t);
        const int pq = t - n * s.P * s.Q;
        const int p = s.by_q(pq);
        const int h0 = kval ? p * s.sh - s.pt : FAR;
        const int w0 = (pq - p * s.Q) * s.sw - s.pl;
        const long long img = (long long)n * s.C * s.H * s.W;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int ih = h0 + dr[i], iw = w0 + ds[i];
            const bool ok = chan[i] >= 0 && (unsigned)ih < (unsigned)s.H
                            && (unsigned)iw < (unsigned)s.W;
            v[i] = ok ? src[img + chan[i] + (long long)ih * s.W + iw] : T(0);
        }
        t += BK;
    }

    template <bool TF32, int LD>
    __device__ __forceinline__ void store(T* tile) const {
#pragma unroll
        for (int i = 0; i < PER; ++i) tile[kk * LD + c0 + CPT * i] = smem_value<TF32>(v[i]);
    }
};

// The two operand loaders of each mode.
template <typename T, int MODE, int BM, int BN, int BK, int NT> struct Operands;
template <typename T, int BM, int BN, int BK, int NT>
struct Operands<T, FPROP, BM, BN, BK, NT> {
    using A = PixelGather<T, FPROP, BM, BK, NT>;
    using B = WeightTile<T, FPROP, BN, BK, NT>;
};
template <typename T, int BM, int BN, int BK, int NT>
struct Operands<T, DGRAD, BM, BN, BK, NT> {
    using A = PixelGather<T, DGRAD, BM, BK, NT>;
    using B = WeightTile<T, DGRAD, BN, BK, NT>;
};
template <typename T, int BM, int BN, int BK, int NT>
struct Operands<T, WGRAD, BM, BN, BK, NT> {
    using A = WgradOutGrad<T, BM, BK, NT>;
    using B = WgradInput<T, BN, BK, NT>;
};

// ---------------------------------------------------------------------------------------------
// Main loop: double-buffered shared-memory tiles, one barrier per BK step. `compute(as, bs)`
// multiplies the tiles of one stage.
// ---------------------------------------------------------------------------------------------
template <bool TF32, int LDA, int LDB, int BK, typename T, class LA, class LB, class F>
__device__ __forceinline__ void mainloop(const ConvShape& s, LA& la, LB& lb, T* As, T* Bs,
                                         int k_begin, int k_end, F&& compute) {
    constexpr int SA = BK * LDA, SB = BK * LDB;  // stage sizes
    la.load(s, k_end);
    lb.load(s, k_end);
    la.template store<TF32, LDA>(As);
    lb.template store<TF32, LDB>(Bs);
    __syncthreads();
    int stage = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        const bool next = k0 + BK < k_end;
        if (next) {  // global reads of the next tile overlap the arithmetic below
            la.load(s, k_end);
            lb.load(s, k_end);
        }
        compute(As + stage * SA, Bs + stage * SB);
        if (next) {
            la.template store<TF32, LDA>(As + (stage ^ 1) * SA);
            lb.template store<TF32, LDB>(Bs + (stage ^ 1) * SB);
        }
        __syncthreads();
        stage ^= 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Epilogue: where GEMM element (m, j) of group g and reduction slice `split` lives in `out`.
// ---------------------------------------------------------------------------------------------
template <int MODE>
struct OutIndex {
    long long base;     // offset of the group's first column (and, WGRAD, of the slice)
    long long jstride;  // distance between consecutive GEMM columns
    long long img;      // FPROP/DGRAD: distance between images; WGRAD: between filters
    int plane;          // FPROP/DGRAD: pixels per image plane

    __device__ __forceinline__ OutIndex(const ConvShape& s, int g, int split) {
        const int Cg = s.C / s.groups, Kg = s.K / s.groups;
        if (MODE == FPROP) {  // slice of y (N, K, P, Q); columns are filters
            plane = s.P * s.Q;
            img = (long long)s.K * plane;
            base = (long long)split * s.N * img + (long long)g * Kg * plane;
            jstride = plane;
        } else if (MODE == DGRAD) {  // slice of grad_input (N, C, H, W); columns are channels
            plane = s.H * s.W;
            img = (long long)s.C * plane;
            base = (long long)split * s.N * img + (long long)g * Cg * plane;
            jstride = plane;
        } else {  // slice `split` of grad_weight (K, Cg*R*S); rows are filters
            plane = 1;
            img = (long long)Cg * s.R * s.S;
            base = (long long)split * s.K * img + (long long)g * Kg * img;
            jstride = 1;
        }
    }

    // Offset of GEMM element (m, 0); element (m, j) is at row(m) + j * jstride.
    __device__ __forceinline__ long long row(int m, const ConvShape& s) const {
        if (MODE == WGRAD) return base + (long long)m * img;
        const int n = s.by_plane(m);
        return base + (long long)n * img + (m - n * plane);
    }
};

// ---------------------------------------------------------------------------------------------
// Strict-precision kernel: CUDA-core FMAs, TM x TN register blocking.
// ---------------------------------------------------------------------------------------------
// Both kernels cap registers at 128 per thread (__launch_bounds__ with 512 / threads resident
// blocks): two 256-thread blocks per SM, 16 warps to hide the latency of the register-staged
// global loads. ptxas reports no spills for the requested instantiations at this cap.
template <typename T, int MODE, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), 512 / ((BM / TM) * (BN / TN)))
conv_simt(const T* __restrict__ a_src, const T* __restrict__ b_src, const T* __restrict__ bias,
          T* __restrict__ out, int N, int C, int H, int W, int K, int R, int S, int P, int Q,
          int sh, int sw, int pt, int pl, int dh, int dw, int groups, int k_split,
          FC_FASTDIV_PARAMS) {
    constexpr int V = Vec<T>::N;
    constexpr int TY = BM / TM, TX = BN / TN, NT = TY * TX;
    // PAD keeps every row 16-byte aligned and spreads the column-wise stores of the loaders
    // over the shared-memory banks.
    constexpr int LDA = BM + V, LDB = BN + V;
    static_assert(TM % V == 0 && TN % V == 0, "conv_simt: TM and TN must be multiples of V");
    __shared__ __align__(16) T As[2 * BK * LDA];
    __shared__ __align__(16) T Bs[2 * BK * LDB];

    const ConvShape s{N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh, dw, groups, FC_FASTDIVS};
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int g = blockIdx.z % groups;
    int M, NG, KG;
    gemm_dims<MODE>(s, M, NG, KG);
    const int k_begin = (blockIdx.z / groups) * k_split;  // reduction slice blockIdx.z / groups
    const int k_end = min(KG, k_begin + k_split);

    typename Operands<T, MODE, BM, BN, BK, NT>::A la;
    typename Operands<T, MODE, BM, BN, BK, NT>::B lb;
    la.init(s, a_src, g, m0, k_begin, tid);
    lb.init(s, b_src, g, n0, k_begin, tid);

    const int ty = tid % TY, tx = tid / TY;  // ty fastest: a warp spans pixels (coalesced out)
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    mainloop<false, LDA, LDB, BK>(s, la, lb, As, Bs, k_begin, k_end,
                                  [&](const T* as, const T* bs) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM / V; ++i) load16(&a[i * V], as + kk * LDA + (i * TY + ty) * V);
#pragma unroll
            for (int j = 0; j < TN / V; ++j) load16(&b[j * V], bs + kk * LDB + (j * TX + tx) * V);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmadd(a[i], b[j], acc[i][j]);
        }
    });

    // Epilogue: bias (FPROP), then stores. Rows come in V-runs of consecutive pixels; when the
    // pixel plane is a multiple of V a run never crosses an image and is 16-byte aligned.
    // The slice index is recomputed here rather than kept live through the main loop.
    const int split = blockIdx.z / groups;
    const OutIndex<MODE> oi(s, g, split);
    const bool vector_rows = MODE != WGRAD && oi.plane % V == 0;
#pragma unroll
    for (int i0 = 0; i0 < TM; i0 += V) {
        const int mrun = m0 + ((i0 / V) * TY + ty) * V;
        if (mrun >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int col = n0 + ((j / V) * TX + tx) * V + j % V;
            if (col >= NG) continue;
            const T b = (MODE == FPROP && bias != nullptr && split == 0) ? bias[g * NG + col]
                                                                         : T(0);
            if (vector_rows) {
                T run[V];
#pragma unroll
                for (int v = 0; v < V; ++v) run[v] = acc[i0 + v][j] + b;
                store16(out + oi.row(mrun, s) + col * oi.jstride, run);
            } else {
#pragma unroll
                for (int v = 0; v < V; ++v) {
                    if (mrun + v < M) {
                        out[oi.row(mrun + v, s) + col * oi.jstride] =
                            acc[i0 + v][j] + b;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TF32 tensor-core kernel (opt-in precision "tf32"): mma.sync m16n8k8, fp32 accumulation.
// ---------------------------------------------------------------------------------------------
template <int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N, 16 / (WARPS_M * WARPS_N))
conv_tf32(const float* __restrict__ a_src, const float* __restrict__ b_src,
          const float* __restrict__ bias, float* __restrict__ out, int N, int C, int H, int W,
          int K, int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
          int groups, int k_split, FC_FASTDIV_PARAMS) {
    constexpr int NT = 32 * WARPS_M * WARPS_N;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
    constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
    // PAD = 8 floats: the fragment reads (4 rows x 8 columns per warp) hit 32 distinct banks.
    constexpr int LDA = BM + 8, LDB = BN + 8;
    static_assert(WTM % 16 == 0 && WTN % 8 == 0 && BK % 8 == 0, "conv_tf32: bad tile shape");
    __shared__ __align__(16) float As[2 * BK * LDA];
    __shared__ __align__(16) float Bs[2 * BK * LDB];

    const ConvShape s{N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh, dw, groups, FC_FASTDIVS};
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int g = blockIdx.z % groups;
    int M, NG, KG;
    gemm_dims<MODE>(s, M, NG, KG);
    const int k_begin = (blockIdx.z / groups) * k_split;  // reduction slice blockIdx.z / groups
    const int k_end = min(KG, k_begin + k_split);

    typename Operands<float, MODE, BM, BN, BK, NT>::A la;
    typename Operands<float, MODE, BM, BN, BK, NT>::B lb;
    la.init(s, a_src, g, m0, k_begin, tid);
    lb.init(s, b_src, g, n0, k_begin, tid);

    const int lane = tid % 32, warp = tid / 32;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    const int gq = lane / 4, tq = lane % 4;  // "groupID" and "threadID_in_group" of the PTX ISA
    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    mainloop<true, LDA, LDB, BK>(s, la, lb, As, Bs, k_begin, k_end,
                                 [&](const float* as, const float* bs) {
#pragma unroll
        for (int k8 = 0; k8 < BK; k8 += 8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const float* pa = as + (k8 + tq) * LDA + wm * WTM + i * 16 + gq;
                a[i][0] = __float_as_uint(pa[0]);
                a[i][1] = __float_as_uint(pa[8]);
                a[i][2] = __float_as_uint(pa[4 * LDA]);
                a[i][3] = __float_as_uint(pa[4 * LDA + 8]);
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const float* pb = bs + (k8 + tq) * LDB + wn * WTN + j * 8 + gq;
                b[j][0] = __float_as_uint(pb[0]);
                b[j][1] = __float_as_uint(pb[4 * LDB]);
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_tf32_16x8x8(acc[i][j], a[i], b[j]);
        }
    });

    // Epilogue: for a fixed register, a warp writes 4 runs of 8 consecutive pixels.
    // The slice index is recomputed here rather than kept live through the main loop.
    const int split = blockIdx.z / groups;
    const OutIndex<MODE> oi(s, g, split);
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wm * WTM + i * 16 + gq + 8 * h;
            if (m >= M) continue;
            const long long rowoff = oi.row(m, s);
#pragma unroll
            for (int j = 0; j < NI; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = n0 + wn * WTN + j * 8 + 2 * tq + e;
                    if (col >= NG) continue;
                    const float b = (MODE == FPROP && bias != nullptr && split == 0)
                                        ? bias[g * NG + col] : 0.0f;
                    out[rowoff + col * oi.jstride] = acc[i][j][2 * h + e] + b;
                }
            }
        }
    }
}

}  // namespace fc
