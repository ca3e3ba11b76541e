//! The topology file: what `shadowkv serve` runs and how (TOML).
//!
//! Every section is optional except that a model must be named (here or on the command
//! line). Unknown keys, wrong types and impossible values are errors that name the key,
//! the file and the line. See the README's "Server" section for every key.

mod api_keys;
mod values;

pub use values::{AutoOr, Cores};

use secrecy::SecretString;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A topology file, parsed and checked.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The model to serve.
    #[serde(default)]
    pub model: ModelSection,
    /// Where it runs.
    #[serde(default)]
    pub backend: BackendSection,
    /// Full attention or ShadowKV, with the ShadowKV parameters.
    #[serde(default)]
    pub attention: AttentionSection,
    /// Batch, context and queue limits.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Micro-batches and value fetching.
    #[serde(default)]
    pub pipeline: PipelineSection,
    /// Threads and their placement.
    #[serde(default)]
    pub actors: ActorsSection,
    /// Host memory pools for values.
    #[serde(default)]
    pub pools: PoolsSection,
    /// Listen addresses.
    #[serde(default)]
    pub server: ServerSection,
    /// Chrome trace output.
    #[serde(default)]
    pub trace: TraceSection,
    #[serde(skip)]
    origin: Origin,
}

#[derive(Clone, Default)]
struct Origin {
    file: String,
    src: String,
}

/// Without the text, which may hold API keys.
impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face directory, a `.gguf` file, `synthetic:<arch>[@seed]`, or
    /// `auto:smollm2` (the test model, fetched into the cache if absent).
    pub path: Option<String>,
    /// The id clients use in `model` (default: the file name without extension).
    pub name: Option<String>,
}

/// Compute backend.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The f32 reference backend.
    #[default]
    Cpu,
    /// NVIDIA GPUs.
    Cuda,
}

/// `[backend]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    /// `cpu` or `cuda`.
    #[serde(default)]
    pub kind: BackendKind,
    /// One CUDA device ordinal (0 when neither this nor `devices` is given).
    #[serde(default)]
    pub device: Option<u32>,
    /// The CUDA device ordinals of a tensor-parallel group (the model split over them;
    /// one entry runs the group's code on one GPU). Not together with `device`.
    #[serde(default)]
    pub devices: Option<Vec<u32>>,
}

impl BackendSection {
    /// The GPUs to run on: `devices`, else `[device]`, else `[0]`.
    pub fn device_list(&self) -> Vec<u32> {
        match (&self.devices, self.device) {
            (Some(list), _) => list.clone(),
            (None, d) => vec![d.unwrap_or(0)],
        }
    }
}

/// Attention algorithm.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    /// Exact attention over the whole KV cache.
    #[default]
    Full,
    /// ShadowKV sparse attention.
    Shadowkv,
}

/// `[attention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSection {
    /// `full` or `shadowkv`.
    #[serde(default)]
    pub mode: AttentionMode,
    /// Tokens of selected chunks per step (ShadowKV sparse budget).
    #[serde(default = "d_budget")]
    pub budget: usize,
    /// Rank of the pre-RoPE key factorisation.
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// Tokens per chunk.
    #[serde(default = "d_chunk_size")]
    pub chunk_size: usize,
    /// Chunks kept exactly because their keys are far from their landmark.
    #[serde(default = "d_outlier_chunks")]
    pub outlier_chunks: usize,
    /// Most recent chunks kept exactly.
    #[serde(default = "d_local_chunks")]
    pub local_chunks: usize,
}

fn d_budget() -> usize {
    2048
}
fn d_rank() -> usize {
    160
}
fn d_chunk_size() -> usize {
    8
}
fn d_outlier_chunks() -> usize {
    48
}
fn d_local_chunks() -> usize {
    4
}

impl Default for AttentionSection {
    fn default() -> Self {
        AttentionSection {
            mode: AttentionMode::Full,
            budget: d_budget(),
            rank: d_rank(),
            chunk_size: d_chunk_size(),
            outlier_chunks: d_outlier_chunks(),
            local_chunks: d_local_chunks(),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Most sequences decoded together.
    #[serde(default = "d_max_batch")]
    pub max_batch: usize,
    /// Most tokens (prompt and completion) of one request (default: the model's context).
    pub max_context: Option<usize>,
    /// Most accepted requests waiting for a batch slot; beyond it requests get 429.
    #[serde(default = "d_max_queue")]
    pub max_queue: usize,
    /// Most prompt tokens prefilled per scheduler step.
    #[serde(default = "d_prefill_chunk")]
    pub prefill_chunk: usize,
    /// Where prompts are prefilled: in the decode steps, or beside them.
    #[serde(default)]
    pub prefill_lane: PrefillLane,
    /// How much of each multiprocessor the separate prefill lane's attention takes.
    #[serde(default)]
    pub prefill_sm_share: PrefillShare,
    /// The separate prefill lane runs on a partition of this many of the GPU's
    /// multiprocessors (rounded up to the driver's granule, 8 on Hopper), so a decode
    /// step always finds the others free; 0: the whole GPU.
    #[serde(default)]
    pub prefill_sms: u32,
    /// While prompts are prefilled on the separate lane, decode steps start at least
    /// this many milliseconds apart (0: as soon as the decode lane has room), leaving
    /// the GPU to the prefill in between.
    #[serde(default)]
    pub decode_spacing_ms: u64,
}

/// How much of each GPU multiprocessor the separate prefill lane's attention takes.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrefillShare {
    /// As many blocks as fit (two): the fastest prefill.
    #[default]
    All,
    /// One block a multiprocessor, the other half of its registers left to the decode
    /// lane's kernels: steadier decoding while long prompts are prefilled, a slower
    /// prefill.
    Half,
}

/// Where prompts are prefilled.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrefillLane {
    /// `separate` on the cuda backend, `mixed` on the cpu backend.
    #[default]
    Auto,
    /// Prompt chunks ride in the decode steps (at most `prefill_chunk` tokens a step).
    Mixed,
    /// Prompts are prefilled on a second, lower-priority CUDA stream beside the decode
    /// steps (cuda only).
    Separate,
}

fn d_max_batch() -> usize {
    8
}
fn d_max_queue() -> usize {
    64
}
fn d_prefill_chunk() -> usize {
    512
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_batch: d_max_batch(),
            max_context: None,
            max_queue: d_max_queue(),
            prefill_chunk: d_prefill_chunk(),
            prefill_lane: PrefillLane::Auto,
            prefill_sm_share: PrefillShare::All,
            prefill_sms: 0,
            decode_spacing_ms: 0,
        }
    }
}

/// How ShadowKV moves value chunks to the GPU.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ValueFetch {
    /// Gather threads copy into pinned staging, a copy stream moves it.
    #[default]
    CpuGather,
    /// A GPU kernel reads the registered host pool directly.
    ZeroCopy,
}

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Micro-batches the batch is split into to overlap fetching and compute.
    #[serde(default = "d_micro_batches")]
    pub micro_batches: usize,
    /// Lanes that decode side by side, each its own share of the sequences on its own
    /// CUDA streams (each reading the weights), so one lane's value fetch overlaps the
    /// others' compute; beside the separate prefill lane, on one GPU.
    #[serde(default = "d_decode_lanes")]
    pub decode_lanes: usize,
    /// `cpu-gather` or `zero-copy`.
    #[serde(default)]
    pub value_fetch: ValueFetch,
    /// ShadowKV on the GPU: chunks per layer and KV head whose values stay in free GPU
    /// memory besides the selected ones (`0` = none, `auto` = what the memory left
    /// after `limits` holds).
    #[serde(default = "d_gpu_tier")]
    pub gpu_tier: AutoOr<usize>,
    /// ShadowKV on the GPU: of `limits.max_batch` sequences, how many keep their values
    /// in GPU memory (GPU value slots) rather than the host pool, which is sized for the
    /// others; read by the zero-copy fetch.
    #[serde(default)]
    pub gpu_value_slots: usize,
}

fn d_gpu_tier() -> AutoOr<usize> {
    AutoOr::Value(0)
}

fn d_micro_batches() -> usize {
    1
}

/// Most lanes that decode side by side on one GPU (`pipeline.decode_lanes`).
pub const MAX_DECODE_LANES: usize = 4;

fn d_decode_lanes() -> usize {
    1
}

impl Default for PipelineSection {
    fn default() -> Self {
        PipelineSection {
            micro_batches: 1,
            decode_lanes: 1,
            value_fetch: ValueFetch::CpuGather,
            gpu_tier: d_gpu_tier(),
            gpu_value_slots: 0,
        }
    }
}

/// One actor's threads and placement.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ActorSection {
    /// Threads (`auto`: as many as the cores allow).
    #[serde(default)]
    pub threads: AutoOr<usize>,
    /// Cores to pin to: `auto`, a list `[0, 1]` or ranges `"0-7,12"`.
    #[serde(default)]
    pub cores: Cores,
    /// NUMA node (`auto`: the one closest to the device).
    #[serde(default)]
    pub numa_node: AutoOr<u32>,
}

/// `[actors.*]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ActorsSection {
    /// Norms, GEMMs, attention, sampling (on the CPU backend: the matrix-product pool).
    #[serde(default)]
    pub compute: ActorSection,
    /// Landmark scoring and top-k selection.
    #[serde(default)]
    pub select: ActorSection,
    /// Value-chunk gathering from the host pools.
    #[serde(default)]
    pub gather: ActorSection,
    /// Host-to-device copies.
    #[serde(default)]
    pub transfer: ActorSection,
}

/// Memory behind a value pool.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolBacking {
    /// Anonymous memory.
    #[default]
    Anonymous,
    /// A memory-mapped file at `path`.
    File,
}

/// `[pools]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PoolsSection {
    /// `anonymous` or `file`.
    #[serde(default)]
    pub backing: PoolBacking,
    /// Directory or file of a file-backed pool.
    pub path: Option<PathBuf>,
    /// NUMA node to bind pool memory to.
    #[serde(default)]
    pub numa_node: AutoOr<u32>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// HTTP address of the API (and of `/metrics`).
    #[serde(default = "d_listen")]
    pub listen: String,
    /// A second address serving only `/metrics`, if wanted.
    pub metrics_listen: Option<String>,
    /// Seconds running requests may take to finish after SIGTERM/SIGINT.
    #[serde(default = "d_grace")]
    pub shutdown_grace_secs: f64,
    /// Largest request body in bytes.
    #[serde(default = "d_max_body")]
    pub max_request_bytes: usize,
    /// API keys clients must send as `Authorization: Bearer <key>` (a list, or one
    /// string). With the two settings below, all keys from all three are accepted; with
    /// none of the three, the API is open. [`Topology::api_keys`] gathers them.
    #[serde(default, deserialize_with = "api_keys::deserialize_keys")]
    pub api_keys: Vec<SecretString>,
    /// A file of API keys, one a line (blank lines and `#` comments skipped).
    pub api_keys_file: Option<PathBuf>,
    /// An environment variable holding API keys, separated by commas or whitespace.
    pub api_keys_env: Option<String>,
}

fn d_listen() -> String {
    "127.0.0.1:8000".into()
}
fn d_grace() -> f64 {
    30.0
}
fn d_max_body() -> usize {
    16 << 20
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: d_listen(),
            metrics_listen: None,
            shutdown_grace_secs: d_grace(),
            max_request_bytes: d_max_body(),
            api_keys: Vec::new(),
            api_keys_file: None,
            api_keys_env: None,
        }
    }
}

/// `[trace]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSection {
    /// Write a Chrome trace-event file.
    #[serde(default)]
    pub enabled: bool,
    /// Where.
    #[serde(default = "d_trace_path")]
    pub path: PathBuf,
}

fn d_trace_path() -> PathBuf {
    PathBuf::from("shadowkv-trace.json")
}

impl Default for TraceSection {
    fn default() -> Self {
        TraceSection {
            enabled: false,
            path: d_trace_path(),
        }
    }
}

/// An error in a topology file, with the key and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError {
    /// The file.
    pub file: String,
    /// The dotted key (`limits.max_batch`), when one is concerned.
    pub key: Option<String>,
    /// 1-based line and column, when the key or the error is in the file.
    pub line: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((l, c)) = self.line {
            write!(f, ", line {l}, column {c}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ", key `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for TopologyError {}

/// A serde message with Rust's type names said as a reader would: `expected usize`
/// becomes `expected a whole number >= 0`, `expected u16` `expected a whole number from
/// 0 to 65535` (so a value out of range reads right), `expected f64` `expected a number`.
pub fn plain_serde_message(message: &str) -> String {
    const NAMES: [(&str, &str); 12] = [
        ("usize", "a whole number >= 0"),
        ("u64", "a whole number >= 0"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("isize", "a whole number"),
        ("i64", "a whole number"),
        ("i32", "a whole number from -2147483648 to 2147483647"),
        ("i16", "a whole number from -32768 to 32767"),
        ("i8", "a whole number from -128 to 127"),
        ("f64", "a number"),
        ("f32", "a number"),
    ];
    let mut out = message.to_string();
    for (rust, plain) in NAMES {
        let from = format!("expected {rust}");
        let mut at = 0;
        while let Some(i) = out[at..].find(&from).map(|i| at + i) {
            let end = i + from.len();
            if out[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                at = end;
                continue;
            }
            out.replace_range(i..end, &format!("expected {plain}"));
            at = i;
        }
    }
    out
}

/// 1-based (line, column) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = offset - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

/// The dotted path of the deepest key whose key or value covers `pos`.
fn path_at(table: &DeTable, pos: usize) -> Option<(String, usize)> {
    for (k, v) in table.iter() {
        let (ks, vs) = (k.span(), v.span());
        let in_key = ks.start <= pos && pos < ks.end.max(ks.start + 1);
        let in_val = vs.start <= pos && pos < vs.end.max(vs.start + 1);
        if let DeValue::Table(t) = v.get_ref() {
            if let Some((sub, at)) = path_at(t, pos) {
                return Some((format!("{}.{sub}", k.get_ref()), at));
            }
        }
        if let DeValue::Array(a) = v.get_ref() {
            for (i, item) in a.iter().enumerate() {
                if let DeValue::Table(t) = item.get_ref() {
                    if let Some((sub, at)) = path_at(t, pos) {
                        return Some((format!("{}[{i}].{sub}", k.get_ref()), at));
                    }
                }
            }
        }
        if in_key || in_val {
            return Some((k.get_ref().to_string(), ks.start));
        }
    }
    None
}

/// Where the key `path` (dotted) is written: its key's offset.
fn find_key(table: &DeTable, path: &str) -> Option<usize> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == head)?;
    match (rest, v.get_ref()) {
        (None, _) => Some(k.span().start),
        (Some(r), DeValue::Table(t)) => find_key(t, r).or(Some(k.span().start)),
        (Some(_), _) => Some(k.span().start),
    }
}

impl Topology {
    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| TopologyError {
            file: file.clone(),
            key: None,
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&src, &file)
    }

    /// Parses and checks topology text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Topology, TopologyError> {
        let err = |key: Option<String>, line, message: String| TopologyError {
            file: file.to_string(),
            key,
            line,
            message,
        };
        let doc: Spanned<DeTable> = DeTable::parse(src).map_err(|e| {
            let line = e.span().map(|s| line_col(src, s.start));
            err(None, line, format!("not valid TOML: {}", e.message().trim()))
        })?;
        let mut t: Topology = toml::from_str(src).map_err(|e| {
            let (key, line) = match e.span() {
                Some(s) => match path_at(doc.get_ref(), s.start) {
                    Some((k, _)) => (Some(k), Some(line_col(src, s.start))),
                    None => (None, Some(line_col(src, s.start))),
                },
                None => (None, None),
            };
            err(key, line, plain_serde_message(e.message().trim()))
        })?;
        t.origin = Origin {
            file: file.to_string(),
            src: src.to_string(),
        };
        t.validate()?;
        Ok(t)
    }

    /// The file this topology came from.
    pub fn file(&self) -> &str {
        &self.origin.file
    }

    /// An error about `key` (dotted), located at the key's line when the file has it.
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> TopologyError {
        let line = DeTable::parse(&self.origin.src)
            .ok()
            .and_then(|doc| find_key(doc.get_ref(), key))
            .map(|off| line_col(&self.origin.src, off));
        TopologyError {
            file: self.origin.file.clone(),
            key: Some(key.to_string()),
            line,
            message: message.into(),
        }
    }

    /// Impossible values and combinations.
    fn validate(&self) -> Result<(), TopologyError> {
        let e = |k: &str, m: String| Err(self.error_at(k, m));
        let a = &self.attention;
        if a.chunk_size == 0 {
            return e("attention.chunk_size", "must be at least 1".into());
        }
        if a.budget < a.chunk_size || a.budget % a.chunk_size != 0 {
            return e(
                "attention.budget",
                format!(
                    "must be a positive multiple of attention.chunk_size ({}), got {}",
                    a.chunk_size, a.budget
                ),
            );
        }
        if a.rank == 0 {
            return e("attention.rank", "must be at least 1".into());
        }
        if a.local_chunks == 0 {
            return e("attention.local_chunks", "must be at least 1".into());
        }
        let l = &self.limits;
        if l.max_batch == 0 {
            return e("limits.max_batch", "must be at least 1".into());
        }
        if let Some(c) = l.max_context {
            if c < 2 {
                return e("limits.max_context", format!("must be at least 2 tokens, got {c}"));
            }
        }
        if l.prefill_chunk == 0 {
            return e("limits.prefill_chunk", "must be at least 1".into());
        }
        if l.prefill_lane == PrefillLane::Separate && self.backend.kind != BackendKind::Cuda {
            return e(
                "limits.prefill_lane",
                "`separate` prefills on a second CUDA stream: it needs backend.kind = \"cuda\"".into(),
            );
        }
        let separate = self.backend.kind == BackendKind::Cuda && l.prefill_lane != PrefillLane::Mixed;
        if l.prefill_sm_share == PrefillShare::Half && !separate {
            return e(
                "limits.prefill_sm_share",
                "`half` shares each GPU multiprocessor between the separate prefill lane and the decode steps: \
                 it needs backend.kind = \"cuda\" and limits.prefill_lane `separate` (or `auto`)"
                    .into(),
            );
        }
        if l.prefill_sms > 0 && !separate {
            return e(
                "limits.prefill_sms",
                "puts the separate prefill lane on a share of the GPU's multiprocessors: it needs backend.kind = \
                 \"cuda\" and limits.prefill_lane `separate` (or `auto`)"
                    .into(),
            );
        }
        if l.prefill_sms > 0 && self.backend.devices.is_some() {
            return e(
                "limits.prefill_sms",
                "a partition of the multiprocessors for the prefill lane is not yet supported on a tensor-parallel \
                 group (backend.devices; give backend.device for one GPU): its collectives have not run on one"
                    .into(),
            );
        }
        if l.decode_spacing_ms > 0 && !separate {
            return e(
                "limits.decode_spacing_ms",
                "spaces the decode steps while the separate prefill lane runs: it needs backend.kind = \"cuda\" \
                 and limits.prefill_lane `separate` (or `auto`)"
                    .into(),
            );
        }
        if l.decode_spacing_ms > 10_000 {
            return e(
                "limits.decode_spacing_ms",
                format!("{} ms between decode steps is more than 10 s", l.decode_spacing_ms),
            );
        }
        if let Some(list) = &self.backend.devices {
            if self.backend.device.is_some() {
                return e(
                    "backend.devices",
                    "give either backend.device or backend.devices, not both".into(),
                );
            }
            if list.is_empty() {
                return e("backend.devices", "must list at least one CUDA device ordinal".into());
            }
            for (i, d) in list.iter().enumerate() {
                if let Some(j) = list[..i].iter().position(|x| x == d) {
                    return e(
                        "backend.devices",
                        format!("device {d} is listed twice (entries {} and {})", j + 1, i + 1),
                    );
                }
            }
        }
        let p = &self.pipeline;
        if p.micro_batches == 0 || p.micro_batches > l.max_batch {
            return e(
                "pipeline.micro_batches",
                format!(
                    "must be between 1 and limits.max_batch ({}), got {}",
                    l.max_batch, p.micro_batches
                ),
            );
        }
        if p.decode_lanes != 1 {
            let why = if p.decode_lanes == 0 || p.decode_lanes > MAX_DECODE_LANES {
                Some(format!(
                    "must be between 1 and {MAX_DECODE_LANES}, got {}",
                    p.decode_lanes
                ))
            } else if p.decode_lanes > l.max_batch {
                Some(format!(
                    "{} decode lanes for at most limits.max_batch ({}) sequences",
                    p.decode_lanes, l.max_batch
                ))
            } else if !separate {
                Some(
                    "several decode lanes run beside the separate prefill lane: they need backend.kind = \"cuda\" and \
                     limits.prefill_lane `separate` (or `auto`)"
                        .into(),
                )
            } else if self.backend.devices.is_some() {
                Some("several decode lanes run on one GPU (backend.device), not a tensor-parallel group".into())
            } else {
                None
            };
            if let Some(why) = why {
                return e("pipeline.decode_lanes", why);
            }
        }
        if p.value_fetch == ValueFetch::ZeroCopy && self.backend.kind != BackendKind::Cuda {
            return e(
                "pipeline.value_fetch",
                "`zero-copy` needs a GPU: set backend.kind = \"cuda\" or use `cpu-gather`".into(),
            );
        }
        if p.gpu_tier != AutoOr::Value(0) && self.backend.kind != BackendKind::Cuda {
            return e(
                "pipeline.gpu_tier",
                "a GPU value tier needs a GPU: set backend.kind = \"cuda\" or gpu_tier = 0".into(),
            );
        }
        if p.gpu_value_slots > 0 {
            let why = if p.gpu_value_slots > l.max_batch {
                Some(format!(
                    "{} sequences' values in GPU memory of at most limits.max_batch ({}) sequences",
                    p.gpu_value_slots, l.max_batch
                ))
            } else if self.backend.kind != BackendKind::Cuda {
                Some("GPU value slots need a GPU: set backend.kind = \"cuda\" or gpu_value_slots = 0".into())
            } else if p.value_fetch == ValueFetch::CpuGather {
                Some(
                    "GPU value slots are read by the zero-copy fetch: set pipeline.value_fetch = \"zero-copy\" \
                     (cpu-gather's threads read host memory only) or gpu_value_slots = 0"
                        .into(),
                )
            } else {
                None
            };
            if let Some(why) = why {
                return e("pipeline.gpu_value_slots", why);
            }
        }
        for (name, actor) in [
            ("compute", &self.actors.compute),
            ("select", &self.actors.select),
            ("gather", &self.actors.gather),
            ("transfer", &self.actors.transfer),
        ] {
            if actor.threads == AutoOr::Value(0) {
                return e(
                    &format!("actors.{name}.threads"),
                    "must be at least 1 or \"auto\"".into(),
                );
            }
            if let (AutoOr::Value(n), Cores::List(c)) = (actor.threads, &actor.cores) {
                if n > c.len() {
                    return e(
                        &format!("actors.{name}.threads"),
                        format!("{n} threads cannot be pinned to the {} cores listed in cores", c.len()),
                    );
                }
            }
        }
        match (self.pools.backing, &self.pools.path) {
            (PoolBacking::File, None) => {
                return e("pools.backing", "a file-backed pool needs pools.path".into());
            }
            (PoolBacking::Anonymous, Some(_)) => {
                return e("pools.path", "is only used with pools.backing = \"file\"".into());
            }
            _ => {}
        }
        // The zero-copy fetch reads a pool pinned for the device, and the driver refuses to
        // pin a shared file mapping (CUDA_ERROR_INVALID_VALUE on the H200 host,
        // docs/perf/gpu.md 2026-12-02 session 20): a file pool is the host's to read and
        // write (cpu-gather).
        if self.pools.backing == PoolBacking::File
            && self.backend.kind == BackendKind::Cuda
            && a.mode == AttentionMode::Shadowkv
            && self.pipeline.value_fetch == ValueFetch::ZeroCopy
        {
            return e(
                "pipeline.value_fetch",
                "a file-backed value pool (pools.backing = \"file\") is read by the host: the CUDA driver does \
                 not pin a memory-mapped file for the zero-copy fetch; set pipeline.value_fetch = \"cpu-gather\" \
                 (or pools.backing = \"anonymous\")"
                    .into(),
            );
        }
        let s = &self.server;
        let listen = match s.listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                return e(
                    "server.listen",
                    format!("`{}` is not an address like 127.0.0.1:8000", s.listen),
                )
            }
        };
        if let Some(m) = &s.metrics_listen {
            match m.parse::<SocketAddr>() {
                Err(_) => {
                    return e(
                        "server.metrics_listen",
                        format!("`{m}` is not an address like 127.0.0.1:9100"),
                    )
                }
                Ok(a) if a == listen && a.port() != 0 => {
                    return e(
                        "server.metrics_listen",
                        "must differ from server.listen (leave it out to serve /metrics there)".into(),
                    )
                }
                Ok(_) => {}
            }
        }
        if !(s.shutdown_grace_secs.is_finite() && s.shutdown_grace_secs >= 0.0) {
            return e(
                "server.shutdown_grace_secs",
                format!("must be a number of seconds >= 0, got {}", s.shutdown_grace_secs),
            );
        }
        if s.max_request_bytes < 1024 {
            return e(
                "server.max_request_bytes",
                format!("must be at least 1024, got {}", s.max_request_bytes),
            );
        }
        self.check_api_key_settings()?;
        if self.trace.enabled && self.trace.path.as_os_str().is_empty() {
            return e("trace.path", "must name a file when trace.enabled = true".into());
        }
        if let Some(n) = &self.model.name {
            if n.trim().is_empty() {
                return e("model.name", "must not be empty".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
