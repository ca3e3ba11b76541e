// Causal grouped-query flash attention for prefill chunks (FlashAttention-2 style):
// every query row of a chunk attends to its sequence's cached keys up to its own
// position, earlier chunks included.
//
// Layouts (row-major, bf16):
//   q, out   [rows, heads * D]          post-RoPE queries; sequence b's rows consecutive
//   K_b, V_b [len_b, kv_heads * D]      sequence b's cache (k_ptrs[b], v_ptrs[b]), keys
//                                       post-RoPE, this chunk's rows already appended
//   tiles    [n_tiles] int4             (sequence, first row in q, position of that
//                                       row, rows <= BM), built on the host
//
// Grid (heads, n_tiles), WARPS * 32 threads. A block owns BM = WARPS * 16 * MT query
// rows of one head; warp w owns MT m-tiles of 16 rows (FlashAttention-2 gives each
// warp 32 rows: every K/V fragment read from shared memory feeds two mma). Query head h
// reads KV head h / (heads / kv_heads); the heads of one KV head are adjacent in
// blockIdx.x, so they run together and share the K/V tiles in L2. The host orders the
// tiles longest first, so the short ones fill the tail of the launch.
//
// Per block: Q [BM, D] goes to shared memory once (cp.async), then either into
// registers as mma A fragments (Q_REGS) or is re-read per k-step by ldmatrix; K and V
// tiles of BN keys stream through a STAGES-deep cp.async ring, refilled right after the
// one __syncthreads per tile (the stage refilled at tile j was last read at tile j - 1).
// For each tile: S = Q Kᵀ (mma.sync m16n8k16, bf16 in, fp32 accumulate, K fragments by
// ldmatrix), the causal mask on the tiles that cross the warp's diagonal only, online
// softmax in registers in the log2 domain (ex2.approx; O rescaled only when a row
// maximum moved), then O += P V with P re-packed from the S accumulators as bf16 A
// fragments and V fragments by ldmatrix.trans. A warp skips the tiles past its last
// row. Shared memory rows are 16-byte chunks XOR-swizzled by (row & 7), so the cp.async
// stores and the ldmatrix reads are free of bank conflicts.
//
// Keys at or past len and query rows past the tile's rows are zero-filled on load;
// every real row sees key 0, so its softmax sum is positive. Rows past `rows` are
// never written.
#include <cuda_bf16.h>

#include "common.cuh"

#define FP_NEG_INF __int_as_float(0xff800000)

// 2^x; 2^-inf = +0 (the tensor-core product, cp.async and ldmatrix are in common.cuh).
__device__ __forceinline__ float fp_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned fp_pack_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

// One block: WARPS warps of MT m-tiles (16 rows each), K/V ring of STAGES tiles; Q
// either kept in registers as A fragments (Q_REGS) or re-read from shared memory per
// k-step.
template <int D, int WARPS, int MT, int BN, int STAGES, bool Q_REGS>
__device__ __forceinline__ void flash_prefill(__nv_bfloat16* __restrict__ out,
                                              const __nv_bfloat16* __restrict__ q,
                                              const unsigned long long* __restrict__ k_ptrs,
                                              const unsigned long long* __restrict__ v_ptrs,
                                              const int* __restrict__ lens, const int4* __restrict__ tiles,
                                              int heads, int kv_heads, float scale_log2) {
    static_assert(D % 64 == 0, "head dim must be a multiple of 64");
    static_assert(STAGES >= 2, "at least double buffering");
    constexpr int THREADS = WARPS * 32;
    constexpr int WM = 16 * MT;         // rows per warp
    constexpr int BM = WARPS * WM;      // rows per block
    constexpr int CH = D / 8;           // 16-byte chunks per row
    constexpr int KV_TILE = BN * D;     // elements of one K (or V) tile
    constexpr int NK = D / 16;          // k-steps of S = Q Kᵀ; n-tile pairs of P V
    constexpr int NS = BN / 8;          // n-tiles of S
    static_assert(BN % 16 == 0, "K/V tile");
    constexpr int ROW_BYTES = D * 2;
    static_assert((BM * CH) % THREADS == 0 && (BN * CH) % THREADS == 0, "load split");

    extern __shared__ __align__(16) unsigned char fp_smem[];
    __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(fp_smem);  // [BM][D]
    __nv_bfloat16* sK = sQ + BM * D;                                 // [STAGES][BN][D]
    __nv_bfloat16* sV = sK + STAGES * KV_TILE;                       // [STAGES][BN][D]

    const int h = blockIdx.x;
    const int4 tile = tiles[blockIdx.y];
    const int b = tile.x, row0 = tile.y, pos0 = tile.z, nrows = tile.w;
    const int kvh = h / (heads / kv_heads);
    const int len = lens[b];
    const size_t q_stride = (size_t)heads * D;
    const size_t kv_stride = (size_t)kv_heads * D;
    const __nv_bfloat16* qg = q + (size_t)row0 * q_stride + (size_t)h * D;
    const __nv_bfloat16* kg = reinterpret_cast<const __nv_bfloat16*>(k_ptrs[b]) + (size_t)kvh * D;
    const __nv_bfloat16* vg = reinterpret_cast<const __nv_bfloat16*>(v_ptrs[b]) + (size_t)kvh * D;
    const int last = pos0 + nrows - 1;  // position of the block's last real row
    const int n_kv = last / BN + 1;     // K/V tiles holding keys 0..=last

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;  // mma groupID, thread in group

    // ---- asynchronous loads -------------------------------------------------------------
#pragma unroll
    for (int i = 0; i < BM * CH / THREADS; ++i) {
        const int idx = tid + i * THREADS;
        const int r = idx / CH, c = idx % CH;
        const bool ok = r < nrows;
        cp_async16(smem_addr(sQ + r * D + ((c ^ (r & 7)) << 3)), ok ? qg + r * q_stride + c * 8 : qg, ok);
    }
    auto load_kv = [&](int j, int stage) {
        __nv_bfloat16* dk = sK + stage * KV_TILE;
        __nv_bfloat16* dv = sV + stage * KV_TILE;
#pragma unroll
        for (int i = 0; i < BN * CH / THREADS; ++i) {
            const int idx = tid + i * THREADS;
            const int r = idx / CH, c = idx % CH;
            const int key = j * BN + r;
            const bool ok = key < len;
            const size_t off = ok ? (size_t)key * kv_stride + c * 8 : 0;
            const int so = r * D + ((c ^ (r & 7)) << 3);
            cp_async16(smem_addr(dk + so), kg + off, ok);
            cp_async16(smem_addr(dv + so), vg + off, ok);
        }
    };
    // Group s < STAGES - 1 holds tile s (group 0 also Q); groups may be empty.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_kv) load_kv(s, s);
        cp_async_commit();
    }

    // ---- per-lane ldmatrix offsets (bytes), swizzle included ----------------------------
    // Q (A operand, non-trans): matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0..a3.
    // K (B operand, non-trans): matrices (keys 0-7, dims 0-7), (keys 0-7, dims 8-15),
    //   (keys 8-15, dims 0-7), (keys 8-15, dims 8-15) -> b0, b1 of two n-tiles.
    // V (B operand, trans): (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7,
    //   dims 8-15), (keys 8-15, dims 8-15) -> b0, b1 of two n-tiles of the output.
    // Chunk 2s + c of row r sits at chunk (2s + c) ^ (r & 7) = 2s ^ (c ^ (r & 7)); for
    // all three r & 7 = lane & 7, so the per-step part is an XOR with 32·s bytes.
    const int lr = lane & 7;
    const int wr = warp * WM;  // the warp's first row in the block
    const unsigned q_off = (unsigned)((wr + lr + ((lane >> 3) & 1) * 8) * ROW_BYTES);
    const unsigned q_sw = (((lane >> 4) & 1) ^ lr) << 4;
    const unsigned k_off = (unsigned)((lr + ((lane >> 4) & 1) * 8) * ROW_BYTES);
    const unsigned k_sw = (((lane >> 3) & 1) ^ lr) << 4;
    const unsigned v_off = (unsigned)((lr + ((lane >> 3) & 1) * 8) * ROW_BYTES);
    const unsigned v_sw = (((lane >> 4) & 1) ^ lr) << 4;
    const unsigned sQa = smem_addr(sQ) + q_off, sKa = smem_addr(sK) + k_off,
                   sVa = smem_addr(sV) + v_off;

    // This warp's rows: the thread's rows are wr + 16 mt + g (+ 8); the warp skips the
    // tiles past its last real row and masks those that cross its first row's diagonal.
    const bool warp_live = wr < nrows;
    const int warp_pos0 = pos0 + wr;
    const int warp_last = pos0 + min(wr + WM - 1, nrows - 1);
    const int pg = warp_pos0 + g;

    unsigned qf[Q_REGS ? MT : 1][Q_REGS ? NK : 1][4];  // Q A fragments (Q_REGS)
    float o[MT][2 * NK][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2 * NK; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    float m[MT][2], l[MT][2];  // running row maxima (raw scores); the thread's part of row sums
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = FP_NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

    int stage = 0;
    for (int j = 0; j < n_kv; ++j) {
        cp_async_wait<STAGES - 2>();  // tile j (and Q) landed for this thread...
        __syncthreads();                 // ... and for all; every warp is done with tile j - 1
        {
            // Refill the stage tile j - 1 used.
            const int jn = j + STAGES - 1;
            if (jn < n_kv) load_kv(jn, stage == 0 ? STAGES - 1 : stage - 1);
            cp_async_commit();
        }
        if constexpr (Q_REGS) {
            if (j == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kk = 0; kk < NK; ++kk)
                        ldsm_x4(qf[mt][kk], sQa + mt * 16 * ROW_BYTES + (q_sw ^ (kk << 5)));
            }
        }
        const int kb = j * BN;
        if (warp_live && kb <= warp_last) {
            const unsigned kbase = sKa + stage * (KV_TILE * 2);
            const unsigned vbase = sVa + stage * (KV_TILE * 2);
            // ---- S = Q Kᵀ ------------------------------------------------------------------
            float s[MT][NS][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < NS; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < NK; ++kk) {
                unsigned qk[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (Q_REGS) {
                        qk[mt][0] = qf[mt][kk][0];
                        qk[mt][1] = qf[mt][kk][1];
                        qk[mt][2] = qf[mt][kk][2];
                        qk[mt][3] = qf[mt][kk][3];
                    } else {
                        ldsm_x4(qk[mt], sQa + mt * 16 * ROW_BYTES + (q_sw ^ (kk << 5)));
                    }
                }
#pragma unroll
                for (int jp = 0; jp < NS / 2; ++jp) {
                    unsigned kf[4];
                    ldsm_x4(kf, kbase + jp * 16 * ROW_BYTES + (k_sw ^ (kk << 5)));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816(s[mt][2 * jp], qk[mt], kf[0], kf[1]);
                        mma_16816(s[mt][2 * jp + 1], qk[mt], kf[2], kf[3]);
                    }
                }
            }
            // ---- causal mask, on tiles that cross the warp's diagonal only -----------------
            // s[mt][i]: (row 16 mt + g, keys kb + 8i + 2t, +1), (row 16 mt + g + 8, same keys).
            if (kb + BN - 1 > warp_pos0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int p0 = pg + 16 * mt, p1 = p0 + 8;
#pragma unroll
                    for (int i = 0; i < NS; ++i) {
                        const int key = kb + 8 * i + 2 * t;
                        if (key > p0) s[mt][i][0] = FP_NEG_INF;
                        if (key + 1 > p0) s[mt][i][1] = FP_NEG_INF;
                        if (key > p1) s[mt][i][2] = FP_NEG_INF;
                        if (key + 1 > p1) s[mt][i][3] = FP_NEG_INF;
                    }
                }
            }
            // ---- online softmax (log2 domain) ---------------------------------------------
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float mx0 = m[mt][0], mx1 = m[mt][1];
#pragma unroll
                for (int i = 0; i < NS; ++i) {
                    mx0 = fmaxf(mx0, fmaxf(s[mt][i][0], s[mt][i][1]));
                    mx1 = fmaxf(mx1, fmaxf(s[mt][i][2], s[mt][i][3]));
                }
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
                // A row with every key so far masked keeps max -inf: subtract 0 instead,
                // so that exp2(-inf - ms) = 0 rather than NaN.
                const float ms0 = mx0 == FP_NEG_INF ? 0.f : mx0 * scale_log2;
                const float ms1 = mx1 == FP_NEG_INF ? 0.f : mx1 * scale_log2;
                const float alpha0 = fp_exp2(m[mt][0] * scale_log2 - ms0);
                const float alpha1 = fp_exp2(m[mt][1] * scale_log2 - ms1);
                m[mt][0] = mx0;
                m[mt][1] = mx1;
                float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
                for (int i = 0; i < NS; ++i) {
                    s[mt][i][0] = fp_exp2(fmaf(s[mt][i][0], scale_log2, -ms0));
                    s[mt][i][1] = fp_exp2(fmaf(s[mt][i][1], scale_log2, -ms0));
                    s[mt][i][2] = fp_exp2(fmaf(s[mt][i][2], scale_log2, -ms1));
                    s[mt][i][3] = fp_exp2(fmaf(s[mt][i][3], scale_log2, -ms1));
                    sum0 += s[mt][i][0] + s[mt][i][1];
                    sum1 += s[mt][i][2] + s[mt][i][3];
                }
                l[mt][0] = fmaf(l[mt][0], alpha0, sum0);
                l[mt][1] = fmaf(l[mt][1], alpha1, sum1);
                // Rescale O only when some row's maximum moved (rare once the context
                // is long): one vote instead of 4·D multiplies per thread.
                if (__any_sync(0xffffffffu, alpha0 != 1.f || alpha1 != 1.f)) {
#pragma unroll
                    for (int i = 0; i < 2 * NK; ++i) {
                        o[mt][i][0] *= alpha0;
                        o[mt][i][1] *= alpha0;
                        o[mt][i][2] *= alpha1;
                        o[mt][i][3] *= alpha1;
                    }
                }
            }
            // ---- O += P V --------------------------------------------------------------------
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                unsigned pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = fp_pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = fp_pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = fp_pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = fp_pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < NK; ++dp) {
                    unsigned vf[4];
                    ldsm_x4_t(vf, vbase + kk * 16 * ROW_BYTES + (v_sw ^ (dp << 5)));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_16816(o[mt][2 * dp], pa[mt], vf[0], vf[1]);
                        mma_16816(o[mt][2 * dp + 1], pa[mt], vf[2], vf[3]);
                    }
                }
            }
        }
        stage = stage == STAGES - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();  // no copy may still target shared memory at exit

    // ---- normalise and store: o[mt][i] = (row 16 mt + g, dims 8i + 2t, +1), (row + 8, same)
    if (!warp_live) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            float sum = l[mt][hf];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int r = wr + 16 * mt + 8 * hf + g;
            if (r < nrows) {
                const float inv = 1.f / sum;
                unsigned* dst =
                    reinterpret_cast<unsigned*>(out + (size_t)(row0 + r) * q_stride + (size_t)h * D + 2 * t);
#pragma unroll
                for (int i = 0; i < 2 * NK; ++i)
                    dst[4 * i] = fp_pack_bf16(o[mt][i][2 * hf] * inv, o[mt][i][2 * hf + 1] * inv);
            }
        }
    }
}

// Configurations (tools/nvrtc-check prints their registers; none may spill):
//   D = 128: 4 warps x 32 rows (BM = 128), BN = 32, 3 stages, Q re-read from shared
//            memory: 80 KiB of shared memory, 255 registers, 2 blocks per SM.
//   D = 64:  4 warps x 32 rows (BM = 128), BN = 64, 3 stages, Q in registers: 64 KiB.
// (D = 128 with BN = 64 or Q in registers needs more than 255 registers.)
// Dynamic shared memory = (BM + 2 * STAGES * BN) * D * 2 bytes; keep in step with
// PrefillConfig in src/cuda/prefill.rs.
#define FP_KERNEL(DIM, WARPS, MT, BN, STAGES, QREGS, MIN_BLOCKS)                                  \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) flash_prefill_d##DIM(     \
        __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,                       \
        const unsigned long long* __restrict__ k_ptrs, const unsigned long long* __restrict__ v_ptrs, \
        const int* __restrict__ lens, const int4* __restrict__ tiles, int heads, int kv_heads,      \
        float scale_log2) {                                                                         \
        flash_prefill<DIM, WARPS, MT, BN, STAGES, QREGS>(out, q, k_ptrs, v_ptrs, lens, tiles, heads,   \
                                                     kv_heads, scale_log2);                         \
    }

FP_KERNEL(64, 4, 2, 64, 3, true, 2)
FP_KERNEL(128, 4, 2, 32, 3, false, 2)
