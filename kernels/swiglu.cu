// SwiGLU activation: out[r, i] = silu(gate[r, i]) * up[r, i], reading fused rows
// [gate | up] of width 2*inter and writing rows of width inter. fp32 arithmetic.
#include <cuda_bf16.h>

#include "pdl.cuh"

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// grid: (ceil(inter / (blockDim.x * 8)), rows) when inter % 8 == 0, else
// (ceil(inter / blockDim.x), rows).
extern "C" __global__ void swiglu(__nv_bfloat16* __restrict__ out,
                                  const __nv_bfloat16* __restrict__ gate_up, int inter) {
    pdl_wait();
    pdl_trigger();
    const int row = blockIdx.y;
    const __nv_bfloat16* g = gate_up + (size_t)row * 2 * inter;
    const __nv_bfloat16* u = g + inter;
    __nv_bfloat16* o = out + (size_t)row * inter;
    if ((inter & 7) == 0) {
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= inter / 8) return;
        const uint4 gv = __ldg(reinterpret_cast<const uint4*>(g) + i);
        const uint4 uv = __ldg(reinterpret_cast<const uint4*>(u) + i);
        const __nv_bfloat162* gh = reinterpret_cast<const __nv_bfloat162*>(&gv);
        const __nv_bfloat162* uh = reinterpret_cast<const __nv_bfloat162*>(&uv);
        uint4 ov;
        __nv_bfloat162* oh = reinterpret_cast<__nv_bfloat162*>(&ov);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(gh[j]);
            const float2 b = __bfloat1622float2(uh[j]);
            oh[j] = __floats2bfloat162_rn(silu_mul(a.x, b.x), silu_mul(a.y, b.y));
        }
        reinterpret_cast<uint4*>(o)[i] = ov;
    } else {
        const int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i >= inter) return;
        o[i] = __float2bfloat16_rn(silu_mul(__bfloat162float(g[i]), __bfloat162float(u[i])));
    }
}
