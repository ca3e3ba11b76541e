//! `shadowkv eval`: RULER-style long-context tasks and teacher-forced fidelity, for
//! full attention and ShadowKV side by side.

use super::at_least_one;
use super::backend::{load_cuda_model, open_gpu, tp_weights, Backend, CudaArgs, Gpus};
use super::model_spec::{open_spec, MODEL_HELP};
use super::output::check_output_file;
use super::shadow_args::{Method, ShadowArgs};
use crate::cpu::CpuModel;
use crate::engine::backend_tp::TpBackend;
use crate::eval::fidelity::fidelity;
use crate::eval::haystack::Haystack;
use crate::eval::run::{hit_rates, run_ruler, summary, EvalModel, MethodSpec, RulerPlan, SampleResult};
use crate::eval::tasks::Task;
use crate::model::load::OpenedModel;
use crate::model::weights::ModelWeights;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Arguments of `shadowkv eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    kind: EvalKind,
}

#[derive(Subcommand, Debug)]
enum EvalKind {
    /// RULER-style synthetic tasks (needles, variable tracking, word extraction).
    Ruler(RulerArgs),
    /// Teacher-forced agreement and KL divergence of ShadowKV against full attention.
    Fidelity(FidelityArgs),
}

/// Arguments of `shadowkv eval ruler`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
struct RulerArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// Tasks (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Task::ALL.to_vec())]
    tasks: Vec<Task>,
    /// Prompt lengths in tokens (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2048usize, 4096, 8192])]
    lengths: Vec<usize>,
    /// Samples per task, length and haystack (needle depth swept across them).
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    samples: usize,
    /// Haystacks (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Haystack::Noise, Haystack::Essay])]
    haystacks: Vec<Haystack>,
    /// Methods (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Method::Full, Method::Shadowkv])]
    attention: Vec<Method>,
    #[command(flatten)]
    shadow: ShadowArgs,
    /// Render prompts without the chat template.
    #[arg(long)]
    no_chat: bool,
    /// Seed of the generated samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where the model runs: the CPU reference, or a GPU or a tensor-parallel group
    /// (`--devices`; each method then prefills and decodes every sample on its own).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    #[command(flatten)]
    cuda: CudaArgs,
    /// Write every sample's result and the summary as JSON (rewritten after each sample,
    /// with "complete": false until the run ends, so an interrupted run keeps its work).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Arguments of `shadowkv eval fidelity`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
struct FidelityArgs {
    #[arg(long, help = MODEL_HELP)]
    model: String,
    /// The long text.
    #[arg(long)]
    prompt_file: PathBuf,
    /// Tokens prefilled before comparing (default: all but the last --positions).
    #[arg(long)]
    prefix: Option<usize>,
    /// Positions compared after the prefix (fewer where the text ends first).
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    positions: usize,
    #[command(flatten)]
    shadow: ShadowArgs,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The f32 CPU model of an opened model file.
fn cpu_model(m: &OpenedModel, progress: bool) -> Result<CpuModel> {
    let w = ModelWeights::load(&m.config, m.source.as_ref(), progress)?;
    Ok(CpuModel::new(m.config.clone(), w))
}

/// Runs `shadowkv eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    match a.kind {
        EvalKind::Ruler(r) => ruler(r),
        EvalKind::Fidelity(f) => fidelity_cmd(f),
    }
}

fn ruler(a: RulerArgs) -> Result<()> {
    super::set_threads(a.threads)?;
    for (flag, empty) in [
        ("--tasks", a.tasks.is_empty()),
        ("--lengths", a.lengths.is_empty()),
        ("--haystacks", a.haystacks.is_empty()),
        ("--attention", a.attention.is_empty()),
    ] {
        if empty {
            bail!("{flag} must name at least one");
        }
    }
    a.shadow.refuse_unused(&a.attention)?;
    if let Some(path) = &a.json {
        // The results are written as the run goes: a bad place fails now, not after the
        // first sample.
        check_output_file("--json", path)?;
    }
    let progress = std::io::stderr().is_terminal();
    // Option errors before the (long) model load.
    let fetch = a.cuda.one_fetch()?;
    let tier = a.cuda.one_tier()?;
    if a.backend == Backend::Cpu {
        a.cuda.refuse_gpu_settings_on_cpu()?;
    }
    let gpus = a.cuda.gpus()?;
    let m = open_spec(&a.model)?;
    let ctx = m.config.max_position_embeddings;
    if let Some(len) = a.lengths.iter().find(|&&l| l > ctx) {
        bail!("--lengths: {len} exceeds the model's context of {ctx} tokens");
    }
    let graphs = !a.cuda.no_graph;
    // The loaded model (one of them), borrowed by `model` for the whole run.
    let (mut cpu, mut gpu, mut group) = (None, None, None);
    let mut model = match (a.backend, gpus) {
        (Backend::Cpu, _) => EvalModel::Cpu(cpu.insert(cpu_model(&m, progress)?)),
        (Backend::Cuda, Gpus::One(d)) => EvalModel::Cuda {
            model: gpu.insert(load_cuda_model(open_gpu(d)?, &a.model, &m, progress)?),
            fetch,
            tier,
            graphs,
        },
        // Loaded once; every sample and method configures it anew.
        (Backend::Cuda, Gpus::Group(devices)) => EvalModel::Group {
            group: group.insert(TpBackend::load(
                &m.config,
                tp_weights(&a.model, &m)?,
                &devices,
                progress,
            )?),
            fetch,
            tier,
            graphs,
        },
    };
    let chat = if a.no_chat { None } else { m.chat_template.as_ref() };
    let methods: Vec<MethodSpec> = a
        .attention
        .iter()
        .map(|&method| {
            let (cfg, shadow) = (m.config.clone(), a.shadow.clone());
            MethodSpec {
                label: method.label().to_string(),
                attention: Box::new(move |ctx| shadow.attention(method, &cfg, ctx)),
            }
        })
        .collect();
    // Report the settings each method uses at each length.
    for &len in &a.lengths {
        for s in &methods {
            eprintln!("length {len:>6} {:<15} {}", s.label, (s.attention)(len)?);
        }
    }
    let plan = RulerPlan {
        tasks: a.tasks.clone(),
        lengths: a.lengths.clone(),
        samples: a.samples,
        haystacks: a.haystacks.clone(),
        seed: a.seed,
        // The GPU prefills larger chunks at once; the outputs do not depend on it.
        prefill_chunk: match a.backend {
            Backend::Cpu => 512,
            Backend::Cuda => 2048,
        },
    };
    let save = |results: &[SampleResult], complete: bool| -> Result<()> {
        match &a.json {
            Some(path) => write_ruler_json(path, &a, &plan, &methods, results, complete),
            None => Ok(()),
        }
    };
    let results = run_ruler(&mut model, &m.tokenizer, chat, &plan, &methods, progress, |partial| {
        save(partial, false)
    })?;
    save(&results, true)?;
    let labels: Vec<&str> = methods.iter().map(|m| m.label.as_str()).collect();
    println!("| task | length | {} |", labels.join(" | "));
    println!("|---|---:|{}", "---:|".repeat(labels.len()));
    for (task, len, scores) in &summary(&results, &plan, &methods) {
        let cells: Vec<String> = scores.iter().map(|s| format!("{s:.1}")).collect();
        println!("| {task} | {len} | {} |", cells.join(" | "));
    }
    for (len, rates) in hit_rates(&results, &plan, &methods) {
        let cells: Vec<String> = rates
            .iter()
            .map(|r| r.map_or("-".to_string(), |r| format!("{:.1} %", 100.0 * r)))
            .collect();
        println!("| reuse hit rate | {len} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// Writes the ruler results so far (atomically: `<path>.partial`, then a rename).
fn write_ruler_json(
    path: &std::path::Path,
    a: &RulerArgs,
    plan: &RulerPlan,
    methods: &[MethodSpec],
    results: &[SampleResult],
    complete: bool,
) -> Result<()> {
    let labels: Vec<&str> = methods.iter().map(|m| m.label.as_str()).collect();
    let rows = summary(results, plan, methods);
    let rates = hit_rates(results, plan, methods);
    let out = serde_json::json!({
        "model": a.model, "backend": clap::ValueEnum::to_possible_value(&a.backend).map(|v| v.get_name().to_string()),
        "samples": a.samples, "seed": a.seed, "complete": complete,
        "tasks": a.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "lengths": a.lengths, "haystacks": a.haystacks, "methods": labels,
        "settings": a.lengths.iter().map(|&l| methods.iter().map(|s| (s.attention)(l).map_or(serde_json::Value::Null, |a| a.settings_json())).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "summary": rows.iter().map(|(t, l, s)| serde_json::json!({"task": t, "length": l, "scores": s})).collect::<Vec<_>>(),
        "reuse_hit_rate": rates.iter().map(|(l, r)| serde_json::json!({"length": l, "rates": r})).collect::<Vec<_>>(),
        "results": results,
    });
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_string_pretty(&out)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn fidelity_cmd(a: FidelityArgs) -> Result<()> {
    super::set_threads(a.threads)?;
    let text =
        std::fs::read_to_string(&a.prompt_file).with_context(|| format!("reading {}", a.prompt_file.display()))?;
    let m = open_spec(&a.model)?;
    let model = cpu_model(&m, std::io::stderr().is_terminal())?;
    let ids = m.tokenizer.encode(&text, true)?;
    let n = ids.len();
    // The prefix, then the positions compared after it: the text's last ones unless
    // --prefix says where they start.
    let prefix = match a.prefix {
        Some(p) if p >= n => bail!("--prefix {p}: the text has {n} tokens, none left to compare after it"),
        Some(p) => p,
        None if a.positions >= n => bail!(
            "--positions {}: the text has {n} tokens; at least one must come before the positions compared",
            a.positions
        ),
        None => n - a.positions,
    };
    let end = (prefix + a.positions).min(n);
    let ctx = m.config.max_position_embeddings;
    if end > ctx {
        bail!("the prefix and the positions compared take {end} tokens; the model's context is {ctx}");
    }
    let p = a.shadow.params(&m.config, end)?;
    let f = fidelity(&model, &ids[..end], prefix, p)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "tokens": end, "prefix": prefix, "settings": p, "fidelity": f})
        );
    } else {
        println!("ShadowKV: {p}");
        println!(
            "{} positions after a {prefix}-token prefix: top-1 agreement {:.1} %, mean KL(full ‖ ShadowKV) {:.5} nats (max {:.4}), reuse hit rate {}",
            f.positions,
            100.0 * f.top1_agreement,
            f.mean_kl,
            f.max_kl,
            f.reuse_hit_rate.map_or("- (no chunk selected)".into(), |r| format!("{:.1} %", 100.0 * r))
        );
    }
    Ok(())
}
