//! Per-sequence key/value cache of the CPU backend.

use crate::model::config::ModelConfig;
use crate::pool::ValuePool;
use crate::shadow::{ShadowParams, ShadowSeq, ShadowStats};
use anyhow::Result;

/// Keys and values of one layer, `[tokens, kv_heads·d]` each (keys after RoPE).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// Keys, post-RoPE.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Keys before RoPE, kept only for sequences that ShadowKV will compress.
    pub k_pre: Vec<f32>,
}

/// The cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct SeqKvCache {
    /// One entry per layer.
    pub layers: Vec<LayerKv>,
    len: usize,
    keep_pre_rope: bool,
}

impl SeqKvCache {
    /// An empty cache for a model of this shape.
    pub fn new(cfg: &ModelConfig) -> Self {
        SeqKvCache {
            layers: vec![LayerKv::default(); cfg.num_layers],
            len: 0,
            keep_pre_rope: false,
        }
    }

    /// An empty cache that also keeps pre-RoPE keys (for ShadowKV's factorisation).
    pub fn with_pre_rope(cfg: &ModelConfig) -> Self {
        SeqKvCache {
            keep_pre_rope: true,
            ..Self::new(cfg)
        }
    }

    /// Whether pre-RoPE keys are kept.
    pub fn keeps_pre_rope(&self) -> bool {
        self.keep_pre_rope
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that `n` more tokens were appended to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// A cache that continues this one: a copy for full attention, or with
    /// `Some((params, pool))` its ShadowKV compression (needs the pre-RoPE keys).
    pub fn fork(&self, cfg: &ModelConfig, shadow: Option<(ShadowParams, &ValuePool)>) -> Result<SeqCache> {
        Ok(match shadow {
            None => SeqCache::Dense(self.clone()),
            Some((params, pool)) => SeqCache::Shadow(Box::new(ShadowSeq::from_prefill(cfg, params, self, pool)?)),
        })
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len() + l.k_pre.len()) * 4)
            .sum()
    }
}

/// The attention state of one sequence.
pub enum SeqCache {
    /// Full attention over an exact cache.
    Dense(SeqKvCache),
    /// A ShadowKV sequence still prefilling: dense attention, pre-RoPE keys kept,
    /// compressed by [`SeqCache::finish_prefill`].
    ShadowPrefill {
        /// The exact prefill cache.
        dense: SeqKvCache,
        /// The settings to compress with.
        params: ShadowParams,
        /// Where the values will live.
        pool: ValuePool,
    },
    /// A ShadowKV sequence decoding.
    Shadow(Box<ShadowSeq>),
}

impl SeqCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        match self {
            SeqCache::Dense(c) | SeqCache::ShadowPrefill { dense: c, .. } => c.len(),
            SeqCache::Shadow(s) => s.len(),
        }
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the sequence holds in memory (ShadowKV: the on-device part, not the pool).
    pub fn bytes(&self) -> usize {
        match self {
            SeqCache::Dense(c) | SeqCache::ShadowPrefill { dense: c, .. } => c.bytes(),
            SeqCache::Shadow(s) => s.bytes(),
        }
    }

    /// Compresses a ShadowKV sequence once its prompt is in; no-op otherwise.
    pub fn finish_prefill(&mut self, cfg: &ModelConfig) -> Result<()> {
        if let SeqCache::ShadowPrefill { dense, params, pool } = self {
            let s = ShadowSeq::from_prefill(cfg, *params, dense, pool)?;
            *self = SeqCache::Shadow(Box::new(s));
        }
        Ok(())
    }

    /// ShadowKV counters, for ShadowKV sequences.
    pub fn shadow_stats(&self) -> Option<ShadowStats> {
        match self {
            SeqCache::Shadow(s) => Some(s.stats()),
            SeqCache::ShadowPrefill { .. } => Some(ShadowStats::default()),
            SeqCache::Dense(_) => None,
        }
    }
}
