// Splits fused qkv rows after the projection: adds the bias (Qwen2), rotates q and k at
// each row's position (RoPE, the arithmetic of rope.cu), writes q to a packed
// [rows, heads * D] buffer and appends k and v to the row's sequence cache; optionally
// keeps the un-rotated (pre-RoPE) keys for ShadowKV.
//
// qkv_rope_append: a sequence cache is one allocation laid out [layer][k | v][cap][kv_heads * D]:
//   k row of (layer, pos) = base + ((2 * layer) * cap + pos) * kv_width
//   v row of (layer, pos) = base + ((2 * layer + 1) * cap + pos) * kv_width
// Per row r: positions[r], row_base[r] (the cache's device address) and row_cap[r].
// qkv_rope_append_shadow: row b is the new token of sequence b of a ShadowKV batch (the
// layout of shadow.cuh), whose counts already include it: with n tokens in its recent
// window, this one the newest, k and v go to row R - n of each head of ak and av, and the
// pre-RoPE key to row R - n of kpre (the window is newest-first).
// One block per row.
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

// Where one row's k, v and pre-RoPE k go in a dense cache: kv_width consecutive values.
struct DenseRow {
    __nv_bfloat16* k;
    __nv_bfloat16* v;
    __nv_bfloat16* kp;  // null: not kept
    __device__ __nv_bfloat16* k_at(int col) const { return k + col; }
    __device__ __nv_bfloat16* v_at(int col) const { return v + col; }
};

// Where they go in a ShadowKV sequence: head-major attention rows, a row-major kpre.
struct ShadowRow {
    __nv_bfloat16* k;   // ak at head 0, the target row
    __nv_bfloat16* v;   // av at head 0, the target row
    __nv_bfloat16* kp;  // kpre at the target row
    size_t head_stride;  // rows_cap * D
    int d;
    __device__ __nv_bfloat16* k_at(int col) const { return k + (size_t)(col / d) * head_stride + col % d; }
    __device__ __nv_bfloat16* v_at(int col) const { return v + (size_t)(col / d) * head_stride + col % d; }
};

// The split of one fused row `src` at position `pos`; cs holds 2 * half floats of
// shared memory.
template <typename Row>
__device__ __forceinline__ void qkv_split_row(__nv_bfloat16* __restrict__ q_dst, const Row& dst,
                                              const __nv_bfloat16* __restrict__ src,
                                              const __nv_bfloat16* __restrict__ bias, int pos,
                                              const float* __restrict__ inv_freq, int heads, int kv_heads,
                                              int half, float* cs) {
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(__fmul_rn((float)pos, inv_freq[i]), &s, &c);
        cs[i] = c;
        cs[half + i] = s;
    }
    __syncthreads();
    const int d = 2 * half;
    const int kvw = kv_heads * d;
    auto in = [&](int c) {
        float v = __bfloat162float(src[c]);
        if (bias != nullptr) v = __fadd_rn(v, __bfloat162float(bias[c]));
        return v;
    };
    // Rotated pairs of the q heads then the k heads.
    for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        const int c0 = h * d + i;
        const float x0 = in(c0), x1 = in(c0 + half);
        const float c = cs[i], s = cs[half + i];
        const __nv_bfloat16 y0 = __float2bfloat16_rn(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
        const __nv_bfloat16 y1 = __float2bfloat16_rn(__fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
        if (h < heads) {
            q_dst[c0] = y0;
            q_dst[c0 + half] = y1;
        } else {
            const int kc = c0 - heads * d;
            *dst.k_at(kc) = y0;
            *dst.k_at(kc + half) = y1;
            if (dst.kp != nullptr) {
                dst.kp[kc] = __float2bfloat16_rn(x0);
                dst.kp[kc + half] = __float2bfloat16_rn(x1);
            }
        }
    }
    for (int i = threadIdx.x; i < kvw; i += blockDim.x) *dst.v_at(i) = __float2bfloat16_rn(in(heads * d + kvw + i));
}

extern "C" __global__ void qkv_rope_append(__nv_bfloat16* __restrict__ q_out,
                                           __nv_bfloat16* __restrict__ k_pre_out,
                                           const __nv_bfloat16* __restrict__ qkv,
                                           const __nv_bfloat16* __restrict__ bias,
                                           const int* __restrict__ positions,
                                           const unsigned long long* __restrict__ row_base,
                                           const int* __restrict__ row_cap,
                                           const float* __restrict__ inv_freq, int layer,
                                           int heads, int kv_heads, int half) {
    pdl_wait();
    pdl_trigger();
    extern __shared__ float cs[];  // cos[half], sin[half]
    const int row = blockIdx.x;
    const int pos = positions[row];
    const int d = 2 * half;
    const int kvw = kv_heads * d;
    const int width = heads * d + 2 * kvw;
    const size_t cap = (size_t)row_cap[row];
    __nv_bfloat16* base = reinterpret_cast<__nv_bfloat16*>(row_base[row]);
    DenseRow dst;
    dst.k = base + ((size_t)(2 * layer) * cap + pos) * kvw;
    dst.v = base + ((size_t)(2 * layer + 1) * cap + pos) * kvw;
    dst.kp = k_pre_out != nullptr ? k_pre_out + (size_t)row * kvw : nullptr;
    qkv_split_row(q_out + (size_t)row * heads * d, dst, qkv + (size_t)row * width, bias, pos, inv_freq, heads,
                  kv_heads, half, cs);
}

extern "C" __global__ void qkv_rope_append_shadow(__nv_bfloat16* __restrict__ q_out,
                                                  const __nv_bfloat16* __restrict__ qkv,
                                                  const __nv_bfloat16* __restrict__ bias,
                                                  const int* __restrict__ positions,
                                                  const ShadowSeqBufs* __restrict__ bufs,
                                                  const ShadowSeqCounts* __restrict__ counts,
                                                  const float* __restrict__ inv_freq, int heads,
                                                  ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    extern __shared__ float cs[];  // cos[half], sin[half]
    const int b = blockIdx.x;
    const int d = dims.head_dim, kvw = dims.kv_heads * d;
    const int width = heads * d + 2 * kvw;
    const int row = dims.recent - counts[b].recent;
    ShadowRow dst;
    dst.k = shadow_attn_row(bufs[b].ak, dims, 0, row);
    dst.v = shadow_attn_row(bufs[b].av, dims, 0, row);
    dst.kp = reinterpret_cast<__nv_bfloat16*>(bufs[b].kpre) + (size_t)row * kvw;
    dst.head_stride = (size_t)dims.rows_cap * d;
    dst.d = d;
    qkv_split_row(q_out + (size_t)b * heads * d, dst, qkv + (size_t)b * width, bias, positions[b], inv_freq, heads,
                  dims.kv_heads, d / 2, cs);
}
