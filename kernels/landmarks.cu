// The ShadowKV compression of one sequence's prefill, per layer, on the layer's dense
// keys k [T, kv_heads * d] (post-RoPE), values v and pre-RoPE keys kpre (same shape),
// bf16 (references: landmarks / Marks8 / min_cosines / outlier_chunks in src/shadow/landmarks.rs
// and ShadowSeq::from_prefill in src/shadow/seq.rs). The sparse region is the first
// `chunks` chunks of c tokens; the n = T - chunks * c tokens after it are the recent
// window.
//
// shadow_landmarks, grid (chunks, kv_heads), block d: the landmark of chunk ch and head
// h (the fp32 mean of its c keys, summed in token order) in 8 bits, its codes to
// marks[h, ch, ..] and its scale to mark_scales[h, ch] (code8_code, shadow.cuh),
// and the minimum over the chunk's keys of their cosine similarity to the fp32
// landmark, negated, to neg_cos[h, ch] (a zero vector has cosine 1). The O chunks of
// each head with the largest negated cosine are its outliers (topk_rows, select.cu).
// shadow_outlier_flags, grid (kv_heads): outlier[h, 0..chunk_cap) = 0, then 1 for each
// id of ids[h, 0..O) (-1 entries skipped).
// shadow_place_prefill, grid (O * c + n, kv_heads), block d: one row each, for head h:
//   x < O * c: row i = x % c of outlier o = x / c (chunk ids[h, o], skipped when -1)
//              to ak/av[h, R + x];
//   otherwise: recent token t = x - O * c (0 = the oldest, position chunks * c + t)
//              to ak/av[h, R - 1 - t] and its pre-RoPE key to kpre[R - 1 - t, h*d..].
// shadow_pool_write, grid (chunks, kv_heads), block 128: the values of chunk ch of head h
// to the value pool holding slot pool_seq (the host pool, device-mapped, or the GPU value
// slots' pool; shadow_pool_chunk, shadow.cuh) at (layer, pool_seq, h, ch), token order, one
// 16-byte store per thread (a warp writes 512 contiguous bytes). No fence: the host reads
// the pool only after it has seen the kernel complete, and a kernel after it on the
// device only after pdl_wait (or the kernel boundary), both of which make the writes
// visible.
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

// Sum over the block (blockDim.x a multiple of 32, at most 1024) of v; every thread
// gets it. `scratch` is a __shared__ float[32]; ends with a barrier.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += scratch[w];
    __syncthreads();
    return s;
}

extern "C" __global__ void shadow_landmarks(float* __restrict__ neg_cos, const __nv_bfloat16* __restrict__ k,
                                            ShadowSeqBufs bufs, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    __shared__ float scratch[32];
    const int ch = blockIdx.x, h = blockIdx.y, j = threadIdx.x;  // blockDim.x == d
    const int d = dims.head_dim, c = dims.chunk;
    const size_t kvd = (size_t)dims.kv_heads * d;
    const __nv_bfloat16* kc = k + (size_t)ch * c * kvd + (size_t)h * d + j;
    float l = 0.f;
    for (int t = 0; t < c; ++t) l += __bfloat162float(kc[t * kvd]);
    l = l / (float)c;
    const float ms = code8_scale(block_max(fabsf(l), scratch));
    reinterpret_cast<signed char*>(bufs.marks)[((size_t)h * dims.chunk_cap + ch) * d + j] = code8_code(l, ms);
    if (j == 0) reinterpret_cast<float*>(bufs.mark_scales)[(size_t)h * dims.chunk_cap + ch] = ms;
    const float nl = sqrtf(block_sum(l * l, scratch));
    float lowest = __int_as_float(0x7f800000);  // +inf
    for (int t = 0; t < c; ++t) {
        const float x = __bfloat162float(kc[t * kvd]);
        const float dot = block_sum(l * x, scratch);
        const float nk = sqrtf(block_sum(x * x, scratch));
        const float cosine = (nl == 0.f || nk == 0.f) ? 1.f : dot / (nl * nk);
        lowest = fminf(lowest, cosine);
    }
    if (j == 0) neg_cos[(size_t)h * dims.chunk_cap + ch] = -lowest;
}

extern "C" __global__ void shadow_outlier_flags(const int* __restrict__ ids, ShadowSeqBufs bufs, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x;
    unsigned char* flags = reinterpret_cast<unsigned char*>(bufs.outlier) + (size_t)h * dims.chunk_cap;
    for (int i = threadIdx.x; i < dims.chunk_cap; i += blockDim.x) flags[i] = 0;
    __syncthreads();
    for (int o = threadIdx.x; o < dims.outliers; o += blockDim.x) {
        const int id = ids[(size_t)h * dims.outliers + o];
        if (id >= 0 && id < dims.chunk_cap) flags[id] = 1;
    }
}

extern "C" __global__ void shadow_place_prefill(const __nv_bfloat16* __restrict__ k,
                                                const __nv_bfloat16* __restrict__ v,
                                                const __nv_bfloat16* __restrict__ kpre,
                                                const int* __restrict__ ids, int chunks, ShadowSeqBufs bufs,
                                                ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int x = blockIdx.x, h = blockIdx.y, j = threadIdx.x;  // blockDim.x == d
    const int d = dims.head_dim, c = dims.chunk, R = dims.recent;
    const size_t kvd = (size_t)dims.kv_heads * d;
    const int out_rows = dims.outliers * c;
    size_t token;
    int row;
    if (x < out_rows) {
        const int id = ids[(size_t)h * dims.outliers + x / c];
        if (id < 0 || id >= chunks) return;
        token = (size_t)id * c + x % c;
        row = R + x;
    } else {
        const int t = x - out_rows;
        token = (size_t)chunks * c + t;
        row = R - 1 - t;
        reinterpret_cast<__nv_bfloat16*>(bufs.kpre)[(size_t)row * kvd + (size_t)h * d + j] =
            kpre[token * kvd + (size_t)h * d + j];
    }
    shadow_attn_row(bufs.ak, dims, h, row)[j] = k[token * kvd + (size_t)h * d + j];
    shadow_attn_row(bufs.av, dims, h, row)[j] = v[token * kvd + (size_t)h * d + j];
}

extern "C" __global__ void shadow_pool_write(ShadowPool pool, const __nv_bfloat16* __restrict__ v, int layer,
                                             int pool_seq, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    const int ch = blockIdx.x, h = blockIdx.y;
    const int d = dims.head_dim, c = dims.chunk;
    const size_t kvd = (size_t)dims.kv_heads * d;
    code8_value_chunk([&](int t) { return v + ((size_t)ch * c + t) * kvd + (size_t)h * d; },
                      shadow_pool_chunk(pool, dims, layer, pool_seq, h, ch), dims);
}
