//! The cpu-gather fetch without the step's host thread: a gather actor signalling the
//! GPU through host memory.
//!
//! The thread that queues a decode step never waits for the GPU here. Per layer and
//! micro-batch it queues, on the step's stream, the copy of the miss lists into a ring
//! slot's pinned buffers and an event after it, and sends the actor a [`Job`]; then it
//! queues a stream wait for the slot's flag before the scatter kernel, and goes on to the
//! next layer. The actor's thread waits for the event, gathers the missed chunks from
//! the pool into the slot's staging (with the lane's [`ChunkGather`]: the pipeline's
//! pinned gather threads, or rayon's) and stores the job's number into the flag. Both
//! the staging and the flags are pinned host memory mapped for the device: the step's
//! stream waits on the flag (`cuStreamWaitValue32`) and the scatter kernel reads the
//! staging over PCIe. No GPU work stands on the producer's side: a flag written by
//! another stream (`cuStreamWriteValue32`) hung on the H200, that stream's write queued
//! behind the wait in a hardware queue the two streams shared.
//!
//! A slot is used again only once the scatter that read it is done (an event the queuing
//! thread waits for: it runs at most [`RING`] jobs ahead of the GPU). A job whose gather
//! fails (an error, or a panic of a gather thread) still stores its flag, so the GPU never
//! waits forever, and leaves its error for [`GatherTransfer::take_error`]: the lane fails
//! the step with it.

use super::buffers::{GatherBuffers, ShadowTable, StepScratch};
use super::decode::{ChunkGather, GatherTimes};
use super::fetch::FETCH_BLOCKS;
use super::layout::{DevicePool, ShadowLayout};
use super::pool::GpuValuePool;
use crate::cuda::CudaOps;
use anyhow::{anyhow, ensure, Context, Result};
use crossbeam_channel::{unbounded, Sender};
use cudarc::driver::sys::{self, CUstreamWaitValue_flags};
use cudarc::driver::{CudaEvent, CudaStream};
use half::bf16;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicU32, Ordering};
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
    /// Stored into the slot's flag once the slot's staging holds the values.
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

/// The ring's flags: `RING` u32s of pinned host memory mapped for the device, stored by
/// the actor's thread and waited on by the step's stream.
struct Flags {
    host: *mut u32,
    /// The first flag's device address.
    addr: u64,
}

// SAFETY: the flags are plain memory owned by the actor's owner; the host only stores
// to them atomically (AtomicU32 views), the device only reads them.
unsafe impl Send for Flags {}
// SAFETY: as above.
unsafe impl Sync for Flags {}

impl Flags {
    /// Zeroed flags in mapped pinned host memory.
    fn new() -> Result<Self> {
        let bytes = 4 * RING;
        // SAFETY: a fresh allocation of `bytes`, zeroed before use and freed in Drop; its
        // device address is the mapping's.
        unsafe {
            let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
            let p = cudarc::driver::result::malloc_host(bytes, flags).context("cpu-gather: the ring's flags")?;
            std::ptr::write_bytes(p.cast::<u8>(), 0, bytes);
            let f = Flags {
                host: p.cast(),
                addr: 0,
            };
            let mut addr = 0;
            let r = sys::cuMemHostGetDevicePointer_v2(&mut addr, p, 0);
            ensure!(
                r == sys::cudaError_enum::CUDA_SUCCESS,
                "cpu-gather: mapping the ring's flags for the device: {r:?}"
            );
            Ok(Flags { addr, ..f })
        }
    }

    /// Stores `value` into flag `slot` once every earlier store of this thread (the
    /// staging) is visible.
    fn store(&self, slot: usize, value: u32) {
        fence(Ordering::SeqCst);
        // SAFETY: `slot < RING` (the ring's slots), a u32 of the allocation, aligned.
        let flag = unsafe { AtomicU32::from_ptr(self.host.add(slot)) };
        flag.store(value, Ordering::SeqCst);
    }
}

impl Drop for Flags {
    fn drop(&mut self) {
        // SAFETY: the allocation made in new; no stream waits on it any more (the
        // actor's owner synchronises its stream first).
        unsafe {
            let _ = cudarc::driver::result::free_host(self.host.cast());
        }
    }
}

/// What the actor's thread and the queuing thread share.
struct Shared {
    /// Each ring slot's pinned buffers (the queuing thread copies the lists in, once the
    /// slot's last scatter is done; the actor reads them and fills the staging).
    slots: Vec<Mutex<GatherBuffers>>,
    /// The errors of jobs not yet claimed by a step ([`GatherTransfer::take_error`]), by
    /// job number.
    errors: Mutex<Vec<(u64, String)>>,
    /// Host time of the gathers.
    times: Mutex<GatherTimes>,
    flags: Flags,
}

/// The cpu-gather path's actor for one lane (see the module's documentation).
pub struct GatherTransfer {
    shared: Arc<Shared>,
    /// The queuing thread's own: each slot's event after the last scatter that read it
    /// and its last job's number, and the next job's slot.
    ring: Mutex<Ring>,
    /// Each slot's staging as the device addresses it.
    staging: Vec<u64>,
    layout: ShadowLayout,
    batch: usize,
    pool_addr: u64,
    /// The queuing thread's stream, synchronised before the flags and buffers go.
    stream: Arc<CudaStream>,
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl GatherTransfer {
    /// The actor for steps of up to `batch` sequences of `layout` on `ops`'s stream,
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
        dev.context().bind_to_thread()?;
        let slots = (0..RING)
            .map(|_| GatherBuffers::new(ops, layout, batch))
            .collect::<Result<Vec<_>>>()?;
        let staging = slots
            .iter()
            .map(|b| b.staging_device_addr())
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            slots: slots.into_iter().map(Mutex::new).collect(),
            errors: Mutex::new(Vec::new()),
            times: Mutex::new(GatherTimes::default()),
            flags: Flags::new()?,
        });
        let (tx, rx) = unbounded::<Job>();
        let (sh, lay) = (shared.clone(), *layout);
        let dev_pool = pool.device();
        // The pool's memory, as the gather reads it (see the thread's SAFETY note).
        // SAFETY: only the address is taken here.
        let pool_base = unsafe { pool.pool().base_ptr() } as usize;
        let pool_elems = dev_pool.shape.elems()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // SAFETY: the registered pool outlives the lane (the backend holds it),
                // and the device does not write the chunks a step's misses name.
                let pool: &[bf16] = unsafe { std::slice::from_raw_parts(pool_base as *const bf16, pool_elems) };
                for job in rx {
                    let done = catch_unwind(AssertUnwindSafe(|| run_job(&sh, &lay, &dev_pool, pool, &*gather, &job)));
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
                    if let Some(e) = err {
                        sh.errors.lock().unwrap_or_else(|p| p.into_inner()).push((job.id, e));
                    }
                    // Always: the GPU waits for this value.
                    sh.flags.store(job.slot, job.seqno);
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
            staging,
            layout: *layout,
            batch,
            pool_addr: pool.device().addr,
            stream: dev.stream().clone(),
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

    /// Queues the second half on `ops`'s stream: a wait for the slot's flag, the scatter
    /// of its staging into the slots of table `t` (misses of `sc`), and the event that
    /// frees the ring slot.
    pub fn finish(
        &self,
        ops: &CudaOps,
        t: &ShadowTable,
        sc: &StepScratch,
        (slot_i, seqno): (usize, u32),
    ) -> Result<()> {
        let s = ops.device().stream();
        let flag = self.shared.flags.addr + 4 * slot_i as u64;
        // SAFETY: `flag` is a u32 of the mapped flags, alive as long as self (whose drop
        // synchronises this stream first).
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
            "cpu-gather: the stream wait for ring slot {slot_i} failed ({r:?}); the GPU needs stream memory \
             operations on mapped host memory, the zero-copy value fetch does not"
        );
        let tier_base = (self.layout.tier > 0).then_some(&sc.tier_base);
        let rows = self.batch * self.layout.kv_heads * self.layout.slots;
        let elems = rows * self.layout.chunk * self.layout.head_dim;
        // SAFETY: the slot's staging is mapped pinned memory of `elems` values, which the
        // actor filled before storing the flag waited for above and does not touch again
        // before the event below.
        unsafe {
            ops.shadow_scatter_values_at(
                t,
                &sc.misses,
                &sc.fetch_count,
                tier_base,
                (self.staging[slot_i], elems),
                FETCH_BLOCKS,
            )?
        };
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
    /// their errors and older ones; later jobs' errors stay for their own steps.
    pub fn take_error(&self, jobs: std::ops::Range<u64>) -> Option<String> {
        let mut errors = self.shared.errors.lock().unwrap_or_else(|p| p.into_inner());
        let first = errors.iter().find(|(id, _)| jobs.contains(id)).map(|(_, e)| e.clone());
        errors.retain(|(id, _)| *id >= jobs.end);
        first
    }

    /// Host time of the gathers since the last call.
    pub fn take_times(&self) -> GatherTimes {
        std::mem::take(&mut *self.shared.times.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for GatherTransfer {
    fn drop(&mut self) {
        // The thread ends once the inbox is closed and empty (each job stores its flag);
        // then the stream finishes what waits on the flags or reads the staging before
        // they go.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.stream.synchronize();
    }
}

/// One job on the actor's thread: wait for the lists, then gather into the slot's
/// staging.
fn run_job(
    sh: &Shared,
    lay: &ShadowLayout,
    dev_pool: &DevicePool,
    pool: &[bf16],
    gather: &dyn ChunkGather,
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
    let mut times = sh.times.lock().unwrap_or_else(|p| p.into_inner());
    times.wait_secs += (t1 - t0).as_secs_f64();
    times.gather_secs += (t2 - t1).as_secs_f64();
    times.bytes += 2 * n as u64;
    Ok(())
}
