//! Micro-benchmarks of the CUDA kernels, ignored by default (they need a GPU and a few
//! GiB of device memory):
//!
//!   cargo test --release --test cuda_bench -- --ignored --nocapture
//!
//! Times are medians over repeated launches timed with CUDA events, after warm-up; the
//! inputs are random (made on the device) and several times larger than the L2 cache.
//! Each benchmark prints `BENCH <name> ...` lines.

use cudarc::driver::CudaSlice;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shadowkv::cpu::attention::AttnShape;
use shadowkv::cuda::attention::partition_len;
use shadowkv::cuda::shadow::{LayerBuffers, ShadowLayout};
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::{CudaOps, DecodePass, DecodeWorkspace, KvTable, PendingSlots};

/// The HBM bound the design quotes for the H200 (device-to-device copy, bytes read +
/// written).
const HBM_GBS: f64 = 4300.0;

/// Median of `reps` timings (ms) of `f`, each bracketed by events, after `warm` runs.
fn time_ms(ops: &CudaOps, warm: usize, reps: usize, f: impl FnMut()) -> (f64, f64, f64) {
    time_ms_after(ops, warm, reps, || {}, f)
}

/// As `time_ms`, with `before` queued ahead of each timed run, outside its events.
fn time_ms_after(
    ops: &CudaOps,
    warm: usize,
    reps: usize,
    mut before: impl FnMut(),
    mut f: impl FnMut(),
) -> (f64, f64, f64) {
    let dev = ops.device();
    for _ in 0..warm {
        f();
    }
    dev.synchronize().unwrap();
    let (start, end) = (dev.event(true).unwrap(), dev.event(true).unwrap());
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        before();
        start.record(dev.stream()).unwrap();
        f();
        end.record(dev.stream()).unwrap();
        end.synchronize().unwrap();
        t.push(start.elapsed_ms(&end).unwrap() as f64);
    }
    dev.synchronize().unwrap();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[reps / 2], t[0], t[reps - 1])
}

/// `batch` sequences' keys and values of `len` elements each, random on the device.
fn random_kv(ops: &CudaOps, batch: usize, len: usize) -> Vec<(CudaSlice<bf16>, CudaSlice<bf16>)> {
    let dev = ops.device();
    (0..batch)
        .map(|b| {
            let mut k = dev.zeros::<bf16>(len).unwrap();
            let mut v = dev.zeros::<bf16>(len).unwrap();
            ops.fill_random_bf16(&mut k, 2 * b as u64 + 10, 1.0).unwrap();
            ops.fill_random_bf16(&mut v, 2 * b as u64 + 11, 1.0).unwrap();
            (k, v)
        })
        .collect()
}

/// One layer of Llama-3.1-8B's heads under ShadowKV (8 KV heads of 128, groups of 4,
/// chunks of 8 tokens, 256 slots) at `rank` over `chunks` chunks.
fn llama8b_layer(rank: usize, chunks: usize) -> ShadowLayout {
    let l = ShadowLayout {
        kv_heads: 8,
        head_dim: 128,
        group: 4,
        chunk: 8,
        rank,
        slots: 256,
        outliers: 2,
        local: 2,
        chunk_cap: chunks + 2,
        tier: 0,
    };
    l.validate().unwrap();
    l
}

/// `batch` sequences' buffers of layout `l`, each given to `fill` with its index.
fn layer_buffers(
    ops: &CudaOps,
    l: ShadowLayout,
    batch: usize,
    fill: impl Fn(&mut LayerBuffers, u64) -> anyhow::Result<()>,
) -> Vec<LayerBuffers> {
    (0..batch)
        .map(|b| {
            let mut buf = LayerBuffers::new(ops, l).unwrap();
            fill(&mut buf, b as u64).unwrap();
            buf
        })
        .collect()
}

#[test]
#[ignore = "benchmark: needs a GPU"]
fn hbm_copy_ceiling() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let n = 1usize << 31; // 2 Gi bf16 = 4 GiB
    let mut a = dev.zeros::<bf16>(n).unwrap();
    let mut b = dev.zeros::<bf16>(n).unwrap();
    ops.fill_random_bf16(&mut a, 1, 1.0).unwrap();
    let s = dev.stream().clone();
    let (med, lo, hi) = time_ms(&ops, 3, 20, || s.memcpy_dtod(&a, &mut b).unwrap());
    let gbs = 2.0 * (n * 2) as f64 / (med * 1e-3) / 1e9;
    eprintln!(
        "BENCH hbm_copy bytes={} median_ms={med:.3} min_ms={lo:.3} max_ms={hi:.3} GB/s={gbs:.0} (read+write)",
        n * 2
    );
}

#[test]
#[ignore = "benchmark: needs a GPU"]
fn flash_decode_bandwidth() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    // Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128; batch 8.
    let shape = AttnShape {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    // And a ShadowKV step's attention at 29 × 61440: each (sequence, KV head) one entry of
    // its 1280 attended rows and 4 query heads.
    let shadow = AttnShape {
        heads: 4,
        kv_heads: 1,
        head_dim: 128,
    };
    for (shape, batch, ctx) in [
        (shape, 8usize, 32_768usize),
        (shape, 8, 131_072),
        (shape, 1, 61_440),
        (shape, 1, 124_928),
        (shadow, 232, 1280),
    ] {
        let kvd = shape.kv_heads * shape.head_dim;
        let kv = random_kv(&ops, batch, ctx * kvd);
        let mut q = dev.zeros::<bf16>(batch * shape.heads * shape.head_dim).unwrap();
        ops.fill_random_bf16(&mut q, 7, 3.0).unwrap();
        let mut out = dev.zeros::<bf16>(batch * shape.heads * shape.head_dim).unwrap();
        let seqs: Vec<_> = kv.iter().map(|(k, v)| (k, v, ctx)).collect();
        let table = KvTable::new(&ops, &seqs, kvd).unwrap();
        let mut ws = DecodeWorkspace::new();
        let auto = partition_len(batch, shape.kv_heads, ctx, ops.decode_slots());
        let kv_bytes = (batch * ctx * kvd * 2 * 2) as f64;
        for part in [auto, 128, 256, 512, 1024] {
            let (med, lo, hi) = time_ms(&ops, 5, 30, || {
                ops.flash_decode_with_partition(&mut out, &q, &table, shape, &mut ws, part)
                    .unwrap()
            });
            let parts = ctx.div_ceil(part);
            let partial_bytes = (batch * shape.heads * parts * (shape.head_dim + 2) * 4 * 2) as f64;
            let gbs = kv_bytes / (med * 1e-3) / 1e9;
            let all = (kv_bytes + partial_bytes) / (med * 1e-3) / 1e9;
            eprintln!(
                "BENCH flash_decode ctx={ctx} batch={batch} heads={}/{} d=128 part={part}{} kv_bytes={:.3e} \
                 median_ms={med:.3} min_ms={lo:.3} max_ms={hi:.3} kv_GB/s={gbs:.0} all_GB/s={all:.0} \
                 of_4.3TB/s={:.1}% bound_ms={:.3}",
                shape.heads,
                shape.kv_heads,
                if part == auto { "(auto)" } else { "" },
                kv_bytes,
                100.0 * gbs / HBM_GBS,
                kv_bytes / (HBM_GBS * 1e9) * 1e3
            );
        }
        let got = dev.download(&out).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "non-finite output at ctx {ctx}");
    }
}

/// A ShadowKV step's attention in two passes, at the step's shape on the H200 (58
/// sequences × 8 KV heads at 61440 tokens: 1312 rows an entry, 288 bf16 (the recent
/// window and the outliers) then its 128 slots' chunks of 8 in 8 bits, 4 query heads),
/// with `pending` of each entry's slots fetched while
/// the first pass runs: the whole attention in one pass, each pass alone, both.
#[test]
#[ignore = "benchmark: needs a GPU"]
fn flash_decode_two_pass_throughput() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let shape = AttnShape {
        heads: 4,
        kv_heads: 1,
        head_dim: 128,
    };
    let (entries, dense, chunks, chunk, slots) = (464usize, 288usize, 128usize, 8usize, 128usize);
    let rows = dense + chunks * chunk;
    let kv = random_kv(&ops, entries, rows * shape.head_dim);
    let mut q = dev.zeros::<bf16>(entries * shape.heads * shape.head_dim).unwrap();
    ops.fill_random_bf16(&mut q, 7, 3.0).unwrap();
    let mut out = dev.zeros::<bf16>(entries * shape.heads * shape.head_dim).unwrap();
    let seqs: Vec<_> = kv.iter().map(|(k, v)| (k, v, rows)).collect();
    let table = KvTable::new(&ops, &seqs, shape.head_dim)
        .unwrap()
        .with_value_chunks(&ops, &vec![dense; entries], chunk)
        .unwrap();
    let auto = partition_len(entries, 1, rows, ops.decode_slots());
    let mut ws = DecodeWorkspace::new();
    let mut rng = StdRng::seed_from_u64(11);
    // The step's partitions at every pending count; others at 30 pending slots.
    let cases = [0usize, 15, 30, 60]
        .map(|p| (p, auto))
        .into_iter()
        .chain([256usize, 320, 384, 512, 640, 704, 1024].map(|l| (30, l)));
    for (pending, part) in cases {
        // Each entry's list: `pending` distinct slots, then -1.
        let mut list = vec![-1i32; entries * slots * 2];
        for e in 0..entries {
            let mut order: Vec<usize> = (0..chunks).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            for (j, &k) in order[..pending].iter().enumerate() {
                list[(e * slots + j) * 2] = k as i32;
                list[(e * slots + j) * 2 + 1] = j as i32;
            }
        }
        let dlist = dev.upload(&list).unwrap();
        let dcount = dev.upload(&vec![pending as i32; entries]).unwrap();
        let pend = PendingSlots {
            list: &dlist,
            count: &dcount,
            slots,
        };
        let mut run = |pass: Option<DecodePass>| match pass {
            Some(p) => ops
                .flash_decode_pass(&mut out, &q, &table, shape, &mut ws, part, p)
                .unwrap(),
            None => ops
                .flash_decode_with_partition(&mut out, &q, &table, shape, &mut ws, part)
                .unwrap(),
        };
        let (whole, ..) = time_ms(&ops, 5, 50, || run(None));
        let (ready, ..) = time_ms(&ops, 5, 50, || run(Some(DecodePass::Ready(pend))));
        let (second, ..) = time_ms(&ops, 5, 50, || run(Some(DecodePass::Pending(pend))));
        let (both, ..) = time_ms(&ops, 5, 50, || {
            run(Some(DecodePass::Ready(pend)));
            run(Some(DecodePass::Pending(pend)));
        });
        let got = dev.download(&out).unwrap();
        assert!(
            got.iter().all(|x| x.to_f32().is_finite()),
            "non-finite output, {pending} pending"
        );
        // Bytes: every row's bf16 key; the dense rows' bf16 values, the chunks' 8-bit ones.
        let d = shape.head_dim;
        let chunk_bytes = (chunk * d + 4 * chunk) as f64;
        let all = (entries * (rows * d * 2 + dense * d * 2)) as f64 + (entries * chunks) as f64 * chunk_bytes;
        let late = (entries * pending) as f64 * (chunk * d * 2) as f64 + (entries * pending) as f64 * chunk_bytes;
        let ms = |b: f64| b / (HBM_GBS * 1e9) * 1e3;
        eprintln!(
            "BENCH flash_decode_two_pass entries={entries} rows={rows} dense={dense} chunk={chunk} pending_slots={pending} \
             part={part}{} whole_ms={whole:.4} ready_ms={ready:.4} pending_ms={second:.4} both_ms={both:.4} \
             whole_bound_ms={:.4} pending_bound_ms={:.4}",
            if part == auto { "(auto)" } else { "" },
            ms(all),
            ms(late)
        );
    }
}

#[test]
#[ignore = "benchmark: needs a GPU"]
fn linear_decode_bandwidth() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    // Llama-3.1-8B's decode products: qkv, o, gate|up, down and the output head, at 1,
    // 2, 8, 16, 29 and 57 rows (57: the tier step's batch at 61440); up to GEMV_MAX_M rows
    // with the GEMV kernel and with cuBLAS.
    let shapes = [
        (4096usize, 6144usize),
        (4096, 4096),
        (4096, 28_672),
        (14_336, 4096),
        (4096, 128_256),
    ];
    for &m in &[1usize, 2, 8, 16, 29, 57] {
        for &(k, n) in &shapes {
            let mut x = dev.zeros::<bf16>(m * k).unwrap();
            let mut w = dev.zeros::<bf16>(n * k).unwrap();
            let mut out = dev.zeros::<bf16>(m * n).unwrap();
            ops.fill_random_bf16(&mut x, 1, 1.0).unwrap();
            ops.fill_random_bf16(&mut w, 2, 0.02).unwrap();
            for gemv in [true, false] {
                if !gemv && m > shadowkv::cuda::ops::GEMV_MAX_M {
                    continue;
                }
                ops.set_gemv(gemv);
                let (med, lo, hi) = time_ms(&ops, 5, 50, || ops.linear(&mut out, &x, &w, m, k, n, false).unwrap());
                let bytes = ((n * k + m * k + m * n) * 2) as f64;
                let gbs = bytes / (med * 1e-3) / 1e9;
                eprintln!(
                    "BENCH linear m={m} k={k} n={n} {} median_ms={med:.4} min_ms={lo:.4} max_ms={hi:.4} GB/s={gbs:.0} \
                     of_4.3TB/s={:.1}%",
                    if m > shadowkv::cuda::ops::GEMV_MAX_M {
                        "cublas"
                    } else if gemv {
                        "gemv"
                    } else {
                        "cublas"
                    },
                    100.0 * gbs / HBM_GBS
                );
            }
            ops.set_gemv(true);
        }
    }
}

/// How the decode step's memory-bound kernels scale with the multiprocessors they may
/// use: flash-decoding over 16 sequences of 8192 tokens and the gate|up product at 16
/// rows, each on a partition of the GPU (a green context, as `limits.prefill_sms` leaves
/// the decode lane the rest) and on the whole GPU.
#[test]
#[ignore = "benchmark: needs a GPU"]
fn decode_bandwidth_by_sms() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let total = dev.info().sm_count;
    let split = shadowkv::cuda::green::sm_split(dev.context()).unwrap();
    let shape = AttnShape {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    let kvd = shape.kv_heads * shape.head_dim;
    let (batch, ctx) = (16usize, 8192usize);
    let kv = random_kv(&ops, batch, ctx * kvd);
    let mut q = dev.zeros::<bf16>(batch * shape.heads * shape.head_dim).unwrap();
    ops.fill_random_bf16(&mut q, 7, 3.0).unwrap();
    let (m, k, n) = (16usize, 4096usize, 28_672usize);
    let mut x = dev.zeros::<bf16>(m * k).unwrap();
    let mut w = dev.zeros::<bf16>(n * k).unwrap();
    ops.fill_random_bf16(&mut x, 1, 1.0).unwrap();
    ops.fill_random_bf16(&mut w, 2, 0.02).unwrap();
    dev.synchronize().unwrap();
    let kv_bytes = (batch * ctx * kvd * 2 * 2) as f64;
    let w_bytes = ((n * k + m * k + m * n) * 2) as f64;
    let sizes: Vec<u32> = [8u32, 16, 24, 32, 48, 64, 96, 120]
        .into_iter()
        .filter(|&s| split.round(s) == Ok(s))
        .collect();
    for sms in sizes.into_iter().map(Some).chain([None]) {
        let part = match sms {
            Some(s) => ops.fork_on_sms(shadowkv::cuda::StreamPriority::Normal, s).unwrap(),
            None => ops.fork(shadowkv::cuda::StreamPriority::Normal).unwrap(),
        };
        let pd = part.device();
        let seqs: Vec<_> = kv.iter().map(|(kb, vb)| (kb, vb, ctx)).collect();
        let table = KvTable::new(&part, &seqs, kvd).unwrap();
        let mut ws = DecodeWorkspace::new();
        let mut out = pd.zeros::<bf16>(batch * shape.heads * shape.head_dim).unwrap();
        let mut lin = pd.zeros::<bf16>(m * n).unwrap();
        pd.synchronize().unwrap();
        let (att, _, _) = time_ms(&part, 3, 20, || {
            part.flash_decode(&mut out, &q, &table, shape, &mut ws).unwrap()
        });
        let (gemm, _, _) = time_ms(&part, 3, 20, || part.linear(&mut lin, &x, &w, m, k, n, false).unwrap());
        let got = pd.download(&out).unwrap();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "non-finite attention output on {sms:?} SMs"
        );
        eprintln!(
            "BENCH decode_by_sms sms={} of {total} flash_decode_ms={att:.3} kv_GB/s={:.0} linear_m16_ms={gemm:.3} \
             linear_GB/s={:.0}",
            pd.info().sm_count,
            kv_bytes / (att * 1e-3) / 1e9,
            w_bytes / (gemm * 1e-3) / 1e9
        );
    }
}

#[test]
#[ignore = "benchmark: needs a GPU"]
fn flash_prefill_throughput() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    // Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128; one sequence,
    // causal prefill: the whole context in one call, and the last 4096-row chunk of 32K.
    let shape = AttnShape {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    let (qd, kvd, d) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.head_dim,
    );
    for &(ctx, rows) in &[(8192usize, 8192usize), (32_768, 32_768), (32_768, 4096)] {
        let mut k = dev.zeros::<bf16>(ctx * kvd).unwrap();
        let mut v = dev.zeros::<bf16>(ctx * kvd).unwrap();
        let mut q = dev.zeros::<bf16>(rows * qd).unwrap();
        let mut out = dev.zeros::<bf16>(rows * qd).unwrap();
        ops.fill_random_bf16(&mut k, 21, 1.0).unwrap();
        ops.fill_random_bf16(&mut v, 22, 1.0).unwrap();
        ops.fill_random_bf16(&mut q, 23, 3.0).unwrap();
        let table = KvTable::new(&ops, &[(&k, &v, ctx)], kvd).unwrap();
        // Causal (query, key) pairs: query i of the chunk sits at ctx - rows + i and sees
        // that many keys plus one. Two products of 2·d FLOPs per pair and head.
        let start = ctx - rows;
        let pairs = (rows * start + rows * (rows + 1) / 2) as f64;
        let flops = 4.0 * d as f64 * shape.heads as f64 * pairs;
        let (med, lo, hi) = time_ms(&ops, 3, 15, || {
            ops.flash_prefill(&mut out, &q, &table, &[rows], shape).unwrap()
        });
        eprintln!(
            "BENCH flash_prefill ctx={ctx} rows={rows} heads=32/8 d=128 median_ms={med:.3} min_ms={lo:.3} \
             max_ms={hi:.3} TFLOP/s={:.1} (best {:.1})",
            flops / (med * 1e-3) / 1e12,
            flops / (lo * 1e-3) / 1e12
        );
        let got = dev.download(&out).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "non-finite output at ctx {ctx}");
    }
}

#[test]
#[ignore = "benchmark: needs a GPU"]
fn shadow_selection_bandwidth() {
    use shadowkv::cuda::shadow::{SeqCounts, ShadowTable, StepScratch};
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    // Llama-3.1-8B's heads (8 KV heads of 128, groups of 4), chunks of 8 tokens, a
    // budget of 256 chunks: the bench's batches at 124928 and 61440 tokens (without a
    // GPU value tier, and with it: 28 and 57), and one sequence.
    for (batch, chunks) in [
        (14usize, 15_616usize),
        (28, 15_616),
        (29, 7_680),
        (57, 7_680),
        (1, 15_616),
    ] {
        let l = llama8b_layer(16, chunks);
        // 8-bit landmarks: codes over their range, scales of 1/127 (values within ±1).
        let bufs = layer_buffers(&ops, l, batch, |buf, b| {
            let mut rng = StdRng::seed_from_u64(11 + b);
            let codes: Vec<i8> = (0..l.marks_len()).map(|_| rng.random_range(-127..=127)).collect();
            buf.marks = dev.upload(&codes)?;
            buf.mark_scales = dev.upload(&vec![1.0f32 / 127.0; l.mark_scales_len()])?;
            Ok(())
        });
        let counts = SeqCounts {
            chunks: chunks as i32,
            recent: 0,
            outliers: 0,
            pool_seq: 0,
        };
        let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs.iter().map(|b| (b, counts)).collect();
        let table = ShadowTable::new(&ops, &entries).unwrap();
        let mut q = dev.zeros::<bf16>(batch * l.kv_heads * l.group * l.head_dim).unwrap();
        ops.fill_random_bf16(&mut q, 5, 3.0).unwrap();
        let mut scratch = StepScratch::new(&ops, &l, batch).unwrap();
        let (med, lo, hi) = time_ms(&ops, 3, 30, || ops.shadow_scores(&table, &q, &mut scratch).unwrap());
        let marks = (batch * chunks * l.kv_heads * (l.head_dim + 4)) as f64;
        let gbs = marks / (med * 1e-3) / 1e9;
        eprintln!(
            "BENCH shadow_logits batch={batch} chunks={chunks} kv_heads=8 d=128 group=4 landmark_bytes={marks:.3e} \
             median_ms={med:.4} min_ms={lo:.4} max_ms={hi:.4} GB/s={gbs:.0} of_hbm={:.2}",
            gbs / HBM_GBS
        );
        // The softmax over the logits and the top-k, one kernel.
        let (med, lo, hi) = time_ms(&ops, 3, 30, || ops.shadow_select(&table, &mut scratch, false).unwrap());
        eprintln!(
            "BENCH shadow_select batch={batch} chunks={chunks} kv_heads=8 slots=256 median_ms={med:.4} min_ms={lo:.4} \
             max_ms={hi:.4}"
        );
    }
}

#[test]
#[ignore = "benchmark: needs a GPU"]
fn shadow_rebuild_throughput() {
    let Some(ops) = ops_or_skip() else { return };
    // One layer of the bench's step at 124928 tokens: 14 sequences of Llama-3.1-8B's
    // heads, rank 160, chunks of 8, 256 slots of which 232 miss (the reuse hit rate of
    // the synthetic model is about 9 %), keys only, every resident block.
    rebuild_bench(&ops, (14, 15_616, 256, 232), None, 0);
    // At 61440 tokens as the step runs it: 29 sequences, 128 slots of which 115 miss and
    // 86 of those are tier hits (the tier hit rate 0.75 of the selected), with the copy of
    // their values, beside a fetch on 24 blocks (their room left).
    rebuild_bench(&ops, (29, 7_680, 128, 115), None, 0);
    rebuild_bench(&ops, (29, 7_680, 128, 115), Some(86), 0);
    rebuild_bench(&ops, (29, 7_680, 128, 115), Some(86), 24);
    // The batch the bench reaches at 61440 tokens with a GPU value tier: 57 sequences, 114
    // misses of which 95 tier hits, beside a fetch on 48 blocks.
    rebuild_bench(&ops, (57, 7_680, 128, 114), Some(95), 48);
}

/// Times the key rebuild of `batch` sequences of `chunks` chunks, `slots` slots of which
/// `misses` miss in every list, the last `tier_hits` of them (if any) copied from a GPU
/// value tier, on the resident blocks less `room`.
fn rebuild_bench(
    ops: &CudaOps,
    (batch, chunks, slots, misses): (usize, usize, usize, usize),
    tier_hits: Option<usize>,
    room: usize,
) {
    use shadowkv::cuda::shadow::{RebuildLists, SeqCounts, ShadowTable};
    let dev = ops.device();
    let tier = 512;
    let mut l = llama8b_layer(160, chunks);
    l.slots = slots;
    if tier_hits.is_some() {
        l = l.with_tier(tier).unwrap();
    }
    // Random 8-bit coefficients, each token's scale that of values within ±1.
    let bufs = layer_buffers(ops, l, batch, |buf, b| {
        let mut rng = StdRng::seed_from_u64(17 + b);
        let codes: Vec<i8> = (0..buf.u.len()).map(|_| rng.random_range(-127..=127)).collect();
        buf.u = dev.upload(&codes)?;
        buf.u_scales = dev.upload(&vec![1.0f32 / 127.0; buf.u_scales.len()])?;
        Ok(())
    });
    let counts = SeqCounts {
        chunks: chunks as i32,
        recent: 0,
        outliers: 2,
        pool_seq: 0,
    };
    let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs.iter().map(|b| (b, counts)).collect();
    let table = ShadowTable::new(ops, &entries).unwrap();
    // Each list: slots 0.. in order, chunks spread over the context (distinct, shuffled
    // by a stride coprime to the chunk count); tier hits from distinct tier entries.
    let lists = batch * l.kv_heads;
    let mut flat = vec![-1i32; lists * l.slots * 2];
    let mut src = vec![0i32; lists * l.slots];
    for e in 0..lists {
        for j in 0..misses {
            flat[(e * l.slots + j) * 2] = j as i32;
            flat[(e * l.slots + j) * 2 + 1] = ((e * 7_919 + j * 61) % chunks) as i32;
            src[e * l.slots + j] = ((e * 31 + j * 7) % tier) as i32;
        }
    }
    let pairs = dev.upload(&flat).unwrap();
    let count = dev.upload(&vec![misses as i32; lists]).unwrap();
    let fetched = dev
        .upload(&vec![(misses - tier_hits.unwrap_or(0)) as i32; lists])
        .unwrap();
    let tier_src = dev.upload(&src).unwrap();
    let inv: Vec<f32> = (0..l.head_dim / 2)
        .map(|i| 500_000f32.powf(-(2.0 * i as f32) / l.head_dim as f32))
        .collect();
    let inv = dev.upload(&inv).unwrap();
    let blocks = ops.shadow_rebuild_blocks(&table, room).unwrap();
    let lists_of = || RebuildLists {
        misses: &pairs,
        miss_count: &count,
        tier_hits: tier_hits.map(|_| (&fetched, &tier_src)),
    };
    let rebuild = || ops.shadow_rebuild_on(&table, lists_of(), &inv, blocks).unwrap();
    let (med, lo, hi) = time_ms(ops, 3, 30, rebuild);
    // The same with a cold L2, as in the step, where the landmark scores have just
    // streamed hundreds of MB through it: a buffer of four times its size is zeroed
    // ahead of each timed run.
    let mut sweep = dev.zeros::<u8>(4 * dev.info().l2_bytes.max(1 << 20)).unwrap();
    let (cold, _, _) = time_ms_after(ops, 3, 30, || dev.stream().memset_zeros(&mut sweep).unwrap(), rebuild);
    // The products of every rebuilt row with sv (one fp16 term).
    let flops = (lists * misses * l.chunk * l.rank * l.head_dim * 2) as f64;
    eprintln!(
        "BENCH shadow_rebuild batch={batch} chunks={chunks} kv_heads=8 d=128 rank=160 chunk=8 slots={slots} \
         misses_per_head={misses} tier_hits_per_head={} blocks={blocks} median_ms={med:.4} min_ms={lo:.4} \
         max_ms={hi:.4} cold_l2_median_ms={cold:.4} TFLOP/s={:.0}",
        tier_hits.unwrap_or(0),
        flops / (med * 1e-3) / 1e12
    );
}

/// The cuBLASLt algorithms its heuristic offers (up to 16) for Llama-3.1-8B's decode
/// products at 16 and 57 rows, each timed, against `linear` (cublasGemmEx's default
/// choice): whether picking among them at start-up would stream the weights faster.
#[test]
#[ignore = "benchmark: needs a GPU"]
fn linear_cublaslt_candidates() {
    use cudarc::cublaslt::{result as lt, sys};
    use cudarc::driver::DevicePtr;
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let stream = dev.stream();
    let handle = lt::create_handle().unwrap();
    let ws_bytes = 32usize << 20;
    let ws = dev.zeros::<u8>(ws_bytes).unwrap();
    let (wsp, _gw) = ws.device_ptr(stream);
    let bf = sys::cudaDataType_t::CUDA_R_16BF;
    for &m in &[16usize, 57] {
        for &(k, n) in &[(4096usize, 6144usize), (4096, 4096), (4096, 28_672), (14_336, 4096)] {
            let mut x = dev.zeros::<bf16>(m * k).unwrap();
            let mut w = dev.zeros::<bf16>(n * k).unwrap();
            let mut out = dev.zeros::<bf16>(m * n).unwrap();
            ops.fill_random_bf16(&mut x, 1, 1.0).unwrap();
            ops.fill_random_bf16(&mut w, 2, 0.02).unwrap();
            let (base, _, _) = time_ms(&ops, 5, 50, || ops.linear(&mut out, &x, &w, m, k, n, false).unwrap());
            let bytes = ((n * k + m * k + m * n) * 2) as f64;
            // out^T[n, m] = w[n, k] · x^T as column-major: A = w (k × n, transposed), B = x^T (k × m).
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .unwrap();
            let (t, nt) = (
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            );
            let pref = lt::create_matmul_pref().unwrap();
            let a = lt::create_matrix_layout(bf, k as u64, n as u64, k as i64).unwrap();
            let b = lt::create_matrix_layout(bf, k as u64, m as u64, k as i64).unwrap();
            let c = lt::create_matrix_layout(bf, n as u64, m as u64, n as i64).unwrap();
            let mut found = [std::mem::MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::zeroed(); 16];
            let mut count = 0i32;
            unsafe {
                use sys::cublasLtMatmulDescAttributes_t::{CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB};
                for (attr, op) in [(CUBLASLT_MATMUL_DESC_TRANSA, &t), (CUBLASLT_MATMUL_DESC_TRANSB, &nt)] {
                    let size = std::mem::size_of_val(op);
                    lt::set_matmul_desc_attribute(desc, attr, std::ptr::from_ref(op).cast(), size).unwrap();
                }
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws_bytes as *const usize).cast(),
                    std::mem::size_of::<usize>(),
                )
                .unwrap();
                sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    desc,
                    a,
                    b,
                    c,
                    c,
                    pref,
                    16,
                    found.as_mut_ptr().cast(),
                    &mut count,
                )
                .result()
                .unwrap();
            }
            let (alpha, beta) = (1.0f32, 0.0f32);
            let mut times = Vec::new();
            for (i, h) in found.iter().take(count as usize).enumerate() {
                let h = unsafe { h.assume_init() };
                if h.state != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    continue;
                }
                let (xp, _g1) = x.device_ptr(stream);
                let (wp, _g2) = w.device_ptr(stream);
                let (op, _g3) = out.device_ptr(stream);
                let run = || unsafe {
                    lt::matmul(
                        handle,
                        desc,
                        (&alpha as *const f32).cast(),
                        (&beta as *const f32).cast(),
                        wp as *const _,
                        a,
                        xp as *const _,
                        b,
                        op as *const _,
                        c,
                        op as *mut _,
                        c,
                        &h.algo,
                        wsp as *mut _,
                        ws_bytes,
                        stream.cu_stream() as _,
                    )
                    .unwrap()
                };
                let (med, _, _) = time_ms(&ops, 3, 30, run);
                times.push((med, i, h.wavesCount));
            }
            times.sort_by(|p, q| p.0.partial_cmp(&q.0).unwrap());
            let gbs = |ms: f64| bytes / (ms * 1e-3) / 1e9;
            let list: Vec<String> = times.iter().map(|(t, i, _)| format!("#{i}:{:.4}", t)).collect();
            if let Some(&(best, i, waves)) = times.first() {
                eprintln!(
                    "BENCH linear_lt m={m} k={k} n={n} gemm_ex_ms={base:.4} ({:.0} GB/s) best_lt_ms={best:.4} ({:.0} GB/s, \
                     algo #{i} of {count}, waves {waves:.2}) ratio={:.3} all=[{}]",
                    gbs(base),
                    gbs(best),
                    best / base,
                    list.join(" ")
                );
            }
            unsafe {
                lt::destroy_matrix_layout(a).unwrap();
                lt::destroy_matrix_layout(b).unwrap();
                lt::destroy_matrix_layout(c).unwrap();
                lt::destroy_matmul_pref(pref).unwrap();
                lt::destroy_matmul_desc(desc).unwrap();
            }
        }
    }
    unsafe { lt::destroy_handle(handle).unwrap() };
}
