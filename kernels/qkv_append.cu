// Splits fused qkv rows after the projection: adds the bias (Qwen2), rotates q and k at
// each row's position (RoPE, the arithmetic of rope.cu), writes q to a packed
// [rows, heads * D] buffer and appends k and v to the row's sequence cache; optionally
// keeps the un-rotated (pre-RoPE) keys for ShadowKV.
//
// A sequence cache is one allocation laid out [layer][k | v][cap][kv_heads * D]:
//   k row of (layer, pos) = base + ((2 * layer) * cap + pos) * kv_width
//   v row of (layer, pos) = base + ((2 * layer + 1) * cap + pos) * kv_width
// Per row r: positions[r], row_base[r] (the cache's device address) and row_cap[r].
// One block per row.
#include <cuda_bf16.h>

#include "pdl.cuh"

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
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(__fmul_rn((float)pos, inv_freq[i]), &s, &c);
        cs[i] = c;
        cs[half + i] = s;
    }
    __syncthreads();
    const int d = 2 * half;
    const int kvw = kv_heads * d;
    const int width = heads * d + 2 * kvw;
    const __nv_bfloat16* src = qkv + (size_t)row * width;
    const size_t cap = (size_t)row_cap[row];
    __nv_bfloat16* base = reinterpret_cast<__nv_bfloat16*>(row_base[row]);
    __nv_bfloat16* k_dst = base + ((size_t)(2 * layer) * cap + pos) * kvw;
    __nv_bfloat16* v_dst = base + ((size_t)(2 * layer + 1) * cap + pos) * kvw;
    __nv_bfloat16* q_dst = q_out + (size_t)row * heads * d;
    __nv_bfloat16* kp_dst = k_pre_out != nullptr ? k_pre_out + (size_t)row * kvw : nullptr;
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
            k_dst[kc] = y0;
            k_dst[kc + half] = y1;
            if (kp_dst != nullptr) {
                kp_dst[kc] = __float2bfloat16_rn(x0);
                kp_dst[kc + half] = __float2bfloat16_rn(x1);
            }
        }
    }
    for (int i = threadIdx.x; i < kvw; i += blockDim.x)
        v_dst[i] = __float2bfloat16_rn(in(heads * d + kvw + i));
}
