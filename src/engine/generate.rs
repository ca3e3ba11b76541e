//! The generation loop: chunked prefill, then batched decode steps until each sequence
//! meets EOS, a stop string, its token limit or the model's context.

use super::sampling::{Sampler, SamplingParams};
pub use super::text::FinishReason;
use super::text::{SeqText, StopRules};
use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput};
use crate::model::tokenizer::TextTokenizer;
use crate::pool::ValuePool;
use crate::shadow::{Attention, ShadowStats};
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

/// One prompt to continue.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Strings that end generation; the text is cut before the first one found.
    pub stop: Vec<String>,
}

/// The result for one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (EOS excluded; cut at a stop string's token).
    pub completion_ids: Vec<u32>,
    /// Generated text (special tokens skipped, cut before a stop string).
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// Timings of one [`generate`] call.
#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    /// Prompt tokens processed.
    pub prefill_tokens: usize,
    /// Wall time of all prefills.
    pub prefill_secs: f64,
    /// Tokens produced by decode steps (the first token of each sequence comes from
    /// its prefill and is not counted).
    pub decode_tokens: usize,
    /// Wall time of all decode steps.
    pub decode_secs: f64,
    /// ShadowKV reuse and traffic counters, summed over sequences (ShadowKV only).
    pub shadow: Option<ShadowStats>,
}

/// Knobs of the loop that do not change results.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Prompt tokens per prefill forward pass.
    pub prefill_chunk: usize,
    /// Show a progress bar for long prefills.
    pub progress: bool,
    /// Full attention or ShadowKV.
    pub attention: Attention,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            prefill_chunk: 512,
            progress: false,
            attention: Attention::Full,
        }
    }
}

struct Active {
    cache: SeqCache,
    sampler: Sampler,
    out: SeqText,
}

/// Runs every request to completion as one batch.
pub fn generate(
    model: &CpuModel,
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
) -> Result<(Vec<Generation>, GenerateStats)> {
    let cfg = model.config();
    let ctx = cfg.max_position_embeddings;
    validate_requests(reqs, ctx)?;
    let mut stats = GenerateStats::default();
    let total: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let bar = prefill_bar(opts, total);
    let mut seqs = Vec::with_capacity(reqs.len());
    let pool = match opts.attention {
        Attention::Full => None,
        Attention::ShadowKv(p) => Some(ValuePool::anonymous(p.pool_shape(cfg, reqs.len(), ctx))?),
    };
    let t0 = Instant::now();
    for r in reqs {
        let mut cache = match (opts.attention, &pool) {
            (Attention::ShadowKv(p), Some(pool)) => model.new_shadow_cache(p, pool)?,
            _ => model.new_cache(),
        };
        let logits = model.prefill(&mut cache, &r.prompt, opts.prefill_chunk, |n| bar.inc(n as u64))?;
        model.finish_prefill(&mut cache)?;
        let mut sampler = Sampler::new(r.sampling);
        let first = sampler.sample(&logits);
        let mut s = Active {
            cache,
            sampler,
            out: SeqText::new(),
        };
        push_token(&mut s, first, r, tok, cfg.eos_token_ids.as_slice(), ctx)?;
        seqs.push(s);
    }
    bar.finish_and_clear();
    stats.prefill_tokens = total;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].out.finish().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let last: Vec<[u32; 1]> = live
            .iter()
            .map(|&i| [*seqs[i].out.ids().last().expect("has a token")])
            .collect();
        let mut inputs: Vec<SeqInput> = Vec::with_capacity(live.len());
        let mut caches: Vec<&mut SeqCache> = seqs
            .iter_mut()
            .filter(|s| s.out.finish().is_none())
            .map(|s| &mut s.cache)
            .collect();
        for (c, t) in caches.drain(..).zip(&last) {
            inputs.push(SeqInput {
                tokens: t,
                cache: c,
                logits: LogitsWanted::Last,
            });
        }
        let logits = model.forward(&mut inputs)?;
        drop(inputs);
        for (&i, row) in live.iter().zip(&logits) {
            let next = seqs[i].sampler.sample(row);
            push_token(&mut seqs[i], next, &reqs[i], tok, cfg.eos_token_ids.as_slice(), ctx)?;
            stats.decode_tokens += 1;
        }
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    for st in seqs.iter().filter_map(|s| s.cache.shadow_stats()) {
        stats.shadow.get_or_insert_with(ShadowStats::default).add(&st);
    }
    let out = seqs
        .into_iter()
        .map(|s| Generation {
            completion_ids: s.out.completion_ids(),
            finish: s.out.finish().unwrap_or(FinishReason::Length),
            text: s.out.into_text(),
        })
        .collect();
    Ok((out, stats))
}

/// Records a sampled token and decides whether the sequence is finished.
fn push_token(
    s: &mut Active,
    id: u32,
    r: &GenerateRequest,
    tok: &TextTokenizer,
    eos: &[u32],
    ctx: usize,
) -> Result<()> {
    let full = s.cache.len() >= ctx;
    push_text(&mut s.out, id, r, tok, eos, full)
}

/// Appends a sampled token to a sequence's text under the request's stop rules;
/// `context_full` ends it.
pub(crate) fn push_text(
    out: &mut SeqText,
    id: u32,
    r: &GenerateRequest,
    tok: &TextTokenizer,
    eos: &[u32],
    context_full: bool,
) -> Result<()> {
    let rules = StopRules {
        eos,
        stop: &r.stop,
        max_tokens: r.max_tokens,
    };
    out.push(id, tok, &rules, context_full)?;
    Ok(())
}

/// Rejects requests that cannot run: an empty prompt, one that fills the context of
/// `ctx` tokens, no tokens to generate, or bad sampling parameters.
pub(crate) fn validate_requests(reqs: &[GenerateRequest], ctx: usize) -> Result<()> {
    for (i, r) in reqs.iter().enumerate() {
        if r.prompt.is_empty() {
            bail!("request {i}: the prompt is empty");
        }
        if r.prompt.len() >= ctx {
            bail!(
                "request {i}: prompt of {} tokens does not fit the model's context of {ctx} tokens",
                r.prompt.len()
            );
        }
        if r.max_tokens == 0 {
            bail!("request {i}: max_tokens must be at least 1");
        }
        r.sampling.validate().map_err(|e| anyhow::anyhow!("request {i}: {e}"))?;
    }
    Ok(())
}

/// The prefill progress bar (shown when asked and the prompts span a few chunks).
pub(crate) fn prefill_bar(opts: GenerateOptions, total: usize) -> ProgressBar {
    if !(opts.progress && total > 2 * opts.prefill_chunk) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total as u64);
    b.set_style(
        ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens {per_sec} eta {eta}")
            .expect("static template"),
    );
    b
}
