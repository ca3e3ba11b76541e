// RMSNorm fused with the residual add, bf16 storage and fp32 arithmetic:
//
//   if r != null:  x = bf16(x + r)          (x is updated in place)
//   y = bf16(w * (x * rsqrt(mean(x^2) + eps)))
//
// The statistics are taken over the stored (bf16-rounded) x, so y is exactly the
// norm of what later layers read back. One block per row; rows of any width.
#include <cuda_bf16.h>

#include "common.cuh"
#include "pdl.cuh"

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    v = lane < nwarps ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void rmsnorm_residual(__nv_bfloat16* __restrict__ y,
                                            __nv_bfloat16* __restrict__ x,
                                            const __nv_bfloat16* __restrict__ r,
                                            const __nv_bfloat16* __restrict__ w,
                                            int hidden, float eps) {
    pdl_wait();
    pdl_trigger();
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * hidden;
    __nv_bfloat16* xr = x + base;
    __nv_bfloat16* yr = y + base;
    float ss = 0.0f;
    if ((hidden & 7) == 0) {
        uint4* xv = reinterpret_cast<uint4*>(xr);
        const uint4* rv = r != nullptr ? reinterpret_cast<const uint4*>(r + base) : nullptr;
        for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
            uint4 u = xv[i];
            float f[8];
            unpack8(u, f);
            if (r != nullptr) {
                float g[8];
                unpack8(rv[i], g);
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] += g[j];
                u = pack8(f);
                xv[i] = u;
                unpack8(u, f);  // continue with the rounded values
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float v = __bfloat162float(xr[i]);
            if (r != nullptr) {
                const __nv_bfloat16 s = __float2bfloat16_rn(v + __bfloat162float(r[base + i]));
                xr[i] = s;
                v = __bfloat162float(s);
            }
            ss += v * v;
        }
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    // Each thread reads back only the elements it wrote itself: no barrier needed.
    if ((hidden & 7) == 0) {
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
        const uint4* wv = reinterpret_cast<const uint4*>(w);
        uint4* yv = reinterpret_cast<uint4*>(yr);
        for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
            float f[8], g[8];
            unpack8(xv[i], f);
            unpack8(__ldg(wv + i), g);
#pragma unroll
            for (int j = 0; j < 8; ++j) f[j] = g[j] * (f[j] * inv);
            yv[i] = pack8(f);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            yr[i] = __float2bfloat16_rn(__bfloat162float(w[i]) * (__bfloat162float(xr[i]) * inv));
    }
}
