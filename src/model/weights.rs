//! f32 weight tensors in the Hugging Face layout, loaded from any [`TensorSource`].

use super::config::ModelConfig;
use super::shard::{DeviceShard, TensorShard};
pub use super::tensor::Tensor;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// Anything that can produce a named tensor in the Hugging Face naming and layout
/// (`model.layers.3.self_attn.q_proj.weight`, `[out, in]`), dequantised to f32.
pub trait TensorSource {
    /// Loads `name`, or `Ok(None)` when the source has no such tensor.
    fn load(&self, name: &str) -> Result<Option<Tensor>>;

    /// The shape of `name` (outermost first), or `Ok(None)` when the source has no such
    /// tensor. The default loads the tensor; the file sources read their headers.
    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.load(name)?.map(|t| t.shape))
    }

    /// Loads only `shard` of `name` (what one device of a tensor-parallel group holds),
    /// equal bit for bit to `shard.apply` of the whole tensor, or `Ok(None)` when the
    /// source has no such tensor. A range outside the tensor is an error naming it, its
    /// shape and the range. The default loads the whole tensor and cuts it; the file and
    /// synthetic sources never hold more than the shard (and a row of it).
    fn load_shard(&self, name: &str, shard: &TensorShard) -> Result<Option<Tensor>> {
        let Some(t) = self.load(name)? else {
            return Ok(None);
        };
        shard.shape_in(name, &t.shape).with_context(|| self.describe())?;
        shard.apply(&t).map(Some)
    }

    /// A short description for messages (a path, `synthetic:tiny`, ...).
    fn describe(&self) -> String;
}

/// The weights of one transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm weight before attention, `[hidden]`.
    pub input_norm: Tensor,
    /// Query projection, `[heads·d, hidden]`.
    pub q_proj: Tensor,
    /// Key projection, `[kv_heads·d, hidden]`.
    pub k_proj: Tensor,
    /// Value projection, `[kv_heads·d, hidden]`.
    pub v_proj: Tensor,
    /// Optional q/k/v biases (Qwen2).
    pub qkv_bias: Option<[Tensor; 3]>,
    /// Output projection, `[hidden, heads·d]`.
    pub o_proj: Tensor,
    /// RMSNorm weight before the MLP, `[hidden]`.
    pub post_norm: Tensor,
    /// MLP gate projection, `[inter, hidden]`.
    pub gate_proj: Tensor,
    /// MLP up projection, `[inter, hidden]`.
    pub up_proj: Tensor,
    /// MLP down projection, `[hidden, inter]`.
    pub down_proj: Tensor,
}

/// All the weights of a model.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// Token embedding, `[vocab, hidden]`.
    pub embed: Tensor,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm weight, `[hidden]`.
    pub norm: Tensor,
    /// Output projection `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

/// Tensor names within a block and their shapes as `[rows, cols]` factors of the config.
fn layer_tensors(cfg: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let mut v = vec![
        ("input_layernorm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![qd, h]),
        ("self_attn.k_proj.weight", vec![kvd, h]),
        ("self_attn.v_proj.weight", vec![kvd, h]),
        ("self_attn.o_proj.weight", vec![h, qd]),
        ("post_attention_layernorm.weight", vec![h]),
        ("mlp.gate_proj.weight", vec![i, h]),
        ("mlp.up_proj.weight", vec![i, h]),
        ("mlp.down_proj.weight", vec![h, i]),
    ];
    if cfg.attention_bias {
        v.push(("self_attn.q_proj.bias", vec![qd]));
        v.push(("self_attn.k_proj.bias", vec![kvd]));
        v.push(("self_attn.v_proj.bias", vec![kvd]));
    }
    v
}

/// Every tensor a model of this config holds, with its shape, in file order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_layers {
        for (name, shape) in layer_tensors(cfg) {
            v.push((format!("model.layers.{l}.{name}"), shape));
        }
    }
    v.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    v
}

/// The error of a tensor the config calls for and the source lacks.
fn missing(src: &dyn TensorSource, name: &str) -> String {
    format!("{}: tensor `{name}` is missing", src.describe())
}

/// Loads `name` and checks its shape, with errors naming the tensor and the source.
fn fetch(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = src.load(name)?.with_context(|| missing(src, name))?;
    check_shape(src, name, t, shape)
}

fn check_shape(src: &dyn TensorSource, name: &str, t: Tensor, shape: &[usize]) -> Result<Tensor> {
    shape_matches(src, name, &t.shape, shape)?;
    Ok(t)
}

fn shape_matches(src: &dyn TensorSource, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        bail!(
            "{}: tensor `{name}` has shape {got:?}, the config implies {want:?}",
            src.describe()
        );
    }
    Ok(())
}

/// Device `shard`'s part of `name`, whose whole shape must be `shape` (checked from the
/// source's header before anything is read), or `None` when the source lacks it.
fn fetch_shard(src: &dyn TensorSource, name: &str, shape: &[usize], shard: &DeviceShard) -> Result<Option<Tensor>> {
    let Some(whole) = src.shape(name)? else {
        return Ok(None);
    };
    shape_matches(src, name, &whole, shape)?;
    let part = shard.tensor(name)?;
    let want = part.shape_in(name, shape)?;
    let t = src.load_shard(name, &part)?.with_context(|| missing(src, name))?;
    if t.shape != want {
        bail!(
            "{}: the {part:?} part of tensor `{name}` came back with shape {:?}, not {want:?}",
            src.describe(),
            t.shape
        );
    }
    Ok(Some(t))
}

impl ModelWeights {
    /// Loads every tensor the config calls for, showing a progress bar when `progress`.
    pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, progress: bool) -> Result<Self> {
        Self::assemble(
            cfg,
            src,
            progress,
            || load_embed(cfg, src),
            |l| load_layer(cfg, src, l),
            || load_final_norm(cfg, src),
            || load_lm_head(cfg, src),
        )
    }

    /// The embedding, every layer, the final norm and the head, loaded in that order by
    /// the given functions, with a progress bar over them when `progress`.
    fn assemble(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        progress: bool,
        embed: impl FnOnce() -> Result<Tensor>,
        mut layer: impl FnMut(usize) -> Result<LayerWeights>,
        norm: impl FnOnce() -> Result<Tensor>,
        head: impl FnOnce() -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let bar = loading_bar(src, cfg.num_layers as u64 + 2, progress);
        let embed = embed()?;
        bar.inc(1);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            layers.push(layer(l)?);
            bar.inc(1);
        }
        let norm = norm()?;
        let lm_head = head()?;
        bar.finish_and_clear();
        Ok(ModelWeights {
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// The weights device `shard` of a tensor-parallel group holds, loaded straight into
    /// their shards through [`TensorSource::load_shard`] (the safetensors, GGUF and
    /// synthetic sources never hold a whole split matrix): norms whole, the embedding and the output head by vocabulary rows, q/k/v (and
    /// their biases), gate and up by rows, o and down by columns. `cfg` is the whole
    /// model's config; the result is shaped as
    /// [`super::shard::ShardPlan::device_config`] says for this device.
    pub fn load_shard(cfg: &ModelConfig, src: &dyn TensorSource, shard: &DeviceShard, progress: bool) -> Result<Self> {
        Self::assemble(
            cfg,
            src,
            progress,
            || load_embed_shard(cfg, src, shard),
            |l| load_layer_shard(cfg, src, shard, l),
            || load_final_norm(cfg, src),
            || load_lm_head_shard(cfg, src, shard),
        )
    }
}

/// The progress bar of a weight load of `steps` steps (hidden unless `show`).
pub fn loading_bar(src: &dyn TensorSource, steps: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(steps);
    b.set_style(
        ProgressStyle::with_template("loading {prefix} {bar:40} {pos}/{len} {elapsed}").expect("static template"),
    );
    b.set_prefix(src.describe());
    b
}

/// The token embedding table `[vocab, hidden]`.
pub fn load_embed(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Tensor> {
    fetch(src, "model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])
}

/// Device `shard`'s rows of the token embedding table (its token ids).
pub fn load_embed_shard(cfg: &ModelConfig, src: &dyn TensorSource, shard: &DeviceShard) -> Result<Tensor> {
    let name = "model.embed_tokens.weight";
    fetch_shard(src, name, &[cfg.vocab_size, cfg.hidden_size], shard)?.with_context(|| missing(src, name))
}

/// Device `shard`'s rows of the output head, or `None` when it is tied to the
/// embedding (as [`load_lm_head`]).
pub fn load_lm_head_shard(cfg: &ModelConfig, src: &dyn TensorSource, shard: &DeviceShard) -> Result<Option<Tensor>> {
    if cfg.tie_word_embeddings {
        return Ok(None);
    }
    fetch_shard(src, "lm_head.weight", &[cfg.vocab_size, cfg.hidden_size], shard)
}

/// The final norm's weight `[hidden]`.
pub fn load_final_norm(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Tensor> {
    fetch(src, "model.norm.weight", &[cfg.hidden_size])
}

/// The output head `[vocab, hidden]`, or `None` when it is tied to the embedding.
pub fn load_lm_head(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Option<Tensor>> {
    if cfg.tie_word_embeddings {
        return Ok(None);
    }
    match src.load("lm_head.weight")? {
        // Some checkpoints mark tying only by leaving the head out.
        None => Ok(None),
        Some(t) => Ok(Some(check_shape(
            src,
            "lm_head.weight",
            t,
            &[cfg.vocab_size, cfg.hidden_size],
        )?)),
    }
}

/// The weights of block `l` (loaded one block at a time by backends that upload them).
pub fn load_layer(cfg: &ModelConfig, src: &dyn TensorSource, l: usize) -> Result<LayerWeights> {
    build_layer(cfg, l, |name, shape| fetch(src, name, shape))
}

/// Device `shard`'s part of block `l`, shaped as [`super::shard::ShardPlan::device_config`]
/// says, each tensor loaded through [`TensorSource::load_shard`].
pub fn load_layer_shard(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    shard: &DeviceShard,
    l: usize,
) -> Result<LayerWeights> {
    build_layer(cfg, l, |name, shape| {
        fetch_shard(src, name, shape, shard)?.with_context(|| missing(src, name))
    })
}

/// Block `l` from `get(name, full shape)`, one call per tensor of [`layer_tensors`].
fn build_layer(
    cfg: &ModelConfig,
    l: usize,
    mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
) -> Result<LayerWeights> {
    let mut m = std::collections::HashMap::new();
    for (name, shape) in layer_tensors(cfg) {
        m.insert(name, get(&format!("model.layers.{l}.{name}"), &shape)?);
    }
    let mut take = |name: &str| m.remove(name).expect("listed by layer_tensors");
    let qkv_bias = if cfg.attention_bias {
        Some([
            take("self_attn.q_proj.bias"),
            take("self_attn.k_proj.bias"),
            take("self_attn.v_proj.bias"),
        ])
    } else {
        None
    };
    Ok(LayerWeights {
        input_norm: take("input_layernorm.weight"),
        q_proj: take("self_attn.q_proj.weight"),
        k_proj: take("self_attn.k_proj.weight"),
        v_proj: take("self_attn.v_proj.weight"),
        qkv_bias,
        o_proj: take("self_attn.o_proj.weight"),
        post_norm: take("post_attention_layernorm.weight"),
        gate_proj: take("mlp.gate_proj.weight"),
        up_proj: take("mlp.up_proj.weight"),
        down_proj: take("mlp.down_proj.weight"),
    })
}
