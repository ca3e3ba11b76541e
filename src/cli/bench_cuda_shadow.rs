//! `shadowkv bench --backend cuda --attention shadowkv`: ShadowKV decode throughput on
//! the GPU at its own largest batch, against the bound of its step.
//!
//! Per context: one sequence is prefilled densely (its keys before RoPE kept; timed),
//! compressed on the GPU (timed: the factorisation, landmarks, outliers, exact rows and
//! the values to the host pool), and compressed again into every other sequence of the
//! batch, each with its own slot of the registered bf16 value pool (the first
//! compression and their mean timed, and each stage of both by GPU events, see
//! [`CompressWorkspace::time_stages`]); then, for each micro-batch setting, `gen`
//! untimed and `gen` timed decode steps run through the ShadowKV state (two queued, as
//! the daemon runs them), and [`STAGE_STEPS`] more timed by stage queued right behind
//! them (the timed steps carry no stage stamps, which slow a step by 0.6–2.4 %; the bench
//! prints the staged steps' time too), all with the tokens sampled greedily
//! on the GPU and the missed value chunks read from host memory (zero-copy or
//! cpu-gather). The untimed steps put every
//! setting's measurement past the GPU value tier's first fill: without them a later
//! setting would inherit a warmer tier than the first. The batch is the
//! largest that fits both the GPU (every sequence's ShadowKV state, while the prefill
//! cache is still held) and the host memory (the values); with GPU value slots
//! (`--gpu-value-slots`), sequences whose values the GPU holds too join it
//! ([`fit_batch`]). The step's bound is the larger of its missed value bytes over PCIe
//! (at [`PCIE_BYTES_PER_S`]; the misses of sequences in GPU value slots do not cross it)
//! and its GPU bytes at the HBM rate. Its floor with one micro-batch is no shorter: a
//! layer's fetch can only hide behind the work between its selection and its attention's
//! second pass ([`StepBytes::floor_secs`]).

use super::backend::ValueFetch;
use super::bench_report::{median, HBM_BYTES_PER_S};
use crate::cpu::model::chunked_prefill;
use crate::cuda::device::StreamPriority;
use crate::cuda::graph::{Lane, ShadowCounters, ShadowSeqInput};
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::seq::sequence_bytes;
use crate::cuda::shadow::tier::tier_chunks_for;
use crate::cuda::shadow::timeline::{hidden_fetch_share, GpuSpan, GpuTracks, TRACKS_PER_LANE};
use crate::cuda::shadow::GatherTimes;
use crate::cuda::shadow::{CompressWorkspace, GpuShadowSeq, GpuValuePool, ShadowLayout, TierSize, ValueSlots};
use crate::cuda::{CudaModel, GpuSeq};
use crate::engine::sampling::SamplingParams;
use crate::pool::space::{free_space, MachineMemory};
use crate::pool::ValuePool;
use crate::shadow::ShadowParams;
use crate::telemetry::trace::TraceWriter;
use anyhow::{bail, ensure, Context, Result};
use indicatif::ProgressBar;
use std::path::Path;
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

/// Benchmarks ShadowKV with `p` at context `ctx` on `model`, fetching by `fetch` with a
/// GPU value tier of `tier` and GPU value slots `slots`: `batch` sequences (the largest
/// that fits when `None`, see [`fit_batch`]; the tier, at `auto`, takes what the free
/// GPU memory holds after them), then `gen` decode
/// steps for each entry of `micro` (each step's attention split into that many
/// micro-batches) with each of `fetch_blocks` (the zero-copy fetch's blocks) and each of
/// `lanes` (the batch split among lanes decoding side by side), all on the same
/// prefilled and compressed sequences; one result per setting.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &CudaModel,
    p: &ShadowParams,
    (fetch, tier, slots, pool_file): (ValueFetch, TierSize, ValueSlots, Option<&Path>),
    ctx: usize,
    batch: Option<usize>,
    gen: usize,
    (micro, fetch_blocks, lanes): (&[usize], &[usize], &[usize]),
    prefill_chunk: usize,
    bar: ProgressBar,
    mut trace: Option<&mut BenchTrace>,
) -> Result<Vec<ShadowRun>> {
    let cfg = model.config();
    // Room for every run's generated tokens: its warm-up, timed and staged steps.
    let settings = micro.len() * fetch_blocks.len() * lanes.len();
    let layout = ShadowLayout::new(cfg, p, ctx + settings * steps_of_a_setting(gen))?;
    let mut lane = model.new_lane(StreamPriority::High, false)?;
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
    // held), their values in host memory or GPU value slots.
    let (per_gpu, one_pool) = sequence_bytes(&layout, cfg.num_layers)?;
    let (free, _) = ops_dev.mem_info()?;
    let host = match pool_file {
        // A file's disk holds the pool (less a twentieth for everything else there).
        Some(f) => {
            let dir = f
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let free = free_space(dir).with_context(|| format!("the free space of {} (--pool-file)", dir.display()))?;
            (free as f64 * 0.95) as usize
        }
        // Leave a tenth of the host's memory to everything else.
        None => (MachineMemory::read()?.available as f64 * 0.9) as usize,
    };
    let mem = FitMemory {
        gpu: free.saturating_sub(2 << 30),
        host,
        state: per_gpu,
        values: one_pool,
    };
    let fit = fit_batch(&mem, batch, slots, ctx)?;
    let (gpu_fit, host_fit, batch) = (fit.gpu_fit, fit.host_fit, fit.batch());
    let t_reg = Instant::now();
    let shape = GpuValuePool::shape_for(&layout, cfg.num_layers, fit.host);
    let host_pool = match pool_file {
        Some(f) => ValuePool::file_backed(shape, f).with_context(|| format!("the value pool file {}", f.display()))?,
        None => ValuePool::anonymous(shape)?,
    };
    let pool = GpuValuePool::new(model.ops(), host_pool)?.with_device_slots(model.ops(), fit.device)?;
    let fetch_label = match pool_file {
        Some(_) => format!("{} from a file", fetch.label()),
        None => fetch.label().to_string(),
    };
    let register_secs = t_reg.elapsed().as_secs_f64();
    let mut ws = CompressWorkspace::default();
    ws.time_stages(true);
    let ops = lane.ops();
    // As a server does at start-up: the workers' streams, scratch and cuBLAS kernels.
    let t_prep = Instant::now();
    ws.prepare(ops, &layout)?;
    let prepare_secs = t_prep.elapsed().as_secs_f64();
    ops.device().synchronize()?;
    let t1 = Instant::now();
    let mut seqs: Vec<GpuShadowSeq> = vec![model.compress_shadow(ops, &dense, &layout, &pool, &mut ws)?];
    ops.device().synchronize()?;
    let compress_secs = t1.elapsed().as_secs_f64();
    let first_stages = ws.take_times()?;
    let t2 = Instant::now();
    for _ in 1..batch {
        seqs.push(model.compress_shadow(ops, &dense, &layout, &pool, &mut ws)?);
    }
    ops.device().synchronize()?;
    let compress_secs_mean = (compress_secs + t2.elapsed().as_secs_f64()) / batch as f64;
    let mut all_stages = ws.take_times()?;
    all_stages.add(&first_stages);
    let (first_ms, mean_ms) = (first_stages.per_compression(), all_stages.per_compression());
    // The compression's overhead against the dense prefill of the same prompt.
    let share = |secs: f64| secs / prefill_secs;
    eprintln!(
        "[context {ctx}, ShadowKV compression (workers prepared in {prepare_secs:.3} s): first {compress_secs:.3} s \
         ({:.1} % of the dense prefill), mean of {batch} {compress_secs_mean:.3} s ({:.1} %); ms by stage summed over layers and workers, first / mean (GPU \
         events; eigenvectors-host by the host's clock, part of eigenvectors): {}]",
        100.0 * share(compress_secs),
        100.0 * share(compress_secs_mean),
        first_ms
            .iter()
            .map(|(name, ms)| {
                let mean = mean_ms.iter().find(|(n, _)| n == name).map_or(0.0, |m| m.1);
                format!("{name} {ms:.1} / {mean:.1}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let stage_json = |ms: &[(&str, f64)]| {
        ms.iter()
            .map(|(n, v)| (n.to_string(), serde_json::json!(v)))
            .collect::<serde_json::Map<_, _>>()
    };
    let compress_stage_ms = serde_json::json!({"first": stage_json(&first_ms), "mean": stage_json(&mean_ms)});
    drop((dense, ws));
    ops_dev.release_memory()?;
    drop(lane);
    // The tier, added once the prefill cache (every sequence was compressed from it) is
    // gone: at `auto` what the free memory holds, less a margin for the steps' scratch;
    // filled with each sequence's newest chunks from the pool.
    let (free, _) = ops_dev.mem_info()?;
    let tier = match tier {
        TierSize::Off => 0,
        TierSize::Chunks(n) => n,
        TierSize::Auto => tier_chunks_for(&layout, cfg.num_layers, batch, auto_tier_bytes(free)),
    };
    let layout = layout.with_tier(tier)?;
    let tier_bytes = batch * cfg.num_layers * layout.tier_bytes();
    ensure!(
        tier_bytes <= free.saturating_sub(2 << 30),
        "a GPU value tier of {tier} chunks per KV head for {batch} sequences needs {:.1} GiB; {:.1} GiB are free",
        tier_bytes as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64,
    );
    let t_tier = Instant::now();
    for s in &mut seqs {
        s.add_tier(model.ops(), tier, &pool)?;
    }
    ops_dev.synchronize()?;
    let tier_fill_secs = t_tier.elapsed().as_secs_f64();
    let fixed = serde_json::json!({
        "context": ctx, "method": "shadowkv", "batch": batch, "generated": gen,
        "settings": p,
        "prefill_secs": prefill_secs, "compress_secs": compress_secs,
        "compress_share": share(compress_secs), "compress_secs_mean": compress_secs_mean,
        "compress_share_mean": share(compress_secs_mean), "compress_stage_ms": compress_stage_ms,
        "compress_prepare_secs": prepare_secs,
        "pcie_bytes_per_s_assumed": PCIE_BYTES_PER_S,
        "host_pool_gib": pool.pool().bytes() as f64 / (1u64 << 30) as f64, "pool_register_secs": register_secs,
        "gpu_fit": gpu_fit, "host_fit": host_fit, "value_fetch": fetch_label,
        "gpu_value_slots": fit.device, "gpu_value_slots_gib": pool.device_bytes() as f64 / (1u64 << 30) as f64,
        "gpu_tier_chunks": tier, "gpu_tier_gib": tier_bytes as f64 / (1u64 << 30) as f64,
        "gpu_tier_fill_secs": tier_fill_secs,
    });
    let mut last = vec![first[0]; batch];
    let mut runs = Vec::with_capacity(settings);
    let settings = micro
        .iter()
        .flat_map(|&m| fetch_blocks.iter().map(move |&fb| (m, fb)))
        .flat_map(|(m, fb)| lanes.iter().map(move |&l| (m, fb, l)));
    for (i, (m, fb, l)) in settings.enumerate() {
        if tier > 0 && i > 0 {
            // Each run starts from a tier filled as the first one's was (the newest
            // chunks): it warms over a run's steps (the selection is not uniform), and a
            // later run would otherwise find more of its misses there. The run's lane
            // is a stream of its own: the refill must be done before it starts.
            for s in &mut seqs {
                s.refill_tier(model.ops(), &pool)?;
            }
            ops_dev.synchronize()?;
        }
        let label = format!(
            "{ctx} tokens, {}{} ({m} micro-batch{}{}){}",
            fetch_label,
            if tier > 0 {
                format!(", GPU tier {tier}")
            } else {
                String::new()
            },
            if m == 1 { "" } else { "es" },
            if fetch_blocks.len() > 1 {
                format!(", {fb} fetch blocks")
            } else {
                String::new()
            },
            if l > 1 { format!(", {l} lanes") } else { String::new() },
        );
        let tr = trace.as_deref_mut().map(|t| (t, label.as_str()));
        let d = decode(model, &mut seqs, &pool, (fetch, fb), (m, l), gen, &mut last, tr)?;
        let ctx_now = seqs[0].len();
        let bound_s = d.bytes.bound_secs();
        let floor_s = d.bytes.floor_secs();
        let tps = (batch * gen) as f64 / d.decode_secs;
        let peak_gib = (d.total - d.min_free.min(d.total)) as f64 / (1u64 << 30) as f64;
        let chunk_bytes = layout.value_chunk_bytes() as f64;
        let fetched_per_step = (d.misses.host + d.misses.device) * chunk_bytes;
        let pcie_per_step = d.misses.host * chunk_bytes;
        eprintln!(
            "[context {ctx}, ShadowKV ({}{}, {m} micro-batch{}{}): batch {batch} (GPU fits {gpu_fit}, host {host_fit}{}), \
             prefill {prefill_secs:.2} s + compression {compress_secs_mean:.3} s ({:.1} %, mean), decode {tps:.1} tok/s, \
             step {:.2} ms = {:.2}× its bound ({:.2}× one micro-batch's floor), hit rate {:.3} (GPU tier {:.3}), {:.1} MiB of values fetched a step \
             ({:.1} MiB over PCIe); pool registered in {register_secs:.1} s]",
            fetch_label,
            if tier > 0 {
                format!(
                    ", GPU tier of {tier} chunks per head ({:.1} GiB)",
                    tier_bytes as f64 / (1u64 << 30) as f64
                )
            } else {
                String::new()
            },
            if m == 1 { "" } else { "es" },
            if l > 1 { format!(", {l} lanes") } else { String::new() },
            if fit.device > 0 {
                format!(
                    "; {} of them with their values in host memory, {} in GPU value slots ({:.1} GiB)",
                    fit.host,
                    fit.device,
                    pool.device_bytes() as f64 / (1u64 << 30) as f64
                )
            } else {
                String::new()
            },
            100.0 * share(compress_secs_mean),
            d.step_ms,
            d.step_ms / 1e3 / bound_s,
            d.step_ms / 1e3 / floor_s,
            d.hit_rate,
            d.tier_hit_rate,
            fetched_per_step / (1u64 << 20) as f64,
            pcie_per_step / (1u64 << 20) as f64,
        );
        eprintln!(
            "[GPU ms per step by stage, summed over layers and micro-batches, over the {STAGE_STEPS} steps after \
             the timed ones (each stage's end a GPU timestamp, which slows the step to {:.2} ms{}): {}]",
            d.staged_step_ms,
            d.traced_step_ms
                .map(|ms| format!(", the {TRACE_STEPS} traced ones to {ms:.2} ms"))
                .unwrap_or_default(),
            d.stages
                .iter()
                .map(|(s, ms)| format!("{s} {ms:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!(
            "[the host's time queuing a lane's step: {:.2} ms ({:.2} ms with the stage stamps)]",
            d.queue_ms[0], d.queue_ms[1]
        );
        if let Some(h) = d.fetch_hidden {
            eprintln!(
                "[value fetch hidden behind compute over the last {TRACE_STEPS} steps (trace): {:.1} %]",
                100.0 * h
            );
        }
        let g = d.gather;
        let gather_gbs = if g.gather_secs > 0.0 {
            g.bytes as f64 / g.gather_secs / 1e9
        } else {
            0.0
        };
        if fetch == ValueFetch::CpuGather {
            eprintln!(
                "[cpu-gather per step: the gather actor {:.2} ms waiting for miss lists, {:.2} ms gathering ({gather_gbs:.1} GB/s)]",
                1e3 * g.wait_secs / gen as f64,
                1e3 * g.gather_secs / gen as f64,
            );
        }
        let mut row = fixed.clone();
        let more = serde_json::json!({
            "micro_batches": m, "lanes": l, "fetch_blocks": fb, "context_at_end": ctx_now,
            "decode_tokens_per_s": tps, "step_ms_median": d.step_ms,
            "staged_step_ms_median": d.staged_step_ms, "traced_step_ms_median": d.traced_step_ms,
            "host_queue_ms_per_lane_step": d.queue_ms[0], "host_queue_ms_per_lane_step_staged": d.queue_ms[1],
            "reuse_hit_rate": d.hit_rate, "tier_hit_rate": d.tier_hit_rate, "value_bytes_per_step": fetched_per_step,
            "pcie_value_bytes_per_step": pcie_per_step,
            "gpu_bytes_per_step": d.bytes.gpu(), "gpu_bytes_beside_fetch_per_step": d.bytes.window,
            "bound_ms": bound_s * 1e3, "bound_ratio": d.step_ms / 1e3 / bound_s,
            "one_micro_batch_floor_ms": floor_s * 1e3, "floor_ratio": d.step_ms / 1e3 / floor_s, "peak_gpu_gib": peak_gib,
            "stage_ms_per_step": d.stages.iter().map(|(s, ms)| (s.clone(), serde_json::json!(ms))).collect::<serde_json::Map<_, _>>(),
            "gather_wait_ms_per_step": 1e3 * g.wait_secs / gen as f64,
            "gather_ms_per_step": 1e3 * g.gather_secs / gen as f64,
            "gather_gb_per_s": gather_gbs,
            "fetch_hidden_share": d.fetch_hidden,
        });
        for (k, v) in more.as_object().expect("an object") {
            row[k] = v.clone();
        }
        runs.push(ShadowRun { row, tokens_per_s: tps });
    }
    Ok(runs)
}

/// What the decode steps of one micro-batch setting measured.
struct Decoded {
    decode_secs: f64,
    step_ms: f64,
    /// The median step of those timed by stage (their stamps slow them).
    staged_step_ms: f64,
    /// With `--trace`: the median step of the traced ones.
    traced_step_ms: Option<f64>,
    /// The host's mean time queuing one lane's step: the timed steps', the staged ones'.
    queue_ms: [f64; 2],
    /// With `--trace` and a fetch stream: the share of the fetch time hidden behind
    /// compute over the traced steps ([`hidden_fetch_share`]).
    fetch_hidden: Option<f64>,
    /// Misses of the slots a step.
    misses: Misses,
    hit_rate: f64,
    /// Of the selected chunks, the share found in the GPU value tier.
    tier_hit_rate: f64,
    /// The step's bytes, by when a step can move them.
    bytes: StepBytes,
    stages: Vec<(String, f64)>,
    gather: GatherTimes,
    min_free: usize,
    total: usize,
}

/// Runs `gen` untimed then `gen` timed decode steps of `seqs` with each step's attention
/// split into `micro` micro-batches and the zero-copy fetch on `fetch_blocks` blocks, the
/// batch split among `lanes` lanes that decode side by side (one micro-batch's value
/// fetch overlaps the selection and key rebuild of the others, one lane's the whole
/// steps of the others; two steps queued a lane, as the daemon queues them), then
/// [`STAGE_STEPS`] steps timed by stage. `last` holds each sequence's last token and is
/// advanced. With `trace`, the GPU timeline of the last [`TRACE_STEPS`] steps goes to it,
/// under `label`.
#[allow(clippy::too_many_arguments)]
fn decode(
    model: &CudaModel,
    seqs: &mut [GpuShadowSeq],
    pool: &GpuValuePool,
    (fetch, fetch_blocks): (ValueFetch, usize),
    (micro, lanes): (usize, usize),
    gen: usize,
    last: &mut [u32],
    trace: Option<(&mut BenchTrace, &str)>,
) -> Result<Decoded> {
    let batch = seqs.len();
    ensure!(
        lanes >= 1 && lanes <= batch,
        "--lanes {lanes} does not split a batch of {batch}"
    );
    let smallest = batch / lanes;
    ensure!(
        micro >= 1 && micro <= smallest,
        "--micro-batches {micro} does not split a lane's batch of {smallest}"
    );
    let mut lanes: Vec<Lane> = (0..lanes)
        .map(|_| {
            let mut lane = model.new_lane(StreamPriority::High, false)?;
            lane.set_micro_batches(micro);
            lane.set_fetch_blocks(fetch_blocks);
            Ok(lane)
        })
        .collect::<Result<_>>()?;
    let greedy = SamplingParams::default().device_row(0, 0);
    let rows = vec![greedy; batch];
    let dev = model.ops().device();
    let path = fetch.path();
    // Warm-up: as many untimed steps first, so that every run is measured with its
    // GPU value tier and slots past their first fill, whatever ran before it.
    queued_steps(model, &mut lanes, seqs, (pool, path), &rows, last, gen, |_, _| Ok(()))?;
    let counters = |lanes: &[Lane]| {
        lanes
            .iter()
            .map(|l| l.shadow_counters())
            .fold(ShadowCounters::default(), |a, b| a + b)
    };
    for lane in &mut lanes {
        lane.gather = GatherTimes::default();
    }
    let c0 = counters(&lanes);
    let mut min_free = usize::MAX;
    // The timed steps carry no stage stamps (they would slow them, see
    // Lane::time_stages); the steps timed by stage, and the trace's, follow them in the
    // same queue, so that the lanes keep the phase the timed steps left them in.
    let staged = staged_steps(gen);
    let trace_from = gen + staged - TRACE_STEPS.min(staged);
    let (mut c, mut gather) = (ShadowCounters::default(), GatherTimes::default());
    let mut anchors = Vec::new();
    let td = Instant::now();
    let QueuedSteps { done_at, queue_secs } = queued_steps(
        model,
        &mut lanes,
        seqs,
        (pool, path),
        &rows,
        last,
        gen + staged,
        |step, lanes| {
            if step == 2 {
                min_free = min_free.min(dev.mem_info()?.0);
            }
            if step == gen {
                for lane in lanes.iter_mut() {
                    lane.time_stages(1);
                }
            }
            // Step `gen` is queued and `gen - 1` read back: the timed steps' counters.
            if step == gen + 1 {
                c = counters(lanes) - c0;
                gather = GatherTimes::sum(lanes.iter().map(|l| &l.gather));
            }
            if trace.is_some() && step == trace_from {
                anchors = lanes.iter_mut().map(|l| l.start_trace()).collect::<Result<_>>()?;
            }
            Ok(())
        },
    )?;
    // A step's time: from the end of the one before to its own end (the first step's
    // from the start).
    let mut steps: Vec<f64> = std::iter::once(td)
        .chain(done_at.iter().copied())
        .zip(&done_at)
        .map(|(a, b)| (*b - a).as_secs_f64())
        .collect();
    let decode_secs = (done_at[gen - 1] - td).as_secs_f64();
    let staged_ms = |from: usize| 1e3 * median(&mut steps[from..].to_vec());
    let (staged_step_ms, traced_step_ms) = (staged_ms(gen), staged_ms(trace_from));
    let lane_steps =
        |r: std::ops::Range<usize>| 1e3 * queue_secs[r.clone()].iter().sum::<f64>() / (r.len() * lanes.len()) as f64;
    let queue_ms = [lane_steps(0..gen), lane_steps(gen..gen + staged)];
    steps.truncate(gen);
    let mut fetch_hidden = None;
    if let (Some((t, label)), Some(&first)) = (trace, anchors.first()) {
        // Every lane's spans on the first lane's clock, for the share hidden.
        let mut all = Vec::new();
        for (i, (lane, &anchor)) in lanes.iter_mut().zip(&anchors).enumerate() {
            let spans = lane.take_trace();
            t.lane(&format!("{label}, lane {i}"), anchor, &spans)?;
            let shift = 1e3 * anchor.saturating_duration_since(first).as_secs_f64();
            all.extend(spans.into_iter().map(|mut s| {
                s.start_ms += shift;
                s.end_ms += shift;
                s
            }));
        }
        fetch_hidden = hidden_fetch_share(&all);
    }
    // Stage times summed over the lanes (each lane's steps are the same steps).
    let mut stages: Vec<(String, f64)> = Vec::new();
    for lane in &lanes {
        let per_step = lane.stage_steps.max(1) as f64;
        for (s, ms) in &lane.stage_ms {
            match stages.iter_mut().find(|(n, _)| n == s.name()) {
                Some((_, t)) => *t += ms / per_step,
                None => stages.push((s.name().to_string(), ms / per_step)),
            }
        }
    }
    let (selected, hits, tier_hits) = (c.selected as f64, c.hits as f64, c.tier_hits as f64);
    // The counters do not tell which sequence a fetched chunk was for; the batch's
    // sequences are copies of one prompt decoding the same tokens, so each fetches the
    // same share, and those in GPU value slots fetch theirs from device memory.
    let fetched = c.fetched() as f64 / gen as f64;
    let on_device = seqs.iter().filter(|s| s.values_on_device()).count() as f64 / batch as f64;
    let misses = Misses {
        host: fetched * (1.0 - on_device),
        device: fetched * on_device,
        tier: tier_hits / gen as f64,
    };
    let share = |n: f64| if selected > 0.0 { n / selected } else { 0.0 };
    Ok(Decoded {
        decode_secs,
        step_ms: 1e3 * median(&mut steps),
        staged_step_ms,
        traced_step_ms: anchors.first().map(|_| traced_step_ms),
        queue_ms,
        fetch_hidden,
        misses,
        hit_rate: share(hits),
        tier_hit_rate: share(tier_hits),
        bytes: byte_shape(model, seqs, lanes.len()).step(misses),
        stages,
        gather,
        min_free,
        total: dev.mem_info()?.1,
    })
}

/// Runs `n` decode steps of `seqs` on `lanes` as the daemon runs them, the batch split
/// evenly among the lanes (each its own sequences, streams and scratch, so one lane's
/// steps run beside the others'), two queued a lane: a lane's step i + 1 (its input the
/// tokens step i samples on the GPU) is queued before its step i is read back, so the
/// host's work for a step overlaps the GPU's for the one before. `before(i, lanes)` runs
/// before step i is queued; `last` (each sequence's last token) is advanced.
#[allow(clippy::too_many_arguments)]
fn queued_steps(
    model: &CudaModel,
    lanes: &mut [Lane],
    seqs: &mut [GpuShadowSeq],
    (pool, fetch): (&GpuValuePool, FetchPath),
    rows: &[[u64; 5]],
    last: &mut [u32],
    n: usize,
    mut before: impl FnMut(usize, &mut [Lane]) -> Result<()>,
) -> Result<QueuedSteps> {
    let sizes = lane_sizes(seqs.len(), lanes.len());
    let every_previous: Vec<Option<u32>> = (0..sizes[0] as u32).map(Some).collect();
    let mut queued: Vec<_> = lanes.iter().map(|_| None).collect();
    let mut done_at = Vec::with_capacity(n);
    let mut queue_secs = vec![0.0; n];
    for (step, queuing) in queue_secs.iter_mut().enumerate() {
        before(step, lanes)?;
        for (((lane, seqs), last), queued) in lanes
            .iter_mut()
            .zip(split_by(&mut *seqs, &sizes))
            .zip(split_by(&mut *last, &sizes))
            .zip(&mut queued)
        {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let mut inputs: Vec<ShadowSeqInput> = seqs
                .iter_mut()
                .zip(&toks)
                .map(|(seq, t)| ShadowSeqInput { token: t, seq })
                .collect();
            let prev: &[Option<u32>] = if queued.is_some() {
                &every_previous[..inputs.len()]
            } else {
                &[]
            };
            let t0 = Instant::now();
            let ticket = model.submit_shadow(lane, &mut inputs, &rows[..toks.len()], prev, pool, fetch)?;
            *queuing += t0.elapsed().as_secs_f64();
            if let Some(older) = queued.replace(ticket) {
                last.copy_from_slice(&model.complete(lane, older)?);
            }
        }
        if step > 0 {
            done_at.push(Instant::now());
        }
    }
    for ((lane, last), queued) in lanes.iter_mut().zip(split_by(last, &sizes)).zip(&mut queued) {
        if let Some(older) = queued.take() {
            last.copy_from_slice(&model.complete(lane, older)?);
        }
    }
    done_at.push(Instant::now());
    Ok(QueuedSteps { done_at, queue_secs })
}

/// What [`queued_steps`] measured, by step.
struct QueuedSteps {
    /// When each step was read back (on every lane).
    done_at: Vec<Instant>,
    /// The host's time queuing each step, summed over the lanes.
    queue_secs: Vec<f64>,
}

/// The steps [`decode`] times by stage after `gen` timed ones.
fn staged_steps(gen: usize) -> usize {
    STAGE_STEPS.min(gen).max(2)
}

/// The decode steps of one setting: `gen` untimed, `gen` timed and the staged ones (each
/// adds a token to every sequence).
fn steps_of_a_setting(gen: usize) -> usize {
    2 * gen + staged_steps(gen)
}

/// The sequences of each lane when `batch` is split among `lanes`: as even as can be,
/// the larger shares first.
fn lane_sizes(batch: usize, lanes: usize) -> Vec<usize> {
    let lanes = lanes.max(1);
    (0..lanes)
        .map(|i| batch / lanes + usize::from(i < batch % lanes))
        .collect()
}

/// `v` cut into consecutive parts of `sizes` (which sum to at most its length).
fn split_by<'a, T>(mut v: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    sizes
        .iter()
        .map(|&n| {
            let (part, rest) = std::mem::take(&mut v).split_at_mut(n);
            v = rest;
            part
        })
        .collect()
}

/// Device memory the `auto` tier takes of `free` (measured after the sequences' state):
/// all but 2 GiB and 1 % of the rest, left for the steps' scratch and graphs. On the
/// H200 at 58 × 61440 and 28 × 124928 the decode then kept 3.2 GiB free, and the tier
/// held 3.4 and 4.5 GiB more than with a margin of 4 GiB and 5 % (its hit rate 0.676 →
/// 0.684 and 0.683 → 0.700; docs/perf/gpu.md, 2026-12-02 session 20).
fn auto_tier_bytes(free: usize) -> usize {
    free.saturating_sub(2 << 30) / 100 * 99
}

/// A step's bytes, split by when a step of one micro-batch can move them. A layer's
/// fetch starts once its selection is done and its attention's second pass waits for
/// it, so only the work between them hides behind the values crossing PCIe.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepBytes {
    /// GPU bytes before a layer's fetch or after it: the weights, the landmarks scored,
    /// the fetched slots' rows attended.
    serial: f64,
    /// GPU bytes beside the fetch: the missed keys rebuilt (their coefficients read,
    /// sv read, the keys written), the missed values written to their slots and the
    /// tier, the tier's and GPU slots' values read, the rows whose values are already in
    /// attended.
    window: f64,
    /// Value bytes fetched over PCIe (from the host pool).
    pcie: f64,
}

impl StepBytes {
    /// GPU bytes of the step.
    fn gpu(&self) -> f64 {
        self.serial + self.window
    }

    /// The step's bound: the larger of its PCIe bytes at [`PCIE_BYTES_PER_S`] and its
    /// GPU bytes at the HBM rate.
    fn bound_secs(&self) -> f64 {
        (self.pcie / PCIE_BYTES_PER_S).max(self.gpu() / HBM_BYTES_PER_S)
    }

    /// The shortest step of one micro-batch at those rates: the serial bytes, then per
    /// layer the longer of the fetch and the work beside it (the layers alike, so summed
    /// over the step). Never below the bound.
    fn floor_secs(&self) -> f64 {
        self.serial / HBM_BYTES_PER_S + (self.pcie / PCIE_BYTES_PER_S).max(self.window / HBM_BYTES_PER_S)
    }
}

/// The byte model's inputs: the weights' bytes, per sequence and layer the landmarks
/// scored, the rows attended and sv, and the chunk shapes.
#[derive(Clone, Copy, Debug)]
struct ByteShape {
    weights: f64,
    /// Sequences times layers.
    seq_layers: f64,
    /// A sequence's layer: landmark codes and scales.
    marks: f64,
    /// A sequence's layer: the attended rows' keys and values.
    attn: f64,
    /// A sequence's layer: sv, fp32.
    sv: f64,
    /// A missed chunk of one KV head: its keys rebuilt (coefficients and scales read,
    /// bf16 keys written).
    rebuild: f64,
    /// A chunk's keys as the attention reads them (bf16).
    keys: f64,
    /// A chunk's values in 8 bits.
    values: f64,
    /// The step has a GPU value tier.
    tier: bool,
}

impl ByteShape {
    /// The bytes of a step with misses `m`: per miss of the slots its rebuilt keys and
    /// its values written, the values read from GPU value slots, and with a GPU value
    /// tier the tier hits' values read from the tier and the fetched chunks' values
    /// written to it.
    fn step(&self, m: Misses) -> StepBytes {
        let fetched = m.host + m.device;
        let tier_moves = if self.tier { m.tier + fetched } else { 0.0 };
        let misses = (fetched + m.tier) * (self.rebuild + self.values) + (tier_moves + m.device) * self.values;
        // The fetched slots' rows are attended in the second pass, after the fetch.
        let pending = fetched * (self.keys + self.values);
        let attn = self.seq_layers * self.attn;
        let window = misses + self.seq_layers * self.sv + (attn - pending).max(0.0);
        let serial = self.weights + self.seq_layers * self.marks + pending.min(attn);
        StepBytes {
            serial,
            window,
            pcie: m.host * self.values,
        }
    }
}

/// The byte model of `seqs`' steps on `model`, decoded on `lanes` lanes (each reads the
/// weights).
fn byte_shape(model: &CudaModel, seqs: &[GpuShadowSeq], lanes: usize) -> ByteShape {
    let layout = seqs[0].layer(0).layout();
    let c = seqs[0].counts();
    let (_, attended) = layout.attended_rows(&c);
    // Landmarks: 8-bit codes and an fp32 scale per chunk and KV head.
    let marks = c.chunks as usize * (layout.kv_width() + 4 * layout.kv_heads);
    // Attention: bf16 keys of every attended row; bf16 values of the recent and outlier
    // rows, the slots' in 8 bits.
    let dense = (c.recent + c.outliers * layout.chunk as i32) as usize;
    let slots = (attended - dense) / layout.chunk;
    let d = layout.head_dim;
    let attn = layout.kv_heads * (attended * d * 2 + dense * d * 2 + slots * layout.value_chunk_bytes());
    ByteShape {
        weights: (lanes * model.weight_bytes()) as f64,
        seq_layers: (seqs.len() * model.config().num_layers) as f64,
        marks: marks as f64,
        attn: attn as f64,
        sv: (layout.sv_len() * 4) as f64,
        // The tokens' 8-bit coefficients and scales read, bf16 keys written.
        rebuild: (layout.chunk * (layout.rank + 4 + d * 2)) as f64,
        keys: (layout.chunk * d * 2) as f64,
        values: layout.value_chunk_bytes() as f64,
        tier: layout.tier > 0,
    }
}

/// Misses of the slots a step, by where their values came from.
#[derive(Clone, Copy)]
struct Misses {
    /// Fetched from the host pool (over PCIe).
    host: f64,
    /// Fetched from GPU value slots (device memory).
    device: f64,
    /// Found in the GPU value tier.
    tier: f64,
}

/// The memory a ShadowKV batch is fitted into, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct FitMemory {
    /// GPU memory free for the sequences (the margin left out).
    pub gpu: usize,
    /// Host memory available for the values (the share left to the rest taken out).
    pub host: usize,
    /// GPU bytes of one sequence's ShadowKV state.
    pub state: usize,
    /// Bytes of one sequence's values (one pool slot, in host or GPU memory).
    pub values: usize,
}

/// A ShadowKV batch: the sequences whose values the host pool holds and those in GPU
/// value slots, and how many host-held sequences each memory alone would hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFit {
    /// Sequences with their values in the host pool.
    pub host: usize,
    /// Sequences with their values in GPU value slots.
    pub device: usize,
    /// Sequences whose ShadowKV state the GPU holds (no GPU value slot).
    pub gpu_fit: usize,
    /// Sequences whose values the host holds.
    pub host_fit: usize,
}

impl BatchFit {
    /// Sequences in all.
    pub fn batch(&self) -> usize {
        self.host + self.device
    }
}

/// How a ShadowKV batch of `batch` sequences (`None`: the largest) at context `ctx`
/// splits between the host pool and GPU value slots `slots` in memory `m`. Every
/// sequence's state takes GPU memory, a host-held one's values host memory, a GPU value
/// slot's values GPU memory. `--batch auto`: the host-held batch is what both memories
/// hold (as without slots); `auto` slots add as many sequences (state and values each)
/// as the GPU memory left holds, `N` slots take their room first. A given batch: `auto`
/// gives as many of its sequences GPU value slots as the GPU memory left by their state
/// holds, `N` gives N. A batch that does not fit is refused naming both memories.
pub fn fit_batch(m: &FitMemory, batch: Option<usize>, slots: ValueSlots, ctx: usize) -> Result<BatchFit> {
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let (state, values) = (m.state.max(1), m.values.max(1));
    let both = state + values;
    let gpu_fit = m.gpu / state;
    let host_fit = m.host / values;
    let (host, device) = match (batch, slots) {
        (None, ValueSlots::Off) => (gpu_fit.min(host_fit), 0),
        (None, ValueSlots::Auto) => {
            let h = gpu_fit.min(host_fit);
            (h, (m.gpu - h * state) / both)
        }
        (None, ValueSlots::Count(n)) => {
            let Some(left) = n.checked_mul(both).and_then(|b| m.gpu.checked_sub(b)) else {
                bail!(
                    "{n} GPU value slots at context {ctx} do not fit: {:.2} GiB each (ShadowKV state {:.2} + values \
                     {:.2}), {:.1} GiB of GPU memory free",
                    gib(both),
                    gib(state),
                    gib(values),
                    gib(m.gpu)
                );
            };
            ((left / state).min(host_fit), n)
        }
        (Some(b), ValueSlots::Off) => (b, 0),
        (Some(b), ValueSlots::Auto) => {
            let d = (m.gpu.saturating_sub(b.saturating_mul(state)) / values).min(b);
            (b - d, d)
        }
        (Some(b), ValueSlots::Count(n)) => {
            ensure!(n <= b, "--gpu-value-slots {n} exceeds the batch of {b}");
            (b - n, n)
        }
    };
    let fit = BatchFit {
        host,
        device,
        gpu_fit,
        host_fit,
    };
    let gpu_need = fit
        .batch()
        .saturating_mul(state)
        .saturating_add(device.saturating_mul(values));
    let host_need = host.saturating_mul(values);
    if let Some(b) = batch {
        if gpu_need > m.gpu || host_need > m.host {
            bail!(
                "a ShadowKV batch of {b} at context {ctx} ({host} with their values in host memory, {device} in GPU \
                 value slots) does not fit: {:.2} GiB of GPU state each and {:.2} GiB of values each need {:.1} GiB \
                 of GPU memory ({:.1} free → {gpu_fit} without GPU value slots) and {:.1} GiB of host memory ({:.1} \
                 available → {host_fit})",
                gib(state),
                gib(values),
                gib(gpu_need),
                gib(m.gpu),
                gib(host_need),
                gib(m.host)
            );
        }
    }
    ensure!(
        fit.batch() > 0,
        "not one ShadowKV sequence of {ctx} tokens fits the GPU and host memory"
    );
    Ok(fit)
}

/// Decode steps traced at the end of each run (`bench --trace`).
pub const TRACE_STEPS: usize = 3;

/// Steps timed by stage after a run's timed steps (its stage breakdown; the trace's
/// steps are their last): eight, so that the bench's sequences, which fold together one
/// step in eight, fold once among them.
pub const STAGE_STEPS: usize = 8;

/// `bench --trace`: the GPU timelines of the ShadowKV runs, a track per stream of each
/// lane (its compute stream, its fetch stream, its micro-batches' streams), placed on
/// the host clock.
pub struct BenchTrace {
    writer: TraceWriter,
    next_tid: u64,
}

impl BenchTrace {
    /// A trace written to `path`.
    pub fn create(path: &std::path::Path) -> Result<Self> {
        Ok(BenchTrace {
            writer: TraceWriter::create(path, Instant::now())?,
            next_tid: 1,
        })
    }

    /// Adds a lane's spans, in milliseconds from the GPU event that stands for the host
    /// time `anchor`, as the tracks `<label> compute`, `<label> fetch` and `<label>
    /// micro-batch p`.
    pub fn lane(&mut self, label: &str, anchor: Instant, spans: &[GpuSpan]) -> Result<()> {
        let first = self.next_tid;
        self.next_tid += TRACKS_PER_LANE;
        GpuTracks::new(&mut self.writer, label, first, anchor)?.write(&mut self.writer, spans)
    }

    /// Closes the file.
    pub fn finish(self) -> Result<()> {
        self.writer.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    #[test]
    fn lanes_split_the_batch_evenly_and_whole() {
        assert_eq!(lane_sizes(57, 2), [29, 28]);
        assert_eq!(lane_sizes(5, 4), [2, 1, 1, 1]);
        for (batch, lanes) in [(1, 1), (57, 3), (28, 2), (7, 7), (100, 6)] {
            let s = lane_sizes(batch, lanes);
            assert_eq!(s.iter().sum::<usize>(), batch, "{batch} in {lanes}");
            assert!(s.iter().all(|&n| n >= 1) && s[0] - s[lanes - 1] <= 1, "{s:?}");
        }
        let mut v: Vec<usize> = (0..5).collect();
        let parts: Vec<Vec<usize>> = split_by(&mut v, &lane_sizes(5, 4)).iter().map(|p| p.to_vec()).collect();
        assert_eq!(parts, [vec![0, 1], vec![2], vec![3], vec![4]]);
    }

    /// Llama-3.1-8B's shape at 61440 tokens, 58 sequences, as the H200 bench runs it
    /// (per sequence and layer: 7680 chunks, 1310 rows attended, rank 160).
    fn llama_8b_at_61440() -> ByteShape {
        let (kv, d, chunk) = (8.0, 128.0, 8.0);
        let values = chunk * d + 4.0 * chunk;
        let (attended, dense, slots) = (1310.0, 190.0, 140.0);
        ByteShape {
            weights: 16.06e9,
            seq_layers: 58.0 * 32.0,
            marks: 7680.0 * (kv * d + 4.0 * kv),
            attn: kv * (attended * d * 2.0 + dense * d * 2.0 + slots * values),
            sv: 160.0 * kv * d * 4.0,
            rebuild: chunk * (160.0 + 4.0 + d * 2.0),
            keys: chunk * d * 2.0,
            values,
            tier: true,
        }
    }

    #[test]
    fn the_floor_hides_only_the_window_behind_the_fetch() {
        let shape = llama_8b_at_61440();
        // The session-33 step's misses: 290 MiB over PCIe, three quarters of the misses
        // found in the tier.
        let host = 290.0 * (1u64 << 20) as f64 / shape.values;
        let m = Misses {
            host,
            device: 0.0,
            tier: 3.0 * host,
        };
        let b = shape.step(m);
        let hbm = |x: f64| x / HBM_BYTES_PER_S;
        // The split keeps every byte of the bound's model.
        let fetched = m.host + m.device;
        let whole = shape.weights
            + shape.seq_layers * (shape.marks + shape.attn + shape.sv)
            + (fetched + m.tier) * (shape.rebuild + shape.values)
            + (m.tier + fetched) * shape.values;
        assert!((b.gpu() - whole).abs() < 1.0, "{} against {whole}", b.gpu());
        // At these rates the fetch outlasts the work beside it, so the floor is the
        // serial bytes plus the fetch, about a quarter above the bound.
        assert!(b.pcie / PCIE_BYTES_PER_S > hbm(b.window));
        let (bound, floor) = (b.bound_secs(), b.floor_secs());
        assert!((floor - (hbm(b.serial) + b.pcie / PCIE_BYTES_PER_S)).abs() < 1e-12);
        assert!(floor / bound > 1.15 && floor / bound < 1.35, "{floor} against {bound}");
        // With nothing over PCIe (every miss in the tier or GPU slots) the floor is the bound.
        let none = shape.step(Misses {
            host: 0.0,
            device: host,
            tier: 3.0 * host,
        });
        assert_eq!(none.pcie, 0.0);
        assert!((none.floor_secs() - none.bound_secs()).abs() < 1e-12);
        // More misses over PCIe only lengthen the floor, and never below the bound.
        let more = shape.step(Misses { host: 2.0 * host, ..m });
        assert!(more.floor_secs() > floor && more.floor_secs() >= more.bound_secs());
    }

    /// The H200 at 124928 tokens, roughly: 2.5 GiB of state and 7.6 GiB of values a
    /// sequence, 120 GiB of GPU memory and 125 GiB of host memory free.
    fn h200() -> FitMemory {
        FitMemory {
            gpu: 120 * GIB,
            host: 112 * GIB,
            state: 5 * GIB / 2,
            values: 76 * GIB / 10,
        }
    }

    #[test]
    fn auto_adds_what_the_gpu_memory_left_holds() {
        let m = h200();
        let off = fit_batch(&m, None, ValueSlots::Off, 1).unwrap();
        // The host holds 14 sequences' values; the GPU 48 sequences' state.
        assert_eq!((off.host, off.device, off.gpu_fit, off.host_fit), (14, 0, 48, 14));
        let auto = fit_batch(&m, None, ValueSlots::Auto, 1).unwrap();
        // 120 - 14 · 2.5 = 85 GiB left, 10.1 GiB a device-held sequence: 8 more.
        assert_eq!((auto.host, auto.device), (14, 8));
        assert!(14 * m.state + 8 * (m.state + m.values) <= m.gpu);
        assert!(14 * m.state + 9 * (m.state + m.values) > m.gpu);
        // N slots take their room first; the host-held batch is what remains.
        let three = fit_batch(&m, None, ValueSlots::Count(3), 1).unwrap();
        assert_eq!((three.host, three.device), (14, 3));
        let eleven = fit_batch(&m, None, ValueSlots::Count(11), 1).unwrap();
        // 120 - 11 · 10.1 = 8.9 GiB: the state of 3 host-held sequences.
        assert_eq!((eleven.host, eleven.device), (3, 11));
        let e = fit_batch(&m, None, ValueSlots::Count(12), 124928)
            .unwrap_err()
            .to_string();
        assert!(e.contains("12 GPU value slots at context 124928 do not fit"), "{e}");
    }

    #[test]
    fn a_given_batch_is_split_or_refused_naming_both_memories() {
        let m = h200();
        assert_eq!(
            fit_batch(&m, Some(10), ValueSlots::Off, 1).unwrap(),
            BatchFit {
                host: 10,
                device: 0,
                gpu_fit: 48,
                host_fit: 14
            }
        );
        // auto: as many of the batch as the GPU memory left by their state holds.
        let f = fit_batch(&m, Some(20), ValueSlots::Auto, 1).unwrap();
        // 120 - 20 · 2.5 = 70 GiB: 9 sequences' values.
        assert_eq!((f.host, f.device), (11, 9));
        let f = fit_batch(&m, Some(4), ValueSlots::Auto, 1).unwrap();
        assert_eq!((f.host, f.device), (0, 4));
        let f = fit_batch(&m, Some(20), ValueSlots::Count(8), 1).unwrap();
        assert_eq!((f.host, f.device), (12, 8));
        for (b, slots) in [
            (15, ValueSlots::Off),
            (30, ValueSlots::Auto),
            (20, ValueSlots::Count(2)),
        ] {
            let e = fit_batch(&m, Some(b), slots, 61440).unwrap_err().to_string();
            assert!(
                e.contains(&format!("batch of {b} at context 61440"))
                    && e.contains("GiB of GPU memory")
                    && e.contains("GiB of host memory"),
                "{e}"
            );
        }
        let e = fit_batch(&m, Some(2), ValueSlots::Count(3), 1).unwrap_err().to_string();
        assert!(e.contains("--gpu-value-slots 3 exceeds the batch of 2"), "{e}");
        let none = FitMemory { gpu: GIB, ..m };
        let e = fit_batch(&none, None, ValueSlots::Auto, 8).unwrap_err().to_string();
        assert!(e.contains("not one ShadowKV sequence of 8 tokens"), "{e}");
    }
}
