//! shadowkv: long-context LLM inference implementing ShadowKV.
//!
//! Data flows one way through the modules: [`model`] (configs, weight files,
//! tokenizer, chat templates, synthetic weights) → [`cpu`] (the numerical reference
//! backend) → [`engine`] (sampling and generation).

pub mod cli;
pub mod cpu;
pub mod engine;
pub mod model;
pub mod topology;
