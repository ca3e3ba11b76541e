//! Tensor parallelism behind the scheduler: one model over several GPUs of one host,
//! one thread and one CUDA context per GPU, each thread running the one-GPU backend
//! ([`CudaBackend`]) over its device's shard ([`crate::model::shard`]), with the
//! collectives inside each step ([`crate::cuda::parallel`]).
//!
//! Every rank gets every command, in the same order: the same sequences, the same
//! steps on the same lanes, so each queues the same collectives in the same order and
//! samples the same tokens from the same (all-gathered) logits with the same seeds.
//! The caller's thread sends a command to every rank before it waits for any: a rank
//! that joins a communicator or queues a collective may wait for the others. ShadowKV
//! runs per device too: each rank compresses its own KV heads, keeps their values in a
//! pool of its own and fetches them over its own PCIe link.
//!
//! The loaded group and its serving settings are apart: [`TpBackend::load`] puts the
//! weights on the devices and starts the threads, [`TpBackend::configure`] (re)builds
//! every rank's backend over its loaded shard with new settings (cache, batch, lanes,
//! ShadowKV and its pools, ...), so a caller that runs request after request with
//! other settings (`eval`) loads the weights once. [`TpBackend::new`] does both.
//!
//! A step that fails on every rank fails as on one GPU. A step that fails on some
//! ranks only leaves the others' collectives waiting: the group aborts its
//! communicators and refuses every later step, naming the first failure. So does a
//! step after which the ranks disagree on which sequences failed on their own (a
//! compression that failed on some ranks only): the ranks' states differ from then
//! on, and a step that left different sequences out queued collectives of different
//! sizes.

use super::backend::{BackendStats, SeqSpec, StepBackend, StepInput, StepOutput, StepSeq};
use super::backend_cuda::{CudaBackend, CudaSeq, CudaTicket};
use crate::cuda::nccl::Nccl;
use crate::cuda::parallel::{TpShard, COMMUNICATORS};
use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::ChunkGather;
use crate::cuda::shadow::TierSize;
use crate::cuda::{CudaDevice, CudaModel, CudaOps, DeviceError};
use crate::model::config::ModelConfig;
use crate::model::shard::ShardPlan;
use crate::model::weights::TensorSource;
use crate::pool::ValuePool;
use crate::shadow::{ShadowParams, ShadowStats};
use anyhow::{anyhow, bail, ensure, Context, Result};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use cudarc::driver::{CudaContext, CudaEvent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The backend each rank runs: the one-GPU backend over its shard, which it keeps
/// across settings.
type RankBackend = CudaBackend<Arc<CudaModel>>;

/// Where each device's weights come from.
pub enum TpWeights<'a> {
    /// [`CudaModel::synthetic_shard`] with this seed (made on each device).
    Synthetic(u64),
    /// A model's files, each device reading its shard.
    Source(&'a dyn TensorSource),
}

/// Makes rank `r`'s ShadowKV value pool for its device config (its KV heads).
pub type PoolMaker<'a> = &'a dyn Fn(usize, &ModelConfig) -> Result<ValuePool>;

/// Makes rank `r`'s cpu-gather actors (pinned near its GPU).
pub type GatherMaker<'a> = &'a dyn Fn(usize) -> Result<Arc<dyn ChunkGather + Send>>;

/// How the group serves: the one-GPU backend's settings, applied on every device.
pub struct TpServing<'a> {
    /// Tokens a sequence's cache holds at most.
    pub cache_tokens: usize,
    /// Sequences served at once at most.
    pub max_batch: usize,
    /// Lanes (1, or 2 to prefill beside decoding).
    pub lanes: usize,
    /// Decode steps captured as CUDA graphs.
    pub graphs: bool,
    /// ShadowKV's settings and each rank's value pool (none: full attention).
    pub shadow: Option<(ShadowParams, PoolMaker<'a>)>,
    /// ShadowKV's value fetch path.
    pub fetch: FetchPath,
    /// ShadowKV's micro-batches.
    pub micro_batches: usize,
    /// ShadowKV's GPU value tier.
    pub tier: TierSize,
    /// Of `max_batch`, the sequences whose values live in GPU value slots, on every
    /// rank ([`CudaBackend::with_value_slots`]); each rank's pool holds the others'.
    pub value_slots: usize,
    /// Each rank's cpu-gather actors (none: rayon's threads).
    pub gatherers: Option<GatherMaker<'a>>,
    /// The prefill lane's attention at one block a multiprocessor
    /// ([`CudaBackend::with_prefill_half_sm`]).
    pub prefill_half_sm: bool,
}

impl TpServing<'_> {
    /// Full attention for up to `max_batch` sequences of `cache_tokens` tokens on one
    /// lane: no ShadowKV, no GPU value tier or slots, the prefill at full occupancy
    /// (the ShadowKV fields take their defaults, for a struct update).
    pub fn full_attention(cache_tokens: usize, max_batch: usize, graphs: bool) -> Self {
        TpServing {
            cache_tokens,
            max_batch,
            lanes: 1,
            graphs,
            shadow: None,
            fetch: FetchPath::ZeroCopy,
            micro_batches: 1,
            tier: TierSize::Off,
            value_slots: 0,
            gatherers: None,
            prefill_half_sm: false,
        }
    }
}

/// [`TpBackend::new`]'s options: the devices and how they serve.
pub struct TpOptions<'a> {
    /// CUDA ordinals, one per rank, in rank order.
    pub devices: Vec<usize>,
    /// The serving settings.
    pub serving: TpServing<'a>,
    /// A progress bar while the weights load.
    pub progress: bool,
}

/// One rank's serving settings, its value pool made.
struct RankServing {
    cache_tokens: usize,
    max_batch: usize,
    lanes: usize,
    graphs: bool,
    shadow: Option<(ShadowParams, ValuePool)>,
    fetch: FetchPath,
    micro_batches: usize,
    tier: TierSize,
    value_slots: usize,
    gatherer: Option<Arc<dyn ChunkGather + Send>>,
    prefill_half_sm: bool,
}

/// One sequence's part of a step, as every rank gets it.
struct Part {
    seq: u64,
    /// Its tokens; `None`: the token the previous step sampled.
    tokens: Option<Vec<u32>>,
    sample: bool,
    prompt_done: bool,
}

enum Cmd {
    Configure(Box<RankServing>),
    /// Drops the rank's backend (after a configuration failed on another rank).
    Release,
    NewSeq(u64, SeqSpec),
    Fork {
        from: u64,
        to: u64,
    },
    Free(u64),
    Submit {
        lane: usize,
        ticket: u64,
        parts: Arc<Vec<Part>>,
    },
    Complete {
        lane: usize,
        ticket: u64,
    },
    Stats,
    Graphs,
    StartTrace,
    Memory,
    AllReduce {
        bytes: usize,
        iters: usize,
    },
    Abort,
    Shutdown,
}

enum Reply {
    Done(Result<()>),
    /// A queued step's end, each sequence's bytes and the sequences (their index in the
    /// batch) that failed on the rank on their own (left out of the step, or failed as
    /// it was queued).
    Submitted(Result<(Arc<CudaEvent>, Vec<usize>, Vec<usize>)>),
    Completed(Result<StepOutput>),
    Stats(BackendStats, Option<ShadowStats>),
    Graphs(Vec<(usize, usize, usize)>),
    Trace(Result<Vec<std::time::Instant>>),
    Memory(Result<(usize, usize)>),
    Seconds(Result<Option<f64>>),
}

/// One rank's thread: its device's shard of the model, the one-GPU backend over it
/// (once configured), its sequences and its queued steps.
struct Worker {
    model: Arc<CudaModel>,
    ctx: Arc<CudaContext>,
    backend: Option<RankBackend>,
    seqs: HashMap<u64, CudaSeq>,
    tickets: HashMap<u64, CudaTicket>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Cmd>, tx: Sender<Reply>) {
        // Each command that expects a reply gets exactly one.
        while let Ok(cmd) = rx.recv() {
            let reply = match cmd {
                Cmd::Configure(s) => Some(Reply::Done(self.configure(*s))),
                Cmd::Release => {
                    self.backend = None;
                    None
                }
                Cmd::NewSeq(id, spec) => Some(Reply::Done(self.backend().and_then(|b| b.new_seq(&spec)).map(|s| {
                    self.seqs.insert(id, s);
                }))),
                Cmd::Fork { from, to } => Some(Reply::Done(self.fork(from, to))),
                Cmd::Free(id) => {
                    self.seqs.remove(&id);
                    None
                }
                Cmd::Submit { lane, ticket, parts } => Some(Reply::Submitted(self.submit(lane, ticket, &parts))),
                Cmd::Complete { lane, ticket } => Some(Reply::Completed(match self.tickets.remove(&ticket) {
                    Some(t) => self.backend().and_then(|b| b.complete(lane, t)),
                    None => Err(anyhow!("no queued step {ticket}")),
                })),
                Cmd::Stats => Some(match &self.backend {
                    Some(b) => Reply::Stats(b.stats(), b.shadow_stats()),
                    None => Reply::Stats(BackendStats::default(), None),
                }),
                Cmd::Graphs => Some(Reply::Graphs(
                    self.backend.as_ref().map(RankBackend::graph_counts).unwrap_or_default(),
                )),
                Cmd::StartTrace => Some(Reply::Trace(self.backend().and_then(|b| b.start_gpu_trace()))),
                Cmd::Memory => Some(Reply::Memory(self.model.ops().device().mem_info())),
                Cmd::AllReduce { bytes, iters } => Some(Reply::Seconds(self.model.time_all_reduce(bytes, iters))),
                Cmd::Abort => {
                    match &mut self.backend {
                        Some(b) => b.abort_collectives(),
                        None => self.model.abort_collectives(&mut []),
                    }
                    None
                }
                Cmd::Shutdown => break,
            };
            if let Some(r) = reply {
                if tx.send(r).is_err() {
                    break;
                }
            }
        }
    }

    fn backend(&mut self) -> Result<&mut RankBackend> {
        configured(&mut self.backend)
    }

    /// Replaces the backend by one with settings `s` over the same shard. The old one
    /// goes first (its work done, its memory handed back), so the new one has the
    /// whole device's free memory; its lanes' communicators go back to the shard for
    /// the new lanes to join.
    fn configure(&mut self, s: RankServing) -> Result<()> {
        ensure!(
            self.seqs.is_empty() && self.tickets.is_empty(),
            "the group still holds {} sequences and {} queued steps: drop them before changing its settings",
            self.seqs.len(),
            self.tickets.len()
        );
        self.ctx.bind_to_thread()?;
        if let Some(old) = self.backend.take() {
            self.ctx.synchronize()?;
            drop(old);
            self.model.ops().device().release_memory()?;
        }
        // The host pool serves the sequences outside the GPU value slots. Each rank
        // compresses a prompt on its own thread at the sequence's first decode step, not
        // on a compression thread beside its steps: leaving a sequence out of the steps
        // until it is ready would take every rank's word (the group's steps must hold
        // the same sequences on each), which the group does not ask for.
        let backend = CudaBackend::new(
            self.model.clone(),
            s.cache_tokens,
            s.max_batch - s.value_slots,
            s.lanes,
            s.graphs,
            s.shadow,
        )?
        .with_fetch(s.fetch)?
        .with_micro_batches(s.micro_batches)
        .with_prefill_half_sm(s.prefill_half_sm)
        .with_value_slots(s.value_slots)?
        .with_tier(s.tier)?
        .with_inline_compression()?;
        self.backend = Some(match s.gatherer {
            Some(g) => backend.with_gatherer(g),
            None => backend,
        });
        Ok(())
    }

    fn fork(&mut self, from: u64, to: u64) -> Result<()> {
        let seq = self.seqs.get(&from).context("no such sequence")?;
        let copy = configured(&mut self.backend)?.fork_seq(seq)?;
        self.seqs.insert(to, copy);
        Ok(())
    }

    fn submit(&mut self, lane: usize, ticket: u64, parts: &[Part]) -> Result<(Arc<CudaEvent>, Vec<usize>, Vec<usize>)> {
        let backend = configured(&mut self.backend)?;
        let mut taken = Vec::with_capacity(parts.len());
        for p in parts {
            match self.seqs.remove(&p.seq) {
                Some(s) => taken.push((p.seq, s)),
                None => {
                    for (id, s) in taken {
                        self.seqs.insert(id, s);
                    }
                    bail!("sequence {} is not on this device", p.seq);
                }
            }
        }
        let mut batch: Vec<StepSeq<'_, CudaSeq>> = taken
            .iter_mut()
            .zip(parts)
            .map(|((_, seq), p)| StepSeq {
                input: match &p.tokens {
                    Some(t) => StepInput::Tokens(t),
                    None => StepInput::Previous,
                },
                seq,
                sample: p.sample,
                prompt_done: p.prompt_done,
            })
            .collect();
        let queued = backend.submit(lane, &mut batch);
        drop(batch);
        let bytes = taken.iter().map(|(_, s)| backend.seq_bytes(s)).collect();
        for (id, s) in taken {
            self.seqs.insert(id, s);
        }
        let t = queued?;
        let end = t.end_event();
        let failed = t.failed().iter().map(|&(i, _)| i).collect();
        self.tickets.insert(ticket, t);
        Ok((end, bytes, failed))
    }
}

/// The backend of a configured rank.
fn configured(backend: &mut Option<RankBackend>) -> Result<&mut RankBackend> {
    backend
        .as_mut()
        .context("the tensor-parallel group has no serving settings (configure it first)")
}

/// A rank: its thread's inbox and replies, and its device's context.
struct Rank {
    tx: Sender<Cmd>,
    rx: Receiver<Reply>,
    ctx: Arc<CudaContext>,
    thread: Option<JoinHandle<()>>,
}

/// One sequence of the group: its id on every rank, its length and device bytes.
pub struct TpSeq {
    id: u64,
    len: usize,
    bytes: usize,
    free: Vec<Sender<Cmd>>,
}

impl Drop for TpSeq {
    fn drop(&mut self) {
        for tx in &self.free {
            // A rank that has stopped holds nothing any more.
            let _ = tx.send(Cmd::Free(self.id));
        }
    }
}

/// A step queued on every rank.
pub struct TpTicket {
    id: u64,
    ends: Vec<Arc<CudaEvent>>,
}

/// The model over several GPUs.
pub struct TpBackend {
    config: ModelConfig,
    ranks: Vec<Rank>,
    /// CUDA ordinals, in rank order.
    devices: Vec<usize>,
    /// Each rank's model config (its heads, KV heads and MLP units).
    rank_configs: Vec<ModelConfig>,
    /// Lanes of the settings the ranks serve with (0: not configured).
    lanes: usize,
    /// Whether the ranks defer each prompt's compression to its first decode step
    /// ([`StepBackend::defers_prefill`]: ShadowKV with a prefill lane).
    defers: bool,
    /// Ids of sequences and steps.
    next_id: AtomicU64,
    weight_bytes: usize,
    nccl: Arc<Nccl>,
    /// Why the group stopped serving, once a step failed on some ranks only.
    broken: Option<String>,
}

impl TpBackend {
    /// Loads `config`'s model over `opts.devices` (its shard on each, straight from
    /// `weights`), starts one thread per GPU and configures them with `opts`'
    /// settings: [`TpBackend::load`], then [`TpBackend::configure`].
    pub fn new(config: &ModelConfig, weights: TpWeights, opts: TpOptions) -> Result<Self> {
        let mut group = Self::load(config, weights, &opts.devices, opts.progress)?;
        group.configure(opts.serving)?;
        Ok(group)
    }

    /// Loads `config`'s model over `devices` (its shard on each, straight from
    /// `weights`) and starts one thread per GPU; the group serves once configured
    /// ([`TpBackend::configure`]). Refuses a device list with a repeat, a GPU that is
    /// not there, a model whose heads or MLP do not divide over the devices, and a
    /// host without NCCL, each with the reason.
    pub fn load(config: &ModelConfig, weights: TpWeights, devices: &[usize], progress: bool) -> Result<Self> {
        let n = devices.len();
        ensure!(n > 0, "tensor parallelism needs at least one device");
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                bail!("the device list names GPU {d} twice");
            }
        }
        let plan = ShardPlan::new(config, n)?;
        for (rank, &ordinal) in devices.iter().enumerate() {
            CudaDevice::new(ordinal).map_err(|e| gpu_error(e, ordinal, rank))?;
        }
        let nccl = Nccl::load()?;
        let ids = (0..COMMUNICATORS)
            .map(|_| nccl.unique_id())
            .collect::<Result<Vec<_>>>()?;
        let mut ranks = Vec::with_capacity(n);
        let mut rank_configs = Vec::with_capacity(n);
        let mut weight_bytes = 0;
        for (rank, &ordinal) in devices.iter().enumerate() {
            let dev = CudaDevice::new(ordinal).map_err(|e| gpu_error(e, ordinal, rank))?;
            let ctx = dev.context().clone();
            let ops = CudaOps::new(dev).with_context(|| format!("starting the CUDA backend on GPU {ordinal}"))?;
            let tp = TpShard::new(&plan, rank, nccl.clone(), ids.clone())?;
            let model = match weights {
                TpWeights::Synthetic(seed) => {
                    CudaModel::synthetic_shard(ops, config.clone(), seed, (&plan, tp), progress)?
                }
                TpWeights::Source(src) => CudaModel::from_shard(ops, config.clone(), src, (&plan, tp), progress)?,
            };
            weight_bytes += model.weight_bytes();
            rank_configs.push(model.config().clone());
            let (tx, cmd_rx) = unbounded();
            let (reply_tx, rx) = bounded(1);
            let worker = Worker {
                model: Arc::new(model),
                ctx: ctx.clone(),
                backend: None,
                seqs: HashMap::new(),
                tickets: HashMap::new(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("gpu{ordinal}-rank{rank}"))
                .spawn(move || worker.run(cmd_rx, reply_tx))
                .context("starting a GPU thread")?;
            ranks.push(Rank {
                tx,
                rx,
                ctx,
                thread: Some(thread),
            });
        }
        Ok(TpBackend {
            config: config.clone(),
            ranks,
            devices: devices.to_vec(),
            rank_configs,
            lanes: 0,
            defers: false,
            next_id: AtomicU64::new(0),
            weight_bytes,
            nccl,
            broken: None,
        })
    }

    /// (Re)builds every rank's backend over its loaded shard with the settings `s`
    /// (each rank's value pool made here by `s.shadow`'s maker), in place of the
    /// settings it served with; the group must hold no sequence. Refuses settings
    /// that do not fit a device's free memory, naming the GPU; after a refusal the
    /// group serves nothing until configured again.
    pub fn configure(&mut self, s: TpServing) -> Result<()> {
        self.check_serving()?;
        ensure!(
            s.value_slots <= s.max_batch,
            "{} GPU value slots for a batch of {}",
            s.value_slots,
            s.max_batch
        );
        let mut settings = Vec::with_capacity(self.ranks.len());
        for (rank, cfg) in self.rank_configs.iter().enumerate() {
            settings.push(Box::new(RankServing {
                cache_tokens: s.cache_tokens,
                max_batch: s.max_batch,
                lanes: s.lanes,
                graphs: s.graphs,
                shadow: match &s.shadow {
                    Some((p, pool)) => Some((*p, pool(rank, cfg)?)),
                    None => None,
                },
                fetch: s.fetch,
                micro_batches: s.micro_batches,
                gatherer: s.gatherers.map(|g| g(rank)).transpose()?,
                prefill_half_sm: s.prefill_half_sm,
                tier: s.tier,
                value_slots: s.value_slots,
            }));
        }
        self.lanes = 0;
        for (r, (rank, settings)) in self.ranks.iter().zip(settings).enumerate() {
            rank.tx
                .send(Cmd::Configure(settings))
                .map_err(|_| anyhow!("the thread of rank {r} has stopped"))?;
        }
        let replies = self.replies()?;
        // Nothing is queued while the ranks build: a refusal anywhere leaves every rank
        // without a backend (the same communicators back on each), not a group half
        // configured.
        let failed = replies
            .into_iter()
            .map(done)
            .enumerate()
            .find_map(|(r, res)| res.err().map(|e| (r, e)));
        if let Some((rank, e)) = failed {
            for rank in &self.ranks {
                let _ = rank.tx.send(Cmd::Release);
            }
            return Err(e.context(format!("GPU {} (rank {rank})", self.devices[rank])));
        }
        self.lanes = s.lanes;
        self.defers = s.shadow.is_some() && s.lanes > 1;
        Ok(())
    }

    /// Devices in the group.
    pub fn devices(&self) -> usize {
        self.ranks.len()
    }

    /// Bytes of weights over all devices.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Free and total memory of each device, in rank order.
    pub fn memory(&self) -> Result<Vec<(usize, usize)>> {
        self.ask(
            |_| Cmd::Memory,
            |r| match r {
                Reply::Memory(m) => Some(m),
                _ => None,
            },
        )?
        .into_iter()
        .collect()
    }

    /// Device bytes of one device's share of a dense cache of `tokens` tokens.
    pub fn cache_bytes(&self, tokens: usize) -> usize {
        tokens * self.config.kv_bytes_per_token(2) / self.ranks.len()
    }

    /// Seconds one all-reduce of `bytes` bytes takes over the group (NCCL, rank 0's
    /// median of `iters`).
    pub fn time_all_reduce(&mut self, bytes: usize, iters: usize) -> Result<f64> {
        self.check_serving()?;
        let results = self.ask(
            |_| Cmd::AllReduce { bytes, iters },
            |r| match r {
                Reply::Seconds(r) => Some(r.and_then(|s| s.context("a device outside the group"))),
                _ => None,
            },
        )?;
        Ok(self.agree("timing an all-reduce", results)?[0])
    }

    /// Each rank's graph captures, replays and eager steps, lane by lane
    /// ([`CudaBackend::graph_counts`]), in rank order (empty lanes: not configured).
    pub fn graph_counts(&self) -> Result<Vec<Vec<(usize, usize, usize)>>> {
        self.ask(
            |_| Cmd::Graphs,
            |r| match r {
                Reply::Graphs(g) => Some(Ok(g)),
                _ => None,
            },
        )?
        .into_iter()
        .collect()
    }

    /// The NCCL library the group runs on.
    pub fn nccl(&self) -> &Nccl {
        &self.nccl
    }

    fn take_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends `cmd(rank)` to every rank, then collects one reply from each.
    fn all(&self, cmd: impl Fn(usize) -> Cmd) -> Result<Vec<Reply>> {
        for (r, rank) in self.ranks.iter().enumerate() {
            rank.tx
                .send(cmd(r))
                .map_err(|_| anyhow!("the thread of rank {r} has stopped"))?;
        }
        self.replies()
    }

    /// [`TpBackend::all`], each reply taken apart by `pick` (`None`: a reply of
    /// another kind, which is an error).
    fn ask<T>(&self, cmd: impl Fn(usize) -> Cmd, pick: impl Fn(Reply) -> Option<Result<T>>) -> Result<Vec<Result<T>>> {
        Ok(self
            .all(cmd)?
            .into_iter()
            .map(|r| pick(r).unwrap_or_else(|| Err(anyhow!("a rank answered out of turn"))))
            .collect())
    }

    /// One reply from each rank, in rank order.
    fn replies(&self) -> Result<Vec<Reply>> {
        self.ranks
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                rank.rx
                    .recv()
                    .map_err(|_| anyhow!("the thread of rank {r} has stopped"))
            })
            .collect()
    }

    /// The ranks' results as one: all fine, all failed (rank 0's error), or some
    /// failed (the group stops: see the module's documentation).
    fn agree<T>(&mut self, what: &str, results: Vec<Result<T>>) -> Result<Vec<T>> {
        match verdict(results) {
            Verdict::Done(all) => Ok(all),
            Verdict::Failed(e) => Err(e),
            Verdict::Split(rank, e) => {
                Err(self.halt(format!("{what} failed on rank {rank}, not on every rank: {e:#}")))
            }
        }
    }

    /// Stops the group for `why` (the ranks' queued collectives may wait for each other
    /// forever): aborts every rank's communicators and refuses every later step.
    fn halt(&mut self, why: String) -> anyhow::Error {
        for rank in &self.ranks {
            let _ = rank.tx.send(Cmd::Abort);
        }
        self.broken = Some(why.clone());
        anyhow!("{why}; the tensor-parallel group has stopped")
    }

    fn check_serving(&self) -> Result<()> {
        match &self.broken {
            Some(why) => bail!("the tensor-parallel group has stopped ({why})"),
            None => Ok(()),
        }
    }

    fn check_configured(&self) -> Result<()> {
        self.check_serving()?;
        ensure!(
            self.lanes > 0,
            "the tensor-parallel group has no serving settings (configure it first)"
        );
        Ok(())
    }

    /// A new sequence holding a copy of `seq`'s dense cache on every rank (see
    /// [`CudaBackend::fork_seq`]).
    pub fn fork_seq(&mut self, seq: &TpSeq) -> Result<TpSeq> {
        self.check_configured()?;
        let to = self.take_id();
        let from = seq.id;
        let replies = self.all(|_| Cmd::Fork { from, to })?;
        let results = replies.into_iter().map(done).collect();
        self.agree("copying a sequence", results)?;
        Ok(TpSeq {
            id: to,
            len: seq.len,
            bytes: seq.bytes,
            free: self.ranks.iter().map(|r| r.tx.clone()).collect(),
        })
    }
}

/// What the ranks' results of one command come to.
enum Verdict<T> {
    /// Every rank succeeded.
    Done(Vec<T>),
    /// Every rank failed (rank 0's error).
    Failed(anyhow::Error),
    /// Some ranks failed: the first of them and its error.
    Split(usize, anyhow::Error),
}

fn verdict<T>(results: Vec<Result<T>>) -> Verdict<T> {
    let ranks = results.len();
    let mut done = Vec::with_capacity(ranks);
    let mut failed = None;
    let mut failures = 0;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) => done.push(v),
            Err(e) => {
                failures += 1;
                failed.get_or_insert((r, e));
            }
        }
    }
    match failed {
        None => Verdict::Done(done),
        Some((_, e)) if failures == ranks => Verdict::Failed(e),
        Some((r, e)) => Verdict::Split(r, e),
    }
}

/// The first rank whose tokens differ from rank 0's, if any.
fn first_disagreeing(outs: &[StepOutput]) -> Option<usize> {
    outs.iter().position(|o| o.tokens != outs[0].tokens)
}

/// Why GPU `ordinal` (rank `rank`) cannot be opened.
fn gpu_error(e: DeviceError, ordinal: usize, rank: usize) -> anyhow::Error {
    match e {
        DeviceError::Unavailable(why) => anyhow!("GPU {ordinal} (rank {rank}) cannot be used: {why}"),
        e => anyhow::Error::from(e).context(format!("opening GPU {ordinal} (rank {rank})")),
    }
}

fn done(r: Reply) -> Result<()> {
    match r {
        Reply::Done(r) => r,
        _ => Err(anyhow!("a rank answered out of turn")),
    }
}

impl StepBackend for TpBackend {
    type Seq = TpSeq;
    type Ticket = TpTicket;

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn lanes(&self) -> usize {
        self.lanes
    }

    fn queue_depth(&self) -> usize {
        2
    }

    fn defers_prefill(&self) -> bool {
        self.defers
    }

    fn new_seq(&self, spec: &SeqSpec) -> Result<TpSeq> {
        self.check_configured()?;
        let id = self.take_id();
        let spec = *spec;
        let replies = self.all(|_| Cmd::NewSeq(id, spec))?;
        // Nothing is queued yet: a refusal on any rank refuses the sequence everywhere.
        if let Some(e) = replies.into_iter().map(done).find_map(|r| r.err()) {
            for rank in &self.ranks {
                let _ = rank.tx.send(Cmd::Free(id));
            }
            return Err(e);
        }
        Ok(TpSeq {
            id,
            len: 0,
            bytes: 0,
            free: self.ranks.iter().map(|r| r.tx.clone()).collect(),
        })
    }

    fn seq_len(&self, seq: &TpSeq) -> usize {
        seq.len
    }

    fn seq_bytes(&self, seq: &TpSeq) -> usize {
        seq.bytes
    }

    fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, TpSeq>]) -> Result<TpTicket> {
        self.check_configured()?;
        ensure!(lane < self.lanes, "no lane {lane}");
        let parts: Arc<Vec<Part>> = Arc::new(
            batch
                .iter()
                .map(|s| Part {
                    seq: s.seq.id,
                    tokens: match s.input {
                        StepInput::Tokens(t) => Some(t.to_vec()),
                        StepInput::Previous => None,
                    },
                    sample: s.sample,
                    prompt_done: s.prompt_done,
                })
                .collect(),
        );
        let ticket = self.take_id();
        let results = self.ask(
            |_| Cmd::Submit {
                lane,
                ticket,
                parts: parts.clone(),
            },
            |r| match r {
                Reply::Submitted(r) => Some(r),
                _ => None,
            },
        )?;
        let queued = self.agree("a step", results)?;
        // Ranks that disagree on which sequences failed: their states differ, and if
        // they left other sequences out they queued collectives of other sizes.
        if let Some(r) = queued.iter().position(|q| q.2 != queued[0].2) {
            return Err(self.halt(format!(
                "sequences {:?} of a step failed on rank {r} (their compression), {:?} on rank 0",
                queued[r].2, queued[0].2
            )));
        }
        let mut ends = Vec::with_capacity(queued.len());
        let mut bytes = vec![0; batch.len()];
        for (end, b, _) in queued {
            ends.push(end);
            for (sum, b) in bytes.iter_mut().zip(b) {
                *sum += b;
            }
        }
        for ((s, p), b) in batch.iter_mut().zip(parts.iter()).zip(bytes) {
            s.seq.len += p.tokens.as_ref().map_or(1, |t| t.len());
            s.seq.bytes = b;
        }
        Ok(TpTicket { id: ticket, ends })
    }

    fn is_done(&self, ticket: &TpTicket) -> bool {
        ticket
            .ends
            .iter()
            .zip(&self.ranks)
            .all(|(e, r)| r.ctx.bind_to_thread().is_ok() && e.is_complete())
    }

    fn complete(&mut self, lane: usize, ticket: TpTicket) -> Result<StepOutput> {
        self.check_serving()?;
        let id = ticket.id;
        let results = self.ask(
            |_| Cmd::Complete { lane, ticket: id },
            |r| match r {
                Reply::Completed(r) => Some(r),
                _ => None,
            },
        )?;
        let outs = self.agree("completing a step", results)?;
        if let Some(r) = first_disagreeing(&outs) {
            let why = format!("rank {r} sampled other tokens than rank 0");
            self.broken = Some(why.clone());
            bail!("{why}: the tensor-parallel group has stopped");
        }
        Ok(outs.into_iter().next().expect("one rank at least"))
    }

    fn start_gpu_trace(&mut self) -> Result<Vec<std::time::Instant>> {
        // Rank 0's timeline stands for the group's.
        let replies = self.all(|_| Cmd::StartTrace)?;
        match replies.into_iter().next() {
            Some(Reply::Trace(r)) => r,
            _ => Err(anyhow!("a rank answered out of turn")),
        }
    }

    fn stats(&self) -> BackendStats {
        let mut sum = BackendStats::default();
        let Ok(replies) = self.all(|_| Cmd::Stats) else {
            return sum;
        };
        let mut shadow = ShadowStats::default();
        for r in replies {
            if let Reply::Stats(s, sh) = r {
                sum.gpu_bytes += s.gpu_bytes;
                sum.pool_bytes += s.pool_bytes;
                sum.value_bytes_fetched += s.value_bytes_fetched;
                if let Some(sh) = sh {
                    shadow.hits += sh.hits;
                    shadow.misses += sh.misses;
                }
            }
        }
        sum.reuse_hit_ratio = shadow.hit_rate().unwrap_or(0.0);
        sum
    }

    fn shadow_stats(&self) -> Option<ShadowStats> {
        let replies = self.all(|_| Cmd::Stats).ok()?;
        let mut total: Option<ShadowStats> = None;
        for r in replies {
            if let Reply::Stats(_, Some(sh)) = r {
                let t = total.get_or_insert_with(ShadowStats::default);
                t.hits += sh.hits;
                t.misses += sh.misses;
                t.value_bytes_fetched += sh.value_bytes_fetched;
            }
        }
        total
    }
}

impl Drop for TpBackend {
    fn drop(&mut self) {
        // Every rank is told before any is joined: a communicator's teardown may wait
        // for the other ranks' (the last to destroy one waits for every rank's graphs
        // that captured it: see `crate::cuda::parallel`). (Sequences still alive hold
        // senders: the inboxes stay open, so the threads are told, not left to see
        // them close.)
        for rank in &self.ranks {
            let _ = rank.tx.send(Cmd::Shutdown);
        }
        let threads: Vec<_> = self.ranks.iter_mut().filter_map(|r| r.thread.take()).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_results_agree_or_name_the_first_rank_that_failed() {
        assert!(matches!(verdict::<u8>(vec![Ok(1), Ok(2)]), Verdict::Done(v) if v == [1, 2]));
        match verdict::<u8>(vec![Err(anyhow!("zero")), Err(anyhow!("one"))]) {
            Verdict::Failed(e) => assert_eq!(e.to_string(), "zero"),
            _ => panic!("every rank failed"),
        }
        match verdict::<u8>(vec![Ok(1), Err(anyhow!("one")), Err(anyhow!("two"))]) {
            Verdict::Split(1, e) => assert_eq!(e.to_string(), "one"),
            _ => panic!("ranks 1 and 2 failed, rank 0 did not"),
        }
    }

    #[test]
    fn ranks_that_sampled_other_tokens_are_found() {
        let out = |t: &[u32]| StepOutput {
            tokens: t.to_vec(),
            ..Default::default()
        };
        assert_eq!(first_disagreeing(&[out(&[1, 2]), out(&[1, 2])]), None);
        assert_eq!(first_disagreeing(&[out(&[1, 2]), out(&[1, 2]), out(&[1, 3])]), Some(2));
    }
}
