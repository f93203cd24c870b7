// fc_common.cuh -- small device helpers shared by the fastconv CUDA kernels.
//
// kernels/cuda_build.py pastes this file in place of `#include "fc_common.cuh"` before NVRTC
// sees a .cu source, so CuPy's on-disk cache key (a hash of the source text) covers it.
// No system header is included: NVRTC compiles the kernels without any include path.
//
// Host emulation: tests/cuda_emu.h compiles the same kernel sources with a host C++ compiler
// (FASTCONV_HOST_EMULATION defined) to run them on a CPU. Only the few intrinsics that need
// inline PTX or dynamic shared memory differ under that macro; everything else is the code
// the GPU runs.
#pragma once

namespace fc {

// Multiply-add with one rounding, for both element types.
__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

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

// 16-byte vectors: VEC<T> elements per access.
template <typename T> struct Vec;
template <> struct Vec<float> { static constexpr int N = 4; };
template <> struct Vec<double> { static constexpr int N = 2; };

// Copy one 16-byte vector from `src` (16-byte aligned) into registers d[0..N).
__device__ __forceinline__ void load16(float* d, const float* src) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
}
__device__ __forceinline__ void load16(double* d, const double* src) {
    const double2 v = *reinterpret_cast<const double2*>(src);
    d[0] = v.x; d[1] = v.y;
}

// Copy two floats from `src` (8-byte aligned) into d[0], d[1].
__device__ __forceinline__ void load8(float* d, const float* src) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    d[0] = v.x; d[1] = v.y;
}

// Store registers s[0..N) as one 16-byte vector to global memory at `dst` (16-byte aligned).
// Written in PTX: NVVM splits a plain float4 store into four scalar stores when it cannot
// prove the alignment of a computed address (seen in conv_simt's epilogue).
__device__ __forceinline__ void store16(float* dst, const float* s) {
#if defined(FASTCONV_HOST_EMULATION)
    *reinterpret_cast<float4*>(dst) = make_float4(s[0], s[1], s[2], s[3]);
#else
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};"
                 :: "l"(__cvta_generic_to_global(dst)), "f"(s[0]), "f"(s[1]), "f"(s[2]),
                    "f"(s[3]) : "memory");
#endif
}
__device__ __forceinline__ void store16(double* dst, const double* s) {
#if defined(FASTCONV_HOST_EMULATION)
    *reinterpret_cast<double2*>(dst) = make_double2(s[0], s[1]);
#else
    asm volatile("st.global.v2.f64 [%0], {%1, %2};"
                 :: "l"(__cvta_generic_to_global(dst)), "d"(s[0]), "d"(s[1]) : "memory");
#endif
}

// Round an fp32 value to TF32 (10-bit mantissa), the operand format of the tensor-core mma
// below: to nearest, ties away from zero (cvt.rna, three integer instructions) on sm_80; to
// nearest, ties to even (cvt.rn, one F2FP instruction, PTX for sm_90+) from sm_90 on. The two
// differ only on exact ties; the host emulation rounds as cvt.rna. Needs sm_80; the dispatch
// rules never choose a TF32 kernel on older devices.
__device__ __forceinline__ float to_tf32(float x) {
#if defined(FASTCONV_HOST_EMULATION)
    return emu::to_tf32(x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
    return x;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned r;
    asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
#else
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
#endif
}

// d += A * B for one warp: A 16x8 (row-major), B 8x8 (column-major), TF32 operands held as
// fp32 bit patterns, fp32 accumulators. Fragment ownership (PTX ISA, mma.m16n8k8 .tf32), with
// g = lane / 4 and t = lane % 4:
//   a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//   b[0] = B[t][g]  b[1] = B[t+4][g]
//   d[0] = D[g][2t] d[1] = D[g][2t+1] d[2] = D[g+8][2t] d[3] = D[g+8][2t+1]
__device__ __forceinline__ void mma_tf32_16x8x8(float (&d)[4], const unsigned (&a)[4],
                                                const unsigned (&b)[2]) {
#if defined(FASTCONV_HOST_EMULATION)
    emu::mma_tf32_16x8x8(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (cp.async, sm_80+) and ldmatrix. The host emulation
// (tests/cuda_emu.h) implements the same PTX semantics.
// ---------------------------------------------------------------------------------------------
// Copy BYTES (4, 8 or 16) from global `src` to shared `dst`, both aligned to BYTES, through L1
// (.ca); when `valid` is false nothing is read and `dst` is zero-filled (src-size 0), so `src`
// may then point anywhere (outside the tensor, for a tap outside the image).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp_async: 4, 8 or 16 bytes");
#if defined(FASTCONV_HOST_EMULATION)
    emu::cp_async(dst, src, BYTES, valid ? BYTES : 0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // No cp.async before sm_80: an ordinary (synchronous) copy; commit and wait do nothing and
    // the barrier after the wait publishes the tile as usual.
    if constexpr (BYTES == 4) {
        *static_cast<float*>(dst) = valid ? *static_cast<const float*>(src) : 0.0f;
    } else if constexpr (BYTES == 8) {
        *static_cast<double*>(dst) = valid ? *static_cast<const double*>(src) : 0.0;
    } else {
        *static_cast<float4*>(dst) = valid ? *static_cast<const float4*>(src)
                                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :: "r"(d), "l"(__cvta_generic_to_global(src)), "n"(BYTES),
                    "r"(valid ? BYTES : 0)
                 : "memory");
#endif
}

// Close this thread's outstanding cp.async copies into one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTCONV_HOST_EMULATION)
    emu::cp_async_commit_group();
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's most recent groups are pending. The copies of the
// other threads become visible after a following __syncthreads().
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTCONV_HOST_EMULATION)
    emu::cp_async_wait_group(N);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}

// The cp.async ring of the pipelined main loops (conv2d.cu mainloop, winograd.cu
// wino_mainloop): STAGES shared-memory slots, one barrier per step. Step j's operands are
// copied by `fetch(j, slot)` into slot j % STAGES as commit group j; the prologue issues steps
// 0 .. STAGES - 2. At step j the thread waits until at most STAGES - 2 of its groups are
// pending (so group j has landed), runs `land(slot)` on its own landed copies (TF32 rounding,
// an in-place transform; may do nothing), and the barrier publishes the slot to the block and
// frees the slot read at step j - 1, which `fetch` then refills with step j + STAGES - 1 while
// `compute(slot)` works on step j. The global loads never wait on the arithmetic. Empty groups
// are committed past the end so the wait count stays fixed; nothing is in flight at exit.
// The step loop is unrolled by STAGES so that `slot` is a compile-time constant in every call
// (ring offsets fold into the addresses instead of costing registers or an index multiply).
template <int STAGES, class Fetch, class Land, class Compute>
__device__ __forceinline__ void cp_async_ring(int steps, Fetch&& fetch, Land&& land,
                                              Compute&& compute) {
    static_assert(STAGES >= 2, "cp_async_ring: at least two stages");
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < steps) fetch(st, st);
        cp_async_commit();
    }
    for (int step0 = 0; step0 < steps; step0 += STAGES) {
#pragma unroll
        for (int u = 0; u < STAGES; ++u) {
            const int step = step0 + u;
            if (step < steps) {
                cp_async_wait<STAGES - 2>();
                land(u);
                __syncthreads();
                if (step + STAGES - 1 < steps) fetch(step + STAGES - 1, (u + STAGES - 1) % STAGES);
                cp_async_commit();
                compute(u);
            }
        }
    }
    cp_async_wait<0>();  // only empty groups remain
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 pass the row addresses of matrix i
// (16 bytes per row, 16-byte aligned); lane l gets word l % 4 of row l / 4 of matrix i in r[i].
// For 32-bit elements (TF32) that is element (l / 4, l % 4) of an 8 x 4 matrix: the A fragment
// of mma.m16n8k8 from a row-major [m][k] tile.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
#if defined(FASTCONV_HOST_EMULATION)
    emu::ldmatrix<4>(r, row, false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
    __trap();
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// Sum of `v` over the block, returned to thread 0 (others get partial sums). The order of the
// additions is fixed by the thread layout alone, so results repeat bit for bit. `scratch`
// holds one value per warp; NT is a multiple of 32.
template <typename T, int NT>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    static_assert(NT % 32 == 0 && NT <= 1024, "block_sum: NT must be a multiple of 32");
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        v = scratch[0];
        for (int w = 1; w < NT / 32; ++w) v += scratch[w];
    }
    return v;
}

}  // namespace fc

// Dynamic shared memory as a byte array named `name`, 16-byte aligned.
#if defined(FASTCONV_HOST_EMULATION)
#define FC_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#else
#define FC_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fc {

// cp_async with the number of bytes to read given directly: `src_bytes` (0 or BYTES) bytes are
// read from `src` and the rest of the BYTES at `dst` zero-filled; callers that derive the count
// from a bit mask (winograd.cu) avoid a compare and select per copy.
template <int BYTES>
__device__ __forceinline__ void cp_async_n(void* dst, const void* src, int src_bytes) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp_async_n: 4, 8 or 16 bytes");
#if defined(FASTCONV_HOST_EMULATION)
    emu::cp_async(dst, src, BYTES, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    cp_async<BYTES>(dst, src, src_bytes != 0);
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :: "r"(d), "l"(__cvta_generic_to_global(src)), "n"(BYTES), "r"(src_bytes)
                 : "memory");
#endif
}

}  // namespace fc
