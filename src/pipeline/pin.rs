//! Pinning threads to cores (hwloc CPU binding of the calling thread).

use super::placement::ActorPlacement;
use crate::pool::numa::host_topology;
use anyhow::Context;
use hwlocality::bitmap::BitmapIndex;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use tracing::warn;

/// Pins the calling thread to `cores` (the OS's CPU numbers): it then runs only there.
/// An empty list leaves it free. When the pin fails (a core this process may not use,
/// a system without thread binding) it logs a warning naming the thread and the cores
/// and returns false: the thread still runs, unpinned.
pub fn pin_current_thread(cores: &[usize]) -> bool {
    if cores.is_empty() {
        return true;
    }
    let bound = host_topology().and_then(|topo| {
        let mut set = CpuSet::new();
        for &c in cores {
            set.set(BitmapIndex::try_from(c).map_err(|_| format!("{c} is not a CPU number"))?);
        }
        topo.bind_cpu(&set, CpuBindingFlags::THREAD).map_err(|e| e.to_string())
    });
    match bound {
        Ok(()) => true,
        Err(why) => {
            let t = std::thread::current();
            warn!(
                "could not pin thread `{}` to cores {}: {why}; it runs unpinned",
                t.name().unwrap_or("unnamed"),
                super::placement::format_cores(cores)
            );
            false
        }
    }
}

/// Starts rayon's global pool as `actor`'s threads: `actor.threads` of them, named
/// `<actor>-<i>`, thread `i` pinned to [`ActorPlacement::thread_cores`]`(i)` (unpinned
/// when the actor has no cores). Returns the thread count.
pub fn start_global_pool(actor: &ActorPlacement) -> anyhow::Result<usize> {
    let name = actor.actor.name();
    let placed = actor.clone();
    rayon::ThreadPoolBuilder::new()
        .num_threads(actor.threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |i| {
            pin_current_thread(placed.thread_cores(i));
        })
        .build_global()
        .context("starting the thread pool")?;
    Ok(actor.threads)
}
