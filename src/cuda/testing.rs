//! Helpers for the CUDA tests and benchmarks: open the device or skip cleanly.

use super::device::{CudaDevice, DeviceError};
use super::ops::CudaOps;

/// Set to `1` (tools/gpu-check does) to make a missing device a failure rather than a
/// skip, so that a GPU run cannot pass by skipping everything.
pub const REQUIRE_ENV: &str = "SHADOWKV_REQUIRE_CUDA";

/// The CUDA operations on device 0, or `None` after printing why the caller should
/// skip (no driver, no GPU). Panics on any other failure, and on a missing device when
/// `SHADOWKV_REQUIRE_CUDA=1`.
pub fn ops_or_skip() -> Option<CudaOps> {
    let require = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    match CudaDevice::new(0) {
        Ok(dev) => {
            let i = dev.info();
            eprintln!(
                "CUDA device {}: {} (sm_{}{}, {} SMs, {:.1} GiB, driver {}.{})",
                i.ordinal,
                i.name,
                i.compute_capability.0,
                i.compute_capability.1,
                i.sm_count,
                i.total_mem as f64 / (1u64 << 30) as f64,
                i.driver_version / 1000,
                (i.driver_version % 1000) / 10
            );
            let t = std::time::Instant::now();
            let ops = CudaOps::new(dev).unwrap_or_else(|e| panic!("CUDA device present but unusable: {e:#}"));
            eprintln!(
                "kernels ready in {:.0} ms (cache {})",
                t.elapsed().as_secs_f64() * 1e3,
                super::nvrtc::cache_dir().map_or("off".into(), |d| d.display().to_string())
            );
            Some(ops)
        }
        Err(DeviceError::Unavailable(e)) if !require => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("CUDA device required ({REQUIRE_ENV}=1) but: {e}"),
    }
}
