//! Models: configs, weight files (safetensors, GGUF), tokenizers, chat templates and
//! synthetic weights. Everything here produces plain f32 tensors in the Hugging Face
//! layout; the backends never see a file format. [`shard`] plans how the weights split
//! over several devices (tensor parallelism).

pub mod chat;
pub mod config;
pub mod gguf;
pub mod gguf_model;
pub mod load;
pub mod safetensors_dir;
pub mod shard;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;
pub mod weights;
