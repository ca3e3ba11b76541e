//! The whole model on the GPU against the CPU reference, and the per-step kernels the
//! whole model adds (the qkv split into the caches, sampling). Without a CUDA device
//! every test prints `skipped: no CUDA device (...)` and passes
//! (`SHADOWKV_REQUIRE_CUDA=1` makes that a failure).
//!
//! Tolerances: the GPU stores weights and activations in bf16 (8 significant bits)
//! through every layer, so whole-model logits are compared by ‖gpu − cpu‖ / ‖cpu‖
//! (printed as `RESULT model ...`), with greedy tokens compared where the reference's
//! top-2 margin is clear of that noise.

mod common;

use common::gpu_check::seeded;
use common::{golden, ids};

use half::bf16;
use rand::{Rng, SeedableRng};
use shadowkv::cpu::ops::Rope;
use shadowkv::cpu::{CpuModel, LogitsWanted, SeqInput};
use shadowkv::cuda::step::RowTargets;
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::{rope_inv_freq, CudaModel, CudaOps, GpuCache, GpuSeq, StepGraphs};
use shadowkv::engine::generate::{generate_cuda, GenerateOptions, GenerateRequest};
use shadowkv::engine::sampling::{argmax, SamplingParams};
use shadowkv::model::config::ModelConfig;
use shadowkv::model::load::open_model;
use shadowkv::model::synthetic::{preset, SyntheticSource};
use shadowkv::model::weights::ModelWeights;

/// ‖a − b‖ / ‖b‖, after checking `a` has no NaN and is not all zero.
fn norm_rel(what: &str, a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite GPU values");
    assert!(a.iter().any(|&v| v != 0.0), "{what}: GPU values all zero");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// A top-2 margin clear of the bf16 noise, as a share of the logits' root mean square:
/// at the ≈ 1.75e-2 norm-relative error the whole model shows, two logits' errors differ
/// by ≈ 2.5 % of that (σ), so 0.15 is ≈ 6σ. (A fixed 0.05 on logits of rms ≈ 1, ≈ 2σ,
/// flipped about one step in fifty: seed 7751768072027384286, qwen2-d64-bias, a margin
/// of 0.054.)
const CLEAR_MARGIN: f32 = 0.15;

/// Root mean square of `v`.
fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt() as f32
}

/// Largest minus second-largest value.
fn margin(v: &[f32]) -> f32 {
    let i = argmax(v) as usize;
    let second = v
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .fold(f32::NEG_INFINITY, |m, (_, &x)| m.max(x));
    v[i] - second
}

/// Small configs with the head dimensions the kernels serve (64 and 128): llama3 RoPE
/// scaling with one KV head, Qwen2 biases with tied embeddings, and d = 128.
fn small_configs() -> Vec<(&'static str, ModelConfig)> {
    let l3 = preset("tiny-llama3").unwrap();
    let q2 = preset("tiny-qwen2").unwrap();
    let base = preset("tiny").unwrap();
    vec![
        (
            "llama3-d64-kv1",
            ModelConfig {
                hidden_size: 256,
                num_heads: 4,
                num_kv_heads: 1,
                head_dim: 64,
                intermediate_size: 512,
                ..l3
            },
        ),
        (
            "qwen2-d64-bias",
            ModelConfig {
                hidden_size: 384,
                num_heads: 6,
                num_kv_heads: 2,
                head_dim: 64,
                intermediate_size: 640,
                ..q2
            },
        ),
        (
            "llama-d128",
            ModelConfig {
                hidden_size: 512,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 128,
                intermediate_size: 768,
                num_layers: 3,
                ..base
            },
        ),
    ]
}

fn both(ops: CudaOps, name: &str, cfg: &ModelConfig, seed: u64) -> (CpuModel, CudaModel) {
    let src = SyntheticSource::new(name, cfg, seed);
    let cpu = CpuModel::new(cfg.clone(), ModelWeights::load(cfg, &src, false).unwrap());
    let gpu = CudaModel::from_source(ops, cfg.clone(), &src, false).unwrap();
    (cpu, gpu)
}

#[test]
fn synthetic_models_match_the_cpu_reference() {
    let mut rng = seeded("synthetic models");
    for (name, cfg) in small_configs() {
        let Some(ops) = ops_or_skip() else { return };
        let (cpu, gpu) = both(ops, name, &cfg, rng.random());
        let prompt: Vec<u32> = (0..333).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
        let mut cc = cpu.new_cache();
        let mut gc = gpu.new_cache(400).unwrap();
        let want = cpu.prefill(&mut cc, &prompt, 128, |_| {}).unwrap();
        let got = gpu.prefill(&mut gc, &prompt, 100, |_| {}).unwrap();
        let mut worst = norm_rel(name, &got, &want);
        // Teacher-forced decode: both take the CPU's greedy token.
        let (mut agree, mut clear) = (0, 0);
        let mut next = argmax(&want);
        for _ in 0..40 {
            let t = [next];
            let want = cpu
                .forward(&mut [SeqInput {
                    tokens: &t,
                    cache: &mut cc,
                    logits: LogitsWanted::Last,
                }])
                .unwrap()
                .remove(0);
            let got = gpu
                .forward(&mut [GpuSeq {
                    tokens: &t,
                    cache: &mut gc,
                    logits: LogitsWanted::Last,
                }])
                .unwrap()
                .remove(0);
            worst = worst.max(norm_rel(name, &got, &want));
            if margin(&want) > CLEAR_MARGIN * rms(&want) {
                clear += 1;
                agree += (argmax(&got) == argmax(&want)) as usize;
            }
            next = argmax(&want);
        }
        eprintln!("RESULT model {name} norm_rel={worst:.3e} top1 {agree}/{clear} (clear margins)");
        assert!(worst < 3e-2, "{name}: logits differ by {worst:.3e} (norm-relative)");
        assert_eq!(agree, clear, "{name}: greedy token differs where the margin is clear");
        assert!(clear >= 10, "{name}: only {clear} of 40 steps with a clear margin");
        assert_eq!(gc.len(), 373);
    }
}

fn smollm2(ops: CudaOps) -> (CpuModel, CudaModel, shadowkv::model::load::OpenedModel) {
    let m = open_model(common::test_model().to_str().unwrap()).unwrap();
    let cpu = CpuModel::new(
        m.config.clone(),
        ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap(),
    );
    let gpu = CudaModel::from_source(ops, m.config.clone(), m.source.as_ref(), false).unwrap();
    (cpu, gpu, m)
}

/// SmolLM2 (the GGUF dequantised to bf16) on the GPU: logits against the CPU, and 32
/// greedy tokens of each golden prompt (generated on the GPU, graphs on) against
/// transformers' fp32 tokens, a difference allowed only where transformers' own top-2
/// margin is below bf16 noise.
#[test]
fn smollm2_matches_the_cpu_and_its_greedy_tokens() {
    let Some(ops) = ops_or_skip() else { return };
    let (cpu, gpu, m) = smollm2(ops);
    let g = golden();
    for p in g["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        let mut cc = cpu.new_cache();
        let mut gc = gpu.new_cache(prompt.len() + 1).unwrap();
        let want = cpu.prefill(&mut cc, &prompt, 512, |_| {}).unwrap();
        let got = gpu.prefill(&mut gc, &prompt, 256, |_| {}).unwrap();
        let rel = norm_rel(name, &got, &want);
        eprintln!("RESULT model smollm2-{name} prefill norm_rel={rel:.3e}");
        assert!(rel < 3e-2, "{name}: prefill logits differ by {rel:.3e}");
        let want_ids = ids(&p["greedy_ids"]);
        let margins: Vec<f64> = p["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let req = GenerateRequest {
            prompt: prompt.clone(),
            max_tokens: want_ids.len(),
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let opts = GenerateOptions {
            prefill_chunk: 200,
            ..Default::default()
        };
        // generate_cuda stops at EOS: compare the tokens it produced.
        let (gens, _) = generate_cuda(&gpu, &m.tokenizer, &[req], opts, true).unwrap();
        let got_ids = &gens[0].completion_ids;
        let n = got_ids.len().min(want_ids.len());
        match (0..n).find(|&i| got_ids[i] != want_ids[i]) {
            None => eprintln!("{name}: {n} greedy tokens equal transformers'"),
            Some(i) => {
                assert!(
                    margins[i] < 0.25,
                    "{name}: greedy token {i} is {}, transformers {} (margin {})",
                    got_ids[i],
                    want_ids[i],
                    margins[i]
                );
                eprintln!(
                    "{name}: greedy tokens agree for {i} steps, then a near-tie (margin {})",
                    margins[i]
                );
            }
        }
        assert!(n >= 8 || gens[0].finish.as_str() == "stop", "{name}: only {n} tokens");
    }
}

/// A cache for each prompt, with room for `steps` more tokens.
fn caches_for(gpu: &CudaModel, prompts: &[Vec<u32>], steps: usize) -> Vec<GpuCache> {
    prompts
        .iter()
        .map(|p| gpu.new_cache(p.len() + steps + 1).unwrap())
        .collect()
}

/// One step's sequences: each cache fed its inputs, the last token's logits wanted.
fn last_logits<'a>(caches: &'a mut [GpuCache], inputs: &'a [Vec<u32>]) -> Vec<GpuSeq<'a>> {
    caches
        .iter_mut()
        .zip(inputs)
        .map(|(c, t)| GpuSeq {
            tokens: t,
            cache: c,
            logits: LogitsWanted::Last,
        })
        .collect()
}

/// Sequences of different lengths in one step (prefill chunks beside decode rows),
/// decoded together with steps replayed from a CUDA graph, pick the tokens each picks
/// alone in eager forward passes. Both runs take the same (teacher-forced) tokens, and
/// the batched token must be the lone run's argmax wherever that run's top-2 margin is
/// clear of bf16 noise: one row or three take different matrix-product kernels (GEMV or
/// cuBLAS), so near-ties may break either way, but a wrong cache, table or graph input
/// cannot pass.
#[test]
fn batches_and_graph_replays_equal_single_eager_runs() {
    const NEAR_TIE: f32 = 0.15;
    let Some(ops) = ops_or_skip() else { return };
    let (_, gpu, _) = smollm2(ops);
    let mut rng = seeded("batches");
    let lens = [7usize, 90, 513];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(100..40_000)).collect())
        .collect();
    let steps = 24;
    // Alone, eager forward passes, greedy on the host: tokens and logits per step.
    let mut alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = Vec::new();
    for p in &prompts {
        let mut c = gpu.new_cache(p.len() + steps + 1).unwrap();
        let mut logits = gpu.prefill(&mut c, p, 256, |_| {}).unwrap();
        let (mut toks, mut rows) = (Vec::new(), Vec::new());
        for _ in 0..=steps {
            let t = argmax(&logits);
            toks.push(t);
            rows.push(logits);
            logits = gpu
                .forward(&mut [GpuSeq {
                    tokens: &[t],
                    cache: &mut c,
                    logits: LogitsWanted::Last,
                }])
                .unwrap()
                .remove(0);
        }
        alone.push((toks, rows));
    }
    // Together: the prompts in one mixed step, then batched decode replayed from graphs,
    // each sequence fed its lone run's tokens.
    let mut caches = caches_for(&gpu, &prompts, steps);
    let greedy = SamplingParams::default().device_row(0, 0);
    let mut g = StepGraphs::new(true);
    let (mut clear, mut agree) = (0, 0);
    for step in 0..=steps {
        let inputs: Vec<Vec<u32>> = (0..3)
            .map(|i| {
                if step == 0 {
                    prompts[i].clone()
                } else {
                    vec![alone[i].0[step - 1]]
                }
            })
            .collect();
        let mut seqs = last_logits(&mut caches, &inputs);
        let got = gpu.step(&mut seqs, &[greedy; 3], &mut g).unwrap();
        for i in 0..3 {
            let row = &alone[i].1[step];
            // Clear of bf16 noise: seed 8298432195556828368 parted at a margin of 0.112
            // on the H200 (the 7-token prompt, step 8; GEMV alone, cuBLAS in the batch),
            // while six other seeds agreed at every margin above 0.1.
            if margin(row) > NEAR_TIE {
                clear += 1;
                agree += (got[i] == alone[i].0[step]) as usize;
                assert_eq!(
                    got[i],
                    alone[i].0[step],
                    "sequence {i} (prompt of {} tokens), step {step}: batched token differs from the lone \
                     run's argmax (margin {})",
                    lens[i],
                    margin(row)
                );
            }
        }
    }
    eprintln!(
        "graphs: {} captures, {} replays, {} eager steps; {agree}/{clear} tokens with clear margins agree",
        g.captures, g.replays, g.eager
    );
    assert!(
        g.captures >= 1 && g.replays >= steps - 2,
        "decode steps were not replayed"
    );
    assert!(
        clear >= 3 * (steps + 1) / 2,
        "too few clear margins ({clear}) to test anything"
    );
    // A step past a cache's capacity is an error that says so.
    let t = [1u32, 1];
    let full = &mut caches[0];
    let err = gpu
        .forward(&mut [GpuSeq {
            tokens: &t,
            cache: full,
            logits: LogitsWanted::Last,
        }])
        .unwrap_err();
    assert!(err.to_string().contains("exceed its cache"), "{err}");
}

/// Greedy decode of a batch with graphs on, `steps` steps from `prompts`: the tokens of
/// each step, and the graph counters.
fn greedy_with_graphs(gpu: &CudaModel, prompts: &[Vec<u32>], steps: usize) -> (Vec<Vec<u32>>, StepGraphs) {
    let mut caches = caches_for(gpu, prompts, steps);
    let greedy = SamplingParams::default().device_row(0, 0);
    let mut g = StepGraphs::new(true);
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let mut seqs = last_logits(&mut caches, &inputs);
        let got = gpu.step(&mut seqs, &vec![greedy; prompts.len()], &mut g).unwrap();
        inputs = got.iter().map(|&t| vec![t]).collect();
        out.push(got);
    }
    (out, g)
}

/// Another thread's device-wide work (context synchronisations, pinned host memory
/// allocated and freed) while a batch decodes with graphs on: a capture it invalidates
/// costs the graph, not the step. The tokens equal those of the same run alone, bit for
/// bit (captured or eager, a step runs the same kernels on the same bucketed lengths).
#[test]
fn decode_graphs_survive_another_threads_device_work() {
    let Some(ops) = ops_or_skip() else { return };
    let Some(other) = ops_or_skip() else { return };
    let (_, gpu, _) = smollm2(ops);
    let mut rng = seeded("graph interference");
    let prompts: Vec<Vec<u32>> = [5usize, 40, 300]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(100..40_000)).collect())
        .collect();
    let steps = 48;
    let (alone, g) = greedy_with_graphs(&gpu, &prompts, steps);
    assert!(
        g.failed == 0 && g.replays > 0,
        "alone: {} failed captures, {} replays",
        g.failed,
        g.replays
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let (busy, (beside, g)) = std::thread::scope(|s| {
        let noise = s.spawn(|| {
            let ctx = other.device().context().clone();
            let (mut rounds, mut refused) = (0usize, 0usize);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: the pinned buffer is only allocated and dropped, never read.
                let pinned = unsafe { ctx.alloc_pinned::<u8>(1 << 20) };
                refused += ctx.synchronize().is_err() as usize;
                drop(pinned);
                rounds += 1;
            }
            (rounds, refused)
        });
        let run = greedy_with_graphs(&gpu, &prompts, steps);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (noise.join().unwrap(), run)
    });
    eprintln!(
        "RESULT graph_interference rounds={} refused_syncs={} captures={} failed={} replays={} eager={}",
        busy.0, busy.1, g.captures, g.failed, g.replays, g.eager
    );
    assert!(busy.0 > 0, "the other thread never ran");
    assert_eq!(beside, alone, "tokens differ with another thread at work");
}

/// The qkv split: bias, RoPE at each row's position, q packed, k and v appended to
/// each row's cache at its position, pre-RoPE keys kept: against the CPU's RoPE.
#[test]
fn qkv_split_appends_rotated_keys_and_values() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("qkv split");
    let cfg = preset("llama-3.1-8b").unwrap();
    for &(heads, kv_heads, d) in &[(9usize, 3usize, 64usize), (32, 8, 128)] {
        let cfg = ModelConfig {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            hidden_size: heads * d,
            ..cfg.clone()
        };
        let (layers, cap, rows) = (3usize, 300usize, 37usize);
        let layer = 1;
        let kvw = kv_heads * d;
        let width = (heads + 2 * kv_heads) * d;
        let qkv: Vec<bf16> = (0..rows * width)
            .map(|_| bf16::from_f32(rng.random_range(-2.0..2.0)))
            .collect();
        let bias: Vec<bf16> = (0..width)
            .map(|_| bf16::from_f32(rng.random_range(-0.5..0.5)))
            .collect();
        // Two caches; rows alternate between them at scattered, distinct positions.
        let mut all: Vec<usize> = (0..cap).collect();
        for i in 0..rows {
            let j = rng.random_range(i..cap);
            all.swap(i, j);
        }
        let positions: Vec<usize> = all[..rows].to_vec();
        let dev = ops.device();
        let mut caches = [
            dev.zeros::<bf16>(layers * 2 * cap * kvw).unwrap(),
            dev.zeros::<bf16>(layers * 2 * cap * kvw).unwrap(),
        ];
        for c in caches.iter_mut() {
            ops.fill_nan_bf16(c).unwrap();
        }
        let bases: Vec<u64> = (0..rows)
            .map(|r| {
                use cudarc::driver::DevicePtr;
                caches[r % 2].device_ptr(dev.stream()).0
            })
            .collect();
        let pos_i: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let caps = vec![cap as i32; rows];
        let (d_qkv, d_bias) = (dev.upload(&qkv).unwrap(), dev.upload(&bias).unwrap());
        let (d_pos, d_caps, d_bases) = (
            dev.upload(&pos_i).unwrap(),
            dev.upload(&caps).unwrap(),
            dev.upload(&bases).unwrap(),
        );
        let inv = dev.upload(&rope_inv_freq(&cfg)).unwrap();
        let mut q = dev.zeros::<bf16>(rows * heads * d).unwrap();
        let mut kp = dev.zeros::<bf16>(rows * kvw).unwrap();
        ops.fill_nan_bf16(&mut q).unwrap();
        ops.fill_nan_bf16(&mut kp).unwrap();
        use cudarc::driver::DevicePtr;
        let s = dev.stream();
        let t = RowTargets {
            rows,
            positions: d_pos.device_ptr(s).0,
            cache_base: d_bases.device_ptr(s).0,
            cache_cap: d_caps.device_ptr(s).0,
        };
        // SAFETY: both caches are [layers][2][cap][kvw] and every position is below cap.
        unsafe {
            ops.qkv_rope_append(
                &mut q,
                Some(&mut kp),
                &d_qkv,
                Some(&d_bias),
                &t,
                &inv,
                layer,
                (heads, kv_heads, d),
            )
            .unwrap()
        };
        let got_q: Vec<f32> = dev.download(&q).unwrap().iter().map(|v| v.to_f32()).collect();
        let got_kp: Vec<f32> = dev.download(&kp).unwrap().iter().map(|v| v.to_f32()).collect();
        let got_c: Vec<Vec<bf16>> = caches.iter().map(|c| dev.download(c).unwrap()).collect();
        // Reference: f32 of (bf16 + bf16 bias), CPU RoPE.
        let x: Vec<f32> = (0..rows * width)
            .map(|i| qkv[i].to_f32() + bias[i % width].to_f32())
            .collect();
        let mut rq: Vec<f32> = Vec::new();
        let mut rk: Vec<f32> = Vec::new();
        for r in 0..rows {
            rq.extend_from_slice(&x[r * width..r * width + heads * d]);
            rk.extend_from_slice(&x[r * width + heads * d..r * width + heads * d + kvw]);
        }
        let kpre = rk.clone();
        let rope = Rope::new(&cfg);
        let (cos, sin) = rope.tables(&positions);
        rope.apply(&mut rq, heads, &cos, &sin);
        rope.apply(&mut rk, kv_heads, &cos, &sin);
        let close = |what: &str, got: &[f32], want: &[f32]| {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= w.abs() / 128.0 + 1e-3,
                    "{what} (heads {heads}/{kv_heads}, d {d}) element {i}: got {g}, want {w}"
                );
            }
        };
        close("q", &got_q, &rq);
        close("pre-RoPE k", &got_kp, &kpre);
        let mut last_writer = std::collections::HashMap::new();
        for (r, &p) in positions.iter().enumerate() {
            last_writer.insert((r % 2, p), r);
        }
        for (&(c, p), &r) in &last_writer {
            let k_at = (2 * layer * cap + p) * kvw;
            let v_at = ((2 * layer + 1) * cap + p) * kvw;
            let k: Vec<f32> = got_c[c][k_at..k_at + kvw].iter().map(|v| v.to_f32()).collect();
            let v: Vec<f32> = got_c[c][v_at..v_at + kvw].iter().map(|v| v.to_f32()).collect();
            close("cached k", &k, &rk[r * kvw..(r + 1) * kvw]);
            let wv = &x[r * width + heads * d + kvw..(r + 1) * width];
            close("cached v", &v, wv);
        }
        // Nothing else in the caches was written (still NaN).
        let written: usize = got_c
            .iter()
            .map(|c| c.iter().filter(|v| !v.to_f32().is_nan()).count())
            .sum();
        assert_eq!(written, last_writer.len() * 2 * kvw, "rows written outside their slots");
        eprintln!("RESULT qkv_split heads={heads}/{kv_heads} d={d} ok");
    }
}

/// Sampling on the device: greedy picks the first largest logit; top-k and top-p
/// draws stay inside the CPU sampler's support; and the draws follow the softmax.
#[test]
fn sampling_kernel_follows_the_cpu_sampler() {
    let Some(ops) = ops_or_skip() else { return };
    // Found on the H200: before top-k cut ties by index, this seed put a token outside
    // the top 5 (row 52, t = 0.7, k = 5).
    eprintln!("sampling: fixed seed 16031573587122018750");
    sampling_case(&ops, rand::rngs::StdRng::seed_from_u64(16_031_573_587_122_018_750));
    sampling_case(&ops, seeded("sampling"));
}

fn sampling_case(ops: &CudaOps, mut rng: rand::rngs::StdRng) {
    let dev = ops.device();
    let vocab = 49_999;
    let rows = 64;
    let mut logits: Vec<f32> = (0..rows * vocab).map(|_| rng.random_range(-8.0..8.0)).collect();
    // Ties: row 0's maximum appears twice.
    logits[17] = 100.0;
    logits[4000] = 100.0;
    let d_logits = dev.upload(&logits).unwrap();
    let mut out = dev.zeros::<u32>(rows).unwrap();
    let run = |params: &[[u64; 5]], out: &mut cudarc::driver::CudaSlice<u32>| -> Vec<u32> {
        let flat: Vec<u64> = params.iter().flatten().copied().collect();
        let p = dev.upload(&flat).unwrap();
        ops.fill_nan_f32(&mut dev.zeros::<f32>(1).unwrap()).unwrap();
        ops.sample(out, &d_logits, &p, params.len(), vocab).unwrap();
        dev.download(out).unwrap()
    };
    let greedy = vec![SamplingParams::default().device_row(0, 0); rows];
    let got = run(&greedy, &mut out);
    for r in 0..rows {
        assert_eq!(got[r], argmax(&logits[r * vocab..(r + 1) * vocab]), "greedy row {r}");
    }
    assert_eq!(got[0], 17, "ties go to the first index");
    // Support of top-k / top-p, against the CPU sampler's order (z = logit / t
    // descending, index ascending), with ties: rows 2..6 have their logits rounded to
    // 1/8 so that the k-th value is shared by several tokens.
    for r in 2..6 {
        for v in &mut logits[r * vocab..(r + 1) * vocab] {
            *v = (*v * 8.0).round() / 8.0;
        }
    }
    let d_logits = dev.upload(&logits).unwrap();
    let run = |params: &[[u64; 5]], out: &mut cudarc::driver::CudaSlice<u32>| -> Vec<u32> {
        let flat: Vec<u64> = params.iter().flatten().copied().collect();
        let p = dev.upload(&flat).unwrap();
        // Poisoned: an unwritten row reads as a token outside the vocabulary.
        dev.stream().memcpy_htod(&vec![u32::MAX; out.len()], out).unwrap();
        ops.sample(out, &d_logits, &p, params.len(), vocab).unwrap();
        dev.download(out).unwrap()
    };
    for &(t, k, p) in &[(0.7f32, 5usize, 1.0f32), (1.3, 0, 0.3), (1.0, 40, 0.5), (0.9, 300, 1.0)] {
        let sp = SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            seed: None,
        };
        for trial in 0..20u64 {
            let params: Vec<[u64; 5]> = (0..rows).map(|r| sp.device_row(99 + r as u64, trial)).collect();
            let got = run(&params, &mut out);
            for r in 1..rows {
                let row = &logits[r * vocab..(r + 1) * vocab];
                let z: Vec<f32> = row.iter().map(|&l| l / t).collect();
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
                let keep_k = if k == 0 { vocab } else { k };
                let top: Vec<f64> = order[..keep_k].iter().map(|&i| z[i] as f64).collect();
                let total: f64 = top.iter().map(|v| (v - top[0]).exp()).sum();
                let mut acc = 0.0;
                let mut keep = keep_k;
                for (j, v) in top.iter().enumerate() {
                    acc += (v - top[0]).exp() / total;
                    if acc >= p as f64 - 1e-6 {
                        keep = j + 1;
                        break;
                    }
                }
                // Top-k is exact; the top-p boundary may take one more for fp32 rounding
                // of the mass.
                let allowed = &order[..if p < 1.0 { (keep + 1).min(keep_k) } else { keep }];
                assert!(
                    allowed.contains(&(got[r] as usize)),
                    "t={t} k={k} p={p} row {r}: token {} outside the kept set of {keep}",
                    got[r]
                );
            }
        }
    }
    // Frequencies: four tokens with probabilities 0.4, 0.3, 0.2, 0.1, drawn 64 × 100 times.
    let probs = [0.4f64, 0.3, 0.2, 0.1];
    let mut row = vec![-1e4f32; vocab];
    for (i, p) in probs.iter().enumerate() {
        row[1000 * i + 3] = p.ln() as f32;
    }
    let flat: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
    let d_rows = dev.upload(&flat).unwrap();
    let sp = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: None,
    };
    let mut counts = [0usize; 4];
    for step in 0..100u64 {
        let params: Vec<u64> = (0..rows).flat_map(|r| sp.device_row(7 * r as u64 + 1, step)).collect();
        let p = dev.upload(&params).unwrap();
        ops.sample(&mut out, &d_rows, &p, rows, vocab).unwrap();
        for t in dev.download(&out).unwrap() {
            let i = (t as usize - 3) / 1000;
            assert_eq!((t as usize - 3) % 1000, 0, "drew token {t} of probability ~0");
            counts[i] += 1;
        }
    }
    let n = (rows * 100) as f64;
    for (i, p) in probs.iter().enumerate() {
        let f = counts[i] as f64 / n;
        let sd = (p * (1.0 - p) / n).sqrt();
        eprintln!("RESULT sample freq token {i}: {f:.4} (p {p}, sd {sd:.4})");
        assert!((f - p).abs() < 5.0 * sd, "token {i}: frequency {f:.4}, probability {p}");
    }
    // Same seed and counter, same token; another counter, another stream.
    let params: Vec<u64> = (0..rows).flat_map(|_| sp.device_row(5, 11)).collect();
    let p = dev.upload(&params).unwrap();
    ops.sample(&mut out, &d_rows, &p, rows, vocab).unwrap();
    let same = dev.download(&out).unwrap();
    assert!(
        same.iter().all(|&t| t == same[0]),
        "one (seed, counter) gave different tokens"
    );
}
