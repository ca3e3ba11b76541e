//! ShadowKV's GPU kernels (`shadowkv::cuda::shadow`) against the CPU reference
//! (`shadowkv::shadow`), on f32 copies of the same bf16-rounded inputs, in the style of
//! tests/cuda_kernels.rs: every test draws fresh random inputs (the seed is printed;
//! `SHADOWKV_TEST_SEED=N` repeats a run), poisons its outputs before launching (NaN,
//! or a sentinel for integers), checks that no poison is left where a kernel writes and
//! that nothing changed where it must not write, and runs batches of sequences of
//! different lengths in one launch, chunk counts that are not multiples of any tile,
//! d = 64 and 128, groups 1, 3, 4, 7 and 8, SmolLM2's shape (3 KV heads, d 64, group 3)
//! and Llama-3.1-8B's (8, 128, 4), up to 16K chunks per head for the selection (and, for
//! the top-k, rows longer than shared memory holds). The kernels that read or write the
//! value pools (fetch, pool write, fold, tier fill) get sequences in the registered host
//! pool and in GPU value slots (device memory) in the same launch, each checked against
//! the bytes of its own pool. Without a CUDA device each test
//! prints `skipped: no CUDA device (...)` and passes (`SHADOWKV_REQUIRE_CUDA=1` turns
//! that into a failure, as tools/gpu-check sets it).
//!
//! Tolerances, and why:
//! - landmark scores (8-bit landmark codes times the query in 15 bits, exact in integers,
//!   then fp32; the softmax's normaliser over up to 16K chunks sums in another order than
//!   the CPU's): every score within (2⁻¹³ + r_q)·|ref| + 10⁻⁹·max|ref|, r_q the bound of
//!   the query's rounding (`query_rtol`: about 10⁻³ on these inputs); outlier chunks
//!   exactly -inf;
//! - top-k (on the GPU's own scores, and on quantised scores full of ties), reuse diff,
//!   outlier selection (on the GPU's own cosines): exact. Against the CPU's selection
//!   from its own scores (end-to-end test, outliers), the same chunks except near ties:
//!   a chunk chosen by one side only must score within the score tolerance of the last
//!   one chosen;
//! - key rebuild and the fold's projection onto the basis (fp32 sums of rank or
//!   kv_heads·d products, stored bf16): every element within 2⁻⁷·|ref| + 10⁻⁴·rms(ref)
//!   (bf16 rounding, one step more at a rounding boundary; sums that cancel keep fp32's
//!   absolute error); the rotation is rope.cu's arithmetic;
//! - the append's q and k (RoPE, as the rope test of tests/cuda_kernels.rs): within
//!   2⁻⁷·|ref| + 10⁻⁵·max|ref|; its v and pre-RoPE k: bit-exact (bf16 of the same fp32
//!   sum);
//! - landmarks (the same fp32 sum in the same token order, then the same 8-bit rounding):
//!   codes and scales bit-exact;
//! - minimum cosines (fp32 dot products of d terms and two square roots, |cos| ≤ 1):
//!   within 2·10⁻⁵;
//! - every copy (value fetch, scatter, prefill placement, pool writes, the fold's values
//!   and its shift of the recent window, the GPU value tier's fill and copies): bit-exact;
//!   the tier's table against a FIFO model of it: exact;
//! - one layer's decode end to end (flash-decoding over the rows the stages assembled,
//!   against the CPU's attention over [recent | outliers | selected chunks], the rebuilt
//!   keys rounded to bf16 as the GPU stores them): per sequence and query head
//!   ‖out − ref‖ / ‖ref‖ ≤ 10⁻² and every element within 2·10⁻²·max|ref| (the
//!   flash-decoding tolerance: probabilities go through the tensor cores as bf16).
//!
//! Each check prints `RESULT <kernel> <case> ...` as tests/cuda_kernels.rs does
//! (`exact` for the bit-exact and integer ones).

mod common;

use common::gpu_check::*;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use half::bf16;
use memmap2::MmapMut;
use rand::rngs::StdRng;
use rand::Rng;
use shadowkv::cpu::attention::{causal_attention, AttnJob, AttnShape};
use shadowkv::cpu::codes8;
use shadowkv::cpu::ops::Rope;
use shadowkv::cuda::shadow::stages::stamp_ms;
use shadowkv::cuda::shadow::timeline::{gpu_clock_now, Stamps};
use shadowkv::cuda::shadow::{
    DevicePool, HostMapping, LayerBuffers, RebuildLists, SeqCounts, ShadowLayout, ShadowTable, StepScratch,
    FETCH_BLOCKS,
};
use shadowkv::cuda::testing::ops_or_skip;
use shadowkv::cuda::{rope_inv_freq, CudaOps, DecodeWorkspace, KvTable};
use shadowkv::model::config::ModelConfig;
use shadowkv::model::synthetic::preset;
use shadowkv::pool::{PoolShape, ValueFormat};
use shadowkv::shadow::factor::LowRank;
use shadowkv::shadow::landmarks::{landmarks, min_cosines, outlier_chunks, Marks8};
use shadowkv::shadow::reuse::SlotTable;
use shadowkv::shadow::select::{chunk_scores, top_k, HeadMarks};
use std::collections::{BTreeSet, HashMap};

const SCORE_RTOL: f64 = 1.0 / 8192.0;
const EW_RTOL: f64 = 1.0 / 128.0;
const COS_ATOL: f64 = 2e-5;
const NAN_BITS: u16 = 0x7FC0;

/// A small layout of `kv_heads` heads of dimension `d` and group `g`; tests override
/// what they exercise.
fn small_layout(kv_heads: usize, d: usize, g: usize) -> ShadowLayout {
    ShadowLayout {
        kv_heads,
        head_dim: d,
        group: g,
        chunk: 8,
        rank: 16,
        slots: 16,
        outliers: 2,
        local: 2,
        chunk_cap: 64,
        tier: 0,
    }
}

/// `base` with the heads of `cfg`.
fn layout_of(cfg: &ModelConfig, base: ShadowLayout) -> ShadowLayout {
    let l = ShadowLayout {
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        group: cfg.num_heads / cfg.num_kv_heads,
        ..base
    };
    l.validate().unwrap();
    l
}

fn counts(chunks: usize, recent: usize, outliers: usize, pool_seq: usize) -> SeqCounts {
    SeqCounts {
        chunks: chunks as i32,
        recent: recent as i32,
        outliers: outliers as i32,
        pool_seq: pool_seq as i32,
    }
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Random low-rank coefficients for every token of `l` in 8 bits, as the GPU holds them:
/// rows of values within ±`scale` (one row in 16 zero), each rounded to codes and a scale
/// (`codes8`, as `LowRank::project` rounds). Returns the codes, the scales and the f32
/// values `code · scale` (the CPU reference's `LowRank::u`).
fn rand_coefs(rng: &mut StdRng, l: &ShadowLayout, scale: f32) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let r = l.rank;
    let (mut codes, mut scales, mut vals) = (vec![0i8; l.u_len()], Vec::new(), vec![0f32; l.u_len()]);
    for (q, v) in codes.chunks_exact_mut(r).zip(vals.chunks_exact_mut(r)) {
        let row: Vec<f32> = if rng.random_range(0..16) == 0 {
            vec![0.0; r]
        } else {
            (0..r).map(|_| rng.random_range(-scale..scale)).collect()
        };
        let s = codes8::quantize(&row, q);
        codes8::dequantize(q, s, v);
        scales.push(s);
    }
    (codes, scales, vals)
}

/// Uploads 8-bit coefficients (`rand_coefs`) into `b`.
fn upload_coefs(ops: &CudaOps, b: &mut LayerBuffers, codes: &[i8], scales: &[f32]) {
    b.u = ops.device().upload(codes).unwrap();
    b.u_scales = ops.device().upload(scales).unwrap();
}

/// Random 8-bit landmarks for every chunk of `l`: codes over their whole range and
/// scales about 1/127 (landmark values within about ±1), one vector in 16 zero (scale 0).
fn rand_marks(rng: &mut StdRng, l: &ShadowLayout) -> Marks8 {
    let scales: Vec<f32> = (0..l.chunk_cap * l.kv_heads)
        .map(|_| {
            if rng.random_range(0..16) == 0 {
                0.0
            } else {
                rng.random_range(0.5f32..1.5) / 127.0
            }
        })
        .collect();
    let codes = (0..l.marks_len())
        .map(|i| {
            if scales[i / l.head_dim] == 0.0 {
                0
            } else {
                rng.random_range(-127i8..=127)
            }
        })
        .collect();
    Marks8 { codes, scales }
}

/// Vectors of `n` values, `[chunk, head]` (the CPU's layout) to `[head, chunk]` (the GPU's),
/// or back with `back`.
fn by_head<T: Copy + Default>(v: &[T], l: &ShadowLayout, n: usize, back: bool) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for ch in 0..l.chunk_cap {
        for h in 0..l.kv_heads {
            let (cpu, gpu) = ((ch * l.kv_heads + h) * n, (h * l.chunk_cap + ch) * n);
            let (from, to) = if back { (gpu, cpu) } else { (cpu, gpu) };
            out[to..to + n].copy_from_slice(&v[from..from + n]);
        }
    }
    out
}

/// Uploads `m` (every chunk of `b`'s layout) as `b`'s landmarks.
fn upload_marks(ops: &CudaOps, b: &mut LayerBuffers, m: &Marks8) {
    let l = *b.layout();
    b.marks = ops.device().upload(&by_head(&m.codes, &l, l.head_dim, false)).unwrap();
    b.mark_scales = ops.device().upload(&by_head(&m.scales, &l, 1, false)).unwrap();
}

/// `b`'s landmarks as codes and scales in the CPU's layout.
fn download_marks(ops: &CudaOps, b: &LayerBuffers) -> Marks8 {
    let l = *b.layout();
    Marks8 {
        codes: by_head(&ops.device().download(&b.marks).unwrap(), &l, l.head_dim, true),
        scales: by_head(&ops.device().download(&b.mark_scales).unwrap(), &l, 1, true),
    }
}

/// The relative error the scores' query rounding allows on one KV head's scores: the
/// logits multiply the landmark codes by the query in 15 bits (`q ≈ sq·Q`, `sq =
/// max|q_j| / 32512`, kernels/select.cu), so a logit of query head `j` may be off by
/// `sq/2 · Σ|code| · scale / √d`, and a softmax probability by twice the largest of those.
fn query_rtol(qg: &[f32], m: HeadMarks) -> f64 {
    let d = m.head_dim;
    let kvd = m.kv_heads * d;
    let chunks = m.scales.len() / m.kv_heads;
    let widest = (0..chunks)
        .map(|c| {
            let codes: f64 = m.codes[c * kvd + m.head * d..][..d]
                .iter()
                .map(|&x| (x as f64).abs())
                .sum();
            codes * m.scales[c * m.kv_heads + m.head] as f64
        })
        .fold(0.0, f64::max);
    let sq = qg
        .chunks(d)
        .map(|q| q.iter().fold(0.0f64, |a, &x| a.max((x as f64).abs())))
        .fold(0.0, f64::max)
        / 32512.0;
    2.0 * 0.5 * sq * widest / (d as f64).sqrt()
}

/// Where head `h`'s landmarks of the first `chunks` chunks of `m` live.
fn head_marks<'a>(m: &'a Marks8, l: &ShadowLayout, chunks: usize, h: usize) -> HeadMarks<'a> {
    HeadMarks {
        codes: &m.codes[..chunks * l.kv_width()],
        scales: &m.scales[..chunks * l.kv_heads],
        kv_heads: l.kv_heads,
        head: h,
        head_dim: l.head_dim,
    }
}

/// Asserts a selection row: `want` ascending, then -1 to the row's end.
fn assert_selection(got: &[i32], want: &[u32], what: &str) {
    let w: Vec<i32> = want
        .iter()
        .map(|&c| c as i32)
        .chain(std::iter::repeat(-1))
        .take(got.len())
        .collect();
    assert_eq!(got, &w[..], "{what}");
}

/// The chunk ids of a selection row (up to the first -1).
fn selection_of(row: &[i32]) -> Vec<u32> {
    row.iter().take_while(|&&c| c >= 0).map(|&c| c as u32).collect()
}

/// Asserts that two selections are the same chunks, except chunks taken by one side
/// only whose reference `scores` tie with the lowest score taken (within
/// `rtol`·|that score| + `atol`): fp32 rounding may order near ties either way.
fn assert_same_but_near_ties(want: &[u32], got: &[u32], scores: &[f32], (rtol, atol): (f64, f64), what: &str) {
    if want == got {
        return;
    }
    assert_eq!(
        want.len(),
        got.len(),
        "{what}: {got:?} selected, the CPU selects {want:?}"
    );
    let a: BTreeSet<u32> = want.iter().copied().collect();
    let b: BTreeSet<u32> = got.iter().copied().collect();
    let last = want.iter().map(|&c| scores[c as usize]).fold(f32::INFINITY, f32::min) as f64;
    let diff: Vec<u32> = a.symmetric_difference(&b).copied().collect();
    for &c in &diff {
        let s = scores[c as usize] as f64;
        assert!(
            (s - last).abs() <= rtol * last.abs() + atol,
            "{what}: chunk {c} (score {s}) chosen by one side only, not a near tie of the last ({last})"
        );
    }
    eprintln!("{what}: selections differ at near ties {diff:?}");
}

/// Miss lists of a batch: per (sequence, head), `b * kv_heads + h`, the (slot, chunk)
/// pairs, and the device arrays the kernels take.
struct Misses {
    lists: Vec<Vec<(usize, usize)>>,
    /// `[batch, kv_heads, S]` pairs, unused entries -1.
    pairs: CudaSlice<i32>,
    /// `[batch, kv_heads]`.
    count: CudaSlice<i32>,
}

/// Random miss lists: per (sequence, head) up to `S` distinct slots, each with a
/// distinct chunk below the sequence's chunk count (the first list as long as it can
/// be, so that full lists occur, and holding the last chunk, the largest positions).
fn random_misses(ops: &CudaOps, rng: &mut StdRng, l: &ShadowLayout, chunks: &[usize]) -> Misses {
    let mut lists = Vec::new();
    let mut flat = vec![-1i32; chunks.len() * l.kv_heads * l.slots * 2];
    for (b, &n) in chunks.iter().enumerate() {
        for h in 0..l.kv_heads {
            let most = l.slots.min(n);
            let m = if b == 0 && h == 0 {
                most
            } else {
                rng.random_range(0..=most)
            };
            let slots = rand::seq::index::sample(rng, l.slots, m).into_vec();
            let mut ids = rand::seq::index::sample(rng, n, m).into_vec();
            if b == 0 && h == 0 && m > 0 {
                ids[0] = n - 1;
                ids.sort_unstable();
                ids.dedup();
                while ids.len() < m {
                    let c = rng.random_range(0..n);
                    if !ids.contains(&c) {
                        ids.push(c);
                    }
                }
            }
            let list: Vec<(usize, usize)> = slots.into_iter().zip(ids).collect();
            let e = b * l.kv_heads + h;
            for (j, &(s, c)) in list.iter().enumerate() {
                flat[(e * l.slots + j) * 2] = s as i32;
                flat[(e * l.slots + j) * 2 + 1] = c as i32;
            }
            lists.push(list);
        }
    }
    let cnt: Vec<i32> = lists.iter().map(|x| x.len() as i32).collect();
    Misses {
        lists,
        pairs: ops.device().upload(&flat).unwrap(),
        count: ops.device().upload(&cnt).unwrap(),
    }
}

/// The bytes of a pool of `shape` holding random values: each chunk's token rows as
/// random codes (within ±127, one of them ±127) and a scale 2^-k (k in 0..=10), zero
/// padding. Such a row is exact in bf16 (codes need 7 bits) and quantizes back to the
/// same codes and scale, so a chunk made from its bf16 values has the same bytes.
fn random_pool_bytes(rng: &mut StdRng, shape: &PoolShape) -> Vec<u8> {
    let (cb, cv, d) = (shape.chunk_bytes(), shape.chunk_values(), shape.head_dim);
    let mut out = vec![0u8; shape.bytes().unwrap()];
    for chunk in out.chunks_exact_mut(cb) {
        for r in 0..shape.chunk {
            let row = &mut chunk[r * d..(r + 1) * d];
            for q in row.iter_mut() {
                *q = rng.random_range(-127i8..=127) as u8;
            }
            row[rng.random_range(0..d)] = if rng.random_bool(0.5) { 127 } else { -127i8 as u8 };
            let s = (-(rng.random_range(0..=10) as f32)).exp2();
            chunk[cv + 4 * r..cv + 4 * r + 4].copy_from_slice(&s.to_le_bytes());
        }
    }
    out
}

/// An anonymous map for a pool of `shape` (page-aligned, as the real pools are), filled
/// with random values ([`random_pool_bytes`]); also returns its bytes.
fn random_pool(rng: &mut StdRng, shape: &PoolShape) -> (MmapMut, Vec<u8>) {
    let bytes = random_pool_bytes(rng, shape);
    let mut map = MmapMut::map_anon(bytes.len()).unwrap();
    map.copy_from_slice(&bytes);
    (map, bytes)
}

/// The values of one chunk of a pool (its bytes, `shape`'s format) as the kernels write
/// them to the attention buffers: bf16 of code × scale (the product in f32).
fn chunk_values(bytes: &[u8], shape: &PoolShape) -> Vec<bf16> {
    let cv = shape.chunk_values();
    (0..cv)
        .map(|i| {
            let r = i / shape.head_dim;
            let s = f32::from_le_bytes(bytes[cv + 4 * r..cv + 4 * r + 4].try_into().unwrap());
            bf16::from_f32(bytes[i] as i8 as f32 * s)
        })
        .collect()
}

/// The bytes of a chunk in 8 bits as the `u16` words of a bf16 attention buffer they
/// fill when held in place (a slot's values: the first bytes of its rows of `av`).
fn slot_words(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|w| u16::from_le_bytes([w[0], w[1]]))
        .collect()
}

/// A chunk's rows of bf16 values (token order, `c·d`) in 8 bits as the pools hold them
/// (the CPU reference's rounding, `codes8::quantize`): codes, then scales; no padding.
fn quantize_chunk(rows: &[bf16], d: usize) -> Vec<u8> {
    let (mut codes, mut scales) = (Vec::new(), Vec::new());
    for row in rows.chunks(d) {
        let f: Vec<f32> = row.iter().map(|v| v.to_f32()).collect();
        let mut q = vec![0i8; d];
        scales.extend_from_slice(&codes8::quantize(&f, &mut q).to_le_bytes());
        codes.extend(q.iter().map(|&x| x as u8));
    }
    codes.extend(scales);
    codes
}

/// `n` GPU value slots after a test's host pool of `shape` (mapped at `host`): random
/// values in device memory, the two pools as the kernels see them, and the slots'
/// bytes.
fn with_dev_slots(
    ops: &CudaOps,
    rng: &mut StdRng,
    shape: &PoolShape,
    host: u64,
    n: usize,
) -> (DevicePool, CudaSlice<u8>, Vec<u8>) {
    let vals = random_pool_bytes(rng, &PoolShape { seqs: n, ..*shape });
    let buf = ops.device().upload(&vals).unwrap();
    let dev = buf.device_ptr(ops.device().stream()).0;
    let pool = DevicePool {
        host,
        dev,
        shape: *shape,
        dev_seqs: n,
    };
    (pool, buf, vals)
}

/// The bytes of chunk `c` of head `h` of global slot `seq` at `layer`, from the host
/// pool's or the GPU value slots', whichever holds the slot.
fn chunk_ref<'a>(
    pool: &DevicePool,
    (host, dev): (&'a [u8], &'a [u8]),
    (layer, seq, h, c): (usize, usize, usize, usize),
) -> &'a [u8] {
    let vals = if pool.on_device(seq) { dev } else { host };
    &vals[pool.chunk_offset(layer, seq, h, c)..][..pool.shape.chunk_bytes()]
}

/// Element offset of one row of head `h` in an attention buffer.
fn attn_at(l: &ShadowLayout, h: usize, row: usize) -> usize {
    (h * l.rows_cap() + row) * l.head_dim
}

#[test]
fn scores_and_top_k_match_the_cpu() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_select");
    // (kv_heads, d, group, chunks of each sequence, S)
    // More heads than two 1024-thread blocks an SM take at once: the top-k in half-size
    // blocks.
    let many: Vec<usize> = (0..2 * ops.device().info().sm_count as usize / 8 + 1)
        .map(|i| [2049, 700, 300, 1][i % 4])
        .collect();
    assert!(
        ops.top_k_half_blocks(8 * many.len()),
        "the many-heads case takes the large blocks"
    );
    let cases: &[(usize, usize, usize, &[usize], usize)] = &[
        (3, 64, 3, &[1000, 37, 5, 0], 32),
        (8, 128, 4, &[2049, 700], 256),
        (2, 128, 1, &[300, 301, 1], 64),
        (2, 64, 7, &[513], 20),
        (1, 64, 8, &[16_381], 512),
        (8, 128, 4, &[16_384], 256),
        (8, 128, 4, &[15_616, 15_616], 256),
        (8, 128, 4, &many, 256),
    ];
    for &(kvh, d, g, chunks, slots) in cases {
        let chunk_cap = chunks.iter().max().unwrap() + 3;
        let l = ShadowLayout {
            slots,
            chunk_cap,
            ..small_layout(kvh, d, g)
        };
        l.validate().unwrap();
        let case = format!("kv_heads={kvh},d={d},group={g},chunks={chunks:?},S={slots}");
        let batch = chunks.len();
        let mut bufs = Vec::new();
        let mut marks_all = Vec::new();
        let mut flags_all = Vec::new();
        for &n in chunks {
            let mut b = LayerBuffers::new(&ops, l).unwrap();
            let m = rand_marks(&mut rng, &l);
            let mut flags: Vec<u8> = (0..kvh * chunk_cap).map(|_| rng.random_bool(0.1) as u8).collect();
            if n == 5 {
                // A head whose every chunk is an outlier: nothing to select.
                flags[..chunk_cap].fill(1);
            }
            upload_marks(&ops, &mut b, &m);
            b.outlier = dev.upload(&flags).unwrap();
            bufs.push(b);
            marks_all.push(m);
            flags_all.push(flags);
        }
        let entries: Vec<(&LayerBuffers, SeqCounts)> =
            bufs.iter().zip(chunks).map(|(b, &n)| (b, counts(n, 0, 0, 0))).collect();
        let table = ShadowTable::new(&ops, &entries).unwrap();
        // Queries of spread 3: q·landmark/√d of standard deviation about 1.
        let (q, qf) = rand_bf16(&mut rng, batch * kvh * g * d, 3.0);
        let dq = dev.upload(&q).unwrap();
        let mut scratch = StepScratch::new(&ops, &l, batch).unwrap();
        ops.fill_nan_f32(&mut scratch.scores).unwrap();
        scratch.selected = dev.upload(&vec![i32::MIN; batch * kvh * slots]).unwrap();
        ops.shadow_scores(&table, &dq, &mut scratch).unwrap();
        ops.shadow_select(&table, &mut scratch, true).unwrap();
        let got = dev.download(&scratch.scores).unwrap();
        let sel = dev.download(&scratch.selected).unwrap();
        let mut worst = Errors::default();
        for (b, &n) in chunks.iter().enumerate() {
            for h in 0..kvh {
                let what = format!("{case},seq={b},head={h}");
                let ex: Vec<bool> = flags_all[b][h * chunk_cap..][..n].iter().map(|&f| f != 0).collect();
                let qg = &qf[(b * kvh + h) * g * d..][..g * d];
                let want = chunk_scores(qg, head_marks(&marks_all[b], &l, n, h), &ex);
                let rtol = SCORE_RTOL + query_rtol(qg, head_marks(&marks_all[b], &l, n, h));
                let row = &got[(b * kvh + h) * chunk_cap..][..chunk_cap];
                for c in 0..n {
                    if ex[c] {
                        assert_eq!(row[c], f32::NEG_INFINITY, "{what}: outlier chunk {c}");
                    }
                }
                assert!(row[n..].iter().all(|v| v.is_nan()), "{what}: written past the chunks");
                let (gs, ws): (Vec<f32>, Vec<f32>) = (0..n).filter(|&c| !ex[c]).map(|c| (row[c], want[c])).unzip();
                if !ws.is_empty() {
                    let atol = 1e-9 * max_abs(&ws);
                    worst = worst.worst(errors("shadow_scores", &what, &gs, &ws, |_, w| rtol * w.abs() + atol));
                }
                // The top-k of the GPU's own scores, exactly.
                let want_sel = top_k(&row[..n], &ex, slots);
                assert_selection(
                    &sel[(b * kvh + h) * slots..][..slots],
                    &want_sel,
                    &format!("top-k {what}"),
                );
            }
        }
        worst.report("shadow_scores", &case);
        Errors::default().report("shadow_top_k", &format!("{case},exact"));
    }
}

/// Runs `shadow_top_k` over sequences of `chunks` chunks of `kvh` heads, each score
/// drawn by `draw`, a fifth of the chunks outliers, and checks every head's selection of
/// `slots` chunks against the CPU's `top_k`, exactly.
fn check_top_k(
    ops: &CudaOps,
    rng: &mut StdRng,
    (kvh, chunks, slots): (usize, &[usize], usize),
    draw: impl Fn(&mut StdRng) -> f32,
    what: &str,
) {
    let dev = ops.device();
    let chunk_cap = chunks.iter().max().unwrap() + 5;
    let l = ShadowLayout {
        slots,
        chunk_cap,
        ..small_layout(kvh, 64, 1)
    };
    let case = format!("kv_heads={kvh},chunks={chunks:?},S={slots}");
    let batch = chunks.len();
    let mut bufs = Vec::new();
    let mut flags_all = Vec::new();
    // Scores past a sequence's chunks are NaN, which would be the largest: a kernel
    // reading them would select them.
    let mut scores = vec![f32::NAN; batch * kvh * chunk_cap];
    for (b, &n) in chunks.iter().enumerate() {
        let mut lb = LayerBuffers::new(ops, l).unwrap();
        let flags: Vec<u8> = (0..kvh * chunk_cap).map(|_| rng.random_bool(0.2) as u8).collect();
        lb.outlier = dev.upload(&flags).unwrap();
        bufs.push(lb);
        flags_all.push(flags);
        for h in 0..kvh {
            for c in 0..n {
                scores[(b * kvh + h) * chunk_cap + c] = draw(rng);
            }
        }
    }
    let entries: Vec<(&LayerBuffers, SeqCounts)> =
        bufs.iter().zip(chunks).map(|(b, &n)| (b, counts(n, 0, 0, 0))).collect();
    let table = ShadowTable::new(ops, &entries).unwrap();
    let ds = dev.upload(&scores).unwrap();
    let mut selected = dev.upload(&vec![i32::MIN; batch * kvh * slots]).unwrap();
    ops.shadow_top_k(&table, &ds, &mut selected).unwrap();
    let sel = dev.download(&selected).unwrap();
    for (b, &n) in chunks.iter().enumerate() {
        for h in 0..kvh {
            let ex: Vec<bool> = flags_all[b][h * chunk_cap..][..n].iter().map(|&f| f != 0).collect();
            let want = top_k(&scores[(b * kvh + h) * chunk_cap..][..n], &ex, slots);
            assert_selection(
                &sel[(b * kvh + h) * slots..][..slots],
                &want,
                &format!("{case},{what},seq={b},head={h}"),
            );
        }
    }
    Errors::default().report("shadow_top_k", &format!("{case},{what},exact"));
}

#[test]
fn top_k_is_exact_with_many_ties() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("shadow_top_k_ties");
    // Few distinct values, signed zeros among them (total order: -0 < +0).
    let values = [-1.0f32, -0.0, 0.0, 0.25, 0.5, 0.5, 0.75, 1.0, f32::NEG_INFINITY];
    // (kv_heads, chunks of each sequence, S)
    let cases: &[(usize, &[usize], usize)] = &[
        (2, &[16_381, 9000], 512),
        (3, &[100, 30, 0, 1, 64], 64),
        (1, &[5000, 2], 1),
        (4, &[1025, 1023, 1024], 300),
        (8, &[15_616, 15_616], 256),
    ];
    for &case in cases {
        check_top_k(
            &ops,
            &mut rng,
            case,
            |r| values[r.random_range(0..values.len())],
            "ties",
        );
    }
}

/// With more heads than two 1024-thread blocks an SM take at once, the top-k runs in
/// half-size blocks (`shadow_top_k_half`: 10-bit digits, up to four passes): the same
/// exact selections, over spread values and over many ties.
#[test]
fn top_k_in_half_size_blocks_is_exact() {
    let Some(ops) = ops_or_skip() else { return };
    let mut rng = seeded("shadow_top_k_half");
    let seqs = 2 * ops.device().info().sm_count as usize / 8 + 1;
    let chunks: Vec<usize> = (0..seqs).map(|i| [7680, 3001, 257, 0, 1][i % 5]).collect();
    assert!(
        ops.top_k_half_blocks(8 * seqs),
        "{seqs} sequences take the large blocks"
    );
    check_top_k(&ops, &mut rng, (8, &chunks, 256), |r| r.random::<f32>(), "half blocks");
    let values = [-1.0f32, -0.0, 0.0, 0.5, 1.0];
    check_top_k(
        &ops,
        &mut rng,
        (8, &chunks, 256),
        |r| values[r.random_range(0..values.len())],
        "half blocks, ties",
    );
}

/// The selection stops at the radix digit whose bin it takes whole; the key just below
/// that bin (present here) is then left out. Row 0 stops after the first digit (3 and 2
/// taken, the float under 2 not), row 1 after the second (two values of one 11-bit bin
/// and the float just under the second's 22-bit bin), with noise below them all.
#[test]
fn top_k_is_exact_where_a_bin_is_taken_whole() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_top_k_whole_bin");
    let (n, k) = (3000usize, 2usize);
    let under = |x: f32| f32::from_bits(x.to_bits() - 1);
    let in_bin = |m: u32| f32::from_bits(0x4020_0000 + m); // [2.5, 3): one 11-bit bin
    let rows: [Vec<f32>; 2] = [
        vec![3.0, 2.0, under(2.0), under(2.0), under(2.0)],
        vec![
            in_bin(3 << 15),
            in_bin(2 << 15),
            under(in_bin(2 << 15)),
            in_bin(1 << 15),
        ],
    ];
    let mut vals = Vec::new();
    for special in &rows {
        let mut row: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
        // At distinct places, not in value order.
        for (j, &v) in special.iter().enumerate() {
            row[(j * 613 + 2999) % n] = v;
        }
        vals.extend(row);
    }
    let dv = dev.upload(&vals).unwrap();
    let mut out = dev.upload(&vec![i32::MIN; rows.len() * k]).unwrap();
    ops.top_k_rows(&mut out, &dv, rows.len(), (n, n), k).unwrap();
    let got = dev.download(&out).unwrap();
    for r in 0..rows.len() {
        let want = top_k(&vals[r * n..][..n], &vec![false; n], k);
        assert_selection(&got[r * k..][..k], &want, &format!("whole bin, row={r}"));
    }
    Errors::default().report("topk_rows", "a bin taken whole, exact");
}

/// The top-k kernels keep a row's keys in shared memory where they fit
/// ([`CudaOps::top_k_shared_keys`]) and read global memory at each pass where not: both
/// ways exact, on distinct values and on ties, and where the k-th key is the lowest one
/// (the -NaN with every bit set, whose key is that of an excluded chunk).
#[test]
fn top_k_is_exact_in_and_beyond_shared_memory() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_top_k_shared");
    let fit = ops.top_k_shared_keys();
    eprintln!("top-k: {fit} keys fit in shared memory");
    let big = fit + 1000;
    let values = [-1.0f32, 0.0, 0.25, 0.5, 1.0];
    let lowest = f32::from_bits(u32::MAX);
    for (case, what) in [
        ((2usize, &[big, 3000][..], 256usize), "beyond"),
        ((2, &[3000, 2999][..], 256), "within"),
    ] {
        check_top_k(&ops, &mut rng, case, |r| r.random::<f32>(), &format!("{what},distinct"));
        check_top_k(
            &ops,
            &mut rng,
            case,
            |r| values[r.random_range(0..values.len())],
            &format!("{what},ties"),
        );
        // Four fifths of the scores the lowest key: about 480 other candidates of 3000
        // chunks, so the 1000th best is the lowest key.
        let case = (case.0, case.1, 1000);
        check_top_k(
            &ops,
            &mut rng,
            case,
            |r| if r.random_bool(0.8) { lowest } else { r.random::<f32>() },
            &format!("{what},lowest"),
        );
    }
    // topk_rows (no exclusions): rows within and beyond shared memory, k above n.
    for &(rows, n, k) in &[(3usize, 1000usize, 24usize), (2, big, 300), (1, 100, 200)] {
        let stride = n + 3;
        let vals: Vec<f32> = (0..rows * stride)
            .map(|_| {
                if rng.random_bool(0.5) {
                    values[rng.random_range(0..values.len())]
                } else {
                    rng.random::<f32>()
                }
            })
            .collect();
        let dv = dev.upload(&vals).unwrap();
        let mut out = dev.upload(&vec![i32::MIN; rows * k]).unwrap();
        ops.top_k_rows(&mut out, &dv, rows, (n, stride), k).unwrap();
        let got = dev.download(&out).unwrap();
        for r in 0..rows {
            let want = top_k(&vals[r * stride..][..n], &vec![false; n], k);
            assert_selection(
                &got[r * k..][..k],
                &want,
                &format!("topk_rows rows={rows},n={n},k={k},row={r}"),
            );
        }
        Errors::default().report("topk_rows", &format!("rows={rows},n={n},k={k},exact"));
    }
}

#[test]
fn reuse_diff_matches_slot_table_plan_over_many_steps() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_reuse");
    // (kv_heads, S, batch); 300 slots span two tiles of the kernel's 256 threads.
    for &(kvh, slots, batch) in &[(3usize, 7usize, 2usize), (8, 64, 3), (1, 300, 2), (2, 1, 4)] {
        let l = ShadowLayout {
            slots,
            chunk_cap: 4 * slots + 10,
            ..small_layout(kvh, 64, 1)
        };
        let case = format!("kv_heads={kvh},S={slots},batch={batch}");
        let bufs: Vec<LayerBuffers> = (0..batch).map(|_| LayerBuffers::new(&ops, l).unwrap()).collect();
        let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs.iter().map(|b| (b, counts(l.chunk_cap, 0, 0, 0))).collect();
        let table = ShadowTable::new(&ops, &entries).unwrap();
        let mut cpu: Vec<SlotTable> = (0..batch * kvh).map(|_| SlotTable::new(slots)).collect();
        let mut prev: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); batch * kvh];
        let mut scratch = StepScratch::new(&ops, &l, batch).unwrap();
        let mut hits_cpu = 0u64;
        let (mut total_hits, mut total_misses) = (0usize, 0usize);
        for step in 0..40 {
            // Each head keeps part of its last selection and adds new chunks.
            let mut flat = vec![-1i32; batch * kvh * slots];
            let mut sels = Vec::new();
            for (e, p) in prev.iter_mut().enumerate() {
                let k = rng.random_range(0..=slots);
                let mut set: BTreeSet<u32> = p.iter().copied().filter(|_| rng.random_bool(0.7)).collect();
                while set.len() < k {
                    set.insert(rng.random_range(0..l.chunk_cap as u32));
                }
                let mut sel: Vec<u32> = set.into_iter().collect();
                while sel.len() > k {
                    sel.remove(rng.random_range(0..sel.len()));
                }
                for (i, &c) in sel.iter().enumerate() {
                    flat[e * slots + i] = c as i32;
                }
                *p = sel.iter().copied().collect();
                sels.push(sel);
            }
            scratch.selected = dev.upload(&flat).unwrap();
            scratch.misses = dev.upload(&vec![-7i32; batch * kvh * slots * 2]).unwrap();
            scratch.miss_count = dev.upload(&vec![-7i32; batch * kvh]).unwrap();
            ops.shadow_reuse(&table, &mut scratch).unwrap();
            let gm = dev.download(&scratch.misses).unwrap();
            let gc = dev.download(&scratch.miss_count).unwrap();
            let gf = dev.download(&scratch.fetch_count).unwrap();
            let gh = dev.download(&scratch.hits).unwrap();
            assert_eq!(gf, gc, "{case} step {step}: without a tier every miss is fetched");
            assert_eq!(gh[1], 0, "{case} step {step}: tier hits without a tier");
            let gh = gh[0];
            for (b, buf) in bufs.iter().enumerate() {
                let gt = dev.download(&buf.slots).unwrap();
                for h in 0..kvh {
                    let e = b * kvh + h;
                    let what = format!("{case},step={step},seq={b},head={h}");
                    let plan = cpu[e].plan(&sels[e]);
                    hits_cpu += plan.hits as u64;
                    total_hits += plan.hits;
                    total_misses += plan.misses.len();
                    assert_eq!(gc[e] as usize, plan.misses.len(), "{what}: miss count");
                    let want: Vec<i32> = plan.misses.iter().flat_map(|&(s, c)| [s as i32, c as i32]).collect();
                    let row = &gm[e * slots * 2..][..slots * 2];
                    assert_eq!(&row[..want.len()], &want[..], "{what}: misses");
                    assert!(
                        row[want.len()..].iter().all(|&x| x == -7),
                        "{what}: written past the misses"
                    );
                    let table_want: Vec<i32> = cpu[e].slots().iter().map(|s| s.map_or(-1, |c| c as i32)).collect();
                    assert_eq!(&gt[h * slots..][..slots], &table_want[..], "{what}: slot table");
                }
            }
            assert_eq!(gh, hits_cpu, "{case} step {step}: hit counter");
        }
        assert!(
            total_hits > 0 && total_misses > 0,
            "{case}: the steps had no hits or no misses"
        );
        Errors::default().report(
            "shadow_reuse",
            &format!("{case},steps=40,hits={total_hits},misses={total_misses},exact"),
        );
    }
}

/// A step's misses as the tier splits them: (slot, chunk) to fetch, and (slot, chunk,
/// entry) found in the tier.
type TierSplit = (Vec<(usize, u32)>, Vec<(usize, u32, usize)>);

/// One head's GPU value tier as the reuse diff keeps it: a FIFO of `T` entries.
struct TierModel {
    map: HashMap<u32, usize>,
    owner: Vec<Option<u32>>,
    next: usize,
    /// Chunks found in an entry their step's fetch replaced, fetched instead.
    demoted: usize,
}

impl TierModel {
    /// The tier after a prefill filled it with the newest of `chunks` chunks.
    fn filled(t: usize, chunks: usize) -> Self {
        let n = t.min(chunks);
        let mut m = TierModel {
            map: HashMap::new(),
            owner: vec![None; t],
            next: n % t,
            demoted: 0,
        };
        for x in 0..n {
            let c = (chunks - n + x) as u32;
            m.owner[x] = Some(c);
            m.map.insert(c, x);
        }
        m
    }

    /// Splits a step's misses (ascending chunks) into those to fetch and the tier hits
    /// (with their entries), then gives the first `T` fetched ones the next entries. A hit
    /// in an entry that the fetched ones replace is fetched instead: `n` fetched, the
    /// smallest fixed point of n = (misses not in the tier) + (hits in the first min(n, T)
    /// entries from `next`).
    fn step(&mut self, misses: &[(usize, u32)]) -> TierSplit {
        let t = self.owner.len();
        let offset = |e: usize| (e + t - self.next) % t;
        let absent = misses.iter().filter(|(_, c)| !self.map.contains_key(c)).count();
        let mut n = absent;
        loop {
            let covered = n.min(t);
            let doomed = misses
                .iter()
                .filter(|(_, c)| self.map.get(c).is_some_and(|&e| offset(e) < covered))
                .count();
            if absent + doomed == n {
                self.demoted += doomed;
                break;
            }
            n = absent + doomed;
        }
        let (mut fetch, mut hits) = (Vec::new(), Vec::new());
        for &(s, c) in misses {
            match self.map.get(&c) {
                Some(&e) if offset(e) >= n.min(t) => hits.push((s, c, e)),
                _ => fetch.push((s, c)),
            }
        }
        // Every replaced entry's chunk leaves the map (it may be fetched again now), then
        // each fetched chunk enters it.
        for j in 0..fetch.len().min(t) {
            if let Some(old) = self.owner[(self.next + j) % t] {
                self.map.remove(&old);
            }
        }
        for (j, &(_, c)) in fetch.iter().enumerate().take(t) {
            let e = (self.next + j) % t;
            self.owner[e] = Some(c);
            self.map.insert(c, e);
        }
        self.next = (self.next + fetch.len().min(t)) % t;
        (fetch, hits)
    }
}

#[test]
fn gpu_value_tier_keeps_its_fifo_and_moves_the_pool_bytes() {
    // Both fills (from a prefill's dense values, from the pool into a tier added later)
    // and both fetch paths, one sequence's values in a GPU value slot, the others' in the
    // host pool; the same FIFO model and bytes for each.
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    // (kv_heads, d, chunk, S, T, batch, rank): a tier larger than the slots, one smaller
    // (more fetched chunks a step than entries), 300 slots (two tiles of the kernels), and
    // chunks of 3 (42 misses a rebuild tile) at rank 400 (two panels of sv and codes),
    // where the rebuild copies the tier hits over tiles of several lists.
    for &(kvh, d, chunk, slots, tier, batch, rank) in &[
        (3usize, 64usize, 8usize, 16usize, 24usize, 2usize, 16usize),
        (2, 128, 16, 7, 5, 3, 16),
        (1, 64, 1, 300, 400, 2, 16),
        (4, 128, 3, 60, 70, 2, 400),
    ] {
        let l = ShadowLayout {
            chunk,
            slots,
            rank,
            chunk_cap: 3 * slots + 5,
            ..small_layout(kvh, d, 1)
        }
        .with_tier(tier)
        .unwrap();
        let case = format!("kv_heads={kvh},d={d},c={chunk},S={slots},T={tier},batch={batch},rank={rank}");
        // The last sequence's values in a GPU value slot (global slot batch - 1), the
        // others' in the host pool.
        let shape = PoolShape {
            layers: 1,
            seqs: batch - 1,
            kv_heads: kvh,
            chunks: l.chunk_cap,
            chunk,
            head_dim: d,
            format: ValueFormat::Int8,
        };
        let mut rng = seeded("shadow_tier");
        let (mut map, host_ref) = random_pool(&mut rng, &shape);
        let mapping = HostMapping::new(&ops, &mut map[..]).unwrap();
        let (pool, _slots, dev_ref) = with_dev_slots(&ops, &mut rng, &shape, mapping.device_addr(), 1);
        let refs = (&host_ref[..], &dev_ref[..]);
        let cb = shape.chunk_bytes();
        // The rebuild copies the tier hits (the keys it writes are not checked here).
        let inv = dev.upload(&vec![1e-3f32; d / 2]).unwrap();
        // A chunk's values as a slot holds them: its 8-bit bytes in place.
        let chunk_of = |b: usize, h: usize, c: usize| slot_words(chunk_ref(&pool, refs, (0, b, h, c)));
        let outs: Vec<usize> = (0..batch).map(|_| rng.random_range(0..=l.outliers)).collect();
        let seq_counts: Vec<SeqCounts> = (0..batch).map(|b| counts(l.chunk_cap, 0, outs[b], b)).collect();
        // The selections of every step, shared by both fetch paths.
        let steps = 30;
        let mut sels: Vec<Vec<Vec<u32>>> = Vec::new();
        let mut prev: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); batch * kvh];
        for _ in 0..steps {
            let mut step = Vec::new();
            for p in prev.iter_mut() {
                let k = rng.random_range(slots / 2..=slots);
                let mut set: BTreeSet<u32> = p.iter().copied().filter(|_| rng.random_bool(0.5)).collect();
                while set.len() < k {
                    set.insert(rng.random_range(0..l.chunk_cap as u32));
                }
                let mut sel: Vec<u32> = set.into_iter().collect();
                while sel.len() > k {
                    sel.remove(rng.random_range(0..sel.len()));
                }
                *p = sel.iter().copied().collect();
                step.push(sel);
            }
            sels.push(step);
        }
        let mut finals: Vec<Vec<Vec<u16>>> = Vec::new();
        for gather in [false, true] {
            let path = if gather { "cpu-gather" } else { "zero-copy" };
            // zero-copy: each tier is made with the buffers and filled at the prefill
            // with its newest chunks, from the dense values `[tokens, kv_heads·d]` (here
            // the pool's chunks laid out token-major); cpu-gather: added afterwards and
            // filled from the pool.
            let made = if gather { l.with_tier(0).unwrap() } else { l };
            let mut bufs: Vec<LayerBuffers> = (0..batch).map(|_| LayerBuffers::new(&ops, made).unwrap()).collect();
            let tokens = l.chunk_cap * chunk;
            for (b, buf) in bufs.iter_mut().enumerate() {
                ops.fill_nan_bf16(&mut buf.av).unwrap();
                if gather {
                    buf.add_tier(&ops, tier).unwrap();
                    assert_eq!(buf.layout(), &l);
                    // SAFETY: the pool is mapped for the device and the host leaves it alone.
                    unsafe { ops.shadow_tier_fill_pool(buf, &pool, (0, b), l.chunk_cap) }.unwrap();
                    continue;
                }
                let mut v = vec![bf16::ZERO; tokens * l.kv_width()];
                for c in 0..l.chunk_cap {
                    for h in 0..kvh {
                        let src = chunk_values(chunk_ref(&pool, refs, (0, b, h, c)), &shape);
                        for t in 0..chunk {
                            let row = (c * chunk + t) * l.kv_width() + h * d;
                            v[row..row + d].copy_from_slice(&src[t * d..(t + 1) * d]);
                        }
                    }
                }
                ops.shadow_tier_fill(buf, &dev.upload(&v).unwrap(), tokens, l.chunk_cap)
                    .unwrap();
            }
            let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs.iter().zip(&seq_counts).map(|(b, c)| (b, *c)).collect();
            let table = ShadowTable::new(&ops, &entries).unwrap();
            let mut scratch = StepScratch::new(&ops, &l, batch).unwrap();
            let mut cpu: Vec<SlotTable> = (0..batch * kvh).map(|_| SlotTable::new(slots)).collect();
            let mut model: Vec<TierModel> = (0..batch * kvh).map(|_| TierModel::filled(tier, l.chunk_cap)).collect();
            let (mut slot_hits, mut tier_hits, mut fetched) = (0u64, 0u64, 0u64);
            for (step, sel) in sels.iter().enumerate() {
                let mut flat = vec![-1i32; batch * kvh * slots];
                for (e, s) in sel.iter().enumerate() {
                    for (i, &c) in s.iter().enumerate() {
                        flat[e * slots + i] = c as i32;
                    }
                }
                scratch.selected = dev.upload(&flat).unwrap();
                scratch.misses = dev.upload(&vec![-7i32; batch * kvh * slots * 2]).unwrap();
                ops.shadow_reuse(&table, &mut scratch).unwrap();
                let gm = dev.download(&scratch.misses).unwrap();
                let (gc, gf, gt) = (
                    dev.download(&scratch.miss_count).unwrap(),
                    dev.download(&scratch.fetch_count).unwrap(),
                    dev.download(&scratch.tier_count).unwrap(),
                );
                let gs = dev.download(&scratch.tier_src).unwrap();
                let mut lists = Vec::new();
                for e in 0..batch * kvh {
                    let what = format!("{case},{path},step={step},list={e}");
                    let plan = cpu[e].plan(&sel[e]);
                    slot_hits += plan.hits as u64;
                    let (fetch, hits) = model[e].step(&plan.misses);
                    fetched += fetch.len() as u64;
                    tier_hits += hits.len() as u64;
                    assert_eq!(
                        (gc[e] as usize, gf[e] as usize, gt[e] as usize),
                        (plan.misses.len(), fetch.len(), hits.len()),
                        "{what}: miss, fetch and tier counts"
                    );
                    let row = &gm[e * slots * 2..][..slots * 2];
                    let want: Vec<i32> = fetch
                        .iter()
                        .map(|&(s, c)| (s, c))
                        .chain(hits.iter().map(|&(s, c, _)| (s, c)))
                        .flat_map(|(s, c)| [s as i32, c as i32])
                        .collect();
                    assert_eq!(&row[..want.len()], &want[..], "{what}: fetched, then tier hits");
                    for (j, &(_, _, entry)) in hits.iter().enumerate() {
                        assert_eq!(
                            gs[e * slots + fetch.len() + j] as usize,
                            entry,
                            "{what}: tier entry of hit {j}"
                        );
                    }
                    lists.push(fetch);
                }
                if gather {
                    // The host gathers the chunks to fetch in list order (here from the
                    // reference, the GPU value slot's included: the scatter's input; the
                    // real actor serves host slots only); the scatter puts them in their
                    // slots and tier entries.
                    let mut staging = vec![0xffu8; batch * kvh * slots * cb];
                    let mut t = 0;
                    for (e, list) in lists.iter().enumerate() {
                        for &(_, c) in list {
                            let src = chunk_ref(&pool, refs, (0, e / kvh, e % kvh, c as usize));
                            staging[t * cb..(t + 1) * cb].copy_from_slice(src);
                            t += 1;
                        }
                    }
                    let ds = dev.upload(&staging).unwrap();
                    ops.shadow_scatter_values(
                        &table,
                        &scratch.misses,
                        &scratch.fetch_count,
                        Some(&scratch.tier_base),
                        &ds,
                        FETCH_BLOCKS,
                    )
                    .unwrap();
                } else {
                    // SAFETY: the pool is mapped for the device and the host leaves it alone.
                    unsafe {
                        ops.shadow_fetch_values(
                            &table,
                            &scratch.misses,
                            &scratch.fetch_count,
                            Some(&scratch.tier_base),
                            &pool,
                            0,
                            FETCH_BLOCKS,
                        )
                    }
                    .unwrap();
                }
                // After the fetch: the step runs them at once, on two streams, so the fetch
                // must leave alone the entries the tier hits come from. The rebuild copies
                // the tier hits beside their keys: on as many blocks as it takes, or (with
                // cpu-gather) on one, which runs every tile of every list in turn.
                let blocks = if gather {
                    1
                } else {
                    ops.shadow_rebuild_blocks(&table, 0).unwrap()
                };
                ops.shadow_rebuild_on(&table, RebuildLists::of_step(&scratch), &inv, blocks)
                    .unwrap();
                let gh = dev.download(&scratch.hits).unwrap();
                assert_eq!(
                    (gh[0], gh[1]),
                    (slot_hits, tier_hits),
                    "{case},{path},step={step}: hit counters"
                );
                // Every occupied slot holds its chunk's values; the tier is the model's,
                // each entry holding its chunk's values.
                for (b, buf) in bufs.iter().enumerate() {
                    let av = bits(&dev.download(&buf.av).unwrap());
                    let t = buf.tier.as_ref().expect("a tier");
                    let (tv, tmap, towner, tnext) = (
                        dev.download(&t.values).unwrap(),
                        dev.download(&t.map).unwrap(),
                        dev.download(&t.owner).unwrap(),
                        dev.download(&t.next).unwrap(),
                    );
                    for h in 0..kvh {
                        let e = b * kvh + h;
                        let what = format!("{case},{path},step={step},seq={b},head={h}");
                        for (s, c) in cpu[e].slots().iter().enumerate() {
                            if let Some(c) = c {
                                let at = attn_at(&l, h, l.slot_row(outs[b], s));
                                assert!(
                                    av[at..at + cb / 2] == chunk_of(b, h, *c as usize)[..],
                                    "{what}: slot {s}"
                                );
                            }
                        }
                        let m = &model[e];
                        assert_eq!(tnext[h] as usize, m.next, "{what}: next entry");
                        for (x, o) in m.owner.iter().enumerate() {
                            assert_eq!(towner[h * tier + x], o.map_or(-1, |c| c as i32), "{what}: owner of {x}");
                            if let Some(c) = o {
                                assert_eq!(tmap[h * l.chunk_cap + *c as usize], x as i32, "{what}: map of {c}");
                                assert!(
                                    tv[(h * tier + x) * cb..][..cb] == *chunk_ref(&pool, refs, (0, b, h, *c as usize)),
                                    "{what}: values of entry {x}"
                                );
                            }
                        }
                        let mapped = tmap[h * l.chunk_cap..][..l.chunk_cap]
                            .iter()
                            .filter(|&&x| x >= 0)
                            .count();
                        assert_eq!(mapped, m.map.len(), "{what}: chunks mapped");
                    }
                }
            }
            let demoted: usize = model.iter().map(|m| m.demoted).sum();
            assert!(
                slot_hits > 0 && tier_hits > 0 && fetched > 0 && demoted > 0,
                "{case},{path}: the steps had no slot hits ({slot_hits}), tier hits ({tier_hits}), fetches \
                 ({fetched}) or hits fetched again ({demoted})"
            );
            finals.push(bufs.iter().map(|b| bits(&dev.download(&b.av).unwrap())).collect());
            Errors::default().report(
                "shadow_tier",
                &format!(
                    "{case},{path},steps={steps},slot_hits={slot_hits},tier_hits={tier_hits},fetched={fetched},\
                     demoted={demoted},exact"
                ),
            );
        }
        assert!(
            finals[0] == finals[1],
            "{case}: the two fetch paths leave different values"
        );
        drop(mapping);
    }
}

#[test]
fn key_rebuild_matches_low_rank_and_rope() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_rebuild");
    // (model, chunk, rank, chunk_cap, S): llama3 RoPE scaling at positions up to 131K;
    // d = 64 and 128; chunks of 1, 3, 5, 8 and 16 tokens (tiles take 128 / c misses,
    // rows past them empty); ranks 1, 37 and 203 (not multiples of the mma's 16: their
    // codes loaded byte by byte, not by cp.async) up to kv_heads·d = 1024, the largest,
    // which needs more than the 320 ranks of sv a block keeps (panels restaged per tile);
    // group 7 (Qwen2). Each case on the default grid (a tile or two per block here), on
    // one block (every tile of every head in turn: sv restaged when the head changes,
    // each tile's codes loaded while the one before multiplies) and
    // on three (heads split between blocks); some entries of the lists are invalid
    // misses, which the kernel must skip.
    for &(arch, chunk, rank, chunk_cap, slots) in &[
        ("smollm2-135m", 8usize, 160usize, 1100usize, 32usize),
        ("llama-3.1-8b", 8, 160, 16_384, 64),
        ("llama-3.1-8b", 16, 1, 100, 12),
        ("qwen2-0.5b", 5, 128, 300, 20),
        ("smollm2-135m", 16, 37, 400, 30),
        ("llama-3.1-8b", 5, 1024, 200, 60),
        ("llama-3.1-8b", 3, 203, 500, 100),
        ("qwen2-0.5b", 1, 64, 700, 300),
    ] {
        let cfg = preset(arch).unwrap();
        let l = layout_of(
            &cfg,
            ShadowLayout {
                chunk,
                rank,
                slots,
                outliers: 3,
                chunk_cap,
                ..small_layout(1, 64, 1)
            },
        );
        let (kvh, d, kvd) = (l.kv_heads, l.head_dim, l.kv_width());
        let case = format!("{arch},c={chunk},rank={rank},S={slots}");
        let chunks = [chunk_cap, chunk_cap / 3];
        let outliers = [3usize, 1];
        let mut bufs = Vec::new();
        let mut lowrank = Vec::new();
        for _ in 0..chunks.len() {
            let mut b = LayerBuffers::new(&ops, l).unwrap();
            let (codes, scales, uf) = rand_coefs(&mut rng, &l, 1.0);
            let s = (3.0 / rank as f32).sqrt();
            let sv: Vec<f32> = (0..l.sv_len()).map(|_| rng.random_range(-s..s)).collect();
            upload_coefs(&ops, &mut b, &codes, &scales);
            b.sv = dev.upload(&sv).unwrap();
            ops.fill_nan_bf16(&mut b.ak).unwrap();
            bufs.push(b);
            lowrank.push(LowRank {
                u: uf,
                sv,
                rank,
                cols: kvd,
                rounded: true,
            });
        }
        let misses = random_misses(&ops, &mut rng, &l, &chunks);
        let misses = with_invalid_misses(&ops, &mut rng, &l, misses);
        let inv = dev.upload(&rope_inv_freq(&cfg)).unwrap();
        let rope = Rope::new(&cfg);
        let (mut want, mut sv_bound) = (Vec::new(), Vec::new());
        for (b, lr) in lowrank.iter().enumerate() {
            // The kernel multiplies by sv in fp16 (relative error 2^-11 an entry): a pre-RoPE
            // element moves by at most 2^-11 Σ_j |u_j|·|sv_j|, a rotated one by that of its
            // two columns.
            let abs = LowRank {
                u: lr.u.iter().map(|x| x.abs()).collect(),
                sv: lr.sv.iter().map(|x| x.abs()).collect(),
                ..lr.clone()
            };
            for h in 0..kvh {
                for &(_, ch) in &misses.lists[b * kvh + h] {
                    let mut k = vec![0f32; chunk * d];
                    lr.rebuild(ch * chunk, chunk, h * d..(h + 1) * d, &mut k);
                    let positions: Vec<usize> = (ch * chunk..(ch + 1) * chunk).collect();
                    let (cos, sin) = rope.tables(&positions);
                    rope.apply(&mut k, 1, &cos, &sin);
                    want.extend(k);
                    let mut a = vec![0f32; chunk * d];
                    abs.rebuild(ch * chunk, chunk, h * d..(h + 1) * d, &mut a);
                    for row in a.chunks_exact(d) {
                        sv_bound.extend((0..d).map(|j| (row[j] + row[(j + d / 2) % d]) as f64 / 2048.0));
                    }
                }
            }
        }
        let atol = 1e-4 * rms(&want);
        for grid in [None, Some(1), Some(3)] {
            for b in bufs.iter_mut() {
                ops.fill_nan_bf16(&mut b.ak).unwrap();
            }
            let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs
                .iter()
                .enumerate()
                .map(|(b, x)| (x, counts(chunks[b], 0, outliers[b], 0)))
                .collect();
            let table = ShadowTable::new(&ops, &entries).unwrap();
            let blocks = match grid {
                None => {
                    ops.shadow_rebuild(&table, RebuildLists::keys(&misses.pairs, &misses.count), &inv)
                        .unwrap();
                    ops.shadow_rebuild_blocks(&table, 0).unwrap()
                }
                Some(n) => {
                    ops.shadow_rebuild_on(&table, RebuildLists::keys(&misses.pairs, &misses.count), &inv, n)
                        .unwrap();
                    n
                }
            };
            let mut got = Vec::new();
            for (b, buf) in bufs.iter().enumerate() {
                let ak = dev.download(&buf.ak).unwrap();
                let mut written = 0;
                for h in 0..kvh {
                    for &(slot, _) in &misses.lists[b * kvh + h] {
                        let at = attn_at(&l, h, l.slot_row(outliers[b], slot));
                        got.extend(f32s(&ak[at..at + chunk * d]));
                        written += chunk * d;
                    }
                }
                let untouched = ak.iter().filter(|v| v.to_bits() == NAN_BITS).count();
                assert_eq!(
                    ak.len() - untouched,
                    written,
                    "{case}, {blocks} blocks: rows written outside the valid misses' slots"
                );
            }
            let run = format!("{case},blocks={blocks}");
            errors("shadow_rebuild", &run, &got, &want, |i, w| {
                EW_RTOL * w.abs() + atol + sv_bound[i]
            })
            .report("shadow_rebuild", &run);
        }
    }
}

/// `m` with about a third of its lists (those of two entries or more) holding one
/// invalid entry in place of a miss (slot -1 or S, chunk -1 or past chunk_cap, in turn),
/// dropped from `lists`: kernels must skip such entries.
fn with_invalid_misses(ops: &CudaOps, rng: &mut StdRng, l: &ShadowLayout, mut m: Misses) -> Misses {
    let mut flat = ops.device().download(&m.pairs).unwrap();
    let (slots, cap) = (l.slots as i32, l.chunk_cap as i32);
    let bad = [
        (Some(-1), None),
        (Some(slots), None),
        (None, Some(-1)),
        (None, Some(cap)),
    ];
    let mut kind = 0;
    for (e, list) in m.lists.iter_mut().enumerate() {
        if list.len() < 2 || rng.random_range(0..3) != 0 {
            continue;
        }
        let j = rng.random_range(0..list.len());
        let (slot, chunk) = bad[kind % bad.len()];
        kind += 1;
        let at = (e * l.slots + j) * 2;
        flat[at] = slot.unwrap_or(list[j].0 as i32);
        flat[at + 1] = chunk.unwrap_or(list[j].1 as i32);
        list.remove(j);
    }
    m.pairs = ops.device().upload(&flat).unwrap();
    m
}

#[test]
fn value_fetch_and_scatter_copy_the_misses_bit_exact() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_fetch");
    // (kv_heads, d, chunk, S, batch)
    for &(kvh, d, chunk, slots, batch) in &[
        (3usize, 64usize, 8usize, 32usize, 3usize),
        (8, 128, 8, 64, 2),
        (2, 128, 16, 7, 4),
        (1, 64, 1, 300, 2),
    ] {
        let l = ShadowLayout {
            chunk,
            slots,
            chunk_cap: 2 * slots + 9,
            ..small_layout(kvh, d, 1)
        };
        let case = format!("kv_heads={kvh},d={d},c={chunk},S={slots},batch={batch}");
        let shape = PoolShape {
            layers: 3,
            seqs: batch + 2,
            kv_heads: kvh,
            chunks: l.chunk_cap,
            chunk,
            head_dim: d,
            format: ValueFormat::Int8,
        };
        let (mut map, host_ref) = random_pool(&mut rng, &shape);
        let mapping = HostMapping::new(&ops, &mut map[..]).unwrap();
        // Three GPU value slots after the host's; the first sequence takes one (an
        // HBM copy through the same kernel), the others host slots.
        let (pool, _slots, dev_ref) = with_dev_slots(&ops, &mut rng, &shape, mapping.device_addr(), 3);
        let refs = (&host_ref[..], &dev_ref[..]);
        let layer = 1;
        let mut pool_seqs = rand::seq::index::sample(&mut rng, shape.seqs, batch).into_vec();
        pool_seqs[0] = rng.random_range(shape.seqs..pool.slots());
        let outs: Vec<usize> = (0..batch).map(|_| rng.random_range(0..=l.outliers)).collect();
        let chunks = vec![l.chunk_cap; batch];
        let mut zc: Vec<LayerBuffers> = (0..batch).map(|_| LayerBuffers::new(&ops, l).unwrap()).collect();
        let mut cg: Vec<LayerBuffers> = (0..batch).map(|_| LayerBuffers::new(&ops, l).unwrap()).collect();
        for b in zc.iter_mut().chain(cg.iter_mut()) {
            ops.fill_nan_bf16(&mut b.av).unwrap();
        }
        let seq_counts: Vec<SeqCounts> = (0..batch)
            .map(|b| counts(chunks[b], 0, outs[b], pool_seqs[b]))
            .collect();
        let misses = random_misses(&ops, &mut rng, &l, &chunks);
        // What every slot must hold, per sequence: the pool chunk's bytes in place (the
        // rest of its rows untouched NaN), or untouched NaN.
        let cbytes = shape.chunk_bytes();
        let want: Vec<Vec<u16>> = (0..batch)
            .map(|b| {
                let mut av = vec![NAN_BITS; l.attn_len()];
                for h in 0..kvh {
                    for &(slot, ch) in &misses.lists[b * kvh + h] {
                        let at = attn_at(&l, h, l.slot_row(outs[b], slot));
                        let src = chunk_ref(&pool, refs, (layer, pool_seqs[b], h, ch));
                        av[at..at + cbytes / 2].copy_from_slice(&slot_words(src));
                    }
                }
                av
            })
            .collect();
        for blocks in [1, FETCH_BLOCKS, 5] {
            for b in zc.iter_mut() {
                ops.fill_nan_bf16(&mut b.av).unwrap();
            }
            let entries: Vec<(&LayerBuffers, SeqCounts)> = zc.iter().zip(&seq_counts).map(|(b, c)| (b, *c)).collect();
            let table = ShadowTable::new(&ops, &entries).unwrap();
            // SAFETY: the pool is mapped for the device and the host leaves it alone.
            unsafe { ops.shadow_fetch_values(&table, &misses.pairs, &misses.count, None, &pool, layer, blocks) }
                .unwrap();
            for (b, buf) in zc.iter().enumerate() {
                let got = bits(&dev.download(&buf.av).unwrap());
                assert!(
                    got == want[b],
                    "{case}, {blocks} blocks, seq {b}: fetched values differ"
                );
            }
        }
        Errors::default().report(
            "shadow_fetch",
            &format!("{case},blocks=1/16/5,seq 0 in GPU value slot {},exact", pool_seqs[0]),
        );
        // cpu-gather: the host gathers the same chunks in list order into staging (from
        // the reference, the GPU value slot's included: the real actor serves host
        // slots only, this checks the scatter).
        let rows = batch * kvh * slots;
        let mut staging = vec![0xffu8; rows * cbytes];
        let mut t = 0;
        for (e, list) in misses.lists.iter().enumerate() {
            let (b, h) = (e / kvh, e % kvh);
            for &(_, ch) in list {
                staging[t * cbytes..(t + 1) * cbytes].copy_from_slice(chunk_ref(
                    &pool,
                    refs,
                    (layer, pool_seqs[b], h, ch),
                ));
                t += 1;
            }
        }
        let dstaging = dev.upload(&staging).unwrap();
        let entries: Vec<(&LayerBuffers, SeqCounts)> = cg.iter().zip(&seq_counts).map(|(b, c)| (b, *c)).collect();
        let table = ShadowTable::new(&ops, &entries).unwrap();
        ops.shadow_scatter_values(&table, &misses.pairs, &misses.count, None, &dstaging, FETCH_BLOCKS)
            .unwrap();
        for (b, (zb, cb)) in zc.iter().zip(&cg).enumerate() {
            let got = bits(&dev.download(&cb.av).unwrap());
            assert!(got == want[b], "{case}, seq {b}: scattered values differ");
            assert!(
                got == bits(&dev.download(&zb.av).unwrap()),
                "{case}, seq {b}: the two fetch paths differ"
            );
        }
        Errors::default().report("shadow_scatter", &format!("{case},same as zero-copy,exact"));
        drop(mapping);
    }
}

#[test]
fn prefill_compression_matches_the_cpu() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_prefill");
    // (model, prompt tokens, O, L, chunk): whole and partial chunks, fewer chunks than
    // outliers, no sparse chunk at all, chunks of 7.
    for &(arch, tokens, outliers, local, chunk) in &[
        ("smollm2-135m", 8 * 50 + 5, 6usize, 4usize, 8usize),
        ("llama-3.1-8b", 8 * 300 + 3, 24, 4, 8),
        ("llama-3.1-8b", 51, 6, 4, 8),
        ("qwen2-0.5b", 20, 4, 4, 8),
        ("smollm2-135m", 7 * 97, 5, 1, 7),
    ] {
        let cfg = preset(arch).unwrap();
        let l = layout_of(
            &cfg,
            ShadowLayout {
                chunk,
                rank: 16,
                slots: 8,
                outliers,
                local,
                chunk_cap: tokens / chunk + 2,
                ..small_layout(1, 64, 1)
            },
        );
        let (kvh, d, kvd, c) = (l.kv_heads, l.head_dim, l.kv_width(), l.chunk);
        let chunks = l.prefill_chunks(tokens);
        let n = tokens - chunks * c;
        let n_out = outliers.min(chunks);
        let case = format!("{arch},tokens={tokens},chunks={chunks},recent={n},O={outliers},c={c}");
        let (mut k, _) = rand_bf16(&mut rng, tokens * kvd, 1.0);
        if chunks >= 2 {
            // Chunk 1 of head 0 all zero: cosine 1 by definition.
            for t in c..2 * c {
                k[t * kvd..t * kvd + d].fill(bf16::ZERO);
            }
        }
        let kf = f32s(&k);
        let (v, _) = rand_bf16(&mut rng, tokens * kvd, 1.0);
        let (kpre, _) = rand_bf16(&mut rng, tokens * kvd, 1.0);
        let (dk, dv, dkp) = (
            dev.upload(&k).unwrap(),
            dev.upload(&v).unwrap(),
            dev.upload(&kpre).unwrap(),
        );
        let mut bufs = LayerBuffers::new(&ops, l).unwrap();
        // Code -128 is never written (codes stay within ±127).
        bufs.marks = dev.upload(&vec![i8::MIN; l.marks_len()]).unwrap();
        ops.fill_nan_f32(&mut bufs.mark_scales).unwrap();
        ops.fill_nan_bf16(&mut bufs.ak).unwrap();
        ops.fill_nan_bf16(&mut bufs.av).unwrap();
        ops.fill_nan_bf16(&mut bufs.kpre).unwrap();
        bufs.outlier = dev.upload(&vec![7u8; l.outlier_len()]).unwrap();
        let mut neg_cos = dev.zeros::<f32>(kvh * l.chunk_cap).unwrap();
        ops.fill_nan_f32(&mut neg_cos).unwrap();
        let mut ids = dev.upload(&vec![i32::MIN; kvh * outliers]).unwrap();
        ops.shadow_landmarks(&bufs, &dk, tokens, &mut neg_cos).unwrap();
        ops.shadow_outliers(&bufs, &neg_cos, tokens, &mut ids).unwrap();
        ops.shadow_place_prefill(&bufs, (&dk, &dv, &dkp), tokens, &ids).unwrap();
        // Two host slots and two GPU value slots (global 2 and 3), all poisoned; the
        // values go to host slot 1 and to device slot 1 (global 3).
        let shape = PoolShape {
            layers: 2,
            seqs: 2,
            kv_heads: kvh,
            chunks: l.chunk_cap,
            chunk: c,
            head_dim: d,
            format: ValueFormat::Int8,
        };
        let mut map = MmapMut::map_anon(shape.bytes().unwrap()).unwrap();
        map.fill(0xff);
        let mapping = HostMapping::new(&ops, &mut map[..]).unwrap();
        let (pool, mut dev_slots, _) = with_dev_slots(&ops, &mut rng, &shape, mapping.device_addr(), 2);
        dev.stream().memset_zeros(&mut dev_slots).unwrap();
        for slot in [1, 3] {
            // SAFETY: the pools are mapped for (and allocated on) the device and read only
            // after the copy.
            unsafe { ops.shadow_pool_write(&l, &pool, (1, slot), &dv, tokens) }.unwrap();
        }

        // Landmarks: codes and scales bit-exact; chunks past the prefill's untouched.
        let marks_cpu = landmarks(&kf, chunks, c, kvd);
        let q8 = Marks8::quantize(&marks_cpu, d);
        let got = download_marks(&ops, &bufs);
        assert_eq!(
            got.codes[..q8.codes.len()],
            q8.codes[..],
            "{case}: landmark codes differ"
        );
        assert!(
            got.codes[q8.codes.len()..].iter().all(|&x| x == i8::MIN),
            "{case}: codes written past the chunks"
        );
        let sbits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            sbits(&got.scales[..q8.scales.len()]),
            sbits(&q8.scales),
            "{case}: landmark scales differ"
        );
        assert!(
            got.scales[q8.scales.len()..].iter().all(|x| x.is_nan()),
            "{case}: scales written past the chunks"
        );
        Errors::default().report("shadow_landmarks", &format!("{case},exact"));
        // Minimum cosines.
        let gc = dev.download(&neg_cos).unwrap();
        let cpu_cos = min_cosines(&kf[..chunks * c * kvd], &marks_cpu, c, kvh, d);
        if chunks > 0 {
            let got: Vec<f32> = (0..kvh)
                .flat_map(|h| gc[h * l.chunk_cap..][..chunks].to_vec())
                .collect();
            let want: Vec<f32> = cpu_cos.iter().flatten().map(|x| -x).collect();
            check("shadow_min_cosine", &case, &got, &want, 0.0, COS_ATOL);
            if chunks >= 2 {
                assert_eq!(gc[1], -1.0, "{case}: a zero chunk has cosine 1");
            }
        }
        // Outliers: exact on the GPU's cosines, the CPU's but for near ties, flags.
        let gids = dev.download(&ids).unwrap();
        let cpu_ids = outlier_chunks(&kf[..chunks * c * kvd], &marks_cpu, c, kvh, d, n_out);
        let flags = dev.download(&bufs.outlier).unwrap();
        for h in 0..kvh {
            let what = format!("{case},head={h}");
            let row = &gids[h * outliers..][..outliers];
            let own = top_k(&gc[h * l.chunk_cap..][..chunks], &vec![false; chunks], outliers);
            assert_selection(row, &own, &format!("outliers {what}"));
            let neg: Vec<f32> = cpu_cos[h].iter().map(|x| -x).collect();
            let chosen = selection_of(row);
            assert_same_but_near_ties(&cpu_ids[h], &chosen, &neg, (0.0, 2.0 * COS_ATOL), &what);
            for ch in 0..l.chunk_cap {
                assert_eq!(
                    flags[h * l.chunk_cap + ch] as usize,
                    chosen.contains(&(ch as u32)) as usize,
                    "{what}: outlier flag of chunk {ch}"
                );
            }
        }
        Errors::default().report("shadow_outliers", &format!("{case},exact"));
        // Placement: the outliers' rows and the recent window, nothing else.
        let (ak, av, kp) = (
            bits(&dev.download(&bufs.ak).unwrap()),
            bits(&dev.download(&bufs.av).unwrap()),
            bits(&dev.download(&bufs.kpre).unwrap()),
        );
        let (kb, vb, pb) = (bits(&k), bits(&v), bits(&kpre));
        let mut want_k = vec![NAN_BITS; l.attn_len()];
        let mut want_v = vec![NAN_BITS; l.attn_len()];
        let mut want_p = vec![NAN_BITS; l.kpre_len()];
        for h in 0..kvh {
            let mut place = |row: usize, token: usize| {
                let (src, dst) = (token * kvd + h * d, attn_at(&l, h, row));
                want_k[dst..dst + d].copy_from_slice(&kb[src..src + d]);
                want_v[dst..dst + d].copy_from_slice(&vb[src..src + d]);
            };
            for (o, &ch) in selection_of(&gids[h * outliers..][..outliers]).iter().enumerate() {
                for i in 0..c {
                    place(l.outlier_row(o) + i, ch as usize * c + i);
                }
            }
            for t in 0..n {
                place(l.recent_row(n, t), chunks * c + t);
                let (src, dst) = ((chunks * c + t) * kvd + h * d, l.recent_row(n, t) * kvd + h * d);
                want_p[dst..dst + d].copy_from_slice(&pb[src..src + d]);
            }
        }
        assert!(ak == want_k, "{case}: attention keys differ");
        assert!(av == want_v, "{case}: attention values differ");
        assert!(kp == want_p, "{case}: recent pre-RoPE keys differ");
        Errors::default().report("shadow_place_prefill", &format!("{case},exact"));
        // The pools: every sparse chunk of slots 1 and 3 of layer 1 in 8 bits, bit-exact
        // with the CPU's rounding, nothing else (the host pool poisoned with 0xff, the
        // device's zeroed).
        let got = (mapping.host().unwrap().to_vec(), dev.download(&dev_slots).unwrap());
        let mut want = (vec![0xffu8; got.0.len()], vec![0u8; got.1.len()]);
        for slot in [1, 3] {
            let into = if pool.on_device(slot) { &mut want.1 } else { &mut want.0 };
            for h in 0..kvh {
                for ch in 0..chunks {
                    let dst = pool.chunk_offset(1, slot, h, ch);
                    let rows: Vec<bf16> = (0..c)
                        .flat_map(|i| {
                            let src = (ch * c + i) * kvd + h * d;
                            v[src..src + d].to_vec()
                        })
                        .collect();
                    let q = quantize_chunk(&rows, d);
                    into[dst..dst + q.len()].copy_from_slice(&q);
                }
            }
        }
        assert!(got.0 == want.0, "{case}: host pool contents differ");
        assert!(got.1 == want.1, "{case}: GPU value slots' contents differ");
        Errors::default().report(
            "shadow_pool_write",
            &format!("{case},host slot 1 and GPU value slot 3,exact"),
        );
    }
}

#[test]
fn append_writes_the_new_token_into_the_recent_window() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_append");
    for arch in ["smollm2-135m", "qwen2-0.5b", "llama-3.1-8b"] {
        for with_bias in [false, true] {
            let cfg = preset(arch).unwrap();
            let l = layout_of(&cfg, small_layout(1, 64, 1));
            let (kvh, d, kvd, heads) = (l.kv_heads, l.head_dim, l.kv_width(), cfg.num_heads);
            let width = (heads + 2 * kvh) * d;
            let big_r = l.recent_rows();
            let case = format!("{arch},bias={with_bias}");
            // The window after the append: 1 (an empty window took the token), 14, full.
            let recent = [1usize, 14, big_r];
            let batch = recent.len();
            let mut bufs = Vec::new();
            let mut before = Vec::new();
            for _ in 0..batch {
                let mut b = LayerBuffers::new(&ops, l).unwrap();
                let (ak, _) = rand_bf16(&mut rng, l.attn_len(), 1.0);
                let (av, _) = rand_bf16(&mut rng, l.attn_len(), 1.0);
                let (kp, _) = rand_bf16(&mut rng, l.kpre_len(), 1.0);
                b.ak = dev.upload(&ak).unwrap();
                b.av = dev.upload(&av).unwrap();
                b.kpre = dev.upload(&kp).unwrap();
                bufs.push(b);
                before.push((bits(&ak), bits(&av), bits(&kp)));
            }
            let entries: Vec<(&LayerBuffers, SeqCounts)> =
                bufs.iter().zip(recent).map(|(b, n)| (b, counts(10, n, 2, 0))).collect();
            let table = ShadowTable::new(&ops, &entries).unwrap();
            let (x, xf) = rand_bf16(&mut rng, batch * width, 3.0);
            let (bias, bf) = rand_bf16(&mut rng, width, 0.5);
            let mut positions: Vec<usize> = (0..batch).map(|_| rng.random_range(0..131_072)).collect();
            positions[0] = 0;
            let pos_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
            let dbias = dev.upload(&bias).unwrap();
            let mut q_out = dev.zeros::<bf16>(batch * heads * d).unwrap();
            ops.fill_nan_bf16(&mut q_out).unwrap();
            ops.shadow_qkv_append(
                &mut q_out,
                &dev.upload(&x).unwrap(),
                with_bias.then_some(&dbias),
                &dev.upload(&pos_i32).unwrap(),
                &dev.upload(&rope_inv_freq(&cfg)).unwrap(),
                &table,
                heads,
            )
            .unwrap();
            // Reference: the bias added in fp32, then the CPU Rope on q and k.
            let rope = Rope::new(&cfg);
            let (cos, sin) = rope.tables(&positions);
            let rows: Vec<f32> = xf
                .chunks_exact(width)
                .flat_map(|r| {
                    r.iter()
                        .zip(&bf)
                        .map(|(a, b)| if with_bias { a + b } else { *a })
                        .collect::<Vec<f32>>()
                })
                .collect();
            let (mut q, mut k, mut vv, mut kpre) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for row in rows.chunks_exact(width) {
                q.extend_from_slice(&row[..heads * d]);
                k.extend_from_slice(&row[heads * d..heads * d + kvd]);
                kpre.extend_from_slice(&row[heads * d..heads * d + kvd]);
                vv.extend_from_slice(&row[heads * d + kvd..]);
            }
            rope.apply(&mut q, heads, &cos, &sin);
            rope.apply(&mut k, kvh, &cos, &sin);
            let gq = f32s(&dev.download(&q_out).unwrap());
            check(
                "shadow_append",
                &format!("{case},q"),
                &gq,
                &q,
                EW_RTOL,
                1e-5 * max_abs(&q),
            );
            let mut gk = Vec::new();
            for (b, buf) in bufs.iter().enumerate() {
                let (ak, av, kp) = (
                    bits(&dev.download(&buf.ak).unwrap()),
                    bits(&dev.download(&buf.av).unwrap()),
                    bits(&dev.download(&buf.kpre).unwrap()),
                );
                let row = big_r - recent[b];
                let (mut wk, mut wv, mut wp) = before[b].clone();
                for h in 0..kvh {
                    let at = attn_at(&l, h, row);
                    gk.extend(ak[at..at + d].iter().map(|&x| bf16::from_bits(x).to_f32()));
                    wk[at..at + d].copy_from_slice(&ak[at..at + d]); // compared with a tolerance
                    for j in 0..d {
                        wv[at + j] = bf16::from_f32(vv[b * kvd + h * d + j]).to_bits();
                    }
                }
                for j in 0..kvd {
                    wp[row * kvd + j] = bf16::from_f32(kpre[b * kvd + j]).to_bits();
                }
                assert!(ak == wk, "{case} seq {b}: keys written outside row {row}");
                assert!(av == wv, "{case} seq {b}: values differ");
                assert!(kp == wp, "{case} seq {b}: pre-RoPE keys differ");
            }
            check(
                "shadow_append",
                &format!("{case},k"),
                &gk,
                &k,
                EW_RTOL,
                1e-5 * max_abs(&k),
            );
        }
    }
}

/// The fold tests' table: each sequence's buffers with (chunks, recent rows, pool slot)
/// and two outliers.
fn fold_table<'a>(ops: &CudaOps, bufs: &'a [LayerBuffers], seqs: &[(usize, usize, usize)]) -> ShadowTable<'a> {
    let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs
        .iter()
        .zip(seqs)
        .map(|(b, &(ch, n, ps))| (b, counts(ch, n, 2, ps)))
        .collect();
    ShadowTable::new(ops, &entries).unwrap()
}

#[test]
fn fold_matches_the_cpu_fold() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_fold");
    // The projection takes a chunk's tokens eight at a time (12: a pass of 8, then 4) and
    // a block's basis rows eight at a time (rank 20: two blocks of 8 and a part-block of 4).
    for &(arch, chunk, local, rank) in &[
        ("smollm2-135m", 8usize, 2usize, 24usize),
        ("llama-3.1-8b", 8, 4, 20),
        ("qwen2-0.5b", 5, 1, 24),
        ("smollm2-135m", 12, 1, 20),
    ] {
        let cfg = preset(arch).unwrap();
        let l = layout_of(
            &cfg,
            ShadowLayout {
                chunk,
                local,
                rank,
                slots: 4,
                outliers: 2,
                chunk_cap: 40,
                ..small_layout(1, 64, 1)
            },
        );
        let (kvh, d, kvd, c, rank) = (l.kv_heads, l.head_dim, l.kv_width(), l.chunk, l.rank);
        let big_r = l.recent_rows();
        let case = format!("{arch},c={c},R={big_r}");
        // (chunks, recent, pool slot): two full windows fold (one into the last chunk
        // the layout holds, its values to a host slot; the other's to GPU value slot 1,
        // global 3), one a token short does not.
        let seqs = [(10usize, big_r, 3usize), (3, big_r - 1, 0), (39, big_r, 1)];
        let shape = PoolShape {
            layers: 2,
            seqs: 2,
            kv_heads: kvh,
            chunks: l.chunk_cap,
            chunk: c,
            head_dim: d,
            format: ValueFormat::Int8,
        };
        let layer = 1;
        let (mut map, pool_before) = random_pool(&mut rng, &shape);
        let mapping = HostMapping::new(&ops, &mut map[..]).unwrap();
        let (pool, dev_slots, dev_before) = with_dev_slots(&ops, &mut rng, &shape, mapping.device_addr(), 2);
        let mut bufs = Vec::new();
        let mut before = Vec::new();
        let mut svs = Vec::new();
        let mut marks_before = Vec::new();
        let mut coefs_before = Vec::new();
        for _ in &seqs {
            let mut b = LayerBuffers::new(&ops, l).unwrap();
            let marks = rand_marks(&mut rng, &l);
            let (codes, scales, _) = rand_coefs(&mut rng, &l, 1.0);
            let (ak, _) = rand_bf16(&mut rng, l.attn_len(), 1.0);
            let (av, _) = rand_bf16(&mut rng, l.attn_len(), 1.0);
            let (kp, _) = rand_bf16(&mut rng, l.kpre_len(), 1.0);
            let sv: Vec<f32> = (0..l.sv_len()).map(|_| rng.random_range(-0.2..0.2)).collect();
            upload_marks(&ops, &mut b, &marks);
            b.outlier = dev.upload(&vec![1u8; l.outlier_len()]).unwrap();
            upload_coefs(&ops, &mut b, &codes, &scales);
            ops.fill_nan_f32(&mut b.fold_u).unwrap();
            b.sv = dev.upload(&sv).unwrap();
            b.ak = dev.upload(&ak).unwrap();
            b.av = dev.upload(&av).unwrap();
            b.kpre = dev.upload(&kp).unwrap();
            bufs.push(b);
            before.push([bits(&ak), bits(&av), bits(&kp)]);
            coefs_before.push((codes, scales));
            marks_before.push(marks);
            svs.push(sv);
        }
        let table = fold_table(&ops, &bufs, &seqs);
        // SAFETY: the pool is mapped for the device and read only after the fold.
        unsafe { ops.shadow_fold(&table, &pool, layer, None) }.unwrap();
        let pool_after = (mapping.host().unwrap().to_vec(), dev.download(&dev_slots).unwrap());
        let mut pool_want = (pool_before.clone(), dev_before.clone());
        let (mut gu, mut wu) = (Vec::new(), Vec::new());
        let (mut g_scales, mut w_scales) = (Vec::new(), Vec::new());
        let mut step = 0f32; // the largest coefficient step of the folded rows
        for (b, buf) in bufs.iter().enumerate() {
            let (ch, n, ps) = seqs[b];
            let what = format!("{case},seq={b}");
            let [ak0, av0, kp0] = &before[b];
            let got_marks = download_marks(&ops, buf);
            let mut want_marks = marks_before[b].clone();
            let got_codes = dev.download(&buf.u).unwrap();
            let got_scales = dev.download(&buf.u_scales).unwrap();
            let (mut want_codes, mut want_scales) = coefs_before[b].clone();
            let got = [
                bits(&dev.download(&buf.ak).unwrap()),
                bits(&dev.download(&buf.av).unwrap()),
                bits(&dev.download(&buf.kpre).unwrap()),
            ];
            let flags = dev.download(&buf.outlier).unwrap();
            let mut want = before[b].clone();
            let mut want_flags = vec![1u8; l.outlier_len()];
            if n == big_r {
                // The oldest chunk in time order: token i at row R - 1 - i.
                let mut k_old = vec![0f32; c * kvd];
                let mut p_old = vec![0f32; c * kvd];
                let mut v_old = vec![Vec::new(); kvh];
                for i in 0..c {
                    let row = big_r - 1 - i;
                    for h in 0..kvh {
                        let at = attn_at(&l, h, row);
                        for j in 0..d {
                            k_old[i * kvd + h * d + j] = bf16::from_bits(ak0[at + j]).to_f32();
                        }
                        v_old[h].extend(av0[at..at + d].iter().map(|&x| bf16::from_bits(x)));
                    }
                    for j in 0..kvd {
                        p_old[i * kvd + j] = bf16::from_bits(kp0[row * kvd + j]).to_f32();
                    }
                }
                // The chunk's values, in 8 bits, to its pool slot.
                for (h, rows) in v_old.iter().enumerate() {
                    let dst = pool.chunk_offset(layer, ps, h, ch);
                    let q = quantize_chunk(rows, d);
                    let into = if pool.on_device(ps) {
                        &mut pool_want.1
                    } else {
                        &mut pool_want.0
                    };
                    into[dst..dst + q.len()].copy_from_slice(&q);
                }
                let q8 = Marks8::quantize(&landmarks(&k_old, 1, c, kvd), d);
                want_marks.codes[ch * kvd..][..kvd].copy_from_slice(&q8.codes);
                want_marks.scales[ch * kvh..][..kvh].copy_from_slice(&q8.scales);
                let basis = LowRank {
                    u: Vec::new(),
                    sv: svs[b].clone(),
                    rank,
                    cols: kvd,
                    rounded: true,
                };
                // The chunk's coefficients, each token's row in 8 bits (the reference's
                // rounding; a code may differ by one where the sums differ in the last bits).
                let u_new = basis.project(&p_old, c);
                let (u_at, t_at) = (ch * c * rank, ch * c);
                for i in 0..c {
                    let s = got_scales[t_at + i];
                    gu.extend(got_codes[u_at + i * rank..][..rank].iter().map(|&q| q as f32 * s));
                    step = step.max(s);
                }
                wu.extend_from_slice(&u_new);
                g_scales.extend_from_slice(&got_scales[t_at..t_at + c]);
                for row in u_new.chunks_exact(rank) {
                    w_scales.push(row.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0);
                }
                want_codes[u_at..u_at + c * rank].copy_from_slice(&got_codes[u_at..u_at + c * rank]);
                want_scales[t_at..t_at + c].copy_from_slice(&got_scales[t_at..t_at + c]);
                for h in 0..kvh {
                    want_flags[h * l.chunk_cap + ch] = 0;
                    // The other rows move down by one chunk.
                    let (from, to) = (attn_at(&l, h, 0), attn_at(&l, h, c));
                    want[0][to..to + (big_r - c) * d].copy_from_slice(&ak0[from..from + (big_r - c) * d]);
                    want[1][to..to + (big_r - c) * d].copy_from_slice(&av0[from..from + (big_r - c) * d]);
                }
                want[2][c * kvd..big_r * kvd].copy_from_slice(&kp0[..(big_r - c) * kvd]);
            }
            assert!(got_marks == want_marks, "{what}: landmarks differ");
            let names = ["keys", "values", "pre-RoPE keys"];
            for ((g, w), name) in got.iter().zip(&want).zip(names) {
                assert!(g == w, "{what}: {name} differ");
            }
            assert!(
                got_codes == want_codes,
                "{what}: coefficient codes differ outside the folded chunk"
            );
            assert!(
                got_scales == want_scales,
                "{what}: coefficient scales differ outside the folded chunk"
            );
            assert_eq!(flags, want_flags, "{what}: outlier flags");
        }
        assert!(pool_after.0 == pool_want.0, "{case}: host pool contents differ");
        assert!(pool_after.1 == pool_want.1, "{case}: GPU value slots' contents differ");
        Errors::default().report("shadow_fold", &format!("{case},landmark/values/shift exact"));
        // The scales come from each row's largest coefficient: fp32-close to the reference's.
        check("shadow_fold_project_scales", &case, &g_scales, &w_scales, 1e-5, 0.0);
        // The coefficients: within one code of the reference's.
        check("shadow_fold_project", &case, &gu, &wu, EW_RTOL, 1.001 * step as f64);
    }
}

/// A host-written pool (a file the device cannot address: its device address is 0):
/// the fold puts a host slot's chunk in the outbox entry of its sequence and heads, in
/// the pool's 8 bits, leaves the entries of a sequence that does not fold as they were,
/// and still writes a GPU value slot's chunk into device memory. Without an outbox it is
/// refused, naming the pool.
#[test]
fn fold_into_an_outbox_for_a_host_written_pool() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_fold_outbox");
    let cfg = preset("llama-3.1-8b").unwrap();
    let l = layout_of(
        &cfg,
        ShadowLayout {
            chunk: 8,
            local: 2,
            rank: 16,
            slots: 4,
            outliers: 2,
            chunk_cap: 40,
            ..small_layout(1, 64, 1)
        },
    );
    let (kvh, d, big_r, cb) = (l.kv_heads, l.head_dim, l.recent_rows(), l.value_chunk_bytes());
    // (chunks, recent, pool slot): host slot 1 folds, host slot 0 does not, GPU value
    // slot 0 (global 2) folds.
    let seqs = [(10usize, big_r, 1usize), (3, big_r - 1, 0), (20, big_r, 2)];
    let shape = PoolShape {
        layers: 2,
        seqs: 2,
        kv_heads: kvh,
        chunks: l.chunk_cap,
        chunk: l.chunk,
        head_dim: d,
        format: ValueFormat::Int8,
    };
    let (pool, dev_slots, dev_before) = with_dev_slots(&ops, &mut rng, &shape, 0, 1);
    let mut bufs = Vec::new();
    let mut values = Vec::new();
    for _ in &seqs {
        let mut b = LayerBuffers::new(&ops, l).unwrap();
        let (ak, _) = rand_bf16(&mut rng, l.attn_len(), 1.0);
        let (av, _) = rand_bf16(&mut rng, l.attn_len(), 1.0);
        b.ak = dev.upload(&ak).unwrap();
        b.av = dev.upload(&av).unwrap();
        b.sv = dev.upload(&vec![0.1f32; l.sv_len()]).unwrap();
        bufs.push(b);
        values.push(av);
    }
    let table = fold_table(&ops, &bufs, &seqs);
    let layer = 1;
    // SAFETY: refused before any launch (no outbox for the host slots).
    let e = format!(
        "{:#}",
        unsafe { ops.shadow_fold(&table, &pool, layer, None) }.unwrap_err()
    );
    assert!(e.contains("not mapped for the device"), "{e}");
    let poison = vec![0xabu8; seqs.len() * kvh * cb];
    let outbox = dev.upload(&poison).unwrap();
    let at = (outbox.device_ptr(dev.stream()).0, outbox.len());
    // SAFETY: the outbox and the GPU value slots are live device memory of their sizes.
    unsafe { ops.shadow_fold(&table, &pool, layer, Some(at)) }.unwrap();
    let got = dev.download(&outbox).unwrap();
    let mut want = poison.clone();
    let mut dev_want = dev_before.clone();
    for (b, &(ch, n, ps)) in seqs.iter().enumerate() {
        if n != big_r {
            continue;
        }
        for h in 0..kvh {
            // The oldest chunk in time order: token i at row R - 1 - i.
            let rows: Vec<bf16> = (0..l.chunk)
                .flat_map(|i| values[b][attn_at(&l, h, big_r - 1 - i)..][..d].to_vec())
                .collect();
            let q = quantize_chunk(&rows, d);
            if pool.on_device(ps) {
                let o = pool.chunk_offset(layer, ps, h, ch);
                dev_want[o..o + q.len()].copy_from_slice(&q);
            } else {
                want[(b * kvh + h) * cb..][..q.len()].copy_from_slice(&q);
            }
        }
    }
    assert!(got == want, "outbox contents differ");
    assert!(
        dev.download(&dev_slots).unwrap() == dev_want,
        "GPU value slots' contents differ"
    );
    Errors::default().report("shadow_fold", "outbox,llama-3.1-8b,exact");
}

/// One sequence of the end-to-end test, as the host knows it.
struct HostSeq {
    counts: SeqCounts,
    marks: Marks8,
    flags: Vec<u8>,
    basis: LowRank,
    ak: Vec<f32>,
    av: Vec<f32>,
}

#[test]
fn one_layer_decode_end_to_end_matches_cpu_attention() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let mut rng = seeded("shadow_decode");
    let mut ws = DecodeWorkspace::new();
    for arch in ["smollm2-135m", "llama-3.1-8b"] {
        let cfg = preset(arch).unwrap();
        let l = layout_of(
            &cfg,
            ShadowLayout {
                chunk: 8,
                rank: 48,
                slots: 24,
                outliers: 4,
                local: 2,
                chunk_cap: 1200,
                ..small_layout(1, 64, 1)
            },
        );
        let (kvh, d, g, kvd, c) = (l.kv_heads, l.head_dim, l.group, l.kv_width(), l.chunk);
        let (big_r, slots) = (l.recent_rows(), l.slots);
        // (chunks, recent tokens, outlier chunks): the last has fewer candidates than slots.
        let shapes = [(1100usize, 13usize, 4usize), (257, big_r, 4), (37, 1, 3), (20, 5, 2)];
        let batch = shapes.len();
        let case = format!("{arch},seqs={shapes:?},S={slots}");
        // Sequence i in pool slot i: the first two in the host pool, the others in GPU
        // value slots.
        let shape = PoolShape {
            layers: 2,
            seqs: 2,
            kv_heads: kvh,
            chunks: l.chunk_cap,
            chunk: c,
            head_dim: d,
            format: ValueFormat::Int8,
        };
        let layer = 1;
        let (mut map, pool_vals) = random_pool(&mut rng, &shape);
        let mapping = HostMapping::new(&ops, &mut map[..]).unwrap();
        let (pool, _slots, dev_vals) = with_dev_slots(&ops, &mut rng, &shape, mapping.device_addr(), batch - 2);
        let mut bufs = Vec::new();
        let mut host = Vec::new();
        for (i, &(chunks, n, n_out)) in shapes.iter().enumerate() {
            let mut b = LayerBuffers::new(&ops, l).unwrap();
            let marks = rand_marks(&mut rng, &l);
            let mut flags = vec![0u8; l.outlier_len()];
            for h in 0..kvh {
                for o in rand::seq::index::sample(&mut rng, chunks, n_out) {
                    flags[h * l.chunk_cap + o] = 1;
                }
            }
            let (codes, scales, uf) = rand_coefs(&mut rng, &l, 1.0);
            // Rebuilt keys of about the spread of the exact ones.
            let s = (3.0 / l.rank as f32).sqrt();
            let sv: Vec<f32> = (0..l.sv_len()).map(|_| rng.random_range(-s..s)).collect();
            let (ak, akf) = rand_bf16(&mut rng, l.attn_len(), 1.0);
            let (av, avf) = rand_bf16(&mut rng, l.attn_len(), 1.0);
            upload_marks(&ops, &mut b, &marks);
            b.outlier = dev.upload(&flags).unwrap();
            upload_coefs(&ops, &mut b, &codes, &scales);
            b.sv = dev.upload(&sv).unwrap();
            b.ak = dev.upload(&ak).unwrap();
            b.av = dev.upload(&av).unwrap();
            bufs.push(b);
            host.push(HostSeq {
                counts: counts(chunks, n, n_out, i),
                marks,
                flags,
                basis: LowRank {
                    u: uf,
                    sv,
                    rank: l.rank,
                    cols: kvd,
                    rounded: true,
                },
                ak: akf,
                av: avf,
            });
        }
        let entries: Vec<(&LayerBuffers, SeqCounts)> = bufs.iter().zip(&host).map(|(b, h)| (b, h.counts)).collect();
        let table = ShadowTable::new(&ops, &entries).unwrap();
        let mut scratch = StepScratch::new(&ops, &l, batch).unwrap();
        let inv = dev.upload(&rope_inv_freq(&cfg)).unwrap();
        let rope = Rope::new(&cfg);
        let mut cpu_tables: Vec<SlotTable> = (0..batch * kvh).map(|_| SlotTable::new(slots)).collect();
        let (q1, q1f) = rand_bf16(&mut rng, batch * kvh * g * d, 3.0);
        let mut hits_cpu = 0u64;
        for step in 0..2 {
            // The second step's queries are near the first's: most selections repeat.
            let q: Vec<bf16> = if step == 0 {
                q1.clone()
            } else {
                q1f.iter()
                    .map(|&x| bf16::from_f32(x + rng.random_range(-0.5f32..0.5)))
                    .collect()
            };
            let qf = f32s(&q);
            let dq = dev.upload(&q).unwrap();
            ops.shadow_scores(&table, &dq, &mut scratch).unwrap();
            ops.shadow_select(&table, &mut scratch, false).unwrap();
            ops.shadow_reuse(&table, &mut scratch).unwrap();
            ops.shadow_rebuild(&table, RebuildLists::of_step(&scratch), &inv)
                .unwrap();
            // SAFETY: the pool is mapped for the device and the host leaves it alone.
            unsafe {
                ops.shadow_fetch_values(
                    &table,
                    &scratch.misses,
                    &scratch.fetch_count,
                    None,
                    &pool,
                    layer,
                    FETCH_BLOCKS,
                )
            }
            .unwrap();
            // Attention: one entry per (sequence, KV head) over its contiguous rows.
            let views: Vec<(CudaView<bf16>, CudaView<bf16>, usize)> = (0..batch * kvh)
                .map(|e| {
                    let (b, h) = (e / kvh, e % kvh);
                    let (first, len) = l.attended_rows(&host[b].counts);
                    let range = attn_at(&l, h, first)..attn_at(&l, h + 1, 0);
                    (bufs[b].ak.slice(range.clone()), bufs[b].av.slice(range), len)
                })
                .collect();
            let kv_entries: Vec<(&CudaView<bf16>, &CudaView<bf16>, usize)> =
                views.iter().map(|(k, v, n)| (k, v, *n)).collect();
            // The slots' values are 8-bit chunks after each head's recent and outlier rows.
            let dense: Vec<usize> = (0..batch * kvh)
                .map(|e| {
                    let c = host[e / kvh].counts;
                    (c.recent + c.outliers * l.chunk as i32) as usize
                })
                .collect();
            let bad: Vec<usize> = dense.iter().map(|&x| x + 1).collect();
            let e = KvTable::new(&ops, &kv_entries, d)
                .unwrap()
                .with_value_chunks(&ops, &bad, c)
                .err()
                .expect("dense rows that leave part of a chunk are refused");
            assert!(format!("{e:#}").contains("whole chunks"), "{e:#}");
            let kv = KvTable::new(&ops, &kv_entries, d)
                .unwrap()
                .with_value_chunks(&ops, &dense, c)
                .unwrap();
            let attn = AttnShape {
                heads: g,
                kv_heads: 1,
                head_dim: d,
            };
            let mut out = dev.zeros::<bf16>(batch * kvh * g * d).unwrap();
            ops.fill_nan_bf16(&mut out).unwrap();
            ops.flash_decode(&mut out, &dq, &kv, attn, &mut ws).unwrap();
            let got = f32s(&dev.download(&out).unwrap());
            let sel = dev.download(&scratch.selected).unwrap();
            let gm = dev.download(&scratch.misses).unwrap();
            let gc = dev.download(&scratch.miss_count).unwrap();
            let gh = dev.download(&scratch.hits).unwrap()[0];
            let mut worst = Errors::default();
            for (b, hs) in host.iter().enumerate() {
                let gt = dev.download(&bufs[b].slots).unwrap();
                let n_out = hs.counts.outliers as usize;
                let n = hs.counts.recent as usize;
                let chunks = hs.counts.chunks as usize;
                for h in 0..kvh {
                    let e = b * kvh + h;
                    let what = format!("{case},step={step},seq={b},head={h}");
                    // Selection: the CPU's from its own scores, but for near ties.
                    let ex: Vec<bool> = hs.flags[h * l.chunk_cap..][..chunks].iter().map(|&f| f != 0).collect();
                    let qg = &qf[e * g * d..(e + 1) * g * d];
                    let scores = chunk_scores(qg, head_marks(&hs.marks, &l, chunks, h), &ex);
                    let rtol = 2.0 * (SCORE_RTOL + query_rtol(qg, head_marks(&hs.marks, &l, chunks, h)));
                    let gpu_sel = selection_of(&sel[e * slots..][..slots]);
                    let cpu_sel = top_k(&scores, &ex, slots);
                    assert_same_but_near_ties(&cpu_sel, &gpu_sel, &scores, (rtol, 0.0), &what);
                    // The reuse diff of that selection: exactly the CPU's.
                    let plan = cpu_tables[e].plan(&gpu_sel);
                    hits_cpu += plan.hits as u64;
                    assert_eq!(gc[e] as usize, plan.misses.len(), "{what}: misses");
                    for (j, &(s, ch)) in plan.misses.iter().enumerate() {
                        let at = (e * slots + j) * 2;
                        assert_eq!((gm[at] as usize, gm[at + 1] as u32), (s, ch), "{what}: miss {j}");
                    }
                    let occ = l.selected_for(&hs.counts);
                    assert_eq!(gpu_sel.len(), occ, "{what}: chunks selected");
                    let held: Vec<i32> = cpu_tables[e]
                        .slots()
                        .iter()
                        .map(|s| s.map_or(-1, |c| c as i32))
                        .collect();
                    assert_eq!(&gt[h * slots..][..slots], &held[..], "{what}: slot table");
                    assert!(
                        held[..occ].iter().all(|&c| c >= 0) && held[occ..].iter().all(|&c| c < 0),
                        "{what}: occupied slots are not 0..{occ}"
                    );
                    // Reference attention over [recent | outliers | occupied slots].
                    let (mut keys, mut vals) = (Vec::new(), Vec::new());
                    let first = big_r - n;
                    for row in first..big_r + n_out * c {
                        let at = attn_at(&l, h, row);
                        keys.extend_from_slice(&hs.ak[at..at + d]);
                        vals.extend_from_slice(&hs.av[at..at + d]);
                    }
                    for &ch in &held[..occ] {
                        let ch = ch as usize;
                        let mut k = vec![0f32; c * d];
                        hs.basis.rebuild(ch * c, c, h * d..(h + 1) * d, &mut k);
                        let positions: Vec<usize> = (ch * c..(ch + 1) * c).collect();
                        let (cos, sin) = rope.tables(&positions);
                        rope.apply(&mut k, 1, &cos, &sin);
                        keys.extend(k.iter().map(|&x| bf16::from_f32(x).to_f32()));
                        let seq = hs.counts.pool_seq as usize;
                        let src = chunk_ref(&pool, (&pool_vals, &dev_vals), (layer, seq, h, ch));
                        vals.extend(chunk_values(src, &shape).iter().map(|v| v.to_f32()));
                    }
                    let len = keys.len() / d;
                    assert_eq!(len, l.attended_rows(&hs.counts).1, "{what}: rows attended");
                    let mut want = vec![0f32; g * d];
                    let job = AttnJob {
                        q: qg,
                        start: len - 1,
                        k: &keys,
                        v: &vals,
                        out_row: 0,
                    };
                    causal_attention(&mut want, &[job], attn);
                    for (j, (gh, wh)) in got[e * g * d..(e + 1) * g * d]
                        .chunks_exact(d)
                        .zip(want.chunks_exact(d))
                        .enumerate()
                    {
                        let atol = 2e-2 * max_abs(wh);
                        let err = errors("shadow_decode", &format!("{what},qhead={j}"), gh, wh, |_, _| atol);
                        assert!(
                            err.norm_rel <= 1e-2,
                            "{what} query head {j}: ‖err‖/‖ref‖ = {:.3e}",
                            err.norm_rel
                        );
                        worst = worst.worst(err);
                    }
                }
            }
            assert_eq!(gh, hits_cpu, "{case} step {step}: hit counter");
            if step == 1 {
                assert!(gh > 0, "{case}: the second step found no hits");
            }
            worst.report("shadow_decode", &format!("{case},step={step},hits={gh}"));
        }
        drop(mapping);
    }
}

#[test]
fn bad_inputs_are_errors_that_say_what() {
    let Some(ops) = ops_or_skip() else { return };
    let dev = ops.device();
    let l = small_layout(2, 64, 2);
    let ok = counts(10, 3, 2, 0);
    let msg = |e: anyhow::Error| format!("{e:#}");
    let mut b = LayerBuffers::new(&ops, l).unwrap();
    let e = ShadowTable::new(&ops, &[(&b, counts(65, 0, 0, 0))])
        .err()
        .map(msg)
        .unwrap();
    assert!(e.contains("sequence 0") && e.contains("65 chunks"), "{e}");
    let other = LayerBuffers::new(&ops, ShadowLayout { slots: 8, ..l }).unwrap();
    let e = ShadowTable::new(&ops, &[(&b, ok), (&other, ok)])
        .err()
        .map(msg)
        .unwrap();
    assert!(e.contains("sequence 1") && e.contains("another layout"), "{e}");
    {
        let table = ShadowTable::new(&ops, &[(&b, ok), (&b, ok)]).unwrap();
        let mut one = StepScratch::new(&ops, &l, 1).unwrap();
        let q = dev.zeros::<bf16>(2 * l.kv_heads * l.group * l.head_dim).unwrap();
        let e = msg(ops.shadow_scores(&table, &q, &mut one).unwrap_err());
        assert!(e.contains("select: logits"), "{e}");
        let e = msg(ops.shadow_select(&table, &mut one, false).unwrap_err());
        assert!(e.contains("select: logits"), "{e}");
        let short = dev.zeros::<bf16>(10).unwrap();
        let mut two = StepScratch::new(&ops, &l, 2).unwrap();
        let e = msg(ops.shadow_scores(&table, &short, &mut two).unwrap_err());
        assert!(e.contains("select: queries"), "{e}");
        let bad_pool = DevicePool {
            host: 16,
            dev: 0,
            dev_seqs: 0,
            shape: PoolShape {
                layers: 1,
                seqs: 1,
                kv_heads: l.kv_heads,
                chunks: l.chunk_cap,
                chunk: l.chunk + 1,
                head_dim: l.head_dim,
                format: ValueFormat::Int8,
            },
        };
        // SAFETY: refused before any launch (the pool's shape does not fit).
        let e = msg(
            unsafe { ops.shadow_fetch_values(&table, &two.misses, &two.miss_count, None, &bad_pool, 0, 16) }
                .unwrap_err(),
        );
        assert!(e.contains("chunks of"), "{e}");
        // SAFETY: as above.
        let e = msg(unsafe { ops.shadow_fold(&table, &bad_pool, 0, None) }.unwrap_err());
        assert!(e.contains("chunks of"), "{e}");
        // A slot past the host pool and the GPU value slots is refused, not read.
        let small = DevicePool {
            dev: 32,
            dev_seqs: 1,
            shape: PoolShape {
                chunk: l.chunk,
                ..bad_pool.shape
            },
            ..bad_pool
        };
        let past = ShadowTable::new(&ops, &[(&b, ok), (&b, counts(10, 3, 2, 2))]).unwrap();
        // SAFETY: as above (the sequence's slot is outside the pools).
        let e = msg(
            unsafe { ops.shadow_fetch_values(&past, &two.misses, &two.miss_count, None, &small, 0, 16) }.unwrap_err(),
        );
        assert!(e.contains("pool slot 2 outside the pools' 2 (1 host, 1 device)"), "{e}");
        // SAFETY: as above.
        let e = msg(unsafe { ops.shadow_fold(&past, &small, 0, None) }.unwrap_err());
        assert!(e.contains("sequence 1: pool slot 2"), "{e}");
    }
    {
        // The append's counts include the new token: an empty window is a caller's mistake.
        let empty = counts(10, 0, 2, 0);
        let table = ShadowTable::new(&ops, &[(&b, empty)]).unwrap();
        let heads = l.kv_heads * l.group;
        let width = (heads + 2 * l.kv_heads) * l.head_dim;
        let mut q = dev.zeros::<bf16>(heads * l.head_dim).unwrap();
        let e = msg(ops
            .shadow_qkv_append(
                &mut q,
                &dev.zeros::<bf16>(width).unwrap(),
                None,
                &dev.zeros::<i32>(1).unwrap(),
                &dev.zeros::<f32>(l.head_dim / 2).unwrap(),
                &table,
                heads,
            )
            .unwrap_err());
        assert!(e.contains("include the new token"), "{e}");
    }
    b.ak = dev.zeros(10).unwrap();
    let e = ShadowTable::new(&ops, &[(&b, ok)]).err().map(msg).unwrap();
    assert!(e.contains("buffer ak"), "{e}");
}

/// The stage marks' stamps (kernels/timeline.cu): the GPU's clock in nanoseconds, in
/// stream order. A stamp launched after the host slept 20 ms is that much later than the
/// one before it and no more than the host's time later; the anchor clock
/// (`gpu_clock_now`) advances as the host's does; a full room refuses another stamp.
#[test]
fn stage_stamps_count_nanoseconds_in_stream_order() {
    let Some(ops) = ops_or_skip() else { return };
    let (g0, h0) = gpu_clock_now(&ops).unwrap();
    let mut st = Stamps::new(&ops, 3).unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(st.stamp(&ops).unwrap(), 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(st.stamp(&ops).unwrap(), 1);
    let slept = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(st.stamp(&ops).unwrap(), 2);
    let e = st.stamp(&ops).unwrap_err().to_string();
    assert!(e.contains("more than 3 stage marks"), "{e}");
    st.queue_read_back(&ops).unwrap();
    let ns = st.read().unwrap().to_vec();
    let (g1, h1) = gpu_clock_now(&ops).unwrap();
    assert!(
        g0 > 0 && ns[0] >= g0 && ns[0] <= ns[1] && ns[1] <= ns[2] && ns[2] <= g1,
        "{g0} {ns:?} {g1}"
    );
    let gap = stamp_ms(&ns, 0, 1);
    assert!(
        gap >= 19.9 && gap <= slept + 1.0,
        "{gap} ms between stamps, the host slept {slept} ms"
    );
    let (gpu, host) = ((g1 - g0) as f64 / 1e6, (h1 - h0).as_secs_f64() * 1e3);
    assert!(
        (gpu - host).abs() <= 1.0 + 0.01 * host,
        "GPU {gpu} ms against the host's {host} ms"
    );
    eprintln!("RESULT stage_stamps gap_ms={gap:.3} slept_ms={slept:.3} gpu_ms={gpu:.3} host_ms={host:.3}");
    st.clear();
    assert_eq!(st.stamp(&ops).unwrap(), 0);
}
