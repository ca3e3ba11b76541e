//! An actor: one named thread, pinned to its cores, with one bounded inbox.
//!
//! Messages are plain data handed over a `crossbeam-channel`; the actor's state lives
//! in its handler and nothing else reaches it. A full inbox blocks the sender
//! (back-pressure). [`Actor::stop`] closes the inbox: the actor handles every message
//! already queued, then its thread ends. A handler that panics ends the thread; the
//! next send and the stop report it as an error naming the actor, never a hang.

use super::pin::pin_current_thread;
use crate::panics::message as panic_message;
use anyhow::{anyhow, Result};
use crossbeam_channel::{bounded, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where and how an actor runs.
#[derive(Clone, Debug)]
pub struct ActorSpec {
    /// The thread's name (in logs, traces and errors).
    pub name: String,
    /// The cores it is pinned to (empty: not pinned).
    pub cores: Vec<usize>,
    /// Messages its inbox holds before a send blocks (at least 1).
    pub inbox: usize,
}

impl ActorSpec {
    /// An unpinned actor named `name` with an inbox of `inbox` messages.
    pub fn new(name: impl Into<String>, inbox: usize) -> Self {
        ActorSpec {
            name: name.into(),
            cores: Vec::new(),
            inbox,
        }
    }

    /// The same, pinned to `cores`.
    pub fn on_cores(mut self, cores: &[usize]) -> Self {
        self.cores = cores.to_vec();
        self
    }
}

/// What an actor's thread counts as it runs (read by its handle).
#[derive(Debug)]
struct Counters {
    started: Instant,
    busy_ns: AtomicU64,
    handled: AtomicU64,
    panicked: AtomicBool,
}

/// An actor's busy time at an instant ([`Actor::busy_mark`]): plain data a publisher
/// keeps between two readings of the busy ratio.
#[derive(Clone, Copy, Debug)]
pub struct BusyMark {
    busy_ns: u64,
    at: Instant,
}

/// The handle of a running actor: its inbox's sending side and its thread.
pub struct Actor<M: Send + 'static> {
    name: String,
    inbox: Option<Sender<M>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl<M: Send + 'static> Actor<M> {
    /// Starts the actor's thread: it pins itself to `spec.cores` (a warning, not an
    /// error, where it cannot) and calls `handle` on each message in arrival order.
    pub fn spawn(spec: ActorSpec, mut handle: impl FnMut(M) + Send + 'static) -> Result<Self> {
        let (tx, rx) = bounded::<M>(spec.inbox.max(1));
        let counters = Arc::new(Counters {
            started: Instant::now(),
            busy_ns: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            panicked: AtomicBool::new(false),
        });
        let c = counters.clone();
        let cores = spec.cores.clone();
        let thread = std::thread::Builder::new()
            .name(spec.name.clone())
            .spawn(move || {
                pin_current_thread(&cores);
                // Marks the actor as panicked if the handler unwinds through here.
                struct Guard(Arc<Counters>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            self.0.panicked.store(true, Ordering::Release);
                        }
                    }
                }
                let _guard = Guard(c.clone());
                for msg in rx.iter() {
                    let t0 = Instant::now();
                    handle(msg);
                    c.busy_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    c.handled.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(|e| anyhow!("cannot start actor `{}`: {e}", spec.name))?;
        Ok(Actor {
            name: spec.name,
            inbox: Some(tx),
            thread: Some(thread),
            counters,
        })
    }

    /// The actor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues `msg`, waiting while the inbox is full. Fails, naming the actor, when it
    /// has stopped (its handler panicked).
    pub fn send(&self, msg: M) -> Result<()> {
        let inbox = self.inbox.as_ref().expect("the inbox closes only in stop");
        inbox.send(msg).map_err(|_| self.stopped())
    }

    /// Messages waiting in the inbox.
    pub fn depth(&self) -> usize {
        self.inbox.as_ref().map_or(0, Sender::len)
    }

    /// Messages handled so far.
    pub fn handled(&self) -> u64 {
        self.counters.handled.load(Ordering::Relaxed)
    }

    /// The share of its life the actor spent in its handler (0 to 1).
    pub fn busy_ratio(&self) -> f64 {
        let life = self.counters.started.elapsed().max(Duration::from_nanos(1));
        let busy = Duration::from_nanos(self.counters.busy_ns.load(Ordering::Relaxed));
        (busy.as_secs_f64() / life.as_secs_f64()).min(1.0)
    }

    /// Where the actor's busy time stands now, for [`Actor::busy_ratio_since`].
    pub fn busy_mark(&self) -> BusyMark {
        BusyMark {
            busy_ns: self.counters.busy_ns.load(Ordering::Relaxed),
            at: Instant::now(),
        }
    }

    /// The share of the time since `mark` the actor spent in its handler (0 to 1, a
    /// handler still running counted once it returns), and moves `mark` to now.
    pub fn busy_ratio_since(&self, mark: &mut BusyMark) -> f64 {
        let now = self.busy_mark();
        let span = now.at.duration_since(mark.at).max(Duration::from_nanos(1));
        let busy = Duration::from_nanos(now.busy_ns.saturating_sub(mark.busy_ns));
        *mark = now;
        (busy.as_secs_f64() / span.as_secs_f64()).min(1.0)
    }

    /// Closes the inbox, lets the actor handle what is queued and waits for its thread.
    /// Fails, naming the actor and the panic, when its handler panicked.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.inbox = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => Err(anyhow!("actor `{}` panicked: {}", self.name, panic_message(&*panic))),
            _ => Ok(()),
        }
    }

    fn stopped(&self) -> anyhow::Error {
        if self.counters.panicked.load(Ordering::Acquire) {
            anyhow!("actor `{}` stopped: its handler panicked", self.name)
        } else {
            anyhow!("actor `{}` stopped", self.name)
        }
    }
}

impl<M: Send + 'static> Drop for Actor<M> {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            tracing::error!("{e:#}");
        }
    }
}
