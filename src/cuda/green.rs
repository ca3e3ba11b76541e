//! SM partitions: streams whose kernels run on a fixed share of the GPU's
//! multiprocessors (CUDA green contexts), so that another stream's kernels always find
//! the rest free.
//!
//! A green context made from the device's SM resource runs the work of its streams on
//! its multiprocessors only. It shares the primary context's memory and loaded
//! modules, so the kernels, cuBLAS and the device buffers of the rest of the code work
//! on its streams unchanged; its streams are its own, not the primary context's, and
//! events of the primary context are recorded on them and waited for across (checked
//! once when a partition is made). The separate prefill lane runs on such a partition
//! (`limits.prefill_sms`): its long attention blocks can then hold at most that many
//! multiprocessors, and a decode step's kernels find the others free.
//!
//! A partition lives as long as the process: buffers allocated on its stream keep a
//! handle to the stream and are freed on it whenever they are dropped, so the stream
//! must outlive them all. Asking again for a partition of the same size returns the
//! same one (and the same stream: its users' work then runs in order).

use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The first driver with every entry point used here (`cuGreenCtxStreamCreate`: 12.5).
const MIN_DRIVER: i32 = 12050;

/// How a device's multiprocessors can be split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmSplit {
    /// Multiprocessors of the device.
    pub total: u32,
    /// A partition's size is a multiple of this (8 on Hopper).
    pub granularity: u32,
}

impl SmSplit {
    /// The partition of at least `sms` multiprocessors the driver would make, or why
    /// none fits: it must leave at least one granule of multiprocessors to the rest of
    /// the device.
    pub fn round(&self, sms: u32) -> Result<u32, String> {
        let g = self.granularity.max(1);
        let rounded = sms.max(1).div_ceil(g) * g;
        if rounded + g > self.total {
            return Err(format!(
                "{sms} multiprocessors (rounded up to a multiple of {g}: {rounded}) leave fewer than {g} of the \
                 GPU's {} to the decode steps; at most {}",
                self.total,
                (self.total / g).saturating_sub(1) * g
            ));
        }
        Ok(rounded)
    }
}

/// A green context and one stream on it; never destroyed (see the module's documentation).
struct Partition {
    stream: usize,
    sms: u32,
}

/// Device ordinal, partition size (rounded), stream priority.
type Key = (usize, u32, i32);

fn partitions() -> &'static Mutex<HashMap<Key, Partition>> {
    static P: OnceLock<Mutex<HashMap<Key, Partition>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

fn check(what: &'static str, r: sys::CUresult) -> anyhow::Result<()> {
    r.result()
        .map_err(|e: DriverError| anyhow::anyhow!("CUDA error while {what}: {e}"))
}

/// The device's SM resource: its size and how it splits. Refuses a driver older than
/// green contexts.
fn sm_resource(ctx: &CudaContext) -> anyhow::Result<(sys::CUdevResource, SmSplit)> {
    let mut version = 0;
    // SAFETY: writes one int.
    check("reading the driver version", unsafe {
        sys::cuDriverGetVersion(&mut version)
    })?;
    anyhow::ensure!(
        version >= MIN_DRIVER,
        "partitioning the GPU (green contexts) needs a CUDA {}.{} driver or later; this one is {}.{}",
        MIN_DRIVER / 1000,
        MIN_DRIVER % 1000 / 10,
        version / 1000,
        version % 1000 / 10
    );
    // SAFETY: a plain C struct the driver fills in.
    let mut res: sys::CUdevResource = unsafe { std::mem::zeroed() };
    // SAFETY: writes one resource description of the device.
    check("reading the GPU's multiprocessors", unsafe {
        sys::cuDeviceGetDevResource(
            ctx.cu_device(),
            &mut res,
            sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
        )
    })?;
    // SAFETY: the union's SM member is the one a CU_DEV_RESOURCE_TYPE_SM resource holds.
    let sm = unsafe { res.__bindgen_anon_1.sm };
    let granularity = match granule_reported(&sm) {
        0 => granule_of(ctx.compute_capability()?.0),
        g => g,
    };
    let split = SmSplit {
        total: sm.smCount,
        granularity,
    };
    Ok((res, split))
}

/// The partition granule the driver reports (CUDA 13 bindings; 0 where unknown).
#[cfg(feature = "cuda-13")]
fn granule_reported(sm: &sys::CUdevSmResource) -> u32 {
    sm.minSmPartitionSize.max(sm.smCoscheduledAlignment)
}

/// The partition granule the driver reports (the CUDA 12 bindings have none: 0).
#[cfg(not(feature = "cuda-13"))]
fn granule_reported(_sm: &sys::CUdevSmResource) -> u32 {
    0
}

/// The partition granule of a compute capability's major version where the driver
/// reports none: groups of 8 SMs from Hopper on, of at least 4 (in steps of 2) on
/// Ampere and Ada, of 2 before.
fn granule_of(major: i32) -> u32 {
    match major {
        9.. => 8,
        8 => 4,
        _ => 2,
    }
}

/// How `ctx`'s device splits its multiprocessors.
pub fn sm_split(ctx: &CudaContext) -> anyhow::Result<SmSplit> {
    Ok(sm_resource(ctx)?.1)
}

/// A stream whose kernels run on a partition of at least `sms` of `ctx`'s device's
/// multiprocessors, at stream `priority` (the driver's numbering), and the partition's
/// size. Refuses a partition that would leave the rest of the device less than one
/// granule ([`SmSplit::round`]), and a driver without green contexts.
pub fn stream_on_sms(ctx: &Arc<CudaContext>, sms: u32, priority: i32) -> anyhow::Result<(Arc<CudaStream>, u32)> {
    ctx.bind_to_thread()?;
    // A driver older than the bindings lacks entry points, which they report by
    // panicking: an error here.
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> anyhow::Result<_> {
        let (res, split) = sm_resource(ctx)?;
        let want = split.round(sms).map_err(|e| anyhow::anyhow!(e))?;
        let key = (ctx.ordinal(), want, priority);
        let mut parts = partitions().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = parts.get(&key) {
            return Ok((p.stream, p.sms));
        }
        let p = create(ctx, res, want, priority)?;
        let out = (p.stream, p.sms);
        parts.insert(key, p);
        Ok(out)
    }))
    .map_err(|p| {
        anyhow::anyhow!(
            "this CUDA driver cannot partition the GPU: {}",
            crate::panics::message(&*p)
        )
    })??;
    // SAFETY: the stream was made on this device, shares the primary context's memory
    // (checked by `create`) and is never destroyed.
    Ok((unsafe { ctx.wrap_borrowed_stream(made.0 as sys::CUstream) }, made.1))
}

/// The size of the partition `stream` runs on, as the driver reports it: `None` for a
/// stream of the whole GPU.
pub fn partition_of(stream: &CudaStream) -> anyhow::Result<Option<u32>> {
    let mut green: sys::CUgreenCtx = std::ptr::null_mut();
    // SAFETY: writes one handle; the stream is live.
    check("asking a stream for its green context", unsafe {
        sys::cuStreamGetGreenCtx(stream.cu_stream(), &mut green)
    })?;
    if green.is_null() {
        return Ok(None);
    }
    // SAFETY: a plain C struct the driver fills in.
    let mut res: sys::CUdevResource = unsafe { std::mem::zeroed() };
    // SAFETY: `green` is a live green context; writes one resource description.
    check("reading a partition's multiprocessors", unsafe {
        sys::cuGreenCtxGetDevResource(green, &mut res, sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM)
    })?;
    // SAFETY: the SM member, as asked for.
    Ok(Some(unsafe { res.__bindgen_anon_1.sm.smCount }))
}

/// Makes a green context of `want` multiprocessors of `res` (`ctx`'s device's) and a
/// stream on it at `priority`, and checks that an event of the primary context
/// recorded on that stream can be waited for by one of its streams.
fn create(ctx: &Arc<CudaContext>, res: sys::CUdevResource, want: u32, priority: i32) -> anyhow::Result<Partition> {
    // SAFETY: plain C structs the driver fills in.
    let (mut group, mut rest): (sys::CUdevResource, sys::CUdevResource) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut groups = 1u32;
    // SAFETY: one output group, the remainder and the device's resource, all valid.
    check("splitting the GPU's multiprocessors", unsafe {
        sys::cuDevSmResourceSplitByCount(&mut group, &mut groups, &res, &mut rest, 0, want)
    })?;
    anyhow::ensure!(groups == 1, "the driver made no partition of {want} multiprocessors");
    // SAFETY: as above; `group` is an SM resource.
    let got = unsafe { group.__bindgen_anon_1.sm.smCount };
    let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
    // SAFETY: describes the one resource in `group`.
    check("describing the partition", unsafe {
        sys::cuDevResourceGenerateDesc(&mut desc, &mut group, 1)
    })?;
    let mut green: sys::CUgreenCtx = std::ptr::null_mut();
    // SAFETY: `desc` was just made for this device.
    check("creating a green context", unsafe {
        sys::cuGreenCtxCreate(
            &mut green,
            desc,
            ctx.cu_device(),
            sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32,
        )
    })?;
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: `green` is live; the flag is the one the driver requires.
    let made = check("creating a stream on the partition", unsafe {
        sys::cuGreenCtxStreamCreate(
            &mut stream,
            green,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            priority,
        )
    });
    if let Err(e) = made {
        // SAFETY: nothing uses the context yet.
        unsafe { sys::cuGreenCtxDestroy(green) };
        return Err(e);
    }
    // SAFETY: the stream is live and is never destroyed.
    let wrapped = unsafe { ctx.wrap_borrowed_stream(stream) };
    let across = (|| -> Result<(), DriverError> {
        let probe = ctx.new_event(None)?;
        probe.record(&wrapped)?;
        let other = ctx.new_stream()?;
        other.wait(&probe)?;
        other.synchronize()
    })();
    if let Err(e) = across {
        // SAFETY: nothing else knows the stream or the context yet.
        unsafe {
            sys::cuStreamDestroy_v2(stream);
            sys::cuGreenCtxDestroy(green);
        }
        anyhow::bail!("a stream on the partition does not order work with the rest of the GPU: {e}");
    }
    Ok(Partition {
        stream: stream as usize,
        sms: got,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_rounds_up_and_leaves_a_granule() {
        let h200 = SmSplit {
            total: 132,
            granularity: 8,
        };
        assert_eq!(h200.round(100), Ok(104));
        assert_eq!(h200.round(104), Ok(104));
        assert_eq!(h200.round(1), Ok(8));
        assert_eq!(h200.round(120), Ok(120));
        let err = h200.round(121).unwrap_err();
        assert!(err.contains("at most 120"), "{err}");
        assert!(h200.round(132).is_err());
    }
}
