//! Flash-decoding: one new query per sequence over its whole bf16 KV cache
//! (kernels/flash_decode.cu).
//!
//! Each sequence's cache is `[len, kv_heads·head_dim]` bf16, keys post-RoPE, the new
//! token's key and value already appended (the query attends to all `len` rows), as
//! in the CPU backend. A table may say that each entry's values past its first `dense`
//! rows are chunks in 8 bits ([`KvTable::with_value_chunks`]: ShadowKV's slots). The context is split into partitions of `part_len` tokens that
//! run as separate blocks (all query heads of one KV head per block); a second kernel
//! merges the partitions' partial outputs with their log-sum-exp statistics.
//!
//! Over values in 8-bit chunks, the attention may run in two passes ([`DecodePass`]):
//! every row but those of the slots whose values are still being fetched, then (once
//! they are in) those rows and the merge of both passes' partials, so that a ShadowKV
//! step attends while its fetch runs.

use super::ops::{kernel_params, CudaOps};
use crate::cpu::attention::AttnShape;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
use std::marker::PhantomData;

/// Query heads one block serves (the kernel pads the GQA group to this).
pub const MAX_GROUP: usize = 8;
const THREADS: u32 = 128;
const WARPS: usize = 4;
const REDUCE_THREADS: usize = 512;
/// Partials a head (both passes') up to which the merge runs a thread a dimension.
const FEW_PARTS: usize = 16;

/// The pending slots of a table's entries (their values still being fetched): entry
/// `e`'s are the slots of the first `count[e]` (slot, chunk) pairs of its list
/// `list[e·2·slots ..]` (a ShadowKV step's miss lists, `fetch_count` of each), each slot
/// at most once in an entry's pending pairs (the pending pass attends a slot once a pair).
#[derive(Clone, Copy)]
pub struct PendingSlots<'a> {
    /// `[entries, slots]` (slot, chunk) pairs.
    pub list: &'a CudaSlice<i32>,
    /// `[entries]` pairs of each list that are pending.
    pub count: &'a CudaSlice<i32>,
    /// Slots an entry has (at most [`MAX_PENDING_SLOTS`]).
    pub slots: usize,
}

/// Slots an entry may have for a two-pass attention (the kernel's bit set of them).
pub const MAX_PENDING_SLOTS: usize = 4096;

/// Which rows a flash-decoding launch over values in 8-bit chunks attends.
#[derive(Clone, Copy, Default)]
pub enum DecodePass<'a> {
    /// Every row, the partials merged at once.
    #[default]
    Whole,
    /// Every row but the pending slots' (whose values it never reads): partials only.
    Ready(PendingSlots<'a>),
    /// The pending slots' rows, then the merge of both passes' partials (the same
    /// table, queries, workspace and partition length as the ready pass before it).
    Pending(PendingSlots<'a>),
}

/// [`DecodePass`] on raw device addresses: the kernel's mode (0 whole, 1 ready, 2
/// pending), the lists and counts, the slots.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PassArgs {
    /// 0: every row; 1: all but the pending slots' rows; 2: only theirs, then the merge.
    pub mode: i32,
    /// Device address of the (slot, chunk) lists (0 in mode 0).
    pub list: u64,
    /// Device address of each list's pending count (0 in mode 0).
    pub count: u64,
    /// Slots an entry has (the lists' stride, in pairs).
    pub slots: usize,
}

impl PassArgs {
    /// The launch arguments of `pass` on `ops`'s stream.
    pub(crate) fn of(ops: &CudaOps, pass: DecodePass<'_>) -> Self {
        let s = ops.device().stream();
        let raw = |mode, p: PendingSlots<'_>| PassArgs {
            mode,
            list: p.list.device_ptr(s).0,
            count: p.count.device_ptr(s).0,
            slots: p.slots,
        };
        match pass {
            DecodePass::Whole => PassArgs::default(),
            DecodePass::Ready(p) => raw(1, p),
            DecodePass::Pending(p) => raw(2, p),
        }
    }
}

/// The sequences of one decode step: device arrays of cache addresses and lengths.
/// Borrows the caches so that they outlive every launch that uses the table.
pub struct KvTable<'a> {
    k_ptrs: CudaSlice<u64>,
    v_ptrs: CudaSlice<u64>,
    lens: CudaSlice<i32>,
    host_lens: Vec<usize>,
    value_chunks: Option<ValueChunks>,
    _caches: PhantomData<&'a ()>,
}

/// Where a table's values turn to chunks in 8 bits: each entry's bf16 rows before them,
/// and the rows of a chunk.
struct ValueChunks {
    dense: CudaSlice<i32>,
    chunk: usize,
}

impl<'a> KvTable<'a> {
    /// One entry per sequence: its key cache, value cache and length in tokens; each
    /// cache row holds `kv_width = kv_heads·head_dim` values.
    pub fn new<K, V>(ops: &CudaOps, seqs: &[(&'a K, &'a V, usize)], kv_width: usize) -> Result<Self>
    where
        K: DevicePtr<bf16>,
        V: DevicePtr<bf16>,
    {
        let s = ops.device().stream();
        let mut kp = Vec::with_capacity(seqs.len());
        let mut vp = Vec::with_capacity(seqs.len());
        let mut lens = Vec::with_capacity(seqs.len());
        for (i, (k, v, len)) in seqs.iter().enumerate() {
            ensure!(
                k.len() >= len * kv_width && v.len() >= len * kv_width,
                "sequence {i}: caches of {} and {} values hold fewer than {len} rows of {kv_width}",
                k.len(),
                v.len()
            );
            ensure!(*len <= i32::MAX as usize, "sequence {i}: {len} tokens");
            kp.push(k.device_ptr(s).0);
            vp.push(v.device_ptr(s).0);
            lens.push(*len as i32);
        }
        Ok(KvTable {
            k_ptrs: ops.device().upload(&kp)?,
            v_ptrs: ops.device().upload(&vp)?,
            lens: ops.device().upload(&lens)?,
            host_lens: seqs.iter().map(|s| s.2).collect(),
            value_chunks: None,
            _caches: PhantomData,
        })
    }

    /// The same table with each entry's values past its first `dense[i]` rows held as
    /// chunks of `chunk` rows in 8 bits, the value pools' format (`chunk · head_dim` codes
    /// in token order, then a fp32 scale per token), chunk `k` in place at the first bytes
    /// of its `chunk` bf16 rows; each value is `code · scale` (its products on the fp16
    /// tensor cores). For caches of one KV head (`kv_width = head_dim`), as ShadowKV's rows.
    pub fn with_value_chunks(mut self, ops: &CudaOps, dense: &[usize], chunk: usize) -> Result<Self> {
        ensure!(
            dense.len() == self.batch(),
            "{} dense lengths for {} sequences",
            dense.len(),
            self.batch()
        );
        ensure!((1..=1024).contains(&chunk), "value chunks of {chunk} rows");
        for (i, (&d, &len)) in dense.iter().zip(&self.host_lens).enumerate() {
            ensure!(
                d <= len && (len - d) % chunk == 0,
                "sequence {i}: {len} rows are not {d} bf16 rows and whole chunks of {chunk}"
            );
        }
        let dense: Vec<i32> = dense.iter().map(|&d| d as i32).collect();
        self.value_chunks = Some(ValueChunks {
            dense: ops.device().upload(&dense)?,
            chunk,
        });
        Ok(self)
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        self.host_lens.len()
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.host_lens.iter().copied().max().unwrap_or(0)
    }

    /// Each sequence's length in tokens (host copy).
    pub(crate) fn lens_host(&self) -> &[usize] {
        &self.host_lens
    }

    /// Device arrays: key-cache addresses, value-cache addresses, lengths (i32), for a
    /// kernel that reads bf16 values only (refused where some are in 8-bit chunks).
    pub(crate) fn device_arrays(&self) -> Result<(&CudaSlice<u64>, &CudaSlice<u64>, &CudaSlice<i32>)> {
        ensure!(
            self.value_chunks.is_none(),
            "this attention reads bf16 values only, and the table holds 8-bit chunks"
        );
        Ok((&self.k_ptrs, &self.v_ptrs, &self.lens))
    }
}

/// Scratch for the partial outputs, grown on demand and reused across steps.
#[derive(Default)]
pub struct DecodeWorkspace {
    o_part: Option<CudaSlice<f32>>,
    ml_part: Option<CudaSlice<f32>>,
}

impl DecodeWorkspace {
    /// An empty workspace (allocated by the first launch that needs it).
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes room, allocating on `ops`'s stream, for a launch over `batch` entries of
    /// `heads` query heads of dimension `d`, at most `max_len` rows each in partitions of
    /// `part_len`, in two passes' sets of partials where `passes` is 2.
    pub(crate) fn reserve(
        &mut self,
        ops: &CudaOps,
        (batch, heads, d): (usize, usize, usize),
        max_len: usize,
        part_len: usize,
        passes: usize,
    ) -> Result<()> {
        let parts = passes * max_len.div_ceil(part_len).max(1);
        self.ensure(ops, batch * heads * parts * d, batch * heads * parts * 2)
    }

    fn ensure(&mut self, ops: &CudaOps, o: usize, ml: usize) -> Result<()> {
        if self.o_part.as_ref().is_none_or(|b| b.len() < o) {
            self.o_part = Some(ops.device().zeros(o)?);
        }
        if self.ml_part.as_ref().is_none_or(|b| b.len() < ml) {
            self.ml_part = Some(ops.device().zeros(ml)?);
        }
        Ok(())
    }

    /// Device addresses of the scratch buffers (0 before the first launch): a captured
    /// step that launched with other addresses is stale.
    pub(crate) fn addresses(&self, ops: &CudaOps) -> (u64, u64) {
        let s = ops.device().stream();
        (
            self.o_part.as_ref().map_or(0, |b| b.device_ptr(s).0),
            self.ml_part.as_ref().map_or(0, |b| b.device_ptr(s).0),
        )
    }

    /// Fills the scratch with NaN, so that a test sees any partial result the kernels
    /// read without having written.
    pub fn poison(&mut self, ops: &CudaOps) -> Result<()> {
        if let Some(b) = self.o_part.as_mut() {
            ops.fill_nan_f32(b)?;
        }
        if let Some(b) = self.ml_part.as_mut() {
            ops.fill_nan_f32(b)?;
        }
        Ok(())
    }
}

/// Blocks of the flash-decoding split kernel resident on the whole device at once (at
/// its largest shared-memory footprint).
fn resident_split_blocks(k: &super::kernels::Kernels, sm_count: u32) -> Result<usize> {
    let smem = (2 * MAX_GROUP + MAX_GROUP * (1024 + 4)) * 4;
    let per_sm = k
        .flash_decode_split_d128
        .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)?;
    Ok(sm_count as usize * per_sm.max(1) as usize)
}

/// A block's fixed cost in tokens of work (start-up, its partial result and their
/// merge), measured on the H200: a 131K context at batch 8 runs 7 % slower in
/// partitions of 256 than of 1024 for the same bytes.
const BLOCK_OVERHEAD_TOKENS: usize = 32;

/// Partition length for a step, 64..=1024 tokens: the one that minimises the longest
/// chain of blocks a multiprocessor runs, waves × (partition length + a block's fixed
/// cost), with `slots` blocks resident on the whole device; the longest on ties
/// (fewer partial results to merge).
pub fn partition_len(batch: usize, kv_heads: usize, max_len: usize, slots: usize) -> usize {
    let slots = slots.max(1);
    let mut best = (usize::MAX, 64);
    for p in (64..=1024).step_by(64) {
        let blocks = batch * kv_heads * max_len.div_ceil(p).max(1);
        let cost = blocks.div_ceil(slots) * (p + BLOCK_OVERHEAD_TOKENS);
        if cost <= best.0 {
            best = (cost, p);
        }
    }
    best.1
}

impl CudaOps {
    /// Flash-decoding split blocks the device runs at once (sizes the partitions);
    /// found on first use from the kernel's occupancy.
    pub fn decode_slots(&self) -> usize {
        *self.decode_slots.get_or_init(|| {
            let sms = self.device().info().sm_count;
            resident_split_blocks(&self.k, sms).unwrap_or(sms as usize)
        })
    }

    /// `out[b, h·d..] = softmax(q_b,h · K_bᵀ / √d) · V_b` for every sequence `b` of
    /// `kv` and query head `h` (GQA: head h reads KV head h / (heads / kv_heads)).
    /// `q` and `out` are `[batch, heads·head_dim]`.
    pub fn flash_decode(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        shape: AttnShape,
        ws: &mut DecodeWorkspace,
    ) -> Result<()> {
        let p = partition_len(kv.batch(), shape.kv_heads, kv.max_len(), self.decode_slots());
        self.flash_decode_with_partition(out, q, kv, shape, ws, p)
    }

    /// [`CudaOps::flash_decode`] with a given partition length (a multiple of 16,
    /// 16..=1024).
    pub fn flash_decode_with_partition(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        shape: AttnShape,
        ws: &mut DecodeWorkspace,
        part_len: usize,
    ) -> Result<()> {
        self.flash_decode_pass(out, q, kv, shape, ws, part_len, DecodePass::Whole)
    }

    /// [`CudaOps::flash_decode_with_partition`] over the rows of one pass: `Whole`, or
    /// for a table of values in 8-bit chunks `Ready` and later `Pending` with the same
    /// pending slots (the ready pass writes no output; the pending one merges both).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_decode_pass(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        shape: AttnShape,
        ws: &mut DecodeWorkspace,
        part_len: usize,
        pass: DecodePass<'_>,
    ) -> Result<()> {
        let batch = kv.batch();
        if let DecodePass::Ready(p) | DecodePass::Pending(p) = pass {
            ensure!(
                p.list.len() >= batch * 2 * p.slots && p.count.len() >= batch,
                "pending slots: lists of {} ints and {} counts for {batch} entries of {} slots",
                p.list.len(),
                p.count.len(),
                p.slots
            );
        }
        let need = batch * shape.heads * shape.head_dim;
        ensure!(q.len() >= need, "q holds {} values, {need} needed", q.len());
        ensure!(out.len() >= need, "output holds {} values, {need} needed", out.len());
        let s = self.device().stream();
        let (qp, _g1) = q.device_ptr(s);
        let (outp, _g2) = out.device_ptr_mut(s);
        let (kp, _g3) = kv.k_ptrs.device_ptr(s);
        let (vp, _g4) = kv.v_ptrs.device_ptr(s);
        let (lp, _g5) = kv.lens.device_ptr(s);
        let chunks = kv.value_chunks.as_ref().map(|v| (v.dense.device_ptr(s), v.chunk));
        let args = DecodeArgs {
            out: outp,
            q: qp,
            k_ptrs: kp,
            v_ptrs: vp,
            lens: lp,
            batch,
            max_len: kv.max_len(),
            value_chunks: chunks.as_ref().map(|((p, _), c)| (*p, *c)),
            pass: PassArgs::of(self, pass),
        };
        // SAFETY: q and out hold batch·heads·d values (checked), the table's caches hold
        // len rows of kv_heads·d (checked at construction, borrowed for the table's life);
        // the pending lists hold batch lists of `slots` pairs and batch counts (checked).
        unsafe { self.flash_decode_raw(&args, shape, ws, part_len) }
    }

    /// Launches flash-decoding on raw device addresses (the whole-model decode step
    /// keeps its tables on the device, the same for every layer and step).
    ///
    /// # Safety
    /// `args.q` and `args.out` must hold `batch·heads·d` values, `k_ptrs`/`v_ptrs` `batch`
    /// cache addresses whose caches hold `lens[b]` rows of `kv_heads·d` values, `lens`
    /// `batch` lengths, none above `max_len`, all alive until the launch completes; with
    /// `value_chunks`, `batch` dense lengths, each entry's rows past its own as
    /// [`KvTable::with_value_chunks`] says; with a pass other than the whole, `batch`
    /// lists of `slots` (slot, chunk) pairs and `batch` counts, and for the pending pass
    /// the ready pass queued before it with the same arguments and workspace.
    pub(crate) unsafe fn flash_decode_raw(
        &self,
        args: &DecodeArgs,
        shape: AttnShape,
        ws: &mut DecodeWorkspace,
        part_len: usize,
    ) -> Result<()> {
        check_head_shape(shape)?;
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let group = heads / kv_heads;
        ensure!(
            group <= MAX_GROUP,
            "GQA group of {group} query heads (at most {MAX_GROUP})"
        );
        ensure!(
            part_len % 16 == 0 && (16..=1024).contains(&part_len),
            "partition length {part_len}"
        );
        let batch = args.batch;
        ensure!(
            args.value_chunks.is_none() || kv_heads == 1,
            "values in 8-bit chunks need caches of one KV head ({kv_heads} given)"
        );
        let pass = args.pass;
        ensure!(
            pass.mode == 0 || (args.value_chunks.is_some() && pass.slots <= MAX_PENDING_SLOTS),
            "a two-pass attention needs values in 8-bit chunks and at most {MAX_PENDING_SLOTS} slots ({} given)",
            pass.slots
        );
        ensure!(
            batch <= 65_535 && kv_heads <= 65_535,
            "batch {batch} or {kv_heads} KV heads too large"
        );
        if batch == 0 {
            return Ok(());
        }
        let max_parts = args.max_len.div_ceil(part_len).max(1);
        let sets = if pass.mode == 0 { 1 } else { 2 };
        ensure!(
            (sets * max_parts + REDUCE_THREADS) * 4 <= 48 * 1024,
            "{max_parts} partitions: use a longer partition"
        );
        ws.reserve(self, (batch, heads, d), args.max_len, part_len, sets)?;
        let s = self.device().stream();
        let o_part = ws.o_part.as_mut().unwrap();
        let (op, _g1) = o_part.device_ptr_mut(s);
        let ml_part = ws.ml_part.as_mut().unwrap();
        let (mlp, _g2) = ml_part.device_ptr_mut(s);
        let chunk_rows = args.value_chunks.map_or(0, |(_, c)| c);
        let (mode, slots) = (pass.mode, pass.slots as i32);
        // The pending pass's partitions: its own, fewer and longer (see pending_parts);
        // the others' all the rows'.
        let (launch_len, launch_parts, pend_parts) = match mode {
            2 => {
                let (len, n) = pending_parts(pass.slots * chunk_rows, args.max_len, part_len);
                (len, n, n)
            }
            _ => (part_len, max_parts, 0),
        };
        let smem_floats = 2 * MAX_GROUP + (MAX_GROUP * (launch_len + 4)).max(WARPS * MAX_GROUP * d);
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        // The partials of a head: `sets` sets of max_parts, the pending pass's second.
        let (kvh, grp, pl, mp) = (
            kv_heads as i32,
            group as i32,
            launch_len as i32,
            (sets * max_parts) as i32,
        );
        let base = if mode == 2 { max_parts as i32 } else { 0 };
        let split = match (d, args.value_chunks.is_some()) {
            (64, false) => &self.k.flash_decode_split_d64,
            (_, false) => &self.k.flash_decode_split_d128,
            (64, true) => &self.k.flash_decode_split_q8_d64,
            (_, true) => &self.k.flash_decode_split_q8_d128,
        };
        let (dense, chunk) = args.value_chunks.map_or((0, 0), |(p, c)| (p, c as i32));
        let cfg = LaunchConfig {
            grid_dim: (launch_parts as u32, kv_heads as u32, batch as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (smem_floats * 4) as u32,
        };
        // SAFETY: the caller's contract; the workspace holds batch·heads·sets·max_parts
        // partials; grid and shared memory match the kernel's layout. The ready pass
        // runs while a fetch kernel runs on another stream: launched early, its blocks
        // would hold the room that kernel is to take beside the one before.
        unsafe {
            self.launch_early(
                split,
                cfg,
                &mut kernel_params![
                    &op,
                    &mlp,
                    &args.q,
                    &args.k_ptrs,
                    &args.v_ptrs,
                    &args.lens,
                    &kvh,
                    &grp,
                    &pl,
                    &mp,
                    &scale_log2,
                    &dense,
                    &chunk,
                    &pass.list,
                    &pass.count,
                    &slots,
                    &mode,
                    &base
                ],
                mode != 1,
            )
        }?;
        if mode == 1 {
            return Ok(());
        }
        let (nh, hd, rpl, base2, np2) = (
            heads as i32,
            d as i32,
            part_len as i32,
            max_parts as i32,
            pend_parts as i32,
        );
        let params = &mut kernel_params![&args.out, &op, &mlp, &args.lens, &nh, &hd, &rpl, &mp, &base2, &np2];
        // SAFETY (both merges): as above; a merge reads only the partitions each
        // sequence has, and the pending pass's.
        if max_parts + pend_parts <= FEW_PARTS {
            // A thread a dimension, each finding the partials' statistics itself.
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, batch as u32, 1),
                block_dim: (d as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { self.launch_pdl(&self.k.flash_decode_reduce_few, cfg, params) }?;
        } else {
            // Each block merges one head: `REDUCE_THREADS / d` slices of d threads split
            // the partitions between them.
            let slices = REDUCE_THREADS / d;
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, batch as u32, 1),
                block_dim: (d as u32, slices as u32, 1),
                shared_mem_bytes: ((sets * max_parts + slices * d) * 4) as u32,
            };
            unsafe { self.launch_pdl(&self.k.flash_decode_reduce, cfg, params) }?;
        }
        Ok(())
    }
}

/// The pending pass's partitions for up to `rows` pending rows (the slots' rows) of
/// entries of at most `max_len` rows, the other passes' partitions being `part_len`
/// long: (length, count). A step's pending rows are few (its misses over PCIe), gathered
/// from the slots' rows: one partition of up to 1024 of them (the longest a block takes)
/// spares most of the blocks that, split as the other passes split the rows, would find
/// nothing. The count follows the slots' rows, since a captured step cannot read its
/// pending count: past 1024 slot rows a partition may still find none. At most as many
/// partitions as the other passes have (their set's room in the workspace), since no
/// more rows are pending than an entry has.
pub(crate) fn pending_parts(rows: usize, max_len: usize, part_len: usize) -> (usize, usize) {
    let rows = rows.min(max_len).max(1);
    let len = rows.next_multiple_of(16).min(1024).max(part_len.min(1024));
    (len, rows.div_ceil(len))
}

/// The head shapes the attention kernels serve: query heads in whole groups per KV
/// head (at most 65535), head dimension 64 or 128.
pub(crate) fn check_head_shape(shape: AttnShape) -> Result<()> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    ensure!(
        kv_heads > 0 && heads > 0 && heads % kv_heads == 0,
        "{heads} query heads do not split into {kv_heads} KV heads"
    );
    ensure!(heads <= 65_535, "{heads} query heads (at most 65535)");
    ensure!(d == 64 || d == 128, "head dimension {d} (64 or 128 supported)");
    Ok(())
}

/// Raw device addresses of one flash-decoding launch (see
/// [`CudaOps::flash_decode_raw`]).
pub(crate) struct DecodeArgs {
    /// Output `[batch, heads·d]`.
    pub out: u64,
    /// Queries `[batch, heads·d]`.
    pub q: u64,
    /// `batch` key-cache addresses.
    pub k_ptrs: u64,
    /// `batch` value-cache addresses.
    pub v_ptrs: u64,
    /// `batch` lengths (i32).
    pub lens: u64,
    /// Sequences.
    pub batch: usize,
    /// Upper bound of the lengths (sizes the grid).
    pub max_len: usize,
    /// Values in 8-bit chunks past each entry's dense rows: the `batch` dense lengths
    /// (i32) and the rows of a chunk ([`KvTable::with_value_chunks`]); `None`, bf16 rows.
    pub value_chunks: Option<(u64, usize)>,
    /// The rows this launch attends ([`DecodePass`]).
    pub pass: PassArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_balance_the_waves() {
        // 132 SMs with 4 blocks each.
        let slots = 528;
        // Llama-3.1-8B, batch 8, 32K: every length gives whole waves; the longest wins.
        assert_eq!(partition_len(8, 8, 32_768, slots), 1024);
        // One short sequence: as small as allowed (one wave either way).
        assert_eq!(partition_len(1, 8, 100, slots), 64);
        // One sequence of 122K: 131 partitions of 960 fill two waves (1048 blocks),
        // where 1024 would also take two waves of longer blocks and 512 four.
        assert_eq!(partition_len(1, 8, 124_928, slots), 960);
        // A graph's length bucket just past a wave boundary must not fall back to tiny
        // partitions (their merge traffic costs more than a wave).
        assert_eq!(partition_len(1, 8, 126_976, slots), 1024);
        // Whatever is chosen is never worse than 512 or 1024.
        for (b, h, n) in [
            (1usize, 8usize, 61_440usize),
            (7, 8, 124_928),
            (16, 8, 61_440),
            (3, 3, 5000),
        ] {
            let p = partition_len(b, h, n, slots);
            let cost = |p: usize| (b * h * n.div_ceil(p)).div_ceil(slots) * (p + BLOCK_OVERHEAD_TOKENS);
            assert!(cost(p) <= cost(512) && cost(p) <= cost(1024), "{b} {h} {n}: {p}");
        }
    }

    #[test]
    fn the_pending_pass_covers_every_row_in_as_few_partitions() {
        // A step at 61440: 128 slots of 8 rows, 1312 rows an entry, partitions of 448.
        assert_eq!(pending_parts(1024, 1312, 448), (1024, 1));
        // At 124928: 256 slots of 8, two partitions of 1024.
        assert_eq!(pending_parts(2048, 2500, 960), (1024, 2));
        // Few slots: no shorter than the other passes' partitions.
        assert_eq!(pending_parts(40, 2000, 256), (256, 1));
        for rows in [0usize, 1, 15, 16, 17, 1000, 1025, 5000, 40_000] {
            for max_len in [1usize, 100, 1312, 33_000] {
                for part in [16usize, 64, 448, 1024] {
                    let (len, n) = pending_parts(rows, max_len, part);
                    let max_parts = max_len.div_ceil(part).max(1);
                    // Every pending row (at most the slots' and the entry's) is covered,
                    // in partitions a block takes, no more of them than the set's room.
                    assert!(len * n >= rows.min(max_len), "{rows} {max_len} {part}");
                    assert!(len % 16 == 0 && (16..=1024).contains(&len), "{rows} {max_len} {part}");
                    assert!(n >= 1 && n <= max_parts, "{rows} {max_len} {part}: {n} > {max_parts}");
                }
            }
        }
    }
}
