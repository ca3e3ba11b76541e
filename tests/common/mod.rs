//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gpu_check;

use serde_json::Value;
use shadowkv::model::config::{Arch, ModelConfig};
use shadowkv::model::synthetic::preset;
use std::path::PathBuf;

/// A small model of architecture `arch` with 8 query and 4 KV heads (so 1, 2 and 4
/// tensor-parallel devices) and a vocabulary that leaves a remainder on the last device.
pub fn wide_model(arch: Arch) -> ModelConfig {
    ModelConfig {
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 16,
        hidden_size: 128,
        intermediate_size: 256,
        vocab_size: 517,
        tie_word_embeddings: false,
        attention_bias: arch == Arch::Qwen2,
        arch,
        ..preset("tiny").unwrap()
    }
}

/// The SmolLM2 test model: `$SHADOWKV_TEST_MODEL`, else the `tools/fetch-model` cache.
/// Fails (never skips) when it is absent: `tools/test` and CI fetch it.
pub fn test_model() -> PathBuf {
    let p = match std::env::var_os("SHADOWKV_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            let cache = std::env::var_os("SHADOWKV_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(home).join(".cache/shadowkv"));
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        p.exists(),
        "test model {} is missing: run tools/fetch-model (tools/test does)",
        p.display()
    );
    p
}

/// The Python interpreter the tests run: `$SHADOWKV_PYTHON` (`tools/test` sets it to the
/// project's environment from `tools/python-env`), else `python3` from `PATH`.
pub fn python() -> String {
    std::env::var("SHADOWKV_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// What to do when [`python`] lacks a package the tests need.
pub const PYTHON_HINT: &str =
    "run the tests with tools/test, or set SHADOWKV_PYTHON=\"$(tools/python-env)\" (the project's Python \
     environment with tools/reference/requirements.txt)";

/// Says that the running test skips, and why, and records it for the summary of
/// `tools/test` (which counts skips apart from passes).
pub fn skip(why: &str) {
    eprintln!("skipped: {why}");
    shadowkv::cuda::testing::record_skip(why);
}

/// Path of a file under the repository root: `$SHADOWKV_REPO` (tools/gpu-check sets
/// it where test binaries run away from the tree they were built in), else the
/// working directory when it holds the file (`cargo test` runs tests from the
/// repository root), else the root the tests were built from.
pub fn repo_file(rel: &str) -> PathBuf {
    if let Some(root) = std::env::var_os("SHADOWKV_REPO") {
        return PathBuf::from(root).join(rel);
    }
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Largest relative difference between two slices, scaled by the larger magnitude.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().chain(b).fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// The golden outputs of transformers on SmolLM2 (`tests/golden/smollm2.json`).
pub fn golden() -> Value {
    let text = std::fs::read_to_string(repo_file("tests/golden/smollm2.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The top-2 margin (largest minus second-largest) of each row of `logits` (`rows × vocab`).
pub fn top2_margins(logits: &[f32], vocab: usize) -> Vec<f32> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut top = [f32::NEG_INFINITY; 2];
            for &x in row {
                if x > top[0] {
                    top = [x, top[0]];
                } else if x > top[1] {
                    top[1] = x;
                }
            }
            top[0] - top[1]
        })
        .collect()
}

/// The prompt's last token, then the generated ones but the last: the inputs whose
/// logits chose each generated token.
pub fn forced_inputs(prompt: &[u32], gen: &[u32]) -> Vec<u32> {
    let mut ids = vec![*prompt.last().expect("a prompt")];
    ids.extend_from_slice(&gen[..gen.len().saturating_sub(1)]);
    ids
}

/// The GPU's full-attention top-2 margins at each generated position of `gen` after
/// `prompt`, the tokens forced.
pub fn gpu_margins(gpu: &shadowkv::cuda::CudaModel, prompt: &[u32], gen: &[u32]) -> Vec<f32> {
    let mut cache = gpu.new_cache(prompt.len() + gen.len()).unwrap();
    gpu.prefill(&mut cache, &prompt[..prompt.len() - 1], 512, |_| {})
        .unwrap();
    let logits = gpu
        .forward(&mut [shadowkv::cuda::GpuSeq {
            tokens: &forced_inputs(prompt, gen),
            cache: &mut cache,
            logits: shadowkv::cpu::LogitsWanted::All,
        }])
        .unwrap()
        .remove(0);
    top2_margins(&logits, gpu.config().vocab_size)
}

/// The ShadowKV settings of the SmolLM2 tests on the GPU: a budget of 256 tokens, rank
/// 96, chunks of 8, 8 outlier and 4 local chunks.
pub fn smollm2_shadow() -> shadowkv::shadow::ShadowParams {
    shadowkv::shadow::ShadowParams {
        budget: 256,
        rank: 96,
        chunk_size: 8,
        outlier_chunks: 8,
        local_chunks: 4,
    }
}
