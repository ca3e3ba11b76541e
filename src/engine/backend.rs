//! The interface the scheduler drives: a model that runs one batched forward pass over
//! sequences of different lengths, each with its own cache. The CPU model with full
//! attention implements it here; other backends (ShadowKV, CUDA) plug in the same way.

use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput};
use crate::model::config::ModelConfig;
use anyhow::Result;

/// One sequence's part of a batched step.
pub struct BatchSeq<'a, C> {
    /// New tokens, appended after what `cache` holds.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by `tokens`.
    pub cache: &'a mut C,
    /// Which logits to return.
    pub logits: LogitsWanted,
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

/// A model the scheduler can run.
pub trait BatchModel: Send + 'static {
    /// The per-sequence cache.
    type Cache: Send;

    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;

    /// A fresh cache for one sequence.
    fn new_cache(&self) -> Self::Cache;

    /// Tokens held by a cache.
    fn cache_len(&self, cache: &Self::Cache) -> usize;

    /// Bytes held by a cache.
    fn cache_bytes(&self, cache: &Self::Cache) -> usize;

    /// Runs the new tokens of every sequence, extending their caches; returns, per
    /// sequence, the wanted logits as rows of `vocab_size` values.
    fn forward(&self, batch: &mut [BatchSeq<'_, Self::Cache>]) -> Result<Vec<Vec<f32>>>;

    /// Called once a sequence's whole prompt is in its cache, before its first token is
    /// sampled (ShadowKV compresses the prefill cache here).
    fn finish_prefill(&self, _cache: &mut Self::Cache) -> Result<()> {
        Ok(())
    }

    /// Backend counters for the metrics.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }
}

impl BatchModel for CpuModel {
    type Cache = SeqCache;

    fn config(&self) -> &ModelConfig {
        CpuModel::config(self)
    }

    fn new_cache(&self) -> SeqCache {
        CpuModel::new_cache(self)
    }

    fn cache_len(&self, cache: &SeqCache) -> usize {
        cache.len()
    }

    fn cache_bytes(&self, cache: &SeqCache) -> usize {
        cache.bytes()
    }

    fn forward(&self, batch: &mut [BatchSeq<'_, SeqCache>]) -> Result<Vec<Vec<f32>>> {
        let mut inputs: Vec<SeqInput> = batch
            .iter_mut()
            .map(|s| SeqInput {
                tokens: s.tokens,
                cache: &mut *s.cache,
                logits: s.logits,
            })
            .collect();
        CpuModel::forward(self, &mut inputs)
    }

    fn finish_prefill(&self, cache: &mut SeqCache) -> Result<()> {
        CpuModel::finish_prefill(self, cache)
    }
}
