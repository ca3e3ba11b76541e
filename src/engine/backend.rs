//! The interface the scheduler drives: a model that runs one batched forward pass over
//! sequences of different lengths, each with its own cache. The CPU model with full
//! attention implements it here; other backends (ShadowKV, CUDA) plug in the same way.

use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput, SeqKvCache};
use crate::model::config::ModelConfig;
use crate::pool::ValuePool;
use crate::shadow::{ShadowParams, ShadowStats};
use anyhow::Result;
use std::sync::Mutex;

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

/// The CPU model decoding with ShadowKV: caches start as dense prefills that keep their
/// pre-RoPE keys and are compressed when the prompt is in; values live in `pool`.
pub struct ShadowCpuModel {
    model: CpuModel,
    params: ShadowParams,
    pool: ValuePool,
    totals: Mutex<ShadowStats>,
}

impl ShadowCpuModel {
    /// Wraps `model`; `params` are validated against the model here.
    pub fn new(model: CpuModel, params: ShadowParams, pool: ValuePool) -> Result<Self> {
        params.validate(model.config())?;
        Ok(ShadowCpuModel {
            model,
            params,
            pool,
            totals: Mutex::new(ShadowStats::default()),
        })
    }
}

impl BatchModel for ShadowCpuModel {
    type Cache = SeqCache;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn new_cache(&self) -> SeqCache {
        SeqCache::ShadowPrefill {
            dense: SeqKvCache::with_pre_rope(self.model.config()),
            params: self.params,
            pool: self.pool.clone(),
        }
    }

    fn cache_len(&self, cache: &SeqCache) -> usize {
        cache.len()
    }

    fn cache_bytes(&self, cache: &SeqCache) -> usize {
        cache.bytes()
    }

    fn forward(&self, batch: &mut [BatchSeq<'_, SeqCache>]) -> Result<Vec<Vec<f32>>> {
        let before: Vec<ShadowStats> = batch
            .iter()
            .map(|s| s.cache.shadow_stats().unwrap_or_default())
            .collect();
        let out = BatchModel::forward(&self.model, batch)?;
        let mut totals = self.totals.lock().expect("stats lock");
        for (s, b) in batch.iter().zip(&before) {
            let a = s.cache.shadow_stats().unwrap_or_default();
            totals.hits += a.hits - b.hits;
            totals.misses += a.misses - b.misses;
            totals.value_bytes_fetched += a.value_bytes_fetched - b.value_bytes_fetched;
        }
        Ok(out)
    }

    fn finish_prefill(&self, cache: &mut SeqCache) -> Result<()> {
        self.model.finish_prefill(cache)
    }

    fn stats(&self) -> BackendStats {
        let t = *self.totals.lock().expect("stats lock");
        let s = self.pool.shape();
        let per_seq = (s.layers * s.kv_heads * s.chunks * s.chunk_elems * 4) as u64;
        BackendStats {
            pool_bytes: self.pool.leased() as u64 * per_seq,
            value_bytes_fetched: t.value_bytes_fetched,
            reuse_hit_ratio: t.hit_rate(),
            gpu_bytes: 0,
        }
    }
}
