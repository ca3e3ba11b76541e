// Chunk selection of the ShadowKV decode step (reference: src/shadow/select.rs).
//
// The score of chunk ch for KV head h of sequence b is max_j softmax_j(q_j . L / sqrt(d))[ch]
// over the query heads j of the head's group, L = the chunk's landmark (8-bit codes
// marks[h, ch, ..] times mark_scales[h, ch]), the softmax taken over the sequence's
// `chunks` chunks; outlier chunks score -inf.
//
// Three kernels:
//
// shadow_logits, grid (runs of LOGITS_RUN tiles, kv_heads, batch), SELECT_THREADS
// threads: the logits of each tile of SELECT_TILE chunks, logits [batch, kv_heads,
// chunk_cap, group] (outliers -inf), and each tile's softmax statistics per query head,
// stats [batch, kv_heads, tile_cap, group] as (max, sum of exp(logit - max)). Each warp
// takes 32 chunks of each tile as two m16 tiles of an integer mma (codes times the query
// in two 8-bit parts) whose n is the group's query heads, loading the next m16 tile while
// it multiplies the last (logits_run). The landmarks are read once. History (d 128, group
// 4, H200): with bf16 landmarks [chunk, kvh * d], at 14 x 15616 chunks, eight lanes a
// chunk with fp32 FMAs were issue-bound, then latency-bound at 213 us (2.1 TB/s); the
// tensor cores left the kernel little to do but load (131 us, 3.7 TB/s, in runs with two
// register stages). 8-bit landmarks halve the bytes but not the time as long as each warp
// does the same work a tile: codes turned into f16 for f16 products (126 us; 100 us at
// four blocks an SM), head-major rows (96 us): the kernel issued 428 instructions a warp
// and m16 tile, most of them the softmax statistics taken value by value (an exp and a
// branch each) and the conversions. Integer products (no conversion) and the statistics
// taken once a tile (one max, then one exp a value) leave about 145: 83.0 us at 29 x 7680
// chunks (2.8 TB/s of 8-bit landmarks and scales; ncu: DRAM 70 % busy, warps waiting on
// their loads).
//
// shadow_top_k, grid (kv_heads, batch), TOPK_THREADS threads (shadow_top_k_half: half as
// many, for batches whose heads two 1024-thread blocks an SM take in more than one wave:
// 57 x 8 heads of 7680 chunks, 52 -> 44 us on the H200; fewer heads stay faster in the
// large blocks, each head's selection being shorter there): the `slots` best
// non-outlier chunks by score, ties to the lower id, written ascending to selected
// [batch, kv_heads, slots], -1 after the last (exactly shadow::select::top_k). Given the
// statistics, it first combines those of the sequence's tiles per query head and takes
// each chunk's score from its logits as it reads them (and writes the scores to scores
// [batch, kv_heads, chunk_cap] where that is given, entries past the sequence's chunks
// untouched); without them it selects by the scores it is given. (A softmax kernel of its
// own between the two, which wrote the scores and had top-k read them back, took about
// 29 us a layer at 29 x 7680 chunks, most of it latency: a fifth of the selection's time.)
// topk_rows, grid (rows): the same selection over rows of any values, no exclusions
// (the outlier chunks of a prefill, on negated cosines).
//
// The selection: a radix select (three 11-bit digits, most significant first) on the
// order-preserving integer image of the floats finds the k-th largest key T and how
// many keys equal to T are taken (or stops at the digit whose bin is taken whole: every
// key from the bin's least on is taken, T the key below it, none equal: on scores the
// third digit's pass is mostly skipped, 55.4 -> 52.6 us at 57 x 7680 chunks on the
// H200); then one pass in chunk order takes every key above T and the first of those
// equal to T, and writes each taken id at its rank among the taken ones, so the output
// is ascending. The first pass reads the scores once and keeps their keys in dynamic
// shared memory (61 KB at 15616 chunks), where the later passes read them; a head with
// more chunks than fit reads global memory at each pass.
// One block per head (14 x 8 heads at 124928 tokens: 112 of the H200's 132 SMs); the
// old four 8-bit passes over global memory, each a loop of ~16 dependent L2 round trips
// and a barrier-heavy scan, took 55 us a layer, almost all of it latency.
#include <cuda_bf16.h>

#include "common.cuh"
#include "pdl.cuh"
#include "shadow.cuh"

#define SELECT_THREADS 256
#define SELECT_TILE 256
#define SELECT_WARPS (SELECT_THREADS / 32)
#define SELECT_WARP_CHUNKS (SELECT_TILE / SELECT_WARPS)  // two m16 tiles a warp
#define LOGITS_RUN 4                                      // tiles of a logits block
#define LOGITS_AHEAD 1                                    // m16 tiles of landmarks loaded ahead
#define LOGITS_BLOCKS 3                                   // blocks an SM (launch bounds)
#define SELECT_MAX_GROUP 8                                // mma n: query heads 2t, 2t + 1 of t < 4
#define TOPK_THREADS 1024
#define TOPK_WARPS (TOPK_THREADS / 32)
#define TOPK_BITS 11  // radix digit: passes over bits 31..21, 20..10 and 10..0 of the keys
#define TOPK_BINS (1 << TOPK_BITS)
#define TOPK_LOADS 8   // values a thread loads from global memory before counting them
#define TOPK_UNROLL 4  // keys a thread reads from shared memory before counting them, later passes
#define SELECT_NEG_INF __int_as_float(0xff800000)

static_assert(SELECT_WARP_CHUNKS == 32, "logits_run takes two m16 tiles a warp and tile");
static_assert(LOGITS_RUN * SELECT_MAX_GROUP <= SELECT_THREADS, "a thread per (tile, query head) of a run");
static_assert(TOPK_BINS == 2 * TOPK_THREADS && TOPK_WARPS <= 32, "top-k: two bins a thread, one count a lane");

// The (max, sum) pair of a softmax over a union of two sets, each given by its own pair.
__device__ __forceinline__ float2 softmax_merge(float2 a, float2 b) {
    if (a.x == SELECT_NEG_INF) return b;
    if (b.x == SELECT_NEG_INF) return a;
    const float m = fmaxf(a.x, b.x);
    return make_float2(m, a.y * expf(a.x - m) + b.y * expf(b.x - m));
}

// L2 eviction policies (sm_80 on): the lines a load or store given one touches are
// evicted first (landmarks: read once a step) or last (logits: read back by the top-k
// right after the scores).
__device__ __forceinline__ unsigned long long l2_evict_first() {
    unsigned long long p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ unsigned long long l2_evict_last() {
    unsigned long long p;
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}

// Sixteen bytes at p through the non-coherent cache, evicted first from L2, issued where
// the source puts it: asm volatile keeps the loads ahead of the (asm volatile) products,
// so all of a warp's loads are in flight together (the compiler otherwise sinks them
// between the mma).
__device__ __forceinline__ uint4 load16_issued(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(l2_evict_first()));
    return v;
}

// Four bytes at p the same way.
__device__ __forceinline__ float load4_issued(const float* p) {
    float v;
    asm volatile("ld.global.nc.L2::cache_hint.f32 %0, [%1], %2;\n" : "=f"(v) : "l"(p), "l"(l2_evict_first()));
    return v;
}

// Stores v to the global memory at p, evicted last from L2.
__device__ __forceinline__ void store4_kept(float* p, float v) {
    asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;\n" ::"l"(__cvta_generic_to_global(p)), "f"(v),
                 "l"(l2_evict_last())
                 : "memory");
}

// d += a · b on the integer tensor cores: a [16 x 32] row-major, b [32 x 8] column-major,
// s8 in, s32 accumulate (the fragments of PTX's mma.m16n8k32: a0 / a1 rows gi / gi + 8 at
// k 4t..4t+3, a2 / a3 the same rows at k 16+4t..; b0 / b1 column gi at those k).
__device__ __forceinline__ void mma_16832_s8(int (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Four signed bytes packed into a word, the first lowest.
__device__ __forceinline__ unsigned pack_s8(int a, int b, int c, int d) {
    return (unsigned)(a & 0xff) | (unsigned)(b & 0xff) << 8 | (unsigned)(c & 0xff) << 16 | (unsigned)(d & 0xff) << 24;
}

// A query head in two 8-bit parts, as the integer products take it: q ~ sq (256 hi + lo),
// hi in [-127, 127] and lo in [-128, 127] (Q = round(q / sq) within +-QUERY_STEPS, sq =
// max|q| / QUERY_STEPS: 15 bits, finer than the bf16 q itself wherever |q| > max|q| / 128).
// Thread (gi, t) holds dims 64 i + 16 t .. + 15 of query head gi (< g; zero past the group)
// as 4 NP words a part, word 4i + w = dims 64 i + 16 t + 4 w .. + 3, and returns sq.
#define QUERY_STEPS (127.f * 256.f)
template <int NP>
__device__ __forceinline__ float query_parts(unsigned (&hi)[4 * NP], unsigned (&lo)[4 * NP],
                                             const __nv_bfloat16* __restrict__ qh, bool in_group) {
    const int t = threadIdx.x & 3;
    float v[NP][16];
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            float f[8];
            unpack8(load16(qh + i * 64 + t * 16 + j * 8, in_group), f);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                v[i][8 * j + k] = f[k];
                m = fmaxf(m, fabsf(f[k]));
            }
        }
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    const float inv = m == 0.f ? 0.f : QUERY_STEPS / m;
#pragma unroll
    for (int i = 0; i < NP; ++i) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            int h[4], l[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int x = max(-32512, min(32512, __float2int_rn(v[i][4 * w + k] * inv)));
                h[k] = (x + 128) >> 8;  // floor((x + 128) / 256): lo = x - 256 hi in [-128, 127]
                l[k] = x - (h[k] << 8);
            }
            hi[4 * i + w] = pack_s8(h[0], h[1], h[2], h[3]);
            lo[4 * i + w] = pack_s8(l[0], l[1], l[2], l[3]);
        }
    }
    return m / QUERY_STEPS;
}

// One m16 tile of landmarks as a thread holds them: of rows gi and gi + 8 of the tile,
// this thread's NP 16-byte pieces of codes and the two rows' scales.
template <int NP>
struct MarkRows {
    uint4 code[2][NP];
    float scale[2];
};

// The rows of the m16 tile from chunk c, issued now: rows past `end` read chunk `first`
// instead (a row of the product depends on its own row of A only, and those rows are
// not stored). Piece i of a row is its bytes 64 i + 16 t .. + 15.
template <int NP>
__device__ __forceinline__ void logits_load(MarkRows<NP>& r, const signed char* __restrict__ marks,
                                            const float* __restrict__ scales, int c, int end, int first) {
    const int lane = threadIdx.x & 31, gi = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int ch = c + 8 * h + gi, row = ch < end ? ch : first;
        const signed char* src = marks + (size_t)row * (NP * 64) + t * 16;
#pragma unroll
        for (int i = 0; i < NP; ++i) r.code[h][i] = load16_issued(src + i * 64);
        r.scale[h] = load4_issued(scales + row);
    }
}

// The logits of one m16 tile of chunks from c (its rows in r) against the group's queries
// (the parts qhi, qlo; qs[e] = sq of query head 2t + e times the softmax scale), stored to
// out and returned in x (-inf for an outlier, a row past `end` or a head past the group):
// codes · q on the integer tensor cores, 256 (codes · hi) + codes · lo exact in s32, then
// times the scales. Within one mma the order of k is free as long as both operands use
// the same one: word w of a thread's piece i of codes holds the same four dims as word
// 4i + w of its query parts.
template <int NP>
__device__ __forceinline__ void logits_mma(float (&x)[4], float* __restrict__ out, const MarkRows<NP>& r,
                                           const unsigned (&qhi)[4 * NP], const unsigned (&qlo)[4 * NP],
                                           const float (&qs)[2], const unsigned char* __restrict__ excl, int c,
                                           int end, int g) {
    const int lane = threadIdx.x & 31, gi = lane >> 2, t = lane & 3;
    int ah[4] = {0, 0, 0, 0}, al[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < NP; ++i) {
        const uint4 a = r.code[0][i], b = r.code[1][i];
        mma_16832_s8(ah, a.x, b.x, a.y, b.y, qhi[4 * i], qhi[4 * i + 1]);
        mma_16832_s8(al, a.x, b.x, a.y, b.y, qlo[4 * i], qlo[4 * i + 1]);
        mma_16832_s8(ah, a.z, b.z, a.w, b.w, qhi[4 * i + 2], qhi[4 * i + 3]);
        mma_16832_s8(al, a.z, b.z, a.w, b.w, qlo[4 * i + 2], qlo[4 * i + 3]);
    }
    // accumulators: (chunk gi, head 2t), (gi, 2t + 1), (gi + 8, 2t), (gi + 8, 2t + 1)
    float* __restrict__ o = out + (size_t)c * g;  // the tile's rows
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int ch = c + 8 * h + gi;
        const bool outlier = ch < end && excl[ch] != 0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int j = 2 * t + e, k = 2 * h + e;
            const float v = (float)(ah[k] * 256 + al[k]) * qs[e] * r.scale[h];
            x[k] = ch < end && j < g && !outlier ? v : SELECT_NEG_INF;
            if (ch < end && j < g) store4_kept(o + (8 * h + gi) * g + j, x[k]);
        }
    }
}

// exp(x) by the special function unit, flushing results below 2^-126 to zero (as
// __expf, without its path for them: a term that small adds nothing to a sum of ones).
__device__ __forceinline__ float exp_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
}

// The softmax statistics (max, sum of exp(x - max)) of query head 2t + e over a tile's 32
// chunks of the warp: this thread's four logits a..d of that head (-inf: none), then the
// warp's eight lanes of the same t. (-inf, 0) where every logit is -inf.
__device__ __forceinline__ float2 tile_stats(float a, float b, float c, float d) {
    float m = fmaxf(fmaxf(a, b), fmaxf(c, d));
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float base = m == SELECT_NEG_INF ? 0.f : m;
    float s = exp_ftz(a - base) + exp_ftz(b - base) + exp_ftz(c - base) + exp_ftz(d - base);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return make_float2(m, s);
}

// The block's LOGITS_RUN tiles from ch0 for head dimension D: warp w takes the chunks
// 32w .. 32w + 31 of each tile as two m16 tiles, 2 * LOGITS_RUN in all, each m16 tile's
// rows loaded LOGITS_AHEAD tiles before it is multiplied (a ring of register stages, all
// loads issued ahead of the products: asm volatile keeps the order). The statistics of
// each tile over the warp go to part[tile][warp].
template <int D>
__device__ __forceinline__ void logits_run(float* __restrict__ out, float2 (*part)[SELECT_WARPS][SELECT_MAX_GROUP],
                                           const __nv_bfloat16* __restrict__ qb,
                                           const signed char* __restrict__ marks, const float* __restrict__ scales,
                                           const unsigned char* __restrict__ excl, int ch0, int n, int g,
                                           float scale) {
    constexpr int NP = D / 64;  // 16-byte pieces of codes of a row a thread reads
    constexpr int STEPS = 2 * LOGITS_RUN;
    constexpr int RING = LOGITS_AHEAD + 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gi = lane >> 2, t = lane & 3;
    // m16 tile s: tile s / 2 of the run, rows 16 * (s % 2) of the warp's 32.
    auto chunk_of = [&](int s) { return ch0 + (s >> 1) * SELECT_TILE + warp * 32 + 16 * (s & 1); };
    auto end_of = [&](int s) { return min(n, ch0 + ((s >> 1) + 1) * SELECT_TILE); };
    MarkRows<NP> kr[RING];
#pragma unroll
    for (int s = 0; s < LOGITS_AHEAD; ++s) logits_load<NP>(kr[s], marks, scales, chunk_of(s), end_of(s), ch0);
    unsigned qhi[4 * NP], qlo[4 * NP];
    const float sq = query_parts<NP>(qhi, qlo, qb + (size_t)(gi < g ? gi : 0) * D, gi < g);
    const float qs[2] = {__shfl_sync(0xffffffffu, sq, 8 * t) * scale, __shfl_sync(0xffffffffu, sq, 8 * t + 4) * scale};
    float x[2][4];  // the logits of the tile's two m16 tiles
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
        if (s + LOGITS_AHEAD < STEPS)
            logits_load<NP>(kr[(s + LOGITS_AHEAD) % RING], marks, scales, chunk_of(s + LOGITS_AHEAD),
                            end_of(s + LOGITS_AHEAD), ch0);
        logits_mma<NP>(x[s & 1], out, kr[s % RING], qhi, qlo, qs, excl, chunk_of(s), end_of(s), g);
        if (s & 1) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float2 st = tile_stats(x[0][e], x[0][2 + e], x[1][e], x[1][2 + e]);
                if (lane < 4) part[s >> 1][warp][2 * lane + e] = st;
            }
        }
    }
}

// Three blocks an SM of 80 registers, one m16 tile in flight beyond the one multiplied:
// 88.5 us at 29 x 7680 chunks on the H200, against 97.7 for two blocks with three tiles
// in flight and 93.8 for four blocks with one (then 83.0 with exp_ftz and the tile's
// output offsets in 32 bits; 77.9 against 82.6 with the landmarks evicted first from L2
// and the logits last).
extern "C" __global__ void __launch_bounds__(SELECT_THREADS, LOGITS_BLOCKS)
    shadow_logits(float* __restrict__ logits, float2* __restrict__ stats, const __nv_bfloat16* __restrict__ q,
                  const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                  ShadowDims dims, float scale) {
    pdl_wait();
    pdl_trigger();
    __shared__ float2 part[LOGITS_RUN][SELECT_WARPS][SELECT_MAX_GROUP];
    const int tile0 = blockIdx.x * LOGITS_RUN, h = blockIdx.y, b = blockIdx.z;
    const int n = counts[b].chunks, ch0 = tile0 * SELECT_TILE;
    if (ch0 >= n) return;
    const int d = dims.head_dim, g = dims.group;
    const size_t row = (size_t)b * dims.kv_heads + h;
    const __nv_bfloat16* qb = q + row * g * d;
    const signed char* marks = reinterpret_cast<const signed char*>(bufs[b].marks) + (size_t)h * dims.chunk_cap * d;
    const float* mscale = reinterpret_cast<const float*>(bufs[b].mark_scales) + (size_t)h * dims.chunk_cap;
    const unsigned char* excl = reinterpret_cast<const unsigned char*>(bufs[b].outlier) + (size_t)h * dims.chunk_cap;
    float* out = logits + row * dims.chunk_cap * g;
    if (d == 128)
        logits_run<128>(out, part, qb, marks, mscale, excl, ch0, n, g, scale);
    else
        logits_run<64>(out, part, qb, marks, mscale, excl, ch0, n, g, scale);
    __syncthreads();
    // Each tile of the run that holds chunks: its statistics merged over the warps.
    const int r = threadIdx.x / SELECT_MAX_GROUP, j = threadIdx.x % SELECT_MAX_GROUP;
    if (r < LOGITS_RUN && j < g && ch0 + r * SELECT_TILE < n) {
        float2 s = make_float2(SELECT_NEG_INF, 0.f);
        for (int w = 0; w < SELECT_WARPS; ++w) s = softmax_merge(s, part[r][w][j]);
        const int tile_cap = (dims.chunk_cap + SELECT_TILE - 1) / SELECT_TILE;
        stats[(row * tile_cap + tile0 + r) * g + j] = s;
    }
}

// Shared memory of block_top_k besides the keys.
// BITS: the radix digit's bits (bins: 1 << BITS, two a thread of a block of 1 << (BITS - 1)).
template <int BITS>
struct TopkShared {
    unsigned int hist[1 << BITS];
    int scratch[32];
    int warp_above[32], warp_eq[32];
    unsigned int digit;
    int need;  // negative: -need where the bin is taken whole (need = its count)
};

// The values of a top-k row, given: entry i is v[i].
struct TopkGiven {
    static constexpr int LOADS = TOPK_LOADS;  // entries a thread loads before counting them
    const float* __restrict__ v;
    __device__ __forceinline__ float at(int i) const { return v[i]; }
    __device__ __forceinline__ void keep(int, float, bool) const {}
};

// The softmax of each query head of a shadow_top_k block's group: (max, 1 / sum of
// exp(logit - max)) over the sequence's chunks.
__shared__ float2 topk_softmax[SELECT_MAX_GROUP];

// The values of a shadow_top_k row computed from its logits (lg: [chunk][g], scaled):
// entry i is max_j exp(lg[i, j] - m_j) * inv_j over the group's query heads j, (m_j,
// inv_j) = topk_softmax[j]. keep() writes each entry's score to out (-inf for an excluded
// one) where out is given.
struct TopkSoftmax {
    static constexpr int LOADS = TOPK_LOADS / 2;
    const float* __restrict__ lg;
    float* __restrict__ out;
    int g;
    __device__ __forceinline__ float at(int i) const {
        const float* l = lg + (size_t)i * g;
        float best = SELECT_NEG_INF;
        if (g == 4) {  // Llama's groups: one 16-byte load (the rows are 16-byte aligned)
            const float4 x = __ldg(reinterpret_cast<const float4*>(l));
            const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) best = fmaxf(best, __expf(xs[j] - topk_softmax[j].x) * topk_softmax[j].y);
            return best;
        }
#pragma unroll
        for (int j = 0; j < SELECT_MAX_GROUP; ++j)
            if (j < g) best = fmaxf(best, __expf(l[j] - topk_softmax[j].x) * topk_softmax[j].y);
        return best;
    }
    __device__ __forceinline__ void keep(int i, float x, bool excluded) const {
        if (out != nullptr) out[i] = excluded ? SELECT_NEG_INF : x;
    }
};

// The selection key of entry i: the order-preserving image of its value, or 0 where the
// entry is excluded (the key of a candidate only if it is the -NaN with every bit set:
// the passes correct for that).
template <class Src>
__device__ __forceinline__ unsigned int topk_key(const Src& src, const unsigned char* __restrict__ excl, int i) {
    return excl != nullptr && excl[i] != 0 ? 0u : ordered(src.at(i));
}

// Entry i's key from shared memory (SHARED) or from its source.
template <bool SHARED, class Src>
__device__ __forceinline__ unsigned int topk_key_at(const unsigned int* keys, const Src& src,
                                                    const unsigned char* __restrict__ excl, int i) {
    return SHARED ? keys[i] : topk_key(src, excl, i);
}

// Adds each lane's digit to hist (digit >= BINS: none), the lanes of a digit at
// once: the scores of one softmax share their top digits, which would otherwise
// serialise a warp's lanes on one bin. Every lane of the warp calls it.
template <int BINS>
__device__ __forceinline__ void topk_count(unsigned int* hist, unsigned int digit) {
    const unsigned int peers = __match_any_sync(0xffffffffu, digit);
    if (digit < BINS && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
}

// Thread t's bins are hi = BINS - 1 - 2t and hi - 1 (thread order is descending
// digit order): their counts (bin 0 less `less0`), the count of the bins above them, and
// the sum of all bins. Clears its bins. Every thread calls it; ends with a barrier.
template <int BITS>
__device__ __forceinline__ void topk_bins(TopkShared<BITS>& sh, int less0, int& c_hi, int& c_lo, int& above,
                                          int& total) {
    const int hi = (1 << BITS) - 1 - 2 * (int)threadIdx.x;
    c_hi = (int)sh.hist[hi];
    c_lo = (int)sh.hist[hi - 1] - (hi == 1 ? less0 : 0);
    above = block_exclusive_sum(c_hi + c_lo, sh.scratch, &total);
    sh.hist[hi] = 0;  // read only by this thread; the next counting follows a barrier
    sh.hist[hi - 1] = 0;
}

// The body of block_top_k, with the keys in shared memory `keys` (SHARED) or taken from
// the source at each pass.
//
// Pass 1 reads the entries once (Src::LOADS entries a thread in flight), hands each to
// src.keep, keeps their keys (SHARED) and counts the candidates' top BITS bits; each pass's bin holding the
// k-th largest key is found by one block-wide prefix sum over the bins, and the next
// pass counts the next digit of the keys in that bin only (bits 31..21, 20..10, 10..0:
// the last pass's top bit is already known). The output pass gives each warp a
// contiguous range of entries: the warp counts the keys above the threshold and equal to
// it in its range (ballots), one barrier shares the counts, and a second walk writes
// each taken id at its rank among the taken ones.
template <int BITS, bool SHARED, class Src>
__device__ __forceinline__ void block_top_k_from(TopkShared<BITS>& sh, unsigned int* keys, const Src& src,
                                                 const unsigned char* __restrict__ excl, int n, int k,
                                                 int* __restrict__ out, int out_len) {
    constexpr int THREADS = 1 << (BITS - 1), BINS = 1 << BITS, WARPS = THREADS / 32;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < BINS; i += THREADS) sh.hist[i] = 0;
    __syncthreads();
    constexpr int LOADS = Src::LOADS;
    for (int i0 = 0; i0 < n; i0 += LOADS * THREADS) {
        float x[LOADS];
        bool ex[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = i0 + u * THREADS + tid;
            x[u] = i < n ? src.at(i) : 0.f;
            ex[u] = i >= n || (excl != nullptr && excl[i] != 0);
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = i0 + u * THREADS + tid;
            if (i < n) src.keep(i, x[u], ex[u]);
            const unsigned int key = ex[u] ? 0u : ordered(x[u]);
            if (SHARED && i < n) keys[i] = key;
            topk_count<BINS>(sh.hist, ex[u] ? BINS : key >> (32 - BITS));
        }
    }
    __syncthreads();
    int c_hi, c_lo, above, cands;
    topk_bins<BITS>(sh, 0, c_hi, c_lo, above, cands);
    const int kk = min(k, cands);
    // Keys above thr are all taken, and the first `ties` keys equal to thr (by index).
    // With every candidate taken, thr = 0 and ties covers every candidate key equal to 0.
    unsigned int thr = 0;
    int ties = cands;
    if (kk > 0 && kk < cands) {
        unsigned int prefix = 0;  // the bits of the k-th largest key found so far
        int need = kk;            // its rank, from the top, among the keys matching prefix
        for (int shift = 32 - BITS;; shift = max(shift - BITS, 0)) {
            if (above < need && need <= above + c_hi + c_lo) {
                const bool in_hi = need <= above + c_hi;
                sh.digit = BINS - 1 - 2 * tid - (in_hi ? 0 : 1);
                const int nb = need - above - (in_hi ? 0 : c_hi);
                sh.need = nb == (in_hi ? c_hi : c_lo) ? -nb : nb;
            }
            __syncthreads();
            prefix |= sh.digit << shift;
            need = sh.need;
            // Every key of the bin taken (the usual case after the second digit on scores):
            // the keys at or above the bin's least, none equal to the key below it.
            if (need < 0 && prefix != 0) {
                prefix -= 1;
                need = 0;
                break;
            }
            need = abs(need);
            if (shift == 0) break;
            const unsigned int mask = ~0u << shift;
            const int next = max(shift - BITS, 0);
            constexpr int UNROLL = SHARED ? TOPK_UNROLL : Src::LOADS / 2;
            for (int i0 = 0; i0 < n; i0 += UNROLL * THREADS) {
                unsigned int u[UNROLL];
#pragma unroll
                for (int j = 0; j < UNROLL; ++j) {
                    const int i = i0 + j * THREADS + tid;
                    u[j] = i < n ? topk_key_at<SHARED>(keys, src, excl, i) : 0u;
                }
#pragma unroll
                for (int j = 0; j < UNROLL; ++j) {
                    const bool in = i0 + j * THREADS + tid < n && (u[j] & mask) == prefix;
                    if (__any_sync(0xffffffffu, in)) topk_count<BINS>(sh.hist, in ? (u[j] >> next) & (BINS - 1) : BINS);
                }
            }
            __syncthreads();
            // Excluded entries (key 0) match a prefix of zeros, in bin 0.
            int total;
            topk_bins<BITS>(sh, prefix == 0 ? n - cands : 0, c_hi, c_lo, above, total);
        }
        thr = prefix;
        ties = need;
    }
    if (kk > 0) {
        // Warp w's entries: [w * span, (w + 1) * span) within [0, n), span a multiple of 32.
        const int span = ((n + WARPS - 1) / WARPS + 31) & ~31;
        const int lo = min(n, warp * span), hi = min(n, lo + span);
        // Ballots of the lanes whose entry i is above thr, and equal to it (a candidate:
        // where thr is 0, an excluded entry's key is 0 too).
        auto ballots = [&](int i, unsigned int& b_above, unsigned int& b_eq) {
            const unsigned int u = i < hi ? topk_key_at<SHARED>(keys, src, excl, i) : 0u;
            const bool eq = i < hi && u == thr && (thr != 0u || excl == nullptr || excl[i] == 0);
            b_above = __ballot_sync(0xffffffffu, i < hi && u > thr);
            b_eq = __ballot_sync(0xffffffffu, eq);
        };
        int a = 0, e = 0;
        for (int base = lo; base < hi; base += 32) {
            unsigned int ba, be;
            ballots(base + lane, ba, be);
            a += __popc(ba);
            e += __popc(be);
        }
        if (lane == 0) {
            sh.warp_above[warp] = a;
            sh.warp_eq[warp] = e;
        }
        __syncthreads();
        // A, E: the keys above thr and equal to it before the current entry. Taken before
        // it: every key above, and the first `ties` of those equal.
        int A = lane < warp ? sh.warp_above[lane] : 0, E = lane < warp ? sh.warp_eq[lane] : 0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            A += __shfl_xor_sync(0xffffffffu, A, o);
            E += __shfl_xor_sync(0xffffffffu, E, o);
        }
        const unsigned int below = (1u << lane) - 1u;
        for (int base = lo; base < hi && A + min(E, ties) < kk; base += 32) {
            unsigned int ba, be;
            ballots(base + lane, ba, be);
            const int ra = A + __popc(ba & below), re = E + __popc(be & below);
            if ((ba >> lane) & 1u)
                out[ra + min(re, ties)] = base + lane;
            else if (((be >> lane) & 1u) && re < ties)
                out[ra + re] = base + lane;
            A += __popc(ba);
            E += __popc(be);
        }
    }
    for (int i = kk + tid; i < out_len; i += THREADS) out[i] = -1;
}

// The k best of the source's entries 0..n (not excluded where excl is given), by value
// (total order), ties to the lower index, ascending into out[0..min(k, candidates)), -1
// in the rest of out[0..out_len). Every thread of a block of 1 << (BITS - 1) calls it, with
// the block's one TopkShared (declared by the kernel: a __shared__ variable here would
// be one per source type); k <= out_len. The keys sit in the dynamic shared memory where n <= shared_keys (it
// holds that many), else every pass takes the entries from the source again.
template <int BITS, class Src>
__device__ __forceinline__ void block_top_k(TopkShared<BITS>& sh, const Src src, const unsigned char* __restrict__ excl,
                                            int n, int k, int* __restrict__ out, int out_len, int shared_keys) {
    extern __shared__ unsigned int topk_keys[];
    if (n <= shared_keys)
        block_top_k_from<BITS, true>(sh, topk_keys, src, excl, n, k, out, out_len);
    else
        block_top_k_from<BITS, false>(sh, nullptr, src, excl, n, k, out, out_len);
}

// Dynamic shared memory: shared_keys * 4 bytes (0: the entries are read again at every
// pass). stats null: select by scores; else by the scores of the logits and their tiles'
// statistics (as shadow_logits writes them), written to scores unless that is null.
template <int BITS>
__device__ __forceinline__ void shadow_top_k_body(int* __restrict__ selected, float* __restrict__ scores,
                                                  const float* __restrict__ logits, const float2* __restrict__ stats,
                                                  const ShadowSeqBufs* __restrict__ bufs,
                                                  const ShadowSeqCounts* __restrict__ counts, ShadowDims dims,
                                                  int shared_keys) {
    pdl_wait();
    pdl_trigger();
    __shared__ TopkShared<BITS> sh;
    const int h = blockIdx.x, b = blockIdx.y, n = counts[b].chunks;
    const size_t row = (size_t)b * dims.kv_heads + h;
    const unsigned char* excl = reinterpret_cast<const unsigned char*>(bufs[b].outlier) + (size_t)h * dims.chunk_cap;
    int* out = selected + row * dims.slots;
    float* sc = scores != nullptr ? scores + row * dims.chunk_cap : nullptr;
    if (stats == nullptr) {
        block_top_k(sh, TopkGiven{sc}, excl, n, dims.slots, out, dims.slots, shared_keys);
        return;
    }
    // Warp j combines the statistics of query head j over the sequence's tiles.
    const int g = dims.group, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp < g) {
        const int tile_cap = (dims.chunk_cap + SELECT_TILE - 1) / SELECT_TILE;
        const int tiles = (n + SELECT_TILE - 1) / SELECT_TILE;
        float2 t = make_float2(SELECT_NEG_INF, 0.f);
        for (int i = lane; i < tiles; i += 32) t = softmax_merge(t, stats[(row * tile_cap + i) * g + warp]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float2 u = make_float2(__shfl_xor_sync(0xffffffffu, t.x, o), __shfl_xor_sync(0xffffffffu, t.y, o));
            t = softmax_merge(t, u);
        }
        if (lane == 0) topk_softmax[warp] = make_float2(t.x, t.y > 0.f ? 1.f / t.y : 0.f);
    }
    __syncthreads();
    const TopkSoftmax src{logits + row * dims.chunk_cap * g, sc, g};
    block_top_k(sh, src, excl, n, dims.slots, out, dims.slots, shared_keys);
}

// shadow_top_k_body in blocks of TOPK_THREADS (two an SM: 2 x SMs heads at once).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS, 2)
    shadow_top_k(int* __restrict__ selected, float* __restrict__ scores, const float* __restrict__ logits,
                 const float2* __restrict__ stats, const ShadowSeqBufs* __restrict__ bufs,
                 const ShadowSeqCounts* __restrict__ counts, ShadowDims dims, int shared_keys) {
    shadow_top_k_body<TOPK_BITS>(selected, scores, logits, stats, bufs, counts, dims, shared_keys);
}

// shadow_top_k_body in blocks of TOPK_THREADS / 2 (four an SM: 4 x SMs heads at once), for
// batches with more heads than 1024-thread blocks take in one wave: each head's selection
// takes longer, but no head waits for a second wave (10-bit digits, up to four passes).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS / 2, 4)
    shadow_top_k_half(int* __restrict__ selected, float* __restrict__ scores, const float* __restrict__ logits,
                      const float2* __restrict__ stats, const ShadowSeqBufs* __restrict__ bufs,
                      const ShadowSeqCounts* __restrict__ counts, ShadowDims dims, int shared_keys) {
    shadow_top_k_body<TOPK_BITS - 1>(selected, scores, logits, stats, bufs, counts, dims, shared_keys);
}

// out[r, 0..k): the k largest of values[r, 0..n) ascending by index (-1 past the
// candidates), for each row r = blockIdx.x. Dynamic shared memory as shadow_top_k's.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_rows(int* __restrict__ out, const float* __restrict__ values, int n, int k, int values_stride,
              int shared_keys) {
    pdl_wait();
    pdl_trigger();
    const size_t r = blockIdx.x;
    __shared__ TopkShared<TOPK_BITS> sh;
    block_top_k(sh, TopkGiven{values + r * values_stride}, nullptr, n, k, out + r * k, k, shared_keys);
}
