//! Device buffers of the ShadowKV state ([`LayerBuffers`]), the batch table the
//! decode kernels read ([`ShadowTable`]) and the buffers that carry a decode step from
//! one stage to the next ([`StepScratch`]).

use super::layout::{SeqAddrs, SeqCounts, ShadowLayout};
use crate::cuda::attention::DecodeWorkspace;
use crate::cuda::CudaOps;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PinnedHostSlice};
use half::bf16;
use std::marker::PhantomData;

/// One sequence's ShadowKV buffers for one layer, sized by a [`ShadowLayout`] (whose
/// documentation gives each one's layout).
pub struct LayerBuffers {
    layout: ShadowLayout,
    /// Landmark codes `[kv_heads, chunk_cap, d]`.
    pub marks: CudaSlice<i8>,
    /// Landmark scales `[kv_heads, chunk_cap]`.
    pub mark_scales: CudaSlice<f32>,
    /// Outlier flags `[kv_heads, chunk_cap]`.
    pub outlier: CudaSlice<u8>,
    /// Low-rank coefficients `[chunk_cap·c, rank]`, 8-bit codes.
    pub u: CudaSlice<i8>,
    /// The coefficients' scales, one per token, `[chunk_cap·c]`.
    pub u_scales: CudaSlice<f32>,
    /// The fold's coefficients of the chunk it folds, before rounding, `[c, rank]`.
    pub fold_u: CudaSlice<f32>,
    /// Basis `[rank, kv_heads·d]`.
    pub sv: CudaSlice<f32>,
    /// Slot table `[kv_heads, S]`.
    pub slots: CudaSlice<i32>,
    /// Attention keys `[kv_heads, rows_cap, d]`.
    pub ak: CudaSlice<bf16>,
    /// Attention values `[kv_heads, rows_cap, d]`.
    pub av: CudaSlice<bf16>,
    /// Pre-RoPE keys of the recent window `[R, kv_heads·d]`.
    pub kpre: CudaSlice<bf16>,
    /// The GPU value tier, where the layout has one.
    pub tier: Option<TierBuffers>,
}

/// One sequence's GPU value tier for one layer (`T` = the layout's `tier` entries per
/// KV head; see [`ShadowLayout`]).
pub struct TierBuffers {
    /// Values of the chunk each entry holds, `[kv_heads, T]` chunks in the pool's 8-bit
    /// format ([`ShadowLayout::value_chunk_bytes`] each).
    pub values: CudaSlice<u8>,
    /// The entry holding each chunk, -1 = none, `[kv_heads, chunk_cap]`.
    pub map: CudaSlice<i32>,
    /// The chunk each entry holds, -1 = empty, `[kv_heads, T]`.
    pub owner: CudaSlice<i32>,
    /// The entry the next fetched chunk replaces, `[kv_heads]`.
    pub next: CudaSlice<i32>,
}

impl TierBuffers {
    /// An empty tier for `layout` (which has one).
    fn new(ops: &CudaOps, layout: &ShadowLayout) -> Result<Self> {
        let dev = ops.device();
        let mut t = TierBuffers {
            values: dev.zeros(layout.tier_len())?,
            map: dev.zeros(layout.tier_map_len())?,
            owner: dev.zeros(layout.tier_owner_len())?,
            next: dev.zeros(layout.tier_next_len())?,
        };
        t.clear(ops)?;
        Ok(t)
    }

    /// Empties the tier: no chunk in any entry (the values are left as they are).
    fn clear(&mut self, ops: &CudaOps) -> Result<()> {
        let dev = ops.device();
        for b in [&mut self.map, &mut self.owner] {
            let p = b.device_ptr_mut(dev.stream()).0;
            ops.fill_raw_u32(p, b.len(), u32::MAX)?;
        }
        Ok(())
    }
}

impl LayerBuffers {
    /// Zeroed buffers for `layout`, with every slot (and tier entry) empty (-1).
    pub fn new(ops: &CudaOps, layout: ShadowLayout) -> Result<Self> {
        layout.validate()?;
        let dev = ops.device();
        let mut slots = dev.zeros::<i32>(layout.slots_len())?;
        let p = slots.device_ptr_mut(dev.stream()).0;
        ops.fill_raw_u32(p, slots.len(), u32::MAX)?;
        Ok(LayerBuffers {
            layout,
            marks: dev.zeros(layout.marks_len())?,
            mark_scales: dev.zeros(layout.mark_scales_len())?,
            outlier: dev.zeros(layout.outlier_len())?,
            u: dev.zeros(layout.u_len())?,
            u_scales: dev.zeros(layout.u_scales_len())?,
            fold_u: dev.zeros(layout.fold_u_len())?,
            sv: dev.zeros(layout.sv_len())?,
            slots,
            ak: dev.zeros(layout.attn_len())?,
            av: dev.zeros(layout.attn_len())?,
            kpre: dev.zeros(layout.kpre_len())?,
            tier: if layout.tier > 0 {
                Some(TierBuffers::new(ops, &layout)?)
            } else {
                None
            },
        })
    }

    /// The layout the buffers were made for.
    pub fn layout(&self) -> &ShadowLayout {
        &self.layout
    }

    /// Adds an empty GPU value tier of `chunks` entries per KV head to buffers made
    /// without one; the layout becomes the same with that tier.
    pub fn add_tier(&mut self, ops: &CudaOps, chunks: usize) -> Result<()> {
        ensure!(
            self.tier.is_none(),
            "these ShadowKV buffers already have a GPU value tier"
        );
        let layout = self.layout.with_tier(chunks)?;
        if chunks > 0 {
            self.tier = Some(TierBuffers::new(ops, &layout)?);
        }
        self.layout = layout;
        Ok(())
    }

    /// Empties its GPU value tier, if it has one (no chunk in any entry).
    pub fn clear_tier(&mut self, ops: &CudaOps) -> Result<()> {
        self.tier.as_mut().map_or(Ok(()), |t| t.clear(ops))
    }

    /// Checks that every buffer still holds its layout's size (the fields are public,
    /// so a buffer may have been replaced).
    pub fn check(&self) -> Result<()> {
        let l = &self.layout;
        for (name, have, need) in [
            ("marks", self.marks.len(), l.marks_len()),
            ("mark_scales", self.mark_scales.len(), l.mark_scales_len()),
            ("outlier", self.outlier.len(), l.outlier_len()),
            ("u", self.u.len(), l.u_len()),
            ("u_scales", self.u_scales.len(), l.u_scales_len()),
            ("fold_u", self.fold_u.len(), l.fold_u_len()),
            ("sv", self.sv.len(), l.sv_len()),
            ("slots", self.slots.len(), l.slots_len()),
            ("ak", self.ak.len(), l.attn_len()),
            ("av", self.av.len(), l.attn_len()),
            ("kpre", self.kpre.len(), l.kpre_len()),
        ] {
            ensure!(
                have >= need,
                "ShadowKV buffer {name}: {have} elements, the layout needs {need}"
            );
        }
        match &self.tier {
            None => ensure!(l.tier == 0, "ShadowKV buffers without the layout's value tier"),
            Some(t) => {
                for (name, have, need) in [
                    ("tier", t.values.len(), l.tier_len()),
                    ("tier map", t.map.len(), l.tier_map_len()),
                    ("tier owner", t.owner.len(), l.tier_owner_len()),
                    ("tier next", t.next.len(), l.tier_next_len()),
                ] {
                    ensure!(
                        need > 0 && have >= need,
                        "ShadowKV buffer {name}: {have} elements, the layout needs {need}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The buffers' device addresses.
    pub fn addrs(&self, ops: &CudaOps) -> SeqAddrs {
        let s = ops.device().stream();
        let t = self.tier.as_ref();
        SeqAddrs {
            marks: self.marks.device_ptr(s).0,
            mark_scales: self.mark_scales.device_ptr(s).0,
            outlier: self.outlier.device_ptr(s).0,
            u: self.u.device_ptr(s).0,
            u_scales: self.u_scales.device_ptr(s).0,
            fold_u: self.fold_u.device_ptr(s).0,
            sv: self.sv.device_ptr(s).0,
            slots: self.slots.device_ptr(s).0,
            ak: self.ak.device_ptr(s).0,
            av: self.av.device_ptr(s).0,
            kpre: self.kpre.device_ptr(s).0,
            tier: t.map_or(0, |t| t.values.device_ptr(s).0),
            tier_map: t.map_or(0, |t| t.map.device_ptr(s).0),
            tier_owner: t.map_or(0, |t| t.owner.device_ptr(s).0),
            tier_next: t.map_or(0, |t| t.next.device_ptr(s).0),
        }
    }
}

/// The sequences of a batch at one layer, as the batched kernels read them: device
/// arrays of each sequence's buffer addresses and counts (one launch covers the batch,
/// and the arrays keep their addresses, so a step can be captured in a CUDA graph).
/// The kernels write the buffers through it: it borrows them so that they outlive it.
pub struct ShadowTable<'a> {
    layout: ShadowLayout,
    /// Device addresses of the address array and the count array (`SeqAddrs` and
    /// `SeqCounts` of each sequence, as words).
    addrs: u64,
    counts: u64,
    /// The words' allocation when the table has its own ([`ShadowTable::new`]); none
    /// when they lie in a [`ShadowTables`] upload, which keeps them.
    own: Option<CudaSlice<u64>>,
    host_counts: Vec<SeqCounts>,
    _bufs: PhantomData<&'a LayerBuffers>,
}

/// Words of a sequence's [`SeqAddrs`] and of its [`SeqCounts`] in a table's arrays.
const ADDR_WORDS: usize = std::mem::size_of::<SeqAddrs>() / 8;
const COUNT_WORDS: usize = std::mem::size_of::<SeqCounts>() / 8;

/// A batch's entries checked against its layout: the layout, and the words of its
/// address array then its count array.
fn table_words(ops: &CudaOps, seqs: &[(&LayerBuffers, SeqCounts)]) -> Result<(ShadowLayout, Vec<u64>)> {
    ensure!(!seqs.is_empty(), "a ShadowKV batch needs at least one sequence");
    let layout = *seqs[0].0.layout();
    ensure!(
        seqs.len() <= 65_535 && seqs.len() * layout.kv_heads <= 12_000,
        "a batch of {} sequences × {} KV heads is too large for one launch",
        seqs.len(),
        layout.kv_heads
    );
    let mut words = Vec::with_capacity(seqs.len() * (ADDR_WORDS + COUNT_WORDS));
    for (i, (b, c)) in seqs.iter().enumerate() {
        ensure!(
            *b.layout() == layout,
            "sequence {i}: buffers of another layout ({:?}, the batch's is {layout:?})",
            b.layout()
        );
        b.check()?;
        layout.check_counts(i, c)?;
        words.extend(addr_words(&b.addrs(ops)));
    }
    for (_, c) in seqs {
        words.extend(count_words(c));
    }
    Ok((layout, words))
}

/// A sequence's addresses as the words of `ShadowSeqBufs`, in field order.
fn addr_words(a: &SeqAddrs) -> [u64; ADDR_WORDS] {
    [
        a.marks,
        a.mark_scales,
        a.outlier,
        a.u,
        a.u_scales,
        a.fold_u,
        a.sv,
        a.slots,
        a.ak,
        a.av,
        a.kpre,
        a.tier,
        a.tier_map,
        a.tier_owner,
        a.tier_next,
    ]
}

/// A sequence's counts as the words of `ShadowSeqCounts` (little-endian pairs of i32).
fn count_words(c: &SeqCounts) -> [u64; COUNT_WORDS] {
    let pair = |lo: i32, hi: i32| (lo as u32 as u64) | ((hi as u32 as u64) << 32);
    [pair(c.chunks, c.recent), pair(c.outliers, c.pool_seq)]
}

const _: () = assert!(ADDR_WORDS == 15 && COUNT_WORDS == 2, "SeqAddrs and SeqCounts as words");

/// Many tables (a step's layers, its micro-batches) whose arrays go to the device in
/// one upload: a step makes about a hundred, and an upload each cost milliseconds
/// between steps, with the GPU idle.
pub struct ShadowTables<'a> {
    tables: Vec<ShadowTable<'a>>,
    /// The tables' words; their addresses point into it.
    _words: CudaSlice<u64>,
}

impl<'a> ShadowTables<'a> {
    /// One table per entry of `batches`, as [`ShadowTable::new`] would make each.
    pub fn new(ops: &CudaOps, batches: &[Vec<(&'a LayerBuffers, SeqCounts)>]) -> Result<Self> {
        let mut all = Vec::new();
        let mut parts = Vec::with_capacity(batches.len());
        for seqs in batches {
            let (layout, words) = table_words(ops, seqs)?;
            parts.push((layout, all.len(), seqs.iter().map(|s| s.1).collect::<Vec<_>>()));
            all.extend(words);
        }
        let words = ops.device().upload(&all)?;
        let base = words.device_ptr(ops.device().stream()).0;
        let tables = parts
            .into_iter()
            .map(|(layout, at, host_counts)| {
                let addrs = base + 8 * at as u64;
                ShadowTable {
                    layout,
                    addrs,
                    counts: addrs + (8 * ADDR_WORDS * host_counts.len()) as u64,
                    own: None,
                    host_counts,
                    _bufs: PhantomData,
                }
            })
            .collect();
        Ok(ShadowTables { tables, _words: words })
    }

    /// The tables, in the order of the batches they were made from.
    pub fn tables(&self) -> &[ShadowTable<'a>] {
        &self.tables
    }
}

impl<'a> ShadowTable<'a> {
    /// One entry per sequence: its buffers of this layer and its counts.
    pub fn new(ops: &CudaOps, seqs: &[(&'a LayerBuffers, SeqCounts)]) -> Result<Self> {
        let (layout, words) = table_words(ops, seqs)?;
        let own = ops.device().upload(&words)?;
        let addrs = own.device_ptr(ops.device().stream()).0;
        Ok(ShadowTable {
            layout,
            addrs,
            counts: addrs + (8 * ADDR_WORDS * seqs.len()) as u64,
            own: Some(own),
            host_counts: seqs.iter().map(|s| s.1).collect(),
            _bufs: PhantomData,
        })
    }

    /// Replaces every sequence's counts (in place: the device array keeps its address);
    /// a table of a [`ShadowTables`] keeps the counts it was made with.
    pub fn set_counts(&mut self, ops: &CudaOps, counts: &[SeqCounts]) -> Result<()> {
        ensure!(
            counts.len() == self.host_counts.len(),
            "{} counts for a batch of {}",
            counts.len(),
            self.host_counts.len()
        );
        for (i, c) in counts.iter().enumerate() {
            self.layout.check_counts(i, c)?;
        }
        let n = counts.len();
        let Some(own) = self.own.as_mut() else {
            anyhow::bail!("the counts of a table made in a set are fixed");
        };
        let words: Vec<u64> = counts.iter().flat_map(count_words).collect();
        let mut dst = own.slice_mut(ADDR_WORDS * n..(ADDR_WORDS + COUNT_WORDS) * n);
        ops.device().stream().memcpy_htod(&words, &mut dst)?;
        self.host_counts.copy_from_slice(counts);
        Ok(())
    }

    /// The batch's layout.
    pub fn layout(&self) -> &ShadowLayout {
        &self.layout
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        self.host_counts.len()
    }

    /// Each sequence's counts (host copy).
    pub fn counts(&self) -> &[SeqCounts] {
        &self.host_counts
    }

    /// Device addresses of the address and count arrays.
    pub(crate) fn device_arrays(&self) -> (u64, u64) {
        (self.addrs, self.counts)
    }

    /// The launch grid of one block per (KV head, sequence).
    pub(crate) fn head_grid(&self) -> (u32, u32, u32) {
        // new() keeps both below 65536.
        (self.layout.kv_heads as u32, self.batch() as u32, 1)
    }
}

/// What one decode step of a batch passes from stage to stage, sized for `batch`
/// sequences of a layout (see each stage in [`crate::cuda::shadow`]).
pub struct StepScratch {
    layout: ShadowLayout,
    batch: usize,
    /// Landmark logits `[batch, kv_heads, chunk_cap, group]` f32 (scaled by `1/√d`).
    pub logits: CudaSlice<f32>,
    /// Softmax statistics of each tile of the logits, `[batch, kv_heads, score_tiles,
    /// group]` (max, sum of exponentials) as pairs of f32.
    pub stats: CudaSlice<f32>,
    /// Landmark scores `[batch, kv_heads, chunk_cap]` f32.
    pub scores: CudaSlice<f32>,
    /// Selected chunks `[batch, kv_heads, S]`, ascending, -1 after the last.
    pub selected: CudaSlice<i32>,
    /// Misses `[batch, kv_heads, S]` as (slot, chunk) pairs (`2·S` ints per head).
    pub misses: CudaSlice<i32>,
    /// Misses per head `[batch, kv_heads]` (slots that change chunk: keys to rebuild).
    pub miss_count: CudaSlice<i32>,
    /// Of them, those to fetch from the host (the first in each list) `[batch, kv_heads]`;
    /// the rest are in the GPU value tier.
    pub fetch_count: CudaSlice<i32>,
    /// The tier entry of each tier hit, at its place in the miss list, `[batch, kv_heads, S]`.
    pub tier_src: CudaSlice<i32>,
    /// Each head's first tier entry to replace this step `[batch, kv_heads]`.
    pub tier_base: CudaSlice<i32>,
    /// Tier hits per head `[batch, kv_heads]` (`miss_count - fetch_count`).
    pub tier_count: CudaSlice<i32>,
    /// Counters added to by every step: selected chunks found in their slot, and misses
    /// found in the GPU value tier.
    pub hits: CudaSlice<u64>,
    /// The flash-decoding partials of the micro-batch's attention (its own: the
    /// micro-batches attend at once on their streams).
    pub attention: DecodeWorkspace,
}

/// What the cpu-gather path moves through the host for one job: the miss lists read
/// back, and the gathered values in pinned staging mapped for the device (the scatter
/// kernel reads it there; [`super::transfer::GatherTransfer`]).
pub struct GatherBuffers {
    /// Miss lists `[batch, kv_heads, S]` of (slot, chunk) pairs, read back.
    pub misses: PinnedHostSlice<i32>,
    /// Misses to fetch per head `[batch, kv_heads]` (the first of each list), read back.
    pub miss_count: PinnedHostSlice<i32>,
    /// Gathered values, `[misses]` chunks as the pool holds them
    /// ([`ShadowLayout::value_chunk_bytes`] each), in list order.
    pub staging: PinnedHostSlice<u8>,
}

impl GatherBuffers {
    /// Buffers for `batch` sequences of `layout`.
    pub fn new(ops: &CudaOps, layout: &ShadowLayout, batch: usize) -> Result<Self> {
        let ctx = ops.device().context();
        let heads = batch * layout.kv_heads;
        let bytes = heads * layout.slots * layout.value_chunk_bytes();
        let mapped = cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP | cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: pinned memory (the lists: plain, the host reads them; the staging:
        // mapped for the device, which reads it), written by copies or by the gather
        // before it is read.
        unsafe {
            Ok(GatherBuffers {
                misses: ctx.alloc_pinned_with_flags(heads * layout.slots * 2, 0)?,
                miss_count: ctx.alloc_pinned_with_flags(heads, 0)?,
                staging: ctx.alloc_pinned_with_flags(bytes, mapped)?,
            })
        }
    }

    /// The staging's address on the device (its mapping).
    pub fn staging_device_addr(&self) -> Result<u64> {
        mapped_device_addr(&self.staging).context("cpu-gather: mapping the staging for the device")
    }
}

/// The device address of pinned host memory allocated mapped for the device
/// (`CU_MEMHOSTALLOC_DEVICEMAP`).
pub fn mapped_device_addr(mem: &PinnedHostSlice<u8>) -> Result<u64> {
    let p = mem.as_ptr()?;
    let mut addr = 0;
    // SAFETY: `p` is the start of a live pinned allocation; the driver refuses one made
    // without DEVICEMAP.
    let r = unsafe { cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut addr, p as *mut _, 0) };
    anyhow::ensure!(
        r == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS,
        "the driver gave no device address for pinned host memory: {r:?}"
    );
    Ok(addr)
}

impl StepScratch {
    /// The layout it was made for.
    pub fn layout(&self) -> &ShadowLayout {
        &self.layout
    }

    /// Sequences it serves at most.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Scratch for `batch` sequences of `layout`.
    pub fn new(ops: &CudaOps, layout: &ShadowLayout, batch: usize) -> Result<Self> {
        let dev = ops.device();
        let heads = batch * layout.kv_heads;
        Ok(StepScratch {
            layout: *layout,
            batch,
            logits: dev.zeros(heads * layout.chunk_cap * layout.group)?,
            stats: dev.zeros(heads * layout.score_tiles() * layout.group * 2)?,
            scores: dev.zeros(heads * layout.chunk_cap)?,
            selected: dev.zeros(heads * layout.slots)?,
            misses: dev.zeros(heads * layout.slots * 2)?,
            miss_count: dev.zeros(heads)?,
            fetch_count: dev.zeros(heads)?,
            tier_src: dev.zeros(heads * layout.slots)?,
            tier_base: dev.zeros(heads)?,
            tier_count: dev.zeros(heads)?,
            hits: dev.zeros(2)?,
            attention: DecodeWorkspace::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words uploaded are the structs' bytes as the kernels read them.
    #[test]
    fn table_words_are_the_structs_in_memory() {
        let a = SeqAddrs {
            marks: 1,
            mark_scales: 2,
            outlier: 3,
            u: 4,
            u_scales: 5,
            fold_u: 6,
            sv: 7,
            slots: 8,
            ak: 9,
            av: 10,
            kpre: 11,
            tier: 12,
            tier_map: 13,
            tier_owner: 14,
            tier_next: 15,
        };
        // SAFETY: SeqAddrs is #[repr(C)], 15 u64 fields, no padding (asserted in layout.rs).
        let mem: [u64; ADDR_WORDS] = unsafe { std::mem::transmute(a) };
        assert_eq!(addr_words(&a), mem);
        let c = SeqCounts {
            chunks: 7,
            recent: -3,
            outliers: 1 << 30,
            pool_seq: -1,
        };
        // SAFETY: SeqCounts is #[repr(C)], four i32, 16 bytes.
        let mem: [u64; COUNT_WORDS] = unsafe { std::mem::transmute(c) };
        assert_eq!(count_words(&c), mem);
    }
}
