// Embedding gather: out[r, :] = table[ids[r] - lo, :] (bf16 rows of `hidden` values),
// where the table holds rows lo .. lo + rows of a vocabulary of `vocab` ids (all of them,
// or one tensor-parallel device's share: ids of the vocabulary held elsewhere give a row
// of zeros, which the all-reduce that follows fills from the device that holds them).
//
// One block per output row. Rows whose id is outside the vocabulary are filled with
// NaN so that a bad id can never pass silently as plausible numbers. With `prev_map`
// (may be null), a row r with prev_map[r] >= 0 takes its id from prev_tokens[prev_map[r]]
// instead: the token a previous step sampled on the device, which the host has not read
// back yet (asynchronous scheduling).
#include <cuda_bf16.h>

#include "pdl.cuh"

extern "C" __global__ void embedding_gather(__nv_bfloat16* __restrict__ out,
                                            const __nv_bfloat16* __restrict__ table,
                                            const unsigned int* __restrict__ ids,
                                            const int* __restrict__ prev_map,
                                            const unsigned int* __restrict__ prev_tokens,
                                            int hidden, unsigned int lo, unsigned int rows,
                                            unsigned int vocab) {
    pdl_wait();
    pdl_trigger();
    const int r = blockIdx.x;
    const int from = prev_map ? prev_map[r] : -1;
    const unsigned int id = from >= 0 ? prev_tokens[from] : ids[r];
    __nv_bfloat16* dst = out + (size_t)r * hidden;
    if (id >= vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = __ushort_as_bfloat16(0x7FC0);
        return;
    }
    if (id - lo >= rows) {  // unsigned: ids below lo wrap past rows
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = __float2bfloat16(0.0f);
        return;
    }
    const __nv_bfloat16* src = table + (size_t)(id - lo) * hidden;
    if ((hidden & 7) == 0) {
        // 16-byte copies: every row starts 16-byte aligned when hidden % 8 == 0.
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) d[i] = __ldg(s + i);
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
    }
}
