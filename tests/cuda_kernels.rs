//! The CUDA kernels against the CPU reference (`shadowkv::cpu`), run on f32 copies of
//! the same bf16-rounded inputs. Every test draws fresh random inputs (the seed is
//! printed; `SHADOWKV_TEST_SEED=N` repeats a run), fills its outputs with NaN before
//! launching, uses sizes that are not multiples of the kernels' tiles, and checks that
//! no NaN is left and that the output is not all zero. Without a CUDA device each
//! test prints `skipped: no CUDA device (...)` and passes (`SHADOWKV_REQUIRE_CUDA=1`
//! turns that into a failure, as tools/gpu-check sets it).
//!
//! Tolerances, for bf16 outputs (8 significant bits: rounding alone moves a value by up
//! to 2⁻⁸ of itself, and a different fp32 summation order can move it one more step):
//! - embedding gather: bit-exact;
//! - the residual add of RMSNorm: bit-exact (`bf16(x + r)`);
//! - RMSNorm, RoPE, SwiGLU: every element within 2⁻⁷·|ref| + 10⁻⁵·max|ref|;
//! - linear (cuBLAS, fp32 accumulation): every element within 2⁻⁷·|ref| + 10⁻³·rms(ref)
//!   (outputs that cancel to near zero carry the inputs' absolute error); when adding to
//!   the output (`accumulate`, the residual add) within 2⁻⁷·(|ref| + |out before|) +
//!   10⁻³·rms(ref): cuBLAS rounds the product to bf16 before adding the old output, so
//!   a sum that cancels keeps the rounding error of its larger terms;
//! - flash-decoding: per sequence and head, ‖out − ref‖ / ‖ref‖ ≤ 10⁻² and every element
//!   within 2·10⁻²·max|ref| (the probabilities go through the tensor cores as bf16, or
//!   as fp16 times the scale for values in 8-bit chunks, whose reference is code · scale).
//!
//! Each check prints `RESULT <kernel> <case> max_rel=... max_err/max_ref=... norm_rel=...`:
//! the largest |out − ref| / |ref| over elements with |ref| ≥ 1% of max|ref|, the largest
//! |out − ref| over max|ref|, and ‖out − ref‖ / ‖ref‖.

mod common;

use common::gpu_check::*;
use cudarc::driver::CudaSlice;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;
use shadowkv::cpu::attention::{causal_attention, AttnJob, AttnShape};
use shadowkv::cpu::matmul::linear as cpu_linear;
use shadowkv::cpu::ops::{rms_norm, silu_mul, Rope};
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::{rope_inv_freq, CudaOps, DecodePass, DecodeWorkspace, KvTable, PendingSlots};
use shadowkv::model::synthetic::preset;

const EW_RTOL: f64 = 1.0 / 128.0;

#[test]
fn embedding_gather_matches_table_rows() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("embedding");
    for &(vocab, hidden, rows) in &[(1000usize, 576usize, 37usize), (517, 1001, 5), (32000, 4096, 1)] {
        let (table, _) = rand_bf16(&mut rng, vocab * hidden, 1.0);
        let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
        let d_table = dev.upload(&table).unwrap();
        let d_ids = dev.upload(&ids).unwrap();
        let mut out = dev.zeros::<bf16>(rows * hidden).unwrap();
        ops.fill_nan_bf16(&mut out).unwrap();
        ops.embedding(&mut out, &d_table, &d_ids, rows, hidden, vocab).unwrap();
        let got = dev.download(&out).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let want = &table[id as usize * hidden..(id as usize + 1) * hidden];
            let row = &got[r * hidden..(r + 1) * hidden];
            assert!(
                row.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} (id {id}) differs from the table"
            );
        }
        Errors::default().report(
            "embedding_gather",
            &format!("vocab={vocab},hidden={hidden},rows={rows},bit-exact"),
        );
    }
    // An id past the vocabulary yields a NaN row, never another row's numbers.
    let d_table = dev.upload(&[bf16::ONE; 4 * 8]).unwrap();
    let d_ids = dev.upload(&[1u32, 4, 3]).unwrap();
    let mut out = dev.zeros::<bf16>(3 * 8).unwrap();
    ops.embedding(&mut out, &d_table, &d_ids, 3, 8, 4).unwrap();
    let got = dev.download(&out).unwrap();
    assert!(got[..8].iter().all(|v| *v == bf16::ONE));
    assert!(got[8..16].iter().all(|v| v.is_nan()), "out-of-range id must give NaN");
    assert!(got[16..].iter().all(|v| *v == bf16::ONE));
}

#[test]
fn rmsnorm_residual_matches_cpu() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("rmsnorm");
    let eps = 1e-5f32;
    for &(rows, hidden) in &[(1usize, 576usize), (5, 1001), (64, 4096), (3, 8192), (2, 17)] {
        for with_residual in [true, false] {
            let case = format!("rows={rows},hidden={hidden},residual={with_residual}");
            let (x, xf) = rand_bf16(&mut rng, rows * hidden, 2.0);
            let (r, rf) = rand_bf16(&mut rng, rows * hidden, 2.0);
            let (w, wf) = rand_bf16(&mut rng, hidden, 1.5);
            let mut dx = dev.upload(&x).unwrap();
            let dr = dev.upload(&r).unwrap();
            let dw = dev.upload(&w).unwrap();
            let mut dy = dev.zeros::<bf16>(rows * hidden).unwrap();
            ops.fill_nan_bf16(&mut dy).unwrap();
            let res: Option<&dyn shadowkv::cuda::ops::DevicePtrDyn> = if with_residual { Some(&dr) } else { None };
            ops.rmsnorm_residual(&mut dy, &mut dx, res, &dw, rows, hidden, eps)
                .unwrap();
            let (gx, gy) = (dev.download(&dx).unwrap(), dev.download(&dy).unwrap());
            // The sum is rounded once to bf16, exactly as the CPU does it.
            let want_x: Vec<bf16> = if with_residual {
                xf.iter().zip(&rf).map(|(a, b)| bf16::from_f32(a + b)).collect()
            } else {
                x.clone()
            };
            let bad = gx
                .iter()
                .zip(&want_x)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(bad, 0, "{case}: {bad} elements of x + r differ from bf16(x + r)");
            let mut want_y = vec![0f32; rows * hidden];
            rms_norm(&mut want_y, &f32s(&want_x), &wf, eps);
            let atol = 1e-5 * max_abs(&want_y);
            check("rmsnorm_residual", &case, &f32s(&gy), &want_y, EW_RTOL, atol);
        }
    }
}

#[test]
fn rope_matches_cpu_on_fused_qkv_rows() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("rope");
    for arch in ["llama-3.1-8b", "smollm2-135m", "qwen2-0.5b"] {
        let cfg = preset(arch).unwrap();
        let (h, kv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let width = (h + 2 * kv) * d;
        for &rows in &[1usize, 7, 33] {
            let case = format!("{arch},rows={rows}");
            let (x, xf) = rand_bf16(&mut rng, rows * width, 3.0);
            let mut positions: Vec<usize> = (0..rows).map(|_| rng.random_range(0..131_072)).collect();
            positions[0] = 0;
            if rows > 1 {
                positions[1] = 131_071;
            }
            let pos_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
            let inv = rope_inv_freq(&cfg);
            let mut dx = dev.upload(&x).unwrap();
            let dp = dev.upload(&pos_i32).unwrap();
            let df = dev.upload(&inv).unwrap();
            ops.rope(&mut dx, width, rows, h + kv, d, &dp, &df).unwrap();
            let got = dev.download(&dx).unwrap();
            // Reference: the CPU Rope on q and k separately.
            let rope = Rope::new(&cfg);
            let (cos, sin) = rope.tables(&positions);
            let (mut q, mut k) = (Vec::new(), Vec::new());
            for row in xf.chunks_exact(width) {
                q.extend_from_slice(&row[..h * d]);
                k.extend_from_slice(&row[h * d..(h + kv) * d]);
            }
            rope.apply(&mut q, h, &cos, &sin);
            rope.apply(&mut k, kv, &cos, &sin);
            let (mut gq, mut gk) = (Vec::new(), Vec::new());
            for (grow, xrow) in got.chunks_exact(width).zip(x.chunks_exact(width)) {
                gq.extend(grow[..h * d].iter().map(|v| v.to_f32()));
                gk.extend(grow[h * d..(h + kv) * d].iter().map(|v| v.to_f32()));
                // v is not touched.
                let (gv, xv) = (&grow[(h + kv) * d..], &xrow[(h + kv) * d..]);
                assert!(
                    gv.iter().zip(xv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{case}: v changed"
                );
            }
            let atol = 1e-5 * max_abs(&xf);
            check("rope", &format!("{case},q"), &gq, &q, EW_RTOL, atol);
            check("rope", &format!("{case},k"), &gk, &k, EW_RTOL, atol);
        }
    }
}

#[test]
fn swiglu_matches_cpu() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("swiglu");
    for &(rows, inter) in &[(1usize, 1000usize), (7, 1001), (33, 14336), (2, 3)] {
        let case = format!("rows={rows},inter={inter}");
        let (gu, guf) = rand_bf16(&mut rng, rows * 2 * inter, 6.0);
        let dgu = dev.upload(&gu).unwrap();
        let mut out = dev.zeros::<bf16>(rows * inter).unwrap();
        ops.fill_nan_bf16(&mut out).unwrap();
        ops.swiglu(&mut out, &dgu, rows, inter).unwrap();
        let got = f32s(&dev.download(&out).unwrap());
        let mut want = vec![0f32; rows * inter];
        silu_mul(&mut want, &guf, inter);
        check("swiglu", &case, &got, &want, EW_RTOL, 1e-5 * max_abs(&want));
    }
}

#[test]
fn linear_matches_cpu() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("linear");
    // Up to GEMV_MAX_M rows run the GEMV kernel (and, with it off, cuBLAS); more run
    // cuBLAS. n = 6144 splits each column between warps on an H200 (gemv_splits).
    for &(m, k, n) in &[
        (1usize, 4096usize, 4096usize),
        (1, 4096, 6144),
        (2, 4096, 6144),
        (2, 1000, 333),
        (7, 1000, 333),
        (8, 14_336, 301),
        (33, 577, 129),
        (130, 256, 1000),
        (3, 5, 7),
    ] {
        for gemv in [true, false] {
            if !gemv && m > shadowkv::cuda::ops::GEMV_MAX_M {
                continue;
            }
            ops.set_gemv(gemv);
            for accumulate in [false, true] {
                let case = format!("m={m},k={k},n={n},accumulate={accumulate},gemv={gemv}");
                let (x, xf) = rand_bf16(&mut rng, m * k, 1.0);
                let (w, wf) = rand_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
                let (o0, o0f) = rand_bf16(&mut rng, m * n, 1.0);
                let dx = dev.upload(&x).unwrap();
                let dw = dev.upload(&w).unwrap();
                let mut out = dev.upload(&o0).unwrap();
                if !accumulate {
                    ops.fill_nan_bf16(&mut out).unwrap();
                }
                ops.linear(&mut out, &dx, &dw, m, k, n, accumulate).unwrap();
                let got = f32s(&dev.download(&out).unwrap());
                let mut want = if accumulate { o0f.clone() } else { vec![0f32; m * n] };
                cpu_linear(&mut want, &xf, &wf, m, k, n, accumulate);
                let atol = 1e-3 * rms(&want);
                let e = errors("linear", &case, &got, &want, |i, w| {
                    let before = if accumulate { o0f[i].abs() as f64 } else { 0.0 };
                    EW_RTOL * (w.abs() + before) + atol
                });
                e.report("linear", &case);
                // fp32 output (the logits): only fp32 summation-order error remains.
                if !accumulate {
                    let mut out32 = dev.zeros::<f32>(m * n).unwrap();
                    ops.fill_nan_f32(&mut out32).unwrap();
                    ops.linear_f32(&mut out32, &dx, &dw, m, k, n).unwrap();
                    let got = dev.download(&out32).unwrap();
                    let atol = 1e-4 * rms(&want);
                    check("linear_f32", &case, &got, &want, 1e-4, atol);
                }
            }
        }
    }
    ops.set_gemv(true);
}

/// The RMSNorm-fused product (norm weight folded into the matrix, so unit weight here):
/// the fused GEMV for one and two rows, the norm kernel and cuBLAS for more.
#[test]
fn linear_normed_matches_cpu_norm_then_product() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("linear_normed");
    for &(m, k, n) in &[
        (1usize, 4096usize, 6144usize),
        (2, 576, 1536),
        (5, 576, 300),
        (1, 14_336, 4096),
    ] {
        let case = format!("m={m},k={k},n={n}");
        // Rows with an offset so that the norm matters.
        let (x, xf) = rand_bf16(&mut rng, m * k, 3.0);
        let (w, wf) = rand_bf16(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let mut dx = dev.upload(&x).unwrap();
        let dw = dev.upload(&w).unwrap();
        let ones = dev.upload(&vec![bf16::ONE; k]).unwrap();
        let mut xn = dev.zeros::<bf16>(m * k).unwrap();
        let mut out = dev.zeros::<bf16>(m * n).unwrap();
        ops.fill_nan_bf16(&mut out).unwrap();
        ops.linear_normed(&mut out, &mut dx, &dw, (m, k, n), 1e-5, &mut xn, &ones)
            .unwrap();
        let got = f32s(&dev.download(&out).unwrap());
        let mut normed = vec![0f32; m * k];
        rms_norm(&mut normed, &xf, &vec![1.0; k], 1e-5);
        // The unfused path rounds the normalised rows to bf16 before the product.
        if m > shadowkv::cuda::ops::GEMV_MAX_M {
            normed.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
        let mut want = vec![0f32; m * n];
        cpu_linear(&mut want, &normed, &wf, m, k, n, false);
        let atol = 2e-3 * rms(&want);
        check("linear_normed", &case, &got, &want, EW_RTOL, atol);
        // The input rows are left as they were.
        assert_eq!(dev.download(&dx).unwrap(), x, "{case}: input modified");
    }
}

/// Flash-decoding of a batch against `causal_attention` with one query row per
/// sequence at its last position. `part_len` None lets the library choose.
#[allow(clippy::too_many_arguments)]
fn flash_case(
    ops: &CudaOps,
    rng: &mut StdRng,
    lens: &[usize],
    kv: &KvData,
    shape: AttnShape,
    part_len: Option<usize>,
    ws: &mut DecodeWorkspace,
    worst: &mut Errors,
) {
    let dev = ops.device();
    let (heads, d) = (shape.heads, shape.head_dim);
    let kvd = shape.kv_heads * d;
    let group = heads / shape.kv_heads;
    let batch = lens.len();
    // Queries of spread 3: scores q·k/√d of standard deviation about 1, so the
    // softmax is neither flat nor one-hot.
    let (q, qf) = rand_bf16(rng, batch * heads * d, 3.0);
    let dq = dev.upload(&q).unwrap();
    let seqs: Vec<_> = (0..batch).map(|b| (&kv.dk[b], &kv.dv[b], lens[b])).collect();
    let table = KvTable::new(ops, &seqs, kvd).unwrap();
    let mut out = dev.zeros::<bf16>(batch * heads * d).unwrap();
    ops.fill_nan_bf16(&mut out).unwrap();
    ws.poison(ops).unwrap();
    match part_len {
        Some(p) => ops
            .flash_decode_with_partition(&mut out, &dq, &table, shape, ws, p)
            .unwrap(),
        None => ops.flash_decode(&mut out, &dq, &table, shape, ws).unwrap(),
    }
    let got = f32s(&dev.download(&out).unwrap());
    let mut want = vec![0f32; batch * heads * d];
    let jobs: Vec<AttnJob> = (0..batch)
        .map(|b| AttnJob {
            q: &qf[b * heads * d..(b + 1) * heads * d],
            start: lens[b] - 1,
            k: &kv.kf[b][..lens[b] * kvd],
            v: &kv.vf[b][..lens[b] * kvd],
            out_row: b,
        })
        .collect();
    causal_attention(&mut want, &jobs, shape);
    let case = format!(
        "lens={lens:?},group={group},kv_heads={},d={d},part={}",
        shape.kv_heads,
        part_len.map_or("auto".to_string(), |p| p.to_string())
    );
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert_eq!(nan, 0, "flash_decode {case}: {nan} NaN outputs");
    assert!(got.iter().any(|&v| v != 0.0), "flash_decode {case}: all zero");
    for (i, (g, w)) in got.chunks_exact(d).zip(want.chunks_exact(d)).enumerate() {
        let atol = 2e-2 * max_abs(w);
        let e = errors(
            "flash_decode",
            &format!("{case},seq={},head={}", i / heads, i % heads),
            g,
            w,
            |_, _| atol,
        );
        assert!(
            e.norm_rel <= 1e-2,
            "flash_decode {case} seq {} head {}: ‖err‖/‖ref‖ = {:.3e}",
            i / heads,
            i % heads,
            e.norm_rel
        );
        *worst = worst.worst(e);
    }
}

/// Random caches of a batch: f32 copies for the reference, bf16 on the device.
struct KvData {
    kf: Vec<Vec<f32>>,
    vf: Vec<Vec<f32>>,
    dk: Vec<CudaSlice<bf16>>,
    dv: Vec<CudaSlice<bf16>>,
}

fn random_kv(ops: &CudaOps, rng: &mut StdRng, lens: &[usize], kvd: usize) -> KvData {
    let mut kv = KvData {
        kf: Vec::new(),
        vf: Vec::new(),
        dk: Vec::new(),
        dv: Vec::new(),
    };
    for &l in lens {
        let (k, kf) = rand_bf16(rng, l * kvd, 1.0);
        let (v, vf) = rand_bf16(rng, l * kvd, 1.0);
        kv.dk.push(ops.device().upload(&k).unwrap());
        kv.dv.push(ops.device().upload(&v).unwrap());
        kv.kf.push(kf);
        kv.vf.push(vf);
    }
    kv
}

#[test]
fn flash_decode_matches_cpu_across_contexts_and_groups() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("flash_decode");
    let mut ws = DecodeWorkspace::new();
    let kv_heads = 2;
    let d = 128;
    for &ctx in &[1usize, 100, 1000, 4097, 32_768, 131_072] {
        // Batch 2 with sequences of different lengths.
        let lens = [ctx, (ctx * 2 / 3).max(1)];
        let t = std::time::Instant::now();
        let kv = random_kv(&ops, &mut rng, &lens, kv_heads * d);
        let mut worst = Errors::default();
        for &group in &[1usize, 3, 4, 8] {
            let shape = AttnShape {
                heads: kv_heads * group,
                kv_heads,
                head_dim: d,
            };
            flash_case(&ops, &mut rng, &lens, &kv, shape, None, &mut ws, &mut worst);
        }
        worst.report("flash_decode", &format!("ctx={ctx},lens={lens:?},groups=1/3/4/8,d={d}"));
        eprintln!("flash_decode ctx={ctx}: {:.1} s", t.elapsed().as_secs_f64());
    }
}

#[test]
fn flash_decode_head_dim_64_and_explicit_partitions() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("flash_decode_partitions");
    let mut ws = DecodeWorkspace::new();
    let mut worst = Errors::default();
    for &(d, kv_heads) in &[(64usize, 3usize), (128, 1)] {
        for &ctx in &[1usize, 15, 100, 4097] {
            let lens = [ctx, (ctx / 2).max(1), 17.min(ctx)];
            let kv = random_kv(&ops, &mut rng, &lens, kv_heads * d);
            for &group in &[1usize, 7, 8] {
                let shape = AttnShape {
                    heads: kv_heads * group,
                    kv_heads,
                    head_dim: d,
                };
                for part in [Some(16), Some(64), Some(512), Some(1024), None] {
                    flash_case(&ops, &mut rng, &lens, &kv, shape, part, &mut ws, &mut worst);
                }
            }
        }
    }
    worst.report(
        "flash_decode",
        "d=64/128,ctx=1/15/100/4097,groups=1/7/8,part=16/64/512/1024/auto",
    );
}

/// One entry of a table whose values turn to 8-bit chunks: `dense` bf16 rows, then
/// `chunks` chunks of `c` rows in the value pools' format in place (codes in token order,
/// then a fp32 scale per token), on the device as the bf16 words they fill; the f32
/// values (code · scale) for the reference.
fn chunked_values(rng: &mut StdRng, dense: usize, chunks: usize, c: usize, d: usize) -> (Vec<bf16>, Vec<f32>) {
    let (mut words, vf) = rand_bf16(rng, dense * d, 1.0);
    let mut vf = vf;
    let chunk_bytes = (c * (d + 4)).next_multiple_of(16);
    for _ in 0..chunks {
        let mut bytes = vec![0u8; 2 * c * d];
        let mut scales = Vec::with_capacity(c);
        for i in 0..c {
            // One row in eight all zero (a zero scale), the others of varied size.
            let s = if rng.random_range(0..8) == 0 {
                0.0
            } else {
                rng.random_range(0.001f32..0.05)
            };
            scales.push(s);
            for j in 0..d {
                let code = rng.random_range(-127i32..=127);
                bytes[i * d + j] = code as i8 as u8;
                vf.push(code as f32 * s);
            }
        }
        for (i, s) in scales.iter().enumerate() {
            bytes[c * d + 4 * i..c * d + 4 * i + 4].copy_from_slice(&s.to_le_bytes());
        }
        // Past the chunk's bytes the rows hold anything: poison them.
        bytes[chunk_bytes..].fill(0xff);
        words.extend(
            bytes
                .chunks_exact(2)
                .map(|w| bf16::from_bits(u16::from_le_bytes([w[0], w[1]]))),
        );
    }
    (words, vf)
}

/// The CPU attention of the last row of each entry (`lens[b]` rows of keys `kf[b]` and
/// values `vf[b]`) for its `group` query heads of `qf`.
fn last_row_attention(qf: &[f32], kf: &[Vec<f32>], vf: &[Vec<f32>], lens: &[usize], shape: AttnShape) -> Vec<f32> {
    let w = shape.heads * shape.head_dim;
    let jobs: Vec<AttnJob> = (0..lens.len())
        .map(|b| AttnJob {
            q: &qf[b * w..(b + 1) * w],
            start: lens[b] - 1,
            k: &kf[b],
            v: &vf[b],
            out_row: b,
        })
        .collect();
    let mut want = vec![0f32; lens.len() * w];
    causal_attention(&mut want, &jobs, shape);
    want
}

/// Checks each output row of `d` values against the CPU's: no NaN, not all zero, every
/// element within 2 % of the row's largest, the row's norm-relative error within 1 %.
fn check_attention_rows(kernel: &str, case: &str, got: &[f32], want: &[f32], d: usize, worst: &mut Errors) {
    assert_eq!(got.iter().filter(|v| v.is_nan()).count(), 0, "{case}: NaN outputs");
    assert!(got.iter().any(|&v| v != 0.0), "{case}: all zero");
    for (i, (g, w)) in got.chunks_exact(d).zip(want.chunks_exact(d)).enumerate() {
        let atol = 2e-2 * max_abs(w);
        let e = errors(kernel, &format!("{case},row={i}"), g, w, |_, _| atol);
        assert!(e.norm_rel <= 1e-2, "{case} row {i}: ‖err‖/‖ref‖ = {:.3e}", e.norm_rel);
        *worst = worst.worst(e);
    }
}

#[test]
fn flash_decode_reads_values_in_8_bit_chunks() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("flash_decode_q8");
    let mut ws = DecodeWorkspace::new();
    let mut worst = Errors::default();
    // (dense rows, chunks) per entry: no bf16 rows, no chunks, boundaries inside tiles
    // and partitions, and a long one.
    let entries = [(0usize, 5usize), (13, 40), (100, 0), (1, 200), (37, 3)];
    for &d in &[64usize, 128] {
        for &c in &[1usize, 3, 8, 16] {
            let lens: Vec<usize> = entries.iter().map(|&(n, k)| n + k * c).collect();
            let mut kf = Vec::new();
            let mut vf = Vec::new();
            let mut dk = Vec::new();
            let mut dv = Vec::new();
            for (&(n, k), &len) in entries.iter().zip(&lens) {
                let (kb, kff) = rand_bf16(&mut rng, len * d, 1.0);
                let (vb, vff) = chunked_values(&mut rng, n, k, c, d);
                dk.push(dev.upload(&kb).unwrap());
                dv.push(dev.upload(&vb).unwrap());
                kf.push(kff);
                vf.push(vff);
            }
            let dense: Vec<usize> = entries.iter().map(|e| e.0).collect();
            let seqs: Vec<_> = (0..entries.len()).map(|b| (&dk[b], &dv[b], lens[b])).collect();
            let table = KvTable::new(&ops, &seqs, d)
                .unwrap()
                .with_value_chunks(&ops, &dense, c)
                .unwrap();
            for &group in &[1usize, 4, 8] {
                let shape = AttnShape {
                    heads: group,
                    kv_heads: 1,
                    head_dim: d,
                };
                let batch = entries.len();
                let (q, qf) = rand_bf16(&mut rng, batch * group * d, 3.0);
                let dq = dev.upload(&q).unwrap();
                let want = last_row_attention(&qf, &kf, &vf, &lens, shape);
                for part in [Some(16), Some(64), None] {
                    let mut out = dev.zeros::<bf16>(batch * group * d).unwrap();
                    ops.fill_nan_bf16(&mut out).unwrap();
                    ws.poison(&ops).unwrap();
                    match part {
                        Some(p) => ops.flash_decode_with_partition(&mut out, &dq, &table, shape, &mut ws, p),
                        None => ops.flash_decode(&mut out, &dq, &table, shape, &mut ws),
                    }
                    .unwrap();
                    let got = f32s(&dev.download(&out).unwrap());
                    let case = format!("d={d},chunk={c},group={group},part={part:?}");
                    check_attention_rows("flash_decode_q8", &case, &got, &want, d, &mut worst);
                }
            }
        }
    }
    worst.report(
        "flash_decode_q8",
        "d=64/128,chunk=1/3/8/16,groups=1/4/8,part=16/64/auto,dense rows 0/1/13/37/100",
    );
    // A table whose chunks do not fill its rows, or that a bf16-only kernel would read.
    let k = dev.zeros::<bf16>(20 * 64).unwrap();
    let t = || KvTable::new(&ops, &[(&k, &k, 20)], 64).unwrap();
    let e = t()
        .with_value_chunks(&ops, &[3], 8)
        .err()
        .expect("3 + 17 rows are not whole chunks");
    assert!(format!("{e:#}").contains("whole chunks"), "{e:#}");
    assert!(
        t().with_value_chunks(&ops, &[4, 4], 8).is_err(),
        "two dense lengths for one sequence"
    );
}

/// Chunk `k`'s rows (of `c`) after an entry's `dense` bf16 rows, as words of a buffer of
/// rows of `d`.
fn chunk_words(dense: usize, k: usize, c: usize, d: usize) -> std::ops::Range<usize> {
    (dense + k * c) * d..(dense + (k + 1) * c) * d
}

#[test]
fn flash_decode_in_two_passes_reads_pending_slots_only_in_the_second() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("flash_decode_two_passes");
    let mut ws = DecodeWorkspace::new();
    let mut worst = Errors::default();
    // (dense rows, chunks) per entry, as in the 8-bit test; the pending slots of each are
    // drawn at random: none, some, every one (where the entry's first partitions then hold
    // nothing for the ready pass or the pending one).
    let entries = [(0usize, 5usize), (13, 40), (100, 0), (1, 200), (37, 3), (20, 9)];
    let slots = 256;
    for &d in &[64usize, 128] {
        for &c in &[1usize, 3, 8, 16] {
            let batch = entries.len();
            let lens: Vec<usize> = entries.iter().map(|&(n, k)| n + k * c).collect();
            let (mut kb, mut kf, mut vb, mut vf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (&(n, k), &len) in entries.iter().zip(&lens) {
                let (kw, kff) = rand_bf16(&mut rng, len * d, 1.0);
                let (vw, vff) = chunked_values(&mut rng, n, k, c, d);
                kb.push(kw);
                kf.push(kff);
                vb.push(vw);
                vf.push(vff);
            }
            // Each entry's list: its pending slots (in random order) first, then some of
            // its other slots (as a step's tier hits follow its fetched misses), then none.
            let mut list = vec![-1i32; batch * slots * 2];
            let mut count = vec![0i32; batch];
            let mut pending: Vec<Vec<usize>> = Vec::new();
            for (e, &(_, k)) in entries.iter().enumerate() {
                // (1, 200) all pending: at 8 and 16 rows a chunk its pending rows take
                // several partitions of their own.
                let share = [0.0, 0.3, 1.0, 1.0, 0.0, 0.3][e];
                let mut order: Vec<usize> = (0..k).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                let np = ((k as f64) * share).round() as usize;
                for (j, &s) in order.iter().enumerate() {
                    list[(e * slots + j) * 2] = s as i32;
                    list[(e * slots + j) * 2 + 1] = rng.random_range(0..10_000);
                }
                count[e] = np as i32;
                pending.push(order[..np].to_vec());
            }
            let dlist = dev.upload(&list).unwrap();
            let dcount = dev.upload(&count).unwrap();
            let pend = PendingSlots {
                list: &dlist,
                count: &dcount,
                slots,
            };
            // The caches as the ready pass finds them: the pending slots' keys and values
            // are NaN words (their codes 0xff, their scales NaN).
            let poisoned = |e: usize, words: &[bf16]| -> CudaSlice<bf16> {
                let mut w = words.to_vec();
                for &s in &pending[e] {
                    w[chunk_words(entries[e].0, s, c, d)].fill(bf16::from_bits(0xffff));
                }
                dev.upload(&w).unwrap()
            };
            let mut dk: Vec<_> = kb.iter().enumerate().map(|(e, w)| poisoned(e, w)).collect();
            let mut dv: Vec<_> = vb.iter().enumerate().map(|(e, w)| poisoned(e, w)).collect();
            let dense: Vec<usize> = entries.iter().map(|e| e.0).collect();
            for &group in &[1usize, 4, 8] {
                let shape = AttnShape {
                    heads: group,
                    kv_heads: 1,
                    head_dim: d,
                };
                let (q, qf) = rand_bf16(&mut rng, batch * group * d, 3.0);
                let dq = dev.upload(&q).unwrap();
                let want = last_row_attention(&qf, &kf, &vf, &lens, shape);
                for part in [16usize, 64, 1024] {
                    let mut out = dev.zeros::<bf16>(batch * group * d).unwrap();
                    ops.fill_nan_bf16(&mut out).unwrap();
                    ws.poison(&ops).unwrap();
                    for (e, (k, v)) in dk.iter_mut().zip(dv.iter_mut()).enumerate() {
                        *k = poisoned(e, &kb[e]);
                        *v = poisoned(e, &vb[e]);
                    }
                    {
                        let seqs: Vec<_> = (0..batch).map(|b| (&dk[b], &dv[b], lens[b])).collect();
                        let table = KvTable::new(&ops, &seqs, d)
                            .unwrap()
                            .with_value_chunks(&ops, &dense, c)
                            .unwrap();
                        ops.flash_decode_pass(&mut out, &dq, &table, shape, &mut ws, part, DecodePass::Ready(pend))
                            .unwrap();
                    }
                    // The fetch lands: the pending slots' true keys and values.
                    dev.synchronize().unwrap();
                    for (b, (k, v)) in dk.iter_mut().zip(dv.iter_mut()).enumerate() {
                        *k = dev.upload(&kb[b]).unwrap();
                        *v = dev.upload(&vb[b]).unwrap();
                    }
                    let seqs: Vec<_> = (0..batch).map(|b| (&dk[b], &dv[b], lens[b])).collect();
                    let table = KvTable::new(&ops, &seqs, d)
                        .unwrap()
                        .with_value_chunks(&ops, &dense, c)
                        .unwrap();
                    let got_nan = f32s(&dev.download(&out).unwrap());
                    assert!(got_nan.iter().all(|v| v.is_nan()), "the ready pass wrote the output");
                    ops.flash_decode_pass(&mut out, &dq, &table, shape, &mut ws, part, DecodePass::Pending(pend))
                        .unwrap();
                    let got = f32s(&dev.download(&out).unwrap());
                    let case = format!("d={d},chunk={c},group={group},part={part}");
                    check_attention_rows("flash_decode_two_passes", &case, &got, &want, d, &mut worst);
                }
            }
        }
    }
    worst.report(
        "flash_decode_two_passes",
        "d=64/128,chunk=1/3/8/16,groups=1/4/8,part=16/64/1024,none/30 %/all slots pending, NaN until the second pass",
    );
    // Lists too short for the table, and a bf16-only table, are refused.
    let k = dev.zeros::<bf16>(16 * 64).unwrap();
    let table = KvTable::new(&ops, &[(&k, &k, 16)], 64).unwrap();
    let list = dev.zeros::<i32>(2 * 8).unwrap();
    let count = dev.zeros::<i32>(1).unwrap();
    let q = dev.zeros::<bf16>(64).unwrap();
    let mut out = dev.zeros::<bf16>(64).unwrap();
    let shape = AttnShape {
        heads: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    let short = PendingSlots {
        list: &list,
        count: &count,
        slots: 16,
    };
    let e = ops
        .flash_decode_pass(&mut out, &q, &table, shape, &mut ws, 16, DecodePass::Ready(short))
        .unwrap_err();
    assert!(format!("{e:#}").contains("pending slots"), "{e:#}");
    let fits = PendingSlots { slots: 8, ..short };
    let e = ops
        .flash_decode_pass(&mut out, &q, &table, shape, &mut ws, 16, DecodePass::Ready(fits))
        .unwrap_err();
    assert!(format!("{e:#}").contains("8-bit chunks"), "{e:#}");
}

#[test]
fn flash_decode_rejects_bad_shapes() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let k = dev.zeros::<bf16>(10 * 128).unwrap();
    let q = dev.zeros::<bf16>(16 * 128).unwrap();
    let mut out = dev.zeros::<bf16>(16 * 128).unwrap();
    let mut ws = DecodeWorkspace::new();
    // Caches shorter than the length claimed.
    assert!(KvTable::new(&ops, &[(&k, &k, 11)], 128).is_err());
    let table = KvTable::new(&ops, &[(&k, &k, 10)], 128).unwrap();
    let bad = [
        AttnShape {
            heads: 16,
            kv_heads: 1,
            head_dim: 128,
        }, // group 16 > 8
        AttnShape {
            heads: 3,
            kv_heads: 2,
            head_dim: 128,
        }, // uneven groups
        AttnShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 96,
        }, // unsupported head dim
    ];
    for s in bad {
        assert!(
            ops.flash_decode(&mut out, &q, &table, s, &mut ws).is_err(),
            "{s:?} accepted"
        );
    }
}
