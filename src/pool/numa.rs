//! Binding a pool's memory to a NUMA node (hwloc), so that the pages the value gather
//! and the GPU's reads touch sit on the node nearest the GPU.

use anyhow::{anyhow, ensure, Result};
use hwlocality::bitmap::BitmapIndex;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::memory::nodeset::NodeSet;
use hwlocality::Topology;

fn host() -> Result<Topology> {
    Topology::new().map_err(|e| anyhow!("hwloc cannot read this host: {e}"))
}

/// Binds `area` to NUMA node `node` (its OS index): its pages not yet touched will be
/// allocated there (pages already touched stay where they are, so bind a fresh map).
/// Fails, naming the node, where the host has no such node or cannot bind memory.
pub fn bind_area(area: &[u8], node: u32) -> Result<()> {
    let topo = host()?;
    let index = BitmapIndex::try_from(node as usize).map_err(|_| anyhow!("NUMA node {node} is not a node number"))?;
    ensure!(
        topo.allowed_nodeset().is_set(index),
        "NUMA node {node} is not one this process may use (nodes {})",
        topo.allowed_nodeset()
    );
    let mut set = NodeSet::new();
    set.set(index);
    topo.bind_memory_area(area, &set, MemoryBindingPolicy::Bind, MemoryBindingFlags::empty())
        .map_err(|e| anyhow!("binding {} bytes to NUMA node {node}: {e}", area.len()))
}

/// The NUMA nodes `area` is bound to (its OS indices), and whether the binding is
/// strict (`Bind`) rather than a preference or the default.
pub fn area_binding(area: &[u8]) -> Result<(Vec<u32>, bool)> {
    let topo = host()?;
    let (set, policy): (NodeSet, _) = topo
        .area_memory_binding(area, MemoryBindingFlags::empty())
        .map_err(|e| anyhow!("reading the binding of {} bytes: {e}", area.len()))?;
    let nodes = set.iter_set().map(|i| usize::from(i) as u32).collect();
    Ok((nodes, policy == Some(MemoryBindingPolicy::Bind)))
}
