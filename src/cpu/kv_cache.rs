//! Per-sequence key/value cache of the CPU backend.

use crate::model::config::ModelConfig;

/// Keys and values of one layer, `[tokens, kv_heads·d]` each (keys after RoPE).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// Keys, post-RoPE.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// The cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct SeqKvCache {
    /// One entry per layer.
    pub layers: Vec<LayerKv>,
    len: usize,
}

impl SeqKvCache {
    /// An empty cache for a model of this shape.
    pub fn new(cfg: &ModelConfig) -> Self {
        SeqKvCache {
            layers: vec![LayerKv::default(); cfg.num_layers],
            len: 0,
        }
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
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
    }
}
