//! Sampling and the generation loop on top of a backend.

pub mod generate;
pub mod sampling;
pub mod text;
