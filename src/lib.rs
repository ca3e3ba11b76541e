//! shadowkv: long-context LLM inference implementing ShadowKV.
//!
//! Imports run one way through the modules, each using only those before it:
//! [`model`] (configs, weight files, tokenizer, chat templates, synthetic weights) →
//! [`cpu`] (the numerical reference backend) → [`pool`] (value pools) → [`shadow`] (the
//! ShadowKV algorithm; its values live in pools) → [`cuda`] (the bf16 GPU backend, whose
//! ShadowKV stages take the algorithm's settings and host parts from [`shadow`]) →
//! [`pipeline`] (the decode pipeline's actors and their placement) → [`engine`]
//! (sampling, generation, continuous batching) → [`server`] (OpenAI-compatible HTTP)
//! and [`eval`] (long-context evaluation), neither using the other → [`cli`];
//! [`topology`] (the `serve` configuration), [`telemetry`] (metrics, traces) and
//! [`panics`] (a caught panic's text) beside them, importing none of the others. No
//! two modules use each other, directly or through others. `tests/layering.rs` checks
//! both.

pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod engine;
pub mod eval;
pub mod model;
pub mod panics;
pub mod pipeline;
pub mod pool;
pub mod server;
pub mod shadow;
pub mod telemetry;
pub mod topology;
