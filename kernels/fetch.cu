// Value fetch of the missed chunks of the ShadowKV decode step (reference: the fetch
// stage of src/shadow/seq.rs), into the slots of av.
//
// shadow_fetch (zero-copy): each miss (slot, chunk) of KV head h of sequence b copies the
// chunk's c * d bf16 values from the host value pool, read over PCIe through its
// device-mapped address,
//   pool [layer][pool_seq][kv_head][chunk][c * d]   (src/pool, in bf16)
//   src = pool + (((layer * pool_seqs + pool_seq_b) * kv_heads + h) * pool_chunks + chunk) * c * d,
// to av[h, slot_row(slot) ..] (c rows of d, token order).
// shadow_scatter (cpu-gather): the same misses, the values already gathered by the host
// into staging [n, c * d] (on the device) in list order: sequence, then head, then the
// miss's place j in misses[b, h, 0..miss_count[b, h]).
//
// Grid: any number of blocks of FETCH_THREADS threads (the zero-copy path runs on few
// blocks so that the warps waiting on PCIe do not hold the SMs other kernels need);
// dynamic shared memory (batch * kv_heads + 1) ints. Each block computes the offsets of
// the (b, h) miss lists, then its warps stride over all misses, one chunk per warp,
// 16-byte words, FETCH_UNROLL loads in flight per lane.
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

#define FETCH_THREADS 256
#define FETCH_UNROLL 4

// Copies every miss's chunk from src_of(b, h, chunk, t) (t = the miss's place in the
// whole list) to its slot.
template <typename Src>
__device__ __forceinline__ void copy_misses(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                                            const ShadowSeqBufs* __restrict__ bufs,
                                            const ShadowSeqCounts* __restrict__ counts, const ShadowDims& dims,
                                            int batch, Src src_of) {
    extern __shared__ int off[];  // [batch * kv_heads + 1]
    __shared__ int scratch[32];
    const int lists = batch * dims.kv_heads;
    const int total = block_offsets(miss_count, lists, dims.slots, off, scratch);
    const int lane = threadIdx.x & 31;
    const int warps = (gridDim.x * blockDim.x) >> 5;
    const int words = dims.chunk * dims.head_dim / 8;  // 16-byte words per chunk
    for (int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < total; t += warps) {
        const int e = run_of(off, lists, t);
        const int b = e / dims.kv_heads, h = e - b * dims.kv_heads;
        const int2 m = misses[(size_t)e * dims.slots + (t - off[e])];  // (slot, chunk)
        if (m.x < 0 || m.x >= dims.slots || m.y < 0 || m.y >= dims.chunk_cap) continue;  // not a miss list
        const uint4* src = src_of(b, h, m.y, t);
        uint4* dst = reinterpret_cast<uint4*>(
            shadow_attn_row(bufs[b].av, dims, h, shadow_slot_row(dims, counts[b].outliers, m.x)));
        for (int w0 = 0; w0 < words; w0 += 32 * FETCH_UNROLL) {
            uint4 v[FETCH_UNROLL];
#pragma unroll
            for (int u = 0; u < FETCH_UNROLL; ++u) {
                const int w = w0 + u * 32 + lane;
                if (w < words) v[u] = src[w];
            }
#pragma unroll
            for (int u = 0; u < FETCH_UNROLL; ++u) {
                const int w = w0 + u * 32 + lane;
                if (w < words) dst[w] = v[u];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(FETCH_THREADS, 1)
    shadow_fetch(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                 const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                 ShadowDims dims, int batch, const __nv_bfloat16* __restrict__ pool, int layer, int pool_seqs,
                 int pool_chunks) {
    pdl_wait();
    pdl_trigger();
    const size_t chunk_elems = (size_t)dims.chunk * dims.head_dim;
    copy_misses(misses, miss_count, bufs, counts, dims, batch, [=](int b, int h, int chunk, int) {
        const size_t seq = (size_t)layer * pool_seqs + counts[b].pool_seq;
        return reinterpret_cast<const uint4*>(pool + ((seq * dims.kv_heads + h) * pool_chunks + chunk) * chunk_elems);
    });
}

extern "C" __global__ void __launch_bounds__(FETCH_THREADS, 1)
    shadow_scatter(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                   const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                   ShadowDims dims, int batch, const __nv_bfloat16* __restrict__ staging) {
    pdl_wait();
    pdl_trigger();
    const size_t chunk_elems = (size_t)dims.chunk * dims.head_dim;
    copy_misses(misses, miss_count, bufs, counts, dims, batch, [=](int, int, int, int t) {
        return reinterpret_cast<const uint4*>(staging + (size_t)t * chunk_elems);
    });
}
