//! The decode pipeline's actors: threads pinned to cores, each with one inbox
//! ([`actor`]), and the gather threads that copy value chunks into staging
//! ([`gather`]).

pub mod actor;
pub mod gather;
pub mod pin;

pub use actor::{Actor, ActorSpec};
pub use gather::GatherPool;
