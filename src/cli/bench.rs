//! `shadowkv bench`: decode throughput and step latency of full attention and ShadowKV
//! side by side, after one shared prefill per context, with the reuse hit rate and the
//! value bytes fetched per step.

use super::at_least_one;
use super::backend::{Backend, CudaArgs, ValueFetch};
use super::bench_report::{median, table_line};
use super::model_spec::{open_spec, MODEL_HELP};
use super::output::check_output_file;
use super::shadow_args::{Method, ShadowArgs};
use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput, SeqKvCache};
use crate::cuda::shadow::{ValueSlots, FETCH_BLOCKS};
use crate::engine::sampling::argmax;
use crate::model::weights::ModelWeights;
use crate::pool::ValuePool;
use crate::shadow::{shadow_stats, Attention, ShadowSeq, ShadowStats};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `shadowkv bench`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct BenchArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Context lengths in tokens (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![8192usize])]
    context: Vec<usize>,
    /// Sequences decoded together: a number, or `auto` (with --backend cuda) for the
    /// largest batch whose caches fit in GPU memory.
    #[arg(long, default_value = "1")]
    batch: String,
    /// Tokens generated per sequence (the first comes from the prefill and is not timed).
    #[arg(long, default_value_t = 32)]
    gen: usize,
    /// Methods (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Method::Full, Method::Shadowkv])]
    attention: Vec<Method>,
    #[command(flatten)]
    shadow: ShadowArgs,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write the results as JSON: to FILE, or to stdout when no file is given.
    #[arg(long, num_args = 0..=1, value_name = "FILE")]
    json: Option<Option<PathBuf>>,
    /// Where the model runs. On CUDA each row gives prefill speed, decode throughput and
    /// the ratio to its bound, for full attention and ShadowKV alike.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    #[command(flatten)]
    cuda: CudaArgs,
    /// Also run a peer of the same shape in the same invocation (with --backend cuda):
    /// `torch` runs tools/peers/torch_decode.py with the GPU host's PyTorch.
    #[arg(long, value_enum)]
    peer: Option<Peer>,
    /// Prompt tokens per prefill pass (with --backend cuda; at least 1).
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    prefill_chunk: usize,
    /// ShadowKV on the GPU: split each layer's attention into this many micro-batches
    /// (groups of sequences), so one micro-batch's values cross PCIe while the GPU
    /// selects and rebuilds keys for the others; the projections and MLP still run once
    /// for the whole batch. A list measures each on the same sequences (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize])]
    micro_batches: Vec<usize>,
    /// ShadowKV on the GPU with `--value-fetch zero-copy`: blocks the fetch kernel runs
    /// on beside the key rebuild (each reads host memory over PCIe and holds a share of
    /// an SM while it waits). A list measures each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![FETCH_BLOCKS])]
    fetch_blocks: Vec<usize>,
    /// ShadowKV on the GPU: split the batch among this many lanes that decode side by
    /// side (each its own sequences and CUDA streams, each reading the weights), so one
    /// lane's values cross PCIe while the others compute whole layers: worth it where the
    /// fetch bounds the step (values in host memory, no GPU tier). A list measures each
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize])]
    lanes: Vec<usize>,
    /// ShadowKV on the GPU: sequences whose values live in GPU memory (GPU value slots,
    /// read by the zero-copy fetch without crossing PCIe) besides those in the host
    /// pool, so that host memory no longer caps the batch. `off`; `auto`: with
    /// `--batch auto`, the host-held batch as without them plus as many sequences as the
    /// GPU memory left holds (each its ShadowKV state and values), with a number, as
    /// many of them as the GPU memory holds; or a number of sequences.
    #[arg(long, default_value_t = ValueSlots::Off)]
    gpu_value_slots: ValueSlots,
    /// ShadowKV on the GPU: write the GPU timeline of the last decode steps of each run
    /// (every stage of every layer on the compute and fetch streams, timed
    /// by GPU events and placed on the host clock) to FILE as Chrome trace JSON, for
    /// `tools/trace FILE` or Perfetto.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// ShadowKV on the GPU with `--value-fetch cpu-gather`: keep the host value pool in
    /// the file FILE (made for each run, its blocks reserved, removed after it) instead
    /// of anonymous memory: the gather threads read it through the page cache and the
    /// batch is capped by the file's disk, not by host memory (`--batch auto`).
    #[arg(long, value_name = "FILE")]
    pool_file: Option<PathBuf>,
}

/// A peer implementation to compare with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// A PyTorch decoder: SDPA with GQA, static KV cache, one CUDA graph per step.
    Torch,
}

/// The machine, for the report.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

/// Refuses `--gpu-value-slots` where it cannot run, naming the flags.
fn check_value_slots(a: &BenchArgs) -> Result<()> {
    if a.backend != Backend::Cuda {
        bail!("--gpu-value-slots needs --backend cuda (the CPU backend has no GPU memory to keep values in)");
    }
    if a.attention.iter().all(|&m| m == Method::Full) {
        bail!("--gpu-value-slots holds ShadowKV's values: add shadowkv to --attention");
    }
    if a.cuda.value_fetch.contains(&ValueFetch::CpuGather) {
        bail!(
            "--gpu-value-slots with --value-fetch cpu-gather: the gather threads read host memory only; GPU value \
             slots are read by zero-copy"
        );
    }
    if a.cuda.devices.is_some() {
        bail!("--gpu-value-slots is not measured over a tensor-parallel group (--devices): run it on one --device");
    }
    Ok(())
}

/// Runs `shadowkv bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let threads = super::set_threads(a.threads)?;
    a.cuda.gpus()?;
    let batch = match a.batch.as_str() {
        "auto" => None,
        b => Some(
            b.parse::<usize>()
                .ok()
                .filter(|&b| b > 0)
                .with_context(|| format!("--batch must be a positive number or `auto`, got `{b}`"))?,
        ),
    };
    if a.micro_batches.is_empty() || a.micro_batches.contains(&0) {
        bail!("--micro-batches takes counts of at least 1");
    }
    if a.fetch_blocks.is_empty() || a.fetch_blocks.contains(&0) {
        bail!("--fetch-blocks takes counts of at least 1");
    }
    if a.lanes.is_empty() || a.lanes.contains(&0) {
        bail!("--lanes takes counts of at least 1");
    }
    if a.gen < 2 {
        bail!("--gen must be at least 2 (the first token ends the prefill; decoding is timed from the second)");
    }
    if a.attention.is_empty() {
        bail!("--attention must name at least one method");
    }
    a.shadow.refuse_unused(&a.attention)?;
    if a.context.is_empty() || a.context.contains(&0) {
        bail!("--context takes lengths of at least 1 token");
    }
    if let Some(Some(path)) = &a.json {
        check_output_file("--json", path)?;
    }
    if a.gpu_value_slots != ValueSlots::Off {
        check_value_slots(&a)?;
    }
    if a.pool_file.is_some() && (a.backend != Backend::Cuda || a.cuda.value_fetch != [ValueFetch::CpuGather]) {
        bail!(
            "--pool-file keeps ShadowKV's host value pool in a file for --backend cuda with --value-fetch cpu-gather \
             only (the driver does not pin a file for zero-copy; the CPU backend's pool is anonymous here)"
        );
    }
    if a.backend == Backend::Cuda {
        return super::bench_cuda::run(super::bench_cuda_args::CudaBench {
            value_slots: a.gpu_value_slots,
            full: a.attention.contains(&Method::Full),
            shadow: a.attention.iter().copied().filter(|&m| m != Method::Full).collect(),
            shadow_args: a.shadow.clone(),
            model: a.model,
            contexts: a.context,
            batch,
            gen: a.gen,
            prefill_chunk: a.prefill_chunk,
            micro_batches: a.micro_batches,
            fetch_blocks: a.fetch_blocks,
            lanes: a.lanes,
            trace: a.trace,
            pool_file: a.pool_file,
            peer_torch: a.peer == Some(Peer::Torch),
            cuda: a.cuda,
            json: a.json,
        });
    }
    if a.peer.is_some() {
        bail!("--peer needs --backend cuda");
    }
    if a.micro_batches != [1] {
        bail!("--micro-batches needs --backend cuda (the CPU backend decodes its batch as one)");
    }
    if a.fetch_blocks != [FETCH_BLOCKS] {
        bail!("--fetch-blocks needs --backend cuda");
    }
    if a.lanes != [1] {
        bail!("--lanes needs --backend cuda");
    }
    if a.trace.is_some() {
        bail!("--trace needs --backend cuda (it records GPU streams)");
    }
    a.cuda.refuse_gpu_settings_on_cpu()?;
    let Some(batch) = batch else {
        bail!("--batch auto needs --backend cuda (the CPU benchmark takes a number)");
    };
    let m = open_spec(&a.model)?;
    let cfg = m.config.clone();
    if let Some(ctx) = a.context.iter().find(|&&c| c + a.gen > cfg.max_position_embeddings) {
        bail!(
            "context {ctx} + {} generated tokens exceeds the model's {}",
            a.gen,
            cfg.max_position_embeddings
        );
    }
    // Every method's settings at every context, before the model loads and prefills.
    for &ctx in &a.context {
        for &method in &a.attention {
            a.shadow.attention(method, &cfg, ctx + a.gen)?;
        }
    }
    let progress = std::io::stderr().is_terminal();
    let model = CpuModel::new(cfg.clone(), ModelWeights::load(&cfg, m.source.as_ref(), progress)?);
    let mut rows = Vec::new();
    let tables_to_stderr = matches!(a.json, Some(None));
    table_line!(
        tables_to_stderr,
        "machine: {}, {threads} threads; model {}; batch {}; {} generated tokens",
        machine(),
        a.model,
        batch,
        a.gen
    );
    table_line!(tables_to_stderr, "| context | method | decode tok/s | step ms (median) | vs full | reuse hit | value KiB/step | prefill s | compress s |");
    table_line!(tables_to_stderr, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &ctx in &a.context {
        // One shared prefill per sequence, keeping pre-RoPE keys so every method forks it.
        let bar = if progress {
            ProgressBar::new((ctx * batch) as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens eta {eta}").expect("static template"),
        );
        let t0 = Instant::now();
        let mut prefilled = Vec::new();
        let mut firsts = Vec::new();
        for s in 0..batch {
            let ids: Vec<u32> = (0..ctx)
                .map(|i| ((i * 7919 + s * 104729 + 13) % (cfg.vocab_size - 1)) as u32)
                .collect();
            let mut cache = SeqCache::Dense(SeqKvCache::with_pre_rope(&cfg));
            let logits = model.prefill(&mut cache, &ids, a.prefill_chunk, |n| bar.inc(n as u64))?;
            let SeqCache::Dense(d) = cache else {
                unreachable!("built dense")
            };
            prefilled.push(d);
            firsts.push(argmax(&logits));
        }
        bar.finish_and_clear();
        let prefill_secs = t0.elapsed().as_secs_f64();
        let mut full_tps = None;
        for &method in &a.attention {
            let attention = a.shadow.attention(method, &cfg, ctx + a.gen)?;
            let tc = Instant::now();
            let pool = match attention {
                Attention::ShadowKv(p) => Some(ValuePool::anonymous(p.pool_shape(&cfg, batch, ctx + a.gen))?),
                Attention::Full => None,
            };
            let mut caches: Vec<SeqCache> = Vec::new();
            for d in &prefilled {
                caches.push(match (attention, &pool) {
                    (Attention::ShadowKv(p), Some(pool)) => ShadowSeq::from_prefill(&cfg, p, d, pool)?.into(),
                    _ => SeqCache::Dense(d.clone()),
                });
            }
            let compress_secs = tc.elapsed().as_secs_f64();
            let mut last: Vec<u32> = firsts.clone();
            let mut steps = Vec::with_capacity(a.gen - 1);
            let td = Instant::now();
            for _ in 1..a.gen {
                let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
                let mut inputs: Vec<SeqInput> = caches
                    .iter_mut()
                    .zip(&toks)
                    .map(|(c, t)| SeqInput {
                        tokens: t,
                        cache: c,
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                let ts = Instant::now();
                let logits = model.forward(&mut inputs)?;
                steps.push(ts.elapsed().as_secs_f64());
                last = logits.iter().map(|l| argmax(l)).collect();
            }
            let decode_secs = td.elapsed().as_secs_f64();
            let tps = (batch * (a.gen - 1)) as f64 / decode_secs;
            let step_ms = 1e3 * median(&mut steps);
            let mut st = ShadowStats::default();
            for c in &caches {
                if let Some(s) = shadow_stats(c) {
                    st.add(&s);
                }
            }
            let shadow = !matches!(attention, Attention::Full);
            if !shadow && full_tps.is_none() {
                full_tps = Some(tps);
            }
            let ratio = full_tps.map(|f| tps / f);
            let kib_step = st.value_bytes_fetched as f64 / 1024.0 / (a.gen - 1) as f64;
            table_line!(
                tables_to_stderr,
                "| {ctx} | {} | {tps:.2} | {step_ms:.1} | {} | {} | {} | {prefill_secs:.1} | {} |",
                method.label(),
                ratio.map(|r| format!("{r:.2}×")).unwrap_or("-".into()),
                match st.hit_rate().filter(|_| shadow) {
                    Some(r) => format!("{:.1} %", 100.0 * r),
                    None => "-".into(),
                },
                if shadow { format!("{kib_step:.0}") } else { "-".into() },
                if shadow {
                    format!("{compress_secs:.2}")
                } else {
                    "-".into()
                },
            );
            rows.push(serde_json::json!({
                "context": ctx, "method": method.label(), "settings": attention.settings_json(),
                "batch": batch, "generated": a.gen, "decode_tokens_per_s": tps, "step_ms_median": step_ms,
                "ratio_to_full": ratio, "reuse_hit_rate": st.hit_rate().filter(|_| shadow),
                "value_bytes_fetched_per_step": shadow.then_some(kib_step * 1024.0),
                "prefill_secs": prefill_secs, "compress_secs": shadow.then_some(compress_secs),
            }));
        }
    }
    if let Some(dest) = &a.json {
        let out = serde_json::json!({"machine": machine(), "backend": "cpu", "threads": threads, "model": a.model,
            "results": rows});
        let text = serde_json::to_string_pretty(&out)?;
        match dest {
            Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
            None => println!("{text}"),
        }
    }
    Ok(())
}
