//! Sampling, the generation loop and the continuous-batching scheduler on top of a backend.

pub mod backend;
pub mod backend_cuda;
pub mod backend_tp;
pub mod generate;
pub mod sampling;
pub mod scheduler;
pub mod text;
pub mod worker;
