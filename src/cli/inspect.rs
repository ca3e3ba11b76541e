//! `shadowkv inspect`: what a model is and what running it costs in memory.

use super::model_spec::{open_spec, MODEL_HELP};
use super::shadow_args::ShadowArgs;
use crate::cuda::shadow::seq::sequence_bytes;
use crate::cuda::shadow::ShadowLayout;
use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `shadowkv inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Context length for the memory estimate (default: the model's maximum).
    #[arg(long)]
    context: Option<usize>,
    /// Sequences for the memory estimate.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    shadow: ShadowArgs,
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Runs `shadowkv inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    let m = open_spec(&a.model)?;
    let c = &m.config;
    let ctx = a.context.unwrap_or(c.max_position_embeddings);
    if ctx == 0 || a.batch == 0 {
        bail!("--context and --batch must be at least 1");
    }
    if ctx > c.max_position_embeddings {
        eprintln!(
            "warning: --context {ctx} exceeds the model's context of {} tokens; the figures are for {ctx} all the same",
            c.max_position_embeddings
        );
    }
    let params = c.parameter_count() as u64;
    let kv_bf16 = c.kv_bytes_per_token(2) as u64;
    let kv_f32 = c.kv_bytes_per_token(4) as u64;
    let tokens = (ctx as u64).saturating_mul(a.batch as u64);
    let kv_total_bf16 = kv_bf16.saturating_mul(tokens);
    let kv_total_f32 = kv_f32.saturating_mul(tokens);
    // ShadowKV on the GPU: its state per sequence on the GPU, its values in host memory.
    // A model the GPU's ShadowKV kernels do not take (a head size they are not built
    // for) is still described, with the reason in place of the figures.
    let p = a.shadow.params(c, ctx)?;
    let shadow = ShadowLayout::new(c, &p, ctx)
        .and_then(|l| sequence_bytes(&l, c.num_layers))
        .map(|(g, h)| (g as u64, h as u64))
        .map_err(|e| format!("{e:#}"));
    let batch = a.batch as u64;
    if a.json {
        let dtypes: serde_json::Map<String, serde_json::Value> = m
            .dtypes
            .iter()
            .map(|(k, (n, b))| (k.clone(), serde_json::json!({"tensors": n, "bytes": b})))
            .collect();
        let out = serde_json::json!({
            "model": a.model, "format": m.format, "architecture": c.arch.name(),
            "parameters": params, "layers": c.num_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_context": c.max_position_embeddings,
            "rope_theta": c.rope_theta, "llama3_rope_scaling": c.rope_scaling.is_some(),
            "tied_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
            "chat_template": m.chat_template.is_some(), "dtypes": dtypes,
            "kv_bytes_per_token_bf16": kv_bf16, "kv_bytes_per_token_f32": kv_f32,
            "context": ctx, "batch": a.batch,
            "memory_bytes": {"weights_bf16": params * 2, "weights_f32": params * 4,
                "kv_bf16": kv_total_bf16, "kv_f32": kv_total_f32,
                "shadowkv_gpu": shadow.as_ref().ok().map(|s| s.0 * batch),
                "shadowkv_host": shadow.as_ref().ok().map(|s| s.1 * batch)},
            "shadowkv": {"budget": p.budget, "rank": p.rank, "chunk_size": p.chunk_size,
                "outlier_chunks": p.outlier_chunks, "local_chunks": p.local_chunks,
                "gpu_bytes_per_sequence": shadow.as_ref().ok().map(|s| s.0),
                "host_bytes_per_sequence": shadow.as_ref().ok().map(|s| s.1),
                "gpu_unsupported": shadow.as_ref().err()},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model          {} ({})", a.model, m.format);
    println!("architecture   {}", c.arch.name());
    println!("parameters     {params} ({:.1} M)", params as f64 / 1e6);
    println!(
        "shape          {} layers, hidden {}, mlp {}, {} heads / {} kv heads of {}, vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    let scaling = if c.rope_scaling.is_some() {
        ", llama3 scaling"
    } else {
        ""
    };
    println!(
        "context        {} tokens, rope theta {}{scaling}",
        c.max_position_embeddings, c.rope_theta
    );
    println!(
        "extras         tied embeddings: {}, qkv bias: {}, chat template: {}",
        c.tie_word_embeddings,
        c.attention_bias,
        m.chat_template.is_some()
    );
    for (k, (n, b)) in &m.dtypes {
        println!("dtype          {k}: {n} tensors, {}", gib(*b));
    }
    println!("kv per token   {kv_bf16} bytes bf16, {kv_f32} bytes f32");
    println!("memory for {} × {ctx} tokens:", a.batch);
    println!(
        "  weights      {} bf16 (GPU), {} f32 (CPU)",
        gib(params * 2),
        gib(params * 4)
    );
    println!(
        "  kv cache     {} bf16 (GPU), {} f32 (CPU)",
        gib(kv_total_bf16),
        gib(kv_total_f32)
    );
    match shadow {
        Ok((gpu, host)) => println!(
            "  ShadowKV     {} on the GPU (low-rank keys, landmarks, exact chunks, slots), {} of values (8-bit) in \
             host memory (budget {}, rank {}, {} outlier chunks)",
            gib(gpu * batch),
            gib(host * batch),
            p.budget,
            p.rank,
            p.outlier_chunks
        ),
        Err(e) => println!("  ShadowKV     not estimated: {e}"),
    }
    Ok(())
}
