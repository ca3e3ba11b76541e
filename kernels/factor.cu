// The element-wise steps of the low-rank factorisation of the pre-RoPE keys
// (src/cuda/shadow/factor.rs); the products themselves run on cuBLAS.
//
// factor_gram_f64, grid (n), FACTOR_THREADS threads: row r of the f64 matrix the
// subspace iteration multiplies by, from the fp32 Gram matrix g [n, n]:
//   out[r, j] = (g[r, j] + g[j, r]) / 2, plus the ridge on the diagonal, where
//   ridge = rel_ridge * trace(g) (1 when the trace is 0: all-zero keys). Every block sums
//   the trace itself, in the same order, so all rows add the same ridge.
// factor_basis_out, grid-stride over n elements: the basis as the decode kernels take it
//   (f32 sv) and as the coefficient GEMMs take it (two bf16 terms, hi + lo ≈ sv to 2^-16):
//   sv = f32(v) when v is not null (v = 0: sv already holds the basis), hi = bf16(sv),
//   lo = bf16(sv - hi).
// factor_code8_rows, grid-stride over n rows of `rank` fp32 values, a warp a row: the
//   coefficients u in 8 bits, codes to codes[row, ..] and a scale to scales[row]
//   (code8_coef_row of shadow.cuh, as the fold rounds later tokens' rows).
#include <cuda_bf16.h>

#include "shadow.cuh"

#define FACTOR_THREADS 256

extern "C" __global__ void __launch_bounds__(FACTOR_THREADS)
    factor_gram_f64(const float* __restrict__ g, double* __restrict__ out, int n, double rel_ridge) {
    __shared__ double part[FACTOR_THREADS];
    double t = 0.0;
    for (int i = threadIdx.x; i < n; i += FACTOR_THREADS) t += (double)g[(size_t)i * n + i];
    part[threadIdx.x] = t;
    __syncthreads();
    for (int s = FACTOR_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    const double trace = part[0];
    const double ridge = trace == 0.0 ? 1.0 : rel_ridge * trace;
    const int r = blockIdx.x;
    for (int j = threadIdx.x; j < n; j += FACTOR_THREADS) {
        double v = 0.5 * ((double)g[(size_t)r * n + j] + (double)g[(size_t)j * n + r]);
        if (j == r) v += ridge;
        out[(size_t)r * n + j] = v;
    }
}

extern "C" __global__ void factor_basis_out(const double* __restrict__ v, float* __restrict__ sv,
                                            __nv_bfloat16* __restrict__ hi, __nv_bfloat16* __restrict__ lo,
                                            size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x;
        if (v != nullptr) {
            x = __double2float_rn(v[i]);
            sv[i] = x;
        } else {
            x = sv[i];
        }
        const __nv_bfloat16 h = __float2bfloat16_rn(x);
        hi[i] = h;
        lo[i] = __float2bfloat16_rn(x - __bfloat162float(h));
    }
}

extern "C" __global__ void __launch_bounds__(FACTOR_THREADS)
    factor_code8_rows(const float* __restrict__ src, signed char* __restrict__ codes, float* __restrict__ scales,
                      size_t n, int rank) {
    const size_t warps = (size_t)gridDim.x * (FACTOR_THREADS / 32);
    for (size_t row = blockIdx.x * (size_t)(FACTOR_THREADS / 32) + (threadIdx.x >> 5); row < n; row += warps)
        code8_coef_row(src + row * rank, rank, codes + row * rank, scales + row);
}
