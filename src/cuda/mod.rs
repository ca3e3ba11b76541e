//! The CUDA backend: bf16 storage, fp32 arithmetic, kernels compiled at run time.
//!
//! - [`device`]: the context, the compute stream, events and device buffers
//!   ([`CudaDevice::new`] returns [`DeviceError::Unavailable`] without a driver or GPU).
//! - [`nvrtc`]: compiles `kernels/*.cu` for the device's architecture with NVRTC and
//!   caches the machine code on disk.
//! - [`ops`]: embedding gather, RMSNorm fused with the residual add, RoPE, SwiGLU and
//!   the cuBLAS `linear`, with the same meaning as the CPU reference in [`crate::cpu`].
//! - [`attention`]: flash-decoding over each sequence's KV cache.
//! - [`testing`]: open the device or skip (used by `tests/cuda_*.rs`).
//!
//! cudarc loads libcuda, libnvrtc and libcublas at run time, so the crate builds and
//! runs without CUDA; only calling into this module needs it.

pub mod attention;
pub mod device;
pub mod kernels;
pub mod nvrtc;
pub mod ops;
pub mod prefill;
pub mod step;
pub mod testing;

pub use attention::{DecodeWorkspace, KvTable};
pub use device::{CudaDevice, DeviceError, DeviceInfo};
pub use ops::{rope_inv_freq, CudaOps};
