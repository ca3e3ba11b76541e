//! `shadowkv bench --backend cuda --attention shadowkv`: ShadowKV decode throughput on
//! the GPU at its own largest batch, against the bound of its step.
//!
//! Per context: one sequence is prefilled densely (its keys before RoPE kept; timed),
//! compressed on the GPU (timed: the factorisation, landmarks, outliers, exact rows and
//! the values to the host pool), and compressed again into every other sequence of the
//! batch, each with its own slot of the registered bf16 value pool; then `gen` decode
//! steps run through the ShadowKV state with the tokens sampled greedily on the GPU and
//! the missed value chunks read from host memory by a zero-copy kernel. The batch is the
//! largest that fits both the GPU (every sequence's ShadowKV state, while the prefill
//! cache is still held) and the host memory (the values). The step's bound is the larger
//! of its missed value bytes over PCIe (at [`PCIE_BYTES_PER_S`]) and its GPU bytes at
//! the HBM rate.

use super::backend::ValueFetch;
use super::bench_cuda::{median, HBM_BYTES_PER_S};
use crate::cpu::model::chunked_prefill;
use crate::cuda::device::StreamPriority;
use crate::cuda::graph::ShadowSeqInput;
use crate::cuda::shadow::seq::sequence_bytes;
use crate::cuda::shadow::{CompressWorkspace, GpuShadowSeq, GpuValuePool, ShadowLayout};
use crate::cuda::{CudaModel, GpuSeq};
use crate::engine::sampling::SamplingParams;
use crate::pool::space::MachineMemory;
use crate::pool::{ValuePool, ValueType};
use crate::shadow::ShadowParams;
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use std::time::Instant;

/// The host-to-device rate the value fetch is held to: the zero-copy kernel's measured
/// rate on the H200 (46–51 GB/s; PCIe Gen5 x16 copies 55 GB/s).
pub const PCIE_BYTES_PER_S: f64 = 50e9;

/// What one ShadowKV run measured.
pub struct ShadowRun {
    /// The JSON row.
    pub row: serde_json::Value,
    /// Decode tokens/s.
    pub tokens_per_s: f64,
}

/// Benchmarks ShadowKV with `p` at context `ctx` on `model`: `batch` sequences (the
/// largest that fits when `None`), `gen` decode steps.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &CudaModel,
    p: &ShadowParams,
    fetch: ValueFetch,
    ctx: usize,
    batch: Option<usize>,
    gen: usize,
    prefill_chunk: usize,
    bar: ProgressBar,
) -> Result<ShadowRun> {
    let cfg = model.config();
    let layout = ShadowLayout::new(cfg, p, ctx + gen)?;
    let mut lane = model.new_lane(StreamPriority::High, false)?;
    // Each stage of each layer timed on the GPU (events; a little overhead per layer).
    lane.time_stages(true);
    let ops_dev = model.ops().device();
    let greedy = SamplingParams::default().device_row(0, 0);
    // Prefill one sequence, keeping its keys before RoPE.
    let mut dense = model.new_cache_pre_rope(ctx)?;
    let ids: Vec<u32> = (0..ctx)
        .map(|i| ((i * 7919 + 13) % (cfg.vocab_size - 1)) as u32)
        .collect();
    ops_dev.synchronize()?;
    let t0 = Instant::now();
    let first = chunked_prefill(
        &ids,
        prefill_chunk,
        |n| bar.inc(n as u64),
        |part, logits| {
            let mut one = [GpuSeq {
                tokens: part,
                cache: &mut dense,
                logits,
            }];
            let t = model.submit(&mut lane, &mut one, &[greedy], &[])?;
            model.complete(&mut lane, t)
        },
    )?;
    bar.finish_and_clear();
    let prefill_secs = t0.elapsed().as_secs_f64();
    // How many sequences fit: their ShadowKV state on the GPU (the prefill cache still
    // held), their values in host memory.
    let (per_gpu, one_pool) = sequence_bytes(&layout, cfg.num_layers)?;
    let (free, total) = ops_dev.mem_info()?;
    let gpu_fit = free.saturating_sub(2 << 30) / per_gpu;
    let host = MachineMemory::read()?;
    // Leave a tenth of the host's memory to everything else.
    let host_fit = (host.available as f64 * 0.9) as usize / one_pool;
    let fit = gpu_fit.min(host_fit);
    let batch = match batch {
        Some(b) if b > fit => bail!(
            "a ShadowKV batch of {b} at context {ctx} does not fit: {:.2} GiB of GPU state each ({:.1} GiB free \
             → {gpu_fit}) and {:.2} GiB of host values each ({:.1} GiB available → {host_fit})",
            per_gpu as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64,
            one_pool as f64 / (1u64 << 30) as f64,
            host.available as f64 / (1u64 << 30) as f64
        ),
        Some(b) => b,
        None if fit == 0 => bail!("not one ShadowKV sequence of {ctx} tokens fits the GPU and host memory"),
        None => fit,
    };
    let t_reg = Instant::now();
    let pool = GpuValuePool::new(
        model.ops(),
        ValuePool::anonymous_of(GpuValuePool::shape_for(&layout, cfg.num_layers, batch), ValueType::Bf16)?,
    )?;
    let register_secs = t_reg.elapsed().as_secs_f64();
    let mut ws = CompressWorkspace::default();
    let ops = lane.ops();
    ops.device().synchronize()?;
    let t1 = Instant::now();
    let mut seqs: Vec<GpuShadowSeq> = vec![model.compress_shadow(ops, &dense, &layout, &pool, &mut ws)?];
    ops.device().synchronize()?;
    let compress_secs = t1.elapsed().as_secs_f64();
    for _ in 1..batch {
        seqs.push(model.compress_shadow(ops, &dense, &layout, &pool, &mut ws)?);
    }
    ops.device().synchronize()?;
    drop(dense);
    ops_dev.release_memory()?;
    // Decode.
    let mut last = vec![first[0]; batch];
    let rows = vec![greedy; batch];
    let mut steps = Vec::with_capacity(gen);
    let mut min_free = usize::MAX;
    let (sel0, hit0) = model.shadow_counters(&lane)?;
    let td = Instant::now();
    for _ in 0..gen {
        let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let mut inputs: Vec<ShadowSeqInput> = seqs
            .iter_mut()
            .zip(&toks)
            .map(|(seq, t)| ShadowSeqInput { token: t, seq })
            .collect();
        let ts = Instant::now();
        let ticket = model.submit_shadow(&mut lane, &mut inputs, &rows, &[], &pool, fetch.path())?;
        last = model.complete(&mut lane, ticket)?;
        steps.push(ts.elapsed().as_secs_f64());
        if steps.len() == 2 {
            min_free = min_free.min(ops_dev.mem_info()?.0);
        }
    }
    let decode_secs = td.elapsed().as_secs_f64();
    let (sel1, hit1) = model.shadow_counters(&lane)?;
    let gather = lane.gather;
    let stages: Vec<(String, f64)> = lane
        .stage_ms
        .iter()
        .map(|(s, ms)| (s.name().to_string(), ms / gen as f64))
        .collect();
    eprintln!(
        "[GPU ms per step by stage, summed over layers: {}]",
        stages
            .iter()
            .map(|(s, ms)| format!("{s} {ms:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (selected, hits) = ((sel1 - sel0) as f64, (hit1 - hit0) as f64);
    let misses = selected - hits;
    let chunk_bytes = (layout.chunk * layout.head_dim * 2) as f64;
    let fetched_per_step = misses * chunk_bytes / gen as f64;
    // GPU bytes of a step: the weights, and per sequence and layer the landmarks
    // scored, the rows attended (keys and values), and for each miss its rebuilt keys
    // (the coefficients read, the keys written) and its values written.
    let c = seqs[0].counts();
    let (_, attended) = layout.attended_rows(&c);
    let per_layer =
        (c.chunks as usize * layout.kv_width() * 2 + attended * layout.kv_heads * layout.head_dim * 4) as f64;
    let per_miss = (layout.chunk * (layout.rank * 2 + layout.head_dim * 4)) as f64;
    let gpu_bytes =
        model.weight_bytes() as f64 + (batch * cfg.num_layers) as f64 * per_layer + misses / gen as f64 * per_miss;
    let step_ms = 1e3 * median(&mut steps);
    let bound_s = (fetched_per_step / PCIE_BYTES_PER_S).max(gpu_bytes / HBM_BYTES_PER_S);
    let tps = (batch * gen) as f64 / decode_secs;
    let peak_gib = (total - min_free.min(total)) as f64 / (1u64 << 30) as f64;
    let host_gib = pool.pool().bytes() as f64 / (1u64 << 30) as f64;
    let hit_rate = if selected > 0.0 { hits / selected } else { 0.0 };
    eprintln!(
        "[context {ctx}, ShadowKV ({}): batch {batch} (GPU fits {gpu_fit}, host {host_fit}), prefill {prefill_secs:.2} s + \
         compression {compress_secs:.3} s ({:.1} %), decode {tps:.1} tok/s, step {step_ms:.2} ms = {:.2}× its bound, \
         hit rate {hit_rate:.3}, {:.1} MiB of values fetched a step; pool {host_gib:.1} GiB registered in {register_secs:.1} s]",
        fetch.label(),
        100.0 * compress_secs / (prefill_secs + compress_secs),
        step_ms / 1e3 / bound_s,
        fetched_per_step / (1u64 << 20) as f64,
    );
    if fetch == ValueFetch::CpuGather {
        eprintln!(
            "[cpu-gather per step: {:.2} ms waiting for miss lists, {:.2} ms gathering ({:.1} GB/s)]",
            1e3 * gather.wait_secs / gen as f64,
            1e3 * gather.gather_secs / gen as f64,
            if gather.gather_secs > 0.0 {
                gather.bytes as f64 / gather.gather_secs / 1e9
            } else {
                0.0
            }
        );
    }
    let row = serde_json::json!({
        "context": ctx, "method": "shadowkv", "batch": batch, "generated": gen,
        "settings": {"budget": p.budget, "rank": p.rank, "chunk_size": p.chunk_size,
                     "outlier_chunks": p.outlier_chunks, "local_chunks": p.local_chunks},
        "prefill_secs": prefill_secs, "compress_secs": compress_secs,
        "compress_share": compress_secs / (prefill_secs + compress_secs),
        "decode_tokens_per_s": tps, "step_ms_median": step_ms,
        "reuse_hit_rate": hit_rate, "value_bytes_per_step": fetched_per_step,
        "gpu_bytes_per_step": gpu_bytes, "bound_ms": bound_s * 1e3,
        "bound_ratio": step_ms / 1e3 / bound_s, "pcie_bytes_per_s_assumed": PCIE_BYTES_PER_S,
        "peak_gpu_gib": peak_gib, "host_pool_gib": host_gib, "pool_register_secs": register_secs,
        "gpu_fit": gpu_fit, "host_fit": host_fit, "value_fetch": fetch.label(),
        "stage_ms_per_step": stages.iter().map(|(s, ms)| (s.clone(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>(),
        "gather_wait_ms_per_step": 1e3 * gather.wait_secs / gen as f64,
        "gather_ms_per_step": 1e3 * gather.gather_secs / gen as f64,
        "gather_gb_per_s": if gather.gather_secs > 0.0 { gather.bytes as f64 / gather.gather_secs / 1e9 } else { 0.0 },
    });
    Ok(ShadowRun { row, tokens_per_s: tps })
}
