//! Teacher-forced fidelity: over a long text, how often a method's next-token argmax
//! agrees with full attention's, and the mean KL divergence between their distributions.

use crate::cpu::{CpuModel, LogitsWanted, SeqCache, SeqInput, SeqKvCache};
use crate::engine::sampling::argmax;
use crate::pool::ValuePool;
use crate::shadow::{shadow_stats, ShadowParams, ShadowSeq};
use anyhow::{bail, Result};
use serde::Serialize;

/// Agreement of one method with full attention.
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// Positions compared.
    pub positions: usize,
    /// Share of positions whose argmax tokens agree.
    pub top1_agreement: f64,
    /// Mean KL(full ‖ method) in nats.
    pub mean_kl: f64,
    /// Largest KL at any position.
    pub max_kl: f64,
    /// ShadowKV reuse hit rate (none where no chunk was selected).
    pub reuse_hit_rate: Option<f64>,
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - z).collect()
}

/// Prefills `ids[..prefix]`, then feeds the remaining tokens one at a time to a
/// full-attention and a ShadowKV fork, comparing their next-token distributions.
pub fn fidelity(model: &CpuModel, ids: &[u32], prefix: usize, p: ShadowParams) -> Result<Fidelity> {
    let cfg = model.config();
    if prefix == 0 || prefix >= ids.len() {
        bail!(
            "the prefix ({prefix} tokens) must leave tokens to compare in a text of {}",
            ids.len()
        );
    }
    let mut dense = SeqCache::Dense(SeqKvCache::with_pre_rope(cfg));
    let logits = model.prefill(&mut dense, &ids[..prefix], 512, |_| {})?;
    let SeqCache::Dense(pre) = dense else {
        unreachable!("built dense")
    };
    let pool = ValuePool::anonymous(p.pool_shape(cfg, 1, ids.len()))?;
    let mut shadow: SeqCache = ShadowSeq::from_prefill(cfg, p, &pre, &pool)?.into();
    let mut full = SeqCache::Dense(pre);
    let (mut agree, mut kl_sum, mut kl_max) = (0usize, 0.0f64, 0.0f64);
    let mut lf = logits.clone();
    let mut ls = logits;
    let n = ids.len() - prefix;
    for (i, &t) in ids[prefix..].iter().enumerate() {
        if i > 0 {
            let mut inputs = [
                SeqInput {
                    tokens: &ids[prefix + i - 1..prefix + i],
                    cache: &mut full,
                    logits: LogitsWanted::Last,
                },
                SeqInput {
                    tokens: &ids[prefix + i - 1..prefix + i],
                    cache: &mut shadow,
                    logits: LogitsWanted::Last,
                },
            ];
            let mut out = model.forward(&mut inputs)?;
            ls = out.pop().expect("two rows");
            lf = out.pop().expect("two rows");
        }
        let _ = t;
        agree += usize::from(argmax(&lf) == argmax(&ls));
        let (a, b) = (log_softmax(&lf), log_softmax(&ls));
        let kl: f64 = a.iter().zip(&b).map(|(x, y)| x.exp() * (x - y)).sum();
        kl_sum += kl;
        kl_max = kl_max.max(kl);
    }
    Ok(Fidelity {
        positions: n,
        top1_agreement: agree as f64 / n as f64,
        mean_kl: kl_sum / n as f64,
        max_kl: kl_max,
        reuse_hit_rate: shadow_stats(&shadow).and_then(|s| s.hit_rate()),
    })
}
