//! `shadowkv synth`: write a random-weight model in the Hugging Face layout.

use crate::model::synthetic::{preset, write_hf, SyntheticSource, WriteDtype, ARCHS};
use crate::model::weights::expected_tensors;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

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
    /// Overwrite an existing model in --out.
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
    let dtype = match a.dtype {
        Dtype::Bf16 => WriteDtype::Bf16,
        Dtype::F16 => WriteDtype::F16,
        Dtype::F32 => WriteDtype::F32,
    };
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
