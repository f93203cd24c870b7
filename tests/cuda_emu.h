// cuda_emu.h -- a host emulation of the part of CUDA the fastconv kernels use, so that the
// very sources in kernels/*.cu run on a CPU in the tests (tests/test_cuda_emulated.py).
//
// Model: the blocks of a grid run one after another; the threads of a block run concurrently
// as OS threads, so __syncthreads() is a real barrier and `__shared__` variables (function-local
// statics here) are shared by the block. Warps are emulated for the warp-synchronous
// intrinsics: __shfl_xor_sync and mma.sync exchange values through per-warp slots between two
// warp barriers, so every lane of the warp must reach them, as on the GPU. A barrier that is
// not reached by all its threads within a timeout marks the launch as failed (and releases
// everyone) instead of hanging.
//
// The TF32 mma fragment layout below is written from the PTX ISA's description of
// mma.m16n8k8 with .tf32 operands; it checks that the kernel is consistent with that reading.
//
// Asynchronous copies (PTX ISA, cp.async / cp.async.commit_group / cp.async.wait_group), per
// thread: `cp_async(dst, src, cp_size, src_size)` records a copy of cp_size bytes (4, 8 or 16;
// both addresses aligned to it) of which the first src_size come from src and the rest are
// zero-filled; its destination is poisoned with 0xFF bytes at once (its content is undefined
// until the copy is known complete, so a premature read shows up as NaN). `commit_group()`
// closes the thread's open copies into a group (possibly empty); `wait_group(n)` performs every
// committed group but the n most recent, in commit order; copies never committed are not
// waited for. Sources are read when the copy is performed, i.e. at the wait. Pending copies are
// dropped when a block ends (its shared memory is gone on a GPU).
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 (PTX ISA): lanes 8i..8i+7 give the
// row addresses (16 bytes each, 16-byte aligned) of matrix i; lane l receives in register i the
// 32-bit word l % 4 of row l / 4 of matrix i, or with .trans the two 16-bit elements
// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4), the first in the low half.
// Dynamic shared memory is filled with 0xFF bytes (NaN for floats) so reads of unwritten
// shared memory show up.
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTCONV_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
using std::fma;
using std::fmaf;

namespace emu {

// A reusable barrier (futex waits through C++20 std::atomic::wait). A watchdog releases every
// barrier and flags the launch as failed when no barrier completes for a while (a deadlock:
// some thread of the block never arrives), instead of hanging the test run.
class Barrier {
public:
    explicit Barrier(int count) : count_(count) {}
    void wait();
    void release() {
        generation_.fetch_add(1, std::memory_order_acq_rel);
        generation_.notify_all();
    }

private:
    const int count_;
    std::atomic<int> arrived_{0};
    std::atomic<unsigned> generation_{0};
};

struct Block {
    int threads = 0;
    std::unique_ptr<Barrier> barrier;
    std::vector<std::unique_ptr<Barrier>> warp_barriers;
    // Per-warp exchange slots: 32 lanes x 16 bytes (shuffles), and the mma operands.
    std::vector<unsigned char> slots;
    std::vector<float> mma_a, mma_b;
};

inline Block* g_block_state = nullptr;
inline unsigned char* g_dynamic_smem = nullptr;
inline std::atomic<bool> g_failed{false};
inline std::string g_error;
inline std::mutex g_error_mu;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline thread_local dim3 t_thread_idx;
inline thread_local int t_linear = 0;

inline void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(g_error_mu);
    if (!g_failed) g_error = why;
    g_failed = true;
}

inline std::atomic<unsigned long> g_progress{0};

inline void Barrier::wait() {
    if (g_failed) return;
    const unsigned gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
        arrived_.store(0, std::memory_order_relaxed);
        g_progress.fetch_add(1, std::memory_order_relaxed);
        release();
        return;
    }
    while (generation_.load(std::memory_order_acquire) == gen) generation_.wait(gen);
}

inline unsigned char* dynamic_smem() { return g_dynamic_smem; }

inline int lane() { return t_linear % 32; }
inline int warp() { return t_linear / 32; }
inline void warp_sync() { g_block_state->warp_barriers[warp()]->wait(); }

template <typename T>
T shfl_xor(T v, int lane_mask, int width) {
    static_assert(sizeof(T) <= 16, "shfl_xor: value too large");
    unsigned char* slots = g_block_state->slots.data() + warp() * 32 * 16;
    std::memcpy(slots + lane() * 16, &v, sizeof(T));
    warp_sync();
    const int base = lane() - lane() % width;
    const int src = base + ((lane() % width) ^ lane_mask) % width;
    T out;
    std::memcpy(&out, slots + src * 16, sizeof(T));
    warp_sync();
    return out;
}

inline float bits_to_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned float_to_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest with ties away from zero.
inline float to_tf32(float x) {
    if (!std::isfinite(x)) return x;
    return bits_to_float((float_to_bits(x) + 0x1000u) & 0xFFFFE000u);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for the calling lane's fragments.
inline void mma_tf32_16x8x8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    float* A = g_block_state->mma_a.data() + warp() * 128;  // A[16][8], row-major
    float* B = g_block_state->mma_b.data() + warp() * 64;   // B[8][8], B[k][n]
    const int g = lane() / 4, t = lane() % 4;
    A[g * 8 + t] = bits_to_float(a[0]);
    A[(g + 8) * 8 + t] = bits_to_float(a[1]);
    A[g * 8 + t + 4] = bits_to_float(a[2]);
    A[(g + 8) * 8 + t + 4] = bits_to_float(a[3]);
    B[t * 8 + g] = bits_to_float(b[0]);
    B[(t + 4) * 8 + g] = bits_to_float(b[1]);
    warp_sync();
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
        float acc = d[r];
        for (int k = 0; k < 8; ++k) acc = std::fma(A[row * 8 + k], B[k * 8 + col], acc);
        d[r] = acc;
    }
    warp_sync();
}

// ---- cp.async ----
struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    int cp_size, src_size;
};
inline thread_local std::vector<AsyncCopy> t_open_copies;
inline thread_local std::deque<std::vector<AsyncCopy>> t_copy_groups;

inline void cp_async(void* dst, const void* src, int cp_size, int src_size) {
    const auto d = reinterpret_cast<std::uintptr_t>(dst);
    const auto s = reinterpret_cast<std::uintptr_t>(src);
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
        fail("cp.async: cp-size must be 4, 8 or 16");
        return;
    }
    if (d % cp_size || s % cp_size) {
        fail("cp.async: misaligned address");
        return;
    }
    if (src_size < 0 || src_size > cp_size) {
        fail("cp.async: src-size outside [0, cp-size]");
        return;
    }
    std::memset(dst, 0xFF, cp_size);
    t_open_copies.push_back({static_cast<unsigned char*>(dst),
                             static_cast<const unsigned char*>(src), cp_size, src_size});
}

inline void cp_async_commit_group() {
    t_copy_groups.push_back(std::move(t_open_copies));
    t_open_copies.clear();
}

inline void cp_async_wait_group(int n) {
    while (int(t_copy_groups.size()) > n) {
        for (const AsyncCopy& c : t_copy_groups.front()) {
            if (c.src_size) std::memcpy(c.dst, c.src, c.src_size);
            std::memset(c.dst + c.src_size, 0, c.cp_size - c.src_size);
        }
        t_copy_groups.pop_front();
    }
}

inline void cp_async_drop_pending() {
    t_open_copies.clear();
    t_copy_groups.clear();
}

// ---- ldmatrix ----
template <int NUM>
void ldmatrix(unsigned (&r)[NUM], const void* row_addr, bool trans) {
    static_assert(NUM == 1 || NUM == 2 || NUM == 4, "ldmatrix: x1, x2 or x4");
    if (reinterpret_cast<std::uintptr_t>(row_addr) % 16) fail("ldmatrix: row not 16-byte aligned");
    unsigned char* slots = g_block_state->slots.data() + warp() * 32 * 16;
    std::memcpy(slots + lane() * 16, &row_addr, sizeof(row_addr));
    warp_sync();
    const int l = lane();
    for (int i = 0; i < NUM; ++i) {
        if (!trans) {
            const unsigned char* row;
            std::memcpy(&row, slots + (8 * i + l / 4) * 16, sizeof(row));
            std::memcpy(&r[i], row + 4 * (l % 4), 4);
        } else {
            std::uint16_t half[2];
            for (int h = 0; h < 2; ++h) {
                const unsigned char* row;
                std::memcpy(&row, slots + (8 * i + 2 * (l % 4) + h) * 16, sizeof(row));
                std::memcpy(&half[h], row + 2 * (l / 4), 2);
            }
            r[i] = unsigned(half[0]) | (unsigned(half[1]) << 16);
        }
    }
    warp_sync();
}

// Type codes of kernel parameters, checked against the arguments the launchers prepare.
template <typename T> struct Code;
template <> struct Code<int> { static constexpr char value = 'i'; };
template <> struct Code<unsigned> { static constexpr char value = 'I'; };
template <> struct Code<long long> { static constexpr char value = 'l'; };
template <> struct Code<float> { static constexpr char value = 'f'; };
template <> struct Code<double> { static constexpr char value = 'd'; };
template <> struct Code<const float*> { static constexpr char value = 'F'; };
template <> struct Code<float*> { static constexpr char value = 'F'; };
template <> struct Code<const double*> { static constexpr char value = 'D'; };
template <> struct Code<double*> { static constexpr char value = 'D'; };
template <> struct Code<const long long*> { static constexpr char value = 'L'; };
template <> struct Code<long long*> { static constexpr char value = 'L'; };

struct Entry {
    std::string signature;
    std::function<void(void**)> call;  // runs the kernel body for the current thread
};

template <typename... A, std::size_t... I>
void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <typename... A>
Entry entry(void (*f)(A...)) {
    Entry e;
    e.signature = std::string{Code<std::remove_cv_t<A>>::value...};
    e.call = [f](void** args) { call_with(f, args, std::index_sequence_for<A...>{}); };
    return e;
}

// Worker threads, created once and reused by every launch (creating a few hundred threads
// per block would dominate the run time). Leaked on purpose: never joined at exit.
class Pool {
public:
    // Runs fn(t) for t in [0, threads) on distinct workers and waits for all of them.
    void run(int threads, const std::function<void(int)>& fn) {
        std::unique_lock<std::mutex> lock(mu_);
        while (int(workers_.size()) < threads) {
            const int t = int(workers_.size());
            workers_.emplace_back([this, t] { loop(t); });
        }
        job_ = &fn;
        job_threads_ = threads;
        active_ = threads;
        ++generation_;
        start_.notify_all();
        done_.wait(lock, [&] { return active_ == 0; });
        job_ = nullptr;
    }

private:
    void loop(int t) {
        unsigned long seen = 0;
        std::unique_lock<std::mutex> lock(mu_);
        for (;;) {
            start_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (t >= job_threads_) continue;
            const std::function<void(int)>* fn = job_;
            lock.unlock();
            (*fn)(t);
            lock.lock();
            if (--active_ == 0) done_.notify_all();
        }
    }

    std::mutex mu_;
    std::condition_variable start_, done_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* job_ = nullptr;
    int job_threads_ = 0, active_ = 0;
    unsigned long generation_ = 0;
};

inline Pool& pool() {
    static Pool* p = new Pool;
    return *p;
}

// Runs the grid block by block; returns 0, or 1 with g_error set.
inline int run_grid(const Entry& e, dim3 grid, dim3 block, std::size_t smem, void** args) {
    g_failed = false;
    g_error.clear();
    const int threads = int(block.x * block.y * block.z);
    const int warps = (threads + 31) / 32;
    std::vector<unsigned char> dyn(smem + 16, 0xFF);
    g_dynamic_smem = reinterpret_cast<unsigned char*>(
        (reinterpret_cast<std::uintptr_t>(dyn.data()) + 15) & ~std::uintptr_t(15));
    g_grid_dim = grid;
    g_block_dim = block;
    Block state;
    state.threads = threads;
    state.barrier = std::make_unique<Barrier>(threads);
    for (int w = 0; w < warps; ++w) {
        state.warp_barriers.push_back(std::make_unique<Barrier>(std::min(32, threads - 32 * w)));
    }
    state.slots.assign(std::size_t(warps) * 32 * 16, 0);
    state.mma_a.assign(std::size_t(warps) * 128, 0.0f);
    state.mma_b.assign(std::size_t(warps) * 64, 0.0f);
    g_block_state = &state;
    const long long blocks = (long long)grid.x * grid.y * grid.z;
    std::atomic<bool> finished{false};
    std::thread watchdog([&] {
        unsigned long last = g_progress.load();
        auto since = std::chrono::steady_clock::now();
        while (!finished.load()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
            const unsigned long now = g_progress.load();
            if (now != last) {
                last = now;
                since = std::chrono::steady_clock::now();
            } else if (std::chrono::steady_clock::now() - since > std::chrono::seconds(20)) {
                fail("deadlock: a barrier was not reached by all of its threads");
                state.barrier->release();
                for (auto& wb : state.warp_barriers) wb->release();
                since = std::chrono::steady_clock::now();
            }
        }
    });
    pool().run(threads, [&](int t) {
        t_linear = t;
        t_thread_idx = dim3{unsigned(t) % block.x, (unsigned(t) / block.x) % block.y,
                            unsigned(t) / (block.x * block.y)};
        for (long long b = 0; b < blocks && !g_failed; ++b) {
            if (t == 0) {  // the end barrier of the previous block has been passed by all
                g_block_idx = dim3{unsigned(b % grid.x), unsigned((b / grid.x) % grid.y),
                                   unsigned(b / ((long long)grid.x * grid.y))};
            }
            state.barrier->wait();  // block start: everyone sees the new blockIdx
            cp_async_drop_pending();
            e.call(args);
            cp_async_drop_pending();
            state.barrier->wait();  // block end
        }
    });
    finished = true;
    watchdog.join();
    g_block_state = nullptr;
    return g_failed ? 1 : 0;
}

}  // namespace emu

#define threadIdx (emu::t_thread_idx)
#define blockIdx (emu::g_block_idx)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid_dim)

inline void __syncthreads() { emu::g_block_state->barrier->wait(); }
// __syncwarp: the warp's lanes meet (every lane of the warp must call it, as the kernels do).
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
    return emu::shfl_xor(v, lane_mask, width);
}
inline unsigned __float_as_uint(float f) { return emu::float_to_bits(f); }
inline float __uint_as_float(unsigned u) { return emu::bits_to_float(u); }
[[noreturn]] inline void __trap() { std::abort(); }
