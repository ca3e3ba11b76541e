//! Sampling steps, with decode steps captured as CUDA graphs.
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

use super::model::{CudaModel, GpuSeq, StepPlan};
use crate::cpu::LogitsWanted;
use anyhow::{ensure, Result};
use cudarc::driver::{sys, CudaGraph};

/// Sequence lengths are bucketed to multiples of this for a captured step.
const LEN_BUCKET: usize = 1024;

/// The captured decode step of a batch, if any, and counters.
pub struct StepGraphs {
    enabled: bool,
    current: Option<Captured>,
    /// Steps captured.
    pub captures: usize,
    /// Steps replayed from a capture.
    pub replays: usize,
    /// Steps run eagerly.
    pub eager: usize,
}

struct Captured {
    graph: CudaGraph,
    key: Vec<(u64, usize)>,
    bucket: usize,
    generation: u64,
    workspace: (u64, u64),
}

impl StepGraphs {
    /// Graph capture on (`enabled`) or every step eager.
    pub fn new(enabled: bool) -> Self {
        StepGraphs {
            enabled,
            current: None,
            captures: 0,
            replays: 0,
            eager: 0,
        }
    }
}

impl CudaModel {
    /// Runs one step and samples one token for every sequence that wants logits
    /// (`LogitsWanted::Last`), with `sampling[i]` the [`super::step::sampling_row`] of
    /// sequence `i`; returns the tokens of those sequences, in order. Decode steps are
    /// replayed from a CUDA graph when `graphs` allows.
    pub fn step(&self, seqs: &mut [GpuSeq], sampling: &[[u64; 5]], graphs: &mut StepGraphs) -> Result<Vec<u32>> {
        ensure!(
            seqs.iter().all(|s| s.logits != LogitsWanted::All),
            "a sampling step takes the logits of each sequence's last token only"
        );
        ensure!(sampling.len() == seqs.len(), "one sampling row per sequence");
        let mut sc = self.scratch.lock().expect("scratch lock");
        let before = sc.generation;
        let mut plan = self.stage_step(&mut sc, seqs)?;
        let rows: Vec<[u64; 5]> = seqs
            .iter()
            .zip(sampling)
            .filter(|(s, _)| s.logits == LogitsWanted::Last && !s.tokens.is_empty())
            .map(|(_, r)| *r)
            .collect();
        self.stage_sampling(&mut sc, &plan, &rows)?;
        let caches: Vec<&super::model::GpuCache> = seqs.iter().map(|s| &*s.cache).collect();
        let key: Vec<(u64, usize)> = caches.iter().map(|c| (c.device_addr(self), c.capacity())).collect();
        let capture = graphs.enabled && plan.decode && !plan.picked.is_empty();
        if capture {
            plan.max_len = plan.max_len.div_ceil(LEN_BUCKET) * LEN_BUCKET;
            let reusable = graphs.current.as_ref().is_some_and(|g| {
                g.key == key
                    && g.bucket == plan.max_len
                    && g.generation == sc.generation
                    && sc.generation == before
                    && g.workspace == sc.decode_ws.addresses(self.ops())
            });
            if reusable {
                graphs.current.as_ref().expect("checked").graph.launch()?;
                graphs.replays += 1;
            } else {
                graphs.current = None;
                // Run it eagerly first: sizes every workspace for this bucket, so that
                // nothing is allocated while capturing.
                self.encode_step(&mut sc, &plan, &caches)?;
                self.encode_sampling(&mut sc, &plan)?;
                let gen = sc.generation;
                let stream = self.ops().device().stream().clone();
                stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let queued = self
                    .encode_step(&mut sc, &plan, &caches)
                    .and_then(|()| self.encode_sampling(&mut sc, &plan));
                let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                queued?;
                ensure!(sc.generation == gen, "scratch buffers moved while capturing a step");
                if let Some(graph) = ended? {
                    graph.upload()?;
                    graphs.current = Some(Captured {
                        graph,
                        key,
                        bucket: plan.max_len,
                        generation: gen,
                        workspace: sc.decode_ws.addresses(self.ops()),
                    });
                    graphs.captures += 1;
                }
                graphs.eager += 1;
            }
        } else {
            self.encode_step(&mut sc, &plan, &caches)?;
            self.encode_sampling(&mut sc, &plan)?;
            graphs.eager += 1;
        }
        let n = plan.picked.len();
        let tokens = if n == 0 {
            Vec::new()
        } else {
            let t = sc.tokens.as_ref().expect("reserved");
            self.ops().device().stream().clone_dtoh(&t.slice(0..n))?
        };
        self.ops().device().synchronize()?;
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        Ok(tokens)
    }

    fn stage_sampling(&self, sc: &mut super::model::Scratch, plan: &StepPlan, rows: &[[u64; 5]]) -> Result<()> {
        ensure!(rows.len() == plan.picked.len(), "one sampling row per sampled sequence");
        if rows.is_empty() {
            return Ok(());
        }
        let flat: Vec<u64> = rows.iter().flatten().copied().collect();
        let at = sc.sampling_offset;
        let s = self.ops().device().stream();
        let addrs = sc.addrs.as_mut().expect("reserved");
        s.memcpy_htod(&flat, &mut addrs.slice_mut(at..at + flat.len()))?;
        Ok(())
    }

    fn encode_sampling(&self, sc: &mut super::model::Scratch, plan: &StepPlan) -> Result<()> {
        let n = plan.picked.len();
        if n == 0 {
            return Ok(());
        }
        let at = sc.sampling_offset;
        let (logits, addrs, tokens) = (
            sc.logits.as_ref().expect("reserved"),
            sc.addrs.as_ref().expect("reserved"),
            sc.tokens.as_mut().expect("reserved"),
        );
        self.ops().sample(
            tokens,
            logits,
            &addrs.slice(at..at + 5 * n),
            n,
            self.config().vocab_size,
        )
    }
}
