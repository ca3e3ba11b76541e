//! Broken model files and configs give errors that name the problem, never panics.

mod common;

use shadowkv::model::config::ModelConfig;
use shadowkv::model::load::open_model;
use shadowkv::model::synthetic::{preset, write_hf, SyntheticSource, WriteDtype};
use shadowkv::model::weights::ModelWeights;
use std::path::Path;

fn write_tiny(dir: &Path) {
    let cfg = preset("tiny").unwrap();
    write_hf(
        dir,
        &cfg,
        &SyntheticSource::new("tiny", &cfg, 1),
        WriteDtype::Bf16,
        usize::MAX,
        |_| {},
    )
    .unwrap();
}

/// Opens and fully loads a model, returning the error text.
fn load_err(dir: &Path) -> String {
    let r = open_model(dir.to_str().unwrap()).and_then(|m| ModelWeights::load(&m.config, m.source.as_ref(), false));
    format!("{:#}", r.expect_err("loading should fail"))
}

fn patch_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    for cut in [0, 5, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
    }
}

#[test]
fn huge_header_length_and_garbage_header() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    let f = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    assert!(load_err(dir.path()).contains("invalid safetensors"));
    bytes[..8].copy_from_slice(&16u64.to_le_bytes());
    bytes[8..24].copy_from_slice(b"{not json at all");
    std::fs::write(&f, &bytes).unwrap();
    assert!(load_err(dir.path()).contains("invalid safetensors"));
}

#[test]
fn wrong_shape_missing_tensor_and_bad_dtype_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    // The config promises a wider model than the file holds.
    patch_json(&dir.path().join("config.json"), |v| v["intermediate_size"] = 320.into());
    let e = load_err(dir.path());
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("shape"), "{e}");
    // The config promises more layers than the file holds.
    patch_json(&dir.path().join("config.json"), |v| {
        v["intermediate_size"] = 160.into();
        v["num_hidden_layers"] = 3.into();
    });
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.2") && e.contains("missing"), "{e}");
    // A tensor stored as a type the loader does not read.
    let dir2 = tempfile::tempdir().unwrap();
    let data = vec![0u8; 64 * 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![64], &data).unwrap();
    safetensors::serialize_to_file(
        vec![("model.embed_tokens.weight", view)],
        None,
        &dir2.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(dir.path().join("config.json"), dir2.path().join("config.json")).unwrap();
    std::fs::copy(dir.path().join("tokenizer.json"), dir2.path().join("tokenizer.json")).unwrap();
    let e = load_err(dir2.path());
    assert!(e.contains("I64") && e.contains("model.embed_tokens.weight"), "{e}");
}

#[test]
fn shard_index_problems() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../../etc/passwd"}}"#,
    )
    .unwrap();
    assert!(load_err(dir.path()).contains("leaves the directory"));
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "nope.safetensors"}}"#,
    )
    .unwrap();
    assert!(load_err(dir.path()).contains("nope.safetensors"));
    std::fs::write(dir.path().join("model.safetensors.index.json"), "[1,2").unwrap();
    assert!(load_err(dir.path()).contains("index"));
}

#[test]
fn configs_that_cannot_run() {
    let base = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100});
    assert!(ModelConfig::from_hf_json(&base.to_string()).is_ok());
    let cases: [(&str, serde_json::Value, &str); 7] = [
        ("model_type", "gpt_neox".into(), "unsupported architecture `gpt_neox`"),
        ("max_position_embeddings", 1.into(), "max_position_embeddings"),
        ("num_key_value_heads", 3.into(), "not a multiple"),
        ("hidden_size", 0.into(), "hidden_size"),
        ("vocab_size", (1u64 << 40).into(), "vocab_size"),
        ("num_attention_heads", "four".into(), "num_attention_heads"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
    ];
    for (key, value, want) in cases {
        let mut v = base.clone();
        v[key] = value;
        let e = format!("{:#}", ModelConfig::from_hf_json(&v.to_string()).unwrap_err());
        assert!(e.contains(want), "{key}: {e}");
    }
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("hidden_size");
    let e = format!("{:#}", ModelConfig::from_hf_json(&v.to_string()).unwrap_err());
    assert!(e.contains("hidden_size"), "{e}");
}

#[test]
fn missing_paths_and_unknown_synthetic_archs() {
    let e = format!("{:#}", open_model("/no/such/model").err().unwrap());
    assert!(e.contains("does not exist"), "{e}");
    let e = format!("{:#}", open_model("synthetic:gpt-5").err().unwrap());
    assert!(e.contains("unknown synthetic architecture `gpt-5`"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = format!("{:#}", open_model(dir.path().to_str().unwrap()).err().unwrap());
    assert!(e.contains("config.json"), "{e}");
}
