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
// (entries past the count untouched), and the hits are added to hits[0].
//
// With a GPU value tier (dims.tier = T > 0; layout in shadow.cuh) each miss is looked up
// in the sequence's tier first (before this step changes it). The list then holds first
// the fetch_count[b, h] misses to fetch from the host, in ascending chunk order, then the
// tier_count[b, h] tier hits (their entry in tier_src[b, h, j]), in ascending chunk order; the j-th fetched
// chunk, j < T, replaces tier entry (tier_next + j) % T (the table is updated here, the
// values by the fetch; tier_base[b, h] = tier_next before the step), tier_next moves on,
// and the tier hits are added to hits[1]. A chunk found in an entry that this step's fetch
// replaces is fetched instead (the smallest n >= the misses not in the tier such that n =
// those + the hits in the first min(n, T) entries from tier_next), so the tier copy and the
// fetch touch distinct entries and may run at once. Without a tier every miss is fetched
// (fetch_count = miss_count) and the list is as above.
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
    shadow_reuse(int2* __restrict__ misses, int* __restrict__ miss_count, int* __restrict__ fetch_count,
                 int* __restrict__ tier_count, int* __restrict__ tier_src, int* __restrict__ tier_base, unsigned long long* __restrict__ hits,
                 const int* __restrict__ selected, const ShadowSeqBufs* __restrict__ bufs, ShadowDims dims) {
    pdl_wait();
    pdl_trigger();
    extern __shared__ int smem[];
    __shared__ int scratch[32];
    __shared__ int base;
    const int h = blockIdx.x, b = blockIdx.y;
    const int S = dims.slots, tid = threadIdx.x, nt = blockDim.x;
    const size_t row = (size_t)b * dims.kv_heads + h;
    int* sel = smem;               // [S] the selection
    int* is_hit = smem + S;        // [S] per selected entry: 1 resident, 2 + e in tier entry e, 0 else
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

    // Tier lookup of the misses, before this step changes the tier.
    const int T = dims.tier;
    int* tmap = T > 0 ? reinterpret_cast<int*>(bufs[b].tier_map) + (size_t)h * dims.chunk_cap : nullptr;
    int* towner = T > 0 ? reinterpret_cast<int*>(bufs[b].tier_owner) + (size_t)h * T : nullptr;
    int to_fetch = 0;
    for (int i = tid; i < k; i += nt) {
        if (is_hit[i] == 1) continue;
        const int c = sel[i];
        const int e = T > 0 && c < dims.chunk_cap ? tmap[c] : -1;
        is_hit[i] = e >= 0 && e < T ? 2 + e : 0;
        to_fetch += is_hit[i] == 0;
    }
    if (tid == 0) base = T > 0 ? reinterpret_cast<int*>(bufs[b].tier_next)[h] % T : 0;
    int nfetch;
    block_exclusive_sum(to_fetch, scratch, &nfetch);  // its barriers publish is_hit and base

    // Hits in the entries the fetch replaces are fetched instead: n grows to its fixed
    // point (each round takes in only the hits of the entries newly covered: usually one
    // or two rounds, at most one per hit). A tier of fewer entries than a step fetches
    // is then all covered and gives no hits.
    if (T > 0) {
        int n = nfetch;
        for (;;) {
            const int covered = min(n, T);
            int doomed = 0;
            for (int i = tid; i < k; i += nt)
                doomed += is_hit[i] >= 2 && (is_hit[i] - 2 - base + T) % T < covered;
            int total;
            block_exclusive_sum(doomed, scratch, &total);
            if (nfetch + total == n) break;
            n = nfetch + total;
        }
        const int covered = min(n, T);
        for (int i = tid; i < k; i += nt)
            if (is_hit[i] >= 2 && (is_hit[i] - 2 - base + T) % T < covered) is_hit[i] = 0;
        nfetch = n;
        __syncthreads();
    }

    // Misses, in selection order, take the free slots in order; fetched ones first in the
    // list, tier hits after them.
    int nmiss = 0, nf = 0, nt_hit = 0;
    for (int t0 = 0; t0 < k; t0 += nt) {
        const int i = t0 + tid;
        const int code = i < k ? is_hit[i] : 1;
        const bool miss = code != 1, fetched = code == 0, tiered = code >= 2;
        int total, total_f, total_t;
        const int r = nmiss + block_exclusive_sum(miss, scratch, &total);
        const int rf = nf + block_exclusive_sum(fetched, scratch, &total_f);
        const int rt = nt_hit + block_exclusive_sum(tiered, scratch, &total_t);
        if (miss && r < nfree) {  // always, unless the table held a chunk twice
            const int s = free_slot[r], c = sel[i];
            table[s] = c;
            const int at = fetched ? rf : nfetch + rt;
            misses[row * S + at] = make_int2(s, c);
            if (tiered) tier_src[row * S + at] = code - 2;
            // A fetched one's place in the list, for the tier's update below (each thread
            // its own entries of is_hit).
            if (fetched) is_hit[i] = -1 - rf;
        }
        nmiss += total;
        nf += total_f;
        nt_hit += total_t;
    }
    if (T > 0) {
        // The j-th fetched chunk, j < T, replaces entry (base + j) % T: first every replaced
        // entry's chunk leaves the map (it may be one fetched again now), then each fetched
        // chunk enters it. Distinct entries for distinct fetched chunks.
        __syncthreads();
        for (int i = tid; i < k; i += nt) {
            const int rf = -1 - is_hit[i];
            if (rf < 0 || rf >= T) continue;
            const int old = towner[(base + rf) % T];
            if (old >= 0 && old < dims.chunk_cap) tmap[old] = -1;
        }
        __syncthreads();
        for (int i = tid; i < k; i += nt) {
            const int rf = -1 - is_hit[i];
            if (rf < 0 || rf >= T) continue;
            const int e = (base + rf) % T, c = sel[i];
            if (c >= dims.chunk_cap) continue;  // as the lookup: never in the tier
            tmap[c] = e;
            towner[e] = c;
        }
    }
    if (tid == 0) {
        miss_count[row] = nmiss;
        fetch_count[row] = nf;
        tier_count[row] = nt_hit;
        tier_base[row] = base;
        if (T > 0) reinterpret_cast<int*>(bufs[b].tier_next)[h] = (base + min(nf, T)) % T;
        if (k > nmiss) atomicAdd(hits, (unsigned long long)(k - nmiss));
        if (nt_hit > 0) atomicAdd(hits + 1, (unsigned long long)nt_hit);
    }
}
