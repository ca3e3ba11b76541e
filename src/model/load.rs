//! Opens a model named on the command line: a Hugging Face directory, a `.gguf` file,
//! or `synthetic:<arch>[@seed]`.

use super::chat::ChatTemplate;
use super::config::ModelConfig;
use super::gguf_model::GgufModel;
use super::safetensors_dir::SafetensorsDir;
use super::synthetic::{self, SyntheticSource};
use super::tokenizer::TextTokenizer;
use super::weights::TensorSource;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A model whose config and tokenizer are read and whose tensors can be loaded.
pub struct OpenedModel {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Where the tensors come from.
    pub source: Box<dyn TensorSource>,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The chat template, when the model has one.
    pub chat_template: Option<ChatTemplate>,
    /// `safetensors`, `gguf` or `synthetic`.
    pub format: &'static str,
    /// Stored element types: type name → (tensor count, bytes).
    pub dtypes: BTreeMap<String, (usize, u64)>,
}

/// Reads `bos_token`/`eos_token` from `tokenizer_config.json`: a string or `{content}`.
fn special_token(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

/// The architecture preset and seed of a `synthetic:<arch>[@seed]` spec, `None` for
/// any other spec.
pub fn synthetic_spec(spec: &str) -> Result<Option<(&str, u64)>> {
    let Some(rest) = spec.strip_prefix("synthetic:") else {
        return Ok(None);
    };
    Ok(Some(match rest.split_once('@') {
        Some((a, s)) => (
            a,
            s.parse::<u64>()
                .with_context(|| format!("bad seed `{s}` in `{spec}`"))?,
        ),
        None => (rest, 0),
    }))
}

/// Opens the model named by `spec`.
pub fn open_model(spec: &str) -> Result<OpenedModel> {
    if let Some((arch, seed)) = synthetic_spec(spec)? {
        let config = synthetic::preset(arch)?;
        let tokenizer = synthetic::synthetic_tokenizer(&config)?;
        let chat = ChatTemplate::new(synthetic::CHATML_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>")?;
        let tensors = super::weights::expected_tensors(&config);
        let n: u64 = tensors.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        let dtypes = BTreeMap::from([("bf16 (generated)".to_string(), (tensors.len(), n * 2))]);
        return Ok(OpenedModel {
            source: Box::new(SyntheticSource::new(spec, &config, seed)),
            config,
            tokenizer,
            chat_template: Some(chat),
            format: "synthetic",
            dtypes,
        });
    }
    let path = Path::new(spec);
    if !path.exists() {
        bail!("model `{spec}` does not exist (expected a model directory, a .gguf file or synthetic:<arch>)");
    }
    if path.is_file() {
        return open_gguf(path);
    }
    open_hf_dir(path)
}

fn open_gguf(path: &Path) -> Result<OpenedModel> {
    let m = GgufModel::open(path)?;
    let config = m.config().clone();
    let tokenizer = m.tokenizer()?;
    let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    let chat_template = match m.chat_template()? {
        Some(src) => Some(
            ChatTemplate::new(
                &src,
                &name(config.bos_token_id),
                &name(config.eos_token_ids.first().copied()),
            )
            .with_context(|| format!("{}: tokenizer.chat_template", path.display()))?,
        ),
        None => None,
    };
    let mut dtypes = BTreeMap::new();
    for t in m.file().tensors() {
        let e = dtypes.entry(t.dtype.name().to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 += t.n_bytes();
    }
    Ok(OpenedModel {
        config,
        source: Box::new(m),
        tokenizer,
        chat_template,
        format: "gguf",
        dtypes,
    })
}

fn open_hf_dir(dir: &Path) -> Result<OpenedModel> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        bail!("{}: no tokenizer.json", dir.display());
    }
    let tokenizer = TextTokenizer::from_file(&tok_path)?;
    let tc_path = dir.join("tokenizer_config.json");
    let chat_template = if tc_path.exists() {
        let text = std::fs::read_to_string(&tc_path).with_context(|| format!("reading {}", tc_path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", tc_path.display()))?;
        match v.get("chat_template").and_then(|t| t.as_str()) {
            Some(src) => Some(
                ChatTemplate::new(
                    src,
                    &special_token(v.get("bos_token")),
                    &special_token(v.get("eos_token")),
                )
                .with_context(|| format!("{}: chat_template", tc_path.display()))?,
            ),
            None => None,
        }
    } else {
        None
    };
    let st = SafetensorsDir::open(dir)?;
    let mut dtypes = BTreeMap::new();
    for (_, dtype, bytes) in st.tensor_summaries() {
        let e = dtypes.entry(dtype).or_insert((0, 0));
        e.0 += 1;
        e.1 += bytes;
    }
    Ok(OpenedModel {
        config,
        source: Box::new(st),
        tokenizer,
        chat_template,
        format: "safetensors",
        dtypes,
    })
}
