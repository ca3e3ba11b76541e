//! The interface the scheduler and the generation loop drive: a model that runs one
//! batched step over sequences of different lengths, each with its own state (cache
//! and sampler), and samples the next token of the sequences that want one.
//!
//! A step is queued with [`StepBackend::submit`] and its tokens collected with
//! [`StepBackend::complete`]; a backend whose steps run asynchronously (the GPU) lets
//! the caller queue step n+1 before it reads step n back, and a sequence can feed step
//! n+1 the token step n sampled without the host knowing it yet
//! ([`StepInput::Previous`]). Steps run on lanes: every backend has lane 0; a backend
//! with more ([`StepBackend::lanes`]) runs them side by side: lanes
//! `0..`[`StepBackend::decode_lanes`] each decode their own share of the sequences, and a
//! lane past them prefills the prompts (long prefills beside decode steps).
//!
//! The CPU model (full attention or ShadowKV) implements it here; the GPU in
//! [`super::backend_cuda`].

use super::sampling::{Sampler, SamplingParams};
use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput};
use crate::cuda::shadow::timeline::GpuSpan;
use crate::model::config::ModelConfig;
use crate::pool::ValuePool;
use crate::shadow::{prefill_cache, shadow_stats, ShadowParams, ShadowStats};
use anyhow::{bail, ensure, Result};
use std::borrow::Borrow;
use std::time::Instant;

/// What a sequence feeds a step.
#[derive(Debug, Clone, Copy)]
pub enum StepInput<'a> {
    /// These token ids (prompt tokens, or a sampled token the host holds).
    Tokens(&'a [u32]),
    /// The one token the sequence was given by the previous step of the same lane,
    /// which the host may not have read yet.
    Previous,
}

/// One sequence's part of a step.
pub struct StepSeq<'a, S> {
    /// Its new tokens.
    pub input: StepInput<'a>,
    /// Its state, extended by the step.
    pub seq: &'a mut S,
    /// Whether to sample a token after the step (false for a prompt chunk that is not
    /// the prompt's last).
    pub sample: bool,
    /// Whether the step completes the prompt (ShadowKV compresses the prefill then, or,
    /// where the backend [defers it](StepBackend::defers_prefill), at the sequence's
    /// first decode step).
    pub prompt_done: bool,
}

/// What a finished step gives back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// One token per sampling sequence, in the step's order (a failed sequence's token
    /// means nothing).
    pub tokens: Vec<u32>,
    /// Sequences of the step (their index in its batch) that failed on their own, with
    /// why: the step's other sequences are fine.
    pub failed: Vec<(usize, String)>,
    /// Seconds the step spent in each pipeline stage: GPU time from timestamps the GPU
    /// writes (ShadowKV steps on the GPU, in the steps that carry them), and with the
    /// cpu-gather fetch the wall-clock time of its gather jobs (`gather`); empty elsewhere.
    pub stage_secs: Vec<(&'static str, f64)>,
    /// The step's GPU spans, in milliseconds from its lane's anchor, while the GPU
    /// timeline is traced ([`StepBackend::start_gpu_trace`]; empty otherwise).
    pub gpu_spans: Vec<GpuSpan>,
}

/// Counters a backend may report; zero where it has no such thing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BackendStats {
    /// Bytes of value/pool memory in use (ShadowKV host pools).
    pub pool_bytes: u64,
    /// Value bytes fetched from host memory since start.
    pub value_bytes_fetched: u64,
    /// Share of selected value chunks already resident (0..=1).
    pub reuse_hit_ratio: f64,
    /// Accelerator memory in use.
    pub gpu_bytes: u64,
}

/// A model the scheduler and the generation loop can run.
pub trait StepBackend: Send {
    /// One sequence's state: its cache and its sampler.
    type Seq: Send;
    /// A queued step.
    type Ticket: Send;

    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;

    /// Lanes of steps that run side by side.
    fn lanes(&self) -> usize {
        1
    }

    /// The first lanes, that decode (each its own sequences); a further lane prefills
    /// the prompts, else they ride in the decode steps. More than one only with such a
    /// prefill lane.
    fn decode_lanes(&self) -> usize {
        1
    }

    /// Steps a lane may hold queued before the oldest is completed: 1 where `submit`
    /// runs the step itself (nothing to overlap), 2 where it only queues it.
    fn queue_depth(&self) -> usize {
        1
    }

    /// Whether a sequence whose prompt is in keeps its prefill's memory until its first
    /// decode step is queued (ShadowKV on the GPU with a prefill lane compresses it
    /// meanwhile, on a thread of its own, or then): the scheduler starts no new prompt meanwhile, so such memory is not held
    /// long (prompts that start in the step that completes another's are not held back,
    /// so more than one can wait at once). False unless the backend says so.
    fn defers_prefill(&self) -> bool {
        false
    }

    /// Whether a sequence may join a step now (true unless the backend says otherwise):
    /// false while work the backend does for it apart from the steps is still running
    /// (ShadowKV on the GPU with a prefill lane compresses a prompt on a thread of its
    /// own). The scheduler leaves such a sequence out of its steps until it is ready,
    /// and does not wait on a long step meanwhile; a backend that is given one anyway
    /// waits for it. A sequence whose work failed becomes ready: the first step given
    /// it reports the failure ([`StepOutput::failed`]).
    fn seq_ready(&self, _seq: &Self::Seq) -> bool {
        true
    }

    /// A fresh sequence.
    fn new_seq(&self, spec: &SeqSpec) -> Result<Self::Seq>;

    /// Tokens held by a sequence's cache (queued steps included).
    fn seq_len(&self, seq: &Self::Seq) -> usize;

    /// Bytes held by a sequence's cache.
    fn seq_bytes(&self, seq: &Self::Seq) -> usize;

    /// Queues one step on `lane`: runs the new tokens of every sequence, extending its
    /// cache, and samples a token for each sequence with `sample`.
    fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, Self::Seq>]) -> Result<Self::Ticket>;

    /// Whether a queued step has finished (never blocks).
    fn is_done(&self, ticket: &Self::Ticket) -> bool;

    /// Waits for a queued step of `lane`; returns the sampled tokens in the order of
    /// the step's sampling sequences, and the sequences that failed on their own (an
    /// error of the whole step is an `Err`).
    fn complete(&mut self, lane: usize, ticket: Self::Ticket) -> Result<StepOutput>;

    /// Starts recording the GPU timeline of every lane's steps (each step's spans then
    /// come in [`StepOutput::gpu_spans`]): per lane, the host time its spans count from;
    /// none where the backend has no GPU timeline (the default).
    fn start_gpu_trace(&mut self) -> Result<Vec<Instant>> {
        Ok(Vec::new())
    }

    /// Backend counters for the metrics.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// ShadowKV's reuse and traffic counters since the start (`None` with full
    /// attention).
    fn shadow_stats(&self) -> Option<ShadowStats> {
        None
    }
}

/// What a backend knows of a sequence when it starts.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpec {
    /// How to pick its tokens.
    pub sampling: SamplingParams,
    /// The seed of its draws (`sampling.seed` when set).
    pub seed: u64,
    /// Tokens of its prompt.
    pub prompt_tokens: usize,
    /// Most tokens it generates.
    pub max_tokens: usize,
}

/// Where a sequence's latest sampled token sits until the host reads it: the lane, the
/// serial number of the step on that lane, and the row among that step's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSample {
    /// Lane of the step.
    pub lane: usize,
    /// The step's serial number on its lane.
    pub step: u64,
    /// Row among the step's sampled tokens.
    pub row: usize,
}

/// Serial numbers of each lane's steps and the checks of [`StepInput::Previous`]
/// shared by the backends.
#[derive(Debug, Default)]
pub struct LaneSerials {
    next: Vec<u64>,
}

impl LaneSerials {
    /// The serial number the next step of `lane` gets (does not advance it).
    pub fn peek(&mut self, lane: usize) -> u64 {
        if self.next.len() <= lane {
            self.next.resize(lane + 1, 0);
        }
        self.next[lane]
    }

    /// Takes the next serial number of `lane`.
    pub fn take(&mut self, lane: usize) -> u64 {
        let s = self.peek(lane);
        self.next[lane] += 1;
        s
    }

    /// The row of the previous step of `lane` that sampled `last`, if that step is the
    /// one right before the next step of the lane; an error otherwise.
    pub fn previous_row(&mut self, lane: usize, last: Option<LastSample>) -> Result<usize> {
        let next = self.peek(lane);
        match last {
            Some(l) if l.lane == lane && l.step + 1 == next => Ok(l.row),
            _ => bail!("a sequence asked for its previous token, but lane {lane}'s previous step did not sample it"),
        }
    }
}

/// One sequence on the CPU: its cache, its sampler and where its last token is.
pub struct CpuSeq {
    cache: SeqCache,
    sampler: Sampler,
    last: Option<LastSample>,
}

impl CpuSeq {
    /// The cache.
    pub fn cache(&self) -> &SeqCache {
        &self.cache
    }
}

/// The CPU model (owned, or borrowed by the generation loop) behind the scheduler,
/// with full attention or ShadowKV (caches start as dense prefills that keep their
/// pre-RoPE keys and are compressed when the prompt is in; values live in `pool`).
/// Steps run synchronously in `submit`.
pub struct CpuBackend<M: Borrow<CpuModel> = CpuModel> {
    model: M,
    shadow: Option<(ShadowParams, ValuePool)>,
    totals: ShadowStats,
    serials: LaneSerials,
    /// Each lane's last step's tokens (what [`StepInput::Previous`] reads).
    last_tokens: Vec<Vec<u32>>,
    queue_depth: usize,
    decode_lanes: usize,
}

impl<M: Borrow<CpuModel>> CpuBackend<M> {
    /// Wraps `model`; with `shadow`, sequences decode with ShadowKV (the parameters are
    /// checked against the model here).
    pub fn new(model: M, shadow: Option<(ShadowParams, ValuePool)>) -> Result<Self> {
        if let Some((p, _)) = &shadow {
            p.validate(model.borrow().config())?;
        }
        Ok(CpuBackend {
            model,
            shadow,
            totals: ShadowStats::default(),
            serials: LaneSerials::default(),
            last_tokens: vec![Vec::new()],
            queue_depth: 1,
            decode_lanes: 1,
        })
    }

    /// Reports `lanes` lanes and a queue depth of `depth`, as the GPU does (the steps
    /// still run synchronously in `submit`): the scheduler then runs its asynchronous
    /// paths (queued steps, previous-step tokens, a prefill lane) on the CPU, which is
    /// how they are tested without a GPU.
    pub fn with_schedule(mut self, lanes: usize, depth: usize) -> Self {
        self.last_tokens = vec![Vec::new(); lanes.max(1)];
        self.queue_depth = depth.max(1);
        self
    }

    /// Of [`CpuBackend::with_schedule`]'s lanes, the first `n` decode (the last one
    /// prefills where there are more): the scheduler's several decode lanes, tested
    /// without a GPU.
    pub fn with_decode_lanes(mut self, n: usize) -> Self {
        self.decode_lanes = n.clamp(1, self.last_tokens.len());
        self
    }

    /// The model.
    pub fn model(&self) -> &CpuModel {
        self.model.borrow()
    }
}

impl<M: Borrow<CpuModel> + Send> StepBackend for CpuBackend<M> {
    type Seq = CpuSeq;
    type Ticket = StepOutput;

    fn lanes(&self) -> usize {
        self.last_tokens.len()
    }

    fn decode_lanes(&self) -> usize {
        self.decode_lanes
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn config(&self) -> &ModelConfig {
        self.model().config()
    }

    fn new_seq(&self, spec: &SeqSpec) -> Result<CpuSeq> {
        let cache = match &self.shadow {
            Some((p, pool)) => prefill_cache(self.config(), *p, pool)?,
            None => self.model().new_cache(),
        };
        let sampler = Sampler::new(SamplingParams {
            seed: Some(spec.sampling.seed.unwrap_or(spec.seed)),
            ..spec.sampling
        });
        Ok(CpuSeq {
            cache,
            sampler,
            last: None,
        })
    }

    fn seq_len(&self, seq: &CpuSeq) -> usize {
        seq.cache.len()
    }

    fn seq_bytes(&self, seq: &CpuSeq) -> usize {
        seq.cache.bytes()
    }

    fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, CpuSeq>]) -> Result<StepOutput> {
        ensure!(lane < self.last_tokens.len(), "no lane {lane}");
        let mut prev = Vec::with_capacity(batch.len());
        for s in batch.iter() {
            prev.push(match s.input {
                StepInput::Tokens(_) => None,
                StepInput::Previous => {
                    let row = self.serials.previous_row(lane, s.seq.last)?;
                    Some([self.last_tokens[lane][row]])
                }
            });
        }
        let before: Vec<ShadowStats> = batch
            .iter()
            .map(|s| shadow_stats(&s.seq.cache).unwrap_or_default())
            .collect();
        let mut inputs: Vec<SeqInput> = batch
            .iter_mut()
            .zip(&prev)
            .map(|(s, p)| SeqInput {
                tokens: match (&s.input, p) {
                    (_, Some(t)) => t,
                    (StepInput::Tokens(t), None) => t,
                    (StepInput::Previous, None) => unreachable!("resolved above"),
                },
                cache: &mut s.seq.cache,
                logits: if s.sample {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            })
            .collect();
        let model: &CpuModel = self.model.borrow();
        let logits = model.forward(&mut inputs)?;
        drop(inputs);
        let step = self.serials.take(lane);
        let mut out = StepOutput::default();
        for (i, ((s, row), b)) in batch.iter_mut().zip(&logits).zip(&before).enumerate() {
            if s.prompt_done {
                // A pool that cannot take this sequence fails it alone.
                if let Err(e) = model.finish_prefill(&mut s.seq.cache) {
                    out.failed.push((i, format!("{e:#}")));
                }
            }
            if let Some(a) = shadow_stats(&s.seq.cache) {
                self.totals.hits += a.hits - b.hits;
                self.totals.misses += a.misses - b.misses;
                self.totals.value_bytes_fetched += a.value_bytes_fetched - b.value_bytes_fetched;
            }
            if s.sample {
                s.seq.last = Some(LastSample {
                    lane,
                    step,
                    row: out.tokens.len(),
                });
                out.tokens.push(s.seq.sampler.sample(row));
            }
        }
        self.last_tokens[lane].clone_from(&out.tokens);
        Ok(out)
    }

    fn is_done(&self, _ticket: &StepOutput) -> bool {
        true
    }

    fn complete(&mut self, _lane: usize, ticket: StepOutput) -> Result<StepOutput> {
        Ok(ticket)
    }

    fn shadow_stats(&self) -> Option<ShadowStats> {
        self.shadow.as_ref().map(|_| self.totals)
    }

    fn stats(&self) -> BackendStats {
        let Some((_, pool)) = &self.shadow else {
            return BackendStats::default();
        };
        let s = pool.shape();
        let per_seq = s.seq_bytes() as u64;
        BackendStats {
            pool_bytes: pool.leased() as u64 * per_seq,
            value_bytes_fetched: self.totals.value_bytes_fetched,
            reuse_hit_ratio: self.totals.hit_rate().unwrap_or(0.0),
            gpu_bytes: 0,
        }
    }
}
