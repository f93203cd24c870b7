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
//   depthwise_dgrad<T>: one thread per grad_input element (grid-stride loop over N*C*H*W),
//     gathering grad_output[n, k, (h + pt - r*dh)/sh, (w + pl - s*dw)/sw] for the mult filters
//     of channel c where the divisions are exact (the stride-dilated, padded grad_output
//     correlated with the rotated kernel, lecture notes 7.5, without building the dilated copy).
//   depthwise_wgrad<T, NT>: one block of NT threads per weight element (k, r, s), grid = K*R*S;
//     a strided sum over the N*P*Q pixels, then a fixed-order block reduction (no atomics).
//
// Index arithmetic: plane and element offsets are 64-bit.
//
// Verification status: compiled by NVRTC for sm_80 and sm_90 in CI and executed on the CPU in
// the host emulation of tests/test_cuda_emulated.py against the NumPy reference; not yet run
// on a GPU when this was written (speed unmeasured).

#include "fc_common.cuh"

namespace fc {

template <typename T, int TP, int TQ, int RPT>
__global__ void __launch_bounds__(TQ * (TP / RPT))
depthwise_fprop(const T* __restrict__ x, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ y, int N, int C, int H, int W,
                int K, int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh,
                int dw) {
    static_assert(TP % RPT == 0, "depthwise_fprop: TP must be a multiple of RPT");
    constexpr int NT = TQ * (TP / RPT);
    FC_DYNAMIC_SMEM(smem_raw);
    T* tile = reinterpret_cast<T*>(smem_raw);
    const int IH = (TP - 1) * sh + (R - 1) * dh + 1;
    const int IW = (TQ - 1) * sw + (S - 1) * dw + 1;
    T* taps = tile + IH * IW;

    const long long plane_id = blockIdx.x;  // n * K + k
    const int k = (int)(plane_id % K);
    const int n = (int)(plane_id / K);
    const int c = k / (K / C);
    const int p0 = blockIdx.y * TP, q0 = blockIdx.z * TQ;
    const int h0 = p0 * sh - pt, w0 = q0 * sw - pl;
    const T* xin = x + ((long long)n * C + c) * H * W;
    const int tid = threadIdx.y * TQ + threadIdx.x;

    for (int e = tid; e < IH * IW; e += NT) {
        const int ih = e / IW;
        const int gh = h0 + ih, gw = w0 + (e - ih * IW);
        const bool ok = (unsigned)gh < (unsigned)H && (unsigned)gw < (unsigned)W;
        tile[e] = ok ? xin[(long long)gh * W + gw] : T(0);
    }
    for (int e = tid; e < R * S; e += NT) taps[e] = weight[(long long)k * R * S + e];
    __syncthreads();

    const int ql = threadIdx.x, q = q0 + ql;
    const T b = bias != nullptr ? bias[k] : T(0);
    T* yout = y + plane_id * P * Q;
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
__global__ void depthwise_dgrad(const T* __restrict__ grad_output, const T* __restrict__ weight,
                                T* __restrict__ grad_input, int N, int C, int H, int W, int K,
                                int R, int S, int P, int Q, int sh, int sw, int pt, int pl,
                                int dh, int dw) {
    const long long total = (long long)N * C * H * W;
    const int mult = K / C;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const int w = (int)(idx % W);
        const long long rest = idx / W;
        const int h = (int)(rest % H);
        const long long nc = rest / H;  // n * C + c
        const int c = (int)(nc % C);
        const long long n = nc / C;
        T acc = T(0);
        for (int j = 0; j < mult; ++j) {
            const int k = c * mult + j;
            const T* go = grad_output + (n * K + k) * P * Q;
            const T* taps = weight + (long long)k * R * S;
            for (int r = 0; r < R; ++r) {
                const int nh = h + pt - r * dh;
                if (nh < 0) break;  // larger r only moves further up
                const int p = nh / sh;
                if (p * sh != nh || p >= P) continue;
                for (int t = 0; t < S; ++t) {
                    const int nw = w + pl - t * dw;
                    if (nw < 0) break;
                    const int q = nw / sw;
                    if (q * sw != nw || q >= Q) continue;
                    acc = fmadd(go[(long long)p * Q + q], taps[r * S + t], acc);
                }
            }
        }
        grad_input[idx] = acc;
    }
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT)
depthwise_wgrad(const T* __restrict__ x, const T* __restrict__ grad_output,
                T* __restrict__ grad_weight, int N, int C, int H, int W, int K, int R, int S,
                int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw) {
    __shared__ T scratch[NT / 32];
    const int e = blockIdx.x;  // k * R*S + r * S + s
    const int RS = R * S;
    const int k = e / RS, r = (e % RS) / S, t = e % S;
    const int c = k / (K / C);
    const int PQ = P * Q;
    const long long total = (long long)N * PQ;
    T acc = T(0);
    for (long long i = threadIdx.x; i < total; i += NT) {
        const long long n = i / PQ;
        const int pq = (int)(i - n * PQ);
        const int p = pq / Q, q = pq - p * Q;
        const int ih = p * sh - pt + r * dh, iw = q * sw - pl + t * dw;
        if ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W) {
            acc = fmadd(grad_output[(n * K + k) * PQ + pq],
                        x[(n * C + c) * H * W + (long long)ih * W + iw], acc);
        }
    }
    acc = block_sum<T, NT>(acc, scratch);
    if (threadIdx.x == 0) grad_weight[e] = acc;
}

}  // namespace fc
