// depthwise.cu -- depthwise convolution (groups == C, K = C * mult): forward, input gradient,
// weight gradient.
//
// Layout
//   x (N, C, H, W), weight (K, 1, R, S), y and grad_output (N, K, P, Q), C-contiguous, T is
//   float or double. Output channel k reads input channel c = k / mult:
//     y[n, k, p, q] = bias[k] + sum_{r, s} x[n, k / mult, p*sh - pt + r*dh, q*sw - pl + s*dw]
//                                          * weight[k, 0, r, s]
//
// Kernels, launch geometry (kernels/cuda_conv.py computes it) and variants
//   depthwise_fprop<T, TP, TQ, RPT>: one block per (n, k) plane tile of TP x TQ outputs,
//     grid = (N*K, ceil(P/TP), ceil(Q/TQ)), block = (TQ, TP/RPT); each thread computes RPT
//     outputs of one column. The input window of the tile,
//     IH x IW = ((TP-1)*sh + (R-1)*dh + 1) x ((TQ-1)*sw + (S-1)*dw + 1), and the R*S taps sit
//     in dynamic shared memory ((IH*IW + R*S) * sizeof(T) bytes); the dispatch rules use the
//     implicit-GEMM kernel instead when that exceeds 48 KiB.
//   depthwise_dgrad<T>: one thread per grad_input element: a warp takes a run of 32 pixels of
//     one row (work item u = row * ceil(W/32) + run, row = (n*C + c)*H + h; grid-stride over
//     the N*C*H*ceil(W/32) items, 8 per 256-thread block), gathering
//     grad_output[n, k, (h + pt - r*dh)/sh, (w + pl - s*dw)/sw] for the mult filters of
//     channel c where the divisions are exact (the stride-dilated, padded grad_output
//     correlated with the rotated kernel, lecture notes 7.5, without building the dilated copy).
//   depthwise_wgrad<T, NT>: one block of NT threads per weight element (k, r, s), grid = K*R*S;
//     for each image in turn, a strided sum over its P*Q pixels, then a fixed-order block
//     reduction (no atomics).
//
// Index arithmetic: plane and element offsets are 64-bit; every division in a loop is a FastDiv
// multiply-shift (fc_common.cuh) by a divisor the launcher prepared: the arguments after dw are
// (mul, shift) of W, H, C, sh, sw, Q, ceil(W/32) and the input-window width IW of
// depthwise_fprop's tile (kernels/cuda_conv.py, depthwise_divisor_args). The launcher keeps
// N*C*H*ceil(W/32) and every plane offset below 2^31 (cuda_conv.depthwise_fits).
//
// Verification status: compiled by NVRTC for sm_80 and sm_90 in CI and executed on the CPU in
// the host emulation of tests/test_cuda_emulated.py against the NumPy reference; not yet run
// on a GPU when this was written (speed unmeasured).

#include "fc_common.cuh"

namespace fc {

// The divisor parameters of the depthwise kernels, after dw.
#define FC_DW_FASTDIV_PARAMS                                                                 \
    unsigned mul_w, int shift_w, unsigned mul_h, int shift_h, unsigned mul_c, int shift_c,  \
        unsigned mul_sh, int shift_sh, unsigned mul_sw, int shift_sw, unsigned mul_q,       \
        int shift_q, unsigned mul_wr, int shift_wr, unsigned mul_iw, int shift_iw

template <typename T, int TP, int TQ, int RPT>
__global__ void __launch_bounds__(TQ * (TP / RPT))
depthwise_fprop(const T* __restrict__ x, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ y, int N, int C, int H, int W,
                int K, int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh,
                int dw, FC_DW_FASTDIV_PARAMS) {
    static_assert(TP % RPT == 0, "depthwise_fprop: TP must be a multiple of RPT");
    constexpr int NT = TQ * (TP / RPT);
    const FastDiv by_iw{mul_iw, shift_iw};
    FC_DYNAMIC_SMEM(smem_raw);
    T* tile = reinterpret_cast<T*>(smem_raw);
    const int IH = (TP - 1) * sh + (R - 1) * dh + 1;
    const int IW = (TQ - 1) * sw + (S - 1) * dw + 1;
    T* taps = tile + IH * IW;

    const int plane_id = blockIdx.x;  // n * K + k, < 2^31 (once per block: plain division)
    const int k = plane_id % K;
    const int n = plane_id / K;
    const int c = k / (K / C);
    const int p0 = blockIdx.y * TP, q0 = blockIdx.z * TQ;
    const int h0 = p0 * sh - pt, w0 = q0 * sw - pl;
    const T* xin = x + ((long long)n * C + c) * H * W;
    const int tid = threadIdx.y * TQ + threadIdx.x;

    for (int e = tid; e < IH * IW; e += NT) {
        const int ih = by_iw(e);
        const int gh = h0 + ih, gw = w0 + (e - ih * IW);
        const bool ok = (unsigned)gh < (unsigned)H && (unsigned)gw < (unsigned)W;
        tile[e] = ok ? xin[(long long)gh * W + gw] : T(0);
    }
    for (int e = tid; e < R * S; e += NT) taps[e] = weight[(long long)k * R * S + e];
    __syncthreads();

    const int ql = threadIdx.x, q = q0 + ql;
    const T b = bias != nullptr ? bias[k] : T(0);
    T* yout = y + (long long)plane_id * P * Q;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int plo = threadIdx.y + i * (TP / RPT), p = p0 + plo;
        T acc = T(0);
        for (int r = 0; r < R; ++r) {
            const T* row = tile + (plo * sh + r * dh) * IW + ql * sw;
            for (int t = 0; t < S; ++t) acc = fmadd(row[t * dw], taps[r * S + t], acc);
        }
        if (p < P && q < Q) yout[(long long)p * Q + q] = acc + b;
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
depthwise_dgrad(const T* __restrict__ grad_output, const T* __restrict__ weight,
                T* __restrict__ grad_input, int N, int C, int H, int W, int K, int R, int S,
                int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
                FC_DW_FASTDIV_PARAMS) {
    const FastDiv by_h{mul_h, shift_h}, by_c{mul_c, shift_c}, by_sh{mul_sh, shift_sh},
        by_sw{mul_sw, shift_sw}, by_wr{mul_wr, shift_wr};
    const int WR = (W + 31) / 32;          // runs of 32 pixels per row
    const int items = N * C * H * WR;      // < 2^31 (cuda_conv.depthwise_fits)
    const int mult = K / C;
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    for (int u = blockIdx.x * warps + threadIdx.x / 32; u < items; u += gridDim.x * warps) {
        const int row = by_wr(u);          // (n*C + c)*H + h
        const int w = (u - row * WR) * 32 + lane;
        if (w >= W) continue;
        const int nc = by_h(row);
        const int h = row - nc * H;
        const int n = by_c(nc);
        const int c = nc - n * C;
        T acc = T(0);
        for (int j = 0; j < mult; ++j) {
            const int k = c * mult + j;
            const T* go = grad_output + ((long long)n * K + k) * P * Q;
            const T* taps = weight + (long long)k * R * S;
            for (int r = 0; r < R; ++r) {
                const int nh = h + pt - r * dh;
                if (nh < 0) break;  // larger r only moves further up
                const int p = by_sh(nh);
                if (p * sh != nh || p >= P) continue;
                for (int t = 0; t < S; ++t) {
                    const int nw = w + pl - t * dw;
                    if (nw < 0) break;
                    const int q = by_sw(nw);
                    if (q * sw != nw || q >= Q) continue;
                    acc = fmadd(go[(long long)p * Q + q], taps[r * S + t], acc);
                }
            }
        }
        grad_input[(long long)row * W + w] = acc;
    }
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT)
depthwise_wgrad(const T* __restrict__ x, const T* __restrict__ grad_output,
                T* __restrict__ grad_weight, int N, int C, int H, int W, int K, int R, int S,
                int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
                FC_DW_FASTDIV_PARAMS) {
    __shared__ T scratch[NT / 32];
    const FastDiv by_q{mul_q, shift_q};
    const int e = blockIdx.x;  // k * R*S + r * S + s (once per block: plain division)
    const int RS = R * S;
    const int k = e / RS, r = (e % RS) / S, t = e % S;
    const int c = k / (K / C);
    const int PQ = P * Q;
    const int dr = r * dh - pt, ds = t * dw - pl;
    T acc = T(0);
    for (int n = 0; n < N; ++n) {
        const T* go = grad_output + ((long long)n * K + k) * PQ;
        const T* xin = x + ((long long)n * C + c) * H * W;
        for (int pq = threadIdx.x; pq < PQ; pq += NT) {
            const int p = by_q(pq), q = pq - p * Q;
            const int ih = p * sh + dr, iw = q * sw + ds;
            if ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W) {
                acc = fmadd(go[pq], xin[(long long)ih * W + iw], acc);
            }
        }
    }
    acc = block_sum<T, NT>(acc, scratch);
    if (threadIdx.x == 0) grad_weight[e] = acc;
}

}  // namespace fc
