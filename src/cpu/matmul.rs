//! Matrix products through the `gemm` crate.

use gemm::Parallelism;

/// How a product spreads over threads.
#[derive(Clone, Copy, Debug)]
pub enum Threads {
    /// Use the whole rayon pool.
    Pool,
    /// Run on the calling thread (inside an already parallel loop).
    Single,
}

impl Threads {
    fn parallelism(self) -> Parallelism {
        match self {
            Threads::Pool => Parallelism::Rayon(rayon::current_num_threads()),
            Threads::Single => Parallelism::None,
        }
    }
}

/// A read-only strided matrix view: element `(r, c)` is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Backing storage.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn last_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
    }
}

/// `out = a·b` (or `out += a·b` when `accumulate`), `out` dense row-major `[a.rows, b.cols]`
/// with row stride `out_stride`.
pub fn matmul(out: &mut [f32], out_stride: usize, a: MatRef, b: MatRef, accumulate: bool, threads: Threads) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.len() > (m - 1) * out_stride + n - 1, "output too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                out[r * out_stride..r * out_stride + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.data.len() > a.last_index() && b.data.len() > b.last_index(),
        "operand out of bounds"
    );
    // SAFETY: every index gemm touches lies within the bounds asserted above: `out`
    // holds m rows of stride `out_stride` with n columns, and each operand's largest
    // index is checked against its slice length.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads.parallelism(),
        );
    }
}

/// `out[m, n] (+)= x[m, k] · wᵀ` for a linear layer's weight `w[n, k]`.
pub fn linear(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    matmul(
        out,
        n,
        MatRef::row_major(x, m, k),
        MatRef::row_major(w, n, k).t(),
        accumulate,
        Threads::Pool,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut o = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += x[i * k + p] as f64 * w[j * k + p] as f64;
                }
                o[i * n + j] = s as f32;
            }
        }
        o
    }

    #[test]
    fn linear_matches_naive_and_accumulates() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        for &(m, k, n) in &[(1, 7, 5), (3, 64, 33), (17, 129, 65), (64, 256, 300)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(&x, &w, m, k, n);
            let mut out = vec![f32::NAN; m * n];
            linear(&mut out, &x, &w, m, k, n, false);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
            linear(&mut out, &x, &w, m, k, n, true);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - 2.0 * b).abs() <= 2e-4 * (1.0 + b.abs()), "{a} vs {}", 2.0 * b);
            }
        }
    }
}
