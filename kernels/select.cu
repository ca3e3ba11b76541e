// Chunk selection of the ShadowKV decode step (reference: src/shadow/select.rs).
//
// shadow_scores, grid (kv_heads, batch), SELECT_SCORE_THREADS threads: for KV head h of
// sequence b and each query head j of its group, s_j[ch] = q_j . marks[ch, h*d..] / sqrt(d)
// over the sequence's `chunks` chunks, softmax over the chunks per query head, then
// score[ch] = max_j softmax_j[ch]; outlier chunks score -inf. Written to
// scores [batch, kv_heads, chunk_cap] (entries past the sequence's chunks untouched).
// One warp per chunk (each lane holds d/32 dims of the landmark); two passes over the
// landmarks: the online max and sum of the exponentials, then the normalised scores.
//
// shadow_top_k, grid (kv_heads, batch), TOPK_THREADS threads: the `slots` best
// non-outlier chunks of those scores, ties to the lower id, written ascending to
// selected [batch, kv_heads, slots], -1 after the last (exactly shadow::select::top_k).
// topk_rows, grid (rows): the same selection over rows of any values, no exclusions
// (the outlier chunks of a prefill, on negated cosines).
//
// The selection: a radix select (four 8-bit digits, most significant first) on the
// order-preserving integer image of the floats finds the k-th largest key T and how
// many keys equal to T are taken; then one pass in chunk order takes every key above T
// and the first of those equal to T, and writes each taken id at its rank among the
// taken ones (a block-wide prefix count), so the output is ascending.
#include <cuda_bf16.h>

#include "common.cuh"
#include "pdl.cuh"
#include "shadow.cuh"

#define SELECT_SCORE_THREADS 256
#define SELECT_MAX_GROUP 8
#define SELECT_MAX_DIM 128
#define TOPK_THREADS 1024
#define SELECT_NEG_INF __int_as_float(0xff800000)

// Per query head j < group: s[j] = q_j . landmark row (all lanes get the full sums).
// qs: the group's queries as fp32 in shared memory; lanes own dims lane*per .. +per.
__device__ __forceinline__ void landmark_dots(float (&s)[SELECT_MAX_GROUP], const float* qs,
                                              const __nv_bfloat16* __restrict__ row, int d, int group,
                                              int lane) {
    const int per = d >> 5;
    float l[SELECT_MAX_DIM / 32];
#pragma unroll
    for (int e = 0; e < SELECT_MAX_DIM / 32; ++e) l[e] = e < per ? __bfloat162float(row[lane * per + e]) : 0.f;
#pragma unroll
    for (int j = 0; j < SELECT_MAX_GROUP; ++j) {
        float acc = 0.f;
        if (j < group) {
#pragma unroll
            for (int e = 0; e < SELECT_MAX_DIM / 32; ++e)
                if (e < per) acc += qs[j * d + lane * per + e] * l[e];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        s[j] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(SELECT_SCORE_THREADS)
    shadow_scores(float* __restrict__ scores, const __nv_bfloat16* __restrict__ q,
                  const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                  ShadowDims dims, float scale) {
    pdl_wait();
    pdl_trigger();
    __shared__ float qs[SELECT_MAX_GROUP * SELECT_MAX_DIM];
    __shared__ float wm[SELECT_SCORE_THREADS / 32][SELECT_MAX_GROUP];
    __shared__ float wl[SELECT_SCORE_THREADS / 32][SELECT_MAX_GROUP];
    __shared__ float stat_m[SELECT_MAX_GROUP], stat_inv[SELECT_MAX_GROUP];
    const int h = blockIdx.x, b = blockIdx.y;
    const int d = dims.head_dim, g = dims.group, kvd = dims.kv_heads * d;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int n = counts[b].chunks;
    const __nv_bfloat16* qb = q + ((size_t)b * dims.kv_heads + h) * g * d;
    for (int i = threadIdx.x; i < g * d; i += blockDim.x) qs[i] = __bfloat162float(qb[i]);
    __syncthreads();
    const __nv_bfloat16* marks = reinterpret_cast<const __nv_bfloat16*>(bufs[b].marks) + (size_t)h * d;
    const unsigned char* excl = reinterpret_cast<const unsigned char*>(bufs[b].outlier) + (size_t)h * dims.chunk_cap;
    float* out = scores + ((size_t)b * dims.kv_heads + h) * dims.chunk_cap;

    // Pass 1: per query head, the running max m and sum l of exp(s - m) (each warp's
    // lanes hold identical copies).
    float m[SELECT_MAX_GROUP], l[SELECT_MAX_GROUP];
#pragma unroll
    for (int j = 0; j < SELECT_MAX_GROUP; ++j) {
        m[j] = SELECT_NEG_INF;
        l[j] = 0.f;
    }
    for (int ch = warp; ch < n; ch += nwarps) {
        if (excl[ch]) continue;
        float s[SELECT_MAX_GROUP];
        landmark_dots(s, qs, marks + (size_t)ch * kvd, d, g, lane);
#pragma unroll
        for (int j = 0; j < SELECT_MAX_GROUP; ++j) {
            if (j >= g) break;
            const float v = s[j] * scale;
            if (v > m[j]) {
                l[j] = l[j] * expf(m[j] - v) + 1.f;
                m[j] = v;
            } else {
                l[j] += expf(v - m[j]);
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < SELECT_MAX_GROUP; ++j) {
            wm[warp][j] = m[j];
            wl[warp][j] = l[j];
        }
    }
    __syncthreads();
    if (threadIdx.x < g) {
        const int j = threadIdx.x;
        float mm = SELECT_NEG_INF;
        for (int w = 0; w < nwarps; ++w) mm = fmaxf(mm, wm[w][j]);
        float ll = 0.f;
        for (int w = 0; w < nwarps; ++w)
            if (wm[w][j] != SELECT_NEG_INF) ll += wl[w][j] * expf(wm[w][j] - mm);
        stat_m[j] = mm;
        stat_inv[j] = ll > 0.f ? 1.f / ll : 0.f;
    }
    __syncthreads();

    // Pass 2: the normalised scores, max over the group.
    for (int ch = warp; ch < n; ch += nwarps) {
        float best = SELECT_NEG_INF;
        if (!excl[ch]) {
            float s[SELECT_MAX_GROUP];
            landmark_dots(s, qs, marks + (size_t)ch * kvd, d, g, lane);
#pragma unroll
            for (int j = 0; j < SELECT_MAX_GROUP; ++j)
                if (j < g) best = fmaxf(best, expf(s[j] * scale - stat_m[j]) * stat_inv[j]);
        }
        if (lane == 0) out[ch] = best;
    }
}

// The k best of v[0..n) (not excluded where excl is given), by value, ties to the lower
// index, ascending into out[0..min(k, candidates)), -1 in the rest of out[0..out_len).
// Every thread of the block calls it (blockDim.x a multiple of 32); k <= out_len.
__device__ void block_top_k(const float* __restrict__ v, const unsigned char* __restrict__ excl, int n, int k,
                            int* __restrict__ out, int out_len) {
    __shared__ unsigned int hist[256];
    __shared__ int scratch[32];
    __shared__ unsigned int s_prefix;
    __shared__ int s_need;
    const int tid = threadIdx.x, nt = blockDim.x;
    int mine = 0;
    for (int i = tid; i < n; i += nt) mine += excl == nullptr || excl[i] == 0;
    int cands;
    block_exclusive_sum(mine, scratch, &cands);
    const int kk = min(k, cands);
    // Keys above thr are all taken, and the first `ties` keys equal to thr (by index).
    // With every candidate taken, thr = 0 and ties covers every key equal to 0.
    unsigned int thr = 0;
    int ties = cands;
    if (kk > 0 && kk < cands) {
        unsigned int prefix = 0, mask = 0;
        int need = kk;  // rank, from the top, of the k-th key among those matching prefix
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += nt) hist[i] = 0;
            __syncthreads();
            for (int i = tid; i < n; i += nt) {
                if (excl != nullptr && excl[i] != 0) continue;
                const unsigned int u = ordered(v[i]);
                if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                int above = 0, dd = 255;
                for (; dd > 0; --dd) {
                    if (above + (int)hist[dd] >= need) break;
                    above += hist[dd];
                }
                s_prefix = prefix | ((unsigned int)dd << shift);
                s_need = need - above;
            }
            __syncthreads();
            prefix = s_prefix;
            need = s_need;
            mask |= 255u << shift;
        }
        thr = prefix;
        ties = need;
    }
    int taken = 0, equal_seen = 0;
    if (kk > 0) {
        for (int t0 = 0; t0 < n; t0 += nt) {
            const int i = t0 + tid;
            const bool cand = i < n && (excl == nullptr || excl[i] == 0);
            const unsigned int u = cand ? ordered(v[i]) : 0u;
            const bool eq = cand && u == thr;
            int eq_total;
            const int eq_rank = equal_seen + block_exclusive_sum(eq, scratch, &eq_total);
            const bool take = cand && (u > thr || (eq && eq_rank < ties));
            int take_total;
            const int pos = taken + block_exclusive_sum(take, scratch, &take_total);
            if (take) out[pos] = i;
            taken += take_total;
            equal_seen += eq_total;
        }
    }
    for (int i = kk + tid; i < out_len; i += nt) out[i] = -1;
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    shadow_top_k(int* __restrict__ selected, const float* __restrict__ scores,
                 const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                 ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y;
    const size_t row = (size_t)b * dims.kv_heads + h;
    const unsigned char* excl = reinterpret_cast<const unsigned char*>(bufs[b].outlier) + (size_t)h * dims.chunk_cap;
    block_top_k(scores + row * dims.chunk_cap, excl, counts[b].chunks, dims.slots, selected + row * dims.slots,
                dims.slots);
}

// out[r, 0..k): the k largest of values[r, 0..n) ascending by index (-1 past the
// candidates), for each row r = blockIdx.x.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_rows(int* __restrict__ out, const float* __restrict__ values, int n, int k, int values_stride) {
    pdl_wait();
    pdl_trigger();
    const size_t r = blockIdx.x;
    block_top_k(values + r * values_stride, nullptr, n, k, out + r * k, k);
}
