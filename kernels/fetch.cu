// Value fetch of the missed chunks of the ShadowKV decode step (reference: the fetch
// stage of src/shadow/seq.rs), into the slots of av. The reuse diff lists, per (b, h),
// first the misses to fetch from the host (fetch_count[b, h] of them), then those found in
// the GPU value tier (copied by the key rebuild, kernels/rebuild.cu).
//
// shadow_fetch (zero-copy): each miss (slot, chunk) of KV head h of sequence b reads the
// chunk's c * d values in 8 bits from the value pool holding the sequence's slot
// (shadow_pool_chunk, shadow.cuh): the host pool, read over PCIe through its
// device-mapped address, or for a GPU value slot the pool in device memory (an HBM copy),
//   pool [layer][seq][kv_head][chunk]   (src/pool: codes, then a scale per token),
// and writes them as they are to the slot's values in av (shadow_slot_values, shadow.cuh:
// the attention reads the 8 bits).
// shadow_scatter (cpu-gather): the same misses, their chunks already gathered by the host
// into staging [n] chunks (on the device) in list order: sequence, then head, then the
// miss's place j in misses[b, h, 0..fetch_count[b, h]).
// With a GPU value tier (dims.tier = T > 0) both also write the j-th fetched chunk of
// (b, h), for j < T, as it is (8 bits) to tier entry (tier_base[b, h] + j) % T, the entry
// the reuse diff gave it.
//
// Grid: any number of blocks of FETCH_THREADS threads (the zero-copy path runs on few
// blocks so that the warps waiting on PCIe do not hold the SMs other kernels need);
// dynamic shared memory (batch * kv_heads + 1) ints. Each block computes the offsets of
// the (b, h) miss lists, then its warps stride over all misses, one chunk per warp,
// 16-byte words (copy_chunks, shadow.cuh).
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

#define FETCH_THREADS 256

// The tier entry that the j-th fetched chunk of list e also goes to, or null.
struct TierDst {
    const ShadowSeqBufs* bufs;
    const int* tier_base;
    ShadowDims dims;
    __device__ uint4* operator()(int b, int h, int j, int e) const {
        if (dims.tier <= 0 || j >= dims.tier) return nullptr;
        return shadow_tier_entry(bufs[b], dims, h, (tier_base[e] + j) % dims.tier);
    }
};

extern "C" __global__ void __launch_bounds__(FETCH_THREADS, 1)
    shadow_fetch(const int2* __restrict__ misses, const int* __restrict__ fetch_count,
                 const int* __restrict__ tier_base, const ShadowSeqBufs* __restrict__ bufs,
                 const ShadowSeqCounts* __restrict__ counts, ShadowDims dims, int batch, ShadowPool pool,
                 int layer) {
    pdl_wait();
    pdl_trigger();
    copy_chunks(
        misses, fetch_count, bufs, counts, dims, batch, dims.chunk_cap, [](int) { return 0; },
        [=](int b, int h, int chunk, int, int) {
            return reinterpret_cast<const uint4*>(shadow_pool_chunk(pool, dims, layer, counts[b].pool_seq, h, chunk));
        },
        TierDst{bufs, tier_base, dims});
}

extern "C" __global__ void __launch_bounds__(FETCH_THREADS, 1)
    shadow_scatter(const int2* __restrict__ misses, const int* __restrict__ fetch_count,
                   const int* __restrict__ tier_base, const ShadowSeqBufs* __restrict__ bufs,
                   const ShadowSeqCounts* __restrict__ counts, ShadowDims dims, int batch,
                   const unsigned char* __restrict__ staging) {
    pdl_wait();
    pdl_trigger();
    const size_t chunk_bytes = value_chunk_bytes(dims);
    copy_chunks(
        misses, fetch_count, bufs, counts, dims, batch, dims.chunk_cap, [](int) { return 0; },
        [=](int, int, int, int t, int) { return reinterpret_cast<const uint4*>(staging + (size_t)t * chunk_bytes); },
        TierDst{bufs, tier_base, dims});
}
