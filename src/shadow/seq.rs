//! One sequence's ShadowKV state across all layers, built from its prefill, and the
//! decode step: select → reuse diff → fetch values / rebuild keys → attend.

use super::factor::LowRank;
use super::landmarks::{landmarks, outlier_chunks, Marks8};
use super::params::ShadowParams;
use super::reuse::{ReusePlan, SlotTable};
use super::select::{chunk_scores, top_k, HeadMarks};
use crate::cpu::kv_cache::{CompressedSeq, SeqKvCache};
use crate::cpu::ops::{softmax, Rope};
use crate::model::config::ModelConfig;
use crate::pool::{PoolLease, ValueFormat, ValuePool};
use anyhow::{bail, Result};
use std::any::Any;

/// Counters of the reuse cache and the value traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShadowStats {
    /// Selected chunks found resident (summed over layers, heads and steps).
    pub hits: u64,
    /// Selected chunks fetched and rebuilt.
    pub misses: u64,
    /// Bytes of values copied out of the pool.
    pub value_bytes_fetched: u64,
}

impl ShadowStats {
    /// Fraction of selected chunks that were already resident; none while no chunk has
    /// been selected (a context shorter than the local window, or no decode step yet).
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }

    /// Adds another sequence's counters.
    pub fn add(&mut self, o: &ShadowStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.value_bytes_fetched += o.value_bytes_fetched;
    }
}

/// The on-device buffers of one KV head: exact outlier chunks and the selected-chunk
/// slots, each `[chunks·chunk_size, d]` for keys (post-RoPE) and values.
struct HeadState {
    outlier: Vec<bool>,
    outlier_k: Vec<f32>,
    outlier_v: Vec<f32>,
    table: SlotTable,
    slot_k: Vec<f32>,
    slot_v: Vec<f32>,
}

/// One layer: the sparse region (chunks `0..chunks`) and the exact recent window.
struct LayerState {
    factor: LowRank,
    marks: Marks8,
    chunks: usize,
    heads: Vec<HeadState>,
    recent_k: Vec<f32>,
    recent_kpre: Vec<f32>,
    recent_v: Vec<f32>,
}

/// A sequence decoding with ShadowKV.
pub struct ShadowSeq {
    params: ShadowParams,
    kv_heads: usize,
    head_dim: usize,
    group: usize,
    layers: Vec<LayerState>,
    lease: PoolLease,
    stats: ShadowStats,
    len: usize,
}

/// Gathers rows `first..first+n` of head `h` from `[rows, kvd]` into `[n, d]`.
fn head_rows(src: &[f32], kvd: usize, h: usize, d: usize, first: usize, n: usize) -> Vec<f32> {
    (first..first + n)
        .flat_map(|r| src[r * kvd + h * d..r * kvd + (h + 1) * d].iter().copied())
        .collect()
}

impl ShadowSeq {
    /// Compresses a finished prefill (a dense cache that kept pre-RoPE keys) into
    /// ShadowKV state, writing the values of the sparse chunks to a pool lease.
    pub fn from_prefill(cfg: &ModelConfig, p: ShadowParams, dense: &SeqKvCache, pool: &ValuePool) -> Result<Self> {
        p.validate(cfg)?;
        let (kvh, d) = (cfg.num_kv_heads, cfg.head_dim);
        let kvd = kvh * d;
        let c = p.chunk_size;
        let total = dense.len();
        let chunks = (total / c).saturating_sub(p.local_chunks);
        let sparse = chunks * c;
        let mut lease = pool.lease()?;
        if chunks > pool.shape().chunks {
            bail!(
                "{total} tokens need {chunks} chunks, the value pool holds {}",
                pool.shape().chunks
            );
        }
        // A budget beyond the context selects every chunk: no more slots than chunks.
        let selected = p.selected_chunks().min(pool.shape().chunks);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        // U in 8 bits over a pool of 8-bit values (exact over exact values: the checks' mode).
        let rounded = pool.shape().format == ValueFormat::Int8;
        for (l, kv) in dense.layers.iter().enumerate() {
            if kv.k_pre.len() != total * kvd {
                bail!("layer {l}: the prefill cache kept no pre-RoPE keys");
            }
            // The basis comes from every prompt key; U covers the sparse chunks only.
            let mut factor = LowRank::factorize(&kv.k_pre, total, kvd, p.rank, rounded)?;
            factor.u.truncate(sparse * p.rank);
            let marks = landmarks(&kv.k, chunks, c, kvd);
            let outliers = outlier_chunks(&kv.k[..sparse * kvd], &marks, c, kvh, d, p.outlier_chunks.min(chunks));
            let marks = Marks8::quantize(&marks, d);
            let mut heads = Vec::with_capacity(kvh);
            for (h, out_ids) in outliers.iter().enumerate() {
                for ch in 0..chunks {
                    lease.write(l, h, ch, &head_rows(&kv.v, kvd, h, d, ch * c, c));
                }
                let mut outlier = vec![false; chunks];
                let (mut ok, mut ov) = (Vec::new(), Vec::new());
                for &o in out_ids {
                    outlier[o as usize] = true;
                    ok.extend(head_rows(&kv.k, kvd, h, d, o as usize * c, c));
                    ov.extend(head_rows(&kv.v, kvd, h, d, o as usize * c, c));
                }
                heads.push(HeadState {
                    outlier,
                    outlier_k: ok,
                    outlier_v: ov,
                    table: SlotTable::new(selected),
                    slot_k: vec![0.0; selected * c * d],
                    slot_v: vec![0.0; selected * c * d],
                });
            }
            layers.push(LayerState {
                factor,
                marks,
                chunks,
                heads,
                recent_k: kv.k[sparse * kvd..].to_vec(),
                recent_kpre: kv.k_pre[sparse * kvd..].to_vec(),
                recent_v: kv.v[sparse * kvd..].to_vec(),
            });
        }
        Ok(ShadowSeq {
            params: p,
            kv_heads: kvh,
            head_dim: d,
            group: cfg.num_heads / kvh,
            layers,
            lease,
            stats: ShadowStats::default(),
            len: total,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> ShadowStats {
        self.stats
    }

    /// Moves the oldest recent chunk into the sparse region once the recent window holds
    /// two chunks beyond the local window: its values go to the pool, its landmark joins
    /// the others and its pre-RoPE keys are projected onto the layer's basis.
    fn fold(&mut self, l: usize) -> Result<()> {
        let (d, kvh) = (self.head_dim, self.kv_heads);
        let kvd = kvh * d;
        let c = self.params.chunk_size;
        let layer = &mut self.layers[l];
        if layer.recent_k.len() / kvd < (self.params.local_chunks + 2) * c {
            return Ok(());
        }
        let ch = layer.chunks;
        if ch >= self.lease.chunks() {
            bail!("the sequence outgrew its value pool ({} chunks)", self.lease.chunks());
        }
        layer.factor.append(&layer.recent_kpre[..c * kvd], c);
        layer
            .marks
            .append(Marks8::quantize(&landmarks(&layer.recent_k[..c * kvd], 1, c, kvd), d));
        for h in 0..kvh {
            self.lease.write(l, h, ch, &head_rows(&layer.recent_v, kvd, h, d, 0, c));
            layer.heads[h].outlier.push(false);
        }
        layer.chunks += 1;
        layer.recent_k.drain(..c * kvd);
        layer.recent_kpre.drain(..c * kvd);
        layer.recent_v.drain(..c * kvd);
        Ok(())
    }

    /// Tokens held exactly in the recent window of layer 0.
    pub fn recent_tokens(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.recent_k.len() / (self.kv_heads * self.head_dim))
            .unwrap_or(0)
    }

    /// Chunks in the sparse region of layer 0.
    pub fn sparse_chunks(&self) -> usize {
        self.layers.first().map(|l| l.chunks).unwrap_or(0)
    }
}

/// The CPU model's view of a ShadowKV sequence: it hands over each layer's new rows and
/// takes back their attention ([`crate::cpu::kv_cache::SeqCache::Compressed`]).
impl CompressedSeq for ShadowSeq {
    /// Tokens in the sequence.
    fn len(&self) -> usize {
        self.len
    }

    /// Records that a forward pass appended `n` tokens to every layer.
    fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Bytes of the on-device state (factors, landmarks, exact chunks, slots, window).
    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let heads: usize = l
                    .heads
                    .iter()
                    .map(|h| h.outlier_k.len() + h.outlier_v.len() + h.slot_k.len() + h.slot_v.len())
                    .sum();
                4 * (l.factor.u.len() + l.factor.sv.len() + heads + l.recent_k.len() * 2 + l.recent_v.len())
                    + l.marks.bytes()
            })
            .sum()
    }

    /// Decodes `n` new tokens of layer `l`: appends their keys and values to the recent
    /// window, then for each token and KV head selects chunks, fetches and rebuilds the
    /// misses, and attends. `q` is `[n, heads·d]`, `k`/`k_pre`/`v` are `[n, kvd]`, and
    /// `out` receives `[n, heads·d]`.
    fn attend_layer(
        &mut self,
        l: usize,
        q: &[f32],
        k: &[f32],
        k_pre: &[f32],
        v: &[f32],
        rope: &Rope,
        out: &mut [f32],
    ) -> Result<()> {
        let (d, kvh, g) = (self.head_dim, self.kv_heads, self.group);
        let (kvd, qd) = (kvh * d, kvh * g * d);
        let n = k.len() / kvd;
        for i in 0..n {
            let layer = &mut self.layers[l];
            layer.recent_k.extend_from_slice(&k[i * kvd..(i + 1) * kvd]);
            layer.recent_kpre.extend_from_slice(&k_pre[i * kvd..(i + 1) * kvd]);
            layer.recent_v.extend_from_slice(&v[i * kvd..(i + 1) * kvd]);
            for h in 0..kvh {
                let qg = &q[i * qd + h * g * d..i * qd + (h + 1) * g * d];
                let selected = select_stage(layer, h, qg, d, kvd, self.params.selected_chunks());
                let plan = layer.heads[h].table.plan(&selected);
                fetch_values_stage(
                    &self.lease,
                    l,
                    h,
                    &plan,
                    &mut layer.heads[h],
                    self.params.chunk_size * d,
                );
                rebuild_keys_stage(layer, h, &plan, self.params.chunk_size, d, rope);
                self.stats.hits += plan.hits as u64;
                self.stats.misses += plan.misses.len() as u64;
                self.stats.value_bytes_fetched += (plan.misses.len() * self.lease.shape().chunk_bytes()) as u64;
                let o = &mut out[i * qd + h * g * d..i * qd + (h + 1) * g * d];
                attend_stage(layer, h, qg, d, kvd, self.params.chunk_size, o);
            }
            self.fold(l)?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Stage 1: the chunks head `h` attends this step.
fn select_stage(layer: &LayerState, h: usize, qg: &[f32], d: usize, kvd: usize, k: usize) -> Vec<u32> {
    let marks = HeadMarks {
        codes: &layer.marks.codes,
        scales: &layer.marks.scales,
        kv_heads: kvd / d,
        head: h,
        head_dim: d,
    };
    let excluded = &layer.heads[h].outlier;
    top_k(&chunk_scores(qg, marks, excluded), excluded, k)
}

/// Stage 2: copies the values of the missed chunks from the pool into their slots.
fn fetch_values_stage(lease: &PoolLease, l: usize, h: usize, plan: &ReusePlan, head: &mut HeadState, elems: usize) {
    for &(slot, chunk) in &plan.misses {
        lease.read(l, h, chunk as usize, &mut head.slot_v[slot * elems..(slot + 1) * elems]);
    }
}

/// Stage 3: rebuilds the keys of the missed chunks (U rows × SV, then RoPE at the
/// tokens' original positions) into their slots.
fn rebuild_keys_stage(layer: &mut LayerState, h: usize, plan: &ReusePlan, c: usize, d: usize, rope: &Rope) {
    for &(slot, chunk) in &plan.misses {
        let first = chunk as usize * c;
        let dst = &mut layer.heads[h].slot_k[slot * c * d..(slot + 1) * c * d];
        layer.factor.rebuild(first, c, h * d..(h + 1) * d, dst);
        let positions: Vec<usize> = (first..first + c).collect();
        let (cos, sin) = rope.tables(&positions);
        rope.apply(dst, 1, &cos, &sin);
    }
}

/// Stage 4: attention of the group's query heads over [recent | outliers | slots].
fn attend_stage(layer: &LayerState, h: usize, qg: &[f32], d: usize, kvd: usize, c: usize, out: &mut [f32]) {
    let head = &layer.heads[h];
    let scale = 1.0 / (d as f32).sqrt();
    let recent = layer.recent_k.len() / kvd;
    let occupied: Vec<usize> = head
        .table
        .slots()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_some())
        .map(|(i, _)| i)
        .collect();
    let n_out = head.outlier_k.len() / d;
    let keys = |j: usize| -> (&[f32], &[f32]) {
        if j < recent {
            let r = j * kvd + h * d..j * kvd + (h + 1) * d;
            (&layer.recent_k[r.clone()], &layer.recent_v[r])
        } else if j < recent + n_out {
            let r = (j - recent) * d..(j - recent + 1) * d;
            (&head.outlier_k[r.clone()], &head.outlier_v[r])
        } else {
            let t = j - recent - n_out;
            let (slot, within) = (occupied[t / c], t % c);
            let r = (slot * c + within) * d..(slot * c + within + 1) * d;
            (&head.slot_k[r.clone()], &head.slot_v[r])
        }
    };
    let total = recent + n_out + occupied.len() * c;
    let mut scores = vec![0.0f32; total];
    for (qh, o) in qg.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        for (j, s) in scores.iter_mut().enumerate() {
            *s = qh.iter().zip(keys(j).0).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
        softmax(&mut scores);
        o.fill(0.0);
        for (j, &w) in scores.iter().enumerate() {
            o.iter_mut().zip(keys(j).1).for_each(|(a, b)| *a += w * b);
        }
    }
}
