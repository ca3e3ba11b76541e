//! `shadowkv generate`: one prompt in, one continuation out.

use super::at_least_one;
use super::backend::{load_cuda_model, open_gpu, tp_weights, Backend, CudaArgs, Gpus};
use super::model_spec::{open_spec, MODEL_HELP};
use super::shadow_args::{Method, ShadowArgs};
use crate::cpu::CpuModel;
use crate::engine::generate::{generate, generate_cuda, generate_parallel, GenerateOptions, GenerateRequest};
use crate::engine::sampling::SamplingParams;
use crate::model::chat::ChatMessage;
use crate::model::weights::ModelWeights;
use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `shadowkv generate`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "prompt_file"])))]
pub struct GenerateArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Prompt text.
    #[arg(long)]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Treat the prompt as a user message and render it through the chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (the template's default when absent).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = temperature)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = top_p)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Prompt tokens per prefill pass (at least 1).
    #[arg(long, default_value_t = 512, value_parser = at_least_one)]
    prefill_chunk: usize,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
    /// Attention method.
    #[arg(long, value_enum, default_value_t = Method::Full)]
    attention: Method,
    #[command(flatten)]
    shadow: ShadowArgs,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    #[command(flatten)]
    cuda: CudaArgs,
}

/// Runs `shadowkv generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let threads = super::set_threads(a.threads)?;
    let gpus = a.cuda.gpus()?;
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading prompt file {}", f.display()))?
        }
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    let progress = std::io::stderr().is_terminal();
    let t_load = Instant::now();
    let m = open_spec(&a.model)?;
    let prompt_text = if a.chat {
        let tmpl = m
            .chat_template
            .as_ref()
            .with_context(|| format!("{}: the model has no chat template", a.model))?;
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &text));
        tmpl.render(&msgs, true)?
    } else {
        text
    };
    // A chat template writes its own special tokens; plain prompts get the model's BOS.
    let prompt_ids = m.tokenizer.encode(&prompt_text, !a.chat)?;
    let req = GenerateRequest {
        prompt: prompt_ids.clone(),
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop: a.stop.clone(),
    };
    let context = (prompt_ids.len() + a.max_tokens).min(m.config.max_position_embeddings);
    a.shadow.refuse_unused(&[a.attention])?;
    let attention = a.shadow.attention(a.attention, &m.config, context)?;
    let opts = GenerateOptions {
        attention,
        prefill_chunk: a.prefill_chunk,
        progress,
        value_fetch: a.cuda.one_fetch()?,
        gpu_tier: a.cuda.one_tier()?,
        ..Default::default()
    };
    let (load_secs, (mut gens, stats)) = match a.backend {
        Backend::Cpu => {
            a.cuda.refuse_gpu_settings_on_cpu()?;
            let weights = ModelWeights::load(&m.config, m.source.as_ref(), progress)?;
            let model = CpuModel::new(m.config.clone(), weights);
            let load_secs = t_load.elapsed().as_secs_f64();
            (load_secs, generate(&model, &m.tokenizer, &[req], opts)?)
        }
        Backend::Cuda => {
            let graphs = !a.cuda.no_graph;
            match gpus {
                Gpus::One(d) => {
                    let model = load_cuda_model(open_gpu(d)?, &a.model, &m, progress)?;
                    let load_secs = t_load.elapsed().as_secs_f64();
                    (load_secs, generate_cuda(&model, &m.tokenizer, &[req], opts, graphs)?)
                }
                Gpus::Group(devices) => {
                    // The group loads its weights as it starts: the load is in the total.
                    let weights = tp_weights(&a.model, &m)?;
                    let out = generate_parallel(&m.config, weights, &devices, &m.tokenizer, &[req], opts, graphs)?;
                    (t_load.elapsed().as_secs_f64(), out)
                }
            }
        }
    };
    let g = gens.pop().context("no generation")?;
    let per_s = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    if a.json {
        let out = serde_json::json!({
            "model": a.model,
            "prompt_ids": prompt_ids,
            "completion_ids": g.completion_ids,
            "text": g.text,
            "finish_reason": g.finish.as_str(),
            "prompt_tokens": stats.prefill_tokens,
            "completion_tokens": g.completion_ids.len(),
            "load_secs": load_secs,
            "prefill_secs": stats.prefill_secs,
            "decode_secs": stats.decode_secs,
            "prefill_tokens_per_s": per_s(stats.prefill_tokens, stats.prefill_secs),
            "decode_tokens_per_s": per_s(stats.decode_tokens, stats.decode_secs),
            "threads": threads,
            "attention": a.attention.label(),
            "backend": format!("{:?}", a.backend).to_lowercase(),
            "reuse_hit_rate": stats.shadow.and_then(|s| s.hit_rate()),
            "value_bytes_fetched": stats.shadow.map(|s| s.value_bytes_fetched),
        });
        println!("{out}");
    } else {
        println!("{}", g.text);
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, finish: {}]",
            stats.prefill_tokens,
            per_s(stats.prefill_tokens, stats.prefill_secs),
            g.completion_ids.len(),
            per_s(stats.decode_tokens, stats.decode_secs),
            g.finish.as_str()
        );
    }
    Ok(())
}

/// Parses `--temperature`: a finite number >= 0 (a clap value parser).
fn temperature(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(_) => Err("must be a finite number >= 0 (0 is greedy)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `--top-p`: a probability mass in (0, 1] (a clap value parser).
fn top_p(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        Ok(_) => Err("must be in (0, 1]".into()),
        Err(e) => Err(e.to_string()),
    }
}
