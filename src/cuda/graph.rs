//! Sampling steps, with decode steps captured as CUDA graphs, run synchronously
//! ([`CudaModel::step`]) or queued on a lane of their own ([`CudaModel::submit`] and
//! [`CudaModel::complete`]).
//!
//! A decode step (one token per sequence) launches about ten kernels per layer; at a
//! small batch their launch overhead rivals the work. [`StepGraphs`] captures the whole
//! step, sampling included, once per batch shape and replays it: the step's inputs
//! live in device buffers that stay put ([`CudaModel::stage_step`]), so a replay only
//! needs the few host-to-device copies of the new ids and positions before it.
//!
//! A captured step is keyed by the batch's caches (addresses and capacities) and a
//! length bucket (the flash-decoding grid is sized for the bucket's longest sequence;
//! blocks past a sequence's length exit at once); when the batch changes, a sequence
//! outgrows the bucket or the scratch buffers move, the step runs eagerly and is
//! captured again.
//!
//! A [`Lane`] is a stream of its own with its own scratch, captured step and read-back
//! buffers: the server runs decode steps on one lane and long prefills on another, and
//! queues step n+1 of a lane before it reads step n's tokens back. Step n+1 can take a
//! sequence's input token straight from the tokens step n sampled on the device (see
//! [`CudaModel::submit`]), so the host never waits for them to launch the next step.

use super::device::StreamPriority;
use super::model::{Attend, CudaModel, GpuCache, GpuSeq, Scratch, StageSeq, StepPlan};
use super::ops::CudaOps;
use super::shadow::decode::{split_batch, FetchPath};
use super::shadow::stages::{stage_marks_bound, stage_ms, SideMark, Stage, StageMark};
use super::shadow::timeline::{gpu_clock_now, step_spans, GpuSpan, Stamps};
use super::shadow::transfer::GatherTransfer;
use super::shadow::{
    ChunkGather, GatherTimes, GpuShadowSeq, GpuValuePool, RayonGather, ShadowStep, StepScratch, FETCH_BLOCKS,
};
use crate::cpu::LogitsWanted;
use anyhow::{ensure, Result};
use cudarc::driver::{sys, CudaEvent, CudaGraph, PinnedHostSlice};
use std::sync::Arc;

/// Sequence lengths are bucketed to multiples of this for a captured step.
const LEN_BUCKET: usize = 1024;

/// The captured decode step of a batch, if any, and counters. With a tensor-parallel
/// model, drop it before the model: its graph holds a reference on the communicator
/// it captured (see [`crate::cuda::parallel`]); a [`Lane`]'s does so by itself.
pub struct StepGraphs {
    enabled: bool,
    current: Option<Captured>,
    /// Steps captured.
    pub captures: usize,
    /// Steps replayed from a capture.
    pub replays: usize,
    /// Steps run eagerly.
    pub eager: usize,
    /// Captures that failed (their steps ran eagerly all the same): another thread's
    /// device-wide synchronisation, for one, invalidates a capture in progress.
    pub failed: usize,
    /// Steps left to run eagerly before the next capture is tried, after a failure.
    backoff: usize,
    /// Capture failures in a row.
    streak: u32,
}

/// Steps run eagerly after the n-th capture failure in a row: 2^n, at most this many.
const MAX_BACKOFF: usize = 256;

struct Captured {
    graph: CudaGraph,
    key: Vec<(u64, usize)>,
    bucket: usize,
    generation: u64,
    workspace: (u64, u64),
}

// SAFETY: an executable CUDA graph is a driver object of its context, not of a thread:
// any thread with the context current may launch it (`CudaGraph::launch` binds the
// context). `Captured` is only reached through `&mut StepGraphs`, so one thread at a
// time uses it; it moves with the engine to the engine thread.
unsafe impl Send for Captured {}

impl StepGraphs {
    /// Graph capture on (`enabled`) or every step eager.
    pub fn new(enabled: bool) -> Self {
        StepGraphs {
            enabled,
            current: None,
            captures: 0,
            replays: 0,
            eager: 0,
            failed: 0,
            backoff: 0,
            streak: 0,
        }
    }

    /// Whether decode steps are captured.
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// A stream of work of its own: its operations handle (stream and cuBLAS), scratch,
/// captured decode step and pinned buffers the sampled tokens are read back into.
///
/// Dropped, a lane destroys its captured step before its scratch gives its
/// tensor-parallel communicator back: the graph holds NCCL's reference on the
/// communicator, which must be gone before the communicator is destroyed (see
/// [`crate::cuda::parallel`]).
pub struct Lane {
    ops: CudaOps,
    sc: Scratch,
    /// The lane's captured decode step and counters.
    pub graphs: StepGraphs,
    readback: [Option<PinnedHostSlice<u32>>; 2],
    next_buf: usize,
    /// Rows sampled by the lane's last queued step (bounds `prev` of the next).
    last_picked: usize,
    /// ShadowKV chunks its completed steps selected (hits and misses together), and of
    /// them the slot and tier hits.
    shadow_selected: u64,
    shadow_hits: [u64; 2],
    /// Pinned buffers the hit counters of a ShadowKV step are read back into, one per
    /// read-back buffer (as `readback`): read when the step completes.
    hits_back: [Option<PinnedHostSlice<u64>>; 2],
    /// Host time of the cpu-gather path's steps.
    pub gather: GatherTimes,
    /// One ShadowKV step in how many times its stages on the GPU (0: none).
    stage_every: usize,
    /// ShadowKV steps submitted (which of them time their stages).
    shadow_steps: usize,
    /// Completed ShadowKV steps whose stages [`Lane::stage_ms`] sums.
    pub stage_steps: usize,
    /// Micro-batches a ShadowKV step's attention is split into.
    micro_batches: usize,
    /// Blocks of a ShadowKV step's zero-copy value fetch.
    fetch_blocks: usize,
    /// While tracing: the anchor stamp (GPU nanoseconds) the spans are timed from, and
    /// the spans of the steps completed since.
    trace: Option<(u64, Vec<GpuSpan>)>,
    /// Milliseconds of GPU time per ShadowKV stage, summed over completed steps.
    pub stage_ms: Vec<(Stage, f64)>,
    /// Room for stage marks' stamps, read back from completed steps and kept for the
    /// next timed steps ([`ShadowStep::with_stage_times`]).
    spare_stamps: Vec<Stamps>,
    /// The stream the zero-copy value fetch runs on beside the key rebuild (made at
    /// the lane's first ShadowKV step).
    fetch_ops: Option<CudaOps>,
    /// The stream a ShadowKV step folds full windows on beside its next layers (made at
    /// the lane's first ShadowKV step).
    fold_ops: Option<CudaOps>,
    /// The streams of a zero-copy ShadowKV step's micro-batches but the last (made as a
    /// step first needs them, one step above the lane's priority: the fetch stream
    /// serves the micro-batches in order, so the first ones' lists should be out first).
    part_ops: Vec<CudaOps>,
    /// The priority the lane's stream was made at.
    priority: StreamPriority,
    /// The cpu-gather path's chunk copy (none: rayon's threads).
    gatherer: Option<Arc<dyn ChunkGather + Send>>,
    /// The cpu-gather path's actor (made at the lane's first cpu-gather step).
    transfer: Option<GatherTransfer>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Before the fields (`sc`'s communicator among them) go; see the type's
        // documentation.
        self.graphs.current = None;
    }
}

/// One ShadowKV sequence's part of a decode step.
pub struct ShadowSeqInput<'a> {
    /// Its one new token (ignored where the step takes it from the previous one).
    pub token: &'a [u32],
    /// Its state, extended by the step.
    pub seq: &'a mut GpuShadowSeq,
}

impl Lane {
    /// The lane's operations (its stream).
    pub fn ops(&self) -> &CudaOps {
        &self.ops
    }

    /// Has the cpu-gather path copy the missed chunks with `g` (the pipeline's pinned
    /// gather threads) instead of rayon's threads.
    pub fn set_gatherer(&mut self, g: Arc<dyn ChunkGather + Send>) {
        self.gatherer = Some(g);
    }

    /// Starts recording the GPU timeline of its ShadowKV steps (each of them timed by
    /// stage until the trace is taken, whatever [`Lane::time_stages`] says): stamps the
    /// GPU's clock on an idle stream ([`gpu_clock_now`]) and returns the host time it
    /// stands for; [`Lane::take_trace`] gives the spans of the steps completed since,
    /// in milliseconds from it. The lane's queued steps go on: waiting for them would
    /// start every lane's next steps at once, and lanes that decode side by side would
    /// then run in step, their fetches together, which the trace would show instead
    /// of their usual overlap.
    pub fn start_trace(&mut self) -> Result<std::time::Instant> {
        let (anchor, at) = gpu_clock_now(&self.ops)?;
        self.trace = Some((anchor, Vec::new()));
        Ok(at)
    }

    /// The spans recorded since the last call, recording on (empty when not tracing).
    pub fn drain_trace(&mut self) -> Vec<GpuSpan> {
        self.trace.as_mut().map(|(_, s)| std::mem::take(s)).unwrap_or_default()
    }

    /// Stops recording and returns the spans recorded (empty when not tracing).
    pub fn take_trace(&mut self) -> Vec<GpuSpan> {
        self.trace.take().map(|(_, s)| s).unwrap_or_default()
    }

    /// Times the stages of one ShadowKV step in `every` (0: none) with timestamps the
    /// GPU writes ([`crate::cuda::shadow::timeline::Stamps`]), summed in
    /// [`Lane::stage_ms`] as the steps complete (counted in [`Lane::stage_steps`]); while
    /// a trace records ([`Lane::start_trace`]) every step is timed. The stamps cost: they
    /// stop each kernel from starting during the tail of the one before it, 0.5 ms of a
    /// 20 ms step at 57 × 61440 tokens on the H200 (GPU value tier on).
    pub fn time_stages(&mut self, every: usize) {
        self.stage_every = every;
    }

    /// ShadowKV chunks selected, found in their slot and found in the GPU value tier by
    /// the lane's completed steps (read back with each step: no wait for the GPU).
    pub fn shadow_counters(&self) -> ShadowCounters {
        ShadowCounters {
            selected: self.shadow_selected,
            hits: self.shadow_hits[0],
            tier_hits: self.shadow_hits[1],
        }
    }

    /// Splits the attention of its ShadowKV steps into `n` micro-batches (at least 1;
    /// at most one a sequence), so that one micro-batch's value fetch runs while the GPU
    /// selects and rebuilds for the others ([`crate::cuda::shadow::ShadowStep`]).
    pub fn set_micro_batches(&mut self, n: usize) {
        self.micro_batches = n.max(1);
    }

    /// Runs the zero-copy value fetch of its ShadowKV steps on `n` blocks (at least 1;
    /// default [`FETCH_BLOCKS`]).
    pub fn set_fetch_blocks(&mut self, n: usize) {
        self.fetch_blocks = n.max(1);
    }
}

/// A step queued on a lane; [`CudaModel::complete`] waits for it and gives its tokens.
pub struct StepTicket {
    picked: usize,
    buf: usize,
    done: Arc<CudaEvent>,
    /// A ShadowKV step's stage marks and side-stream marks (empty without stage
    /// timing), read when it completes: they travel with their step, so completing one
    /// step never waits for the next one queued behind it.
    marks: Vec<StageMark>,
    side_marks: Vec<SideMark>,
    /// The marks' timestamps, copied to the host by the step's end.
    stamps: Option<Stamps>,
    /// Whether the lane was tracing when the step was queued (its spans then belong to
    /// the trace; an older step's would precede the trace's anchor).
    traced: bool,
    /// The cpu-gather actor's jobs of the step (empty without).
    gather_jobs: std::ops::Range<u64>,
    /// A ShadowKV step's chunks selected and micro-batches (whose hit counters it reads
    /// back into the lane's `hits_back`).
    shadow: Option<(u64, usize)>,
}

impl StepTicket {
    /// Whether the step has finished on the GPU (never blocks).
    pub fn is_done(&self) -> bool {
        self.done.is_complete()
    }

    /// The event that marks the step's end, for a thread that watches it while
    /// another holds the ticket (the tensor-parallel backend's ranks).
    pub fn end_event(&self) -> Arc<CudaEvent> {
        self.done.clone()
    }
}

impl CudaModel {
    /// A new lane on its own stream at `priority`; `graphs` turns decode-step capture on.
    pub fn new_lane(&self, priority: StreamPriority, graphs: bool) -> Result<Lane> {
        Ok(Self::lane_on(self.ops().fork(priority)?, priority, graphs))
    }

    /// As [`CudaModel::new_lane`], on a stream whose kernels run on at least `sms` of
    /// the GPU's multiprocessors only ([`CudaOps::fork_on_sms`]).
    pub fn new_lane_on_sms(&self, priority: StreamPriority, graphs: bool, sms: u32) -> Result<Lane> {
        Ok(Self::lane_on(self.ops().fork_on_sms(priority, sms)?, priority, graphs))
    }

    fn lane_on(ops: CudaOps, priority: StreamPriority, graphs: bool) -> Lane {
        Lane {
            ops,
            sc: Scratch::default(),
            graphs: StepGraphs::new(graphs),
            readback: [None, None],
            next_buf: 0,
            last_picked: 0,
            shadow_selected: 0,
            shadow_hits: [0; 2],
            hits_back: [None, None],
            gather: GatherTimes::default(),
            stage_every: 0,
            shadow_steps: 0,
            stage_steps: 0,
            micro_batches: 1,
            fetch_blocks: FETCH_BLOCKS,
            trace: None,
            stage_ms: Vec::new(),
            spare_stamps: Vec::new(),
            fetch_ops: None,
            fold_ops: None,
            part_ops: Vec::new(),
            priority,
            gatherer: None,
            transfer: None,
        }
    }

    /// Runs one step and samples one token for every sequence that wants logits
    /// (`LogitsWanted::Last`), with `sampling[i]` the
    /// [`crate::engine::sampling::SamplingParams::device_row`] of sequence `i`; returns
    /// the tokens of those sequences, in order. Decode steps are replayed from a CUDA
    /// graph when `graphs` allows.
    pub fn step(&self, seqs: &mut [GpuSeq], sampling: &[[u64; 5]], graphs: &mut StepGraphs) -> Result<Vec<u32>> {
        let mut sc = self.scratch.lock().expect("scratch lock");
        let ops = self.ops();
        let n = self.queue_step(ops, &mut sc, graphs, seqs, sampling, &[])?;
        let tokens = if n == 0 {
            Vec::new()
        } else {
            let t = sc.tokens.as_ref().expect("reserved");
            ops.device().stream().clone_dtoh(&t.slice(0..n))?
        };
        ops.device().synchronize()?;
        Ok(tokens)
    }

    /// Queues one step on `lane` (as [`CudaModel::step`]) and returns at once. Where
    /// `prev[i] = Some(r)`, sequence `i`'s one input token is the token the lane's
    /// previous step sampled for its `r`-th sampled row, read on the device (its id in
    /// `seqs` is ignored); `prev` may be empty. The caches advance now; they must stay
    /// alive until the ticket completes.
    pub fn submit(
        &self,
        lane: &mut Lane,
        seqs: &mut [GpuSeq],
        sampling: &[[u64; 5]],
        prev: &[Option<u32>],
    ) -> Result<StepTicket> {
        self.check_previous(lane, prev)?;
        let n = self.queue_step(&lane.ops, &mut lane.sc, &mut lane.graphs, seqs, sampling, prev)?;
        Self::read_back(lane, n)
    }

    /// Queues one ShadowKV decode step on `lane`: each sequence of `seqs` takes its one
    /// token (from the lane's previous step where `prev` says so, as
    /// [`CudaModel::submit`]), attends through its ShadowKV state with its values in
    /// `pool` (fetched by `fetch`), and samples the next; returns at once (with
    /// `cpu-gather`, once the host has gathered every layer's values). Run eagerly (no
    /// graph yet).
    pub fn submit_shadow(
        &self,
        lane: &mut Lane,
        seqs: &mut [ShadowSeqInput],
        sampling: &[[u64; 5]],
        prev: &[Option<u32>],
        pool: &GpuValuePool,
        fetch: FetchPath,
    ) -> Result<StepTicket> {
        self.check_previous(lane, prev)?;
        ensure!(sampling.len() == seqs.len(), "one sampling row per sequence");
        ensure!(!seqs.is_empty(), "an empty ShadowKV step");
        let staged: Vec<StageSeq> = seqs
            .iter()
            .map(|s| StageSeq {
                tokens: s.token,
                len: s.seq.len(),
                cap: self.config().max_position_embeddings,
                base: 0,
                logits: LogitsWanted::Last,
            })
            .collect();
        if fetch == FetchPath::ZeroCopy && lane.fetch_ops.is_none() {
            lane.fetch_ops = Some(lane.ops.fork(StreamPriority::Highest)?);
        }
        if lane.fold_ops.is_none() {
            lane.fold_ops = Some(lane.ops.fork(lane.priority.lowered())?);
        }
        if fetch == FetchPath::CpuGather {
            let layout = *seqs[0].seq.layer(0).layout();
            let shape = (&layout, seqs.len(), lane.micro_batches);
            if !lane.transfer.as_ref().is_some_and(|t| t.serves(shape, pool)) {
                // The old actor's jobs and buffers are done with once the lane's work is.
                lane.ops.device().synchronize()?;
                let gather: Arc<dyn ChunkGather + Send> = match &lane.gatherer {
                    Some(g) => g.clone(),
                    None => Arc::new(RayonGather),
                };
                lane.transfer = None;
                lane.transfer = Some(GatherTransfer::new(&lane.ops, shape, pool, gather, "cpu-gather")?);
            }
        }
        let parts = split_batch(seqs.len(), lane.micro_batches).len();
        while fetch == FetchPath::ZeroCopy && lane.part_ops.len() + 1 < parts {
            let p = lane.ops.fork(lane.priority.raised())?;
            lane.part_ops.push(p);
        }
        let first_job = lane.transfer.as_ref().map_or(0, |t| t.next_job());
        let (ops, sc) = (&lane.ops, &mut lane.sc);
        let plan = self.stage_rows(ops, sc, &staged, prev)?;
        self.stage_sampling(ops, sc, &plan, sampling)?;
        let step = {
            let refs: Vec<&GpuShadowSeq> = seqs.iter().map(|s| &*s.seq).collect();
            let step = ShadowStep::new(ops, &refs, pool, fetch, lane.micro_batches)?
                .with_fetch_stream(lane.fetch_ops.as_ref())
                .with_fold_stream(lane.fold_ops.as_ref())
                .with_part_streams(&lane.part_ops)
                .with_fetch_blocks(lane.fetch_blocks)
                .with_transfer(lane.transfer.as_ref());
            let timed = lane.trace.is_some() || (lane.stage_every > 0 && lane.shadow_steps % lane.stage_every == 0);
            lane.shadow_steps += 1;
            if timed {
                let room = stage_marks_bound(self.config().num_layers, parts);
                let stamps = match lane.spare_stamps.pop() {
                    Some(mut s) if s.capacity() >= room => {
                        s.clear();
                        s
                    }
                    _ => Stamps::new(ops, room)?,
                };
                step.with_stage_times(stamps)
            } else {
                step
            }
        };
        let layout = *step.layout();
        let parts = step.micro_batches();
        let largest = parts.iter().map(|r| r.len()).max().unwrap_or(0);
        // Scratch only grows: a step of fewer micro-batches uses the first ones (their
        // pinned gather buffers are not made again when the batch size moves).
        if sc.shadow.len() < parts.len()
            || sc.shadow[..parts.len()]
                .iter()
                .any(|s| s.batch() < largest || s.layout() != &layout)
        {
            // Each step reads its own hit counts back (read_back_hits): nothing to keep.
            sc.shadow.clear();
            for _ in parts {
                sc.shadow.push(StepScratch::new(ops, &layout, largest)?);
            }
        }
        let n_parts = parts.len();
        for s in &mut sc.shadow[..n_parts] {
            ops.device().stream().memset_zeros(&mut s.hits)?;
        }
        let encoded = self
            .encode_step(ops, sc, &plan, Attend::Shadow(&step))
            .and_then(|()| self.encode_sampling(ops, sc, &plan))
            .and_then(|()| step.mark_sampled(ops));
        // The layers' folds ran on the fold stream beside the step's later work: the
        // lane's stream waits for them before the step frees its tables, also where
        // queuing failed part-way.
        if let Some(fold) = &lane.fold_ops {
            if let Err(e) = ops.device().stream().join(fold.device().stream()) {
                // Without the join the tables could go while a fold reads them.
                let _ = fold.device().stream().synchronize();
                return Err(e.into());
            }
        }
        encoded?;
        lane.graphs.eager += 1;
        let selected = step.selected;
        let (marks, side_marks) = (step.take_marks(), step.take_side_marks());
        let mut stamps = step.take_stamps();
        drop(step);
        if let Some(stamps) = &mut stamps {
            // Every stream that made stamps is joined before they are read back (the
            // fold stream is, above).
            for side in lane.fetch_ops.iter().chain(&lane.part_ops) {
                ops.device().stream().join(side.device().stream())?;
            }
            stamps.queue_read_back(ops)?;
        }
        for s in seqs.iter_mut() {
            s.seq.advance(&layout);
        }
        Self::read_back_hits(lane, n_parts)?;
        let mut ticket = Self::read_back(lane, plan.picked.len())?;
        ticket.marks = marks;
        ticket.side_marks = side_marks;
        ticket.stamps = stamps;
        ticket.gather_jobs = first_job..lane.transfer.as_ref().map_or(0, |t| t.next_job());
        ticket.shadow = Some((selected, n_parts));
        Ok(ticket)
    }

    /// Stops the tensor-parallel communicators of the model's own stream and of `lanes`
    /// at once, ending collectives that wait for a device that will not come (after a
    /// step failed on some devices of the group only). The model runs no collective
    /// step afterwards. The lanes' captured steps are destroyed first: the rank that
    /// aborts a communicator last waits for every graph that captured it (see
    /// [`crate::cuda::parallel`]).
    pub fn abort_collectives(&self, lanes: &mut [Lane]) {
        for lane in lanes.iter_mut() {
            lane.graphs.current = None;
        }
        let own = match self.scratch.lock() {
            Ok(mut sc) => sc.tp.comm.take(),
            Err(poisoned) => poisoned.into_inner().tp.comm.take(),
        };
        for comm in own
            .into_iter()
            .chain(lanes.iter_mut().filter_map(|l| l.sc.tp.comm.take()))
        {
            comm.abort();
        }
    }

    fn check_previous(&self, lane: &Lane, prev: &[Option<u32>]) -> Result<()> {
        if let Some(r) = prev.iter().flatten().find(|&&r| r as usize >= lane.last_picked) {
            anyhow::bail!(
                "previous-step row {r} does not exist (the lane's last step sampled {} rows)",
                lane.last_picked
            );
        }
        Ok(())
    }

    /// Queues the copy of the hit counters of the step's `parts` micro-batches (their
    /// scratch) into the pinned buffer of the lane's next read-back, which
    /// [`CudaModel::complete`] reads once the step is done.
    fn read_back_hits(lane: &mut Lane, parts: usize) -> Result<()> {
        let slot = &mut lane.hits_back[lane.next_buf];
        if slot.as_ref().is_none_or(|b| b.len() < 2 * parts) {
            // SAFETY: written by the copies below before it is read.
            *slot = Some(unsafe {
                lane.ops
                    .device()
                    .context()
                    .alloc_pinned_with_flags::<u64>(2 * parts.max(8), 0)
            }?);
        }
        let host = slot.as_mut().expect("allocated").as_mut_slice()?;
        let stream = lane.ops.device().stream();
        for (s, h) in lane.sc.shadow[..parts].iter().zip(host.chunks_mut(2)) {
            stream.memcpy_dtoh(&s.hits, h)?;
        }
        Ok(())
    }

    /// Queues the read-back of the `n` tokens the lane's step just sampled and the
    /// event that marks its end.
    fn read_back(lane: &mut Lane, n: usize) -> Result<StepTicket> {
        let buf = lane.next_buf;
        lane.next_buf ^= 1;
        lane.last_picked = n;
        let stream = lane.ops.device().stream().clone();
        if n > 0 {
            let slot = &mut lane.readback[buf];
            if slot.as_ref().is_none_or(|b| b.len() < n) {
                // Plain pinned memory (not write-combined: the host reads it).
                // SAFETY: the buffer is written by the copy below before it is read.
                *slot = Some(unsafe { lane.ops.device().context().alloc_pinned_with_flags::<u32>(n.max(64), 0) }?);
            }
            let t = lane.sc.tokens.as_ref().expect("reserved");
            stream.memcpy_dtoh(&t.slice(0..n), slot.as_mut().expect("allocated"))?;
        }
        let done = Arc::new(lane.ops.device().event(false)?);
        done.record(&stream)?;
        Ok(StepTicket {
            picked: n,
            buf,
            done,
            marks: Vec::new(),
            side_marks: Vec::new(),
            stamps: None,
            traced: lane.trace.is_some(),
            gather_jobs: 0..0,
            shadow: None,
        })
    }

    /// Waits for a step queued with [`CudaModel::submit`] and returns its sampled
    /// tokens, in order, raising any error the GPU met on the way.
    pub fn complete(&self, lane: &mut Lane, t: StepTicket) -> Result<Vec<u32>> {
        t.done.synchronize()?;
        lane.ops.device().context().check_err()?;
        if let Some(tr) = &lane.transfer {
            lane.gather += tr.take_times();
            if let Some(e) = tr.take_error(t.gather_jobs.clone()) {
                anyhow::bail!("cpu-gather: {e}");
            }
        }
        if let Some((selected, parts)) = t.shadow {
            let hits = lane.hits_back[t.buf]
                .as_ref()
                .expect("written by submit_shadow")
                .as_slice()?;
            for h in hits[..2 * parts].chunks(2) {
                lane.shadow_hits[0] += h[0];
                lane.shadow_hits[1] += h[1];
            }
            lane.shadow_selected += selected;
        }
        if let Some(stamps) = t.stamps {
            let ns = stamps.read()?;
            if let (Some((anchor, spans)), true) = (&mut lane.trace, t.traced) {
                spans.extend(step_spans(*anchor, &t.marks, &t.side_marks, ns));
            }
            if !t.marks.is_empty() {
                lane.stage_steps += 1;
                for (stage, ms) in stage_ms(&t.marks, &t.side_marks, ns) {
                    match lane.stage_ms.iter_mut().find(|(s, _)| *s == stage) {
                        Some((_, t)) => *t += ms,
                        None => lane.stage_ms.push((stage, ms)),
                    }
                }
            }
            // Read: the next timed step writes its stamps there.
            lane.spare_stamps.push(stamps);
        }
        if t.picked == 0 {
            return Ok(Vec::new());
        }
        let buf = lane.readback[t.buf].as_ref().expect("written by submit");
        Ok(buf.as_slice()?[..t.picked].to_vec())
    }

    /// Stages and queues one sampling step on `ops`'s stream (replaying or capturing a
    /// decode graph where `graphs` allows) and advances the caches; returns how many
    /// tokens it samples (left in `sc.tokens`).
    fn queue_step(
        &self,
        ops: &CudaOps,
        sc: &mut Scratch,
        graphs: &mut StepGraphs,
        seqs: &mut [GpuSeq],
        sampling: &[[u64; 5]],
        prev: &[Option<u32>],
    ) -> Result<usize> {
        ensure!(
            seqs.iter().all(|s| s.logits != LogitsWanted::All),
            "a sampling step takes the logits of each sequence's last token only"
        );
        ensure!(sampling.len() == seqs.len(), "one sampling row per sequence");
        let before = sc.generation;
        let mut plan = self.stage_step(ops, sc, seqs, prev)?;
        let rows: Vec<[u64; 5]> = seqs
            .iter()
            .zip(sampling)
            .filter(|(s, _)| s.logits == LogitsWanted::Last && !s.tokens.is_empty())
            .map(|(_, r)| *r)
            .collect();
        self.stage_sampling(ops, sc, &plan, &rows)?;
        let caches: Vec<&GpuCache> = seqs.iter().map(|s| &*s.cache).collect();
        let key: Vec<(u64, usize)> = caches.iter().map(|c| (c.device_addr(self), c.capacity())).collect();
        let capture = graphs.enabled && plan.decode && !plan.picked.is_empty();
        if capture {
            plan.max_len = plan.max_len.div_ceil(LEN_BUCKET) * LEN_BUCKET;
            let reusable = graphs.current.as_ref().is_some_and(|g| {
                g.key == key
                    && g.bucket == plan.max_len
                    && g.generation == sc.generation
                    && sc.generation == before
                    && g.workspace == sc.decode_ws.addresses(ops)
            });
            if reusable {
                graphs.current.as_ref().expect("checked").graph.launch()?;
                graphs.replays += 1;
            } else {
                graphs.current = None;
                // Run it eagerly first (this step's result): that sizes every workspace
                // for this bucket, so that nothing is allocated while capturing; the
                // capture only records, its first launch is the next step's.
                self.encode_step(ops, sc, &plan, Attend::Dense(&caches))?;
                self.encode_sampling(ops, sc, &plan)?;
                graphs.eager += 1;
                if graphs.backoff > 0 {
                    graphs.backoff -= 1;
                } else {
                    self.capture_step(ops, sc, graphs, &plan, &caches, key)?;
                }
            }
        } else {
            self.encode_step(ops, sc, &plan, Attend::Dense(&caches))?;
            self.encode_sampling(ops, sc, &plan)?;
            graphs.eager += 1;
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        Ok(plan.picked.len())
    }

    /// Captures the step just run eagerly into `graphs` (its first replay is the next
    /// step's). A capture that fails (invalidated by another thread's work on the device,
    /// say) costs nothing but the graph: the step's result is already queued, so it is
    /// counted, logged, and captures pause for a while, doubling with each failure in a
    /// row. Errors outside the capture (the stream's own) are returned.
    fn capture_step(
        &self,
        ops: &CudaOps,
        sc: &mut Scratch,
        graphs: &mut StepGraphs,
        plan: &StepPlan,
        caches: &[&GpuCache],
        key: Vec<(u64, usize)>,
    ) -> Result<()> {
        let gen = sc.generation;
        let stream = ops.device().stream().clone();
        let captured = match stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            Err(e) => Err(e.into()),
            Ok(()) => {
                let queued = self
                    .encode_step(ops, sc, plan, Attend::Dense(caches))
                    .and_then(|()| self.encode_sampling(ops, sc, plan));
                let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                Self::captured(queued, ended, sc.generation == gen)
            }
        };
        match captured {
            Ok(graph) => {
                graphs.current = Some(Captured {
                    graph,
                    key,
                    bucket: plan.max_len,
                    generation: gen,
                    workspace: sc.decode_ws.addresses(ops),
                });
                graphs.captures += 1;
                graphs.streak = 0;
            }
            Err(e) => {
                // The stream must have left capture mode whatever went wrong.
                ensure!(
                    stream.capture_status()? == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
                    "the decode stream is still capturing after a failed capture: {e:#}"
                );
                graphs.failed += 1;
                graphs.streak += 1;
                graphs.backoff = (1usize << graphs.streak.min(16)).min(MAX_BACKOFF);
                tracing::warn!(
                    "capturing a decode step failed ({e:#}); it ran without a graph, {} eager steps before the next try",
                    graphs.backoff
                );
            }
        }
        Ok(())
    }

    /// The graph of a capture, given how its recording (`queued`) and its end went and
    /// whether the scratch buffers stayed put meanwhile (`kept`); uploaded.
    fn captured(
        queued: Result<()>,
        ended: std::result::Result<Option<CudaGraph>, cudarc::driver::DriverError>,
        kept: bool,
    ) -> Result<CudaGraph> {
        match (queued, ended) {
            (Ok(()), Ok(Some(graph))) if kept => {
                graph.upload()?;
                Ok(graph)
            }
            (Ok(()), Ok(Some(_))) => Err(anyhow::anyhow!("scratch buffers moved while capturing a step")),
            (Ok(()), Ok(None)) => Err(anyhow::anyhow!("the capture recorded no graph")),
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(e.into()),
        }
    }

    fn stage_sampling(&self, ops: &CudaOps, sc: &mut Scratch, plan: &StepPlan, rows: &[[u64; 5]]) -> Result<()> {
        ensure!(rows.len() == plan.picked.len(), "one sampling row per sampled sequence");
        if rows.is_empty() {
            return Ok(());
        }
        let flat: Vec<u64> = rows.iter().flatten().copied().collect();
        let addrs = sc.addrs.as_mut().expect("reserved");
        ops.device()
            .stream()
            .memcpy_htod(&flat, &mut addrs.slice_mut(plan.layout.sampling()))?;
        Ok(())
    }

    fn encode_sampling(&self, ops: &CudaOps, sc: &mut Scratch, plan: &StepPlan) -> Result<()> {
        let n = plan.picked.len();
        if n == 0 {
            return Ok(());
        }
        let (logits, addrs, tokens) = (
            sc.logits.as_ref().expect("reserved"),
            sc.addrs.as_ref().expect("reserved"),
            sc.tokens.as_mut().expect("reserved"),
        );
        ops.sample(
            tokens,
            logits,
            &addrs.slice(plan.layout.sampling()),
            n,
            self.config().vocab_size,
        )
    }
}

/// ShadowKV counters of decode steps, summed over layers, KV heads and sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowCounters {
    /// Chunks selected.
    pub selected: u64,
    /// Of them, found in their slot (no fetch, no rebuild).
    pub hits: u64,
    /// Of the others, found in the GPU value tier (rebuilt, copied from device memory).
    pub tier_hits: u64,
}

impl ShadowCounters {
    /// Chunks whose values came from the host.
    pub fn fetched(&self) -> u64 {
        self.selected.saturating_sub(self.hits + self.tier_hits)
    }
}

impl std::ops::Add for ShadowCounters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        ShadowCounters {
            selected: self.selected + o.selected,
            hits: self.hits + o.hits,
            tier_hits: self.tier_hits + o.tier_hits,
        }
    }
}

impl std::ops::Sub for ShadowCounters {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        ShadowCounters {
            selected: self.selected - o.selected,
            hits: self.hits - o.hits,
            tier_hits: self.tier_hits - o.tier_hits,
        }
    }
}
