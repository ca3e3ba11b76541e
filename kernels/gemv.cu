// Skinny matrix products for decode: out[m, n] (+)= x[m, k] · W[n, k]ᵀ for m ≤ 8 rows,
// bf16 operands, fp32 accumulation, bf16 or fp32 output.
//
// At decode the product is bound by reading W once from HBM, so the kernel is a
// streaming read: one warp per output column n (a row of W), each lane reading 16-byte
// chunks of that row, GEMV_UNROLL chunks in flight per lane, the m input rows (small,
// shared by every warp) through the read-only cache. Partial sums are reduced across
// the warp with shuffles. Requires k % 8 == 0 and 16-byte aligned rows.
#include <cuda_bf16.h>

#define GEMV_MAX_M 8
#define GEMV_WARPS 8
#define GEMV_UNROLL 4

__device__ __forceinline__ void gemv_unpack(const uint4& u, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

template <int M, typename Out>
__device__ __forceinline__ void gemv_rows(Out* __restrict__ out, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ w, int n, int k,
                                          int accumulate) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col = blockIdx.x * GEMV_WARPS + warp;
    if (col >= n) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)col * k);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    const int chunks = k >> 3;
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] = 0.f;
    int c = lane;
    for (; c + 32 * (GEMV_UNROLL - 1) < chunks; c += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldcs(wr + c + 32 * u);  // streamed once
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            float wf[8];
            gemv_unpack(wv[u], wf);
#pragma unroll
            for (int r = 0; r < M; ++r) {
                float xf[8];
                gemv_unpack(__ldg(xr + (size_t)r * chunks + c + 32 * u), xf);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[r] = fmaf(wf[j], xf[j], acc[r]);
            }
        }
    }
    for (; c < chunks; c += 32) {
        float wf[8];
        gemv_unpack(__ldcs(wr + c), wf);
#pragma unroll
        for (int r = 0; r < M; ++r) {
            float xf[8];
            gemv_unpack(__ldg(xr + (size_t)r * chunks + c), xf);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[r] = fmaf(wf[j], xf[j], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < M; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane < M) {
        // Lane r writes row r (a register array indexed by a constant per unrolled step).
        float v = 0.f;
#pragma unroll
        for (int r = 0; r < M; ++r)
            if (lane == r) v = acc[r];
        Out* dst = out + (size_t)lane * n + col;
        if constexpr (sizeof(Out) == 4) {
            *dst = accumulate ? *dst + v : v;
        } else {
            *dst = __float2bfloat16_rn(accumulate ? __bfloat162float(*dst) + v : v);
        }
    }
}

template <typename Out>
__device__ __forceinline__ void gemv_dispatch(Out* out, const __nv_bfloat16* x, const __nv_bfloat16* w,
                                              int m, int n, int k, int accumulate) {
    switch (m) {
        case 1: gemv_rows<1>(out, x, w, n, k, accumulate); break;
        case 2: gemv_rows<2>(out, x, w, n, k, accumulate); break;
        case 3: gemv_rows<3>(out, x, w, n, k, accumulate); break;
        case 4: gemv_rows<4>(out, x, w, n, k, accumulate); break;
        case 5: gemv_rows<5>(out, x, w, n, k, accumulate); break;
        case 6: gemv_rows<6>(out, x, w, n, k, accumulate); break;
        case 7: gemv_rows<7>(out, x, w, n, k, accumulate); break;
        default: gemv_rows<8>(out, x, w, n, k, accumulate); break;
    }
}

// Grid ceil(n / GEMV_WARPS), GEMV_WARPS * 32 threads.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ x,
              const __nv_bfloat16* __restrict__ w, int m, int n, int k, int accumulate) {
    gemv_dispatch(out, x, w, m, n, k, accumulate);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_f32(float* __restrict__ out, const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
             int m, int n, int k, int accumulate) {
    gemv_dispatch(out, x, w, m, n, k, accumulate);
}
