//! Rank-r factorisation of pre-RoPE keys: `K ≈ U · SV` with `U = K·V_r` and
//! `SV = V_rᵀ`, where `V_r` holds the top-r eigenvectors of the Gram matrix `KᵀK`
//! (the same subspace as a truncated SVD of K). Each row of `U` (a token's coefficients)
//! is kept in 8 bits with a scale of its own ([`crate::cpu::codes8`]), as the GPU stores it,
//! or exact for the reference's checks against full attention ([`LowRank::rounded`]).

use crate::cpu::codes8;
use crate::cpu::matmul::{matmul, MatRef, Threads};
use anyhow::{bail, Result};
use nalgebra::{DMatrix, SymmetricEigen};

/// The top-`rank` eigenvectors of the symmetric `[cols, cols]` matrix `gram` (taken as
/// `(G + Gᵀ)/2` and decomposed in f64), as orthonormal rows `[rank, cols]`, the largest
/// eigenvalue first. A non-finite `gram` (keys holding NaN or infinity) is an error.
pub fn top_eigenvectors(gram: &[f32], cols: usize, rank: usize) -> Result<Vec<f32>> {
    if rank == 0 || rank > cols {
        bail!("rank {rank} must be in 1..={cols}");
    }
    if gram.len() != cols * cols {
        bail!("Gram matrix of {} values, {cols}×{cols} expected", gram.len());
    }
    if let Some(i) = gram.iter().position(|v| !v.is_finite()) {
        bail!(
            "the keys' Gram matrix holds {} at ({}, {}): the keys are not finite",
            gram[i],
            i / cols,
            i % cols
        );
    }
    let g = DMatrix::from_fn(cols, cols, |i, j| {
        0.5 * (gram[i * cols + j] as f64 + gram[j * cols + i] as f64)
    });
    // Converges in a few sweeps per eigenvalue on finite input; the cap only turns a
    // failure into an error.
    let eig = SymmetricEigen::try_new(g, f64::EPSILON, 1000 * cols)
        .ok_or_else(|| anyhow::anyhow!("the {cols}×{cols} eigendecomposition did not converge"))?;
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let mut sv = vec![0.0f32; rank * cols];
    for (r, &e) in order.iter().take(rank).enumerate() {
        for c in 0..cols {
            sv[r * cols + c] = eig.eigenvectors[(c, e)] as f32;
        }
    }
    Ok(sv)
}

/// Low-rank keys of one layer of one sequence.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// Coefficients `[tokens, rank]`, one row per token: each row `code · scale` (8 bits,
    /// held here as the f32 values those stand for) when `rounded`, else exact.
    pub u: Vec<f32>,
    /// Basis `[rank, cols]` with orthonormal rows.
    pub sv: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// Width of a key row (`kv_heads · head_dim`).
    pub cols: usize,
    /// Whether [`LowRank::project`] rounds each row to 8 bits (the default, what the GPU
    /// stores); false keeps the coefficients exact.
    pub rounded: bool,
}

impl LowRank {
    /// Factorises `k` (`[rows, cols]`, row-major) at `rank`, its coefficients `rounded` to
    /// 8 bits or exact.
    pub fn factorize(k: &[f32], rows: usize, cols: usize, rank: usize, rounded: bool) -> Result<Self> {
        if rank == 0 || rank > cols {
            bail!("rank {rank} must be in 1..={cols}");
        }
        let km = MatRef::row_major(k, rows, cols);
        let mut gram = vec![0.0f32; cols * cols];
        matmul(&mut gram, cols, km.t(), km, false, Threads::Pool);
        let sv = top_eigenvectors(&gram, cols, rank)?;
        let mut lr = LowRank {
            u: Vec::new(),
            sv,
            rank,
            cols,
            rounded,
        };
        lr.u = lr.project(k, rows);
        Ok(lr)
    }

    /// Coefficients of new key rows on the existing basis: `k · SVᵀ`, `[rows, rank]`, each
    /// row rounded to 8 bits with its own scale (`code · scale`, [`codes8`]) when
    /// [`LowRank::rounded`].
    pub fn project(&self, k: &[f32], rows: usize) -> Vec<f32> {
        let mut u = vec![0.0f32; rows * self.rank];
        let km = MatRef::row_major(k, rows, self.cols);
        let svt = MatRef::row_major(&self.sv, self.rank, self.cols).t();
        matmul(&mut u, self.rank, km, svt, false, Threads::Single);
        if !self.rounded {
            return u;
        }
        let mut codes = vec![0i8; self.rank];
        for row in u.chunks_exact_mut(self.rank) {
            let s = codes8::quantize(row, &mut codes);
            codes8::dequantize(&codes, s, row);
        }
        u
    }

    /// Appends rows to `u` (keys folded in after prefill).
    pub fn append(&mut self, k: &[f32], rows: usize) {
        let u = self.project(k, rows);
        self.u.extend_from_slice(&u);
    }

    /// Tokens represented.
    pub fn tokens(&self) -> usize {
        self.u.len() / self.rank
    }

    /// Rebuilds the columns `cols` of token rows `first..first+n` into `out` (`[n, cols.len()]`).
    pub fn rebuild(&self, first: usize, n: usize, cols: std::ops::Range<usize>, out: &mut [f32]) {
        let u = MatRef {
            data: &self.u[first * self.rank..],
            rows: n,
            cols: self.rank,
            row_stride: self.rank,
            col_stride: 1,
        };
        let basis = MatRef {
            data: &self.sv[cols.start..],
            rows: self.rank,
            cols: cols.len(),
            row_stride: self.cols,
            col_stride: 1,
        };
        matmul(out, cols.len(), u, basis, false, Threads::Single);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Keys with a decaying spectrum, as real pre-RoPE keys have.
    fn keys(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let basis: Vec<f32> = (0..cols * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut k = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for j in 0..cols {
                let w = rng.random_range(-1.0f32..1.0) / (1.0 + j as f32).powf(1.5);
                for c in 0..cols {
                    k[r * cols + c] += w * basis[j * cols + c];
                }
            }
        }
        k
    }

    fn error(k: &[f32], lr: &LowRank, rows: usize) -> f32 {
        let mut rec = vec![f32::NAN; rows * lr.cols];
        lr.rebuild(0, rows, 0..lr.cols, &mut rec);
        let num: f32 = k.iter().zip(&rec).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = k.iter().map(|a| a * a).sum();
        (num / den).sqrt()
    }

    /// The most relative error 8-bit coefficients leave at full rank `rank`: each within
    /// half a step (`max / 254`) of the exact one, so a row within `√rank / 254` of its
    /// norm (orthonormal basis).
    fn rounding_bound(rank: usize) -> f32 {
        (rank as f32).sqrt() / 254.0
    }

    #[test]
    fn error_falls_with_rank_down_to_the_rounding_at_full_rank() {
        let seed = rand::random();
        let (rows, cols) = (300, 48);
        let k = keys(rows, cols, seed);
        let mut last = f32::INFINITY;
        for rank in [4, 8, 16, 32, 48] {
            let e = error(&k, &LowRank::factorize(&k, rows, cols, rank, true).unwrap(), rows);
            assert!(e < last, "seed {seed}: rank {rank} error {e} not below {last}");
            last = e;
        }
        assert!(last < rounding_bound(cols), "seed {seed}: full rank error {last}");
        assert!(
            last > 1e-6,
            "seed {seed}: full rank error {last}: the coefficients are not rounded"
        );
        let exact = error(&k, &LowRank::factorize(&k, rows, cols, cols, false).unwrap(), rows);
        assert!(
            exact < 1e-5,
            "seed {seed}: full rank error {exact} with exact coefficients"
        );
    }

    #[test]
    fn each_row_of_coefficients_is_codes_times_its_scale() {
        let seed = rand::random();
        let (rows, cols) = (40, 24);
        let k = keys(rows, cols, seed);
        let lr = LowRank::factorize(&k, rows, cols, 12, true).unwrap();
        for row in lr.u.chunks_exact(12) {
            let m = row.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            let s = m / 127.0;
            assert!(m > 0.0, "seed {seed}");
            for &x in row {
                let q = x / s;
                assert!(
                    (q - q.round()).abs() < 1e-3 && q.abs() <= 127.0 + 1e-3,
                    "seed {seed}: {x} / {s}"
                );
            }
        }
    }

    #[test]
    fn appended_rows_project_onto_the_basis() {
        let k = keys(64, 16, 3);
        let mut lr = LowRank::factorize(&k[..32 * 16], 32, 16, 16, true).unwrap();
        lr.append(&k[32 * 16..], 32);
        assert_eq!(lr.tokens(), 64);
        assert!(error(&k, &lr, 64) < rounding_bound(16));
        let mut part = vec![0.0; 4 * 8];
        lr.rebuild(40, 4, 8..16, &mut part);
        for t in 0..4 {
            let row = &k[(40 + t) * 16..(41 + t) * 16];
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            for c in 0..8 {
                assert!((part[t * 8 + c] - row[8 + c]).abs() < rounding_bound(16) * norm);
            }
        }
        assert!(LowRank::factorize(&k, 64, 16, 17, true).is_err());
    }
}
