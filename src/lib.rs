//! shadowkv: long-context LLM inference implementing ShadowKV.
//!
//! Data flows one way through the modules: [`model`] (configs, weight files,
//! tokenizer, chat templates, synthetic weights) → [`cpu`] (the numerical reference
//! backend) → [`shadow`] (the ShadowKV algorithm) → [`pool`] (value pools) →
//! [`pipeline`] (the decode pipeline's actors and their placement) → [`engine`] (sampling, generation, continuous batching) → [`server`]
//! (OpenAI-compatible HTTP); [`eval`] (long-context evaluation), [`topology`] (the
//! `serve` configuration) and [`telemetry`] (metrics, traces) beside them.

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
