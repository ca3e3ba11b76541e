//! Placement of the pipeline's actors, without a GPU or a special machine: hwloc reads
//! synthetic topologies (`"numa:2 core:8 pu:1"`), an XML topology with two GPUs
//! (`tests/topologies/two-nodes-two-gpus.xml`: one on NUMA node 1, one reporting no
//! node) and this host; the plan is checked against the topology file it came from,
//! errors by their key and line. Pinning is checked through the kernel's view of the
//! thread (`/proc/thread-self/status`).

mod common;

use shadowkv::cuda::PciBusId;
use shadowkv::pipeline::machine::Source;
use shadowkv::pipeline::pin::pin_current_thread;
use shadowkv::pipeline::{ActorPlacement, Machine, Placement, Role};
use shadowkv::topology::{Topology, TopologyError};

/// 16 cores in two NUMA nodes: 0-7 on node 0, 8-15 on node 1.
const TWO_NODES: &str = "numa:2 core:8 pu:1";

/// The GPU on NUMA node 1 of the XML topology.
const GPU_NODE1: PciBusId = PciBusId {
    domain: 0,
    bus: 0x41,
    device: 0,
};

/// The GPU of the XML topology attached to the machine, not to a node.
const GPU_NO_NODE: &str = "0000:c1:00.0";

fn synthetic(desc: &str) -> Machine {
    Machine::read(Source::Synthetic(desc), None).unwrap()
}

fn with_gpu(bus_id: &str) -> Machine {
    let xml = std::fs::read_to_string(common::repo_file("tests/topologies/two-nodes-two-gpus.xml")).unwrap();
    Machine::read(Source::Xml(&xml), Some(bus_id)).unwrap()
}

fn topo(src: &str) -> Topology {
    Topology::parse(src, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

const CUDA: &str = "[backend]\nkind = \"cuda\"\n";

fn plan(src: &str, m: &Machine) -> Placement {
    Placement::plan(&topo(src), m).unwrap_or_else(|e| panic!("{src:?}: {e}"))
}

fn plan_err(src: &str, m: &Machine) -> TopologyError {
    match Placement::plan(&topo(src), m) {
        Ok(p) => panic!("{src:?} was placed: {p}"),
        Err(e) => e,
    }
}

fn placed(p: &Placement, a: Role) -> &ActorPlacement {
    p.actor(a).unwrap_or_else(|| panic!("{a:?} not placed in {p}"))
}

/// (cores, threads, node) of each actor.
fn cores(p: &Placement, a: Role) -> (Vec<usize>, usize, Option<u32>) {
    let x = placed(p, a);
    (x.cores.clone(), x.threads, x.node)
}

#[test]
fn hwloc_reads_synthetic_nodes_and_physical_cores() {
    let m = synthetic(TWO_NODES);
    assert_eq!(m.nodes.len(), 2);
    assert_eq!((m.nodes[0].index, m.nodes[0].cpus.clone()), (0, (0..8).collect()));
    assert_eq!((m.nodes[1].index, m.nodes[1].cpus.clone()), (1, (8..16).collect()));
    assert_eq!(m.nodes[1].cores, m.nodes[1].cpus);
    // Two hardware threads a core: `auto` hands out one CPU per physical core.
    let smt = synthetic("pack:2 [numa] core:4 pu:2");
    assert_eq!(smt.nodes[0].cpus, (0..8).collect::<Vec<_>>());
    assert_eq!(smt.nodes[0].cores, vec![0, 2, 4, 6]);
    let p = plan(CUDA, &smt);
    assert_eq!(placed(&p, Role::Compute).cores, vec![0]);
    assert_eq!(placed(&p, Role::Select).cores, vec![2]);
    assert_eq!(placed(&p, Role::Transfer).cores, vec![4]);
    assert_eq!(placed(&p, Role::Gather).cores, vec![6]);
    let e = Machine::read(Source::Synthetic("numa:two"), None).unwrap_err();
    assert!(format!("{e:#}").contains("numa:two"), "{e:#}");
}

#[test]
fn the_bus_id_is_what_hwloc_finds_the_gpu_by() {
    assert_eq!(GPU_NODE1.to_string(), "0000:41:00.0");
    let wide = PciBusId {
        domain: 0x1_0002,
        bus: 0xc1,
        device: 0x1f,
    };
    assert_eq!(wide.to_string(), "10002:c1:1f.0");
    let m = with_gpu(&GPU_NODE1.to_string());
    let d = m.device.as_ref().unwrap();
    assert!(d.found, "{d:?}");
    assert_eq!(d.node, Some(1));
    assert_eq!(d.cpus, (8..16).collect::<Vec<_>>());
    let e = Machine::read(Source::Synthetic(TWO_NODES), Some("41.00")).unwrap_err();
    assert!(format!("{e:#}").contains("not a PCI bus id"), "{e:#}");
}

#[test]
fn auto_places_everything_on_the_gpus_node() {
    let m = with_gpu(&GPU_NODE1.to_string());
    let p = plan(CUDA, &m);
    assert_eq!(p.node, 1);
    assert!(p.node_reason.contains("nearest GPU 0000:41:00.0"), "{}", p.node_reason);
    assert_eq!(cores(&p, Role::Compute), (vec![8], 1, Some(1)));
    assert_eq!(cores(&p, Role::Select), (vec![9], 1, Some(1)));
    assert_eq!(cores(&p, Role::Transfer), (vec![10], 1, Some(1)));
    assert_eq!(cores(&p, Role::Gather), ((11..16).collect(), 5, Some(1)));
    assert_eq!(p.pool_node, 1);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    // One gather thread per core, each pinned to its own.
    let g = placed(&p, Role::Gather);
    assert_eq!(g.thread_cores(0), &[11]);
    assert_eq!(g.thread_cores(4), &[15]);
    let line = p.to_string();
    assert!(
        line.contains("NUMA node 1") && line.contains("gather 5 threads on cores 11-15 (node 1)"),
        "{line}"
    );
    // Fewer gather threads than the node has left: the first free cores.
    let p = plan(&format!("{CUDA}[actors.gather]\nthreads = 2\n"), &m);
    assert_eq!(cores(&p, Role::Gather), (vec![11, 12], 2, Some(1)));
}

#[test]
fn a_gpu_reporting_no_node_falls_back_to_the_first_node() {
    let m = with_gpu(GPU_NO_NODE);
    let d = m.device.as_ref().unwrap();
    assert!(d.found && d.node.is_none(), "{d:?}");
    let p = plan(CUDA, &m);
    assert_eq!(p.node, 0);
    assert_eq!(cores(&p, Role::Compute), (vec![0], 1, Some(0)));
    assert_eq!(cores(&p, Role::Gather), ((3..8).collect(), 5, Some(0)));
    assert!(
        p.warnings.iter().any(|w| w.contains("reports no NUMA node")),
        "{:?}",
        p.warnings
    );
    // A GPU hwloc does not list (no PCI information): the same, with its own warning.
    let p = plan(CUDA, &with_gpu("0000:99:00.0"));
    assert_eq!(p.node, 0);
    assert!(
        p.warnings.iter().any(|w| w.contains("does not list GPU 0000:99:00.0")),
        "{:?}",
        p.warnings
    );
    // One node: it is the GPU's, whatever the device reports, and nothing to warn about.
    let p = plan(CUDA, &synthetic("numa:1 core:16 pu:1"));
    assert_eq!((p.node, p.node_reason.as_str()), (0, "the only node"));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn explicit_cores_reserve_first_and_auto_takes_the_rest() {
    let m = with_gpu(&GPU_NODE1.to_string());
    let p = plan(&format!("{CUDA}[actors.transfer]\ncores = [8]\n"), &m);
    assert_eq!(cores(&p, Role::Transfer), (vec![8], 1, Some(1)));
    assert_eq!(cores(&p, Role::Compute), (vec![9], 1, Some(1)));
    assert_eq!(cores(&p, Role::Select), (vec![10], 1, Some(1)));
    assert_eq!(cores(&p, Role::Gather), ((11..16).collect(), 5, Some(1)));
    // An explicit node with `auto` cores: that node's cores, and a warning that it is not
    // the GPU's.
    let p = plan(&format!("{CUDA}[actors.select]\nnuma_node = 0\n"), &m);
    assert_eq!(cores(&p, Role::Select), (vec![0], 1, Some(0)));
    assert_eq!(cores(&p, Role::Transfer), (vec![9], 1, Some(1)));
    assert!(
        p.warnings.iter().any(|w| w.contains("actors.select.numa_node = 0")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn the_gpu_hosts_topology_places_as_written() {
    let src = std::fs::read_to_string(common::repo_file("pipeline-configs/h200.toml")).unwrap();
    // The H200 host: 16 cores, one node, the GPU reporting none.
    let p = plan(&src, &synthetic("numa:1 core:16 pu:1"));
    assert_eq!(cores(&p, Role::Compute), (vec![0], 1, Some(0)));
    assert_eq!(cores(&p, Role::Select), (vec![1], 1, Some(0)));
    assert_eq!(cores(&p, Role::Transfer), (vec![2], 1, Some(0)));
    assert_eq!(cores(&p, Role::Gather), ((3..16).collect(), 12, Some(0)));
    // 12 threads on 13 cores: each thread may run on any of them.
    assert_eq!(placed(&p, Role::Gather).thread_cores(5), (3..16).collect::<Vec<_>>());
    assert_eq!(p.pool_node, 0);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

/// Explicit cores on another node than the GPU's. With `numa_node = "auto"` this is a
/// warning: the setting works (the actor's copies cross the link between the nodes) and
/// may be meant. With a `numa_node` naming another node than the cores' it is an error:
/// the two settings of one actor contradict each other and no placement honours both.
#[test]
fn cores_on_the_wrong_node() {
    let m = with_gpu(&GPU_NODE1.to_string());
    let p = plan(&format!("{CUDA}[actors.gather]\ncores = \"0-7\"\n"), &m);
    assert_eq!(cores(&p, Role::Gather), ((0..8).collect(), 8, Some(0)));
    assert_eq!(p.pool_node, 0, "the pool follows the threads that read it");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("actors.gather.cores are on NUMA node 0, the GPU is nearest node 1")),
        "{:?}",
        p.warnings
    );
    let e = plan_err(
        &format!("{CUDA}\n[actors.gather]\nnuma_node = 1\ncores = \"4-9\"\n"),
        &m,
    );
    assert_eq!(e.key.as_deref(), Some("actors.gather.cores"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(6), "{e}");
    assert!(e.message.contains("core 4 is not on NUMA node 1"), "{e}");
    // Cores spread over both nodes: allowed, with a warning.
    let p = plan(&format!("{CUDA}[actors.gather]\ncores = \"6-9\"\n"), &m);
    assert_eq!(placed(&p, Role::Gather).node, None);
    assert!(
        p.warnings.iter().any(|w| w.contains("spread over NUMA nodes 0 and 1")),
        "{:?}",
        p.warnings
    );
    // The pool on another node than its readers: a warning too.
    let p = plan(&format!("{CUDA}[pools]\nnuma_node = 0\n"), &m);
    assert_eq!(p.pool_node, 0);
    assert!(
        p.warnings.iter().any(|w| w.contains("pools.numa_node = 0")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn impossible_settings_name_key_and_line() {
    let m = with_gpu(&GPU_NODE1.to_string());
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "[actors.compute]\ncores = [3, 16]\n",
            "actors.compute.cores",
            5,
            "core 16 does not exist",
        ),
        (
            "[actors.select]\nnuma_node = 2\n",
            "actors.select.numa_node",
            5,
            "NUMA node 2 does not exist",
        ),
        (
            "\n[pools]\nnuma_node = 7\n",
            "pools.numa_node",
            6,
            "NUMA node 7 does not exist",
        ),
        (
            "[actors.compute]\ncores = [8]\n[actors.select]\ncores = [9, 8]\n",
            "actors.select.cores",
            7,
            "core 8 is also listed in actors.compute.cores",
        ),
        (
            "[actors.gather]\nthreads = 6\n",
            "actors.gather.threads",
            5,
            "6 threads, but only 5 of NUMA node 1's 8 cores are free",
        ),
        (
            "[actors.transfer]\nnuma_node = 0\nthreads = 9\n",
            "actors.transfer.threads",
            6,
            "9 threads, but only 8 of NUMA node 0's 8 cores are free",
        ),
    ];
    for (rest, key, line, what) in cases {
        let src = format!("{CUDA}\n{rest}");
        let e = plan_err(&src, &m);
        assert_eq!(e.key.as_deref(), Some(*key), "{src:?}: {e}");
        assert_eq!(e.line.map(|l| l.0), Some(*line), "{src:?}: {e}");
        assert!(e.message.contains(what), "{src:?}: {e}");
        assert!(e.to_string().starts_with(&format!("t.toml, line {line}")), "{e}");
    }
    // More threads than listed cores is refused when the file is read.
    let e = Topology::parse(
        &format!("{CUDA}[actors.gather]\ncores = [1, 2]\nthreads = 3\n"),
        "t.toml",
    )
    .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("actors.gather.threads"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
}

#[test]
fn too_few_cores_share_them_and_say_so() {
    let p = plan(CUDA, &synthetic("numa:1 core:2 pu:1"));
    assert_eq!(cores(&p, Role::Compute), (vec![0], 1, Some(0)));
    assert_eq!(cores(&p, Role::Select), (vec![1], 1, Some(0)));
    assert_eq!(cores(&p, Role::Transfer), (vec![0], 1, Some(0)));
    assert_eq!(cores(&p, Role::Gather), (vec![0, 1], 2, Some(0)));
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("transfer shares core 0 with compute")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn the_cpu_backend_places_its_matrix_pool() {
    let m = synthetic(TWO_NODES);
    // All `auto`: one thread per CPU, not pinned (as before placement existed).
    let p = plan("", &m);
    assert_eq!(p.actors.len(), 1, "only compute runs on the cpu backend");
    assert_eq!(cores(&p, Role::Compute), (vec![], 16, None));
    assert_eq!(placed(&p, Role::Compute).thread_cores(3), &[] as &[usize]);
    let p = plan("[actors.compute]\ncores = \"9-11\"\n", &m);
    assert_eq!(cores(&p, Role::Compute), (vec![9, 10, 11], 3, Some(1)));
    assert_eq!(placed(&p, Role::Compute).thread_cores(2), &[11]);
    assert_eq!(p.pool_node, 1);
    let p = plan("[actors.compute]\nnuma_node = 1\nthreads = 4\n", &m);
    assert_eq!(cores(&p, Role::Compute), ((8..16).collect(), 4, Some(1)));
    // The GPU-only actors' settings are ignored there, said so.
    let p = plan("[actors.gather]\nthreads = 4\n", &m);
    assert!(
        p.warnings.iter().any(|w| w.contains("[actors.gather] is not used")),
        "{:?}",
        p.warnings
    );
    let e = plan_err("[actors.compute]\nnuma_node = 1\nthreads = 9\n", &m);
    assert_eq!(e.key.as_deref(), Some("actors.compute.threads"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(3), "{e}");
    let e = plan_err("[actors.compute]\ncores = [40]\n", &m);
    assert_eq!(e.key.as_deref(), Some("actors.compute.cores"), "{e}");
}

/// This host, as hwloc sees it: the GPU-style plan lands on its (only, or first) node.
#[test]
fn this_host_places_on_its_node() {
    let m = Machine::read(Source::Host, None).unwrap();
    let cpus = m.cpus();
    assert!(!cpus.is_empty());
    let allowed = std::thread::available_parallelism().unwrap().get();
    assert_eq!(cpus.len(), allowed, "hwloc and the kernel disagree on the usable CPUs");
    let p = plan(CUDA, &m);
    let first = m.nodes.iter().find(|n| !n.cpus.is_empty()).unwrap();
    assert_eq!(p.node, first.index);
    if m.nodes.len() == 1 {
        assert_eq!(p.node_reason, "the only node");
    }
    for a in &p.actors {
        assert!(
            !a.cores.is_empty() && a.cores.iter().all(|c| first.cpus.contains(c)),
            "{p}"
        );
    }
    assert_eq!(placed(&p, Role::Compute).cores, vec![first.cores[0]]);
    assert_eq!(p.pool_node, first.index);
}

/// The CPUs the calling thread may run on, as the kernel says.
fn my_cpus() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn pinning_binds_the_thread_and_warns_when_it_cannot() {
    let m = Machine::read(Source::Host, None).unwrap();
    let last = *m.cpus().last().unwrap();
    std::thread::spawn(move || {
        let before = my_cpus();
        assert!(pin_current_thread(&[]), "an empty list leaves the thread alone");
        assert_eq!(my_cpus(), before);
        assert!(pin_current_thread(&[last]));
        assert_eq!(my_cpus(), last.to_string());
        // A core that is not there: a warning, false, and the thread keeps its binding.
        assert!(!pin_current_thread(&[100_000]));
        assert_eq!(my_cpus(), last.to_string());
    })
    .join()
    .unwrap();
}

/// A gather pool placed with the transfer actor's cores pins each lane's gather-actor
/// thread there as it starts (`ChunkGather::on_actor_start`, which that thread runs
/// first); without them the thread keeps its binding.
#[test]
fn the_gather_actor_thread_runs_on_the_transfer_cores() {
    use shadowkv::cuda::shadow::ChunkGather;
    use shadowkv::pipeline::GatherPool;
    let m = Machine::read(Source::Host, None).unwrap();
    let last = *m.cpus().last().unwrap();
    let placed = GatherPool::new(1, &[]).unwrap().with_transfer_cores(&[last]);
    let free = GatherPool::new(1, &[]).unwrap();
    std::thread::spawn(move || {
        let before = my_cpus();
        free.on_actor_start();
        assert_eq!(my_cpus(), before, "no transfer cores: the thread is left alone");
        placed.on_actor_start();
        assert_eq!(my_cpus(), last.to_string());
    })
    .join()
    .unwrap();
}
