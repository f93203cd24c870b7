// depthwise.cu -- depthwise convolution (groups == C, K = C * mult): forward, input gradient,
// weight gradient.
//
// Layout
//   x (N, C, H, W), weight (K, 1, R, S), y and grad_output (N, K, P, Q), C-contiguous, T is
//   float or double. Output channel k reads input channel c = k / mult:
//     y[n, k, p, q] = bias[k] + sum_{r, s} x[n, k / mult, p*sh - pt + r*dh, q*sw - pl + s*dw]
//                                          * weight[k, 0, r, s]
//
// Every kernel streams its global loads through cp.async (sm_80+; zero-fill with src-size 0
// for taps outside the image or plane, nothing read there) into a two-stage shared-memory ring:
// the copies of the next piece of work are in flight while the current one is computed
// (commit one group per piece, wait_group 1 before computing it).
//
// Kernels, launch geometry (kernels/cuda_conv.py computes it) and variants
//   depthwise_fprop<T, TP, TQ, RPT>: work item = one TP x TQ output tile of one (n, k) plane,
//     u = ((n*K + k) * ceil(P/TP) + tile_p) * ceil(Q/TQ) + tile_q. Block = (TQ, TP/RPT), each
//     thread computes RPT outputs of one column; a block takes items blockIdx.x,
//     blockIdx.x + gridDim.x, ... with grid = ceil(items / DEPTHWISE_ITEMS_PER_BLOCK). A stage
//     holds the item's input window, IH x IW = ((TP-1)*sh + (R-1)*dh + 1) x
//     ((TQ-1)*sw + (S-1)*dw + 1) (rows widened with vec, below), then its R*S taps, rounded up
//     to 16 bytes; dynamic shared memory = 2 stages (cuda_conv.depthwise_smem_bytes).
//   depthwise_dgrad<T, TH, TW, RPT>: tile = TH x TW grad_input elements of one (n, c) plane,
//     u = ((n*C + c) * ceil(H/TH) + tile_h) * ceil(W/TW) + tile_w, block = (TW, TH/RPT); a
//     block takes tiles blockIdx.x, blockIdx.x + gridDim.x, ... (grid as above), and each tile
//     in mult pieces, one per filter k = c*mult + j. A stage holds filter k's grad_output
//     window, PH x PW = ((TH-1 + (R-1)*dh)/sh + 1) x ((TW-1 + (S-1)*dw)/sw + 1) from row
//     pmin, column qmin (the first rows/columns the tile gathers from), then its taps; two
//     stages of dynamic shared memory. Each element gathers
//     grad_output[n, k, (h + pt - r*dh)/sh, (w + pl - s*dw)/sw] where the divisions are exact
//     (the stride-dilated, padded grad_output correlated with the rotated kernel, lecture notes
//     7.5, without building the dilated copy), accumulating over j in registers, in the order
//     (j, r, s).
//   depthwise_wgrad<T, NT>: one block of NT threads per weight element (k, r, s), grid = K*R*S.
//     Piece = (n, chunk): U = 16 / sizeof(T) pixels per thread, pq = chunk*U*NT + i*NT +
//     thread; a stage holds their grad_output values and the input pixels the tap reads
//     (static shared memory, 2 * 2 * U * NT elements). Each thread sums its own pixels in the
//     order n, then pq ascending, then a fixed-order block reduction (no atomics).
//
// Window copies: one element per cp.async, or with `vec` (the last argument) whole 16-byte
// vectors: the launcher sets it when the rows of the source plane (x: W, grad_output: Q) are
// whole vectors and the tensor is 16-byte aligned (cuda_conv.depthwise_vector_ok). A window
// row then starts at the vector boundary at or below its first column and is
// dw_window_width = round_up(cols + V - 1, V) elements long in shared memory (V = 16 /
// sizeof(T)); the compute reads it shifted by dw_window_shift. Each vector lies entirely inside
// or outside the plane, so zero-fill stays exact.
//
// Index arithmetic: plane and element offsets are 64-bit; every division in a loop is a FastDiv
// multiply-shift (fc_common.cuh) by a divisor the launcher prepared: the arguments after dw are
// (mul, shift) of C, sh, sw, Q, K, mult = K/C, the copies per window row of depthwise_fprop
// (IW, or dw_window_width(IW) / V with vec) and of depthwise_dgrad (PW likewise), ceil(Q/TQ),
// ceil(P/TP), ceil(W/TW) and ceil(H/TH), then vec (kernels/cuda_conv.py,
// depthwise_divisor_args). The launcher keeps item and tile counts below 2^30 and every plane
// below 2^31 elements (cuda_conv.depthwise_fits).
//
// Verification status: compiled by NVRTC for sm_80 and sm_90 in CI and executed on the CPU in
// the host emulation of tests/test_cuda_emulated.py (cp.async groups emulated) against the
// NumPy reference; not yet run on a GPU when this was written (speed unmeasured).

#include "fc_common.cuh"

namespace fc {

// The divisor parameters of the depthwise kernels, after dw (cuda_conv.depthwise_divisor_args).
#define FC_DW_FASTDIV_PARAMS                                                                 \
    unsigned mul_c, int shift_c, unsigned mul_sh, int shift_sh, unsigned mul_sw,            \
        int shift_sw, unsigned mul_q, int shift_q, unsigned mul_k, int shift_k,             \
        unsigned mul_m, int shift_m, unsigned mul_iw, int shift_iw, unsigned mul_pw,        \
        int shift_pw, unsigned mul_qt, int shift_qt, unsigned mul_pt, int shift_pt,         \
        unsigned mul_wt, int shift_wt, unsigned mul_ht, int shift_ht, int vec

// Elements of one stage of the ring of depthwise_fprop / depthwise_dgrad: a window of `window`
// elements, then the R*S taps, rounded up to whole 16-byte vectors (cuda_conv.dw_stage_elems).
template <typename T>
__device__ __forceinline__ int dw_stage_elems(int window, int taps) {
    constexpr int A = 16 / sizeof(T);
    return (window + taps + A - 1) / A * A;
}

// Starts the copies of filter k's R*S taps into `taps`, one element per copy.
template <typename T, int NT>
__device__ __forceinline__ void dw_fetch_taps(T* taps, const T* weight, int k, int RS,
                                              int tid) {
    const T* src = weight + (long long)k * RS;
#pragma unroll 1
    for (int e = tid; e < RS; e += NT) cp_async<sizeof(T)>(taps + e, src + e, true);
}

// Row length in shared memory of a window `cols` elements wide: `cols`, or with 16-byte copies
// (vec != 0) room for the window shifted right by up to V - 1 elements, in whole vectors of
// V = 16 / sizeof(T) elements (cuda_conv.depthwise_window_width).
template <typename T>
__device__ __forceinline__ int dw_window_width(int cols, int vec) {
    constexpr int V = 16 / sizeof(T);
    return vec ? (cols + 2 * V - 2) / V * V : cols;
}

// Where column c0 of the plane lands in a window row: 0, or with 16-byte copies its offset from
// the vector boundary below it (c0 may be negative: two's complement, c0 & (V-1) >= 0).
template <typename T>
__device__ __forceinline__ int dw_window_shift(int c0, int vec) {
    return vec ? c0 & (16 / (int)sizeof(T) - 1) : 0;
}

// Starts the copies of a rows x cols window of the plane `plane` (row length ld) whose element
// (i, j) is plane[(r0 + i) * ld + c0 + j] where 0 <= r0 + i < nrows and 0 <= c0 + j < ncols, and
// zero elsewhere (nothing read); it lands at dst[i * width + shift + j] (dw_window_width,
// dw_window_shift). Element copies, or with vec != 0 (ld and ncols multiples of V, plane
// 16-byte aligned: the launcher checks) 16-byte copies of whole vectors, each entirely inside
// or outside the plane, from the vector boundary at or below c0. by_copies divides by the
// copies per row (cols, or width / V). In-plane offsets stay below 2^31
// (cuda_conv.depthwise_fits).
template <typename T, int NT>
__device__ __forceinline__ void dw_fetch_window(T* dst, const T* plane, int ld, int rows,
                                                int cols, int r0, int c0, int nrows, int ncols,
                                                int vec, FastDiv by_copies, int tid) {
    if (vec) {
        constexpr int V = 16 / sizeof(T);
        const int per_row = dw_window_width<T>(cols, vec) / V;
        const int first = c0 - dw_window_shift<T>(c0, vec);
#pragma unroll 1
        for (int e = tid; e < rows * per_row; e += NT) {
            const int i = by_copies(e);
            const int gr = r0 + i, gc = first + (e - i * per_row) * V;
            const bool ok = (unsigned)gr < (unsigned)nrows && (unsigned)gc < (unsigned)ncols;
            cp_async<16>(dst + e * V, ok ? plane + (gr * ld + gc) : plane, ok);
        }
    } else {
#pragma unroll 1
        for (int e = tid; e < rows * cols; e += NT) {
            const int i = by_copies(e);
            const int gr = r0 + i, gc = c0 + (e - i * cols);
            const bool ok = (unsigned)gr < (unsigned)nrows && (unsigned)gc < (unsigned)ncols;
            cp_async<sizeof(T)>(dst + e, ok ? plane + (gr * ld + gc) : plane, ok);
        }
    }
}

// Tile u = ((n * CH + ch) * rows + tile_row) * cols + tile_col of TR x TC elements: its image,
// channel (k for the forward, c for the input gradient) and first row and column.
struct DwTile {
    int n, ch, r0, c0;
};

template <int TR, int TC>
__device__ __forceinline__ DwTile dw_tile(int u, int rows, int cols, int CH, FastDiv by_rows,
                                          FastDiv by_cols, FastDiv by_ch) {
    DwTile t;
    const int rest = by_cols(u);
    t.c0 = (u - rest * cols) * TC;
    const int plane = by_rows(rest);
    t.r0 = (rest - plane * rows) * TR;
    t.n = by_ch(plane);
    t.ch = plane - t.n * CH;
    return t;
}

// ---------------------------------------------------------------------------------------------
// Forward: work item u = (plane * PT + tile_p) * QT + tile_q, plane = n * K + k.
// ---------------------------------------------------------------------------------------------
template <typename T, int TP, int TQ, int RPT>
__global__ void __launch_bounds__(TQ * (TP / RPT))
depthwise_fprop(const T* __restrict__ x, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ y, int N, int C, int H, int W,
                int K, int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh,
                int dw, FC_DW_FASTDIV_PARAMS) {
    static_assert(TP % RPT == 0, "depthwise_fprop: TP must be a multiple of RPT");
    constexpr int NT = TQ * (TP / RPT);
    const FastDiv by_iw{mul_iw, shift_iw}, by_qt{mul_qt, shift_qt}, by_pt{mul_pt, shift_pt},
        by_k{mul_k, shift_k}, by_m{mul_m, shift_m};
    FC_DYNAMIC_SMEM(smem_raw);
    T* ring = reinterpret_cast<T*>(smem_raw);
    const int IH = (TP - 1) * sh + (R - 1) * dh + 1;
    const int IW = (TQ - 1) * sw + (S - 1) * dw + 1;
    const int IWS = dw_window_width<T>(IW, vec);  // row length of the window in a stage
    const int RS = R * S;
    const int stage = dw_stage_elems<T>(IH * IWS, RS);
    const int QT = (Q + TQ - 1) / TQ, PT = (P + TP - 1) / TP;
    const int items = N * K * PT * QT;  // < 2^31 (cuda_conv.depthwise_fits)
    const int tid = threadIdx.y * TQ + threadIdx.x;
    const int ql = threadIdx.x;

    // Starts the copies of item v's input window (zero outside the image) and taps into dst.
    auto fetch = [=](int v, T* dst) {
        const DwTile it = dw_tile<TP, TQ>(v, PT, QT, K, by_pt, by_qt, by_k);
        dw_fetch_window<T, NT>(dst, x + ((long long)it.n * C + by_m(it.ch)) * H * W, W, IH, IW,
                               it.r0 * sh - pt, it.c0 * sw - pl, H, W, vec, by_iw, tid);
        dw_fetch_taps<T, NT>(dst + IH * IWS, weight, it.ch, RS, tid);
    };
    int u = blockIdx.x;
    if (u < items) fetch(u, ring);
    cp_async_commit();
    for (int s = 0; u < items; u += gridDim.x, s ^= 1) {
        // Item u + gridDim.x into the other stage while item u is computed.
        if (u + (int)gridDim.x < items) fetch(u + gridDim.x, ring + (s ^ 1) * stage);
        cp_async_commit();
        cp_async_wait<1>();  // item u's copies are done (this thread's) ...
        __syncthreads();     // ... and everyone's
        const DwTile it = dw_tile<TP, TQ>(u, PT, QT, K, by_pt, by_qt, by_k);  // it.ch = k
        const T* tile = ring + s * stage;
        const T* taps = tile + IH * IWS;
        const int shift = dw_window_shift<T>(it.c0 * sw - pl, vec);
        const int q = it.c0 + ql;
        const T b = bias != nullptr ? bias[it.ch] : T(0);
        T* yout = y + ((long long)it.n * K + it.ch) * P * Q;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int plo = threadIdx.y + i * (TP / RPT), p = it.r0 + plo;
            T acc = T(0);
            for (int r = 0; r < R; ++r) {
                const T* row = tile + (plo * sh + r * dh) * IWS + shift + ql * sw;
                for (int t = 0; t < S; ++t) acc = fmadd(row[t * dw], taps[r * S + t], acc);
            }
            if (p < P && q < Q) yout[(long long)p * Q + q] = acc + b;
        }
        __syncthreads();  // stage s is refilled by the next iteration
    }
    cp_async_wait<0>();  // only an empty group can remain; nothing is in flight at exit
}

// ---------------------------------------------------------------------------------------------
// Input gradient: tile u = ((n * C + c) * HT + tile_h) * WT + tile_w of TH x TW grad_input
// elements; piece (u, j) for each of the mult filters k = c * mult + j of channel c.
// ---------------------------------------------------------------------------------------------
// First grad_output row (column) an input-gradient tile starting at row h0 (column w0)
// gathers from: the smallest p >= 0 with p * sh >= h0 + pt - (R-1) * dh, for
// lo = h0 + pt - (R-1) * dh.
__device__ __forceinline__ int dw_first_source(int lo, int stride, FastDiv by_stride) {
    return lo <= 0 ? 0 : by_stride(lo + stride - 1);
}

template <typename T, int TH, int TW, int RPT>
__global__ void __launch_bounds__(TW * (TH / RPT))
depthwise_dgrad(const T* __restrict__ grad_output, const T* __restrict__ weight,
                T* __restrict__ grad_input, int N, int C, int H, int W, int K, int R, int S,
                int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
                FC_DW_FASTDIV_PARAMS) {
    static_assert(TH % RPT == 0, "depthwise_dgrad: TH must be a multiple of RPT");
    constexpr int NT = TW * (TH / RPT);
    const FastDiv by_c{mul_c, shift_c}, by_sh{mul_sh, shift_sh}, by_sw{mul_sw, shift_sw},
        by_pw{mul_pw, shift_pw}, by_wt{mul_wt, shift_wt}, by_ht{mul_ht, shift_ht};
    FC_DYNAMIC_SMEM(smem_raw);
    T* ring = reinterpret_cast<T*>(smem_raw);
    // The grad_output window of a tile: rows pmin .. pmin + PH - 1 (PW columns likewise) hold
    // every row its elements gather from (those p with p * sh in an interval of length
    // TH - 1 + (R-1) * dh).
    const int PH = by_sh(TH - 1 + (R - 1) * dh) + 1;
    const int PW = by_sw(TW - 1 + (S - 1) * dw) + 1;
    const int PWS = dw_window_width<T>(PW, vec);  // row length of the window in a stage
    const int RS = R * S;
    const int stage = dw_stage_elems<T>(PH * PWS, RS);
    const int mult = by_c(K);
    const int HT = (H + TH - 1) / TH, WT = (W + TW - 1) / TW;
    const int tiles = N * C * HT * WT;  // < 2^30 (cuda_conv.depthwise_fits)
    const int tid = threadIdx.y * TW + threadIdx.x;

    // Starts the copies of piece (v, j): filter k's grad_output window (zero outside the
    // plane) and taps, into dst.
    auto fetch = [=](int v, int j, T* dst) {
        const DwTile d = dw_tile<TH, TW>(v, HT, WT, C, by_ht, by_wt, by_c);  // d.ch = c
        const int k = d.ch * mult + j;
        dw_fetch_window<T, NT>(dst, grad_output + ((long long)d.n * K + k) * P * Q, Q, PH, PW,
                               dw_first_source(d.r0 + pt - (R - 1) * dh, sh, by_sh),
                               dw_first_source(d.c0 + pl - (S - 1) * dw, sw, by_sw), P, Q,
                               vec, by_pw, tid);
        dw_fetch_taps<T, NT>(dst + PH * PWS, weight, k, RS, tid);
    };
    int u = blockIdx.x, j = 0;
    if (u < tiles) fetch(u, 0, ring);
    cp_async_commit();
    T acc[RPT];
    for (int s = 0; u < tiles; s ^= 1) {
        // The next piece into the other stage while this one is computed.
        int un = u, jn = j + 1;
        if (jn == mult) {
            jn = 0;
            un += gridDim.x;
        }
        if (un < tiles) fetch(un, jn, ring + (s ^ 1) * stage);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const DwTile d = dw_tile<TH, TW>(u, HT, WT, C, by_ht, by_wt, by_c);
        const int pmin = dw_first_source(d.r0 + pt - (R - 1) * dh, sh, by_sh);
        const int qmin = dw_first_source(d.c0 + pl - (S - 1) * dw, sw, by_sw);
        const T* win = ring + s * stage;
        const T* taps = win + PH * PWS;
        const int shift = dw_window_shift<T>(qmin, vec);
        const int w = d.c0 + threadIdx.x;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int h = d.r0 + threadIdx.y + i * (TH / RPT);
            T a = j == 0 ? T(0) : acc[i];
            // grad_output[p, q] reaches (h, w) through tap (r, t) when p * sh = h + pt - r * dh
            // and q * sw = w + pl - t * dw: exact divisions (FastDiv and a multiply-compare).
            for (int r = 0; r < R; ++r) {
                const int nh = h + pt - r * dh;
                if (nh < 0) break;  // larger r only moves further up
                const int p = by_sh(nh);
                if (p * sh != nh || p >= P) continue;
                const T* row = win + (p - pmin) * PWS + shift;
                for (int t = 0; t < S; ++t) {
                    const int nw = w + pl - t * dw;
                    if (nw < 0) break;
                    const int q = by_sw(nw);
                    if (q * sw != nw || q >= Q) continue;
                    a = fmadd(row[q - qmin], taps[r * S + t], a);
                }
            }
            acc[i] = a;
            if (jn == 0 && h < H && w < W) {
                grad_input[(((long long)d.n * C + d.ch) * H + h) * W + w] = a;
            }
        }
        __syncthreads();  // stage s is refilled by the next iteration
        u = un;
        j = jn;
    }
    cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: one block per weight element (k, r, s); piece (n, chunk) = U * NT output
// pixels pq = chunk * U * NT + i * NT + thread (i < U) of image n, with their grad_output
// values and the input pixels the tap reads.
// ---------------------------------------------------------------------------------------------
// U: 16 bytes of each operand per thread per stage (4 floats, 2 doubles), 16 KiB of ring for
// NT = 256 (cuda_conv.depthwise_wgrad_unroll).
template <typename T>
__host__ __device__ constexpr int dw_wgrad_unroll() { return 16 / sizeof(T); }

template <typename T, int NT>
__global__ void __launch_bounds__(NT)
depthwise_wgrad(const T* __restrict__ x, const T* __restrict__ grad_output,
                T* __restrict__ grad_weight, int N, int C, int H, int W, int K, int R, int S,
                int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
                FC_DW_FASTDIV_PARAMS) {
    constexpr int U = dw_wgrad_unroll<T>();
    __shared__ T scratch[NT / 32];
    // [stage][grad_output, x][i][thread]: each thread reads back only its own copies, so the
    // ring needs no barrier (cp.async.wait_group makes them visible to the issuing thread).
    __shared__ __align__(16) T ring[2][2][U][NT];
    const FastDiv by_q{mul_q, shift_q}, by_m{mul_m, shift_m};
    const int e = blockIdx.x;  // k * R*S + r * S + s (once per block: plain division)
    const int RS = R * S;
    const int k = e / RS, r = (e % RS) / S, t = e % S;
    const int c = by_m(k);
    const int PQ = P * Q;
    const int chunks = (PQ + U * NT - 1) / (U * NT);  // per image
    const int dr = r * dh - pt, ds = t * dw - pl;
    const int tid = threadIdx.x;

    auto fetch = [=](int n, int chunk, int st) {
        const T* go = grad_output + ((long long)n * K + k) * PQ;
        const T* xin = x + ((long long)n * C + c) * H * W;
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const int pq = chunk * (U * NT) + i * NT + tid;  // < PQ + U*NT < 2^31
            const int p = by_q(pq), q = pq - p * Q;
            const int ih = p * sh + dr, iw = q * sw + ds;
            // Both zero where the tap is outside the image or past the plane: 0 * 0 adds 0.
            const bool ok = pq < PQ && (unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W;
            cp_async<sizeof(T)>(&ring[st][0][i][tid], ok ? go + pq : go, ok);
            cp_async<sizeof(T)>(&ring[st][1][i][tid], ok ? xin + (ih * W + iw) : xin, ok);
        }
    };
    T acc = T(0);
    int n = 0, chunk = 0;
    fetch(0, 0, 0);
    cp_async_commit();
    for (int s = 0; n < N; s ^= 1) {
        int nn = n, cn = chunk + 1;
        if (cn == chunks) {
            cn = 0;
            ++nn;
        }
        if (nn < N) fetch(nn, cn, s ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        // The same order as a plain loop over n, then pq = thread, thread + NT, ...
#pragma unroll
        for (int i = 0; i < U; ++i) acc = fmadd(ring[s][0][i][tid], ring[s][1][i][tid], acc);
        n = nn;
        chunk = cn;
    }
    cp_async_wait<0>();
    acc = block_sum<T, NT>(acc, scratch);
    if (threadIdx.x == 0) grad_weight[e] = acc;
}

}  // namespace fc
