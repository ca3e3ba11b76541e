//! NCCL, the collectives of tensor parallelism: finding the library ([`find`]) and the
//! few entry points the engine calls ([`comm`]: communicators, all-reduce, all-gather).
//!
//! cudarc has NCCL bindings, but they look for `libnccl.so` (the development link,
//! absent where only NCCL's runtime is installed, which names itself `libnccl.so.2`) and
//! panic when it cannot be loaded. The engine needs an error that names the library and
//! where it looked, so [`comm::Nccl`] loads the file [`find::find_nccl`] found and
//! resolves its symbols itself: NCCL does the communication, nothing here reduces.

pub mod comm;
pub mod find;

pub use comm::{Comm, Nccl, UniqueId};
pub use find::{disable_nvlink_multicast, find_in, find_nccl, search_dirs, NotFound, LIBRARY};
