//! Helpers for the CUDA tests and benchmarks: open the device or skip cleanly.

use super::device::{CudaDevice, DeviceError};
use super::ops::CudaOps;

/// Set to `1` (tools/gpu-check does) to make a missing device a failure rather than a
/// skip, so that a GPU run cannot pass by skipping everything.
pub const REQUIRE_ENV: &str = "SHADOWKV_REQUIRE_CUDA";

/// A file (`tools/test` names one) to which each skipping test appends its name and
/// why, so the suite's summary counts skips apart from passes.
pub const SKIP_LOG_ENV: &str = "SHADOWKV_SKIP_LOG";

/// Records that the running test skipped, for want of `why` (`no CUDA device`): appends
/// `<test binary>::<test>\t<why>` to `$SHADOWKV_SKIP_LOG` when it is set. Every test
/// that returns early because the machine lacks something calls it (libtest runs each
/// test on a thread named after it).
pub fn record_skip(why: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // cargo names test binaries `<target>-<hash>`.
    let binary = stem.rsplit_once('-').map_or(stem.as_str(), |(b, _)| b);
    let test = std::thread::current().name().unwrap_or("unnamed").to_string();
    let line = format!("{binary}::{test}\t{}\n", why.replace(['\t', '\n'], " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "cannot record the skip in {} ({SKIP_LOG_ENV}): {e}",
            path.to_string_lossy()
        );
    }
}

/// The CUDA operations on device 0, or `None` after printing why the caller should
/// skip (no driver, no GPU) and recording the skip in `$SHADOWKV_SKIP_LOG`. Panics on
/// any other failure, and on a missing device when `SHADOWKV_REQUIRE_CUDA=1`.
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
            record_skip("no CUDA device");
            None
        }
        Err(e) => panic!("CUDA device required ({REQUIRE_ENV}=1) but: {e}"),
    }
}
