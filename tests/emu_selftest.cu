// emu_selftest.cu -- tiny kernels that exercise the emulated cp.async and ldmatrix of
// tests/cuda_emu.h directly (tests/test_cuda_emulated.py, test_emu_*). Test-only: built into
// the emulation library next to kernels/*.cu, never shipped.
#include "fc_common.cuh"

namespace fc_test {

// One warp. Lane l copies src[l] (group 0), src[32 + l] (group 1, zero-filled for odd lanes)
// and src[64 + l] (group 2) into three shared slots; out[0..32) is slot 0 read after
// wait_group 2 (group 0 done), out[32..64) slot 1 after wait_group 1, out[64..96) slot 2 read
// after wait_group 1 (still pending: poisoned, NaN in the emulation), out[96..128) slot 2 after
// wait_group 0, out[128..160) a copy never committed, read after wait_group 0 (NaN).
__global__ void cp_async_groups(const float* __restrict__ src, float* __restrict__ out) {
    __shared__ __align__(16) float slot[3][32];
    __shared__ __align__(16) float wide[32][4];
    const int l = threadIdx.x;
    fc::cp_async<4>(&slot[0][l], src + l, true);
    fc::cp_async_commit();
    fc::cp_async<4>(&slot[1][l], src + 32 + l, l % 2 == 0);
    fc::cp_async_commit();
    fc::cp_async<4>(&slot[2][l], src + 64 + l, true);
    fc::cp_async_commit();
    fc::cp_async_wait<2>();
    out[l] = slot[0][l];
    fc::cp_async_wait<1>();
    out[32 + l] = slot[1][l];
    out[64 + l] = slot[2][l];
    fc::cp_async<16>(&wide[l][0], src + 4 * (l % 8), true);  // 16 bytes, 16-byte aligned
    fc::cp_async_wait<0>();
    out[96 + l] = slot[2][l];
    out[128 + l] = wide[l][l % 4];
}

// One warp: a 16 x 8 fp32 tile A (row-major, 8 floats = 32 bytes per row, rows 16-byte
// aligned) read with ldmatrix.x4 as the mma.m16n8k8 A fragment: matrix 0 = rows 0-7 cols 0-3,
// 1 = rows 8-15 cols 0-3, 2 = rows 0-7 cols 4-7, 3 = rows 8-15 cols 4-7. out[4 * l + i] = r[i].
__global__ void ldmatrix_a_fragment(const float* __restrict__ a, float* __restrict__ out) {
    __shared__ __align__(16) float tile[16 * 8];
    const int l = threadIdx.x;
    for (int i = l; i < 128; i += 32) tile[i] = a[i];
    __syncthreads();
    const int m = l / 8, r = l % 8;  // lane l addresses row r of matrix m
    unsigned v[4];
    fc::ldmatrix_x4(v, &tile[(r + 8 * (m % 2)) * 8 + 4 * (m / 2)]);
    for (int i = 0; i < 4; ++i) out[4 * l + i] = __uint_as_float(v[i]);
}

}  // namespace fc_test
