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
// copied from the tensors straight into shared memory by cp.async (zero-filled, nothing read,
// where the window leaves the image), in a 4-stage ring, then multiplied from shared memory
// with register blocking.
//   mode    GEMM M (rows)   GEMM N (cols)   reduction        A (red. x M)   B (red. x N)
//   FPROP   N*P*Q pixels    Kg filters      Cg*R*S taps      x windows      weight
//   DGRAD   N*H*W pixels    Cg channels     Kg*R*S taps      grad_output    weight
//   WGRAD   Kg filters      Cg*R*S taps     N*P*Q pixels     grad_output    x windows
// DGRAD is the correlation of the stride-dilated, padded grad_output with the 180-degree
// rotated, channel-swapped kernel (lecture notes 7.5) without building either: the tap
// (k, r, s) of input pixel (h, w) reads grad_output[n, k, (h + pt - r*dh)/sh, (w + pl - s*dw)/sw]
// when both divisions are exact and in range, which is where the zero-inserted copy would hold
// a real value. The loader tests exactness by residues, dividing once per pixel and once per
// tap, never per element (PixelGather).
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
//     (BN/WARPS_N) sub-tile made of 16x8 mma.sync tiles; operand tiles in mma fragment order
//     (place<FRAG_A/FRAG_B>, krow: rows of BM + 4 and BN + 4 floats, reduction steps t and
//     t + 4 of each group of 8 interleaved in row pair t).
//   Static shared memory: CONV_STAGES (4) stages of (BK x (BM + PAD)) + (BK x (BN + PAD))
//   elements (at most 35 KiB), filled by cp.async (sm_80+; a plain copy on older devices)
//   STAGES - 1 stages ahead of the arithmetic (mainloop, on fc::cp_async_ring in
//   fc_common.cuh; one barrier per BK step);
//   conv_tf32 takes tf32_stages(BM, BN, BK) stages, as many as fit in 48 KiB up to four (its
//   64-wide tiles at BK = 8: four); conv_tf32_nhwc nhwc_stages(BM, BN) (128x128: three,
//   128x64: four, 48 KiB each). At most 128 registers per thread (two 256-thread blocks per
//   SM), except the SIMT tiles with 8 x 8 register blocking (room for 256 threads per SM:
//   128x128 with 256 threads, 128x64 with 128); cuda_conv.resident_blocks mirrors this.
//   Arguments: a, b, bias (or null), out, then N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh,
//   dw, groups, k_split (int32), then (mul, shift) of the divisors R*S, S, P*Q, row, output
//   plane, sh, sw (uint32, int32; see FastDiv).
//
// Variants (template parameters; the launcher requests only the instantiations it lists)
//   conv_simt<T, MODE, BM, BN, BK, TM, TN, AV = 1>: strict FP32 / FP64, one fused
//     multiply-add per product, the reduction in the order of the tiles. AV = V (FPROP and
//     DGRAD of 1x1 filters, unit stride, no padding, planes of whole vectors, A 16-byte
//     aligned; the launcher checks): A is copied in 16-byte vectors of pixels (PlaneRows).
//   conv_tf32<MODE, BM, BN, BK, WARPS_M, WARPS_N>: opt-in TF32 tensor cores (sm_80+): operands
//     rounded to TF32 (to_tf32: cvt.rna on sm_80, cvt.rn from sm_90) once, in shared memory,
//     by the thread that copied them, before the tile is published; each A fragment and each
//     pair of B fragments read with one 16-byte shared load straight into the registers
//     mma.sync takes; fp32 accumulation. About 1e-3 relative error. 64-wide tiles only: the
//     fallback where the pre-pass buffers of conv_tf32_nhwc do not fit the workspace.
//   conv_tf32_nhwc<BM, BN, BK, WARPS_M, WARPS_N> (forward; the 128-wide TF32 tiles of all three
//     ops, the gradients as forward geometries, see kernels/cuda_dgrad.py and
//     cuda_conv.wgrad_forward_geometry) over the channels-last TF32 copies of nhwc_tf32_copy:
//     16-byte cp.async copies, XOR-swizzled row-major tiles, ldmatrix.x4 fragments, no rounding
//     in the main loop (see the section at the end of this file).
//
// Index arithmetic: tensor offsets are 64-bit (a tensor may exceed 2^31 elements); GEMM row
// and reduction indices are 32-bit, which holds because the launcher splits the batch so that
// N*P*Q and N*H*W stay below 2^31. Planes (the padded input plane, P*Q) and filter rows
// (Cg*R*S, Kg*R*S) are below 2^31 too (the launcher refuses others), so per-tap offsets are
// one unsigned 32 x 32 -> 64-bit multiply-add (wide()).
//
// Verification status (issue 11, no GPU available): compiled by NVRTC 13.5 for sm_80 and sm_90
// in CI with ptxas warnings for spills and local memory treated as failures
// (tests/test_nvrtc.py); bench/sass_report.py (run by tests/test_sass_report.py) reports per
// instantiation registers, shared memory, occupancy and the main loop's instruction mix, and
// checks LDGSTS (cp.async) in every conv main loop, HMMA in every TF32 one, at least 75% FFMA
// in the main loop of every FP32 SIMT kernel with a 128x128 or 128x64 tile, and at most 4
// main-loop instructions per HMMA for every TF32 kernel with a 128-wide tile (issue 11's
// target; conv_tf32_nhwc: 3.3-3.7 on sm_80 and sm_90). Executed on the
// CPU through the host emulation of tests/cuda_emu.h (blocks, threads, barriers, warp
// shuffles, cp.async groups with zero-fill and poisoned pending destinations, the mma fragment
// layout as the PTX ISA documents it) against the NumPy reference, for every tile and mode.
// Not yet run on a GPU: speed and the hardware's own mma.sync layout are unverified;
// bench/device_check.sh runs the GPU tests and benchmark.

#include "fc_common.cuh"

namespace fc {

enum Mode { FPROP = 0, DGRAD = 1, WGRAD = 2 };

// Depth of the cp.async shared-memory ring of every conv kernel (see mainloop).
constexpr int CONV_STAGES = 4;

// a * b for 0 <= a, b < 2^31 as one unsigned 32 x 32 -> 64-bit multiply (IMAD.WIDE.U32).
__device__ __forceinline__ long long wide(int a, int b) {
    return (long long)((unsigned long long)(unsigned)a * (unsigned)b);
}

// Coordinate of rows past the end: adding any kernel offset keeps it negative, so the ordinary
// bounds checks reject it.
// (An enumerator: a kernel that never uses it draws no unused-variable warning.)
enum : int { FAR = -(1 << 30) };

struct ConvShape {
    int N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh, dw, groups;
    // Divisors of the index arithmetic: R*S, S, P*Q, the row and plane sizes of the GEMM-row
    // pixel space (row: W for DGRAD, else Q; plane: P*Q for FPROP,
    // H*W for DGRAD), sh and sw.
    FastDiv by_rs, by_s, by_pq, by_row, by_plane, by_sh, by_sw;
};

// The divisor parameters every conv kernel takes after k_split, in ConvShape's order.
#define FC_FASTDIV_PARAMS                                                                    \
    unsigned mul_rs, int shift_rs, unsigned mul_s, int shift_s, unsigned mul_pq,            \
        int shift_pq, unsigned mul_row, int shift_row, unsigned mul_plane, int shift_plane,     \
        unsigned mul_sh, int shift_sh, unsigned mul_sw, int shift_sw
#define FC_FASTDIVS                                                                          \
    {mul_rs, shift_rs}, {mul_s, shift_s}, {mul_pq, shift_pq}, {mul_row, shift_row},             \
        {mul_plane, shift_plane}, {mul_sh, shift_sh}, {mul_sw, shift_sw}

// GEMM sizes of one group for a mode: rows M, columns NG, reduction length KG.
template <int MODE>
__device__ __forceinline__ void gemm_dims(const ConvShape& s, int& M, int& NG, int& KG) {
    const int Cg = s.C / s.groups, Kg = s.K / s.groups, RS = s.R * s.S;
    if (MODE == FPROP) { M = s.N * s.P * s.Q; NG = Kg; KG = Cg * RS; }
    if (MODE == DGRAD) { M = s.N * s.H * s.W; NG = Cg; KG = Kg * RS; }
    if (MODE == WGRAD) { M = Kg; NG = Cg * RS; KG = s.N * s.P * s.Q; }
}

// Where GEMM column c of an operand tile lives in its shared-memory row. Q = 1: in place.
// Q = 2 or 4: within each block of 8Q columns, column 8j + g is stored at Q g + j, so the Q
// columns g, g + 8, ... that one lane needs for Q mma tiles sit side by side and are read with
// one 8- or 16-byte shared-memory load.
// Q = FRAG_A or FRAG_B (the TF32 kernel): the tile is stored in mma.m16n8k8 fragment order, so
// that one 16-byte load gives a lane a whole A fragment, or the B fragments of two adjacent
// n-tiles, in the register order mma.sync takes (no register moves). Reduction rows kk and
// kk + 4 of each group of 8 share one row pair (see krow); within it, column c = 16 b + 8 h + g
// (mma tile b, half h, row/column g of the tile) goes to 4 (8 b + g) + h (A: h is the row half
// of a[]) or 4 (8 b + g) + 2 h (B: h picks the n-tile of the pair), and krow adds the
// reduction half: 2 for A (a[2], a[3] are rows t + 4), 1 for B (b[1] is row t + 4).
// For c0 < STEP with STEP a multiple of 8 (16 for FRAG_*), place(c0 + STEP i) = place(c0) +
// place(STEP i): the loaders keep place(c0) and add compile-time offsets.
constexpr int FRAG_A = -1, FRAG_B = -2;

template <int Q>
__device__ __forceinline__ int place(int c) {
    if constexpr (Q == 1) return c;
    else if constexpr (Q == FRAG_A) return 4 * (c / 16 * 8 + c % 8) + c % 16 / 8;
    else if constexpr (Q == FRAG_B) return 4 * (c / 16 * 8 + c % 8) + 2 * (c % 16 / 8);
    else return (c / (8 * Q)) * (8 * Q) + (c % 8) * Q + (c % (8 * Q)) / 8;
}

// Offset of reduction row kk in a tile of row stride LD. FRAG_A/FRAG_B: the 8 rows of each
// group of 8 reduction steps become 4 row pairs of 2 LD elements, pair t holding steps t and
// t + 4 interleaved (place), so a lane (g, t) of the mma reads its fragments from pair t. With
// 2 LD = 8 (mod 32) the 8 lanes of each quarter-warp phase of those 16-byte loads hit distinct
// banks.
template <int LD, int Q>
__device__ __forceinline__ int krow(int kk) {
    if constexpr (Q == FRAG_A || Q == FRAG_B) {
        return (kk / 8 * 8 + kk % 4 * 2) * LD + (kk % 8 / 4) * (Q == FRAG_A ? 2 : 1);
    } else {
        return kk * LD;
    }
}

// Round, in place, the PER elements this thread copied into one tile row (at `first`, then
// columns STEP apart, placed by place<Q>) to TF32: once per element, after they landed and
// before the barrier that publishes the tile.
template <int PER, int STEP, int Q, typename T>
__device__ __forceinline__ void round_own(T* first) {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        T& e = first[place<Q>(STEP * i)];
        e = to_tf32(e);
    }
}

// ---------------------------------------------------------------------------------------------
// Tile loaders: `fetch<LD, Q>` starts the asynchronous copies (cp.async, zero-fill for taps
// outside the image or past the reduction) of one BK x EXTENT tile of a GEMM operand into
// shared memory laid out [kk][place<Q>(col)] with row stride LD (element at krow<LD, Q>(kk) +
// place<Q>(col)), then moves the loader on by BK reduction steps; `round<LD, Q>` rounds this
// thread's own elements of a landed tile to TF32.
// `init` places the loader at reduction step k_begin. Every thread copies the same (kk, col)
// pattern in every stage.
// ---------------------------------------------------------------------------------------------

// A of FPROP (x windows) and DGRAD (grad_output taps). A warp reads one reduction row of
// consecutive pixels, so global reads are coalesced along W; each thread keeps, for its PER
// pixels, a pointer to the pixel's window origin and the origin's coordinates (for the bounds
// checks), for the whole reduction. A tap then costs one 64-bit add per element.
// DGRAD without per-element divisions: with h + pt = qh*sh + hr (0 <= hr < sh) and the tap's
// r*dh = dq*sh + dm, h + pt - r*dh is a multiple of sh exactly when hr == dm, and the quotient
// is then qh - dq; likewise along W. So each pixel keeps (qh, qw) and the residue pair
// hr*sw + wr, each tap divides its own (r*dh, s*dw) once, and an element costs what an FPROP
// element does plus one comparison (always true for stride 1).
template <typename T, int MODE, int BM, int BK, int NT>
struct PixelGather {
    static constexpr int TPR = NT / BK;   // threads per reduction row
    static constexpr int PER = BM / TPR;  // pixels per thread
    static_assert(NT % BK == 0 && BM % TPR == 0 && TPR % 8 == 0,
                  "PixelGather: tile does not split evenly");

    const T* org[PER];     // FPROP: &x[n, g*Cg, bh, bw]; DGRAD: &grad_output[n, g*Kg, bh, bw]
    int bh[PER], bw[PER];  // FPROP: p*sh - pt, q*sw - pl; DGRAD: (h + pt) / sh, (w + pl) / sw
                           // (FAR: no row)
    int res[MODE == DGRAD ? PER : 1];  // DGRAD: ((h + pt) % sh) * sw + (w + pl) % sw
    int kk, col, kidx;     // reduction row, place<Q> of the first column, reduction index

    template <int Q>
    __device__ __forceinline__ void init(const ConvShape& s, const T* src, int g, int m0,
                                         int k_begin, int tid) {
        kk = tid / TPR;
        const int lane = tid % TPR;
        col = place<Q>(lane);
        kidx = k_begin + kk;
        // Source tensor: x (N, C, H, W) for FPROP, grad_output (N, K, P, Q) for DGRAD. Pixel
        // space of the rows: output (P, Q) for FPROP, input (H, W) for DGRAD (s.by_plane and
        // s.by_row divide by its plane and row sizes).
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
                const int n = s.by_plane(m);
                const int rem = m - n * plane;
                const int oh = s.by_row(rem);
                const int ow = rem - oh * rows_w;
                long long off = ((long long)n * chans + (long long)g * cg) * src_plane;
                if (MODE == FPROP) {
                    bh[i] = oh * s.sh - s.pt;
                    bw[i] = ow * s.sw - s.pl;
                    off += (long long)bh[i] * s.W + bw[i];
                } else {
                    const int h = oh + s.pt, w = ow + s.pl;
                    bh[i] = s.by_sh(h);
                    bw[i] = s.by_sw(w);
                    res[MODE == DGRAD ? i : 0] = (h - bh[i] * s.sh) * s.sw + (w - bw[i] * s.sw);
                    off += (long long)bh[i] * s.Q + bw[i];
                }
                org[i] = src + off;
            } else {
                org[i] = src;
                bh[i] = FAR;
                bw[i] = FAR;
                if (MODE == DGRAD) res[MODE == DGRAD ? i : 0] = 0;
            }
        }
    }

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const ConvShape& s, int k_end, T* tile) {
        T* row = tile + krow<LD, Q>(kk) + col;
        const bool kval = kidx < k_end;
        const int c = s.by_rs(kidx);  // tap (c, r, t) of this thread's reduction row
        const int rs = kidx - c * s.R * s.S;
        const int r = s.by_s(rs);
        const int dr = r * s.dh, ds = (rs - r * s.S) * s.dw;
        // Planes and filter rows hold fewer than 2^31 elements (the launcher checks), so one
        // 32 x 32 -> 64-bit multiply-add forms each tap's offset.
        if (MODE == FPROP) {
            const long long off = wide(c, s.H * s.W) + (unsigned)(dr * s.W + ds);
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int ih = bh[i] + dr, iw = bw[i] + ds;
                const bool ok = kval && (unsigned)ih < (unsigned)s.H
                                && (unsigned)iw < (unsigned)s.W;
                cp_async<sizeof(T)>(row + place<Q>(TPR * i), org[i] + off, ok);
            }
        } else {
            const int dqh = s.by_sh(dr), dqw = s.by_sw(ds);
            const int dm = (dr - dqh * s.sh) * s.sw + (ds - dqw * s.sw);
            const long long off = wide(c, s.P * s.Q) - (unsigned)(dqh * s.Q + dqw);
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const int p = bh[i] - dqh, q = bw[i] - dqw;
                const bool ok = kval && res[MODE == DGRAD ? i : 0] == dm
                                && (unsigned)p < (unsigned)s.P && (unsigned)q < (unsigned)s.Q;
                cp_async<sizeof(T)>(row + place<Q>(TPR * i), org[i] + off, ok);
            }
        }
        kidx += BK;
    }

    template <int LD, int Q>
    __device__ __forceinline__ void round(T* tile) const {
        round_own<PER, TPR, Q>(tile + krow<LD, Q>(kk) + col);
    }
};

// A of FPROP and DGRAD for 1x1 filters with unit stride and no padding (any dilation): GEMM
// row m = n * plane + pixel reads src[n, g*cg + c, pixel] at reduction index c, so V (16 bytes)
// consecutive pixels are contiguous in both the tensor and the tile row, and one 16-byte
// cp.async (LDGSTS.128) copies them. The launcher picks this loader only when the plane
// (H*W = P*Q) is a multiple of V and the tensor is 16-byte aligned (cuda_conv.vector_a_ok): a
// vector then never straddles two images or the end of the rows, and every copy is aligned.
template <typename T, int MODE, int BM, int BK, int NT>
struct PlaneRows {
    static constexpr int V = Vec<T>::N;
    static constexpr int TPR = NT / BK;          // threads per reduction row
    static constexpr int VPT = BM / (TPR * V);   // vectors per thread
    static_assert(MODE != WGRAD && NT % BK == 0 && BM % (TPR * V) == 0,
                  "PlaneRows: tile does not split evenly");

    const T* org[VPT];  // &src[n, g*cg, pixel] of the vector's first pixel
    unsigned live;      // bit j: vector j lies inside the GEMM rows
    int kk, col, kidx;

    template <int Q>
    __device__ __forceinline__ void init(const ConvShape& s, const T* src, int g, int m0,
                                         int k_begin, int tid) {
        static_assert(Q == 1, "PlaneRows: natural column order only");
        kk = tid / TPR;
        const int lane = tid % TPR;
        col = lane * V;
        kidx = k_begin + kk;
        const int chans = MODE == FPROP ? s.C : s.K, cg = chans / s.groups;
        const int plane = s.H * s.W, M = s.N * plane;
        live = 0;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int m = m0 + (lane + TPR * j) * V;
            org[j] = src;
            if (m < M) {
                const int n = s.by_plane(m);
                org[j] += (wide(n, chans) + (long long)g * cg) * plane + (m - n * plane);
                live |= 1u << j;
            }
        }
    }

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const ConvShape& s, int k_end, T* tile) {
        T* row = tile + krow<LD, Q>(kk) + col;
        const bool kval = kidx < k_end;
        const long long off = wide(kidx, s.H * s.W);
#pragma unroll
        for (int j = 0; j < VPT; ++j)
            cp_async<16>(row + TPR * V * j, org[j] + off, kval && (live >> j & 1u));
        kidx += BK;
    }
};

// B of FPROP and DGRAD: the weight, read along its contiguous (c, r, s) or (r, s) axis.
template <typename T, int MODE, int BN, int BK, int NT>
struct WeightTile {
    static constexpr int CPT = NT / BK;   // columns per pass
    static constexpr int PER = BN / CPT;  // columns per thread
    static_assert(NT % BK == 0 && BN % CPT == 0 && CPT % 8 == 0,
                  "WeightTile: tile does not split evenly");

    const T* org;      // FPROP: first filter row of this thread; DGRAD: group's first filter
    long long stride;  // between this thread's columns: CPT filter rows or CPT channels
    int live;          // columns of this thread inside the GEMM (i < live)
    int kk, col, kidx;

    template <int Q>
    __device__ __forceinline__ void init(const ConvShape& s, const T* src, int g, int n0,
                                         int k_begin, int tid) {
        kk = tid % BK;
        const int c0 = tid / BK;
        col = place<Q>(c0);
        kidx = k_begin + kk;
        const int Cg = s.C / s.groups, Kg = s.K / s.groups, RS = s.R * s.S;
        const int j0 = n0 + c0, cols = MODE == FPROP ? Kg : Cg;
        live = j0 < cols ? (cols - j0 + CPT - 1) / CPT : 0;
        if (MODE == FPROP) {
            org = src + (long long)(g * Kg + j0) * Cg * RS;
            stride = (long long)CPT * Cg * RS;
        } else {
            org = src + (long long)g * Kg * Cg * RS + (long long)j0 * RS;
            stride = (long long)CPT * RS;
        }
    }

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const ConvShape& s, int k_end, T* tile) {
        T* row = tile + krow<LD, Q>(kk) + col;
        const bool kval = kidx < k_end;
        long long koff = kidx;  // FPROP: (c, r, s) is the contiguous tail of a filter
        if (MODE == DGRAD) {
            // (k, r, s): weight[g*Kg + k, c, r, s] = ((g*Kg + k) * Cg + c) * RS + rs
            const int RS = s.R * s.S;
            const int k = s.by_rs(kidx);
            koff = wide(k, s.C / s.groups * RS) + (unsigned)(kidx - k * RS);
        }
        const T* p = org + koff;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            cp_async<sizeof(T)>(row + place<Q>(CPT * i), p, kval && i < live);
            p += stride;
        }
        kidx += BK;
    }

    template <int LD, int Q>
    __device__ __forceinline__ void round(T* tile) const {
        round_own<PER, CPT, Q>(tile + krow<LD, Q>(kk) + col);
    }
};

// A of WGRAD: grad_output[n, g*Kg + i, p, q] for reduction index t = n*P*Q + p*Q + q.
// Consecutive threads take consecutive t, so reads run along the contiguous (p, q) axis.
template <typename T, int BM, int BK, int NT>
struct WgradOutGrad {
    static constexpr int CPT = NT / BK;
    static constexpr int PER = BM / CPT;
    static_assert(NT % BK == 0 && BM % CPT == 0 && CPT % 8 == 0,
                  "WgradOutGrad: tile does not split evenly");

    const T* org;      // &grad_output[0, g*Kg + m0 + c0, 0, 0]
    long long stride;  // CPT filters
    int live, kk, col, t;

    template <int Q>
    __device__ __forceinline__ void init(const ConvShape& s, const T* src, int g, int m0,
                                         int k_begin, int tid) {
        kk = tid % BK;
        const int c0 = tid / BK;
        col = place<Q>(c0);
        t = k_begin + kk;
        const int Kg = s.K / s.groups, j0 = m0 + c0;
        const int PQ = s.P * s.Q;  // below 2^31 (the launcher checks)
        live = j0 < Kg ? (Kg - j0 + CPT - 1) / CPT : 0;
        org = src + (long long)(g * Kg + j0) * PQ;
        stride = (long long)CPT * PQ;
    }

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const ConvShape& s, int k_end, T* tile) {
        T* row = tile + krow<LD, Q>(kk) + col;
        const bool kval = t < k_end;
        const int n = s.by_pq(t);
        const int PQ = s.P * s.Q;
        const T* p = org + wide(n, s.K) * (unsigned)PQ + (unsigned)(t - n * PQ);
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            cp_async<sizeof(T)>(row + place<Q>(CPT * i), p, kval && i < live);
            p += stride;
        }
        t += BK;
    }

    template <int LD, int Q>
    __device__ __forceinline__ void round(T* tile) const {
        round_own<PER, CPT, Q>(tile + krow<LD, Q>(kk) + col);
    }
};

// B of WGRAD: x windows, column j = (c, r, s) of the group's filters, decoded once per thread.
template <typename T, int BN, int BK, int NT>
struct WgradInput {
    static constexpr int CPT = NT / BK;
    static constexpr int PER = BN / CPT;
    static_assert(NT % BK == 0 && BN % CPT == 0 && CPT % 8 == 0,
                  "WgradInput: tile does not split evenly");

    const T* org[PER];     // &x[0, g*Cg + c, r*dh, s*dw] of column j
    int dr[PER], ds[PER];  // r*dh, s*dw; dr = FAR past the last column
    int kk, col, t;

    template <int Q>
    __device__ __forceinline__ void init(const ConvShape& s, const T* src, int g, int n0,
                                         int k_begin, int tid) {
        kk = tid % BK;
        const int c0 = tid / BK;
        col = place<Q>(c0);
        t = k_begin + kk;
        const int Cg = s.C / s.groups, RS = s.R * s.S;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int j = n0 + c0 + CPT * i;
            if (j < Cg * RS) {
                const int c = s.by_rs(j);
                const int rs = j - c * RS;
                const int r = s.by_s(rs);
                dr[i] = r * s.dh;
                ds[i] = (rs - r * s.S) * s.dw;
                org[i] = src + (long long)(g * Cg + c) * s.H * s.W + (long long)dr[i] * s.W
                         + ds[i];
            } else {
                org[i] = src;
                dr[i] = FAR;
                ds[i] = 0;
            }
        }
    }

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const ConvShape& s, int k_end, T* tile) {
        T* row = tile + krow<LD, Q>(kk) + col;
        const bool kval = t < k_end;
        const int n = s.by_pq(t);
        const int pq = t - n * s.P * s.Q;
        const int p = s.by_row(pq);
        const int h0 = p * s.sh - s.pt, w0 = (pq - p * s.Q) * s.sw - s.pl;
        const long long pix = wide(n, s.C) * (unsigned)(s.H * s.W) + (h0 * s.W + w0);
        const int hk = kval ? h0 : FAR;  // past the reduction: no row passes the check
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int ih = hk + dr[i], iw = w0 + ds[i];
            const bool ok = (unsigned)ih < (unsigned)s.H && (unsigned)iw < (unsigned)s.W;
            cp_async<sizeof(T)>(row + place<Q>(CPT * i), org[i] + pix, ok);
        }
        t += BK;
    }

    template <int LD, int Q>
    __device__ __forceinline__ void round(T* tile) const {
        round_own<PER, CPT, Q>(tile + krow<LD, Q>(kk) + col);
    }
};

// IfT<C, A, B>::type: A when C holds, else B.
template <bool C, class A, class B> struct IfT { using type = A; };
template <class A, class B> struct IfT<false, A, B> { using type = B; };

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
// Main loop: fc::cp_async_ring (fc_common.cuh) over the BK steps of [k_begin, k_end), a
// STAGES-deep ring of shared-memory tiles (stage sizes BK * LDA and BK * LDB) filled by the two
// loaders; with TF32 each thread rounds its own landed elements to TF32 before the barrier.
// `compute(as, bs)` multiplies one stage.
// ---------------------------------------------------------------------------------------------
// `s` is the shape the loaders read (ConvShape; NhwcShape for conv_tf32_nhwc).
template <int STAGES, bool TF32, int LDA, int LDB, int BK, int QA, int QB, typename T, class LA,
          class LB, class F, class SH>
__device__ __forceinline__ void mainloop(const SH& s, LA& la, LB& lb, T* As, T* Bs,
                                         int k_begin, int k_end, F&& compute) {
    constexpr int SA = BK * LDA, SB = BK * LDB;  // stage sizes
    cp_async_ring<STAGES>(
        (k_end - k_begin + BK - 1) / BK,
        [&](int, int slot) {  // the loaders track the reduction position themselves
            la.template fetch<LDA, QA>(s, k_end, As + slot * SA);
            lb.template fetch<LDB, QB>(s, k_end, Bs + slot * SB);
        },
        [&](int slot) {
            if constexpr (TF32) {
                la.template round<LDA, QA>(As + slot * SA);
                lb.template round<LDB, QB>(Bs + slot * SB);
            }
        },
        [&](int slot) { compute(As + slot * SA, Bs + slot * SB); });
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
// Registers: at most 128 per thread (__launch_bounds__ with 512 / threads resident blocks,
// two 256-thread blocks per SM), except 8 x 8 register blocking (128x128 with 256 threads,
// 128x64 with 128), whose 64 accumulators, 16 operands and loader state need more: room for
// 256 threads per SM is guaranteed (ptxas then uses 125-167 registers, 1-4 blocks per SM; the
// cp.async ring, not the warp count, hides the global-load latency). 8 x 8 is what makes these
// tiles FFMA-bound: per reduction step four 16-byte shared loads feed 64 FFMA, and the
// loaders' per-step index work is spread over 512 FFMA per thread. ptxas must report no
// spills (tests/test_nvrtc.py, tests/test_sass_report.py).
template <int NT, int TM, int TN>
__host__ __device__ constexpr int simt_min_blocks() {
    return TM * TN >= 64 ? (256 / NT > 1 ? 256 / NT : 1) : 512 / NT;
}

template <typename T, int MODE, int BM, int BN, int BK, int TM, int TN, int AV = 1>
__global__ void __launch_bounds__((BM / TM) * (BN / TN),
                                  (simt_min_blocks<(BM / TM) * (BN / TN), TM, TN>()))
conv_simt(const T* __restrict__ a_src, const T* __restrict__ b_src, const T* __restrict__ bias,
          T* __restrict__ out, int N, int C, int H, int W, int K, int R, int S, int P, int Q,
          int sh, int sw, int pt, int pl, int dh, int dw, int groups, int k_split,
          FC_FASTDIV_PARAMS) {
    constexpr int V = Vec<T>::N;
    constexpr int TY = BM / TM, TX = BN / TN, NT = TY * TX;
    // PAD keeps every row 16-byte aligned and spreads the column-wise stores of the loaders
    // over the shared-memory banks.
    constexpr int LDA = BM + V, LDB = BN + V;
    constexpr int QA = 1, QB = 1;  // operand columns in natural order
    static_assert(TM % V == 0 && TN % V == 0, "conv_simt: TM and TN must be multiples of V");
    static_assert(AV == 1 || AV == V, "conv_simt: A is gathered (AV = 1) or copied in vectors");
    __shared__ __align__(16) T As[CONV_STAGES * BK * LDA];
    __shared__ __align__(16) T Bs[CONV_STAGES * BK * LDB];

    const ConvShape s{N, C, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh, dw, groups, FC_FASTDIVS};
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int g = blockIdx.z % groups;
    int M, NG, KG;
    gemm_dims<MODE>(s, M, NG, KG);
    const int k_begin = (blockIdx.z / groups) * k_split;  // reduction slice blockIdx.z / groups
    const int k_end = min(KG, k_begin + k_split);

    typename IfT<(AV > 1), PlaneRows<T, MODE, BM, BK, NT>,
                 typename Operands<T, MODE, BM, BN, BK, NT>::A>::type la;
    typename Operands<T, MODE, BM, BN, BK, NT>::B lb;
    la.template init<QA>(s, a_src, g, m0, k_begin, tid);
    lb.template init<QB>(s, b_src, g, n0, k_begin, tid);

    const int ty = tid % TY, tx = tid / TY;  // ty fastest: a warp spans pixels (coalesced out)
    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    mainloop<CONV_STAGES, false, LDA, LDB, BK, QA, QB>(s, la, lb, As, Bs, k_begin, k_end,
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
// Warp-tile helpers of the TF32 kernels (conv_tf32, conv_tf32_nhwc): MI x NI mma tiles of 16x8.
// ---------------------------------------------------------------------------------------------
template <int MI, int NI>
__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
}

// acc[i][j] += A_i * B_j for every mma tile of the warp tile.
template <int MI, int NI>
__device__ __forceinline__ void mma_warp_tile(float (&acc)[MI][NI][4], const unsigned (&a)[MI][4],
                                              const unsigned (&b)[NI][2]) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_tf32_16x8x8(acc[i][j], a[i], b[j]);
}

// Epilogue of a warp tile whose first row and column are m_first and n_first: element
// (m, col) of the GEMM (m < M, col < NG) goes to row(m)[col * jstride] plus add(col). For a
// fixed register a warp writes 4 runs of 8 consecutive rows (pixels).
template <int MI, int NI, class Row, class Add>
__device__ __forceinline__ void store_warp_tile(const float (&acc)[MI][NI][4], int m_first,
                                                int n_first, int M, int NG, long long jstride,
                                                Row&& row, Add&& add) {
    const int gq = threadIdx.x % 32 / 4, tq = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m_first + i * 16 + gq + 8 * h;
            if (m >= M) continue;
            float* dst = row(m);
#pragma unroll
            for (int j = 0; j < NI; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = n_first + j * 8 + 2 * tq + e;
                    if (col >= NG) continue;
                    dst[col * jstride] = acc[i][j][2 * h + e] + add(col);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TF32 tensor-core kernel (opt-in precision "tf32"): mma.sync m16n8k8, fp32 accumulation.
// ---------------------------------------------------------------------------------------------
// Depth of the cp.async ring of a TF32 tile: CONV_STAGES, or as many stages as fit in 48 KiB of
// static shared memory (rows of BM + 4 and BN + 4 floats); cuda_conv.tf32_stages mirrors it.
__host__ __device__ constexpr int tf32_stages(int BM, int BN, int BK) {
    return (48 * 1024) / (BK * (BM + BN + 8) * 4) < CONV_STAGES
               ? (48 * 1024) / (BK * (BM + BN + 8) * 4) : CONV_STAGES;
}

// Registers: at most 128 per thread (512 threads per SM).
template <int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N, 512 / (32 * WARPS_M * WARPS_N))
conv_tf32(const float* __restrict__ a_src, const float* __restrict__ b_src,
          const float* __restrict__ bias, float* __restrict__ out, int N, int C, int H, int W,
          int K, int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
          int groups, int k_split, FC_FASTDIV_PARAMS) {
    constexpr int NT = 32 * WARPS_M * WARPS_N;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
    constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
    // Operands in mma fragment order (place<FRAG_A>, place<FRAG_B>, krow): one 16-byte load
    // per A fragment and per pair of B fragments. Rows of BM + 4 floats (2 LD = 8 mod 32).
    constexpr int QA = FRAG_A, QB = FRAG_B;
    constexpr int LDA = BM + 4, LDB = BN + 4;
    constexpr int STAGES = tf32_stages(BM, BN, BK);
    static_assert(WTM % 16 == 0 && WTN % 16 == 0 && BK % 8 == 0 && (NT / BK) % 16 == 0,
                  "conv_tf32: bad tile shape");
    static_assert(STAGES >= 2, "conv_tf32: two stages do not fit in static shared memory");
    __shared__ __align__(16) float As[STAGES * BK * LDA];
    __shared__ __align__(16) float Bs[STAGES * BK * LDB];

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
    la.template init<QA>(s, a_src, g, m0, k_begin, tid);
    lb.template init<QB>(s, b_src, g, n0, k_begin, tid);

    const int lane = tid % 32, warp = tid / 32;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    const int gq = lane / 4, tq = lane % 4;  // "groupID" and "threadID_in_group" of the PTX ISA
    // This lane's fragments of the first mma tile of its warp tile, reduction steps 0..7:
    // row pair tq (krow), lane slot gq (place); tile i (j) is 32 i (16 j) floats further.
    const int b_off = 2 * tq * LDB + place<FRAG_B>(wn * WTN) + 4 * gq;
    float acc[MI][NI][4];
    zero_acc(acc);

    mainloop<STAGES, true, LDA, LDB, BK, QA, QB>(s, la, lb, As, Bs, k_begin, k_end,
                                                 [&](const float* as, const float* bs) {
        // Recomputed from the thread index at each step rather than kept live through the
        // loop (as a_off of (tq, gq, wm) would be): one register fewer keeps the 128x128 tile
        // at BK = 16 within 128 registers without a spill on sm_90.
        const int l = threadIdx.x % 32, w = threadIdx.x / 32;
        const int a_off = 2 * (l % 4) * LDA + place<FRAG_A>(w % WARPS_M * WTM) + 4 * (l / 4);
#pragma unroll
        for (int k8 = 0; k8 < BK; k8 += 8) {
            // Fragments (PTX ISA, m16n8k8 .tf32): a = A[g][t], A[g+8][t], A[g][t+4],
            // A[g+8][t+4]; b = B[t][g], B[t+4][g].
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                float v[4];
                load16(v, as + k8 * LDA + a_off + 32 * i);
#pragma unroll
                for (int q = 0; q < 4; ++q) a[i][q] = __float_as_uint(v[q]);
            }
#pragma unroll
            for (int j = 0; j < NI; j += 2) {
                float v[4];
                load16(v, bs + k8 * LDB + b_off + 16 * j);
#pragma unroll
                for (int q = 0; q < 4; ++q) b[j + q / 2][q % 2] = __float_as_uint(v[q]);
            }
            mma_warp_tile(acc, a, b);
        }
    });

    // Epilogue. The slice index is recomputed here rather than kept live through the main loop.
    const int split = blockIdx.z / groups;
    const OutIndex<MODE> oi(s, g, split);
    store_warp_tile(acc, m0 + wm * WTM, n0 + wn * WTN, M, NG, oi.jstride,
                    [&](int m) { return out + oi.row(m, s); },
                    [&](int col) {
                        return (MODE == FPROP && bias != nullptr && split == 0)
                                   ? bias[g * NG + col] : 0.0f;
                    });
}

// ---------------------------------------------------------------------------------------------
// TF32 forward over channels-last operands (conv_tf32_nhwc) and its pre-pass (nhwc_tf32_copy).
// ---------------------------------------------------------------------------------------------
// Pre-pass: a channels-last copy of an operand, rounded to TF32 once (to_tf32), the channels of
// each group padded with zeros to Cgp (a multiple of 4), so that every 16-byte run of 4
// channels is aligned and lies in one group:
//   dst[((b * plane + i) * G + g) * Cgp + c] = to_tf32(src[b * stride_b + (g * Cg + c) *
//                                                      stride_c + i])  (c < Cg; 0 for c >= Cg)
// x (N, C, H, W) -> (N, H, W, G, Cgp): b = n, plane = H*W, stride_b = C*H*W, stride_c = H*W;
// weight (K, Cg, R, S) -> (K, R, S, Cgp): G = 1, b = k, plane = R*S, stride_b = Cg*R*S,
// stride_c = R*S. Memory-bound: a 32 x 32 (channel x pixel) tile passes through shared memory
// so that reads run along the pixels and writes along the channels (both coalesced; the
// writes in 16-byte vectors).
// Grid (ceil(plane / 32), G * ceil(Cgp / 32), images), block (32, 8).
__global__ void __launch_bounds__(256)
nhwc_tf32_copy(const float* __restrict__ src, float* __restrict__ dst, int plane, int G, int Cg,
               int Cgp, long long stride_b, long long stride_c) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int cblocks = (Cgp + 31) / 32;
    const int g = blockIdx.y / cblocks, c0 = (blockIdx.y - g * cblocks) * 32;
    const int i0 = blockIdx.x * 32;
    const long long b = blockIdx.z;
    const float* in = src + b * stride_b + (long long)g * Cg * stride_c;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int c = c0 + ty + 8 * k, i = i0 + tx;
        tile[ty + 8 * k][tx] = c < Cg && i < plane ? to_tf32(in[c * stride_c + i]) : 0.0f;
    }
    __syncthreads();
    // One 16-byte store a thread: 4 channels (c0 + 4q ...) of pixel i0 + il; Cgp is a multiple
    // of 4, so a chunk is wholly inside or outside, and 16-byte aligned. Shared reads
    // tile[4q + r][il] hit 32 distinct banks across a warp (4 pixels x 8 chunks).
    const int t = ty * 32 + tx, il = t / 8, q = t % 8;
    const int i = i0 + il, c = c0 + 4 * q;
    if (i < plane && c < Cgp) {
        float v[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) v[r] = tile[4 * q + r][il];
        store16(dst + ((b * plane + i) * G + g) * (long long)Cgp + c, v);
    }
}

// conv_tf32_nhwc<BM, BN, BK, WARPS_M, WARPS_N>: y (N, K, P, Q) = x * weight (+ bias) from the
// pre-pass buffers xt (N, H, W, G, Cgp) and wt (K, R, S, Cgp), both already TF32. One GEMM per
// group (blockIdx.z % groups): rows = output pixels, columns = the group's filters, reduction
// over (r, s, c4) in chunks of 4 channels (16 bytes): chunk t = (r * S + s) * C4 + c4, C4 =
// Cgp / 4, so a BK = 16 step may span taps. Every global -> shared copy is one 16-byte
// cp.async (zero-fill for taps outside the image and past the reduction); shared tiles are
// row-major [row][16 floats] with the 16-byte chunk index XOR-swizzled by (row / 2) % 4, so
// that the 8 rows of each ldmatrix phase hit 8 distinct 16-byte bank groups; fragments come
// from ldmatrix.x4 (one per A fragment, one per pair of B fragments); nothing is rounded in
// the main loop. Reduction slices as in conv_tf32, k_split counting chunks (slice z writes
// out + z * N*K*P*Q, bias in slice 0 only).
// Arguments: xt, wt, bias (or null), out, then N, H, W, K, R, S, P, Q, sh, sw, pt, pl, dh, dw,
// groups, Cgp, k_split (int32), then (mul, shift) of C4, S, P*Q and Q.
struct NhwcShape {
    int H, W, S, dh, dw, GC, C4;  // GC = groups * Cgp: the pixel stride of xt
    FastDiv by_c4, by_s;
};

// Offset of 16-byte chunk kc (0..3) of row `row` in a shared tile of 16-float rows.
__device__ __forceinline__ int swizzled(int row, int kc) {
    return row * 16 + ((kc ^ ((row >> 1) & 3)) << 2);
}

// A: BM output pixels. Thread tid copies chunk tid % 4 of rows tid / 4 + RPP * i; each row
// keeps a pointer to its window origin in xt and the origin's coordinates (bounds checks).
template <int BM, int NT>
struct NhwcPixels {
    static constexpr int RPP = NT / 4;  // rows per pass
    static constexpr int PER = BM / RPP;
    static_assert(NT % 32 == 0 && BM % RPP == 0, "NhwcPixels: tile does not split evenly");
    const float* org[PER];  // &xt[n, bh, bw, g, 0] (a notional address outside the image)
    int bh[PER], bw[PER];   // p * sh - pt, q * sw - pl (FAR: past the last row)
    int dst, t;             // swizzled offset of this thread's chunk; its reduction chunk

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const NhwcShape& s, int k_end, float* tile) {
        const int tap = s.by_c4(t);
        const int c4 = t - tap * s.C4;
        const int r = s.by_s(tap);
        const int dr = r * s.dh, ds = (tap - r * s.S) * s.dw;
        const int off = (dr * s.W + ds) * s.GC + 4 * c4;  // < 2^31 (the launcher checks)
        const bool kval = t < k_end;
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const bool ok = kval && (unsigned)(bh[i] + dr) < (unsigned)s.H
                            && (unsigned)(bw[i] + ds) < (unsigned)s.W;
            cp_async<16>(tile + dst + 16 * RPP * i, org[i] + off, ok);
        }
        t += 4;
    }
};

// B: BN filters of wt, whose (r, s, c) axis is contiguous: chunk t of filter k is at
// wt + (k * KC + t) * 4 with KC = R*S*C4, so the copies advance by 16 floats a step.
template <int BN, int NT>
struct NhwcFilters {
    static constexpr int RPP = NT / 4;
    static constexpr int PER = BN / RPP;
    static_assert(NT % 32 == 0 && BN % RPP == 0, "NhwcFilters: tile does not split evenly");
    const float* org;  // &wt[g*Kg + n0 + tid / 4, chunk t]
    long long stride;  // RPP filters
    int live;          // this thread's rows inside the group's filters (i < live)
    int dst, t;

    template <int LD, int Q>
    __device__ __forceinline__ void fetch(const NhwcShape&, int k_end, float* tile) {
        const bool kval = t < k_end;
#pragma unroll
        for (int i = 0; i < PER; ++i)
            cp_async<16>(tile + dst + 16 * RPP * i, org + stride * i, kval && i < live);
        org += 16;
        t += 4;
    }
};

// Stages of the conv_tf32_nhwc ring: four, or as many as fit in 48 KiB of static shared memory
// (BM + BN rows of 16 floats a stage); cuda_conv.nhwc_stages mirrors it.
__host__ __device__ constexpr int nhwc_stages(int BM, int BN) {
    return (48 * 1024) / (64 * (BM + BN)) < CONV_STAGES ? (48 * 1024) / (64 * (BM + BN))
                                                        : CONV_STAGES;
}

template <int BM, int BN, int BK, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N, 512 / (32 * WARPS_M * WARPS_N))
conv_tf32_nhwc(const float* __restrict__ xt, const float* __restrict__ wt,
               const float* __restrict__ bias, float* __restrict__ out, int N, int H, int W,
               int K, int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
               int groups, int Cgp, int k_split, unsigned mul_c4, int shift_c4, unsigned mul_s,
               int shift_s, unsigned mul_pq, int shift_pq, unsigned mul_q, int shift_q) {
    constexpr int NT = 32 * WARPS_M * WARPS_N;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
    constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
    constexpr int STAGES = nhwc_stages(BM, BN);
    static_assert(BK == 16, "conv_tf32_nhwc: BK = 16 (four 16-byte chunks a row)");
    static_assert(WTM % 16 == 0 && WTN % 16 == 0, "conv_tf32_nhwc: bad warp tile");
    static_assert(STAGES >= 3, "conv_tf32_nhwc: three stages do not fit in 48 KiB");
    __shared__ __align__(16) float As[STAGES * BM * BK];
    __shared__ __align__(16) float Bs[STAGES * BN * BK];

    const NhwcShape s{H, W, S, dh, dw, groups * Cgp, Cgp / 4, {mul_c4, shift_c4},
                      {mul_s, shift_s}};
    const FastDiv by_pq{mul_pq, shift_pq}, by_q{mul_q, shift_q};
    const int tid = threadIdx.x;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int g = blockIdx.z % groups, split = blockIdx.z / groups;
    const int PQ = P * Q, M = N * PQ, Kg = K / groups;
    const int KC = R * S * (Cgp / 4);
    const int k_begin = split * k_split;
    const int k_end = min(KC, k_begin + k_split);

    NhwcPixels<BM, NT> la;
    NhwcFilters<BN, NT> lb;
    {
        const int kc = tid % 4, row = tid / 4;
        la.dst = lb.dst = swizzled(row, kc);
        la.t = lb.t = k_begin + kc;
#pragma unroll
        for (int i = 0; i < NhwcPixels<BM, NT>::PER; ++i) {
            const int m = m0 + row + NhwcPixels<BM, NT>::RPP * i;
            la.org[i] = xt;
            la.bh[i] = FAR;
            la.bw[i] = FAR;
            if (m < M) {
                const int n = by_pq(m);
                const int rem = m - n * PQ;
                const int p = by_q(rem);
                la.bh[i] = p * sh - pt;
                la.bw[i] = (rem - p * Q) * sw - pl;
                la.org[i] = xt + (((long long)n * H + la.bh[i]) * W + la.bw[i]) * s.GC
                            + (long long)g * Cgp;
            }
        }
        const int j0 = n0 + row;
        lb.live = j0 < Kg ? (Kg - j0 + NhwcFilters<BN, NT>::RPP - 1) / NhwcFilters<BN, NT>::RPP
                          : 0;
        lb.org = wt + ((long long)(g * Kg + j0) * KC + lb.t) * 4;
        lb.stride = (long long)NhwcFilters<BN, NT>::RPP * KC * 4;
    }

    const int lane = tid % 32, warp = tid / 32;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    float acc[MI][NI][4];
    zero_acc(acc);
    // ldmatrix.x4 row addresses of this lane for the two k8 halves of a stage (the swizzle
    // term depends on the lane only, so they stay fixed through the loop). Lane l addresses
    // row l % 8 of matrix l / 8. A: matrices (rows 0-7, k 0-3), (rows 8-15, k 0-3), (rows 0-7,
    // k 4-7), (rows 8-15, k 4-7) = a0..a3 of m16n8k8; B: (n 0-7, k 0-3), (n 0-7, k 4-7),
    // (n 8-15, k 0-3), (n 8-15, k 4-7) = b0, b1 of n-tile j and of j + 1, so each b[j] is a
    // register pair as mma.sync takes it.
    int a_off[2], b_off[2];
    {
        const int a_row = wm * WTM + lane % 16, b_row = wn * WTN + lane % 8 + 8 * (lane / 16);
#pragma unroll
        for (int k8 = 0; k8 < 2; ++k8) {
            a_off[k8] = swizzled(a_row, 2 * k8 + lane / 16);
            b_off[k8] = swizzled(b_row, 2 * k8 + lane / 8 % 2);
        }
    }
    // mainloop's BK counts reduction chunks (4 a step), its LDA/LDB make the stage sizes
    // BM * 16 and BN * 16 floats.
    mainloop<STAGES, false, 4 * BM, 4 * BN, 4, 0, 0>(s, la, lb, As, Bs, k_begin, k_end,
                                                    [&](const float* as, const float* bs) {
#pragma unroll
        for (int k8 = 0; k8 < 2; ++k8) {
            unsigned a[MI][4], b[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) ldmatrix_x4(a[i], as + a_off[k8] + 256 * i);
#pragma unroll
            for (int j = 0; j < NI; j += 2) {
                unsigned v[4];
                ldmatrix_x4(v, bs + b_off[k8] + 128 * j);
                b[j][0] = v[0];
                b[j][1] = v[1];
                b[j + 1][0] = v[2];
                b[j + 1][1] = v[3];
            }
            mma_warp_tile(acc, a, b);
        }
    });

    // Epilogue: y[n, g*Kg + col, p, q] (+ bias in slice 0).
    const long long img = (long long)K * PQ;
    float* y = out + (long long)split * N * img + (long long)g * Kg * PQ;
    store_warp_tile(acc, m0 + wm * WTM, n0 + wn * WTN, M, Kg, PQ,
                    [&](int m) {
                        const int n = by_pq(m);
                        return y + n * img + (m - n * PQ);
                    },
                    [&](int col) {
                        return bias != nullptr && split == 0 ? bias[g * Kg + col] : 0.0f;
                    });
}

}  // namespace fc
