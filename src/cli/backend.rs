//! `--backend cpu|cuda` and loading a model onto the GPU.

use crate::cuda::shadow::decode::FetchPath;
use crate::cuda::shadow::TierSize;
use crate::cuda::{CudaDevice, CudaModel, CudaOps, DeviceError};
use crate::engine::backend_tp::TpWeights;
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
    /// CUDA device ordinal (with --backend cuda; default 0).
    #[arg(long)]
    pub device: Option<usize>,
    /// CUDA device ordinals of a tensor-parallel group, comma-separated (`0,1`): the
    /// model is split over them (NCCL joins them; one entry runs the group's code on
    /// one GPU). Not with --device.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "device")]
    pub devices: Option<Vec<usize>>,
    /// Launch every decode step's kernels one by one instead of replaying a captured
    /// CUDA graph (with --backend cuda).
    #[arg(long)]
    pub no_graph: bool,
    /// How ShadowKV on the GPU fetches the missed value chunks from host memory:
    /// `zero-copy` (a kernel reads the registered pool over PCIe) or `cpu-gather` (host
    /// threads gather them into pinned staging, copied in one transfer). With `bench`
    /// only, a comma-separated list: each is measured.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![ValueFetch::ZeroCopy])]
    pub value_fetch: Vec<ValueFetch>,
    /// ShadowKV's GPU value tier: besides the selected chunks, keep chunks' values in
    /// free GPU memory (a FIFO cache per layer and KV head, filled with the newest chunks
    /// at prefill), so a missed chunk found there is not read over PCIe. `off`, `auto`
    /// (as many chunks as the free memory holds once the batch fits) or a number of
    /// chunks per KV head. With `bench` only, a comma-separated list: each is measured.
    #[arg(long, value_delimiter = ',', default_values_t = vec![TierSize::Off])]
    pub gpu_tier: Vec<TierSize>,
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

/// The GPUs a command runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gpus {
    /// One GPU, the whole model on it (`--device`).
    One(usize),
    /// A tensor-parallel group, in rank order (`--devices`).
    Group(Vec<usize>),
}

impl CudaArgs {
    /// The GPUs to run on: `--device`, or the group of `--devices`. A list with a
    /// repeated ordinal is an error naming `--devices`.
    pub fn gpus(&self) -> Result<Gpus> {
        let Some(list) = &self.devices else {
            return Ok(Gpus::One(self.device.unwrap_or(0)));
        };
        for (i, d) in list.iter().enumerate() {
            if list[..i].contains(d) {
                anyhow::bail!("--devices lists GPU {d} twice");
            }
        }
        Ok(Gpus::Group(list.clone()))
    }

    /// Refuses GPU settings on the CPU backend: a GPU value tier (the CPU backend keeps
    /// every value in host memory), a tensor-parallel group and a device.
    pub fn refuse_gpu_settings_on_cpu(&self) -> Result<()> {
        if self.gpu_tier.iter().any(|&t| t != TierSize::Off) {
            anyhow::bail!("--gpu-tier needs --backend cuda (the CPU backend has no GPU memory to keep values in)");
        }
        if let Some(list) = &self.devices {
            anyhow::bail!(
                "--devices {} needs --backend cuda (the CPU backend runs on this host's cores)",
                join(list)
            );
        }
        if let Some(d) = self.device {
            anyhow::bail!("--device {d} needs --backend cuda (the CPU backend runs on this host's cores)");
        }
        if self.value_fetch != [ValueFetch::ZeroCopy] {
            anyhow::bail!(
                "--value-fetch needs --backend cuda (the CPU backend reads its value pool in place: nothing crosses PCIe)"
            );
        }
        if self.no_graph {
            anyhow::bail!("--no-graph needs --backend cuda (the CPU backend launches no kernels)");
        }
        Ok(())
    }

    /// The one GPU value tier of a command that runs one (`generate`, `eval`).
    pub fn one_tier(&self) -> Result<TierSize> {
        match self.gpu_tier.as_slice() {
            [t] => Ok(*t),
            _ => anyhow::bail!("--gpu-tier takes one size here, not a list"),
        }
    }

    /// The one fetch path of a command that runs one (`generate`, `eval`).
    pub fn one_fetch(&self) -> Result<FetchPath> {
        match self.value_fetch.as_slice() {
            [f] => Ok(f.path()),
            _ => anyhow::bail!("--value-fetch takes one path here, not a list"),
        }
    }
}

/// `0,1` for a list of ordinals.
fn join(list: &[usize]) -> String {
    list.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Opens GPU `ordinal` (`--device`) for `--backend cuda`; a missing GPU is an error
/// naming the flag.
pub fn open_gpu(ordinal: usize) -> Result<CudaDevice> {
    CudaDevice::new(ordinal).map_err(|e| match e {
        DeviceError::Unavailable(why) => anyhow::anyhow!("--backend cuda: no usable GPU ({why})"),
        e => e.into(),
    })
}

/// Where each device of a group takes its weights from for the model `spec`:
/// `synthetic:` weights are made on each device, others read from their files.
pub fn tp_weights<'a>(spec: &str, m: &'a OpenedModel) -> Result<TpWeights<'a>> {
    Ok(match synthetic_spec(spec)? {
        Some((_, seed)) => TpWeights::Synthetic(seed),
        None => TpWeights::Source(m.source.as_ref()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cmd {
        #[command(flatten)]
        cuda: CudaArgs,
    }

    fn parse(args: &[&str]) -> Result<CudaArgs, clap::Error> {
        Cmd::try_parse_from(std::iter::once("cmd").chain(args.iter().copied())).map(|c| c.cuda)
    }

    #[test]
    fn one_device_or_a_group() {
        assert_eq!(parse(&[]).unwrap().gpus().unwrap(), Gpus::One(0));
        assert_eq!(parse(&["--device", "3"]).unwrap().gpus().unwrap(), Gpus::One(3));
        let one = parse(&["--devices", "2"]).unwrap();
        assert_eq!(one.gpus().unwrap(), Gpus::Group(vec![2]));
        assert_eq!(
            parse(&["--devices", "1,0"]).unwrap().gpus().unwrap(),
            Gpus::Group(vec![1, 0])
        );
    }

    #[test]
    fn device_lists_are_refused_with_reasons() {
        let two = parse(&["--devices", "0,1"]).unwrap();
        assert_eq!(two.devices, Some(vec![0, 1]));
        let e = parse(&["--devices", "1,0,1"]).unwrap().gpus().unwrap_err().to_string();
        assert_eq!(e, "--devices lists GPU 1 twice");
        let e = parse(&["--device", "0", "--devices", "0,1"]).unwrap_err().to_string();
        assert!(e.contains("--devices") && e.contains("--device "), "{e}");
        assert!(parse(&["--devices", "0,x"]).is_err());
        assert!(parse(&["--devices"]).is_err());
    }
}
