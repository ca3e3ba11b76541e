// Key rebuild of the missed chunks of the ShadowKV decode step (reference:
// LowRank::rebuild in src/shadow/factor.rs, then Rope::tables / Rope::apply).
//
// For each miss (slot, chunk) of KV head h of sequence b, the chunk's rows
// t = chunk * c + i (i < c) are rebuilt from the low-rank pre-RoPE keys,
//   k[t, :] = u[t, 0..rank) . sv[0..rank, h*d .. (h+1)*d)     (fp32),
// rotated at position t (Hugging Face rotate-half, the arithmetic of rope.cu) and
// stored as bf16 to ak[h, slot_row(slot) + i, :].
//
// Grid (kv_heads, batch), block (d/2, misses in flight): thread x owns the rotation
// pair (x, x + d/2) of one miss, for all c rows of the chunk, so the rotation needs no
// exchange between threads; y strides over the (b, h) misses. The rows of u are read
// by every thread of a warp at once (broadcast loads), the columns of sv coalesced.
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

#define REBUILD_MAX_CHUNK 16

extern "C" __global__ void shadow_rebuild(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                                          const ShadowSeqBufs* __restrict__ bufs,
                                          const ShadowSeqCounts* __restrict__ counts,
                                          const float* __restrict__ inv_freq, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y;
    const int half = blockDim.x, x = threadIdx.x;
    const int d = dims.head_dim, c = dims.chunk, r = dims.rank;
    const size_t kvd = (size_t)dims.kv_heads * d;
    const size_t row = (size_t)b * dims.kv_heads + h;
    const int nm = min(miss_count[row], dims.slots);
    const int2* list = misses + row * dims.slots;
    const __nv_bfloat16* U = reinterpret_cast<const __nv_bfloat16*>(bufs[b].u);
    const float* SV = reinterpret_cast<const float*>(bufs[b].sv) + (size_t)h * d;
    const int n_out = counts[b].outliers;
    const float f = inv_freq[x];
    for (int j = threadIdx.y; j < nm; j += blockDim.y) {
        const int2 m = list[j];  // (slot, chunk)
        if (m.x < 0 || m.x >= dims.slots || m.y < 0 || m.y >= dims.chunk_cap) continue;  // not a miss list
        const size_t t0 = (size_t)m.y * c;
        const __nv_bfloat16* u0 = U + t0 * r;
        float a0[REBUILD_MAX_CHUNK], a1[REBUILD_MAX_CHUNK];
#pragma unroll
        for (int i = 0; i < REBUILD_MAX_CHUNK; ++i) a0[i] = a1[i] = 0.f;
        for (int k = 0; k < r; ++k) {
            const float s0 = SV[(size_t)k * kvd + x], s1 = SV[(size_t)k * kvd + x + half];
#pragma unroll
            for (int i = 0; i < REBUILD_MAX_CHUNK; ++i) {
                if (i < c) {
                    const float uk = __bfloat162float(u0[(size_t)i * r + k]);
                    a0[i] += uk * s0;
                    a1[i] += uk * s1;
                }
            }
        }
        __nv_bfloat16* dst = shadow_attn_row(bufs[b].ak, dims, h, shadow_slot_row(dims, n_out, m.x));
#pragma unroll
        for (int i = 0; i < REBUILD_MAX_CHUNK; ++i) {
            if (i < c) {
                float sn, cs;
                sincosf(__fmul_rn((float)(t0 + i), f), &sn, &cs);
                const float x0 = a0[i], x1 = a1[i];
                dst[i * d + x] = __float2bfloat16_rn(__fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn)));
                dst[i * d + x + half] = __float2bfloat16_rn(__fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn)));
            }
        }
    }
}
