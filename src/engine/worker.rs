//! A thread of its own for slow work the engine thread must not wait for: a named
//! thread that owns its state, takes jobs from a bounded mailbox one at a time and
//! answers each on a reply channel of its own ([`Pending`]), which the caller polls
//! without blocking. Every job gets exactly one answer: its result, the error of a job
//! that panicked (the thread then takes the next job), or, for a job that never ran
//! (the mailbox was full, or the worker stopped first), an error saying so. Dropping
//! the worker runs no further job: the job in hand ends, the thread is joined.
//!
//! ShadowKV's compressions on the GPU run on one ([`super::backend_cuda`]). Unlike the
//! pipeline's [`crate::pipeline::actor::Actor`] (messages without answers, a sender
//! that waits for room, every queued message handled at the stop), each job here has an
//! answer the caller polls, a hand-off never waits, and the state comes back at the stop.

use crate::panics::message as panic_message;
use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A job's answer, owed until sent: dropped unsent (the job never ran), it answers
/// with an error.
struct Reply<R> {
    tx: Option<Sender<Result<R>>>,
    /// The worker's name, for that error.
    name: &'static str,
}

impl<R> Reply<R> {
    fn send(mut self, r: Result<R>) {
        if let Some(tx) = self.tx.take() {
            // A caller that no longer waits drops the answer here.
            let _ = tx.send(r);
        }
    }
}

impl<R> Drop for Reply<R> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(anyhow!("the {} thread stopped before the job ran", self.name)));
        }
    }
}

/// The answer to a job handed to a [`Worker`].
pub struct Pending<R> {
    rx: Receiver<Result<R>>,
}

impl<R> Pending<R> {
    /// Whether the answer is in ([`Pending::take`] then does not block).
    pub fn is_ready(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The answer, waiting for it if it is not in yet.
    pub fn take(self) -> Result<R> {
        self.rx
            .recv()
            .unwrap_or_else(|_| Err(anyhow!("a worker dropped a job without an answer")))
    }
}

/// A thread that runs jobs `J` one at a time over its state `W`, each giving an `R`.
pub struct Worker<J: Send + 'static, R: Send + 'static, W: Send + 'static> {
    name: &'static str,
    jobs: Option<Sender<(J, Reply<R>)>>,
    /// Set when the worker stops: the jobs still in the mailbox are not run.
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<W>>,
}

impl<J: Send + 'static, R: Send + 'static, W: Send + 'static> Worker<J, R, W> {
    /// Starts the thread `name` with state `state`, running `run` on each job; the
    /// mailbox holds at most `capacity` jobs (at least one).
    pub fn spawn<F>(name: &'static str, capacity: usize, state: W, mut run: F) -> Result<Self>
    where
        F: FnMut(&mut W, J) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = bounded::<(J, Reply<R>)>(capacity.max(1));
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut state = state;
                for (job, reply) in rx.iter() {
                    if stop.load(Ordering::SeqCst) {
                        // Dropped unsent: answers that it never ran.
                        continue;
                    }
                    let r = catch_unwind(AssertUnwindSafe(|| run(&mut state, job)))
                        .unwrap_or_else(|p| Err(anyhow!("the {name} thread panicked: {}", panic_message(&*p))));
                    reply.send(r);
                }
                state
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(Worker {
            name,
            jobs: Some(tx),
            stopping,
            thread: Some(thread),
        })
    }

    /// Hands `job` to the thread (never blocks). A full mailbox or a stopped thread
    /// answers at once, with an error.
    pub fn submit(&self, job: J) -> Pending<R> {
        let (tx, rx) = bounded(1);
        let reply = Reply {
            tx: Some(tx),
            name: self.name,
        };
        let sent = match &self.jobs {
            Some(jobs) => jobs.try_send((job, reply)),
            None => Err(TrySendError::Disconnected((job, reply))),
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full((_, reply))) => reply.send(Err(anyhow!(
                "the {} thread has {} jobs waiting: no room for another",
                self.name,
                self.jobs.as_ref().and_then(|j| j.capacity()).unwrap_or(0)
            ))),
            // Dropped: answers that it never ran.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Pending { rx }
    }

    /// Stops the thread once its job in hand is done (the jobs still waiting are
    /// answered with an error) and gives its state back; an error if the thread itself
    /// panicked.
    pub fn stop(mut self) -> Result<W> {
        self.halt()
            .ok_or_else(|| anyhow!("the {} thread was already stopped", self.name))?
    }

    /// Stops and joins the thread (once; `None` after).
    fn halt(&mut self) -> Option<Result<W>> {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.jobs.take());
        let t = self.thread.take()?;
        Some(
            t.join()
                .map_err(|p| anyhow!("the {} thread panicked: {}", self.name, panic_message(&*p))),
        )
    }
}

impl<J: Send + 'static, R: Send + 'static, W: Send + 'static> Drop for Worker<J, R, W> {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.halt() {
            tracing::warn!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits (at most 10 s) for `p`'s answer to come in, without taking it.
    fn wait_ready<R>(p: &Pending<R>) {
        let t0 = Instant::now();
        while !p.is_ready() {
            assert!(t0.elapsed() < Duration::from_secs(10), "no answer");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn jobs_are_answered_in_turn_over_the_workers_state() {
        let w = Worker::spawn("adder", 4, 0u64, |sum: &mut u64, x: u64| {
            *sum += x;
            Ok(*sum)
        })
        .unwrap();
        let p: Vec<_> = (1..=3).map(|x| w.submit(x)).collect();
        let got: Vec<u64> = p.into_iter().map(|p| p.take().unwrap()).collect();
        assert_eq!(got, [1, 3, 6]);
        assert_eq!(w.stop().unwrap(), 6);
    }

    #[test]
    fn a_slow_job_is_polled_without_blocking() {
        let (go_tx, go_rx) = bounded::<()>(1);
        let w = Worker::spawn("gated", 1, go_rx, |go: &mut Receiver<()>, x: u32| {
            go.recv()?;
            Ok(x * 2)
        })
        .unwrap();
        let p = w.submit(21);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!p.is_ready());
        go_tx.send(()).unwrap();
        wait_ready(&p);
        assert_eq!(p.take().unwrap(), 42);
    }

    #[test]
    fn a_failed_or_panicking_job_fails_alone_and_the_worker_goes_on() {
        let w = Worker::spawn("picky", 4, (), |_: &mut (), x: i32| match x {
            0 => Err(anyhow!("zero")),
            1 => panic!("one"),
            x => Ok(x),
        })
        .unwrap();
        let (a, b, c) = (w.submit(0), w.submit(1), w.submit(2));
        assert_eq!(a.take().unwrap_err().to_string(), "zero");
        let e = b.take().unwrap_err().to_string();
        assert!(e.contains("picky thread panicked: one"), "{e}");
        assert_eq!(c.take().unwrap(), 2);
    }

    #[test]
    fn a_full_mailbox_answers_at_once() {
        let (go_tx, go_rx) = bounded::<()>(0);
        let w = Worker::spawn("busy", 1, go_rx, |go: &mut Receiver<()>, x: u32| {
            go.recv()?;
            Ok(x)
        })
        .unwrap();
        let first = w.submit(1);
        // The first job is in hand once the mailbox is empty again.
        let t0 = Instant::now();
        while !w.jobs.as_ref().unwrap().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(1));
        }
        let second = w.submit(2);
        let third = w.submit(3);
        wait_ready(&third);
        let e = third.take().unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
        go_tx.send(()).unwrap();
        go_tx.send(()).unwrap();
        assert_eq!((first.take().unwrap(), second.take().unwrap()), (1, 2));
    }

    /// Dropped while a job runs: that job ends and is answered, the waiting ones are
    /// answered with an error without running, and the drop returns (the thread joined).
    #[test]
    fn dropping_the_worker_ends_the_job_in_hand_and_skips_the_rest() {
        let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = ran.clone();
        let (started_tx, started) = bounded(4);
        let w = Worker::spawn("slow", 4, (), move |_: &mut (), x: u32| {
            started_tx.send(x).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            log.lock().unwrap().push(x);
            Ok(x)
        })
        .unwrap();
        let p: Vec<_> = (0..3).map(|x| w.submit(x)).collect();
        // The first job is in hand (the others wait in the mailbox) before the drop.
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
        drop(w);
        assert_eq!(*ran.lock().unwrap(), [0]);
        let mut p = p.into_iter();
        assert_eq!(p.next().unwrap().take().unwrap(), 0);
        for rest in p {
            let e = rest.take().unwrap_err().to_string();
            assert!(e.contains("stopped before the job ran"), "{e}");
        }
    }

    #[test]
    fn a_job_after_the_worker_stopped_is_answered_with_an_error() {
        let mut w = Worker::spawn("gone", 1, (), |_: &mut (), x: u32| Ok(x)).unwrap();
        w.halt().unwrap().unwrap();
        let e = w.submit(1).take().unwrap_err().to_string();
        assert!(e.contains("stopped before the job ran"), "{e}");
    }
}
