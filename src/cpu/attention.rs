//! Causal grouped-query attention over a sequence's cached keys and values.

use super::matmul::{matmul, MatRef, Threads};
use super::ops::softmax;
use rayon::prelude::*;

/// Query rows per task: bounds the score buffer to `BLOCK × context` floats.
const BLOCK: usize = 64;

/// The attention shape shared by every job.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// One sequence's new query rows and its whole key/value cache.
pub struct AttnJob<'a> {
    /// Queries `[n, heads·d]` for positions `start..start+n`, post-RoPE.
    pub q: &'a [f32],
    /// Position of the first query row.
    pub start: usize,
    /// Keys `[start+n, kv_heads·d]`, post-RoPE.
    pub k: &'a [f32],
    /// Values `[start+n, kv_heads·d]`.
    pub v: &'a [f32],
    /// Row of `out` that receives the first query's output.
    pub out_row: usize,
}

/// Computes `softmax(q·kᵀ/√d + causal mask)·v` for every job, writing each job's output
/// rows `[n, heads·d]` into `out` from row `out_row` on.
pub fn causal_attention(out: &mut [f32], jobs: &[AttnJob], s: AttnShape) {
    let (qd, kvd, d) = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim);
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // Tasks: (job, head, first row, row count, output row offset).
    let mut tasks = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let n = job.q.len() / qd;
        for h in 0..s.heads {
            for i0 in (0..n).step_by(BLOCK) {
                tasks.push((j, h, i0, BLOCK.min(n - i0), job.out_row));
            }
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(j, h, i0, rows, _)| {
            let job = &jobs[j];
            let g = h / group;
            let keys = job.start + i0 + rows;
            let mut scores = vec![0.0f32; rows * keys];
            let q = MatRef {
                data: &job.q[i0 * qd + h * d..],
                rows,
                cols: d,
                row_stride: qd,
                col_stride: 1,
            };
            let kt = MatRef {
                data: &job.k[g * d..],
                rows: keys,
                cols: d,
                row_stride: kvd,
                col_stride: 1,
            }
            .t();
            matmul(&mut scores, keys, q, kt, false, Threads::Single);
            for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                let visible = job.start + i0 + r + 1;
                for v in &mut row[..visible] {
                    *v *= scale;
                }
                row[visible..].fill(f32::NEG_INFINITY);
                softmax(row);
            }
            let mut o = vec![0.0f32; rows * d];
            let p = MatRef::row_major(&scores, rows, keys);
            let v = MatRef {
                data: &job.v[g * d..],
                rows: keys,
                cols: d,
                row_stride: kvd,
                col_stride: 1,
            };
            matmul(&mut o, d, p, v, false, Threads::Single);
            o
        })
        .collect();
    for (&(_, h, i0, rows, r0), o) in tasks.iter().zip(results) {
        for r in 0..rows {
            let dst = (r0 + i0 + r) * qd + h * d;
            out[dst..dst + d].copy_from_slice(&o[r * d..(r + 1) * d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Straightforward attention in f64, one query at a time.
    fn reference(q: &[f32], k: &[f32], v: &[f32], start: usize, s: AttnShape) -> Vec<f32> {
        let (qd, kvd, d) = (s.heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim);
        let n = q.len() / qd;
        let mut out = vec![0.0f32; n * qd];
        for i in 0..n {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let t = start + i + 1;
                let sc: Vec<f64> = (0..t)
                    .map(|p| {
                        (0..d)
                            .map(|e| q[i * qd + h * d + e] as f64 * k[p * kvd + g * d + e] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for e in 0..d {
                    out[i * qd + h * d + e] =
                        ((0..t).map(|p| w[p] * v[p * kvd + g * d + e] as f64).sum::<f64>() / z) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_prefix_and_gqa() {
        let seed = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = AttnShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 16,
        };
        for &(start, n) in &[(0usize, 1usize), (0, 70), (37, 1), (100, 130)] {
            let t = start + n;
            let mut r = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let (q, k, v) = (r(n * 96), r(t * 32), r(t * 32));
            let mut out = vec![f32::NAN; n * 96];
            causal_attention(
                &mut out,
                &[AttnJob {
                    q: &q,
                    start,
                    k: &k,
                    v: &v,
                    out_row: 0,
                }],
                s,
            );
            let want = reference(&q, &k, &v, start, s);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "seed {seed}: {a} vs {b}");
            }
        }
    }
}
