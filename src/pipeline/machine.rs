//! The machine as placement sees it: NUMA nodes, their cores, and where a GPU sits,
//! read from hwloc into plain data.
//!
//! Core numbers are the operating system's CPU numbers (what `taskset`, `lscpu` and
//! `/proc/cpuinfo` show; hwloc's PU OS indices). Only the CPUs this process may run on
//! are listed: hwloc leaves out the ones a cgroup or `taskset` forbids.

use anyhow::{anyhow, bail, Context, Result};
use hwlocality::bitmap::BitmapRef;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;
use hwlocality::Topology as Hwloc;
use std::fmt;

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The node's number (its OS index, as `numactl` and the topology file count).
    pub index: u32,
    /// Every CPU of the node, ascending.
    pub cpus: Vec<usize>,
    /// One CPU per physical core (its first hardware thread), ascending: what `auto`
    /// placement hands out, so two actors never land on sibling hyperthreads.
    pub cores: Vec<usize>,
}

/// Where a GPU sits, as hwloc sees its PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLocality {
    /// The PCI bus id looked up, `dddd:bb:dd.f`.
    pub bus_id: String,
    /// Whether hwloc lists the device at all.
    pub found: bool,
    /// The one NUMA node the device is attached to, if it reports one.
    pub node: Option<u32>,
    /// The CPUs close to the device (its first non-I/O ancestor's), ascending.
    pub cpus: Vec<usize>,
}

/// The machine: its NUMA nodes (by index, ascending) and, when asked for, a GPU's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// NUMA nodes, ascending by index; memory-only nodes have no CPUs.
    pub nodes: Vec<NumaNode>,
    /// The device looked up by [`Machine::read`], if any.
    pub device: Option<DeviceLocality>,
}

/// Where to read the machine from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// This host.
    Host,
    /// An hwloc synthetic description, e.g. `"pack:2 numa:1 core:8 pu:1"`.
    Synthetic(&'a str),
    /// An hwloc XML export (as `lstopo file.xml` writes), which may list PCI devices.
    Xml(&'a str),
}

impl fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Host => f.write_str("this host"),
            Source::Synthetic(s) => write!(f, "the synthetic topology `{s}`"),
            Source::Xml(_) => f.write_str("the XML topology"),
        }
    }
}

fn cpus_of(set: Option<BitmapRef<'_, CpuSet>>) -> Vec<usize> {
    set.map(|s| s.iter_set().map(usize::from).collect()).unwrap_or_default()
}

impl Machine {
    /// Reads the machine from `source`; with `device_bus_id` (`dddd:bb:dd.f`, see
    /// [`crate::cuda::PciBusId`]) also where that PCI device sits.
    pub fn read(source: Source<'_>, device_bus_id: Option<&str>) -> Result<Machine> {
        let what = || format!("reading the machine's topology from {source} with hwloc");
        let mut b = Hwloc::builder();
        b = match source {
            Source::Host => b,
            Source::Synthetic(s) => b.from_synthetic(s).map_err(|e| anyhow!("{e}")).with_context(what)?,
            Source::Xml(x) => b.from_xml(x).map_err(|e| anyhow!("{e}")).with_context(what)?,
        };
        if device_bus_id.is_some() {
            b = b
                .with_io_type_filter(TypeFilter::KeepImportant)
                .map_err(|e| anyhow!("{e}"))
                .with_context(what)?;
        }
        let topo = b.build().map_err(|e| anyhow!("{e}")).with_context(what)?;
        let mut machine = Self::from_hwloc(&topo);
        if machine.nodes.iter().all(|n| n.cpus.is_empty()) {
            bail!("{}: hwloc found no CPUs this process may use", what());
        }
        if let Some(id) = device_bus_id {
            machine.device = Some(Self::locate(&topo, id)?);
        }
        Ok(machine)
    }

    fn from_hwloc(topo: &Hwloc) -> Machine {
        let allowed: Vec<usize> = cpus_of(Some(topo.allowed_cpuset()));
        let cores: Vec<(Vec<usize>, usize)> = topo
            .objects_with_type(ObjectType::Core)
            .filter_map(|c| {
                let cpus: Vec<usize> = cpus_of(c.cpuset())
                    .into_iter()
                    .filter(|p| allowed.contains(p))
                    .collect();
                let first = *cpus.first()?;
                Some((cpus, first))
            })
            .collect();
        let mut nodes: Vec<NumaNode> = topo
            .objects_with_type(ObjectType::NUMANode)
            .map(|n| {
                let cpus: Vec<usize> = cpus_of(n.cpuset())
                    .into_iter()
                    .filter(|p| allowed.contains(p))
                    .collect();
                let mut node_cores: Vec<usize> = cores
                    .iter()
                    .filter(|(c, _)| c.iter().all(|p| cpus.contains(p)))
                    .map(|&(_, first)| first)
                    .collect();
                if node_cores.is_empty() {
                    // A topology without Core objects: each CPU is a core.
                    node_cores = cpus.clone();
                }
                node_cores.sort_unstable();
                NumaNode {
                    index: n.os_index().unwrap_or(0) as u32,
                    cpus,
                    cores: node_cores,
                }
            })
            .collect();
        nodes.sort_by_key(|n| n.index);
        Machine { nodes, device: None }
    }

    fn locate(topo: &Hwloc, bus_id: &str) -> Result<DeviceLocality> {
        let dev: Option<&TopologyObject> = topo
            .pci_device_by_bus_id_string(bus_id)
            .map_err(|_| anyhow!("`{bus_id}` is not a PCI bus id like 0000:3b:00.0"))?;
        let Some(dev) = dev else {
            return Ok(DeviceLocality {
                bus_id: bus_id.to_string(),
                found: false,
                node: None,
                cpus: Vec::new(),
            });
        };
        let near = dev.first_non_io_ancestor();
        let nodes: Vec<u32> = near
            .and_then(|a| a.nodeset())
            .map(|s| s.iter_set().map(|i| usize::from(i) as u32).collect())
            .unwrap_or_default();
        Ok(DeviceLocality {
            bus_id: bus_id.to_string(),
            found: true,
            node: (nodes.len() == 1).then(|| nodes[0]),
            cpus: cpus_of(near.and_then(|a| a.cpuset())),
        })
    }

    /// The node numbered `index`.
    pub fn node(&self, index: u32) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.index == index)
    }

    /// The node holding CPU `cpu`.
    pub fn node_of(&self, cpu: usize) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.cpus.contains(&cpu))
    }

    /// Every CPU this process may use, ascending.
    pub fn cpus(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.nodes.iter().flat_map(|n| n.cpus.iter().copied()).collect();
        all.sort_unstable();
        all
    }
}
