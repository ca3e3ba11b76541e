//! The `shadowkv` command line.

mod backend;
mod bench;
mod bench_cuda;
mod bench_cuda_args;
pub mod bench_cuda_shadow;
mod bench_group;
mod bench_report;
mod eval;
mod generate;
mod inspect;
mod model_spec;
mod output;
mod serve;
mod shadow_args;
pub mod signals;
mod synth;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// shadowkv: long-context LLM inference with ShadowKV.
#[derive(Parser, Debug)]
#[command(name = "shadowkv", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of a prompt (greedy unless a temperature is given).
    Generate(generate::GenerateArgs),
    /// Describe a model: architecture, parameters, dtypes, KV and memory needs.
    Inspect(inspect::InspectArgs),
    /// Write a random-weight model in the Hugging Face layout.
    Synth(synth::SynthArgs),
    /// Long-context evaluation of full attention and ShadowKV side by side.
    Eval(eval::EvalArgs),
    /// Decode throughput of full attention and ShadowKV side by side.
    Bench(bench::BenchArgs),
    /// Run the OpenAI-compatible inference server described by a topology file.
    Serve(serve::ServeArgs),
}

/// Parses a count that must be at least 1 (a clap value parser).
pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Sizes the rayon pool every CPU matrix product runs on (0 = all cores); warns when
/// asked for more threads than the machine has cores.
pub(crate) fn set_threads(threads: usize) -> Result<usize> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n = if threads == 0 { cores } else { threads };
    if n > cores {
        eprintln!("warning: {n} threads on {cores} cores: the matrix products' threads will take turns (slower)");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .context("starting the thread pool")?;
    Ok(n)
}

/// Parses the command line and runs the command.
pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    }
}
