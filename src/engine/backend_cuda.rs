//! The GPU model behind the scheduler: full attention in bf16, tokens sampled on the
//! device, decode steps replayed from CUDA graphs, each step queued on a lane (a CUDA
//! stream of its own) so that the host prepares step n+1 while step n runs. Lane 0 runs
//! at high priority; with a second lane, long prefills run on it at normal priority
//! beside the decode steps, which the GPU then schedules first.
//!
//! Each sequence's KV cache is allocated on the GPU at its first step, sized for the
//! server's context limit.

use super::backend::{BackendStats, LaneSerials, LastSample, StepBackend, StepInput, StepSeq};
use super::sampling::SamplingParams;
use crate::cpu::LogitsWanted;
use crate::cuda::device::StreamPriority;
use crate::cuda::{CudaModel, GpuCache, GpuSeq, Lane, StepTicket};
use crate::model::config::ModelConfig;
use anyhow::{bail, ensure, Result};
use std::borrow::Borrow;

/// One sequence on the GPU: its cache (allocated at its first step), its sampling row
/// and where its last sampled token is.
pub struct CudaSeq {
    cache: Option<GpuCache>,
    sampling: SamplingParams,
    seed: u64,
    /// Tokens sampled so far (the device sampler's counter).
    sampled: u64,
    last: Option<LastSample>,
}

/// [`CudaModel`] (owned, or borrowed by the generation loop) for the server.
pub struct CudaBackend<M: Borrow<CudaModel> = CudaModel> {
    model: M,
    cache_tokens: usize,
    lanes: Vec<Lane>,
    serials: LaneSerials,
}

impl<M: Borrow<CudaModel>> CudaBackend<M> {
    /// Serves `model` with caches of `cache_tokens` tokens for up to `max_batch`
    /// sequences on `lanes` lanes (1: prompts ride in the decode steps; 2: prompts are
    /// prefilled on a second stream); refuses limits whose caches cannot all fit in the
    /// free GPU memory.
    pub fn new(model: M, cache_tokens: usize, max_batch: usize, lanes: usize, graphs: bool) -> Result<Self> {
        ensure!((1..=2).contains(&lanes), "1 or 2 lanes, not {lanes}");
        let m: &CudaModel = model.borrow();
        let need = m.cache_bytes(cache_tokens) * max_batch;
        let (free, _) = m.ops().device().mem_info()?;
        // Room for the activations of a prefill chunk (on whichever lane prefills) and
        // each further lane's own scratch and cuBLAS workspace, besides the caches.
        let margin = (2usize << 30) + (256usize << 20) * (lanes - 1);
        if need + margin > free {
            bail!(
                "{max_batch} sequences of {cache_tokens} tokens need {:.1} GiB of KV cache, {:.1} GiB of GPU \
                 memory are free after the weights: lower limits.max_batch or limits.max_context",
                need as f64 / (1u64 << 30) as f64,
                free.saturating_sub(margin) as f64 / (1u64 << 30) as f64
            );
        }
        let priorities = [StreamPriority::High, StreamPriority::Normal];
        let lanes = priorities[..lanes]
            .iter()
            .map(|&p| m.new_lane(p, graphs))
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaBackend {
            model,
            cache_tokens,
            lanes,
            serials: LaneSerials::default(),
        })
    }

    /// The model.
    pub fn model(&self) -> &CudaModel {
        self.model.borrow()
    }

    /// Graph captures, replays and eager steps of each lane.
    pub fn graph_counts(&self) -> Vec<(usize, usize, usize)> {
        self.lanes
            .iter()
            .map(|l| (l.graphs.captures, l.graphs.replays, l.graphs.eager))
            .collect()
    }
}

impl<M: Borrow<CudaModel> + Send> StepBackend for CudaBackend<M> {
    type Seq = CudaSeq;
    type Ticket = StepTicket;

    fn config(&self) -> &ModelConfig {
        self.model().config()
    }

    fn lanes(&self) -> usize {
        self.lanes.len()
    }

    fn queue_depth(&self) -> usize {
        2
    }

    fn new_seq(&self, sampling: &SamplingParams, seed: u64) -> Result<CudaSeq> {
        Ok(CudaSeq {
            cache: None,
            sampling: *sampling,
            seed: sampling.seed.unwrap_or(seed),
            sampled: 0,
            last: None,
        })
    }

    fn seq_len(&self, seq: &CudaSeq) -> usize {
        seq.cache.as_ref().map_or(0, |c| c.len())
    }

    fn seq_bytes(&self, seq: &CudaSeq) -> usize {
        seq.cache.as_ref().map_or(0, |c| c.bytes())
    }

    fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, CudaSeq>]) -> Result<StepTicket> {
        ensure!(lane < self.lanes.len(), "no lane {lane}");
        let mut prev = Vec::with_capacity(batch.len());
        let mut sampling = Vec::with_capacity(batch.len());
        let mut allocated = false;
        for s in batch.iter_mut() {
            if s.seq.cache.is_none() {
                s.seq.cache = Some(self.model.borrow().new_cache(self.cache_tokens)?);
                allocated = true;
            }
            prev.push(match s.input {
                StepInput::Tokens(_) => None,
                StepInput::Previous => Some(self.serials.previous_row(lane, s.seq.last)? as u32),
            });
            sampling.push(s.seq.sampling.device_row(s.seq.seed, s.seq.sampled));
        }
        if allocated {
            // New caches are allocated and zeroed on the model's own stream: done before
            // the lane's stream writes them.
            self.model().ops().device().synchronize()?;
        }
        const ONE: [u32; 1] = [0];
        let mut seqs: Vec<GpuSeq> = batch
            .iter_mut()
            .map(|s| GpuSeq {
                tokens: match s.input {
                    StepInput::Tokens(t) => t,
                    StepInput::Previous => &ONE,
                },
                cache: s.seq.cache.as_mut().expect("allocated above"),
                logits: if s.sample {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            })
            .collect();
        let ticket = self
            .model
            .borrow()
            .submit(&mut self.lanes[lane], &mut seqs, &sampling, &prev)?;
        drop(seqs);
        let step = self.serials.take(lane);
        for (row, s) in batch.iter_mut().filter(|s| s.sample).enumerate() {
            s.seq.last = Some(LastSample { lane, step, row });
            s.seq.sampled += 1;
        }
        Ok(ticket)
    }

    fn is_done(&self, ticket: &StepTicket) -> bool {
        ticket.is_done()
    }

    fn complete(&mut self, lane: usize, ticket: StepTicket) -> Result<Vec<u32>> {
        self.model.borrow().complete(&mut self.lanes[lane], ticket)
    }

    fn stats(&self) -> BackendStats {
        let used = self
            .model()
            .ops()
            .device()
            .mem_info()
            .map_or(0, |(free, total)| total.saturating_sub(free));
        BackendStats {
            gpu_bytes: used as u64,
            ..BackendStats::default()
        }
    }
}
