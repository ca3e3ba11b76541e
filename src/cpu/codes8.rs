//! Vectors in 8 bits, the format of ShadowKV's landmarks
//! ([`crate::shadow::landmarks::Marks8`]) and of the value pools ([`crate::pool`]): each vector as int8 codes `round(x / s)` (ties to
//! even, within ±127) and one fp32 scale `s = max|x| / 127` (a zero vector: scale 0,
//! codes 0), so that `x ≈ code · s`, within half a step `s / 2`. The kernels round the
//! same way (`code8_scale` and `code8_code` of kernels/shadow.cuh: IEEE divisions).

/// Adding and subtracting 2^23 + 2^22 rounds an f32 below 2^22 in magnitude to the
/// nearest integer, ties to even (the default rounding mode): `round_ties_even` without
/// a library call, so the loop below vectorises.
const ROUND: f32 = 12_582_912.0;

/// The codes of vector `v` into `codes` (as long), returning its scale.
pub fn quantize(v: &[f32], codes: &mut [i8]) -> f32 {
    let m = v.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    if m == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    let s = m / 127.0;
    for (q, &x) in codes.iter_mut().zip(v) {
        // |x / s| <= 127 (and a rounding): far below 2^22.
        *q = ((x / s + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
    }
    s
}

/// The vector `codes · scale` into `out` (as long).
pub fn dequantize(codes: &[i8], scale: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(codes) {
        *o = q as f32 * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_stays_within_half_a_step() {
        let v = [0.5f32, -1.0, 0.25, 0.0, 1e-3, -0.999];
        let mut q = [0i8; 6];
        let s = quantize(&v, &mut q);
        assert_eq!(s, 1.0 / 127.0);
        assert_eq!(q[1], -127);
        let mut back = [f32::NAN; 6];
        dequantize(&q, s, &mut back);
        for (x, y) in v.iter().zip(back) {
            assert!((x - y).abs() <= s / 2.0 + 1e-7, "{x} vs {y}");
        }
        // Ties go to even, as round_ties_even would.
        let ties = [0.5f32, 1.5, 2.5, -0.5, -1.5, -126.5, 126.5, 127.0];
        let mut q = [0i8; 8];
        assert_eq!(quantize(&ties, &mut q), 1.0);
        assert_eq!(q, [0, 2, 2, 0, -2, -126, 126, 127]);
        let mut z = [5i8; 3];
        assert_eq!(quantize(&[0.0; 3], &mut z), 0.0);
        assert_eq!(z, [0; 3]);
    }

    #[test]
    fn codes_equal_round_ties_even_on_random_vectors() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let mut q = [0i8; 64];
        for _ in 0..2000 {
            let mag = 10f32.powi(rng.random_range(-30..30));
            let v: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0f32..1.0) * mag).collect();
            let s = quantize(&v, &mut q);
            for (&x, &c) in v.iter().zip(&q) {
                assert_eq!(c, (x / s).round_ties_even().clamp(-127.0, 127.0) as i8, "{x} / {s}");
            }
        }
    }
}
