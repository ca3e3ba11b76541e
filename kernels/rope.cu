// Rotary position embedding, Hugging Face "rotate half" layout: in each head of width
// 2*half, dimension i pairs with i + half. Rotates `heads` consecutive heads of each row
// in place (q and k of a fused qkv row are consecutive, so one launch rotates both).
//
// inv_freq[half] holds the (llama3-scaled) inverse frequencies; the angle is
// float(position) * inv_freq[i] rounded to fp32, exactly as the CPU reference computes
// it, and the rotation is done without fused multiply-adds to match it closely.
#include <cuda_bf16.h>

extern "C" __global__ void rope_inplace(__nv_bfloat16* __restrict__ x, int row_stride,
                                        int heads, int half,
                                        const int* __restrict__ positions,
                                        const float* __restrict__ inv_freq) {
    extern __shared__ float cs[];  // cos[half], sin[half]
    const int row = blockIdx.x;
    const float pos = (float)positions[row];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(__fmul_rn(pos, inv_freq[i]), &s, &c);
        cs[i] = c;
        cs[half + i] = s;
    }
    __syncthreads();
    __nv_bfloat16* xr = x + (size_t)row * row_stride;
    const int d = 2 * half;
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        __nv_bfloat16* a = xr + h * d + i;
        const float x0 = __bfloat162float(a[0]);
        const float x1 = __bfloat162float(a[half]);
        const float c = cs[i], s = cs[half + i];
        a[0] = __float2bfloat16_rn(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
        a[half] = __float2bfloat16_rn(__fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
    }
}
