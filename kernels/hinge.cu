// hinge.cu -- fused multiclass hinge loss and gradient, one pass over the scores.
//
// Layout
//   scores (N, C) and grad (N, C) C-contiguous, labels (N,) int64, class_weight (C,),
//   row_scale (1,) or (N,) (row_scale_stride 0 or 1), losses (N,); T is float or double.
//   Per row i with y = labels[i], margins m_j = (s_j - s_y) + margin:
//     losses[i] = w[y] * sum_{j != y} max(0, m_j)^p
//     grad[i, j] = row_scale[i] * w[y] * p * max(0, m_j)^(p-1) * [m_j > 0]   (j != y)
//     grad[i, y] = -sum_{j != y} grad[i, j]
//   At the kink (m_j == 0) the subgradient 0 is used, as PyTorch does.
//   NaN rule (the reference's and the cpu backend's): a NaN anywhere in row i (label column
//   included) makes losses[i] NaN and the whole gradient row i NaN. Infinities follow IEEE
//   arithmetic: s_j = +inf gives an infinite loss and gradient; a NaN margin (inf - inf) counts
//   as a NaN of the row.
//
// Launch geometry (kernels/cuda_hinge.py computes it)
//   block = 256 threads; a group of GROUP consecutive lanes (1..32, a power of two) owns one
//   row; grid = min(ceil(N / (256/GROUP)), 8 * SMs), grid-stride over rows. Lane l of a group
//   reads columns l, l + GROUP, ... (a warp reads 32 consecutive floats per load when GROUP is
//   32); the first GROUP*ITEMS columns stay in registers between the loss and the gradient
//   phase, so each score is read from memory once; columns past GROUP*ITEMS (C > 1024) are
//   read again in the gradient phase, from cache.
//   The group reduction is a fixed xor-butterfly of warp shuffles: every lane gets the same,
//   bit-identical sum, and results repeat from run to run (no atomics). All 32 lanes of a warp
//   always execute the shuffles (rows past N are masked, not skipped).
//
// Variants: hinge_rows<T, GROUP, ITEMS>; p (1 or 2) and want_grad (grad == nullptr) are run-time
// arguments. Registers: __launch_bounds__(256, hinge_min_blocks<T, ITEMS>()), 4 resident blocks
// (64 registers) while a lane holds at most 16 words of scores, else 2 (128 registers); the
// launcher sizes its grid with the same numbers (kernels/cuda_hinge.py, blocks_per_sm), and
// tests/test_sass_report.py checks them against the compiled code.
//
// Index arithmetic: row offsets (row * C) are 64-bit.
//
// label_range: the extremes of the labels for the range check that runs before hinge_rows
// (fastconv/_args.py raises on a label outside [0, C) before any hinge kernel runs). Block b
// visits labels b*256 + t, grid-stride, and writes partial[2b] = min, partial[2b + 1] = max;
// the host reads the 2 * gridDim.x values back and reduces them (kernels/cuda_hinge.py sizes
// the grid at most 2 * SMs and at most ceil(N / 256), so every block sees a label). One launch
// and one small read-back instead of CuPy's min, max, stack and tolist (measured on an H200:
// about 270 us of host time per call for the CuPy chain).
//
// Verification status: compiled by NVRTC for sm_80 and sm_90 in CI and executed on the CPU in
// the host emulation of tests/test_cuda_emulated.py against the NumPy reference; run on an
// H200 (2026-12-04: the GPU tests pass; hinge_rows alone moves the 65536x1000 float32 scores
// and gradient in 163 us, 3.2 TB/s, 84% of a device copy's rate: bench/gpu_profile.py).

#include "fc_common.cuh"

namespace fc {

// Resident 256-thread blocks per SM the register budget is sized for.
template <typename T, int ITEMS>
__host__ __device__ constexpr int hinge_min_blocks() {
    return ITEMS * int(sizeof(T)) / 4 <= 16 ? 4 : 2;
}

template <typename T, int GROUP, int ITEMS>
__global__ void __launch_bounds__(256, (hinge_min_blocks<T, ITEMS>()))
hinge_rows(const T* __restrict__ scores, const long long* __restrict__ labels,
           const T* __restrict__ class_weight, const T* __restrict__ row_scale,
           int row_scale_stride, T margin, int p, long long N, int C, T* __restrict__ losses,
           T* __restrict__ grad) {
    static_assert(GROUP >= 1 && GROUP <= 32 && (GROUP & (GROUP - 1)) == 0,
                  "hinge_rows: GROUP must be a power of two up to 32");
    constexpr int ROWS = 256 / GROUP;  // rows per block per pass
    const int lane = threadIdx.x % GROUP;
    const int slot = threadIdx.x / GROUP;

    for (long long first = (long long)blockIdx.x * ROWS; first < N;
         first += (long long)gridDim.x * ROWS) {
        const long long row = first + slot;
        const bool live = row < N;
        const T* srow = scores + (live ? row : 0) * (long long)C;
        long long y = 0;
        T sy = T(0), wy = T(0);
        if (live) {
            y = labels[row];
            sy = srow[y];
            wy = class_weight[y];
        }
        T v[ITEMS];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {  // all loads issued before any use
            const int col = lane + GROUP * i;
            v[i] = live && col < C ? srow[col] : T(0);
        }
        // Loss phase: sum of max(0, m)^p, and the slope of the label column: the number of
        // active margins (p = 1) or their sum (p = 2). A NaN margin passes through `h` (and
        // the label column adds its own score when that is NaN), so the row's loss is NaN
        // exactly when the NaN rule says so.
        T loss = T(0), slope = T(0);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int col = lane + GROUP * i;
            const T m = (v[i] - sy) + margin;
            const T h = !live || col >= C ? T(0)
                        : col == y ? (v[i] != v[i] ? v[i] : T(0))
                        : !(m <= T(0)) ? m : T(0);
            loss += p == 1 ? h : h * h;
            slope += p == 1 ? (h > T(0) ? T(1) : T(0)) : h;
        }
        for (int col = lane + GROUP * ITEMS; live && col < C; col += GROUP) {
            const T sc = srow[col];
            const T m = (sc - sy) + margin;
            const T h = col == y ? (sc != sc ? sc : T(0)) : !(m <= T(0)) ? m : T(0);
            loss += p == 1 ? h : h * h;
            slope += p == 1 ? (h > T(0) ? T(1) : T(0)) : h;
        }
#pragma unroll
        for (int off = GROUP / 2; off > 0; off >>= 1) {
            loss += __shfl_xor_sync(0xffffffffu, loss, off);
            slope += __shfl_xor_sync(0xffffffffu, slope, off);
        }
        if (!live) continue;
        if (lane == 0) losses[row] = wy * loss;
        if (grad == nullptr) continue;

        // Gradient phase, from the registers of the loss phase. A NaN row (loss NaN: the sum
        // of the group is NaN in every lane) gets an all-NaN gradient row.
        const bool nan_row = loss != loss;
        const T nan = nan_row ? loss : T(0);
        const T coef = row_scale[row_scale_stride ? row : 0] * wy * (p == 2 ? T(2) : T(1));
        T* grow = grad + row * (long long)C;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int col = lane + GROUP * i;
            if (col < C) {
                const T m = (v[i] - sy) + margin;
                const T d = m > T(0) ? (p == 1 ? T(1) : m) : T(0);
                grow[col] = nan_row ? nan : col == y ? -coef * slope : coef * d;
            }
        }
        for (int col = lane + GROUP * ITEMS; col < C; col += GROUP) {
            const T m = (srow[col] - sy) + margin;
            const T d = m > T(0) ? (p == 1 ? T(1) : m) : T(0);
            grow[col] = nan_row ? nan : col == y ? -coef * slope : coef * d;
        }
    }
}

__global__ void __launch_bounds__(256)
label_range(const long long* __restrict__ labels, long long N, long long* __restrict__ partial) {
    long long lo = labels[(long long)blockIdx.x * 256 < N ? (long long)blockIdx.x * 256 : 0];
    long long hi = lo;
    for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < N;
         i += (long long)gridDim.x * 256) {
        const long long v = labels[i];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const long long olo = __shfl_xor_sync(0xffffffffu, lo, off);
        const long long ohi = __shfl_xor_sync(0xffffffffu, hi, off);
        lo = olo < lo ? olo : lo;
        hi = ohi > hi ? ohi : hi;
    }
    __shared__ long long warp_lo[8], warp_hi[8];
    if (threadIdx.x % 32 == 0) {
        warp_lo[threadIdx.x / 32] = lo;
        warp_hi[threadIdx.x / 32] = hi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < 8; ++w) {
            lo = warp_lo[w] < lo ? warp_lo[w] : lo;
            hi = warp_hi[w] > hi ? warp_hi[w] : hi;
        }
        partial[2 * (long long)blockIdx.x] = lo;
        partial[2 * (long long)blockIdx.x + 1] = hi;
    }
}

}  // namespace fc
