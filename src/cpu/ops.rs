//! Element-wise and row-wise operations of the Llama forward pass.

use crate::model::config::ModelConfig;

/// `out[r] = x[r] / rms(x[r]) · w` for each row of width `w.len()`.
pub fn rms_norm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let h = w.len();
    for (o, row) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv = 1.0 / ((ss / h as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// `out[i] = silu(gate[i]) · up[i]`, reading `[gate | up]` rows of width `2·inter`.
pub fn silu_mul(out: &mut [f32], gate_up: &[f32], inter: usize) {
    for (o, gu) in out.chunks_exact_mut(inter).zip(gate_up.chunks_exact(2 * inter)) {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// In-place softmax of one row.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Rotary position embedding, in the Hugging Face "rotate half" layout: dimension `i`
/// pairs with `i + d/2`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies of `cfg`, llama3 scaling included.
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        if let Some(s) = cfg.rope_scaling {
            let old = s.original_max_position_embeddings as f32;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        Rope { inv_freq }
    }

    /// The inverse frequencies, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)` tables `[positions.len(), d/2]`.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// Rotates every head of every row of `x` (`[rows, heads·d]`) at the row's position,
    /// using tables from [`Rope::tables`].
    pub fn apply(&self, x: &mut [f32], heads: usize, cos: &[f32], sin: &[f32]) {
        let half = self.inv_freq.len();
        let d = 2 * half;
        for ((row, c), s) in x
            .chunks_exact_mut(heads * d)
            .zip(cos.chunks_exact(half))
            .zip(sin.chunks_exact(half))
        {
            for head in row.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * c[i] - x1 * s[i];
                    b[i] = x1 * c[i] + x0 * s[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_handles_masked_rows() {
        let mut r = vec![1.0, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(r[3], 0.0);
        assert!(r[2] > r[1] && r[1] > r[0]);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = vec![3.0f32, -4.0, 0.0, 5.0];
        let mut o = vec![0.0; 4];
        rms_norm(&mut o, &x, &[1.0; 4], 0.0);
        let rms = (o.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }
}
