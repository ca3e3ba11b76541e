//! `shadowkv serve`: the daemon. Reads a topology file, loads the model, starts the
//! engine thread and the OpenAI-compatible HTTP server, and shuts down cleanly on
//! SIGTERM/SIGINT.

use super::model_spec::resolve_model;
use super::signals::ShutdownSignals;
use crate::cpu::CpuModel;
use crate::cuda::nccl::Nccl;
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::ChunkGather;
use crate::cuda::shadow::TierSize;
use crate::cuda::{CudaDevice, DeviceError};
use crate::engine::backend::CpuBackend;
use crate::engine::backend_cuda::CudaBackend;
use crate::engine::backend_tp::{GatherMaker, PoolMaker, TpBackend, TpOptions, TpServing};
use crate::engine::scheduler::{spawn_engine, spawn_engine_on, EngineHandle, SchedulerConfig};
use crate::model::config::ModelConfig;
use crate::model::load::open_model;
use crate::model::weights::ModelWeights;
use crate::pipeline::machine::Source;
use crate::pipeline::placement::format_cores;
use crate::pipeline::{pin, GatherPool, Machine, Placement, Role};
use crate::pool::space::SpaceError;
use crate::pool::ValuePool;
use crate::server::auth::{open_api_warning, ApiKeys};
use crate::server::{metrics_router, router, AppState};
use crate::shadow::ShadowParams;
use crate::telemetry::{self, trace::TraceWriter};
use crate::topology::{
    AttentionMode, AutoOr, BackendKind, PoolBacking, PrefillLane, PrefillShare, Topology, ValueFetch as TopoFetch,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Arguments of `shadowkv serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Topology file (TOML): model, backend, attention, limits, actors, pools, addresses.
    #[arg(long)]
    topology: PathBuf,
    /// Address to listen on, overriding server.listen (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Model, overriding model.path: a Hugging Face directory, a .gguf file,
    /// synthetic:<arch>[@seed] or auto:smollm2.
    #[arg(long)]
    model: Option<String>,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

fn served_name(t: &Topology, spec: &str) -> String {
    if let Some(n) = &t.model.name {
        return n.clone();
    }
    if spec.starts_with("synthetic:") {
        return spec.to_string();
    }
    let p = Path::new(spec.trim_end_matches('/'));
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}

/// The ShadowKV settings and value pool of a `mode = "shadowkv"` topology, checked
/// against the model (errors name the key and its line).
fn shadow_settings(
    topo: &Topology,
    cfg: &ModelConfig,
    max_context: usize,
) -> Result<Option<(ShadowParams, ValuePool)>> {
    let Some(p) = shadow_params(topo, cfg)? else {
        return Ok(None);
    };
    Ok(Some((p, value_pool(topo, &p, cfg, max_context, None)?)))
}

/// The ShadowKV settings of a `mode = "shadowkv"` topology, checked against the model.
fn shadow_params(topo: &Topology, cfg: &ModelConfig) -> Result<Option<ShadowParams>> {
    let a = &topo.attention;
    if a.mode != AttentionMode::Shadowkv {
        return Ok(None);
    }
    let p = ShadowParams {
        budget: a.budget,
        rank: a.rank,
        chunk_size: a.chunk_size,
        outlier_chunks: a.outlier_chunks,
        local_chunks: a.local_chunks,
    };
    if let Err(e) = p.validate(cfg) {
        let key = if a.rank == 0 || a.rank > cfg.num_kv_heads * cfg.head_dim {
            "attention.rank"
        } else {
            "attention.budget"
        };
        return Err(topo.error_at(key, e.to_string()).into());
    }
    Ok(Some(p))
}

/// The value pool of ShadowKV `p` for a model shaped `cfg` (the whole model, or
/// device `rank`'s share of a tensor-parallel group, whose pool file gets the rank in
/// its name), as `pools` says: for the `limits.max_batch` sequences less the
/// `pipeline.gpu_value_slots` that keep their values in GPU memory.
fn value_pool(
    topo: &Topology,
    p: &ShadowParams,
    cfg: &ModelConfig,
    max_context: usize,
    rank: Option<usize>,
) -> Result<ValuePool> {
    // Validated: at most max_batch, and 0 but on the GPU.
    let seqs = topo.limits.max_batch - topo.pipeline.gpu_value_slots;
    let shape = p.pool_shape(cfg, seqs, max_context);
    let pool = match (topo.pools.backing, &topo.pools.path) {
        (PoolBacking::File, Some(path)) => {
            let file = match (path.is_dir(), rank) {
                (true, None) => path.join("shadowkv-values.pool"),
                (true, Some(r)) => path.join(format!("shadowkv-values-rank{r}.pool")),
                (false, None) => path.clone(),
                (false, Some(r)) => path.with_extension(format!("rank{r}.pool")),
            };
            ValuePool::file_backed(shape, &file).map_err(|e| {
                let hint = match e.downcast_ref::<SpaceError>() {
                    Some(SpaceError::Disk { .. }) => {
                        "; make room there, point pools.path at a larger disk, or lower limits.max_batch or \
                         limits.max_context"
                    }
                    _ => "",
                };
                topo.error_at("pools.path", format!("{e:#}{hint}"))
            })?
        }
        _ => ValuePool::anonymous(shape).map_err(|e| {
            topo.error_at(
                "limits.max_batch",
                format!(
                    "the anonymous value pool (pools.backing) for {seqs} sequences (limits.max_batch{}) of \
                     {max_context} tokens (limits.max_context): {e:#}; lower either limit, {}or set \
                     pools.backing = \"file\" with pools.path on a disk with room{}",
                    if topo.pipeline.gpu_value_slots > 0 {
                        " less pipeline.gpu_value_slots"
                    } else {
                        ""
                    },
                    if topo.backend.kind == BackendKind::Cuda {
                        "keep more sequences' values in GPU memory (pipeline.gpu_value_slots, with zero-copy), "
                    } else {
                        ""
                    },
                    if topo.backend.kind == BackendKind::Cuda {
                        " (read by pipeline.value_fetch = \"cpu-gather\")"
                    } else {
                        ""
                    }
                ),
            )
        })?,
    };
    // The budget against the context: a step's work follows it, and the bench's default
    // (the paper's ratio) scales it to the context where a topology fixes it.
    let paper = ShadowParams::defaults(cfg, max_context).budget;
    info!(
        "ShadowKV: budget {} ({:.2} % of limits.max_context {max_context}; `shadowkv bench` defaults to {paper} there), \
         rank {}, chunk {}, {} outlier and {} local chunks; value pool{} {:.2} GiB ({:?})",
        p.budget,
        100.0 * p.budget as f64 / max_context as f64,
        p.rank,
        p.chunk_size,
        p.outlier_chunks,
        p.local_chunks,
        rank.map_or(String::new(), |r| format!(" of device {r}")),
        shape.bytes()? as f64 / (1u64 << 30) as f64,
        topo.pools.backing
    );
    Ok(pool)
}

/// Where the actors run (see [`Placement::plan`]), logged; impossible settings are
/// refused with their key and line.
fn place_actors(topo: &Topology, gpu: Option<&CudaDevice>) -> Result<Placement> {
    let bus_id = gpu.map(|d| d.info().pci_bus_id.to_string());
    let machine = Machine::read(Source::Host, bus_id.as_deref())?;
    let placement = Placement::plan(topo, &machine)?;
    for w in &placement.warnings {
        warn!("{w}");
    }
    info!("placement: {placement}");
    if gpu.is_some() {
        info!(
            "the cuda backend runs compute on the thread that queues every step's kernels on the lanes' CUDA \
             streams (one GPU: the engine thread, pinned as placed; a tensor-parallel group: each GPU's rank \
             thread, unpinned), select's scores, top-k and reuse diff among them (select has no thread of its \
             own: its miss lists reach the fetch stream by an event); transfer is the fetch stream (zero-copy) or \
             each lane's gather actor, pinned as placed (cpu-gather), and gather the gather threads"
        );
    }
    Ok(placement)
}

/// Binds an anonymous value pool's memory to the placement's pool node before anything
/// touches it; where that cannot be done the pool still serves, unbound, with a warning.
fn bind_pool(pool: &mut ValuePool, placement: &Placement) {
    bind_pool_to(pool, placement.pool_node)
}

/// Binds a value pool's memory to NUMA node `node` (as [`bind_pool`]).
fn bind_pool_to(pool: &mut ValuePool, node: u32) {
    match pool.bind_to_node(node) {
        Ok(()) => info!("value pool bound to NUMA node {node}"),
        Err(e) => warn!("value pool not bound to NUMA node {node} (pools.numa_node): {e:#}; it serves unbound"),
    }
}

/// The gather actor's threads, pinned one to a core where the placement gives as many
/// cores as threads (unpinned otherwise), for the cpu-gather value fetch.
fn gather_pool(placement: &Placement) -> Result<GatherPool> {
    let Some(g) = placement.actors.iter().find(|a| a.actor == Role::Gather) else {
        bail!("the placement has no gather actor");
    };
    let cores: &[usize] = if g.cores.len() == g.threads { &g.cores } else { &[] };
    let transfer = placement.actor(Role::Transfer).map_or(&[][..], |t| &t.cores[..]);
    let pool = GatherPool::new(g.threads, cores)?.with_transfer_cores(transfer);
    let pinned = |cores: &[usize]| {
        if cores.is_empty() {
            String::new()
        } else {
            format!(" pinned to cores {}", format_cores(cores))
        }
    };
    info!(
        "value gather: {} threads{}; each lane's gather actor (the transfer actor's thread){}",
        pool.threads(),
        pinned(cores),
        pinned(transfer)
    );
    Ok(pool)
}

/// The model the engine thread runs.
enum Loaded {
    Cpu(Box<CpuModel>),
    Cuda(Box<CudaBackend>),
    Group(Box<TpBackend>),
}

/// Runs `shadowkv serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    init_tracing();
    let topo = Topology::load(&a.topology)?;
    let listen: SocketAddr = match &a.listen {
        Some(l) => l
            .parse()
            .with_context(|| format!("--listen `{l}` is not an address like 127.0.0.1:8000"))?,
        None => topo.server.listen.parse().expect("validated"),
    };
    let keys = ApiKeys::new(topo.api_keys()?);
    if let Some(w) = open_api_warning(listen, &keys) {
        warn!("{w}");
    } else if !keys.is_empty() {
        info!("API keys: {} set; /v1/* needs one", keys.len());
    }
    let cuda = topo.backend.kind == BackendKind::Cuda;
    if cuda && topo.attention.mode == AttentionMode::Shadowkv && topo.limits.prefill_lane == PrefillLane::Mixed {
        return Err(topo
            .error_at(
                "limits.prefill_lane",
                "ShadowKV on the cuda backend prefills on a lane of its own: use `separate` (or `auto`)",
            )
            .into());
    }
    // The GPU is checked before any model is fetched or opened; a missing one is the
    // topology's `backend.kind`, named like every other topology error.
    let devices = topo.backend.device_list();
    // `backend.devices` makes a tensor-parallel group (of one GPU or more): every GPU
    // and NCCL are checked here; the group opens them again when it loads the model.
    let group = cuda && topo.backend.devices.is_some();
    // Where each GPU's value pool and gather threads go: its NUMA node and cores.
    let mut rank_placements = Vec::new();
    if group {
        for &d in &devices {
            let gpu = CudaDevice::new(d as usize).map_err(|e| {
                topo.error_at(
                    "backend.devices",
                    format!("GPU {d} cannot be used: {}", anyhow::Error::from(e)),
                )
            })?;
            let machine = Machine::read(Source::Host, Some(&gpu.info().pci_bus_id.to_string()))?;
            rank_placements.push(Placement::plan(&topo, &machine)?);
        }
        Nccl::load().map_err(|e| topo.error_at("backend.devices", format!("{e:#}")))?;
    }
    let gpu = if cuda {
        let ordinal = devices[0] as usize;
        let key = if topo.backend.devices.is_some() {
            "backend.devices"
        } else {
            "backend.device"
        };
        Some(CudaDevice::new(ordinal).map_err(|e| match e {
            DeviceError::Unavailable(why) => anyhow::Error::from(topo.error_at(
                "backend.kind",
                format!("`cuda` needs a usable NVIDIA GPU ({key} = {ordinal}): {why}"),
            )),
            e => anyhow::Error::from(e).context(format!("opening CUDA device {ordinal}")),
        })?)
    } else {
        None
    };
    let placement = place_actors(&topo, gpu.as_ref())?;
    let (spec, from_file) = match (&a.model, &topo.model.path) {
        (Some(m), _) => (m.clone(), false),
        (None, Some(p)) => (p.clone(), true),
        (None, None) => bail!("{}: no model: set model.path or pass --model", topo.file()),
    };
    // A model the topology names that cannot be found or read: its file, line and key.
    let named = |e: anyhow::Error| -> anyhow::Error {
        if from_file {
            topo.error_at("model.path", format!("{e:#}")).into()
        } else {
            e
        }
    };
    let spec = resolve_model(&spec).map_err(named)?;
    let threads = match placement.actor(Role::Compute) {
        Some(compute) if !cuda => pin::start_global_pool(compute)?,
        _ => super::set_threads(match topo.actors.compute.threads {
            AutoOr::Auto => 0,
            AutoOr::Value(n) => n,
        })?,
    };
    // Bind before the long model load so a taken port fails at once.
    let std_listener = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let metrics_listener = match &topo.server.metrics_listen {
        Some(m) => Some(std::net::TcpListener::bind(m).with_context(|| format!("listening on {m}"))?),
        None => None,
    };

    let t0 = Instant::now();
    let m = open_model(&spec).map_err(named)?;
    let ctx = m.config.max_position_embeddings;
    let max_context = topo.limits.max_context.unwrap_or(ctx);
    if max_context > ctx {
        return Err(topo
            .error_at(
                "limits.max_context",
                format!("{max_context} exceeds the model's context of {ctx} tokens"),
            )
            .into());
    }
    let mut shadow = if group {
        None
    } else {
        shadow_settings(&topo, &m.config, max_context)?
    };
    if let Some((_, pool)) = &mut shadow {
        bind_pool(pool, &placement);
    }
    // The gather actors (cpu-gather on the GPU), whose metrics the server publishes.
    let mut gatherers: Option<Arc<GatherPool>> = None;
    let model = if group {
        drop(gpu);
        let params = shadow_params(&topo, &m.config)?;
        // Each device's pool holds its KV heads' values, bound to its GPU's node.
        let pool = |rank: usize, cfg: &ModelConfig| -> Result<ValuePool> {
            let p = params.as_ref().expect("asked for with ShadowKV only");
            let mut pool = value_pool(&topo, p, cfg, max_context, Some(rank))?;
            bind_pool_to(&mut pool, rank_placements[rank].pool_node);
            Ok(pool)
        };
        // cpu-gather: each GPU's gather threads pinned to its own node's cores.
        let gathers = params.is_some() && topo.pipeline.value_fetch == TopoFetch::CpuGather;
        let gatherer =
            |rank: usize| -> Result<Arc<dyn ChunkGather + Send>> { Ok(Arc::new(gather_pool(&rank_placements[rank])?)) };
        let backend = TpBackend::new(
            &m.config,
            super::backend::tp_weights(&spec, &m)?,
            TpOptions {
                devices: devices.iter().map(|&d| d as usize).collect(),
                serving: TpServing {
                    cache_tokens: max_context,
                    max_batch: topo.limits.max_batch,
                    lanes: match topo.limits.prefill_lane {
                        PrefillLane::Mixed => 1,
                        PrefillLane::Auto | PrefillLane::Separate => 2,
                    },
                    graphs: true,
                    shadow: params.map(|p| (p, &pool as PoolMaker)),
                    fetch: match topo.pipeline.value_fetch {
                        TopoFetch::ZeroCopy => FetchPath::ZeroCopy,
                        TopoFetch::CpuGather => FetchPath::CpuGather,
                    },
                    micro_batches: topo.pipeline.micro_batches,
                    tier: match topo.pipeline.gpu_tier {
                        AutoOr::Auto => TierSize::Auto,
                        AutoOr::Value(0) => TierSize::Off,
                        AutoOr::Value(n) => TierSize::Chunks(n),
                    },
                    // Full attention has no values to place: the key is ignored then.
                    value_slots: if params.is_some() {
                        topo.pipeline.gpu_value_slots
                    } else {
                        0
                    },
                    gatherers: gathers.then_some(&gatherer as GatherMaker),
                    prefill_half_sm: topo.limits.prefill_sm_share == PrefillShare::Half,
                },
                progress: false,
            },
        )
        .map_err(|e| topo.error_at("backend.devices", format!("{e:#}")))?;
        info!(
            "tensor parallel over GPUs {devices:?} ({:?}): {:.2} GB of weights",
            backend.nccl(),
            backend.weight_bytes() as f64 / 1e9
        );
        Loaded::Group(Box::new(backend))
    } else if let Some(dev) = gpu {
        let model = super::backend::load_cuda_model(dev, &spec, &m, false)?;
        let lanes = match topo.limits.prefill_lane {
            PrefillLane::Mixed => 1,
            PrefillLane::Auto | PrefillLane::Separate => 2,
        };
        let shadowkv = shadow.is_some();
        // Of max_batch sequences, these keep their values in GPU memory (full attention
        // has none: the key is ignored then); the host pool holds the others'.
        let value_slots = if shadowkv { topo.pipeline.gpu_value_slots } else { 0 };
        let host_held = topo.limits.max_batch - value_slots;
        let (backend, prefill_sms) = CudaBackend::new(model, max_context, host_held, lanes, true, shadow.take())
            .map_err(|e| topo.error_at("limits", format!("{e:#}")))?
            .with_prefill_sms(topo.limits.prefill_sms)
            .map_err(|e| topo.error_at("limits.prefill_sms", format!("{e:#}")))?;
        if prefill_sms > 0 {
            info!("the prefill lane runs on {prefill_sms} multiprocessors (limits.prefill_sms)");
        }
        let decode_lanes = topo.pipeline.decode_lanes;
        let backend = backend
            .with_decode_lanes(decode_lanes)
            .map_err(|e| topo.error_at("pipeline.decode_lanes", format!("{e:#}")))?;
        if decode_lanes > 1 {
            info!("{decode_lanes} lanes decode side by side (pipeline.decode_lanes)");
        }
        let mut backend = backend
            .with_fetch(match topo.pipeline.value_fetch {
                TopoFetch::ZeroCopy => FetchPath::ZeroCopy,
                TopoFetch::CpuGather => FetchPath::CpuGather,
            })
            .map_err(|e| topo.error_at("pipeline.value_fetch", format!("{e:#}")))?
            .with_micro_batches(topo.pipeline.micro_batches)
            .with_prefill_half_sm(topo.limits.prefill_sm_share == PrefillShare::Half)
            .with_value_slots(value_slots)
            .map_err(|e| topo.error_at("pipeline.gpu_value_slots", format!("{e:#}")))?
            .with_tier(match topo.pipeline.gpu_tier {
                AutoOr::Auto => TierSize::Auto,
                AutoOr::Value(0) => TierSize::Off,
                AutoOr::Value(n) => TierSize::Chunks(n),
            })
            .map_err(|e| topo.error_at("pipeline.gpu_tier", format!("{e:#}")))?;
        if let Some((entries, bytes)) = backend.tier() {
            info!(
                "ShadowKV: a GPU value tier of {entries} chunks per layer and KV head of each sequence ({:.1} GiB for \
                 {} sequences; a sequence of limits.max_context has {} chunks) (pipeline.gpu_tier)",
                bytes as f64 / (1u64 << 30) as f64,
                topo.limits.max_batch,
                max_context.div_ceil(topo.attention.chunk_size)
            );
        }
        if value_slots > 0 {
            info!(
                "ShadowKV: {value_slots} of {} sequences keep their values in GPU memory (pipeline.gpu_value_slots)",
                topo.limits.max_batch
            );
        }
        if shadowkv && topo.pipeline.value_fetch == TopoFetch::CpuGather {
            let pool = Arc::new(gather_pool(&placement)?);
            gatherers = Some(pool.clone());
            backend = backend.with_gatherer(pool);
        }
        Loaded::Cuda(Box::new(backend))
    } else {
        let weights = ModelWeights::load(&m.config, m.source.as_ref(), false)?;
        Loaded::Cpu(Box::new(CpuModel::new(m.config.clone(), weights)))
    };
    let name = served_name(&topo, &spec);
    let kv_per_token = m.config.kv_bytes_per_token(if cuda { 2 } else { 4 });
    info!(
        model = %spec, name = %name, format = m.format, threads,
        max_batch = topo.limits.max_batch, max_context, max_queue = topo.limits.max_queue,
        "model loaded in {:.1}s; worst-case KV cache {:.2} GiB",
        t0.elapsed().as_secs_f64(),
        (kv_per_token * max_context * topo.limits.max_batch) as f64 / (1u64 << 30) as f64
    );

    let prometheus = telemetry::install_prometheus()?;
    let trace = if topo.trace.enabled {
        let w = TraceWriter::create(&topo.trace.path, Instant::now())?;
        info!("writing a trace to {}", topo.trace.path.display());
        Some(w)
    } else {
        None
    };
    let config = SchedulerConfig {
        max_batch: topo.limits.max_batch,
        max_queue: topo.limits.max_queue,
        max_context,
        prefill_chunk: topo.limits.prefill_chunk,
        decode_spacing: Duration::from_millis(topo.limits.decode_spacing_ms),
    };
    let tok = Arc::new(m.tokenizer);
    // The engine thread is the compute actor's: it plans each step and, on one GPU,
    // queues its kernels (the selection's too) on the lanes' streams. A group's ranks
    // queue their GPUs' kernels on threads of their own, and its engine thread only
    // hands them the steps: neither is pinned (GPUs of one node would share a core).
    let cores = placement
        .actor(Role::Compute)
        .map(|a| a.cores.clone())
        .unwrap_or_default();
    let (engine, engine_thread) = match model {
        Loaded::Cuda(model) => spawn_engine_on(*model, tok.clone(), config, trace, cores),
        Loaded::Group(model) => spawn_engine(*model, tok.clone(), config, trace),
        Loaded::Cpu(model) => spawn_engine_on(CpuBackend::new(*model, shadow)?, tok.clone(), config, trace, cores),
    }
    .context("starting the engine thread")?;
    let state = Arc::new(AppState::new(
        engine.clone(),
        tok,
        m.chat_template,
        name,
        m.config.vocab_size,
        topo.server.max_request_bytes,
        Some(prometheus.clone()),
    ));
    let grace = Duration::from_secs_f64(topo.server.shutdown_grace_secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The HTTP server stays up while the engine drains after a signal; it learns here
    // that the engine thread has ended.
    let (ended_tx, engine_ended) = tokio::sync::watch::channel(false);
    let joined = rt.spawn_blocking(move || {
        let r = engine_thread.join();
        let _ = ended_tx.send(true);
        r
    });
    let drain = Drain {
        engine: engine.clone(),
        ended: engine_ended,
        grace,
    };
    let served = rt.block_on(serve(
        state,
        keys,
        drain,
        (std_listener, metrics_listener),
        prometheus,
        gatherers,
    ));
    engine.shutdown(Duration::ZERO);
    if !matches!(rt.block_on(joined), Ok(Ok(()))) {
        bail!("the engine thread panicked");
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    served?;
    info!("stopped");
    Ok(())
}

/// What the shutdown after a signal needs.
struct Drain {
    /// The engine to stop.
    engine: EngineHandle,
    /// Becomes true once the engine thread has ended.
    ended: tokio::sync::watch::Receiver<bool>,
    /// How long running requests may still finish.
    grace: Duration,
}

impl Drain {
    /// Waits for SIGTERM/SIGINT, then drains: the engine cancels queued requests and lets
    /// running ones finish (up to the grace period) while the listeners stay open, so
    /// `/health` and new requests answer 503 (what load balancers and probes expect);
    /// once the engine thread has ended, `stop` closes the listeners. A second signal
    /// exits at once. An engine thread that ends before any signal (it panicked) closes
    /// the listeners at once: the daemon then stops with an error, for its supervisor to
    /// restart it, instead of answering 503 for ever (a signal meanwhile exits at once).
    async fn on_signal(mut self, mut signals: ShutdownSignals, stop: tokio::sync::watch::Sender<bool>) {
        let grace = self.grace;
        let first = tokio::select! {
            sig = signals.next() => Some(sig),
            // The sender goes only with the thread that joins the engine's: ended too.
            _ = self.ended.wait_for(|e| *e) => None,
        };
        let Some(sig) = first else {
            error!("the engine thread ended without a signal; the server stops");
            let _ = stop.send(true);
            let sig = signals.next().await;
            warn!("{sig}: exiting now");
            std::process::exit(130);
        };
        info!(
            "{sig}: shutting down (running requests get up to {:.0}s; /health and new requests get 503 meanwhile)",
            grace.as_secs_f64()
        );
        self.engine.shutdown(grace);
        // The engine ends within the grace period; the margin covers a step in flight.
        let drained = async move {
            let ended = self.ended.wait_for(|e| *e);
            if tokio::time::timeout(grace + Duration::from_secs(5), ended)
                .await
                .is_err()
            {
                warn!("the engine did not stop within the grace period; closing anyway");
            }
        };
        let sig = tokio::select! {
            _ = drained => {
                let _ = stop.send(true);
                signals.next().await
            }
            sig = signals.next() => sig,
        };
        warn!("{sig} again: exiting now");
        std::process::exit(130);
    }
}

/// Serves until a signal, then drains (see [`Drain::on_signal`]); every 5 s the
/// recorder's upkeep runs and the gather actors' metrics are published.
async fn serve(
    state: Arc<AppState>,
    keys: ApiKeys,
    drain: Drain,
    (listener, metrics_listener): (std::net::TcpListener, Option<std::net::TcpListener>),
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    gatherers: Option<Arc<GatherPool>>,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Taken here, before the daemon listens (see crate::cli::signals).
    let signals = ShutdownSignals::take()?;
    tokio::spawn(drain.on_signal(signals, stop_tx));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            prometheus.run_upkeep();
            if let Some(g) = &gatherers {
                g.publish_metrics();
            }
        }
    });
    if let Some(ml) = metrics_listener {
        ml.set_nonblocking(true)?;
        let ml = tokio::net::TcpListener::from_std(ml)?;
        let maddr = ml.local_addr()?;
        println!("shadowkv metrics on http://{maddr}/metrics");
        let app = metrics_router(state.clone());
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(ml, app).with_graceful_shutdown(stopped(rx)).await {
                warn!("metrics server: {e}");
            }
        });
    }
    println!("shadowkv listening on http://{addr}");
    let _ = std::io::stdout().flush();
    info!("serving `{}` on http://{addr}", state.model_name);
    let app = router(state, keys);
    let server = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    // Connections still open well after the engine has ended do not hold the process.
    let deadline = async move {
        stopped(stop_rx).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        r = server => r.context("HTTP server")?,
        _ = deadline => warn!("connections still open 5 s after the engine stopped; closing them"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine thread's end before any signal (as when it panics) closes the
    /// listeners: the server stops instead of answering 503 for ever.
    #[test]
    fn an_engine_that_ends_without_a_signal_stops_the_server() {
        let m = open_model("synthetic:tiny@5").unwrap();
        let w = ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap();
        let backend = CpuBackend::new(CpuModel::new(m.config.clone(), w), None).unwrap();
        let config = SchedulerConfig {
            max_batch: 1,
            max_queue: 1,
            max_context: 64,
            prefill_chunk: 16,
            decode_spacing: Duration::ZERO,
        };
        let (engine, join) = spawn_engine(backend, Arc::new(m.tokenizer), config, None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (ended_tx, ended) = tokio::sync::watch::channel(false);
            let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
            let drain = Drain {
                engine: engine.clone(),
                ended,
                grace: Duration::from_secs(1),
            };
            let (_send, signals) = ShutdownSignals::given();
            let task = tokio::spawn(drain.on_signal(signals, stop_tx));
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!*stop_rx.borrow(), "stopped before the engine ended");
            ended_tx.send(true).unwrap();
            let stopped = tokio::time::timeout(Duration::from_secs(5), stop_rx.wait_for(|s| *s)).await;
            assert!(matches!(stopped, Ok(Ok(_))), "the listeners were not closed");
            // Still listening for a signal (one would exit at once): the task runs on.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!task.is_finished());
            task.abort();
        });
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
    }
}
