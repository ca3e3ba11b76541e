//! The ShadowKV algorithm on the CPU reference: low-rank pre-RoPE keys, chunk
//! landmarks, outlier chunks, a local window, values in a host pool, and per decode
//! step the select → reuse diff → fetch values / rebuild keys → attend stages, each a
//! plain function with plain data between them so that other backends can run them in
//! separate actors and streams.

pub mod cache;
pub mod factor;
pub mod landmarks;
pub mod params;
pub mod reuse;
pub mod select;
pub mod seq;
pub mod subspace;

pub use cache::{prefill_cache, shadow_stats};
pub use params::{Attention, ShadowParams};
pub use seq::{ShadowSeq, ShadowStats};
