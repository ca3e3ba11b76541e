// The GPU value tier of ShadowKV decoding: per (sequence, layer, KV head) a FIFO cache of
// T chunks' values in device memory (layout in shadow.cuh), so that a missed chunk found
// there is copied from HBM instead of read over PCIe. The reuse diff (reuse.cu) looks the
// misses up and keeps the table; the fetch (fetch.cu) writes each chunk it brings from
// the host into the entry the diff gave it. No CPU reference: the tier moves the same
// bytes as the host pool holds, so a step's values are bit-identical with it or without.
//
// The tier hits go to their slots of av in the key rebuild (rebuild.cu), beside their keys.
// shadow_tier_fill, grid (n, kv_heads), block 128: at the end of a prefill, entry x < n of
// head h takes chunk first + x of the dense values v [T_tokens, kv_heads * d] (one
// sequence) in 8 bits, the bytes the pool write gives the chunk (code8_value_chunk), and
// the table records it; tier_next[h] = n % T.
// shadow_tier_fill_pool, the same grid and result, the chunks read from the sequence's
// slot of the value pools instead (a tier added after the prefill's dense cache is gone):
// the registered host pool or the GPU value slots' pool (shadow_pool_chunk, shadow.cuh).
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"


extern "C" __global__ void shadow_tier_fill(ShadowSeqBufs bufs, const __nv_bfloat16* __restrict__ v, int first,
                                            ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int x = blockIdx.x, h = blockIdx.y, n = gridDim.x;
    const int d = dims.head_dim, c = dims.chunk, ch = first + x;
    const size_t kvd = (size_t)dims.kv_heads * d;
    code8_value_chunk([&](int t) { return v + ((size_t)ch * c + t) * kvd + (size_t)h * d; },
                      reinterpret_cast<unsigned char*>(shadow_tier_entry(bufs, dims, h, x)), dims);
    if (threadIdx.x == 0) {
        reinterpret_cast<int*>(bufs.tier_owner)[(size_t)h * dims.tier + x] = ch;
        reinterpret_cast<int*>(bufs.tier_map)[(size_t)h * dims.chunk_cap + ch] = x;
        if (x == 0) reinterpret_cast<int*>(bufs.tier_next)[h] = n % dims.tier;
    }
}

extern "C" __global__ void shadow_tier_fill_pool(ShadowSeqBufs bufs, ShadowPool pool, int layer, int pool_seq,
                                                 int first, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int x = blockIdx.x, h = blockIdx.y, n = gridDim.x;
    const int ch = first + x;
    const int words = value_chunk_bytes(dims) / 16;
    const uint4* src = reinterpret_cast<const uint4*>(shadow_pool_chunk(pool, dims, layer, pool_seq, h, ch));
    uint4* dst = shadow_tier_entry(bufs, dims, h, x);
    for (int w = threadIdx.x; w < words; w += blockDim.x) dst[w] = src[w];
    if (threadIdx.x == 0) {
        reinterpret_cast<int*>(bufs.tier_owner)[(size_t)h * dims.tier + x] = ch;
        reinterpret_cast<int*>(bufs.tier_map)[(size_t)h * dims.chunk_cap + ch] = x;
        if (x == 0) reinterpret_cast<int*>(bufs.tier_next)[h] = n % dims.tier;
    }
}
