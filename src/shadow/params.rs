//! ShadowKV settings, their defaults (scaled from the paper's) and validation.

use crate::model::config::ModelConfig;
use crate::pool::{PoolShape, ValueFormat};
use anyhow::{bail, Result};

/// ShadowKV settings for one model (serialised as they are named here, in the
/// benchmarks' and evaluations' JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShadowParams {
    /// Tokens of selected chunks attended per step and KV head (a multiple of `chunk_size`).
    pub budget: usize,
    /// Rank of the pre-RoPE key factorisation (at most `kv_heads · head_dim`).
    pub rank: usize,
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Chunks per KV head kept exact because their landmark represents them badly.
    pub outlier_chunks: usize,
    /// Most recent prompt chunks kept exact (the local window).
    pub local_chunks: usize,
}

/// How a sequence attends to its past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Exact attention over the whole cache.
    Full,
    /// ShadowKV with these settings.
    ShadowKv(ShadowParams),
}

impl std::fmt::Display for ShadowParams {
    /// The settings in words (`budget 256, rank 160, chunk 8, …`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "budget {}, rank {}, chunk {}, {} outlier chunks, {} local chunks",
            self.budget, self.rank, self.chunk_size, self.outlier_chunks, self.local_chunks
        )
    }
}

impl std::fmt::Display for Attention {
    /// `full`, or `shadowkv: ` and its settings in words.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attention::Full => write!(f, "full"),
            Attention::ShadowKv(p) => write!(f, "shadowkv: {p}"),
        }
    }
}

impl Attention {
    /// ShadowKV's settings as JSON (null for full attention).
    pub fn settings_json(&self) -> serde_json::Value {
        match self {
            Attention::Full => serde_json::Value::Null,
            Attention::ShadowKv(p) => serde_json::to_value(p).expect("plain numbers"),
        }
    }
}

/// Smallest default budget, in tokens.
const MIN_BUDGET: usize = 256;

impl ShadowParams {
    /// The paper's defaults scaled to a context: budget ≈ 1.56 % of it rounded up to a
    /// power of two (at least 256 tokens), rank 160 capped by `kv_heads · head_dim`, chunk 8,
    /// 24 outlier chunks per 1024 budget tokens, 4 local chunks.
    pub fn defaults(cfg: &ModelConfig, context: usize) -> Self {
        let chunk_size = 8;
        // 1/64 of the context, rounded up to a power of two: 1024 at 60K, 2048 at 122K.
        let budget = (context / 64).next_power_of_two().max(MIN_BUDGET);
        ShadowParams {
            budget,
            rank: 160.min(cfg.num_kv_heads * cfg.head_dim),
            chunk_size,
            outlier_chunks: (budget * 24).div_ceil(1024),
            local_chunks: 4,
        }
    }

    /// The paper's ratios at any scale: budget 1/64 of the context in whole chunks,
    /// rank 16 % of `kv_heads · head_dim` in multiples of 8, outliers and local window
    /// as in [`ShadowParams::defaults`].
    pub fn paper_ratios(cfg: &ModelConfig, context: usize) -> Self {
        let chunk_size = 8;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let budget = ((context / 64) / chunk_size).max(1) * chunk_size;
        let rank = ((kvd as f64 * 0.16 / 8.0).round() as usize * 8).clamp(1, kvd);
        ShadowParams {
            budget,
            rank,
            chunk_size,
            outlier_chunks: (budget * 24).div_ceil(1024),
            local_chunks: 4,
        }
    }

    /// The shape of a value pool for `seqs` sequences of up to `context` tokens.
    pub fn pool_shape(&self, cfg: &ModelConfig, seqs: usize, context: usize) -> PoolShape {
        PoolShape {
            layers: cfg.num_layers,
            seqs,
            kv_heads: cfg.num_kv_heads,
            chunks: context.div_ceil(self.chunk_size),
            chunk: self.chunk_size,
            head_dim: cfg.head_dim,
            format: ValueFormat::Int8,
        }
    }

    /// Chunks selected per step and KV head.
    pub fn selected_chunks(&self) -> usize {
        self.budget / self.chunk_size
    }

    /// Rejects settings that cannot run on `cfg`, naming the setting.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        if self.chunk_size == 0 {
            bail!("chunk size must be at least 1");
        }
        if self.budget == 0 || self.budget % self.chunk_size != 0 {
            bail!(
                "budget {} must be a positive multiple of the chunk size {}",
                self.budget,
                self.chunk_size
            );
        }
        if self.local_chunks == 0 {
            bail!("local chunks must be at least 1 (the recent window)");
        }
        if self.rank == 0 || self.rank > kvd {
            bail!("rank {} must be in 1..={kvd} (kv_heads · head_dim)", self.rank);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::preset;

    #[test]
    fn defaults_follow_the_paper() {
        let cfg = preset("llama-3.1-8b").unwrap();
        let p = ShadowParams::defaults(&cfg, 131072);
        assert_eq!(p.budget, 2048);
        assert_eq!(p.rank, 160);
        assert_eq!(p.outlier_chunks, 48);
        assert_eq!(ShadowParams::defaults(&cfg, 61440).budget, 1024);
        assert_eq!(ShadowParams::defaults(&cfg, 124928).budget, 2048);
        assert_eq!(ShadowParams::defaults(&cfg, 249856).budget, 4096);
        let small = preset("smollm2-135m").unwrap();
        let p = ShadowParams::defaults(&small, 8192);
        assert_eq!((p.budget, p.rank, p.outlier_chunks), (256, 160, 6));
        p.validate(&small).unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        let cfg = preset("tiny").unwrap();
        let ok = ShadowParams {
            budget: 64,
            rank: 16,
            chunk_size: 8,
            outlier_chunks: 2,
            local_chunks: 1,
        };
        ok.validate(&cfg).unwrap();
        let e = ShadowParams { budget: 60, ..ok }
            .validate(&cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget 60"), "{e}");
        let e = ShadowParams { rank: 33, ..ok }.validate(&cfg).unwrap_err().to_string();
        assert!(e.contains("rank 33"), "{e}");
        let e = ShadowParams { chunk_size: 0, ..ok }
            .validate(&cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chunk size"), "{e}");
        let e = ShadowParams { local_chunks: 0, ..ok }
            .validate(&cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("local chunks"), "{e}");
    }
}
