//! A Llama-family GGUF file as a model: config from its metadata, tensors renamed to
//! the Hugging Face layout (Q/K rows un-permuted), tokenizer and chat template.

use super::config::{Arch, Llama3RopeScaling, ModelConfig};
use super::gguf::GgufFile;
use super::shard::TensorShard;
use super::tokenizer::{byte_level_bpe_json, ByteLevelBpeSpec, TextTokenizer};
use super::weights::{Tensor, TensorSource};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;

/// A GGUF file serving tensors under Hugging Face names.
pub struct GgufModel {
    file: GgufFile,
    path: String,
    config: ModelConfig,
}

/// GGUF tensor name (within a block) for each Hugging Face name.
const LAYER_NAMES: [(&str, &str); 12] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Maps a Hugging Face tensor name to its GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == tail)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The GGUF row holding Hugging Face row `hf` of a Q or K weight: llama.cpp's rotary
/// permutation puts Hugging Face row `h·d + t·d/2 + j` at GGUF row `h·d + 2j + t`, and
/// keeps every row within its head.
fn gguf_row(hf: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (h, within) = (hf / head_dim, hf % head_dim);
    let (t, j) = (within / half, within % half);
    h * head_dim + 2 * j + t
}

/// Undoes llama.cpp's rotary permutation of Q/K rows (see [`gguf_row`]) for `rows`
/// whole heads' rows.
fn unpermute_rows(data: &[f32], rows: usize, cols: usize, head_dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    for hf in 0..rows {
        let g = gguf_row(hf, head_dim);
        out.extend_from_slice(&data[g * cols..(g + 1) * cols]);
    }
    out
}

impl GgufModel {
    /// Opens a GGUF file and reads the model config from its metadata.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let p = path.display().to_string();
        let config = config_from_metadata(&file).with_context(|| format!("{p}: metadata"))?;
        Ok(GgufModel { file, path: p, config })
    }

    /// The model config from the metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Builds the tokenizer from `tokenizer.ggml.*`.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        let f = &self.file;
        let ctx = || format!("{}: tokenizer metadata", self.path);
        let model = f.get_str("tokenizer.ggml.model").with_context(ctx)?.unwrap_or("");
        if model != "gpt2" {
            bail!(
                "{}: tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)",
                self.path
            );
        }
        let tokens: Vec<String> = f
            .get_str_array("tokenizer.ggml.tokens")
            .with_context(ctx)?
            .with_context(|| format!("{}: tokenizer.ggml.tokens is missing", self.path))?
            .into_iter()
            .map(String::from)
            .collect();
        let merges: Vec<String> = f
            .get_str_array("tokenizer.ggml.merges")
            .with_context(ctx)?
            .unwrap_or_default()
            .into_iter()
            .map(String::from)
            .collect();
        let types: Vec<u64> = match f.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        // 3 = control (special), 4 = user-defined: both are matched verbatim.
        let added: Vec<(u32, bool)> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| (i as u32, t == 3))
            .collect();
        let pre = f.get_str("tokenizer.ggml.pre").with_context(ctx)?.unwrap_or("default");
        let add_bos = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let bos = if add_bos { self.config.bos_token_id } else { None };
        let doc = byte_level_bpe_json(&ByteLevelBpeSpec {
            tokens: &tokens,
            merges: &merges,
            added: &added,
            pre,
            bos,
        })
        .with_context(|| format!("{}: tokenizer", self.path))?;
        TextTokenizer::from_json(&doc).with_context(|| format!("{}: tokenizer", self.path))
    }

    /// The chat template, if the file carries one.
    pub fn chat_template(&self) -> Result<Option<String>> {
        Ok(self.file.get_str("tokenizer.chat_template")?.map(String::from))
    }
}

fn config_from_metadata(f: &GgufFile) -> Result<ModelConfig> {
    let arch = f
        .get_str("general.architecture")?
        .context("general.architecture is missing")?;
    let arch = match arch {
        "llama" => Arch::Llama,
        other => bail!("unsupported GGUF architecture `{other}` (supported: llama)"),
    };
    let key = |k: &str| format!("llama.{k}");
    let req = |k: &str| -> Result<usize> {
        let v = f.get_u64(&key(k))?.with_context(|| format!("{} is missing", key(k)))?;
        usize::try_from(v).with_context(|| format!("{} = {v} is too large", key(k)))
    };
    let hidden = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    let kv_heads = f
        .get_u64(&key("attention.head_count_kv"))?
        .map(|v| v as usize)
        .unwrap_or(heads);
    let head_dim = match f.get_u64(&key("rope.dimension_count"))? {
        Some(v) => v as usize,
        None => hidden / heads.max(1),
    };
    let vocab = match f.get_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => f
            .get_str_array("tokenizer.ggml.tokens")?
            .map(|t| t.len())
            .context("neither llama.vocab_size nor tokenizer.ggml.tokens is present")?,
    };
    let rope_scaling = match f.get_str(&key("rope.scaling.type"))? {
        Some("llama3") => Some(Llama3RopeScaling {
            factor: f.get_f64(&key("rope.scaling.factor"))?.unwrap_or(8.0) as f32,
            low_freq_factor: f.get_f64(&key("rope.scaling.low_freq_factor"))?.unwrap_or(1.0) as f32,
            high_freq_factor: f.get_f64(&key("rope.scaling.high_freq_factor"))?.unwrap_or(4.0) as f32,
            original_max_position_embeddings: f.get_u64(&key("rope.scaling.original_context_length"))?.unwrap_or(8192)
                as usize,
        }),
        Some("none") | None => None,
        Some(other) => bail!("unsupported rope scaling `{other}`"),
    };
    let eos: Vec<u32> = f
        .get_u64("tokenizer.ggml.eos_token_id")?
        .map(|v| v as u32)
        .into_iter()
        .collect();
    let cfg = ModelConfig {
        arch,
        hidden_size: hidden,
        intermediate_size: req("feed_forward_length")?,
        num_layers: req("block_count")?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32,
        rope_theta: f.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: req("context_length")?,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        attention_bias: false,
        bos_token_id: f.get_u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_ids: eos,
    };
    cfg.validate()?;
    Ok(cfg)
}

impl GgufModel {
    /// The GGUF name, Hugging Face shape and whether the rows are rotary-permuted of
    /// Hugging Face tensor `name`, or `None` when the file lacks it.
    fn locate(&self, name: &str) -> Result<Option<(String, Vec<usize>, bool)>> {
        let Some(gname) = gguf_name(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&gname) else {
            return Ok(None);
        };
        // GGUF lists dims innermost first; Hugging Face outermost first.
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let d = self.config.head_dim;
        let permuted = gname.ends_with("attn_q.weight") || gname.ends_with("attn_k.weight");
        if permuted && (shape.len() != 2 || shape[0] % d != 0) {
            bail!(
                "{}: tensor `{gname}` has shape {shape:?}, not [heads·{d}, hidden]",
                self.path
            );
        }
        Ok(Some((gname, shape, permuted)))
    }
}

impl TensorSource for GgufModel {
    fn load(&self, name: &str) -> Result<Option<Tensor>> {
        let Some((gname, shape, permuted)) = self.locate(name)? else {
            return Ok(None);
        };
        let mut data = self.file.dequantize(&gname)?;
        if permuted {
            data = unpermute_rows(&data, shape[0], shape[1], self.config.head_dim);
        }
        Ok(Some(Tensor { shape, data }))
    }

    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.locate(name)?.map(|(_, shape, _)| shape))
    }

    /// Dequantises only the shard's rows of blocks: a row range reads those rows (the
    /// whole heads around them for a rotary-permuted Q/K); a column range dequantises
    /// one row at a time per thread and keeps its columns. Vectors are read whole.
    fn load_shard(&self, name: &str, shard: &TensorShard) -> Result<Option<Tensor>> {
        let Some((gname, shape, permuted)) = self.locate(name)? else {
            return Ok(None);
        };
        let part = shard.shape_in(name, &shape).with_context(|| self.path.clone())?;
        let d = self.config.head_dim;
        let data = match shard {
            TensorShard::Rows(r) if shape.len() == 2 => {
                let cols = shape[1];
                let (lo, hi) = if permuted {
                    (r.start / d * d, r.end.div_ceil(d) * d)
                } else {
                    (r.start, r.end)
                };
                let mut rows = self.file.dequantize_rows(&gname, lo..hi)?;
                if permuted {
                    rows = unpermute_rows(&rows, hi - lo, cols, d);
                }
                rows.truncate((r.end - lo) * cols);
                rows.drain(..(r.start - lo) * cols);
                rows
            }
            TensorShard::Cols(c) if !c.is_empty() => {
                let mut out = vec![0.0f32; part.iter().product()];
                out.par_chunks_mut(c.len())
                    .enumerate()
                    .try_for_each(|(hf, dst)| -> Result<()> {
                        let g = if permuted { gguf_row(hf, d) } else { hf };
                        let row = self.file.dequantize_rows(&gname, g..g + 1)?;
                        dst.copy_from_slice(&row[c.clone()]);
                        Ok(())
                    })?;
                out
            }
            TensorShard::Cols(_) => Vec::new(),
            // Whole tensors, and vectors (one GGUF row each).
            TensorShard::Whole | TensorShard::Rows(_) => {
                let whole = self
                    .load(name)?
                    .with_context(|| format!("{}: tensor `{name}` is missing", self.path))?;
                match shard {
                    TensorShard::Whole => whole.data,
                    _ => shard.apply(&whole)?.data,
                }
            }
        };
        Ok(Some(Tensor { shape: part, data }))
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            gguf_name("model.layers.7.self_attn.k_proj.weight").unwrap(),
            "blk.7.attn_k.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert!(gguf_name("model.layers.x.mlp.down_proj.weight").is_none());
        assert!(gguf_name("something.else").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Permute as llama.cpp's converter does, then check we get the original back.
        let (heads, d, cols) = (3, 8, 5);
        let rows = heads * d;
        let orig: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut perm = vec![0.0; orig.len()];
        for h in 0..heads {
            for t in 0..2 {
                for j in 0..d / 2 {
                    let src = h * d + t * d / 2 + j;
                    let dst = h * d + 2 * j + t;
                    perm[dst * cols..(dst + 1) * cols].copy_from_slice(&orig[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&perm, rows, cols, d), orig);
    }
}
