//! The decode pipeline's actors and their placement.
//!
//! Today: where each actor runs. [`machine`] reads the machine's NUMA nodes, cores and
//! the locality of a GPU from hwloc into plain data, [`placement`] turns the topology
//! file's `[actors.*]` and `[pools]` settings into concrete cores and nodes (resolving
//! `auto`, refusing the impossible), and [`pin`] pins a thread to its cores.

pub mod machine;
pub mod pin;
pub mod placement;

pub use machine::{DeviceLocality, Machine, NumaNode};
pub use placement::{Actor, ActorPlacement, Placement};
