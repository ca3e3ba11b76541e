// Next-token sampling on the device, one block per row of fp32 logits [rows, vocab].
//
// Per row, five u64 in `params`: the bits of the fp32 temperature t, top_k k (0 = all),
// the bits of the fp32 top_p p (1 = all), the seed and a counter (the step).
//   - t == 0 or k == 1: greedy, the first index of the largest logit;
//   - otherwise z = logit / t; the kept set is the CPU sampler's: the first k of the
//     order (z descending, index ascending) and, within those, the shortest prefix of
//     that order whose softmax mass reaches p; the token is argmax over the kept set of
//     z + Gumbel noise, which draws exactly from the softmax restricted to the kept set. The noise of index i is a hash of
//     (seed, counter, i), so a (seed, counter) pair always gives the same token.
// Thresholds are found by bisection over the order-preserving integer image of the
// floats (32 counting passes over the row, no sort); ties at a threshold are cut by
// index with a bisection over the indices (only when there are ties to cut).
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

enum { COUNT_GE, COUNT_GT, COUNT_EQ, COUNT_EQ_UPTO };

// How many of the row's z = logit / t satisfy `mode` against the ordered threshold th
// (COUNT_EQ_UPTO: equal to th at an index <= last), over the whole block.
__device__ unsigned int count_where(const float* z, int vocab, float t, int mode, unsigned int th, int last,
                                    unsigned int* scratch) {
    unsigned int c = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const unsigned int o = ordered(__fdiv_rn(z[i], t));
        const bool hit = mode == COUNT_GE ? o >= th : mode == COUNT_GT ? o > th : o == th && (mode == COUNT_EQ || i <= last);
        c += hit ? 1u : 0u;
    }
    return block_reduce(c, scratch, [](unsigned int a, unsigned int b) { return a + b; });
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
    // z = logit / t, divided exactly as the CPU sampler does (not times 1/t), so that
    // both see the same values and the same ties.
    auto add_u = [](unsigned int a, unsigned int b) { return a + b; };
    auto add_f = [](float a, float b) { return a + b; };
    auto max_u = [](unsigned int a, unsigned int b) { return a > b ? a : b; };
    // Largest scaled logit.
    unsigned int mx = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = max(mx, ordered(__fdiv_rn(z[i], t)));
    mx = block_reduce(mx, s_u32, max_u);
    const float m = unordered(mx);
    // The kept set is {z > th} plus the first `keep_eq` indices with z == th: exactly
    // the prefix of the CPU's order (z descending, index ascending).
    unsigned int th = 0, keep_eq = 0xffffffffu;
    if (k > 0 && k < vocab) {
        // k-th largest: the largest threshold with count(>= th) >= k.
        unsigned int lo = 0, hi = mx;
        while (lo < hi) {
            const unsigned int mid = lo + (hi - lo + 1) / 2;
            if (count_where(z, vocab, t, COUNT_GE, mid, 0, s_u32) >= (unsigned)k) lo = mid; else hi = mid - 1;
        }
        th = lo;
        keep_eq = (unsigned)k - count_where(z, vocab, t, COUNT_GT, th, 0, s_u32);
    }
    const unsigned int lo_k = th;
    // Softmax mass of the top-k set (its ties at the threshold all weigh the same).
    float above = 0.f;
    unsigned int n_eq = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = __fdiv_rn(z[i], t);
        const unsigned int o = ordered(v);
        if (o > lo_k) above += __expf(v - m);
        n_eq += o == lo_k;
    }
    above = block_reduce(above, s_f32, add_f);
    n_eq = block_reduce(n_eq, s_u32, add_u);
    // (Without top-k, lo_k = 0 is no value's image: n_eq is 0 and adds nothing.)
    const float total = above + (n_eq > 0 ? (float)min(n_eq, keep_eq) * __expf(unordered(lo_k) - m) : 0.f);
    const float p = __uint_as_float((unsigned int)prm[2]);
    if (p < 1.f) {
        // The largest threshold above lo_k whose mass reaches p·total, if any.
        auto mass = [&](unsigned int at) {
            float s = 0.f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                const float v = __fdiv_rn(z[i], t);
                if (ordered(v) >= at && ordered(v) > lo_k) s += __expf(v - m);
            }
            return block_reduce(s, s_f32, add_f);
        };
        unsigned int lo = lo_k, hi = mx;
        while (lo < hi) {
            const unsigned int mid = lo + (hi - lo + 1) / 2;
            if (mass(mid) >= p * total) lo = mid; else hi = mid - 1;
        }
        // Among the values tied at the threshold, as many as the CPU's running sum
        // takes before it reaches p·total.
        const float tie_e = __expf(unordered(lo) - m);
        const float before = lo > lo_k ? mass(lo + 1) : above;
        const float want = ceilf(fmaxf(p * total - before, 0.f) / tie_e);
        const unsigned int n_p = (unsigned int)fmaxf(want, 1.f);
        keep_eq = lo > lo_k ? n_p : min(keep_eq, n_p);
        th = lo;
    }
    // The index cut among the ties at th: the keep_eq-th index with z == th.
    int idx_cut = vocab;
    const unsigned int ties = count_where(z, vocab, t, COUNT_EQ, th, 0, s_u32);
    if (keep_eq < ties) {
        int lo = 0, hi = vocab - 1;  // smallest x with count(== th, i <= x) >= keep_eq
        while (lo < hi) {
            const int mid = lo + (hi - lo) / 2;
            if (count_where(z, vocab, t, COUNT_EQ_UPTO, th, mid, s_u32) >= keep_eq) hi = mid; else lo = mid + 1;
        }
        idx_cut = lo;
    }
    // Gumbel-max over the kept set.
    const unsigned long long key = mix64(prm[3] ^ mix64(prm[4] + 0x632be59bd9b4e019ull));
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = __fdiv_rn(z[i], t);
        const unsigned int o = ordered(v);
        if (o < th || (o == th && i > idx_cut)) continue;
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
