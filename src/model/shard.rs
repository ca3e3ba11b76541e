//! The tensor-parallel sharding plan: for a model and a number of devices, which rows
//! or columns of every weight each device holds (Megatron-style). Pure arithmetic: it
//! decides, the loader and the engine apply.
//!
//! - **Column-parallel** (the output dimension, a weight's rows, is split): q/k/v,
//!   their biases, gate and up. Device `i` owns KV heads `i·kv/n .. (i+1)·kv/n` and the
//!   query heads of those heads' groups (query head `h` reads KV head `h / (heads/kv)`,
//!   so a group is contiguous), and `inter/n` of the MLP's hidden units. Its outputs
//!   need no communication: attention runs per KV head, SwiGLU per hidden unit.
//! - **Row-parallel** (the input dimension, a weight's columns, is split): o and down.
//!   Device `i` holds the columns that match its own column-parallel outputs and
//!   computes a partial product; the all-reduce sums the partials into the residual
//!   stream. The supported architectures have no bias on o or down; one would be added
//!   by one device only, before the sum.
//! - **Vocabulary-parallel**: the embedding and the output head are split by rows
//!   (token ids). The embedding lookup writes zeros for ids outside a device's range
//!   and the all-reduce sums the rows; each device's logits cover its ids and are
//!   concatenated (or sampled per device and reduced).
//! - **Replicated**: the norms (every device normalises the whole residual stream).
//!
//! The vocabulary is split into `ceil(vocab / n)` rows per device with the remainder on
//! the last device, not padded: concatenated logits are then exactly the model's, with
//! no padding rows to mask out of sampling, and every device but the last has the same
//! GEMM shape; a device with no rows at all is refused.
//!
//! The project's fused layouts shard the same way: the fused `wqkv` (`[q; k; v]` rows,
//! in `cpu::model` and `cuda::model`) of device `i` is `[q rows of its heads; k rows of
//! its KV heads; v rows of its KV heads]`, and its `w_gate_up` is `[its gate rows; its
//! up rows]`, so each device's fused matrices have the layout of a model with
//! [`ShardPlan::device_config`]'s head and hidden counts, and the per-device kernels
//! (qkv split, RoPE, attention, SwiGLU) run unchanged. The CUDA backend folds each
//! RMSNorm's weight into the columns of the following matrix; the norms are replicated
//! and column-parallel weights are split by rows, so the fold commutes with the split.

use super::config::ModelConfig;
use super::tensor::Tensor;
use anyhow::{bail, Result};
use std::ops::Range;

/// The part of one weight tensor a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorShard {
    /// All of it (norms, and every tensor on one device).
    Whole,
    /// These rows (the outermost dimension) and every column.
    Rows(Range<usize>),
    /// Every row and these columns (the innermost dimension of a matrix).
    Cols(Range<usize>),
}

impl TensorShard {
    /// What is wrong with this shard of a tensor of `shape`, if anything.
    fn range_error(&self, shape: &[usize]) -> Option<String> {
        let rows = *shape.first().unwrap_or(&1);
        match self {
            TensorShard::Whole => None,
            TensorShard::Rows(r) => (r.start > r.end || r.end > rows).then(|| format!("rows {r:?} are outside it")),
            TensorShard::Cols(_) if shape.len() != 2 => Some(format!("{self:?} of a tensor that is not a matrix")),
            TensorShard::Cols(c) => {
                (c.start > c.end || c.end > shape[1]).then(|| format!("columns {c:?} are outside it"))
            }
        }
    }

    /// The shape of this shard of tensor `name` of shape `shape`, or an error naming
    /// the tensor, its shape and the range when the range falls outside it. A `[n]`
    /// vector takes `Rows` as elements; `Cols` needs a matrix.
    pub fn shape_in(&self, name: &str, shape: &[usize]) -> Result<Vec<usize>> {
        if let Some(why) = self.range_error(shape) {
            bail!("tensor `{name}` has shape {shape:?}: {why}");
        }
        Ok(match self {
            TensorShard::Whole => shape.to_vec(),
            TensorShard::Rows(r) if shape.is_empty() => vec![r.len()],
            TensorShard::Rows(r) => [&[r.len()], &shape[1..]].concat(),
            TensorShard::Cols(c) => vec![shape[0], c.len()],
        })
    }

    /// Cuts this shard out of a full tensor (errors as [`Self::shape_in`], without a name).
    pub fn apply(&self, t: &Tensor) -> Result<Tensor> {
        if let Some(why) = self.range_error(&t.shape) {
            bail!("a tensor of shape {:?}: {why}", t.shape);
        }
        let shape = self.shape_in("", &t.shape)?;
        let cols = match t.shape.first() {
            Some(&rows) if t.shape.len() > 1 && rows > 0 => t.len() / rows,
            _ => 1,
        };
        let data = match self {
            TensorShard::Whole => t.data.clone(),
            TensorShard::Rows(r) => t.data[r.start * cols..r.end * cols].to_vec(),
            TensorShard::Cols(c) => t
                .data
                .chunks_exact(cols)
                .flat_map(|row| &row[c.clone()])
                .copied()
                .collect(),
        };
        Ok(Tensor { shape, data })
    }
}

/// What one device of a tensor-parallel group holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceShard {
    /// Position in the group (0-based; not a CUDA ordinal).
    pub rank: usize,
    /// Query heads.
    pub heads: Range<usize>,
    /// Key/value heads.
    pub kv_heads: Range<usize>,
    /// Hidden units of the MLP (rows of gate and up, columns of down).
    pub inter: Range<usize>,
    /// Token ids (rows of the embedding and the output head).
    pub vocab: Range<usize>,
    head_dim: usize,
    full_heads: usize,
    full_kv_heads: usize,
    full_inter: usize,
}

impl DeviceShard {
    /// Rows of `q_proj` (and elements of its bias).
    pub fn q_rows(&self) -> Range<usize> {
        self.heads.start * self.head_dim..self.heads.end * self.head_dim
    }

    /// Rows of `k_proj` and `v_proj` (and elements of their biases).
    pub fn kv_rows(&self) -> Range<usize> {
        self.kv_heads.start * self.head_dim..self.kv_heads.end * self.head_dim
    }

    /// Rows of the fused `[q; k; v]` matrix (and bias) this device holds, in the order
    /// they are stacked in its own fused matrix.
    pub fn fused_qkv_rows(&self) -> [Range<usize>; 3] {
        let (qd, kvd) = (self.full_heads * self.head_dim, self.full_kv_heads * self.head_dim);
        let (q, kv) = (self.q_rows(), self.kv_rows());
        [q, qd + kv.start..qd + kv.end, qd + kvd + kv.start..qd + kvd + kv.end]
    }

    /// Rows of the fused `[gate; up]` matrix this device holds, in the order they are
    /// stacked in its own fused matrix.
    pub fn fused_gate_up_rows(&self) -> [Range<usize>; 2] {
        let i = self.inter.clone();
        [i.clone(), self.full_inter + i.start..self.full_inter + i.end]
    }

    /// The part of the Hugging Face tensor `name` (as [`super::weights::expected_tensors`]
    /// lists them) this device holds.
    pub fn tensor(&self, name: &str) -> Result<TensorShard> {
        let layer_part = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .map(|(_, part)| part);
        Ok(match (name, layer_part) {
            ("model.embed_tokens.weight" | "lm_head.weight", _) => TensorShard::Rows(self.vocab.clone()),
            ("model.norm.weight", _) => TensorShard::Whole,
            (_, Some("input_layernorm.weight" | "post_attention_layernorm.weight")) => TensorShard::Whole,
            (_, Some("self_attn.q_proj.weight" | "self_attn.q_proj.bias")) => TensorShard::Rows(self.q_rows()),
            (
                _,
                Some(
                    "self_attn.k_proj.weight"
                    | "self_attn.k_proj.bias"
                    | "self_attn.v_proj.weight"
                    | "self_attn.v_proj.bias",
                ),
            ) => TensorShard::Rows(self.kv_rows()),
            (_, Some("self_attn.o_proj.weight")) => TensorShard::Cols(self.q_rows()),
            (_, Some("mlp.gate_proj.weight" | "mlp.up_proj.weight")) => TensorShard::Rows(self.inter.clone()),
            (_, Some("mlp.down_proj.weight")) => TensorShard::Cols(self.inter.clone()),
            _ => bail!("tensor `{name}` has no place in the sharding plan"),
        })
    }
}

/// How a model is split over `devices` devices.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPlan {
    config: ModelConfig,
    devices: usize,
    vocab_per_device: usize,
}

impl ShardPlan {
    /// The plan for `cfg` over `devices` devices, or an error naming the dimension
    /// that does not divide.
    pub fn new(cfg: &ModelConfig, devices: usize) -> Result<Self> {
        let n = devices;
        if n == 0 {
            bail!("tensor parallelism needs at least one device, got 0");
        }
        let divides = |what: &str, v: usize| -> Result<()> {
            if v % n != 0 {
                bail!("{what} ({v}) is not divisible by the device count ({n}): each device must hold as many");
            }
            Ok(())
        };
        divides("num_attention_heads", cfg.num_heads)?;
        divides("num_key_value_heads", cfg.num_kv_heads)?;
        divides("intermediate_size", cfg.intermediate_size)?;
        let per = cfg.vocab_size.div_ceil(n);
        if (n - 1) * per >= cfg.vocab_size {
            bail!(
                "vocab_size ({}) cannot be split over {n} devices: with {per} ids each the last would hold none",
                cfg.vocab_size
            );
        }
        Ok(ShardPlan {
            config: cfg.clone(),
            devices: n,
            vocab_per_device: per,
        })
    }

    /// Devices in the group.
    pub fn devices(&self) -> usize {
        self.devices
    }

    /// What device `rank` holds.
    pub fn shard(&self, rank: usize) -> Result<DeviceShard> {
        let (c, n) = (&self.config, self.devices);
        if rank >= n {
            bail!("device {rank} is outside a group of {n}");
        }
        let span = |total: usize| total / n * rank..total / n * (rank + 1);
        let v = self.vocab_per_device;
        Ok(DeviceShard {
            rank,
            heads: span(c.num_heads),
            kv_heads: span(c.num_kv_heads),
            inter: span(c.intermediate_size),
            vocab: v * rank..(v * (rank + 1)).min(c.vocab_size),
            head_dim: c.head_dim,
            full_heads: c.num_heads,
            full_kv_heads: c.num_kv_heads,
            full_inter: c.intermediate_size,
        })
    }

    /// The shape each device's kernels see: the model's config with its share of the
    /// heads, KV heads, MLP units and (for `rank`) token ids. The hidden size, head
    /// dimension, RoPE and norms are the model's.
    pub fn device_config(&self, rank: usize) -> Result<ModelConfig> {
        let s = self.shard(rank)?;
        Ok(ModelConfig {
            num_heads: s.heads.len(),
            num_kv_heads: s.kv_heads.len(),
            intermediate_size: s.inter.len(),
            vocab_size: s.vocab.len(),
            ..self.config.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{preset, ARCHS};
    use crate::model::weights::expected_tensors;

    /// Checks that the devices' parts of a tensor of `shape` either are all the whole
    /// tensor, or tile its rows (or its columns) exactly once, in rank order. Arithmetic
    /// on ranges, so the largest presets cost nothing.
    fn check_tiling(plan: &ShardPlan, name: &str, shape: &[usize]) -> &'static str {
        let parts: Vec<TensorShard> = (0..plan.devices())
            .map(|r| plan.shard(r).unwrap().tensor(name).unwrap())
            .collect();
        let tiles = |ranges: Vec<Range<usize>>, len: usize| {
            let mut at = 0;
            for r in ranges {
                assert!(r.start == at && r.end > r.start, "{name}: {r:?} after {at}");
                at = r.end;
            }
            assert_eq!(at, len, "{name}: the parts end at {at} of {len}");
        };
        match &parts[0] {
            TensorShard::Whole => {
                assert!(parts.iter().all(|p| *p == TensorShard::Whole), "{name}");
                "whole"
            }
            TensorShard::Rows(_) => {
                let r = parts.into_iter().map(|p| match p {
                    TensorShard::Rows(r) => r,
                    other => panic!("{name}: {other:?} among row shards"),
                });
                tiles(r.collect(), shape[0]);
                "rows"
            }
            TensorShard::Cols(_) => {
                assert_eq!(shape.len(), 2, "{name}: columns of a vector");
                let c = parts.into_iter().map(|p| match p {
                    TensorShard::Cols(c) => c,
                    other => panic!("{name}: {other:?} among column shards"),
                });
                tiles(c.collect(), shape[1]);
                "cols"
            }
        }
    }

    /// Every preset (Llama-3.1-70B included, without a weight allocated) over every
    /// device count its heads allow: split tensors are partitioned exactly (each element
    /// on one device), replicated ones are everywhere, and the per-device shapes add up.
    #[test]
    fn every_preset_partitions_every_tensor() {
        let mut covered = 0;
        for arch in ARCHS {
            let mut cfg = preset(arch).unwrap();
            cfg.num_layers = 1; // every layer has the same plan
            for n in [1, 2, 3, 4, 8] {
                let Ok(plan) = ShardPlan::new(&cfg, n) else {
                    continue;
                };
                covered += 1;
                for (name, shape) in expected_tensors(&cfg) {
                    let want = match name.rsplit('.').nth(1).unwrap() {
                        _ if name.ends_with("norm.weight") => "whole",
                        "o_proj" | "down_proj" => "cols",
                        _ => "rows",
                    };
                    assert_eq!(check_tiling(&plan, &name, &shape), want, "{arch} n={n} {name}");
                }
                let local: Vec<ModelConfig> = (0..n).map(|r| plan.device_config(r).unwrap()).collect();
                assert_eq!(local.iter().map(|c| c.vocab_size).sum::<usize>(), cfg.vocab_size);
                for c in &local {
                    assert_eq!(c.num_heads * n, cfg.num_heads, "{arch} n={n}");
                    assert_eq!(c.num_kv_heads * n, cfg.num_kv_heads, "{arch} n={n}");
                    assert_eq!(c.intermediate_size * n, cfg.intermediate_size, "{arch} n={n}");
                    c.validate().unwrap();
                }
            }
        }
        assert!(
            covered >= 2 * ARCHS.len(),
            "only {covered} (arch, n) pairs were planned"
        );
    }

    #[test]
    fn llama_3_1_70b_over_two_and_eight_devices() {
        let cfg = preset("llama-3.1-70b").unwrap();
        let two = ShardPlan::new(&cfg, 2).unwrap();
        let s1 = two.shard(1).unwrap();
        assert_eq!((s1.heads.clone(), s1.kv_heads.clone()), (32..64, 4..8));
        assert_eq!(s1.inter, 14336..28672);
        assert_eq!(s1.vocab, 64128..128256);
        assert_eq!(
            s1.fused_qkv_rows(),
            [4096..8192, 8192 + 512..8192 + 1024, 9216 + 512..9216 + 1024]
        );
        assert_eq!(s1.fused_gate_up_rows(), [14336..28672, 28672 + 14336..2 * 28672]);
        let eight = ShardPlan::new(&cfg, 8).unwrap();
        let c = eight.device_config(7).unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.intermediate_size), (8, 1, 3584));
        assert_eq!(eight.shard(7).unwrap().vocab, 112224..128256);
    }

    #[test]
    fn vocab_remainder_goes_to_the_last_device() {
        let mut cfg = preset("tiny").unwrap();
        cfg.vocab_size = 514;
        let plan = ShardPlan::new(&cfg, 2).unwrap();
        assert_eq!(plan.shard(0).unwrap().vocab, 0..257);
        cfg.vocab_size = 513;
        let plan = ShardPlan::new(&cfg, 2).unwrap();
        assert_eq!(plan.shard(0).unwrap().vocab, 0..257);
        assert_eq!(plan.shard(1).unwrap().vocab, 257..513);
        assert!(plan.shard(2).is_err());
    }

    #[test]
    fn refusals_name_the_dimension() {
        let err = |cfg: &ModelConfig, n| ShardPlan::new(cfg, n).unwrap_err().to_string();
        let smol = preset("smollm2-135m").unwrap();
        assert!(err(&smol, 0).contains("at least one device"));
        assert!(err(&smol, 2).contains("num_attention_heads (9) is not divisible by the device count (2)"));
        assert!(err(&smol, 9).contains("num_key_value_heads (3) is not divisible by the device count (9)"));
        let mut cfg = preset("tiny").unwrap();
        cfg.intermediate_size = 161;
        assert!(err(&cfg, 2).contains("intermediate_size (161)"));
        let mut cfg = preset("tiny").unwrap();
        cfg.num_heads = 8;
        cfg.num_kv_heads = 4;
        cfg.vocab_size = 9;
        assert!(err(&cfg, 4).contains("vocab_size (9) cannot be split over 4 devices"));
        let plan = ShardPlan::new(&preset("tiny").unwrap(), 2).unwrap();
        let e = plan
            .shard(0)
            .unwrap()
            .tensor("model.layers.0.mlp.fc1.weight")
            .unwrap_err();
        assert!(e.to_string().contains("`model.layers.0.mlp.fc1.weight`"));
    }

    #[test]
    fn shards_cut_rows_and_columns() {
        let t = Tensor {
            shape: vec![3, 4],
            data: (0..12).map(|x| x as f32).collect(),
        };
        let rows = TensorShard::Rows(1..3).apply(&t).unwrap();
        assert_eq!(
            (rows.shape, rows.data),
            (vec![2, 4], (4..12).map(|x| x as f32).collect())
        );
        let cols = TensorShard::Cols(1..3).apply(&t).unwrap();
        assert_eq!(
            (cols.shape, cols.data),
            (vec![3, 2], vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0])
        );
        assert!(TensorShard::Cols(3..5).apply(&t).is_err());
        assert!(TensorShard::Rows(2..4).apply(&t).is_err());
        let v = Tensor {
            shape: vec![4],
            data: vec![1.0, 2.0, 3.0, 4.0],
        };
        assert_eq!(TensorShard::Rows(1..3).apply(&v).unwrap().data, [2.0, 3.0]);
    }

    #[test]
    fn ranges_outside_a_tensor_name_it() {
        let err = |s: TensorShard, shape: &[usize]| s.shape_in("m.w", shape).unwrap_err().to_string();
        assert_eq!(
            err(TensorShard::Cols(3..5), &[3, 4]),
            "tensor `m.w` has shape [3, 4]: columns 3..5 are outside it"
        );
        assert_eq!(
            err(TensorShard::Rows(2..4), &[3, 4]),
            "tensor `m.w` has shape [3, 4]: rows 2..4 are outside it"
        );
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = TensorShard::Rows(2..1);
        assert_eq!(
            err(backwards, &[3, 4]),
            "tensor `m.w` has shape [3, 4]: rows 2..1 are outside it"
        );
        assert_eq!(
            err(TensorShard::Cols(0..1), &[4]),
            "tensor `m.w` has shape [4]: Cols(0..1) of a tensor that is not a matrix"
        );
        assert_eq!(TensorShard::Rows(1..3).shape_in("v", &[4]).unwrap(), [2]);
        assert_eq!(TensorShard::Cols(1..3).shape_in("m", &[5, 4]).unwrap(), [5, 2]);
        assert_eq!(TensorShard::Rows(0..2).shape_in("m", &[5, 4, 3]).unwrap(), [2, 4, 3]);
        assert_eq!(TensorShard::Whole.shape_in("m", &[5, 4]).unwrap(), [5, 4]);
    }
}
