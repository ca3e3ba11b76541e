//! `CudaModel::compress_shadow` against its stages run one after another on one stream.
//! The compression runs the landmarks, outliers, exact rows and pool write on a side
//! stream beside the factorisation, and times its stages when asked: neither may change
//! a bit of the state it makes (the same kernels and cuBLAS calls on the same inputs, so
//! the comparison is exact), nor may factorising the layers on several worker streams at
//! once, with a workspace made on first use or by `prepare`. Synthetic weights made on
//! the GPU, six layers of
//! Llama-3.1-8B's shape (1024 wide: the randomised factorisation) and of SmolLM2's (192:
//! the exact one), prompts of a few thousand tokens. Without a GPU the test prints that it
//! skipped.

use half::bf16;
use shadowkv::cuda::shadow::CompressStage;
use shadowkv::cuda::shadow::{CompressWorkspace, FactorWorkspace, GpuValuePool, LayerBuffers, ShadowLayout};
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::{CudaModel, CudaOps};
use shadowkv::model::synthetic::preset;
use shadowkv::pool::ValuePool;
use shadowkv::shadow::ShadowParams;

/// Every buffer of a layer as bits, by name.
fn layer_bits(ops: &CudaOps, b: &LayerBuffers) -> Vec<(&'static str, Vec<u32>)> {
    let dev = ops.device();
    let bf = |x: &cudarc::driver::CudaSlice<bf16>| -> Vec<u32> {
        dev.download(x).unwrap().iter().map(|v| v.to_bits() as u32).collect()
    };
    vec![
        (
            "marks",
            dev.download(&b.marks)
                .unwrap()
                .iter()
                .map(|&v| v as u8 as u32)
                .collect(),
        ),
        (
            "mark_scales",
            dev.download(&b.mark_scales)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
        ),
        (
            "outlier",
            dev.download(&b.outlier).unwrap().iter().map(|&v| v as u32).collect(),
        ),
        (
            "u",
            dev.download(&b.u).unwrap().iter().map(|&v| v as u8 as u32).collect(),
        ),
        (
            "u_scales",
            dev.download(&b.u_scales).unwrap().iter().map(|v| v.to_bits()).collect(),
        ),
        ("sv", dev.download(&b.sv).unwrap().iter().map(|v| v.to_bits()).collect()),
        (
            "slots",
            dev.download(&b.slots).unwrap().iter().map(|&v| v as u32).collect(),
        ),
        ("ak", bf(&b.ak)),
        ("av", bf(&b.av)),
        ("kpre", bf(&b.kpre)),
    ]
}

/// The whole host memory of a pool, once the device is done with it.
fn pool_bytes(ops: &CudaOps, pool: &GpuValuePool) -> Vec<u8> {
    ops.device().synchronize().unwrap();
    // SAFETY: the device's writes are done (synchronised above, and the compressions
    // joined their side stream into this stream) and nothing writes the pool now.
    unsafe { std::slice::from_raw_parts(pool.pool().base_ptr(), pool.pool().bytes()) }.to_vec()
}

#[test]
fn side_stream_workers_and_stage_timing_make_the_state_one_stream_makes() {
    for (arch, tokens) in [("llama-3.1-8b", 3000 + 5), ("smollm2-135m", 2000 + 3)] {
        let Some(ops) = ops_or_skip() else { return };
        let mut cfg = preset(arch).unwrap();
        // More layers than factorisation workers: a worker takes several.
        cfg.num_layers = 6;
        let model = CudaModel::synthetic(ops, cfg.clone(), 7, false).unwrap();
        let ops = model.ops();
        let ids: Vec<u32> = (0..tokens)
            .map(|i| ((i * 7919 + 13) % (cfg.vocab_size - 1)) as u32)
            .collect();
        let mut dense = model.new_cache_pre_rope(tokens).unwrap();
        model.prefill(&mut dense, &ids, 1024, |_| {}).unwrap();
        let p = ShadowParams::defaults(&cfg, tokens);
        let layout = ShadowLayout::new(&cfg, &p, tokens + 8).unwrap();
        let new_pool = || {
            let shape = GpuValuePool::shape_for(&layout, cfg.num_layers, 1);
            GpuValuePool::new(ops, ValuePool::anonymous(shape).unwrap()).unwrap()
        };
        let case = format!(
            "{arch}, {tokens} tokens, kv width {}, rank {}",
            layout.kv_width(),
            layout.rank
        );

        // The stages one after another on the model's stream, as the compression ran
        // them before it had a side stream.
        let ref_pool = new_pool();
        let lease = ref_pool.lease().unwrap();
        let counts = layout.prefill_counts(tokens, lease.seq());
        let sparse = counts.chunks as usize * layout.chunk;
        let dev = ops.device();
        let mut neg_cos = dev.zeros::<f32>(layout.kv_heads * layout.chunk_cap).unwrap();
        let mut out_ids = dev.zeros::<i32>((layout.kv_heads * layout.outliers).max(1)).unwrap();
        let mut fws = FactorWorkspace::new();
        let mut want = Vec::new();
        for l in 0..cfg.num_layers {
            let mut b = LayerBuffers::new(ops, layout).unwrap();
            let (k, v, pre) = dense.layer(&model, l);
            let pre = pre.unwrap();
            let (kvd, rank) = (layout.kv_width(), layout.rank);
            let u = (&mut b.u, &mut b.u_scales);
            ops.shadow_factorize(&pre, tokens, kvd, rank, sparse, &mut b.sv, u, &mut fws)
                .unwrap();
            ops.shadow_landmarks(&b, &k, tokens, &mut neg_cos).unwrap();
            ops.shadow_outliers(&b, &neg_cos, tokens, &mut out_ids).unwrap();
            ops.shadow_place_prefill(&b, (&k, &v, &pre), tokens, &out_ids).unwrap();
            // SAFETY: the pool is registered and its one slot leased here; read after a
            // synchronisation.
            unsafe { ops.shadow_pool_write(&layout, &ref_pool.device(), (l, lease.seq()), &v, tokens) }.unwrap();
            want.push(layer_bits(ops, &b));
        }
        let want_pool = pool_bytes(ops, &ref_pool);

        // The compression, timed, then again untimed with the same workspace.
        let mut ws = CompressWorkspace::default();
        ws.time_stages(true);
        if arch == "llama-3.1-8b" {
            ws.prepare(ops, &layout).unwrap();
        }
        for timed in [true, false] {
            if !timed {
                ws.time_stages(false);
            }
            let pool = new_pool();
            let seq = model.compress_shadow(ops, &dense, &layout, &pool, &mut ws).unwrap();
            assert_eq!(seq.counts(), counts, "{case}");
            for (l, want) in want.iter().enumerate() {
                for ((name, got), (_, want)) in layer_bits(ops, seq.layer(l)).iter().zip(want) {
                    let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
                    assert!(
                        bad == 0,
                        "{case}, timed {timed}: layer {l}'s {name} differs at {bad} of {} places",
                        want.len()
                    );
                }
            }
            assert!(
                pool_bytes(ops, &pool) == want_pool,
                "{case}, timed {timed}: the pool's values differ"
            );
            let times = ws.take_times().unwrap();
            if !timed {
                assert_eq!(times.compressions, 0, "{case}: timing off");
                continue;
            }
            eprintln!("{case}: {:?}", times.per_compression());
            assert_eq!(times.compressions, 1, "{case}");
            use CompressStage::*;
            for stage in [
                Alloc,
                Gram,
                Eigenvectors,
                Coefficients,
                Landmarks,
                Outliers,
                Place,
                PoolWrite,
                SideIdle,
                SideTail,
            ] {
                let ms = times.stage_ms.iter().find(|(s, _)| *s == stage).map(|s| s.1);
                assert!(
                    ms.is_some_and(|ms| ms.is_finite() && ms >= 0.0),
                    "{case}: stage {} timed {ms:?}",
                    stage.name()
                );
            }
            // The host's part of the eigenvectors happened inside their span on the
            // stream (the device waited for it); the two clocks differ by microseconds.
            let eigen = times.stage_ms.iter().find(|(s, _)| *s == Eigenvectors).unwrap().1;
            assert!(
                times.eigen_host_ms > 0.0 && times.eigen_host_ms <= eigen + 0.5,
                "{case}: host {} ms of eigenvectors taking {eigen} ms",
                times.eigen_host_ms
            );
        }
    }
}
