//! Helpers of the GPU tests: seeded random inputs and the error checks every kernel
//! comparison uses (no NaN, not all zero, element bounds, RESULT lines).

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generator seeded from `SHADOWKV_TEST_SEED`, else at random; the seed is printed.
pub fn seeded(test: &str) -> StdRng {
    let seed = std::env::var("SHADOWKV_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (SHADOWKV_TEST_SEED={seed} repeats it)");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale), as bf16 and as the f32 of that bf16.
pub fn rand_bf16(rng: &mut StdRng, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-scale..scale)))
        .collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

/// The f32 values of bf16 values.
pub fn f32s(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// How far a kernel's output is from the reference.
#[derive(Default, Clone, Copy)]
pub struct Errors {
    /// Largest |out − ref| / |ref| over elements with |ref| ≥ 1 % of max|ref|.
    pub max_rel: f64,
    /// Largest |out − ref| over max|ref|.
    pub max_abs_rel: f64,
    /// ‖out − ref‖ / ‖ref‖.
    pub norm_rel: f64,
}

impl Errors {
    /// The larger of each measure.
    pub fn worst(self, o: Errors) -> Errors {
        Errors {
            max_rel: self.max_rel.max(o.max_rel),
            max_abs_rel: self.max_abs_rel.max(o.max_abs_rel),
            norm_rel: self.norm_rel.max(o.norm_rel),
        }
    }

    /// Prints `RESULT <kernel> <case> max_rel=... max_err/max_ref=... norm_rel=...`.
    pub fn report(&self, kernel: &str, case: &str) {
        eprintln!(
            "RESULT {kernel} {case} max_rel={:.3e} max_err/max_ref={:.3e} norm_rel={:.3e}",
            self.max_rel, self.max_abs_rel, self.norm_rel
        );
    }
}

/// Compares, asserting no NaN, not all zero, and |got − want| ≤ rtol·|want| + atol.
pub fn check(kernel: &str, case: &str, got: &[f32], want: &[f32], rtol: f64, atol: f64) -> Errors {
    let e = errors(kernel, case, got, want, |_, w| rtol * w.abs() + atol);
    e.report(kernel, case);
    e
}

/// Compares, asserting no NaN, not all zero, and |got[i] − want[i]| ≤ bound(i, want[i]).
pub fn errors(kernel: &str, case: &str, got: &[f32], want: &[f32], bound: impl Fn(usize, f64) -> f64) -> Errors {
    assert_eq!(got.len(), want.len(), "{kernel} {case}: lengths");
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert_eq!(nan, 0, "{kernel} {case}: {nan} NaN outputs (unwritten or invalid)");
    assert!(got.iter().any(|&v| v != 0.0), "{kernel} {case}: output all zero");
    let max_ref = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let (mut num, mut den, mut max_rel) = (0f64, 0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let e = (g - w).abs();
        let b = bound(i, w);
        assert!(
            e <= b,
            "{kernel} {case}: element {i}: got {g}, want {w} (|diff| {e:.3e} > {b:.3e})"
        );
        num += e * e;
        den += w * w;
        if w.abs() >= 0.01 * max_ref {
            max_rel = max_rel.max(e / w.abs());
        }
    }
    let norm_rel = if den > 0.0 { (num / den).sqrt() } else { 0.0 };
    let max_err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    Errors {
        max_rel,
        max_abs_rel: if max_ref > 0.0 { max_err / max_ref } else { 0.0 },
        norm_rel,
    }
}

/// Largest |v|.
pub fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()))
}

/// Root mean square.
pub fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}
