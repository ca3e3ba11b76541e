//! The attention of one ShadowKV decode step, layer by layer ([`ShadowStep`]): the
//! GPU form of [`crate::shadow::ShadowSeq::attend_layer`], one launch per stage for the
//! whole batch — append the token to the recent window → landmark scores and top-k →
//! reuse diff → rebuild the missed keys | fetch the missed values → flash-decoding over
//! each (sequence, KV head)'s attended rows → fold a full window's oldest chunk.
//!
//! The values of the misses come one of two ways ([`FetchPath`]): `zero-copy`, a
//! kernel on a few blocks reads them from the registered host pool over PCIe, on a
//! stream of its own beside the key rebuild where the step has one
//! ([`ShadowStep::with_fetch_stream`]; a lane gives its steps one); or
//! `cpu-gather`, the miss lists go back to the host, which copies the chunks from the
//! pool into pinned staging on several threads while the GPU rebuilds the keys, and the
//! staging goes to the GPU in one copy that a kernel scatters into the slots. The host
//! waits for each layer's miss lists in this path (the pipeline actors of a later stage
//! take that wait off the compute stream's thread).

use super::buffers::{GatherBuffers, ShadowTable, StepScratch};
use super::fetch::FETCH_BLOCKS;
use super::layout::{DevicePool, SeqCounts, ShadowLayout};
use super::pool::GpuValuePool;
use super::seq::GpuShadowSeq;
use crate::cpu::attention::AttnShape;
use crate::cuda::attention::{partition_len, DecodeArgs, DecodeWorkspace};
use crate::cuda::CudaOps;
use anyhow::{ensure, Result};
use cudarc::driver::CudaEvent;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use half::bf16;
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::time::Instant;

/// One decode step's ShadowKV state for every layer: each layer's table of the
/// sequences' buffers and counts (the step's token included), the flash-decoding
/// tables over the rows each (sequence, KV head) attends, and the value pool.
pub struct ShadowStep<'a> {
    layout: ShadowLayout,
    tables: Vec<ShadowTable<'a>>,
    pool: &'a GpuValuePool,
    dev_pool: DevicePool,
    fetch: FetchPath,
    /// zero-copy: the stream the fetch runs on beside the key rebuild (none: after it,
    /// on the step's stream).
    fetch_ops: Option<&'a CudaOps>,
    /// cpu-gather: the threads that copy the missed chunks (none: rayon's).
    gatherer: Option<&'a dyn ChunkGather>,
    /// cpu-gather: seconds the host waited for miss lists, seconds it gathered, bytes.
    pub gather: Cell<GatherTimes>,
    /// With stage timing on, an event at the end of each stage of each layer.
    marks: Option<RefCell<Vec<(Stage, CudaEvent)>>>,
    /// With stage timing on and a fetch stream, events on that stream around each
    /// layer's fetch.
    fetch_marks: Option<RefCell<Vec<(CudaEvent, CudaEvent)>>>,
    /// `[layer][k | v][batch·kv_heads]` row addresses of the attended rows.
    attn_ptrs: CudaSlice<u64>,
    /// `[batch·kv_heads]` attended rows.
    lens: CudaSlice<i32>,
    max_len: usize,
    /// Chunks selected this step, over the batch's layers and heads (the hits and
    /// misses to come).
    pub selected: u64,
}

impl<'a> ShadowStep<'a> {
    /// The step of `seqs` (each about to take one token) on `ops`'s stream, fetching
    /// values from `pool` by `fetch`.
    pub fn new(ops: &CudaOps, seqs: &[&'a GpuShadowSeq], pool: &'a GpuValuePool, fetch: FetchPath) -> Result<Self> {
        ensure!(!seqs.is_empty(), "a ShadowKV step needs a sequence");
        let layout = *seqs[0].layer(0).layout();
        let layers = seqs[0].layers();
        let counts: Vec<SeqCounts> = seqs.iter().map(|s| s.counts_with_token()).collect();
        let mut tables = Vec::with_capacity(layers);
        for l in 0..layers {
            let entries: Vec<_> = seqs.iter().zip(&counts).map(|(s, c)| (s.layer(l), *c)).collect();
            tables.push(ShadowTable::new(ops, &entries)?);
        }
        let (d, kvh) = (layout.head_dim, layout.kv_heads);
        let e = seqs.len() * kvh;
        let mut ptrs = Vec::with_capacity(layers * 2 * e);
        let mut lens = Vec::with_capacity(e);
        let mut selected = 0u64;
        for c in &counts {
            let (_, len) = layout.attended_rows(c);
            lens.extend(std::iter::repeat_n(len as i32, kvh));
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
            pool,
            dev_pool: pool.device(),
            fetch,
            fetch_ops: None,
            gatherer: None,
            gather: Cell::new(GatherTimes::default()),
            marks: None,
            fetch_marks: None,
            attn_ptrs: ops.device().upload(&ptrs)?,
            lens: ops.device().upload(&lens)?,
            max_len,
            selected,
        })
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        self.tables[0].batch()
    }

    /// Runs the zero-copy fetch on `ops`'s stream (when given), concurrently with the
    /// key rebuild on the step's stream: the fetch waits for the layer's miss lists, the
    /// attention for the fetch.
    pub fn with_fetch_stream(mut self, ops: Option<&'a CudaOps>) -> Self {
        self.fetch_ops = ops;
        self
    }

    /// Copies the cpu-gather path's missed chunks with `g` (when given) instead of
    /// rayon's threads.
    pub fn with_gatherer(mut self, g: Option<&'a dyn ChunkGather>) -> Self {
        self.gatherer = g;
        self
    }

    /// Times every stage of every layer with events on the GPU ([`ShadowStep::take_marks`]).
    pub fn with_stage_times(mut self) -> Self {
        self.marks = Some(RefCell::new(Vec::new()));
        self.fetch_marks = Some(RefCell::new(Vec::new()));
        self
    }

    /// The batch's layout.
    pub fn layout(&self) -> &ShadowLayout {
        &self.layout
    }

    /// Layer `l`'s attention for the step's rows (one per sequence): splits `qkv`
    /// (`[batch, (heads + 2·kv_heads)·d]`, `bias` added) into the rotated queries `q`
    /// and the new key and value appended to each recent window (at `positions`), then
    /// selects, diffs, rebuilds and fetches the missed chunks, writes the attention
    /// output to `out` `[batch, heads·d]`, and folds full windows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend_layer(
        &self,
        ops: &CudaOps,
        l: usize,
        (q, qkv, bias): (&mut CudaSlice<bf16>, &CudaSlice<bf16>, Option<&CudaSlice<bf16>>),
        positions: &CudaView<'_, i32>,
        inv_freq: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        scratch: &mut StepScratch,
        ws: &mut DecodeWorkspace,
    ) -> Result<()> {
        let t = &self.tables[l];
        let lay = &self.layout;
        let heads = lay.kv_heads * lay.group;
        self.mark(ops, Stage::Start)?;
        ops.shadow_qkv_append(q, qkv, bias, positions, inv_freq, t, heads)?;
        self.mark(ops, Stage::Append)?;
        ops.shadow_scores(t, &*q, scratch)?;
        self.mark(ops, Stage::Scores)?;
        ops.shadow_top_k(t, &scratch.scores, &mut scratch.selected)?;
        self.mark(ops, Stage::Select)?;
        ops.shadow_reuse(t, scratch)?;
        self.mark(ops, Stage::Reuse)?;
        if lay.tier > 0 {
            // Before the fetch, which may replace the entries the hits come from.
            ops.shadow_tier_copy(t, scratch)?;
            self.mark(ops, Stage::Tier)?;
        }
        let tier_base = (lay.tier > 0).then_some(&scratch.tier_base);
        match self.fetch {
            FetchPath::ZeroCopy => {
                // The fetch reads the miss lists and writes the missed slots' values; the
                // rebuild reads the lists and writes their keys: the two run side by
                // side when the step has a fetch stream (few blocks reading PCIe beside
                // many computing), and the attention waits for both.
                let fetch = |on: &CudaOps| {
                    // SAFETY: the pool is registered with the device (GpuValuePool) and
                    // each sequence reads only its own leased slot.
                    unsafe {
                        on.shadow_fetch_values(
                            t,
                            &scratch.misses,
                            &scratch.fetch_count,
                            tier_base,
                            &self.dev_pool,
                            l,
                            FETCH_BLOCKS,
                        )
                    }
                };
                if let Some(side) = self.fetch_ops {
                    side.device().stream().join(ops.device().stream())?;
                    let begin = self
                        .fetch_marks
                        .as_ref()
                        .map(|_| side.device().event(true))
                        .transpose()?;
                    if let Some(e) = &begin {
                        e.record(side.device().stream())?;
                    }
                    fetch(side)?;
                    if let (Some(marks), Some(begin)) = (&self.fetch_marks, begin) {
                        let end = side.device().event(true)?;
                        end.record(side.device().stream())?;
                        marks.borrow_mut().push((begin, end));
                    }
                }
                ops.shadow_rebuild(t, &scratch.misses, &scratch.miss_count, inv_freq)?;
                self.mark(ops, Stage::Rebuild)?;
                match self.fetch_ops {
                    Some(side) => ops.device().stream().join(side.device().stream())?,
                    None => fetch(ops)?,
                }
                self.mark(ops, Stage::Fetch)?;
            }
            FetchPath::CpuGather => self.cpu_gather(ops, l, scratch, inv_freq)?,
        }
        let e = self.batch() * lay.kv_heads;
        let s = ops.device().stream();
        let ptrs = self.attn_ptrs.device_ptr(s).0 + 8 * (2 * l * e) as u64;
        let args = DecodeArgs {
            out: out.device_ptr(s).0,
            q: q.device_ptr(s).0,
            k_ptrs: ptrs,
            v_ptrs: ptrs + 8 * e as u64,
            lens: self.lens.device_ptr(s).0,
            batch: e,
            max_len: self.max_len,
        };
        let shape = AttnShape {
            heads: lay.group,
            kv_heads: 1,
            head_dim: lay.head_dim,
        };
        let part = partition_len(e, 1, self.max_len, ops.decode_slots());
        // SAFETY: q and out hold batch·heads·d values (the step's rows); each entry's
        // address is its head's first attended row, `lens` rows of d values inside the
        // attention buffers (attended_rows), which the tables borrow for the step.
        unsafe { ops.flash_decode_raw(&args, shape, ws, part)? };
        self.mark(ops, Stage::Attend)?;
        // SAFETY: as the fetch: the registered pool, each sequence its own slot.
        unsafe { ops.shadow_fold(t, &self.dev_pool, l)? };
        self.mark(ops, Stage::Fold)
    }

    /// With stage timing on, records an event marking the end of `stage` (or the start
    /// of the layer's work) on `ops`'s stream.
    fn mark(&self, ops: &CudaOps, stage: Stage) -> Result<()> {
        if let Some(marks) = &self.marks {
            let e = ops.device().event(true)?;
            e.record(ops.device().stream())?;
            marks.borrow_mut().push((stage, e));
        }
        Ok(())
    }

    /// The stage marks recorded (empty without timing), to read once the step is done.
    pub fn take_marks(&self) -> Vec<(Stage, CudaEvent)> {
        self.marks.as_ref().map(|m| m.take()).unwrap_or_default()
    }

    /// The (begin, end) events of each layer's fetch on the fetch stream (empty without
    /// timing or without a fetch stream), to read once the step is done.
    pub fn take_fetch_marks(&self) -> Vec<(CudaEvent, CudaEvent)> {
        self.fetch_marks.as_ref().map(|m| m.take()).unwrap_or_default()
    }

    /// The cpu-gather fetch of layer `l`: reads the miss lists back, queues the key
    /// rebuild, gathers the missed chunks from the pool into pinned staging on the
    /// host's threads meanwhile, then copies the staging to the GPU and scatters it.
    fn cpu_gather(&self, ops: &CudaOps, l: usize, scratch: &mut StepScratch, inv_freq: &CudaSlice<f32>) -> Result<()> {
        let t = &self.tables[l];
        let lay = &self.layout;
        let batch = t.batch();
        if scratch.gather.is_none() {
            scratch.gather = Some(GatherBuffers::new(ops, lay, scratch.batch())?);
        }
        let s = ops.device().stream();
        let heads = batch * lay.kv_heads;
        {
            let g = scratch.gather.as_mut().expect("made above");
            s.memcpy_dtoh(&scratch.misses.slice(0..heads * lay.slots * 2), &mut g.misses)?;
            s.memcpy_dtoh(&scratch.fetch_count.slice(0..heads), &mut g.miss_count)?;
        }
        let lists = ops.device().event(false)?;
        lists.record(s)?;
        // The GPU rebuilds the keys while the host gathers the values.
        ops.shadow_rebuild(t, &scratch.misses, &scratch.miss_count, inv_freq)?;
        self.mark(ops, Stage::Rebuild)?;
        let t0 = Instant::now();
        lists.synchronize()?;
        let t1 = Instant::now();
        let g = scratch.gather.as_mut().expect("made above");
        let (misses, counts) = (g.misses.as_slice()?, g.miss_count.as_slice()?);
        let shape = self.dev_pool.shape;
        let chunk_elems = shape.chunk_elems;
        // Each miss's source in the pool, in list order (sequence, head, place).
        let mut sources = Vec::new();
        for (e, &n) in counts[..heads].iter().enumerate() {
            let (b, h) = (e / lay.kv_heads, e % lay.kv_heads);
            let seq = t.counts()[b].pool_seq as usize;
            for j in 0..n.max(0) as usize {
                let chunk = misses[(e * lay.slots + j) * 2 + 1] as usize;
                sources.push(self.dev_pool.chunk_offset(l, seq, h, chunk));
            }
        }
        let staging = g.staging.as_mut_slice()?;
        ensure!(
            sources.len() * chunk_elems <= staging.len(),
            "cpu-gather: {} misses overflow the staging",
            sources.len()
        );
        // SAFETY: the pool's memory holds `shape` bf16 values; the offsets are of chunks
        // inside it (the miss lists name chunks below chunk_cap of leased slots), which
        // the device does not write during this step's fetch.
        let pool: &[bf16] = unsafe {
            std::slice::from_raw_parts(
                self.pool.pool().base_ptr().cast::<bf16>(),
                shape.elems().expect("checked at creation"),
            )
        };
        match self.gatherer {
            Some(g) => g.gather(pool, &sources, chunk_elems, &mut staging[..sources.len() * chunk_elems])?,
            None => RayonGather.gather(pool, &sources, chunk_elems, &mut staging[..sources.len() * chunk_elems])?,
        }
        let t2 = Instant::now();
        let n = sources.len() * chunk_elems;
        let dst = g.device.device_ptr(s).0;
        // SAFETY: the first n staged values go to the device staging (as large); the
        // pinned staging outlives the copy, and the next write to it (the next layer's
        // gather) waits for that layer's miss lists, queued after this copy.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, &staging[..n], s.cu_stream()) }?;
        let tier_base = (lay.tier > 0).then_some(&scratch.tier_base);
        ops.shadow_scatter_values(
            t,
            &scratch.misses,
            &scratch.fetch_count,
            tier_base,
            &g.device,
            FETCH_BLOCKS,
        )?;
        self.mark(ops, Stage::Fetch)?;
        let mut times = self.gather.get();
        times.wait_secs += (t1 - t0).as_secs_f64();
        times.gather_secs += (t2 - t1).as_secs_f64();
        times.bytes += 2 * n as u64;
        self.gather.set(times);
        Ok(())
    }
}

/// The stages of a ShadowKV decode layer, as the stage timing names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The layer's work begins (no stage ends here).
    Start,
    /// The qkv split and the append to the recent window.
    Append,
    /// Landmark logits and their softmax (the scores).
    Scores,
    /// The top-k of the scores.
    Select,
    /// The reuse diff.
    Reuse,
    /// The copy of the misses found in the GPU value tier.
    Tier,
    /// The key rebuild of the misses.
    Rebuild,
    /// The value fetch of the misses (zero-copy, or cpu-gather's copy and scatter).
    Fetch,
    /// Flash-decoding over the attended rows.
    Attend,
    /// The fold of full windows.
    Fold,
}

impl Stage {
    /// The stage's name (metrics and benchmark labels).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Start => "start",
            Stage::Append => "append",
            Stage::Scores => "scores",
            Stage::Select => "top-k",
            Stage::Reuse => "reuse",
            Stage::Tier => "tier",
            Stage::Rebuild => "reconstruct",
            Stage::Fetch => "fetch",
            Stage::Attend => "attention",
            Stage::Fold => "fold",
        }
    }
}

/// Milliseconds of GPU time per stage, from a step's marks (each stage from the
/// previous mark to its own; `Start` marks open a layer).
pub fn stage_ms(marks: &[(Stage, CudaEvent)]) -> Result<Vec<(Stage, f64)>> {
    let mut out: Vec<(Stage, f64)> = Vec::new();
    for w in marks.windows(2) {
        let (_, a) = &w[0];
        let (stage, b) = &w[1];
        if *stage == Stage::Start {
            continue;
        }
        let ms = a.elapsed_ms(b)? as f64;
        match out.iter_mut().find(|(s, _)| s == stage) {
            Some((_, t)) => *t += ms,
            None => out.push((*stage, ms)),
        }
    }
    Ok(out)
}

/// How a decode step gets the missed values to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchPath {
    /// A kernel reads them from the registered host pool.
    ZeroCopy,
    /// Host threads gather them into pinned staging; one copy and a scatter kernel.
    CpuGather,
}

/// Where the cpu-gather path spent its host time.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatherTimes {
    /// Waiting for the miss lists.
    pub wait_secs: f64,
    /// Copying the chunks into staging.
    pub gather_secs: f64,
    /// Bytes gathered.
    pub bytes: u64,
}

/// The cpu-gather path's chunk copy: chunk `i` of `dst` (chunks of `chunk` values) is
/// `src[sources[i] .. sources[i] + chunk]`. The pipeline's pinned gather threads
/// implement it; [`RayonGather`] is the default.
pub trait ChunkGather: Sync {
    /// Copies every chunk (`dst` holds exactly `sources.len()` chunks).
    fn gather(&self, src: &[bf16], sources: &[usize], chunk: usize, dst: &mut [bf16]) -> Result<()>;
}

/// [`ChunkGather`] on rayon's global thread pool.
pub struct RayonGather;

impl ChunkGather for RayonGather {
    fn gather(&self, src: &[bf16], sources: &[usize], chunk: usize, dst: &mut [bf16]) -> Result<()> {
        ensure!(
            dst.len() == sources.len() * chunk,
            "gather: {} chunks of {chunk} into {} values",
            sources.len(),
            dst.len()
        );
        ensure!(
            sources
                .iter()
                .all(|&s| s.checked_add(chunk).is_some_and(|e| e <= src.len())),
            "gather: a chunk lies outside the pool"
        );
        dst.par_chunks_mut(chunk)
            .zip(sources.par_iter())
            .for_each(|(d, &s)| d.copy_from_slice(&src[s..s + chunk]));
        Ok(())
    }
}
