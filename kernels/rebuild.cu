// Key rebuild of the missed chunks of the ShadowKV decode step, on the fp16 tensor cores
// (reference: LowRank::rebuild in src/shadow/factor.rs, then Rope::tables / Rope::apply).
//
// For each miss (slot, chunk) of KV head h of sequence b, the chunk's rows
// t = chunk * c + i (i < c) are rebuilt from the low-rank pre-RoPE keys, whose
// coefficients are 8-bit codes with a scale per token,
//   k[t, :] = u_scales[t] * (u[t, 0..rank) . sv[0..rank, h*d .. (h+1)*d))   (fp32 accumulation),
// rotated at position t (Hugging Face rotate-half, the arithmetic of rope.cu but with
// rope_sincos of common.cuh: within 1e-6 of sincosf, without its slow path) and
// stored as bf16 to ak[h, slot_row(slot) + i, :]. Invalid entries of a list are skipped.
//
// Tier hits: given fetch_count and tier_src (as shadow_reuse writes them; null: none),
// the entries of list e from fetch_count[e] on are tier hits, entry j's values in tier
// entry tier_src[e, j] (8 bits); the kernel copies a tile's tier hits into shared memory
// by cp.async as the tile starts (rb_fetch_tier) and writes them as bf16 to their slot's
// rows of av as it finishes the tile (rb_copy_tier). The rebuild waits on latency more
// than on HBM, and the other block of the SM multiplies meanwhile; as a kernel of its own
// before the rebuild the copy took 1.8 ms of a 20.6 ms step (29 x 61440 tokens, H200).
// The fetch of the same step touches other slots and tier entries (shadow_reuse sees to
// it).
//
// Work: a tile is REBUILD_ROWS rows, the rows of M = REBUILD_ROWS / c consecutive
// entries of one head's miss list stacked (tile row p is row p % c of entry p / c; rows
// past M*c, past the list or of an invalid miss are empty: u staged as zero, nothing
// stored). All the batch's tiles, head after head, are shared evenly among the grid's
// blocks (the wrapper launches as many as the device holds at once), so a block runs a
// contiguous run of tiles, mostly of one or two heads, and a head with many misses is
// split among blocks.
//
// Product: mma.sync m16n8k16 fp16 with fp32 accumulation. u's codes are integers within
// +-127, exact in fp16 (rb_widen_u); the token's scale multiplies the finished row
// (rb_store). sv (fp32, the rows of an orthonormal basis: entries within +-1) is rounded
// to fp16, a relative error of at most 2^-11: a rebuilt key moves by about 3e-4 of its
// size, a twentieth of what the 8-bit coefficients themselves move it (tests/cuda_shadow.rs
// bounds both). (While u was exact bf16, sv was split into two bf16 terms, hi + lo, to
// 2^-18: twice the products, and twice the shared memory.) The fragments come from shared
// memory by ldmatrix (A: u [row][rank]; B: sv [rank][column] by ldmatrix.trans, which
// gives the column-major fragment), one x4 load per 16x16 of u and per pair of n8 tiles,
// with strides that keep them free of bank conflicts.
//
// Shared memory: the head's sv in fp16, [rank][d + 8], stays resident while the block runs
// that head's tiles (staged, with plain loads and the rounding, only when the head
// changes): 320 ranks at d = 128 (87 KB), 640 at d = 64. A larger rank is walked in panels
// of that many ranks, each restaged for every tile (correct, slower). u streams through
// two stages of [REBUILD_ROWS][32 ranks] fp16: the codes of the next stage (the tile's
// next 32 ranks, or the next tile's first) are loaded into registers before a stage is
// multiplied (8-byte loads where the rank keeps u's rows 8-byte aligned, byte loads
// otherwise) and widened into the other stage after it. With a tier, a tile's tier hits
// (16.5 KB at d = 128, c = 8) are staged too. About 66 KB a block at d = 128 and rank 160
// (83 KB with a tier); the registers hold two blocks an SM.
//
// Warp w computes tile rows 32*(w/2) .. 32*(w/2) + 31 (two m16 tiles) and, of the d/16
// n8 tiles of the first half of the head, those of (w%2)*d/32 .. (w%2+1)*d/32 - 1
// together with their rotation partners, tile j + d/16 for tile j: in the m16n8
// accumulator (the same layout for k16 as for k8) a thread holds columns
// 8*j + 2*(lane%4) + {0,1} of tile j at rows lane/4 and lane/4 + 8, so column j' < d/2
// and its partner j' + d/2 sit in the same thread and slot, and the rotation is done in
// registers. A warp with no row of the tile to rebuild skips the multiplication.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "pdl.cuh"
#include "shadow.cuh"

#define REBUILD_ROWS 128  // rows of a tile: 8 warps, 4 row groups of 32 x 2 column halves
#define REBUILD_WARPS 8
#define REBUILD_THREADS (REBUILD_WARPS * 32)
#define REBUILD_K_CHUNK 32  // ranks of u a pipeline stage holds (two k16 steps)
// Ranks x columns of a head's sv a block keeps in shared memory at most: rank 320 at
// d = 128, 640 at d = 64 (a multiple of REBUILD_K_CHUNK either way). Larger ranks are
// walked in panels of that many ranks, restaged for every tile.
#define REBUILD_SV_RANK_COLS (320 * 128)
// Shared row strides (16-bit values): u rows of 80 bytes and sv rows of 2*d + 16 bytes put
// the 8 rows of each ldmatrix 8x8 matrix in 8 different 16-byte bank groups (80 mod 128
// = 5 x 16, (2d + 16) mod 128 = 16), so its reads are free of bank conflicts.
#define REBUILD_U_STRIDE (REBUILD_K_CHUNK + 8)
#define REBUILD_U_BYTES (2 * REBUILD_ROWS * REBUILD_U_STRIDE * 2)  // the two stages
#define REBUILD_META_BYTES (8 * REBUILD_ROWS * 4)                  // tok, arow, tent and usc, two tiles

// inv_freq in shared memory (head_dim / 2 <= 64 values), read by rb_store.
__shared__ float rb_inv[64];

// Ranks of sv a block stages at once (a multiple of REBUILD_K_CHUNK).
__device__ __forceinline__ int rb_panel_ranks(int d, int r) {
    return min((r + REBUILD_K_CHUNK - 1) / REBUILD_K_CHUNK * REBUILD_K_CHUNK, REBUILD_SV_RANK_COLS / d);
}

__device__ __forceinline__ unsigned rb_bits(__half2 v) { return *reinterpret_cast<unsigned*>(&v); }

// Tiles of a head's miss list of `count` entries (clamped to [0, slots]), `per` misses a tile.
__device__ __forceinline__ int rb_tiles(int count, int slots, int per) {
    return (min(max(count, 0), slots) + per - 1) / per;
}

// off[e] = the tiles of the lists before list e, off[lists] = all of them (returned), in
// shared memory. Every thread of the block must call it; ends with a barrier.
__device__ __forceinline__ int rb_tile_offsets(const int* __restrict__ miss_count, int lists, int slots, int per,
                                               int* off, int* scratch) {
    const int n = (lists + REBUILD_THREADS - 1) / REBUILD_THREADS;
    const int lo = min(lists, (int)threadIdx.x * n), hi = min(lists, lo + n);
    int s = 0;
    for (int e = lo; e < hi; ++e) s += rb_tiles(miss_count[e], slots, per);
    int total;
    int acc = block_exclusive_sum(s, scratch, &total);
    for (int e = lo; e < hi; ++e) {
        off[e] = acc;
        acc += rb_tiles(miss_count[e], slots, per);
    }
    if (threadIdx.x == 0) off[lists] = total;
    __syncthreads();
    return total;
}

// A tile: up to `per` consecutive entries of the miss list of KV head h of sequence b.
struct RbTile {
    int b, h;
    int first;  // its first entry
    int nm;     // entries of the list
    int fc;     // of which fetched (the rest are tier hits), or nm without tier hits to copy
};

__device__ __forceinline__ RbTile rb_tile(const int* off, int lists, int t, int per, const ShadowDims& dims,
                                          const int* __restrict__ miss_count, const int* __restrict__ fetch_count) {
    const int e = run_of(off, lists, t);
    RbTile x;
    x.b = e / dims.kv_heads;
    x.h = e - x.b * dims.kv_heads;
    x.first = (t - off[e]) * per;
    x.nm = min(max(miss_count[e], 0), dims.slots);
    x.fc = fetch_count != nullptr && dims.tier > 0 ? min(max(fetch_count[e], 0), x.nm) : x.nm;
    return x;
}

// (token, row of the head's attention buffer) of row p of tile x: row p % c of its miss
// p / c; token -1 for an empty row (past the tile's misses or the list, or an invalid miss).
__device__ __forceinline__ int2 rb_row(const RbTile& x, int p, int per, const ShadowDims& dims,
                                       const int2* __restrict__ misses, const ShadowSeqCounts* __restrict__ counts) {
    const int c = dims.chunk, j = p / c, i = p - j * c;
    if (j >= per || x.first + j >= x.nm) return make_int2(-1, 0);
    const int2 m = misses[((size_t)x.b * dims.kv_heads + x.h) * dims.slots + x.first + j];
    if (m.x < 0 || m.x >= dims.slots || m.y < 0 || m.y >= dims.chunk_cap) return make_int2(-1, 0);
    return make_int2(m.y * c + i, shadow_slot_row(dims, counts[x.b].outliers, m.x) + i);
}

// Starts tile x: its rows' tokens, attention rows, coefficient scales and chunks of the
// head's GPU value tier (the byte entry * value_chunk_bytes where the entry starts; -1:
// not a tier hit) into tok / arow / usc / tent (threads below REBUILD_ROWS, one row
// each), and this thread's two rows of u to stage (rows tid/4 and tid/4 + 64; null =
// empty) into lrow.
__device__ __forceinline__ void rb_start_tile(const RbTile& x, int per, const ShadowDims& dims,
                                              const int2* __restrict__ misses,
                                              const ShadowSeqCounts* __restrict__ counts,
                                              const ShadowSeqBufs* __restrict__ bufs,
                                              const int* __restrict__ tier_src, int* tok, int* arow, int* tent,
                                              float* usc, const signed char* (&lrow)[2]) {
    const int tid = threadIdx.x;
    if (tid < REBUILD_ROWS) {
        const int2 q = rb_row(x, tid, per, dims, misses, counts);
        tok[tid] = q.x;
        arow[tid] = q.y;
        usc[tid] = q.x >= 0 ? reinterpret_cast<const float*>(bufs[x.b].u_scales)[q.x] : 0.f;
        const int j = x.first + tid / dims.chunk;  // the row's entry of the list
        int ent = -1;
        if (q.x >= 0 && j >= x.fc) {
            const int e = x.b * dims.kv_heads + x.h;
            const int entry = min(max(tier_src[(size_t)e * dims.slots + j], 0), dims.tier - 1);
            ent = entry * value_chunk_bytes(dims);
        }
        tent[tid] = ent;
    }
    const signed char* U = reinterpret_cast<const signed char*>(bufs[x.b].u);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const int t = rb_row(x, (tid >> 2) + 64 * q, per, dims, misses, counts).x;
        lrow[q] = t >= 0 ? U + (size_t)t * dims.rank : nullptr;
    }
}

// Loads the codes of ranks k0 .. k0 + 31 of the tile's u rows that this thread stages
// (rb_widen_u) into w: ranks k0 + 8*(tid%4) .. +7 of rows tid/4 and tid/4 + 64, zero past
// the rank or for an empty row. One 8-byte load a row where the rank keeps u's rows
// 8-byte aligned (`vec`), byte loads otherwise.
__device__ __forceinline__ void rb_load_u(uint2 (&w)[2], const signed char* const (&lrow)[2], int k0, int r,
                                          bool vec) {
    const int k = k0 + (threadIdx.x & 3) * 8;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const signed char* src = lrow[q];
        if (vec) {
            w[q] = src != nullptr && k < r ? __ldg(reinterpret_cast<const uint2*>(src + k)) : make_uint2(0u, 0u);
        } else {
            unsigned b[2] = {0u, 0u};
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (src != nullptr && k + e < r) b[e >> 2] |= (unsigned)(unsigned char)src[k + e] << (8 * (e & 3));
            w[q] = make_uint2(b[0], b[1]);
        }
    }
}

// Writes the codes w (rb_load_u) widened to fp16 into their place in the stage buffer `ub`
// ([row][rank]): 16 bytes a row. A code c becomes exactly the fp16 1024 + (c + 128) by a
// byte permutation of its biased byte (c ^ 0x80) under the exponent byte 0x64, then
// minus 1152.
__device__ __forceinline__ void rb_widen_u(unsigned short* ub, const uint2 (&w)[2]) {
    const int tid = threadIdx.x;
    const __half2 bias = __half2half2(__ushort_as_half((unsigned short)0x6480));  // 1152
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const unsigned in[2] = {w[q].x ^ 0x80808080u, w[q].y ^ 0x80808080u};
        unsigned o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unsigned x = __byte_perm(in[i >> 1], 0x64646464u, (i & 1) ? 0x4342 : 0x4140);
            o[i] = rb_bits(__hsub2(*reinterpret_cast<__half2*>(&x), bias));
        }
        *reinterpret_cast<uint4*>(ub + ((tid >> 2) + 64 * q) * REBUILD_U_STRIDE + (tid & 3) * 8) =
            make_uint4(o[0], o[1], o[2], o[3]);
    }
}

// Stages `rows` ranks of the head's sv from rank k0 into sh ([rank][column], row stride
// D + 8) as fp16 (round to nearest); zero past the rank. SV: the head's first column of
// rank 0, row stride kvd. BATCH: 16-byte loads a thread keeps in flight.
template <int D, int BATCH>
__device__ __forceinline__ void rb_stage_sv(unsigned short* sh, const float* __restrict__ SV, size_t kvd, int r,
                                            int k0, int rows) {
    constexpr int QUADS = D / 4, S = D + 8;
    const int n = rows * QUADS;
    for (int i0 = threadIdx.x; i0 < n; i0 += BATCH * REBUILD_THREADS) {
        float4 vs[BATCH];
#pragma unroll
        for (int q = 0; q < BATCH; ++q) {
            const int i = i0 + q * REBUILD_THREADS, kk = i / QUADS, col = (i % QUADS) * 4;
            vs[q] = i < n && k0 + kk < r ? *reinterpret_cast<const float4*>(SV + (size_t)(k0 + kk) * kvd + col)
                                         : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int q = 0; q < BATCH; ++q) {
            const int i = i0 + q * REBUILD_THREADS, kk = i / QUADS, col = (i % QUADS) * 4;
            if (i >= n) break;
            const float4 v = vs[q];
            *reinterpret_cast<uint2*>(sh + kk * S + col) =
                make_uint2(rb_bits(__floats2half2_rn(v.x, v.y)), rb_bits(__floats2half2_rn(v.z, v.w)));
        }
    }
}

// The warp's products of one stage (two k16 steps): its two m16 tiles of rows times its
// PAIRS pairs of n8 tiles (tile j and its rotation partner j + D/16). ua: this lane's
// ldmatrix address in the stage's u; sa: in sv at the stage's first rank.
template <int D>
__device__ __forceinline__ void rb_mma_stage(float (&acc)[2][D / 32][2][4], unsigned ua, unsigned sa) {
    constexpr int PAIRS = D / 32, SV_ROW = (D + 8) * 2, U_ROW = REBUILD_U_STRIDE * 2;  // bytes
#pragma unroll
    for (int ks = 0; ks < REBUILD_K_CHUNK; ks += 16) {
        unsigned a[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) ldsm_x4(a[m], ua + m * 16 * U_ROW + ks * 2);
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            unsigned b[4];  // b0, b1 of tile j, then of its partner
            ldsm_x4_t(b, sa + ks * SV_ROW + p * 16);
#pragma unroll
            for (int m = 0; m < 2; ++m) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) mma_16816_f16(acc[m][p][hf], a[m], b[2 * hf], b[2 * hf + 1]);
            }
        }
    }
}

// Scales the warp's finished rows by their tokens' coefficient scales, rotates them and
// stores them as bf16: slot 2*hr + e of pair p, half 0 holds row g + 8*hr of m16 tile m,
// column j + e (j = 8*(tile0 + p) + 2*tq), half 1 the same slot of its partner column
// j + e + D/2. tok / arow / usc: the tile's rows; ak: row 0 of the head's attention keys.
template <int D>
__device__ __forceinline__ void rb_store(const float (&acc)[2][D / 32][2][4], const int* tok, const int* arow,
                                         const float* usc, int row0, int tile0,
                                         __nv_bfloat16* __restrict__ ak) {
    constexpr int PAIRS = D / 32;
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int row = row0 + 16 * m + 8 * hr + g;
            const int t = tok[row];
            if (t < 0) continue;
            __nv_bfloat16* dst = ak + (size_t)arow[row] * D;
            const float pos = (float)t, sc = usc[row];
#pragma unroll
            for (int p = 0; p < PAIRS; ++p) {
                const int j = (tile0 + p) * 8 + 2 * tq;
                float o0[2], o1[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float sn, cs;
                    rope_sincos(__fmul_rn(pos, rb_inv[j + e]), &sn, &cs);
                    const float x0 = __fmul_rn(acc[m][p][0][2 * hr + e], sc);
                    const float x1 = __fmul_rn(acc[m][p][1][2 * hr + e], sc);
                    o0[e] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
                    o1[e] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
                }
                *reinterpret_cast<__nv_bfloat162*>(dst + j) = __floats2bfloat162_rn(o0[0], o0[1]);
                *reinterpret_cast<__nv_bfloat162*>(dst + j + D / 2) = __floats2bfloat162_rn(o1[0], o1[1]);
            }
        }
    }
}

// Starts the copy of the tile's tier hits into `buf` (shared, [per][value_chunk_bytes]):
// the whole chunk of each miss that is a tier hit (tent of its first row >= 0), 16 bytes
// a cp.async (2c threads a chunk, per = REBUILD_ROWS / c chunks), so the loads land while
// the tile's products run; rb_copy_tier finishes it after cp_async_wait and a barrier.
// tent: the tile's rows (rb_start_tile). Where per does not divide REBUILD_THREADS, the
// last threads get j = per: row j * c is then still below REBUILD_ROWS (for every c up to
// MAX_CHUNK), past the tile's rows, and its tent is -1, so they copy nothing.
__device__ __forceinline__ void rb_fetch_tier(unsigned char* buf, const int* tent, const ShadowSeqBufs& seq,
                                              const ShadowDims& dims, int h, int per) {
    const int c = dims.chunk, tpc = REBUILD_THREADS / per, j = threadIdx.x / tpc, src = tent[j * c];
    if (src >= 0) {
        const int words = value_chunk_bytes(dims) / 16;
        const unsigned char* from =
            reinterpret_cast<const unsigned char*>(shadow_tier_entry(seq, dims, h, 0)) + src;
        const unsigned to = smem_addr(buf + j * words * 16);
        for (int k = threadIdx.x - j * tpc; k < words; k += tpc) cp_async16(to + k * 16, from + k * 16, true);
    }
    cp_async_commit();
}

// Writes the tier hits' values of the tile whose rows are arow / tent, staged in `buf` by
// rb_fetch_tier (landed: after cp_async_wait and a barrier), to their rows of av as bf16
// from the tier's 8 bits (row i of a staged chunk at byte i * D, its scale at c * D + 4i):
// thread tid writes word tid % (D / 8) (8 values from 8 codes and the row's scale) of the
// rows tid / (D / 8) + k * (REBUILD_THREADS / (D / 8)); rows that are not tier hits are
// skipped. (The tier's loads issued here, a dependent round trip to HBM for each of the
// eight passes, took a quarter of the kernel's warp samples; ncu, H200.)
template <int D>
__device__ __forceinline__ void rb_copy_tier(const unsigned char* buf, const int* arow, const int* tent,
                                             const ShadowSeqBufs& seq, const ShadowDims& dims, int h) {
    constexpr int ROW_WORDS = D / 8, STRIDE = REBUILD_THREADS / ROW_WORDS;  // rows a pass
    const int c = dims.chunk, vcb = value_chunk_bytes(dims);
    uint4* av = reinterpret_cast<uint4*>(shadow_attn_row(seq.av, dims, h, 0));
    const int i = threadIdx.x % ROW_WORDS;
#pragma unroll 4
    for (int p = threadIdx.x / ROW_WORDS; p < REBUILD_ROWS; p += STRIDE) {
        if (tent[p] < 0) continue;
        const int j = p / c, r = p - j * c;
        const unsigned char* chunk = buf + j * vcb;
        const uint2 v = reinterpret_cast<const uint2*>(chunk + r * D)[i];
        const float sc = reinterpret_cast<const float*>(chunk + c * D)[r];
        av[arow[p] * ROW_WORDS + i] = code8_expand8(v, sc);
    }
}

// Shared memory of a block (dynamic; sizes in bytes, kp = rb_panel_ranks):
//   u     [2][REBUILD_ROWS][REBUILD_U_STRIDE] fp16   the two pipeline stages   20480
//   sv    [kp][d + 8] fp16                           the staged panel of sv     2 kp (d + 8)
//   tier  [REBUILD_ROWS / c][value_chunk_bytes]      a tile's tier hits (with a tier)  16896 at d 128, c 8
//   tok, arow, tent [2][REBUILD_ROWS] int, usc [2][REBUILD_ROWS] float  two tiles' rows  4096
//   off   [lists + 1] int                            tiles before each list     4 (lists + 1)
// (src/cuda/shadow/rebuild.rs sizes it the same way.)
// (inv_freq, d / 2 floats, is static shared memory: rb_inv.)
struct RbSmem {
    unsigned short *u, *sv;
    unsigned char* tier;
    int *tok, *arow, *tent, *off;
    float* usc;
};

// Bytes of a tile's staged tier hits: none without a tier.
__device__ __forceinline__ int rb_tier_bytes(const ShadowDims& dims) {
    return dims.tier > 0 ? REBUILD_ROWS / dims.chunk * value_chunk_bytes(dims) : 0;
}

__device__ __forceinline__ RbSmem rb_smem(unsigned char* base, const ShadowDims& dims, int kp) {
    RbSmem s;
    s.u = reinterpret_cast<unsigned short*>(base);
    s.sv = s.u + 2 * REBUILD_ROWS * REBUILD_U_STRIDE;
    s.tier = reinterpret_cast<unsigned char*>(s.sv + kp * (dims.head_dim + 8));
    s.tok = reinterpret_cast<int*>(s.tier + rb_tier_bytes(dims));
    s.arow = s.tok + 2 * REBUILD_ROWS;
    s.tent = s.arow + 2 * REBUILD_ROWS;
    s.usc = reinterpret_cast<float*>(s.tent + 2 * REBUILD_ROWS);
    s.off = reinterpret_cast<int*>(s.usc + 2 * REBUILD_ROWS);
    return s;
}

// The block's tiles t0 .. t1 - 1 for head dimension D. One pipeline step per (tile,
// stage of REBUILD_K_CHUNK ranks): barrier (the step's u is in), load the next step's
// codes, multiply, widen the codes into the other buffer; after a tile's last stage
// scale, rotate and store it. (Written as one loop over all the steps, it zeroed the accumulators and divided
// by the panel at every step: 64 selects and an integer division for 32 products.) sv is
// staged (plain loads, rounded to fp16) when the tile's head differs from the staged
// one, or at every panel when the rank needs more than one.
template <int D>
__device__ __forceinline__ void rebuild_tiles(const RbSmem& s, int kp, int lists, int t0, int t1,
                                              const int2* __restrict__ misses, const int* __restrict__ miss_count,
                                              const int* __restrict__ fetch_count, const int* __restrict__ tier_src,
                                              const ShadowSeqBufs* __restrict__ bufs,
                                              const ShadowSeqCounts* __restrict__ counts, const ShadowDims& dims) {
    constexpr int PAIRS = D / 32, HALF = D / 16, SV_ROW = (D + 8) * 2, U_ROW = REBUILD_U_STRIDE * 2;  // bytes
    constexpr int U_STAGE = REBUILD_ROWS * REBUILD_U_STRIDE;  // fp16 values of a stage
    static_assert(REBUILD_ROWS == REBUILD_WARPS / 2 * 32 && REBUILD_THREADS == 2 * REBUILD_ROWS, "warp tiling");
    static_assert(REBUILD_SV_RANK_COLS / D % REBUILD_K_CHUNK == 0, "panels of whole stages");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row0 = (warp >> 1) * 32;     // the warp's first row of a tile
    const int tile0 = (warp & 1) * PAIRS;  // its first n8 tile
    const int r = dims.rank, per = REBUILD_ROWS / dims.chunk;
    const int kch = (r + REBUILD_K_CHUNK - 1) / REBUILD_K_CHUNK;  // stages a tile
    const int pch = kp / REBUILD_K_CHUNK;                          // stages a panel of sv
    const bool one_panel = kch <= pch;
    const bool vec = (r & 7) == 0;
    const size_t kvd = (size_t)dims.kv_heads * D;

    // ldmatrix addresses of this lane: for u, row (lane%8) + 8*((lane/8)%2) of the warp's
    // first m16 tile at rank 8*(lane/16) (A fragments a0..a3); for sv, rank (lane%8) +
    // 8*((lane/8)%2) at column 8*tile0, or of its partner tile for lanes 16..31 (matrices
    // b0, b1 of tile j, then of j + D/16: ldmatrix.trans gives the column-major B).
    const unsigned ua = smem_addr(s.u) + ((row0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * U_ROW + 16 * (lane >> 4));
    const unsigned sv_lane = ((lane & 7) + 8 * ((lane >> 3) & 1)) * SV_ROW + 16 * (tile0 + (lane >> 4) * HALF);
    const unsigned sa = smem_addr(s.sv) + sv_lane;

    const signed char* lrow[2];
    uint2 w[2];  // the next step's codes
    RbTile nxt = rb_tile(s.off, lists, t0, per, dims, miss_count, fetch_count);
    rb_start_tile(nxt, per, dims, misses, counts, bufs, tier_src, s.tok, s.arow, s.tent, s.usc, lrow);
    rb_load_u(w, lrow, 0, r, vec);
    rb_widen_u(s.u, w);

    int staged = -1;  // list whose sv the one panel holds
    int st = 0;       // pipeline steps so far (the u buffer of a step is st % 2)
    for (int ti = 0; ti < t1 - t0; ++ti) {
        const RbTile cur = nxt;
        const int e = cur.b * dims.kv_heads + cur.h;
        const int par = (ti & 1) * REBUILD_ROWS;  // the tile's rows in tok / arow
        const float* sv = reinterpret_cast<const float*>(bufs[cur.b].sv) + (size_t)cur.h * D;
        if (!one_panel || e != staged) {
            // No accumulator is live yet: the staging keeps more loads in flight.
            __syncthreads();  // every warp is done with the panel staged before
            rb_stage_sv<D, 10>(s.sv, sv, kvd, r, 0, min(kp, kch * REBUILD_K_CHUNK));
            staged = e;
        }
        float acc[2][PAIRS][2][4] = {};
        bool active = false;
        for (int kc = 0, pk = 0; kc < kch; ++kc, ++st) {  // pk = kc % pch
            if (pk == 0 && kc > 0) {
                __syncthreads();  // every warp is done with the panel before
                rb_stage_sv<D, 4>(s.sv, sv, kvd, r, kc * REBUILD_K_CHUNK, min(kp, (kch - kc) * REBUILD_K_CHUNK));
            }
            __syncthreads();  // the step's u and sv, and the tile's rows, are in; the other u
                              // buffer and the other tile's rows are free
            if (kc == 0) {
                active = __any_sync(0xffffffffu, s.tok[par + row0 + lane] >= 0);
                // The tile's tier hits, if any: their chunks land in shared memory while the
                // products run.
                if (dims.tier > 0) rb_fetch_tier(s.tier, s.tent + par, bufs[cur.b], dims, cur.h, per);
            }
            // The next step's codes: the tile's next ranks, or the next tile's first.
            bool more = true;
            if (kc + 1 < kch) {
                rb_load_u(w, lrow, (kc + 1) * REBUILD_K_CHUNK, r, vec);
            } else if (t0 + ti + 1 < t1) {
                nxt = rb_tile(s.off, lists, t0 + ti + 1, per, dims, miss_count, fetch_count);
                const int np = REBUILD_ROWS - par;
                rb_start_tile(nxt, per, dims, misses, counts, bufs, tier_src, s.tok + np, s.arow + np, s.tent + np,
                              s.usc + np, lrow);
                rb_load_u(w, lrow, 0, r, vec);
            } else {
                more = false;
            }
            if (active) {
                const unsigned k_off = pk * REBUILD_K_CHUNK * SV_ROW;
                rb_mma_stage<D>(acc, ua + (st & 1) * U_STAGE * 2, sa + k_off);
            }
            if (more) rb_widen_u(s.u + ((st + 1) & 1) * U_STAGE, w);
            if (++pk == pch) pk = 0;
        }
        rb_store<D>(acc, s.tok + par, s.arow + par, s.usc + par, row0, tile0,
                    shadow_attn_row(bufs[cur.b].ak, dims, cur.h, 0));
        // (A tile without tier hits waits for nothing and its copy skips every row; a flag
        // kept for them across the products cost spills. Without a tier, the barrier made
        // the keys-only rebuild 7 % slower.)
        if (dims.tier > 0) {
            cp_async_wait<0>();
            __syncthreads();  // every thread's tier chunks have landed
            rb_copy_tier<D>(s.tier, s.arow + par, s.tent + par, bufs[cur.b], dims, cur.h);
        }
    }
}

extern "C" __global__ void __launch_bounds__(REBUILD_THREADS, 2)
    shadow_rebuild(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                   const int* __restrict__ fetch_count, const int* __restrict__ tier_src,
                   const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                   const float* __restrict__ inv_freq, ShadowDims dims, int batch) {
    pdl_wait();
    pdl_trigger();
    extern __shared__ __align__(16) unsigned char rb_shared[];
    __shared__ int scratch[32];
    const int d = dims.head_dim, lists = batch * dims.kv_heads;
    const int per = REBUILD_ROWS / dims.chunk;  // misses a tile
    const int kp = rb_panel_ranks(d, dims.rank);
    const RbSmem s = rb_smem(rb_shared, dims, kp);
    if (threadIdx.x < d / 2) rb_inv[threadIdx.x] = inv_freq[threadIdx.x];  // (rb_tile_offsets ends with a barrier)
    const int total = rb_tile_offsets(miss_count, lists, dims.slots, per, s.off, scratch);
    // An even share of all the tiles, in order: a block runs one head's tiles after
    // another and restages sv only when the head changes.
    const int t0 = (int)((long long)total * blockIdx.x / gridDim.x);
    const int t1 = (int)((long long)total * (blockIdx.x + 1) / gridDim.x);
    if (t0 >= t1) return;
    if (d == 128)
        rebuild_tiles<128>(s, kp, lists, t0, t1, misses, miss_count, fetch_count, tier_src, bufs, counts, dims);
    else if (d == 64)
        rebuild_tiles<64>(s, kp, lists, t0, t1, misses, miss_count, fetch_count, tier_src, bufs, counts, dims);
}
