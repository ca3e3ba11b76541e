//! `shadowkv bench --backend cuda`: prefill speed and full-attention decode throughput
//! on the GPU against the HBM bound, optionally beside the PyTorch peer
//! (tools/peers/torch_decode.py) run in the same invocation.
//!
//! Per context: one sequence is prefilled (timed: seconds and TFLOP/s), its cache is
//! copied into the other sequences of the batch (decode cost does not depend on the
//! values), then `gen` decode steps run with the tokens sampled greedily on the GPU.
//! Decode tokens/s is batch × steps / decode time, as the paper measures it; the HBM
//! bytes of a step are the weights plus the keys and values read and written.

use super::backend::{load_cuda_model, open_gpu, Gpus};
use super::bench_cuda_args::CudaBench;
use super::bench_report::{median, table_line, HBM_BYTES_PER_S};
use super::model_spec::open_spec;
use crate::cpu::model::chunked_prefill;
use crate::cpu::LogitsWanted;
use crate::cuda::{CudaModel, GpuCache, GpuSeq, StepGraphs};
use crate::engine::sampling::SamplingParams;
use crate::model::config::ModelConfig;
use crate::model::load::synthetic_spec;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// The prefill progress bar (hidden off a terminal).
fn prefill_bar(progress: bool, ctx: usize) -> ProgressBar {
    let bar = if progress {
        ProgressBar::new(ctx as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens eta {eta}").expect("static template"),
    );
    bar
}

/// FLOPs of prefilling `n` tokens in one sequence: the matrix products (2 per weight
/// per token, embedding excluded) and causal attention (q·k and p·v over the
/// n(n+1)/2 causal pairs per head and layer).
fn prefill_flops(cfg: &ModelConfig, n: usize) -> (f64, f64) {
    let (h, d) = (cfg.hidden_size as f64, cfg.head_dim as f64);
    let qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) as f64 * d;
    let per_layer = h * qkv + cfg.num_heads as f64 * d * h + 3.0 * h * cfg.intermediate_size as f64;
    let linear = 2.0 * n as f64 * (cfg.num_layers as f64 * per_layer + h * cfg.vocab_size as f64 / n as f64);
    let pairs = n as f64 * (n as f64 + 1.0) / 2.0;
    let attn = 4.0 * d * cfg.num_heads as f64 * pairs * cfg.num_layers as f64;
    (linear, attn)
}

/// HBM bytes of one decode step: every weight once, and per sequence the keys and
/// values of all its tokens read plus the new token's written.
fn step_bytes(model: &CudaModel, lens: &[usize]) -> f64 {
    let cfg = model.config();
    let per_token = (cfg.num_layers * 2 * model.kv_width() * 2) as f64;
    model.weight_bytes() as f64 + lens.iter().map(|&l| (l + 1) as f64 * per_token).sum::<f64>()
}

/// Runs the CUDA benchmark.
pub fn run(a: CudaBench) -> Result<()> {
    let ordinal = match a.cuda.gpus()? {
        Gpus::One(d) => d,
        Gpus::Group(devices) => return super::bench_group::run(&a, &devices),
    };
    let progress = std::io::stderr().is_terminal();
    let m = open_spec(&a.model)?;
    let cfg = m.config.clone();
    a.check_shadow(&cfg)?;
    let t_load = Instant::now();
    let model = load_cuda_model(open_gpu(ordinal)?, &a.model, &m, progress)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let info = model.ops().device().info().clone();
    let (_, total_mem) = model.ops().device().mem_info()?;
    let tables_to_stderr = matches!(a.json, Some(None));
    table_line!(
        tables_to_stderr,
        "machine: {} ({} SMs, {:.0} GiB); model {} ({:.2} GB of bf16 weights, {load_secs:.1} s to load); {} decode steps; CUDA graphs {}",
        info.name,
        info.sm_count,
        total_mem as f64 / (1u64 << 30) as f64,
        a.model,
        model.weight_bytes() as f64 / 1e9,
        a.gen,
        if a.cuda.no_graph { "off" } else { "on" }
    );
    let mut rows = Vec::new();
    let mut trace = match &a.trace {
        Some(p) if a.shadow.is_empty() => bail!(
            "--trace {} records the GPU timeline of ShadowKV steps: add shadowkv to --attention",
            p.display()
        ),
        Some(p) => Some(super::bench_cuda_shadow::BenchTrace::create(p)?),
        None => None,
    };
    let mut shadow_rows = Vec::new();
    for &ctx in &a.contexts {
        if ctx + a.gen > cfg.max_position_embeddings {
            bail!(
                "context {ctx} + {} generated tokens exceeds the model's {}",
                a.gen,
                cfg.max_position_embeddings
            );
        }
        for p in &a.shadow_for(&cfg, ctx)? {
            for (&fetch, &tier) in a
                .cuda
                .value_fetch
                .iter()
                .flat_map(|f| a.cuda.gpu_tier.iter().map(move |t| (f, t)))
            {
                let bar = prefill_bar(progress, ctx);
                let runs = super::bench_cuda_shadow::run(
                    &model,
                    p,
                    (fetch, tier, a.value_slots, a.pool_file.as_deref()),
                    ctx,
                    a.batch,
                    a.gen,
                    (&a.micro_batches, &a.fetch_blocks, &a.lanes),
                    a.prefill_chunk,
                    bar,
                    trace.as_mut(),
                );
                if let Some(f) = &a.pool_file {
                    // The run's pool is gone: so goes its file, leaving the disk to the next.
                    let _ = std::fs::remove_file(f);
                }
                let runs = runs?;
                for mut r in runs {
                    r.row["machine"] = serde_json::json!(info.name);
                    shadow_rows.push(r);
                }
                model.ops().device().release_memory()?;
            }
        }
        if !a.full {
            continue;
        }
        let cap = ctx + a.gen;
        // Prefill one sequence.
        let mut first = model.new_cache(cap)?;
        let ids: Vec<u32> = (0..ctx)
            .map(|i| ((i * 7919 + 13) % (cfg.vocab_size - 1)) as u32)
            .collect();
        let bar = prefill_bar(progress, ctx);
        model.ops().device().synchronize()?;
        let t0 = Instant::now();
        let mut graphs = StepGraphs::new(!a.cuda.no_graph);
        let greedy = SamplingParams::default().device_row(0, 0);
        let next = chunked_prefill(
            &ids,
            a.prefill_chunk,
            |n| bar.inc(n as u64),
            |part, logits| {
                let mut one = [GpuSeq {
                    tokens: part,
                    cache: &mut first,
                    logits,
                }];
                model.step(&mut one, &[greedy], &mut graphs)
            },
        )?;
        bar.finish_and_clear();
        let prefill_secs = t0.elapsed().as_secs_f64();
        let (lin, att) = prefill_flops(&cfg, ctx);
        let tflops = (lin + att) / prefill_secs / 1e12;
        // Fill the batch.
        let (free, _) = model.ops().device().mem_info()?;
        let fit = free.saturating_sub(2 << 30) / model.cache_bytes(cap);
        let batch = match a.batch {
            Some(b) => b,
            None => 1 + fit,
        };
        if batch > 1 + fit {
            bail!(
                "a batch of {batch} at context {ctx} does not fit: {} more caches of {:.2} GiB in {:.2} GiB free",
                batch - 1,
                model.cache_bytes(cap) as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            );
        }
        let mut caches: Vec<GpuCache> = vec![first];
        for _ in 1..batch {
            let mut c = model.new_cache(cap)?;
            c.copy_from(&model, &caches[0])?;
            caches.push(c);
        }
        let mut last: Vec<u32> = vec![next[0]; batch];
        let greedy_rows = vec![greedy; batch];
        let mut steps = Vec::with_capacity(a.gen);
        let mut bytes = 0.0;
        let mut min_free = usize::MAX;
        model.ops().device().synchronize()?;
        let td = Instant::now();
        for _ in 0..a.gen {
            let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
            bytes += step_bytes(&model, &lens);
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let mut inputs: Vec<GpuSeq> = caches
                .iter_mut()
                .zip(&toks)
                .map(|(c, t)| GpuSeq {
                    tokens: t,
                    cache: c,
                    logits: LogitsWanted::Last,
                })
                .collect();
            let ts = Instant::now();
            last = model.step(&mut inputs, &greedy_rows, &mut graphs)?;
            steps.push(ts.elapsed().as_secs_f64());
            if steps.len() == 2 {
                min_free = min_free.min(model.ops().device().mem_info()?.0);
            }
        }
        let decode_secs = td.elapsed().as_secs_f64();
        let tps = (batch * a.gen) as f64 / decode_secs;
        let step_ms = 1e3 * median(&mut steps);
        let gb_step = bytes / a.gen as f64 / 1e9;
        let bound_ratio = (step_ms / 1e3) / (gb_step * 1e9 / HBM_BYTES_PER_S);
        let peak_gib = (total_mem - min_free.min(total_mem)) as f64 / (1u64 << 30) as f64;
        drop(caches);
        model.ops().device().release_memory()?;
        eprintln!(
            "[context {ctx}: batch {batch}, prefill {prefill_secs:.2} s ({tflops:.0} TFLOP/s), decode {tps:.1} tok/s, \
             step {step_ms:.2} ms = {bound_ratio:.3}× the HBM bound; {} graph captures ({} failed), {} replays, {} eager steps]",
            graphs.captures, graphs.failed, graphs.replays, graphs.eager
        );
        rows.push(serde_json::json!({
            "context": ctx, "batch": batch, "generated": a.gen, "prefill_secs": prefill_secs,
            "prefill_tflops": tflops, "prefill_linear_flops": lin, "prefill_attention_flops": att,
            "decode_tokens_per_s": tps, "step_ms_median": step_ms, "hbm_bytes_per_step": gb_step * 1e9,
            "hbm_bound_ratio": bound_ratio, "peak_gpu_gib": peak_gib, "graphs": !a.cuda.no_graph,
            "graph_captures": graphs.captures, "graph_failures": graphs.failed, "graph_replays": graphs.replays,
        }));
        // ShadowKV at its largest batch against full attention at its own.
        for r in shadow_rows.iter_mut().filter(|r| r.row["context"] == ctx) {
            r.row["ratio_to_full"] = serde_json::json!(r.tokens_per_s / tps);
        }
    }
    let weight_bytes = model.weight_bytes();
    // The peer gets the whole GPU: free ours first.
    model.ops().device().release_memory()?;
    drop(model);
    if a.peer_torch {
        for r in rows.iter_mut() {
            let (ctx, batch) = (r["context"].as_u64().unwrap_or(0), r["batch"].as_u64().unwrap_or(0));
            let peer = run_torch_peer(&a.model, ctx as usize, batch as usize, a.gen)?;
            let ratio = peer["tokens_per_s"]
                .as_f64()
                .map(|t| r["decode_tokens_per_s"].as_f64().unwrap_or(0.0) / t);
            r["peer"] = peer;
            r["ratio_to_peer"] = serde_json::json!(ratio);
        }
    }
    table_line!(tables_to_stderr, "| context | batch | prefill s | prefill TFLOP/s | decode tok/s | step ms (median) | HBM GB/step | × HBM bound | peak GiB | peer tok/s | peer step ms | peer × bound | vs peer |");
    table_line!(
        tables_to_stderr,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let p = |k: &str| r["peer"][k].as_f64().map_or("-".to_string(), |v| format!("{v:.2}"));
        table_line!(
            tables_to_stderr,
            "| {} | {} | {:.2} | {:.0} | {:.1} | {:.2} | {:.2} | {:.3} | {:.1} | {} | {} | {} | {} |",
            r["context"],
            r["batch"],
            f("prefill_secs"),
            f("prefill_tflops"),
            f("decode_tokens_per_s"),
            f("step_ms_median"),
            f("hbm_bytes_per_step") / 1e9,
            f("hbm_bound_ratio"),
            f("peak_gpu_gib"),
            p("tokens_per_s"),
            p("step_ms_median"),
            p("hbm_bound_ratio"),
            r["ratio_to_peer"]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{v:.2}×")),
        );
    }
    if !shadow_rows.is_empty() {
        table_line!(tables_to_stderr);
        table_line!(tables_to_stderr, "| context | fetch | GPU tier (chunks/head) | micro-batches | lanes | fetch blocks | ShadowKV batch (host+GPU slots) | decode tok/s | vs full | step ms (median) | bound ms | × bound | floor ms (one micro-batch) | × floor | reuse hit | tier hit | value MiB/step | prefill s | compression / prefill | peak GiB | host pool GiB | fetch hidden |");
        table_line!(
            tables_to_stderr,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &shadow_rows {
            let r = &r.row;
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            table_line!(
                tables_to_stderr,
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.1} | {:.2} | {:.1} % | {:.1} | {:.1} | {} |",
                r["context"],
                r["value_fetch"].as_str().unwrap_or("-"),
                r["gpu_tier_chunks"],
                r["micro_batches"],
                r["lanes"],
                r["fetch_blocks"],
                match r["gpu_value_slots"].as_u64() {
                    Some(n) if n > 0 => format!("{} ({}+{n})", r["batch"], r["batch"].as_u64().unwrap_or(0) - n),
                    _ => r["batch"].to_string(),
                },
                f("decode_tokens_per_s"),
                r["ratio_to_full"].as_f64().map_or("-".to_string(), |v| format!("{v:.2}×")),
                f("step_ms_median"),
                f("bound_ms"),
                f("bound_ratio"),
                f("one_micro_batch_floor_ms"),
                f("floor_ratio"),
                f("reuse_hit_rate"),
                f("tier_hit_rate"),
                f("value_bytes_per_step") / (1u64 << 20) as f64,
                f("prefill_secs"),
                100.0 * f("compress_share_mean"),
                f("peak_gpu_gib"),
                f("host_pool_gib"),
                r["fetch_hidden_share"]
                    .as_f64()
                    .map_or("-".to_string(), |v| format!("{:.1} %", 100.0 * v)),
            );
        }
    }
    if let (Some(t), Some(p)) = (trace, &a.trace) {
        t.finish()?;
        eprintln!(
            "[GPU timeline of the last {} ShadowKV steps of each run written to {}: `tools/trace {}` draws it]",
            super::bench_cuda_shadow::TRACE_STEPS,
            p.display(),
            p.display()
        );
    }
    if let Some(dest) = &a.json {
        let mut all = rows;
        for r in &mut all {
            r["method"] = serde_json::json!("full");
        }
        all.extend(shadow_rows.into_iter().map(|r| r.row));
        let out = serde_json::json!({
            "machine": info.name, "backend": "cuda", "model": a.model,
            "weight_bytes": weight_bytes, "results": all,
        });
        let text = serde_json::to_string_pretty(&out)?;
        match dest {
            Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
            None => println!("{text}"),
        }
    }
    Ok(())
}

/// Runs tools/peers/torch_decode.py for the same shape and returns its JSON line.
fn run_torch_peer(spec: &str, ctx: usize, batch: usize, gen: usize) -> Result<serde_json::Value> {
    let Some((arch, _)) = synthetic_spec(spec)? else {
        bail!("--peer torch needs a synthetic:<arch> model (the peer builds the same shape)");
    };
    let script = std::env::var_os("SHADOWKV_TORCH_PEER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tools/peers/torch_decode.py"));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "running the PyTorch peer: {python} {} --arch {arch} --context {ctx} --batch {batch} --gen {gen} --json",
        script.display()
    );
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--arch", arch, "--json"])
        .args([
            "--context",
            &ctx.to_string(),
            "--batch",
            &batch.to_string(),
            "--gen",
            &gen.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("the PyTorch peer failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("the PyTorch peer printed no JSON")?;
    serde_json::from_str(line).context("parsing the PyTorch peer's JSON")
}
