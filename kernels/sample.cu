// Next-token sampling on the device, one block per row of fp32 logits [rows, vocab].
//
// Per row, five u64 in `params`: the bits of the fp32 temperature t, top_k k (0 = all),
// the bits of the fp32 top_p p (1 = all), the seed and a counter (the step).
//   - t == 0 or k == 1: greedy, the first index of the largest logit;
//   - otherwise z = logit / t; the kept set is the k largest z (ties at the k-th value
//     kept) and, within it, the largest z's whose softmax mass first reaches p; the
//     token is argmax over the kept set of z + Gumbel noise, which draws exactly from
//     the softmax restricted to the kept set. The noise of index i is a hash of
//     (seed, counter, i), so a (seed, counter) pair always gives the same token.
// Thresholds are found by bisection over the order-preserving integer image of the
// floats: 32 counting passes over the row, no sort.
#include <cuda_bf16.h>

#include "common.cuh"
#include "pdl.cuh"

#define SAMPLE_THREADS 1024

__device__ __forceinline__ float unordered(unsigned int o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) v = op(v, scratch[w]);
    return v;
}

// (value, index) argmax with the first index on ties, packed as ordered<<32 | ~index.
__device__ __forceinline__ unsigned long long best_of(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(unsigned int* __restrict__ out, const float* __restrict__ logits, int vocab,
                const unsigned long long* __restrict__ params) {
    pdl_wait();
    pdl_trigger();
    __shared__ unsigned long long s_u64[32];
    __shared__ unsigned int s_u32[32];
    __shared__ float s_f32[32];
    const int row = blockIdx.x;
    const float* z = logits + (size_t)row * vocab;
    const unsigned long long* prm = params + (size_t)row * 5;
    const float t = __uint_as_float((unsigned int)prm[0]);
    const int k = (int)min(prm[1], (unsigned long long)vocab);
    auto umax = [](unsigned long long a, unsigned long long b) { return best_of(a, b); };
    if (t <= 0.f || k == 1) {
        unsigned long long best = 0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            best = best_of(best, ((unsigned long long)ordered(z[i]) << 32) | (0xffffffffu - (unsigned)i));
        best = block_reduce(best, s_u64, umax);
        if (threadIdx.x == 0) out[row] = 0xffffffffu - (unsigned)(best & 0xffffffffu);
        return;
    }
    const float inv_t = 1.f / t;
    auto add_u = [](unsigned int a, unsigned int b) { return a + b; };
    auto add_f = [](float a, float b) { return a + b; };
    auto max_u = [](unsigned int a, unsigned int b) { return a > b ? a : b; };
    // Largest scaled logit.
    unsigned int mx = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = max(mx, ordered(z[i] * inv_t));
    mx = block_reduce(mx, s_u32, max_u);
    // k-th largest: the largest threshold th with count(ordered(z) >= th) >= k.
    unsigned int lo_k = 0;
    if (k > 0 && k < vocab) {
        unsigned int lo = 0, hi = mx;  // count(>= lo) >= k always; find the largest such
        while (lo < hi) {
            const unsigned int mid = lo + (hi - lo + 1) / 2;
            unsigned int c = 0;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += ordered(z[i] * inv_t) >= mid;
            c = block_reduce(c, s_u32, add_u);
            if (c >= (unsigned)k) lo = mid; else hi = mid - 1;
        }
        lo_k = lo;
    }
    const float m = unordered(mx);
    // Softmax mass of the top-k set, then the top-p threshold inside it.
    float total = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = z[i] * inv_t;
        if (ordered(v) >= lo_k) total += __expf(v - m);
    }
    total = block_reduce(total, s_f32, add_f);
    unsigned int th = lo_k;
    const float p = __uint_as_float((unsigned int)prm[2]);
    if (p < 1.f) {
        unsigned int lo = lo_k, hi = mx;  // mass(>= lo) = 1 >= p; find the largest such
        while (lo < hi) {
            const unsigned int mid = lo + (hi - lo + 1) / 2;
            float s = 0.f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                const float v = z[i] * inv_t;
                if (ordered(v) >= mid) s += __expf(v - m);
            }
            s = block_reduce(s, s_f32, add_f);
            if (s >= p * total) lo = mid; else hi = mid - 1;
        }
        th = lo;
    }
    // Gumbel-max over the kept set.
    const unsigned long long key = mix64(prm[3] ^ mix64(prm[4] + 0x632be59bd9b4e019ull));
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = z[i] * inv_t;
        if (ordered(v) < th) continue;
        const unsigned long long h = mix64(key + (unsigned long long)i * 0x9e3779b97f4a7c15ull);
        // u in (0, 1) on 23 bits, so that even the largest u stays below 1.0f exactly
        // (-log u > 0), and accurate logf near 1: the noise is always finite.
        const float u = ((float)(h >> 41) + 0.5f) * (1.0f / 8388608.0f);
        const float g = v - logf(fmaxf(-logf(u), 1e-30f));
        best = best_of(best, ((unsigned long long)ordered(g) << 32) | (0xffffffffu - (unsigned)i));
    }
    best = block_reduce(best, s_u64, umax);
    if (threadIdx.x == 0) out[row] = 0xffffffffu - (unsigned)(best & 0xffffffffu);
}
