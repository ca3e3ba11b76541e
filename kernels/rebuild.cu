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
// by cp.async as the tile starts (rb_fetch_tier) and writes them as they are to their
// slots' values in av as it finishes the tile (rb_copy_tier). The rebuild waits on latency more
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
// +-127, exact in fp16; the token's scale multiplies the finished row (rb_store). sv (fp32,
// the rows of an orthonormal basis: entries within +-1) is rounded to fp16, a relative
// error of at most 2^-11: a rebuilt key moves by about 3e-4 of its size, a twentieth of
// what the 8-bit coefficients themselves move it (tests/cuda_shadow.rs bounds both).
// (While u was exact bf16, sv was split into two bf16 terms, hi + lo, to 2^-18: twice the
// products, and twice the shared memory.)
//
// Operands: a tile's codes stay 8-bit in shared memory ([row][rank], rows of kp + 16
// bytes: 16-byte aligned for cp.async, and a stride of 4 mod 8 words keeps the eight rows
// of a fragment load on different banks). A thread's A fragment of a k16 step is two
// 4-byte loads (rows g and g + 8, ranks 4*tq .. 4*tq + 3) widened to fp16 in registers
// (rb_widen4): within one mma the order of k is free as long as both operands use the
// same one, so the fragment's k = 2*tq + j and 8 + 2*tq + j (j < 2) take ranks 4*tq + j
// and 4*tq + 2 + j, and sv is staged with its ranks permuted to match (rb_sv_row). B
// comes from sv in shared memory by ldmatrix.trans (the column-major fragment), one x4
// load per pair of n8 tiles, with a stride that keeps it free of bank conflicts.
//
// Pipeline: as a tile starts, thread 0 finds the tile after next and every thread loads
// its row's miss entry of the next tile; after the tile's products, the next tile's codes
// (16 bytes a copy; byte loads where the rank is not a multiple of 16), coefficient
// scales and tier entries are copied into the other of two buffers by cp.async, so a
// tile's products wait for no load and pass no barrier: one barrier a tile (its codes in;
// each thread waits for the tier words it copies itself). (The previous form streamed u through two stages
// of 32 ranks in fp16, each loaded into registers one stage ahead and widened into
// shared memory behind a barrier: five barriers a tile at rank 160, each exposing a
// gather from HBM.)
//
// Shared memory: the head's sv in fp16, [rank][d + 8], stays resident while the block runs
// that head's tiles (staged, with plain loads and the rounding, only when the head
// changes): up to 320 ranks. A larger rank is walked in panels of that many ranks, sv and
// the tile's codes restaged for every panel (correct, slower). With a tier, a tile's tier
// hits (16.5 KB at d = 128, c = 8) are staged too. About 109 KB a block at d = 128, rank
// 160 and a tier: two blocks an SM.
//
// Warp w computes tile rows 32*(w/2) .. 32*(w/2) + 31 (two m16 tiles) and, of the d/16
// n8 tiles of the first half of the head, those of (w%2)*d/32 .. (w%2+1)*d/32 - 1
// together with their rotation partners, tile j + d/16 for tile j: in the m16n8
// accumulator (the same layout for k16 as for k8) a thread holds columns
// 8*j + 2*(lane%4) + {0,1} of tile j at rows lane/4 and lane/4 + 8, so column j' < d/2
// and its partner j' + d/2 sit in the same thread and slot, and the rotation is done in
// registers. sv's columns are staged permuted within each warp's group of columns
// (rb_sv_col), so that a thread's accumulator holds consecutive columns of its rows: a
// row's columns of a half leave in one 16-byte store (four 4-byte stores to eight rows
// an instruction each before: the kernel -10 to -17 %, H200). A warp with no row of the
// tile to rebuild skips the multiplication.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "pdl.cuh"
#include "shadow.cuh"

#define REBUILD_ROWS 128  // rows of a tile: 8 warps, 4 row groups of 32 x 2 column halves
#define REBUILD_WARPS 8
#define REBUILD_THREADS (REBUILD_WARPS * 32)
#define REBUILD_K_CHUNK 32  // a panel's ranks are a multiple of this
// Ranks of sv (and of a tile's codes) a block keeps in shared memory at most (a multiple
// of REBUILD_K_CHUNK). Larger ranks are walked in panels of that many ranks, restaged for
// every tile.
#define REBUILD_PANEL_RANKS 320
// sv rows of 2*d + 16 bytes put the 8 rows of each ldmatrix 8x8 matrix in 8 different
// 16-byte bank groups ((2d + 16) mod 128 = 16), so its reads are free of bank conflicts.
// tok, arow, tent and usc of two tiles, and three tiles (RbTile, 32 bytes each)
#define REBUILD_META_BYTES (8 * REBUILD_ROWS * 4 + 96)
// tent of a row that is not a tier hit (else the row's tier entry as tier_src holds it).
#define RB_NO_TIER (-2147483647 - 1)

// inv_freq in shared memory (head_dim / 2 <= 64 values), read by rb_store.
__shared__ float rb_inv[64];

// Ranks of sv and of the codes a block stages at once (a multiple of REBUILD_K_CHUNK).
__device__ __forceinline__ int rb_panel_ranks(int r) {
    return min((r + REBUILD_K_CHUNK - 1) / REBUILD_K_CHUNK * REBUILD_K_CHUNK, REBUILD_PANEL_RANKS);
}

// Bytes of a row of a tile's codes in shared memory: kp + 16 (kp a multiple of 32, so
// kp / 4 + 4 words: 4 mod 8, and the rows g = 0..7 of a fragment load start on banks
// 4 * (g * odd mod 8), all different).
__device__ __forceinline__ int rb_code_stride(int kp) { return kp + 16; }

// The shared-memory row of sv's rank k of a panel: ranks permuted within each 16 so that
// the mma's k = 8*b + 2*a + j (a < 4, b, j < 2) reads rank 4*a + 2*b + j, the order in
// which rb_widen4 lays a thread's four codes into its A fragment.
__device__ __forceinline__ int rb_sv_row(int k) {
    const int p = k & 15;
    return (k & ~15) | (8 * ((p >> 1) & 1) + 2 * (p >> 2) + (p & 1));
}

__device__ __forceinline__ unsigned rb_bits(__half2 v) { return *reinterpret_cast<unsigned*>(&v); }

// The multiplier of rb_div for a divisor c in 1 .. MAX_CHUNK: ceil(2^16 / c).
__device__ __forceinline__ int rb_div_magic(int c) { return (65536 + c - 1) / c; }

// p / c for 0 <= p with p (c - 1) < 2^16 (every p < REBUILD_ROWS for c <= MAX_CHUNK) by a
// multiply and a shift (m = rb_div_magic(c)), instead of a division's dozen instructions:
// with m = (2^16 + e) / c, e < c, p * m / 2^16 exceeds p / c by p * e / (c 2^16) < 1 / c,
// too little to reach the next integer.
__device__ __forceinline__ int rb_div(int p, int m) { return (p * m) >> 16; }

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
    int outl;   // the sequence's outlier chunks (its slots' rows follow theirs)
    int pad[2];
};
static_assert(sizeof(RbTile) == 32, "three tiles in the 96 bytes of REBUILD_META_BYTES");

// Tile t, its list found from list e on (a list whose tiles start at or before t; e is
// left at t's list): one thread finds a block's tiles in order, so the walk moves a list
// at a time (past lists without tiles), where a search of the offsets took ten
// dependent shared loads a tile.
__device__ __forceinline__ RbTile rb_tile(const int* off, int lists, int t, int& e, int per, const ShadowDims& dims,
                                          const int* __restrict__ miss_count, const int* __restrict__ fetch_count,
                                          const ShadowSeqCounts* __restrict__ counts) {
    while (e + 1 < lists && off[e + 1] <= t) ++e;
    RbTile x;
    x.b = e / dims.kv_heads;
    x.h = e - x.b * dims.kv_heads;
    x.first = (t - off[e]) * per;
    x.nm = min(max(miss_count[e], 0), dims.slots);
    x.fc = fetch_count != nullptr && dims.tier > 0 ? min(max(fetch_count[e], 0), x.nm) : x.nm;
    x.outl = counts[x.b].outliers;
    return x;
}

// The miss entry of row p of tile x, row p % c of its miss p / c (cm = rb_div_magic(c)),
// its load issued here and used later (rb_row_place): (-1, -1) for a row past the tile's
// misses or the list.
__device__ __forceinline__ int2 rb_row_miss(const RbTile& x, int p, int per, int cm, const ShadowDims& dims,
                                            const int2* __restrict__ misses) {
    const int j = rb_div(p, cm);
    if (j >= per || x.first + j >= x.nm) return make_int2(-1, -1);
    return misses[((size_t)x.b * dims.kv_heads + x.h) * dims.slots + x.first + j];
}

// (token, row of the head's attention buffer) of row p of tile x from its miss entry m
// (rb_row_miss); token -1 for an empty row (none, or an invalid miss).
__device__ __forceinline__ int2 rb_row_place(const RbTile& x, int2 m, int p, int cm, const ShadowDims& dims) {
    const int c = dims.chunk, i = p - rb_div(p, cm) * c;
    if (m.x < 0 || m.x >= dims.slots || m.y < 0 || m.y >= dims.chunk_cap) return make_int2(-1, 0);
    return make_int2(m.y * c + i, shadow_slot_row(dims, x.outl, m.x) + i);
}

// Copies ranks k0 .. k0 + n of the codes of the tile's rows into buf ([REBUILD_ROWS][stride]
// bytes), each thread pair holding the token t of its row (rb_row: tid / 2; -1: none,
// nothing copied). Rows without a token keep what they held: any byte is a finite code,
// and their products are not stored.
// Where the rank is a multiple of 16, by 16-byte cp.async (u is an allocation of its own,
// 256-byte aligned, so every row is 16-byte aligned), left in flight (the caller commits
// and waits): each warp copies the 16 rows its lanes hold, its lanes on consecutive
// 16-byte pieces of the rows (the tokens of a miss are consecutive rows of u, so a warp's
// copy reads whole sectors, and its lanes' shared stores fall on few banks). (With a
// thread pair to a row, the 32 lanes of a copy read 32 rows 160 bytes apart, two sectors
// for each 16 bytes, and stored 176 bytes apart in shared memory: 31 wavefronts a copy
// where 4 carry its bytes, a quarter of the kernel's shared wavefronts; ncu, H200.)
// Else by byte loads of the thread's own half row, landed on return. Every lane of the
// warp calls it.
__device__ __forceinline__ void rb_codes(unsigned char* buf, int stride, const ShadowSeqBufs& seq,
                                         const ShadowDims& dims, int t, int k0, int n) {
    const int r = dims.rank;
    const signed char* u = reinterpret_cast<const signed char*>(seq.u);
    if ((r & 15) == 0) {
        // r, k0 and so n are multiples of 16; piece g of the warp's rows is piece g % segs of
        // its row g / segs (rb_div: g < 16 segs, segs <= REBUILD_PANEL_RANKS / 16 = 20).
        const int lane = threadIdx.x & 31, row0 = (threadIdx.x >> 5) * 16;
        const int segs = n / 16, sm = rb_div_magic(segs), total = 16 * segs;
#pragma unroll 1
        for (int g0 = 0; g0 < total; g0 += 32) {
            const int g = g0 + lane, i = rb_div(g, sm), q = g - i * segs;
            const int ti = __shfl_sync(0xffffffffu, t, 2 * min(i, 15));
            if (g < total && ti >= 0)
                cp_async16(smem_addr(buf + (row0 + i) * stride + 16 * q), u + (size_t)ti * r + k0 + 16 * q, true);
        }
    } else if (t >= 0) {
        const int half = threadIdx.x & 1, mid = (n + 1) / 2;
        const signed char* src = u + (size_t)t * r + k0;
        unsigned char* dst = buf + (threadIdx.x >> 1) * stride;
        for (int k = half ? mid : 0; k < (half ? n : mid); ++k) dst[k] = static_cast<unsigned char>(src[k]);
    }
}

// The tile row of this thread (a thread pair a row, so a warp holds 16 consecutive rows).
__device__ __forceinline__ int rb_row() { return threadIdx.x >> 1; }

// Starts tile x (cm = rb_div_magic(c)) from the miss entry m of this thread's row
// (rb_row_miss; each thread pair one row): copies the row's codes of ranks 0 .. n into
// `codes` (rb_codes), and stores its token and attention row into tok / arow and
// copies its coefficient scale and, for a tier hit, its entry of the head's GPU value
// tier into usc / tent (RB_NO_TIER: not a tier hit), all by cp.async into the thread's
// open group, so nothing here waits for memory. (Read one after another, the miss
// entry, the sequence's counts and then the scales and tier entries were three round
// trips to global memory before every tile's products: 38 % of the kernel's stall
// samples with the copies of the codes.)
__device__ __forceinline__ void rb_start_tile(const RbTile& x, int2 m, const ShadowDims& dims,
                                              const ShadowSeqBufs* __restrict__ bufs,
                                              const int* __restrict__ tier_src, int cm, unsigned char* codes,
                                              int stride, int n, int* tok, int* arow, int* tent, float* usc) {
    static_assert(REBUILD_THREADS == 2 * REBUILD_ROWS, "two threads a row");
    const int p = rb_row();
    const int2 q = rb_row_place(x, m, p, cm, dims);
    rb_codes(codes, stride, bufs[x.b], dims, q.x, 0, n);
    if ((threadIdx.x & 1) == 0) {
        tok[p] = q.x;
        arow[p] = q.y;
        if (q.x >= 0)
            cp_async4(smem_addr(usc + p), reinterpret_cast<const float*>(bufs[x.b].u_scales) + q.x);
        else
            usc[p] = 0.f;
        const int j = x.first + rb_div(p, cm);  // the row's entry of the list
        if (q.x >= 0 && j >= x.fc)
            cp_async4(smem_addr(tent + p), tier_src + ((size_t)x.b * dims.kv_heads + x.h) * dims.slots + j);
        else
            tent[p] = RB_NO_TIER;
    }
}

// Byte offset in the head's tier of the entry that row table value `ent` names (not
// RB_NO_TIER), clamped to the tier as tier_src is trusted no further.
__device__ __forceinline__ int rb_tier_offset(int ent, const ShadowDims& dims) {
    return min(max(ent, 0), dims.tier - 1) * value_chunk_bytes(dims);
}

// Four codes (one 32-bit word, ranks 4*tq .. 4*tq + 3 of a row) widened to fp16: lo holds
// the first two, hi the last two. A code c becomes exactly the fp16 1024 + (c + 128) by a
// byte permutation of its biased byte (c ^ 0x80) under the exponent byte 0x64, then minus
// 1152.
__device__ __forceinline__ void rb_widen4(unsigned w, unsigned& lo, unsigned& hi) {
    const __half2 bias = __half2half2(__ushort_as_half((unsigned short)0x6480));  // 1152
    const unsigned in = w ^ 0x80808080u;
    unsigned x = __byte_perm(in, 0x64646464u, 0x4140), y = __byte_perm(in, 0x64646464u, 0x4342);
    lo = rb_bits(__hsub2(*reinterpret_cast<__half2*>(&x), bias));
    hi = rb_bits(__hsub2(*reinterpret_cast<__half2*>(&y), bias));
}

// The shared-memory column of sv's column `col` (even; with col + 1 the next): the
// columns are permuted within each warp's group of 8 * PAIRS columns of a half (PAIRS =
// D / 32 n8 tiles), so that the accumulator a thread holds of its PAIRS tiles (columns
// 2*tq, 2*tq + 1 of each) are 2 * PAIRS consecutive columns of the key: column
// 2 * PAIRS * tq + 2 * p + e of the group sits in tile p at column 2 * tq + e. The
// products do not see the order (each output column is its own sum), and rb_store
// writes a row's columns of a half with one 16-byte store (8 bytes at d = 64) where
// it took PAIRS 4-byte ones (the key stores were a fifth of the kernel's time: docs/perf).
template <int D>
__device__ __forceinline__ int rb_sv_col(int col) {
    constexpr int PAIRS = D / 32, GROUP = 8 * PAIRS, HALF = D / 2;
    const int h = col >= HALF ? HALF : 0, c = col - h;
    const int r = c % GROUP, tq = r / (2 * PAIRS), pe = r % (2 * PAIRS);
    return h + 8 * (c / GROUP * PAIRS + (pe >> 1)) + 2 * tq + (pe & 1);
}

// Stages `rows` ranks of the head's sv from rank k0 into sh ([rank][column], row stride
// D + 8, rank k at row rb_sv_row(k), column c at rb_sv_col(c)) as fp16 (round to nearest);
// zero past the rank. SV: the head's first column of rank 0, row stride kvd. BATCH:
// 16-byte loads a thread keeps in flight.
template <int D, int BATCH>
__device__ __forceinline__ void rb_stage_sv(unsigned short* sh, const float* __restrict__ SV, size_t kvd, int r,
                                            int k0, int rows) {
    static_assert(D / 32 >= 2, "a 16-byte load of sv holds two pairs of one group's columns");
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
            unsigned short* row = sh + rb_sv_row(kk) * S;
            *reinterpret_cast<unsigned*>(row + rb_sv_col<D>(col)) = rb_bits(__floats2half2_rn(v.x, v.y));
            *reinterpret_cast<unsigned*>(row + rb_sv_col<D>(col + 2)) = rb_bits(__floats2half2_rn(v.z, v.w));
        }
    }
}

// The warp's products of `ksteps` k16 steps of a panel: its two m16 tiles of rows times
// its PAIRS pairs of n8 tiles (tile j and its rotation partner j + D/16). codes: the
// warp's first row of the tile's codes (row stride `stride` bytes); sa: this lane's
// ldmatrix address in the panel's sv.
template <int D>
__device__ __forceinline__ void rb_mma_panel(float (&acc)[2][D / 32][2][4], const unsigned char* codes, int stride,
                                             unsigned sa, int ksteps) {
    constexpr int PAIRS = D / 32, SV_ROW = (D + 8) * 2;  // bytes
    const int lane = threadIdx.x & 31;
    const unsigned char* a0 = codes + (lane >> 2) * stride + 4 * (lane & 3);
#pragma unroll 2
    for (int ks = 0; ks < ksteps; ++ks) {
        unsigned a[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
            const unsigned char* p = a0 + 16 * m * stride + 16 * ks;
            rb_widen4(*reinterpret_cast<const unsigned*>(p), a[m][0], a[m][2]);
            rb_widen4(*reinterpret_cast<const unsigned*>(p + 8 * stride), a[m][1], a[m][3]);
        }
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            unsigned b[4];  // b0, b1 of tile j, then of its partner
            ldsm_x4_t(b, sa + ks * 16 * SV_ROW + p * 16);
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
// column c0 + 2*p + e (c0 = 8*tile0 + 2*PAIRS*tq: the sv columns' order, rb_sv_col),
// half 1 the same slot of its partner column c0 + 2*p + e + D/2; a row's 2*PAIRS columns
// of each half are stored at once. tok / arow / usc: the tile's rows; ak: row 0 of the
// head's attention keys.
template <int D>
__device__ __forceinline__ void rb_store(const float (&acc)[2][D / 32][2][4], const int* tok, const int* arow,
                                         const float* usc, int row0, int tile0,
                                         __nv_bfloat16* __restrict__ ak) {
    constexpr int PAIRS = D / 32;
    static_assert(PAIRS == 2 || PAIRS == 4, "a row's columns of a half in one 8- or 16-byte store");
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int c0 = 8 * tile0 + 2 * PAIRS * tq;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int row = row0 + 16 * m + 8 * hr + g;
            const int t = tok[row];
            if (t < 0) continue;
            __nv_bfloat16* dst = ak + (size_t)arow[row] * D + c0;
            const float pos = (float)t, sc = usc[row];
            unsigned w0[PAIRS], w1[PAIRS];
#pragma unroll
            for (int p = 0; p < PAIRS; ++p) {
                float o0[2], o1[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float sn, cs;
                    rope_sincos(__fmul_rn(pos, rb_inv[c0 + 2 * p + e]), &sn, &cs);
                    const float x0 = __fmul_rn(acc[m][p][0][2 * hr + e], sc);
                    const float x1 = __fmul_rn(acc[m][p][1][2 * hr + e], sc);
                    o0[e] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
                    o1[e] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
                }
                const __nv_bfloat162 b0 = __floats2bfloat162_rn(o0[0], o0[1]);
                const __nv_bfloat162 b1 = __floats2bfloat162_rn(o1[0], o1[1]);
                w0[p] = *reinterpret_cast<const unsigned*>(&b0);
                w1[p] = *reinterpret_cast<const unsigned*>(&b1);
            }
            if constexpr (PAIRS == 4) {
                *reinterpret_cast<uint4*>(dst) = make_uint4(w0[0], w0[1], w0[2], w0[3]);
                *reinterpret_cast<uint4*>(dst + D / 2) = make_uint4(w1[0], w1[1], w1[2], w1[3]);
            } else {
                *reinterpret_cast<uint2*>(dst) = make_uint2(w0[0], w0[1]);
                *reinterpret_cast<uint2*>(dst + D / 2) = make_uint2(w1[0], w1[1]);
            }
        }
    }
}

// Starts the copy of the tile's tier hits into `buf` (shared, [per][value_chunk_bytes]):
// the whole chunk of each miss that is a tier hit (tent of its first row not RB_NO_TIER), 16 bytes
// a cp.async (2c threads a chunk, per = REBUILD_ROWS / c chunks), so the loads land while
// the tile's products run; rb_copy_tier finishes it after the thread's cp_async_wait.
// tent: the tile's rows (rb_start_tile). Where per does not divide REBUILD_THREADS, the
// last threads get j = per: row j * c is then still below REBUILD_ROWS (for every c up to
// MAX_CHUNK), past the tile's rows, and its tent is RB_NO_TIER, so they copy nothing.
__device__ __forceinline__ void rb_fetch_tier(unsigned char* buf, const int* tent, const ShadowSeqBufs& seq,
                                              const ShadowDims& dims, int h, int per) {
    const int c = dims.chunk, tpc = REBUILD_THREADS / per, j = threadIdx.x / tpc, ent = tent[j * c];
    if (ent != RB_NO_TIER) {
        const int words = value_chunk_bytes(dims) / 16;
        const unsigned char* from =
            reinterpret_cast<const unsigned char*>(shadow_tier_entry(seq, dims, h, 0)) + rb_tier_offset(ent, dims);
        const unsigned to = smem_addr(buf + j * words * 16);
        for (int k = threadIdx.x - j * tpc; k < words; k += tpc) cp_async16(to + k * 16, from + k * 16, true);
    }
    cp_async_commit();
}

// Writes the tile's tier hits, staged in `buf` by rb_fetch_tier, to their slots' values in
// av as they are (8 bits, shadow_slot_values; arow / tent: the tile's rows). Each thread
// copies the words it staged itself (rb_fetch_tier's chunk j and words), so its own
// cp_async_wait is all it waits for: no barrier. (While av held bf16 rows, every row was
// expanded from the staged codes by all the block's threads behind a barrier: 22 % of the
// kernel's stall samples; ncu, H200.) Not inlined: inlined, the sm_80 build spills.
__device__ __noinline__ void rb_copy_tier(const unsigned char* buf, const int* arow, const int* tent,
                                             const ShadowSeqBufs& seq, const ShadowDims& dims, int h) {
    const int c = dims.chunk, tpc = REBUILD_THREADS / (REBUILD_ROWS / c), j = threadIdx.x / tpc;
    if (tent[j * c] == RB_NO_TIER) return;
    const int words = value_chunk_bytes(dims) / 16;
    const uint4* from = reinterpret_cast<const uint4*>(buf + j * words * 16);
    uint4* to = reinterpret_cast<uint4*>(shadow_attn_row(seq.av, dims, h, arow[j * c]));
#pragma unroll 1
    for (int k = threadIdx.x - j * tpc; k < words; k += tpc) to[k] = from[k];
}

// Shared memory of a block (dynamic; sizes in bytes, kp = rb_panel_ranks):
//   codes [2][REBUILD_ROWS][kp + 16] bytes          two tiles' codes           256 (kp + 16)
//   sv    [kp][d + 8] fp16                           the staged panel of sv     2 kp (d + 8)
//   tier  [REBUILD_ROWS / c][value_chunk_bytes]      a tile's tier hits (with a tier)  16896 at d 128, c 8
//   tok, arow, tent [2][REBUILD_ROWS] int, usc [2][REBUILD_ROWS] float  two tiles' rows  4096
//   tiles [3] RbTile                                 a ring of three tiles      96
//   off   [lists + 1] int                            tiles before each list     4 (lists + 1)
// (src/cuda/shadow/rebuild.rs sizes it the same way.)
// (inv_freq, d / 2 floats, is static shared memory: rb_inv.)
struct RbSmem {
    unsigned char* codes;
    unsigned short* sv;
    unsigned char* tier;
    int *tok, *arow, *tent, *off;
    float* usc;
    RbTile* tiles;  // [3]: a ring of the current tile and the next two
};

// Bytes of a tile's staged tier hits: none without a tier.
__device__ __forceinline__ int rb_tier_bytes(const ShadowDims& dims) {
    return dims.tier > 0 ? REBUILD_ROWS / dims.chunk * value_chunk_bytes(dims) : 0;
}

__device__ __forceinline__ RbSmem rb_smem(unsigned char* base, const ShadowDims& dims, int kp) {
    RbSmem s;
    s.codes = base;
    s.sv = reinterpret_cast<unsigned short*>(base + 2 * REBUILD_ROWS * rb_code_stride(kp));
    s.tier = reinterpret_cast<unsigned char*>(s.sv + kp * (dims.head_dim + 8));
    s.tok = reinterpret_cast<int*>(s.tier + rb_tier_bytes(dims));
    s.arow = s.tok + 2 * REBUILD_ROWS;
    s.tent = s.arow + 2 * REBUILD_ROWS;
    s.usc = reinterpret_cast<float*>(s.tent + 2 * REBUILD_ROWS);
    s.tiles = reinterpret_cast<RbTile*>(s.usc + 2 * REBUILD_ROWS);
    s.off = reinterpret_cast<int*>(s.tiles + 3);
    return s;
}

// The block's tiles t0 .. t1 - 1 for head dimension D. Each tile: wait for its codes
// and a barrier; restage sv if the tile's head differs from the staged one (or at every
// panel when the rank needs more than one); start the next tile (its rows, and its codes
// by cp.async into the other buffer) and this tile's tier hits; multiply; scale, rotate
// and store; with a tier, wait for this thread's tier words and write them.
template <int D>
__device__ __forceinline__ void rebuild_tiles(const RbSmem& s, int kp, int lists, int t0, int t1,
                                              const int2* __restrict__ misses, const int* __restrict__ miss_count,
                                              const int* __restrict__ fetch_count, const int* __restrict__ tier_src,
                                              const ShadowSeqBufs* __restrict__ bufs,
                                              const ShadowSeqCounts* __restrict__ counts, const ShadowDims& dims) {
    constexpr int HALF = D / 16, SV_ROW = (D + 8) * 2;  // bytes
    static_assert(REBUILD_ROWS == REBUILD_WARPS / 2 * 32 && REBUILD_THREADS == 2 * REBUILD_ROWS, "warp tiling");
    static_assert(REBUILD_PANEL_RANKS % REBUILD_K_CHUNK == 0, "panels of whole k16 steps, rows of 16 bytes");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row0 = (warp >> 1) * 32;        // the warp's first row of a tile
    const int tile0 = (warp & 1) * (D / 32);  // its first n8 tile
    const int r = dims.rank, per = REBUILD_ROWS / dims.chunk, cm = rb_div_magic(dims.chunk);
    const int panels = (r + kp - 1) / kp;
    const int stride = rb_code_stride(kp), buf_bytes = REBUILD_ROWS * stride;
    const size_t kvd = (size_t)dims.kv_heads * D;
    // Ranks of panel pn, and those rounded up to whole stages of sv (zero past the rank).
    auto panel_ranks = [&](int pn) { return min(kp, r - pn * kp); };
    auto panel_rows = [&](int pn) {
        return min(kp, (panel_ranks(pn) + REBUILD_K_CHUNK - 1) / REBUILD_K_CHUNK * REBUILD_K_CHUNK);
    };

    // ldmatrix address of this lane in sv: rank (lane%8) + 8*((lane/8)%2) at column
    // 8*tile0, or of its partner tile for lanes 16..31 (matrices b0, b1 of tile j, then of
    // j + D/16: ldmatrix.trans gives the column-major B).
    const unsigned sa =
        smem_addr(s.sv) + ((lane & 7) + 8 * ((lane >> 3) & 1)) * SV_ROW + 16 * (tile0 + (lane >> 4) * HALF);

    // The tiles in a ring of three in shared memory: tile ti + 2 is found by thread 0 while
    // tile ti multiplies, so tile ti + 1's rows can be started during tile ti, and every
    // thread reads the tiles after a barrier.
    int walk = 0;  // thread 0: the list of the last tile it found
    if (tid == 0) {
        walk = run_of(s.off, lists, t0);
        s.tiles[0] = rb_tile(s.off, lists, t0, walk, per, dims, miss_count, fetch_count, counts);
        if (t0 + 1 < t1) s.tiles[1] = rb_tile(s.off, lists, t0 + 1, walk, per, dims, miss_count, fetch_count, counts);
    }
    __syncthreads();
    {
        const RbTile first = s.tiles[0];
        const int2 m = rb_row_miss(first, rb_row(), per, cm, dims, misses);
        rb_start_tile(first, m, dims, bufs, tier_src, cm, s.codes, stride, panel_ranks(0), s.tok, s.arow, s.tent,
                      s.usc);
        cp_async_commit();
    }

    int staged = -1;  // list whose sv the one panel holds
    for (int ti = 0, ring = 0; ti < t1 - t0; ++ti, ring = ring == 2 ? 0 : ring + 1) {
        const int par = (ti & 1) * REBUILD_ROWS;  // the tile's rows in tok / arow / tent / usc
        const int np = REBUILD_ROWS - par;        // the next tile's
        const int nring = ring == 2 ? 0 : ring + 1;
        unsigned char* cb = s.codes + (ti & 1) * buf_bytes;
        const bool more = t0 + ti + 1 < t1;
        cp_async_wait<0>();
        __syncthreads();  // the tile, its codes and rows are in; the last tile is done with
                          // the other buffers and its ring entry
        // (Read from shared memory, where thread 0 left it, rather than kept in registers
        // across the products, or found again by every thread.)
        const RbTile cur = s.tiles[ring];
        if (tid == 0 && t0 + ti + 2 < t1)
            s.tiles[nring == 2 ? 0 : nring + 1] =
                rb_tile(s.off, lists, t0 + ti + 2, walk, per, dims, miss_count, fetch_count, counts);
        const int e = cur.b * dims.kv_heads + cur.h;
        const float* sv = reinterpret_cast<const float*>(bufs[cur.b].sv) + (size_t)cur.h * D;
        const bool restage = panels > 1 || e != staged;
        if (restage) {
            rb_stage_sv<D, 10>(s.sv, sv, kvd, r, 0, panel_rows(0));
            staged = e;
        }
        // This tile's tier hits land while the products run (a group of copies of their
        // own: the tile waits for them alone), and so do the next tile's miss entries.
        if (dims.tier > 0) rb_fetch_tier(s.tier, s.tent + par, bufs[cur.b], dims, cur.h, per);
        const int2 next_miss =
            more ? rb_row_miss(s.tiles[nring], rb_row(), per, cm, dims, misses) : make_int2(-1, -1);
        if (restage) __syncthreads();  // sv is staged
        const bool active = __any_sync(0xffffffffu, s.tok[par + row0 + lane] >= 0);
        float acc[2][D / 32][2][4] = {};
        for (int pn = 0; pn < panels; ++pn) {
            if (pn > 0) {
                __syncthreads();  // every warp is done with the panel before
                rb_stage_sv<D, 4>(s.sv, sv, kvd, r, pn * kp, panel_rows(pn));
                rb_codes(cb, stride, bufs[cur.b], dims, s.tok[par + rb_row()], pn * kp, panel_ranks(pn));
                cp_async_commit();
                cp_async_wait<0>();
                __syncthreads();  // the panel's sv and codes are in
            }
            if (active) rb_mma_panel<D>(acc, cb + row0 * stride, stride, sa, (panel_ranks(pn) + 15) / 16);
        }
        // The next tile's codes and rows, copied while this one is stored.
        if (more)
            rb_start_tile(s.tiles[nring], next_miss, dims, bufs, tier_src, cm, s.codes + buf_bytes - (cb - s.codes),
                          stride, panel_ranks(0), s.tok + np, s.arow + np, s.tent + np, s.usc + np);
        cp_async_commit();
        rb_store<D>(acc, s.tok + par, s.arow + par, s.usc + par, row0, tile0,
                    shadow_attn_row(bufs[cur.b].ak, dims, cur.h, 0));
        // (A tile without tier hits waits for nothing and its copy skips every chunk.)
        if (dims.tier > 0) {
            cp_async_wait<1>();  // all but the next tile's codes: this thread's tier words
            rb_copy_tier(s.tier, s.arow + par, s.tent + par, bufs[cur.b], dims, cur.h);
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
    const int kp = rb_panel_ranks(dims.rank);
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
