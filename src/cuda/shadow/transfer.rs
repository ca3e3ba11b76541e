//! The cpu-gather fetch without the step's host thread: a gather-and-transfer actor.
//!
//! The thread that queues a decode step never waits for the GPU here. Per layer and
//! micro-batch it queues, on the step's stream, the copy of the miss lists into a ring
//! slot's pinned buffers and an event after it, and sends the actor a [`Job`]; then it
//! queues a stream wait for the slot's flag (a `u32` in device memory) before the scatter
//! kernel, and goes on to the next layer. The actor's thread waits for the event, gathers
//! the missed chunks from the pool into the slot's pinned staging (with the lane's
//! [`ChunkGather`]: the pipeline's pinned gather threads, or rayon's), copies them to the
//! slot's device staging on its own stream and writes the job's sequence number into the
//! flag behind that copy (`cuStreamWriteValue32`): the step's stream waits for the bytes,
//! not for a host thread.
//!
//! A slot is used again only once the scatter that read it is done (an event the queuing
//! thread waits for: it runs at most [`RING`] jobs ahead of the GPU). A job whose gather
//! fails (an error, or a panic of a gather thread) still writes its flag, so the GPU never
//! waits forever, and leaves its error for [`GatherTransfer::take_error`]: the lane fails
//! the step with it.

use super::buffers::{GatherBuffers, ShadowTable, StepScratch};
use super::decode::{ChunkGather, GatherTimes};
use super::fetch::FETCH_BLOCKS;
use super::layout::{DevicePool, ShadowLayout};
use super::pool::GpuValuePool;
use crate::cuda::device::StreamPriority;
use crate::cuda::CudaOps;
use anyhow::{anyhow, ensure, Context, Result};
use crossbeam_channel::{unbounded, Sender};
use cudarc::driver::sys::{self, CUstreamWaitValue_flags, CUstreamWriteValue_flags};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Ring slots: jobs (a layer's micro-batch each) the queuing thread may run ahead of the
/// GPU's scatter.
pub const RING: usize = 8;

/// One layer's (and micro-batch's) gather for the actor.
struct Job {
    /// Its number among the actor's jobs.
    id: u64,
    /// Recorded after the miss lists' copy into the slot's host buffers.
    lists: CudaEvent,
    slot: usize,
    /// Written to the slot's flag once the slot's device staging holds the values.
    seqno: u32,
    layer: usize,
    /// Each sequence's slot of the value pool, in batch order.
    pool_seqs: Vec<usize>,
}

/// The ring as the queuing thread sees it.
struct Ring {
    consumed: Vec<Option<CudaEvent>>,
    seqnos: Vec<u32>,
    next: u64,
}

/// The ring's flags: `RING` u32s that the actor's stream writes and the step's stream
/// waits on, in plain device memory (`cuMemAlloc`: the stream-ordered allocator's memory
/// is refused by stream memory operations on some drivers) or, where the device refuses
/// that too, in pinned host memory mapped for the device. Which one is decided by a
/// write and a wait tried at creation.
struct Flags {
    /// The first flag's device address.
    addr: u64,
    /// The host allocation behind it, when the flags live in host memory.
    host: Option<usize>,
}

impl Flags {
    /// Flags (zero) that stream memory operations accept on `stream`'s device.
    fn new(stream: &CudaStream) -> Result<Self> {
        let bytes = 4 * RING;
        // SAFETY: a fresh allocation of `bytes`, zeroed before use, freed in Drop (or
        // here when refused).
        let device = unsafe {
            let addr = cudarc::driver::result::malloc_sync(bytes)?;
            cudarc::driver::result::memset_d8_sync(addr, 0, bytes)?;
            Flags { addr, host: None }
        };
        let device_err = match device.try_on(stream) {
            Ok(()) => return Ok(device),
            Err(e) => e,
        };
        drop(device);
        // SAFETY: as above, in pinned host memory mapped for the device; the device
        // address is the mapping's.
        let host = unsafe {
            let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
            let p = cudarc::driver::result::malloc_host(bytes, flags)?;
            std::ptr::write_bytes(p.cast::<u8>(), 0, bytes);
            let mut addr = 0;
            let r = sys::cuMemHostGetDevicePointer_v2(&mut addr, p, 0);
            let f = Flags {
                addr,
                host: Some(p as usize),
            };
            ensure!(
                r == sys::cudaError_enum::CUDA_SUCCESS,
                "cpu-gather: mapping the ring's flags: {r:?}"
            );
            f
        };
        match host.try_on(stream) {
            Ok(()) => Ok(host),
            Err(host_err) => Err(anyhow!(
                "cpu-gather needs stream memory operations (cuStreamWaitValue32 and cuStreamWriteValue32), which \
                 this GPU refuses on device memory ({device_err}) and on mapped host memory ({host_err}); use the \
                 zero-copy value fetch"
            )),
        }
    }

    /// A write, a wait for it and a write back to zero on `stream`, waited for.
    fn try_on(&self, stream: &CudaStream) -> Result<(), String> {
        let s = stream.cu_stream();
        // SAFETY: the first flag, written and waited on by this stream alone.
        unsafe {
            let w = CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32;
            let r = sys::cuStreamWriteValue32_v2(s, self.addr, u32::MAX, w);
            if r != sys::cudaError_enum::CUDA_SUCCESS {
                return Err(format!("write: {r:?}"));
            }
            let eq = CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32;
            let r = sys::cuStreamWaitValue32_v2(s, self.addr, u32::MAX, eq);
            if r != sys::cudaError_enum::CUDA_SUCCESS {
                return Err(format!("wait: {r:?}"));
            }
            let r = sys::cuStreamWriteValue32_v2(s, self.addr, 0, w);
            if r != sys::cudaError_enum::CUDA_SUCCESS {
                return Err(format!("write: {r:?}"));
            }
        }
        stream.synchronize().map_err(|e| format!("{e:?}"))
    }
}

impl Drop for Flags {
    fn drop(&mut self) {
        // SAFETY: the allocation made in new; no stream uses it any more (the actor's
        // owner drops it after the lane's work).
        unsafe {
            let _ = match self.host {
                Some(p) => cudarc::driver::result::free_host(p as *mut std::ffi::c_void),
                None => cudarc::driver::result::free_sync(self.addr),
            };
        }
    }
}

/// What the actor's thread and the queuing thread share.
struct Shared {
    /// Each ring slot's pinned buffers (the queuing thread copies the lists in, once the
    /// slot's last scatter is done; the actor reads them and fills the staging).
    slots: Vec<Mutex<GatherBuffers>>,
    /// Each ring slot's staging on the device (the actor's copy writes it, the scatter
    /// reads it).
    device: Vec<CudaSlice<bf16>>,
    /// The errors of jobs not yet claimed by a step ([`GatherTransfer::take_error`]), by
    /// job number.
    errors: Mutex<Vec<(u64, String)>>,
    /// Host time of the gathers.
    times: Mutex<GatherTimes>,
}

/// The cpu-gather path's actor for one lane (see the module's documentation).
pub struct GatherTransfer {
    shared: Arc<Shared>,
    /// The queuing thread's own: each slot's event after the last scatter that read it
    /// and its last job's number, and the next job's slot.
    ring: Mutex<Ring>,
    flags: Flags,
    layout: ShadowLayout,
    batch: usize,
    pool_addr: u64,
    /// The queuing thread's stream and the actor's, synchronised before the flags and
    /// buffers are freed.
    streams: [Arc<CudaStream>; 2],
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl GatherTransfer {
    /// The actor for steps of up to `batch` sequences of `layout` on `ops`'s device,
    /// reading `pool` and copying chunks with `gather`; its thread is named `name`.
    pub fn new(
        ops: &CudaOps,
        layout: &ShadowLayout,
        batch: usize,
        pool: &GpuValuePool,
        gather: Arc<dyn ChunkGather + Send>,
        name: &str,
    ) -> Result<Self> {
        let dev = ops.device();
        let slots = (0..RING)
            .map(|_| Ok(Mutex::new(GatherBuffers::new(ops, layout, batch)?)))
            .collect::<Result<Vec<_>>>()?;
        let elems = batch * layout.kv_heads * layout.slots * layout.chunk * layout.head_dim;
        let device = (0..RING)
            .map(|_| dev.zeros::<bf16>(elems))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            slots,
            device,
            errors: Mutex::new(Vec::new()),
            times: Mutex::new(GatherTimes::default()),
        });
        let stream = ops.fork(StreamPriority::Highest)?.device().stream().clone();
        let flags = Flags::new(&stream)?;
        let (tx, rx) = unbounded::<Job>();
        let (sh, lay) = (shared.clone(), *layout);
        let streams = [dev.stream().clone(), stream.clone()];
        let dev_pool = pool.device();
        // The pool's memory, as the gather reads it (see the thread's SAFETY note).
        // SAFETY: only the address is taken here.
        let pool_base = unsafe { pool.pool().base_ptr() } as usize;
        let pool_elems = dev_pool.shape.elems()?;
        let flag_base = flags.addr;
        let ctx = dev.context().clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let bound = ctx
                    .bind_to_thread()
                    .map_err(|e| format!("cpu-gather: binding the CUDA context: {e:?}"));
                // SAFETY: the registered pool outlives the lane (the backend holds it),
                // and the device does not write the chunks a step's misses name.
                let pool: &[bf16] = unsafe { std::slice::from_raw_parts(pool_base as *const bf16, pool_elems) };
                for job in rx {
                    let flag = flag_base + 4 * job.slot as u64;
                    let done = catch_unwind(AssertUnwindSafe(|| {
                        bound.clone().map_err(|e| anyhow!(e))?;
                        run_job(&sh, &lay, &dev_pool, pool, &*gather, &stream, &job)
                    }));
                    let err = match done {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(format!("{e:#}")),
                        Err(p) => Some(format!(
                            "{} panicked: {}",
                            std::thread::current().name().unwrap_or("cpu-gather"),
                            p.downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| p.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a panic without a message".into())
                        )),
                    };
                    // Before the flag: the step that waits for it must find its error.
                    let errors = |e: String| sh.errors.lock().unwrap_or_else(|p| p.into_inner()).push((job.id, e));
                    if let Some(e) = err {
                        errors(e);
                    }
                    // Always: the GPU waits for this value.
                    // SAFETY: `flag` is this slot's u32 of the flags buffer, which the
                    // actor's owner keeps until this thread has ended.
                    let w = unsafe {
                        sys::cuStreamWriteValue32_v2(
                            stream.cu_stream(),
                            flag,
                            job.seqno,
                            CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                        )
                    };
                    if w != sys::cudaError_enum::CUDA_SUCCESS {
                        errors(format!("cpu-gather: writing the flag of ring slot {}: {w:?}", job.slot));
                    }
                }
            })
            .context("starting the cpu-gather actor's thread")?;
        Ok(GatherTransfer {
            shared,
            ring: Mutex::new(Ring {
                consumed: (0..RING).map(|_| None).collect(),
                seqnos: vec![0; RING],
                next: 0,
            }),
            flags,
            layout: *layout,
            batch,
            pool_addr: pool.device().addr,
            streams,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Whether it serves steps of `batch` sequences of `layout` reading `pool`.
    pub fn serves(&self, layout: &ShadowLayout, batch: usize, pool: &GpuValuePool) -> bool {
        self.layout == *layout && batch <= self.batch && pool.device().addr == self.pool_addr
    }

    /// Queues the first half of table `t`'s fetch for layer `l` on `ops`'s stream: the
    /// copy of the miss lists into the next ring slot (once the scatter that last read
    /// it is done) and the job to the actor. Returns the slot and its sequence number
    /// for [`GatherTransfer::finish`].
    pub fn queue(&self, ops: &CudaOps, t: &ShadowTable, l: usize, sc: &StepScratch) -> Result<(usize, u32)> {
        let lay = &self.layout;
        let heads = t.batch() * lay.kv_heads;
        let s = ops.device().stream();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let id = ring.next;
        let slot_i = (id % RING as u64) as usize;
        ring.next += 1;
        // The actor is done with the slot once the scatter that read it is (its flag
        // came before): only then may the lists be copied over.
        if let Some(e) = ring.consumed[slot_i].take() {
            e.synchronize()?;
        }
        ring.seqnos[slot_i] = ring.seqnos[slot_i].wrapping_add(1).max(1);
        let seqno = ring.seqnos[slot_i];
        drop(ring);
        let mut slot = self.shared.slots[slot_i].lock().unwrap_or_else(|p| p.into_inner());
        s.memcpy_dtoh(&sc.misses.slice(0..heads * lay.slots * 2), &mut slot.misses)?;
        s.memcpy_dtoh(&sc.fetch_count.slice(0..heads), &mut slot.miss_count)?;
        drop(slot);
        let lists = ops.device().event(false)?;
        lists.record(s)?;
        let job = Job {
            id,
            lists,
            slot: slot_i,
            seqno,
            layer: l,
            pool_seqs: t.counts().iter().map(|c| c.pool_seq as usize).collect(),
        };
        self.tx
            .as_ref()
            .expect("present until drop")
            .send(job)
            .map_err(|_| anyhow!("the cpu-gather actor has stopped"))?;
        Ok((slot_i, seqno))
    }

    /// Queues the second half on `ops`'s stream: a wait for the slot's values, the
    /// scatter of them into the slots of table `t` (misses of `sc`), and the event that
    /// frees the ring slot.
    pub fn finish(
        &self,
        ops: &CudaOps,
        t: &ShadowTable,
        sc: &StepScratch,
        (slot_i, seqno): (usize, u32),
    ) -> Result<()> {
        let s = ops.device().stream();
        let flag = self.flags.addr + 4 * slot_i as u64;
        // SAFETY: `flag` is a u32 of the flags buffer, alive as long as self.
        let r = unsafe {
            sys::cuStreamWaitValue32_v2(
                s.cu_stream(),
                flag,
                seqno,
                CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32,
            )
        };
        ensure!(
            r == sys::cudaError_enum::CUDA_SUCCESS,
            "cpu-gather: the stream wait for ring slot {slot_i} failed: {r:?}"
        );
        let tier_base = (self.layout.tier > 0).then_some(&sc.tier_base);
        let staged = &self.shared.device[slot_i];
        ops.shadow_scatter_values(t, &sc.misses, &sc.fetch_count, tier_base, staged, FETCH_BLOCKS)?;
        let consumed = ops.device().event(false)?;
        consumed.record(s)?;
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).consumed[slot_i] = Some(consumed);
        Ok(())
    }

    /// The number the next job queued will have (a step's jobs are a range of them).
    pub fn next_job(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).next
    }

    /// The first error of the jobs `jobs` (a step's: its values are wrong), removing
    /// their errors; later jobs' errors stay for their own steps.
    pub fn take_error(&self, jobs: std::ops::Range<u64>) -> Option<String> {
        let mut errors = self.shared.errors.lock().unwrap_or_else(|p| p.into_inner());
        let first = errors.iter().find(|(id, _)| jobs.contains(id)).map(|(_, e)| e.clone());
        errors.retain(|(id, _)| !jobs.contains(id) && *id >= jobs.start);
        first
    }

    /// Host time of the gathers since the last call.
    pub fn take_times(&self) -> GatherTimes {
        std::mem::take(&mut *self.shared.times.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for GatherTransfer {
    fn drop(&mut self) {
        // The thread ends once the inbox is closed and empty; then both streams finish
        // what they were given (waits on the flags, copies from the staging) before the
        // flags and buffers go.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in &self.streams {
            let _ = s.synchronize();
        }
    }
}

/// One job on the actor's thread: wait for the lists, gather into the slot's staging,
/// and queue the staging's copy to the device on `stream`.
fn run_job(
    sh: &Shared,
    lay: &ShadowLayout,
    dev_pool: &DevicePool,
    pool: &[bf16],
    gather: &dyn ChunkGather,
    stream: &Arc<CudaStream>,
    job: &Job,
) -> Result<()> {
    let t0 = Instant::now();
    job.lists.synchronize()?;
    let t1 = Instant::now();
    let mut bufs = sh.slots[job.slot].lock().unwrap_or_else(|p| p.into_inner());
    let heads = job.pool_seqs.len() * lay.kv_heads;
    let (misses, counts) = (bufs.misses.as_slice()?, bufs.miss_count.as_slice()?);
    let chunk_elems = dev_pool.shape.chunk_elems;
    // Each miss's source in the pool, in list order (sequence, head, place).
    let mut sources = Vec::new();
    for (e, &n) in counts[..heads].iter().enumerate() {
        let (b, h) = (e / lay.kv_heads, e % lay.kv_heads);
        for j in 0..(n.max(0) as usize).min(lay.slots) {
            let chunk = misses[(e * lay.slots + j) * 2 + 1] as usize;
            sources.push(dev_pool.chunk_offset(job.layer, job.pool_seqs[b], h, chunk));
        }
    }
    let n = sources.len() * chunk_elems;
    let staging = bufs.staging.as_mut_slice()?;
    ensure!(
        n <= staging.len(),
        "cpu-gather: {} misses overflow the staging",
        sources.len()
    );
    gather.gather(pool, &sources, chunk_elems, &mut staging[..n])?;
    let t2 = Instant::now();
    let dst = sh.device[job.slot].device_ptr(stream).0;
    // SAFETY: the first n staged values go to the device staging (as large); the slot is
    // not reused until the scatter after this copy is done.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, &staging[..n], stream.cu_stream()) }?;
    let mut times = sh.times.lock().unwrap_or_else(|p| p.into_inner());
    times.wait_secs += (t1 - t0).as_secs_f64();
    times.gather_secs += (t2 - t1).as_secs_f64();
    times.bytes += 2 * n as u64;
    Ok(())
}
