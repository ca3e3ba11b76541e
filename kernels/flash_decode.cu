// Flash-decoding: one query token per sequence attending over that sequence's whole
// bf16 KV cache, split along the context into partitions that run in parallel, then
// merged by a second kernel with a log-sum-exp reduction.
//
// Layouts (row-major, bf16 unless noted):
//   q        [batch, heads * D]               post-RoPE queries, heads = kv_heads * group
//   K_b, V_b [len_b, kv_heads * D]            sequence b's cache (k_ptrs[b], v_ptrs[b])
//   o_part   [batch, heads, max_parts, D]     fp32 un-normalised partial outputs
//   ml_part  [batch, heads, max_parts]        fp32 (max, sum) of each partition, log2 domain
//   out      [batch, heads * D]
//
// Split kernel: grid (max_parts, kv_heads, batch), 128 threads (4 warps). A block owns
// one (sequence, KV head, partition of part_len tokens) and all `group` query heads of
// that KV head (GQA), so each K/V byte is read once for the whole group. Both products
// run on the tensor cores with mma.sync m16n8k16 (bf16 in, fp32 accumulate), the query
// heads padded to n = 8:
//   1. S = K Qᵀ per 16-token tile (A = K rows straight from global memory, 16-byte
//      loads, B = the queries held in registers) -> scores in shared memory,
//      pre-multiplied by log2(e)/sqrt(D);
//   2. per head: max and exp2 over the partition, P kept in shared memory;
//   3. Oᵀ = Vᵀ Pᵀ per tile (A = V rows re-packed in registers with byte permutes,
//      B = P converted to bf16), then summed over the four warps.
// Within one mma the order of the k index is free as long as both operands use the
// same one, so the loads are laid out for 16-byte coalesced reads and the fragments
// are built from them without shuffles.
//
// Values in 8 bits (the _q8 kernels, ShadowKV's attention rows, kv_heads = 1 per entry):
// the first dense[b] rows of V_b are bf16 rows as above; the rows after them are chunks of
// `chunk` rows, chunk k in the value pools' 8-bit format (chunk * D codes in token order,
// then a fp32 scale per token) in place at the first bytes of its `chunk` bf16 rows; their
// bytes are about half (pv_q8_tiles).
//
// Values still coming (the _q8 kernels with mode > 0): a ShadowKV step fetches some of
// its slots' values while the GPU already attends, in two passes. Entry b's pending slots
// are the first pend_count[b] entries of its miss list pend_list[b * slots ..] (slot,
// chunk); mode 1 attends every row but those of a pending slot (it runs before the fetch
// lands, and reads none of their keys or values), mode 2 only those rows (after it),
// gathered in partitions of their own (as long as the launch gives: part_len and the grid
// are the pass's): its row x is token x % chunk of the slot of pending entry x / chunk
// (a block first stages its rows' entries in shared memory), so it costs what they are.
// Each pass writes its own set of partials (from part_base; max_parts is the stride of a
// head's), and the merge takes both (FdParts). A row left out has the score -inf; a
// partition with no row to attend writes (max -inf, sum 0) alone, and the merge skips
// partials of weight 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "pdl.cuh"

#define FD_WARPS 4
#define FD_THREADS (FD_WARPS * 32)
#define FD_HEADS 8  // query heads per block after padding (mma n)
#define FD_NEG_INF __int_as_float(0xff800000)
#define FD_PEND_WORDS 128  // pending slots of an entry, as bits: at most 4096 slots
#define FD_PEND_SLOTS 1028  // mode 2: the slots of a partition's pending entries (<= 1024 / chunk + 2)

// Whether slot k (>= 0) is among the pending ones (bits).
__device__ __forceinline__ bool k_pending(const unsigned* pend, int k) { return (pend[k >> 5] >> (k & 31)) & 1u; }

__device__ __forceinline__ unsigned word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

// The fp16 pair (c0 / 256, c1 / 256) of the codes in bytes k, k + 1 of a word of biased
// codes (code + 128), SEL = 0x4140 for k = 0, 0x4342 for k = 2: under the exponent byte
// 0x44 a byte b is the fp16 4 + b / 256, exactly; minus 4.5.
template <unsigned SEL>
__device__ __forceinline__ unsigned q8_pair(unsigned biased) {
    const unsigned x = __byte_perm(biased, 0x44444444u, SEL);
    const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&x), __half2half2(__ushort_as_half(0x4480)));
    return *reinterpret_cast<const unsigned*>(&v);
}

// Phase 3 of the _q8 kernels over a partition's 8-bit rows [dd, n) (row dd is row x0 of
// the entry's chunks, which start at vchunks; rows rs bf16 apart), in tiles of 16 rows from
// row dd, the warps taking them in turn; adds to o. The products run on the fp16 tensor
// cores: A = the codes / 256 (exact in fp16), B = P · scale · 256 of each token in fp16
// (P <= 1; the factor keeps small products out of fp16's subnormals), so the
// dequantisation is one byte permutation and one fp16 subtraction per two values.
// (Widened to bf16(code · scale) value by value, as a bf16 copy would hold them, the
// attention took 1.5× as long as on bf16 rows: 4.76 against 3.15 ms a step at
// 57 × 61440, H200.) sp: the scores' row of the thread's head g.
template <int D, typename SlotOf>
__device__ __forceinline__ void pv_q8_tiles(float (&o)[D / 16][4], const float* sp, const unsigned char* vchunks,
                                            size_t rs, int dd, int x0, int n, int chunk, SlotOf slot_of) {
    constexpr int NKC = D / 16, NVH = D / 64;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3, g = lane >> 2;
    const int ntq = (n - dd + 15) >> 4;
    for (int tile = warp; tile < ntq; tile += 2 * FD_WARPS) {
        unsigned cw[2][4][2 * NVH];  // biased codes: [tile][row r][chunk c, word]
        float sc[2][4];              // the rows' scales (0 past n)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int tb = dd + (tile + u * FD_WARPS) * 16;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = tb + 2 * t + (r & 1) + 8 * (r >> 1);
                // Token i of slot k (a row the pass leaves out is read as zeros).
                const unsigned x = row < n ? row - dd + x0 : 0;
                unsigned i;
                const int k = slot_of(x, i);
                const bool in = row < n && k >= 0;
                const unsigned char* cb = vchunks + (size_t)max(k, 0) * chunk * rs * 2;
                sc[u][r] = in ? __ldg(reinterpret_cast<const float*>(cb + chunk * D) + i) : 0.f;
#pragma unroll
                for (int c = 0; c < NVH; ++c) {
                    const uint2 v = in ? __ldg(reinterpret_cast<const uint2*>(cb + i * D + c * 64 + g * 8))
                                       : make_uint2(0u, 0u);
                    cw[u][r][2 * c] = v.x ^ 0x80808080u;
                    cw[u][r][2 * c + 1] = v.y ^ 0x80808080u;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int tb = dd + (tile + u * FD_WARPS) * 16;
            if (tile + u * FD_WARPS >= ntq) break;
            float ps[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = tb + 2 * t + (r & 1) + 8 * (r >> 1);
                ps[r] = row < n ? sp[row] * sc[u][r] * 256.f : 0.f;
            }
            const __half2 h0 = __floats2half2_rn(ps[0], ps[1]), h1 = __floats2half2_rn(ps[2], ps[3]);
            const unsigned b0 = *reinterpret_cast<const unsigned*>(&h0), b1 = *reinterpret_cast<const unsigned*>(&h1);
#pragma unroll
            for (int mt = 0; mt < NKC; ++mt) {
                // Dims 2w, 2w + 1 of the eight: bytes 2 (w % 2), + 1 of word w / 2; tokens
                // (2t, 2t + 1) and (2t + 8, 2t + 9) interleaved byte by byte.
                const int c = mt >> 2, w = mt & 3, cw_i = 2 * c + (w >> 1);
                const unsigned y01 = __byte_perm(cw[u][0][cw_i], cw[u][1][cw_i], (w & 1) ? 0x7362u : 0x5140u);
                const unsigned y23 = __byte_perm(cw[u][2][cw_i], cw[u][3][cw_i], (w & 1) ? 0x7362u : 0x5140u);
                const unsigned a[4] = {q8_pair<0x4140>(y01), q8_pair<0x4342>(y01), q8_pair<0x4140>(y23),
                                       q8_pair<0x4342>(y23)};
                mma_16816_f16(o[mt], a, b0, b1);
            }
        }
    }
}

// Shared memory (floats): stat[FD_HEADS * 2] then a region used first for the score
// matrix S[FD_HEADS][part_len + 4] and afterwards for the cross-warp reduction
// red[FD_WARPS][FD_HEADS][D].
template <int D, bool Q8>
__device__ __forceinline__ void flash_decode_split(float* __restrict__ o_part,
                                                   float2* __restrict__ ml_part,
                                                   const __nv_bfloat16* __restrict__ q,
                                                   const unsigned long long* __restrict__ k_ptrs,
                                                   const unsigned long long* __restrict__ v_ptrs,
                                                   const int* __restrict__ lens, int kv_heads,
                                                   int group, int part_len, int max_parts,
                                                   float scale_log2, const int* __restrict__ dense,
                                                   int chunk, const int2* __restrict__ pend_list,
                                                   const int* __restrict__ pend_count, int slots, int mode,
                                                   int part_base) {
    static_assert(D % 64 == 0, "head dim must be a multiple of 64");
    constexpr int NCH = D / 32;  // 16-byte chunks per K row per thread (phase 1)
    constexpr int NKC = D / 16;  // k-steps of phase 1, m-tiles of phase 3
    constexpr int NVH = D / 64;  // 16-byte chunks per V row per thread (phase 3)
    extern __shared__ float smem[];
    // Mode 1: the entry's pending slots as bits; mode 2: the slot of each pending entry the
    // partition's rows come from (-1: none).
    __shared__ unsigned pend[FD_PEND_SLOTS];
    float* stat = smem;
    float* S = smem + 2 * FD_HEADS;
    float* red = S;
    const int SP = part_len + 4;  // padded row: conflict-free score stores

    pdl_wait();
    pdl_trigger();
    const int part = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int heads = kv_heads * group;
    const size_t head0 = (size_t)b * heads + (size_t)kvh * group;
    const int full = lens[b];
    const int start = part * part_len;
    // The merge reads no partial past the entry's rows, but every one of the pending pass.
    if (start >= full && !(Q8 && mode == 2)) return;
    // Mode 2 attends the pending slots' rows gathered: its row x is token x % chunk of the
    // slot of pending entry x / chunk. A partition past them attends nothing.
    const int2* plist = pend_list + (size_t)b * slots;
    const int len = Q8 && mode == 2 ? min(max(pend_count[b], 0), slots) * chunk : full;
    if (start >= len) {
        if (threadIdx.x < group)
            ml_part[(head0 + threadIdx.x) * max_parts + part_base + part] = make_float2(FD_NEG_INF, 0.f);
        return;
    }
    const int n = min(part_len, len - start);
    const int ntile = (n + 15) >> 4;
    const size_t rs = (size_t)kv_heads * D;  // cache row stride (elements)
    // K from the entry's first row (rows found by entry_row), V from the partition's.
    const __nv_bfloat16* K = reinterpret_cast<const __nv_bfloat16*>(k_ptrs[b]) + (size_t)kvh * D;
    const __nv_bfloat16* V =
        reinterpret_cast<const __nv_bfloat16*>(v_ptrs[b]) + (size_t)start * rs + (size_t)kvh * D;
    // Q8: this partition's rows before the 8-bit chunks (mode 2: none, and its rows count
    // from the first pending one), the chunks' first byte, and ceil(2^32 / chunk) (a
    // row's chunk by __umulhi: exact below 2^32 / chunk rows).
    const int first = Q8 ? dense[b] : 0;
    const int dn = Q8 ? (mode == 2 ? -start : first - start) : n;
    const int nchunks = Q8 && chunk > 0 ? (full - first) / chunk : 0;
    const unsigned char* vchunks =
        reinterpret_cast<const unsigned char*>(reinterpret_cast<const __nv_bfloat16*>(v_ptrs[b]) +
                                               (size_t)first * rs);
    const unsigned cmag = Q8 && chunk > 1 ? 0xffffffffu / (unsigned)chunk + 1u : 0u;
    const int words = min((slots + 31) >> 5, FD_PEND_WORDS);  // mode 1: bits of the slots
    if (Q8 && mode == 1) {  // the pending slots as bits
        for (int i = threadIdx.x; i < words; i += FD_THREADS) pend[i] = 0u;
        __syncthreads();
        const int np = min(max(pend_count[b], 0), slots);
        for (int j = threadIdx.x; j < np; j += FD_THREADS) {
            const int k = plist[j].x;
            if (k >= 0 && k < 32 * words) atomicOr(&pend[k >> 5], 1u << (k & 31));
        }
        __syncthreads();
    }
    // Mode 2: the partition's rows come from pending entries j0 .. j0 + nj - 1.
    const bool gathered = Q8 && mode == 2 && chunk > 0;
    const int j0 = gathered ? start / chunk : 0;
    const int nj = gathered ? min((start + n - 1) / chunk - j0 + 1, FD_PEND_SLOTS) : 0;
    if (gathered) {
        for (int j = threadIdx.x; j < nj; j += FD_THREADS) {
            const int k = plist[j0 + j].x;
            pend[j] = k >= 0 && k < nchunks ? (unsigned)k : ~0u;
        }
        __syncthreads();
    }
    // The slot of the pass's 8-bit row x (x from the entry's first 8-bit row; in mode 2
    // from the first pending one) and, in i, the row's token in it; -1: the row is not
    // attended in this pass.
    auto slot_of = [&](unsigned x, unsigned& i) -> int {
        const unsigned j = chunk > 1 ? __umulhi(x, cmag) : x;
        i = x - j * chunk;
        if (mode == 2) {  // (x past the partition's rows: a row past n, not read)
            const int jj = (int)j - j0;
            return jj >= 0 && jj < nj ? (int)pend[jj] : -1;
        }
        return mode == 1 && j < 32u * words && k_pending(pend, (int)j) ? -1 : (int)j;
    };
    // The entry row of the partition's row r, or -1 where the pass leaves it out.
    auto entry_row = [&](int r) -> int {
        if (!Q8 || mode == 0 || r < dn) return start + r;
        unsigned i;
        const int k = slot_of((unsigned)(r - dn), i);
        return k < 0 ? -1 : first + k * chunk + (int)i;
    };

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;  // mma groupID, thread-in-group

    // ---- phase 1: scores -------------------------------------------------------------
    // Query fragments (B operand, n = head g): logical k 2t+e of k-step 2i+j is dim
    // i*32 + t*8 + 4j + e, and k 2t+8+e is dim i*32 + t*8 + 4j + 2 + e.
    unsigned qf[NKC][2];
    {
        const bool has = g < group;
        const __nv_bfloat16* qr = q + (size_t)b * heads * D + (size_t)(kvh * group + (has ? g : 0)) * D;
#pragma unroll
        for (int i = 0; i < NCH; ++i) {
            const uint4 v = load16(qr + i * 32 + t * 8, has);
            qf[2 * i][0] = v.x;
            qf[2 * i][1] = v.y;
            qf[2 * i + 1][0] = v.z;
            qf[2 * i + 1][1] = v.w;
        }
    }
    for (int tile = warp; tile < ntile; tile += 2 * FD_WARPS) {
        uint4 kr[2][2][NCH];  // [tile of the pair][row g, row g+8][chunk]
        bool ok[2][2];        // the rows are attended in this pass
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int tb = (tile + u * FD_WARPS) * 16;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = tb + g + 8 * h;
                const int er = row < n ? entry_row(row) : -1;
                ok[u][h] = er >= 0;
                const __nv_bfloat16* kp = K + (size_t)max(er, 0) * rs + t * 8;
#pragma unroll
                for (int i = 0; i < NCH; ++i) kr[u][h][i] = load16(kp + i * 32, ok[u][h]);
            }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int tb = (tile + u * FD_WARPS) * 16;
            if (tb >= ntile * 16) break;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int i = 0; i < NCH; ++i) {
                mma_16816(acc, kr[u][0][i].x, kr[u][1][i].x, kr[u][0][i].y, kr[u][1][i].y, qf[2 * i][0],
                          qf[2 * i][1]);
                mma_16816(acc, kr[u][0][i].z, kr[u][1][i].z, kr[u][0][i].w, kr[u][1][i].w,
                          qf[2 * i + 1][0], qf[2 * i + 1][1]);
            }
            // acc: (token g, head 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1); -inf for a row
            // the pass leaves out (and past n, where only the exponentials read: 0).
            const bool k0 = ok[u][0], k1 = ok[u][1];
            S[(2 * t) * SP + tb + g] = k0 ? acc[0] * scale_log2 : FD_NEG_INF;
            S[(2 * t + 1) * SP + tb + g] = k0 ? acc[1] * scale_log2 : FD_NEG_INF;
            S[(2 * t) * SP + tb + g + 8] = k1 ? acc[2] * scale_log2 : FD_NEG_INF;
            S[(2 * t + 1) * SP + tb + g + 8] = k1 ? acc[3] * scale_log2 : FD_NEG_INF;
        }
    }
    __syncthreads();

    // ---- phase 2: softmax statistics per real head ------------------------------------
    for (int h = warp; h < group; h += FD_WARPS) {
        float* row = S + h * SP;
        float m = FD_NEG_INF;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, row[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float l = 0.f;
        for (int i = lane; i < ntile * 16; i += 32) {
            const float p = i < n && m != FD_NEG_INF ? exp2f(row[i] - m) : 0.f;
            row[i] = p;
            l += p;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) {
            stat[2 * h] = m;
            stat[2 * h + 1] = l;
        }
    }
    // Padding heads (group..7) hold scores of a zero query (0, or -inf on rows left out
    // and past n, where their products may give NaN): they only feed output columns that
    // are discarded.
    __syncthreads();

    // ---- phase 3: P·V -----------------------------------------------------------------
    // A operand = Vᵀ (m = dim, k = token). Thread (g, t) reads tokens 2t, 2t+1, 2t+8,
    // 2t+9 of the tile, dims [c*64 + g*8, +8) for each chunk c; m-tile mt covers word
    // mt%4 of chunk mt/4: row m = g is the even dim of that word, m = g+8 the odd one.
    // Q8: the bf16 rows [0, dd) in tiles from row 0, then the 8-bit rows [dd, n) in tiles
    // from row dd (pv_q8_tiles).
    float o[NKC][4];
#pragma unroll
    for (int mt = 0; mt < NKC; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
    const int dd = Q8 ? min(max(dn, 0), n) : n;  // rows with bf16 values
    const int ntd = Q8 && mode == 2 ? 0 : (dd + 15) >> 4;  // mode 2: no bf16 row takes part
    for (int tile = warp; tile < ntd; tile += 2 * FD_WARPS) {
        uint4 vr[2][4][NVH];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int tb = (tile + u * FD_WARPS) * 16;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = tb + 2 * t + (r & 1) + 8 * (r >> 1);
                const __nv_bfloat16* vp = V + (size_t)row * rs + g * 8;
#pragma unroll
                for (int c = 0; c < NVH; ++c) vr[u][r][c] = load16(vp + c * 64, row < dd);
            }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int tb = (tile + u * FD_WARPS) * 16;
            if (tb >= ntd * 16) break;
            // B operand = Pᵀ (k = token, n = head g).
            const float* pr = S + g * SP + tb + 2 * t;
            const unsigned b0 = pack_bf16(pr[0], pr[1]);
            const unsigned b1 = pack_bf16(pr[8], pr[9]);
#pragma unroll
            for (int mt = 0; mt < NKC; ++mt) {
                const int c = mt >> 2, w = mt & 3;
                const unsigned x0 = word(vr[u][0][c], w), x1 = word(vr[u][1][c], w);
                const unsigned x2 = word(vr[u][2][c], w), x3 = word(vr[u][3][c], w);
                mma_16816(o[mt], __byte_perm(x0, x1, 0x5410), __byte_perm(x0, x1, 0x7632),
                          __byte_perm(x2, x3, 0x5410), __byte_perm(x2, x3, 0x7632), b0, b1);
            }
        }
    }
    if (Q8) pv_q8_tiles<D>(o, S + g * SP, vchunks, rs, dd, dd - dn, n, chunk, slot_of);
    __syncthreads();  // everyone is done with S: reuse it as red
    // o[mt]: (dim pd, head 2t), (pd, 2t+1), (pd+1, 2t), (pd+1, 2t+1), pd = c*64 + g*8 + 2w
#pragma unroll
    for (int mt = 0; mt < NKC; ++mt) {
        const int pd = (mt >> 2) * 64 + g * 8 + 2 * (mt & 3);
        float* r0 = red + ((size_t)warp * FD_HEADS + 2 * t) * D + pd;
        *reinterpret_cast<float2*>(r0) = make_float2(o[mt][0], o[mt][2]);
        *reinterpret_cast<float2*>(r0 + D) = make_float2(o[mt][1], o[mt][3]);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < group * D; idx += FD_THREADS) {
        const int h = idx / D, dd = idx - h * D;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < FD_WARPS; ++w) s += red[((size_t)w * FD_HEADS + h) * D + dd];
        o_part[((head0 + h) * max_parts + part_base + part) * D + dd] = s;
    }
    if (threadIdx.x < group)
        ml_part[(head0 + threadIdx.x) * max_parts + part_base + part] =
            make_float2(stat[2 * threadIdx.x], stat[2 * threadIdx.x + 1]);
}

#define FD_SPLIT(NAME, DIM, Q8)                                                                  \
    extern "C" __global__ void __launch_bounds__(FD_THREADS, 4) NAME(                              \
        float* __restrict__ o_part, float2* __restrict__ ml_part,                                  \
        const __nv_bfloat16* __restrict__ q, const unsigned long long* __restrict__ k_ptrs,        \
        const unsigned long long* __restrict__ v_ptrs, const int* __restrict__ lens,               \
        int kv_heads, int group, int part_len, int max_parts, float scale_log2,                    \
        const int* __restrict__ dense, int chunk, const int2* __restrict__ pend_list,              \
        const int* __restrict__ pend_count, int slots, int mode, int part_base) {                  \
        flash_decode_split<DIM, Q8>(o_part, ml_part, q, k_ptrs, v_ptrs, lens, kv_heads, group,     \
                                    part_len, max_parts, scale_log2, dense, chunk, pend_list,      \
                                    pend_count, slots, mode, part_base);                           \
    }

FD_SPLIT(flash_decode_split_d64, 64, false)
FD_SPLIT(flash_decode_split_d128, 128, false)
FD_SPLIT(flash_decode_split_q8_d64, 64, true)
FD_SPLIT(flash_decode_split_q8_d128, 128, true)

// The partials a head merges: the first nparts of its own partitions, then (a two-pass
// attention) the pending pass's nparts2 from place base2. Every head's partials are
// stride apart.
struct FdParts {
    int nparts, nparts2, base2;
    __device__ __forceinline__ int count() const { return nparts + nparts2; }
    // The place of the v-th partial read.
    __device__ __forceinline__ int at(int v) const { return v < nparts ? v : base2 + v - nparts; }
};

// Merge: grid (heads, batch), block (head_dim, S): S slices of head_dim threads split
// the partials between them. Dynamic shared memory: stride + S * head_dim floats.
// out = sum_p 2^(m_p - M) o_p / sum_p 2^(m_p - M) l_p over the partials of weight above 0
// (a partial with nothing attended may have left o_p unwritten). Empty sequences give
// zeros.
extern "C" __global__ void flash_decode_reduce(__nv_bfloat16* __restrict__ out,
                                               const float* __restrict__ o_part,
                                               const float2* __restrict__ ml_part,
                                               const int* __restrict__ lens, int heads, int head_dim,
                                               int part_len, int stride, int base2, int nparts2) {
    pdl_wait();
    pdl_trigger();
    extern __shared__ float smem[];
    float* wgt = smem;           // [stride]
    float* red = smem + stride;  // [S][head_dim]
    __shared__ float scratch[32];
    __shared__ float bcast;
    const int h = blockIdx.x, b = blockIdx.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int nthreads = blockDim.x * blockDim.y;
    const size_t bh = (size_t)b * heads + h;
    __nv_bfloat16* dst = out + bh * head_dim;
    const int len = lens[b];
    if (len <= 0) {
        for (int d = tid; d < head_dim; d += nthreads) dst[d] = __float2bfloat16_rn(0.f);
        return;
    }
    const FdParts parts{(len + part_len - 1) / part_len, nparts2, base2};
    const int nall = parts.count();
    auto at = [&](int v) { return parts.at(v); };
    const float2* ml = ml_part + bh * stride;
    const int lane = tid & 31, warp = tid >> 5, nwarps = (nthreads + 31) >> 5;

    float m = FD_NEG_INF;
    for (int v = tid; v < nall; v += nthreads) m = fmaxf(m, ml[at(v)].x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) scratch[warp] = m;
    __syncthreads();
    if (tid == 0) {
        float v = scratch[0];
        for (int w = 1; w < nwarps; ++w) v = fmaxf(v, scratch[w]);
        bcast = v;
    }
    __syncthreads();
    m = bcast;
    float l = 0.f;
    for (int v = tid; v < nall; v += nthreads) {
        const float2 x = ml[at(v)];
        const float w = x.x == FD_NEG_INF ? 0.f : exp2f(x.x - m);
        wgt[v] = w;
        l += w * x.y;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    __syncthreads();  // scratch reuse and wgt visibility
    if (lane == 0) scratch[warp] = l;
    __syncthreads();
    if (tid == 0) {
        float v = 0.f;
        for (int w = 0; w < nwarps; ++w) v += scratch[w];
        bcast = v;
    }
    __syncthreads();
    const float inv = 1.f / bcast;
    const float* op = o_part + bh * stride * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc0 = 0.f, acc1 = 0.f;
        int v = threadIdx.y;
        if (nparts2 == 0) {
            for (; v + (int)blockDim.y < nall; v += 2 * blockDim.y) {
                acc0 += wgt[v] * op[(size_t)v * head_dim + d];
                acc1 += wgt[v + blockDim.y] * op[(size_t)(v + blockDim.y) * head_dim + d];
            }
            if (v < nall) acc0 += wgt[v] * op[(size_t)v * head_dim + d];
        } else {
            for (; v < nall; v += blockDim.y)
                if (wgt[v] > 0.f) acc0 += wgt[v] * op[(size_t)at(v) * head_dim + d];
        }
        red[threadIdx.y * head_dim + d] = acc0 + acc1;
    }
    __syncthreads();
    if (threadIdx.y == 0) {
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float acc = 0.f;
            for (int s = 0; s < (int)blockDim.y; ++s) acc += red[s * head_dim + d];
            dst[d] = __float2bfloat16_rn(acc * inv);
        }
    }
}

// Merge of a few partials a head (at most the host's FEW_PARTS, as a ShadowKV step's attention
// has): grid (heads, batch), head_dim threads, each merging its dimension over every
// partial and finding their maximum and sum itself (the partials' statistics are the same
// words for the whole block): no shared memory, no barrier. Arguments and result as
// flash_decode_reduce's.
extern "C" __global__ void flash_decode_reduce_few(__nv_bfloat16* __restrict__ out,
                                                   const float* __restrict__ o_part,
                                                   const float2* __restrict__ ml_part,
                                                   const int* __restrict__ lens, int heads, int head_dim,
                                                   int part_len, int stride, int base2, int nparts2) {
    pdl_wait();
    pdl_trigger();
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    if (d >= head_dim) return;
    const size_t bh = (size_t)b * heads + h;
    const int len = lens[b];
    if (len <= 0) {
        out[bh * head_dim + d] = __float2bfloat16_rn(0.f);
        return;
    }
    const FdParts parts{(len + part_len - 1) / part_len, nparts2, base2};
    const int nall = parts.count();
    const float2* ml = ml_part + bh * stride;
    float m = FD_NEG_INF;
    for (int v = 0; v < nall; ++v) m = fmaxf(m, ml[parts.at(v)].x);
    const float* op = o_part + bh * stride * head_dim + d;
    float l = 0.f, acc = 0.f;
    for (int v = 0; v < nall; ++v) {
        const int p = parts.at(v);
        const float2 x = ml[p];
        const float w = x.x == FD_NEG_INF ? 0.f : exp2f(x.x - m);
        l += w * x.y;  // (a NaN partial makes the output NaN, as in flash_decode_reduce)
        if (w > 0.f) acc += w * op[(size_t)p * head_dim];
    }
    out[bh * head_dim + d] = __float2bfloat16_rn(acc * (1.f / l));
}
