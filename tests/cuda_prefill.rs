//! Causal flash attention for prefill (`CudaOps::flash_prefill`) against the CPU
//! reference `causal_attention`, on f32 copies of the same bf16 inputs. As in
//! tests/cuda_kernels.rs: every test draws fresh random inputs (the seed is printed;
//! `SHADOWKV_TEST_SEED=N` repeats a run), fills the output with NaN before launching,
//! uses lengths and chunk sizes that are not multiples of the kernel's tiles, and checks
//! that no NaN is left and that the output is not all zero. Without a CUDA device each
//! test prints `skipped: no CUDA device (...)` and passes (`SHADOWKV_REQUIRE_CUDA=1`
//! turns that into a failure, as tools/gpu-check sets it).
//!
//! Tolerance, as for flash-decoding (the probabilities go through the tensor cores as
//! bf16): per query row and head, ‖out − ref‖ / ‖ref‖ ≤ 10⁻² and every element within
//! 2·10⁻²·max|ref|. Each case prints `RESULT flash_prefill <case> max_rel=...
//! max_err/max_ref=... norm_rel=...` (worst over its rows and heads; see
//! tests/cuda_kernels.rs for the three measures).

mod common;

use common::gpu_check::*;
use half::bf16;
use rand::rngs::StdRng;
use shadowkv::cpu::attention::{causal_attention, AttnJob, AttnShape};
use shadowkv::cuda::prefill::PrefillTiles;
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::{CudaOps, KvTable};
use std::ops::Range;

/// SmolLM2-135M attention: 9 query heads, 3 KV heads, head dim 64.
const SMOLLM2: AttnShape = AttnShape {
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
};
/// Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128.
const LLAMA_8B: AttnShape = AttnShape {
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
};

/// One prefill call over sequences of cache lengths `lens` with `q_rows` new rows each,
/// random inputs; `check(b, n)` gives the rows (indices among sequence b's n query
/// rows) compared with the CPU reference. Every row is checked for NaN.
fn prefill_case(
    ops: &CudaOps,
    rng: &mut StdRng,
    lens: &[usize],
    q_rows: &[usize],
    shape: AttnShape,
    check: impl Fn(usize, usize) -> Vec<Range<usize>>,
) -> Errors {
    let dev = ops.device();
    let (heads, d) = (shape.heads, shape.head_dim);
    let (qd, kvd) = (heads * d, shape.kv_heads * d);
    let rows: usize = q_rows.iter().sum();
    let case = format!("lens={lens:?},q_rows={q_rows:?},heads={heads}/{},d={d}", shape.kv_heads);
    let t = std::time::Instant::now();
    // Queries of spread 3, keys and values of spread 1: scores q·k/√d of standard
    // deviation about 1, so the softmax is neither flat nor one-hot.
    let (mut kf, mut vf, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &l in lens {
        let k = rand_bf16(rng, l * kvd, 1.0).0;
        let v = rand_bf16(rng, l * kvd, 1.0).0;
        dk.push(dev.upload(&k).unwrap());
        dv.push(dev.upload(&v).unwrap());
        kf.push(f32s(&k));
        vf.push(f32s(&v));
    }
    let q = rand_bf16(rng, rows * qd, 3.0).0;
    let dq = dev.upload(&q).unwrap();
    let seqs: Vec<_> = (0..lens.len()).map(|b| (&dk[b], &dv[b], lens[b])).collect();
    let table = KvTable::new(ops, &seqs, kvd).unwrap();
    let mut out = dev.zeros::<bf16>(rows * qd).unwrap();
    ops.fill_nan_bf16(&mut out).unwrap();
    ops.flash_prefill(&mut out, &dq, &table, q_rows, shape).unwrap();
    let got = f32s(&dev.download(&out).unwrap());
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert_eq!(nan, 0, "flash_prefill {case}: {nan} NaN outputs (unwritten or invalid)");
    assert!(got.iter().any(|&v| v != 0.0), "flash_prefill {case}: output all zero");

    // The reference on the checked rows only: one job per checked range.
    let mut jobs_q = Vec::new(); // (sequence, first row in q, position of the first row, rows)
    let mut row0 = 0;
    for (b, (&n, &len)) in q_rows.iter().zip(lens).enumerate() {
        for r in check(b, n) {
            assert!(r.end <= n, "check range {r:?} of sequence {b} past its {n} rows");
            if !r.is_empty() {
                jobs_q.push((b, row0 + r.start, len - n + r.start, r.len()));
            }
        }
        row0 += n;
    }
    let qf: Vec<Vec<f32>> = jobs_q
        .iter()
        .map(|&(_, r0, _, n)| f32s(&q[r0 * qd..(r0 + n) * qd]))
        .collect();
    let mut out_row = 0;
    let jobs: Vec<AttnJob> = jobs_q
        .iter()
        .zip(&qf)
        .map(|(&(b, _, start, n), qf)| {
            let job = AttnJob {
                q: qf,
                start,
                k: &kf[b][..(start + n) * kvd],
                v: &vf[b][..(start + n) * kvd],
                out_row,
            };
            out_row += n;
            job
        })
        .collect();
    let mut want = vec![0f32; out_row * qd];
    causal_attention(&mut want, &jobs, shape);

    let mut worst = Errors::default();
    let mut w_row = 0;
    for &(b, r0, start, n) in &jobs_q {
        for i in 0..n {
            for h in 0..heads {
                let g = &got[(r0 + i) * qd + h * d..(r0 + i) * qd + (h + 1) * d];
                let w = &want[(w_row + i) * qd + h * d..(w_row + i) * qd + (h + 1) * d];
                let atol = 2e-2 * max_abs(w);
                let what = format!("{case},seq={b},pos={},head={h}", start + i);
                let e = errors("flash_prefill", &what, g, w, |_, _| atol);
                assert!(
                    e.norm_rel <= 1e-2,
                    "flash_prefill {what}: ‖err‖/‖ref‖ = {:.3e}",
                    e.norm_rel
                );
                worst = worst.worst(e);
            }
        }
        w_row += n;
    }
    worst.report("flash_prefill", &case);
    eprintln!("flash_prefill {case}: {:.1} s", t.elapsed().as_secs_f64());
    worst
}

fn all_rows(_: usize, n: usize) -> Vec<Range<usize>> {
    std::iter::once(0..n).collect()
}

#[test]
fn flash_prefill_matches_cpu_on_a_mixed_batch() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("flash_prefill_mixed");
    // Lengths and chunk sizes around the tiles (128 rows; 32 or 64 keys): a one-token
    // sequence, a whole short prompt, a chunk of 129 rows (two tiles, the second of one
    // row) after 171 cached tokens, a 64-row chunk at 936, and a sequence with no rows.
    let lens = [1usize, 37, 300, 1000, 50];
    let q_rows = [1usize, 37, 129, 64, 0];
    for shape in [
        SMOLLM2,
        LLAMA_8B,
        AttnShape {
            heads: 4,
            kv_heads: 4,
            head_dim: 128,
        },
        AttnShape {
            heads: 8,
            kv_heads: 1,
            head_dim: 64,
        },
    ] {
        prefill_case(&ops, &mut rng, &lens, &q_rows, shape, all_rows);
    }
    // Chunks that start inside a key tile and end one past a row tile.
    prefill_case(&ops, &mut rng, &[2000, 257], &[129, 257], LLAMA_8B, all_rows);
    prefill_case(&ops, &mut rng, &[2000, 257], &[129, 257], SMOLLM2, all_rows);
}

#[test]
fn flash_prefill_matches_cpu_on_full_prefills() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("flash_prefill_full");
    for n in [1024usize, 4096] {
        prefill_case(&ops, &mut rng, &[n], &[n], LLAMA_8B, all_rows);
    }
    prefill_case(&ops, &mut rng, &[1000], &[1000], SMOLLM2, all_rows);
    prefill_case(&ops, &mut rng, &[4097], &[4097], SMOLLM2, all_rows);
}

#[test]
fn flash_prefill_matches_cpu_at_32k() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("flash_prefill_32k");
    let ctx = 32_768;
    // The whole context in one call, and its last chunk of 4096 rows: the first rows
    // and the last 200 are compared (the CPU reference of every row would take long),
    // every row is checked for NaN.
    let ends = |_: usize, n: usize| vec![0..64.min(n), n.saturating_sub(200)..n];
    prefill_case(&ops, &mut rng, &[ctx], &[ctx], LLAMA_8B, ends);
    prefill_case(&ops, &mut rng, &[ctx], &[4096], LLAMA_8B, ends);
    prefill_case(&ops, &mut rng, &[ctx - 1], &[3001], SMOLLM2, ends);
}

#[test]
fn flash_prefill_reuses_a_tile_table_and_skips_empty_calls() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("flash_prefill_tiles");
    let shape = SMOLLM2;
    let (qd, kvd) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
    let lens = [300usize, 90];
    let q_rows = [200usize, 90];
    let rows: usize = q_rows.iter().sum();
    let k: Vec<_> = lens
        .iter()
        .map(|&l| dev.upload(&rand_bf16(&mut rng, l * kvd, 1.0).0).unwrap())
        .collect();
    let v: Vec<_> = lens
        .iter()
        .map(|&l| dev.upload(&rand_bf16(&mut rng, l * kvd, 1.0).0).unwrap())
        .collect();
    let seqs: Vec<_> = (0..2).map(|b| (&k[b], &v[b], lens[b])).collect();
    let table = KvTable::new(&ops, &seqs, kvd).unwrap();
    let tiles = PrefillTiles::new(&ops, &table, &q_rows, shape.head_dim).unwrap();
    assert_eq!(tiles.rows(), rows);
    assert_eq!(tiles.count(), 3);
    // Two layers' worth of queries through one table equal the per-call path.
    for layer in 0..2 {
        let q = dev.upload(&rand_bf16(&mut rng, rows * qd, 3.0).0).unwrap();
        let mut a = dev.zeros::<bf16>(rows * qd).unwrap();
        let mut b = dev.zeros::<bf16>(rows * qd).unwrap();
        ops.fill_nan_bf16(&mut a).unwrap();
        ops.fill_nan_bf16(&mut b).unwrap();
        ops.flash_prefill_tiles(&mut a, &q, &table, &tiles, shape).unwrap();
        ops.flash_prefill(&mut b, &q, &table, &q_rows, shape).unwrap();
        let (a, b) = (dev.download(&a).unwrap(), dev.download(&b).unwrap());
        assert!(a.iter().all(|x| !x.is_nan()), "layer {layer}: NaN left");
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "layer {layer}: the reused table gives other numbers"
        );
    }
    // No query rows at all: nothing to do, the output untouched.
    let q = dev.zeros::<bf16>(qd).unwrap();
    let mut out = dev.zeros::<bf16>(qd).unwrap();
    ops.fill_nan_bf16(&mut out).unwrap();
    ops.flash_prefill(&mut out, &q, &table, &[0, 0], shape).unwrap();
    assert!(dev.download(&out).unwrap().iter().all(|x| x.is_nan()));
}

#[test]
fn flash_prefill_rejects_bad_input() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let shape = AttnShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 128,
    };
    let kvd = shape.kv_heads * shape.head_dim;
    let k = dev.zeros::<bf16>(10 * kvd).unwrap();
    let table = KvTable::new(&ops, &[(&k, &k, 10), (&k, &k, 4)], kvd).unwrap();
    let qd = shape.heads * shape.head_dim;
    let q = dev.zeros::<bf16>(14 * qd).unwrap();
    let mut out = dev.zeros::<bf16>(14 * qd).unwrap();
    let err = |r: anyhow::Result<()>| r.expect_err("accepted").to_string();
    // More query rows than the cache holds.
    let e = err(ops.flash_prefill(&mut out, &q, &table, &[10, 5], shape));
    assert!(e.contains("sequence 1") && e.contains("5 query rows"), "{e}");
    // One count per sequence.
    let e = err(ops.flash_prefill(&mut out, &q, &table, &[3], shape));
    assert!(e.contains("1 query row counts for 2 sequences"), "{e}");
    // q or out too short for the rows.
    let short = dev.zeros::<bf16>(13 * qd).unwrap();
    let mut short_out = dev.zeros::<bf16>(13 * qd).unwrap();
    let e = err(ops.flash_prefill(&mut out, &short, &table, &[10, 4], shape));
    assert!(e.contains("q holds"), "{e}");
    let e = err(ops.flash_prefill(&mut short_out, &q, &table, &[10, 4], shape));
    assert!(e.contains("output holds"), "{e}");
    // Shapes: uneven groups, unsupported head dimension.
    for s in [
        AttnShape {
            heads: 3,
            kv_heads: 2,
            head_dim: 128,
        },
        AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 96,
        },
        AttnShape {
            heads: 4,
            kv_heads: 0,
            head_dim: 128,
        },
    ] {
        assert!(
            ops.flash_prefill(&mut out, &q, &table, &[10, 4], s).is_err(),
            "{s:?} accepted"
        );
    }
    // A tile table of other lengths or head dimension.
    let other = KvTable::new(&ops, &[(&k, &k, 9), (&k, &k, 4)], kvd).unwrap();
    let tiles = PrefillTiles::new(&ops, &other, &[9, 4], 128).unwrap();
    let e = err(ops.flash_prefill_tiles(&mut out, &q, &table, &tiles, shape));
    assert!(e.contains("sequence lengths"), "{e}");
    let tiles64 = PrefillTiles::new(&ops, &table, &[10, 4], 64).unwrap();
    let e = err(ops.flash_prefill_tiles(&mut out, &q, &table, &tiles64, shape));
    assert!(e.contains("head dimension"), "{e}");
}
