//! SM partitions: streams whose kernels run on a fixed share of the GPU's
//! multiprocessors (CUDA green contexts), so that another stream's kernels always find
//! the rest free.
//!
//! A green context made from the device's SM resource runs the work of its streams on
//! its multiprocessors only; the streams still belong to the primary context, so the
//! kernels loaded there, cuBLAS and every device buffer work on them unchanged. The
//! separate prefill lane runs on such a partition (`limits.prefill_sms`): its long
//! attention blocks can then hold at most that many multiprocessors, and a decode
//! step's kernels start at once on the others.
//!
//! A partition lives as long as the process: buffers allocated on its stream keep a
//! handle to the stream and are freed on it whenever they are dropped, so the stream
//! must outlive them all. Asking again for the same partition returns the same one.

use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

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

type Key = (usize, u32, i32);

fn partitions() -> &'static Mutex<HashMap<Key, Partition>> {
    static P: OnceLock<Mutex<HashMap<Key, Partition>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

fn check(what: &'static str, r: sys::CUresult) -> anyhow::Result<()> {
    r.result()
        .map_err(|e: DriverError| anyhow::anyhow!("CUDA error while {what}: {e}"))
}

/// The device's SM resource: its size and how it splits.
fn sm_resource(ctx: &CudaContext) -> anyhow::Result<(sys::CUdevResource, SmSplit)> {
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
    let split = SmSplit {
        total: sm.smCount,
        granularity: sm.minSmPartitionSize.max(sm.smCoscheduledAlignment).max(1),
    };
    Ok((res, split))
}

/// How `ctx`'s device splits its multiprocessors.
pub fn sm_split(ctx: &CudaContext) -> anyhow::Result<SmSplit> {
    Ok(sm_resource(ctx)?.1)
}

/// A stream of `ctx` (the device's primary context) whose kernels run on a partition
/// of at least `sms` multiprocessors, at stream `priority` (the driver's numbering),
/// and the partition's size. Refuses a partition that would leave the rest of the
/// device less than one granule ([`SmSplit::round`]).
pub fn stream_on_sms(ctx: &Arc<CudaContext>, sms: u32, priority: i32) -> anyhow::Result<(Arc<CudaStream>, u32)> {
    let key = (ctx.ordinal(), sms, priority);
    let mut parts = partitions().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = parts.get(&key) {
        // SAFETY: the stream belongs to this device's primary context and is never destroyed.
        return Ok((unsafe { ctx.wrap_borrowed_stream(p.stream as sys::CUstream) }, p.sms));
    }
    // A driver older than green contexts (CUDA 12.4) lacks their entry points, which
    // the bindings report by panicking: an error here.
    let made =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| create(ctx, sms, priority))).map_err(|p| {
            anyhow::anyhow!(
                "this CUDA driver cannot partition the GPU (green contexts need CUDA 12.4 or later): {}",
                super::device::panic_message(&*p)
            )
        })??;
    let (stream, got) = (made.stream as sys::CUstream, made.sms);
    parts.insert(key, made);
    // SAFETY: the stream was made on this device and is never destroyed.
    Ok((unsafe { ctx.wrap_borrowed_stream(stream) }, got))
}

/// Makes a green context of at least `sms` multiprocessors of `ctx`'s device and a
/// stream on it at `priority`.
fn create(ctx: &Arc<CudaContext>, sms: u32, priority: i32) -> anyhow::Result<Partition> {
    ctx.bind_to_thread()?;
    let (res, split) = sm_resource(ctx)?;
    let want = split.round(sms).map_err(|e| anyhow::anyhow!(e))?;
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
