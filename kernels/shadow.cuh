// The ShadowKV state of one sequence and layer as the kernels see it, and block-wide
// helpers shared by the ShadowKV kernel files. The structs mirror the #[repr(C)] types
// of src/cuda/shadow/layout.rs, where the layout is documented; keep the two in step.
// Passed to NVRTC as an in-memory header by src/cuda/nvrtc.rs and tools/nvrtc-check.
//
// Per sequence and layer (kvh = kv_heads, d = head_dim, c = chunk, R = recent rows):
//   marks   [chunk_cap, kvh * d] bf16   landmark of each chunk (row = chunk)
//   outlier [kvh, chunk_cap]     u8     1 = outlier chunk of that head (never selected)
//   u       [chunk_cap * c, rank] bf16  low-rank coefficients of the sparse tokens
//   sv      [rank, kvh * d]      f32    the basis
//   slots   [kvh, slots]         i32    chunk held by each slot, -1 = empty
//   ak, av  [kvh, rows_cap, d]   bf16   attention rows per head:
//           recent [0, R) newest-first ending at row R (n tokens: rows [R - n, R),
//           the newest at R - n), outliers [R, R + n_out * c), slot s at
//           R + (n_out + s) * c (n_out = the sequence's outlier chunks)
//   kpre    [R, kvh * d]         bf16   pre-RoPE keys of the recent window, same rows
#pragma once
#include <cuda_bf16.h>

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
};

struct ShadowSeqBufs {
    unsigned long long marks, outlier, u, sv, slots, ak, av, kpre;
};

struct ShadowSeqCounts {
    int chunks;    // chunks in the sparse region
    int recent;    // tokens in the recent window
    int outliers;  // outlier chunks of each head (n_out <= O)
    int pool_seq;  // the sequence's slot in the host value pool
};

static_assert(sizeof(ShadowDims) == 40, "ShadowDims mirrors layout.rs");
static_assert(sizeof(ShadowSeqBufs) == 64, "ShadowSeqBufs mirrors layout.rs");
static_assert(sizeof(ShadowSeqCounts) == 16, "ShadowSeqCounts mirrors layout.rs");

// First row of slot `slot` for a sequence with `n_out` outlier chunks.
__device__ __forceinline__ int shadow_slot_row(const ShadowDims& s, int n_out, int slot) {
    return s.recent + (n_out + slot) * s.chunk;
}

// Row `row` of head `h` of an attention buffer (ak or av) at address `base`.
__device__ __forceinline__ __nv_bfloat16* shadow_attn_row(unsigned long long base, const ShadowDims& s,
                                                          int h, int row) {
    return reinterpret_cast<__nv_bfloat16*>(base) + ((size_t)h * s.rows_cap + row) * s.head_dim;
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
