//! The CPU backend: an f32 forward pass that is the numerical reference for every
//! other backend. Matrix products go through the `gemm` crate on the rayon pool.

pub mod attention;
pub mod codes8;
pub mod kv_cache;
pub mod matmul;
pub mod model;
pub mod ops;

pub use kv_cache::{CompressedSeq, Compressor, SeqCache, SeqKvCache};
pub use model::{CpuModel, LogitsWanted, SeqInput};
