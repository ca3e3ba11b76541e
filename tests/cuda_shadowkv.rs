//! ShadowKV on the GPU, the whole model: prefill, compression on the GPU, decoding
//! through the ShadowKV state with the values in the registered host pool. Without a
//! GPU each test prints that it skipped.
//!
//! - With a budget covering the context, full rank and no outlier chunks, GPU ShadowKV
//!   gives GPU full attention's greedy tokens, through generations that fold chunks.
//!   The keys are rebuilt from bf16 coefficients (one more rounding than the dense
//!   cache's keys), so a token may differ only at a near-tie: where full attention's
//!   own top-2 margin, its logits recomputed with the tokens forced, is below 0.25.
//! - At SmolLM2's usual settings, GPU ShadowKV against the CPU reference's ShadowKV:
//!   the greedy tokens agree wherever the CPU's top-2 margin is clear (0.5: the GPU's
//!   bf16 logits sit 0.1–0.3 from the CPU's f32 ones on SmolLM2), and the reuse hit
//!   rates within 5 points.
//! - The zero-copy and cpu-gather fetch paths give the same tokens (the same bytes), and
//!   so do GPU value slots holding some or all of a batch's values; through the engine a
//!   GPU value slot is given back when its sequence ends.
//! - Through the engine with a prefill lane, a request alone equals `generate_cuda`,
//!   and so do two requests, one decoding while the other's prompt is prefilled on the
//!   second lane and compressed on the compression thread, and two prompts that come
//!   together. A shutdown while a prompt is being compressed ends, and the model serves
//!   on after it.
//! - cpu-gather's actor: a gather that panics fails its own request and the engine
//!   serves on; two requests decoding together in two micro-batches both end; a
//!   shutdown while slow gathers are in flight ends.
//! - `eval ruler` on the GPU scores like the CPU reference on the same samples (full
//!   attention and ShadowKV), with the reuse hit rate within 5 points.

mod common;

use shadowkv::cpu::{CpuModel, LogitsWanted, SeqInput};
use shadowkv::cuda::shadow::decode::FetchPath;
use shadowkv::cuda::shadow::TierSize;
use shadowkv::cuda::shadow::{ChunkGather, RayonGather};
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::CudaModel;
use shadowkv::engine::backend::StepBackend;
use shadowkv::engine::backend_cuda::CudaBackend;
use shadowkv::engine::generate::{generate, generate_cuda, GenerateOptions, GenerateRequest};
use shadowkv::engine::sampling::SamplingParams;
use shadowkv::engine::scheduler::{spawn_engine, EngineHandle, EngineRequest, Event, SchedulerConfig};
use shadowkv::eval::haystack::Haystack;
use shadowkv::eval::run::{run_ruler, EvalModel, MethodSpec, RulerPlan, SampleResult};
use shadowkv::eval::tasks::Task;
use shadowkv::model::load::open_model;
use shadowkv::model::tokenizer::TextTokenizer;
use shadowkv::model::weights::ModelWeights;
use shadowkv::pool::ValuePool;
use shadowkv::shadow::{Attention, ShadowParams};
use shadowkv::telemetry::trace::TraceWriter;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// The CPU's margins at each generated position, the tokens forced.
fn cpu_margins(cpu: &CpuModel, prompt: &[u32], gen: &[u32]) -> Vec<f32> {
    let mut cache = cpu.new_cache();
    cpu.prefill(&mut cache, &prompt[..prompt.len() - 1], 512, |_| {})
        .unwrap();
    let logits = cpu
        .forward(&mut [SeqInput {
            tokens: &common::forced_inputs(prompt, gen),
            cache: &mut cache,
            logits: LogitsWanted::All,
        }])
        .unwrap()
        .remove(0);
    common::top2_margins(&logits, cpu.config().vocab_size)
}

/// Where two token sequences first differ, if they do.
fn parting(a: &[u32], b: &[u32]) -> Option<usize> {
    (0..a.len().min(b.len())).find(|&i| a[i] != b[i])
}

fn smollm2() -> Option<(CudaModel, CpuModel, TextTokenizer)> {
    let ops = ops_or_skip()?;
    let m = open_model(common::test_model().to_str().unwrap()).unwrap();
    let gpu = CudaModel::from_source(ops, m.config.clone(), m.source.as_ref(), false).unwrap();
    let cpu = CpuModel::new(
        m.config.clone(),
        ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap(),
    );
    Some((gpu, cpu, m.tokenizer))
}

/// A prompt of about `n` tokens of prose-like text.
fn prompt(tok: &TextTokenizer, n: usize) -> Vec<u32> {
    let text = "The river runs past the old mill, where the miller keeps his accounts in a \
                ledger bound in green leather. Every spring the water rises and the village \
                counts the days until the bridge opens again. ";
    let mut ids = tok.encode(&text.repeat(n / 30 + 1), true).unwrap();
    ids.truncate(n);
    ids
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop: vec![],
    }
}

#[test]
fn every_chunk_at_full_rank_equals_full_attention() {
    let Some((gpu, _, tok)) = smollm2() else { return };
    let cfg = gpu.config().clone();
    let kvd = cfg.num_kv_heads * cfg.head_dim;
    for &(n, gen) in &[(700usize, 80usize), (1500, 64)] {
        let ids = prompt(&tok, n);
        let p = ShadowParams {
            budget: 2048,
            rank: kvd,
            chunk_size: 8,
            outlier_chunks: 0,
            local_chunks: 4,
        };
        let opts = |attention| GenerateOptions {
            prefill_chunk: 256,
            attention,
            ..Default::default()
        };
        let t0 = Instant::now();
        let (full, _) = generate_cuda(&gpu, &tok, &[request(ids.clone(), gen)], opts(Attention::Full), true).unwrap();
        let (shadow, stats) = generate_cuda(
            &gpu,
            &tok,
            &[request(ids.clone(), gen)],
            opts(Attention::ShadowKv(p)),
            true,
        )
        .unwrap();
        let (a, b) = (&full[0].completion_ids, &shadow[0].completion_ids);
        let st = stats.shadow.expect("ShadowKV counters");
        eprintln!(
            "prompt {n}: {} and {} tokens, hit rate {:.3}, {:.1} s",
            a.len(),
            b.len(),
            st.hit_rate().unwrap_or(0.0),
            t0.elapsed().as_secs_f64()
        );
        match parting(a, b) {
            None => {
                assert_eq!(a.len(), b.len(), "prompt {n}: one stopped early");
                eprintln!("RESULT shadowkv_full_budget prompt={n} equal_tokens={}", a.len());
            }
            Some(i) => {
                let m = common::gpu_margins(&gpu, &ids, a)[i];
                eprintln!("RESULT shadowkv_full_budget prompt={n} parts_at={i} margin={m:.3}");
                assert!(m < 0.25, "prompt {n}: token {i} differs at a clear margin {m:.3}");
            }
        }
        // Everything stays resident: after the first step, every selected chunk is a hit.
        assert!(
            st.hits > 0 && st.hit_rate().unwrap() > 0.9,
            "hit rate {:?}",
            st.hit_rate()
        );
    }
}

#[test]
fn usual_settings_agree_with_the_cpu_reference() {
    let Some((gpu, cpu, tok)) = smollm2() else { return };
    let ids = prompt(&tok, 3000);
    let p = common::smollm2_shadow();
    let gen = 64;
    let opts = GenerateOptions {
        prefill_chunk: 512,
        attention: Attention::ShadowKv(p),
        ..Default::default()
    };
    let t0 = Instant::now();
    let (g, gs) = generate_cuda(&gpu, &tok, &[request(ids.clone(), gen)], opts, true).unwrap();
    let gpu_secs = t0.elapsed().as_secs_f64();
    let (c, cs) = generate(&cpu, &tok, &[request(ids.clone(), gen)], opts).unwrap();
    // A fetched chunk counts the bytes the CPU reference counts for one: its 8-bit values
    // (no GPU value tier here, so every miss is fetched).
    let (gst, cst) = (gs.shadow.unwrap(), cs.shadow.unwrap());
    assert!(gst.misses > 0 && cst.misses > 0, "{gst:?} {cst:?}");
    assert_eq!(
        gst.value_bytes_fetched * cst.misses,
        cst.value_bytes_fetched * gst.misses,
        "bytes per fetched chunk: GPU {gst:?}, CPU {cst:?}"
    );
    // The cpu-gather path moves the same bytes to the same slots: the same tokens.
    let gather = GenerateOptions {
        value_fetch: FetchPath::CpuGather,
        ..opts
    };
    let (g2, _) = generate_cuda(&gpu, &tok, &[request(ids.clone(), gen)], gather, true).unwrap();
    assert_eq!(
        g2[0].completion_ids, g[0].completion_ids,
        "zero-copy and cpu-gather differ"
    );
    eprintln!("RESULT shadowkv_fetch_paths equal_tokens={}", g[0].completion_ids.len());
    // A GPU value tier (small: entries replaced every step; as large as memory allows)
    // changes where the values come from, not which: the same tokens on both paths.
    for (value_fetch, gpu_tier) in [
        (FetchPath::ZeroCopy, TierSize::Chunks(16)),
        (FetchPath::CpuGather, TierSize::Chunks(16)),
        (FetchPath::ZeroCopy, TierSize::Auto),
    ] {
        let o = GenerateOptions {
            value_fetch,
            gpu_tier,
            ..opts
        };
        let (gt, ts) = generate_cuda(&gpu, &tok, &[request(ids.clone(), gen)], o, true).unwrap();
        assert_eq!(
            gt[0].completion_ids, g[0].completion_ids,
            "{value_fetch:?} with a GPU value tier of {gpu_tier} differs"
        );
        let (base, with) = (
            gs.shadow.unwrap().value_bytes_fetched,
            ts.shadow.unwrap().value_bytes_fetched,
        );
        eprintln!("RESULT shadowkv_gpu_tier {value_fetch:?} tier={gpu_tier} equal_tokens={gen} fetched={with} (no tier {base})");
        assert!(
            with < base,
            "a GPU value tier of {gpu_tier} fetched {with} bytes, {base} without"
        );
    }
    let (a, b) = (&c[0].completion_ids, &g[0].completion_ids);
    let selected = |st: Option<shadowkv::shadow::ShadowStats>| st.and_then(|s| s.hit_rate()).expect("chunks selected");
    let (gh, ch) = (selected(gs.shadow), selected(cs.shadow));
    eprintln!("GPU {gpu_secs:.1} s, hit rates GPU {gh:.3} CPU {ch:.3}");
    match parting(a, b) {
        None => eprintln!("RESULT shadowkv_vs_cpu equal_tokens={}", a.len().min(b.len())),
        Some(i) => {
            let m = cpu_margins(&cpu, &ids, a)[i];
            eprintln!("RESULT shadowkv_vs_cpu parts_at={i} cpu_margin={m:.3}");
            assert!(m < 0.5, "token {i} differs from the CPU's at a clear margin {m:.3}");
        }
    }
    assert!((gh - ch).abs() < 0.05, "hit rates GPU {gh:.3}, CPU {ch:.3}");
}

/// Micro-batches change the order of the GPU's work, not its results: three prompts of
/// different lengths decoded together give the same tokens with the attention split into
/// 1, 2 or 3 micro-batches, on both fetch paths, with and without a GPU value tier. So do
/// GPU value slots (the values of some or all of the batch in device memory, fetched by
/// the same kernel from there): the same tokens as with every value in the host pool.
#[test]
fn micro_batches_give_the_same_tokens() {
    let Some((gpu, _, tok)) = smollm2() else { return };
    let p = common::smollm2_shadow();
    let reqs: Vec<GenerateRequest> = [2600, 2000, 1500]
        .iter()
        .map(|&n| request(prompt(&tok, n), 32))
        .collect();
    let opts = GenerateOptions {
        prefill_chunk: 512,
        attention: Attention::ShadowKv(p),
        ..Default::default()
    };
    let (want, _) = generate_cuda(&gpu, &tok, &reqs, opts, true).unwrap();
    for (value_fetch, gpu_tier, micro_batches, gpu_value_slots) in [
        (FetchPath::ZeroCopy, TierSize::Off, 2, 0),
        (FetchPath::ZeroCopy, TierSize::Off, 3, 0),
        (FetchPath::CpuGather, TierSize::Off, 2, 0),
        (FetchPath::ZeroCopy, TierSize::Chunks(16), 2, 0),
        (FetchPath::CpuGather, TierSize::Chunks(16), 3, 0),
        (FetchPath::ZeroCopy, TierSize::Off, 1, 1),
        (FetchPath::ZeroCopy, TierSize::Off, 2, 2),
        (FetchPath::ZeroCopy, TierSize::Off, 1, 3),
        (FetchPath::ZeroCopy, TierSize::Chunks(16), 3, 3),
    ] {
        let o = GenerateOptions {
            value_fetch,
            gpu_tier,
            micro_batches,
            gpu_value_slots,
            ..opts
        };
        let (got, _) = generate_cuda(&gpu, &tok, &reqs, o, true).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.completion_ids, w.completion_ids,
                "request {i}: {micro_batches} micro-batches ({value_fetch:?}, tier {gpu_tier}, {gpu_value_slots} GPU \
                 value slots) differ from one"
            );
        }
        let n: usize = got.iter().map(|g| g.completion_ids.len()).sum();
        eprintln!(
            "RESULT shadowkv_micro_batches {value_fetch:?} tier={gpu_tier} micro={micro_batches} \
             gpu_value_slots={gpu_value_slots} equal_tokens={n}"
        );
    }
    // cpu-gather reads host memory only: GPU value slots with it are refused, by name.
    let o = GenerateOptions {
        value_fetch: FetchPath::CpuGather,
        gpu_value_slots: 1,
        ..opts
    };
    let e = format!("{:#}", generate_cuda(&gpu, &tok, &reqs, o, true).unwrap_err());
    assert!(e.contains("GPU value slots") && e.contains("cpu-gather"), "{e}");
}

#[test]
fn engine_with_a_prefill_lane_equals_generate_cuda() {
    let Some((gpu, _, tok)) = smollm2() else { return };
    let gpu = Arc::new(gpu);
    let tok = Arc::new(tok);
    let cfg = gpu.config().clone();
    let p = common::smollm2_shadow();
    let ids = prompt(&tok, 1200);
    let gen = 40;
    let want = alone_text(&gpu, &tok, p, &ids, gen);
    let backend = engine_backend(&gpu, p, 2);
    // Traced: the engine's steps and each lane's GPU streams; and its metrics (this
    // test binary's only recorder).
    let metrics = shadowkv::telemetry::install_prometheus().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("engine.json");
    let trace = TraceWriter::create(&trace_path, Instant::now()).unwrap();
    let (engine, join) = spawn_engine(backend, tok.clone(), engine_config(), Some(trace)).unwrap();
    let text = stream_text(submit(&engine, ids, gen)).unwrap();
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    assert_eq!(text, want);
    eprintln!("RESULT shadowkv_engine equal_text={}", text.len());
    check_gpu_tracks(&trace_path, cfg.num_layers, gen);
    // The stage histogram covers the pipeline's GPU stages (every traced step is timed).
    let text = metrics.render();
    for stage in [
        "select",
        "reconstruct",
        "transfer",
        "attention",
        "mlp",
        "sample",
        "step",
    ] {
        let line = format!("shadowkv_stage_seconds_count{{stage=\"{stage}\"}} ");
        let count: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {stage} stage in:\n{text}"))
            .trim()
            .parse()
            .unwrap();
        assert!(count > 0.0, "stage {stage} never timed");
    }
}

/// Four requests on two decode lanes beside the prefill lane (`pipeline.decode_lanes =
/// 2`: each sequence decodes on one of them, the lanes' steps side by side on streams of
/// their own): each gives what `generate_cuda` gives it alone.
#[test]
fn requests_on_two_decode_lanes_equal_each_alone() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let prompts: Vec<Vec<u32>> = [900, 600, 1100, 400].iter().map(|&n| prompt(&tok, n)).collect();
    let gen = 24;
    let want: Vec<String> = prompts.iter().map(|ids| alone_text(&gpu, &tok, p, ids, gen)).collect();
    let backend = engine_backend(&gpu, p, 4).with_decode_lanes(2).unwrap();
    assert_eq!((backend.lanes(), backend.decode_lanes()), (3, 2));
    let config = SchedulerConfig {
        max_batch: 4,
        max_queue: 4,
        ..engine_config()
    };
    let (engine, join) = spawn_engine(backend, tok.clone(), config, None).unwrap();
    let rxs: Vec<_> = prompts.iter().map(|ids| submit(&engine, ids.clone(), gen)).collect();
    for (i, (rx, want)) in rxs.into_iter().zip(&want).enumerate() {
        assert_eq!(&stream_text(rx).unwrap(), want, "request {i}");
    }
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    eprintln!("RESULT shadowkv_decode_lanes equal_requests={}", want.len());
    // A third decode lane needs the prefill lane: one lane's backend refuses it, by name.
    let pool = ValuePool::anonymous(p.pool_shape(gpu.config(), 1, ENGINE_CONTEXT)).unwrap();
    let one = CudaBackend::new(gpu.clone(), ENGINE_CONTEXT, 1, 1, true, Some((p, pool))).unwrap();
    let e = format!("{:#}", one.with_decode_lanes(2).err().expect("refused"));
    assert!(e.contains("prefill lane"), "{e}");
}

/// One request decodes while a second one's prompt is prefilled on the prefill lane and
/// compressed on the compression thread (on the compression's stream, after its last
/// chunk only; the second sitting the decode steps out until its state is in): each
/// gives what `generate_cuda` gives it alone, and the first is still decoding when the
/// second ends.
#[test]
fn a_prompt_prefilled_beside_a_decoding_request_equals_each_alone() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    // The first decodes for about 5 s. Its steps, two queued at high priority, would
    // leave the second's prefill almost no GPU (the daemon's decode-first default):
    // spaced 5 ms apart while the prefill lane has work, they leave it room to finish
    // well before the first ends.
    let (first, second) = (prompt(&tok, 400), prompt(&tok, 1500));
    let (gen_first, gen_second) = (1500, 24);
    let want_first = alone_text(&gpu, &tok, p, &first, gen_first);
    let want_second = alone_text(&gpu, &tok, p, &second, gen_second);
    let config = SchedulerConfig {
        decode_spacing: Duration::from_millis(5),
        ..engine_config()
    };
    let (engine, join) = spawn_engine(engine_backend(&gpu, p, 2), tok.clone(), config, None).unwrap();
    let mut rx = submit(&engine, first, gen_first);
    // The first request's text has begun: it decodes when the second comes.
    let mut text = match rx.blocking_recv() {
        Some(Event::Text(t)) => t,
        e => panic!("the first request's first event: {e:?}"),
    };
    let first_rx = std::thread::spawn(move || {
        let rest = stream_text(rx);
        (rest, Instant::now())
    });
    let second_text = engine_text(&engine, second, gen_second).unwrap();
    let second_done = Instant::now();
    let (rest, first_done) = first_rx.join().unwrap();
    text.push_str(&rest.unwrap());
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    assert_eq!(text, want_first);
    assert_eq!(second_text, want_second);
    assert!(
        first_done > second_done,
        "the first request ({} characters) ended before the second: they did not run side by side",
        text.len()
    );
    eprintln!(
        "RESULT shadowkv_engine_side_by_side equal_texts={}+{}",
        text.len(),
        second_text.len()
    );
}

/// Two prompts that come together (both prefilled on the prefill lane, each compressed
/// on the compression thread, the second's prefill held until the first's first decode
/// step): each gives what `generate_cuda` gives it alone.
#[test]
fn two_prompts_at_once_each_equal_generate_cuda() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let gen = 32;
    let prompts = [prompt(&tok, 1500), prompt(&tok, 700)];
    let want: Vec<String> = prompts.iter().map(|ids| alone_text(&gpu, &tok, p, ids, gen)).collect();
    let (engine, join) = spawn_engine(engine_backend(&gpu, p, 2), tok.clone(), engine_config(), None).unwrap();
    let rxs: Vec<_> = prompts.iter().map(|ids| submit(&engine, ids.clone(), gen)).collect();
    let got: Vec<String> = rxs.into_iter().map(|rx| stream_text(rx).unwrap()).collect();
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    assert_eq!(got, want);
    eprintln!(
        "RESULT shadowkv_engine_two_prompts equal_texts={}+{}",
        got[0].len(),
        got[1].len()
    );
}

/// Requests that end at their first token (`max_tokens` 1), four at once (as many as
/// the engine's batch and queue take): their
/// prompts are handed to the compression thread as their last chunks are queued, and
/// their sequences are gone before it comes to most of them (those are skipped). Each
/// gives `generate_cuda`'s token, and a request after them `generate_cuda`'s text.
#[test]
fn requests_that_end_at_their_first_token_leave_the_engine_serving() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let short: Vec<Vec<u32>> = [600, 650, 700, 750].iter().map(|&n| prompt(&tok, n)).collect();
    let want_short: Vec<String> = short.iter().map(|ids| alone_text(&gpu, &tok, p, ids, 1)).collect();
    let last = prompt(&tok, 900);
    let gen = 24;
    let want_last = alone_text(&gpu, &tok, p, &last, gen);
    let (engine, join) = spawn_engine(engine_backend(&gpu, p, 2), tok.clone(), engine_config(), None).unwrap();
    let rxs: Vec<_> = short.iter().map(|ids| submit(&engine, ids.clone(), 1)).collect();
    let got_short: Vec<String> = rxs.into_iter().map(|rx| stream_text(rx).unwrap()).collect();
    let got_last = engine_text(&engine, last, gen).unwrap();
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    assert_eq!(got_short, want_short);
    assert_eq!(got_last, want_last);
    eprintln!(
        "RESULT shadowkv_engine_first_token_ends requests={} then equal_text={}",
        got_short.len(),
        got_last.len()
    );
}

/// A shutdown as soon as a prompt's first token is out (its compression handed to the
/// compression thread as its last chunk was queued, likely still running) ends: the
/// engine thread and the compression thread are joined within a time limit, the stream
/// ends with an end, and a new engine on the same model then serves a request as
/// `generate_cuda` does (the device is fine). Twice, so that one of the shutdowns likely
/// finds the compression running.
#[test]
fn a_shutdown_with_a_compression_in_flight_ends() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let ids = prompt(&tok, 1800);
    let gen = 16;
    let want = alone_text(&gpu, &tok, p, &ids, gen);
    for _ in 0..2 {
        let (engine, join) = spawn_engine(engine_backend(&gpu, p, 1), tok.clone(), engine_config(), None).unwrap();
        let mut rx = submit(&engine, ids.clone(), gen);
        let first = rx.blocking_recv().expect("the engine ended the stream");
        assert!(matches!(first, Event::Text(_)), "{first:?}");
        shutdown_ends(&engine, join, &mut rx, Duration::from_secs(60));
    }
    let (engine, join) = spawn_engine(engine_backend(&gpu, p, 1), tok.clone(), engine_config(), None).unwrap();
    let text = engine_text(&engine, ids, gen).unwrap();
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    assert_eq!(text, want);
    eprintln!("RESULT shadowkv_compression_shutdown then_equal_text={}", text.len());
}

/// A gather that panics on its first call, then copies as rayon's threads do.
struct PanicsOnce(std::sync::atomic::AtomicBool);

impl ChunkGather for PanicsOnce {
    fn gather(&self, src: &[u8], sources: &[usize], chunk: usize, dst: &mut [u8]) -> anyhow::Result<()> {
        if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("gather thread lost");
        }
        RayonGather.gather(src, sources, chunk, dst)
    }
}

/// The engine tests' model (shared with their backend), tokenizer and ShadowKV
/// settings; `None` (the test skips) without a GPU.
fn engine_parts() -> Option<(Arc<CudaModel>, Arc<TextTokenizer>, ShadowParams)> {
    let (gpu, _, tok) = smollm2()?;
    Some((Arc::new(gpu), Arc::new(tok), common::smollm2_shadow()))
}

/// Context of the engine tests' sequences.
const ENGINE_CONTEXT: usize = 2048;

/// A ShadowKV backend on two lanes for `slots` sequences of [`ENGINE_CONTEXT`] tokens
/// (zero-copy, one micro-batch unless the test sets more).
fn engine_backend(gpu: &Arc<CudaModel>, p: ShadowParams, slots: usize) -> CudaBackend<Arc<CudaModel>> {
    let cfg = gpu.config();
    let pool = ValuePool::anonymous(p.pool_shape(cfg, slots, ENGINE_CONTEXT)).unwrap();
    CudaBackend::new(gpu.clone(), ENGINE_CONTEXT, slots, 2, true, Some((p, pool))).unwrap()
}

/// The backend reports the GPU value tier it was given (the daemon logs it at start-up):
/// none before, then its entries and at least their 8-bit values' bytes over every
/// layer, KV head and sequence.
#[test]
fn the_backend_reports_its_gpu_value_tier() {
    let Some((gpu, _, p)) = engine_parts() else { return };
    let cfg = gpu.config().clone();
    let b = engine_backend(&gpu, p, 2);
    assert_eq!(b.tier(), None);
    let (entries, bytes) = b.with_tier(TierSize::Chunks(16)).unwrap().tier().expect("a tier");
    assert_eq!(entries, 16);
    let values = entries * cfg.num_layers * cfg.num_kv_heads * 2 * p.chunk_size * cfg.head_dim;
    assert!(bytes >= values, "{bytes} bytes for {values} bytes of values");
}

/// The engine tests' scheduler: two sequences, prompts in chunks of 256.
fn engine_config() -> SchedulerConfig {
    SchedulerConfig {
        max_batch: 2,
        max_queue: 2,
        max_context: ENGINE_CONTEXT,
        prefill_chunk: 256,
        decode_spacing: Duration::ZERO,
    }
}

/// Shuts `engine` down at once and checks that its thread (`join`) ends within `limit`
/// without a panic, and that the request's stream `rx` then ends with an end (done or
/// failed).
fn shutdown_ends(
    engine: &EngineHandle,
    join: std::thread::JoinHandle<()>,
    rx: &mut UnboundedReceiver<Event>,
    limit: Duration,
) {
    engine.shutdown(Duration::ZERO);
    let (ended, end) = std::sync::mpsc::channel();
    std::thread::spawn(move || ended.send(join.join().is_ok()).unwrap());
    let ok = end
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the engine still runs {limit:?} after its shutdown"));
    assert!(ok, "the engine thread panicked");
    let mut last = None;
    while let Some(e) = rx.blocking_recv() {
        last = Some(e);
    }
    assert!(
        matches!(last, Some(Event::Failed(_)) | Some(Event::Done { .. })),
        "the request's stream ended without an end: {last:?}"
    );
}

/// Submits `prompt` (greedy, `gen` tokens) to `engine`.
fn submit(engine: &EngineHandle, prompt: Vec<u32>, gen: usize) -> UnboundedReceiver<Event> {
    engine
        .submit(EngineRequest {
            prompt,
            max_tokens: gen,
            sampling: SamplingParams::default(),
            stop: vec![],
        })
        .unwrap()
}

/// A request's stream to its end: the text, or the failure's message.
fn stream_text(mut rx: UnboundedReceiver<Event>) -> Result<String, String> {
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("the engine ended the stream") {
            Event::Text(t) => text.push_str(&t),
            Event::Done { .. } => return Ok(text),
            Event::Failed(e) => return Err(e.to_string()),
        }
    }
}

/// What `generate_cuda` gives `ids` alone with ShadowKV `p` (prompt chunks of 256, `gen`
/// greedy tokens): the engine tests' reference.
fn alone_text(gpu: &CudaModel, tok: &TextTokenizer, p: ShadowParams, ids: &[u32], gen: usize) -> String {
    let opts = GenerateOptions {
        prefill_chunk: 256,
        attention: Attention::ShadowKv(p),
        ..Default::default()
    };
    let (mut g, _) = generate_cuda(gpu, tok, &[request(ids.to_vec(), gen)], opts, true).unwrap();
    g.remove(0).text
}

/// Runs `prompt` through `engine` to its end: the text, or the failure's message.
fn engine_text(engine: &EngineHandle, prompt: Vec<u32>, gen: usize) -> Result<String, String> {
    stream_text(submit(engine, prompt, gen))
}

/// GPU value slots through the engine: a backend of one host slot and one GPU value slot
/// (zero-copy). Requests one at a time each take the GPU value slot (leased first) and
/// give it back when they end, their texts those of `generate_cuda`; two at once hold
/// both slots and both end; a request after them finds a slot again (none leaked).
#[test]
fn engine_with_a_gpu_value_slot_gives_each_slot_back() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let gen = 24;
    let prompts: Vec<Vec<u32>> = [1200, 900, 1500].iter().map(|&n| prompt(&tok, n)).collect();
    let want: Vec<String> = prompts.iter().map(|ids| alone_text(&gpu, &tok, p, ids, gen)).collect();
    let backend = engine_backend(&gpu, p, 1)
        .with_fetch(FetchPath::ZeroCopy)
        .unwrap()
        .with_value_slots(1)
        .unwrap();
    let (engine, join) = spawn_engine(backend, tok.clone(), engine_config(), None).unwrap();
    for (ids, w) in prompts.iter().zip(&want) {
        assert_eq!(&engine_text(&engine, ids.clone(), gen).unwrap(), w);
    }
    let both: Vec<_> = prompts[..2]
        .iter()
        .map(|ids| submit(&engine, ids.clone(), gen))
        .collect();
    for rx in both {
        let text = stream_text(rx).unwrap_or_else(|e| panic!("two requests in a host and a GPU value slot: {e}"));
        assert!(!text.is_empty());
    }
    assert_eq!(engine_text(&engine, prompts[2].clone(), gen).unwrap(), want[2]);
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    eprintln!("RESULT shadowkv_engine_gpu_value_slot requests=6 done");
}

/// A file-backed value pool on the GPU: the device cannot map it, so cpu-gather reads it
/// through the page cache, the compression's chunks reach it through a device stage and
/// the fold's through the actor's outbox. Through the engine (two micro-batches), each
/// request alone and two at once give the text `generate_cuda` gives each alone with the
/// pool in memory, over enough tokens to fold several chunks into the file; zero-copy
/// on it is refused by name.
#[test]
fn an_engine_with_a_file_backed_pool_equals_generate_cuda() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let gen = 56;
    let prompts: Vec<Vec<u32>> = [1200, 900].iter().map(|&n| prompt(&tok, n)).collect();
    let want: Vec<String> = prompts.iter().map(|ids| alone_text(&gpu, &tok, p, ids, gen)).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.pool");
    let backend = |gpu: &Arc<CudaModel>| {
        let pool = ValuePool::file_backed(p.pool_shape(gpu.config(), 2, ENGINE_CONTEXT), &file).unwrap();
        CudaBackend::new(gpu.clone(), ENGINE_CONTEXT, 2, 2, true, Some((p, pool))).unwrap()
    };
    let e = format!(
        "{:#}",
        backend(&gpu)
            .with_fetch(FetchPath::ZeroCopy)
            .err()
            .expect("zero-copy on a file")
    );
    assert!(e.contains("file-backed") && e.contains("cpu-gather"), "{e}");
    let (engine, join) = spawn_engine(backend(&gpu).with_micro_batches(2), tok.clone(), engine_config(), None).unwrap();
    for (ids, w) in prompts.iter().zip(&want) {
        assert_eq!(
            &engine_text(&engine, ids.clone(), gen).unwrap(),
            w,
            "one request, file-backed pool"
        );
    }
    let both: Vec<_> = prompts.iter().map(|ids| submit(&engine, ids.clone(), gen)).collect();
    for (rx, w) in both.into_iter().zip(&want) {
        assert_eq!(&stream_text(rx).unwrap(), w, "two requests at once, file-backed pool");
    }
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    eprintln!("RESULT shadowkv_file_pool_engine requests=4 equal_text=4");
}

#[test]
fn a_gather_that_panics_fails_its_request_and_the_engine_serves_on() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let ids = prompt(&tok, 1200);
    let gen = 24;
    let want = alone_text(&gpu, &tok, p, &ids, gen);
    let backend = engine_backend(&gpu, p, 2)
        .with_fetch(FetchPath::CpuGather)
        .unwrap()
        .with_gatherer(Arc::new(PanicsOnce(Default::default())));
    let (engine, join) = spawn_engine(backend, tok.clone(), engine_config(), None).unwrap();
    // The first ShadowKV step's gather panics: that request fails, naming the panic,
    // and nothing waits forever (the step's host function is released all the same).
    let first = engine_text(&engine, ids.clone(), gen);
    let e = first.expect_err("a request whose gather panicked");
    assert!(e.contains("gather thread lost"), "{e}");
    // The next request is served, through the same actor, and equals generate_cuda.
    let second = engine_text(&engine, ids, gen).expect("the engine serves on");
    assert_eq!(second, want);
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    eprintln!("RESULT shadowkv_gather_panic failed_then_equal_text={}", second.len());
}

/// cpu-gather through the engine with two micro-batches and two requests decoding
/// together: every step queued ahead holds host functions while the engine reports its
/// stats, a micro-batch's miss lists are shorter than the actor's slots, and the batch
/// grows (new scratch) while a step is in flight. Both requests end, within a time limit.
#[test]
fn an_engine_with_cpu_gather_in_micro_batches_serves_two_requests_at_once() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let backend = engine_backend(&gpu, p, 2)
        .with_fetch(FetchPath::CpuGather)
        .unwrap()
        .with_micro_batches(2);
    let (engine, join) = spawn_engine(backend, tok.clone(), engine_config(), None).unwrap();
    let gen = 40;
    let (ended, end) = std::sync::mpsc::channel();
    for n in [1200, 900] {
        let mut rx = submit(&engine, prompt(&tok, n), gen);
        let ended = ended.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let last = loop {
                match rx.blocking_recv() {
                    Some(Event::Text(t)) => text.push_str(&t),
                    e => break e,
                }
            };
            let _ = ended.send((n, text, last));
        });
    }
    for _ in 0..2 {
        let (n, text, last) = end
            .recv_timeout(Duration::from_secs(120))
            .expect("a request still runs after 120 s (a host function waits forever?)");
        assert!(
            matches!(last, Some(Event::Done { .. })),
            "the request of {n} tokens ended with {last:?}"
        );
        assert!(!text.is_empty(), "the request of {n} tokens gave no text");
    }
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
    eprintln!("RESULT shadowkv_gather_engine_micro_batches requests=2 done");
}

/// A gather that takes 20 ms a call, so that a step's gathers are still to do when the
/// engine is told to stop.
struct Slow;

impl ChunkGather for Slow {
    fn gather(&self, src: &[u8], sources: &[usize], chunk: usize, dst: &mut [u8]) -> anyhow::Result<()> {
        std::thread::sleep(Duration::from_millis(20));
        RayonGather.gather(src, sources, chunk, dst)
    }
}

#[test]
fn a_shutdown_with_gathers_in_flight_ends() {
    let Some((gpu, tok, p)) = engine_parts() else { return };
    let backend = engine_backend(&gpu, p, 2)
        .with_fetch(FetchPath::CpuGather)
        .unwrap()
        .with_gatherer(Arc::new(Slow));
    let (engine, join) = spawn_engine(backend, tok.clone(), engine_config(), None).unwrap();
    let mut rx = submit(&engine, prompt(&tok, 1200), 200);
    // Two tokens out: ShadowKV steps are decoding, each layer's gather 20 ms long.
    for _ in 0..2 {
        match rx.blocking_recv().expect("the engine ended the stream") {
            Event::Text(_) => {}
            e => panic!("before the shutdown: {e:?}"),
        }
    }
    let t0 = Instant::now();
    // A host function waiting forever would keep the engine from ending.
    shutdown_ends(&engine, join, &mut rx, Duration::from_secs(120));
    eprintln!(
        "RESULT shadowkv_gather_shutdown ended_after_s={:.2}",
        t0.elapsed().as_secs_f64()
    );
}

/// The engine's trace holds its lanes' GPU streams: on the decoding lane's compute
/// track two `attention` spans per layer and ShadowKV step (every step but the first
/// token's: the rows whose values are in, beside the fetch, then the fetched rows),
/// with the other stages; on its fetch track one `fetch` per layer and step
/// (zero-copy); every span inside the run.
fn check_gpu_tracks(path: &std::path::Path, layers: usize, gen: usize) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ev = v.as_array().unwrap();
    let tid_of = |name: &str| {
        ev.iter()
            .find(|e| e["ph"] == "M" && e["args"]["name"] == name)
            .and_then(|e| e["tid"].as_u64())
    };
    let count = |tid: u64, name: &str| {
        ev.iter()
            .filter(|e| e["ph"] == "X" && e["tid"] == tid && e["name"] == name)
            .count()
    };
    let (compute, fetch) = (0..2)
        .filter_map(|lane| {
            let c = tid_of(&format!("lane {lane} GPU compute"))?;
            (count(c, "attention") > 0).then(|| (c, tid_of(&format!("lane {lane} GPU fetch"))))
        })
        .next()
        .expect("a lane's GPU compute track with attention spans");
    let steps = count(compute, "attention") / (2 * layers);
    assert_eq!(count(compute, "attention"), 2 * steps * layers, "whole steps");
    assert!(
        steps + 1 >= gen - 1 && steps < gen,
        "{steps} ShadowKV steps for {gen} tokens"
    );
    // `mlp` is the dense work before each layer's selection but the first's, and the
    // last layer's after its attention; then each step's `sample`.
    for stage in ["scores", "top-k", "reuse", "reconstruct"] {
        assert!(count(compute, stage) >= steps * (layers - 1), "{stage}");
    }
    assert_eq!(count(compute, "mlp"), steps * layers, "mlp");
    assert_eq!(count(compute, "sample"), steps, "sample");
    let fetch = fetch.expect("a GPU fetch track (zero-copy)");
    assert_eq!(count(fetch, "fetch"), steps * layers);
    let end = ev.iter().filter_map(|e| e["ts"].as_f64()).fold(0.0, f64::max);
    for e in ev.iter().filter(|e| e["ph"] == "X") {
        let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        assert!(ts >= 0.0 && dur >= 0.0 && ts + dur <= end + 1e6, "{e}");
    }
    eprintln!("RESULT shadowkv_engine_trace gpu_steps={steps}");
}

/// Mean score and mean hit rate of one method's results.
fn method_means(results: &[SampleResult], method: &str) -> (f64, Option<f64>) {
    let mine: Vec<&SampleResult> = results.iter().filter(|r| r.method == method).collect();
    let score = mine.iter().map(|r| r.score).sum::<f64>() / mine.len() as f64;
    let rates: Vec<f64> = mine.iter().filter_map(|r| r.reuse_hit_rate).collect();
    let rate = (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64);
    (score, rate)
}

#[test]
fn eval_ruler_on_the_gpu_scores_like_the_cpu() {
    let Some((gpu, cpu, tok)) = smollm2() else { return };
    let m = open_model(common::test_model().to_str().unwrap()).unwrap();
    let chat = m.chat_template.as_ref();
    let plan = RulerPlan {
        tasks: vec![Task::NiahSingle, Task::NiahMultikey],
        lengths: vec![2048],
        samples: 3,
        haystacks: vec![Haystack::Noise, Haystack::Essay],
        seed: 0,
        prefill_chunk: 512,
    };
    let methods = || {
        let cfg = cpu.config().clone();
        vec![
            MethodSpec {
                label: "full".into(),
                attention: Box::new(|_| Ok(Attention::Full)),
            },
            MethodSpec {
                label: "shadowkv".into(),
                attention: Box::new(move |ctx| Ok(Attention::ShadowKv(ShadowParams::defaults(&cfg, ctx)))),
            },
        ]
    };
    let t0 = Instant::now();
    let on_cpu = run_ruler(&mut EvalModel::Cpu(&cpu), &tok, chat, &plan, &methods(), false, |_| {
        Ok(())
    })
    .unwrap();
    let cpu_secs = t0.elapsed().as_secs_f64();
    // The GPU prefills in larger chunks, as `eval ruler --backend cuda` does.
    let gpu_plan = RulerPlan {
        prefill_chunk: 2048,
        ..plan.clone()
    };
    let t0 = Instant::now();
    let on_gpu = run_ruler(
        &mut EvalModel::Cuda {
            model: &gpu,
            fetch: FetchPath::ZeroCopy,
            tier: TierSize::Off,
            graphs: true,
        },
        &tok,
        chat,
        &gpu_plan,
        &methods(),
        false,
        |_| Ok(()),
    )
    .unwrap();
    let gpu_secs = t0.elapsed().as_secs_f64();
    assert_eq!(on_cpu.len(), on_gpu.len());
    // The comparison means something only where full attention finds the needles.
    let (cpu_full, _) = method_means(&on_cpu, "full");
    assert!(
        cpu_full >= 0.5,
        "full attention on the CPU scores {cpu_full:.3}: the plan is too hard to compare on"
    );
    for method in ["full", "shadowkv"] {
        let (cs, cr) = method_means(&on_cpu, method);
        let (gs, gr) = method_means(&on_gpu, method);
        eprintln!("eval {method}: score cpu {cs:.3} gpu {gs:.3}, hit rate cpu {cr:?} gpu {gr:?}");
        // 12 samples of the same prompts: the bf16 GPU may flip a borderline one or two.
        assert!((cs - gs).abs() <= 0.2, "{method}: cpu {cs:.3}, gpu {gs:.3}");
        match (cr, gr) {
            (Some(c), Some(g)) => assert!((c - g).abs() <= 0.05, "{method}: hit rate cpu {c:.3}, gpu {g:.3}"),
            (None, None) => assert_eq!(method, "full"),
            other => panic!("{method}: hit rates {other:?}"),
        }
    }
    eprintln!(
        "eval: cpu {cpu_secs:.1} s, gpu {gpu_secs:.1} s ({:.1}x)",
        cpu_secs / gpu_secs
    );
}
