//! Text ↔ token ids through the `tokenizers` crate, from a `tokenizer.json` file or
//! from the byte-level BPE vocabulary embedded in a GGUF file.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// A tokenizer plus the ids the engine needs to know about.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

/// Pre-tokenizer regex of Llama 3 (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Pre-tokenizer regex of Qwen2 (`tokenizer.ggml.pre = qwen2`): digits one by one.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Describes a byte-level BPE tokenizer well enough to write its `tokenizer.json`.
pub struct ByteLevelBpeSpec<'a> {
    /// Token strings in id order, byte-level encoded (`Ġ` for a space).
    pub tokens: &'a [String],
    /// Merge rules as `"left right"`, highest priority first.
    pub merges: &'a [String],
    /// Ids of tokens matched verbatim before BPE (control and user-defined tokens),
    /// with whether each is a special token.
    pub added: &'a [(u32, bool)],
    /// The pre-tokenizer family, as GGUF's `tokenizer.ggml.pre` names it.
    pub pre: &'a str,
    /// Token prepended by `encode(.., add_special_tokens = true)`, if any.
    pub bos: Option<u32>,
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// Builds the `tokenizer.json` document for a byte-level BPE tokenizer.
pub fn byte_level_bpe_json(spec: &ByteLevelBpeSpec) -> Result<Value> {
    let pre_tokenizer = match spec.pre {
        "gpt2" | "default" | "" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_SPLIT), byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_SPLIT), byte_level(false)]}),
        other => bail!("unsupported pre-tokenizer `{other}` (supported: gpt2, smollm, starcoder, llama-bpe, qwen2)"),
    };
    let mut vocab = serde_json::Map::with_capacity(spec.tokens.len());
    for (id, tok) in spec.tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
    }
    let mut added = Vec::new();
    for &(id, special) in spec.added {
        let content = spec
            .tokens
            .get(id as usize)
            .with_context(|| format!("added token id {id} is outside the vocabulary"))?;
        added.push(
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special}),
        );
    }
    let post_processor = match spec.bos {
        Some(id) => {
            let tok = spec
                .tokens
                .get(id as usize)
                .context("bos token id is outside the vocabulary")?;
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tok.clone(): {"id": tok, "ids": [id], "tokens": [tok]}}})
        }
        None => byte_level(true),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(true),
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": matches!(spec.pre, "llama-bpe" | "llama3"),
            "vocab": vocab, "merges": spec.merges},
    }))
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(TextTokenizer { inner })
    }

    /// Builds a tokenizer from a `tokenizer.json` document.
    pub fn from_json(doc: &Value) -> Result<Self> {
        let text = serde_json::to_string(doc)?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| anyhow!("invalid tokenizer definition: {e}"))?;
        Ok(TextTokenizer { inner })
    }

    /// Writes the tokenizer as `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))
    }

    /// Token ids of `text`; `add_special_tokens` adds the model's BOS where it uses one.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// The id of a token string, added tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
