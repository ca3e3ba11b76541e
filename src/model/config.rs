//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The transformer families the engine runs. Yi uses the Llama architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3/3.1, Yi, SmolLM: no attention biases.
    Llama,
    /// Qwen2: biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    /// The name used in `config.json`'s `model_type` and GGUF's `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Llama-3.1 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall wavelength scale factor (8 for Llama-3.1).
    pub factor: f32,
    /// Wavelengths above `original_max / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f32,
    /// Wavelengths below `original_max / high_freq_factor` are left alone.
    pub high_freq_factor: f32,
    /// The context the base model was trained at.
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_heads: usize,
    /// Key/value heads per layer (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Dimension of one attention head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Optional llama3 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct RawHfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<RawRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading model config {}", path.display()))?;
        Self::from_hf_json(&text).with_context(|| format!("in model config {}", path.display()))
    }

    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawHfConfig = serde_path_to_error::deserialize(de).map_err(|e| match e.path().to_string() {
            p if p == "." => anyhow::anyhow!("config.json is not valid: {}", e.inner()),
            p => anyhow::anyhow!("config.json field `{p}`: {}", e.inner()),
        })?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = match model_type.as_str() {
            "llama" | "yi" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "" => match raw.architectures.as_deref().and_then(|a| a.first()).map(String::as_str) {
                Some("LlamaForCausalLM") | Some("YiForCausalLM") => Arch::Llama,
                Some("Qwen2ForCausalLM") => Arch::Qwen2,
                Some(other) => bail!("unsupported architecture `{other}` (supported: llama, yi, qwen2)"),
                None => bail!("config.json names no `model_type` or `architectures`"),
            },
            other => bail!("unsupported architecture `{other}` (supported: llama, yi, qwen2)"),
        };
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(s) => match s.rope_type.as_deref() {
                Some("llama3") => Some(Llama3RopeScaling {
                    factor: s.factor.context("rope_scaling.factor is missing")?,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
                }),
                Some("default") | None => None,
                Some(other) => bail!("unsupported rope_scaling type `{other}` (supported: llama3)"),
            },
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let ids = |v: Option<OneOrMany>| match v {
            None => vec![],
            Some(OneOrMany::One(x)) => vec![x],
            Some(OneOrMany::Many(x)) => x,
        };
        let cfg = ModelConfig {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: ids(raw.bos_token_id).first().copied(),
            eos_token_ids: ids(raw.eos_token_id),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects shapes the forward pass cannot run, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        const LIMIT: usize = 1 << 20;
        let fields = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in fields {
            if v == 0 || v > LIMIT {
                bail!("{name} = {v} is out of range (1..={LIMIT})");
            }
        }
        if self.max_position_embeddings < 2 {
            bail!(
                "max_position_embeddings (the context length) = {} leaves no room for a prompt and a token",
                self.max_position_embeddings
            );
        }
        if self.num_heads % self.num_kv_heads != 0 {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim % 2 != 0 {
            bail!("head_dim ({}) must be even for rotary embeddings", self.head_dim);
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            bail!("rms_norm_eps and rope_theta must be positive");
        }
        Ok(())
    }

    /// Bytes of K and V cache one token occupies across all layers at `bytes_per_elem`.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = h * self.num_heads * d;
        let kv = 2 * h * self.num_kv_heads * d;
        let o = self.num_heads * d * h;
        let bias = if self.attention_bias {
            (self.num_heads + 2 * self.num_kv_heads) * d
        } else {
            0
        };
        let per_layer = q + kv + o + bias + 3 * h * i + 2 * h;
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + h + self.num_layers * per_layer
    }
}
