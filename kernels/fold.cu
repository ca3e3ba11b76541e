// Folding of the ShadowKV recent window (reference: ShadowSeq::fold in
// src/shadow/seq.rs): a sequence whose recent window is full (n == R tokens) moves its
// oldest chunk into the sparse region as chunk ch = chunks_b. Sequences with n < R are
// left alone, so the same three launches serve every step of a batch. In the recent
// window the oldest chunk is rows R - c .. R, its token i (in time order) at row R - 1 - i.
//
// shadow_fold_chunk, grid (kv_heads, batch), FOLD_THREADS threads, per head h:
//   - the landmark (fp32 mean of the chunk's post-RoPE keys, summed in time order) in
//     8 bits: codes to marks[h, ch, ..], scale to mark_scales[h, ch] (code8_code);
//   - the chunk's values, token order, in 8 bits (code8_value_chunk) to the value pool at
//     (layer, pool_seq, h, ch): the
//     host pool through its device-mapped address (the device writes the pool itself),
//     or for a GPU value slot the pool in device memory (shadow_pool_chunk, shadow.cuh);
//     with an outbox (a host-written pool: a file the device cannot address), a host
//     slot's chunk goes to outbox entry (b, h) instead, and the host copies it into the
//     pool;
//   - outlier[h, ch] = 0.
// shadow_fold_project, grid (ceil(rank / FOLD_WARPS), batch), FOLD_THREADS threads: the
//   chunk's tokens' coefficients on the basis, fold_u[i, k] = kpre[R - 1 - i, :] .
//   sv[k, :] (fp32 sums over kv_heads * d: lane-strided, then a butterfly; shadow_fold_shift
//   rounds them into u), for the block's FOLD_WARPS basis rows k (a warp each) and every
//   token of the chunk at once, FOLD_TOKENS at a time from shared memory, so each row of
//   sv is read once a pass (once for chunks of up to FOLD_TOKENS tokens, the usual 8).
//   The keys come in as 16-byte words and all of a lane's 16-byte words of the sv row are
//   in flight at once (kv_heads * d a multiple of 8): a few round trips to memory, not
//   one for every 256 values. (With a block per token and each warp walking 20 rows one
//   after another it took 76-96 us a layer on the H200, whatever the batch: a latency
//   chain.)
// shadow_fold_shift, grid (kv_heads, batch), FOLD_THREADS threads: the other R - c rows
//   move down by c rows, to end at row R again (ak, av and kpre; the caller then counts
//   n = R - c and chunks_b + 1). Launched after the two kernels above, which read the
//   rows it overwrites. The move goes chunk by chunk from the oldest end, and each thread
//   always handles the same words of a chunk, so it only ever overwrites words it has
//   already moved: no barrier is needed. The blocks of head 0 also write the chunk's
//   coefficients (fold_u, complete once shadow_fold_project is) in 8 bits, a warp a token:
//   codes to u[ch * c + i, ..], scale to u_scales[ch * c + i] (code8_coef_row; the scale is
//   over all ranks of the token, which no block of shadow_fold_project sees).
#include <cuda_bf16.h>

#include "common.cuh"
#include "pdl.cuh"
#include "shadow.cuh"

#define FOLD_THREADS 256
#define FOLD_WARPS (FOLD_THREADS / 32)
#define FOLD_TOKENS 8  // chunk tokens a pass of shadow_fold_project holds in shared memory

extern "C" __global__ void __launch_bounds__(FOLD_THREADS)
    shadow_fold_chunk(const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                      ShadowDims dims, ShadowPool pool, int layer, unsigned long long outbox) {
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y;
    const ShadowSeqCounts n = counts[b];
    if (n.recent != dims.recent) return;
    const int d = dims.head_dim, c = dims.chunk, R = dims.recent, ch = n.chunks;
    const ShadowSeqBufs s = bufs[b];
    __shared__ float scratch[32];
    static_assert(FOLD_THREADS >= 128, "a thread per landmark value (d <= 128)");
    const int j = threadIdx.x;
    float l = 0.f;
    if (j < d) {
        for (int i = 0; i < c; ++i) l += __bfloat162float(shadow_attn_row(s.ak, dims, h, R - 1 - i)[j]);
        l = l / (float)c;
    }
    const float ms = code8_scale(block_max(fabsf(l), scratch));
    if (j < d) reinterpret_cast<signed char*>(s.marks)[((size_t)h * dims.chunk_cap + ch) * d + j] = code8_code(l, ms);
    if (j == 0) reinterpret_cast<float*>(s.mark_scales)[(size_t)h * dims.chunk_cap + ch] = ms;
    unsigned char* dst = outbox != 0ull && n.pool_seq < pool.host_seqs
                             ? reinterpret_cast<unsigned char*>(outbox) +
                                   ((size_t)b * dims.kv_heads + h) * value_chunk_bytes(dims)
                             : shadow_pool_chunk(pool, dims, layer, n.pool_seq, h, ch);
    code8_value_chunk([&](int i) { return shadow_attn_row(s.av, dims, h, R - 1 - i); }, dst, dims);
    if (threadIdx.x == 0) reinterpret_cast<unsigned char*>(s.outlier)[(size_t)h * dims.chunk_cap + ch] = 0;
    __threadfence_system();
}

extern "C" __global__ void __launch_bounds__(FOLD_THREADS)
    shadow_fold_project(const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                        ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    __shared__ __align__(16) float kp[FOLD_TOKENS][1024];  // kv_heads * d <= 1024
    const int b = blockIdx.y;
    const ShadowSeqCounts n = counts[b];
    if (n.recent != dims.recent) return;
    const int kvd = dims.kv_heads * dims.head_dim, r = dims.rank, c = dims.chunk;
    const ShadowSeqBufs s = bufs[b];
    const __nv_bfloat16* kpre = reinterpret_cast<const __nv_bfloat16*>(s.kpre);
    const float* sv = reinterpret_cast<const float*>(s.sv);
    float* u = reinterpret_cast<float*>(s.fold_u);
    const int lane = threadIdx.x & 31, k = blockIdx.x * FOLD_WARPS + (threadIdx.x >> 5);
    for (int i0 = 0; i0 < c; i0 += FOLD_TOKENS) {
        const int nt = min(FOLD_TOKENS, c - i0), words = nt * kvd / 8;  // 8 keys a 16-byte word
        __syncthreads();  // every warp is done with the tokens before
#pragma unroll 4
        for (int x = threadIdx.x; x < words; x += FOLD_THREADS) {
            const int i = x * 8 / kvd, col = x * 8 - i * kvd;
            float f[8];
            unpack8(*reinterpret_cast<const uint4*>(kpre + (size_t)(dims.recent - 1 - (i0 + i)) * kvd + col), f);
            *reinterpret_cast<float4*>(&kp[i][col]) = make_float4(f[0], f[1], f[2], f[3]);
            *reinterpret_cast<float4*>(&kp[i][col + 4]) = make_float4(f[4], f[5], f[6], f[7]);
        }
        __syncthreads();
        if (k >= r) continue;
        const float4* row = reinterpret_cast<const float4*>(sv + (size_t)k * kvd);
        float acc[FOLD_TOKENS];
#pragma unroll
        for (int t = 0; t < FOLD_TOKENS; ++t) acc[t] = 0.f;
#pragma unroll 8
        for (int q = lane; q < kvd / 4; q += 32) {
            const float4 v = row[q];
#pragma unroll
            for (int t = 0; t < FOLD_TOKENS; ++t) {
                if (t >= nt) break;
                const float4 x = *reinterpret_cast<const float4*>(&kp[t][4 * q]);
                acc[t] += x.x * v.x + x.y * v.y + x.z * v.z + x.w * v.w;
            }
        }
#pragma unroll
        for (int t = 0; t < FOLD_TOKENS; ++t) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
            if (lane == 0 && t < nt) u[(size_t)(i0 + t) * r + k] = acc[t];
        }
    }
}

extern "C" __global__ void __launch_bounds__(FOLD_THREADS)
    shadow_fold_shift(const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                      ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y;
    const ShadowSeqCounts n = counts[b];
    if (n.recent != dims.recent) return;
    const int d = dims.head_dim, c = dims.chunk, R = dims.recent;
    const size_t kvd = (size_t)dims.kv_heads * d;
    const ShadowSeqBufs& s = bufs[b];
    if (h == 0) {
        const int r = dims.rank;
        const size_t t0 = (size_t)n.chunks * c;  // the chunk's first token of u
        const float* fu = reinterpret_cast<const float*>(s.fold_u);
        signed char* u = reinterpret_cast<signed char*>(s.u) + t0 * r;
        float* us = reinterpret_cast<float*>(s.u_scales) + t0;
        for (int i = threadIdx.x >> 5; i < c; i += FOLD_WARPS) code8_coef_row(fu + (size_t)i * r, r, u + (size_t)i * r, us + i);
    }
    const int row_words = d / 8, words = c * row_words;  // 16-byte words per chunk of one head
    uint4* ak = reinterpret_cast<uint4*>(shadow_attn_row(s.ak, dims, h, 0));
    uint4* av = reinterpret_cast<uint4*>(shadow_attn_row(s.av, dims, h, 0));
    __nv_bfloat16* kpre = reinterpret_cast<__nv_bfloat16*>(s.kpre) + (size_t)h * d;
    // Chunk q of the move: rows [R - (q + 2) c, R - (q + 1) c) to [R - (q + 1) c, R - q c).
    for (int q = 0; q + 1 < R / c; ++q) {
        const int src_row = R - (q + 2) * c, dst_row = R - (q + 1) * c;
        for (int w = threadIdx.x; w < words; w += blockDim.x) {
            const int i = w / row_words, x = w - i * row_words;
            const size_t sw = (size_t)(src_row + i) * row_words + x, dw = (size_t)(dst_row + i) * row_words + x;
            ak[dw] = ak[sw];
            av[dw] = av[sw];
            reinterpret_cast<uint4*>(kpre + (size_t)(dst_row + i) * kvd)[x] =
                reinterpret_cast<const uint4*>(kpre + (size_t)(src_row + i) * kvd)[x];
        }
    }
}
