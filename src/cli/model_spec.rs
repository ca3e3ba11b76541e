//! The model a command names: a Hugging Face directory, a .gguf file,
//! `synthetic:<arch>[@seed]`, or `auto:smollm2` (the test model, fetched on first use).

use crate::model::load::{open_model, OpenedModel};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tracing::info;

/// What `--model` takes, for the commands' help.
pub const MODEL_HELP: &str = "Model: a Hugging Face directory, a .gguf file, synthetic:<arch>[@seed], \
     or auto:smollm2 (the test model, fetched into ~/.cache/shadowkv on first use)";

/// Opens the model `spec` names, resolving `auto:` names first ([`resolve_model`]).
pub fn open_spec(spec: &str) -> Result<OpenedModel> {
    open_model(&resolve_model(spec)?)
}

/// File name of the test model in the `tools/fetch-model` cache.
const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Resolves `auto:smollm2` to the test model in the `tools/fetch-model` cache, fetching
/// it with that script (from this source tree) when absent. Other names pass through.
pub fn resolve_model(spec: &str) -> Result<String> {
    let Some(name) = spec.strip_prefix("auto:") else {
        return Ok(spec.to_string());
    };
    if name != "smollm2" {
        bail!("unknown model `{spec}` (the only auto: model is auto:smollm2)");
    }
    let cache = match std::env::var_os("SHADOWKV_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache/shadowkv"),
    };
    let path = cache.join("models").join(SMOLLM2_FILE);
    if path.exists() {
        return Ok(path.display().to_string());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fetch-model");
    if !script.exists() {
        bail!(
            "{spec}: {} is missing and {} is not here to fetch it; run tools/fetch-model from the source tree",
            path.display(),
            script.display()
        );
    }
    info!("{spec}: fetching the test model with {}", script.display());
    let out = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let fetched = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    if fetched.is_empty() || !Path::new(&fetched).exists() {
        bail!("{} did not print a model path", script.display());
    }
    Ok(fetched)
}
