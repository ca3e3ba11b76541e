//! The decode pipeline's actors and their placement.
//!
//! [`actor`] is one actor: a named thread pinned to its cores with one bounded inbox;
//! [`gather`] the gather threads that copy missed value chunks into staging.
//! [`machine`] reads the machine's NUMA nodes, cores and the locality of a GPU from
//! hwloc into plain data, [`placement`] turns the topology file's `[actors.*]` and
//! `[pools]` settings into concrete cores and nodes for each [`Role`] (resolving `auto`,
//! refusing the impossible), and [`pin`] pins a thread to its cores.

pub mod actor;
pub mod gather;
pub mod machine;
pub mod pin;
pub mod placement;

pub use actor::{Actor, ActorSpec};
pub use gather::GatherPool;
pub use machine::{DeviceLocality, Machine, NumaNode};
pub use placement::{ActorPlacement, Placement, Role};
