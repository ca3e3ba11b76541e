// The reuse diff of the ShadowKV decode step (reference: SlotTable::plan in
// src/shadow/reuse.rs), on the device, one block per (KV head h, sequence b):
// grid (kv_heads, batch), REUSE_THREADS threads, dynamic shared memory 3 * slots ints.
//
// Given the selection selected[b, h, 0..slots) (ascending chunk ids, -1 after the last)
// and the slot table slots[h, 0..slots) of the sequence (chunk per slot, -1 = empty):
//   - a slot holding a selected chunk keeps it (a hit);
//   - every other slot is freed, and the free slots are listed in ascending order;
//   - the selected chunks that are not hits (the misses, in ascending chunk order) take
//     the free slots in that order; free slots left over stay -1.
// The table is updated in place; misses[b, h, j] = (slot, chunk) for j < miss_count[b, h]
// (entries past the count untouched), and the hits are added to *hits.
#include "pdl.cuh"
#include "shadow.cuh"

#define REUSE_THREADS 256

// Index of `c` in the ascending sel[0..k), or -1.
__device__ __forceinline__ int find_chunk(const int* sel, int k, int c) {
    int lo = 0, hi = k;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (sel[mid] < c) lo = mid + 1; else hi = mid;
    }
    return lo < k && sel[lo] == c ? lo : -1;
}

extern "C" __global__ void __launch_bounds__(REUSE_THREADS)
    shadow_reuse(int2* __restrict__ misses, int* __restrict__ miss_count, unsigned long long* __restrict__ hits,
                 const int* __restrict__ selected, const ShadowSeqBufs* __restrict__ bufs, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    extern __shared__ int smem[];
    __shared__ int scratch[32];
    const int h = blockIdx.x, b = blockIdx.y;
    const int S = dims.slots, tid = threadIdx.x, nt = blockDim.x;
    const size_t row = (size_t)b * dims.kv_heads + h;
    int* sel = smem;               // [S] the selection
    int* is_hit = smem + S;        // [S] per selected entry: already resident
    int* free_slot = smem + 2 * S; // [S] the free slots, ascending
    int* table = reinterpret_cast<int*>(bufs[b].slots) + (size_t)h * S;
    const int* sel_in = selected + row * S;

    int mine = 0;
    for (int i = tid; i < S; i += nt) {
        const int c = sel_in[i];
        sel[i] = c;
        is_hit[i] = 0;
        mine += c >= 0;
    }
    int k;
    block_exclusive_sum(mine, scratch, &k);  // its barriers publish sel and is_hit

    // Hits keep their slot; every other slot is freed and listed.
    int nfree = 0;
    for (int t0 = 0; t0 < S; t0 += nt) {
        const int s = t0 + tid;
        bool freed = false;
        if (s < S) {
            const int c = table[s];
            const int idx = c >= 0 ? find_chunk(sel, k, c) : -1;
            if (idx >= 0) {
                is_hit[idx] = 1;
            } else {
                freed = true;
                table[s] = -1;
            }
        }
        int total;
        const int r = nfree + block_exclusive_sum(freed, scratch, &total);
        if (freed) free_slot[r] = s;
        nfree += total;
    }
    __syncthreads();

    // Misses, in selection order, take the free slots in order.
    int nmiss = 0;
    for (int t0 = 0; t0 < k; t0 += nt) {
        const int i = t0 + tid;
        const bool miss = i < k && !is_hit[i];
        int total;
        const int r = nmiss + block_exclusive_sum(miss, scratch, &total);
        if (miss && r < nfree) {  // always, unless the table held a chunk twice
            const int s = free_slot[r];
            table[s] = sel[i];
            misses[row * S + r] = make_int2(s, sel[i]);
        }
        nmiss += total;
    }
    if (tid == 0) {
        miss_count[row] = nmiss;
        if (k > nmiss) atomicAdd(hits, (unsigned long long)(k - nmiss));
    }
}
