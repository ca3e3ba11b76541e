//! Tensor parallelism on the GPU: the kernels a group adds (against the CPU, bit for
//! bit), a group of one against the whole model (the same logits bit for bit: the
//! collectives of one rank change nothing), a group of one through the engine against
//! the one-GPU engine on SmolLM2 (the same greedy tokens, full attention and ShadowKV),
//! the same for a group loaded once and configured anew for each run (as `eval` uses
//! it, more runs than it has communicator ids), and, where the host has two GPUs, a group of two against one GPU (logits within
//! bf16 tolerance, the ranks' logits identical). Without a GPU each test prints that
//! it skipped; without NCCL the group tests do (`SHADOWKV_REQUIRE_CUDA=1` makes both
//! failures). Where the host has two GPUs, a group of two whose decode steps were
//! captured as CUDA graphs is also dropped within a time limit (NCCL's teardown order).

mod common;

use common::gpu_check::*;
use half::bf16;
use rand::Rng;
use shadowkv::cpu::LogitsWanted;
use shadowkv::cuda::nccl::Nccl;
use shadowkv::cuda::parallel::{vocab_concat, TpShard, COMMUNICATORS};
use shadowkv::cuda::testing::{ops_or_skip, record_skip, REQUIRE_ENV};
use shadowkv::cuda::{CudaDevice, CudaModel, CudaOps, GpuSeq};
use shadowkv::engine::backend::{SeqSpec, StepBackend, StepInput, StepSeq};
use shadowkv::engine::backend_tp::{TpBackend, TpOptions, TpServing, TpWeights};
use shadowkv::engine::generate::{generate_cuda, generate_group, generate_parallel, GenerateOptions, GenerateRequest};
use shadowkv::engine::sampling::SamplingParams;
use shadowkv::model::config::ModelConfig;
use shadowkv::model::load::{open_model, OpenedModel};
use shadowkv::model::shard::ShardPlan;
use shadowkv::model::synthetic::preset;
use shadowkv::shadow::Attention;
use std::sync::Arc;
use std::time::Duration;

fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// NCCL, or `None` after saying why the test skips.
fn nccl_or_skip() -> Option<Arc<Nccl>> {
    match Nccl::load() {
        Ok(n) => {
            eprintln!("{n:?}");
            Some(n)
        }
        Err(e) if required() => panic!("{e:#}"),
        Err(e) => {
            eprintln!("skipped: {e:#}");
            record_skip("no NCCL");
            None
        }
    }
}

/// A small Llama-shaped model the CUDA kernels take (head dimension 64), whose heads,
/// KV heads and MLP split over 1, 2 or 4 devices and whose vocabulary does not (the
/// last device holds fewer ids).
fn small_model() -> ModelConfig {
    ModelConfig {
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 64,
        hidden_size: 512,
        intermediate_size: 1024,
        vocab_size: 1003,
        num_layers: 3,
        tie_word_embeddings: false,
        ..preset("tiny").unwrap()
    }
}

#[test]
fn random_fill_shards_are_slices_of_the_whole() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let (rows, cols) = (37usize, 129usize);
    let mut whole = dev.zeros::<bf16>(rows * cols).unwrap();
    ops.fill_random_bf16(&mut whole, 11, 0.5).unwrap();
    let whole = dev.download(&whole).unwrap();
    for &(r0, r1, c0, c1) in &[(3usize, 10usize, 5usize, 17usize), (0, 37, 64, 129), (36, 37, 0, 129)] {
        let mut part = dev.zeros::<bf16>((r1 - r0) * (c1 - c0)).unwrap();
        ops.fill_nan_bf16(&mut part).unwrap();
        ops.fill_random_rect(&mut part, (r1 - r0, c1 - c0), (cols, r0, c0), 11, 0.5)
            .unwrap();
        let got = dev.download(&part).unwrap();
        for r in r0..r1 {
            for c in c0..c1 {
                let (g, w) = (got[(r - r0) * (c1 - c0) + (c - c0)], whole[r * cols + c]);
                assert_eq!(g.to_bits(), w.to_bits(), "({r}, {c})");
            }
        }
        assert!(got.iter().any(|v| v.to_f32() != 0.0));
    }
}

#[test]
fn embedding_of_a_vocabulary_share() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("embedding_share");
    let (vocab, hidden, held) = (1003usize, 200usize, 335usize..670usize);
    let (table, _) = rand_bf16(&mut rng, held.len() * hidden, 1.0);
    let mut ids: Vec<u32> = (0..40).map(|_| rng.random_range(0..vocab as u32)).collect();
    ids.extend([334, 335, 669, 670, 0, 1002, 1003, u32::MAX]);
    let d_table = dev.upload(&table).unwrap();
    let d_ids = dev.upload(&ids).unwrap();
    let mut out = dev.zeros::<bf16>(ids.len() * hidden).unwrap();
    ops.fill_nan_bf16(&mut out).unwrap();
    ops.embedding_rows(&mut out, &d_table, &d_ids, (ids.len(), hidden), (held.clone(), vocab))
        .unwrap();
    let got = dev.download(&out).unwrap();
    let mut copied = 0;
    for (r, &id) in ids.iter().enumerate() {
        let row = &got[r * hidden..(r + 1) * hidden];
        let id = id as usize;
        if id >= vocab {
            assert!(row.iter().all(|v| v.is_nan()), "id {id} past the vocabulary");
        } else if held.contains(&id) {
            let want = &table[(id - held.start) * hidden..(id - held.start + 1) * hidden];
            assert!(row.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "id {id}");
            copied += 1;
        } else {
            assert!(row.iter().all(|v| v.to_bits() == 0), "id {id} held elsewhere");
        }
    }
    assert!(copied >= 2, "the ids hit the share {copied} times");
    println!(
        "RESULT embedding_rows held={held:?} rows={} copied={copied} exact",
        ids.len()
    );
}

#[test]
fn vocab_concat_puts_the_shares_in_order() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("vocab_concat");
    for &(world, vocab, rows) in &[(3usize, 1003usize, 5usize), (2, 128256, 3), (1, 517, 2)] {
        let per = vocab.div_ceil(world);
        // Each rank's [rows, width] block at r · rows · per, the last block's tail junk.
        let mut gathered = vec![f32::NAN; world * rows * per];
        let mut want = vec![0f32; rows * vocab];
        for r in 0..world {
            let width = per.min(vocab - r * per);
            for row in 0..rows {
                for c in 0..width {
                    let v: f32 = rng.random_range(-8.0..8.0);
                    gathered[r * rows * per + row * width + c] = v;
                    want[row * vocab + r * per + c] = v;
                }
            }
        }
        let d_in = dev.upload(&gathered).unwrap();
        let mut out = dev.zeros::<f32>(rows * vocab).unwrap();
        ops.fill_nan_f32(&mut out).unwrap();
        vocab_concat(&ops, &mut out, &d_in, rows, per, vocab).unwrap();
        let got = dev.download(&out).unwrap();
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "world {world}"
        );
        println!("RESULT vocab_concat world={world} vocab={vocab} rows={rows} exact");
    }
}

/// The logits of `prompt` through `model`, with its last token's logits after `steps`
/// greedy decode steps appended (rows of `vocab`).
fn logits_of(model: &CudaModel, prompt: &[u32], steps: usize) -> Vec<f32> {
    let mut cache = model.new_cache(prompt.len() + steps + 1).unwrap();
    let mut all = model.prefill(&mut cache, prompt, 7, |_| {}).unwrap();
    let v = model.config().vocab_size;
    for _ in 0..steps {
        let last = &all[all.len() - v..];
        let next = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
        let out = model
            .forward(&mut [GpuSeq {
                tokens: &[next],
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])
            .unwrap();
        all.extend_from_slice(&out[0]);
    }
    all
}

/// Rank `rank` of a group over `devices` made of `plan`'s synthetic model.
fn rank_model(
    plan: &ShardPlan,
    cfg: &ModelConfig,
    nccl: &Arc<Nccl>,
    ids: &[shadowkv::cuda::nccl::UniqueId],
    rank: usize,
    ordinal: usize,
) -> CudaModel {
    let ops = CudaOps::new(CudaDevice::new(ordinal).unwrap()).unwrap();
    let tp = TpShard::new(plan, rank, nccl.clone(), ids.to_vec()).unwrap();
    CudaModel::synthetic_shard(ops, cfg.clone(), 7, (plan, tp), false).unwrap()
}

#[test]
fn a_group_of_one_gives_the_whole_models_logits_bit_for_bit() {
    let Some(ops) = ops_or_skip() else { return };
    let Some(nccl) = nccl_or_skip() else { return };
    let cfg = small_model();
    let whole = CudaModel::synthetic(ops, cfg.clone(), 7, false).unwrap();
    let plan = ShardPlan::new(&cfg, 1).unwrap();
    let ids: Vec<_> = (0..COMMUNICATORS).map(|_| nccl.unique_id().unwrap()).collect();
    let one = rank_model(&plan, &cfg, &nccl, &ids, 0, 0);
    assert_eq!(one.weight_bytes(), whole.weight_bytes());
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 1003).collect();
    let (a, b) = (logits_of(&whole, &prompt, 4), logits_of(&one, &prompt, 4));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0));
    let same = a.iter().zip(&b).filter(|(x, y)| x.to_bits() == y.to_bits()).count();
    println!("RESULT group_of_one logits={} identical={same}", a.len());
    assert_eq!(same, a.len(), "a group of one must give the whole model's logits");
}

/// Whether the host has two GPUs; says why the test skips if not.
fn two_gpus_or_skip() -> bool {
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    if gpus < 2 {
        eprintln!("skipped: {gpus} GPU(s); a group of two needs two");
        record_skip("fewer than two GPUs");
    }
    gpus >= 2
}

#[test]
fn two_gpus_give_one_gpus_logits() {
    let Some(ops) = ops_or_skip() else { return };
    if !two_gpus_or_skip() {
        return;
    }
    let Some(nccl) = nccl_or_skip() else { return };
    let cfg = small_model();
    let whole = CudaModel::synthetic(ops, cfg.clone(), 7, false).unwrap();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 1003).collect();
    let want = logits_of(&whole, &prompt, 4);
    let plan = ShardPlan::new(&cfg, 2).unwrap();
    let ids: Vec<_> = (0..COMMUNICATORS).map(|_| nccl.unique_id().unwrap()).collect();
    // One thread a rank: each waits for the other inside the collectives.
    let got: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (plan, cfg, nccl, ids, prompt) = (&plan, &cfg, &nccl, &ids, &prompt);
                s.spawn(move || logits_of(&rank_model(plan, cfg, nccl, ids, rank, rank), prompt, 4))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        got[0].iter().zip(&got[1]).all(|(a, b)| a.to_bits() == b.to_bits()),
        "the ranks' logits differ"
    );
    check(
        "tensor_parallel",
        "2 GPUs vs 1",
        &got[0],
        &want,
        1.0 / 64.0,
        5e-2 * rms(&want),
    );
    // Greedy tokens agree wherever one GPU's top-2 margin is clear.
    let v = cfg.vocab_size;
    let argmax = |r: &[f32]| (0..v).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
    for (i, (a, b)) in got[0].chunks(v).zip(want.chunks(v)).enumerate() {
        let mut sorted = b.to_vec();
        sorted.sort_by(|x, y| y.total_cmp(x));
        if sorted[0] - sorted[1] > 0.05 {
            assert_eq!(argmax(a), argmax(b), "row {i}");
        }
    }
}

/// A group of two whose decode steps were captured as CUDA graphs (checked: every rank
/// captured and replayed one), and whose model stream joined a communicator of its
/// own (an all-reduce timed, as `bench --devices` does), is dropped within a minute.
/// NCCL counts such a graph as a reference on the communicator it captured and the
/// last rank to destroy that communicator waits for every one: a rank that gave its
/// communicators up before its graph waited for itself (`bench --devices 0,1` hung).
#[test]
fn a_group_of_two_with_captured_steps_is_dropped_without_hanging() {
    if ops_or_skip().is_none() || !two_gpus_or_skip() || nccl_or_skip().is_none() {
        return;
    }
    let cfg = small_model();
    let mut group = TpBackend::new(
        &cfg,
        TpWeights::Synthetic(7),
        TpOptions {
            devices: vec![0, 1],
            serving: TpServing::full_attention(64, 1, true),
            progress: false,
        },
    )
    .unwrap();
    let prompt: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 1003).collect();
    let spec = SeqSpec {
        sampling: SamplingParams::default(),
        seed: 0,
        prompt_tokens: prompt.len(),
        max_tokens: 8,
    };
    let mut seq = group.new_seq(&spec).unwrap();
    // The prompt, then decode steps: the first runs eagerly and is captured, the next
    // ones replay the capture.
    for step in 0..5 {
        let (input, prompt_done) = match step {
            0 => (StepInput::Tokens(&prompt), true),
            _ => (StepInput::Previous, false),
        };
        let batch = &mut [StepSeq {
            input,
            seq: &mut seq,
            sample: true,
            prompt_done,
        }];
        let queued = group.submit(0, batch).unwrap();
        assert_eq!(group.complete(0, queued).unwrap().tokens.len(), 1, "step {step}");
    }
    let counts = group.graph_counts().unwrap();
    assert!(
        counts.len() == 2 && counts.iter().all(|lanes| lanes[0].0 >= 1 && lanes[0].1 >= 1),
        "every rank captures and replays its decode step: {counts:?}"
    );
    group.time_all_reduce(1 << 20, 3).unwrap();
    drop(seq);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(group);
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(60)).is_ok(),
        "dropping a group of two with captured steps took over a minute (NCCL teardown hangs)"
    );
    println!("RESULT group_of_two_dropped graphs={counts:?}");
}

fn smollm2_request(tok: &shadowkv::model::tokenizer::TextTokenizer, n: usize, gen: usize) -> GenerateRequest {
    let text = "The river runs past the old mill, where the miller keeps his accounts in a \
                ledger bound in green leather. Every spring the water rises and the village \
                counts the days until the bridge opens again. ";
    let mut ids = tok.encode(&text.repeat(n / 30 + 1), true).unwrap();
    ids.truncate(n);
    GenerateRequest {
        prompt: ids,
        max_tokens: gen,
        sampling: SamplingParams::default(),
        stop: vec![],
    }
}

/// SmolLM2 on device 0 and opened for the group, or `None` (the test skips) without a
/// GPU or NCCL.
fn smollm2_on_gpu() -> Option<(CudaModel, OpenedModel)> {
    let ops = ops_or_skip()?;
    nccl_or_skip()?;
    let m = open_model(common::test_model().to_str().unwrap()).unwrap();
    let gpu = CudaModel::from_source(ops, m.config.clone(), m.source.as_ref(), false).unwrap();
    Some((gpu, m))
}

#[test]
fn a_group_of_one_generates_what_the_one_gpu_engine_generates() {
    let Some((gpu, m)) = smollm2_on_gpu() else { return };
    let shadow = common::smollm2_shadow();
    for attention in [Attention::Full, Attention::ShadowKv(shadow)] {
        let reqs = [
            smollm2_request(&m.tokenizer, 900, 48),
            smollm2_request(&m.tokenizer, 300, 40),
        ];
        let opts = GenerateOptions {
            prefill_chunk: 256,
            attention,
            ..Default::default()
        };
        let (one, _) = generate_cuda(&gpu, &m.tokenizer, &reqs, opts, true).unwrap();
        let (group, _) = generate_parallel(
            &m.config,
            TpWeights::Source(m.source.as_ref()),
            &[0],
            &m.tokenizer,
            &reqs,
            opts,
            true,
        )
        .unwrap();
        for (a, b) in one.iter().zip(&group) {
            assert!(!a.completion_ids.is_empty());
            assert_eq!(a.completion_ids, b.completion_ids, "{attention:?}");
        }
        println!(
            "RESULT group_of_one_smollm2 attention={} tokens={} equal",
            match attention {
                Attention::Full => "full",
                Attention::ShadowKv(_) => "shadowkv",
            },
            one.iter().map(|g| g.completion_ids.len()).sum::<usize>()
        );
    }
}

/// `eval --devices`'s use of a group: loaded once, then configured for each run with
/// other settings (full attention and ShadowKV, alternately). Each run gives the
/// one-GPU engine's tokens, and the runs outnumber the group's communicator ids: the
/// lanes of each configuration rejoin the communicators of the one it replaced.
#[test]
fn a_group_configured_anew_for_each_run_generates_what_the_one_gpu_engine_generates() {
    let Some((gpu, m)) = smollm2_on_gpu() else { return };
    let shadow = common::smollm2_shadow();
    let reqs = [smollm2_request(&m.tokenizer, 700, 40)];
    let opts = |attention| GenerateOptions {
        prefill_chunk: 256,
        attention,
        ..Default::default()
    };
    let (full, shadowkv) = (Attention::Full, Attention::ShadowKv(shadow));
    let want_full = generate_cuda(&gpu, &m.tokenizer, &reqs, opts(full), true).unwrap().0;
    let want_shadow = generate_cuda(&gpu, &m.tokenizer, &reqs, opts(shadowkv), true)
        .unwrap()
        .0;
    assert!(!want_full[0].completion_ids.is_empty() && !want_shadow[0].completion_ids.is_empty());
    let mut group = TpBackend::load(&m.config, TpWeights::Source(m.source.as_ref()), &[0], false).unwrap();
    let runs = COMMUNICATORS + 2;
    for run in 0..runs {
        let (attention, want) = if run % 2 == 0 {
            (full, &want_full)
        } else {
            (shadowkv, &want_shadow)
        };
        let (got, _) = generate_group(&mut group, &m.tokenizer, &reqs, opts(attention), true).unwrap();
        assert_eq!(
            got[0].completion_ids, want[0].completion_ids,
            "run {run}: {attention:?}"
        );
    }
    println!(
        "RESULT group_configured_anew_smollm2 runs={runs} tokens_full={} tokens_shadowkv={} equal",
        want_full[0].completion_ids.len(),
        want_shadow[0].completion_ids.len()
    );
}
