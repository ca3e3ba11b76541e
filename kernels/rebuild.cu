// Key rebuild of the missed chunks of the ShadowKV decode step (reference:
// LowRank::rebuild in src/shadow/factor.rs, then Rope::tables / Rope::apply).
//
// For each miss (slot, chunk) of KV head h of sequence b, the chunk's rows
// t = chunk * c + i (i < c) are rebuilt from the low-rank pre-RoPE keys,
//   k[t, :] = u[t, 0..rank) . sv[0..rank, h*d .. (h+1)*d)     (fp32, k ascending),
// rotated at position t (Hugging Face rotate-half, the arithmetic of rope.cu) and
// stored as bf16 to ak[h, slot_row(slot) + i, :].
//
// Grid (ceil(slots / REBUILD_MISSES), kv_heads, batch), block (d/2, REBUILD_MISSES):
// block x of head h takes the misses x*REBUILD_MISSES .. of the head's list, thread
// (x, y) the rotation pair (x, x + d/2) of miss y for all c rows of the chunk, so the
// rotation needs no exchange between threads. The rank is walked in tiles of
// REBUILD_K_TILE: the block stages the tile's rows of sv (the head's d columns, shared
// by its misses) and of u (c rows per miss) in shared memory, then every thread
// accumulates from there, four ranks per step (one 16-byte u load per row).
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

#define REBUILD_MAX_CHUNK 16
#define REBUILD_MISSES 8
#define REBUILD_K_TILE 32
#define REBUILD_MAX_DIM 128

extern "C" __global__ void __launch_bounds__(REBUILD_MAX_DIM / 2 * REBUILD_MISSES)
    shadow_rebuild(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                   const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                   const float* __restrict__ inv_freq, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    __shared__ __align__(16) float sv_s[REBUILD_K_TILE][REBUILD_MAX_DIM];
    __shared__ __align__(16) float u_s[REBUILD_MISSES][REBUILD_MAX_CHUNK][REBUILD_K_TILE];
    __shared__ int2 miss_s[REBUILD_MISSES];
    const int h = blockIdx.y, b = blockIdx.z;
    const int half = blockDim.x, x = threadIdx.x, y = threadIdx.y;
    const int tid = y * half + x, nthreads = half * REBUILD_MISSES;
    const int d = dims.head_dim, c = dims.chunk, r = dims.rank;
    const size_t kvd = (size_t)dims.kv_heads * d;
    const size_t row = (size_t)b * dims.kv_heads + h;
    const int nm = min(miss_count[row], dims.slots);
    const int first = blockIdx.x * REBUILD_MISSES;
    if (first >= nm) return;
    if (tid < REBUILD_MISSES) {
        int2 m = first + tid < nm ? misses[row * dims.slots + first + tid] : make_int2(-1, -1);
        if (m.x < 0 || m.x >= dims.slots || m.y < 0 || m.y >= dims.chunk_cap) m = make_int2(-1, -1);  // not a miss
        miss_s[tid] = m;
    }
    __syncthreads();
    const __nv_bfloat16* U = reinterpret_cast<const __nv_bfloat16*>(bufs[b].u);
    const float* SV = reinterpret_cast<const float*>(bufs[b].sv) + (size_t)h * d;
    float a0[REBUILD_MAX_CHUNK], a1[REBUILD_MAX_CHUNK];
#pragma unroll
    for (int i = 0; i < REBUILD_MAX_CHUNK; ++i) a0[i] = a1[i] = 0.f;

    for (int k0 = 0; k0 < r; k0 += REBUILD_K_TILE) {
        // Stage sv[k0 .. k0+tile, head's columns] (16-byte loads; d is 64 or 128) and
        // u[rows of each miss, k0 .. k0+tile], zero past the rank or for no miss.
        const int quads = d / 4;
        for (int i = tid; i < REBUILD_K_TILE * quads; i += nthreads) {
            const int kk = i / quads, col = (i % quads) * 4;
            const float4 v = k0 + kk < r ? *reinterpret_cast<const float4*>(SV + (size_t)(k0 + kk) * kvd + col)
                                         : make_float4(0.f, 0.f, 0.f, 0.f);
            *reinterpret_cast<float4*>(&sv_s[kk][col]) = v;
        }
        for (int i = tid; i < REBUILD_MISSES * c * REBUILD_K_TILE; i += nthreads) {
            const int kk = i % REBUILD_K_TILE, ri = (i / REBUILD_K_TILE) % c, j = i / (REBUILD_K_TILE * c);
            const int2 m = miss_s[j];
            float v = 0.f;
            if (m.x >= 0 && k0 + kk < r) v = __bfloat162float(U[((size_t)m.y * c + ri) * r + k0 + kk]);
            u_s[j][ri][kk] = v;
        }
        __syncthreads();
#pragma unroll 2
        for (int kk = 0; kk < REBUILD_K_TILE; kk += 4) {
            float s0[4], s1[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s0[e] = sv_s[kk + e][x];
                s1[e] = sv_s[kk + e][x + half];
            }
#pragma unroll
            for (int i = 0; i < REBUILD_MAX_CHUNK; ++i) {
                if (i < c) {
                    const float4 uk = *reinterpret_cast<const float4*>(&u_s[y][i][kk]);
                    // Ranks in ascending order, as the reference sums them.
                    a0[i] += uk.x * s0[0];
                    a1[i] += uk.x * s1[0];
                    a0[i] += uk.y * s0[1];
                    a1[i] += uk.y * s1[1];
                    a0[i] += uk.z * s0[2];
                    a1[i] += uk.z * s1[2];
                    a0[i] += uk.w * s0[3];
                    a1[i] += uk.w * s1[3];
                }
            }
        }
        __syncthreads();
    }

    const int2 m = miss_s[y];
    if (m.x < 0) return;
    const size_t t0 = (size_t)m.y * c;
    const float f = inv_freq[x];
    __nv_bfloat16* dst = shadow_attn_row(bufs[b].ak, dims, h, shadow_slot_row(dims, counts[b].outliers, m.x));
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
