//! Long-context evaluation: RULER-style synthetic tasks scored for several attention
//! methods side by side, and teacher-forced fidelity of ShadowKV against full attention.

pub mod fidelity;
pub mod haystack;
pub mod run;
pub mod tasks;
