// Skinny matrix products for decode: out[m, n] (+)= x[m, k] · W[n, k]ᵀ for m ≤ 2 rows,
// bf16 operands, fp32 accumulation, bf16 or fp32 output. With `normalize` the input rows
// are RMS-normalised first: out = (x · Wᵀ) / sqrt(mean(x²) + eps) per row, the norm's
// weight being folded into W's columns by the caller. Every block computes the m rows'
// statistics itself, so a decode step needs no separate normalisation kernel.
//
// At decode the product is bound by reading W once from HBM, so the kernel is a
// streaming read. A block of GEMV_WARPS warps covers GEMV_WARPS / splits columns
// (rows of W); the `splits` warps of a column each stream one slice of its k range in
// 16-byte chunks, GEMV_UNROLL chunks in flight per lane, with the m input rows (small,
// shared by every warp) through the read-only cache. Warp shuffles, then shared memory,
// reduce the partial sums. The host picks `splits` (1, 2, 4 or 8) so that the grid fills
// whole waves of resident warps: small matrices would otherwise leave most of the GPU
// idle for a second, partial wave. Requires k % 8 == 0 and 16-byte aligned rows.
#include <cuda_bf16.h>

#include "common.cuh"
#include "pdl.cuh"

#define GEMV_WARPS 8
#define GEMV_UNROLL 4

template <int M>
__device__ __forceinline__ void gemv_fma(const uint4& w, const uint4* __restrict__ xr, int chunks, int c,
                                         float (&acc)[M]) {
    float wf[8];
    unpack8(w, wf);
#pragma unroll
    for (int r = 0; r < M; ++r) {
        float xf[8];
        unpack8(__ldg(xr + (size_t)r * chunks + c), xf);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r] = fmaf(wf[j], xf[j], acc[r]);
    }
}

// 1 / sqrt(mean(x_r²) + eps) of each of the M rows of x [M, k], for every thread.
template <int M>
__device__ __forceinline__ void gemv_row_stats(const __nv_bfloat16* __restrict__ x, int k, float eps,
                                               float (&inv)[M]) {
    __shared__ float part[GEMV_WARPS][M];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    const int chunks = k >> 3;
#pragma unroll
    for (int r = 0; r < M; ++r) {
        float ss = 0.f;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
            float f[8];
            unpack8(__ldg(xr + (size_t)r * chunks + c), f);
#pragma unroll
            for (int j = 0; j < 8; ++j) ss = fmaf(f[j], f[j], ss);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) part[warp][r] = ss;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < M; ++r) {
        float ss = 0.f;
        for (int w = 0; w < GEMV_WARPS; ++w) ss += part[w][r];
        inv[r] = rsqrtf(ss / (float)k + eps);
    }
}

template <int M, typename Out>
__device__ __forceinline__ void gemv_rows(Out* __restrict__ out, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ w, int n, int k, int accumulate,
                                          int splits, int normalize, float eps) {
    __shared__ float red[GEMV_WARPS][M];
    float inv[M];
#pragma unroll
    for (int r = 0; r < M; ++r) inv[r] = 1.f;
    if (normalize) gemv_row_stats<M>(x, k, eps, inv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int cols = GEMV_WARPS / splits;
    const int col = blockIdx.x * cols + warp / splits;
    const int part = warp % splits;
    const int chunks = k >> 3;
    const int per = (chunks + splits - 1) / splits;
    const int c0 = part * per, c1 = min(chunks, c0 + per);
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = 0.f;
    if (col < n) {
        const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)col * k);
        const uint4* xr = reinterpret_cast<const uint4*>(x);
        int c = c0 + lane;
        for (; c + 32 * (GEMV_UNROLL - 1) < c1; c += 32 * GEMV_UNROLL) {
            uint4 wv[GEMV_UNROLL];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldcs(wr + c + 32 * u);  // streamed once
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) gemv_fma<M>(wv[u], xr, chunks, c + 32 * u, acc);
        }
        for (; c < c1; c += 32) gemv_fma<M>(__ldcs(wr + c), xr, chunks, c, acc);
    }
#pragma unroll
    for (int r = 0; r < M; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < M; ++r) red[warp][r] = acc[r];
    }
    __syncthreads();
    // Thread t < cols·M finishes column t / M, row t % M.
    const int t = threadIdx.x;
    if (t < cols * M) {
        const int lc = t / M, r = t - lc * M;
        const int oc = blockIdx.x * cols + lc;
        if (oc < n) {
            float v = 0.f;
            for (int s = 0; s < splits; ++s) v += red[lc * splits + s][r];
            float scale = inv[0];
#pragma unroll
            for (int q = 1; q < M; ++q)
                if (r == q) scale = inv[q];
            v *= scale;
            Out* dst = out + (size_t)r * n + oc;
            if constexpr (sizeof(Out) == 4) {
                *dst = accumulate ? *dst + v : v;
            } else {
                *dst = __float2bfloat16_rn(accumulate ? __bfloat162float(*dst) + v : v);
            }
        }
    }
}

template <typename Out>
__device__ __forceinline__ void gemv_dispatch(Out* out, const __nv_bfloat16* x, const __nv_bfloat16* w,
                                              int m, int n, int k, int accumulate, int splits, int normalize,
                                              float eps) {
    if (m == 1) {
        gemv_rows<1>(out, x, w, n, k, accumulate, splits, normalize, eps);
    } else {
        gemv_rows<2>(out, x, w, n, k, accumulate, splits, normalize, eps);
    }
}

// Grid ceil(n / (GEMV_WARPS / splits)), GEMV_WARPS * 32 threads.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    gemv_bf16(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ x,
              const __nv_bfloat16* __restrict__ w, int m, int n, int k, int accumulate, int splits,
              int normalize, float eps) {
    pdl_wait();
    pdl_trigger();
    gemv_dispatch(out, x, w, m, n, k, accumulate, splits, normalize, eps);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
    gemv_f32(float* __restrict__ out, const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
             int m, int n, int k, int accumulate, int splits, int normalize, float eps) {
    pdl_wait();
    pdl_trigger();
    gemv_dispatch(out, x, w, m, n, k, accumulate, splits, normalize, eps);
}
