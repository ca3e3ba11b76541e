//! The generation loop, one for every backend ([`run`]): chunked prefill, then batched
//! decode steps until each sequence meets EOS, a stop string, its token limit or the
//! model's context. [`generate`] runs it on the CPU (full attention or ShadowKV),
//! [`generate_cuda`] on the GPU, [`generate_parallel`] over several ([`generate_group`]
//! on a group already loaded).

use super::backend::{CpuBackend, SeqSpec, StepBackend, StepInput, StepOutput, StepSeq};
use super::backend_cuda::CudaBackend;
use super::backend_tp::{TpBackend, TpServing, TpWeights};
use super::sampling::SamplingParams;
pub use super::text::FinishReason;
use super::text::{SeqText, StopRules};
use crate::cpu::model::chunked_prefill;
use crate::cpu::{CpuModel, LogitsWanted};
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::{GpuValuePool, ShadowLayout, TierSize};
use crate::cuda::CudaModel;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::TextTokenizer;
use crate::pool::ValuePool;
use crate::shadow::{Attention, ShadowParams, ShadowStats};
use anyhow::{bail, ensure, Context, Result};
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
    /// How ShadowKV on the GPU fetches the missed values.
    pub value_fetch: FetchPath,
    /// ShadowKV on the GPU: the GPU value tier.
    pub gpu_tier: TierSize,
    /// ShadowKV on the GPU: micro-batches each step's attention is split into.
    pub micro_batches: usize,
    /// ShadowKV on the GPU: of the requests, how many keep their values in GPU value
    /// slots instead of the host pool ([`CudaBackend::with_value_slots`]).
    pub gpu_value_slots: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            prefill_chunk: 512,
            progress: false,
            attention: Attention::Full,
            value_fetch: FetchPath::ZeroCopy,
            gpu_tier: TierSize::Off,
            micro_batches: 1,
            gpu_value_slots: 0,
        }
    }
}

/// Runs every request to completion as one batch on the CPU, with full attention or
/// ShadowKV as `opts.attention` says.
pub fn generate(
    model: &CpuModel,
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
) -> Result<(Vec<Generation>, GenerateStats)> {
    let cfg = model.config();
    ensure!(
        opts.gpu_value_slots == 0,
        "GPU value slots need the CUDA backend (the CPU backend keeps every value in host memory)"
    );
    let shadow = match opts.attention {
        Attention::Full => None,
        Attention::ShadowKv(p) => Some((
            p,
            ValuePool::anonymous(p.pool_shape(cfg, reqs.len(), cfg.max_position_embeddings))?,
        )),
    };
    run(&mut CpuBackend::new(model, shadow)?, tok, reqs, opts)
}

/// Runs every request to completion as one batch on the GPU, with full attention or
/// ShadowKV as `opts.attention` says; `graphs` captures full-attention decode steps as
/// CUDA graphs.
pub fn generate_cuda(
    model: &CudaModel,
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
    graphs: bool,
) -> Result<(Vec<Generation>, GenerateStats)> {
    let cfg = model.config();
    let cap = gpu_cache_tokens(reqs, cfg.max_position_embeddings)?;
    let host_seqs = host_held(reqs.len(), opts.gpu_value_slots)?;
    let shadow = match opts.attention {
        Attention::Full => None,
        Attention::ShadowKv(p) => Some((p, gpu_value_pool(cfg, &p, cap, host_seqs)?)),
    };
    run(
        &mut CudaBackend::new(model, cap, host_seqs, 1, graphs, shadow)?
            .with_fetch(opts.value_fetch)?
            .with_micro_batches(opts.micro_batches)
            .with_value_slots(opts.gpu_value_slots)?
            .with_tier(opts.gpu_tier)?,
        tok,
        reqs,
        opts,
    )
}

/// Runs every request to completion as one batch over the GPUs `devices` (tensor
/// parallel: `config`'s model split over them, each loading its shard from
/// `weights`), as [`generate_cuda`] does on one.
pub fn generate_parallel(
    config: &ModelConfig,
    weights: TpWeights,
    devices: &[usize],
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
    graphs: bool,
) -> Result<(Vec<Generation>, GenerateStats)> {
    // Bad requests before the (long) load.
    validate_requests(reqs, config.max_position_embeddings)?;
    let mut group = TpBackend::load(config, weights, devices, opts.progress)?;
    generate_group(&mut group, tok, reqs, opts, graphs)
}

/// Runs every request to completion as one batch on a loaded tensor-parallel group,
/// configured for them as [`generate_cuda`] configures its backend on one GPU; the
/// group keeps its weights for the next call (`eval` runs sample after sample so).
pub fn generate_group(
    group: &mut TpBackend,
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
    graphs: bool,
) -> Result<(Vec<Generation>, GenerateStats)> {
    let cap = gpu_cache_tokens(reqs, group.config().max_position_embeddings)?;
    let host_seqs = host_held(reqs.len(), opts.gpu_value_slots)?;
    let pool = |_rank: usize, cfg: &ModelConfig| match opts.attention {
        Attention::ShadowKv(p) => gpu_value_pool(cfg, &p, cap, host_seqs),
        Attention::Full => bail!("full attention has no value pool"),
    };
    group.configure(TpServing {
        cache_tokens: cap,
        max_batch: reqs.len(),
        lanes: 1,
        graphs,
        shadow: match opts.attention {
            Attention::ShadowKv(p) => Some((p, &pool)),
            Attention::Full => None,
        },
        fetch: opts.value_fetch,
        micro_batches: opts.micro_batches,
        tier: opts.gpu_tier,
        value_slots: opts.gpu_value_slots,
        gatherers: None,
        prefill_half_sm: false,
    })?;
    run(group, tok, reqs, opts)
}

/// Tokens the GPU caches of `reqs` hold: the longest prompt and completion, within
/// the model's context `ctx` (the requests checked first).
fn gpu_cache_tokens(reqs: &[GenerateRequest], ctx: usize) -> Result<usize> {
    validate_requests(reqs, ctx)?;
    Ok(reqs
        .iter()
        .map(|r| (r.prompt.len() + r.max_tokens).min(ctx))
        .max()
        .unwrap_or(1))
}

/// The requests of a batch of `batch` whose values stay in the host pool, `slots` of
/// them keeping theirs in GPU value slots.
fn host_held(batch: usize, slots: usize) -> Result<usize> {
    batch
        .checked_sub(slots)
        .with_context(|| format!("{slots} GPU value slots for a batch of {batch} requests"))
}

/// A value pool for `seqs` ShadowKV sequences of `cap` tokens of a model shaped
/// `cfg` (one GPU's, or one device's of a group).
pub fn gpu_value_pool(cfg: &ModelConfig, p: &ShadowParams, cap: usize, seqs: usize) -> Result<ValuePool> {
    let layout = ShadowLayout::new(cfg, p, cap)?;
    let shape = GpuValuePool::shape_for(&layout, cfg.num_layers, seqs);
    ValuePool::anonymous(shape)
}

/// The generation loop over any backend: each prompt prefilled in chunks, then decode
/// steps over every unfinished sequence until each meets EOS, a stop string, its token
/// limit or the model's context.
pub fn run<B: StepBackend>(
    backend: &mut B,
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
) -> Result<(Vec<Generation>, GenerateStats)> {
    let cfg = backend.config();
    let ctx = cfg.max_position_embeddings;
    let eos = cfg.eos_token_ids.clone();
    validate_requests(reqs, ctx)?;
    let mut stats = GenerateStats::default();
    let total: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let bar = prefill_bar(opts, total);
    let mut seqs = Vec::with_capacity(reqs.len());
    let t0 = Instant::now();
    for r in reqs {
        let mut seq = backend.new_seq(&SeqSpec {
            sampling: r.sampling,
            seed: r.sampling.seed.unwrap_or_else(rand::random),
            prompt_tokens: r.prompt.len(),
            max_tokens: r.max_tokens,
        })?;
        let first = chunked_prefill(
            &r.prompt,
            opts.prefill_chunk,
            |n| bar.inc(n as u64),
            |part, logits| {
                let last = logits == LogitsWanted::Last;
                let mut one = [StepSeq {
                    input: StepInput::Tokens(part),
                    seq: &mut seq,
                    sample: last,
                    prompt_done: last,
                }];
                let ticket = backend.submit(0, &mut one)?;
                step_tokens(backend.complete(0, ticket)?)
            },
        )?;
        let mut out = SeqText::new();
        let full = backend.seq_len(&seq) >= ctx;
        push_text(&mut out, first[0], r, tok, &eos, full)?;
        seqs.push((seq, out));
    }
    bar.finish_and_clear();
    stats.prefill_tokens = total;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].1.finish().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let last: Vec<[u32; 1]> = live
            .iter()
            .map(|&i| [*seqs[i].1.ids().last().expect("has a token")])
            .collect();
        let mut batch: Vec<StepSeq<'_, B::Seq>> = seqs
            .iter_mut()
            .filter(|s| s.1.finish().is_none())
            .zip(&last)
            .map(|(s, t)| StepSeq {
                input: StepInput::Tokens(t),
                seq: &mut s.0,
                sample: true,
                prompt_done: false,
            })
            .collect();
        let ticket = backend.submit(0, &mut batch)?;
        drop(batch);
        let next = step_tokens(backend.complete(0, ticket)?)?;
        for (&i, &id) in live.iter().zip(&next) {
            let (seq, out) = &mut seqs[i];
            let full = backend.seq_len(seq) >= ctx;
            push_text(out, id, &reqs[i], tok, &eos, full)?;
            stats.decode_tokens += 1;
        }
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    stats.shadow = backend.shadow_stats();
    let out = seqs
        .into_iter()
        .map(|(_, out)| Generation {
            completion_ids: out.completion_ids(),
            finish: out.finish().unwrap_or(FinishReason::Length),
            text: out.into_text(),
        })
        .collect();
    Ok((out, stats))
}

/// The tokens of a step in which no sequence may fail on its own.
fn step_tokens(out: StepOutput) -> Result<Vec<u32>> {
    match out.failed.first() {
        Some((_, why)) => bail!("{why}"),
        None => Ok(out.tokens),
    }
}

/// Appends a sampled token to a sequence's text under the request's stop rules;
/// `context_full` ends it.
fn push_text(
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
/// `ctx` tokens, no tokens to generate, or bad sampling parameters. With several
/// requests the error names the request.
fn validate_requests(reqs: &[GenerateRequest], ctx: usize) -> Result<()> {
    for (i, r) in reqs.iter().enumerate() {
        let which = if reqs.len() > 1 {
            format!("request {i}: ")
        } else {
            String::new()
        };
        if r.prompt.is_empty() {
            bail!("{which}the prompt is empty");
        }
        if r.prompt.len() >= ctx {
            bail!(
                "{which}prompt of {} tokens does not fit the model's context of {ctx} tokens",
                r.prompt.len()
            );
        }
        if r.max_tokens == 0 {
            bail!("{which}max_tokens must be at least 1");
        }
        r.sampling.validate().map_err(|e| anyhow::anyhow!("{which}{e}"))?;
    }
    Ok(())
}

/// The prefill progress bar (shown when asked and the prompts span a few chunks).
fn prefill_bar(opts: GenerateOptions, total: usize) -> ProgressBar {
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
