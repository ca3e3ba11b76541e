//! The GPU model behind the scheduler and the generation loop: bf16, tokens sampled on
//! the device, each step queued on a lane (a CUDA stream of its own) so that the host
//! prepares step n+1 while step n runs. Lane 0 runs at high priority; with a second
//! lane, long prefills run on it at normal priority beside the decode steps, which the
//! GPU then schedules first; with several decode lanes before it
//! ([`CudaBackend::with_decode_lanes`]) their steps run side by side. With the prefill
//! lane on a partition of the multiprocessors ([`CudaBackend::with_prefill_sms`]) the
//! order is the other way round: the prefill first on its partition, the decode steps
//! on the rest.
//!
//! Attention is full (each sequence's dense KV cache on the GPU, allocated at its first
//! step for its prompt and completion) or ShadowKV: a sequence is prefilled densely
//! into a cache that also keeps its keys before RoPE, compressed on the GPU once the
//! prompt is in (low-rank keys, landmarks, outliers and the recent window on the GPU,
//! its values in the registered host pool or a GPU value slot), and decodes through its
//! ShadowKV state; its dense cache is freed once the compression that read it has run.
//!
//! Compressions run on a stream of their own. With a prefill lane, a prompt is handed
//! to the compression thread as its last chunk is queued ([`Worker`]: the compression's
//! host work, the eigenvectors' round trips above all, then runs beside the engine
//! thread, which keeps queueing the other sequences' steps): the compression waits for
//! that chunk only (an event), not for the other prompts' chunks queued on the prefill
//! lane behind it; the sequence sits the decode steps out until its state is in
//! ([`StepBackend::seq_ready`]); the thread frees the dense cache once the compression
//! has run on the GPU, then answers. A sequence that ends before the thread comes to
//! its prompt (at its first token, or its request dropped) is not compressed. Dropping
//! the backend lets the compression in hand end and joins the thread; prompts still
//! queued for it are not compressed (their sequences get an error). With one lane (the loops that prefill
//! every prompt before decoding any), a prompt is compressed on the caller's thread as
//! its last chunk is queued, so that one dense cache is held at a time; the
//! tensor-parallel ranks ([`CudaBackend::with_inline_compression`]) compress on theirs
//! at the sequence's first decode step, the decode lane waiting for the compression.

use super::backend::{BackendStats, LaneSerials, LastSample, SeqSpec, StepBackend, StepInput, StepOutput, StepSeq};
use super::worker::{Pending, Worker};
use crate::cpu::LogitsWanted;
use crate::cuda::device::StreamPriority;
use crate::cuda::graph::ShadowSeqInput;
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::seq::{layer_bytes, sequence_bytes};
use crate::cuda::shadow::stages::Stage;
use crate::cuda::shadow::tier::tier_chunks_for;
use crate::cuda::shadow::{compress_prefill, CompressWorkspace, GpuShadowSeq, GpuValuePool, ShadowLayout, TierSize};
use crate::cuda::{CudaModel, CudaOps, GpuCache, GpuSeq, Lane, ShadowCounters, StepTicket};
use crate::model::config::ModelConfig;
use crate::panics::message as panic_message;
use crate::pool::ValuePool;
use crate::shadow::{ShadowParams, ShadowStats};
use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::CudaEvent;
use std::borrow::Borrow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where a sequence's keys and values are.
enum GpuState {
    /// Nothing yet (allocated at its first step).
    Empty,
    /// A dense cache.
    Dense(GpuCache),
    /// ShadowKV: a dense cache holding the whole prompt, not compressed yet, and the
    /// event recorded on the lane that queued the prompt's last chunk, after it.
    Prefilled(GpuCache, CudaEvent),
    /// ShadowKV: its prompt handed to the compression thread, which holds the dense
    /// cache (of `bytes`) and answers with the state of its `tokens` once the compression
    /// has run on the GPU (or with why it failed).
    Compressing {
        state: Pending<GpuShadowSeq>,
        tokens: usize,
        bytes: usize,
        /// Tells the thread, once the sequence is gone, not to compress it.
        _cancel: CancelOnDrop,
    },
    /// ShadowKV state, after its prompt was compressed.
    Shadow(GpuShadowSeq),
    /// ShadowKV: its compression failed (the step that tried reports it); the steps
    /// after leave it out.
    Failed,
}

/// One sequence on the GPU: its state, its sampling row and where its last sampled
/// token is.
pub struct CudaSeq {
    state: GpuState,
    spec: SeqSpec,
    /// Tokens sampled so far (the device sampler's counter).
    sampled: u64,
    last: Option<LastSample>,
}

/// ShadowKV on the GPU: the layout of every sequence, the value pools (host, and GPU
/// value slots; shared with the compression thread's jobs), where compressions run
/// and how values are fetched.
struct ShadowGpu {
    layout: ShadowLayout,
    /// Sequences the backend serves at most (host slots and GPU value slots).
    max_batch: usize,
    pool: Arc<GpuValuePool>,
    compression: Compression,
    fetch: FetchPath,
}

/// What compresses prompts: the stream compressions are queued on (the greatest
/// priority; its side and worker streams one below), apart from the lanes, its scratch,
/// and the model's layer count (all a compression needs of the model).
struct Compressor {
    ops: CudaOps,
    ws: CompressWorkspace,
    layers: usize,
}

/// A prompt for the compression thread: its dense cache, the layout of its state, the
/// pool its values go to, and whether its sequence is gone (ended at its first token, or
/// its request dropped) before the thread came to it.
struct CompressJob {
    prompt: WrittenCache,
    layout: ShadowLayout,
    pool: Arc<GpuValuePool>,
    cancelled: Arc<AtomicBool>,
}

/// Sets its flag when dropped: a `Compressing` sequence's, so that a sequence dropped
/// before the thread reaches its job is not compressed.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A prompt's dense cache and the event recorded after its last chunk. Dropped, it
/// waits for that event before the cache goes: a job the compression thread never ran
/// (stopped first) does not free the cache under a chunk still writing it.
struct WrittenCache {
    cache: GpuCache,
    written: CudaEvent,
}

impl Drop for WrittenCache {
    fn drop(&mut self) {
        let _ = self.written.synchronize();
    }
}

/// Where prompts are compressed.
enum Compression {
    /// On the thread that queues the steps.
    Inline(Box<Compressor>),
    /// On a thread of its own, which owns the compressor.
    Thread(Worker<CompressJob, GpuShadowSeq, Compressor>),
}

/// Compressions the thread's mailbox holds at most: far above any batch (the scheduler
/// starts no prompt while a live one waits for its compression, and the prompts of
/// sequences already gone are skipped at once), so a hand-off does not find it full.
const COMPRESS_QUEUE: usize = 256;

/// One ShadowKV decode step in this many times its stages on the GPU for
/// `shadowkv_stage_seconds`: the stamps cost 0.6–2.4 % of a step where every step carries
/// them (0.5 ms of 20 at 57 × 61440 tokens on the H200), an eighth of that here.
const STAGE_SAMPLE: usize = 8;

impl Compressor {
    /// The compression thread's job: compresses `job`'s prompt once its last chunk is
    /// done, then waits for the compression's GPU work (so the state it returns is
    /// complete, and nothing reads the dense cache any more) and frees the dense cache,
    /// whether the compression succeeded or not.
    fn run(&mut self, job: CompressJob) -> Result<GpuShadowSeq> {
        let CompressJob {
            prompt,
            layout,
            pool,
            cancelled,
        } = job;
        if cancelled.load(Ordering::Acquire) {
            // The cache, dropped, waits for its last chunk.
            bail!("its sequence ended before its compression began");
        }
        let dev = self.ops.device();
        let compressed = catch_unwind(AssertUnwindSafe(|| {
            dev.context()
                .bind_to_thread()
                .and_then(|()| dev.stream().wait(&prompt.written))
                .map_err(anyhow::Error::from)
                .and_then(|()| compress_prefill(self.layers, &self.ops, &prompt.cache, &layout, &pool, &mut self.ws))
        }));
        // The compression's stream waited for its other streams and for the chunk (the
        // cache, dropped, waits for the chunk too: a compression that could not). One
        // that panicked may have left work on any of them: then the whole device.
        let done = match &compressed {
            Ok(_) => dev.stream().synchronize().map_err(anyhow::Error::from),
            Err(_) => dev.synchronize(),
        };
        drop(prompt);
        let state = compressed.map_err(|p| anyhow!("the compression panicked: {}", panic_message(&*p)))??;
        done?;
        Ok(state)
    }
}

/// A step queued by [`CudaBackend`]: the lane's ticket, the sequences of its batch that
/// failed on their own (their compression) and, of its sampled rows, those whose
/// sequence was left out of the step for it (each gets a token that means nothing).
pub struct CudaTicket {
    step: StepTicket,
    failed: Vec<(usize, String)>,
    left_out: Vec<usize>,
}

impl CudaTicket {
    /// The event that marks the step's end ([`StepTicket::end_event`]).
    pub fn end_event(&self) -> Arc<CudaEvent> {
        self.step.end_event()
    }

    /// The sequences of the step's batch (their index) that failed on their own, with
    /// why.
    pub fn failed(&self) -> &[(usize, String)] {
        &self.failed
    }
}

/// [`CudaModel`] (owned, or borrowed by the generation loop) for the server.
pub struct CudaBackend<M: Borrow<CudaModel> = CudaModel> {
    model: M,
    cache_tokens: usize,
    lanes: Vec<Lane>,
    /// The first lanes, that decode ([`CudaBackend::with_decode_lanes`]).
    decode_lanes: usize,
    /// The decode lanes' stream priority.
    decode_priority: StreamPriority,
    /// GPU bytes of the sequences' state (and a prefill), counted at start-up.
    need: usize,
    serials: LaneSerials,
    shadow: Option<ShadowGpu>,
    /// Dense caches a queued compression still reads, freed once its event is done.
    retired: Vec<(CudaEvent, GpuCache)>,
}

impl<M: Borrow<CudaModel>> CudaBackend<M> {
    /// Serves `model` for up to `max_batch` sequences of `cache_tokens` tokens on `lanes`
    /// lanes (1: prompts ride in the decode steps; 2: prompts are prefilled on a second
    /// stream), with full attention or, given `shadow` (its settings and a bf16 value
    /// pool for `max_batch` sequences), ShadowKV; refuses limits whose state cannot all
    /// fit in the free GPU memory.
    pub fn new(
        model: M,
        cache_tokens: usize,
        max_batch: usize,
        lanes: usize,
        graphs: bool,
        shadow: Option<(ShadowParams, ValuePool)>,
    ) -> Result<Self> {
        ensure!((1..=2).contains(&lanes), "1 or 2 lanes, not {lanes}");
        let m: &CudaModel = model.borrow();
        let shadow = match shadow {
            Some((p, pool)) => {
                let layout = ShadowLayout::new(m.config(), &p, cache_tokens)?;
                ensure!(
                    pool.shape().seqs >= max_batch,
                    "a value pool of {} sequences for a batch of {max_batch}",
                    pool.shape().seqs
                );
                // The compression's stream and workers before the memory is counted: their
                // scratch is held from here on.
                // Above every lane's priority: a compression holds its sequence's first
                // decode step back (and, compressed inline, the engine thread).
                let ops = m.ops().fork(StreamPriority::Highest)?;
                let mut ws = CompressWorkspace::at_priority(StreamPriority::High);
                ws.prepare(&ops, &layout)?;
                let compressor = Compressor {
                    ops,
                    ws,
                    layers: m.config().num_layers,
                };
                let compression = if lanes > 1 {
                    Compression::Thread(Worker::spawn("compress", COMPRESS_QUEUE, compressor, Compressor::run)?)
                } else {
                    Compression::Inline(Box::new(compressor))
                };
                let pool = GpuValuePool::new(m.ops(), pool)?;
                // A file-backed pool is the host's to read: cpu-gather.
                let fetch = if pool.host_written() {
                    FetchPath::CpuGather
                } else {
                    FetchPath::ZeroCopy
                };
                Some(ShadowGpu {
                    layout,
                    max_batch,
                    pool: Arc::new(pool),
                    compression,
                    fetch,
                })
            }
            None => None,
        };
        let need = match &shadow {
            Some(s) => shadow_need(m, &s.layout, cache_tokens, max_batch),
            None => m.cache_bytes(cache_tokens) * max_batch,
        };
        let (free, _) = m.ops().device().mem_info()?;
        let margin = memory_margin(lanes);
        if need + margin > free {
            bail!(
                "{max_batch} sequences of {cache_tokens} tokens need {:.1} GiB of GPU memory for their {}, \
                 {:.1} GiB are free after the weights: lower limits.max_batch or limits.max_context",
                need as f64 / (1u64 << 30) as f64,
                if shadow.is_some() {
                    "ShadowKV state and a prefill"
                } else {
                    "KV caches"
                },
                free.saturating_sub(margin) as f64 / (1u64 << 30) as f64
            );
        }
        let priorities = [StreamPriority::High, StreamPriority::Normal];
        let mut lanes = priorities[..lanes]
            .iter()
            .map(|&p| m.new_lane(p, graphs))
            .collect::<Result<Vec<_>>>()?;
        if shadow.is_some() {
            // One ShadowKV step in STAGE_SAMPLE times its stages on the GPU (timestamps
            // read once the step is done, no extra synchronisation) for the stage metrics.
            for lane in &mut lanes {
                lane.time_stages(STAGE_SAMPLE);
            }
        }
        Ok(CudaBackend {
            model,
            cache_tokens,
            lanes,
            decode_lanes: 1,
            decode_priority: priorities[0],
            need,
            serials: LaneSerials::default(),
            shadow,
            retired: Vec::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &CudaModel {
        self.model.borrow()
    }

    /// ShadowKV serves `n` more sequences (none unless set; the backend then serves its
    /// `max_batch + n`), their values in GPU value slots: device memory the fetch copies
    /// from without crossing PCIe, so that host memory no longer caps the batch (the host
    /// pool keeps its `max_batch` slots; a sequence takes a GPU value slot while one is
    /// free). Refuses slots whose values do not fit the free GPU memory beside every
    /// sequence's ShadowKV state and a prefill, saying how much they need and how much
    /// is free; refuses them with full attention (no values to place) and with
    /// cpu-gather (whose actor reads host memory only). Before
    /// [`CudaBackend::with_tier`], which takes what they leave.
    pub fn with_value_slots(mut self, n: usize) -> Result<Self> {
        if n == 0 {
            return Ok(self);
        }
        let Some(mut sh) = self.shadow.take() else {
            bail!("GPU value slots hold ShadowKV's values: full attention has none to place");
        };
        ensure!(
            sh.fetch != FetchPath::CpuGather,
            "GPU value slots are read by the zero-copy fetch: cpu-gather's actor reads host memory only"
        );
        let m: &CudaModel = self.model.borrow();
        let layers = m.config().num_layers;
        let (free, _) = m.ops().device().mem_info()?;
        let total = sh.max_batch + n;
        let state = shadow_need(m, &sh.layout, self.cache_tokens, total) + memory_margin(self.lanes.len());
        let (_, slot) = sequence_bytes(&sh.layout, layers)?;
        let need = slot * n;
        if state + need > free {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            bail!(
                "{n} GPU value slots need {:.1} GiB of GPU memory for their values ({:.2} GiB each); {:.1} GiB are \
                 free besides the ShadowKV state of all {total} sequences and a prefill",
                gib(need),
                gib(slot),
                gib(free.saturating_sub(state))
            );
        }
        let pool = Arc::try_unwrap(sh.pool)
            .map_err(|_| anyhow!("GPU value slots are added before the first prompt is compressed"))?;
        sh.pool = Arc::new(pool.with_device_slots(m.ops(), n)?);
        sh.max_batch = total;
        self.shadow = Some(sh);
        Ok(self)
    }

    /// ShadowKV keeps a GPU value tier of `tier` (none unless set; at `auto`, what the
    /// free GPU memory holds once every sequence's state and a prefill fit). Refuses a
    /// tier that does not fit, saying how much it needs and how much is free.
    pub fn with_tier(mut self, tier: TierSize) -> Result<Self> {
        let m: &CudaModel = self.model.borrow();
        let layers = m.config().num_layers;
        let (free, _) = m.ops().device().mem_info()?;
        let Some(s) = &self.shadow else {
            return Ok(self);
        };
        let state = shadow_need(m, &s.layout, self.cache_tokens, s.max_batch) + memory_margin(self.lanes.len());
        let chunks = match tier {
            TierSize::Off => 0,
            TierSize::Chunks(n) => n,
            TierSize::Auto => tier_chunks_for(&s.layout, layers, s.max_batch, free.saturating_sub(state) / 10 * 9),
        };
        let layout = s.layout.with_tier(chunks)?;
        let need = layout.tier_bytes() * layers * s.max_batch;
        if state + need > free {
            bail!(
                "a GPU value tier of {chunks} chunks per KV head for {} sequences needs {:.1} GiB; {:.1} GiB are free \
                 besides their ShadowKV state and a prefill",
                s.max_batch,
                need as f64 / (1u64 << 30) as f64,
                free.saturating_sub(state) as f64 / (1u64 << 30) as f64
            );
        }
        if let Some(s) = &mut self.shadow {
            s.layout = layout;
        }
        Ok(self)
    }

    /// The GPU value tier, when ShadowKV keeps one: its entries per layer and KV head of
    /// a sequence, and its device bytes over every layer and `max_batch` sequence.
    pub fn tier(&self) -> Option<(usize, usize)> {
        let s = self.shadow.as_ref().filter(|s| s.layout.tier > 0)?;
        let layers = self.model.borrow().config().num_layers;
        Some((s.layout.tier, s.layout.tier_bytes() * layers * s.max_batch))
    }

    /// ShadowKV fetches the missed values by `fetch` (zero-copy unless set, cpu-gather
    /// for a file-backed pool); cpu-gather is refused once the pool has GPU value slots
    /// (as [`Self::with_value_slots`] refuses them under cpu-gather), zero-copy for a
    /// file-backed pool.
    pub fn with_fetch(mut self, fetch: FetchPath) -> Result<Self> {
        if let Some(s) = &mut self.shadow {
            ensure!(
                fetch != FetchPath::CpuGather || s.pool.device_slots() == 0,
                "cpu-gather's actor reads host memory only: it cannot fetch from GPU value slots"
            );
            ensure!(
                fetch == FetchPath::CpuGather || !s.pool.host_written(),
                "a file-backed value pool is read by cpu-gather only: the device cannot map a file for zero-copy"
            );
            s.fetch = fetch;
        }
        Ok(self)
    }

    /// ShadowKV steps split their attention into `n` micro-batches (at most one a
    /// sequence; 1 unless set), on every lane.
    pub fn with_micro_batches(mut self, n: usize) -> Self {
        for lane in &mut self.lanes {
            lane.set_micro_batches(n);
        }
        self
    }

    /// With `half`, the prefill lane's attention (the last lane, where there is one)
    /// runs one block a multiprocessor, leaving the rest of each to the decode lanes'
    /// kernels ([`crate::cuda::CudaOps::share_sms_with_decoding`]).
    pub fn with_prefill_half_sm(self, half: bool) -> Self {
        if self.lanes.len() > 1 {
            if let Some(lane) = self.lanes.last() {
                lane.ops().share_sms_with_decoding(half);
            }
        }
        self
    }

    /// `n` decode lanes before the prefill lane (1 unless set): each a stream, scratch
    /// and CUDA graphs of its own at the decode priority, the scheduler giving each
    /// sequence one of them ([`StepBackend::decode_lanes`]), so their steps run side by
    /// side and one lane's value fetch overlaps the others' compute (worth it where the
    /// fetch bounds the step; each lane reads the weights). Needs the prefill lane;
    /// refuses lanes whose scratch does not fit beside the sequences' state. After
    /// [`Self::with_prefill_sms`], before the other `with_` settings, which then apply
    /// to the new lanes too.
    pub fn with_decode_lanes(mut self, n: usize) -> Result<Self> {
        ensure!(
            (1..=crate::topology::MAX_DECODE_LANES).contains(&n),
            "1 to {} decode lanes, not {n}",
            crate::topology::MAX_DECODE_LANES
        );
        if n == self.decode_lanes {
            return Ok(self);
        }
        ensure!(
            self.lanes.len() == 2 && self.decode_lanes == 1,
            "{n} decode lanes need a separate prefill lane beside one decode lane"
        );
        let m: &CudaModel = self.model.borrow();
        let lanes = n + 1;
        let (free, _) = m.ops().device().mem_info()?;
        let margin = memory_margin(lanes);
        ensure!(
            self.need + margin <= free,
            "{n} decode lanes keep {:.1} GiB free for their scratch beside {:.1} GiB of sequence state; \
             {:.1} GiB are free",
            margin as f64 / (1u64 << 30) as f64,
            self.need as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64
        );
        let graphs = self.lanes[0].graphs.enabled();
        for _ in 1..n {
            let mut lane = m.new_lane(self.decode_priority, graphs)?;
            lane.time_stages(self.stage_every());
            let at = self.lanes.len() - 1;
            self.lanes.insert(at, lane);
        }
        self.decode_lanes = n;
        Ok(self)
    }

    /// One step in how many a lane times its stages on the GPU: [`STAGE_SAMPLE`] under
    /// ShadowKV, none with full attention.
    fn stage_every(&self) -> usize {
        if self.shadow.is_some() {
            STAGE_SAMPLE
        } else {
            0
        }
    }

    /// The separate prefill lane (the second lane; none with one lane) runs on a
    /// partition of at least `sms` of the GPU's multiprocessors (0: the whole GPU)
    /// ([`crate::cuda::green`]) and owns it: its stream's priority is above the decode
    /// lane's, so as its blocks retire its next ones take their multiprocessors. The
    /// decode lane's kernels run on the others, which they always find free, and on
    /// whatever the prefill leaves idle. Refuses a partition that leaves the decode
    /// lane less than the driver's smallest one. Before [`Self::with_decode_lanes`] and
    /// the other `with_` settings, which then apply to the new lanes too. Returns the
    /// partition's size (0 without one).
    pub fn with_prefill_sms(mut self, sms: u32) -> Result<(Self, u32)> {
        if sms == 0 || self.lanes.len() < 2 {
            return Ok((self, 0));
        }
        ensure!(
            self.decode_lanes == 1,
            "the prefill lane's partition is set before the decode lanes are added"
        );
        let m: &CudaModel = self.model.borrow();
        let graphs = self.lanes[0].graphs.enabled();
        // No captures on the prefill lane: its stream is shared by every lane asking for
        // a partition of this size (crate::cuda::green).
        let mut prefill = m.new_lane_on_sms(StreamPriority::High, false, sms)?;
        let mut decode = m.new_lane(StreamPriority::Normal, graphs)?;
        let got = prefill.ops().device().info().sm_count;
        for lane in [&mut decode, &mut prefill] {
            lane.time_stages(self.stage_every());
        }
        self.lanes = vec![decode, prefill];
        self.decode_priority = StreamPriority::Normal;
        Ok((self, got))
    }

    /// With a prefill lane, each prompt is compressed on the thread that queues the
    /// steps, at its sequence's first decode step (the decode lane's stream waiting for
    /// the compression), rather than on the compression thread: for the tensor-parallel
    /// ranks ([`super::backend_tp`]), whose group does not ask whether a sequence is
    /// ready. Stops the compression thread, taking its stream and scratch back; nothing
    /// changes without one (full attention, one lane).
    pub fn with_inline_compression(mut self) -> Result<Self> {
        if let Some(mut sh) = self.shadow.take() {
            sh.compression = match sh.compression {
                Compression::Thread(t) => Compression::Inline(Box::new(t.stop()?)),
                inline => inline,
            };
            self.shadow = Some(sh);
        }
        Ok(self)
    }

    /// The cpu-gather path copies the missed value chunks with `g` (the pipeline's
    /// pinned gather threads) on every lane.
    pub fn with_gatherer(mut self, g: std::sync::Arc<dyn crate::cuda::shadow::ChunkGather + Send>) -> Self {
        for lane in &mut self.lanes {
            lane.set_gatherer(g.clone());
        }
        self
    }

    /// Graph captures, replays and eager steps of each lane.
    pub fn graph_counts(&self) -> Vec<(usize, usize, usize)> {
        self.lanes
            .iter()
            .map(|l| (l.graphs.captures, l.graphs.replays, l.graphs.eager))
            .collect()
    }

    /// Stops the model's tensor-parallel communicators at once (see
    /// [`CudaModel::abort_collectives`]).
    pub fn abort_collectives(&mut self) {
        self.model.borrow().abort_collectives(&mut self.lanes);
    }

    /// A new sequence holding a copy of `seq`'s dense cache (its prompt prefilled once,
    /// copied into the others of a benchmark's batch), with `seq`'s settings; its
    /// first step feeds tokens (not the previous step's).
    pub fn fork_seq(&self, seq: &CudaSeq) -> Result<CudaSeq> {
        let m: &CudaModel = self.model.borrow();
        let GpuState::Dense(from) = &seq.state else {
            bail!("only a sequence with a dense cache can be copied");
        };
        let mut cache = if from.keeps_pre_rope() {
            m.new_cache_pre_rope(from.capacity())?
        } else {
            m.new_cache(from.capacity())?
        };
        cache.copy_from(m, from)?;
        m.ops().device().synchronize()?;
        Ok(CudaSeq {
            state: GpuState::Dense(cache),
            spec: seq.spec,
            sampled: seq.sampled,
            last: None,
        })
    }

    /// Frees the dense caches whose compression has run.
    fn free_retired(&mut self) {
        self.retired.retain(|(done, _)| !done.is_complete());
    }

    /// Whether a prompt is not compressed as its last chunk is queued (ShadowKV with a
    /// prefill lane): it is handed to the compression thread then, or compressed inline
    /// at its sequence's first decode step; either way its dense cache is held until
    /// that step may be queued ([`StepBackend::defers_prefill`]).
    fn defers(&self) -> bool {
        self.shadow.is_some() && self.lanes.len() > 1
    }

    /// Hands `seq`'s prefilled prompt to the compression thread, where there is one:
    /// the sequence is `Compressing` until [`Self::receive`] takes its state.
    fn hand_off(&self, seq: &mut CudaSeq) {
        let Some(ShadowGpu {
            compression: Compression::Thread(thread),
            layout,
            pool,
            ..
        }) = &self.shadow
        else {
            return;
        };
        let GpuState::Prefilled(..) = &seq.state else { return };
        let GpuState::Prefilled(dense, written) = std::mem::replace(&mut seq.state, GpuState::Failed) else {
            unreachable!("matched above")
        };
        let (tokens, bytes) = (dense.len(), dense.bytes());
        let cancelled = Arc::new(AtomicBool::new(false));
        let state = thread.submit(CompressJob {
            prompt: WrittenCache { cache: dense, written },
            layout: *layout,
            pool: pool.clone(),
            cancelled: cancelled.clone(),
        });
        seq.state = GpuState::Compressing {
            state,
            tokens,
            bytes,
            _cancel: CancelOnDrop(cancelled),
        };
    }

    /// Takes a `Compressing` sequence's state from the compression thread (waiting for
    /// it if it is not in yet): the sequence becomes `Shadow`, or `Failed` with the
    /// compression's error. The compression has run on the GPU before the thread
    /// answers: the steps that read the state need not wait for it.
    fn receive(seq: &mut CudaSeq) -> Result<()> {
        let GpuState::Compressing { state, .. } = std::mem::replace(&mut seq.state, GpuState::Failed) else {
            bail!("only a sequence being compressed is received");
        };
        seq.state = GpuState::Shadow(state.take()?);
        Ok(())
    }

    /// Compresses `seq`'s prefilled prompt into ShadowKV state now: on the compression
    /// thread where there is one (waiting for it), else on the compression stream from
    /// this thread, which first waits for the event recorded after the prompt's last
    /// chunk (only that chunk, whatever else its lane has queued since); `lane`'s stream
    /// then waits for the compression, so the steps queued on it next read the whole
    /// state. The dense cache is freed once the compression's work (a failed one's too)
    /// has run. A sequence whose compression fails is left `Failed`.
    fn compress(&mut self, lane: usize, seq: &mut CudaSeq) -> Result<()> {
        self.hand_off(seq);
        if let GpuState::Compressing { .. } = seq.state {
            return Self::receive(seq);
        }
        let GpuState::Prefilled(dense, written) = std::mem::replace(&mut seq.state, GpuState::Failed) else {
            bail!("only a prefilled sequence is compressed");
        };
        let model: &CudaModel = self.model.borrow();
        let sh = self
            .shadow
            .as_mut()
            .expect("prefilled sequences come from a ShadowKV backend");
        let Compression::Inline(c) = &mut sh.compression else {
            unreachable!("handed to the compression thread above")
        };
        let stream = c.ops.device().stream();
        let compressed = match stream.wait(&written) {
            Ok(()) => model.compress_shadow(&c.ops, &dense, &sh.layout, &sh.pool, &mut c.ws),
            Err(e) => Err(e.into()),
        };
        let done = c.ops.device().event(false).and_then(|e| {
            e.record(stream)?;
            Ok(e)
        });
        let done = match done {
            Ok(e) => e,
            Err(e) => {
                // No event to free the cache after: wait until nothing reads it.
                let _ = stream.synchronize();
                return Err(e);
            }
        };
        let waited = self.lanes[lane].ops().device().stream().wait(&done);
        self.retired.push((done, dense));
        let compressed = compressed?;
        waited?;
        seq.state = GpuState::Shadow(compressed);
        Ok(())
    }

    /// A dense step (prompt chunks, or full-attention decoding) of `batch` on `lane`;
    /// under ShadowKV, each prompt it completes becomes `Prefilled`, and is compressed
    /// at once with one lane, or handed to the compression thread. Returns the step and
    /// the sequences (their index in `batch`) whose compression failed, with why.
    fn submit_dense(
        &mut self,
        lane: usize,
        batch: &mut [StepSeq<'_, CudaSeq>],
        prev: &[Option<u32>],
    ) -> Result<(StepTicket, Vec<(usize, String)>)> {
        let model: &CudaModel = self.model.borrow();
        let mut allocated = false;
        for s in batch.iter_mut() {
            if matches!(s.seq.state, GpuState::Empty) {
                let spec = s.seq.spec;
                let cache = match &self.shadow {
                    // The dense cache holds the prompt only: decoding is ShadowKV's.
                    Some(_) => model.new_cache_pre_rope(spec.prompt_tokens)?,
                    None => model.new_cache((spec.prompt_tokens + spec.max_tokens).min(self.cache_tokens))?,
                };
                s.seq.state = GpuState::Dense(cache);
                allocated = true;
            }
        }
        if allocated {
            // New caches are allocated and zeroed on the model's own stream: the lane's
            // stream waits for that (not the whole device, whose other lane may be
            // busy for a while) before it writes them.
            let dev = model.ops().device();
            let zeroed = dev.event(false)?;
            zeroed.record(dev.stream())?;
            self.lanes[lane].ops().device().stream().wait(&zeroed)?;
        }
        let sampling: Vec<[u64; 5]> = batch
            .iter()
            .map(|s| s.seq.spec.sampling.device_row(s.seq.spec.seed, s.seq.sampled))
            .collect();
        const ONE: [u32; 1] = [0];
        let mut seqs: Vec<GpuSeq> = batch
            .iter_mut()
            .map(|s| GpuSeq {
                tokens: match s.input {
                    StepInput::Tokens(t) => t,
                    StepInput::Previous => &ONE,
                },
                cache: match &mut s.seq.state {
                    GpuState::Dense(c) => c,
                    _ => unreachable!("a dense step's sequences hold dense caches"),
                },
                logits: if s.sample {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            })
            .collect();
        let ticket = model.submit(&mut self.lanes[lane], &mut seqs, &sampling, prev)?;
        drop(seqs);
        let mut failed = Vec::new();
        if self.shadow.is_none() {
            return Ok((ticket, failed));
        }
        for (i, s) in batch.iter_mut().enumerate().filter(|(_, s)| s.prompt_done) {
            let GpuState::Dense(dense) = std::mem::replace(&mut s.seq.state, GpuState::Failed) else {
                unreachable!("a dense step's sequences hold dense caches")
            };
            let dev = self.lanes[lane].ops().device();
            let written = dev.event(false).and_then(|e| {
                e.record(dev.stream())?;
                Ok(e)
            });
            let written = match written {
                Ok(e) => e,
                Err(e) => {
                    // The step is queued: the cache goes once nothing reads it, and the
                    // sequence fails alone.
                    let _ = dev.stream().synchronize();
                    drop(dense);
                    failed.push((i, format!("{e:#}")));
                    continue;
                }
            };
            s.seq.state = GpuState::Prefilled(dense, written);
            if !self.defers() {
                if let Err(e) = self.compress(lane, s.seq) {
                    failed.push((i, format!("{e:#}")));
                }
            } else {
                self.hand_off(s.seq);
            }
        }
        Ok((ticket, failed))
    }

    /// A ShadowKV decode step of `batch` (one token each) on `lane`.
    fn submit_shadow(
        &mut self,
        lane: usize,
        batch: &mut [StepSeq<'_, CudaSeq>],
        prev: &[Option<u32>],
    ) -> Result<StepTicket> {
        let sh = self
            .shadow
            .as_ref()
            .expect("ShadowKV sequences come from a ShadowKV backend");
        let sampling: Vec<[u64; 5]> = batch
            .iter()
            .map(|s| s.seq.spec.sampling.device_row(s.seq.spec.seed, s.seq.sampled))
            .collect();
        const ONE: [u32; 1] = [0];
        let mut inputs = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            ensure!(
                s.sample && !s.prompt_done,
                "a ShadowKV step decodes one token per sequence"
            );
            let token = match s.input {
                StepInput::Tokens(t) if t.len() == 1 => t,
                StepInput::Tokens(t) => bail!("a ShadowKV decode step takes one token per sequence, not {}", t.len()),
                StepInput::Previous => &ONE,
            };
            let GpuState::Shadow(seq) = &mut s.seq.state else {
                unreachable!("checked by the caller")
            };
            inputs.push(ShadowSeqInput { token, seq });
        }
        self.model
            .borrow()
            .submit_shadow(&mut self.lanes[lane], &mut inputs, &sampling, prev, &sh.pool, sh.fetch)
    }
}

impl<M: Borrow<CudaModel> + Send> StepBackend for CudaBackend<M> {
    type Seq = CudaSeq;
    type Ticket = CudaTicket;

    fn config(&self) -> &ModelConfig {
        self.model().config()
    }

    fn lanes(&self) -> usize {
        self.lanes.len()
    }

    fn decode_lanes(&self) -> usize {
        self.decode_lanes
    }

    fn queue_depth(&self) -> usize {
        2
    }

    fn defers_prefill(&self) -> bool {
        self.defers()
    }

    /// A sequence is not ready while its compression runs.
    fn seq_ready(&self, seq: &CudaSeq) -> bool {
        match &seq.state {
            GpuState::Compressing { state, .. } => state.is_ready(),
            _ => true,
        }
    }

    fn new_seq(&self, spec: &SeqSpec) -> Result<CudaSeq> {
        if let Some(sh) = &self.shadow {
            sh.layout.check_prefill(spec.prompt_tokens)?;
        }
        Ok(CudaSeq {
            state: GpuState::Empty,
            spec: SeqSpec {
                seed: spec.sampling.seed.unwrap_or(spec.seed),
                ..*spec
            },
            sampled: 0,
            last: None,
        })
    }

    fn seq_len(&self, seq: &CudaSeq) -> usize {
        match &seq.state {
            GpuState::Empty | GpuState::Failed => 0,
            GpuState::Dense(c) | GpuState::Prefilled(c, _) => c.len(),
            GpuState::Compressing { tokens, .. } => *tokens,
            GpuState::Shadow(s) => s.len(),
        }
    }

    fn seq_bytes(&self, seq: &CudaSeq) -> usize {
        match &seq.state {
            GpuState::Empty | GpuState::Failed => 0,
            GpuState::Dense(c) | GpuState::Prefilled(c, _) => c.bytes(),
            GpuState::Compressing { bytes, .. } => *bytes,
            GpuState::Shadow(s) => s.bytes(),
        }
    }

    fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, CudaSeq>]) -> Result<CudaTicket> {
        ensure!(lane < self.lanes.len(), "no lane {lane}");
        self.free_retired();
        // A sequence at its first decode step takes its state from the compression
        // thread (waiting for it where the caller did not ask `seq_ready`), or is
        // compressed first (ShadowKV with a prefill lane, compressed inline). One whose
        // compression fails, now or at an earlier step, is left out of the step and fails
        // alone.
        let mut failed = Vec::new();
        for (i, s) in batch.iter_mut().enumerate() {
            let why = match s.seq.state {
                GpuState::Compressing { .. } => Self::receive(s.seq).err().map(|e| format!("{e:#}")),
                GpuState::Prefilled(..) => self.compress(lane, s.seq).err().map(|e| format!("{e:#}")),
                GpuState::Failed => Some("its prompt's compression failed".to_string()),
                _ => None,
            };
            if let Some(why) = why {
                failed.push((i, why));
            }
        }
        let (mut live, mut live_index, mut left_out) = (Vec::with_capacity(batch.len()), Vec::new(), Vec::new());
        let mut row = 0;
        for (i, s) in batch.iter_mut().enumerate() {
            if !failed.iter().any(|&(f, _)| f == i) {
                live_index.push(i);
                live.push(StepSeq {
                    input: s.input,
                    seq: &mut *s.seq,
                    sample: s.sample,
                    prompt_done: s.prompt_done,
                });
            } else if s.sample {
                left_out.push(row);
            }
            row += usize::from(s.sample);
        }
        if let Some((_, why)) = failed.first().filter(|_| live.is_empty()) {
            bail!("{why}");
        }
        let mut prev = Vec::with_capacity(live.len());
        for s in live.iter() {
            prev.push(match s.input {
                StepInput::Tokens(_) => None,
                StepInput::Previous => Some(self.serials.previous_row(lane, s.seq.last)? as u32),
            });
        }
        let shadow = live
            .iter()
            .filter(|s| matches!(s.seq.state, GpuState::Shadow(_)))
            .count();
        let ticket = match shadow {
            0 => {
                let (ticket, more) = self.submit_dense(lane, &mut live, &prev)?;
                failed.extend(more.into_iter().map(|(i, why)| (live_index[i], why)));
                ticket
            }
            n if n == live.len() => self.submit_shadow(lane, &mut live, &prev)?,
            _ => bail!("a step mixes ShadowKV decoding with prompt chunks: prefill on a lane of its own"),
        };
        let step = self.serials.take(lane);
        for (row, s) in live.iter_mut().filter(|s| s.sample).enumerate() {
            s.seq.last = Some(LastSample { lane, step, row });
            s.seq.sampled += 1;
        }
        Ok(CudaTicket {
            step: ticket,
            failed,
            left_out,
        })
    }

    fn is_done(&self, ticket: &CudaTicket) -> bool {
        ticket.step.is_done()
    }

    fn complete(&mut self, lane: usize, ticket: CudaTicket) -> Result<StepOutput> {
        let before = self.lanes[lane].stage_ms.clone();
        let gathered = self.lanes[lane].gather.gather_secs;
        let tokens = self.model.borrow().complete(&mut self.lanes[lane], ticket.step)?;
        self.free_retired();
        let mut stage_secs = step_stages(&before, &self.lanes[lane].stage_ms);
        // The cpu-gather actor's jobs, their wall-clock time on the host (the jobs done
        // since the last completed step).
        let gather = self.lanes[lane].gather.gather_secs - gathered;
        if gather > 0.0 {
            stage_secs.push(("gather", gather));
        }
        Ok(StepOutput {
            tokens: with_rows_left_out(tokens, &ticket.left_out),
            failed: ticket.failed,
            stage_secs,
            gpu_spans: self.lanes[lane].drain_trace(),
        })
    }

    /// With ShadowKV (whose lanes time their stages), every lane's timeline from now;
    /// none with full attention (no stage marks).
    fn start_gpu_trace(&mut self) -> Result<Vec<std::time::Instant>> {
        if self.shadow.is_none() {
            return Ok(Vec::new());
        }
        self.lanes.iter_mut().map(|l| l.start_trace()).collect()
    }

    fn stats(&self) -> BackendStats {
        let used = self
            .model()
            .ops()
            .device()
            .mem_info()
            .map_or(0, |(free, total)| total.saturating_sub(free));
        let shadow = self.shadow_stats().unwrap_or_default();
        BackendStats {
            gpu_bytes: used as u64,
            pool_bytes: self.shadow.as_ref().map_or(0, |s| {
                let p = s.pool.pool();
                (p.leased() * p.bytes() / p.shape().seqs.max(1)) as u64
            }),
            value_bytes_fetched: shadow.value_bytes_fetched,
            reuse_hit_ratio: shadow.hit_rate().unwrap_or(0.0),
        }
    }

    fn shadow_stats(&self) -> Option<ShadowStats> {
        let sh = self.shadow.as_ref()?;
        let mut c = ShadowCounters::default();
        for lane in &self.lanes {
            c = c + lane.shadow_counters();
        }
        // Tier hits are misses of the slots (their keys are rebuilt) whose values did not
        // cross PCIe; a fetched chunk moves its values as the pool keeps them (8 bits).
        let misses = c.selected.saturating_sub(c.hits);
        Some(ShadowStats {
            hits: c.hits,
            misses,
            value_bytes_fetched: c.fetched() * sh.layout.value_chunk_bytes() as u64,
        })
    }
}

/// A step's sampled tokens with a token that means nothing (0) put at each row of
/// `left_out` (rows of the whole batch's samples, ascending), whose sequence sat the
/// step out.
fn with_rows_left_out(mut tokens: Vec<u32>, left_out: &[usize]) -> Vec<u32> {
    for &row in left_out {
        tokens.insert(row.min(tokens.len()), 0);
    }
    tokens
}

/// GPU bytes of ShadowKV for `max_batch` sequences of `layout` with room for
/// `cache_tokens`: every sequence's state, and one dense prefill of the longest prompt
/// (keys, values and keys before RoPE).
fn shadow_need(m: &CudaModel, layout: &ShadowLayout, cache_tokens: usize, max_batch: usize) -> usize {
    layer_bytes(layout) * m.config().num_layers * max_batch + m.cache_bytes(cache_tokens) * 3 / 2
}

/// GPU bytes kept free besides the caches: the activations of a prefill chunk (on
/// whichever lane prefills) and each further lane's own scratch and cuBLAS workspace.
fn memory_margin(lanes: usize) -> usize {
    (2usize << 30) + (256usize << 20) * lanes.saturating_sub(1)
}

/// A step's seconds per stage: the growth of a lane's cumulative stage times, the
/// selection's scores and top-k together as `select`.
fn step_stages(before: &[(Stage, f64)], after: &[(Stage, f64)]) -> Vec<(&'static str, f64)> {
    let mut out: Vec<(&'static str, f64)> = Vec::new();
    for &(stage, ms) in after {
        let was = before.iter().find(|(s, _)| *s == stage).map_or(0.0, |(_, t)| *t);
        let name = match stage {
            Stage::Scores | Stage::Select => "select",
            other => other.name(),
        };
        let secs = (ms - was).max(0.0) / 1e3;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += secs,
            None => out.push((name, secs)),
        }
    }
    out.retain(|&(_, s)| s > 0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_stages_are_the_growth_with_select_merged() {
        let before = [(Stage::Scores, 10.0), (Stage::Select, 1.0), (Stage::Fetch, 5.0)];
        let after = [
            (Stage::Scores, 12.0),
            (Stage::Select, 1.5),
            (Stage::Fetch, 5.0),
            (Stage::Rebuild, 3.0),
        ];
        let s = step_stages(&before, &after);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].0, "select");
        assert!((s[0].1 - 2.5e-3).abs() < 1e-12);
        assert_eq!(s[1], ("reconstruct", 3.0e-3));
    }

    #[test]
    fn rows_left_out_of_a_step_get_a_token_in_their_place() {
        // A batch of five samples whose rows 0, 2 and 4 sat out: the step sampled 1 and 3.
        assert_eq!(with_rows_left_out(vec![11, 13], &[0, 2, 4]), [0, 11, 0, 13, 0]);
        assert_eq!(with_rows_left_out(vec![11, 13], &[]), [11, 13]);
        assert_eq!(with_rows_left_out(Vec::new(), &[0, 1]), [0, 0]);
    }
}
