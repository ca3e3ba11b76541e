// Small helpers shared by several kernel files: a RoPE sine and cosine, the bf16
// tensor-core product, a guarded 16-byte load, cp.async copies and ldmatrix loads, eight
// packed bf16 values to and from fp32, the order-preserving integer image of a float, and
// a 64-bit mixing function for reproducible pseudo-random numbers.
// Passed to NVRTC as an in-memory header by src/cuda/nvrtc.rs and tools/nvrtc-check.
#pragma once
#include <cuda_bf16.h>

// sin and cos of a RoPE angle a (|a| up to 2^20: positions of a million tokens), within
// 1e-6 absolute: a is reduced to about [-pi, pi] by two-part 2*pi (hi = fl(2*pi) times
// the integer k is a multiple of 2^-21, so a - k*hi is exact in one FMA), then the SFU's
// sine and cosine (2^-21.4 absolute on [-pi, pi]). About 8 instructions, against
// sincosf's 40 or so and its slow path (local memory) past |a| = 105615; the keys it
// rotates are stored as bf16 (2^-9 relative).
__device__ __forceinline__ void rope_sincos(float a, float* s, float* c) {
    const float k = rintf(a * 0.159154943091895336f);
    float r = fmaf(-k, 6.28318548202514648f, a);
    r = fmaf(-k, -1.74845553146951720e-7f, r);
    __sincosf(r, s, c);
}

// d += a · b on the tensor cores: a [16 x 16] row-major, b [16 x 8] column-major, bf16
// in, fp32 accumulate (the fragments of PTX's mma.m16n8k16).
__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                          unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same with a's four registers as an array.
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    mma_16816(d, a[0], a[1], a[2], a[3], b0, b1);
}

// d += a . b on the fp16 tensor cores (m16n8k16, fp32 accumulation), fragments as above.
__device__ __forceinline__ void mma_16816_f16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Sixteen bytes at p through the read-only cache, or zeros where !ok.
__device__ __forceinline__ uint4 load16(const __nv_bfloat16* p, bool ok) {
    return ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
}

// The shared-memory address of p (for cp.async and ldmatrix).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !ok (no bytes read).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool ok) {
    const int n = ok ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// 4 bytes global -> shared (through L1): src and dst 4-byte aligned.
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

// Closes the thread's group of cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of the thread's committed groups are still in flight (a barrier
// then shares the copies).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory into mma fragments (ldmatrix .x4).
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The same, each matrix transposed (ldmatrix .x4 .trans).
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The eight bf16 values of a 16-byte load, as fp32.
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

// Eight fp32 values rounded to bf16, packed for a 16-byte store.
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return u;
}

// The float's order-preserving unsigned image: a < b as unsigned exactly when a comes
// before b in IEEE total order (-NaN < -inf < ... < -0 < +0 < ... < inf < NaN), the
// order of Rust's f32::total_cmp. ordered(-x) == ~ordered(x).
__device__ __forceinline__ unsigned int ordered(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// SplitMix64's finaliser.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
