//! The whole Llama-family model on the GPU: bf16 weights, per-sequence KV caches and a
//! batched forward pass over sequences of different lengths, the same computation as
//! [`crate::cpu::CpuModel`] in bf16 storage with fp32 arithmetic.
//!
//! One forward pass runs, per layer: RMSNorm and the fused qkv projection (one GEMV
//! kernel for one or two rows, the norm kernel and cuBLAS otherwise; the norm's weight
//! is folded into the matrix), the qkv split that adds the bias, applies RoPE and
//! appends k and v to each sequence's cache, attention (flash-decoding when every
//! sequence brings one token, causal flash attention for prefill chunks otherwise), the
//! output projection adding into the residual stream, the second norm with the fused
//! gate/up projection, SwiGLU and the down projection adding into the residual stream.
//! The logits of the wanted rows come out in fp32.
//!
//! Everything a step needs from the host (token ids, positions, cache addresses,
//! lengths) goes to the device in a few copies at the start of the step, into buffers
//! that stay put, so that [`super::graph::StepGraphs`] can capture a decode step once
//! and replay it.

use super::attention::{partition_len, DecodeArgs, DecodeWorkspace, KvTable, PassArgs};
use super::ops::{rope_inv_freq, CudaOps};
use super::parallel::{vocab_concat, TpScratch, TpShard};
use super::prefill::PrefillTiles;
use super::shadow::{ShadowStep, StepScratch};
use super::step::{cache_offsets, RowTargets, StepLayout};
use crate::cpu::attention::AttnShape;
use crate::cpu::model::chunked_prefill;
use crate::cpu::LogitsWanted;
use crate::model::config::ModelConfig;
use crate::model::shard::ShardPlan;
use crate::model::weights::{
    load_embed, load_embed_shard, load_final_norm, load_layer, load_layer_shard, load_lm_head, load_lm_head_shard,
    loading_bar, LayerWeights, Tensor, TensorSource,
};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use half::bf16;
use std::ops::Range;
use std::sync::Mutex;

/// One block's weights on the device, q/k/v and gate/up fused, with the weights of the
/// RMSNorm before each folded into its columns (`W · diag(g)`), so that the norm itself
/// has unit weight and fuses into the decode GEMV.
struct GpuLayer {
    /// `[(heads + 2·kv_heads)·d, hidden]`, input norm folded in.
    wqkv: CudaSlice<bf16>,
    bqkv: Option<CudaSlice<bf16>>,
    wo: CudaSlice<bf16>,
    /// `[2·inter, hidden]`: gate rows, then up rows; post-attention norm folded in.
    w_gate_up: CudaSlice<bf16>,
    w_down: CudaSlice<bf16>,
}

/// One sequence's KV cache on the device: `[layer][k | v][cap][kv_heads·d]` bf16, keys
/// after RoPE; a cache made for ShadowKV also keeps the keys before RoPE,
/// `[layer][cap][kv_heads·d]`, which the compression factorises.
pub struct GpuCache {
    buf: CudaSlice<bf16>,
    pre_rope: Option<CudaSlice<bf16>>,
    cap: usize,
    len: usize,
}

impl GpuCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens it can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Device bytes it holds.
    pub fn bytes(&self) -> usize {
        (self.buf.len() + self.pre_rope.as_ref().map_or(0, |p| p.len())) * 2
    }

    /// Whether it keeps the keys before RoPE.
    pub fn keeps_pre_rope(&self) -> bool {
        self.pre_rope.is_some()
    }

    /// Layer `l`'s first `len()` keys (after RoPE), values and, when kept, keys before
    /// RoPE, each `[len, kv_heads·d]`.
    pub fn layer(
        &self,
        model: &CudaModel,
        l: usize,
    ) -> (CudaView<'_, bf16>, CudaView<'_, bf16>, Option<CudaView<'_, bf16>>) {
        self.layer_of_width(model.kv_width(), l)
    }

    /// [`GpuCache::layer`] for a model whose `kv_heads·d` is `kvw` (for a caller that does
    /// not hold the model).
    pub fn layer_of_width(
        &self,
        kvw: usize,
        l: usize,
    ) -> (CudaView<'_, bf16>, CudaView<'_, bf16>, Option<CudaView<'_, bf16>>) {
        let (ko, vo) = cache_offsets(l, self.cap, kvw);
        let n = self.len * kvw;
        let pre = self
            .pre_rope
            .as_ref()
            .map(|p| p.slice(l * self.cap * kvw..l * self.cap * kvw + n));
        (self.buf.slice(ko..ko + n), self.buf.slice(vo..vo + n), pre)
    }

    /// Makes this cache a copy of `other`'s first `other.len()` tokens (benchmarks fill a
    /// batch from one prefill this way).
    pub fn copy_from(&mut self, model: &CudaModel, other: &GpuCache) -> Result<()> {
        ensure!(
            other.len <= self.cap,
            "cache of {} tokens cannot take {} tokens",
            self.cap,
            other.len
        );
        let kvw = model.kv_width();
        let s = model.ops.device().stream();
        for l in 0..model.config.num_layers {
            let (sk, sv) = cache_offsets(l, other.cap, kvw);
            let (dk, dv) = cache_offsets(l, self.cap, kvw);
            let n = other.len * kvw;
            s.memcpy_dtod(&other.buf.slice(sk..sk + n), &mut self.buf.slice_mut(dk..dk + n))?;
            s.memcpy_dtod(&other.buf.slice(sv..sv + n), &mut self.buf.slice_mut(dv..dv + n))?;
            if let (Some(src), Some(dst)) = (&other.pre_rope, &mut self.pre_rope) {
                let (so, d0) = (l * other.cap * kvw, l * self.cap * kvw);
                s.memcpy_dtod(&src.slice(so..so + n), &mut dst.slice_mut(d0..d0 + n))?;
            }
        }
        self.len = other.len;
        Ok(())
    }

    fn base(&self, model: &CudaModel) -> u64 {
        self.buf.device_ptr(model.ops.device().stream()).0
    }

    /// The allocation's device address (identifies the cache in a captured step).
    pub(crate) fn device_addr(&self, model: &CudaModel) -> u64 {
        self.base(model)
    }

    /// Counts `n` tokens the last step appended.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// One sequence's part of a batched forward pass.
pub struct GpuSeq<'a> {
    /// New tokens, appended after what `cache` holds.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by `tokens`.
    pub cache: &'a mut GpuCache,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Whose keys and values a step's attention reads.
#[derive(Clone, Copy)]
pub(crate) enum Attend<'s, 'a> {
    /// Dense caches, one per sequence (full attention, or a prefill).
    Dense(&'s [&'a GpuCache]),
    /// ShadowKV sequences, one token each.
    Shadow(&'s ShadowStep<'a>),
}

/// The row buffers one layer's dense attention works on.
struct DenseRows<'a> {
    q: &'a mut CudaSlice<bf16>,
    qkv: &'a CudaSlice<bf16>,
    pre_rope: Option<&'a mut CudaSlice<bf16>>,
    out: &'a mut CudaSlice<bf16>,
}

/// What staging a step needs of one sequence.
pub(crate) struct StageSeq<'a> {
    /// New tokens.
    pub tokens: &'a [u32],
    /// Tokens held before the step.
    pub len: usize,
    /// Tokens it can hold.
    pub cap: usize,
    /// Its dense cache's address (0: none, a ShadowKV sequence).
    pub base: u64,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Activations and step inputs of one lane of work, grown on demand and kept
/// between steps.
#[derive(Default)]
pub(crate) struct Scratch {
    rows: usize,
    picked: usize,
    x: Option<CudaSlice<bf16>>,
    xn: Option<CudaSlice<bf16>>,
    qkv: Option<CudaSlice<bf16>>,
    q: Option<CudaSlice<bf16>>,
    attn: Option<CudaSlice<bf16>>,
    gate_up: Option<CudaSlice<bf16>>,
    act: Option<CudaSlice<bf16>>,
    sel: Option<CudaSlice<bf16>>,
    /// `[rows, kv_heads·d]` keys before RoPE, for caches that keep them.
    pre_rope: Option<CudaSlice<bf16>>,
    /// `[picked, vocab]` fp32 logits.
    pub(crate) logits: Option<CudaSlice<f32>>,
    /// The staged inputs, laid out as [`StepLayout`] says.
    pub(crate) ids: Option<CudaSlice<u32>>,
    pub(crate) ints: Option<CudaSlice<i32>>,
    pub(crate) addrs: Option<CudaSlice<u64>>,
    /// Sampled tokens (the next step's `prev_map` indexes them).
    pub(crate) tokens: Option<CudaSlice<u32>>,
    pub(crate) decode_ws: DecodeWorkspace,
    /// The stage buffers of ShadowKV decode steps, one per micro-batch (grown for the
    /// largest; empty before the first).
    pub(crate) shadow: Vec<StepScratch>,
    /// Tensor parallelism's communicator and logits buffers (unused on one GPU).
    pub(crate) tp: TpScratch,
    /// Bumped whenever a buffer is reallocated (a captured step is then stale).
    pub(crate) generation: u64,
}

fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    ops: &CudaOps,
    generation: &mut u64,
    buf: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<()> {
    if buf.as_ref().is_none_or(|b| b.len() < n.max(1)) {
        *buf = None;
        *buf = Some(ops.device().zeros(n.max(1))?);
        *generation += 1;
    }
    Ok(())
}

/// What the host sends for one step (see [`CudaModel::stage_step`]).
pub(crate) struct StepPlan {
    /// Where the staged inputs sit.
    pub layout: StepLayout,
    /// Rows whose logits are wanted, in order.
    pub picked: Vec<u32>,
    /// New rows per sequence.
    pub q_rows: Vec<usize>,
    /// Cache length per sequence after the step.
    pub lens: Vec<usize>,
    /// Whether every sequence brings exactly one token (flash-decoding).
    pub decode: bool,
    /// Bound of the lengths that sizes the flash-decoding grid (at least the longest).
    pub max_len: usize,
}

/// A model on the GPU.
pub struct CudaModel {
    ops: CudaOps,
    config: ModelConfig,
    embed: CudaSlice<bf16>,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<bf16>,
    lm_head: Option<CudaSlice<bf16>>,
    inv_freq: CudaSlice<f32>,
    /// Unit norm weight (the block norms' weights are folded into the matrices).
    ones: CudaSlice<bf16>,
    weight_bytes: usize,
    /// This device's place in a tensor-parallel group (none: the whole model).
    tp: Option<TpShard>,
    pub(crate) scratch: Mutex<Scratch>,
}

fn to_bf16(t: &Tensor) -> Vec<bf16> {
    t.data.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Uploads one block, q/k/v and gate/up fused, each RMSNorm's weight folded into the
/// columns of the matrix after it (f32 products, rounded once to bf16).
fn upload_layer(ops: &CudaOps, w: &LayerWeights) -> Result<GpuLayer> {
    let dev = ops.device();
    // Rows of the parts, one after another; with `g`, every row times g.
    let cat = |parts: &[&Tensor], g: Option<&Tensor>| -> Result<CudaSlice<bf16>> {
        let mut v: Vec<bf16> = Vec::with_capacity(parts.iter().map(|t| t.len()).sum());
        for t in parts {
            match g {
                Some(g) => {
                    for row in t.data.chunks_exact(g.len()) {
                        v.extend(row.iter().zip(&g.data).map(|(a, b)| bf16::from_f32(a * b)));
                    }
                }
                None => v.extend(t.data.iter().map(|&a| bf16::from_f32(a))),
            }
        }
        dev.upload(&v)
    };
    Ok(GpuLayer {
        wqkv: cat(&[&w.q_proj, &w.k_proj, &w.v_proj], Some(&w.input_norm))?,
        bqkv: w.qkv_bias.as_ref().map(|[q, k, v]| cat(&[q, k, v], None)).transpose()?,
        wo: dev.upload(&to_bf16(&w.o_proj))?,
        w_gate_up: cat(&[&w.gate_proj, &w.up_proj], Some(&w.post_norm))?,
        w_down: dev.upload(&to_bf16(&w.down_proj))?,
    })
}

impl CudaModel {
    /// Uploads the weights of `src`, one block at a time (dequantised to f32 by the
    /// source, stored as bf16), with a progress bar when `progress`.
    pub fn from_source(ops: CudaOps, config: ModelConfig, src: &dyn TensorSource, progress: bool) -> Result<Self> {
        Self::upload(ops, config, src, None, progress)
    }

    /// Uploads device `tp.rank()`'s shard of `plan`'s model from `src` (the whole
    /// model's `config`), each tensor read straight into its shard, one block at a time.
    pub fn from_shard(
        ops: CudaOps,
        config: ModelConfig,
        src: &dyn TensorSource,
        (plan, tp): (&ShardPlan, TpShard),
        progress: bool,
    ) -> Result<Self> {
        Self::upload(ops, config, src, Some((plan, tp)), progress)
    }

    fn upload(
        ops: CudaOps,
        config: ModelConfig,
        src: &dyn TensorSource,
        tp: Option<(&ShardPlan, TpShard)>,
        progress: bool,
    ) -> Result<Self> {
        config.validate()?;
        let bar = loading_bar(src, config.num_layers as u64 + 2, progress);
        let dev = ops.device();
        let up = |t: &Tensor| dev.upload(&to_bf16(t));
        let shard = tp.as_ref().map(|(_, t)| t.shard());
        let embed = up(&match shard {
            Some(sh) => load_embed_shard(&config, src, sh)?,
            None => load_embed(&config, src)?,
        })?;
        bar.inc(1);
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let w = match shard {
                Some(sh) => load_layer_shard(&config, src, sh, l)?,
                None => load_layer(&config, src, l)?,
            };
            layers.push(upload_layer(&ops, &w)?);
            bar.inc(1);
        }
        let norm = up(&load_final_norm(&config, src)?)?;
        let lm_head = match shard {
            Some(sh) => load_lm_head_shard(&config, src, sh)?,
            None => load_lm_head(&config, src)?,
        };
        let lm_head = lm_head.map(|t| up(&t)).transpose()?;
        bar.finish_and_clear();
        let (config, tp) = match tp {
            Some((plan, t)) => (t.device_config(plan)?, Some(t)),
            None => (config, None),
        };
        Self::assemble(ops, config, (embed, layers, norm, lm_head), tp)
    }

    /// Random weights made on the device (an 8B-shaped model needs no files): matrices
    /// uniform with standard deviation 1/√fan_in, the final norm's weight 1 ± 0.1 (the
    /// block norms' weights live folded in the matrices), a function of
    /// `seed` only. They are not the values of the CPU's `synthetic:` source of the same
    /// seed (that one draws on the host); the cost of a forward pass does not depend on
    /// them.
    pub fn synthetic(ops: CudaOps, config: ModelConfig, seed: u64, progress: bool) -> Result<Self> {
        Self::generate(ops, config, seed, None, progress)
    }

    /// Device `tp.rank()`'s shard of [`CudaModel::synthetic`]'s weights for `plan`'s
    /// model (`config`, whole): bit for bit the rows and columns of the one-GPU model's
    /// matrices this device holds, made on this device alone.
    pub fn synthetic_shard(
        ops: CudaOps,
        config: ModelConfig,
        seed: u64,
        (plan, tp): (&ShardPlan, TpShard),
        progress: bool,
    ) -> Result<Self> {
        Self::generate(ops, config, seed, Some((plan, tp)), progress)
    }

    fn generate(
        ops: CudaOps,
        config: ModelConfig,
        seed: u64,
        tp: Option<(&ShardPlan, TpShard)>,
        progress: bool,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, inter) = (c.num_heads * d, c.intermediate_size);
        // What this device holds; one device holds the whole model.
        let shard = match &tp {
            Some((_, t)) => t.shard().clone(),
            None => ShardPlan::new(c, 1)?.shard(0)?,
        };
        let counter = std::cell::Cell::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let next_seed = || {
            counter.set(counter.get().wrapping_add(1));
            counter.get()
        };
        // Uniform in [-a, a) has standard deviation a/√3. These rows of a tensor of
        // `cols` columns, stacked.
        let rows = |parts: &[Range<usize>], cols: usize, std: f32| -> Result<CudaSlice<bf16>> {
            let seed = next_seed();
            let n = parts.iter().map(|r| r.len()).sum::<usize>() * cols;
            let mut b = ops.device().zeros::<bf16>(n)?;
            let mut at = 0;
            for r in parts {
                let len = r.len() * cols;
                let mut part = b.slice_mut(at..at + len);
                ops.fill_random_rect(&mut part, (r.len(), cols), (cols, r.start, 0), seed, std * 3f32.sqrt())?;
                at += len;
            }
            Ok(b)
        };
        let matrix_rows = |parts: &[Range<usize>], cols: usize| rows(parts, cols, 1.0 / (cols as f32).sqrt());
        // These columns of every row of a `[rows, ld]` matrix.
        let matrix_cols = |n_rows: usize, part: Range<usize>, ld: usize| -> Result<CudaSlice<bf16>> {
            let seed = next_seed();
            let mut b = ops.device().zeros::<bf16>(n_rows * part.len())?;
            let scale = 3f32.sqrt() / (ld as f32).sqrt();
            ops.fill_random_rect(&mut b, (n_rows, part.len()), (ld, 0, part.start), seed, scale)?;
            Ok(b)
        };
        let bar = if progress {
            let b = indicatif::ProgressBar::new(c.num_layers as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("generating weights on the GPU {bar:40} {pos}/{len}")
                    .expect("static template"),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let embed = matrix_rows(std::slice::from_ref(&shard.vocab), h)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        let mut rng = seed ^ 0x5851_f42d_4c95_7f2d;
        let mut norm_w = |ops: &CudaOps| -> Result<CudaSlice<bf16>> {
            let v: Vec<bf16> = (0..h)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    bf16::from_f32(1.0 + ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2)
                })
                .collect();
            ops.device().upload(&v)
        };
        for _ in 0..c.num_layers {
            let bqkv = if c.attention_bias {
                Some(rows(&shard.fused_qkv_rows(), 1, 0.02)?)
            } else {
                None
            };
            // The norms' weights would be folded into these: random either way.
            layers.push(GpuLayer {
                wqkv: matrix_rows(&shard.fused_qkv_rows(), h)?,
                bqkv,
                wo: matrix_cols(h, shard.q_rows(), qd)?,
                w_gate_up: matrix_rows(&shard.fused_gate_up_rows(), h)?,
                w_down: matrix_cols(h, shard.inter.clone(), inter)?,
            });
            bar.inc(1);
        }
        let norm = norm_w(&ops)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(matrix_rows(std::slice::from_ref(&shard.vocab), h)?)
        };
        bar.finish_and_clear();
        let (config, tp) = match tp {
            Some((plan, t)) => (t.device_config(plan)?, Some(t)),
            None => (config, None),
        };
        Self::assemble(ops, config, (embed, layers, norm, lm_head), tp)
    }

    fn assemble(
        ops: CudaOps,
        config: ModelConfig,
        (embed, layers, norm, lm_head): (CudaSlice<bf16>, Vec<GpuLayer>, CudaSlice<bf16>, Option<CudaSlice<bf16>>),
        tp: Option<TpShard>,
    ) -> Result<Self> {
        let d = config.head_dim;
        ensure!(
            d == 64 || d == 128,
            "the CUDA backend supports head dimensions 64 and 128, this model has {d}"
        );
        let inv_freq = ops.device().upload(&rope_inv_freq(&config))?;
        let ones = ops.device().upload(&vec![bf16::ONE; config.hidden_size])?;
        let weight_bytes = 2
            * (embed.len()
                + norm.len()
                + lm_head.as_ref().map_or(0, |w| w.len())
                + layers
                    .iter()
                    .map(|l| {
                        l.wqkv.len()
                            + l.bqkv.as_ref().map_or(0, |b| b.len())
                            + l.wo.len()
                            + l.w_gate_up.len()
                            + l.w_down.len()
                    })
                    .sum::<usize>());
        ops.device().synchronize()?;
        Ok(CudaModel {
            ops,
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            ones,
            weight_bytes,
            tp,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// This device's place in a tensor-parallel group, if it is in one.
    pub fn tensor_parallel(&self) -> Option<&TpShard> {
        self.tp.as_ref()
    }

    /// Seconds one all-reduce of `bytes` bytes takes on the model's group (the median of
    /// `iters`, after warm-up), on the model's own stream and communicator; every rank
    /// must call it at once. `None` for a model that is not in a group.
    pub fn time_all_reduce(&self, bytes: usize, iters: usize) -> Result<Option<f64>> {
        let Some(tp) = self.tensor_parallel() else {
            return Ok(None);
        };
        let ops = self.ops();
        let mut sc = self.scratch.lock().expect("scratch lock");
        let comm = sc.tp.join(tp, ops)?;
        let dev = ops.device();
        let mut buf = dev.zeros::<u8>(bytes.max(1))?;
        let s = dev.stream();
        let (p, _g) = buf.device_ptr_mut(s);
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters + 3 {
            let (a, b) = (dev.event(true)?, dev.event(true)?);
            a.record(s)?;
            // SAFETY: `buf` holds `bytes` bytes and outlives the work (synchronised below).
            unsafe { comm.all_reduce_bytes(p, bytes, s.cu_stream()) }?;
            b.record(s)?;
            b.synchronize()?;
            if i >= 3 {
                times.push(a.elapsed_ms(&b)? as f64 / 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times.get(times.len() / 2).copied())
    }

    /// The model's hyper-parameters (a tensor-parallel device's: its share of the heads
    /// and MLP units, the whole vocabulary).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device operations.
    pub fn ops(&self) -> &CudaOps {
        &self.ops
    }

    /// Bytes of weights on the device (what a decode step reads once).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// `kv_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.config.num_kv_heads * self.config.head_dim
    }

    /// Device bytes of a cache of `cap` tokens.
    pub fn cache_bytes(&self, cap: usize) -> usize {
        self.config.num_layers * 2 * cap * self.kv_width() * 2
    }

    /// An empty cache for up to `cap` tokens.
    pub fn new_cache(&self, cap: usize) -> Result<GpuCache> {
        self.new_cache_with(cap, false)
    }

    /// An empty cache for up to `cap` tokens that keeps the keys before RoPE too (a
    /// prefill ShadowKV compresses).
    pub fn new_cache_pre_rope(&self, cap: usize) -> Result<GpuCache> {
        self.new_cache_with(cap, true)
    }

    fn new_cache_with(&self, cap: usize, pre_rope: bool) -> Result<GpuCache> {
        ensure!(cap > 0, "a cache needs room for at least one token");
        let n = self.config.num_layers * (2 + pre_rope as usize) * cap * self.kv_width();
        let (free, _) = self.ops.device().mem_info()?;
        let free = if n * 2 > free {
            // Freed caches may still sit in the allocator's pool.
            self.ops.device().release_memory()?;
            self.ops.device().mem_info()?.0
        } else {
            free
        };
        if n * 2 > free {
            bail!(
                "a KV cache of {cap} tokens needs {:.2} GiB of GPU memory, {:.2} GiB are free",
                (n * 2) as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            );
        }
        let kv = self.config.num_layers * 2 * cap * self.kv_width();
        let alloc = |n: usize| {
            self.ops
                .device()
                .zeros(n)
                .with_context(|| format!("allocating a KV cache of {cap} tokens"))
        };
        let buf = alloc(kv)?;
        let pre_rope = if pre_rope { Some(alloc(n - kv)?) } else { None };
        Ok(GpuCache {
            buf,
            pre_rope,
            cap,
            len: 0,
        })
    }

    /// Feeds `ids` after what `cache` holds, `chunk` tokens per forward pass, reporting
    /// each chunk's length to `progress`; returns the logits of the last token.
    pub fn prefill(
        &self,
        cache: &mut GpuCache,
        ids: &[u32],
        chunk: usize,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        chunked_prefill(ids, chunk, progress, |part, logits| {
            Ok(self
                .forward(&mut [GpuSeq {
                    tokens: part,
                    cache: &mut *cache,
                    logits,
                }])?
                .remove(0))
        })
    }

    /// Runs the new tokens of every sequence, extending their caches; returns, per
    /// sequence, the wanted logits as rows of `vocab_size` fp32 values.
    pub fn forward(&self, seqs: &mut [GpuSeq]) -> Result<Vec<Vec<f32>>> {
        let mut sc = self.scratch.lock().expect("scratch lock");
        let ops = &self.ops;
        let plan = self.stage_step(ops, &mut sc, seqs, &[])?;
        let caches: Vec<&GpuCache> = seqs.iter().map(|s| &*s.cache).collect();
        self.encode_step(ops, &mut sc, &plan, Attend::Dense(&caches))?;
        let v = self.config.vocab_size;
        let mut out = Vec::with_capacity(seqs.len());
        let host: Vec<f32> = if plan.picked.is_empty() {
            Vec::new()
        } else {
            let logits = sc.logits.as_ref().expect("staged");
            ops.device()
                .stream()
                .clone_dtoh(&logits.slice(0..plan.picked.len() * v))?
        };
        let mut at = 0;
        for s in seqs.iter_mut() {
            let k = s.logits.rows(0, s.tokens.len()).len();
            out.push(host[at * v..(at + k) * v].to_vec());
            at += k;
            s.cache.advance(s.tokens.len());
        }
        Ok(out)
    }

    /// Checks a step and copies its inputs into the scratch buffers (growing them).
    /// `prev[i] = Some(r)` feeds sequence `i` (one token) the token sampled for row `r`
    /// of this lane's previous step instead of its id in `seqs` (empty: none does).
    pub(crate) fn stage_step(
        &self,
        ops: &CudaOps,
        sc: &mut Scratch,
        seqs: &[GpuSeq],
        prev: &[Option<u32>],
    ) -> Result<StepPlan> {
        let staged: Vec<StageSeq> = seqs
            .iter()
            .map(|s| StageSeq {
                tokens: s.tokens,
                len: s.cache.len,
                cap: s.cache.cap,
                base: s.cache.base(self),
                logits: s.logits,
            })
            .collect();
        self.stage_rows(ops, sc, &staged, prev)
    }

    /// [`CudaModel::stage_step`] for any sequences: dense caches (their address and
    /// capacity) or ShadowKV state (no dense cache: address 0, the tables left empty).
    pub(crate) fn stage_rows(
        &self,
        ops: &CudaOps,
        sc: &mut Scratch,
        seqs: &[StageSeq],
        prev: &[Option<u32>],
    ) -> Result<StepPlan> {
        let c = &self.config;
        ensure!(
            prev.is_empty() || prev.len() == seqs.len(),
            "one previous-token entry per sequence"
        );
        let mut ids = Vec::new();
        let (mut positions, mut caps, mut bases, mut prev_map) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut picked = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let end = s.len + s.tokens.len();
            if end > c.max_position_embeddings {
                bail!(
                    "sequence of {end} tokens exceeds the model's context of {} tokens",
                    c.max_position_embeddings
                );
            }
            if end > s.cap {
                bail!("sequence {i}: {end} tokens exceed its cache of {} tokens", s.cap);
            }
            let from = prev.get(i).copied().flatten();
            if from.is_some() {
                ensure!(s.tokens.len() == 1, "sequence {i}: a previous step's token is one row");
            } else if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                bail!("token id {t} is outside the vocabulary ({} ids)", c.vocab_size);
            }
            picked.extend(s.logits.rows(ids.len(), s.tokens.len()).map(|r| r as u32));
            ids.extend_from_slice(s.tokens);
            prev_map.extend(s.tokens.iter().map(|_| from.map_or(-1, |r| r as i32)));
            for p in s.len..end {
                positions.push(p as i32);
                caps.push(s.cap as i32);
                bases.push(s.base);
            }
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len + s.tokens.len()).collect();
        let q_rows: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        let decode = q_rows.iter().all(|&n| n == 1);
        let layout = StepLayout {
            rows: ids.len(),
            batch: seqs.len(),
            picked: picked.len(),
            layers: c.num_layers,
        };
        let plan = StepPlan {
            layout,
            picked,
            q_rows,
            max_len: lens.iter().copied().max().unwrap_or(0),
            lens,
            decode,
        };
        self.reserve(ops, sc, &layout)?;
        let kvw = self.kv_width();
        let mut ints = positions;
        ints.extend(caps);
        ints.extend(plan.lens.iter().map(|&n| n as i32));
        ints.extend(prev_map);
        debug_assert_eq!(ints.len(), layout.ints_len());
        let mut addrs = bases;
        for part in [0, 1] {
            for layer in 0..c.num_layers {
                for s in seqs {
                    let (ko, vo) = cache_offsets(layer, s.cap, kvw);
                    addrs.push(if s.base == 0 {
                        0
                    } else {
                        s.base + 2 * [ko, vo][part] as u64
                    });
                }
            }
        }
        debug_assert_eq!(addrs.len(), layout.sampling().start);
        ids.extend_from_slice(&plan.picked);
        let s = ops.device().stream();
        s.memcpy_htod(&ids, sc.ids.as_mut().expect("reserved"))?;
        s.memcpy_htod(&ints, sc.ints.as_mut().expect("reserved"))?;
        s.memcpy_htod(&addrs, sc.addrs.as_mut().expect("reserved"))?;
        Ok(plan)
    }

    /// Makes the scratch big enough for a step laid out as `layout`.
    pub(crate) fn reserve(&self, ops: &CudaOps, sc: &mut Scratch, layout: &StepLayout) -> Result<()> {
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let qd = c.num_heads * d;
        let qkv_w = qd + 2 * self.kv_width();
        let (rows, picked) = (layout.rows, layout.picked);
        let g = &mut sc.generation;
        if rows > sc.rows {
            grow(ops, g, &mut sc.x, rows * h)?;
            grow(ops, g, &mut sc.xn, rows * h)?;
            grow(ops, g, &mut sc.qkv, rows * qkv_w)?;
            grow(ops, g, &mut sc.q, rows * qd)?;
            grow(ops, g, &mut sc.attn, rows * qd)?;
            grow(ops, g, &mut sc.gate_up, rows * 2 * c.intermediate_size)?;
            grow(ops, g, &mut sc.act, rows * c.intermediate_size)?;
            sc.rows = rows;
        }
        if picked > sc.picked {
            grow(ops, g, &mut sc.sel, picked * h)?;
            grow(ops, g, &mut sc.logits, picked * c.vocab_size)?;
            if let Some(t) = &self.tp {
                let per = t.vocab_per();
                grow(ops, g, &mut sc.tp.local, picked * per)?;
                grow(ops, g, &mut sc.tp.gathered, t.world() * picked * per)?;
            }
            sc.picked = picked;
        }
        grow(ops, g, &mut sc.ids, layout.ids_len())?;
        grow(ops, g, &mut sc.ints, layout.ints_len())?;
        grow(ops, g, &mut sc.addrs, layout.addrs_len())?;
        // The sampled tokens are the next step's input where it asks for them: a bigger
        // buffer starts with the old one's contents.
        if sc.tokens.as_ref().is_none_or(|t| t.len() < layout.picked.max(1)) {
            let mut bigger = ops.device().zeros::<u32>(layout.picked.max(64))?;
            if let Some(old) = &sc.tokens {
                ops.device()
                    .stream()
                    .memcpy_dtod(old, &mut bigger.slice_mut(0..old.len()))?;
            }
            sc.tokens = Some(bigger);
            sc.generation += 1;
        }
        Ok(())
    }

    /// Layer `l`'s attention over dense caches: the qkv split (bias, RoPE, the new keys
    /// and values into the caches, the keys before RoPE kept where a cache wants them),
    /// then flash-decoding when every sequence brings one token, causal flash attention
    /// for prefill chunks otherwise.
    #[allow(clippy::too_many_arguments)]
    fn dense_attention(
        &self,
        ops: &CudaOps,
        l: usize,
        w: &GpuLayer,
        rows: DenseRows,
        plan: &StepPlan,
        caches: &[&GpuCache],
        (ints, addrs): (&CudaSlice<i32>, &CudaSlice<u64>),
        decode_ws: &mut DecodeWorkspace,
        tiles: &mut Option<PrefillTiles>,
    ) -> Result<()> {
        let c = &self.config;
        let lay = plan.layout;
        let (d, kvw) = (c.head_dim, self.kv_width());
        let shape = AttnShape {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: d,
        };
        let s = ops.device().stream();
        let ints_p = ints.device_ptr(s).0;
        let addrs_p = addrs.device_ptr(s).0;
        let int_at = |r: std::ops::Range<usize>| ints_p + 4 * r.start as u64;
        let addr_at = |r: std::ops::Range<usize>| addrs_p + 8 * r.start as u64;
        let targets = RowTargets {
            rows: lay.rows,
            positions: int_at(lay.positions()),
            cache_base: addr_at(lay.cache_base()),
            cache_cap: int_at(lay.caps()),
        };
        let DenseRows { q, qkv, pre_rope, out } = rows;
        let pre_rows = pre_rope.as_ref().map(|p| p.device_ptr(s).0);
        // SAFETY: the targets were staged for these caches, each big enough (checked
        // in stage_step) and alive for the step (borrowed by `caches`).
        unsafe {
            ops.qkv_rope_append(
                q,
                pre_rope,
                qkv,
                w.bqkv.as_ref(),
                &targets,
                &self.inv_freq,
                l,
                (c.num_heads, c.num_kv_heads, d),
            )?
        };
        if let Some(src) = pre_rows {
            self.keep_pre_rope(ops, src, caches, plan, l)?;
        }
        let batch = caches.len();
        if plan.decode {
            let part = partition_len(batch, c.num_kv_heads, plan.max_len, ops.decode_slots());
            let args = DecodeArgs {
                out: out.device_ptr(s).0,
                q: q.device_ptr(s).0,
                k_ptrs: addr_at(lay.k_table(l)),
                v_ptrs: addr_at(lay.v_table(l)),
                lens: int_at(lay.lens()),
                batch,
                max_len: plan.max_len,
                value_chunks: None,
                pass: PassArgs::default(),
            };
            // SAFETY: q and out hold rows = batch query rows; the tables hold this layer's
            // cache addresses, whose caches hold `lens` rows (staged above).
            unsafe { ops.flash_decode_raw(&args, shape, decode_ws, part) }
        } else {
            let views: Vec<_> = caches
                .iter()
                .zip(&plan.lens)
                .map(|(cache, &len)| {
                    let (ko, vo) = cache_offsets(l, cache.cap, kvw);
                    (
                        cache.buf.slice(ko..ko + len * kvw),
                        cache.buf.slice(vo..vo + len * kvw),
                        len,
                    )
                })
                .collect();
            let refs: Vec<_> = views.iter().map(|(k, v, len)| (k, v, *len)).collect();
            let table = KvTable::new(ops, &refs, kvw)?;
            // Every layer of the step has the same tiles: built and uploaded once (an
            // upload per layer could hold the host thread, which also drives the
            // decode lane, behind this lane's queued work).
            if tiles.is_none() {
                *tiles = Some(PrefillTiles::new(ops, &table, &plan.q_rows, d)?);
            }
            ops.flash_prefill_tiles(out, q, &table, tiles.as_ref().expect("built above"), shape)
        }
    }

    /// Copies each pre-RoPE-keeping cache's new rows of layer `l` from the step's rows
    /// buffer at `src0` (`[rows, kv_heads·d]`) into the cache, after what it held.
    fn keep_pre_rope(&self, ops: &CudaOps, src0: u64, caches: &[&GpuCache], plan: &StepPlan, l: usize) -> Result<()> {
        let kvw = self.kv_width();
        let s = ops.device().stream();
        let mut row = 0;
        for ((c, &n), &len) in caches.iter().zip(&plan.q_rows).zip(&plan.lens) {
            if let Some(dst) = &c.pre_rope {
                let at = l * c.cap + (len - n);
                let dst = dst.device_ptr(s).0 + 2 * (at * kvw) as u64;
                // SAFETY: rows row..row+n of the step's buffer (n·kvw values) go to rows
                // len-n..len of layer l of the cache, inside its `cap` (checked when the
                // step was staged); both allocations outlive the queued copy (the step
                // borrows the caches, the scratch is the lane's).
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst,
                        src0 + 2 * (row * kvw) as u64,
                        2 * n * kvw,
                        s.cu_stream(),
                    )
                }?;
            }
            row += n;
        }
        Ok(())
    }

    /// Queues the kernels of a staged step: every launch reads its inputs from the
    /// scratch buffers, so a decode step can be captured once and replayed. `attend`
    /// says whose keys and values the attention reads.
    pub(crate) fn encode_step(&self, ops: &CudaOps, sc: &mut Scratch, plan: &StepPlan, attend: Attend) -> Result<()> {
        let c = &self.config;
        let lay = plan.layout;
        let n = lay.rows;
        if n == 0 {
            return Ok(());
        }
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, kvw) = (c.num_heads * d, self.kv_width());
        let qkv_w = qd + 2 * kvw;
        let inter = c.intermediate_size;
        let eps = c.rms_norm_eps;
        let s = ops.device().stream().clone();
        let Scratch {
            x,
            xn,
            qkv,
            q,
            attn,
            gate_up,
            act,
            sel,
            pre_rope,
            logits,
            ids,
            ints,
            addrs,
            tokens,
            decode_ws,
            shadow,
            tp: tps,
            ..
        } = sc;
        let (x, xn) = (x.as_mut().unwrap(), xn.as_mut().unwrap());
        let (qkv, q, attn) = (qkv.as_mut().unwrap(), q.as_mut().unwrap(), attn.as_mut().unwrap());
        let (gate_up, act) = (gate_up.as_mut().unwrap(), act.as_mut().unwrap());
        let (ids, ints, addrs) = (ids.as_ref().unwrap(), ints.as_ref().unwrap(), addrs.as_ref().unwrap());
        let ids_p = ids.device_ptr(&s).0;
        let ints_p = ints.device_ptr(&s).0;
        let prev = (
            ids_p,
            ints_p + 4 * lay.prev_map().start as u64,
            tokens.as_ref().expect("reserved").device_ptr(&s).0,
        );
        // With tensor parallelism: each device embeds the ids it holds (zeros for the
        // others), the all-reduce completes the rows; each row-parallel product below
        // is a partial sum (the residual added on rank 0 only), completed the same way.
        let tp = self.tp.as_ref();
        if let Some(t) = tp {
            tps.join(t, ops)?;
        }
        let held = tp.map_or(0..c.vocab_size, |t| t.vocab_rows());
        let lead = tp.is_none_or(|t| t.rank() == 0);
        let mut complete = |x: &mut CudaSlice<bf16>| match tp {
            Some(_) => tps.all_reduce(ops, x, n * h),
            None => Ok(()),
        };
        // SAFETY: ids and prev_map hold `n` staged rows; prev_map's indices were checked
        // against the previous step's sampled rows by the caller (`CudaModel::submit`),
        // and `tokens` keeps them when it grows.
        unsafe { ops.embedding_raw(x, &self.embed, prev, n, h, (held, c.vocab_size))? };
        complete(x)?;
        // Caches that keep the keys before RoPE get them from a rows buffer, copied
        // into place after each layer's split.
        let keep_pre = matches!(attend, Attend::Dense(caches) if caches.iter().any(|c| c.keeps_pre_rope()));
        if keep_pre && pre_rope.as_ref().is_none_or(|p| p.len() < n * kvw) {
            *pre_rope = Some(ops.device().zeros(n * kvw)?);
        }
        let mut tiles = None;
        for (l, w) in self.layers.iter().enumerate() {
            ops.linear_normed(qkv, x, &w.wqkv, (n, h, qkv_w), eps, xn, &self.ones)?;
            match attend {
                Attend::Dense(caches) => {
                    let rows = DenseRows {
                        q: &mut *q,
                        qkv: &*qkv,
                        pre_rope: if keep_pre { pre_rope.as_mut() } else { None },
                        out: &mut *attn,
                    };
                    self.dense_attention(ops, l, w, rows, plan, caches, (ints, addrs), decode_ws, &mut tiles)?
                }
                Attend::Shadow(step) => step.attend_layer(
                    ops,
                    l,
                    (&mut *q, &*qkv, w.bqkv.as_ref()),
                    &ints.slice(lay.positions()),
                    &self.inv_freq,
                    &mut *attn,
                    &mut shadow[..step.micro_batches().len()],
                )?,
            }
            // Residual adds in the products' epilogues.
            ops.linear(x, attn, &w.wo, n, qd, h, lead)?;
            complete(x)?;
            ops.linear_normed(gate_up, x, &w.w_gate_up, (n, h, 2 * inter), eps, xn, &self.ones)?;
            ops.swiglu(act, gate_up, n, inter)?;
            ops.linear(x, act, &w.w_down, n, inter, h, lead)?;
            complete(x)?;
        }
        if let Attend::Shadow(step) = attend {
            step.mark_layers_done(ops)?;
        }
        if plan.picked.is_empty() {
            return Ok(());
        }
        let k = plan.picked.len();
        let (sel, logits) = (sel.as_mut().unwrap(), logits.as_mut().unwrap());
        ops.rmsnorm_residual(xn, x, None, &self.norm, n, h, eps)?;
        ops.embedding(sel, xn, &ids.slice(lay.picked()), k, h, n)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        match tp {
            None => ops.linear_f32(logits, sel, head, k, h, c.vocab_size)?,
            Some(t) => {
                // This device's ids, then every device's in vocabulary order.
                let per = t.vocab_per();
                ops.linear_f32(
                    tps.local.as_mut().expect("reserved"),
                    sel,
                    head,
                    k,
                    h,
                    t.vocab_rows().len(),
                )?;
                tps.all_gather_logits(ops, k * per)?;
                vocab_concat(
                    ops,
                    logits,
                    tps.gathered.as_ref().expect("reserved"),
                    k,
                    per,
                    c.vocab_size,
                )?;
            }
        }
        Ok(())
    }
}
