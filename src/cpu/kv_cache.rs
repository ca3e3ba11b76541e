//! Per-sequence key/value cache of the CPU backend, and the two traits through which a
//! compressed attention (ShadowKV's, in `crate::shadow`) plugs into the model without
//! `cpu` depending on it.

use super::ops::Rope;
use crate::model::config::ModelConfig;
use anyhow::Result;
use std::any::Any;

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

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len() + l.k_pre.len()) * 4)
            .sum()
    }
}

/// A sequence whose attention runs stages of its own instead of attending over a dense
/// cache (ShadowKV's `ShadowSeq`, in `crate::shadow`): the model hands it each layer's new
/// rows and takes back their attention.
pub trait CompressedSeq: Send + Any {
    /// Tokens it holds.
    fn len(&self) -> usize;

    /// Whether it holds no tokens.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes it holds in memory (ShadowKV: the on-device part, not the pool).
    fn bytes(&self) -> usize;

    /// Takes layer `l`'s `n` new rows and writes their attention to `out`: `q` is
    /// `[n, heads·d]`, `k` (rotated), `k_pre` (before RoPE) and `v` are `[n, kv_heads·d]`,
    /// `out` is `[n, heads·d]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_layer(
        &mut self,
        l: usize,
        q: &[f32],
        k: &[f32],
        k_pre: &[f32],
        v: &[f32],
        rope: &Rope,
        out: &mut [f32],
    ) -> Result<()>;

    /// Records that a forward pass appended `n` tokens to every layer.
    fn advance(&mut self, n: usize);

    /// Itself, for callers that know the concrete type (its counters).
    fn as_any(&self) -> &dyn Any;
}

/// Turns a finished prefill (a dense cache that kept its pre-RoPE keys) into a
/// [`CompressedSeq`].
pub trait Compressor: Send + Any {
    /// The compressed sequence.
    fn compress(&self, cfg: &ModelConfig, dense: &SeqKvCache) -> Result<Box<dyn CompressedSeq>>;

    /// Itself, for callers that know the concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// The attention state of one sequence.
pub enum SeqCache {
    /// Full attention over an exact cache.
    Dense(SeqKvCache),
    /// A sequence still prefilling with dense attention (pre-RoPE keys kept), compressed
    /// by [`SeqCache::finish_prefill`].
    Prefill {
        /// The exact prefill cache.
        dense: SeqKvCache,
        /// What compresses it.
        compressor: Box<dyn Compressor>,
    },
    /// A compressed sequence decoding through its own stages.
    Compressed(Box<dyn CompressedSeq>),
}

impl SeqCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        match self {
            SeqCache::Dense(c) | SeqCache::Prefill { dense: c, .. } => c.len(),
            SeqCache::Compressed(s) => s.len(),
        }
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the sequence holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            SeqCache::Dense(c) | SeqCache::Prefill { dense: c, .. } => c.bytes(),
            SeqCache::Compressed(s) => s.bytes(),
        }
    }

    /// Compresses a sequence whose prompt is in; no-op for the other states.
    pub fn finish_prefill(&mut self, cfg: &ModelConfig) -> Result<()> {
        if let SeqCache::Prefill { dense, compressor } = self {
            let s = compressor.compress(cfg, dense)?;
            *self = SeqCache::Compressed(s);
        }
        Ok(())
    }
}
