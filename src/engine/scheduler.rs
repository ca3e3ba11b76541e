//! Continuous batching on an engine thread.
//!
//! Requests arrive on a channel and join the running batch between steps. The engine
//! loops over three parts, as vLLM's scheduler does: [`Engine::schedule`] decides a
//! step as plain data (which sequences, how many tokens each, where each input token
//! comes from), the backend queues it ([`StepBackend::submit`]), and once the backend
//! has finished a step ([`StepBackend::complete`]) its tokens are detokenised, checked
//! against the stop rules and streamed ([`Engine::process`]). On the GPU the engine
//! queues step n+1 before it completes step n, so this host work runs while the GPU
//! computes; a decoding sequence feeds step n+1 the token step n sampled on the device
//! ([`StepInput::Previous`]) without the host reading it first. A sequence that step n
//! ends (end-of-sequence token, stop string) is already in step n+1: that token is
//! dropped, and its state is freed once no queued step holds it.
//!
//! Prompts are prefilled in chunks of at most `prefill_chunk` tokens per step, at the
//! same boundaries whatever else shares the step. With one lane, the chunks ride in
//! the decode steps (every decoding sequence brings one token per step). With two
//! lanes (the GPU with `limits.prefill_lane = "separate"`), prompts are prefilled on
//! the second lane, a lower-priority CUDA stream, beside the decode steps of the first,
//! so long prompts never hold decoding sequences to one token per prefill step. With a
//! prefill lane, the backend may have several decode lanes before it
//! ([`StepBackend::decode_lanes`]): each sequence decodes on one of them, taken at
//! admission where the fewest sequences run, so the lanes' steps (each a share of the
//! batch) run side by side, and one lane's value fetch overlaps another's compute. Where
//! the backend defers a finished prefill's work to the sequence's first decode step
//! (ShadowKV's compression on the GPU: [`StepBackend::defers_prefill`]), no new prompt
//! starts while a sequence waits for that step. A sequence the backend is still working
//! on apart from the steps (that compression, on a thread of its own:
//! [`StepBackend::seq_ready`]) sits the decode steps out until it is ready, the others
//! decoding meanwhile; while one does, the engine waits on no step but the decode lane's
//! (short), looking at it again every millisecond. A sequence whose receiver is gone
//! (the client disconnected) leaves before the next step.

use super::backend::{SeqSpec, StepBackend, StepInput, StepSeq};
use super::sampling::SamplingParams;
use super::text::{FinishReason, SeqText, StopRules};
use crate::cuda::shadow::timeline::{GpuTracks, TRACKS_PER_LANE};
use crate::model::tokenizer::TextTokenizer;
use crate::pipeline::pin::pin_current_thread;
use crate::telemetry::{self as tm, trace::TraceWriter};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most accepted requests waiting for a slot.
    pub max_queue: usize,
    /// Most tokens (prompt and generated) of one sequence.
    pub max_context: usize,
    /// Most prompt tokens prefilled per step.
    pub prefill_chunk: usize,
    /// With a separate prefill lane, while it has prompt chunks queued, decode steps
    /// start at least this far apart (zero: whenever the decode lane has room), so the
    /// prefill gets the GPU in between.
    pub decode_spacing: Duration,
}

/// One request for the engine.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Prompt token ids (not empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (a final end-of-sequence token excluded).
    pub completion_tokens: usize,
}

/// Why the engine ended a request early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The server is shutting down.
    ShuttingDown,
    /// The backend failed.
    Internal(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::ShuttingDown => write!(f, "the server is shutting down; the request was cancelled"),
            EngineError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

/// What the engine tells a request's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New final text of the completion (never empty).
    Text(String),
    /// The request is complete.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request ended without completing.
    Failed(EngineError),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot and queue place is taken.
    QueueFull {
        /// Requests in the system.
        in_system: usize,
    },
    /// The server is shutting down.
    ShuttingDown,
    /// The request itself is wrong.
    Invalid(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { in_system } => {
                write!(
                    f,
                    "the server is at capacity ({in_system} requests running or queued); retry later"
                )
            }
            SubmitError::ShuttingDown => write!(f, "the server is shutting down"),
            SubmitError::Invalid(m) => f.write_str(m),
        }
    }
}

enum Command {
    Submit(Job),
    Shutdown(Duration),
}

struct Job {
    req: EngineRequest,
    tx: UnboundedSender<Event>,
    arrived: Instant,
}

impl Job {
    /// Ends a request that never started, as [`Seq::end`] ends a running one: it stops
    /// counting against admission, its `outcome` goes to the metrics, then `last` to its
    /// client.
    fn end(self, in_system: &AtomicUsize, last: Event, outcome: &'static str) {
        in_system.fetch_sub(1, Ordering::SeqCst);
        request_done(outcome, self.arrived);
        let _ = self.tx.send(last);
    }
}

struct Shared {
    config: SchedulerConfig,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    in_system: AtomicUsize,
    running: AtomicUsize,
    closing: AtomicBool,
    alive: AtomicBool,
}

/// The submitting side of the engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// The scheduler's limits.
    pub fn config(&self) -> SchedulerConfig {
        self.shared.config
    }

    /// Queues a request; the receiver gets its text and its end. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, req: EngineRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let c = self.shared.config;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if req.prompt.len() >= c.max_context {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the context limit is {} tokens",
                req.prompt.len(),
                c.max_context
            )));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        req.sampling
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if self.shared.closing.load(Ordering::SeqCst) || !self.shared.alive.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let cap = c.max_batch + c.max_queue;
        let taken = self
            .shared
            .in_system
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < cap).then_some(n + 1));
        if let Err(n) = taken {
            return Err(SubmitError::QueueFull { in_system: n });
        }
        let (tx, rx) = unbounded_channel();
        let job = Job {
            req,
            tx,
            arrived: Instant::now(),
        };
        let sent = match self.shared.tx.lock().expect("engine sender lock").as_ref() {
            Some(s) => s.send(Command::Submit(job)).is_ok(),
            None => false,
        };
        if !sent {
            self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    /// Requests in the system (running or queued).
    pub fn in_system(&self) -> usize {
        self.shared.in_system.load(Ordering::SeqCst)
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Whether the engine thread is running and accepting requests.
    pub fn is_serving(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst) && !self.shared.closing.load(Ordering::SeqCst)
    }

    /// Whether [`EngineHandle::shutdown`] was called (the engine may still be draining).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// Stops accepting requests: queued ones are cancelled at once, running ones may
    /// finish within `grace` and are cancelled after it. The engine thread then ends.
    pub fn shutdown(&self, grace: Duration) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(tx) = self.shared.tx.lock().expect("engine sender lock").take() {
            let _ = tx.send(Command::Shutdown(grace));
        }
    }
}

/// The first trace track of the lanes' GPU streams (lane i: `GPU_TRACK_TID + i ·
/// TRACKS_PER_LANE` on, see [`GpuTracks`]); the engine is track 1 and lane i's steps
/// track `2 + i`.
const GPU_TRACK_TID: u64 = 100;

/// Starts the engine thread. `trace`, when given, gets one span per step.
pub fn spawn_engine<M: StepBackend + 'static>(
    model: M,
    tok: Arc<TextTokenizer>,
    config: SchedulerConfig,
    trace: Option<TraceWriter>,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    spawn_engine_on(model, tok, config, trace, Vec::new())
}

/// [`spawn_engine`] with the engine thread pinned to `cores` (the compute actor's: the
/// thread that plans each step and, on the GPU, queues its kernels, selection included,
/// on the lanes' streams); an empty list leaves it unpinned.
pub fn spawn_engine_on<M: StepBackend + 'static>(
    model: M,
    tok: Arc<TextTokenizer>,
    config: SchedulerConfig,
    trace: Option<TraceWriter>,
    cores: Vec<usize>,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    assert!(config.max_batch >= 1 && config.prefill_chunk >= 1 && config.max_context >= 2);
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        config,
        tx: Mutex::new(Some(tx)),
        in_system: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        alive: AtomicBool::new(true),
    });
    let eos = model.config().eos_token_ids.clone();
    let lanes = (0..model.lanes()).map(|_| LaneQueue::default()).collect();
    // Several decode lanes only before a prefill lane.
    let decode_lanes = if model.lanes() > model.decode_lanes() {
        model.decode_lanes().max(1)
    } else {
        1
    };
    let mut engine = Engine {
        model,
        tok,
        eos,
        config,
        rx,
        shared: shared.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        deadline: None,
        trace,
        gpu_tracks: Vec::new(),
        stats_at: None,
        lanes,
        decode_lanes,
        next_key: 0,
    };
    let join = std::thread::Builder::new().name("engine".into()).spawn(move || {
        let _alive = AliveGuard(engine.shared.clone());
        pin_current_thread(&cores);
        engine.run();
    })?;
    Ok((EngineHandle { shared }, join))
}

struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.running.store(0, Ordering::SeqCst);
        metrics::gauge!(tm::RUNNING).set(0.0);
        metrics::gauge!(tm::QUEUE_DEPTH).set(0.0);
    }
}

struct Seq<S> {
    key: u64,
    prompt: Vec<u32>,
    /// Prompt tokens given to queued or finished steps.
    fed: usize,
    state: S,
    out: SeqText,
    stop: Vec<String>,
    max_tokens: usize,
    tx: UnboundedSender<Event>,
    arrived: Instant,
    last_token_at: Option<Instant>,
    /// Tokens sampled for it by queued steps and not yet processed, and the lane of the
    /// latest such step.
    pending: usize,
    pending_lane: usize,
    /// The lane its decode steps run on.
    lane: usize,
    /// Queued steps that hold it: its state stays until they are done.
    in_flight: usize,
    /// Its end has been sent (or it must end): further tokens are dropped.
    finished: bool,
}

impl<S> Seq<S> {
    /// Ends it: first it stops counting against admission (so a client that has its
    /// answer may send the next request at once, though the sequence's state stays
    /// until no queued step holds it) and its `outcome` goes to the metrics, then
    /// `last` to its client.
    fn end(&mut self, in_system: &AtomicUsize, last: Option<Event>, outcome: &'static str) {
        debug_assert!(!self.finished, "a sequence ended twice");
        self.finished = true;
        in_system.fetch_sub(1, Ordering::SeqCst);
        request_done(outcome, self.arrived);
        if let Some(e) = last {
            let _ = self.tx.send(e);
        }
    }

    fn prefilled(&self) -> bool {
        self.fed == self.prompt.len()
    }

    /// Its prompt's last chunk is queued or done, and no decode step for it yet: it
    /// has sampled one token (the prompt's), and is not over.
    fn awaits_first_decode(&self) -> bool {
        !self.finished && self.prefilled() && self.out.ids().len() + self.pending <= 1
    }
}

/// Where a sequence's input comes from in a planned step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Prompt tokens `fed..fed + n`.
    Prompt(usize),
    /// The last token the host holds.
    Last,
    /// The token the lane's previous step sampled.
    Previous,
}

/// One step, decided: plain data, nothing changed yet.
struct StepPlan {
    /// (sequence key, its input) in batch order.
    members: Vec<(u64, Input)>,
    prefill_tokens: usize,
}

/// A queued step: who is in it and what each gets back.
struct InFlight<T> {
    ticket: T,
    members: Vec<Member>,
    submitted: Instant,
    prefill_tokens: usize,
}

struct Member {
    key: u64,
    samples: bool,
    /// The sequence's cache length after the step.
    len_after: usize,
}

struct LaneQueue<T> {
    queued: VecDeque<InFlight<T>>,
    /// When the lane's last completed step ended (the next one's GPU time starts no
    /// earlier).
    last_done: Option<Instant>,
    /// When the backend had taken the lane's last step (its submission returned): the
    /// decode spacing counts from there, so a step is queued at least the spacing after
    /// any instant inside the last one's submission.
    last_submit: Option<Instant>,
}

impl<T> Default for LaneQueue<T> {
    fn default() -> Self {
        LaneQueue {
            queued: VecDeque::new(),
            last_done: None,
            last_submit: None,
        }
    }
}

/// Whether a lane may take another step now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Yes.
    Open,
    /// No: its queue is full.
    Full,
    /// Not before then: the decode lane, spaced while a prompt is prefilled.
    At(Instant),
}

struct Engine<M: StepBackend> {
    model: M,
    tok: Arc<TextTokenizer>,
    eos: Vec<u32>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    waiting: VecDeque<Job>,
    running: Vec<Seq<M::Seq>>,
    deadline: Option<Instant>,
    trace: Option<TraceWriter>,
    /// While tracing, each lane's GPU tracks (where the backend has a GPU timeline).
    gpu_tracks: Vec<GpuTracks>,
    lanes: Vec<LaneQueue<M::Ticket>>,
    /// Lanes `0..decode_lanes` decode; a lane past them prefills.
    decode_lanes: usize,
    next_key: u64,
    /// When the backend's counters were last read for the metrics, and how many
    /// sequences were running then.
    stats_at: Option<(Instant, usize)>,
}

/// How often the engine looks at the queued steps (and its commands) while it waits
/// for a spaced decode step's time.
const SPACING_POLL: Duration = Duration::from_millis(1);

/// How often the engine looks at a sequence the backend is not done with (and at the
/// queued steps and its commands) while it has no decode step to wait on.
const READY_POLL: Duration = Duration::from_millis(1);

/// How often the backend's counters are read for the metrics while steps are queued:
/// reading them may wait for the GPU (ShadowKV's hit counters live on the device,
/// behind the queued step), which would empty the queue that hides the host's work.
const STATS_EVERY: Duration = Duration::from_millis(250);

fn request_done(outcome: &'static str, arrived: Instant) {
    metrics::counter!(tm::REQUESTS, "outcome" => outcome).increment(1);
    metrics::histogram!(tm::E2E_SECONDS).record(arrived.elapsed().as_secs_f64());
}

impl<M: StepBackend> Engine<M> {
    fn run(&mut self) {
        if let Some(t) = &mut self.trace {
            let _ = t.thread_name(1, "engine");
            for lane in 0..self.lanes.len() {
                let _ = t.thread_name(2 + lane as u64, &format!("lane {lane}"));
            }
            // Each lane's GPU streams on tracks of their own, from their anchors.
            let tracks = self.model.start_gpu_trace().and_then(|anchors| {
                anchors
                    .into_iter()
                    .enumerate()
                    .map(|(lane, at)| {
                        let first = GPU_TRACK_TID + TRACKS_PER_LANE * lane as u64;
                        GpuTracks::new(t, &format!("lane {lane} GPU"), first, at)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            });
            match tracks {
                Ok(g) => self.gpu_tracks = g,
                Err(e) => tracing::warn!("the trace has no GPU tracks: {e:#}"),
            }
        }
        loop {
            if !self.receive() {
                break;
            }
            if let Some(d) = self.deadline {
                if Instant::now() >= d {
                    for s in self.running.iter_mut().filter(|s| !s.finished) {
                        s.end(
                            &self.shared.in_system,
                            Some(Event::Failed(EngineError::ShuttingDown)),
                            "shutdown",
                        );
                    }
                }
            }
            self.drop_gone();
            self.admit();
            let mut wake = None;
            for lane in 0..self.lanes.len() {
                loop {
                    let room = self.room(lane);
                    if room == Room::Full {
                        break;
                    }
                    let Some(plan) = self.schedule(lane) else { break };
                    if let Room::At(t) = room {
                        wake = Some(t);
                        break;
                    }
                    self.submit(lane, plan);
                }
            }
            let unready = self.awaits_backend();
            match (self.lane_to_complete(), wake) {
                // A spaced decode step is due before the oldest step ends: wait for
                // its time, not for that step, looking again every millisecond (so a
                // prefill step that ends meanwhile, or a command, is taken at once).
                (Some(lane), Some(t)) if !self.model.is_done(&self.lanes[lane].queued[0].ticket) => {
                    std::thread::sleep(t.saturating_duration_since(Instant::now()).min(SPACING_POLL));
                }
                // A sequence the backend is not done with joins the decode steps once it
                // is: wait on no longer step meanwhile (a decode step is short, and the
                // one after it is where the sequence would join).
                (Some(lane), _)
                    if unready
                        && lane >= self.decode_lanes
                        && !self.model.is_done(&self.lanes[lane].queued[0].ticket) =>
                {
                    std::thread::sleep(READY_POLL);
                }
                (Some(lane), _) => self.complete(lane),
                (None, _) if unready => std::thread::sleep(READY_POLL),
                // (Spacing needs a queued prefill step, so there is none to wait for.)
                (None, _) => self.fail_stalled(),
            }
            self.publish();
            if self.deadline.is_some() && self.running.is_empty() && self.waiting.is_empty() {
                break;
            }
        }
        // Steps still queued finish before their sequences' state is dropped.
        for lane in 0..self.lanes.len() {
            while let Some(f) = self.lanes[lane].queued.pop_front() {
                let _ = self.model.complete(lane, f.ticket);
            }
        }
        // Anything still queued (the channel closed without a shutdown) is cancelled.
        for j in self.waiting.drain(..) {
            j.end(
                &self.shared.in_system,
                Event::Failed(EngineError::ShuttingDown),
                "shutdown",
            );
        }
        if let Some(t) = self.trace.take() {
            if let Err(e) = t.finish() {
                tracing::warn!("writing the trace: {e:#}");
            }
        }
        tracing::info!("engine stopped");
    }

    /// Takes commands off the channel, blocking while idle. False when the engine must end.
    fn receive(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty();
        if idle && self.deadline.is_none() {
            match self.rx.recv() {
                Ok(c) => self.command(c),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(c) => self.command(c),
                Err(mpsc::TryRecvError::Empty) => return true,
                // Every handle is gone: finish what is in flight, then end.
                Err(mpsc::TryRecvError::Disconnected) => {
                    return self.deadline.is_some() || !self.running.is_empty() || !self.waiting.is_empty();
                }
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(job) => {
                if self.deadline.is_some() {
                    job.end(
                        &self.shared.in_system,
                        Event::Failed(EngineError::ShuttingDown),
                        "shutdown",
                    );
                } else {
                    self.waiting.push_back(job);
                }
            }
            Command::Shutdown(grace) => {
                tracing::info!(
                    running = self.running.len(),
                    queued = self.waiting.len(),
                    "shutting down: cancelling queued requests, letting running ones finish for up to {:.1}s",
                    grace.as_secs_f64()
                );
                self.deadline = Some(Instant::now() + grace);
                for j in self.waiting.drain(..) {
                    j.end(
                        &self.shared.in_system,
                        Event::Failed(EngineError::ShuttingDown),
                        "shutdown",
                    );
                }
            }
        }
    }

    /// Ends disconnected sequences (and drops disconnected waiters), and frees ended
    /// sequences that no queued step holds any more.
    fn drop_gone(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| {
            let keep = !j.tx.is_closed();
            if !keep {
                request_done("cancelled", j.arrived);
            }
            keep
        });
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.in_system.fetch_sub(gone, Ordering::SeqCst);
        }
        for s in self.running.iter_mut().filter(|s| !s.finished && s.tx.is_closed()) {
            s.end(&self.shared.in_system, None, "cancelled");
        }
        self.running.retain(|s| !(s.finished && s.in_flight == 0));
    }

    fn admit(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        while self.running.len() < self.config.max_batch {
            let Some(job) = self.waiting.pop_front() else { break };
            let seed = job.req.sampling.seed.unwrap_or_else(rand::random);
            let spec = SeqSpec {
                sampling: job.req.sampling,
                seed,
                prompt_tokens: job.req.prompt.len(),
                max_tokens: job.req.max_tokens,
            };
            let state = match self.model.new_seq(&spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("starting a sequence failed: {e:#}");
                    let failed = Event::Failed(EngineError::Internal(format!("{e:#}")));
                    job.end(&self.shared.in_system, failed, "error");
                    continue;
                }
            };
            metrics::counter!(tm::PROMPT_TOKENS).increment(job.req.prompt.len() as u64);
            self.next_key += 1;
            // The decode lane with the fewest sequences (the first of equals).
            let lane = (0..self.decode_lanes)
                .min_by_key(|&l| self.running.iter().filter(|s| !s.finished && s.lane == l).count())
                .unwrap_or(0);
            self.running.push(Seq {
                key: self.next_key,
                state,
                out: SeqText::new(),
                fed: 0,
                prompt: job.req.prompt,
                stop: job.req.stop,
                max_tokens: job.req.max_tokens,
                tx: job.tx,
                arrived: job.arrived,
                last_token_at: None,
                pending: 0,
                pending_lane: 0,
                lane,
                in_flight: 0,
                finished: false,
            });
        }
    }

    fn publish(&mut self) {
        // Ended sequences that a queued step still holds count neither as running nor
        // against admission.
        let running = self.running.iter().filter(|s| !s.finished).count();
        self.shared.running.store(running, Ordering::SeqCst);
        let queued = self.shared.in_system.load(Ordering::SeqCst).saturating_sub(running);
        metrics::gauge!(tm::RUNNING).set(running as f64);
        metrics::gauge!(tm::QUEUE_DEPTH).set(queued as f64);
        let kv: usize = self.running.iter().map(|s| self.model.seq_bytes(&s.state)).sum();
        metrics::gauge!(tm::KV_BYTES).set(kv as f64);
        // Read when no step is queued, when a sequence came or went, or every
        // STATS_EVERY.
        let idle = self.lanes.iter().all(|l| l.queued.is_empty());
        if !idle
            && self
                .stats_at
                .is_some_and(|(t, n)| n == running && t.elapsed() < STATS_EVERY)
        {
            return;
        }
        self.stats_at = Some((Instant::now(), running));
        let st = self.model.stats();
        metrics::gauge!(tm::POOL_BYTES).set(st.pool_bytes as f64);
        metrics::gauge!(tm::GPU_BYTES).set(st.gpu_bytes as f64);
        metrics::gauge!(tm::REUSE_HIT_RATIO).set(st.reuse_hit_ratio);
        metrics::counter!(tm::VALUE_BYTES_FETCHED).absolute(st.value_bytes_fetched);
    }

    /// Whether `lane` may take another step now: while its queue has room, except that
    /// with `decode_spacing` a decode lane beside a prefill lane, while the prefill lane
    /// has steps queued, takes one step at a time, each at least the spacing after the
    /// last.
    fn room(&self, lane: usize) -> Room {
        let q = &self.lanes[lane];
        let spaced = lane < self.decode_lanes
            && self.lanes.len() > self.decode_lanes
            && !self.config.decode_spacing.is_zero()
            && !self.lanes[self.prefill_lane()].queued.is_empty();
        if !spaced {
            return if q.queued.len() < self.model.queue_depth().max(1) {
                Room::Open
            } else {
                Room::Full
            };
        }
        if !q.queued.is_empty() {
            return Room::Full;
        }
        match q.last_submit.map(|t| t + self.config.decode_spacing) {
            Some(t) if t > Instant::now() => Room::At(t),
            _ => Room::Open,
        }
    }

    /// The lane prompts are prefilled on.
    fn prefill_lane(&self) -> usize {
        self.lanes.len() - 1
    }

    /// The next step of `lane`, if it has work: every sequence decoding on it that may
    /// take another token and that the backend is ready for (one token each; on a
    /// prefill lane, none), then prompt chunks, at most `prefill_chunk` prompt tokens in
    /// all (no new prompt's while a deferred prefill waits for its first decode step).
    fn schedule(&self, lane: usize) -> Option<StepPlan> {
        let last_step = self.lanes[lane].queued.back();
        let mut plan = StepPlan {
            members: Vec::new(),
            prefill_tokens: 0,
        };
        for s in self.running.iter().filter(|s| !s.finished) {
            if !s.prefilled() || s.lane != lane {
                continue;
            }
            let generated = s.out.ids().len() + s.pending;
            let len = self.model.seq_len(&s.state);
            if generated == 0 || generated >= s.max_tokens || len >= self.config.max_context {
                continue;
            }
            if !self.model.seq_ready(&s.state) {
                continue;
            }
            let input = if s.pending == 0 {
                Input::Last
            } else if s.pending_lane == lane
                && last_step.is_some_and(|f| f.members.iter().any(|m| m.key == s.key && m.samples))
            {
                Input::Previous
            } else {
                // Its token comes from the other lane's step: wait for it.
                continue;
            };
            plan.members.push((s.key, input));
        }
        if lane == self.prefill_lane() {
            let chunk = self.config.prefill_chunk;
            // A backend that defers a finished prefill's work to the sequence's first
            // decode step holds that prefill's memory until then: no new prompt starts
            // meanwhile (those begun go on).
            let held = self.model.defers_prefill() && self.running.iter().any(|s| s.awaits_first_decode());
            for s in self.running.iter().filter(|s| !s.finished && !s.prefilled()) {
                if held && s.fed == 0 {
                    continue;
                }
                let n = (s.prompt.len() - s.fed).min(chunk);
                if plan.prefill_tokens > 0 && plan.prefill_tokens + n > chunk {
                    continue;
                }
                plan.prefill_tokens += n;
                plan.members.push((s.key, Input::Prompt(n)));
            }
        }
        (!plan.members.is_empty()).then_some(plan)
    }

    /// Whether a running sequence waits for the backend ([`StepBackend::seq_ready`]).
    fn awaits_backend(&self) -> bool {
        self.running
            .iter()
            .any(|s| !s.finished && !self.model.seq_ready(&s.state))
    }

    /// Queues a planned step on `lane`.
    fn submit(&mut self, lane: usize, plan: StepPlan) {
        let t0 = Instant::now();
        let keys: Vec<u64> = plan.members.iter().map(|m| m.0).collect();
        let mut by_key: std::collections::HashMap<u64, &mut Seq<M::Seq>> = self
            .running
            .iter_mut()
            .filter(|s| keys.contains(&s.key))
            .map(|s| (s.key, s))
            .collect();
        let mut batch: Vec<StepSeq<'_, M::Seq>> = Vec::with_capacity(keys.len());
        let mut members = Vec::with_capacity(keys.len());
        for &(key, input) in &plan.members {
            let s = by_key.remove(&key).expect("planned from the running sequences");
            let (input, sample, prompt_done) = match input {
                Input::Prompt(n) => {
                    let done = s.fed + n == s.prompt.len();
                    (StepInput::Tokens(&s.prompt[s.fed..s.fed + n]), done, done)
                }
                Input::Last => (
                    StepInput::Tokens(std::slice::from_ref(s.out.ids().last().expect("has a token"))),
                    true,
                    false,
                ),
                Input::Previous => (StepInput::Previous, true, false),
            };
            members.push(Member {
                key,
                samples: sample,
                len_after: 0,
            });
            batch.push(StepSeq {
                input,
                seq: &mut s.state,
                sample,
                prompt_done,
            });
        }
        let queued = self.model.submit(lane, &mut batch);
        for (m, b) in members.iter_mut().zip(&batch) {
            m.len_after = self.model.seq_len(b.seq);
        }
        drop(batch);
        let ticket = match queued {
            Ok(t) => t,
            Err(e) => return self.fail_members(&keys, &e),
        };
        for (&(_, input), m) in plan.members.iter().zip(&members) {
            let s = self.running.iter_mut().find(|s| s.key == m.key).expect("a member");
            if let Input::Prompt(n) = input {
                s.fed += n;
            }
            if m.samples {
                s.pending += 1;
                s.pending_lane = lane;
            }
            s.in_flight += 1;
        }
        self.lanes[lane].last_submit = Some(Instant::now());
        self.lanes[lane].queued.push_back(InFlight {
            ticket,
            members,
            submitted: t0,
            prefill_tokens: plan.prefill_tokens,
        });
    }

    fn fail_members(&mut self, keys: &[u64], e: &anyhow::Error) {
        tracing::error!("a step failed: {e:#}");
        for s in self.running.iter_mut().filter(|s| keys.contains(&s.key) && !s.finished) {
            let failed = Event::Failed(EngineError::Internal(format!("{e:#}")));
            s.end(&self.shared.in_system, Some(failed), "error");
        }
    }

    /// Which lane's oldest step to complete next: one that is done already, else the
    /// decode lane whose oldest step was queued first (decode steps are the short ones),
    /// else any.
    fn lane_to_complete(&self) -> Option<usize> {
        let busy: Vec<usize> = (0..self.lanes.len())
            .filter(|&l| !self.lanes[l].queued.is_empty())
            .collect();
        if let Some(&l) = busy
            .iter()
            .find(|&&l| self.model.is_done(&self.lanes[l].queued[0].ticket))
        {
            return Some(l);
        }
        busy.iter()
            .copied()
            .filter(|&l| l < self.decode_lanes)
            .min_by_key(|&l| self.lanes[l].queued[0].submitted)
            .or(busy.first().copied())
    }

    /// Nothing is queued and nothing could be: sequences that are running but can take
    /// no step would wait forever; end them.
    fn fail_stalled(&mut self) {
        let stuck: Vec<u64> = self.running.iter().filter(|s| !s.finished).map(|s| s.key).collect();
        if !stuck.is_empty() {
            let e = anyhow::anyhow!("{} sequences could not be scheduled", stuck.len());
            self.fail_members(&stuck, &e);
        }
    }

    /// Waits for `lane`'s oldest step and hands its tokens to their sequences.
    fn complete(&mut self, lane: usize) {
        let f = self.lanes[lane].queued.pop_front().expect("a queued step");
        let result = self.model.complete(lane, f.ticket);
        let t1 = Instant::now();
        // The step's own time: from when the GPU could start it (its submission, or the
        // end of the lane's previous step) to its end.
        let start = self.lanes[lane].last_done.map_or(f.submitted, |d| d.max(f.submitted));
        self.lanes[lane].last_done = Some(t1);
        let kind = if f.prefill_tokens > 0 { "prefill" } else { "decode" };
        let secs = (t1 - start).as_secs_f64();
        metrics::histogram!(tm::STAGE_SECONDS, "stage" => kind).record(secs);
        metrics::histogram!(tm::STAGE_SECONDS, "stage" => "step").record(secs);
        let decode_rows = f.members.iter().filter(|m| m.samples).count();
        metrics::histogram!(tm::BATCH_TOKENS).record((f.prefill_tokens + decode_rows) as f64);
        for m in &f.members {
            if let Some(s) = self.running.iter_mut().find(|s| s.key == m.key) {
                s.in_flight -= 1;
            }
        }
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                let keys: Vec<u64> = f.members.iter().map(|m| m.key).collect();
                self.fail_members(&keys, &e);
                return;
            }
        };
        for (i, why) in &out.failed {
            if let Some(m) = f.members.get(*i) {
                self.fail_members(&[m.key], &anyhow::anyhow!("{why}"));
            }
        }
        for &(stage, secs) in &out.stage_secs {
            metrics::histogram!(tm::STAGE_SECONDS, "stage" => stage).record(secs);
        }
        let generated = self.process(&f.members, &out.tokens, t1);
        let t2 = Instant::now();
        metrics::histogram!(tm::STAGE_SECONDS, "stage" => "output").record((t2 - t1).as_secs_f64());
        if let Some(tr) = &mut self.trace {
            let args = serde_json::json!({"sequences": f.members.len(), "prefill_tokens": f.prefill_tokens,
                "sampled": decode_rows});
            // With the lane's GPU streams traced, its decode steps are `step` spans: the
            // GPU tracks hold their compute, and `tools/trace` counts `decode` as compute.
            let name = if kind == "decode" && self.gpu_tracks.get(lane).is_some() {
                "step"
            } else {
                kind
            };
            let _ = tr.span(2 + lane as u64, name, start, t1, args);
            let _ = tr.span(1, "output", t1, t2, serde_json::json!({"tokens": generated}));
            if let Some(g) = self.gpu_tracks.get_mut(lane) {
                let _ = g.write(tr, &out.gpu_spans);
            }
        }
    }

    /// Gives each sampling member its token: time to first token or inter-token
    /// latency, stop rules, streamed text, the end; counts the tokens kept (in the
    /// metrics before the end goes out, so that a client that has its answer finds it
    /// there) and returns how many.
    fn process(&mut self, members: &[Member], tokens: &[u32], now: Instant) -> u64 {
        let (mut generated, mut counted) = (0, 0);
        for (m, &id) in members.iter().filter(|m| m.samples).zip(tokens) {
            let Some(s) = self.running.iter_mut().find(|s| s.key == m.key) else {
                continue;
            };
            s.pending -= 1;
            if s.finished {
                continue;
            }
            match s.last_token_at {
                None => metrics::histogram!(tm::TTFT_SECONDS).record((now - s.arrived).as_secs_f64()),
                Some(t) => metrics::histogram!(tm::ITL_SECONDS).record((now - t).as_secs_f64()),
            }
            s.last_token_at = Some(now);
            let rules = StopRules {
                eos: &self.eos,
                stop: &s.stop,
                max_tokens: s.max_tokens,
            };
            let full = m.len_after >= self.config.max_context;
            let finish = match s.out.push(id, &self.tok, &rules, full) {
                Ok(f) => f,
                Err(e) => {
                    let failed = Event::Failed(EngineError::Internal(format!("{e:#}")));
                    s.end(&self.shared.in_system, Some(failed), "error");
                    continue;
                }
            };
            // Counted as the usage counts them: a final end-of-sequence token is not.
            generated += u64::from(finish != Some(FinishReason::Eos));
            let delta = s.out.take_stream_delta(&s.stop);
            if !delta.is_empty() && s.tx.send(Event::Text(delta)).is_err() {
                s.end(&self.shared.in_system, None, "cancelled");
                continue;
            }
            if let Some(finish) = finish {
                let usage = Usage {
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: s.out.completion_len(),
                };
                metrics::counter!(tm::GENERATED_TOKENS).increment(generated - counted);
                counted = generated;
                s.end(&self.shared.in_system, Some(Event::Done { finish, usage }), "completed");
            }
        }
        metrics::counter!(tm::GENERATED_TOKENS).increment(generated - counted);
        generated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuModel;
    use crate::engine::backend::{BackendStats, CpuBackend, StepOutput};
    use crate::engine::generate::{generate, GenerateOptions, GenerateRequest};
    use crate::model::load::open_model;
    use crate::model::weights::ModelWeights;

    fn tiny() -> (CpuModel, TextTokenizer) {
        let m = open_model("synthetic:tiny@5").unwrap();
        let w = ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap();
        (CpuModel::new(m.config.clone(), w), m.tokenizer)
    }

    /// A scheduler of `max_batch` running and `max_queue` queued requests, contexts of
    /// 4096 tokens, prompts in chunks of 64, decode steps unspaced.
    fn limits(max_batch: usize, max_queue: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_batch,
            max_queue,
            max_context: 4096,
            prefill_chunk: 64,
            decode_spacing: Duration::ZERO,
        }
    }

    fn collect(mut rx: UnboundedReceiver<Event>) -> (String, FinishReason, Usage) {
        let mut text = String::new();
        loop {
            match rx.blocking_recv().expect("engine ended the stream") {
                Event::Text(t) => text.push_str(&t),
                Event::Done { finish, usage } => return (text, finish, usage),
                Event::Failed(e) => panic!("request failed: {e}"),
            }
        }
    }

    /// Every request through the engine gives what it gives alone through `generate`,
    /// on every schedule: one lane run step by step, one lane with a step queued ahead
    /// (tokens fed from the previous step, a finished sequence's extra token dropped),
    /// a second lane for prefills, and two decode lanes beside it. Some requests end at
    /// a stop string found in their own output, some at their token limit.
    fn batched_requests_equal_each_alone(lanes: usize, depth: usize, decode_lanes: usize) {
        let (model, tok) = tiny();
        let (reference, _) = tiny();
        let tok = Arc::new(tok);
        let config = SchedulerConfig {
            max_batch: 4,
            max_queue: 8,
            max_context: 256,
            prefill_chunk: 7,
            decode_spacing: std::time::Duration::ZERO,
        };
        let backend = CpuBackend::new(model, None)
            .unwrap()
            .with_schedule(lanes, depth)
            .with_decode_lanes(decode_lanes);
        let (engine, join) = spawn_engine(backend, tok.clone(), config, None).unwrap();
        let alone = |r: &EngineRequest| {
            let g = GenerateRequest {
                prompt: r.prompt.clone(),
                max_tokens: r.max_tokens,
                sampling: r.sampling,
                stop: r.stop.clone(),
            };
            generate(&reference, &tok, &[g], GenerateOptions::default())
                .unwrap()
                .0
                .remove(0)
        };
        let mut reqs: Vec<EngineRequest> = (0..7)
            .map(|i| EngineRequest {
                prompt: tok.encode(&"word ".repeat(1 + 5 * i), true).unwrap(),
                max_tokens: 3 + 2 * i,
                sampling: SamplingParams::default(),
                stop: vec![],
            })
            .collect();
        for r in reqs.iter_mut().skip(3).step_by(2) {
            let text = alone(r).text;
            let mid = text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i);
            let stop: String = text[mid..].chars().take(2).collect();
            if !stop.is_empty() {
                r.stop = vec![stop];
            }
        }
        let rxs: Vec<_> = reqs.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
        for (r, rx) in reqs.iter().zip(rxs) {
            let (text, finish, usage) = collect(rx);
            let g = alone(r);
            assert_eq!(text, g.text, "lanes {lanes} depth {depth} decode lanes {decode_lanes}");
            assert_eq!(finish, g.finish);
            assert_eq!(usage.completion_tokens, g.completion_ids.len());
            assert_eq!(usage.prompt_tokens, r.prompt.len());
        }
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
        assert!(matches!(engine.submit(reqs[0].clone()), Err(SubmitError::ShuttingDown)));
    }

    #[test]
    fn batched_requests_equal_each_alone_step_by_step() {
        batched_requests_equal_each_alone(1, 1, 1);
    }

    #[test]
    fn batched_requests_equal_each_alone_with_steps_queued_ahead() {
        batched_requests_equal_each_alone(1, 2, 1);
    }

    #[test]
    fn batched_requests_equal_each_alone_with_a_prefill_lane() {
        batched_requests_equal_each_alone(2, 2, 1);
    }

    #[test]
    fn batched_requests_equal_each_alone_on_two_decode_lanes() {
        batched_requests_equal_each_alone(3, 2, 2);
        batched_requests_equal_each_alone(4, 1, 3);
    }

    /// A shutdown while steps are queued ends every stream with a final event (cancelled,
    /// or done if it ended first) and stops the engine.
    #[test]
    fn shutdown_with_steps_queued_ends_every_stream() {
        let (model, tok) = tiny();
        let tok = Arc::new(tok);
        let config = limits(2, 2);
        let backend = CpuBackend::new(model, None).unwrap().with_schedule(2, 2);
        let (engine, join) = spawn_engine(backend, tok.clone(), config, None).unwrap();
        let long = EngineRequest {
            prompt: tok.encode("a b c d", true).unwrap(),
            max_tokens: 4000,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let rxs: Vec<_> = (0..4).map(|_| engine.submit(long.clone()).unwrap()).collect();
        let t0 = Instant::now();
        while engine.running() < 2 {
            assert!(t0.elapsed() < Duration::from_secs(30), "not admitted");
            std::thread::sleep(Duration::from_millis(1));
        }
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
        for mut rx in rxs {
            let mut end = None;
            while let Some(ev) = rx.blocking_recv() {
                if !matches!(ev, Event::Text(_)) {
                    end = Some(ev);
                }
            }
            assert!(
                matches!(
                    end,
                    Some(Event::Failed(EngineError::ShuttingDown)) | Some(Event::Done { .. })
                ),
                "{end:?}"
            );
        }
    }

    #[test]
    fn an_answered_request_leaves_room_for_the_next_at_once() {
        // One place in all; each answer's end is sent only once the request no longer
        // holds it, so the client's next request is never refused, though the step that
        // sampled past the end still holds the sequence's state (completing it takes
        // 30 ms here, during which the engine looks at nothing else).
        let (model, tok) = tiny();
        let tok = Arc::new(tok);
        let config = limits(1, 0);
        let mut backend = Counting::new(CpuBackend::new(model, None).unwrap().with_schedule(1, 2));
        backend.slow_complete = Duration::from_millis(30);
        let (engine, join) = spawn_engine(backend, tok.clone(), config, None).unwrap();
        let req = EngineRequest {
            prompt: tok.encode("a b c", true).unwrap(),
            max_tokens: 2,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        for i in 0..10 {
            let rx = engine
                .submit(req.clone())
                .unwrap_or_else(|e| panic!("request {i} refused right after the previous answer: {e:?}"));
            let (_, _, usage) = collect(rx);
            assert_eq!(usage.completion_tokens, 2);
            assert_eq!(engine.in_system(), 0, "request {i} still counted after its answer");
        }
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
    }

    #[test]
    fn full_queue_is_refused_and_dropped_receivers_free_slots() {
        full_queue_and_dropped_receivers(1);
        full_queue_and_dropped_receivers(2);
    }

    fn full_queue_and_dropped_receivers(depth: usize) {
        let (model, tok) = tiny();
        let tok = Arc::new(tok);
        let config = limits(1, 1);
        let backend = CpuBackend::new(model, None).unwrap().with_schedule(1, depth);
        let (engine, join) = spawn_engine(backend, tok.clone(), config, None).unwrap();
        let long = EngineRequest {
            prompt: tok.encode("a b c", true).unwrap(),
            max_tokens: 4000,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let a = engine.submit(long.clone()).unwrap();
        let b = engine.submit(long.clone()).unwrap();
        assert_eq!(
            engine.submit(long.clone()).unwrap_err(),
            SubmitError::QueueFull { in_system: 2 }
        );
        drop(a);
        drop(b);
        let t0 = Instant::now();
        while engine.in_system() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "slots were not freed");
            std::thread::sleep(Duration::from_millis(5));
        }
        let short = EngineRequest { max_tokens: 2, ..long };
        let (_, finish, usage) = collect(engine.submit(short).unwrap());
        assert_eq!((finish, usage.completion_tokens), (FinishReason::Length, 2));
        let bad = EngineRequest {
            prompt: vec![],
            max_tokens: 1,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        assert!(matches!(engine.submit(bad), Err(SubmitError::Invalid(_))));
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
    }

    /// A step's lane and its members' first input tokens (`None`: the previous step's
    /// token).
    type LoggedStep = (usize, Vec<Option<u32>>);

    /// A CPU backend that counts how often its counters are read while a step of its
    /// is queued (on the GPU such a read may wait for that step), logs when each
    /// decode-lane step was queued and whether the prefill lane had steps queued then,
    /// logs every step ([`LoggedStep`]), and says it defers prefills where told to.
    struct Counting {
        inner: CpuBackend,
        queued: [usize; 2],
        reads_while_queued: Arc<std::sync::atomic::AtomicUsize>,
        steps: Arc<std::sync::atomic::AtomicUsize>,
        decode_submits: Arc<Mutex<Vec<(Instant, bool)>>>,
        submits: Arc<Mutex<Vec<LoggedStep>>>,
        defers: bool,
        /// How long each step's completion takes beyond the CPU's.
        slow_complete: Duration,
    }

    impl Counting {
        fn new(inner: CpuBackend) -> Self {
            Counting {
                inner,
                queued: [0; 2],
                reads_while_queued: Arc::default(),
                steps: Arc::default(),
                decode_submits: Arc::default(),
                submits: Arc::default(),
                defers: false,
                slow_complete: Duration::ZERO,
            }
        }
    }

    impl StepBackend for Counting {
        type Seq = <CpuBackend as StepBackend>::Seq;
        type Ticket = <CpuBackend as StepBackend>::Ticket;
        fn config(&self) -> &crate::model::config::ModelConfig {
            self.inner.config()
        }
        fn lanes(&self) -> usize {
            self.inner.lanes()
        }
        fn queue_depth(&self) -> usize {
            self.inner.queue_depth()
        }
        fn defers_prefill(&self) -> bool {
            self.defers
        }
        fn new_seq(&self, spec: &SeqSpec) -> anyhow::Result<Self::Seq> {
            self.inner.new_seq(spec)
        }
        fn seq_len(&self, seq: &Self::Seq) -> usize {
            self.inner.seq_len(seq)
        }
        fn seq_bytes(&self, seq: &Self::Seq) -> usize {
            self.inner.seq_bytes(seq)
        }
        fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, Self::Seq>]) -> anyhow::Result<Self::Ticket> {
            if lane == 0 {
                let prefilling = self.queued.get(1).is_some_and(|&q| q > 0);
                self.decode_submits.lock().unwrap().push((Instant::now(), prefilling));
            }
            let firsts = batch
                .iter()
                .map(|s| match s.input {
                    StepInput::Tokens(t) => t.first().copied(),
                    StepInput::Previous => None,
                })
                .collect();
            self.submits.lock().unwrap().push((lane, firsts));
            self.queued[lane] += 1;
            self.steps.fetch_add(1, Ordering::SeqCst);
            self.inner.submit(lane, batch)
        }
        fn is_done(&self, ticket: &Self::Ticket) -> bool {
            self.inner.is_done(ticket)
        }
        fn complete(&mut self, lane: usize, ticket: Self::Ticket) -> anyhow::Result<StepOutput> {
            self.queued[lane] -= 1;
            std::thread::sleep(self.slow_complete);
            self.inner.complete(lane, ticket)
        }
        fn stats(&self) -> BackendStats {
            if self.queued.iter().sum::<usize>() > 0 {
                self.reads_while_queued.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.stats()
        }
    }

    #[test]
    fn the_backends_counters_are_not_read_after_every_step_while_steps_are_queued() {
        let (model, tok) = tiny();
        let backend = Counting::new(CpuBackend::new(model, None).unwrap().with_schedule(1, 2));
        let (reads, steps) = (backend.reads_while_queued.clone(), backend.steps.clone());
        let config = SchedulerConfig {
            max_batch: 4,
            max_queue: 8,
            max_context: 256,
            prefill_chunk: 16,
            decode_spacing: std::time::Duration::ZERO,
        };
        let (engine, join) = spawn_engine(backend, Arc::new(tok), config, None).unwrap();
        let t0 = Instant::now();
        let rxs: Vec<_> = (0..4)
            .map(|i| {
                engine
                    .submit(EngineRequest {
                        prompt: vec![1, 2, 3, 4 + i],
                        max_tokens: 60,
                        sampling: SamplingParams::default(),
                        stop: vec![],
                    })
                    .unwrap()
            })
            .collect();
        for rx in rxs {
            collect(rx);
        }
        let secs = t0.elapsed().as_secs_f64();
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
        let (reads, steps) = (reads.load(Ordering::SeqCst), steps.load(Ordering::SeqCst));
        // At most one read a STATS_EVERY while steps are queued, and one each time a
        // sequence comes or goes (4 of each).
        let allowed = 9 + (secs / STATS_EVERY.as_secs_f64()) as usize;
        assert!(steps >= 40, "{steps} steps");
        assert!(
            reads <= allowed,
            "{reads} reads while steps were queued, over {steps} steps in {secs:.2} s"
        );
    }

    /// With `decode_spacing`, decode steps queued while the prefill lane has steps
    /// queued start at least the spacing apart (one at a time), and the outputs stay
    /// what they are unspaced.
    #[test]
    fn decode_steps_are_spaced_while_a_prompt_is_prefilled() {
        let (model, tok) = tiny();
        let (reference, _) = tiny();
        let spacing = Duration::from_millis(5);
        let backend = Counting::new(CpuBackend::new(model, None).unwrap().with_schedule(2, 2));
        let log = backend.decode_submits.clone();
        let config = SchedulerConfig {
            max_batch: 2,
            max_queue: 2,
            max_context: 2048,
            prefill_chunk: 4,
            decode_spacing: spacing,
        };
        let tok = Arc::new(tok);
        let (engine, join) = spawn_engine(backend, tok.clone(), config, None).unwrap();
        let short = EngineRequest {
            prompt: vec![1, 2, 3],
            max_tokens: 300,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let first = engine.submit(short.clone()).unwrap();
        // Once the first decodes, a long prompt is prefilled beside it, 4 tokens a step.
        let t0 = Instant::now();
        while log.lock().unwrap().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(30), "no decode step");
            std::thread::sleep(Duration::from_millis(1));
        }
        let long = EngineRequest {
            prompt: (0..1200).map(|i| 5 + i % 50).collect(),
            max_tokens: 2,
            ..short.clone()
        };
        let second = engine.submit(long.clone()).unwrap();
        let (text, ..) = collect(first);
        collect(second);
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
        let g = GenerateRequest {
            prompt: short.prompt.clone(),
            max_tokens: short.max_tokens,
            sampling: short.sampling,
            stop: vec![],
        };
        let alone = generate(&reference, &tok, &[g], GenerateOptions::default())
            .unwrap()
            .0
            .remove(0);
        assert_eq!(text, alone.text);
        let log = log.lock().unwrap();
        let spaced: Vec<Duration> = log.windows(2).filter(|w| w[1].1).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            spaced.len() >= 3,
            "{} decode steps queued while prefilling",
            spaced.len()
        );
        for gap in &spaced {
            assert!(
                *gap >= spacing,
                "decode steps {gap:?} apart while prefilling (spacing {spacing:?})"
            );
        }
    }

    /// A backend that defers a finished prefill's work to the sequence's first decode
    /// step: a new prompt's first chunk waits for the prompt before it to have its first
    /// decode step queued; without deferral it goes as soon as the prefill lane has
    /// room. A request that ends at its prompt's token (it never decodes) holds nothing
    /// up, and the texts are the same either way.
    #[test]
    fn a_deferred_prefill_holds_new_prompts_until_its_first_decode_step() {
        let mut texts = Vec::new();
        for defers in [false, true] {
            let (model, tok) = tiny();
            let mut backend = Counting::new(CpuBackend::new(model, None).unwrap().with_schedule(2, 2));
            backend.defers = defers;
            let log = backend.submits.clone();
            let config = SchedulerConfig {
                max_batch: 3,
                max_queue: 3,
                max_context: 1024,
                prefill_chunk: 4,
                decode_spacing: Duration::ZERO,
            };
            let (engine, join) = spawn_engine(backend, Arc::new(tok), config, None).unwrap();
            let request = |prompt: Vec<u32>, max_tokens| EngineRequest {
                prompt,
                max_tokens,
                sampling: SamplingParams::default(),
                stop: vec![],
            };
            // One token, then a long prompt (100 full chunks), then one that starts with 50.
            let one = engine.submit(request(vec![1, 2, 3], 1)).unwrap();
            let long = engine
                .submit(request((0..400).map(|i| 5 + i % 20).collect(), 4))
                .unwrap();
            let next = engine.submit(request((50..58).collect(), 4)).unwrap();
            let (_, finish, usage) = collect(one);
            assert_eq!((finish, usage.completion_tokens), (FinishReason::Length, 1));
            texts.push((collect(long).0, collect(next).0));
            engine.shutdown(Duration::ZERO);
            join.join().unwrap();
            let log = log.lock().unwrap();
            let first_decode = log.iter().position(|(lane, _)| *lane == 0).expect("a decode step");
            let next_starts = log
                .iter()
                .position(|(lane, firsts)| *lane == 1 && firsts.contains(&Some(50)))
                .expect("the last prompt's first chunk");
            assert_eq!(
                next_starts > first_decode,
                defers,
                "deferring {defers}: the last prompt started at step {next_starts}, the long one's first decode \
                 step was step {first_decode}"
            );
        }
        assert_eq!(texts[0], texts[1]);
    }

    /// How long a [`Gated`] backend keeps a sequence not ready once its prompt's last
    /// chunk is queued.
    #[derive(Clone, Copy, Debug)]
    enum Hold {
        /// Until the decode lane has taken this many more steps.
        Steps(usize),
        /// For this long.
        For(Duration),
        /// Never.
        Forever,
    }

    /// A [`Gated`] step's lane and its members (their admission order).
    type GatedStep = (usize, Vec<usize>);

    /// When a held sequence becomes ready.
    #[derive(Clone, Copy, Debug)]
    enum Gate {
        AfterStep(usize),
        At(Instant),
        Never,
    }

    /// A CPU sequence and its gate.
    struct GatedSeq {
        inner: crate::engine::backend::CpuSeq,
        /// Its admission order.
        n: usize,
        gate: Option<Gate>,
        /// Its first step once ready reports it failed.
        fails: bool,
    }

    /// A CPU backend that keeps chosen sequences not ready for a while once their
    /// prompt's last chunk is queued, as the GPU's compression thread does (it defers
    /// prefills, too), and fails some of them at their first step after. It counts the
    /// steps it was given holding a sequence that was not ready (and refuses them), and
    /// logs each step's lane and members (admission order). Its decode steps never say
    /// they are done before the engine waits for them (as the GPU's often do not), so
    /// that the prefill lane's steps, all done at once on the CPU, are not left behind
    /// the decode lane's.
    struct Gated {
        inner: CpuBackend,
        /// Per admitted sequence, in order: its hold and whether it fails after (none:
        /// never held).
        holds: Vec<Option<(Hold, bool)>>,
        admitted: AtomicUsize,
        decode_steps: usize,
        steps: Arc<Mutex<Vec<GatedStep>>>,
        unready_given: Arc<AtomicUsize>,
    }

    impl Gated {
        fn new(holds: Vec<Option<(Hold, bool)>>) -> Self {
            let (model, _) = tiny();
            Gated {
                inner: CpuBackend::new(model, None).unwrap().with_schedule(2, 2),
                holds,
                admitted: AtomicUsize::new(0),
                decode_steps: 0,
                steps: Arc::default(),
                unready_given: Arc::default(),
            }
        }
    }

    impl StepBackend for Gated {
        type Seq = GatedSeq;
        type Ticket = (usize, StepOutput);
        fn config(&self) -> &crate::model::config::ModelConfig {
            self.inner.config()
        }
        fn lanes(&self) -> usize {
            self.inner.lanes()
        }
        fn queue_depth(&self) -> usize {
            self.inner.queue_depth()
        }
        fn defers_prefill(&self) -> bool {
            true
        }
        fn seq_ready(&self, seq: &GatedSeq) -> bool {
            match seq.gate {
                None => true,
                Some(Gate::AfterStep(n)) => self.decode_steps >= n,
                Some(Gate::At(t)) => Instant::now() >= t,
                Some(Gate::Never) => false,
            }
        }
        fn new_seq(&self, spec: &SeqSpec) -> anyhow::Result<GatedSeq> {
            Ok(GatedSeq {
                inner: self.inner.new_seq(spec)?,
                n: self.admitted.fetch_add(1, Ordering::SeqCst),
                gate: None,
                fails: false,
            })
        }
        fn seq_len(&self, seq: &GatedSeq) -> usize {
            self.inner.seq_len(&seq.inner)
        }
        fn seq_bytes(&self, seq: &GatedSeq) -> usize {
            self.inner.seq_bytes(&seq.inner)
        }
        fn submit(&mut self, lane: usize, batch: &mut [StepSeq<'_, GatedSeq>]) -> anyhow::Result<(usize, StepOutput)> {
            if batch.iter().any(|s| !self.seq_ready(s.seq)) {
                self.unready_given.fetch_add(1, Ordering::SeqCst);
                anyhow::bail!("a step holds a sequence that is not ready");
            }
            let members: Vec<usize> = batch.iter().map(|s| s.seq.n).collect();
            self.steps.lock().unwrap().push((lane, members));
            // A sequence's first step once ready reports its failure.
            let mut failed = Vec::new();
            for (i, s) in batch.iter_mut().enumerate() {
                if s.seq.gate.take().is_some() && std::mem::take(&mut s.seq.fails) {
                    failed.push((i, format!("sequence {} failed while it was not ready", s.seq.n)));
                }
            }
            let done: Vec<bool> = batch.iter().map(|s| s.prompt_done).collect();
            let mut inner: Vec<StepSeq<'_, crate::engine::backend::CpuSeq>> = batch
                .iter_mut()
                .map(|s| StepSeq {
                    input: s.input,
                    seq: &mut s.seq.inner,
                    sample: s.sample,
                    prompt_done: s.prompt_done,
                })
                .collect();
            let mut out = self.inner.submit(lane, &mut inner)?;
            drop(inner);
            out.failed.extend(failed);
            if lane == 0 {
                self.decode_steps += 1;
            }
            for (s, _) in batch.iter_mut().zip(done).filter(|(_, d)| *d) {
                if let Some(Some((hold, fails))) = self.holds.get(s.seq.n) {
                    s.seq.gate = Some(match *hold {
                        Hold::Steps(n) => Gate::AfterStep(self.decode_steps + n),
                        Hold::For(d) => Gate::At(Instant::now() + d),
                        Hold::Forever => Gate::Never,
                    });
                    s.seq.fails = *fails;
                }
            }
            Ok((lane, out))
        }
        fn is_done(&self, ticket: &(usize, StepOutput)) -> bool {
            ticket.0 != 0
        }
        fn complete(&mut self, lane: usize, ticket: (usize, StepOutput)) -> anyhow::Result<StepOutput> {
            self.inner.complete(lane, ticket.1)
        }
    }

    /// The gated tests' scheduler: two lanes' worth of room, prompts in chunks of 4.
    fn gated_config() -> SchedulerConfig {
        SchedulerConfig {
            max_batch: 3,
            max_queue: 3,
            max_context: 1024,
            prefill_chunk: 4,
            decode_spacing: Duration::ZERO,
        }
    }

    /// A greedy request.
    fn gated_request(prompt: Vec<u32>, max_tokens: usize) -> EngineRequest {
        EngineRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: vec![],
        }
    }

    /// What `generate` gives `r` alone.
    fn alone_text(r: &EngineRequest) -> String {
        let (reference, tok) = tiny();
        let g = GenerateRequest {
            prompt: r.prompt.clone(),
            max_tokens: r.max_tokens,
            sampling: r.sampling,
            stop: r.stop.clone(),
        };
        generate(&reference, &tok, &[g], GenerateOptions::default())
            .unwrap()
            .0
            .remove(0)
            .text
    }

    /// A sequence the backend keeps not ready for 20 decode steps once its prompt is in
    /// is left out of the decode steps meanwhile, while the other sequence decodes on
    /// (20 steps without it), then joins them; both give what they give alone.
    #[test]
    fn a_sequence_not_ready_sits_out_the_decode_steps_and_joins_once_ready() {
        let backend = Gated::new(vec![None, Some((Hold::Steps(20), false))]);
        let (steps, unready) = (backend.steps.clone(), backend.unready_given.clone());
        let (_, tok) = tiny();
        let (engine, join) = spawn_engine(backend, Arc::new(tok), gated_config(), None).unwrap();
        let (first, held) = (gated_request(vec![1, 2, 3], 80), gated_request((10..19).collect(), 8));
        let rxs = [
            engine.submit(first.clone()).unwrap(),
            engine.submit(held.clone()).unwrap(),
        ];
        let [a, b] = rxs.map(|rx| collect(rx).0);
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
        assert_eq!(
            unready.load(Ordering::SeqCst),
            0,
            "steps were given a sequence that was not ready"
        );
        assert_eq!((a, b), (alone_text(&first), alone_text(&held)));
        let steps = steps.lock().unwrap();
        let decode: Vec<&Vec<usize>> = steps.iter().filter(|(l, _)| *l == 0).map(|(_, m)| m).collect();
        // The held one's last chunk (the prefill lane's last step with it) and its first
        // decode step: 20 decode steps of the other in between.
        let prompt_in = steps.iter().rposition(|(l, m)| *l == 1 && m.contains(&1)).unwrap();
        let before = steps[..prompt_in].iter().filter(|(l, _)| *l == 0).count();
        let first_decode = decode
            .iter()
            .position(|m| m.contains(&1))
            .expect("the held sequence decoded");
        assert!(
            first_decode >= before + 20,
            "joined at decode step {first_decode}, its prompt was in at {before}"
        );
        assert!(decode[before..first_decode].iter().all(|m| m == &&vec![0]));
    }

    /// A sequence kept not ready while nothing else runs or is queued is waited for (not
    /// failed as a sequence that cannot be scheduled) and then decodes.
    #[test]
    fn a_sequence_not_ready_alone_is_waited_for() {
        let hold = Duration::from_millis(60);
        let (_, tok) = tiny();
        let backend = Gated::new(vec![Some((Hold::For(hold), false))]);
        let (engine, join) = spawn_engine(backend, Arc::new(tok), gated_config(), None).unwrap();
        let r = gated_request(vec![4, 5, 6, 7, 8], 6);
        let t0 = Instant::now();
        let (text, finish, _) = collect(engine.submit(r.clone()).unwrap());
        assert!(t0.elapsed() >= hold);
        assert_eq!((text, finish), (alone_text(&r), FinishReason::Length));
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
    }

    /// A sequence whose backend work failed while it was not ready gets the failure, at
    /// its first step; the other decodes on and gives what it gives alone.
    #[test]
    fn a_sequence_that_failed_while_not_ready_gets_its_error() {
        let backend = Gated::new(vec![None, Some((Hold::Steps(5), true))]);
        let (_, tok) = tiny();
        let (engine, join) = spawn_engine(backend, Arc::new(tok), gated_config(), None).unwrap();
        let first = gated_request(vec![1, 2, 3], 40);
        let a = engine.submit(first.clone()).unwrap();
        let mut b = engine.submit(gated_request((10..19).collect(), 8)).unwrap();
        let failure = loop {
            match b.blocking_recv().expect("the engine ended the stream") {
                Event::Text(_) => {}
                other => break other,
            }
        };
        match failure {
            Event::Failed(EngineError::Internal(m)) => assert!(m.contains("failed while it was not ready"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(collect(a).0, alone_text(&first));
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
    }

    /// A shutdown while a sequence is not ready (and never will be) ends it as shut down
    /// once the grace period is over, and the engine stops.
    #[test]
    fn a_shutdown_while_a_sequence_is_not_ready_ends() {
        let backend = Gated::new(vec![Some((Hold::Forever, false))]);
        let steps = backend.steps.clone();
        let (_, tok) = tiny();
        let (engine, join) = spawn_engine(backend, Arc::new(tok), gated_config(), None).unwrap();
        let mut rx = engine.submit(gated_request(vec![1, 2, 3], 8)).unwrap();
        // Its prompt is in (one step), then it is held.
        let t0 = Instant::now();
        while steps.lock().unwrap().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(10), "no step");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        engine.shutdown(Duration::from_millis(50));
        join.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10));
        let mut end = None;
        while let Some(ev) = rx.blocking_recv() {
            end = Some(ev);
        }
        assert_eq!(end, Some(Event::Failed(EngineError::ShuttingDown)));
        assert_eq!(*steps.lock().unwrap(), [(1, vec![0])], "it never decoded");
    }
}
