// Key rebuild of the missed chunks of the ShadowKV decode step, on the tensor cores
// (reference: LowRank::rebuild in src/shadow/factor.rs, then Rope::tables / Rope::apply).
//
// For each miss (slot, chunk) of KV head h of sequence b, the chunk's rows
// t = chunk * c + i (i < c) are rebuilt from the low-rank pre-RoPE keys,
//   k[t, :] = u[t, 0..rank) . sv[0..rank, h*d .. (h+1)*d)     (fp32 accumulation),
// rotated at position t (Hugging Face rotate-half, the arithmetic of rope.cu) and
// stored as bf16 to ak[h, slot_row(slot) + i, :].
//
// Grid (ceil(slots / M), kv_heads, batch), M = REBUILD_ROWS / c misses a block, block of
// REBUILD_WARPS warps. Block x of head h takes the misses x*M .. x*M + M - 1 of the
// head's list with their rows stacked: block row p is row p % c of miss p / c. Rows past
// M*c, past the list or of an invalid miss are empty (u staged as zero, nothing stored).
//
// The product [REBUILD_ROWS, rank] x [rank, d] runs on mma.sync m16n8k8 TF32 with fp32
// accumulation. u's bf16 values are exact in TF32. sv is split into two TF32 terms,
// hi = rna(sv) and lo = rna(sv - hi) (|sv - hi - lo| <= 2^-22 |sv|), and u multiplies
// both (two mma a k-step): hi alone (2^-11) leaves errors up to 8x the tolerance of
// tests/cuda_shadow.rs on rotated keys that cancel, hi + lo is as close as fp32 sums.
//
// Warp w computes block rows 32*(w/2) .. 32*(w/2) + 31 (two m16 tiles) and, of the d/16
// n8 tiles of the first half of the head, those of (w%2)*d/32 .. (w%2+1)*d/32 - 1
// together with their rotation partners, tile j + d/16 for tile j: in the m16n8
// accumulator a thread holds columns 8*j + 2*(lane%4) + {0,1} of tile j at rows lane/4
// and lane/4 + 8, so column j' < d/2 and its partner j' + d/2 sit in the same thread and
// slot, and the rotation is done in registers. The rank is walked in tiles of
// REBUILD_K_TILE staged in shared memory (hi and lo of the head's d columns of sv, as
// TF32; u of the block's rows, as bf16); two blocks share an SM, so one stages while the
// other multiplies. A warp with no row to rebuild skips the multiplication.
#include <cuda_bf16.h>

#include "pdl.cuh"
#include "shadow.cuh"

#define REBUILD_ROWS 128  // block rows: 8 warps x 32
#define REBUILD_WARPS 8
#define REBUILD_THREADS (REBUILD_WARPS * 32)
#define REBUILD_K_TILE 32
#define REBUILD_MAX_DIM 128
// Shared row strides: the B fragment reads (k = lane%4 (+4), n = lane/4) hit banks
// 8*(lane%4) + lane/4 with sv rows of 8 mod 32 words; the A fragment reads (row = lane/4
// (+8), k = lane%4 (+4)) hit banks 20*(lane/4) + (lane%4)/2 with u rows of 20 mod 32
// words (bf16 pairs share a word): no conflicts.
#define REBUILD_SV_STRIDE (REBUILD_MAX_DIM + 8)  // words
#define REBUILD_U_STRIDE (REBUILD_K_TILE + 8)    // bf16 values

struct RebuildSmem {
    unsigned sv_hi[REBUILD_K_TILE][REBUILD_SV_STRIDE];  // TF32 bits, [rank in tile][column]
    unsigned sv_lo[REBUILD_K_TILE][REBUILD_SV_STRIDE];
    unsigned short u[REBUILD_ROWS][REBUILD_U_STRIDE];  // bf16 bits, [row][rank in tile]
    int tok[REBUILD_ROWS];   // token of block row p (its row of u, its position), -1 = empty
    int arow[REBUILD_ROWS];  // its row of the head's attention buffer
};

__device__ __forceinline__ unsigned rb_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

// d += a . b on the tensor cores: a [16 x 8] row-major, b [8 x 8] column-major, TF32.
__device__ __forceinline__ void rb_mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Loads a thread's 16-byte pieces of the u rows of the rank tile from k0 (zero past the
// rank or for an empty row) into registers, where `vec` (the rank keeps rows 16-byte
// aligned); nothing otherwise.
template <int PARTS, int LOADS>
__device__ __forceinline__ void rb_load_u(uint4 (&ur)[LOADS], const RebuildSmem& s,
                                          const unsigned short* __restrict__ U, int r, int k0, int tid, bool vec) {
    if (!vec) return;
#pragma unroll
    for (int q = 0; q < LOADS; ++q) {
        const int i = tid + q * REBUILD_THREADS, row = i / PARTS, k = (i % PARTS) * 8;
        const int tok = s.tok[row];
        ur[q] = tok >= 0 && k0 + k < r ? *reinterpret_cast<const uint4*>(U + (size_t)tok * r + k0 + k)
                                       : make_uint4(0u, 0u, 0u, 0u);
    }
}

// The block's work once the rows are in s.tok / s.arow, for head dimension D. U: the
// sequence's u (bf16 bits); SV: its sv from the head's first column (row stride kvd);
// ak: row 0 of the head's attention keys.
template <int D>
__device__ __forceinline__ void rebuild_rows(RebuildSmem& s, const unsigned short* __restrict__ U,
                                             const float* __restrict__ SV, size_t kvd, int r,
                                             const float* __restrict__ inv_freq, __nv_bfloat16* __restrict__ ak) {
    constexpr int QUADS = D / 4;                                        // float4 of an sv row
    constexpr int SV_LOADS = REBUILD_K_TILE * QUADS / REBUILD_THREADS;  // a thread's, per tile
    constexpr int U_ROW_STEP = REBUILD_THREADS / REBUILD_K_TILE;        // rows staged at once
    constexpr int U_LOADS = REBUILD_ROWS / U_ROW_STEP;                  // a thread's, per tile
    constexpr int U_PARTS = REBUILD_K_TILE / 8;                         // 16-byte pieces of a u row's tile
    constexpr int U_VLOADS = REBUILD_ROWS * U_PARTS / REBUILD_THREADS;  // a thread's, per tile
    constexpr int PAIRS = D / 32;  // rotation pairs of n8 tiles a warp computes
    constexpr int HALF = D / 16;   // n8 tiles of half a head
    static_assert(SV_LOADS * REBUILD_THREADS == REBUILD_K_TILE * QUADS, "sv tile split evenly");
    static_assert(U_LOADS * U_ROW_STEP == REBUILD_ROWS, "u tile split evenly");
    static_assert(U_VLOADS * REBUILD_THREADS == REBUILD_ROWS * U_PARTS, "u tile split evenly in 16-byte pieces");
    static_assert(REBUILD_ROWS == REBUILD_WARPS / 2 * 32 && D <= REBUILD_MAX_DIM, "warp tiling");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;  // mma groupID, thread in group
    const int row0 = (warp >> 1) * 32;       // the warp's first block row
    const int tile0 = (warp & 1) * PAIRS;    // its first n8 tile
    const int uk = tid % REBUILD_K_TILE, urow = tid / REBUILD_K_TILE;  // what it stages of u
    const bool active = __any_sync(0xffffffffu, s.tok[row0 + lane] >= 0);

    float acc[2][PAIRS][2][4];  // [m16 tile][pair][half][mma slot]
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int p = 0; p < PAIRS; ++p)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][p][e / 4][e % 4] = 0.f;

    // Software pipeline: where the rank keeps u's rows 16-byte aligned, the next rank
    // tile's u (gathered rows, from HBM) is loaded into registers while this tile's
    // products run; sv (one matrix a head, mostly in L2) is loaded when staged.
    const bool vec_u = (r & 7) == 0;
    uint4 ur[U_VLOADS];
    rb_load_u<U_PARTS, U_VLOADS>(ur, s, U, r, 0, tid, vec_u);
    for (int k0 = 0; k0 < r; k0 += REBUILD_K_TILE) {
        // Stage the rank tile from k0, zero past the rank or for an empty row: sv split
        // into TF32 hi and lo, u as it is.
#pragma unroll
        for (int q = 0; q < SV_LOADS; ++q) {
            const int i = tid + q * REBUILD_THREADS, kk = i / QUADS, col = (i % QUADS) * 4;
            const float4 v = k0 + kk < r ? *reinterpret_cast<const float4*>(SV + (size_t)(k0 + kk) * kvd + col)
                                         : make_float4(0.f, 0.f, 0.f, 0.f);
            uint4 hi, lo;
            hi.x = rb_tf32(v.x);
            hi.y = rb_tf32(v.y);
            hi.z = rb_tf32(v.z);
            hi.w = rb_tf32(v.w);
            lo.x = rb_tf32(v.x - __uint_as_float(hi.x));
            lo.y = rb_tf32(v.y - __uint_as_float(hi.y));
            lo.z = rb_tf32(v.z - __uint_as_float(hi.z));
            lo.w = rb_tf32(v.w - __uint_as_float(hi.w));
            *reinterpret_cast<uint4*>(&s.sv_hi[kk][col]) = hi;
            *reinterpret_cast<uint4*>(&s.sv_lo[kk][col]) = lo;
        }
        if (vec_u) {
#pragma unroll
            for (int q = 0; q < U_VLOADS; ++q) {
                const int i = tid + q * REBUILD_THREADS, row = i / U_PARTS, k = (i % U_PARTS) * 8;
                *reinterpret_cast<uint4*>(&s.u[row][k]) = ur[q];
            }
        } else {
#pragma unroll
            for (int q = 0; q < U_LOADS; ++q) {
                const int row = urow + q * U_ROW_STEP, tok = s.tok[row];
                s.u[row][uk] = tok >= 0 && k0 + uk < r ? U[(size_t)tok * r + k0 + uk] : 0;
            }
        }
        __syncthreads();
        if (k0 + REBUILD_K_TILE < r) rb_load_u<U_PARTS, U_VLOADS>(ur, s, U, r, k0 + REBUILD_K_TILE, tid, vec_u);
        if (active) {
            // One k-step at a time (32 mma each): unrolled, the loads run ahead and the
            // registers pass the 128 that two blocks an SM allow.
#pragma unroll 1
            for (int ks = 0; ks < REBUILD_K_TILE; ks += 8) {
                // A fragments: bf16 bits widened to fp32, exact TF32 values.
                unsigned a[2][4];
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const unsigned short* ua = &s.u[row0 + 16 * m + g][ks + tq];
                    a[m][0] = (unsigned)ua[0] << 16;
                    a[m][1] = (unsigned)ua[8 * REBUILD_U_STRIDE] << 16;
                    a[m][2] = (unsigned)ua[4] << 16;
                    a[m][3] = (unsigned)ua[8 * REBUILD_U_STRIDE + 4] << 16;
                }
#pragma unroll
                for (int p = 0; p < PAIRS; ++p) {
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const int n = (tile0 + p + hf * HALF) * 8 + g;
                        const unsigned h0 = s.sv_hi[ks + tq][n], h1 = s.sv_hi[ks + tq + 4][n];
                        const unsigned l0 = s.sv_lo[ks + tq][n], l1 = s.sv_lo[ks + tq + 4][n];
#pragma unroll
                        for (int m = 0; m < 2; ++m) {
                            rb_mma(acc[m][p][hf], a[m], l0, l1);
                            rb_mma(acc[m][p][hf], a[m], h0, h1);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

    // Rotate and store: slot 2*hr + e of tile (tile0 + p) holds row g + 8*hr, column j + e,
    // the same slot of its partner tile column j + e + D/2.
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int row = row0 + 16 * m + 8 * hr + g;
            const int tok = s.tok[row];
            if (tok < 0) continue;
            __nv_bfloat16* dst = ak + (size_t)s.arow[row] * D;
            const float pos = (float)tok;
#pragma unroll
            for (int p = 0; p < PAIRS; ++p) {
                const int j = (tile0 + p) * 8 + 2 * tq;
                float o0[2], o1[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float sn, cs;
                    sincosf(__fmul_rn(pos, inv_freq[j + e]), &sn, &cs);
                    const float x0 = acc[m][p][0][2 * hr + e], x1 = acc[m][p][1][2 * hr + e];
                    o0[e] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
                    o1[e] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
                }
                *reinterpret_cast<__nv_bfloat162*>(dst + j) = __floats2bfloat162_rn(o0[0], o0[1]);
                *reinterpret_cast<__nv_bfloat162*>(dst + j + D / 2) = __floats2bfloat162_rn(o1[0], o1[1]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(REBUILD_THREADS, 2)
    shadow_rebuild(const int2* __restrict__ misses, const int* __restrict__ miss_count,
                   const ShadowSeqBufs* __restrict__ bufs, const ShadowSeqCounts* __restrict__ counts,
                   const float* __restrict__ inv_freq, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    __shared__ __align__(16) RebuildSmem s;
    const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int d = dims.head_dim, c = dims.chunk;
    const size_t row = (size_t)b * dims.kv_heads + h;
    const int nm = min(miss_count[row], dims.slots);
    const int per = REBUILD_ROWS / c;  // misses a block
    const int first = blockIdx.x * per;
    if (first >= nm) return;
    if (tid < REBUILD_ROWS) {
        const int j = tid / c, i = tid - j * c;
        int tok = -1, arow = 0;
        if (j < per && first + j < nm) {
            const int2 m = misses[row * dims.slots + first + j];
            if (m.x >= 0 && m.x < dims.slots && m.y >= 0 && m.y < dims.chunk_cap) {  // else not a miss
                tok = m.y * c + i;
                arow = shadow_slot_row(dims, counts[b].outliers, m.x) + i;
            }
        }
        s.tok[tid] = tok;
        s.arow[tid] = arow;
    }
    __syncthreads();
    const unsigned short* U = reinterpret_cast<const unsigned short*>(bufs[b].u);  // bf16 bits
    const float* SV = reinterpret_cast<const float*>(bufs[b].sv) + (size_t)h * d;
    const size_t kvd = (size_t)dims.kv_heads * d;
    __nv_bfloat16* ak = shadow_attn_row(bufs[b].ak, dims, h, 0);
    if (d == 128)
        rebuild_rows<128>(s, U, SV, kvd, dims.rank, inv_freq, ak);
    else if (d == 64)
        rebuild_rows<64>(s, U, SV, kvd, dims.rank, inv_freq, ak);
}
