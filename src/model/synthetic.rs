//! Random-weight models of real architectures' shapes: in memory (`synthetic:<arch>`)
//! for benchmarks, or written out in the Hugging Face layout by `shadowkv synth`.

use super::config::{Arch, Llama3RopeScaling, ModelConfig};
use super::shard::TensorShard;
use super::tokenizer::{byte_level_bpe_json, ByteLevelBpeSpec, TextTokenizer};
use super::weights::{expected_tensors, Tensor, TensorSource};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Names accepted by [`preset`].
pub const ARCHS: [&str; 12] = [
    "tiny",
    "tiny-llama3",
    "tiny-qwen2",
    "smollm2-135m",
    "llama-2-7b",
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "yi-6b",
    "yi-34b",
    "qwen2-0.5b",
    "qwen2-7b",
];

/// A ChatML template, used for synthetic models.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Special tokens at the start of a synthetic vocabulary, after the 256 byte tokens.
const SPECIALS: [&str; 4] = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"];

#[allow(clippy::too_many_arguments)]
fn shape(arch: Arch, h: usize, i: usize, l: usize, heads: usize, kv: usize, vocab: usize, ctx: usize) -> ModelConfig {
    ModelConfig {
        arch,
        hidden_size: h,
        intermediate_size: i,
        num_layers: l,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: h / heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: ctx,
        tie_word_embeddings: false,
        attention_bias: arch == Arch::Qwen2,
        bos_token_id: Some(256),
        eos_token_ids: vec![257, 259],
    }
}

/// The config of a named architecture preset.
pub fn preset(name: &str) -> Result<ModelConfig> {
    use Arch::*;
    let llama31 = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let cfg = match name {
        "tiny" => shape(Llama, 64, 160, 2, 4, 2, 512, 4096),
        "tiny-llama3" => ModelConfig {
            rope_theta: 500000.0,
            // A short original context so the scaling changes real frequencies.
            rope_scaling: Some(Llama3RopeScaling {
                original_max_position_embeddings: 256,
                ..llama31
            }),
            tie_word_embeddings: true,
            ..shape(Llama, 64, 160, 2, 4, 1, 512, 4096)
        },
        "tiny-qwen2" => ModelConfig {
            rope_theta: 1000000.0,
            tie_word_embeddings: true,
            ..shape(Qwen2, 96, 224, 2, 6, 2, 640, 4096)
        },
        "smollm2-135m" => ModelConfig {
            rope_theta: 100000.0,
            tie_word_embeddings: true,
            ..shape(Llama, 576, 1536, 30, 9, 3, 49152, 8192)
        },
        "llama-2-7b" => shape(Llama, 4096, 11008, 32, 32, 32, 32000, 4096),
        "llama-3-8b" => ModelConfig {
            rope_theta: 500000.0,
            ..shape(Llama, 4096, 14336, 32, 32, 8, 128256, 8192)
        },
        "llama-3.1-8b" => ModelConfig {
            rope_theta: 500000.0,
            rope_scaling: Some(llama31),
            ..shape(Llama, 4096, 14336, 32, 32, 8, 128256, 131072)
        },
        // 141 GB of bf16 weights: more than one GPU holds (`--devices 0,1`).
        "llama-3.1-70b" => ModelConfig {
            rope_theta: 500000.0,
            rope_scaling: Some(llama31),
            ..shape(Llama, 8192, 28672, 80, 64, 8, 128256, 131072)
        },
        "yi-6b" => ModelConfig {
            rope_theta: 5000000.0,
            ..shape(Llama, 4096, 11008, 32, 32, 4, 64000, 200000)
        },
        "yi-34b" => ModelConfig {
            rope_theta: 5000000.0,
            ..shape(Llama, 7168, 20480, 60, 56, 8, 64000, 200000)
        },
        "qwen2-0.5b" => ModelConfig {
            rope_theta: 1000000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            ..shape(Qwen2, 896, 4864, 24, 14, 2, 151936, 32768)
        },
        "qwen2-7b" => ModelConfig {
            rope_theta: 1000000.0,
            rms_norm_eps: 1e-6,
            ..shape(Qwen2, 3584, 18944, 28, 28, 4, 152064, 131072)
        },
        other => bail!("unknown synthetic architecture `{other}` (known: {})", ARCHS.join(", ")),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Deterministic random weights for a config, generated tensor by tensor on demand.
/// Values are rounded to bf16 so a bf16 checkpoint written by [`write_hf`] loads back
/// bit-identical.
pub struct SyntheticSource {
    name: String,
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
}

impl SyntheticSource {
    /// Weights of `cfg` from `seed`; `name` labels messages.
    pub fn new(name: &str, cfg: &ModelConfig, seed: u64) -> Self {
        SyntheticSource {
            name: name.into(),
            shapes: expected_tensors(cfg).into_iter().collect(),
            seed,
        }
    }
}

/// FNV-1a, to derive a stable per-tensor seed from its name.
fn name_hash(s: &str) -> u64 {
    s.bytes()
        .fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

impl SyntheticSource {
    /// The values of tensor `name` of `shape`, in row-major order, as one stream from
    /// the tensor's own seeded generator.
    fn values(&self, name: &str, shape: &[usize]) -> Result<impl Iterator<Item = f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ name_hash(name));
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        let normal = if name.ends_with("norm.weight") {
            None
        } else {
            let fan_in = *shape.last().expect("non-empty shape");
            let std = if name.ends_with(".bias") {
                0.02
            } else {
                1.0 / (fan_in as f32).sqrt()
            };
            Some(Normal::new(0.0f32, std).context("normal distribution")?)
        };
        Ok(std::iter::repeat_with(move || match &normal {
            None => round(1.0 + rng.random_range(-0.1..0.1)),
            Some(dist) => round(dist.sample(&mut rng)),
        }))
    }
}

impl TensorSource for SyntheticSource {
    fn load(&self, name: &str) -> Result<Option<Tensor>> {
        self.load_shard(name, &TensorShard::Whole)
    }

    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.shapes.get(name).cloned())
    }

    /// Keeps only the shard's values of the tensor's one random stream, so a shard is
    /// bit-identical to the same part of the whole tensor and only the shard is held.
    /// The stream is sequential (a normal sample takes a varying number of draws), so
    /// a row range stops after its last row and a column range runs the whole tensor.
    fn load_shard(&self, name: &str, shard: &TensorShard) -> Result<Option<Tensor>> {
        let Some(shape) = self.shapes.get(name) else {
            return Ok(None);
        };
        let part = shard.shape_in(name, shape).with_context(|| self.describe())?;
        let values = self.values(name, shape)?;
        let n: usize = shape.iter().product();
        let cols = if shape.len() > 1 {
            shape[1..].iter().product()
        } else {
            1
        };
        let mut data = Vec::with_capacity(part.iter().product());
        match shard {
            TensorShard::Whole => data.extend(values.take(n)),
            TensorShard::Rows(r) => data.extend(values.skip(r.start * cols).take(r.len() * cols)),
            TensorShard::Cols(c) => data.extend(
                values
                    .take(n)
                    .enumerate()
                    .filter(|(i, _)| c.contains(&(i % cols)))
                    .map(|(_, x)| x),
            ),
        }
        Ok(Some(Tensor { shape: part, data }))
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// GPT-2's reversible byte → printable-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid code point")
            }
        })
        .collect()
}

/// The tokenizer of a synthetic model: the 256 byte tokens, a few special tokens, then
/// reserved tokens up to the vocabulary size.
pub fn synthetic_tokenizer_json(cfg: &ModelConfig) -> Result<serde_json::Value> {
    if cfg.vocab_size < 256 + SPECIALS.len() {
        bail!("a synthetic vocabulary needs at least {} ids", 256 + SPECIALS.len());
    }
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    let reserved = cfg.vocab_size - tokens.len();
    tokens.extend((0..reserved).map(|i| format!("<|reserved_{i}|>")));
    let added: Vec<(u32, bool)> = (256..256 + SPECIALS.len() as u32).map(|i| (i, true)).collect();
    byte_level_bpe_json(&ByteLevelBpeSpec {
        tokens: &tokens,
        merges: &[],
        added: &added,
        pre: "gpt2",
        bos: cfg.bos_token_id,
    })
}

/// The tokenizer of a synthetic model, built in memory.
pub fn synthetic_tokenizer(cfg: &ModelConfig) -> Result<TextTokenizer> {
    TextTokenizer::from_json(&synthetic_tokenizer_json(cfg)?)
}

/// The `config.json` document of a config.
pub fn hf_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let arch_class = match cfg.arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
    };
    let rope_scaling = cfg.rope_scaling.map(|s| {
        json!({"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings})
    });
    json!({
        "architectures": [arch_class],
        "model_type": cfg.arch.name(),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "torch_dtype": "bfloat16",
    })
}

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDtype {
    /// bfloat16 (exact for synthetic weights).
    Bf16,
    /// IEEE half precision.
    F16,
    /// single precision.
    F32,
}

fn encode(data: &[f32], dtype: WriteDtype) -> (safetensors::Dtype, Vec<u8>) {
    match dtype {
        WriteDtype::Bf16 => (
            safetensors::Dtype::BF16,
            data.iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        WriteDtype::F16 => (
            safetensors::Dtype::F16,
            data.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        ),
        WriteDtype::F32 => (
            safetensors::Dtype::F32,
            data.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        ),
    }
}

/// One tensor encoded for a safetensors file.
struct Encoded {
    name: String,
    shape: Vec<usize>,
    dtype: safetensors::Dtype,
    bytes: Vec<u8>,
}

/// Writes `shard-{idx}.safetensors` (its path added to `made` first) and returns the
/// names it holds.
fn write_shard(dir: &Path, idx: usize, tensors: Vec<Encoded>, made: &mut Vec<PathBuf>) -> Result<Vec<String>> {
    let path = dir.join(format!("shard-{idx:05}.safetensors"));
    made.push(path.clone());
    let views = tensors
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    safetensors::serialize_to_file(views, None, &path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(tensors.into_iter().map(|t| t.name).collect())
}

/// Writes a complete Hugging Face model directory for `cfg` with weights from `src`:
/// config.json, tokenizer.json, tokenizer_config.json (ChatML template) and
/// safetensors, split into shards of at most `shard_bytes` (plus an index) when larger.
/// config.json comes last, and a write that fails (a full disk) removes the files it
/// made, so the folder never looks like a model it is not.
pub fn write_hf(
    dir: &Path,
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    dtype: WriteDtype,
    shard_bytes: usize,
    on_tensor: impl FnMut(&str),
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut made = Vec::new();
    let written = write_files(dir, cfg, src, dtype, shard_bytes, on_tensor, &mut made);
    if written.is_err() {
        for p in &made {
            let _ = std::fs::remove_file(p);
        }
    }
    written.context("the files written so far were removed")
}

/// [`write_hf`]'s files, each path added to `made` before it is written.
fn write_files(
    dir: &Path,
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    dtype: WriteDtype,
    shard_bytes: usize,
    mut on_tensor: impl FnMut(&str),
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let write_json = |name: &str, v: &serde_json::Value, made: &mut Vec<PathBuf>| -> Result<()> {
        let p = dir.join(name);
        made.push(p.clone());
        std::fs::write(&p, serde_json::to_string_pretty(v)?).with_context(|| format!("writing {}", p.display()))
    };
    write_json("tokenizer.json", &synthetic_tokenizer_json(cfg)?, made)?;
    write_json(
        "tokenizer_config.json",
        &json!({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": CHATML_TEMPLATE}),
        made,
    )?;
    // Tensors go to numbered shards, each flushed once the next tensor would overflow it.
    let mut pending: Vec<Encoded> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut written: Vec<Vec<String>> = Vec::new();
    for (name, _) in expected_tensors(cfg) {
        let t = src
            .load(&name)?
            .with_context(|| format!("{}: no tensor `{name}`", src.describe()))?;
        let (dtype, bytes) = encode(&t.data, dtype);
        if pending_bytes + bytes.len() > shard_bytes && !pending.is_empty() {
            written.push(write_shard(dir, written.len(), std::mem::take(&mut pending), made)?);
            pending_bytes = 0;
        }
        pending_bytes += bytes.len();
        pending.push(Encoded {
            name: name.clone(),
            shape: t.shape,
            dtype,
            bytes,
        });
        on_tensor(&name);
    }
    written.push(write_shard(dir, written.len(), pending, made)?);
    let count = written.len();
    let final_name = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (i, names) in written.iter().enumerate() {
        let from = dir.join(format!("shard-{i:05}.safetensors"));
        let to = dir.join(final_name(i));
        made.push(to.clone());
        std::fs::rename(&from, &to).with_context(|| format!("renaming {}", from.display()))?;
        for n in names {
            weight_map.insert(n.clone(), json!(final_name(i)));
        }
    }
    if count > 1 {
        write_json(
            "model.safetensors.index.json",
            &json!({"metadata": {}, "weight_map": weight_map}),
            made,
        )?;
    }
    write_json("config.json", &hf_config_json(cfg), made)
}
