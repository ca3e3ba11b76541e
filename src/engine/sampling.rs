//! Next-token sampling: greedy, temperature, top-k, top-p, seeded.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Temperatures below this pick the most likely token, as 0 does: logits divided by
/// less would overflow f32, and long before that the softmax is one token's.
pub const GREEDY_BELOW: f32 = 1e-6;

/// How to pick the next token. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or anything below [`GREEDY_BELOW`]) picks the most
    /// likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Seed of the random generator (`None`: from the OS).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// The row a device sampler reads for one sequence (kernels/sample.cu): the bits
    /// of the f32 temperature, top-k (0: all), the bits of the f32 top-p, the seed and
    /// a counter (the step), so that a (seed, counter) pair always draws the same token.
    pub fn device_row(&self, seed: u64, counter: u64) -> [u64; 5] {
        let t = if self.temperature < GREEDY_BELOW {
            0.0
        } else {
            self.temperature
        };
        [
            t.to_bits() as u64,
            self.top_k as u64,
            self.top_p.to_bits() as u64,
            seed,
            counter,
        ]
    }

    /// Rejects values that have no meaning, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Samples tokens for one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler with its own random stream.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature < GREEDY_BELOW || p.top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut total = 0.0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 as f64 / total;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            total = cand.iter().map(|c| c.1 as f64).sum();
        }
        let mut r = self.rng.random::<f64>() * total;
        for c in &cand {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn a_temperature_too_small_to_divide_by_is_greedy() {
        // 1e-40 would make every logit infinite and the softmax NaN.
        let p = SamplingParams {
            temperature: 1e-40,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
        }
        assert_eq!(p.device_row(3, 0)[0], 0, "the device sampler is told 0");
        let warm = SamplingParams { temperature: 0.7, ..p };
        assert_eq!(warm.device_row(3, 0)[0], 0.7f32.to_bits() as u64);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 0.0, -1.0, 4.8];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: Some(7),
        });
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 0 | 1));
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.3,
            seed: Some(7),
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn seed_makes_sampling_repeatable() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 0,
            top_p: 0.95,
            seed: Some(42),
        };
        let (mut a, mut b) = (Sampler::new(p), Sampler::new(p));
        let xs: Vec<u32> = (0..64).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..64).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().any(|&x| x != xs[0]), "temperature sampling should vary");
    }

    #[test]
    fn bad_params_are_named() {
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("temperature"));
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"));
    }
}
