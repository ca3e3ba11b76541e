//! Where each actor runs: the topology file's `[actors.*]` and `[pools]` settings,
//! resolved against the [`Machine`] into a plain-data [`Placement`].
//!
//! The home node is the NUMA node nearest the GPU (its PCI device's node; the only node,
//! or the first with CPUs, when the device reports none); on the CPU backend, the only
//! or first node. `auto` settings take cores there, one physical core each for compute,
//! select and transfer (in that order), the rest of the node's cores for gather.
//!
//! Explicit settings are checked, each error naming its key and line: cores that do not
//! exist (or that this process may not use), a NUMA node that is not there, more threads
//! than cores to pin them to, two actors listing the same core, and cores that are not on
//! the `numa_node` the same actor names (the two settings contradict each other, so that
//! is an error). Cores on another node than the GPU's, with `numa_node` left `auto`, are
//! a warning, not an error: they work (their copies cross the socket link) and may be
//! meant, say to keep the GPU's node free for something else.

use super::machine::{Machine, NumaNode};
use crate::topology::{ActorSection, AutoOr, BackendKind, Cores, Topology, TopologyError};
use std::collections::BTreeMap;
use std::fmt;

/// The roles of the pipeline's actors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Projections, key rebuild, attention, MLP, sampling (the CPU backend's
    /// matrix-product pool).
    Compute,
    /// Landmark scoring, top-k, the reuse diff.
    Select,
    /// Host-to-device copies.
    Transfer,
    /// Value-chunk gathering from the pools.
    Gather,
}

impl Role {
    /// Every actor, in the order `auto` hands out cores.
    pub const ALL: [Role; 4] = [Role::Compute, Role::Select, Role::Transfer, Role::Gather];

    /// The name of its `[actors.<name>]` table.
    pub fn name(self) -> &'static str {
        match self {
            Role::Compute => "compute",
            Role::Select => "select",
            Role::Transfer => "transfer",
            Role::Gather => "gather",
        }
    }

    fn settings(self, t: &Topology) -> &ActorSection {
        match self {
            Role::Compute => &t.actors.compute,
            Role::Select => &t.actors.select,
            Role::Transfer => &t.actors.transfer,
            Role::Gather => &t.actors.gather,
        }
    }

    fn key(self, field: &str) -> String {
        format!("actors.{}.{field}", self.name())
    }
}

/// One actor's threads and the cores they run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorPlacement {
    /// Which actor.
    pub actor: Role,
    /// How many threads it runs.
    pub threads: usize,
    /// The cores its threads are pinned to, in order; empty: not pinned.
    pub cores: Vec<usize>,
    /// The NUMA node of those cores; `None` when not pinned or spread over nodes.
    pub node: Option<u32>,
}

impl ActorPlacement {
    /// The cores thread `i` is pinned to: core `i` alone when there are as many threads
    /// as cores, else all of them (the scheduler balances the threads within the set).
    pub fn thread_cores(&self, i: usize) -> &[usize] {
        if !self.cores.is_empty() && self.threads == self.cores.len() {
            &self.cores[i % self.cores.len()..][..1]
        } else {
            &self.cores
        }
    }
}

/// The placement of every actor and of the value pool: plain data, read without hwloc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The home node: nearest the GPU, or the only or first node with CPUs.
    pub node: u32,
    /// Why that node, for the log (`nearest GPU 0000:3b:00.0`, `the only node`, ...).
    pub node_reason: String,
    /// The actors that run with this backend, in [`Role::ALL`] order: all four on
    /// `cuda`, only compute (the matrix-product pool) on `cpu`.
    pub actors: Vec<ActorPlacement>,
    /// The NUMA node for the value pool's memory.
    pub pool_node: u32,
    /// Settings that work but are likely not what was meant (logged at start-up).
    pub warnings: Vec<String>,
}

/// `0-3,8,10-11`.
pub fn format_cores(cores: &[usize]) -> String {
    let mut sorted = cores.to_vec();
    sorted.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

fn node_list(m: &Machine) -> String {
    m.nodes
        .iter()
        .map(|n| n.index.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The planner's working state: what is decided so far.
struct Planner<'a> {
    topo: &'a Topology,
    machine: &'a Machine,
    home: u32,
    /// Whether the home node is the GPU's (the `cuda` backend).
    gpu: bool,
    /// Which actors each core is given to.
    users: BTreeMap<usize, Vec<Role>>,
    warnings: Vec<String>,
}

impl<'a> Planner<'a> {
    fn err(&self, key: &str, msg: String) -> TopologyError {
        self.topo.error_at(key, msg)
    }

    /// The node `index` at `key`, which must exist and have CPUs.
    fn existing_node(&self, key: &str, index: u32) -> Result<&'a NumaNode, TopologyError> {
        let m = self.machine;
        match m.node(index) {
            None => Err(self.err(
                key,
                format!("NUMA node {index} does not exist here (nodes: {})", node_list(m)),
            )),
            Some(n) if n.cpus.is_empty() => Err(self.err(
                key,
                format!("NUMA node {index} has no CPUs this process may use (memory only, or all forbidden)"),
            )),
            Some(n) => Ok(n),
        }
    }

    /// An explicit `numa_node` (checked), or `None` for `auto`.
    fn explicit_node(&self, actor: Role) -> Result<Option<&'a NumaNode>, TopologyError> {
        match actor.settings(self.topo).numa_node {
            AutoOr::Auto => Ok(None),
            AutoOr::Value(n) => self.existing_node(&actor.key("numa_node"), n).map(Some),
        }
    }

    /// An explicit core list: every core must exist, lie on `numa_node` if that is set,
    /// and belong to no other actor. Returns the node the cores are on, if one.
    fn check_listed(&mut self, actor: Role, cores: &[usize]) -> Result<Option<u32>, TopologyError> {
        let key = actor.key("cores");
        let all = self.machine.cpus();
        if let Some(&bad) = cores.iter().find(|c| !all.contains(c)) {
            return Err(self.err(
                &key,
                format!(
                    "core {bad} does not exist here or this process may not use it (cores: {})",
                    format_cores(&all)
                ),
            ));
        }
        let mut nodes: Vec<u32> = cores
            .iter()
            .filter_map(|&c| self.machine.node_of(c).map(|n| n.index))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        if let Some(want) = self.explicit_node(actor)? {
            if let Some(&off) = cores.iter().find(|&&c| !want.cpus.contains(&c)) {
                return Err(self.err(
                    &key,
                    format!(
                        "core {off} is not on NUMA node {} (its cores: {}), which {} names: the two settings \
                         contradict each other; list cores of node {} or change the node",
                        want.index,
                        format_cores(&want.cpus),
                        actor.key("numa_node"),
                        want.index
                    ),
                ));
            }
        }
        for &c in cores {
            if let Some(other) = self.users.get(&c).and_then(|u| u.first()) {
                return Err(self.err(
                    &key,
                    format!(
                        "core {c} is also listed in {}: two actors cannot share a core",
                        other.key("cores")
                    ),
                ));
            }
        }
        for &c in cores {
            self.users.entry(c).or_default().push(actor);
        }
        match nodes.as_slice() {
            [n] => {
                if self.gpu && *n != self.home && actor.settings(self.topo).numa_node == AutoOr::Auto {
                    self.warnings.push(format!(
                        "{key} are on NUMA node {n}, the GPU is nearest node {}: this actor's memory traffic \
                         crosses the link between the nodes",
                        self.home
                    ));
                }
                Ok(Some(*n))
            }
            _ => {
                self.warnings.push(format!(
                    "{key} spread over NUMA nodes {}: their threads' memory is not local to one node",
                    nodes.iter().map(u32::to_string).collect::<Vec<_>>().join(" and ")
                ));
                Ok(None)
            }
        }
    }

    /// Threads for cores given (explicitly, or a node's): `auto` is `default`, capped by
    /// the cores; more than the cores is an error.
    fn threads_for(&self, actor: Role, default: usize, cores: usize) -> Result<usize, TopologyError> {
        match actor.settings(self.topo).threads {
            AutoOr::Auto => Ok(default.min(cores).max(1)),
            AutoOr::Value(n) if n > cores => Err(self.err(
                &actor.key("threads"),
                format!(
                    "{n} threads cannot be pinned to the {cores} cores given to {}",
                    actor.name()
                ),
            )),
            AutoOr::Value(n) => Ok(n),
        }
    }

    /// An actor with explicit cores.
    fn place_listed(&mut self, actor: Role, cores: &[usize]) -> Result<ActorPlacement, TopologyError> {
        let node = self.check_listed(actor, cores)?;
        let default = if actor == Role::Gather { cores.len() } else { 1 };
        Ok(ActorPlacement {
            actor,
            threads: self.threads_for(actor, default, cores.len())?,
            cores: cores.to_vec(),
            node,
        })
    }

    /// An actor with `cores = "auto"` on the GPU backend: free cores of its node.
    fn place_auto(&mut self, actor: Role) -> Result<ActorPlacement, TopologyError> {
        let node = match self.explicit_node(actor)? {
            Some(n) => n,
            None => self.machine.node(self.home).expect("the home node exists"),
        };
        if node.index != self.home {
            self.warnings.push(format!(
                "{} = {}, the GPU is nearest node {}: this actor's memory traffic crosses the link between the \
                 nodes",
                actor.key("numa_node"),
                node.index,
                self.home
            ));
        }
        let free: Vec<usize> = node
            .cores
            .iter()
            .copied()
            .filter(|c| !self.users.contains_key(c))
            .collect();
        let wanted = match (actor, actor.settings(self.topo).threads) {
            (_, AutoOr::Value(n)) => Some(n),
            (Role::Gather, AutoOr::Auto) => None,
            (_, AutoOr::Auto) => Some(1),
        };
        let cores: Vec<usize> = match wanted {
            Some(n) if n <= free.len() => free[..n].to_vec(),
            None if !free.is_empty() => free,
            Some(n) if actor.settings(self.topo).threads == AutoOr::Value(n) => {
                let taken: Vec<String> = self
                    .users
                    .values()
                    .flatten()
                    .map(|a| a.name().to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                return Err(self.err(
                    &actor.key("threads"),
                    format!(
                        "{n} threads, but only {} of NUMA node {}'s {} cores are free for them{}; lower it, or \
                         list cores in {}",
                        free.len(),
                        node.index,
                        node.cores.len(),
                        if taken.is_empty() {
                            String::new()
                        } else {
                            format!(" ({} took the others)", taken.join(", "))
                        },
                        actor.key("cores")
                    ),
                ));
            }
            // Too few cores for every actor to have its own: share the least used.
            Some(_) => {
                let least = *node
                    .cores
                    .iter()
                    .min_by_key(|c| (self.users.get(c).map_or(0, Vec::len), **c))
                    .expect("a node with CPUs has cores");
                vec![least]
            }
            None => node.cores.clone(),
        };
        let shared: Vec<String> = cores
            .iter()
            .filter_map(|c| {
                let u = self.users.get(c)?;
                Some(format!(
                    "core {c} with {}",
                    u.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
                ))
            })
            .collect();
        if !shared.is_empty() {
            self.warnings.push(format!(
                "NUMA node {} has {} cores, too few for each actor to have its own: {} shares {}",
                node.index,
                node.cores.len(),
                actor.name(),
                shared.join("; ")
            ));
        }
        for &c in &cores {
            self.users.entry(c).or_default().push(actor);
        }
        Ok(ActorPlacement {
            actor,
            threads: cores.len(),
            cores,
            node: Some(node.index),
        })
    }

    /// The CPU backend's matrix-product pool: pinned where cores or a node are given,
    /// otherwise free on every CPU, as many threads as CPUs unless `threads` says.
    fn place_cpu_pool(&mut self) -> Result<ActorPlacement, TopologyError> {
        let actor = Role::Compute;
        let s = actor.settings(self.topo);
        if let Cores::List(cores) = &s.cores {
            return self.place_listed(actor, cores).map(|mut p| {
                if s.threads == AutoOr::Auto {
                    p.threads = p.cores.len();
                }
                p
            });
        }
        if let Some(node) = self.explicit_node(actor)? {
            return Ok(ActorPlacement {
                actor,
                threads: self.threads_for(actor, node.cpus.len(), node.cpus.len())?,
                cores: node.cpus.clone(),
                node: Some(node.index),
            });
        }
        let threads = match s.threads {
            AutoOr::Auto => self.machine.cpus().len(),
            AutoOr::Value(n) => n,
        };
        Ok(ActorPlacement {
            actor,
            threads,
            cores: Vec::new(),
            node: None,
        })
    }

    /// The pool's node: `auto` is the node of the threads that read it (`reader`: the
    /// gather threads, or the CPU backend's pool), else the home node.
    fn pool_node(&mut self, reader: Option<&ActorPlacement>) -> Result<u32, TopologyError> {
        let reader_node = reader.and_then(|r| r.node);
        match self.topo.pools.numa_node {
            AutoOr::Auto => Ok(reader_node.unwrap_or(self.home)),
            AutoOr::Value(n) => {
                let key = "pools.numa_node";
                if self.machine.node(n).is_none() {
                    return Err(self.err(
                        key,
                        format!("NUMA node {n} does not exist here (nodes: {})", node_list(self.machine)),
                    ));
                }
                if let (Some(g), Some(r)) = (reader_node.filter(|&g| g != n), reader) {
                    self.warnings.push(format!(
                        "{key} = {n}, but the {} threads that read the pool run on node {g}: every value they \
                         read crosses the link between the nodes",
                        r.actor.name()
                    ));
                }
                Ok(n)
            }
        }
    }
}

impl Placement {
    /// Resolves `topo`'s actors and pool on `machine` (whose `device` is the GPU of a
    /// `cuda` topology). Errors name the topology key and its line.
    pub fn plan(topo: &Topology, machine: &Machine) -> Result<Placement, TopologyError> {
        let mut warnings = Vec::new();
        let first = machine
            .nodes
            .iter()
            .find(|n| !n.cpus.is_empty())
            .ok_or_else(|| topo.error_at("actors", "this machine has no CPUs this process may use"))?;
        let only = machine.nodes.len() == 1;
        let fallback = || {
            if only {
                "the only node".to_string()
            } else {
                format!("node {}, the first with CPUs", first.index)
            }
        };
        let (home, node_reason) = match &machine.device {
            Some(d) if d.found => match d.node.filter(|&n| machine.node(n).is_some_and(|n| !n.cpus.is_empty())) {
                Some(n) => (n, format!("nearest GPU {}", d.bus_id)),
                None => {
                    if !only {
                        warnings.push(format!(
                            "GPU {} reports no NUMA node of its own; placing on {}",
                            d.bus_id,
                            fallback()
                        ));
                    }
                    (
                        first.index,
                        format!("{}; GPU {} reports no NUMA node", fallback(), d.bus_id),
                    )
                }
            },
            Some(d) => {
                if !only {
                    warnings.push(format!(
                        "hwloc does not list GPU {} (no PCI information here?); placing on {}",
                        d.bus_id,
                        fallback()
                    ));
                }
                (
                    first.index,
                    format!("{}; hwloc does not list GPU {}", fallback(), d.bus_id),
                )
            }
            None => (first.index, fallback()),
        };
        let mut p = Planner {
            topo,
            machine,
            home,
            gpu: topo.backend.kind == BackendKind::Cuda,
            users: BTreeMap::new(),
            warnings,
        };
        let mut actors = Vec::new();
        if topo.backend.kind == BackendKind::Cpu {
            actors.push(p.place_cpu_pool()?);
            for a in &Role::ALL[1..] {
                let s = a.settings(topo);
                if s.threads != AutoOr::Auto || s.cores != Cores::Auto || s.numa_node != AutoOr::Auto {
                    p.warnings.push(format!(
                        "[actors.{}] is not used by the cpu backend (its settings are ignored)",
                        a.name()
                    ));
                }
            }
        } else {
            // Explicit cores first, so that `auto` ones take what is left.
            let mut placed: Vec<Option<ActorPlacement>> = vec![None; Role::ALL.len()];
            for (i, &a) in Role::ALL.iter().enumerate() {
                if let Cores::List(cores) = &a.settings(topo).cores {
                    placed[i] = Some(p.place_listed(a, cores)?);
                }
            }
            for (i, &a) in Role::ALL.iter().enumerate() {
                if placed[i].is_none() {
                    placed[i] = Some(p.place_auto(a)?);
                }
            }
            actors.extend(placed.into_iter().flatten());
        }
        let reader = actors.iter().find(|a| a.actor == Role::Gather).or(actors.first());
        let pool_node = p.pool_node(reader)?;
        Ok(Placement {
            node: home,
            node_reason,
            actors,
            pool_node,
            warnings: p.warnings,
        })
    }

    /// The placement of `actor`, if it runs with this backend.
    pub fn actor(&self, actor: Role) -> Option<&ActorPlacement> {
        self.actors.iter().find(|a| a.actor == actor)
    }
}

/// One line for the start-up log: the home node, each actor's threads and cores, the
/// pool's node.
impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NUMA node {} ({})", self.node, self.node_reason)?;
        for a in &self.actors {
            write!(f, "; {} ", a.actor.name())?;
            if a.threads != 1 {
                write!(f, "{} threads ", a.threads)?;
            }
            match (a.cores.as_slice(), a.node) {
                ([], _) => write!(f, "not pinned")?,
                ([c], Some(n)) => write!(f, "on core {c} (node {n})")?,
                (c, Some(n)) => write!(f, "on cores {} (node {n})", format_cores(c))?,
                (c, None) => write!(f, "on cores {}", format_cores(c))?,
            }
        }
        write!(f, "; value pool on node {}", self.pool_node)
    }
}
