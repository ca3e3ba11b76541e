//! The gather actors: threads pinned to the cores of the GPU's NUMA node that copy
//! missed value chunks from the pool into staging, each a share of the list.
//!
//! [`GatherPool::for_each_range`] splits `0..n` into one contiguous range per thread
//! and waits until every thread has answered; [`GatherPool::gather`] is the chunk copy
//! built on it. A thread whose work panics answers with an error, so the call fails
//! with a message naming the thread, the other threads finish their ranges, and the
//! pool keeps serving the next call.

use super::actor::{Actor, ActorSpec, BusyMark};
use crate::panics::message as panic_message;
use crate::telemetry as tm;
use anyhow::{anyhow, ensure, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Work handed to a gather thread: a range of the call's items and the function to run
/// on it (borrowed from the caller, who waits for the answer before returning).
struct Part {
    range: Range<usize>,
    work: *const (dyn Fn(Range<usize>) + Sync + 'static),
    done: Sender<std::result::Result<(), String>>,
}

// SAFETY: `work` points to a `Sync` closure that outlives the part: for_each_range
// waits for the answer of every part it sent before it returns.
unsafe impl Send for Part {}

/// The answers a call still waits for; dropped (also on unwind) only once they are in,
/// so no thread runs borrowed work after its caller returned.
struct Answers {
    rx: Receiver<std::result::Result<(), String>>,
    left: usize,
}

impl Drop for Answers {
    fn drop(&mut self) {
        while self.left > 0 && self.rx.recv().is_ok() {
            self.left -= 1;
        }
    }
}

/// N pinned gather threads.
pub struct GatherPool {
    threads: Vec<Actor<Part>>,
    /// Each thread's busy time at the last [`GatherPool::publish_metrics`].
    marks: std::sync::Mutex<Vec<BusyMark>>,
    /// The transfer actor's cores, where each lane's gather-actor thread is pinned as
    /// it starts (empty: unpinned).
    transfer_cores: Vec<usize>,
}

impl GatherPool {
    /// One thread per entry of `cores` (each pinned to its core), or `threads`
    /// unpinned threads when `cores` is empty. Thread i is named `gather-i`.
    pub fn new(threads: usize, cores: &[usize]) -> Result<Self> {
        let n = if cores.is_empty() { threads } else { cores.len() };
        ensure!(n > 0, "the gather pool needs at least one thread");
        let threads = (0..n)
            .map(|i| {
                let name = format!("gather-{i}");
                let mut spec = ActorSpec::new(name.clone(), 2);
                if let Some(&core) = cores.get(i) {
                    spec = spec.on_cores(&[core]);
                }
                Actor::spawn(spec, move |p: Part| {
                    // SAFETY: see Part; the caller is blocked in for_each_range.
                    let work = unsafe { &*p.work };
                    let answer = catch_unwind(AssertUnwindSafe(|| work(p.range.clone())))
                        .map_err(|panic| format!("{name} panicked: {}", panic_message(&*panic)));
                    // The caller waits on the channel, so the answer is received.
                    let _ = p.done.send(answer);
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let marks = std::sync::Mutex::new(threads.iter().map(Actor::busy_mark).collect());
        Ok(GatherPool {
            threads,
            marks,
            transfer_cores: Vec::new(),
        })
    }

    /// The pool, pinning each lane's gather-actor thread (the transfer actor's host
    /// side, which hands the pool its work) to `cores` as the thread starts.
    pub fn with_transfer_cores(mut self, cores: &[usize]) -> Self {
        self.transfer_cores = cores.to_vec();
        self
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Sets, per thread (label `actor`: `gather-i`), the share of the time since the
    /// last call it spent gathering ([`tm::ACTOR_BUSY_RATIO`]) and the parts waiting in
    /// its inbox ([`tm::ACTOR_INBOX_DEPTH`]), on the installed metrics recorder.
    pub fn publish_metrics(&self) {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        for (t, mark) in self.threads.iter().zip(marks.iter_mut()) {
            let actor = t.name().to_string();
            metrics::gauge!(tm::ACTOR_BUSY_RATIO, "actor" => actor.clone()).set(t.busy_ratio_since(mark));
            metrics::gauge!(tm::ACTOR_INBOX_DEPTH, "actor" => actor).set(t.depth() as f64);
        }
    }

    /// Runs `work` on contiguous ranges covering `0..n` (one per thread, in order, none
    /// empty) and returns when all are done: the first error when a range's work
    /// panicked.
    pub fn for_each_range(&self, n: usize, work: &(dyn Fn(Range<usize>) + Sync)) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let parts = self.threads.len().min(n);
        let (tx, rx) = bounded(parts);
        // SAFETY: only the lifetime is erased; every part sent is answered or dropped
        // unrun before this function returns (`Answers` waits even on unwind), so
        // `work` outlives its use.
        let work: *const (dyn Fn(Range<usize>) + Sync + 'static) = unsafe { std::mem::transmute(work) };
        let mut answers = Answers { rx, left: 0 };
        let mut first_err = None;
        let (base, extra) = (n / parts, n % parts);
        for (i, thread) in self.threads.iter().take(parts).enumerate() {
            // The first `extra` ranges take one more item: no product can overflow.
            let start = base * i + i.min(extra);
            let range = start..start + base + usize::from(i < extra);
            let part = Part {
                range,
                work,
                done: tx.clone(),
            };
            match thread.send(part) {
                Ok(()) => answers.left += 1,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        // Only the parts hold senders now: a part dropped unrun disconnects the channel.
        drop(tx);
        while answers.left > 0 {
            let answer = answers.rx.recv();
            answers.left -= 1;
            match answer {
                Ok(Ok(())) => {}
                Ok(Err(msg)) => {
                    first_err.get_or_insert(anyhow!("value gather failed: {msg}"));
                }
                Err(_) => {
                    answers.left = 0;
                    first_err.get_or_insert(anyhow!("value gather failed: a gather thread stopped mid-call"));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Copies chunk `sources[i]` of `src` (chunks of `chunk` elements; the source is
    /// given as the chunk's first element) to the i-th chunk of `dst`, the list split
    /// over the threads.
    pub fn gather<T: Copy + Send + Sync>(
        &self,
        src: &[T],
        sources: &[usize],
        chunk: usize,
        dst: &mut [T],
    ) -> Result<()> {
        let need = sources
            .len()
            .checked_mul(chunk)
            .ok_or_else(|| anyhow!("gather: size overflows"))?;
        ensure!(
            need <= dst.len(),
            "gather: {} chunks of {chunk} elements overflow the staging of {}",
            sources.len(),
            dst.len()
        );
        if let Some(&bad) = sources
            .iter()
            .find(|&&s| s.checked_add(chunk).is_none_or(|e| e > src.len()))
        {
            return Err(anyhow!(
                "gather: a chunk at {bad} lies outside the pool of {} elements",
                src.len()
            ));
        }
        let out = dst.as_mut_ptr() as usize;
        self.for_each_range(sources.len(), &|r: Range<usize>| {
            for i in r {
                // SAFETY: the ranges are disjoint, so each destination chunk is written
                // by one thread; sources and destinations are in bounds (checked).
                unsafe {
                    let d = (out as *mut T).add(i * chunk);
                    std::ptr::copy_nonoverlapping(src.as_ptr().add(sources[i]), d, chunk);
                }
            }
        })
    }
}

impl crate::cuda::shadow::ChunkGather for GatherPool {
    fn gather(&self, src: &[u8], sources: &[usize], chunk: usize, dst: &mut [u8]) -> Result<()> {
        GatherPool::gather(self, src, sources, chunk, dst)
    }

    fn on_actor_start(&self) {
        super::pin::pin_current_thread(&self.transfer_cores);
    }
}
