//! The cpu-gather fetch without the step's host thread: a gather actor the step's
//! stream waits for in a host function.
//!
//! The thread that queues a decode step never waits for the GPU here. Per layer and
//! micro-batch it queues, on the step's stream, the copy of the miss lists into a ring
//! slot's pinned buffers and an event after it, and sends the actor a [`Job`]; then it
//! queues a host function (`cuLaunchHostFunc`) before the scatter kernel, and goes on to
//! the next layer. The actor's thread waits for the event, gathers the missed chunks from
//! the pool into the slot's staging (with the lane's [`ChunkGather`]: the pipeline's
//! pinned gather threads, or rayon's) and marks the slot done in [`Ready`]. The host
//! function blocks the stream until then; the staging is pinned host memory mapped for
//! the device, which the scatter kernel reads over PCIe. Stream memory operations
//! (`cuStreamWaitValue32`) are not used: the H200 refused them on mapped host memory.
//!
//! A slot is used again only once the scatter that read it is done (an event the queuing
//! thread waits for: it runs at most a ring's length of jobs ahead of the GPU), or, where
//! its step stopped before the scatter, once the actor has marked it. A job whose
//! gather fails (an error, or a panic of a gather thread) still marks its slot, so the
//! host function returns, and leaves its error for [`GatherTransfer::take_error`]: the
//! lane fails the step with it. When the actor's thread ends, every waiting host function
//! is released.

use super::buffers::{GatherBuffers, ShadowTable, StepScratch};
use super::decode::{ChunkGather, GatherTimes};
use super::fetch::FETCH_BLOCKS;
use super::layout::{DevicePool, ShadowLayout};
use super::pool::GpuValuePool;
use crate::cuda::CudaOps;
use anyhow::{anyhow, ensure, Context, Result};
use crossbeam_channel::{unbounded, Sender};
use cudarc::driver::{CudaEvent, CudaStream};
use half::bf16;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// The fewest ring slots: jobs (a layer's micro-batch each) the queuing thread may run
/// ahead of the GPU's scatter. A lane with more micro-batches gets one slot each.
pub const RING: usize = 8;

/// One layer's (and micro-batch's) gather for the actor.
struct Job {
    /// Its number among the actor's jobs.
    id: u64,
    /// Recorded after the miss lists' copy into the slot's host buffers.
    lists: CudaEvent,
    slot: usize,
    /// Marked done in [`Ready`] once the slot's staging holds the values.
    seqno: u32,
    layer: usize,
    /// Each sequence's slot of the value pool, in batch order.
    pool_seqs: Vec<usize>,
}

/// Where a ring slot's last job stands, as the queuing thread knows it.
enum SlotUse {
    /// Nothing pending on it.
    Free,
    /// Sent to the actor; its scatter not queued yet (or never: its step stopped first).
    Sent(u32),
    /// Its scatter queued: the event after it.
    Scattered(CudaEvent),
}

/// The ring as the queuing thread sees it.
struct Ring {
    last: Vec<SlotUse>,
    seqnos: Vec<u32>,
    next: u64,
}

/// What the actor has done, as the host functions and the queuing thread wait for it.
/// Plain host memory only: a host function may drop the last reference to it, and it
/// must make no CUDA call.
struct Ready {
    state: Mutex<ReadyState>,
    changed: Condvar,
}

struct ReadyState {
    /// Each slot's last job done (its `seqno`; 0: none).
    done: Vec<u32>,
    /// The number of the last job done.
    last_job: Option<u64>,
    /// The actor's thread has ended: nothing more will be marked.
    stopped: bool,
}

impl Ready {
    fn new(slots: usize) -> Self {
        Ready {
            state: Mutex::new(ReadyState {
                done: vec![0; slots],
                last_job: None,
                stopped: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks job `id` (`seqno` of `slot`) done.
    fn mark(&self, slot: usize, seqno: u32, id: u64) {
        let mut s = self.lock();
        s.done[slot] = seqno;
        s.last_job = Some(id);
        drop(s);
        self.changed.notify_all();
    }

    /// Releases every waiter, now and later.
    fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    /// Blocks until `seqno` of `slot` is done or the actor has stopped.
    fn wait(&self, slot: usize, seqno: u32) {
        let mut s = self.lock();
        while s.done[slot] != seqno && !s.stopped {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether every job up to `id` is done.
    fn done_through(&self, id: u64) -> bool {
        self.lock().last_job.is_some_and(|d| d >= id)
    }
}

/// Stops [`Ready`] when dropped: the actor's thread holds one, so its end (a panic
/// included) releases every waiting host function.
struct StopOnExit(Arc<Ready>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A host function's argument: the slot and number it waits for.
struct HostWait {
    ready: Arc<Ready>,
    slot: usize,
    seqno: u32,
}

/// The host function queued before a scatter: blocks the stream until the actor is done
/// with the job (or has stopped). Makes no CUDA call and always returns.
///
/// # Safety
/// `data` is a `Box<HostWait>` leaked for this one call.
unsafe extern "C" fn wait_for_gather(data: *mut c_void) {
    // SAFETY: the caller's contract; the box is ours from here.
    let w = unsafe { Box::from_raw(data.cast::<HostWait>()) };
    // No panic may leave an extern "C" function; `wait` recovers poisoned locks.
    let _ = catch_unwind(AssertUnwindSafe(|| w.ready.wait(w.slot, w.seqno)));
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
}

/// The cpu-gather path's actor for one lane (see the module's documentation).
pub struct GatherTransfer {
    shared: Arc<Shared>,
    ready: Arc<Ready>,
    /// The queuing thread's own: where each slot's last job stands, its last sequence
    /// number, and the next job's number.
    ring: Mutex<Ring>,
    /// Each slot's staging as the device addresses it.
    staging: Vec<u64>,
    layout: ShadowLayout,
    batch: usize,
    pool_addr: u64,
    /// The queuing thread's stream, synchronised before the buffers go.
    stream: Arc<CudaStream>,
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl GatherTransfer {
    /// The actor for steps of up to `batch` sequences of `layout` in up to `micro`
    /// micro-batches on `ops`'s stream, reading `pool` and copying chunks with `gather`;
    /// its thread is named `name`.
    pub fn new(
        ops: &CudaOps,
        (layout, batch, micro): (&ShadowLayout, usize, usize),
        pool: &GpuValuePool,
        gather: Arc<dyn ChunkGather + Send>,
        name: &str,
    ) -> Result<Self> {
        let dev = ops.device();
        dev.context().bind_to_thread()?;
        let ring_len = RING.max(micro);
        let slots = (0..ring_len)
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
        });
        let ready = Arc::new(Ready::new(ring_len));
        let (tx, rx) = unbounded::<Job>();
        let (sh, rd, lay) = (shared.clone(), ready.clone(), *layout);
        let dev_pool = pool.device();
        // The pool's memory, as the gather reads it (see the thread's SAFETY note).
        // SAFETY: only the address is taken here.
        let pool_base = unsafe { pool.pool().base_ptr() } as usize;
        let pool_elems = dev_pool.shape.elems()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _stop = StopOnExit(rd.clone());
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
                    // Before the mark: the step that waits for it must find its error.
                    if let Some(e) = err {
                        sh.errors.lock().unwrap_or_else(|p| p.into_inner()).push((job.id, e));
                    }
                    // Always: a host function waits for it.
                    rd.mark(job.slot, job.seqno, job.id);
                }
            })
            .context("starting the cpu-gather actor's thread")?;
        Ok(GatherTransfer {
            shared,
            ready,
            ring: Mutex::new(Ring {
                last: (0..ring_len).map(|_| SlotUse::Free).collect(),
                seqnos: vec![0; ring_len],
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

    /// Whether it serves steps of `batch` sequences of `layout` in `micro`
    /// micro-batches, reading `pool`.
    pub fn serves(&self, (layout, batch, micro): (&ShadowLayout, usize, usize), pool: &GpuValuePool) -> bool {
        self.layout == *layout
            && batch <= self.batch
            && micro <= self.staging.len()
            && pool.device().addr == self.pool_addr
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
        ring.next += 1;
        let slot_i = (id % self.staging.len() as u64) as usize;
        // The actor is done with the slot once the scatter that read it is (its host
        // function came before), or, where its step stopped before the scatter, once
        // the actor has marked it: only then may the lists be copied over.
        match std::mem::replace(&mut ring.last[slot_i], SlotUse::Free) {
            SlotUse::Scattered(e) => e.synchronize()?,
            SlotUse::Sent(seqno) => self.ready.wait(slot_i, seqno),
            SlotUse::Free => {}
        }
        ring.seqnos[slot_i] = ring.seqnos[slot_i].wrapping_add(1).max(1);
        let seqno = ring.seqnos[slot_i];
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
        ring.last[slot_i] = SlotUse::Sent(seqno);
        Ok((slot_i, seqno))
    }

    /// Queues the second half on `ops`'s stream: the host function that waits for the
    /// actor's job, the scatter of the slot's staging into the slots of table `t`
    /// (misses of `sc`), and the event that frees the ring slot.
    pub fn finish(
        &self,
        ops: &CudaOps,
        t: &ShadowTable,
        sc: &StepScratch,
        (slot_i, seqno): (usize, u32),
    ) -> Result<()> {
        let s = ops.device().stream();
        let wait = Box::into_raw(Box::new(HostWait {
            ready: self.ready.clone(),
            slot: slot_i,
            seqno,
        }));
        // SAFETY: `wait_for_gather` makes no CUDA call and takes the box, which a launch
        // that succeeded leaves to it alone.
        let launched = unsafe {
            cudarc::driver::result::stream::launch_host_function(s.cu_stream(), wait_for_gather, wait.cast())
        };
        if let Err(e) = launched {
            // SAFETY: a failed launch left the box with us.
            drop(unsafe { Box::from_raw(wait) });
            return Err(e).context(format!("cpu-gather: queueing the wait for ring slot {slot_i}"));
        }
        let tier_base = (self.layout.tier > 0).then_some(&sc.tier_base);
        let rows = self.batch * self.layout.kv_heads * self.layout.slots;
        let elems = rows * self.layout.chunk * self.layout.head_dim;
        // SAFETY: the slot's staging is mapped pinned memory of `elems` values, which the
        // actor filled before the host function above returned and does not touch again
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
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).last[slot_i] = SlotUse::Scattered(consumed);
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
        let mut errors = self.shared.errors.lock().unwrap_or_else(|p| p.into_inner());
        let first = errors.iter().find(|(id, _)| jobs.contains(id)).map(|(_, e)| e.clone());
        errors.retain(|(id, _)| *id >= jobs.end);
        drop(errors);
        first.or_else(|| {
            (!jobs.is_empty() && !self.ready.done_through(jobs.end - 1))
                .then(|| "the gather actor stopped before the step's gathers were done".to_string())
        })
    }

    /// Host time of the gathers since the last call.
    pub fn take_times(&self) -> GatherTimes {
        std::mem::take(&mut *self.shared.times.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for GatherTransfer {
    fn drop(&mut self) {
        // The thread ends once the inbox is closed and empty (each job marks its slot;
        // its end releases any host function still waiting); then the stream finishes
        // what reads the staging before it goes.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Runs the host function for (`slot`, `seqno`) on a thread of its own, as the
    /// driver would; the receiver hears when it has returned.
    fn host_function(ready: &Arc<Ready>, slot: usize, seqno: u32) -> mpsc::Receiver<()> {
        let w = Box::into_raw(Box::new(HostWait {
            ready: ready.clone(),
            slot,
            seqno,
        })) as usize;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: the box leaked above, for this one call.
            unsafe { wait_for_gather(w as *mut c_void) };
            tx.send(()).unwrap();
        });
        rx
    }

    const SHORT: Duration = Duration::from_millis(200);
    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn a_host_function_returns_once_its_job_is_marked_and_not_before() {
        let ready = Arc::new(Ready::new(2));
        let waits = host_function(&ready, 1, 3);
        ready.mark(0, 3, 0);
        ready.mark(1, 2, 1);
        assert!(waits.recv_timeout(SHORT).is_err(), "returned for another slot or job");
        ready.mark(1, 3, 2);
        waits.recv_timeout(LONG).expect("still waiting once its job was marked");
        assert!(ready.done_through(2) && !ready.done_through(3));
    }

    #[test]
    fn the_actor_thread_ending_releases_every_host_function() {
        let ready = Arc::new(Ready::new(RING));
        let waits: Vec<_> = (0..RING).map(|s| host_function(&ready, s, 1)).collect();
        assert!(waits[0].recv_timeout(SHORT).is_err());
        // A thread that dies by a panic, holding the guard as the actor's does.
        let guard = StopOnExit(ready.clone());
        let died = std::thread::spawn(move || {
            let _stop = guard;
            panic!("actor lost");
        });
        assert!(died.join().is_err());
        for w in waits {
            w.recv_timeout(LONG)
                .expect("a host function still waits after the actor ended");
        }
        // And any queued later, whose jobs will never be done.
        host_function(&ready, 0, 7).recv_timeout(LONG).unwrap();
        assert!(!ready.done_through(0));
    }
}
