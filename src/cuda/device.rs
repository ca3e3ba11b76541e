//! The device: a CUDA context (the device's primary context), its compute stream,
//! events and plain device allocations.

use crate::panics::message as panic_message;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No usable driver or GPU here: callers (and tests) treat this as "no CUDA".
    #[error("{0}")]
    Unavailable(String),
    /// A driver and device exist but a CUDA call failed.
    #[error("CUDA error while {what}: {err}")]
    Driver {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        err: cudarc::driver::DriverError,
    },
}

/// What the kernels and the launch heuristics need to know about the device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Global memory in bytes.
    pub total_mem: usize,
    /// L2 cache in bytes.
    pub l2_bytes: usize,
    /// Driver API version, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    /// Where the device sits on the PCI bus (to find its NUMA node).
    pub pci_bus_id: PciBusId,
}

/// A GPU's PCI address. Displays as hwloc, `nvidia-smi` and sysfs write it,
/// `dddd:bb:dd.f` in hex (`0000:3b:00.0`); a GPU is always function 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBusId {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus.
    pub bus: u8,
    /// Device on the bus.
    pub device: u8,
}

impl std::fmt::Display for PciBusId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.0", self.domain, self.bus, self.device)
    }
}

impl DeviceInfo {
    /// The NVRTC target for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// How the GPU schedules a stream's blocks against other streams' blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamPriority {
    /// The default (lowest) priority.
    #[default]
    Normal,
    /// Above `Normal` (decode lanes; the prefill lane on its partition of the SMs):
    /// its blocks go first when both have work waiting.
    High,
    /// Above `High` where the device has four levels or more (the H200 has six), else
    /// the same as `High`: the streams of a High lane's earlier ShadowKV micro-batches,
    /// whose work goes ahead of the last one's on the lane's own stream.
    Higher,
    /// The greatest priority (the value fetch beside a decode lane's compute: its few
    /// blocks must start as soon as the miss lists are out, not after the rebuild's).
    /// The same as `High` on a device with fewer than three levels.
    Highest,
}

impl StreamPriority {
    /// One step up, below `Highest`: `Normal` → `High` → `Higher`. The streams a lane
    /// forks for its earlier micro-batches take it, so they never pass the fetch stream,
    /// nor, from a `Normal` lane, a `High` one.
    pub fn raised(self) -> StreamPriority {
        match self {
            StreamPriority::Normal => StreamPriority::High,
            StreamPriority::High | StreamPriority::Higher => StreamPriority::Higher,
            StreamPriority::Highest => StreamPriority::Highest,
        }
    }

    /// One step down: `Highest` → `Higher` → `High` → `Normal` (which stays). A lane's
    /// fold stream takes it, so that its blocks fill in where the lane's own wait for
    /// none.
    pub fn lowered(self) -> StreamPriority {
        match self {
            StreamPriority::Normal | StreamPriority::High => StreamPriority::Normal,
            StreamPriority::Higher => StreamPriority::High,
            StreamPriority::Highest => StreamPriority::Higher,
        }
    }
}

/// One GPU: its primary context and a compute stream.
///
/// The wrapper turns off cudarc's automatic per-buffer event tracking: work on several
/// streams is ordered explicitly with [`CudaDevice::event`] / `CudaStream::wait`, as
/// the pipeline design has each actor own its stream. Buffers are plain device
/// allocations (stream-ordered `cuMemAllocAsync` where the device supports memory
/// pools, `cuMemAlloc` otherwise), never managed memory.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
}

fn driver(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> DeviceError {
    move |err| DeviceError::Driver { what, err }
}

impl CudaDevice {
    /// Opens device `ordinal`. Returns [`DeviceError::Unavailable`] when there is no
    /// NVIDIA driver (libcuda.so cannot be loaded), no device, or no such ordinal.
    pub fn new(ordinal: usize) -> Result<CudaDevice, DeviceError> {
        // SAFETY: only tries to dlopen the driver library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(DeviceError::Unavailable(
                "the NVIDIA driver library (libcuda.so) was not found".into(),
            ));
        }
        // cudarc panics on a missing driver symbol (a driver too old for the bindings):
        // report that as an error instead of aborting the caller.
        let opened = std::panic::catch_unwind(|| Self::open(ordinal)).map_err(|p| {
            DeviceError::Unavailable(format!("the CUDA driver could not be used: {}", panic_message(&*p)))
        })?;
        opened
    }

    fn open(ordinal: usize) -> Result<CudaDevice, DeviceError> {
        use sys::cudaError_enum as E;
        match cudarc::driver::result::init() {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.0,
                    E::CUDA_ERROR_NO_DEVICE
                        | E::CUDA_ERROR_STUB_LIBRARY
                        | E::CUDA_ERROR_SYSTEM_NOT_READY
                        | E::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
                        | E::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
                ) =>
            {
                return Err(DeviceError::Unavailable(format!("cuInit: {e}")))
            }
            Err(e) => {
                return Err(DeviceError::Driver {
                    what: "initialising the driver",
                    err: e,
                })
            }
        }
        let count = CudaContext::device_count().map_err(driver("counting devices"))?;
        if count <= 0 {
            return Err(DeviceError::Unavailable("no CUDA device".into()));
        }
        if ordinal >= count as usize {
            return Err(DeviceError::Unavailable(format!(
                "no CUDA device {ordinal} ({count} present)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating the context"))?;
        // SAFETY: streams are ordered explicitly by the users of this wrapper (see the
        // type's documentation); no buffer exists yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("creating the compute stream"))?;
        use sys::CUdevice_attribute_enum as A;
        let attr = |a| ctx.attribute(a).map_err(driver("reading device attributes"));
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(driver("reading the driver version"))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(driver("reading the device name"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(driver("reading the compute capability"))?,
            sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            total_mem: ctx.total_mem().map_err(driver("reading the memory size"))?,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            driver_version,
            pci_bus_id: PciBusId {
                domain: attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)? as u32,
                bus: attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)? as u8,
                device: attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)? as u8,
            },
        };
        Ok(CudaDevice { ctx, stream, info })
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream: every operation of this module runs on it unless given
    /// another.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new non-blocking stream (copy or select streams of the pipeline).
    pub fn new_stream(&self) -> anyhow::Result<Arc<CudaStream>> {
        Ok(self.ctx.new_stream()?)
    }

    /// The same device and context with a compute stream of its own, created at
    /// `priority` (see [`StreamPriority`]): what another lane of work (a prefill running
    /// beside decode steps) launches on.
    pub fn with_new_stream(&self, priority: StreamPriority) -> anyhow::Result<CudaDevice> {
        let stream = self.ctx.new_stream_with_priority(self.priority(priority)?)?;
        Ok(CudaDevice {
            ctx: self.ctx.clone(),
            stream,
            info: self.info.clone(),
        })
    }

    /// As [`CudaDevice::with_new_stream`], on a stream whose kernels run on a partition
    /// of at least `sms` multiprocessors ([`super::green`]); its [`DeviceInfo::sm_count`]
    /// is the partition's, so launch heuristics size their grids for it.
    pub fn with_stream_on_sms(&self, priority: StreamPriority, sms: u32) -> anyhow::Result<CudaDevice> {
        let (stream, got) = super::green::stream_on_sms(&self.ctx, sms, self.priority(priority)?)?;
        Ok(CudaDevice {
            ctx: self.ctx.clone(),
            stream,
            info: DeviceInfo {
                sm_count: got,
                ..self.info.clone()
            },
        })
    }

    /// The driver's number for `priority` (greater priorities are smaller numbers).
    fn priority(&self, priority: StreamPriority) -> anyhow::Result<i32> {
        self.ctx.bind_to_thread()?;
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range()?;
        Ok(match priority {
            StreamPriority::Normal => least,
            // Two levels below the greatest while that is still above Normal, else one.
            StreamPriority::High if greatest + 2 < least => greatest + 2,
            StreamPriority::High | StreamPriority::Higher if greatest + 1 < least => greatest + 1,
            StreamPriority::High | StreamPriority::Higher | StreamPriority::Highest => greatest,
        })
    }

    /// An event; `timing` enables [`CudaEvent::elapsed_ms`] (slightly slower to record).
    pub fn event(&self, timing: bool) -> anyhow::Result<CudaEvent> {
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        Ok(self.ctx.new_event(Some(flags))?)
    }

    /// `n` zeroed elements on the compute stream.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> anyhow::Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(n)?)
    }

    /// Copies host data to a new device buffer (on the compute stream).
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> anyhow::Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(data)?)
    }

    /// Copies a device buffer back to the host, waiting for the compute stream.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> anyhow::Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(buf)?)
    }

    /// Waits for all work queued on the compute stream, returning any error a kernel
    /// raised (an asynchronous fault shows up here).
    pub fn synchronize(&self) -> anyhow::Result<()> {
        self.stream.synchronize()?;
        self.ctx.check_err()?;
        Ok(())
    }

    /// Waits for the compute stream and hands the memory that freed buffers left in the
    /// stream-ordered allocator's pool back to the driver, so that `mem_info` (and other
    /// processes) see it as free.
    pub fn release_memory(&self) -> anyhow::Result<()> {
        self.synchronize()?;
        self.ctx.bind_to_thread()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes the device's current pool handle, then trims that pool; both
        // calls only touch memory no live buffer owns.
        unsafe {
            if sys::cuDeviceGetMemPool(&mut pool, self.ctx.cu_device())
                .result()
                .is_ok()
                && !pool.is_null()
            {
                sys::cuMemPoolTrimTo(pool, 0)
                    .result()
                    .map_err(driver("trimming the memory pool"))?;
            }
        }
        Ok(())
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> anyhow::Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("info", &self.info).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::StreamPriority::*;

    #[test]
    fn a_raised_priority_climbs_one_step_and_stays_below_the_fetch() {
        assert_eq!(Normal.raised(), High);
        assert_eq!(High.raised(), Higher);
        assert_eq!(Higher.raised(), Higher);
        assert_eq!(Highest.raised(), Highest);
    }

    #[test]
    fn a_lowered_priority_steps_down_to_normal() {
        assert_eq!(Highest.lowered(), Higher);
        assert_eq!(Higher.lowered(), High);
        assert_eq!(High.lowered(), Normal);
        assert_eq!(Normal.lowered(), Normal);
    }
}
