//! Runs the RULER-style tasks with several attention methods side by side. On the CPU
//! each sample's prompt is prefilled once (dense, keeping pre-RoPE keys) and every
//! method decodes from its own fork of that prefill, so the methods differ only in
//! decoding; on a GPU or a tensor-parallel group each method runs the prompt through
//! the generation loop (the same dense prefill, then its own decode).

use super::haystack::Haystack;
use super::tasks::{build, context, score, Sample, Task};
use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput, SeqKvCache};
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::TierSize;
use crate::cuda::CudaModel;
use crate::engine::backend::StepBackend;
use crate::engine::backend_tp::TpBackend;
use crate::engine::generate::{
    generate_cuda, generate_group, GenerateOptions, GenerateRequest, GenerateStats, Generation,
};
use crate::engine::sampling::{argmax, SamplingParams};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::config::ModelConfig;
use crate::model::tokenizer::TextTokenizer;
use crate::pool::ValuePool;
use crate::shadow::{shadow_stats, Attention, ShadowSeq};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

/// The model the samples run on.
pub enum EvalModel<'a> {
    /// The CPU reference.
    Cpu(&'a CpuModel),
    /// A GPU: its value-fetch path for ShadowKV, and whether full-attention decode steps
    /// replay CUDA graphs.
    Cuda {
        /// The model on the GPU.
        model: &'a CudaModel,
        /// How ShadowKV fetches the missed values.
        fetch: FetchPath,
        /// ShadowKV's GPU value tier.
        tier: TierSize,
        /// Capture full-attention decode steps as CUDA graphs.
        graphs: bool,
    },
    /// A tensor-parallel group, loaded once and configured anew for each sample and
    /// method; the settings as [`EvalModel::Cuda`]'s.
    Group {
        /// The loaded group.
        group: &'a mut TpBackend,
        /// How ShadowKV fetches the missed values.
        fetch: FetchPath,
        /// ShadowKV's GPU value tier.
        tier: TierSize,
        /// Capture full-attention decode steps as CUDA graphs.
        graphs: bool,
    },
}

impl EvalModel<'_> {
    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        match self {
            EvalModel::Cpu(m) => m.config(),
            EvalModel::Cuda { model, .. } => model.config(),
            EvalModel::Group { group, .. } => group.config(),
        }
    }
}

/// A named attention method to evaluate; ShadowKV settings may depend on the length.
pub struct MethodSpec {
    /// Label in tables and JSON.
    pub label: String,
    /// The attention mode for a prompt of the given length.
    pub attention: Box<dyn Fn(usize) -> Result<Attention>>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RulerPlan {
    /// Task families.
    pub tasks: Vec<Task>,
    /// Prompt lengths in tokens (generation included).
    pub lengths: Vec<usize>,
    /// Samples per task, length and haystack; needle depths are spread evenly.
    pub samples: usize,
    /// Filler kinds.
    pub haystacks: Vec<Haystack>,
    /// Seed of the generated samples.
    pub seed: u64,
    /// Prefill chunk in tokens.
    pub prefill_chunk: usize,
}

/// The outcome of one sample under one method.
#[derive(Debug, Clone, Serialize)]
pub struct SampleResult {
    /// Task name.
    pub task: &'static str,
    /// Target length.
    pub length: usize,
    /// Filler kind.
    pub haystack: Haystack,
    /// Relative depth of the (first) needle.
    pub depth: f64,
    /// Method label.
    pub method: String,
    /// Share of expected answers found, 0..=1.
    pub score: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated text.
    pub output: String,
    /// Expected strings.
    pub answers: Vec<String>,
    /// ShadowKV reuse hit rate (ShadowKV only).
    pub reuse_hit_rate: Option<f64>,
}

/// The prompt text of a sample with `filler` sentences.
fn prompt_text(s: &Sample, filler: usize, chat: Option<&ChatTemplate>) -> Result<String> {
    let user = format!("{}\n\n{}", context(s, filler), s.question);
    Ok(match chat {
        Some(t) => format!(
            "{}{}",
            t.render(&[ChatMessage::new("user", &user)], true)?,
            s.answer_prefix
        ),
        None => format!("{user}\n{}", s.answer_prefix),
    })
}

/// Encodes a sample with as much filler as fits `length` minus its generation.
fn fit(s: &Sample, length: usize, tok: &TextTokenizer, chat: Option<&ChatTemplate>) -> Result<Vec<u32>> {
    let budget = length.saturating_sub(s.max_new);
    let encode = |n: usize| -> Result<Vec<u32>> { tok.encode(&prompt_text(s, n, chat)?, chat.is_none()) };
    let (mut lo, mut hi) = (0usize, s.filler.len());
    if encode(0)?.len() > budget {
        bail!("length {length} is too short for the task's question and needles");
    }
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if encode(mid)?.len() <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    encode(lo)
}

/// Greedy decoding of every method's cache in one batch until EOS or `max_new` tokens.
fn decode_all(model: &CpuModel, caches: &mut [SeqCache], first: u32, max_new: usize) -> Result<Vec<Vec<u32>>> {
    let eos = &model.config().eos_token_ids;
    let mut outs: Vec<Vec<u32>> = vec![vec![first]; caches.len()];
    let mut live: Vec<bool> = vec![!eos.contains(&first); caches.len()];
    for _ in 1..max_new {
        let idx: Vec<usize> = (0..caches.len()).filter(|&i| live[i]).collect();
        if idx.is_empty() {
            break;
        }
        let last: Vec<[u32; 1]> = idx.iter().map(|&i| [*outs[i].last().expect("a token")]).collect();
        let mut inputs: Vec<SeqInput> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| live[*i])
            .zip(&last)
            .map(|((_, c), t)| SeqInput {
                tokens: t,
                cache: c,
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = model.forward(&mut inputs)?;
        for (&i, row) in idx.iter().zip(&logits) {
            let t = argmax(row);
            outs[i].push(t);
            if eos.contains(&t) {
                live[i] = false;
            }
        }
    }
    for o in &mut outs {
        if o.last().is_some_and(|t| eos.contains(t)) {
            o.pop();
        }
    }
    Ok(outs)
}

/// Runs the plan; returns one result per sample and method. `after_sample` sees every
/// result so far each time a sample finishes (to save partial results). Without a
/// progress bar (stderr not a terminal: a log) each finished sample prints a line.
pub fn run_ruler(
    model: &mut EvalModel,
    tok: &TextTokenizer,
    chat: Option<&ChatTemplate>,
    plan: &RulerPlan,
    methods: &[MethodSpec],
    progress: bool,
    mut after_sample: impl FnMut(&[SampleResult]) -> Result<()>,
) -> Result<Vec<SampleResult>> {
    let ctx = model.config().max_position_embeddings;
    let total = plan.tasks.len() * plan.lengths.len() * plan.samples * plan.haystacks.len();
    let bar = if progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template("eval {bar:30} {pos}/{len} {msg} eta {eta}").expect("static template"));
    let mut results = Vec::new();
    for &length in &plan.lengths {
        if length > ctx {
            bail!("length {length} exceeds the model's context of {ctx}");
        }
        for &task in &plan.tasks {
            for &hay in &plan.haystacks {
                for i in 0..plan.samples {
                    bar.set_message(format!("{} {length} {}", task.name(), hay.name()));
                    let depth = if plan.samples > 1 {
                        i as f64 / (plan.samples - 1) as f64
                    } else {
                        0.5
                    };
                    let seed = plan.seed ^ (length as u64) << 20 ^ (i as u64) << 8 ^ task as u64 ^ (hay as u64) << 4;
                    let mut rng = StdRng::seed_from_u64(seed);
                    let sample = build(task, hay, length / 4, depth, &mut rng);
                    let ids = fit(&sample, length, tok, chat)?;
                    let before = results.len();
                    results.extend(
                        run_sample(model, tok, &ids, &sample, methods, plan.prefill_chunk)?
                            .into_iter()
                            .map(|(method, output, reuse)| SampleResult {
                                task: task.name(),
                                length,
                                haystack: hay,
                                depth,
                                score: score(&output, &sample.answers),
                                method,
                                prompt_tokens: ids.len(),
                                output,
                                answers: sample.answers.clone(),
                                reuse_hit_rate: reuse,
                            }),
                    );
                    after_sample(&results)?;
                    bar.inc(1);
                    if !progress {
                        let scores: Vec<String> = results[before..]
                            .iter()
                            .map(|r| format!("{} {:.2}", r.method, r.score))
                            .collect();
                        eprintln!(
                            "sample {}/{total}: {} {length} {} depth {depth:.2}: {}",
                            bar.position(),
                            task.name(),
                            hay.name(),
                            scores.join(", ")
                        );
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(results)
}

/// Runs one prompt with every method: (label, text, hit rate).
fn run_sample(
    model: &mut EvalModel,
    tok: &TextTokenizer,
    ids: &[u32],
    sample: &Sample,
    methods: &[MethodSpec],
    prefill_chunk: usize,
) -> Result<Vec<(String, String, Option<f64>)>> {
    match model {
        EvalModel::Cpu(m) => run_sample_cpu(m, tok, ids, sample, methods, prefill_chunk),
        EvalModel::Cuda {
            model,
            fetch,
            tier,
            graphs,
        } => run_sample_gpu(ids, sample, methods, prefill_chunk, *fetch, *tier, |reqs, opts| {
            generate_cuda(model, tok, reqs, opts, *graphs)
        }),
        EvalModel::Group {
            group,
            fetch,
            tier,
            graphs,
        } => run_sample_gpu(ids, sample, methods, prefill_chunk, *fetch, *tier, |reqs, opts| {
            generate_group(group, tok, reqs, opts, *graphs)
        }),
    }
}

/// Runs one prompt (`ids`, `sample`) with every method through `generate`, the
/// generation loop on one GPU or a group, fetching ShadowKV's values as `fetch` and
/// `tier` say.
fn run_sample_gpu(
    ids: &[u32],
    sample: &Sample,
    methods: &[MethodSpec],
    prefill_chunk: usize,
    fetch: FetchPath,
    tier: TierSize,
    mut generate: impl FnMut(&[GenerateRequest], GenerateOptions) -> Result<(Vec<Generation>, GenerateStats)>,
) -> Result<Vec<(String, String, Option<f64>)>> {
    let context = ids.len() + sample.max_new;
    let req = GenerateRequest {
        prompt: ids.to_vec(),
        max_tokens: sample.max_new,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
    };
    methods
        .iter()
        .map(|m| {
            let opts = GenerateOptions {
                prefill_chunk,
                progress: false,
                attention: (m.attention)(context)?,
                value_fetch: fetch,
                gpu_tier: tier,
                ..Default::default()
            };
            let (mut gens, stats) = generate(std::slice::from_ref(&req), opts)?;
            let g = gens.pop().context("no generation")?;
            Ok((m.label.clone(), g.text, stats.shadow.and_then(|s| s.hit_rate())))
        })
        .collect()
}

/// Prefills one prompt on the CPU and decodes it with every method from a fork of the
/// prefill.
fn run_sample_cpu(
    model: &CpuModel,
    tok: &TextTokenizer,
    ids: &[u32],
    sample: &Sample,
    methods: &[MethodSpec],
    prefill_chunk: usize,
) -> Result<Vec<(String, String, Option<f64>)>> {
    let cfg = model.config();
    let mut dense = SeqCache::Dense(SeqKvCache::with_pre_rope(cfg));
    let logits = model.prefill(&mut dense, ids, prefill_chunk, |_| {})?;
    let SeqCache::Dense(prefilled) = &dense else {
        unreachable!("built dense")
    };
    let context = ids.len() + sample.max_new;
    let mut caches = Vec::with_capacity(methods.len());
    for m in methods {
        caches.push(match (m.attention)(context)? {
            Attention::Full => SeqCache::Dense(prefilled.clone()),
            Attention::ShadowKv(p) => {
                let pool = ValuePool::anonymous(p.pool_shape(cfg, 1, context))?;
                ShadowSeq::from_prefill(cfg, p, prefilled, &pool)?.into()
            }
        });
    }
    let outs = decode_all(model, &mut caches, argmax(&logits), sample.max_new)?;
    let mut res = Vec::new();
    for ((m, o), c) in methods.iter().zip(outs).zip(&caches) {
        res.push((
            m.label.clone(),
            tok.decode(&o, true)?,
            shadow_stats(c).and_then(|s| s.hit_rate()),
        ));
    }
    Ok(res)
}

/// Mean ShadowKV reuse hit rate per (length, method), `None` for methods without one.
pub fn hit_rates(results: &[SampleResult], plan: &RulerPlan, methods: &[MethodSpec]) -> Vec<(usize, Vec<Option<f64>>)> {
    let mean = |length: usize, m: &str| -> Option<f64> {
        let xs: Vec<f64> = results
            .iter()
            .filter(|r| r.length == length && r.method == m)
            .filter_map(|r| r.reuse_hit_rate)
            .collect();
        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    plan.lengths
        .iter()
        .map(|&l| (l, methods.iter().map(|m| mean(l, &m.label)).collect()))
        .collect()
}

/// Mean score ×100 per (task, length, method), in plan order, plus per-length averages.
pub fn summary(results: &[SampleResult], plan: &RulerPlan, methods: &[MethodSpec]) -> Vec<(String, usize, Vec<f64>)> {
    let mean = |f: &dyn Fn(&SampleResult) -> bool, m: &str| -> f64 {
        let xs: Vec<f64> = results
            .iter()
            .filter(|r| r.method == m && f(r))
            .map(|r| r.score)
            .collect();
        100.0 * xs.iter().sum::<f64>() / xs.len().max(1) as f64
    };
    let mut rows = Vec::new();
    for &length in &plan.lengths {
        for &task in &plan.tasks {
            let f = |r: &SampleResult| r.length == length && r.task == task.name();
            rows.push((
                task.name().to_string(),
                length,
                methods.iter().map(|m| mean(&f, &m.label)).collect(),
            ));
        }
        let f = |r: &SampleResult| r.length == length;
        rows.push((
            "average".to_string(),
            length,
            methods.iter().map(|m| mean(&f, &m.label)).collect(),
        ));
    }
    rows
}
