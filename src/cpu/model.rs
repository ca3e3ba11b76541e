//! The Llama-family forward pass on the CPU, for batches of sequences of any lengths.

use super::attention::{causal_attention, AttnJob, AttnShape};
use super::kv_cache::{SeqCache, SeqKvCache};
use super::matmul::linear;
use super::ops::{rms_norm, silu_mul, Rope};
use crate::model::config::ModelConfig;
use crate::model::weights::{LayerWeights, ModelWeights};
use anyhow::{bail, Result};

/// One block's weights, with q/k/v and gate/up fused into single matrices.
struct CpuLayer {
    input_norm: Vec<f32>,
    /// `[(heads + 2·kv_heads)·d, hidden]`.
    wqkv: Vec<f32>,
    bqkv: Option<Vec<f32>>,
    wo: Vec<f32>,
    post_norm: Vec<f32>,
    /// `[2·inter, hidden]`: gate rows, then up rows.
    w_gate_up: Vec<f32>,
    w_down: Vec<f32>,
}

impl CpuLayer {
    fn new(w: LayerWeights) -> Self {
        let wqkv = [w.q_proj.data, w.k_proj.data, w.v_proj.data].concat();
        let bqkv = w.qkv_bias.map(|[q, k, v]| [q.data, k.data, v.data].concat());
        CpuLayer {
            input_norm: w.input_norm.data,
            wqkv,
            bqkv,
            wo: w.o_proj.data,
            post_norm: w.post_norm.data,
            w_gate_up: [w.gate_proj.data, w.up_proj.data].concat(),
            w_down: w.down_proj.data,
        }
    }
}

/// Which logits a sequence wants back from a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last new position only.
    Last,
    /// Every new position (teacher-forced evaluation).
    All,
}

impl LogitsWanted {
    /// Which of the batch rows `r0..r0 + n` (a sequence's `n` new tokens) want logits.
    pub fn rows(self, r0: usize, n: usize) -> std::ops::Range<usize> {
        match self {
            LogitsWanted::None => r0..r0,
            LogitsWanted::Last => (r0 + n).saturating_sub(1).max(r0)..r0 + n,
            LogitsWanted::All => r0..r0 + n,
        }
    }
}

/// Runs `ids` through `forward` in chunks of `chunk` tokens (the last chunk asking for
/// its last token's logits, the others for none), reporting each chunk's length to
/// `progress`; returns what the last chunk's pass returned (its logits, or the token
/// sampled from them). Every backend's prefill.
pub fn chunked_prefill<T: Default>(
    ids: &[u32],
    chunk: usize,
    mut progress: impl FnMut(usize),
    mut forward: impl FnMut(&[u32], LogitsWanted) -> Result<T>,
) -> Result<T> {
    let chunk = chunk.max(1);
    let mut logits = T::default();
    for (ci, part) in ids.chunks(chunk).enumerate() {
        let want = if (ci + 1) * chunk >= ids.len() {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        logits = forward(part, want)?;
        progress(part.len());
    }
    Ok(logits)
}

/// One sequence's part of a batched forward pass.
pub struct SeqInput<'a> {
    /// New tokens, appended after what `cache` holds.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by `tokens`.
    pub cache: &'a mut SeqCache,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// A model ready to run on the CPU.
pub struct CpuModel {
    config: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<CpuLayer>,
    norm: Vec<f32>,
    lm_head: Option<Vec<f32>>,
    rope: Rope,
}

impl CpuModel {
    /// Takes ownership of loaded weights.
    pub fn new(config: ModelConfig, w: ModelWeights) -> Self {
        let rope = Rope::new(&config);
        CpuModel {
            embed: w.embed.data,
            layers: w.layers.into_iter().map(CpuLayer::new).collect(),
            norm: w.norm.data,
            lm_head: w.lm_head.map(|t| t.data),
            rope,
            config,
        }
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A fresh full-attention cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::Dense(SeqKvCache::new(&self.config))
    }

    /// Ends a sequence's prefill: compresses a [`SeqCache::Prefill`] cache (no-op for
    /// full attention).
    pub fn finish_prefill(&self, cache: &mut SeqCache) -> Result<()> {
        cache.finish_prefill(&self.config)
    }

    /// Feeds `ids` after what `cache` holds, `chunk` tokens per forward pass, reporting
    /// each chunk's length to `progress`; returns the logits of the last token.
    pub fn prefill(
        &self,
        cache: &mut SeqCache,
        ids: &[u32],
        chunk: usize,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        chunked_prefill(ids, chunk, progress, |part, logits| {
            Ok(self
                .forward(&mut [SeqInput {
                    tokens: part,
                    cache: &mut *cache,
                    logits,
                }])?
                .remove(0))
        })
    }

    /// Runs the new tokens of every sequence through the model, extending their caches.
    /// Returns, per sequence, the wanted logits as rows of `vocab_size` values.
    pub fn forward(&self, seqs: &mut [SeqInput]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let qkv_w = qd + 2 * kvd;
        let inter = c.intermediate_size;
        let mut positions = Vec::new();
        for s in seqs.iter() {
            let end = s.cache.len() + s.tokens.len();
            if end > c.max_position_embeddings {
                bail!(
                    "sequence of {end} tokens exceeds the model's context of {} tokens",
                    c.max_position_embeddings
                );
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                bail!("token id {t} is outside the vocabulary ({} ids)", c.vocab_size);
            }
            positions.extend(s.cache.len()..end);
        }
        let n = positions.len();
        if n == 0 {
            return Ok(seqs.iter().map(|_| Vec::new()).collect());
        }
        let mut x = Vec::with_capacity(n * h);
        for s in seqs.iter() {
            for &t in s.tokens {
                x.extend_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
            }
        }
        let (cos, sin) = self.rope.tables(&positions);
        let mut xn = vec![0.0f32; n * h];
        let mut qkv = vec![0.0f32; n * qkv_w];
        let mut q = vec![0.0f32; n * qd];
        let mut attn = vec![0.0f32; n * qd];
        let mut gate_up = vec![0.0f32; n * 2 * inter];
        let mut act = vec![0.0f32; n * inter];
        let shape = AttnShape {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: d,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&mut xn, &x, &layer.input_norm, c.rms_norm_eps);
            linear(&mut qkv, &xn, &layer.wqkv, n, h, qkv_w, false);
            if let Some(b) = &layer.bqkv {
                for row in qkv.chunks_exact_mut(qkv_w) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            }
            // Split q | k | v, rotate q and k.
            let mut k_new = vec![0.0f32; n * kvd];
            let mut v_new = vec![0.0f32; n * kvd];
            for (r, row) in qkv.chunks_exact(qkv_w).enumerate() {
                q[r * qd..(r + 1) * qd].copy_from_slice(&row[..qd]);
                k_new[r * kvd..(r + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                v_new[r * kvd..(r + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
            }
            let k_pre = k_new.clone();
            self.rope.apply(&mut q, c.num_heads, &cos, &sin);
            self.rope.apply(&mut k_new, c.num_kv_heads, &cos, &sin);
            // Dense caches take the new keys and values and attend in one batched call;
            // compressed (ShadowKV) sequences run their own decode stages.
            let mut r0 = 0;
            for s in seqs.iter_mut() {
                let rows = r0 * kvd..(r0 + s.tokens.len()) * kvd;
                let qrows = r0 * qd..(r0 + s.tokens.len()) * qd;
                match &mut *s.cache {
                    SeqCache::Dense(d) | SeqCache::Prefill { dense: d, .. } => {
                        let keep = d.keeps_pre_rope();
                        let kv = &mut d.layers[l];
                        kv.k.extend_from_slice(&k_new[rows.clone()]);
                        kv.v.extend_from_slice(&v_new[rows.clone()]);
                        if keep {
                            kv.k_pre.extend_from_slice(&k_pre[rows]);
                        }
                    }
                    SeqCache::Compressed(sh) => {
                        let (kn, kp, vn) = (&k_new[rows.clone()], &k_pre[rows.clone()], &v_new[rows]);
                        sh.attend_layer(l, &q[qrows.clone()], kn, kp, vn, &self.rope, &mut attn[qrows])?;
                    }
                }
                r0 += s.tokens.len();
            }
            let mut jobs = Vec::with_capacity(seqs.len());
            let mut r0 = 0;
            for s in seqs.iter() {
                let nt = s.tokens.len();
                if let SeqCache::Dense(d) | SeqCache::Prefill { dense: d, .. } = &*s.cache {
                    let kv = &d.layers[l];
                    let q = &q[r0 * qd..(r0 + nt) * qd];
                    jobs.push(AttnJob {
                        q,
                        start: d.len(),
                        k: &kv.k,
                        v: &kv.v,
                        out_row: r0,
                    });
                }
                r0 += nt;
            }
            causal_attention(&mut attn, &jobs, shape);
            linear(&mut x, &attn, &layer.wo, n, qd, h, true);
            rms_norm(&mut xn, &x, &layer.post_norm, c.rms_norm_eps);
            linear(&mut gate_up, &xn, &layer.w_gate_up, n, h, 2 * inter, false);
            silu_mul(&mut act, &gate_up, inter);
            linear(&mut x, &act, &layer.w_down, n, inter, h, true);
        }
        // Logits only for the rows that want them.
        let mut rows = Vec::new();
        let mut r0 = 0;
        for s in seqs.iter() {
            rows.extend(s.logits.rows(r0, s.tokens.len()));
            r0 += s.tokens.len();
        }
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * h..(r + 1) * h].iter().copied())
            .collect();
        let mut normed = vec![0.0f32; picked.len()];
        rms_norm(&mut normed, &picked, &self.norm, c.rms_norm_eps);
        let head = self.lm_head.as_deref().unwrap_or(&self.embed);
        let v = c.vocab_size;
        let mut logits = vec![0.0f32; rows.len() * v];
        linear(&mut logits, &normed, head, rows.len(), h, v, false);
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for s in seqs.iter_mut() {
            let k = s.logits.rows(0, s.tokens.len()).len();
            out.push(logits[at * v..(at + k) * v].to_vec());
            at += k;
            match &mut *s.cache {
                SeqCache::Dense(d) | SeqCache::Prefill { dense: d, .. } => d.advance(s.tokens.len()),
                SeqCache::Compressed(sh) => sh.advance(s.tokens.len()),
            }
        }
        Ok(out)
    }
}
