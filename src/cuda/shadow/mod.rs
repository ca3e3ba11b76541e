//! ShadowKV on the GPU, the kernel layer: each stage of the CPU reference
//! ([`crate::shadow`]) as batched kernels with plain device data between them.
//!
//! - [`layout`]: the buffers of one sequence and layer and their rows, defined once
//!   ([`ShadowLayout`]), and the per-sequence tables the kernels read.
//! - [`buffers`]: the buffers ([`LayerBuffers`]), a batch's table ([`ShadowTable`]) and
//!   a decode step's scratch ([`StepScratch`]).
//! - Prefill, per layer and sequence: [`factor`] (the low-rank pre-RoPE keys, `u` and
//!   `sv`), [`landmarks`] (landmarks, outlier chunks, the exact outlier and recent rows,
//!   the values to the value pool).
//! - Decode, per layer, one launch per stage for the whole batch: [`append`] (the new
//!   token into the recent window) → [`select`] (scores, top-k) → [`reuse`] (the slot
//!   diff) → [`fetch`] (values of the misses) | [`rebuild`] (keys of the misses) →
//!   attention with [`crate::cuda::CudaOps::flash_decode`], one entry per (sequence,
//!   KV head) over [`ShadowLayout::attended_rows`], the slots' values read in 8 bits
//!   ([`crate::cuda::KvTable::with_value_chunks`]) → [`fold`] (a full recent window's
//!   oldest chunk into the sparse region); [`decode`] runs them in order for a step
//!   ([`ShadowStep`]), fetching by zero-copy or cpu-gather ([`transfer`]: the gather
//!   actor a step's stream waits for in host functions; its host side, free of CUDA
//!   calls, in `gather_actor`).
//! - [`tier`]: the GPU value tier, a FIFO cache of chunks' values in free device memory
//!   that the reuse diff consults before a miss is fetched from the host.
//! - A sequence ([`seq`]): its buffers of every layer, made from a dense prefill by
//!   [`crate::cuda::CudaModel::compress_shadow`] ([`compress`]: the factorisation of
//!   the layers on worker streams beside the rest); its values in the registered host
//!   pool or a GPU value slot ([`pool`]).
//! - [`timeline`]: a step's stage events as spans on its streams (`bench --trace`).

pub mod append;
pub mod buffers;
pub mod compress;
pub mod decode;
pub mod factor;
pub mod fetch;
pub mod fold;
mod gather_actor;
pub mod landmarks;
pub mod layout;
pub mod pool;
pub mod rebuild;
pub mod reuse;
pub mod select;
pub mod seq;
pub mod stages;
pub mod tier;
pub mod timeline;
pub mod transfer;

pub use buffers::{LayerBuffers, ShadowTable, ShadowTables, StepScratch};
pub use compress::{compress_prefill, CompressStage, CompressTimes, CompressWorkspace};
pub use decode::ShadowStep;
pub use factor::{FactorMethod, FactorWorkspace};
pub use fetch::{HostMapping, FETCH_BLOCKS};
pub use gather_actor::{ChunkGather, GatherTimes, RayonGather};
pub use layout::{DevicePool, SeqAddrs, SeqCounts, ShadowLayout};
pub use pool::{GpuValuePool, ValueLease, ValueSlots};
pub use rebuild::RebuildLists;
pub use seq::GpuShadowSeq;
pub use tier::TierSize;
