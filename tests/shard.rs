//! The tensor-parallel sharding plan (`model::shard`) proved numerically on the CPU
//! reference: for each supported architecture and each device count its heads allow,
//! the model runs once on full weights (`CpuModel`) and once as `n` simulated devices,
//! each holding only its shards (fused as the backends fuse them) and running the
//! reference's own ops at its local shape; the row-parallel partial sums are added as
//! the all-reduce would add them, and the vocabulary-split logits are concatenated.
//!
//! Tolerance: both sides compute in fp32 from the same bf16-valued weights; they differ
//! only in the order of additions (a row-parallel product is split into `n` partial
//! sums, the embedding is a sum of one row and zeros), so the logits agree to a few
//! ulps of their largest magnitude: 1e-5 relative to it. A control case (two devices'
//! o-projection shards swapped) must fail that bound by far, so the comparison can fail.

mod common;

use shadowkv::cpu::attention::{causal_attention, AttnJob, AttnShape};
use shadowkv::cpu::matmul::linear;
use shadowkv::cpu::ops::{rms_norm, silu_mul, Rope};
use shadowkv::cpu::{CpuModel, LogitsWanted, SeqInput};
use shadowkv::model::config::{Arch, ModelConfig};
use shadowkv::model::shard::{DeviceShard, ShardPlan};
use shadowkv::model::synthetic::{preset, SyntheticSource};
use shadowkv::model::weights::{ModelWeights, Tensor, TensorSource};

const TOL: f32 = 1e-5;

/// One device's weights for one block, fused as `cpu::model` fuses them.
struct DeviceLayer {
    input_norm: Vec<f32>,
    wqkv: Vec<f32>,
    bqkv: Option<Vec<f32>>,
    wo: Vec<f32>,
    post_norm: Vec<f32>,
    w_gate_up: Vec<f32>,
    w_down: Vec<f32>,
}

/// Everything one simulated device holds.
struct Device {
    cfg: ModelConfig,
    shard: DeviceShard,
    embed: Vec<f32>,
    layers: Vec<DeviceLayer>,
    norm: Vec<f32>,
    head: Vec<f32>,
}

fn load(src: &dyn TensorSource, name: &str) -> Tensor {
    src.load(name).unwrap().unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The rows `r` of a row-major matrix `m` with `cols` columns.
fn rows(m: &[f32], cols: usize, r: std::ops::Range<usize>) -> &[f32] {
    &m[r.start * cols..r.end * cols]
}

/// Device `rank`'s weights, each cut from the full tensor by the plan. The fused
/// matrices are built from the per-tensor shards and checked against the plan's rows
/// of the full fused matrices.
fn device(cfg: &ModelConfig, plan: &ShardPlan, rank: usize, src: &dyn TensorSource, o_rank: usize) -> Device {
    let shard = plan.shard(rank).unwrap();
    let cut = |name: &str| shard.tensor(name).unwrap().apply(&load(src, name)).unwrap().data;
    let h = cfg.hidden_size;
    let mut layers = Vec::new();
    for l in 0..cfg.num_layers {
        let p = |part: &str| format!("model.layers.{l}.{part}");
        let [q, k, v] = ["q", "k", "v"].map(|x| cut(&p(&format!("self_attn.{x}_proj.weight"))));
        let wqkv = [q, k, v].concat();
        let full_qkv = ["q", "k", "v"]
            .map(|x| load(src, &p(&format!("self_attn.{x}_proj.weight"))).data)
            .concat();
        let want: Vec<f32> = shard
            .fused_qkv_rows()
            .into_iter()
            .flat_map(|r| rows(&full_qkv, h, r).to_vec())
            .collect();
        assert_eq!(wqkv, want, "fused qkv rows of device {rank}");
        let bqkv = cfg.attention_bias.then(|| {
            ["q", "k", "v"]
                .map(|x| cut(&p(&format!("self_attn.{x}_proj.bias"))))
                .concat()
        });
        let w_gate_up = [cut(&p("mlp.gate_proj.weight")), cut(&p("mlp.up_proj.weight"))].concat();
        let full_gate_up = ["gate", "up"]
            .map(|x| load(src, &p(&format!("mlp.{x}_proj.weight"))).data)
            .concat();
        let want: Vec<f32> = shard
            .fused_gate_up_rows()
            .into_iter()
            .flat_map(|r| rows(&full_gate_up, h, r).to_vec())
            .collect();
        assert_eq!(w_gate_up, want, "fused gate/up rows of device {rank}");
        // The control case hands this device another device's o-projection columns.
        let o_name = p("self_attn.o_proj.weight");
        let wo = plan
            .shard(o_rank)
            .unwrap()
            .tensor(&o_name)
            .unwrap()
            .apply(&load(src, &o_name))
            .unwrap()
            .data;
        layers.push(DeviceLayer {
            input_norm: cut(&p("input_layernorm.weight")),
            wqkv,
            bqkv,
            wo,
            post_norm: cut(&p("post_attention_layernorm.weight")),
            w_gate_up,
            w_down: cut(&p("mlp.down_proj.weight")),
        });
    }
    let head_name = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    Device {
        cfg: plan.device_config(rank).unwrap(),
        embed: cut("model.embed_tokens.weight"),
        layers,
        norm: cut("model.norm.weight"),
        head: cut(head_name),
        shard,
    }
}

/// The all-reduce: the element-wise sum of every device's partial.
fn all_reduce(parts: Vec<Vec<f32>>) -> Vec<f32> {
    let mut sum = vec![0.0f32; parts[0].len()];
    for p in parts {
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    sum
}

/// Logits `[tokens, vocab]` of every position of `ids` (from an empty cache) computed
/// by the devices as a tensor-parallel group would.
fn sharded_forward(cfg: &ModelConfig, devs: &[Device], ids: &[u32]) -> Vec<f32> {
    let (h, d, t) = (cfg.hidden_size, cfg.head_dim, ids.len());
    let positions: Vec<usize> = (0..t).collect();
    let rope = Rope::new(cfg);
    let (cos, sin) = rope.tables(&positions);
    // Vocabulary-parallel embedding: a device writes the rows of its ids, zeros elsewhere.
    let mut x = all_reduce(
        devs.iter()
            .map(|dv| {
                let mut part = vec![0.0f32; t * h];
                for (r, &id) in ids.iter().enumerate() {
                    if dv.shard.vocab.contains(&(id as usize)) {
                        let local = id as usize - dv.shard.vocab.start;
                        part[r * h..(r + 1) * h].copy_from_slice(&dv.embed[local * h..(local + 1) * h]);
                    }
                }
                part
            })
            .collect(),
    );
    for l in 0..cfg.num_layers {
        let attn_parts = devs
            .iter()
            .map(|dv| {
                let (c, w) = (&dv.cfg, &dv.layers[l]);
                let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
                let qkv_w = qd + 2 * kvd;
                let mut xn = vec![0.0f32; t * h];
                rms_norm(&mut xn, &x, &w.input_norm, c.rms_norm_eps);
                let mut qkv = vec![0.0f32; t * qkv_w];
                linear(&mut qkv, &xn, &w.wqkv, t, h, qkv_w, false);
                if let Some(b) = &w.bqkv {
                    for row in qkv.chunks_exact_mut(qkv_w) {
                        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                }
                let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
                for row in qkv.chunks_exact(qkv_w) {
                    q.extend_from_slice(&row[..qd]);
                    k.extend_from_slice(&row[qd..qd + kvd]);
                    v.extend_from_slice(&row[qd + kvd..]);
                }
                rope.apply(&mut q, c.num_heads, &cos, &sin);
                rope.apply(&mut k, c.num_kv_heads, &cos, &sin);
                let mut attn = vec![0.0f32; t * qd];
                let job = AttnJob {
                    q: &q,
                    start: 0,
                    k: &k,
                    v: &v,
                    out_row: 0,
                };
                let shape = AttnShape {
                    heads: c.num_heads,
                    kv_heads: c.num_kv_heads,
                    head_dim: d,
                };
                causal_attention(&mut attn, &[job], shape);
                let mut part = vec![0.0f32; t * h];
                linear(&mut part, &attn, &w.wo, t, qd, h, false);
                part
            })
            .collect();
        x.iter_mut().zip(all_reduce(attn_parts)).for_each(|(x, a)| *x += a);
        let mlp_parts = devs
            .iter()
            .map(|dv| {
                let (c, w) = (&dv.cfg, &dv.layers[l]);
                let inter = c.intermediate_size;
                let mut xn = vec![0.0f32; t * h];
                rms_norm(&mut xn, &x, &w.post_norm, c.rms_norm_eps);
                let mut gate_up = vec![0.0f32; t * 2 * inter];
                linear(&mut gate_up, &xn, &w.w_gate_up, t, h, 2 * inter, false);
                let mut act = vec![0.0f32; t * inter];
                silu_mul(&mut act, &gate_up, inter);
                let mut part = vec![0.0f32; t * h];
                linear(&mut part, &act, &w.w_down, t, inter, h, false);
                part
            })
            .collect();
        x.iter_mut().zip(all_reduce(mlp_parts)).for_each(|(x, m)| *x += m);
    }
    // Vocabulary-parallel head: each device's logits for its ids, concatenated per row.
    let v = cfg.vocab_size;
    let mut logits = vec![0.0f32; t * v];
    for dv in devs {
        let mut xn = vec![0.0f32; t * h];
        rms_norm(&mut xn, &x, &dv.norm, cfg.rms_norm_eps);
        let vl = dv.shard.vocab.len();
        let mut part = vec![0.0f32; t * vl];
        linear(&mut part, &xn, &dv.head, t, h, vl, false);
        for r in 0..t {
            let at = r * v + dv.shard.vocab.start;
            logits[at..at + vl].copy_from_slice(&part[r * vl..(r + 1) * vl]);
        }
    }
    logits
}

/// Token ids that reach every device's part of the vocabulary.
fn prompt(cfg: &ModelConfig) -> Vec<u32> {
    let v = cfg.vocab_size as u32;
    vec![1, v - 1, v / 2, v / 3, 7, v - 2, 2 * v / 3, v / 4 + 1, 3]
}

/// The full model's logits at every position of `ids`.
fn full_logits(cfg: &ModelConfig, src: &dyn TensorSource, ids: &[u32]) -> Vec<f32> {
    let model = CpuModel::new(cfg.clone(), ModelWeights::load(cfg, src, false).unwrap());
    let mut cache = model.new_cache();
    model
        .forward(&mut [SeqInput {
            tokens: ids,
            cache: &mut cache,
            logits: LogitsWanted::All,
        }])
        .unwrap()
        .remove(0)
}

/// Runs `cfg` over each device count in `ns`, comparing with the full model.
fn check(name: &str, cfg: &ModelConfig, ns: &[usize]) {
    let src = SyntheticSource::new(name, cfg, 11);
    let ids = prompt(cfg);
    let want = full_logits(cfg, &src, &ids);
    for &n in ns {
        let plan = ShardPlan::new(cfg, n).unwrap_or_else(|e| panic!("{name} over {n}: {e}"));
        let devs: Vec<Device> = (0..n).map(|r| device(cfg, &plan, r, &src, r)).collect();
        let got = sharded_forward(cfg, &devs, &ids);
        let diff = common::max_rel_diff(&got, &want);
        println!("{name}: {n} device(s), max relative difference {diff:.2e}");
        assert!(
            diff <= TOL,
            "{name} over {n} devices: logits differ by {diff:e} (bound {TOL:e})"
        );
    }
}

#[test]
fn llama_shards_match_the_full_model() {
    check("tiny", &preset("tiny").unwrap(), &[1, 2]);
    check("wide llama", &common::wide_model(Arch::Llama), &[1, 2, 4]);
    // One KV head: only one device; llama3 RoPE scaling and tied embeddings.
    let l3 = preset("tiny-llama3").unwrap();
    check("tiny-llama3", &l3, &[1]);
    assert!(ShardPlan::new(&l3, 2).is_err());
}

#[test]
fn qwen2_shards_with_biases_match_the_full_model() {
    check("tiny-qwen2", &preset("tiny-qwen2").unwrap(), &[1, 2]);
    check("wide qwen2", &common::wide_model(Arch::Qwen2), &[1, 2, 4]);
}

/// SmolLM2-135M's shape (9 query / 3 KV heads, 49152 ids) with 2 of its 30 layers:
/// 3 devices divide it, 2 and 4 do not.
#[test]
fn smollm2_shape_over_three_devices() {
    let cfg = ModelConfig {
        num_layers: 2,
        ..preset("smollm2-135m").unwrap()
    };
    check("smollm2-135m (2 layers)", &cfg, &[1, 3]);
    for n in [2, 4] {
        let e = ShardPlan::new(&cfg, n).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads (9)"), "{e}");
    }
}

/// The control: two devices' o-projection shards swapped. The same comparison must
/// then fail by far, so a passing check means the plan is right.
#[test]
fn a_wrong_plan_fails_the_comparison() {
    let cfg = common::wide_model(Arch::Llama);
    let src = SyntheticSource::new("wide", &cfg, 11);
    let ids = prompt(&cfg);
    let want = full_logits(&cfg, &src, &ids);
    let plan = ShardPlan::new(&cfg, 2).unwrap();
    let devs: Vec<Device> = (0..2).map(|r| device(&cfg, &plan, r, &src, 1 - r)).collect();
    let diff = common::max_rel_diff(&sharded_forward(&cfg, &devs, &ids), &want);
    assert!(diff > 1000.0 * TOL, "swapped o shards still match ({diff:e})");
}
