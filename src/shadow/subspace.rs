//! The top-`rank` eigen-subspace of a symmetric positive semi-definite matrix `G`
//! (`[dim, dim]`: the Gram matrix `KᵀK` of a layer's pre-RoPE keys) by randomised
//! subspace iteration with a Rayleigh–Ritz step (Halko, Martinsson & Tropp, SIAM Review
//! 2011, algorithms 4.4 and 5.3), for when `dim` is too large for a full
//! eigendecomposition on the host (1024 for Llama-3.1-8B: about a second in f64). The
//! large products, on blocks of `l = rank + p` columns, run where `G` lives, through
//! [`BlockOps`] (cuBLAS in [`crate::cuda::CudaOps::shadow_factorize`]); only `[l, l]`
//! matrices come to the host, where they are factorised in f64.
//!
//! With the blocks `[dim, l]`:
//! 1. `Y = G·Ω` for a fixed Gaussian `Ω` ([`gaussian_block`]);
//! 2. [`POWER_ITERATIONS`] times: `Q = orth(Y)`, `Y = G·Q`;
//! 3. `Q = orth(Y)`, `Z = G·Q` and the Rayleigh quotient `T = QᵀZ` (`[l, l]`) to the host;
//!    its eigenvectors `W`, largest eigenvalue first: the basis is `Q·W[:, ..rank]`, the
//!    Ritz vectors of the `rank` largest Ritz values (orthonormal columns).
//!
//! `orth` is shifted CholeskyQR (Fukaya, Kannan, Nakatsukasa, Zhang & Yamamoto, SIAM J.
//! Sci. Comput. 2020): `B = YᵀY` to the host, `R = chol(B + s·I)` with the shift `s` that
//! lets the factorisation succeed for `cond(Y)` up to about 1/ε, `Y ← Y·R⁻¹`, and again
//! (without the shift) until `YᵀY` is the identity within [`ORTH_TOL`]: two or three
//! passes. Everything is f64: in f32 the Gram matrix of `Y` would lose every direction
//! of `Y` weaker than √ε_f32 ≈ 3·10⁻⁴ of its strongest, and `G`'s eigenvalues span more
//! than that. `G` must be positive definite, which a backend ensures by adding
//! [`RIDGE`]`·trace(G)` to its diagonal (same eigenvectors; keys of a rank below `l`,
//! such as a prompt shorter than `l` tokens, would otherwise leave `Y` singular).

use anyhow::{bail, ensure, Result};
use nalgebra::{Cholesky, DMatrix, SymmetricEigen};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Columns added to the rank (`p`): the subspace found has `rank + p` dimensions and the
/// basis keeps the top `rank` of them.
pub const OVERSAMPLING: usize = 16;

/// Power iterations (`q`). Each one multiplies `G` once more and orthonormalises once
/// more (two or three host round trips, about a millisecond at `l` = 176), and shrinks the
/// weight of the directions beyond the block by `λ_{l+1}/λ_rank` (0.3–0.8 on the spectra
/// below). Measured as the rise of the relative reconstruction error `‖K − K·V·Vᵀ‖/‖K‖`
/// over the exact eigenvectors' (`tests::iteration_count_measurement` for the synthetic
/// spectra):
///
/// | keys | q = 1 | q = 2 | q = 3 | q = 4 |
/// |---|---|---|---|---|
/// | SmolLM2 pre-RoPE keys, 4K tokens of English, layers 0/7/15/23/29, 192 wide, rank 96 and 160 | ≤ 2.1 % | ≤ 0.64 % | ≤ 0.25 % | ≤ 0.11 % |
/// | power law (as `crate::shadow::factor`'s tests), 8192 × 1024, rank 96 and 160 | ≤ 1.9 % | ≤ 0.64 % | ≤ 0.27 % | ≤ 0.13 % |
/// | 24 strong directions + isotropic noise, 8192 × 192 and × 1024, rank 96 and 160 | ≤ 3.7 % | ≤ 2.9 % | ≤ 2.3 % | ≤ 1.8 % |
///
/// Three iterations put the error within 0.3 % of the optimum on realistic spectra (an
/// error of 8.30 % becomes 8.32 %). Past a few strong directions in flat noise the
/// subspace is barely defined: any choice there keeps about as much, and the few percent
/// more of a small error fall only slowly with more iterations. The leading half of the
/// basis matches the exact eigenvectors to sin θ ≤ 5·10⁻³ on the real keys.
pub const POWER_ITERATIONS: usize = 3;

/// The ridge, relative to `trace(G)`, that a backend adds to `G`'s diagonal.
pub const RIDGE: f64 = 1.0 / (1u64 << 30) as f64;

/// Largest deviation of `QᵀQ` from the identity that [`top_subspace`] accepts as
/// orthonormal.
pub const ORTH_TOL: f64 = 1e-10;

/// CholeskyQR passes before giving up (three suffice up to `cond(Y)` ≈ 1/ε, plus the
/// check).
const MAX_ORTH_PASSES: usize = 5;

/// Seed of [`gaussian_block`].
const OMEGA_SEED: u64 = 0x5AD0_F4C7_0815;

/// The sizes of one subspace iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubspacePlan {
    /// Rows and columns of `G`.
    pub dim: usize,
    /// Dimensions kept (basis vectors returned).
    pub rank: usize,
    /// Columns of the blocks, `l = min(rank + OVERSAMPLING, dim)`.
    pub width: usize,
    /// Power iterations.
    pub iterations: usize,
}

impl SubspacePlan {
    /// The plan for the top `rank` of `dim` dimensions with [`POWER_ITERATIONS`].
    pub fn new(dim: usize, rank: usize) -> Result<Self> {
        ensure!((1..=dim).contains(&rank), "rank {rank} must be in 1..={dim}");
        Ok(SubspacePlan {
            dim,
            rank,
            width: (rank + OVERSAMPLING).min(dim),
            iterations: POWER_ITERATIONS,
        })
    }
}

/// The products of the iteration on `[dim, l]` blocks that live with `G` (column-major:
/// column `j` is `dim` consecutive values). The `[l, ·]` matrices are on the host.
pub trait BlockOps {
    /// A block of the backend.
    type Block;
    /// `out = G·x`.
    fn apply_g(&mut self, x: &Self::Block, out: &mut Self::Block) -> Result<()>;
    /// `xᵀ·y`, `[l, l]`.
    fn inner(&mut self, x: &Self::Block, y: &Self::Block) -> Result<DMatrix<f64>>;
    /// `x ← x·r⁻¹` for an upper-triangular `r` (`[l, l]`).
    fn solve_upper(&mut self, x: &mut Self::Block, r: &DMatrix<f64>) -> Result<()>;
    /// `out = x·m` (`m` is `[l, k]`, `out` `[dim, k]`).
    fn times(&mut self, x: &Self::Block, m: &DMatrix<f64>, out: &mut Self::Block) -> Result<()>;
}

/// The fixed starting block `Ω` (`[dim, cols]`, column-major, standard normal values from
/// a fixed seed: the same factorisation for the same keys, every run).
pub fn gaussian_block(dim: usize, cols: usize) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(OMEGA_SEED);
    (0..dim * cols).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// The top-`plan.rank` eigen-subspace of `G`: writes its orthonormal basis to `out`
/// (`[dim, rank]`, the Ritz vectors, largest Ritz value first) and returns the Ritz
/// values. `omega` holds [`gaussian_block`]`(dim, width)`; `y` and `z` are scratch blocks
/// of `width` columns.
pub fn top_subspace<O: BlockOps>(
    ops: &mut O,
    plan: &SubspacePlan,
    omega: &O::Block,
    (y, z): (&mut O::Block, &mut O::Block),
    out: &mut O::Block,
) -> Result<Vec<f64>> {
    let (mut y, mut z) = (y, z);
    ops.apply_g(omega, y)?;
    for it in 0..=plan.iterations {
        orthonormalize(ops, plan, y)?;
        ops.apply_g(y, z)?;
        if it < plan.iterations {
            std::mem::swap(&mut y, &mut z);
        }
    }
    let t = symmetric(ops.inner(y, z)?, "the Rayleigh quotient QᵀGQ")?;
    let (values, w) = top_eigen(t, plan.rank)?;
    ops.times(y, &w, out)?;
    Ok(values)
}

/// `(m + mᵀ)/2`, or an error naming `what` when it is not finite.
fn symmetric(m: DMatrix<f64>, what: &str) -> Result<DMatrix<f64>> {
    if let Some(v) = m.iter().find(|v| !v.is_finite()) {
        bail!("{what} holds {v}: the keys are not finite or too large");
    }
    Ok((&m + m.transpose()) * 0.5)
}

/// `y ← y·R⁻¹` until `yᵀy = I` (shifted CholeskyQR, then CholeskyQR).
fn orthonormalize<O: BlockOps>(ops: &mut O, plan: &SubspacePlan, y: &mut O::Block) -> Result<()> {
    let (m, n) = (plan.dim as f64, plan.width as f64);
    let mut dev = f64::INFINITY;
    for pass in 0..MAX_ORTH_PASSES {
        let b = symmetric(ops.inner(y, y)?, "the block's Gram matrix YᵀY")?;
        let l = b.nrows();
        if pass > 0 {
            dev = (0..l)
                .flat_map(|i| (0..l).map(move |j| (i, j)))
                .map(|(i, j)| (b[(i, j)] - if i == j { 1.0 } else { 0.0 }).abs())
                .fold(0.0, f64::max);
            if dev <= ORTH_TOL {
                return Ok(());
            }
        }
        // The first pass, on a block of any conditioning, shifts by 11(mn + n(n+1))·ε·‖Y‖²
        // (‖Y‖² ≤ trace(YᵀY)); the later ones need a shift only if the plain
        // factorisation fails.
        let shift = 11.0 * (m * n + n * (n + 1.0)) * f64::EPSILON * b.trace();
        let chol = if pass == 0 { None } else { Cholesky::new(b.clone()) };
        let chol = match chol {
            Some(c) => c,
            None => {
                let shifted = &b + DMatrix::identity(l, l) * shift;
                Cholesky::new(shifted).ok_or_else(|| {
                    anyhow::anyhow!(
                        "orthonormalising the subspace block: the shifted Cholesky factorisation \
                         failed (trace of YᵀY {:e})",
                        b.trace()
                    )
                })?
            }
        };
        ops.solve_upper(y, &chol.l().transpose())?;
    }
    bail!(
        "orthonormalising the subspace block: QᵀQ still {dev:e} from the identity after \
         {MAX_ORTH_PASSES} passes"
    )
}

/// The `rank` largest eigenvalues of the symmetric `t` and their eigenvectors (columns).
fn top_eigen(t: DMatrix<f64>, rank: usize) -> Result<(Vec<f64>, DMatrix<f64>)> {
    let l = t.nrows();
    let eig = SymmetricEigen::try_new(t, f64::EPSILON, 1000 * l)
        .ok_or_else(|| anyhow::anyhow!("the {l}×{l} Rayleigh–Ritz eigendecomposition did not converge"))?;
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let order = &order[..rank];
    let w = DMatrix::from_fn(l, rank, |i, j| eig.eigenvectors[(i, order[j])]);
    Ok((order.iter().map(|&e| eig.eigenvalues[e]).collect(), w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The products on the host, in f64: the steps the GPU runs with cuBLAS.
    struct Host {
        g: DMatrix<f64>,
    }

    impl Host {
        /// `kᵀk + RIDGE·trace·I` for keys `k` (`[rows, dim]`), as the GPU path builds it.
        fn of_keys(k: &DMatrix<f64>) -> Self {
            let mut g = k.transpose() * k;
            let ridge = RIDGE * g.trace();
            for i in 0..g.nrows() {
                g[(i, i)] += if ridge > 0.0 { ridge } else { 1.0 };
            }
            Host { g }
        }
    }

    impl BlockOps for Host {
        type Block = DMatrix<f64>;
        fn apply_g(&mut self, x: &DMatrix<f64>, out: &mut DMatrix<f64>) -> Result<()> {
            *out = &self.g * x;
            Ok(())
        }
        fn inner(&mut self, x: &DMatrix<f64>, y: &DMatrix<f64>) -> Result<DMatrix<f64>> {
            Ok(x.transpose() * y)
        }
        fn solve_upper(&mut self, x: &mut DMatrix<f64>, r: &DMatrix<f64>) -> Result<()> {
            // x·r⁻¹ = (r⁻ᵀ·xᵀ)ᵀ, with rᵀ lower triangular.
            let mut xt = x.transpose();
            ensure!(r.transpose().solve_lower_triangular_mut(&mut xt), "singular r");
            *x = xt.transpose();
            Ok(())
        }
        fn times(&mut self, x: &DMatrix<f64>, m: &DMatrix<f64>, out: &mut DMatrix<f64>) -> Result<()> {
            *out = x * m;
            Ok(())
        }
    }

    /// The randomised basis (`[dim, rank]`) and Ritz values for `h` with `iterations`.
    fn randomised(h: &mut Host, rank: usize, iterations: usize) -> Result<(DMatrix<f64>, Vec<f64>)> {
        let plan = SubspacePlan {
            iterations,
            ..SubspacePlan::new(h.g.nrows(), rank)?
        };
        let omega = DMatrix::from_vec(plan.dim, plan.width, gaussian_block(plan.dim, plan.width));
        let (mut y, mut z) = (omega.clone(), omega.clone());
        let mut out = DMatrix::zeros(plan.dim, plan.rank);
        let v = top_subspace(h, &plan, &omega, (&mut y, &mut z), &mut out)?;
        Ok((out, v))
    }

    /// The exact top-`rank` eigenvectors and eigenvalues.
    fn exact(g: &DMatrix<f64>, rank: usize) -> (DMatrix<f64>, Vec<f64>) {
        let (v, w) = top_eigen(g.clone(), rank).unwrap();
        (w, v)
    }

    /// Sine of the largest principal angle between the spans of orthonormal `a` and `b`:
    /// ‖(I − a·aᵀ)·b‖₂ (accurate for small angles, unlike √(1 − cos²)).
    fn sin_max(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
        (b - a * (a.transpose() * b))
            .singular_values()
            .iter()
            .fold(0.0, |m: f64, &v| m.max(v))
    }

    /// Largest deviation of `vᵀv` from the identity.
    fn orth_error(v: &DMatrix<f64>) -> f64 {
        let n = v.ncols();
        (v.transpose() * v - DMatrix::identity(n, n)).amax()
    }

    /// Relative reconstruction error ‖K − K·V·Vᵀ‖ / ‖K‖ from `G = KᵀK` (no ridge).
    fn rec_error(k: &DMatrix<f64>, v: &DMatrix<f64>) -> f64 {
        (k - k * v * v.transpose()).norm() / k.norm()
    }

    /// Keys with a decaying spectrum (as `crate::shadow::factor`'s tests make them): row
    /// weights of direction `j` scaled by `(1 + j)^-decay` on a random basis.
    fn power_law_keys(rng: &mut impl Rng, rows: usize, dim: usize, decay: f64) -> DMatrix<f64> {
        let b = DMatrix::from_fn(dim, dim, |_, _| rng.random_range(-1.0..1.0));
        let w = DMatrix::from_fn(rows, dim, |_, j| {
            rng.random_range(-1.0..1.0) / (1.0 + j as f64).powf(decay)
        });
        w * b
    }

    /// `strong` strong directions (weights 20/(1 + j)) plus Gaussian noise of `noise`.
    fn strong_plus_noise(rng: &mut impl Rng, rows: usize, dim: usize, strong: usize, noise: f64) -> DMatrix<f64> {
        let b = DMatrix::from_fn(strong, dim, |_, _| rng.random_range(-1.0..1.0));
        let w = DMatrix::from_fn(rows, strong, |_, j| {
            rng.random_range(-1.0..1.0) * 20.0 / (1.0 + j as f64)
        });
        let n = DMatrix::from_fn(rows, dim, |_, _| StandardNormal.sample(&mut *rng));
        w * b + n * noise
    }

    fn seeded() -> (u64, rand::rngs::StdRng) {
        let seed = rand::random();
        (seed, rand::rngs::StdRng::seed_from_u64(seed))
    }

    #[test]
    fn finds_the_exact_subspace_across_a_clear_gap() {
        let (seed, mut rng) = seeded();
        let rank = 24;
        let k = strong_plus_noise(&mut rng, 1500, 160, rank, 1e-3);
        let mut h = Host::of_keys(&k);
        let (v, ritz) = randomised(&mut h, rank, POWER_ITERATIONS).unwrap();
        let (w, eig) = exact(&h.g, rank);
        assert!(orth_error(&v) < 1e-12, "seed {seed}: {}", orth_error(&v));
        assert!(sin_max(&v, &w) < 1e-9, "seed {seed}: {}", sin_max(&v, &w));
        for (a, b) in ritz.iter().zip(&eig) {
            assert!(
                (a - b).abs() <= 1e-10 * b,
                "seed {seed}: Ritz value {a}, eigenvalue {b}"
            );
        }
    }

    #[test]
    fn reconstruction_error_stays_within_a_percent_of_the_exact() {
        let (seed, mut rng) = seeded();
        for (rows, dim, rank, decay) in [(3000, 256, 64, 1.5), (3000, 256, 96, 1.0), (500, 200, 160, 1.5)] {
            let k = power_law_keys(&mut rng, rows, dim, decay);
            let mut h = Host::of_keys(&k);
            let (v, _) = randomised(&mut h, rank, POWER_ITERATIONS).unwrap();
            let (w, _) = exact(&h.g, rank);
            let (e, e_exact) = (rec_error(&k, &v), rec_error(&k, &w));
            let top = rank / 4;
            let angle = sin_max(&v.columns(0, top).into(), &w.columns(0, top).into());
            let case = format!("seed {seed}, {rows}×{dim} rank {rank} decay {decay}");
            assert!(orth_error(&v) < 1e-12, "{case}: {}", orth_error(&v));
            eprintln!(
                "{case}: error/exact − 1 = {:.2e}, top {top} sin θ_max {angle:.2e}",
                e / e_exact - 1.0
            );
            assert!(e <= 1.01 * e_exact, "{case}: error {e:e} against {e_exact:e}");
            assert!(angle < 1e-4, "{case}: top {top} directions {angle:e} apart");
            // More iterations never hurt.
            let (v0, _) = randomised(&mut h, rank, 0).unwrap();
            assert!(rec_error(&k, &v0) >= e, "{case}");
        }
    }

    #[test]
    fn keys_of_low_rank_give_an_orthonormal_basis_that_holds_them() {
        let (seed, mut rng) = seeded();
        // 20 rows: G has rank 20 < rank 40 < l = 56.
        let k = DMatrix::from_fn(20, 64, |_, _| rng.random_range(-1.0..1.0));
        let (v, _) = randomised(&mut Host::of_keys(&k), 40, POWER_ITERATIONS).unwrap();
        assert!(orth_error(&v) < 1e-12, "seed {seed}: {}", orth_error(&v));
        assert!(rec_error(&k, &v) < 1e-10, "seed {seed}: {}", rec_error(&k, &v));
        // All-zero keys: any orthonormal basis.
        let (v, _) = randomised(&mut Host::of_keys(&DMatrix::zeros(8, 64)), 40, POWER_ITERATIONS).unwrap();
        assert!(orth_error(&v) < 1e-12, "{}", orth_error(&v));
    }

    #[test]
    fn bad_input_is_an_error_that_says_what() {
        let mut k = DMatrix::from_fn(50, 32, |i, j| (i * j) as f64);
        k[(3, 4)] = f64::NAN;
        let e = randomised(&mut Host::of_keys(&k), 8, 1).unwrap_err().to_string();
        assert!(e.contains("not finite"), "{e}");
        for rank in [0, 33] {
            let e = SubspacePlan::new(32, rank).unwrap_err().to_string();
            assert!(e.contains(&format!("rank {rank}")), "{e}");
        }
        let p = SubspacePlan::new(32, 20).unwrap();
        assert_eq!((p.width, p.iterations), (32, POWER_ITERATIONS));
    }

    /// How the reconstruction error and the subspace approach the exact ones with the
    /// power iterations, on synthetic spectra (the numbers behind [`POWER_ITERATIONS`]):
    /// `cargo test --lib iteration_count -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement: prints the error per iteration count"]
    fn iteration_count_measurement() {
        let (seed, mut rng) = seeded();
        eprintln!("seed {seed}");
        let cases = [
            ("power law 1.5", power_law_keys(&mut rng, 8192, 1024, 1.5)),
            ("power law 1.0", power_law_keys(&mut rng, 8192, 1024, 1.0)),
            ("24 strong + noise", strong_plus_noise(&mut rng, 8192, 1024, 24, 0.1)),
        ];
        for (name, k) in cases {
            let mut h = Host::of_keys(&k);
            for rank in [96, 160] {
                let (w, eig) = exact(&h.g, rank + OVERSAMPLING + 1);
                let e_exact = rec_error(&k, &w.columns(0, rank).into());
                eprintln!(
                    "{name}, 8192×1024, rank {rank}: exact error {e_exact:.3e}, λ_(l+1)/λ_r {:.3}",
                    eig[rank + OVERSAMPLING] / eig[rank - 1]
                );
                let top = rank / 2;
                for q in 0..=6 {
                    let (v, _) = randomised(&mut h, rank, q).unwrap();
                    eprintln!(
                        "  q = {q}: error / exact − 1 = {:.2e}, sin θ_max of the top {top}: {:.2e}",
                        rec_error(&k, &v) / e_exact - 1.0,
                        sin_max(&v.columns(0, top).into(), &w.columns(0, top).into())
                    );
                }
            }
        }
    }
}
