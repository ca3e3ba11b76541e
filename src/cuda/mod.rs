//! The CUDA backend: bf16 storage, fp32 arithmetic, kernels compiled at run time.
//!
//! - [`device`]: the context, the compute stream, events and device buffers
//!   ([`CudaDevice::new`] returns [`DeviceError::Unavailable`] without a driver or GPU).
//! - [`green`]: streams on a share of the multiprocessors (green contexts).
//! - [`nvrtc`]: compiles `kernels/*.cu` for the device's architecture with NVRTC and
//!   caches the machine code on disk.
//! - [`ops`]: embedding gather, RMSNorm fused with the residual add, RoPE, SwiGLU and
//!   `linear` (a streaming GEMV for one or two rows, cuBLAS otherwise), with the same
//!   meaning as the CPU reference in [`crate::cpu`].
//! - [`attention`]: flash-decoding over each sequence's KV cache; [`prefill`]: causal
//!   flash attention for prefill chunks.
//! - [`step`]: the qkv split into the KV caches, and sampling on the device.
//! - [`model`]: the whole model (weights, caches, batched forward pass); [`graph`]:
//!   sampling steps, decode steps replayed from CUDA graphs, lanes (streams of their
//!   own) that queue steps asynchronously.
//! - [`shadow`]: ShadowKV's kernels (selection, reuse diff, key rebuild, value fetch,
//!   prefill compression, append and fold) on a layout defined once.
//! - [`nccl`]: finding and loading NCCL (NVLink multicast kept off), communicators and
//!   the collectives of tensor parallelism.
//! - [`testing`]: open the device or skip (used by `tests/cuda_*.rs`).
//!
//! cudarc loads libcuda, libnvrtc and libcublas at run time, so the crate builds and
//! runs without CUDA; only calling into this module needs it.

pub mod attention;
pub mod device;
pub mod graph;
pub mod green;
pub mod kernels;
pub mod model;
pub mod nccl;
pub mod nvrtc;
pub mod ops;
pub mod parallel;
pub mod prefill;
pub mod shadow;
pub mod step;
pub mod testing;

pub use attention::{DecodePass, DecodeWorkspace, KvTable, PendingSlots, MAX_PENDING_SLOTS};
pub use device::{CudaDevice, DeviceError, DeviceInfo, PciBusId, StreamPriority};
pub use graph::{Lane, ShadowCounters, StepGraphs, StepTicket};
pub use model::{CudaModel, GpuCache, GpuSeq};
pub use ops::{rope_inv_freq, CudaOps};
