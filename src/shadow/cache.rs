//! ShadowKV as a CPU model's sequence cache: a [`SeqCache`] that prefills densely and is
//! compressed into a [`ShadowSeq`] when its prompt is in, and its counters.

use super::params::ShadowParams;
use super::seq::{ShadowSeq, ShadowStats};
use crate::cpu::kv_cache::{CompressedSeq, Compressor, SeqCache, SeqKvCache};
use crate::model::config::ModelConfig;
use crate::pool::ValuePool;
use anyhow::Result;
use std::any::Any;

/// Compresses a finished prefill with ShadowKV's settings, its values into a pool.
struct ShadowCompressor {
    params: ShadowParams,
    pool: ValuePool,
}

impl Compressor for ShadowCompressor {
    fn compress(&self, cfg: &ModelConfig, dense: &SeqKvCache) -> Result<Box<dyn CompressedSeq>> {
        Ok(Box::new(ShadowSeq::from_prefill(cfg, self.params, dense, &self.pool)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl From<ShadowSeq> for SeqCache {
    fn from(s: ShadowSeq) -> Self {
        SeqCache::Compressed(Box::new(s))
    }
}

/// A fresh ShadowKV cache for one sequence of a model of `cfg`: dense while prefilling,
/// compressed by [`SeqCache::finish_prefill`], its values then in `pool`.
pub fn prefill_cache(cfg: &ModelConfig, params: ShadowParams, pool: &ValuePool) -> Result<SeqCache> {
    params.validate(cfg)?;
    Ok(SeqCache::Prefill {
        dense: SeqKvCache::with_pre_rope(cfg),
        compressor: Box::new(ShadowCompressor {
            params,
            pool: pool.clone(),
        }),
    })
}

/// ShadowKV's counters of a sequence's cache: its own once compressed, zeros while it
/// prefills for ShadowKV, none for full attention.
pub fn shadow_stats(cache: &SeqCache) -> Option<ShadowStats> {
    match cache {
        SeqCache::Compressed(s) => s.as_any().downcast_ref::<ShadowSeq>().map(ShadowSeq::stats),
        SeqCache::Prefill { compressor, .. } => compressor.as_any().is::<ShadowCompressor>().then(ShadowStats::default),
        SeqCache::Dense(_) => None,
    }
}
