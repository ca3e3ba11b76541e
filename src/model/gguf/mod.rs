//! GGUF v3 (and v2) model files: a validating, memory-mapped reader, bit-exact
//! dequantisation of the common ggml types, and a small writer used by tests.
//!
//! Layout reference: the GGUF spec (ggml `docs/gguf.md`) and ggml's `block_*` structs.

mod dequant;
mod read;
mod types;
mod write;

pub use dequant::dequantize;
pub use read::{GgufFile, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS};
pub use types::{GgmlType, GgufTensorInfo, GgufValue};
pub use write::GgufWriter;
