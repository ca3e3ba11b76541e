//! `shadowkv synth`: write a random-weight model in the Hugging Face layout.

use crate::model::synthetic::{preset, write_hf, SyntheticSource, WriteDtype, ARCHS};
use crate::model::weights::expected_tensors;
use crate::pool::space::free_space;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Element type of the written safetensors.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    Bf16,
    F16,
    F32,
}

/// Arguments of `shadowkv synth`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Architecture preset.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ARCHS))]
    arch: String,
    /// Output directory (created; must not already hold a model unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights (synthetic:<arch>@<seed> gives the same weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stored element type.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Largest shard in MiB; bigger models are split with an index file.
    #[arg(long, default_value_t = 2048)]
    shard_mib: usize,
    /// Overwrite an existing model in --out (its weight files, *.safetensors and the
    /// index, are removed first, so none of an earlier model's is left).
    #[arg(long)]
    force: bool,
}

/// Runs `shadowkv synth`.
pub fn run(a: SynthArgs) -> Result<()> {
    if a.out.join("config.json").exists() && !a.force {
        bail!("{} already holds a model (use --force to overwrite)", a.out.display());
    }
    if a.shard_mib == 0 {
        bail!("--shard-mib must be at least 1");
    }
    let cfg = preset(&a.arch)?;
    let src = SyntheticSource::new(&format!("synthetic:{}", a.arch), &cfg, a.seed);
    let (dtype, elem) = match a.dtype {
        Dtype::Bf16 => (WriteDtype::Bf16, 2),
        Dtype::F16 => (WriteDtype::F16, 2),
        Dtype::F32 => (WriteDtype::F32, 4),
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    if a.force {
        remove_weights(&a.out)?;
    }
    // The weights and a little for the rest, against the disk's room.
    let need = (cfg.parameter_count() * elem) as u64 + (16 << 20);
    let free = free_space(&a.out).with_context(|| format!("reading the free space of {}", a.out.display()))?;
    if need > free {
        bail!(
            "{} in {} needs {:.2} GiB; the disk holding {} has {:.2} GiB free",
            a.arch,
            format!("{:?}", a.dtype).to_lowercase(),
            need as f64 / (1u64 << 30) as f64,
            a.out.display(),
            free as f64 / (1u64 << 30) as f64
        );
    }
    let bar = ProgressBar::new(expected_tensors(&cfg).len() as u64);
    bar.set_style(ProgressStyle::with_template("writing {bar:40} {pos}/{len} tensors {msg}").expect("static template"));
    write_hf(&a.out, &cfg, &src, dtype, a.shard_mib << 20, |name| {
        bar.set_message(name.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({}, {} parameters) to {}",
        a.arch,
        format!("{:?}", a.dtype).to_lowercase(),
        cfg.parameter_count(),
        a.out.display()
    );
    Ok(())
}

/// Removes the weight files of a model in `dir`: every `*.safetensors` and the index.
fn remove_weights(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_file() && (name.ends_with(".safetensors") || name == "model.safetensors.index.json") {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}
