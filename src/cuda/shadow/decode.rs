//! The attention of one ShadowKV decode step, layer by layer ([`ShadowStep`]): the
//! GPU form of the CPU reference's ([`crate::shadow::ShadowSeq`]'s
//! [`crate::cpu::kv_cache::CompressedSeq::attend_layer`]) — append the token to the
//! recent window → landmark scores and top-k → reuse diff → rebuild the missed keys |
//! fetch the missed values → flash-decoding over each (sequence, KV head)'s attended rows
//! → fold a full window's oldest chunk.
//!
//! The values of the misses come one of two ways ([`FetchPath`]): `zero-copy`, a
//! kernel on a few blocks reads them from the registered host pool over PCIe (or, for a
//! sequence in a GPU value slot, from device memory), on a
//! stream of its own beside the key rebuild where the step has one
//! ([`ShadowStep::with_fetch_stream`]; a lane gives its steps one); or
//! `cpu-gather`, the miss lists go back to the host, where an actor
//! ([`super::transfer::GatherTransfer`]) copies the chunks from the pool into pinned
//! staging mapped for the device on several threads while the GPU rebuilds the keys,
//! and the step's stream waits for it (in a host function; the thread queuing the step
//! does not) before a kernel scatters it into the slots.
//!
//! Micro-batches (the `micro` of [`ShadowStep::new`]): the append, the projections and
//! the MLP run once for the whole batch, but each layer's selection, fetch, rebuild and
//! attention run per micro-batch (a contiguous group of the sequences, one
//! [`StepScratch`] each). With the zero-copy fetch every micro-batch but the last runs
//! on a stream of its own ([`ShadowStep::with_part_streams`], one step above the lane's
//! priority, so that the first micro-batches' miss lists, which the fetch stream serves
//! first, come first)
//! and the last on the step's stream: each waits for the append, selects, has its misses
//! fetched, rebuilds their keys and attends, and the step's stream waits for them all
//! before the fold. So one micro-batch's latency-bound selection kernels and attention
//! run beside the others' scores and rebuilds; the fetches follow one another on the
//! fetch stream, each queued once its micro-batch's miss lists exist. (Making a
//! micro-batch's scores wait for the one's before, so that the first fetch starts
//! earlier, measured slower: its rebuild then took the SMs from the second one's
//! scores.) With cpu-gather they stay on the step's stream, ordered select 1, fetch 1 |
//! select 2, fetch 2 | … | rebuild all, then attend 1 once fetch 1 is in, attend 2 …
//! The key rebuild copies a micro-batch's GPU value tier hits beside its fetch.
//!
//! The fold of a layer's full windows needs nothing of the layers after it, nor they of
//! it: where the lane gives a fold stream ([`ShadowStep::with_fold_stream`]) it runs
//! there once the layer's attention is done, beside the next layer's projections and
//! selection, and the lane's stream waits for the fold stream at the step's end.
use super::buffers::{ShadowTable, ShadowTables, StepScratch};
use super::fetch::FETCH_BLOCKS;
use super::fold::any_window_full;
use super::layout::{DevicePool, SeqCounts, ShadowLayout};
use super::pool::GpuValuePool;
use super::rebuild::RebuildLists;
use super::seq::GpuShadowSeq;
use super::stages::{SideMark, SideWork, Stage, StageMark};
use super::timeline::Stamps;
use super::transfer::{GatherTransfer, PendingGather};
use crate::cpu::attention::AttnShape;
use crate::cuda::attention::{partition_len, DecodeArgs, DecodePass, PassArgs, PendingSlots};
use crate::cuda::CudaOps;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaView, DevicePtr};
use half::bf16;
use std::cell::RefCell;
use std::ops::Range;

/// One decode step's ShadowKV state for every layer: each layer's table of the
/// sequences' buffers and counts (the step's token included), the flash-decoding
/// tables over the rows each (sequence, KV head) attends, and the value pool.
pub struct ShadowStep<'a> {
    layout: ShadowLayout,
    /// Each layer's table of the whole batch, then with several micro-batches each
    /// one's table of each layer (`[layers + p·layers + l]`).
    tables: ShadowTables<'a>,
    layers: usize,
    /// The sequences of each micro-batch (one range: the whole batch).
    parts: Vec<Range<usize>>,
    dev_pool: DevicePool,
    fetch: FetchPath,
    /// zero-copy: the stream the fetch runs on beside the key rebuild (none: after it,
    /// on the step's stream).
    fetch_ops: Option<&'a CudaOps>,
    /// zero-copy: the blocks the fetch kernel runs on.
    fetch_blocks: usize,
    /// cpu-gather: the actor that gathers and sends the missed chunks.
    transfer: Option<&'a GatherTransfer>,
    /// The streams of the micro-batches but the last (which runs on the step's).
    part_ops: Vec<&'a CudaOps>,
    /// With stage timing on, a stamp at the end of each stage of each layer, on each
    /// stream.
    marks: Option<RefCell<Vec<StageMark>>>,
    /// With stage timing on, stamps around each layer's work on a side stream (the
    /// fetch's, the fold's).
    side_marks: Option<RefCell<Vec<SideMark>>>,
    /// With stage timing on, the marks' timestamps.
    stamps: RefCell<Option<Stamps>>,
    /// The stream the fold of full windows runs on beside the next layers' work (none:
    /// on the step's stream, after the layer's attention).
    fold_ops: Option<&'a CudaOps>,
    /// `[layer][k | v][batch·kv_heads]` row addresses of the attended rows.
    attn_ptrs: CudaSlice<u64>,
    /// `[batch·kv_heads]` attended rows.
    lens: CudaSlice<i32>,
    /// `[batch·kv_heads]` attended rows with bf16 values (the recent window and the
    /// outliers); the slots' values after them are chunks in 8 bits.
    dense: CudaSlice<i32>,
    max_len: usize,
    /// Chunks selected this step, over the batch's layers and heads (the hits and
    /// misses to come).
    pub selected: u64,
}

impl<'a> ShadowStep<'a> {
    /// The step of `seqs` (each about to take one token) on `ops`'s stream, fetching
    /// values from `pool` by `fetch`, its attention split into `micro` micro-batches
    /// (at most one a sequence; see the module's documentation).
    pub fn new(
        ops: &CudaOps,
        seqs: &[&'a GpuShadowSeq],
        pool: &'a GpuValuePool,
        fetch: FetchPath,
        micro: usize,
    ) -> Result<Self> {
        ensure!(!seqs.is_empty(), "a ShadowKV step needs a sequence");
        ensure!(micro >= 1, "a ShadowKV step needs at least one micro-batch");
        ensure!(
            fetch == FetchPath::CpuGather || !pool.host_written(),
            "a file-backed value pool is read by the cpu-gather fetch only (the device cannot map a file)"
        );
        let layout = *seqs[0].layer(0).layout();
        let layers = seqs[0].layers();
        let counts: Vec<SeqCounts> = seqs.iter().map(|s| s.counts_with_token()).collect();
        let parts = split_batch(seqs.len(), micro);
        // Each layer's table of the whole batch, then with several micro-batches each
        // one's table of each layer: one upload for them all.
        let entries = |range: Range<usize>, l: usize| -> Vec<_> {
            seqs[range.clone()]
                .iter()
                .zip(&counts[range])
                .map(|(s, c)| (s.layer(l), *c))
                .collect()
        };
        let mut batches: Vec<_> = (0..layers).map(|l| entries(0..seqs.len(), l)).collect();
        if parts.len() > 1 {
            for r in &parts {
                batches.extend((0..layers).map(|l| entries(r.clone(), l)));
            }
        }
        let tables = ShadowTables::new(ops, &batches)?;
        let (d, kvh) = (layout.head_dim, layout.kv_heads);
        let e = seqs.len() * kvh;
        let mut ptrs = Vec::with_capacity(layers * 2 * e);
        let mut lens = Vec::with_capacity(e);
        let mut dense = Vec::with_capacity(e);
        let mut selected = 0u64;
        for c in &counts {
            let (_, len) = layout.attended_rows(c);
            lens.extend(std::iter::repeat_n(len as i32, kvh));
            dense.extend(std::iter::repeat_n(c.recent + c.outliers * layout.chunk as i32, kvh));
            // Every layer selects (and the reuse kernel counts hits) for every head.
            selected += (layers * kvh * layout.selected_for(c)) as u64;
        }
        for l in 0..layers {
            for part in 0..2 {
                for (s, c) in seqs.iter().zip(&counts) {
                    let a = s.layer(l).addrs(ops);
                    let base = [a.ak, a.av][part];
                    let (first, _) = layout.attended_rows(c);
                    for h in 0..kvh {
                        ptrs.push(base + 2 * ((h * layout.rows_cap() + first) * d) as u64);
                    }
                }
            }
        }
        let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
        Ok(ShadowStep {
            layout,
            tables,
            layers,
            parts,
            dev_pool: pool.device(),
            fetch,
            fetch_ops: None,
            fetch_blocks: FETCH_BLOCKS,
            transfer: None,
            part_ops: Vec::new(),
            marks: None,
            side_marks: None,
            stamps: RefCell::new(None),
            fold_ops: None,
            attn_ptrs: ops.device().upload(&ptrs)?,
            lens: ops.device().upload(&lens)?,
            dense: ops.device().upload(&dense)?,
            max_len,
            selected,
        })
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        self.tables.tables()[0].batch()
    }

    /// The sequences of each micro-batch, in order (one step scratch each, as large as
    /// the largest).
    pub fn micro_batches(&self) -> &[Range<usize>] {
        &self.parts
    }

    /// Layer `l`'s table of the whole batch.
    fn whole(&self, l: usize) -> &ShadowTable<'a> {
        &self.tables.tables()[l]
    }

    /// Layer `l`'s table of micro-batch `p`.
    fn part_table(&self, p: usize, l: usize) -> &ShadowTable<'a> {
        let t = self.tables.tables();
        if self.parts.len() > 1 {
            &t[self.layers * (1 + p) + l]
        } else {
            &t[l]
        }
    }

    /// Runs the zero-copy fetch on `ops`'s stream (when given), concurrently with the
    /// key rebuild on the step's stream: the fetch waits for the layer's miss lists, the
    /// attention for the fetch.
    pub fn with_fetch_stream(mut self, ops: Option<&'a CudaOps>) -> Self {
        self.fetch_ops = ops;
        self
    }

    /// Folds each layer's full windows on `ops`'s stream (when given), beside the next
    /// layers' work: the fold waits for the layer's attention. The caller's stream must
    /// wait for `ops`'s (a join) before the step is dropped, which frees the tables the
    /// folds read, and before anything reads what they write. (A pool the host writes,
    /// whose folded chunks the host copies in, keeps the fold on the step's stream.)
    pub fn with_fold_stream(mut self, ops: Option<&'a CudaOps>) -> Self {
        self.fold_ops = ops;
        self
    }

    /// Runs micro-batch `p` (but the last) on `ops[p]`'s stream (required with several
    /// micro-batches and the zero-copy fetch: one stream fewer than micro-batches; see
    /// the module's documentation).
    pub fn with_part_streams(mut self, ops: &'a [CudaOps]) -> Self {
        self.part_ops = ops.iter().collect();
        self
    }

    /// Runs the zero-copy fetch on `n` blocks (at least one; default [`FETCH_BLOCKS`]):
    /// fewer leave more of the GPU to the work beside it, as long as they keep enough
    /// PCIe reads in flight.
    pub fn with_fetch_blocks(mut self, n: usize) -> Self {
        self.fetch_blocks = n.max(1);
        self
    }

    /// Has the cpu-gather path's misses gathered and sent by `t` (required for
    /// cpu-gather).
    pub fn with_transfer(mut self, t: Option<&'a GatherTransfer>) -> Self {
        self.transfer = t;
        self
    }

    /// Times every stage of every layer with timestamps the GPU writes into `stamps`
    /// (empty, with room for [`super::stages::stage_marks_bound`]; [`ShadowStep::take_marks`] and
    /// [`ShadowStep::take_stamps`] give them back).
    pub fn with_stage_times(mut self, stamps: Stamps) -> Self {
        self.marks = Some(RefCell::new(Vec::new()));
        self.side_marks = Some(RefCell::new(Vec::new()));
        self.stamps = RefCell::new(Some(stamps));
        self
    }

    /// The stamps of the stage marks (none without stage timing), whose read-back the
    /// caller queues once every stream that made them is joined.
    pub fn take_stamps(&self) -> Option<Stamps> {
        self.stamps.take()
    }

    /// A stamp on `ops`'s stream; its index.
    fn stamp(&self, ops: &CudaOps) -> Result<usize> {
        match self.stamps.borrow().as_ref() {
            Some(s) => s.stamp(ops),
            None => anyhow::bail!("a stage mark without stage timing"),
        }
    }

    /// The batch's layout.
    pub fn layout(&self) -> &ShadowLayout {
        &self.layout
    }

    /// Layer `l`'s attention for the step's rows (one per sequence): splits `qkv`
    /// (`[batch, (heads + 2·kv_heads)·d]`, `bias` added) into the rotated queries `q`
    /// and the new key and value appended to each recent window (at `positions`), then
    /// selects, diffs, rebuilds and fetches the missed chunks, writes the attention
    /// output to `out` `[batch, heads·d]`, and folds full windows. `scratch` holds one
    /// step scratch per micro-batch ([`ShadowStep::micro_batches`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_layer(
        &self,
        ops: &CudaOps,
        l: usize,
        (q, qkv, bias): (&mut CudaSlice<bf16>, &CudaSlice<bf16>, Option<&CudaSlice<bf16>>),
        positions: &CudaView<'_, i32>,
        inv_freq: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        scratch: &mut [StepScratch],
    ) -> Result<()> {
        ensure!(
            scratch.len() == self.parts.len(),
            "a ShadowKV step of {} micro-batches given {} step scratches",
            self.parts.len(),
            scratch.len()
        );
        let forks = self.forks();
        ensure!(
            self.part_ops.len() >= forks,
            "a ShadowKV step of {} micro-batches given {} streams for them",
            self.parts.len(),
            self.part_ops.len()
        );
        let lay = &self.layout;
        let heads = lay.kv_heads * lay.group;
        self.mark(ops, 0, Stage::Start)?;
        ops.shadow_qkv_append(q, qkv, bias, positions, inv_freq, self.whole(l), heads)?;
        self.mark(ops, 0, Stage::Append)?;
        if forks > 0 {
            // The micro-batches' own flash-decoding workspaces are allocated (and, when
            // they grow, freed) on the step's stream, which every fork joins.
            let part = self.partition(ops);
            for (range, sc) in self.parts.iter().zip(scratch.iter_mut()) {
                let e = range.len() * lay.kv_heads;
                sc.attention
                    .reserve(ops, (e, lay.group, lay.head_dim), self.max_len, part, 2)?;
            }
            let appended = ops.device().event(false)?;
            appended.record(ops.device().stream())?;
            for on in &self.part_ops[..forks] {
                on.device().stream().wait(&appended)?;
            }
        }
        let queued = self.queue_parts(ops, l, (&*q, &mut *out), inv_freq, scratch);
        // The step's stream waits for the forks, and where queuing failed part-way for
        // the fetch stream too (a fetch queued before the failure may not have been
        // waited for), so that nothing it frees or writes next is still in use. Every
        // join is tried; the queuing error comes first.
        let fetch = self.fetch_ops.filter(|_| queued.is_err());
        let mut joined = Ok(());
        for on in self.part_ops[..forks].iter().copied().chain(fetch) {
            let r = ops.device().stream().join(on.device().stream());
            if joined.is_ok() {
                joined = r;
            }
        }
        queued?;
        joined?;
        if forks > 0 {
            self.mark(ops, 0, Stage::Join)?;
        }
        // A host-written pool's folded chunks go through the actor's outbox.
        let writer = self.transfer.filter(|_| self.dev_pool.host_written());
        if let (Some(side), None) = (self.fold_ops, writer) {
            if !any_window_full(self.whole(l)) {
                return Ok(());
            }
            // SAFETY: as the fetch: the registered pool and the device slots
            // (GpuValuePool), each sequence its own slot. The fold stream waits for the
            // layer's attention (the last reader of the rows the fold moves), and no
            // later work of the step touches this layer's buffers; the caller's stream
            // waits for the fold stream before the step goes (with_fold_stream).
            return self.on_side(ops, side, SideWork::Fold, l, || unsafe {
                side.shadow_fold(self.whole(l), &self.dev_pool, l, None)
            });
        }
        let outbox = match writer {
            Some(tr) => tr.fold_outbox(ops, l)?,
            None => None,
        };
        // SAFETY: as the fetch: the registered pool and the device slots (GpuValuePool),
        // each sequence its own slot; the outbox is the actor's, free for this layer.
        unsafe { ops.shadow_fold(self.whole(l), &self.dev_pool, l, outbox)? };
        if let Some(tr) = writer {
            tr.write_back(ops, self.whole(l), l)?;
            if l + 1 == self.layers {
                tr.wait_for_writes(ops)?;
            }
        }
        self.mark(ops, 0, Stage::Fold)
    }

    /// Micro-batches that run on a stream of their own: all but the last, with the
    /// zero-copy fetch. (cpu-gather keeps them on the step's stream: its actor does the
    /// jobs in the order they are queued, and the driver may run the host functions of
    /// all streams on one thread, so a wait on one stream could block the lists of an
    /// earlier job on another.)
    fn forks(&self) -> usize {
        match self.fetch {
            FetchPath::ZeroCopy => self.parts.len() - 1,
            FetchPath::CpuGather => 0,
        }
    }

    /// Queues layer `l`'s work after the append, per micro-batch: its selection and its
    /// fetch, then its key rebuild and its attention over the rows whose values are in,
    /// then once its fetch is in the attention over the fetched rows. Micro-batch
    /// `p < forks` runs on `part_ops[p]` (which waits for the append), the others on
    /// `ops`'s stream in this order, so that there the first fetch runs beside the
    /// others' selection and every rebuild.
    fn queue_parts(
        &self,
        ops: &CudaOps,
        l: usize,
        (q, out): (&CudaSlice<bf16>, &mut CudaSlice<bf16>),
        inv_freq: &CudaSlice<f32>,
        scratch: &mut [StepScratch],
    ) -> Result<()> {
        let lay = &self.layout;
        let row = lay.kv_heads * lay.group * lay.head_dim;
        let forks = self.forks();
        let on = |p: usize| -> (&CudaOps, usize) {
            if p < forks {
                (self.part_ops[p], p + 1)
            } else {
                (ops, 0)
            }
        };
        let mut pending = Vec::with_capacity(self.parts.len());
        for (p, (range, sc)) in self.parts.iter().zip(scratch.iter_mut()).enumerate() {
            let ((o, tag), t) = (on(p), self.part_table(p, l));
            if tag > 0 {
                self.mark(o, tag, Stage::Start)?;
            }
            o.shadow_scores(t, &q.slice(range.start * row..range.end * row), sc)?;
            self.mark(o, tag, Stage::Scores)?;
            o.shadow_select(t, sc, false)?;
            self.mark(o, tag, Stage::Select)?;
            o.shadow_reuse(t, sc)?;
            self.mark(o, tag, Stage::Reuse)?;
            pending.push(self.queue_fetch(o, t, l, sc)?);
        }
        // The keys of a micro-batch's misses, and the values of its tier hits, are
        // rebuilt and copied while its fetched values come: the reuse diff fetches again
        // any hit whose entry the fetch replaces, so the two touch distinct entries and
        // slots. The rebuild's blocks stay resident until it is done, so where a fetch
        // runs beside it they leave that fetch its blocks' room (else the fetch would
        // wait for the rebuild).
        let beside = self.fetch == FetchPath::ZeroCopy && self.fetch_ops.is_some();
        let room = if beside { self.fetch_blocks } else { 0 };
        for (p, sc) in scratch.iter().enumerate() {
            let ((o, tag), t) = (on(p), self.part_table(p, l));
            let blocks = o.shadow_rebuild_blocks(t, room)?;
            o.shadow_rebuild_on(t, RebuildLists::of_step(sc), inv_freq, blocks)?;
            self.mark(o, tag, Stage::Rebuild)?;
        }
        // The attention's rows whose values are in (the recent window, the outliers, the
        // slots kept or found in the tier) are attended while the fetch runs; the fetched
        // slots' rows, and the merge, once it is in.
        for (p, (range, sc)) in self.parts.iter().zip(scratch.iter_mut()).enumerate() {
            let (o, tag) = on(p);
            self.attend(o, l, range.clone(), (q, &mut *out), sc, false)?;
            self.mark(o, tag, Stage::Attend)?;
        }
        for (p, ((range, sc), fetch)) in self.parts.iter().zip(scratch.iter_mut()).zip(pending).enumerate() {
            let ((o, tag), t) = (on(p), self.part_table(p, l));
            self.finish_fetch(o, t, l, sc, fetch)?;
            self.mark(o, tag, Stage::Fetch)?;
            self.attend(o, l, range.clone(), (q, &mut *out), sc, true)?;
            self.mark(o, tag, Stage::Attend)?;
        }
        Ok(())
    }

    /// Starts the fetch of a micro-batch's misses (table `t`, its scratch `sc`) once its
    /// miss lists are queued: zero-copy with a fetch stream, the fetch kernel on that
    /// stream; cpu-gather, the lists' copy back to the host and the actor's job.
    /// Otherwise nothing yet.
    fn queue_fetch(&self, ops: &CudaOps, t: &ShadowTable, l: usize, sc: &mut StepScratch) -> Result<PendingFetch> {
        match (self.fetch, self.fetch_ops) {
            (FetchPath::ZeroCopy, Some(side)) => {
                self.on_side(ops, side, SideWork::Fetch, l, || self.zero_copy(side, t, l, sc))?;
                let done = side.device().event(false)?;
                done.record(side.device().stream())?;
                Ok(PendingFetch::Side(done))
            }
            (FetchPath::ZeroCopy, None) => Ok(PendingFetch::Inline),
            (FetchPath::CpuGather, _) => Ok(PendingFetch::Gather(self.gatherer()?.queue(ops, t, l, sc)?)),
        }
    }

    /// Completes a micro-batch's fetch on `ops`'s stream: waits for the fetch stream, or
    /// runs the fetch there, or waits for the actor's values and scatters them.
    fn finish_fetch(
        &self,
        ops: &CudaOps,
        t: &ShadowTable,
        l: usize,
        sc: &mut StepScratch,
        fetch: PendingFetch,
    ) -> Result<()> {
        match fetch {
            PendingFetch::Side(done) => Ok(ops.device().stream().wait(&done)?),
            PendingFetch::Inline => self.zero_copy(ops, t, l, sc),
            PendingFetch::Gather(job) => self.gatherer()?.finish(ops, t, sc, job),
        }
    }

    /// The zero-copy fetch of table `t`'s misses of layer `l` on `on`'s stream.
    fn zero_copy(&self, on: &CudaOps, t: &ShadowTable, l: usize, sc: &StepScratch) -> Result<()> {
        let tier_base = (self.layout.tier > 0).then_some(&sc.tier_base);
        // SAFETY: the host pool is registered with the device and the device slots
        // allocated on it (GpuValuePool); each sequence reads only its own leased slot.
        unsafe {
            on.shadow_fetch_values(
                t,
                &sc.misses,
                &sc.fetch_count,
                tier_base,
                &self.dev_pool,
                l,
                self.fetch_blocks,
            )
        }
    }

    /// Flash-decoding of layer `l` for the sequences `seqs` (rows of `q` and `out`), in
    /// two passes over the micro-batch's scratch `sc`: the rows whose values are in
    /// (`fetched` false: partials only), then those of the slots its fetch fills and the
    /// merge (`fetched` true).
    fn attend(
        &self,
        ops: &CudaOps,
        l: usize,
        seqs: Range<usize>,
        (q, out): (&CudaSlice<bf16>, &mut CudaSlice<bf16>),
        sc: &mut StepScratch,
        fetched: bool,
    ) -> Result<()> {
        let lay = &self.layout;
        let all = self.batch() * lay.kv_heads;
        let (e0, e) = (seqs.start * lay.kv_heads, seqs.len() * lay.kv_heads);
        let pending = PendingSlots {
            list: &sc.misses,
            count: &sc.fetch_count,
            slots: lay.slots,
        };
        let pass = if fetched {
            DecodePass::Pending(pending)
        } else {
            DecodePass::Ready(pending)
        };
        let row = (lay.kv_heads * lay.group * lay.head_dim * 2) as u64;
        let s = ops.device().stream();
        let ptrs = self.attn_ptrs.device_ptr(s).0 + 8 * (2 * l * all + e0) as u64;
        let args = DecodeArgs {
            out: out.device_ptr(s).0 + row * seqs.start as u64,
            q: q.device_ptr(s).0 + row * seqs.start as u64,
            k_ptrs: ptrs,
            v_ptrs: ptrs + 8 * all as u64,
            lens: self.lens.device_ptr(s).0 + 4 * e0 as u64,
            batch: e,
            max_len: self.max_len,
            value_chunks: Some((self.dense.device_ptr(s).0 + 4 * e0 as u64, lay.chunk)),
            pass: PassArgs::of(ops, pass),
        };
        let shape = AttnShape {
            heads: lay.group,
            kv_heads: 1,
            head_dim: lay.head_dim,
        };
        let part = self.partition(ops);
        // SAFETY: q and out hold batch·heads·d values (the step's rows; `seqs` is one of
        // the step's micro-batches); each entry's address is its head's first attended
        // row, `lens` rows of d values inside the attention buffers (attended_rows),
        // which the tables borrow for the step; past `dense` rows, its slots, each with
        // its chunk's values in 8 bits (kernels/shadow.cuh, shadow_slot_values); the
        // micro-batch's miss lists hold e lists of `slots` pairs and e fetch counts, and
        // its fetched pass follows its ready pass with the same arguments.
        unsafe { ops.flash_decode_raw(&args, shape, &mut sc.attention, part) }
    }

    /// The flash-decoding partition length: the whole batch's, whatever the micro-batch,
    /// so that the merge sums in the same order and the outputs are the same bits with
    /// any number of micro-batches.
    fn partition(&self, ops: &CudaOps) -> usize {
        partition_len(self.batch() * self.layout.kv_heads, 1, self.max_len, ops.decode_slots())
    }

    /// With stage timing on, stamps the end of `stage` (or the start
    /// of the layer's work) on `ops`'s stream, stream `tag` of the step (0: its own;
    /// p + 1: micro-batch p's).
    fn mark(&self, ops: &CudaOps, tag: usize, stage: Stage) -> Result<()> {
        if let Some(marks) = &self.marks {
            let e = self.stamp(ops)?;
            marks.borrow_mut().push((tag, stage, e));
        }
        Ok(())
    }

    /// With stage timing on, marks the end of the last layer's dense work (its output
    /// projection and MLP) on `ops`'s stream, the step's own.
    pub(crate) fn mark_layers_done(&self, ops: &CudaOps) -> Result<()> {
        self.mark(ops, 0, Stage::Mlp)
    }

    /// With stage timing on, marks the end of the step's sampling (the final norm, the
    /// logits and the sampled tokens) on `ops`'s stream, the step's own.
    pub(crate) fn mark_sampled(&self, ops: &CudaOps) -> Result<()> {
        self.mark(ops, 0, Stage::Sample)
    }

    /// The stage marks recorded (empty without timing), to read once the step is done.
    pub fn take_marks(&self) -> Vec<StageMark> {
        self.marks.as_ref().map(|m| m.take()).unwrap_or_default()
    }

    /// The (begin, end) stamps of each layer's work on a side stream (empty without
    /// timing or without side streams), to read once the step is done.
    pub fn take_side_marks(&self) -> Vec<SideMark> {
        self.side_marks.as_ref().map(|m| m.take()).unwrap_or_default()
    }

    /// Queues `work` (layer `l`'s) on `side`'s stream after everything queued on `ops`'s
    /// so far, between two stamps where stages are timed.
    fn on_side(
        &self,
        ops: &CudaOps,
        side: &CudaOps,
        kind: SideWork,
        l: usize,
        work: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let s = side.device().stream();
        s.join(ops.device().stream())?;
        let begin = self.side_marks.as_ref().map(|_| self.stamp(side)).transpose()?;
        work()?;
        if let (Some(marks), Some(begin)) = (&self.side_marks, begin) {
            let end = self.stamp(side)?;
            marks.borrow_mut().push((kind, l, begin, end));
        }
        Ok(())
    }

    /// The cpu-gather actor (an error where the step has none).
    fn gatherer(&self) -> Result<&'a GatherTransfer> {
        self.transfer
            .ok_or_else(|| anyhow::anyhow!("a cpu-gather step without its gather actor"))
    }
}

/// A micro-batch's fetch between its selection and its attention.
enum PendingFetch {
    /// Running on the fetch stream; the event marks its end.
    Side(CudaEvent),
    /// Zero-copy without a fetch stream: to run on the step's stream after the rebuild.
    Inline,
    /// cpu-gather: the actor's job.
    Gather(PendingGather),
}

/// `n` sequences split into `micro` contiguous micro-batches (at most `n`), the first
/// `n % micro` one sequence larger.
pub fn split_batch(n: usize, micro: usize) -> Vec<Range<usize>> {
    let m = micro.clamp(1, n.max(1));
    let mut start = 0;
    (0..m)
        .map(|i| {
            let len = n / m + usize::from(i < n % m);
            start += len;
            start - len..start
        })
        .collect()
}

/// How a decode step gets the missed values to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchPath {
    /// A kernel reads them from the registered host pool.
    ZeroCopy,
    /// Host threads gather them into pinned staging; one copy and a scatter kernel.
    CpuGather,
}

#[cfg(test)]
mod tests {
    use super::split_batch;

    #[test]
    fn micro_batches_cover_the_batch_in_order() {
        assert_eq!(split_batch(14, 1), vec![0..14]);
        assert_eq!(split_batch(14, 2), vec![0..7, 7..14]);
        assert_eq!(split_batch(14, 4), vec![0..4, 4..8, 8..11, 11..14]);
        // Never an empty micro-batch.
        assert_eq!(split_batch(2, 4), vec![0..1, 1..2]);
        assert_eq!(split_batch(1, 0), vec![0..1]);
    }
}
