//! shadowkv: long-context LLM inference implementing ShadowKV.
//!
//! Data flows one way through the modules: [`model`] (configs, weight files,
//! tokenizer, chat templates, synthetic weights) → [`cpu`] and [`cuda`] (the numerical
//! reference backend; the bf16 GPU backend) → [`shadow`] (the ShadowKV algorithm) →
//! [`pool`] (value pools) → [`pipeline`] (the decode pipeline's actors and their
//! placement) → [`engine`] (sampling, generation, continuous batching) → [`server`]
//! (OpenAI-compatible HTTP); [`eval`] (long-context evaluation), [`topology`] (the
//! `serve` configuration) and [`telemetry`] (metrics, traces) beside them.
//!
//! One exception to the order: `cuda::shadow`, ShadowKV's GPU stages, sits above
//! [`shadow`] and [`pool`] (it checks itself against the CPU reference's types and
//! writes values into a host pool), so it is the GPU's layer beside [`pipeline`], not
//! below [`shadow`].

pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod eval;
pub mod model;
pub mod pipeline;
pub mod pool;
pub mod server;
pub mod shadow;
pub mod telemetry;
pub mod topology;
