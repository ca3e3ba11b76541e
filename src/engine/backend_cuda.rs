//! The GPU model behind the scheduler: full attention in bf16, each sequence's KV cache
//! allocated on the GPU at its first forward pass, sized for the server's context limit.

use super::backend::{BackendStats, BatchModel, BatchSeq};
use crate::cuda::{CudaModel, GpuCache, GpuSeq};
use crate::model::config::ModelConfig;
use anyhow::{bail, Result};

/// [`CudaModel`] for the server. Caches start empty (`None`) and take `cache_tokens`
/// tokens of GPU memory when their sequence first runs.
pub struct CudaBatchModel {
    model: CudaModel,
    cache_tokens: usize,
}

impl CudaBatchModel {
    /// Serves `model` with caches of `cache_tokens` tokens for up to `max_batch`
    /// sequences; refuses limits whose caches cannot all fit in the free GPU memory.
    pub fn new(model: CudaModel, cache_tokens: usize, max_batch: usize) -> Result<Self> {
        let need = model.cache_bytes(cache_tokens) * max_batch;
        let (free, _) = model.ops().device().mem_info()?;
        // Room for activations and the prefill workspace besides the caches.
        let margin = 2usize << 30;
        if need + margin > free {
            bail!(
                "{max_batch} sequences of {cache_tokens} tokens need {:.1} GiB of KV cache, {:.1} GiB of GPU \
                 memory are free after the weights: lower limits.max_batch or limits.max_context",
                need as f64 / (1u64 << 30) as f64,
                free.saturating_sub(margin) as f64 / (1u64 << 30) as f64
            );
        }
        Ok(CudaBatchModel { model, cache_tokens })
    }
}

impl BatchModel for CudaBatchModel {
    type Cache = Option<GpuCache>;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn new_cache(&self) -> Option<GpuCache> {
        None
    }

    fn cache_len(&self, cache: &Option<GpuCache>) -> usize {
        cache.as_ref().map_or(0, |c| c.len())
    }

    fn cache_bytes(&self, cache: &Option<GpuCache>) -> usize {
        cache.as_ref().map_or(0, |c| c.bytes())
    }

    fn forward(&self, batch: &mut [BatchSeq<'_, Option<GpuCache>>]) -> Result<Vec<Vec<f32>>> {
        for s in batch.iter_mut() {
            if s.cache.is_none() {
                *s.cache = Some(self.model.new_cache(self.cache_tokens)?);
            }
        }
        let mut seqs: Vec<GpuSeq> = batch
            .iter_mut()
            .map(|s| GpuSeq {
                tokens: s.tokens,
                cache: s.cache.as_mut().expect("allocated above"),
                logits: s.logits,
            })
            .collect();
        self.model.forward(&mut seqs)
    }

    fn stats(&self) -> BackendStats {
        let used = self
            .model
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
