//! Placing a pool's memory on a NUMA node (hwloc), so that the pages the value gather
//! and the GPU's reads touch sit on the node nearest the GPU; and the host's topology,
//! loaded once for everything in the process that asks hwloc.

use anyhow::{anyhow, ensure, Result};
use hwlocality::bitmap::BitmapIndex;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::memory::nodeset::NodeSet;
use hwlocality::Topology;
use std::sync::OnceLock;

/// This host's topology, loaded once.
pub fn host_topology() -> Result<&'static Topology, String> {
    static HOST: OnceLock<Result<Topology, String>> = OnceLock::new();
    HOST.get_or_init(|| Topology::new().map_err(|e| format!("hwloc cannot read this host: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

/// Binds `area` to NUMA node `node` (its OS index) as a preference: its pages not yet
/// touched are allocated there while the node has room, elsewhere after (a strict
/// binding would have the kernel kill the process instead). Pages already touched stay
/// where they are, so bind a fresh map. Fails, naming the node, where the host has no
/// such node or cannot bind memory.
pub fn bind_area(area: &[u8], node: u32) -> Result<()> {
    let topo = host_topology().map_err(|e| anyhow!(e))?;
    let index = BitmapIndex::try_from(node as usize).map_err(|_| anyhow!("NUMA node {node} is not a node number"))?;
    ensure!(
        topo.allowed_nodeset().is_set(index),
        "NUMA node {node} is not one this process may use (nodes {})",
        topo.allowed_nodeset()
    );
    let mut set = NodeSet::new();
    set.set(index);
    // Without MemoryBindingFlags::STRICT, hwloc's Bind is the kernel's preferred policy.
    topo.bind_memory_area(area, &set, MemoryBindingPolicy::Bind, MemoryBindingFlags::empty())
        .map_err(|e| anyhow!("binding {} bytes to NUMA node {node}: {e}", area.len()))
}
