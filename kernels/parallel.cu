// The tensor-parallel step's own kernel (its collectives are NCCL's).
// The logits of a tensor-parallel step in vocabulary order. Rank r holds ids
// r·per .. min((r+1)·per, vocab) and computed them as a [rows, width_r] matrix; the
// all-gather put each rank's matrix at r·rows·per (every rank sends rows·per values, the
// last one's tail unused). out[row, j] = rank (j / per)'s value (row, j % per).
extern "C" __global__ void vocab_concat(float* __restrict__ out, const float* __restrict__ in, int rows,
                                        int per, int vocab) {
    const int row = blockIdx.y;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < vocab; j += gridDim.x * blockDim.x) {
        const int r = j / per, c = j - r * per;
        const int width = min(per, vocab - r * per);
        out[(size_t)row * vocab + j] = in[(size_t)r * rows * per + (size_t)row * width + c];
    }
}
