// The ShadowKV state of one sequence and layer as the kernels see it, and block-wide
// helpers shared by the ShadowKV kernel files. The structs mirror the #[repr(C)] types
// of src/cuda/shadow/layout.rs, where the layout is documented; keep the two in step.
// Passed to NVRTC as an in-memory header by src/cuda/nvrtc.rs and tools/nvrtc-check.
//
// Per sequence and layer (kvh = kv_heads, d = head_dim, c = chunk, R = recent rows):
//   marks   [kvh, chunk_cap, d]  i8     landmark of each chunk in 8 bits, code * scale
//   mark_scales [kvh, chunk_cap] f32    (code8_code), head-major: the scores stream a head
//   outlier [kvh, chunk_cap]     u8     1 = outlier chunk of that head (never selected)
//   u       [chunk_cap * c, rank] i8   low-rank coefficients of the sparse tokens in 8 bits,
//   u_scales [chunk_cap * c]     f32    a scale per token: coefficient = code * scale (code8_coef_row)
//   fold_u  [c, rank]            f32    the fold's coefficients of the chunk it folds, before rounding
//   sv      [rank, kvh * d]      f32    the basis
//   slots   [kvh, slots]         i32    chunk held by each slot, -1 = empty
//   ak, av  [kvh, rows_cap, d]   bf16   attention rows per head:
//           recent [0, R) newest-first ending at row R (n tokens: rows [R - n, R),
//           the newest at R - n), outliers [R, R + n_out * c), slot s at
//           R + (n_out + s) * c (n_out = the sequence's outlier chunks); a slot's
//           values are its chunk in the pools' 8-bit format (value_chunk_bytes) in
//           place, at the first bytes of its c rows of av (shadow_slot_values)
//   kpre    [R, kvh * d]         bf16   pre-RoPE keys of the recent window, same rows
// and, with a GPU value tier of T > 0 entries per head (a FIFO cache of chunks' values in
// device memory, so that a missed chunk found there is not read over PCIe):
//   tier       [kvh, T]  chunks of value_chunk_bytes: the values of the chunk each entry holds,
//                                       in the pool's format (below)
//   tier_map   [kvh, chunk_cap]  i32    the entry holding each chunk, -1 = none
//   tier_owner [kvh, T]          i32    the chunk each entry holds, -1 = empty
//   tier_next  [kvh]             i32    the entry the next fetched chunk replaces
#pragma once
#include <cuda_bf16.h>

#include "common.cuh"

struct ShadowDims {
    int kv_heads;
    int head_dim;
    int group;      // query heads per KV head
    int chunk;      // tokens per chunk
    int rank;
    int slots;      // selected chunks per head (S)
    int outliers;   // outlier chunks per head, capacity (O)
    int recent;     // rows of the recent window, R = (local + 2) * chunk
    int rows_cap;   // R + (O + S) * chunk
    int chunk_cap;  // chunks per sequence
    int tier;       // entries of the GPU value tier per head (T, 0 = none)
};

struct ShadowSeqBufs {
    unsigned long long marks, mark_scales, outlier, u, u_scales, fold_u, sv, slots, ak, av, kpre;
    unsigned long long tier, tier_map, tier_owner, tier_next;  // 0 without a tier
};

struct ShadowSeqCounts {
    int chunks;    // chunks in the sparse region
    int recent;    // tokens in the recent window
    int outliers;  // outlier chunks of each head (n_out <= O)
    int pool_seq;  // the sequence's slot in the value pools (global, see ShadowPool)
};

// The value pools, each [layer][seq][kv_head][chunk], a chunk of one head its c token rows
// in 8 bits (reference: src/pool, src/shadow/codes8.rs): c * d int8 codes in token order,
// then c fp32 scales (value = code * scale), padded to whole 16-byte words
// (value_chunk_bytes): the host pool (its
// device-mapped address; read over PCIe) of host_seqs slots and the pool in device memory
// of dev_seqs slots (GPU value slots). A sequence's pool_seq is global: below host_seqs a
// host slot, else device slot pool_seq - host_seqs.
struct ShadowPool {
    unsigned long long host, dev;  // 0 where that pool holds no slot
    int host_seqs, dev_seqs;
    int chunks;  // chunks per slot and head
    int pad;
};

static_assert(sizeof(ShadowDims) == 44, "ShadowDims mirrors layout.rs");
static_assert(sizeof(ShadowSeqBufs) == 120, "ShadowSeqBufs mirrors layout.rs");
static_assert(sizeof(ShadowSeqCounts) == 16, "ShadowSeqCounts mirrors layout.rs");
static_assert(sizeof(ShadowPool) == 32, "ShadowPool mirrors layout.rs");

// Bytes of one chunk of one head's values in 8 bits (the pools' and the tier's format).
__device__ __forceinline__ int value_chunk_bytes(const ShadowDims& dims) {
    return (dims.chunk * (dims.head_dim + 4) + 15) & ~15;
}

// The values (value_chunk_bytes) of chunk `chunk` of head h of global slot `pool_seq` at
// layer `layer`, in whichever pool holds the slot (the caller keeps the slot and chunk in
// range).
__device__ __forceinline__ unsigned char* shadow_pool_chunk(const ShadowPool& p, const ShadowDims& dims, int layer,
                                                            int pool_seq, int h, int chunk) {
    const bool dev = pool_seq >= p.host_seqs;
    const size_t seqs = dev ? p.dev_seqs : p.host_seqs;
    const size_t s = dev ? pool_seq - p.host_seqs : pool_seq;
    return reinterpret_cast<unsigned char*>(dev ? p.dev : p.host) +
           ((((size_t)layer * seqs + s) * dims.kv_heads + h) * p.chunks + chunk) * value_chunk_bytes(dims);
}

// A vector in 8 bits, landmarks and values alike (reference: src/shadow/codes8.rs, the
// same arithmetic): the scale of a vector whose largest |value| is max_abs, max_abs / 127
// (0 for a zero vector), and the code of its value l, round(l / scale) to even within
// +-127 (0 where the scale is 0). IEEE divisions, whatever the compiler's options.
__device__ __forceinline__ float code8_scale(float max_abs) {
    return max_abs == 0.f ? 0.f : __fdiv_rn(max_abs, 127.f);
}
__device__ __forceinline__ signed char code8_code(float l, float scale) {
    return scale == 0.f ? 0 : (signed char)max(-127, min(127, __float2int_rn(__fdiv_rn(l, scale))));
}

// Writes a row of n fp32 low-rank coefficients `src` in 8 bits (the values' rounding, one
// scale for the row; reference: LowRank::project in src/shadow/factor.rs): the codes to
// `codes`, the scale to *scale. One warp, every lane calling.
__device__ __forceinline__ void code8_coef_row(const float* __restrict__ src, int n, signed char* __restrict__ codes,
                                               float* __restrict__ scale) {
    const int lane = threadIdx.x & 31;
    float m = 0.f;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, fabsf(src[i]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float s = code8_scale(m);
    for (int i = lane; i < n; i += 32) codes[i] = code8_code(src[i], s);
    if (lane == 0) *scale = s;
}

// Writes token row `x` (d bf16 values, 16-byte aligned) in 8 bits to a chunk in the pools'
// format: its codes to row r of `chunk`, its scale to the chunk's scale r. One warp, every
// lane calling (d = 64 or 128: d / 32 values a lane).
__device__ __forceinline__ void code8_value_row(const __nv_bfloat16* __restrict__ x, unsigned char* chunk, int r,
                                                const ShadowDims& dims) {
    const int lane = threadIdx.x & 31, d = dims.head_dim, per = d >> 5;
    float v[4];
    if (per == 4) {
        const uint2 w = reinterpret_cast<const uint2*>(x)[lane];
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w.x));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w.y));
        v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
    } else {
        const float2 a = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(x)[lane]);
        v[0] = a.x, v[1] = a.y, v[2] = 0.f, v[3] = 0.f;
    }
    float m = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float s = code8_scale(m);
    unsigned q = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
        if (i < per) q |= (unsigned)(unsigned char)code8_code(v[i], s) << (8 * i);
    unsigned char* codes = chunk + (size_t)r * d;
    if (per == 4)
        reinterpret_cast<unsigned*>(codes)[lane] = q;
    else
        reinterpret_cast<unsigned short*>(codes)[lane] = (unsigned short)q;
    if (lane == 0) reinterpret_cast<float*>(chunk + (size_t)dims.chunk * d)[r] = s;
}

// Writes a chunk's c token rows, row r at row_of(r) (bf16, 16-byte aligned), in 8 bits to
// `chunk` (code8_value_row): the block's warps take a row each in turn.
template <typename RowOf>
__device__ __forceinline__ void code8_value_chunk(RowOf row_of, unsigned char* chunk, const ShadowDims& dims) {
    for (int r = threadIdx.x >> 5; r < dims.chunk; r += blockDim.x >> 5) code8_value_row(row_of(r), chunk, r, dims);
}

// The largest v over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets it. `scratch` is a __shared__ float[32]; ends with a barrier.
__device__ __forceinline__ float block_max(float v, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int w = 1; w < nwarps; ++w) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}

// First row of slot `slot` for a sequence with `n_out` outlier chunks.
__device__ __forceinline__ int shadow_slot_row(const ShadowDims& s, int n_out, int slot) {
    return s.recent + (n_out + slot) * s.chunk;
}

// Row `row` of head `h` of an attention buffer (ak or av) at address `base`.
__device__ __forceinline__ __nv_bfloat16* shadow_attn_row(unsigned long long base, const ShadowDims& s,
                                                          int h, int row) {
    return reinterpret_cast<__nv_bfloat16*>(base) + ((size_t)h * s.rows_cap + row) * s.head_dim;
}

// The values of slot `slot` of head h of a sequence with `n_out` outlier chunks: the
// chunk in the pools' 8-bit format (value_chunk_bytes), in place at the first bytes of the
// slot's c rows of av (whose 2 c d bytes hold it), where the attention reads them
// (flash_decode.cu, its 8-bit chunks).
__device__ __forceinline__ uint4* shadow_slot_values(const ShadowSeqBufs& b, const ShadowDims& s, int h, int n_out,
                                                     int slot) {
    return reinterpret_cast<uint4*>(shadow_attn_row(b.av, s, h, shadow_slot_row(s, n_out, slot)));
}

// Exclusive prefix sum of `v` over the block, in thread order; `*total` receives the
// block's sum. Every thread of the block must call it (blockDim.x a multiple of 32);
// `scratch` is a __shared__ int[32]. Ends with a barrier, so scratch may be reused.
__device__ __forceinline__ int block_exclusive_sum(int v, int* scratch, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nwarps ? scratch[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        scratch[lane] = w;  // inclusive sums of the warp totals
    }
    __syncthreads();
    const int before = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[nwarps - 1];
    __syncthreads();
    return before + x - v;
}

// Exclusive offsets of `n` counts, each clamped to [0, most], in shared memory:
// off[e] = counts[0] + ... + counts[e - 1], off[n] = the total (returned). `off` holds
// n + 1 ints; every thread of the block must call it; ends with a barrier.
__device__ __forceinline__ int block_offsets(const int* __restrict__ counts, int n, int most, int* off,
                                             int* scratch) {
    const int per = (n + (int)blockDim.x - 1) / (int)blockDim.x;
    const int lo = min(n, (int)threadIdx.x * per), hi = min(n, lo + per);
    int s = 0;
    for (int e = lo; e < hi; ++e) s += min(max(counts[e], 0), most);
    int total;
    int acc = block_exclusive_sum(s, scratch, &total);
    for (int e = lo; e < hi; ++e) {
        off[e] = acc;
        acc += min(max(counts[e], 0), most);
    }
    if (threadIdx.x == 0) off[n] = total;
    __syncthreads();
    return total;
}

// The largest e in [0, n) with off[e] <= t, for t < off[n] (the entry that item t of a
// list of concatenated runs belongs to; empty runs are skipped).
__device__ __forceinline__ int run_of(const int* off, int n, int t) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (off[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Copies chunks of values for a batch's concatenated lists: list e = b * kv_heads + h
// holds n(e) = counts[e] entries (clamped to [0, S]) at list[e * S + first(e) ...]; entry j
// of list e reads chunk src_of(b, h, entry, t) (t = the entry's place in the whole
// concatenation; value_chunk_bytes in the pools' 8-bit format) and writes its bytes as they
// are to its slot of av (shadow_slot_values) and, where extra_of(b, h, j, e) is not null,
// there too. One warp per chunk, 16-byte words, COPY_UNROLL loads in flight per lane; the
// warps of the whole grid stride over the concatenation. Dynamic shared memory:
// (batch * kv_heads + 1) ints. Entries naming a slot out of range, or (where `limit` > 0) a
// second field at or past `limit`, are skipped.
#define COPY_UNROLL 4
template <typename First, typename Src, typename Extra>
__device__ __forceinline__ void copy_chunks(const int2* __restrict__ list, const int* __restrict__ counts,
                                            const ShadowSeqBufs* __restrict__ bufs,
                                            const ShadowSeqCounts* __restrict__ seq_counts, const ShadowDims& dims,
                                            int batch, int limit, First first_of, Src src_of, Extra extra_of) {
    extern __shared__ int off[];  // [batch * kv_heads + 1]
    __shared__ int scratch[32];
    const int lists = batch * dims.kv_heads;
    const int total = block_offsets(counts, lists, dims.slots, off, scratch);
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    const int words = value_chunk_bytes(dims) / 16;  // 16-byte words per chunk
    for (int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < total; t += warps) {
        const int e = run_of(off, lists, t);
        const int b = e / dims.kv_heads, h = e - b * dims.kv_heads;
        const int j = first_of(e) + (t - off[e]);
        if (j >= dims.slots) continue;
        const int2 m = list[(size_t)e * dims.slots + j];  // (slot, chunk or entry)
        if (m.x < 0 || m.x >= dims.slots || m.y < 0 || (limit > 0 && m.y >= limit)) continue;
        const uint4* src = src_of(b, h, m.y, t, e * dims.slots + j);
        uint4* dst = shadow_slot_values(bufs[b], dims, h, seq_counts[b].outliers, m.x);
        uint4* extra = extra_of(b, h, j, e);
        for (int w0 = 0; w0 < words; w0 += 32 * COPY_UNROLL) {
            uint4 v[COPY_UNROLL];
#pragma unroll
            for (int u = 0; u < COPY_UNROLL; ++u) {
                const int w = w0 + u * 32 + lane;
                if (w < words) v[u] = src[w];
            }
#pragma unroll
            for (int u = 0; u < COPY_UNROLL; ++u) {
                const int w = w0 + u * 32 + lane;
                if (w < words) {
                    dst[w] = v[u];
                    if (extra) extra[w] = v[u];
                }
            }
        }
    }
}

// The tier entry `entry` of head h (value_chunk_bytes) of a sequence's buffers.
__device__ __forceinline__ uint4* shadow_tier_entry(const ShadowSeqBufs& b, const ShadowDims& dims, int h,
                                                    int entry) {
    return reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(b.tier) +
                                    ((size_t)h * dims.tier + entry) * value_chunk_bytes(dims));
}
