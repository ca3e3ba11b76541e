//! `shadowkv bench --backend cuda --devices 0,1`: decode over a tensor-parallel group
//! against one GPU in the same run, through the engine the daemon runs
//! ([`StepBackend`]: steps queued two deep, tokens sampled on the GPU).
//!
//! Full attention (`--attention full`), per context and per engine (one GPU where the
//! weights and one cache of the longest context fit it, then the group): one sequence is
//! prefilled (timed), its cache is copied into the rest of the batch (the largest that
//! fits every device, or `--batch`), `gen` decode steps run over the batch, then `gen`
//! over the first sequence alone (the latency of one sequence). The group also times
//! NCCL's all-reduce at the size of one of its decode step's all-reduces (two a layer and
//! one for the embedding), at one sequence's size and at 256 MiB, for the bus bandwidth
//! of the host's link, in the same run.
//!
//! ShadowKV (`--attention shadowkv`), per context, over the group only, at its own
//! largest batch (every device's ShadowKV state and a dense prefill in its free memory,
//! every device's values in the host's): one sequence is prefilled but for its last
//! token, its dense cache is copied and each copy compressed by its last token's step
//! (one at a time: a dense copy of a long prompt is large), then the batch decodes `gen`
//! steps. Its tokens/s is compared with the group's full attention at the same context
//! when both ran. Each stage prints a line (stderr) as it ends.

use super::bench_cuda_args::CudaBench;
use super::bench_report::median;
use super::model_spec::open_spec;
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::layout::ShadowLayout;
use crate::cuda::shadow::seq::sequence_bytes;
use crate::cuda::shadow::{TierSize, FETCH_BLOCKS};
use crate::engine::backend::{SeqSpec, StepBackend, StepInput, StepSeq};
use crate::engine::backend_cuda::CudaBackend;
use crate::engine::backend_tp::{TpBackend, TpOptions, TpServing};
use crate::engine::generate::gpu_value_pool;
use crate::engine::sampling::SamplingParams;
use crate::model::config::ModelConfig;
use crate::model::load::OpenedModel;
use crate::model::shard::ShardPlan;
use crate::pool::space::MachineMemory;
use crate::shadow::ShadowParams;
use anyhow::{bail, Context, Result};
use std::io::IsTerminal;
use std::time::Instant;

/// Bytes of the all-reduce that measures the link's bus bandwidth.
const BUS_BYTES: usize = 256 << 20;

/// What the benchmark needs of an engine beyond [`StepBackend`].
trait Engine: StepBackend {
    /// A copy of a prefilled sequence.
    fn fork(&mut self, s: &Self::Seq) -> Result<Self::Seq>;
    /// Free and total memory of each device.
    fn memory(&self) -> Result<Vec<(usize, usize)>>;
    /// One device's bytes of a dense cache of `tokens` tokens.
    fn cache_bytes(&self, tokens: usize) -> usize;
}

impl Engine for CudaBackend {
    fn fork(&mut self, s: &Self::Seq) -> Result<Self::Seq> {
        self.fork_seq(s)
    }
    fn memory(&self) -> Result<Vec<(usize, usize)>> {
        Ok(vec![self.model().ops().device().mem_info()?])
    }
    fn cache_bytes(&self, tokens: usize) -> usize {
        self.model().cache_bytes(tokens)
    }
}

impl Engine for TpBackend {
    fn fork(&mut self, s: &Self::Seq) -> Result<Self::Seq> {
        self.fork_seq(s)
    }
    fn memory(&self) -> Result<Vec<(usize, usize)>> {
        TpBackend::memory(self)
    }
    fn cache_bytes(&self, tokens: usize) -> usize {
        TpBackend::cache_bytes(self, tokens)
    }
}

/// One engine's measurement at one context.
struct Row {
    gpus: usize,
    context: usize,
    batch: usize,
    prefill_tps: f64,
    decode_tps: f64,
    step_ms: f64,
    one_seq_ms: f64,
}

/// Runs the group benchmark over `devices`.
pub fn run(a: &CudaBench, devices: &[usize]) -> Result<()> {
    if a.fetch_blocks != [FETCH_BLOCKS] {
        bail!("--fetch-blocks is measured on one GPU (--device), not with --devices");
    }
    if a.lanes != [1] {
        bail!("--lanes is measured on one GPU (--device), not with --devices");
    }
    let progress = std::io::stderr().is_terminal();
    let m = open_spec(&a.model)?;
    let cfg = m.config.clone();
    a.check_shadow(&cfg)?;
    let longest = a.contexts.iter().copied().max().unwrap_or(0);
    if longest + 2 * a.gen > cfg.max_position_embeddings {
        bail!(
            "context {longest} + {} generated tokens exceeds the model's {}",
            2 * a.gen,
            cfg.max_position_embeddings
        );
    }
    let cache_tokens = longest + 2 * a.gen;
    let info = crate::cuda::CudaDevice::new(devices[0])
        .map_err(|e| anyhow::anyhow!("GPU {} cannot be used: {e}", devices[0]))?
        .info()
        .clone();
    println!(
        "machine: {} × {} ({} SMs each); {:?}; model {} ({:.2} GB of bf16 weights); {} decode steps; CUDA graphs {}",
        devices.len(),
        info.name,
        info.sm_count,
        crate::cuda::nccl::Nccl::load()?,
        a.model,
        2.0 * cfg.parameter_count() as f64 / 1e9,
        a.gen,
        if a.cuda.no_graph { "off" } else { "on" }
    );
    let mut rows = Vec::new();
    // One GPU first, where the whole model fits it.
    if devices.len() > 1 && a.full {
        let dev = crate::cuda::CudaDevice::new(devices[0])
            .map_err(|e| anyhow::anyhow!("GPU {} cannot be used: {e}", devices[0]))?;
        let (free, _) = dev.mem_info()?;
        let weights = 2 * cfg.parameter_count();
        // The weights, one cache of the longest context and a margin.
        let one_cache = cache_tokens * cfg.kv_bytes_per_token(2);
        if weights + one_cache + (4 << 30) < free {
            let model = super::backend::load_cuda_model(dev, &a.model, &m, progress)?;
            let mut one = CudaBackend::new(model, cache_tokens, 1, 1, !a.cuda.no_graph, None)?;
            for &ctx in &a.contexts {
                rows.push(measure(&mut one, 1, &cfg, ctx, a)?);
            }
        } else {
            eprintln!(
                "[one GPU: {:.0} GB of weights and a cache of {cache_tokens} tokens ({:.0} GB) do not fit GPU {}'s {:.0} \
                 GB free; the group runs alone]",
                weights as f64 / 1e9,
                one_cache as f64 / 1e9,
                devices[0],
                free as f64 / 1e9
            );
            drop(dev);
        }
    }
    // The group with full attention, and NCCL's all-reduce timed over it.
    let mut reduce = Vec::new();
    let mut bus = None;
    if a.full {
        bus = Some(full_group(
            a,
            devices,
            &m,
            cache_tokens,
            progress,
            &mut rows,
            &mut reduce,
        )?);
    }
    let n = devices.len() as f64;
    // NCCL's bus bandwidth: what crosses each link, 2(n − 1)/n of the buffer (none for
    // a group of one).
    let bus_gbs = |bytes: usize, secs: f64| match devices.len() {
        1 => "-".to_string(),
        _ => format!("{:.1}", 2.0 * (n - 1.0) / n * bytes as f64 / secs / 1e9),
    };
    let mut shadow_rows = Vec::new();
    for &ctx in &a.contexts {
        for p in a.shadow_for(&cfg, ctx)? {
            shadow_rows.push(measure_shadow(a, devices, &m, &p, ctx, progress)?);
        }
    }
    if !rows.is_empty() {
        println!(
            "| GPUs | context | batch | prefill tok/s | decode tok/s | step ms (median) | vs 1 GPU | one sequence \
             ms/token | vs 1 GPU |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.gpus == 1 && b.context == r.context && r.gpus > 1);
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}×"));
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.2} | {} | {:.2} | {} |",
            r.gpus,
            r.context,
            r.batch,
            r.prefill_tps,
            r.decode_tps,
            r.step_ms,
            ratio(base.map(|b| r.decode_tps / b.decode_tps)),
            r.one_seq_ms,
            ratio(base.map(|b| b.one_seq_ms / r.one_seq_ms)),
        );
    }
    if !shadow_rows.is_empty() {
        println!();
        println!("| GPUs | context | ShadowKV batch | decode tok/s | step ms (median) | vs full (group) |");
        println!("|---:|---:|---:|---:|---:|---:|");
        for r in &shadow_rows {
            let full = rows.iter().find(|f| f.gpus == r.gpus && f.context == r.context);
            println!(
                "| {} | {} | {} | {:.1} | {:.2} | {} |",
                r.gpus,
                r.context,
                r.batch,
                r.decode_tps,
                r.step_ms,
                full.map_or("-".to_string(), |f| format!("{:.2}×", r.decode_tps / f.decode_tps))
            );
        }
    }
    let Some(bus) = bus else { return Ok(()) };
    println!();
    println!(
        "NCCL all-reduce on this host: {} MiB in {:.3} ms, bus bandwidth {} GB/s",
        BUS_BYTES >> 20,
        bus * 1e3,
        bus_gbs(BUS_BYTES, bus)
    );
    println!("| step | all-reduce bytes | µs each (median) | per step | ms per step | bus GB/s at that size |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (step, bytes, secs, count) in reduce {
        println!(
            "| {step} | {bytes} | {:.1} | {count} | {:.2} | {} |",
            secs * 1e6,
            secs * count as f64 * 1e3,
            bus_gbs(bytes, secs)
        );
    }
    Ok(())
}

/// The model of `a` over `devices`, loaded and serving with `serving`.
fn new_group(
    a: &CudaBench,
    devices: &[usize],
    m: &OpenedModel,
    serving: TpServing<'_>,
    progress: bool,
) -> Result<TpBackend> {
    TpBackend::new(
        &m.config,
        super::backend::tp_weights(&a.model, m)?,
        TpOptions {
            devices: devices.to_vec(),
            serving,
            progress,
        },
    )
}

/// The group with full attention at every context (rows into `rows`; the decode step's
/// all-reduce timed at each, and one sequence's, into `reduce`); returns the seconds of
/// one all-reduce of [`BUS_BYTES`].
fn full_group(
    a: &CudaBench,
    devices: &[usize],
    m: &OpenedModel,
    cache_tokens: usize,
    progress: bool,
    rows: &mut Vec<Row>,
    reduce: &mut Vec<(String, usize, f64, usize)>,
) -> Result<f64> {
    let cfg = &m.config;
    let t0 = Instant::now();
    let mut group = new_group(
        a,
        devices,
        m,
        TpServing::full_attention(cache_tokens, 1, !a.cuda.no_graph),
        progress,
    )?;
    let load_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "[the group with full attention: {:.2} GB of bf16 weights over {} GPUs, {load_secs:.1} s to load]",
        group.weight_bytes() as f64 / 1e9,
        devices.len()
    );
    for &ctx in &a.contexts {
        let r = measure(&mut group, devices.len(), cfg, ctx, a)?;
        // The decode step's all-reduces: rows × hidden bf16 values each.
        let step_bytes = r.batch * cfg.hidden_size * 2;
        let per = group.time_all_reduce(step_bytes, 50)?;
        eprintln!(
            "[context {ctx}: NCCL all-reduce of {step_bytes} bytes {:.1} µs, {} a step: {:.2} ms of the {:.2} ms step]",
            per * 1e6,
            2 * cfg.num_layers + 1,
            per * (2 * cfg.num_layers + 1) as f64 * 1e3,
            r.step_ms
        );
        reduce.push((
            format!("context {ctx}, batch {}", r.batch),
            step_bytes,
            per,
            2 * cfg.num_layers + 1,
        ));
        rows.push(r);
    }
    // One sequence's step: one row a collective, what its latency is made of.
    let one_bytes = cfg.hidden_size * 2;
    let one = group.time_all_reduce(one_bytes, 50)?;
    eprintln!(
        "[one sequence: NCCL all-reduce of {one_bytes} bytes {:.1} µs, {} a token: {:.2} ms]",
        one * 1e6,
        2 * cfg.num_layers + 1,
        one * (2 * cfg.num_layers + 1) as f64 * 1e3
    );
    reduce.push(("one sequence".to_string(), one_bytes, one, 2 * cfg.num_layers + 1));
    let bus = group.time_all_reduce(BUS_BYTES, 20)?;
    eprintln!("[NCCL all-reduce of {} MiB: {:.3} ms]", BUS_BYTES >> 20, bus * 1e3);
    Ok(bus)
}

/// ShadowKV over the group at context `ctx`: a group made for the largest batch whose
/// ShadowKV state fits every device and whose values fit the host, filled from one
/// prefill (see the module's documentation), decoded `gen` steps.
fn measure_shadow(
    a: &CudaBench,
    devices: &[usize],
    m: &OpenedModel,
    p: &ShadowParams,
    ctx: usize,
    progress: bool,
) -> Result<Row> {
    let cfg = &m.config;
    let n = devices.len();
    let cache_tokens = ctx + 2 * a.gen;
    let plan = ShardPlan::new(cfg, n)?;
    let rank_cfg = plan.device_config(0)?;
    let layout = ShadowLayout::new(&rank_cfg, p, cache_tokens)?;
    let (per_gpu, one_pool) = sequence_bytes(&layout, cfg.num_layers)?;
    // Each device: its weights, one dense prefill (keys, values, keys before RoPE) and a
    // margin out of what is free now; the host: every device's pool.
    let weights = 2 * cfg.parameter_count() / n;
    let prefill = 3 * cfg.num_layers * ctx * rank_cfg.num_kv_heads * cfg.head_dim * 2;
    let mut gpu_fit = usize::MAX;
    for &d in devices {
        let (free, _) = crate::cuda::CudaDevice::new(d)
            .map_err(|e| anyhow::anyhow!("GPU {d} cannot be used: {e}"))?
            .mem_info()?;
        gpu_fit = gpu_fit.min(free.saturating_sub(weights + prefill + (6 << 30)) / per_gpu);
    }
    let host = MachineMemory::read()?;
    let host_fit = (host.available as f64 * 0.9) as usize / (one_pool * n);
    let fit = gpu_fit.min(host_fit);
    let batch = match a.batch {
        Some(b) if b > fit => {
            bail!("a ShadowKV batch of {b} at context {ctx} does not fit: {gpu_fit} fit the GPUs, {host_fit} the host")
        }
        Some(b) => b,
        None if fit == 0 => bail!("not one ShadowKV sequence of {ctx} tokens fits the GPUs and the host"),
        None => fit,
    };
    let pool = |_rank: usize, c: &ModelConfig| gpu_value_pool(c, p, cache_tokens, batch);
    eprintln!(
        "[{n} GPU(s), context {ctx}, ShadowKV: building the group for a batch of {batch}, {:.1} GB of host values]",
        (batch * one_pool * n) as f64 / 1e9
    );
    let t0 = Instant::now();
    let serving = TpServing {
        shadow: Some((*p, &pool)),
        fetch: a.cuda.value_fetch.first().map_or(FetchPath::ZeroCopy, |f| f.path()),
        micro_batches: a.micro_batches.first().copied().unwrap_or(1),
        tier: a.cuda.gpu_tier.first().copied().unwrap_or(TierSize::Off),
        ..TpServing::full_attention(cache_tokens, batch, !a.cuda.no_graph)
    };
    let mut group = new_group(a, devices, m, serving, progress)?;
    eprintln!(
        "[{n} GPU(s), context {ctx}, ShadowKV: the group (weights, pools pinned) built in {:.1} s]",
        t0.elapsed().as_secs_f64()
    );
    let (mut first, ids) = prompt(&mut group, cfg, ctx, a.gen)?;
    let (head, last) = ids.split_at(ctx - 1);
    let t0 = Instant::now();
    for part in head.chunks(a.prefill_chunk.max(1)) {
        feed(&mut group, &mut first, part, false)?;
    }
    eprintln!(
        "[{n} GPU(s), context {ctx}, ShadowKV: prefilled in {:.1} s]",
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    // Each copy (and then the first) takes the prompt's last token and is compressed.
    let mut first = Some(first);
    let mut seqs = Vec::with_capacity(batch);
    let mut next = 0;
    for i in 0..batch {
        let mut s = match i + 1 < batch {
            true => group.fork_seq(first.as_ref().expect("kept until the last"))?,
            false => first.take().expect("kept until the last"),
        };
        next = feed(&mut group, &mut s, last, true)?;
        seqs.push(s);
    }
    eprintln!(
        "[{n} GPU(s), context {ctx}, ShadowKV: {batch} copies compressed in {:.1} s]",
        t0.elapsed().as_secs_f64()
    );
    let (decode_tps, step_ms) = decode(&mut group, &mut seqs, next, a.gen)?;
    eprintln!(
        "[{n} GPU(s), context {ctx}, ShadowKV: batch {batch} (GPUs fit {gpu_fit}, host {host_fit}), decode \
         {decode_tps:.1} tok/s, step {step_ms:.2} ms]"
    );
    Ok(Row {
        gpus: n,
        context: ctx,
        batch,
        prefill_tps: 0.0,
        decode_tps,
        step_ms,
        one_seq_ms: 0.0,
    })
}

/// Prefills one sequence of `ctx` tokens, copies it into the largest batch that fits
/// (or `--batch`), decodes the batch, then the first sequence alone.
fn measure<E: Engine>(e: &mut E, gpus: usize, cfg: &ModelConfig, ctx: usize, a: &CudaBench) -> Result<Row> {
    let (mut first, ids) = prompt(e, cfg, ctx, a.gen)?;
    let t0 = Instant::now();
    let mut next = 0;
    let chunks: Vec<&[u32]> = ids.chunks(a.prefill_chunk.max(1)).collect();
    for (i, part) in chunks.iter().enumerate() {
        next = feed(e, &mut first, part, i + 1 == chunks.len())?;
    }
    let prefill_secs = t0.elapsed().as_secs_f64();
    let cap = ctx + 2 * a.gen;
    let per = e.cache_bytes(cap);
    let fit = e
        .memory()?
        .iter()
        .map(|&(free, _)| free.saturating_sub(2 << 30) / per)
        .min()
        .unwrap_or(0);
    let batch = match a.batch {
        Some(b) if b > 1 + fit => bail!(
            "a batch of {b} at context {ctx} does not fit {gpus} GPU(s): {fit} more caches of {:.2} GiB each",
            per as f64 / (1u64 << 30) as f64
        ),
        Some(b) => b,
        None => 1 + fit,
    };
    let mut seqs = vec![first];
    for _ in 1..batch {
        let f = e.fork(&seqs[0])?;
        seqs.push(f);
    }
    let (decode_tps, step_ms) = decode(e, &mut seqs, next, a.gen)?;
    let mut one = seqs.drain(..1).collect::<Vec<_>>();
    drop(seqs);
    let (one_tps, _) = decode(e, &mut one, next, a.gen)?;
    eprintln!(
        "[{gpus} GPU(s), context {ctx}: batch {batch}, prefill {prefill_secs:.2} s, decode {decode_tps:.1} tok/s, step \
         {step_ms:.2} ms, one sequence {:.2} ms/token]",
        1e3 / one_tps
    );
    Ok(Row {
        gpus,
        context: ctx,
        batch,
        prefill_tps: ctx as f64 / prefill_secs,
        decode_tps,
        step_ms,
        one_seq_ms: 1e3 / one_tps,
    })
}

/// A new sequence for a prompt of `ctx` tokens and `2 · gen` generated ones, and the
/// prompt's token ids.
fn prompt<E: Engine>(e: &mut E, cfg: &ModelConfig, ctx: usize, gen: usize) -> Result<(E::Seq, Vec<u32>)> {
    let spec = SeqSpec {
        sampling: SamplingParams::default(),
        seed: 0,
        prompt_tokens: ctx,
        max_tokens: 2 * gen,
    };
    let ids = (0..ctx)
        .map(|i| ((i * 7919 + 13) % (cfg.vocab_size - 1)) as u32)
        .collect();
    Ok((e.new_seq(&spec)?, ids))
}

/// One step of `part` of `seq`'s prompt; with `last` the prompt is done (ShadowKV
/// compresses it) and the step's sampled token is returned (0 otherwise).
fn feed<E: Engine>(e: &mut E, seq: &mut E::Seq, part: &[u32], last: bool) -> Result<u32> {
    let t = e.submit(
        0,
        &mut [StepSeq {
            input: StepInput::Tokens(part),
            seq,
            sample: last,
            prompt_done: last,
        }],
    )?;
    let out = e.complete(0, t)?;
    if let Some((_, why)) = out.failed.first() {
        bail!("a prompt of the benchmark failed: {why}");
    }
    match last {
        true => out.tokens.first().copied().context("the prefill sampled no token"),
        false => Ok(0),
    }
}

/// `gen` decode steps over `seqs` (the first fed `token`, each next one the token the
/// step before sampled, queued two deep as the daemon does): tokens/s and the median
/// time between steps, in milliseconds.
fn decode<E: Engine>(e: &mut E, seqs: &mut [E::Seq], token: u32, gen: usize) -> Result<(f64, f64)> {
    let one = [token];
    let step = |e: &mut E, seqs: &mut [E::Seq], input: StepInput| {
        let mut batch: Vec<StepSeq<'_, E::Seq>> = seqs
            .iter_mut()
            .map(|seq| StepSeq {
                input,
                seq,
                sample: true,
                prompt_done: false,
            })
            .collect();
        e.submit(0, &mut batch)
    };
    let t0 = Instant::now();
    let mut queued = step(e, seqs, StepInput::Tokens(&one))?;
    let mut times = Vec::with_capacity(gen);
    let mut last = Instant::now();
    let done = |e: &mut E, t| -> Result<()> {
        match e.complete(0, t)?.failed.first() {
            Some((_, why)) => bail!("a sequence of the benchmark failed: {why}"),
            None => Ok(()),
        }
    };
    for _ in 1..gen {
        let next = step(e, seqs, StepInput::Previous)?;
        done(e, queued)?;
        let now = Instant::now();
        times.push((now - last).as_secs_f64());
        last = now;
        queued = next;
    }
    done(e, queued)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(((seqs.len() * gen) as f64 / secs, 1e3 * median(&mut times)))
}
