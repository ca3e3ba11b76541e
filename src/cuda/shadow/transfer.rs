//! The cpu-gather fetch without the step's host thread: a gather actor
//! ([`super::gather_actor`]) that the step's stream waits for in a host function.
//!
//! The thread that queues a decode step never waits for the GPU here. Per layer and
//! micro-batch it queues, on the step's stream, the copy of the miss lists into a ring
//! slot's pinned buffers and a host function after it that tells the actor they are in,
//! and sends the actor the job; then it queues a second host function before the
//! scatter kernel, which holds the stream until the actor is done with the job, and goes
//! on to the next layer. The actor's thread gathers the missed chunks from the pool into
//! the slot's staging (with the lane's [`ChunkGather`]: the pipeline's pinned gather
//! threads, or rayon's), making no CUDA call. The staging is pinned host memory mapped
//! for the device, which the scatter kernel reads over PCIe. Stream memory operations
//! (`cuStreamWaitValue32`) are not used: the H200 refused them on mapped host memory.
//!
//! With a host-written value pool (a file the device cannot address) the actor also
//! writes the fold's chunks into the pool: the fold kernel leaves a layer's chunks of the
//! sequences in host slots in the layer's part of an outbox (pinned host memory mapped
//! for the device), and a write-back job, queued after the fold like a gather after its
//! lists, copies them into the pool. The actor does jobs in order, so every later gather
//! finds them there. The step's stream ends with a host function that waits for its
//! last write-back, so that a step is done only once its jobs all are (their errors
//! are the step's); the next fold into the same part of the outbox waits for the
//! write-back that reads it too, where that is not done by then.
//!
//! A slot is used again only once the scatter that read it is done (an event the queuing
//! thread waits for: it runs at most a ring's length of jobs ahead of the GPU), or, where
//! its step stopped before the scatter, once the actor is done with its job. A job whose
//! gather fails (an error, or a panic of a gather thread) is still done, so that the
//! host function returns, and leaves its error for [`GatherTransfer::take_error`]: the
//! lane fails the step with it. When the actor's thread ends, every waiting host
//! function is released; when the actor is dropped, its thread stops waiting for lists
//! that a failed stream will not bring.

use super::buffers::{mapped_device_addr, GatherBuffers, ShadowTable, StepScratch};
use super::fetch::FETCH_BLOCKS;
use super::gather_actor::{
    gather_job, lists_arrived, wait_for_gather, write_back_job, Actor, Fold, HostCall, Job, JobWork, Progress, SlotMem,
};
use super::gather_actor::{ChunkGather, GatherTimes};
use super::layout::ShadowLayout;
use super::pool::GpuValuePool;
use crate::cuda::CudaOps;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaEvent, CudaStream, DriverError, PinnedHostSlice};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The fewest ring slots: jobs (a layer's micro-batch each) the queuing thread may run
/// ahead of the GPU's scatter. A lane with more micro-batches gets one slot each.
pub const RING: usize = 8;

/// Where a ring slot's last job stands, as the queuing thread knows it.
enum SlotUse {
    /// Nothing pending on it.
    Free,
    /// Job `n` sent to the actor; its scatter not queued yet (or never: its step stopped
    /// first).
    Sent(u64),
    /// Its scatter queued: the event after it.
    Scattered(CudaEvent),
}

/// The ring as the queuing thread sees it.
struct Ring {
    last: Vec<SlotUse>,
    /// The next job's number.
    next: u64,
}

/// A job queued by [`GatherTransfer::queue`], for [`GatherTransfer::finish`].
pub struct PendingGather {
    id: u64,
    slot: usize,
}

/// The cpu-gather path's actor for one lane (see the module's documentation).
pub struct GatherTransfer {
    actor: Actor,
    /// The queuing thread's own: where each slot's last job stands, and the next job's
    /// number.
    ring: Mutex<Ring>,
    /// Each slot's host buffers as the queuing thread and the actor address them.
    slots: Arc<[SlotMem]>,
    /// Each slot's staging as the device addresses it.
    staging: Vec<u64>,
    layout: ShadowLayout,
    batch: usize,
    /// The host pool's first byte on the host: the pool it reads.
    pool_base: usize,
    /// The fold's outbox, with a host-written pool.
    outbox: Option<Outbox>,
    /// The stream its jobs are queued on (their numbers follow its order).
    stream: Arc<CudaStream>,
    /// The pinned buffers `slots` address: dropped after the actor's thread has ended
    /// and the stream is done with them.
    _buffers: Vec<GatherBuffers>,
}

/// Where the fold leaves the chunks of a host-written pool's sequences for the actor to
/// write: `[layer][batch][kv_head]` chunks in pinned host memory mapped for the device.
struct Outbox {
    /// Its address on the device.
    dev: u64,
    /// Bytes of one layer's part.
    layer_bytes: usize,
    /// Per layer, the last write-back job that reads its part.
    last: Mutex<Vec<Option<u64>>>,
    /// The memory (its host address is the actor's): dropped with the buffers, after the
    /// actor's thread has ended.
    _mem: PinnedHostSlice<u8>,
}

impl GatherTransfer {
    /// The actor for steps of up to `batch` sequences of `layout` in up to `micro`
    /// micro-batches on `ops`'s stream, reading `pool` and copying chunks with `gather`;
    /// its thread is named `name`. Refused for a pool with GPU value slots (the actor
    /// reads host memory only).
    pub fn new(
        ops: &CudaOps,
        (layout, batch, micro): (&ShadowLayout, usize, usize),
        pool: &GpuValuePool,
        gather: Arc<dyn ChunkGather + Send>,
        name: &str,
    ) -> Result<Self> {
        ensure!(
            pool.device_slots() == 0,
            "cpu-gather reads the host value pool: it does not serve a pool with {} GPU value slots (fetch \
             zero-copy, or keep every sequence's values in host memory)",
            pool.device_slots()
        );
        let dev = ops.device();
        dev.context().bind_to_thread()?;
        let ring_len = RING.max(micro);
        let mut buffers = (0..ring_len)
            .map(|_| GatherBuffers::new(ops, layout, batch))
            .collect::<Result<Vec<_>>>()?;
        let staging = buffers
            .iter()
            .map(|b| b.staging_device_addr())
            .collect::<Result<Vec<_>>>()?;
        let slots: Arc<[SlotMem]> = buffers
            .iter_mut()
            .map(|b| {
                Ok(SlotMem {
                    misses: (b.misses.as_mut_ptr()?, b.misses.len()),
                    counts: (b.miss_count.as_mut_ptr()?, b.miss_count.len()),
                    staging: (b.staging.as_mut_ptr()?, b.staging.len()),
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into();
        let (lay, dev_pool, mem) = (*layout, pool.device(), slots.clone());
        // The pool's memory, as the gather reads it (see the work's SAFETY note).
        // SAFETY: only the address is taken here.
        let pool_base = unsafe { pool.pool().base_ptr() } as usize;
        let pool_bytes = dev_pool.shape.bytes()?;
        let outbox = if pool.host_written() {
            let layer_bytes = batch * layout.kv_heads * layout.value_chunk_bytes();
            let layers = dev_pool.shape.layers;
            // SAFETY: pinned memory mapped for the device, written by the fold before the
            // actor reads it.
            let mut mem = unsafe {
                dev.context().alloc_pinned_with_flags::<u8>(
                    layers * layer_bytes,
                    cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP | cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE,
                )?
            };
            let host = (mem.as_mut_ptr()? as usize, layer_bytes);
            Some((
                Outbox {
                    dev: mapped_device_addr(&mem).context("the fold's outbox")?,
                    layer_bytes,
                    last: Mutex::new(vec![None; layers]),
                    _mem: mem,
                },
                host,
            ))
        } else {
            None
        };
        let outbox_host = outbox.as_ref().map(|(_, h)| *h);
        let starting = gather.clone();
        let actor = Actor::spawn(
            name,
            move || starting.on_actor_start(),
            Box::new(move |job: &Job| match &job.work {
                JobWork::Gather { slot, pool_seqs } => {
                    // SAFETY: the pool outlives the lane (the backend holds it), and
                    // neither the device nor the host writes the chunks a step's misses
                    // name.
                    let pool = unsafe { std::slice::from_raw_parts(pool_base as *const u8, pool_bytes) };
                    // SAFETY: the slot's buffers outlive the thread (the transfer joins it
                    // first); the job's host function ran after its lists' copy, and the
                    // slot is not used again before the job is done.
                    unsafe { gather_job(&mem[*slot], &lay, (&dev_pool, pool), &*gather, (job.layer, pool_seqs)) }
                }
                JobWork::WriteBack(folds) => {
                    let (base, layer_bytes) =
                        outbox_host.ok_or_else(|| anyhow::anyhow!("a write-back without an outbox"))?;
                    // SAFETY: the outbox outlives the thread (as the slots); its layer's
                    // part holds the fold's chunks (the job's host function ran after the
                    // fold) and the next fold into it waits for this job.
                    let outbox = unsafe {
                        std::slice::from_raw_parts((base + job.layer * layer_bytes) as *const u8, layer_bytes)
                    };
                    // SAFETY: the pool outlives the lane; the folded chunks are new to the
                    // pool, which no gather reads before a later job.
                    unsafe { write_back_job(outbox, &lay, (&dev_pool, pool_base as *mut u8), job.layer, folds) }
                }
            }),
        )?;
        Ok(GatherTransfer {
            actor,
            ring: Mutex::new(Ring {
                last: (0..ring_len).map(|_| SlotUse::Free).collect(),
                next: 0,
            }),
            slots,
            staging,
            layout: *layout,
            batch,
            pool_base,
            outbox: outbox.map(|(o, _)| o),
            stream: dev.stream().clone(),
            _buffers: buffers,
        })
    }

    /// Whether it serves steps of `batch` sequences of `layout` in `micro`
    /// micro-batches, reading `pool`.
    pub fn serves(&self, (layout, batch, micro): (&ShadowLayout, usize, usize), pool: &GpuValuePool) -> bool {
        self.layout == *layout
            && batch <= self.batch
            && micro <= self.staging.len()
            // SAFETY: only the address is compared.
            && unsafe { pool.pool().base_ptr() } as usize == self.pool_base
            && pool.device_slots() == 0
    }

    /// Queues the first half of table `t`'s fetch for layer `l` on `ops`'s stream: the
    /// copy of the miss lists (of `sc`) into the next ring slot, once it is free, the host
    /// function that marks them in, and the job to the actor.
    pub fn queue(&self, ops: &CudaOps, t: &ShadowTable, l: usize, sc: &StepScratch) -> Result<PendingGather> {
        let lay = &self.layout;
        let s = ops.device().stream();
        ensure!(
            s.cu_stream() == self.stream.cu_stream(),
            "cpu-gather: a job queued on another stream than its actor's"
        );
        ensure!(!self.actor.progress.stopped(), "the cpu-gather actor has stopped");
        let heads = t.batch() * lay.kv_heads;
        let (n_misses, n_counts) = (heads * lay.slots * 2, heads);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let id = ring.next;
        let slot = (id % self.slots.len() as u64) as usize;
        let mem = self.slots[slot];
        ensure!(
            n_misses <= mem.misses.1 && n_counts <= mem.counts.1,
            "cpu-gather: a batch of {} sequences, the actor serves {}",
            t.batch(),
            self.batch
        );
        // The slot is free once the scatter that last read it is done (the host function
        // before it waited for the actor), or, where that step stopped before its
        // scatter, once the actor is done with its job.
        match std::mem::replace(&mut ring.last[slot], SlotUse::Free) {
            SlotUse::Scattered(e) => e.synchronize()?,
            SlotUse::Sent(prev) => self.actor.progress.wait_done(prev),
            SlotUse::Free => {}
        }
        // Exactly the micro-batch's lists: a copy into the whole slot would read past a
        // micro-batch's scratch (CUDA_ERROR_INVALID_VALUE).
        // SAFETY: the slot's pinned list buffers hold these lengths (checked); neither the
        // actor (done with the slot's last job) nor an earlier copy (done before that
        // job's lists were marked in) touches them now.
        let (misses, counts) = unsafe {
            (
                std::slice::from_raw_parts_mut(mem.misses.0, n_misses),
                std::slice::from_raw_parts_mut(mem.counts.0, n_counts),
            )
        };
        s.memcpy_dtoh(&sc.misses.slice(0..n_misses), misses)?;
        s.memcpy_dtoh(&sc.fetch_count.slice(0..n_counts), counts)?;
        launch_host(s, lists_arrived, &self.actor.progress, id)
            .with_context(|| format!("cpu-gather: queueing the lists' arrival for ring slot {slot}"))?;
        self.actor.send(Job {
            id,
            layer: l,
            work: JobWork::Gather {
                slot,
                pool_seqs: t.counts().iter().map(|c| c.pool_seq as usize).collect(),
            },
        })?;
        ring.next = id + 1;
        ring.last[slot] = SlotUse::Sent(id);
        Ok(PendingGather { id, slot })
    }

    /// Queues the second half on `ops`'s stream: the host function that waits for the
    /// actor's `job`, the scatter of the slot's staging into the slots of table `t`
    /// (misses of `sc`), and the event that frees the ring slot.
    pub fn finish(&self, ops: &CudaOps, t: &ShadowTable, sc: &StepScratch, job: PendingGather) -> Result<()> {
        let s = ops.device().stream();
        let PendingGather { id, slot } = job;
        {
            let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ensure!(
                matches!(ring.last[slot], SlotUse::Sent(n) if n == id),
                "cpu-gather: job {id} finished after its ring slot {slot} was reused"
            );
        }
        launch_host(s, wait_for_gather, &self.actor.progress, id)
            .with_context(|| format!("cpu-gather: queueing the wait for ring slot {slot}"))?;
        let tier_base = (self.layout.tier > 0).then_some(&sc.tier_base);
        let rows = self.batch * self.layout.kv_heads * self.layout.slots;
        let bytes = rows * self.layout.value_chunk_bytes();
        // SAFETY: the slot's staging is mapped pinned memory of `bytes` bytes, which the
        // actor filled before the host function above returned and does not touch again
        // before the event below.
        unsafe {
            ops.shadow_scatter_values_at(
                t,
                &sc.misses,
                &sc.fetch_count,
                tier_base,
                (self.staging[slot], bytes),
                FETCH_BLOCKS,
            )?
        };
        let consumed = ops.device().event(false)?;
        consumed.record(s)?;
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).last[slot] = SlotUse::Scattered(consumed);
        Ok(())
    }

    /// With a host-written pool, layer `l`'s part of the fold's outbox, (device address,
    /// bytes), for [`CudaOps::shadow_fold`] on `ops`'s stream: first queues there, where
    /// the last write-back that reads that part is not done yet, a host function that
    /// waits for it. None for a registered pool.
    pub fn fold_outbox(&self, ops: &CudaOps, l: usize) -> Result<Option<(u64, usize)>> {
        let Some(o) = &self.outbox else { return Ok(None) };
        let s = ops.device().stream();
        ensure!(
            s.cu_stream() == self.stream.cu_stream(),
            "cpu-gather: a fold queued on another stream than its actor's"
        );
        let last = o.last.lock().unwrap_or_else(|p| p.into_inner());
        let prev = *last.get(l).with_context(|| format!("fold outbox: no layer {l}"))?;
        if let Some(id) = prev.filter(|&id| !self.actor.progress.done_before(id + 1)) {
            launch_host(s, wait_for_gather, &self.actor.progress, id)
                .context("cpu-gather: queueing the fold's wait for its outbox")?;
        }
        Ok(Some((o.dev + (l * o.layer_bytes) as u64, o.layer_bytes)))
    }

    /// With a host-written pool, after layer `l`'s fold of table `t` on `ops`'s stream:
    /// queues there the host function that tells the actor the outbox is filled, and the
    /// actor's job that writes the folded chunks of the sequences in host slots into the
    /// pool. Nothing where none folds (or the pool is registered).
    pub fn write_back(&self, ops: &CudaOps, t: &ShadowTable, l: usize) -> Result<()> {
        let Some(o) = &self.outbox else { return Ok(()) };
        let full = self.layout.recent_rows() as i32;
        let folds: Vec<Fold> = t
            .counts()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.recent == full)
            .map(|(row, c)| Fold {
                row,
                pool_seq: c.pool_seq as usize,
                chunk: c.chunks as usize,
            })
            .collect();
        if folds.is_empty() {
            return Ok(());
        }
        let s = ops.device().stream();
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let id = ring.next;
        launch_host(s, lists_arrived, &self.actor.progress, id)
            .context("cpu-gather: queueing the fold outbox's arrival")?;
        self.actor.send(Job {
            id,
            layer: l,
            work: JobWork::WriteBack(folds),
        })?;
        ring.next = id + 1;
        o.last.lock().unwrap_or_else(|p| p.into_inner())[l] = Some(id);
        Ok(())
    }

    /// With a host-written pool, at a step's end on `ops`'s stream: where the last
    /// write-back queued is not done yet, a host function that waits for it, so that the
    /// stream is done only once every job of the step is (and their errors are the
    /// step's). Nothing otherwise.
    pub fn wait_for_writes(&self, ops: &CudaOps) -> Result<()> {
        let Some(o) = &self.outbox else { return Ok(()) };
        let last = o
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .max()
            .copied();
        if let Some(id) = last.filter(|&id| !self.actor.progress.done_before(id + 1)) {
            launch_host(ops.device().stream(), wait_for_gather, &self.actor.progress, id)
                .context("cpu-gather: queueing the step's wait for its write-backs")?;
        }
        Ok(())
    }

    /// The number the next job queued will have (a step's jobs are a range of them).
    pub fn next_job(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).next
    }

    /// The first error of the jobs `jobs` (a step's, once its stream is done: its values
    /// are wrong), removing their errors and older ones; later jobs' errors stay for
    /// their own steps. A step whose jobs the actor stopped before doing fails too.
    pub fn take_error(&self, jobs: std::ops::Range<u64>) -> Option<String> {
        self.actor.take_error(jobs)
    }

    /// Host time of the gathers since the last call.
    pub fn take_times(&self) -> GatherTimes {
        self.actor.take_times()
    }
}

impl Drop for GatherTransfer {
    fn drop(&mut self) {
        // No more jobs; the stream runs the host functions still queued (the actor does
        // their jobs: their lists come first); then an actor still waiting for lists
        // (their stream failed) stops, and the buffers go once its thread has ended.
        self.actor.close_inbox();
        let _ = self.stream.synchronize();
        self.actor.end();
    }
}

/// Queues host function `f` for job `id` of `progress` on `s`.
fn launch_host(
    s: &CudaStream,
    f: unsafe extern "C" fn(*mut c_void),
    progress: &Arc<Progress>,
    id: u64,
) -> std::result::Result<(), DriverError> {
    s.context().bind_to_thread()?;
    let call = Box::into_raw(Box::new(HostCall {
        progress: progress.clone(),
        id,
    }));
    // SAFETY: `f` makes no CUDA call and takes the box, which a launch that succeeded
    // leaves to it alone.
    let launched = unsafe { cudarc::driver::result::stream::launch_host_function(s.cu_stream(), f, call.cast()) };
    if launched.is_err() {
        // SAFETY: a failed launch left the box with us.
        drop(unsafe { Box::from_raw(call) });
    }
    launched
}
