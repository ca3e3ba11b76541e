//! `--backend cpu|cuda` and loading a model onto the GPU.

use crate::cuda::{CudaDevice, CudaModel, CudaOps, DeviceError};
use crate::model::load::{synthetic_spec, OpenedModel};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The f32 CPU reference.
    Cpu,
    /// bf16 on an NVIDIA GPU (full attention).
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
