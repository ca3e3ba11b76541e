//! The cpu-gather actor's host side, free of CUDA calls: its thread, the jobs' progress,
//! and the two host functions that join it to a step's stream
//! ([`super::transfer::GatherTransfer`] queues them).
//!
//! Jobs are numbered in the order of the stream they belong to. Per job, a host function
//! queued after the copy of its miss lists says that they are in ([`lists_arrived`]),
//! and one queued before its scatter holds the stream until the job is done
//! ([`wait_for_gather`]). The actor's thread waits for each job's lists, does its work
//! and marks it done, a failed or panicking job included; it does the jobs in order, so
//! "done up to n" covers every earlier job. What the actor waits for and what waits for
//! it meet in host memory only: no CUDA call, driver lock or CUDA error state lies
//! between the stream and the thread it waits for.

use super::layout::{DevicePool, ShadowLayout};
use crate::panics::message as panic_message;
use anyhow::{anyhow, ensure, Result};
use crossbeam_channel::{unbounded, Sender};
use rayon::prelude::*;
use std::ffi::c_void;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// One layer's (and micro-batch's) gather, or one layer's write-back of folded chunks.
pub(super) struct Job {
    /// Its number, in the order of the stream.
    pub id: u64,
    /// The layer whose values it gathers or writes.
    pub layer: usize,
    /// What it does.
    pub work: JobWork,
}

/// The two kinds of job.
pub(super) enum JobWork {
    /// Gathers the missed chunks into a ring slot's staging ([`gather_job`]).
    Gather {
        /// The ring slot whose buffers it reads and fills.
        slot: usize,
        /// Each sequence's slot of the value pool, in batch order.
        pool_seqs: Vec<usize>,
    },
    /// Copies the chunks the fold left in the outbox into a host-written pool
    /// ([`write_back_job`]).
    WriteBack(Vec<Fold>),
}

/// A sequence in a host slot whose oldest recent chunk a step folded: its row of the
/// batch (its outbox entries), its pool slot and the chunk's index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fold {
    pub row: usize,
    pub pool_seq: usize,
    pub chunk: usize,
}

/// How far the jobs have come. Plain host memory: a host function may drop the last
/// reference to it, and makes no CUDA call.
#[derive(Default)]
pub(super) struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    /// Jobs numbered below it have their miss lists in their slot's buffers.
    arrived: u64,
    /// Jobs numbered below it are done (gathered, or failed).
    done: u64,
    /// The actor's thread has ended: no more jobs will be done.
    stopped: bool,
    /// The actor's owner is going: lists not in yet will not come.
    closed: bool,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    fn wait_until(&self, ready: impl Fn(&ProgressState) -> bool) -> MutexGuard<'_, ProgressState> {
        let mut s = self.lock();
        while !ready(&s) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s
    }

    /// Marks job `id`'s lists in.
    pub fn lists_in(&self, id: u64) {
        self.update(|s| s.arrived = s.arrived.max(id + 1));
    }

    /// Marks job `id` done.
    fn mark_done(&self, id: u64) {
        self.update(|s| s.done = s.done.max(id + 1));
    }

    /// Blocks until job `id` is done, or until none will be.
    pub fn wait_done(&self, id: u64) {
        drop(self.wait_until(|s| s.done > id || s.stopped || s.closed));
    }

    /// Blocks until job `id`'s lists are in (true) or will not come (false).
    fn wait_lists(&self, id: u64) -> bool {
        self.wait_until(|s| s.arrived > id || s.closed).arrived > id
    }

    /// Whether every job numbered below `end` is done.
    pub fn done_before(&self, end: u64) -> bool {
        self.lock().done >= end
    }

    /// Whether the actor's thread has ended.
    pub fn stopped(&self) -> bool {
        self.lock().stopped
    }
}

/// A host function's argument: the progress and the job it concerns, boxed and leaked
/// for the one call.
pub(super) struct HostCall {
    pub progress: Arc<Progress>,
    pub id: u64,
}

/// The host function queued after a job's lists copy: marks them in. Never blocks.
///
/// # Safety
/// `data` is a `Box<HostCall>` leaked for this one call.
pub(super) unsafe extern "C" fn lists_arrived(data: *mut c_void) {
    // SAFETY: the caller's contract; the box is ours from here.
    let call = unsafe { Box::from_raw(data.cast::<HostCall>()) };
    // No panic may leave an extern "C" function; the lock recovers from poisoning.
    let _ = catch_unwind(AssertUnwindSafe(|| call.progress.lists_in(call.id)));
}

/// The host function queued before a job's scatter: holds the stream until the job is
/// done (or the actor has ended). Makes no CUDA call and always returns.
///
/// # Safety
/// `data` is a `Box<HostCall>` leaked for this one call.
pub(super) unsafe extern "C" fn wait_for_gather(data: *mut c_void) {
    // SAFETY: the caller's contract; the box is ours from here.
    let call = unsafe { Box::from_raw(data.cast::<HostCall>()) };
    let _ = catch_unwind(AssertUnwindSafe(|| call.progress.wait_done(call.id)));
}

/// Stops the progress when dropped: the actor's thread holds one, so its end (a panic
/// included) releases every waiting host function.
struct StopOnExit(Arc<Progress>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.update(|s| s.stopped = true);
    }
}

/// A job's work: the bytes it gathered, or why it failed.
pub(super) type Work = Box<dyn Fn(&Job) -> Result<u64> + Send>;

/// The actor's thread and what the queuing side shares with it.
pub(super) struct Actor {
    pub progress: Arc<Progress>,
    /// The errors of jobs not yet claimed by a step ([`Actor::take_error`]), by number.
    errors: Arc<Mutex<Vec<(u64, String)>>>,
    /// Host time of the jobs.
    times: Arc<Mutex<GatherTimes>>,
    inbox: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Actor {
    /// Starts the thread `name`, which runs `start` first (where the lane's gather
    /// pins it), then does each job sent with `work` once its lists are in.
    pub fn spawn(name: &str, start: impl FnOnce() + Send + 'static, work: Work) -> Result<Self> {
        let progress = Arc::new(Progress::default());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let times = Arc::new(Mutex::new(GatherTimes::default()));
        let (tx, rx) = unbounded::<Job>();
        let (p, e, t, who) = (progress.clone(), errors.clone(), times.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _stop = StopOnExit(p.clone());
                start();
                for job in rx {
                    let t0 = Instant::now();
                    if !p.wait_lists(job.id) {
                        break;
                    }
                    let t1 = Instant::now();
                    let result = catch_unwind(AssertUnwindSafe(|| work(&job)));
                    let t2 = Instant::now();
                    let err = match result {
                        Ok(Ok(bytes)) => {
                            lock(&t).bytes += bytes;
                            None
                        }
                        Ok(Err(err)) => Some(format!("{err:#}")),
                        Err(panic) => Some(format!("{who} panicked: {}", panic_message(&*panic))),
                    };
                    {
                        let mut times = lock(&t);
                        times.wait_secs += (t1 - t0).as_secs_f64();
                        times.gather_secs += (t2 - t1).as_secs_f64();
                    }
                    // Before the mark: the step that waited for it must find its error.
                    if let Some(err) = err {
                        lock(&e).push((job.id, err));
                    }
                    p.mark_done(job.id);
                }
            })
            .map_err(|e| anyhow!("starting the cpu-gather actor's thread: {e}"))?;
        Ok(Actor {
            progress,
            errors,
            times,
            inbox: Some(tx),
            thread: Some(thread),
        })
    }

    /// Sends `job` (its lists' host function queued before).
    pub fn send(&self, job: Job) -> Result<()> {
        self.inbox
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| anyhow!("the cpu-gather actor has stopped"))
    }

    /// Closes the inbox: the thread ends once it has done the jobs sent.
    pub fn close_inbox(&mut self) {
        self.inbox = None;
    }

    /// Ends the thread: closes the inbox, tells it that lists not in yet will not come
    /// (their stream failed, or was never run), and waits for it.
    pub fn end(&mut self) {
        self.close_inbox();
        self.progress.update(|s| s.closed = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The first error of the jobs `jobs` (a step's, once its stream is done: its values
    /// are wrong), removing their errors and older ones; later jobs' errors stay for
    /// their own steps. A step whose jobs the actor stopped before doing fails too.
    pub fn take_error(&self, jobs: Range<u64>) -> Option<String> {
        let mut errors = lock(&self.errors);
        let first = errors.iter().find(|(id, _)| jobs.contains(id)).map(|(_, e)| e.clone());
        errors.retain(|(id, _)| *id >= jobs.end);
        drop(errors);
        first.or_else(|| {
            (!self.progress.done_before(jobs.end))
                .then(|| "the gather actor stopped before the step's gathers were done".to_string())
        })
    }

    /// Host time of the jobs since the last call.
    pub fn take_times(&self) -> GatherTimes {
        std::mem::take(&mut *lock(&self.times))
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        self.end();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A ring slot's host buffers as the actor addresses them: the miss lists and their
/// counts (copied in by the stream), the staging (gathered into, read by the device).
#[derive(Clone, Copy)]
pub(super) struct SlotMem {
    pub misses: (*mut i32, usize),
    pub counts: (*mut i32, usize),
    pub staging: (*mut u8, usize),
}

// SAFETY: addresses of buffers that outlive the actor's thread (its owner joins it
// first); who touches them when is the module's protocol: the stream's copy before the
// job's lists are in, the actor between then and the job's end, the device's scatter
// after it.
unsafe impl Send for SlotMem {}
// SAFETY: as Send; the queuing thread and the actor never touch a slot at once.
unsafe impl Sync for SlotMem {}

/// The work of a gather job (its lists in `mem`, which serves its batch): gathers each
/// miss's chunk of layer `layer` of the sequences in pool slots `pool_seqs` from `pool`
/// (shaped as `dev_pool`) into the staging in list order (sequence, KV head, place) with
/// `gather`. Returns the bytes gathered.
///
/// # Safety
/// `mem`'s buffers are live, hold the job's lists, and nothing else touches them until
/// the job is done.
pub(super) unsafe fn gather_job(
    mem: &SlotMem,
    lay: &ShadowLayout,
    (dev_pool, pool): (&DevicePool, &[u8]),
    gather: &dyn ChunkGather,
    (layer, pool_seqs): (usize, &[usize]),
) -> Result<u64> {
    let heads = pool_seqs.len() * lay.kv_heads;
    ensure!(
        heads <= mem.counts.1 && heads * lay.slots * 2 <= mem.misses.1,
        "cpu-gather: lists of {heads} heads overflow the slot's buffers"
    );
    // SAFETY: the caller's contract; the lengths were checked.
    let (misses, counts, staging) = unsafe {
        (
            std::slice::from_raw_parts(mem.misses.0, heads * lay.slots * 2),
            std::slice::from_raw_parts(mem.counts.0, heads),
            std::slice::from_raw_parts_mut(mem.staging.0, mem.staging.1),
        )
    };
    let chunk_bytes = dev_pool.shape.chunk_bytes();
    for &s in pool_seqs {
        ensure!(
            s < dev_pool.shape.seqs,
            "cpu-gather: pool slot {s} is not one of the host pool's {}",
            dev_pool.shape.seqs
        );
    }
    let mut sources = Vec::new();
    for (e, &n) in counts.iter().enumerate() {
        let (b, h) = (e / lay.kv_heads, e % lay.kv_heads);
        for j in 0..(n.max(0) as usize).min(lay.slots) {
            let chunk = misses[(e * lay.slots + j) * 2 + 1] as usize;
            sources.push(dev_pool.chunk_offset(layer, pool_seqs[b], h, chunk));
        }
    }
    let n = sources.len() * chunk_bytes;
    ensure!(
        n <= staging.len(),
        "cpu-gather: {} misses overflow the staging",
        sources.len()
    );
    gather.gather(pool, &sources, chunk_bytes, &mut staging[..n])?;
    Ok(n as u64)
}

/// The work of a write-back job: copies each fold's chunk of every KV head from the
/// layer's `outbox` (`[batch][kv_head]` chunks of [`ShadowLayout::value_chunk_bytes`],
/// the fold's row's entries) to chunk `fold.chunk` of its slot at layer `layer` of the
/// host-written pool starting at `pool` (shaped as `dev_pool`). Returns the bytes copied.
///
/// # Safety
/// `pool` points at `dev_pool.shape.bytes()` writable bytes, of which nothing else
/// touches the folded chunks until the job is done; the outbox holds the layer's folded
/// chunks and nothing writes it meanwhile.
pub(super) unsafe fn write_back_job(
    outbox: &[u8],
    lay: &ShadowLayout,
    (dev_pool, pool): (&DevicePool, *mut u8),
    layer: usize,
    folds: &[Fold],
) -> Result<u64> {
    let s = &dev_pool.shape;
    let cb = s.chunk_bytes();
    ensure!(
        cb == lay.value_chunk_bytes() && s.kv_heads == lay.kv_heads,
        "write-back: a pool of {} heads × {cb}-byte chunks for a layout of {} × {}",
        s.kv_heads,
        lay.kv_heads,
        lay.value_chunk_bytes()
    );
    ensure!(
        layer < s.layers,
        "write-back: layer {layer} outside the pool's {}",
        s.layers
    );
    for f in folds {
        ensure!(
            f.pool_seq < s.seqs && f.chunk < s.chunks,
            "write-back: chunk {} of pool slot {} outside the host pool's {} slots × {} chunks",
            f.chunk,
            f.pool_seq,
            s.seqs,
            s.chunks
        );
        ensure!(
            (f.row + 1) * s.kv_heads * cb <= outbox.len(),
            "write-back: row {} outside the outbox",
            f.row
        );
        for h in 0..s.kv_heads {
            let src = &outbox[(f.row * s.kv_heads + h) * cb..][..cb];
            let at = dev_pool.chunk_offset(layer, f.pool_seq, h, f.chunk);
            // SAFETY: the chunk lies inside the pool (its indices checked above); the
            // caller's contract leaves it to this job.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), pool.add(at), cb) };
        }
    }
    Ok((folds.len() * s.kv_heads * cb) as u64)
}

/// Where the cpu-gather path spent its host time.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatherTimes {
    /// Waiting for the miss lists.
    pub wait_secs: f64,
    /// Copying the chunks into staging.
    pub gather_secs: f64,
    /// Bytes gathered.
    pub bytes: u64,
}

impl std::ops::AddAssign for GatherTimes {
    fn add_assign(&mut self, o: Self) {
        self.wait_secs += o.wait_secs;
        self.gather_secs += o.gather_secs;
        self.bytes += o.bytes;
    }
}

impl GatherTimes {
    /// The times of several gathers (lanes, steps) together.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a GatherTimes>) -> GatherTimes {
        let mut sum = GatherTimes::default();
        for &g in all {
            sum += g;
        }
        sum
    }
}

/// The cpu-gather path's chunk copy: chunk `i` of `dst` (chunks of `chunk` bytes) is
/// `src[sources[i] .. sources[i] + chunk]`. The pipeline's pinned gather threads
/// implement it; [`RayonGather`] is the default.
pub trait ChunkGather: Sync {
    /// Copies every chunk (`dst` holds exactly `sources.len()` chunks).
    fn gather(&self, src: &[u8], sources: &[usize], chunk: usize, dst: &mut [u8]) -> Result<()>;

    /// Runs first on each lane's gather-actor thread (the one that waits for a layer's
    /// miss lists, hands them to [`ChunkGather::gather`] and marks the staging ready:
    /// the transfer actor's host side), so a gather placed on cores can pin it there.
    fn on_actor_start(&self) {}
}

/// [`ChunkGather`] on rayon's global thread pool.
pub struct RayonGather;

impl ChunkGather for RayonGather {
    fn gather(&self, src: &[u8], sources: &[usize], chunk: usize, dst: &mut [u8]) -> Result<()> {
        ensure!(
            dst.len() == sources.len() * chunk,
            "gather: {} chunks of {chunk} into {} values",
            sources.len(),
            dst.len()
        );
        ensure!(
            sources
                .iter()
                .all(|&s| s.checked_add(chunk).is_some_and(|e| e <= src.len())),
            "gather: a chunk lies outside the pool"
        );
        dst.par_chunks_mut(chunk)
            .zip(sources.par_iter())
            .for_each(|(d, &s)| d.copy_from_slice(&src[s..s + chunk]));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{PoolShape, ValueFormat};
    use std::sync::mpsc;
    use std::time::Duration;

    const SHORT: Duration = Duration::from_millis(200);
    const LONG: Duration = Duration::from_secs(10);

    /// Runs host function `f` for job `id` on a thread of its own, as the driver would;
    /// the receiver hears when it has returned.
    fn host_function(f: unsafe extern "C" fn(*mut c_void), progress: &Arc<Progress>, id: u64) -> mpsc::Receiver<()> {
        let call = Box::into_raw(Box::new(HostCall {
            progress: progress.clone(),
            id,
        })) as usize;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: the box leaked above, for this one call.
            unsafe { f(call as *mut c_void) };
            let _ = tx.send(());
        });
        rx
    }

    fn job(id: u64) -> Job {
        Job {
            id,
            layer: 0,
            work: JobWork::WriteBack(Vec::new()),
        }
    }

    #[test]
    fn a_wait_returns_once_its_job_or_a_later_one_is_done_and_not_before() {
        let progress = Arc::new(Progress::default());
        let waits = host_function(wait_for_gather, &progress, 3);
        progress.mark_done(1);
        assert!(waits.recv_timeout(SHORT).is_err(), "returned before its job");
        progress.mark_done(5);
        waits
            .recv_timeout(LONG)
            .expect("still waiting once a later job was done");
        // A wait queued long after its job (a scatter that was never launched, its
        // slot reused since) returns at once.
        host_function(wait_for_gather, &progress, 2).recv_timeout(LONG).unwrap();
        assert!(progress.done_before(6) && !progress.done_before(7));
    }

    #[test]
    fn the_actor_does_a_job_once_its_lists_are_in_and_releases_its_wait() {
        let did = Arc::new(Mutex::new(Vec::new()));
        let (seen, started) = (did.clone(), did.clone());
        let actor = Actor::spawn(
            "test-gather",
            // The start hook runs first, on the actor's own thread.
            move || {
                let on_actor = std::thread::current().name() == Some("test-gather");
                lock(&started).push(if on_actor { u64::MAX } else { u64::MAX - 1 });
            },
            Box::new(move |j: &Job| {
                lock(&seen).push(j.id);
                Ok(10)
            }),
        )
        .unwrap();
        let waits = host_function(wait_for_gather, &actor.progress, 0);
        actor.send(job(0)).unwrap();
        assert!(waits.recv_timeout(SHORT).is_err(), "done before its lists were in");
        assert!(!lock(&did).contains(&0), "a job done before its lists were in");
        host_function(lists_arrived, &actor.progress, 0)
            .recv_timeout(LONG)
            .unwrap();
        waits.recv_timeout(LONG).expect("the wait outlived its job");
        assert_eq!(
            *lock(&did),
            vec![u64::MAX, 0],
            "the start hook first, on the actor's thread"
        );
        assert_eq!(actor.take_error(0..1), None);
        assert_eq!(actor.take_times().bytes, 10);
    }

    #[test]
    fn a_failing_or_panicking_job_is_done_with_its_error_and_the_actor_serves_on() {
        let actor = Actor::spawn(
            "test-gather",
            || {},
            Box::new(|j: &Job| match j.id {
                0 => panic!("gather thread lost"),
                1 => anyhow::bail!("no such chunk"),
                _ => Ok(2),
            }),
        )
        .unwrap();
        let waits: Vec<_> = (0..3)
            .map(|id| host_function(wait_for_gather, &actor.progress, id))
            .collect();
        for id in 0..3 {
            actor.send(job(id)).unwrap();
            actor.progress.lists_in(id);
        }
        for w in waits {
            w.recv_timeout(LONG).expect("a wait outlived its job");
        }
        let e = actor.take_error(0..1).expect("the panic's error");
        assert!(e.contains("test-gather panicked: gather thread lost"), "{e}");
        assert_eq!(actor.take_error(1..2).as_deref(), Some("no such chunk"));
        assert_eq!(actor.take_error(2..3), None);
        assert!(!actor.progress.stopped());
    }

    #[test]
    fn a_step_keeps_only_its_own_errors() {
        let actor = Actor::spawn(
            "test-gather",
            || {},
            Box::new(|j: &Job| {
                anyhow::ensure!(j.id % 2 == 0, "odd {}", j.id);
                Ok(0)
            }),
        )
        .unwrap();
        for id in 0..4 {
            actor.send(job(id)).unwrap();
            actor.progress.lists_in(id);
        }
        actor.progress.wait_done(3);
        // The first step (jobs 0 and 1) gets its error; the next step's stays for it.
        assert_eq!(actor.take_error(0..2).as_deref(), Some("odd 1"));
        assert_eq!(actor.take_error(2..4).as_deref(), Some("odd 3"));
        assert_eq!(actor.take_error(2..4), None);
    }

    #[test]
    fn ending_the_actor_stops_a_job_whose_lists_never_come_and_fails_its_step() {
        let mut actor = Actor::spawn("test-gather", || {}, Box::new(|_: &Job| Ok(0))).unwrap();
        let waits = host_function(wait_for_gather, &actor.progress, 0);
        actor.send(job(0)).unwrap();
        let (ended, end) = mpsc::channel();
        let progress = actor.progress.clone();
        std::thread::spawn(move || {
            actor.end();
            let _ = ended.send(actor.take_error(0..1));
        });
        let e = end
            .recv_timeout(LONG)
            .expect("ending the actor hung on lists that never came");
        assert!(e.unwrap().contains("stopped before"));
        waits.recv_timeout(LONG).expect("a wait outlived the actor");
        assert!(progress.stopped());
        // And any wait queued later, whose job will never be done.
        host_function(wait_for_gather, &progress, 7).recv_timeout(LONG).unwrap();
    }

    #[test]
    fn the_actor_thread_ending_releases_every_wait() {
        let progress = Arc::new(Progress::default());
        let waits: Vec<_> = (0..8).map(|id| host_function(wait_for_gather, &progress, id)).collect();
        assert!(waits[0].recv_timeout(SHORT).is_err());
        // A thread that dies by a panic, holding the guard as the actor's does.
        let guard = StopOnExit(progress.clone());
        let died = std::thread::spawn(move || {
            let _stop = guard;
            panic!("actor lost");
        });
        assert!(died.join().is_err());
        for w in waits {
            w.recv_timeout(LONG).expect("a wait outlived the actor");
        }
        assert!(!progress.done_before(1));
    }

    /// A layout of 2 KV heads, 3 slots a head and chunks of 2 × 2 values.
    fn small_layout() -> ShadowLayout {
        ShadowLayout {
            kv_heads: 2,
            head_dim: 2,
            group: 1,
            chunk: 2,
            rank: 2,
            slots: 3,
            outliers: 0,
            local: 1,
            chunk_cap: 8,
            tier: 0,
        }
    }

    /// A host pool of 3 slots, 2 layers and 2 heads of 8 chunks of 16 bytes, for
    /// [`small_layout`], as the kernels would address it (no device memory: the host's
    /// jobs only read its shape).
    fn small_pool() -> DevicePool {
        DevicePool {
            host: 0,
            dev: 0,
            shape: PoolShape {
                layers: 2,
                seqs: 3,
                kv_heads: 2,
                chunks: 8,
                chunk: 1,
                head_dim: 4,
                format: ValueFormat::Int8,
            },
            dev_seqs: 0,
        }
    }

    #[test]
    fn a_micro_batch_job_gathers_its_own_sequences_misses_in_list_order() {
        let lay = small_layout();
        let dev_pool = small_pool();
        let (shape, cb) = (dev_pool.shape, dev_pool.shape.chunk_bytes());
        // Each byte is its index in the pool, modulo a prime.
        let pool: Vec<u8> = (0..shape.bytes().unwrap()).map(|i| (i % 251) as u8).collect();
        // A slot made for a batch of 3 holding the lists of a micro-batch of 1 (pool
        // sequence 2): head 0 fetches chunks 5 and 1 (its third entry is not fetched),
        // head 1 chunk 7; what lies past its heads is not read.
        let mut misses = vec![-1i32; 3 * 2 * 3 * 2];
        for (k, (slot, chunk)) in [(0, 5), (1, 1), (2, 9)].into_iter().enumerate() {
            misses[k * 2] = slot;
            misses[k * 2 + 1] = chunk;
        }
        misses[3 * 2 + 1] = 7;
        let mut counts = vec![99i32; 3 * 2];
        counts[0] = 2;
        counts[1] = 1;
        let mut staging = vec![0u8; 3 * 2 * 3 * cb];
        let mem = SlotMem {
            misses: (misses.as_mut_ptr(), misses.len()),
            counts: (counts.as_mut_ptr(), counts.len()),
            staging: (staging.as_mut_ptr(), staging.len()),
        };
        // SAFETY: the buffers above, live and touched by nothing else meanwhile.
        let bytes = unsafe { gather_job(&mem, &lay, (&dev_pool, &pool), &RayonGather, (1, &[2])) }.unwrap();
        assert_eq!(bytes, 3 * cb as u64);
        let want: Vec<u8> = [(0, 5), (0, 1), (1, 7)]
            .iter()
            .flat_map(|&(h, c)| {
                let at = dev_pool.chunk_offset(1, 2, h, c);
                pool[at..at + cb].to_vec()
            })
            .collect();
        assert_eq!(&staging[..3 * cb], &want[..]);
        assert!(staging[3 * cb..].iter().all(|&v| v == 0));
        // A job whose batch the slot does not serve is refused, not read out of bounds.
        let big = (1, &[0, 1, 2, 0][..]);
        // SAFETY: as above.
        assert!(unsafe { gather_job(&mem, &lay, (&dev_pool, &pool), &RayonGather, big) }.is_err());
        // A sequence in a GPU value slot (global slot 3, after the host's 3) is not the
        // actor's to read.
        let with_slots = DevicePool {
            dev_seqs: 1,
            ..dev_pool
        };
        // SAFETY: as above.
        let e = unsafe { gather_job(&mem, &lay, (&with_slots, &pool), &RayonGather, (1, &[3])) }.unwrap_err();
        assert!(e.to_string().contains("pool slot 3"), "{e}");
    }

    #[test]
    fn a_write_back_copies_each_folded_chunk_to_its_slot_and_nothing_else() {
        let lay = small_layout();
        let dev_pool = small_pool();
        let (shape, cb) = (dev_pool.shape, dev_pool.shape.chunk_bytes());
        let mut pool = vec![0u8; shape.bytes().unwrap()];
        // A batch of 3: each outbox entry's bytes are its index + 1.
        let outbox: Vec<u8> = (0..3 * 2 * cb).map(|i| (i / cb + 1) as u8).collect();
        let folds = [
            Fold {
                row: 0,
                pool_seq: 2,
                chunk: 5,
            },
            Fold {
                row: 2,
                pool_seq: 0,
                chunk: 7,
            },
        ];
        // SAFETY: the pool above, touched by nothing else meanwhile.
        let bytes = unsafe { write_back_job(&outbox, &lay, (&dev_pool, pool.as_mut_ptr()), 1, &folds) }.unwrap();
        assert_eq!(bytes, 2 * 2 * cb as u64);
        let mut want = vec![0u8; pool.len()];
        for (seq, chunk, row) in [(2, 5, 0), (0, 7, 2)] {
            for h in 0..2 {
                let at = dev_pool.chunk_offset(1, seq, h, chunk);
                want[at..at + cb].fill((row * 2 + h + 1) as u8);
            }
        }
        assert!(pool == want, "the pool holds other bytes than the folded chunks");
        // A chunk or slot outside the pool, or a row outside the outbox, is refused.
        for bad in [
            Fold {
                row: 0,
                pool_seq: 3,
                chunk: 0,
            },
            Fold {
                row: 0,
                pool_seq: 0,
                chunk: 8,
            },
            Fold {
                row: 3,
                pool_seq: 0,
                chunk: 0,
            },
        ] {
            // SAFETY: as above.
            let r = unsafe { write_back_job(&outbox, &lay, (&dev_pool, pool.as_mut_ptr()), 1, &[bad]) };
            assert!(r.is_err(), "{bad:?} accepted");
        }
        assert!(pool == want);
    }
}
