// Fills used by tests and benchmarks: constant bit patterns (NaN poisoning) and
// reproducible pseudo-random bf16 values generated on the device.
#include <cuda_bf16.h>

#include "common.cuh"

extern "C" __global__ void fill_u16(unsigned short* __restrict__ p, size_t n, unsigned short v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = v;
}

extern "C" __global__ void fill_u32(unsigned int* __restrict__ p, size_t n, unsigned int v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = v;
}

// A rectangle of a pseudo-random matrix: p[r·cols + c] = bf16(uniform in [-scale, scale))
// as a function of (seed, (row0 + r)·ld + col0 + c) only, so that the rows or columns one
// device of a tensor-parallel group holds are bit for bit those of the whole matrix of
// `ld` columns (the whole matrix: row0 = col0 = 0, ld = cols; a vector: one row).
extern "C" __global__ void fill_random_bf16(__nv_bfloat16* __restrict__ p, size_t rows, size_t cols,
                                            size_t ld, size_t row0, size_t col0,
                                            unsigned long long seed, float scale) {
    const size_t n = rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / cols, c = i - r * cols;
        const unsigned long long h = mix64(seed * 0x9e3779b97f4a7c15ull + (row0 + r) * ld + col0 + c);
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        p[i] = __float2bfloat16_rn((2.0f * u - 1.0f) * scale);
    }
}
