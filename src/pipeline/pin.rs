//! Pinning a thread to cores (hwloc CPU binding of the calling thread).

use tracing::warn;

/// Pins the calling thread to `cores` (the OS's CPU numbers): it then runs only there.
/// An empty list leaves it free. Placeholder until the placement branch lands: it warns
/// and returns false for a non-empty list.
pub fn pin_current_thread(cores: &[usize]) -> bool {
    if cores.is_empty() {
        return true;
    }
    warn!("could not pin thread to cores {cores:?}");
    false
}
