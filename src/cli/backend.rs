//! `--backend cpu|cuda` and loading a model onto the GPU.

use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::{CudaDevice, CudaModel, CudaOps, DeviceError};
use crate::model::load::{synthetic_spec, OpenedModel};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The f32 CPU reference.
    Cpu,
    /// bf16 on an NVIDIA GPU (full attention or ShadowKV).
    Cuda,
}

/// Options of the CUDA backend.
#[derive(Args, Debug, Clone)]
pub struct CudaArgs {
    /// CUDA device ordinal (with --backend cuda).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Launch every decode step's kernels one by one instead of replaying a captured
    /// CUDA graph (with --backend cuda).
    #[arg(long)]
    pub no_graph: bool,
    /// How ShadowKV on the GPU fetches the missed value chunks from host memory:
    /// `zero-copy` (a kernel reads the registered pool over PCIe) or `cpu-gather` (host
    /// threads gather them into pinned staging, copied in one transfer). `bench` takes
    /// a list and measures each.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![ValueFetch::ZeroCopy])]
    pub value_fetch: Vec<ValueFetch>,
}

/// How ShadowKV on the GPU fetches missed values (`--value-fetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ValueFetch {
    /// A kernel reads the registered host pool over PCIe.
    ZeroCopy,
    /// Host threads gather into pinned staging; one copy to the GPU.
    CpuGather,
}

impl ValueFetch {
    /// The decode path's setting.
    pub fn path(self) -> FetchPath {
        match self {
            ValueFetch::ZeroCopy => FetchPath::ZeroCopy,
            ValueFetch::CpuGather => FetchPath::CpuGather,
        }
    }

    /// The name as typed on the command line.
    pub fn label(self) -> &'static str {
        match self {
            ValueFetch::ZeroCopy => "zero-copy",
            ValueFetch::CpuGather => "cpu-gather",
        }
    }
}

impl CudaArgs {
    /// The one fetch path of a command that runs one (`generate`, `eval`).
    pub fn one_fetch(&self) -> Result<FetchPath> {
        match self.value_fetch.as_slice() {
            [f] => Ok(f.path()),
            _ => anyhow::bail!("--value-fetch takes one path here, not a list"),
        }
    }
}

/// Opens GPU `--device` for `--backend cuda`; a missing GPU is an error naming the flag.
pub fn open_gpu(a: &CudaArgs) -> Result<CudaDevice> {
    CudaDevice::new(a.device).map_err(|e| match e {
        DeviceError::Unavailable(why) => anyhow::anyhow!("--backend cuda: no usable GPU ({why})"),
        e => e.into(),
    })
}

/// Puts the model `spec` on the opened GPU: `synthetic:` weights are generated on the
/// device, other models are uploaded from their files one block at a time.
pub fn load_cuda_model(dev: CudaDevice, spec: &str, m: &OpenedModel, progress: bool) -> Result<CudaModel> {
    let ops = CudaOps::new(dev).context("starting the CUDA backend")?;
    match synthetic_spec(spec)? {
        Some((_, seed)) => CudaModel::synthetic(ops, m.config.clone(), seed, progress),
        None => CudaModel::from_source(ops, m.config.clone(), m.source.as_ref(), progress),
    }
}
