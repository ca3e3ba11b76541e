//! The `--attention` flag and ShadowKV settings shared by `generate` and `eval`.

use crate::model::config::ModelConfig;
use crate::shadow::{Attention, ShadowParams};
use anyhow::Result;
use clap::{Args, ValueEnum};

/// Attention method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Exact attention over the whole KV cache.
    Full,
    /// ShadowKV: low-rank keys, landmarks, sparse value fetches.
    Shadowkv,
    /// ShadowKV at the paper's ratios (budget 1.56 % of the context, rank 16 % of
    /// kv_heads·head_dim), ignoring the other ShadowKV flags.
    ShadowkvPaper,
}

impl Method {
    /// The method's name as typed on the command line.
    pub fn label(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Shadowkv => "shadowkv",
            Method::ShadowkvPaper => "shadowkv-paper",
        }
    }
}

/// ShadowKV settings; unset ones take the paper's defaults scaled to the context.
#[derive(Args, Debug, Clone, Default)]
pub struct ShadowArgs {
    /// Tokens of selected chunks per step and KV head (default ≈ 1.56 % of the context
    /// rounded up to a power of two, at least 256).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Rank of the pre-RoPE key factorisation (default min(160, kv_heads·head_dim)).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Tokens per chunk (default 8).
    #[arg(long)]
    pub chunk_size: Option<usize>,
    /// Outlier chunks kept exact per KV head (default 24 per 1024 budget tokens).
    #[arg(long)]
    pub outlier_chunks: Option<usize>,
    /// Most recent prompt chunks kept exact (default 4; at least 1).
    #[arg(long, value_parser = super::at_least_one)]
    pub local_chunks: Option<usize>,
}

impl ShadowArgs {
    /// The settings for a sequence of up to `context` tokens, validated against `cfg`.
    pub fn params(&self, cfg: &ModelConfig, context: usize) -> Result<ShadowParams> {
        let mut p = ShadowParams::defaults(cfg, context);
        if let Some(c) = self.chunk_size {
            p.chunk_size = c;
            if self.budget.is_none() && c > 0 {
                p.budget = (p.budget / c).max(1) * c;
            }
        }
        if let Some(b) = self.budget {
            p.budget = b;
            if self.outlier_chunks.is_none() {
                p.outlier_chunks = (b * 24).div_ceil(1024);
            }
        }
        p.rank = self.rank.unwrap_or(p.rank);
        p.outlier_chunks = self.outlier_chunks.unwrap_or(p.outlier_chunks);
        p.local_chunks = self.local_chunks.unwrap_or(p.local_chunks);
        p.validate(cfg)?;
        Ok(p)
    }

    /// Refuses ShadowKV flags given where no method takes them: none of `methods` is
    /// `shadowkv` (full attention has none; `shadowkv-paper` uses the paper's ratios).
    pub fn refuse_unused(&self, methods: &[Method]) -> Result<()> {
        if methods.contains(&Method::Shadowkv) {
            return Ok(());
        }
        let given: Vec<&str> = [
            ("--budget", self.budget.is_some()),
            ("--rank", self.rank.is_some()),
            ("--chunk-size", self.chunk_size.is_some()),
            ("--outlier-chunks", self.outlier_chunks.is_some()),
            ("--local-chunks", self.local_chunks.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if !given.is_empty() {
            anyhow::bail!(
                "{} set{} ShadowKV's settings, but --attention runs no `shadowkv` (`shadowkv-paper` uses the paper's ratios)",
                given.join(", "),
                if given.len() == 1 { "s" } else { "" }
            );
        }
        Ok(())
    }

    /// The attention mode for `method`.
    pub fn attention(&self, method: Method, cfg: &ModelConfig, context: usize) -> Result<Attention> {
        Ok(match method {
            Method::Full => Attention::Full,
            Method::Shadowkv => Attention::ShadowKv(self.params(cfg, context)?),
            Method::ShadowkvPaper => Attention::ShadowKv(ShadowParams::paper_ratios(cfg, context)),
        })
    }
}
