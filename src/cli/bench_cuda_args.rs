//! What `shadowkv bench --backend cuda` runs, as the command line gave it (the one-GPU
//! and the tensor-parallel benchmarks read it alike).

use super::backend::CudaArgs;
use super::shadow_args::{Method, ShadowArgs};
use crate::cuda::shadow::ValueSlots;
use crate::model::config::ModelConfig;
use crate::shadow::{Attention, ShadowParams};
use anyhow::Result;
use std::path::PathBuf;

/// What `bench --backend cuda` runs.
pub struct CudaBench {
    /// Model spec.
    pub model: String,
    /// Contexts (tokens in the cache when decoding starts).
    pub contexts: Vec<usize>,
    /// Sequences, `None` = the largest batch that fits.
    pub batch: Option<usize>,
    /// Decode steps timed.
    pub gen: usize,
    /// Prompt tokens per prefill pass.
    pub prefill_chunk: usize,
    /// ShadowKV micro-batch counts, each measured.
    pub micro_batches: Vec<usize>,
    /// Blocks of the zero-copy value fetch, each measured (with each micro-batch count).
    pub fetch_blocks: Vec<usize>,
    /// ShadowKV lane counts (the batch split among lanes decoding side by side), each
    /// measured with each micro-batch count and fetch block count.
    pub lanes: Vec<usize>,
    /// Where to write the GPU timeline of the ShadowKV runs (Chrome trace JSON).
    pub trace: Option<PathBuf>,
    /// The file that holds ShadowKV's host value pool (anonymous memory without one).
    pub pool_file: Option<PathBuf>,
    /// Run the PyTorch peer too.
    pub peer_torch: bool,
    /// CUDA options.
    pub cuda: CudaArgs,
    /// JSON output: `Some(None)` to stdout, `Some(Some(path))` to a file.
    pub json: Option<Option<PathBuf>>,
    /// Whether full attention runs.
    pub full: bool,
    /// The ShadowKV methods that run, and their settings.
    pub shadow: Vec<Method>,
    /// ShadowKV settings given on the command line.
    pub shadow_args: ShadowArgs,
    /// ShadowKV's GPU value slots.
    pub value_slots: ValueSlots,
}

impl CudaBench {
    /// Checks every ShadowKV method's settings at every context, before the model loads.
    pub(super) fn check_shadow(&self, cfg: &ModelConfig) -> Result<()> {
        for &ctx in &self.contexts {
            self.shadow_for(cfg, ctx)?;
        }
        Ok(())
    }

    /// The ShadowKV settings of each ShadowKV method at context `ctx` (the generated
    /// tokens included).
    pub(super) fn shadow_for(&self, cfg: &ModelConfig, ctx: usize) -> Result<Vec<ShadowParams>> {
        self.shadow
            .iter()
            .filter_map(|&m| match self.shadow_args.attention(m, cfg, ctx + self.gen) {
                Ok(Attention::Full) => None,
                Ok(Attention::ShadowKv(p)) => Some(Ok(p)),
                Err(e) => Some(Err(e)),
            })
            .collect()
    }
}
